//! Each scenario briefly, at tiny scale, against a real `switchboard serve`
//! and (when installed) a real mosquitto; checks the JSON report's fields
//! and that its numbers add up.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let pid = self.0.id();
        RUNNING.lock().unwrap().retain(|server| server.pid != pid);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Switchboard server this test binary runs, for a failed harness run to
/// report on.
struct Running {
    pid: u32,
    addr: SocketAddr,
    admin: SocketAddr,
}

/// The servers running now (tests run at once share the list).
static RUNNING: std::sync::Mutex<Vec<Running>> = std::sync::Mutex::new(Vec::new());

/// What each running server's threads are doing and what its shards count:
/// why a harness run against it may have failed (a shard that stopped
/// accepting or turning shows here).
fn servers_state() -> String {
    const METRICS: [&str; 8] = [
        "switchboard_accepts_total",
        "switchboard_connections{",
        "switchboard_registrations_total",
        "switchboard_shard_loop_last_turn_age_seconds",
        "switchboard_shard_stalled_seconds",
        "switchboard_shard_task_poll_max_seconds",
        "switchboard_socket_ring_enters_total",
        "switchboard_socket_ring_completions_total",
    ];
    let mut out = String::new();
    for server in RUNNING.lock().unwrap().iter() {
        out += &format!(
            "server pid {} on {} (admin {}), threads (name, state, wait channel):\n",
            server.pid, server.addr, server.admin
        );
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", server.pid)) {
            for task in tasks.flatten() {
                let read = |file: &str| {
                    std::fs::read_to_string(task.path().join(file)).unwrap_or_default()
                };
                let stat = read("stat");
                let state = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("?")
                    .to_string();
                out += &format!("  {} {state} {}\n", read("comm").trim(), read("wchan"));
            }
        }
        match metrics_text(server.admin) {
            Ok(text) => {
                for line in text
                    .lines()
                    .filter(|l| METRICS.iter().any(|m| l.starts_with(m)))
                {
                    out += &format!("  {line}\n");
                }
            }
            Err(error) => out += &format!("  metrics: {error}\n"),
        }
    }
    out
}

/// The admin endpoint's /metrics body (bounded in time).
fn metrics_text(admin: SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The workspace's target directory (this test binary lives in
/// `target/<profile>/deps/`).
fn profile_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchboard-bench"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn server_binary() -> PathBuf {
    let path = profile_dir().join("switchboard");
    // Build the server from the same workspace, so the test always runs
    // against the code next to it.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args([
        "build",
        "--quiet",
        "-p",
        "switchboard",
        "--bin",
        "switchboard",
    ]);
    if profile_dir().ends_with("release") {
        build.arg("--release");
    }
    let status = build
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("running cargo build for the server");
    assert!(status.success(), "building the server failed");
    assert!(path.exists(), "no server binary at {}", path.display());
    path
}

/// A test's Switchboard server, with its data directory and accounts file
/// in the test's temporary directory.
struct TestServer {
    _process: Guard,
    addr: SocketAddr,
    admin: SocketAddr,
    data: PathBuf,
    /// The harness's `--users` file (made by the first run that registers).
    users: String,
}

/// Starts a server on free ports with its data in `dir/data`.
fn switchboard_in(dir: &Path) -> TestServer {
    let data = dir.join("data");
    let (process, addr, admin) = start_switchboard(&data);
    TestServer {
        _process: process,
        addr,
        admin,
        data,
        users: dir.join("users.json").to_str().unwrap().to_string(),
    }
}

