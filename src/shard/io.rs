//! The shard's socket loop: every socket of the shard, driven by the shard's
//! own io_uring ring (`net::uring::Driver`), with no task per connection.
//!
//! One task per shard (`run`) waits on the driver's notifier, collects the
//! ring's events and answers them with the sans-IO logic of `session` and
//! the engine (through the shard's glue):
//! - `Accepted` starts a handshake, a small boxed record in the slot table
//!   (indexed like the driver's connection table);
//! - `Data` carries complete frames: a handshake decodes Register/Hello
//!   (the account lookups run on the blocking pool while the connection's
//!   reading is paused), a session hands each frame to `Shard::on_frame` (the engine's
//!   `Event::Frame`);
//! - output: a `Conn`'s frames are encoded into its queue wherever they
//!   arise (`Conn::enqueue`, delivery) and the connection is marked woken;
//!   once per loop turn the loop moves each woken connection's queue to the
//!   driver in one piece, so every frame due to it that turn leaves in one
//!   sendmsg;
//! - backpressure: a session whose socket refuses more output, whose output
//!   queue is at its bound, whose unanswered Sends are at theirs, or whose
//!   requests wait for room in a full shard channel keeps its unhandled
//!   frames aside and its reading is paused until the cause clears; nothing
//!   is dropped and memory stays bounded;
//! - the handoff to the home shard is `Driver::release` (the ring gives up
//!   the socket and the bytes it read) then `Driver::adopt` on the home
//!   shard;
//! - closes are `close(Flush)`: the last frame (Error, GoAway) is sent, the
//!   socket half-closed, the peer's FIN awaited for the linger time.
//!
//! Everything here runs on the shard's thread; no borrow of the driver or
//! of the slot table is held across an await.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, error, warn};

use super::{Outbound, Shard};
use crate::config::{Config, SocketRingSetup};
use crate::ids::InboxKey;
use crate::metrics::ShardTask;
use crate::net::conn::{self, Conn};
use crate::net::uring::{
    CloseMode, ConnId, Driver, DriverConfig, DriverStats, Event, FrameHeader, Notifier, Sealing,
    SendError, SendErrorKind, SetupMode, UringError,
};
use crate::noise::ServerKeys;
use crate::proto::{self, error_frame, pb, ErrorCode, Frame, GoAwayReason};
use crate::route::address_home;
use crate::route::message::{ConnRef, HelloVerdict, LinkOutcome, Request};
use crate::session::client_may_send_in_session;
use crate::session::handshake::{Handshake, RegistrationRules, Step};
use crate::session::noise::NoiseStep;

/// Connections past `connections_per_shard_max` the driver still takes, so
/// the ones over the limit can be told SERVER_BUSY before they are closed.
const REFUSAL_SLACK: u32 = 1024;

/// What the loop knows about one socket of the driver.
enum Slot {
    Free,
    Handshake(Box<Handshake>),
    Session(Rc<Conn>),
    /// Authenticated for another shard: the driver is giving the socket up.
    Releasing(Box<Releasing>),
    /// Authenticated here while an earlier session of the device is live:
    /// the session opens once that one has handled what it read.
    Opening(Box<Opening>),
    /// A last frame is being flushed; the driver closes the socket.
    Closing,
}

struct Releasing {
    device: InboxKey,
    version: u32,
    connected_at: u32,
    /// Frames the client pipelined after its Hello; the home shard handles
    /// them.
    input: BytesMut,
}

/// A session waiting for the device's earlier session to handle its input.
///
/// A client that acknowledges, closes and reconnects has its last Acks on
/// the old socket before its new connection exists, but the two sockets
/// are separate streams: the new connection's Hello (looked up on the
/// blocking pool, perhaps handed over from another shard) can reach this
/// loop before the old socket's bytes have been handled. Opening the new
/// session at once would deliver again what those Acks acknowledged.
///
/// So the earlier session is marked superseded (its frames are handled
/// whatever its socket and in-flight bounds say, up to twice its output
/// bound, and frames it set aside are handled now, its reading resumed),
/// and the new one opens after at least one more poll of the ring, whose
/// events are handled before deferred opens: every byte that reached the
/// old socket before the new session was authenticated is handled first.
/// An earlier session that cannot finish (its requests wait for room in a
/// full shard channel) delays the open by at most `OPENING_TURNS_MAX`
/// turns.
struct Opening {
    device: InboxKey,
    version: u32,
    connected_at: u32,
    /// Frames pipelined after the Hello.
    input: BytesMut,
    input_closed: bool,
    /// Loop turns waited.
    turns: u8,
}

impl Opening {
    fn new(device: InboxKey, version: u32, connected_at: u32, input: BytesMut) -> Opening {
        Opening {
            device,
            version,
            connected_at,
            input,
            input_closed: false,
            turns: 0,
        }
    }
}

/// Loop turns a session waits at most for the earlier one (`Opening`).
const OPENING_TURNS_MAX: u8 = 4;

/// A session's frames set aside while it is backpressured.
struct Stalled {
    input: BytesMut,
    /// Requests of a handled frame wait for room in a full shard channel;
    /// nothing after it may be handled first.
    waiting: bool,
}

/// The shard's sockets: the driver and what the loop keeps per socket.
pub struct Sockets {
    driver: RefCell<Driver>,
    notifier: Notifier,
    /// Indexed by the driver's slot index, with the `ConnId` each entry is
    /// for: the driver may report a new socket in a reused slot before the
    /// old socket's `Closed`.
    slots: RefCell<Vec<(ConnId, Slot)>>,
    /// Entries whose slot was reused before their last event arrived.
    displaced: RefCell<HashMap<ConnId, Slot>>,
    /// Sessions with frames set aside, by `Conn::id()`.
    stalled: RefCell<HashMap<u64, Stalled>>,
    /// Handshake deadlines in the order they were set (one timeout for
    /// all, so the queue is sorted), in milliseconds since `epoch`: 12
    /// bytes per handshake of the last timeout period.
    deadlines: RefCell<VecDeque<(u32, ConnId)>>,
    epoch: Instant,
    /// `shutdown` ran: the loop ends once the driver is idle.
    finished: Cell<bool>,
    /// Slots that hold a session.
    sessions: Cell<usize>,
    /// Sockets in `Slot::Opening`, in the order they were deferred.
    opening: RefCell<Vec<ConnId>>,
    /// The server's Noise static keys (`None`: Noise is off).
    noise_keys: Option<Arc<ServerKeys>>,
    /// `server.socket_wait_in_ring` in effect: the loop sleeps in the ring
    /// while traffic lasts, and the log's fdatasyncs go through the ring.
    wait_in_ring: bool,
    /// The log's fdatasyncs in flight through the ring.
    syncs: RefCell<RingSyncs>,
    /// The loop has ended: fdatasyncs go through the executor's ring again.
    loop_ended: Cell<bool>,
}

