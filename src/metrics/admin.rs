//! The admin HTTP/1.1 endpoint: a blocking server on one dedicated std thread.
//!
//! It serves one request per connection and one connection at a time. That is enough
//! for a scraper and a load balancer's health check, and it keeps the admin path free of
//! any async runtime and of any shard. Each connection is bounded: the request head may
//! not exceed [`ADMIN_REQUEST_BYTES_MAX`] and must arrive within [`ADMIN_READ_TIMEOUT`].

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Readiness, Registry};

/// Largest request head accepted (request line plus headers); bigger gets 431.
pub const ADMIN_REQUEST_BYTES_MAX: usize = 8 * 1024;

/// How long a client may take to send its request head, and to read the answer.
pub const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the accept loop backs off after an accept error other than "nothing to
/// accept" (EMFILE and friends), rather than spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(25);

/// The admin endpoint's thread; `stop` ends it.
pub struct AdminServer {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
    /// Writing a byte here wakes the thread out of its poll(2).
    wake: UnixStream,
}

impl AdminServer {
    /// Ends the accept loop (a request being answered is finished first) and waits
    /// for the thread.
    pub fn stop(self) -> std::thread::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(error) = (&self.wake).write_all(&[1]) {
            // The thread has gone already (its end of the pair is closed).
            tracing::debug!(%error, "admin thread not woken");
        }
        self.thread.join()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` from a new thread named
/// `switchboard-admin`, until `AdminServer::stop`. The thread sleeps in poll(2) on the
/// listener and a wake-up socket, with no timeout: an idle endpoint costs no wake-ups.
///
/// - `GET /metrics`: the registry in Prometheus text format.
/// - `GET /healthz`: 200 `ok` while the process runs.
/// - `GET /readyz`: 200 `ready` once every shard recovered its log, 503 before that
///   and while draining.
/// - Anything else: 404; a method other than GET or HEAD: 405.
pub fn serve_admin(listener: TcpListener, registry: Arc<Registry>) -> io::Result<AdminServer> {
    let (wake, woken) = UnixStream::pair()?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("switchboard-admin".into())
        .spawn(move || accept_loop(listener, &registry, &thread_stop, &woken))?;
    Ok(AdminServer { thread, stop, wake })
}

fn accept_loop(listener: TcpListener, registry: &Registry, stop: &AtomicBool, woken: &UnixStream) {
    // Nonblocking accept: poll(2) says when there is a connection or a stop.
    if let Err(error) = listener.set_nonblocking(true) {
        tracing::error!(%error, "admin listener cannot be made nonblocking; admin endpoint off");
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                if let Err(error) = handle_connection(stream, registry) {
                    tracing::debug!(%error, "admin request failed");
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                wait_readable(&listener, woken);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => {
                // EMFILE and friends: back off rather than spin, and keep serving.
                tracing::warn!(%error, "admin accept failed");
                std::thread::sleep(ACCEPT_ERROR_BACKOFF);
            }
        }
    }
}

/// Waits until the listener has a connection to accept or the wake-up socket is
/// written (or closed).
fn wait_readable(listener: &TcpListener, woken: &UnixStream) {
    use std::os::fd::AsFd;
    let mut fds = [
        nix::poll::PollFd::new(listener.as_fd(), nix::poll::PollFlags::POLLIN),
        nix::poll::PollFd::new(woken.as_fd(), nix::poll::PollFlags::POLLIN),
    ];
    if nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE).is_err() {
        // EINTR or a transient failure: back off so the loop cannot spin.
        std::thread::sleep(ACCEPT_ERROR_BACKOFF);
    }
}

/// What the request head parsed to.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Get { path: String, head_only: bool },
    BadMethod,
    Malformed,
    TooLarge,
}

fn handle_connection(mut stream: TcpStream, registry: &Registry) -> io::Result<()> {
    // The listener is nonblocking; an accepted socket may inherit that on some systems.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(ADMIN_READ_TIMEOUT))?;
    stream.set_write_timeout(Some(ADMIN_READ_TIMEOUT))?;
    let request = read_request(&mut stream)?;
    let (status, content_type, body, head_only) = match request {
        Request::Get { path, head_only } => {
            let (status, content_type, body) = route(&path, registry);
            (status, content_type, body, head_only)
        }
        Request::BadMethod => (405, TEXT, "method not allowed\n".to_string(), false),
        Request::Malformed => (400, TEXT, "bad request\n".to_string(), false),
        Request::TooLarge => (431, TEXT, "request header too large\n".to_string(), false),
    };
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reason(status),
        body.len()
    );
    if status == 405 {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if !head_only {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    // Half-close so the client sees a clean end of the response.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

const TEXT: &str = "text/plain; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn route(path: &str, registry: &Registry) -> (u16, &'static str, String) {
    // Ignore a query string: scrapers sometimes add one.
    let path = path.split('?').next().unwrap_or(path);
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(64 * 1024);
            registry.render_prometheus(&mut body);
            (200, PROMETHEUS, body)
        }
        "/healthz" => (200, TEXT, "ok\n".to_string()),
        "/readyz" => match registry.readiness() {
            Readiness::Ready => (200, TEXT, "ready\n".to_string()),
            Readiness::Draining => (503, TEXT, "not ready: draining\n".to_string()),
            Readiness::NoShards => (503, TEXT, "not ready: no shards\n".to_string()),
            Readiness::Recovering(count) => (
                503,
                TEXT,
                format!("not ready: {count} shard(s) recovering\n"),
            ),
            Readiness::Stalled { shard, stalled_ms } => (
                503,
                TEXT,
                format!(
                    "not ready: shard {shard} has had work waiting for {}.{:03} s without running it\n",
                    stalled_ms / 1000,
                    stalled_ms % 1000
                ),
            ),
        },
        _ => (404, TEXT, "not found\n".to_string()),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Reads until the blank line that ends the head, within the size and time bounds.
fn read_request(stream: &mut TcpStream) -> io::Result<Request> {
    let deadline = Instant::now() + ADMIN_READ_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&head) {
            return Ok(parse_head(&head[..end]));
        }
        if head.len() >= ADMIN_REQUEST_BYTES_MAX {
            return Ok(Request::TooLarge);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        let room = (ADMIN_REQUEST_BYTES_MAX - head.len()).min(chunk.len());
        let read = stream.read(&mut chunk[..room])?;
        if read == 0 {
            return Ok(Request::Malformed);
        }
        head.extend_from_slice(&chunk[..read]);
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Tolerate bare-LF clients (some hand-written health checkers).
        bytes.windows(2).position(|w| w == b"\n\n")
    })
}

fn parse_head(head: &[u8]) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Malformed;
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_ascii_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if !version.starts_with("HTTP/1.") || !path.starts_with('/') {
        return Request::Malformed;
    }
    match method {
        "GET" => Request::Get {
            path: path.to_string(),
            head_only: false,
        },
        "HEAD" => Request::Get {
            path: path.to_string(),
            head_only: true,
        },
        _ => Request::BadMethod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_get_request_line() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x"),
            Request::Get {
                path: "/metrics".into(),
                head_only: false
            }
        );
    }

    #[test]
    fn rejects_non_http_request_line() {
        assert_eq!(parse_head(b"hello"), Request::Malformed);
        assert_eq!(parse_head(b"GET metrics HTTP/1.1"), Request::Malformed);
        assert_eq!(parse_head(b"POST /metrics HTTP/1.1"), Request::BadMethod);
    }
}
