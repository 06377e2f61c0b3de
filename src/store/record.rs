//! The log's record format, sans-IO: encoding into a byte slice and decoding
//! from one, with no file, mapping or clock in sight.
//!
//! Every record is framed as
//!
//! ```text
//! offset size field
//!      0    4 body_length   u32 LE, bytes of body after the 12-byte header
//!      4    4 crc32c        u32 LE, CRC32C of (segment sequence u32 LE ++ bytes 8..12+body_length)
//!      8    1 kind          1 message, 2 receipt, 3 device ack, 4 multi-recipient message, 5 inbox floor
//!      9    1 version       1
//!     10    2 reserved      0
//!     12    n body          kind-specific, little-endian, see `docs/store.md`
//! ```
//!
//! and padded with zeros to a multiple of 8 bytes, so a scan that lost its
//! place can resynchronise on 8-byte boundaries. The CRC is seeded with the
//! sequence number of the segment the record was written into, so bytes
//! left over from another segment (a recycled file, a stale copy) can never
//! pass as a valid record of this one. A header of all zeros is the end of
//! the written part of a preallocated segment.
//!
//! Decoding never panics and never allocates: variable-length lists are
//! returned as borrowed views (`SeqList`, `IdList`, `Recipients`).

use crate::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, UserId};

/// Bytes of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 12;
/// Records start and end on multiples of this.
pub const RECORD_ALIGN_BYTES: usize = 8;
/// The only record version this code writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// Largest body a header may announce; anything above is treated as damage
/// before any arithmetic is done with it.
pub const BODY_BYTES_MAX: u32 = 1 << 30;

/// Kind byte of each record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    Message = 1,
    Receipt = 2,
    Ack = 3,
    MultiMessage = 4,
    InboxFloor = 5,
    DeviceMessage = 6,
    GroupMessage = 7,
}

impl RecordKind {
    pub fn from_byte(byte: u8) -> Option<RecordKind> {
        Some(match byte {
            1 => RecordKind::Message,
            2 => RecordKind::Receipt,
            3 => RecordKind::Ack,
            4 => RecordKind::MultiMessage,
            5 => RecordKind::InboxFloor,
            6 => RecordKind::DeviceMessage,
            7 => RecordKind::GroupMessage,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Message => "message",
            RecordKind::Receipt => "receipt",
            RecordKind::Ack => "ack",
            RecordKind::MultiMessage => "multi-message",
            RecordKind::InboxFloor => "inbox-floor",
            RecordKind::DeviceMessage => "device-message",
            RecordKind::GroupMessage => "group-message",
        }
    }
}

/// Why bytes are not a valid record. `Copy`, static, never allocates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A header of all zeros: the end of the written part of a segment.
    End,
    /// Fewer bytes than the header announces.
    Truncated,
    /// The announced body length is impossible.
    BadLength,
    /// The CRC does not match (damage, a torn write, or another segment's bytes).
    BadCrc,
    BadKind,
    BadVersion,
    /// CRC is valid but the body does not parse (a bug or a newer writer).
    Malformed,
}

impl DecodeError {
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::End => "end of log",
            DecodeError::Truncated => "record runs past the end of the segment",
            DecodeError::BadLength => "impossible record length",
            DecodeError::BadCrc => "checksum mismatch",
            DecodeError::BadKind => "unknown record kind",
            DecodeError::BadVersion => "unknown record version",
            DecodeError::Malformed => "record body does not parse",
        }
    }
}

/// A borrowed list of little-endian u64 values (sequences or client ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U64List<'a> {
    bytes: &'a [u8],
}

impl<'a> U64List<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / 8
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunk of 8")))
    }
}

/// A borrowed list of (recipient inbox, sequence) pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxSeqList<'a> {
    bytes: &'a [u8],
}

const INBOX_SEQ_BYTES: usize = 20;

