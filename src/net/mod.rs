//! Sockets: the shard's io_uring socket driver (`uring::Driver`: multishot
//! accept, multishot recv into provided buffers, batched sendmsg) and each
//! connection's state and output queue (`conn::Conn`). Nothing here knows
//! about shards or the engine: the socket loop that drives a shard's
//! sockets (`shard::io::run`) imports this module, never the reverse.
//! No task and no read buffer per connection:
//! - the driver hands over complete frames and keeps only an incomplete
//!   frame's bytes, so an idle connection holds no buffer;
//! - a connection's output queue (`conn::Conn`) collects every frame due to
//!   it in a loop turn and goes to the driver in one piece;
//! - a connection whose output or unanswered Sends reach their bounds is not
//!   read until they drain (backpressure, nothing dropped).

pub mod conn;
pub mod uring;
