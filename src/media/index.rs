//! The media index: which blobs exist and until when, the unfinished
//! uploads, and what each device uploaded today, in a redb database
//! (`<data_dir>/media/index.redb`). Every call blocks on disk: the service
//! runs them on tokio's blocking pool, never on a runtime worker.
//!
//! Invariants:
//! - `blob_expiry` holds exactly one `(expires_at_ms, blob)` per row of
//!   `blobs`, with the row's expiry; both change in one transaction.
//! - an upload's row is removed in the same transaction that adds its
//!   blob, so a crash leaves either the upload (its staged bytes can be
//!   stored again) or the blob, never neither.
//! - every write commits durably (redb's default) before the service
//!   answers.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::ids::{BlobId, UploadId, Uploader};
use super::limits::INDEX_CACHE_BYTES;
use crate::ids::{DeviceId, UserId};

/// blob id → (size bytes, expires at ms).
const BLOBS: TableDefinition<[u8; 32], (u64, u64)> = TableDefinition::new("blobs");
/// (expires at ms, blob id) → (): the blobs in expiry order, for the sweep.
const BLOB_EXPIRY: TableDefinition<(u64, [u8; 32]), ()> = TableDefinition::new("blob_expiry");
/// upload id → (user, device, size bytes, announced sha256, created at ms).
const UPLOADS: TableDefinition<u128, (u64, u32, u64, [u8; 32], u64)> =
    TableDefinition::new("uploads");
/// (user, device) → (UTC day number, bytes of uploads finished that day:
/// stored as blobs, or dropped for not matching their hash).
const DEVICE_QUOTA: TableDefinition<(u64, u32), (u64, u64)> = TableDefinition::new("device_quota");

/// A failure of the media index (boxed: redb's errors are large).
#[derive(Debug, thiserror::Error)]
#[error("media index: {0}")]
pub struct IndexError(Box<redb::Error>);

macro_rules! index_error_from {
    ($($source:ty),*) => {$(
        impl From<$source> for IndexError {
            fn from(err: $source) -> IndexError {
                IndexError(Box::new(err.into()))
            }
        }
    )*};
}
index_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<IndexError> for std::io::Error {
    fn from(err: IndexError) -> std::io::Error {
        std::io::Error::other(err)
    }
}

/// A stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRow {
    pub size_bytes: u64,
    pub expires_at_ms: u64,
}

/// An unfinished upload as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadRow {
    pub uploader: Uploader,
    pub size_bytes: u64,
    pub blob: BlobId,
    pub created_ms: u64,
}

pub struct Index {
    db: Database,
}

