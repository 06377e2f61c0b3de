//! The per-device delivery window: which inbox entries are on the wire and
//! not yet acknowledged.
//!
//! Bounded by a count and a byte budget (at least one entry is always
//! allowed, however large). The in-flight list holds at most
//! `delivery_window_messages` entries of 16 bytes and is released when empty,
//! so an idle session holds no allocation.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct DeliveryWindow {
    /// Highest sequence written to the connection.
    pub last_sent: u64,
    inflight: VecDeque<(u64, u32)>,
    inflight_bytes: u64,
}

impl DeliveryWindow {
    /// An empty window whose last sent sequence is `last_sent`.
    pub fn resume(last_sent: u64) -> DeliveryWindow {
        DeliveryWindow {
            last_sent,
            ..DeliveryWindow::default()
        }
    }

    /// Entries that may still be sent under the bounds.
    pub fn room(&self, messages_max: u32, bytes_max: u32) -> usize {
        if self.inflight.is_empty() {
            return messages_max as usize;
        }
        if self.inflight_bytes >= bytes_max as u64 {
            return 0;
        }
        (messages_max as usize).saturating_sub(self.inflight.len())
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Records an entry written to the wire.
    pub fn on_sent(&mut self, seq: u64, bytes: u32) {
        assert!(seq > self.last_sent, "entries are sent in sequence order");
        self.last_sent = seq;
        self.inflight.push_back((seq, bytes));
        self.inflight_bytes += bytes as u64;
    }

    /// Records an entry skipped without sending (expired before delivery).
    pub fn on_skipped(&mut self, seq: u64) {
        assert!(
            seq > self.last_sent,
            "entries are visited in sequence order"
        );
        self.last_sent = seq;
    }

    /// Removes acknowledged entries; returns how many were in flight.
    pub fn on_ack(&mut self, up_to: u64, list: &[u64]) -> usize {
        let before = self.inflight.len();
        let mut freed = 0u64;
        self.inflight.retain(|&(seq, bytes)| {
            let acked = seq <= up_to || list.contains(&seq);
            if acked {
                freed += bytes as u64;
            }
            !acked
        });
        self.inflight_bytes -= freed;
        if self.inflight.is_empty() {
            self.inflight = VecDeque::new();
        }
        before - self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_closes_at_count_and_reopens_on_ack() {
        let mut w = DeliveryWindow::default();
        assert_eq!(w.room(2, 1000), 2);
        w.on_sent(1, 10);
        w.on_sent(2, 10);
        assert_eq!(w.room(2, 1000), 0);
        assert_eq!(w.on_ack(1, &[]), 1);
        assert_eq!(w.room(2, 1000), 1);
        assert_eq!(w.on_ack(0, &[2]), 1);
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn window_closes_at_bytes_but_always_admits_one() {
        let mut w = DeliveryWindow::default();
        assert_eq!(w.room(8, 100), 8);
        w.on_sent(1, 500);
        assert_eq!(w.room(8, 100), 0);
        w.on_ack(1, &[]);
        assert_eq!(w.room(8, 100), 8);
    }

    #[test]
    fn ack_of_unsent_sequences_changes_nothing() {
        let mut w = DeliveryWindow::default();
        w.on_sent(5, 1);
        assert_eq!(w.on_ack(4, &[9]), 0);
        assert_eq!(w.in_flight(), 1);
    }
}
