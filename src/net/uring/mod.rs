//! The native socket layer: one io_uring ring per shard that accepts,
//! receives and sends for every connection of the shard, with no task and no
//! buffer per idle connection.
//!
//! Runs on one shard's thread (`Driver` is `!Send`; the ring is set up for a
//! single issuer). The connection logic stays sans-IO: it calls
//! [`Driver::poll_events`] once per loop turn, handles the [`Event`]s, and
//! queues frames with [`Driver::send`]. See `docs/uring.md`.
//!
//! - Accept: multishot accept on each listener, re-armed when it ends.
//! - Receive: multishot recv into the shard's provided-buffer ring. A
//!   completion's buffer is returned to the kernel before `poll_events`
//!   returns; complete frames are copied out as [`Event::Data`] and only the
//!   incomplete tail of a frame stays, in a per-connection buffer counted
//!   against `tail_bytes_max`. An idle connection holds no buffer.
//! - Send: frames queue per connection; at most one sendmsg per connection is
//!   in flight, carrying up to `IOVECS_PER_SEND` frames and
//!   `send_bytes_per_op_max` bytes. Queued bytes are bounded
//!   (`send_queue_bytes_max`); past the bound `send` hands the frame back and
//!   [`Event::Writable`] follows when the queue drains to half.
//! - A connection's record lives in a generation slab indexed by the ring's
//!   user data; it is freed only when no operation of it is in flight.
//!
//! Invariants: a record with `ops > 0` is never removed; a provided buffer is
//! recycled by the completion that delivered it; all `unsafe` is in `sys`.

mod slab;
mod sys;

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::{info, warn};

use crate::noise::Transport;

pub use slab::ConnId;
pub use sys::{SetupMode, IOVECS_PER_SEND};

use slab::Slab;
use sys::{Completion, Delay, Kind, Ring, RingSetup, Token};

/// Bytes of a frame's length prefix (big-endian u32 counting what follows).
const LENGTH_PREFIX_BYTES: usize = crate::proto::LENGTH_PREFIX_BYTES;

/// Bounds and sizes of one driver. Every field is a hard bound.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The most capable ring setup to try; weaker ones are the fallbacks.
    /// `DeferTaskrun` in `production()` (the doctor's capability probe); the
    /// server takes it from `server.socket_ring_setup` (docs/uring.md);
    /// tests force the fallbacks.
    pub ring_mode_max: SetupMode,
    /// Submission queue entries; the completion queue gets four times as
    /// many. Memory: 64 B per SQE, 16 B per CQE.
    pub sq_entries: u32,
    /// Provided buffers shared by all connections of the shard (a power of
    /// two, at most 32768). More buffers let more connections receive at
    /// once before a recv meets ENOBUFS and is re-armed.
    pub buffer_count: u16,
    /// Bytes of one provided buffer: the most one recv completion carries.
    pub buffer_bytes: u32,
    /// The buffer group id of this shard's provided buffers.
    pub buffer_group: u16,
    /// The largest frame (its length prefix value); a longer prefix is
    /// reported as [`Event::BadFrame`].
    pub frame_bytes_max: u32,
    /// Which type bytes (the byte after the length prefix) the protocol
    /// knows; `None` takes any. A frame of another type is reported as
    /// [`Event::BadFrame`] as soon as its fifth byte is in, before its body.
    pub frame_type_known: Option<fn(u8) -> bool>,
    /// Bytes queued per connection and not yet sent, past which `send`
    /// refuses (a single frame is always accepted into an empty queue).
    pub send_queue_bytes_max: u32,
    /// Bytes one sendmsg carries at most (in-flight bytes per connection).
    pub send_bytes_per_op_max: u32,
    /// Sends in flight per shard (each slot is ~330 B, kept for reuse).
    pub send_slots_max: u32,
    /// Bytes of incomplete frames held by all connections of the shard; a
    /// connection that would go past it is closed (`Overloaded`).
    pub tail_bytes_max: usize,
    /// Connections the driver holds; accepts past it are closed at once.
    pub connections_max: u32,
    /// Completions handled per `poll_events` call before it returns.
    pub completions_per_turn_max: u32,
    /// Wait before re-arming an accept that failed for lack of resources.
    pub accept_retry: Duration,
    /// How long `close(Flush)` may take: sending what is queued, then
    /// waiting half-closed for the peer's FIN. Then the socket is closed.
    pub linger: Duration,
    /// What the peer's FIN does to an open connection: `false` closes it
    /// (`Closed { PeerClosed }`); `true` reports [`Event::InputClosed`] and
    /// keeps the socket open for output until `close` (a half-close: the
    /// peer may still read the answers to what it sent).
    pub half_close: bool,
    /// Tell Noise clients from plaintext ones by the first byte read: a
    /// connection that opens with `'S'` (the Noise intro `"SBN1"`; a
    /// plaintext frame's first byte is the top byte of its length, always 0)
    /// is reported as [`Event::Raw`] until [`Driver::start_sealing`].
    /// `false`: every connection is plaintext.
    pub noise: bool,
}

impl DriverConfig {
    /// Sizes for one production shard. Fixed memory: 4 MiB of provided
    /// buffers (populated at start), 256 KiB of SQ and 256 KiB of CQ.
    pub fn production() -> DriverConfig {
        DriverConfig {
            ring_mode_max: SetupMode::DeferTaskrun,
            sq_entries: 4096,
            buffer_count: 1024,
            buffer_bytes: 4096,
            buffer_group: 0,
            frame_bytes_max: 65_536 + 1_024,
            frame_type_known: None,
            send_queue_bytes_max: 256 * 1024,
            send_bytes_per_op_max: 64 * 1024,
            send_slots_max: 4096,
            tail_bytes_max: 64 * 1024 * 1024,
            connections_max: 1_000_000,
            completions_per_turn_max: 4096,
            accept_retry: Duration::from_millis(50),
            linger: Duration::from_millis(200),
            half_close: false,
            noise: false,
        }
    }

    /// Tiny sizes so tests reach exhaustion and backpressure cheaply.
    pub fn for_tests() -> DriverConfig {
        DriverConfig {
            ring_mode_max: SetupMode::DeferTaskrun,
            sq_entries: 256,
            buffer_count: 8,
            buffer_bytes: 512,
            buffer_group: 0,
            frame_bytes_max: 4_096 + 512,
            frame_type_known: None,
            send_queue_bytes_max: 16 * 1024,
            send_bytes_per_op_max: 8 * 1024,
            send_slots_max: 64,
            tail_bytes_max: 1024 * 1024,
            connections_max: 20_000,
            completions_per_turn_max: 256,
            accept_retry: Duration::from_millis(20),
            linger: Duration::from_millis(100),
            half_close: false,
            noise: false,
        }
    }

    pub fn validate(&self) -> Result<(), UringError> {
        let bad = |what: &'static str| Err(UringError::Config(what));
        if !self.buffer_count.is_power_of_two() || self.buffer_count > 32_768 {
            return bad("buffer_count must be a power of two up to 32768");
        }
        if self.buffer_bytes == 0 || self.send_bytes_per_op_max == 0 || self.send_slots_max == 0 {
            return bad("buffer, send and slot sizes must be positive");
        }
        if (self.send_queue_bytes_max as u64) < self.frame_bytes_max as u64 + 4 {
            return bad("send_queue_bytes_max must hold the largest frame");
        }
        if self.tail_bytes_max < self.frame_bytes_max as usize + LENGTH_PREFIX_BYTES {
            return bad("tail_bytes_max must hold the largest frame");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("socket ring: {0}")]
    Io(#[from] io::Error),
    #[error("bad driver config: {0}")]
    Config(&'static str),
    #[error("connection table full")]
    Full,
}

/// Why a connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side (recv returned 0).
    PeerClosed,
    /// A socket error (errno), e.g. ECONNRESET.
    Error(i32),
    /// `close` was called.
    Local,
    /// Holding its incomplete frame would pass `tail_bytes_max`.
    Overloaded,
    /// The driver is shutting down.
    Shutdown,
    /// A Noise transport message failed to open (altered, replayed, cut
    /// short or from another session), or a nonce ran out. Noise has no
    /// resynchronisation: the connection ends without an answer.
    BadCiphertext,
}

/// How `close` ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseMode {
    /// Cancel everything and close; queued frames are dropped.
    Now,
    /// Stop delivering input, send what is queued, half-close, wait
    /// (`linger`) for the peer's FIN while discarding its input, close. The
    /// peer reads the last frame instead of a reset.
    Flush,
}

/// The first bytes of a refused frame: its length prefix and, when the
/// type byte is why it was refused, that byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    bytes: [u8; crate::proto::HEADER_BYTES],
    len: u8,
}

