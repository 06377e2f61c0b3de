//! Per-device inboxes and the dedupe table: in-memory indexes of log
//! positions, sans-IO.
//!
//! An inbox holds one 16-byte `Entry` (sequence, segment, offset) per
//! pending message or receipt, in sequence order, in a `VecDeque`. Acks by
//! cumulative `up_to` pop from the front; acks by list leave a tombstone
//! that is popped once it reaches the front (or compacted when tombstones
//! are half the deque). With the deque's growth by doubling, the index
//! costs 16 to 32 bytes per pending entry, plus about 100 bytes per inbox
//! (the `Inbox` and its hash-map slot), which is kept after the inbox
//! empties because it holds the last sequence assigned.

use std::collections::{HashMap, VecDeque};

use crate::ids::{ClientMessageId, InboxKey, InboxSeq};

use super::LogPosition;

/// Marks an entry removed by a list ack while entries before it remain.
const TOMBSTONE: u32 = u32::MAX;

/// One pending entry. 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub segment: u32,
    pub offset: u32,
}

impl Entry {
    pub fn position(&self) -> LogPosition {
        LogPosition {
            segment: self.segment,
            offset: self.offset,
        }
    }
    fn is_tombstone(&self) -> bool {
        self.offset == TOMBSTONE
    }
}

/// One device's inbox.
#[derive(Debug, Default)]
pub struct Inbox {
    entries: VecDeque<Entry>,
    pending: u32,
    /// Highest sequence ever assigned here (0: none).
    pub last_seq: u64,
    /// Segment holding the record that carries `last_seq` (0: none).
    pub last_seq_segment: u32,
}

impl Inbox {
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Adds an entry; sequences arrive in increasing order. An out-of-order
    /// or repeated sequence (possible only from damaged logs) is ignored.
    pub fn push(&mut self, entry: Entry) -> bool {
        if let Some(back) = self.entries.back() {
            if back.seq >= entry.seq {
                return false;
            }
        }
        self.entries.push_back(entry);
        self.pending += 1;
        true
    }

    /// Removes entries with `seq <= up_to` and those in `list`, calling
    /// `removed` with each, in sequence order for the cumulative part.
    pub fn ack(
        &mut self,
        up_to: u64,
        list: impl Iterator<Item = u64>,
        mut removed: impl FnMut(Entry),
    ) {
        while let Some(front) = self.entries.front() {
            if front.seq > up_to {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            if !entry.is_tombstone() {
                self.pending -= 1;
                removed(entry);
            }
        }
        for seq in list {
            if seq <= up_to {
                continue;
            }
            if let Ok(i) = self.entries.binary_search_by_key(&seq, |e| e.seq) {
                let entry = self.entries[i];
                if !entry.is_tombstone() {
                    self.entries[i].offset = TOMBSTONE;
                    self.pending -= 1;
                    removed(entry);
                }
            }
        }
        self.tidy();
    }

    /// Removes leading entries for which `expired` says so (expiry is
    /// monotonic in sequence order), calling `removed` with each.
    pub fn expire_front(
        &mut self,
        mut expired: impl FnMut(&Entry) -> bool,
        mut removed: impl FnMut(Entry),
    ) {
        while let Some(front) = self.entries.front() {
            if !front.is_tombstone() && !expired(front) {
                break;
            }
            let entry = self.entries.pop_front().expect("front exists");
            if !entry.is_tombstone() {
                self.pending -= 1;
                removed(entry);
            }
        }
        self.tidy();
    }

    fn tidy(&mut self) {
        while self.entries.front().is_some_and(Entry::is_tombstone) {
            self.entries.pop_front();
        }
        let tombstones = self.entries.len() - self.pending as usize;
        if tombstones > 16 && tombstones * 2 > self.entries.len() {
            self.entries.retain(|e| !e.is_tombstone());
        }
        if self.entries.is_empty() && self.entries.capacity() > 64 {
            self.entries = VecDeque::new();
        }
    }

    /// Live entries with `seq > after`, in order.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &Entry> {
        let start = self.entries.partition_point(|e| e.seq <= after);
        self.entries.range(start..).filter(|e| !e.is_tombstone())
    }