impl<'a> InboxSeqList<'a> {
    pub fn len(&self) -> usize {
        self.bytes.len() / INBOX_SEQ_BYTES
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// The pair at `index`.
    pub fn get(&self, index: usize) -> Option<(InboxKey, InboxSeq)> {
        let at = index.checked_mul(INBOX_SEQ_BYTES)?;
        let c = self.bytes.get(at..at + INBOX_SEQ_BYTES)?;
        let mut r = Reader { bytes: c, at: 0 };
        Some((r.inbox()?, InboxSeq(r.u64()?)))
    }

    /// The index and sequence of `inbox`: a binary search (the writers
    /// list recipients ascending), then a scan for a list that is not.
    pub fn find(&self, inbox: InboxKey) -> Option<(usize, InboxSeq)> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (key, seq) = self.get(mid)?;
            match key.cmp(&inbox) {
                std::cmp::Ordering::Equal => return Some((mid, seq)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        self.iter()
            .enumerate()
            .find(|(_, (k, _))| *k == inbox)
            .map(|(n, (_, s))| (n, s))
    }

    pub fn iter(&self) -> impl Iterator<Item = (InboxKey, InboxSeq)> + 'a {
        self.bytes.chunks_exact(INBOX_SEQ_BYTES).map(|c| {
            let mut r = Reader { bytes: c, at: 0 };
            let inbox = r.inbox().expect("chunk of 20");
            let seq = r.u64().expect("chunk of 20");
            (inbox, InboxSeq(seq))
        })
    }
}

/// A decoded (or to-be-encoded) record. Slices borrow the segment bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Message {
        recipient: InboxKey,
        seq: InboxSeq,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        timestamp_ms: u64,
        expires_ms: u64,
        payload: &'a [u8],
    },
    Receipt {
        recipient: InboxKey,
        seq: InboxSeq,
        /// 1 delivered, 2 read.
        receipt_kind: u8,
        by: InboxKey,
        timestamp_ms: u64,
        expires_ms: u64,
        client_message_ids: U64List<'a>,
    },
    Ack {
        inbox: InboxKey,
        up_to: InboxSeq,
        list: U64List<'a>,
    },
    /// One payload referenced by many inboxes (group fan-out on one shard),
    /// or, with `lengths` (kind `DeviceMessage`), one payload per
    /// recipient: `payload` holds them back to back, recipient `i`'s is
    /// `lengths[i]` bytes long (the devices of one account, each encrypted
    /// for its device). With `group` (kind `GroupMessage`), a group's
    /// message as stored on one shard: the member devices homed there are
    /// the recipients.
    MultiMessage {
        sender: InboxKey,
        client_message_id: ClientMessageId,
        timestamp_ms: u64,
        expires_ms: u64,
        recipients: InboxSeqList<'a>,
        lengths: Option<U32List<'a>>,
        group: Option<GroupPart<'a>>,
        payload: &'a [u8],
    },
    /// The last sequence assigned in each listed inbox, carried forward so a
    /// sequence never goes backwards after the records that held it are gone.
    InboxFloor { floors: InboxSeqList<'a> },
}

/// What a `GroupMessage` record adds to a multi-recipient one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupPart<'a> {
    pub group_id: u64,
    /// The message's place in the group's order (from 1).
    pub group_seq: u64,
    /// A change to the group (the payload is the encoded event), not a
    /// member's message.
    pub event: bool,
    /// On the group's home shard: the members homed on other shards, to
    /// which the message is forwarded (ascending user ids); empty
    /// elsewhere.
    pub remote_members: U64List<'a>,
}

/// Little-endian u32s, one per recipient of a `DeviceMessage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U32List<'a> {
    bytes: &'a [u8],
}

