//! `switchboard-bench`: capacity benchmarks of a Switchboard server, or of an
//! MQTT 3.1.1 broker with the same workload.
//!
//! Wiring only: the coordinator (this process) parses the command line,
//! plans how the connections are split over worker processes and source
//! addresses (`limits`), drives the workers through the scenario's phases
//! (`fleet`, `worker`), samples the server's and the kernel's memory
//! (`sysmem`) and the harness's and the server's CPU time over each p2p or
//! group step (`cpu`), and writes the results (`report`). The group
//! scenario's plan (who is in which group, who sends) is `group`; the disk
//! probe, which needs no server, is `sync`. See docs/benchmarks.md.

mod cpu;
mod fleet;
mod group;
mod latency;
mod lean;
mod limits;
mod link;
mod media;
mod mqtt;
mod reaper;
mod report;
mod sync;
mod sysmem;
mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::cpu::StepCpu;
use crate::fleet::Fleet;
use crate::group::{GroupPlan, LocalGroups};
use crate::latency::{monotonic_ns, ChainLatency, Latency};
use crate::link::{Account, Protocol, Target, Transport, User};
use crate::report::Second;
use crate::sysmem::MemorySample;
use crate::worker::{
    Command, CreatorOrder, Engine, GroupOrder, GroupStep, P2pStep, Report, StepResult, Subset,
    WorkerSpec,
};

#[derive(Parser)]
#[command(
    name = "switchboard-bench",
    about = "Capacity benchmarks for Switchboard (and MQTT brokers)"
)]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N authenticated sessions; sessions/s and time to all connected.
    Connect(Common),
    /// Hold N sessions and sample server and kernel memory per connection.
    Idle(Common),
    /// Users in pairs exchange messages open-loop at a fixed offered rate.
    P2p(P2pArgs),
    /// Queue messages for offline users, connect them, time the drain.
    Offline(OfflineArgs),
    /// p2p while clients disconnect and reconnect at a fixed rate.
    Churn(ChurnArgs),
    /// Groups of users; one sender per group sends group messages open-loop
    /// at a fixed total rate, every other member gets each one.
    Group(GroupArgs),
    /// The media service: upload and download MB/s per blob size (with the
    /// disk's own by dd), and server memory per upload in flight.
    Media(media::MediaArgs),
    /// The disk under the log, without a server: records written at a
    /// fixed rate through a shared mapping of a preallocated file, each
    /// timed until an fdatasync begun after it ends.
    Sync(sync::SyncArgs),
    /// Print two JSON results side by side.
    Compare { a: PathBuf, b: PathBuf },
    /// Draw deliver p50 and p99 against offered rate from JSON results
    /// (each `--rate max` search's steps, or a run's one rate) as one SVG,
    /// and print the points. `LABEL=FILE`; files with the same label form
    /// one series.
    Curve {
        /// The SVG to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        runs: Vec<String>,
    },
    /// Internal: a worker process (started by the coordinator).
    #[command(hide = true)]
    Worker,
}

