//! One user's connection to the target, whichever protocol it speaks.
//!
//! [`Wire`] is the byte stream both protocols share: a glommio socket split
//! in a read half (one reading task) and a write half behind a buffered
//! output queue that any task fills and whoever calls `flush` drains.
//! [`Link`] is the protocol on top: a Switchboard session of the client
//! library (`switchboard::client`, which has its own socket and buffers), or
//! MQTT 3.1.1 on a [`Wire`] (`crate::mqtt`).
//!
//! Every link lives on the executor that opened it (`Rc`, `Cell`, no locks).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use serde::{Deserialize, Serialize};
use switchboard::client::{self, ClientError, ConnectOptions, Credentials, Session};
use switchboard::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
use switchboard::proto::pb;

use crate::mqtt::{MqttLink, Subscriptions};

/// Bytes read from a socket per read call. An idle link holds no read
/// buffer; this is the size of the one taken for a read in progress.
pub const READ_CHUNK_BYTES: usize = 2048;
/// Largest Switchboard frame accepted from the server (the server's default).
pub const FRAME_BYTES_MAX: u32 = 66_560;

/// Longest bare TCP connect [`explain`] tries.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `3 s`, `2.5 s`: a duration the way the options are given.
pub fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// A wait for a handshake answer that ended without one: what it waited
/// for, from whom, and how long. The bound covers the TCP connect too.
#[derive(Debug)]
pub struct NoAnswer {
    /// The frame or packet waited for: `Registered`, `Welcome`, `CONNACK`,
    /// `SUBACK`.
    pub awaited: &'static str,
    pub from: SocketAddr,
    pub within: Duration,
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no {} from {} within {}",
            self.awaited,
            self.from,
            seconds(self.within)
        )
    }
}

impl std::error::Error for NoAnswer {}

/// Runs `future`, failing after `duration` with a [`NoAnswer`] naming what
/// `awaited` holds at that moment (a handshake sets it at each step).
pub async fn with_timeout<T>(
    duration: Duration,
    awaited: &Cell<&'static str>,
    from: SocketAddr,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    futures_lite::future::or(future, async {
        glommio::timer::sleep(duration).await;
        Err(anyhow::Error::new(NoAnswer {
            awaited: awaited.get(),
            from,
            within: duration,
        }))
    })
    .await
}

/// Adds to a [`NoAnswer`] what a bare TCP connect to the target (bounded by
/// `timeout`, at most [`PROBE_TIMEOUT`]) finds: a port that accepts and
/// stays silent, or one that does not accept at all. Empty for any other
/// error, whose own text says what the peer did.
pub async fn explain(error: &anyhow::Error, target: &Target, timeout: Duration) -> String {
    if error.downcast_ref::<NoAnswer>().is_none() {
        return String::new();
    }
    match TcpStream::connect_timeout(target.server, timeout.min(PROBE_TIMEOUT)).await {
        Ok(_) => format!(
            "; it accepts TCP connections but sent no answer: is this {}?",
            target.port_kind()
        ),
        Err(error) => format!(
            "; a bare TCP connect to it fails too ({error}): is the server up at this address?"
        ),
    }
}

/// What a run connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Switchboard,
    Mqtt,
}

/// How a Switchboard link speaks to the server (`--transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Noise, IK to the server key pinned when the account registered (a
    /// device's reconnect; XX for an account without a pin).
    #[default]
    Ik,
    /// Noise, XX at every login (first contact each time).
    Xx,
    /// No encryption (the server takes it from loopback by default).
    Plain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub protocol: Protocol,
    pub server: SocketAddr,
    /// Switchboard links only.
    #[serde(default)]
    pub transport: Transport,
}

