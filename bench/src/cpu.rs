//! CPU time of the harness's worker processes and of the server over one
//! p2p step, so a result says whether the harness or the server set it and
//! what the server spent per message.
//!
//! Source: utime + stime (fields 14 and 15, in clock ticks of
//! `sysconf(_SC_CLK_TCK)`) of `/proc/PID/stat`, which covers the whole
//! process including its exited threads, and of `/proc/PID/task/TID/stat`,
//! one thread. A worker runs its links on one executor thread, so that
//! thread's fraction of a core, not the process's, says when the harness
//! cannot go faster.
//!
//! A [`Sampler`] thread of the coordinator reads the counters just before
//! the step's scheduled start, at it, and every [`SAMPLE_INTERVAL`] until
//! the step's answers are in. [`StepCpu::over`] takes each counter at the
//! two ends of the step's span, linear between the samples either side, so
//! a drain that idles until its deadline does not dilute the figures. The
//! counters themselves move in whole ticks (10 ms at the usual 100 Hz).
//!
//! Plain file reads on the sampler thread; the figures are pure functions of
//! the samples.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::latency::monotonic_ns;

/// Time between two samples: short enough that the end of a step (its last
/// delivery) falls at most 50 ms from a sample, long enough that reading a
/// few `/proc` files 20 times a second costs the harness's CPU nothing
/// measurable. Memory: one [`CpuSample`] (a few hundred bytes) per
/// interval of the step.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// A harness thread this busy (fraction of one core over the step) could
/// not have offered more: the step measured the harness, not only the
/// server. Not 1.0, because a thread that waits for nothing still loses
/// time to wake-ups and to the clock ticks' rounding.
pub const HARNESS_BOUND_CORES: f64 = 0.90;

/// Whether a step whose busiest harness thread was `busiest_thread_cores`
/// busy was bound by the harness.
pub fn harness_bound(busiest_thread_cores: f64) -> bool {
    busiest_thread_cores >= HARNESS_BOUND_CORES
}

/// Clock ticks per second of the utime and stime fields.
pub fn ticks_per_s() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        // USER_HZ is 100 on every Linux architecture we run on.
        _ => 100,
    }
}

/// utime + stime, in clock ticks, of a `/proc/PID/stat` or
/// `/proc/PID/task/TID/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are
/// counted from after the last `)`: there field 3 (the state) comes first.
pub fn parse_stat_ticks(line: &str) -> Option<u64> {
    let after_name = &line[line.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // Field 3 is index 0 here, so field 14 (utime) is index 11 and field 15
    // (stime) follows it.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn read_ticks(path: &str) -> Option<u64> {
    parse_stat_ticks(&fs::read_to_string(path).ok()?)
}

/// One process's counters at one instant, clock ticks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessTicks {
    /// The whole process, threads that exited included.
    pub total: u64,
    /// Each live thread, by thread id.
    pub threads: BTreeMap<u32, u64>,
}

/// Reads a process and its threads; `None` when it has exited.
fn read_process(pid: u32) -> Option<ProcessTicks> {
    let total = read_ticks(&format!("/proc/{pid}/stat"))?;
    let mut threads = BTreeMap::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            // A thread may exit between the listing and the read; its time
            // stays in the process's total.
            if let Some(ticks) = read_ticks(&format!("/proc/{pid}/task/{tid}/stat")) {
                threads.insert(tid, ticks);
            }
        }
    }
    Some(ProcessTicks { total, threads })
}

/// Every counter at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuSample {
    /// `CLOCK_MONOTONIC`, the clock the workers time the step with.
    pub at_ns: u64,
    /// One per worker process, in fleet order; `None` once it has exited.
    pub workers: Vec<Option<ProcessTicks>>,
    /// The server's whole process; `None` when its pid is unknown or it has
    /// exited.
    pub server_ticks: Option<u64>,
}

impl CpuSample {
    fn worker(&self, worker: usize) -> Option<&ProcessTicks> {
        self.workers.get(worker).and_then(Option::as_ref)
    }
}

fn sample(worker_pids: &[u32], server_pid: Option<u32>) -> CpuSample {
    CpuSample {
        at_ns: monotonic_ns(),
        workers: worker_pids.iter().map(|&pid| read_process(pid)).collect(),
        server_ticks: server_pid.and_then(|pid| read_ticks(&format!("/proc/{pid}/stat"))),
    }
}

/// Samples the worker processes and the server on a thread of its own from
/// just before `start_ns` until [`Sampler::finish`].
pub struct Sampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<Vec<CpuSample>>,
}

impl Sampler {
    pub fn start(worker_pids: Vec<u32>, server_pid: Option<u32>, start_ns: u64) -> Sampler {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut samples = vec![sample(&worker_pids, server_pid)];
            let before_start = Duration::from_nanos(start_ns.saturating_sub(monotonic_ns()));
            let mut wait = before_start;
            // A message or a dropped sender both end the sampling; the last
            // sample is then taken after the step's answers are in, so after
            // the end of its span.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
                samples.push(sample(&worker_pids, server_pid));
                wait = SAMPLE_INTERVAL;
            }
            samples.push(sample(&worker_pids, server_pid));
            samples
        });
        Sampler { stop, thread }
    }

    /// Stops the sampling (after the step's answers are in) and hands over
    /// the samples.
    pub fn finish(self) -> Vec<CpuSample> {
        // The thread may have ended already only by a panic, reported by
        // the join below.
        let _ = self.stop.send(());
        self.thread.join().expect("the CPU sampler does not panic")
    }
}

