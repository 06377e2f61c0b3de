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

impl fmt::Display for InboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.user, self.device)
    }
}
