//! The `media` scenario: what the media service moves, what the disk under
//! it could move, and what an upload in flight costs the server.
//!
//! - Throughput: for each `--blob SIZE:COUNT`, COUNT blobs are uploaded
//!   (`POST /v1/uploads`, then PATCHes until the service answers
//!   `complete`) and then downloaded (`GET /v1/blobs/ID` to the last byte),
//!   one at a time on one stream, and again on `--streams` streams at once.
//!   Each transfer is timed from the client, its TCP connect included.
//! - The disk (`--data-dir`, the server's data directory): `dd` writes each
//!   size with `conv=fdatasync` and reads it back with `iflag=direct` (the
//!   device) and without (the page cache), on the filesystem the service
//!   stores on, in the same run.
//! - Memory per upload in flight: `--in-flight` connections each begin an
//!   upload and hold a PATCH whose body stops short of its Content-Length;
//!   the server's RSS over its baseline, per upload. Then all close and
//!   `/healthz` must answer 200.
//!
//! Grants come over the chat port on blocking sockets (Register, Hello,
//! RequestMediaGrant), from devices this run registers: each device begins
//! at most `--uploads-per-device` uploads and `--bytes-per-device` bytes,
//! under the service's per-device limits, so the defaults work against a
//! server on its default config. The HTTP side is a small HTTP/1.1 client
//! on blocking sockets, written here so that the bytes go from the blob's
//! buffer to the socket and from the socket into a buffer sized once, with
//! nothing else on the path (`--client library` runs the client library
//! instead, `switchboard::client::media`, to compare).
//!
//! Runs on the main thread, and on one scoped thread per stream in
//! a parallel pass. Every loop is bounded in count, every socket operation
//! by `--timeout`, and the whole run by `--run-timeout`.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use switchboard::client::media::Sealed;
use switchboard::proto::{next_frame, pb, Frame, MediaGrantKind, PROTOCOL_VERSION};

use crate::link::{Protocol, Target};
use crate::{cpu, limits, report, sysmem};

/// Frame limit until Welcome announces the server's (the protocol default).
const FRAME_BYTES_DEFAULT: u32 = 66_560;
/// Grant requests written on one chat connection before their answers are
/// read: well under the server's 256 unanswered requests per connection.
const GRANTS_PER_CONNECTION_MAX: usize = 64;
/// Largest HTTP response head (status line and headers) accepted.
const RESPONSE_HEAD_BYTES_MAX: usize = 64 * 1024;
/// Largest JSON or error body read from the service.
const SMALL_BODY_BYTES_MAX: u64 = 64 * 1024;
/// Longest chunk-size line of a chunked body.
const CHUNK_LINE_BYTES_MAX: usize = 1024;
/// The HTTP read buffer: a response head, the first bytes of a body.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Leading bytes of a blob that differ from blob to blob (a random value
/// each): the rest of a stream's blobs is one random buffer, so a run
/// fills and hashes each size once per stream, yet every blob is new to
/// the service (an upload of a stored blob ends at the POST).
const UNIQUE_PREFIX_BYTES: usize = 16;
/// The server's RSS is still when it moved at most this much over
/// [`RSS_STILL_INTERVAL`]; it is waited for at most [`RSS_STILL_WAIT_MAX`].
const RSS_STILL_BYTES: u64 = 64 * 1024;
const RSS_STILL_INTERVAL: Duration = Duration::from_millis(500);
const RSS_STILL_WAIT_MAX: Duration = Duration::from_secs(10);
/// The service stops waiting for a PATCH body that pauses this long and
/// answers (its `BODY_IDLE_TIMEOUT`): held uploads are sampled before.
const SERVICE_BODY_IDLE: Duration = Duration::from_secs(30);
/// Descriptors kept for everything but the held uploads.
const SPARE_FDS: u64 = 100;
/// `dd` block size for blobs of at least this size.
const DD_BLOCK_BYTES: u64 = 1 << 20;
/// Longest one `dd` may run.
const DD_TIMEOUT: Duration = Duration::from_secs(120);

/// Which HTTP client moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientKind {
    /// This module's HTTP/1.1 client: `--chunk-bytes` per PATCH, a
    /// download read into one buffer, its SHA-256 checked after the clock.
    Raw,
    /// `switchboard::client::media` (ureq): 1 MiB per PATCH, every
    /// download hashed on the clock, as an app would.
    Library,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Raw => "raw",
            ClientKind::Library => "library",
        }
    }
}

/// COUNT blobs of SIZE bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobSpec {
    pub size_bytes: u64,
    pub count: u32,
}

/// `1048576`, `64K`, `1M`, `2G` (binary units).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_uppercase()),
        _ => (text, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("{text:?}: the unit is K, M or G")),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count like 65536, 64K, 1M"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `SIZE:COUNT`, e.g. `1M:50`.
pub fn parse_blob_spec(text: &str) -> Result<BlobSpec, String> {
    let (size, count) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not SIZE:COUNT (e.g. 1M:50)"))?;
    let size_bytes = parse_bytes(size)?;
    let count: u32 = count
        .parse()
        .map_err(|_| format!("{text:?}: COUNT is not a number"))?;
    if size_bytes < UNIQUE_PREFIX_BYTES as u64 || count == 0 {
        return Err(format!(
            "{text:?}: blobs of at least {UNIQUE_PREFIX_BYTES} bytes, at least one"
        ));
    }
    Ok(BlobSpec { size_bytes, count })
}

#[derive(Args, Clone)]
pub struct MediaArgs {
    /// The chat port grants are asked on: `switchboard://IP:PORT` or
    /// `IP:PORT`. The media service's address comes in the grants.
    #[arg(long, default_value = "127.0.0.1:7700")]
    target: String,
    /// Blobs moved per size, `SIZE:COUNT` (SIZE in bytes or with K, M, G).
    /// Repeatable.
    #[arg(long = "blob", value_parser = parse_blob_spec, default_values = ["1M:50", "64M:5"])]
    blobs: Vec<BlobSpec>,
    /// Streams of the parallel pass, each moving every `--blob` set; 0 or
    /// 1: the single-stream pass only.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Bytes per PATCH request (`--client raw`).
    #[arg(long, value_parser = parse_bytes, default_value = "1M")]
    chunk_bytes: u64,
    /// The HTTP client that moves the bytes.
    #[arg(long, value_enum, default_value_t = ClientKind::Raw)]
    client: ClientKind,
    /// Uploads held in flight for the memory measurement; 0: none.
    #[arg(long, default_value_t = 1000)]
    in_flight: u32,
    /// Each held upload's size, and its PATCH's Content-Length.
    #[arg(long, value_parser = parse_bytes, default_value = "1M")]
    in_flight_announced_bytes: u64,
    /// Bytes of the PATCH body each held upload sends before it stops.
    #[arg(long, value_parser = parse_bytes, default_value = "64K")]
    in_flight_sent_bytes: u64,
    /// The server's data directory: `dd` writes and reads files of each
    /// `--blob` size in a directory made there (and removed after).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Uploads one registered device begins before the next device is
    /// used (the service allows `media.device_uploads_per_minute`, 60 by
    /// default, a minute, and `media.device_uploads_in_flight_max`, 32,
    /// unfinished at once).
    #[arg(long, default_value_t = 30)]
    uploads_per_device: u32,
    /// Bytes one registered device uploads before the next device is used
    /// (the service allows `media.device_bytes_per_day`, 2 GiB by default).
    #[arg(long, value_parser = parse_bytes, default_value = "1G")]
    bytes_per_device: u64,
    /// The server's pid (memory and CPU); found from the media listener's
    /// port when not given.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Bound on every wait: a connect, an answer, each read and write (s).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Bound on the whole run (s).
    #[arg(long, default_value_t = 900.0)]
    run_timeout: f64,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

/// What every phase needs.
struct Bounds {
    timeout: Duration,
    deadline: Instant,
    quiet: bool,
}

impl Bounds {
    fn check_deadline(&self, what: &str) -> anyhow::Result<()> {
        if Instant::now() >= self.deadline {
            bail!("{what}: the run went past --run-timeout");
        }
        Ok(())
    }

