//! The lean engine (`--engine lean`): the p2p and group scenarios' links
//! driven by one epoll set on the worker's thread, with non-blocking sockets
//! and no async runtime in the hot path.
//!
//! The default engine runs every link as glommio tasks, and glommio waits
//! for a socket with one io_uring poll per read: each arrival is a
//! completion the kernel posts through task work, and on loopback the
//! server pays part of that wake-up when it sends. Here a wake-up covers
//! every socket that became readable since the last one (epoll's ready
//! list), a step's sends and acks go out with one `send` per link per loop
//! turn, and the schedule's next send time is a timerfd in the same set, so
//! an open-loop send is never late by more than the loop's own work.
//!
//! Only what those scenarios need: plaintext Switchboard links (Hello →
//! Welcome, then Send, CreateGroup and Ack, and the server's ServerAck,
//! Deliver, Receipt and GroupInfo) and MQTT 3.1.1 QoS 1 links (the same
//! sessions and topics as the default engine's). The counters, latencies and
//! timeline are the worker's own (`on_pair_event`, `on_group_event`), so
//! reports are the same as with the default engine. A step blocks the
//! worker's thread for its duration and its drain, both bounded; the
//! coordinator hears from the worker again when the step's report comes.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BytesMut};
use mqttbytes::v4::{self, Packet};
use mqttbytes::QoS;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use switchboard::proto::{self, pb, Frame};

use crate::link::{Event, PayloadHeader, Protocol, ReceiptPayload, User, FRAME_BYTES_MAX};
use crate::mqtt::{group_topic, topic, Subscriptions};

/// Bytes read from a socket per `recv`.
const READ_BYTES: usize = 64 * 1024;

/// `recv` calls per link per turn: a server that sends faster than the
/// harness reads cannot hold the loop on one link (epoll reports the rest
/// at the next turn).
const READS_PER_TURN_MAX: usize = 4;

/// Bytes a link may hold unwritten; a send past it fails (the server is not
/// reading), as the default engine's queue bound does.
const OUTPUT_BYTES_MAX: usize = 4 << 20;

/// Epoll events taken per wait.
const EVENTS_MAX: usize = 256;

/// The timerfd's token in the epoll set (links use their slot index).
const TIMER_TOKEN: u64 = u64::MAX;

/// MQTT packets larger than this end the link.
const MQTT_PACKET_BYTES_MAX: usize = 1 << 20;

/// One connected user.
pub struct LeanLink {
    stream: TcpStream,
    protocol: Protocol,
    input: BytesMut,
    output: BytesMut,
    /// Waiting in `Lean::dirty` for this turn's write.
    dirty: bool,
    /// EPOLLOUT is armed: the socket took only part of the output.
    armed_out: bool,
    closed: bool,
    /// MQTT: packet id → our message id, until its PUBACK
    /// (`RECEIPT_PUBLISH` for a receipt this link published).
    inflight: HashMap<u16, u64>,
    next_packet_id: u16,
    /// MQTT: answer each message delivered with a delivered receipt
    /// published to its sender's topic (`LeanLink::with_mqtt_receipts`).
    mqtt_receipts: bool,
    /// Switchboard: the Deliver/Receipt frames the server keeps
    /// unacknowledged, from Welcome (0 for MQTT).
    delivery_window: u32,
}

/// `LeanLink::inflight`'s value for a receipt's PUBLISH: its PUBACK is no
/// event (no message id comes near it).
const RECEIPT_PUBLISH: u64 = u64::MAX;

/// The worker's lean links: slot index → link, and the epoll set.
pub struct Lean {
    epoll: Epoll,
    timer: TimerFd,
    links: Vec<Option<LeanLink>>,
    dirty: Vec<usize>,
    /// Scratch of `turn`: the links to read, and the buffer they read into.
    readable: Vec<usize>,
    chunk: Box<[u8]>,
}

