//! Sockets: accepting, the handshake, the handoff to the home shard, and
//! each session's input and output.
//!
//! Every socket of a shard is driven by the shard's own io_uring ring
//! (`uring::Driver`: multishot accept, multishot recv into provided buffers,
//! batched sendmsg) from one loop task per shard (`io::run`); no task and no
//! read buffer per connection. The protocol decisions are made in `session`
//! and `shard`; `io` only moves frames between them and the driver:
//! - the driver hands over complete frames and keeps only an incomplete
//!   frame's bytes, so an idle connection holds no buffer;
//! - a connection's output queue (`conn::Conn`) collects every frame due to
//!   it in a loop turn and goes to the driver in one piece;
//! - a connection whose output or unanswered Sends reach their bounds is not
//!   read until they drain (backpressure, nothing dropped).

pub mod conn;
pub mod io;
pub mod uring;

use tracing::debug;

use crate::proto::{self, pb, ErrorCode, Frame};
use crate::shard::Shard;

/// Closes every session with GoAway(SHUTTING_DOWN).
pub fn go_away_all(shard: &Shard) {
    shard.sockets.for_each_session(|conn| {
        conn.close_with(
            &Frame::GoAway(pb::GoAway {
                reason: proto::GoAwayReason::ShuttingDown as i32,
                reconnect_after_ms: 1_000,
            }),
            conn::CloseReason::Shutdown,
        );
    });
}

/// Closes sessions silent for longer than the idle timeout, looking at
/// `count` socket slots from `start`; returns where to go on (`None`: the
/// pass is done), so the caller can yield between slices.
pub fn sweep_idle(shard: &Shard, start: usize, count: usize) -> Option<usize> {
    let now = shard.now_s();
    let idle_s = shard.config.limits.idle_timeout_ms.div_ceil(1000);
    shard.sockets.for_each_session_in(start, count, |conn| {
        let last = conn.state.borrow().last_activity_s;
        if now.saturating_sub(last) >= idle_s && !conn.is_closing() {
            debug!(device = %conn.device, "idle timeout");
            conn.fatal(ErrorCode::IdleTimeout, "no frame within the idle timeout");
        }
    })
}
