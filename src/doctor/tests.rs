//! Every check against fake trees: one pass, warn and fail case each where it has them.

use std::fs;

use super::*;

/// A fake host: an untuned kernel with 8 GiB available, 4 CPUs.
struct FakeHost {
    root: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl FakeHost {
    fn new() -> FakeHost {
        let host = FakeHost {
            root: tempfile::tempdir().unwrap(),
            // Under target/ rather than the system temp dir, which may be tmpfs (a
            // failing filesystem for the log) and would make the report tests depend
            // on the machine.
            data: tempfile::tempdir_in(data_parent()).unwrap(),
        };
        for (key, value) in [
            ("fs/nr_open", "1048576"),
            ("fs/file-max", "2466165"),
            ("net/core/somaxconn", "4096"),
            ("net/ipv4/tcp_mem", "287898\t383866\t575796"),
            ("net/ipv4/ip_local_port_range", "32768\t60999"),
            ("vm/max_map_count", "65530"),
            ("kernel/io_uring_disabled", "0"),
            ("kernel/osrelease", "6.18.0-1-amd64"),
        ] {
            host.write(&format!("proc/sys/{key}"), &format!("{value}\n"));
        }
        host.write(
            "proc/meminfo",
            "MemTotal:       16384000 kB\nMemFree:         1000000 kB\nMemAvailable:    8388608 kB\n",
        );
        host.write(
            "sys/kernel/mm/transparent_hugepage/enabled",
            "always [madvise] never\n",
        );
        host.write(
            "sys/devices/system/clocksource/clocksource0/current_clocksource",
            "tsc\n",
        );
        host
    }

    fn write(&self, relative: &str, content: &str) {
        let path = self.root.path().join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn sysctl(&self, key: &str, value: &str) {
        self.write(
            &format!("proc/sys/{}", key.replace('.', "/")),
            &format!("{value}\n"),
        );
    }

    fn options(&self) -> DoctorOptions {
        DoctorOptions::for_fake_root(self.root.path(), self.data.path())
    }
}

fn data_parent() -> std::path::PathBuf {
    let parent = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    fs::create_dir_all(&parent).unwrap();
    parent
}

const TUNE: &str = "kernel-tuning/tune.sh apply --connections 1000000 --yes";

#[test]
fn sizing_formulas_match_tune_sh() {
    assert_eq!(fd_target(1_000_000), 1_165_536);
    assert_eq!(tcp_mem_pages(1_000_000, 4_000), 976_563);
    assert_eq!(thousands(1_165_536), "1,165,536");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_000), "1,000");
    assert_eq!(thousands(12_345), "12,345");
    assert_eq!(thousands(0), "0");
}

#[test]
fn io_uring_sysctl_passes_at_zero_fails_otherwise_and_absent_passes() {
    let host = FakeHost::new();
    assert_eq!(check_io_uring_sysctl(&host.options()).status, Status::Pass);
    host.sysctl("kernel.io_uring_disabled", "2");
    let check = check_io_uring_sysctl(&host.options());
    assert_eq!(check.status, Status::Fail);
    assert_eq!(
        check.fix.as_deref(),
        Some("sysctl -w kernel.io_uring_disabled=0")
    );
    host.sysctl("kernel.io_uring_disabled", "1");
    assert_eq!(check_io_uring_sysctl(&host.options()).status, Status::Fail);
    fs::remove_file(host.root.path().join("proc/sys/kernel/io_uring_disabled")).unwrap();
    assert_eq!(check_io_uring_sysctl(&host.options()).status, Status::Pass);
}

#[test]
fn kernel_version_pass_warn_fail() {
    let host = FakeHost::new();
    assert_eq!(check_kernel_version(&host.options()).status, Status::Pass);
    host.sysctl("kernel.osrelease", "5.15.0");
    assert_eq!(check_kernel_version(&host.options()).status, Status::Warn);
    host.sysctl("kernel.osrelease", "4.19.0");
    assert_eq!(check_kernel_version(&host.options()).status, Status::Fail);
}

#[test]
fn nofile_passes_when_soft_covers_target_and_fails_with_fix_otherwise() {
    let host = FakeHost::new();
    let mut opts = host.options();
    let check = check_nofile(&opts, 1_000_000, Status::Fail);
    assert_eq!(check.status, Status::Fail);
    assert!(check.detail.contains("1,165,536"), "{}", check.detail);
    assert!(check
        .fix
        .as_deref()
        .unwrap()
        .contains("LimitNOFILE=1165536"));
    // Without a given target the same shortfall only warns.
    assert_eq!(
        check_nofile(&opts, 1_000_000, Status::Warn).status,
        Status::Warn
    );
    opts.rlimit_nofile = Some(Rlimit {
        soft: 2_000_000,
        hard: 2_000_000,
    });
    let check = check_nofile(&opts, 1_000_000, Status::Fail);
    assert_eq!(check.status, Status::Pass);
    assert!(check.fix.is_none());
}

