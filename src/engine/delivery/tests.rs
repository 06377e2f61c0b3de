use crate::engine::testing::{device, user_on, Fixture};
use crate::engine::{Closing, Event, Reply, Request};
use crate::ids::ClientMessageId;
use crate::proto::{pb, ErrorCode, Frame};

fn server_acks(frames: &[Frame]) -> Vec<(u64, u64)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::ServerAck(a) => Some((a.client_message_id, a.server_sequence)),
            _ => None,
        })
        .collect()
}

fn delivers(frames: &[Frame]) -> Vec<(u64, Vec<u8>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(d) => Some((d.sequence, d.payload.to_vec())),
            _ => None,
        })
        .collect()
}

fn error_codes(frames: &[Frame]) -> Vec<i32> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Error(e) => Some(e.code),
            _ => None,
        })
        .collect()
}

#[test]
fn opened_session_gets_welcome_with_its_pending_mark() {
    let mut f = Fixture::new(0, 1);
    f.open(2, 20);
    let frames = f.host.take_frames(20);
    match &frames[..] {
        [Frame::Welcome(w)] => assert_eq!(w.inbox_pending_through, 0),
        other => panic!("expected one Welcome, got {other:?}"),
    }
    f.send(1, 10, 1, 2, b"x");
    f.commit();
    f.handle(Event::Closed {
        device: device(2),
        session: 20,
    });
    f.open(2, 21);
    match &f.host.take_frames(21)[..] {
        [Frame::Welcome(w), Frame::Deliver(_)] => assert_eq!(w.inbox_pending_through, 1),
        other => panic!("expected Welcome then Deliver, got {other:?}"),
    }
}

#[test]
fn server_ack_and_delivery_wait_for_the_commit() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.open(2, 20);
    f.host.frames.clear();
    f.send(1, 10, 7, 2, b"hello");
    assert!(f.host.frames.is_empty(), "nothing before the commit");
    assert!(f.host.commits_due > 0);
    assert_eq!(f.engine.session(device(1)).unwrap().sends_in_flight, 1);
    f.commit();
    assert_eq!(server_acks(&f.host.take_frames(10)), vec![(7, 1)]);
    assert_eq!(f.engine.session(device(1)).unwrap().sends_in_flight, 0);
    assert_eq!(
        delivers(&f.host.take_frames(20)),
        vec![(1, b"hello".to_vec())]
    );
}

#[test]
fn send_to_unknown_user_is_refused_and_not_counted() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.host.frames.clear();
    f.send(1, 10, 3, 999, b"x");
    assert_eq!(
        error_codes(&f.host.take_frames(10)),
        vec![ErrorCode::UnknownRecipient as i32]
    );
    assert_eq!(f.engine.session(device(1)).unwrap().sends_in_flight, 0);
}

#[test]
fn retry_gets_the_same_ack_and_other_content_is_refused() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.host.frames.clear();
    f.send(1, 10, 5, 2, b"one");
    f.commit();
    f.send(1, 10, 5, 2, b"one");
    f.commit();
    assert_eq!(server_acks(&f.host.take_frames(10)), vec![(5, 1), (5, 1)]);
    f.send(1, 10, 5, 2, b"two");
    f.commit();
    assert_eq!(
        error_codes(&f.host.take_frames(10)),
        vec![ErrorCode::DuplicateIdMismatch as i32]
    );
    assert_eq!(f.engine.log().last_seq(device(2)).0, 1, "stored once");
}

#[test]
fn send_to_a_user_of_another_shard_becomes_a_request_and_its_reply_an_ack() {
    let mut f = Fixture::new(0, 2);
    let me = user_on(0, 2, 0);
    let them = user_on(1, 2, 0);
    f.open(me, 10);
    f.host.frames.clear();
    f.send(me, 10, 9, them, b"far");
    let (target, request) = f.host.requests.pop().expect("a request");
    assert_eq!(target.0, 1);
    let Request::Store {
        origin,
        sender,
        client_message_id,
        ..
    } = request
    else {
        panic!("a Store request");
    };
    assert_eq!(sender, device(me));
    assert_eq!(f.engine.session(device(me)).unwrap().sends_in_flight, 1);
    f.handle(Event::Reply(Reply::Stored {
        origin,
        sender,
        client_message_id,
        seq: 4,
        timestamp_ms: 1,
    }));
    assert_eq!(server_acks(&f.host.take_frames(10)), vec![(9, 4)]);
    assert_eq!(f.engine.session(device(me)).unwrap().sends_in_flight, 0);
    let _ = ClientMessageId(0);
}

#[test]
fn the_window_bounds_delivery_and_an_ack_reopens_it() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.open(2, 20);
    f.host.frames.clear();
    for id in 1..=6 {
        f.send(1, 10, id, 2, b"m");
    }
    f.commit();
    let window = f.engine.limits().delivery_window_messages as usize;
    let first = delivers(&f.host.take_frames(20));
    assert_eq!(first.len(), window);
    assert_eq!(f.engine.session(device(2)).unwrap().in_flight(), window);
    f.frame(
        2,
        20,
        Frame::Ack(pb::Ack {
            up_to_sequence: 2,
            sequences: vec![],
        }),
    );
    let next: Vec<u64> = delivers(&f.host.take_frames(20))
        .into_iter()
        .map(|d| d.0)
        .collect();
    assert_eq!(next, vec![5, 6]);
}

#[test]
fn a_full_output_queue_stops_the_pump_until_it_drains() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.open(2, 20);
    f.host.frames.clear();
    f.host.full.insert(20);
    f.send(1, 10, 1, 2, b"m");
    f.commit();
    assert!(delivers(&f.host.take_frames(20)).is_empty());
    assert!(f.engine.pump_blocked(device(2)));
    f.host.full.clear();
    f.handle(Event::OutputDrained {
        device: device(2),
        session: 20,
    });
    assert_eq!(delivers(&f.host.take_frames(20)).len(), 1);
    assert!(!f.engine.pump_blocked(device(2)));
}

#[test]
fn a_later_session_replaces_the_live_one_and_an_earlier_one_does_not() {
    let mut f = Fixture::new(0, 1);
    f.open(2, 20);
    f.open(2, 22);
    assert_eq!(f.host.closes, vec![(20, Closing::Replaced)]);
    assert_eq!(f.engine.session(device(2)).unwrap().id, 22);
    // Connected before the live one (its handshake was slower): refused.
    f.open(2, 21);
    assert_eq!(f.host.closes.last(), Some(&(21, Closing::Replaced)));
    assert_eq!(f.engine.session(device(2)).unwrap().id, 22);
    // A replaced session's close does not forget the live one.
    f.handle(Event::Closed {
        device: device(2),
        session: 20,
    });
    assert_eq!(f.engine.session_count(), 1);
}

#[test]
fn handshake_frames_in_a_session_are_fatal() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.frame(
        1,
        10,
        Frame::Register(pb::Register {
            ..Default::default()
        }),
    );
    assert_eq!(
        f.host.closes,
        vec![(10, Closing::Fatal(ErrorCode::UnexpectedFrame))]
    );
}