impl FrameHeader {
    fn new(bytes: &[u8]) -> FrameHeader {
        let len = bytes.len().min(crate::proto::HEADER_BYTES);
        let mut header = FrameHeader {
            bytes: [0; crate::proto::HEADER_BYTES],
            len: len as u8,
        };
        header.bytes[..len].copy_from_slice(&bytes[..len]);
        header
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The length prefix's value.
    pub fn length(&self) -> u32 {
        u32::from_be_bytes([self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]])
    }
}

/// Why `send` refused a frame; the frame comes back.
#[derive(Debug)]
pub struct SendError {
    pub kind: SendErrorKind,
    pub bytes: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendErrorKind {
    /// The queue is at its bound; [`Event::Writable`] follows when it drains.
    Backpressure,
    /// The connection is closing or gone.
    Closed,
}

/// What `poll_events` reports.
#[derive(Debug)]
pub enum Event {
    /// A new connection on a listener; reading has started.
    Accepted { conn: ConnId, peer: SocketAddr },
    /// Bytes as read, not framed: a Noise client's handshake (the
    /// connection's first byte was the intro's, with `noise` on). Every
    /// byte read is reported this way until [`Driver::start_sealing`].
    Raw { conn: ConnId, bytes: Bytes },
    /// One or more complete frames, back to back, each with its length
    /// prefix (`proto::split_frame` takes them apart). Frames of one
    /// connection arrive in order.
    Data { conn: ConnId, frames: Bytes },
    /// A frame header the driver refuses: a length prefix of 0 or past
    /// `frame_bytes_max`, or a type byte `frame_type_known` does not know.
    /// `header` holds the bytes of that header that had arrived (the prefix,
    /// and the type byte when it is the reason). Reading stopped; the frames
    /// before it were delivered. The logic answers and closes.
    BadFrame { conn: ConnId, header: FrameHeader },
    /// The send queue, refused before, drained to half its bound.
    Writable { conn: ConnId },
    /// With `half_close`: the peer sent its FIN after the frames already
    /// reported. Nothing more is read; the socket takes output until
    /// `close`.
    InputClosed { conn: ConnId },
    /// The socket is closed and `conn` is gone.
    Closed { conn: ConnId, reason: CloseReason },
    /// `release` finished: the socket, no longer touched by this ring, and
    /// the bytes read but not delivered (an incomplete frame and anything
    /// that arrived after the release began).
    /// A sealed connection's transport state and unopened input travel in
    /// `sealing`, to be given to [`Driver::adopt`].
    Released {
        conn: ConnId,
        fd: OwnedFd,
        buffered: Bytes,
        sealing: Option<Box<Sealing>>,
    },
    /// The fdatasync `Driver::fdatasync` numbered `number` finished.
    Synced { number: u32, result: io::Result<()> },
}

/// A Noise connection's transport: the cipher states of both directions
/// and the bytes of a transport message not yet complete. Boxed beside the
/// record only for Noise connections (about 112 bytes idle; the input
/// buffer holds nothing between messages).
pub struct Sealing {
    transport: Transport,
    /// Ciphertext of an incomplete transport message (counted in
    /// `tail_bytes`).
    input: BytesMut,
}

impl Sealing {
    /// A connection's transport state, right after its handshake.
    pub fn new(transport: Transport) -> Box<Sealing> {
        Box::new(Sealing {
            transport,
            input: BytesMut::new(),
        })
    }
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealing")
            .field("transport", &self.transport)
            .field("input_bytes", &self.input.len())
            .finish()
    }
}

/// How a connection's input is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing read yet, `noise` on: the first byte decides.
    Sniff,
    /// Plaintext frames.
    Plain,
    /// A Noise handshake: bytes reported as read ([`Event::Raw`]).
    Raw,
    /// Noise transport messages, opened then framed (`sealing` is set).
    Sealed,
}

/// Counters of one driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct DriverStats {
    /// io_uring_enter calls on the socket ring.
    pub enters: u64,
    /// Completions reaped.
    pub completions: u64,
    /// Recvs that met an empty buffer ring and were re-armed.
    pub no_buffers: u64,
    /// Wake-ups through the eventfd.
    pub eventfd_wakeups: u64,
    /// Completions whose connection was gone (expected: 0).
    pub stale_completions: u64,
    /// fdatasyncs completed through the ring (`Driver::fdatasync`).
    pub syncs: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Accepted sockets closed at once (table full or shutting down).
    pub refused: u64,
    /// Accepts that failed for lack of resources (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM) and were re-armed after `accept_retry`.
    pub accept_retries: u64,
    /// Bytes of incomplete frames held now.
    pub tail_bytes: usize,
    /// Provided buffers in the kernel's hands (all of them when idle).
    pub buffers_in_kernel: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Sending what is queued, then half-close.
    Flushing,
    /// Half-closed; waiting for the peer's FIN or the linger timeout.
    Lingering,
    /// Cancels issued; closes when no operation is in flight.
    Closing,
    /// Handing the socket over when no operation is in flight.
    Releasing,
}

/// One connection. Idle: this record and nothing else (`queue` and `tail`
/// hold no allocation).
struct Conn {
    fd: OwnedFd,
    state: State,
    reason: CloseReason,
    recv_armed: bool,
    linger_armed: bool,
    paused: bool,
    bad_frame: bool,
    /// The peer's FIN arrived (`half_close`); no recv is armed again.
    input_closed: bool,
    dirty: bool,
    backpressured: bool,
    mode: Mode,
    /// Operations in flight that name this record.
    ops: u16,
    /// Bytes of the sendmsg in flight (0: none).
    sending: u32,
    /// Bytes of the front frame already sent.
    sent_offset: u32,
    /// Bytes queued and not yet sent.
    queued_bytes: u32,
    queue: SendQueue,
    /// The incomplete frame at the end of what was read (boxed: a pointer
    /// in the record, which most connections leave empty).
    tail: Option<Box<BytesMut>>,
    /// The Noise transport, in `Mode::Sealed`.
    sealing: Option<Box<Sealing>>,
}

/// Frames queued on one connection. Boxed and allocated only while frames
/// wait, so an idle record holds one null pointer instead of a deque.
#[derive(Default)]
// The box is the point: one word in every record instead of the deque's
// four, paid with a second allocation only while frames wait.
#[allow(clippy::box_collection)]
struct SendQueue(Option<Box<VecDeque<Bytes>>>);

impl SendQueue {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    fn push_back(&mut self, bytes: Bytes) {
        self.0.get_or_insert_with(Default::default).push_back(bytes);
    }

    fn front(&self) -> Option<&Bytes> {
        self.0.as_ref()?.front()
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.0.as_mut()?.pop_front()
    }

    /// The frames, for a send (non-empty).
    fn frames(&self) -> &VecDeque<Bytes> {
        self.0.as_ref().expect("a send carries queued frames")
    }

    /// Frees the deque once it is empty, or drops every frame.
    fn release(&mut self) {
        self.0 = None;
    }
}

