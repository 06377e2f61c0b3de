//! The delivery engine: one shard's messaging logic as a state machine that
//! does no I/O.
//!
//! `Engine::handle` takes an [`Event`] (a frame from a session, a request or
//! reply from another shard, "the log is durable further", a session opened
//! or closed, a session's output queue drained) and answers through the
//! [`Host`] it is given: frames to sessions, closes, requests and replies to
//! other shards, "a commit is due". Nothing here reads a clock (time comes
//! from the injected `Clock`, the same the log uses), spawns a task, touches
//! a socket or waits: the shard (`shard`) is the glue that feeds events in
//! and carries the host's calls out, and the simulation
//! (`tests/simulation.rs`) drives several engines in one thread from one
//! seed.
//!
//! One folder per feature, each with its own state and tests:
//! - `delivery`: sessions and their delivery windows, Send → store on the
//!   recipient's home shard (dedupe, append, ServerAck after the commit),
//!   the pump that writes durable inbox entries to a live session;
//! - `receipts`: device acks and the delivered receipts they cause, read
//!   receipts, and the relay that keeps a receipt bound for another shard
//!   until that shard has stored it;
//! - `devices`: linked devices (link codes, the device list, removal);
//! - `presence`: online / last seen for followers, the grace period,
//!   privacy, typing notices;
//! - `push`: push endpoints and when a device with no session is woken;
//! - `keys`: prekey bundles (upload, fetch once per one-time prekey, the
//!   low-prekey notice);
//! - `groups`: group membership on the group's home shard, the group's
//!   order, and fan-out stored once per shard holding members.
//!
//! A new feature is a new folder plus its arms in `Engine::handle` (and its
//! variants in `Event`, `Request`, `Reply`): nothing in `net` or `shard`.
//!
//! Invariants (checked by the simulation after every step):
//! - a ServerAck (✓) leaves only after `Log::durable_ticket()` covers the
//!   record (or its duplicate), so every acknowledged message survives a
//!   crash at the configured durability level;
//! - an inbox entry is delivered only once durable, in sequence order,
//!   within the device's window;
//! - at most one session per device (a newer one replaces it).

pub mod delivery;
pub mod devices;
pub mod groups;
pub mod keys;
pub mod media;
pub mod presence;
pub mod push;
pub mod receipts;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::Limits;
use crate::ids::{ClientMessageId, DeviceId, InboxKey, ShardId, UserId};
use crate::meta::MetaStore;
use crate::metrics::ShardMetrics;
use crate::proto::{ErrorCode, Frame};
use crate::route::home_shard;
use crate::store::{Clock, CommitTicket, Log, ReceiptKind};

/// A session's name on its shard: the socket's slot and generation in the
/// shard's driver, so a reply for a session that has gone never reaches the
/// one reusing its slot.
pub type SessionId = u64;

/// A session, named across shards: the shard it lives on and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: ShardId,
    pub id: SessionId,
}

/// A receipt in its origin shard's relay inbox (`InboxKey::relay_to_shard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayRef {
    pub shard: ShardId,
    pub inbox: InboxKey,
    pub seq: u64,
}

/// Work one shard's engine asks of another's (the target is always the home
/// shard of the user or device the request is about).
#[derive(Debug)]
pub enum Request {
    /// Store a message in `recipient`'s inbox and answer `origin` when durable.
    Store {
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        recipient: UserId,
        /// The payload, when the recipient has only its primary device.
        payload: Bytes,
        /// One payload per device of the recipient, ascending by device
        /// (then `payload` is empty); empty for a plain Send.
        per_device: Vec<(DeviceId, Bytes)>,
    },
    /// Store a receipt in `recipient`'s inbox (the original sender device).
    StoreReceipt {
        recipient: InboxKey,
        kind: ReceiptKind,
        by: InboxKey,
        client_message_ids: Vec<u64>,
        /// When the receipt arose on the origin shard.
        timestamp_ms: u64,
        /// Where the origin shard keeps it until it is stored here (`None`
        /// if it could not keep it); answered with `Reply::Relayed`.
        relay: Option<RelayRef>,
    },
    /// A group just created in the database, to live on this, its home
    /// shard; `origin` (the creator's session) is answered with GroupInfo.
    GroupInstall {
        origin: ConnRef,
        actor: InboxKey,
        request_id: u64,
        row: crate::meta::GroupRow,
    },
    /// A change to a group homed here.
    GroupChange(Box<groups::Change>),
    /// A device homed here has `remaining` one-time prekeys: tell it.
    PrekeysLow { device: InboxKey, remaining: u32 },
    /// Sessions of the `watcher`'s shard follow these users homed here:
    /// record them and send their states.
    PresenceWatch {
        watcher: ConnRef,
        users: Vec<UserId>,
    },
    /// The `watcher` no longer follows these users homed here.
    PresenceUnwatch {
        watcher: ConnRef,
        users: Vec<UserId>,
    },
    /// Presence states for sessions of the target shard.
    PresenceNotify {
        updates: Vec<(SessionId, presence::PresenceState)>,
    },
    /// A typing notice for `to`, homed on the target (never stored).
    Typing {
        from: InboxKey,
        to: UserId,
        state: i32,
    },
    /// GroupInfo for a member.
    GroupGet {
        origin: ConnRef,
        actor: InboxKey,
        request_id: u64,
        group: u64,
    },
    /// A member's message to a group homed here.
    GroupSend {
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        group: u64,
        payload: Bytes,
    },
    /// A group's message, in its place `group_seq`, for `members` (homed
    /// on the target); kept by the home shard's relay entry `relay` until
    /// answered with `Reply::Relayed`.
    GroupStore(Box<groups::Store>),
}