#[derive(Args, Clone)]
struct Common {
    /// `switchboard://IP:PORT` (or bare `IP:PORT`) or `mqtt://IP:PORT`.
    #[arg(long, default_value = "127.0.0.1:7700")]
    target: String,
    /// Connections (users; one device each). Rounded down to even.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: u64,
    /// Seconds the measured phase lasts (hold for idle, send for p2p).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Bound on every wait: a connect, a drain, a worker's answer (seconds).
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Credentials file (JSON): accounts are reused from it and new ones
    /// appended, so a run on a warm server skips registration.
    #[arg(long)]
    users: Option<PathBuf>,
    /// The server's pid (memory and CPU sampling); found from the listening
    /// port when not given.
    #[arg(long)]
    server_pid: Option<u32>,
    /// At least this many worker processes (more are used when the
    /// open-file limit requires).
    #[arg(long, default_value_t = 1)]
    processes: u64,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Seconds between keepalive pings on every link.
    #[arg(long, default_value_t = 30.0)]
    ping_interval: f64,
    /// Switchboard: at every login each user follows the presence of the
    /// next K users of its worker process (SubscribePresence).
    #[arg(long, default_value_t = 0)]
    follow: u32,
    /// Do not bind to 127.0.0.2, 127.0.0.3, … (loopback targets only).
    #[arg(long)]
    no_source_spread: bool,
    /// Switchboard: `ik` (Noise, the server key pinned at registration),
    /// `xx` (Noise, first contact at every login) or `plain` (no
    /// encryption). Accounts made in one mode log in the way they were made
    /// (a plaintext account's secret, a Noise account's key).
    #[arg(long, value_enum, default_value_t = Transport::Ik)]
    transport: Transport,
    /// How a worker drives its links: `glommio` (async tasks, every
    /// scenario) or `lean` (one epoll loop, lighter per message; the p2p
    /// and group scenarios, Switchboard in plaintext or MQTT).
    #[arg(long, value_enum, default_value_t = Engine::Glommio)]
    engine: Engine,
    /// MQTT, p2p, `--engine lean`: carry the delivered receipt (✓✓) of a
    /// Switchboard exchange over MQTT. Each recipient answers a message
    /// with a QoS 1 PUBLISH to the sender's topic, queued with the
    /// message's PUBACK, and the sender acknowledges it: four packets each
    /// way per message, against Switchboard's three frames and QoS 1's two.
    #[arg(long)]
    mqtt_receipts: bool,
    /// Switchboard, p2p, `--engine lean`: hold the Ack a user owes only for
    /// Receipts (✓✓) for up to this many milliseconds, so it goes out with
    /// the next frame the user sends anyway (a Send, or the Ack of a
    /// Deliver, which is never held), as protocol §4.5 allows: one segment
    /// fewer per message each way of a chat. A held Ack still goes out
    /// alone once its time is up, and every held Ack goes out before a step
    /// ends. 0: every Ack at once (the default).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    receipt_ack_delay_ms: u32,
    /// Runs each worker's loop under SCHED_FIFO at this priority (1-99), so
    /// ordinary threads on the harness's CPU do not delay its sends and
    /// reads (root or CAP_SYS_NICE; otherwise a warning and an ordinary
    /// thread). 0: off.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=99))]
    realtime_priority: u8,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write HdrHistogram percentile distributions (`*.hgrm`) here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Draw rate and latency percentiles over time (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct P2pArgs {
    #[command(flatten)]
    common: Common,
    /// Offered messages per second (all pairs together), or `max` to search
    /// for the highest rate delivered in full with p99 under --p99-max-ms.
    #[arg(long, default_value = "1000")]
    rate: String,
    /// Payload bytes (at least 28: the harness's header).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds to wait after the last send for acks, deliveries and receipts.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// `--rate max`: first rate tried.
    #[arg(long, default_value_t = 1000.0)]
    rate_start: f64,
    /// `--rate max`: seconds per step.
    #[arg(long, default_value_t = 5.0)]
    step_duration: f64,
    /// `--rate max`: deliver p99 bound, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    p99_max_ms: f64,
    /// `--rate max`: times a step that misses the bound is run again before
    /// it counts as missed, so one stall from other work on the host does
    /// not cap the search.
    #[arg(long, default_value_t = 1)]
    step_retries: u32,
}

impl P2pArgs {
    fn search(&self) -> Search {
        Search {
            rate_start: self.rate_start,
            p99_max_ms: self.p99_max_ms,
            step_retries: self.step_retries,
        }
    }
}

#[derive(Args, Clone)]
struct GroupArgs {
    #[command(flatten)]
    common: Common,
    /// Groups.
    #[arg(long, default_value_t = 8)]
    groups: u32,
    /// Members per group, the sender included (at most -n; with fewer than
    /// groups × members users, users are in several groups).
    #[arg(long, default_value_t = 8)]
    members: u32,
    /// Offered group messages per second (all groups together), or `max`
    /// to search for the highest rate delivered to every member with
    /// deliver p99 under --p99-max-ms.
    #[arg(long, default_value = "100")]
    rate: String,
    /// Payload bytes (at least 28: the harness's header).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds to wait after the last send for acks, deliveries and receipts.
    #[arg(long, default_value_t = 10.0)]
    drain_timeout: f64,
    /// `--rate max`: first rate tried (group messages per second).
    #[arg(long, default_value_t = 50.0)]
    rate_start: f64,
    /// `--rate max`: seconds per step.
    #[arg(long, default_value_t = 5.0)]
    step_duration: f64,
    /// `--rate max`: deliver p99 bound, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    p99_max_ms: f64,
    /// `--rate max`: times a step that misses the bound is run again before
    /// it counts as missed.
    #[arg(long, default_value_t = 1)]
    step_retries: u32,
}

impl GroupArgs {
    fn search(&self) -> Search {
        Search {
            rate_start: self.rate_start,
            p99_max_ms: self.p99_max_ms,
            step_retries: self.step_retries,
        }
    }
}

/// How `--rate max` searches (see `Run::search`).
struct Search {
    rate_start: f64,
    p99_max_ms: f64,
    step_retries: u32,
}

#[derive(Args, Clone)]
struct OfflineArgs {
    #[command(flatten)]
    common: Common,
    /// Messages queued for each offline user.
    #[arg(long, short = 'k', default_value_t = 100)]
    per_user: u64,
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

#[derive(Args, Clone)]
struct ChurnArgs {
    #[command(flatten)]
    p2p: P2pArgs,
    /// Disconnects and reconnects per second.
    #[arg(long, default_value_t = 10.0)]
    churn_rate: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Scenario::Worker | Scenario::Compare { .. } | Scenario::Curve { .. }
    ) {
        // Before any other thread starts, so every thread blocks the stop
        // signals and Ctrl-C reaches the thread that kills the workers.
        reaper::handle_stop_signals()?;
    }
    match cli.command {
        Scenario::Worker => worker::run(),
        Scenario::Compare { a, b } => {
            let read = |p: &PathBuf| -> anyhow::Result<Value> {
                Ok(serde_json::from_str(
                    &std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                )?)
            };
            print!("{}", report::compare(&read(&a)?, &read(&b)?));
            Ok(())
        }
        Scenario::Curve { out, runs } => {
            let mut series: Vec<(String, Vec<report::CurvePoint>)> = Vec::new();
            for run in &runs {
                let (label, file) = run
                    .split_once('=')
                    .with_context(|| format!("{run}: expected LABEL=FILE"))?;
                let text =
                    std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
                let points = report::curve_points(&serde_json::from_str(&text)?);
                anyhow::ensure!(!points.is_empty(), "{file}: no rate with a deliver p99");
                match series.iter_mut().find(|(l, _)| l == label) {
                    Some((_, all)) => all.extend(points),
                    None => series.push((label.to_string(), points)),
                }
            }
            for (_, points) in &mut series {
                points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            }
            print!("{}", report::curve_table(&series));
            report::curve(&out, &series)
        }
        Scenario::Connect(common) => Run::start("connect", common, None)?.connect(),
        Scenario::Idle(common) => Run::start("idle", common, None)?.idle(),
        Scenario::P2p(args) => Run::start("p2p", args.common.clone(), None)?.p2p(&args, 0.0),
        Scenario::Churn(args) => {
            Run::start("churn", args.p2p.common.clone(), None)?.p2p(&args.p2p, args.churn_rate)
        }
        Scenario::Offline(args) => Run::start("offline", args.common.clone(), None)?.offline(&args),
        Scenario::Group(args) => {
            let shape = (args.groups, args.members);
            Run::start("group", args.common.clone(), Some(shape))?.group(&args)
        }
        Scenario::Media(args) => media::run(&args, machine()),
        Scenario::Sync(args) => sync::run(&args, machine()),
    }
}

/// The accounts file: `{"accounts": [{user, device, secret}, …]}`.
fn load_accounts(path: &Option<PathBuf>) -> anyhow::Result<Vec<Account>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)?;
    Ok(serde_json::from_value(value["accounts"].clone())?)
}