/// A server on free ports: its process, client address and admin address.
fn start_switchboard(data: &Path) -> (Guard, SocketAddr, SocketAddr) {
    // Port 0 for every listener: the kernel picks ports nothing holds, and
    // the readiness line says which. A port picked here and bound later
    // could be picked by a test running at once in between, and the client
    // listener's SO_REUSEPORT would let both servers share it, each taking
    // part of the other's connections. The media service has no
    // command-line flag for its listener (the bench learns its port from
    // the grants).
    let config = data.with_extension("toml");
    std::fs::write(&config, "[media]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut child = Command::new(server_binary())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .args(["--shards", "2", "--no-pin", "--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting switchboard serve");
    let line = wait_ready(&mut child);
    // "switchboard listening on ADDR with N shards, admin on http://ADDR, …"
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words
        .get(3)
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no listening address in: {line}"));
    let admin = words
        .windows(3)
        .find(|w| w[0] == "admin" && w[1] == "on")
        .and_then(|w| w[2].trim_end_matches(',').strip_prefix("http://"))
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no admin address in: {line}"));
    RUNNING.lock().unwrap().push(Running {
        pid: child.id(),
        addr,
        admin,
    });
    (Guard(child), addr, admin)
}

/// The inbox entries a server holds that their devices have not
/// acknowledged, summed over its shards (`switchboard_inbox_depth`).
fn inbox_depth(admin: SocketAddr) -> u64 {
    metrics_text(admin)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("switchboard_inbox_depth{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Waits (bounded) for the server's readiness line, printed once every
/// shard serves, and returns it. The rest of its stdout is read and dropped
/// so the pipe never fills.
fn wait_ready(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("switchboard listening on ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => match child.try_wait() {
            Ok(Some(status)) => panic!("switchboard serve exited before ready: {status}"),
            _ => panic!("switchboard serve did not report ready within 30 s"),
        },
    }
}

/// The mosquitto binary: on the PATH, or where Debian installs it
/// (`/usr/sbin`, not on every user's PATH).
fn mosquitto_binary() -> Option<PathBuf> {
    ["mosquitto", "/usr/sbin/mosquitto"]
        .iter()
        .map(PathBuf::from)
        .find(|candidate| {
            Command::new(candidate)
                .arg("-h")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        })
}

/// Whether process `pid` holds a TCP socket listening on 127.0.0.1:`port`
/// (its descriptors against /proc/net/tcp's LISTEN rows).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            (cols.len() > 9 && cols[1] == local && cols[3] == "0A")
                .then(|| format!("socket:[{}]", cols[9]))
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// Starts mosquitto on a free port. mosquitto has no way to say which port
/// it took, so the port is picked here; a test running at once may take it
/// before mosquitto binds it, and mosquitto then exits: it is started again
/// on another port. It counts as started once the listening socket is its
/// own, not merely once the port accepts.
fn start_mosquitto(dir: &Path) -> Option<(Guard, SocketAddr)> {
    let Some(binary) = mosquitto_binary() else {
        println!("note: mosquitto is not installed; the MQTT smoke test is skipped");
        return None;
    };
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mosquitto.conf")).unwrap();
    for _attempt in 0..5 {
        let port = free_port();
        let config: String = shipped
            .lines()
            .map(|line| {
                if line.starts_with("listener ") {
                    format!("listener {port} 127.0.0.1")
                } else if line.starts_with("persistence_location ") {
                    format!("persistence_location {}/", dir.display())
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, config + "\n").unwrap();
        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting mosquitto");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if listens_on(child.id(), port) {
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                return Some((Guard(child), addr));
            }
            if let Ok(Some(status)) = child.try_wait() {
                println!("note: mosquitto on port {port} exited ({status}); another port");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mosquitto did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("mosquitto exited on five ports in a row");
}

/// Runs the harness with `args` plus `--json`, bounded in time; the report.
fn bench(dir: &Path, name: &str, args: &[&str]) -> Value {
    let json = dir.join(format!("{name}.json"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(args)
        .args(["--quiet", "--timeout", "20", "--json"])
        .arg(&json)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr is kept for the failure message (a failed run says why
    // there), and read as it comes so the pipe never fills.
    let stderr = child.stderr.take().expect("piped stderr");
    // The harness's worker processes hold the pipe too: the text is waited
    // for a bounded time, so a worker that outlives its coordinator cannot
    // hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = tx.send(text);
    });
    let reader = move || {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "(its stderr stayed open 10 s after it exited)".into())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = reader();
            panic!(
                "switchboard-bench {args:?} ran past 90 s; its stderr:\n{stderr}\n{}",
                servers_state()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader();
    eprint!("{stderr}");
    assert!(
        status.success(),
        "switchboard-bench {args:?} failed: {status}; its stderr:\n{stderr}\n{}",
        servers_state()
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn number(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for key in path {
        x = &x[key];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v:#}"))
}

fn check_shape(v: &Value, scenario: &str, connections: u64) {
    assert_eq!(v["scenario"], scenario);
    assert!(v["target"].as_str().unwrap().contains("://"));
    assert_eq!(v["connections"], connections);
    for key in ["duration_s", "server", "kernel", "rates", "latency_us"] {
        assert!(v.get(key).is_some(), "{key} missing in {v:#}");
    }
    for key in [
        "pid",
        "rss_bytes",
        "rss_bytes_per_conn",
        "pss_bytes_per_conn",
    ] {
        assert!(v["server"].get(key).is_some(), "server.{key} missing");
    }
    for key in ["sockstat_bytes_per_conn", "slab_bytes_per_conn"] {
        assert!(v["kernel"].get(key).is_some(), "kernel.{key} missing");
    }
    for key in [
        "sessions_per_s",
        "offered_msgs_per_s",
        "delivered_msgs_per_s",
    ] {
        assert!(v["rates"].get(key).is_some(), "rates.{key} missing");
    }
    assert!(number(v, &["connect", "connected"]) > 0.0);
    assert_eq!(number(v, &["connect", "failed"]), 0.0);
    assert!(number(v, &["rates", "sessions_per_s"]) > 0.0);
}

fn check_summary(v: &Value, which: &str, count: f64) {
    let s = &v["latency_us"][which];
    assert_eq!(number(s, &["count"]), count, "{which} count in {v:#}");
    if count > 0.0 {
        let (p50, p99, max) = (
            number(s, &["p50"]),
            number(s, &["p99"]),
            number(s, &["max"]),
        );
        assert!(p50 >= 1.0 && p50 <= p99 && p99 <= max, "{which}: {s}");
    }
}

/// The CPU figures of a p2p step: the harness's busiest thread can use at
/// most one core (plus a clock tick's rounding), and the server, found from
/// its listening port, is measured too.
fn check_cpu(v: &Value) {
    let busiest = number(v, &["cpu", "harness_busiest_cores"]);
    assert!((0.0..=1.05).contains(&busiest), "{v:#}");
    assert!(number(v, &["cpu", "harness_sum_cores"]) >= 0.0, "{v:#}");
    assert!(number(v, &["cpu", "span_s"]) >= 1.0, "{v:#}");
    assert!(number(v, &["cpu", "server_cores"]) >= 0.0, "{v:#}");
    assert!(number(v, &["cpu", "server_us_per_msg"]) >= 0.0, "{v:#}");
    assert_eq!(
        v["cpu"]["harness_bound"].as_bool(),
        Some(busiest >= 0.9),
        "{v:#}"
    );
}

/// Runs every scenario at tiny scale; `receipts` says whether the target
/// sends delivered receipts.
fn scenarios(dir: &Path, target: &str, receipts: bool, extra: &[&str]) {
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(["--target", target].iter())
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |name: &str, args: &[&str]| {
        let args = with(args);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        bench(dir, name, &refs)
    };

    let v = run("connect", &["connect", "-n", "40"]);
    check_shape(&v, "connect", 40);
    assert_eq!(number(&v, &["connect", "connected"]), 40.0);

    let v = run("idle", &["idle", "-n", "40", "--duration", "1"]);
    check_shape(&v, "idle", 40);
    assert!(number(&v, &["server", "rss_bytes"]) > 0.0);
    number(&v, &["server", "rss_bytes_per_conn"]);
    number(&v, &["kernel", "slab_bytes_per_conn"]);
    number(&v, &["kernel", "sockstat_bytes_per_conn"]);

    let v = run(
        "p2p",
        &[
            "p2p",
            "-n",
            "20",
            "--rate",
            "400",
            "--duration",
            "1",
            "--drain-timeout",
            "10",
            "--processes",
            "2",
        ],
    );
    // Two worker processes: the coordinator splits the pairs and the rate.
    check_shape(&v, "p2p", 20);
    assert_eq!(number(&v, &["split", "processes"]), 2.0);
    assert_eq!(number(&v, &["bench", "processes"]), 2.0);
    let offered = number(&v, &["messages", "offered"]);
    assert_eq!(offered, 400.0);
    assert_eq!(number(&v, &["messages", "sent"]), offered);
    let delivered = number(&v, &["messages", "delivered"]);
    assert!(delivered <= offered);
    assert_eq!(delivered, offered, "a tiny run delivers everything: {v:#}");
    assert_eq!(number(&v, &["messages", "acked"]), offered);
    check_summary(&v, "ack", offered);
    check_summary(&v, "deliver", delivered);
    check_summary(&v, "receipt", if receipts { offered } else { 0.0 });
    // Every message sent was timed against its schedule on the harness too.
    check_summary(&v, "send_lag", offered);
    assert!(
        number(&v, &["rates", "delivered_msgs_per_s"])
            <= number(&v, &["rates", "offered_msgs_per_s"]) * 1.01
    );
    check_cpu(&v);

    let v = run("offline", &["offline", "-n", "20", "-k", "20"]);
    check_shape(&v, "offline", 20);
    assert_eq!(number(&v, &["messages", "acked"]), 200.0);
    assert_eq!(number(&v, &["messages", "delivered"]), 200.0);
    assert!(number(&v, &["rates", "drain_msgs_per_s"]) > 0.0);

    let v = run(
        "churn",
        &[
            "churn",
            "-n",
            "20",
            "--rate",
            "200",
            "--duration",
            "1",
            "--churn-rate",
            "10",
            "--drain-timeout",
            "10",
        ],
    );
    check_shape(&v, "churn", 20);
    let offered = number(&v, &["messages", "offered"]);
    let sent = number(&v, &["messages", "sent"]);
    assert_eq!(sent + number(&v, &["messages", "skipped"]), offered);
    assert!(number(&v, &["messages", "delivered"]) <= sent);
    assert!(number(&v, &["reconnects"]) > 0.0);
    check_summary(&v, "deliver", number(&v, &["messages", "delivered"]));
}

/// The group scenario at tiny scale: 2 groups of 8 over 12 users (so four
/// users are in both groups), split over two worker processes (so groups
/// span them), one second at 50 group messages/s. `receipts`: whether the
/// target sends delivered receipts (one per member per message).
fn group_scenario(dir: &Path, target: &str, receipts: bool, extra: &[&str]) -> Value {
    let mut args = vec![
        "group",
        "-n",
        "12",
        "--groups",
        "2",
        "--members",
        "8",
        "--rate",
        "50",
        "--duration",
        "1",
        "--drain-timeout",
        "10",
        "--processes",
        "2",
        "--target",
        target,
    ];
    args.extend_from_slice(extra);
    let v = bench(dir, "group", &args);
    check_shape(&v, "group", 12);
    assert_eq!(number(&v, &["split", "processes"]), 2.0);
    assert_eq!(number(&v, &["groups", "deliveries_per_msg"]), 7.0);
    let offered = number(&v, &["messages", "offered"]);
    assert_eq!(offered, 50.0);
    assert_eq!(number(&v, &["messages", "sent"]), offered);
    assert_eq!(number(&v, &["messages", "acked"]), offered);
    assert_eq!(number(&v, &["messages", "errors"]), 0.0);
    let expected = number(&v, &["messages", "deliveries_expected"]);
    assert_eq!(expected, offered * 7.0);
    let delivered = number(&v, &["messages", "delivered"]);
    assert_eq!(delivered, expected, "a tiny run delivers everything: {v:#}");
    assert_eq!(number(&v, &["messages", "missing"]), 0.0);
    check_summary(&v, "ack", offered);
    check_summary(&v, "deliver", delivered);
    check_summary(&v, "receipt", if receipts { delivered } else { 0.0 });
    check_summary(&v, "send_lag", offered);
    assert_eq!(
        number(&v, &["messages", "receipts"]),
        if receipts { delivered } else { 0.0 }
    );
    assert!(number(&v, &["rates", "sent_msgs_per_s"]) <= offered * 1.01);
    let fanout = number(&v, &["rates", "fanout_deliveries_per_s"]);
    assert!(fanout > 0.0 && fanout <= offered * 7.0 * 1.01, "{v:#}");
    assert!(v["rates"]["delivered_msgs_per_s"].is_null());
    check_cpu(&v);
    // A run this small may cost the server less than one clock tick of
    // CPU time: then there is no per-core figure.
    let per_core = &v["rates"]["deliveries_per_server_core_s"];
    assert!(
        per_core.is_null() || per_core.as_f64().is_some_and(|x| x > 0.0),
        "{per_core}"
    );
    let per_msg = &v["cpu"]["server_us_per_group_msg"];
    assert!(
        per_msg.is_null() || per_msg.as_f64().is_some_and(|x| x >= 0.0),
        "{per_msg}"
    );
    v
}

#[test]
fn group_scenario_reports_consistent_numbers_against_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_broker, addr)) = start_mosquitto(dir.path()) else {
        return;
    };
    let v = group_scenario(dir.path(), &format!("mqtt://{addr}"), false, &[]);
    assert!(v["groups"]["created"].is_null(), "MQTT creates no groups");
}

#[test]
fn group_scenario_reports_consistent_numbers_against_switchboard() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, users) = (server.addr, &server.users);
    let v = group_scenario(dir.path(), &addr.to_string(), true, &["--users", users]);
    assert_eq!(number(&v, &["groups", "created"]), 2.0);
    // One "group created" message per membership, the creators' included.
    assert_eq!(number(&v, &["groups", "group_events_expected"]), 16.0);
    assert_eq!(number(&v, &["groups", "group_events"]), 16.0);
}

#[test]
fn every_scenario_reports_consistent_numbers_against_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_broker, addr)) = start_mosquitto(dir.path()) else {
        return;
    };
    scenarios(dir.path(), &format!("mqtt://{addr}"), false, &[]);
}

#[test]
fn every_scenario_reports_consistent_numbers_against_switchboard() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, users) = (server.addr, server.users.clone());
    scenarios(dir.path(), &addr.to_string(), true, &["--users", &users]);
    // The accounts file now holds the 40 users of the widest scenario.
    let text = std::fs::read_to_string(&users).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["accounts"].as_array().unwrap().len(), 40);
}