impl Target {
    /// `switchboard://HOST:PORT`, `mqtt://HOST:PORT` or a bare `HOST:PORT`
    /// (Switchboard).
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        let (protocol, rest) = if let Some(rest) = text.strip_prefix("mqtt://") {
            (Protocol::Mqtt, rest)
        } else if let Some(rest) = text.strip_prefix("switchboard://") {
            (Protocol::Switchboard, rest)
        } else {
            (Protocol::Switchboard, text)
        };
        let server = rest
            .parse()
            .with_context(|| format!("target {text:?} is not HOST:PORT with an IP address"))?;
        Ok(Target {
            protocol,
            server,
            transport: Transport::default(),
        })
    }

    /// What the target's port should be, for hints.
    pub fn port_kind(&self) -> &'static str {
        match self.protocol {
            Protocol::Switchboard => "a Switchboard client port",
            Protocol::Mqtt => "an MQTT broker port",
        }
    }

    pub fn url(&self) -> String {
        match self.protocol {
            Protocol::Switchboard => format!("switchboard://{}", self.server),
            Protocol::Mqtt => format!("mqtt://{}", self.server),
        }
    }
}

/// A Switchboard account as the harness stores it (`--users FILE`): a
/// plaintext device's secret, or a Noise device's static private key and
/// the server key it pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: u64,
    pub device: u32,
    /// The 32-byte secret, hex; empty for a Noise device.
    #[serde(default)]
    pub secret: String,
    /// The Noise static private key, hex; empty for a plaintext device.
    #[serde(default)]
    pub noise_private: String,
    /// The server's Noise key pinned at registration, hex.
    #[serde(default)]
    pub server_key: String,
}

/// A user of the run: its global index and, for Switchboard, its account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub index: u64,
    pub account: Option<Account>,
}

/// What a link reports.
#[derive(Debug)]
pub enum Event {
    /// The server acknowledged (✓) our message `msg_id`.
    Ack { msg_id: u64 },
    /// A message for us; `sequence` is its inbox sequence (0 for MQTT).
    /// `group_event`: a Switchboard system message about a group (created,
    /// members changed), with an empty payload.
    Deliver {
        sequence: u64,
        payload: Bytes,
        group_event: bool,
    },
    /// Delivered receipt (✓✓) for our messages; `sequence` is the receipt's
    /// own inbox sequence, acknowledged like a delivery. One id per device
    /// that has the message: a group message delivered to several members
    /// appears once per member.
    Receipt { sequence: u64, msg_ids: Vec<u64> },
    /// The server refused our message or request `msg_id` (a non-fatal
    /// Error frame; `code` is the protocol's name of its error code).
    Refused { msg_id: u64, code: &'static str },
    /// The server created the group we asked for in request `request_id`
    /// (Switchboard).
    GroupCreated { request_id: u64, group_id: u64 },
    /// The peer closed the connection.
    Closed,
}

/// The shared byte stream.
pub struct Wire {
    reader: RefCell<Option<ReadHalf<TcpStream>>>,
    read_buffer: RefCell<BytesMut>,
    writer: RefCell<Option<WriteHalf<TcpStream>>>,
    pub out: RefCell<BytesMut>,
    closed: Cell<bool>,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        let (reader, writer) = futures_lite::io::split(stream);
        Wire {
            reader: RefCell::new(Some(reader)),
            read_buffer: RefCell::new(BytesMut::new()),
            writer: RefCell::new(Some(writer)),
            out: RefCell::new(BytesMut::new()),
            closed: Cell::new(false),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    pub fn read_buffer(&self) -> std::cell::RefMut<'_, BytesMut> {
        self.read_buffer.borrow_mut()
    }

    /// Writes everything queued. When another task is already writing, that
    /// task writes this data too and this call returns at once.
    pub async fn flush(&self) -> anyhow::Result<()> {
        loop {
            let Some(mut writer) = self.writer.take() else {
                return Ok(());
            };
            let data = self.out.borrow_mut().split().freeze();
            if data.is_empty() {
                self.writer.replace(Some(writer));
                return Ok(());
            }
            let result = writer.write_all(&data).await;
            self.writer.replace(Some(writer));
            result.context("writing to the server")?;
        }
    }