/// How [`Run::timeout`] is made, for messages.
const TIMEOUT_BOUND: &str = "--timeout plus 5 s";

struct Run {
    scenario: &'static str,
    common: Common,
    target: Target,
    users: Vec<User>,
    split: limits::Split,
    fleet: Fleet,
    server_pid: Option<u32>,
    /// The group scenario's plan.
    groups: Option<GroupPlan>,
    out: Value,
}

impl Run {
    /// Starts the workers and registers the users that have no account;
    /// `groups` is the group scenario's (groups, members per group).
    fn start(
        scenario: &'static str,
        common: Common,
        groups: Option<(u32, u32)>,
    ) -> anyhow::Result<Run> {
        let mut target = Target::parse(&common.target)?;
        target.transport = common.transport;
        if common.engine == Engine::Lean {
            if scenario != "p2p" && scenario != "group" {
                bail!("--engine lean runs the p2p and group scenarios only");
            }
            if target.protocol == Protocol::Switchboard && target.transport != Transport::Plain {
                bail!("--engine lean logs in in plaintext: add --transport plain");
            }
            if common.follow > 0 {
                bail!("--engine lean does not follow presence: drop --follow");
            }
        }
        if common.mqtt_receipts
            && (target.protocol != Protocol::Mqtt
                || scenario != "p2p"
                || common.engine != Engine::Lean)
        {
            bail!("--mqtt-receipts needs an mqtt:// target, the p2p scenario and --engine lean");
        }
        if common.receipt_ack_delay_ms > 0
            && (target.protocol != Protocol::Switchboard
                || scenario != "p2p"
                || common.engine != Engine::Lean)
        {
            bail!("--receipt-ack-delay-ms needs a Switchboard target, the p2p scenario and --engine lean");
        }
        let count = common.connections & !1;
        if count == 0 {
            bail!("--connections must be at least 2");
        }
        let groups = match groups {
            Some((groups, members)) => {
                // Like the workers' own message ids in p2p: above any id of
                // an earlier run, which the server's dedupe remembers.
                let msg_id_base = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64 * 1000)
                    .unwrap_or(1);
                Some(GroupPlan::new(count, groups, members, msg_id_base)?)
            }
            None => None,
        };
        let nofile = limits::raise_nofile();
        let loopback = target.server.ip().is_loopback() && !common.no_source_spread;
        let source_offset =
            rand::Rng::gen_range(&mut rand::thread_rng(), 0..limits::SOURCE_IP_OFFSETS);
        let split = limits::plan(count, nofile, common.processes, loopback, source_offset);
        eprintln!(
            "open-file limit {}: {} connections over {} worker process(es) ({:?}), source addresses {:?}",
            split.nofile_limit, count, split.processes, split.users_per_process, split.source_ips
        );
        let accounts = if target.protocol == Protocol::Switchboard {
            load_accounts(&common.users)?
        } else {
            Vec::new()
        };
        let users: Vec<User> = (0..count)
            .map(|index| User {
                index,
                account: accounts.get(index as usize).cloned(),
            })
            .collect();
        let mut specs = Vec::new();
        let mut first = 0usize;
        for (worker, share) in split.users_per_process.iter().enumerate() {
            let share = *share as usize;
            specs.push(WorkerSpec {
                worker: worker as u64,
                coordinator_pid: std::process::id(),
                target,
                users: users[first..first + share].to_vec(),
                source_ips: split.source_ips.clone(),
                timeout_s: common.timeout,
                connect_concurrency: common.connect_concurrency,
                ping_interval_s: common.ping_interval,
                follow: common.follow,
                engine: common.engine,
                mqtt_receipts: common.mqtt_receipts,
                realtime_priority: common.realtime_priority,
                receipt_ack_delay_ms: common.receipt_ack_delay_ms,
                groups,
            });
            first += share;
        }
        let server_pid = common
            .server_pid
            .or_else(|| sysmem::find_listener_pid(target.server));
        if server_pid.is_none() {
            eprintln!(
                "server pid not found (pass --server-pid); server memory and CPU are not sampled"
            );
        }
        let fleet = Fleet::start(specs, common.quiet)?;
        let out = json!({
            "scenario": scenario,
            "target": target.url(),
            "transport": target.transport,
            "engine": common.engine,
            "mqtt_receipts": common.mqtt_receipts,
            "realtime_priority": common.realtime_priority,
            "receipt_ack_delay_ms": common.receipt_ack_delay_ms,
            "connections": count,
            "machine": machine(),
            "split": {
                "nofile_limit": split.nofile_limit,
                "connections_per_process_max": split.connections_per_process_max,
                "processes": split.processes,
                "users_per_process": split.users_per_process,
                "source_ips": split.source_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            },
            "duration_s": null,
            "server": {"pid": server_pid, "rss_bytes": null, "rss_bytes_per_conn": null, "pss_bytes_per_conn": null},
            "kernel": {"sockstat_bytes_per_conn": null, "slab_bytes_per_conn": null},
            "rates": {"sessions_per_s": null, "offered_msgs_per_s": null, "delivered_msgs_per_s": null},
            "latency_us": {"ack": null, "deliver": null, "receipt": null},
        });
        let mut run = Run {
            scenario,
            common,
            target,
            users,
            split,
            fleet,
            server_pid,
            groups,
            out,
        };
        run.register()?;
        Ok(run)
    }

    /// How long the coordinator waits for a worker's answer: the worker's
    /// own bound on each wait plus time to report ([`TIMEOUT_BOUND`]).
    fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.common.timeout + 5.0)
    }

    fn register(&mut self) -> anyhow::Result<()> {
        if self.target.protocol != Protocol::Switchboard {
            return Ok(());
        }
        let missing = self.users.iter().filter(|u| u.account.is_none()).count();
        self.fleet.set_phase("register");
        self.fleet.broadcast(&Command::Register)?;
        let answers = self.fleet.collect(self.timeout(), TIMEOUT_BOUND)?;
        let mut elapsed: f64 = 0.0;
        for answer in answers {
            if let Report::Registered {
                accounts,
                elapsed_s,
            } = answer
            {
                elapsed = elapsed.max(elapsed_s);
                for (index, account) in accounts {
                    self.users[index as usize].account = Some(account);
                }
            }
        }
        self.out["registration"] = json!({"registered": missing, "elapsed_s": elapsed});
        if let Some(path) = &self.common.users {
            if missing > 0 {
                let mut accounts = load_accounts(&self.common.users)?;
                for user in self.users.iter().skip(accounts.len()) {
                    accounts.push(user.account.clone().expect("every user registered"));
                }
                report::write_json(path, &json!({"accounts": accounts}))?;
            }
        }
        Ok(())
    }

    fn connect_all(&mut self, subset: Subset) -> anyhow::Result<(u64, f64, Latency)> {
        self.fleet.set_phase("connect");
        self.fleet.broadcast(&Command::Connect { subset })?;
        let answers = self.fleet.collect(self.timeout(), TIMEOUT_BOUND)?;
        let (mut connected, mut failed, mut elapsed) = (0, 0, 0f64);
        let mut handshakes = Latency::default();
        for answer in answers {
            if let Report::Connected {
                connected: c,
                failed: f,
                elapsed_s,
                handshake_hex,
            } = answer
            {
                connected += c;
                failed += f;
                elapsed = elapsed.max(elapsed_s);
                handshakes.add(&Latency::from_hex(&handshake_hex)?);
            }
        }
        if failed > 0 {
            eprintln!("{failed} connections failed");
        }
        self.out["connect"] =
            json!({"connected": connected, "failed": failed, "elapsed_s": elapsed});
        self.out["rates"]["sessions_per_s"] = json!(connected as f64 / elapsed.max(1e-9));
        Ok((connected, elapsed, handshakes))
    }

    fn connect(mut self) -> anyhow::Result<()> {
        let (connected, elapsed, handshakes) = self.connect_all(Subset::All)?;
        self.out["duration_s"] = json!(elapsed);
        self.out["rates"]["sessions_per_s"] = json!(connected as f64 / elapsed.max(1e-9));
        self.out["latency_us"]["handshake"] = report::summary_json(&handshakes.summary());
        let sample = sysmem::sample(self.server_pid)?;
        self.out["server"]["rss_bytes"] = json!(sample.server_rss_bytes);
        self.finish(&[("handshake", &handshakes)], &[])
    }

    fn idle(mut self) -> anyhow::Result<()> {
        // A server started just before the harness may still be mapping its
        // log and warming caches: take the baseline once its RSS holds
        // still (within 64 KiB over half a second, for at most 10 s), so
        // start-up growth is not counted per connection.
        let mut baseline = sysmem::sample(self.server_pid)?;
        if self.server_pid.is_some() {
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(500));
                let next = sysmem::sample(self.server_pid)?;
                let moved = next.server_rss_bytes.abs_diff(baseline.server_rss_bytes);
                baseline = next;
                if moved <= 64 * 1024 {
                    break;
                }
            }
        }
        let (connected, elapsed, handshakes) = self.connect_all(Subset::All)?;
        self.out["rates"]["sessions_per_s"] = json!(connected as f64 / elapsed.max(1e-9));
        self.fleet.set_phase("hold");
        // Let the server settle (allocator, deferred frees) before sampling.
        self.fleet.wait(Duration::from_secs(2))?;
        let mut samples = vec![sysmem::sample(self.server_pid)?];
        let hold_end = std::time::Instant::now() + Duration::from_secs_f64(self.common.duration);
        while std::time::Instant::now() < hold_end {
            self.fleet
                .wait(Duration::from_secs(1).min(hold_end - std::time::Instant::now()))?;
            samples.push(sysmem::sample(self.server_pid)?);
        }
        let last = *samples.last().expect("one sample at least");
        let per =
            |after: u64, before: u64| (after as f64 - before as f64) / connected.max(1) as f64;
        self.out["duration_s"] = json!(self.common.duration);
        self.out["server"]["rss_bytes"] = json!(last.server_rss_bytes);
        self.out["server"]["rss_bytes_baseline"] = json!(baseline.server_rss_bytes);
        self.out["server"]["pss_bytes"] = json!(last.server_pss_bytes);
        if self.server_pid.is_some() {
            self.out["server"]["rss_bytes_per_conn"] =
                json!(per(last.server_rss_bytes, baseline.server_rss_bytes));
            self.out["server"]["pss_bytes_per_conn"] =
                json!(per(last.server_pss_bytes, baseline.server_pss_bytes));
        }
        self.out["kernel"] = json!({
            "sockstat_bytes_per_conn": per(last.sockstat_tcp_bytes, baseline.sockstat_tcp_bytes),
            "slab_bytes_per_conn": per(last.slab_bytes, baseline.slab_bytes),
            "slab_source": if last.slab_from_slabinfo { "/proc/slabinfo" } else { "/proc/meminfo Slab" },
            "tcp_sockets_inuse_delta": last.sockstat_tcp_inuse as i64 - baseline.sockstat_tcp_inuse as i64,
            "note": "loopback: both ends of every connection are in these kernel figures",
        });
        self.out["samples"] = json!(samples
            .iter()
            .map(|s: &MemorySample| json!({"rss_bytes": s.server_rss_bytes, "pss_bytes": s.server_pss_bytes, "slab_bytes": s.slab_bytes, "sockstat_bytes": s.sockstat_tcp_bytes}))
            .collect::<Vec<_>>());
        self.finish(&[("handshake", &handshakes)], &[])
    }

    /// One p2p step: `rate` messages per second for `duration` s.
    fn p2p_step(
        &mut self,
        args: &P2pArgs,
        rate: f64,
        duration: f64,
        churn_per_s: f64,
    ) -> anyhow::Result<Step> {
        let pairs_total = self.users.len() as f64 / 2.0;
        let shares = self.split.users_per_process.clone();
        self.step(
            rate,
            duration,
            args.drain_timeout,
            1,
            |worker, start_at_ns| {
                let fraction = (shares[worker] as f64 / 2.0) / pairs_total;
                Command::P2p(P2pStep {
                    rate_per_s: rate * fraction,
                    duration_s: duration,
                    payload_bytes: args.payload,
                    start_at_ns,
                    drain_timeout_s: args.drain_timeout,
                    churn_per_s: churn_per_s * fraction,
                })
            },
        )
    }

    /// One step of `duration` s at `rate`, whose messages make
    /// `deliveries_per_msg` deliveries each: worker `i` gets
    /// `command(i, start_at_ns)`, and the step's CPU is sampled from just
    /// before the common start until every worker has answered.
    fn step(
        &mut self,
        rate: f64,
        duration: f64,
        drain_timeout_s: f64,
        deliveries_per_msg: u64,
        command: impl Fn(usize, u64) -> Command,
    ) -> anyhow::Result<Step> {
        let start_at_ns = monotonic_ns() + 300_000_000;
        // Started before the workers hear of the step, so its first sample
        // precedes the step's start; dropped with an error return.
        let sampler = cpu::Sampler::start(self.fleet.pids(), self.server_pid, start_at_ns);
        for i in 0..self.fleet.len() {
            self.fleet.send(i, &command(i, start_at_ns))?;
        }
        let wait = Duration::from_secs_f64(duration + drain_timeout_s + 10.0);
        let answers = self
            .fleet
            .collect(wait, "--duration plus --drain-timeout plus 10 s")?;
        let mut step = Step {
            rate,
            duration,
            deliveries_per_msg,
            ..Default::default()
        };
        for answer in answers {
            if let Report::Step(result) = answer {
                step.add(&result)?;
            }
        }
        let samples = sampler.finish();
        let end_ns = start_at_ns + (step.span_s() * 1e9) as u64;
        step.cpu = StepCpu::over(
            &samples,
            cpu::ticks_per_s(),
            start_at_ns,
            end_ns,
            step.result.delivered,
        );
        Ok(step)
    }

    /// `--rate max`: doubles the rate from `search.rate_start` until a step
    /// misses (not everything delivered, or deliver p99 over the bound; a
    /// miss is run again `step_retries` times before it counts), then
    /// bisects to within 5 %, at most 24 steps. `run_step` runs one step
    /// (of `--step-duration` s) at a rate. Writes `search`, `rate_max` and
    /// `rate_max_harness_bound`; the best step.
    fn search(
        &mut self,
        search: &Search,
        mut run_step: impl FnMut(&mut Run, f64) -> anyhow::Result<Step>,
    ) -> anyhow::Result<Step> {
        self.fleet.set_phase("search");
        let mut rate = search.rate_start;
        let mut good: Option<Step> = None;
        let mut bad: Option<f64> = None;
        // Whether the first rate that missed (where doubling stopped)
        // and the lowest one (the search's upper bracket) were bound by
        // the harness.
        let mut first_bad_harness_bound: Option<bool> = None;
        let mut last_bad_harness_bound: Option<bool> = None;
        let mut trail = Vec::new();
        for _ in 0..24 {
            let mut attempt = 0;
            let (step, ok) = loop {
                let step = run_step(self, rate)?;
                let ok = step.ok(search.p99_max_ms);
                let (deliver, lag) = (step.chain.deliver.summary(), step.chain.send_lag.summary());
                trail.push(json!({"rate": rate, "delivered": step.result.delivered, "offered": step.result.offered,
                    "deliver_p50_us": deliver.p50,
                    "deliver_p99_us": deliver.p99, "ok": ok, "attempt": attempt,
                    "send_lag_p99_us": lag.p99,
                    "send_lag_max_us": lag.max,
                    "deliveries_per_server_core_s": step.deliveries_per_server_core_s(),
                    "cpu": step.cpu_json()}));
                let verdict = match (ok, step.harness_bound()) {
                    (true, false) => "ok",
                    (true, true) => "ok (harness-bound)",
                    (false, false) => "not met",
                    (false, true) => "not met (harness-bound)",
                };
                eprintln!(
                    "rate {rate:.0}/s: {}, {}: {verdict}",
                    step.counts_text(),
                    step.cpu_text(),
                );
                if ok || attempt >= search.step_retries {
                    break (step, ok);
                }
                attempt += 1;
            };
            if ok {
                good = Some(step);
            } else {
                bad = Some(rate);
                first_bad_harness_bound.get_or_insert(step.harness_bound());
                last_bad_harness_bound = Some(step.harness_bound());
            }
            let low = good.as_ref().map(|s| s.rate).unwrap_or(0.0);
            rate = match bad {
                None => rate * 2.0,
                Some(high) if high - low <= high * 0.05 => break,
                Some(high) => (low + high) / 2.0,
            };
            if rate < 1.0 {
                break;
            }
        }
        self.out["search"] = json!(trail);
        self.out["rate_max"] = json!(good.as_ref().map(|s| s.rate));
        // A harness at its limit at the best rate, or at a rate that
        // missed, may be what stopped the search: the maximum is then a
        // lower bound of the server's.
        self.out["rate_max_harness_bound"] = json!(
            good.as_ref().is_some_and(Step::harness_bound)
                || first_bad_harness_bound == Some(true)
                || last_bad_harness_bound == Some(true)
        );
        good.ok_or_else(|| {
            anyhow::anyhow!(
                "no rate met the bound (delivered in full, p99 under {} ms)",
                search.p99_max_ms
            )
        })
    }

    fn p2p(mut self, args: &P2pArgs, churn_per_s: f64) -> anyhow::Result<()> {
        self.connect_all(Subset::All)?;
        let step = if args.rate == "max" {
            let duration = args.step_duration;
            self.search(&args.search(), |run, rate| {
                run.p2p_step(args, rate, duration, churn_per_s)
            })?
        } else {
            let rate: f64 = args.rate.parse().context("--rate is a number or `max`")?;
            self.fleet.set_phase("p2p");
            self.p2p_step(args, rate, self.common.duration, churn_per_s)?
        };
        let r = &step.result;
        self.out["duration_s"] = json!(step.duration);
        self.out["payload_bytes"] = json!(args.payload);
        self.out["messages"] = json!({"offered": r.offered, "sent": r.sent, "skipped": r.skipped, "acked": r.acked,
            "delivered": r.delivered, "receipts": r.receipts, "duplicates": r.duplicates, "errors": r.errors});
        self.out["rates"]["offered_msgs_per_s"] = json!(r.offered as f64 / step.duration);
        self.out["rates"]["delivered_msgs_per_s"] =
            json!(r.delivered as f64 / r.elapsed_s.max(step.duration));
        self.out["cpu"] = step.cpu_json();
        for (name, latency) in step.chain.named() {
            self.out["latency_us"][name] = report::summary_json(&latency.summary());
        }
        if self.target.protocol == Protocol::Mqtt && !self.common.mqtt_receipts {
            self.out["latency_us"]["receipt_note"] =
                json!("MQTT has no delivered receipt; count stays 0 (see --mqtt-receipts)");
        }
        if churn_per_s > 0.0 {
            self.out["churn_per_s"] = json!(churn_per_s);
            self.out["reconnects"] = json!(r.reconnects);
            self.out["latency_us"]["reconnect"] = report::summary_json(&step.reconnect.summary());
        }
        let sample = sysmem::sample(self.server_pid)?;
        self.out["server"]["rss_bytes"] = json!(sample.server_rss_bytes);
        let seconds: Vec<Second> = step.seconds.values().cloned().collect();
        self.out["timeline"] = json!(seconds
            .iter()
            .map(|s| json!({"second": s.second, "delivered": s.delivered,
            "deliver_p50_us": s.deliver.summary().p50, "deliver_p99_us": s.deliver.summary().p99}))
            .collect::<Vec<_>>());
        let chain = step.chain.clone();
        let reconnect = step.reconnect.clone();
        let mut histograms = chain.named().to_vec();
        histograms.push(("reconnect", &reconnect));
        self.finish(&histograms, &seconds)
    }

    /// Each worker's view of the group plan, in worker order.
    fn local_groups(&self, plan: &GroupPlan) -> Vec<LocalGroups> {
        let mut first = 0u64;
        self.split
            .users_per_process
            .iter()
            .map(|&share| {
                let local = plan.local(first, share as usize);
                first += share;
                local
            })
            .collect()
    }

    /// Switchboard: every group's sender creates it on its session, then
    /// every member device gets its "group created" message. Writes
    /// `groups.created`, `create_s`, `group_events`, `group_events_s`.
    fn create_groups(&mut self, plan: &GroupPlan, locals: &[LocalGroups]) -> anyhow::Result<()> {
        self.fleet.set_phase("create groups");
        let mut first = 0u64;
        for (i, local) in locals.iter().enumerate() {
            let mut creators: Vec<CreatorOrder> = Vec::new();
            for sender in &local.sends {
                let group = sender.group;
                let creator = first + sender.local as u64;
                let sender_index = plan.sender_index(group);
                let member_user_ids = (0..plan.members)
                    .filter(|&j| j != sender_index)
                    .map(|j| {
                        let user = &self.users[plan.member(group, j) as usize];
                        user.account.as_ref().expect("every user registered").user
                    })
                    .collect();
                let order = GroupOrder {
                    group,
                    member_user_ids,
                };
                match creators.last_mut() {
                    Some(last) if last.user_index == creator => last.groups.push(order),
                    _ => creators.push(CreatorOrder {
                        user_index: creator,
                        groups: vec![order],
                    }),
                }
            }
            first += self.split.users_per_process[i];
            self.fleet.send(i, &Command::CreateGroups { creators })?;
        }
        let (mut created, mut create_s) = (0, 0f64);
        for answer in self.fleet.collect(self.timeout(), TIMEOUT_BOUND)? {
            if let Report::GroupsCreated {
                created: c,
                elapsed_s,
            } = answer
            {
                created += c;
                create_s = create_s.max(elapsed_s);
            }
        }
        self.fleet.set_phase("group events");
        self.fleet.broadcast(&Command::AwaitGroupEvents)?;
        let (mut events, mut expected, mut events_s) = (0, 0, 0f64);
        for answer in self.fleet.collect(self.timeout(), TIMEOUT_BOUND)? {
            if let Report::GroupEvents {
                events: e,
                expected: x,
                elapsed_s,
            } = answer
            {
                events += e;
                expected += x;
                events_s = events_s.max(elapsed_s);
            }
        }
        eprintln!(
            "created {created} groups in {create_s:.3} s; {events} of {expected} \"group created\" \
             messages in {:.3} s more",
            events_s
        );
        let groups = &mut self.out["groups"];
        groups["created"] = json!(created);
        groups["create_s"] = json!(create_s);
        groups["group_events"] = json!(events);
        groups["group_events_expected"] = json!(expected);
        groups["group_events_s"] = json!(events_s);
        Ok(())
    }

    /// One group step: `rate` group messages per second for `duration` s
    /// over all groups.
    fn group_step(
        &mut self,
        args: &GroupArgs,
        plan: &GroupPlan,
        locals: &[LocalGroups],
        rate: f64,
        duration: f64,
    ) -> anyhow::Result<Step> {
        let offered = group::offered_per_group(plan, locals, rate, duration);
        self.step(
            rate,
            duration,
            args.drain_timeout,
            plan.deliveries_per_message(),
            |worker, start_at_ns| {
                let local = &locals[worker];
                Command::GroupStep(GroupStep {
                    rate_per_s: group::worker_rate_per_s(plan, local, rate),
                    messages: group::worker_messages(plan, local, rate, duration),
                    duration_s: duration,
                    payload_bytes: args.payload,
                    start_at_ns,
                    drain_timeout_s: args.drain_timeout,
                    deliveries_expected: group::deliveries_expected(local, &offered),
                })
            },
        )
    }

    /// The group scenario: connect every user, create the groups
    /// (Switchboard), then one step at `--rate` or a `--rate max` search.
    fn group(mut self, args: &GroupArgs) -> anyhow::Result<()> {
        let plan = self.groups.expect("the group scenario starts with a plan");
        let locals = self.local_groups(&plan);
        self.out["groups"] = json!({
            "groups": plan.groups,
            "members": plan.members,
            "users": plan.users,
            "memberships_per_user": plan.memberships_per_user(),
            "deliveries_per_msg": plan.deliveries_per_message(),
            "created": null,
        });
        self.connect_all(Subset::All)?;
        if self.target.protocol == Protocol::Switchboard {
            self.create_groups(&plan, &locals)?;
        }
        let step = if args.rate == "max" {
            let duration = args.step_duration;
            self.search(&args.search(), |run, rate| {
                run.group_step(args, &plan, &locals, rate, duration)
            })?
        } else {
            let rate: f64 = args.rate.parse().context("--rate is a number or `max`")?;
            self.fleet.set_phase("group");
            self.group_step(args, &plan, &locals, rate, self.common.duration)?
        };
        let r = &step.result;
        let expected = step.deliveries_expected();
        let receipts_expected = match self.target.protocol {
            Protocol::Switchboard => expected,
            Protocol::Mqtt => 0,
        };
        self.out["duration_s"] = json!(step.duration);
        self.out["payload_bytes"] = json!(args.payload);
        self.out["messages"] = json!({"offered": r.offered, "sent": r.sent, "skipped": r.skipped,
            "acked": r.acked, "errors": r.errors, "deliveries_expected": expected,
            "delivered": r.delivered, "missing": expected.saturating_sub(r.delivered),
            "duplicates": r.duplicates, "receipts": r.receipts, "receipts_expected": receipts_expected});
        let rates = &mut self.out["rates"];
        rates["offered_msgs_per_s"] = json!(r.offered as f64 / step.duration);
        rates["sent_msgs_per_s"] = json!(r.sent as f64 / r.send_s.max(step.duration));
        // A group's rates count group messages; its deliveries are below.
        rates["delivered_msgs_per_s"] = Value::Null;
        rates["fanout_deliveries_per_s"] =
            json!(r.delivered as f64 / r.elapsed_s.max(step.duration));
        rates["deliveries_per_server_core_s"] = json!(step.deliveries_per_server_core_s());
        self.out["cpu"] = step.cpu_json();
        if let Some(cpu) = step.cpu {
            self.out["cpu"]["server_us_per_group_msg"] = json!(cpu
                .server_cores
                .filter(|_| r.sent > 0)
                .map(|cores| cores * cpu.span_s * 1e6 / r.sent as f64));
        }
        for (name, latency) in step.chain.named() {
            self.out["latency_us"][name] = report::summary_json(&latency.summary());
        }
        if self.target.protocol == Protocol::Mqtt {
            self.out["latency_us"]["receipt_note"] =
                json!("MQTT has no delivered receipt; count stays 0");
        }
        let sample = sysmem::sample(self.server_pid)?;
        self.out["server"]["rss_bytes"] = json!(sample.server_rss_bytes);
        let seconds: Vec<Second> = step.seconds.values().cloned().collect();
        self.out["timeline"] = json!(seconds
            .iter()
            .map(|s| json!({"second": s.second, "delivered": s.delivered,
            "deliver_p50_us": s.deliver.summary().p50, "deliver_p99_us": s.deliver.summary().p99}))
            .collect::<Vec<_>>());
        let chain = step.chain.clone();
        self.finish(&chain.named(), &seconds)
    }

    fn offline(mut self, args: &OfflineArgs) -> anyhow::Result<()> {
        if self.target.protocol == Protocol::Mqtt {
            // MQTT queues only for a session that exists and is subscribed.
            self.connect_all(Subset::Recipients)?;
            self.fleet.broadcast(&Command::Disconnect {
                subset: Subset::Recipients,
            })?;
            self.fleet.collect(self.timeout(), TIMEOUT_BOUND)?;
        }
        self.connect_all(Subset::Senders)?;
        self.fleet.set_phase("queue");
        self.fleet.broadcast(&Command::Burst {
            per_user: args.per_user,
            payload_bytes: args.payload,
        })?;
        let (mut sent, mut acked, mut queue_s) = (0, 0, 0f64);
        for answer in self.fleet.collect(self.timeout(), TIMEOUT_BOUND)? {
            if let Report::BurstDone {
                sent: s,
                acked: a,
                elapsed_s,
            } = answer
            {
                sent += s;
                acked += a;
                queue_s = queue_s.max(elapsed_s);
            }
        }
        self.fleet.set_phase("drain");
        let mut expected_per_worker = Vec::new();
        for share in &self.split.users_per_process {
            expected_per_worker.push(share / 2 * args.per_user);
        }
        for (i, expected) in expected_per_worker.iter().enumerate() {
            self.fleet.send(
                i,
                &Command::Drain {
                    expected: *expected,
                },
            )?;
        }
        let (mut delivered, mut drain_s, mut connect_s) = (0, 0f64, 0f64);
        for answer in self.fleet.collect(self.timeout(), TIMEOUT_BOUND)? {
            if let Report::Drained {
                delivered: d,
                elapsed_s,
                connect_s: c,
            } = answer
            {
                delivered += d;
                drain_s = drain_s.max(elapsed_s);
                connect_s = connect_s.max(c);
            }
        }
        self.out["duration_s"] = json!(drain_s);
        self.out["payload_bytes"] = json!(args.payload);
        self.out["messages"] = json!({"offered": args.per_user * (self.users.len() as u64 / 2), "sent": sent, "acked": acked, "delivered": delivered});
        self.out["offline"] = json!({"per_user": args.per_user, "users": self.users.len() / 2, "queue_s": queue_s, "reconnect_s": connect_s, "drain_s": drain_s});
        self.out["rates"]["queue_msgs_per_s"] = json!(acked as f64 / queue_s.max(1e-9));
        self.out["rates"]["drain_msgs_per_s"] = json!(delivered as f64 / drain_s.max(1e-9));
        self.out["rates"]["delivered_msgs_per_s"] = json!(delivered as f64 / drain_s.max(1e-9));
        let sample = sysmem::sample(self.server_pid)?;
        self.out["server"]["rss_bytes"] = json!(sample.server_rss_bytes);
        self.finish(&[], &[])
    }

    fn finish(self, histograms: &[(&str, &Latency)], seconds: &[Second]) -> anyhow::Result<()> {
        let Run {
            fleet,
            mut out,
            common,
            scenario,
            users,
            ..
        } = self;
        // The load generator's own footprint, while it still holds its links.
        let worker_rss_bytes = fleet.worker_rss_bytes();
        out["bench"] = json!({
            "processes": fleet.len(),
            "worker_rss_bytes": worker_rss_bytes,
            "worker_rss_bytes_per_conn": worker_rss_bytes as f64 / users.len().max(1) as f64,
        });
        fleet.finish();
        print!("{}", report::table(&out));
        if let Some(path) = &common.json {
            report::write_json(path, &out)?;
        }
        if let Some(dir) = &common.hgrm {
            report::write_hgrm(dir, histograms)?;
        }
        if let Some(path) = &common.plot {
            if seconds.is_empty() {
                eprintln!(
                    "--plot: the {scenario} scenario has no per-second timeline; nothing drawn"
                );
            } else {
                report::plot(
                    path,
                    &format!("{scenario} {}", out["target"].as_str().unwrap_or("")),
                    seconds,
                )?;
            }
        }
        Ok(())
    }
}

