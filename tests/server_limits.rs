//! Bad input and limits over real sockets: each gets its documented error
//! code, and the server keeps serving everyone else.

mod common;

use std::time::{Duration, Instant};

use common::{hello, RawClient, Server};
use switchboard::config::RegistrationPolicy;
use switchboard::proto::{pb, ErrorCode, Frame, PROTOCOL_VERSION};

/// The server still serves: a fresh account can message itself.
fn assert_healthy(server: &Server) {
    let account = RawClient::register(server.addr);
    let (mut c, _) = RawClient::login(server.addr, &account);
    c.send_message(account.user, 1, b"self");
    c.collect_acks(1);
}

#[test]
fn handshake_timeout_closes_silent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let mut c = RawClient::connect(server.addr);
    let started = Instant::now();
    c.expect_error(ErrorCode::HandshakeTimeout);
    c.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_healthy(&server);
}

#[test]
fn idle_session_is_closed_and_ping_keeps_it_alive() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let (mut pinger, _) = RawClient::login(server.addr, &account);
    let other = RawClient::register(server.addr);
    let (mut silent, welcome) = RawClient::login(server.addr, &other);
    assert_eq!(welcome.idle_timeout_ms, 3_000);
    // The pinger pings every second for 6 s; the silent one says nothing.
    for nonce in 0..6 {
        pinger.send(&Frame::Ping(pb::Ping { nonce }));
        match pinger.recv() {
            Some(Frame::Pong(p)) => assert_eq!(p.nonce, nonce),
            other => panic!("pinger lost its session: {other:?}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    silent.expect_error(ErrorCode::IdleTimeout);
    silent.expect_closed();
}

#[test]
fn oversized_frame_is_refused_before_its_body_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let (mut c, welcome) = RawClient::login(server.addr, &account);
    // Only the length prefix: the server must not wait for 16 MiB.
    let length = welcome.max_frame_bytes + 1;
    c.send_bytes(&length.to_be_bytes()).unwrap();
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    // Before Hello too.
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(&u32::MAX.to_be_bytes()).unwrap();
    c.expect_error(ErrorCode::FrameTooLarge);
    c.expect_closed();
    assert_healthy(&server);
}

#[test]
fn malformed_protobuf_and_unknown_type_are_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let (mut c, _) = RawClient::login(server.addr, &account);
    // A Send whose body is a truncated varint.
    c.send_bytes(&[0, 0, 0, 3, 0x10, 0x08, 0xff]).unwrap();
    c.expect_error(ErrorCode::MalformedFrame);
    c.expect_closed();
    let (mut c, _) = RawClient::login(server.addr, &account);
    c.send_bytes(&[0, 0, 0, 1, 0x7f]).unwrap();
    c.expect_error(ErrorCode::UnknownFrameType);
    c.expect_closed();
    // A server-to-client frame from a client.
    let (mut c, _) = RawClient::login(server.addr, &account);
    c.send(&Frame::Deliver(pb::Deliver::default()));
    c.expect_error(ErrorCode::UnexpectedFrame);
    c.expect_closed();
    assert_healthy(&server);
}

#[test]
fn frames_before_hello_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let mut c = RawClient::connect(server.addr);
    c.send_message(1, 1, b"sneaky");
    c.expect_error(ErrorCode::NotAuthenticated);
    c.expect_closed();
    assert_healthy(&server);
}

#[test]
fn version_zero_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let mut c = RawClient::connect(server.addr);
    let mut frame = hello(&account);
    if let Frame::Hello(h) = &mut frame {
        h.protocol_version = 0;
    }
    c.send(&frame);
    c.expect_error(ErrorCode::UnsupportedVersion);
    c.expect_closed();
}

#[test]
fn wrong_secret_fails_and_repeated_failures_are_slowed_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let mut wrong = account.clone();
    wrong.secret = bytes::Bytes::from(vec![0u8; 32]);
    let mut limited = false;
    for _ in 0..6 {
        let mut c = RawClient::connect(server.addr);
        c.send(&hello(&wrong));
        match c.recv() {
            Some(Frame::Error(e)) if e.code == ErrorCode::AuthFailed as i32 => {}
            Some(Frame::Error(e)) if e.code == ErrorCode::RateLimited as i32 => {
                assert!(e.retry_after_ms > 0);
                limited = true;
            }
            other => panic!("expected AUTH_FAILED or RATE_LIMITED, got {other:?}"),
        }
        c.expect_closed();
    }
    assert!(
        limited,
        "repeated failures from one address were rate limited"
    );
}

