//! How `switchboard-bench` fails and ends: against a port that accepts
//! connections and never answers, every wait names what it waited for and
//! from whom, the run fails within a few seconds of `--timeout`, and no
//! worker process is left behind; the same after SIGINT, SIGTERM, a stuck
//! worker, and a SIGKILL of the coordinator.
//!
//! The test process makes itself a child subreaper, so a worker its
//! coordinator did not reap comes to us as a zombie instead of vanishing into
//! init: "gone" below means killed *and* reaped by the coordinator.

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Longest any run here may take; the runs that fail by themselves end
/// within about `--timeout` (3 s).
const RUN_BOUND: Duration = Duration::from_secs(20);

/// A TCP port that accepts every connection and never sends a byte, like a
/// server's admin port or a hung server. Accepted sockets stay open until
/// the listener is dropped.
struct SilentListener {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentListener {
    fn start() -> SilentListener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (accepted, stop) = (accepted.clone(), stop.clone());
            move || {
                let mut held: Vec<TcpStream> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) if held.len() < 100_000 => {
                            held.push(stream);
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            }
        });
        SilentListener {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (bounded) until some connection came in: the workers are then
    /// in the middle of a handshake.
    fn wait_for_a_connection(&self) {
        let deadline = Instant::now() + RUN_BOUND;
        while self.accepted.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no connection to {}", self.addr);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SilentListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One `switchboard-bench` run with its stderr collected.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: String,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        // Orphaned workers come to this process, so one that its coordinator
        // left unreaped is seen as our zombie.
        nix::sys::prctl::set_child_subreaper(true).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"));
        // The tests send SIGINT and SIGHUP, which a run keeps ignoring when
        // its starter ignored them (`nohup`; a script's background job
        // ignores SIGINT), so the run starts with their default actions
        // whatever this test process inherited.
        // SAFETY: the closure runs between fork and exec, where only
        // async-signal-safe calls are allowed: it makes only sigaction
        // calls (async-signal-safe) and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
                for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
                    sigaction(signal, &default)?;
                }
                Ok(())
            });
        }
        let mut child = command
            .args(args)
            .args(["--quiet"])
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().take(100_000) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Run {
            child,
            lines,
            stderr: String::new(),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The next stderr line, waiting at most until `deadline`.
    fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = self.lines.recv_timeout(left).ok()?;
        eprintln!("bench: {line}");
        self.stderr.push_str(&line);
        self.stderr.push('\n');
        Some(line)
    }

    /// The worker pids the coordinator prints once it has started them.
    fn worker_pids(&mut self) -> Vec<Pid> {
        let deadline = Instant::now() + RUN_BOUND;
        while let Some(line) = self.next_line(deadline) {
            if let Some(list) = line.strip_prefix("worker processes started: pids ") {
                return list
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .map(|pid| Pid::from_raw(pid.parse().unwrap()))
                    .collect();
            }
        }
        panic!("no worker pids printed; stderr:\n{}", self.stderr);
    }

    /// Waits for the coordinator to exit, at most `bound` from now, then
    /// reads the rest of its stderr (bounded: a worker left running would
    /// hold the pipe open).
    fn wait(&mut self, bound: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > bound {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "switchboard-bench ran past {bound:?}; stderr:\n{}",
                    self.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.next_line(deadline).is_some() {}
        (status, elapsed)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// State and parent of process `pid` from `/proc/PID/stat`, and whether it
/// is a bench worker; `None` once it is gone.
fn process(pid: Pid) -> Option<(char, i32, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let parent: i32 = fields.next()?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    let is_worker = cmdline.contains("switchboard-bench") && cmdline.contains("\0worker");
    Some((state, parent, is_worker))
}

/// Asserts that every worker is gone: neither running nor a zombie that its
/// coordinator did not reap (a zombie is reaped here, a runner killed, so a
/// failure leaves nothing behind either).
fn assert_gone(pids: &[Pid]) {
    let me = std::process::id() as i32;
    for &pid in pids {
        match process(pid) {
            None => {}
            Some(('Z', parent, _)) if parent == me => {
                let _ = waitpid(pid, None);
                panic!("worker {pid} was killed but not reaped by its coordinator");
            }
            Some((state, _, true)) if state != 'Z' => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                panic!("worker {pid} is still running (state {state})");
            }
            // The pid now belongs to some other process.
            Some(_) => {}
        }
    }
}

fn stderr_has(run: &Run, needle: &str) {
    assert!(
        run.stderr.contains(needle),
        "stderr lacks {needle:?}:\n{}",
        run.stderr
    );
}

/// Runs `args` against a silent port: fails well within the bound, names
/// the wait and the address, leaves no worker.
fn fails_against_a_silent_port(args: &[&str], target_prefix: &str, awaited: &str, hint: &str) {
    let silent = SilentListener::start();
    let target = format!("{target_prefix}{}", silent.addr);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--target", &target, "--timeout", "3"]);
    let mut run = Run::start(&all);
    let pids = run.worker_pids();
    let (status, elapsed) = run.wait(RUN_BOUND);
    assert!(!status.success(), "a run against a silent port succeeded");
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    stderr_has(
        &run,
        &format!("no {awaited} from {} within 3 s", silent.addr),
    );
    stderr_has(&run, hint);
    assert_gone(&pids);
}

#[test]
fn idle_against_a_silent_port_names_the_wait_and_leaves_no_worker() {
    fails_against_a_silent_port(
        &["idle", "-n", "200", "--duration", "2"],
        "",
        "Registered",
        "is this a Switchboard client port?",
    );
}

#[test]
fn p2p_against_a_silent_port_names_the_wait_and_leaves_no_worker() {
    fails_against_a_silent_port(
        &["p2p", "-n", "200", "--duration", "2", "--processes", "2"],
        "",
        "Registered",
        "is this a Switchboard client port?",
    );
}

#[test]
fn login_against_a_silent_port_names_the_welcome_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.json");
    write_accounts(&users, 40);
    fails_against_a_silent_port(
        &["connect", "-n", "40", "--users", users.to_str().unwrap()],
        "",
        "Welcome",
        "is this a Switchboard client port?",
    );
}

