//! One browser connection, start to end: TLS, the HTTP upgrade, the Noise
//! intro check, then the bridge to the client listener.
//!
//! ```text
//! accept ─ TLS ─ HTTP upgrade ─ first bytes "SBN1?" ─ connect ─ pump ─ close
//! └──────────── wss.handshake_timeout_ms ────────────┘
//! ```
//!
//! The pump runs two loops in the connection's one task, each holding at
//! most one message: WebSocket → socket (a binary message is written whole
//! before the next is read) and socket → WebSocket (what one read returned,
//! at most `OUTPUT_CHUNK_BYTES`, is sent and flushed before the next read).
//! A side that does not read therefore stops the other side's reading, down
//! to TCP on both ends: the shard stops reading a connection whose output
//! it cannot send, and a browser that does not read its WebSocket stops the
//! bridge reading the shard. The loops are independent, so a peer that
//! does not read never keeps the other direction from moving.
//!
//! Cancel safety: the two loops are raced; the one that loses is dropped
//! mid-step. A write to the socket it dropped half-done only loses bytes of
//! a connection that is ending; a WebSocket message it was sending stays in
//! tungstenite's buffer and goes out before the closing frame.

use std::hash::RandomState;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::stats::{Refusal, WssStats};
use super::upgrade::{self, Answer};
use crate::noise::Intro;

/// Largest WebSocket message the bridge sends a browser, bytes: one read
/// from the socket. Message boundaries carry no meaning in the stream, so
/// this only trades per-message overhead against the buffer a connection
/// holds while a message is sent (tungstenite keeps the largest it sent).
pub const OUTPUT_CHUNK_BYTES: usize = 16 << 10;

/// tungstenite's read buffer per connection, bytes, allocated up front and
/// grown only for a frame larger than it (to at most `message_bytes_max`,
/// which a connection may then keep). Browsers' messages here are Noise
/// messages, mostly far smaller; reads come from rustls' plaintext, not
/// from the socket, so a small buffer costs no extra syscalls.
pub const READ_BUFFER_BYTES: usize = 1 << 10;

/// How long a closing connection waits for the browser's closing frame, or
/// the shard's end of the socket, before it is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// How much of the request head one read asks for, bytes.
const HEAD_READ_BYTES: usize = 1 << 10;

type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// What every connection of the listener shares.
pub(super) struct Shared {
    /// TLS with the current certificate.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// The client listener, where bridges connect.
    pub target: SocketAddr,
    /// Keys the hash that picks a bridge's source address
    /// (`upstream::source`); random per process.
    pub sources: RandomState,
    /// `wss.handshake_timeout_ms`.
    pub handshake_timeout: Duration,
    /// `wss.idle_timeout_ms`.
    pub idle_timeout: Duration,
    /// tungstenite's buffers and limits.
    pub ws_config: WebSocketConfig,
    /// Counters.
    pub stats: Arc<WssStats>,
}

impl Shared {
    /// The WebSocket settings for `message_bytes_max`: small buffers,
    /// messages written as soon as they are sent, and at most
    /// `message_bytes_max` bytes in a browser's message or frame.
    pub fn ws_config(message_bytes_max: usize) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            // One outgoing message and the control frames (a Pong, the
            // Close) that may wait behind it.
            .max_write_buffer_size(2 * OUTPUT_CHUNK_BYTES)
            .max_message_size(Some(message_bytes_max))
            .max_frame_size(Some(message_bytes_max))
    }
}

/// Serves one accepted connection until it closes.
///
/// Each stage's future is boxed on its own: a task is as large as its
/// largest state, and the opening one (the TLS handshake, the upgrade) is
/// several kilobytes that an idle connection would otherwise carry for
/// its whole life. Boxed, an idle connection holds only the pump's state.
pub(super) async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let (ws_tx, ws_rx, upstream) = match Box::pin(open(tcp, peer.ip(), &shared)).await {
        Ok((ws, upstream)) => {
            let (ws_tx, ws_rx) = ws.split();
            (ws_tx, ws_rx, upstream)
        }
        Err(refusal) => {
            if let Some(refusal) = refusal {
                debug!(%peer, reason = refusal.label(), "wss connection refused");
                stats.refused(refusal);
            }
            return;
        }
    };
    stats.bridged.fetch_add(1, Ordering::Relaxed);
    Box::pin(pump(ws_tx, ws_rx, upstream, &shared)).await;
}