/// One p2p or group step merged over workers.
#[derive(Default)]
struct Step {
    rate: f64,
    duration: f64,
    /// Deliveries each sent message makes: 1 in p2p, the members but the
    /// sender in a group.
    deliveries_per_msg: u64,
    result: StepResult,
    chain: ChainLatency,
    reconnect: Latency,
    seconds: BTreeMap<u64, Second>,
    /// `None` when the span was empty.
    cpu: Option<StepCpu>,
}

impl Step {
    fn add(&mut self, r: &StepResult) -> anyhow::Result<()> {
        let t = &mut self.result;
        t.offered += r.offered;
        t.sent += r.sent;
        t.skipped += r.skipped;
        t.acked += r.acked;
        t.delivered += r.delivered;
        t.receipts += r.receipts;
        t.duplicates += r.duplicates;
        t.errors += r.errors;
        t.reconnects += r.reconnects;
        t.send_s = t.send_s.max(r.send_s);
        t.elapsed_s = t.elapsed_s.max(r.elapsed_s);
        self.chain.ack.add(&Latency::from_hex(&r.ack_hex)?);
        self.chain.deliver.add(&Latency::from_hex(&r.deliver_hex)?);
        self.chain.receipt.add(&Latency::from_hex(&r.receipt_hex)?);
        if !r.send_lag_hex.is_empty() {
            self.chain
                .send_lag
                .add(&Latency::from_hex(&r.send_lag_hex)?);
        }
        self.reconnect.add(&Latency::from_hex(&r.reconnect_hex)?);
        for point in &r.timeline {
            let second = self.seconds.entry(point.second).or_insert_with(|| Second {
                second: point.second,
                ..Default::default()
            });
            second.delivered += point.delivered;
            second.deliver.add(&Latency::from_hex(&point.deliver_hex)?);
        }
        Ok(())
    }