/// An engine's answer to another shard's request.
#[derive(Debug)]
pub enum Reply {
    /// Durable: send ServerAck (✓) to `sender`'s session `origin`.
    Stored {
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        seq: u64,
        timestamp_ms: u64,
    },
    /// Not stored: send Error with the client message id.
    Refused {
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        code: ErrorCode,
    },
    /// Relayed receipts are durable in their recipients' inboxes (or could
    /// not be stored there, which is logged): the origin `shard` drops its
    /// copies, the entries `seqs` of its relay inbox `inbox`. One reply per
    /// commit batch and relay inbox.
    Relayed {
        shard: ShardId,
        inbox: InboxKey,
        seqs: Vec<u64>,
    },
    /// A frame for the session `origin` (an answer to a group request).
    Answer { origin: ConnRef, frame: Frame },
}

impl Reply {
    /// The shard the reply is for.
    pub fn target(&self) -> ShardId {
        match self {
            Reply::Stored { origin, .. }
            | Reply::Refused { origin, .. }
            | Reply::Answer { origin, .. } => origin.shard,
            Reply::Relayed { shard, .. } => *shard,
        }
    }
}

/// What happens to an engine. Each arm of `Engine::handle` hands it to the
/// feature that owns it.
#[derive(Debug)]
pub enum Event {
    /// An authenticated device's session opened on this, its home shard.
    /// `connected_at` orders two sessions of one device (a later one wins).
    Opened {
        device: InboxKey,
        session: SessionId,
        connected_at: u32,
        protocol_version: u32,
    },
    /// A session's socket is closing or closed; nothing more goes to it.
    Closed {
        device: InboxKey,
        session: SessionId,
    },
    /// A client frame of an authenticated session.
    Frame {
        device: InboxKey,
        session: SessionId,
        frame: Frame,
    },
    /// A request from a shard (or from this one).
    Request(Request),
    /// A reply from a shard (or from this one).
    Reply(Reply),
    /// The log's durable ticket moved (a commit finished).
    Durable,
    /// A session's output queue went below its bound after the pump
    /// stopped at it.
    OutputDrained {
        device: InboxKey,
        session: SessionId,
    },
    /// The shard started on a recovered log: forward what its relay inboxes
    /// hold (receipts a crash left between their cause and their home shard).
    Recovered,
    /// The host finished work on an account's device list.
    Account(devices::AccountDone),
    /// The host finished work on the group tables.
    Group(groups::GroupDone),
    /// The host finished work on the prekey tables.
    Keys(keys::KeysDone),
    /// Time passed (about once a second): presence grace periods end.
    Tick,
    /// A commit is about to begin: what waits to be appended with it (the
    /// batched group receipts) is appended now.
    BeforeCommit,
}

/// Why the engine closes a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// The device connected again; GoAway(REPLACED) is the last frame.
    Replaced,
    /// A fatal Error is the last frame.
    Fatal(ErrorCode),
    /// The device was removed; GoAway(DEVICE_REMOVED) is the last frame.
    Removed,
}

