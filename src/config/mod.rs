//! Configuration: every bound the server enforces, in one place.
//!
//! `Config` is read once at start (TOML file, then command-line overrides),
//! validated, and then shared read-only by every shard (`Arc<Config>`). Each
//! field's doc gives its unit, default, why it exists and what it costs.
//! `Config::for_tests()` shrinks everything so tests reach roll-over, full
//! windows and full queues cheaply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Who may create accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationPolicy {
    /// Anyone who can reach the port (the local default).
    Open,
    /// Only a client presenting one of `server.registration_tokens`.
    Token,
    /// Nobody; accounts exist already.
    Closed,
}

/// Who may speak the protocol unencrypted (without the Noise handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextPolicy {
    /// Clients connecting from a loopback address (tests, local
    /// development); anyone else is refused with PLAINTEXT_REFUSED.
    Loopback,
    /// Any client (a trusted network, or a proxy that encrypts).
    Any,
    /// Nobody: every client speaks Noise.
    Off,
}

impl PlaintextPolicy {
    /// Whether a plaintext client at `peer` may go on.
    pub fn allows(self, peer: std::net::IpAddr) -> bool {
        match self {
            PlaintextPolicy::Loopback => peer.is_loopback(),
            PlaintextPolicy::Any => true,
            PlaintextPolicy::Off => false,
        }
    }
}

/// The most capable io_uring setup each shard's socket ring tries; weaker
/// ones are the fallbacks when the kernel refuses it (docs/uring.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketRingSetup {
    /// SINGLE_ISSUER | DEFER_TASKRUN: completion work runs only when the
    /// shard enters its ring (kernel 6.1+).
    DeferTaskrun,
    /// SINGLE_ISSUER | COOP_TASKRUN (kernel 5.19+).
    CoopTaskrun,
    /// No optional flags.
    Plain,
}

/// When a ServerAck (✓) may be sent for an appended message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the group commit's fdatasync of the segment returned: survives
    /// power loss (to the extent the device honours flushes).
    Fsync,
    /// After the record is written into the shared mapping: survives a crash
    /// of the process (the page cache holds it), not of the machine.
    Os,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Client listener, bound by every shard with SO_REUSEPORT. Default 127.0.0.1:7700.
    pub listen: SocketAddr,
    /// Admin HTTP listener (metrics, health). Default 127.0.0.1:7701.
    pub admin_listen: SocketAddr,
    /// Directory of the metadata database and the shards' logs. Default `./data`.
    pub data_dir: PathBuf,
    /// Shard count; 0 means one per CPU this process may run on. Default 0.
    pub shards: u32,
    /// Whether each shard's executor is pinned to one CPU. Default true.
    pub pin_cpus: bool,
    /// Who may register. Default `open`.
    pub registration: RegistrationPolicy,
    /// Tokens accepted when `registration = "token"`.
    pub registration_tokens: Vec<String>,
    /// Log filter (tracing `EnvFilter` syntax). Default `info`.
    pub log_level: String,
    /// The socket ring's preferred setup. Default `defer_taskrun`.
    pub socket_ring_setup: SocketRingSetup,
    /// A shard that has had work waiting and not run it for this long, ms,
    /// makes `/readyz` fail and is logged as an error. Default 5,000: far
    /// above any loop turn or commit of a healthy shard.
    pub shard_stall_ready_ms: u32,
    /// While the socket ring has had traffic in the last second, the loop
    /// also looks at the ring this often, µs, instead of waiting for the
    /// eventfd alone: with DEFER_TASKRUN the kernel may post that eventfd
    /// only after an RCU grace period, 4-20 ms (docs/uring.md). 0: the
    /// eventfd alone. Default 1,000.
    pub socket_poll_interval_us: u32,
    /// While traffic lasts and no commit is pending, the socket loop sleeps
    /// in its own ring (woken by the kernel the moment a socket has work,
    /// at most `socket_poll_interval_us` later) instead of parking the
    /// executor until the ring's eventfd. Lower latency at more CPU per
    /// message; the executor's other work (timers, messages from other
    /// shards) may wait up to one interval. Default false.
    pub socket_wait_in_ring: bool,
    /// With `socket_wait_in_ring`: a wait in the ring that sees its first
    /// completion keeps gathering more for up to this long, µs, from when
    /// it began (or until 64 are there), so one wake-up serves several
    /// arrivals. Needs kernel 6.12+ (`IORING_FEAT_MIN_TIMEOUT`); older ones
    /// wake at the first completion, with a warning at start. 0: wake at
    /// the first completion. Default 0.
    pub socket_wait_batch_us: u32,
    /// Runs each shard's thread under SCHED_FIFO at this priority (1-99),
    /// so no ordinary thread on its CPU (kernel workers, the blocking pool,
    /// other processes) preempts it; interrupts and their soft work still
    /// do. Needs CAP_SYS_NICE (or an RLIMIT_RTPRIO this high); without it
    /// the shard logs a warning and runs as an ordinary thread. For CPUs
    /// given to the shards alone: the rest of the process and the system
    /// then run on a CPU only while its shard sleeps, or in the 5 % the
    /// kernel keeps back from real-time threads
    /// (`kernel.sched_rt_runtime_us`). 0: off. Default 0.
    pub shard_realtime_priority: u8,
    /// Accept Noise clients (docs/protocol.md §2). The server's static key
    /// is `noise.key` in the data directory, made at first start. Default
    /// true.
    pub noise: bool,
    /// Who may connect without Noise. Default `loopback`.
    pub plaintext: PlaintextPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7700".parse().expect("literal address"),
            admin_listen: "127.0.0.1:7701".parse().expect("literal address"),
            data_dir: PathBuf::from("./data"),
            shards: 0,
            pin_cpus: true,
            registration: RegistrationPolicy::Open,
            registration_tokens: Vec::new(),
            log_level: "info".to_string(),
            socket_ring_setup: SocketRingSetup::DeferTaskrun,
            shard_stall_ready_ms: crate::metrics::DEFAULT_STALL_LIMIT_MS as u32,
            socket_poll_interval_us: 1_000,
            socket_wait_in_ring: false,
            socket_wait_batch_us: 0,
            shard_realtime_priority: 0,
            noise: true,
            plaintext: PlaintextPolicy::Loopback,
        }
    }
}

