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

/// The server grows its descriptor table to the open-file limit at start,
/// so no accept or open while it serves has to grow it: growing a shared
/// table waits for an RCU grace period inside that call, which held a
/// shard's thread 15 ms (docs/benchmarks.md, "The descriptor table").
#[test]
fn the_descriptor_table_is_sized_for_the_open_file_limit_at_start() {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let want = soft.min(1 << 23).min(nr_open);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let fd_size = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .expect("FDSize in /proc/<pid>/status")
            .trim()
            .parse()
            .unwrap()
    };
    let at_start = fd_size();
    assert!(
        at_start >= want,
        "descriptor table of {at_start} entries, open-file limit {soft}"
    );
    // Sessions come and the table stays as it was.
    let _clients: Vec<_> = (0..8)
        .map(|_| RawClient::login(server.addr, &RawClient::register(server.addr)).0)
        .collect();
    assert_eq!(fd_size(), at_start);
}
