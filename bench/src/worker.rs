//! A worker process: one glommio executor holding a share of the users.
//!
//! The coordinator starts `switchboard-bench worker`, writes a [`WorkerSpec`]
//! line and then [`Command`] lines on its stdin, and reads [`Report`] lines
//! (JSON) from its stdout. Users come in pairs: local users `2i` and `2i+1`
//! are each other's peer, so a message never leaves its worker's executor.
//! In the group scenario (`WorkerSpec::groups`) users are members of groups
//! instead (`crate::group`), which may span worker processes: a member times
//! a delivery from the scheduled time in its payload whichever process sent
//! it, and the coordinator tells each worker how many deliveries to wait for.
//!
//! Per user the worker keeps the link, the scheduled send time of each
//! message still waiting for its ack or receipt, and the last message id
//! received (duplicates and messages left over from earlier runs are counted
//! apart). Every wait is bounded by the step's timeout.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context;
use glommio::{LocalExecutorBuilder, Placement};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::group::{GroupHeader, GroupPlan, LocalGroups, MemberSeen, SenderGroup};
use crate::latency::{monotonic_ns, ChainLatency, Latency, Schedule};
use crate::lean::{Lean, LeanLink};
use crate::limits::source_ip_for;
use crate::link::{
    explain, seconds, Account, Event, Link, PayloadHeader, Protocol, SwitchboardLink, Target, User,
};
use crate::mqtt::Subscriptions;

/// The first line a worker reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: u64,
    /// The process that started this worker, which it must not outlive.
    pub coordinator_pid: u32,
    pub target: Target,
    pub users: Vec<User>,
    pub source_ips: Vec<IpAddr>,
    pub timeout_s: f64,
    pub connect_concurrency: usize,
    pub ping_interval_s: f64,
    /// The group scenario's plan; `None`: users in pairs. The worker's users
    /// are consecutive global users.
    pub groups: Option<GroupPlan>,
    /// Users of this worker each user follows the presence of (the next
    /// ones in its list), at every login; 0: none.
    #[serde(default)]
    pub follow: u32,
    /// How this worker drives its links.
    #[serde(default)]
    pub engine: Engine,
    /// MQTT (lean engine, p2p): delivered receipts as PUBLISHes to the
    /// sender's topic (`LeanLink::with_mqtt_receipts`).
    #[serde(default)]
    pub mqtt_receipts: bool,
    /// SCHED_FIFO priority of the worker's loop; 0: an ordinary thread.
    #[serde(default)]
    pub realtime_priority: u8,
    /// Switchboard (lean engine, p2p): milliseconds an Ack owed only for
    /// Receipts waits for a frame the user sends anyway; 0: none waits.
    #[serde(default)]
    pub receipt_ack_delay_ms: u32,
}

/// How a worker drives its links: glommio tasks, or the lean engine's one
/// epoll loop (`crate::lean`; the p2p and group scenarios only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    #[default]
    Glommio,
    Lean,
}

/// Which users a command applies to: senders are the even local users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subset {
    All,
    Senders,
    Recipients,
}

impl Subset {
    fn contains(self, local: usize) -> bool {
        match self {
            Subset::All => true,
            Subset::Senders => local & 1 == 0,
            Subset::Recipients => local % 2 == 1,
        }
    }
}

/// One open-loop p2p step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct P2pStep {
    /// This worker's share of the offered rate, messages per second.
    pub rate_per_s: f64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    /// `CLOCK_MONOTONIC` time of the first scheduled send.
    pub start_at_ns: u64,
    /// How long to wait after the last send for acks, deliveries, receipts.
    pub drain_timeout_s: f64,
    /// Disconnects and reconnects per second (this worker's share), 0: none.
    pub churn_per_s: f64,
}

/// One open-loop step of the group scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStep {
    /// Group messages per second over the groups this worker sends for
    /// (`group::worker_rate_per_s`).
    pub rate_per_s: f64,
    /// Messages the worker's schedule holds (`group::worker_messages`).
    pub messages: u64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    /// `CLOCK_MONOTONIC` time of the first scheduled send.
    pub start_at_ns: u64,
    /// How long to wait after the last send for acks, deliveries, receipts.
    pub drain_timeout_s: f64,
    /// Deliveries this worker's members get when every offered message of
    /// the step is sent, from every worker (`group::deliveries_expected`).
    pub deliveries_expected: u64,
}

/// The groups one user creates (Switchboard).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatorOrder {
    /// The creator's global user index.
    pub user_index: u64,
    pub groups: Vec<GroupOrder>,
}

/// One group to create.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupOrder {
    pub group: u32,
    /// Account ids of the members other than the creator.
    pub member_user_ids: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Create accounts for users that have none (Switchboard).
    Register,
    Connect {
        subset: Subset,
    },
    Disconnect {
        subset: Subset,
    },
    P2p(P2pStep),
    /// Each sender queues `per_user` messages to its peer and waits for the
    /// acks (the peer is offline).
    Burst {
        per_user: u64,
        payload_bytes: usize,
    },
    /// Connect the recipients and wait for `expected` deliveries.
    Drain {
        expected: u64,
    },
    /// Create the groups of these creators on their sessions (Switchboard;
    /// after `connect`) and wait for the answers.
    CreateGroups {
        creators: Vec<CreatorOrder>,
    },
    /// Wait until every member device has its "group created" message.
    AwaitGroupEvents,
    GroupStep(GroupStep),
    Quit,
}

impl Command {
    /// The command's name on the wire (its `cmd`), for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Register => "register",
            Command::Connect { .. } => "connect",
            Command::Disconnect { .. } => "disconnect",
            Command::P2p(_) => "p2p",
            Command::Burst { .. } => "burst",
            Command::Drain { .. } => "drain",
            Command::CreateGroups { .. } => "create_groups",
            Command::AwaitGroupEvents => "await_group_events",
            Command::GroupStep(_) => "group_step",
            Command::Quit => "quit",
        }
    }
}

/// Running totals, reported every half second.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub connected: u64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub receipts: u64,
    pub duplicates: u64,
    pub errors: u64,
    /// System messages about groups (created, changed) received.
    pub group_events: u64,
}

/// Deliveries and their latency in one second of a step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelinePoint {
    pub second: u64,
    pub delivered: u64,
    pub deliver_hex: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepResult {
    /// Messages the schedule held.
    pub offered: u64,
    pub sent: u64,
    /// Scheduled while the sender was reconnecting (churn), not sent.
    pub skipped: u64,
    pub acked: u64,
    pub delivered: u64,
    pub receipts: u64,
    pub duplicates: u64,
    pub errors: u64,
    pub ack_hex: String,
    pub deliver_hex: String,
    pub receipt_hex: String,
    /// `ChainLatency::send_lag`, hex (absent from older workers).
    #[serde(default)]
    pub send_lag_hex: String,
    pub reconnects: u64,
    pub reconnect_hex: String,
    /// Seconds from the scheduled start to the last send.
    pub send_s: f64,
    /// Seconds from the scheduled start until everything was in (or the
    /// drain timeout).
    pub elapsed_s: f64,
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    Progress(Counters),
    Registered {
        accounts: Vec<(u64, Account)>,
        elapsed_s: f64,
    },
    Connected {
        connected: u64,
        failed: u64,
        elapsed_s: f64,
        handshake_hex: String,
    },
    Disconnected,
    Step(StepResult),
    BurstDone {
        sent: u64,
        acked: u64,
        elapsed_s: f64,
    },
    Drained {
        delivered: u64,
        elapsed_s: f64,
        connect_s: f64,
    },
    GroupsCreated {
        created: u64,
        elapsed_s: f64,
    },
    GroupEvents {
        events: u64,
        expected: u64,
        elapsed_s: f64,
    },
    Failed {
        error: String,
    },
}

fn emit(report: &Report) {
    let line = serde_json::to_string(report).expect("reports serialize");
    let mut out = std::io::stdout().lock();
    // A coordinator that went away ends this worker at its next command.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Slot {
    local: usize,
    user: RefCell<User>,
    link: RefCell<Option<Rc<Link>>>,
    reconnecting: Cell<bool>,
    next_msg_id: Cell<u64>,
    /// Message id → scheduled send time, until its receipt (Switchboard) or
    /// ack (MQTT) is in.
    pending: RefCell<HashMap<u64, u64>>,
    last_received_msg_id: Cell<u64>,
    ack_due: Cell<u64>,
    /// The highest Receipt sequence whose Ack is held
    /// (`--receipt-ack-delay-ms`); 0: none is.
    receipt_ack_held: Cell<u64>,
    /// How many Receipts that Ack covers.
    receipt_acks_held_count: Cell<u32>,
    /// When the held Ack must go out at the latest (`CLOCK_MONOTONIC` ns;
    /// 0: none is held): an entry of `Worker::receipt_acks_held` with
    /// another deadline belongs to a hold that already ended.
    receipt_ack_deadline: Cell<u64>,
    /// Group messages this user sent, until acked and (Switchboard) every
    /// member's receipt is in.
    group_pending: RefCell<HashMap<u64, GroupPending>>,
    /// The last message seen from each group the user receives from.
    group_seen: RefCell<MemberSeen>,
}

