//! Edge orderings of the socket loop over real sockets: a bad length prefix
//! or the peer's FIN that arrives behind frames the loop has set aside (a
//! backpressured session, a handshake waiting on its account lookup) must
//! not overtake them. The driver reports the frames before a bad prefix or
//! a FIN first; the loop handles and answers them in order, then ends the
//! connection. Likewise a device's new session opens only after its
//! earlier session has handled the Acks it read: what the client
//! acknowledged before reconnecting is not delivered again.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{hello, RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame};

/// A length prefix of 0: invalid (MALFORMED_FRAME), caught by the driver.
const EMPTY_PREFIX: [u8; 4] = [0, 0, 0, 0];
/// A length prefix past any `frame_bytes_max` (FRAME_TOO_LARGE).
const HUGE_PREFIX: [u8; 4] = [0xff, 0xff, 0xff, 0xff];

fn ping(nonce: u64) -> Vec<u8> {
    Frame::Ping(pb::Ping { nonce }).to_bytes().to_vec()
}

/// Reads until the server closes; returns every frame it sent.
fn read_to_close(c: &mut RawClient) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(frame) = c.recv_timeout(Duration::from_secs(10)) {
        frames.push(frame);
        assert!(frames.len() < 64, "the server kept sending: {frames:?}");
    }
    frames
}

fn pong_nonces(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Pong(p) => Some(p.nonce),
            _ => None,
        })
        .collect()
}

fn last_error_code(frames: &[Frame]) -> Option<i32> {
    match frames.last() {
        Some(Frame::Error(e)) => Some(e.code),
        _ => None,
    }
}

#[test]
fn frames_before_a_bad_prefix_are_handled_while_the_session_is_backpressured() {
    let dir = tempfile::tempdir().unwrap();
    // One unanswered Send is the bound: the Send sets the Pings behind it
    // aside until its ServerAck goes out.
    let server = Server::start(dir.path(), |c| c.limits.sends_in_flight_max = 1);
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut c, _) = RawClient::login(server.addr, &alice);
    let mut bytes = Frame::Send(pb::Send {
        client_message_id: 1,
        recipient_user_id: bob.user,
        payload: Bytes::from_static(b"before the bad prefix"),
        device_payloads: vec![],
        ..Default::default()
    })
    .to_bytes()
    .to_vec();
    bytes.extend(ping(11));
    bytes.extend(ping(12));
    bytes.extend(EMPTY_PREFIX);
    // One write: the driver reports the three frames, then the bad prefix.
    c.send_bytes(&bytes).unwrap();
    let frames = read_to_close(&mut c);
    assert_eq!(
        last_error_code(&frames),
        Some(ErrorCode::MalformedFrame as i32),
        "{frames:?}"
    );
    assert_eq!(
        pong_nonces(&frames),
        vec![11, 12],
        "the Pings before the bad prefix were not answered: {frames:?}"
    );
    // The Send before the bad prefix was handled: its message is stored.
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let delivered = b.collect_delivers(1);
    assert_eq!(delivered[0].client_message_id, 1);
    assert_eq!(&delivered[0].payload[..], b"before the bad prefix");
}

#[test]
fn frames_after_hello_are_handled_before_a_bad_prefix_that_arrives_during_the_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    // One account homed on each shard: whichever shard accepts, one of the
    // logins is a local session and one a handoff.
    for shard in 0..shards {
        let account = RawClient::register_on_shard(server.addr, shard, shards);
        for attempt in 0..4 {
            let (prefix, code) = if attempt % 2 == 0 {
                (EMPTY_PREFIX, ErrorCode::MalformedFrame)
            } else {
                (HUGE_PREFIX, ErrorCode::FrameTooLarge)
            };
            let mut c = RawClient::connect(server.addr);
            let mut bytes = hello(&account).to_bytes().to_vec();
            bytes.extend(ping(21));
            bytes.extend(prefix);
            // The Hello starts the credential lookup; the Ping and the bad
            // prefix arrive while it runs.
            c.send_bytes(&bytes).unwrap();
            let frames = read_to_close(&mut c);
            assert!(
                matches!(frames.first(), Some(Frame::Welcome(_))),
                "a good Hello was refused because of a later frame: {frames:?}"
            );
            assert_eq!(pong_nonces(&frames), vec![21], "{frames:?}");
            assert_eq!(last_error_code(&frames), Some(code as i32), "{frames:?}");
        }
    }
}

/// Writes `bytes`, then half-closes (the peer's FIN follows the frames).
fn send_and_half_close(c: &mut RawClient, bytes: &[u8]) {
    c.send_bytes(bytes).unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
}

fn acked_ids(frames: &[Frame]) -> Vec<u64> {
    let mut ids: Vec<u64> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::ServerAck(a) => Some(a.client_message_id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids
}

fn send_bytes_of(id: u64, to: u64) -> Vec<u8> {
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload: Bytes::from(format!("half-closed {id}")),
        device_payloads: vec![],
        ..Default::default()
    })
    .to_bytes()
    .to_vec()
}

