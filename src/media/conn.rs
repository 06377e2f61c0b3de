//! The media listener's connections, bounded: at most
//! `media.connections_max` are open at once (the next is accepted only
//! when one closes; it waits in the listen backlog meanwhile), and a
//! connection that makes no progress reading or writing for
//! `media.idle_timeout_s` while the server waits on it is closed. So a
//! client that opens sockets and sends nothing, or stops reading a
//! download, holds a bounded share of the service for a bounded time.
//!
//! While a handler runs (from the request's head until its response's
//! head), the clock is held: hyper keeps reading the socket then only to
//! notice a hang-up, and a slow finish (hashing, storing) is the server's
//! wait, not the client's. Handlers bound their own waits for a body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::warn;

/// Pause after a failed accept (EMFILE and the like) before the next try.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The listener, handing out at most `connections_max` connections at once.
pub struct BoundedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    connections_max: u32,
    idle: Duration,
}

impl BoundedListener {
    pub fn new(listener: TcpListener, connections_max: u32, idle: Duration) -> BoundedListener {
        BoundedListener {
            listener,
            permits: Arc::new(Semaphore::new(connections_max as usize)),
            connections_max,
            idle,
        }
    }

    /// A reading of the connections open now.
    pub fn open_connections(&self) -> impl Fn() -> u64 + Send + 'static {
        let permits = self.permits.clone();
        let max = u64::from(self.connections_max);
        move || max.saturating_sub(permits.available_permits() as u64)
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (BoundedConn, SocketAddr) {
        // Cancel safe: a permit taken and then dropped is returned.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = BoundedConn {
                        stream,
                        busy: Arc::new(AtomicU32::new(0)),
                        idle: self.idle,
                        deadline: Box::pin(tokio::time::sleep(self.idle)),
                        _permit: permit,
                    };
                    return (conn, addr);
                }
                Err(err) => {
                    warn!(%err, "media accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// One connection: its permit is returned when it is dropped.
pub struct BoundedConn {
    stream: TcpStream,
    /// Requests of this connection inside a handler (`Busy`).
    busy: Arc<AtomicU32>,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl BoundedConn {
    /// Its count of requests inside a handler, for `hold_idle_clock`.
    pub fn busy(&self) -> Busy {
        Busy(self.busy.clone())
    }

    /// `io` made progress: the idle clock starts again; pending, the
    /// connection fails once the clock runs out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, io: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match io {
            Poll::Ready(result) => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(result)
            }
            Poll::Pending if self.busy.load(Ordering::Relaxed) > 0 => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Pending
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "media connection idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let io = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.watch(cx, io)
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let io = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, io)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let io = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, io)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A connection's count of requests inside a handler, put in each of its
/// requests (as `ConnectInfo`) so `hold_idle_clock` can hold the idle clock.
#[derive(Clone, Debug)]
pub struct Busy(Arc<AtomicU32>);

/// Middleware: the connection's idle clock is held while the handler runs.
pub async fn hold_idle_clock(
    axum::extract::ConnectInfo(busy): axum::extract::ConnectInfo<Busy>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    struct Held(Arc<AtomicU32>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    busy.0.fetch_add(1, Ordering::Relaxed);
    // Released when the response's head is ready, or if the request is
    // dropped before (cancel safe).
    let _held = Held(busy.0);
    next.run(request).await
}
