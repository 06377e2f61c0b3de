//! The log's size cap over a real socket: Sends past it get STORE_FULL and
//! no ServerAck, delivery goes on, and once acknowledged messages free their
//! segments the same client is accepted again.

mod common;

use std::time::{Duration, Instant};

use common::{RawClient, Server};
use switchboard::proto::{ErrorCode, Frame};

#[test]
fn store_full_refuses_then_recovers_after_acks_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.shards = 1;
        // Two 64 KiB segments.
        c.store.log_bytes_max = 2 * c.store.segment_size_bytes;
    });
    let sender = RawClient::register(server.addr);
    let sink = RawClient::register(server.addr);
    let (mut s, _) = RawClient::login(server.addr, &sender);
    let payload = vec![9u8; 3_000];
    let mut accepted = Vec::new();
    let mut refused = 0;
    for id in 1..=200u64 {
        s.send_message(sink.user, id, &payload);
        match s.recv() {
            Some(Frame::ServerAck(a)) => accepted.push(a.client_message_id),
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::StoreFull as i32, "{e:?}");
                assert_eq!(e.client_message_id, id);
                assert!(!e.fatal);
                refused += 1;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(refused, 1, "the cap was reached");
    assert!(accepted.len() > 10, "messages fitted before the cap");

    // Delivery goes on while full: drain and acknowledge everything.
    let (mut r, _) = RawClient::login(server.addr, &sink);
    let mut got = 0;
    while got < accepted.len() {
        let d = r.collect_delivers(1).remove(0);
        assert_eq!(d.client_message_id, accepted[got]);
        r.ack(d.sequence);
        got += 1;
    }
    // Space comes back once the acked segments are reclaimed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = 1_000u64;
    loop {
        id += 1;
        s.send_message(sink.user, id, &payload);
        match s.recv() {
            Some(Frame::ServerAck(_)) => break,
            Some(Frame::Error(e)) if e.code == ErrorCode::StoreFull as i32 => {
                assert!(Instant::now() < deadline, "space never came back");
                std::thread::sleep(Duration::from_millis(200));
            }
            Some(Frame::Receipt(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
