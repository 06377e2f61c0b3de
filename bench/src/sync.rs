//! The `sync` scenario: the disk under the log, without a server.
//!
//! Records are written at a fixed rate through a shared mapping of a file
//! made the way the log makes its segments (allocated by `fallocate`,
//! read-ahead off for the unwritten part), and made durable by
//! `fdatasync`s begun after them, at most `--in-flight` at a time. A
//! record's latency runs from its write to the end of the first
//! fdatasync begun after it was written: the least an `fsync` ack can wait
//! on this disk at this rate. With one in flight, as the log runs its
//! commits, a record written during a sync waits for that one and then its
//! own; `--in-flight 2` shows what a second sync in flight would change.
//!
//! Bounded: `rate × duration` records, and the run ends with an error
//! `--timeout` seconds after its schedule's end. The file is removed on every exit path but SIGKILL (a
//! stop signal removes it through `reaper`).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use memmap2::{MmapMut, MmapOptions};
use serde_json::{json, Value};

use crate::latency::{monotonic_ns, Latency, Schedule};
use crate::{reaper, report};

/// Syncs in flight at most (`--in-flight`).
const IN_FLIGHT_MAX: usize = 8;
/// The largest file the probe writes.
const FILE_BYTES_MAX: u64 = 4 << 30;
/// The most records one run writes (their write times are kept).
const RECORDS_MAX: u64 = 10_000_000;

#[derive(Args, Clone)]
pub struct SyncArgs {
    /// Directory the probe's file is made in (the server's data directory,
    /// to measure the disk its log is on).
    #[arg(long)]
    dir: PathBuf,
    /// Records written per second.
    #[arg(long, default_value_t = 11_000.0)]
    rate: f64,
    /// Seconds of writing.
    #[arg(long, default_value_t = 8.0)]
    duration: f64,
    /// Bytes per record.
    #[arg(long, default_value_t = 200)]
    record_bytes: usize,
    /// fdatasyncs in flight at most (1 to 8); the log runs one at a time.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Seconds past the end of the schedule the run may take before it
    /// ends with an error (a disk that stops answering).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

/// What the writer and the syncing threads share.
struct Progress {
    /// When each record written so far was written (monotonic ns); its
    /// length is the count written.
    written_at: Vec<u64>,
    /// Records covered by the latest fdatasync begun.
    begun: u64,
    /// Records covered by a finished fdatasync.
    durable: u64,
    in_flight: usize,
    /// Set when the run is over: the syncing threads return.
    done: bool,
    error: Option<String>,
    syncs: u64,
    /// Written → durable, per record.
    durable_latency: Latency,
    /// Each fdatasync's own duration.
    sync_latency: Latency,
}

impl Progress {
    /// Records written so far.
    fn written(&self) -> u64 {
        self.written_at.len() as u64
    }
}

struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    schedule: Schedule,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The probe's file, removed when dropped.
struct ProbeFile {
    path: PathBuf,
    file: File,
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        reaper::scratch_removed(&self.path);
    }
}

pub fn run(args: &SyncArgs, machine: Value) -> anyhow::Result<()> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be a positive number of records per second");
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    if !(1..=IN_FLIGHT_MAX).contains(&args.in_flight) {
        bail!("--in-flight must be 1 to {IN_FLIGHT_MAX}");
    }
    if args.record_bytes == 0 || args.record_bytes > 1 << 20 {
        bail!("--record-bytes must be 1 to 1048576");
    }
    let schedule = Schedule::new(0, args.rate, args.duration);
    if schedule.count == 0 {
        bail!("--rate × --duration holds no record");
    }
    if schedule.count > RECORDS_MAX {
        bail!("--rate × --duration is more than {RECORDS_MAX} records");
    }
    let bytes = schedule.count * args.record_bytes as u64;
    if bytes > FILE_BYTES_MAX {
        bail!("--rate × --duration × --record-bytes is {bytes} bytes, more than the probe's 4 GiB");
    }
    let probe = make_file(&args.dir, bytes)?;
    // SAFETY: the file was just created by this process with `create_new`
    // under a name of its own, is never truncated or resized while mapped,
    // and the mapping is dropped before the file is removed (`probe` is
    // declared first, so it is dropped last).
    let mut map = unsafe { MmapOptions::new().len(bytes as usize).map_mut(&probe.file) }
        .with_context(|| format!("mapping {}", probe.path.display()))?;
    // As the log does for a segment's unwritten part: each write faults in
    // its own page, with no read-ahead of zeros.
    let _ = map.advise(memmap2::Advice::Random);

    let start = monotonic_ns() + 1_000_000;
    let deadline = start + ((args.duration + args.timeout) * 1e9) as u64;
    let shared = Arc::new(Shared {
        progress: Mutex::new(Progress {
            written_at: Vec::with_capacity(schedule.count as usize),
            begun: 0,
            durable: 0,
            in_flight: 0,
            done: false,
            error: None,
            syncs: 0,
            durable_latency: Latency::default(),
            sync_latency: Latency::default(),
        }),
        changed: Condvar::new(),
        schedule: Schedule {
            start_ns: start,
            ..schedule
        },
    });
    let mut syncers = Vec::new();
    for _ in 0..args.in_flight {
        let file = probe.file.try_clone()?;
        let shared = shared.clone();
        let max = args.in_flight;
        syncers.push(std::thread::spawn(move || syncer(&shared, &file, max)));
    }
    let written = write_all(&shared, &mut map, args.record_bytes, deadline);
    let waited = written.and_then(|lag| wait_durable(&shared, deadline).map(|()| lag));
    shared.lock().done = true;
    shared.changed.notify_all();
    for syncer in syncers {
        let _ = syncer.join();
    }
    drop(map);
    let writer_lag = waited?;
    let progress = shared.lock();
    let result = json!({
        "scenario": "sync",
        "dir": args.dir.display().to_string(),
        "rate": args.rate,
        "duration_s": args.duration,
        "record_bytes": args.record_bytes,
        "in_flight": args.in_flight,
        "records": schedule.count,
        "syncs": progress.syncs,
        "latency_us": {
            "durable": report::summary_json(&progress.durable_latency.summary()),
            "fdatasync": report::summary_json(&progress.sync_latency.summary()),
            "writer_lag": report::summary_json(&writer_lag.summary()),
        },
        "machine": machine,
    });
    if !args.quiet {
        let ms = |l: &Latency| {
            let s = l.summary();
            format!(
                "p50 {:.3} / p90 {:.3} / p99 {:.3} / max {:.3} ms",
                s.p50 as f64 / 1e3,
                s.p90 as f64 / 1e3,
                s.p99 as f64 / 1e3,
                s.max as f64 / 1e3
            )
        };
        println!(
            "{} records of {} B at {}/s, {} fdatasync(s) in flight at most, in {}",
            schedule.count,
            args.record_bytes,
            args.rate,
            args.in_flight,
            args.dir.display()
        );
        println!("  write to durable  {}", ms(&progress.durable_latency));
        println!(
            "  each fdatasync    {} ({} in all)",
            ms(&progress.sync_latency),
            progress.syncs
        );
        println!("  writer's lag      {}", ms(&writer_lag));
    }
    if let Some(path) = &args.json {
        report::write_json(path, &result)?;
    }
    Ok(())
}

