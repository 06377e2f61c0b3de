//! The `log_recovery` target: arbitrary segment file bytes opened by the
//! store's recovery (`Log::open`) and read by `store::inspect`.
//!
//! The input is the whole content of one segment file, header included
//! (the seeds are real segments written by `Log`). The file is named by the
//! sequence its header holds (bytes 16..20; 1 if shorter), and opened as
//! shard 0 in three layouts:
//!
//! 1. alone: it is the last segment, so damage at its end is a torn tail;
//! 2. sealed: followed by a valid, empty segment, so damage at its end is
//!    corruption;
//! 3. forged, alone: the header's size and CRC and every record CRC along
//!    a walk of the record lengths are recomputed first, so mutated bodies
//!    pass the checksum and reach the code that applies records.
//!
//! Invariants checked, from the recovery table in `docs/store.md`:
//! - open succeeds (it fails only on I/O errors) and nothing panics;
//! - the report matches a model built from `record::decode` and the table
//!   alone: valid records applied; zeros after the last record are the end;
//!   invalid bytes followed by a valid record reported as corruption at
//!   their first byte, the scan resuming at the next valid record (8-byte
//!   aligned); invalid bytes up to the end a torn tail in the last segment
//!   (zeroed on disk, counted, not reported) and corruption in an earlier
//!   one; a last file of nothing but zeros (a torn creation) removed; a
//!   file numbered 0, a bad header, another shard's, sequence's or size's,
//!   or a file under 128 bytes holding any nonzero byte, reported at
//!   offset 0 and the file left untouched;
//! - new segments are numbered one above the highest file left on disk (1
//!   when none is left, so a removed torn creation's number comes back);
//!   with a file numbered `u32::MAX` there is no number left: open fails
//!   with `StoreError::Full` when it has no segment to append to, and an
//!   append that needs a new segment is refused as `Full`;
//! - every offset reported lies inside the file (nothing is read past it);
//! - no damaged record is delivered: every pending entry points at a record
//!   the model accepted, and reads back without error;
//! - appends resume after the last valid record, and a reopen finds no new
//!   corruption and no torn tail (the zeroing was made durable);
//! - `inspect` (read-only) does not modify the files, reports a file
//!   numbered 0 at offset 0, and, when every header is valid, reports the
//!   same corruption and torn tail as recovery.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use switchboard::config::{Durability, StoreConfig};
use switchboard::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, ShardId, UserId};
use switchboard::store::record::{decode, framed_len, Record, BODY_BYTES_MAX};
use switchboard::store::segment::{file_name, SegmentHeader, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC};
use switchboard::store::{Clock, Corruption, Log, NewMessage, StoreError};

/// The wall clock of the seeds: 2027-01-15, ms since the Unix epoch.
pub const SEED_EPOCH_MS: u64 = 1_800_000_000_000;
/// When the fuzz target opens the logs: a minute after the seeds were
/// written, so seeds written with a 30 s TTL hold expired records.
pub const OPEN_AT_MS: u64 = SEED_EPOCH_MS + 60_000;
/// The shard every seed was written by and every input is opened as.
pub const SHARD: ShardId = ShardId(0);
/// Size of new segments: the smallest the store accepts, so seeds stay small.
pub const SEGMENT_SIZE_BYTES: u64 = 4096;

const HEADER: usize = SEGMENT_HEADER_BYTES as usize;

/// A clock that moves only when told to, so seeds and runs are repeatable.
#[derive(Debug)]
pub struct FixedClock(pub Cell<u64>);

impl Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        self.0.get()
    }
}

/// The store configuration of the seeds and of the target.
pub fn config(message_ttl_s: u64) -> StoreConfig {
    StoreConfig {
        segment_size_bytes: SEGMENT_SIZE_BYTES,
        durability: Durability::Os,
        log_bytes_max: 0,
        message_ttl_s,
        ..StoreConfig::default()
    }
}

