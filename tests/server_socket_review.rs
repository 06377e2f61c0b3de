//! Edge orderings of the socket loop over real sockets: a bad length prefix
//! that arrives behind frames the loop has set aside (a backpressured
//! session, a handshake waiting on its account lookup) must not overtake
//! them. The driver reports the frames before a bad prefix first; the loop
//! handles them in order before it answers the bad prefix.

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
