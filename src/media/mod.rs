//! The media service: encrypted attachments kept off the shards. An HTTP
//! listener on its own threads (a small tokio runtime serving axum) takes
//! resumable uploads and range downloads of client-encrypted blobs,
//! content-addressed by the SHA-256 of their ciphertext, stored through
//! `object_store` (the local filesystem by default, any S3-compatible store
//! by configuration), and expires them after `media.ttl_s`. Requests carry
//! a grant token (`token`) that a shard signed for the device over its chat
//! connection.
//!
//! Threads: the runtime's `media.threads` workers run the handlers and
//! the sweep; tokio's blocking pool runs every index (redb) call and file
//! read or sync. Nothing here touches a shard.
//!
//! Layout under `<data_dir>/media/`:
//! - `index.redb`: blobs (size, expiry), unfinished uploads, daily bytes
//!   per device (`index`).
//! - `uploads/<upload id>`: the bytes of an unfinished upload so far.
//! - `blobs/<blob id>`: finished blobs, with the local backend (with S3
//!   they are `blobs/<blob id>` in the bucket).
//!
//! An upload: `POST /v1/uploads` announces size and SHA-256 (a blob already
//! stored is renewed, not uploaded again), PATCHes append bytes at the
//! current offset (each made durable before the answer; a cut connection
//! keeps what arrived, so the client resumes from `HEAD`'s offset), and the
//! PATCH that completes it hashes the bytes, stores the blob and charges the
//! device's daily quota. State survives restarts: blobs and unfinished
//! uploads are in the index, offsets are the staging files' lengths. The
//! upload rate limiter is in memory and starts afresh at each start.

pub mod api;
pub mod conn;
pub mod error;
pub mod ids;
pub mod index;
pub mod ledger;
pub mod limits;
pub mod range;
pub mod service;
pub mod stats;
pub mod store;
pub mod sweep;
pub mod token;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::beacon::Beacon;
use crate::config::MediaConfig;
use token::MediaKey;

/// How long in-flight requests may run on after `stop` before they are
/// cut: a stalled upload cannot hold up the server's exit (its staged bytes
/// are kept either way).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Largest read buffer of one HTTP connection, bytes (hyper's minimum is
/// 8 KiB); it bounds a request's head too.
const READ_BUFFER_BYTES_MAX: usize = 16 << 10;

/// How often the metrics' gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Blocking-pool threads (index calls, file reads, syncs). Each request
/// uses at most one at a time; redb runs one write transaction at a time
/// anyway, so more would only queue on its lock.
const BLOCKING_THREADS_MAX: usize = 64;

/// A running media service.
pub struct MediaService {
    /// The address the listener got.
    pub addr: SocketAddr,
    /// The base URL handed to clients in grants.
    pub public_url: String,
    thread: std::thread::JoinHandle<()>,
}

impl MediaService {
    /// Waits for the service to stop (after `stop` was raised).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Recovers the media index, binds the listener and starts serving on
/// `config.threads` threads; the service stops once `stop` is raised.
pub fn start(
    config: &MediaConfig,
    data_dir: &Path,
    key: MediaKey,
    stats: Arc<stats::MediaStats>,
    stop: Arc<Beacon>,
) -> std::io::Result<MediaService> {
    let (shared, _) = service::Shared::recover(config, data_dir, key)?;
    let connections_max = config.connections_max;
    let idle = Duration::from_secs(config.idle_timeout_s);
    let shared = Arc::new(shared);
    let listener = std::net::TcpListener::bind(config.listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let public_url = if config.public_url.is_empty() {
        format!("http://{addr}")
    } else {
        config.public_url.trim_end_matches('/').to_string()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.threads.max(1)))
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .thread_name("media")
        .enable_all()
        .build()?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    info!(%addr, backend = ?config.backend, "media service listening");
    let thread = std::thread::Builder::new()
        .name("media-main".into())
        .spawn(move || {
            let listener = conn::BoundedListener::new(listener, connections_max, idle);
            runtime.block_on(serve(listener, shared, stats, stop));
            runtime.shutdown_timeout(SHUTDOWN_GRACE);
        })?;
    Ok(MediaService {
        addr,
        public_url,
        thread,
    })
}

async fn serve(
    mut listener: conn::BoundedListener,
    shared: Arc<service::Shared>,
    stats: Arc<stats::MediaStats>,
    stop: Arc<Beacon>,
) {
    use axum::serve::Listener as _;
    let sweep = tokio::spawn(sweep::run(shared.clone()));
    let gauges = tokio::spawn(copy_gauges(
        shared.clone(),
        listener.open_connections(),
        stats.clone(),
    ));
    let counted = stats.clone();
    let app = api::router(shared)
        .layer(axum::middleware::from_fn(conn::hold_idle_clock))
        .layer(axum::middleware::map_response(
            move |response: axum::response::Response| {
                counted.count_response(response.status().as_u16());
                std::future::ready(response)
            },
        ));
    let mut http = hyper::server::conn::http1::Builder::new();
    // A connection's read buffer stays at most this large, also while an
    // upload waits for the rest of its body: hyper's own bound is 400 KB.
    http.max_buf_size(READ_BUFFER_BYTES_MAX);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.raised_wait() => break,
        };
        let busy = io.busy();
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(busy.clone()));
                request
            },
        );
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A reset or a malformed request ends its connection only.
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("media requests still running at shutdown were cut");
    }
    sweep.abort();
    gauges.abort();
}

/// Copies the ledger's totals and the open connections into `stats` once a
/// second (one short lock of the ledger each time).
async fn copy_gauges(
    shared: Arc<service::Shared>,
    connections: impl Fn() -> u64,
    stats: Arc<stats::MediaStats>,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tick.tick().await;
        let (blob_bytes, reserved_bytes, uploads) = {
            let ledger = shared.ledger();
            (
                ledger.blob_bytes(),
                ledger.reserved_bytes(),
                ledger.uploads_in_flight(),
            )
        };
        stats.blob_bytes.store(blob_bytes, Ordering::Relaxed);
        stats
            .reserved_bytes
            .store(reserved_bytes, Ordering::Relaxed);
        stats
            .uploads_in_flight
            .store(uploads as u64, Ordering::Relaxed);
        stats.connections.store(connections(), Ordering::Relaxed);
    }
}
