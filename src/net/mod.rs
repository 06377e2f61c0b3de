//! Sockets: accepting, the handshake, the handoff to the home shard, and the
//! per-connection I/O loop.
//!
//! Runs on every shard's thread, over glommio's `TcpStream` (poll-based: a
//! read waits for readiness and then copies with a non-blocking `recv`, so a
//! pending read holds no buffer). The protocol decisions are made in
//! `session` and `shard`; this module only moves bytes:
//! - reads go into the shard's scratch buffer, borrowed only inside one poll;
//!   a connection keeps bytes only for an incomplete frame;
//! - writes drain the connection's output queue, where every frame due to it
//!   in a loop turn was encoded, in as few sends as the kernel allows;
//! - a connection whose output queue or unanswered Sends reach their bounds
//!   is not read until they drain (backpressure, nothing dropped).

pub mod conn;
pub mod uring;

use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::config::RegistrationPolicy;
use crate::ids::{DeviceId, InboxKey, UserId};
use crate::proto::{self, error_frame, pb, ErrorCode, Frame};
use crate::route::message::Request;
use crate::session::{client_may_send_in_session, negotiate_version};
use crate::shard::Shard;

use conn::Conn;

/// Frames handled before the connection task yields to others.
const FRAMES_PER_TURN: u32 = 64;
/// After a fatal error: how long the server keeps reading (and discarding)
/// so the peer sees the Error frame before the close.
const LINGER: Duration = Duration::from_millis(200);

/// Accepts connections until the shard stops.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !shard.stopping.get() {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(err)) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(shard = %shard.id, %err, "accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shard.metrics_accepted_socket();
        if shard.open_connections.get() >= shard.config.limits.connections_per_shard_max {
            shard.metrics_refused(ErrorCode::ServerBusy);
            glommio::spawn_local(refuse_busy(stream)).detach();
            continue;
        }
        shard.open_connections.set(shard.open_connections.get() + 1);
        glommio::spawn_local(handshake(shard.clone(), stream)).detach();
    }
}

async fn refuse_busy(mut stream: TcpStream) {
    let mut frame = error_frame(ErrorCode::ServerBusy, "connection limit reached", true);
    if let Frame::Error(e) = &mut frame {
        e.retry_after_ms = 1_000;
    }
    let _ = stream.write_all(&frame.to_bytes()).await;
    linger_close(stream).await;
}

/// Sends a last frame, then closes so the peer reads it.
async fn fatal_close(mut stream: TcpStream, code: ErrorCode, message: &str, retry_after_ms: u32) {
    let mut frame = error_frame(code, message, true);
    if let Frame::Error(e) = &mut frame {
        e.retry_after_ms = retry_after_ms;
    }
    let _ = stream.write_all(&frame.to_bytes()).await;
    linger_close(stream).await;
}

/// Half-closes, discards what the peer still sends for a moment, closes.
/// Closing with unread input would reset the connection and could destroy
/// the Error frame before the peer reads it.
async fn linger_close(mut stream: TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 512];
    let mut budget = 64 * 1024usize;
    while budget > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match glommio::timer::timeout(left, async {
            stream.read(&mut sink).await.map_err(Into::into)
        })
        .await
        {
            Ok(0) | Err(_) => break,
            Ok(n) => budget = budget.saturating_sub(n),
        }
    }
}

enum HandshakeOutcome {
    Authenticated {
        device: InboxKey,
        version: u32,
        buffered: BytesMut,
    },
    Closed,
}

