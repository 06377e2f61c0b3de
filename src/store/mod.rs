//! The per-shard store: a memory-mapped, append-only segment log.
//!
//! Owned by one shard and touched only by that shard's thread (`Log` is
//! `!Send`). A message is appended once when accepted and read once per
//! recipient device when delivered; per-device inboxes are in-memory indexes
//! of log positions rebuilt from the segments on start. Durability comes
//! from group commit: `begin_commit` snapshots what is dirty, the shard's
//! commit task awaits `CommitBatch::sync` (an fdatasync that does not block
//! the executor), then `finish_commit` advances the durable ticket.
//!
//! This file holds the types the shard uses; the implementation is split by
//! concern: `record` (the sans-IO record format), `segment` (files and
//! mappings), `inbox` (the in-memory index and dedupe table), `recovery`
//! (the scan and its rules table), `log` (the `Log`), `commit` (group
//! commit), `storage` (the fault-injection seam) and `inspect` (the
//! read-only `switchboard log inspect`). The on-disk format is documented
//! in `docs/store.md`.
//!
//! Invariants: a sequence of a durable record is never assigned again in
//! its inbox, across restarts and reclamation (only appends lost before
//! their commit can see their sequence reused); an ack record outlives
//! every record it acknowledged; a record is reported durable only after
//! an fsync submitted after it was written has returned.

use bytes::Bytes;

use crate::ids::{ClientMessageId, InboxKey, InboxSeq};

mod commit;
pub mod inbox;
pub mod inspect;
mod log;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod storage;

pub use commit::CommitBatch;
pub use inbox::{payload_digest, payload_digest_parts};
pub use inspect::{inspect, InspectReport};
pub use log::{Log, MultiAppended, SpareRequest, DEDUPE_CAPACITY_DEFAULT, SPARE_FILE};

/// Wall-clock milliseconds since the Unix epoch; injected so expiry is tested
/// without waiting.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// A clock that moves only when told to: expiry tests and simulations.
#[derive(Debug)]
pub struct ManualClock(std::cell::Cell<u64>);

impl ManualClock {
    /// Starts at the real time, so records look like today's.
    pub fn starting_now() -> ManualClock {
        ManualClock(std::cell::Cell::new(SystemClock.now_ms()))
    }

    pub fn advance_ms(&self, ms: u64) {
        self.0.set(self.0.get() + ms);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
}

/// The real clock: the kernel's coarse wall clock, which moves once per
/// scheduler tick (4 ms here, by `clock_getres`) and costs a memory read
/// instead of a timer read.
/// The log reads it several times per delivery (expiry checks), and what it
/// stamps (message times, 30-day expiry) needs no finer grain.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        use nix::time::{clock_gettime, ClockId};
        match clock_gettime(ClockId::CLOCK_REALTIME_COARSE) {
            Ok(t) => (t.tv_sec() as u64) * 1_000 + (t.tv_nsec() as u64) / 1_000_000,
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// Where a record starts: segment sequence number and byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    pub segment: u32,
    pub offset: u32,
}

/// Monotonic count of appends on one shard's log. A record appended with
/// ticket `t` is durable once `Log::durable_ticket() >= t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct CommitTicket(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The configured log size cap or the disk is full; the caller answers
    /// STORE_FULL and the store keeps working.
    #[error("log full: {0}")]
    Full(&'static str),
    #[error("record of {0} bytes does not fit in a segment")]
    RecordTooLarge(u64),
    #[error("corrupt record in segment {segment} at offset {offset}: {reason}")]
    Corrupt {
        segment: u32,
        offset: u32,
        reason: &'static str,
    },
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A message to append to `recipient`'s inbox.
#[derive(Clone, Copy, Debug)]
pub struct NewMessage<'a> {
    pub recipient: InboxKey,
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    pub payload: &'a [u8],
}

/// Delivered (1) or read (2), as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptKind {
    Delivered = 1,
    Read = 2,
}

/// A receipt to append to `recipient`'s inbox (the original sender device).
#[derive(Clone, Copy, Debug)]
pub struct NewReceipt<'a> {
    pub recipient: InboxKey,
    pub kind: ReceiptKind,
    pub by: InboxKey,
    pub client_message_ids: &'a [u64],
    /// When the receipt arose (a relayed receipt keeps its first time);
    /// `None`: now.
    pub timestamp_ms: Option<u64>,
}

/// What an append assigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: InboxSeq,
    pub position: LogPosition,
    pub timestamp_ms: u64,
    pub ticket: CommitTicket,
}

/// A message already in the log with the same (sender device, client id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Duplicate {
    pub recipient: InboxKey,
    pub seq: InboxSeq,
    pub timestamp_ms: u64,
    pub ticket: CommitTicket,
    /// `inbox::payload_digest` of the stored payload.
    pub payload_digest: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: InboxSeq,
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    pub timestamp_ms: u64,
    pub expires_ms: u64,
    pub payload: Bytes,
    /// Set for a group's message.
    pub group: Option<StoredGroup>,
}

/// Where a stored group message stands in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredGroup {
    pub group_id: u64,
    pub group_seq: u64,
    /// A change to the group: the payload is the encoded `GroupEvent`.
    pub event: bool,
}

/// A group's message to append on one shard.
#[derive(Clone, Copy, Debug)]
pub struct NewGroupMessage<'a> {
    pub group_id: u64,
    /// Assigned by the group's home shard.
    pub group_seq: u64,
    pub event: bool,
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    /// The member devices homed here, ascending and distinct.
    pub recipients: &'a [InboxKey],
    /// On the home shard: the members homed elsewhere, ascending.
    pub remote_members: &'a [u64],
    /// When the home shard accepted it; `None`: now (the home shard).
    pub timestamp_ms: Option<u64>,
    pub payload: &'a [u8],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReceipt {
    pub seq: InboxSeq,
    pub kind: ReceiptKind,
    pub by: InboxKey,
    pub client_message_ids: Vec<u64>,
    pub timestamp_ms: u64,
}

/// An inbox entry read back for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredEntry {
    Message(StoredMessage),
    Receipt(StoredReceipt),
}

/// A message removed from an inbox by a device ack: what a delivered
/// receipt to its sender needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckedMessage {
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    /// A group's message (its receipts are batched per sender).
    pub group: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Entries (messages and receipts) removed. The messages among them
    /// are what `Log::acked_messages` returned just before.
    pub removed: u32,
    /// Ticket of the ack record; the ack is durable at this ticket.
    pub ticket: CommitTicket,
}

/// What recovery found; corruption is reported, never silently skipped.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub segments: u32,
    pub records: u64,
    pub messages_pending: u64,
    pub torn_tail_truncated_bytes: u64,
    pub corruptions: Vec<Corruption>,
}

/// A damaged record found by recovery or inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub segment: u32,
    pub offset: u32,
    pub reason: &'static str,
}

/// Counters for metrics and `log inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub segments: u32,
    pub bytes_on_disk: u64,
    pub records_live: u64,
    pub inboxes: u64,
    pub entries_pending: u64,
    pub expired_total: u64,
}

#[cfg(test)]
mod tests {
    use super::{Clock, SystemClock};

    #[test]
    fn the_coarse_clock_tells_the_wall_time() {
        let coarse = SystemClock.now_ms();
        let fine = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // The coarse clock lags the fine one by at most a scheduler tick.
        assert!(
            coarse <= fine + 1 && fine - coarse < 1_000,
            "{coarse} against {fine}"
        );
    }
}
