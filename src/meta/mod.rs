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
//!   constant time.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngCore;
use redb::{Database, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{DeviceId, UserId};

/// Bytes of a device secret.
pub const SECRET_BYTES: usize = 32;

/// (user id, device id) → SHA-256 of the device secret.
const DEVICES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("devices");
/// Named counters: `next_user_id`.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_USER_ID: &str = "next_user_id";

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

pub struct MetaStore {
    db: Database,
    /// One past the highest allocated user id.
    next_user_id: AtomicU64,
}

fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl MetaStore {
    /// Opens or creates the database file.
    pub fn open(path: &Path) -> Result<MetaStore, MetaError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let next = {
            txn.open_table(DEVICES)?;
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
        Ok(MetaStore {
            db,
            next_user_id: AtomicU64::new(next),
        })
    }

    /// Creates an account with device 1 and a fresh random secret.
    pub fn register(&self) -> Result<NewAccount, MetaError> {
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

    /// Whether `secret` is the device's secret. Unknown devices and wrong
    /// secrets look the same to the caller.
    pub fn verify(&self, user: UserId, device: DeviceId, secret: &[u8]) -> Result<bool, MetaError> {
        let txn = self.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        let presented = hash_secret(secret);
        let stored = devices.get((user.0, device.0))?;
        Ok(match stored {
            Some(stored) => {
                let stored = stored.value();
                secret.len() == SECRET_BYTES && bool::from(stored.ct_eq(&presented[..]))
            }
            None => false,
        })
    }

    /// Whether the account exists (answered from memory; see the invariants).
    pub fn user_exists(&self, user: UserId) -> bool {
        user.0 >= 1 && user.0 < self.next_user_id.load(Ordering::Acquire)
    }

    /// Whether `device` of `user` exists (answered from memory). In protocol
    /// v1 an account has exactly one device, 1, created by Register; the
    /// relay bit (`ids::RELAY_DEVICE_BIT`) never names a device.
    pub fn device_exists(&self, user: UserId, device: DeviceId) -> bool {
        self.user_exists(user) && device == crate::ids::PRIMARY_DEVICE
    }

    /// Accounts created so far.
    pub fn user_count(&self) -> u64 {
        self.next_user_id.load(Ordering::Acquire) - 1
    }

    /// The devices of an account (v1: device 1 of every existing account).
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
            let a = meta.register().unwrap();
            let b = meta.register().unwrap();
            assert_eq!((a.user, b.user), (UserId(1), UserId(2)));
            assert_eq!(a.device, DeviceId(1));
            assert_ne!(a.secret, b.secret);
            a
        };
        let meta = MetaStore::open(&path).unwrap();
        assert!(meta.user_exists(UserId(2)));
        assert!(!meta.user_exists(UserId(3)));
        assert!(!meta.user_exists(UserId(0)));
        assert_eq!(meta.register().unwrap().user, UserId(3));
        assert!(meta
            .verify(first.user, first.device, &first.secret)
            .unwrap());
        assert_eq!(meta.devices(first.user).unwrap(), vec![DeviceId(1)]);
    }

    #[test]
    fn rejects_wrong_secret_unknown_device_and_short_secret() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        let account = meta.register().unwrap();
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
}
