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
//! THIS FILE IS THE CONTRACT between the store and the shard. The bodies are
//! placeholders until the store lands.

use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;

use crate::config::StoreConfig;
use crate::ids::{ClientMessageId, InboxKey, InboxSeq, ShardId};

/// Wall-clock milliseconds since the Unix epoch; injected so expiry is tested
/// without waiting.
pub trait Clock {
    fn now_ms(&self) -> u64;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: InboxSeq,
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    pub timestamp_ms: u64,
    pub expires_ms: u64,
    pub payload: Bytes,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Messages (not receipts) removed, in inbox order.
    pub acked_messages: Vec<AckedMessage>,
    /// Entries (messages and receipts) removed.
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

/// Work for one group commit: the files and ranges to make durable.
pub struct CommitBatch {
    pub ticket: CommitTicket,
}

impl CommitBatch {
    /// Makes the batch durable without blocking the executor.
    /// Cancel safety: dropping the future leaves the batch unfinished; call
    /// `begin_commit` again.
    pub async fn sync(&self) -> Result<(), StoreError> {
        todo!("store")
    }
}

/// One shard's log.
pub struct Log {
    _private: (),
}

impl Log {
    /// Opens (creating if absent) the shard's log under `dir`, recovering
    /// inboxes and dedupe state from its segments.
    pub fn open(
        _dir: &Path,
        _shard: ShardId,
        _config: &StoreConfig,
        _clock: Rc<dyn Clock>,
    ) -> Result<(Log, RecoveryReport), StoreError> {
        todo!("store")
    }

    /// A message with the same sender device and client id still known.
    pub fn find_duplicate(
        &self,
        _sender: InboxKey,
        _client_message_id: ClientMessageId,
    ) -> Option<Duplicate> {
        todo!("store")
    }

    /// Assigns the recipient inbox's next sequence and appends.
    pub fn append_message(&mut self, _message: &NewMessage<'_>) -> Result<Appended, StoreError> {
        todo!("store")
    }

    pub fn append_receipt(&mut self, _receipt: &NewReceipt<'_>) -> Result<Appended, StoreError> {
        todo!("store")
    }

    /// Removes acknowledged entries (`seq <= up_to` and each of `list`) from
    /// the inbox and appends an ack record. Unknown sequences are ignored.
    pub fn ack(
        &mut self,
        _inbox: InboxKey,
        _up_to: InboxSeq,
        _list: &[InboxSeq],
    ) -> Result<AckOutcome, StoreError> {
        todo!("store")
    }

    /// Up to `max` pending entries of `inbox` with `seq > after`, in order.
    pub fn pending_after(
        &self,
        _inbox: InboxKey,
        _after: InboxSeq,
        _max: usize,
        _out: &mut Vec<(InboxSeq, LogPosition)>,
    ) {
        todo!("store")
    }

    /// Pending (unacknowledged, unexpired) entries of `inbox`.
    pub fn pending_count(&self, _inbox: InboxKey) -> u64 {
        todo!("store")
    }

    /// Reads an entry back (payload copied out of the mapping). Returns
    /// `Ok(None)` if it expired.
    pub fn read(&self, _position: LogPosition) -> Result<Option<StoredEntry>, StoreError> {
        todo!("store")
    }

    /// Drops expired entries and reclaims segments with no live record.
    pub fn expire_and_reclaim(&mut self) -> Result<u64, StoreError> {
        todo!("store")
    }

    /// Snapshots what is written but not durable; `None` when nothing is.
    pub fn begin_commit(&mut self) -> Option<CommitBatch> {
        todo!("store")
    }

    /// Records that `batch` is durable.
    pub fn finish_commit(&mut self, _batch: CommitBatch) {
        todo!("store")
    }

    /// Every append with a ticket at or below this is durable at the
    /// configured level.
    pub fn durable_ticket(&self) -> CommitTicket {
        todo!("store")
    }

    /// Ticket of the latest append.
    pub fn appended_ticket(&self) -> CommitTicket {
        todo!("store")
    }

    pub fn stats(&self) -> LogStats {
        todo!("store")
    }
}