    /// The last live entry.
    pub fn last_live(&self) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| !e.is_tombstone())
    }

    /// Live entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| !e.is_tombstone())
    }

    /// Heap bytes held for entries.
    pub fn index_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }

    /// The entry for `seq`, if pending.
    pub fn get(&self, seq: u64) -> Option<Entry> {
        let i = self.entries.binary_search_by_key(&seq, |e| e.seq).ok()?;
        let e = self.entries[i];
        (!e.is_tombstone()).then_some(e)
    }
}

/// What the dedupe table remembers of an appended message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeValue {
    pub recipient: InboxKey,
    pub seq: InboxSeq,
    pub timestamp_ms: u64,
    pub ticket: u64,
    /// `payload_digest` of the payload, so a retry that carries another
    /// payload is told apart from a true retry.
    pub payload_digest: u32,
}

/// A 32-bit digest of a payload (CRC32C, hardware-assisted): enough to catch
/// a client that reuses a message id for other content, which is a bug it
/// should hear about; not a security check.
pub fn payload_digest(payload: &[u8]) -> u32 {
    crc32c::crc32c(payload)
}

/// `payload_digest` of the parts laid end to end (a per-device Send's
/// payloads, as its record holds them).
pub fn payload_digest_parts<'a>(parts: impl Iterator<Item = &'a [u8]>) -> u32 {
    parts.fold(0, crc32c::crc32c_append)
}

/// (sender device, client message id) → what was appended; FIFO-bounded.
///
/// Each remembered Send is one 64-byte slot in a ring (oldest first), found
/// through a hash index of 16-byte entries (the key's 64-bit hash → the
/// slot's absolute position). About 100 bytes per entry in all, where a map
/// holding keys and values twice over cost 160. Two keys whose 64-bit hashes
/// collide (odds about 2^-64 per pair) shadow each other: the older one is
/// no longer found, so a retry of it would be stored again, exactly as if it
/// had been evicted.
///
/// The index is a `griddle::HashMap`: when it outgrows its table it moves
/// the entries to the next a few at a time over the following inserts,
/// where a `std` map moves all of them inside one insert. Filling a
/// million-entry table (`dedupe_bytes_per_entry`), the longest insert took
/// 24-28 ms with `std` (its move at 918k entries, once per process life,
/// on the shard's thread) and 1.5-2.1 ms with griddle, in the same total
/// time, at the same memory once the move is done.
#[derive(Debug)]
pub struct Dedupe {
    index: griddle::HashMap<u64, u64, std::hash::BuildHasherDefault<PremixedHasher>>,
    ring: VecDeque<DedupeSlot>,
    /// Absolute position of `ring[0]`: how many slots were evicted.
    first: u64,
    capacity: usize,
}

#[derive(Clone, Copy, Debug)]
struct DedupeSlot {
    sender_user: u64,
    client_message_id: u64,
    recipient_user: u64,
    seq: u64,
    timestamp_ms: u64,
    ticket: u64,
    sender_device: u32,
    recipient_device: u32,
    payload_digest: u32,
}

impl DedupeSlot {
    fn matches(&self, sender: InboxKey, id: ClientMessageId) -> bool {
        self.sender_user == sender.user.0
            && self.sender_device == sender.device.0
            && self.client_message_id == id.0
    }

    fn value(&self) -> DedupeValue {
        DedupeValue {
            recipient: InboxKey {
                user: crate::ids::UserId(self.recipient_user),
                device: crate::ids::DeviceId(self.recipient_device),
            },
            seq: InboxSeq(self.seq),
            timestamp_ms: self.timestamp_ms,
            ticket: self.ticket,
            payload_digest: self.payload_digest,
        }
    }
}

/// The index's keys are already well-mixed 64-bit hashes; use them as they are.
#[derive(Debug, Default)]
pub struct PremixedHasher(u64);

