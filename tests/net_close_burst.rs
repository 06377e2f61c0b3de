//! Bursts of connections that the server closes (or that vanish) all at
//! once, against the real binary over real sockets, on 1 and 2 shards:
//! silent handshakes left to the handshake timeout, a slowloris dribbling a
//! length prefix, authenticated sessions left to the idle timeout, and a
//! storm of connects reset by their clients. Through each burst a session
//! that keeps pinging must get every Pong within a second, and afterwards a
//! new Register is answered and `/readyz` still says ready.
//!
//! These guard an outage: a shard's socket loop once parked for good when
//! 64 or more connections were closed by the server together (a wake-up
//! lost between the socket ring's deferred work and its eventfd; see
//! docs/reliability.md).
//!
//! Rounds: `SWITCHBOARD_BURST_ROUNDS` (default 2; the full run uses 20).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{admin_get, hello, metric_sum, Account, RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame};

/// The handshake timeout of these servers, ms.
const HANDSHAKE_TIMEOUT_MS: u32 = 1_000;
/// The idle timeout of these servers, ms.
const IDLE_TIMEOUT_MS: u32 = 3_000;
/// The longest a Pong may take, during a burst or after it.
const PONG_WITHIN: Duration = Duration::from_secs(1);

fn rounds() -> u32 {
    std::env::var("SWITCHBOARD_BURST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

fn start(dir: &std::path::Path, shards: u32) -> Server {
    Server::start(dir, |c| {
        c.server.shards = shards;
        c.limits.connections_per_shard_max = 20_000;
        c.limits.handshake_timeout_ms = HANDSHAKE_TIMEOUT_MS;
        c.limits.idle_timeout_ms = IDLE_TIMEOUT_MS;
    })
}

/// A connection from source address 127.0.0.`host` (spreading sockets over
/// source addresses keeps clear of the ephemeral port range of one).
fn connect_from(host: u8, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let source = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, host), 0));
    bind(fd.as_raw_fd(), &source).expect("bind a loopback source address");
    let SocketAddr::V4(to) = to else {
        panic!("the test server listens on IPv4")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    TcpStream::from(fd)
}

/// `count` connections from many source addresses.
fn open_many(to: SocketAddr, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|i| connect_from(2 + (i % 200) as u8, to))
        .collect()
}

/// A logged-in session that pings every 50 ms on its own thread and fails
/// the test if a Pong takes longer than `PONG_WITHIN`.
struct Pinger {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, Duration)>,
}

impl Pinger {
    fn start(addr: SocketAddr, account: &Account) -> Pinger {
        let (mut client, _) = RawClient::login(addr, account);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut nonce = 0u64;
            // Bounded: it stops when told, and the test's own bound is
            // minutes, so at most a few thousand pings.
            while !stopping.load(Ordering::Relaxed) && nonce < 100_000 {
                nonce += 1;
                let sent = Instant::now();
                client.send(&Frame::Ping(pb::Ping { nonce }));
                match client.recv_timeout(PONG_WITHIN) {
                    Some(Frame::Pong(pong)) => assert_eq!(pong.nonce, nonce),
                    other => panic!("ping {nonce}: expected Pong, got {other:?}"),
                }
                worst = worst.max(sent.elapsed());
                std::thread::sleep(Duration::from_millis(50));
            }
            (nonce, worst)
        });
        Pinger { stop, thread }
    }

    /// Stops pinging; returns the pings answered and the slowest Pong.
    fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("every Pong came within a second")
    }
}

/// After a burst: a new connection's Register is answered, `/readyz` is
/// 200, and no shard reports a stall.
fn assert_serving(server: &Server) {
    let mut fresh = RawClient::connect(server.addr);
    fresh.send(&Frame::Register(pb::Register {
        protocol_version: 1,
        registration_token: String::new(),
    }));
    match fresh.recv_timeout(Duration::from_secs(2)) {
        Some(Frame::Registered(_)) => {}
        other => panic!("expected Registered after the burst, got {other:?}"),
    }
    let (status, body) = admin_get(server.admin, "/readyz");
    assert_eq!(status, 200, "readyz after the burst: {body}");
    let (_, metrics) = admin_get(server.admin, "/metrics");
    let stalled = metric_sum(&metrics, "switchboard_shard_stalled_seconds", "");
    assert!(stalled < 1.0, "a shard reports a stall of {stalled} s");
}

/// Reads until the server closes `stream`; true if it said `code` first.
fn closed_with(stream: &mut TcpStream, code: ErrorCode, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept a connection open: {e}"),
        }
    }
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    matches!(
        switchboard::proto::next_frame(&mut buf, 1 << 20),
        Ok(Some(Frame::Error(e))) if e.code == code as i32
    )
}