/// Opens a TCP connection to `server` from `bind_ip`, blocking, within
/// `timeout`.
fn connect_stream(
    server: SocketAddr,
    bind_ip: Option<IpAddr>,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    use nix::sys::socket::{self as ns, AddressFamily, SockFlag, SockProtocol, SockType};
    use socket2::{SockAddr, Socket};
    let family = if server.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = ns::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Tcp,
    )?;
    if bind_ip.is_some() {
        // Let the kernel pick the port at connect time from the whole
        // 4-tuple space.
        ns::setsockopt(&fd, ns::sockopt::IpBindAddressNoPort, &true)
            .context("IP_BIND_ADDRESS_NO_PORT")?;
    }
    let socket = Socket::from(TcpStream::from(fd));
    socket.set_nodelay(true)?;
    if let Some(ip) = bind_ip {
        socket
            .bind(&SockAddr::from(SocketAddr::new(ip, 0)))
            .with_context(|| format!("binding source address {ip}"))?;
    }
    // A signal may interrupt the blocking connect; the kernel goes on
    // connecting, so then wait for the socket to be writable.
    let connected = socket.connect_timeout(&SockAddr::from(server), timeout);
    let stream: TcpStream = socket.into();
    match connected {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            let mut fds = [nix::poll::PollFd::new(
                stream.as_fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
            nix::poll::poll(&mut fds, ms).with_context(|| format!("connecting to {server}"))?;
            if let Some(e) = stream.take_error()? {
                return Err(e).with_context(|| format!("connecting to {server}"));
            }
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {server}")),
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Reads from a blocking stream until `parse` finds a whole message in
/// `input`.
fn read_until<T>(
    stream: &mut TcpStream,
    input: &mut BytesMut,
    mut parse: impl FnMut(&mut BytesMut) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(found) = parse(input)? {
            return Ok(found);
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            bail!("the server closed the connection");
        }
        input.extend_from_slice(&chunk[..n]);
    }
}

fn mqtt_packet(input: &mut BytesMut) -> anyhow::Result<Option<Packet>> {
    match v4::read(input, MQTT_PACKET_BYTES_MAX) {
        Ok(packet) => Ok(Some(packet)),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => bail!("malformed packet from the broker: {e:?}"),
    }
}

fn switchboard_frame(input: &mut BytesMut) -> anyhow::Result<Option<Frame>> {
    proto::next_frame(input, FRAME_BYTES_MAX).map_err(|e| anyhow!("malformed frame: {e}"))
}

impl LeanLink {
    /// Connects and logs `user` in (Switchboard: a plaintext Hello with the
    /// account's secret; MQTT: the persistent session of the default
    /// engine, subscribed to the user's topic), then makes the socket
    /// non-blocking. Bytes that came after the login stay in `input`.
    pub fn connect(
        server: SocketAddr,
        protocol: Protocol,
        user: &User,
        subscriptions: &Subscriptions,
        bind_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> anyhow::Result<LeanLink> {
        let mut stream = connect_stream(server, bind_ip, timeout)?;
        let mut input = BytesMut::new();
        let mut output = BytesMut::new();
        let mut delivery_window = 0;
        match protocol {
            Protocol::Switchboard => {
                let account = user
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("user {} has no account", user.index))?;
                if account.secret.is_empty() {
                    bail!(
                        "user {} has no secret: the lean engine logs in in plaintext \
                         (register with --transport plain)",
                        user.index
                    );
                }
                Frame::Hello(pb::Hello {
                    protocol_version: proto::PROTOCOL_VERSION,
                    user_id: account.user,
                    device_id: account.device,
                    secret: hex::decode(&account.secret)?.into(),
                })
                .encode(&mut output);
                stream.write_all(&output)?;
                output.clear();
                match read_until(&mut stream, &mut input, switchboard_frame)? {
                    Frame::Welcome(welcome) => delivery_window = welcome.delivery_window,
                    Frame::Error(e) => bail!("{server} refused the login: {e:?}"),
                    other => bail!("{server} answered Hello with {other:?}"),
                }
            }
            Protocol::Mqtt => {
                // The default engine's sessions: persistent on the user's own
                // topic (p2p), clean on the groups' topics.
                let (client_id, topics) = match subscriptions {
                    Subscriptions::Own => {
                        (format!("sb-bench-u{}", user.index), vec![topic(user.index)])
                    }
                    Subscriptions::Groups(groups) => (
                        format!("sb-bench-g-u{}", user.index),
                        groups.iter().map(|&g| group_topic(g)).collect(),
                    ),
                };
                let mut connect = v4::Connect::new(client_id);
                connect.clean_session = *subscriptions != Subscriptions::Own;
                connect.keep_alive = 0;
                connect
                    .write(&mut output)
                    .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
                stream.write_all(&output)?;
                output.clear();
                let present = match read_until(&mut stream, &mut input, mqtt_packet)? {
                    Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {
                        ack.session_present
                    }
                    other => bail!("{server} refused CONNECT: {other:?}"),
                };
                if !present && !topics.is_empty() {
                    let mut subscribe = v4::Subscribe::empty_subscribe();
                    for topic in topics {
                        subscribe.add(topic, QoS::AtLeastOnce);
                    }
                    subscribe.pkid = 1;
                    subscribe
                        .write(&mut output)
                        .map_err(|e| anyhow!("encoding SUBSCRIBE: {e:?}"))?;
                    stream.write_all(&output)?;
                    output.clear();
                    match read_until(&mut stream, &mut input, mqtt_packet)? {
                        Packet::SubAck(_) => {}
                        other => bail!("expected SUBACK from {server}, got {other:?}"),
                    }
                }
            }
        }
        stream.set_nonblocking(true)?;
        Ok(LeanLink {
            stream,
            protocol,
            input,
            output,
            dirty: false,
            armed_out: false,
            closed: false,
            inflight: HashMap::new(),
            next_packet_id: 1,
            mqtt_receipts: false,
            delivery_window,
        })
    }

    /// Switchboard: the delivery window the server's Welcome announced.
    pub fn delivery_window(&self) -> u32 {
        self.delivery_window
    }

    /// MQTT: makes the link answer every message delivered to it with a
    /// delivered receipt, the ✓✓ of a Switchboard exchange carried over
    /// MQTT: a QoS 1 PUBLISH of `ReceiptPayload` to the sender's topic,
    /// queued with the message's PUBACK; a receipt delivered to the link is
    /// acknowledged and reported as `Event::Receipt`.
    pub fn with_mqtt_receipts(mut self, on: bool) -> LeanLink {
        self.mqtt_receipts = on && self.protocol == Protocol::Mqtt;
        self
    }

    /// Queues message `msg_id` to `peer`.
    pub fn send(&mut self, peer: &User, msg_id: u64, payload: bytes::Bytes) -> anyhow::Result<()> {
        self.check_room()?;
        match self.protocol {
            Protocol::Switchboard => {
                let account = peer
                    .account
                    .as_ref()
                    .ok_or_else(|| anyhow!("peer {} has no account", peer.index))?;
                Frame::Send(pb::Send {
                    client_message_id: msg_id,
                    recipient_user_id: account.user,
                    payload,
                    ..Default::default()
                })
                .encode(&mut self.output);
            }
            Protocol::Mqtt => self.publish(topic(peer.index), msg_id, payload)?,
        }
        Ok(())
    }

    /// Queues group message `msg_id` (Switchboard: to the server's group
    /// `group_id`; MQTT: to the topic of group `group`).
    pub fn send_group(
        &mut self,
        group: u32,
        group_id: u64,
        msg_id: u64,
        payload: bytes::Bytes,
    ) -> anyhow::Result<()> {
        self.check_room()?;
        match self.protocol {
            Protocol::Switchboard => {
                Frame::Send(pb::Send {
                    client_message_id: msg_id,
                    group_id,
                    payload,
                    ..Default::default()
                })
                .encode(&mut self.output);
                Ok(())
            }
            Protocol::Mqtt => self.publish(group_topic(group), msg_id, payload),
        }
    }

    /// Fails when the output holds `OUTPUT_BYTES_MAX` already.
    fn check_room(&self) -> anyhow::Result<()> {
        if self.output.len() >= OUTPUT_BYTES_MAX {
            bail!(
                "{} bytes queued that the server has not read",
                self.output.len()
            );
        }
        Ok(())
    }

    /// Queues CreateGroup `request_id` with the accounts `members`
    /// (Switchboard; an MQTT topic needs no creating).
    pub fn create_group(&mut self, request_id: u64, name: &str, members: &[u64]) {
        Frame::CreateGroup(pb::CreateGroup {
            request_id,
            name: name.to_string(),
            member_user_ids: members.to_vec(),
        })
        .encode(&mut self.output);
    }

    /// Queues a QoS 1 PUBLISH of `payload` to `topic`; its PUBACK is the
    /// ack of message `msg_id`.
    fn publish(&mut self, topic: String, msg_id: u64, payload: bytes::Bytes) -> anyhow::Result<()> {
        let packet_id = self.next_packet_id;
        self.next_packet_id = packet_id.checked_add(1).unwrap_or(1);
        let mut publish = v4::Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        publish.pkid = packet_id;
        publish
            .write(&mut self.output)
            .map_err(|e| anyhow!("encoding PUBLISH: {e:?}"))?;
        if self.inflight.insert(packet_id, msg_id).is_some() {
            bail!("65,535 PUBLISHes of one client are unacknowledged");
        }
        Ok(())
    }

    /// Queues a cumulative Ack of the inbox up to `sequence` (Switchboard;
    /// MQTT acknowledges each PUBLISH as it is read).
    pub fn ack(&mut self, sequence: u64) {
        Frame::Ack(pb::Ack {
            up_to_sequence: sequence,
            sequences: Vec::new(),
        })
        .encode(&mut self.output);
    }

    /// The next whole message read, as an event (`None`: none is whole).
    fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            let event = match self.protocol {
                Protocol::Switchboard => match switchboard_frame(&mut self.input)? {
                    None => return Ok(None),
                    // A server Ping must be answered (protocol §4.7).
                    Some(Frame::Ping(ping)) => {
                        Frame::Pong(pb::Pong { nonce: ping.nonce }).encode(&mut self.output);
                        None
                    }
                    Some(frame) => switchboard_event(frame)?,
                },
                Protocol::Mqtt => match mqtt_packet(&mut self.input)? {
                    None => return Ok(None),
                    Some(Packet::PubAck(ack)) => match self.inflight.remove(&ack.pkid) {
                        Some(RECEIPT_PUBLISH) => None,
                        Some(msg_id) => Some(Event::Ack { msg_id }),
                        None => bail!("PUBACK for unknown packet id {}", ack.pkid),
                    },
                    Some(Packet::Publish(publish)) => {
                        if publish.qos != QoS::AtMostOnce {
                            v4::PubAck::new(publish.pkid)
                                .write(&mut self.output)
                                .map_err(|e| anyhow!("encoding PUBACK: {e:?}"))?;
                        }
                        if !self.mqtt_receipts {
                            Some(Event::Deliver {
                                sequence: 0,
                                payload: publish.payload,
                                group_event: false,
                            })
                        } else if let Some(receipt) = ReceiptPayload::decode(&publish.payload) {
                            Some(Event::Receipt {
                                sequence: 0,
                                msg_ids: vec![receipt.msg_id],
                            })
                        } else {
                            if let Some(header) = PayloadHeader::decode(&publish.payload) {
                                let receipt = ReceiptPayload {
                                    msg_id: header.msg_id,
                                };
                                self.publish(
                                    topic(header.sender_index),
                                    RECEIPT_PUBLISH,
                                    receipt.encode(),
                                )?;
                            }
                            Some(Event::Deliver {
                                sequence: 0,
                                payload: publish.payload,
                                group_event: false,
                            })
                        }
                    }
                    Some(Packet::PingResp | Packet::SubAck(_)) => None,
                    Some(other) => bail!("unexpected packet from the broker: {other:?}"),
                },
            };
            if let Some(event) = event {
                return Ok(Some(event));
            }
        }
    }

    /// Reads what the socket holds, until it would block or for at most
    /// `READS_PER_TURN_MAX` reads, through `chunk`. False once the peer
    /// closed or the read failed.
    fn fill(&mut self, chunk: &mut [u8]) -> bool {
        let mut reads = 0;
        while reads < READS_PER_TURN_MAX {
            match self.stream.read(chunk) {
                Ok(0) => {
                    self.closed = true;
                    return false;
                }
                Ok(n) => {
                    reads += 1;
                    self.input.extend_from_slice(&chunk[..n]);
                    if n < chunk.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
        }
        true
    }

    /// Writes what is queued, until the socket would block. False when the
    /// write failed.
    fn flush(&mut self) -> bool {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => {
                    self.closed = true;
                    return false;
                }
                Ok(n) => self.output.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
        }
        true
    }
}

/// What a Switchboard frame means to the p2p shape (`None`: nothing).
fn switchboard_event(frame: Frame) -> anyhow::Result<Option<Event>> {
    Ok(match frame {
        Frame::ServerAck(ack) => Some(Event::Ack {
            msg_id: ack.client_message_id,
        }),
        Frame::Deliver(d) => Some(Event::Deliver {
            sequence: d.sequence,
            payload: d.payload,
            group_event: d.group_event.is_some(),
        }),
        Frame::Receipt(r) if r.kind == pb::ReceiptKind::Delivered as i32 => Some(Event::Receipt {
            sequence: r.sequence,
            msg_ids: r.client_message_ids,
        }),
        // A read receipt is acknowledged like any inbox entry, timed never.
        Frame::Receipt(r) => Some(Event::Receipt {
            sequence: r.sequence,
            msg_ids: Vec::new(),
        }),
        Frame::GroupInfo(info) => Some(Event::GroupCreated {
            request_id: info.request_id,
            group_id: info.group_id,
        }),
        Frame::Error(e) if !e.fatal => Some(Event::Refused {
            msg_id: e.client_message_id,
            code: switchboard::client::error_code_name(e.code),
        }),
        Frame::Error(e) => bail!("server error: {e:?}"),
        Frame::GoAway(g) => bail!("server went away: {g:?}"),
        _ => None,
    })
}

impl Lean {
    pub fn new(slots: usize) -> anyhow::Result<Lean> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(
            timer.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
        )?;
        Ok(Lean {
            epoll,
            timer,
            links: (0..slots).map(|_| None).collect(),
            dirty: Vec::new(),
            readable: Vec::new(),
            chunk: vec![0u8; READ_BYTES].into_boxed_slice(),
        })
    }

    pub fn is_connected(&self, slot: usize) -> bool {
        self.links[slot].is_some()
    }

    /// Adds a connected link for `slot`.
    pub fn insert(&mut self, slot: usize, link: LeanLink) -> anyhow::Result<()> {
        self.epoll.add(
            link.stream.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, slot as u64),
        )?;
        let pending = !link.input.is_empty();
        self.links[slot] = Some(link);
        if pending {
            // Bytes that came with the login: handled at the next turn.
            self.mark(slot);
        }
        Ok(())
    }

    /// Closes the link of `slot` (MQTT: DISCONNECT first, which keeps the
    /// session). Whether there was one.
    pub fn close(&mut self, slot: usize) -> bool {
        let Some(mut link) = self.links[slot].take() else {
            return false;
        };
        let _ = self.epoll.delete(link.stream.as_fd());
        if link.protocol == Protocol::Mqtt {
            let _ = v4::Disconnect.write(&mut link.output);
        }
        let _ = link.stream.set_nonblocking(false);
        let _ = link.stream.write_all(&link.output);
        true
    }

    pub fn link_mut(&mut self, slot: usize) -> Option<&mut LeanLink> {
        self.links[slot].as_mut()
    }

    /// Marks `slot`'s link for this turn's write (and read of bytes held).
    pub fn mark(&mut self, slot: usize) {
        if let Some(link) = self.links[slot].as_mut() {
            if !link.dirty {
                link.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Arms the timer for `at_ns` (`CLOCK_MONOTONIC`); `None` disarms it.
    pub fn wake_at(&self, at_ns: Option<u64>) -> anyhow::Result<()> {
        match at_ns {
            Some(at) => {
                // An absolute time of 0 would disarm the timer.
                let at = at.max(1);
                let spec = TimeSpec::new((at / 1_000_000_000) as i64, (at % 1_000_000_000) as i64);
                self.timer.set(
                    Expiration::OneShot(spec),
                    TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                )?;
            }
            None => self.timer.unset()?,
        }
        Ok(())
    }

    /// One turn: writes what the marked links queued, waits at most
    /// `timeout` (or until the timer) for input, and hands every whole
    /// message read to `on_event(slot, event)`; answers it queues go out at
    /// the next turn. Returns the slots whose link closed or failed, with
    /// why.
    pub fn turn(
        &mut self,
        timeout: Duration,
        mut on_event: impl FnMut(usize, Event),
    ) -> Vec<(usize, String)> {
        let mut failed = Vec::new();
        self.write_marked(&mut failed);
        let mut events = [EpollEvent::empty(); EVENTS_MAX];
        let ms = timeout.as_millis().min(u128::from(u16::MAX)) as u16;
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                failed.push((usize::MAX, format!("epoll_wait: {e}")));
                return failed;
            }
        };
        let mut readable = std::mem::take(&mut self.readable);
        readable.clear();
        for event in &events[..n] {
            let token = event.data();
            if token == TIMER_TOKEN {
                let _ = self.timer.wait();
                continue;
            }
            let slot = token as usize;
            let flags = event.events();
            if let Some(link) = self.links[slot].as_mut() {
                if flags.contains(EpollFlags::EPOLLOUT) && !link.dirty {
                    link.dirty = true;
                    self.dirty.push(slot);
                }
                if flags
                    .intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
                {
                    readable.push(slot);
                }
            }
        }
        // Links holding bytes from their login are read too.
        for &slot in &self.dirty {
            if self.links[slot]
                .as_ref()
                .is_some_and(|l| !l.input.is_empty())
            {
                readable.push(slot);
            }
        }
        for &slot in &readable {
            let Some(link) = self.links[slot].as_mut() else {
                continue;
            };
            let open = link.fill(&mut self.chunk);
            while let Some(link) = self.links[slot].as_mut() {
                match link.next_event() {
                    Ok(Some(event)) => on_event(slot, event),
                    Ok(None) => break,
                    Err(e) => {
                        failed.push((slot, format!("{e:#}")));
                        self.close(slot);
                        break;
                    }
                }
            }
            if let Some(link) = self.links[slot].as_mut() {
                if !link.output.is_empty() && !link.dirty {
                    link.dirty = true;
                    self.dirty.push(slot);
                }
            }
            if !open && self.links[slot].is_some() {
                failed.push((slot, "the server closed the connection".into()));
                self.close(slot);
            }
        }
        self.readable = readable;
        failed
    }

    /// Writes what the marked links queued since the last turn, without
    /// waiting for input: a loop that stops turning sends its last answers
    /// (the Acks of a step's final deliveries, which the senders' receipts
    /// wait on) instead of leaving them queued. Returns the slots whose
    /// link failed, with why.
    pub fn write_queued(&mut self) -> Vec<(usize, String)> {
        let mut failed = Vec::new();
        self.write_marked(&mut failed);
        failed
    }

    fn write_marked(&mut self, failed: &mut Vec<(usize, String)>) {
        for slot in std::mem::take(&mut self.dirty) {
            let Some(link) = self.links[slot].as_mut() else {
                continue;
            };
            link.dirty = false;
            if !link.flush() {
                failed.push((slot, "writing to the server failed".into()));
                self.close(slot);
                continue;
            }
            // EPOLLOUT only while the socket holds back part of the output.
            let want_out = !link.output.is_empty();
            if want_out != link.armed_out {
                link.armed_out = want_out;
                let flags = if want_out {
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
                } else {
                    EpollFlags::EPOLLIN
                };
                let _ = self.epoll.modify(
                    link.stream.as_fd(),
                    &mut EpollEvent::new(flags, slot as u64),
                );
            }
        }
    }
}