/// Every transport logs in: Noise IK (the default, with the key pinned at
/// registration), Noise XX, and plaintext with its own accounts; the
/// accounts file says which kind each account is.
#[test]
fn connect_scenario_logs_in_over_each_transport() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let target = server.addr.to_string();
    let noise_users = dir.path().join("noise.json");
    let plain_users = dir.path().join("plain.json");
    for (transport, users) in [
        ("ik", &noise_users),
        ("xx", &noise_users),
        ("plain", &plain_users),
    ] {
        let users = users.to_str().unwrap();
        let args = [
            "connect",
            "-n",
            "10",
            "--transport",
            transport,
            "--target",
            &target,
            "--users",
            users,
        ];
        let v = bench(dir.path(), &format!("connect-{transport}"), &args);
        check_shape(&v, "connect", 10);
        assert_eq!(number(&v, &["connect", "connected"]), 10.0, "{transport}");
        assert_eq!(v["transport"].as_str(), Some(transport));
    }
    let noise: Value =
        serde_json::from_str(&std::fs::read_to_string(&noise_users).unwrap()).unwrap();
    let account = &noise["accounts"][0];
    assert_eq!(account["secret"].as_str(), Some(""));
    assert_eq!(account["noise_private"].as_str().unwrap().len(), 64);
    assert_eq!(account["server_key"].as_str().unwrap().len(), 64);
    let plain: Value =
        serde_json::from_str(&std::fs::read_to_string(&plain_users).unwrap()).unwrap();
    let account = &plain["accounts"][0];
    assert_eq!(account["secret"].as_str().unwrap().len(), 64);
    assert_eq!(account["noise_private"].as_str(), Some(""));
}

