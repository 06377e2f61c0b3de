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
}

/// (sender device, client message id) → what was appended; FIFO-bounded.
#[derive(Debug)]
pub struct Dedupe {
    map: HashMap<(InboxKey, ClientMessageId), DedupeValue>,
    order: VecDeque<(InboxKey, ClientMessageId)>,
    capacity: usize,
}

impl Dedupe {
    pub fn new(capacity: usize) -> Dedupe {
        Dedupe {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub fn get(&self, sender: InboxKey, id: ClientMessageId) -> Option<DedupeValue> {
        self.map.get(&(sender, id)).copied()
    }

    pub fn insert(&mut self, sender: InboxKey, id: ClientMessageId, value: DedupeValue) {
        if self.capacity == 0 {
            return;
        }
        if self.map.insert((sender, id), value).is_none() {
            self.order.push_back((sender, id));
        }
        self.evict();
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict();
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Approximate heap bytes: hash-map buckets (usable capacity is 7/8 of
    /// them, each a key, a value and a control byte) and the FIFO of keys.
    pub fn heap_bytes(&self) -> usize {
        let key = std::mem::size_of::<(InboxKey, ClientMessageId)>();
        let value = std::mem::size_of::<DedupeValue>();
        let buckets = self.map.capacity() * 8 / 7;
        buckets * (key + value + 1) + self.order.capacity() * key
    }

    fn evict(&mut self) {
        while self.map.len() > self.capacity {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&key);
        }
    }
}

/// All inboxes of one log.
pub type Inboxes = HashMap<InboxKey, Inbox>;

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
        };
        let mut d = Dedupe::new(2);
        d.insert(key(1), ClientMessageId(1), value);
        d.insert(key(2), ClientMessageId(1), value);
        d.insert(key(3), ClientMessageId(1), value);
        assert!(d.get(key(1), ClientMessageId(1)).is_none());
        assert!(d.get(key(3), ClientMessageId(1)).is_some());
        assert_eq!(d.len(), 2);
    }
}