impl Slot {
    /// The held Receipt Ack's sequence (0: none), no longer held.
    fn take_receipt_ack(&self) -> u64 {
        self.receipt_acks_held_count.set(0);
        self.receipt_ack_deadline.set(0);
        self.receipt_ack_held.replace(0)
    }
}

/// A group message waiting for its ack and its members' receipts.
#[derive(Clone, Copy, Debug)]
struct GroupPending {
    scheduled_ns: u64,
    acked: bool,
    receipts_left: u64,
}

/// The worker's share of the group scenario.
struct GroupState {
    plan: GroupPlan,
    local: LocalGroups,
    /// The server's id of each group of `local.sends`, in that order
    /// (Switchboard, once created; 0 for MQTT).
    ids: RefCell<Vec<u64>>,
    /// CreateGroup requests not answered yet.
    creates_left: Cell<u64>,
    /// The first CreateGroup the server refused: which and why.
    create_refusal: RefCell<Option<String>>,
}

impl GroupState {
    /// The sender and server group id of this worker's `k`-th group
    /// message: message `k` goes to the `k mod n`-th of its `n` sends.
    fn kth_send(&self, k: u64) -> (SenderGroup, u64) {
        let at = (k % self.local.sends.len() as u64) as usize;
        (self.local.sends[at], self.ids.borrow()[at])
    }

    /// Receipts the sender of a group message waits for: one per other
    /// member's device (Switchboard; MQTT has none).
    fn receipts_per_message(&self, protocol: Protocol) -> u64 {
        match protocol {
            Protocol::Switchboard => self.plan.deliveries_per_message(),
            Protocol::Mqtt => 0,
        }
    }
}

#[derive(Default)]
struct Stats {
    chain: ChainLatency,
    reconnect: Latency,
    timeline: Vec<(u64, Latency)>,
    step_start_ns: u64,
    last_delivery_ns: u64,
}

struct Worker {
    spec: WorkerSpec,
    slots: Vec<Rc<Slot>>,
    groups: Option<GroupState>,
    counters: Cell<Counters>,
    stats: RefCell<Stats>,
    timeout: Duration,
    errors_printed: Cell<u64>,
    /// The lean engine's links (`Engine::Lean`).
    lean: RefCell<Option<Lean>>,
    /// Slots holding a Receipt's Ack, oldest first, with when it must go
    /// out at the latest (`CLOCK_MONOTONIC` ns; `--receipt-ack-delay-ms`).
    /// One entry per hold, removed once its time is up, so it holds at most
    /// the holds begun in the last delay; an entry whose hold ended (its
    /// Ack went out with another frame) is skipped.
    receipt_acks_held: RefCell<VecDeque<(u64, usize)>>,
    /// Receipts a slot may hold unacknowledged: half the smallest delivery
    /// window a Welcome announced, so held Acks never stall a delivery.
    receipt_acks_hold_max: Cell<u32>,
}

/// Errors a worker prints; the rest are only counted (`errors`), so a dead
/// server does not print one line per connection.
const ERRORS_PRINTED_MAX: u64 = 10;

impl Worker {
    /// Holds the Ack of Receipt `sequence` on `slot` until the slot sends
    /// something anyway, or `--receipt-ack-delay-ms` after `now`.
    fn hold_receipt_ack(&self, slot: &Slot, sequence: u64, now: u64) {
        let held = slot.receipt_ack_held.get();
        slot.receipt_ack_held.set(held.max(sequence));
        slot.receipt_acks_held_count
            .set(slot.receipt_acks_held_count.get() + 1);
        if slot.receipt_acks_held_count.get() >= self.receipt_acks_hold_max.get() {
            // Half the window is held: the Ack goes out this turn.
            slot.ack_due
                .set(slot.ack_due.get().max(slot.receipt_ack_held.get()));
        }
        if held == 0 {
            let deadline = now + u64::from(self.spec.receipt_ack_delay_ms) * 1_000_000;
            slot.receipt_ack_deadline.set(deadline);
            self.receipt_acks_held
                .borrow_mut()
                .push_back((deadline, slot.local));
        }
    }

    fn report_error(&self, what: std::fmt::Arguments<'_>) {
        let printed = self.errors_printed.get();
        if printed < ERRORS_PRINTED_MAX {
            eprintln!("worker {}: {what}", self.spec.worker);
        } else if printed == ERRORS_PRINTED_MAX {
            eprintln!(
                "worker {}: further errors are only counted",
                self.spec.worker
            );
        }
        self.errors_printed.set(printed + 1);
    }

    fn bump(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    fn peer(&self, slot: &Slot) -> Rc<Slot> {
        self.slots[slot.local ^ 1].clone()
    }

    fn bind_ip(&self, slot: &Slot) -> Option<IpAddr> {
        source_ip_for(slot.user.borrow().index, &self.spec.source_ips)
    }

    fn receipts_expected(&self) -> bool {
        self.spec.target.protocol == Protocol::Switchboard || self.spec.mqtt_receipts
    }

    /// What `slot`'s MQTT session subscribes to.
    fn subscriptions(&self, slot: &Slot) -> Subscriptions {
        match &self.groups {
            Some(groups) => Subscriptions::Groups(groups.local.receives[slot.local].clone()),
            None => Subscriptions::Own,
        }
    }

    /// Counts and reports (the first few) message `msg_id` of `slot` that
    /// the server refused.
    fn refused(&self, slot: &Slot, msg_id: u64, code: &str) {
        self.bump(|c| c.errors += 1);
        let index = slot.user.borrow().index;
        self.report_error(format_args!(
            "user {index}: message {msg_id} refused: {code}"
        ));
    }

    /// Notes that a message scheduled at `scheduled_ns` is being queued
    /// now (`ChainLatency::send_lag`).
    fn note_send(&self, scheduled_ns: u64) {
        let now = monotonic_ns();
        self.stats
            .borrow_mut()
            .chain
            .send_lag
            .record(scheduled_ns, now);
    }

    /// Counts a delivery of a message scheduled at `scheduled_ns`, seen at
    /// `now`, in the step's latency and timeline.
    fn record_delivery(&self, scheduled_ns: u64, now: u64) {
        let mut stats = self.stats.borrow_mut();
        stats.chain.deliver.record(scheduled_ns, now);
        let second = now.saturating_sub(stats.step_start_ns) / 1_000_000_000;
        if let Some((_, latency)) = stats.timeline.last_mut().filter(|(s, _)| *s == second) {
            latency.record(scheduled_ns, now);
        } else if stats.timeline.len() < 100_000 {
            let mut latency = Latency::default();
            latency.record(scheduled_ns, now);
            stats.timeline.push((second, latency));
        }
        stats.last_delivery_ns = now;
        drop(stats);
        self.bump(|c| c.delivered += 1);
    }
}

/// Runs a worker on this thread until `Quit` or the end of stdin.
pub fn run() -> anyhow::Result<()> {
    // The coordinator blocks its stop signals in every thread, and a blocked
    // mask survives exec: unblock them so Ctrl-C and kill end a worker.
    crate::reaper::stop_signals()
        .thread_unblock()
        .context("unblocking SIGINT, SIGTERM, SIGHUP")?;
    // Die with the coordinator however it ends, even by SIGKILL, so no worker
    // outlives it holding connections to the server.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("asking for SIGKILL on the coordinator's death")?;
    let mut first = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut first)
        .context("reading the worker spec")?;
    let spec: WorkerSpec = serde_json::from_str(&first).context("parsing the worker spec")?;
    // The coordinator may have died before the request above took effect,
    // and then this worker was handed to another parent.
    let parent = nix::unistd::getppid().as_raw();
    if u32::try_from(parent).ok() != Some(spec.coordinator_pid) {
        anyhow::bail!(
            "worker {}: the coordinator (pid {}) exited before the worker started",
            spec.worker,
            spec.coordinator_pid
        );
    }
    crate::limits::raise_nofile();
    // Unbound: the operator pins the whole load generator with taskset, away
    // from the server's CPUs; the executor stays on whatever CPU it is given.
    let executor = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-worker")
        .make()
        .map_err(|e| anyhow::anyhow!("starting the executor: {e}"))?;
    // This thread runs the executor, so the whole worker loop.
    if spec.realtime_priority > 0 {
        if let Err(error) =
            switchboard::shard::server::sched_fifo_this_thread(spec.realtime_priority)
        {
            eprintln!(
                "worker {}: --realtime-priority {}: {error} (the worker runs as an ordinary thread)",
                spec.worker, spec.realtime_priority,
            );
        }
    }
    executor.run(async move {
        if let Err(error) = serve(spec).await {
            emit(&Report::Failed {
                error: format!("{error:#}"),
            });
        }
    });
    Ok(())
}

async fn read_command() -> anyhow::Result<Option<Command>> {
    let line = glommio::executor()
        .spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map(|_| line)
        })
        .await?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(&line).context("parsing a command")?,
    ))
}

