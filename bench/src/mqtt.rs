//! An MQTT 3.1.1 client on glommio sockets, for the broker side of a run.
//!
//! The closest MQTT shape of a Switchboard user: one persistent session per
//! user (clean session off), subscribed at QoS 1 to its own topic
//! `sb/u<index>`; a message is a QoS 1 PUBLISH to the peer's topic. PUBACK
//! from the broker is the server ack (✓); a PUBLISH arriving at the
//! subscriber is the delivery, which the subscriber PUBACKs. MQTT has no
//! delivered or read receipt, and no dedupe of a republished message.
//!
//! In the `group` scenario a user's session is a clean one of client id
//! `sb-bench-g-u<index>`, subscribed at QoS 1 to the topic `g/<group>` of
//! every group it receives from, and a group message is a QoS 1 PUBLISH to
//! that topic. Clean, so no subscription from an earlier run with other
//! groups survives into this one; nothing else in the broker's delivery path
//! differs for a connected subscriber.
//!
//! The packet codec is `mqttbytes`; reading and writing are ours. One task
//! reads a link (`next_event`), any task may `send` (buffered) and `flush`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use glommio::net::TcpStream;
use mqttbytes::v4::{self, Packet};
use mqttbytes::QoS;

use crate::link::{with_timeout, Event, Wire};

/// Largest MQTT packet accepted from the broker.
const PACKET_BYTES_MAX: usize = 1 << 20;

/// The topic a user subscribes to and its peers publish to.
pub fn topic(user_index: u64) -> String {
    format!("sb/u{user_index}")
}

/// The topic of group `group`'s messages.
pub fn group_topic(group: u32) -> String {
    format!("g/{group}")
}

/// What a user's session subscribes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscriptions {
    /// A persistent session subscribed to the user's own topic (p2p).
    Own,
    /// A clean session subscribed to these groups' topics (none: no
    /// SUBSCRIBE at all).
    Groups(Vec<u32>),
}

/// Opens a non-blocking TCP socket to `server`, bound to `bind_ip` when
/// given. The connect completes in the kernel while the first write waits
/// for it (io_uring retries the send once the socket is writable).
pub fn connect_socket(server: SocketAddr, bind_ip: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let domain = if server.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nodelay(true)?;
    if let Some(ip) = bind_ip {
        // Let the kernel pick the port at connect time from the whole
        // 4-tuple space instead of reserving one at bind.
        let one: libc::c_int = 1;
        // SAFETY: the descriptor is open, the option value points to a live
        // c_int and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
        }
        socket
            .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(server)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e).with_context(|| format!("connecting to {server}")),
    }
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is an open TCP socket we own; ownership moves to the stream.
    Ok(unsafe { TcpStream::from_raw_fd(fd) })
}

pub struct MqttLink {
    pub(crate) wire: Wire,
    /// Packet id → our message id, for PUBACKs still due.
    inflight: RefCell<HashMap<u16, u64>>,
    next_packet_id: Cell<u16>,
}

impl MqttLink {
    /// Connects user `user_index` and makes sure it is subscribed at QoS 1
    /// as `subscriptions` says.
    pub async fn connect(
        server: SocketAddr,
        bind_ip: Option<IpAddr>,
        user_index: u64,
        subscriptions: &Subscriptions,
        timeout: Duration,
    ) -> anyhow::Result<MqttLink> {
        let awaited = Cell::new("CONNACK");
        with_timeout(timeout, &awaited, server, async {
            let link = MqttLink {
                wire: Wire::new(connect_socket(server, bind_ip)?),
                inflight: RefCell::new(HashMap::new()),
                next_packet_id: Cell::new(1),
            };
            let (client_id, topics) = match subscriptions {
                Subscriptions::Own => (format!("sb-bench-u{user_index}"), vec![topic(user_index)]),
                Subscriptions::Groups(groups) => (
                    format!("sb-bench-g-u{user_index}"),
                    groups.iter().map(|&g| group_topic(g)).collect(),
                ),
            };
            let mut connect = v4::Connect::new(client_id);
            connect.clean_session = *subscriptions != Subscriptions::Own;
            // No keep-alive: sessions are held idle for as long as a run
            // asks, and the harness pings on its own schedule.
            connect.keep_alive = 0;
            connect
                .write(&mut link.wire.out.borrow_mut())
                .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
            link.wire
                .flush()
                .await
                .with_context(|| format!("sending CONNECT to {server}"))?;
            let session_present = match link.read_packet().await.with_context(|| {
                format!("waiting for CONNACK from {server} (is this an MQTT broker port?)")
            })? {
                Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {
                    ack.session_present
                }
                other => bail!("{server} refused CONNECT: {other:?}"),
            };
            if !session_present && !topics.is_empty() {
                awaited.set("SUBACK");
                let mut subscribe = v4::Subscribe::empty_subscribe();
                for topic in topics {
                    subscribe.add(topic, QoS::AtLeastOnce);
                }
                subscribe.pkid = 1;
                subscribe
                    .write(&mut link.wire.out.borrow_mut())
                    .map_err(|e| anyhow!("encoding SUBSCRIBE: {e:?}"))?;
                link.wire
                    .flush()
                    .await
                    .with_context(|| format!("sending SUBSCRIBE to {server}"))?;
                match link
                    .read_packet()
                    .await
                    .with_context(|| format!("waiting for SUBACK from {server}"))?
                {
                    Packet::SubAck(_) => {}
                    other => bail!("expected SUBACK from {server}, got {other:?}"),
                }
            }
            Ok(link)
        })
        .await
    }

