//! The WSS listener's counters and gauge, written by its runtime's tasks
//! and read by the admin endpoint (`/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a browser connection ended before or instead of being bridged, or
/// how a bridged one was cut by the bridge itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `wss.connections_max` connections were open: accepted and closed.
    Busy,
    /// The TLS handshake failed (or the peer left during it).
    Tls,
    /// The HTTP request was not a WebSocket upgrade (answered 4xx).
    Http,
    /// `wss.handshake_timeout_ms` passed before the Noise intro.
    Timeout,
    /// The first bytes were not the Noise intro (closed 1008).
    NotNoise,
    /// A text message (closed 1003).
    Text,
    /// A message over `wss.message_bytes_max`, or a WebSocket protocol
    /// error (closed 1009 or 1002).
    Protocol,
    /// The client listener could not be reached (closed 1013).
    Upstream,
    /// The browser sent nothing for `wss.idle_timeout_ms`.
    Idle,
}

impl Refusal {
    /// Every reason, in the order of the counters.
    pub const ALL: [Refusal; 9] = [
        Refusal::Busy,
        Refusal::Tls,
        Refusal::Http,
        Refusal::Timeout,
        Refusal::NotNoise,
        Refusal::Text,
        Refusal::Protocol,
        Refusal::Upstream,
        Refusal::Idle,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Tls => "tls",
            Refusal::Http => "http",
            Refusal::Timeout => "timeout",
            Refusal::NotNoise => "not_noise",
            Refusal::Text => "text",
            Refusal::Protocol => "protocol",
            Refusal::Upstream => "upstream",
            Refusal::Idle => "idle",
        }
    }
}

/// Counters and the open-connection gauge of the WSS listener.
#[derive(Debug, Default)]
pub struct WssStats {
    /// Connections open (from accept to close; refused ones are not counted).
    pub connections: AtomicU64,
    /// Connections accepted, refused ones included.
    pub accepted: AtomicU64,
    /// Connections that sent the Noise intro and were bridged to the
    /// client listener.
    pub bridged: AtomicU64,
    /// Certificate reloads that took effect.
    pub reloads: AtomicU64,
    /// Certificate reloads that failed (the old certificate stays).
    pub reload_failures: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl WssStats {
    /// Counts one connection ended for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// (label, count) for every reason.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|reason| {
            (
                reason.label(),
                self.refused[*reason as usize].load(Ordering::Relaxed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_under_their_own_label() {
        let stats = WssStats::default();
        for (index, reason) in Refusal::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index, "ALL is in declaration order");
        }
        stats.refused(Refusal::Text);
        stats.refused(Refusal::Text);
        stats.refused(Refusal::Busy);
        let counted: Vec<_> = stats.refusals().filter(|(_, n)| *n > 0).collect();
        assert_eq!(counted, vec![("busy", 1), ("text", 2)]);
    }
}
