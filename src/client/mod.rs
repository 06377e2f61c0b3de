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
//! Encryption: by default a connection speaks Noise ([`crate::noise`]). The
//! client opens with the intro and the first handshake message (IK when it
//! knows the server's static key, XX otherwise), reads the server's answer,
//! and from then on seals every byte it writes and opens every byte it reads;
//! the frames inside are the same as in plaintext, and the login (Register,
//! Hello or Link) is the first of them. The client's handshake payload is
//! always empty. A device registered over Noise is its static key: the
//! server records the key and answers Registered with no secret.
//!
//! Pinning: the server's key is learned at first contact (XX) and kept with
//! the credentials ([`Credentials::server_key`]) or passed in
//! [`ConnectOptions::server_key`]; with a pin the client uses IK. An IK to a
//! key the server no longer holds shows as the server closing before its
//! message; the client then tries XX once and compares the key the server
//! proves against the pin: a different key fails with
//! [`ClientError::ServerKeyChanged`] before the client sends anything more.
//! During a rotation's overlap the server answers an IK to its previous key
//! with its current key, which [`Session::server_key`] then returns.
//!
//! Plaintext (`ConnectOptions::plaintext`, or credentials with a secret and
//! no Noise key) stays available for development on loopback, where the
//! server accepts it by default.
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

use crate::noise::{fingerprint, NoiseError};
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
    /// Bound on connecting plus the handshake (Noise, then Register, Hello
    /// or Link), the XX retry after a refused IK included.
    pub timeout: Duration,
    /// Speak plaintext frames instead of Noise. Default false. The server
    /// accepts plaintext from loopback addresses only (by default); for
    /// development and for measuring the encryption's cost.
    pub plaintext: bool,
    /// The server's static public key to trust: IK to it, and an XX that
    /// presents another key fails with [`ClientError::ServerKeyChanged`].
    /// `None`: the credentials' pin ([`Credentials::server_key`]), else XX
    /// trusting whatever key the server proves (first contact).
    pub server_key: Option<[u8; 32]>,
}

impl ConnectOptions {
    /// Defaults matching the server's: 66,560-byte frames, a 10 s handshake,
    /// Noise with no pinned key.
    pub fn new(server: SocketAddr) -> ConnectOptions {
        ConnectOptions {
            server,
            bind_ip: None,
            frame_bytes_max: 66_560,
            timeout: Duration::from_secs(10),
            plaintext: false,
            server_key: None,
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
    /// A Noise handshake or transport message failed (a tampered or
    /// garbled byte stream, or a server that is not speaking Noise); fatal
    /// for the connection.
    #[error("noise: {0}")]
    Noise(#[from] NoiseError),
    /// The server closed the connection before answering the Noise
    /// handshake's first message: it refused the handshake (for IK, it does
    /// not hold the key the client encrypted to), or it does not speak Noise.
    #[error("the server closed the connection during the Noise handshake (it refused the handshake, or does not speak Noise)")]
    HandshakeClosed,
    /// The server proved a static key other than the pinned one. Either the
    /// server's key was replaced (ask its operator for the new key's
    /// fingerprint) or someone is in the middle of the connection. Nothing
    /// was sent after the server's handshake message.
    #[error(
        "the server's key changed: pinned {}, the server presents {}",
        fingerprint(.expected),
        fingerprint(.got)
    )]
    ServerKeyChanged {
        /// The pinned key.
        expected: [u8; 32],
        /// The key the server proved it holds.
        got: [u8; 32],
    },
    /// A plaintext login was asked for, but the credentials hold no secret
    /// (a device registered over Noise logs in with its key only).
    #[error("these credentials have no secret for a plaintext login: this device logs in over Noise only")]
    NoSecret,
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
