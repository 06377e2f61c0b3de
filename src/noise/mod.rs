//! Noise transport encryption (sans-IO): the handshake that logs a device in
//! and the sealed byte stream that carries the ordinary frames after it.
//!
//! A Noise client opens with a 5-byte intro, `"SBN1"` and a pattern byte
//! (`'X'` for `Noise_XX_25519_ChaChaPoly_SHA256`, first contact; `'I'` for
//! `Noise_IK_25519_ChaChaPoly_SHA256`, when the client already knows the
//! server's static key). Read as a plaintext frame length, `"SBN1"` is
//! 0x53424E31, far above any frame limit, so the first 4 bytes tell a Noise
//! client from a plaintext one. The intro is the Noise prologue, so a
//! man in the middle cannot change the pattern without failing the handshake.
//!
//! Then come Noise messages, each `u16 big-endian length | message`
//! (length 1..=65535). After the handshake each message is a ChaCha20-Poly1305
//! ciphertext of one chunk (1..=65519 bytes) of the ordinary frame byte stream;
//! frames may span chunks and chunks may hold several frames, so the frame
//! limits apply to the plaintext, checked by the ordinary deframer.
//!
//! | step | XX (first contact)                      | IK (reconnect)                          |
//! |------|-----------------------------------------|-----------------------------------------|
//! | C→S  | intro, `e` (32 bytes, no payload)       | intro, `e, es, s, ss` + client payload  |
//! | S→C  | `e, ee, s, es` + server payload         | `e, ee, se` + server payload            |
//! | C→S  | `s, se` + client payload                | (transport)                             |
//!
//! The client payload (at most [`CLIENT_PAYLOAD_BYTES_MAX`]) is opaque here:
//! the caller puts its login frame there. The server payload is empty, except
//! when an IK client used the server's previous static key: then it is the
//! 32-byte current key, authenticated by the handshake with the key the
//! client already trusts, so the client can re-pin (see [`keys`]).
//!
//! Module map: [`wire`] parses the intro and splits length-prefixed messages,
//! [`keys`] keeps the server's static keys on disk and rotates them,
//! [`handshake`] drives both sides of a handshake over `snow`, and
//! [`transport`] seals and opens the stream after it.
//!
//! Touched by: each shard's connection code (the server side) and the client
//! library, each on its own thread. Nothing here is shared between threads
//! except [`ServerKeys`], which is read-only after start.
//!
//! Invariants: no byte of a client payload or of a transport plaintext is
//! handed out before the handshake is finished and authenticated; every
//! length from a peer is checked against its limit before memory is reserved
//! for it; any error is fatal for the connection (Noise has no resync).

pub mod handshake;
pub mod keys;
pub mod transport;
pub mod wire;

#[cfg(test)]
mod tests;

pub use handshake::{Initiator, Responder};
pub use keys::{fingerprint, KeyFileError, KeySlot, ServerKeys, StaticKeypair};
pub use transport::Transport;
pub use wire::{Intro, Pattern};

/// Largest client payload (the login frame inside the handshake), in bytes.
/// 4 KiB holds any Register, Hello or Link frame with room to spare; a larger
/// one is refused from the message length alone, before anything is
/// allocated for it. Cost: the responder keeps one copy until the login is
/// handled, so at most this many bytes per connection in handshake.
pub const CLIENT_PAYLOAD_BYTES_MAX: usize = 4096;

/// Largest server payload a client accepts, in bytes. The server sends 0 or
/// 32; the margin lets later versions add to it without breaking clients.
pub const SERVER_PAYLOAD_BYTES_MAX: usize = 4096;

/// Why bytes from a peer (or a caller's request) do not make a Noise session.
/// Cheap to copy, never allocates. Every variant is fatal for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoiseError {
    #[error("not a Noise intro: the stream does not start with \"SBN1\"")]
    BadMagic,
    #[error("unknown handshake pattern byte 0x{0:02x} (expected 'X' or 'I')")]
    UnknownPattern(u8),
    #[error("Noise message of length 0")]
    EmptyMessage,
    #[error("Noise message of {length} bytes exceeds the limit of {limit}")]
    MessageTooLarge { length: usize, limit: usize },
    #[error("handshake message of {length} bytes is shorter than the {needed} its pattern needs")]
    HandshakeTruncated { length: usize, needed: usize },
    #[error("handshake payload of {length} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { length: usize, limit: usize },
    #[error("the client encrypted to a server static key this server does not hold")]
    UnknownServerKey,
    #[error("handshake message failed authentication (altered, replayed or for another session)")]
    HandshakeDecrypt,
    #[error("the peer's static key is a low-order point")]
    WeakStaticKey,
    #[error("handshake message arrived when none was expected")]
    UnexpectedMessage,
    #[error("the client sent a handshake payload; the login goes in the first sealed frame")]
    PayloadNotEmpty,
    #[error("the handshake is not finished")]
    HandshakeUnfinished,
    #[error("transport message of {length} bytes is too short to hold a chunk and its tag")]
    TransportTooShort { length: usize },
    #[error("transport message failed authentication (altered, replayed, reordered or truncated)")]
    TransportDecrypt,
    #[error("the transport nonce is exhausted: the session must end")]
    NonceExhausted,
    #[error("Noise library error: {0}")]
    Library(&'static str),
}