    fn progress(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

/// The scenario. `machine` describes the host (as the other scenarios).
pub fn run(args: &MediaArgs, machine: Value) -> anyhow::Result<()> {
    let target = Target::parse(&args.target)?;
    if target.protocol != Protocol::Switchboard {
        bail!("the media scenario asks a Switchboard server for grants, not an MQTT broker");
    }
    if args.chunk_bytes == 0 {
        bail!("--chunk-bytes must be positive");
    }
    if args.in_flight > 0 && args.in_flight_sent_bytes >= args.in_flight_announced_bytes {
        bail!("--in-flight-sent-bytes must be below --in-flight-announced-bytes");
    }
    let ctx = Bounds {
        timeout: Duration::from_secs_f64(args.timeout),
        deadline: Instant::now() + Duration::from_secs_f64(args.run_timeout),
        quiet: args.quiet,
    };
    let mut grants = Grants {
        server: target.server,
        timeout: ctx.timeout,
        uploads_per_device: args.uploads_per_device.max(1),
        bytes_per_device: args.bytes_per_device,
        devices: Vec::new(),
        next_request: 1,
    };
    // A grant that is never used tells where the service listens.
    let probe = grants.uploads(&[1], &ctx)?.remove(0);
    let service = Service::parse(&probe.url)?;
    let server_pid = args
        .server_pid
        .or_else(|| sysmem::find_listener_pid(service.addr));
    if server_pid.is_none() {
        eprintln!("server pid not found (pass --server-pid); memory and CPU are not sampled");
    }
    ctx.progress(&format!(
        "media service at {} (server pid {server_pid:?})",
        service.url
    ));

    let in_flight = if args.in_flight > 0 {
        Some(in_flight(args, &ctx, &mut grants, &service, server_pid)?)
    } else {
        None
    };
    let mut passes = Vec::new();
    let mut streams_list = vec![1];
    if args.streams > 1 {
        streams_list.push(args.streams);
    }
    for &streams in &streams_list {
        for spec in &args.blobs {
            passes.push(pass(
                args,
                &ctx,
                &mut grants,
                &service,
                server_pid,
                *spec,
                streams,
            )?);
        }
    }
    let disk = match &args.data_dir {
        Some(dir) => Some(disk(dir, &args.blobs, &ctx)?),
        None => None,
    };
    let rss_bytes = sysmem::sample(server_pid)?.server_rss_bytes;
    let out = json!({
        "scenario": "media",
        "target": target.url(),
        "media_url": service.url,
        "machine": machine,
        "client": args.client.name(),
        "chunk_bytes": if args.client == ClientKind::Raw { json!(args.chunk_bytes) } else {
            json!(switchboard::client::media::UPLOAD_CHUNK_BYTES) },
        "server": {"pid": server_pid, "rss_bytes": server_pid.map(|_| rss_bytes)},
        "grants": {"devices": grants.devices.len(), "requests": grants.next_request - 1},
        "transfers": passes,
        "disk": disk,
        "in_flight": in_flight,
    });
    print!("{}", summary(&out));
    if let Some(path) = &args.json {
        report::write_json(path, &out)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Grants over the chat port.

/// A device this run registered, and what it may still begin under the
/// service's per-device limits.
struct Device {
    user_id: u64,
    device_id: u32,
    secret: Bytes,
    uploads_left: u32,
    bytes_left: u64,
}

/// Asks the chat server for media grants, registering devices as needed.
struct Grants {
    server: SocketAddr,
    timeout: Duration,
    uploads_per_device: u32,
    bytes_per_device: u64,
    devices: Vec<Device>,
    next_request: u64,
}

impl Grants {
    /// Registers a new account; its device's index.
    fn register(&mut self, ctx: &Bounds) -> anyhow::Result<usize> {
        let mut chat = Chat::connect(self.server, self.timeout)?;
        chat.send(&[Frame::Register(pb::Register {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })])?;
        let registered = match chat.receive(ctx)? {
            Frame::Registered(r) => r,
            other => bail!("{} answered Register with {other:?}", self.server),
        };
        self.devices.push(Device {
            user_id: registered.user_id,
            device_id: registered.device_id,
            secret: registered.secret,
            uploads_left: self.uploads_per_device,
            bytes_left: self.bytes_per_device,
        });
        Ok(self.devices.len() - 1)
    }

    /// A logged-in connection of device `index`.
    fn login(&self, index: usize, ctx: &Bounds) -> anyhow::Result<Chat> {
        let device = &self.devices[index];
        let mut chat = Chat::connect(self.server, self.timeout)?;
        chat.send(&[Frame::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            user_id: device.user_id,
            device_id: device.device_id,
            secret: device.secret.clone(),
        })])?;
        match chat.receive(ctx)? {
            Frame::Welcome(welcome) => chat.frame_bytes_max = welcome.max_frame_bytes,
            other => bail!("{} answered Hello with {other:?}", self.server),
        }
        Ok(chat)
    }

    /// Upload grants for blobs of `sizes`, in order. Each comes from a
    /// device with allowance left, a new one when none has.
    fn uploads(&mut self, sizes: &[u64], ctx: &Bounds) -> anyhow::Result<Vec<pb::MediaGrant>> {
        let mut per_device: Vec<(usize, Vec<(usize, pb::RequestMediaGrant)>)> = Vec::new();
        for (slot, &size) in sizes.iter().enumerate() {
            if size > self.bytes_per_device {
                bail!("a blob of {size} bytes is more than --bytes-per-device");
            }
            let usable = self
                .devices
                .last()
                .is_some_and(|d| d.uploads_left > 0 && d.bytes_left >= size);
            let index = if usable {
                self.devices.len() - 1
            } else {
                self.register(ctx)?
            };
            let device = &mut self.devices[index];
            device.uploads_left -= 1;
            device.bytes_left -= size;
            let request = pb::RequestMediaGrant {
                request_id: self.next_request,
                kind: MediaGrantKind::Upload as i32,
                size,
                ..Default::default()
            };
            self.next_request += 1;
            match per_device.last_mut() {
                Some((i, requests)) if *i == index => requests.push((slot, request)),
                _ => per_device.push((index, vec![(slot, request)])),
            }
        }
        let mut out = vec![None; sizes.len()];
        for (index, requests) in per_device {
            self.ask(index, requests, &mut out, ctx)?;
        }
        Ok(out
            .into_iter()
            .map(|g| g.expect("every request is answered or fails"))
            .collect())
    }

    /// Download grants for `blobs`, in order, all from one device.
    fn downloads(
        &mut self,
        blobs: &[[u8; 32]],
        ctx: &Bounds,
    ) -> anyhow::Result<Vec<pb::MediaGrant>> {
        let index = match self.devices.len() {
            0 => self.register(ctx)?,
            n => n - 1,
        };
        let mut requests = Vec::new();
        for (slot, blob) in blobs.iter().enumerate() {
            requests.push((
                slot,
                pb::RequestMediaGrant {
                    request_id: self.next_request,
                    kind: MediaGrantKind::Download as i32,
                    blob_id: Bytes::copy_from_slice(blob),
                    ..Default::default()
                },
            ));
            self.next_request += 1;
        }
        let mut out = vec![None; blobs.len()];
        self.ask(index, requests, &mut out, ctx)?;
        Ok(out
            .into_iter()
            .map(|g| g.expect("every request is answered or fails"))
            .collect())
    }

    /// Sends `requests` on connections of device `index`, at most
    /// [`GRANTS_PER_CONNECTION_MAX`] at a time, and puts each answer in
    /// its slot of `out`.
    fn ask(
        &self,
        index: usize,
        requests: Vec<(usize, pb::RequestMediaGrant)>,
        out: &mut [Option<pb::MediaGrant>],
        ctx: &Bounds,
    ) -> anyhow::Result<()> {
        for batch in requests.chunks(GRANTS_PER_CONNECTION_MAX) {
            let mut chat = self.login(index, ctx)?;
            let frames: Vec<Frame> = batch
                .iter()
                .map(|(_, r)| Frame::RequestMediaGrant(r.clone()))
                .collect();
            chat.send(&frames)?;
            let mut pending = batch.len();
            while pending > 0 {
                ctx.check_deadline("waiting for media grants")?;
                match chat.receive(ctx)? {
                    Frame::MediaGrant(grant) => {
                        let Some((slot, _)) =
                            batch.iter().find(|(_, r)| r.request_id == grant.request_id)
                        else {
                            continue;
                        };
                        if out[*slot].is_none() {
                            pending -= 1;
                        }
                        out[*slot] = Some(grant);
                    }
                    Frame::Error(e)
                        if e.fatal
                            || batch
                                .iter()
                                .any(|(_, r)| r.request_id == e.client_message_id) =>
                    {
                        bail!(
                            "{} refused a media grant: {} ({})",
                            self.server,
                            switchboard::client::error_code_name(e.code),
                            e.message
                        );
                    }
                    Frame::GoAway(g) => bail!("{} went away: {g:?}", self.server),
                    // Pings, presence and the like: not what we wait for.
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// A blocking chat connection.
struct Chat {
    server: SocketAddr,
    stream: TcpStream,
    buffer: BytesMut,
    frame_bytes_max: u32,
}

impl Chat {
    fn connect(server: SocketAddr, timeout: Duration) -> anyhow::Result<Chat> {
        let stream = TcpStream::connect_timeout(&server, timeout)
            .with_context(|| format!("connecting to the chat port {server}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Chat {
            server,
            stream,
            buffer: BytesMut::with_capacity(8192),
            frame_bytes_max: FRAME_BYTES_DEFAULT,
        })
    }

    /// Writes `frames` in one write.
    fn send(&mut self, frames: &[Frame]) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        for frame in frames {
            bytes.extend_from_slice(&frame.to_bytes());
        }
        self.stream
            .write_all(&bytes)
            .with_context(|| format!("writing to {}", self.server))
    }

    /// The next frame; each read is bounded by the socket's timeout.
    fn receive(&mut self, ctx: &Bounds) -> anyhow::Result<Frame> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(frame) = next_frame(&mut self.buffer, self.frame_bytes_max)
                .with_context(|| format!("reading frames from {}", self.server))?
            {
                return Ok(frame);
            }
            ctx.check_deadline("reading the chat connection")?;
            let read = match self.stream.read(&mut chunk) {
                Ok(0) => bail!("{} closed the chat connection", self.server),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no answer from {} within {:?}", self.server, ctx.timeout)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", self.server)),
            };
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 to the media service.

/// The media service as a grant's URL names it.
#[derive(Clone, Debug)]
struct Service {
    url: String,
    addr: SocketAddr,
    /// `host:port` as written in the URL (the Host header).
    authority: String,
    /// The URL's path, without a trailing slash ("" for none).
    base_path: String,
}

impl Service {
    fn parse(url: &str) -> anyhow::Result<Service> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            anyhow!("the media URL {url:?} is not http:// (this harness speaks plain HTTP)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("resolving the media URL {url:?}"))?
            .next()
            .ok_or_else(|| anyhow!("the media URL {url:?} resolves to no address"))?;
        Ok(Service {
            url: url.trim_end_matches('/').to_string(),
            addr,
            authority: authority.to_string(),
            base_path: path.to_string(),
        })
    }
}

/// A response's status line and headers.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> anyhow::Result<Option<u64>> {
        self.header("Content-Length")
            .map(|v| {
                v.trim()
                    .parse()
                    .context("a Content-Length that is no number")
            })
            .transpose()
    }

    fn chunked(&self) -> bool {
        self.header("Transfer-Encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn closes(&self) -> bool {
        self.header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One blocking HTTP/1.1 connection, kept alive between requests.
struct Http {
    stream: TcpStream,
    authority: String,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Http {
    fn connect(service: &Service, timeout: Duration) -> anyhow::Result<Http> {
        let stream = TcpStream::connect_timeout(&service.addr, timeout)
            .with_context(|| format!("connecting to the media service {}", service.addr))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            authority: service.authority.clone(),
            buffer: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        })
    }

    /// Writes a request head; the body (Content-Length bytes) follows
    /// with [`Http::write_body`].
    fn write_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        content_length: Option<u64>,
    ) -> anyhow::Result<()> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(length) = content_length {
            head.push_str(&format!("Content-Length: {length}\r\n"));
        }
        head.push_str("\r\n");
        self.write_body(head.as_bytes())
    }

    fn write_body(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream
            .write_all(bytes)
            .context("writing to the media service")
    }

    /// Reads more into the buffer (moving what is left to its start);
    /// fails at end of stream.
    fn fill(&mut self) -> anyhow::Result<()> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buffer.len() {
            bail!("the media service sent a line longer than {READ_BUFFER_BYTES} bytes");
        }
        loop {
            match self.stream.read(&mut self.buffer[self.end..]) {
                Ok(0) => bail!("the media service closed the connection"),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("the media service did not answer in time")
                }
                Err(e) => return Err(e).context("reading from the media service"),
            }
        }
    }

    /// The response's status line and headers.
    fn read_head(&mut self) -> anyhow::Result<Head> {
        let head_end = loop {
            if let Some(i) = find(&self.buffer[self.start..self.end], b"\r\n\r\n") {
                break self.start + i;
            }
            if self.end - self.start >= RESPONSE_HEAD_BYTES_MAX {
                bail!("a response head longer than {RESPONSE_HEAD_BYTES_MAX} bytes");
            }
            self.fill()?;
        };
        let text = String::from_utf8_lossy(&self.buffer[self.start..head_end]).into_owned();
        self.start = head_end + 4;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP status line: {status_line:?}"))?;
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Head { status, headers })
    }

