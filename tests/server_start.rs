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

/// The scheduling policy of thread `tid` (`sched_getscheduler`).
fn policy(tid: i32) -> i32 {
    // SAFETY: sched_getscheduler only reads the policy of the thread named.
    unsafe { libc::sched_getscheduler(tid) }
}

/// With `server.shard_realtime_priority`, each shard's thread runs under
/// SCHED_FIFO and the rest of the process stays ordinary; where this
/// process may not use SCHED_FIFO, the server still starts and serves
/// with ordinary threads.
#[test]
fn shard_threads_run_under_sched_fifo_when_asked() {
    let allowed = std::thread::spawn(|| {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: a valid sched_param; pid 0 is this short-lived thread.
        unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
    })
    .join()
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.shards = 2;
        c.server.shard_realtime_priority = 5;
    });
    let mut shard_threads = 0;
    let mut fifo = 0;
    let mut others_fifo = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap() {
        let entry = entry.unwrap();
        let tid: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        let is_fifo = policy(tid) == libc::SCHED_FIFO;
        if comm.starts_with("shard-") {
            shard_threads += 1;
            fifo += usize::from(is_fifo);
        } else if is_fifo && !comm.starts_with("iou-wrk") {
            others_fifo.push(comm.to_string());
        }
    }
    // Each shard's executor thread, and its blocking pool's (same name).
    assert!(shard_threads >= 2, "{shard_threads} shard threads");
    assert_eq!(fifo, if allowed { 2 } else { 0 }, "allowed: {allowed}");
    assert!(others_fifo.is_empty(), "{others_fifo:?}");
    for shard in 0..2 {
        RawClient::register_on_shard(server.addr, shard, server.shards());
    }
}

/// A priority outside 1-99 is refused before anything starts.
#[test]
fn a_realtime_priority_above_99_is_refused() {
    let mut config = switchboard::config::Config::default();
    config.server.shard_realtime_priority = 100;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("shard_realtime_priority"), "{err}");
}

/// A second server started on a port another one listens on refuses to
/// start: SO_REUSEPORT would otherwise let it join the first one's
/// listening group and take part of its connections. The first one still
/// serves on both shards.
#[test]
fn a_second_server_on_a_taken_port_refuses_to_start() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let first_dir = tempfile::tempdir().unwrap();
    let first = Server::start(first_dir.path(), |c| c.server.shards = 2);
    let second_dir = tempfile::tempdir().unwrap();
    let config = switchboard::config::Config::for_tests(&second_dir.path().join("data"));
    let config_path = second_dir.path().join("switchboard.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let mut second = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .args(["--listen", &first.addr.to_string(), "--shards", "2"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server on {} kept running", first.addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "the second server exited with {status}");
    assert!(
        stderr.contains(&format!("cannot listen on {}", first.addr))
            && stderr.contains("Address already in use"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("switchboard listening on"),
        "the second server reported readiness"
    );
    for shard in 0..2 {
        RawClient::register_on_shard(first.addr, shard, first.shards());
    }
}
