//! Server memory per idle browser (WSS) session beside a native Noise one,
//! and server CPU per message over WSS, native Noise and plaintext,
//! measured (ignored by default; docs/benchmarks.md has the numbers):
//!
//! ```sh
//! cargo test --release --test wss_memory -- --ignored --nocapture
//! ```
//!
//! Each kind gets a server of its own: `WARM_UP` sessions first (allocator
//! pools, TLS session caches and the like fill), then `SESSIONS` more,
//! each logged in (Noise XX, Register and Hello on one connection) and left
//! idle; the server's RSS is read before and after those, after a pause.
//! The clients live in this process, so the server's RSS holds only the
//! server's side: for a browser that is the TLS socket, the bridge's
//! loopback socket and the shard's end of it.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::wss::{TestCa, WsClient};
use common::{register_frame, RawClient, Server};
use switchboard::config::Config;
use switchboard::noise::StaticKeypair;
use switchboard::proto::{pb, Frame, PROTOCOL_VERSION};

const WARM_UP: usize = 100;
const SESSIONS: usize = 1_000;

fn tweak(c: &mut Config) {
    c.limits.connections_per_shard_max = 100_000;
    c.limits.handshake_timeout_ms = 30_000;
    c.limits.idle_timeout_ms = 600_000;
    c.wss.connections_max = 100_000;
    c.wss.handshake_timeout_ms = 30_000;
    c.wss.idle_timeout_ms = 600_000;
}

/// A connection that carries frames: native or WebSocket.
trait Frames {
    fn send_frame(&mut self, frame: &Frame);
    fn recv_frame(&mut self) -> Option<Frame>;
}

impl Frames for RawClient {
    fn send_frame(&mut self, frame: &Frame) {
        self.send(frame)
    }
    fn recv_frame(&mut self) -> Option<Frame> {
        self.recv()
    }
}

impl Frames for WsClient {
    fn send_frame(&mut self, frame: &Frame) {
        self.send(frame)
    }
    fn recv_frame(&mut self) -> Option<Frame> {
        self.recv()
    }
}

