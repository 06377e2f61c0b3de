//! The expiry sweep: a background task that deletes blobs past their
//! expiry and drops uploads older than `media.upload_ttl_s`, at start and
//! then every `media.sweep_interval_s`.
//!
//! It works in batches of `SWEEP_BATCH` (one index transaction each) and
//! yields between them. It never holds the ledger's lock across I/O; a
//! blob it deletes is claimed first (so a renewal or an upload of the same
//! bytes waits), and its object is deleted before its index row, so a
//! crash in between leaves a row that the next sweep finishes. Requests
//! never wait for the sweep: an expired blob is already refused (404)
//! before it is swept.
//!
//! A stale upload with every byte staged may have left an object in the
//! store that no blob row owns (its blob was stored, then recording it
//! failed or the process died). The upload's row is all that leads back
//! to that object, so the object is dealt with first and the row removed
//! only after: an upload whose object cannot be settled now (its blob is
//! claimed, the index or the store fails) is handed back untouched and
//! the next sweep tries again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use tracing::{info, warn};

use super::ids::{BlobId, UploadId};
use super::ledger::UploadEntry;
use super::limits::SWEEP_BATCH;
use super::service::{now_ms, Claim, Shared};
use super::store::blob_path;

/// Object deletions in flight at once.
const DELETES_IN_FLIGHT: usize = 16;

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Expired blobs deleted (object and row), and their bytes.
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Stale uploads dropped (row and staging file).
    pub uploads: u64,
}

/// Sweeps now and then every `sweep_interval_s` (at least 1 s), until the
/// runtime stops.
pub async fn run(shared: Arc<Shared>) {
    let interval = Duration::from_secs(shared.config.sweep_interval_s.max(1));
    loop {
        let swept = sweep(&shared).await;
        if swept != Swept::default() {
            info!(
                blobs = swept.blobs,
                blob_bytes = swept.blob_bytes,
                uploads = swept.uploads,
                "media sweep"
            );
        }
        tokio::time::sleep(interval).await;
    }
}

/// One sweep: expired blobs, then stale uploads.
pub async fn sweep(shared: &Arc<Shared>) -> Swept {
    let now = now_ms();
    let mut swept = Swept::default();
    sweep_blobs(shared, now, &mut swept).await;
    sweep_uploads(shared, now, &mut swept).await;
    swept
}

/// Deletes the objects of `blobs` (claimed by the caller); gives those
/// now gone.
async fn delete_objects(shared: &Arc<Shared>, blobs: Vec<BlobId>) -> Vec<BlobId> {
    let store = shared.store.clone();
    futures_util::stream::iter(blobs)
        .map(move |blob| {
            let store = store.clone();
            async move {
                match store.delete(&blob_path(blob)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Some(blob),
                    Err(err) => {
                        // Whoever asked keeps the row that leads back to
                        // the object (a blob's, or an upload's).
                        warn!(%blob, %err, "deleting a blob's object failed; the next sweep tries again");
                        None
                    }
                }
            }
        })
        .buffer_unordered(DELETES_IN_FLIGHT)
        .filter_map(|deleted| async move { deleted })
        .collect()
        .await
}

async fn sweep_blobs(shared: &Arc<Shared>, now: u64, swept: &mut Swept) {
    loop {
        let Ok(candidates) = shared
            .index(move |index| index.expired(now, SWEEP_BATCH))
            .await
        else {
            return;
        };
        let full_batch = candidates.len() == SWEEP_BATCH;
        // Blobs someone is renewing or storing are left for the next sweep.
        let claims: Vec<Claim> = candidates
            .into_iter()
            .filter_map(|blob| shared.try_claim(blob))
            .collect();
        if claims.is_empty() {
            return;
        }
        // Claimed now, so no renewal can race: check they are still due.
        let ids: Vec<BlobId> = claims.iter().map(Claim::blob).collect();
        let Ok(due) = shared
            .index(move |index| {
                let mut due = Vec::new();
                for blob in ids {
                    if index
                        .blob(blob)?
                        .is_some_and(|row| row.expires_at_ms <= now)
                    {
                        due.push(blob);
                    }
                }
                Ok(due)
            })
            .await
        else {
            return;
        };
        let claims: Vec<Claim> = claims
            .into_iter()
            .filter(|claim| due.contains(&claim.blob()))
            .collect();
        let deleted = delete_objects(shared, due).await;
        if deleted.is_empty() {
            return;
        }
        let count = deleted.len() as u64;
        let Ok(bytes) = shared
            .index(move |index| index.remove_expired(&deleted, now))
            .await
        else {
            return;
        };
        shared.ledger().blobs_removed(bytes);
        swept.blobs += count;
        swept.blob_bytes += bytes;
        drop(claims);
        if !full_batch {
            return;
        }
        tokio::task::yield_now().await;
    }
}