/// Bounds on what one peer can make the server hold or do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame (type byte + body) accepted or sent, bytes. Default 66,560
    /// (the largest payload plus 1 KiB of envelope). Checked from the 4-byte
    /// length prefix before any memory is reserved for the frame.
    pub frame_bytes_max: u32,
    /// Largest Send payload, bytes. Default 65,536. Costs at most this much per
    /// in-flight Send in shard channels and per unflushed Deliver.
    pub payload_bytes_max: u32,
    /// Open connections per shard, authenticated or not. Default 1,000,000.
    /// Beyond it a new connection gets SERVER_BUSY and is closed.
    pub connections_per_shard_max: u32,
    /// Time from accept to a complete Hello or Register, ms. Default 10,000.
    pub handshake_timeout_ms: u32,
    /// A session that sends nothing (not even Ping) for this long is closed, ms.
    /// Default 120,000; clients ping at a third of it.
    pub idle_timeout_ms: u32,
    /// Deliver/Receipt frames sent and not yet acknowledged, per device.
    /// Default 64. A device that stops acknowledging costs inbox index entries,
    /// never more buffered payloads than this window.
    pub delivery_window_messages: u32,
    /// Payload bytes sent and not yet acknowledged, per device. Default 262,144.
    /// At least one message is always allowed in flight.
    pub delivery_window_bytes: u32,
    /// Sends read from a connection and not yet answered (ServerAck or Error).
    /// Default 256, at most 65,535. At the bound the connection is not read
    /// until answers go out.
    pub sends_in_flight_max: u32,
    /// Unsent output queued for one connection, bytes. Default 1,048,576. At
    /// the bound the server stops reading that connection until it drains.
    pub output_queue_bytes_max: u32,
    /// Capacity of each shard-to-shard channel, messages. Default 1,024. A full
    /// channel stops the sending connection's reads: backpressure, no drops.
    pub shard_channel_capacity: u32,
    /// Sequences listed in one Ack, ids in one ReadReceipt. Default 1,024.
    pub ids_per_frame_max: u32,
    /// Failed Hellos from one address before its next attempts are delayed.
    /// Default 5.
    pub auth_failures_before_delay: u32,
    /// Delay imposed on an address past its failure budget, ms. Default 1,000;
    /// it doubles per further failure up to 30 s and resets after a success or
    /// a minute without failures.
    pub auth_failure_delay_ms: u32,
    /// Addresses tracked for failed Hellos per shard. Default 65,536 (about
    /// 40 bytes each); the oldest entry is evicted first.
    pub auth_failure_addresses_max: u32,
    /// Remembered (sender device, client message id) pairs per shard for
    /// dedupe of retried Sends. Default 1,048,576: about 100 bytes each as
    /// measured (`docs/store.md`), so about 105 MB per shard when full. The
    /// oldest entry is forgotten first; entries for messages still in the log
    /// are rebuilt on recovery. A retry must come within this many newer
    /// Sends to the shard to be recognised.
    pub dedupe_entries_max: u32,
    /// Time given to a graceful shutdown to flush commits and say GoAway, ms.
    /// Default 5,000.
    pub shutdown_deadline_ms: u32,
    /// Companion devices an account may link besides its primary. Default 4.
    pub companions_max: u32,
    /// How long a link code can be redeemed, ms. Default 60,000.
    pub link_code_ttl_ms: u32,
    /// Members of one group, its creator included. Default 1,024, at most
    /// 65,536. A group message is stored once per shard holding members.
    pub group_members_max: u32,
    /// One-time prekeys a device may hold. Default 100; an upload past it
    /// gets PREKEYS_INVALID and stores nothing.
    pub prekeys_max: u32,
    /// A device is told (PrekeysLow) when a fetch leaves it fewer one-time
    /// prekeys than this. Default 10.
    pub prekeys_low: u32,
    /// Prekey bundles one device may fetch per minute. Default 60; past it
    /// FetchPrekeys gets RATE_LIMITED (not fatal).
    pub prekey_fetches_per_minute: u32,
    /// A user whose last device disconnected shows as offline after this
    /// long, ms, unless a device connects again meanwhile. Default 5,000.
    pub presence_grace_ms: u32,
    /// Users one session may subscribe to the presence of. Default 256;
    /// past it SubscribePresence gets TOO_MANY_IDS.
    pub presence_subscriptions_max: u32,
    /// Typing notices one device may send per second; more are dropped.
    /// Default 5.
    pub typing_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: 65_536 + 1_024,
            payload_bytes_max: 65_536,
            connections_per_shard_max: 1_000_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            delivery_window_messages: 64,
            delivery_window_bytes: 262_144,
            sends_in_flight_max: 256,
            output_queue_bytes_max: 1_048_576,
            shard_channel_capacity: 1_024,
            ids_per_frame_max: 1_024,
            auth_failures_before_delay: 5,
            auth_failure_delay_ms: 1_000,
            auth_failure_addresses_max: 65_536,
            dedupe_entries_max: 1_048_576,
            companions_max: 4,
            link_code_ttl_ms: 60_000,
            group_members_max: 1_024,
            prekeys_max: 100,
            prekeys_low: 10,
            prekey_fetches_per_minute: 60,
            presence_grace_ms: 5_000,
            presence_subscriptions_max: 256,
            typing_per_second: 5,
            shutdown_deadline_ms: 5_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Size of each preallocated segment file, bytes. Default 67,108,864
    /// (64 MiB). Must hold the largest record. Each shard maps its live
    /// segments, so address space is segments × this.
    pub segment_size_bytes: u64,
    /// When a ServerAck may go out. Default `fsync`.
    pub durability: Durability,
    /// Longest a record waits for the next group commit to start, µs.
    /// Default 200. Larger batches cost latency; the commit also starts at once
    /// when `commit_batch_records_max` records are waiting.
    pub commit_interval_us: u32,
    /// Records that start a commit without waiting for the interval. Default 4,096.
    pub commit_batch_records_max: u32,
    /// Cap on the bytes of all of one shard's segments; 0 means no cap (bounded
    /// by the disk). Default 0. At the cap a Send gets STORE_FULL.
    pub log_bytes_max: u64,
    /// Messages and receipts not delivered within this are dropped, s.
    /// Default 2,592,000 (30 days).
    pub message_ttl_s: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_size_bytes: 64 << 20,
            durability: Durability::Fsync,
            commit_interval_us: 200,
            commit_batch_records_max: 4_096,
            log_bytes_max: 0,
            message_ttl_s: 30 * 24 * 3600,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: Limits,
    pub store: StoreConfig,
    pub push: PushConfig,
    pub media: MediaConfig,
    pub wss: WssConfig,
}

