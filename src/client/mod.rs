//! The async client library: one authenticated device session over TCP.
//!
//! Built on glommio: a [`Session`] is `!Send` and lives on the executor that
//! opened it. Its methods take `&self`, so a sending task and a receiving task
//! can share an `Rc<Session>`. Frames are encoded with [`crate::proto`].
//!
//! Writing: `send`, `ack`, … only encode the frame into the session's output
//! queue; [`Session::flush`] writes everything queued with as few syscalls as
//! the kernel allows (one `send` for the whole queue in the common case). The
//! queue is bounded: past [`QUEUE_FRAMES_MAX`] frames' worth of bytes a queueing
//! call fails with [`ClientError::QueueFull`] and nothing is lost.
//!
//! Reading: one read buffer per session, grown only to fit the frame being
//! read; frames are split with [`crate::proto::next_frame`], bounded by
//! `ConnectOptions::frame_bytes_max` before any body byte arrives. Payloads of
//! `Deliver` frames are `Bytes` slices of that buffer (no copy).
//!
//! [`ReconnectingSession`] adds resume: reconnect with backoff, re-send every
//! Send the server has not acknowledged (same client message id, so the server
//! dedupes), drop redelivered inbox entries (by sequence), and keep the
//! session alive with Pings.
//!
//! Touched by: the thread of the glommio executor that created the session.
//!
//! ```no_run
//! use std::rc::Rc;
//! use bytes::Bytes;
//! use switchboard::client::{register, ConnectOptions, Event, Session};
//! use switchboard::ids::{ClientMessageId, InboxSeq, UserId};
//!
//! glommio::LocalExecutor::default().run(async {
//!     let opts = ConnectOptions::new("127.0.0.1:7700".parse().unwrap());
//!     let creds = register(&opts, None).await.unwrap();
//!     let session = Rc::new(Session::connect(&opts, &creds).await.unwrap());
//!     // Queue any number of frames, then write them with one flush.
//!     session.send(UserId(2), ClientMessageId(1), Bytes::from_static(b"hi")).unwrap();
//!     session.flush().await.unwrap();
//!     loop {
//!         match session.next_event().await.unwrap() {
//!             Event::ServerAck(ack) => println!("✓ {}", ack.client_message_id),
//!             Event::Deliver(message) => {
//!                 session.ack(InboxSeq(message.sequence)).unwrap();
//!                 session.flush().await.unwrap();
//!             }
//!             _ => {}
//!         }
//!     }
//! });
//! ```

mod credentials;
pub mod media;
mod reconnect;
mod session;
#[cfg(test)]
pub(crate) mod tests;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use credentials::Credentials;
pub use reconnect::{ReconnectOptions, ReconnectingSession};
pub use session::{link, register, Event, Session};

use crate::proto::{pb, DecodeError, ErrorCode, FrameType, GoAwayReason};

/// The output queue of a session holds at most this many largest frames'
/// worth of bytes (`frame_bytes_max` each): with the default limit about
/// 1 MiB, the server's own per-connection output bound.
pub const QUEUE_FRAMES_MAX: u32 = 16;

/// Bytes read per read call at least; a larger frame grows the read to fit it.
/// Small enough that thousands of idle sessions cost little, large enough to
/// take a full delivery window of small messages in a few reads.
pub const READ_CHUNK_BYTES: usize = 4096;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The server's client listener.
    pub server: SocketAddr,
    /// Source address to bind before connecting (port 0), e.g. 127.0.0.2 to
    /// spread many connections over more source ports; `None`: the kernel's
    /// choice.
    pub bind_ip: Option<IpAddr>,
    /// Largest frame (type byte + body) accepted from the server, bytes.
    pub frame_bytes_max: u32,
    /// Bound on connecting plus the handshake (Register or Hello).
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Defaults matching the server's: 66,560-byte frames, a 10 s handshake.
    pub fn new(server: SocketAddr) -> ConnectOptions {
        ConnectOptions {
            server,
            bind_ip: None,
            frame_bytes_max: 66_560,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What went wrong on a client connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection (or it was closed after a fatal error).
    #[error("connection closed")]
    Closed,
    /// The server sent bytes that are not a valid frame.
    #[error("protocol error: {0}")]
    Protocol(#[from] DecodeError),
    /// The server answered with an Error frame (during the handshake, or as
    /// returned by a call that waits for one specific answer).
    #[error("server error {}: {}", error_code_name(.0.code), .0.message)]
    Server(pb::Error),
    /// The server sent GoAway during the handshake.
    #[error("server went away ({reason:?}), reconnect after {reconnect_after_ms} ms")]
    GoAway {
        reason: GoAwayReason,
        reconnect_after_ms: u32,
    },
    /// A frame the protocol does not allow at this point.
    #[error("unexpected {} frame from the server", .0.name())]
    UnexpectedFrame(FrameType),
    #[error("timed out")]
    Timeout,
    /// The output queue is at its bound; flush first.
    #[error("output queue full")]
    QueueFull,
}

impl ClientError {
    /// The server's error code, when the server sent one.
    pub fn server_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// The protocol name of an error code (`AUTH_FAILED`), for messages.
pub fn error_code_name(code: i32) -> &'static str {
    match ErrorCode::try_from(code) {
        Ok(code) => code
            .as_str_name()
            .strip_prefix("ERROR_CODE_")
            .unwrap_or("UNSPECIFIED"),
        Err(_) => "UNKNOWN",
    }
}

/// Runs `future`, failing with [`ClientError::Timeout`] after `duration`.
pub(crate) async fn with_timeout<T>(
    duration: Duration,
    future: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    futures_lite::future::or(future, async {
        glommio::timer::sleep(duration).await;
        Err(ClientError::Timeout)
    })
    .await
}