    /// Fills `out` from the buffer first, then straight from the socket.
    fn read_exact_into(&mut self, out: &mut [u8]) -> anyhow::Result<()> {
        let buffered = (self.end - self.start).min(out.len());
        out[..buffered].copy_from_slice(&self.buffer[self.start..self.start + buffered]);
        self.start += buffered;
        self.stream
            .read_exact(&mut out[buffered..])
            .context("reading a body from the media service")
    }

    /// One `\r\n`-ended line (chunked framing).
    fn read_line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(i) = find(&self.buffer[self.start..self.end], b"\r\n") {
                let line =
                    String::from_utf8_lossy(&self.buffer[self.start..self.start + i]).into_owned();
                self.start += i + 2;
                return Ok(line);
            }
            if self.end - self.start > CHUNK_LINE_BYTES_MAX {
                bail!("a chunk line longer than {CHUNK_LINE_BYTES_MAX} bytes");
            }
            self.fill()?;
        }
    }

    /// Reads the body of a response to a request that has one (not HEAD,
    /// not 204) into `out`, growing it when needed but never shrinking it
    /// (so a buffer sized before the clock is never touched again); at most
    /// `limit` bytes. Returns the body's length.
    fn read_body_into(
        &mut self,
        head: &Head,
        out: &mut Vec<u8>,
        limit: u64,
    ) -> anyhow::Result<usize> {
        if head.status == 204 || head.status == 304 || head.status < 200 {
            return Ok(0);
        }
        let grow = |out: &mut Vec<u8>, to: usize| {
            if out.len() < to {
                out.resize(to, 0);
            }
        };
        if head.chunked() {
            let mut length = 0usize;
            loop {
                let line = self.read_line()?;
                let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .with_context(|| format!("a chunk size line {line:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.read_line()?.is_empty() {}
                    return Ok(length);
                }
                if length as u64 + size > limit {
                    bail!("a body longer than {limit} bytes");
                }
                let end = length + size as usize;
                grow(out, end);
                self.read_exact_into(&mut out[length..end])?;
                length = end;
                if !self.read_line()?.is_empty() {
                    bail!("a chunk not followed by CRLF");
                }
            }
        }
        match head.content_length()? {
            Some(length) if length > limit => bail!("a body of {length} bytes, over {limit}"),
            Some(length) => {
                let length = length as usize;
                grow(out, length);
                self.read_exact_into(&mut out[..length])?;
                Ok(length)
            }
            None => {
                // The body ends with the connection.
                let mut length = 0usize;
                loop {
                    let buffered = self.end - self.start;
                    if buffered > 0 {
                        if (length + buffered) as u64 > limit {
                            bail!("a body longer than {limit} bytes");
                        }
                        grow(out, length + buffered);
                        out[length..length + buffered]
                            .copy_from_slice(&self.buffer[self.start..self.end]);
                        length += buffered;
                        self.start = self.end;
                    }
                    match self.fill() {
                        Ok(()) => {}
                        Err(_) => return Ok(length),
                    }
                }
            }
        }
    }

    /// A small (JSON or error) body as text.
    fn read_small_body(&mut self, head: &Head) -> anyhow::Result<String> {
        let mut body = Vec::new();
        let length = self.read_body_into(head, &mut body, SMALL_BODY_BYTES_MAX)?;
        body.truncate(length);
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A refusal's text: `POST /v1/uploads answered 429 RATE_LIMITED: …`.
fn refusal(what: &str, status: u16, body: &str) -> anyhow::Error {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v["error"].is_string() => anyhow!(
            "{what} answered {status} {}: {}",
            v["error"].as_str().unwrap_or_default(),
            v["message"].as_str().unwrap_or_default()
        ),
        _ => anyhow!("{what} answered {status}: {body:?}"),
    }
}

/// Begins an upload of `size` bytes with hash `sha256_hex`; its id.
fn create_upload(
    http: &mut Http,
    service: &Service,
    bearer: &str,
    size: u64,
    sha256_hex: &str,
) -> anyhow::Result<String> {
    let body = format!(r#"{{"size":{size},"sha256":"{sha256_hex}"}}"#);
    http.write_head(
        "POST",
        &format!("{}/v1/uploads", service.base_path),
        &[
            ("Authorization", bearer),
            ("Content-Type", "application/json"),
        ],
        Some(body.len() as u64),
    )?;
    http.write_body(body.as_bytes())?;
    let head = http.read_head()?;
    let text = http.read_small_body(&head)?;
    match head.status {
        201 => {}
        200 => bail!("POST /v1/uploads: the service has this blob already (content not new)"),
        status => return Err(refusal("POST /v1/uploads", status, &text)),
    }
    let state: Value = serde_json::from_str(&text).context("POST /v1/uploads: not JSON")?;
    if state["offset"].as_u64() != Some(0) {
        bail!("POST /v1/uploads: a new upload that does not start at 0: {text}");
    }
    state["upload_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("POST /v1/uploads: no upload_id in {text}"))
}

/// Uploads `blob` (whose SHA-256 is `sha256_hex`) with this module's
/// client: one connection, the POST, then `chunk_bytes` per PATCH.
fn upload_raw(
    service: &Service,
    timeout: Duration,
    token: &str,
    blob: &[u8],
    sha256_hex: &str,
    chunk_bytes: u64,
) -> anyhow::Result<()> {
    let bearer = format!("Bearer {token}");
    let total = blob.len() as u64;
    let mut http = Http::connect(service, timeout)?;
    let upload_id = create_upload(&mut http, service, &bearer, total, sha256_hex)?;
    let path = format!("{}/v1/uploads/{upload_id}", service.base_path);
    let mut offset = 0u64;
    let mut reconnect = false;
    let requests_max = total.div_ceil(chunk_bytes) + 1;
    for _ in 0..requests_max {
        if reconnect {
            http = Http::connect(service, timeout)?;
        }
        let end = (offset + chunk_bytes).min(total);
        http.write_head(
            "PATCH",
            &path,
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/offset+octet-stream"),
                ("Upload-Offset", &offset.to_string()),
            ],
            Some(end - offset),
        )?;
        http.write_body(&blob[offset as usize..end as usize])?;
        let head = http.read_head()?;
        let text = http.read_small_body(&head)?;
        reconnect = head.closes();
        match head.status {
            201 => {
                let done: Value = serde_json::from_str(&text).context("PATCH: not JSON")?;
                if done["complete"] != json!(true) || done["blob_id"] != json!(sha256_hex) {
                    bail!("PATCH answered 201 with {text}, not blob {sha256_hex} complete");
                }
                return Ok(());
            }
            204 => {
                let next: u64 = head
                    .header("Upload-Offset")
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| anyhow!("PATCH answered 204 without Upload-Offset"))?;
                if next <= offset || next > total {
                    bail!("PATCH at {offset} answered Upload-Offset {next} of {total}");
                }
                if next == total {
                    bail!("PATCH: all {total} bytes taken but the upload is not complete");
                }
                offset = next;
            }
            status => return Err(refusal("PATCH /v1/uploads", status, &text)),
        }
    }
    bail!("the upload was not complete after {requests_max} PATCH requests")
}

/// Downloads blob `blob_hex` of `size` bytes into `out` with this module's
/// client.
fn download_raw(
    service: &Service,
    timeout: Duration,
    token: &str,
    blob_hex: &str,
    size: u64,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let mut http = Http::connect(service, timeout)?;
    http.write_head(
        "GET",
        &format!("{}/v1/blobs/{blob_hex}", service.base_path),
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )?;
    let head = http.read_head()?;
    if head.status != 200 {
        let text = http.read_small_body(&head)?;
        return Err(refusal("GET /v1/blobs", head.status, &text));
    }
    let length = http.read_body_into(&head, out, size)?;
    if length as u64 != size {
        bail!("GET /v1/blobs: {length} bytes of {size}");
    }
    Ok(())
}

/// `GET /healthz` of the media service: its status.
fn healthz(service: &Service, timeout: Duration) -> anyhow::Result<u16> {
    let mut http = Http::connect(service, timeout)?;
    http.write_head(
        "GET",
        &format!("{}/healthz", service.base_path),
        &[("Connection", "close")],
        None,
    )?;
    let head = http.read_head()?;
    http.read_small_body(&head)?;
    Ok(head.status)
}

// ---------------------------------------------------------------------------
// Throughput.

/// One stream's blobs of one size: one random buffer, and per blob the
/// prefix that makes it unique and the SHA-256 it gives.
struct Lane {
    buffer: Vec<u8>,
    prefixes: Vec<[u8; UNIQUE_PREFIX_BYTES]>,
    blob_ids: Vec<[u8; 32]>,
    /// Where downloads land: sized before the clock starts.
    download: Vec<u8>,
}

impl Lane {
    fn new(spec: BlobSpec) -> Lane {
        let mut rng = rand::thread_rng();
        let mut buffer = vec![0u8; spec.size_bytes as usize];
        rng.fill_bytes(&mut buffer);
        let mut prefixes = Vec::with_capacity(spec.count as usize);
        let mut blob_ids = Vec::with_capacity(spec.count as usize);
        for _ in 0..spec.count {
            let mut prefix = [0u8; UNIQUE_PREFIX_BYTES];
            rng.fill_bytes(&mut prefix);
            buffer[..UNIQUE_PREFIX_BYTES].copy_from_slice(&prefix);
            prefixes.push(prefix);
            blob_ids.push(Sha256::digest(&buffer).into());
        }
        Lane {
            download: vec![0u8; buffer.len()],
            buffer,
            prefixes,
            blob_ids,
        }
    }

    /// Makes the buffer blob `i`.
    fn select(&mut self, i: usize) {
        self.buffer[..UNIQUE_PREFIX_BYTES].copy_from_slice(&self.prefixes[i]);
    }
}

/// What each stream of a pass does and how it went.
struct StreamRun {
    started: Instant,
    ended: Instant,
    transfers: Vec<Duration>,
}

#[derive(Clone, Copy)]
enum Direction {
    Upload,
    Download,
}

/// Runs one stream's uploads or downloads of its lane, timing each.
#[allow(clippy::too_many_arguments)]
fn stream(
    direction: Direction,
    client: ClientKind,
    chunk_bytes: u64,
    service: &Service,
    ctx: &Bounds,
    lane: &mut Lane,
    grants: &[pb::MediaGrant],
    start: &Barrier,
) -> anyhow::Result<StreamRun> {
    let mut transfers = Vec::with_capacity(grants.len());
    start.wait();
    let started = Instant::now();
    for (i, grant) in grants.iter().enumerate() {
        ctx.check_deadline("moving blobs")?;
        let blob_hex = hex::encode(lane.blob_ids[i]);
        let size = lane.buffer.len() as u64;
        match direction {
            Direction::Upload => lane.select(i),
            Direction::Download => lane.download[..UNIQUE_PREFIX_BYTES].fill(0),
        }
        let at = Instant::now();
        match (direction, client) {
            (Direction::Upload, ClientKind::Raw) => upload_raw(
                service,
                ctx.timeout,
                &grant.token,
                &lane.buffer,
                &blob_hex,
                chunk_bytes,
            )?,
            (Direction::Upload, ClientKind::Library) => {
                let sealed = Sealed {
                    ciphertext: std::mem::take(&mut lane.buffer),
                    key: [0; 32],
                    blob_id: lane.blob_ids[i],
                };
                let result = switchboard::client::media::upload(&grant.url, &grant.token, &sealed);
                lane.buffer = sealed.ciphertext;
                result.with_context(|| format!("uploading blob {blob_hex}"))?;
            }
            (Direction::Download, ClientKind::Raw) => download_raw(
                service,
                ctx.timeout,
                &grant.token,
                &blob_hex,
                size,
                &mut lane.download,
            )?,
            (Direction::Download, ClientKind::Library) => {
                let body = switchboard::client::media::download(
                    &grant.url,
                    &grant.token,
                    &lane.blob_ids[i],
                    size,
                )
                .with_context(|| format!("downloading blob {blob_hex}"))?;
                let n = body.len().min(lane.download.len());
                lane.download[..n].copy_from_slice(&body[..n]);
            }
        }
        transfers.push(at.elapsed());
        if let Direction::Download = direction {
            // The blob's own bytes came back (the SHA-256 of the last one
            // is checked after the clock).
            if lane.download[..UNIQUE_PREFIX_BYTES] != lane.prefixes[i] {
                bail!("blob {blob_hex} came back with other bytes");
            }
        }
    }
    Ok(StreamRun {
        started,
        ended: Instant::now(),
        transfers,
    })
}

/// CPU time of the server and of this process, clock ticks.
#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    server: Option<u64>,
    bench: Option<u64>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>) -> CpuMark {
        let ticks = |path: String| {
            fs::read_to_string(path)
                .ok()
                .and_then(|l| cpu::parse_stat_ticks(&l))
        };
        CpuMark {
            at: Instant::now(),
            server: server_pid.and_then(|pid| ticks(format!("/proc/{pid}/stat"))),
            bench: ticks("/proc/self/stat".to_string()),
        }
    }

    /// Cores used since `before` (fractions of one core): server, bench.
    fn cores_since(&self, before: &CpuMark) -> (Option<f64>, Option<f64>) {
        let span_s = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let ticks_per_s = cpu::ticks_per_s() as f64;
        let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_sub(b) as f64 / ticks_per_s / span_s),
            _ => None,
        };
        (
            cores(self.server, before.server),
            cores(self.bench, before.bench),
        )
    }
}

