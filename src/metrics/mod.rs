//! Counters, gauges and the admin HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
//!
//! Ownership: each shard owns one `Arc<ShardMetrics>` and is its only writer. Every
//! field is an atomic updated with `Relaxed` ordering, so the hot path pays one
//! uncontended add on a cache line no other core writes. Readers (the admin thread
//! rendering a scrape) see each value atomically but not a consistent snapshot across
//! fields; Prometheus does not need one.
//!
//! The admin server runs on its own std thread, never on a shard, and serves one
//! bounded request per connection; a slow or hostile scraper costs at most the read
//! timeout and never touches a shard.
//!
//! Invariants: the metric arrays are fixed-size and allocated once at start; nothing
//! here allocates on the shard's path. Rendering allocates, but only on the admin
//! thread.

mod admin;

pub use admin::{serve_admin, AdminServer, ADMIN_READ_TIMEOUT, ADMIN_REQUEST_BYTES_MAX};

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::proto::{ErrorCode, FrameType};

/// A monotonically increasing count, written by one shard.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Mirrors a total counted elsewhere (it only grows there).
    #[inline]
    pub fn set_total(&self, total: u64) {
        self.0.store(total, Ordering::Relaxed);
    }
}

/// Milliseconds on one monotonic clock shared by every thread of the
/// process, from 1 (so 0 can mean "never"). Shards stamp their loops with it
/// and the admin thread compares the stamps with its own reading.
pub fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// Whether a shard still runs what it has to do. Written by the shard (its
/// socket loop on every turn, its maintenance timer on every tick), read by
/// `/readyz` and `/metrics`.
///
/// A shard that has nothing to do sleeps, so "has not run for a while" alone
/// is no fault. A shard is stalled when it has work and does not run it:
/// its maintenance timer (always due, every 100 ms) has not ticked, or its
/// socket ring has held work for the loop, tick after tick, with no loop
/// turn in between.
#[derive(Debug, Default)]
pub struct Liveness {
    /// `monotonic_ms` of the socket loop's last turn; 0 before the first.
    loop_turn_ms: AtomicU64,
    /// `monotonic_ms` of the maintenance timer's last tick; 0 before the first.
    tick_ms: AtomicU64,
    /// `monotonic_ms` of the tick that first saw the socket ring holding
    /// work the loop has not turned for since; 0 when no work waits.
    work_waiting_since_ms: AtomicU64,
}

impl Liveness {
    /// The socket loop is turning (one store per turn).
    #[inline]
    pub fn loop_turned(&self, now_ms: u64) {
        self.loop_turn_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The maintenance timer ticked; `loop_work_waiting`: the socket ring
    /// has work the loop has not taken yet.
    pub fn tick(&self, now_ms: u64, loop_work_waiting: bool) {
        let since = self.work_waiting_since_ms.load(Ordering::Relaxed);
        let since = if !loop_work_waiting {
            0
        } else if since == 0 || self.loop_turn_ms.load(Ordering::Relaxed) >= since {
            // New work, or the loop turned since the last sighting: the
            // wait starts now.
            now_ms
        } else {
            since
        };
        self.work_waiting_since_ms.store(since, Ordering::Relaxed);
        self.tick_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Milliseconds since the socket loop last turned, `None` before it ran.
    pub fn loop_age_ms(&self, now_ms: u64) -> Option<u64> {
        match self.loop_turn_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(now_ms.saturating_sub(at)),
        }
    }

    /// Milliseconds the shard has had work waiting without running it; 0 for
    /// a shard that runs (busy or asleep) or has not started. A healthy
    /// shard reads up to one timer period (100 ms).
    pub fn stalled_ms(&self, now_ms: u64) -> u64 {
        let tick = self.tick_ms.load(Ordering::Relaxed);
        if tick == 0 {
            return 0;
        }
        let timer = now_ms.saturating_sub(tick);
        let socket_loop = match self.work_waiting_since_ms.load(Ordering::Relaxed) {
            0 => 0,
            since => now_ms.saturating_sub(since),
        };
        timer.max(socket_loop)
    }
}

/// A value that goes up and down (a level, not a count of events).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Replaces the value.
    #[inline]
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// Adds `n` (which may be negative).
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one.
    #[inline]
    pub fn dec(&self) {
        self.add(-1);
    }

    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Number of finite buckets of [`LatencyHistogram`]: upper bounds 1 µs, 2 µs, 4 µs …
/// 2^(N-1) µs. 2^23 µs ≈ 8.4 s; anything slower than that is an outage, not a latency,
/// and lands in the `+Inf` bucket.
pub const LATENCY_BUCKETS: usize = 24;

/// A latency histogram with fixed power-of-two microsecond buckets.
///
/// Recording is one leading-zero count and three relaxed adds. Bucket `i` counts
/// observations `v` with `2^(i-1) < v ≤ 2^i` µs (bucket 0 holds `v ≤ 1`); the rendering
/// makes them cumulative as Prometheus expects.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    overflow: AtomicU64,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// The bucket index for `value_us`: the smallest `i` with `value_us ≤ 2^i`, or
    /// `LATENCY_BUCKETS` for the overflow bucket.
    pub fn bucket_index(value_us: u64) -> usize {
        if value_us <= 1 {
            return 0;
        }
        let index = (64 - (value_us - 1).leading_zeros()) as usize;
        index.min(LATENCY_BUCKETS)
    }

