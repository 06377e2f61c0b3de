//! `switchboard doctor`: checks that a host can run the server at a target size.
//!
//! Each check reads the host through a system root (`DoctorOptions::sysroot`, "/" in
//! production) so tests run every check against a fake tree of `proc/sys/...`,
//! `proc/meminfo` and `sys/...` files. Two inputs cannot come from files and are
//! injectable instead: resource limits and the CPU affinity mask. The io_uring probe
//! always talks to the running kernel and is its own check, off in deterministic tests.
//!
//! The sizing formulas are the same as `kernel-tuning/tune.sh` uses, so a failure's fix
//! is the matching `tune.sh` line. Runs once at the operator's request, on the caller's
//! thread; nothing here is on a shard.

mod checks;

pub use checks::{
    check_clocksource, check_cpus, check_data_dir, check_file_max, check_io_uring,
    check_io_uring_sysctl, check_kernel_version, check_max_map_count, check_memlock, check_nofile,
    check_nr_open, check_port_range, check_socket_ring, check_somaxconn, check_tcp_mem,
    check_transparent_hugepages, classify_filesystem, classify_free_space, mem_available_bytes,
};

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// Descriptors kept for everything but client connections: listeners, log segment
/// files, the metadata database, the admin port and the runtime's own.
pub const FD_RESERVE: u64 = 65_536;

/// Socket-buffer and kernel memory per connection assumed when none is measured: the
/// idle cost of one server-side TCP socket measured on the reference host (≈ 3.95 KB).
pub const KERNEL_BYTES_PER_CONNECTION_DEFAULT: u64 = 4_000;

/// The server's own memory per idle connection: 386 B measured at 15,000
/// connections (docs/benchmarks.md), rounded up to leave room for table growth.
pub const SERVER_BYTES_PER_CONNECTION_DEFAULT: u64 = 512;

/// io_uring and provided-buffer ring memory budgeted per shard (RLIMIT_MEMLOCK).
pub const MEMLOCK_BYTES_PER_SHARD: u64 = 64 * 1024 * 1024;

/// Kernel page size assumed by `tcp_mem`, whose unit is pages.
pub const PAGE_BYTES: u64 = 4096;

/// Descriptors needed for `connections`: one each, 10% for a reconnect storm whose old
/// sockets are not closed yet, and [`FD_RESERVE`].
pub fn fd_target(connections: u64) -> u64 {
    connections + connections / 10 + FD_RESERVE
}

/// `tcp_mem` pages if every connection holds `bytes_per_connection` of socket buffers.
pub fn tcp_mem_pages(connections: u64, bytes_per_connection: u64) -> u64 {
    (connections * bytes_per_connection).div_ceil(PAGE_BYTES)
}

/// A resource limit pair; `u64::MAX` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

/// What to check and against which target.
#[derive(Clone, Debug)]
pub struct DoctorOptions {
    /// Root of the tree holding `proc/` and `sys/`. "/" in production.
    pub sysroot: PathBuf,
    /// Target concurrent connections. Without one, limits are compared with what this
    /// host's memory could hold, and shortfalls are warnings instead of failures.
    pub target_connections: Option<u64>,
    /// The server's data directory (a real path, not under `sysroot`).
    pub data_dir: PathBuf,
    /// Configured shard count; 0 means one per usable CPU.
    pub shards: u32,
    /// Kernel memory per connection, bytes (measured; default 4,000).
    pub kernel_bytes_per_connection: u64,
    /// Server memory per connection, bytes (measured; default 512).
    pub server_bytes_per_connection: u64,
    /// RLIMIT_NOFILE to judge; `None` reads this process's with getrlimit.
    pub rlimit_nofile: Option<Rlimit>,
    /// RLIMIT_MEMLOCK to judge; `None` reads this process's with getrlimit.
    pub rlimit_memlock: Option<Rlimit>,
    /// CPUs this process may run on; `None` reads the affinity mask.
    pub usable_cpus: Option<usize>,
    /// Whether to create a ring and probe the running kernel's io_uring opcodes.
    pub probe_io_uring: bool,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            sysroot: PathBuf::from("/"),
            target_connections: None,
            data_dir: PathBuf::from("./data"),
            shards: 0,
            kernel_bytes_per_connection: KERNEL_BYTES_PER_CONNECTION_DEFAULT,
            server_bytes_per_connection: SERVER_BYTES_PER_CONNECTION_DEFAULT,
            rlimit_nofile: None,
            rlimit_memlock: None,
            usable_cpus: None,
            probe_io_uring: true,
        }
    }
}

