//! One user's connection to the target, whichever protocol it speaks.
//!
//! [`Wire`] is the byte stream both protocols share: a glommio socket split
//! in a read half (one reading task) and a write half behind a buffered
//! output queue that any task fills and whoever calls `flush` drains.
//! [`Link`] is the protocol on top: Switchboard's wire protocol v1 (the codec
//! of `switchboard::proto`) or MQTT 3.1.1 (`crate::mqtt`).
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
use switchboard::proto::{self, pb, Frame, PROTOCOL_VERSION};

use crate::mqtt::MqttLink;

/// Bytes read from a socket per read call. An idle link holds no read
/// buffer; this is the size of the one taken for a read in progress.
pub const READ_CHUNK_BYTES: usize = 2048;
/// Largest Switchboard frame accepted from the server (the server's default).
pub const FRAME_BYTES_MAX: u32 = 66_560;

/// Runs `future`, failing after `duration` with `what` in the message.
pub async fn with_timeout<T>(
    duration: Duration,
    what: &str,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    futures_lite::future::or(future, async {
        glommio::timer::sleep(duration).await;
        Err(anyhow!("{what} timed out after {duration:?}"))
    })
    .await
}

/// What a run connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Switchboard,
    Mqtt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub protocol: Protocol,
    pub server: SocketAddr,
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
        Ok(Target { protocol, server })
    }

    pub fn url(&self) -> String {
        match self.protocol {
            Protocol::Switchboard => format!("switchboard://{}", self.server),
            Protocol::Mqtt => format!("mqtt://{}", self.server),
        }
    }
}

/// A Switchboard account as the harness stores it (`--users FILE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub user: u64,
    pub device: u32,
    /// The 32-byte secret, hex.
    pub secret: String,
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
    Deliver { sequence: u64, payload: Bytes },
    /// Delivered receipt (✓✓) for our messages; `sequence` is the receipt's
    /// own inbox sequence, acknowledged like a delivery.
    Receipt { sequence: u64, msg_ids: Vec<u64> },
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

/// A Switchboard device session on the wire protocol.
pub struct SwitchboardLink {
    wire: Wire,
}

impl SwitchboardLink {
    async fn read_frame(&self) -> anyhow::Result<Frame> {
        loop {
            let frame = proto::next_frame(&mut self.wire.read_buffer(), FRAME_BYTES_MAX)
                .map_err(|e| anyhow!("bad frame from the server: {e}"))?;
            if let Some(frame) = frame {
                return Ok(frame);
            }
            self.wire.fill().await?;
        }
    }

    fn queue(&self, frame: &Frame) {
        frame.encode(&mut self.wire.out.borrow_mut());
    }

    /// Creates an account (Register → Registered; the server then closes).
    pub async fn register(
        server: SocketAddr,
        bind_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> anyhow::Result<Account> {
        with_timeout(timeout, "registration", async {
            let link = SwitchboardLink {
                wire: Wire::new(crate::mqtt::connect_socket(server, bind_ip)?),
            };
            link.queue(&Frame::Register(pb::Register {
                protocol_version: PROTOCOL_VERSION,
                registration_token: String::new(),
            }));
            link.wire.flush().await?;
            match link.read_frame().await? {
                Frame::Registered(r) => Ok(Account {
                    user: r.user_id,
                    device: r.device_id,
                    secret: hex::encode(&r.secret),
                }),
                Frame::Error(e) => bail!("registration refused: {e:?}"),
                other => bail!("expected Registered, got {:?}", other.frame_type()),
            }
        })
        .await
    }

    pub async fn connect(
        server: SocketAddr,
        bind_ip: Option<IpAddr>,
        account: &Account,
        timeout: Duration,
    ) -> anyhow::Result<SwitchboardLink> {
        with_timeout(timeout, "Hello", async {
            let link = SwitchboardLink {
                wire: Wire::new(crate::mqtt::connect_socket(server, bind_ip)?),
            };
            link.queue(&Frame::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                user_id: account.user,
                device_id: account.device,
                secret: hex::decode(&account.secret)?.into(),
            }));
            link.wire.flush().await?;
            match link.read_frame().await? {
                Frame::Welcome(_) => Ok(link),
                Frame::Error(e) => bail!("Hello refused: {e:?}"),
                other => bail!("expected Welcome, got {:?}", other.frame_type()),
            }
        })
        .await
    }

    async fn next_event(&self) -> anyhow::Result<Event> {
        loop {
            let frame = match self.read_frame().await {
                Ok(frame) => frame,
                Err(_) if self.wire.is_closed() => return Ok(Event::Closed),
                Err(e) => return Err(e),
            };
            match frame {
                Frame::ServerAck(ack) => {
                    return Ok(Event::Ack {
                        msg_id: ack.client_message_id,
                    })
                }
                Frame::Deliver(d) => {
                    return Ok(Event::Deliver {
                        sequence: d.sequence,
                        payload: d.payload,
                    })
                }
                Frame::Receipt(r) => {
                    if r.kind == pb::ReceiptKind::Delivered as i32 {
                        return Ok(Event::Receipt {
                            sequence: r.sequence,
                            msg_ids: r.client_message_ids,
                        });
                    }
                    // A read receipt: acknowledge it, time nothing.
                    self.queue(&Frame::Ack(pb::Ack {
                        up_to_sequence: r.sequence,
                        sequences: Vec::new(),
                    }));
                }
                Frame::Pong(_) => {}
                Frame::Error(e) if !e.fatal => bail!("server error: {e:?}"),
                Frame::Error(e) => bail!("fatal server error: {e:?}"),
                Frame::GoAway(g) => bail!("server went away: {g:?}"),
                other => bail!("unexpected {:?} from the server", other.frame_type()),
            }
        }
    }
}

