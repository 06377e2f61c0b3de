//! Starting and stopping the server: the listeners, the channel meshes and
//! one executor per shard.
//!
//! The main thread builds everything that crosses threads before any shard
//! starts (one SO_REUSEPORT listening socket per shard, all on one port; a
//! request and a reply channel for every ordered pair of shards), then waits
//! for a stop signal. Each shard thread opens its own log, connects its
//! channel ends and serves until told to stop.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};
use tracing::{error, info, warn};

use super::start_watch;
use crate::beacon::Beacon;
use crate::config::{usable_cpus, Config};
use crate::ids::ShardId;
use crate::meta::MetaStore;
use crate::metrics::{ShardMetrics, ShardTask};
use crate::route::message::{Reply, Request};
use crate::shard::Shard;
use crate::store::{Log, SystemClock};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot create data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("metadata database: {0}")]
    Meta(#[from] crate::meta::MetaError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, nix::Error),
    #[error("cannot start shard executor: {0}")]
    Executor(String),
    #[error("shard {0} failed to start: {1}")]
    Shard(u32, String),
    #[error("cannot start the media service on {0}: {1}")]
    Media(SocketAddr, std::io::Error),
    #[error("Noise static key {0}: {1}")]
    NoiseKey(PathBuf, String),
    /// The WSS listener's certificate or socket.
    #[error("cannot start the WSS listener: {0}")]
    Wss(#[from] crate::wss::WssError),
}

/// Listen backlog per shard socket (the kernel caps it at somaxconn).
const LISTEN_BACKLOG: i32 = 4096;

/// What the caller learns once every shard is serving.
#[derive(Clone, Debug)]
pub struct Running {
    pub listen: SocketAddr,
    pub shards: u32,
    /// The media listener, when it runs.
    pub media: Option<SocketAddr>,
    /// The Noise static public key clients pin, when Noise is on.
    pub noise_key: Option<[u8; 32]>,
    /// The WSS (browser) listener, when it runs.
    pub wss: Option<SocketAddr>,
}

/// The counters of the services that run beside the shards, which the
/// admin endpoint reads.
#[derive(Clone, Debug, Default)]
pub struct ServiceStats {
    /// The push thread's.
    pub push: Arc<crate::push::PushStats>,
    /// The media service's.
    pub media: Arc<crate::media::stats::MediaStats>,
    /// The WSS listener's.
    pub wss: Arc<crate::wss::stats::WssStats>,
}

/// How the caller steers a running server.
#[derive(Clone, Debug, Default)]
pub struct Controls {
    /// Raised to stop: the shards drain and `run` returns.
    pub stop: Arc<Beacon>,
    /// Raised to make the WSS listener read its certificate files again;
    /// the binary does it on SIGHUP.
    pub reload: Arc<Beacon>,
}

/// Puts the calling thread under SCHED_FIFO at `priority` (1-99). Threads
/// it starts later inherit the policy. Fails without CAP_SYS_NICE or an
/// `RLIMIT_RTPRIO` at least `priority`. The bench's workers use it too.
pub fn sched_fifo_this_thread(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // names the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Puts the calling shard thread under SCHED_FIFO at `priority`
/// (`server.shard_realtime_priority`; 0: leaves it as it is). Threads it
/// starts later (the kernel's io-wq workers for its rings) inherit the
/// policy; the executor's blocking pool, started before, does not.
fn run_realtime(shard: usize, priority: u8) {
    if priority == 0 {
        return;
    }
    match sched_fifo_this_thread(priority) {
        Ok(()) => info!(shard, priority, "shard thread runs under SCHED_FIFO"),
        Err(err) => {
            warn!(shard, priority, %err, "server.shard_realtime_priority: could not set SCHED_FIFO (needs CAP_SYS_NICE); the shard runs as an ordinary thread")
        }
    }
}

/// Largest descriptor table made ahead (`presize_descriptor_table`): 8 M
/// descriptors, 64 MiB of table.
const DESCRIPTOR_TABLE_AHEAD_MAX: u64 = 1 << 23;

/// Grows the process's descriptor table once, now, to the open-file limit
/// (at most `DESCRIPTOR_TABLE_AHEAD_MAX`), and returns the number of
/// descriptors it was sized for.
///
/// The kernel doubles the table when a new descriptor does not fit, and in
/// a process with more than one thread it then waits for an RCU grace
/// period (`expand_files` → `synchronize_rcu`) in whatever call made the
/// descriptor: an accept on a shard's ring, a segment's open. That held a
/// shard's thread 15 ms in the trace that found it, while its clients
/// waited (a grace period takes 4-20 ms on a busy 2-CPU host). Made ahead,
/// the table never grows while the server serves. It costs 8 bytes per
/// descriptor of the limit (8 MiB at a limit of a million), the memory a
/// server holding that many sockets needs for its table anyway.
fn presize_descriptor_table() -> std::io::Result<u64> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let size = soft.min(DESCRIPTOR_TABLE_AHEAD_MAX);
    if size < 2 {
        return Ok(size);
    }
    let null = std::fs::File::open("/dev/null")?;
    let top = i32::try_from(size - 1).unwrap_or(i32::MAX);
    let raw = nix::fcntl::fcntl(null.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(top))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else
    // owns; the OwnedFd closes it, and the table keeps its size.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
    Ok(size)
}

/// Binds `shards` listening sockets with SO_REUSEPORT on one address; a port
/// of 0 is resolved by the first bind and reused by the rest.
///
/// SO_REUSEPORT also lets a socket of another process of the same user join
/// the group: a second server started on a taken port by mistake would bind
/// without error and take part of the first one's connections. So a named
/// port is first bound by a probe socket without SO_REUSEPORT, which fails
/// with `EADDRINUSE` while anything listens there; the server then refuses
/// to start. (A port of 0 needs no probe: the kernel picks a port no
/// socket holds.)
fn bind_listeners(
    addr: SocketAddr,
    shards: u32,
) -> Result<(SocketAddr, Vec<OwnedFd>), ServerError> {
    if addr.port() != 0 {
        probe_unshared(addr).map_err(|e| ServerError::Listen(addr, e))?;
    }
    let mut bound = addr;
    let mut fds = Vec::new();
    for _ in 0..shards {
        let err = |e| ServerError::Listen(addr, e);
        let fd = socket::socket(
            family_of(bound),
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err)?;
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(err)?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
        let storage = SockaddrStorage::from(bound);
        socket::bind(fd.as_raw_fd(), &storage).map_err(err)?;
        socket::listen(
            &fd,
            Backlog::new(LISTEN_BACKLOG).unwrap_or(Backlog::MAXCONN),
        )
        .map_err(err)?;
        let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).map_err(err)?;
        if let Some(v4) = local.as_sockaddr_in() {
            bound = SocketAddr::from((v4.ip(), v4.port()));
        } else if let Some(v6) = local.as_sockaddr_in6() {
            bound = SocketAddr::from((v6.ip(), v6.port()));
        }
        fds.push(fd);
    }
    Ok((bound, fds))
}

