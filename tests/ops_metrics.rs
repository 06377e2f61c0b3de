//! The admin endpoint over a real loopback socket: scrape, health, readiness, errors.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use switchboard::metrics::{
    monotonic_ms, serve_admin, AdminServer, Registry, ADMIN_REQUEST_BYTES_MAX,
};
use switchboard::proto::{ErrorCode, FrameType};

struct Admin {
    address: std::net::SocketAddr,
    server: Option<AdminServer>,
}

impl Admin {
    fn start(registry: Arc<Registry>) -> Admin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = serve_admin(listener, registry).unwrap();
        Admin {
            address,
            server: Some(server),
        }
    }

    /// Sends raw bytes, returns (status, body).
    fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len(), "Content-Length matches the body");
        (status, body.to_string())
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.raw(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().unwrap();
        }
    }
}

fn value_of(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {series} missing"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_scrape_shows_counter_values_per_shard() {
    let registry = Arc::new(Registry::new(2));
    let admin = Admin::start(Arc::clone(&registry));

    let shard0 = registry.shard(0);
    let shard1 = registry.shard(1);
    shard0.accepts.add(5);
    shard0.connections.set(3);
    shard1.connections.inc();
    shard1.frames_in[FrameType::Send.index()].add(6);
    shard1.frame_in(FrameType::Send);
    shard1.frames_out[FrameType::ServerAck.index()].add(6);
    shard0.refused(ErrorCode::AuthFailed);
    shard0.commit_latency.record_us(300);
    shard1.messages_accepted.add(11);
    shard1.stall_time_us.add(42);

    let (status, body) = admin.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(value_of(&body, "switchboard_accepts_total{shard=\"0\"}"), 5);
    assert_eq!(value_of(&body, "switchboard_accepts_total{shard=\"1\"}"), 0);
    assert_eq!(value_of(&body, "switchboard_connections{shard=\"0\"}"), 3);
    assert_eq!(value_of(&body, "switchboard_connections{shard=\"1\"}"), 1);
    assert_eq!(
        value_of(
            &body,
            "switchboard_frames_in_total{shard=\"1\",type=\"send\"}"
        ),
        7
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_frames_out_total{shard=\"1\",type=\"server_ack\"}"
        ),
        6
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_refusals_total{shard=\"0\",reason=\"auth_failed\"}"
        ),
        1
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_commit_latency_microseconds_bucket{shard=\"0\",le=\"256\"}"
        ),
        0
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_commit_latency_microseconds_bucket{shard=\"0\",le=\"512\"}"
        ),
        1
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_commit_latency_microseconds_sum{shard=\"0\"}"
        ),
        300
    );
    assert_eq!(
        value_of(&body, "switchboard_messages_accepted_total{shard=\"1\"}"),
        11
    );
    assert_eq!(
        value_of(
            &body,
            "switchboard_stall_time_microseconds_total{shard=\"1\"}"
        ),
        42
    );

    // Counters move between scrapes.
    shard0.accepts.inc();
    let (_, body) = admin.get("/metrics");
    assert_eq!(value_of(&body, "switchboard_accepts_total{shard=\"0\"}"), 6);
}

#[test]
fn metrics_text_is_well_formed_exposition_format() {
    let registry = Arc::new(Registry::new(3));
    let admin = Admin::start(registry);
    let (status, body) = admin.get("/metrics");
    assert_eq!(status, 200);
    assert!(body.ends_with('\n'));
    let mut declared = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(declared.insert(name.to_string()), "{name} declared twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| declared.contains(*f)))
            .unwrap_or(name);
        assert!(declared.contains(family), "{name} has no TYPE line");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
    }
    assert!(declared.contains("switchboard_connections"));
    assert!(declared.contains("switchboard_commit_latency_microseconds"));
}

