//! The `Log`: appends, inboxes, acks, expiry, reclamation and recovery of
//! one shard's segment directory.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use hdrhistogram::Histogram;

use crate::config::{Durability, StoreConfig};
use crate::ids::{ClientMessageId, InboxKey, InboxSeq, ShardId};

use super::commit::{CommitBatch, CommitShared};
use super::inbox::{payload_digest, Dedupe, DedupeValue, Entry, Inboxes};
use super::record::{
    decode, decode_checked_before, encode_inbox_seqs, encode_u64s, peek_expires_ms, GroupPart,
    InboxSeqList, Record, RecordKind, U32List, U64List,
};
use super::recovery::scan_segment;
use super::segment::{self, Segment, SegmentHeader, SyncHandle, SEGMENT_HEADER_BYTES};
use super::storage::{is_out_of_space, RealStorage, Storage};
use super::{
    AckOutcome, AckedMessage, Appended, Clock, CommitTicket, Corruption, Duplicate, LogPosition,
    LogStats, NewGroupMessage, NewMessage, NewReceipt, ReceiptKind, RecoveryReport, StoreError,
    StoredEntry, StoredGroup, StoredMessage, StoredReceipt,
};

/// Default bound of the dedupe table until `set_dedupe_capacity` is called
/// (the default of `limits.dedupe_entries_max`).
pub const DEDUPE_CAPACITY_DEFAULT: usize = 4_194_304;

/// Longest gap between two expiry sweeps over all inboxes while some entry
/// has expired but no whole segment has, ms.
const EXPIRY_SWEEP_INTERVAL_MS: u64 = 60_000;

/// Multi-recipient records remembered as CRC-checked (`Log::record_at`).
const CRC_CHECKED_SLOTS: usize = 32;

/// Inbox floors per floor record (20 bytes each).
const FLOORS_PER_RECORD_MAX: usize = 512;

/// Bookkeeping of one segment, kept apart from its mapping so recovery can
/// read the mapping while updating the counters.
#[derive(Debug)]
struct SegmentMeta {
    /// Pending inbox entries whose record is here.
    live: u64,
    /// Inboxes whose highest assigned sequence is recorded here.
    seq_holders: u64,
    records: u64,
    min_expiry_ms: u64,
    max_expiry_ms: u64,
    /// Segments holding entries that ack records here removed: while any of
    /// them exists, this segment must too, or recovery would resurrect them.
    ack_refs: Vec<u32>,
    /// Deletion waits until this ticket is durable (the floors carried out).
    delete_after: Option<u64>,
}

impl Default for SegmentMeta {
    fn default() -> Self {
        SegmentMeta {
            live: 0,
            seq_holders: 0,
            records: 0,
            min_expiry_ms: u64::MAX,
            max_expiry_ms: 0,
            ack_refs: Vec::new(),
            delete_after: None,
        }
    }
}

/// Inboxes, dedupe and per-segment counters: everything rebuilt from the log.
struct State {
    meta: BTreeMap<u32, SegmentMeta>,
    inboxes: Inboxes,
    dedupe: Dedupe,
    pending_total: u64,
    /// Set when a segment may have become deletable.
    reclaim_wanted: bool,
}

impl State {
    fn note_seq(&mut self, key: InboxKey, seq: u64, segment: u32) {
        let inbox = self.inboxes.entry(key).or_default();
        if seq <= inbox.last_seq {
            return;
        }
        if let Some(old) = self.meta.get_mut(&inbox.last_seq_segment) {
            old.seq_holders -= 1;
            if old.seq_holders == 0 && old.live == 0 {
                self.reclaim_wanted = true;
            }
        }
        inbox.last_seq = seq;
        inbox.last_seq_segment = segment;
        self.meta
            .get_mut(&segment)
            .expect("segment of record")
            .seq_holders += 1;
    }

    fn index(&mut self, key: InboxKey, entry: Entry, expires_ms: u64) {
        let inbox = self.inboxes.entry(key).or_default();
        if inbox.push(entry) {
            let meta = self.meta.get_mut(&entry.segment).expect("segment of entry");
            meta.live += 1;
            meta.min_expiry_ms = meta.min_expiry_ms.min(expires_ms);
            meta.max_expiry_ms = meta.max_expiry_ms.max(expires_ms);
            self.pending_total += 1;
        }
    }

    fn apply_ack(
        &mut self,
        ack_segment: u32,
        key: InboxKey,
        up_to: u64,
        list: U64List<'_>,
        removed: &mut Vec<Entry>,
    ) {
        let Some(inbox) = self.inboxes.get_mut(&key) else {
            return;
        };
        let start = removed.len();
        inbox.ack(up_to, list.iter(), |e| removed.push(e));
        for e in &removed[start..] {
            self.pending_total -= 1;
            if let Some(meta) = self.meta.get_mut(&e.segment) {
                meta.live -= 1;
                if meta.live == 0 {
                    self.reclaim_wanted = true;
                }
            }
            if e.segment != ack_segment {
                let refs = &mut self
                    .meta
                    .get_mut(&ack_segment)
                    .expect("ack segment")
                    .ack_refs;
                if !refs.contains(&e.segment) {
                    refs.push(e.segment);
                }
            }
        }
    }

    /// Recovers one inbox entry: its sequence, the dedupe key of the Send
    /// it came from (if any), and its index entry unless it has expired.
    fn recover_entry(
        &mut self,
        recipient: InboxKey,
        entry: Entry,
        expires_ms: u64,
        now_ms: u64,
        dedupe: Option<(InboxKey, ClientMessageId, u64, u32)>,
    ) {
        self.note_seq(recipient, entry.seq, entry.segment);
        if let Some((sender, client_message_id, timestamp_ms, payload_digest)) = dedupe {
            self.dedupe.insert(
                sender,
                client_message_id,
                DedupeValue {
                    recipient,
                    seq: InboxSeq(entry.seq),
                    timestamp_ms,
                    ticket: 0,
                    payload_digest,
                },
            );
        }
        if expires_ms > now_ms {
            self.index(recipient, entry, expires_ms);
        }
    }

