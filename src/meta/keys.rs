//! Prekeys in the metadata database: each device's identity key and signed
//! prekey, and its one-time prekeys, each handed out at most once.
//!
//! The server never looks inside a key: it checks lengths and stores bytes.
//! A fetch takes one one-time prekey per device of an account in one write
//! transaction, and redb runs one write transaction at a time, so two
//! fetches (from any shards) never get the same key; the key is gone from
//! the table once the transaction commits, before the bundle is sent, so a
//! crash never hands it out again.

use redb::{ReadableTable, TableDefinition};

use super::{MetaError, MetaStore};
use crate::ids::{DeviceId, UserId};

/// (user, device) → identity key, signed prekey id, signed prekey,
/// signature (each length-prefixed; `encode_identity`).
pub(super) const PREKEY_IDENTITY: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("prekey_identity");
/// (user, device, key id) → one-time prekey.
pub(super) const ONE_TIME_PREKEYS: TableDefinition<(u64, u32, u32), &[u8]> =
    TableDefinition::new("one_time_prekeys");

/// A device's long-term keys as uploaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityKeys {
    pub identity_key: Vec<u8>,
    pub signed_prekey_id: u32,
    pub signed_prekey: Vec<u8>,
    pub signature: Vec<u8>,
}

/// One device's part of a fetched bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKeys {
    pub device: DeviceId,
    pub identity: IdentityKeys,
    /// The one-time prekey taken for this fetch (`None`: none left).
    pub one_time: Option<(u32, Vec<u8>)>,
    /// One-time prekeys the device has left after this fetch.
    pub remaining: u32,
}

fn encode_identity(keys: &IdentityKeys) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.identity_key.len() + keys.signed_prekey.len() + 80);
    for part in [&keys.identity_key, &keys.signed_prekey, &keys.signature] {
        out.push(part.len() as u8);
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&keys.signed_prekey_id.to_le_bytes());
    out
}

fn decode_identity(bytes: &[u8]) -> Option<IdentityKeys> {
    let mut at = 0;
    let mut part = || {
        let len = *bytes.get(at)? as usize;
        let value = bytes.get(at + 1..at + 1 + len)?.to_vec();
        at += 1 + len;
        Some(value)
    };
    let identity_key = part()?;
    let signed_prekey = part()?;
    let signature = part()?;
    let id = bytes.get(at..at + 4)?;
    Some(IdentityKeys {
        identity_key,
        signed_prekey_id: u32::from_le_bytes(id.try_into().ok()?),
        signed_prekey,
        signature,
    })
}

impl MetaStore {
    /// Stores a device's upload: its identity keys (`None`: keep the ones
    /// stored) and one-time prekeys (added; an id already stored is
    /// replaced). A new identity key drops the one-time prekeys made for
    /// the old one. Returns the one-time prekeys the device has now, or
    /// `None` when it has never uploaded identity keys and gave none, or
    /// when it would hold more than `max` one-time prekeys (nothing is
    /// stored then).
    pub fn upload_prekeys(
        &self,
        user: UserId,
        device: DeviceId,
        identity: Option<&IdentityKeys>,
        one_time: &[(u32, &[u8])],
        max: u32,
    ) -> Result<Option<u32>, MetaError> {
        let txn = self.db.begin_write()?;
        let count = {
            let mut identities = txn.open_table(PREKEY_IDENTITY)?;
            let mut keys = txn.open_table(ONE_TIME_PREKEYS)?;
            let stored = identities
                .get((user.0, device.0))?
                .and_then(|v| decode_identity(v.value()));
            match (identity, &stored) {
                (None, None) => return Ok(None),
                (Some(new), old) => {
                    if old
                        .as_ref()
                        .is_some_and(|o| o.identity_key != new.identity_key)
                    {
                        keys.retain_in(
                            (user.0, device.0, 0)..=(user.0, device.0, u32::MAX),
                            |_, _| false,
                        )?;
                    }
                    identities.insert((user.0, device.0), encode_identity(new).as_slice())?;
                }
                (None, Some(_)) => {}
            }
            for &(id, key) in one_time {
                keys.insert((user.0, device.0, id), key)?;
            }
            let count = keys
                .range((user.0, device.0, 0)..=(user.0, device.0, u32::MAX))?
                .count() as u32;
            if count > max {
                return Ok(None);
            }
            count
        };
        txn.commit()?;
        Ok(Some(count))
    }

