//! Test support for the engine's features: an engine on a real log in a
//! temporary directory, a manual clock, a directory of users, and a host
//! that records what the engine did.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Closing, Directory, Engine, Event, Host, Reply, Request, SessionId};
use crate::config::Config;
use crate::ids::{DeviceId, InboxKey, ShardId, UserId, PRIMARY_DEVICE};
use crate::metrics::ShardMetrics;
use crate::proto::{pb, Frame};
use crate::store::storage::{RealStorage, Storage};
use crate::store::{Log, ManualClock};

/// Users 1..=`users` exist, each with its primary device and the
/// companions a test gives it.
pub struct Users {
    pub count: u64,
    /// user → every device of the account (primary included), for accounts
    /// with companions.
    pub companions: Mutex<HashMap<u64, Vec<DeviceId>>>,
}

impl Users {
    pub fn new(count: u64) -> Users {
        Users {
            count,
            companions: Mutex::new(HashMap::new()),
        }
    }

    /// Gives `user` these devices (the primary is added).
    pub fn set_devices(&self, user: u64, companions: &[u32]) {
        let mut devices = vec![PRIMARY_DEVICE];
        devices.extend(companions.iter().map(|&d| DeviceId(d)));
        let mut map = self.companions.lock().unwrap();
        if companions.is_empty() {
            map.remove(&user);
        } else {
            map.insert(user, devices);
        }
    }
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
        self.companions.lock().unwrap().contains_key(&user.0)
    }
    fn device_set(&self, user: UserId) -> Option<(u64, Vec<DeviceId>)> {
        if !self.user_exists(user) {
            return None;
        }
        let map = self.companions.lock().unwrap();
        Some(match map.get(&user.0) {
            Some(devices) => (2, devices.clone()),
            None => (1, vec![PRIMARY_DEVICE]),
        })
    }
}

/// Everything the engine asked of its host, in order.
#[derive(Default)]
pub struct Recorder {
    pub frames: Vec<(SessionId, Frame)>,
    pub closes: Vec<(SessionId, Closing)>,
    pub requests: Vec<(ShardId, Request)>,
    pub replies: Vec<(ShardId, Reply)>,
    pub commits_due: u32,
    pub account_ops: Vec<super::devices::AccountOp>,
    pub group_ops: Vec<super::groups::GroupOp>,
    pub keys_ops: Vec<super::keys::KeysOp>,
    pub wakes: Vec<InboxKey>,
    /// Sessions whose output queue counts as full.
    pub full: HashSet<SessionId>,
}

impl Recorder {
    /// Takes the frames sent to `session`.
    pub fn take_frames(&mut self, session: SessionId) -> Vec<Frame> {
        let (mine, rest): (Vec<_>, Vec<_>) =
            self.frames.drain(..).partition(|(s, _)| *s == session);
        self.frames = rest;
        mine.into_iter().map(|(_, f)| f).collect()
    }
}

impl Host for Recorder {
    fn send(&mut self, session: SessionId, frame: &Frame) {
        self.frames.push((session, frame.clone()));
    }
    fn close(&mut self, session: SessionId, frame: &Frame, closing: Closing) {
        self.frames.push((session, frame.clone()));
        self.closes.push((session, closing));
    }
    fn output_full(&self, session: SessionId) -> bool {
        self.full.contains(&session)
    }
    fn closing(&self, session: SessionId) -> bool {
        self.closes.iter().any(|(s, _)| *s == session)
    }
    fn request(&mut self, shard: ShardId, request: Request) {
        self.requests.push((shard, request));
    }
    fn reply(&mut self, shard: ShardId, reply: Reply) {
        self.replies.push((shard, reply));
    }
    fn commit_due(&mut self) {
        self.commits_due += 1;
    }
    fn account(&mut self, op: super::devices::AccountOp) {
        self.account_ops.push(op);
    }
    fn group(&mut self, op: super::groups::GroupOp) {
        self.group_ops.push(op);
    }
    fn keys(&mut self, op: super::keys::KeysOp) {
        self.keys_ops.push(op);
    }
    fn wake(&mut self, device: InboxKey) {
        self.wakes.push(device);
    }
}

/// An engine for shard `id` of `shards`, with users 1..=20.
pub struct Fixture {
    pub engine: Engine,
    pub host: Recorder,
    /// The engine's and the log's clock (tests move it to expire entries).
    #[allow(dead_code)]
    pub clock: Rc<ManualClock>,
    /// The engine's directory (tests give users companions).
    #[allow(dead_code)]
    pub users: Arc<Users>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(id: u32, shards: u32) -> Fixture {
        Fixture::with_storage(id, shards, Rc::new(RealStorage))
    }

    /// An engine whose log runs on `storage` (a `SimStorage` to inject
    /// faults).
    pub fn with_storage(id: u32, shards: u32, storage: Rc<dyn Storage>) -> Fixture {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = Config::for_tests(dir.path());
        let clock = Rc::new(ManualClock::starting_now());
        let (log, _) = Log::open_with_storage(
            dir.path(),
            ShardId(id),
            &config.store,
            clock.clone(),
            storage,
        )
        .expect("log opens");
        let users = Arc::new(Users::new(20));
        let engine = Engine::new(
            ShardId(id),
            shards,
            config.limits.clone(),
            log,
            users.clone(),
            Arc::new(ShardMetrics::default()),
            clock.clone(),
        );
        Fixture {
            engine,
            host: Recorder::default(),
            clock,
            users,
            _dir: dir,
        }
    }

    pub fn handle(&mut self, event: Event) {
        self.engine.handle(event, &mut self.host);
    }

    /// Makes everything appended durable and tells the engine.
    pub fn commit(&mut self) {
        self.handle(Event::BeforeCommit);
        if let Some(batch) = self.engine.log_mut().begin_commit() {
            batch.sync_blocking().expect("sync");
            self.engine.log_mut().finish_commit(batch);
        }
        self.handle(Event::Durable);
    }

    pub fn open(&mut self, user: u64, session: SessionId) {
        self.handle(Event::Opened {
            device: device(user),
            session,
            connected_at: session as u32,
            protocol_version: 1,
        });
    }

    pub fn frame(&mut self, user: u64, session: SessionId, frame: Frame) {
        self.handle(Event::Frame {
            device: device(user),
            session,
            frame,
        });
    }

    pub fn send(&mut self, from: u64, session: SessionId, id: u64, to: u64, payload: &[u8]) {
        self.frame(
            from,
            session,
            Frame::Send(pb::Send {
                client_message_id: id,
                recipient_user_id: to,
                payload: Bytes::copy_from_slice(payload),
                device_payloads: vec![],
                ..Default::default()
            }),
        );
    }
}

pub fn device(user: u64) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: PRIMARY_DEVICE,
    }
}

/// A user homed on shard `shard` of `shards`, from 1 up.
pub fn user_on(shard: u32, shards: u32, nth: usize) -> u64 {
    (1..=20)
        .filter(|&u| crate::route::home_shard(UserId(u), shards) == ShardId(shard))
        .nth(nth)
        .expect("enough users on the shard")
}