async fn serve(spec: WorkerSpec) -> anyhow::Result<()> {
    // Group members hear from senders in other processes: one base for all.
    let msg_id_base = match &spec.groups {
        Some(plan) => plan.msg_id_base,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64 * 1000)
            .unwrap_or(1),
    };
    let groups = spec.groups.map(|plan| {
        let first = spec.users.first().map_or(0, |u| u.index);
        assert!(
            spec.users
                .iter()
                .enumerate()
                .all(|(i, u)| u.index == first + i as u64),
            "the coordinator hands a worker consecutive users"
        );
        let local = plan.local(first, spec.users.len());
        GroupState {
            plan,
            ids: RefCell::new(vec![0; local.sends.len()]),
            local,
            creates_left: Cell::new(0),
            create_refusal: RefCell::new(None),
        }
    });
    let slots: Vec<Rc<Slot>> = spec
        .users
        .iter()
        .enumerate()
        .map(|(local, user)| {
            let group_seen = match &groups {
                Some(g) => MemberSeen::new(&g.local.receives[local], &g.plan),
                None => MemberSeen::default(),
            };
            Rc::new(Slot {
                local,
                user: RefCell::new(user.clone()),
                link: RefCell::new(None),
                reconnecting: Cell::new(false),
                next_msg_id: Cell::new(msg_id_base),
                pending: RefCell::new(HashMap::new()),
                last_received_msg_id: Cell::new(msg_id_base - 1),
                ack_due: Cell::new(0),
                receipt_ack_held: Cell::new(0),
                receipt_acks_held_count: Cell::new(0),
                receipt_ack_deadline: Cell::new(0),
                group_pending: RefCell::new(HashMap::new()),
                group_seen: RefCell::new(group_seen),
            })
        })
        .collect();
    let spec_engine = spec.engine;
    let slot_count = slots.len();
    let worker = Rc::new(Worker {
        timeout: Duration::from_secs_f64(spec.timeout_s),
        spec,
        slots,
        groups,
        counters: Cell::new(Counters::default()),
        stats: RefCell::new(Stats::default()),
        errors_printed: Cell::new(0),
        lean: RefCell::new(match spec_engine {
            Engine::Lean => Some(Lean::new(slot_count)?),
            Engine::Glommio => None,
        }),
        receipt_acks_held: RefCell::new(VecDeque::new()),
        receipt_acks_hold_max: Cell::new(u32::MAX),
    });
    let done = Rc::new(Cell::new(false));
    let progress = glommio::spawn_local({
        let worker = worker.clone();
        let done = done.clone();
        async move {
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(500)).await;
                emit(&Report::Progress(worker.counters.get()));
            }
        }
    })
    .detach();
    let pinger = glommio::spawn_local({
        let worker = worker.clone();
        let done = done.clone();
        async move {
            let mut nonce = 0;
            let interval = Duration::from_secs_f64(worker.spec.ping_interval_s);
            let mut since = std::time::Instant::now();
            while !done.get() {
                glommio::timer::sleep(Duration::from_millis(250)).await;
                if since.elapsed() < interval {
                    continue;
                }
                since = std::time::Instant::now();
                for slot in &worker.slots {
                    let link = slot.link.borrow().clone();
                    if let Some(link) = link {
                        nonce += 1;
                        link.ping(nonce);
                        let _ = link.flush().await;
                    }
                }
            }
        }
    })
    .detach();
    let lean = worker.spec.engine == Engine::Lean;
    while let Some(command) = read_command().await? {
        match command {
            Command::Quit => break,
            Command::Connect { subset } if lean => lean_connect(&worker, subset)?,
            Command::Disconnect { subset } if lean => {
                let mut links = worker.lean.borrow_mut();
                let links = links.as_mut().expect("the lean engine's links");
                for slot in worker.slots.iter().filter(|s| subset.contains(s.local)) {
                    if links.close(slot.local) {
                        worker.bump(|c| c.connected -= 1);
                    }
                }
                emit(&Report::Disconnected);
            }
            Command::P2p(step) if lean => {
                let result = lean_p2p(&worker, &step);
                emit(&Report::Step(result));
            }
            Command::CreateGroups { creators } if lean => lean_create_groups(&worker, creators)?,
            Command::AwaitGroupEvents if lean => lean_await_group_events(&worker),
            Command::GroupStep(step) if lean => {
                let result = lean_group_step(&worker, &step);
                emit(&Report::Step(result));
            }
            other @ (Command::Burst { .. } | Command::Drain { .. }) if lean => {
                anyhow::bail!("the lean engine does not run {}", other.name())
            }
            Command::Register => register(&worker).await?,
            Command::Connect { subset } => connect(&worker, subset).await?,
            Command::Disconnect { subset } => {
                for slot in worker.slots.iter().filter(|s| subset.contains(s.local)) {
                    let link = slot.link.borrow_mut().take();
                    if let Some(link) = link {
                        link.close().await;
                        worker.bump(|c| c.connected -= 1);
                    }
                }
                emit(&Report::Disconnected);
            }
            Command::P2p(step) => {
                let result = p2p(&worker, &step).await;
                emit(&Report::Step(result));
            }
            Command::Burst {
                per_user,
                payload_bytes,
            } => burst(&worker, per_user, payload_bytes).await,
            Command::Drain { expected } => drain(&worker, expected).await,
            Command::CreateGroups { creators } => create_groups(&worker, creators).await?,
            Command::AwaitGroupEvents => await_group_events(&worker).await,
            Command::GroupStep(step) => {
                let result = group_step(&worker, &step).await;
                emit(&Report::Step(result));
            }
        }
    }
    done.set(true);
    for slot in &worker.slots {
        let link = slot.link.borrow_mut().take();
        if let Some(link) = link {
            link.close().await;
        }
    }
    emit(&Report::Progress(worker.counters.get()));
    drop((progress, pinger));
    Ok(())
}

/// Runs `job` for every index in `indices`, `concurrency` at a time, and
/// starts no further job once `stop()` says so (the running ones finish,
/// each bounded by its own timeout). The number of jobs started.
async fn pool<F, Fut, S>(indices: Vec<usize>, concurrency: usize, stop: S, job: F) -> usize
where
    F: Fn(usize) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
    S: Fn() -> bool + 'static,
{
    let indices = Rc::new(indices);
    let next = Rc::new(Cell::new(0usize));
    let job = Rc::new(job);
    let stop = Rc::new(stop);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1).min(indices.len()) {
        let (indices, next, job, stop) = (indices.clone(), next.clone(), job.clone(), stop.clone());
        tasks.push(glommio::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= indices.len() || stop() {
                    break;
                }
                next.set(i + 1);
                job(indices[i]).await;
            }
        }));
    }
    for task in tasks {
        task.await;
    }
    next.get()
}

async fn register(worker: &Rc<Worker>) -> anyhow::Result<()> {
    let started = monotonic_ns();
    let missing: Vec<usize> = worker
        .slots
        .iter()
        .filter(|s| s.user.borrow().account.is_none())
        .map(|s| s.local)
        .collect();
    let attempts_max = missing.len();
    let mut tried = 0;
    let created = Rc::new(RefCell::new(Vec::new()));
    let failed = Rc::new(Cell::new(0usize));
    let first_error = Rc::new(RefCell::new(None::<anyhow::Error>));
    if worker.spec.target.protocol == Protocol::Switchboard {
        let (w, created2, failed2, first2) = (
            worker.clone(),
            created.clone(),
            failed.clone(),
            first_error.clone(),
        );
        // One failed registration fails the run, so no more are started:
        // against a port that never answers, each would wait out the timeout.
        let any_failed = {
            let failed = failed.clone();
            move || failed.get() > 0
        };
        let job = move |local: usize| {
            let (w, created, failed, first_error) =
                (w.clone(), created2.clone(), failed2.clone(), first2.clone());
            async move {
                let slot = w.slots[local].clone();
                // Registrations are short connections: the kernel picks
                // their source port at connect time, where ports in
                // TIME_WAIT are reused (loopback), so they never use up the
                // sessions' source addresses.
                match SwitchboardLink::register(&w.spec.target, None, w.timeout).await {
                    Ok(account) => {
                        slot.user.borrow_mut().account = Some(account.clone());
                        created
                            .borrow_mut()
                            .push((slot.user.borrow().index, account));
                    }
                    Err(error) => {
                        failed.set(failed.get() + 1);
                        first_error.borrow_mut().get_or_insert(error);
                    }
                }
            }
        };
        tried = pool(missing, worker.spec.connect_concurrency, any_failed, job).await;
    }
    let first_error = first_error.borrow_mut().take();
    if let Some(error) = first_error {
        let server = worker.spec.target.server;
        let hint = explain(&error, &worker.spec.target, worker.timeout).await;
        anyhow::bail!(
            "{} of {tried} registrations with {server} failed ({} not tried), the first: {error:#}{hint}",
            failed.get(),
            attempts_max - tried
        );
    }
    let accounts = created.borrow().clone();
    emit(&Report::Registered {
        accounts,
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
    });
    Ok(())
}