    /// The prekey bundle of `user`'s devices in `devices` that uploaded
    /// keys, taking (deleting) one one-time prekey of each: the lowest id.
    pub fn fetch_prekeys(
        &self,
        user: UserId,
        devices: &[DeviceId],
    ) -> Result<Vec<DeviceKeys>, MetaError> {
        let txn = self.db.begin_write()?;
        let mut out = Vec::new();
        {
            let identities = txn.open_table(PREKEY_IDENTITY)?;
            let mut keys = txn.open_table(ONE_TIME_PREKEYS)?;
            for &device in devices {
                let Some(identity) = identities
                    .get((user.0, device.0))?
                    .and_then(|v| decode_identity(v.value()))
                else {
                    continue;
                };
                let range = (user.0, device.0, 0)..=(user.0, device.0, u32::MAX);
                let first = keys
                    .range(range.clone())?
                    .next()
                    .transpose()?
                    .map(|(k, v)| (k.value().2, v.value().to_vec()));
                if let Some((id, _)) = &first {
                    keys.remove((user.0, device.0, *id))?;
                }
                let remaining = keys.range(range)?.count() as u32;
                out.push(DeviceKeys {
                    device,
                    identity,
                    one_time: first,
                    remaining,
                });
            }
        }
        txn.commit()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(byte: u8) -> IdentityKeys {
        IdentityKeys {
            identity_key: vec![byte; 32],
            signed_prekey_id: 7,
            signed_prekey: vec![byte + 1; 32],
            signature: vec![byte + 2; 64],
        }
    }

    #[test]
    fn one_time_prekeys_are_handed_out_once_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let (u, d) = (UserId(1), DeviceId(1));
        {
            let meta = MetaStore::open(&path).unwrap();
            assert_eq!(
                meta.upload_prekeys(u, d, None, &[(1, &[1; 32])], 10)
                    .unwrap(),
                None
            );
            let keys: Vec<(u32, Vec<u8>)> = (1..=3).map(|i| (i, vec![i as u8; 32])).collect();
            let refs: Vec<(u32, &[u8])> = keys.iter().map(|(i, k)| (*i, &k[..])).collect();
            assert_eq!(
                meta.upload_prekeys(u, d, Some(&identity(9)), &refs, 10)
                    .unwrap(),
                Some(3)
            );
            let first = meta.fetch_prekeys(u, &[d, DeviceId(2)]).unwrap();
            assert_eq!(first.len(), 1, "device 2 uploaded nothing");
            assert_eq!(first[0].one_time, Some((1, vec![1; 32])));
            assert_eq!(first[0].remaining, 2);
            assert_eq!(first[0].identity, identity(9));
        }
        let meta = MetaStore::open(&path).unwrap();
        let taken: Vec<Option<u32>> = (0..3)
            .map(|_| {
                meta.fetch_prekeys(u, &[d]).unwrap()[0]
                    .one_time
                    .as_ref()
                    .map(|k| k.0)
            })
            .collect();
        assert_eq!(taken, vec![Some(2), Some(3), None]);
        // Over the bound: nothing stored.
        let many: Vec<(u32, Vec<u8>)> = (10..=20).map(|i| (i, vec![0; 32])).collect();
        let refs: Vec<(u32, &[u8])> = many.iter().map(|(i, k)| (*i, &k[..])).collect();
        assert_eq!(meta.upload_prekeys(u, d, None, &refs, 10).unwrap(), None);
        assert_eq!(meta.fetch_prekeys(u, &[d]).unwrap()[0].remaining, 0);
        // A new identity drops the old one-time prekeys.
        meta.upload_prekeys(u, d, None, &refs[..2], 10).unwrap();
        assert_eq!(
            meta.upload_prekeys(u, d, Some(&identity(3)), &[], 10)
                .unwrap(),
            Some(0)
        );
    }
}