/// A connected user.
pub enum Link {
    Switchboard(SwitchboardLink),
    Mqtt(MqttLink),
}

impl Link {
    /// Connects `user` (authenticated and ready to send and receive).
    pub async fn connect(
        target: &Target,
        user: &User,
        bind_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> anyhow::Result<Rc<Link>> {
        let link = match target.protocol {
            Protocol::Switchboard => {
                let account = user
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("user {} has no account", user.index))?;
                Link::Switchboard(
                    SwitchboardLink::connect(target.server, bind_ip, account, timeout).await?,
                )
            }
            Protocol::Mqtt => {
                Link::Mqtt(MqttLink::connect(target.server, bind_ip, user.index, timeout).await?)
            }
        };
        Ok(Rc::new(link))
    }

    fn wire(&self) -> &Wire {
        match self {
            Link::Switchboard(link) => &link.wire,
            Link::Mqtt(link) => &link.wire,
        }
    }

    /// Queues message `msg_id` for user `peer`.
    pub fn send(&self, peer: &User, msg_id: u64, payload: Bytes) -> anyhow::Result<()> {
        match self {
            Link::Switchboard(link) => {
                let account = peer
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("peer {} has no account", peer.index))?;
                link.queue(&Frame::Send(pb::Send {
                    client_message_id: msg_id,
                    recipient_user_id: account.user,
                    payload,
                    device_payloads: Vec::new(),
                }));
                Ok(())
            }
            Link::Mqtt(link) => link.send(peer.index, msg_id, payload),
        }
    }

    /// Acknowledges inbox entries up to `sequence` (MQTT PUBACKs each
    /// delivery by itself, so nothing to do there).
    pub fn ack(&self, sequence: u64) {
        if let Link::Switchboard(link) = self {
            link.queue(&Frame::Ack(pb::Ack {
                up_to_sequence: sequence,
                sequences: Vec::new(),
            }));
        }
    }

    /// Queues a keepalive.
    pub fn ping(&self, nonce: u64) {
        match self {
            Link::Switchboard(link) => link.queue(&Frame::Ping(pb::Ping { nonce })),
            Link::Mqtt(link) => link.ping(),
        }
    }

    pub async fn flush(&self) -> anyhow::Result<()> {
        self.wire().flush().await
    }

    /// True when bytes already read wait to be decoded.
    pub fn input_buffered(&self) -> bool {
        !self.wire().read_buffer().is_empty()
    }

    /// The next event. One task per link calls this.
    pub async fn next_event(&self) -> anyhow::Result<Event> {
        match self {
            Link::Switchboard(link) => link.next_event().await,
            Link::Mqtt(link) => link.next_event().await,
        }
    }

    /// Closes the connection (MQTT: DISCONNECT first, keeping the session).
    pub async fn close(&self) {
        if let Link::Mqtt(link) = self {
            link.queue_disconnect();
        }
        self.wire().close().await;
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_targets() {
        let t = Target::parse("mqtt://127.0.0.1:1883").unwrap();
        assert_eq!(t.protocol, Protocol::Mqtt);
        assert_eq!(t.url(), "mqtt://127.0.0.1:1883");
        let t = Target::parse("127.0.0.1:7700").unwrap();
        assert_eq!(t.protocol, Protocol::Switchboard);
        assert!(Target::parse("localhost:7700").is_err());
    }
}