async fn sweep_uploads(shared: &Arc<Shared>, now: u64, swept: &mut Swept) {
    loop {
        let stale = shared.ledger().take_stale(now, SWEEP_BATCH);
        if stale.is_empty() {
            return;
        }
        let taken = stale.len();
        let ready = settle_objects(shared, stale).await;
        // Uploads handed back are stale still: taking them again in this
        // sweep would only repeat what just failed.
        let handed_back = ready.len() < taken;
        if ready.is_empty() {
            return;
        }
        let ids: Vec<_> = ready.iter().map(|(id, _)| *id).collect();
        let removed = shared.index(move |index| index.remove_uploads(&ids)).await;
        if removed.is_err() {
            // Their objects are dealt with already; the next sweep finds
            // them so and removes the rows then.
            hand_back(shared, &ready);
            return;
        }
        let paths: Vec<_> = ready
            .iter()
            .map(|(id, _)| shared.staged_path(*id))
            .collect();
        let removed_files = shared
            .blocking(move || {
                for path in paths {
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .await;
        if let Err(err) = removed_files {
            // `Shared::recover` deletes staging files without an upload row.
            warn!(%err, "removing stale staging files failed; removed at next start");
        }
        {
            let mut ledger = shared.ledger();
            for (id, _) in &ready {
                ledger.discard(*id);
            }
        }
        swept.uploads += ready.len() as u64;
        if handed_back || taken < SWEEP_BATCH {
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Gives stale uploads back to the ledger as they were, for the next sweep.
fn hand_back(shared: &Shared, uploads: &[(UploadId, UploadEntry)]) {
    let mut ledger = shared.ledger();
    for (id, entry) in uploads {
        ledger.end_patch(*id, entry.offset);
    }
}

/// Deletes the object each upload in `stale` with every byte staged may
/// have left in the store, unless a blob row owns it (then it is the
/// blob's). Gives the uploads that may now be dropped: those with bytes
/// missing, and those whose object is owned or gone. The rest are handed
/// back: their blob is claimed by someone storing, renewing or deleting
/// it, or the index or the store failed.
async fn settle_objects(
    shared: &Arc<Shared>,
    stale: Vec<(UploadId, UploadEntry)>,
) -> Vec<(UploadId, UploadEntry)> {
    // Bytes missing: the upload never reached `finish`, so no object.
    let (staged, mut ready): (Vec<_>, Vec<_>) = stale
        .into_iter()
        .partition(|(_, entry)| entry.offset == entry.size_bytes);
    if staged.is_empty() {
        return ready;
    }
    let mut back = Vec::new();
    let mut claimed = Vec::new();
    let mut claims: Vec<Claim> = Vec::new();
    for (id, entry) in staged {
        // Two stale uploads of the same bytes share one claim.
        if claims.iter().any(|claim| claim.blob() == entry.blob) {
            claimed.push((id, entry));
            continue;
        }
        match shared.try_claim(entry.blob) {
            Some(claim) => {
                claims.push(claim);
                claimed.push((id, entry));
            }
            None => back.push((id, entry)),
        }
    }
    // Claimed, so nobody stores, renews or deletes these blobs meanwhile.
    let blobs: Vec<BlobId> = claims.iter().map(Claim::blob).collect();
    let unowned = shared
        .index(move |index| {
            let mut unowned = Vec::new();
            for blob in blobs {
                if index.blob(blob)?.is_none() {
                    unowned.push(blob);
                }
            }
            Ok(unowned)
        })
        .await;
    match unowned {
        Ok(unowned) => {
            let gone = delete_objects(shared, unowned.clone()).await;
            for (id, entry) in claimed {
                if unowned.contains(&entry.blob) && !gone.contains(&entry.blob) {
                    back.push((id, entry));
                } else {
                    ready.push((id, entry));
                }
            }
        }
        Err(_) => back.extend(claimed),
    }
    drop(claims);
    hand_back(shared, &back);
    ready
}