impl DoctorOptions {
    /// Options for checking the running host against `config` (its data dir and shards).
    pub fn from_config(config: &Config, target_connections: Option<u64>) -> DoctorOptions {
        DoctorOptions {
            data_dir: config.server.data_dir.clone(),
            shards: config.server.shards,
            target_connections,
            ..DoctorOptions::default()
        }
    }

    /// Options for a fake tree at `sysroot` with fixed limits and CPUs and no io_uring
    /// probe, so every check depends only on the files.
    pub fn for_fake_root(sysroot: &Path, data_dir: &Path) -> DoctorOptions {
        DoctorOptions {
            sysroot: sysroot.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            rlimit_nofile: Some(Rlimit {
                soft: 1024,
                hard: 524_288,
            }),
            rlimit_memlock: Some(Rlimit {
                soft: 8 * 1024 * 1024,
                hard: 8 * 1024 * 1024,
            }),
            usable_cpus: Some(4),
            probe_io_uring: false,
            ..DoctorOptions::default()
        }
    }

    /// `proc/sys/<key with dots as slashes>`, whitespace-normalised; `None` if absent.
    pub fn read_sysctl(&self, key: &str) -> Option<String> {
        let path = self.sysroot.join("proc/sys").join(key.replace('.', "/"));
        let raw = std::fs::read_to_string(path).ok()?;
        Some(raw.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// A sysctl holding one unsigned number.
    pub fn read_sysctl_u64(&self, key: &str) -> Option<u64> {
        self.read_sysctl(key)?.parse().ok()
    }

    /// A file under the root, trimmed; `None` if absent.
    pub fn read_root_file(&self, relative: &str) -> Option<String> {
        let raw = std::fs::read_to_string(self.sysroot.join(relative)).ok()?;
        Some(raw.trim().to_string())
    }

    /// RLIMIT_NOFILE: the override or this process's.
    pub fn nofile(&self) -> Option<Rlimit> {
        self.rlimit_nofile
            .or_else(|| read_rlimit(nix::sys::resource::Resource::RLIMIT_NOFILE))
    }

    /// RLIMIT_MEMLOCK: the override or this process's.
    pub fn memlock(&self) -> Option<Rlimit> {
        self.rlimit_memlock
            .or_else(|| read_rlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK))
    }

    /// CPUs available to this process: the override or the affinity mask.
    pub fn cpus(&self) -> usize {
        self.usable_cpus
            .unwrap_or_else(|| crate::config::usable_cpus().len().max(1))
    }

    /// Shards the server will run: the configured count, or one per usable CPU.
    pub fn shard_count(&self) -> u32 {
        if self.shards > 0 {
            self.shards
        } else {
            self.cpus() as u32
        }
    }

    fn bytes_per_connection(&self) -> u64 {
        (self.kernel_bytes_per_connection + self.server_bytes_per_connection).max(1)
    }
}

fn read_rlimit(resource: nix::sys::resource::Resource) -> Option<Rlimit> {
    let (soft, hard) = nix::sys::resource::getrlimit(resource).ok()?;
    let map = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            v
        }
    };
    Some(Rlimit {
        soft: map(soft),
        hard: map(hard),
    })
}

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Short name, e.g. `fs.nr_open`.
    pub name: String,
    pub status: Status,
    /// What was found and what was expected.
    pub detail: String,
    /// A command that fixes a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            status: Status::Warn,
            ..Check::pass(name, detail)
        }
    }

    pub fn fail(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            status: Status::Fail,
            ..Check::pass(name, detail)
        }
    }

    /// A warning or failure chosen by `severity`.
    pub fn short(severity: Status, name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            status: severity,
            ..Check::pass(name, detail)
        }
    }

    pub fn with_fix(mut self, fix: impl Into<String>) -> Check {
        if self.status != Status::Pass {
            self.fix = Some(fix.into());
        }
        self
    }
}

