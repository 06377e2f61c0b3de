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

use crate::ids::{ClientMessageId, InboxKey, ShardId, UserId};
use crate::proto::ErrorCode;
use crate::store::ReceiptKind;

/// A connection, named across shards: the shard it lives on and its id there
/// (its socket's slot and generation in that shard's driver, so a reply for
/// a connection that has gone never reaches the one reusing its slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub shard: ShardId,
    pub id: u64,
}

/// A receipt in its origin shard's relay inbox (`InboxKey::relay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayRef {
    pub shard: ShardId,
    pub inbox: InboxKey,
    pub seq: u64,
}

/// Work one shard asks of another (the target is always the home shard of
/// the user or device the request is about).
#[derive(Debug)]
pub enum Request {
    /// Store a message in `recipient`'s inbox and answer `origin` when durable.
    Store {
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        recipient: UserId,
        payload: Bytes,
    },
    /// Store a receipt in `recipient`'s inbox (the original sender device).
    StoreReceipt {
        recipient: InboxKey,
        kind: ReceiptKind,
        by: InboxKey,
        client_message_ids: Vec<u64>,
        /// When the receipt arose on the origin shard.
        timestamp_ms: u64,
        /// Where the origin shard keeps it until it is stored here (`None`
        /// if it could not keep it); answered with `Reply::Relayed`.
        relay: Option<RelayRef>,
    },
    /// Check a Hello's credential for `origin`, a handshake on another
    /// shard, on the home shard of the client's address (`address_home`),
    /// which keeps the failed-login count of that address for the whole
    /// server; answered with `Reply::Hello`.
    Hello {
        origin: ConnRef,
        peer: IpAddr,
        device: InboxKey,
        secret: Bytes,
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

/// The answer to a `Request::Store`.
#[derive(Debug)]
pub enum Reply {
    /// Durable: send ServerAck (✓).
    Stored {
        origin: ConnRef,
        client_message_id: ClientMessageId,
        seq: u64,
        timestamp_ms: u64,
    },
    /// Not stored: send Error with the client message id.
    Refused {
        origin: ConnRef,
        client_message_id: ClientMessageId,
        code: ErrorCode,
    },
    /// The verdict on a `Request::Hello`.
    Hello {
        origin: ConnRef,
        verdict: HelloVerdict,
    },
    /// Relayed receipts are durable in their recipients' inboxes (or could
    /// not be stored there, which is logged): the origin `shard` drops its
    /// copies, the entries `seqs` of its relay inbox `inbox`. One reply per
    /// commit batch and relay inbox.
    Relayed {
        shard: ShardId,
        inbox: InboxKey,
        seqs: Vec<u64>,
    },
}