    /// Applies one record found by recovery.
    fn recover(&mut self, segment: u32, offset: u32, record: &Record<'_>, now_ms: u64) {
        self.meta
            .get_mut(&segment)
            .expect("scanned segment")
            .records += 1;
        let entry = |seq: InboxSeq| Entry {
            seq: seq.0,
            segment,
            offset,
        };
        match *record {
            Record::Message {
                recipient,
                seq,
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                payload,
                ..
            } => {
                let dedupe = Some((
                    sender,
                    client_message_id,
                    timestamp_ms,
                    payload_digest(payload),
                ));
                self.recover_entry(recipient, entry(seq), expires_ms, now_ms, dedupe);
            }
            Record::Receipt {
                recipient,
                seq,
                expires_ms,
                ..
            } => self.recover_entry(recipient, entry(seq), expires_ms, now_ms, None),
            Record::MultiMessage {
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                recipients,
                group: Some(group),
                payload,
                ..
            } => {
                // The group's order: the sequence floor of its pseudo-inbox
                // (never indexed) is the last group sequence stored here.
                let key = InboxKey::group(group.group_id);
                self.note_seq(key, group.group_seq, segment);
                self.dedupe.insert(
                    key,
                    ClientMessageId(group.group_seq),
                    DedupeValue {
                        recipient: key,
                        seq: InboxSeq(group.group_seq),
                        timestamp_ms,
                        ticket: 0,
                        payload_digest: 0,
                    },
                );
                if !group.event {
                    self.dedupe.insert(
                        sender,
                        client_message_id,
                        DedupeValue {
                            recipient: key,
                            seq: InboxSeq(group.group_seq),
                            timestamp_ms,
                            ticket: 0,
                            payload_digest: payload_digest(payload),
                        },
                    );
                }
                for (recipient, seq) in recipients.iter() {
                    self.recover_entry(recipient, entry(seq), expires_ms, now_ms, None);
                }
            }
            Record::MultiMessage {
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                recipients,
                payload,
                ..
            } => {
                let digest = payload_digest(payload);
                for (i, (recipient, seq)) in recipients.iter().enumerate() {
                    // One dedupe entry per Send: the first recipient's.
                    let dedupe =
                        (i == 0).then_some((sender, client_message_id, timestamp_ms, digest));
                    self.recover_entry(recipient, entry(seq), expires_ms, now_ms, dedupe);
                }
            }
            Record::Ack { inbox, up_to, list } => {
                let mut removed = Vec::new();
                self.apply_ack(segment, inbox, up_to.0, list, &mut removed);
            }
            Record::InboxFloor { floors } => {
                for (inbox, seq) in floors.iter() {
                    self.note_seq(inbox, seq.0, segment);
                }
            }
        }
    }
}

/// What a multi-recipient append assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultiAppended {
    /// Each distinct recipient and the sequence it got, in the given order.
    pub seqs: Vec<(InboxKey, InboxSeq)>,
    pub position: LogPosition,
    pub timestamp_ms: u64,
    pub ticket: CommitTicket,
}

/// One shard's log. `!Send`: owned and used by the shard's thread only.
pub struct Log {
    dir: PathBuf,
    shard: ShardId,
    segment_size_bytes: u32,
    log_bytes_max: u64,
    durability: Durability,
    ttl_ms: u64,
    clock: Rc<dyn Clock>,
    storage: Rc<dyn Storage>,
    segments: BTreeMap<u32, Segment>,
    state: State,
    active: u32,
    /// Number of the next segment created; `None` once `u32::MAX` is used.
    next_segment_seq: Option<u32>,
    appended: u64,
    durable: u64,
    last_timestamp_ms: u64,
    dirty: Vec<Rc<SyncHandle>>,
    dir_dirty: bool,
    /// Segments unlinked whose directory entry removal is not yet synced.
    undurable_unlinks: Vec<u32>,
    dir_handle: Rc<SyncHandle>,
    commit: Rc<CommitShared>,
    latency_us: Histogram<u64>,
    expired_total: u64,
    last_sweep_ms: u64,
    scratch: Vec<u8>,
    /// Positions (segment << 32 | offset) of multi-recipient records whose
    /// CRC a read has checked, the last `CRC_CHECKED_SLOTS`.
    crc_checked: Cell<[u64; CRC_CHECKED_SLOTS]>,
    crc_checked_next: Cell<usize>,
    /// The payload of the multi-recipient record read last (its position
    /// key): a group's record is read once per member device in a row, and
    /// each delivery shares this one copy instead of copying it again.
    last_shared_payload: std::cell::RefCell<Option<(u64, Bytes)>>,
    removed_scratch: Vec<Entry>,
    reclaim_scratch: Vec<u32>,
    /// Every record before this position is durable (fsync level).
    durable_end: LogPosition,
    /// The file the next roll takes, preallocated off the shard's thread.
    spare: Spare,
}

/// The next segment's file, made ahead of its roll (`Log::spare_wanted`):
/// preallocating 64 MiB took 3-12 ms here, which a roll inside a Send
/// would otherwise hold the shard's thread for.
enum Spare {
    None,
    /// Asked for; `spare_prepared` brings the outcome.
    Preparing,
    Ready(File),
    /// The last preparation failed; asked for again after the next roll.
    Failed,
}

/// What the owner of the log creates for `Log::spare_prepared`: `path`,
/// new, with `size_bytes` allocated on the device.
#[derive(Clone, Debug)]
pub struct SpareRequest {
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// The spare's name in the log's directory: never a segment's name, so a
/// crash leaves at most this one file, removed at the next open.
pub const SPARE_FILE: &str = "next-segment.spare";

fn corrupt(position: LogPosition, reason: &'static str) -> StoreError {
    StoreError::Corrupt {
        segment: position.segment,
        offset: position.offset,
        reason,
    }
}

impl Log {
    /// Opens (creating if absent) the shard's log under `dir`, recovering
    /// inboxes and dedupe state from its segments.
    pub fn open(
        dir: &Path,
        shard: ShardId,
        config: &StoreConfig,
        clock: Rc<dyn Clock>,
    ) -> Result<(Log, RecoveryReport), StoreError> {
        Log::open_with_storage(dir, shard, config, clock, Rc::new(RealStorage))
    }

