//! Push wake-ups: a content-free nudge to a device that has no live
//! connection when something is queued for it, so it connects and fetches.
//!
//! Two kinds, per device (`RegisterPush`, stored in the metadata database):
//! - Web Push (RFC 8030) with VAPID (RFC 8292): an empty POST to the
//!   device's push-service URL with `TTL` and `Authorization: vapid t=JWT,
//!   k=KEY`, the JWT signed ES256 by the server's P-256 key (the `p256`
//!   crate; the key is made at first start and kept in the data directory,
//!   `vapid.pem`, 0600). A 404 or 410 removes the endpoint.
//! - A webhook: a POST of `{"user_id", "device_id", "token"}` as JSON to
//!   the operator's URL (`push.webhook_url`), for its own APNs / FCM relay.
//!
//! The shards never wait on this: each hands wake-ups to one thread over a
//! bounded queue (`try_send`; a full queue drops the wake-up and counts
//! it), and the engine sends at most one per device per
//! `push.interval_ms` until the device connects. The thread looks the
//! endpoint up, posts with a timeout (`ureq`), and retries a failure (a
//! gateway that is down, slow or answers 5xx) with doubling backoff, at
//! most `RETRIES` times. The message stays queued whatever the gateway
//! does.

use std::collections::BinaryHeap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use tracing::{debug, warn};

use crate::config::PushConfig;
use crate::ids::InboxKey;
use crate::meta::{MetaStore, PushEndpoint};

/// Tries per wake-up before it is given up.
const RETRIES: u32 = 4;
/// First retry delay; it doubles.
const RETRY_FIRST_MS: u64 = 1_000;
/// The VAPID key's file in the data directory.
pub const VAPID_FILE: &str = "vapid.pem";

/// The counters of the push thread (read by the metrics endpoint).
#[derive(Debug, Default)]
pub struct PushStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub endpoints_removed: AtomicU64,
}

/// The shards' side: a bounded queue to the push thread.
#[derive(Clone, Debug)]
pub struct Pusher {
    tx: Sender<InboxKey>,
    stats: Arc<PushStats>,
    /// The VAPID public key (uncompressed P-256 point, 65 bytes).
    pub vapid_public_key: Arc<Vec<u8>>,
    pub webhook: bool,
}

impl Pusher {
    /// Hands a wake-up to the push thread; never waits (a full queue drops
    /// it, counted).
    pub fn wake(&self, device: InboxKey) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(device) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &PushStats {
        &self.stats
    }
}

/// Loads the VAPID key from the data directory, or makes one (0600).
pub fn vapid_key(data_dir: &Path) -> std::io::Result<SigningKey> {
    let path = data_dir.join(VAPID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(pem) => SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::random(&mut rand::rngs::OsRng);
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(pem.as_bytes())?;
            file.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// The VAPID `Authorization` header value for a push service at
/// `endpoint` (RFC 8292: an ES256 JWT for the endpoint's origin, valid 12
/// hours, and the public key).
pub fn vapid_authorization(key: &SigningKey, endpoint: &str, subject: &str) -> String {
    let origin = origin_of(endpoint);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 12 * 3600;
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let claims = serde_json::json!({ "aud": origin, "exp": exp, "sub": subject });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let signature: Signature = key.sign(signing_input.as_bytes());
    let jwt = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    );
    let public = URL_SAFE_NO_PAD.encode(public_key_bytes(key));
    format!("vapid t={jwt}, k={public}")
}

/// The uncompressed public point of `key` (65 bytes).
pub fn public_key_bytes(key: &SigningKey) -> Vec<u8> {
    key.verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec()
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split('/').next().unwrap_or(rest);
    format!("{scheme}://{host}")
}

/// A wake-up waiting for its (next) try.
#[derive(Debug, PartialEq, Eq)]
struct Retry {
    due: Instant,
    device: InboxKey,
    attempt: u32,
}

impl Ord for Retry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// What a try came to.
enum Outcome {
    Sent,
    /// The endpoint is gone for good (404 / 410): forget it.
    Gone,
    /// Try again later.
    Failed,
    /// Nothing to send to.
    NoEndpoint,
}

/// Starts the push thread; returns the shards' handle.
pub fn start(
    config: &PushConfig,
    data_dir: &Path,
    meta: Arc<MetaStore>,
    stats: Arc<PushStats>,
) -> std::io::Result<Pusher> {
    let key = vapid_key(data_dir)?;
    let (tx, rx) = crossbeam_channel::bounded(config.queue_max as usize);
    let pusher = Pusher {
        tx,
        stats: stats.clone(),
        vapid_public_key: Arc::new(public_key_bytes(&key)),
        webhook: !config.webhook_url.is_empty(),
    };
    let config = config.clone();
    std::thread::Builder::new()
        .name("switchboard-push".into())
        .spawn(move || run(rx, key, config, meta, stats))?;
    Ok(pusher)
}

fn run(
    rx: Receiver<InboxKey>,
    key: SigningKey,
    config: PushConfig,
    meta: Arc<MetaStore>,
    stats: Arc<PushStats>,
) {
    let timeout = Duration::from_millis(u64::from(config.timeout_ms));
    // The webhook is the operator's own URL; a Web Push endpoint comes from
    // a device, so unless configured otherwise it may reach public
    // addresses only (checked on the addresses the connection will use).
    let agents = Agents {
        webhook: ureq::AgentBuilder::new().timeout(timeout).build(),
        web_push: if config.allow_private_endpoints {
            ureq::AgentBuilder::new().timeout(timeout).build()
        } else {
            ureq::AgentBuilder::new()
                .timeout(timeout)
                .resolver(PublicOnly)
                .build()
        },
    };
    let mut retries: BinaryHeap<Retry> = BinaryHeap::new();
    loop {
        let wait = retries
            .peek()
            .map(|r| r.due.saturating_duration_since(Instant::now()));
        let next = match wait {
            Some(wait) => rx.recv_timeout(wait),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let (device, attempt) = match next {
            Ok(device) => (device, 0),
            Err(RecvTimeoutError::Timeout) => match retries.pop() {
                Some(r) => (r.device, r.attempt),
                None => continue,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match try_once(&agents, &key, &config, &meta, device) {
            Outcome::Sent => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::NoEndpoint => {}
            Outcome::Gone => {
                stats.endpoints_removed.fetch_add(1, Ordering::Relaxed);
                if let Err(err) = meta.set_push_endpoint(device.user, device.device, None) {
                    warn!(%err, %device, "removing a gone push endpoint failed");
                }
            }
            Outcome::Failed => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                if attempt + 1 < RETRIES {
                    retries.push(Retry {
                        due: Instant::now() + Duration::from_millis(RETRY_FIRST_MS << attempt),
                        device,
                        attempt: attempt + 1,
                    });
                }
            }
        }
    }
}

/// The HTTP clients of the push thread.
struct Agents {
    webhook: ureq::Agent,
    web_push: ureq::Agent,
}

/// A resolver that keeps only public addresses, so a device's Web Push
/// endpoint cannot make the server call into its own network.
struct PublicOnly;

impl ureq::Resolver for PublicOnly {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<std::net::SocketAddr>> {
        use std::net::ToSocketAddrs;
        let all: Vec<_> = netloc.to_socket_addrs()?.collect();
        let public: Vec<_> = all.into_iter().filter(|a| is_public(a.ip())).collect();
        if public.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "push endpoint resolves to no public address",
            ));
        }
        Ok(public)
    }
}