/// What the engine does to the world, carried out by the shard (or the
/// simulation). Calls never re-enter the engine.
pub trait Host {
    /// Queues a frame to a session of this shard (dropped if it is closing).
    fn send(&mut self, session: SessionId, frame: &Frame);
    /// Queues a last frame and closes the session.
    fn close(&mut self, session: SessionId, frame: &Frame, closing: Closing);
    /// Whether the session's output queue is at its bound (the pump stops
    /// and waits for `Event::OutputDrained`).
    fn output_full(&self, session: SessionId) -> bool;
    /// Whether the session is closing (a newer one of its device takes
    /// over at once).
    fn closing(&self, session: SessionId) -> bool;
    /// Sends a request to another shard.
    fn request(&mut self, shard: ShardId, request: Request);
    /// Sends a reply to another shard.
    fn reply(&mut self, shard: ShardId, reply: Reply);
    /// Records were appended: a group commit is due.
    fn commit_due(&mut self);
    /// Work on an account's device list (it blocks on the metadata
    /// database, so it runs off the shard); the outcome comes back as
    /// `Event::Account`.
    fn account(&mut self, op: devices::AccountOp);
    /// Work on the group tables of the metadata database (off the shard,
    /// like `account`); the outcome comes back as `Event::Group`.
    fn group(&mut self, op: groups::GroupOp);
    /// Work on the prekey tables of the metadata database (off the shard);
    /// the outcome comes back as `Event::Keys`.
    fn keys(&mut self, op: keys::KeysOp);
    /// Wakes `device`, which has something queued and no session (a push
    /// through its registered endpoint, if any; never waits).
    fn wake(&mut self, device: InboxKey);
}

/// The accounts the engine consults: does a user or a device exist, and
/// which devices an account has (all answered from memory).
pub trait Directory {
    fn user_exists(&self, user: UserId) -> bool;
    fn device_exists(&self, user: UserId, device: DeviceId) -> bool;
    /// The account's device-list version and devices, ascending; `None`
    /// for an unknown account. By default the primary alone.
    fn device_set(&self, user: UserId) -> Option<(u64, Vec<DeviceId>)> {
        self.user_exists(user)
            .then(|| (1, vec![crate::ids::PRIMARY_DEVICE]))
    }
    /// Whether the account may have devices besides its primary (when
    /// false, `device_set` is the primary alone). By default never.
    fn has_companions(&self, _user: UserId) -> bool {
        false
    }
}

impl Directory for MetaStore {
    fn user_exists(&self, user: UserId) -> bool {
        MetaStore::user_exists(self, user)
    }
    fn device_exists(&self, user: UserId, device: DeviceId) -> bool {
        MetaStore::device_exists(self, user, device)
    }
    fn device_set(&self, user: UserId) -> Option<(u64, Vec<DeviceId>)> {
        MetaStore::device_set(self, user)
    }
    fn has_companions(&self, user: UserId) -> bool {
        MetaStore::has_companions(self, user)
    }
}

/// Bugs the engine once had, put back on purpose so the simulation can
/// show it catches them (`tests/simulation.rs`). All off in the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[doc(hidden)]
pub struct Flaws {
    /// Answer a Send with ServerAck as soon as it is appended, before the
    /// commit that makes it durable.
    pub ack_before_durable: bool,
}

/// What to do once the log is durable up to a ticket.
#[derive(Debug)]
enum AfterCommit {
    /// Answer the Send with ServerAck (a `Reply::Stored`).
    Ack(Reply),
    /// An inbox entry became durable: deliverable.
    Visible { inbox: InboxKey },
    /// A relayed receipt became durable: its origin drops its copy.
    Relayed(RelayRef),
    /// A group message's home record is durable: forward it.
    ForwardGroup(Box<groups::Forward>),
}

/// One shard's delivery engine. Its state is the log (inboxes, sequences,
/// dedupe, relay inboxes), the actions waiting on a commit, and each
/// feature's own.
pub struct Engine {
    pub id: ShardId,
    pub shards: u32,
    limits: Limits,
    log: Log,
    directory: Arc<dyn Directory>,
    metrics: Arc<ShardMetrics>,
    clock: Rc<dyn Clock>,
    /// Actions waiting for the commit of their record, in ticket order.
    pending: VecDeque<(CommitTicket, AfterCommit)>,
    delivery: delivery::Delivery,
    receipts: receipts::Receipts,
    groups: groups::Groups,
    keys: keys::Keys,
    presence: presence::Presence,
    push: push::Push,
    media: Option<media::Media>,
    flaws: Flaws,
}

impl Engine {
    pub fn new(
        id: ShardId,
        shards: u32,
        limits: Limits,
        log: Log,
        directory: Arc<dyn Directory>,
        metrics: Arc<ShardMetrics>,
        clock: Rc<dyn Clock>,
    ) -> Engine {
        Engine {
            id,
            shards,
            limits,
            log,
            directory,
            metrics,
            clock,
            pending: VecDeque::new(),
            delivery: delivery::Delivery::default(),
            receipts: receipts::Receipts::default(),
            groups: groups::Groups::default(),
            keys: keys::Keys::default(),
            presence: presence::Presence::default(),
            push: push::Push::default(),
            media: None,
            flaws: Flaws::default(),
        }
    }

