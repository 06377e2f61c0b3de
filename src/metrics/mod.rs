//! (placeholder until the metrics module lands)
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct ShardMetrics {
    pub accepted: AtomicU64,
}

impl ShardMetrics {
    pub fn add_acked(&self, _n: u64) {}
    pub fn add_accepted(&self, n: u64) {
        self.accepted.fetch_add(n, Relaxed);
    }
    pub fn add_receipts(&self, _n: u64) {}
    pub fn add_delivered(&self, _n: u64) {}
    pub fn add_handoff_in(&self) {}
    pub fn record_commit_latency_us(&self, _us: u64) {}
    pub fn set_ready(&self, _ready: bool) {}
}
