//! Push wake-ups over real sockets against the real binary, with a real
//! HTTP server on loopback standing in for the push service and the
//! operator's webhook: a message to a device with no connection sends one
//! empty Web Push POST with a VAPID authorization that verifies with the
//! key the server handed out; wake-ups are coalesced; a 410 removes the
//! endpoint; a failing gateway is retried; the webhook gets JSON; bad
//! registrations are refused.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{Account, RawClient, Server};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use switchboard::proto::{pb, ErrorCode, Frame, PushKind};

/// One request the fake gateway got.
#[derive(Debug)]
struct Hit {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Hit {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 server on loopback answering every request with `status`
/// (changeable) and reporting each request.
fn gateway() -> (SocketAddr, Arc<AtomicU16>, mpsc::Receiver<Hit>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(201));
    let (tx, rx) = mpsc::channel();
    let answer = status.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((n, v)) = h.trim().split_once(':') {
                    headers.push((n.trim().to_string(), v.trim().to_string()));
                }
            }
            let length: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let code = answer.load(Ordering::SeqCst);
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = tx.send(Hit {
                path,
                headers,
                body,
            });
        }
    });
    (addr, status, rx)
}

fn login(addr: SocketAddr, a: &Account) -> RawClient {
    RawClient::login(addr, a).0
}

fn register(c: &mut RawClient, kind: PushKind, endpoint: &str) -> Frame {
    c.send(&Frame::RegisterPush(pb::RegisterPush {
        kind: kind as i32,
        endpoint: endpoint.to_string(),
    }));
    c.recv().expect("an answer")
}

/// Sends `n` messages from `from` to `to`, waiting for their ServerAcks.
fn send(c: &mut RawClient, to: u64, first_id: u64, n: u64) {
    for id in first_id..first_id + n {
        c.send_message(to, id, b"hello");
    }
    c.collect_acks(n as usize);
}

#[test]
fn web_push_wakes_an_offline_device_with_a_vapid_signature() {
    let (gw, status, hits) = gateway();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.push.interval_ms = 1_000;
        c.push.vapid_subject = "mailto:ops@example.test".into();
    });
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let endpoint = format!("http://{gw}/push/bob-device");
    let key = {
        let mut b = login(server.addr, &bob);
        match register(&mut b, PushKind::WebPush, &endpoint) {
            Frame::PushRegistered(r) => {
                assert_eq!(r.kind, PushKind::WebPush as i32);
                assert_eq!(r.vapid_public_key.len(), 65);
                r.vapid_public_key
            }
            other => panic!("expected PushRegistered, got {other:?}"),
        }
    };
    // Bob is offline: three messages make one wake-up (coalesced).
    let mut a = login(server.addr, &alice);
    send(&mut a, bob.user, 1, 3);
    let hit = hits
        .recv_timeout(Duration::from_secs(10))
        .expect("a wake-up");
    assert_eq!(hit.path, "/push/bob-device");
    assert!(hit.body.is_empty(), "content-free");
    assert!(hit.header("TTL").is_some());
    let auth = hit.header("Authorization").expect("VAPID");
    let (t, k) = auth
        .strip_prefix("vapid t=")
        .unwrap()
        .split_once(", k=")
        .unwrap();
    assert_eq!(URL_SAFE_NO_PAD.decode(k).unwrap(), key.to_vec());
    let (input, sig) = t.rsplit_once('.').unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(input.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], format!("http://{gw}"));
    assert_eq!(claims["sub"], "mailto:ops@example.test");
    VerifyingKey::from_sec1_bytes(&key)
        .unwrap()
        .verify(
            input.as_bytes(),
            &Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap(),
        )
        .expect("the JWT verifies with the key the server handed out");
    assert!(
        hits.recv_timeout(Duration::from_millis(500)).is_err(),
        "one wake-up for the burst"
    );
    // A failing gateway is tried again.
    status.store(503, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1_100));
    send(&mut a, bob.user, 10, 1);
    hits.recv_timeout(Duration::from_secs(10))
        .expect("first try");
    status.store(410, Ordering::SeqCst);
    hits.recv_timeout(Duration::from_secs(10)).expect("a retry");
    // The 410 removed the endpoint: nothing more, whatever is sent.
    std::thread::sleep(Duration::from_millis(1_100));
    status.store(201, Ordering::SeqCst);
    send(&mut a, bob.user, 20, 1);
    assert!(hits.recv_timeout(Duration::from_secs(3)).is_err());
    // Bob connects and gets everything; the server stays healthy.
    let mut b = login(server.addr, &bob);
    assert_eq!(b.receive_and_ack(5).len(), 5);
}

#[test]
fn the_webhook_gets_json_and_bad_registrations_are_refused() {
    let (gw, _status, hits) = gateway();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.push.webhook_url = format!("http://{gw}/relay");
    });
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    {
        let mut b = login(server.addr, &bob);
        for (kind, endpoint, code) in [
            (PushKind::WebPush, "ftp://nope", ErrorCode::MalformedFrame),
            (PushKind::Webhook, "", ErrorCode::UnsupportedFeature),
        ] {
            match register(&mut b, kind, endpoint) {
                Frame::Error(e) => assert_eq!((e.code(), e.fatal), (code, false)),
                other => panic!("expected {code:?}, got {other:?}"),
            }
        }
        let long = format!("https://x/{}", "a".repeat(2_000));
        assert!(matches!(
            register(&mut b, PushKind::WebPush, &long),
            Frame::Error(_)
        ));
        assert!(matches!(
            register(&mut b, PushKind::Webhook, "apns-token-123"),
            Frame::PushRegistered(_)
        ));
    }
    let mut a = login(server.addr, &alice);
    send(&mut a, bob.user, 1, 1);
    let hit = hits
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook");
    assert_eq!(hit.path, "/relay");
    let body: serde_json::Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"user_id": bob.user, "device_id": 1, "token": "apns-token-123"})
    );
    // Removing the registration stops the wake-ups.
    {
        let mut b = login(server.addr, &bob);
        b.receive_and_ack(1);
        assert!(matches!(
            register(&mut b, PushKind::Unspecified, ""),
            Frame::PushRegistered(r) if r.kind == PushKind::Unspecified as i32
        ));
    }
    std::thread::sleep(Duration::from_millis(300));
    send(&mut a, bob.user, 2, 1);
    assert!(hits.recv_timeout(Duration::from_secs(2)).is_err());
    let (status, metrics) = common::admin_get(server.admin, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        common::metric_sum(&metrics, "switchboard_push_sent_total", ""),
        1.0
    );
}
