//! The media service's counters and gauges, read by the admin endpoint
//! (`/metrics`). Responses are counted by status as they leave (a
//! middleware); the gauges are copied from the ledger and the connection
//! cap once a second, so reading them never takes the ledger's lock.

use std::sync::atomic::{AtomicU64, Ordering};

/// Statuses counted on their own; any other goes to `other`.
pub const STATUSES: [u16; 18] = [
    200, 201, 204, 206, 400, 401, 403, 404, 405, 409, 413, 416, 422, 429, 500, 503, 507, 0,
];

#[derive(Debug, Default)]
pub struct MediaStats {
    /// Responses by status (`STATUSES`, the last slot for any other).
    responses: [AtomicU64; STATUSES.len()],
    pub connections: AtomicU64,
    pub blob_bytes: AtomicU64,
    pub reserved_bytes: AtomicU64,
    pub uploads_in_flight: AtomicU64,
}

impl MediaStats {
    pub fn count_response(&self, status: u16) {
        let slot = STATUSES[..STATUSES.len() - 1]
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len() - 1);
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// (status label, count) for every slot ("other" for the last).
    pub fn responses(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        STATUSES.iter().zip(&self.responses).map(|(status, count)| {
            let label = if *status == 0 {
                "other".to_string()
            } else {
                status.to_string()
            };
            (label, count.load(Ordering::Relaxed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_counted_by_status_and_the_rest_together() {
        let stats = MediaStats::default();
        for status in [201, 201, 404, 418, 302] {
            stats.count_response(status);
        }
        let counted: Vec<(String, u64)> = stats.responses().filter(|(_, n)| *n > 0).collect();
        assert_eq!(
            counted,
            vec![
                ("201".to_string(), 2),
                ("404".to_string(), 1),
                ("other".to_string(), 2)
            ]
        );
    }
}
