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

/// (user, device) → push endpoint: kind byte (1 Web Push, 2 webhook), then
/// the URL or token.
pub(super) const PUSH_ENDPOINTS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("push_endpoints");

/// Where a device's wake-ups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushEndpoint {
    /// A Web Push subscription's endpoint URL.
    WebPush(String),
    /// A token for the operator's webhook.
    Webhook(String),
}

impl MetaStore {
    /// Sets (or with `None` removes) a device's push endpoint.
    pub fn set_push_endpoint(
        &self,
        user: UserId,
        device: crate::ids::DeviceId,
        endpoint: Option<&PushEndpoint>,
    ) -> Result<(), MetaError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PUSH_ENDPOINTS)?;
            match endpoint {
                Some(endpoint) => {
                    let (kind, text) = match endpoint {
                        PushEndpoint::WebPush(url) => (1u8, url),
                        PushEndpoint::Webhook(token) => (2u8, token),
                    };
                    let mut value = vec![kind];
                    value.extend_from_slice(text.as_bytes());
                    table.insert((user.0, device.0), value.as_slice())?;
                }
                None => {
                    table.remove((user.0, device.0))?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// A device's push endpoint, if it registered one.
    pub fn push_endpoint(
        &self,
        user: UserId,
        device: crate::ids::DeviceId,
    ) -> Result<Option<PushEndpoint>, MetaError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PUSH_ENDPOINTS)?;
        let Some(value) = table.get((user.0, device.0))? else {
            return Ok(None);
        };
        let value = value.value();
        let text = String::from_utf8_lossy(value.get(1..).unwrap_or_default()).into_owned();
        Ok(match value.first() {
            Some(1) => Some(PushEndpoint::WebPush(text)),
            Some(2) => Some(PushEndpoint::Webhook(text)),
            _ => None,
        })
    }
}