/// The media scenario at tiny scale against a real server (its media
/// service on a free port): 2 × 64 KiB on one stream and on two, dd in the
/// data directory, 10 uploads held in flight; checks the report's fields.
#[test]
fn media_scenario_reports_transfers_disk_and_memory_against_switchboard() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, data) = (server.addr, server.data.clone());
    let v = bench(
        dir.path(),
        "media",
        &[
            "media",
            "--target",
            &addr.to_string(),
            "--blob",
            "64K:2",
            "--streams",
            "2",
            "--in-flight",
            "10",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    assert_eq!(v["scenario"], "media");
    assert!(v["media_url"].as_str().unwrap().starts_with("http://"));
    assert!(number(&v, &["server", "pid"]) > 0.0);
    assert!(number(&v, &["grants", "devices"]) >= 1.0);
    let passes = v["transfers"].as_array().unwrap();
    assert_eq!(passes.len(), 2, "one stream, then two: {v:#}");
    for (pass, streams) in passes.iter().zip([1.0, 2.0]) {
        assert_eq!(number(pass, &["blob_bytes"]), 65536.0);
        assert_eq!(number(pass, &["count"]), 2.0);
        assert_eq!(number(pass, &["streams"]), streams);
        for direction in ["upload", "download"] {
            let d = &pass[direction];
            assert_eq!(number(d, &["bytes"]), 2.0 * 65536.0 * streams);
            assert!(number(d, &["seconds"]) > 0.0, "{d}");
            assert!(number(d, &["mb_per_s"]) > 0.0, "{d}");
            let (min, p50, max) = (
                number(d, &["transfer_ms", "min"]),
                number(d, &["transfer_ms", "p50"]),
                number(d, &["transfer_ms", "max"]),
            );
            assert!(0.0 < min && min <= p50 && p50 <= max, "{d}");
            assert!(number(d, &["server_cores"]) >= 0.0, "{d}");
        }
    }
    let sizes = v["disk"]["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 1);
    assert!(number(&sizes[0], &["write_fdatasync_mb_per_s"]) > 0.0);
    assert!(number(&sizes[0], &["read_cached_mb_per_s"]) > 0.0);
    // O_DIRECT reads are refused on some filesystems (tmpfs); then the
    // report says why.
    assert!(
        sizes[0]["read_direct_mb_per_s"].as_f64().is_some()
            || sizes[0]["read_direct_error"].is_string(),
        "{v:#}"
    );
    let held = &v["in_flight"];
    assert_eq!(number(held, &["uploads"]), 10.0);
    assert_eq!(number(held, &["answered_while_held"]), 0.0, "{v:#}");
    assert!(number(held, &["rss_bytes_baseline"]) > 0.0);
    assert!(number(held, &["rss_bytes_during"]) > 0.0);
    number(held, &["rss_bytes_per_upload"]);
    assert!(number(held, &["server_threads_during"]) > 0.0);
    assert_eq!(number(held, &["healthz_status"]), 200.0);
    // dd cleaned up after itself.
    assert!(!std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("bench-dd-")));
}

/// The p2p scenario on the lean engine (one epoll loop per worker) reports
/// what the default engine does: every message sent, acked, delivered and
/// (Switchboard) receipted, with the CPU figures, over two worker processes.
fn lean_p2p(dir: &Path, target: &str, receipts: bool, extra: &[&str]) -> Value {
    let mut args = vec![
        "p2p",
        "-n",
        "20",
        "--rate",
        "400",
        "--duration",
        "1",
        "--drain-timeout",
        "10",
        "--processes",
        "2",
        "--engine",
        "lean",
        "--target",
        target,
    ];
    args.extend_from_slice(extra);
    let v = bench(dir, "p2p-lean", &args);
    check_shape(&v, "p2p", 20);
    assert_eq!(v["engine"].as_str(), Some("lean"));
    assert_eq!(number(&v, &["bench", "processes"]), 2.0);
    let offered = number(&v, &["messages", "offered"]);
    assert_eq!(offered, 400.0);
    assert_eq!(number(&v, &["messages", "sent"]), offered);
    assert_eq!(number(&v, &["messages", "acked"]), offered);
    assert_eq!(number(&v, &["messages", "delivered"]), offered, "{v:#}");
    assert_eq!(number(&v, &["messages", "duplicates"]), 0.0);
    assert_eq!(number(&v, &["messages", "errors"]), 0.0);
    check_summary(&v, "ack", offered);
    check_summary(&v, "deliver", offered);
    check_summary(&v, "send_lag", offered);
    check_summary(&v, "receipt", if receipts { offered } else { 0.0 });
    check_cpu(&v);
    v
}

#[test]
fn lean_engine_runs_p2p_against_switchboard_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, users) = (server.addr, server.users.clone());
    let target = addr.to_string();
    let extra = ["--transport", "plain", "--users", &users];
    lean_p2p(dir.path(), &target, true, &extra);
    // A second run logs the same accounts in again, with the server's
    // inbox of the first run empty; its workers ask for SCHED_FIFO (an
    // ordinary thread with a warning where that is not allowed).
    let mut extra = extra.to_vec();
    extra.extend(["--realtime-priority", "1"]);
    lean_p2p(dir.path(), &target, true, &extra);
}