/// fdatasyncs through the socket ring, by the number the driver reports.
#[derive(Default)]
struct RingSyncs {
    next: u32,
    /// The result once in, and the waker of the commit awaiting it.
    in_flight: HashMap<u32, (Option<std::io::Result<()>>, Option<std::task::Waker>)>,
}

impl Sockets {
    /// Creates the shard's ring. Runs on the shard's thread, inside its
    /// executor.
    pub fn new(
        config: &Config,
        noise_keys: Option<Arc<ServerKeys>>,
    ) -> Result<Sockets, UringError> {
        let mut driver_config = driver_config(config);
        driver_config.noise = noise_keys.is_some();
        let driver = Driver::new(driver_config)?;
        let notifier = driver.notifier();
        Ok(Sockets {
            driver: RefCell::new(driver),
            notifier,
            slots: RefCell::new(Vec::new()),
            displaced: RefCell::new(HashMap::new()),
            stalled: RefCell::new(HashMap::new()),
            deadlines: RefCell::new(VecDeque::new()),
            epoch: Instant::now(),
            finished: Cell::new(false),
            sessions: Cell::new(0),
            opening: RefCell::new(Vec::new()),
            noise_keys,
            wait_in_ring: config.server.socket_wait_in_ring
                && config.server.socket_poll_interval_us > 0,
            syncs: RefCell::new(RingSyncs::default()),
            loop_ended: Cell::new(false),
        })
    }

    /// Whether the log's fdatasyncs go through this ring
    /// ([`Sockets::fdatasync`]): with `server.socket_wait_in_ring`, while
    /// the loop runs. A loop asleep in its ring would see an fdatasync
    /// complete on the executor's ring only at its next socket event or
    /// look; one through its own ring wakes it.
    pub fn syncs_in_ring(&self) -> bool {
        self.wait_in_ring && !self.loop_ended.get()
    }

    /// Whether an fdatasync through the ring is in flight.
    fn sync_in_flight(&self) -> bool {
        !self.syncs.borrow().in_flight.is_empty()
    }

    /// fdatasync of `fd` through the ring; `fd` must stay open until this
    /// returns. Cancel safety: a call dropped before its completion leaves
    /// an entry behind, which the completion fills and nothing reads (the
    /// commit loop is dropped only with the shard).
    pub async fn fdatasync(&self, fd: RawFd) -> std::io::Result<()> {
        let number = {
            let mut syncs = self.syncs.borrow_mut();
            let number = syncs.next;
            syncs.next = number.wrapping_add(1);
            syncs.in_flight.insert(number, (None, None));
            number
        };
        if let Err(err) = self.driver.borrow_mut().fdatasync(fd, number) {
            self.syncs.borrow_mut().in_flight.remove(&number);
            return Err(std::io::Error::other(err));
        }
        futures_lite::future::poll_fn(|cx| {
            let mut syncs = self.syncs.borrow_mut();
            let entry = syncs
                .in_flight
                .get_mut(&number)
                .expect("an fdatasync's entry lives until its caller reads it");
            match entry.0.take() {
                Some(result) => {
                    syncs.in_flight.remove(&number);
                    std::task::Poll::Ready(result)
                }
                None => {
                    entry.1 = Some(cx.waker().clone());
                    std::task::Poll::Pending
                }
            }
        })
        .await
    }

    fn synced(&self, number: u32, result: std::io::Result<()>) {
        let mut syncs = self.syncs.borrow_mut();
        if let Some(entry) = syncs.in_flight.get_mut(&number) {
            entry.0 = Some(result);
            if let Some(waker) = entry.1.take() {
                waker.wake();
            }
        }
    }

    pub fn notifier(&self) -> Notifier {
        self.notifier.clone()
    }

    /// Accepts on `listener` (bound, listening, TCP_NODELAY set).
    pub fn listen(&self, listener: OwnedFd) -> Result<(), UringError> {
        self.driver.borrow_mut().listen(listener)
    }

    /// Sockets the driver holds (handshaking, in session, closing).
    pub fn connections(&self) -> usize {
        self.driver.borrow().connections()
    }

    pub fn stats(&self) -> DriverStats {
        self.driver.borrow().stats()
    }

    /// Whether the socket loop has work it has not taken yet.
    pub fn loop_work_waiting(&self) -> bool {
        self.driver.borrow_mut().has_work()
    }

    /// Copies the driver's counters into the shard's metrics.
    pub fn publish(&self, metrics: &crate::metrics::ShardMetrics) {
        let stats = self.stats();
        metrics.socket_ring_enters.set_total(stats.enters);
        metrics.socket_ring_completions.set_total(stats.completions);
        metrics.socket_ring_syncs.set_total(stats.syncs);
        metrics.socket_ring_no_buffers.set_total(stats.no_buffers);
        metrics
            .socket_ring_stale_completions
            .set_total(stats.stale_completions);
        metrics.socket_tail_bytes.set(stats.tail_bytes as i64);
        metrics.sockets.set(self.connections() as i64);
    }

    /// Milliseconds since the loop started (wraps after 49 days; handshake
    /// deadlines only compare values a timeout apart).
    fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn set(&self, id: ConnId, slot: Slot) {
        let mut slots = self.slots.borrow_mut();
        let index = id.index as usize;
        if slots.len() <= index {
            slots.resize_with(index + 1, || (id, Slot::Free));
        }
        let (owner, previous) = std::mem::replace(&mut slots[index], (id, slot));
        if owner != id && !matches!(previous, Slot::Free) {
            // The driver let go of `owner` inside a call (a release with
            // nothing in flight) and gave its slot to a socket adopted
            // before `owner`'s event was collected: keep `owner`'s entry
            // until that event comes.
            self.displaced.borrow_mut().insert(owner, previous);
        }
    }

    fn set_session(&self, id: ConnId, conn: Rc<Conn>) {
        self.sessions.set(self.sessions.get() + 1);
        self.set(id, Slot::Session(conn));
    }

    /// Takes socket `id`'s entry (`Free` if it has none).
    fn take(&self, id: ConnId) -> Slot {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(id.index as usize) {
            Some((owner, slot)) if *owner == id => std::mem::replace(slot, Slot::Free),
            _ => self
                .displaced
                .borrow_mut()
                .remove(&id)
                .unwrap_or(Slot::Free),
        }
    }

