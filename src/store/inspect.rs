//! `switchboard log inspect <data-dir>`: a read-only report of every shard
//! log under a directory. Files are mapped read-only and never modified, so
//! it is safe to run next to a live server (it then sees a recent state).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::ids::InboxKey;

use super::record::{Record, RecordKind};
use super::recovery::scan_segment;
use super::segment::{self, SegmentHeader};
use super::{Clock, Corruption, SystemClock};

/// Directory levels searched below the given path for log directories.
const SEARCH_DEPTH_MAX: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInspection {
    pub seq: u32,
    pub size_bytes: u64,
    /// Bytes up to the end of the last valid record.
    pub used_bytes: u64,
    pub records: u64,
    /// Inbox entries here still pending (not acked, not expired).
    pub live_entries: u64,
    pub created_ms: u64,
    pub header_error: Option<&'static str>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogInspection {
    pub dir: PathBuf,
    pub shard: Option<u32>,
    pub segments: Vec<SegmentInspection>,
    /// Records by kind, indexed by `RecordKind as usize - 1`.
    pub records_by_kind: [u64; 7],
    pub entries_live: u64,
    /// Entries acknowledged or expired whose records are still on disk.
    pub entries_dead: u64,
    pub oldest_ms: Option<u64>,
    pub newest_ms: Option<u64>,
    pub corruptions: Vec<Corruption>,
    /// Invalid bytes at the end of the last segment (recovery truncates them).
    pub torn_tail_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InspectReport {
    pub logs: Vec<LogInspection>,
}

/// Inspects the log directory at `path`, or every log directory below it
/// (a data directory with one log per shard).
pub fn inspect(path: &Path) -> io::Result<InspectReport> {
    let mut dirs = Vec::new();
    find_logs(path, 0, &mut dirs)?;
    dirs.sort();
    let now_ms = SystemClock.now_ms();
    let mut report = InspectReport::default();
    for dir in dirs {
        report.logs.push(inspect_log(&dir, now_ms)?);
    }
    Ok(report)
}

fn find_logs(path: &Path, depth: usize, out: &mut Vec<PathBuf>) -> io::Result<()> {
    if !segment::list(path)?.is_empty() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    if depth >= SEARCH_DEPTH_MAX {
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            find_logs(&entry.path(), depth + 1, out)?;
        }
    }
    Ok(())
}