/// Creates the probe's file in `dir`, `bytes` long and allocated.
fn make_file(dir: &Path, bytes: u64) -> anyhow::Result<ProbeFile> {
    if !dir.is_dir() {
        bail!("--dir {}: not a directory", dir.display());
    }
    let path = dir.join(format!("switchboard-bench-sync.{}.tmp", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    reaper::remove_on_stop(&path);
    let probe = ProbeFile { path, file };
    nix::fcntl::fallocate(
        probe.file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        bytes as i64,
    )
    .with_context(|| format!("allocating {bytes} bytes for {}", probe.path.display()))?;
    // The allocation itself made durable, as a segment is before its use.
    probe.file.sync_all()?;
    Ok(probe)
}

/// Writes every record at its scheduled time; returns the writer's lag
/// (scheduled → written).
fn write_all(
    shared: &Shared,
    map: &mut MmapMut,
    record_bytes: usize,
    deadline: u64,
) -> anyhow::Result<Latency> {
    let mut lag = Latency::default();
    for k in 0..shared.schedule.count {
        let due = shared.schedule.due_ns(k);
        let now = monotonic_ns();
        if now < due {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        if monotonic_ns() > deadline {
            bail!(
                "--timeout passed after {k} of {} records",
                shared.schedule.count
            );
        }
        let at = k as usize * record_bytes;
        map[at..at + record_bytes].fill((k % 251) as u8 + 1);
        let written = monotonic_ns();
        lag.record(due, written);
        let mut progress = shared.lock();
        if let Some(error) = &progress.error {
            bail!("fdatasync failed: {error}");
        }
        progress.written_at.push(written);
        drop(progress);
        shared.changed.notify_all();
    }
    Ok(lag)
}

/// Waits until every record is durable, an fdatasync failed, or the
/// deadline passed.
fn wait_durable(shared: &Shared, deadline: u64) -> anyhow::Result<()> {
    let mut progress = shared.lock();
    loop {
        if let Some(error) = &progress.error {
            bail!("fdatasync failed: {error}");
        }
        if progress.durable >= shared.schedule.count {
            return Ok(());
        }
        let now = monotonic_ns();
        if now > deadline {
            bail!(
                "--timeout passed with {} of {} records durable",
                progress.durable,
                shared.schedule.count
            );
        }
        progress = shared
            .changed
            .wait_timeout(progress, Duration::from_nanos(deadline - now))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// One syncing thread: begins an fdatasync whenever records are written
/// that no sync begun covers and fewer than `max` are in flight.
fn syncer(shared: &Shared, file: &File, max: usize) {
    loop {
        let covers = {
            let mut progress = shared.lock();
            loop {
                if progress.done || progress.error.is_some() {
                    return;
                }
                if progress.written() > progress.begun && progress.in_flight < max {
                    break;
                }
                progress = shared
                    .changed
                    .wait(progress)
                    .unwrap_or_else(|e| e.into_inner());
            }
            progress.begun = progress.written();
            progress.in_flight += 1;
            progress.begun
        };
        let began = monotonic_ns();
        let synced = file.sync_data();
        let ended = monotonic_ns();
        let mut progress = shared.lock();
        progress.in_flight -= 1;
        progress.syncs += 1;
        progress.sync_latency.record(began, ended);
        match synced {
            Err(error) => progress.error = Some(error.to_string()),
            // One file: a sync begun after a record was written covers it,
            // whichever of the syncs in flight ends first.
            Ok(()) => {
                for k in progress.durable..covers.max(progress.durable) {
                    let written = progress.written_at[k as usize];
                    progress.durable_latency.record(written, ended);
                }
                progress.durable = progress.durable.max(covers);
            }
        }
        drop(progress);
        shared.changed.notify_all();
    }
}