/// With `--receipt-ack-delay-ms`, an Ack owed only for Receipts waits for
/// the user's next frame (here longer than the run, so only a Send, a
/// Deliver's Ack, half the delivery window or the step's end sends it),
/// and still every message is acked, delivered and receipted, and once the
/// run is over the server holds no entry unacknowledged.
#[test]
fn held_receipt_acks_all_go_out_by_the_end_of_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, admin, users) = (server.addr, server.admin, server.users.clone());
    let extra = [
        "--transport",
        "plain",
        "--users",
        &users,
        "--receipt-ack-delay-ms",
        "5000",
    ];
    let v = lean_p2p(dir.path(), &addr.to_string(), true, &extra);
    assert_eq!(v["receipt_ack_delay_ms"].as_u64(), Some(5000));
    // The last Acks reach the server just before the harness exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let depth = inbox_depth(admin);
        if depth == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{depth} inbox entries still unacknowledged 10 s after the run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the harness with `args` and `option` (quietly) and checks that it
/// refuses to, saying `why` on stderr.
fn refused_with(args: &[&str], option: &[&str], why: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(args)
        .args(option)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} {option:?} ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(why), "{args:?} {option:?}: {stderr}");
}

/// `--receipt-ack-delay-ms` runs only where it means something
/// (Switchboard, p2p, the lean engine).
#[test]
fn a_receipt_ack_delay_is_refused_outside_switchboard_p2p_on_the_lean_engine() {
    let refused = |args: &[&str]| {
        refused_with(
            args,
            &["--receipt-ack-delay-ms", "10"],
            "--receipt-ack-delay-ms needs",
        )
    };
    refused(&["p2p", "-n", "2", "--target", "127.0.0.1:9"]);
    refused(&[
        "p2p",
        "-n",
        "2",
        "--engine",
        "lean",
        "--target",
        "mqtt://127.0.0.1:9",
    ]);
    refused(&[
        "group",
        "-n",
        "4",
        "--engine",
        "lean",
        "--transport",
        "plain",
        "--target",
        "127.0.0.1:9",
    ]);
}