/// TLS, the upgrade, the intro and the connection to the client listener,
/// all within the handshake timeout. `Err(None)`: the browser left.
async fn open(
    tcp: TcpStream,
    peer: IpAddr,
    shared: &Shared,
) -> Result<(Ws, TcpStream), Option<Refusal>> {
    let deadline = Instant::now() + shared.handshake_timeout;
    let timed_out = |_| Some(Refusal::Timeout);
    let mut tls = tokio::time::timeout_at(deadline, shared.acceptor.accept(tcp))
        .await
        .map_err(timed_out)?
        .map_err(|_| Some(Refusal::Tls))?;

    let (answer, mut head) = tokio::time::timeout_at(deadline, read_head(&mut tls))
        .await
        .map_err(timed_out)?
        .map_err(|_| None)?;
    let head_bytes = match answer {
        Answer::Upgrade {
            response,
            head_bytes,
        } => {
            tokio::time::timeout_at(deadline, write_all(&mut tls, &response))
                .await
                .map_err(timed_out)?
                .map_err(|_| None)?;
            head_bytes
        }
        Answer::Refuse { response, .. } => {
            let _ = tokio::time::timeout_at(deadline, async {
                write_all(&mut tls, &response).await?;
                tls.shutdown().await
            })
            .await;
            return Err(Some(Refusal::Http));
        }
        Answer::Incomplete => unreachable!("read_head reads until an answer"),
    };
    // Frames a client sent right behind its request (it should have waited
    // for the 101) are the WebSocket stream's first bytes.
    let tail = head.split_off(head_bytes);
    let mut ws =
        WebSocketStream::from_partially_read(tls, tail, Role::Server, Some(shared.ws_config)).await;

    let first = match tokio::time::timeout_at(deadline, read_intro(&mut ws)).await {
        Ok(Ok(first)) => first,
        Ok(Err(Some((refusal, code, reason)))) => {
            close(ws, code, reason).await;
            return Err(Some(refusal));
        }
        Ok(Err(None)) => return Err(None),
        Err(_) => {
            close(ws, CloseCode::Policy, "handshake timeout").await;
            return Err(Some(Refusal::Timeout));
        }
    };

    let connected = tokio::time::timeout_at(deadline, async {
        let mut upstream = connect(peer, shared).await?;
        upstream.write_all(&first).await?;
        Ok::<_, std::io::Error>(upstream)
    })
    .await;
    match connected {
        Ok(Ok(upstream)) => Ok((ws, upstream)),
        Ok(Err(err)) => {
            warn!(%err, target = %shared.target, "wss bridge cannot reach the client listener");
            close(ws, CloseCode::Again, "server unavailable").await;
            Err(Some(Refusal::Upstream))
        }
        Err(_) => {
            close(ws, CloseCode::Again, "server unavailable").await;
            Err(Some(Refusal::Upstream))
        }
    }
}