    /// The upper bound of finite bucket `index`, in microseconds.
    pub fn bucket_upper_bound_us(index: usize) -> u64 {
        assert!(index < LATENCY_BUCKETS, "bucket {index} is not finite");
        1u64 << index
    }

    /// Records one observation.
    #[inline]
    pub fn record_us(&self, value_us: u64) {
        let index = Self::bucket_index(value_us);
        if index < LATENCY_BUCKETS {
            self.buckets[index].fetch_add(1, Ordering::Relaxed);
        } else {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(value_us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of observations recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of all observations, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    /// Non-cumulative count of finite bucket `index`.
    pub fn bucket_count(&self, index: usize) -> u64 {
        self.buckets[index].load(Ordering::Relaxed)
    }
}

/// The shard's long-lived tasks, whose polls are timed (`task_poll`): each
/// poll holds the shard's thread, so the longest one is the longest time
/// anything on the shard waited for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardTask {
    /// The socket ring's loop: reading, handling frames, writing.
    Sockets,
    /// The group commit: fdatasync and what waits for it.
    Commit,
    /// Requests and replies from other shards.
    Channels,
    /// The 100 ms tick: idle and handshake sweeps, expiry, gauges.
    Maintenance,
    /// Everything else (registrations, Hello checks, relays, handoffs).
    Other,
}

impl ShardTask {
    /// Every task, in the order of their metric arrays.
    pub const ALL: [ShardTask; 5] = [
        ShardTask::Sockets,
        ShardTask::Commit,
        ShardTask::Channels,
        ShardTask::Maintenance,
        ShardTask::Other,
    ];

    /// The `task` label of its metrics.
    pub fn label(self) -> &'static str {
        match self {
            ShardTask::Sockets => "sockets",
            ShardTask::Commit => "commit",
            ShardTask::Channels => "channels",
            ShardTask::Maintenance => "maintenance",
            ShardTask::Other => "other",
        }
    }

    /// Its index in the metric arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Number of distinct frame types counted per direction.
pub const FRAME_TYPES: usize = FrameType::ALL.len();

impl FrameType {
    /// A dense index `0..FRAME_TYPES` for per-type metric arrays.
    #[inline]
    pub fn index(self) -> usize {
        match self {
            FrameType::Register => 0,
            FrameType::Registered => 1,
            FrameType::Hello => 2,
            FrameType::Welcome => 3,
            FrameType::Send => 4,
            FrameType::ServerAck => 5,
            FrameType::Deliver => 6,
            FrameType::Ack => 7,
            FrameType::Receipt => 8,
            FrameType::ReadReceipt => 9,
            FrameType::Ping => 10,
            FrameType::Pong => 11,
            FrameType::Error => 12,
            FrameType::GoAway => 13,
            FrameType::Link => 14,
            FrameType::RequestLinkCode => 15,
            FrameType::LinkCode => 16,
            FrameType::ListDevices => 17,
            FrameType::DeviceList => 18,
            FrameType::RemoveDevice => 19,
            FrameType::DeviceRemoved => 20,
            FrameType::CreateGroup => 21,
            FrameType::UpdateGroup => 22,
            FrameType::GetGroup => 23,
            FrameType::GroupInfo => 24,
            FrameType::UploadPrekeys => 25,
            FrameType::PrekeysStored => 26,
            FrameType::FetchPrekeys => 27,
            FrameType::PrekeyBundle => 28,
            FrameType::PrekeysLow => 29,
            FrameType::SendTyping => 30,
            FrameType::Typing => 31,
            FrameType::SubscribePresence => 32,
            FrameType::PresenceUpdate => 33,
            FrameType::SetPrivacy => 34,
            FrameType::Privacy => 35,
            FrameType::RegisterPush => 36,
            FrameType::PushRegistered => 37,
            FrameType::RequestMediaGrant => 38,
            FrameType::MediaGrant => 39,
        }
    }
}

/// Size of the refusal array: error code values `0..REFUSAL_CODES` are counted in their
/// own slot; a larger value (a code added to the protocol later) goes to `other`.
pub const REFUSAL_CODES: usize = 32;

/// Refusals counted by the error code the peer was answered with.
#[derive(Debug)]
pub struct Refusals {
    by_code: [Counter; REFUSAL_CODES],
    other: Counter,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            by_code: std::array::from_fn(|_| Counter::default()),
            other: Counter::default(),
        }
    }
}

impl Refusals {
    /// Counts one refusal with `code`.
    #[inline]
    pub fn record(&self, code: ErrorCode) {
        self.record_value(code as i32);
    }

