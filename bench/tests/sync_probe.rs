//! `switchboard-bench sync`: the disk probe writes through a real mapping of
//! a real file and times real fdatasyncs; its report adds up, it refuses bad
//! options before touching the disk, and it leaves no file behind, also when
//! stopped by a signal.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("test directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

fn run(args: &[&str]) -> Output {
    bench()
        .args(args)
        .output()
        .expect("running switchboard-bench")
}

fn number(v: &Value, path: &[&str]) -> u64 {
    let mut at = v;
    for key in path {
        at = &at[key];
    }
    at.as_u64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn every_record_is_timed_until_a_sync_begun_after_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("sync.json");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    for in_flight in ["1", "2"] {
        let out = run(&[
            "sync",
            "--dir",
            data.to_str().unwrap(),
            "--rate",
            "2000",
            "--duration",
            "1",
            "--in-flight",
            in_flight,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "sync --in-flight {in_flight} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("write to durable"), "{stdout}");
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
        assert_eq!(v["scenario"], "sync");
        assert_eq!(number(&v, &["records"]), 2000);
        assert_eq!(
            number(&v, &["in_flight"]),
            in_flight.parse::<u64>().unwrap()
        );
        assert_eq!(number(&v, &["latency_us", "durable", "count"]), 2000);
        assert_eq!(number(&v, &["latency_us", "writer_lag", "count"]), 2000);
        let syncs = number(&v, &["syncs"]);
        assert!(
            (1..=2000).contains(&syncs),
            "{syncs} syncs for 2000 records"
        );
        assert_eq!(number(&v, &["latency_us", "fdatasync", "count"]), syncs);
        for name in ["durable", "fdatasync"] {
            let p50 = number(&v, &["latency_us", name, "p50"]);
            let p99 = number(&v, &["latency_us", name, "p99"]);
            let max = number(&v, &["latency_us", name, "max"]);
            assert!(
                1 <= p50 && p50 <= p99 && p99 <= max,
                "{name}: {p50} {p99} {max}"
            );
        }
        assert!(
            files_in(&data).is_empty(),
            "left behind: {:?}",
            files_in(&data)
        );
    }
}

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().unwrap().to_string();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("file");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--in-flight".into(), "0".into()],
            "--in-flight must be 1 to 8",
        ),
        (
            vec!["--in-flight".into(), "9".into()],
            "--in-flight must be 1 to 8",
        ),
        (
            vec!["--rate".into(), "0".into()],
            "--rate must be a positive",
        ),
        (
            vec!["--duration=-1".into()],
            "--duration must be a positive",
        ),
        (
            vec!["--duration".into(), "0".into()],
            "--duration must be a positive",
        ),
        (
            vec!["--record-bytes".into(), "0".into()],
            "--record-bytes must be",
        ),
        (
            vec![
                "--rate".into(),
                "1000000".into(),
                "--duration".into(),
                "100".into(),
            ],
            "records",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["sync".to_string(), "--dir".into(), d.clone()];
        args.extend(extra.iter().cloned());
        let out = bench().args(&args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    for not_dir in [dir.path().join("missing"), file.clone()] {
        let out = run(&[
            "sync",
            "--dir",
            not_dir.to_str().unwrap(),
            "--duration",
            "0.1",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains("not a directory"), "{stderr}");
    }
    assert_eq!(files_in(dir.path()), vec!["a-file".to_string()]);
}

#[test]
fn a_stop_signal_removes_the_probe_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = bench()
        .args(["sync", "--dir", dir.path().to_str().unwrap()])
        .args(["--rate", "1000", "--duration", "60", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let until = Instant::now() + Duration::from_secs(20);
    while files_in(dir.path()).is_empty() {
        assert!(Instant::now() < until, "the probe file never appeared");
        assert!(child.try_wait().expect("wait").is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "still running 20 s after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    assert!(
        files_in(dir.path()).is_empty(),
        "left behind: {:?}",
        files_in(dir.path())
    );
}