    /// The session on socket `id`, if that socket is one.
    pub fn session(&self, id: ConnId) -> Option<Rc<Conn>> {
        match self.slots.borrow().get(id.index as usize) {
            Some((owner, Slot::Session(conn))) if *owner == id => Some(conn.clone()),
            _ => None,
        }
    }

    /// Runs `f` on every session of the shard (the live ones and those
    /// replaced but not yet closed). `f` may queue frames and start closes;
    /// it must not open or end sessions.
    pub fn for_each_session(&self, f: impl FnMut(&Rc<Conn>)) {
        self.for_each_session_in(0, usize::MAX, f);
    }

    /// Runs `f` on the sessions among `count` socket slots from slot
    /// `start`; returns the slot to go on from, `None` at the end. Lets a
    /// pass over every session yield between slices.
    pub fn for_each_session_in(
        &self,
        start: usize,
        count: usize,
        mut f: impl FnMut(&Rc<Conn>),
    ) -> Option<usize> {
        let slots = self.slots.borrow();
        let end = start.saturating_add(count).min(slots.len());
        for (_, slot) in slots.get(start..end).unwrap_or_default() {
            if let Slot::Session(conn) = slot {
                f(conn);
            }
        }
        (end < slots.len()).then_some(end)
    }

    /// Sessions open on the shard.
    pub fn session_count(&self) -> usize {
        self.sessions.get()
    }

    /// Runs `f` on socket `id`'s handshake, if it is still handshaking.
    fn with_handshake<R>(&self, id: ConnId, f: impl FnOnce(&mut Handshake) -> R) -> Option<R> {
        match self.slots.borrow_mut().get_mut(id.index as usize) {
            Some((owner, Slot::Handshake(hs))) if *owner == id => Some(f(hs)),
            _ => None,
        }
    }

    /// Runs `f` on socket `id`'s deferred session, if it is waiting to open.
    fn with_opening<R>(&self, id: ConnId, f: impl FnOnce(&mut Opening) -> R) -> Option<R> {
        match self.slots.borrow_mut().get_mut(id.index as usize) {
            Some((owner, Slot::Opening(o))) if *owner == id => Some(f(o)),
            _ => None,
        }
    }

    fn pause(&self, id: ConnId) {
        if let Err(err) = self.driver.borrow_mut().pause_reading(id) {
            ring_failed(err);
        }
    }

    fn resume(&self, id: ConnId) {
        if let Err(err) = self.driver.borrow_mut().resume_reading(id) {
            ring_failed(err);
        }
    }

    fn close(&self, id: ConnId) {
        if let Err(err) = self.driver.borrow_mut().close(id, CloseMode::Flush) {
            ring_failed(err);
        }
    }

    /// Sends `bytes` to a socket that is not (or no longer) a session.
    fn send_raw(&self, id: ConnId, bytes: Bytes) {
        // A refusal means the socket is closing already; nothing to add.
        let _ = self.driver.borrow_mut().send(id, bytes);
    }
}

/// The driver's sizes from the server's configuration.
pub fn driver_config(config: &Config) -> DriverConfig {
    let limits = &config.limits;
    let mut driver = DriverConfig::production();
    driver.ring_mode_max = match config.server.socket_ring_setup {
        SocketRingSetup::DeferTaskrun => SetupMode::DeferTaskrun,
        SocketRingSetup::CoopTaskrun => SetupMode::CoopTaskrun,
        SocketRingSetup::Plain => SetupMode::Plain,
    };
    driver.frame_bytes_max = limits.frame_bytes_max;
    // An unknown type is refused from the header, before its body arrives.
    driver.frame_type_known = Some(|byte| proto::FrameType::from_byte(byte).is_some());
    // A client may pipeline frames and half-close: they are still handled
    // and answered.
    driver.half_close = true;
    driver.send_queue_bytes_max = limits
        .output_queue_bytes_max
        .max(limits.frame_bytes_max.saturating_add(4));
    driver.connections_max = limits
        .connections_per_shard_max
        .saturating_add(REFUSAL_SLACK);
    driver.tail_bytes_max = driver
        .tail_bytes_max
        .max(limits.frame_bytes_max as usize + proto::LENGTH_PREFIX_BYTES);
    driver
}

/// The ring refused work (out of memory, or a completion queue that never
/// drains). Connections could leak from here on, so the shard stops the
/// process rather than serve half-working; a supervisor restarts it and
/// the log recovers.
fn ring_failed(err: UringError) -> ! {
    error!(%err, "the socket ring failed; exiting");
    std::process::exit(70);
}

/// How long after its last socket event the loop keeps looking at the ring
/// every `socket_poll_interval_us`.
const POLL_ACTIVE_WINDOW_MS: u64 = 1_000;

/// The socket loop of one shard; returns after `shutdown` once the driver
/// has closed everything.
pub async fn run(shard: Rc<Shard>) {
    let notifier = shard.sockets.notifier();
    let mut events = Vec::new();
    let mut woken = Vec::new();
    let mut opening = Vec::new();
    let poll_every = Duration::from_micros(u64::from(shard.config.server.socket_poll_interval_us));
    let mut last_traffic_ms = 0u64;
    let wait_in_ring = shard.sockets.wait_in_ring;
    let batch_us = shard.config.server.socket_wait_batch_us;
    if wait_in_ring && batch_us > 0 && !shard.sockets.driver.borrow().supports_wait_batch() {
        warn!(
            "server.socket_wait_batch_us needs kernel 6.12+ (IORING_FEAT_MIN_TIMEOUT); \
             waits in the ring wake at the first completion"
        );
    }
    loop {
        let active =
            crate::metrics::monotonic_ms().saturating_sub(last_traffic_ms) < POLL_ACTIVE_WINDOW_MS;
        let commit_waits_on_ring =
            shard.sockets.sync_in_flight() || shard.engine.borrow().commit_idle();
        if wait_in_ring && active && commit_waits_on_ring {
            // Sleep in the socket ring: the kernel wakes this thread as soon
            // as a socket has work, with no eventfd in between. Only while
            // the commit is idle or waits on an fdatasync in this ring (the
            // log's syncs go through it, `Sockets::fdatasync`): a commit
            // about to run needs the executor. Then yield so the executor's
            // other tasks (the commit a completion woke) run.
            let signalled = notifier.take();
            if !signalled
                && !shard
                    .sockets
                    .driver
                    .borrow_mut()
                    .must_turn_before_ring_wait()
            {
                // A wait while an fdatasync is in flight does not gather:
                // its completion ends the wait at once, since the batch's
                // acknowledgements wait on it.
                let batch_us = if shard.sockets.sync_in_flight() {
                    0
                } else {
                    batch_us
                };
                if let Err(err) = shard
                    .sockets
                    .driver
                    .borrow_mut()
                    .wait_in_ring(poll_every, batch_us)
                {
                    ring_failed(err);
                }
            }
            glommio::executor().yield_now().await;
        } else {
            let waiting = shard.sockets.driver.borrow_mut().park();
            if waiting && wait_in_ring {
                // Here because a commit is pending. Work is there already,
                // perhaps only the kernel's flag for deferred work, which
                // can stay set after its work has run (`Notifier::take`):
                // let the executor's other tasks (the commit) run before
                // the next turn, rather than turn on empty enters until
                // the next arrival.
                notifier.take();
                glommio::executor().yield_now().await;
            } else if waiting || poll_every.is_zero() || !active {
                notifier.wait().await;
            } else {
                // The eventfd may come a grace period late; look again soon.
                futures_lite::future::or(notifier.wait(), glommio::timer::sleep(poll_every)).await;
            }
            shard.sockets.driver.borrow_mut().unpark();
        }
        shard
            .metrics
            .liveness
            .loop_turned(crate::metrics::monotonic_ms());
        // Sessions deferred before this poll open after its events.
        std::mem::swap(&mut opening, &mut *shard.sockets.opening.borrow_mut());
        let polled = shard.sockets.driver.borrow_mut().poll_events(&mut events);
        if let Err(err) = polled {
            ring_failed(err);
        }
        if !events.is_empty() {
            last_traffic_ms = crate::metrics::monotonic_ms();
        }
        for event in events.drain(..) {
            on_event(&shard, event);
        }
        for id in opening.drain(..) {
            open_deferred(&shard, id);
        }
        conn::take_woken(&mut woken);
        for socket in woken.drain(..) {
            flush(&shard, socket);
        }
        if shard.sockets.finished.get() && shard.sockets.driver.borrow().is_idle() {
            shard.sockets.loop_ended.set(true);
            return;
        }
        glommio::yield_if_needed().await;
    }
}

