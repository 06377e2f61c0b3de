//! Waking shard threads that glommio parked with work to do: while the
//! server starts, and for as long as it serves.
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
//! channel end) goes round once and parks again.
//!
//! A serving shard can be caught the same way. Its maintenance timer is due
//! every 100 ms, but once that timer has fired its task waits in the run
//! queue, so the park arms no timeout; and the socket ring's eventfd reader
//! may be in the run queue as well, so no socket wakes it either. Two
//! servers on a loaded two-CPU machine showed it: a shard that had accepted
//! 18 and 22 registrations asleep in glommio's ring for 100-190 s with all
//! of them unanswered, `switchboard_shard_stalled_seconds` growing; a
//! ptrace attach, which interrupts the wait, brought each back. So after
//! start the main thread looks every `SERVING_INTERVAL` at each shard's
//! [`Liveness`]: a shard stalled for `PARKED_AFTER` (its timer overdue, or
//! socket work waiting with no loop turn) whose thread is blocked in
//! `io_uring_enter` gets the same signal, and the server logs a warning
//! and counts it (`switchboard_shard_parked_wakes_total`). A shard that is
//! merely busy is not in `io_uring_enter` and is left alone.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tracing::{debug, warn};

use crate::metrics::Liveness;

/// How often the main thread looks at the shards while they start, and how
/// long after its thread began a shard is first looked at.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// How often the main thread looks at the shards while they serve.
pub const SERVING_INTERVAL: Duration = Duration::from_millis(200);

/// How long a serving shard may be stalled (five of its maintenance timer's
/// periods) before its parked thread is woken.
pub const PARKED_AFTER: Duration = Duration::from_millis(500);

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
        if self.signal() {
            self.woken += 1;
            debug!(
                shard = self.shard,
                "shard thread parked while starting; woken"
            );
            return true;
        }
        false
    }

    /// Wakes the serving shard's thread if `liveness` says the shard has
    /// been stalled for `PARKED_AFTER` at `now_ms` (`metrics::monotonic_ms`)
    /// and the thread is blocked in `io_uring_enter`. Returns whether it
    /// sent the signal.
    pub fn wake_if_stalled(&mut self, liveness: &Liveness, now_ms: u64) -> bool {
        let stalled_ms = liveness.stalled_ms(now_ms);
        if stalled_ms < PARKED_AFTER.as_millis() as u64 || self.thread.is_finished() {
            return false;
        }
        let tid = self.tid.load(Ordering::SeqCst);
        if tid == 0 || !in_io_uring_enter(tid) {
            return false;
        }
        if self.signal() {
            warn!(
                shard = self.shard,
                stalled_ms, "shard thread parked with its work unrun; woken"
            );
            return true;
        }
        false
    }

    /// Sends the thread `WAKE`; false (logged) when that fails.
    fn signal(&self) -> bool {
        match nix::sys::pthread::pthread_kill(self.thread.as_pthread_t(), WAKE) {
            Ok(()) => true,
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

    /// A serving shard's thread blocked in `io_uring_enter` is signalled only
    /// once its liveness has been stalled for `PARKED_AFTER`, and the signal
    /// ends the wait with EINTR (a ring with nothing in flight: only the
    /// signal can end it).
    #[test]
    fn a_stalled_shard_parked_in_its_ring_is_woken() {
        install();
        let tid = Arc::new(AtomicI32::new(0));
        let thread_tid = tid.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ring = io_uring::IoUring::new(4).expect("ring");
            thread_tid.store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
            // Waits for a completion that never comes, until interrupted.
            let error = ring
                .submit_and_wait(1)
                .expect_err("only a signal ends the wait");
            tx.send(error.raw_os_error()).unwrap();
        });
        let mut shard = Starting::new(0, thread, tid.clone(), Arc::new(AtomicBool::new(true)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tid.load(Ordering::SeqCst) == 0 || !in_io_uring_enter(tid.load(Ordering::SeqCst)) {
            assert!(
                Instant::now() < deadline,
                "the thread never waited in its ring"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let liveness = Liveness::default();
        liveness.tick(1_000, false);
        // Its timer ticked 100 ms ago: a shard asleep, not stalled.
        assert!(!shard.wake_if_stalled(&liveness, 1_100));
        assert!(rx.try_recv().is_err(), "woken while not stalled");
        // Its timer is 600 ms overdue: woken, and the wait ends.
        assert!(shard.wake_if_stalled(&liveness, 1_700));
        let errno = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the wait ended after the signal");
        assert_eq!(errno, Some(nix::libc::EINTR));
        while !shard.thread.is_finished() {
            assert!(Instant::now() < deadline, "the thread did not end");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A thread that has ended is never signalled.
        assert!(!shard.wake_if_stalled(&liveness, 1_700));
        shard.thread.join().unwrap();
    }

    #[test]
    fn the_main_thread_is_not_in_io_uring_enter() {
        assert!(!in_io_uring_enter(nix::unistd::gettid().as_raw()));
        assert!(!in_io_uring_enter(i32::MAX));
    }
}
