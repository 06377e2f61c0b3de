//! A slab of connection records with a generation per slot.
//!
//! A `ConnId` is a slot index and the slot's generation when the record was
//! inserted. Removing a record bumps the slot's generation, so an id (or a
//! completion's user data) from before never reaches the record that reuses
//! the slot.

use super::sys::GENERATION_MASK;

/// A connection of one driver: slot index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl ConnId {
    /// A compact form for maps and logs (`generation << 32 | index`).
    pub fn to_u64(self) -> u64 {
        ((self.generation as u64) << 32) | self.index as u64
    }

    /// The inverse of `to_u64`.
    pub fn from_u64(value: u64) -> ConnId {
        ConnId {
            index: value as u32,
            generation: (value >> 32) as u32,
        }
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.index, self.generation)
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    pub fn new() -> Slab<T> {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn insert(&mut self, value: T) -> ConnId {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            assert!(slot.value.is_none(), "a free slot is empty");
            slot.value = Some(value);
            return ConnId {
                index,
                generation: slot.generation,
            };
        }
        let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 connections");
        self.slots.push(Slot {
            generation: 0,
            value: Some(value),
        });
        ConnId {
            index,
            generation: 0,
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_ref()
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.value.as_mut()
    }

    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = (slot.generation + 1) & GENERATION_MASK;
        self.free.push(id.index);
        self.len -= 1;
        Some(value)
    }

    /// Ids of every record.
    pub fn ids(&self) -> Vec<ConnId> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.value.is_some())
            .map(|(index, slot)| ConnId {
                index: index as u32,
                generation: slot.generation,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_id_misses_reused_slot() {
        let mut slab = Slab::new();
        let first = slab.insert(1u8);
        assert_eq!(slab.remove(first), Some(1));
        let second = slab.insert(2u8);
        assert_eq!(second.index, first.index);
        assert!(slab.get(first).is_none());
        assert!(slab.remove(first).is_none());
        assert_eq!(slab.get(second), Some(&2));
    }
}