    /// `open` with an injected `Storage` (fault injection in tests).
    pub fn open_with_storage(
        dir: &Path,
        shard: ShardId,
        config: &StoreConfig,
        clock: Rc<dyn Clock>,
        storage: Rc<dyn Storage>,
    ) -> Result<(Log, RecoveryReport), StoreError> {
        let segment_size_bytes = config.segment_size_bytes;
        if segment_size_bytes < 4096 || segment_size_bytes > u32::MAX as u64 {
            return Err(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "store.segment_size_bytes must be between 4 KiB and 4 GiB",
            )));
        }
        // Keep records 8-byte aligned up to the very end of a segment.
        let segment_size_bytes = (segment_size_bytes as u32) & !7;
        std::fs::create_dir_all(dir)?;
        let dir_file = File::open(dir)?;
        // A spare holds no record; one left by a crash is made again.
        match std::fs::remove_file(dir.join(SPARE_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let listed = segment::list(dir)?;
        let mut report = RecoveryReport::default();
        let mut segments = BTreeMap::new();
        let mut state = State {
            meta: BTreeMap::new(),
            inboxes: Inboxes::default(),
            dedupe: Dedupe::new(DEDUPE_CAPACITY_DEFAULT),
            pending_total: 0,
            reclaim_wanted: true,
        };
        // A torn creation removed below; every other file stays on disk.
        let mut torn_creation = None;
        for (i, (seq, path)) in listed.iter().enumerate() {
            let is_last = i + 1 == listed.len();
            if *seq == 0 {
                // The writer numbers segments from 1, and 0 stands for "no
                // segment" in the log's bookkeeping (an inbox's last
                // sequence holder, the position before the first record).
                report.corruptions.push(Corruption {
                    segment: 0,
                    offset: 0,
                    reason: "segment number 0 is never written",
                });
                continue;
            }
            let size = std::fs::metadata(path)?.len();
            if size < SEGMENT_HEADER_BYTES as u64 * 2 || size > u32::MAX as u64 {
                // A short file is small enough to read whole: only one that
                // holds nothing but zeros can be a torn creation.
                if is_last
                    && size < SEGMENT_HEADER_BYTES as u64 * 2
                    && std::fs::read(path)?.iter().all(|&b| b == 0)
                {
                    // Created but not yet preallocated when the process died.
                    storage.remove(path)?;
                    torn_creation = Some(*seq);
                } else {
                    report.corruptions.push(Corruption {
                        segment: *seq,
                        offset: 0,
                        reason: "segment file has an impossible size",
                    });
                }
                continue;
            }
            let seg = Segment::open(*seq, path.clone())?;
            match SegmentHeader::decode(&seg.map) {
                Ok(h)
                    if h.shard == shard.0
                        && h.seq == *seq
                        && h.size_bytes == seg.map.len() as u64 =>
                {
                    state.meta.insert(*seq, SegmentMeta::default());
                    segments.insert(*seq, seg);
                }
                Ok(_) => report.corruptions.push(Corruption {
                    segment: *seq,
                    offset: 0,
                    reason: "segment header names another shard, sequence or size",
                }),
                Err(reason) => {
                    if is_last && seg.map.iter().all(|&b| b == 0) {
                        // Created but never written before a crash.
                        drop(seg);
                        storage.remove(path)?;
                        torn_creation = Some(*seq);
                    } else {
                        report.corruptions.push(Corruption {
                            segment: *seq,
                            offset: 0,
                            reason,
                        });
                    }
                }
            }
        }
        let mut removed_any = torn_creation.is_some();
        // New segments are numbered above every file left on disk, so log
        // order stays file-name order and no file's number is reused; a torn
        // creation held nothing, so its number may be. `None` when no
        // number is left: the log then appends only into its last segment.
        let next_segment_seq = match listed
            .iter()
            .map(|l| l.0)
            .rfind(|&seq| Some(seq) != torn_creation)
        {
            Some(highest) => highest.checked_add(1),
            None => Some(1),
        };

        let now_ms = clock.now_ms();
        let last_seq = segments.keys().next_back().copied();
        let mut last_timestamp_ms = 0;
        for (&seq, seg) in segments.iter_mut() {
            let outcome = scan_segment(seq, &seg.map, |offset, record| {
                if let Some(t) = record.timestamp_ms() {
                    last_timestamp_ms = last_timestamp_ms.max(t);
                }
                state.recover(seq, offset, record, now_ms);
            });
            report.records += outcome.records;
            report
                .corruptions
                .extend(outcome.corruptions.iter().copied());
            seg.write_offset = outcome.end_offset;
            if Some(seq) == last_seq {
                // Appends continue here.
                seg.advise_unwritten();
            }
            if let Some((start, end, reason)) = outcome.tail_garbage {
                if Some(seq) == last_seq {
                    // Torn tail: zero it so later appends never sit next to
                    // stale bytes, and make the zeroing durable before use.
                    seg.map[start as usize..end as usize].fill(0);
                    seg.map
                        .flush_range(start as usize, (end - start) as usize)?;
                    report.torn_tail_truncated_bytes += (end - start) as u64;
                } else {
                    report.corruptions.push(Corruption {
                        segment: seq,
                        offset: start,
                        reason,
                    });
                }
            }
        }
        report.segments = segments.len() as u32;
        report.messages_pending = state.pending_total;

        let dir_handle = Rc::new(SyncHandle::new(dir.to_path_buf(), dir_file));
        let mut log = Log {
            dir: dir.to_path_buf(),
            shard,
            segment_size_bytes,
            log_bytes_max: config.log_bytes_max,
            durability: config.durability,
            ttl_ms: config.message_ttl_s.saturating_mul(1000),
            clock,
            storage,
            segments,
            state,
            active: 0,
            next_segment_seq,
            appended: 0,
            durable: 0,
            last_timestamp_ms,
            dirty: Vec::new(),
            dir_dirty: false,
            undurable_unlinks: Vec::new(),
            dir_handle,
            commit: Rc::new(CommitShared::default()),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
            expired_total: 0,
            last_sweep_ms: 0,
            scratch: Vec::new(),
            crc_checked: Cell::new([0; CRC_CHECKED_SLOTS]),
            crc_checked_next: Cell::new(0),
            last_shared_payload: std::cell::RefCell::new(None),
            removed_scratch: Vec::new(),
            reclaim_scratch: Vec::new(),
            spare: Spare::None,
            durable_end: LogPosition {
                segment: 0,
                offset: 0,
            },
        };
        match last_seq {
            Some(seq) => log.active = seq,
            None => {
                log.roll(true)?;
                removed_any = true;
            }
        }
        if removed_any {
            log.dir_handle.file.sync_all()?;
        }
        log.dir_dirty = false;
        log.dirty.clear();
        // Everything recovered is as durable as it will get.
        log.durable_end = log.end_position();
        log.reclaim_logged();
        Ok((log, report))
    }

    /// Bounds the dedupe table (FIFO eviction beyond it).
    pub fn set_dedupe_capacity(&mut self, entries: usize) {
        self.state.dedupe.set_capacity(entries);
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    fn now_ms(&mut self) -> u64 {
        // Timestamps never go backwards within a log, so expiry is monotonic
        // along each inbox.
        self.last_timestamp_ms = self.last_timestamp_ms.max(self.clock.now_ms());
        self.last_timestamp_ms
    }

    /// A message with the same sender device and client id still known.
    pub fn find_duplicate(
        &self,
        sender: InboxKey,
        client_message_id: ClientMessageId,
    ) -> Option<Duplicate> {
        self.state
            .dedupe
            .get(sender, client_message_id)
            .map(|v| Duplicate {
                recipient: v.recipient,
                seq: v.seq,
                timestamp_ms: v.timestamp_ms,
                ticket: CommitTicket(v.ticket),
                payload_digest: v.payload_digest,
            })
    }

    fn next_seq(&mut self, inbox: InboxKey) -> InboxSeq {
        InboxSeq(self.state.inboxes.get(&inbox).map_or(0, |i| i.last_seq) + 1)
    }

    /// Assigns the recipient inbox's next sequence and appends.
    pub fn append_message(&mut self, message: &NewMessage<'_>) -> Result<Appended, StoreError> {
        let now = self.now_ms();
        let expires_ms = now.saturating_add(self.ttl_ms);
        let seq = self.next_seq(message.recipient);
        let record = Record::Message {
            recipient: message.recipient,
            seq,
            sender: message.sender,
            client_message_id: message.client_message_id,
            timestamp_ms: now,
            expires_ms,
            payload: message.payload,
        };
        let (position, ticket) = self.append(&record, false)?;
        self.state
            .note_seq(message.recipient, seq.0, position.segment);
        self.state.index(
            message.recipient,
            Entry {
                seq: seq.0,
                segment: position.segment,
                offset: position.offset,
            },
            expires_ms,
        );
        self.state.dedupe.insert(
            message.sender,
            message.client_message_id,
            DedupeValue {
                recipient: message.recipient,
                seq,
                timestamp_ms: now,
                ticket,
                payload_digest: payload_digest(message.payload),
            },
        );
        Ok(Appended {
            seq,
            position,
            timestamp_ms: now,
            ticket: CommitTicket(ticket),
        })
    }

    pub fn append_receipt(&mut self, receipt: &NewReceipt<'_>) -> Result<Appended, StoreError> {
        let now = receipt.timestamp_ms.unwrap_or_else(|| self.now_ms());
        let expires_ms = now.saturating_add(self.ttl_ms);
        let seq = self.next_seq(receipt.recipient);
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        encode_u64s(receipt.client_message_ids.iter().copied(), &mut ids);
        let record = Record::Receipt {
            recipient: receipt.recipient,
            seq,
            receipt_kind: receipt.kind as u8,
            by: receipt.by,
            timestamp_ms: now,
            expires_ms,
            client_message_ids: U64List::from_le_bytes(&ids).expect("whole u64s"),
        };
        let result = self.append(&record, false);
        self.scratch = ids;
        let (position, ticket) = result?;
        self.state
            .note_seq(receipt.recipient, seq.0, position.segment);
        self.state.index(
            receipt.recipient,
            Entry {
                seq: seq.0,
                segment: position.segment,
                offset: position.offset,
            },
            expires_ms,
        );
        Ok(Appended {
            seq,
            position,
            timestamp_ms: now,
            ticket: CommitTicket(ticket),
        })
    }

    /// Appends one payload for several inboxes (a group fan-out on this
    /// shard): one record, one entry per distinct recipient. Repeated
    /// recipients are counted once. Dedupe remembers the first recipient.
    pub fn append_multi_message(
        &mut self,
        recipients: &[InboxKey],
        sender: InboxKey,
        client_message_id: ClientMessageId,
        payload: &[u8],
    ) -> Result<MultiAppended, StoreError> {
        let mut distinct: Vec<InboxKey> = Vec::with_capacity(recipients.len());
        for &r in recipients {
            if !distinct.contains(&r) {
                distinct.push(r);
            }
        }
        self.append_multi(&distinct, None, sender, client_message_id, payload)
    }

    /// Appends one payload per inbox (the devices of one account, each
    /// payload encrypted for its device): one `DeviceMessage` record, one
    /// entry per inbox, each reading back only its own payload. The inboxes
    /// must be distinct. Dedupe remembers the first inbox and a digest of
    /// every payload in order.
    pub fn append_device_message(
        &mut self,
        parts: &[(InboxKey, &[u8])],
        sender: InboxKey,
        client_message_id: ClientMessageId,
    ) -> Result<MultiAppended, StoreError> {
        let inboxes: Vec<InboxKey> = parts.iter().map(|(k, _)| *k).collect();
        let mut lengths = Vec::with_capacity(parts.len() * 4);
        let mut payload = Vec::with_capacity(parts.iter().map(|(_, p)| p.len()).sum());
        for (_, part) in parts {
            lengths.extend_from_slice(&(part.len() as u32).to_le_bytes());
            payload.extend_from_slice(part);
        }
        self.append_multi(
            &inboxes,
            Some(&lengths),
            sender,
            client_message_id,
            &payload,
        )
    }

    /// Appends a group's message on this shard: one record, one entry per
    /// member device homed here, the group's sequence noted (the floor of
    /// `InboxKey::group`, so `group_seq_stored` answers after a restart
    /// and after the record is reclaimed). A member's message (not an
    /// event) is remembered by dedupe under the group's key.
    pub fn append_group_message(
        &mut self,
        message: &NewGroupMessage<'_>,
    ) -> Result<MultiAppended, StoreError> {
        let own_now = self.now_ms();
        let timestamp = message.timestamp_ms.unwrap_or(own_now);
        // Expiry from this log's clock, so it never goes backwards along an
        // inbox here.
        let expires_ms = own_now.max(timestamp).saturating_add(self.ttl_ms);
        let mut seqs: Vec<(InboxKey, InboxSeq)> = Vec::with_capacity(message.recipients.len());
        for &r in message.recipients {
            let seq = self.next_seq(r);
            seqs.push((r, seq));
        }
        let mut enc = Vec::with_capacity(seqs.len() * 20);
        encode_inbox_seqs(&seqs, &mut enc);
        let mut members = Vec::with_capacity(message.remote_members.len() * 8);
        encode_u64s(message.remote_members.iter().copied(), &mut members);
        let record = Record::MultiMessage {
            sender: message.sender,
            client_message_id: message.client_message_id,
            timestamp_ms: timestamp,
            expires_ms,
            recipients: InboxSeqList::from_le_bytes(&enc).expect("whole pairs"),
            lengths: None,
            group: Some(GroupPart {
                group_id: message.group_id,
                group_seq: message.group_seq,
                event: message.event,
                remote_members: U64List::from_le_bytes(&members).expect("whole u64s"),
            }),
            payload: message.payload,
        };
        let (position, ticket) = self.append(&record, false)?;
        let key = InboxKey::group(message.group_id);
        self.state
            .note_seq(key, message.group_seq, position.segment);
        // Which of the group's sequences this log holds (the floor above
        // says only the highest: after a power loss a later record can
        // survive an earlier one).
        self.state.dedupe.insert(
            key,
            ClientMessageId(message.group_seq),
            DedupeValue {
                recipient: key,
                seq: InboxSeq(message.group_seq),
                timestamp_ms: timestamp,
                ticket,
                payload_digest: 0,
            },
        );
        for &(r, seq) in &seqs {
            self.state.note_seq(r, seq.0, position.segment);
            self.state.index(
                r,
                Entry {
                    seq: seq.0,
                    segment: position.segment,
                    offset: position.offset,
                },
                expires_ms,
            );
        }
        if !message.event {
            self.state.dedupe.insert(
                message.sender,
                message.client_message_id,
                DedupeValue {
                    recipient: key,
                    seq: InboxSeq(message.group_seq),
                    timestamp_ms: timestamp,
                    ticket,
                    payload_digest: payload_digest(message.payload),
                },
            );
        }
        Ok(MultiAppended {
            seqs,
            position,
            timestamp_ms: timestamp,
            ticket: CommitTicket(ticket),
        })
    }

    /// The members homed elsewhere listed in the group message at
    /// `position` (on its group's home shard; empty elsewhere).
    pub fn group_remote_members(&self, position: LogPosition) -> Result<Vec<u64>, StoreError> {
        match self.record_at(position)? {
            Record::MultiMessage {
                group: Some(group), ..
            } => Ok(group.remote_members.iter().collect()),
            _ => Err(corrupt(position, "not a group message")),
        }
    }

    /// The commit ticket of the record holding `group`'s message
    /// `group_seq` in this log, if it is (still) known here.
    pub fn group_message_ticket(&self, group_id: u64, group_seq: u64) -> Option<CommitTicket> {
        let key = InboxKey::group(group_id);
        self.state
            .dedupe
            .get(key, ClientMessageId(group_seq))
            .map(|v| CommitTicket(v.ticket))
    }

    /// The last group sequence of `group` stored in this log (0: none).
    pub fn group_seq_stored(&self, group_id: u64) -> u64 {
        self.last_seq(InboxKey::group(group_id)).0
    }

    fn append_multi(
        &mut self,
        recipients: &[InboxKey],
        lengths: Option<&[u8]>,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        payload: &[u8],
    ) -> Result<MultiAppended, StoreError> {
        let now = self.now_ms();
        let expires_ms = now.saturating_add(self.ttl_ms);
        let mut seqs: Vec<(InboxKey, InboxSeq)> = Vec::with_capacity(recipients.len());
        for &r in recipients {
            let seq = self.next_seq(r);
            seqs.push((r, seq));
        }
        let mut enc = Vec::with_capacity(seqs.len() * 20);
        encode_inbox_seqs(&seqs, &mut enc);
        let record = Record::MultiMessage {
            sender,
            client_message_id,
            timestamp_ms: now,
            expires_ms,
            recipients: InboxSeqList::from_le_bytes(&enc).expect("whole pairs"),
            lengths: lengths.map(|l| U32List::from_le_bytes(l).expect("whole u32s")),
            group: None,
            payload,
        };
        let (position, ticket) = self.append(&record, false)?;
        for &(r, seq) in &seqs {
            self.state.note_seq(r, seq.0, position.segment);
            self.state.index(
                r,
                Entry {
                    seq: seq.0,
                    segment: position.segment,
                    offset: position.offset,
                },
                expires_ms,
            );
        }
        if let Some(&(first, seq)) = seqs.first() {
            self.state.dedupe.insert(
                sender,
                client_message_id,
                DedupeValue {
                    recipient: first,
                    seq,
                    timestamp_ms: now,
                    ticket,
                    payload_digest: payload_digest(payload),
                },
            );
        }
        Ok(MultiAppended {
            seqs,
            position,
            timestamp_ms: now,
            ticket: CommitTicket(ticket),
        })
    }

    /// Writes `record` into the active segment (rolling if it does not
    /// fit). `internal` records (acks, floors) are not refused at
    /// `log_bytes_max`: they are small and are what lets space be reclaimed.
    fn append(
        &mut self,
        record: &Record<'_>,
        internal: bool,
    ) -> Result<(LogPosition, u64), StoreError> {
        let len = record.framed_len();
        if len as u64 > (self.segment_size_bytes - SEGMENT_HEADER_BYTES) as u64 {
            return Err(StoreError::RecordTooLarge(len as u64));
        }
        let fits = {
            let active = &self.segments[&self.active];
            active.write_offset as usize + len <= active.map.len()
        };
        if !fits {
            self.roll(internal)?;
        }
        let seg = self.segments.get_mut(&self.active).expect("active segment");
        let offset = seg.write_offset as usize;
        let target = &mut seg.map[offset..offset + len];
        record.encode(seg.seq, target);
        debug_assert_eq!(
            decode(seg.seq, target),
            Ok((*record, len)),
            "record reads back as written"
        );
        seg.write_offset += len as u32;
        self.storage
            .wrote(&seg.handle.path, offset as u64, len as u64);
        if self.durability == Durability::Fsync
            && !self.dirty.iter().any(|h| Rc::ptr_eq(h, &seg.handle))
        {
            self.dirty.push(seg.handle.clone());
        }
        let position = LogPosition {
            segment: seg.seq,
            offset: offset as u32,
        };
        self.state
            .meta
            .get_mut(&seg.seq)
            .expect("active meta")
            .records += 1;
        self.appended += 1;
        if self.durability == Durability::Os {
            self.durable = self.appended;
        }
        Ok((position, self.appended))
    }

    /// Creates the next segment and makes it active.
    fn roll(&mut self, internal: bool) -> Result<(), StoreError> {
        let size = self.segment_size_bytes as u64;
        if !internal && self.log_bytes_max != 0 && self.bytes_on_disk() + size > self.log_bytes_max
        {
            return Err(StoreError::Full("log_bytes_max reached"));
        }
        let seq = self.next_segment_seq.ok_or(StoreError::Full(
            "no segment number left above the highest on disk",
        ))?;
        let header = SegmentHeader {
            shard: self.shard.0,
            seq,
            size_bytes: size,
            created_ms: self.clock.now_ms(),
        };
        let spare = match std::mem::replace(&mut self.spare, Spare::None) {
            Spare::Ready(file) => Some(file),
            // An answer still on its way stays awaited.
            Spare::Preparing => {
                self.spare = Spare::Preparing;
                None
            }
            Spare::None | Spare::Failed => None,
        };
        let created = match spare {
            Some(file) => {
                let spare_path = self.dir.join(SPARE_FILE);
                Segment::create_from_spare(&*self.storage, &self.dir, &spare_path, file, header)
                    .or_else(|error| {
                        tracing::warn!(%error, "the spare segment file was not usable; creating one");
                        Segment::create(&*self.storage, &self.dir, header)
                    })
            }
            None => Segment::create(&*self.storage, &self.dir, header),
        };
        let seg = created.map_err(|e| {
            if is_out_of_space(&e) {
                StoreError::Full("no space left on the log's file system")
            } else {
                StoreError::Io(e)
            }
        })?;
        self.next_segment_seq = seq.checked_add(1);
        if self.durability == Durability::Fsync {
            self.dirty.push(seg.handle.clone());
            self.dir_dirty = true;
        }
        self.segments.insert(seq, seg);
        self.state.meta.insert(seq, SegmentMeta::default());
        let old = std::mem::replace(&mut self.active, seq);
        if self.state.meta.get(&old).is_some_and(|m| m.live == 0) {
            self.state.reclaim_wanted = true;
        }
        Ok(())
    }

    /// A spare file for the next roll, when one should be made now: the
    /// active segment is half full, none is ready or on its way, and the
    /// log has room for another segment. The caller creates it
    /// (`segment::preallocate_spare`, off the thread) and hands the outcome
    /// to `spare_prepared`; until then the next roll creates its own file.
    pub fn spare_wanted(&mut self) -> Option<SpareRequest> {
        if !matches!(self.spare, Spare::None) || self.next_segment_seq.is_none() {
            return None;
        }
        let active = self.segments.get(&self.active)?;
        if u64::from(active.write_offset) * 2 < u64::from(self.segment_size_bytes) {
            return None;
        }
        let size_bytes = u64::from(self.segment_size_bytes);
        // The spare is on disk from now on: it must fit as the roll would.
        if self.log_bytes_max != 0 && self.bytes_on_disk() + size_bytes > self.log_bytes_max {
            return None;
        }
        self.spare = Spare::Preparing;
        Some(SpareRequest {
            path: self.dir.join(SPARE_FILE),
            size_bytes,
        })
    }

    /// The outcome of a `spare_wanted` request.
    pub fn spare_prepared(&mut self, result: std::io::Result<File>) {
        self.spare = match result {
            Ok(file) => Spare::Ready(file),
            Err(error) => {
                tracing::warn!(%error, "preparing the next segment file failed; the roll will create it");
                Spare::Failed
            }
        };
    }

    /// Whether a spare file is ready for the next roll.
    pub fn spare_ready(&self) -> bool {
        matches!(self.spare, Spare::Ready(_))
    }

    fn bytes_on_disk(&self) -> u64 {
        self.segments.values().map(|s| s.map.len() as u64).sum()
    }

    /// Removes acknowledged entries (`seq <= up_to` and each of `list`) from
    /// the inbox and appends an ack record. Unknown sequences are ignored;
    /// an ack that removes nothing writes nothing.
    pub fn ack(
        &mut self,
        inbox: InboxKey,
        up_to: InboxSeq,
        list: &[InboxSeq],
    ) -> Result<AckOutcome, StoreError> {
        let would_remove = self.state.inboxes.get(&inbox).is_some_and(|i| {
            i.pending() > 0
                && (i.iter().next().is_some_and(|e| e.seq <= up_to.0)
                    || list.iter().any(|s| i.get(s.0).is_some()))
        });
        if !would_remove {
            // Nothing changes, so nothing needs to become durable.
            return Ok(AckOutcome {
                ticket: CommitTicket(self.durable),
                ..AckOutcome::default()
            });
        }
        let mut enc = std::mem::take(&mut self.scratch);
        enc.clear();
        encode_u64s(list.iter().map(|s| s.0).filter(|&s| s > up_to.0), &mut enc);
        let record = Record::Ack {
            inbox,
            up_to,
            list: U64List::from_le_bytes(&enc).expect("whole u64s"),
        };
        let appended = self.append(&record, true);
        let (position, ticket) = match appended {
            Ok(a) => a,
            Err(e) => {
                self.scratch = enc;
                return Err(e);
            }
        };
        let mut removed = std::mem::take(&mut self.removed_scratch);
        removed.clear();
        self.state.apply_ack(
            position.segment,
            inbox,
            up_to.0,
            U64List::from_le_bytes(&enc).expect("whole u64s"),
            &mut removed,
        );
        self.scratch = enc;
        // Which of them were messages, and from whom, is
        // `acked_messages`, read before the ack by the caller that needs it.
        let outcome = AckOutcome {
            removed: removed.len() as u32,
            ticket: CommitTicket(ticket),
        };
        self.removed_scratch = removed;
        self.reclaim_logged();
        Ok(outcome)
    }

    /// The messages (not receipts) an `ack` with these arguments would
    /// remove, in inbox order, without removing them: a caller that must
    /// write what the ack causes before the ack record (delivered receipts)
    /// reads them here first.
    pub fn acked_messages(
        &self,
        inbox: InboxKey,
        up_to: InboxSeq,
        list: &[InboxSeq],
    ) -> Vec<AckedMessage> {
        let Some(i) = self.state.inboxes.get(&inbox) else {
            return Vec::new();
        };
        let mut out: Vec<AckedMessage> = i
            .iter()
            .take_while(|e| e.seq <= up_to.0)
            .filter_map(|e| self.message_of(e))
            .collect();
        let mut listed: Vec<u64> = list.iter().map(|s| s.0).filter(|&s| s > up_to.0).collect();
        listed.sort_unstable();
        listed.dedup();
        out.extend(
            listed
                .into_iter()
                .filter_map(|s| i.get(s))
                .filter_map(|e| self.message_of(&e)),
        );
        out
    }

    /// The sender and client id of the message at an inbox entry (`None`
    /// for a receipt, or a record that no longer reads back, which is
    /// logged).
    fn message_of(&self, entry: &Entry) -> Option<AckedMessage> {
        match self.record_at(entry.position()) {
            Ok(Record::Message {
                sender,
                client_message_id,
                ..
            })
            | Ok(Record::MultiMessage {
                sender,
                client_message_id,
                group: None,
                ..
            }) => Some(AckedMessage {
                sender,
                client_message_id,
                group: false,
            }),
            Ok(Record::MultiMessage {
                sender,
                client_message_id,
                group: Some(GroupPart { event: false, .. }),
                ..
            }) => Some(AckedMessage {
                sender,
                client_message_id,
                group: true,
            }),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "acked entry no longer reads back");
                None
            }
        }
    }