impl<'a> U32List<'a> {
    /// Wraps already little-endian-encoded values (`len % 4 == 0`).
    pub fn from_le_bytes(bytes: &'a [u8]) -> Option<U32List<'a>> {
        bytes.len().is_multiple_of(4).then_some(U32List { bytes })
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
    }

    /// The byte range of part `index` of a payload cut by these lengths.
    pub fn part(&self, index: usize) -> Option<std::ops::Range<usize>> {
        let start: usize = self.iter().take(index).map(|l| l as usize).sum();
        let len = self.iter().nth(index)? as usize;
        Some(start..start + len)
    }
}

/// Raw list encodings for `Record` construction by the writer.
impl<'a> U64List<'a> {
    /// Wraps already little-endian-encoded values (`len % 8 == 0`).
    pub fn from_le_bytes(bytes: &'a [u8]) -> Option<U64List<'a>> {
        bytes.len().is_multiple_of(8).then_some(U64List { bytes })
    }
}

impl<'a> InboxSeqList<'a> {
    /// Wraps already encoded pairs (`len % 20 == 0`).
    pub fn from_le_bytes(bytes: &'a [u8]) -> Option<InboxSeqList<'a>> {
        bytes
            .len()
            .is_multiple_of(INBOX_SEQ_BYTES)
            .then_some(InboxSeqList { bytes })
    }
}

/// Encodes `pairs` for an `InboxSeqList`.
pub fn encode_inbox_seqs(pairs: &[(InboxKey, InboxSeq)], out: &mut Vec<u8>) {
    for (inbox, seq) in pairs {
        put_inbox(out, *inbox);
        out.extend_from_slice(&seq.0.to_le_bytes());
    }
}

/// Encodes `values` for a `U64List`.
pub fn encode_u64s(values: impl Iterator<Item = u64>, out: &mut Vec<u8>) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_inbox(out: &mut Vec<u8>, inbox: InboxKey) {
    out.extend_from_slice(&inbox.user.0.to_le_bytes());
    out.extend_from_slice(&inbox.device.0.to_le_bytes());
}

/// Bytes `body_length` rounds up to once framed and aligned.
pub fn framed_len(body_length: usize) -> usize {
    (RECORD_HEADER_BYTES + body_length).div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

impl<'a> Record<'a> {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Message { .. } => RecordKind::Message,
            Record::Receipt { .. } => RecordKind::Receipt,
            Record::Ack { .. } => RecordKind::Ack,
            Record::MultiMessage { group: Some(_), .. } => RecordKind::GroupMessage,
            Record::MultiMessage { lengths: None, .. } => RecordKind::MultiMessage,
            Record::MultiMessage {
                lengths: Some(_), ..
            } => RecordKind::DeviceMessage,
            Record::InboxFloor { .. } => RecordKind::InboxFloor,
        }
    }

    /// Body bytes (without header and padding).
    pub fn body_len(&self) -> usize {
        match self {
            Record::Message { payload, .. } => 12 + 8 + 12 + 8 + 8 + 8 + 4 + payload.len(),
            Record::Receipt {
                client_message_ids, ..
            } => 12 + 8 + 1 + 12 + 8 + 8 + 4 + client_message_ids.bytes.len(),
            Record::Ack { list, .. } => 12 + 8 + 4 + list.bytes.len(),
            Record::MultiMessage {
                recipients,
                lengths,
                group,
                payload,
                ..
            } => {
                12 + 8
                    + 8
                    + 8
                    + group.map_or(0, |g| 8 + 8 + 1 + 4 + g.remote_members.bytes.len())
                    + 4
                    + recipients.bytes.len()
                    + lengths.map_or(0, |l| l.bytes.len())
                    + 4
                    + payload.len()
            }
            Record::InboxFloor { floors } => 4 + floors.bytes.len(),
        }
    }

    /// Bytes the record occupies in a segment, header and padding included.
    pub fn framed_len(&self) -> usize {
        framed_len(self.body_len())
    }

    /// Time after which the record's entries are dropped, if it has entries.
    pub fn expires_ms(&self) -> Option<u64> {
        match self {
            Record::Message { expires_ms, .. }
            | Record::Receipt { expires_ms, .. }
            | Record::MultiMessage { expires_ms, .. } => Some(*expires_ms),
            Record::Ack { .. } | Record::InboxFloor { .. } => None,
        }
    }

    pub fn timestamp_ms(&self) -> Option<u64> {
        match self {
            Record::Message { timestamp_ms, .. }
            | Record::Receipt { timestamp_ms, .. }
            | Record::MultiMessage { timestamp_ms, .. } => Some(*timestamp_ms),
            Record::Ack { .. } | Record::InboxFloor { .. } => None,
        }
    }

