//! Where blob bytes live: the staging files of unfinished uploads
//! (`<data_dir>/media/uploads/<upload id>`, plain files appended by PATCH)
//! and the finished blobs in an `object_store` (`blobs/<blob id>`, on the
//! local disk under `<data_dir>/media/` or in an S3 bucket).
//!
//! Moving a staged upload into the store reads it in parts of
//! `PART_BYTES`: one `put` for a small blob, a multipart upload for a large
//! one, so a blob is never whole in memory.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::ids::{BlobId, UploadId};
use super::limits::PART_BYTES;
use crate::config::{MediaBackend, MediaConfig};

/// The media directory inside the data directory.
pub const MEDIA_DIR: &str = "media";
/// Staging files of unfinished uploads, inside the media directory.
pub const UPLOADS_DIR: &str = "uploads";
/// The index database, inside the media directory.
pub const INDEX_FILE: &str = "index.redb";

/// Why a staged upload did not reach the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("reading the staged upload: {0}")]
    Staging(#[from] std::io::Error),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
}

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string())
}

/// Builds the configured object store; checks the S3 settings first so a
/// mistake stops the server at start, not at the first upload.
pub fn open(config: &MediaConfig, media_dir: &Path) -> std::io::Result<Arc<dyn ObjectStore>> {
    match config.backend {
        MediaBackend::Local => {
            std::fs::create_dir_all(media_dir.join("blobs"))?;
            // fsync: a blob the service reported stored survives a power
            // cut, as it would in S3.
            let store = object_store::local::LocalFileSystem::new_with_prefix(media_dir)
                .map_err(std::io::Error::other)?
                .with_fsync(true);
            Ok(Arc::new(store))
        }
        MediaBackend::S3 => {
            let s3 = &config.s3;
            if s3.bucket.trim().is_empty() {
                return Err(invalid(
                    "media.s3.bucket is empty: name the bucket that holds the blobs",
                ));
            }
            if s3.access_key_id.is_empty() != s3.secret_access_key.is_empty() {
                return Err(invalid(
                    "set both media.s3.access_key_id and media.s3.secret_access_key, or \
                     neither (to use the instance's credentials)",
                ));
            }
            if s3.endpoint.starts_with("http://") && !s3.allow_http {
                return Err(invalid(
                    "media.s3.endpoint is http:// but media.s3.allow_http is false",
                ));
            }
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_allow_http(s3.allow_http)
                // Path-style requests (`endpoint/bucket/key`): what
                // S3-compatible servers on a local network expect.
                .with_virtual_hosted_style_request(false);
            if !s3.endpoint.is_empty() {
                builder = builder.with_endpoint(&s3.endpoint);
            }
            if !s3.region.is_empty() {
                builder = builder.with_region(&s3.region);
            }
            if !s3.access_key_id.is_empty() {
                builder = builder
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key);
            }
            let store = builder.build().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("media.s3 settings: {e}"),
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

/// A blob's location in the store.
pub fn blob_path(blob: BlobId) -> object_store::path::Path {
    object_store::path::Path::from(format!("blobs/{blob}"))
}

/// An upload's staging file.
pub fn staged_path(uploads_dir: &Path, id: UploadId) -> PathBuf {
    uploads_dir.join(id.to_string())
}

/// SHA-256 of the first `size_bytes` of a staged file (blocking). A file
/// shorter than that is an error.
pub fn hash_staged(path: &Path, size_bytes: u64) -> std::io::Result<BlobId> {
    let file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 << 10];
    let mut offset = 0u64;
    while offset < size_bytes {
        let len = (size_bytes - offset).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..len], offset)?;
        hasher.update(&buffer[..len]);
        offset += len as u64;
    }
    Ok(BlobId(hasher.finalize().into()))
}

/// Reads `len` bytes at `offset` on the blocking pool.
async fn read_part(file: Arc<std::fs::File>, offset: u64, len: u64) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut part = vec![0u8; len as usize];
        file.read_exact_at(&mut part, offset)?;
        Ok(Bytes::from(part))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Copies the first `size_bytes` of a staged file to `blobs/<blob>`. Every
/// file call runs on the blocking pool.
///
/// Cancel safety: dropping the future may leave an unfinished multipart
/// upload in the store (S3 keeps its parts until a lifecycle rule removes
/// them); callers run it to completion.
pub async fn put_staged(
    store: &dyn ObjectStore,
    staged: &Path,
    blob: BlobId,
    size_bytes: u64,
) -> Result<(), StoreError> {
    let location = blob_path(blob);
    // Opening is a blocking call too (a slow or busy disk): not on a
    // runtime worker.
    let staged = staged.to_path_buf();
    let file = tokio::task::spawn_blocking(move || std::fs::File::open(staged))
        .await
        .map_err(std::io::Error::other)??;
    let file = Arc::new(file);
    if size_bytes <= PART_BYTES {
        let bytes = read_part(file, 0, size_bytes).await?;
        store.put(&location, PutPayload::from(bytes)).await?;
        return Ok(());
    }
    let mut upload = store.put_multipart(&location).await?;
    let mut offset = 0u64;
    while offset < size_bytes {
        let len = (size_bytes - offset).min(PART_BYTES);
        let sent = match read_part(file.clone(), offset, len).await {
            Ok(part) => upload
                .put_part(PutPayload::from(part))
                .await
                .map_err(StoreError::from),
            Err(err) => Err(StoreError::from(err)),
        };
        if let Err(err) = sent {
            let _ = upload.abort().await;
            return Err(err);
        }
        offset += len;
    }
    if let Err(err) = upload.complete().await {
        let _ = upload.abort().await;
        return Err(err.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_exactly_the_announced_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staged");
        let bytes: Vec<u8> = (0..600_000u32).map(|i| i as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let want = BlobId(Sha256::digest(&bytes[..500_000]).into());
        assert_eq!(hash_staged(&path, 500_000).unwrap(), want);
        assert!(hash_staged(&path, 700_000).is_err());
    }

    #[test]
    fn refuses_s3_settings_that_cannot_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = MediaConfig {
            backend: MediaBackend::S3,
            ..MediaConfig::default()
        };
        let err = open(&config, dir.path()).err().unwrap();
        assert!(err.to_string().contains("bucket"), "{err}");
        config.s3.bucket = "media".into();
        config.s3.access_key_id = "key".into();
        let err = open(&config, dir.path()).err().unwrap();
        assert!(err.to_string().contains("secret_access_key"), "{err}");
        config.s3.secret_access_key = "secret".into();
        config.s3.endpoint = "http://127.0.0.1:9000".into();
        let err = open(&config, dir.path()).err().unwrap();
        assert!(err.to_string().contains("allow_http"), "{err}");
        config.s3.allow_http = true;
        assert!(open(&config, dir.path()).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn stores_small_and_multipart_blobs_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&MediaConfig::default(), dir.path()).unwrap();
        let size = PART_BYTES * 2 + 123;
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let staged = dir.path().join("staged");
        std::fs::write(&staged, &bytes).unwrap();
        for len in [10, size] {
            let blob = BlobId([len as u8; 32]);
            put_staged(store.as_ref(), &staged, blob, len)
                .await
                .unwrap();
            let on_disk = std::fs::read(dir.path().join("blobs").join(blob.to_hex())).unwrap();
            assert_eq!(on_disk, bytes[..len as usize]);
        }
    }
}
