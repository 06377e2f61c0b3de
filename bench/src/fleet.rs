//! The coordinator's side of the worker processes.
//!
//! Each worker is this binary re-executed with the hidden `worker`
//! subcommand; commands go down its stdin and reports come up its stdout as
//! JSON lines, read by one thread per worker into one channel. Progress
//! reports are summed into the progress bar; every other report answers the
//! command in flight.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::worker::{Command, Counters, Report, WorkerSpec};

pub struct Fleet {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    reports: mpsc::Receiver<(usize, Option<Report>)>,
    counters: Vec<Counters>,
    bar: ProgressBar,
    last_tick: Instant,
    last_delivered: u64,
}

impl Fleet {
    /// Starts one worker per spec and hands each its spec.
    pub fn start(specs: Vec<WorkerSpec>, quiet: bool) -> anyhow::Result<Fleet> {
        let exe = std::env::current_exe().context("locating this binary to re-execute it")?;
        let (tx, reports) = mpsc::channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            let mut stdin = child.stdin.take().expect("stdin was piped");
            let stdout = child.stdout.take().expect("stdout was piped");
            writeln!(stdin, "{}", serde_json::to_string(spec)?)?;
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
            children.push(child);
            stdins.push(stdin);
        }
        let bar = ProgressBar::new_spinner();
        // Quiet when stderr is not a terminal (tests, CI, redirected runs).
        if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix:>8} {msg}")
                .expect("static template"),
        );
        Ok(Fleet {
            counters: vec![Counters::default(); children.len()],
            children,
            stdins,
            reports,
            bar,
            last_tick: Instant::now(),
            last_delivered: 0,
        })
    }

    /// Resident memory of every worker process together, bytes.
    pub fn worker_rss_bytes(&self) -> u64 {
        self.children
            .iter()
            .filter_map(|c| std::fs::read_to_string(format!("/proc/{}/status", c.id())).ok())
            .filter_map(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map(|kb| kb * 1024)
            .sum()
    }

    pub fn len(&self) -> usize {
        self.children.len()
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

    pub fn set_phase(&self, phase: &str) {
        self.bar.set_prefix(phase.to_string());
        self.bar.println(format!("phase: {phase}"));
    }

    pub fn send(&mut self, worker: usize, command: &Command) -> anyhow::Result<()> {
        let line = serde_json::to_string(command)?;
        writeln!(self.stdins[worker], "{line}")
            .with_context(|| format!("commanding worker {worker}"))?;
        self.stdins[worker].flush()?;
        Ok(())
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

    /// Waits for one answer (a non-progress report) from every worker.
    pub fn collect(&mut self, timeout: Duration) -> anyhow::Result<Vec<Report>> {
        let deadline = Instant::now() + timeout;
        let mut answers: Vec<Option<Report>> = vec![None; self.len()];
        while answers.iter().any(Option::is_none) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| anyhow!("workers did not answer within {timeout:?}"))?;
            let (i, report) = match self
                .reports
                .recv_timeout(left.min(Duration::from_millis(250)))
            {
                Ok(x) => x,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("every worker is gone"),
            };
            match report {
                None => bail!("worker {i} exited early"),
                Some(Report::Progress(c)) => {
                    self.counters[i] = c;
                    self.tick();
                }
                Some(Report::Failed { error }) => bail!("worker {i} failed: {error}"),
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
                Ok((i, None)) => bail!("worker {i} exited early"),
                Ok((i, Some(Report::Failed { error }))) => bail!("worker {i} failed: {error}"),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("every worker is gone"),
            }
            self.tick();
        }
        Ok(())
    }

    /// Tells every worker to quit and waits for them (bounded; a worker that
    /// does not exit in time is killed).
    pub fn finish(mut self) {
        let _ = self.broadcast(&Command::Quit);
        self.bar.finish_and_clear();
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}
