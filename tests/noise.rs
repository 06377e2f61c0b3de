//! Noise as the device login, over real sockets against the real binary:
//! XX registration and IK reconnects across two shards (handoffs carry the
//! transport), messages between Noise and plaintext devices, linking over
//! Noise, binding a plaintext device's key with its secret, key rotation
//! with its overlap, the plaintext policy, and bad input (garbage, a wrong
//! server key, an unknown or wrong client key, a client payload, a replayed
//! IK message, tampered transport bytes, a silent peer), each closing only
//! its own connection, and a kill -9 with Noise sessions.

mod common;

use std::io::Write;

use bytes::Bytes;
use common::{hello, metric_sum, noise_hello, register_frame, Account, RawClient, Server};
use switchboard::config::PlaintextPolicy;
use switchboard::noise::{Initiator, StaticKeypair};
use switchboard::proto::{pb, ErrorCode, Frame, PROTOCOL_VERSION};

/// A device that logs in by its Noise key.
struct NoiseDevice {
    user: u64,
    device: u32,
    key: StaticKeypair,
}

/// Registers over XX; checks the server's key is the one it announced and
/// that no secret is handed out.
fn register(server: &Server) -> NoiseDevice {
    let key = StaticKeypair::generate();
    let (mut c, handshake) = RawClient::noise(server.addr, &key, None).expect("XX handshake");
    assert_eq!(Some(handshake.server_key), server.noise_key);
    c.send(&register_frame());
    match c.recv() {
        Some(Frame::Registered(r)) => {
            assert!(r.secret.is_empty(), "a Noise device gets no secret");
            NoiseDevice {
                user: r.user_id,
                device: r.device_id,
                key,
            }
        }
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// Logs in over IK to the server's announced key.
fn login(server: &Server, device: &NoiseDevice) -> RawClient {
    let server_key = server.noise_key.expect("noise on");
    let (mut c, _) = RawClient::noise(server.addr, &device.key, Some(&server_key)).expect("IK");
    c.send(&noise_hello(device.user, device.device, &[]));
    match c.recv() {
        Some(Frame::Welcome(_)) => c,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn expect_refused(c: &mut RawClient, code: ErrorCode) {
    c.expect_error(code);
    c.expect_closed();
}

fn handshake_count(server: &Server, pattern: &str) -> f64 {
    let (_, text) = common::admin_get(server.admin, "/metrics");
    metric_sum(
        &text,
        &format!("switchboard_noise_{pattern}_handshakes_total"),
        "",
    )
}

#[test]
fn xx_register_ik_login_and_messages_both_ways_with_plaintext_devices_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    // Sessions wait idle while the others log in and send.
    let server = Server::start(dir.path(), |c| c.limits.idle_timeout_ms = 60_000);
    assert_eq!(server.shards(), 2);
    // Enough devices that both shards accept and both are home to some,
    // so some sessions are handed off with their transport.
    let devices: Vec<NoiseDevice> = (0..8).map(|_| register(&server)).collect();
    let plain = RawClient::register(server.addr);
    let (mut plain_session, _) = RawClient::login(server.addr, &plain);
    let mut sessions: Vec<RawClient> = devices.iter().map(|d| login(&server, d)).collect();

    // Noise → Noise (each to the next), and Noise → plaintext. A Deliver
    // may come while a session waits for its acks: kept.
    let mut early: Vec<Vec<pb::Deliver>> = vec![Vec::new(); devices.len()];
    for (i, session) in sessions.iter_mut().enumerate() {
        let to = devices[(i + 1) % devices.len()].user;
        session.send_message(to, 1, format!("ring {i}").as_bytes());
        session.send_message(plain.user, 2, format!("to plain {i}").as_bytes());
        let (acks, others) = session.collect_acks(2);
        assert_eq!(acks.len(), 2);
        for frame in others {
            if let Frame::Deliver(d) = frame {
                early[i].push(d);
            }
        }
    }
    for (i, session) in sessions.iter_mut().enumerate() {
        let from = (i + devices.len() - 1) % devices.len();
        let d = match early[i].pop() {
            Some(d) => d,
            None => session.collect_delivers(1).remove(0),
        };
        assert_eq!(&d.payload[..], format!("ring {from}").as_bytes());
        session.ack(d.sequence);
    }
    let got: Vec<Vec<u8>> = (0..devices.len())
        .map(|_| {
            let d = plain_session.collect_delivers(1).remove(0);
            plain_session.ack(d.sequence);
            d.payload.to_vec()
        })
        .collect();
    assert_eq!(got.len(), devices.len());
    // Plaintext → Noise.
    plain_session.send_message(devices[0].user, 9, b"from plain");
    plain_session.collect_acks(1);
    let d = sessions[0].collect_delivers(1).remove(0);
    assert_eq!(&d.payload[..], b"from plain");

    let (_, text) = common::admin_get(server.admin, "/metrics");
    assert!(
        metric_sum(&text, "switchboard_handoffs_out_total", "") > 0.0,
        "some Noise session moved between shards"
    );
    assert_eq!(handshake_count(&server, "xx"), 8.0);
    assert_eq!(handshake_count(&server, "ik"), 8.0);
}

#[test]
fn wrong_keys_and_plaintext_logins_of_noise_devices_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Failures from one address are not slowed down here.
    let server = Server::start(dir.path(), |c| c.limits.auth_failures_before_delay = 100);
    let device = register(&server);
    let server_key = server.noise_key.unwrap();

    // Another client key claiming the device.
    let stranger = StaticKeypair::generate();
    let (mut c, _) = RawClient::noise(server.addr, &stranger, Some(&server_key)).unwrap();
    c.send(&noise_hello(device.user, device.device, &[]));
    expect_refused(&mut c, ErrorCode::AuthFailed);

    // The right key for another device number.
    let (mut c, _) = RawClient::noise(server.addr, &device.key, Some(&server_key)).unwrap();
    c.send(&noise_hello(device.user, 2, &[]));
    expect_refused(&mut c, ErrorCode::AuthFailed);

    // A plaintext Hello for a Noise device: it has no secret that works.
    let mut c = RawClient::connect(server.addr);
    c.send(&hello(&Account {
        user: device.user,
        device: device.device,
        secret: Bytes::from_static(&[0; 32]),
    }));
    expect_refused(&mut c, ErrorCode::AuthFailed);

    // IK to a key the server does not hold: closed without an answer.
    let not_the_server = StaticKeypair::generate();
    let refused = RawClient::noise(server.addr, &device.key, Some(not_the_server.public()));
    assert!(
        refused.is_err(),
        "an IK to an unknown key cannot be answered"
    );

    // The device itself still logs in, over XX too.
    drop(login(&server, &device));
    let (mut c, _) = RawClient::noise(server.addr, &device.key, None).unwrap();
    c.send(&noise_hello(device.user, device.device, &[]));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
}

#[test]
fn a_plaintext_device_binds_a_noise_key_once_with_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.auth_failures_before_delay = 100);
    let account = RawClient::register(server.addr);
    let server_key = server.noise_key.unwrap();
    let key = StaticKeypair::generate();

    // No key bound and no secret: refused.
    let (mut c, _) = RawClient::noise(server.addr, &key, Some(&server_key)).unwrap();
    c.send(&noise_hello(account.user, account.device, &[]));
    expect_refused(&mut c, ErrorCode::AuthFailed);

    // A wrong secret binds nothing.
    let (mut c, _) = RawClient::noise(server.addr, &key, Some(&server_key)).unwrap();
    c.send(&noise_hello(account.user, account.device, &[7; 32]));
    expect_refused(&mut c, ErrorCode::AuthFailed);

    // The secret binds the key.
    let (mut c, _) = RawClient::noise(server.addr, &key, Some(&server_key)).unwrap();
    c.send(&noise_hello(account.user, account.device, &account.secret));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
    drop(c);

    // From now on: the key logs in; the secret does not, in plaintext or
    // with another key.
    let device = NoiseDevice {
        user: account.user,
        device: account.device,
        key,
    };
    drop(login(&server, &device));
    let mut c = RawClient::connect(server.addr);
    c.send(&hello(&account));
    expect_refused(&mut c, ErrorCode::AuthFailed);
    let other = StaticKeypair::generate();
    let (mut c, _) = RawClient::noise(server.addr, &other, Some(&server_key)).unwrap();
    c.send(&noise_hello(account.user, account.device, &account.secret));
    expect_refused(&mut c, ErrorCode::AuthFailed);
}

