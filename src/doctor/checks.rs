//! The individual checks. Each returns one [`Check`] row; all but `check_io_uring`
//! and `check_data_dir` read only the files under `DoctorOptions::sysroot` and the
//! injectable limits, so tests drive them with fake trees.

use std::path::Path;

use super::{
    fd_target, tcp_mem_pages, thousands, Check, DoctorOptions, Status, MEMLOCK_BYTES_PER_SHARD,
    PAGE_BYTES,
};

/// Opcodes the server cannot run without: sockets, the log's reads, writes and
/// fdatasync, timers and cancellation.
const REQUIRED_OPCODES: &[(&str, u8)] = &[
    ("accept", io_uring::opcode::Accept::CODE),
    ("recv", io_uring::opcode::Recv::CODE),
    ("send", io_uring::opcode::Send::CODE),
    ("read", io_uring::opcode::Read::CODE),
    ("write", io_uring::opcode::Write::CODE),
    ("fsync", io_uring::opcode::Fsync::CODE),
    ("close", io_uring::opcode::Close::CODE),
    ("poll_add", io_uring::opcode::PollAdd::CODE),
    ("timeout", io_uring::opcode::Timeout::CODE),
    ("async_cancel", io_uring::opcode::AsyncCancel::CODE),
];

/// Opcodes that make the socket path cheaper when present.
const OPTIONAL_OPCODES: &[(&str, u8)] = &[
    ("provide_buffers", io_uring::opcode::ProvideBuffers::CODE),
    ("sendmsg", io_uring::opcode::SendMsg::CODE),
    ("recvmsg", io_uring::opcode::RecvMsg::CODE),
    ("msg_ring", io_uring::opcode::MsgRingData::CODE),
    ("send_zc", io_uring::opcode::SendZc::CODE),
    ("fallocate", io_uring::opcode::Fallocate::CODE),
];

/// Creates a small ring on the running kernel and probes its opcodes. Not
/// deterministic: it reports this machine, whatever `sysroot` says.
pub fn check_io_uring() -> Check {
    const NAME: &str = "io_uring";
    let ring = match io_uring::IoUring::new(8) {
        Ok(ring) => ring,
        Err(error) => {
            let hint = match error.raw_os_error() {
                Some(libc::EPERM) => "kernel.io_uring_disabled forbids it for this user",
                Some(libc::ENOSYS) => "the kernel was built without io_uring",
                Some(libc::ENOMEM) => "RLIMIT_MEMLOCK too small for a ring",
                _ => "unexpected error",
            };
            return Check::fail(NAME, format!("cannot create a ring: {error} ({hint})"))
                .with_fix("sysctl -w kernel.io_uring_disabled=0 (kernel-tuning/tune.sh apply)");
        }
    };
    let mut probe = io_uring::Probe::new();
    if let Err(error) = ring.submitter().register_probe(&mut probe) {
        return Check::fail(
            NAME,
            format!("ring created but the opcode probe failed: {error}"),
        )
        .with_fix("upgrade to kernel 6.1 or later");
    }
    let names = |list: &[(&'static str, u8)], supported: bool| -> Vec<&'static str> {
        list.iter()
            .filter(|(_, code)| probe.is_supported(*code) == supported)
            .map(|(name, _)| *name)
            .collect()
    };
    let missing_required = names(REQUIRED_OPCODES, false);
    let missing_optional = names(OPTIONAL_OPCODES, false);
    let mut supported = names(REQUIRED_OPCODES, true);
    supported.extend(names(OPTIONAL_OPCODES, true));
    if !missing_required.is_empty() {
        return Check::fail(
            NAME,
            format!(
                "kernel lacks required opcodes: {}",
                missing_required.join(" ")
            ),
        )
        .with_fix("upgrade to kernel 6.1 or later");
    }
    if !missing_optional.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "supported: {}; missing (slower paths used): {}",
                supported.join(" "),
                missing_optional.join(" ")
            ),
        )
        .with_fix("upgrade to kernel 6.1 or later");
    }
    Check::pass(
        NAME,
        format!("ring created; opcodes: {}", supported.join(" ")),
    )
}

