//! Shards: one pinned glommio executor per CPU, each owning its users.
//!
//! The shard is glue. It owns the executor's tasks, the request and reply
//! channel meshes (`route::message`, built once at start), the socket ring
//! (`shard::io::Sockets`) and the group-commit loop; the messaging logic is
//! its delivery engine (`engine::Engine`, no I/O), which it feeds events
//! (session frames, opened and closed sessions, requests and replies from
//! other shards, finished commits) and whose host calls it carries out
//! (`ShardHost`: frames into connection queues, requests and replies onto
//! the channels, a wake-up of the commit loop). Everything here is `!Send`
//! (`Rc`/`RefCell`) and touched only by the shard's thread.
//!
//! Invariants (the engine's, carried out here):
//! - a ServerAck (✓) is queued only after `Log::durable_ticket()` covers the
//!   record (or its duplicate): the commit loop reports `Event::Durable`
//!   only after the fdatasync returned;
//! - at most one live connection per device (a newer one replaces it).

pub mod io;
pub mod server;
mod start_watch;

/// Runs `future`, timing each of its polls as shard task `task`
/// (`ShardMetrics::task_polled`): a poll holds the shard's thread, so these
/// are the times everything else on the shard waited.
pub async fn timed<F: Future>(metrics: Arc<ShardMetrics>, task: ShardTask, future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(move |cx| {
        let started = Instant::now();
        let polled = future.as_mut().poll(cx);
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        metrics.task_polled(task, us);
        polled
    })
    .await
}

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use glommio::channels::shared_channel::ConnectedSender;
use tracing::{error, warn};

use crate::config::{Config, Durability};
use crate::engine::devices::{AccountDone, AccountOp};
use crate::engine::groups::{GroupDone, GroupOp};
use crate::engine::keys::{KeysDone, KeysOp};
use crate::engine::{self, Closing, Engine, Event, Host, SessionId};
use crate::ids::{InboxKey, ShardId, UserId};
use crate::meta::LinkError;
use crate::meta::MetaStore;
use crate::metrics::{ShardMetrics, ShardTask};
use crate::net::conn::{CloseReason, Conn};
use crate::net::uring::ConnId;
use crate::proto::{pb, ErrorCode, Frame};
use crate::route::home_shard;
use crate::route::message::{ConnRef, HelloVerdict, LinkOutcome, Reply, Request};
use crate::session::AuthThrottle;

pub use crate::engine::receipts::{relay_ids, split_relay_ids};
pub use crate::ids::PRIMARY_DEVICE;

/// The value a failed channel send hands back.
fn channel_item<T>(err: glommio::GlommioError<T>) -> Option<T> {
    match err {
        glommio::GlommioError::Closed(glommio::ResourceType::Channel(item))
        | glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(item)) => Some(item),
        _ => None,
    }
}

/// Requests produced for other shards while handling one event.
#[derive(Debug, Default)]
pub enum Outbound {
    #[default]
    None,
    One(ShardId, Request),
    Many(Vec<(ShardId, Request)>),
}

impl Outbound {
    fn push(&mut self, target: ShardId, request: Request) {
        *self = match std::mem::take(self) {
            Outbound::None => Outbound::One(target, request),
            Outbound::One(t, r) => Outbound::Many(vec![(t, r), (target, request)]),
            Outbound::Many(mut all) => {
                all.push((target, request));
                Outbound::Many(all)
            }
        };
    }
}

fn close_reason(closing: Closing) -> CloseReason {
    match closing {
        Closing::Replaced => CloseReason::Replaced,
        Closing::Fatal(code) => CloseReason::Fatal(code),
        Closing::Removed => CloseReason::Removed,
    }
}

/// Requests to one other shard waiting for room in its channel, in order.
struct Backlog {
    tx: glommio::channels::local_channel::LocalSender<Request>,
    /// Requests queued or being sent.
    pending: Cell<usize>,
    /// Tasks waiting for the backlog to go below its bound.
    waiters: RefCell<Vec<std::task::Waker>>,
}

impl Backlog {
    fn push(&self, request: Request) {
        self.pending.set(self.pending.get() + 1);
        // Unbounded and its receiver lives as long as the shard: never
        // refused.
        let _ = self.tx.try_send(request);
    }