struct Listener {
    fd: OwnedFd,
    armed: bool,
}

struct Shared {
    ready: Cell<bool>,
    /// The kernel held deferred work for the ring at the end of the last
    /// turn (`IORING_SQ_TASKRUN`): a loop that parks on the eventfd must
    /// turn again first, and a wait in the ring runs that work itself.
    kernel_work: Cell<bool>,
    waker: Cell<Option<Waker>>,
    stopped: Cell<bool>,
    eventfd_wakeups: Cell<u64>,
}

impl Shared {
    fn signal(&self) {
        self.ready.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Wakes the shard's loop when the driver has work: completions (through
/// the ring's eventfd) or frames queued by `send`.
#[derive(Clone)]
pub struct Notifier(Rc<Shared>);

impl Notifier {
    /// Makes the next `wait` complete at once: work for the driver's loop
    /// arrived from elsewhere (a frame queued for a connection).
    pub fn notify(&self) {
        self.0.signal();
    }

    /// Whether work was signalled since the last look (and clears it),
    /// for a loop about to wait in the ring. Deferred kernel work does not
    /// count: the wait runs it first and returns at once if it posts
    /// completions. The kernel's flag for it can also stay set after the
    /// work it announced has run (it is cleared before the deferred list is
    /// taken, so an item queued in between sets it again and then runs in
    /// the same pass), and a loop that turned on it would spin on empty
    /// enters until the next arrival.
    pub fn take(&self) -> bool {
        self.0.kernel_work.set(false);
        self.0.ready.replace(false)
    }

    /// Completes when `poll_events` has something to do. Cancel safe: it
    /// only reads a flag.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::poll_fn(move |cx| {
            if self.0.ready.replace(false) | self.0.kernel_work.replace(false) {
                Poll::Ready(())
            } else {
                self.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// The per-shard socket driver. See the module doc.
pub struct Driver {
    // Field order matters: the ring drains and closes before the records
    // (and their descriptors) are dropped.
    ring: Ring,
    conns: Slab<Conn>,
    listeners: Vec<Listener>,
    config: DriverConfig,
    shared: Rc<Shared>,
    wake_fd: OwnedFd,
    dirty: Vec<ConnId>,
    /// Events produced outside `poll_events` (by `adopt`).
    pending: Vec<Event>,
    completions: Vec<Completion>,
    tail_bytes: usize,
    shutting_down: bool,
    /// `stop_accepting` was called: listeners are cancelled, sockets they
    /// still produce are closed at once.
    accept_stopped: bool,
    stale_completions: u64,
    syncs: u64,
    accepted: u64,
    refused: u64,
    accept_retries: u64,
}

impl Driver {
    /// Creates the ring and its eventfd reader task. Must run inside the
    /// shard's glommio executor, on the thread that will drive it.
    pub fn new(config: DriverConfig) -> Result<Driver, UringError> {
        config.validate()?;
        let ring = Ring::new(RingSetup {
            mode_max: config.ring_mode_max,
            sq_entries: config.sq_entries,
            buffer_count: config.buffer_count,
            buffer_bytes: config.buffer_bytes,
            buffer_group: config.buffer_group,
            send_slots_max: config.send_slots_max,
            accept_retry: config.accept_retry,
            linger: config.linger,
        })?;
        info!(mode = ?ring.mode(), "socket ring ready");
        let eventfd = sys::eventfd()?;
        ring.register_eventfd(eventfd.as_raw_fd())?;
        let wake_fd = eventfd.try_clone()?;
        let shared = Rc::new(Shared {
            ready: Cell::new(false),
            kernel_work: Cell::new(false),
            waker: Cell::new(None),
            stopped: Cell::new(false),
            eventfd_wakeups: Cell::new(0),
        });
        let file = sys::glommio_file(eventfd);
        let task_shared = shared.clone();
        // One read at a time on the eventfd, never cancelled: a dropped read
        // could swallow a wake-up. Each completion means the kernel has
        // completions or deferred work for the ring.
        glommio::spawn_local(async move {
            loop {
                if let Err(err) = file.read_at(0, 8).await {
                    warn!(%err, "socket ring eventfd read failed");
                    break;
                }
                if task_shared.stopped.get() {
                    break;
                }
                task_shared
                    .eventfd_wakeups
                    .set(task_shared.eventfd_wakeups.get() + 1);
                task_shared.signal();
            }
            let _ = file.close().await;
        })
        .detach();
        Ok(Driver {
            ring,
            conns: Slab::new(),
            listeners: Vec::new(),
            config,
            shared,
            wake_fd,
            dirty: Vec::new(),
            pending: Vec::new(),
            completions: Vec::new(),
            tail_bytes: 0,
            shutting_down: false,
            accept_stopped: false,
            stale_completions: 0,
            syncs: 0,
            accepted: 0,
            refused: 0,
            accept_retries: 0,
        })
    }

    pub fn notifier(&self) -> Notifier {
        Notifier(self.shared.clone())
    }

    pub fn setup_mode(&self) -> SetupMode {
        self.ring.mode()
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    pub fn stats(&self) -> DriverStats {
        let ring = self.ring.counters();
        DriverStats {
            enters: ring.enters,
            completions: ring.completions,
            no_buffers: ring.no_buffers,
            eventfd_wakeups: self.shared.eventfd_wakeups.get(),
            stale_completions: self.stale_completions,
            syncs: self.syncs,
            accepted: self.accepted,
            refused: self.refused,
            accept_retries: self.accept_retries,
            tail_bytes: self.tail_bytes,
            buffers_in_kernel: self.ring.buffers_available(),
        }
    }

    /// Bytes of one connection record, for memory accounting.
    pub fn record_bytes() -> usize {
        std::mem::size_of::<Conn>()
    }

    /// Accepts on `listener` (bound, listening; SO_REUSEPORT for one per
    /// shard). Set TCP_NODELAY on the listener: accepted sockets inherit it.
    pub fn listen(&mut self, listener: OwnedFd) -> Result<(), UringError> {
        let index = self.listeners.len() as u32;
        self.ring
            .accept_multishot(listener.as_raw_fd(), listener_token(Kind::Accept, index))?;
        self.listeners.push(Listener {
            fd: listener,
            armed: true,
        });
        self.shared.signal();
        Ok(())
    }

    /// Takes over a connected socket (a handoff from another shard) and the
    /// bytes already read from it; they are framed as if just received. A
    /// Noise connection comes with its `sealing` (from [`Event::Released`]):
    /// `buffered` is plaintext, the sealing's unopened input follows it.
    pub fn adopt(
        &mut self,
        fd: OwnedFd,
        buffered: Bytes,
        mut sealing: Option<Box<Sealing>>,
    ) -> Result<ConnId, UringError> {
        if self.conns.len() >= self.config.connections_max as usize {
            return Err(UringError::Full);
        }
        let unopened = sealing
            .as_mut()
            .map(|s| std::mem::take(&mut s.input))
            .unwrap_or_default();
        let mode = if sealing.is_some() {
            Mode::Sealed
        } else {
            Mode::Plain
        };
        let conn = self.conns.insert(new_conn(fd, mode));
        let record = self.conns.get_mut(conn).expect("just inserted");
        record.sealing = sealing;
        let mut result = Ok(());
        if !buffered.is_empty() {
            result = frame_input(
                record,
                conn,
                &buffered,
                &self.config,
                &mut self.tail_bytes,
                &mut self.pending,
            );
        }
        if result.is_ok() && !unopened.is_empty() {
            result = open_input(
                record,
                conn,
                &unopened,
                &self.config,
                &mut self.tail_bytes,
                &mut self.pending,
            );
        }
        if let Err(stop) = result {
            self.stop_input(conn, stop)?;
        }
        self.arm_recv(conn)?;
        self.shared.signal();
        Ok(conn)
    }

    /// Ends `conn`'s Noise handshake: from now on its input is opened with
    /// `sealing` and framed, and everything [`Driver::send`] queues is
    /// sealed. `unopened` is what the handshake read past its last message
    /// (and any [`Event::Raw`] still to be handled for it, through
    /// [`Driver::sealed_input`]); its frames come as [`Event::Data`].
    /// Ignored unless `conn` is open and in its handshake.
    pub fn start_sealing(
        &mut self,
        conn: ConnId,
        sealing: Box<Sealing>,
        unopened: &[u8],
    ) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if record.state != State::Open || record.mode != Mode::Raw {
            return Ok(());
        }
        record.mode = Mode::Sealed;
        record.sealing = Some(sealing);
        self.sealed_input(conn, unopened)
    }

    /// Opens and frames `bytes` of a sealed connection as if just read: for
    /// an [`Event::Raw`] that was reported before [`Driver::start_sealing`]
    /// and handled after it. Frames come as [`Event::Data`], in order after
    /// those of earlier input.
    pub fn sealed_input(&mut self, conn: ConnId, bytes: &[u8]) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if bytes.is_empty() || record.mode != Mode::Sealed {
            return Ok(());
        }
        let readable = record.state == State::Open && !record.bad_frame;
        if !readable {
            return Ok(());
        }
        let result = open_input(
            record,
            conn,
            bytes,
            &self.config,
            &mut self.tail_bytes,
            &mut self.pending,
        );
        if let Err(stop) = result {
            self.stop_input(conn, stop)?;
        }
        self.shared.signal();
        Ok(())
    }

    /// Queues a frame. Refuses (handing it back) when the queue is at its
    /// bound or the connection is closing. Sent on the next `poll_events`.
    pub fn send(&mut self, conn: ConnId, bytes: Bytes) -> Result<(), SendError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Err(SendError {
                kind: SendErrorKind::Closed,
                bytes,
            });
        };
        if record.state != State::Open {
            return Err(SendError {
                kind: SendErrorKind::Closed,
                bytes,
            });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let len = match &record.sealing {
            Some(_) => Transport::sealed_len(bytes.len()),
            None => bytes.len(),
        } as u64;
        if record.queued_bytes > 0
            && record.queued_bytes as u64 + len > self.config.send_queue_bytes_max as u64
        {
            record.backpressured = true;
            return Err(SendError {
                kind: SendErrorKind::Backpressure,
                bytes,
            });
        }
        let bytes = match record.sealing.as_mut() {
            Some(sealing) => {
                let mut sealed = BytesMut::new();
                if sealing.transport.seal(&bytes, &mut sealed).is_err() {
                    // The nonces of this direction ran out (after 2^64
                    // messages): the session cannot go on.
                    if let Err(err) = self.begin_close(conn, CloseReason::BadCiphertext) {
                        warn!(%err, "closing a connection out of nonces failed");
                    }
                    return Err(SendError {
                        kind: SendErrorKind::Closed,
                        bytes,
                    });
                }
                sealed.freeze()
            }
            None => bytes,
        };
        record.queued_bytes += bytes.len() as u32;
        record.queue.push_back(bytes);
        if !record.dirty {
            record.dirty = true;
            self.dirty.push(conn);
        }
        self.shared.signal();
        Ok(())
    }

    /// Bytes queued to `conn` and not yet sent.
    pub fn queued_bytes(&self, conn: ConnId) -> Option<u32> {
        self.conns.get(conn).map(|record| record.queued_bytes)
    }

    /// Starts closing `conn`; [`Event::Closed`] follows.
    pub fn close(&mut self, conn: ConnId, mode: CloseMode) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        match (mode, record.state) {
            (_, State::Closing) => Ok(()),
            (CloseMode::Flush, State::Open) => {
                record.state = State::Flushing;
                release_tail(record, &mut self.tail_bytes);
                // One deadline for the flush and the linger: a peer that
                // never reads cannot keep the connection.
                record.ops += 1;
                record.linger_armed = true;
                self.ring
                    .timeout(Delay::Linger, conn_token(Kind::Linger, conn))?;
                self.mark_dirty(conn);
                self.step(conn)?;
                self.shared.signal();
                Ok(())
            }
            (CloseMode::Flush, _) => Ok(()),
            (CloseMode::Now, _) => {
                self.begin_close(conn, CloseReason::Local)?;
                self.shared.signal();
                Ok(())
            }
        }
    }

    /// Stops delivering `conn`'s input (backpressure toward the peer):
    /// its recv is cancelled; data already received still arrives.
    pub fn pause_reading(&mut self, conn: ConnId) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if record.paused || record.state != State::Open {
            return Ok(());
        }
        record.paused = true;
        if record.recv_armed {
            record.ops += 1;
            self.ring
                .cancel(conn_token(Kind::Recv, conn), conn_token(Kind::Cancel, conn))?;
            self.shared.signal();
        }
        Ok(())
    }

