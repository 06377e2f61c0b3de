//! A count that any thread raises and async tasks wait on without polling:
//! the process's stop and its certificate reloads.
//!
//! The signal thread raises it; the shards read the count at their
//! maintenance tick (they have that timer anyway), and the tokio services
//! (media, WSS) wait in `changed`, woken by the raise itself, so a quiet
//! service has no timer looking at a flag.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Beacon {
    count: AtomicU64,
    notify: Notify,
}

impl Beacon {
    /// Adds one to the count and wakes every task waiting in `changed`.
    pub fn raise(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// How many times it was raised.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Whether it was raised at all (for a stop: whether to stop).
    pub fn raised(&self) -> bool {
        self.count() > 0
    }

    /// Resolves once the count differs from `seen`, with the new count.
    pub async fn changed(&self, seen: u64) -> u64 {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the count is read: a raise between the read
            // and the wait still wakes this task.
            notified.as_mut().enable();
            let now = self.count();
            if now != seen {
                return now;
            }
            notified.await;
        }
    }

    /// Resolves once it has been raised.
    pub async fn raised_wait(&self) {
        self.changed(0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_raise_from_another_thread_wakes_a_waiting_task_and_a_late_waiter_returns_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let beacon = Arc::new(Beacon::default());
        let raiser = beacon.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            raiser.raise();
        });
        let woke = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), beacon.changed(0)).await
        });
        assert_eq!(woke.expect("woken by the raise"), 1);
        thread.join().unwrap();
        assert!(beacon.raised());
        // Already raised: no wait.
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), beacon.raised_wait())
                .await
                .expect("returns at once")
        });
        // Waiting for a change past the current count waits for the next.
        let pending = runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(50), beacon.changed(1)).await
        });
        assert!(pending.is_err());
    }
}
