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
                    ..Default::default()
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

/// Acknowledges every delivery until the connection ends; returns the
/// client message ids acknowledged.
fn ack_until_killed(addr: std::net::SocketAddr, to: &common::Account) -> BTreeSet<u64> {
    let mut acked = BTreeSet::new();
    let Ok((mut c, _)) = std::panic::catch_unwind(|| RawClient::login(addr, to)) else {
        return acked;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.recv_timeout(Duration::from_secs(10))
        }));
        match frame {
            Ok(Some(Frame::Deliver(d))) => {
                if c.send_bytes(
                    &Frame::Ack(pb::Ack {
                        up_to_sequence: d.sequence,
                        sequences: vec![],
                    })
                    .to_bytes(),
                )
                .is_err()
                {
                    break;
                }
                acked.insert(d.client_message_id);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    acked
}

/// Delivered receipts cross shards: the recipient's home shard records the
/// Ack, the sender's stores the receipt. The server is killed while the
/// recipient acknowledges a backlog, so some receipts are between the two;
/// after the restart the sender still gets a delivered receipt for every
/// message (some may come twice).
#[test]
fn delivered_receipts_across_shards_survive_a_crash() {
    let rounds: u64 = std::env::var("SWITCHBOARD_RECEIPT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    receipts_across_a_restart(rounds, false);
}

/// The same with SIGTERM: the shards drain together, so every relayed
/// receipt is stored before the exit and none is sent again at the start.
#[test]
fn a_graceful_stop_settles_relayed_receipts_before_it_exits() {
    receipts_across_a_restart(2, true);
}

fn receipts_across_a_restart(rounds: u64, graceful: bool) {
    const M: u64 = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| {
        c.limits.delivery_window_messages = 64;
        c.limits.delivery_window_bytes = 64 << 10;
        // The sender only listens while receipts come.
        c.limits.idle_timeout_ms = 30_000;
    });
    let shards = server.shards();
    assert!(shards >= 2, "receipts must cross shards");
    for round in 0..rounds {
        let alice = RawClient::register_on_shard(server.addr, 0, shards);
        let bob = RawClient::register_on_shard(server.addr, 1, shards);
        {
            let (mut a, _) = RawClient::login(server.addr, &alice);
            for id in 1..=M {
                a.send_message(bob.user, id, b"r");
                if id % 8 == 0 {
                    a.collect_acks(8);
                }
            }
        }
        let addr = server.addr;
        let acker = {
            let bob = bob.clone();
            std::thread::spawn(move || ack_until_killed(addr, &bob))
        };
        std::thread::sleep(Duration::from_millis(20 + 30 * round));
        if graceful {
            assert_eq!(server.terminate(), Some(0), "clean exit on SIGTERM");
        } else {
            server.kill9();
        }
        let acked_before = acker.join().unwrap();
        server.launch();
        // The recipient takes what is left (what it acked may come again).
        let (mut b, _) = RawClient::login(server.addr, &bob);
        let mut delivered = acked_before.clone();
        while delivered.len() < M as usize {
            let d = b.collect_delivers(1).remove(0);
            delivered.insert(d.client_message_id);
            b.ack(d.sequence);
        }
        drop(b);
        // The sender gets a delivered receipt for each of its messages.
        let (mut a, _) = RawClient::login(server.addr, &alice);
        let mut receipted = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while receipted.len() < M as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "round {round}: {} of {M} messages never got a delivered receipt \
                 (acknowledged before the kill: {}): {:?}",
                M as usize - receipted.len(),
                acked_before.len(),
                (1..=M)
                    .filter(|i| !receipted.contains(i))
                    .take(20)
                    .collect::<Vec<_>>()
            );
            let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                a.recv_timeout(left.max(Duration::from_millis(1)))
            }));
            let Ok(frame) = frame else {
                // Timed out: the assertion above reports it.
                continue;
            };
            match frame {
                Some(Frame::Receipt(r)) => {
                    assert_eq!(r.kind, pb::ReceiptKind::Delivered as i32);
                    receipted.extend(r.client_message_ids.iter().copied());
                    a.ack(r.sequence);
                }
                Some(Frame::Deliver(d)) => panic!("round {round}: the sender got {d:?}"),
                Some(other) => panic!("round {round}: the sender got {other:?}"),
                None => panic!(
                    "round {round}: the sender's session closed with {} of {M} receipts",
                    receipted.len()
                ),
            }
        }
        let (_, metrics) = common::admin_get(server.admin, "/metrics");
        let relayed_again =
            common::metric_sum(&metrics, "switchboard_receipts_relayed_again_total", "");
        if graceful {
            assert_eq!(
                relayed_again, 0.0,
                "round {round}: a graceful stop left receipts to relay"
            );
        }
        eprintln!(
            "round {round}: {} acknowledged before the kill, {relayed_again} receipts \
             relayed again at the restart, every receipt arrived",
            acked_before.len()
        );
    }
}
