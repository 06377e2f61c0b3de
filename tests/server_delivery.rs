//! Store-and-forward over real sockets against the real binary: the ✓ / ✓✓ /
//! read chain across shards, offline queues, dedupe of retried Sends.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{RawClient, Server};
use switchboard::proto::{pb, Frame, ReceiptKind};

#[test]
fn chain_across_shards_gives_ack_delivery_delivered_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, welcome) = RawClient::login(server.addr, &alice);
    assert_eq!(welcome.protocol_version, 1);
    assert_eq!(
        welcome.delivery_window,
        server.config.limits.delivery_window_messages
    );
    let (mut b, _) = RawClient::login(server.addr, &bob);

    a.send_message(bob.user, 77, b"sealed-box");
    let (acks, _) = a.collect_acks(1);
    assert_eq!(acks[0].client_message_id, 77);
    assert_eq!(acks[0].server_sequence, 1);
    assert!(acks[0].timestamp_ms > 0);

    let deliveries = b.collect_delivers(1);
    let d = &deliveries[0];
    assert_eq!(d.sequence, 1);
    assert_eq!(d.sender_user_id, alice.user);
    assert_eq!(d.sender_device_id, alice.device);
    assert_eq!(d.client_message_id, 77);
    assert_eq!(&d.payload[..], b"sealed-box");
    assert_eq!(d.timestamp_ms, acks[0].timestamp_ms);

    b.ack(d.sequence);
    let delivered = match a.recv() {
        Some(Frame::Receipt(r)) => r,
        other => panic!("expected a delivered receipt, got {other:?}"),
    };
    assert_eq!(delivered.kind, ReceiptKind::Delivered as i32);
    assert_eq!(delivered.by_user_id, bob.user);
    assert_eq!(delivered.client_message_ids, vec![77]);
    a.ack(delivered.sequence);

    b.send(&Frame::ReadReceipt(pb::ReadReceipt {
        sender_user_id: alice.user,
        sender_device_id: alice.device,
        client_message_ids: vec![77],
    }));
    let read = match a.recv() {
        Some(Frame::Receipt(r)) => r,
        other => panic!("expected a read receipt, got {other:?}"),
    };
    assert_eq!(read.kind, ReceiptKind::Read as i32);
    assert_eq!(read.client_message_ids, vec![77]);
    assert!(read.sequence > delivered.sequence);
}

#[test]
fn offline_recipient_gets_a_thousand_in_order_and_none_twice_after_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    const N: u64 = 1_000;
    let mut acked = 0;
    // Sends in bursts below the in-flight bound.
    for id in 1..=N {
        a.send_message(bob.user, id, format!("m{id}").as_bytes());
        if id % 8 == 0 {
            acked += a.collect_acks(8).0.len();
        }
    }
    assert_eq!(acked as u64, N);

    let (mut b, _) = RawClient::login(server.addr, &bob);
    let mut next = 1u64;
    while next <= N {
        let d = b.collect_delivers(1).remove(0);
        assert_eq!(d.sequence, next, "in sequence order");
        assert_eq!(d.client_message_id, next);
        assert_eq!(&d.payload[..], format!("m{next}").as_bytes());
        b.ack(d.sequence);
        next += 1;
    }
    drop(b);
    // Reconnect: nothing is delivered again.
    let (mut b, _) = RawClient::login(server.addr, &bob);
    b.send(&Frame::Ping(pb::Ping { nonce: 5 }));
    match b.recv() {
        Some(Frame::Pong(p)) => assert_eq!(p.nonce, 5),
        other => panic!("expected only a Pong, got {other:?}"),
    }
}

#[test]
fn unacked_messages_are_redelivered_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    for id in 1..=3 {
        a.send_message(bob.user, id, b"x");
    }
    a.collect_acks(3);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let first = b.collect_delivers(3);
    b.ack(first[0].sequence);
    // Let the ack land before the session ends.
    b.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    while !matches!(b.recv(), Some(Frame::Pong(_))) {}
    drop(b);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let again = b.collect_delivers(2);
    let seqs: Vec<u64> = again.iter().map(|d| d.sequence).collect();
    assert_eq!(seqs, vec![2, 3]);
}

