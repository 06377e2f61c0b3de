//! Memory samples of the server process and of the kernel's sockets.
//!
//! Server: RSS from `/proc/PID/status` (`VmRSS`) and PSS from
//! `/proc/PID/smaps_rollup`. Kernel: `/proc/net/sockstat` (TCP buffer pages
//! in use) and the slab caches in `/proc/slabinfo` (root only; the total
//! `Slab:` of `/proc/meminfo` otherwise). On loopback the kernel figures hold
//! both ends of every connection, the load generator's and the server's.
//!
//! Plain file reads; called from the coordinator thread only.

use std::fs;
use std::net::SocketAddr;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};

/// One sample, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySample {
    pub server_rss_bytes: u64,
    pub server_pss_bytes: u64,
    pub sockstat_tcp_bytes: u64,
    pub sockstat_tcp_inuse: u64,
    pub slab_bytes: u64,
    /// True when `slab_bytes` came from `/proc/slabinfo`, false for the
    /// coarser `/proc/meminfo` total.
    pub slab_from_slabinfo: bool,
}

fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as u64
    } else {
        4096
    }
}

/// Reads a `Key:   123 kB` line of a `/proc` status-style file, in bytes.
fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|line| line.starts_with(key) && line[key.len()..].starts_with(':'))
        .and_then(|line| line[key.len() + 1..].split_whitespace().next())
        .and_then(|value| value.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `(inuse sockets, bytes of TCP buffer memory)` from `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str, page_bytes: u64) -> Option<(u64, u64)> {
    let line = text.lines().find(|line| line.starts_with("TCP:"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |name: &str| {
        fields
            .iter()
            .position(|field| *field == name)
            .and_then(|i| fields.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((value("inuse")?, value("mem")? * page_bytes))
}

/// Sum of `num_objs × objsize` over every cache of `/proc/slabinfo`.
pub fn parse_slabinfo(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut caches = 0;
    for line in text.lines() {
        if line.starts_with("slabinfo") || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 4 {
            continue;
        }
        let objects: u64 = fields[2].parse().ok()?;
        let object_bytes: u64 = fields[3].parse().ok()?;
        total += objects * object_bytes;
        caches += 1;
    }
    (caches > 0).then_some(total)
}

/// Samples the server (when `pid` is known) and the kernel now.
pub fn sample(pid: Option<u32>) -> anyhow::Result<MemorySample> {
    let mut out = MemorySample::default();
    if let Some(pid) = pid {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading the status of server pid {pid}"))?;
        out.server_rss_bytes = kb_field(&status, "VmRSS").unwrap_or(0);
        if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            out.server_pss_bytes = kb_field(&rollup, "Pss").unwrap_or(0);
        }
    }
    let sockstat = fs::read_to_string("/proc/net/sockstat")?;
    let (inuse, bytes) = parse_sockstat(&sockstat, page_bytes())
        .ok_or_else(|| anyhow!("no TCP line in sockstat"))?;
    out.sockstat_tcp_inuse = inuse;
    out.sockstat_tcp_bytes = bytes;
    match fs::read_to_string("/proc/slabinfo")
        .ok()
        .and_then(|t| parse_slabinfo(&t))
    {
        Some(bytes) => {
            out.slab_bytes = bytes;
            out.slab_from_slabinfo = true;
        }
        None => {
            let meminfo = fs::read_to_string("/proc/meminfo")?;
            out.slab_bytes = kb_field(&meminfo, "Slab").unwrap_or(0);
        }
    }
    Ok(out)
}

/// The socket inodes listening on `addr`'s port, from `/proc/net/tcp{,6}`.
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            let local_port = fields[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = fields[9].parse::<u64>() {
                    inodes.push(inode);
                }
            }
        }
    }
    inodes
}

/// Finds the process that owns the listening socket of `addr` by matching
/// its inode against every process's open descriptors.
pub fn find_listener_pid(addr: SocketAddr) -> Option<u32> {
    let inodes = listening_inodes(addr.port());
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcp_line_of_sockstat() {
        let text =
            "sockets: used 140\nTCP: inuse 5 orphan 0 tw 2 alloc 9 mem 3\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_sockstat(text, 4096), Some((5, 3 * 4096)));
    }

    #[test]
    fn sums_slab_caches() {
        let text = "slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> ...\nTCP 10 20 2432 13 8 : tunables 0 0 0\nfilp 5 8 256 16 1 : tunables 0 0 0\n";
        assert_eq!(parse_slabinfo(text), Some(20 * 2432 + 8 * 256));
    }

    #[test]
    fn finds_own_listener_and_reads_own_memory() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(find_listener_pid(addr), Some(std::process::id()));
        let sample = sample(Some(std::process::id())).unwrap();
        assert!(sample.server_rss_bytes > 0);
        assert!(sample.sockstat_tcp_inuse >= 1);
    }
}
