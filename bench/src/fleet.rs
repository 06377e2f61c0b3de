//! The coordinator's side of the worker processes.
//!
//! Each worker is this binary re-executed with the hidden `worker`
//! subcommand; commands go down its stdin and reports come up its stdout as
//! JSON lines, read by one thread per worker into one channel. Progress
//! reports are summed into the progress bar; every other report answers the
//! command in flight.
//!
//! Every wait here names what it waits for and from which worker (pid,
//! share of the users, target), and a worker's own error becomes the
//! coordinator's. The workers are killed and reaped however the run ends
//! (see `reaper`).

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command as Process, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::link::seconds;
use crate::reaper;
use crate::worker::{Command, Counters, Report, WorkerSpec};

/// How long `finish` lets the workers close their links and exit after
/// `quit` before it kills them.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose stdout ended gets to exit, so the message can give
/// its exit status.
const EXIT_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// One worker process; its `Child` is in `reaper`'s list.
struct Member {
    pid: u32,
    stdin: ChildStdin,
    users: usize,
    /// The command whose answer is due, for messages.
    awaiting: Option<&'static str>,
}

/// The worker processes of a run. However the run ends they are killed and
/// reaped: `finish` lets them quit, `Drop` (an error return, a panic) kills
/// whatever is left, and `reaper`'s signal thread covers Ctrl-C.
pub struct Fleet {
    members: Vec<Member>,
    /// The target's URL, for messages.
    target: String,
    reports: mpsc::Receiver<(usize, Option<Report>)>,
    counters: Vec<Counters>,
    bar: ProgressBar,
    phase: String,
    last_tick: Instant,
    last_delivered: u64,
}