    /// Reads more bytes into the read buffer; an error once the peer closed.
    pub async fn fill(&self) -> anyhow::Result<()> {
        let mut reader = self
            .reader
            .take()
            .ok_or_else(|| anyhow!("two readers on one link"))?;
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let result = reader.read(&mut chunk).await;
        self.reader.replace(Some(reader));
        let n = result.context("reading from the server")?;
        if n == 0 {
            self.closed.set(true);
            bail!("the server closed the connection");
        }
        self.read_buffer.borrow_mut().extend_from_slice(&chunk[..n]);
        Ok(())
    }

    pub async fn close(&self) {
        let _ = self.flush().await;
        if let Some(mut writer) = self.writer.take() {
            let _ = writer.close().await;
        }
        self.closed.set(true);
    }
}

/// A Switchboard device session: the client library's [`Session`].
pub struct SwitchboardLink {
    session: Session,
}

fn connect_options(target: &Target, bind_ip: Option<IpAddr>, timeout: Duration) -> ConnectOptions {
    let mut options = ConnectOptions::new(target.server);
    options.bind_ip = bind_ip;
    options.frame_bytes_max = FRAME_BYTES_MAX;
    options.timeout = timeout;
    options.plaintext = target.transport == Transport::Plain;
    options
}

/// A failed handshake (`verb` is `registering`, `logging in`), saying what
/// it waited for (`awaited`) and from whom. A peer that closes or sends
/// bytes that are not frames is probably not a Switchboard client port, and
/// the message says so.
fn handshake_error(
    error: ClientError,
    verb: &str,
    awaited: &'static str,
    server: SocketAddr,
    timeout: Duration,
) -> anyhow::Error {
    const HINT: &str = "is this a Switchboard client port?";
    match error {
        ClientError::Timeout => anyhow::Error::new(NoAnswer {
            awaited,
            from: server,
            within: timeout,
        }),
        ClientError::Closed => {
            anyhow!("{server} closed the connection instead of sending {awaited}: {HINT}")
        }
        ClientError::Protocol(_) | ClientError::UnexpectedFrame(_) => {
            anyhow!("{verb} at {server}: {error} instead of {awaited}: {HINT}")
        }
        // The error's own text holds its cause (an i/o error's too).
        other => anyhow!("{verb} at {server}: {other}"),
    }
}

/// A 32-byte hex field of an account (`None` when empty).
fn key_field(text: &str, what: &str, user: u64) -> anyhow::Result<Option<[u8; 32]>> {
    if text.is_empty() {
        return Ok(None);
    }
    let bytes: [u8; 32] = hex::decode(text)?
        .try_into()
        .map_err(|_| anyhow!("the {what} of user {user} is not 32 bytes"))?;
    Ok(Some(bytes))
}

impl Account {
    /// The client library's credentials; with `Transport::Xx` without the
    /// pinned server key, so every login runs XX.
    fn credentials(&self, transport: Transport) -> anyhow::Result<Credentials> {
        let server_key = match transport {
            Transport::Ik => key_field(&self.server_key, "server key", self.user)?,
            Transport::Xx | Transport::Plain => None,
        };
        Ok(Credentials {
            user: UserId(self.user),
            device: DeviceId(self.device),
            secret: key_field(&self.secret, "secret", self.user)?,
            noise_private: key_field(&self.noise_private, "Noise key", self.user)?,
            server_key,
        })
    }

