//! One client connection's shared state: its output queue, delivery window
//! and wake-up handle.
//!
//! Lives on one shard (`Rc`, never sent). The connection task owns the socket
//! and is the only writer to it; everyone else (the commit task, the reply
//! handler, the sweeper) appends encoded frames to `out` and wakes the task,
//! so all frames due to one connection in a loop turn leave in one send.

use std::cell::{Cell, RefCell};
use std::task::Waker;

use bytes::BytesMut;

use std::sync::Arc;

use crate::ids::InboxKey;
use crate::metrics::ShardMetrics;
use crate::proto::{error_frame, ErrorCode, Frame};
use crate::session::DeliveryWindow;

thread_local! {
    /// The metrics of the shard running on this thread, so every frame
    /// queued to a connection is counted without a pointer in each `Conn`.
    static SHARD_METRICS: std::cell::RefCell<Option<Arc<ShardMetrics>>> =
        const { std::cell::RefCell::new(None) };
}

/// Binds this thread's frame counters to its shard's metrics.
pub fn set_thread_metrics(metrics: Arc<ShardMetrics>) {
    SHARD_METRICS.with(|m| *m.borrow_mut() = Some(metrics));
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
    /// The server is stopping; GoAway(SHUTTING_DOWN) was queued.
    Shutdown,
}

/// What a connection holds only while it has output queued or deliveries
/// in flight; released when both are empty, so an idle session keeps a
/// pointer instead of the queue and window headers.
#[derive(Debug, Default)]
pub struct Active {
    /// Encoded frames not yet written.
    pub out: BytesMut,
    pub window: DeliveryWindow,
}

#[derive(Debug, Default)]
pub struct ConnState {
    active: Option<Box<Active>>,
    /// Highest sequence written, kept here while `active` is released.
    last_sent: u64,
    /// Sends read and not yet answered.
    pub sends_in_flight: u32,
    /// Coarse shard clock (seconds) of the last frame received.
    pub last_activity_s: u32,
    /// Set once; the task flushes the output queue and closes.
    pub close: Option<CloseReason>,
}

impl ConnState {
    /// The active part, created on first use.
    pub fn active(&mut self) -> &mut Active {
        let last_sent = self.last_sent;
        self.active.get_or_insert_with(|| {
            Box::new(Active {
                out: BytesMut::new(),
                window: DeliveryWindow::resume(last_sent),
            })
        })
    }

    /// The active part if there is one.
    pub fn active_if_any(&mut self) -> Option<&mut Active> {
        self.active.as_deref_mut()
    }

    /// Bytes queued and not yet written.
    pub fn out_len(&self) -> usize {
        self.active.as_ref().map_or(0, |a| a.out.len())
    }

    /// Highest sequence written to the connection.
    pub fn last_sent(&self) -> u64 {
        self.active
            .as_ref()
            .map_or(self.last_sent, |a| a.window.last_sent)
    }

    /// Entries the delivery window still admits.
    pub fn window_room(&self, messages_max: u32, bytes_max: u32) -> usize {
        self.active.as_ref().map_or(messages_max as usize, |a| {
            a.window.room(messages_max, bytes_max)
        })
    }

    /// Records an entry skipped without sending (expired or unreadable).
    pub fn skip(&mut self, seq: u64) {
        match self.active.as_deref_mut() {
            Some(active) => active.window.on_skipped(seq),
            None => {
                assert!(
                    seq > self.last_sent,
                    "entries are visited in sequence order"
                );
                self.last_sent = seq;
            }
        }
    }

    /// Applies a device ack to the window.
    pub fn on_ack(&mut self, up_to: u64, list: &[u64]) {
        if let Some(active) = self.active.as_deref_mut() {
            active.window.on_ack(up_to, list);
        }
        self.release_if_idle();
    }

    /// Frees the active part once it holds nothing.
    pub fn release_if_idle(&mut self) {
        if let Some(active) = &self.active {
            if active.out.is_empty() && active.window.in_flight() == 0 {
                self.last_sent = active.window.last_sent;
                self.active = None;
            }
        }
    }
}

pub struct Conn {
    /// Unique on its shard for the life of the process.
    pub id: u64,
    pub device: InboxKey,
    pub state: RefCell<ConnState>,
    waker: Cell<Option<Waker>>,
}

impl Conn {
    pub fn new(id: u64, device: InboxKey, now_s: u32) -> Conn {
        Conn {
            id,
            device,
            state: RefCell::new(ConnState {
                last_activity_s: now_s,
                ..ConnState::default()
            }),
            waker: Cell::new(None),
        }
    }

    /// Queues a frame and wakes the connection task. Frames queued after a
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

    /// Queues a frame encoded elsewhere (delivery encodes straight into the
    /// queue); counts it.
    pub fn note_encoded(frame: &Frame) {
        count_out(frame);
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

    pub fn register_waker(&self, waker: &Waker) {
        let current = self.waker.take();
        match current {
            Some(w) if w.will_wake(waker) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    pub fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}
