//! The kernel-tuning scripts, run with bash against a fake system root in a temporary
//! directory. Nothing here reads or writes the host's real settings: every invocation
//! passes `--root` (or `SWITCHBOARD_SYSROOT`) pointing at the fake tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use switchboard::config::Limits;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kernel-tuning")
        .join(name)
}

/// Untuned defaults, as a stock kernel with 8 GiB of RAM reports them.
const DEFAULTS: &[(&str, &str)] = &[
    ("fs/nr_open", "1048576"),
    ("fs/file-max", "2466165"),
    ("net/core/somaxconn", "4096"),
    ("net/ipv4/tcp_max_syn_backlog", "512"),
    ("net/ipv4/tcp_syncookies", "1"),
    ("net/core/netdev_max_backlog", "1000"),
    ("net/ipv4/tcp_mem", "287898\t383866\t575796"),
    ("net/ipv4/tcp_rmem", "4096\t131072\t6291456"),
    ("net/ipv4/tcp_wmem", "4096\t16384\t4194304"),
    ("net/ipv4/tcp_slow_start_after_idle", "1"),
    ("net/ipv4/ip_local_port_range", "32768\t60999"),
    ("net/ipv4/tcp_tw_reuse", "2"),
    ("net/ipv4/tcp_fin_timeout", "60"),
    ("net/ipv4/tcp_keepalive_time", "7200"),
    ("net/ipv4/tcp_keepalive_intvl", "75"),
    ("net/ipv4/tcp_keepalive_probes", "9"),
    ("vm/max_map_count", "65530"),
    ("kernel/io_uring_disabled", "2"),
    ("net/core/rps_sock_flow_entries", "0"),
];

struct FakeRoot {
    dir: tempfile::TempDir,
}

