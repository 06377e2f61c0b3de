//! One client connection's shared state: its output queue and wake-up flag
//! (its delivery window is the engine's, `engine::delivery`).
//!
//! Lives on one shard (`Rc`, never sent). The shard's socket loop
//! (`shard::io`) is the only writer to the socket; everyone else (the commit
//! task, the reply handler, the sweeper, the loop itself) appends encoded
//! frames to `out` and marks the connection woken, so all frames due to one
//! connection in a loop turn leave in one send.

use std::cell::{Cell, RefCell};

use bytes::BytesMut;

use std::sync::Arc;

use crate::ids::InboxKey;
use crate::metrics::ShardMetrics;
use crate::net::uring::{ConnId, Notifier};
use crate::proto::{error_frame, ErrorCode, Frame};

thread_local! {
    /// The metrics of the shard running on this thread, so every frame
    /// queued to a connection is counted without a pointer in each `Conn`.
    static SHARD_METRICS: std::cell::RefCell<Option<Arc<ShardMetrics>>> =
        const { std::cell::RefCell::new(None) };
    /// The shard's socket loop: connections with output waiting, and the
    /// handle that wakes the loop. Thread-local so a `Conn` holds no pointer
    /// to it.
    static WOKEN: RefCell<Option<(Notifier, Vec<ConnId>)>> = const { RefCell::new(None) };
}

/// Milliseconds on a clock shared by every shard of the process (monotonic,
/// wrapping after 49 days), to order the connections of one device; compare
/// with [`crate::session::accepted_after`].
pub fn connected_now() -> u32 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u32
}

/// Binds this thread's frame counters to its shard's metrics.
pub fn set_thread_metrics(metrics: Arc<ShardMetrics>) {
    SHARD_METRICS.with(|m| *m.borrow_mut() = Some(metrics));
}

/// Binds this thread's wake-ups to its shard's socket loop.
pub fn set_thread_notifier(notifier: Notifier) {
    WOKEN.with(|w| *w.borrow_mut() = Some((notifier, Vec::new())));
}

/// Takes the connections woken since the last call (into `out`, in the
/// order they were woken).
pub fn take_woken(out: &mut Vec<ConnId>) {
    WOKEN.with(|w| {
        if let Some((_, woken)) = w.borrow_mut().as_mut() {
            out.append(woken);
        }
    });
}

fn count_out(frame: &Frame) {
    SHARD_METRICS.with(|m| {
        if let Some(metrics) = m.borrow().as_ref() {
            metrics.frames_out[frame.frame_type().index()].inc();
            if let Frame::Error(error) = frame {
                metrics.refusals.record_value(error.code);
            }
        }
    });
}

/// Why a connection is being closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// A fatal Error frame was queued.
    Fatal(ErrorCode),
    /// The device connected again; GoAway(REPLACED) was queued.
    Replaced,
    /// The device was removed from its account; GoAway(DEVICE_REMOVED) was
    /// queued.
    Removed,
    /// The server is stopping; GoAway(SHUTTING_DOWN) was queued.
    Shutdown,
    /// The peer half-closed and everything it sent was answered.
    InputClosed,
}

/// What a connection holds only while it has output queued; released when
/// the queue is empty, so an idle session keeps a pointer instead of the
/// queue's header.
#[derive(Debug, Default)]
pub struct Active {
    /// Encoded frames not yet written.
    pub out: BytesMut,
}

#[derive(Debug, Default)]
pub struct ConnState {
    active: Option<Box<Active>>,
    /// Set once; the socket loop flushes the output queue and closes.
    pub close: Option<CloseReason>,
    /// The socket refused more output (its send queue is at its bound):
    /// `out` waits and the peer is not read until the socket drains.
    pub socket_full: bool,
    /// The peer sent its FIN: nothing more will be read.
    pub input_closed: bool,
    /// A later connection of the device waits to open until this session
    /// has handled what it read (`shard::io`, `Opening`): its frames are
    /// handled whatever its socket and in-flight bounds say.
    pub superseded: bool,
}

impl ConnState {
    /// The active part, created on first use.
    pub fn active(&mut self) -> &mut Active {
        self.active.get_or_insert_with(Box::default)
    }

    /// The active part if there is one.
    pub fn active_if_any(&mut self) -> Option<&mut Active> {
        self.active.as_deref_mut()
    }

    /// Bytes queued and not yet written.
    pub fn out_len(&self) -> usize {
        self.active.as_ref().map_or(0, |a| a.out.len())
    }

    /// Frees the active part once it holds nothing.
    pub fn release_if_idle(&mut self) {
        if self.active.as_ref().is_some_and(|a| a.out.is_empty()) {
            self.active = None;
        }
    }
}

/// A session's socket side. Every idle connection keeps one, so each
/// field counts: 56 bytes, an 80-byte heap block with the `Rc`'s counts
/// (when the session was accepted is the engine's to keep).
pub struct Conn {
    pub device: InboxKey,
    /// Coarse shard clock (seconds) of the last frame received.
    pub last_activity_s: Cell<u32>,
    /// The socket in the shard's driver; also the session's name in
    /// `ConnRef` (the driver's generation tells a reused slot apart).
    pub socket: ConnId,
    pub state: RefCell<ConnState>,
    /// In the socket loop's woken list.
    woken: Cell<bool>,
}

// Idle memory per connection is measured (the bench's idle scenario); this
// keeps a new field from quietly moving the record to a larger heap block.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Conn>() <= 56);

impl Conn {
    pub fn new(device: InboxKey, socket: ConnId, now_s: u32) -> Conn {
        Conn {
            device,
            last_activity_s: Cell::new(now_s),
            socket,
            state: RefCell::new(ConnState::default()),
            woken: Cell::new(false),
        }
    }

    /// The session's id on its shard (`ConnRef::id`).
    pub fn id(&self) -> u64 {
        self.socket.to_u64()
    }

    /// Queues a frame and wakes the socket loop. Frames queued after a
    /// close began are dropped (the peer is going away).
    pub fn enqueue(&self, frame: &Frame) {
        {
            let mut state = self.state.borrow_mut();
            if state.close.is_some() {
                return;
            }
            frame.encode(&mut state.active().out);
        }
        count_out(frame);
        self.wake();
    }

    /// Queues a final frame and starts the close.
    pub fn close_with(&self, frame: &Frame, reason: CloseReason) {
        {
            let mut state = self.state.borrow_mut();
            if state.close.is_some() {
                return;
            }
            frame.encode(&mut state.active().out);
            state.close = Some(reason);
        }
        count_out(frame);
        self.wake();
    }

    /// Queues a fatal Error and starts the close.
    pub fn fatal(&self, code: ErrorCode, message: &str) {
        self.close_with(&error_frame(code, message, true), CloseReason::Fatal(code));
    }

    pub fn is_closing(&self) -> bool {
        self.state.borrow().close.is_some()
    }

    /// Puts the connection on the socket loop's woken list (once until the
    /// loop takes it) and wakes the loop.
    pub fn wake(&self) {
        if self.woken.replace(true) {
            return;
        }
        let socket = self.socket;
        WOKEN.with(|w| {
            if let Some((notifier, woken)) = w.borrow_mut().as_mut() {
                woken.push(socket);
                notifier.notify();
            }
        });
    }

    /// Called by the socket loop when it takes the connection off the list.
    pub fn clear_woken(&self) {
        self.woken.set(false);
    }
}