/// `kernel.io_uring_disabled`: 0 lets everyone use io_uring; 1 only a group; 2 nobody.
/// Builds the native socket ring the way a shard would (`net::uring::Driver`
/// with its production configuration: single issuer, deferred task running,
/// a provided-buffer ring, multishot accept and receive) and reports which
/// setup the kernel accepted, or why none did.
pub fn check_socket_ring() -> Check {
    use crate::net::uring::{Driver, DriverConfig, SetupMode};
    const NAME: &str = "io_uring socket ring";
    let executor = match glommio::LocalExecutorBuilder::default().make() {
        Ok(executor) => executor,
        Err(error) => {
            return Check::warn(NAME, format!("no executor to try it in: {error}"));
        }
    };
    let outcome = executor.run(async {
        Driver::new(DriverConfig::production()).map(|driver| {
            let mode = driver.setup_mode();
            drop(driver);
            mode
        })
    });
    match outcome {
        Ok(SetupMode::DeferTaskrun) => Check::pass(
            NAME,
            "SINGLE_ISSUER + DEFER_TASKRUN, provided-buffer ring, multishot accept/recv",
        ),
        Ok(mode) => Check::warn(
            NAME,
            format!("works with the {mode:?} fallback (DEFER_TASKRUN refused: kernel before 6.1?)"),
        )
        .with_fix("upgrade to kernel 6.1 or later"),
        Err(error) => Check::warn(NAME, format!("cannot be built: {error}"))
            .with_fix("upgrade to kernel 6.1 or later; check RLIMIT_MEMLOCK"),
    }
}

pub fn check_io_uring_sysctl(opts: &DoctorOptions) -> Check {
    const NAME: &str = "kernel.io_uring_disabled";
    let fix = "sysctl -w kernel.io_uring_disabled=0";
    match opts.read_sysctl_u64(NAME) {
        None => Check::pass(NAME, "absent (kernel before 6.6: io_uring always enabled)"),
        Some(0) => Check::pass(NAME, "0: io_uring enabled for every process"),
        Some(1) => Check::fail(
            NAME,
            "1: io_uring only for kernel.io_uring_group; the service user must be in it",
        )
        .with_fix(fix),
        Some(value) => Check::fail(NAME, format!("{value}: io_uring disabled")).with_fix(fix),
    }
}

/// Parses "6.18.0-foo" into (6, 18).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernel release from `proc/sys/kernel/osrelease`.
pub fn check_kernel_version(opts: &DoctorOptions) -> Check {
    const NAME: &str = "kernel";
    let Some(release) = opts.read_sysctl("kernel.osrelease") else {
        return Check::warn(NAME, "proc/sys/kernel/osrelease unreadable");
    };
    match kernel_version(&release) {
        Some(version) if version >= (6, 1) => Check::pass(NAME, release),
        Some(version) if version >= (5, 8) => Check::warn(
            NAME,
            format!("{release}: runs, but multishot receive and buffer rings need 6.1+"),
        )
        .with_fix("upgrade to kernel 6.1 or later"),
        Some(_) => Check::fail(NAME, format!("{release}: glommio needs 5.8 or later"))
            .with_fix("upgrade to kernel 6.1 or later"),
        None => Check::warn(NAME, format!("cannot parse release {release:?}")),
    }
}

/// RLIMIT_NOFILE against the descriptors the target needs.
pub fn check_nofile(opts: &DoctorOptions, target: u64, severity: Status) -> Check {
    const NAME: &str = "RLIMIT_NOFILE";
    let Some(limit) = opts.nofile() else {
        return Check::warn(NAME, "getrlimit failed");
    };
    let needed = fd_target(target);
    let fix = format!(
        "LimitNOFILE={needed} in switchboard.service (interactive: kernel-tuning/tune.sh apply --connections {target} --yes, then log in again)"
    );
    if limit.soft >= needed {
        Check::pass(
            NAME,
            format!("soft {} >= {}", show_limit(limit.soft), thousands(needed)),
        )
    } else if limit.hard >= needed {
        Check::short(
            severity,
            NAME,
            format!(
                "soft {} < {} needed (hard {} allows it: raise the soft limit)",
                show_limit(limit.soft),
                thousands(needed),
                show_limit(limit.hard)
            ),
        )
        .with_fix(fix)
    } else {
        Check::short(
            severity,
            NAME,
            format!(
                "soft {} / hard {} < {} needed for {} connections",
                show_limit(limit.soft),
                show_limit(limit.hard),
                thousands(needed),
                thousands(target)
            ),
        )
        .with_fix(fix)
    }
}

fn show_limit(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".to_string()
    } else {
        thousands(value)
    }
}