    /// Queues a QoS 1 PUBLISH of `payload` to the topic of `peer_index`.
    pub fn send(&self, peer_index: u64, msg_id: u64, payload: Bytes) -> anyhow::Result<()> {
        self.publish(topic(peer_index), msg_id, payload)
    }

    /// Queues a QoS 1 PUBLISH of `payload` to `topic`; its PUBACK is the
    /// ack of our message `msg_id`.
    pub fn publish(&self, topic: String, msg_id: u64, payload: Bytes) -> anyhow::Result<()> {
        let packet_id = self.next_packet_id.get();
        self.next_packet_id.set(if packet_id == u16::MAX {
            1
        } else {
            packet_id + 1
        });
        let mut publish = v4::Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        publish.pkid = packet_id;
        publish
            .write(&mut self.wire.out.borrow_mut())
            .map_err(|e| anyhow!("encoding PUBLISH: {e:?}"))?;
        if self
            .inflight
            .borrow_mut()
            .insert(packet_id, msg_id)
            .is_some()
        {
            bail!("65,535 PUBLISHes of one client are unacknowledged");
        }
        Ok(())
    }

    async fn read_packet(&self) -> anyhow::Result<Packet> {
        loop {
            match v4::read(&mut self.wire.read_buffer(), PACKET_BYTES_MAX) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("malformed packet from the broker: {e:?}"),
            }
            self.wire.fill().await?;
        }
    }

    /// The next event; a delivered PUBLISH is PUBACKed (queued, written by
    /// the next flush).
    pub async fn next_event(&self) -> anyhow::Result<Event> {
        loop {
            match self.read_packet().await {
                Ok(Packet::PubAck(ack)) => {
                    let msg_id = self.inflight.borrow_mut().remove(&ack.pkid);
                    match msg_id {
                        Some(msg_id) => return Ok(Event::Ack { msg_id }),
                        None => bail!("PUBACK for unknown packet id {}", ack.pkid),
                    }
                }
                Ok(Packet::Publish(publish)) => {
                    if publish.qos != QoS::AtMostOnce {
                        v4::PubAck::new(publish.pkid)
                            .write(&mut self.wire.out.borrow_mut())
                            .map_err(|e| anyhow!("encoding PUBACK: {e:?}"))?;
                    }
                    return Ok(Event::Deliver {
                        sequence: 0,
                        payload: publish.payload,
                        group_event: false,
                    });
                }
                Ok(Packet::PingResp) | Ok(Packet::SubAck(_)) => continue,
                Ok(other) => bail!("unexpected packet from the broker: {other:?}"),
                Err(_) if self.wire.is_closed() => return Ok(Event::Closed),
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues DISCONNECT, which ends the connection but keeps the session.
    pub fn queue_disconnect(&self) {
        let _ = v4::Disconnect.write(&mut self.wire.out.borrow_mut());
    }

    pub fn ping(&self) {
        let _ = v4::PingReq.write(&mut self.wire.out.borrow_mut());
    }
}