/// The machine's kernel slab, bytes (`Slab:` in /proc/meminfo).
fn slab_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo.lines().find(|l| l.starts_with("Slab:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Opens `count` sessions with `open`; returns the server's RSS growth and
/// the machine's slab growth (both ends' sockets) per session, once idle.
fn grow<T>(
    server: &Server,
    sessions: &mut Vec<T>,
    count: usize,
    open: impl Fn() -> T,
) -> (f64, f64) {
    std::thread::sleep(Duration::from_secs(2));
    let before = server.rss_bytes();
    let slab_before = slab_bytes();
    let started = Instant::now();
    for _ in 0..count {
        sessions.push(open());
    }
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let after = server.rss_bytes();
    let slab_after = slab_bytes();
    println!(
        "  {count} sessions in {opened_in:.1?}: RSS {:.1} MiB -> {:.1} MiB, slab {:.1} MiB -> {:.1} MiB",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        slab_before as f64 / (1 << 20) as f64,
        slab_after as f64 / (1 << 20) as f64,
    );
    (
        (after as f64 - before as f64) / count as f64,
        (slab_after as f64 - slab_before as f64) / count as f64,
    )
}

fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn server_memory_per_idle_wss_session_and_per_native_noise_session() {
    raise_open_file_limit();

    let dir = tempfile::tempdir().unwrap();
    for kind in ["native", "wss"] {
        std::fs::create_dir(dir.path().join(kind)).unwrap();
    }
    let native_server = Server::start(&dir.path().join("native"), tweak);
    let addr = native_server.addr;
    let open_native = || {
        let key = StaticKeypair::generate();
        let (mut c, _) = RawClient::noise(addr, &key, None).expect("XX");
        log_in(&mut c);
        c
    };
    println!("native Noise sessions:");
    let mut native = Vec::new();
    grow(&native_server, &mut native, WARM_UP, open_native);
    let per_native = grow(&native_server, &mut native, SESSIONS, open_native);
    drop(native);
    drop(native_server);

    let ca = TestCa::new();
    let cert = dir.path().join("wss.crt");
    let key = dir.path().join("wss.key");
    ca.leaf("memory").write(&cert, &key);
    let wss_server = Server::start(&dir.path().join("wss"), |c| {
        tweak(c);
        c.wss.enabled = true;
        c.wss.cert_path = cert.clone();
        c.wss.key_path = key.clone();
    });
    let wss = wss_server.wss.unwrap();
    let config = ca.client_config();
    let open_browser = || {
        let key = StaticKeypair::generate();
        let (mut c, _) = WsClient::noise(wss, &config, &key, None).expect("XX over WebSocket");
        log_in(&mut c);
        c
    };
    println!("browser (WSS) sessions:");
    let mut browsers = Vec::new();
    grow(&wss_server, &mut browsers, WARM_UP, open_browser);
    let per_browser = grow(&wss_server, &mut browsers, SESSIONS, open_browser);

    println!(
        "per idle native Noise session: server RSS {:.0} B, machine slab {:.0} B (2 sockets)",
        per_native.0, per_native.1
    );
    println!(
        "per idle WSS session:          server RSS {:.0} B, machine slab {:.0} B (4 sockets)",
        per_browser.0, per_browser.1
    );
}

/// The server's CPU time so far (user + system, all threads), in seconds.
fn server_cpu_s(server: &Server) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap();
    // Fields after the command name (which ends with ')'): utime and stime
    // are the 12th and 13th of those.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // /proc counts in USER_HZ ticks, 100 a second on Linux.
    ticks as f64 / 100.0
}

/// Messages from `a` to `b` in batches of `BATCH`: `b` acknowledges each
/// batch's deliveries, `a` waits for its ServerAcks and acknowledges the
/// receipts that come back. Returns the server's CPU µs per message and
/// the messages per second of wall time.
fn exchange(server: &Server, a: &mut impl Frames, b: &mut impl Frames, to: u64) -> (f64, f64) {
    const MESSAGES: u64 = 20_000;
    const BATCH: u64 = 32;
    let cpu_before = server_cpu_s(server);
    let started = Instant::now();
    let mut receipt_seen = 0u64;
    for batch in 0..MESSAGES / BATCH {
        for i in 0..BATCH {
            a.send_frame(&Frame::Send(pb::Send {
                client_message_id: batch * BATCH + i + 1,
                recipient_user_id: to,
                payload: Bytes::from_static(&[7u8; 100]),
                ..Default::default()
            }));
        }
        let (mut delivered, mut last) = (0, 0);
        while delivered < BATCH {
            match b.recv_frame() {
                Some(Frame::Deliver(d)) => {
                    delivered += 1;
                    last = d.sequence;
                }
                Some(_) => {}
                None => panic!("the recipient was closed"),
            }
        }
        b.send_frame(&Frame::Ack(pb::Ack {
            up_to_sequence: last,
            sequences: vec![],
        }));
        let mut acked = 0;
        while acked < BATCH {
            match a.recv_frame() {
                Some(Frame::ServerAck(_)) => acked += 1,
                Some(Frame::Receipt(r)) => receipt_seen = receipt_seen.max(r.sequence),
                Some(_) => {}
                None => panic!("the sender was closed"),
            }
        }
        if receipt_seen > 0 {
            a.send_frame(&Frame::Ack(pb::Ack {
                up_to_sequence: receipt_seen,
                sequences: vec![],
            }));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = server_cpu_s(server) - cpu_before;
    (cpu * 1e6 / MESSAGES as f64, MESSAGES as f64 / elapsed)
}

/// Register and Hello on one connection; returns the user id.
fn log_in(c: &mut impl Frames) -> u64 {
    c.send_frame(&register_frame());
    let (user, device, secret) = match c.recv_frame() {
        Some(Frame::Registered(r)) => (r.user_id, r.device_id, r.secret),
        other => panic!("expected Registered, got {other:?}"),
    };
    // A plaintext device logs in with its secret; a Noise one's is empty.
    c.send_frame(&Frame::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        user_id: user,
        device_id: device,
        secret,
    }));
    assert!(matches!(c.recv_frame(), Some(Frame::Welcome(_))));
    user
}

fn tweak_for_messages(c: &mut Config) {
    tweak(c);
    c.server.shards = 1;
    c.limits.delivery_window_messages = 256;
    c.limits.delivery_window_bytes = 1 << 20;
    c.limits.sends_in_flight_max = 256;
}

#[test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
fn server_cpu_per_message_over_wss_native_noise_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["plain", "native", "wss"] {
        std::fs::create_dir(dir.path().join(kind)).unwrap();
    }
    let server = Server::start(&dir.path().join("plain"), tweak_for_messages);
    let mut a = RawClient::connect(server.addr);
    let mut b = RawClient::connect(server.addr);
    log_in(&mut a);
    let to = log_in(&mut b);
    let plain = exchange(&server, &mut a, &mut b, to);
    drop((a, b, server));

    let server = Server::start(&dir.path().join("native"), tweak_for_messages);
    let noise = |addr| {
        RawClient::noise(addr, &StaticKeypair::generate(), None)
            .unwrap()
            .0
    };
    let (mut a, mut b) = (noise(server.addr), noise(server.addr));
    log_in(&mut a);
    let to = log_in(&mut b);
    let native = exchange(&server, &mut a, &mut b, to);
    drop((a, b, server));

    let ca = TestCa::new();
    let cert = dir.path().join("wss.crt");
    let key = dir.path().join("wss.key");
    ca.leaf("cpu").write(&cert, &key);
    let server = Server::start(&dir.path().join("wss"), |c| {
        tweak_for_messages(c);
        c.wss.enabled = true;
        c.wss.cert_path = cert.clone();
        c.wss.key_path = key.clone();
    });
    let config = ca.client_config();
    let ws = |addr| {
        WsClient::noise(addr, &config, &StaticKeypair::generate(), None)
            .unwrap()
            .0
    };
    let wss_addr = server.wss.unwrap();
    let (mut a, mut b) = (ws(wss_addr), ws(wss_addr));
    log_in(&mut a);
    let to = log_in(&mut b);
    let wss = exchange(&server, &mut a, &mut b, to);

    for (kind, (us, rate)) in [("plaintext", plain), ("native Noise", native), ("WSS", wss)] {
        println!("{kind:>13}: server CPU {us:.1} µs per message, {rate:.0} msg/s (one pair, batches of 32)");
    }
}