/// The WebSocket-over-TLS listener for browsers (`wss`): TLS and the HTTP
/// upgrade on a small tokio runtime of its own, each WebSocket bridged to
/// the client listener over loopback (`crate::wss`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WssConfig {
    /// Whether the listener runs. Default false: it needs a certificate,
    /// which a fresh server does not have; `cert_path` and `key_path` must
    /// be set when it is true.
    pub enabled: bool,
    /// Its TCP listener (TLS). Default 127.0.0.1:7703.
    pub listen: SocketAddr,
    /// The certificate chain, PEM, leaf first. Read at start and again on
    /// SIGHUP. Default empty.
    pub cert_path: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1). Read at
    /// start and again on SIGHUP. Default empty.
    pub key_path: PathBuf,
    /// Threads running TLS and the bridges (never a shard's). Default 1.
    pub threads: u16,
    /// Browser connections open at once; the next one is accepted and
    /// closed at once, before any TLS work. Default 10,000. Each costs
    /// three descriptors in the process (the browser's socket, the bridge's
    /// socket to the client listener and the shard's end of it), a shard
    /// connection, and the bridge's memory (docs/benchmarks.md).
    pub connections_max: u32,
    /// From accept to the Noise intro: the TLS handshake, the HTTP upgrade
    /// and the first 5 bytes of the Noise stream must all arrive within
    /// this, ms. Default 10,000. From then on the client listener's own
    /// handshake timeout applies as well.
    pub handshake_timeout_ms: u32,
    /// A browser that sends nothing (no message, no ping) this long is
    /// closed, ms. Default 300,000: a backstop behind the shards' own
    /// `limits.idle_timeout_ms`, which must not exceed it, so a live
    /// session hears IDLE_TIMEOUT from the server first.
    pub idle_timeout_ms: u32,
    /// Largest WebSocket message (and frame) a browser may send, bytes.
    /// Default 66,560; at least 65,542, the intro and the largest Noise
    /// message with its length prefix. A larger one closes the connection
    /// (1009). The bridge holds at most one message per connection.
    pub message_bytes_max: u32,
}

