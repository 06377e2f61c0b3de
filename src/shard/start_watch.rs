//! Waking shard threads that glommio parked with work to do while the
//! server starts.
//!
//! glommio 0.9's executor loop arms its preemption timer, then runs its task
//! queues, and stops before the first one if the timer has already fired;
//! it then parks as if nothing were runnable. A thread descheduled for
//! longer than the timer between those two steps sleeps with its tasks
//! unrun until some event wakes its ring. A serving shard always has one
//! coming (a socket, a timer); a shard at start may have none, and one that
//! parked before its first task slept for good: the server never came up.
//! A long executor timer at start (`START_PREEMPT_INTERVAL`) makes that
//! window rare; this shuts it.
//!
//! Until every shard reports ready, the main thread looks every `INTERVAL`
//! at each shard that has not. If that thread is blocked in
//! `io_uring_enter` (its `/proc/self/task/<tid>/syscall` says so), the main
//! thread sends it `SIGURG`. The signal's handler does nothing and is
//! installed without `SA_RESTART`, so the wait returns `EINTR`, which
//! glommio takes as a wake-up: its loop goes round and runs what is
//! runnable. A shard parked for a reason (waiting for a peer shard's
//! channel end) goes round once and parks again. A shard that has reported
//! ready is never signalled.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tracing::{debug, warn};

/// How often the main thread looks at the shards while they start, and how
/// long after its thread began a shard is first looked at.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// The signal that interrupts the park. Its default action is to be
/// ignored, so one that reached a thread before the handler was installed
/// does nothing.
const WAKE: Signal = Signal::SIGURG;

extern "C" fn on_wake(_: nix::libc::c_int) {}

/// Installs the do-nothing handler for `WAKE` (once per process).
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Without SA_RESTART: a blocking `io_uring_enter` returns EINTR.
        let action = SigAction::new(
            SigHandler::Handler(on_wake),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, so it is async-signal-safe, and
        // nothing else in the process handles or relies on SIGURG.
        if let Err(err) = unsafe { signal::sigaction(WAKE, &action) } {
            warn!(%err, "cannot install the shard start-up wake handler");
        }
    });
}

/// One shard thread while the server starts.
pub struct Starting {
    pub shard: u32,
    pub thread: JoinHandle<()>,
    /// The thread's kernel id (0 until the thread has stored it).
    tid: Arc<AtomicI32>,
    /// Set by the shard as it reports ready.
    serving: Arc<AtomicBool>,
    spawned: Instant,
    /// Signals sent to the thread.
    pub woken: u32,
}

impl Starting {
    pub fn new(
        shard: u32,
        thread: JoinHandle<()>,
        tid: Arc<AtomicI32>,
        serving: Arc<AtomicBool>,
    ) -> Self {
        Starting {
            shard,
            thread,
            tid,
            serving,
            spawned: Instant::now(),
            woken: 0,
        }
    }

    /// Wakes the shard's thread if the shard has not reported ready
    /// `INTERVAL` after its thread began and the thread is blocked in
    /// `io_uring_enter`. Returns whether it sent the signal.
    pub fn wake_if_parked(&mut self) -> bool {
        if self.serving.load(Ordering::SeqCst) || self.spawned.elapsed() < INTERVAL {
            return false;
        }
        let tid = self.tid.load(Ordering::SeqCst);
        if tid == 0 || !in_io_uring_enter(tid) {
            return false;
        }
        // The flag is read again: the shard may have reported since.
        if self.serving.load(Ordering::SeqCst) {
            return false;
        }
        match nix::sys::pthread::pthread_kill(self.thread.as_pthread_t(), WAKE) {
            Ok(()) => {
                self.woken += 1;
                debug!(
                    shard = self.shard,
                    "shard thread parked while starting; woken"
                );
                true
            }
            Err(err) => {
                warn!(shard = self.shard, %err, "cannot wake the shard thread");
                false
            }
        }
    }
}

/// Whether thread `tid` of this process is blocked in `io_uring_enter`.
fn in_io_uring_enter(tid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) else {
        return false;
    };
    text.split(' ')
        .next()
        .and_then(|number| number.parse::<i64>().ok())
        == Some(nix::libc::SYS_io_uring_enter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glommio's park before the first task, made near certain with a 10 µs
    /// preemption timer (without the wake, 22 of 30 such starts never ran
    /// their first task here), is undone by the wake: every start runs it.
    #[test]
    fn a_start_parked_before_its_first_task_is_woken() {
        install();
        let mut woken = 0;
        for _ in 0..20 {
            let started = Arc::new(AtomicBool::new(false));
            let tid = Arc::new(AtomicI32::new(0));
            let (task_started, thread_tid) = (started.clone(), tid.clone());
            let thread = std::thread::spawn(move || {
                thread_tid.store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
                let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .spin_before_park(Duration::from_millis(0))
                    .preempt_timer(Duration::from_micros(10))
                    .make()
                    .expect("executor");
                executor.run(async move { task_started.store(true, Ordering::SeqCst) });
            });
            let mut starting = Starting::new(0, thread, tid, started.clone());
            let deadline = Instant::now() + Duration::from_secs(20);
            while !started.load(Ordering::SeqCst) {
                assert!(
                    Instant::now() < deadline,
                    "the executor's first task did not run within 20 s"
                );
                std::thread::sleep(Duration::from_millis(2));
                if starting.wake_if_parked() {
                    woken += 1;
                }
            }
            starting.thread.join().expect("executor thread");
        }
        // Catches a glommio that no longer parks there (then this module
        // can go) as much as a wake that does nothing.
        assert!(woken > 0, "no start needed a wake");
    }

    #[test]
    fn the_main_thread_is_not_in_io_uring_enter() {
        assert!(!in_io_uring_enter(nix::unistd::gettid().as_raw()));
        assert!(!in_io_uring_enter(i32::MAX));
    }
}