#[test]
fn send_to_unknown_user_oversized_payload_and_relay_device_get_non_fatal_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let (mut c, welcome) = RawClient::login(server.addr, &account);
    c.send_message(999_999, 5, b"nobody");
    let e = c.expect_error(ErrorCode::UnknownRecipient);
    assert_eq!(e.client_message_id, 5);
    assert!(!e.fatal);
    let big = vec![7u8; welcome.max_payload_bytes as usize + 1];
    c.send_message(account.user, 6, &big);
    let e = c.expect_error(ErrorCode::PayloadTooLarge);
    assert_eq!(e.client_message_id, 6);
    c.send(&Frame::Send(pb::Send {
        client_message_id: 7,
        recipient_user_id: account.user,
        payload: bytes::Bytes::from_static(b"and per device"),
        device_payloads: vec![pb::DevicePayload::default()],
        ..Default::default()
    }));
    c.expect_error(ErrorCode::UnsupportedFeature);
    // Device 0 is no device: stale. (To its own account the sending device,
    // here the primary, is not required, so nothing is missing.)
    c.send(&Frame::Send(pb::Send {
        client_message_id: 8,
        recipient_user_id: account.user,
        payload: bytes::Bytes::new(),
        device_payloads: vec![pb::DevicePayload::default()],
        ..Default::default()
    }));
    let e = c.expect_error(ErrorCode::DeviceMismatch);
    assert_eq!((e.missing_devices, e.stale_devices), (vec![], vec![0]));
    // A read receipt for a device id no device can have (relay inboxes use
    // the top bit) is refused like one for an unknown user.
    c.send(&Frame::ReadReceipt(pb::ReadReceipt {
        sender_user_id: account.user,
        sender_device_id: 1 << 31 | 1,
        client_message_ids: vec![1],
    }));
    let e = c.expect_error(ErrorCode::UnknownRecipient);
    assert!(!e.fatal);
    // The session goes on.
    c.send_message(account.user, 8, b"fine");
    assert_eq!(c.collect_acks(1).0[0].client_message_id, 8);
}

#[test]
fn client_that_never_reads_is_bounded_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let sink = RawClient::register(server.addr);
    let sender = RawClient::register(server.addr);
    // The sink logs in and never reads again; its kernel buffers fill.
    let (_sink_conn, _) = RawClient::login(server.addr, &sink);
    let (mut s, welcome) = RawClient::login(server.addr, &sender);
    let payload = vec![1u8; welcome.max_payload_bytes as usize];
    let rss_before = server.rss_bytes();
    for id in 1..=400u64 {
        s.send_message(sink.user, id, &payload);
        if id % 8 == 0 {
            s.collect_acks(8);
        }
    }
    // 400 × 4 KiB were accepted; only the window was pushed to the sink.
    let grown = server.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 8 << 20,
        "server grew by {grown} bytes for a non-reading client"
    );
    assert_healthy(&server);
}

#[test]
fn connection_limit_per_shard_answers_server_busy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.shards = 1;
        c.limits.connections_per_shard_max = 4;
    });
    let held: Vec<RawClient> = (0..4).map(|_| RawClient::connect(server.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = RawClient::connect(server.addr);
    let e = extra.expect_error(ErrorCode::ServerBusy);
    assert!(e.retry_after_ms > 0);
    extra.expect_closed();
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_healthy(&server);
}

#[test]
fn registration_policies_closed_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.registration = RegistrationPolicy::Closed;
    });
    let mut c = RawClient::connect(server.addr);
    c.send(&Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: String::new(),
    }));
    c.expect_error(ErrorCode::RegistrationClosed);
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.registration = RegistrationPolicy::Token;
        c.server.registration_tokens = vec!["let-me-in".into()];
    });
    let mut c = RawClient::connect(server.addr);
    c.send(&Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: "guess".into(),
    }));
    c.expect_error(ErrorCode::BadRegistrationToken);
    let mut c = RawClient::connect(server.addr);
    c.send(&Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: "let-me-in".into(),
    }));
    match c.recv() {
        Some(Frame::Registered(r)) => assert_eq!(r.secret.len(), 32),
        other => panic!("expected Registered, got {other:?}"),
    }
}

#[test]
fn too_many_ids_in_an_ack_is_refused_without_closing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let account = RawClient::register(server.addr);
    let (mut c, _) = RawClient::login(server.addr, &account);
    let limit = server.config.limits.ids_per_frame_max as u64;
    c.send(&Frame::Ack(pb::Ack {
        up_to_sequence: 0,
        sequences: (1..=limit + 1).collect(),
    }));
    c.expect_error(ErrorCode::TooManyIds);
    c.send(&Frame::Ping(pb::Ping { nonce: 3 }));
    assert!(matches!(c.recv(), Some(Frame::Pong(_))));
}

#[test]
fn a_second_register_on_one_connection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let mut c = RawClient::connect(server.addr);
    let register = Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: String::new(),
    });
    c.send(&register);
    assert!(matches!(c.recv(), Some(Frame::Registered(_))));
    c.send(&register);
    c.expect_error(ErrorCode::UnexpectedFrame);
    c.expect_closed();
}