/// RLIMIT_MEMLOCK: kernels before 5.12 charge io_uring rings to it.
pub fn check_memlock(opts: &DoctorOptions) -> Check {
    const NAME: &str = "RLIMIT_MEMLOCK";
    let Some(limit) = opts.memlock() else {
        return Check::warn(NAME, "getrlimit failed");
    };
    let needed = u64::from(opts.shard_count()) * MEMLOCK_BYTES_PER_SHARD;
    let fix = format!(
        "LimitMEMLOCK={}M in switchboard.service",
        needed / (1024 * 1024)
    );
    if limit.soft >= needed {
        return Check::pass(
            NAME,
            format!(
                "{} >= {} MiB",
                show_bytes(limit.soft),
                needed / (1024 * 1024)
            ),
        );
    }
    let modern = opts
        .read_sysctl("kernel.osrelease")
        .and_then(|r| kernel_version(&r))
        .is_some_and(|v| v >= (5, 12));
    if modern {
        Check::pass(
            NAME,
            format!(
                "{} (below {} MiB, but this kernel charges io_uring to the memory cgroup)",
                show_bytes(limit.soft),
                needed / (1024 * 1024)
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "{} < {} MiB for {} shards' rings (kernel before 5.12 charges them here)",
                show_bytes(limit.soft),
                needed / (1024 * 1024),
                opts.shard_count()
            ),
        )
        .with_fix(fix)
    }
}

fn show_bytes(value: u64) -> String {
    if value == u64::MAX {
        "unlimited".to_string()
    } else if value >= 1024 * 1024 {
        format!("{} MiB", thousands(value / (1024 * 1024)))
    } else {
        format!("{} KiB", thousands(value / 1024))
    }
}

/// A sysctl that must be at least `needed`.
fn at_least(
    opts: &DoctorOptions,
    key: &str,
    needed: u64,
    severity: Status,
    why: &str,
    tune: &str,
) -> Check {
    match opts.read_sysctl_u64(key) {
        None => Check::warn(key, "unreadable"),
        Some(value) if value >= needed => Check::pass(
            key,
            format!("{} >= {} ({why})", thousands(value), thousands(needed)),
        ),
        Some(value) => Check::short(
            severity,
            key,
            format!("{} < {} ({why})", thousands(value), thousands(needed)),
        )
        .with_fix(format!("sysctl -w {key}={needed}  # or: {tune}")),
    }
}

/// `fs.nr_open` caps RLIMIT_NOFILE.
pub fn check_nr_open(opts: &DoctorOptions, target: u64, severity: Status, tune: &str) -> Check {
    at_least(
        opts,
        "fs.nr_open",
        fd_target(target),
        severity,
        "caps RLIMIT_NOFILE",
        tune,
    )
}

/// `fs.file-max`: open files across the whole system.
pub fn check_file_max(opts: &DoctorOptions, target: u64, severity: Status, tune: &str) -> Check {
    at_least(
        opts,
        "fs.file-max",
        fd_target(target),
        severity,
        "system-wide open files",
        tune,
    )
}

/// `net.core.somaxconn`: a short accept queue turns a reconnect storm into SYN retries.
pub fn check_somaxconn(opts: &DoctorOptions, tune: &str) -> Check {
    at_least(
        opts,
        "net.core.somaxconn",
        65_535,
        Status::Warn,
        "accept queue for reconnect storms",
        tune,
    )
}

/// `vm.max_map_count`: one mapping per log segment.
pub fn check_max_map_count(opts: &DoctorOptions, tune: &str) -> Check {
    at_least(
        opts,
        "vm.max_map_count",
        262_144,
        Status::Warn,
        "one mapping per log segment",
        tune,
    )
}

/// `net.netfilter.nf_conntrack_max`, only when conntrack is loaded.
pub(super) fn check_conntrack(opts: &DoctorOptions, target: u64, tune: &str) -> Option<Check> {
    opts.read_sysctl("net.netfilter.nf_conntrack_max")?;
    Some(at_least(
        opts,
        "net.netfilter.nf_conntrack_max",
        fd_target(target),
        Status::Warn,
        "a full table drops packets",
        tune,
    ))
}

