//! The admin endpoint of the real server: health, readiness, and counters
//! that move exactly as the traffic says they must.

mod common;

use common::{admin_get, metric_sum, RawClient, Server};
use switchboard::proto::{pb, Frame};

#[test]
fn counters_follow_the_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    assert_eq!(admin_get(server.admin, "/healthz").0, 200);
    assert_eq!(admin_get(server.admin, "/readyz").0, 200);
    let (status, before) = admin_get(server.admin, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_sum(&before, "switchboard_shard_recovered", ""), 2.0);
    assert_eq!(
        metric_sum(&before, "switchboard_messages_accepted_total", ""),
        0.0
    );

    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    const N: u64 = 4; // the test window
    for id in 1..=N {
        a.send_message(bob.user, id, b"counted");
    }
    a.collect_acks(N as usize);
    let delivered = b.collect_delivers(N as usize);
    b.ack(delivered.last().unwrap().sequence);
    // The receipt (one for the whole Ack) reaches Alice.
    match a.recv() {
        Some(Frame::Receipt(r)) => assert_eq!(r.client_message_ids.len() as u64, N),
        other => panic!("expected a receipt, got {other:?}"),
    }
    a.send_message(999_999, 99, b"nobody");
    a.expect_error(switchboard::proto::ErrorCode::UnknownRecipient);
    a.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    assert!(matches!(a.recv(), Some(Frame::Pong(_))));

    let (_, after) = admin_get(server.admin, "/metrics");
    let sum = |name: &str, filter: &str| metric_sum(&after, name, filter);
    assert_eq!(sum("switchboard_messages_accepted_total", ""), N as f64);
    assert_eq!(sum("switchboard_messages_delivered_total", ""), N as f64);
    assert_eq!(sum("switchboard_messages_acked_total", ""), N as f64);
    assert_eq!(sum("switchboard_receipts_sent_total", ""), 1.0);
    assert_eq!(sum("switchboard_connections", ""), 2.0);
    assert_eq!(
        sum("switchboard_frames_in_total", "type=\"send\""),
        (N + 1) as f64
    );
    assert_eq!(
        sum("switchboard_frames_out_total", "type=\"server_ack\""),
        N as f64
    );
    assert_eq!(
        sum("switchboard_frames_out_total", "type=\"deliver\""),
        N as f64
    );
    assert!(sum("switchboard_refusals_total", "unknown_recipient") >= 1.0);
    assert!(sum("switchboard_commit_latency_microseconds_count", "") >= 1.0);
    assert!(sum("switchboard_registrations_total", "") >= 2.0);
    // Bob was accepted on either shard and lives on shard 1: one of the two
    // logins may have moved.
    assert_eq!(
        sum("switchboard_handoffs_in_total", ""),
        sum("switchboard_handoffs_out_total", "")
    );
    // The socket rings' counters are copied every 100 ms.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (_, later) = admin_get(server.admin, "/metrics");
    let ring = |name: &str| metric_sum(&later, name, "");
    assert!(ring("switchboard_socket_ring_enters_total") > 0.0);
    assert!(ring("switchboard_socket_ring_completions_total") > N as f64);
    assert_eq!(ring("switchboard_socket_ring_stale_completions_total"), 0.0);
    // Every poll of the shards' tasks is timed: the socket loops, the
    // commit loops and the maintenance ticks have all run.
    assert!(ring("switchboard_shard_task_poll_microseconds_count") > N as f64);
    for task in ["sockets", "commit", "maintenance"] {
        let filter = format!("task=\"{task}\"");
        let longest = metric_sum(&later, "switchboard_shard_task_poll_max_seconds", &filter);
        assert!(longest > 0.0, "no poll of {task} was timed");
        assert!(longest < 60.0, "{task}: a poll of {longest} s");
    }
    drop(b);
    drop(a);
}

/// The inbox depth gauge counts a backlog for an offline device, while
/// running and after a kill -9 and restart, and falls as it is delivered.
#[test]
fn inbox_depth_counts_a_backlog_across_a_restart() {
    const BACKLOG: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register_on_shard(server.addr, 0, server.shards());
    let bob = RawClient::register_on_shard(server.addr, 1, server.shards());
    let (mut a, _) = RawClient::login(server.addr, &alice);
    // Sends in flight are bounded (8 in tests): send in steps, each acked.
    for first in (1..=BACKLOG).step_by(8) {
        let last = (first + 7).min(BACKLOG);
        for id in first..=last {
            a.send_message(bob.user, id, b"queued for bob");
        }
        a.collect_acks((last - first + 1) as usize);
    }
    drop(a);
    let depth_of = |server: &Server, shard: u32| {
        let (_, text) = admin_get(server.admin, "/metrics");
        metric_sum(
            &text,
            "switchboard_inbox_depth",
            &format!("shard=\"{shard}\""),
        )
    };
    let settle = |server: &Server, shard: u32, want: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let depth = depth_of(server, shard);
            if depth == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "shard {shard}: inbox depth {depth}, expected {want}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    settle(&server, 1, BACKLOG as f64);
    server.kill9();
    server.launch();
    settle(&server, 1, BACKLOG as f64);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    assert_eq!(b.receive_and_ack(BACKLOG as usize).len() as u64, BACKLOG);
    settle(&server, 1, 0.0);
}
