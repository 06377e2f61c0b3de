//! The HTTP API: routes, request parsing and responses.
//!
//! | Route | Answer |
//! |---|---|
//! | `POST /v1/uploads` | 200 blob exists, 201 upload created |
//! | `HEAD /v1/uploads/{id}` | 200 with `Upload-Offset`, `Upload-Length` |
//! | `GET /v1/uploads/{id}` | 200 JSON offset and size |
//! | `PATCH /v1/uploads/{id}` | 204 more to send, 201 blob stored |
//! | `GET`, `HEAD /v1/blobs/{id}` | 200 whole, 206 range |
//! | `GET /healthz` | 200 `ok` |
//!
//! Errors are `ApiError`s. Work that changes an upload (its admission, a
//! PATCH) runs in a task of its own, so a client that goes away mid-request
//! cannot leave it half-done: a cut PATCH keeps the bytes that arrived.

use std::io::SeekFrom;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, GetResultPayload};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::warn;

use super::error::{ApiError, UPLOAD_LENGTH, UPLOAD_OFFSET};
use super::ids::{BlobId, UploadId};
use super::index::UploadRow;
use super::ledger::{Admission, UploadEntry};
use super::limits::{utc_day, BLOB_CLAIM_WAIT, CREATE_BODY_BYTES_MAX, RENEW_CLAIM_WAIT};
use super::range::{self, RangeAnswer};
use super::service::{now_ms, Shared};
use super::store::{blob_path, hash_staged, put_staged};

type Answer = Result<Response, ApiError>;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/uploads", post(create_upload))
        .route(
            "/v1/uploads/{id}",
            get(upload_status).head(upload_head).patch(upload_patch),
        )
        .route("/v1/blobs/{id}", get(download).head(download_head))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(shared)
}

/// Runs `work` as a task of its own: it finishes even if the client goes
/// away and this request's future is dropped.
async fn detached(work: impl std::future::Future<Output = Answer> + Send + 'static) -> Answer {
    tokio::spawn(work).await.unwrap_or_else(|err| {
        warn!(%err, "media request task failed");
        Err(ApiError::Internal)
    })
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::BadToken("the Authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::BadToken(
            "the Authorization header must be `Bearer TOKEN`",
        )),
    }
}

/// `token=` from a query string (downloads only, for browsers). Tokens are
/// base64url, which needs no percent-decoding.
fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

/// The `{id}` of a route; one that does not decode names nothing here.
fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|_| ApiError::NotFound)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

fn with_header(
    mut response: Response,
    name: &'static str,
    value: impl Into<HeaderValue>,
) -> Response {
    response.headers_mut().insert(name, value.into());
    response
}

#[derive(Deserialize)]
struct CreateUpload {
    size: u64,
    sha256: String,
}