/// Runs `direction` on every lane at once, one thread per lane; the
/// figures as JSON.
#[allow(clippy::too_many_arguments)]
fn timed(
    direction: Direction,
    args: &MediaArgs,
    ctx: &Bounds,
    service: &Service,
    server_pid: Option<u32>,
    lanes: &mut [Lane],
    grants: &[Vec<pb::MediaGrant>],
) -> anyhow::Result<Value> {
    let start = Barrier::new(lanes.len());
    let before = CpuMark::now(server_pid);
    let runs: Vec<anyhow::Result<StreamRun>> = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .iter_mut()
            .zip(grants)
            .map(|(lane, grants)| {
                let start = &start;
                scope.spawn(move || {
                    stream(
                        direction,
                        args.client,
                        args.chunk_bytes,
                        service,
                        ctx,
                        lane,
                        grants,
                        start,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a stream panicked")))
            })
            .collect()
    });
    let after = CpuMark::now(server_pid);
    let runs = runs.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let started = runs.iter().map(|r| r.started).min().expect("one stream");
    let ended = runs.iter().map(|r| r.ended).max().expect("one stream");
    let seconds = ended.duration_since(started).as_secs_f64().max(1e-9);
    let mut times: Vec<Duration> = runs.iter().flat_map(|r| r.transfers.clone()).collect();
    times.sort();
    let bytes: u64 = lanes
        .iter()
        .map(|l| l.buffer.len() as u64 * l.prefixes.len() as u64)
        .sum();
    let (server_cores, bench_cores) = after.cores_since(&before);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(json!({
        "bytes": bytes,
        "seconds": seconds,
        "mb_per_s": bytes as f64 / seconds / 1e6,
        "transfer_ms": {
            "min": ms(times[0]),
            "p50": ms(times[times.len().div_ceil(2) - 1]),
            "max": ms(times[times.len() - 1]),
        },
        "server_cores": server_cores,
        "bench_cores": bench_cores,
    }))
}

/// One pass: `spec.count` blobs per stream on `streams` streams, uploaded,
/// then downloaded.
fn pass(
    args: &MediaArgs,
    ctx: &Bounds,
    grants: &mut Grants,
    service: &Service,
    server_pid: Option<u32>,
    spec: BlobSpec,
    streams: u32,
) -> anyhow::Result<Value> {
    let mut lanes: Vec<Lane> = (0..streams).map(|_| Lane::new(spec)).collect();
    let sizes = vec![spec.size_bytes; (streams * spec.count) as usize];
    let mut upload_grants = grants.uploads(&sizes, ctx)?;
    let per_lane = |all: &mut Vec<pb::MediaGrant>| -> Vec<Vec<pb::MediaGrant>> {
        (0..streams)
            .map(|_| all.drain(..spec.count as usize).collect())
            .collect()
    };
    let upload_grants = per_lane(&mut upload_grants);
    ctx.progress(&format!(
        "uploading {} x {} bytes on {streams} stream(s)",
        spec.count, spec.size_bytes
    ));
    let upload = timed(
        Direction::Upload,
        args,
        ctx,
        service,
        server_pid,
        &mut lanes,
        &upload_grants,
    )?;
    let blobs: Vec<[u8; 32]> = lanes.iter().flat_map(|l| l.blob_ids.clone()).collect();
    let mut download_grants = grants.downloads(&blobs, ctx)?;
    let download_grants = per_lane(&mut download_grants);
    ctx.progress(&format!(
        "downloading {} x {} bytes on {streams} stream(s)",
        spec.count, spec.size_bytes
    ));
    let download = timed(
        Direction::Download,
        args,
        ctx,
        service,
        server_pid,
        &mut lanes,
        &download_grants,
    )?;
    for lane in &lanes {
        let last = lane.blob_ids.len() - 1;
        if Sha256::digest(&lane.download).as_slice() != lane.blob_ids[last] {
            bail!(
                "the last download of blob {} does not hash to its id",
                hex::encode(lane.blob_ids[last])
            );
        }
    }
    Ok(json!({
        "blob_bytes": spec.size_bytes,
        "count": spec.count,
        "streams": streams,
        "upload": upload,
        "download": download,
    }))
}

// ---------------------------------------------------------------------------
// The disk under the service.

/// Runs `dd` with `operands`, at most [`DD_TIMEOUT`]; (bytes, seconds) as
/// dd reports them.
fn dd(operands: &[String]) -> anyhow::Result<(u64, f64)> {
    let mut child = Command::new("dd")
        .args(operands)
        .env("LC_ALL", "C")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running dd")?;
    let deadline = Instant::now() + DD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dd {operands:?} ran past {DD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr)?;
    }
    if !status.success() {
        bail!("dd {operands:?} failed: {}", stderr.trim());
    }
    parse_dd(&stderr).ok_or_else(|| anyhow!("dd printed no summary I could read: {stderr:?}"))
}