    fn from_credentials(credentials: &Credentials) -> Account {
        let hex_or_empty = |key: Option<[u8; 32]>| key.map(hex::encode).unwrap_or_default();
        Account {
            user: credentials.user.0,
            device: credentials.device.0,
            secret: hex_or_empty(credentials.secret),
            noise_private: hex_or_empty(credentials.noise_private),
            server_key: hex_or_empty(credentials.server_key),
        }
    }
}

impl SwitchboardLink {
    /// Creates an account (Register → Registered).
    pub async fn register(
        target: &Target,
        bind_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> anyhow::Result<Account> {
        let server = target.server;
        let credentials = client::register(&connect_options(target, bind_ip, timeout), None)
            .await
            .map_err(|e| handshake_error(e, "registering", "Registered", server, timeout))?;
        Ok(Account::from_credentials(&credentials))
    }

    pub async fn connect(
        target: &Target,
        bind_ip: Option<IpAddr>,
        account: &Account,
        timeout: Duration,
    ) -> anyhow::Result<SwitchboardLink> {
        let server = target.server;
        let session = Session::connect(
            &connect_options(target, bind_ip, timeout),
            &account.credentials(target.transport)?,
        )
        .await
        .map_err(|e| handshake_error(e, "logging in", "Welcome", server, timeout))?;
        Ok(SwitchboardLink { session })
    }

    fn convert(&self, event: Result<client::Event, ClientError>) -> anyhow::Result<Option<Event>> {
        match event {
            Ok(client::Event::ServerAck(ack)) => Ok(Some(Event::Ack {
                msg_id: ack.client_message_id,
            })),
            Ok(client::Event::Deliver(d)) => Ok(Some(Event::Deliver {
                sequence: d.sequence,
                payload: d.payload,
                group_event: d.group_event.is_some(),
            })),
            Ok(client::Event::Receipt(r)) if r.kind == pb::ReceiptKind::Delivered as i32 => {
                Ok(Some(Event::Receipt {
                    sequence: r.sequence,
                    msg_ids: r.client_message_ids,
                }))
            }
            Ok(client::Event::Receipt(r)) => {
                // A read receipt: acknowledge it, time nothing.
                self.session.ack(InboxSeq(r.sequence))?;
                Ok(None)
            }
            Ok(client::Event::GroupInfo(info)) => Ok(Some(Event::GroupCreated {
                request_id: info.request_id,
                group_id: info.group_id,
            })),
            Ok(
                client::Event::Pong(_)
                | client::Event::LinkCode(_)
                | client::Event::DeviceList(_)
                | client::Event::DeviceRemoved(_)
                | client::Event::PrekeysStored(_)
                | client::Event::PrekeyBundle(_)
                | client::Event::PrekeysLow(_)
                | client::Event::Typing(_)
                | client::Event::PresenceUpdate(_)
                | client::Event::Privacy(_)
                | client::Event::PushRegistered(_)
                | client::Event::MediaGrant(_),
            ) => Ok(None),
            Ok(client::Event::Error(e)) if !e.fatal => Ok(Some(Event::Refused {
                msg_id: e.client_message_id,
                code: client::error_code_name(e.code),
            })),
            Ok(client::Event::Error(e)) => bail!("server error: {e:?}"),
            Ok(client::Event::GoAway(g)) => bail!("server went away: {g:?}"),
            Err(ClientError::Closed) => Ok(Some(Event::Closed)),
            Err(e) => Err(e.into()),
        }
    }

    async fn next_event(&self) -> anyhow::Result<Event> {
        loop {
            if let Some(event) = self.convert(self.session.next_event().await)? {
                return Ok(event);
            }
        }
    }

    /// The next event if one is ready without waiting for the socket
    /// (`next_event` is cancel safe: unread bytes stay buffered).
    async fn ready_event(&self) -> Option<anyhow::Result<Event>> {
        loop {
            let event = futures_lite::future::poll_once(self.session.next_event()).await?;
            match self.convert(event) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A connected user.
// Every link lives in its own `Rc` allocation, so the smaller variant's
// unused bytes cost less than a second allocation (a `Box`) would.
#[allow(clippy::large_enum_variant)]
pub enum Link {
    Switchboard(SwitchboardLink),
    Mqtt(MqttLink),
}

impl Link {
    /// Connects `user` (authenticated and ready to send and receive; MQTT:
    /// subscribed as `subscriptions` says).
    pub async fn connect(
        target: &Target,
        user: &User,
        bind_ip: Option<IpAddr>,
        subscriptions: &Subscriptions,
        timeout: Duration,
    ) -> anyhow::Result<Rc<Link>> {
        let link = match target.protocol {
            Protocol::Switchboard => {
                let account = user
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("user {} has no account", user.index))?;
                Link::Switchboard(
                    SwitchboardLink::connect(target, bind_ip, account, timeout).await?,
                )
            }
            Protocol::Mqtt => Link::Mqtt(
                MqttLink::connect(target.server, bind_ip, user.index, subscriptions, timeout)
                    .await?,
            ),
        };
        Ok(Rc::new(link))
    }

    /// Queues message `msg_id` for user `peer`.
    pub fn send(&self, peer: &User, msg_id: u64, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Link::Switchboard(link) => {
                let account = peer
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("peer {} has no account", peer.index))?;
                link.session
                    .send(UserId(account.user), ClientMessageId(msg_id), payload)?;
                Ok(())
            }
            Link::Mqtt(link) => link.send(peer.index, msg_id, payload),
        }
    }

    /// Queues message `msg_id` for every other member of group `group`
    /// (Switchboard: the server's group `group_id`; MQTT: the group's topic).
    pub fn send_group(
        &self,
        group: u32,
        group_id: u64,
        msg_id: u64,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        match self {
            Link::Switchboard(link) => {
                link.session
                    .send_to_group(group_id, ClientMessageId(msg_id), payload)?;
                Ok(())
            }
            Link::Mqtt(link) => link.publish(crate::mqtt::group_topic(group), msg_id, payload),
        }
    }

    /// Queues CreateGroup `request_id` of group `name` with the accounts
    /// `members` (the caller's own not among them), answered by
    /// [`Event::GroupCreated`] or [`Event::Refused`]. Switchboard only: an
    /// MQTT topic needs no creating.
    pub fn create_group(&self, request_id: u64, name: &str, members: &[u64]) -> anyhow::Result<()> {
        match self {
            Link::Switchboard(link) => {
                let members: Vec<UserId> = members.iter().map(|&m| UserId(m)).collect();
                link.session.create_group(request_id, name, &members)?;
                Ok(())
            }
            Link::Mqtt(_) => bail!("MQTT has no groups to create"),
        }
    }

    /// Acknowledges inbox entries up to `sequence` (MQTT PUBACKs each
    /// delivery by itself, so nothing to do there).
    pub fn ack(&self, sequence: u64) {
        if let Link::Switchboard(link) = self {
            // Fails only on a closed session, which the reader reports.
            let _ = link.session.ack(InboxSeq(sequence));
        }
    }

    /// Follows these users' presence (Switchboard; nothing on MQTT).
    pub fn follow(&self, users: &[u64]) -> anyhow::Result<()> {
        if let Link::Switchboard(link) = self {
            let users: Vec<UserId> = users.iter().map(|&u| UserId(u)).collect();
            link.session.subscribe_presence(&users)?;
        }
        Ok(())
    }

    /// Queues a keepalive.
    pub fn ping(&self, nonce: u64) {
        match self {
            Link::Switchboard(link) => {
                let _ = link.session.ping(nonce);
            }
            Link::Mqtt(link) => link.ping(),
        }
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        match self {
            Link::Switchboard(link) => Ok(link.session.flush().await?),
            Link::Mqtt(link) => link.wire.flush().await,
        }
    }

    /// The next event when it is already read (a burst of input), `None`
    /// when the next one needs the socket: the caller answers the burst
    /// (acks, flush) before waiting.
    pub async fn ready_event(&self) -> Option<anyhow::Result<Event>> {
        match self {
            Link::Switchboard(link) => link.ready_event().await,
            Link::Mqtt(link) => {
                if link.wire.read_buffer().is_empty() {
                    None
                } else {
                    Some(Box::pin(link.next_event()).await)
                }
            }
        }
    }

    /// The next event. One task per link calls this.
    pub async fn next_event(&self) -> anyhow::Result<Event> {
        match self {
            Link::Switchboard(link) => link.next_event().await,
            // Boxed: the MQTT read future holds its read chunk, and every
            // waiting reader's future is as large as its largest variant.
            Link::Mqtt(link) => Box::pin(link.next_event()).await,
        }
    }

    /// Closes the connection (MQTT: DISCONNECT first, keeping the session).
    pub async fn close(&self) {
        match self {
            Link::Switchboard(link) => {
                // Dropping the session closes the socket; flush what is queued
                // (acks) first so the server does not redeliver it.
                let _ = link.session.flush().await;
            }
            Link::Mqtt(link) => {
                link.queue_disconnect();
                link.wire.close().await;
            }
        }
    }
}

/// Bytes at the front of every payload the harness sends.
pub const PAYLOAD_HEADER_BYTES: usize = 28;
const PAYLOAD_MAGIC: u32 = 0x5342_4231; // "SBB1"

/// What a payload carries so its recipient can time it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadHeader {
    pub sender_index: u64,
    pub msg_id: u64,
    pub scheduled_ns: u64,
}

impl PayloadHeader {
    /// A payload of `size_bytes` (at least the header) starting with `self`.
    pub fn encode(&self, size_bytes: usize) -> Bytes {
        let mut out = BytesMut::with_capacity(size_bytes.max(PAYLOAD_HEADER_BYTES));
        out.put_u32(PAYLOAD_MAGIC);
        out.put_u64(self.sender_index);
        out.put_u64(self.msg_id);
        out.put_u64(self.scheduled_ns);
        out.resize(size_bytes.max(PAYLOAD_HEADER_BYTES), 0xa5);
        out.freeze()
    }