impl std::hash::Hasher for PremixedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; fold anything else in case it changes.
        for &b in bytes {
            self.0 = crate::route::mix64(self.0 ^ b as u64);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

fn dedupe_hash(sender: InboxKey, id: ClientMessageId) -> u64 {
    use crate::route::mix64;
    mix64(mix64(sender.user.0 ^ ((sender.device.0 as u64) << 32).rotate_left(17)) ^ id.0)
}

impl Dedupe {
    pub fn new(capacity: usize) -> Dedupe {
        Dedupe {
            index: griddle::HashMap::default(),
            ring: VecDeque::new(),
            first: 0,
            capacity,
        }
    }

    pub fn get(&self, sender: InboxKey, id: ClientMessageId) -> Option<DedupeValue> {
        let position = *self.index.get(&dedupe_hash(sender, id))?;
        let slot = self.ring.get((position - self.first) as usize)?;
        slot.matches(sender, id).then(|| slot.value())
    }

    pub fn insert(&mut self, sender: InboxKey, id: ClientMessageId, value: DedupeValue) {
        if self.capacity == 0 {
            return;
        }
        let slot = DedupeSlot {
            sender_user: sender.user.0,
            client_message_id: id.0,
            recipient_user: value.recipient.user.0,
            seq: value.seq.0,
            timestamp_ms: value.timestamp_ms,
            ticket: value.ticket,
            sender_device: sender.device.0,
            recipient_device: value.recipient.device.0,
            payload_digest: value.payload_digest,
        };
        let hash = dedupe_hash(sender, id);
        if let Some(&position) = self.index.get(&hash) {
            let offset = (position - self.first) as usize;
            if self.ring.get(offset).is_some_and(|s| s.matches(sender, id)) {
                // The same Send again (recovery replays it): update in place.
                self.ring[offset] = slot;
                return;
            }
        }
        let position = self.first + self.ring.len() as u64;
        self.ring.push_back(slot);
        self.index.insert(hash, position);
        self.evict();
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict();
        self.ring.shrink_to_fit();
        self.index.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Approximate heap bytes: index buckets (usable capacity is 7/8 of
    /// them, each a 16-byte entry and a control byte) and the ring of slots.
    pub fn heap_bytes(&self) -> usize {
        let buckets = self.index.capacity() * 8 / 7;
        buckets * (std::mem::size_of::<(u64, u64)>() + 1)
            + self.ring.capacity() * std::mem::size_of::<DedupeSlot>()
    }

    fn evict(&mut self) {
        while self.ring.len() > self.capacity {
            let Some(slot) = self.ring.pop_front() else {
                break;
            };
            let sender = InboxKey {
                user: crate::ids::UserId(slot.sender_user),
                device: crate::ids::DeviceId(slot.sender_device),
            };
            let hash = dedupe_hash(sender, ClientMessageId(slot.client_message_id));
            // Only if the index still points at this slot (not at a newer
            // one that shadows it).
            if self.index.get(&hash) == Some(&self.first) {
                self.index.remove(&hash);
            }
            self.first += 1;
        }
    }
}

/// All inboxes of one log. Looked up several times per message, so with a
/// fast keyed hash (still seeded per process: keys cannot be chosen to
/// collide).
pub type Inboxes = HashMap<InboxKey, Inbox, ahash::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            segment: 1,
            offset: seq as u32 * 8,
        }
    }

    #[test]
    fn entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
    }

    #[test]
    fn cumulative_and_list_acks_remove_exactly_the_named_entries() {
        let mut inbox = Inbox::default();
        for s in 1..=10 {
            assert!(inbox.push(entry(s)));
        }
        let mut gone = Vec::new();
        inbox.ack(3, [5u64, 7, 99].into_iter(), |e| gone.push(e.seq));
        assert_eq!(gone, vec![1, 2, 3, 5, 7]);
        assert_eq!(inbox.pending(), 5);
        let left: Vec<u64> = inbox.after(0).map(|e| e.seq).collect();
        assert_eq!(left, vec![4, 6, 8, 9, 10]);
        gone.clear();
        inbox.ack(6, std::iter::empty(), |e| gone.push(e.seq));
        assert_eq!(gone, vec![4, 6]);
        assert_eq!(
            inbox.after(8).map(|e| e.seq).collect::<Vec<_>>(),
            vec![9, 10]
        );
    }

    #[test]
    fn ignores_out_of_order_push() {
        let mut inbox = Inbox::default();
        assert!(inbox.push(entry(5)));
        assert!(!inbox.push(entry(5)));
        assert!(!inbox.push(entry(4)));
        assert_eq!(inbox.pending(), 1);
    }

    #[test]
    fn dedupe_evicts_oldest_first() {
        let key = |u| InboxKey {
            user: crate::ids::UserId(u),
            device: crate::ids::DeviceId(1),
        };
        let value = DedupeValue {
            recipient: key(0),
            seq: InboxSeq(1),
            timestamp_ms: 0,
            ticket: 0,
            payload_digest: 7,
        };
        let mut d = Dedupe::new(2);
        d.insert(key(1), ClientMessageId(1), value);
        d.insert(key(2), ClientMessageId(1), value);
        d.insert(key(3), ClientMessageId(1), value);
        assert!(d.get(key(1), ClientMessageId(1)).is_none());
        assert!(d.get(key(3), ClientMessageId(1)).is_some());
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn dedupe_updates_a_replayed_key_in_place_and_tells_keys_apart() {
        let key = |u, dev| InboxKey {
            user: crate::ids::UserId(u),
            device: crate::ids::DeviceId(dev),
        };
        let value = |seq| DedupeValue {
            recipient: key(9, 1),
            seq: InboxSeq(seq),
            timestamp_ms: seq * 10,
            ticket: seq,
            payload_digest: 7,
        };
        let mut d = Dedupe::new(100);
        d.insert(key(1, 1), ClientMessageId(5), value(1));
        d.insert(key(1, 2), ClientMessageId(5), value(2));
        d.insert(key(1, 1), ClientMessageId(6), value(3));
        d.insert(key(1, 1), ClientMessageId(5), value(4));
        assert_eq!(d.len(), 3, "a replayed key is not stored twice");
        assert_eq!(d.get(key(1, 1), ClientMessageId(5)), Some(value(4)));
        assert_eq!(d.get(key(1, 2), ClientMessageId(5)), Some(value(2)));
        assert_eq!(d.get(key(1, 1), ClientMessageId(6)), Some(value(3)));
        assert_eq!(d.get(key(2, 1), ClientMessageId(5)), None);
    }

    #[test]
    fn dedupe_stays_bounded_and_finds_every_live_key() {
        let key = |u| InboxKey {
            user: crate::ids::UserId(u),
            device: crate::ids::DeviceId(1),
        };
        let value = DedupeValue {
            recipient: key(0),
            seq: InboxSeq(1),
            timestamp_ms: 0,
            ticket: 0,
            payload_digest: 7,
        };
        let mut d = Dedupe::new(1_000);
        for i in 0..10_000u64 {
            d.insert(key(i % 37), ClientMessageId(i), value);
            assert!(d.len() <= 1_000);
        }
        for i in 9_000..10_000u64 {
            assert!(d.get(key(i % 37), ClientMessageId(i)).is_some(), "{i}");
        }
        for i in 0..9_000u64 {
            assert!(d.get(key(i % 37), ClientMessageId(i)).is_none(), "{i}");
        }
        assert!(d.index.len() == 1_000);
    }

    /// Run: `cargo test --release --lib dedupe_bytes_per_entry -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dedupe_bytes_per_entry() {
        fn rss() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        }
        let key = |u| InboxKey {
            user: crate::ids::UserId(u),
            device: crate::ids::DeviceId(1),
        };
        let entries = 1_000_000u64;
        let before = rss();
        let mut d = Dedupe::new(entries as usize);
        // Past the cap, so the index's last move to a bigger table (which
        // griddle spreads over the inserts after it) has finished.
        let mut longest = std::time::Duration::ZERO;
        let filling = std::time::Instant::now();
        for i in 0..entries * 13 / 10 {
            let value = DedupeValue {
                recipient: key(i % 10_000),
                seq: InboxSeq(i),
                timestamp_ms: i,
                ticket: i,
                payload_digest: 7,
            };
            let started = std::time::Instant::now();
            d.insert(key(1_000_000), ClientMessageId(i), value);
            longest = longest.max(started.elapsed());
        }
        let filled = filling.elapsed();
        let grown = rss() - before;
        println!(
            "dedupe: {} entries, heap estimate {:.1} B/entry, RSS growth {:.1} B/entry, \
             longest insert {:?}, all inserts {:?}",
            d.len(),
            d.heap_bytes() as f64 / entries as f64,
            grown as f64 / entries as f64,
            longest,
            filled
        );
    }
}