    /// Writes the framed record into `out`, which must be exactly
    /// `self.framed_len()` bytes (zeroed or not). Returns the bytes written.
    pub fn encode(&self, segment: u32, out: &mut [u8]) -> usize {
        let total = self.framed_len();
        assert_eq!(out.len(), total, "encode target has the framed length");
        let body_len = self.body_len();
        let mut w = Writer {
            out: &mut out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body_len],
            at: 0,
        };
        match *self {
            Record::Message {
                recipient,
                seq,
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                payload,
            } => {
                w.inbox(recipient);
                w.u64(seq.0);
                w.inbox(sender);
                w.u64(client_message_id.0);
                w.u64(timestamp_ms);
                w.u64(expires_ms);
                w.u32(payload.len() as u32);
                w.bytes(payload);
            }
            Record::Receipt {
                recipient,
                seq,
                receipt_kind,
                by,
                timestamp_ms,
                expires_ms,
                client_message_ids,
            } => {
                w.inbox(recipient);
                w.u64(seq.0);
                w.bytes(&[receipt_kind]);
                w.inbox(by);
                w.u64(timestamp_ms);
                w.u64(expires_ms);
                w.u32(client_message_ids.len() as u32);
                w.bytes(client_message_ids.bytes);
            }
            Record::Ack { inbox, up_to, list } => {
                w.inbox(inbox);
                w.u64(up_to.0);
                w.u32(list.len() as u32);
                w.bytes(list.bytes);
            }
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
                w.inbox(sender);
                w.u64(client_message_id.0);
                w.u64(timestamp_ms);
                w.u64(expires_ms);
                if let Some(group) = group {
                    assert!(lengths.is_none(), "a group message has one payload");
                    w.u64(group.group_id);
                    w.u64(group.group_seq);
                    w.bytes(&[u8::from(group.event)]);
                    w.u32(group.remote_members.len() as u32);
                    w.bytes(group.remote_members.bytes);
                }
                w.u32(recipients.len() as u32);
                w.bytes(recipients.bytes);
                if let Some(lengths) = lengths {
                    assert_eq!(lengths.len(), recipients.len(), "one length per recipient");
                    w.bytes(lengths.bytes);
                }
                w.u32(payload.len() as u32);
                w.bytes(payload);
            }
            Record::InboxFloor { floors } => {
                w.u32(floors.len() as u32);
                w.bytes(floors.bytes);
            }
        }
        assert_eq!(w.at, body_len, "body fills its computed length");
        out[RECORD_HEADER_BYTES + body_len..].fill(0);
        out[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[8] = self.kind() as u8;
        out[9] = RECORD_VERSION;
        out[10] = 0;
        out[11] = 0;
        let crc = record_crc(segment, &out[8..RECORD_HEADER_BYTES + body_len]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        total
    }
}

/// Reads a record's expiry from its fixed position without checking the
/// CRC (cheap; for records already validated when they were indexed).
/// `None` for kinds without expiry or bytes too short.
pub fn peek_expires_ms(bytes: &[u8]) -> Option<u64> {
    let at = match RecordKind::from_byte(*bytes.get(8)?)? {
        RecordKind::Message => RECORD_HEADER_BYTES + 48,
        RecordKind::Receipt => RECORD_HEADER_BYTES + 41,
        RecordKind::MultiMessage | RecordKind::DeviceMessage | RecordKind::GroupMessage => {
            RECORD_HEADER_BYTES + 28
        }
        RecordKind::Ack | RecordKind::InboxFloor => return None,
    };
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn record_crc(segment: u32, covered: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&segment.to_le_bytes()), covered)
}

/// Decodes the record at the start of `bytes`, written into segment
/// `segment`. Returns the record and its framed length.
pub fn decode(segment: u32, bytes: &[u8]) -> Result<(Record<'_>, usize), DecodeError> {
    decode_with(segment, bytes, true)
}

/// `decode` without the CRC, for a record whose CRC was checked already
/// (every other check is made).
pub fn decode_checked_before(
    segment: u32,
    bytes: &[u8],
) -> Result<(Record<'_>, usize), DecodeError> {
    decode_with(segment, bytes, false)
}

fn decode_with(
    segment: u32,
    bytes: &[u8],
    check_crc: bool,
) -> Result<(Record<'_>, usize), DecodeError> {
    if bytes.len() < RECORD_HEADER_BYTES {
        if bytes.iter().all(|&b| b == 0) {
            return Err(DecodeError::End);
        }
        return Err(DecodeError::Truncated);
    }
    let header = &bytes[..RECORD_HEADER_BYTES];
    if header.iter().all(|&b| b == 0) {
        return Err(DecodeError::End);
    }
    let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    if body_len == 0 || body_len > BODY_BYTES_MAX {
        return Err(DecodeError::BadLength);
    }
    let body_len = body_len as usize;
    let total = framed_len(body_len);
    if bytes.len() < RECORD_HEADER_BYTES + body_len {
        return Err(DecodeError::Truncated);
    }
    // The cheap header checks come before the CRC so a scan resynchronising
    // over garbage rarely pays for a checksum.
    let kind = RecordKind::from_byte(header[8]).ok_or(DecodeError::BadKind)?;
    if header[9] != RECORD_VERSION || header[10] != 0 || header[11] != 0 {
        return Err(DecodeError::BadVersion);
    }
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if check_crc && record_crc(segment, &bytes[8..RECORD_HEADER_BYTES + body_len]) != crc {
        return Err(DecodeError::BadCrc);
    }
    let mut r = Reader {
        bytes: &bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + body_len],
        at: 0,
    };
    let record = decode_body(kind, &mut r).ok_or(DecodeError::Malformed)?;
    if r.at != body_len {
        return Err(DecodeError::Malformed);
    }
    Ok((record, total.min(bytes.len())))
}

