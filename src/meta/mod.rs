//! Accounts and device credentials in an embedded transactional database.
//!
//! Small, rarely written metadata lives in redb (`<data_dir>/meta.redb`), not
//! in hand-written files. One `MetaStore` is shared by every shard
//! (`Arc<MetaStore>`); redb serialises writers itself. Every call here can
//! block on disk, so shards run them on glommio's blocking pool, never on the
//! executor thread.
//!
//! Invariants:
//! - user ids are allocated from a counter in the same transaction that
//!   creates the account, so they are dense (1, 2, 3, …) and never reused;
//!   accounts are not deleted in v1, which is what lets `user_exists` answer
//!   from an in-memory watermark without touching the database.
//! - only SHA-256 of a device secret is stored; secrets are compared in
//!   constant time. Link codes are kept the same way: only their hash.
//! - device ids of an account are allocated from its own counter and never
//!   reused (device 1 is the primary, made by Register); every link and
//!   removal bumps the account's device-list version in the same
//!   transaction.
//! - a link code is redeemed at most once: the transaction that creates the
//!   companion deletes the code.
//! - `device_exists` and `devices` answer from memory: accounts whose only
//!   device is the primary are not kept there at all, accounts with
//!   companions are (loaded at open, updated after each commit).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use rand::RngCore;
use redb::{Database, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{DeviceId, UserId};

mod groups;
mod keys;
mod presence;
pub use groups::{clip_group_name, GroupRow, GROUP_NAME_BYTES_MAX};
pub use keys::{DeviceKeys, IdentityKeys};
pub use presence::PushEndpoint;

/// Bytes of a device secret.
pub const SECRET_BYTES: usize = 32;

/// (user id, device id) → SHA-256 of the device secret.
const DEVICES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("devices");
/// (user id, device id) → the device's Noise static public key (32 bytes):
/// its login, recorded when it registered or linked over Noise, or bound
/// once by a Noise Hello that carried its secret. A device with a row here
/// logs in only by this key.
const DEVICE_KEYS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("device_keys");
/// Named counters: `next_user_id`.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_USER_ID: &str = "next_user_id";
/// (user id, device id) → (linked at ms, last seen ms, name). Device 1 of
/// an account registered before linked devices existed has no row (its
/// linked-at is then 0).
const DEVICE_INFO: TableDefinition<(u64, u32), (u64, u64, &str)> =
    TableDefinition::new("device_info");
/// user id → (next device id, device-list version). No row: (2, 1).
const ACCOUNTS: TableDefinition<u64, (u32, u64)> = TableDefinition::new("accounts");
/// SHA-256 of a link code → (user id, expires at ms).
const LINK_CODES: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("link_codes");

/// Random bytes in a link code (shown as twice as many hex digits).
pub const LINK_CODE_BYTES: usize = 10;
/// Longest device name kept, in bytes of UTF-8.
pub const DEVICE_NAME_BYTES_MAX: usize = 64;
/// Stripes of the in-memory companion registry (by user id).
const STRIPES: usize = 64;

/// A failure of the metadata database (boxed: redb's errors are large and
/// this travels through every handshake's result).
#[derive(Debug, thiserror::Error)]
#[error("metadata database: {0}")]
pub struct MetaError(Box<redb::Error>);

macro_rules! meta_error_from {
    ($($source:ty),*) => {$(
        impl From<$source> for MetaError {
            fn from(err: $source) -> MetaError {
                MetaError(Box::new(err.into()))
            }
        }
    )*};
}
meta_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A newly created account's credentials; the secret exists only here and in
/// the Registered frame.
#[derive(Clone, Debug)]
pub struct NewAccount {
    pub user: UserId,
    pub device: DeviceId,
    pub secret: [u8; SECRET_BYTES],
}

/// One device of an account as a device list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: DeviceId,
    pub name: String,
    pub linked_at_ms: u64,
    pub last_seen_ms: u64,
}

/// An account's devices and the list's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceList {
    pub version: u64,
    pub devices: Vec<DeviceInfo>,
}

/// A one-time link code, shown to the user on the primary device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkCode {
    /// `2 * LINK_CODE_BYTES` lowercase hex digits.
    pub code: String,
    pub expires_at_ms: u64,
}

