use crate::engine::testing::{device, user_on, Fixture};
use crate::engine::{Event, Reply, Request};
use crate::ids::InboxKey;
use crate::proto::{pb, ErrorCode, Frame};

fn receipts(frames: &[Frame]) -> Vec<(i32, Vec<u64>)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Receipt(r) => Some((r.kind, r.client_message_ids.clone())),
            _ => None,
        })
        .collect()
}

fn ack(up_to: u64) -> Frame {
    Frame::Ack(pb::Ack {
        up_to_sequence: up_to,
        sequences: vec![],
    })
}

#[test]
fn an_ack_gives_the_sender_a_delivered_receipt_after_the_commit() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.open(2, 20);
    f.send(1, 10, 41, 2, b"a");
    f.send(1, 10, 42, 2, b"b");
    f.commit();
    f.host.frames.clear();
    f.frame(2, 20, ack(2));
    assert!(receipts(&f.host.take_frames(10)).is_empty());
    f.commit();
    assert_eq!(
        receipts(&f.host.take_frames(10)),
        vec![(pb::ReceiptKind::Delivered as i32, vec![41, 42])]
    );
    assert_eq!(f.engine.log().pending_count(device(2)), 0);
}

#[test]
fn an_ack_past_what_was_sent_acknowledges_only_what_was_sent() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.send(1, 10, 1, 2, b"a");
    f.send(1, 10, 2, 2, b"b");
    f.commit();
    // User 2 has seen nothing: its ack of everything drops nothing.
    f.open(2, 20);
    f.host.full.insert(20);
    f.handle(Event::Closed {
        device: device(2),
        session: 20,
    });
    f.host.full.clear();
    f.open(2, 21);
    f.host.frames.clear();
    f.frame(
        2,
        21,
        Frame::Ack(pb::Ack {
            up_to_sequence: 100,
            sequences: vec![],
        }),
    );
    f.commit();
    assert_eq!(f.engine.log().pending_count(device(2)), 0, "both were sent");
    let mut g = Fixture::new(0, 1);
    g.open(1, 10);
    g.send(1, 10, 1, 2, b"a");
    g.commit();
    g.open(2, 20);
    g.host.full.insert(20);
    g.handle(Event::Closed {
        device: device(2),
        session: 20,
    });
    g.host.full.insert(21);
    g.open(2, 21);
    g.frame(2, 21, ack(100));
    g.commit();
    assert_eq!(
        g.engine.log().pending_count(device(2)),
        1,
        "nothing was sent"
    );
}

#[test]
fn a_receipt_for_another_shard_is_kept_until_that_shard_stored_it() {
    let mut a = Fixture::new(0, 2);
    let mut b = Fixture::new(1, 2);
    let reader = user_on(0, 2, 0);
    let sender = user_on(1, 2, 0);
    a.open(reader, 10);
    a.frame(
        reader,
        10,
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: sender,
            sender_device_id: 1,
            client_message_ids: vec![5, 6],
        }),
    );
    let relay_inbox = InboxKey::relay_to_shard(crate::ids::ShardId(1));
    assert_eq!(a.engine.log().pending_count(relay_inbox), 1);
    let (target, request) = a.host.requests.pop().expect("forwarded");
    assert_eq!(target.0, 1);
    assert!(matches!(
        request,
        Request::StoreReceipt { relay: Some(_), .. }
    ));
    a.commit();
    b.open(sender, 30);
    b.handle(Event::Request(request));
    assert!(b.host.replies.is_empty(), "answered after the commit");
    b.commit();
    assert_eq!(
        receipts(&b.host.take_frames(30)),
        vec![(pb::ReceiptKind::Read as i32, vec![5, 6])]
    );
    let (target, reply) = b.host.replies.pop().expect("relayed reply");
    assert_eq!(target.0, 0);
    assert!(matches!(reply, Reply::Relayed { .. }));
    a.handle(Event::Reply(reply));
    a.commit();
    assert_eq!(a.engine.log().pending_count(relay_inbox), 0);
    assert!(a.engine.relays_settled());
}

