//! `switchboard doctor` against this real host: every row is present and the report
//! renders. The outcome of each check depends on the machine, so only the shape and
//! the consistency of the exit code are asserted.

use switchboard::doctor::{run, DoctorOptions, Status};

#[test]
fn doctor_on_the_real_host_reports_every_check_and_a_capacity() {
    let data = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let opts = DoctorOptions {
        data_dir: data.path().to_path_buf(),
        target_connections: Some(100_000),
        ..DoctorOptions::default()
    };
    let report = run(&opts);
    let text = report.to_string();
    println!("{text}");
    for name in [
        "io_uring",
        "kernel.io_uring_disabled",
        "RLIMIT_NOFILE",
        "RLIMIT_MEMLOCK",
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_mem",
        "net.ipv4.ip_local_port_range",
        "cpus",
        "data_dir",
        "transparent_hugepage",
        "clocksource",
    ] {
        assert!(report.check(name).is_some(), "{name} missing:\n{text}");
    }
    let failed = report.checks.iter().any(|c| c.status == Status::Fail);
    assert_eq!(report.exit_code(), i32::from(failed));
    for check in &report.checks {
        if check.status != Status::Pass {
            assert!(
                check.fix.is_some() || check.detail.contains("unreadable"),
                "{check:?}"
            );
        }
    }
    assert!(report.capacity.by_memory.is_some_and(|n| n > 0), "{text}");
}
