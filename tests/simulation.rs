//! A deterministic simulation of the whole server's delivery logic: several
//! shards' engines in one thread, simulated clients that register, send,
//! retry, ack, read, disconnect and reconnect at any step, the channels
//! between shards (FIFO per pair, delivered in any interleaving), logs on
//! `SimStorage` with its faults (ENOSPC, failed fsyncs, and at a crash torn,
//! lost and bit-flipped unsynced writes), and crashes of the process at any
//! step followed by recovery from what the storage holds.
//!
//! One u64 seed drives everything. A failure prints the seed and the step;
//! `SEED=<seed> cargo test --release --test simulation` replays it exactly.
//! `SIM_SEEDS=<n> SIM_STEPS=<m>` runs more (`just sim --seeds N --steps M`).
//!
//! Accounts: some users have a companion device besides their primary, so a
//! client is one device; a Send to such an account carries one payload per
//! device (each different), and a companion sends, acks and reads on its own.
//!
//! Invariants, checked after every step, after every crash + recovery, and
//! once every client has caught up at the end:
//! - every message that got a ServerAck is delivered to every device of its
//!   recipient, each with its own payload, once per sequence and under one
//!   sequence only (dedupe), and never before it is durable;
//! - nothing that was not sent is delivered, and a sequence never carries
//!   two different entries (sequences never go back after recovery);
//! - within a session, entries arrive in increasing sequence order;
//! - a delivered receipt names only messages the recipient acked, a read
//!   receipt only messages the reader received; every acked message's
//!   delivered receipt reaches its sender at least once (unless the disk
//!   was full, where a receipt may be dropped by design);
//! - delivery windows and output queues stay within their bounds.
//!
//! A crash takes the whole process, as it does in production: shards share
//! one process (a failed fsync exits it), so a crash drops every engine,
//! every channel's contents and every connection, and each shard's storage
//! loses or damages its unsynced writes independently.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use switchboard::config::Config;
use switchboard::engine::{
    Closing, Directory, Engine, Event, Flaws, Host, Reply, Request, SessionId,
};
use switchboard::ids::{DeviceId, InboxKey, InboxSeq, ShardId, UserId, PRIMARY_DEVICE};
use switchboard::meta::GroupRow;
use switchboard::metrics::ShardMetrics;
use switchboard::proto::{pb, ErrorCode, Frame};
use switchboard::route::home_shard;
use switchboard::store::storage::SimStorage;
use switchboard::store::{Log, ManualClock};

/// (sender user, sender device, client message id): what dedupe keys a
/// message by.
type MessageKey = (u64, u32, u64);

/// (user, device): one client.
type DeviceKey = (u64, u32);

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    steps: u64,
    crashes: u64,
    faults: u64,
    sends: u64,
    acked_sends: u64,
    delivered: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.steps += o.steps;
        self.crashes += o.crashes;
        self.faults += o.faults;
        self.sends += o.sends;
        self.acked_sends += o.acked_sends;
        self.delivered += o.delivered;
    }
}

/// Users 1..=count; those in `linked` also have device 2.
struct Users {
    count: u64,
    linked: HashSet<u64>,
}

impl Directory for Users {
    fn user_exists(&self, user: UserId) -> bool {
        (1..=self.count).contains(&user.0)
    }
    fn device_exists(&self, user: UserId, device: DeviceId) -> bool {
        self.device_set(user)
            .is_some_and(|(_, devices)| devices.contains(&device))
    }
    fn has_companions(&self, user: UserId) -> bool {
        self.linked.contains(&user.0)
    }
    fn device_set(&self, user: UserId) -> Option<(u64, Vec<DeviceId>)> {
        if !self.user_exists(user) {
            return None;
        }
        Some(if self.linked.contains(&user.0) {
            (2, vec![PRIMARY_DEVICE, DeviceId(2)])
        } else {
            (1, vec![PRIMARY_DEVICE])
        })
    }
}

/// One session's output queue, as its socket would hold it.
#[derive(Default)]
struct Output {
    client: usize,
    user: u64,
    device: u32,
    frames: VecDeque<Frame>,
    bytes: usize,
    /// The engine closed it: the client reads what is queued, then the
    /// connection ends.
    closing: bool,
}

/// What the engines' host calls did, for the step to carry out.
#[derive(Default)]
struct World {
    outputs: HashMap<SessionId, Output>,
    /// requests[from][to], replies[from][to]: FIFO per pair.
    requests: Vec<Vec<VecDeque<Request>>>,
    replies: Vec<Vec<VecDeque<Reply>>>,
    out_max: usize,
    /// Deliveries to check against the log's durability after the call.
    delivered_now: Vec<(InboxKey, u64)>,
}

struct SimHost<'a> {
    shard: usize,
    world: &'a mut World,
}