/// Binds `addr` with SO_REUSEADDR only (TIME_WAIT connections of an
/// earlier run do not block it) and closes the socket again: `EADDRINUSE`
/// when a socket listens there, SO_REUSEPORT or not.
fn probe_unshared(addr: SocketAddr) -> Result<(), nix::Error> {
    let probe = socket::socket(
        family_of(addr),
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&probe, sockopt::ReuseAddr, &true)?;
    socket::bind(probe.as_raw_fd(), &SockaddrStorage::from(addr))
}

fn family_of(addr: SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

type Mesh<T> = (
    Vec<Vec<Option<SharedSender<T>>>>,
    Vec<Vec<Option<SharedReceiver<T>>>>,
);

/// One bounded channel per ordered pair of shards: `senders[from][to]`,
/// `receivers[to][from]`.
fn build_mesh<T: Send + 'static>(shards: usize, capacity: usize) -> Mesh<T> {
    let mut senders: Vec<Vec<Option<SharedSender<T>>>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    let mut receivers: Vec<Vec<Option<SharedReceiver<T>>>> = (0..shards)
        .map(|_| (0..shards).map(|_| None).collect())
        .collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(capacity);
                senders[from][to] = Some(tx);
                receivers[to][from] = Some(rx);
            }
        }
    }
    (senders, receivers)
}

