//! Shards: one pinned glommio executor per CPU, each owning its users.
//!
//! A shard owns, with no locks: its log (and so its users' inboxes, sequence
//! counters and dedupe state), the live connections of its users' devices,
//! and the queue of actions waiting for a group commit. Everything here is
//! `!Send` (`Rc`/`RefCell`) and touched only by the shard's thread. Other
//! shards reach it only through the request and reply channel meshes
//! (`route::message`), built once at start.
//!
//! Invariants:
//! - a ServerAck (✓) is queued only after `Log::durable_ticket()` covers the
//!   record (or its duplicate), so every acknowledged message survives a crash
//!   at the configured durability level;
//! - an inbox entry is delivered only once durable, in sequence order, within
//!   the device's window;
//! - at most one live connection per device (a newer one replaces it).

pub mod server;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use glommio::channels::shared_channel::ConnectedSender;
use tracing::{debug, error, warn};

use crate::config::{Config, Durability};
use crate::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, ShardId, UserId};
use crate::meta::MetaStore;
use crate::metrics::ShardMetrics;
use crate::net::conn::{CloseReason, Conn};
use crate::proto::{error_frame, pb, ErrorCode, Frame, GoAwayReason};
use crate::route::home_shard;
use crate::route::message::{ConnRef, HelloVerdict, RelayRef, Reply, Request};
use crate::session::AuthThrottle;
use crate::store::{
    CommitTicket, Log, NewMessage, NewReceipt, ReceiptKind, StoreError, StoredEntry,
};

/// The id list of a relay entry: the recipient device (user, device), then
/// the receipt's client message ids. A relay inbox serves every device of
/// its target shard, so each entry names its own.
pub fn relay_ids(recipient: InboxKey, client_message_ids: &[u64]) -> Vec<u64> {
    let mut ids = Vec::with_capacity(client_message_ids.len() + 2);
    ids.push(recipient.user.0);
    ids.push(recipient.device.0 as u64);
    ids.extend_from_slice(client_message_ids);
    ids
}

/// Reads back `relay_ids`: the recipient and the message ids.
pub fn split_relay_ids(ids: &[u64]) -> Option<(InboxKey, &[u64])> {
    match ids {
        [user, device, rest @ ..] => Some((
            InboxKey {
                user: UserId(*user),
                device: DeviceId(u32::try_from(*device).ok()?),
            },
            rest,
        )),
        _ => None,
    }
}

pub use crate::ids::PRIMARY_DEVICE;

/// The value a failed channel send hands back.
fn channel_item<T>(err: glommio::GlommioError<T>) -> Option<T> {
    match err {
        glommio::GlommioError::Closed(glommio::ResourceType::Channel(item))
        | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(item)) => Some(item),
        _ => None,
    }
}

/// Requests a frame produced for other shards.
#[derive(Debug)]
pub enum Outbound {
    None,
    One(ShardId, Request),
    Many(Vec<(ShardId, Request)>),
}

/// What to do once the log is durable up to a ticket.
#[derive(Debug)]
enum AfterCommit {
    /// Answer the Send with ServerAck.
    Ack {
        origin: ConnRef,
        client_message_id: ClientMessageId,
        seq: u64,
        timestamp_ms: u64,
    },
    /// An inbox entry became durable: deliverable.
    Visible { inbox: InboxKey },
    /// A relayed receipt became durable: its origin drops its copy.
    Relayed(RelayRef),
}