impl Host for SimHost<'_> {
    fn send(&mut self, session: SessionId, frame: &Frame) {
        if let Some(out) = self.world.outputs.get_mut(&session) {
            if out.closing {
                return;
            }
            if let Frame::Deliver(d) = frame {
                self.world
                    .delivered_now
                    .push((device(out.user, out.device), d.sequence));
            }
            out.bytes += frame.to_bytes().len();
            out.frames.push_back(frame.clone());
        }
    }
    fn close(&mut self, session: SessionId, frame: &Frame, _closing: Closing) {
        if let Some(out) = self.world.outputs.get_mut(&session) {
            if !out.closing {
                out.frames.push_back(frame.clone());
                out.closing = true;
            }
        }
    }
    fn output_full(&self, session: SessionId) -> bool {
        self.world
            .outputs
            .get(&session)
            .is_none_or(|o| o.bytes >= self.world.out_max)
    }
    fn closing(&self, session: SessionId) -> bool {
        self.world.outputs.get(&session).is_none_or(|o| o.closing)
    }
    fn request(&mut self, shard: ShardId, request: Request) {
        self.world.requests[self.shard][shard.0 as usize].push_back(request);
    }
    fn reply(&mut self, shard: ShardId, reply: Reply) {
        self.world.replies[self.shard][shard.0 as usize].push_back(reply);
    }
    fn commit_due(&mut self) {}
    fn account(&mut self, op: switchboard::engine::devices::AccountOp) {
        // The simulated clients never manage devices.
        panic!("unexpected device-list operation {op:?}");
    }
    fn group(&mut self, op: switchboard::engine::groups::GroupOp) {
        // The simulated groups are loaded at start and never change.
        panic!("unexpected group operation {op:?}");
    }
    fn wake(&mut self, _device: InboxKey) {
        // No push thread: a wake-up goes nowhere.
    }
    fn keys(&mut self, op: switchboard::engine::keys::KeysOp) {
        // The simulated clients never upload or fetch prekeys.
        panic!("unexpected prekey operation {op:?}");
    }
}