async fn open(worker: &Rc<Worker>, slot: &Rc<Slot>) -> anyhow::Result<()> {
    let user = slot.user.borrow().clone();
    let link = Link::connect(
        &worker.spec.target,
        &user,
        worker.bind_ip(slot),
        &worker.subscriptions(slot),
        worker.timeout,
    )
    .await?;
    let follow = worker.spec.follow as usize;
    if follow > 0 {
        let users = &worker.spec.users;
        let followed: Vec<u64> = (1..=follow.min(users.len().saturating_sub(1)))
            .filter_map(|k| users[(slot.local + k) % users.len()].account.as_ref())
            .map(|a| a.user)
            .collect();
        link.follow(&followed)?;
    }
    slot.link.replace(Some(link.clone()));
    worker.bump(|c| c.connected += 1);
    glommio::spawn_local(receive(worker.clone(), slot.clone(), link)).detach();
    Ok(())
}

/// Connects the users of `subset`; failures among successes are counted.
/// Fails when none connects, and starts no more once the timeout has passed
/// with none connected: against a port that never answers, each would wait
/// out the timeout again.
async fn connect(worker: &Rc<Worker>, subset: Subset) -> anyhow::Result<()> {
    let started = monotonic_ns();
    let indices: Vec<usize> = worker
        .slots
        .iter()
        .filter(|s| subset.contains(s.local) && s.link.borrow().is_none())
        .map(|s| s.local)
        .collect();
    let handshakes = Rc::new(RefCell::new(Latency::default()));
    let failed = Rc::new(Cell::new(0u64));
    let first_error = Rc::new(RefCell::new(None::<anyhow::Error>));
    let total = indices.len();
    let nothing_works = {
        let handshakes = handshakes.clone();
        let timeout_ns = worker.timeout.as_nanos() as u64;
        move || handshakes.borrow().count() == 0 && monotonic_ns() - started >= timeout_ns
    };
    let job = {
        let (w, h, f, e) = (
            worker.clone(),
            handshakes.clone(),
            failed.clone(),
            first_error.clone(),
        );
        move |local: usize| {
            let (w, h, f, e) = (w.clone(), h.clone(), f.clone(), e.clone());
            async move {
                let slot = w.slots[local].clone();
                let begin = monotonic_ns();
                match open(&w, &slot).await {
                    Ok(()) => h.borrow_mut().record(begin, monotonic_ns()),
                    Err(error) => {
                        f.set(f.get() + 1);
                        e.borrow_mut().get_or_insert(error);
                    }
                }
            }
        }
    };
    let tried = pool(indices, worker.spec.connect_concurrency, nothing_works, job).await;
    if handshakes.borrow().count() == 0 {
        let first_error = first_error.borrow_mut().take();
        if let Some(error) = first_error {
            let hint = explain(&error, &worker.spec.target, worker.timeout).await;
            anyhow::bail!(
                "none of {tried} connects to {} succeeded ({} not tried), the first error: {error:#}{hint}",
                worker.spec.target.server,
                total - tried
            );
        }
    }
    if let Some(error) = first_error.borrow().as_ref() {
        eprintln!(
            "worker {}: {} connects failed, the first: {error:#}",
            worker.spec.worker,
            failed.get()
        );
    }
    let handshake_hex = handshakes.borrow().to_hex();
    emit(&Report::Connected {
        connected: total as u64 - failed.get(),
        failed: failed.get(),
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
        handshake_hex,
    });
    Ok(())
}

/// The receiving task of one link: times acks, deliveries and receipts.
async fn receive(worker: Rc<Worker>, slot: Rc<Slot>, link: Rc<Link>) {
    let mut ready: Option<anyhow::Result<Event>> = None;
    loop {
        let next = match ready.take() {
            Some(next) => next,
            None => link.next_event().await,
        };
        let event = match next {
            Ok(event) => event,
            Err(error) => {
                let current = slot
                    .link
                    .borrow()
                    .as_ref()
                    .is_some_and(|l| Rc::ptr_eq(l, &link));
                if current {
                    worker.bump(|c| c.errors += 1);
                    let index = slot.user.borrow().index;
                    worker.report_error(format_args!("user {index}: {error:#}"));
                }
                break;
            }
        };
        let now = monotonic_ns();
        match (event, &worker.groups) {
            (Event::Closed, _) => break,
            (event, Some(groups)) => on_group_event(&worker, groups, &slot, event, now),
            (event, None) => on_pair_event(&worker, &slot, event, now),
        }
        // Answer once per burst of input, so acks of many deliveries share
        // one frame and one write.
        ready = link.ready_event().await;
        if ready.is_some() {
            continue;
        }
        let due = slot.ack_due.replace(0);
        if due > 0 {
            link.ack(due);
        }
        if link.flush().await.is_err() {
            break;
        }
    }
}

/// An ack, delivery or receipt of the p2p shape.
fn on_pair_event(worker: &Worker, slot: &Slot, event: Event, now: u64) {
    match event {
        Event::Ack { msg_id } => {
            let scheduled = if worker.receipts_expected() {
                slot.pending.borrow().get(&msg_id).copied()
            } else {
                slot.pending.borrow_mut().remove(&msg_id)
            };
            if let Some(scheduled) = scheduled {
                worker.stats.borrow_mut().chain.ack.record(scheduled, now);
                worker.bump(|c| c.acked += 1);
            }
        }
        Event::Deliver {
            sequence, payload, ..
        } => {
            if sequence > 0 {
                slot.ack_due.set(slot.ack_due.get().max(sequence));
            }
            let peer_index = worker.peer(slot).user.borrow().index;
            match PayloadHeader::decode(&payload) {
                Some(h)
                    if h.sender_index == peer_index
                        && h.msg_id > slot.last_received_msg_id.get() =>
                {
                    slot.last_received_msg_id.set(h.msg_id);
                    worker.record_delivery(h.scheduled_ns, now);
                }
                _ => worker.bump(|c| c.duplicates += 1),
            }
        }
        Event::Receipt { sequence, msg_ids } => {
            if worker.spec.receipt_ack_delay_ms > 0 {
                worker.hold_receipt_ack(slot, sequence, now);
            } else {
                slot.ack_due.set(slot.ack_due.get().max(sequence));
            }
            for msg_id in msg_ids {
                let scheduled = slot.pending.borrow_mut().remove(&msg_id);
                if let Some(scheduled) = scheduled {
                    worker
                        .stats
                        .borrow_mut()
                        .chain
                        .receipt
                        .record(scheduled, now);
                    worker.bump(|c| c.receipts += 1);
                }
            }
        }
        Event::Refused { msg_id, code } => {
            slot.pending.borrow_mut().remove(&msg_id);
            worker.refused(slot, msg_id, code);
        }
        Event::GroupCreated { request_id, .. } => worker.report_error(format_args!(
            "GroupInfo for request {request_id} outside the group scenario"
        )),
        Event::Closed => {}
    }
}

/// An ack, delivery or receipt of the group shape: a sender's message is
/// done once acked and every other member's receipt is in; a member counts
/// each group message once, and acknowledges the "group created" system
/// messages like any delivery.
fn on_group_event(worker: &Worker, groups: &GroupState, slot: &Slot, event: Event, now: u64) {
    match event {
        Event::Ack { msg_id } => {
            let mut pending = slot.group_pending.borrow_mut();
            let Some(entry) = pending.get_mut(&msg_id).filter(|e| !e.acked) else {
                return;
            };
            entry.acked = true;
            let scheduled = entry.scheduled_ns;
            if entry.receipts_left == 0 {
                pending.remove(&msg_id);
            }
            drop(pending);
            worker.stats.borrow_mut().chain.ack.record(scheduled, now);
            worker.bump(|c| c.acked += 1);
        }
        Event::Deliver {
            sequence,
            payload,
            group_event,
        } => {
            if sequence > 0 {
                slot.ack_due.set(slot.ack_due.get().max(sequence));
            }
            if group_event {
                worker.bump(|c| c.group_events += 1);
                return;
            }
            match GroupHeader::decode(&payload) {
                Some(h) if slot.group_seen.borrow_mut().take(&h) => {
                    worker.record_delivery(h.scheduled_ns, now)
                }
                _ => worker.bump(|c| c.duplicates += 1),
            }
        }
        Event::Receipt { sequence, msg_ids } => {
            slot.ack_due.set(slot.ack_due.get().max(sequence));
            let mut pending = slot.group_pending.borrow_mut();
            let mut stats = worker.stats.borrow_mut();
            let mut counted = 0;
            for msg_id in msg_ids {
                let Some(entry) = pending.get_mut(&msg_id).filter(|e| e.receipts_left > 0) else {
                    continue;
                };
                entry.receipts_left -= 1;
                stats.chain.receipt.record(entry.scheduled_ns, now);
                counted += 1;
                if entry.receipts_left == 0 && entry.acked {
                    pending.remove(&msg_id);
                }
            }
            drop((pending, stats));
            worker.bump(|c| c.receipts += counted);
        }
        Event::GroupCreated {
            request_id,
            group_id,
        } => {
            let at = request_id.checked_sub(1).and_then(|g| {
                let group = u32::try_from(g).ok()?;
                groups
                    .local
                    .sends
                    .binary_search_by_key(&group, |s| s.group)
                    .ok()
            });
            let Some(at) = at else {
                worker.report_error(format_args!(
                    "GroupInfo for request {request_id}, which this worker did not make"
                ));
                return;
            };
            let mut ids = groups.ids.borrow_mut();
            if ids[at] == 0 {
                ids[at] = group_id;
                groups
                    .creates_left
                    .set(groups.creates_left.get().saturating_sub(1));
            }
        }
        // Request ids (group index + 1) are far below message ids.
        Event::Refused { msg_id, code } if msg_id < groups.plan.msg_id_base => {
            groups.create_refusal.borrow_mut().get_or_insert_with(|| {
                format!("CreateGroup of group {}: {code}", msg_id.wrapping_sub(1))
            });
            groups
                .creates_left
                .set(groups.creates_left.get().saturating_sub(1));
            worker.bump(|c| c.errors += 1);
        }
        Event::Refused { msg_id, code } => {
            slot.group_pending.borrow_mut().remove(&msg_id);
            worker.refused(slot, msg_id, code);
        }
        Event::Closed => {}
    }
}