pub struct Shard {
    pub id: ShardId,
    pub shards: u32,
    pub config: Arc<Config>,
    pub meta: Arc<MetaStore>,
    pub metrics: Arc<ShardMetrics>,
    pub log: RefCell<Log>,
    /// The live session of each device homed here.
    pub devices: RefCell<HashMap<InboxKey, Rc<Conn>>>,
    /// Open sockets on this shard, handshaking or in session.
    pub open_connections: Cell<u32>,
    pending: RefCell<VecDeque<(CommitTicket, AfterCommit)>>,
    pub requests: Vec<Option<ConnectedSender<Request>>>,
    pub replies: Vec<Option<ConnectedSender<Reply>>>,
    pub throttle: RefCell<AuthThrottle>,
    /// The shard's sockets (its io_uring ring and what the loop keeps).
    pub sockets: crate::net::io::Sockets,
    pending_positions: RefCell<Vec<(InboxSeq, crate::store::LogPosition)>>,
    commit_waker: Cell<Option<std::task::Waker>>,
    started: Instant,
    pub stopping: Cell<bool>,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ShardId,
        shards: u32,
        config: Arc<Config>,
        meta: Arc<MetaStore>,
        metrics: Arc<ShardMetrics>,
        log: Log,
        requests: Vec<Option<ConnectedSender<Request>>>,
        replies: Vec<Option<ConnectedSender<Reply>>>,
        sockets: crate::net::io::Sockets,
    ) -> Shard {
        let throttle = AuthThrottle::new(&config.limits);
        Shard {
            id,
            shards,
            config,
            meta,
            metrics,
            log: RefCell::new(log),
            devices: RefCell::new(HashMap::new()),
            open_connections: Cell::new(0),
            pending: RefCell::new(VecDeque::new()),
            requests,
            replies,
            throttle: RefCell::new(throttle),
            sockets,
            pending_positions: RefCell::new(Vec::new()),
            commit_waker: Cell::new(None),
            started: Instant::now(),
            stopping: Cell::new(false),
        }
    }

    /// Coarse clock for idle tracking: seconds since the shard started.
    pub fn now_s(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    pub fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub fn home_of(&self, user: UserId) -> ShardId {
        home_shard(user, self.shards)
    }

    // ---- sessions -------------------------------------------------------

    /// Opens the session of an authenticated device homed here, on driver
    /// socket `socket` accepted at `connected_at`; returns its connection.
    ///
    /// A device has one session: a session connected later replaces an
    /// earlier one (GoAway REPLACED to the earlier). A connection that
    /// finishes its handshake after a later one of the same device (its
    /// Hello's lookup or handoff was slower, typically a connection the
    /// client has already given up) does not take over: it is the one told
    /// REPLACED, and the live session stays.
    pub fn open_session(
        &self,
        device: InboxKey,
        protocol_version: u32,
        socket: crate::net::uring::ConnId,
        connected_at: u32,
    ) -> Rc<Conn> {
        assert_eq!(
            self.home_of(device.user),
            self.id,
            "sessions run on the home shard"
        );
        let conn = Rc::new(Conn::new(device, socket, connected_at, self.now_s()));
        let replaced = |conn: &Conn| {
            conn.close_with(
                &Frame::GoAway(pb::GoAway {
                    reason: GoAwayReason::Replaced as i32,
                    reconnect_after_ms: 0,
                }),
                CloseReason::Replaced,
            )
        };
        let newer = self.devices.borrow().get(&device).is_some_and(|live| {
            crate::net::conn::accepted_after(live.connected_at, connected_at) && !live.is_closing()
        });
        if newer {
            debug!(%device, "a later connection of this device is live; this one is replaced");
            replaced(&conn);
            return conn;
        }
        let limits = &self.config.limits;
        let inbox_pending_through = self.log.borrow().last_pending(device).0;
        conn.enqueue(&Frame::Welcome(pb::Welcome {
            protocol_version,
            server_time_ms: self.now_ms(),
            max_payload_bytes: limits.payload_bytes_max,
            max_frame_bytes: limits.frame_bytes_max,
            delivery_window: limits.delivery_window_messages,
            idle_timeout_ms: limits.idle_timeout_ms,
            ids_per_frame_max: limits.ids_per_frame_max,
            delivery_window_bytes: u64::from(limits.delivery_window_bytes),
            inbox_pending_through,
        }));
        let previous = self.devices.borrow_mut().insert(device, conn.clone());
        if let Some(previous) = previous {
            debug!(%device, "session replaced by a newer connection");
            replaced(&previous);
        }
        self.pump(&conn);
        conn
    }

    /// The session of `device` here, if it is not closing.
    pub fn live_session(&self, device: InboxKey) -> Option<Rc<Conn>> {
        self.devices
            .borrow()
            .get(&device)
            .filter(|live| !live.is_closing())
            .cloned()
    }

    /// Forgets a session whose socket is closing or closed.
    pub fn close_session(&self, conn: &Rc<Conn>) {
        let mut devices = self.devices.borrow_mut();
        if devices
            .get(&conn.device)
            .is_some_and(|c| Rc::ptr_eq(c, conn))
        {
            devices.remove(&conn.device);
        }
    }

    /// Handles one frame of an authenticated session.
    ///
    /// Synchronous: work for this shard is done here; what other shards must
    /// do is returned, and the socket loop sends it (`forward`), setting the
    /// session's later frames aside while a channel is full.
    pub fn on_frame(self: &Rc<Self>, conn: &Rc<Conn>, frame: Frame) -> Outbound {
        conn.state.borrow_mut().last_activity_s = self.now_s();
        match frame {
            Frame::Send(send) => self.on_send(conn, send),
            Frame::Ack(ack) => self.on_ack(conn, ack),
            Frame::ReadReceipt(read) => self.on_read_receipt(conn, read),
            Frame::Ping(ping) => {
                conn.enqueue(&Frame::Pong(pb::Pong { nonce: ping.nonce }));
                Outbound::None
            }
            Frame::Pong(_) => Outbound::None,
            other => {
                conn.fatal(
                    ErrorCode::UnexpectedFrame,
                    match other {
                        Frame::Hello(_) | Frame::Register(_) => "already authenticated",
                        _ => "a client does not send this frame type",
                    },
                );
                Outbound::None
            }
        }
    }

    /// Handles a request addressed here at once, or returns it for sending.
    fn route(self: &Rc<Self>, target: ShardId, request: Request) -> Option<(ShardId, Request)> {
        if target == self.id {
            self.handle_request(request);
            None
        } else {
            Some((target, request))
        }
    }

    /// Sends what `on_frame` returned to other shards. A channel with room
    /// takes the request at once; only when one is full (backpressure) is a
    /// boxed wait returned, for the caller to run as a task, so the common
    /// path allocates nothing.
    pub fn forward(
        self: &Rc<Self>,
        outbound: Outbound,
    ) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
        let mut blocked = Vec::new();
        let mut offer = |target: ShardId, request: Request| {
            let sender = self.requests[target.0 as usize]
                .as_ref()
                .expect("a channel to every other shard");
            if let Err(err) = sender.try_send(request) {
                blocked.extend(channel_item(err).map(|request| (target, request)));
            }
        };
        match outbound {
            Outbound::None => return None,
            Outbound::One(target, request) => offer(target, request),
            Outbound::Many(requests) => {
                for (target, request) in requests {
                    offer(target, request);
                }
            }
        }
        if blocked.is_empty() {
            return None;
        }
        let shard = self.clone();
        Some(Box::pin(async move {
            for (target, request) in blocked {
                shard.route_request(target, request).await;
            }
        }))
    }

    fn refuse_send(conn: &Conn, client_message_id: u64, code: ErrorCode, message: &str) {
        conn.enqueue(&Frame::Error(pb::Error {
            code: code as i32,
            message: message.to_string(),
            client_message_id,
            fatal: false,
            retry_after_ms: 0,
        }));
    }

    fn on_send(self: &Rc<Self>, conn: &Rc<Conn>, send: pb::Send) -> Outbound {
        if let Err(code) = crate::session::check_send(&send, &self.config.limits) {
            Self::refuse_send(conn, send.client_message_id, code, "send refused");
            return Outbound::None;
        }
        let recipient = UserId(send.recipient_user_id);
        if !self.meta.user_exists(recipient) {
            Self::refuse_send(
                conn,
                send.client_message_id,
                ErrorCode::UnknownRecipient,
                "no such user",
            );
            return Outbound::None;
        }
        conn.state.borrow_mut().sends_in_flight += 1;
        let request = Request::Store {
            origin: ConnRef {
                shard: self.id,
                id: conn.id(),
            },
            sender: conn.device,
            client_message_id: ClientMessageId(send.client_message_id),
            recipient,
            payload: send.payload,
        };
        match self.route(self.home_of(recipient), request) {
            Some((target, request)) => Outbound::One(target, request),
            None => Outbound::None,
        }
    }

    fn on_ack(self: &Rc<Self>, conn: &Rc<Conn>, ack: pb::Ack) -> Outbound {
        if ack.sequences.len() > self.config.limits.ids_per_frame_max as usize {
            conn.enqueue(&error_frame(
                ErrorCode::TooManyIds,
                "too many sequences in one Ack",
                false,
            ));
            return Outbound::None;
        }
        // Only what this session was sent can be acknowledged: an ack of
        // entries never delivered would drop them unseen, and its receipt
        // could list a whole inbox. The window bounds every ack's work.
        let last_sent = conn.state.borrow().last_sent();
        let up_to = ack.up_to_sequence.min(last_sent);
        let list: Vec<InboxSeq> = ack
            .sequences
            .iter()
            .filter(|&&s| s <= last_sent)
            .map(|&s| InboxSeq(s))
            .collect();
        // Delivered receipts are written before the ack record, one per
        // sender device listing its message ids: a crash between the two
        // then repeats a receipt (the message comes again and is acked
        // again) instead of losing it.
        let mut acked = self
            .log
            .borrow()
            .acked_messages(conn.device, InboxSeq(up_to), &list);
        acked.sort_by_key(|m| m.sender);
        let mut remote = Vec::new();
        let mut start = 0;
        while start < acked.len() {
            let sender = acked[start].sender;
            let end = start + acked[start..].partition_point(|m| m.sender == sender);
            let ids: Vec<u64> = acked[start..end]
                .iter()
                .map(|m| m.client_message_id.0)
                .collect();
            start = end;
            remote.extend(self.store_receipt(sender, ReceiptKind::Delivered, conn.device, ids));
        }
        let outcome = self
            .log
            .borrow_mut()
            .ack(conn.device, InboxSeq(up_to), &list);
        match outcome {
            Ok(outcome) => {
                conn.state
                    .borrow_mut()
                    .on_ack(ack.up_to_sequence, &ack.sequences);
                debug_assert!(outcome.removed as usize >= acked.len());
                self.metrics.messages_acked.add(acked.len() as u64);
                self.kick_commit();
            }
            Err(err) => {
                // The receipts stand; the client acks again and they come
                // twice.
                error!(shard = %self.id, %err, "appending an ack record failed");
                conn.enqueue(&error_frame(
                    ErrorCode::StoreFailed,
                    "ack not recorded",
                    false,
                ));
            }
        }
        self.pump(conn);
        match remote.len() {
            0 => Outbound::None,
            1 => {
                let (target, request) = remote.pop().expect("one element");
                Outbound::One(target, request)
            }
            _ => Outbound::Many(remote),
        }
    }

    fn on_read_receipt(self: &Rc<Self>, conn: &Rc<Conn>, read: pb::ReadReceipt) -> Outbound {
        if read.client_message_ids.len() > self.config.limits.ids_per_frame_max as usize {
            conn.enqueue(&error_frame(
                ErrorCode::TooManyIds,
                "too many ids in one ReadReceipt",
                false,
            ));
            return Outbound::None;
        }
        // Nothing was read: nothing to relay, and nothing wrong either.
        if read.client_message_ids.is_empty() {
            return Outbound::None;
        }
        let sender = UserId(read.sender_user_id);
        let device = DeviceId(read.sender_device_id);
        if !self.meta.device_exists(sender, device) {
            conn.enqueue(&error_frame(
                ErrorCode::UnknownRecipient,
                "read receipt for a sender device that does not exist",
                false,
            ));
            return Outbound::None;
        }
        let recipient = InboxKey {
            user: sender,
            device: DeviceId(read.sender_device_id),
        };
        let ids = read.client_message_ids;
        match self.store_receipt(recipient, ReceiptKind::Read, conn.device, ids) {
            Some((target, request)) => Outbound::One(target, request),
            None => Outbound::None,
        }
    }

    /// Stores a receipt for `recipient` (a sender device), or returns the
    /// request that stores it on that device's home shard.
    ///
    /// A receipt bound for another shard is first appended here, to the
    /// relay inbox of that shard (`InboxKey::relay_to_shard`; its id list
    /// led by `recipient`, see `relay_ids`), in the same commit as the Ack
    /// or ReadReceipt record that caused it; the home shard answers
    /// `Reply::Relayed` once its copy is durable, and the relay entry is
    /// acknowledged. After a crash, `forward_relayed` sends what is left
    /// again: a receipt is never lost while its cause is kept, and may
    /// arrive twice (receipts are idempotent to the client).
    fn store_receipt(
        self: &Rc<Self>,
        recipient: InboxKey,
        kind: ReceiptKind,
        by: InboxKey,
        client_message_ids: Vec<u64>,
    ) -> Option<(ShardId, Request)> {
        let home = self.home_of(recipient.user);
        let relay_inbox = InboxKey::relay_to_shard(home);
        let appended = if home == self.id {
            None
        } else {
            let kept = self.log.borrow_mut().append_receipt(&NewReceipt {
                recipient: relay_inbox,
                kind,
                by,
                client_message_ids: &relay_ids(recipient, &client_message_ids),
                timestamp_ms: None,
            });
            match kept {
                Ok(appended) => Some(appended),
                Err(err) => {
                    // Forwarded all the same; only a crash before the
                    // home shard's commit could lose it now.
                    warn!(shard = %self.id, %err, %recipient, "receipt not kept for relay");
                    None
                }
            }
        };
        let request = Request::StoreReceipt {
            recipient,
            kind,
            by,
            client_message_ids,
            timestamp_ms: appended.map_or_else(|| self.now_ms(), |a| a.timestamp_ms),
            relay: appended.map(|a| RelayRef {
                shard: self.id,
                inbox: relay_inbox,
                seq: a.seq.0,
            }),
        };
        self.route(home, request)
    }

    /// Forwards the receipts left in this shard's relay inboxes (a crash
    /// came between their cause's commit and their home shard's). Runs
    /// once at start, with every shard's channels connected.
    pub async fn forward_relayed(self: &Rc<Self>) {
        // Only what recovery found: receipts relayed from now on are
        // forwarded as they arise.
        let inboxes: Vec<(InboxKey, InboxSeq)> = {
            let log = self.log.borrow();
            log.relay_inboxes()
                .into_iter()
                .map(|inbox| (inbox, log.last_seq(inbox)))
                .collect()
        };
        let mut positions = Vec::new();
        let mut forwarded = 0u64;
        for (inbox, last) in inboxes {
            let mut after = InboxSeq(0);
            while after < last {
                positions.clear();
                self.log
                    .borrow()
                    .pending_after(inbox, after, 64, &mut positions);
                if positions.is_empty() {
                    break;
                }
                for &(seq, position) in positions.iter() {
                    if seq > last {
                        after = last;
                        break;
                    }
                    after = seq;
                    let entry = self.log.borrow().read_for(inbox, position);
                    let receipt = match entry {
                        Ok(Some(StoredEntry::Receipt(r))) => r,
                        Ok(_) => continue,
                        Err(err) => {
                            error!(shard = %self.id, %inbox, seq = seq.0, %err, "unreadable relayed receipt skipped");
                            continue;
                        }
                    };
                    let Some((recipient, ids)) = split_relay_ids(&receipt.client_message_ids)
                    else {
                        error!(shard = %self.id, %inbox, seq = seq.0, "relayed receipt without its recipient skipped");
                        continue;
                    };
                    let request = Request::StoreReceipt {
                        recipient,
                        kind: receipt.kind,
                        by: receipt.by,
                        client_message_ids: ids.to_vec(),
                        timestamp_ms: receipt.timestamp_ms,
                        relay: Some(RelayRef {
                            shard: self.id,
                            inbox,
                            seq: seq.0,
                        }),
                    };
                    self.route_request(self.home_of(recipient.user), request)
                        .await;
                    self.metrics.receipts_relayed_again.inc();
                    forwarded += 1;
                }
            }
        }
        if forwarded > 0 {
            warn!(shard = %self.id, forwarded, "receipts relayed again after a restart");
        }
    }

    /// Handles a request here or sends it to its shard, waiting while that
    /// channel is full (the caller's connection is not read meanwhile).
    pub async fn route_request(self: &Rc<Self>, target: ShardId, request: Request) {
        if target == self.id {
            self.handle_request(request);
            return;
        }
        let sender = self.requests[target.0 as usize]
            .as_ref()
            .expect("a channel to every other shard");
        if let Err(err) = sender.send(request).await {
            // The target shard has stopped (shutdown): answer what we can.
            match channel_item(err) {
                Some(Request::Store {
                    origin,
                    client_message_id,
                    ..
                }) => self.on_reply(Reply::Refused {
                    origin,
                    client_message_id,
                    code: ErrorCode::Internal,
                }),
                Some(Request::Hello { origin, .. }) => self.on_reply(Reply::Hello {
                    origin,
                    verdict: HelloVerdict::Internal,
                }),
                _ => {}
            }
        }
    }

    /// Applies a request addressed to this shard. Never waits: replies are
    /// queued behind the commit that makes the record durable.
    pub fn handle_request(self: &Rc<Self>, request: Request) {
        match request {
            Request::Store {
                origin,
                sender,
                client_message_id,
                recipient,
                payload,
            } => {
                let inbox = InboxKey {
                    user: recipient,
                    device: PRIMARY_DEVICE,
                };
                let duplicate = self.log.borrow().find_duplicate(sender, client_message_id);
                if let Some(dup) = duplicate {
                    // A retry must carry what the first Send carried; a
                    // client that reuses an id for other content is told so
                    // (its new content is not stored).
                    if dup.recipient.user != recipient
                        || dup.payload_digest != crate::store::payload_digest(&payload)
                    {
                        self.send_reply(Reply::Refused {
                            origin,
                            client_message_id,
                            code: ErrorCode::DuplicateIdMismatch,
                        });
                        return;
                    }
                    self.push_after_commit(
                        dup.ticket,
                        AfterCommit::Ack {
                            origin,
                            client_message_id,
                            seq: dup.seq.0,
                            timestamp_ms: dup.timestamp_ms,
                        },
                    );
                    return;
                }
                let appended = self.log.borrow_mut().append_message(&NewMessage {
                    recipient: inbox,
                    sender,
                    client_message_id,
                    payload: &payload,
                });
                match appended {
                    Ok(appended) => {
                        self.metrics.messages_accepted.inc();
                        self.push_after_commit(
                            appended.ticket,
                            AfterCommit::Ack {
                                origin,
                                client_message_id,
                                seq: appended.seq.0,
                                timestamp_ms: appended.timestamp_ms,
                            },
                        );
                        self.push_after_commit(appended.ticket, AfterCommit::Visible { inbox });
                    }
                    Err(err) => {
                        let code = match err {
                            StoreError::Full(_) => ErrorCode::StoreFull,
                            _ => ErrorCode::StoreFailed,
                        };
                        warn!(shard = %self.id, %err, "message not stored");
                        self.send_reply(Reply::Refused {
                            origin,
                            client_message_id,
                            code,
                        });
                    }
                }
            }
            Request::StoreReceipt {
                recipient,
                kind,
                by,
                client_message_ids,
                timestamp_ms,
                relay,
            } => {
                let appended = self.log.borrow_mut().append_receipt(&NewReceipt {
                    recipient,
                    kind,
                    by,
                    client_message_ids: &client_message_ids,
                    timestamp_ms: Some(timestamp_ms),
                });
                match appended {
                    Ok(appended) => {
                        self.push_after_commit(
                            appended.ticket,
                            AfterCommit::Visible { inbox: recipient },
                        );
                        if let Some(relay) = relay {
                            self.push_after_commit(appended.ticket, AfterCommit::Relayed(relay));
                        }
                    }
                    Err(err) => {
                        // The acked messages stay acked; only the tick is lost.
                        warn!(shard = %self.id, %err, %recipient, "receipt not stored");
                        if let Some(relay) = relay {
                            self.send_reply(Reply::Relayed {
                                shard: relay.shard,
                                inbox: relay.inbox,
                                seqs: vec![relay.seq],
                            });
                        }
                    }
                }
            }
            Request::Handoff {
                fd,
                device,
                version,
                buffered,
                connected_at,
            } => {
                self.metrics.handoffs_in.inc();
                crate::net::io::adopt(self, fd, device, version, buffered, connected_at);
            }
            Request::Hello {
                origin,
                peer,
                device,
                secret,
            } => {
                glommio::spawn_local(self.clone().check_hello(origin, peer, device, secret))
                    .detach();
            }
        }
    }

    /// Decides a Hello as the home shard of the client's address
    /// (`route::address_home`), which keeps that address's failed-login
    /// count for the whole server: a delaying address is refused at once,
    /// else the credential is checked on the blocking pool and the outcome
    /// counted. Hellos of one address that arrive together are each checked
    /// against the count as it stands when they arrive.
    async fn check_hello(
        self: Rc<Self>,
        origin: ConnRef,
        peer: std::net::IpAddr,
        device: InboxKey,
        secret: Bytes,
    ) {
        let wait = self.throttle.borrow_mut().check(peer, Instant::now());
        let verdict = match wait {
            Some(wait) => HelloVerdict::RateLimited {
                retry_after_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            },
            None => {
                let meta = self.meta.clone();
                let verified = glommio::executor()
                    .spawn_blocking(move || meta.verify(device.user, device.device, &secret))
                    .await;
                match verified {
                    Err(err) => {
                        warn!(%err, "credential lookup failed");
                        HelloVerdict::Internal
                    }
                    Ok(false) => {
                        self.throttle.borrow_mut().on_failure(peer, Instant::now());
                        HelloVerdict::Failed
                    }
                    Ok(true) => {
                        self.throttle.borrow_mut().on_success(peer);
                        HelloVerdict::Accepted
                    }
                }
            }
        };
        self.send_reply(Reply::Hello { origin, verdict });
    }

    fn push_after_commit(self: &Rc<Self>, ticket: CommitTicket, action: AfterCommit) {
        self.pending.borrow_mut().push_back((ticket, action));
        self.kick_commit();
    }

    /// Wakes the commit task.
    pub fn kick_commit(&self) {
        if let Some(waker) = self.commit_waker.take() {
            waker.wake();
        }
    }

    /// Sends a reply to the origin's shard, or applies it here.
    fn send_reply(self: &Rc<Self>, reply: Reply) {
        let target = match &reply {
            Reply::Stored { origin, .. }
            | Reply::Refused { origin, .. }
            | Reply::Hello { origin, .. } => origin.shard,
            Reply::Relayed { shard, .. } => *shard,
        };
        if target == self.id {
            self.on_reply(reply);
            return;
        }
        let sender = self.replies[target.0 as usize]
            .as_ref()
            .expect("a channel to every other shard");
        // Reply receivers never wait on anything, so a full reply channel
        // drains quickly; hand the wait to a small task so the caller never
        // blocks on it.
        if let Some(reply) = sender.try_send(reply).err().and_then(channel_item) {
            let shard = self.clone();
            glommio::spawn_local(async move {
                let sender = shard.replies[target.0 as usize]
                    .as_ref()
                    .expect("a channel to every other shard");
                let _ = sender.send(reply).await;
            })
            .detach();
        }
    }

    /// A reply for one of this shard's connections, or for a relayed
    /// receipt kept here.
    pub fn on_reply(self: &Rc<Self>, reply: Reply) {
        let (origin, frame) = match reply {
            Reply::Hello { origin, verdict } => {
                crate::net::io::hello_verdict(
                    self,
                    crate::net::uring::ConnId::from_u64(origin.id),
                    verdict,
                );
                return;
            }
            Reply::Relayed { inbox, seqs, .. } => {
                let seqs: Vec<InboxSeq> = seqs.into_iter().map(InboxSeq).collect();
                let acked = self.log.borrow_mut().ack(inbox, InboxSeq(0), &seqs);
                if let Err(err) = acked {
                    // Kept, and forwarded again after a restart.
                    warn!(shard = %self.id, %err, %inbox, "relayed receipts not dropped");
                }
                self.kick_commit();
                return;
            }
            Reply::Stored {
                origin,
                client_message_id,
                seq,
                timestamp_ms,
            } => (
                origin,
                Frame::ServerAck(pb::ServerAck {
                    client_message_id: client_message_id.0,
                    server_sequence: seq,
                    timestamp_ms,
                }),
            ),
            Reply::Refused {
                origin,
                client_message_id,
                code,
            } => (
                origin,
                Frame::Error(pb::Error {
                    code: code as i32,
                    message: "message not stored".to_string(),
                    client_message_id: client_message_id.0,
                    fatal: false,
                    retry_after_ms: 0,
                }),
            ),
        };
        let conn = self
            .sockets
            .session(crate::net::uring::ConnId::from_u64(origin.id));
        // A connection that went away gets nothing: its client retries the
        // Send and dedupe answers it with the same ServerAck.
        if let Some(conn) = conn {
            {
                let mut state = conn.state.borrow_mut();
                state.sends_in_flight = state.sends_in_flight.saturating_sub(1);
            }
            conn.enqueue(&frame);
        }
    }

    /// Runs every action whose record is now durable, in commit order.
    pub fn drain_durable(self: &Rc<Self>) {
        let durable = self.log.borrow().durable_ticket();
        // Relayed receipts now durable, answered once per origin and relay
        // inbox after the loop.
        let mut relayed: Vec<RelayRef> = Vec::new();
        loop {
            let next = {
                let mut pending = self.pending.borrow_mut();
                match pending.front() {
                    Some((ticket, _)) if *ticket <= durable => pending.pop_front(),
                    _ => None,
                }
            };
            let Some((_, action)) = next else { break };
            match action {
                AfterCommit::Ack {
                    origin,
                    client_message_id,
                    seq,
                    timestamp_ms,
                } => self.send_reply(Reply::Stored {
                    origin,
                    client_message_id,
                    seq,
                    timestamp_ms,
                }),
                AfterCommit::Visible { inbox } => {
                    let conn = self.devices.borrow().get(&inbox).cloned();
                    if let Some(conn) = conn {
                        self.pump(&conn);
                    }
                }
                AfterCommit::Relayed(relay) => relayed.push(relay),
            }
        }
        relayed.sort_by_key(|r| (r.shard, r.inbox, r.seq));
        for group in relayed.chunk_by(|a, b| (a.shard, a.inbox) == (b.shard, b.inbox)) {
            // Bounded ack records: at most `ids_per_frame_max` per reply.
            let chunk = self.config.limits.ids_per_frame_max.max(1) as usize;
            for part in group.chunks(chunk) {
                self.send_reply(Reply::Relayed {
                    shard: part[0].shard,
                    inbox: part[0].inbox,
                    seqs: part.iter().map(|r| r.seq).collect(),
                });
            }
        }
    }

    /// Writes deliverable inbox entries to the device's connection, in order,
    /// while its window and output queue have room.
    pub fn pump(&self, conn: &Rc<Conn>) {
        let limits = &self.config.limits;
        let mut positions = self.pending_positions.borrow_mut();
        let log = self.log.borrow();
        let mut state = conn.state.borrow_mut();
        if state.close.is_some() {
            return;
        }
        let mut wrote = false;
        let out_max = limits.output_queue_bytes_max as usize;
        state.pump_blocked = false;
        loop {
            let room = state.window_room(
                limits.delivery_window_messages,
                limits.delivery_window_bytes,
            );
            if room == 0 {
                break;
            }
            if state.out_len() >= out_max {
                state.pump_blocked = true;
                break;
            }
            positions.clear();
            log.pending_after(
                conn.device,
                InboxSeq(state.last_sent()),
                room.min(64),
                &mut positions,
            );
            if positions.is_empty() {
                break;
            }
            let mut progressed = false;
            for &(seq, position) in positions.iter() {
                // Only durable entries: a record lost before its commit
                // would give its sequence to a different message.
                if !log.is_durable(position) {
                    break;
                }
                if state.window_room(
                    limits.delivery_window_messages,
                    limits.delivery_window_bytes,
                ) == 0
                {
                    break;
                }
                // The output bound holds per frame, not per batch: a peer
                // that stops reading never has more than one frame past it.
                // The socket loop pumps again once the queue has moved to
                // the socket (`pump_blocked`).
                if state.out_len() >= out_max {
                    state.pump_blocked = true;
                    break;
                }
                progressed = true;
                match log.read_for(conn.device, position) {
                    Ok(Some(entry)) => {
                        let (frame, bytes) = match entry {
                            StoredEntry::Message(m) => {
                                let bytes = m.payload.len() as u32;
                                (
                                    Frame::Deliver(pb::Deliver {
                                        sequence: m.seq.0,
                                        sender_user_id: m.sender.user.0,
                                        sender_device_id: m.sender.device.0,
                                        client_message_id: m.client_message_id.0,
                                        timestamp_ms: m.timestamp_ms,
                                        payload: m.payload,
                                    }),
                                    bytes,
                                )
                            }
                            StoredEntry::Receipt(r) => {
                                let bytes = 8 * r.client_message_ids.len() as u32;
                                (
                                    Frame::Receipt(pb::Receipt {
                                        sequence: r.seq.0,
                                        kind: match r.kind {
                                            ReceiptKind::Delivered => {
                                                pb::ReceiptKind::Delivered as i32
                                            }
                                            ReceiptKind::Read => pb::ReceiptKind::Read as i32,
                                        },
                                        by_user_id: r.by.user.0,
                                        by_device_id: r.by.device.0,
                                        client_message_ids: r.client_message_ids,
                                        timestamp_ms: r.timestamp_ms,
                                    }),
                                    bytes,
                                )
                            }
                        };
                        let active = state.active();
                        frame.encode(&mut active.out);
                        active.window.on_sent(seq.0, bytes);
                        Conn::note_encoded(&frame);
                        match frame {
                            Frame::Deliver(_) => self.metrics.messages_delivered.inc(),
                            _ => self.metrics.receipts_sent.inc(),
                        }
                        wrote = true;
                    }
                    Ok(None) => state.skip(seq.0),
                    Err(err) => {
                        // Reported by recovery or a damaged read: skip it so
                        // one bad record does not stall the inbox.
                        error!(shard = %self.id, device = %conn.device, seq = seq.0, %err, "unreadable inbox entry skipped");
                        state.skip(seq.0);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        drop(state);
        if wrote {
            conn.wake();
        }
    }

    // ---- metrics --------------------------------------------------------

    pub fn metrics_refused(&self, code: ErrorCode) {
        self.metrics.refusals.record(code);
    }
    pub fn metrics_handoff_out(&self) {
        self.metrics.handoffs_out.inc();
    }
    pub fn metrics_registered(&self) {
        self.metrics.registrations.inc();
    }
    pub fn metrics_auth_failed(&self) {
        self.metrics.auth_failures.inc();
    }
    pub fn metrics_accepted_socket(&self) {
        self.metrics.accepts.inc();
    }
    pub fn metrics_session_opened(&self) {
        self.metrics.connections.inc();
    }
    pub fn metrics_session_closed(&self) {
        self.metrics.connections.dec();
    }
    pub fn metrics_frame_in(&self, frame_type: crate::proto::FrameType) {
        self.metrics.frames_in[frame_type.index()].inc();
    }
    pub fn metrics_frame_out(&self, frame_type: crate::proto::FrameType) {
        self.metrics.frames_out[frame_type.index()].inc();
    }

    /// Refreshes the gauges that mirror the log (called by maintenance).
    pub fn publish_log_gauges(&self) {
        let stats = self.log.borrow().stats();
        self.metrics.inbox_depth.set(stats.entries_pending as i64);
        self.metrics.log_bytes.set(stats.bytes_on_disk as i64);
        self.metrics.log_segments.set(stats.segments as i64);
    }

    /// A socket of this shard was closed or handed off.
    pub fn connection_closed(&self) {
        self.open_connections
            .set(self.open_connections.get().saturating_sub(1));
    }

    // ---- commit ---------------------------------------------------------

    /// The group-commit loop: waits for appends, lets a batch gather for up
    /// to the commit interval, makes it durable, then runs what waited on it.
    /// A failed fdatasync is fatal: the page cache's state is unknown, so the
    /// process exits rather than acknowledge anything more.
    pub async fn commit_loop(self: Rc<Self>) {
        let interval =
            std::time::Duration::from_micros(self.config.store.commit_interval_us as u64);
        let durability = self.config.store.durability;
        let idle =
            |shard: &Shard| shard.pending.borrow().is_empty() && !shard.log.borrow().needs_commit();
        loop {
            if idle(&self) {
                futures_lite::future::poll_fn(|cx| {
                    if idle(&self) {
                        self.commit_waker.set(Some(cx.waker().clone()));
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await;
                // Woken from idle: let a batch gather for up to the commit
                // interval, unless it is already large. Under load the loop
                // does not come back here: records that arrive during one
                // fdatasync form the next batch, which starts at once.
                if durability == Durability::Fsync
                    && self.pending.borrow().len()
                        < self.config.store.commit_batch_records_max as usize
                {
                    glommio::timer::sleep(interval).await;
                }
            }
            let batch = self.log.borrow_mut().begin_commit();
            if let Some(batch) = batch {
                let started = Instant::now();
                if let Err(err) = batch.sync().await {
                    error!(shard = %self.id, %err, "fdatasync of the log failed; exiting without acknowledging more");
                    std::process::exit(70);
                }
                self.metrics
                    .commit_latency
                    .record_us(started.elapsed().as_micros() as u64);
                self.log.borrow_mut().finish_commit(batch);
            }
            self.drain_durable();
            glommio::yield_if_needed().await;
        }
    }

    /// Whether every action waiting on a commit has run.
    pub fn commits_settled(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Whether every receipt relayed from here was stored by its home shard
    /// (a graceful stop waits for it, so a restart repeats none).
    pub fn relays_settled(&self) -> bool {
        // One relay inbox per other shard: a look-up each, not a pass over
        // every inbox (this runs every 10 ms while the shard drains).
        let log = self.log.borrow();
        (0..self.shards)
            .map(ShardId)
            .filter(|&s| s != self.id)
            .all(|s| log.pending_count(InboxKey::relay_to_shard(s)) == 0)
    }
}
