//! The worker processes of this coordinator, killed and reaped on every exit
//! path.
//!
//! Every worker's [`Child`] lives in one process-wide list behind a lock, from
//! just after it is spawned until the process exits. The fleet (its normal end,
//! and its `Drop` on an error return or a panic) and the signal thread
//! (SIGINT, SIGTERM, SIGHUP) both kill and wait through that list, so a pid is
//! waited for exactly once: `Child` remembers the status it reaped, and
//! neither signals nor waits again afterwards (a reaped pid may already
//! belong to another process). The signal thread exits the process while it
//! still holds the lock.
//!
//! A worker also ends by itself when the coordinator dies (`worker::run` asks
//! the kernel for SIGKILL on its parent's death), which covers the one exit no
//! code of ours sees: a SIGKILL of the coordinator.

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};

/// The signals that end a run early; the coordinator blocks those it does
/// not ignore in every thread and waits for them on one.
pub const STOP_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

static WORKERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Scratch files a stop signal removes (the `sync` scenario's probe file).
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Has a stop signal remove `path`; the owner removes it on its other exit
/// paths and then calls [`scratch_removed`].
pub fn remove_on_stop(path: &Path) {
    SCRATCH
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// `path`, registered by [`remove_on_stop`], is gone.
pub fn scratch_removed(path: &Path) {
    SCRATCH
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|p| p != path);
}

fn workers() -> MutexGuard<'static, Vec<Child>> {
    // A panic elsewhere must not stop the workers from being killed.
    WORKERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// All of [`STOP_SIGNALS`]: a worker unblocks them, since it inherits the
/// coordinator's blocked mask through exec.
pub fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in STOP_SIGNALS {
        set.add(signal);
    }
    set
}

/// The stop signals this process does not ignore. One started with SIGHUP
/// ignored (`nohup`) or SIGINT ignored (a script's background job) keeps
/// ignoring them, as its starter asked: a blocked signal is queued even when
/// ignored, so blocking and waiting for it would answer it after all.
fn stop_signals_not_ignored() -> Vec<Signal> {
    // `SigIgn` is the mask of ignored signals, bit n − 1 for signal n; read
    // here because asking sigaction for it takes unsafe code.
    let ignored = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("SigIgn:"))?;
            u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).ok()
        })
        .unwrap_or(0);
    STOP_SIGNALS
        .into_iter()
        .filter(|&signal| ignored & (1 << (signal as u32 - 1)) == 0)
        .collect()
}

/// Keeps `child` for killing and reaping; its pid.
pub fn adopt(child: Child) -> u32 {
    let pid = child.id();
    workers().push(child);
    pid
}

/// The exit status of worker `pid` once it has exited (reaping it), `None`
/// while it runs or when it is not ours.
pub fn try_wait(pid: u32) -> Option<ExitStatus> {
    let mut workers = workers();
    let child = workers.iter_mut().find(|c| c.id() == pid)?;
    child.try_wait().ok().flatten()
}

/// Kills worker `pid` (SIGKILL, unless it has already been reaped) and waits
/// for it; its exit status. A no-op for a pid that is not ours.
pub fn kill_and_reap(pid: u32) -> Option<ExitStatus> {
    let mut workers = workers();
    let child = workers.iter_mut().find(|c| c.id() == pid)?;
    kill_and_wait(child)
}

fn kill_and_wait(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // Fails only when the child exited meanwhile, which the wait sees.
    let _ = child.kill();
    child.wait().ok()
}

/// Blocks the stop signals (those not ignored) in this thread, and so in
/// every thread started after it, and starts the thread that waits for them:
/// on the first it kills and reaps every worker, then ends this process by
/// that signal (its default action), so a calling shell sees the
/// interruption.
///
/// Call it from `main` before any other thread exists: a thread that does
/// not block the signals would take them and die without the cleanup.
pub fn handle_stop_signals() -> anyhow::Result<()> {
    let signals = stop_signals_not_ignored();
    if signals.is_empty() {
        return Ok(());
    }
    let mut set = SigSet::empty();
    for &signal in &signals {
        set.add(signal);
    }
    set.thread_block()
        .with_context(|| format!("blocking {signals:?}"))?;
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            // sigwait fails only for an invalid set, a bug: crash at once
            // rather than run on with the signals blocked and unanswered (the
            // workers die with this process).
            let signal = set.wait().unwrap_or_else(|error| {
                eprintln!("waiting for {signals:?} failed: {error}");
                std::process::abort()
            });
            let mut workers = workers();
            let pids: Vec<u32> = workers.iter().map(Child::id).collect();
            for child in workers.iter_mut() {
                kill_and_wait(child);
            }
            for path in SCRATCH
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                let _ = std::fs::remove_file(path);
            }
            eprintln!(
                "{signal}: stopped; killed and reaped {} worker process(es) {pids:?}",
                pids.len()
            );
            // The lock stays held: no other thread touches a worker again.
            let _ = set.thread_unblock();
            let _ = nix::sys::signal::raise(signal);
            // Not reached while the signal's action is the default; the
            // conventional status for death by a signal otherwise.
            std::process::exit(128 + signal as i32);
        })
        .context("starting the signal thread")?;
    Ok(())
}