impl Default for WssConfig {
    fn default() -> Self {
        WssConfig {
            enabled: false,
            listen: "127.0.0.1:7703".parse().expect("literal address"),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
            threads: 1,
            connections_max: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            message_bytes_max: 65_536 + 1_024,
        }
    }
}

/// Smallest `wss.message_bytes_max`: the 5-byte Noise intro and the
/// largest Noise message with its 2-byte length prefix fit in one message.
pub const WSS_MESSAGE_BYTES_MIN: u32 = 5 + 2 + 65_535;

/// Where media blobs are kept (`media.backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaBackend {
    /// Files under `<data_dir>/media/blobs` (the default).
    Local,
    /// An S3-compatible object store (`media.s3`).
    S3,
}

/// The media service: encrypted attachments over HTTP on its own threads
/// (`media`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Whether the media listener runs. Default true.
    pub enabled: bool,
    /// Its HTTP listener. Default 127.0.0.1:7702.
    pub listen: SocketAddr,
    /// The base URL handed to clients in grants; empty: `http://` + the
    /// address the listener got (set it when a proxy terminates TLS).
    pub public_url: String,
    /// Threads serving HTTP (never the shards'). Default 2.
    pub threads: u16,
    /// Connections open at once; the next waits in the listen backlog until
    /// one closes. Default 4,096.
    pub connections_max: u32,
    /// A connection the service waits on (for a request, more of a body, or
    /// the client to read) that makes no progress this long is closed, s.
    /// Default 60.
    pub idle_timeout_s: u64,
    /// Largest blob, bytes. Default 100 MiB.
    pub blob_bytes_max: u64,
    /// A blob is deleted this long after its last upload, s. Default 30 days.
    pub ttl_s: u64,
    /// An upload not finished this long after it began is dropped, s.
    /// Default 86,400.
    pub upload_ttl_s: u64,
    /// How long a grant's token is accepted, s. Default 3,600.
    pub grant_ttl_s: u64,
    /// Bytes one device may upload per UTC day. Default 2 GiB.
    pub device_bytes_per_day: u64,
    /// Uploads one device may begin per minute. Default 60.
    pub device_uploads_per_minute: u32,
    /// Uploads begun and not finished, all devices. Default 10,000.
    pub uploads_in_flight_max: u32,
    /// Uploads begun and not finished by one device. Default 32.
    pub device_uploads_in_flight_max: u32,
    /// Total bytes of blobs and unfinished uploads; past it uploads are
    /// refused with STORE_FULL. Default 10 GiB.
    pub store_bytes_max: u64,
    /// How often the expiry sweep runs, s. Default 600.
    pub sweep_interval_s: u64,
    pub backend: MediaBackend,
    pub s3: S3Config,
}

