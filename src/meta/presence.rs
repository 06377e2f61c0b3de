//! Presence data in the metadata database: who hides their last seen.
//! (Last-seen times are the devices' own, in `device_info`.)

use std::collections::{HashMap, HashSet};

use redb::{ReadableTable, TableDefinition};

use super::{MetaError, MetaStore, DEVICE_INFO};
use crate::ids::UserId;

/// user id → 1 when the user shows its last seen to nobody.
pub(super) const PRIVACY: TableDefinition<u64, u8> = TableDefinition::new("privacy");

impl MetaStore {
    /// Sets whether `user` hides its last seen.
    pub fn set_last_seen_hidden(&self, user: UserId, hidden: bool) -> Result<(), MetaError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PRIVACY)?;
            if hidden {
                table.insert(user.0, 1)?;
            } else {
                table.remove(user.0)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// For the users `keep` accepts (a shard loads its own): the last time
    /// any of their devices was seen, and who hides it.
    pub fn load_presence(
        &self,
        keep: impl Fn(u64) -> bool,
    ) -> Result<(HashMap<u64, u64>, HashSet<u64>), MetaError> {
        let txn = self.db.begin_read()?;
        let info = txn.open_table(DEVICE_INFO)?;
        let mut seen: HashMap<u64, u64> = HashMap::new();
        for row in info.iter()? {
            let (key, value) = row?;
            let user = key.value().0;
            let last = value.value().1;
            if last > 0 && keep(user) {
                let entry = seen.entry(user).or_default();
                *entry = (*entry).max(last);
            }
        }
        let privacy = txn.open_table(PRIVACY)?;
        let mut hidden = HashSet::new();
        for row in privacy.iter()? {
            let (user, _) = row?;
            if keep(user.value()) {
                hidden.insert(user.value());
            }
        }
        Ok((seen, hidden))
    }
}