async fn create_upload(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let now = now_ms();
    let (who, size_max) = shared.upload_grant(bearer(&headers)?, now)?;
    // A client that sends the headers and stalls is answered: the
    // connection's idle clock is held while a handler runs, so nothing
    // else would end this wait.
    let read = axum::body::to_bytes(body, CREATE_BODY_BYTES_MAX);
    let body = match tokio::time::timeout(shared.body_idle_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return Err(ApiError::BadRequest(format!(
                "the body must be JSON of at most {CREATE_BODY_BYTES_MAX} bytes"
            )))
        }
        Err(_) => {
            return Err(ApiError::BadRequest(
                "the body did not arrive in time".into(),
            ))
        }
    };
    let request: CreateUpload = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "the body must be {{\"size\": N, \"sha256\": \"64 hex digits\"}}: {err}"
        ))
    })?;
    let blob = BlobId::parse(&request.sha256)
        .ok_or_else(|| ApiError::BadRequest("sha256 must be 64 hex digits".into()))?;
    if request.size == 0 {
        return Err(ApiError::BadRequest("size must be at least 1".into()));
    }
    let limit_bytes = size_max.min(shared.config.blob_bytes_max);
    if request.size > limit_bytes {
        return Err(ApiError::BlobTooLarge {
            limit_bytes,
            offset: None,
        });
    }
    shared
        .ledger()
        .rate
        .take(who, now)
        .map_err(|retry_after_s| ApiError::RateLimited { retry_after_s })?;
    let size_bytes = request.size;
    detached(async move {
        // A blob already stored needs no upload: renew it (under its
        // claim, so the sweep cannot be deleting it meanwhile). Renewals
        // and the sweep hold a claim briefly, so wait for it a little;
        // past that (an upload of the same bytes is being stored), upload
        // as if it were absent: finishing finds it stored and only
        // records it.
        let claim = shared.claim_within(blob, RENEW_CLAIM_WAIT).await;
        let expires_at_ms = now.saturating_add(shared.ttl_ms());
        let renew = claim.is_some();
        let (existing, used_today) = shared
            .index(move |index| {
                if renew {
                    if let Some(size) = index.renew(blob, now, expires_at_ms)? {
                        return Ok((Some(size), 0));
                    }
                }
                Ok((None, index.quota_used(who, utc_day(now))?))
            })
            .await?;
        drop(claim);
        if let Some(size) = existing {
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({"blob_id": blob.to_hex(), "size": size, "complete": true}),
            ));
        }
        // The quota was read before the ledger's lock is taken, so an
        // upload of this device that is charged in between (stored, or
        // dropped for HASH_MISMATCH) and released from the ledger is
        // counted neither as charged nor as reserved. This admission can
        // therefore pass the day's quota by at most the bytes of the
        // device's uploads in flight concurrently with it that end inside
        // that window: at most `device_uploads_in_flight_max` uploads,
        // whose sizes the quota had admitted (so at most one more day's
        // quota). Only an upload admitted and finished whole within the
        // window (a complete PATCH inside one index read) could add more.
        // Concurrent admissions of one device do not add up: each sees
        // the others' reservations under the lock. Keeping every device's
        // day in memory would close the window, at a cost per device.
        //
        // A repeat of a POST this device made (same bytes, upload not
        // finished) gets that upload back; it was rate-counted like any
        // POST above.
        let id = UploadId::random();
        let admission = shared
            .ledger()
            .admit(id, who, size_bytes, blob, used_today, now)?;
        let entry = match admission {
            Admission::Existing(existing, entry) => {
                return Ok(created(existing, entry.offset, size_bytes));
            }
            Admission::New(entry) => entry,
        };
        let row = UploadRow {
            uploader: who,
            size_bytes,
            blob,
            created_ms: entry.created_ms,
        };
        if let Err(err) = shared
            .index(move |index| index.insert_upload(id, row))
            .await
        {
            shared.ledger().discard(id);
            return Err(err);
        }
        shared.ledger().admitted(id);
        Ok(created(id, 0, size_bytes))
    })
    .await
}

/// `201` for upload `id`, new or a repeat of its POST, with its offset
/// and `Location`.
fn created(id: UploadId, offset: u64, size_bytes: u64) -> Response {
    let response = json(
        StatusCode::CREATED,
        serde_json::json!({
            "upload_id": id.to_string(),
            "offset": offset,
            "size": size_bytes,
            "complete": false,
        }),
    );
    let location = HeaderValue::try_from(format!("/v1/uploads/{id}"))
        .expect("hex digits are a valid header value");
    with_header(response, "location", location)
}

fn upload_headers(response: Response, entry: &UploadEntry) -> Response {
    let response = with_header(response, UPLOAD_OFFSET, entry.offset);
    let response = with_header(response, UPLOAD_LENGTH, entry.size_bytes);
    with_header(
        response,
        "cache-control",
        HeaderValue::from_static("no-store"),
    )
}

fn upload_entry(shared: &Shared, id: &str, headers: &HeaderMap) -> Result<UploadEntry, ApiError> {
    let now = now_ms();
    let (who, _) = shared.upload_grant(bearer(headers)?, now)?;
    let id = UploadId::parse(id).ok_or(ApiError::NotFound)?;
    shared.ledger().status(id, who, now)
}