    pub fn resume_reading(&mut self, conn: ConnId) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if !record.paused {
            return Ok(());
        }
        record.paused = false;
        self.arm_recv(conn)?;
        self.shared.signal();
        Ok(())
    }

    /// Starts handing `conn`'s socket to another driver: queued frames are
    /// sent, reading stops, and [`Event::Released`] carries the socket.
    pub fn release(&mut self, conn: ConnId) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if record.state != State::Open {
            return Ok(());
        }
        record.state = State::Releasing;
        if record.recv_armed {
            record.ops += 1;
            self.ring
                .cancel(conn_token(Kind::Recv, conn), conn_token(Kind::Cancel, conn))?;
        }
        self.mark_dirty(conn);
        self.step(conn)?;
        self.shared.signal();
        Ok(())
    }

    /// fdatasync of `fd` through the ring, submitted at the loop's next enter
    /// (in the same enter as a wait in the ring) and run by the kernel on a
    /// worker thread; `Event::Synced` with `number` reports it. `fd` must
    /// stay open until then. The shard's log syncs this way while its loop
    /// waits in the ring, so the completion wakes that wait.
    pub fn fdatasync(&mut self, fd: RawFd, number: u32) -> Result<(), UringError> {
        self.ring
            .fdatasync(fd, listener_token(Kind::Sync, number))?;
        self.shared.signal();
        Ok(())
    }

    /// Stops accepting; connections already accepted carry on (a graceful
    /// stop lets them flush a last frame before `shutdown`).
    pub fn stop_accepting(&mut self) -> Result<(), UringError> {
        if self.accept_stopped || self.shutting_down {
            return Ok(());
        }
        self.accept_stopped = true;
        for index in 0..self.listeners.len() {
            if self.listeners[index].armed {
                self.ring.cancel(
                    listener_token(Kind::Accept, index as u32),
                    listener_token(Kind::Drain, index as u32),
                )?;
            }
        }
        self.shared.signal();
        Ok(())
    }

    /// Stops accepting and closes every connection (`Shutdown`). The driver
    /// is done when `is_idle`.
    pub fn shutdown(&mut self) -> Result<(), UringError> {
        let cancelled = self.accept_stopped;
        self.shutting_down = true;
        for index in 0..self.listeners.len() {
            if self.listeners[index].armed && !cancelled {
                self.ring.cancel(
                    listener_token(Kind::Accept, index as u32),
                    listener_token(Kind::Drain, index as u32),
                )?;
            }
        }
        for conn in self.conns.ids() {
            self.begin_close(conn, CloseReason::Shutdown)?;
        }
        self.shared.signal();
        Ok(())
    }

    /// Whether the driver has work for its loop's next turn: a wake-up not
    /// yet taken, frames to send, completions to reap, or deferred work the
    /// kernel holds. Cheap (no syscall); the liveness check reads it.
    pub fn has_work(&mut self) -> bool {
        self.shared.ready.get()
            || self.shared.kernel_work.get()
            || !self.dirty.is_empty()
            || !self.pending.is_empty()
            || self.ring.unsubmitted() > 0
            || self.ring.has_completions()
            || self.ring.kernel_work_pending()
    }

    /// Whether the loop must take another turn before it may sleep in the
    /// ring: a wake-up not yet taken, events already reported, or
    /// completions already posted. Frames to send and operations to submit
    /// do not count (`wait_in_ring` submits them in the same enter), nor
    /// does the kernel's `IORING_SQ_TASKRUN` flag: an enter that waits runs
    /// the deferred work first and returns at once if it posts completions,
    /// and the flag can stay set after the work it announced has run, so a
    /// loop that trusted it would spin on empty enters instead of sleeping.
    pub fn must_turn_before_ring_wait(&mut self) -> bool {
        self.shared.ready.get() || !self.pending.is_empty() || self.ring.has_completions()
    }

    /// Whether `wait_in_ring` can gather a batch (kernel 6.12+).
    pub fn supports_wait_batch(&self) -> bool {
        self.ring.supports_wait_batch()
    }

    /// No connection left and no operation in flight.
    pub fn is_idle(&self) -> bool {
        self.conns.len() == 0 && self.ring.in_flight() == 0
    }

    /// One loop turn: submits queued sends and re-arms, runs the kernel's
    /// deferred work, handles up to `completions_per_turn_max` completions
    /// and appends the resulting events to `out`. At most one
    /// io_uring_enter, none when there is nothing to submit or collect.
    /// An error means the ring refused work (out of memory, or a full
    /// completion queue that never drains): treat it as fatal for the shard.
    /// Memory stays safe (see `sys`), but connections may then leak.
    pub fn poll_events(&mut self, out: &mut Vec<Event>) -> Result<(), UringError> {
        out.append(&mut self.pending);
        self.flush_sends()?;
        self.ring.publish();
        self.ring.submit()?;
        let mut completions = std::mem::take(&mut self.completions);
        self.ring.reap(
            self.config.completions_per_turn_max as usize,
            &mut completions,
        );
        let mut result = Ok(());
        for completion in completions.drain(..) {
            if let Err(err) = self.on_completion(completion, out) {
                result = Err(err);
            }
            // Events in completion order: a socket's `Closed` or `Released`
            // comes before an `Accepted` that reuses its slot.
            out.append(&mut self.pending);
        }
        self.completions = completions;
        out.append(&mut self.pending);
        self.ring.publish();
        // The eventfd cannot be the only wake-up: with DEFER_TASKRUN the
        // kernel signals it only when its deferred-work list goes from empty
        // to non-empty, and one enter runs at most 20 items of that work
        // (`IO_LOCAL_TW_DEFAULT_MAX`), keeping the rest on a retry list with
        // `IORING_SQ_TASKRUN` still set. A loop that parked then would wait
        // for a signal that never comes (see docs/reliability.md).
        if self.ring.unsubmitted() > 0 || self.ring.has_completions() || !self.dirty.is_empty() {
            self.shared.ready.set(true);
        }
        if self.ring.kernel_work_pending() {
            self.shared.kernel_work.set(true);
        }
        result
    }

    /// Called before the shard's loop parks: turns the eventfd on and says
    /// whether work is already waiting (then the loop must not park). The
    /// eventfd is off while the loop runs (`unpark`), so the completions the
    /// loop collects itself never wake it a second time.
    pub fn park(&mut self) -> bool {
        self.ring.set_eventfd_enabled(true);
        let waiting = self.ring.unsubmitted() > 0
            || self.ring.has_completions()
            || !self.dirty.is_empty()
            || !self.pending.is_empty()
            || self.ring.kernel_work_pending();
        if waiting {
            self.shared.ready.set(true);
        }
        waiting
    }

    /// Sleeps in the socket ring itself until it has work or `timeout`
    /// passes (the eventfd stays off); `batch_us` above 0 gathers a batch
    /// of completions for up to that long first (`Ring::wait`).
    pub fn wait_in_ring(
        &mut self,
        timeout: std::time::Duration,
        batch_us: u32,
    ) -> Result<(), UringError> {
        self.flush_sends()?;
        self.ring.publish();
        self.ring.wait(timeout, batch_us)?;
        Ok(())
    }

    /// The loop woke: eventfd signals off until it parks again.
    pub fn unpark(&mut self) {
        self.ring.set_eventfd_enabled(false);
    }

    fn mark_dirty(&mut self, conn: ConnId) {
        if let Some(record) = self.conns.get_mut(conn) {
            if !record.dirty {
                record.dirty = true;
                self.dirty.push(conn);
            }
        }
    }

    fn flush_sends(&mut self) -> Result<(), UringError> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut retry = Vec::new();
        for conn in dirty.iter().copied() {
            let Some(record) = self.conns.get_mut(conn) else {
                continue;
            };
            record.dirty = false;
            if record.sending > 0 || record.queue.is_empty() {
                continue;
            }
            if !matches!(
                record.state,
                State::Open | State::Flushing | State::Releasing
            ) {
                continue;
            }
            let started = self.ring.send(
                record.fd.as_raw_fd(),
                conn_token(Kind::Send, conn),
                record.queue.frames(),
                record.sent_offset as usize,
                self.config.send_bytes_per_op_max as usize,
            )?;
            match started {
                Some(bytes) => {
                    record.sending = bytes as u32;
                    record.ops += 1;
                }
                None => {
                    // Every send slot is busy; try again next turn.
                    record.dirty = true;
                    retry.push(conn);
                }
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
        self.dirty.append(&mut retry);
        Ok(())
    }

    fn arm_recv(&mut self, conn: ConnId) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        let wanted = match record.state {
            State::Open => !record.paused && !record.bad_frame && !record.input_closed,
            State::Flushing | State::Lingering => true,
            State::Closing | State::Releasing => false,
        };
        if wanted && !record.recv_armed {
            record.recv_armed = true;
            record.ops += 1;
            self.ring
                .recv_multishot(record.fd.as_raw_fd(), conn_token(Kind::Recv, conn))?;
        }
        Ok(())
    }

    fn on_completion(
        &mut self,
        completion: Completion,
        out: &mut Vec<Event>,
    ) -> Result<(), UringError> {
        let token = completion.token;
        match token.kind {
            Kind::Accept => self.on_accept(completion, out),
            Kind::AcceptRetry => {
                let index = token.index as usize;
                if !self.shutting_down && !self.accept_stopped && !self.listeners[index].armed {
                    self.listeners[index].armed = true;
                    self.ring.accept_multishot(
                        self.listeners[index].fd.as_raw_fd(),
                        listener_token(Kind::Accept, token.index),
                    )?;
                }
                Ok(())
            }
            Kind::Drain => Ok(()),
            Kind::Sync => {
                self.syncs += 1;
                let result = if completion.result < 0 {
                    Err(io::Error::from_raw_os_error(-completion.result))
                } else {
                    Ok(())
                };
                out.push(Event::Synced {
                    number: token.index,
                    result,
                });
                Ok(())
            }
            Kind::Recv => self.on_recv(completion, out),
            Kind::Send => self.on_send(completion, out),
            Kind::Cancel | Kind::Shutdown | Kind::Linger => {
                let conn = token_conn(token);
                let Some(record) = self.conns.get_mut(conn) else {
                    self.stale_completions += 1;
                    return Ok(());
                };
                record.ops -= 1;
                if token.kind == Kind::Linger {
                    record.linger_armed = false;
                    let closing = matches!(record.state, State::Flushing | State::Lingering);
                    if completion.result == -libc::ETIME && closing {
                        self.begin_close(conn, CloseReason::Local)?;
                    }
                }
                self.step(conn)?;
                self.flush_closed(conn);
                Ok(())
            }
        }
    }

    fn on_accept(
        &mut self,
        completion: Completion,
        out: &mut Vec<Event>,
    ) -> Result<(), UringError> {
        let index = completion.token.index as usize;
        if let Some(fd) = completion.accepted {
            if self.shutting_down
                || self.accept_stopped
                || self.conns.len() >= self.config.connections_max as usize
            {
                self.refused += 1;
                drop(fd);
            } else {
                let peer = peer_addr(&fd);
                let mode = if self.config.noise {
                    Mode::Sniff
                } else {
                    Mode::Plain
                };
                let conn = self.conns.insert(new_conn(fd, mode));
                self.accepted += 1;
                self.arm_recv(conn)?;
                out.push(Event::Accepted { conn, peer });
            }
        }
        if !completion.more {
            self.listeners[index].armed = false;
            if self.shutting_down || self.accept_stopped {
                return Ok(());
            }
            let resource = matches!(
                -completion.result,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            );
            if completion.result < 0 && resource {
                self.accept_retries += 1;
                warn!(
                    errno = -completion.result,
                    "accept failed; retrying shortly"
                );
                self.ring.timeout(
                    Delay::AcceptRetry,
                    listener_token(Kind::AcceptRetry, index as u32),
                )?;
            } else {
                self.listeners[index].armed = true;
                self.ring.accept_multishot(
                    self.listeners[index].fd.as_raw_fd(),
                    listener_token(Kind::Accept, index as u32),
                )?;
            }
        }
        Ok(())
    }

    fn on_recv(&mut self, completion: Completion, out: &mut Vec<Event>) -> Result<(), UringError> {
        let conn = token_conn(completion.token);
        let Some(record) = self.conns.get_mut(conn) else {
            self.stale_completions += 1;
            if let Some(bid) = completion.buffer {
                self.ring.recycle(bid);
            }
            return Ok(());
        };
        if !completion.more {
            record.recv_armed = false;
            record.ops -= 1;
        }
        let mut stop = None;
        let mut close = None;
        if completion.result > 0 {
            let bid = completion
                .buffer
                .expect("a recv with data names its buffer");
            let data = self.ring.buffer(bid, completion.result as usize);
            match record.state {
                State::Open if !record.bad_frame => {
                    if record.mode == Mode::Sniff {
                        record.mode = if data[0] == crate::noise::wire::MAGIC[0] {
                            Mode::Raw
                        } else {
                            Mode::Plain
                        };
                    }
                    let result = match record.mode {
                        Mode::Sniff | Mode::Plain => {
                            frame_input(record, conn, data, &self.config, &mut self.tail_bytes, out)
                        }
                        Mode::Raw => {
                            out.push(Event::Raw {
                                conn,
                                bytes: Bytes::copy_from_slice(data),
                            });
                            Ok(())
                        }
                        Mode::Sealed => {
                            open_input(record, conn, data, &self.config, &mut self.tail_bytes, out)
                        }
                    };
                    if let Err(reason) = result {
                        stop = Some(reason);
                    }
                }
                State::Releasing => {
                    // Kept as read: ciphertext for a sealed connection (its
                    // new owner opens it), plaintext otherwise.
                    let held = match record.sealing.as_mut() {
                        Some(sealing) => &mut sealing.input,
                        None => &mut **record.tail.get_or_insert_with(Default::default),
                    };
                    let before = held.capacity();
                    held.extend_from_slice(data);
                    self.tail_bytes += held.capacity() - before;
                }
                // Closing, or input after a bad frame: discarded.
                _ => {}
            }
            self.ring.recycle(bid);
        } else if completion.result == 0 {
            match record.state {
                State::Open if self.config.half_close => {
                    if !record.input_closed {
                        record.input_closed = true;
                        out.push(Event::InputClosed { conn });
                    }
                }
                // The handoff's new owner reads the FIN itself.
                State::Releasing => {}
                _ => close = Some(CloseReason::PeerClosed),
            }
        } else {
            if let Some(bid) = completion.buffer {
                self.ring.recycle(bid);
            }
            match -completion.result {
                // The buffer ring ran dry: nothing was read, re-arm below.
                libc::ENOBUFS | libc::ECANCELED => {}
                errno => {
                    if record.state != State::Releasing {
                        close = Some(CloseReason::Error(errno));
                    }
                }
            }
        }
        if let Some(stop) = stop {
            self.stop_input(conn, stop)?;
        }
        if let Some(reason) = close {
            let state = self.conns.get(conn).map(|r| r.state);
            let reason = match state {
                Some(State::Flushing | State::Lingering) => CloseReason::Local,
                _ => reason,
            };
            self.begin_close(conn, reason)?;
        } else if !completion.more {
            self.arm_recv(conn)?;
        }
        self.step(conn)?;
        self.flush_closed(conn);
        Ok(())
    }

    fn on_send(&mut self, completion: Completion, out: &mut Vec<Event>) -> Result<(), UringError> {
        let conn = token_conn(completion.token);
        let Some(record) = self.conns.get_mut(conn) else {
            self.stale_completions += 1;
            return Ok(());
        };
        record.ops -= 1;
        record.sending = 0;
        if completion.result >= 0 {
            if record.state != State::Closing {
                advance(record, completion.result as usize);
            }
        } else if completion.result != -libc::ECANCELED {
            let errno = -completion.result;
            self.begin_close(conn, CloseReason::Error(errno))?;
            self.step(conn)?;
            self.flush_closed(conn);
            return Ok(());
        }
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if record.queue.is_empty() {
            // An idle connection keeps no queue allocation.
            record.queue.release();
        } else {
            self.mark_dirty(conn);
        }
        let record = self.conns.get_mut(conn).expect("still here");
        if record.backpressured
            && record.queued_bytes <= self.config.send_queue_bytes_max / 2
            && record.state == State::Open
        {
            record.backpressured = false;
            out.push(Event::Writable { conn });
        }
        self.step(conn)?;
        self.flush_closed(conn);
        Ok(())
    }

    /// Input can no longer be framed: report and stop reading.
    fn stop_input(&mut self, conn: ConnId, stop: InputStop) -> Result<(), UringError> {
        match stop {
            InputStop::BadHeader(header) => {
                let record = self.conns.get_mut(conn).expect("caller checked");
                record.bad_frame = true;
                release_tail(record, &mut self.tail_bytes);
                if record.recv_armed {
                    record.ops += 1;
                    self.ring
                        .cancel(conn_token(Kind::Recv, conn), conn_token(Kind::Cancel, conn))?;
                }
                self.pending.push(Event::BadFrame { conn, header });
                self.shared.ready.set(true);
                Ok(())
            }
            InputStop::Overloaded => self.begin_close(conn, CloseReason::Overloaded),
            InputStop::BadCiphertext => self.begin_close(conn, CloseReason::BadCiphertext),
        }
    }

    /// Cancels everything of `conn`; it closes when the last op completes.
    fn begin_close(&mut self, conn: ConnId, reason: CloseReason) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        if record.state == State::Closing {
            return Ok(());
        }
        record.state = State::Closing;
        record.reason = reason;
        record.queue.release();
        record.queued_bytes = 0;
        release_tail(record, &mut self.tail_bytes);
        // Each operation that can wait is cancelled by its own user data
        // (see `Ring::cancel_send`); a shutdown or a cancel ends by itself.
        if record.recv_armed {
            record.ops += 1;
            self.ring
                .cancel(conn_token(Kind::Recv, conn), conn_token(Kind::Cancel, conn))?;
        }
        if record.sending > 0
            && self
                .ring
                .cancel_send(conn_token(Kind::Send, conn), conn_token(Kind::Cancel, conn))?
        {
            record.ops += 1;
        }
        if record.linger_armed {
            record.ops += 1;
            self.ring.cancel(
                conn_token(Kind::Linger, conn),
                conn_token(Kind::Cancel, conn),
            )?;
        }
        self.flush_closed(conn);
        Ok(())
    }

    /// Moves `conn` along once its operations allow.
    fn step(&mut self, conn: ConnId) -> Result<(), UringError> {
        let Some(record) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        match record.state {
            State::Flushing if record.queue.is_empty() && record.sending == 0 => {
                record.state = State::Lingering;
                record.ops += 1;
                let fd = record.fd.as_raw_fd();
                self.ring
                    .shutdown_write(fd, conn_token(Kind::Shutdown, conn))?;
                self.arm_recv(conn)?;
            }
            State::Releasing if record.ops == 0 && record.queue.is_empty() => {
                let record = self.conns.remove(conn).expect("present");
                let buffered = match record.tail {
                    Some(tail) => {
                        self.tail_bytes -= tail.capacity();
                        (*tail).freeze()
                    }
                    None => Bytes::new(),
                };
                let sealing = record.sealing;
                if let Some(sealing) = &sealing {
                    // Counted again by the adopting driver.
                    self.tail_bytes -= sealing.input.capacity();
                }
                self.pending.push(Event::Released {
                    conn,
                    fd: record.fd,
                    buffered,
                    sealing,
                });
                self.shared.ready.set(true);
            }
            _ => {}
        }
        Ok(())
    }

    /// Closes and reports `conn` if it is closing with nothing in flight.
    fn flush_closed(&mut self, conn: ConnId) {
        let Some(record) = self.conns.get(conn) else {
            return;
        };
        if record.state == State::Closing && record.ops == 0 {
            let record = self.conns.remove(conn).expect("present");
            let reason = record.reason;
            // The kernel holds no operation on it: closing is safe.
            drop(record);
            self.pending.push(Event::Closed { conn, reason });
            self.shared.ready.set(true);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.shared.stopped.set(true);
        sys::eventfd_signal(&self.wake_fd);
    }
}