/// An S3-compatible store for media blobs (`media.s3`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// The service's URL (empty: AWS for `region`).
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Accept an `http://` endpoint (a store on the local network).
    pub allow_http: bool,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            enabled: true,
            listen: "127.0.0.1:7702".parse().expect("literal address"),
            public_url: String::new(),
            threads: 2,
            connections_max: 4_096,
            idle_timeout_s: 60,
            blob_bytes_max: 100 << 20,
            ttl_s: 30 * 86_400,
            upload_ttl_s: 86_400,
            grant_ttl_s: 3_600,
            device_bytes_per_day: 2 << 30,
            device_uploads_per_minute: 60,
            uploads_in_flight_max: 10_000,
            device_uploads_in_flight_max: 32,
            store_bytes_max: 10 << 30,
            sweep_interval_s: 600,
            backend: MediaBackend::Local,
            s3: S3Config::default(),
        }
    }
}

/// Push wake-ups to devices with no live connection (`push`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Whether wake-ups are sent at all. Default true (a device without a
    /// registered endpoint gets none anyway).
    pub enabled: bool,
    /// The operator's webhook (an HTTP POST of JSON per wake-up, for its own
    /// APNs / FCM relay); empty: devices cannot register the webhook kind.
    pub webhook_url: String,
    /// At most one wake-up per device per this long, ms, until it connects.
    /// Default 60,000.
    pub interval_ms: u32,
    /// Wake-ups waiting for the push thread; past it they are dropped
    /// (counted). Default 10,000.
    pub queue_max: u32,
    /// Time given to one push request, ms. Default 5,000.
    pub timeout_ms: u32,
    /// The Web Push `TTL` header: how long the push service keeps the
    /// wake-up for an unreachable device, s. Default 3,600.
    pub ttl_s: u32,
    /// The VAPID `sub` claim: how the push service reaches the operator.
    pub vapid_subject: String,
    /// Accept `http://` Web Push endpoints (tests, a push service on a
    /// private network). Default false: only `https://`.
    pub allow_http_endpoints: bool,
    /// Let Web Push requests reach loopback, private, link-local and other
    /// non-public addresses (tests, a push service on a private network).
    /// Default false: a device cannot point the server at its own network.
    pub allow_private_endpoints: bool,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: true,
            webhook_url: String::new(),
            interval_ms: 60_000,
            queue_max: 10_000,
            timeout_ms: 5_000,
            ttl_s: 3_600,
            vapid_subject: "mailto:postmaster@localhost".into(),
            allow_http_endpoints: false,
            allow_private_endpoints: false,
        }
    }
}

/// Bytes a record needs beyond its payload (header, fixed fields, CRC); a
/// generous upper bound the store's record format stays below.
pub const RECORD_OVERHEAD_BYTES_MAX: u64 = 256;

