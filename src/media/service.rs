//! The state every request handler and the sweep share, how it is rebuilt
//! at start, and the small helpers around it (the clock, grants, running
//! index calls off the runtime's workers, blob claims).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::ObjectStore;
use tracing::{info, warn};

use super::error::ApiError;
use super::ids::{BlobId, UploadId, Uploader};
use super::index::{Index, IndexError};
use super::ledger::{Ledger, LedgerLimits, UploadEntry};
use super::limits::{BODY_IDLE_TIMEOUT, FINALIZES_MAX};
use super::store::{self, INDEX_FILE, MEDIA_DIR, UPLOADS_DIR};
use super::token::{Grant, MediaKey, Subject, TokenError};
use crate::config::MediaConfig;
use crate::ids::{DeviceId, UserId};

/// Unix time in ms (the grants' clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Shared {
    pub config: MediaConfig,
    pub key: MediaKey,
    pub index: Arc<Index>,
    pub store: Arc<dyn ObjectStore>,
    /// `<data_dir>/media/uploads`.
    pub uploads_dir: PathBuf,
    ledger: Mutex<Ledger>,
    /// Uploads being hashed and stored at once (`FINALIZES_MAX`).
    pub finalizes: tokio::sync::Semaphore,
    /// Longest pause inside a PATCH body, and longest wait for a whole
    /// POST body (`BODY_IDLE_TIMEOUT`; a field so that tests can shorten
    /// it).
    pub body_idle_timeout: Duration,
}

/// How often a waiting `claim_within` tries again.
const CLAIM_POLL: Duration = Duration::from_millis(20);

/// What `recover` found.
#[derive(Clone, Copy, Debug)]
pub struct Recovered {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub uploads: usize,
}

impl Shared {
    /// Opens the index and the store and rebuilds the ledger: blob bytes
    /// from the index, each unfinished upload's offset from its staging
    /// file (cut to the upload's size if longer; a missing file is offset
    /// 0), and staging files no upload owns are deleted.
    pub fn recover(
        config: &MediaConfig,
        data_dir: &Path,
        key: MediaKey,
    ) -> std::io::Result<(Shared, Recovered)> {
        let media_dir = data_dir.join(MEDIA_DIR);
        let uploads_dir = media_dir.join(UPLOADS_DIR);
        std::fs::create_dir_all(&uploads_dir)?;
        let store = store::open(config, &media_dir)?;
        let index = Index::open(&media_dir.join(INDEX_FILE))?;
        let (blob_bytes, blobs) = index.blob_totals()?;
        let mut ledger = Ledger::new(
            LedgerLimits::from_config(config),
            config.device_uploads_per_minute,
            blob_bytes,
        );
        let uploads = index.uploads()?;
        let mut owned = std::collections::HashSet::new();
        for (id, row) in &uploads {
            let path = store::staged_path(&uploads_dir, *id);
            let staged_bytes = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            if staged_bytes > row.size_bytes {
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                file.set_len(row.size_bytes)?;
                file.sync_all()?;
                warn!(upload = %id, staged_bytes, size_bytes = row.size_bytes,
                    "staged upload longer than its size; cut");
            }
            owned.insert(id.to_string());
            ledger.recover(
                *id,
                UploadEntry {
                    uploader: row.uploader,
                    size_bytes: row.size_bytes,
                    blob: row.blob,
                    created_ms: row.created_ms,
                    offset: staged_bytes.min(row.size_bytes),
                    busy: false,
                },
            );
        }
        for entry in std::fs::read_dir(&uploads_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if !owned.contains(name.to_string_lossy().as_ref()) {
                warn!(file = %entry.path().display(), "staging file without an upload; removed");
                std::fs::remove_file(entry.path())?;
            }
        }
        let recovered = Recovered {
            blobs,
            blob_bytes,
            uploads: uploads.len(),
        };
        info!(
            blobs,
            blob_bytes,
            uploads = uploads.len(),
            "media index recovered"
        );
        let shared = Shared {
            config: config.clone(),
            key,
            index: Arc::new(index),
            store,
            uploads_dir,
            ledger: Mutex::new(ledger),
            finalizes: tokio::sync::Semaphore::new(FINALIZES_MAX),
            body_idle_timeout: BODY_IDLE_TIMEOUT,
        };
        Ok((shared, recovered))
    }