#[test]
fn lean_engine_runs_p2p_against_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_broker, addr)) = start_mosquitto(dir.path()) else {
        return;
    };
    lean_p2p(dir.path(), &format!("mqtt://{addr}"), false, &[]);
    // With the delivered receipt carried over MQTT, every message's receipt
    // comes back to its sender and is timed.
    lean_p2p(
        dir.path(),
        &format!("mqtt://{addr}"),
        true,
        &["--mqtt-receipts"],
    );
}

/// `--mqtt-receipts` runs where it means something (MQTT, p2p, the lean
/// engine) and is refused elsewhere before anything connects.
#[test]
fn mqtt_receipts_are_refused_outside_mqtt_p2p_on_the_lean_engine() {
    let refused = |args: &[&str]| refused_with(args, &["--mqtt-receipts"], "--mqtt-receipts needs");
    refused(&["p2p", "-n", "2", "--target", "mqtt://127.0.0.1:9"]);
    refused(&[
        "p2p",
        "-n",
        "2",
        "--engine",
        "lean",
        "--transport",
        "plain",
        "--target",
        "127.0.0.1:9",
    ]);
    refused(&[
        "group",
        "-n",
        "2",
        "--engine",
        "lean",
        "--target",
        "mqtt://127.0.0.1:9",
    ]);
}