impl Config {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Tiny bounds so tests reach every limit quickly.
    pub fn for_tests(data_dir: &Path) -> Config {
        Config {
            server: ServerConfig {
                listen: "127.0.0.1:0".parse().expect("literal address"),
                admin_listen: "127.0.0.1:0".parse().expect("literal address"),
                data_dir: data_dir.to_path_buf(),
                shards: 2,
                pin_cpus: false,
                ..ServerConfig::default()
            },
            limits: Limits {
                frame_bytes_max: 4_096 + 512,
                payload_bytes_max: 4_096,
                connections_per_shard_max: 64,
                handshake_timeout_ms: 1_000,
                idle_timeout_ms: 3_000,
                delivery_window_messages: 4,
                delivery_window_bytes: 16_384,
                sends_in_flight_max: 8,
                output_queue_bytes_max: 65_536,
                shard_channel_capacity: 4,
                ids_per_frame_max: 64,
                auth_failures_before_delay: 2,
                auth_failure_delay_ms: 200,
                auth_failure_addresses_max: 16,
                dedupe_entries_max: 4_096,
                shutdown_deadline_ms: 2_000,
                companions_max: 2,
                link_code_ttl_ms: 2_000,
                group_members_max: 16,
                prekeys_max: 20,
                prekeys_low: 3,
                prekey_fetches_per_minute: 10,
                presence_grace_ms: 300,
                presence_subscriptions_max: 16,
                typing_per_second: 5,
            },
            store: StoreConfig {
                segment_size_bytes: 64 << 10,
                durability: Durability::Fsync,
                commit_interval_us: 100,
                commit_batch_records_max: 64,
                log_bytes_max: 0,
                message_ttl_s: 3_600,
            },
            push: PushConfig {
                interval_ms: 1_000,
                timeout_ms: 2_000,
                allow_http_endpoints: true,
                allow_private_endpoints: true,
                ..PushConfig::default()
            },
            media: MediaConfig {
                listen: "127.0.0.1:0".parse().expect("literal address"),
                threads: 1,
                blob_bytes_max: 4 << 20,
                device_bytes_per_day: 64 << 20,
                uploads_in_flight_max: 64,
                store_bytes_max: 256 << 20,
                ..MediaConfig::default()
            },
            wss: WssConfig {
                listen: "127.0.0.1:0".parse().expect("literal address"),
                connections_max: 16,
                handshake_timeout_ms: 1_000,
                idle_timeout_ms: 10_000,
                ..WssConfig::default()
            },
        }
    }