fn new_conn(fd: OwnedFd, mode: Mode) -> Conn {
    Conn {
        fd,
        state: State::Open,
        reason: CloseReason::Local,
        recv_armed: false,
        linger_armed: false,
        paused: false,
        bad_frame: false,
        input_closed: false,
        dirty: false,
        backpressured: false,
        mode,
        ops: 0,
        sending: 0,
        sent_offset: 0,
        queued_bytes: 0,
        queue: SendQueue::default(),
        tail: None,
        sealing: None,
    }
}

fn conn_token(kind: Kind, conn: ConnId) -> Token {
    Token {
        kind,
        generation: conn.generation,
        index: conn.index,
    }
}

fn token_conn(token: Token) -> ConnId {
    ConnId {
        index: token.index,
        generation: token.generation,
    }
}

fn listener_token(kind: Kind, index: u32) -> Token {
    Token {
        kind,
        generation: 0,
        index,
    }
}

fn peer_addr(fd: &OwnedFd) -> SocketAddr {
    use nix::sys::socket::{getpeername, SockaddrStorage};
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    match getpeername::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(addr) => {
            if let Some(v4) = addr.as_sockaddr_in() {
                SocketAddr::from((v4.ip(), v4.port()))
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                SocketAddr::from((v6.ip(), v6.port()))
            } else {
                unknown
            }
        }
        Err(_) => unknown,
    }
}