/// How many connections this host holds, and what bounds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `MemAvailable` from `proc/meminfo`, bytes.
    pub mem_available_bytes: Option<u64>,
    /// Kernel plus server bytes per connection used for the estimate.
    pub bytes_per_connection: u64,
    /// Connections `MemAvailable` holds.
    pub by_memory: Option<u64>,
    /// Connections the descriptor limits allow: min(RLIMIT_NOFILE, fs.nr_open,
    /// fs.file-max) minus [`FD_RESERVE`] (or a tenth of a smaller limit), over 1.1.
    pub by_file_descriptors: Option<u64>,
    /// Connections whose socket buffers fit `tcp_mem`'s hard limit if each holds its
    /// kernel bytes at once (under full load; idle sockets hold none).
    pub by_tcp_mem: Option<u64>,
    /// The smaller of `by_memory` and `by_file_descriptors`.
    pub connections: Option<u64>,
    /// What bounds `connections`: "memory" or "file descriptors".
    pub limited_by: &'static str,
}

/// Every check's row plus the capacity estimate.
#[derive(Clone, Debug)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
    pub capacity: Capacity,
    /// The connection target the checks were judged against, and whether the operator
    /// gave it (`false`: derived from memory, shortfalls are warnings).
    pub target_connections: u64,
    pub target_given: bool,
}

impl DoctorReport {
    /// 0 when no check failed, 1 otherwise. Warnings do not fail.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.checks.iter().any(|c| c.status == Status::Fail))
    }

    /// The row named `name`, if there is one.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// Runs every check against `opts` and estimates capacity.
pub fn run(opts: &DoctorOptions) -> DoctorReport {
    let capacity = estimate_capacity(opts);
    let (target, given) = match opts.target_connections {
        Some(n) => (n, true),
        None => (capacity.by_memory.unwrap_or(100_000), false),
    };
    let severity = if given { Status::Fail } else { Status::Warn };
    let tune = format!("kernel-tuning/tune.sh apply --connections {target} --yes");
    let mut checks = Vec::new();
    if opts.probe_io_uring {
        checks.push(check_io_uring());
        checks.push(check_socket_ring());
    }
    checks.push(check_io_uring_sysctl(opts));
    checks.push(check_kernel_version(opts));
    checks.push(check_nofile(opts, target, severity));
    checks.push(check_memlock(opts));
    checks.push(check_nr_open(opts, target, severity, &tune));
    checks.push(check_file_max(opts, target, severity, &tune));
    checks.push(check_somaxconn(opts, &tune));
    checks.push(check_tcp_mem(opts, target, severity, &tune));
    checks.push(check_port_range(opts, &tune));
    checks.push(check_max_map_count(opts, &tune));
    checks.push(check_cpus(opts));
    checks.push(check_data_dir(&opts.data_dir));
    checks.push(check_transparent_hugepages(opts));
    checks.push(check_clocksource(opts));
    if let Some(check) = checks::check_conntrack(opts, target, &tune) {
        checks.push(check);
    }
    DoctorReport {
        checks,
        capacity,
        target_connections: target,
        target_given: given,
    }
}

