//! Slows down repeated failed logins from one address.
//!
//! Each shard keeps the entries of the addresses it is home to
//! (`route::address_home`): every Hello is decided there, whichever shard
//! SO_REUSEPORT gave the connection to, so an address has one budget for the
//! whole server. Past `auth_failures_before_delay`
//! failures an address must wait `auth_failure_delay_ms`, doubling per
//! further failure up to 30 s; a success or a minute without failures forgets
//! it. At most `auth_failure_addresses_max` addresses are tracked; the oldest
//! is evicted first, so a flood of addresses costs bounded memory.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::Limits;

const DELAY_MAX: Duration = Duration::from_secs(30);
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: Instant,
    blocked_until: Instant,
}

#[derive(Debug)]
pub struct AuthThrottle {
    entries: HashMap<IpAddr, Entry>,
    order: VecDeque<IpAddr>,
    failures_before_delay: u32,
    delay: Duration,
    addresses_max: usize,
}

impl AuthThrottle {
    pub fn new(limits: &Limits) -> AuthThrottle {
        AuthThrottle {
            entries: HashMap::new(),
            order: VecDeque::new(),
            failures_before_delay: limits.auth_failures_before_delay,
            delay: Duration::from_millis(limits.auth_failure_delay_ms as u64),
            addresses_max: limits.auth_failure_addresses_max as usize,
        }
    }

    /// `Some(wait)` if `addr` must not try now.
    pub fn check(&mut self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let entry = self.entries.get(&addr)?;
        if now.duration_since(entry.last_failure) > FORGET_AFTER {
            self.entries.remove(&addr);
            return None;
        }
        (entry.blocked_until > now).then(|| entry.blocked_until - now)
    }

    pub fn on_failure(&mut self, addr: IpAddr, now: Instant) {
        if !self.entries.contains_key(&addr) {
            while self.entries.len() >= self.addresses_max {
                match self.order.pop_front() {
                    Some(old) => {
                        self.entries.remove(&old);
                    }
                    None => break,
                }
            }
            // Stale keys of forgotten entries may linger in `order`; bound it.
            if self.order.len() >= 2 * self.addresses_max {
                let entries = &self.entries;
                self.order.retain(|a| entries.contains_key(a));
            }
            self.order.push_back(addr);
        }
        let entry = self.entries.entry(addr).or_insert(Entry {
            failures: 0,
            last_failure: now,
            blocked_until: now,
        });
        entry.failures += 1;
        entry.last_failure = now;
        if entry.failures >= self.failures_before_delay {
            let doublings = (entry.failures - self.failures_before_delay).min(16);
            let wait = self.delay.saturating_mul(1 << doublings).min(DELAY_MAX);
            entry.blocked_until = now + wait;
        }
    }

    pub fn on_success(&mut self, addr: IpAddr) {
        self.entries.remove(&addr);
    }

    pub fn tracked(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            auth_failures_before_delay: 2,
            auth_failure_delay_ms: 100,
            auth_failure_addresses_max: 3,
            ..Limits::default()
        }
    }

    #[test]
    fn delays_after_budget_and_doubles() {
        let mut t = AuthThrottle::new(&limits());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        t.on_failure(a, now);
        assert_eq!(t.check(a, now), None);
        t.on_failure(a, now);
        assert_eq!(t.check(a, now), Some(Duration::from_millis(100)));
        t.on_failure(a, now);
        assert_eq!(t.check(a, now), Some(Duration::from_millis(200)));
        assert_eq!(t.check(a, now + Duration::from_millis(250)), None);
        t.on_success(a);
        assert_eq!(t.check(a, now), None);
    }

    #[test]
    fn tracks_a_bounded_number_of_addresses() {
        let mut t = AuthThrottle::new(&limits());
        let now = Instant::now();
        for i in 0..100u8 {
            t.on_failure(IpAddr::from([10, 0, 0, i]), now);
            assert!(t.tracked() <= 3);
        }
    }
}