impl Fleet {
    /// Starts one worker per spec and hands each its spec.
    ///
    /// Call it from the main thread: a worker asks for SIGKILL when the
    /// thread that started it ends, and the main thread ends only with the
    /// process.
    pub fn start(specs: Vec<WorkerSpec>, quiet: bool) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("locating this binary to re-execute it")?;
        let (tx, reports) = mpsc::channel();
        let bar = ProgressBar::new_spinner();
        // Quiet when stderr is not a terminal (tests, CI, redirected runs).
        if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix:>8} {msg}")
                .expect("static template"),
        );
        // Built before the first worker starts, so an error below drops it
        // and so kills the workers started until then.
        let mut fleet = Fleet {
            members: Vec::with_capacity(specs.len()),
            target: specs.first().map(|s| s.target.url()).unwrap_or_default(),
            reports,
            counters: vec![Counters::default(); specs.len()],
            bar,
            phase: "start".into(),
            last_tick: Instant::now(),
            last_delivered: 0,
        };
        for (i, spec) in specs.iter().enumerate() {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            let stdin = child.stdin.take().expect("stdin was piped");
            let stdout = child.stdout.take().expect("stdout was piped");
            let pid = reaper::adopt(child);
            fleet.members.push(Member {
                pid,
                stdin,
                users: spec.users.len(),
                awaiting: None,
            });
            let line = serde_json::to_string(spec)?;
            writeln!(fleet.members[i].stdin, "{line}")
                .with_context(|| format!("handing {} its spec", fleet.who(i)))?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Report>(&line) {
                        Ok(report) => {
                            if tx.send((i, Some(report))).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("worker {i}: unreadable report ({e}): {line}"),
                    }
                }
                let _ = tx.send((i, None));
            });
        }
        eprintln!("worker processes started: pids {:?}", fleet.pids());
        Ok(fleet)
    }

    /// `worker 0 (pid 4242)`.
    fn who(&self, worker: usize) -> String {
        format!("worker {worker} (pid {})", self.members[worker].pid)
    }

    /// What worker `worker` was asked last, for messages.
    fn awaiting(&self, worker: usize) -> &'static str {
        self.members[worker].awaiting.unwrap_or("its spec")
    }

    /// The exit status of a worker whose stdout ended, once it has exited
    /// (bounded by [`EXIT_STATUS_TIMEOUT`]).
    fn exit_status(&self, worker: usize) -> Option<ExitStatus> {
        let deadline = Instant::now() + EXIT_STATUS_TIMEOUT;
        loop {
            if let Some(status) = reaper::try_wait(self.members[worker].pid) {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The error for a worker whose stdout ended `when` ("before answering
    /// `connect`", "during hold").
    fn exited(&self, worker: usize, when: &str) -> anyhow::Error {
        let status = match self.exit_status(worker) {
            Some(status) => format!("exited ({status})"),
            None => "closed its stdout".to_string(),
        };
        anyhow!(
            "{} {status} {when}; its stderr above may say why",
            self.who(worker)
        )
    }

    /// The error for a worker that reported a failure `when`.
    fn failed(&self, worker: usize, when: &str, error: &str) -> anyhow::Error {
        anyhow!("{} failed {when}: {error}", self.who(worker))
    }

    /// Resident memory of every worker process together, bytes.
    pub fn worker_rss_bytes(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|m| std::fs::read_to_string(format!("/proc/{}/status", m.pid)).ok())
            .filter_map(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map(|kb| kb * 1024)
            .sum()
    }

    /// The worker processes' pids, in worker order.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.pid).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn totals(&self) -> Counters {
        let mut t = Counters::default();
        for c in &self.counters {
            t.connected += c.connected;
            t.sent += c.sent;
            t.acked += c.acked;
            t.delivered += c.delivered;
            t.receipts += c.receipts;
            t.duplicates += c.duplicates;
            t.errors += c.errors;
        }
        t
    }

    pub fn set_phase(&mut self, phase: &str) {
        self.phase = phase.to_string();
        self.bar.set_prefix(phase.to_string());
        self.bar.println(format!("phase: {phase}"));
    }

    pub fn send(&mut self, worker: usize, command: &Command) -> anyhow::Result<()> {
        let line = serde_json::to_string(command)?;
        let member = &mut self.members[worker];
        member.awaiting = Some(command.name());
        writeln!(member.stdin, "{line}")
            .and_then(|()| member.stdin.flush())
            .with_context(|| format!("sending `{}` to {}", command.name(), self.who(worker)))
    }

    pub fn broadcast(&mut self, command: &Command) -> anyhow::Result<()> {
        for i in 0..self.len() {
            self.send(i, command)?;
        }
        Ok(())
    }

    fn tick(&mut self) {
        let elapsed = self.last_tick.elapsed();
        if elapsed < Duration::from_millis(500) {
            return;
        }
        let t = self.totals();
        let rate =
            (t.delivered - self.last_delivered.min(t.delivered)) as f64 / elapsed.as_secs_f64();
        self.last_delivered = t.delivered;
        self.last_tick = Instant::now();
        self.bar.set_message(format!(
            "connections {} | sent {} acked {} delivered {} receipts {} | {:.0} msg/s | errors {}",
            t.connected, t.sent, t.acked, t.delivered, t.receipts, rate, t.errors
        ));
        self.bar.tick();
    }

    /// The error for workers that did not answer within `timeout` (made as
    /// `bound` says): which command, which workers, their share and target,
    /// their last progress.
    fn no_answer(&self, silent: &[usize], timeout: Duration, bound: &str) -> anyhow::Error {
        let whom: Vec<String> = silent
            .iter()
            .map(|&i| {
                let c = &self.counters[i];
                format!(
                    "{} ({} users; last progress: {} connected, {} errors)",
                    self.who(i),
                    self.members[i].users,
                    c.connected,
                    c.errors
                )
            })
            .collect();
        anyhow!(
            "no answer to `{}` from {} within {} ({bound}) during {}, target {}",
            silent.first().map(|&i| self.awaiting(i)).unwrap_or("?"),
            whom.join(", "),
            seconds(timeout),
            self.phase,
            self.target
        )
    }

    /// Waits for one answer (a non-progress report) from every worker to the
    /// command it was sent last, at most `timeout` (made as `bound` says, for
    /// the message).
    pub fn collect(&mut self, timeout: Duration, bound: &str) -> anyhow::Result<Vec<Report>> {
        let deadline = Instant::now() + timeout;
        let mut answers: Vec<Option<Report>> = vec![None; self.len()];
        while answers.iter().any(Option::is_none) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                let silent: Vec<usize> = (0..answers.len())
                    .filter(|&i| answers[i].is_none())
                    .collect();
                return Err(self.no_answer(&silent, timeout, bound));
            };
            let (i, report) = match self
                .reports
                .recv_timeout(left.min(Duration::from_millis(250)))
            {
                Ok(x) => x,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("every worker's stdout closed during {}", self.phase)
                }
            };
            match report {
                None => {
                    let when = format!("before answering `{}`", self.awaiting(i));
                    return Err(self.exited(i, &when));
                }
                Some(Report::Progress(c)) => {
                    self.counters[i] = c;
                    self.tick();
                }
                Some(Report::Failed { error }) => {
                    let when = format!("answering `{}`", self.awaiting(i));
                    return Err(self.failed(i, &when, &error));
                }
                Some(other) => answers[i] = Some(other),
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.expect("all answered"))
            .collect())
    }

    /// Lets time pass while keeping the progress bar live.
    pub fn wait(&mut self, duration: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + duration;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self
                .reports
                .recv_timeout(left.min(Duration::from_millis(250)))
            {
                Ok((i, Some(Report::Progress(c)))) => self.counters[i] = c,
                Ok((i, None)) => {
                    let when = format!("during {}", self.phase);
                    return Err(self.exited(i, &when));
                }
                Ok((i, Some(Report::Failed { error }))) => {
                    let when = format!("during {}", self.phase);
                    return Err(self.failed(i, &when, &error));
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("every worker's stdout closed during {}", self.phase)
                }
            }
            self.tick();
        }
        Ok(())
    }

    /// Tells every worker to quit and waits for them, at most
    /// [`QUIT_TIMEOUT`] together; a worker still running then is killed.
    pub fn finish(mut self) {
        for i in 0..self.len() {
            // A worker that cannot take `quit` has exited or is killed below.
            let _ = self.send(i, &Command::Quit);
        }
        self.bar.finish_and_clear();
        let deadline = Instant::now() + QUIT_TIMEOUT;
        for i in 0..self.len() {
            let pid = self.members[i].pid;
            loop {
                if reaper::try_wait(pid).is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!(
                        "{} did not exit within {} of `quit`; killing it",
                        self.who(i),
                        seconds(QUIT_TIMEOUT)
                    );
                    reaper::kill_and_reap(pid);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Fleet {
    /// Kills and reaps every worker not reaped yet: after `finish` none is
    /// left; after an error return or a panic they may be in the middle of
    /// a phase and would go on connecting to the target for minutes.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        for member in &self.members {
            reaper::kill_and_reap(member.pid);
        }
    }
}