/// A counter over the samples: `None` where it could not be read.
type Series = Vec<(u64, Option<u64>)>;

/// The value of a counter at `t_ns`, linear between the samples either side
/// (clamped to the first and last). A counter not seen yet counts 0 (a
/// thread born during the step), one no longer seen keeps its last value (a
/// thread or process that exited).
fn counter_at(series: &[(u64, Option<u64>)], t_ns: u64) -> f64 {
    let mut last = 0u64;
    let filled: Vec<(u64, f64)> = series
        .iter()
        .map(|&(at_ns, value)| {
            last = value.unwrap_or(last);
            (at_ns, last as f64)
        })
        .collect();
    let Some(after) = filled.iter().position(|&(at_ns, _)| at_ns >= t_ns) else {
        return filled.last().map_or(0.0, |&(_, v)| v);
    };
    if after == 0 {
        return filled[0].1;
    }
    let (t0, v0) = filled[after - 1];
    let (t1, v1) = filled[after];
    v0 + (v1 - v0) * (t_ns - t0) as f64 / (t1 - t0) as f64
}

/// CPU use over one step, as written to the step's JSON (`cpu`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepCpu {
    /// Wall seconds of the span the figures cover.
    pub span_s: f64,
    /// The busiest thread of any worker process, fraction of one core.
    pub harness_busiest_cores: f64,
    /// All worker processes together, cores.
    pub harness_sum_cores: f64,
    /// The server's whole process, cores; `None` without its pid.
    pub server_cores: Option<f64>,
    /// The server's CPU microseconds per delivered message.
    pub server_us_per_msg: Option<f64>,
    /// [`harness_bound`] of `harness_busiest_cores`.
    pub harness_bound: bool,
}