    pub fn decode(mut payload: &[u8]) -> Option<PayloadHeader> {
        if payload.len() < PAYLOAD_HEADER_BYTES || payload.get_u32() != PAYLOAD_MAGIC {
            return None;
        }
        Some(PayloadHeader {
            sender_index: payload.get_u64(),
            msg_id: payload.get_u64(),
            scheduled_ns: payload.get_u64(),
        })
    }
}

const RECEIPT_MAGIC: u32 = 0x5342_5231; // "SBR1"

/// The payload of a delivered receipt carried over MQTT
/// (`--mqtt-receipts`): which message of the topic's owner was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptPayload {
    pub msg_id: u64,
}

impl ReceiptPayload {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(12);
        out.put_u32(RECEIPT_MAGIC);
        out.put_u64(self.msg_id);
        out.freeze()
    }

    pub fn decode(mut payload: &[u8]) -> Option<ReceiptPayload> {
        if payload.len() != 12 || payload.get_u32() != RECEIPT_MAGIC {
            return None;
        }
        Some(ReceiptPayload {
            msg_id: payload.get_u64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_payload_round_trips_and_is_no_message() {
        let receipt = ReceiptPayload { msg_id: 42 };
        let bytes = receipt.encode();
        assert_eq!(ReceiptPayload::decode(&bytes), Some(receipt));
        assert_eq!(PayloadHeader::decode(&bytes), None);
        let message = PayloadHeader {
            sender_index: 1,
            msg_id: 42,
            scheduled_ns: 5,
        }
        .encode(100);
        assert_eq!(ReceiptPayload::decode(&message), None);
    }

    #[test]
    fn payload_header_round_trips_at_any_size() {
        let header = PayloadHeader {
            sender_index: 7,
            msg_id: 9,
            scheduled_ns: 123_456_789,
        };
        for size in [0, 28, 100, 4096] {
            let bytes = header.encode(size);
            assert_eq!(bytes.len(), size.max(PAYLOAD_HEADER_BYTES));
            assert_eq!(PayloadHeader::decode(&bytes), Some(header));
        }
        assert_eq!(PayloadHeader::decode(b"short"), None);
    }

    #[test]
    fn no_answer_names_the_wait_the_peer_and_the_bound() {
        let error = NoAnswer {
            awaited: "Registered",
            from: "127.0.0.1:7701".parse().unwrap(),
            within: Duration::from_secs(5),
        };
        assert_eq!(
            error.to_string(),
            "no Registered from 127.0.0.1:7701 within 5 s"
        );
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5 s");
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!(t.protocol, Protocol::Mqtt);
        assert_eq!(t.url(), "mqtt://127.0.0.1:1883");
        let t = Target::parse("127.0.0.1:7700").unwrap();
        assert_eq!(t.protocol, Protocol::Switchboard);
        assert!(Target::parse("localhost:7700").is_err());
    }
}
