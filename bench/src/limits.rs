//! The machine limits the harness works around, and how it splits the load.
//!
//! Open files: every connection is a descriptor, and the soft limit is raised
//! to the hard one; when that is still below the connection count, the load
//! is spread over worker processes. Ephemeral ports: a source address has
//! about 28,000 of them toward one server port, so connections are bound to
//! 127.0.0.2, 127.0.0.3, … (the whole 127.0.0.0/8 is loopback) in blocks.

use std::net::{IpAddr, Ipv4Addr};

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde::{Deserialize, Serialize};

/// Descriptors a worker keeps for itself (executor ring, pipes, stdio, the
/// files glommio opens).
pub const RESERVED_FDS: u64 = 200;
/// Connections bound to one loopback source address. The default local port
/// range (32768–60999) has 28,232 ports; the margin leaves room for
/// TIME_WAIT left by a churn run.
pub const CONNECTIONS_PER_SOURCE_IP: u64 = 25_000;

/// Raises the soft open-file limit to the hard limit; returns the new soft
/// limit.
pub fn raise_nofile() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// How a run's connections are spread over worker processes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub nofile_limit: u64,
    pub connections_per_process_max: u64,
    pub processes: u64,
    /// Users per process, in order; each is even so pairs stay in a process.
    pub users_per_process: Vec<u64>,
    pub source_ips: Vec<IpAddr>,
}

/// Loopback source addresses a run may start from (127.0.0.2 … 127.0.195.81).
/// Each run starts at a random one of them: a connection closed by the
/// harness leaves its port in TIME_WAIT for a minute, and a client that
/// binds before connecting cannot reuse it, so back-to-back runs on one
/// address would run out of ports.
pub const SOURCE_IP_OFFSETS: u64 = 50_000;

/// Splits `users` (even) over enough processes that each stays under the
/// open-file limit, and at least `processes_min`. `source_offset` is the
/// first source address's index (random per run, below
/// [`SOURCE_IP_OFFSETS`]).
pub fn plan(
    users: u64,
    nofile_limit: u64,
    processes_min: u64,
    loopback: bool,
    source_offset: u64,
) -> Split {
    let per_process_max = nofile_limit.saturating_sub(RESERVED_FDS).max(2) & !1;
    let needed = users.div_ceil(per_process_max).max(1);
    let processes = needed.max(processes_min).min((users / 2).max(1));
    let pairs = users / 2;
    let mut users_per_process = Vec::new();
    for p in 0..processes {
        let share = pairs / processes + u64::from(p < pairs % processes);
        users_per_process.push(share * 2);
    }
    let source_ips = if loopback {
        let count = users.div_ceil(CONNECTIONS_PER_SOURCE_IP).max(1);
        (0..count).map(|i| source_ip(source_offset + i)).collect()
    } else {
        Vec::new()
    };
    Split {
        nofile_limit,
        connections_per_process_max: per_process_max,
        processes,
        users_per_process,
        source_ips,
    }
}

/// The `index`-th source address: 127.0.0.2, 127.0.0.3, … 127.0.1.0, …
pub fn source_ip(index: u64) -> IpAddr {
    let n = 2 + index as u32;
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | (n & 0x00ff_ffff)))
}

/// The source address of the connection of global user `user_index`.
pub fn source_ip_for(user_index: u64, source_ips: &[IpAddr]) -> Option<IpAddr> {
    if source_ips.is_empty() {
        return None;
    }
    let block = (user_index / CONNECTIONS_PER_SOURCE_IP) as usize;
    Some(source_ips[block.min(source_ips.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_over_processes_when_nofile_is_short() {
        let split = plan(50_000, 20_000, 1, true, 0);
        assert_eq!(split.processes, 3);
        assert_eq!(split.users_per_process.iter().sum::<u64>(), 50_000);
        assert!(split
            .users_per_process
            .iter()
            .all(|u| u & 1 == 0 && *u <= 19_800));
        assert_eq!(split.source_ips.len(), 2);
        assert_eq!(split.source_ips[1], "127.0.0.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn one_process_when_it_fits() {
        let split = plan(1_000, 20_000, 1, true, 7);
        assert_eq!(split.processes, 1);
        assert_eq!(split.users_per_process, vec![1_000]);
        assert_eq!(split.source_ips, vec![source_ip(7)]);
    }

    #[test]
    fn source_addresses_roll_over_octets() {
        assert_eq!(source_ip(0), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(source_ip(254), "127.0.1.0".parse::<IpAddr>().unwrap());
        let ips = vec![source_ip(0), source_ip(1)];
        assert_eq!(source_ip_for(24_999, &ips), Some(source_ip(0)));
        assert_eq!(source_ip_for(25_000, &ips), Some(source_ip(1)));
    }
}