#[test]
fn retried_send_with_same_id_is_acked_again_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send_message(bob.user, 42, b"once");
    let first = a.collect_acks(1).0.remove(0);
    drop(a);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send_message(bob.user, 42, b"once");
    let second = a.collect_acks(1).0.remove(0);
    assert_eq!(first, second, "the retry gets the original ServerAck");
    a.send_message(bob.user, 43, b"next");
    assert_eq!(a.collect_acks(1).0[0].server_sequence, 2);

    let (mut b, _) = RawClient::login(server.addr, &bob);
    let got = b.collect_delivers(2);
    let ids: HashSet<u64> = got.iter().map(|d| d.client_message_id).collect();
    assert_eq!(ids, HashSet::from([42, 43]));
    b.send(&Frame::Ping(pb::Ping { nonce: 9 }));
    match b.recv_timeout(Duration::from_secs(5)) {
        Some(Frame::Pong(_)) => {}
        other => panic!("a duplicate was delivered: {other:?}"),
    }
}

#[test]
fn newer_session_of_a_device_replaces_the_older_with_go_away() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let (mut first, _) = RawClient::login(server.addr, &alice);
    let (_second, _) = RawClient::login(server.addr, &alice);
    match first.recv() {
        Some(Frame::GoAway(g)) => {
            assert_eq!(g.reason, switchboard::proto::GoAwayReason::Replaced as i32)
        }
        other => panic!("expected GoAway, got {other:?}"),
    }
    first.expect_closed();
}

#[test]
fn connections_accepted_by_another_shard_are_handed_to_the_home_shard() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    // SO_REUSEPORT spreads connections by hash: log Bob in until one of his
    // connections was accepted by shard 0 and moved; each works, and Hello
    // bytes pipelined behind the Hello (a Ping) move with the socket.
    let mut moved = false;
    for attempt in 0..32u64 {
        let mut b = RawClient::connect(server.addr);
        let mut pipelined = common::hello(&bob).to_bytes().to_vec();
        pipelined.extend_from_slice(&Frame::Ping(pb::Ping { nonce: attempt }).to_bytes());
        b.send_bytes(&pipelined).unwrap();
        assert!(matches!(b.recv(), Some(Frame::Welcome(_))));
        match b.recv() {
            Some(Frame::Pong(p)) => assert_eq!(p.nonce, attempt),
            other => panic!("expected the pipelined Ping's Pong, got {other:?}"),
        }
        a.send_message(bob.user, attempt + 1, b"to whichever connection");
        a.collect_acks(1);
        let d = b.collect_delivers(1).remove(0);
        assert_eq!(d.client_message_id, attempt + 1);
        b.ack(d.sequence);
        let (_, metrics) = common::admin_get(server.admin, "/metrics");
        if common::metric_sum(&metrics, "switchboard_handoffs_in_total", "shard=\"1\"") > 0.0 {
            moved = true;
            break;
        }
    }
    assert!(moved, "no connection was accepted by shard 0 in 32 tries");
}

#[test]
fn acks_beyond_what_was_delivered_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    for id in 1..=8 {
        a.send_message(bob.user, id, b"queued");
    }
    a.collect_acks(8);
    // Bob's window is 4: he is sent 1..=4 and tries to ack everything.
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let first = b.collect_delivers(4);
    assert_eq!(first.last().unwrap().sequence, 4);
    b.send(&Frame::Ack(pb::Ack {
        up_to_sequence: 1_000,
        sequences: vec![7, 8],
    }));
    // 5..=8 were never sent, so they still arrive.
    let rest = b.collect_delivers(4);
    let seqs: Vec<u64> = rest.iter().map(|d| d.sequence).collect();
    assert_eq!(seqs, vec![5, 6, 7, 8]);
}