fn silent_handshakes(shards: u32, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), shards);
    let account = RawClient::register(server.addr);
    let pinger = Pinger::start(server.addr, &account);
    for round in 0..rounds() {
        let mut silent = open_many(server.addr, count);
        std::thread::sleep(Duration::from_millis(u64::from(HANDSHAKE_TIMEOUT_MS)));
        for (i, stream) in silent.iter_mut().enumerate() {
            assert!(
                closed_with(stream, ErrorCode::HandshakeTimeout, Duration::from_secs(5)),
                "round {round}: silent connection {i} of {count} was not timed out"
            );
        }
        drop(silent);
        assert_serving(&server);
    }
    let (pings, worst) = pinger.finish();
    eprintln!(
        "{shards} shard(s), {count} silent × {}: {pings} pings, slowest Pong {worst:?}",
        rounds()
    );
}

#[test]
fn silent_handshakes_timing_out_together_leave_every_shard_serving() {
    for shards in [1, 2] {
        for count in [100, 1_000, 10_000] {
            silent_handshakes(shards, count);
        }
    }
}

#[test]
fn a_slowloris_dribbling_a_length_prefix_is_timed_out_and_the_shard_serves() {
    for shards in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), shards);
        let account = RawClient::register(server.addr);
        let pinger = Pinger::start(server.addr, &account);
        for round in 0..rounds() {
            let mut dribblers = open_many(server.addr, 200);
            // One byte per connection every 250 ms: a 16-byte frame that
            // would take 5 s, against a 1 s handshake timeout. Bounded at
            // 20 ticks; the server should have closed them all long before.
            let frame = [
                0u8, 0, 0, 16, 1, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ];
            let started = Instant::now();
            for tick in 0..20 {
                for stream in &mut dribblers {
                    // A write to a socket the server closed fails; the
                    // read below checks how it was closed.
                    let _ = stream.write_all(&frame[tick..tick + 1]);
                }
                if started.elapsed() > Duration::from_millis(u64::from(HANDSHAKE_TIMEOUT_MS) * 2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            for (i, stream) in dribblers.iter_mut().enumerate() {
                assert!(
                    closed_with(stream, ErrorCode::HandshakeTimeout, Duration::from_secs(5)),
                    "{shards} shard(s), round {round}: dribbler {i} was not timed out"
                );
            }
            assert_serving(&server);
        }
        let (pings, worst) = pinger.finish();
        eprintln!("{shards} shard(s), slowloris: {pings} pings, slowest Pong {worst:?}");
    }
}

#[test]
fn idle_sessions_closed_together_leave_every_shard_serving() {
    for shards in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), shards);
        let accounts: Vec<Account> = (0..300).map(|_| RawClient::register(server.addr)).collect();
        let pinger = Pinger::start(server.addr, &RawClient::register(server.addr));
        for round in 0..rounds() {
            // Logged in within a few hundred ms of each other, then silent:
            // the idle sweep finds them all in one pass.
            let mut sessions: Vec<RawClient> = accounts
                .iter()
                .map(|account| {
                    let mut client = RawClient::connect(server.addr);
                    client.send(&hello(account));
                    client
                })
                .collect();
            for client in &mut sessions {
                match client.recv_timeout(Duration::from_secs(5)) {
                    Some(Frame::Welcome(_)) => {}
                    other => panic!("expected Welcome, got {other:?}"),
                }
            }
            std::thread::sleep(Duration::from_millis(u64::from(IDLE_TIMEOUT_MS)));
            for (i, client) in sessions.iter_mut().enumerate() {
                assert!(
                    closed_with(
                        &mut client.stream,
                        ErrorCode::IdleTimeout,
                        Duration::from_secs(5)
                    ),
                    "{shards} shard(s), round {round}: idle session {i} was not closed"
                );
            }
            assert_serving(&server);
        }
        let (pings, worst) = pinger.finish();
        eprintln!("{shards} shard(s), 300 idle sessions: {pings} pings, slowest Pong {worst:?}");
    }
}

#[test]
fn a_storm_of_connects_reset_by_their_clients_leaves_every_shard_serving() {
    for shards in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), shards);
        let account = RawClient::register(server.addr);
        let pinger = Pinger::start(server.addr, &account);
        for _ in 0..rounds() {
            let storm = open_many(server.addr, 2_000);
            for (i, stream) in storm.iter().enumerate() {
                // Half of them have started a frame; all end with a reset.
                if i % 2 == 0 {
                    let _ = (&*stream).write_all(&[0, 0, 0, 9, 1]);
                }
                nix::sys::socket::setsockopt(
                    stream,
                    nix::sys::socket::sockopt::Linger,
                    &nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                )
                .expect("SO_LINGER 0");
            }
            drop(storm);
            std::thread::sleep(Duration::from_millis(200));
            assert_serving(&server);
        }
        // Every reset socket is gone from the server.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, metrics) = admin_get(server.admin, "/metrics");
            // The pinger's session is the one socket left.
            let open = metric_sum(&metrics, "switchboard_sockets", "");
            if open <= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} connections still open after the resets"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (pings, worst) = pinger.finish();
        eprintln!("{shards} shard(s), reset storm: {pings} pings, slowest Pong {worst:?}");
    }
}