/// `67108864 bytes (67 MB, 64 MiB) copied, 0.0456 s, 1.5 GB/s` → (bytes,
/// seconds).
pub fn parse_dd(stderr: &str) -> Option<(u64, f64)> {
    let line = stderr.lines().find(|l| l.contains(" copied, "))?;
    let bytes = line.split_whitespace().next()?.parse().ok()?;
    let after = line.split(" copied, ").nth(1)?;
    let seconds = after.split_whitespace().next()?.parse().ok()?;
    Some((bytes, seconds))
}

/// `dd` in a directory made under `data_dir`: per `--blob` size, COUNT
/// files written with `conv=fdatasync`, each read back with `iflag=direct`
/// and from the page cache, then removed.
fn disk(data_dir: &Path, specs: &[BlobSpec], ctx: &Bounds) -> anyhow::Result<Value> {
    let dir = data_dir.join(format!("bench-dd-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rows = disk_rows(&dir, specs, ctx);
    let _ = fs::remove_dir_all(&dir);
    Ok(json!({
        "dir": dir.display().to_string(),
        "write": "dd if=/dev/zero of=FILE bs=B count=N conv=fdatasync",
        "read_direct": "dd if=FILE of=/dev/null bs=B count=N iflag=direct",
        "read_cached": "dd if=FILE of=/dev/null bs=B count=N (right after the write)",
        "sizes": rows?,
    }))
}

/// The `dd` figures of each size, files made and removed in `dir`.
fn disk_rows(dir: &Path, specs: &[BlobSpec], ctx: &Bounds) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    for spec in specs {
        ctx.progress(&format!(
            "dd: {} x {} bytes in {}",
            spec.count,
            spec.size_bytes,
            dir.display()
        ));
        let (block, blocks) = if spec.size_bytes >= DD_BLOCK_BYTES
            && spec.size_bytes.is_multiple_of(DD_BLOCK_BYTES)
        {
            (DD_BLOCK_BYTES, spec.size_bytes / DD_BLOCK_BYTES)
        } else {
            (spec.size_bytes, 1)
        };
        // O_DIRECT wants whole sectors.
        let mut direct_error = (!block.is_multiple_of(4096))
            .then(|| format!("{block}-byte blocks are not whole 4 KiB sectors"));
        // (bytes, seconds) of: the writes, the direct reads, the cached reads.
        let mut totals = [(0u64, 0f64); 3];
        for i in 0..spec.count {
            ctx.check_deadline("dd")?;
            let file = dir.join(format!("blob-{i}"));
            let sizes = [format!("bs={block}"), format!("count={blocks}")];
            let write: Vec<String> = [
                "if=/dev/zero".to_string(),
                format!("of={}", file.display()),
                "conv=fdatasync".to_string(),
            ]
            .into_iter()
            .chain(sizes.clone())
            .collect();
            let read: Vec<String> = [format!("if={}", file.display()), "of=/dev/null".into()]
                .into_iter()
                .chain(sizes)
                .collect();
            let mut runs = vec![dd(&write)?];
            let mut read_direct = read.clone();
            read_direct.push("iflag=direct".into());
            // Some filesystems (tmpfs) refuse O_DIRECT: then that column
            // stays empty and says why.
            match direct_error.is_none().then(|| dd(&read_direct)) {
                Some(Ok(run)) => runs.push(run),
                Some(Err(e)) => {
                    direct_error = Some(e.to_string());
                    runs.push((0, 0.0));
                }
                None => runs.push((0, 0.0)),
            }
            // Just written and read, so these pages are cached.
            runs.push(dd(&read)?);
            for (total, run) in totals.iter_mut().zip(runs) {
                total.0 += run.0;
                total.1 += run.1;
            }
            fs::remove_file(&file)?;
        }
        let rate =
            |(bytes, seconds): (u64, f64)| (seconds > 0.0).then(|| bytes as f64 / seconds / 1e6);
        rows.push(json!({
            "blob_bytes": spec.size_bytes,
            "count": spec.count,
            "dd_block_bytes": block,
            "write_fdatasync_mb_per_s": rate(totals[0]),
            "read_direct_mb_per_s": rate(totals[1]).filter(|_| direct_error.is_none()),
            "read_direct_error": direct_error,
            "read_cached_mb_per_s": rate(totals[2]),
        }));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// Memory per upload in flight.

/// The server's RSS once it holds still (see [`RSS_STILL_BYTES`]).
fn still_rss(server_pid: Option<u32>) -> anyhow::Result<u64> {
    let mut last = sysmem::sample(server_pid)?.server_rss_bytes;
    let end = Instant::now() + RSS_STILL_WAIT_MAX;
    while Instant::now() < end {
        std::thread::sleep(RSS_STILL_INTERVAL);
        let next = sysmem::sample(server_pid)?.server_rss_bytes;
        let moved = next.abs_diff(last);
        last = next;
        if moved <= RSS_STILL_BYTES {
            break;
        }
    }
    Ok(last)
}

/// The server's thread count (`Threads:` of `/proc/PID/status`): a
/// service that gives each upload in flight a thread (a blocking file
/// write, say) shows it here.
fn server_threads(server_pid: Option<u32>) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{}/status", server_pid?)).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
}

/// Holds `--in-flight` uploads open mid-PATCH and measures the server's
/// RSS before, during and after.
fn in_flight(
    args: &MediaArgs,
    ctx: &Bounds,
    grants: &mut Grants,
    service: &Service,
    server_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let count = args.in_flight as usize;
    let nofile = limits::raise_nofile();
    if (count as u64) + SPARE_FDS > nofile {
        bail!("--in-flight {count} needs more open files than the limit ({nofile})");
    }
    ctx.progress(&format!("asking for {count} upload grants"));
    let upload_grants = grants.uploads(&vec![args.in_flight_announced_bytes; count], ctx)?;
    let mut body = vec![0u8; args.in_flight_sent_bytes as usize];
    rand::thread_rng().fill_bytes(&mut body);
    let baseline = still_rss(server_pid)?;
    let threads_baseline = server_threads(server_pid);
    ctx.progress(&format!(
        "server RSS {baseline} bytes; opening {count} uploads"
    ));
    let mut held: Vec<Http> = Vec::with_capacity(count);
    let first_patch = Instant::now();
    for grant in &upload_grants {
        ctx.check_deadline("opening uploads in flight")?;
        let mut http = Http::connect(service, ctx.timeout)?;
        let bearer = format!("Bearer {}", grant.token);
        let mut sha = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut sha);
        let upload_id = create_upload(
            &mut http,
            service,
            &bearer,
            args.in_flight_announced_bytes,
            &hex::encode(sha),
        )?;
        http.write_head(
            "PATCH",
            &format!("{}/v1/uploads/{upload_id}", service.base_path),
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/offset+octet-stream"),
                ("Upload-Offset", "0"),
            ],
            Some(args.in_flight_announced_bytes),
        )?;
        http.write_body(&body)?;
        held.push(http);
    }
    let open_s = first_patch.elapsed().as_secs_f64();
    let during = still_rss(server_pid)?;
    let threads_during = server_threads(server_pid);
    let held_s = first_patch.elapsed();
    // An upload the service answered while we held it (an error, or its
    // body timeout) would not be in flight any more.
    let mut answered = 0;
    for http in &held {
        http.stream.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        match http.stream.peek(&mut byte) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            _ => answered += 1,
        }
    }
    drop(held);
    ctx.progress(&format!(
        "server RSS {during} bytes with {count} uploads in flight; closed them"
    ));
    std::thread::sleep(Duration::from_secs(1));
    let after = still_rss(server_pid)?;
    let health = healthz(service, ctx.timeout)?;
    if health != 200 {
        bail!("after the uploads in flight closed, /healthz answered {health}");
    }
    if held_s >= SERVICE_BODY_IDLE {
        eprintln!(
            "warning: the uploads were held {held_s:?}, past the service's body timeout \
             ({SERVICE_BODY_IDLE:?}): some may have ended before the sample"
        );
    }
    let known = server_pid.is_some();
    Ok(json!({
        "uploads": count,
        "announced_bytes": args.in_flight_announced_bytes,
        "sent_bytes": args.in_flight_sent_bytes,
        "open_s": open_s,
        "held_s": held_s.as_secs_f64(),
        "answered_while_held": answered,
        "rss_bytes_baseline": known.then_some(baseline),
        "server_threads_baseline": threads_baseline,
        "server_threads_during": threads_during,
        "rss_bytes_during": known.then_some(during),
        "rss_bytes_after_close": known.then_some(after),
        "rss_bytes_per_upload": known.then(|| (during as f64 - baseline as f64) / count as f64),
        "healthz_status": health,
    }))
}