#[test]
fn linking_over_noise_records_the_companion_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let primary = register(&server);
    let mut session = login(&server, &primary);
    session.send(&Frame::RequestLinkCode(pb::RequestLinkCode {}));
    let code = match session.recv() {
        Some(Frame::LinkCode(code)) => code.code,
        other => panic!("expected LinkCode, got {other:?}"),
    };
    let companion_key = StaticKeypair::generate();
    let (mut c, _) = RawClient::noise(server.addr, &companion_key, None).unwrap();
    c.send(&Frame::Link(pb::Link {
        protocol_version: PROTOCOL_VERSION,
        code,
        device_name: "laptop".into(),
    }));
    let companion = match c.recv() {
        Some(Frame::Registered(r)) => {
            assert!(r.secret.is_empty());
            assert_eq!(r.user_id, primary.user);
            NoiseDevice {
                user: r.user_id,
                device: r.device_id,
                key: companion_key,
            }
        }
        other => panic!("expected Registered, got {other:?}"),
    };
    // The companion logs in on the same connection (Hello after
    // Registered), and on a new one by IK.
    c.send(&noise_hello(companion.user, companion.device, &[]));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
    drop(c);
    drop(login(&server, &companion));
}

#[test]
fn bad_noise_input_closes_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.handshake_timeout_ms = 500);
    let server_key = server.noise_key.unwrap();
    let device = register(&server);
    let mut live = login(&server, &device);

    // Garbage after the intro's first byte.
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(b"SBN2Xgarbage").unwrap();
    c.expect_closed();

    // An unknown pattern.
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(b"SBN1Q").unwrap();
    c.expect_closed();

    // A first message longer than its pattern allows.
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(b"SBN1X\x01\x00").unwrap();
    c.expect_closed();

    // A client payload in the handshake (the login belongs in a sealed frame).
    let key = StaticKeypair::generate();
    let (_, opening) = Initiator::ik(&key, &server_key, b"a login in the payload").unwrap();
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(&opening).unwrap();
    c.expect_closed();

    // A handshake that stops half way: closed at the handshake deadline.
    let mut c = RawClient::connect(server.addr);
    c.send_bytes(b"SBN1X\x00\x20").unwrap();
    c.expect_closed();

    // Tampered XX third message.
    let (mut initiator, opening) = Initiator::xx(&key, &[]).unwrap();
    let mut c = RawClient::connect(server.addr);
    c.stream.write_all(&opening).unwrap();
    let second = read_message(&mut c);
    let mut third = initiator.read_message(&second).unwrap().unwrap();
    let last = third.len() - 1;
    third[last] ^= 1;
    c.stream.write_all(&third).unwrap();
    c.expect_closed();

    // A replayed IK first message: the server answers (it cannot tell), but
    // the replayer cannot produce a login, and the device's live session
    // stays.
    let (_, opening) = Initiator::ik(&device.key, &server_key, &[]).unwrap();
    let mut first = RawClient::connect(server.addr);
    first.stream.write_all(&opening).unwrap();
    read_message(&mut first);
    let mut replay = RawClient::connect(server.addr);
    replay.stream.write_all(&opening).unwrap();
    read_message(&mut replay);
    replay.stream.write_all(&[0, 40]).unwrap();
    replay.stream.write_all(&[0xAB; 40]).unwrap();
    replay.expect_closed();
    drop(first);

    // Tampered transport bytes in session: the session ends.
    let other = register(&server);
    let mut victim = login(&server, &other);
    victim.stream.write_all(&[0, 20]).unwrap();
    victim.stream.write_all(&[0x55; 20]).unwrap();
    victim.expect_closed();

    // The live session saw none of it and still works.
    live.send(&Frame::Ping(pb::Ping { nonce: 7 }));
    loop {
        match live.recv() {
            Some(Frame::Pong(p)) => {
                assert_eq!(p.nonce, 7);
                break;
            }
            Some(_) => continue,
            None => panic!("the live session was closed"),
        }
    }
    let (_, text) = common::admin_get(server.admin, "/metrics");
    assert!(metric_sum(&text, "switchboard_noise_handshake_failures_total", "") >= 5.0);
}