/// Removes the front `sent` bytes from the queue.
fn advance(record: &mut Conn, mut sent: usize) {
    record.queued_bytes -= sent as u32;
    while sent > 0 {
        let front = record.queue.front().expect("sent bytes were queued");
        let left = front.len() - record.sent_offset as usize;
        if sent >= left {
            record.queue.pop_front();
            record.sent_offset = 0;
            sent -= left;
        } else {
            record.sent_offset += sent as u32;
            sent = 0;
        }
    }
}

/// Drops the input held for framing (and a sealed connection's unopened
/// input): no more of it will be read.
fn release_tail(record: &mut Conn, tail_bytes: &mut usize) {
    if let Some(tail) = record.tail.take() {
        *tail_bytes -= tail.capacity();
    }
    if let Some(sealing) = record.sealing.as_mut() {
        *tail_bytes -= sealing.input.capacity();
        sealing.input = BytesMut::new();
    }
}

/// Why framing stopped.
#[derive(Clone, Copy, Debug)]
enum InputStop {
    BadHeader(FrameHeader),
    Overloaded,
    /// A transport message did not open (or a nonce ran out).
    BadCiphertext,
}

/// Bytes of a frame's header: the length prefix and the type byte.
const HEADER_BYTES: usize = crate::proto::HEADER_BYTES;

