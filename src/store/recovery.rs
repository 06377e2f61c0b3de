//! Recovery: how the bytes of each segment are read back at start (and by
//! `log inspect`), and what is done with each kind of damage.
//!
//! | Found                                                        | Where           | Action                                                                                                                      |
//! |--------------------------------------------------------------|-----------------|-----------------------------------------------------------------------------------------------------------------------------|
//! | valid record                                                 | any segment     | applied (indexed, acked, floor raised)                                                                                      |
//! | record header of zeros followed only by zeros                | any segment     | end of that segment's records                                                                                               |
//! | invalid bytes (bad CRC, length, kind) with a valid record later | any segment  | `Corruption { segment, offset }` reported, the damaged bytes skipped, scan resumes at the next valid record (8-byte aligned) |
//! | invalid bytes up to the end (nothing valid after)            | last segment    | torn tail: zeroed and synced, counted in `torn_tail_truncated_bytes`, not reported as corruption                            |
//! | invalid bytes up to the end                                  | earlier segment | `Corruption` reported (the segment was sealed; its tail should be valid)                                                    |
//! | file numbered 0 (the writer numbers from 1; 0 is "no segment") | any file      | `Corruption { segment: 0, offset: 0 }` reported, the file is left on disk and ignored                                       |
//! | nothing but zeros, or nothing at all                         | last file       | torn creation: the file is removed                                                                                          |
//! | bad header, or another shard's, sequence's or size's header  | any other file  | `Corruption { segment, offset: 0 }` reported, the file is left on disk and ignored                                          |
//! | file shorter than 128 bytes, or longer than 4 GiB            | any other file  | `Corruption { segment, offset: 0 }` reported, the file is left on disk and ignored                                          |
//! | message or receipt past its expiry                           | any segment     | not indexed (dropped, as `expire_and_reclaim` would)                                                                        |
//! | ack record                                                   | any segment     | removes the acknowledged entries indexed so far                                                                             |
//!
//! A damaged record is never delivered, everything else is recovered, and
//! nothing is dropped without a report. Records in a damaged region may
//! have held an inbox's highest sequence; see `docs/store.md` for what
//! that means for sequence numbers.
//!
//! New segments are numbered above every file left on disk, so file-name
//! order stays log order (a removed torn creation held nothing, so its
//! number may be used again). Once a segment numbered `u32::MAX` exists no
//! number is left: a roll fails with `StoreError::Full` and the log appends
//! only into the space left in its last segment. Recovery fails only on
//! I/O errors, and with that `Full` when no segment is left to append to.

use super::record::{decode, DecodeError, Record, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};
use super::segment::SEGMENT_HEADER_BYTES;
use super::Corruption;

/// What a scan of one segment's bytes found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Offset just past the last valid record (where appends continue).
    pub end_offset: u32,
    /// Damaged regions followed by valid records.
    pub corruptions: Vec<Corruption>,
    /// Invalid bytes after the last valid record: `(start, end)`, `end`
    /// being just past the last nonzero byte.
    pub tail_garbage: Option<(u32, u32, &'static str)>,
    pub records: u64,
}

/// Scans `bytes` (a whole segment, header included) and calls `on_record`
/// with each valid record and its offset, in order. Never panics on any input.
pub fn scan_segment(
    segment: u32,
    bytes: &[u8],
    mut on_record: impl FnMut(u32, &Record<'_>),
) -> ScanOutcome {
    let mut out = ScanOutcome {
        end_offset: SEGMENT_HEADER_BYTES,
        ..ScanOutcome::default()
    };
    let mut at = SEGMENT_HEADER_BYTES as usize;
    while at < bytes.len() {
        let error = match decode(segment, &bytes[at..]) {
            Ok((record, len)) => {
                on_record(at as u32, &record);
                out.records += 1;
                at += len;
                out.end_offset = at as u32;
                continue;
            }
            Err(DecodeError::End) if all_zero(&bytes[at..]) => break,
            Err(error) => error,
        };
        // Damage: look for the next valid record on an aligned boundary.
        let bad = at;
        let mut probe = at + RECORD_ALIGN_BYTES;
        let mut resumed = false;
        while probe + RECORD_HEADER_BYTES <= bytes.len() {
            let header = &bytes[probe..probe + RECORD_HEADER_BYTES];
            if header[8] != 0 && decode(segment, &bytes[probe..]).is_ok() {
                resumed = true;
                break;
            }
            probe += RECORD_ALIGN_BYTES;
        }
        if resumed {
            out.corruptions.push(Corruption {
                segment,
                offset: bad as u32,
                reason: error.reason(),
            });
            at = probe;
        } else {
            let end = last_nonzero_end(bytes).max(bad + 1).min(bytes.len());
            out.tail_garbage = Some((bad as u32, end as u32, error.reason()));
            break;
        }
    }
    out
}

fn all_zero(bytes: &[u8]) -> bool {
    let chunks = bytes.chunks_exact(64);
    let rest = chunks.remainder();
    chunks
        .into_iter()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && rest.iter().all(|&b| b == 0)
}

fn last_nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, InboxKey, InboxSeq, UserId};
    use proptest::prelude::*;

    fn segment_with(records: usize) -> (Vec<u8>, Vec<u32>) {
        let mut bytes = vec![0u8; 4096];
        let mut at = SEGMENT_HEADER_BYTES as usize;
        let mut offsets = Vec::new();
        for i in 0..records {
            let record = Record::Ack {
                inbox: InboxKey {
                    user: UserId(i as u64 + 1),
                    device: DeviceId(1),
                },
                up_to: InboxSeq(i as u64),
                list: super::super::record::U64List::from_le_bytes(&[]).unwrap(),
            };
            let len = record.framed_len();
            record.encode(9, &mut bytes[at..at + len]);
            offsets.push(at as u32);
            at += len;
        }
        (bytes, offsets)
    }

    #[test]
    fn finds_every_record_and_the_end() {
        let (bytes, offsets) = segment_with(5);
        let mut seen = Vec::new();
        let out = scan_segment(9, &bytes, |o, _| seen.push(o));
        assert_eq!(seen, offsets);
        assert!(out.corruptions.is_empty());
        assert_eq!(out.tail_garbage, None);
    }

    #[test]
    fn reports_damaged_middle_record_and_keeps_the_rest() {
        let (mut bytes, offsets) = segment_with(5);
        bytes[offsets[2] as usize + 14] ^= 0x10;
        let mut seen = Vec::new();
        let out = scan_segment(9, &bytes, |o, _| seen.push(o));
        assert_eq!(seen, vec![offsets[0], offsets[1], offsets[3], offsets[4]]);
        assert_eq!(out.corruptions.len(), 1);
        assert_eq!(out.corruptions[0].offset, offsets[2]);
    }

    #[test]
    fn damaged_last_record_is_tail_garbage() {
        let (mut bytes, offsets) = segment_with(3);
        bytes[offsets[2] as usize + 13] ^= 1;
        let out = scan_segment(9, &bytes, |_, _| {});
        assert_eq!(out.end_offset, offsets[2]);
        assert_eq!(out.tail_garbage.map(|t| t.0), Some(offsets[2]));
        assert!(out.corruptions.is_empty());
    }

    proptest! {
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = scan_segment(1, &bytes, |_, _| {});
        }
    }
}
