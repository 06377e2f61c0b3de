//! `server.socket_wait_in_ring`: the socket loop sleeps in its own ring while
//! traffic lasts. Over real sockets against the real binary (two shards):
//! messages across shards and on one shard, their ✓ and ✓✓, with `os` and
//! `fsync` durability, and with batched waits (`socket_wait_batch_us`); a
//! session left idle still gets the server's idle timeout; a kill -9 loses
//! no acknowledged message; the setting's refusal without a poll interval
//! (the batched wait's refusals are config unit tests).

mod common;

use std::time::Duration;

use common::{RawClient, Server};
use switchboard::config::Durability;
use switchboard::proto::{pb, ErrorCode, Frame, ReceiptKind};

const MESSAGES: u64 = 60;

/// Alice (shard 0) and Carol (shard 1) each send `MESSAGES` to Bob (shard
/// 1): every Send acked, every message delivered in order per sender, and
/// every sender gets a delivered receipt for each.
fn exchange(server: &Server) {
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let carol = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let (mut c, _) = RawClient::login(server.addr, &carol);
    // In rounds that keep each sender within its Sends in flight.
    let round = u64::from(server.config.limits.sends_in_flight_max);
    let mut acked = [Vec::new(), Vec::new()];
    for first in (1..=MESSAGES).step_by(round as usize) {
        let last = (first + round - 1).min(MESSAGES);
        for id in first..=last {
            a.send_message(bob.user, id, format!("a{id}").as_bytes());
            c.send_message(bob.user, id, format!("c{id}").as_bytes());
        }
        for (sender, acked) in [&mut a, &mut c].into_iter().zip(acked.iter_mut()) {
            let (acks, others) = sender.collect_acks((last - first + 1) as usize);
            assert!(others.is_empty(), "{others:?}");
            acked.extend(acks.iter().map(|a| a.client_message_id));
        }
    }
    // ServerAcks are not promised in Send order (docs/protocol.md §4.4).
    for ids in &mut acked {
        ids.sort_unstable();
        assert_eq!(ids, &(1..=MESSAGES).collect::<Vec<_>>());
    }
    let mut from_alice = Vec::new();
    let mut from_carol = Vec::new();
    while from_alice.len() + from_carol.len() < 2 * MESSAGES as usize {
        let d = b.collect_delivers(1).remove(0);
        if d.sender_user_id == alice.user {
            from_alice.push(d.client_message_id);
        } else {
            assert_eq!(d.sender_user_id, carol.user);
            from_carol.push(d.client_message_id);
        }
        b.ack(d.sequence);
    }
    let expected: Vec<u64> = (1..=MESSAGES).collect();
    assert_eq!(from_alice, expected, "in order, from across shards");
    assert_eq!(from_carol, expected, "in order, from the same shard");
    for sender in [&mut a, &mut c] {
        let mut receipted = Vec::new();
        while receipted.len() < MESSAGES as usize {
            match sender.recv() {
                Some(Frame::Receipt(r)) => {
                    assert_eq!(r.kind, ReceiptKind::Delivered as i32);
                    receipted.extend(r.client_message_ids);
                    sender.ack(r.sequence);
                }
                Some(Frame::ServerAck(_)) => {}
                other => panic!("expected delivered receipts, got {other:?}"),
            }
        }
        receipted.sort_unstable();
        assert_eq!(receipted, expected);
    }
}

#[test]
fn messages_and_receipts_flow_with_os_durability() {
    exchange_on_a_server(Durability::Os, 0);
}

#[test]
fn messages_and_receipts_flow_with_fsync_durability() {
    exchange_on_a_server(Durability::Fsync, 0);
}

#[test]
fn messages_and_receipts_flow_with_batched_waits() {
    // Each wait in the ring gathers completions for up to 200 µs (kernel
    // 6.12+; older kernels wake at the first one, which this also passes).
    exchange_on_a_server(Durability::Os, 200);
}

/// `exchange` on a fresh server that waits in the ring (`batch_us`: the
/// batched wait, 0 for none).
fn exchange_on_a_server(durability: Durability, batch_us: u32) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.socket_wait_in_ring = true;
        c.server.socket_wait_batch_us = batch_us;
        c.store.durability = durability;
    });
    exchange(&server);
    // With `fsync` the log's fdatasyncs went through the socket ring, so
    // the wait there saw them complete; with `os` there are none.
    match durability {
        Durability::Fsync => wait_for_ring_syncs(&server),
        Durability::Os => {
            std::thread::sleep(Duration::from_millis(1_500));
            assert_eq!(ring_syncs(&server), 0.0);
        }
    }
}

/// fdatasyncs through the socket ring, as the admin endpoint reports them.
fn ring_syncs(server: &Server) -> f64 {
    let (_, text) = common::admin_get(server.admin, "/metrics");
    common::metric_sum(&text, "switchboard_socket_ring_syncs_total", "")
}

/// Waits (5 s at most) for the metrics, published once a maintenance tick,
/// to count an fdatasync through the socket ring.
fn wait_for_ring_syncs(server: &Server) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ring_syncs(server) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no fdatasync went through the socket ring"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_idle_session_still_times_out_with_batched_waits() {
    idle_session_times_out(200);
}

#[test]
fn an_idle_session_still_times_out() {
    idle_session_times_out(0);
}

/// A session answered once, then silent: the server's idle timeout still
/// fires while the loop sleeps in the ring (`batch_us`: the batched wait).
fn idle_session_times_out(batch_us: u32) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.socket_wait_in_ring = true;
        c.server.socket_wait_batch_us = batch_us;
    });
    let alice = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    assert!(matches!(
        a.recv_timeout(Duration::from_secs(5)),
        Some(Frame::Pong(_))
    ));
    // Silent past the idle timeout (3 s in tests), within a bound.
    let error = a.expect_error(ErrorCode::IdleTimeout);
    assert!(error.fatal);
}

#[test]
fn a_kill_9_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| {
        c.server.socket_wait_in_ring = true;
    });
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let round = u64::from(server.config.limits.sends_in_flight_max);
    for first in (1..=MESSAGES).step_by(round as usize) {
        let last = (first + round - 1).min(MESSAGES);
        for id in first..=last {
            a.send_message(bob.user, id, b"kept");
        }
        let (acks, others) = a.collect_acks((last - first + 1) as usize);
        assert!(others.is_empty(), "{others:?}");
        let mut ids: Vec<u64> = acks.iter().map(|a| a.client_message_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (first..=last).collect::<Vec<_>>());
    }
    // Acknowledged after fdatasyncs through the socket ring (`fsync` is the
    // tests' durability).
    wait_for_ring_syncs(&server);
    server.kill9();
    server.launch();
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let ids = b.receive_and_ack(MESSAGES as usize);
    assert_eq!(ids, (1..=MESSAGES).collect::<Vec<_>>());
}

#[test]
fn the_wait_needs_a_poll_interval() {
    let mut config = switchboard::config::Config::default();
    config.server.socket_wait_in_ring = true;
    config.server.socket_poll_interval_us = 0;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("socket_wait_in_ring"), "{error}");
}