#[test]
fn memlock_fails_only_on_old_kernels() {
    let host = FakeHost::new();
    let mut opts = host.options();
    // 8 MiB < 4 shards x 64 MiB, but 6.18 charges rings to the memory cgroup.
    assert_eq!(check_memlock(&opts).status, Status::Pass);
    host.sysctl("kernel.osrelease", "5.10.0");
    let check = check_memlock(&opts);
    assert_eq!(check.status, Status::Fail);
    assert_eq!(
        check.fix.as_deref(),
        Some("LimitMEMLOCK=256M in switchboard.service")
    );
    opts.rlimit_memlock = Some(Rlimit {
        soft: u64::MAX,
        hard: u64::MAX,
    });
    assert_eq!(check_memlock(&opts).status, Status::Pass);
}

#[test]
fn nr_open_and_file_max_are_judged_against_fd_target() {
    let host = FakeHost::new();
    let opts = host.options();
    let check = check_nr_open(&opts, 1_000_000, Status::Fail, TUNE);
    assert_eq!(check.status, Status::Fail);
    assert_eq!(
        check.fix.as_deref(),
        Some("sysctl -w fs.nr_open=1165536  # or: kernel-tuning/tune.sh apply --connections 1000000 --yes")
    );
    assert_eq!(
        check_nr_open(&opts, 500_000, Status::Fail, TUNE).status,
        Status::Pass
    );
    assert_eq!(
        check_file_max(&opts, 1_000_000, Status::Fail, TUNE).status,
        Status::Pass
    );
    assert_eq!(
        check_file_max(&opts, 3_000_000, Status::Fail, TUNE).status,
        Status::Fail
    );
}

#[test]
fn somaxconn_and_max_map_count_warn_until_tuned() {
    let host = FakeHost::new();
    assert_eq!(check_somaxconn(&host.options(), TUNE).status, Status::Warn);
    assert_eq!(
        check_max_map_count(&host.options(), TUNE).status,
        Status::Warn
    );
    host.sysctl("net.core.somaxconn", "65535");
    host.sysctl("vm.max_map_count", "262144");
    assert_eq!(check_somaxconn(&host.options(), TUNE).status, Status::Pass);
    assert_eq!(
        check_max_map_count(&host.options(), TUNE).status,
        Status::Pass
    );
}

#[test]
fn tcp_mem_pass_warn_fail_by_connection_budget() {
    let host = FakeHost::new();
    let opts = host.options();
    // 100k x 4000 B = 97,657 pages: under pressure (383,866).
    assert_eq!(
        check_tcp_mem(&opts, 100_000, Status::Fail, TUNE).status,
        Status::Pass
    );
    // 500k -> 488,282 pages: above pressure, below high (575,796).
    assert_eq!(
        check_tcp_mem(&opts, 500_000, Status::Fail, TUNE).status,
        Status::Warn
    );
    // 1M -> 976,563 pages: above high.
    let check = check_tcp_mem(&opts, 1_000_000, Status::Fail, TUNE);
    assert_eq!(check.status, Status::Fail);
    assert!(check
        .fix
        .as_deref()
        .unwrap()
        .starts_with("sysctl -w net.ipv4.tcp_mem=\"976563 1464844 1953126\""));
}

#[test]
fn port_range_warns_when_narrow() {
    let host = FakeHost::new();
    assert_eq!(check_port_range(&host.options(), TUNE).status, Status::Warn);
    host.sysctl("net.ipv4.ip_local_port_range", "10240\t65535");
    assert_eq!(check_port_range(&host.options(), TUNE).status, Status::Pass);
}

#[test]
fn cpus_warn_when_shards_exceed_usable_cpus() {
    let host = FakeHost::new();
    let mut opts = host.options();
    assert_eq!(check_cpus(&opts).status, Status::Pass);
    opts.shards = 8;
    let check = check_cpus(&opts);
    assert_eq!(check.status, Status::Warn);
    assert!(check.detail.contains("8 shards on 4 usable CPUs"));
    opts.shards = 2;
    assert!(check_cpus(&opts).detail.contains("2 left for interrupts"));
}

#[test]
fn transparent_hugepages_always_warns() {
    let host = FakeHost::new();
    assert_eq!(
        check_transparent_hugepages(&host.options()).status,
        Status::Pass
    );
    host.write(
        "sys/kernel/mm/transparent_hugepage/enabled",
        "[always] madvise never\n",
    );
    assert_eq!(
        check_transparent_hugepages(&host.options()).status,
        Status::Warn
    );
}

