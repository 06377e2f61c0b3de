//! Groups in the metadata database: a row per group (name, version) and
//! a row per member (admin or not).
//!
//! Each group is owned by its home shard (`route::shard_for` on its id),
//! which loads its groups at start and serialises the changes to each one;
//! these calls only write what it decided, one transaction per change.

use rand::RngCore;
use redb::{ReadableTable, TableDefinition};

use super::{MetaError, MetaStore};
use crate::ids::UserId;

/// group id → (version, name).
pub(super) const GROUPS: TableDefinition<u64, (u64, &str)> = TableDefinition::new("groups");
/// (group id, user id) → 1 for an admin, 0 for a member.
pub(super) const GROUP_MEMBERS: TableDefinition<(u64, u64), u8> =
    TableDefinition::new("group_members");

/// Longest group name kept, in bytes of UTF-8.
pub const GROUP_NAME_BYTES_MAX: usize = 128;

/// A group as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub id: u64,
    pub name: String,
    /// Changes made to the group, creation included (from 1).
    pub version: u64,
    /// Members ascending by user id, with their admin flag.
    pub members: Vec<(UserId, bool)>,
}

/// Cuts `name` to at most `GROUP_NAME_BYTES_MAX` bytes on a char boundary.
pub fn clip_group_name(name: &str) -> &str {
    if name.len() <= GROUP_NAME_BYTES_MAX {
        return name;
    }
    let mut end = GROUP_NAME_BYTES_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl MetaStore {
    /// Creates a group with a fresh random id (never 0, never one in use)
    /// and its members, at version 1.
    pub fn create_group(
        &self,
        name: &str,
        members: &[(UserId, bool)],
    ) -> Result<GroupRow, MetaError> {
        let name = clip_group_name(name);
        let txn = self.db.begin_write()?;
        let id = {
            let mut groups = txn.open_table(GROUPS)?;
            let id = loop {
                let id = rand::rngs::OsRng.next_u64();
                if id != 0 && groups.get(id)?.is_none() {
                    break id;
                }
            };
            groups.insert(id, (1, name))?;
            let mut rows = txn.open_table(GROUP_MEMBERS)?;
            for &(user, admin) in members {
                rows.insert((id, user.0), u8::from(admin))?;
            }
            id
        };
        txn.commit()?;
        let mut members = members.to_vec();
        members.sort();
        members.dedup_by_key(|(u, _)| *u);
        Ok(GroupRow {
            id,
            name: name.to_string(),
            version: 1,
            members,
        })
    }

    /// Writes one change to a group: its new name and version, members
    /// added or whose admin flag changed, members gone.
    pub fn save_group_change(
        &self,
        id: u64,
        name: &str,
        version: u64,
        upserts: &[(UserId, bool)],
        removals: &[UserId],
    ) -> Result<(), MetaError> {
        let txn = self.db.begin_write()?;
        {
            let mut groups = txn.open_table(GROUPS)?;
            groups.insert(id, (version, clip_group_name(name)))?;
            let mut rows = txn.open_table(GROUP_MEMBERS)?;
            for &(user, admin) in upserts {
                rows.insert((id, user.0), u8::from(admin))?;
            }
            for user in removals {
                rows.remove((id, user.0))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every group whose id `keep` accepts (a shard loads its own).
    pub fn load_groups(&self, keep: impl Fn(u64) -> bool) -> Result<Vec<GroupRow>, MetaError> {
        let txn = self.db.begin_read()?;
        let groups = txn.open_table(GROUPS)?;
        let rows = txn.open_table(GROUP_MEMBERS)?;
        let mut out = Vec::new();
        for entry in groups.iter()? {
            let (id, value) = entry?;
            let id = id.value();
            if !keep(id) {
                continue;
            }
            let (version, name) = value.value();
            let mut members = Vec::new();
            for row in rows.range((id, 0)..=(id, u64::MAX))? {
                let (key, admin) = row?;
                members.push((UserId(key.value().1), admin.value() != 0));
            }
            out.push(GroupRow {
                id,
                name: name.to_string(),
                version,
                members,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_survive_reopening_with_their_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (a, b) = {
            let meta = MetaStore::open(&path).unwrap();
            let a = meta
                .create_group("climbing", &[(UserId(1), true), (UserId(2), false)])
                .unwrap();
            let b = meta
                .create_group(&"x".repeat(300), &[(UserId(3), true)])
                .unwrap();
            assert_ne!(a.id, b.id);
            assert_eq!(b.name.len(), GROUP_NAME_BYTES_MAX);
            meta.save_group_change(
                a.id,
                "bouldering",
                2,
                &[(UserId(4), false), (UserId(2), true)],
                &[UserId(1)],
            )
            .unwrap();
            (a.id, b.id)
        };
        let meta = MetaStore::open(&path).unwrap();
        let mut all = meta.load_groups(|_| true).unwrap();
        all.sort_by_key(|g| g.id != a);
        assert_eq!(
            all[0],
            GroupRow {
                id: a,
                name: "bouldering".into(),
                version: 2,
                members: vec![(UserId(2), true), (UserId(4), false)],
            }
        );
        assert_eq!(all[1].id, b);
        assert_eq!(meta.load_groups(|id| id == b).unwrap().len(), 1);
    }
}