fn on_event(shard: &Rc<Shard>, event: Event) {
    match event {
        Event::Accepted { conn, peer } => accepted(shard, conn, peer.ip()),
        Event::Data { conn, frames } => data(shard, conn, frames),
        Event::Raw { conn, bytes } => raw(shard, conn, bytes),
        Event::BadFrame { conn, header } => bad_frame(shard, conn, header),
        Event::InputClosed { conn } => input_closed(shard, conn),
        Event::Writable { conn } => {
            if let Some(session) = shard.sockets.session(conn) {
                session.wake();
            }
        }
        Event::Closed { conn, reason } => {
            debug!(%conn, ?reason, "socket closed");
            match shard.sockets.take(conn) {
                Slot::Session(session) => end_session(shard, &session),
                Slot::Opening(opening) => supersede(shard, opening.device, false),
                _ => {}
            }
            shard.connection_closed();
        }
        Event::Synced { number, result } => shard.sockets.synced(number, result),
        Event::Released {
            conn,
            fd,
            buffered,
            sealing,
        } => released(
            shard,
            conn,
            Adopted {
                fd,
                buffered,
                sealing,
            },
        ),
    }
}

/// The driver refused a frame header (a bad length prefix, an unknown type)
/// after the frames it delivered. Frames still set aside (a backpressured
/// session, a handshake waiting on its account lookup) come first: the
/// header's bytes go behind them and the one decoder that reads frames
/// (`proto`) refuses them in their turn and names the code
/// (MALFORMED_FRAME for a length of 0, FRAME_TOO_LARGE past
/// `frame_bytes_max`, UNKNOWN_FRAME_TYPE).
fn bad_frame(shard: &Rc<Shard>, id: ConnId, header: FrameHeader) {
    let header = header.as_bytes();
    if let Some(conn) = shard.sockets.session(id) {
        if let Some(stalled) = shard.sockets.stalled.borrow_mut().get_mut(&conn.id()) {
            stalled.input.extend_from_slice(header);
            return;
        }
        let mut input = BytesMut::from(header);
        let code = match proto::split_frame(&mut input, shard.config.limits.frame_bytes_max) {
            Err(err) => err.code(),
            Ok(_) => ErrorCode::MalformedFrame,
        };
        return conn.fatal(code, "bad frame");
    }
    let handshaking = shard.sockets.with_handshake(id, |hs| hs.input(header));
    if handshaking.is_some() {
        return handshake_step(shard, id);
    }
    shard
        .sockets
        .with_opening(id, |o| o.input.extend_from_slice(header));
}

fn accepted(shard: &Rc<Shard>, id: ConnId, peer: IpAddr) {
    shard.metrics_accepted_socket();
    if !admit(shard, id) {
        return;
    }
    let limits = &shard.config.limits;
    shard.sockets.set(
        id,
        Slot::Handshake(Box::new(Handshake::new(peer, conn::connected_now()))),
    );
    let deadline = shard
        .sockets
        .now_ms()
        .wrapping_add(limits.handshake_timeout_ms);
    shard
        .sockets
        .deadlines
        .borrow_mut()
        .push_back((deadline, id));
}

/// Counts a new socket of the shard (its `Closed` or `Released` uncounts
/// it); past the per-shard limit it is told SERVER_BUSY and closed.
fn admit(shard: &Shard, id: ConnId) -> bool {
    let over = shard.open_connections.get() >= shard.config.limits.connections_per_shard_max;
    shard.open_connections.set(shard.open_connections.get() + 1);
    if over {
        refuse(
            shard,
            id,
            ErrorCode::ServerBusy,
            "connection limit reached",
            1_000,
        );
    }
    !over
}

/// Whether `id` is a Noise client mid-handshake: it has no key to open an
/// answer with, so it is closed without one.
fn in_noise_handshake(shard: &Shard, id: ConnId) -> bool {
    shard
        .sockets
        .with_handshake(id, |hs| !hs.is_plaintext() && !hs.is_sealed())
        .unwrap_or(false)
}

/// Answers a socket that is not in session with a fatal Error and closes it
/// (without an answer mid Noise handshake).
fn refuse(shard: &Shard, id: ConnId, code: ErrorCode, message: &str, retry_after_ms: u32) {
    shard.metrics_refused(code);
    let mut frame = error_frame(code, message, true);
    if let Frame::Error(e) = &mut frame {
        e.retry_after_ms = retry_after_ms;
    }
    let mid_noise = in_noise_handshake(shard, id);
    shard.sockets.set(id, Slot::Closing);
    if !mid_noise {
        shard.sockets.send_raw(id, frame.to_bytes());
    }
    shard.sockets.close(id);
}

