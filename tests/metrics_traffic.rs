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
    drop(b);
    drop(a);
}
