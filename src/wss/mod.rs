//! Browsers: WebSocket over TLS carrying the Noise byte stream (like
//! WhatsApp Web). A listener on a small tokio runtime of its own terminates
//! TLS (rustls) and the HTTP upgrade, checks that a connection's first
//! bytes are the Noise intro, then bridges it to the server's own client
//! listener over loopback: binary messages carry exactly the bytes a native
//! client sends (message boundaries carry no meaning), and whatever the
//! shard answers goes back as binary messages. The shards see an ordinary
//! Noise client; nothing about WebSocket or TLS reaches them.
//!
//! Module map: [`upgrade`] answers the HTTP request (sans-IO), [`upstream`]
//! picks where and from which address a bridge connects (pure), [`tls`]
//! keeps the certificate and reloads it, [`bridge`] drives one connection,
//! [`stats`] counts.
//!
//! Threads: the runtime's `wss.threads` workers run every connection (one
//! task each) and the accept loop; certificate reloads run on its blocking
//! pool. Nothing here touches a shard: the bridge is a client of the
//! listener like any other.
//!
//! Invariants: no byte reaches the client listener before the browser's
//! first bytes are `"SBN1"` and a pattern byte (a bridge comes from
//! loopback, where the shards accept plaintext); each connection holds at
//! most one message in each direction; at most `wss.connections_max`
//! connections are open.

pub mod bridge;
pub mod stats;
pub mod tls;
pub mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::beacon::Beacon;
use crate::config::WssConfig;
use stats::{Refusal, WssStats};
use tls::{Certificates, TlsError};

/// How long, after a stop, connections may take to end on their own (the
/// shards say GoAway and close their ends, which the bridges pass on),
/// before the runtime cuts the rest.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// A pause after a failed accept (out of descriptors, say), so a persistent
/// failure does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why the listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WssError {
    /// The certificate or key files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Binding the listener or building the runtime.
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
}

/// A running WSS listener.
pub struct WssService {
    /// The address the listener got.
    pub addr: SocketAddr,
    thread: std::thread::JoinHandle<()>,
}

impl WssService {
    /// Waits for the service to stop (after `stop` was raised).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Reads the certificate, binds `config.listen` and serves until `stop` is
/// raised, bridging each browser to `target` (the client listener). The
/// certificate files are read again whenever `reload` is raised (SIGHUP).
pub fn start(
    config: &WssConfig,
    target: SocketAddr,
    stats: Arc<WssStats>,
    stop: Arc<Beacon>,
    reload: Arc<Beacon>,
) -> Result<WssService, WssError> {
    let certificates = Arc::new(Certificates::load(&config.cert_path, &config.key_path)?);
    let tls_config = Certificates::server_config(certificates.clone())?;
    let listen_error = |e| WssError::Listen(config.listen, e);
    let listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
    listener.set_nonblocking(true).map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(config.threads.max(1)))
        // Only certificate reloads use the blocking pool.
        .max_blocking_threads(1)
        .thread_name("wss")
        .enable_all()
        .build()
        .map_err(listen_error)?;
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(listen_error)?
    };
    let shared = Arc::new(bridge::Shared {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls_config)),
        target,
        sources: std::hash::RandomState::new(),
        handshake_timeout: Duration::from_millis(u64::from(config.handshake_timeout_ms)),
        idle_timeout: Duration::from_millis(u64::from(config.idle_timeout_ms)),
        ws_config: bridge::Shared::ws_config(config.message_bytes_max as usize),
        stats,
    });
    let connections_max = config.connections_max as usize;
    info!(%addr, %target, "wss listener serving browsers");
    let thread = std::thread::Builder::new()
        .name("wss-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let reloading = tokio::spawn(reloads(certificates, reload, shared.stats.clone()));
                serve(listener, shared, connections_max, stop).await;
                reloading.abort();
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        })
        .map_err(listen_error)?;
    Ok(WssService { addr, thread })
}

/// Accepts until `stop`, then gives open connections `SHUTDOWN_GRACE` to end.
async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<bridge::Shared>,
    connections_max: usize,
    stop: Arc<Beacon>,
) {
    let open = Arc::new(Semaphore::new(connections_max));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "wss accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = stop.raised_wait() => break,
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // At the cap a connection is closed before any TLS work: the cap
        // exists to bound that work and the memory of open connections.
        let Ok(permit) = open.clone().try_acquire_owned() else {
            shared.stats.refused(Refusal::Busy);
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            bridge::serve(tcp, peer, shared.clone()).await;
            shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let all = u32::try_from(connections_max).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, open.acquire_many(all))
        .await
        .is_err()
    {
        warn!("wss connections still open at shutdown were cut");
    }
}

/// Reads the certificate files again each time `reload` is raised.
async fn reloads(certificates: Arc<Certificates>, reload: Arc<Beacon>, stats: Arc<WssStats>) {
    let mut seen = reload.count();
    loop {
        seen = reload.changed(seen).await;
        let certificates = certificates.clone();
        let reloaded = tokio::task::spawn_blocking(move || certificates.reload()).await;
        match reloaded {
            Ok(Ok(())) => {
                stats.reloads.fetch_add(1, Ordering::Relaxed);
                info!("wss certificate reloaded");
            }
            Ok(Err(err)) => {
                stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%err, "wss certificate reload failed; the previous one stays in use");
            }
            Err(err) => {
                stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%err, "wss certificate reload did not finish");
            }
        }
    }
}