fn inspect_log(dir: &Path, now_ms: u64) -> io::Result<LogInspection> {
    let listed = segment::list(dir)?;
    let mut log = LogInspection {
        dir: dir.to_path_buf(),
        shard: None,
        segments: Vec::new(),
        records_by_kind: [0; 7],
        entries_live: 0,
        entries_dead: 0,
        oldest_ms: None,
        newest_ms: None,
        corruptions: Vec::new(),
        torn_tail_bytes: 0,
    };
    // Pending entries: inbox → seq → segment.
    let mut pending: HashMap<InboxKey, BTreeMap<u64, u32>> = HashMap::new();
    let mut entries_total = 0u64;
    let last = listed.last().map(|l| l.0);
    for (seq, path) in &listed {
        let Some(map) = segment::map_read_only(path)? else {
            log.corruptions.push(Corruption {
                segment: *seq,
                offset: 0,
                reason: "empty segment file",
            });
            continue;
        };
        let mut seg = SegmentInspection {
            seq: *seq,
            size_bytes: map.len() as u64,
            used_bytes: 0,
            records: 0,
            live_entries: 0,
            created_ms: 0,
            header_error: None,
        };
        match SegmentHeader::decode(&map) {
            // Recovery ignores it too: see `Log::open`.
            Ok(_) if *seq == 0 => seg.header_error = Some("segment number 0 is never written"),
            Ok(h) if h.seq == *seq => {
                seg.created_ms = h.created_ms;
                log.shard.get_or_insert(h.shard);
            }
            Ok(_) => seg.header_error = Some("header names another sequence"),
            Err(e) => seg.header_error = Some(e),
        }
        if let Some(reason) = seg.header_error {
            log.corruptions.push(Corruption {
                segment: *seq,
                offset: 0,
                reason,
            });
            log.segments.push(seg);
            continue;
        }
        let outcome = scan_segment(*seq, &map, |_, record| {
            log.records_by_kind[record.kind() as usize - 1] += 1;
            if let Some(t) = record.timestamp_ms() {
                log.oldest_ms = Some(log.oldest_ms.map_or(t, |o| o.min(t)));
                log.newest_ms = Some(log.newest_ms.map_or(t, |n| n.max(t)));
            }
            let live = record.expires_ms().is_some_and(|e| e > now_ms);
            match *record {
                Record::Message {
                    recipient, seq: s, ..
                }
                | Record::Receipt {
                    recipient, seq: s, ..
                } => {
                    entries_total += 1;
                    if live {
                        pending.entry(recipient).or_default().insert(s.0, *seq);
                    }
                }
                Record::MultiMessage { recipients, .. } => {
                    for (r, s) in recipients.iter() {
                        entries_total += 1;
                        if live {
                            pending.entry(r).or_default().insert(s.0, *seq);
                        }
                    }
                }
                Record::Ack { inbox, up_to, list } => {
                    if let Some(p) = pending.get_mut(&inbox) {
                        // An ack up to the last sequence keeps nothing.
                        match up_to.0.checked_add(1) {
                            Some(first_kept) => *p = p.split_off(&first_kept),
                            None => p.clear(),
                        }
                        for s in list.iter() {
                            p.remove(&s);
                        }
                    }
                }
                Record::InboxFloor { .. } => {}
            }
        });
        seg.records = outcome.records;
        seg.used_bytes = outcome.end_offset as u64;
        log.corruptions.extend(outcome.corruptions.iter().copied());
        if let Some((start, end, reason)) = outcome.tail_garbage {
            if Some(*seq) == last {
                log.torn_tail_bytes += (end - start) as u64;
            } else {
                log.corruptions.push(Corruption {
                    segment: *seq,
                    offset: start,
                    reason,
                });
            }
        }
        log.segments.push(seg);
    }
    for p in pending.values() {
        for segment in p.values() {
            log.entries_live += 1;
            if let Some(s) = log.segments.iter_mut().find(|s| s.seq == *segment) {
                s.live_entries += 1;
            }
        }
    }
    log.entries_dead = entries_total - log.entries_live;
    Ok(log)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.logs.is_empty() {
            return writeln!(f, "no log segments found");
        }
        for log in &self.logs {
            write!(f, "{log}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LogInspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shard = self.shard.map_or("?".to_string(), |s| s.to_string());
        writeln!(f, "log {} (shard {shard})", self.dir.display())?;
        writeln!(
            f,
            "  segments: {}, bytes: {}",
            self.segments.len(),
            self.segments.iter().map(|s| s.size_bytes).sum::<u64>()
        )?;
        let kinds = [
            RecordKind::Message,
            RecordKind::Receipt,
            RecordKind::Ack,
            RecordKind::MultiMessage,
            RecordKind::DeviceMessage,
            RecordKind::GroupMessage,
            RecordKind::InboxFloor,
        ];
        write!(f, "  records:")?;
        for kind in kinds {
            write!(
                f,
                " {}={}",
                kind.name(),
                self.records_by_kind[kind as usize - 1]
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  entries: live={} dead={} (acked or expired)",
            self.entries_live, self.entries_dead
        )?;
        match (self.oldest_ms, self.newest_ms) {
            (Some(o), Some(n)) => {
                writeln!(f, "  timestamps (ms since epoch): oldest={o} newest={n}")?
            }
            _ => writeln!(f, "  timestamps: none")?,
        }
        writeln!(
            f,
            "  {:>10} {:>12} {:>12} {:>9} {:>9}  header",
            "segment", "size", "used", "records", "live"
        )?;
        for s in &self.segments {
            writeln!(
                f,
                "  {:>10} {:>12} {:>12} {:>9} {:>9}  {}",
                s.seq,
                s.size_bytes,
                s.used_bytes,
                s.records,
                s.live_entries,
                s.header_error.unwrap_or("ok")
            )?;
        }
        if self.torn_tail_bytes > 0 {
            writeln!(
                f,
                "  torn tail: {} bytes after the last valid record of the last segment (truncated at next start)",
                self.torn_tail_bytes
            )?;
        }
        if self.corruptions.is_empty() {
            writeln!(f, "  corruption: none")?;
        } else {
            for c in &self.corruptions {
                writeln!(
                    f,
                    "  CORRUPT segment {} offset {}: {}",
                    c.segment, c.offset, c.reason
                )?;
            }
        }
        Ok(())
    }
}