#[test]
fn readyz_flips_from_503_to_200_when_every_shard_recovered() {
    let registry = Arc::new(Registry::new(2));
    let admin = Admin::start(Arc::clone(&registry));

    assert_eq!(admin.get("/healthz"), (200, "ok\n".to_string()));
    let (status, body) = admin.get("/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("2 shard(s) recovering"), "{body}");

    registry.shard(0).set_recovered(true);
    assert_eq!(admin.get("/readyz").0, 503);

    registry.shard(1).set_recovered(true);
    assert_eq!(admin.get("/readyz"), (200, "ready\n".to_string()));
    let (_, body) = admin.get("/metrics");
    assert_eq!(value_of(&body, "switchboard_ready"), 1);
    assert_eq!(admin.get("/healthz").0, 200);

    // A graceful shutdown takes the process out of rotation but keeps it healthy.
    registry.set_draining(true);
    assert_eq!(
        admin.get("/readyz"),
        (503, "not ready: draining\n".to_string())
    );
    assert_eq!(admin.get("/healthz").0, 200);
}

#[test]
fn unknown_path_is_404_and_other_methods_405() {
    let admin = Admin::start(Arc::new(Registry::new(1)));
    assert_eq!(admin.get("/nope").0, 404);
    assert_eq!(admin.raw(b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(admin.raw(b"garbage\r\n\r\n").0, 400);
}

#[test]
fn oversized_request_head_is_refused_and_server_keeps_serving() {
    let admin = Admin::start(Arc::new(Registry::new(1)));
    let mut request = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
    request.resize(ADMIN_REQUEST_BYTES_MAX + 100, b'a');
    // The server answers without reading the rest, so the write may see a reset;
    // only the server's health afterwards matters.
    let mut stream = TcpStream::connect(admin.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(&request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    if !response.is_empty() {
        assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 431"));
    }
    assert_eq!(admin.get("/healthz").0, 200);
}

#[test]
fn silent_client_does_not_block_the_endpoint_forever() {
    let admin = Admin::start(Arc::new(Registry::new(1)));
    // Connect and say nothing; the read timeout releases the admin thread.
    let _silent = TcpStream::connect(admin.address).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(admin.get("/healthz").0, 200);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn stop_ends_the_admin_thread_asleep_or_serving() {
    let registry = Arc::new(Registry::new(1));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = serve_admin(listener, registry).unwrap();
    // Asleep in poll(2) with no timeout: the stop wakes it.
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    server.stop().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    // Nothing listens any more.
    assert!(TcpStream::connect(address).is_err());
}

#[test]
fn readyz_names_a_stalled_shard_and_recovers_when_it_runs() {
    let registry = Arc::new(Registry::new(2).with_stall_limit_ms(200));
    for shard in registry.shards() {
        shard.set_recovered(true);
    }
    let admin = Admin::start(Arc::clone(&registry));
    // The stamps below lie up to a second in the past of the process clock.
    while monotonic_ms() < 1_100 {
        std::thread::sleep(Duration::from_millis(50));
    }
    let now = monotonic_ms();
    // Shard 0 runs; shard 1 has had work waiting since two ticks ago with
    // no loop turn since (its socket loop last turned before that).
    for (index, shard) in registry.shards().iter().enumerate() {
        shard.liveness.loop_turned(now.saturating_sub(1_000));
        shard.liveness.tick(now.saturating_sub(500), index == 1);
        shard.liveness.tick(now, index == 1);
    }
    let (status, body) = admin.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: shard 1 has had work waiting for "),
        "{body}"
    );
    let (_, metrics) = admin.get("/metrics");
    let stalled: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_shard_stalled_seconds{shard=\"1\"} "))
        .expect("the stall gauge")
        .parse()
        .unwrap();
    assert!(stalled >= 0.5, "{stalled}");
    // The loop turns and the next tick finds nothing waiting.
    let later = monotonic_ms();
    registry.shard(1).liveness.loop_turned(later);
    registry.shard(1).liveness.tick(later, false);
    assert_eq!(admin.get("/readyz"), (200, "ready\n".to_string()));
}