/// `net.ipv4.tcp_mem` against N × kernel bytes per connection of socket buffers.
pub fn check_tcp_mem(opts: &DoctorOptions, target: u64, severity: Status, tune: &str) -> Check {
    const NAME: &str = "net.ipv4.tcp_mem";
    let Some(raw) = opts.read_sysctl(NAME) else {
        return Check::warn(NAME, "unreadable");
    };
    let pages: Vec<u64> = raw.split(' ').filter_map(|v| v.parse().ok()).collect();
    let [_, pressure, high] = pages[..] else {
        return Check::warn(NAME, format!("unexpected value {raw:?}"));
    };
    let needed = tcp_mem_pages(target, opts.kernel_bytes_per_connection);
    let fix = format!(
        "sysctl -w {NAME}=\"{needed} {} {}\"  # or: {tune}",
        needed * 3 / 2,
        needed * 2
    );
    let mib = |p: u64| thousands(p * PAGE_BYTES / (1024 * 1024));
    if pressure >= needed {
        Check::pass(
            NAME,
            format!(
                "pressure {} MiB >= {} x {} B",
                mib(pressure),
                thousands(target),
                opts.kernel_bytes_per_connection
            ),
        )
    } else if high >= needed {
        Check::warn(
            NAME,
            format!(
                "pressure {} MiB < {} MiB needed: buffers shrink under load",
                mib(pressure),
                mib(needed)
            ),
        )
        .with_fix(fix)
    } else {
        Check::short(
            severity,
            NAME,
            format!(
                "high {} MiB < {} MiB needed: sends stall under load",
                mib(high),
                mib(needed)
            ),
        )
        .with_fix(fix)
    }
}

/// `net.ipv4.ip_local_port_range`: matters for load generators and outgoing calls.
pub fn check_port_range(opts: &DoctorOptions, tune: &str) -> Check {
    const NAME: &str = "net.ipv4.ip_local_port_range";
    let Some(raw) = opts.read_sysctl(NAME) else {
        return Check::warn(NAME, "unreadable");
    };
    let bounds: Vec<u64> = raw.split(' ').filter_map(|v| v.parse().ok()).collect();
    let [low, high] = bounds[..] else {
        return Check::warn(NAME, format!("unexpected value {raw:?}"));
    };
    let width = high.saturating_sub(low) + 1;
    if width >= 50_000 {
        Check::pass(NAME, format!("{low}-{high}: {} ports", thousands(width)))
    } else {
        Check::warn(
            NAME,
            format!(
                "{low}-{high}: {} ports per destination (limits load generators on this host)",
                thousands(width)
            ),
        )
        .with_fix(format!("sysctl -w {NAME}=\"10240 65535\"  # or: {tune}"))
    }
}

/// Usable CPUs against configured shards.
pub fn check_cpus(opts: &DoctorOptions) -> Check {
    const NAME: &str = "cpus";
    let cpus = opts.cpus();
    let shards = opts.shard_count() as usize;
    if shards > cpus {
        Check::warn(
            NAME,
            format!(
                "{shards} shards on {cpus} usable CPUs: shards share CPUs and stall each other"
            ),
        )
        .with_fix(format!(
            "set server.shards = {cpus} (or 0) in switchboard.toml, or widen CPUAffinity"
        ))
    } else if shards < cpus {
        Check::pass(
            NAME,
            format!(
                "{shards} shards on {cpus} usable CPUs ({} left for interrupts)",
                cpus - shards
            ),
        )
    } else {
        Check::pass(NAME, format!("{shards} shards, one per usable CPU"))
    }
}

/// Judges a filesystem by its magic number: `(status, name, why)`.
pub fn classify_filesystem(magic: i64) -> (Status, &'static str, &'static str) {
    // Magic numbers from linux/magic.h.
    match magic {
        0xEF53 => (
            Status::Pass,
            "ext4",
            "fdatasync of mapped segments verified",
        ),
        0x5846_5342 => (Status::Pass, "xfs", "fdatasync of mapped segments verified"),
        0x0102_1994 => (
            Status::Fail,
            "tmpfs",
            "memory only: the log does not survive a reboot",
        ),
        0x8584_58f6 => (
            Status::Fail,
            "ramfs",
            "memory only: the log does not survive a reboot",
        ),
        0x9123_683E => (
            Status::Warn,
            "btrfs",
            "copy-on-write: not verified for mapped logs",
        ),
        0x2FC1_2FC1 => (Status::Warn, "zfs", "not verified for mapped logs"),
        0x794C_7630 => (
            Status::Warn,
            "overlayfs",
            "a container layer: mount a volume",
        ),
        0x6969 => (
            Status::Fail,
            "nfs",
            "network filesystem: mmap and fsync semantics differ",
        ),
        0x6573_5546 => (Status::Warn, "fuse", "not verified for mapped logs"),
        _ => (Status::Warn, "unknown", "not verified for mapped logs"),
    }
}

/// Judges free space: under 1 GiB fails (the next segment may not fit), under 10 GiB or
/// 10% warns.
pub fn classify_free_space(available_bytes: u64, total_bytes: u64) -> Status {
    const GIB: u64 = 1024 * 1024 * 1024;
    if available_bytes < GIB {
        Status::Fail
    } else if available_bytes < 10 * GIB || available_bytes * 10 < total_bytes {
        Status::Warn
    } else {
        Status::Pass
    }
}

