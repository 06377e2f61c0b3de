//! Browsers over WebSocket and TLS, against the real binary: a WebSocket
//! client (the browser's side: rustls trusting a CA made for the test,
//! tungstenite) runs Noise in binary messages, registers, logs in and
//! messages a native Noise client both ways; bad input (plaintext or
//! garbage first bytes, text messages, an oversized message, plain HTTP, a
//! TLS handshake that never ends, the connection cap) is refused and the
//! server stays up; a shard's close reaches the browser after its last
//! frame; each browser address keeps a login budget of its own behind the
//! bridge; SIGHUP reloads the certificate for new connections while old
//! ones go on.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::wss::{read_response, tls_connect, write, Ended, TestCa, WsClient};
use common::{metric_sum, noise_hello, register_frame, RawClient, Server};
use switchboard::config::Config;
use switchboard::noise::StaticKeypair;
use switchboard::proto::{pb, ErrorCode, Frame};

/// A server with the WSS listener on, its certificate a fresh leaf of `ca`.
fn start(dir: &std::path::Path, ca: &TestCa, tweak: impl FnOnce(&mut Config)) -> Server {
    let (cert, key) = cert_paths(dir);
    ca.leaf("first").write(&cert, &key);
    let server = Server::start(dir, |c| {
        c.wss.enabled = true;
        c.wss.cert_path = cert;
        c.wss.key_path = key;
        tweak(c);
        // The bridge's idle backstop may not cut a session the shards keep.
        c.wss.idle_timeout_ms = c.wss.idle_timeout_ms.max(c.limits.idle_timeout_ms);
    });
    assert!(
        server.wss.is_some(),
        "the readiness line names the wss listener"
    );
    server
}

fn cert_paths(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    (dir.join("wss.crt"), dir.join("wss.key"))
}

fn send(to: u64, id: u64, payload: &[u8]) -> Frame {
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload: Bytes::copy_from_slice(payload),
        ..Default::default()
    })
}

fn wss_metric(server: &Server, name: &str, label: &str) -> f64 {
    let (_, text) = common::admin_get(server.admin, "/metrics");
    metric_sum(&text, name, label)
}

/// Waits until `metric{label}` reaches `at_least` (counters move a moment
/// after the connection that moved them ended).
fn wait_metric(server: &Server, name: &str, label: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = wss_metric(server, name, label);
        if value >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} stayed at {value}, expected {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A device that registered over WebSocket and logs in by its key.
struct BrowserDevice {
    user: u64,
    device: u32,
    key: StaticKeypair,
}

/// XX, Register and then Hello on the same connection; returns the session.
fn browser_register_and_login(server: &Server, ca: &TestCa) -> (WsClient, BrowserDevice) {
    let key = StaticKeypair::generate();
    let config = ca.client_config();
    let (mut ws, handshake) =
        WsClient::noise(server.wss.unwrap(), &config, &key, None).expect("XX over WebSocket");
    assert_eq!(Some(handshake.server_key), server.noise_key);
    ws.send(&register_frame());
    let (user, device) = match ws.recv() {
        Some(Frame::Registered(r)) => {
            assert!(r.secret.is_empty(), "a Noise device gets no secret");
            (r.user_id, r.device_id)
        }
        other => panic!("expected Registered, got {other:?}"),
    };
    ws.send(&noise_hello(user, device, &[]));
    match ws.recv() {
        Some(Frame::Welcome(_)) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    (ws, BrowserDevice { user, device, key })
}

/// A native Noise device: registered over XX, logged in over IK.
fn native_device(server: &Server) -> (RawClient, u64) {
    let key = StaticKeypair::generate();
    let (mut c, _) = RawClient::noise(server.addr, &key, None).expect("XX");
    c.send(&register_frame());
    let (user, device) = match c.recv() {
        Some(Frame::Registered(r)) => (r.user_id, r.device_id),
        other => panic!("expected Registered, got {other:?}"),
    };
    let (mut c, _) = RawClient::noise(server.addr, &key, server.noise_key.as_ref()).expect("IK");
    c.send(&noise_hello(user, device, &[]));
    assert!(matches!(c.recv(), Some(Frame::Welcome(_))));
    (c, user)
}

#[test]
fn a_browser_registers_logs_in_and_messages_a_native_client_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |c| c.limits.idle_timeout_ms = 60_000);
    let (mut browser, me) = browser_register_and_login(&server, &ca);
    let (mut native, native_user) = native_device(&server);

    browser.send(&send(native_user, 1, b"from the browser"));
    let mut early = Vec::new();
    loop {
        match browser.recv() {
            Some(Frame::ServerAck(a)) => {
                assert_eq!(a.client_message_id, 1);
                break;
            }
            Some(other) => early.push(other),
            None => panic!("closed before the ServerAck"),
        }
    }
    let d = native.collect_delivers(1).remove(0);
    assert_eq!(&d.payload[..], b"from the browser");
    assert_eq!(d.sender_user_id, me.user);
    assert_eq!(d.sender_device_id, me.device);
    native.ack(d.sequence);

    native.send_message(me.user, 7, b"reply from native");
    native.collect_acks(1);
    let d = loop {
        match early.pop().or_else(|| browser.recv()) {
            Some(Frame::Deliver(d)) if d.sender_user_id == native_user => break d,
            Some(_) => continue,
            None => panic!("closed before the reply"),
        }
    };
    assert_eq!(&d.payload[..], b"reply from native");
    browser.send(&Frame::Ack(pb::Ack {
        up_to_sequence: d.sequence,
        sequences: vec![],
    }));

    // The browser device logs in again on a new connection over IK.
    let config = ca.client_config();
    drop(browser);
    let (mut again, _) = WsClient::noise(
        server.wss.unwrap(),
        &config,
        &me.key,
        server.noise_key.as_ref(),
    )
    .expect("IK over WebSocket");
    again.send(&noise_hello(me.user, me.device, &[]));
    assert!(matches!(again.recv(), Some(Frame::Welcome(_))));

    assert_eq!(
        wss_metric(&server, "switchboard_wss_bridged_total", ""),
        2.0
    );
    assert_eq!(wss_metric(&server, "switchboard_wss_connections", ""), 1.0);
    assert_eq!(
        wss_metric(&server, "switchboard_noise_ik_handshakes_total", ""),
        2.0,
        "the native device's login and the browser's second one"
    );
}

