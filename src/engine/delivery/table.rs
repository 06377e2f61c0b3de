//! The table of live sessions: a map from device to a slot, and the slots.
//!
//! A map holding `Session`s directly would carry 56-byte entries through
//! its spare buckets (a hash table is up to twice its entries); a map of
//! 4-byte slot numbers keeps its entries at 24 bytes, and the sessions sit
//! densely in a vector. At 15,000 sessions that is about 90 bytes per
//! session instead of 125.

use std::collections::HashMap;

use super::Session;
use crate::ids::InboxKey;

#[derive(Debug, Default)]
pub struct Sessions {
    slots: HashMap<InboxKey, u32>,
    sessions: Vec<Option<Session>>,
    free: Vec<u32>,
}

impl Sessions {
    pub fn get(&self, device: &InboxKey) -> Option<&Session> {
        let slot = *self.slots.get(device)?;
        self.sessions[slot as usize].as_ref()
    }

    pub fn get_mut(&mut self, device: &InboxKey) -> Option<&mut Session> {
        let slot = *self.slots.get(device)?;
        self.sessions[slot as usize].as_mut()
    }

    pub fn contains_key(&self, device: &InboxKey) -> bool {
        self.slots.contains_key(device)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Puts `session` in for `device`; returns the one it replaces.
    pub fn insert(&mut self, device: InboxKey, session: Session) -> Option<Session> {
        if let Some(&slot) = self.slots.get(&device) {
            return self.sessions[slot as usize].replace(session);
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.sessions[slot as usize] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                (self.sessions.len() - 1) as u32
            }
        };
        self.slots.insert(device, slot);
        None
    }

    pub fn remove(&mut self, device: &InboxKey) -> Option<Session> {
        let slot = self.slots.remove(device)?;
        self.free.push(slot);
        self.sessions[slot as usize].take()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&InboxKey, &Session)> {
        self.slots.iter().filter_map(|(device, &slot)| {
            self.sessions[slot as usize]
                .as_ref()
                .map(|session| (device, session))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{UserId, PRIMARY_DEVICE};

    fn device(user: u64) -> InboxKey {
        InboxKey {
            user: UserId(user),
            device: PRIMARY_DEVICE,
        }
    }

    #[test]
    fn slots_are_reused_and_replacing_returns_the_old_session() {
        let mut t = Sessions::default();
        assert!(t.insert(device(1), Session::new(10, 0)).is_none());
        assert!(t.insert(device(2), Session::new(20, 0)).is_none());
        let old = t.insert(device(1), Session::new(11, 1)).expect("replaced");
        assert_eq!(old.id, 10);
        assert_eq!(t.get(&device(1)).map(|s| s.id), Some(11));
        assert_eq!(t.remove(&device(2)).map(|s| s.id), Some(20));
        assert!(t.get(&device(2)).is_none() && !t.contains_key(&device(2)));
        t.insert(device(3), Session::new(30, 0));
        assert_eq!(t.sessions.len(), 2, "the freed slot was taken again");
        assert_eq!(t.len(), 2);
        let mut ids: Vec<u64> = t.iter().map(|(_, s)| s.id).collect();
        ids.sort();
        assert_eq!(ids, vec![11, 30]);
        t.get_mut(&device(3)).expect("live").sends_in_flight = 2;
        assert_eq!(t.get(&device(3)).map(|s| s.sends_in_flight), Some(2));
    }
}