fn data(shard: &Rc<Shard>, id: ConnId, frames: Bytes) {
    if let Some(conn) = shard.sockets.session(id) {
        session_input(shard, &conn, frames);
        return;
    }
    let plaintext_policy = shard.config.server.plaintext;
    let mut frames = Some(frames);
    let handshaking = shard.sockets.with_handshake(id, |hs| {
        if hs.is_plaintext() && !plaintext_policy.allows(hs.peer) {
            return false;
        }
        hs.input(&frames.take().expect("taken once"));
        true
    });
    match handshaking {
        Some(true) => return handshake_step(shard, id),
        Some(false) => {
            return refuse(
                shard,
                id,
                ErrorCode::PlaintextRefused,
                "this server takes only Noise clients from this address",
                0,
            )
        }
        None => {}
    }
    if let Some(frames) = frames {
        shard
            .sockets
            .with_opening(id, |o| o.input.extend_from_slice(&frames));
    }
    // Closing or releasing: the input is of no use any more.
}

/// Bytes of a Noise client's handshake: answered, and once the handshake is
/// done the driver seals the connection and later bytes come as frames.
/// Bytes read before the switch but handled after it are opened then.
fn raw(shard: &Rc<Shard>, id: ConnId, bytes: Bytes) {
    let Some(keys) = shard.sockets.noise_keys.clone() else {
        // The driver reports raw bytes only with Noise on.
        return;
    };
    let step = shard.sockets.with_handshake(id, |hs| {
        if hs.is_sealed() {
            None
        } else {
            Some(hs.noise_input(&bytes, &keys))
        }
    });
    let step = match step {
        // Closing, releasing or gone.
        None => return,
        Some(None) => {
            if let Err(err) = shard.sockets.driver.borrow_mut().sealed_input(id, &bytes) {
                ring_failed(err);
            }
            return;
        }
        Some(Some(step)) => step,
    };
    match step {
        Ok(NoiseStep::Wait) => {}
        Ok(NoiseStep::Reply(reply)) => shard.sockets.send_raw(id, Bytes::from(reply)),
        Ok(NoiseStep::Finished {
            reply,
            transport,
            pattern,
            unopened,
            ..
        }) => {
            shard.metrics_noise_handshake(pattern);
            if let Some(reply) = reply {
                shard.sockets.send_raw(id, Bytes::from(reply));
            }
            let sealing = Sealing::new(transport);
            let started = shard
                .sockets
                .driver
                .borrow_mut()
                .start_sealing(id, sealing, &unopened);
            if let Err(err) = started {
                ring_failed(err);
            }
        }
        Err(err) => {
            debug!(%id, %err, "noise handshake failed");
            shard.metrics_noise_failed();
            shard.sockets.set(id, Slot::Closing);
            shard.sockets.close(id);
        }
    }
}

/// Handles buffered handshake frames until one needs an account lookup,
/// the input runs out, or the connection is refused.
fn handshake_step(shard: &Rc<Shard>, id: ConnId) {
    let server = &shard.config.server;
    let rules = RegistrationRules {
        policy: server.registration,
        tokens: &server.registration_tokens,
    };
    let frame_bytes_max = shard.config.limits.frame_bytes_max;
    let Some(step) = shard
        .sockets
        .with_handshake(id, |hs| hs.step(rules, frame_bytes_max))
    else {
        return;
    };
    match step {
        Step::Wait => {}
        Step::Refuse((code, message, retry)) => refuse(shard, id, code, message, retry),
        Step::Done => {
            shard.sockets.set(id, Slot::Closing);
            shard.sockets.close(id);
        }
        Step::Register { version, noise_key } => {
            shard.sockets.pause(id);
            shard.spawn(
                ShardTask::Other,
                register(shard.clone(), id, version, noise_key),
            );
        }
        Step::Hello {
            peer,
            device,
            secret,
            noise_key,
        } => {
            shard.sockets.pause(id);
            check_hello(shard, id, peer, device, secret, noise_key);
        }
        Step::Link {
            peer,
            code,
            name,
            noise_key,
        } => {
            shard.sockets.pause(id);
            let origin = ConnRef {
                shard: shard.id,
                id: id.to_u64(),
            };
            to_address_home(
                shard,
                peer,
                Request::Link {
                    origin,
                    peer,
                    code,
                    name,
                    noise_key,
                },
            );
        }
    }
}

/// The outcome of a Link of handshake `id` (gone already: nothing to do).
pub fn link_outcome(shard: &Rc<Shard>, id: ConnId, outcome: LinkOutcome) {
    let taken = shard
        .sockets
        .with_handshake(id, |hs| (hs.take_link(), hs.is_sealed()));
    let Some((Some(version), sealed)) = taken else {
        // Closed (or timed out) meanwhile; a companion made exists unused.
        return;
    };
    match outcome {
        LinkOutcome::Linked {
            user,
            device,
            secret,
        } => {
            shard.metrics_linked();
            let frame = Frame::Registered(pb::Registered {
                protocol_version: version,
                user_id: user.0,
                device_id: device.0,
                // A Noise device logs in by its key: no secret is shown.
                secret: if sealed {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&secret)
                },
            });
            shard.sockets.send_raw(id, frame.to_bytes());
            lookup_done(shard, id);
        }
        LinkOutcome::Refused(code) => {
            let message = if code == ErrorCode::TooManyDevices {
                "the account has its maximum of companion devices"
            } else {
                "unknown, used or expired link code"
            };
            refuse(shard, id, code, message, 0);
        }
        LinkOutcome::RateLimited { retry_after_ms } => refuse(
            shard,
            id,
            ErrorCode::RateLimited,
            "too many failed attempts",
            retry_after_ms,
        ),
        LinkOutcome::Internal => refuse(shard, id, ErrorCode::Internal, "link failed", 0),
    }
}

/// Ends an account lookup: the handshake reads again and goes on.
fn lookup_done(shard: &Rc<Shard>, id: ConnId) {
    if shard
        .sockets
        .with_handshake(id, |hs| hs.lookup_done())
        .is_some()
    {
        shard.sockets.resume(id);
        handshake_step(shard, id);
    }
}

async fn register(shard: Rc<Shard>, id: ConnId, version: u32, noise_key: Option<[u8; 32]>) {
    let meta = shard.meta.clone();
    let created = shard.blocking(move || meta.register(noise_key)).await;
    if shard.sockets.with_handshake(id, |_| ()).is_none() {
        // Closed (or timed out) meanwhile; the account exists unused.
        return;
    }
    let account = match created {
        Ok(account) => account,
        Err(err) => {
            warn!(%err, "registration failed");
            return refuse(&shard, id, ErrorCode::Internal, "registration failed", 0);
        }
    };
    shard.metrics_registered();
    let frame = Frame::Registered(pb::Registered {
        protocol_version: version,
        user_id: account.user.0,
        device_id: account.device.0,
        // A Noise device logs in by its key: no secret is shown.
        secret: if noise_key.is_some() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&account.secret)
        },
    });
    shard.sockets.send_raw(id, frame.to_bytes());
    lookup_done(&shard, id);
}