    /// Rejects contradictions before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let s = &self.store;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if l.payload_bytes_max == 0 || l.frame_bytes_max < l.payload_bytes_max + 64 {
            return invalid(format!(
                "limits.frame_bytes_max ({}) must exceed limits.payload_bytes_max ({}) by at least 64",
                l.frame_bytes_max, l.payload_bytes_max
            ));
        }
        if l.frame_bytes_max > 16 << 20 {
            return invalid("limits.frame_bytes_max must be at most 16 MiB".into());
        }
        if s.segment_size_bytes < 4 * (l.frame_bytes_max as u64 + RECORD_OVERHEAD_BYTES_MAX) {
            return invalid(format!(
                "store.segment_size_bytes ({}) must hold at least 4 of the largest records ({} bytes each)",
                s.segment_size_bytes,
                l.frame_bytes_max as u64 + RECORD_OVERHEAD_BYTES_MAX
            ));
        }
        if s.segment_size_bytes > u32::MAX as u64 {
            return invalid("store.segment_size_bytes must be below 4 GiB".into());
        }
        if s.log_bytes_max != 0 && s.log_bytes_max < 2 * s.segment_size_bytes {
            return invalid("store.log_bytes_max must be 0 or at least two segments".into());
        }
        if l.delivery_window_messages == 0 || l.sends_in_flight_max == 0 {
            return invalid("delivery and send windows must be at least 1".into());
        }
        if l.sends_in_flight_max > u16::MAX as u32 {
            return invalid("limits.sends_in_flight_max must be at most 65535".into());
        }
        if l.shard_channel_capacity == 0 {
            return invalid("limits.shard_channel_capacity must be at least 1".into());
        }
        if l.output_queue_bytes_max < l.frame_bytes_max {
            return invalid("limits.output_queue_bytes_max must hold one largest frame".into());
        }
        if l.ids_per_frame_max == 0 || l.handshake_timeout_ms == 0 || l.idle_timeout_ms == 0 {
            return invalid("ids_per_frame_max and timeouts must be positive".into());
        }
        if l.group_members_max < 2 || l.group_members_max > 65_536 {
            return invalid("limits.group_members_max must be between 2 and 65,536".into());
        }
        if l.prekeys_max == 0 || l.prekeys_max > 10_000 || l.prekeys_low > l.prekeys_max {
            return invalid(
                "limits.prekeys_max must be 1 to 10,000 and limits.prekeys_low at most it".into(),
            );
        }
        if l.companions_max > 64 || l.link_code_ttl_ms == 0 {
            return invalid(
                "limits.companions_max must be at most 64 and limits.link_code_ttl_ms positive"
                    .into(),
            );
        }
        let p = &self.push;
        if p.queue_max == 0 || p.timeout_ms == 0 || p.interval_ms == 0 {
            return invalid(
                "push.queue_max, push.timeout_ms and push.interval_ms must be positive".into(),
            );
        }
        if !p.webhook_url.is_empty()
            && !p.webhook_url.starts_with("http://")
            && !p.webhook_url.starts_with("https://")
        {
            return invalid("push.webhook_url must be an http:// or https:// URL".into());
        }
        if s.message_ttl_s == 0 {
            return invalid("store.message_ttl_s must be positive".into());
        }
        let poll = self.server.socket_poll_interval_us;
        if poll != 0 && !(100..=1_000_000).contains(&poll) {
            return invalid(
                "server.socket_poll_interval_us must be 0 or between 100 and 1,000,000".into(),
            );
        }
        if self.server.shard_realtime_priority > 99 {
            return invalid(format!(
                "server.shard_realtime_priority must be 0 (off) or 1-99, not {}",
                self.server.shard_realtime_priority
            ));
        }
        if self.server.socket_wait_in_ring && poll == 0 {
            return invalid(
                "server.socket_wait_in_ring needs socket_poll_interval_us above 0 (it bounds the wait)"
                    .into(),
            );
        }
        let batch = self.server.socket_wait_batch_us;
        if batch != 0 && !self.server.socket_wait_in_ring {
            return invalid("server.socket_wait_batch_us needs socket_wait_in_ring = true".into());
        }
        if batch != 0 && batch >= poll {
            return invalid(
                "server.socket_wait_batch_us must be below socket_poll_interval_us".into(),
            );
        }
        if self.server.registration == RegistrationPolicy::Token
            && self.server.registration_tokens.is_empty()
        {
            return invalid("registration = \"token\" needs registration_tokens".into());
        }
        let m = &self.media;
        if m.enabled {
            if m.threads == 0 || m.blob_bytes_max == 0 || m.ttl_s == 0 || m.grant_ttl_s == 0 {
                return invalid(
                    "media.threads, blob_bytes_max, ttl_s and grant_ttl_s must be positive".into(),
                );
            }
            if m.connections_max == 0 || m.idle_timeout_s == 0 {
                return invalid("media.connections_max and idle_timeout_s must be positive".into());
            }
            if m.upload_ttl_s == 0
                || m.sweep_interval_s == 0
                || m.uploads_in_flight_max == 0
                || m.device_uploads_in_flight_max == 0
            {
                return invalid(
                    "media.upload_ttl_s, sweep_interval_s, uploads_in_flight_max and device_uploads_in_flight_max must be positive"
                        .into(),
                );
            }
            if m.store_bytes_max < m.blob_bytes_max {
                return invalid("media.store_bytes_max must hold at least one largest blob".into());
            }
            if !m.public_url.is_empty()
                && !m.public_url.starts_with("http://")
                && !m.public_url.starts_with("https://")
            {
                return invalid("media.public_url must be an http:// or https:// URL".into());
            }
            if m.backend == MediaBackend::S3 && m.s3.bucket.is_empty() {
                return invalid("media.backend = \"s3\" needs media.s3.bucket".into());
            }
        }
        let w = &self.wss;
        if w.enabled {
            if w.cert_path.as_os_str().is_empty() || w.key_path.as_os_str().is_empty() {
                return invalid("wss.enabled needs wss.cert_path and wss.key_path".into());
            }
            if !self.server.noise {
                return invalid("wss.enabled needs server.noise: browsers speak Noise only".into());
            }
            if w.threads == 0 || w.connections_max == 0 || w.handshake_timeout_ms == 0 {
                return invalid(
                    "wss.threads, connections_max and handshake_timeout_ms must be positive".into(),
                );
            }
            if w.idle_timeout_ms < l.idle_timeout_ms {
                return invalid(format!(
                    "wss.idle_timeout_ms ({}) must be at least limits.idle_timeout_ms ({})",
                    w.idle_timeout_ms, l.idle_timeout_ms
                ));
            }
            if !(WSS_MESSAGE_BYTES_MIN..=16 << 20).contains(&w.message_bytes_max) {
                return invalid(format!(
                    "wss.message_bytes_max must be between {WSS_MESSAGE_BYTES_MIN} and 16 MiB"
                ));
            }
        }
        Ok(())
    }

    /// Shard count after resolving 0 to the CPUs this process may use.
    pub fn shard_count(&self) -> u32 {
        if self.server.shards > 0 {
            return self.server.shards;
        }
        usable_cpus().len().max(1) as u32
    }
}