/// The total bytes (prefix included) of the frame whose prefix starts
/// `bytes`, if the prefix is whole; checks the type byte too once it is
/// there.
fn frame_total(bytes: &[u8], config: &DriverConfig) -> Result<Option<usize>, InputStop> {
    if bytes.len() < LENGTH_PREFIX_BYTES {
        return Ok(None);
    }
    let length = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if length == 0 || length > config.frame_bytes_max {
        return Err(InputStop::BadHeader(FrameHeader::new(
            &bytes[..LENGTH_PREFIX_BYTES],
        )));
    }
    if let (Some(known), Some(&type_byte)) =
        (config.frame_type_known, bytes.get(LENGTH_PREFIX_BYTES))
    {
        if !known(type_byte) {
            return Err(InputStop::BadHeader(FrameHeader::new(
                &bytes[..HEADER_BYTES],
            )));
        }
    }
    Ok(Some(LENGTH_PREFIX_BYTES + length as usize))
}

/// Opens the Noise transport messages `data` completes (after the sealing's
/// unopened input) and frames their plaintext; keeps an incomplete message,
/// counted in `tail_bytes`. The frames of messages before a bad one are
/// emitted first.
fn open_input(
    record: &mut Conn,
    conn: ConnId,
    data: &[u8],
    config: &DriverConfig,
    tail_bytes: &mut usize,
    out: &mut Vec<Event>,
) -> Result<(), InputStop> {
    let sealing = record.sealing.as_mut().expect("a sealed connection");
    let before = sealing.input.capacity();
    sealing.input.extend_from_slice(data);
    // Allocated only when a whole message opens (an incomplete one may be
    // far longer than what it adds now).
    let mut plaintext = BytesMut::new();
    let opened = sealing.transport.open(&mut sealing.input, &mut plaintext);
    if sealing.input.is_empty() {
        // Between messages an idle connection holds no buffer.
        sealing.input = BytesMut::new();
    }
    *tail_bytes = *tail_bytes - before + sealing.input.capacity();
    let overloaded = *tail_bytes > config.tail_bytes_max;
    if !plaintext.is_empty() {
        frame_input(record, conn, &plaintext, config, tail_bytes, out)?;
    }
    if opened.is_err() {
        return Err(InputStop::BadCiphertext);
    }
    if overloaded {
        return Err(InputStop::Overloaded);
    }
    Ok(())
}