#[test]
fn mqtt_against_a_silent_port_names_the_connack_it_waited_for() {
    fails_against_a_silent_port(
        &["connect", "-n", "40"],
        "mqtt://",
        "CONNACK",
        "is this an MQTT broker port?",
    );
}

/// An accounts file of made-up users, so a run skips registration and goes
/// straight to Hello.
fn write_accounts(path: &Path, count: u64) {
    let accounts: Vec<serde_json::Value> = (1..=count)
        .map(|user| serde_json::json!({"user": user, "device": 1, "secret": "ab".repeat(32)}))
        .collect();
    std::fs::write(
        path,
        serde_json::json!({ "accounts": accounts }).to_string(),
    )
    .unwrap();
}

/// Stops a run with `signal` while its workers wait on a silent port (with
/// a timeout far beyond the test's bound): the coordinator ends by that
/// signal within seconds, its workers killed and reaped.
fn stops_on(signal: Signal) {
    let silent = SilentListener::start();
    let target = silent.addr.to_string();
    let mut run = Run::start(&[
        "p2p",
        "--target",
        &target,
        "-n",
        "200",
        "--processes",
        "2",
        "--timeout",
        "120",
    ]);
    let pids = run.worker_pids();
    silent.wait_for_a_connection();
    kill(run.pid(), signal).unwrap();
    let (status, elapsed) = run.wait(RUN_BOUND);
    assert_eq!(status.signal(), Some(signal as i32), "{status}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    stderr_has(
        &run,
        &format!("{signal}: stopped; killed and reaped 2 worker"),
    );
    assert_gone(&pids);
}

#[test]
fn sigint_stops_the_run_and_its_workers() {
    stops_on(Signal::SIGINT);
}

#[test]
fn sigterm_stops_the_run_and_its_workers() {
    stops_on(Signal::SIGTERM);
}

#[test]
fn a_stuck_worker_is_named_killed_and_reaped() {
    let silent = SilentListener::start();
    let target = silent.addr.to_string();
    let mut run = Run::start(&["idle", "--target", &target, "-n", "20", "--timeout", "2"]);
    let pids = run.worker_pids();
    // A stopped worker never answers; the coordinator's own bound
    // (--timeout plus 5 s) must end the wait.
    kill(pids[0], Signal::SIGSTOP).unwrap();
    let (status, elapsed) = run.wait(RUN_BOUND);
    assert!(!status.success());
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    stderr_has(
        &run,
        &format!("no answer to `register` from worker 0 (pid {})", pids[0]),
    );
    stderr_has(&run, "within 7 s (--timeout plus 5 s)");
    stderr_has(&run, &format!("switchboard://{}", silent.addr));
    assert_gone(&pids);
}

#[test]
fn workers_die_with_a_killed_coordinator() {
    let silent = SilentListener::start();
    let target = silent.addr.to_string();
    let mut run = Run::start(&[
        "idle",
        "--target",
        &target,
        "-n",
        "200",
        "--processes",
        "2",
        "--timeout",
        "120",
    ]);
    let pids = run.worker_pids();
    silent.wait_for_a_connection();
    // SIGKILL leaves the coordinator no chance to clean up: the workers must
    // end by themselves. They come to this process (the subreaper), and are
    // reaped here.
    kill(run.pid(), Signal::SIGKILL).unwrap();
    run.wait(RUN_BOUND);
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in &pids {
        loop {
            match process(pid) {
                None => break,
                // Dead, and ours to reap.
                Some(('Z', parent, _)) if parent == me => {
                    let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
                }
                Some((state, _, true)) if state != 'Z' => {
                    if Instant::now() > deadline {
                        let _ = kill(pid, Signal::SIGKILL);
                        let _ = waitpid(pid, None);
                        panic!("worker {pid} outlived its killed coordinator (state {state})");
                    }
                }
                // The pid now belongs to some other process.
                Some(_) => break,
            }
            assert!(Instant::now() < deadline + Duration::from_secs(1));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