struct ShardStart {
    id: ShardId,
    shards: u32,
    config: Arc<Config>,
    meta: Arc<MetaStore>,
    metrics: Arc<ShardMetrics>,
    listener: OwnedFd,
    request_senders: Vec<Option<SharedSender<Request>>>,
    request_receivers: Vec<Option<SharedReceiver<Request>>>,
    reply_senders: Vec<Option<SharedSender<Reply>>>,
    reply_receivers: Vec<Option<SharedReceiver<Reply>>>,
    stop: Arc<Beacon>,
    /// Shards still draining after a stop: each stays up, answering the
    /// others' requests (receipts relayed to it), until it reaches 0.
    draining: Arc<AtomicU32>,
    ready: crossbeam_channel::Sender<Result<ShardId, String>>,
    /// Set by the shard as it reports ready (see `start_watch`).
    serving: Arc<AtomicBool>,
    pusher: Option<crate::push::Pusher>,
    /// What grants need: the media key and the base URL handed out.
    media: Option<(crate::media::token::MediaKey, Arc<str>)>,
    /// The Noise static keys (`None`: Noise is off).
    noise_keys: Option<Arc<crate::noise::ServerKeys>>,
}

/// Runs the server until `controls.stop` is set; calls `on_ready` once every
/// shard serves. Returns after every shard has drained and stopped.
pub fn run(
    config: Config,
    metrics: Vec<Arc<ShardMetrics>>,
    stats: ServiceStats,
    controls: Controls,
    on_ready: impl FnOnce(&Running),
) -> Result<(), ServerError> {
    let Controls { stop, reload } = controls;
    config.validate()?;
    match presize_descriptor_table() {
        Ok(size) => info!(
            descriptors = size,
            "descriptor table sized for the open-file limit"
        ),
        Err(err) => {
            warn!(%err, "could not size the descriptor table ahead; it grows as sockets come")
        }
    }
    let shards = config.shard_count();
    assert_eq!(
        metrics.len(),
        shards as usize,
        "one metrics block per shard"
    );
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| ServerError::DataDir(data_dir.clone(), e))?;
    let meta = Arc::new(MetaStore::open(&data_dir.join("meta.redb"))?);
    let pusher = if config.push.enabled {
        let pusher = crate::push::start(&config.push, &data_dir, meta.clone(), stats.push)
            .map_err(|e| ServerError::DataDir(data_dir.join(crate::push::VAPID_FILE), e))?;
        Some(pusher)
    } else {
        None
    };
    let media_service = if config.media.enabled {
        let key = crate::media::token::MediaKey::load_or_create(&data_dir)
            .map_err(|e| ServerError::DataDir(data_dir.join(crate::media::token::KEY_FILE), e))?;
        let service = crate::media::start(
            &config.media,
            &data_dir,
            key.clone(),
            stats.media,
            stop.clone(),
        )
        .map_err(|e| ServerError::Media(config.media.listen, e))?;
        Some((service, key))
    } else {
        None
    };
    let media = media_service
        .as_ref()
        .map(|(service, key)| (key.clone(), Arc::<str>::from(service.public_url.as_str())));
    let noise_keys = if config.server.noise {
        let keys = crate::noise::ServerKeys::load_or_create(&data_dir).map_err(|e| {
            ServerError::NoiseKey(data_dir.join(crate::noise::keys::KEY_FILE), e.to_string())
        })?;
        info!(
            fingerprint = %crate::noise::fingerprint(keys.public()),
            previous = keys.get(crate::noise::KeySlot::Previous).is_some(),
            "noise static key"
        );
        Some(Arc::new(keys))
    } else {
        None
    };
    let (listen, listeners) = bind_listeners(config.server.listen, shards)?;
    // Browsers are bridged to the listeners just bound; until the shards
    // accept, a bridge's connection waits in their backlog.
    let wss_service = if config.wss.enabled {
        Some(crate::wss::start(
            &config.wss,
            crate::wss::upstream::target(listen),
            stats.wss,
            stop.clone(),
            reload,
        )?)
    } else {
        None
    };
    let capacity = config.limits.shard_channel_capacity as usize;
    let (mut req_tx, mut req_rx) = build_mesh::<Request>(shards as usize, capacity);
    let (mut rep_tx, mut rep_rx) = build_mesh::<Reply>(shards as usize, capacity);
    let config = Arc::new(config);
    let cpus = usable_cpus();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(shards as usize);
    let mut handles = Vec::new();
    let draining = Arc::new(AtomicU32::new(shards));
    for (index, listener) in listeners.into_iter().enumerate() {
        let start = ShardStart {
            id: ShardId(index as u32),
            shards,
            config: config.clone(),
            meta: meta.clone(),
            metrics: metrics[index].clone(),
            listener,
            request_senders: std::mem::take(&mut req_tx[index]),
            request_receivers: std::mem::take(&mut req_rx[index]),
            reply_senders: std::mem::take(&mut rep_tx[index]),
            reply_receivers: std::mem::take(&mut rep_rx[index]),
            stop: stop.clone(),
            draining: draining.clone(),
            ready: ready_tx.clone(),
            serving: Arc::new(AtomicBool::new(false)),
            pusher: pusher.clone(),
            media: media.clone(),
            noise_keys: noise_keys.clone(),
        };
        // Placement: one shard per usable CPU when pinning (the thread-per-
        // core contract); unbound when shards outnumber CPUs or in tests.
        let placement = if config.server.pin_cpus && (shards as usize) <= cpus.len() {
            Placement::Fixed(cpus[index])
        } else {
            Placement::Unbound
        };
        let builder = LocalExecutorBuilder::new(placement)
            // Polled I/O is not used; no spinning so an idle shard sleeps.
            .spin_before_park(Duration::from_millis(0))
            .preempt_timer(START_PREEMPT_INTERVAL);
        let serving = start.serving.clone();
        let realtime_priority = config.server.shard_realtime_priority;
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let thread_tid = tid.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || {
                thread_tid.store(nix::unistd::gettid().as_raw(), Ordering::SeqCst);
                match builder.make() {
                    Ok(executor) => {
                        // After the executor is made, so the blocking pool
                        // it starts stays ordinary.
                        run_realtime(index, realtime_priority);
                        executor.run(shard_main(start))
                    }
                    Err(err) => {
                        let _ = start
                            .ready
                            .send(Err(format!("creating its executor: {err}")));
                    }
                }
            })
            .map_err(|e| ServerError::Executor(e.to_string()))?;
        handles.push(start_watch::Starting::new(
            index as u32,
            thread,
            tid,
            serving,
        ));
    }
    drop(ready_tx);
    start_watch::install();
    let mut ready = 0;
    while ready < shards {
        match ready_rx.recv_timeout(start_watch::INTERVAL) {
            Ok(Ok(_)) => ready += 1,
            Ok(Err(message)) => {
                stop.raise();
                return Err(ServerError::Shard(ready, message));
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                for starting in &mut handles {
                    starting.wake_if_parked();
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(ServerError::Shard(ready, "exited during start".into()));
            }
        }
    }
    let woken: u32 = handles.iter().map(|starting| starting.woken).sum();
    if woken > 0 {
        info!(woken, "shard threads woken while starting");
    }
    on_ready(&Running {
        listen,
        shards,
        media: media_service.as_ref().map(|(service, _)| service.addr),
        noise_key: noise_keys.as_ref().map(|keys| *keys.public()),
        wss: wss_service.as_ref().map(|service| service.addr),
    });
    // While the shards serve, wake any that glommio parked with its work
    // unrun (`start_watch`); then join them as they end.
    while !handles.iter().all(|h| h.thread.is_finished()) {
        std::thread::sleep(start_watch::SERVING_INTERVAL);
        let now = crate::metrics::monotonic_ms();
        for handle in &mut handles {
            let shard = &metrics[handle.shard as usize];
            if handle.wake_if_stalled(&shard.liveness, now) {
                shard.parked_wakes.inc();
            }
        }
    }
    for handle in handles {
        if handle.thread.join().is_err() {
            error!(shard = handle.shard, "shard thread panicked");
        }
    }
    if let Some((service, _)) = media_service {
        service.join();
    }
    if let Some(service) = wss_service {
        service.join();
    }
    Ok(())
}