impl StepCpu {
    /// The figures over `[start_ns, end_ns]` from `samples` taken at
    /// `ticks_per_s`, with `delivered` messages in the span; `None` for an
    /// empty span or no samples.
    pub fn over(
        samples: &[CpuSample],
        ticks_per_s: u64,
        start_ns: u64,
        end_ns: u64,
        delivered: u64,
    ) -> Option<StepCpu> {
        if samples.is_empty() || end_ns <= start_ns || ticks_per_s == 0 {
            return None;
        }
        let span_s = (end_ns - start_ns) as f64 / 1e9;
        let cores = |series: &Series| {
            let ticks = counter_at(series, end_ns) - counter_at(series, start_ns);
            ticks.max(0.0) / ticks_per_s as f64 / span_s
        };
        let worker_count = samples.iter().map(|s| s.workers.len()).max().unwrap_or(0);
        let (mut busiest, mut sum) = (0f64, 0f64);
        for worker in 0..worker_count {
            let total: Series = samples
                .iter()
                .map(|s| (s.at_ns, s.worker(worker).map(|p| p.total)))
                .collect();
            sum += cores(&total);
            let tids: BTreeSet<u32> = samples
                .iter()
                .filter_map(|s| s.worker(worker))
                .flat_map(|p| p.threads.keys().copied())
                .collect();
            for tid in tids {
                let thread: Series = samples
                    .iter()
                    .map(|s| {
                        let ticks = s.worker(worker).and_then(|p| p.threads.get(&tid).copied());
                        (s.at_ns, ticks)
                    })
                    .collect();
                busiest = busiest.max(cores(&thread));
            }
        }
        let server: Series = samples.iter().map(|s| (s.at_ns, s.server_ticks)).collect();
        let server_cores = server
            .iter()
            .any(|(_, ticks)| ticks.is_some())
            .then(|| cores(&server));
        let server_us_per_msg = server_cores
            .filter(|_| delivered > 0)
            .map(|cores| cores * span_s * 1e6 / delivered as f64);
        Some(StepCpu {
            span_s,
            harness_busiest_cores: busiest,
            harness_sum_cores: sum,
            server_cores,
            server_us_per_msg,
            harness_bound: harness_bound(busiest),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line as the kernel writes it, with `utime` and `stime` at
    /// fields 14 and 15.
    fn stat_line(comm: &str, utime: u64, stime: u64) -> String {
        format!(
            "1234 ({comm}) S 1 1234 1234 0 -1 4194560 2310 0 0 0 {utime} {stime} 0 0 20 0 3 0 \
             99 1000000 500 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0"
        )
    }

    #[test]
    fn reads_utime_and_stime_of_a_stat_line() {
        assert_eq!(
            parse_stat_ticks(&stat_line("bench-worker", 150, 25)),
            Some(175)
        );
    }

    #[test]
    fn counts_fields_from_the_last_parenthesis_of_the_name() {
        assert_eq!(parse_stat_ticks(&stat_line("a b) c", 7, 3)), Some(10));
        assert_eq!(parse_stat_ticks(&stat_line(") ) 1 2 3 (", 40, 2)), Some(42));
    }

    #[test]
    fn rejects_truncated_and_nameless_stat_lines() {
        assert_eq!(parse_stat_ticks("1234 (x) S 1 2 3"), None);
        assert_eq!(
            parse_stat_ticks("1234 x S 1 2 3 4 5 6 7 8 9 10 11 12 13"),
            None
        );
        assert_eq!(parse_stat_ticks(""), None);
    }

    #[test]
    fn reads_own_process_and_threads() {
        let own = read_process(std::process::id()).unwrap();
        assert!(own.threads.contains_key(&std::process::id()));
        assert!(own.threads.values().all(|&ticks| ticks <= own.total));
    }

    #[test]
    fn harness_bound_from_ninety_percent_of_a_core() {
        assert!(harness_bound(0.90));
        assert!(harness_bound(1.0));
        assert!(!harness_bound(0.899));
        assert!(!harness_bound(0.0));
    }

    const SECOND_NS: u64 = 1_000_000_000;

    /// One worker with threads `(tid, ticks)` at `at_s` seconds.
    fn at(at_s: u64, threads: &[(u32, u64)], server_ticks: Option<u64>) -> CpuSample {
        let threads: BTreeMap<u32, u64> = threads.iter().copied().collect();
        CpuSample {
            at_ns: at_s * SECOND_NS,
            workers: vec![Some(ProcessTicks {
                total: threads.values().sum(),
                threads,
            })],
            server_ticks,
        }
    }

    #[test]
    fn one_saturated_thread_bounds_the_harness() {
        // 95 of 100 ticks in one second on the executor thread.
        let samples = [
            at(10, &[(1, 1000), (2, 5)], Some(0)),
            at(11, &[(1, 1095), (2, 5)], Some(50)),
        ];
        let cpu = StepCpu::over(&samples, 100, 10 * SECOND_NS, 11 * SECOND_NS, 1000).unwrap();
        assert!((cpu.harness_busiest_cores - 0.95).abs() < 1e-9, "{cpu:?}");
        assert!(cpu.harness_bound);
        assert_eq!(cpu.server_cores, Some(0.5));
        assert_eq!(cpu.server_us_per_msg, Some(500.0));
    }

    #[test]
    fn busy_process_of_idle_threads_is_not_bound() {
        // Two threads at half a core each: one core in all, none saturated.
        let samples = [
            at(0, &[(1, 0), (2, 0)], None),
            at(2, &[(1, 100), (2, 100)], None),
        ];
        let cpu = StepCpu::over(&samples, 100, 0, 2 * SECOND_NS, 10).unwrap();
        assert!((cpu.harness_busiest_cores - 0.5).abs() < 1e-9);
        assert!((cpu.harness_sum_cores - 1.0).abs() < 1e-9);
        assert!(!cpu.harness_bound);
        assert_eq!(cpu.server_cores, None);
        assert_eq!(cpu.server_us_per_msg, None);
    }

    #[test]
    fn idle_drain_after_the_span_does_not_dilute() {
        // Busy for the step's 2 s, then idle 8 s waiting for a drain deadline.
        let samples = [
            at(0, &[(1, 0)], Some(0)),
            at(2, &[(1, 190)], Some(100)),
            at(10, &[(1, 190)], Some(100)),
        ];
        let cpu = StepCpu::over(&samples, 100, 0, 2 * SECOND_NS, 0).unwrap();
        assert!(cpu.harness_bound, "{cpu:?}");
        assert_eq!(cpu.server_cores, Some(0.5));
        assert_eq!(cpu.server_us_per_msg, None, "no message delivered");
    }

    #[test]
    fn ends_between_samples_are_interpolated() {
        let samples = [at(0, &[(1, 0)], None), at(4, &[(1, 400)], None)];
        let cpu = StepCpu::over(&samples, 100, SECOND_NS, 3 * SECOND_NS, 1).unwrap();
        assert!((cpu.harness_busiest_cores - 1.0).abs() < 1e-9);
        assert!((cpu.span_s - 2.0).abs() < 1e-9);
    }

    #[test]
    fn threads_born_or_exited_during_the_span_count_their_share() {
        // Thread 2 starts after the first sample; thread 3 exits before the
        // last one, keeping the ticks it had.
        let samples = [
            at(0, &[(1, 0), (3, 10)], None),
            at(1, &[(1, 10), (2, 80), (3, 20)], None),
            at(2, &[(1, 20), (2, 180)], None),
        ];
        let cpu = StepCpu::over(&samples, 100, 0, 2 * SECOND_NS, 1).unwrap();
        assert!((cpu.harness_busiest_cores - 0.9).abs() < 1e-9, "{cpu:?}");
        assert!(cpu.harness_bound);
    }

    #[test]
    fn empty_span_has_no_figures() {
        let samples = [at(0, &[(1, 0)], None)];
        assert_eq!(StepCpu::over(&samples, 100, SECOND_NS, SECOND_NS, 1), None);
        assert_eq!(StepCpu::over(&[], 100, 0, SECOND_NS, 1), None);
    }
}
