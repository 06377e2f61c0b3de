//! Switchboard: a thread-per-core io_uring store-and-forward messaging server.
//!
//! The tree mirrors the architecture (see `docs/architecture.md`):
//! - `proto`: wire framing and frame types (sans-IO).
//! - `session`: the per-connection protocol state machine (sans-IO).
//! - `engine`: the delivery logic, one folder per feature (sans-IO).
//! - `route`: placement of users on shards and inter-shard messages.
//! - `store`: the per-shard segment log, inboxes and group commit.
//! - `meta`: accounts and device credentials in an embedded database.
//! - `shard`: one pinned glommio executor per shard and its wiring.
//! - `net`: listeners, connection I/O, handoff between shards.
//! - `client`: the async client library; `chat`: the terminal client.
//! - `doctor`: host checks; `metrics`: counters and the admin endpoint.
//! - `media`: the attachment service; `wss`: browsers over WebSocket and
//!   TLS, bridged to the client listener (each on a tokio runtime of its own).
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod beacon;
pub mod chat;
pub mod client;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod ids;
pub mod media;
pub mod meta;
pub mod metrics;
pub mod net;
pub mod noise;
pub mod proto;
pub mod push;
pub mod route;
pub mod session;
pub mod shard;
pub mod store;
pub mod wss;