    /// Counts one refusal by the code's wire value (for codes this build does not name).
    #[inline]
    pub fn record_value(&self, code: i32) {
        match usize::try_from(code) {
            Ok(index) if index < REFUSAL_CODES => self.by_code[index].inc(),
            _ => self.other.inc(),
        }
    }

    /// Refusals counted for `code`.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.get_value(code as i32)
    }

    /// Refusals counted for the wire value `code`.
    pub fn get_value(&self, code: i32) -> u64 {
        match usize::try_from(code) {
            Ok(index) if index < REFUSAL_CODES => self.by_code[index].get(),
            _ => self.other.get(),
        }
    }
}

/// One counter per frame type (an array longer than `Default` is derived
/// for).
#[derive(Debug)]
pub struct FrameCounters(pub [Counter; FRAME_TYPES]);

impl Default for FrameCounters {
    fn default() -> Self {
        FrameCounters(std::array::from_fn(|_| Counter::default()))
    }
}

impl std::ops::Deref for FrameCounters {
    type Target = [Counter; FRAME_TYPES];
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// One shard's metrics. The shard is the only writer; see the module header.
///
/// Aligned to 128 bytes (two cache lines, the adjacent-line prefetch unit) so two
/// shards' metrics never share a line and one shard's adds never invalidate another's.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// Open client connections homed on this shard (gauge).
    pub connections: Gauge,
    /// Connections accepted on this shard's listener (before any handoff).
    pub accepts: Counter,
    /// Authenticated connections sent to another (home) shard.
    pub handoffs_out: Counter,
    /// Connections received from another shard after authentication.
    pub handoffs_in: Counter,
    /// Hello frames refused for a bad or unknown credential.
    pub auth_failures: Counter,
    /// Devices registered.
    pub registrations: Counter,
    pub devices_linked: Counter,
    /// Noise handshakes finished, XX (first contact) and IK (reconnect).
    pub noise_xx_handshakes: Counter,
    pub noise_ik_handshakes: Counter,
    /// Noise handshakes that failed (garbage, a wrong or unknown server
    /// key, a tampered message, a client payload): closed without an answer.
    pub noise_handshake_failures: Counter,
    /// Frames received, by frame type (index with [`FrameType::index`]).
    pub frames_in: FrameCounters,
    /// Frames sent, by frame type.
    pub frames_out: FrameCounters,
    /// Messages appended to this shard's log (accepted for a recipient homed here).
    pub messages_accepted: Counter,
    /// Messages written to a recipient device's connection.
    pub messages_delivered: Counter,
    /// Messages a recipient device acknowledged.
    pub messages_acked: Counter,
    /// Messages dropped because their TTL passed before delivery.
    pub messages_expired: Counter,
    /// Delivered and read receipts sent to senders.
    pub receipts_sent: Counter,
    /// Receipts forwarded again at start from this shard's relay inboxes
    /// (a crash came before their home shard had stored them).
    pub receipts_relayed_again: Counter,
    /// Typing notices dropped because their device sent too many.
    pub typing_dropped: Counter,
    /// Presence changes sent to the shards of their followers (one request
    /// per shard and change).
    pub presence_notices: Counter,
    /// Presence requests (watch, unwatch, notice) sent to other shards.
    pub presence_requests_remote: Counter,
    /// Undelivered entries across this shard's inboxes (gauge).
    pub inbox_depth: Gauge,
    /// Bytes held by this shard's log segments (gauge).
    pub log_bytes: Gauge,
    /// Segment files of this shard's log (gauge).
    pub log_segments: Gauge,
    /// Time of a group commit's fdatasyncs: from submitting them to the shard
    /// seeing them done, the executor's wait to reap them included.
    pub commit_latency: LatencyHistogram,
    /// Messages waiting in this shard's inbound channels from other shards (gauge).
    pub shard_channel_depth: Gauge,
    /// Requests answered with an error, by error code.
    pub refusals: Refusals,
    /// Microseconds this shard spent unable to make progress (a full channel, a
    /// blocked commit), summed.
    pub stall_time_us: Counter,
    /// io_uring_enter calls on the shard's socket ring.
    pub socket_ring_enters: Counter,
    /// Completions reaped from the socket ring.
    pub socket_ring_completions: Counter,
    /// The log's fdatasyncs that went through the socket ring.
    pub socket_ring_syncs: Counter,
    /// Receives re-armed because the provided-buffer ring was empty.
    pub socket_ring_no_buffers: Counter,
    /// Completions that named a connection already gone (expected 0).
    pub socket_ring_stale_completions: Counter,
    /// Bytes of incomplete frames held for connections (gauge).
    pub socket_tail_bytes: Gauge,
    /// Sockets the shard's ring holds: handshakes, sessions and sockets
    /// still closing (gauge).
    pub sockets: Gauge,
    /// True once this shard has recovered its log and accepts connections.
    pub recovered: AtomicBool,
    /// Whether the shard's loops still run (see [`Liveness`]).
    pub liveness: Liveness,
    /// Times the main thread woke the shard's thread, parked by glommio
    /// with its work unrun (`shard::start_watch`).
    pub parked_wakes: Counter,
    /// How long each poll of the shard's tasks held its thread.
    pub task_poll: LatencyHistogram,
    /// The longest poll of each task since start, microseconds (index with
    /// [`ShardTask::index`]).
    pub task_poll_max_us: [AtomicU64; ShardTask::ALL.len()],
}