    /// The ledger, for one short call (never held across an await).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger's methods keep its invariants before they can panic,
        // so a poisoned lock still guards consistent state.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn staged_path(&self, id: UploadId) -> PathBuf {
        store::staged_path(&self.uploads_dir, id)
    }

    pub fn ttl_ms(&self) -> u64 {
        self.config.ttl_s.saturating_mul(1_000)
    }

    /// Runs an index call on the blocking pool.
    ///
    /// Cancel safety: the call runs to its end even if this future is
    /// dropped; only its answer is lost.
    pub async fn index<T, F>(&self, call: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Index) -> Result<T, IndexError> + Send + 'static,
    {
        let index = self.index.clone();
        match tokio::task::spawn_blocking(move || call(&index)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                warn!(%err, "media index call failed");
                Err(ApiError::Internal)
            }
            Err(err) => {
                warn!(%err, "media index task failed");
                Err(ApiError::Internal)
            }
        }
    }

    /// Runs blocking file work on the blocking pool.
    pub async fn blocking<T, F>(&self, work: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(std::io::Error::other)?
    }

    fn grant(&self, token: Option<&str>, now_ms: u64) -> Result<Grant, ApiError> {
        let token = token.ok_or(ApiError::BadToken(
            "an Authorization: Bearer token is required",
        ))?;
        Grant::verify(&self.key, token, now_ms).map_err(|err| match err {
            TokenError::Expired => ApiError::TokenExpired,
            TokenError::Malformed => ApiError::BadToken("the token is not a media token"),
            TokenError::BadSignature => ApiError::BadToken("the token's signature does not match"),
        })
    }

    /// The device an upload token was given to and its largest size.
    pub fn upload_grant(
        &self,
        token: Option<&str>,
        now_ms: u64,
    ) -> Result<(Uploader, u64), ApiError> {
        let grant = self.grant(token, now_ms)?;
        match grant.subject {
            Subject::Upload { size_max } => Ok((
                Uploader {
                    user: UserId(grant.user),
                    device: DeviceId(grant.device),
                },
                size_max,
            )),
            Subject::Download { .. } => Err(ApiError::BadToken(
                "a download token cannot be used for uploads",
            )),
        }
    }

    /// The blob a download token is for.
    pub fn download_grant(&self, token: Option<&str>, now_ms: u64) -> Result<BlobId, ApiError> {
        let grant = self.grant(token, now_ms)?;
        match grant.subject {
            Subject::Download { blob } => Ok(BlobId(blob)),
            Subject::Upload { .. } => Err(ApiError::BadToken(
                "an upload token cannot be used for downloads",
            )),
        }
    }

    /// Takes `blob` if nobody has it.
    pub fn try_claim(self: &Arc<Self>, blob: BlobId) -> Option<Claim> {
        self.ledger().claim(blob).then(|| Claim {
            shared: self.clone(),
            blob,
        })
    }

    /// Takes `blob`, waiting while someone else (the sweep deleting it, a
    /// renewal, or another upload of the same bytes) has it, for at most
    /// `wait`.
    ///
    /// Cancel safety: dropping the future takes nothing.
    pub async fn claim_within(self: &Arc<Self>, blob: BlobId, wait: Duration) -> Option<Claim> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(claim) = self.try_claim(blob) {
                return Some(claim);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            tokio::time::sleep(CLAIM_POLL.min(deadline - now)).await;
        }
    }
}

/// Ownership of one blob id (see `Ledger::claim`), released on drop, so a
/// cancelled or failed request never leaves a blob claimed.
pub struct Claim {
    shared: Arc<Shared>,
    blob: BlobId,
}

impl Claim {
    pub fn blob(&self) -> BlobId {
        self.blob
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared.ledger().unclaim(self.blob);
    }
}