/// Reads one handshake message (its body) from a raw connection.
fn read_message(c: &mut RawClient) -> Vec<u8> {
    use std::io::Read;
    let mut prefix = [0u8; 2];
    c.stream.read_exact(&mut prefix).unwrap();
    let mut body = vec![0u8; u16::from_be_bytes(prefix) as usize];
    c.stream.read_exact(&mut body).unwrap();
    body
}

#[test]
fn plaintext_policy_off_refuses_plaintext_clients_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.server.plaintext = PlaintextPolicy::Off);
    let mut c = RawClient::connect(server.addr);
    c.send(&register_frame());
    expect_refused(&mut c, ErrorCode::PlaintextRefused);
    // Noise clients are served.
    let device = register(&server);
    drop(login(&server, &device));
}

#[test]
fn noise_off_serves_plaintext_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.server.noise = false);
    assert!(server.noise_key.is_none());
    let key = StaticKeypair::generate();
    let mut c = RawClient::connect(server.addr);
    let (_, opening) = Initiator::xx(&key, &[]).unwrap();
    c.stream.write_all(&opening).unwrap();
    // Read as a plaintext frame header: a length far past the limit.
    expect_refused(&mut c, ErrorCode::FrameTooLarge);
    let account = RawClient::register(server.addr);
    drop(RawClient::login(server.addr, &account));
}