/// Frames `data` (just read) after the connection's tail: emits complete
/// frames, keeps the incomplete end in the tail.
fn frame_input(
    record: &mut Conn,
    conn: ConnId,
    mut data: &[u8],
    config: &DriverConfig,
    tail_bytes: &mut usize,
    out: &mut Vec<Event>,
) -> Result<(), InputStop> {
    // 1. Complete the frame begun in the tail; its header first (a frame
    // is never shorter than its header), so the type is checked before
    // room for the body is reserved.
    if let Some(tail) = record.tail.as_mut() {
        if tail.len() < HEADER_BYTES {
            let take = (HEADER_BYTES - tail.len()).min(data.len());
            tail.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        let Some(total) = frame_total(tail, config)? else {
            return Ok(());
        };
        if tail.capacity() < total {
            let before = tail.capacity();
            if *tail_bytes - before + total > config.tail_bytes_max {
                return Err(InputStop::Overloaded);
            }
            tail.reserve(total - tail.len());
            *tail_bytes = *tail_bytes - before + tail.capacity();
        }
        let take = (total - tail.len()).min(data.len());
        tail.extend_from_slice(&data[..take]);
        data = &data[take..];
        if tail.len() < total {
            return Ok(());
        }
        let tail = record.tail.take().expect("present");
        *tail_bytes -= tail.capacity();
        out.push(Event::Data {
            conn,
            frames: (*tail).freeze(),
        });
    }
    // 2. Whole frames straight from the buffer, one copy for all of them.
    let mut end = 0usize;
    let mut bad = None;
    loop {
        match frame_total(&data[end..], config) {
            Ok(Some(total)) if data.len() - end >= total => end += total,
            Ok(_) => break,
            Err(stop) => {
                bad = Some(stop);
                break;
            }
        }
    }
    if end > 0 {
        out.push(Event::Data {
            conn,
            frames: Bytes::copy_from_slice(&data[..end]),
        });
    }
    if let Some(stop) = bad {
        return Err(stop);
    }
    // 3. Keep the incomplete rest.
    let rest = &data[end..];
    if !rest.is_empty() {
        let want = match frame_total(rest, config)? {
            Some(total) => total,
            // Room for the whole header: step 1 completes it in place.
            None => HEADER_BYTES,
        };
        if *tail_bytes + want > config.tail_bytes_max {
            return Err(InputStop::Overloaded);
        }
        let mut tail = BytesMut::with_capacity(want);
        tail.extend_from_slice(rest);
        *tail_bytes += tail.capacity();
        record.tail = Some(Box::new(tail));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut out = (len as u32).to_be_bytes().to_vec();
        out.extend((0..len).map(|i| seed.wrapping_add(i as u8)));
        out
    }

    fn conn() -> Conn {
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        new_conn(OwnedFd::from(file), Mode::Plain)
    }

    /// Feeds `chunks` through the framer; returns the delivered bytes.
    fn feed(chunks: &[&[u8]], config: &DriverConfig, tail_bytes: &mut usize) -> Vec<u8> {
        let mut record = conn();
        let id = ConnId {
            index: 0,
            generation: 0,
        };
        let mut out = Vec::new();
        for chunk in chunks {
            frame_input(&mut record, id, chunk, config, tail_bytes, &mut out).expect("valid");
        }
        let mut delivered = Vec::new();
        for event in out {
            let Event::Data { frames, .. } = event else {
                panic!("only data");
            };
            // Every Data event holds whole frames.
            let mut rest = &frames[..];
            while !rest.is_empty() {
                let total = frame_total(rest, config)
                    .expect("valid")
                    .expect("whole prefix");
                assert!(rest.len() >= total, "whole frames only");
                rest = &rest[total..];
            }
            delivered.extend_from_slice(&frames);
        }
        release_tail(&mut record, tail_bytes);
        delivered
    }

    #[test]
    fn framing_delivers_whole_frames_at_every_split() {
        let config = DriverConfig::for_tests();
        let stream: Vec<u8> = [frame(1, 1), frame(7, 2), frame(600, 3), frame(3, 4)].concat();
        for split in 0..=stream.len() {
            let mut tail_bytes = 0;
            let delivered = feed(
                &[&stream[..split], &stream[split..]],
                &config,
                &mut tail_bytes,
            );
            assert_eq!(delivered, stream, "split at {split}");
            assert_eq!(tail_bytes, 0);
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let mut tail_bytes = 0;
        assert_eq!(feed(&bytes, &config, &mut tail_bytes), stream);
    }

    #[test]
    fn framing_holds_only_the_incomplete_tail() {
        let config = DriverConfig::for_tests();
        let mut record = conn();
        let id = ConnId {
            index: 0,
            generation: 0,
        };
        let mut tail_bytes = 0;
        let mut out = Vec::new();
        let whole = frame(100, 9);
        frame_input(
            &mut record,
            id,
            &whole[..50],
            &config,
            &mut tail_bytes,
            &mut out,
        )
        .expect("valid");
        assert!(out.is_empty());
        assert_eq!(tail_bytes, whole.len(), "the tail is sized to the frame");
        frame_input(
            &mut record,
            id,
            &whole[50..],
            &config,
            &mut tail_bytes,
            &mut out,
        )
        .expect("valid");
        assert_eq!(out.len(), 1);
        assert_eq!(tail_bytes, 0);
        assert!(record.tail.is_none());
    }

    #[test]
    fn framing_rejects_zero_and_oversized_lengths() {
        let config = DriverConfig::for_tests();
        let mut record = conn();
        let id = ConnId {
            index: 0,
            generation: 0,
        };
        let mut tail_bytes = 0;
        let mut out = Vec::new();
        let result = frame_input(
            &mut record,
            id,
            &[0, 0, 0, 0],
            &config,
            &mut tail_bytes,
            &mut out,
        );
        assert!(matches!(result, Err(InputStop::BadHeader(h)) if h.as_bytes() == [0, 0, 0, 0]));
        let too_long = (config.frame_bytes_max + 1).to_be_bytes();
        let result = frame_input(
            &mut record,
            id,
            &too_long,
            &config,
            &mut tail_bytes,
            &mut out,
        );
        assert!(
            matches!(result, Err(InputStop::BadHeader(h)) if h.length() == config.frame_bytes_max + 1)
        );
        assert_eq!(tail_bytes, 0);
    }

    #[test]
    fn framing_refuses_an_unknown_type_at_its_fifth_byte() {
        let mut config = DriverConfig::for_tests();
        config.frame_type_known = Some(|byte| byte < 0x40);
        let id = ConnId {
            index: 0,
            generation: 0,
        };
        let mut tail_bytes = 0;
        let mut out = Vec::new();
        // A whole known frame, then an unknown header split 4 + 1.
        let mut record = conn();
        let mut first = frame(3, 7);
        first.extend_from_slice(&[0, 0, 0, 40]);
        frame_input(&mut record, id, &first, &config, &mut tail_bytes, &mut out)
            .expect("no verdict yet");
        assert_eq!(out.len(), 1, "the known frame is delivered");
        let result = frame_input(
            &mut record,
            id,
            &[0x7f, 1, 2],
            &config,
            &mut tail_bytes,
            &mut out,
        );
        assert!(
            matches!(result, Err(InputStop::BadHeader(h)) if h.as_bytes() == [0, 0, 0, 40, 0x7f])
        );
        release_tail(&mut record, &mut tail_bytes);
        assert_eq!(tail_bytes, 0);
        // The same header in one read, with no body behind it.
        let mut record = conn();
        let result = frame_input(
            &mut record,
            id,
            &[0, 0, 0, 40, 0x7f],
            &config,
            &mut tail_bytes,
            &mut out,
        );
        assert!(matches!(result, Err(InputStop::BadHeader(h)) if h.length() == 40));
        assert_eq!(tail_bytes, 0);
    }

    #[test]
    fn framing_past_the_tail_bound_is_overloaded() {
        let mut config = DriverConfig::for_tests();
        config.tail_bytes_max = config.frame_bytes_max as usize + LENGTH_PREFIX_BYTES;
        let mut tail_bytes = config.tail_bytes_max - 10;
        let mut record = conn();
        let id = ConnId {
            index: 0,
            generation: 0,
        };
        let mut out = Vec::new();
        let whole = frame(100, 1);
        let result = frame_input(
            &mut record,
            id,
            &whole[..20],
            &config,
            &mut tail_bytes,
            &mut out,
        );
        assert!(matches!(result, Err(InputStop::Overloaded)));
    }

    #[test]
    fn user_data_round_trips() {
        let token = Token {
            kind: Kind::Recv,
            generation: GENERATION_MASK_FOR_TESTS,
            index: u32::MAX,
        };
        assert_eq!(Token::decode(token.encode()), Some(token));
    }

    const GENERATION_MASK_FOR_TESTS: u32 = sys::GENERATION_MASK;
}