fn decode_body<'a>(kind: RecordKind, r: &mut Reader<'a>) -> Option<Record<'a>> {
    Some(match kind {
        RecordKind::Message => {
            let recipient = r.inbox()?;
            let seq = InboxSeq(r.u64()?);
            let sender = r.inbox()?;
            let client_message_id = ClientMessageId(r.u64()?);
            let timestamp_ms = r.u64()?;
            let expires_ms = r.u64()?;
            let n = r.u32()? as usize;
            let payload = r.take(n)?;
            Record::Message {
                recipient,
                seq,
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                payload,
            }
        }
        RecordKind::Receipt => {
            let recipient = r.inbox()?;
            let seq = InboxSeq(r.u64()?);
            let receipt_kind = r.take(1)?[0];
            if receipt_kind != 1 && receipt_kind != 2 {
                return None;
            }
            let by = r.inbox()?;
            let timestamp_ms = r.u64()?;
            let expires_ms = r.u64()?;
            let n = r.u32()? as usize;
            let ids = r.take(n.checked_mul(8)?)?;
            Record::Receipt {
                recipient,
                seq,
                receipt_kind,
                by,
                timestamp_ms,
                expires_ms,
                client_message_ids: U64List { bytes: ids },
            }
        }
        RecordKind::Ack => {
            let inbox = r.inbox()?;
            let up_to = InboxSeq(r.u64()?);
            let n = r.u32()? as usize;
            let list = r.take(n.checked_mul(8)?)?;
            Record::Ack {
                inbox,
                up_to,
                list: U64List { bytes: list },
            }
        }
        RecordKind::MultiMessage | RecordKind::DeviceMessage | RecordKind::GroupMessage => {
            let sender = r.inbox()?;
            let client_message_id = ClientMessageId(r.u64()?);
            let timestamp_ms = r.u64()?;
            let expires_ms = r.u64()?;
            let group = if kind == RecordKind::GroupMessage {
                let group_id = r.u64()?;
                let group_seq = r.u64()?;
                let event = match r.take(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let m = r.u32()? as usize;
                let members = r.take(m.checked_mul(8)?)?;
                Some(GroupPart {
                    group_id,
                    group_seq,
                    event,
                    remote_members: U64List { bytes: members },
                })
            } else {
                None
            };
            let n = r.u32()? as usize;
            let recipients = r.take(n.checked_mul(INBOX_SEQ_BYTES)?)?;
            let lengths = if kind == RecordKind::DeviceMessage {
                Some(U32List {
                    bytes: r.take(n.checked_mul(4)?)?,
                })
            } else {
                None
            };
            let p = r.u32()? as usize;
            let payload = r.take(p)?;
            if let Some(lengths) = lengths {
                let total = lengths
                    .iter()
                    .try_fold(0usize, |sum, l| sum.checked_add(l as usize))?;
                if total != payload.len() {
                    return None;
                }
            }
            Record::MultiMessage {
                sender,
                client_message_id,
                timestamp_ms,
                expires_ms,
                recipients: InboxSeqList { bytes: recipients },
                lengths,
                group,
                payload,
            }
        }
        RecordKind::InboxFloor => {
            let n = r.u32()? as usize;
            let floors = r.take(n.checked_mul(INBOX_SEQ_BYTES)?)?;
            Record::InboxFloor {
                floors: InboxSeqList { bytes: floors },
            }
        }
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn inbox(&mut self) -> Option<InboxKey> {
        let user = UserId(self.u64()?);
        let device = DeviceId(self.u32()?);
        Some(InboxKey { user, device })
    }
}

struct Writer<'o> {
    out: &'o mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn inbox(&mut self, inbox: InboxKey) {
        self.u64(inbox.user.0);
        self.u32(inbox.device.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inbox(user: u64, device: u32) -> InboxKey {
        InboxKey {
            user: UserId(user),
            device: DeviceId(device),
        }
    }

    fn encode_vec(record: &Record<'_>, segment: u32) -> Vec<u8> {
        let mut out = vec![0xAA; record.framed_len()];
        record.encode(segment, &mut out);
        out
    }

    /// Log bytes per message to an account, 100-byte payloads: one
    /// message record for a primary alone, one device record for several
    /// devices (docs/store.md quotes these).
    #[test]
    fn log_bytes_per_message_for_one_and_five_devices() {
        let payload = [7u8; 500];
        let inbox = |d| InboxKey {
            user: UserId(2),
            device: DeviceId(d),
        };
        let message = Record::Message {
            recipient: inbox(1),
            seq: InboxSeq(1),
            sender: inbox(1),
            client_message_id: ClientMessageId(1),
            timestamp_ms: 0,
            expires_ms: 0,
            payload: &payload[..100],
        };
        assert_eq!(message.framed_len(), 176);
        let sizes: Vec<usize> = [1u32, 5]
            .iter()
            .map(|&n| {
                let pairs: Vec<_> = (1..=n).map(|d| (inbox(d), InboxSeq(1))).collect();
                let mut enc = Vec::new();
                encode_inbox_seqs(&pairs, &mut enc);
                let lengths: Vec<u8> = (0..n).flat_map(|_| 100u32.to_le_bytes()).collect();
                Record::MultiMessage {
                    sender: inbox(1),
                    client_message_id: ClientMessageId(1),
                    timestamp_ms: 0,
                    expires_ms: 0,
                    recipients: InboxSeqList::from_le_bytes(&enc).unwrap(),
                    lengths: Some(U32List::from_le_bytes(&lengths).unwrap()),
                    group: None,
                    payload: &payload[..100 * n as usize],
                }
                .framed_len()
            })
            .collect();
        assert_eq!(sizes, vec![184, 680]);
        // A group's message on a shard: one payload, 20 bytes per member
        // device there (and on the home shard 8 per member elsewhere).
        let group_size = |devices: u32, remote: u64| {
            let pairs: Vec<_> = (1..=devices)
                .map(|u| {
                    (
                        InboxKey {
                            user: UserId(u as u64),
                            device: DeviceId(1),
                        },
                        InboxSeq(1),
                    )
                })
                .collect();
            let mut enc = Vec::new();
            encode_inbox_seqs(&pairs, &mut enc);
            let mut members = Vec::new();
            encode_u64s(0..remote, &mut members);
            Record::MultiMessage {
                sender: inbox(1),
                client_message_id: ClientMessageId(1),
                timestamp_ms: 0,
                expires_ms: 0,
                recipients: InboxSeqList::from_le_bytes(&enc).unwrap(),
                lengths: None,
                group: Some(GroupPart {
                    group_id: 1,
                    group_seq: 1,
                    event: false,
                    remote_members: U64List::from_le_bytes(&members).unwrap(),
                }),
                payload: &payload[..100],
            }
            .framed_len()
        };
        assert_eq!(group_size(512, 0), 10_424);
        assert_eq!(group_size(512, 512), 14_520);
    }

    #[test]
    fn round_trips_message() {
        let record = Record::Message {
            recipient: inbox(7, 1),
            seq: InboxSeq(3),
            sender: inbox(9, 2),
            client_message_id: ClientMessageId(44),
            timestamp_ms: 1_000,
            expires_ms: 2_000,
            payload: b"hello",
        };
        let bytes = encode_vec(&record, 5);
        assert_eq!(bytes.len() % RECORD_ALIGN_BYTES, 0);
        let (decoded, len) = decode(5, &bytes).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(len, bytes.len());
        assert_eq!(peek_expires_ms(&bytes), Some(2_000));
    }

    /// The on-disk format is a contract with every existing log: these
    /// bytes must never change for version 1.
    #[test]
    fn message_encoding_matches_golden_bytes() {
        let record = Record::Message {
            recipient: inbox(0x0102, 3),
            seq: InboxSeq(7),
            sender: inbox(0x0A0B, 1),
            client_message_id: ClientMessageId(0x55),
            timestamp_ms: 1_000,
            expires_ms: 2_000,
            payload: b"hi",
        };
        let bytes = encode_vec(&record, 9);
        assert_eq!(hex::encode(&bytes), GOLDEN_MESSAGE);
        let mut broken = hex::decode(GOLDEN_MESSAGE).unwrap();
        broken[70] ^= 0x01;
        assert_eq!(decode(9, &broken), Err(DecodeError::BadCrc));
    }

    const GOLDEN_MESSAGE: &str = "3e000000692839620101000002010000000000000300000007000000000000000b0a000000000000010000005500000000000000e803000000000000d007000000000000020000006869000000000000";

    #[test]
    fn rejects_record_read_as_another_segments() {
        let record = Record::Ack {
            inbox: inbox(1, 1),
            up_to: InboxSeq(10),
            list: U64List { bytes: &[] },
        };
        let bytes = encode_vec(&record, 5);
        assert_eq!(decode(6, &bytes), Err(DecodeError::BadCrc));
    }

    #[test]
    fn zero_header_is_end_of_log() {
        assert_eq!(decode(1, &[0u8; 64]), Err(DecodeError::End));
        assert_eq!(decode(1, &[0u8; 3]), Err(DecodeError::End));
    }

    #[test]
    fn rejects_truncated_record() {
        let record = Record::Message {
            recipient: inbox(7, 1),
            seq: InboxSeq(3),
            sender: inbox(9, 2),
            client_message_id: ClientMessageId(44),
            timestamp_ms: 1_000,
            expires_ms: 2_000,
            payload: &[1; 100],
        };
        let bytes = encode_vec(&record, 1);
        for cut in 1..bytes.len() - 4 {
            assert!(decode(1, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn detects_every_single_bit_flip() {
        let list: Vec<u8> = [1u64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let record = Record::Receipt {
            recipient: inbox(7, 1),
            seq: InboxSeq(3),
            receipt_kind: 2,
            by: inbox(9, 2),
            timestamp_ms: 1_000,
            expires_ms: 2_000,
            client_message_ids: U64List { bytes: &list },
        };
        let bytes = encode_vec(&record, 1);
        let body_end = RECORD_HEADER_BYTES + record.body_len();
        for bit in 0..body_end * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(1, &damaged).is_err(), "bit {bit}");
        }
    }

    fn arb_inbox() -> impl Strategy<Value = InboxKey> {
        (any::<u64>(), any::<u32>()).prop_map(|(u, d)| inbox(u, d))
    }

    proptest! {
        #[test]
        fn decode_never_panics(segment in any::<u32>(), bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(segment, &bytes);
        }

        #[test]
        fn decode_never_panics_on_valid_crc_garbage(segment in any::<u32>(), kind in 0u8..8, body in proptest::collection::vec(any::<u8>(), 1..256)) {
            // Forge a header with a correct CRC so the body parser itself is exercised.
            let mut bytes = vec![0u8; RECORD_HEADER_BYTES + body.len()];
            bytes[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
            bytes[8] = kind;
            bytes[9] = RECORD_VERSION;
            bytes[RECORD_HEADER_BYTES..].copy_from_slice(&body);
            let crc = record_crc(segment, &bytes[8..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
            let _ = decode(segment, &bytes);
        }

        #[test]
        fn message_round_trips(segment in any::<u32>(), r in arb_inbox(), s in arb_inbox(), seq in any::<u64>(), id in any::<u64>(), t in any::<u64>(), e in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let record = Record::Message { recipient: r, seq: InboxSeq(seq), sender: s, client_message_id: ClientMessageId(id), timestamp_ms: t, expires_ms: e, payload: &payload };
            let bytes = encode_vec(&record, segment);
            prop_assert_eq!(decode(segment, &bytes), Ok((record, bytes.len())));
        }

        #[test]
        fn receipt_and_ack_round_trip(segment in any::<u32>(), r in arb_inbox(), b in arb_inbox(), seq in any::<u64>(), kind in 1u8..=2, ids in proptest::collection::vec(any::<u64>(), 0..40)) {
            let mut list = Vec::new();
            encode_u64s(ids.iter().copied(), &mut list);
            let receipt = Record::Receipt { recipient: r, seq: InboxSeq(seq), receipt_kind: kind, by: b, timestamp_ms: 1, expires_ms: 2, client_message_ids: U64List { bytes: &list } };
            let bytes = encode_vec(&receipt, segment);
            prop_assert_eq!(decode(segment, &bytes), Ok((receipt, bytes.len())));
            let ack = Record::Ack { inbox: r, up_to: InboxSeq(seq), list: U64List { bytes: &list } };
            let bytes = encode_vec(&ack, segment);
            let (decoded, _) = decode(segment, &bytes).unwrap();
            prop_assert_eq!(decoded, ack);
            if let Record::Ack { list, .. } = decoded {
                prop_assert_eq!(list.iter().collect::<Vec<_>>(), ids);
            }
        }

        #[test]
        fn multi_and_floor_round_trip(segment in any::<u32>(), s in arb_inbox(), pairs in proptest::collection::vec((arb_inbox(), any::<u64>()), 0..20), payload in proptest::collection::vec(any::<u8>(), 0..100)) {
            let pairs: Vec<(InboxKey, InboxSeq)> = pairs.into_iter().map(|(i, q)| (i, InboxSeq(q))).collect();
            let mut enc = Vec::new();
            encode_inbox_seqs(&pairs, &mut enc);
            let multi = Record::MultiMessage { sender: s, client_message_id: ClientMessageId(5), timestamp_ms: 1, expires_ms: 2, recipients: InboxSeqList { bytes: &enc }, lengths: None, group: None, payload: &payload };
            let bytes = encode_vec(&multi, segment);
            let (decoded, _) = decode(segment, &bytes).unwrap();
            prop_assert_eq!(decoded, multi);
            if let Record::MultiMessage { recipients, .. } = decoded {
                prop_assert_eq!(recipients.iter().collect::<Vec<_>>(), pairs.clone());
            }
            // One payload per recipient: the parts cut the payload in order.
            let cut: Vec<u32> = (0..pairs.len())
                .map(|i| if i + 1 == pairs.len() { payload.len() - payload.len() / pairs.len().max(1) * i } else { payload.len() / pairs.len().max(1) } as u32)
                .collect();
            let mut len_bytes = Vec::new();
            for l in &cut {
                len_bytes.extend_from_slice(&l.to_le_bytes());
            }
            if !pairs.is_empty() {
                let lengths = U32List::from_le_bytes(&len_bytes).unwrap();
                let per_device = Record::MultiMessage { sender: s, client_message_id: ClientMessageId(6), timestamp_ms: 1, expires_ms: 2, recipients: InboxSeqList { bytes: &enc }, lengths: Some(lengths), group: None, payload: &payload };
                prop_assert_eq!(per_device.kind(), RecordKind::DeviceMessage);
                let bytes = encode_vec(&per_device, segment);
                prop_assert_eq!(peek_expires_ms(&bytes), Some(2));
                let (decoded, _) = decode(segment, &bytes).unwrap();
                prop_assert_eq!(decoded, per_device);
                let parts: usize = (0..pairs.len()).map(|i| lengths.part(i).unwrap().len()).sum();
                prop_assert_eq!(parts, payload.len());
            }
            // A group's message: the group part travels whole, the
            // expiry stays where peek_expires_ms looks.
            let mut members = Vec::new();
            encode_u64s(pairs.iter().map(|(i, _)| i.user.0), &mut members);
            let group = Record::MultiMessage { sender: s, client_message_id: ClientMessageId(7), timestamp_ms: 1, expires_ms: 3, recipients: InboxSeqList { bytes: &enc }, lengths: None, group: Some(GroupPart { group_id: segment as u64, group_seq: 9, event: payload.len() % 2 == 0, remote_members: U64List { bytes: &members } }), payload: &payload };
            prop_assert_eq!(group.kind(), RecordKind::GroupMessage);
            let bytes = encode_vec(&group, segment);
            prop_assert_eq!(peek_expires_ms(&bytes), Some(3));
            prop_assert_eq!(decode(segment, &bytes), Ok((group, bytes.len())));
            let floor = Record::InboxFloor { floors: InboxSeqList { bytes: &enc } };
            let bytes = encode_vec(&floor, segment);
            prop_assert_eq!(decode(segment, &bytes), Ok((floor, bytes.len())));
        }
    }
}