    fn record_at(&self, position: LogPosition) -> Result<Record<'_>, StoreError> {
        let seg = self
            .segments
            .get(&position.segment)
            .ok_or_else(|| corrupt(position, "segment no longer exists"))?;
        if position.offset < SEGMENT_HEADER_BYTES || position.offset >= seg.write_offset {
            return Err(corrupt(position, "no record at this position"));
        }
        let bytes = &seg.map[position.offset as usize..];
        // A multi-recipient record is read once per recipient (twice: to
        // deliver, and to name its sender when acked); its CRC covers 20
        // bytes per recipient, so checking it on every read would cost
        // O(recipients²) per group message. Its CRC is checked on its first
        // read and the position remembered among the last few checked.
        let key = position_key(position);
        let multi = bytes.get(8).is_some_and(|&k| {
            matches!(
                RecordKind::from_byte(k),
                Some(
                    RecordKind::MultiMessage | RecordKind::DeviceMessage | RecordKind::GroupMessage
                )
            )
        });
        let checked = multi && self.crc_checked.get().contains(&key);
        let decoded = if checked {
            decode_checked_before(seg.seq, bytes)
        } else {
            decode(seg.seq, bytes)
        };
        let record = decoded
            .map(|(r, _)| r)
            .map_err(|e| corrupt(position, e.reason()))?;
        if multi && !checked {
            let mut slots = self.crc_checked.get();
            let next = self.crc_checked_next.get();
            slots[next % slots.len()] = key;
            self.crc_checked.set(slots);
            self.crc_checked_next.set(next.wrapping_add(1));
        }
        Ok(record)
    }

    fn entry_expired(segments: &BTreeMap<u32, Segment>, entry: &Entry, now_ms: u64) -> bool {
        segments
            .get(&entry.segment)
            .and_then(|s| s.map.get(entry.offset as usize..))
            .and_then(peek_expires_ms)
            .is_none_or(|e| e <= now_ms)
    }

    /// Up to `max` pending entries of `inbox` with `seq > after`, in order.
    /// `out` is cleared first. Expired entries are skipped. Entries not yet
    /// durable are included; check `is_durable` before delivering one.
    pub fn pending_after(
        &self,
        inbox: InboxKey,
        after: InboxSeq,
        max: usize,
        out: &mut Vec<(InboxSeq, LogPosition)>,
    ) {
        out.clear();
        let Some(i) = self.state.inboxes.get(&inbox) else {
            return;
        };
        let now = self.clock.now_ms().max(self.last_timestamp_ms);
        for e in i.after(after.0) {
            if out.len() >= max {
                break;
            }
            if !Log::entry_expired(&self.segments, e, now) {
                out.push((InboxSeq(e.seq), e.position()));
            }
        }
    }

    /// Whether entry `seq` of `inbox` is still stored and unacknowledged
    /// (expired or not).
    pub fn is_pending(&self, inbox: InboxKey, seq: InboxSeq) -> bool {
        self.state
            .inboxes
            .get(&inbox)
            .is_some_and(|i| i.get(seq.0).is_some())
    }

    /// Relay inboxes (`InboxKey::relay`) holding entries: receipts stored
    /// here and not yet acknowledged by their recipient's home shard.
    pub fn relay_inboxes(&self) -> Vec<InboxKey> {
        self.state
            .inboxes
            .iter()
            .filter(|(key, inbox)| key.is_relay() && inbox.pending() > 0)
            .map(|(key, _)| *key)
            .collect()
    }

    /// Pending (unacknowledged, unexpired) entries of `inbox`.
    pub fn pending_count(&self, inbox: InboxKey) -> u64 {
        let Some(i) = self.state.inboxes.get(&inbox) else {
            return 0;
        };
        let now = self.clock.now_ms().max(self.last_timestamp_ms);
        let expired = i
            .iter()
            .take_while(|e| Log::entry_expired(&self.segments, e, now))
            .count();
        i.pending() as u64 - expired as u64
    }

    /// The highest sequence pending (unacknowledged, unexpired) in `inbox`;
    /// 0 if none is. Entries expire in sequence order, so the last is
    /// pending only if it has not expired.
    pub fn last_pending(&self, inbox: InboxKey) -> InboxSeq {
        let Some(i) = self.state.inboxes.get(&inbox) else {
            return InboxSeq(0);
        };
        let now = self.clock.now_ms().max(self.last_timestamp_ms);
        match i.last_live() {
            Some(e) if !Log::entry_expired(&self.segments, e, now) => InboxSeq(e.seq),
            _ => InboxSeq(0),
        }
    }

    /// The highest sequence assigned in `inbox` (0 if none).
    pub fn last_seq(&self, inbox: InboxKey) -> InboxSeq {
        InboxSeq(self.state.inboxes.get(&inbox).map_or(0, |i| i.last_seq))
    }

    /// Reads an entry back (payload copied out of the mapping). Returns
    /// `Ok(None)` if it expired or its segment was reclaimed. For a
    /// multi-recipient record the sequence is the first recipient's; use
    /// `read_for` to get a given inbox's.
    pub fn read(&self, position: LogPosition) -> Result<Option<StoredEntry>, StoreError> {
        self.read_inner(position, None)
    }

    /// `read` with the sequence resolved for `inbox` (multi-recipient records).
    pub fn read_for(
        &self,
        inbox: InboxKey,
        position: LogPosition,
    ) -> Result<Option<StoredEntry>, StoreError> {
        self.read_inner(position, Some(inbox))
    }

    /// The payload every recipient of the multi-recipient record at
    /// `position` shares, copied out of the mapping once per run of reads.
    fn shared_payload(&self, position: LogPosition, payload: &[u8]) -> Bytes {
        let key = position_key(position);
        let mut last = self.last_shared_payload.borrow_mut();
        if let Some((at, shared)) = &*last {
            if *at == key {
                return shared.clone();
            }
        }
        let shared = Bytes::copy_from_slice(payload);
        *last = Some((key, shared.clone()));
        shared
    }

    fn read_inner(
        &self,
        position: LogPosition,
        inbox: Option<InboxKey>,
    ) -> Result<Option<StoredEntry>, StoreError> {
        if !self.segments.contains_key(&position.segment) {
            return Ok(None);
        }
        let record = self.record_at(position)?;
        let now = self.clock.now_ms().max(self.last_timestamp_ms);
        if record.expires_ms().is_some_and(|e| e <= now) {
            return Ok(None);
        }
        Ok(Some(match record {
            Record::Message {
                seq,
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                payload,
                ..
            } => StoredEntry::Message(StoredMessage {
                seq,
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                payload: Bytes::copy_from_slice(payload),
                group: None,
            }),
            Record::MultiMessage {
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                recipients,
                lengths,
                group,
                payload,
            } => {
                let (index, seq) = match inbox {
                    None => recipients.get(0).map(|(_, s)| (0, s)),
                    Some(inbox) => recipients.find(inbox),
                }
                .ok_or_else(|| corrupt(position, "inbox is not a recipient of this record"))?;
                let part = match lengths {
                    Some(lengths) => Bytes::copy_from_slice(
                        lengths
                            .part(index)
                            .and_then(|range| payload.get(range))
                            .ok_or_else(|| corrupt(position, "payload part out of range"))?,
                    ),
                    None => self.shared_payload(position, payload),
                };
                StoredEntry::Message(StoredMessage {
                    seq,
                    sender,
                    client_message_id,
                    timestamp_ms,
                    expires_ms,
                    payload: part,
                    group: group.map(|g| StoredGroup {
                        group_id: g.group_id,
                        group_seq: g.group_seq,
                        event: g.event,
                    }),
                })
            }
            Record::Receipt {
                seq,
                receipt_kind,
                by,
                timestamp_ms,
                client_message_ids,
                ..
            } => StoredEntry::Receipt(StoredReceipt {
                seq,
                kind: if receipt_kind == 2 {
                    ReceiptKind::Read
                } else {
                    ReceiptKind::Delivered
                },
                by,
                client_message_ids: client_message_ids.iter().collect(),
                timestamp_ms,
            }),
            Record::Ack { .. } | Record::InboxFloor { .. } => {
                return Err(corrupt(position, "position is not an inbox entry"))
            }
        }))
    }

    /// Drops expired entries and reclaims segments with no live record.
    /// Returns the entries dropped.
    pub fn expire_and_reclaim(&mut self) -> Result<u64, StoreError> {
        let now = self.clock.now_ms().max(self.last_timestamp_ms);
        let whole = self
            .state
            .meta
            .values()
            .any(|m| m.live > 0 && m.max_expiry_ms <= now);
        let some = self
            .state
            .meta
            .values()
            .any(|m| m.live > 0 && m.min_expiry_ms <= now);
        let mut dropped = 0u64;
        if whole || (some && now >= self.last_sweep_ms.saturating_add(EXPIRY_SWEEP_INTERVAL_MS)) {
            self.last_sweep_ms = now;
            let Log {
                segments, state, ..
            } = self;
            let State {
                meta,
                inboxes,
                pending_total,
                reclaim_wanted,
                ..
            } = state;
            for inbox in inboxes.values_mut() {
                inbox.expire_front(
                    |e| Log::entry_expired(segments, e, now),
                    |e| {
                        dropped += 1;
                        *pending_total -= 1;
                        if let Some(m) = meta.get_mut(&e.segment) {
                            m.live -= 1;
                            if m.live == 0 {
                                *reclaim_wanted = true;
                            }
                        }
                    },
                );
            }
        }
        self.expired_total += dropped;
        self.reclaim()?;
        Ok(dropped)
    }

    fn reclaim_logged(&mut self) {
        if let Err(error) = self.reclaim() {
            tracing::warn!(%error, "log reclamation deferred");
        }
    }

    /// Deletes sealed segments with no live entry whose ack records no
    /// longer protect anything, carrying inbox floors out first.
    fn reclaim(&mut self) -> Result<(), StoreError> {
        if !self.state.reclaim_wanted {
            return Ok(());
        }
        // Whatever blocks a deletion below is lifted only by another
        // deletion (which loops here) or by a commit (which sets the flag).
        self.state.reclaim_wanted = false;
        let mut candidates = std::mem::take(&mut self.reclaim_scratch);
        let result = self.reclaim_with(&mut candidates);
        self.reclaim_scratch = candidates;
        result
    }

    fn reclaim_with(&mut self, candidates: &mut Vec<u32>) -> Result<(), StoreError> {
        loop {
            let mut progressed = false;
            candidates.clear();
            candidates.extend(
                self.state
                    .meta
                    .iter()
                    .filter(|(s, m)| **s != self.active && m.live == 0)
                    .map(|(s, _)| *s),
            );
            for &seq in candidates.iter() {
                if seq == self.active {
                    continue;
                }
                let meta = &self.state.meta[&seq];
                let blocked = meta.ack_refs.iter().any(|r| {
                    *r != seq
                        && (self.segments.contains_key(r) || self.undurable_unlinks.contains(r))
                });
                if blocked {
                    continue;
                }
                if meta.seq_holders > 0 {
                    if let Err(e) = self.carry_floors(seq) {
                        self.state.reclaim_wanted = true;
                        return Err(e);
                    }
                }
                if self.state.meta[&seq]
                    .delete_after
                    .is_some_and(|t| self.durable < t)
                {
                    continue;
                }
                self.unlink(seq)?;
                progressed = true;
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// Writes floor records for the inboxes whose highest sequence is
    /// recorded in `seq`, into the active segment.
    fn carry_floors(&mut self, seq: u32) -> Result<(), StoreError> {
        let holders: Vec<(InboxKey, InboxSeq)> = self
            .state
            .inboxes
            .iter()
            .filter(|(_, i)| i.last_seq_segment == seq)
            .map(|(k, i)| (*k, InboxSeq(i.last_seq)))
            .collect();
        let per_record = FLOORS_PER_RECORD_MAX
            .min((self.segment_size_bytes as usize - SEGMENT_HEADER_BYTES as usize - 64) / 20);
        let mut enc = Vec::new();
        for chunk in holders.chunks(per_record.max(1)) {
            enc.clear();
            encode_inbox_seqs(chunk, &mut enc);
            let record = Record::InboxFloor {
                floors: InboxSeqList::from_le_bytes(&enc).expect("whole pairs"),
            };
            let (position, _) = self.append(&record, true)?;
            for (key, _) in chunk {
                let inbox = self.state.inboxes.get_mut(key).expect("holder inbox");
                if let Some(m) = self.state.meta.get_mut(&inbox.last_seq_segment) {
                    m.seq_holders -= 1;
                }
                inbox.last_seq_segment = position.segment;
                self.state
                    .meta
                    .get_mut(&position.segment)
                    .expect("active meta")
                    .seq_holders += 1;
            }
        }
        self.state
            .meta
            .get_mut(&seq)
            .expect("carried segment")
            .delete_after = Some(self.appended);
        Ok(())
    }

    fn unlink(&mut self, seq: u32) -> Result<(), StoreError> {
        let seg = self.segments.remove(&seq).expect("segment to unlink");
        let meta = self.state.meta.remove(&seq).expect("meta of segment");
        let path = seg.handle.path.clone();
        drop(seg);
        if let Err(e) = self.storage.remove(&path) {
            // Put it back as it was (remapped) so the log stays consistent.
            let again = Segment::open(seq, path)?;
            self.segments.insert(seq, again);
            self.state.meta.insert(seq, meta);
            return Err(StoreError::Io(e));
        }
        self.dirty.retain(|h| h.path != path);
        if self.durability == Durability::Fsync {
            self.undurable_unlinks.push(seq);
            self.dir_dirty = true;
        }
        Ok(())
    }

    /// Snapshots what is written but not durable; `None` when nothing is,
    /// when the durability level is `os`, or while a batch is in flight
    /// (one fsync per segment at a time). Call it whenever
    /// `appended_ticket() > durable_ticket()`.
    pub fn begin_commit(&mut self) -> Option<CommitBatch> {
        if self.durability == Durability::Os || self.commit.in_flight.get() {
            return None;
        }
        for handle in self.commit.returned_files.borrow_mut().drain(..) {
            if !self.dirty.iter().any(|h| Rc::ptr_eq(h, &handle)) {
                self.dirty.push(handle);
            }
        }
        if self.commit.returned_dir.replace(false) {
            self.dir_dirty = true;
        }
        if self.dirty.is_empty() && !self.dir_dirty {
            return None;
        }
        let files = self
            .dirty
            .drain(..)
            .map(|h| {
                let marker = self.storage.sync_begin(&h.path);
                (h, marker)
            })
            .collect();
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir_handle.clone());
        let unlinks = if dir.is_some() {
            self.undurable_unlinks.clone()
        } else {
            Vec::new()
        };
        Some(CommitBatch::new(
            CommitTicket(self.appended),
            self.end_position(),
            files,
            dir,
            unlinks,
            self.storage.clone(),
            self.commit.clone(),
        ))
    }

    /// Whether `begin_commit` has work: records not yet durable, or
    /// segment files created or removed since the last directory sync.
    /// The shard's commit task runs while this is true.
    pub fn needs_commit(&self) -> bool {
        self.durability == Durability::Fsync
            && (self.appended > self.durable
                || !self.dirty.is_empty()
                || self.dir_dirty
                || !self.commit.returned_files.borrow().is_empty()
                || self.commit.returned_dir.get())
    }

    /// Records that `batch` is durable.
    pub fn finish_commit(&mut self, batch: CommitBatch) {
        let done = batch.finish();
        for (h, marker) in &done.files {
            self.storage.sync_done(&h.path, *marker);
        }
        if !done.unlinks.is_empty() {
            self.undurable_unlinks.retain(|s| !done.unlinks.contains(s));
            self.state.reclaim_wanted = true;
        }
        if self.state.meta.values().any(|m| m.delete_after.is_some()) {
            self.state.reclaim_wanted = true;
        }
        self.durable = self.durable.max(done.ticket.0);
        self.durable_end = self.durable_end.max(done.end);
        let _ = self
            .latency_us
            .record(done.elapsed.as_micros().clamp(1, 60_000_000) as u64);
        self.reclaim_logged();
    }

    /// Where the next record will be written: every record so far is before it.
    fn end_position(&self) -> LogPosition {
        LogPosition {
            segment: self.active,
            offset: self.segments[&self.active].write_offset,
        }
    }

    /// Whether the record at `position` is durable at the configured level.
    /// Deliver only durable entries: a record lost to a power cut before
    /// its commit gives its sequence back, and a device that already saw
    /// that sequence would drop the different message that reuses it.
    pub fn is_durable(&self, position: LogPosition) -> bool {
        self.durability == Durability::Os || position < self.durable_end
    }

    /// Every append with a ticket at or below this is durable at the
    /// configured level.
    pub fn durable_ticket(&self) -> CommitTicket {
        CommitTicket(self.durable)
    }

    /// Ticket of the latest append.
    pub fn appended_ticket(&self) -> CommitTicket {
        CommitTicket(self.appended)
    }

    /// Commit latency (begin_commit to finish_commit), µs.
    pub fn commit_latency_histogram(&self) -> &Histogram<u64> {
        &self.latency_us
    }

    /// Heap bytes of the inbox entry index (not counting per-inbox overhead).
    pub fn index_bytes(&self) -> u64 {
        self.state
            .inboxes
            .values()
            .map(|i| i.index_bytes() as u64)
            .sum()
    }

    /// Entries in the dedupe table.
    pub fn dedupe_len(&self) -> usize {
        self.state.dedupe.len()
    }

    /// Approximate heap bytes of the dedupe table.
    pub fn dedupe_bytes(&self) -> u64 {
        self.state.dedupe.heap_bytes() as u64
    }

    pub fn stats(&self) -> LogStats {
        LogStats {
            segments: self.segments.len() as u32,
            bytes_on_disk: self.bytes_on_disk(),
            records_live: self.state.meta.values().map(|m| m.live).sum(),
            inboxes: self.state.inboxes.len() as u64,
            entries_pending: self.state.pending_total,
            expired_total: self.expired_total,
        }
    }
}

/// One number for a record's position, for the small caches of records
/// read lately.
fn position_key(position: LogPosition) -> u64 {
    (u64::from(position.segment) << 32) | u64::from(position.offset)
}