/// Logs `to` in and reads `n` messages, acknowledging each.
fn delivered_ids(addr: std::net::SocketAddr, to: &common::Account, n: usize) -> Vec<u64> {
    RawClient::login(addr, to).0.receive_and_ack(n)
}

#[test]
fn frames_pipelined_after_hello_then_a_half_close_are_stored_and_answered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    let bob = RawClient::register(server.addr);
    // One sender homed on each shard: the FIN may reach a handshake on the
    // accepting shard or, after the handoff, the home shard.
    for home in 0..shards {
        let sender = RawClient::register_on_shard(server.addr, home, shards);
        let ids: Vec<u64> = (1..=3).map(|i| home as u64 * 10 + i).collect();
        let mut bytes = hello(&sender).to_bytes().to_vec();
        for &id in &ids {
            bytes.extend_from_slice(&send_bytes_of(id, bob.user));
        }
        bytes.extend_from_slice(&ping(77));
        let mut c = RawClient::connect(server.addr);
        send_and_half_close(&mut c, &bytes);
        let frames = read_to_close(&mut c);
        assert!(
            matches!(frames.first(), Some(Frame::Welcome(_))),
            "{frames:?}"
        );
        assert_eq!(acked_ids(&frames), ids, "every Send answered: {frames:?}");
        assert_eq!(pong_nonces(&frames), vec![77]);
    }
    let mut got = delivered_ids(server.addr, &bob, 3 * shards as usize);
    got.sort_unstable();
    let mut want: Vec<u64> = (0..shards as u64)
        .flat_map(|h| (1..=3).map(move |i| h * 10 + i))
        .collect();
    want.sort_unstable();
    assert_eq!(got, want);
}

#[test]
fn a_backpressured_session_that_half_closes_still_stores_every_send() {
    let dir = tempfile::tempdir().unwrap();
    // One unanswered Send at a time: the rest wait, set aside, behind it.
    let server = Server::start(dir.path(), |c| c.limits.sends_in_flight_max = 1);
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let mut bytes = Vec::new();
    for id in 1..=5 {
        bytes.extend_from_slice(&send_bytes_of(id, bob.user));
    }
    send_and_half_close(&mut a, &bytes);
    let frames = read_to_close(&mut a);
    assert_eq!(acked_ids(&frames), vec![1, 2, 3, 4, 5], "{frames:?}");
    assert_eq!(delivered_ids(server.addr, &bob, 5), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_silent_half_closed_handshake_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let mut c = RawClient::connect(server.addr);
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let started = std::time::Instant::now();
    assert!(read_to_close(&mut c).is_empty());
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "closed at once, not at the handshake timeout"
    );
}

/// Acknowledges each message as it arrives, closes, and reconnects at once,
/// round after round, with the device homed on each shard (so the new
/// connection is often handed over while the old socket's last Acks are
/// still unread): the new session never delivers an acknowledged message.
#[test]
fn acks_sent_just_before_a_reconnect_count_before_the_new_session_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bobs = [
        RawClient::register_on_shard(server.addr, 0, server.shards()),
        RawClient::register_on_shard(server.addr, 1, server.shards()),
    ];
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let mut id = 0;
    for round in 0..60u64 {
        let bob = &bobs[round as usize % 2];
        for _ in 0..4 {
            id += 1;
            a.send_message(bob.user, id, b"m");
        }
        a.collect_acks(4);
        let (mut b, _) = RawClient::login(server.addr, bob);
        b.receive_and_ack(4);
        drop(b);
        let (mut b, _) = RawClient::login(server.addr, bob);
        b.send(&Frame::Ping(pb::Ping { nonce: round }));
        match b.recv() {
            Some(Frame::Pong(p)) => assert_eq!(p.nonce, round),
            other => panic!("round {round}: expected only a Pong, got {other:?}"),
        }
    }
}

/// A device's old connection is stuck (its peer reads nothing, so the
/// server's output for it is past every bound and the frames it sends are
/// set aside, its reading paused) when the client, having acknowledged the
/// first messages over it, connects again: the new session starts after
/// what was acknowledged.
#[test]
fn acks_a_stuck_session_set_aside_count_when_the_device_connects_again() {
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 128;
    let (server, bob) = common::backlog_of_large_messages(dir.path(), N);
    // The first connection never reads. Its session is sent messages until
    // the kernel's socket buffers and the server's bounds are full (7.7 MB
    // are due, more than loopback takes). The Pong of a Ping then finds the
    // socket full, and the Ack behind it is set aside.
    let (mut stuck, _) = RawClient::login(server.addr, &bob);
    std::thread::sleep(Duration::from_millis(500));
    stuck.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    std::thread::sleep(Duration::from_millis(100));
    stuck.ack(5);
    std::thread::sleep(Duration::from_millis(300));
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let first = b.collect_delivers(1).remove(0);
    assert_eq!(first.sequence, 6, "acknowledged messages delivered again");
    // The stuck connection is closed (it was replaced).
    let mut frames = 0;
    while stuck.recv_timeout(Duration::from_secs(10)).is_some() {
        frames += 1;
        assert!(frames <= N + 8, "the stuck connection was not closed");
    }
}