/// Whether an address is on the public internet: not loopback, private,
/// shared (CGNAT), link-local, unspecified, multicast, broadcast,
/// documentation or benchmarking space, nor an IPv6 unique-local or
/// IPv4-mapped form of those.
fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, _, _] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

fn try_once(
    agents: &Agents,
    key: &SigningKey,
    config: &PushConfig,
    meta: &MetaStore,
    device: InboxKey,
) -> Outcome {
    let endpoint = match meta.push_endpoint(device.user, device.device) {
        Ok(Some(endpoint)) => endpoint,
        Ok(None) => return Outcome::NoEndpoint,
        Err(err) => {
            warn!(%err, %device, "reading a push endpoint failed");
            return Outcome::Failed;
        }
    };
    let result = match &endpoint {
        PushEndpoint::WebPush(url) => agents
            .web_push
            .post(url)
            .set("TTL", &config.ttl_s.to_string())
            .set("Urgency", "high")
            .set(
                "Authorization",
                &vapid_authorization(key, url, &config.vapid_subject),
            )
            .send_bytes(&[]),
        PushEndpoint::Webhook(token) => {
            if config.webhook_url.is_empty() {
                return Outcome::NoEndpoint;
            }
            let body = serde_json::json!({
                "user_id": device.user.0,
                "device_id": device.device.0,
                "token": token,
            });
            agents
                .webhook
                .post(&config.webhook_url)
                .set("Content-Type", "application/json")
                .send_string(&body.to_string())
        }
    };
    match result {
        Ok(_) => {
            debug!(%device, "push wake-up sent");
            Outcome::Sent
        }
        Err(ureq::Error::Status(404 | 410, _)) if matches!(endpoint, PushEndpoint::WebPush(_)) => {
            Outcome::Gone
        }
        Err(err) => {
            warn!(%device, %err, "push wake-up failed");
            Outcome::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;

    #[test]
    fn only_public_addresses_count_as_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn a_web_push_agent_never_connects_to_a_private_address() {
        use ureq::Resolver;
        for netloc in [
            "127.0.0.1:443",
            "localhost:443",
            "[::1]:443",
            "10.0.0.1:443",
        ] {
            let err = PublicOnly.resolve(netloc).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{netloc}");
        }
        assert_eq!(
            PublicOnly.resolve("1.1.1.1:443").unwrap(),
            vec!["1.1.1.1:443".parse().unwrap()]
        );
        // A real listener on loopback: the filtered agent fails without
        // ever opening a connection to it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/push", listener.local_addr().unwrap());
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .resolver(PublicOnly)
            .build();
        assert!(agent.post(&url).send_bytes(&[]).is_err());
        let accepted = listener.accept().map(|_| ()).map_err(|e| e.kind());
        assert_eq!(accepted, Err(std::io::ErrorKind::WouldBlock));
    }

    #[test]
    fn the_vapid_header_verifies_with_the_public_key_and_the_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = vapid_key(dir.path()).unwrap();
        let again = vapid_key(dir.path()).unwrap();
        assert_eq!(public_key_bytes(&key), public_key_bytes(&again));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(VAPID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let header = vapid_authorization(
            &key,
            "https://push.example:8443/p/abc",
            "mailto:ops@example",
        );
        let (t, k) = header
            .strip_prefix("vapid t=")
            .unwrap()
            .split_once(", k=")
            .unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(k).unwrap(), public_key_bytes(&key));
        let (input, sig) = t.rsplit_once('.').unwrap();
        let claims = input.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], "https://push.example:8443");
        let verifying = VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap()).unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        verifying.verify(input.as_bytes(), &sig).unwrap();
    }
}