/// CPUs in this process's affinity mask (which a cgroup cpuset also narrows).
pub fn usable_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_poll_interval_is_zero_or_bounded() {
        let mut config = Config::default();
        for (us, ok) in [
            (0, true),
            (99, false),
            (100, true),
            (1_000_000, true),
            (1_000_001, false),
        ] {
            config.server.socket_poll_interval_us = us;
            assert_eq!(config.validate().is_ok(), ok, "{us}");
        }
    }

    #[test]
    fn socket_wait_batch_needs_ring_wait_and_stays_below_the_interval() {
        let mut config = Config::default();
        config.server.socket_wait_batch_us = 100;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("needs socket_wait_in_ring"), "{error}");
        config.server.socket_wait_in_ring = true;
        config
            .validate()
            .expect("100 us under the 1,000 us interval");
        config.server.socket_wait_batch_us = 1_000;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("below socket_poll_interval_us"), "{error}");
        config.server.socket_wait_batch_us = 0;
        config.validate().expect("0 is off");
    }

    #[test]
    fn defaults_and_test_config_validate() {
        Config::default().validate().expect("defaults are valid");
        Config::for_tests(Path::new("/nonexistent"))
            .validate()
            .expect("test config is valid");
    }

    #[test]
    fn rejects_segment_smaller_than_largest_record() {
        let mut config = Config::default();
        config.store.segment_size_bytes = 64 << 10;
        assert!(config.validate().is_err());
    }

    #[test]
    fn sends_in_flight_max_is_capped_at_u16() {
        let mut config = Config::default();
        config.limits.sends_in_flight_max = 65_535;
        config.validate().expect("65,535 fits");
        config.limits.sends_in_flight_max = 65_536;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("sends_in_flight_max"), "{err}");
    }

    #[test]
    fn parses_partial_toml_with_defaults() {
        let config: Config =
            toml::from_str("[server]\nshards = 3\n[store]\ndurability = \"os\"\n").unwrap();
        assert_eq!(config.server.shards, 3);
        assert_eq!(config.store.durability, Durability::Os);
        assert_eq!(config.limits, Limits::default());
    }

    #[test]
    fn operations_guide_example_is_the_defaults() {
        let guide = include_str!("../../docs/operations.md");
        let start = guide
            .find("```toml\n[server]")
            .expect("the guide has an example file");
        let body = &guide[start + "```toml\n".len()..];
        let body = &body[..body.find("```").expect("closed code block")];
        let parsed: Config = toml::from_str(body).expect("the example parses");
        let mut expected = Config::default();
        expected.server.data_dir = PathBuf::from("/var/lib/switchboard");
        assert_eq!(
            parsed, expected,
            "docs/operations.md's example drifted from the defaults"
        );
    }

    #[test]
    fn wss_needs_a_certificate_noise_and_room_for_a_noise_message() {
        let mut config = Config::default();
        config.wss.enabled = true;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("cert_path"), "{err}");
        config.wss.cert_path = PathBuf::from("cert.pem");
        config.wss.key_path = PathBuf::from("key.pem");
        config.validate().expect("a certificate is enough");
        config.wss.message_bytes_max = WSS_MESSAGE_BYTES_MIN - 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("message_bytes_max"), "{err}");
        config.wss.message_bytes_max = WSS_MESSAGE_BYTES_MIN;
        config.wss.idle_timeout_ms = config.limits.idle_timeout_ms - 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("idle_timeout_ms"), "{err}");
        config.wss.idle_timeout_ms = config.limits.idle_timeout_ms;
        config.server.noise = false;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.noise"), "{err}");
    }

    #[test]
    fn rejects_unknown_keys() {
        assert!(toml::from_str::<Config>("[server]\nshard = 3\n").is_err());
    }
}