#[test]
fn recovery_forwards_what_the_relay_inbox_still_holds() {
    let mut a = Fixture::new(0, 2);
    let reader = user_on(0, 2, 0);
    let sender = user_on(1, 2, 0);
    a.open(reader, 10);
    a.frame(
        reader,
        10,
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: sender,
            sender_device_id: 1,
            client_message_ids: vec![8],
        }),
    );
    a.commit();
    a.host.requests.clear();
    a.handle(Event::Recovered);
    match &a.host.requests[..] {
        [(
            target,
            Request::StoreReceipt {
                recipient,
                client_message_ids,
                relay: Some(_),
                ..
            },
        )] => {
            assert_eq!(target.0, 1);
            assert_eq!(*recipient, device(sender));
            assert_eq!(client_message_ids, &vec![8]);
        }
        other => panic!("expected one forwarded receipt, got {other:?}"),
    }
}

#[test]
fn read_receipts_for_no_ids_are_ignored_and_for_no_device_refused() {
    let mut f = Fixture::new(0, 1);
    f.open(1, 10);
    f.host.frames.clear();
    f.frame(
        1,
        10,
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: 2,
            sender_device_id: 1,
            client_message_ids: vec![],
        }),
    );
    assert!(f.host.frames.is_empty());
    f.frame(
        1,
        10,
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: 2,
            sender_device_id: 9,
            client_message_ids: vec![1],
        }),
    );
    match &f.host.take_frames(10)[..] {
        [Frame::Error(e)] => assert_eq!(e.code, ErrorCode::UnknownRecipient as i32),
        other => panic!("expected one Error, got {other:?}"),
    }
}

#[test]
fn an_ack_the_log_cannot_record_still_frees_the_window() {
    let storage = std::rc::Rc::new(crate::store::storage::SimStorage::new(7));
    let mut f = Fixture::with_storage(0, 1, storage.clone());
    let window = f.engine.limits().delivery_window_messages as u64;
    f.open(1, 10);
    for id in 1..=window + 2 {
        f.send(1, 10, id, 2, b"m");
    }
    f.commit();
    f.open(2, 20);
    let first: Vec<u64> = delivered(&f.host.take_frames(20));
    assert_eq!(first, (1..=window).collect::<Vec<_>>(), "a full window");
    // The disk fills: sends fill the segment until even an empty one is
    // refused, so an ack record listing many sequences has no room either.
    storage.disk_full.set(true);
    let mut id = 1_000;
    for filler in [vec![0u8; 2_000], vec![0u8; 100], Vec::new()] {
        loop {
            id += 1;
            f.send(1, 10, id, 3, &filler);
            let refused = f.host.take_frames(10).iter().any(
                |frame| matches!(frame, Frame::Error(e) if e.code == ErrorCode::StoreFull as i32),
            );
            if refused {
                break;
            }
            assert!(id < 2_000, "the segment never filled");
        }
    }
    let many = f.engine.limits().ids_per_frame_max as usize;
    f.frame(
        2,
        20,
        Frame::Ack(pb::Ack {
            up_to_sequence: 0,
            sequences: (1..=window).cycle().take(many).collect(),
        }),
    );
    let frames = f.host.take_frames(20);
    assert!(
        frames.iter().any(|frame| matches!(frame, Frame::Error(e)
            if e.code == ErrorCode::StoreFailed as i32 && e.client_message_id == 0 && !e.fatal)),
        "the client is told: {frames:?}"
    );
    assert_eq!(
        delivered(&frames),
        vec![window + 1, window + 2],
        "delivery goes on"
    );
    // Nothing was recorded: the entries come again on the next session.
    assert_eq!(f.engine.log().pending_count(device(2)), window + 2);
}

fn delivered(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(d) => Some(d.sequence),
            _ => None,
        })
        .collect()
}