/// Sends a Hello's credential to the home shard of the client's address,
/// which decides it (`Shard::check_hello`); the verdict comes back through
/// `hello_verdict`. Reading stays paused meanwhile.
fn check_hello(
    shard: &Rc<Shard>,
    id: ConnId,
    peer: IpAddr,
    device: InboxKey,
    secret: Bytes,
    noise_key: Option<[u8; 32]>,
) {
    let origin = ConnRef {
        shard: shard.id,
        id: id.to_u64(),
    };
    to_address_home(
        shard,
        peer,
        Request::Hello {
            origin,
            peer,
            device,
            secret,
            noise_key,
        },
    );
}

/// Sends a handshake's request (Hello, Link) to the home shard of the
/// client's address, or handles it here when that is this shard.
fn to_address_home(shard: &Rc<Shard>, peer: IpAddr, request: Request) {
    let target = address_home(peer, shard.shards);
    if target == shard.id {
        return shard.handle_request(request);
    }
    if let Some(wait) = shard.forward(Outbound::One(target, request)) {
        // That shard's channel is full: the handshake waits for room.
        shard.spawn(ShardTask::Other, wait);
    }
}

/// The verdict on a Hello of handshake `id` (gone already: nothing to do).
pub fn hello_verdict(shard: &Rc<Shard>, id: ConnId, verdict: HelloVerdict) {
    let Some(Some((device, version))) = shard.sockets.with_handshake(id, |hs| hs.take_hello())
    else {
        return;
    };
    match verdict {
        HelloVerdict::Accepted => authenticated(shard, id, device, version),
        HelloVerdict::Failed => {
            shard.metrics_auth_failed();
            refuse(
                shard,
                id,
                ErrorCode::AuthFailed,
                "unknown device or wrong secret",
                0,
            );
        }
        HelloVerdict::RateLimited { retry_after_ms } => refuse(
            shard,
            id,
            ErrorCode::RateLimited,
            "too many failed logins",
            retry_after_ms,
        ),
        HelloVerdict::Internal => refuse(
            shard,
            id,
            ErrorCode::Internal,
            "credential lookup failed",
            0,
        ),
    }
}

/// Starts the session here, or hands the socket to the device's home shard.
fn authenticated(shard: &Rc<Shard>, id: ConnId, device: InboxKey, version: u32) {
    let Slot::Handshake(hs) = shard.sockets.take(id) else {
        unreachable!("checked by the caller");
    };
    let (connected_at, input_closed) = (hs.connected_at, hs.is_input_closed());
    let input = hs.into_input();
    if shard.home_of(device.user) == shard.id {
        // Reading is paused (the lookup); it resumes when the session opens.
        let opening = Opening::new(device, version, connected_at, input);
        start_session(shard, id, opening, input_closed);
    } else {
        // A half-close travels with the socket: the home shard reads the
        // FIN again.
        shard.sockets.set(
            id,
            Slot::Releasing(Box::new(Releasing {
                device,
                version,
                connected_at,
                input,
            })),
        );
        if let Err(err) = shard.sockets.driver.borrow_mut().release(id) {
            ring_failed(err);
        }
    }
}

/// The driver gave up a socket authenticated for another shard: send it
/// there with every byte read and not handled.
fn released(shard: &Rc<Shard>, id: ConnId, socket: Adopted) {
    let Slot::Releasing(releasing) = shard.sockets.take(id) else {
        warn!(%id, "released socket had no handoff; closed");
        shard.connection_closed();
        return;
    };
    shard.connection_closed();
    let Releasing {
        device,
        version,
        connected_at,
        mut input,
    } = *releasing;
    input.extend_from_slice(&socket.buffered);
    shard.metrics_handoff_out();
    let request = Request::Handoff {
        fd: socket.fd,
        device,
        version,
        buffered: input.freeze(),
        connected_at,
        sealing: socket.sealing,
    };
    let outbound = Outbound::One(shard.home_of(device.user), request);
    if let Some(wait) = shard.forward(outbound) {
        shard.spawn(ShardTask::Other, wait);
    }
}

/// A socket given up by one shard's driver for another's to adopt.
pub struct Adopted {
    pub fd: OwnedFd,
    /// Plaintext read and not handled.
    pub buffered: Bytes,
    /// A Noise connection's transport.
    pub sealing: Option<Box<Sealing>>,
}

/// Takes over a socket handed off by another shard, with the bytes it read.
pub fn adopt(
    shard: &Rc<Shard>,
    socket: Adopted,
    device: InboxKey,
    version: u32,
    connected_at: u32,
) {
    let adopted =
        shard
            .sockets
            .driver
            .borrow_mut()
            .adopt(socket.fd, socket.buffered, socket.sealing);
    let id = match adopted {
        Ok(id) => id,
        // The table is full: the descriptor was closed by the failed adopt.
        Err(UringError::Full) => {
            warn!(shard = %shard.id, "handed-off socket not adopted: connection table full");
            return;
        }
        // The ring refused the socket's receive: the ring itself failed.
        Err(err) => ring_failed(err),
    };
    if !admit(shard, id) {
        return;
    }
    if shard.stopping.get() {
        go_away_raw(shard, id);
        return;
    }
    // The driver reports the bytes read before the handoff as `Data`.
    let opening = Opening::new(device, version, connected_at, BytesMut::new());
    start_session(shard, id, opening, false);
}

/// Opens the session of socket `id`, or defers it while an earlier session
/// of the device is live (see `Opening`); reading is paused meanwhile and
/// resumes when the session opens.
fn start_session(shard: &Rc<Shard>, id: ConnId, mut opening: Opening, input_closed: bool) {
    opening.input_closed = input_closed;
    let Some(earlier) = shard.live_session(opening.device) else {
        return open_now(shard, id, opening);
    };
    supersede(shard, opening.device, true);
    shard.sockets.pause(id);
    shard.sockets.set(id, Slot::Opening(Box::new(opening)));
    shard.sockets.opening.borrow_mut().push(id);
    shard.sockets.notifier.notify();
    settle(shard, &earlier);
}