    /// One request left for its shard.
    fn sent(&self) {
        self.pending.set(self.pending.get().saturating_sub(1));
        for waker in self.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves once at most `bound` requests wait.
    async fn below(&self, bound: usize) {
        std::future::poll_fn(|cx| {
            if self.pending.get() <= bound {
                std::task::Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// Does an `AccountOp` against the metadata database (blocks).
fn account_work(meta: &MetaStore, op: AccountOp) -> AccountDone {
    let internal = |session, err: &dyn std::fmt::Display| {
        warn!(%err, "device list operation failed");
        AccountDone::Failed {
            session,
            code: ErrorCode::Internal,
            message: "the device list could not be read or written",
        }
    };
    match op {
        AccountOp::CreateLinkCode {
            session,
            user,
            now_ms,
            ttl_ms,
        } => match meta.create_link_code(user, now_ms, ttl_ms) {
            Ok(code) => AccountDone::LinkCode {
                session,
                code: code.code,
                expires_at_ms: code.expires_at_ms,
            },
            Err(err) => internal(session, &err),
        },
        AccountOp::ListDevices { session, user } => match meta.device_list(user) {
            Ok(list) => AccountDone::DeviceList {
                session,
                list: pb::DeviceList {
                    version: list.version,
                    devices: list
                        .devices
                        .into_iter()
                        .map(|d| pb::DeviceInfo {
                            device_id: d.device.0,
                            name: d.name,
                            linked_at_ms: d.linked_at_ms,
                            last_seen_ms: d.last_seen_ms,
                        })
                        .collect(),
                },
            },
            Err(err) => internal(session, &err),
        },
        AccountOp::SetPush {
            session,
            device,
            endpoint,
        } => match meta.set_push_endpoint(device.user, device.device, endpoint.as_ref()) {
            Ok(()) => AccountDone::PushSet {
                session,
                kind: match endpoint {
                    None => crate::proto::PushKind::Unspecified,
                    Some(crate::meta::PushEndpoint::WebPush(_)) => crate::proto::PushKind::WebPush,
                    Some(crate::meta::PushEndpoint::Webhook(_)) => crate::proto::PushKind::Webhook,
                },
            },
            Err(err) => internal(session, &err),
        },
        AccountOp::SetLastSeenHidden {
            session,
            user,
            hidden,
        } => match meta.set_last_seen_hidden(user, hidden) {
            Ok(()) => AccountDone::LastSeenHidden {
                session,
                user,
                hidden,
            },
            Err(err) => internal(session, &err),
        },
        AccountOp::RemoveDevice {
            session,
            user,
            device,
        } => match meta.remove_device(user, device) {
            Ok(version) => AccountDone::Removed {
                session,
                user,
                device,
                version,
            },
            Err(crate::meta::RemoveError::UnknownDevice | crate::meta::RemoveError::Primary) => {
                AccountDone::Failed {
                    session,
                    code: ErrorCode::UnknownDevice,
                    message: "no such companion device",
                }
            }
            Err(crate::meta::RemoveError::Meta(err)) => internal(session, &err),
        },
    }
}

/// Does a `GroupOp` against the metadata database (blocks).
fn group_work(meta: &MetaStore, op: GroupOp) -> GroupDone {
    match op {
        GroupOp::Create {
            session,
            creator,
            request_id,
            name,
            members,
        } => match meta.create_group(&name, &members) {
            Ok(row) => GroupDone::Created {
                session,
                creator,
                request_id,
                row,
            },
            Err(err) => {
                warn!(%err, "creating a group failed");
                GroupDone::CreateFailed {
                    session,
                    request_id,
                }
            }
        },
        GroupOp::Save {
            group,
            name,
            version,
            upserts,
            removals,
        } => {
            let saved = meta.save_group_change(group, &name, version, &upserts, &removals);
            if let Err(err) = &saved {
                warn!(%err, group, "writing a group change failed");
            }
            GroupDone::Saved {
                group,
                ok: saved.is_ok(),
            }
        }
    }
}

/// Does a `KeysOp` against the metadata database (blocks).
fn keys_work(meta: &MetaStore, op: KeysOp) -> KeysDone {
    let internal = |session, request_id, err: &dyn std::fmt::Display| {
        warn!(%err, "prekey operation failed");
        KeysDone::Failed {
            session,
            request_id,
            code: ErrorCode::Internal,
            message: "the prekeys could not be read or written",
        }
    };
    match op {
        KeysOp::Upload {
            session,
            device,
            request_id,
            identity,
            one_time,
            max,
        } => {
            let keys: Vec<(u32, &[u8])> = one_time.iter().map(|(id, k)| (*id, &k[..])).collect();
            match meta.upload_prekeys(device.user, device.device, identity.as_ref(), &keys, max) {
                Ok(Some(count)) => KeysDone::Stored {
                    session,
                    request_id,
                    one_time: count,
                },
                Ok(None) => KeysDone::Failed {
                    session,
                    request_id,
                    code: ErrorCode::PrekeysInvalid,
                    message:
                        "no identity key uploaded yet, or more one-time prekeys than the limit",
                },
                Err(err) => internal(session, request_id, &err),
            }
        }
        KeysOp::Fetch {
            session,
            request_id,
            user,
            devices,
        } => match meta.fetch_prekeys(user, &devices) {
            Ok(devices) => KeysDone::Bundle {
                session,
                request_id,
                user,
                devices,
            },
            Err(err) => internal(session, request_id, &err),
        },
    }
}

/// The engine's host on a real shard: frames go to the connections' output
/// queues (the socket loop sends them), requests are collected for the
/// caller to put on the channels, replies go on them at once.
struct ShardHost<'a> {
    shard: &'a Rc<Shard>,
    outbound: Outbound,
}

impl ShardHost<'_> {
    fn conn(&self, session: SessionId) -> Option<Rc<Conn>> {
        self.shard.sockets.session(ConnId::from_u64(session))
    }
}

impl Host for ShardHost<'_> {
    fn send(&mut self, session: SessionId, frame: &Frame) {
        if let Some(conn) = self.conn(session) {
            conn.enqueue(frame);
        }
    }

    fn close(&mut self, session: SessionId, frame: &Frame, closing: Closing) {
        if let Some(conn) = self.conn(session) {
            conn.close_with(frame, close_reason(closing));
        }
    }

    fn output_full(&self, session: SessionId) -> bool {
        let out_max = self.shard.config.limits.output_queue_bytes_max as usize;
        self.conn(session)
            .is_none_or(|conn| conn.state.borrow().out_len() >= out_max)
    }

    fn closing(&self, session: SessionId) -> bool {
        self.conn(session).is_none_or(|conn| conn.is_closing())
    }

    fn request(&mut self, shard: ShardId, request: engine::Request) {
        self.outbound.push(shard, Request::Engine(request));
    }

    fn reply(&mut self, shard: ShardId, reply: engine::Reply) {
        self.shard.send_reply(shard, Reply::Engine(reply));
    }

    fn commit_due(&mut self) {
        self.shard.kick_commit();
    }

    fn account(&mut self, op: AccountOp) {
        let shard = self.shard.clone();
        self.shard
            .spawn(ShardTask::Other, async move { shard.account_op(op).await });
    }

    fn group(&mut self, op: GroupOp) {
        let shard = self.shard.clone();
        self.shard
            .spawn(ShardTask::Other, async move { shard.group_op(op).await });
    }

    fn keys(&mut self, op: KeysOp) {
        let shard = self.shard.clone();
        self.shard
            .spawn(ShardTask::Other, async move { shard.keys_op(op).await });
    }

    fn wake(&mut self, device: InboxKey) {
        if let Some(pusher) = &self.shard.pusher {
            pusher.wake(device);
        }
    }
}

pub struct Shard {
    pub id: ShardId,
    pub shards: u32,
    pub config: Arc<Config>,
    pub meta: Arc<MetaStore>,
    pub metrics: Arc<ShardMetrics>,
    /// The delivery engine: inboxes (through its log), sessions' delivery
    /// state, dedupe, receipts.
    pub engine: RefCell<Engine>,
    /// Open sockets on this shard, handshaking or in session.
    pub open_connections: Cell<u32>,
    pub requests: Vec<Option<ConnectedSender<Request>>>,
    /// Per other shard: requests that found its channel full, sent in
    /// order by one task (created at the first full channel).
    backlogs: RefCell<Vec<Option<Rc<Backlog>>>>,
    pub replies: Vec<Option<ConnectedSender<Reply>>>,
    pub throttle: RefCell<AuthThrottle>,
    /// The push thread's queue (wake-ups on).
    pub pusher: Option<crate::push::Pusher>,
    /// When devices' sessions opened or closed since the last write of
    /// last-seen times to the metadata database (maintenance writes them).
    last_seen: RefCell<std::collections::HashMap<InboxKey, u64>>,
    last_seen_writing: Cell<bool>,
    /// Work running on the blocking pool: a stop waits for it, since the
    /// pool cannot answer an executor that has ended.
    blocking_in_flight: Cell<u32>,
    /// The shard's sockets (its io_uring ring and what the loop keeps).
    pub sockets: crate::shard::io::Sockets,
    commit_waker: Cell<Option<std::task::Waker>>,
    started: Instant,
    /// Set once by `begin_stopping`; read anywhere.
    pub stopping: Cell<bool>,
    /// The task waiting in `stopping_begun`, woken when `stopping` is set.
    stop_waker: Cell<Option<std::task::Waker>>,
    /// The executor's task queue the shard's tasks run in: its latency
    /// setting is what makes the executor look at its rings every
    /// `server::PREEMPT_INTERVAL` while they run.
    queue: glommio::TaskQueueHandle,
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ShardId,
        shards: u32,
        config: Arc<Config>,
        meta: Arc<MetaStore>,
        metrics: Arc<ShardMetrics>,
        engine: Engine,
        requests: Vec<Option<ConnectedSender<Request>>>,
        replies: Vec<Option<ConnectedSender<Reply>>>,
        sockets: crate::shard::io::Sockets,
        pusher: Option<crate::push::Pusher>,
    ) -> Shard {
        let throttle = AuthThrottle::new(&config.limits);
        Shard {
            id,
            shards,
            config,
            meta,
            metrics,
            engine: RefCell::new(engine),
            open_connections: Cell::new(0),
            backlogs: RefCell::new((0..shards).map(|_| None).collect()),
            requests,
            replies,
            throttle: RefCell::new(throttle),
            pusher,
            last_seen: RefCell::new(std::collections::HashMap::new()),
            last_seen_writing: Cell::new(false),
            blocking_in_flight: Cell::new(0),
            sockets,
            commit_waker: Cell::new(None),
            started: Instant::now(),
            stopping: Cell::new(false),
            stop_waker: Cell::new(None),
            queue: crate::shard::server::shard_task_queue(),
        }
    }

    /// Coarse clock for idle tracking: seconds since the shard started.
    pub fn now_s(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    pub fn home_of(&self, user: UserId) -> ShardId {
        home_shard(user, self.shards)
    }

    /// Feeds one event to the engine; returns the requests it produced for
    /// other shards.
    fn feed(self: &Rc<Self>, event: Event) -> Outbound {
        let mut host = ShardHost {
            shard: self,
            outbound: Outbound::None,
        };
        self.engine.borrow_mut().handle(event, &mut host);
        host.outbound
    }

    /// Feeds an event that arose outside a session's input: requests it
    /// produces are sent, waiting in a task if a channel is full.
    fn feed_detached(self: &Rc<Self>, event: Event) {
        let outbound = self.feed(event);
        if let Some(wait) = self.forward(outbound) {
            self.spawn(ShardTask::Other, wait);
        }
    }

    /// Starts a detached task of the shard, its polls timed as `task`.
    pub fn spawn(&self, task: ShardTask, future: impl Future<Output = ()> + 'static) {
        self.spawn_joinable(task, future).detach();
    }

    /// `spawn`, keeping the task's handle.
    pub fn spawn_joinable<T: 'static>(
        &self,
        task: ShardTask,
        future: impl Future<Output = T> + 'static,
    ) -> glommio::Task<T> {
        glommio::spawn_local_into(timed(self.metrics.clone(), task, future), self.queue)
            .expect("the shard's task queue lives as long as its executor")
    }

    // ---- sessions -------------------------------------------------------

    /// Opens the session of an authenticated device homed here, on driver
    /// socket `socket` accepted at `connected_at`; returns its connection.
    /// The engine decides whether it replaces the device's live session or
    /// is itself replaced (`engine::delivery`).
    pub fn open_session(
        self: &Rc<Self>,
        device: InboxKey,
        protocol_version: u32,
        socket: ConnId,
        connected_at: u32,
    ) -> Rc<Conn> {
        self.seen(device);
        let conn = Rc::new(Conn::new(device, socket, self.now_s()));
        // The engine's frames reach the connection through the socket
        // table, where the caller puts it next; so queue them here first.
        let mut host = OpeningHost {
            conn: &conn,
            inner: ShardHost {
                shard: self,
                outbound: Outbound::None,
            },
        };
        self.engine.borrow_mut().handle(
            Event::Opened {
                device,
                session: conn.id(),
                connected_at,
                protocol_version,
            },
            &mut host,
        );
        // Requests the opening made (presence: its followers elsewhere).
        let outbound = host.inner.outbound;
        if let Some(wait) = self.forward(outbound) {
            self.spawn(ShardTask::Other, wait);
        }
        conn
    }

    /// Notes that `device` was seen now (a session opened or closed).
    fn seen(&self, device: InboxKey) {
        let now_ms = crate::store::Clock::now_ms(&crate::store::SystemClock);
        self.last_seen.borrow_mut().insert(device, now_ms);
    }

    /// Writes the last-seen times noted since the last write, in one
    /// transaction off the shard. One write at a time; what is noted
    /// meanwhile waits for the next.
    pub async fn write_last_seen(self: &Rc<Self>) {
        if self.last_seen_writing.get() || self.last_seen.borrow().is_empty() {
            return;
        }
        let seen: Vec<_> = self
            .last_seen
            .borrow_mut()
            .drain()
            .map(|(device, at)| (device.user, device.device, at))
            .collect();
        self.last_seen_writing.set(true);
        let meta = self.meta.clone();
        let written = self.blocking(move || meta.record_last_seen(&seen)).await;
        self.last_seen_writing.set(false);
        if let Err(err) = written {
            warn!(shard = %self.id, %err, "writing last-seen times failed");
        }
    }

    /// The live session of `device` here, if it is not closing.
    pub fn live_session(&self, device: InboxKey) -> Option<Rc<Conn>> {
        let id = self.engine.borrow().session(device)?.id;
        self.sockets
            .session(ConnId::from_u64(id))
            .filter(|live| !live.is_closing())
    }

    /// Forgets a session whose socket is closing or closed.
    pub fn close_session(self: &Rc<Self>, conn: &Rc<Conn>) {
        self.seen(conn.device);
        // Its requests (presence: unwatches, followers elsewhere) are sent.
        self.feed_detached(Event::Closed {
            device: conn.device,
            session: conn.id(),
        });
    }

    /// Sends read from this session and not yet answered.
    pub fn sends_in_flight(&self, conn: &Conn) -> u32 {
        self.engine
            .borrow()
            .session(conn.device)
            .filter(|s| s.id == conn.id())
            .map_or(0, |s| u32::from(s.sends_in_flight))
    }

    /// The session's output queue went below its bound: the engine pumps
    /// again if it had stopped there.
    pub fn output_drained(self: &Rc<Self>, conn: &Rc<Conn>) {
        if self.engine.borrow().pump_blocked(conn.device) {
            let _ = self.feed(Event::OutputDrained {
                device: conn.device,
                session: conn.id(),
            });
        }
    }

    /// Handles one frame of an authenticated session.
    ///
    /// Synchronous: work for this shard is done here; what other shards must
    /// do is returned, and the socket loop sends it (`forward`), setting the
    /// session's later frames aside while a channel is full.
    pub fn on_frame(self: &Rc<Self>, conn: &Rc<Conn>, frame: Frame) -> Outbound {
        conn.last_activity_s.set(self.now_s());
        self.feed(Event::Frame {
            device: conn.device,
            session: conn.id(),
            frame,
        })
    }

    /// Sends requests to their shards in the order given, and after every
    /// request sent earlier to the same shard: a request that finds a
    /// channel full, and every later one to that shard while any waits,
    /// goes to that shard's backlog, which one task sends in order (a
    /// group's messages reach each shard in the group's order this way).
    /// Returns a future to await before producing more (the backpressure:
    /// the caller's connection is not read meanwhile) when a backlog is
    /// past its bound, the channel's capacity.
    pub fn forward(
        self: &Rc<Self>,
        outbound: Outbound,
    ) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
        let mut full: Vec<Rc<Backlog>> = Vec::new();
        let mut offer = |target: ShardId, request: Request| {
            let backlog = self.backlogs.borrow()[target.0 as usize].clone();
            let request = match &backlog {
                Some(b) if b.pending.get() > 0 => request,
                _ => {
                    let sender = self.requests[target.0 as usize]
                        .as_ref()
                        .expect("a channel to every other shard");
                    match sender.try_send(request) {
                        Ok(()) => return,
                        Err(err) => match channel_item(err) {
                            Some(request) => request,
                            // Closed (the target stopped): route_request
                            // answers what it can.
                            None => return,
                        },
                    }
                }
            };
            let backlog = backlog.unwrap_or_else(|| self.start_backlog(target));
            backlog.push(request);
            if backlog.pending.get() > self.config.limits.shard_channel_capacity as usize
                && !full.iter().any(|b| Rc::ptr_eq(b, &backlog))
            {
                full.push(backlog);
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
        if full.is_empty() {
            return None;
        }
        let bound = self.config.limits.shard_channel_capacity as usize;
        Some(Box::pin(async move {
            for backlog in full {
                backlog.below(bound).await;
            }
        }))
    }

    /// The backlog of requests to `target`, and the task that sends it.
    fn start_backlog(self: &Rc<Self>, target: ShardId) -> Rc<Backlog> {
        let (tx, rx) = glommio::channels::local_channel::new_unbounded();
        let backlog = Rc::new(Backlog {
            tx,
            pending: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        });
        self.backlogs.borrow_mut()[target.0 as usize] = Some(backlog.clone());
        let shard = self.clone();
        let pump = backlog.clone();
        self.spawn(ShardTask::Channels, async move {
            while let Some(request) = rx.recv().await {
                shard.route_request(target, request).await;
                pump.sent();
            }
        });
        backlog
    }

    /// Forwards the receipts left in this shard's relay inboxes (a crash
    /// came between their cause's commit and their home shard's). Runs
    /// once at start, with every shard's channels connected.
    pub async fn forward_relayed(self: &Rc<Self>) {
        let outbound = self.feed(Event::Recovered);
        // Through the per-shard backlogs, like every other request, so a
        // group message committed after the start cannot overtake one
        // forwarded again here.
        if let Some(wait) = self.forward(outbound) {
            wait.await;
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
                Some(Request::Engine(engine::Request::Store {
                    origin,
                    sender,
                    client_message_id,
                    ..
                })) => self.on_reply(Reply::Engine(engine::Reply::Refused {
                    origin,
                    sender,
                    client_message_id,
                    code: ErrorCode::Internal,
                })),
                Some(Request::Hello { origin, .. }) => self.on_reply(Reply::Hello {
                    origin,
                    verdict: HelloVerdict::Internal,
                }),
                Some(Request::Link { origin, .. }) => self.on_reply(Reply::Link {
                    origin,
                    outcome: LinkOutcome::Internal,
                }),
                _ => {}
            }
        }
    }

    /// Applies a request addressed to this shard. Never waits: replies are
    /// queued behind the commit that makes the record durable.
    pub fn handle_request(self: &Rc<Self>, request: Request) {
        match request {
            Request::Engine(request) => self.feed_detached(Event::Request(request)),
            Request::Handoff {
                fd,
                device,
                version,
                buffered,
                connected_at,
                sealing,
            } => {
                self.metrics.handoffs_in.inc();
                let socket = crate::shard::io::Adopted {
                    fd,
                    buffered,
                    sealing,
                };
                crate::shard::io::adopt(self, socket, device, version, connected_at);
            }
            Request::Hello {
                origin,
                peer,
                device,
                secret,
                noise_key,
            } => {
                self.spawn(
                    ShardTask::Other,
                    self.clone()
                        .check_hello(origin, peer, device, secret, noise_key),
                );
            }
            Request::Link {
                origin,
                peer,
                code,
                name,
                noise_key,
            } => {
                self.spawn(
                    ShardTask::Other,
                    self.clone()
                        .redeem_link(origin, peer, code, name, noise_key),
                );
            }
        }
    }

    /// Redeems a link code as the home shard of the client's address: a
    /// delaying address is refused at once; an unknown, used or expired
    /// code counts as a failed login of the address, like a bad Hello.
    async fn redeem_link(
        self: Rc<Self>,
        origin: ConnRef,
        peer: std::net::IpAddr,
        code: String,
        name: String,
        noise_key: Option<[u8; 32]>,
    ) {
        let wait = self.throttle.borrow_mut().check(peer, Instant::now());
        let outcome = match wait {
            Some(wait) => LinkOutcome::RateLimited {
                retry_after_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            },
            None => {
                let meta = self.meta.clone();
                let companions_max = self.config.limits.companions_max;
                let now_ms = crate::store::Clock::now_ms(&crate::store::SystemClock);
                let redeemed = self
                    .blocking(move || {
                        meta.redeem_link_code(&code, &name, now_ms, companions_max, noise_key)
                    })
                    .await;
                match redeemed {
                    Ok(account) => {
                        self.throttle.borrow_mut().on_success(peer);
                        LinkOutcome::Linked {
                            user: account.user,
                            device: account.device,
                            secret: account.secret,
                        }
                    }
                    Err(LinkError::InvalidCode) => {
                        self.throttle.borrow_mut().on_failure(peer, Instant::now());
                        LinkOutcome::Refused(ErrorCode::LinkCodeInvalid)
                    }
                    Err(LinkError::TooManyDevices) => {
                        LinkOutcome::Refused(ErrorCode::TooManyDevices)
                    }
                    Err(LinkError::Meta(err)) => {
                        warn!(%err, "link code redemption failed");
                        LinkOutcome::Internal
                    }
                }
            }
        };
        self.send_reply(origin.shard, Reply::Link { origin, outcome });
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
        noise_key: Option<[u8; 32]>,
    ) {
        let wait = self.throttle.borrow_mut().check(peer, Instant::now());
        let verdict = match wait {
            Some(wait) => HelloVerdict::RateLimited {
                retry_after_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
            },
            None => {
                let meta = self.meta.clone();
                let verified = self
                    .blocking(move || match noise_key {
                        Some(key) => meta.verify_key(device.user, device.device, &key, &secret),
                        None => meta.verify(device.user, device.device, &secret),
                    })
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
        self.send_reply(origin.shard, Reply::Hello { origin, verdict });
    }

    /// Carries out an engine's `AccountOp` on the blocking pool (the
    /// metadata database) and feeds the outcome back.
    async fn account_op(self: Rc<Self>, op: AccountOp) {
        let meta = self.meta.clone();
        let done = self.blocking(move || account_work(&meta, op)).await;
        self.feed_detached(Event::Account(done));
    }

    /// Carries out an engine's `GroupOp` on the blocking pool and feeds
    /// the outcome back.
    async fn group_op(self: Rc<Self>, op: GroupOp) {
        let meta = self.meta.clone();
        let done = self.blocking(move || group_work(&meta, op)).await;
        self.feed_detached(Event::Group(done));
    }

    /// Carries out an engine's `KeysOp` on the blocking pool and feeds the
    /// outcome back.
    async fn keys_op(self: Rc<Self>, op: KeysOp) {
        let meta = self.meta.clone();
        let done = self.blocking(move || keys_work(&meta, op)).await;
        self.feed_detached(Event::Keys(done));
    }

    /// Runs `work` on the blocking pool, counted so a stop can wait for it.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.blocking_in_flight
            .set(self.blocking_in_flight.get() + 1);
        let out = glommio::executor().spawn_blocking(work).await;
        self.blocking_in_flight
            .set(self.blocking_in_flight.get() - 1);
        out
    }

    /// Writes the last-seen times still noted and waits for every blocking
    /// call (at most `deadline`), so the executor ends with nothing running
    /// on its pool.
    pub async fn settle_blocking(self: &Rc<Self>, deadline: Instant) {
        self.write_last_seen().await;
        while (self.blocking_in_flight.get() > 0 || !self.last_seen.borrow().is_empty())
            && Instant::now() < deadline
        {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
            self.write_last_seen().await;
        }
    }

    /// Time passed: the engine ends presence grace periods.
    pub fn tick(self: &Rc<Self>) {
        self.feed_detached(Event::Tick);
    }

    /// Marks the shard as stopping and wakes the task waiting for that.
    pub fn begin_stopping(&self) {
        self.stopping.set(true);
        if let Some(waker) = self.stop_waker.take() {
            waker.wake();
        }
    }

    /// Resolves once `begin_stopping` has been called: the shard's main
    /// task waits here without a timer, so a quiet shard is not woken for
    /// it.
    pub async fn stopping_begun(&self) {
        std::future::poll_fn(|cx| {
            if self.stopping.get() {
                std::task::Poll::Ready(())
            } else {
                self.stop_waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// Wakes the commit task.
    pub fn kick_commit(&self) {
        if let Some(waker) = self.commit_waker.take() {
            waker.wake();
        }
    }

    /// Sends a reply to `target`, or applies it here.
    fn send_reply(self: &Rc<Self>, target: ShardId, reply: Reply) {
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
            self.spawn(ShardTask::Channels, async move {
                let sender = shard.replies[target.0 as usize]
                    .as_ref()
                    .expect("a channel to every other shard");
                let _ = sender.send(reply).await;
            });
        }
    }

    /// A reply for one of this shard's connections or handshakes, or for a
    /// relayed receipt kept here.
    pub fn on_reply(self: &Rc<Self>, reply: Reply) {
        match reply {
            Reply::Hello { origin, verdict } => {
                crate::shard::io::hello_verdict(self, ConnId::from_u64(origin.id), verdict);
            }
            Reply::Link { origin, outcome } => {
                crate::shard::io::link_outcome(self, ConnId::from_u64(origin.id), outcome);
            }
            Reply::Engine(reply) => self.feed_detached(Event::Reply(reply)),
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
    pub fn metrics_linked(&self) {
        self.metrics.devices_linked.inc();
    }
    pub fn metrics_noise_handshake(&self, pattern: crate::noise::Pattern) {
        match pattern {
            crate::noise::Pattern::Xx => self.metrics.noise_xx_handshakes.inc(),
            crate::noise::Pattern::Ik => self.metrics.noise_ik_handshakes.inc(),
        }
    }
    pub fn metrics_noise_failed(&self) {
        self.metrics.noise_handshake_failures.inc();
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
        let stats = self.engine.borrow().log().stats();
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
    /// to the commit interval, makes it durable, then tells the engine.
    /// A failed fdatasync is fatal: the page cache's state is unknown, so the
    /// process exits rather than acknowledge anything more.
    pub async fn commit_loop(self: Rc<Self>) {
        let interval =
            std::time::Duration::from_micros(self.config.store.commit_interval_us as u64);
        let durability = self.config.store.durability;
        let idle = |shard: &Shard| shard.engine.borrow().commit_idle();
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
                    && self.engine.borrow().commit_waiting()
                        < self.config.store.commit_batch_records_max as usize
                {
                    glommio::timer::sleep(interval).await;
                }
            }
            if self.engine.borrow().receipts_batched() {
                self.feed_detached(Event::BeforeCommit);
            }
            let batch = self.engine.borrow_mut().log_mut().begin_commit();
            if let Some(batch) = batch {
                let started = Instant::now();
                let synced = if self.sockets.syncs_in_ring() {
                    self.sync_in_ring(&batch).await
                } else {
                    batch.sync().await
                };
                if let Err(err) = synced {
                    error!(shard = %self.id, %err, "fdatasync of the log failed; exiting without acknowledging more");
                    std::process::exit(70);
                }
                self.metrics
                    .commit_latency
                    .record_us(started.elapsed().as_micros() as u64);
                self.engine.borrow_mut().log_mut().finish_commit(batch);
            }
            self.feed_detached(Event::Durable);
            self.prepare_spare();
            glommio::yield_if_needed().await;
        }
    }

    /// `CommitBatch::sync` through the socket ring (`Sockets::fdatasync`),
    /// one file after another in the batch's order.
    async fn sync_in_ring(
        &self,
        batch: &crate::store::CommitBatch,
    ) -> Result<(), crate::store::StoreError> {
        use std::os::fd::AsRawFd;
        for handle in batch.sync_files() {
            self.sockets.fdatasync(handle?.file.as_raw_fd()).await?;
        }
        Ok(())
    }

    /// Has the log's next segment file made ahead of its roll, the
    /// fallocate on the kernel's side of the ring, when the log wants one
    /// (`Log::spare_wanted`).
    pub fn prepare_spare(self: &Rc<Self>) {
        let Some(request) = self.engine.borrow_mut().log_mut().spare_wanted() else {
            return;
        };
        let shard = self.clone();
        self.spawn(ShardTask::Other, async move {
            let made =
                crate::store::segment::preallocate_spare(&request.path, request.size_bytes).await;
            shard.engine.borrow_mut().log_mut().spare_prepared(made);
        });
    }

    /// Whether every action waiting on a commit has run.
    pub fn commits_settled(&self) -> bool {
        self.engine.borrow().commits_settled()
    }

    /// Whether every receipt relayed from here was stored by its home shard
    /// (a graceful stop waits for it, so a restart repeats none).
    pub fn relays_settled(&self) -> bool {
        self.engine.borrow().relays_settled()
    }
}

/// The host while a session opens: its connection is not in the socket
/// table yet, so its frames go to it directly.
struct OpeningHost<'a> {
    conn: &'a Rc<Conn>,
    inner: ShardHost<'a>,
}

impl Host for OpeningHost<'_> {
    fn send(&mut self, session: SessionId, frame: &Frame) {
        if session == self.conn.id() {
            self.conn.enqueue(frame);
        } else {
            self.inner.send(session, frame);
        }
    }

    fn close(&mut self, session: SessionId, frame: &Frame, closing: Closing) {
        if session == self.conn.id() {
            self.conn.close_with(frame, close_reason(closing));
        } else {
            self.inner.close(session, frame, closing);
        }
    }

    fn output_full(&self, session: SessionId) -> bool {
        if session == self.conn.id() {
            let out_max = self.inner.shard.config.limits.output_queue_bytes_max as usize;
            self.conn.state.borrow().out_len() >= out_max
        } else {
            self.inner.output_full(session)
        }
    }

    fn closing(&self, session: SessionId) -> bool {
        if session == self.conn.id() {
            self.conn.is_closing()
        } else {
            self.inner.closing(session)
        }
    }

    fn request(&mut self, shard: ShardId, request: engine::Request) {
        self.inner.request(shard, request);
    }

    fn reply(&mut self, shard: ShardId, reply: engine::Reply) {
        self.inner.reply(shard, reply);
    }

    fn commit_due(&mut self) {
        self.inner.commit_due();
    }

    fn account(&mut self, op: AccountOp) {
        self.inner.account(op);
    }

    fn group(&mut self, op: GroupOp) {
        self.inner.group(op);
    }

    fn keys(&mut self, op: KeysOp) {
        self.inner.keys(op);
    }

    fn wake(&mut self, device: InboxKey) {
        self.inner.wake(device);
    }
}