#[test]
fn plaintext_garbage_text_and_oversized_messages_are_refused_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |_| {});
    let addr = server.wss.unwrap();
    let config = ca.client_config();

    // A plaintext Register in a binary message: a bridge comes from
    // loopback, where the shards would take it, so the bridge refuses it.
    let mut ws = WsClient::connect(addr, &config).unwrap();
    ws.send_binary(&register_frame().to_bytes()).unwrap();
    match ws.expect_end() {
        Ended::Closed(1008, reason) => assert!(reason.contains("Noise"), "{reason}"),
        other => panic!("expected 1008, got {other:?}"),
    }
    // Garbage, and an intro with a pattern byte the server does not know,
    // sent a byte at a time.
    for first in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"SBN1Z"] {
        let mut ws = WsClient::connect(addr, &config).unwrap();
        for byte in first {
            if ws.send_binary(&[*byte]).is_err() {
                break;
            }
        }
        assert!(
            matches!(ws.expect_end(), Ended::Closed(1008, _)),
            "{first:?}"
        );
    }
    // A text message, first and after the handshake.
    let mut ws = WsClient::connect(addr, &config).unwrap();
    ws.send_text("SBN1X").unwrap();
    assert!(matches!(ws.expect_end(), Ended::Closed(1003, _)));
    let (mut ws, _) = WsClient::noise(addr, &config, &StaticKeypair::generate(), None).unwrap();
    ws.send_text("hello").unwrap();
    assert!(matches!(ws.expect_end(), Ended::Closed(1003, _)));
    // A message over wss.message_bytes_max.
    let (mut ws, _) = WsClient::noise(addr, &config, &StaticKeypair::generate(), None).unwrap();
    let too_big = vec![0u8; server.config.wss.message_bytes_max as usize + 1];
    let _ = ws.send_binary(&too_big);
    let end = ws.expect_end();
    assert!(matches!(end, Ended::Closed(1009, _)), "{end:?}");

    wait_metric(&server, "switchboard_wss_refused_total", "not_noise", 3.0);
    wait_metric(&server, "switchboard_wss_refused_total", "text", 2.0);
    wait_metric(&server, "switchboard_wss_refused_total", "protocol", 1.0);
    assert_eq!(
        wss_metric(&server, "switchboard_registrations_total", ""),
        0.0,
        "the plaintext Register never reached a shard"
    );
    // Still serving, both ways in.
    let (_browser, _) = browser_register_and_login(&server, &ca);
    let _native = native_device(&server);
    assert_eq!(
        wss_metric(&server, "switchboard_wss_refused_total", ""),
        6.0
    );
}

#[test]
fn plain_http_gets_426_and_other_methods_405() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |_| {});
    let config = ca.client_config();
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"[..], 426),
        (
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
            405,
        ),
    ] {
        let mut tls = tls_connect(server.wss.unwrap(), &config).unwrap();
        write(&mut tls, request);
        let (got, text) = read_response(&mut tls);
        assert_eq!(got, status, "{text}");
    }
    wait_metric(&server, "switchboard_wss_refused_total", "http", 2.0);
}