/// Connections this host holds with its memory and descriptor limits.
pub fn estimate_capacity(opts: &DoctorOptions) -> Capacity {
    let mem_available_bytes = mem_available_bytes(opts);
    let bytes_per_connection = opts.bytes_per_connection();
    let by_memory = mem_available_bytes.map(|m| m / bytes_per_connection);
    let fd_limits = [
        opts.nofile().map(|l| l.soft),
        opts.read_sysctl_u64("fs.nr_open"),
        opts.read_sysctl_u64("fs.file-max"),
    ];
    let by_file_descriptors = fd_limits
        .into_iter()
        .flatten()
        .min()
        // A small limit cannot spare the full reserve; a tenth of it is what a small
        // server needs for listeners and files.
        .map(|fds| fds.saturating_sub(FD_RESERVE.min(fds / 10)) * 10 / 11);
    let by_tcp_mem = opts
        .read_sysctl("net.ipv4.tcp_mem")
        .and_then(|v| v.split(' ').nth(2)?.parse::<u64>().ok())
        .map(|pages| pages * PAGE_BYTES / opts.kernel_bytes_per_connection.max(1));
    let (connections, limited_by) = match (by_memory, by_file_descriptors) {
        (Some(m), Some(f)) if f < m => (Some(f), "file descriptors"),
        (Some(m), _) => (Some(m), "memory"),
        (None, Some(f)) => (Some(f), "file descriptors"),
        (None, None) => (None, "unknown"),
    };
    Capacity {
        mem_available_bytes,
        bytes_per_connection,
        by_memory,
        by_file_descriptors,
        by_tcp_mem,
        connections,
        limited_by,
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    // Digits before the first comma: 1 to 3.
    let mut until_comma = (digits.len() + 2) % 3 + 1;
    for c in digits.chars() {
        if until_comma == 0 {
            out.push(',');
            until_comma = 3;
        }
        out.push(c);
        until_comma -= 1;
    }
    out
}

fn opt_count(value: Option<u64>) -> String {
    value.map_or_else(|| "unknown".to_string(), thousands)
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .checks
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "switchboard doctor: target {} connections{}",
            thousands(self.target_connections),
            if self.target_given {
                ""
            } else {
                " (none given: what memory holds; shortfalls are warnings)"
            }
        )?;
        writeln!(f)?;
        writeln!(f, "{:<width$}  {:<6}  DETAIL", "CHECK", "STATUS")?;
        for check in &self.checks {
            writeln!(
                f,
                "{:<width$}  {:<6}  {}",
                check.name, check.status, check.detail
            )?;
        }
        let fixes: Vec<&Check> = self.checks.iter().filter(|c| c.fix.is_some()).collect();
        if !fixes.is_empty() {
            writeln!(f)?;
            writeln!(f, "Fixes:")?;
            for check in fixes {
                writeln!(
                    f,
                    "  {:<width$}  {}",
                    check.name,
                    check.fix.as_deref().unwrap_or("")
                )?;
            }
        }
        let c = &self.capacity;
        writeln!(f)?;
        writeln!(
            f,
            "Capacity: {} connections (limited by {})",
            opt_count(c.connections),
            c.limited_by
        )?;
        writeln!(
            f,
            "  memory:           {} connections = MemAvailable {} MiB / {} B per connection",
            opt_count(c.by_memory),
            c.mem_available_bytes
                .map_or_else(|| "unknown".to_string(), |m| thousands(m / (1024 * 1024))),
            thousands(c.bytes_per_connection)
        )?;
        writeln!(
            f,
            "  file descriptors: {} connections = (min(RLIMIT_NOFILE, fs.nr_open, fs.file-max) - reserve of up to {}) / 1.1",
            opt_count(c.by_file_descriptors),
            thousands(FD_RESERVE)
        )?;
        writeln!(
            f,
            "  tcp_mem (load):   {} connections each holding its kernel bytes of socket buffers",
            opt_count(c.by_tcp_mem)
        )?;
        let failures = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warnings = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        writeln!(f)?;
        writeln!(f, "{failures} failure(s), {warnings} warning(s)")
    }
}

#[cfg(test)]
mod tests;