    /// Puts known bugs back (simulation only).
    #[doc(hidden)]
    pub fn set_flaws(&mut self, flaws: Flaws) {
        self.flaws = flaws;
    }

    /// The one dispatch: each event goes to the feature that owns it.
    pub fn handle(&mut self, event: Event, host: &mut impl Host) {
        match event {
            Event::Opened {
                device,
                session,
                connected_at,
                protocol_version,
            } => self.session_opened(device, session, connected_at, protocol_version, host),
            Event::Closed { device, session } => {
                self.session_closed(device, session);
                self.unfollow(session, host);
                self.presence_changed(device.user, host);
            }
            Event::Frame {
                device,
                session,
                frame,
            } => match frame {
                Frame::Send(send) if send.group_id != 0 => {
                    match crate::session::check_send(&send, &self.limits) {
                        Ok(()) => self.on_group_send(device, session, send, host),
                        Err(code) => host.send(
                            session,
                            &crate::proto::refusal(code, "send refused", send.client_message_id),
                        ),
                    }
                }
                Frame::Send(send) => self.on_send(device, session, send, host),
                Frame::Ack(ack) => self.on_ack(device, session, ack, host),
                Frame::ReadReceipt(read) => self.on_read_receipt(device, session, read, host),
                Frame::Ping(ping) => host.send(
                    session,
                    &Frame::Pong(crate::proto::pb::Pong { nonce: ping.nonce }),
                ),
                Frame::Pong(_) => {}
                Frame::RequestLinkCode(_) => self.on_request_link_code(device, session, host),
                Frame::ListDevices(_) => self.on_list_devices(device, session, host),
                Frame::RemoveDevice(remove) => self.on_remove_device(device, session, remove, host),
                Frame::CreateGroup(create) => self.on_create_group(device, session, create, host),
                Frame::UpdateGroup(update) => self.on_update_group(device, session, update, host),
                Frame::GetGroup(get) => self.on_get_group(device, session, get, host),
                Frame::UploadPrekeys(upload) => {
                    self.on_upload_prekeys(device, session, upload, host)
                }
                Frame::FetchPrekeys(fetch) => self.on_fetch_prekeys(device, session, fetch, host),
                Frame::SendTyping(typing) => self.on_send_typing(device, typing, host),
                Frame::SubscribePresence(subscribe) => {
                    self.on_subscribe_presence(device, session, subscribe, host)
                }
                Frame::SetPrivacy(set) => self.on_set_privacy(device, session, set, host),
                Frame::RegisterPush(register) => {
                    self.on_register_push(device, session, register, host)
                }
                Frame::RequestMediaGrant(request) => {
                    self.on_request_media_grant(device, session, request, host)
                }
                other => {
                    let message = match other {
                        Frame::Hello(_) | Frame::Register(_) | Frame::Link(_) => {
                            "already authenticated"
                        }
                        _ => "a client does not send this frame type",
                    };
                    host.close(
                        session,
                        &crate::proto::error_frame(ErrorCode::UnexpectedFrame, message, true),
                        Closing::Fatal(ErrorCode::UnexpectedFrame),
                    );
                }
            },
            Event::Request(request) => self.on_request(request, host),
            Event::Reply(reply) => self.on_reply(reply, host),
            Event::Durable => {
                self.drain_durable(host);
                self.retry_undropped(host);
                self.retry_unstored(host);
            }
            Event::OutputDrained { device, session } => self.output_drained(device, session, host),
            Event::Recovered => self.forward_relayed(host),
            Event::Account(done) => self.account_done(done, host),
            Event::Group(done) => self.group_done(done, host),
            Event::BeforeCommit => self.flush_batched_receipts(host),
            Event::Keys(done) => self.keys_done(done, host),
            Event::Tick => self.presence_tick(host),
        }
    }