impl FakeRoot {
    fn new() -> FakeRoot {
        let dir = tempfile::tempdir().unwrap();
        let root = FakeRoot { dir };
        for (key, value) in DEFAULTS {
            root.write(&format!("proc/sys/{key}"), &format!("{value}\n"));
        }
        root.write("sys/devices/system/cpu/online", "0-3\n");
        root
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, relative: &str, content: &str) {
        let path = self.path().join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn read(&self, relative: &str) -> String {
        fs::read_to_string(self.path().join(relative)).unwrap()
    }

    fn sysctl(&self, key: &str) -> String {
        let relative = format!("proc/sys/{}", key.replace('.', "/"));
        let raw = self.read(&relative);
        raw.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Every file under the root with its content, to prove a run changed nothing.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push((path.clone(), fs::read_to_string(&path).unwrap()));
                }
            }
        }
        let mut out = Vec::new();
        walk(self.path(), &mut out);
        out.sort();
        out
    }

    fn tune(&self, args: &[&str]) -> Output {
        let output = Command::new("bash")
            .arg(script("tune.sh"))
            .args(args)
            .arg("--root")
            .arg(self.path())
            .env_remove("SWITCHBOARD_SYSROOT")
            .output()
            .unwrap();
        assert!(
            output.stderr.is_empty() || !output.status.success(),
            "stderr on success: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn irq(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script("irq-affinity.sh"))
            .args(args)
            .env("SWITCHBOARD_SYSROOT", self.path())
            .output()
            .unwrap()
    }

    /// A NIC with two queue vectors, two rx and two tx queues.
    fn add_nic(&self) {
        for irq in ["41", "40"] {
            self.write(
                &format!("sys/class/net/eth0/device/msi_irqs/{irq}"),
                "msix\n",
            );
            self.write(&format!("proc/irq/{irq}/smp_affinity_list"), "0-3\n");
        }
        for queue in 0..2 {
            self.write(
                &format!("sys/class/net/eth0/queues/rx-{queue}/rps_cpus"),
                "0\n",
            );
            self.write(
                &format!("sys/class/net/eth0/queues/rx-{queue}/rps_flow_cnt"),
                "0\n",
            );
            self.write(
                &format!("sys/class/net/eth0/queues/tx-{queue}/xps_cpus"),
                "00000000\n",
            );
        }
        // Loopback has no device link and must be left alone.
        self.write("sys/class/net/lo/queues/rx-0/rps_cpus", "0\n");
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const ONE_MILLION: &[&str] = &["--connections", "1000000"];

fn with(base: &[&'static str], extra: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(extra).copied().collect()
}

#[test]
fn plan_prints_current_and_recommended_with_reasons() {
    let root = FakeRoot::new();
    let output = root.tune(&with(&["plan"], ONE_MILLION));
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing from plan:\n{text}"))
            .to_string()
    };
    // fd_target = N + N/10 + 65536.
    let nr_open = line("fs.nr_open ");
    assert!(
        nr_open.contains("1048576") && nr_open.contains("1165536") && nr_open.contains("change")
    );
    assert!(nr_open.contains("RLIMIT_NOFILE"), "reason shown: {nr_open}");
    // A current value already above the target is kept.
    assert!(line("fs.file-max ").contains("ok"));
    // tcp_pages = ceil(1e6 * 4000 / 4096) = 976563.
    assert!(line("net.ipv4.tcp_mem ").contains("976563 1464844 1953126"));
    assert!(line("net.core.somaxconn ").contains("65535"));
    assert!(line("kernel.io_uring_disabled ").contains("change"));
    assert!(line("net.netfilter.nf_conntrack_max ").contains("absent"));
    // Plan never writes.
    assert!(!root
        .path()
        .join("etc/sysctl.d/90-switchboard.conf")
        .exists());
    assert_eq!(root.sysctl("net.core.somaxconn"), "4096");
}

#[test]
fn plan_sizes_tcp_mem_from_bytes_per_connection() {
    let root = FakeRoot::new();
    let output = root.tune(&[
        "plan",
        "--connections",
        "10000000",
        "--bytes-per-conn",
        "2048",
    ]);
    assert!(output.status.success());
    // 10e6 * 2048 / 4096 = 5,000,000 pages.
    assert!(
        stdout(&output).contains("5000000 7500000 10000000"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn apply_without_yes_is_a_dry_run_that_changes_nothing() {
    let root = FakeRoot::new();
    let before = root.snapshot();
    let output = root.tune(&with(&["apply"], ONE_MILLION));
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("Dry run"));
    assert!(
        text.contains("net.core.somaxconn: 4096 -> 65535 (would set)"),
        "{text}"
    );
    assert_eq!(root.snapshot(), before);
}

#[test]
fn check_fails_naming_shortfalls_then_passes_after_apply() {
    let root = FakeRoot::new();
    let output = root.tune(&with(&["check"], ONE_MILLION));
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(
        text.contains("FAIL  net.core.somaxconn = 4096, needs 65535"),
        "{text}"
    );
    assert!(
        text.contains("FAIL  kernel.io_uring_disabled = 2, needs 0"),
        "{text}"
    );
    assert!(
        text.contains("limits.d/90-switchboard.conf missing"),
        "{text}"
    );
    // Advice-only settings do not fail the check.
    assert!(text.contains("note  net.ipv4.tcp_rmem"), "{text}");

    let output = root.tune(&with(&["apply", "--yes"], ONE_MILLION));
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("net.core.somaxconn: 4096 -> 65535"));

    let output = root.tune(&with(&["check"], ONE_MILLION));
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(!stdout(&output).contains("FAIL"));

    // A larger target is again a shortfall.
    let output = root.tune(&["check", "--connections", "5000000"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).contains("FAIL  fs.nr_open = 1165536, needs 5565536"));
}

#[test]
fn apply_is_idempotent_and_backs_up_what_it_replaces() {
    let root = FakeRoot::new();
    root.write(
        "etc/sysctl.d/90-switchboard.conf",
        "net.core.somaxconn = 1024\n",
    );
    let output = root.tune(&with(&["apply", "--yes"], ONE_MILLION));
    assert!(output.status.success(), "{output:?}");

    assert_eq!(root.sysctl("net.core.somaxconn"), "65535");
    assert_eq!(root.sysctl("net.ipv4.tcp_mem"), "976563 1464844 1953126");
    assert_eq!(root.sysctl("kernel.io_uring_disabled"), "0");
    // Values already better than the target are kept.
    assert_eq!(root.sysctl("fs.file-max"), "2466165");
    let dropin = root.read("etc/sysctl.d/90-switchboard.conf");
    assert!(dropin.contains("fs.nr_open = 1165536"), "{dropin}");
    assert!(dropin.contains("-net.netfilter.nf_conntrack_max = 1165536"));
    let limits = root.read("etc/security/limits.d/90-switchboard.conf");
    assert!(
        limits.contains("switchboard hard nofile 1165536"),
        "{limits}"
    );
    // 4 online CPUs x 64 MiB, in KiB.
    assert!(
        limits.contains("switchboard hard memlock 262144"),
        "{limits}"
    );

    let backup = "var/backups/switchboard-tuning";
    assert_eq!(
        root.read(&format!("{backup}/sysctl.d.90-switchboard.conf.orig")),
        "net.core.somaxconn = 1024\n"
    );
    assert!(root
        .path()
        .join(format!("{backup}/limits.d.90-switchboard.conf.absent"))
        .exists());
    assert!(root
        .read(&format!("{backup}/sysctl.before"))
        .contains("net.core.somaxconn=4096\n"));

    let after_first = root.snapshot();
    let output = root.tune(&with(&["apply", "--yes"], ONE_MILLION));
    assert!(output.status.success());
    let text = stdout(&output);
    assert!(text.contains("net.core.somaxconn: 65535 (ok)"), "{text}");
    assert!(text.contains("90-switchboard.conf: unchanged"), "{text}");
    assert!(text.contains("kept existing"), "{text}");
    assert_eq!(
        root.snapshot(),
        after_first,
        "second apply changed something"
    );
}

#[test]
fn revert_restores_values_and_files() {
    let root = FakeRoot::new();
    root.write(
        "etc/sysctl.d/90-switchboard.conf",
        "net.core.somaxconn = 1024\n",
    );
    let before = root.snapshot();
    assert!(root
        .tune(&with(&["apply", "--yes"], ONE_MILLION))
        .status
        .success());
    // Apply twice: the backup must still be of the untuned state.
    assert!(root
        .tune(&["apply", "--yes", "--connections", "2000000"])
        .status
        .success());

    let dry = root.tune(&["revert"]);
    assert!(dry.status.success(), "{dry:?}");
    assert!(stdout(&dry).contains("would restore"));
    assert_eq!(root.sysctl("net.core.somaxconn"), "65535");

    let output = root.tune(&["revert", "--yes"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("net.core.somaxconn: 65535 -> 4096"));
    // Whitespace inside vector values is normalised, so compare word by word.
    let normalise = |files: Vec<(PathBuf, String)>| -> Vec<(PathBuf, String)> {
        files
            .into_iter()
            .map(|(p, c)| (p, c.split_whitespace().collect::<Vec<_>>().join(" ")))
            .collect()
    };
    assert_eq!(normalise(root.snapshot()), normalise(before));

    let again = root.tune(&["revert", "--yes"]);
    assert_eq!(again.status.code(), Some(2), "nothing left to revert");
}

#[test]
fn tune_refuses_missing_connection_count() {
    let root = FakeRoot::new();
    let output = root.tune(&["plan"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--connections"));
}

#[test]
fn every_key_in_the_shipped_dropin_is_managed_by_tune_sh() {
    let root = FakeRoot::new();
    let plan = stdout(&root.tune(&with(&["plan"], ONE_MILLION)));
    let shipped = fs::read_to_string(script("sysctl.d/90-switchboard.conf")).unwrap();
    let mut keys = 0;
    for line in shipped.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap();
        let key = key.trim().trim_start_matches('-');
        let plan_line = plan
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("{key} not in tune.sh"));
        // The shipped file is sized for 1M connections: tune.sh recommends the same.
        let value = value.trim();
        if key != "fs.file-max" {
            assert!(
                plan_line.contains(value),
                "{key}: shipped {value}, plan {plan_line}"
            );
        }
        keys += 1;
    }
    assert!(keys >= 18, "only {keys} settings shipped");
}

#[test]
fn irq_affinity_dry_run_prints_and_changes_nothing() {
    let root = FakeRoot::new();
    root.add_nic();
    let before = root.snapshot();
    let output = root.irq(&[]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("Dry run"));
    assert!(
        text.contains("/proc/irq/40/smp_affinity_list: 0-3 -> 0 (would set)"),
        "{text}"
    );
    assert!(
        text.contains("/proc/irq/41/smp_affinity_list: 0-3 -> 1 (would set)"),
        "{text}"
    );
    // Two rx queues for four CPUs: RPS spreads over all four.
    assert!(text.contains("rx-0/rps_cpus: 0 -> f (would set)"), "{text}");
    // tx-0 serves CPUs 0 and 2, tx-1 CPUs 1 and 3.
    assert!(
        text.contains("tx-0/xps_cpus: 00000000 -> 5 (would set)"),
        "{text}"
    );
    assert!(
        text.contains("tx-1/xps_cpus: 00000000 -> a (would set)"),
        "{text}"
    );
    assert!(!text.contains("/lo/"), "loopback touched: {text}");
    assert_eq!(root.snapshot(), before);
}

#[test]
fn irq_affinity_with_yes_writes_and_then_reports_ok() {
    let root = FakeRoot::new();
    root.add_nic();
    let output = root.irq(&["--yes", "--cpus", "2-3"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(root.read("proc/irq/40/smp_affinity_list"), "2\n");
    assert_eq!(root.read("proc/irq/41/smp_affinity_list"), "3\n");
    // As many rx queues as shard CPUs: RPS stays off.
    assert_eq!(root.read("sys/class/net/eth0/queues/rx-0/rps_cpus"), "0\n");
    assert_eq!(root.read("sys/class/net/eth0/queues/tx-1/xps_cpus"), "8\n");
    let again = stdout(&root.irq(&["--cpus", "2-3"]));
    assert!(again.contains("0 value(s) would change"), "{again}");
}

#[test]
fn unit_stop_timeout_covers_the_drain_deadline() {
    let unit = fs::read_to_string(script("switchboard.service")).unwrap();
    let directive = |name: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_string()
    };
    let stop_s: u64 = directive("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let deadline_ms = u64::from(Limits::default().shutdown_deadline_ms);
    assert!(
        stop_s * 1000 >= deadline_ms + 5_000,
        "TimeoutStopSec leaves no margin"
    );
    assert_eq!(directive("Restart"), "on-failure");
    assert_eq!(directive("ProtectSystem"), "strict");
    assert_eq!(directive("ReadWritePaths"), "/var/lib/switchboard");
    assert_eq!(directive("NoNewPrivileges"), "yes");
    assert_eq!(
        directive("ExecStart"),
        "/usr/local/bin/switchboard serve --config /etc/switchboard/switchboard.toml"
    );
    let nofile: u64 = directive("LimitNOFILE").parse().unwrap();
    assert_eq!(nofile, 1_000_000 + 100_000 + 65_536);
}

#[test]
fn scripts_are_shellcheck_clean() {
    let installed = Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        // CI installs shellcheck and must run this check; a developer's
        // fresh machine may not have it yet.
        assert!(
            std::env::var_os("CI").is_none(),
            "shellcheck is not installed; CI must install it (apt-get install -y shellcheck)"
        );
        eprintln!("shellcheck is not installed: skipping (apt-get install -y shellcheck)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scripts = [
        script("tune.sh"),
        script("irq-affinity.sh"),
        root.join("bench").join("compare.sh"),
        root.join(".ci").join("run"),
    ];
    for path in scripts {
        let output = Command::new("shellcheck")
            .arg("--shell=bash")
            .arg("--severity=style")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "shellcheck {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&output.stdout)
        );
    }
}
