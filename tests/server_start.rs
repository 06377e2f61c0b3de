//! Starting the real binary many times at once: every start reports
//! readiness. glommio 0.9 parks an executor whose preemption timer fired
//! before its first task queue ran as if it were idle; a shard descheduled
//! in that window at start once slept for good (docs/reliability.md,
//! "A shard that never started"). Several two-shard servers starting at
//! once on a small machine make such stalls likely; a start that hangs
//! fails `Server::start` after 30 s with its threads' states.

mod common;

use common::{RawClient, Server};

/// Servers starting at once, and starts each.
const AT_ONCE: usize = 6;
const STARTS_EACH: usize = 8;

#[test]
fn parallel_two_shard_starts_all_report_readiness_and_serve() {
    let threads: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..STARTS_EACH {
                    let dir = tempfile::tempdir().unwrap();
                    let server = Server::start(dir.path(), |c| c.server.shards = 2);
                    // Both shards serve: a user homed on each registers.
                    for shard in 0..2 {
                        RawClient::register_on_shard(server.addr, shard, server.shards());
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .expect("every start reported readiness and served");
    }
}