/// Reads frames until a Hello succeeds (Register may come first), then
/// starts the session here or hands the socket to the device's home shard.
async fn handshake(shard: Rc<Shard>, mut stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let timeout = Duration::from_millis(shard.config.limits.handshake_timeout_ms as u64);
    let outcome = run_handshake(&shard, &mut stream, peer, Instant::now() + timeout).await;
    match outcome {
        Ok(HandshakeOutcome::Authenticated {
            device,
            version,
            buffered,
        }) => {
            let home = shard.home_of(device.user);
            if home == shard.id {
                start_session(shard, stream, device, version, buffered);
            } else {
                // Move the socket: a duplicate descriptor travels, the
                // stream bound to this executor is dropped.
                let fd = match nix::unistd::dup(stream.as_raw_fd()) {
                    Ok(fd) => fd,
                    Err(err) => {
                        warn!(%err, "dup for handoff failed");
                        shard.connection_closed_before_session();
                        return fatal_close(stream, ErrorCode::Internal, "handoff failed", 0).await;
                    }
                };
                drop(stream);
                shard.connection_closed_before_session();
                // SAFETY: `fd` was just returned by dup(2), is open, and is
                // owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                shard.metrics_handoff_out();
                shard
                    .route_request(
                        home,
                        Request::Handoff {
                            fd,
                            device,
                            version,
                            buffered: buffered.freeze(),
                        },
                    )
                    .await;
            }
        }
        Ok(HandshakeOutcome::Closed) => {
            shard.connection_closed_before_session();
        }
        Err((code, message, retry)) => {
            shard.metrics_refused(code);
            shard.connection_closed_before_session();
            fatal_close(stream, code, message, retry).await;
        }
    }
}