#[test]
fn clocksource_hpet_warns() {
    let host = FakeHost::new();
    assert_eq!(check_clocksource(&host.options()).status, Status::Pass);
    host.write(
        "sys/devices/system/clocksource/clocksource0/current_clocksource",
        "hpet\n",
    );
    assert_eq!(check_clocksource(&host.options()).status, Status::Warn);
}

#[test]
fn data_dir_check_reads_a_real_directory_and_its_missing_child() {
    let host = FakeHost::new();
    let check = check_data_dir(host.data.path());
    assert!(check.detail.contains("GiB free"), "{}", check.detail);
    // Not created yet: judged by the nearest existing ancestor.
    let check = check_data_dir(&host.data.path().join("not/yet"));
    assert!(check.detail.contains("GiB free"), "{}", check.detail);
}

#[test]
fn capacity_is_bounded_by_memory_or_descriptors() {
    let host = FakeHost::new();
    let mut opts = host.options();
    // 8 GiB / (4000 + 512) B.
    opts.rlimit_nofile = Some(Rlimit {
        soft: 10_000_000,
        hard: 10_000_000,
    });
    host.sysctl("fs.nr_open", "10000000");
    host.sysctl("fs.file-max", "10000000");
    let capacity = estimate_capacity(&opts);
    assert_eq!(capacity.mem_available_bytes, Some(8 * 1024 * 1024 * 1024));
    assert_eq!(capacity.by_memory, Some(8 * 1024 * 1024 * 1024 / 4512));
    assert_eq!(capacity.connections, capacity.by_memory);
    assert_eq!(capacity.limited_by, "memory");
    // The default soft limit of 1024 leaves nothing after the reserve.
    opts.rlimit_nofile = None;
    let opts = DoctorOptions {
        rlimit_nofile: Some(Rlimit {
            soft: 1_165_536,
            hard: 1_165_536,
        }),
        ..opts
    };
    let capacity = estimate_capacity(&opts);
    assert_eq!(capacity.by_file_descriptors, Some(1_000_000));
    assert_eq!(capacity.connections, Some(1_000_000));
    assert_eq!(capacity.limited_by, "file descriptors");
}

#[test]
fn untuned_host_fails_a_one_million_target_and_tuned_host_passes() {
    let host = FakeHost::new();
    let mut opts = host.options();
    opts.target_connections = Some(1_000_000);
    let report = run(&opts);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(report.check("fs.nr_open").unwrap().status, Status::Fail);
    assert_eq!(
        report.check("net.ipv4.tcp_mem").unwrap().status,
        Status::Fail
    );
    let text = report.to_string();
    assert!(text.contains("Fixes:"), "{text}");
    assert!(
        text.contains("tune.sh apply --connections 1000000 --yes"),
        "{text}"
    );
    assert!(text.contains("Capacity:"), "{text}");
    assert!(
        report.check("io_uring").is_none(),
        "probe is off for fake roots"
    );

    // What tune.sh apply --connections 1000000 sets.
    host.sysctl("fs.nr_open", "1165536");
    host.sysctl("net.core.somaxconn", "65535");
    host.sysctl("net.ipv4.tcp_mem", "976563 1464844 1953126");
    host.sysctl("net.ipv4.ip_local_port_range", "10240 65535");
    host.sysctl("vm.max_map_count", "262144");
    opts.rlimit_nofile = Some(Rlimit {
        soft: 1_165_536,
        hard: 1_165_536,
    });
    let report = run(&opts);
    assert_eq!(report.exit_code(), 0, "{report}");
}

#[test]
fn without_target_shortfalls_are_warnings() {
    let host = FakeHost::new();
    let report = run(&host.options());
    assert!(!report.target_given);
    assert_eq!(report.exit_code(), 0, "{report}");
    assert_eq!(report.check("RLIMIT_NOFILE").unwrap().status, Status::Warn);
    assert!(report.to_string().contains("none given"));
}

#[test]
fn conntrack_is_checked_only_when_loaded() {
    let host = FakeHost::new();
    let mut opts = host.options();
    opts.target_connections = Some(1_000);
    assert!(run(&opts).check("net.netfilter.nf_conntrack_max").is_none());
    host.sysctl("net.netfilter.nf_conntrack_max", "262144");
    opts.target_connections = Some(1_000_000);
    let report = run(&opts);
    assert_eq!(
        report
            .check("net.netfilter.nf_conntrack_max")
            .unwrap()
            .status,
        Status::Warn
    );
}

#[test]
fn io_uring_probe_reports_the_running_kernel() {
    // Reads the real kernel: the outcome depends on the machine, but it always names
    // what it found.
    let check = check_io_uring();
    assert_eq!(check.name, "io_uring");
    assert!(!check.detail.is_empty());
    if check.status == Status::Pass {
        assert!(check.detail.contains("accept"));
    }
}