// ---------------------------------------------------------------------------
// The human summary.

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

fn number_text(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "-".to_string(),
    }
}

/// The run's figures as text (MB = 10^6 bytes).
pub fn summary(out: &Value) -> String {
    let mut text = format!(
        "media against {} (media service {}, client {})\n",
        out["target"].as_str().unwrap_or("?"),
        out["media_url"].as_str().unwrap_or("?"),
        out["client"].as_str().unwrap_or("?"),
    );
    text.push_str(
        "  blob      count streams  upload MB/s  download MB/s  upload ms p50/max  download ms p50/max  server cores up/down\n",
    );
    for pass in out["transfers"].as_array().into_iter().flatten() {
        let (up, down) = (&pass["upload"], &pass["download"]);
        text.push_str(&format!(
            "  {:<9} {:>5} {:>7} {:>12} {:>14} {:>18} {:>20} {:>21}\n",
            size_text(pass["blob_bytes"].as_u64().unwrap_or(0)),
            pass["count"].as_u64().unwrap_or(0),
            pass["streams"].as_u64().unwrap_or(0),
            number_text(&up["mb_per_s"]),
            number_text(&down["mb_per_s"]),
            format!(
                "{} / {}",
                number_text(&up["transfer_ms"]["p50"]),
                number_text(&up["transfer_ms"]["max"])
            ),
            format!(
                "{} / {}",
                number_text(&down["transfer_ms"]["p50"]),
                number_text(&down["transfer_ms"]["max"])
            ),
            format!(
                "{} / {}",
                number_text(&up["server_cores"]),
                number_text(&down["server_cores"])
            ),
        ));
    }
    if let Some(disk) = out["disk"].as_object() {
        text.push_str(&format!(
            "  dd in {}: blob, write fdatasync / read direct / read cached MB/s\n",
            disk["dir"].as_str().unwrap_or("?")
        ));
        for row in disk["sizes"].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "  {:<9} {:>5}   {} / {} / {}\n",
                size_text(row["blob_bytes"].as_u64().unwrap_or(0)),
                row["count"].as_u64().unwrap_or(0),
                number_text(&row["write_fdatasync_mb_per_s"]),
                number_text(&row["read_direct_mb_per_s"]),
                number_text(&row["read_cached_mb_per_s"]),
            ));
        }
    }
    if let Some(held) = out["in_flight"].as_object() {
        let mib = |v: &Value| {
            v.as_f64()
                .map(|b| format!("{:.1} MiB", b / (1 << 20) as f64))
                .unwrap_or_else(|| "-".into())
        };
        text.push_str(&format!(
            "  {} uploads in flight ({} of {} sent each): server RSS {} -> {} ({} per upload), threads {} -> {}, {} after closing; /healthz {}\n",
            held["uploads"],
            size_text(held["sent_bytes"].as_u64().unwrap_or(0)),
            size_text(held["announced_bytes"].as_u64().unwrap_or(0)),
            mib(&held["rss_bytes_baseline"]),
            mib(&held["rss_bytes_during"]),
            held["rss_bytes_per_upload"]
                .as_f64()
                .map(|b| format!("{b:.0} B"))
                .unwrap_or_else(|| "-".into()),
            held["server_threads_baseline"],
            held["server_threads_during"],
            mib(&held["rss_bytes_after_close"]),
            held["healthz_status"],
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_blob_specs() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("1m"), Ok(1 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert!(parse_bytes("1T").is_err());
        assert!(parse_bytes("M").is_err());
        assert_eq!(
            parse_blob_spec("64M:5"),
            Ok(BlobSpec {
                size_bytes: 64 << 20,
                count: 5
            })
        );
        assert!(parse_blob_spec("64M").is_err());
        assert!(parse_blob_spec("1M:0").is_err());
        assert!(parse_blob_spec("8:1").is_err(), "smaller than the prefix");
    }

    #[test]
    fn reads_dd_summaries() {
        let stderr = "64+0 records in\n64+0 records out\n67108864 bytes (67 MB, 64 MiB) copied, 0.0456 s, 1.5 GB/s\n";
        assert_eq!(parse_dd(stderr), Some((67108864, 0.0456)));
        assert_eq!(parse_dd("dd: error"), None);
    }

    #[test]
    fn takes_media_urls_apart() {
        let s = Service::parse("http://127.0.0.1:7702").unwrap();
        assert_eq!(s.addr, "127.0.0.1:7702".parse().unwrap());
        assert_eq!(
            (s.authority.as_str(), s.base_path.as_str()),
            ("127.0.0.1:7702", "")
        );
        let s = Service::parse("http://127.0.0.1:80/media/").unwrap();
        assert_eq!(s.base_path, "/media");
        assert!(Service::parse("https://example.com").is_err());
    }

    /// A one-shot HTTP server on a thread: answers one connection with
    /// `response`, returns what it read.
    fn serve_once(response: &'static [u8]) -> (Service, std::thread::JoinHandle<Vec<u8>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut request = vec![0u8; 4096];
            let n = socket.read(&mut request).unwrap();
            socket.write_all(response).unwrap();
            request.truncate(n);
            request
        });
        (Service::parse(&format!("http://{addr}")).unwrap(), thread)
    }

    #[test]
    fn reads_chunked_and_sized_bodies_into_one_buffer() {
        let (service, server) = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n",
        );
        let mut http = Http::connect(&service, Duration::from_secs(5)).unwrap();
        http.write_head("GET", "/x", &[], None).unwrap();
        let head = http.read_head().unwrap();
        let mut out = vec![7u8; 32];
        let n = http.read_body_into(&head, &mut out, 100).unwrap();
        assert_eq!(&out[..n], b"hello world");
        assert_eq!(out.len(), 32, "a buffer large enough is not shrunk");
        let request = server.join().unwrap();
        assert!(request.starts_with(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:"));

        let (service, _server) = serve_once(
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nUpload-Offset: 9\r\n\r\nabcd",
        );
        let mut http = Http::connect(&service, Duration::from_secs(5)).unwrap();
        http.write_head("PATCH", "/y", &[], Some(0)).unwrap();
        let head = http.read_head().unwrap();
        assert_eq!(head.status, 201);
        assert_eq!(head.header("upload-offset"), Some("9"));
        assert_eq!(http.read_small_body(&head).unwrap(), "abcd");
    }

    #[test]
    fn refuses_bodies_over_the_limit() {
        let (service, _server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
        let mut http = Http::connect(&service, Duration::from_secs(5)).unwrap();
        http.write_head("GET", "/", &[], None).unwrap();
        let head = http.read_head().unwrap();
        assert!(http.read_body_into(&head, &mut Vec::new(), 10).is_err());
    }

    #[test]
    fn names_the_service_error_code() {
        let e = refusal(
            "POST /v1/uploads",
            429,
            r#"{"error":"RATE_LIMITED","message":"60 per minute"}"#,
        );
        assert_eq!(
            e.to_string(),
            "POST /v1/uploads answered 429 RATE_LIMITED: 60 per minute"
        );
    }

    #[test]
    fn blobs_of_a_lane_differ_and_hash_to_their_ids() {
        let mut lane = Lane::new(BlobSpec {
            size_bytes: 4096,
            count: 3,
        });
        assert_ne!(lane.blob_ids[0], lane.blob_ids[1]);
        for i in 0..3 {
            lane.select(i);
            assert_eq!(Sha256::digest(&lane.buffer).as_slice(), lane.blob_ids[i]);
        }
    }
}