/// Why a link code was not redeemed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Unknown, already used or expired (the three look the same).
    #[error("unknown, used or expired link code")]
    InvalidCode,
    /// The account has its maximum of companions.
    #[error("the account has its maximum of companion devices")]
    TooManyDevices,
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Why a device was not removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no such device")]
    UnknownDevice,
    /// The primary device cannot be removed.
    #[error("the primary device cannot be removed")]
    Primary,
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// A device set kept in memory (accounts with companions only).
#[derive(Clone, Debug)]
struct Companions {
    version: u64,
    /// Every device of the account, the primary included, ascending.
    devices: Vec<DeviceId>,
}

pub struct MetaStore {
    db: Database,
    /// One past the highest allocated user id.
    next_user_id: AtomicU64,
    /// Accounts with more than the primary device, striped by user id.
    companions: Vec<RwLock<HashMap<u64, Companions>>>,
}

fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Whether `secret` is the stored secret of the device (constant time).
fn secret_matches(
    devices: &impl ReadableTable<(u64, u32), &'static [u8]>,
    user: UserId,
    device: DeviceId,
    secret: &[u8],
) -> Result<bool, redb::StorageError> {
    let presented = hash_secret(secret);
    Ok(match devices.get((user.0, device.0))? {
        Some(stored) => {
            secret.len() == SECRET_BYTES && bool::from(stored.value().ct_eq(&presented[..]))
        }
        None => false,
    })
}

/// A link code as typed: hex digits, any case, with any spaces or dashes.
fn normalize_code(code: &str) -> Option<[u8; LINK_CODE_BYTES]> {
    let digits: String = code
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .collect::<String>()
        .to_ascii_lowercase();
    let mut out = [0u8; LINK_CODE_BYTES];
    hex::decode_to_slice(digits.as_bytes(), &mut out).ok()?;
    Some(out)
}