struct Client {
    user: u64,
    device: u32,
    home: usize,
    session: Option<SessionId>,
    next_id: u64,
    /// Sends not yet answered with a ServerAck: id → the Send.
    outstanding: BTreeMap<u64, Frame>,
    /// Highest sequence seen in the current session.
    session_last_seq: u64,
    /// Messages received (sender, id) → sequences that carried them.
    received: HashMap<MessageKey, HashSet<u64>>,
    /// Every sequence seen: what it carried (a message key, or a receipt).
    by_seq: HashMap<u64, Entry>,
    /// Received in this session, not yet acked.
    to_ack: Vec<u64>,
    /// Received messages not yet read: (sender, id).
    unread: Vec<MessageKey>,
    /// Group messages seen: inbox sequence → (group, group sequence).
    group_seen: BTreeMap<u64, (u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Message(MessageKey),
    Receipt(i32, u64, Vec<u64>),
}

struct Failure {
    seed: u64,
    step: u64,
    message: String,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    step: u64,
    flaws: Flaws,
    config: Config,
    clock: Rc<ManualClock>,
    dirs: Vec<PathBuf>,
    _root: tempfile::TempDir,
    storages: Vec<Rc<SimStorage>>,
    engines: Vec<Option<Engine>>,
    world: World,
    clients: Vec<Client>,
    next_session: SessionId,
    /// Every message sent: key → (recipient, payload per recipient device).
    sent: HashMap<MessageKey, (u64, Vec<(u32, Bytes)>)>,
    /// The groups (loaded on their home shards at every start) and their
    /// members; they never change.
    groups: Vec<(u64, Vec<u64>)>,
    /// Every group message sent: key → (group, payload).
    group_sent: HashMap<MessageKey, (u64, Bytes)>,
    /// (group, group sequence) → the message every member saw there.
    group_order: HashMap<(u64, u64), MessageKey>,
    /// The group sequence each acknowledged group message got.
    group_acked: HashMap<MessageKey, u64>,
    /// Users with a companion device (2).
    linked: HashSet<u64>,
    /// Each device's client.
    client_of: HashMap<DeviceKey, usize>,
    /// Messages whose sender got a ServerAck.
    server_acked: HashSet<MessageKey>,
    /// (recipient device, message) acked by the recipient device: may get
    /// a delivered receipt.
    recipient_acked: HashSet<(DeviceKey, MessageKey)>,
    /// Acks fed to each shard since its last commit: their receipts are owed
    /// once that commit makes the ack durable. (After a power loss an ack
    /// that was never synced can survive while the receipt written before
    /// it does not: unsynced pages persist in any order.)
    acks_unrecorded: Vec<Vec<(DeviceKey, MessageKey)>>,
    /// Acks durably recorded: each owes its sender a delivered receipt.
    receipts_owed: HashSet<(DeviceKey, MessageKey)>,
    /// (reader device, message) named in a ReadReceipt.
    read_sent: HashSet<(DeviceKey, MessageKey)>,
    /// (by device, message, kind) receipts received by the message's sender.
    receipts_received: HashSet<(DeviceKey, MessageKey, i32)>,
    /// Highest sequence delivered per device, ever.
    delivered_max: HashMap<DeviceKey, u64>,
    disk_was_full: bool,
    /// A crash lost unsynced writes: a shard may then hold a group's later
    /// message without an earlier one, which comes again after it.
    power_lost: bool,
    stats: Stats,
    /// `SIM_TRACE=1`: print every event fed and every frame a client reads.
    trace: bool,
}

fn device(user: u64, device: u32) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

impl Sim {
    fn new(seed: u64, flaws: Flaws) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let shards = rng.gen_range(1..=3u32);
        let users = rng.gen_range(2..=6u64);
        // tmpfs when there is one: fsyncs are real calls but cost nothing.
        let root = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::tempdir_in("/dev/shm"),
            false => tempfile::tempdir(),
        }
        .expect("temporary directory");
        let mut config = Config::for_tests(root.path());
        config.server.shards = shards;
        config.limits.delivery_window_messages = rng.gen_range(1..=4);
        config.limits.output_queue_bytes_max = rng.gen_range(64..=2_048);
        config.store.segment_size_bytes = 16 << 10;
        let clock = Rc::new(ManualClock::starting_now());
        let dirs: Vec<PathBuf> = (0..shards)
            .map(|s| {
                let dir = root.path().join(format!("shard-{s}"));
                std::fs::create_dir_all(&dir).expect("shard directory");
                dir
            })
            .collect();
        let n = shards as usize;
        let world = World {
            outputs: HashMap::new(),
            requests: (0..n)
                .map(|_| (0..n).map(|_| VecDeque::new()).collect())
                .collect(),
            replies: (0..n)
                .map(|_| (0..n).map(|_| VecDeque::new()).collect())
                .collect(),
            out_max: config.limits.output_queue_bytes_max as usize,
            delivered_now: Vec::new(),
        };
        let linked: HashSet<u64> = (1..=users).filter(|_| rng.gen_bool(0.4)).collect();
        let devices: Vec<DeviceKey> = (1..=users)
            .flat_map(|user| {
                let companion = linked.contains(&user).then_some((user, 2));
                std::iter::once((user, 1)).chain(companion)
            })
            .collect();
        let client_of = devices.iter().enumerate().map(|(i, d)| (*d, i)).collect();
        let clients = devices
            .iter()
            .map(|&(user, device)| Client {
                user,
                device,
                home: home_shard(UserId(user), shards).0 as usize,
                session: None,
                next_id: 1,
                outstanding: BTreeMap::new(),
                session_last_seq: 0,
                received: HashMap::new(),
                by_seq: HashMap::new(),
                to_ack: Vec::new(),
                unread: Vec::new(),
                group_seen: BTreeMap::new(),
            })
            .collect();
        // One or two groups of at least two members each.
        let groups: Vec<(u64, Vec<u64>)> = (0..rng.gen_range(1..=2))
            .map(|_| {
                let mut members: Vec<u64> = (1..=users).filter(|_| rng.gen_bool(0.7)).collect();
                for u in [1, 2] {
                    if members.len() < 2 && !members.contains(&u) {
                        members.push(u);
                    }
                }
                members.sort_unstable();
                (rng.gen::<u64>() | 1, members)
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng,
            step: 0,
            flaws,
            config,
            clock,
            dirs,
            _root: root,
            storages: Vec::new(),
            engines: Vec::new(),
            world,
            clients,
            next_session: 1,
            sent: HashMap::new(),
            groups,
            group_sent: HashMap::new(),
            group_order: HashMap::new(),
            group_acked: HashMap::new(),
            linked,
            client_of,
            server_acked: HashSet::new(),
            recipient_acked: HashSet::new(),
            acks_unrecorded: vec![Vec::new(); shards as usize],
            receipts_owed: HashSet::new(),
            read_sent: HashSet::new(),
            receipts_received: HashSet::new(),
            delivered_max: HashMap::new(),
            disk_was_full: false,
            power_lost: false,
            stats: Stats::default(),
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        sim.start()
            .unwrap_or_else(|e| panic!("seed {seed}: first start: {e}"));
        sim
    }

    fn users(&self) -> u64 {
        self.clients.iter().map(|c| c.user).max().unwrap_or(0)
    }

    /// The devices of `user`, ascending.
    fn devices_of(&self, user: u64) -> Vec<u32> {
        if self.linked.contains(&user) {
            vec![1, 2]
        } else {
            vec![1]
        }
    }

    fn fail(&self, message: String) -> Failure {
        Failure {
            seed: self.seed,
            step: self.step,
            message,
        }
    }

    /// Opens every shard's log and engine, and lets each forward what its
    /// relay inboxes hold.
    fn start(&mut self) -> Result<(), String> {
        self.storages.clear();
        self.engines.clear();
        let shards = self.dirs.len() as u32;
        for (s, dir) in self.dirs.iter().enumerate() {
            let storage = Rc::new(SimStorage::new(self.rng.gen()));
            let (mut log, report) = Log::open_with_storage(
                dir,
                ShardId(s as u32),
                &self.config.store,
                self.clock.clone(),
                storage.clone(),
            )
            .map_err(|e| format!("shard {s} does not recover: {e}"))?;
            if self.trace {
                eprintln!("[{}] shard {s} recovered: {report:?}", self.step);
            }
            log.set_dedupe_capacity(self.config.limits.dedupe_entries_max as usize);
            let mut engine = Engine::new(
                ShardId(s as u32),
                shards,
                self.config.limits.clone(),
                log,
                Arc::new(Users {
                    count: self.users(),
                    linked: self.linked.clone(),
                }),
                Arc::new(ShardMetrics::default()),
                self.clock.clone(),
            );
            engine.set_flaws(self.flaws);
            engine.load_groups(
                self.groups
                    .iter()
                    .filter(|(id, _)| engine.group_home(*id) == ShardId(s as u32))
                    .map(|(id, members)| GroupRow {
                        id: *id,
                        name: "sim".into(),
                        version: 1,
                        members: members
                            .iter()
                            .map(|&u| (UserId(u), u == members[0]))
                            .collect(),
                    })
                    .collect(),
            );
            self.storages.push(storage);
            self.engines.push(Some(engine));
        }
        for s in 0..self.engines.len() {
            self.feed(s, Event::Recovered)?;
        }
        Ok(())
    }

    /// Feeds one event to shard `s`, then checks what it delivered.
    fn feed(&mut self, s: usize, event: Event) -> Result<(), String> {
        if self.trace {
            eprintln!("[{}] shard {s} <- {event:?}", self.step);
        }
        let engine = self.engines[s].as_mut().expect("shard running");
        let mut host = SimHost {
            shard: s,
            world: &mut self.world,
        };
        engine.handle(event, &mut host);
        let delivered = std::mem::take(&mut self.world.delivered_now);
        let engine = self.engines[s].as_ref().expect("shard running");
        for (inbox, seq) in delivered {
            let mut positions = Vec::new();
            engine
                .log()
                .pending_after(inbox, InboxSeq(seq - 1), 1, &mut positions);
            let durable = positions
                .first()
                .is_some_and(|&(q, p)| q.0 == seq && engine.log().is_durable(p));
            if !durable {
                return Err(format!(
                    "shard {s} delivered {inbox} #{seq} before it was durable"
                ));
            }
        }
        Ok(())
    }

    /// Makes shard `s`'s appends durable (or crashes, if the fsync fails).
    fn commit(&mut self, s: usize) -> Result<(), String> {
        self.feed(s, Event::BeforeCommit)?;
        let engine = self.engines[s].as_mut().expect("shard running");
        if let Some(batch) = engine.log_mut().begin_commit() {
            if batch.sync_blocking().is_err() {
                drop(batch);
                // The server exits on a failed fsync.
                return self.crash();
            }
            engine.log_mut().finish_commit(batch);
        }
        self.receipts_owed.extend(self.acks_unrecorded[s].drain(..));
        self.feed(s, Event::Durable)
    }

    /// The process dies: every engine, channel and connection is gone, and
    /// each shard's unsynced writes are kept, lost, torn or flipped.
    fn crash(&mut self) -> Result<(), String> {
        self.stats.crashes += 1;
        if self.trace {
            eprintln!("[{}] crash", self.step);
        }
        for engine in self.engines.iter_mut() {
            drop(engine.take());
        }
        let power_loss = self.rng.gen_bool(0.5);
        self.power_lost |= power_loss;
        if self.trace {
            eprintln!("[{}] power loss: {power_loss}", self.step);
        }
        for storage in &self.storages {
            storage.fsync_fails.set(false);
            storage.disk_full.set(false);
            if power_loss {
                storage.crash().map_err(|e| format!("crash: {e}"))?;
            }
        }
        for row in self.world.requests.iter_mut() {
            row.iter_mut().for_each(VecDeque::clear);
        }
        for row in self.world.replies.iter_mut() {
            row.iter_mut().for_each(VecDeque::clear);
        }
        self.world.outputs.clear();
        for client in self.clients.iter_mut() {
            client.session = None;
            client.to_ack.clear();
        }
        self.acks_unrecorded.iter_mut().for_each(Vec::clear);
        self.start()?;
        // Sequences never go back: whatever was delivered was durable.
        for client in &self.clients {
            let engine = self.engines[client.home].as_ref().expect("running");
            let me = (client.user, client.device);
            let last = engine.log().last_seq(device(me.0, me.1)).0;
            let delivered = self.delivered_max.get(&me).copied().unwrap_or(0);
            if last < delivered {
                return Err(format!(
                    "device {me:?}: sequence went back from {delivered} to {last} after recovery"
                ));
            }
        }
        Ok(())
    }

    fn connect(&mut self, c: usize) -> Result<(), String> {
        let session = self.next_session;
        self.next_session += 1;
        self.world.outputs.insert(
            session,
            Output {
                client: c,
                user: self.clients[c].user,
                device: self.clients[c].device,
                ..Output::default()
            },
        );
        let client = &mut self.clients[c];
        client.session = Some(session);
        client.session_last_seq = 0;
        client.to_ack.clear();
        let (home, user, dev) = (client.home, client.user, client.device);
        self.feed(
            home,
            Event::Opened {
                device: device(user, dev),
                session,
                connected_at: session as u32,
                protocol_version: 1,
            },
        )
    }

    fn disconnect(&mut self, c: usize) -> Result<(), String> {
        let Some(session) = self.clients[c].session.take() else {
            return Ok(());
        };
        self.world.outputs.remove(&session);
        self.clients[c].to_ack.clear();
        let (home, user, dev) = (
            self.clients[c].home,
            self.clients[c].user,
            self.clients[c].device,
        );
        self.feed(
            home,
            Event::Closed {
                device: device(user, dev),
                session,
            },
        )
    }

    fn client_frame(&mut self, c: usize, frame: Frame) -> Result<(), String> {
        let Some(session) = self.clients[c].session else {
            return Ok(());
        };
        let (home, user, dev) = (
            self.clients[c].home,
            self.clients[c].user,
            self.clients[c].device,
        );
        self.feed(
            home,
            Event::Frame {
                device: device(user, dev),
                session,
                frame,
            },
        )
    }

    fn send_new(&mut self, c: usize) -> Result<(), String> {
        let user = self.clients[c].user;
        let mine: Vec<u64> = self
            .groups
            .iter()
            .filter(|(_, members)| members.contains(&user))
            .map(|(id, _)| *id)
            .collect();
        if !mine.is_empty() && self.rng.gen_bool(0.3) {
            let group = mine[self.rng.gen_range(0..mine.len())];
            return self.send_group(c, group);
        }
        let to = self.rng.gen_range(1..=self.users());
        let devices = self.devices_of(to);
        let (user, dev, id) = {
            let client = &mut self.clients[c];
            client.next_id += 1;
            (client.user, client.device, client.next_id - 1)
        };
        // A different payload for each device of the recipient (as if each
        // were encrypted for its device).
        let parts: Vec<(u32, Bytes)> = devices
            .iter()
            .map(|&d| {
                let len = self.rng.gen_range(0..48);
                let mut payload = format!("{user}.{dev}:{id}:{to}.{d}:").into_bytes();
                payload.extend((0..len).map(|_| self.rng.gen::<u8>()));
                (d, Bytes::from(payload))
            })
            .collect();
        let frame = send_frame(id, to, &parts);
        self.clients[c].outstanding.insert(id, frame.clone());
        self.sent.insert((user, dev, id), (to, parts));
        self.stats.sends += 1;
        self.client_frame(c, frame)
    }

    /// A new message to a group the client's account is a member of.
    fn send_group(&mut self, c: usize, group: u64) -> Result<(), String> {
        let (user, dev, id) = {
            let client = &mut self.clients[c];
            client.next_id += 1;
            (client.user, client.device, client.next_id - 1)
        };
        let len = self.rng.gen_range(0..48);
        let mut payload = format!("{user}.{dev}:{id}:group {group}:").into_bytes();
        payload.extend((0..len).map(|_| self.rng.gen::<u8>()));
        let payload = Bytes::from(payload);
        let frame = Frame::Send(pb::Send {
            client_message_id: id,
            group_id: group,
            payload: payload.clone(),
            ..Default::default()
        });
        self.clients[c].outstanding.insert(id, frame.clone());
        self.group_sent.insert((user, dev, id), (group, payload));
        self.stats.sends += 1;
        self.client_frame(c, frame)
    }

    fn retry(&mut self, c: usize) -> Result<(), String> {
        let client = &self.clients[c];
        let Some(frame) = client
            .outstanding
            .values()
            .nth(self.rng.gen_range(0..client.outstanding.len().max(1)))
        else {
            return Ok(());
        };
        let frame = frame.clone();
        self.client_frame(c, frame)
    }

    fn ack(&mut self, c: usize) -> Result<(), String> {
        if self.clients[c].to_ack.is_empty() {
            return Ok(());
        }
        let cumulative = self.rng.gen_bool(0.5);
        let client = &mut self.clients[c];
        let seqs = std::mem::take(&mut client.to_ack);
        let frame = if cumulative {
            Frame::Ack(pb::Ack {
                up_to_sequence: *seqs.iter().max().expect("not empty"),
                sequences: vec![],
            })
        } else {
            Frame::Ack(pb::Ack {
                up_to_sequence: 0,
                sequences: seqs.clone(),
            })
        };
        let me = (client.user, client.device);
        for seq in &seqs {
            if let Some(Entry::Message(key)) = client.by_seq.get(seq) {
                self.recipient_acked.insert((me, *key));
                self.acks_unrecorded[client.home].push((me, *key));
            }
        }
        self.client_frame(c, frame)
    }

    fn read(&mut self, c: usize) -> Result<(), String> {
        let client = &mut self.clients[c];
        if client.unread.is_empty() {
            return Ok(());
        }
        let (sender, sender_device, _) = client.unread[0];
        let mut ids = Vec::new();
        client.unread.retain(|&(s, d, id)| {
            if (s, d) == (sender, sender_device) {
                ids.push(id);
                false
            } else {
                true
            }
        });
        let me = (client.user, client.device);
        for id in &ids {
            self.read_sent.insert((me, (sender, sender_device, *id)));
        }
        let frame = Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: sender,
            sender_device_id: sender_device,
            client_message_ids: ids,
        });
        self.client_frame(c, frame)
    }

    /// The client reads up to `max` frames of its session's queue.
    fn receive(&mut self, c: usize, max: usize) -> Result<(), String> {
        let Some(session) = self.clients[c].session else {
            return Ok(());
        };
        for _ in 0..max {
            let Some(out) = self.world.outputs.get_mut(&session) else {
                return Ok(());
            };
            let Some(frame) = out.frames.pop_front() else {
                if out.closing {
                    return self.disconnect(c);
                }
                break;
            };
            out.bytes = out.bytes.saturating_sub(frame.to_bytes().len());
            let drained = out.bytes < self.world.out_max;
            self.on_client_frame(c, frame)?;
            if drained && self.clients[c].session == Some(session) {
                let inbox = device(self.clients[c].user, self.clients[c].device);
                let home = self.clients[c].home;
                if self.engines[home]
                    .as_ref()
                    .expect("running")
                    .pump_blocked(inbox)
                {
                    self.feed(
                        home,
                        Event::OutputDrained {
                            device: inbox,
                            session,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    fn on_client_frame(&mut self, c: usize, frame: Frame) -> Result<(), String> {
        let (user, dev) = (self.clients[c].user, self.clients[c].device);
        let me = (user, dev);
        if self.trace {
            eprintln!("[{}] device {me:?} reads {frame:?}", self.step);
        }
        match frame {
            Frame::Welcome(_) | Frame::Pong(_) | Frame::GoAway(_) => {}
            Frame::ServerAck(a) => {
                let key = (user, dev, a.client_message_id);
                if self.group_sent.contains_key(&key) {
                    // A retry is answered with the same group sequence.
                    let first = *self.group_acked.entry(key).or_insert(a.server_sequence);
                    if first != a.server_sequence {
                        return Err(format!(
                            "group message {key:?} acknowledged at group sequence {first}, then {}",
                            a.server_sequence
                        ));
                    }
                } else if !self.sent.contains_key(&key) {
                    return Err(format!("user {user}: ServerAck for {key:?}, never sent"));
                }
                if self.clients[c]
                    .outstanding
                    .remove(&a.client_message_id)
                    .is_some()
                {
                    self.stats.acked_sends += 1;
                }
                self.server_acked.insert(key);
            }
            Frame::Error(e) => {
                let code = ErrorCode::try_from(e.code).ok();
                match code {
                    Some(ErrorCode::StoreFull | ErrorCode::StoreFailed | ErrorCode::Internal) => {}
                    other => {
                        return Err(format!("device {me:?}: unexpected error {other:?}: {e:?}"))
                    }
                }
            }
            Frame::Deliver(d) if d.group_id != 0 => {
                let key = (d.sender_user_id, d.sender_device_id, d.client_message_id);
                let member = self
                    .groups
                    .iter()
                    .any(|(id, members)| *id == d.group_id && members.contains(&user));
                match self.group_sent.get(&key) {
                    Some((group, payload))
                        if *group == d.group_id
                            && *payload == d.payload
                            && d.group_event.is_none()
                            && member
                            && (user, dev) != (key.0, key.1) => {}
                    other => {
                        return Err(format!(
                            "device {me:?}: seq {} delivers group {} message {key:?}: sent as {other:?}, member {member}",
                            d.sequence, d.group_id
                        ))
                    }
                }
                // One order for every member device.
                let at = *self
                    .group_order
                    .entry((d.group_id, d.group_sequence))
                    .or_insert(key);
                if at != key {
                    return Err(format!(
                        "device {me:?}: group {} sequence {} is {key:?}, another device had {at:?} there",
                        d.group_id, d.group_sequence
                    ));
                }
                self.on_entry(c, d.sequence, Entry::Message(key))?;
                let client = &mut self.clients[c];
                client
                    .group_seen
                    .insert(d.sequence, (d.group_id, d.group_sequence));
                let seqs = client.received.entry(key).or_default();
                seqs.insert(d.sequence);
                if seqs.len() > 1 {
                    return Err(format!(
                        "device {me:?}: {key:?} stored twice, as sequences {seqs:?}"
                    ));
                }
                if !client.unread.contains(&key) && self.rng.gen_bool(0.5) {
                    client.unread.push(key);
                }
                self.stats.delivered += 1;
            }
            Frame::Deliver(d) => {
                let key = (d.sender_user_id, d.sender_device_id, d.client_message_id);
                match self.sent.get(&key) {
                    Some((to, parts))
                        if *to == user
                            && parts.iter().any(|(pd, p)| *pd == dev && *p == d.payload) => {}
                    Some(_) => {
                        return Err(format!(
                            "device {me:?}: seq {} carries {key:?} with another device's payload, other content or recipient",
                            d.sequence
                        ))
                    }
                    None => {
                        return Err(format!(
                            "device {me:?}: seq {} delivers {key:?}, never sent",
                            d.sequence
                        ))
                    }
                }
                self.on_entry(c, d.sequence, Entry::Message(key))?;
                let client = &mut self.clients[c];
                let seqs = client.received.entry(key).or_default();
                seqs.insert(d.sequence);
                if seqs.len() > 1 {
                    return Err(format!(
                        "device {me:?}: {key:?} stored twice, as sequences {seqs:?}"
                    ));
                }
                if !client.unread.contains(&key) && self.rng.gen_bool(0.5) {
                    client.unread.push(key);
                }
                self.stats.delivered += 1;
            }
            Frame::Receipt(r) => {
                let batch = !r.by_user_ids.is_empty();
                if batch
                    && (r.by_user_ids.len() != r.client_message_ids.len()
                        || r.by_device_ids.len() != r.client_message_ids.len()
                        || r.kind != pb::ReceiptKind::Delivered as i32)
                {
                    return Err(format!("device {me:?}: malformed batched receipt {r:?}"));
                }
                for (i, id) in r.client_message_ids.iter().enumerate() {
                    let by = if batch {
                        (r.by_user_ids[i], r.by_device_ids[i])
                    } else {
                        (r.by_user_id, r.by_device_id)
                    };
                    let key = (user, dev, *id);
                    let known = if r.kind == pb::ReceiptKind::Delivered as i32 {
                        self.recipient_acked.contains(&(by, key))
                    } else {
                        // Reading is the account's: any of its devices.
                        self.devices_of(by.0)
                            .iter()
                            .any(|&d| self.read_sent.contains(&((by.0, d), key)))
                    };
                    if !known {
                        return Err(format!(
                            "device {me:?}: receipt kind {} from {by:?} for message {id} it never acked or read",
                            r.kind
                        ));
                    }
                    self.receipts_received.insert((by, key, r.kind));
                }
                self.on_entry(
                    c,
                    r.sequence,
                    Entry::Receipt(r.kind, r.by_user_id, r.client_message_ids.clone()),
                )?;
            }
            other => return Err(format!("device {me:?}: unexpected frame {other:?}")),
        }
        Ok(())
    }

    /// Checks an inbox entry's sequence: increasing in the session, and one
    /// entry per sequence ever.
    fn on_entry(&mut self, c: usize, seq: u64, entry: Entry) -> Result<(), String> {
        let client = &mut self.clients[c];
        let me = (client.user, client.device);
        if seq <= client.session_last_seq {
            return Err(format!(
                "device {me:?}: seq {seq} after {} in one session",
                client.session_last_seq
            ));
        }
        client.session_last_seq = seq;
        if let Some(previous) = client.by_seq.get(&seq) {
            if *previous != entry {
                return Err(format!(
                    "device {me:?}: seq {seq} carried {previous:?}, now {entry:?}"
                ));
            }
        }
        client.by_seq.insert(seq, entry);
        client.to_ack.push(seq);
        let max = self.delivered_max.entry(me).or_default();
        *max = (*max).max(seq);
        Ok(())
    }

    /// Delivers the oldest request or reply of one shard pair.
    fn deliver_channel(&mut self) -> Result<(), String> {
        let n = self.engines.len();
        let mut busy = Vec::new();
        for from in 0..n {
            for to in 0..n {
                if !self.world.requests[from][to].is_empty() {
                    busy.push((true, from, to));
                }
                if !self.world.replies[from][to].is_empty() {
                    busy.push((false, from, to));
                }
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        let (request, from, to) = busy[self.rng.gen_range(0..busy.len())];
        let event = if request {
            Event::Request(self.world.requests[from][to].pop_front().expect("busy"))
        } else {
            Event::Reply(self.world.replies[from][to].pop_front().expect("busy"))
        };
        self.feed(to, event)
    }

    fn channels_busy(&self) -> bool {
        self.world.requests.iter().flatten().any(|q| !q.is_empty())
            || self.world.replies.iter().flatten().any(|q| !q.is_empty())
    }

    fn check_bounds(&self) -> Result<(), String> {
        let window = self.config.limits.delivery_window_messages as usize;
        let frame_max = self.config.limits.frame_bytes_max as usize + 5;
        for engine in self.engines.iter().flatten() {
            for (device, session) in engine.sessions() {
                if session.in_flight() > window {
                    return Err(format!(
                        "{device}: {} in flight, window {window}",
                        session.in_flight()
                    ));
                }
            }
        }
        for (session, out) in &self.world.outputs {
            if out.bytes > self.world.out_max + frame_max + 64 {
                return Err(format!(
                    "session {session} of client {}: {} bytes queued",
                    out.client, out.bytes
                ));
            }
        }
        Ok(())
    }

    fn step_once(&mut self) -> Result<(), String> {
        self.step += 1;
        self.stats.steps += 1;
        let n = self.engines.len();
        let c = self.rng.gen_range(0..self.clients.len());
        match self.rng.gen_range(0..100) {
            0..=7 => {
                if self.clients[c].session.is_none() {
                    self.connect(c)?;
                } else if self.rng.gen_bool(0.3) {
                    self.disconnect(c)?;
                }
            }
            8..=27 => self.send_new(c)?,
            28..=31 => self.retry(c)?,
            32..=46 => {
                let max = self.rng.gen_range(1..=8);
                self.receive(c, max)?;
            }
            47..=54 => self.ack(c)?,
            55..=58 => self.read(c)?,
            59..=76 => self.deliver_channel()?,
            77..=90 => {
                let shard = self.rng.gen_range(0..n);
                self.commit(shard)?;
            }
            91..=93 => self.clock.advance_ms(self.rng.gen_range(1..2_000)),
            94 => {
                // A reconnect that replaces the live session.
                if self.clients[c].session.is_some() {
                    let old = self.clients[c].session;
                    self.connect(c)?;
                    if let Some(old) = old {
                        self.world.outputs.remove(&old);
                    }
                }
            }
            95..=96 => {
                self.stats.faults += 1;
                let s = self.rng.gen_range(0..n);
                match self.rng.gen_range(0..3) {
                    0 => {
                        let full = !self.storages[s].disk_full.get();
                        self.storages[s].disk_full.set(full);
                        self.disk_was_full |= full;
                    }
                    1 => self.storages[s].fsync_fails.set(self.rng.gen_bool(0.3)),
                    _ => self.client_frame(c, Frame::Ping(pb::Ping { nonce: self.step }))?,
                }
            }
            _ => {
                if self.rng.gen_bool(0.4) {
                    self.crash()?;
                }
            }
        }
        self.check_bounds()
    }

    /// No more faults: every client connects and catches up; then every
    /// acknowledged message must have arrived and every acked one's receipt.
    fn heal(&mut self) -> Result<(), String> {
        for storage in &self.storages {
            storage.disk_full.set(false);
            storage.fsync_fails.set(false);
        }
        for round in 0..2_000 {
            let mut moved = false;
            for c in 0..self.clients.len() {
                if self.clients[c].session.is_none() {
                    self.connect(c)?;
                    moved = true;
                }
            }
            for s in 0..self.engines.len() {
                self.commit(s)?;
            }
            while self.channels_busy() {
                self.deliver_channel()?;
                moved = true;
            }
            for c in 0..self.clients.len() {
                let queued = self.clients[c]
                    .session
                    .and_then(|s| self.world.outputs.get(&s))
                    .is_some_and(|o| !o.frames.is_empty());
                if queued {
                    self.receive(c, 64)?;
                    moved = true;
                }
                if !self.clients[c].to_ack.is_empty() {
                    self.ack(c)?;
                    moved = true;
                }
                if round % 10 == 0 && !self.clients[c].outstanding.is_empty() {
                    let frames: Vec<Frame> =
                        self.clients[c].outstanding.values().cloned().collect();
                    for frame in frames {
                        self.client_frame(c, frame)?;
                    }
                    moved = true;
                }
            }
            let settled = self.engines.iter().flatten().all(|e| e.commit_idle());
            if !moved && settled {
                return self.check_end();
            }
        }
        Err("the system did not settle within 2,000 rounds".into())
    }

    fn check_end(&self) -> Result<(), String> {
        // Every acknowledged group message reached every device of every
        // member but the sending one, and each device read its groups'
        // messages in the groups' order.
        for (key, group_seq) in &self.group_acked {
            let (group, _) = &self.group_sent[key];
            let members = &self
                .groups
                .iter()
                .find(|(id, _)| id == group)
                .expect("group")
                .1;
            for &member in members {
                for d in self.devices_of(member) {
                    if (member, d) == (key.0, key.1) {
                        continue;
                    }
                    let c = &self.clients[self.client_of[&(member, d)]];
                    if !c.received.contains_key(key) {
                        return Err(format!(
                            "acknowledged group message {key:?} (group {group} sequence {group_seq}) never reached device {member}/{d}"
                        ));
                    }
                }
            }
        }
        for c in self.clients.iter().filter(|_| !self.power_lost) {
            let mut last: HashMap<u64, u64> = HashMap::new();
            for (seq, (group, group_seq)) in &c.group_seen {
                let previous = last.insert(*group, *group_seq).unwrap_or(0);
                if *group_seq <= previous {
                    return Err(format!(
                        "device {}/{}: group {group} sequence {group_seq} at inbox sequence {seq}, after {previous}",
                        c.user, c.device
                    ));
                }
            }
        }
        for key in &self.server_acked {
            // Group messages are checked above.
            let Some((to, parts)) = self.sent.get(key) else {
                continue;
            };
            for &(to_device, _) in parts {
                let recipient = &self.clients[self.client_of[&(*to, to_device)]];
                if !recipient.received.contains_key(key) {
                    let engine = self.engines[recipient.home].as_ref().expect("running");
                    let inbox = device(*to, to_device);
                    let session = engine.session(inbox);
                    let last_sent = session.map(|s| s.last_sent()).unwrap_or(0);
                    let mut positions = Vec::new();
                    engine
                        .log()
                        .pending_after(inbox, InboxSeq(last_sent), 4, &mut positions);
                    let pending: Vec<_> = positions
                        .iter()
                        .map(|&(q, p)| (q.0, engine.log().is_durable(p)))
                        .collect();
                    return Err(format!(
                        "acknowledged message {key:?} never reached device {to}/{to_device} \
                     (session {session:?}, pending after it: {pending:?})"
                    ));
                }
            }
        }
        for c in &self.clients {
            if !c.outstanding.is_empty() {
                return Err(format!(
                    "device {}/{}: sends never answered: {:?}",
                    c.user,
                    c.device,
                    c.outstanding.keys().collect::<Vec<_>>()
                ));
            }
        }
        if !self.disk_was_full {
            for &(recipient, key) in &self.receipts_owed {
                let kind = pb::ReceiptKind::Delivered as i32;
                if !self.receipts_received.contains(&(recipient, key, kind)) {
                    return Err(format!(
                        "no delivered receipt for message {key:?} acked by device {recipient:?}"
                    ));
                }
            }
        }
        for engine in self.engines.iter().flatten() {
            if !engine.relays_settled() {
                let mut left = Vec::new();
                for target in 0..self.engines.len() as u32 {
                    let inbox = InboxKey::relay_to_shard(ShardId(target));
                    let mut positions = Vec::new();
                    engine
                        .log()
                        .pending_after(inbox, InboxSeq(0), 16, &mut positions);
                    let seqs: Vec<u64> = positions.iter().map(|(q, _)| q.0).collect();
                    if !seqs.is_empty() {
                        left.push((target, seqs));
                    }
                }
                return Err(format!(
                    "shard {}: relayed receipts left (target shard, relay sequences): {left:?}",
                    engine.id
                ));
            }
        }
        Ok(())
    }
}

/// A Send: one payload for an account with only its primary, else one per
/// device (the server refuses anything else).
fn send_frame(id: u64, to: u64, parts: &[(u32, Bytes)]) -> Frame {
    let (payload, device_payloads) = match parts {
        [(1, payload)] => (payload.clone(), vec![]),
        parts => (
            Bytes::new(),
            parts
                .iter()
                .map(|(device, payload)| pb::DevicePayload {
                    device_id: *device,
                    payload: payload.clone(),
                })
                .collect(),
        ),
    };
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload,
        device_payloads,
        ..Default::default()
    })
}

fn run(seed: u64, steps: u64, flaws: Flaws) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, flaws);
    for _ in 0..steps {
        sim.step_once().map_err(|m| sim.fail(m))?;
    }
    sim.heal()
        .map_err(|m| sim.fail(format!("at the end: {m}")))?;
    Ok(sim.stats)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the seeds the environment asks for (default: a few hundred, short),
/// or the one in `SEED`.
#[test]
fn simulated_histories_lose_nothing_acknowledged() {
    let steps = env_u64("SIM_STEPS").unwrap_or(500);
    let (first, count) = match env_u64("SEED") {
        Some(seed) => (seed, 1),
        None => (
            env_u64("SIM_FIRST_SEED").unwrap_or(0),
            env_u64("SIM_SEEDS").unwrap_or(300),
        ),
    };
    let mut total = Stats::default();
    let started = std::time::Instant::now();
    for seed in first..first + count {
        match run(seed, steps, Flaws::default()) {
            Ok(stats) => total += stats,
            Err(f) => panic!(
                "seed {} failed at step {}: {}\nreplay: SEED={} SIM_STEPS={steps} cargo test --release --test simulation",
                f.seed, f.step, f.message, f.seed
            ),
        }
    }
    eprintln!(
        "simulation: {count} seeds x {steps} steps in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        total
    );
}

/// The simulation can fail: with ServerAck sent before the commit (a real
/// past bug), some seed loses an acknowledged message.
#[test]
fn the_simulation_catches_a_server_ack_before_durability() {
    let flaws = Flaws {
        ack_before_durable: true,
    };
    let caught = (0..200).find_map(|seed| run(seed, 300, flaws).err());
    let failure = caught.expect("some seed catches the flaw");
    eprintln!(
        "flaw caught by seed {} at step {}: {}",
        failure.seed, failure.step, failure.message
    );
}