/// The group scenario on the lean engine: groups created and every member
/// device's "group created" message in over the lean links, then the same
/// consistent step as the default engine's.
#[test]
fn lean_engine_runs_the_group_scenario_against_switchboard_and_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let server = switchboard_in(dir.path());
    let (addr, users) = (server.addr, server.users.as_str());
    let extra = ["--users", users, "--transport", "plain", "--engine", "lean"];
    let v = group_scenario(dir.path(), &addr.to_string(), true, &extra);
    assert_eq!(v["engine"].as_str(), Some("lean"));
    assert_eq!(number(&v, &["groups", "created"]), 2.0);
    assert_eq!(number(&v, &["groups", "group_events"]), 16.0);
    if let Some((_broker, addr)) = start_mosquitto(dir.path()) {
        let v = group_scenario(
            dir.path(),
            &format!("mqtt://{addr}"),
            false,
            &["--engine", "lean"],
        );
        assert_eq!(v["engine"].as_str(), Some("lean"));
    }
}

/// What the lean engine does not run is refused before anything connects,
/// with the reason.
#[test]
fn lean_engine_refuses_other_scenarios_and_noise() {
    let refused = |args: &[&str], reason: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
            .args(args)
            .args(["--engine", "lean", "--quiet", "--target", "127.0.0.1:9"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    };
    refused(&["connect", "-n", "2"], "p2p and group scenarios only");
    refused(&["offline", "-n", "2"], "p2p and group scenarios only");
    refused(&["churn", "-n", "2"], "p2p and group scenarios only");
    refused(&["p2p", "-n", "2"], "--transport plain");
    refused(
        &["p2p", "-n", "2", "--transport", "ik"],
        "--transport plain",
    );
}