impl ShardMetrics {
    /// A zeroed set of metrics, not yet recovered.
    pub fn new() -> ShardMetrics {
        ShardMetrics::default()
    }

    /// Marks the shard recovered (ready) or not.
    pub fn set_recovered(&self, recovered: bool) {
        self.recovered.store(recovered, Ordering::Relaxed);
    }

    /// Whether the shard has recovered its log and accepts connections.
    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Relaxed)
    }

    /// Records one poll of `task` that held the thread for `us`.
    #[inline]
    pub fn task_polled(&self, task: ShardTask, us: u64) {
        self.task_poll.record_us(us);
        self.task_poll_max_us[task.index()].fetch_max(us, Ordering::Relaxed);
    }

    /// The longest poll of `task` since start, microseconds.
    pub fn task_poll_max_us(&self, task: ShardTask) -> u64 {
        self.task_poll_max_us[task.index()].load(Ordering::Relaxed)
    }

    /// Counts one frame received.
    #[inline]
    pub fn frame_in(&self, frame_type: FrameType) {
        self.frames_in[frame_type.index()].inc();
    }

    /// Counts one frame sent.
    #[inline]
    pub fn frame_out(&self, frame_type: FrameType) {
        self.frames_out[frame_type.index()].inc();
    }

    /// Counts one request refused with `code`.
    #[inline]
    pub fn refused(&self, code: ErrorCode) {
        self.refusals.record(code);
    }
}

/// How long (ms) a shard may have work waiting without running it before
/// `/readyz` fails, unless the configuration says otherwise.
pub const DEFAULT_STALL_LIMIT_MS: u64 = 5_000;

/// All shards' metrics, read by the admin thread.
#[derive(Debug)]
pub struct Registry {
    shards: Vec<Arc<ShardMetrics>>,
    started: std::time::Instant,
    /// Set at the start of a graceful shutdown so `/readyz` turns 503 and load
    /// balancers stop sending new connections while existing ones drain.
    draining: AtomicBool,
    /// A shard stalled this long (ms) makes the process not ready.
    stall_limit_ms: u64,
    /// The push thread's counters.
    pub push: Arc<crate::push::PushStats>,
    /// The media service's counters and gauges.
    pub media: Arc<crate::media::stats::MediaStats>,
    /// The WSS listener's counters and gauge.
    pub wss: Arc<crate::wss::stats::WssStats>,
}

/// What `/readyz` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Draining,
    /// This many shards have not recovered their logs yet.
    Recovering(usize),
    /// A shard has had work waiting and not run it for this long.
    Stalled {
        shard: usize,
        stalled_ms: u64,
    },
    NoShards,
}

impl Registry {
    /// A registry with `shard_count` fresh, not-yet-recovered shards.
    pub fn new(shard_count: usize) -> Registry {
        Registry::from_shards(
            (0..shard_count)
                .map(|_| Arc::new(ShardMetrics::new()))
                .collect(),
        )
    }

    /// A registry over metrics the caller already built (shard `i` at index `i`).
    pub fn from_shards(shards: Vec<Arc<ShardMetrics>>) -> Registry {
        Registry {
            shards,
            started: std::time::Instant::now(),
            draining: AtomicBool::new(false),
            stall_limit_ms: DEFAULT_STALL_LIMIT_MS,
            push: Arc::new(crate::push::PushStats::default()),
            media: Arc::new(crate::media::stats::MediaStats::default()),
            wss: Arc::new(crate::wss::stats::WssStats::default()),
        }
    }

    /// Sets how long (ms) a shard may have work waiting without running it
    /// before `/readyz` fails. Default [`DEFAULT_STALL_LIMIT_MS`].
    pub fn with_stall_limit_ms(mut self, stall_limit_ms: u64) -> Registry {
        self.stall_limit_ms = stall_limit_ms;
        self
    }

    /// Marks the process as draining (shutting down): not ready, still healthy.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Shard `index`'s metrics, to hand to that shard. Panics on an index out of range,
    /// which is a wiring bug.
    pub fn shard(&self, index: usize) -> Arc<ShardMetrics> {
        Arc::clone(&self.shards[index])
    }

    /// Every shard's metrics, shard `i` at index `i`.
    pub fn shards(&self) -> &[Arc<ShardMetrics>] {
        &self.shards
    }

    /// Ready when there is at least one shard, every shard has recovered and
    /// runs (none stalled past the limit), and the process is not draining.
    pub fn ready(&self) -> bool {
        self.readiness() == Readiness::Ready
    }

    /// Why the process is or is not ready; the first reason found wins.
    pub fn readiness(&self) -> Readiness {
        self.readiness_at(monotonic_ms())
    }