    fn on_request(&mut self, request: Request, host: &mut impl Host) {
        match request {
            Request::Store {
                origin,
                sender,
                client_message_id,
                recipient,
                payload,
                per_device,
            } => self.store_message(
                origin,
                sender,
                client_message_id,
                recipient,
                payload,
                per_device,
                host,
            ),
            Request::StoreReceipt {
                recipient,
                kind,
                by,
                client_message_ids,
                timestamp_ms,
                relay,
            } => self.store_receipt_here(
                recipient,
                kind,
                by,
                client_message_ids,
                timestamp_ms,
                relay,
                host,
            ),
            Request::GroupInstall {
                origin,
                actor,
                request_id,
                row,
            } => self.install_group(origin, actor, request_id, row, host),
            Request::GroupChange(change) => self.group_change(*change, host),
            Request::PrekeysLow { device, remaining } => self.prekeys_low(device, remaining, host),
            Request::PresenceWatch { watcher, users } => self.presence_watch(watcher, users, host),
            Request::PresenceUnwatch { watcher, users } => self.presence_unwatch(watcher, users),
            Request::PresenceNotify { updates } => self.presence_notify(updates, host),
            Request::Typing { from, to, state } => self.typing_here(from, to, state, host),
            Request::GroupGet {
                origin,
                actor,
                request_id,
                group,
            } => self.group_get(origin, actor, request_id, group, host),
            Request::GroupSend {
                origin,
                sender,
                client_message_id,
                group,
                payload,
            } => self.group_send(origin, sender, client_message_id, group, payload, host),
            Request::GroupStore(store) => self.group_store_here(store, host),
        }
    }

    fn on_reply(&mut self, reply: Reply, host: &mut impl Host) {
        match reply {
            Reply::Stored { .. } | Reply::Refused { .. } => self.send_answered(reply, host),
            Reply::Relayed { inbox, seqs, .. } => self.relayed(inbox, seqs, host),
            Reply::Answer { origin, frame } => host.send(origin.id, &frame),
        }
    }

    /// The home shard of a user.
    pub fn home_of(&self, user: UserId) -> ShardId {
        home_shard(user, self.shards)
    }

    /// Sends a request to its shard, or handles it here.
    fn route(&mut self, target: ShardId, request: Request, host: &mut impl Host) {
        if target == self.id {
            self.on_request(request, host);
        } else {
            host.request(target, request);
        }
    }

    /// Sends a reply to its shard, or handles it here.
    fn send_reply(&mut self, reply: Reply, host: &mut impl Host) {
        let target = reply.target();
        if target == self.id {
            self.on_reply(reply, host);
        } else {
            host.reply(target, reply);
        }
    }

    fn push_after_commit(
        &mut self,
        ticket: CommitTicket,
        action: AfterCommit,
        host: &mut impl Host,
    ) {
        self.pending.push_back((ticket, action));
        host.commit_due();
    }

    /// Runs every action whose record is now durable, in commit order.
    fn drain_durable(&mut self, host: &mut impl Host) {
        let durable = self.log.durable_ticket();
        // Relayed receipts now durable, answered once per origin and relay
        // inbox after the loop.
        let mut relayed: Vec<RelayRef> = Vec::new();
        while let Some((ticket, _)) = self.pending.front() {
            if *ticket > durable {
                break;
            }
            let Some((_, action)) = self.pending.pop_front() else {
                break;
            };
            match action {
                AfterCommit::Ack(reply) => self.send_reply(reply, host),
                AfterCommit::Visible { inbox } => self.pump_device(inbox, host),
                AfterCommit::Relayed(relay) => relayed.push(relay),
                AfterCommit::ForwardGroup(forward) => self.forward_group(*forward, host),
            }
        }
        self.answer_relayed(relayed, host);
    }

    /// The log, for the shard's commit loop, maintenance and gauges.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log, for the shard's commit loop and maintenance (expiry).
    pub fn log_mut(&mut self) -> &mut Log {
        &mut self.log
    }

    /// Takes the log back (a simulated crash drops the engine and reopens
    /// the log from what its storage holds).
    pub fn into_log(self) -> Log {
        self.log
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether every action waiting on a commit has run.
    pub fn commits_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the commit loop has nothing to do.
    pub fn commit_idle(&self) -> bool {
        self.pending.is_empty() && !self.log.needs_commit()
    }

    /// Actions waiting on a commit (the commit loop's batching bound).
    pub fn commit_waiting(&self) -> usize {
        self.pending.len()
    }

    /// Whether every receipt relayed from here was stored by its home shard
    /// (a graceful stop waits for it, so a restart repeats none).
    pub fn relays_settled(&self) -> bool {
        // One relay inbox per other shard: a look-up each, not a pass over
        // every inbox (this runs every 10 ms while the shard drains).
        (0..self.shards)
            .map(ShardId)
            .filter(|&s| s != self.id)
            .all(|s| self.log.pending_count(InboxKey::relay_to_shard(s)) == 0)
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}