async fn upload_head(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer {
    let id = path_id(id)?;
    let entry = upload_entry(&shared, &id, &headers)?;
    Ok(upload_headers(StatusCode::OK.into_response(), &entry))
}

async fn upload_status(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Answer {
    let id = path_id(id)?;
    let entry = upload_entry(&shared, &id, &headers)?;
    let body = serde_json::json!({
        "upload_id": id.to_ascii_lowercase(),
        "offset": entry.offset,
        "size": entry.size_bytes,
        "complete": false,
    });
    Ok(upload_headers(json(StatusCode::OK, body), &entry))
}

fn header_u64(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<Option<u64>> {
    let Some(value) = headers.get(name) else {
        return Some(None);
    };
    let text = value.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(Some)
}

async fn upload_patch(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    let id = path_id(id)?;
    let now = now_ms();
    let (who, _) = shared.upload_grant(bearer(&headers)?, now)?;
    let id = UploadId::parse(&id).ok_or(ApiError::NotFound)?;
    let offset = header_u64(&headers, UPLOAD_OFFSET)
        .flatten()
        .ok_or_else(|| {
            ApiError::BadRequest(
                "an Upload-Offset header (a decimal byte offset) is required".into(),
            )
        })?;
    let declared_bytes = header_u64(&headers, header::CONTENT_LENGTH)
        .ok_or_else(|| ApiError::BadRequest("the Content-Length header is not a number".into()))?;
    let entry = shared.ledger().begin_patch(id, who, offset, now)?;
    // From here this request owns the upload; `patch` gives it back on
    // every path.
    detached(patch(shared, id, entry, declared_bytes, body)).await
}

/// What arrived of a PATCH body.
struct Appended {
    /// Bytes written (and made durable) at the upload's offset.
    bytes: u64,
    /// The body ran past the upload's size; what fit was kept.
    overflow: bool,
}

async fn patch(
    shared: Arc<Shared>,
    id: UploadId,
    entry: UploadEntry,
    declared_bytes: Option<u64>,
    body: Body,
) -> Answer {
    let room = entry.size_bytes - entry.offset;
    if declared_bytes.is_some_and(|declared| declared > room) {
        shared.ledger().end_patch(id, entry.offset);
        return Err(ApiError::BlobTooLarge {
            limit_bytes: entry.size_bytes,
            offset: Some(entry.offset),
        });
    }
    let appended = match append(&shared, id, entry.offset, room, body).await {
        Ok(appended) => appended,
        Err(err) => {
            // Nothing from this request is counted: the next PATCH starts
            // at the old offset and cuts the file back to it.
            warn!(upload = %id, %err, "staging an upload failed");
            shared.ledger().end_patch(id, entry.offset);
            return Err(ApiError::Internal);
        }
    };
    let offset = entry.offset + appended.bytes;
    if appended.overflow {
        shared.ledger().end_patch(id, offset);
        return Err(ApiError::BlobTooLarge {
            limit_bytes: entry.size_bytes,
            offset: Some(offset),
        });
    }
    if offset < entry.size_bytes {
        shared.ledger().end_patch(id, offset);
        let response = StatusCode::NO_CONTENT.into_response();
        return Ok(with_header(response, UPLOAD_OFFSET, offset));
    }
    finish(shared, id, entry).await
}

/// Appends a PATCH body to the staging file at `offset`, at most `room`
/// bytes, and makes them durable. A body that is cut (the client went
/// away, or paused longer than `body_idle_timeout`) ends the append like
/// its end would: what arrived is kept.
/// Bytes of body chunks gathered into one write at most.
const WRITE_BATCH_BYTES: usize = 1 << 20;

async fn append(
    shared: &Shared,
    id: UploadId,
    offset: u64,
    room: u64,
    body: Body,
) -> std::io::Result<Appended> {
    let path = shared.staged_path(id);
    let dir = shared.uploads_dir.clone();
    // A std file written on the blocking pool, one chunk at a time: a
    // tokio file would keep its copy buffer (as large as the last chunk)
    // for as long as the upload waits for more, which is most of the
    // memory an idle upload would cost.
    let file = shared
        .blocking(move || {
            let file = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    // A new file: its name must survive a crash with its bytes.
                    std::fs::File::open(dir)?.sync_all()?;
                    file
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::OpenOptions::new().write(true).open(&path)?
                }
                Err(e) => return Err(e),
            };
            if file.metadata()?.len() != offset {
                // Bytes past the offset were never acknowledged (a failed PATCH).
                file.set_len(offset)?;
            }
            Ok(Arc::new(file))
        })
        .await?;
    let mut stream = body.into_data_stream();
    let mut appended = Appended {
        bytes: 0,
        overflow: false,
    };
    loop {
        let first = match tokio::time::timeout(shared.body_idle_timeout, stream.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            // The end, a cut connection, or a silent client.
            Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
        };
        // The chunks that have arrived already go in the same write (one
        // hop to the blocking pool per batch, not per read of the socket);
        // nothing is held back waiting for more.
        let mut batch = vec![first];
        let mut batched = batch[0].len();
        let mut ended = false;
        while batched < WRITE_BATCH_BYTES {
            match futures_util::FutureExt::now_or_never(stream.next()) {
                Some(Some(Ok(chunk))) => {
                    batched += chunk.len();
                    batch.push(chunk);
                }
                Some(None) | Some(Some(Err(_))) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        let arrived = batched as u64;
        let fits = arrived.min(room - appended.bytes);
        let at = offset + appended.bytes;
        let writer = file.clone();
        shared
            .blocking(move || {
                use std::os::unix::fs::FileExt;
                let (mut at, mut left) = (at, fits as usize);
                for chunk in &batch {
                    let take = chunk.len().min(left);
                    writer.write_all_at(&chunk[..take], at)?;
                    at += take as u64;
                    left -= take;
                }
                Ok(())
            })
            .await?;
        appended.bytes += fits;
        if fits < arrived {
            appended.overflow = true;
            break;
        }
        if ended {
            break;
        }
    }
    shared.blocking(move || file.sync_data()).await?;
    Ok(appended)
}

/// Every byte is staged: checks the hash, stores the blob, records it and
/// charges the device's quota. The caller owns the upload (busy).
///
/// The blob's claim is taken before a `finalizes` slot: an upload waiting
/// for another upload of the same bytes (or the sweep) holds none of the
/// `FINALIZES_MAX` slots that uploads of other blobs need.
async fn finish(shared: Arc<Shared>, id: UploadId, entry: UploadEntry) -> Answer {
    let size_bytes = entry.size_bytes;
    let (blob, who) = (entry.blob, entry.uploader);
    let keep = |shared: &Shared, error: ApiError| {
        // Every byte stays staged: a PATCH with an empty body at this
        // offset tries again.
        shared.ledger().end_patch(id, size_bytes);
        Err(error)
    };
    let Some(claim) = shared.claim_within(blob, BLOB_CLAIM_WAIT).await else {
        return keep(&shared, ApiError::StoreUnavailable);
    };
    let permit = shared
        .finalizes
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let staged = shared.staged_path(id);
    let path = staged.clone();
    let hashed = shared
        .blocking(move || hash_staged(&path, size_bytes))
        .await;
    let actual = match hashed {
        Ok(actual) => actual,
        Err(err) => {
            warn!(upload = %id, %err, "hashing a staged upload failed");
            return keep(&shared, ApiError::Internal);
        }
    };
    if actual != blob {
        drop(permit);
        // The bytes were written and hashed: they count against the
        // device's day like a stored blob's.
        let day = utc_day(now_ms());
        let dropped = shared
            .index(move |index| index.drop_mismatched(id, size_bytes, who, day))
            .await;
        if dropped.is_err() {
            // The row stays, uncharged: the next start recovers it with
            // no bytes and the sweep drops it after upload_ttl_s.
            warn!(upload = %id, "dropping a mismatched upload from the index failed");
        }
        remove_staged(&staged).await;
        shared.ledger().discard(id);
        return Err(ApiError::HashMismatch);
    }
    // Another upload of the same bytes may have stored the blob since
    // this one began: then there is nothing to store, only to record. (A
    // live row's object is there: the sweep deletes only expired blobs,
    // under their claim, which this upload holds.)
    let now = now_ms();
    let live = match shared.index(move |index| index.blob(blob)).await {
        Ok(row) => row.is_some_and(|row| row.expires_at_ms > now),
        Err(err) => return keep(&shared, err),
    };
    if !live {
        if let Err(err) = put_staged(shared.store.as_ref(), &staged, blob, size_bytes).await {
            warn!(upload = %id, %blob, %err, "storing a blob failed");
            return keep(&shared, ApiError::StoreUnavailable);
        }
    }
    drop(permit);
    let now = now_ms();
    let expires_at_ms = now.saturating_add(shared.ttl_ms());
    let stored = shared
        .index(move |index| {
            index.store_blob(id, blob, size_bytes, expires_at_ms, who, utc_day(now))
        })
        .await;
    match stored {
        Ok(new_blob) => shared.ledger().finish(id, new_blob),
        Err(err) => return keep(&shared, err),
    }
    drop(claim);
    remove_staged(&staged).await;
    let body = serde_json::json!({"blob_id": blob.to_hex(), "size": size_bytes, "complete": true});
    Ok(with_header(
        json(StatusCode::CREATED, body),
        UPLOAD_OFFSET,
        size_bytes,
    ))
}

async fn remove_staged(path: &std::path::Path) {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => warn!(file = %path.display(), %err, "removing a staging file failed"),
    }
}

async fn download(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Answer {
    let id = path_id(id)?;
    serve_blob(shared, id, query, headers, false).await
}

async fn download_head(
    State(shared): State<Arc<Shared>>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Answer {
    let id = path_id(id)?;
    serve_blob(shared, id, query, headers, true).await
}

async fn serve_blob(
    shared: Arc<Shared>,
    id: String,
    query: Option<String>,
    headers: HeaderMap,
    head: bool,
) -> Answer {
    let now = now_ms();
    let token = bearer(&headers)?.or_else(|| query_token(query.as_deref()));
    let granted = shared.download_grant(token, now)?;
    let blob = BlobId::parse(&id).ok_or(ApiError::NotFound)?;
    if blob != granted {
        return Err(ApiError::WrongBlob);
    }
    let row = shared
        .index(move |index| index.blob(blob))
        .await?
        .filter(|row| row.expires_at_ms > now)
        .ok_or(ApiError::NotFound)?;
    let size_bytes = row.size_bytes;
    let requested = headers.get(header::RANGE).map(HeaderValue::as_bytes);
    let (status, first, last) = match range::resolve(requested, size_bytes) {
        RangeAnswer::Full => (StatusCode::OK, 0, size_bytes - 1),
        RangeAnswer::Partial { first, last } => (StatusCode::PARTIAL_CONTENT, first, last),
        RangeAnswer::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable { size_bytes }),
    };
    let length = last - first + 1;
    let body = if head {
        Body::empty()
    } else {
        let options = GetOptions::new().with_range(Some(GetRange::Bounded(first..last + 1)));
        let got = shared.store.get_opts(&blob_path(blob), options).await;
        let got = match got {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => {
                warn!(%blob, "the index has a blob the store lacks");
                return Err(ApiError::NotFound);
            }
            Err(err) => {
                warn!(%blob, %err, "reading a blob failed");
                return Err(ApiError::StoreUnavailable);
            }
        };
        match got.payload {
            // A local file: read in 64 KiB chunks rather than
            // object_store's 8 KiB ones.
            GetResultPayload::File(file, _) => {
                let mut file = tokio::fs::File::from_std(file);
                if let Err(err) = file.seek(SeekFrom::Start(got.range.start)).await {
                    warn!(%blob, %err, "reading a blob failed");
                    return Err(ApiError::StoreUnavailable);
                }
                let reader = file.take(got.range.end - got.range.start);
                Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                    reader,
                    64 << 10,
                ))
            }
            GetResultPayload::Stream(stream) => Body::from_stream(stream),
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let etag = HeaderValue::try_from(format!("\"{blob}\"")).expect("hex is a header value");
    headers.insert(header::ETAG, etag);
    if status == StatusCode::PARTIAL_CONTENT {
        let range = HeaderValue::try_from(format!("bytes {first}-{last}/{size_bytes}"))
            .expect("digits are a header value");
        headers.insert(header::CONTENT_RANGE, range);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bearer_tokens_and_refuses_other_schemes() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), Ok(None));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&headers), Ok(Some("abc")));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&headers), Ok(Some("abc")));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(bearer(&headers).is_err());
    }

    #[test]
    fn finds_the_token_in_a_query() {
        assert_eq!(query_token(Some("a=1&token=xyz&b=2")), Some("xyz"));
        assert_eq!(query_token(Some("tokens=1")), None);
        assert_eq!(query_token(None), None);
    }

    #[test]
    fn parses_numeric_headers_strictly() {
        let mut headers = HeaderMap::new();
        assert_eq!(header_u64(&headers, UPLOAD_OFFSET), Some(None));
        headers.insert(UPLOAD_OFFSET, HeaderValue::from_static("12"));
        assert_eq!(header_u64(&headers, UPLOAD_OFFSET), Some(Some(12)));
        for bad in ["-1", "+1", "1.5", "", "99999999999999999999"] {
            headers.insert(UPLOAD_OFFSET, HeaderValue::from_static(bad));
            assert_eq!(header_u64(&headers, UPLOAD_OFFSET), None, "{bad:?}");
        }
    }
}