async fn shard_main(start: ShardStart) {
    let id = start.id;
    crate::net::conn::set_thread_metrics(start.metrics.clone());
    let log_dir = start.config.server.data_dir.join(format!("shard-{}", id.0));
    let clock: Rc<dyn crate::store::Clock> = Rc::new(SystemClock);
    let opened = Log::open(&log_dir, id, &start.config.store, clock.clone());
    let log = match opened {
        Ok((mut log, report)) => {
            log.set_dedupe_capacity(start.config.limits.dedupe_entries_max as usize);
            info!(
                shard = %id,
                segments = report.segments,
                records = report.records,
                pending = report.messages_pending,
                torn_tail_bytes = report.torn_tail_truncated_bytes,
                "log recovered"
            );
            for corruption in &report.corruptions {
                warn!(shard = %id, segment = corruption.segment, offset = corruption.offset, reason = corruption.reason, "corrupt record skipped; inspect with `switchboard log inspect`");
            }
            log
        }
        Err(err) => {
            let _ = start.ready.send(Err(format!("opening its log: {err}")));
            return;
        }
    };

    // Connect every channel end; a connect waits for its peer's, so the
    // receivers connect in their own tasks.
    let mut receiver_tasks = Vec::new();
    for rx in start.request_receivers.into_iter().flatten() {
        receiver_tasks.push(glommio::spawn_local(async move {
            Some(repolled(rx.connect()).await)
        }));
    }
    let mut reply_receiver_tasks = Vec::new();
    for rx in start.reply_receivers.into_iter().flatten() {
        reply_receiver_tasks.push(glommio::spawn_local(async move {
            Some(repolled(rx.connect()).await)
        }));
    }
    let mut requests = Vec::new();
    for tx in start.request_senders {
        requests.push(match tx {
            Some(tx) => Some(repolled(tx.connect()).await),
            None => None,
        });
    }
    let mut replies = Vec::new();
    for tx in start.reply_senders {
        replies.push(match tx {
            Some(tx) => Some(repolled(tx.connect()).await),
            None => None,
        });
    }
    let sockets = match crate::shard::io::Sockets::new(&start.config, start.noise_keys.clone()) {
        Ok(sockets) => sockets,
        Err(err) => {
            let _ = start
                .ready
                .send(Err(format!("setting up its socket ring: {err}")));
            return;
        }
    };
    crate::net::conn::set_thread_notifier(sockets.notifier());
    let mut engine = crate::engine::Engine::new(
        id,
        start.shards,
        start.config.limits.clone(),
        log,
        start.meta.clone(),
        start.metrics.clone(),
        clock,
    );
    // The groups homed here (read before the shard serves anything).
    let shards = start.shards;
    match start
        .meta
        .load_groups(|group| crate::route::shard_for(group, shards) == id)
    {
        Ok(groups) => engine.load_groups(groups),
        Err(err) => {
            let _ = start.ready.send(Err(format!("loading its groups: {err}")));
            return;
        }
    }
    if let Some((key, url)) = &start.media {
        engine.enable_media(
            key.clone(),
            url.clone(),
            start.config.media.grant_ttl_s.saturating_mul(1_000),
            start.config.media.blob_bytes_max,
        );
    }
    if let Some(pusher) = &start.pusher {
        engine.enable_push(
            pusher.vapid_public_key.clone(),
            pusher.webhook,
            start.config.push.allow_http_endpoints,
            u64::from(start.config.push.interval_ms),
        );
    }
    // Its users' last seen and privacy.
    match start
        .meta
        .load_presence(|user| crate::route::shard_for(user, shards) == id)
    {
        Ok((last_seen, hidden)) => engine.load_presence(last_seen, hidden),
        Err(err) => {
            let _ = start.ready.send(Err(format!("loading presence: {err}")));
            return;
        }
    }
    let shard = Rc::new(Shard::new(
        id,
        start.shards,
        start.config.clone(),
        start.meta,
        start.metrics,
        engine,
        requests,
        replies,
        sockets,
        start.pusher,
    ));
    for task in receiver_tasks {
        let Some(rx) = task.await else { continue };
        let task_shard = shard.clone();
        shard.spawn(ShardTask::Channels, async move {
            while let Some(request) = rx.recv().await {
                task_shard.handle_request(request);
                // A full channel drains in bounded slices between other work.
                glommio::yield_if_needed().await;
            }
        });
    }
    for task in reply_receiver_tasks {
        let Some(rx) = task.await else { continue };
        let task_shard = shard.clone();
        shard.spawn(ShardTask::Channels, async move {
            while let Some(reply) = rx.recv().await {
                task_shard.on_reply(reply);
                glommio::yield_if_needed().await;
            }
        });
    }
    shard.spawn(ShardTask::Commit, shard.clone().commit_loop());
    shard.spawn(
        ShardTask::Maintenance,
        maintenance(shard.clone(), start.stop.clone()),
    );
    // Receipts a crash left between this shard and their home shard.
    let relaying = shard.clone();
    shard.spawn(
        ShardTask::Other,
        async move { relaying.forward_relayed().await },
    );

    // Accepted sockets inherit TCP_NODELAY from the listener.
    if let Err(err) = socket::setsockopt(&start.listener, sockopt::TcpNoDelay, &true) {
        warn!(shard = %id, %err, "TCP_NODELAY not set on the listener");
    }
    if let Err(err) = shard.sockets.listen(start.listener) {
        let _ = start
            .ready
            .send(Err(format!("accepting on its listener: {err}")));
        return;
    }
    let socket_loop =
        shard.spawn_joinable(ShardTask::Sockets, crate::shard::io::run(shard.clone()));
    shard.metrics.set_recovered(true);
    start.serving.store(true, Ordering::SeqCst);
    let _ = start.ready.send(Ok(id));
    shard.stopping_begun().await;

    // Stopping: no new sockets, GoAway to everyone, let sessions flush,
    // finish pending commits, then close what is left.
    info!(shard = %id, "stopping");
    crate::shard::io::stop_accepting(&shard);
    crate::shard::io::go_away_all(&shard);
    let deadline =
        Instant::now() + Duration::from_millis(start.config.limits.shutdown_deadline_ms as u64);
    let mut drained = false;
    while Instant::now() < deadline {
        shard.kick_commit();
        if !drained
            && shard.commits_settled()
            && shard.relays_settled()
            && shard.sockets.session_count() == 0
            && shard.sockets.connections() == 0
        {
            drained = true;
            start.draining.fetch_sub(1, Ordering::SeqCst);
        }
        // Drained, a shard still answers the others until they are too.
        if drained && start.draining.load(Ordering::SeqCst) == 0 {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    // The commit loop also commits what was appended last (acks, receipts).
    let settle_deadline = Instant::now() + Duration::from_millis(500);
    while !shard.commits_settled() && Instant::now() < settle_deadline {
        shard.kick_commit();
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    crate::shard::io::shutdown(&shard);
    let closed = futures_lite::future::or(
        async {
            socket_loop.await;
            true
        },
        async {
            glommio::timer::sleep(Duration::from_secs(5)).await;
            false
        },
    )
    .await;
    if !closed {
        warn!(shard = %id, "socket ring still busy at exit");
    }
    // Last-seen times (the sessions just closed included) and any database
    // call still running finish before the executor ends: the blocking
    // pool cannot answer an executor that has.
    shard
        .settle_blocking(Instant::now() + Duration::from_secs(2))
        .await;
    info!(shard = %id, "stopped");
}

/// How long a shard's task may run before the executor looks at its rings.
///
/// glommio reaps its main ring (where the commit's fdatasync completes)
/// only when its task queues run dry or this timer fires. A busy socket
/// loop never runs dry, so a finished fdatasync waited for the timer: at
/// 5 ms, commits at 245,000 group deliveries/s took 8-10 ms instead of the
/// disk's 0.6, and the members' deliveries waited with them. 1 ms cut that
/// to about 3 ms and the deliver p99 from 53-56 to 38-45 ms (six runs). In
/// 1:1 runs the CPU per message moved within noise with `os` (2,000-20,000
/// msg/s) and by up to 6 % with `fsync` at 20,000 msg/s, whose p99 fell
/// from 19-23 to 12-16 ms (docs/benchmarks.md, "The executor's preemption
/// timer"). Shorter costs: 250 µs took 17-28 % more CPU per message at
/// 10,000 msg/s with `os`.
pub const PREEMPT_INTERVAL: Duration = Duration::from_millis(1);

/// The executor's own preemption timer, which applies while no task of the
/// shard's queue (`shard_task_queue`, `PREEMPT_INTERVAL`) is runnable: at
/// start, before the shard's first task runs.
///
/// glommio 0.9 arms the timer, then runs its task queues, and stops before
/// the first if the timer has already fired; it then parks as if nothing
/// were runnable. A thread descheduled for longer than the timer in that
/// window at start parked with the shard's first task never run and
/// nothing to wake it: one start in about 250 with six two-shard servers
/// starting at once on two CPUs, at 1 ms (and at 5 ms too). A timer this
/// long makes that window need a 100 ms stall.
const START_PREEMPT_INTERVAL: Duration = Duration::from_millis(100);

/// A task queue for the shard's tasks whose latency requirement sets the
/// executor's preemption timer to `PREEMPT_INTERVAL` while any of them is
/// runnable. Must be called on the shard's executor.
pub fn shard_task_queue() -> glommio::TaskQueueHandle {
    glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(PREEMPT_INTERVAL),
        "shard",
    )
}

/// Awaits `future`, polling it again every few milliseconds even when
/// nothing wakes it.
///
/// glommio 0.9's shared-channel `connect` can miss the wake-up sent when the
/// peer executor connects its end: both shards then park forever at start
/// (seen about once in 60 restarts here). Its connect future re-checks the
/// peer on every poll, so polling it again on a short timer makes the start
/// certain; it is only used while the shards connect.
async fn repolled<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    loop {
        let attempt = futures_lite::future::or(async { Some((&mut future).await) }, async {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            None
        })
        .await;
        if let Some(output) = attempt {
            return output;
        }
    }
}

/// Items the maintenance timer handles before it lets the shard's other
/// tasks run (sockets looked at by the idle sweep, handshakes expired): a
/// slice of closes takes a few milliseconds.
const MAINTENANCE_SLICE: usize = 1024;

/// Periodic work: stop requests, idle sessions, expiry.
async fn maintenance(shard: Rc<Shard>, stop: Arc<Beacon>) {
    let mut last_expiry = Instant::now();
    let mut last_sweep = Instant::now();
    let mut last_seen_written = Instant::now();
    let stall_limit_ms = u64::from(shard.config.server.shard_stall_ready_ms);
    let mut stall_reported = false;
    loop {
        glommio::timer::sleep(Duration::from_millis(100)).await;
        // Liveness first, before this tick's own work wakes the loop: work the
        // socket ring held across a whole tick with no loop turn is a stall.
        let now_ms = crate::metrics::monotonic_ms();
        let liveness = &shard.metrics.liveness;
        liveness.tick(now_ms, shard.sockets.loop_work_waiting());
        let stalled_ms = liveness.stalled_ms(now_ms);
        if stalled_ms > stall_limit_ms && !stall_reported {
            stall_reported = true;
            error!(shard = %shard.id, stalled_ms, "the socket loop has had work waiting without running it");
        } else if stalled_ms == 0 && stall_reported {
            stall_reported = false;
            info!(shard = %shard.id, "the socket loop runs again");
        }
        // A wake-up the kernel never delivered costs at most one tick.
        if shard.sockets.loop_work_waiting() {
            shard.sockets.notifier().notify();
        }
        if stop.raised() && !shard.stopping.get() {
            shard.begin_stopping();
        }
        // Idle sessions are found by one pass a second over the shard's
        // sessions rather than a timer per connection (which would cost
        // memory on every idle socket).
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            let mut next = Some(0);
            while let Some(start) = next {
                next = crate::shard::io::sweep_idle(&shard, start, MAINTENANCE_SLICE);
                glommio::executor().yield_now().await;
            }
        }
        if shard.engine.borrow().presence_due() {
            shard.tick();
        }
        while crate::shard::io::expire_handshakes(&shard, MAINTENANCE_SLICE) {
            // A burst of timeouts is closed a slice at a time, so sessions
            // that are still talking get their turns in between.
            glommio::executor().yield_now().await;
        }
        shard.sockets.publish(&shard.metrics);
        // Cheap (a pass over the segments, not the inboxes), so the gauges
        // are at most a tick old, from the first tick after recovery on.
        shard.publish_log_gauges();
        shard.prepare_spare();
        if last_expiry.elapsed() >= Duration::from_secs(10) {
            last_expiry = Instant::now();
            let expired = shard.engine.borrow_mut().log_mut().expire_and_reclaim();
            match expired {
                Ok(0) => {}
                Ok(n) => {
                    shard.metrics.messages_expired.add(n);
                    info!(shard = %shard.id, expired = n, "expired inbox entries dropped")
                }
                Err(err) => warn!(shard = %shard.id, %err, "expiry pass failed"),
            }
        }
        if last_seen_written.elapsed() >= Duration::from_secs(5) {
            last_seen_written = Instant::now();
            shard.write_last_seen().await;
        }
        if shard.stopping.get() && shard.sockets.session_count() == 0 && shard.commits_settled() {
            shard.write_last_seen().await;
            return;
        }
    }
}