    fn readiness_at(&self, now: u64) -> Readiness {
        if self.is_draining() {
            return Readiness::Draining;
        }
        if self.shards.is_empty() {
            return Readiness::NoShards;
        }
        let recovering = self.shards.iter().filter(|s| !s.is_recovered()).count();
        if recovering > 0 {
            return Readiness::Recovering(recovering);
        }
        for (shard, metrics) in self.shards.iter().enumerate() {
            let stalled_ms = metrics.liveness.stalled_ms(now);
            if stalled_ms > self.stall_limit_ms {
                return Readiness::Stalled { shard, stalled_ms };
            }
        }
        Readiness::Ready
    }

    /// Appends every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self, out: &mut String) {
        family(out, "switchboard_up", "gauge", "1 while the process runs.");
        out.push_str("switchboard_up 1\n");
        family(
            out,
            "switchboard_uptime_seconds",
            "gauge",
            "Seconds since the metrics registry was built.",
        );
        let _ = writeln!(
            out,
            "switchboard_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        family(
            out,
            "switchboard_ready",
            "gauge",
            "1 when every shard has recovered its log and the process is not draining.",
        );
        let _ = writeln!(out, "switchboard_ready {}", u8::from(self.ready()));
        for (name, help, value) in [
            (
                "switchboard_push_sent_total",
                "Push wake-ups a gateway accepted.",
                &self.push.sent,
            ),
            (
                "switchboard_push_failed_total",
                "Push wake-ups that failed (each try; retried with backoff).",
                &self.push.failed,
            ),
            (
                "switchboard_push_dropped_total",
                "Push wake-ups dropped because the push thread's queue was full.",
                &self.push.dropped,
            ),
            (
                "switchboard_push_endpoints_removed_total",
                "Web Push endpoints removed after a 404 or 410.",
                &self.push.endpoints_removed,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }

        family(
            out,
            "switchboard_media_responses_total",
            "counter",
            "Media service responses by HTTP status (`other`: any status not listed).",
        );
        for (status, count) in self.media.responses() {
            let _ = writeln!(
                out,
                "switchboard_media_responses_total{{status=\"{status}\"}} {count}"
            );
        }
        for (name, help, value) in [
            (
                "switchboard_media_connections",
                "Media service connections open (refreshed each second).",
                &self.media.connections,
            ),
            (
                "switchboard_media_blob_bytes",
                "Bytes of the stored media blobs, expired ones until swept (refreshed each second).",
                &self.media.blob_bytes,
            ),
            (
                "switchboard_media_reserved_bytes",
                "Bytes reserved by unfinished media uploads (refreshed each second).",
                &self.media.reserved_bytes,
            ),
            (
                "switchboard_media_uploads_in_flight",
                "Media uploads begun and not finished (refreshed each second).",
                &self.media.uploads_in_flight,
            ),
        ] {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }

        family(
            out,
            "switchboard_wss_connections",
            "gauge",
            "Browser connections open on the WSS listener.",
        );
        let _ = writeln!(
            out,
            "switchboard_wss_connections {}",
            self.wss.connections.load(Ordering::Relaxed)
        );
        for (name, help, value) in [
            (
                "switchboard_wss_accepted_total",
                "Connections accepted on the WSS listener, refused ones included.",
                &self.wss.accepted,
            ),
            (
                "switchboard_wss_bridged_total",
                "WSS connections that sent the Noise intro and were bridged to the client listener.",
                &self.wss.bridged,
            ),
            (
                "switchboard_wss_certificate_reloads_total",
                "WSS certificate reloads (SIGHUP) that took effect.",
                &self.wss.reloads,
            ),
            (
                "switchboard_wss_certificate_reload_failures_total",
                "WSS certificate reloads that failed; the previous certificate stays in use.",
                &self.wss.reload_failures,
            ),
        ] {
            family(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        family(
            out,
            "switchboard_wss_refused_total",
            "counter",
            "WSS connections refused or cut by the listener, by reason.",
        );
        for (reason, count) in self.wss.refusals() {
            let _ = writeln!(
                out,
                "switchboard_wss_refused_total{{reason=\"{reason}\"}} {count}"
            );
        }

        self.gauge(
            out,
            "switchboard_shard_recovered",
            "1 once the shard has recovered its log and accepts.",
            |m| i64::from(m.is_recovered()),
        );
        self.gauge(
            out,
            "switchboard_connections",
            "Open client connections homed on the shard.",
            |m| m.connections.get(),
        );
        self.counter(
            out,
            "switchboard_accepts_total",
            "Connections accepted on the shard's listener.",
            |m| m.accepts.get(),
        );
        self.counter(
            out,
            "switchboard_shard_parked_wakes_total",
            "Times the shard's thread was found parked with its work unrun and woken.",
            |m| m.parked_wakes.get(),
        );
        self.counter(
            out,
            "switchboard_socket_ring_enters_total",
            "io_uring_enter calls on the shard's socket ring.",
            |m| m.socket_ring_enters.get(),
        );
        self.counter(
            out,
            "switchboard_socket_ring_completions_total",
            "Completions reaped from the shard's socket ring.",
            |m| m.socket_ring_completions.get(),
        );
        self.counter(
            out,
            "switchboard_socket_ring_syncs_total",
            "The log's fdatasyncs that went through the shard's socket ring (with server.socket_wait_in_ring).",
            |m| m.socket_ring_syncs.get(),
        );
        self.counter(
            out,
            "switchboard_socket_ring_no_buffers_total",
            "Receives re-armed because every provided buffer was in use.",
            |m| m.socket_ring_no_buffers.get(),
        );
        self.counter(
            out,
            "switchboard_socket_ring_stale_completions_total",
            "Completions for connections already gone (expected 0).",
            |m| m.socket_ring_stale_completions.get(),
        );
        self.counter(
            out,
            "switchboard_handoffs_out_total",
            "Authenticated connections handed to another shard.",
            |m| m.handoffs_out.get(),
        );
        self.counter(
            out,
            "switchboard_handoffs_in_total",
            "Connections received from another shard.",
            |m| m.handoffs_in.get(),
        );
        self.counter(
            out,
            "switchboard_auth_failures_total",
            "Hello frames refused for a bad credential.",
            |m| m.auth_failures.get(),
        );
        self.counter(
            out,
            "switchboard_registrations_total",
            "Devices registered.",
            |m| m.registrations.get(),
        );
        self.counter(
            out,
            "switchboard_devices_linked_total",
            "Companion devices linked with a link code.",
            |m| m.devices_linked.get(),
        );
        self.counter(
            out,
            "switchboard_noise_xx_handshakes_total",
            "Noise XX handshakes finished (a device's first contact).",
            |m| m.noise_xx_handshakes.get(),
        );
        self.counter(
            out,
            "switchboard_noise_ik_handshakes_total",
            "Noise IK handshakes finished (a device that knew the server's key).",
            |m| m.noise_ik_handshakes.get(),
        );
        self.counter(
            out,
            "switchboard_noise_handshake_failures_total",
            "Noise handshakes that failed and were closed without an answer.",
            |m| m.noise_handshake_failures.get(),
        );
        self.frames(
            out,
            "switchboard_frames_in_total",
            "Frames received, by frame type.",
            |m| &m.frames_in,
        );
        self.frames(
            out,
            "switchboard_frames_out_total",
            "Frames sent, by frame type.",
            |m| &m.frames_out,
        );
        self.counter(
            out,
            "switchboard_messages_accepted_total",
            "Messages appended to the shard's log.",
            |m| m.messages_accepted.get(),
        );
        self.counter(
            out,
            "switchboard_messages_delivered_total",
            "Messages written to a recipient device.",
            |m| m.messages_delivered.get(),
        );
        self.counter(
            out,
            "switchboard_messages_acked_total",
            "Messages acknowledged by a recipient device.",
            |m| m.messages_acked.get(),
        );
        self.counter(
            out,
            "switchboard_messages_expired_total",
            "Messages dropped undelivered after their TTL.",
            |m| m.messages_expired.get(),
        );
        self.counter(
            out,
            "switchboard_receipts_sent_total",
            "Delivered and read receipts sent to senders.",
            |m| m.receipts_sent.get(),
        );
        self.counter(
            out,
            "switchboard_receipts_relayed_again_total",
            "Receipts forwarded again at start: a crash came before their home shard stored them.",
            |m| m.receipts_relayed_again.get(),
        );
        self.counter(
            out,
            "switchboard_typing_dropped_total",
            "Typing notices dropped: their device sent more than limits.typing_per_second.",
            |m| m.typing_dropped.get(),
        );
        self.counter(
            out,
            "switchboard_presence_notices_total",
            "Presence changes sent to followers' shards (one request per shard per change).",
            |m| m.presence_notices.get(),
        );
        self.counter(
            out,
            "switchboard_presence_requests_remote_total",
            "Presence requests (watch, unwatch, notice) sent to other shards.",
            |m| m.presence_requests_remote.get(),
        );
        self.gauge(
            out,
            "switchboard_inbox_depth",
            "Undelivered inbox entries on the shard.",
            |m| m.inbox_depth.get(),
        );
        self.gauge(
            out,
            "switchboard_log_bytes",
            "Bytes held by the shard's log segments.",
            |m| m.log_bytes.get(),
        );
        self.gauge(
            out,
            "switchboard_log_segments",
            "Segment files of the shard's log.",
            |m| m.log_segments.get(),
        );
        self.gauge(
            out,
            "switchboard_socket_tail_bytes",
            "Bytes of incomplete frames held for the shard's connections.",
            |m| m.socket_tail_bytes.get(),
        );
        self.gauge(
            out,
            "switchboard_sockets",
            "Sockets the shard's ring holds (handshakes, sessions, closing).",
            |m| m.sockets.get(),
        );
        self.gauge(
            out,
            "switchboard_shard_channel_depth",
            "Messages waiting in the shard's inbound channels.",
            |m| m.shard_channel_depth.get(),
        );
        self.counter(
            out,
            "switchboard_stall_time_microseconds_total",
            "Microseconds the shard could not make progress.",
            |m| m.stall_time_us.get(),
        );
        self.refusals(out);
        self.commit_latency(out);
        self.task_polls(out);
        let now = monotonic_ms();
        self.seconds(
            out,
            "switchboard_shard_loop_last_turn_age_seconds",
            "Seconds since the shard's socket loop last turned (grows while an idle shard sleeps).",
            |m| m.liveness.loop_age_ms(now).unwrap_or(0),
        );
        self.seconds(
            out,
            "switchboard_shard_stalled_seconds",
            "Seconds the shard has had work waiting without running it (0 when it runs).",
            |m| m.liveness.stalled_ms(now),
        );
    }

    /// A gauge in seconds, from a reading in milliseconds.
    fn seconds(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        read_ms: impl Fn(&ShardMetrics) -> u64,
    ) {
        family(out, name, "gauge", help);
        for (shard, metrics) in self.shards.iter().enumerate() {
            let ms = read_ms(metrics);
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\"}} {}.{:03}",
                ms / 1000,
                ms % 1000
            );
        }
    }

    fn counter(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        read: impl Fn(&ShardMetrics) -> u64,
    ) {
        family(out, name, "counter", help);
        for (shard, metrics) in self.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", read(metrics));
        }
    }

