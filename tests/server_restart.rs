//! Restarts of the real server: graceful (SIGTERM) and crash (SIGKILL). Every
//! message that got a ServerAck must be delivered afterwards.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{RawClient, Server};
use switchboard::proto::{pb, Frame};

#[test]
fn graceful_restart_keeps_pending_messages_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    for id in 1..=40 {
        a.send_message(bob.user, id, format!("p{id}").as_bytes());
        if id % 8 == 0 {
            a.collect_acks(8);
        }
    }
    let status = server.terminate();
    // The live session was told to go away before the close.
    match a.recv() {
        Some(Frame::GoAway(g)) => assert_eq!(
            g.reason,
            switchboard::proto::GoAwayReason::ShuttingDown as i32
        ),
        other => panic!("expected GoAway, got {other:?}"),
    }
    assert_eq!(status, Some(0), "clean exit on SIGTERM");
    server.launch();
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let mut ids = Vec::new();
    while ids.len() < 40 {
        let d = b.collect_delivers(1).remove(0);
        ids.push(d.client_message_id);
        b.ack(d.sequence);
    }
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());
}

/// Sends until killed; returns the ids that got a ServerAck.
fn send_until_killed(addr: std::net::SocketAddr, from: &common::Account, to: u64) -> BTreeSet<u64> {
    let mut acked = BTreeSet::new();
    let (mut c, _) = RawClient::login(addr, from);
    let mut id = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    'outer: while Instant::now() < deadline && id < 5_000 {
        for _ in 0..8 {
            id += 1;
            if c.send_bytes(
                &Frame::Send(pb::Send {
                    client_message_id: id,
                    recipient_user_id: to,
                    payload: bytes::Bytes::from(format!("k{id}")),
                    device_payloads: vec![],
                })
                .to_bytes(),
            )
            .is_err()
            {
                break 'outer;
            }
        }
        let mut got = 0;
        while got < 8 {
            match c.recv_timeout(Duration::from_secs(10)) {
                Some(Frame::ServerAck(a)) => {
                    acked.insert(a.client_message_id);
                    got += 1;
                }
                Some(_) => {}
                None => break 'outer,
            }
        }
    }
    acked
}

fn crash_round(durability: switchboard::config::Durability) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| c.store.durability = durability);
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let addr = server.addr;
    let sender = {
        let alice = alice.clone();
        std::thread::spawn(move || send_until_killed(addr, &alice, bob.user))
    };
    std::thread::sleep(Duration::from_millis(700));
    server.kill9();
    let acked = sender.join().unwrap();
    assert!(
        !acked.is_empty(),
        "some messages were acknowledged before the kill"
    );
    server.launch();
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let mut delivered = BTreeSet::new();
    let mut last_seq = 0;
    // Everything acknowledged must come; more may (stored, ack lost).
    while !acked.is_subset(&delivered) {
        let d = b.collect_delivers(1).remove(0);
        assert!(d.sequence > last_seq, "in order");
        last_seq = d.sequence;
        assert!(delivered.insert(d.client_message_id), "no duplicate ids");
        assert_eq!(
            &d.payload[..],
            format!("k{}", d.client_message_id).as_bytes()
        );
        b.ack(d.sequence);
    }
}

#[test]
fn crash_restart_delivers_every_acknowledged_message_fsync() {
    crash_round(switchboard::config::Durability::Fsync);
}

#[test]
fn crash_restart_delivers_every_acknowledged_message_os() {
    crash_round(switchboard::config::Durability::Os);
}