fn noise_key_command(args: &[&str], data_dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("noise-key")
        .args(args)
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rotation_keeps_the_previous_key_for_ik_and_announces_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let data_dir = server.config.server.data_dir.clone();
    let old_key = server.noise_key.unwrap();
    let device = register(&server);
    let shown = noise_key_command(&["show"], &data_dir);
    assert!(shown.contains(&hex::encode(old_key)), "{shown}");

    assert_eq!(server.terminate(), Some(0));
    let rotated = noise_key_command(&["rotate"], &data_dir);
    assert!(rotated.contains("accepted until end-overlap"), "{rotated}");
    server.launch();
    let new_key = server.noise_key.unwrap();
    assert_ne!(new_key, old_key);

    // IK to the old key: served, and told the new key.
    let (mut c, handshake) = RawClient::noise(server.addr, &device.key, Some(&old_key)).unwrap();
    assert_eq!(handshake.rotated, Some(new_key));
    c.send(&noise_hello(device.user, device.device, &[]));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
    drop(c);
    // IK to the new key: no announcement.
    let (mut c, handshake) = RawClient::noise(server.addr, &device.key, Some(&new_key)).unwrap();
    assert_eq!(handshake.rotated, None);
    c.send(&noise_hello(device.user, device.device, &[]));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
    drop(c);

    assert_eq!(server.terminate(), Some(0));
    noise_key_command(&["end-overlap"], &data_dir);
    server.launch();
    assert_eq!(server.noise_key, Some(new_key));
    assert!(RawClient::noise(server.addr, &device.key, Some(&old_key)).is_err());
    drop(login(&server, &device));
}

#[test]
fn acknowledged_messages_over_noise_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let sender = register(&server);
    let receiver = register(&server);
    let mut session = login(&server, &sender);
    let count = 50;
    for id in 1..=count {
        session.send_message(receiver.user, id, format!("m{id}").as_bytes());
    }
    let (acks, _) = session.collect_acks(count as usize);
    assert_eq!(acks.len(), count as usize);
    server.kill9();
    server.launch();
    let mut inbox = login(&server, &receiver);
    let ids = inbox.receive_and_ack(count as usize);
    assert_eq!(ids, (1..=count).collect::<Vec<_>>());
}

#[test]
fn a_silent_noise_client_is_closed_at_the_handshake_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.handshake_timeout_ms = 300);
    let key = StaticKeypair::generate();
    // Handshake done, login never sent.
    let (mut c, _) = RawClient::noise(server.addr, &key, None).unwrap();
    // The refusal is sealed (the transport exists): HANDSHAKE_TIMEOUT.
    expect_refused(&mut c, ErrorCode::HandshakeTimeout);
}
