//! The media listener's connections, bounded: at most
//! `media.connections_max` are open at once (the next is accepted only
//! when one closes; it waits in the listen backlog meanwhile), and a
//! connection that makes no progress reading or writing for
//! `media.idle_timeout_s` while the server waits on it is closed. So a
//! client that opens sockets and sends nothing, or stops reading a
//! download, holds a bounded share of the service for a bounded time.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
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
    idle: Duration,
}

impl BoundedListener {
    pub fn new(listener: TcpListener, connections_max: u32, idle: Duration) -> BoundedListener {
        BoundedListener {
            listener,
            permits: Arc::new(Semaphore::new(connections_max as usize)),
            idle,
        }
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
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl BoundedConn {
    /// `io` made progress: the idle clock starts again; pending, the
    /// connection fails once the clock runs out.
    fn watch<T>(&mut self, cx: &mut Context<'_>, io: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match io {
            Poll::Ready(result) => {
                let next = Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(result)
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
