//! Memory and syscalls of the native socket driver, measured (ignored by
//! default; run with `--ignored --nocapture`, see docs/uring.md).
//!
//! The clients run in a child process (this test binary again) so the
//! server process's RSS holds only the server side, and so each process
//! stays under the open-file limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::LocalExecutorBuilder;
use switchboard::net::uring::{Driver, DriverConfig, Event, SetupMode};

const CLIENT_ENV: &str = "SWITCHBOARD_URING_CLIENT";

fn listener(backlog: i32) -> (OwnedFd, SocketAddr) {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReusePort, &true).expect("reuseport");
    setsockopt(&fd, sockopt::TcpNoDelay, &true).expect("nodelay");
    let addr = SockaddrIn::new(127, 0, 0, 1, 0);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("bind");
    let _ = backlog;
    listen(&fd, Backlog::MAXCONN).expect("listen");
    let local: SockaddrIn =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).expect("name");
    (fd, SocketAddr::from((local.ip(), local.port())))
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .expect("value")
        .parse()
        .expect("number");
    kb * 1024
}

fn slab_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))
        .expect("Slab");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .expect("value")
        .parse()
        .expect("number");
    kb * 1024
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The client side, run in the child process: opens the connections, sends
/// one frame on each and reads its echo, reports, then holds them until
/// its stdin closes.
#[test]
#[ignore]
fn client_process() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut parts = spec.split(',');
    let addr: SocketAddr = parts.next().expect("addr").parse().expect("addr");
    let count: usize = parts.next().expect("count").parse().expect("count");
    let messages: usize = parts.next().expect("messages").parse().expect("messages");
    let hello = frame(&[0x03; 40]);
    let mut socks = Vec::with_capacity(count);
    for _ in 0..count {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        socks.push(sock);
    }
    for sock in &mut socks {
        sock.write_all(&hello).expect("hello");
    }
    let mut back = vec![0u8; hello.len()];
    for sock in &mut socks {
        sock.read_exact(&mut back).expect("welcome");
    }
    println!("idle");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    // Then `messages` round trips on the first connection (syscall count).
    let ping = frame(&[0x20; 100]);
    let mut reply = vec![0u8; ping.len()];
    for _ in 0..messages {
        socks[0].write_all(&ping).expect("ping");
        socks[0].read_exact(&mut reply).expect("pong");
    }
    println!("done");
    let _ = std::io::stdin().read_line(&mut line);
    // Then a burst: 200 connections send 50 frames each at once, then read
    // their echoes (many connections per loop turn).
    let burst: Vec<u8> = (0..50).flat_map(|_| ping.clone()).collect();
    let active = socks.len().min(200);
    for sock in &mut socks[..active] {
        sock.write_all(&burst).expect("burst");
    }
    let mut echo = vec![0u8; burst.len()];
    for sock in &mut socks[..active] {
        sock.read_exact(&mut echo).expect("burst echo");
    }
    println!("burst {}", active * 50);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn measure(count: usize, messages: usize) {
    let exe = std::env::current_exe().expect("exe");
    LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async move {
            let rss_start = rss_bytes();
            let mut config = DriverConfig::production();
            config.ring_mode_max = match std::env::var("URING_RING_MODE").as_deref() {
                Ok("coop") => SetupMode::CoopTaskrun,
                Ok("plain") => SetupMode::Plain,
                _ => SetupMode::DeferTaskrun,
            };
            let mut driver = Driver::new(config).expect("driver");
            println!("ring mode: {:?}", driver.setup_mode());
            let (fd, addr) = listener(4096);
            driver.listen(fd).expect("listen");
            let mut events = Vec::new();
            driver.poll_events(&mut events).expect("poll");
            let rss_before = rss_bytes();
            println!(
                "driver fixed cost (rings, populated buffers): {} KiB",
                rss_before.saturating_sub(rss_start) / 1024
            );
            let slab_before = slab_bytes();
            let mut child = Command::new(exe)
                .args(["--ignored", "--exact", "client_process", "--nocapture"])
                .env(CLIENT_ENV, format!("{addr},{count},{messages}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("client process");
            let stdout = child.stdout.take().expect("stdout");
            let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = lines_tx.send(line);
                }
            });
            let notifier = driver.notifier();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut phase = 0;
            let mut enters_idle = 0;
            let mut completions_idle = 0;
            let mut wakeups_idle = 0;
            let mut enters_burst = 0;
            let mut completions_burst = 0;
            let mut burst_messages = 0usize;
            let mut pings = 0usize;
            loop {
                driver.poll_events(&mut events).expect("poll");
                for event in events.drain(..) {
                    if let Event::Data { conn, frames } = event {
                        if enters_idle > 0 && enters_burst == 0 {
                            pings += 1;
                        }
                        let _ = driver.send(conn, Bytes::clone(&frames));
                    }
                }
                while let Ok(line) = lines_rx.try_recv() {
                    if line == "idle" {
                        phase = 1;
                    }
                    if line == "done" {
                        phase = 2;
                    }
                    if let Some(count) = line.strip_prefix("burst ") {
                        phase = 3;
                        burst_messages = count.parse().expect("count");
                    }
                }
                if phase == 1 && enters_idle == 0 {
                    // Let the last echoes go out, then measure.
                    for _ in 0..20 {
                        driver.poll_events(&mut events).expect("poll");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                    assert!(events.is_empty(), "idle: no events");
                    let rss_after = rss_bytes();
                    let slab_after = slab_bytes();
                    assert_eq!(driver.connections(), count);
                    println!(
                        "idle connections: {count}; record: {} B; server RSS: {} B per connection; \
                         kernel slab (both ends of each loopback pair): {} B per pair",
                        Driver::record_bytes(),
                        (rss_after.saturating_sub(rss_before)) / count as u64,
                        (slab_after.saturating_sub(slab_before)) / count as u64,
                    );
                    let stats = driver.stats();
                    enters_idle = stats.enters.max(1);
                    completions_idle = stats.completions;
                    wakeups_idle = stats.eventfd_wakeups;
                    if let Some(stdin) = child.stdin.as_mut() {
                        stdin.write_all(b"go\n").expect("go");
                    }
                }
                if phase == 3 {
                    let stats = driver.stats();
                    let enters = stats.enters - enters_burst;
                    println!(
                        "burst: {burst_messages} frames echoed on 200 connections; \
                         io_uring_enter: {enters} ({:.3} per message); completions: {}",
                        enters as f64 / burst_messages as f64,
                        stats.completions - completions_burst,
                    );
                    break;
                }
                if phase == 2 && enters_burst == 0 {
                    let stats = driver.stats();
                    let enters = stats.enters - enters_idle;
                    println!(
                        "echo round trips: {messages}; io_uring_enter: {enters} ({:.2} per message); \
                         completions: {}; eventfd wake-ups: {}",
                        enters as f64 / messages.max(1) as f64,
                        stats.completions - completions_idle,
                        stats.eventfd_wakeups - wakeups_idle,
                    );
                    enters_burst = stats.enters;
                    completions_burst = stats.completions;
                    if let Some(stdin) = child.stdin.as_mut() {
                        stdin.write_all(b"go\n").expect("go");
                    }
                }
                assert!(Instant::now() < deadline, "timed out");
                if enters_idle > 0 && pings < messages {
                    // The ping-pong: wait on the ring alone (no timer), so
                    // the syscalls counted are the ones a shard would make.
                    notifier.wait().await;
                    continue;
                }
                futures_lite::future::or(
                    notifier.wait(),
                    glommio::timer::sleep(Duration::from_millis(20)),
                )
                .await;
            }
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"\n");
            }
            let _ = child.wait();
        });
}

#[test]
#[ignore]
fn idle_connections_cost_and_syscalls_per_echo() {
    if std::env::var(CLIENT_ENV).is_ok() {
        return;
    }
    let count = std::env::var("URING_IDLE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let messages = std::env::var("URING_PING_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    measure(count, messages);
}
