//! Helpers shared by the store's file-level tests.

use std::rc::Rc;

use switchboard::config::{Durability, StoreConfig};
use switchboard::ids::{DeviceId, InboxKey, UserId};
use switchboard::store::ManualClock;

pub fn clock() -> Rc<ManualClock> {
    Rc::new(ManualClock::starting_now())
}

pub fn key(user: u64, device: u32) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

/// Small segments (64 KiB) so tests roll over and reclaim cheaply.
pub fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        segment_size_bytes: 64 << 10,
        durability,
        log_bytes_max: 0,
        message_ttl_s: 3_600,
        ..StoreConfig::default()
    }
}