    /// Delivered in full (nothing skipped or missing) with p99 under the bound.
    fn ok(&self, p99_max_ms: f64) -> bool {
        let r = &self.result;
        r.offered > 0
            && r.sent == r.offered
            && r.delivered == r.offered * self.deliveries_per_msg
            && (self.chain.deliver.summary().p99 as f64) <= p99_max_ms * 1000.0
    }

    /// Deliveries every sent message should have made.
    fn deliveries_expected(&self) -> u64 {
        self.result.sent * self.deliveries_per_msg
    }

    /// The seconds the step's rates and CPU figures are taken over: from
    /// the scheduled start to the last delivery, at least the schedule, and
    /// at least the last send of a sender that fell behind it. Not the
    /// drain's wait for messages that never come.
    fn span_s(&self) -> f64 {
        let r = &self.result;
        r.elapsed_s.max(r.send_s).max(self.duration)
    }

    /// Deliveries per second of server CPU over the step (a core's worth of
    /// deliveries); `None` without the server's CPU time.
    fn deliveries_per_server_core_s(&self) -> Option<f64> {
        let cpu = self.cpu?;
        let server_s = cpu.server_cores? * cpu.span_s;
        (server_s > 0.0).then(|| self.result.delivered as f64 / server_s)
    }

    /// The step's counts for a progress line.
    fn counts_text(&self) -> String {
        let r = &self.result;
        let p99 = self.chain.deliver.summary().p99;
        if self.deliveries_per_msg == 1 {
            format!(
                "offered {} delivered {} p99 {p99} us",
                r.offered, r.delivered
            )
        } else {
            format!(
                "offered {} sent {} deliveries {} of {} p99 {p99} us",
                r.offered,
                r.sent,
                r.delivered,
                self.deliveries_expected()
            )
        }
    }

    /// Whether a harness thread was saturated during the step.
    fn harness_bound(&self) -> bool {
        self.cpu.is_some_and(|cpu| cpu.harness_bound)
    }

    /// The step's `cpu` object (null without figures).
    fn cpu_json(&self) -> Value {
        serde_json::to_value(self.cpu).expect("CPU figures serialize")
    }

    /// The CPU figures for a progress line.
    fn cpu_text(&self) -> String {
        let Some(cpu) = &self.cpu else {
            return "CPU not measured".to_string();
        };
        let server = match cpu.server_cores {
            Some(cores) => format!("server {cores:.2} cores"),
            None => "server CPU unknown".to_string(),
        };
        format!(
            "busiest harness thread {:.2} core, {server}",
            cpu.harness_busiest_cores
        )
    }
}

/// What the numbers were measured on.
fn machine() -> Value {
    let uname = nix::sys::utsname::uname().ok();
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "kernel": uname.as_ref().map(|u| u.release().to_string_lossy().into_owned()),
        "memory_bytes": memory_bytes,
        "bench_version": env!("CARGO_PKG_VERSION"),
        "unix_time_s": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}
