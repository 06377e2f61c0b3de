//! Shared test harness: runs the real `switchboard` binary on a loopback
//! port with a temporary data directory, and a small blocking client that
//! speaks the wire protocol byte for byte (so tests can also send bytes a
//! well-behaved client never would).
#![allow(dead_code)]

pub mod media;
pub mod store;
pub mod wss;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use switchboard::config::Config;
use switchboard::proto::{self, pb, Frame, PROTOCOL_VERSION};
use switchboard::route::shard_for;

/// A running server process. Killed (SIGKILL) on drop if still running.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin (metrics, health) listener.
    pub admin: SocketAddr,
    /// The media service's listener, when it runs.
    pub media: Option<SocketAddr>,
    /// The server's Noise static public key, when Noise is on.
    pub noise_key: Option<[u8; 32]>,
    /// The WSS (browser) listener, when it runs.
    pub wss: Option<SocketAddr>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up by
/// default). A test server keeps its client port across restarts; a port
/// the kernel handed out itself could meanwhile be taken as the source port
/// of some client's connection, and the restart would fail to listen.
fn port_outside_the_ephemeral_range() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1_000 {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 20,000 and 32,000");
}

impl Server {
    /// Starts a server with `Config::for_tests` bounds, changed by `tweak`.
    pub fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::for_tests(&dir.join("data"));
        tweak(&mut config);
        let config_path = dir.join("switchboard.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let mut server = Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port_outside_the_ephemeral_range())),
            admin: "127.0.0.1:0".parse().unwrap(),
            media: None,
            noise_key: None,
            wss: None,
            dir: dir.to_path_buf(),
            config_path,
            config,
        };
        // The port was free when probed, but another test's server may take
        // it before this one listens; a server that exits before its
        // readiness line gets a fresh port.
        for _ in 0..4 {
            if server.try_launch().is_ok() {
                return server;
            }
            server.addr.set_port(port_outside_the_ephemeral_range());
        }
        server.launch();
        server
    }

    /// Starts the process (again) on the same config and data; a restart
    /// keeps the port it had.
    pub fn launch(&mut self) {
        if let Err(exit) = self.try_launch() {
            panic!("server exited before reporting readiness: {exit}");
        }
    }

    /// `launch`, but a server that exits before its readiness line (its
    /// error is on stderr) is an `Err` with its exit status.
    fn try_launch(&mut self) -> Result<(), String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command.arg("serve").arg("--config").arg(&self.config_path);
        if self.addr.port() != 0 {
            command.arg("--listen").arg(self.addr.to_string());
        }
        let mut child = command
            .env(
                "SWITCHBOARD_LOG",
                std::env::var("TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start switchboard");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining stdout so the server never blocks on it.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some(Ok(line))) => line,
            Ok(None) => return Err(format!("{:?}", child.wait())),
            other => {
                // What each thread waits in, to tell a hang from a slow start,
                // and where each is, when gdb is there to say.
                let threads = thread_states(child.id());
                let stacks = thread_stacks(child.id());
                let _ = child.kill();
                panic!(
                    "server did not report readiness within 30 s: {other:?}; threads:\n{threads}\n{stacks}"
                );
            }
        };
        // "switchboard listening on ADDR with N shards, admin on http://ADDR"
        // and, when the media service runs, ", media on http://ADDR", when
        // the WSS listener runs ", wss on wss://ADDR", and with Noise on
        // ", noise key HEX".
        let words: Vec<&str> = line.split_whitespace().collect();
        let addr = words
            .get(3)
            .unwrap_or_else(|| panic!("unexpected first line: {line}"));
        self.addr = addr.parse().unwrap();
        let after = |label: &str, scheme: &str| {
            words
                .windows(3)
                .find(|w| w[0] == label && w[1] == "on")
                .and_then(|w| w[2].trim_end_matches(',').strip_prefix(scheme))
                .map(|a| a.parse::<SocketAddr>().unwrap())
        };
        self.admin =
            after("admin", "http://").unwrap_or_else(|| panic!("no admin address in: {line}"));
        self.media = after("media", "http://");
        self.wss = after("wss", "wss://");
        self.noise_key = words
            .windows(3)
            .find(|w| w[0] == "noise" && w[1] == "key")
            .map(|w| {
                let key = hex::decode(w[2].trim_end_matches(',')).unwrap();
                key.try_into().unwrap()
            });
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP: the WSS listener reads its certificate files again.
    pub fn sighup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn shards(&self) -> u32 {
        self.config.server.shards
    }

    /// Resident memory of the server process, bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