fn reset_stats(worker: &Worker, start_ns: u64) {
    let mut stats = worker.stats.borrow_mut();
    *stats = Stats::default();
    stats.step_start_ns = start_ns;
}

async fn sleep_until(deadline_ns: u64) {
    let now = monotonic_ns();
    if deadline_ns > now {
        glommio::timer::sleep(Duration::from_nanos(deadline_ns - now)).await;
    } else {
        futures_lite::future::yield_now().await;
    }
}

/// Queues message `msg_id` from `slot` to its peer; false when the sender is
/// not connected.
fn send_one(
    worker: &Worker,
    slot: &Slot,
    scheduled_ns: u64,
    payload_bytes: usize,
) -> Option<Rc<Link>> {
    let link = slot.link.borrow().clone()?;
    if slot.reconnecting.get() {
        return None;
    }
    let msg_id = slot.next_msg_id.get();
    slot.next_msg_id.set(msg_id + 1);
    let peer = worker.peer(slot);
    let header = PayloadHeader {
        sender_index: slot.user.borrow().index,
        msg_id,
        scheduled_ns,
    };
    slot.pending.borrow_mut().insert(msg_id, scheduled_ns);
    let peer_user = peer.user.borrow();
    if let Err(error) = link.send(&peer_user, msg_id, header.encode(payload_bytes)) {
        slot.pending.borrow_mut().remove(&msg_id);
        worker.report_error(format_args!("send: {error:#}"));
        return None;
    }
    worker.note_send(scheduled_ns);
    worker.bump(|c| c.sent += 1);
    Some(link)
}

/// Messages queued per sender loop turn before the links are flushed.
const SEND_BATCH_MAX: u64 = 1024;

async fn p2p(worker: &Rc<Worker>, step: &P2pStep) -> StepResult {
    let pairs = (worker.slots.len() / 2) as u64;
    let before = worker.counters.get();
    reset_stats(worker, step.start_at_ns);
    let mut result = StepResult::default();
    if pairs == 0 || step.rate_per_s <= 0.0 {
        return result;
    }
    let schedule = Schedule::new(step.start_at_ns, step.rate_per_s, step.duration_s);
    result.offered = schedule.count;
    let churn_done = Rc::new(Cell::new(false));
    let churn = (step.churn_per_s > 0.0).then(|| {
        glommio::spawn_local(churn_loop(
            worker.clone(),
            Schedule::new(step.start_at_ns, step.churn_per_s, step.duration_s),
            churn_done.clone(),
        ))
    });
    let mut k = 0u64;
    let mut dirty: Vec<Rc<Link>> = Vec::new();
    while k < schedule.count {
        sleep_until(schedule.due_ns(k)).await;
        let due = schedule.due_count(monotonic_ns()).min(k + SEND_BATCH_MAX);
        while k < due {
            let pair = k % pairs;
            let direction = (k / pairs) % 2;
            let slot = &worker.slots[(pair * 2 + direction) as usize];
            match send_one(worker, slot, schedule.due_ns(k), step.payload_bytes) {
                Some(link) => {
                    if !dirty.iter().any(|l| Rc::ptr_eq(l, &link)) {
                        dirty.push(link);
                    }
                }
                None => result.skipped += 1,
            }
            k += 1;
        }
        for link in dirty.drain(..) {
            let _ = link.flush().await;
        }
    }
    result.send_s = (monotonic_ns().saturating_sub(step.start_at_ns)) as f64 / 1e9;
    churn_done.set(true);
    if let Some(churn) = churn {
        churn.await;
    }
    // Wait for everything sent to come back, bounded.
    let deadline = monotonic_ns() + (step.drain_timeout_s * 1e9) as u64;
    while !drained(worker, &before, step, deadline) {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    finish_step(worker, &before, step.start_at_ns, &mut result);
    result
}

/// Whether a p2p step's drain is over: every message sent since `before`
/// acked, delivered and (Switchboard) receipted, or `deadline` passed, which
/// is reported with what is missing.
fn drained(worker: &Worker, before: &Counters, step: &P2pStep, deadline: u64) -> bool {
    let c = worker.counters.get();
    let sent = c.sent - before.sent;
    let complete = c.acked - before.acked >= sent
        && c.delivered - before.delivered >= sent
        && (!worker.receipts_expected() || c.receipts - before.receipts >= sent);
    if complete {
        return true;
    }
    if monotonic_ns() < deadline {
        return false;
    }
    let missing = |got: u64| sent.saturating_sub(got);
    let receipts_missing = if worker.receipts_expected() {
        missing(c.receipts - before.receipts)
    } else {
        0
    };
    eprintln!(
        "worker {}: {} acks, {} deliveries and {receipts_missing} receipts of {sent} \
         messages did not come from {} within --drain-timeout {}",
        worker.spec.worker,
        missing(c.acked - before.acked),
        missing(c.delivered - before.delivered),
        worker.spec.target.server,
        seconds(Duration::from_secs_f64(step.drain_timeout_s)),
    );
    true
}

/// Fills in a step's counts (since `before`) and histograms.
fn finish_step(worker: &Worker, before: &Counters, start_at_ns: u64, result: &mut StepResult) {
    let after = worker.counters.get();
    result.sent = after.sent - before.sent;
    result.acked = after.acked - before.acked;
    result.delivered = after.delivered - before.delivered;
    result.receipts = after.receipts - before.receipts;
    result.duplicates = after.duplicates - before.duplicates;
    result.errors = after.errors - before.errors;
    let stats = worker.stats.borrow();
    result.elapsed_s = (stats.last_delivery_ns.max(start_at_ns) - start_at_ns) as f64 / 1e9;
    result.ack_hex = stats.chain.ack.to_hex();
    result.deliver_hex = stats.chain.deliver.to_hex();
    result.receipt_hex = stats.chain.receipt.to_hex();
    result.send_lag_hex = stats.chain.send_lag.to_hex();
    result.reconnects = stats.reconnect.count();
    result.reconnect_hex = stats.reconnect.to_hex();
    result.timeline = stats
        .timeline
        .iter()
        .map(|(second, latency)| TimelinePoint {
            second: *second,
            delivered: latency.count(),
            deliver_hex: latency.to_hex(),
        })
        .collect();
}

/// Queues group message `msg_id` of `slot` (the group's sender) to group
/// `group` (server id `group_id`); `None` when the sender is not connected.
fn send_group_one(
    worker: &Worker,
    slot: &Slot,
    group: u32,
    group_id: u64,
    scheduled_ns: u64,
    payload_bytes: usize,
    receipts_left: u64,
) -> Option<Rc<Link>> {
    let link = slot.link.borrow().clone()?;
    let (msg_id, payload) =
        next_group_message(slot, group, scheduled_ns, payload_bytes, receipts_left);
    if let Err(error) = link.send_group(group, group_id, msg_id, payload) {
        slot.group_pending.borrow_mut().remove(&msg_id);
        worker.report_error(format_args!("group send: {error:#}"));
        return None;
    }
    worker.note_send(scheduled_ns);
    worker.bump(|c| c.sent += 1);
    Some(link)
}

/// The next group message of `slot` (a group's sender): its id, noted as
/// pending until acked and receipted, and its payload.
fn next_group_message(
    slot: &Slot,
    group: u32,
    scheduled_ns: u64,
    payload_bytes: usize,
    receipts_left: u64,
) -> (u64, bytes::Bytes) {
    let msg_id = slot.next_msg_id.get();
    slot.next_msg_id.set(msg_id + 1);
    let header = GroupHeader {
        group,
        msg_id,
        scheduled_ns,
    };
    slot.group_pending.borrow_mut().insert(
        msg_id,
        GroupPending {
            scheduled_ns,
            acked: false,
            receipts_left,
        },
    );
    (msg_id, header.encode(payload_bytes))
}

/// One open-loop step of the group scenario: this worker's senders send
/// on one schedule, message `k` to the `k mod n`-th of their `n` groups;
/// then the step waits (bounded) for the acks, the receipts of what it sent
/// and the deliveries its members are due.
async fn group_step(worker: &Rc<Worker>, step: &GroupStep) -> StepResult {
    let mut result = StepResult::default();
    let start = begin_group_step(worker, step, &mut result);
    let (groups, receipts_per_message) = (start.groups, start.receipts_per_message);
    if let Some(schedule) = start.schedule {
        let mut k = 0u64;
        let mut dirty: Vec<Rc<Link>> = Vec::new();
        while k < schedule.count {
            sleep_until(schedule.due_ns(k)).await;
            let due = schedule.due_count(monotonic_ns()).min(k + SEND_BATCH_MAX);
            while k < due {
                let (sender, group_id) = groups.kth_send(k);
                let slot = &worker.slots[sender.local];
                let sent = send_group_one(
                    worker,
                    slot,
                    sender.group,
                    group_id,
                    schedule.due_ns(k),
                    step.payload_bytes,
                    receipts_per_message,
                );
                match sent {
                    Some(link) => {
                        if !dirty.iter().any(|l| Rc::ptr_eq(l, &link)) {
                            dirty.push(link);
                        }
                    }
                    None => result.skipped += 1,
                }
                k += 1;
            }
            for link in dirty.drain(..) {
                let _ = link.flush().await;
            }
        }
    }
    result.send_s = (monotonic_ns().saturating_sub(step.start_at_ns)) as f64 / 1e9;
    let deadline = monotonic_ns() + (step.drain_timeout_s * 1e9) as u64;
    while !group_drained(worker, &start.before, step, receipts_per_message, deadline) {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    end_group_step(worker, &start, step, &mut result);
    result
}

/// What both engines' group steps begin with.
struct GroupStepStart<'a> {
    groups: &'a GroupState,
    /// The counters before the step.
    before: Counters,
    receipts_per_message: u64,
    /// The senders' schedule; `None` when this worker sends nothing.
    schedule: Option<Schedule>,
}

/// Begins a group step on either engine: counters and latencies reset, the
/// schedule of this worker's senders (its count in `result.offered`).
fn begin_group_step<'a>(
    worker: &'a Worker,
    step: &GroupStep,
    result: &mut StepResult,
) -> GroupStepStart<'a> {
    let groups = worker
        .groups
        .as_ref()
        .expect("the coordinator sends group steps only with a group plan");
    let before = worker.counters.get();
    reset_stats(worker, step.start_at_ns);
    let sends = !groups.local.sends.is_empty();
    let schedule = (sends && step.rate_per_s > 0.0 && step.messages > 0).then(|| Schedule {
        count: step.messages,
        ..Schedule::new(step.start_at_ns, step.rate_per_s, step.duration_s)
    });
    result.offered = schedule.map_or(0, |s| s.count);
    GroupStepStart {
        groups,
        before,
        receipts_per_message: groups.receipts_per_message(worker.spec.target.protocol),
        schedule,
    }
}