    fn gauge(&self, out: &mut String, name: &str, help: &str, read: impl Fn(&ShardMetrics) -> i64) {
        family(out, name, "gauge", help);
        for (shard, metrics) in self.shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", read(metrics));
        }
    }

    fn frames(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        read: impl Fn(&ShardMetrics) -> &[Counter; FRAME_TYPES],
    ) {
        family(out, name, "counter", help);
        for (shard, metrics) in self.shards.iter().enumerate() {
            let counters = read(metrics);
            for frame_type in FrameType::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{shard}\",type=\"{}\"}} {}",
                    frame_type.name(),
                    counters[frame_type.index()].get()
                );
            }
        }
    }

    fn refusals(&self, out: &mut String) {
        let name = "switchboard_refusals_total";
        family(
            out,
            name,
            "counter",
            "Requests answered with an error, by error code.",
        );
        for (shard, metrics) in self.shards.iter().enumerate() {
            for value in 0..REFUSAL_CODES as i32 {
                let Ok(code) = ErrorCode::try_from(value) else {
                    continue;
                };
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{shard}\",reason=\"{}\"}} {}",
                    reason_label(code),
                    metrics.refusals.get_value(value)
                );
            }
            let _ = writeln!(
                out,
                "{name}{{shard=\"{shard}\",reason=\"other\"}} {}",
                metrics.refusals.other.get()
            );
        }
    }

    fn commit_latency(&self, out: &mut String) {
        self.histogram(
            out,
            "switchboard_commit_latency_microseconds",
            "Group commit latency, fdatasyncs submitted to seen done by the shard, in microseconds.",
            |m| &m.commit_latency,
        );
    }

    fn task_polls(&self, out: &mut String) {
        self.histogram(
            out,
            "switchboard_shard_task_poll_microseconds",
            "How long each poll of a shard's tasks held the shard's thread, in microseconds.",
            |m| &m.task_poll,
        );
        let name = "switchboard_shard_task_poll_max_seconds";
        family(
            out,
            name,
            "gauge",
            "The longest single poll of each shard task since start: the longest the shard's thread was held.",
        );
        for (shard, metrics) in self.shards.iter().enumerate() {
            for task in ShardTask::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{shard}\",task=\"{}\"}} {:.6}",
                    task.label(),
                    metrics.task_poll_max_us(task) as f64 / 1e6
                );
            }
        }
    }

    /// One histogram family, one series per shard.
    fn histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        of: impl Fn(&ShardMetrics) -> &LatencyHistogram,
    ) {
        family(out, name, "histogram", help);
        for (shard, metrics) in self.shards.iter().enumerate() {
            let histogram = of(metrics);
            let mut cumulative = 0u64;
            for index in 0..LATENCY_BUCKETS {
                cumulative += histogram.bucket_count(index);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{shard=\"{shard}\",le=\"{}\"}} {cumulative}",
                    LatencyHistogram::bucket_upper_bound_us(index)
                );
            }
            cumulative += histogram.overflow.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{shard=\"{shard}\",le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "{name}_sum{{shard=\"{shard}\"}} {}",
                histogram.sum_us()
            );
            // The count line repeats the +Inf bucket so the two always agree within one
            // scrape, even while the shard records concurrently.
            let _ = writeln!(out, "{name}_count{{shard=\"{shard}\"}} {cumulative}");
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// `ERROR_CODE_AUTH_FAILED` → `auth_failed`.
fn reason_label(code: ErrorCode) -> String {
    let name = code.as_str_name();
    name.strip_prefix("ERROR_CODE_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_index_is_smallest_power_of_two_at_or_above() {
        assert_eq!(LatencyHistogram::bucket_index(0), 0);
        assert_eq!(LatencyHistogram::bucket_index(1), 0);
        assert_eq!(LatencyHistogram::bucket_index(2), 1);
        assert_eq!(LatencyHistogram::bucket_index(3), 2);
        assert_eq!(LatencyHistogram::bucket_index(4), 2);
        assert_eq!(LatencyHistogram::bucket_index(5), 3);
        assert_eq!(LatencyHistogram::bucket_index(1 << 23), 23);
        assert_eq!(
            LatencyHistogram::bucket_index((1 << 23) + 1),
            LATENCY_BUCKETS
        );
        assert_eq!(LatencyHistogram::bucket_index(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn frame_type_index_is_dense_and_matches_all_order() {
        for (position, frame_type) in FrameType::ALL.into_iter().enumerate() {
            assert_eq!(frame_type.index(), position);
        }
    }

    #[test]
    fn refusal_out_of_range_counts_as_other() {
        let refusals = Refusals::default();
        refusals.record(ErrorCode::AuthFailed);
        refusals.record_value(1000);
        refusals.record_value(-3);
        assert_eq!(refusals.get(ErrorCode::AuthFailed), 1);
        assert_eq!(refusals.other.get(), 2);
    }

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let registry = Registry::new(1);
        let shard = registry.shard(0);
        shard.commit_latency.record_us(1);
        shard.commit_latency.record_us(3);
        shard.commit_latency.record_us(u64::from(u32::MAX));
        let mut out = String::new();
        registry.render_prometheus(&mut out);
        assert!(out
            .contains("switchboard_commit_latency_microseconds_bucket{shard=\"0\",le=\"1\"} 1\n"));
        assert!(out
            .contains("switchboard_commit_latency_microseconds_bucket{shard=\"0\",le=\"4\"} 2\n"));
        assert!(out.contains(
            "switchboard_commit_latency_microseconds_bucket{shard=\"0\",le=\"+Inf\"} 3\n"
        ));
        assert!(out.contains("switchboard_commit_latency_microseconds_count{shard=\"0\"} 3\n"));
    }

    #[test]
    fn ready_needs_every_shard_recovered() {
        let registry = Registry::new(2);
        assert!(!registry.ready());
        registry.shard(0).set_recovered(true);
        assert!(!registry.ready());
        registry.shard(1).set_recovered(true);
        assert!(registry.ready());
        registry.set_draining(true);
        assert!(!registry.ready());
        assert!(!Registry::new(0).ready());
    }

    #[test]
    fn a_shard_is_stalled_only_while_work_waits_unrun() {
        let liveness = Liveness::default();
        assert_eq!(liveness.stalled_ms(10_000), 0, "not started");
        liveness.loop_turned(1_000);
        liveness.tick(1_000, false);
        // Asleep with nothing to do: the loop's age grows, no stall.
        liveness.tick(9_000, false);
        assert_eq!(liveness.loop_age_ms(9_050), Some(8_050));
        assert_eq!(liveness.stalled_ms(9_050), 50, "the timer's own period");
        // Work arrives for a loop that slept long: the wait starts now.
        liveness.tick(9_100, true);
        assert_eq!(liveness.stalled_ms(9_100), 0);
        // The loop turns, more work comes: still no stall.
        liveness.loop_turned(9_150);
        liveness.tick(9_200, true);
        assert_eq!(liveness.stalled_ms(9_250), 50);
        // Work waits tick after tick and the loop does not turn.
        liveness.tick(9_300, true);
        liveness.tick(12_200, true);
        assert_eq!(liveness.stalled_ms(12_200), 3_000);
        liveness.loop_turned(12_250);
        liveness.tick(12_300, false);
        assert_eq!(liveness.stalled_ms(12_300), 0);
        // The timer itself stops: the whole executor is stuck.
        assert_eq!(liveness.stalled_ms(20_000), 7_700);
    }

    #[test]
    fn readiness_fails_on_a_stalled_shard() {
        let registry = Registry::new(2).with_stall_limit_ms(1_000);
        for shard in registry.shards() {
            shard.set_recovered(true);
            shard.liveness.loop_turned(100);
            shard.liveness.tick(100, false);
        }
        assert_eq!(registry.readiness_at(900), Readiness::Ready);
        registry.shard(0).liveness.tick(1_000, false);
        registry.shard(1).liveness.tick(1_000, true);
        registry.shard(0).liveness.tick(2_100, false);
        registry.shard(1).liveness.tick(2_100, true);
        assert_eq!(
            registry.readiness_at(2_150),
            Readiness::Stalled {
                shard: 1,
                stalled_ms: 1_150
            }
        );
        registry.shard(1).liveness.loop_turned(2_200);
        registry.shard(1).liveness.tick(2_250, false);
        assert_eq!(registry.readiness_at(2_300), Readiness::Ready);
    }
}