/// GET `path` from the admin listener; returns (status code, body).
pub fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).expect("connect admin");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read admin response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Sums a metric over its label sets (e.g. every shard) in Prometheus text.
pub fn metric_sum(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && l[name.len()..].starts_with(['{', ' '])
                && l.contains(label_filter)
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// One line per thread of process `pid`: its id, name, state and the
/// kernel function it sleeps in.
fn thread_states(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(gone)".into();
    };
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let mut lines: Vec<String> = tasks
        .flatten()
        .map(|task| {
            let dir = task.path();
            let stat = read(dir.join("stat"));
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').next())
                .unwrap_or("?")
                .to_string();
            format!(
                "{} {} {state} {}",
                task.file_name().to_string_lossy(),
                read(dir.join("comm")),
                read(dir.join("wchan"))
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Every thread's stack of process `pid` from gdb (at most 20 s), or
/// nothing when gdb is not installed.
fn thread_stacks(pid: u32) -> String {
    let output = Command::new("timeout")
        .args(["20", "gdb", "-batch", "-p", &pid.to_string()])
        .args(["-ex", "thread apply all bt 25"])
        .stdin(Stdio::null())
        .output();
    match output {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => String::new(),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Credentials returned by Register.
#[derive(Clone, Debug)]
pub struct Account {
    pub user: u64,
    pub device: u32,
    pub secret: Bytes,
}

/// A blocking wire-protocol client, plaintext or (after
/// [`RawClient::noise`]) sealed with Noise.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    pub frame_bytes_max: u32,
    noise: Option<NoiseIo>,
}

/// A Noise client's transport and its unopened input.
struct NoiseIo {
    transport: switchboard::noise::Transport,
    input: BytesMut,
}

/// What a Noise handshake told the client.
#[allow(dead_code)]
pub struct NoiseHandshake {
    /// The server's static key the handshake authenticated.
    pub server_key: [u8; 32],
    /// The current key, when an IK to the previous one announced it.
    pub rotated: Option<[u8; 32]>,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A server that stops reading must fail the test, not hang it.
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawClient {
            stream,
            buf: BytesMut::new(),
            frame_bytes_max: 16 << 20,
            noise: None,
        }
    }

    /// Connects and runs a Noise handshake as `client`: IK to `server_key`
    /// when given, else XX. Err when the server closes before its handshake
    /// message (a wrong key for IK, a refused handshake).
    #[allow(dead_code)]
    pub fn noise(
        addr: SocketAddr,
        client: &switchboard::noise::StaticKeypair,
        server_key: Option<&[u8; 32]>,
    ) -> Result<(RawClient, NoiseHandshake), String> {
        use switchboard::noise::Initiator;
        let mut c = RawClient::connect(addr);
        let (mut initiator, opening) = match server_key {
            Some(key) => Initiator::ik(client, key, &[]),
            None => Initiator::xx(client, &[]),
        }
        .unwrap();
        c.stream.write_all(&opening).map_err(|e| e.to_string())?;
        let message = c.read_noise_message()?;
        let third = initiator
            .read_message(&message)
            .map_err(|e| e.to_string())?;
        if let Some(third) = third {
            c.stream.write_all(&third).map_err(|e| e.to_string())?;
        }
        let handshake = NoiseHandshake {
            server_key: initiator.server_static().unwrap(),
            rotated: initiator.rotated_server_key(),
        };
        let transport = initiator.into_transport().map_err(|e| e.to_string())?;
        let input = std::mem::take(&mut c.buf);
        c.noise = Some(NoiseIo { transport, input });
        Ok((c, handshake))
    }

    /// Reads one length-prefixed Noise handshake message (its body).
    fn read_noise_message(&mut self) -> Result<Bytes, String> {
        loop {
            let next = switchboard::noise::wire::next_message(&mut self.buf, 65_535)
                .map_err(|e| e.to_string())?;
            if let Some(message) = next {
                return Ok(message);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("closed before the server's handshake message".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    pub fn send(&mut self, frame: &Frame) {
        self.send_bytes(&frame.to_bytes()).expect("write frame");
    }

    /// Writes bytes of the frame stream (sealed first on a Noise client).
    pub fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.noise.as_mut() {
            Some(noise) => {
                let mut sealed = BytesMut::new();
                noise.transport.seal(bytes, &mut sealed).unwrap();
                self.stream.write_all(&sealed)
            }
            None => self.stream.write_all(bytes),
        }
    }

    /// The next frame, or None on a clean close (EOF or reset).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) =
                proto::next_frame(&mut self.buf, self.frame_bytes_max).expect("server frame")
            {
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no frame from the server within {timeout:?}"
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => match self.noise.as_mut() {
                    Some(noise) => {
                        noise.input.extend_from_slice(&chunk[..n]);
                        noise
                            .transport
                            .open(&mut noise.input, &mut self.buf)
                            .expect("the server's transport messages open");
                    }
                    None => self.buf.extend_from_slice(&chunk[..n]),
                },
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    pub fn recv(&mut self) -> Option<Frame> {
        self.recv_timeout(Duration::from_secs(10))
    }

    /// Asserts the server closes the connection (after any frames).
    pub fn expect_closed(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.recv_timeout(Duration::from_secs(10)) {
                None => return,
                Some(_) => continue,
            }
        }
        panic!("server kept the connection open");
    }

    /// Expects an Error frame with `code`; returns it.
    pub fn expect_error(&mut self, code: proto::ErrorCode) -> pb::Error {
        match self.recv() {
            Some(Frame::Error(e)) => {
                assert_eq!(e.code, code as i32, "unexpected error: {e:?}");
                e
            }
            other => panic!("expected Error {code:?}, got {other:?}"),
        }
    }

    pub fn register(addr: SocketAddr) -> Account {
        let mut c = RawClient::connect(addr);
        c.send(&register_frame());
        match c.recv() {
            Some(Frame::Registered(r)) => Account {
                user: r.user_id,
                device: r.device_id,
                secret: r.secret,
            },
            other => panic!("expected Registered, got {other:?}"),
        }
    }

    /// Registers until an account homed on `shard` comes up.
    pub fn register_on_shard(addr: SocketAddr, shard: u32, shards: u32) -> Account {
        for _ in 0..64 {
            let account = RawClient::register(addr);
            if shard_for(account.user, shards).0 == shard {
                return account;
            }
        }
        panic!("no account landed on shard {shard}");
    }

    /// Connects and authenticates; returns the client and the Welcome.
    pub fn login(addr: SocketAddr, account: &Account) -> (RawClient, pb::Welcome) {
        let mut c = RawClient::connect(addr);
        c.send(&hello(account));
        match c.recv() {
            Some(Frame::Welcome(w)) => (c, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub fn send_message(&mut self, to: u64, id: u64, payload: &[u8]) {
        self.send(&Frame::Send(pb::Send {
            client_message_id: id,
            recipient_user_id: to,
            payload: Bytes::copy_from_slice(payload),
            device_payloads: vec![],
            ..Default::default()
        }));
    }

    pub fn ack(&mut self, up_to: u64) {
        self.send(&Frame::Ack(pb::Ack {
            up_to_sequence: up_to,
            sequences: vec![],
        }));
    }

    /// Receives until `n` ServerAcks arrived; returns them (other frames
    /// are returned in the second vector).
    pub fn collect_acks(&mut self, n: usize) -> (Vec<pb::ServerAck>, Vec<Frame>) {
        let mut acks = Vec::new();
        let mut others = Vec::new();
        while acks.len() < n {
            match self.recv() {
                Some(Frame::ServerAck(a)) => acks.push(a),
                Some(other) => others.push(other),
                None => panic!("closed after {} of {n} acks", acks.len()),
            }
        }
        (acks, others)
    }

    /// Receives `n` messages, acknowledging each as it comes (the delivery
    /// window is small in tests); their client ids in delivery order.
    pub fn receive_and_ack(&mut self, n: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let d = self.collect_delivers(1).remove(0);
            ids.push(d.client_message_id);
            self.ack(d.sequence);
        }
        ids
    }

    /// Receives until `n` Deliver frames arrived.
    pub fn collect_delivers(&mut self, n: usize) -> Vec<pb::Deliver> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.recv() {
                Some(Frame::Deliver(d)) => out.push(d),
                Some(_) => {}
                None => panic!("closed after {} of {n} deliveries", out.len()),
            }
        }
        out
    }
}

/// A Register with no token.
pub fn register_frame() -> Frame {
    Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: String::new(),
    })
}

/// A Hello over Noise: `secret` empty (the key logs in), or a plaintext
/// device's secret to bind the connection's key.
#[allow(dead_code)]
pub fn noise_hello(user: u64, device: u32, secret: &[u8]) -> Frame {
    Frame::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        user_id: user,
        device_id: device,
        secret: Bytes::copy_from_slice(secret),
    })
}

pub fn hello(account: &Account) -> Frame {
    Frame::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        user_id: account.user,
        device_id: account.device,
        secret: account.secret.clone(),
    })
}

/// Payload bytes of each message `backlog_of_large_messages` stores.
pub const LARGE_PAYLOAD: usize = 60_000;

/// A one-shard server that takes 60 KB payloads, with a delivery window of
/// `window` messages (16 MiB) and a 128 KiB output bound, and an inbox for a
/// new account holding `window` such messages (7.7 MB for 128) from
/// another; returns the server and the recipient's account.
#[allow(dead_code)]
pub fn backlog_of_large_messages(dir: &Path, window: u64) -> (Server, Account) {
    let server = Server::start(dir, |c| {
        c.server.shards = 1;
        c.limits.payload_bytes_max = 65_536;
        c.limits.frame_bytes_max = 65_536 + 512;
        c.limits.delivery_window_messages = window as u32;
        c.limits.delivery_window_bytes = 16 << 20;
        c.limits.output_queue_bytes_max = 128 << 10;
        c.store.segment_size_bytes = 4 << 20;
    });
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let payload = vec![7u8; LARGE_PAYLOAD];
    for id in 1..=window {
        a.send_message(bob.user, id, &payload);
        // Eight unanswered Sends are the test bound.
        if id % 8 == 0 {
            a.collect_acks(8);
        }
    }
    (server, bob)
}

/// A `switchboard chat` process with its output read line by line.
pub struct Chat {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Chat {
    pub fn start(addr: SocketAddr, args: &[&str]) -> Chat {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("chat")
            .arg("--server")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chat");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Chat {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn type_line(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The first line (from now on) containing `needle`.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; saw {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