/// Cuts `name` to at most `DEVICE_NAME_BYTES_MAX` bytes on a char boundary.
fn clip_name(name: &str) -> &str {
    if name.len() <= DEVICE_NAME_BYTES_MAX {
        return name;
    }
    let mut end = DEVICE_NAME_BYTES_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl MetaStore {
    /// Opens or creates the database file.
    pub fn open(path: &Path) -> Result<MetaStore, MetaError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let next = {
            txn.open_table(DEVICES)?;
            txn.open_table(DEVICE_INFO)?;
            txn.open_table(DEVICE_KEYS)?;
            txn.open_table(ACCOUNTS)?;
            txn.open_table(LINK_CODES)?;
            txn.open_table(groups::GROUPS)?;
            txn.open_table(groups::GROUP_MEMBERS)?;
            txn.open_table(keys::PREKEY_IDENTITY)?;
            txn.open_table(keys::ONE_TIME_PREKEYS)?;
            txn.open_table(presence::PRIVACY)?;
            txn.open_table(presence::PUSH_ENDPOINTS)?;
            let mut counters = txn.open_table(COUNTERS)?;
            let next = counters.get(NEXT_USER_ID)?.map(|v| v.value());
            match next {
                Some(next) => next,
                None => {
                    counters.insert(NEXT_USER_ID, 1)?;
                    1
                }
            }
        };
        txn.commit()?;
        let store = MetaStore {
            db,
            next_user_id: AtomicU64::new(next),
            companions: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect(),
        };
        store.load_companions()?;
        Ok(store)
    }

    /// Fills the in-memory registry from the database: every account that
    /// has companions or ever had (its version is past 1).
    fn load_companions(&self) -> Result<(), MetaError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let accounts = txn.open_table(ACCOUNTS)?;
        let mut sets: HashMap<u64, Vec<DeviceId>> = HashMap::new();
        for entry in accounts.iter()? {
            sets.entry(entry?.0.value()).or_default();
        }
        for entry in devices.iter()? {
            let (key, _) = entry?;
            let (user, device) = key.value();
            if device != crate::ids::PRIMARY_DEVICE.0 || sets.contains_key(&user) {
                sets.entry(user).or_default().push(DeviceId(device));
            }
        }
        for (user, mut devices) in sets {
            devices.sort();
            devices.dedup();
            let version = accounts.get(user)?.map_or(1, |v| v.value().1);
            self.set_companions(user, Some(Companions { version, devices }));
        }
        Ok(())
    }

    fn stripe(&self, user: u64) -> &RwLock<HashMap<u64, Companions>> {
        &self.companions[(user as usize) % STRIPES]
    }

    fn set_companions(&self, user: u64, set: Option<Companions>) {
        let mut map = self.stripe(user).write().unwrap_or_else(|e| e.into_inner());
        match set {
            Some(set) if set.version != 1 || set.devices != [crate::ids::PRIMARY_DEVICE] => {
                map.insert(user, set);
            }
            _ => {
                map.remove(&user);
            }
        }
    }

    /// Reads an account's devices from the database (in a read transaction
    /// or a write one).
    fn read_list(
        devices: &impl ReadableTable<(u64, u32), &'static [u8]>,
        info: &impl ReadableTable<(u64, u32), (u64, u64, &'static str)>,
        accounts: &impl ReadableTable<u64, (u32, u64)>,
        user: u64,
    ) -> Result<DeviceList, MetaError> {
        let version = accounts.get(user)?.map_or(1, |v| v.value().1);
        let mut out = Vec::new();
        for entry in devices.range((user, 0)..=(user, u32::MAX))? {
            let (key, _) = entry?;
            let device = key.value().1;
            let (linked_at_ms, last_seen_ms, name) = match info.get((user, device))? {
                Some(row) => {
                    let (linked, seen, name) = row.value();
                    (linked, seen, name.to_string())
                }
                None => (0, 0, String::new()),
            };
            out.push(DeviceInfo {
                device: DeviceId(device),
                name,
                linked_at_ms,
                last_seen_ms,
            });
        }
        Ok(DeviceList {
            version,
            devices: out,
        })
    }

    /// Creates an account with device 1 and a fresh random secret; with
    /// `noise_key`, the device logs in by that Noise static key instead (the
    /// secret is stored hashed as ever, and never shown).
    pub fn register(&self, noise_key: Option<[u8; 32]>) -> Result<NewAccount, MetaError> {
        let mut secret = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let device = DeviceId(1);
        let txn = self.db.begin_write()?;
        let user = {
            let mut counters = txn.open_table(COUNTERS)?;
            let user = counters.get(NEXT_USER_ID)?.map_or(1, |v| v.value());
            counters.insert(NEXT_USER_ID, user + 1)?;
            let mut devices = txn.open_table(DEVICES)?;
            devices.insert((user, device.0), hash_secret(&secret).as_slice())?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut info = txn.open_table(DEVICE_INFO)?;
            info.insert((user, device.0), (now_ms, 0, ""))?;
            if let Some(key) = noise_key {
                let mut keys = txn.open_table(DEVICE_KEYS)?;
                keys.insert((user, device.0), key.as_slice())?;
            }
            user
        };
        txn.commit()?;
        // Published only after the commit: a Send to this user is accepted
        // only once the account is durable.
        self.next_user_id.fetch_max(user + 1, Ordering::Release);
        Ok(NewAccount {
            user: UserId(user),
            device,
            secret,
        })
    }

    /// Whether `secret` is the device's secret and the device has no Noise
    /// key (such a device logs in only by its key). Unknown devices and
    /// wrong secrets look the same to the caller.
    pub fn verify(&self, user: UserId, device: DeviceId, secret: &[u8]) -> Result<bool, MetaError> {
        let txn = self.db.begin_read()?;
        let keys = txn.open_table(DEVICE_KEYS)?;
        if keys.get((user.0, device.0))?.is_some() {
            return Ok(false);
        }
        let devices = txn.open_table(DEVICES)?;
        Ok(secret_matches(&devices, user, device, secret)?)
    }

    /// Checks a Noise login: `key` (the connection's authenticated static
    /// key) must be the device's recorded key. With `secret`, a device with
    /// no key yet (registered in plaintext) whose secret matches gets `key`
    /// bound to it, once; from then on only the key logs it in. Unknown
    /// devices, wrong keys and wrong secrets look the same to the caller.
    pub fn verify_key(
        &self,
        user: UserId,
        device: DeviceId,
        key: &[u8; 32],
        secret: &[u8],
    ) -> Result<bool, MetaError> {
        {
            let txn = self.db.begin_read()?;
            let keys = txn.open_table(DEVICE_KEYS)?;
            if let Some(stored) = keys.get((user.0, device.0))? {
                return Ok(secret.is_empty() && bool::from(stored.value().ct_eq(&key[..])));
            }
            if secret.is_empty() {
                return Ok(false);
            }
            let devices = txn.open_table(DEVICES)?;
            if !secret_matches(&devices, user, device, secret)? {
                return Ok(false);
            }
        }
        // Bind, checking again inside the write: a concurrent bind of
        // another key wins, and this login fails.
        let txn = self.db.begin_write()?;
        let bound = {
            let devices = txn.open_table(DEVICES)?;
            let mut keys = txn.open_table(DEVICE_KEYS)?;
            let taken = keys.get((user.0, device.0))?.is_some();
            if taken || !secret_matches(&devices, user, device, secret)? {
                false
            } else {
                keys.insert((user.0, device.0), key.as_slice())?;
                true
            }
        };
        txn.commit()?;
        Ok(bound)
    }

    /// The device's Noise key, if it has one.
    pub fn device_key(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<[u8; 32]>, MetaError> {
        let txn = self.db.begin_read()?;
        let keys = txn.open_table(DEVICE_KEYS)?;
        let key = keys.get((user.0, device.0))?;
        Ok(key.and_then(|k| k.value().try_into().ok()))
    }

    /// Whether the account exists (answered from memory; see the invariants).
    pub fn user_exists(&self, user: UserId) -> bool {
        user.0 >= 1 && user.0 < self.next_user_id.load(Ordering::Acquire)
    }

    /// Whether `device` of `user` exists (answered from memory). The relay
    /// bit (`ids::RELAY_DEVICE_BIT`) never names a device.
    pub fn device_exists(&self, user: UserId, device: DeviceId) -> bool {
        if !self.user_exists(user) {
            return false;
        }
        let map = self
            .stripe(user.0)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        match map.get(&user.0) {
            Some(set) => set.devices.binary_search(&device).is_ok(),
            None => device == crate::ids::PRIMARY_DEVICE,
        }
    }

    /// Whether the account has (or had) companions: a plain Send to an
    /// account without any needs no device set (no allocation).
    pub fn has_companions(&self, user: UserId) -> bool {
        let map = self
            .stripe(user.0)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        map.contains_key(&user.0)
    }

    /// The account's device ids and the list's version, from memory (the
    /// primary alone, version 1, for an account that never linked one).
    /// `None` for an unknown account.
    pub fn device_set(&self, user: UserId) -> Option<(u64, Vec<DeviceId>)> {
        if !self.user_exists(user) {
            return None;
        }
        let map = self
            .stripe(user.0)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        Some(match map.get(&user.0) {
            Some(set) => (set.version, set.devices.clone()),
            None => (1, vec![crate::ids::PRIMARY_DEVICE]),
        })
    }

    /// A new one-time link code for `user`, valid until `now_ms + ttl_ms`.
    /// It replaces any earlier code of `user`; expired codes of every
    /// account are dropped in the same transaction.
    pub fn create_link_code(
        &self,
        user: UserId,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<LinkCode, MetaError> {
        let mut raw = [0u8; LINK_CODE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        let txn = self.db.begin_write()?;
        {
            let mut codes = txn.open_table(LINK_CODES)?;
            // One live code per account: a new one replaces the last, so a
            // primary asking again and again keeps one row, not many.
            codes.retain(|_, (owner, expires)| expires > now_ms && owner != user.0)?;
            codes.insert(hash_secret(&raw).as_slice(), (user.0, expires_at_ms))?;
        }
        txn.commit()?;
        Ok(LinkCode {
            code: hex::encode(raw),
            expires_at_ms,
        })
    }

    /// Redeems a link code: creates the next companion device of the code's
    /// account, named `name` (clipped to `DEVICE_NAME_BYTES_MAX` bytes),
    /// with a fresh secret. The code is gone afterwards whatever the
    /// outcome, except after a database failure.
    pub fn redeem_link_code(
        &self,
        code: &str,
        name: &str,
        now_ms: u64,
        companions_max: u32,
        noise_key: Option<[u8; 32]>,
    ) -> Result<NewAccount, LinkError> {
        let raw = normalize_code(code).ok_or(LinkError::InvalidCode)?;
        let key = hash_secret(&raw);
        let mut secret = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let txn = self.db.begin_write().map_err(MetaError::from)?;
        let outcome = (|| -> Result<Result<(NewAccount, Companions), LinkError>, MetaError> {
            let mut codes = txn.open_table(LINK_CODES)?;
            let Some((user, expires)) = codes.remove(key.as_slice())?.map(|v| v.value()) else {
                return Ok(Err(LinkError::InvalidCode));
            };
            if expires <= now_ms {
                return Ok(Err(LinkError::InvalidCode));
            }
            let mut devices = txn.open_table(DEVICES)?;
            let mut existing = Vec::new();
            for entry in devices.range((user, 0)..=(user, u32::MAX))? {
                existing.push(DeviceId(entry?.0.value().1));
            }
            let companions = existing
                .iter()
                .filter(|d| **d != crate::ids::PRIMARY_DEVICE)
                .count();
            if companions >= companions_max as usize {
                return Ok(Err(LinkError::TooManyDevices));
            }
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let (next_device, version) = accounts.get(user)?.map_or((2, 1), |v| v.value());
            let device = DeviceId(next_device);
            accounts.insert(user, (next_device + 1, version + 1))?;
            devices.insert((user, device.0), hash_secret(&secret).as_slice())?;
            let mut info = txn.open_table(DEVICE_INFO)?;
            info.insert((user, device.0), (now_ms, now_ms, clip_name(name)))?;
            if let Some(key) = noise_key {
                let mut keys = txn.open_table(DEVICE_KEYS)?;
                keys.insert((user, device.0), key.as_slice())?;
            }
            existing.push(device);
            existing.sort();
            Ok(Ok((
                NewAccount {
                    user: UserId(user),
                    device,
                    secret,
                },
                Companions {
                    version: version + 1,
                    devices: existing,
                },
            )))
        })()?;
        // A refused code is still used up: commit its removal.
        txn.commit().map_err(MetaError::from)?;
        let (account, set) = outcome?;
        self.set_companions(account.user.0, Some(set));
        Ok(account)
    }

    /// The account's devices with their names and times, read from the
    /// database.
    pub fn device_list(&self, user: UserId) -> Result<DeviceList, MetaError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let info = txn.open_table(DEVICE_INFO)?;
        let accounts = txn.open_table(ACCOUNTS)?;
        Self::read_list(&devices, &info, &accounts, user.0)
    }

    /// Removes a companion: its secret (so its Hellos fail from now on)
    /// and its row, and bumps the list's version. Returns the new version.
    pub fn remove_device(&self, user: UserId, device: DeviceId) -> Result<u64, RemoveError> {
        if device == crate::ids::PRIMARY_DEVICE {
            return Err(RemoveError::Primary);
        }
        let txn = self.db.begin_write().map_err(MetaError::from)?;
        let (version, set) = {
            let mut devices = txn.open_table(DEVICES).map_err(MetaError::from)?;
            if devices
                .remove((user.0, device.0))
                .map_err(MetaError::from)?
                .is_none()
            {
                return Err(RemoveError::UnknownDevice);
            }
            let mut info = txn.open_table(DEVICE_INFO).map_err(MetaError::from)?;
            info.remove((user.0, device.0)).map_err(MetaError::from)?;
            let mut keys = txn.open_table(DEVICE_KEYS).map_err(MetaError::from)?;
            keys.remove((user.0, device.0)).map_err(MetaError::from)?;
            let mut accounts = txn.open_table(ACCOUNTS).map_err(MetaError::from)?;
            let (next_device, version) = accounts
                .get(user.0)
                .map_err(MetaError::from)?
                .map_or((2, 1), |v| v.value());
            accounts
                .insert(user.0, (next_device, version + 1))
                .map_err(MetaError::from)?;
            let mut left = Vec::new();
            for entry in devices
                .range((user.0, 0)..=(user.0, u32::MAX))
                .map_err(MetaError::from)?
            {
                left.push(DeviceId(entry.map_err(MetaError::from)?.0.value().1));
            }
            (
                version + 1,
                Companions {
                    version: version + 1,
                    devices: left,
                },
            )
        };
        txn.commit().map_err(MetaError::from)?;
        self.set_companions(user.0, Some(set));
        Ok(version)
    }

    /// Records when devices were last seen (one transaction for all).
    /// Removed devices are skipped.
    pub fn record_last_seen(&self, seen: &[(UserId, DeviceId, u64)]) -> Result<(), MetaError> {
        if seen.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let devices = txn.open_table(DEVICES)?;
            let mut info = txn.open_table(DEVICE_INFO)?;
            for (user, device, at_ms) in seen {
                if devices.get((user.0, device.0))?.is_none() {
                    continue;
                }
                let row = info.get((user.0, device.0))?.map(|v| {
                    let (linked, seen, name) = v.value();
                    (linked, seen, name.to_string())
                });
                let (linked, previous, name) = row.unwrap_or((0, 0, String::new()));
                if *at_ms > previous {
                    info.insert((user.0, device.0), (linked, *at_ms, name.as_str()))?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Accounts created so far.
    pub fn user_count(&self) -> u64 {
        self.next_user_id.load(Ordering::Acquire) - 1
    }

    /// The devices of an account, read from the database.
    pub fn devices(&self, user: UserId) -> Result<Vec<DeviceId>, MetaError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for entry in devices.range((user.0, 0)..=(user.0, u32::MAX))? {
            let (key, _) = entry?;
            out.push(DeviceId(key.value().1));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_dense_ids_that_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let first = {
            let meta = MetaStore::open(&path).unwrap();
            let a = meta.register(None).unwrap();
            let b = meta.register(None).unwrap();
            assert_eq!((a.user, b.user), (UserId(1), UserId(2)));
            assert_eq!(a.device, DeviceId(1));
            assert_ne!(a.secret, b.secret);
            a
        };
        let meta = MetaStore::open(&path).unwrap();
        assert!(meta.user_exists(UserId(2)));
        assert!(!meta.user_exists(UserId(3)));
        assert!(!meta.user_exists(UserId(0)));
        assert_eq!(meta.register(None).unwrap().user, UserId(3));
        assert!(meta
            .verify(first.user, first.device, &first.secret)
            .unwrap());
        assert_eq!(meta.devices(first.user).unwrap(), vec![DeviceId(1)]);
    }

    #[test]
    fn rejects_wrong_secret_unknown_device_and_short_secret() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let account = meta.register(None).unwrap();
        let mut wrong = account.secret;
        wrong[0] ^= 1;
        assert!(!meta.verify(account.user, account.device, &wrong).unwrap());
        assert!(!meta
            .verify(account.user, DeviceId(2), &account.secret)
            .unwrap());
        assert!(!meta
            .verify(UserId(99), DeviceId(1), &account.secret)
            .unwrap());
        assert!(!meta
            .verify(account.user, account.device, &account.secret[..16])
            .unwrap());
    }

    #[test]
    fn a_link_code_makes_one_companion_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let meta = MetaStore::open(&path).unwrap();
        let owner = meta.register(None).unwrap();
        let other = meta.register(None).unwrap();
        assert_eq!(meta.device_set(owner.user), Some((1, vec![DeviceId(1)])));
        let code = meta.create_link_code(owner.user, 1_000, 60_000).unwrap();
        assert_eq!(code.code.len(), 2 * LINK_CODE_BYTES);
        assert_eq!(code.expires_at_ms, 61_000);
        // Typed with dashes and capitals, as a person would.
        let typed = format!("{}-{}", &code.code[..10], &code.code[10..]).to_uppercase();
        let linked = meta
            .redeem_link_code(&typed, "laptop", 2_000, 4, None)
            .unwrap();
        assert_eq!((linked.user, linked.device), (owner.user, DeviceId(2)));
        assert!(meta
            .verify(owner.user, DeviceId(2), &linked.secret)
            .unwrap());
        assert!(meta.device_exists(owner.user, DeviceId(2)));
        assert!(!meta.device_exists(other.user, DeviceId(2)));
        assert_eq!(
            meta.device_set(owner.user),
            Some((2, vec![DeviceId(1), DeviceId(2)]))
        );
        assert!(matches!(
            meta.redeem_link_code(&code.code, "again", 2_000, 4, None),
            Err(LinkError::InvalidCode)
        ));
        let list = meta.device_list(owner.user).unwrap();
        assert_eq!(list.version, 2);
        assert_eq!(list.devices.len(), 2);
        assert_eq!(list.devices[1].name, "laptop");
        assert_eq!(list.devices[1].linked_at_ms, 2_000);
        drop(meta);
        // The registry is rebuilt from the database.
        let meta = MetaStore::open(&path).unwrap();
        assert!(meta.device_exists(owner.user, DeviceId(2)));
        assert_eq!(meta.device_set(owner.user).unwrap().0, 2);
    }

    #[test]
    fn expired_unknown_and_malformed_codes_are_refused_and_limits_hold() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let owner = meta.register(None).unwrap();
        let code = meta.create_link_code(owner.user, 0, 100).unwrap();
        assert!(matches!(
            meta.redeem_link_code(&code.code, "late", 100, 4, None),
            Err(LinkError::InvalidCode)
        ));
        // A newer code replaces an older one of the same account.
        let older = meta.create_link_code(owner.user, 0, 100).unwrap();
        let _newer = meta.create_link_code(owner.user, 0, 100).unwrap();
        assert!(matches!(
            meta.redeem_link_code(&older.code, "old", 1, 4, None),
            Err(LinkError::InvalidCode)
        ));
        for bad in [
            "",
            "zz",
            "00000000000000000000",
            "0123456789abcdef0123456789",
        ] {
            assert!(matches!(
                meta.redeem_link_code(bad, "x", 0, 4, None),
                Err(LinkError::InvalidCode)
            ));
        }
        for n in 0..2 {
            let code = meta.create_link_code(owner.user, 0, 100).unwrap();
            let name = "é".repeat(100);
            let linked = meta
                .redeem_link_code(&code.code, &name, 1, 2, None)
                .unwrap();
            assert_eq!(linked.device, DeviceId(2 + n));
        }
        let code = meta.create_link_code(owner.user, 0, 100).unwrap();
        assert!(matches!(
            meta.redeem_link_code(&code.code, "third", 1, 2, None),
            Err(LinkError::TooManyDevices)
        ));
        // Used up even though refused.
        assert!(matches!(
            meta.redeem_link_code(&code.code, "third", 1, 3, None),
            Err(LinkError::InvalidCode)
        ));
        let list = meta.device_list(owner.user).unwrap();
        assert!(list.devices[1].name.len() <= DEVICE_NAME_BYTES_MAX);
    }

    #[test]
    fn removal_revokes_the_secret_bumps_the_version_and_never_reuses_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let owner = meta.register(None).unwrap();
        let code = meta.create_link_code(owner.user, 0, 100).unwrap();
        let linked = meta
            .redeem_link_code(&code.code, "tablet", 1, 4, None)
            .unwrap();
        assert!(matches!(
            meta.remove_device(owner.user, DeviceId(1)),
            Err(RemoveError::Primary)
        ));
        assert!(matches!(
            meta.remove_device(owner.user, DeviceId(9)),
            Err(RemoveError::UnknownDevice)
        ));
        assert_eq!(meta.remove_device(owner.user, linked.device).unwrap(), 3);
        assert!(!meta
            .verify(owner.user, linked.device, &linked.secret)
            .unwrap());
        assert!(!meta.device_exists(owner.user, linked.device));
        assert_eq!(meta.device_set(owner.user), Some((3, vec![DeviceId(1)])));
        let code = meta.create_link_code(owner.user, 0, 100).unwrap();
        let again = meta
            .redeem_link_code(&code.code, "tablet", 2, 4, None)
            .unwrap();
        assert_eq!(again.device, DeviceId(3));
        meta.record_last_seen(&[
            (owner.user, DeviceId(3), 50),
            (owner.user, linked.device, 60),
            (owner.user, DeviceId(1), 70),
        ])
        .unwrap();
        let list = meta.device_list(owner.user).unwrap();
        assert_eq!(list.version, 4);
        let seen: Vec<_> = list
            .devices
            .iter()
            .map(|d| (d.device, d.last_seen_ms))
            .collect();
        assert_eq!(seen, vec![(DeviceId(1), 70), (DeviceId(3), 50)]);
    }
}