/// Handles what a superseded session set aside and resumes its reading;
/// returns whether it had anything set aside (its reading was paused, so
/// more of its input may wait for another poll).
fn settle(shard: &Rc<Shard>, earlier: &Rc<Conn>) -> bool {
    if !shard.sockets.stalled.borrow().contains_key(&earlier.id()) {
        return false;
    }
    unstall(shard, earlier);
    true
}

/// A deferred session's turn: it opens unless the earlier session had
/// input set aside until now.
fn open_deferred(shard: &Rc<Shard>, id: ConnId) {
    let Some((device, turns)) = shard.sockets.with_opening(id, |o| {
        o.turns += 1;
        (o.device, o.turns)
    }) else {
        // Closed meanwhile.
        return;
    };
    if turns < OPENING_TURNS_MAX {
        if let Some(earlier) = shard.live_session(device) {
            // Set again: another connection of the device may have given up.
            supersede(shard, device, true);
            if settle(shard, &earlier) {
                shard.sockets.opening.borrow_mut().push(id);
                shard.sockets.notifier.notify();
                return;
            }
        }
    }
    let Slot::Opening(opening) = shard.sockets.take(id) else {
        unreachable!("checked above");
    };
    if shard.stopping.get() {
        supersede(shard, device, false);
        return go_away_raw(shard, id);
    }
    open_now(shard, id, *opening);
}

/// Marks the live session of `device` superseded or, when the connection
/// that superseded it went away before opening, no longer: its bounds
/// apply in full again.
fn supersede(shard: &Shard, device: InboxKey, superseded: bool) {
    if let Some(earlier) = shard.live_session(device) {
        earlier.state.borrow_mut().superseded = superseded;
    }
}

fn open_now(shard: &Rc<Shard>, id: ConnId, opening: Opening) {
    let Opening {
        device,
        version,
        connected_at,
        input,
        input_closed,
        turns: _,
    } = opening;
    let conn = shard.open_session(device, version, id, connected_at);
    shard.metrics_session_opened();
    shard.sockets.set_session(id, conn.clone());
    shard.sockets.resume(id);
    if !input.is_empty() {
        session_input(shard, &conn, input.freeze());
    }
    if input_closed {
        conn.state.borrow_mut().input_closed = true;
        finish_if_answered(shard, &conn);
    }
}

fn go_away_raw(shard: &Shard, id: ConnId) {
    let mid_noise = in_noise_handshake(shard, id);
    shard.sockets.set(id, Slot::Closing);
    let frame = Frame::GoAway(pb::GoAway {
        reason: GoAwayReason::ShuttingDown as i32,
        reconnect_after_ms: 1_000,
    });
    if !mid_noise {
        shard.sockets.send_raw(id, frame.to_bytes());
    }
    shard.sockets.close(id);
}

/// The peer half-closed: what it sent is handled and answered, then the
/// socket is closed.
fn input_closed(shard: &Rc<Shard>, id: ConnId) {
    if let Some(conn) = shard.sockets.session(id) {
        conn.state.borrow_mut().input_closed = true;
        finish_if_answered(shard, &conn);
        return;
    }
    let handshaking = shard.sockets.with_handshake(id, |hs| hs.input_closed());
    if handshaking.is_some() {
        return handshake_step(shard, id);
    }
    shard.sockets.with_opening(id, |o| o.input_closed = true);
}

/// Ends a half-closed session once its frames are handled and its Sends
/// answered (their ServerAcks are queued before the close).
fn finish_if_answered(shard: &Shard, conn: &Conn) {
    // Runs on every flush: the common case (input still open) costs one
    // flag test, not a lookup in the stalled table.
    {
        let state = conn.state.borrow();
        if !state.input_closed || state.close.is_some() {
            return;
        }
    }
    if shard.sends_in_flight(conn) > 0 || shard.sockets.stalled.borrow().contains_key(&conn.id()) {
        return;
    }
    conn.state.borrow_mut().close = Some(crate::net::conn::CloseReason::InputClosed);
    conn.wake();
}

/// Frames of a session arrived.
fn session_input(shard: &Rc<Shard>, conn: &Rc<Conn>, frames: Bytes) {
    if let Some(stalled) = shard.sockets.stalled.borrow_mut().get_mut(&conn.id()) {
        stalled.input.extend_from_slice(&frames);
        return;
    }
    let mut input = BytesMut::from(frames);
    handle_frames(shard, conn, &mut input);
}

/// Handles the frames in `input` in order until it is empty, the session
/// closes, or backpressure sets the rest aside.
fn handle_frames(shard: &Rc<Shard>, conn: &Rc<Conn>, input: &mut BytesMut) {
    let frame_bytes_max = shard.config.limits.frame_bytes_max;
    loop {
        if conn.is_closing() || input.is_empty() {
            return;
        }
        if backpressured(shard, conn) {
            return stall(shard, conn, input, false);
        }
        let (frame_type, body) = match proto::split_frame(input, frame_bytes_max) {
            Ok(Some(split)) => split,
            // The driver hands over complete frames only.
            Ok(None) => return,
            Err(err) => return conn.fatal(err.code(), "bad frame"),
        };
        shard.metrics_frame_in(frame_type);
        if !client_may_send_in_session(frame_type) {
            return conn.fatal(ErrorCode::UnexpectedFrame, "frame not allowed in a session");
        }
        let frame = match Frame::decode(frame_type, body) {
            Ok(frame) => frame,
            Err(err) => return conn.fatal(err.code(), "malformed frame"),
        };
        let outbound = shard.on_frame(conn, frame);
        if let Some(wait) = shard.forward(outbound) {
            stall(shard, conn, input, true);
            let shard = shard.clone();
            let conn = conn.clone();
            shard.clone().spawn(ShardTask::Other, async move {
                wait.await;
                if let Some(stalled) = shard.sockets.stalled.borrow_mut().get_mut(&conn.id()) {
                    stalled.waiting = false;
                }
                conn.wake();
            });
            return;
        }
    }
}

fn backpressured(shard: &Shard, conn: &Conn) -> bool {
    let limits = &shard.config.limits;
    let state = conn.state.borrow();
    if state.superseded {
        // Its input counts before the device's next session opens (see
        // `Opening`); its output is of little use by now. Handled frames
        // add output (Pong, ServerAck) but no deliveries past the bound, so
        // twice the bound caps what the last turns may queue.
        return state.out_len() >= 2 * limits.output_queue_bytes_max as usize;
    }
    state.socket_full
        || state.out_len() >= limits.output_queue_bytes_max as usize
        || shard.sends_in_flight(conn) >= limits.sends_in_flight_max
}

/// Sets the rest of `input` aside and stops reading the peer.
fn stall(shard: &Shard, conn: &Conn, input: &mut BytesMut, waiting: bool) {
    let input = std::mem::take(input);
    shard
        .sockets
        .stalled
        .borrow_mut()
        .insert(conn.id(), Stalled { input, waiting });
    shard.sockets.pause(conn.socket);
}