impl Index {
    /// Opens or creates the index.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let db = Database::builder()
            .set_cache_size(INDEX_CACHE_BYTES)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(BLOBS)?;
            txn.open_table(BLOB_EXPIRY)?;
            txn.open_table(UPLOADS)?;
            txn.open_table(DEVICE_QUOTA)?;
        }
        txn.commit()?;
        Ok(Index { db })
    }

    /// Bytes of every blob in the index (expired ones too, until swept)
    /// and how many there are.
    pub fn blob_totals(&self) -> Result<(u64, u64), IndexError> {
        let txn = self.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        let mut bytes = 0u64;
        for entry in blobs.iter()? {
            bytes += entry?.1.value().0;
        }
        Ok((bytes, blobs.len()?))
    }

    /// Every unfinished upload.
    pub fn uploads(&self) -> Result<Vec<(UploadId, UploadRow)>, IndexError> {
        let txn = self.db.begin_read()?;
        let uploads = txn.open_table(UPLOADS)?;
        let mut out = Vec::new();
        for entry in uploads.iter()? {
            let (id, row) = entry?;
            let (user, device, size_bytes, blob, created_ms) = row.value();
            out.push((
                UploadId(id.value()),
                UploadRow {
                    uploader: Uploader {
                        user: UserId(user),
                        device: DeviceId(device),
                    },
                    size_bytes,
                    blob: BlobId(blob),
                    created_ms,
                },
            ));
        }
        Ok(out)
    }

    pub fn blob(&self, blob: BlobId) -> Result<Option<BlobRow>, IndexError> {
        let txn = self.db.begin_read()?;
        let blobs = txn.open_table(BLOBS)?;
        Ok(blobs.get(blob.0)?.map(|row| {
            let (size_bytes, expires_at_ms) = row.value();
            BlobRow {
                size_bytes,
                expires_at_ms,
            }
        }))
    }

    /// Pushes a live blob's expiry to `expires_at_ms` and gives its size;
    /// None when it is absent or already expired at `now_ms`.
    pub fn renew(
        &self,
        blob: BlobId,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<Option<u64>, IndexError> {
        let txn = self.db.begin_write()?;
        let size = {
            let mut blobs = txn.open_table(BLOBS)?;
            let row = blobs.get(blob.0)?.map(|row| row.value());
            match row {
                Some((size, old_expiry)) if old_expiry > now_ms => {
                    let expires_at_ms = expires_at_ms.max(old_expiry);
                    let mut expiry = txn.open_table(BLOB_EXPIRY)?;
                    expiry.remove((old_expiry, blob.0))?;
                    expiry.insert((expires_at_ms, blob.0), ())?;
                    blobs.insert(blob.0, (size, expires_at_ms))?;
                    Some(size)
                }
                _ => None,
            }
        };
        if size.is_some() {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(size)
    }

    /// Bytes `who` finished on UTC day `day`.
    pub fn quota_used(&self, who: Uploader, day: u64) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        let quota = txn.open_table(DEVICE_QUOTA)?;
        let used = quota
            .get((who.user.0, who.device.0))?
            .map(|row| row.value())
            .filter(|(row_day, _)| *row_day == day)
            .map_or(0, |(_, bytes)| bytes);
        Ok(used)
    }

    pub fn insert_upload(&self, id: UploadId, row: UploadRow) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut uploads = txn.open_table(UPLOADS)?;
            uploads.insert(
                id.0,
                (
                    row.uploader.user.0,
                    row.uploader.device.0,
                    row.size_bytes,
                    row.blob.0,
                    row.created_ms,
                ),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn remove_uploads(&self, ids: &[UploadId]) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut uploads = txn.open_table(UPLOADS)?;
            for id in ids {
                uploads.remove(id.0)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Drops upload `id`, whose bytes did not hash to the announced blob,
    /// and charges its size to `who` for UTC day `day`, in one
    /// transaction: the service wrote and hashed those bytes, so they
    /// count against the device's quota as a stored blob's do (else a
    /// device could have unlimited bytes written and hashed per day).
    pub fn drop_mismatched(
        &self,
        id: UploadId,
        size_bytes: u64,
        who: Uploader,
        day: u64,
    ) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut uploads = txn.open_table(UPLOADS)?;
            uploads.remove(id.0)?;
        }
        charge(&txn, who, day, size_bytes)?;
        txn.commit()?;
        Ok(())
    }

    /// Turns upload `id` into blob `blob` (stored already) until
    /// `expires_at_ms` and charges its size to `who` for UTC day `day`, in
    /// one transaction. True when the blob was not in the index before
    /// (its bytes are new to the store).
    pub fn store_blob(
        &self,
        id: UploadId,
        blob: BlobId,
        size_bytes: u64,
        expires_at_ms: u64,
        who: Uploader,
        day: u64,
    ) -> Result<bool, IndexError> {
        let txn = self.db.begin_write()?;
        let new = {
            let mut uploads = txn.open_table(UPLOADS)?;
            uploads.remove(id.0)?;
            let mut blobs = txn.open_table(BLOBS)?;
            let mut expiry = txn.open_table(BLOB_EXPIRY)?;
            let old = blobs.insert(blob.0, (size_bytes, expires_at_ms))?;
            let old = old.map(|row| row.value());
            if let Some((_, old_expiry)) = old {
                expiry.remove((old_expiry, blob.0))?;
            }
            expiry.insert((expires_at_ms, blob.0), ())?;
            old.is_none()
        };
        charge(&txn, who, day, size_bytes)?;
        txn.commit()?;
        Ok(new)
    }

    /// Up to `max` blobs whose expiry is at or before `now_ms`, oldest
    /// first.
    pub fn expired(&self, now_ms: u64, max: usize) -> Result<Vec<BlobId>, IndexError> {
        let txn = self.db.begin_read()?;
        let expiry = txn.open_table(BLOB_EXPIRY)?;
        let mut out = Vec::new();
        for entry in expiry.range(..=(now_ms, [0xff; 32]))?.take(max) {
            out.push(BlobId(entry?.0.value().1));
        }
        Ok(out)
    }

    /// Removes those of `blobs` that are still expired at `now_ms`; gives
    /// the bytes removed.
    pub fn remove_expired(&self, blobs: &[BlobId], now_ms: u64) -> Result<u64, IndexError> {
        let txn = self.db.begin_write()?;
        let mut removed = 0u64;
        {
            let mut rows = txn.open_table(BLOBS)?;
            let mut expiry = txn.open_table(BLOB_EXPIRY)?;
            for blob in blobs {
                let row = rows.get(blob.0)?.map(|row| row.value());
                if let Some((size, expires_at_ms)) = row {
                    if expires_at_ms <= now_ms {
                        rows.remove(blob.0)?;
                        expiry.remove((expires_at_ms, blob.0))?;
                        removed += size;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(removed)
    }
}

/// Adds `bytes` to what `who` uploaded on UTC day `day`, within `txn`; a
/// row of an earlier day starts over.
fn charge(
    txn: &redb::WriteTransaction,
    who: Uploader,
    day: u64,
    bytes: u64,
) -> Result<(), IndexError> {
    let mut quota = txn.open_table(DEVICE_QUOTA)?;
    let key = (who.user.0, who.device.0);
    let used = quota
        .get(key)?
        .map(|row| row.value())
        .filter(|(row_day, _)| *row_day == day)
        .map_or(0, |(_, used)| used);
    quota.insert(key, (day, used.saturating_add(bytes)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(device: u32) -> Uploader {
        Uploader {
            user: UserId(7),
            device: DeviceId(device),
        }
    }

    fn upload(blob: u8, size_bytes: u64) -> UploadRow {
        UploadRow {
            uploader: who(1),
            size_bytes,
            blob: BlobId([blob; 32]),
            created_ms: 5,
        }
    }

    #[test]
    fn an_upload_becomes_a_blob_in_one_step_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let index = Index::open(&path).unwrap();
            index.insert_upload(UploadId(1), upload(1, 10)).unwrap();
            index.insert_upload(UploadId(2), upload(2, 20)).unwrap();
            let new = index
                .store_blob(UploadId(1), BlobId([1; 32]), 10, 1_000, who(1), 3)
                .unwrap();
            assert!(new);
            // The same bytes again are not new; the quota counts both.
            index.insert_upload(UploadId(3), upload(1, 10)).unwrap();
            let again = index
                .store_blob(UploadId(3), BlobId([1; 32]), 10, 2_000, who(1), 3)
                .unwrap();
            assert!(!again);
            assert_eq!(index.quota_used(who(1), 3).unwrap(), 20);
            assert_eq!(index.quota_used(who(1), 4).unwrap(), 0);
            assert_eq!(index.quota_used(who(2), 3).unwrap(), 0);
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.blob_totals().unwrap(), (10, 1));
        assert_eq!(
            index.blob(BlobId([1; 32])).unwrap(),
            Some(BlobRow {
                size_bytes: 10,
                expires_at_ms: 2_000
            })
        );
        let uploads = index.uploads().unwrap();
        assert_eq!(uploads, vec![(UploadId(2), upload(2, 20))]);
    }

    #[test]
    fn a_mismatched_upload_is_dropped_and_charged() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        index.insert_upload(UploadId(1), upload(1, 10)).unwrap();
        index.insert_upload(UploadId(2), upload(2, 20)).unwrap();
        index.drop_mismatched(UploadId(1), 10, who(1), 3).unwrap();
        index
            .store_blob(UploadId(2), BlobId([2; 32]), 20, 1_000, who(1), 3)
            .unwrap();
        assert_eq!(index.quota_used(who(1), 3).unwrap(), 30);
        assert!(index.uploads().unwrap().is_empty());
        assert_eq!(index.blob(BlobId([1; 32])).unwrap(), None);
        // The next day starts from nothing.
        index.insert_upload(UploadId(3), upload(3, 5)).unwrap();
        index.drop_mismatched(UploadId(3), 5, who(1), 4).unwrap();
        assert_eq!(index.quota_used(who(1), 4).unwrap(), 5);
    }

    #[test]
    fn expiry_order_follows_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        for (n, expires) in [(1u8, 100u64), (2, 200), (3, 300)] {
            index
                .insert_upload(UploadId(n.into()), upload(n, 1))
                .unwrap();
            index
                .store_blob(UploadId(n.into()), BlobId([n; 32]), 1, expires, who(1), 0)
                .unwrap();
        }
        // Blob 1 renewed past the others; an expired blob is not renewed.
        assert_eq!(index.renew(BlobId([1; 32]), 50, 400).unwrap(), Some(1));
        assert_eq!(index.renew(BlobId([2; 32]), 250, 500).unwrap(), None);
        assert_eq!(index.renew(BlobId([9; 32]), 0, 500).unwrap(), None);
        assert_eq!(
            index.expired(300, 10).unwrap(),
            vec![BlobId([2; 32]), BlobId([3; 32])]
        );
        assert_eq!(index.expired(300, 1).unwrap(), vec![BlobId([2; 32])]);
        // Removal re-checks the expiry.
        let removed = index
            .remove_expired(&[BlobId([1; 32]), BlobId([2; 32])], 300)
            .unwrap();
        assert_eq!(removed, 1);
        assert_eq!(index.blob(BlobId([2; 32])).unwrap(), None);
        assert_eq!(index.expired(1_000, 10).unwrap().len(), 2);
        assert_eq!(index.blob_totals().unwrap(), (2, 2));
    }
}
