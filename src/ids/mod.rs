//! Identifier and position newtypes shared by every subsystem.
//!
//! Plain `Copy` values with no behaviour beyond formatting; they keep a user id
//! from being passed where a sequence number is expected. None of them is a
//! `usize`: each has the width it has on the wire and on disk.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_type!(
    /// An account. Allocated by the metadata database, never reused; 0 is invalid.
    UserId(u64)
);
id_type!(
    /// A device of one account, numbered from 1 per account.
    DeviceId(u32)
);
id_type!(
    /// A shard (one executor pinned to one CPU), numbered from 0.
    ShardId(u32)
);
id_type!(
    /// A position in one device's inbox, strictly increasing from 1.
    InboxSeq(u64)
);
id_type!(
    /// Chosen by a sending device, unique per device; the dedupe key with it.
    ClientMessageId(u64)
);

/// A device's inbox: the unit of sequencing, delivery and acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InboxKey {
    pub user: UserId,
    pub device: DeviceId,
}

/// Set in the device id of a relay inbox (`InboxKey::relay`). Device ids
/// are numbered from 1 per account and never reach it.
pub const RELAY_DEVICE_BIT: u32 = 1 << 31;

/// Set in the device id of a group's pseudo-inbox (`InboxKey::group`).
pub const GROUP_DEVICE_BIT: u32 = 1 << 30;

impl InboxKey {
    /// The relay inbox, in a shard's log, of receipts bound for devices
    /// homed on shard `to`: a receipt caused here (an Ack, a ReadReceipt)
    /// for a device homed there is stored here first, in the same commit as
    /// its cause, then forwarded, and acknowledged once that shard has
    /// stored it durably; recovery forwards what was not. One per target
    /// shard, so its memory does not grow with the users.
    pub fn relay_to_shard(to: ShardId) -> InboxKey {
        InboxKey {
            user: UserId(to.0 as u64),
            device: DeviceId(RELAY_DEVICE_BIT),
        }
    }

    /// Whether this is a relay inbox, never a device's.
    pub fn is_relay(self) -> bool {
        self.device.0 & RELAY_DEVICE_BIT != 0
    }

    /// A group's pseudo-inbox in a shard's log: its sequence is the last
    /// group sequence stored there (kept by the log's floors like any
    /// inbox's); it never holds an entry.
    pub fn group(group_id: u64) -> InboxKey {
        InboxKey {
            user: UserId(group_id),
            device: DeviceId(GROUP_DEVICE_BIT),
        }
    }

    /// Whether this is a group's pseudo-inbox.
    pub fn is_group(self) -> bool {
        self.device.0 == GROUP_DEVICE_BIT
    }
}

impl fmt::Display for InboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_relay() {
            write!(f, "relay to shard {}", self.user)
        } else if self.is_group() {
            write!(f, "group {}", self.user)
        } else {
            write!(f, "{}/{}", self.user, self.device)
        }
    }
}

/// The device every v1 message is addressed to: registration creates device
/// 1 and v1 has no call that adds devices. Multi-device Sends will carry one
/// payload per device (`Send.device_payloads`).
pub const PRIMARY_DEVICE: DeviceId = DeviceId(1);
