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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use tracing::{info, warn};

use super::ids::BlobId;
use super::limits::SWEEP_BATCH;
use super::service::{now_ms, Claim, Shared};
use super::store::blob_path;

/// Object deletions in flight at once.
const DELETES_IN_FLIGHT: usize = 16;

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub blobs: u64,
    pub blob_bytes: u64,
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
                        warn!(%blob, %err, "deleting a blob failed; retried next sweep");
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
        let ids: Vec<_> = stale.iter().map(|(id, _)| *id).collect();
        let removed = shared.index(move |index| index.remove_uploads(&ids)).await;
        if removed.is_err() {
            // Give them back untouched; the next sweep tries again.
            let mut ledger = shared.ledger();
            for (id, entry) in &stale {
                ledger.end_patch(*id, entry.offset);
            }
            return;
        }
        let paths: Vec<_> = stale
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
            warn!(%err, "removing stale staging files failed; removed at next start");
        }
        // An upload with every byte staged may have reached the store
        // before a crash kept it from being recorded: delete such an
        // object unless a blob row owns it.
        for (_, entry) in stale.iter().filter(|(_, e)| e.offset == e.size_bytes) {
            let Some(claim) = shared.try_claim(entry.blob) else {
                continue;
            };
            let blob = entry.blob;
            if let Ok(None) = shared.index(move |index| index.blob(blob)).await {
                delete_objects(shared, vec![claim.blob()]).await;
            }
        }
        {
            let mut ledger = shared.ledger();
            for (id, _) in &stale {
                ledger.discard(*id);
            }
        }
        swept.uploads += stale.len() as u64;
        tokio::task::yield_now().await;
    }
}