/// Ends a group step on either engine: what was not acked or receipted by
/// now will not count in a later step.
fn end_group_step(
    worker: &Worker,
    start: &GroupStepStart,
    step: &GroupStep,
    result: &mut StepResult,
) {
    for sender in &start.groups.local.sends {
        worker.slots[sender.local]
            .group_pending
            .borrow_mut()
            .clear();
    }
    finish_step(worker, &start.before, step.start_at_ns, result);
}

/// Whether a group step's drain is over: every message sent since `before`
/// acked and receipted, and this worker's members' deliveries in, or
/// `deadline` passed, which is reported with what is missing.
fn group_drained(
    worker: &Worker,
    before: &Counters,
    step: &GroupStep,
    receipts_per_message: u64,
    deadline: u64,
) -> bool {
    let c = worker.counters.get();
    let sent = c.sent - before.sent;
    let (acked, delivered, receipts) = (
        c.acked - before.acked,
        c.delivered - before.delivered,
        c.receipts - before.receipts,
    );
    let receipts_expected = sent * receipts_per_message;
    if acked >= sent && delivered >= step.deliveries_expected && receipts >= receipts_expected {
        return true;
    }
    if monotonic_ns() < deadline {
        return false;
    }
    eprintln!(
        "worker {}: {} acks of {sent} group messages, {} of {} member deliveries and \
         {} of {receipts_expected} receipts did not come from {} within --drain-timeout {}",
        worker.spec.worker,
        sent.saturating_sub(acked),
        step.deliveries_expected.saturating_sub(delivered),
        step.deliveries_expected,
        receipts_expected.saturating_sub(receipts),
        worker.spec.target.server,
        seconds(Duration::from_secs_f64(step.drain_timeout_s)),
    );
    true
}

/// Creates the groups of `creators` on their sessions (Switchboard): every
/// CreateGroup is queued at once (request id: the group's index plus one),
/// then the worker waits at most `--timeout` for their answers. Fails on a
/// refusal or a missing answer. MQTT topics need no creating.
async fn create_groups(worker: &Rc<Worker>, creators: Vec<CreatorOrder>) -> anyhow::Result<()> {
    let started = monotonic_ns();
    let groups = worker
        .groups
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("create_groups without a group plan"))?;
    let mut asked = 0u64;
    if worker.spec.target.protocol == Protocol::Switchboard {
        for order in &creators {
            let local = creator_slot(worker, order)?;
            let link =
                worker.slots[local].link.borrow().clone().ok_or_else(|| {
                    anyhow::anyhow!("creator {} is not connected", order.user_index)
                })?;
            for group in &order.groups {
                link.create_group(
                    u64::from(group.group) + 1,
                    &format!("bench-g{}", group.group),
                    &group.member_user_ids,
                )?;
                asked += 1;
            }
            groups
                .creates_left
                .set(groups.creates_left.get() + order.groups.len() as u64);
            link.flush().await?;
        }
    }
    let deadline = started + worker.timeout.as_nanos() as u64;
    while groups.creates_left.get() > 0
        && groups.create_refusal.borrow().is_none()
        && monotonic_ns() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    groups_created(worker, groups, asked, started)
}

/// This worker's slot of a group creator.
fn creator_slot(worker: &Worker, order: &CreatorOrder) -> anyhow::Result<usize> {
    let first_user = worker.slots.first().map_or(0, |s| s.user.borrow().index);
    order
        .user_index
        .checked_sub(first_user)
        .map(|l| l as usize)
        .filter(|&l| l < worker.slots.len())
        .ok_or_else(|| anyhow::anyhow!("creator {} is not this worker's", order.user_index))
}

/// Once the CreateGroup answers are in or the wait is over: fails on a
/// refusal or a missing answer, else reports the groups created.
fn groups_created(
    worker: &Worker,
    groups: &GroupState,
    asked: u64,
    started: u64,
) -> anyhow::Result<()> {
    if let Some(refusal) = groups.create_refusal.borrow_mut().take() {
        anyhow::bail!("{} refused {refusal}", worker.spec.target.server);
    }
    if groups.creates_left.get() > 0 {
        anyhow::bail!(
            "{} of {asked} CreateGroup requests were not answered by {} within --timeout {}",
            groups.creates_left.get(),
            worker.spec.target.server,
            seconds(worker.timeout),
        );
    }
    emit(&Report::GroupsCreated {
        created: asked,
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
    });
    Ok(())
}

/// Waits (at most `--timeout`) until this worker's devices have one "group
/// created" message per membership (Switchboard; none are due on MQTT).
/// Missing ones are reported, not fatal: the step measures what comes.
async fn await_group_events(worker: &Rc<Worker>) {
    let started = monotonic_ns();
    let expected = group_events_expected(worker);
    let deadline = started + worker.timeout.as_nanos() as u64;
    while worker.counters.get().group_events < expected && monotonic_ns() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    group_events_done(worker, expected, started);
}

/// "Group created" messages this worker's devices are due: one per
/// membership (Switchboard; none on MQTT).
fn group_events_expected(worker: &Worker) -> u64 {
    match (&worker.groups, worker.spec.target.protocol) {
        (Some(groups), Protocol::Switchboard) => groups.local.memberships(),
        _ => 0,
    }
}

/// Reports the "group created" messages in (the missing ones too).
fn group_events_done(worker: &Worker, expected: u64, started: u64) {
    let events = worker.counters.get().group_events;
    if events < expected {
        eprintln!(
            "worker {}: {} of {expected} \"group created\" messages did not come from {} \
             within --timeout {}",
            worker.spec.worker,
            expected - events,
            worker.spec.target.server,
            seconds(worker.timeout),
        );
    }
    emit(&Report::GroupEvents {
        events,
        expected,
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
    });
}