#[test]
fn handshakes_that_never_finish_are_closed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |_| {});
    let addr = server.wss.unwrap();
    let timeout = Duration::from_millis(u64::from(server.config.wss.handshake_timeout_ms));

    // Silent after connecting; half a ClientHello; TLS done but no request.
    let silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let mut no_request = tls_connect(addr, &ca.client_config()).unwrap();
    let started = Instant::now();
    for mut stream in [silent, half] {
        stream
            .set_read_timeout(Some(timeout + Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
    let mut rest = Vec::new();
    let _ = no_request.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= timeout.mul_f64(0.8) && waited < timeout + Duration::from_secs(3),
        "closed after {waited:?}, timeout {timeout:?}"
    );
    // Upgraded, but the Noise intro never comes.
    let mut ws = WsClient::connect(addr, &ca.client_config()).unwrap();
    match ws.expect_end() {
        Ended::Closed(1008, reason) => assert!(reason.contains("timeout"), "{reason}"),
        other => panic!("expected 1008, got {other:?}"),
    }
    wait_metric(&server, "switchboard_wss_refused_total", "timeout", 4.0);
    assert_eq!(wss_metric(&server, "switchboard_wss_connections", ""), 0.0);
}

#[test]
fn past_the_connection_cap_a_connection_is_closed_before_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |c| {
        c.wss.connections_max = 2;
        c.wss.handshake_timeout_ms = 30_000;
    });
    let addr = server.wss.unwrap();
    let config = ca.client_config();
    let first = WsClient::connect(addr, &config).unwrap();
    let _second = WsClient::connect(addr, &config).unwrap();
    assert!(
        tls_connect(addr, &config).is_err(),
        "a third connection is closed before its TLS handshake"
    );
    wait_metric(&server, "switchboard_wss_refused_total", "busy", 1.0);
    drop(first);
    // The closed connection's slot comes back once its task has ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match WsClient::connect(addr, &config) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no slot came back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_shard_closing_a_session_reaches_the_browser_after_its_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    // The shards close a silent session after limits.idle_timeout_ms.
    let server = start(dir.path(), &ca, |_| {});
    let (mut browser, _) = browser_register_and_login(&server, &ca);
    expect_error_frame(&mut browser, ErrorCode::IdleTimeout);
    match browser.expect_end() {
        Ended::Closed(1000, reason) => assert!(reason.contains("server"), "{reason}"),
        other => panic!("expected 1000, got {other:?}"),
    }
}

#[test]
fn each_browser_address_keeps_its_own_login_budget_behind_the_bridge() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |c| {
        // Two failures, then a delay far longer than the test.
        c.limits.auth_failures_before_delay = 2;
        c.limits.auth_failure_delay_ms = 60_000;
        c.limits.idle_timeout_ms = 60_000;
    });
    let addr = server.wss.unwrap();
    let config = ca.client_config();
    let (browser, device) = browser_register_and_login(&server, &ca);
    drop(browser);
    let guesser: IpAddr = "127.0.0.2".parse().unwrap();
    let honest: IpAddr = "127.0.0.3".parse().unwrap();
    let server_key = server.noise_key.unwrap();

    // The guesser claims the device with keys of its own.
    let login = |source: IpAddr, key: &StaticKeypair| {
        let (mut ws, _) =
            WsClient::noise_from(addr, Some(source), &config, key, Some(&server_key)).unwrap();
        ws.send(&noise_hello(device.user, device.device, &[]));
        ws.recv()
    };
    for _ in 0..2 {
        match login(guesser, &StaticKeypair::generate()) {
            Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::AuthFailed as i32),
            other => panic!("expected AUTH_FAILED, got {other:?}"),
        }
    }
    match login(guesser, &device.key) {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}"),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    // Another browser address is not slowed down by the guesser's failures.
    assert!(matches!(
        login(honest, &device.key),
        Some(Frame::Welcome(_))
    ));
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_old_ones_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let server = start(dir.path(), &ca, |c| c.limits.idle_timeout_ms = 60_000);
    let addr = server.wss.unwrap();
    let config = ca.client_config();
    let (cert, key) = cert_paths(dir.path());
    let first = std::fs::read_to_string(&cert).unwrap();
    let (mut old, _) = browser_register_and_login(&server, &ca);
    let first_der = old.leaf();

    let second = ca.leaf("second");
    second.write(&cert, &key);
    server.sighup();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tls = tls_connect(addr, &config).unwrap();
        let leaf = common::wss::peer_leaf(&tls);
        if leaf == second.der {
            break;
        }
        assert_eq!(leaf, first_der);
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_metric(
        &server,
        "switchboard_wss_certificate_reloads_total",
        "",
        1.0,
    );
    assert_ne!(first, second.cert_pem);

    // The connection made before the reload goes on.
    old.send(&Frame::Ping(pb::Ping { nonce: 42 }));
    loop {
        match old.recv() {
            Some(Frame::Pong(p)) => {
                assert_eq!(p.nonce, 42);
                break;
            }
            Some(_) => continue,
            None => panic!("the old connection was closed"),
        }
    }

    // A bad pair is refused and the second certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    server.sighup();
    wait_metric(
        &server,
        "switchboard_wss_certificate_reload_failures_total",
        "",
        1.0,
    );
    let (mut ws, _) = WsClient::noise(addr, &config, &StaticKeypair::generate(), None).unwrap();
    assert_eq!(ws.leaf(), second.der);
    ws.send(&register_frame());
    assert!(matches!(ws.recv(), Some(Frame::Registered(_))));
}

/// Reads frames until an Error, which must carry `code`.
fn expect_error_frame(ws: &mut WsClient, code: ErrorCode) {
    loop {
        match ws.recv() {
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, code as i32, "{e:?}");
                return;
            }
            Some(_) => continue,
            None => panic!("closed before Error {code:?}"),
        }
    }
}