/// Resumes a stalled session whose backpressure cleared.
fn unstall(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    {
        let stalled = shard.sockets.stalled.borrow();
        match stalled.get(&conn.id()) {
            Some(s) if !s.waiting => {}
            _ => return,
        }
    }
    if backpressured(shard, conn) || conn.is_closing() {
        return;
    }
    let Some(mut stalled) = shard.sockets.stalled.borrow_mut().remove(&conn.id()) else {
        return;
    };
    handle_frames(shard, conn, &mut stalled.input);
    if !conn.is_closing() && !shard.sockets.stalled.borrow().contains_key(&conn.id()) {
        shard.sockets.resume(conn.socket);
    }
}

/// One woken connection: its output goes to the driver, its set-aside
/// input resumes if it can, and a close that was asked for begins.
fn flush(shard: &Rc<Shard>, socket: ConnId) {
    let Some(conn) = shard.sockets.session(socket) else {
        return;
    };
    conn.clear_woken();
    write_out(shard, &conn);
    let drained = {
        let state = conn.state.borrow();
        !state.socket_full && state.out_len() < shard.config.limits.output_queue_bytes_max as usize
    };
    if drained {
        // The engine pumps again if it stopped at the output bound; the
        // connection is woken again if it wrote, and the next turn sends it.
        shard.output_drained(&conn);
    }
    unstall(shard, &conn);
    finish_if_answered(shard, &conn);
    // A peer that stopped reading cannot hold a closing session: once the
    // socket refuses output, the close begins with what the driver holds
    // (it flushes within the linger deadline).
    let closing = {
        let state = conn.state.borrow();
        state.close.is_some() && (state.out_len() == 0 || state.socket_full)
    };
    if closing {
        shard.sockets.set(socket, Slot::Closing);
        end_session(shard, &conn);
        shard.sockets.close(socket);
    }
}

/// Moves the connection's queued frames to the driver in one piece.
fn write_out(shard: &Shard, conn: &Conn) {
    let mut state = conn.state.borrow_mut();
    let Some(active) = state.active_if_any() else {
        return;
    };
    if active.out.is_empty() {
        return;
    }
    let bytes = std::mem::take(&mut active.out).freeze();
    let sent = shard.sockets.driver.borrow_mut().send(conn.socket, bytes);
    match sent {
        Ok(()) => state.socket_full = false,
        Err(SendError {
            kind: SendErrorKind::Backpressure,
            bytes,
        }) => {
            // Keep it (no copy: the handle is unique) until `Writable`.
            let mut held = BytesMut::from(bytes);
            let active = state.active();
            held.unsplit(std::mem::take(&mut active.out));
            active.out = held;
            state.socket_full = true;
        }
        // The socket is gone; its `Closed` event ends the session.
        Err(SendError {
            kind: SendErrorKind::Closed,
            ..
        }) => {}
    }
    state.release_if_idle();
}

/// Forgets a session (its socket is closing or closed).
fn end_session(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    shard.sockets.sessions.set(shard.sockets.sessions.get() - 1);
    shard.sockets.stalled.borrow_mut().remove(&conn.id());
    shard.close_session(conn);
    shard.metrics_session_closed();
}

/// Refuses handshakes that ran past the handshake timeout, at most `max`
/// of them; returns true if more are due (the caller yields, then calls
/// again). Called by the shard's maintenance timer.
pub fn expire_handshakes(shard: &Rc<Shard>, max: usize) -> bool {
    let now = shard.sockets.now_ms();
    for _ in 0..max {
        let expired = {
            let mut deadlines = shard.sockets.deadlines.borrow_mut();
            match deadlines.front() {
                // Wrapping: `deadline` is at most a timeout from `now`.
                Some(&(deadline, id)) if now.wrapping_sub(deadline) < u32::MAX / 2 => {
                    deadlines.pop_front();
                    id
                }
                _ => {
                    // A connect storm's queue is not kept once it drains.
                    if deadlines.len() < deadlines.capacity() / 4 {
                        let keep = deadlines.len() * 2;
                        deadlines.shrink_to(keep);
                    }
                    return false;
                }
            }
        };
        if shard.sockets.with_handshake(expired, |_| ()).is_some() {
            refuse(
                shard,
                expired,
                ErrorCode::HandshakeTimeout,
                "handshake took too long",
                0,
            );
        }
    }
    true
}

/// Graceful stop, first step: no new sockets; handshakes in progress are
/// told GoAway(SHUTTING_DOWN) and closed.
pub fn stop_accepting(shard: &Shard) {
    if let Err(err) = shard.sockets.driver.borrow_mut().stop_accepting() {
        ring_failed(err);
    }
    let handshakes: Vec<ConnId> = shard
        .sockets
        .slots
        .borrow()
        .iter()
        .filter_map(|(id, slot)| match slot {
            Slot::Handshake(_) => Some(*id),
            _ => None,
        })
        .collect();
    for id in handshakes {
        go_away_raw(shard, id);
    }
}

/// Graceful stop, last step: closes whatever is left; `run` returns once
/// the ring has nothing in flight.
pub fn shutdown(shard: &Shard) {
    shard.sockets.finished.set(true);
    if let Err(err) = shard.sockets.driver.borrow_mut().shutdown() {
        ring_failed(err);
    }
    shard.sockets.notifier.notify();
}

/// Closes every session with GoAway(SHUTTING_DOWN).
pub fn go_away_all(shard: &Shard) {
    shard.sockets.for_each_session(|conn| {
        conn.close_with(
            &Frame::GoAway(pb::GoAway {
                reason: proto::GoAwayReason::ShuttingDown as i32,
                reconnect_after_ms: 1_000,
            }),
            conn::CloseReason::Shutdown,
        );
    });
}

/// Closes sessions silent for longer than the idle timeout, looking at
/// `count` socket slots from `start`; returns where to go on (`None`: the
/// pass is done), so the caller can yield between slices.
pub fn sweep_idle(shard: &Shard, start: usize, count: usize) -> Option<usize> {
    let now = shard.now_s();
    let idle_s = shard.config.limits.idle_timeout_ms.div_ceil(1000);
    shard.sockets.for_each_session_in(start, count, |conn| {
        let last = conn.last_activity_s.get();
        if now.saturating_sub(last) >= idle_s && !conn.is_closing() {
            debug!(device = %conn.device, "idle timeout");
            conn.fatal(ErrorCode::IdleTimeout, "no frame within the idle timeout");
        }
    })
}