/// Free space and filesystem of the data dir (or its nearest existing ancestor).
pub fn check_data_dir(data_dir: &Path) -> Check {
    const NAME: &str = "data_dir";
    let mut probe = data_dir;
    while !probe.exists() {
        match probe.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => probe = parent,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    let vfs = match nix::sys::statvfs::statvfs(probe) {
        Ok(vfs) => vfs,
        Err(error) => return Check::fail(NAME, format!("statvfs {}: {error}", probe.display())),
    };
    let fs = match nix::sys::statfs::statfs(probe) {
        Ok(fs) => fs,
        Err(error) => return Check::fail(NAME, format!("statfs {}: {error}", probe.display())),
    };
    let fragment = vfs.fragment_size().max(1);
    let available = vfs.blocks_available() * fragment;
    let total = vfs.blocks() * fragment;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    let magic = fs.filesystem_type().0 as i64;
    let (fs_status, fs_name, why) = classify_filesystem(magic);
    let space_status = classify_free_space(available, total);
    let status = fs_status.max(space_status);
    let detail = format!(
        "{}: {fs_name} ({why}), {} GiB free of {} GiB",
        data_dir.display(),
        thousands(available / (1024 * 1024 * 1024)),
        thousands(total / (1024 * 1024 * 1024))
    );
    let fix = if fs_status > Status::Pass {
        "put server.data_dir on an ext4 or xfs volume"
    } else {
        "free space or grow the volume; expired segments are deleted after the message TTL"
    };
    Check::short(status, NAME, detail).with_fix(fix)
}

/// Transparent huge pages: `always` makes khugepaged compact memory behind the shards'
/// backs (latency spikes) and rounds small heaps up to 2 MiB.
pub fn check_transparent_hugepages(opts: &DoctorOptions) -> Check {
    const NAME: &str = "transparent_hugepage";
    let Some(raw) = opts.read_root_file("sys/kernel/mm/transparent_hugepage/enabled") else {
        return Check::pass(NAME, "not available on this kernel");
    };
    let selected = raw
        .split(' ')
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or(raw.as_str());
    match selected {
        "always" => Check::warn(
            NAME,
            "always: compaction stalls and 2 MiB rounding of small heaps",
        )
        .with_fix("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled"),
        "madvise" | "never" => Check::pass(NAME, selected.to_string()),
        other => Check::warn(NAME, format!("unexpected setting {other:?}")),
    }
}

/// Clock source: a slow one makes every timestamp a real system call.
pub fn check_clocksource(opts: &DoctorOptions) -> Check {
    const NAME: &str = "clocksource";
    let Some(source) =
        opts.read_root_file("sys/devices/system/clocksource/clocksource0/current_clocksource")
    else {
        return Check::warn(NAME, "current_clocksource unreadable");
    };
    match source.as_str() {
        "tsc" | "kvm-clock" | "arch_sys_counter" => {
            Check::pass(NAME, format!("{source}: clock_gettime stays in the vDSO"))
        }
        _ => Check::warn(
            NAME,
            format!("{source}: each clock read is a system call; timers and latency metrics cost more"),
        )
        .with_fix(
            "echo tsc > /sys/devices/system/clocksource/clocksource0/current_clocksource (if available_clocksource lists it)",
        ),
    }
}

/// `MemAvailable` from `proc/meminfo`, bytes.
pub fn mem_available_bytes(opts: &DoctorOptions) -> Option<u64> {
    let meminfo = opts.read_root_file("proc/meminfo")?;
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_release() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(kernel_version("x"), None);
    }

    #[test]
    fn ext4_and_xfs_pass_tmpfs_fails_overlay_warns() {
        assert_eq!(classify_filesystem(0xEF53).0, Status::Pass);
        assert_eq!(classify_filesystem(0x5846_5342).0, Status::Pass);
        assert_eq!(classify_filesystem(0x0102_1994).0, Status::Fail);
        assert_eq!(classify_filesystem(0x794C_7630).0, Status::Warn);
        assert_eq!(classify_filesystem(0x1234).0, Status::Warn);
    }

    #[test]
    fn free_space_thresholds() {
        const GIB: u64 = 1024 * 1024 * 1024;
        assert_eq!(classify_free_space(GIB / 2, 100 * GIB), Status::Fail);
        assert_eq!(classify_free_space(5 * GIB, 100 * GIB), Status::Warn);
        assert_eq!(classify_free_space(50 * GIB, 1000 * GIB), Status::Warn);
        assert_eq!(classify_free_space(50 * GIB, 100 * GIB), Status::Pass);
    }
}