/// The sequence an input's header names (1 when it is too short to say).
pub fn header_seq(data: &[u8]) -> u32 {
    data.get(16..20)
        .map_or(1, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// Runs one fuzz input; panics when an invariant does not hold.
pub fn check(data: &[u8]) {
    let dir = scratch_dir();
    let seq = header_seq(data);
    run(&dir, &[(seq, data.to_vec())]);
    // Nothing can follow a segment numbered `u32::MAX`.
    if let Some(next) = seq.checked_add(1) {
        run(&dir, &[(seq, data.to_vec()), (next, empty_segment(next))]);
    }
    let forged = forge(data);
    if forged != data {
        run(&dir, &[(seq, forged)]);
    }
}

/// A directory of this process, emptied before each use. On tmpfs when
/// there is one: recovery msyncs a zeroed tail and fsyncs the directory,
/// which cost milliseconds on a disk and nothing in memory.
/// `SWITCHBOARD_FUZZ_TMPDIR` overrides the choice.
fn scratch_dir() -> PathBuf {
    let base = match std::env::var_os("SWITCHBOARD_FUZZ_TMPDIR") {
        Some(dir) => PathBuf::from(dir),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    base.join(format!("switchboard-fuzz-recovery-{}", std::process::id()))
}

/// A valid segment of `SEGMENT_SIZE_BYTES` holding only its header.
pub fn empty_segment(seq: u32) -> Vec<u8> {
    let mut bytes = vec![0u8; SEGMENT_SIZE_BYTES as usize];
    let header = SegmentHeader {
        shard: SHARD.0,
        seq,
        size_bytes: SEGMENT_SIZE_BYTES,
        created_ms: SEED_EPOCH_MS,
    };
    bytes[..HEADER].copy_from_slice(&header.encode());
    bytes
}

/// Makes the header (if it has the magic) and every record along a walk of
/// the length fields pass their checksums, so the fuzzer's changes to
/// record bodies reach the code that applies them.
pub fn forge(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    if out.len() < HEADER || out[..8] != SEGMENT_MAGIC {
        return out;
    }
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let header = SegmentHeader {
        shard: le32(&out, 12),
        seq: le32(&out, 16),
        size_bytes: out.len() as u64,
        created_ms: le64(&out, 32),
    };
    out[..HEADER].copy_from_slice(&header.encode());
    let mut at = HEADER;
    while at + 12 <= out.len() {
        let body_bytes = le32(&out, at) as usize;
        if body_bytes == 0
            || body_bytes > BODY_BYTES_MAX as usize
            || at + 12 + body_bytes > out.len()
        {
            at += 8;
            continue;
        }
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&header.seq.to_le_bytes()),
            &out[at + 8..at + 12 + body_bytes],
        );
        out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at += framed_len(body_bytes);
    }
    out
}

/// What the recovery table says one segment's bytes hold.
#[derive(Debug, Default)]
struct SegmentModel {
    /// Valid records: offset and framed length.
    records: Vec<(u32, usize)>,
    /// Damaged regions followed by a valid record.
    corruptions: Vec<Corruption>,
    /// Just past the last valid record.
    end_offset: u32,
    /// Invalid bytes up to the end: start, just past the last nonzero byte,
    /// and why the first record there is invalid.
    tail: Option<(u32, u32, &'static str)>,
}

/// The table's rules applied with nothing but `record::decode`.
fn model_segment(seq: u32, bytes: &[u8]) -> SegmentModel {
    let mut model = SegmentModel {
        end_offset: HEADER as u32,
        ..SegmentModel::default()
    };
    let mut at = HEADER;
    while at < bytes.len() {
        let error = match decode(seq, &bytes[at..]) {
            Ok((_, length)) => {
                model.records.push((at as u32, length));
                at += length;
                model.end_offset = at as u32;
                continue;
            }
            Err(error) => error,
        };
        if bytes[at..].iter().all(|&b| b == 0) {
            break;
        }
        let next_valid = (at + 8..bytes.len())
            .step_by(8)
            .find(|&probe| decode(seq, &bytes[probe..]).is_ok());
        match next_valid {
            Some(probe) => {
                model.corruptions.push(Corruption {
                    segment: seq,
                    offset: at as u32,
                    reason: error.reason(),
                });
                at = probe;
            }
            None => {
                let end = bytes.iter().rposition(|&b| b != 0).expect("nonzero") + 1;
                model.tail = Some((at as u32, end as u32, error.reason()));
                break;
            }
        }
    }
    model
}

/// What opening a directory of segment files must do.
#[derive(Debug, Default)]
struct LogModel {
    /// Files a torn creation left: removed by open.
    removed: Vec<u32>,
    /// Files numbered 0 or with a bad header: reported, left untouched.
    ignored: Vec<u32>,
    /// The number of the next segment created: one above the highest file
    /// left on disk, 1 when none is left, `None` when `u32::MAX` is taken.
    next_segment: Option<u32>,
    /// Segments recovered, by sequence.
    segments: BTreeMap<u32, SegmentModel>,
    corruptions: Vec<Corruption>,
    records: u64,
    torn_tail_bytes: u64,
}

fn model_log(files: &[(u32, Vec<u8>)]) -> LogModel {
    let mut model = LogModel::default();
    let last_on_disk = files.iter().map(|f| f.0).max();
    for (seq, bytes) in files {
        let header = SegmentHeader::decode(bytes);
        // The writer numbers segments from 1; 0 means "no segment".
        let valid = *seq != 0
            && bytes.len() >= 2 * HEADER
            && header.is_ok_and(|h| {
                h.shard == SHARD.0 && h.seq == *seq && h.size_bytes == bytes.len() as u64
            });
        if valid {
            model.segments.insert(*seq, model_segment(*seq, bytes));
        } else if *seq != 0 && Some(*seq) == last_on_disk && bytes.iter().all(|&b| b == 0) {
            // A torn creation: nothing but zeros (or nothing at all). A
            // short file holding any other byte is reported and kept.
            model.removed.push(*seq);
        } else {
            model.ignored.push(*seq);
            model.corruptions.push(Corruption {
                segment: *seq,
                offset: 0,
                reason: "",
            });
        }
    }
    model.next_segment = match files
        .iter()
        .map(|f| f.0)
        .filter(|seq| !model.removed.contains(seq))
        .max()
    {
        Some(highest) => highest.checked_add(1),
        None => Some(1),
    };
    let last_valid = model.segments.keys().next_back().copied();
    for (seq, segment) in &model.segments {
        model.records += segment.records.len() as u64;
        model
            .corruptions
            .extend(segment.corruptions.iter().copied());
        if let Some((start, end, reason)) = segment.tail {
            if Some(*seq) == last_valid {
                model.torn_tail_bytes += (end - start) as u64;
            } else {
                model.corruptions.push(Corruption {
                    segment: *seq,
                    offset: start,
                    reason,
                });
            }
        }
    }
    model
}

/// Corruptions in a stable order; header reports compare by position only
/// (the table does not fix their wording).
fn normalised(corruptions: &[Corruption]) -> Vec<(u32, u32, &'static str)> {
    let mut out: Vec<_> = corruptions
        .iter()
        .map(|c| {
            (
                c.segment,
                c.offset,
                if c.offset == 0 { "" } else { c.reason },
            )
        })
        .collect();
    out.sort();
    out
}

/// Where damage was reported, in order.
fn positions(corruptions: &[Corruption]) -> Vec<(u32, u32)> {
    let mut out: Vec<_> = corruptions.iter().map(|c| (c.segment, c.offset)).collect();
    out.sort();
    out
}

fn segment_path(dir: &Path, seq: u32) -> PathBuf {
    dir.join(file_name(seq))
}

/// Every inbox a valid record names.
fn inboxes_named(model: &LogModel, files: &[(u32, Vec<u8>)]) -> BTreeSet<InboxKey> {
    let mut keys = BTreeSet::new();
    for (seq, bytes) in files {
        let Some(segment) = model.segments.get(seq) else {
            continue;
        };
        for &(offset, _) in &segment.records {
            let (record, _) = decode(*seq, &bytes[offset as usize..]).expect("modelled valid");
            match record {
                Record::Message { recipient, .. } | Record::Receipt { recipient, .. } => {
                    keys.insert(recipient);
                }
                Record::MultiMessage { recipients, .. } => {
                    keys.extend(recipients.iter().map(|(k, _)| k));
                }
                Record::Ack { inbox, .. } => {
                    keys.insert(inbox);
                }
                Record::InboxFloor { floors } => keys.extend(floors.iter().map(|(k, _)| k)),
            }
        }
    }
    keys
}

/// Opens `files` as a log and checks everything the module doc lists.
fn run(dir: &Path, files: &[(u32, Vec<u8>)]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("scratch directory");
    for (seq, bytes) in files {
        std::fs::write(segment_path(dir, *seq), bytes).expect("write segment");
    }
    let model = model_log(files);

    // The read-only report first: it must leave every byte as it was.
    let inspected = switchboard::store::inspect(dir).expect("inspect");
    for (seq, bytes) in files {
        let after = std::fs::read(segment_path(dir, *seq)).expect("read segment");
        assert!(&after == bytes, "inspect modified segment {seq}");
    }
    let [log] = &inspected.logs[..] else {
        panic!("inspect found {} logs, not 1", inspected.logs.len());
    };
    if files.iter().any(|f| f.0 == 0) {
        assert!(
            log.corruptions
                .iter()
                .any(|c| (c.segment, c.offset) == (0, 0)),
            "inspect did not report segment 0: {:?}",
            log.corruptions
        );
    }
    let headers_valid = model.removed.is_empty() && model.ignored.is_empty();
    if headers_valid {
        assert_eq!(
            normalised(&log.corruptions),
            normalised(&model.corruptions),
            "inspect's corruption"
        );
        assert_eq!(log.torn_tail_bytes, model.torn_tail_bytes, "inspect's tail");
        assert_eq!(log.records_by_kind.iter().sum::<u64>(), model.records);
    }

    let clock = Rc::new(FixedClock(Cell::new(OPEN_AT_MS)));
    let config = config(3_600);
    let opened = Log::open(dir, SHARD, &config, clock.clone());
    if model.segments.is_empty() && model.next_segment.is_none() {
        // Nothing recovered to append to, and no number left for a segment.
        match opened {
            Err(StoreError::Full(_)) => {}
            Ok(_) => panic!("open made a segment with u32::MAX on disk"),
            Err(e) => panic!("open failed with {e}, not Full"),
        }
        for (seq, bytes) in files {
            let path = segment_path(dir, *seq);
            if model.removed.contains(seq) {
                assert!(!path.exists(), "torn creation {seq} not removed");
            } else {
                let after = std::fs::read(&path).expect("ignored segment left on disk");
                assert!(&after == bytes, "ignored segment {seq} modified");
            }
        }
        return;
    }
    let (mut log, report) =
        opened.unwrap_or_else(|e| panic!("open failed on damaged data, not I/O: {e}"));

    // The report is the model's.
    assert_eq!(report.records, model.records, "records applied");
    assert_eq!(
        normalised(&report.corruptions),
        normalised(&model.corruptions),
        "corruption reported"
    );
    assert_eq!(report.torn_tail_truncated_bytes, model.torn_tail_bytes);
    assert_eq!(report.segments as usize, model.segments.len());
    for c in &report.corruptions {
        let (_, bytes) = files.iter().find(|f| f.0 == c.segment).expect("a file");
        assert!(
            c.offset == 0 || (c.offset as usize) < bytes.len(),
            "{c:?} past the end of a file of {} bytes",
            bytes.len()
        );
    }

    // With no segment recovered, open creates one, numbered above every
    // file left on disk.
    let last_valid = model.segments.keys().next_back().copied();
    let active = last_valid.unwrap_or_else(|| {
        let created = model.next_segment.expect("checked above");
        let bytes = std::fs::read(segment_path(dir, created))
            .unwrap_or_else(|e| panic!("new segment {created} not created: {e}"));
        let header = SegmentHeader::decode(&bytes)
            .unwrap_or_else(|e| panic!("new segment {created}'s header: {e}"));
        assert_eq!(
            (header.shard, header.seq, bytes.len() as u64),
            (SHARD.0, created, SEGMENT_SIZE_BYTES),
            "new segment {created}'s header"
        );
        created
    });
    // The number a roll takes next.
    let next_after_open = match last_valid {
        Some(_) => model.next_segment,
        None => active.checked_add(1),
    };

    // The files on disk: removed, untouched, or tail zeroed.
    for (seq, bytes) in files {
        let path = segment_path(dir, *seq);
        if model.removed.contains(seq) {
            // Unless its number came back for the segment open created.
            assert!(
                *seq == active || !path.exists(),
                "torn creation {seq} not removed"
            );
            continue;
        }
        if model.ignored.contains(seq) {
            let after = std::fs::read(&path).expect("ignored segment left on disk");
            assert!(&after == bytes, "ignored segment {seq} modified");
            continue;
        }
        let segment = &model.segments[seq];
        let Ok(after) = std::fs::read(&path) else {
            // Reclaimed: only a sealed segment with nothing live may go.
            assert_ne!(Some(*seq), last_valid, "active segment removed");
            continue;
        };
        let end = segment.end_offset as usize;
        assert!(
            after[..end] == bytes[..end],
            "valid records of {seq} changed"
        );
        if Some(*seq) == last_valid {
            // Past the last record: zeros, or records open itself appended
            // (inbox floors carried out of reclaimed segments).
            let now = model_segment(*seq, &after);
            // Zeroing the tail may cut into bytes a damaged record claimed,
            // so only where damage is reported must stay the same.
            assert_eq!(
                positions(&now.corruptions),
                positions(&segment.corruptions),
                "active segment {seq}"
            );
            assert_eq!(now.tail, None, "torn tail of {seq} left on disk");
        } else {
            assert!(after == *bytes, "sealed segment {seq} modified");
        }
    }

    // No damaged record is delivered.
    let keys = inboxes_named(&model, files);
    let mut pending = Vec::new();
    for key in &keys {
        log.pending_after(*key, InboxSeq(0), usize::MAX, &mut pending);
        for &(seq, position) in &pending {
            let segment = model
                .segments
                .get(&position.segment)
                .unwrap_or_else(|| panic!("{key} #{seq} in unrecovered segment {position:?}"));
            assert!(
                segment.records.iter().any(|r| r.0 == position.offset),
                "{key} #{seq} at {position:?}, not a valid record"
            );
            if let Err(e) = log.read_for(*key, position) {
                panic!("{key} #{seq} at {position:?} does not read back: {e}");
            }
        }
    }

    // Appends resume after the last valid record.
    let writer = InboxKey {
        user: UserId(u64::MAX - 1),
        device: DeviceId(1),
    };
    let payload = b"appended after recovery";
    let appended = match log.append_message(&NewMessage {
        recipient: writer,
        sender: writer,
        client_message_id: ClientMessageId(u64::MAX),
        payload,
    }) {
        Ok(appended) => {
            let at = appended.position.segment;
            assert!(
                at == active || Some(at) == next_after_open,
                "appended to segment {at}, not {active} or {next_after_open:?}"
            );
            Some(appended)
        }
        // No number left for the segment the append needed.
        Err(StoreError::Full(reason)) => {
            assert!(
                segment_path(dir, u32::MAX).exists(),
                "append refused as full ({reason}) with no segment {} on disk",
                u32::MAX
            );
            None
        }
        Err(e) => panic!("append after recovery: {e}"),
    };
    if files.len() == 1 {
        // Right after the last valid record when it fits, else at the
        // start of a new segment, else (no number left) nowhere. A message
        // body is 60 bytes plus the payload.
        let framed = framed_len(60 + payload.len());
        let expected = match last_valid {
            Some(seq) => {
                let end = model.segments[&seq].end_offset;
                if end as usize + framed <= files[0].1.len() {
                    Some((seq, end))
                } else {
                    next_after_open.map(|n| (n, SEGMENT_HEADER_BYTES))
                }
            }
            None => Some((active, SEGMENT_HEADER_BYTES)),
        };
        assert_eq!(
            appended
                .as_ref()
                .map(|a| (a.position.segment, a.position.offset)),
            expected,
            "append position"
        );
    }
    drop(log);

    // A reopen finds the appended record and nothing new wrong.
    let (log, again) = Log::open(dir, SHARD, &config, clock)
        .unwrap_or_else(|e| panic!("reopen after recovery failed: {e}"));
    assert_eq!(again.torn_tail_truncated_bytes, 0, "torn tail came back");
    let before = positions(&report.corruptions);
    for c in positions(&again.corruptions) {
        assert!(before.contains(&c), "new corruption {c:?} after reopen");
    }
    if let Some(appended) = appended {
        assert!(log.last_seq(writer) >= appended.seq, "appended record lost");
    }
}