/// Disconnects and reconnects random users on a schedule while p2p runs.
async fn churn_loop(worker: Rc<Worker>, schedule: Schedule, done: Rc<Cell<bool>>) {
    let mut k = 0;
    let mut tasks = Vec::new();
    while k < schedule.count && !done.get() {
        sleep_until(schedule.due_ns(k)).await;
        k += 1;
        let local = rand::thread_rng().gen_range(0..worker.slots.len());
        let slot = worker.slots[local].clone();
        if slot.reconnecting.get() {
            continue;
        }
        slot.reconnecting.set(true);
        let worker = worker.clone();
        tasks.push(glommio::spawn_local(async move {
            let old = slot.link.borrow_mut().take();
            if let Some(old) = old {
                old.close().await;
                worker.bump(|c| c.connected -= 1);
            }
            let begin = monotonic_ns();
            match open(&worker, &slot).await {
                Ok(()) => worker
                    .stats
                    .borrow_mut()
                    .reconnect
                    .record(begin, monotonic_ns()),
                Err(error) => {
                    worker.bump(|c| c.errors += 1);
                    worker.report_error(format_args!("reconnect: {error:#}"));
                }
            }
            slot.reconnecting.set(false);
        }));
    }
    for task in tasks {
        task.await;
    }
}

async fn burst(worker: &Rc<Worker>, per_user: u64, payload_bytes: usize) {
    let started = monotonic_ns();
    let before = worker.counters.get();
    reset_stats(worker, started);
    for slot in worker.slots.iter().filter(|s| s.local & 1 == 0) {
        for _ in 0..per_user {
            if send_one(worker, slot, monotonic_ns(), payload_bytes).is_none() {
                break;
            }
        }
        let link = slot.link.borrow().clone();
        if let Some(link) = link {
            let _ = link.flush().await;
        }
    }
    let deadline = monotonic_ns() + worker.timeout.as_nanos() as u64;
    loop {
        let c = worker.counters.get();
        let (sent, acked) = (c.sent - before.sent, c.acked - before.acked);
        if acked >= sent {
            break;
        }
        if monotonic_ns() >= deadline {
            eprintln!(
                "worker {}: {} acks of {sent} queued messages did not come from {} within --timeout {}",
                worker.spec.worker,
                sent - acked,
                worker.spec.target.server,
                seconds(worker.timeout),
            );
            break;
        }
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let after = worker.counters.get();
    emit(&Report::BurstDone {
        sent: after.sent - before.sent,
        acked: after.acked - before.acked,
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
    });
}

/// `connect` for the lean engine: each user in turn, blocking.
fn lean_connect(worker: &Worker, subset: Subset) -> anyhow::Result<()> {
    let started = monotonic_ns();
    let timeout_ns = worker.timeout.as_nanos() as u64;
    let mut links = worker.lean.borrow_mut();
    let links = links.as_mut().expect("the lean engine's links");
    let mut handshakes = Latency::default();
    let mut failed = 0u64;
    let mut tried = 0u64;
    let mut first_error = None::<anyhow::Error>;
    for slot in worker.slots.iter().filter(|s| subset.contains(s.local)) {
        if links.is_connected(slot.local) {
            continue;
        }
        // Against a port that never answers, each would wait out the
        // timeout again.
        if handshakes.count() == 0 && tried > 0 && monotonic_ns() - started >= timeout_ns {
            break;
        }
        tried += 1;
        let begin = monotonic_ns();
        let user = slot.user.borrow().clone();
        let connected = LeanLink::connect(
            worker.spec.target.server,
            worker.spec.target.protocol,
            &user,
            &worker.subscriptions(slot),
            worker.bind_ip(slot),
            worker.timeout,
        )
        .map(|link| link.with_mqtt_receipts(worker.spec.mqtt_receipts))
        .and_then(|link| {
            if link.delivery_window() > 0 {
                let half = (link.delivery_window() / 2).max(1);
                let max = &worker.receipt_acks_hold_max;
                max.set(max.get().min(half));
            }
            links.insert(slot.local, link)
        });
        match connected {
            Ok(()) => {
                handshakes.record(begin, monotonic_ns());
                worker.bump(|c| c.connected += 1);
            }
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(error) = first_error {
        if handshakes.count() == 0 {
            anyhow::bail!(
                "none of {tried} connects to {} succeeded, the first error: {error:#}",
                worker.spec.target.server
            );
        }
        eprintln!(
            "worker {}: {failed} connects failed, the first: {error:#}",
            worker.spec.worker
        );
    }
    emit(&Report::Connected {
        connected: tried - failed,
        failed,
        elapsed_s: (monotonic_ns() - started) as f64 / 1e9,
        handshake_hex: handshakes.to_hex(),
    });
    Ok(())
}

/// `send_one` on a lean link; false when the sender is not connected.
fn lean_send_one(
    worker: &Worker,
    links: &mut Lean,
    slot: &Slot,
    scheduled_ns: u64,
    payload_bytes: usize,
) -> bool {
    let Some(link) = links.link_mut(slot.local) else {
        return false;
    };
    let msg_id = slot.next_msg_id.get();
    slot.next_msg_id.set(msg_id + 1);
    let header = PayloadHeader {
        sender_index: slot.user.borrow().index,
        msg_id,
        scheduled_ns,
    };
    slot.pending.borrow_mut().insert(msg_id, scheduled_ns);
    let peer = worker.peer(slot);
    let peer_user = peer.user.borrow();
    if let Err(error) = link.send(&peer_user, msg_id, header.encode(payload_bytes)) {
        slot.pending.borrow_mut().remove(&msg_id);
        worker.report_error(format_args!("send: {error:#}"));
        return false;
    }
    // A held Receipt Ack goes out with the Send, in the same write.
    let held = slot.take_receipt_ack();
    if held > 0 {
        link.ack(held);
    }
    links.mark(slot.local);
    worker.note_send(scheduled_ns);
    worker.bump(|c| c.sent += 1);
    true
}

/// One turn of the lean loop: waits at most `wait`, hands what was read to
/// the scenario's handler, queues one Ack per link that has entries to
/// acknowledge, and counts the links that failed. False when the epoll set
/// itself failed.
fn lean_turn(worker: &Worker, links: &mut Lean, wait: Duration) -> bool {
    let mut acks: Vec<usize> = Vec::new();
    let failed = links.turn(wait, |local, event| {
        let slot = &worker.slots[local];
        let now = monotonic_ns();
        match &worker.groups {
            Some(groups) => on_group_event(worker, groups, slot, event, now),
            None => on_pair_event(worker, slot, event, now),
        }
        if slot.ack_due.get() > 0 {
            acks.push(local);
        }
    });
    // Answer once per burst of input: one Ack per link per turn, which
    // also covers the link's held Receipt Acks (acks are cumulative).
    for local in acks {
        let slot = &worker.slots[local];
        let due = slot.ack_due.replace(0).max(slot.take_receipt_ack());
        if let (true, Some(link)) = (due > 0, links.link_mut(local)) {
            link.ack(due);
            links.mark(local);
        }
    }
    release_receipt_acks(worker, links, monotonic_ns());
    count_failed(worker, failed)
}

/// Queues the held Receipt Acks whose time is up at `now` (every one for
/// `u64::MAX`), each alone on its link.
fn release_receipt_acks(worker: &Worker, links: &mut Lean, now: u64) {
    let mut held = worker.receipt_acks_held.borrow_mut();
    while let Some(&(deadline, local)) = held.front() {
        if deadline > now {
            break;
        }
        held.pop_front();
        let slot = &worker.slots[local];
        // Only the hold this entry was made for: a later hold of the slot
        // has its own entry, still queued.
        if slot.receipt_ack_deadline.get() != deadline {
            continue;
        }
        let due = slot.take_receipt_ack();
        if let (true, Some(link)) = (due > 0, links.link_mut(local)) {
            link.ack(due);
            links.mark(local);
        }
    }
}

/// Counts and reports the links that failed; false when the epoll set
/// itself failed.
fn count_failed(worker: &Worker, failed: Vec<(usize, String)>) -> bool {
    let mut ok = true;
    for (local, why) in failed {
        worker.bump(|c| c.errors += 1);
        if local < worker.slots.len() {
            let index = worker.slots[local].user.borrow().index;
            worker.bump(|c| c.connected -= 1);
            worker.report_error(format_args!("user {index}: {why}"));
        } else {
            worker.report_error(format_args!("{why}"));
            ok = false;
        }
    }
    ok
}

/// Runs lean turns until `done()` or `deadline` (`CLOCK_MONOTONIC` ns);
/// whether `done()` came.
fn lean_until(worker: &Worker, links: &mut Lean, deadline: u64, done: impl Fn() -> bool) -> bool {
    if let Err(error) = links.wake_at(None) {
        worker.report_error(format_args!("timerfd: {error:#}"));
    }
    loop {
        // The last turn's answers go out even when it was the last one: a
        // worker whose own share is in still owes the server the Acks that
        // other workers' senders wait on for their receipts.
        if done() {
            release_receipt_acks(worker, links, u64::MAX);
            count_failed(worker, links.write_queued());
            return true;
        }
        if monotonic_ns() >= deadline {
            release_receipt_acks(worker, links, u64::MAX);
            count_failed(worker, links.write_queued());
            return false;
        }
        if !lean_turn(worker, links, Duration::from_millis(2)) {
            return false;
        }
    }
}

/// A step's open-loop sends on the lean engine: `send(links, k, due_ns)`
/// queues message `k` when it is due (false: skipped), the loop's turns
/// handling what comes back meanwhile. False when the epoll set failed.
fn lean_sends(
    worker: &Worker,
    links: &mut Lean,
    schedule: &Schedule,
    start_at_ns: u64,
    result: &mut StepResult,
    mut send: impl FnMut(&mut Lean, u64, u64) -> bool,
) -> bool {
    let mut k = 0u64;
    let mut ok = true;
    while k < schedule.count && ok {
        let due = schedule.due_count(monotonic_ns()).min(k + SEND_BATCH_MAX);
        while k < due {
            if !send(links, k, schedule.due_ns(k)) {
                result.skipped += 1;
            }
            k += 1;
        }
        if k < schedule.count {
            if let Err(error) = links.wake_at(Some(schedule.due_ns(k))) {
                worker.report_error(format_args!("timerfd: {error:#}"));
            }
            ok = lean_turn(worker, links, Duration::from_secs(1));
        }
    }
    result.send_s = monotonic_ns().saturating_sub(start_at_ns) as f64 / 1e9;
    ok
}

/// `p2p` on the lean engine: the same schedule, counts and latencies, from
/// one epoll loop on this thread (blocking it for the step and its drain).
fn lean_p2p(worker: &Worker, step: &P2pStep) -> StepResult {
    let pairs = (worker.slots.len() / 2) as u64;
    let before = worker.counters.get();
    reset_stats(worker, step.start_at_ns);
    let mut result = StepResult::default();
    if pairs == 0 || step.rate_per_s <= 0.0 {
        return result;
    }
    if step.churn_per_s > 0.0 {
        worker.report_error(format_args!(
            "the lean engine does not churn; none this step"
        ));
    }
    let schedule = Schedule::new(step.start_at_ns, step.rate_per_s, step.duration_s);
    result.offered = schedule.count;
    let mut links = worker.lean.borrow_mut();
    let links = links.as_mut().expect("the lean engine's links");
    let sent = lean_sends(
        worker,
        links,
        &schedule,
        step.start_at_ns,
        &mut result,
        |links, k, due_ns| {
            let pair = k % pairs;
            let direction = (k / pairs) % 2;
            let slot = &worker.slots[(pair * 2 + direction) as usize];
            lean_send_one(worker, links, slot, due_ns, step.payload_bytes)
        },
    );
    if sent {
        // `drained` ends the drain at its deadline, reporting what is missing.
        let deadline = monotonic_ns() + (step.drain_timeout_s * 1e9) as u64;
        lean_until(worker, links, u64::MAX, || {
            drained(worker, &before, step, deadline)
        });
    }
    finish_step(worker, &before, step.start_at_ns, &mut result);
    result
}

/// `group_step` on the lean engine.
fn lean_group_step(worker: &Worker, step: &GroupStep) -> StepResult {
    let mut result = StepResult::default();
    let start = begin_group_step(worker, step, &mut result);
    let (groups, receipts_per_message) = (start.groups, start.receipts_per_message);
    let mut links = worker.lean.borrow_mut();
    let links = links.as_mut().expect("the lean engine's links");
    let mut ok = true;
    if let Some(schedule) = start.schedule {
        ok = lean_sends(
            worker,
            links,
            &schedule,
            step.start_at_ns,
            &mut result,
            |links, k, due_ns| {
                let (sender, group_id) = groups.kth_send(k);
                let slot = &worker.slots[sender.local];
                let Some(link) = links.link_mut(sender.local) else {
                    return false;
                };
                let (msg_id, payload) = next_group_message(
                    slot,
                    sender.group,
                    due_ns,
                    step.payload_bytes,
                    receipts_per_message,
                );
                if let Err(error) = link.send_group(sender.group, group_id, msg_id, payload) {
                    slot.group_pending.borrow_mut().remove(&msg_id);
                    worker.report_error(format_args!("group send: {error:#}"));
                    return false;
                }
                links.mark(sender.local);
                worker.note_send(due_ns);
                worker.bump(|c| c.sent += 1);
                true
            },
        );
    }
    if ok {
        // `group_drained` ends the drain at its deadline, reporting what is
        // missing.
        let deadline = monotonic_ns() + (step.drain_timeout_s * 1e9) as u64;
        lean_until(worker, links, u64::MAX, || {
            group_drained(worker, &start.before, step, receipts_per_message, deadline)
        });
    }
    end_group_step(worker, &start, step, &mut result);
    result
}

/// `create_groups` on the lean engine.
fn lean_create_groups(worker: &Worker, creators: Vec<CreatorOrder>) -> anyhow::Result<()> {
    let started = monotonic_ns();
    let groups = worker
        .groups
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("create_groups without a group plan"))?;
    let mut links = worker.lean.borrow_mut();
    let links = links.as_mut().expect("the lean engine's links");
    let mut asked = 0u64;
    if worker.spec.target.protocol == Protocol::Switchboard {
        for order in &creators {
            let local = creator_slot(worker, order)?;
            let link = links
                .link_mut(local)
                .ok_or_else(|| anyhow::anyhow!("creator {} is not connected", order.user_index))?;
            for group in &order.groups {
                link.create_group(
                    u64::from(group.group) + 1,
                    &format!("bench-g{}", group.group),
                    &group.member_user_ids,
                );
                asked += 1;
            }
            links.mark(local);
            groups
                .creates_left
                .set(groups.creates_left.get() + order.groups.len() as u64);
        }
    }
    let deadline = started + worker.timeout.as_nanos() as u64;
    lean_until(worker, links, deadline, || {
        groups.creates_left.get() == 0 || groups.create_refusal.borrow().is_some()
    });
    groups_created(worker, groups, asked, started)
}

/// `await_group_events` on the lean engine.
fn lean_await_group_events(worker: &Worker) {
    let started = monotonic_ns();
    let expected = group_events_expected(worker);
    let mut links = worker.lean.borrow_mut();
    let links = links.as_mut().expect("the lean engine's links");
    let deadline = started + worker.timeout.as_nanos() as u64;
    lean_until(worker, links, deadline, || {
        worker.counters.get().group_events >= expected
    });
    group_events_done(worker, expected, started);
}

async fn drain(worker: &Rc<Worker>, expected: u64) {
    let started = monotonic_ns();
    let before = worker.counters.get();
    reset_stats(worker, started);
    let recipients: Vec<usize> = worker
        .slots
        .iter()
        .filter(|s| s.local % 2 == 1 && s.link.borrow().is_none())
        .map(|s| s.local)
        .collect();
    let w = worker.clone();
    pool(
        recipients,
        worker.spec.connect_concurrency,
        || false,
        move |local| {
            let w = w.clone();
            async move {
                let slot = w.slots[local].clone();
                if let Err(error) = open(&w, &slot).await {
                    w.bump(|c| c.errors += 1);
                    w.report_error(format_args!("drain connect: {error:#}"));
                }
            }
        },
    )
    .await;
    let connect_s = (monotonic_ns() - started) as f64 / 1e9;
    let deadline = monotonic_ns() + worker.timeout.as_nanos() as u64;
    while worker.counters.get().delivered - before.delivered < expected {
        if monotonic_ns() >= deadline {
            eprintln!(
                "worker {}: {} of {expected} queued messages were not delivered by {} within --timeout {}",
                worker.spec.worker,
                expected - (worker.counters.get().delivered - before.delivered),
                worker.spec.target.server,
                seconds(worker.timeout),
            );
            break;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let last = worker.stats.borrow().last_delivery_ns.max(started);
    emit(&Report::Drained {
        delivered: worker.counters.get().delivered - before.delivered,
        elapsed_s: (last - started) as f64 / 1e9,
        connect_s,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_match_their_wire_tags() {
        let commands = [
            Command::Register,
            Command::Connect {
                subset: Subset::All,
            },
            Command::Disconnect {
                subset: Subset::Recipients,
            },
            Command::P2p(P2pStep {
                rate_per_s: 1.0,
                duration_s: 1.0,
                payload_bytes: 100,
                start_at_ns: 0,
                drain_timeout_s: 1.0,
                churn_per_s: 0.0,
            }),
            Command::Burst {
                per_user: 1,
                payload_bytes: 100,
            },
            Command::Drain { expected: 1 },
            Command::CreateGroups {
                creators: Vec::new(),
            },
            Command::AwaitGroupEvents,
            Command::GroupStep(GroupStep {
                rate_per_s: 1.0,
                messages: 1,
                duration_s: 1.0,
                payload_bytes: 100,
                start_at_ns: 0,
                drain_timeout_s: 1.0,
                deliveries_expected: 7,
            }),
            Command::Quit,
        ];
        for command in commands {
            let wire = serde_json::to_value(&command).unwrap();
            assert_eq!(wire["cmd"], command.name());
        }
    }
}