type HandshakeError = (ErrorCode, &'static str, u32);

async fn run_handshake(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    peer: IpAddr,
    deadline: Instant,
) -> Result<HandshakeOutcome, HandshakeError> {
    let limits = &shard.config.limits;
    let mut buffered = BytesMut::new();
    // One account per connection: account creation writes to the metadata
    // database, so a connection may not turn into a registration loop.
    let mut registered = false;
    loop {
        while let Some(frame) = proto::next_frame(&mut buffered, limits.frame_bytes_max)
            .map_err(|e| (e.code(), "bad frame during handshake", 0))?
        {
            match frame {
                Frame::Register(register) => {
                    if registered {
                        return Err((ErrorCode::UnexpectedFrame, "one Register per connection", 0));
                    }
                    registered = true;
                    let version = negotiate_version(register.protocol_version)
                        .map_err(|c| (c, "unsupported protocol version", 0))?;
                    match shard.config.server.registration {
                        RegistrationPolicy::Open => {}
                        RegistrationPolicy::Closed => {
                            return Err((
                                ErrorCode::RegistrationClosed,
                                "registration is closed",
                                0,
                            ))
                        }
                        RegistrationPolicy::Token => {
                            let ok = shard.config.server.registration_tokens.iter().any(|t| {
                                subtle::ConstantTimeEq::ct_eq(
                                    t.as_bytes(),
                                    register.registration_token.as_bytes(),
                                )
                                .into()
                            });
                            if !ok {
                                return Err((
                                    ErrorCode::BadRegistrationToken,
                                    "registration token not accepted",
                                    0,
                                ));
                            }
                        }
                    }
                    let meta = shard.meta.clone();
                    let account = glommio::executor()
                        .spawn_blocking(move || meta.register())
                        .await
                        .map_err(|err| {
                            warn!(%err, "registration failed");
                            (ErrorCode::Internal, "registration failed", 0)
                        })?;
                    shard.metrics_registered();
                    let frame = Frame::Registered(pb::Registered {
                        protocol_version: version,
                        user_id: account.user.0,
                        device_id: account.device.0,
                        secret: Bytes::copy_from_slice(&account.secret),
                    });
                    if stream.write_all(&frame.to_bytes()).await.is_err() {
                        return Ok(HandshakeOutcome::Closed);
                    }
                }
                Frame::Hello(hello) => {
                    let version = negotiate_version(hello.protocol_version)
                        .map_err(|c| (c, "unsupported protocol version", 0))?;
                    let now = Instant::now();
                    if let Some(wait) = shard.throttle.borrow_mut().check(peer, now) {
                        return Err((
                            ErrorCode::RateLimited,
                            "too many failed logins",
                            wait.as_millis().min(u32::MAX as u128) as u32,
                        ));
                    }
                    let user = UserId(hello.user_id);
                    let device = DeviceId(hello.device_id);
                    let meta = shard.meta.clone();
                    let secret = hello.secret.clone();
                    let verified = glommio::executor()
                        .spawn_blocking(move || meta.verify(user, device, &secret))
                        .await
                        .map_err(|err| {
                            warn!(%err, "credential lookup failed");
                            (ErrorCode::Internal, "credential lookup failed", 0)
                        })?;
                    if !verified {
                        shard.throttle.borrow_mut().on_failure(peer, Instant::now());
                        shard.metrics_auth_failed();
                        return Err((ErrorCode::AuthFailed, "unknown device or wrong secret", 0));
                    }
                    shard.throttle.borrow_mut().on_success(peer);
                    return Ok(HandshakeOutcome::Authenticated {
                        device: InboxKey { user, device },
                        version,
                        buffered,
                    });
                }
                _ => {
                    return Err((
                        ErrorCode::NotAuthenticated,
                        "the first frame must be Hello or Register",
                        0,
                    ))
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((ErrorCode::HandshakeTimeout, "handshake took too long", 0));
        }
        let want = proto::bytes_wanted(&buffered).clamp(proto::HEADER_BYTES, 4096);
        buffered.reserve(want);
        let mut chunk = [0u8; 1024];
        let read = glommio::timer::timeout(left, async {
            stream.read(&mut chunk).await.map_err(Into::into)
        })
        .await;
        match read {
            Ok(0) => return Ok(HandshakeOutcome::Closed),
            Ok(n) => buffered.extend_from_slice(&chunk[..n]),
            Err(glommio::GlommioError::TimedOut(_)) => {
                return Err((ErrorCode::HandshakeTimeout, "handshake took too long", 0))
            }
            Err(_) => return Ok(HandshakeOutcome::Closed),
        }
    }
}

/// Starts a handed-off connection on its home shard.
pub fn adopt_handoff(
    shard: Rc<Shard>,
    fd: OwnedFd,
    device: InboxKey,
    version: u32,
    buffered: Bytes,
) {
    // SAFETY: `fd` is an open, connected TCP socket whose ownership moves
    // into the stream (into_raw_fd gives it up).
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    if shard.open_connections.get() >= shard.config.limits.connections_per_shard_max {
        shard.metrics_refused(ErrorCode::ServerBusy);
        glommio::spawn_local(refuse_busy(stream)).detach();
        return;
    }
    shard.open_connections.set(shard.open_connections.get() + 1);
    start_session(
        shard,
        stream,
        device,
        version,
        BytesMut::from(&buffered[..]),
    );
}

fn start_session(
    shard: Rc<Shard>,
    stream: TcpStream,
    device: InboxKey,
    version: u32,
    buffered: BytesMut,
) {
    let conn = shard.open_session(device, version);
    shard.metrics_session_opened();
    // The task is `run_session` itself, not a block around it: a wrapper
    // would store the stream and buffer twice (its captures and the inner
    // future), in every idle connection's task.
    glommio::spawn_local(run_session(shard, conn, stream, buffered)).detach();
}

/// Forgets a session whose loop ended and closes its socket.
fn end_session(shard: &Shard, conn: &Rc<Conn>, stream: Option<TcpStream>) {
    shard.close_session(conn);
    shard.metrics_session_closed();
    shard.open_connections.set(shard.open_connections.get() - 1);
    if let Some(stream) = stream {
        // Its own task: the linger's buffer and timer must not enlarge
        // every session's future.
        glommio::spawn_local(linger_close(stream)).detach();
    }
}

enum IoEvent {
    Readable,
    /// The peer closed or the socket failed.
    Gone,
    /// A close began and the output queue is flushed.
    Flushed,
}

/// The session loop: decode and handle buffered frames, then wait for the
/// socket or for output; at the end, forgets the session and closes the
/// socket (gracefully after a fatal error, GoAway or replacement).
async fn run_session(shard: Rc<Shard>, conn: Rc<Conn>, mut stream: TcpStream, mut inbuf: BytesMut) {
    loop {
        let mut handled = 0u32;
        loop {
            match next_step(&shard, &conn, &mut inbuf) {
                Step::Idle => break,
                Step::Handled => {}
                Step::Wait(wait) => wait.await,
            }
            handled += 1;
            if handled >= FRAMES_PER_TURN {
                handled = 0;
                glommio::yield_if_needed().await;
            }
        }
        if inbuf.is_empty() && inbuf.capacity() > 0 {
            inbuf = BytesMut::new();
        }
        let event = IoFuture {
            shard: &shard,
            conn: &conn,
            stream: &mut stream,
            inbuf: &mut inbuf,
        }
        .await;
        match event {
            IoEvent::Readable => {}
            IoEvent::Gone => return end_session(&shard, &conn, None),
            IoEvent::Flushed => return end_session(&shard, &conn, Some(stream)),
        }
    }
}

enum Step {
    /// Nothing more to do before more bytes arrive (or the close).
    Idle,
    /// One frame handled.
    Handled,
    /// One frame handled; its requests wait for room in a full channel.
    Wait(Pin<Box<dyn Future<Output = ()>>>),
}

/// Decodes and handles the next buffered frame. Synchronous so no decoded
/// frame is ever held across an await, which keeps every connection task's
/// future small.
fn next_step(shard: &Rc<Shard>, conn: &Rc<Conn>, inbuf: &mut BytesMut) -> Step {
    if conn.is_closing() || backpressured(shard, conn) {
        return Step::Idle;
    }
    let frame_bytes_max = shard.config.limits.frame_bytes_max;
    let (frame_type, body) = match proto::split_frame(inbuf, frame_bytes_max) {
        Ok(None) => return Step::Idle,
        Ok(Some(split)) => split,
        Err(err) => {
            conn.fatal(err.code(), "bad frame");
            return Step::Idle;
        }
    };
    shard.metrics_frame_in(frame_type);
    if !client_may_send_in_session(frame_type) {
        conn.fatal(ErrorCode::UnexpectedFrame, "frame not allowed in a session");
        return Step::Idle;
    }
    let frame = match Frame::decode(frame_type, body) {
        Ok(frame) => frame,
        Err(err) => {
            conn.fatal(err.code(), "malformed frame");
            return Step::Idle;
        }
    };
    let outbound = shard.on_frame(conn, frame);
    match shard.forward(outbound) {
        Some(wait) => Step::Wait(wait),
        None => Step::Handled,
    }
}

fn backpressured(shard: &Shard, conn: &Conn) -> bool {
    let limits = &shard.config.limits;
    let state = conn.state.borrow();
    state.out_len() >= limits.output_queue_bytes_max as usize
        || state.sends_in_flight >= limits.sends_in_flight_max
}

/// One wait of the session loop: flushes output, then reads if allowed.
struct IoFuture<'a> {
    shard: &'a Shard,
    conn: &'a Conn,
    stream: &'a mut TcpStream,
    inbuf: &'a mut BytesMut,
}

impl Future for IoFuture<'_> {
    type Output = IoEvent;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoEvent> {
        let this = &mut *self;
        this.conn.register_waker(cx.waker());
        {
            let mut state = this.conn.state.borrow_mut();
            if let Some(active) = state.active_if_any() {
                while !active.out.is_empty() {
                    match Pin::new(&mut *this.stream).poll_write(cx, &active.out) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(IoEvent::Gone)
                        }
                        Poll::Ready(Ok(n)) => active.out.advance(n),
                        Poll::Pending => break,
                    }
                }
                if active.out.is_empty() && active.out.capacity() > 0 {
                    active.out = BytesMut::new();
                }
            }
            state.release_if_idle();
            if state.out_len() == 0 && state.close.is_some() {
                return Poll::Ready(IoEvent::Flushed);
            }
            if state.close.is_some() {
                return Poll::Pending;
            }
        }
        if backpressured(this.shard, this.conn) {
            return Poll::Pending;
        }
        let mut scratch = this.shard.scratch.borrow_mut();
        match Pin::new(&mut *this.stream).poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(IoEvent::Gone),
            Poll::Ready(Ok(n)) => {
                this.inbuf.extend_from_slice(&scratch[..n]);
                Poll::Ready(IoEvent::Readable)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Closes every session with GoAway(SHUTTING_DOWN).
pub fn go_away_all(shard: &Shard) {
    let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        conn.close_with(
            &Frame::GoAway(pb::GoAway {
                reason: proto::GoAwayReason::ShuttingDown as i32,
                reconnect_after_ms: 1_000,
            }),
            conn::CloseReason::Shutdown,
        );
    }
}

/// Closes sessions silent for longer than the idle timeout.
pub fn sweep_idle(shard: &Shard) {
    let now = shard.now_s();
    let idle_s = shard.config.limits.idle_timeout_ms.div_ceil(1000);
    let conns = shard.conns.borrow();
    for conn in conns.values() {
        let last = conn.state.borrow().last_activity_s;
        if now.saturating_sub(last) >= idle_s && !conn.is_closing() {
            debug!(device = %conn.device, "idle timeout");
            conn.fatal(ErrorCode::IdleTimeout, "no frame within the idle timeout");
        }
    }
}
