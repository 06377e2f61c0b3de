//! Messages between shards.
//!
//! Two meshes of bounded channels connect every pair of shards: `Request`s,
//! sent by the socket loop (a full channel sets the session's later frames
//! aside and stops reading it: that is the backpressure), and `Reply`s, sent by a
//! shard's request handler and commit task. A reply handler only writes into
//! local connection queues and never sends on a channel, so replies always
//! drain and the two meshes cannot deadlock each other.

use std::net::IpAddr;
use std::os::fd::OwnedFd;

use bytes::Bytes;

use crate::ids::{DeviceId, InboxKey, UserId};
use crate::proto::ErrorCode;

pub use crate::engine::{ConnRef, RelayRef};

/// Work one shard asks of another (the target is always the home shard of
/// the user, device or address the request is about).
#[derive(Debug)]
pub enum Request {
    /// Work for the target's delivery engine (a message or receipt to store).
    Engine(crate::engine::Request),
    /// Check a Hello's credential for `origin`, a handshake on another
    /// shard, on the home shard of the client's address (`address_home`),
    /// which keeps the failed-login count of that address for the whole
    /// server; answered with `Reply::Hello`.
    Hello {
        origin: ConnRef,
        peer: IpAddr,
        device: InboxKey,
        secret: Bytes,
        /// A Noise client's static key (its login; see `MetaStore::verify_key`).
        noise_key: Option<[u8; 32]>,
    },
    /// Redeem a link code for `origin`, a handshake on another shard, on
    /// the home shard of the client's address, which counts a bad code as a
    /// failed login of that address; answered with `Reply::Link`.
    Link {
        origin: ConnRef,
        peer: IpAddr,
        code: String,
        name: String,
        /// A Noise client's static key, recorded as the companion's login.
        noise_key: Option<[u8; 32]>,
    },
    /// An authenticated connection moving to its device's home shard: the
    /// socket and the bytes already read past the Hello.
    Handoff {
        fd: OwnedFd,
        device: InboxKey,
        /// The protocol version the handshake settled on.
        version: u32,
        buffered: Bytes,
        /// When the socket was accepted (`net::conn::connected_now`).
        connected_at: u32,
        /// A Noise connection's transport (its cipher states and unopened
        /// input); `buffered` is then plaintext.
        sealing: Option<Box<crate::net::uring::Sealing>>,
    },
}

/// What the home shard of a client's address decided about its Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloVerdict {
    /// The credential is good: the session may open.
    Accepted,
    /// Unknown device or wrong secret (counted against the address).
    Failed,
    /// The address is delaying after failed Hellos; try again after this.
    RateLimited { retry_after_ms: u32 },
    /// The credential could not be read (a metadata error, logged there).
    Internal,
}

/// What the home shard of a client's address decided about its Link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkOutcome {
    /// A companion was created: its credentials, for Registered.
    Linked {
        user: UserId,
        device: DeviceId,
        secret: [u8; crate::meta::SECRET_BYTES],
    },
    /// LINK_CODE_INVALID (counted against the address) or TOO_MANY_DEVICES.
    Refused(ErrorCode),
    /// The address is delaying after failed attempts; try again after this.
    RateLimited { retry_after_ms: u32 },
    /// The database failed (logged there).
    Internal,
}

/// An answer from one shard to another.
#[derive(Debug)]
pub enum Reply {
    /// For the target's delivery engine (a Send stored or refused, relayed
    /// receipts stored).
    Engine(crate::engine::Reply),
    /// The verdict on a `Request::Hello`.
    Hello {
        origin: ConnRef,
        verdict: HelloVerdict,
    },
    /// The outcome of a `Request::Link`.
    Link {
        origin: ConnRef,
        outcome: LinkOutcome,
    },
}