/// Reads until the request head can be answered; returns the answer and
/// every byte read (the head and anything behind it).
async fn read_head(tls: &mut TlsStream<TcpStream>) -> std::io::Result<(Answer, Vec<u8>)> {
    let mut buf = Vec::new();
    loop {
        let answer = upgrade::answer(&buf);
        if answer != Answer::Incomplete {
            return Ok((answer, buf));
        }
        buf.reserve(HEAD_READ_BYTES);
        if tls.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

async fn write_all(tls: &mut TlsStream<TcpStream>, bytes: &[u8]) -> std::io::Result<()> {
    tls.write_all(bytes).await?;
    tls.flush().await
}

/// A refusal with the closing frame that tells the browser why.
type Refused = (Refusal, CloseCode, &'static str);

/// Reads binary messages until their bytes start with a whole Noise intro
/// (`"SBN1"` and a pattern byte); returns every byte read. A bridged
/// connection comes from loopback, where the shards would take plaintext,
/// so nothing is forwarded before this check. `Err(None)`: the browser left.
async fn read_intro(ws: &mut Ws) -> Result<BytesMut, Option<Refused>> {
    let mut first = BytesMut::new();
    loop {
        let message = match ws.next().await {
            None => return Err(None),
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(refused_by_error(&err)),
        };
        match message {
            Message::Binary(bytes) => {
                first.extend_from_slice(&bytes);
                match Intro::parse(&first) {
                    Ok(Some(_)) => return Ok(first),
                    Ok(None) => continue,
                    Err(_) => {
                        return Err(Some((
                            Refusal::NotNoise,
                            CloseCode::Policy,
                            "not a Noise stream: it must start with SBN1X or SBN1I",
                        )))
                    }
                }
            }
            Message::Text(_) => return Err(Some(TEXT_REFUSED)),
            Message::Close(_) => return Err(None),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

const TEXT_REFUSED: Refused = (
    Refusal::Text,
    CloseCode::Unsupported,
    "binary messages only: the Noise byte stream",
);

/// The refusal for a WebSocket error from the browser's side; `None` when
/// the connection just ended.
fn refused_by_error(err: &WsError) -> Option<Refused> {
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some((
            Refusal::Protocol,
            CloseCode::Size,
            "message larger than the server accepts",
        )),
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) => Some((
            Refusal::Protocol,
            CloseCode::Protocol,
            "WebSocket protocol error",
        )),
        _ => None,
    }
}

/// Connects to the client listener from the browser's own loopback source
/// address (`upstream::source`).
async fn connect(peer: IpAddr, shared: &Shared) -> std::io::Result<TcpStream> {
    let socket = if shared.target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = super::upstream::source(peer, shared.target, &shared.sources) {
        // The port is then picked at connect, unique per 4-tuple, instead
        // of at bind from the ports free on every destination.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(std::io::Error::from)?;
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(shared.target).await
}

/// How the pump ended.
enum End {
    /// The browser closed (or its connection failed).
    BrowserClosed,
    /// The browser sent nothing for the idle timeout.
    Idle,
    /// The browser broke the rules (a text message, a protocol error).
    Refused(Refused),
    /// The shard closed its end.
    ServerClosed,
    /// The socket to the shard failed.
    ServerLost,
}

/// Moves bytes both ways until one side ends, then closes the other.
async fn pump(
    mut ws_tx: SplitSink<Ws, Message>,
    mut ws_rx: SplitStream<Ws>,
    upstream: TcpStream,
    shared: &Shared,
) {
    let (mut up_rx, mut up_tx) = upstream.into_split();
    let end = {
        let inbound = inbound(&mut ws_rx, &mut up_tx, shared.idle_timeout);
        let outbound = outbound(&mut up_rx, &mut ws_tx);
        tokio::select! {
            end = inbound => end,
            end = outbound => end,
        }
    };
    let ws = ws_tx
        .reunite(ws_rx)
        .expect("the two halves of one WebSocket");
    match end {
        End::BrowserClosed => {
            // A half-close, as from a native client: the shard handles what
            // came before it, then closes its end. Its answers have nowhere
            // to go; they are read and dropped so that the socket closes
            // with a FIN, not a reset.
            let _ = up_tx.shutdown().await;
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                let mut sink = BytesMut::new();
                loop {
                    sink.clear();
                    sink.reserve(OUTPUT_CHUNK_BYTES);
                    if !matches!(up_rx.read_buf(&mut sink).await, Ok(n) if n > 0) {
                        break;
                    }
                }
            })
            .await;
        }
        // Boxed: the closing exchange is needed once, at the end.
        End::Idle => {
            shared.stats.refused(Refusal::Idle);
            Box::pin(close(ws, CloseCode::Normal, "idle")).await;
        }
        End::Refused((refusal, code, reason)) => {
            shared.stats.refused(refusal);
            Box::pin(close(ws, code, reason)).await;
        }
        End::ServerClosed => {
            Box::pin(close(
                ws,
                CloseCode::Normal,
                "the server closed the connection",
            ))
            .await
        }
        End::ServerLost => {
            Box::pin(close(ws, CloseCode::Error, "the server connection failed")).await
        }
    }
}

/// Browser → shard: each binary message written whole before the next one
/// is read.
async fn inbound(
    ws_rx: &mut SplitStream<Ws>,
    up_tx: &mut OwnedWriteHalf,
    idle_timeout: Duration,
) -> End {
    loop {
        let message = match tokio::time::timeout(idle_timeout, ws_rx.next()).await {
            Err(_) => return End::Idle,
            Ok(None) => return End::BrowserClosed,
            Ok(Some(Err(err))) => {
                return refused_by_error(&err).map_or(End::BrowserClosed, End::Refused)
            }
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Binary(bytes) => {
                if up_tx.write_all(&bytes).await.is_err() {
                    return End::ServerLost;
                }
            }
            Message::Text(_) => return End::Refused(TEXT_REFUSED),
            Message::Close(_) => return End::BrowserClosed,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// Shard → browser: what one read returned, sent and flushed before the
/// next read. The buffer is allocated only once the socket is readable, so
/// an idle connection holds none.
async fn outbound(up_rx: &mut OwnedReadHalf, ws_tx: &mut SplitSink<Ws, Message>) -> End {
    loop {
        if up_rx.readable().await.is_err() {
            return End::ServerLost;
        }
        let mut chunk = BytesMut::with_capacity(OUTPUT_CHUNK_BYTES);
        match up_rx.try_read_buf(&mut chunk) {
            Ok(0) => return End::ServerClosed,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return End::ServerLost,
        }
        if ws_tx.send(Message::Binary(chunk.freeze())).await.is_err() {
            return End::BrowserClosed;
        }
    }
}

/// Sends a closing frame and waits (briefly) for the browser's. After a
/// broken frame (one too large, say) the rest of it still arrives: those
/// bytes are read and dropped until the browser closes or the linger ends,
/// so that the socket closes with a FIN and the browser reads the closing
/// frame, instead of a reset that would discard it.
async fn close(mut ws: Ws, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        if ws.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // The browser's closing frame ends it. The stream's end does not:
        // it also comes right after an error the stream already reported.
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => break,
            }
        }
        let mut sink = Vec::with_capacity(HEAD_READ_BYTES);
        loop {
            sink.clear();
            if !matches!(ws.get_mut().read_buf(&mut sink).await, Ok(n) if n > 0) {
                return;
            }
        }
    })
    .await;
}
