//! One connection: the socket, its read buffer and its output queue, and
//! in Noise mode the handshake and the sealing of both directions.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;

use super::{
    with_timeout, ClientError, ConnectOptions, Credentials, QUEUE_FRAMES_MAX, READ_CHUNK_BYTES,
};
use crate::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
use crate::noise::keys::KEY_BYTES;
use crate::noise::{wire, Initiator, NoiseError, Pattern, StaticKeypair, Transport};
use crate::proto::{
    bytes_wanted, next_frame, pb, DecodeError, ErrorCode, Frame, FrameType, GoAwayReason,
    PROTOCOL_VERSION,
};

/// What the server sent on an open session.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A Send is durable (✓).
    ServerAck(pb::ServerAck),
    /// A message from the inbox; acknowledge its `sequence`.
    Deliver(pb::Deliver),
    /// A delivered (✓✓) or read receipt from the inbox; acknowledge its `sequence`.
    Receipt(pb::Receipt),
    /// An error; when `fatal`, the server closes the connection after it.
    Error(pb::Error),
    /// The server is closing this session.
    GoAway(pb::GoAway),
    /// The answer to our Ping.
    Pong(u64),
    /// A one-time code for linking a new device (answers RequestLinkCode).
    LinkCode(pb::LinkCode),
    /// The account's devices (answers ListDevices).
    DeviceList(pb::DeviceList),
    /// A device of the account was removed (answers RemoveDevice).
    DeviceRemoved(pb::DeviceRemoved),
    /// A group as it stands (answers CreateGroup, UpdateGroup, GetGroup;
    /// `request_id` tells which).
    GroupInfo(pb::GroupInfo),
    /// An upload of prekeys is stored (answers UploadPrekeys).
    PrekeysStored(pb::PrekeysStored),
    /// An account's prekey bundle (answers FetchPrekeys).
    PrekeyBundle(pb::PrekeyBundle),
    /// This device has few one-time prekeys left: upload more.
    PrekeysLow(pb::PrekeysLow),
    /// Someone is typing to this account (never stored).
    Typing(pb::Typing),
    /// A followed user's presence (after SubscribePresence, and on change).
    PresenceUpdate(pb::PresenceUpdate),
    /// The privacy setting is stored (answers SetPrivacy).
    Privacy(pb::Privacy),
    /// The push endpoint is stored (answers RegisterPush), with the
    /// server's VAPID public key.
    PushRegistered(pb::PushRegistered),
    /// A token for the media service (answers RequestMediaGrant).
    MediaGrant(pb::MediaGrant),
}

/// Output buffers up to this size are reused across flushes (no allocation
/// per flush); a larger burst's buffer is freed once written.
const QUEUE_REUSE_BYTES_MAX: usize = 16 * 1024;

/// The socket and buffers shared by registration and sessions.
///
/// In Noise mode the socket carries Noise messages: reads land in
/// `sealed_input` and are opened into `read_buffer`, where frames are split
/// exactly as in plaintext; a flush seals the queued frames into
/// `sealed_output`, which then goes out as `writing`. The queue's bound
/// counts plaintext bytes in both modes.
struct Connection {
    stream: RefCell<TcpStream>,
    frame_bytes_max: u32,
    queue_bytes_max: usize,
    /// Frame bytes read (opened, in Noise mode) and not yet decoded.
    read_buffer: RefCell<BytesMut>,
    /// Encoded frames not yet handed to the kernel.
    queue: RefCell<BytesMut>,
    /// The part of the queue a flush took and has not finished writing. Kept
    /// here, not in the flush future, so a cancelled flush loses nothing.
    writing: RefCell<Bytes>,
    /// One flush writes at a time (glommio keeps one waker per direction).
    write_turn: Semaphore,
    /// One reader at a time, for the same reason.
    read_turn: Semaphore,
    closed: Cell<bool>,
    /// Write and read calls that moved bytes, for measurements.
    writes: Cell<u64>,
    reads: Cell<u64>,
    /// Noise: the transport keys once the handshake is finished; `None` in
    /// plaintext (and during the handshake).
    transport: RefCell<Option<Transport>>,
    /// Noise: bytes read and not yet opened (the server's handshake message,
    /// then at most a partial transport message).
    sealed_input: RefCell<BytesMut>,
    /// Noise: sealed bytes for the next write (XX's third message waits here
    /// for the login frame, so both go out in one write). Reused across
    /// flushes like the queue.
    sealed_output: RefCell<BytesMut>,
    /// Noise: why a transport message did not open. The frames opened before
    /// it are still handed out; after them every read fails with this.
    noise_failure: Cell<Option<NoiseError>>,
    /// Noise: the server's static key, or the current key it announced
    /// after an IK to its previous one.
    server_key: Cell<Option<[u8; KEY_BYTES]>>,
}

impl Connection {
    /// A TCP connection, nothing sent yet.
    async fn connect(opts: &ConnectOptions) -> Result<Connection, ClientError> {
        let stream = match opts.bind_ip {
            None => TcpStream::connect_timeout(opts.server, opts.timeout)
                .await
                .map_err(|e| match io::Error::from(e) {
                    e if e.kind() == io::ErrorKind::TimedOut => ClientError::Timeout,
                    e => ClientError::Io(e),
                })?,
            Some(ip) => connect_from(ip, opts)?,
        };
        // We coalesce frames ourselves; Nagle would only add latency.
        stream.set_nodelay(true).map_err(io::Error::from)?;
        let frame_bytes_max = opts.frame_bytes_max.max(1);
        Ok(Connection {
            stream: RefCell::new(stream),
            frame_bytes_max,
            queue_bytes_max: (frame_bytes_max as usize) * QUEUE_FRAMES_MAX as usize,
            read_buffer: RefCell::new(BytesMut::new()),
            queue: RefCell::new(BytesMut::new()),
            writing: RefCell::new(Bytes::new()),
            write_turn: Semaphore::new(1),
            read_turn: Semaphore::new(1),
            closed: Cell::new(false),
            writes: Cell::new(0),
            reads: Cell::new(0),
            transport: RefCell::new(None),
            sealed_input: RefCell::new(BytesMut::new()),
            sealed_output: RefCell::new(BytesMut::new()),
            noise_failure: Cell::new(None),
            server_key: Cell::new(None),
        })
    }

    /// A connection ready for its login frame: plaintext when `keypair` is
    /// `None`, else Noise with the handshake done: IK when `pin` is given,
    /// else XX.
    ///
    /// An IK the server closes (it no longer holds the pinned key, after a
    /// rotation whose overlap has ended, or it refused for another reason)
    /// is tried once more as XX, which shows the key the server holds now:
    /// the pin still, or [`ClientError::ServerKeyChanged`].
    async fn open(
        opts: &ConnectOptions,
        keypair: Option<&StaticKeypair>,
        pin: Option<[u8; KEY_BYTES]>,
    ) -> Result<Connection, ClientError> {
        let connection = Connection::connect(opts).await?;
        let Some(keypair) = keypair else {
            return Ok(connection);
        };
        let Some(pin) = pin else {
            connection.handshake(keypair, None).await?;
            return Ok(connection);
        };
        match connection
            .handshake(keypair, Some((Pattern::Ik, &pin)))
            .await
        {
            Err(ClientError::HandshakeClosed) => {
                drop(connection);
                let connection = Connection::connect(opts).await?;
                connection
                    .handshake(keypair, Some((Pattern::Xx, &pin)))
                    .await?;
                Ok(connection)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(connection),
        }
    }

    /// Runs the client's side of a Noise handshake: `pinned` gives the
    /// pattern and the key to trust, `None` is XX trusting the key the
    /// server proves. The handshake payload is empty both ways from the
    /// client. On success the connection seals and opens from now on, and
    /// XX's third message waits in `sealed_output` for the first frame.
    ///
    /// A server key other than the pin fails with
    /// [`ClientError::ServerKeyChanged`] before the third message is sent.
    async fn handshake(
        &self,
        keypair: &StaticKeypair,
        pinned: Option<(Pattern, &[u8; KEY_BYTES])>,
    ) -> Result<(), ClientError> {
        let (mut initiator, opening) = match pinned {
            Some((Pattern::Ik, pin)) => Initiator::ik(keypair, pin, &[])?,
            Some((Pattern::Xx, _)) | None => Initiator::xx(keypair, &[])?,
        };
        *self.writing.borrow_mut() = Bytes::from(opening);
        self.flush().await.map_err(closed_in_handshake)?;
        let message = loop {
            let next = wire::next_message(
                &mut self.sealed_input.borrow_mut(),
                initiator.message_bytes_max(),
            );
            match next {
                Ok(Some(message)) => break message,
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
            let want = wire::bytes_wanted(&self.sealed_input.borrow()).max(READ_CHUNK_BYTES);
            match self.read_into(&self.sealed_input, want).await {
                Ok(0) => {
                    self.closed.set(true);
                    return Err(ClientError::HandshakeClosed);
                }
                Ok(_) => self.reads.set(self.reads.get() + 1),
                Err(e) => {
                    self.closed.set(true);
                    return Err(closed_in_handshake(closed_or_io(e)));
                }
            }
        };
        let third = initiator.read_message(&message).map_err(|e| self.fail(e))?;
        let server = initiator
            .server_static()
            .expect("a finished handshake knows the server's static key");
        if let Some((_, pin)) = pinned {
            if server != *pin {
                // The third message (our static key) is not sent to a
                // server we do not trust.
                self.closed.set(true);
                return Err(ClientError::ServerKeyChanged {
                    expected: *pin,
                    got: server,
                });
            }
        }
        self.server_key
            .set(Some(initiator.rotated_server_key().unwrap_or(server)));
        let transport = initiator.into_transport().map_err(|e| self.fail(e))?;
        if let Some(third) = third {
            self.sealed_output.borrow_mut().extend_from_slice(&third);
        }
        *self.transport.borrow_mut() = Some(transport);
        Ok(())
    }

    /// Marks the connection closed by a Noise failure (Noise has no resync).
    fn fail(&self, error: NoiseError) -> ClientError {
        self.closed.set(true);
        ClientError::Noise(error)
    }

    fn queue(&self, frame: &Frame) -> Result<(), ClientError> {
        if self.closed.get() {
            return Err(ClientError::Closed);
        }
        let mut queue = self.queue.borrow_mut();
        // One frame always fits into an empty queue, however large.
        if !queue.is_empty() && queue.len() + frame.wire_len() > self.queue_bytes_max {
            return Err(ClientError::QueueFull);
        }
        frame.encode(&mut queue);
        Ok(())
    }

    fn queued_bytes(&self) -> usize {
        self.queue.borrow().len() + self.writing.borrow().len() + self.sealed_output.borrow().len()
    }

    /// Moves what is queued into `writing`, sealed in Noise mode. False when
    /// there is nothing to write.
    fn take_queue(&self) -> Result<bool, ClientError> {
        let mut writing = self.writing.borrow_mut();
        let mut queue = self.queue.borrow_mut();
        let mut transport = self.transport.borrow_mut();
        let Some(transport) = transport.as_mut() else {
            if queue.is_empty() {
                return Ok(false);
            }
            // The whole queue goes out in one write; once `writing` is
            // dropped the queue reclaims the allocation.
            *writing = queue.split().freeze();
            if writing.len() > QUEUE_REUSE_BYTES_MAX {
                // A burst: do not keep its large buffer for reuse.
                *queue = BytesMut::new();
            }
            return Ok(true);
        };
        let mut sealed = self.sealed_output.borrow_mut();
        if queue.is_empty() && sealed.is_empty() {
            return Ok(false);
        }
        // Sealed in place into the reused output buffer: no allocation per
        // flush once both buffers have grown to the usual burst.
        if let Err(e) = transport.seal(&queue, &mut sealed) {
            self.closed.set(true);
            return Err(ClientError::Noise(e));
        }
        queue.clear();
        *writing = sealed.split().freeze();
        if writing.len() > QUEUE_REUSE_BYTES_MAX {
            *sealed = BytesMut::new();
            *queue = BytesMut::new();
        }
        Ok(true)
    }

    /// Writes everything queued. Cancel safe: what was not written stays
    /// queued (or sealed in `writing`, which the next flush writes first).
    async fn flush(&self) -> Result<(), ClientError> {
        let _turn = self
            .write_turn
            .acquire_permit(1)
            .await
            .map_err(|_| ClientError::Closed)?;
        loop {
            if self.writing.borrow().is_empty() && !self.take_queue()? {
                return Ok(());
            }
            let written = poll_fn(|cx| {
                let writing = self.writing.borrow();
                let mut stream = self.stream.borrow_mut();
                Pin::new(&mut *stream).poll_write(cx, &writing)
            })
            .await;
            match written {
                Ok(0) => {
                    self.closed.set(true);
                    return Err(ClientError::Closed);
                }
                Ok(n) => {
                    self.writes.set(self.writes.get() + 1);
                    let mut writing = self.writing.borrow_mut();
                    writing.advance(n);
                    if writing.is_empty() {
                        // Let go of the buffer so the queue can reuse it.
                        *writing = Bytes::new();
                    }
                }
                Err(e) => {
                    self.closed.set(true);
                    return Err(closed_or_io(e));
                }
            }
        }
    }

    /// The next whole frame. Cancel safe: bytes read stay in the buffers.
    async fn next_frame(&self) -> Result<Frame, ClientError> {
        let _turn = self
            .read_turn
            .acquire_permit(1)
            .await
            .map_err(|_| ClientError::Closed)?;
        loop {
            let decoded = {
                let mut buffer = self.read_buffer.borrow_mut();
                let decoded = next_frame(&mut buffer, self.frame_bytes_max);
                if buffer.is_empty() && buffer.capacity() > 0 {
                    // Everything read is decoded: free the buffer rather than
                    // keep it through an idle spell; the next read allocates.
                    *buffer = BytesMut::new();
                }
                decoded
            };
            match decoded {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(e) => {
                    self.closed.set(true);
                    return Err(ClientError::Protocol(e));
                }
            }
            if let Some(e) = self.noise_failure.get() {
                return Err(ClientError::Noise(e));
            }
            let sealed = self.transport.borrow().is_some();
            let (buffer, want) = if sealed {
                (
                    &self.sealed_input,
                    wire::bytes_wanted(&self.sealed_input.borrow()),
                )
            } else {
                (&self.read_buffer, bytes_wanted(&self.read_buffer.borrow()))
            };
            match self.read_into(buffer, want.max(READ_CHUNK_BYTES)).await {
                Ok(0) => {
                    self.closed.set(true);
                    return Err(ClientError::Closed);
                }
                Ok(_) => self.reads.set(self.reads.get() + 1),
                Err(e) => {
                    self.closed.set(true);
                    return Err(closed_or_io(e));
                }
            }
            if sealed {
                self.open_sealed();
            }
        }
    }

    /// Opens every whole transport message read so far into the read
    /// buffer. A message that does not open closes the connection; the
    /// frames before it are still handed out by `next_frame`.
    fn open_sealed(&self) {
        let mut transport = self.transport.borrow_mut();
        let transport = transport
            .as_mut()
            .expect("only called once the handshake is finished");
        let mut sealed = self.sealed_input.borrow_mut();
        let opened = transport.open(&mut sealed, &mut self.read_buffer.borrow_mut());
        if sealed.is_empty() && sealed.capacity() > 0 {
            // Idle sessions keep no sealed buffer either.
            *sealed = BytesMut::new();
        }
        if let Err(e) = opened {
            self.closed.set(true);
            self.noise_failure.set(Some(e));
        }
    }

    /// Reads once from the socket into the end of `buffer`, at most `want`
    /// bytes. Returns the bytes read (0 at end of stream).
    async fn read_into(&self, buffer: &RefCell<BytesMut>, want: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut buffer = buffer.borrow_mut();
            let start = buffer.len();
            buffer.resize(start + want, 0);
            let mut stream = self.stream.borrow_mut();
            let result = Pin::new(&mut *stream).poll_read(cx, &mut buffer[start..]);
            let got = match &result {
                Poll::Ready(Ok(n)) => *n,
                _ => 0,
            };
            buffer.truncate(start + got);
            if result.is_pending() && start == 0 {
                // Waiting with nothing buffered: glommio waits for
                // readiness without our buffer, so an idle session
                // holds no read buffer at all.
                *buffer = BytesMut::new();
            }
            result
        })
        .await
    }

    /// Queues `login` (Register, Hello or Link: the first frame, sealed in
    /// Noise mode together with XX's third message), writes it and reads the
    /// answer.
    async fn log_in(&self, login: &Frame) -> Result<Frame, ClientError> {
        self.queue(login)?;
        self.flush().await?;
        self.next_frame().await
    }
}

fn closed_or_io(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}

/// A connection closed during the handshake is the server refusing it.
fn closed_in_handshake(e: ClientError) -> ClientError {
    match e {
        ClientError::Closed => ClientError::HandshakeClosed,
        other => other,
    }
}

/// Connects from a chosen source address. glommio's `connect` cannot bind
/// first, so the socket is made here and connected without blocking; the
/// first write waits (through glommio's poller) until the handshake finished.
fn connect_from(ip: std::net::IpAddr, opts: &ConnectOptions) -> Result<TcpStream, ClientError> {
    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = match opts.server {
        std::net::SocketAddr::V4(_) => AddressFamily::Inet,
        std::net::SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    use std::os::fd::AsRawFd;
    // Pick the source port at connect time, per destination, instead of at
    // bind time: bind(port 0) alone reserves a port for every destination
    // and runs out (or collides with TIME_WAIT) long before the 4-tuple
    // space does.
    if ip.is_ipv4() {
        socket::setsockopt(&fd, socket::sockopt::IpBindAddressNoPort, &true)
            .map_err(io::Error::from)?;
    }
    let local = SockaddrStorage::from(std::net::SocketAddr::new(ip, 0));
    socket::bind(fd.as_raw_fd(), &local).map_err(io::Error::from)?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(opts.server)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(ClientError::Io(e.into())),
    }
    // SAFETY: `fd` is an open TCP socket that we own; `into_raw_fd` gives up
    // that ownership, so the stream is its only owner and closes it.
    Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
}

/// Creates an account: Register → Registered. The connection is closed
/// afterwards; log in with [`Session::connect`] and the returned credentials.
///
/// Over Noise (the default) the device is a fresh static key pair: the
/// credentials hold its private key, no secret, and the server's key as
/// `server_key` to pin. In plaintext they hold the secret the server made.
pub async fn register(
    opts: &ConnectOptions,
    token: Option<&str>,
) -> Result<super::Credentials, ClientError> {
    let login = Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: token.unwrap_or_default().to_string(),
    });
    with_timeout(opts.timeout, registered(opts, &login)).await
}

/// Links this new device to an account with a code its primary device got
/// (`Session::request_link_code`): Link → Registered. The connection is
/// closed afterwards; log in with [`Session::connect`] and the returned
/// credentials (a fresh Noise key, or in plaintext a secret, as for
/// [`register`]).
pub async fn link(
    opts: &ConnectOptions,
    code: &str,
    device_name: &str,
) -> Result<super::Credentials, ClientError> {
    let login = Frame::Link(pb::Link {
        protocol_version: PROTOCOL_VERSION,
        code: code.to_string(),
        device_name: device_name.to_string(),
    });
    with_timeout(opts.timeout, registered(opts, &login)).await
}

/// Sends Register or Link and reads the Registered that answers it. Over
/// Noise the device's identity is the key pair made here; the server
/// records it and sends no secret.
async fn registered(opts: &ConnectOptions, login: &Frame) -> Result<Credentials, ClientError> {
    let keypair = (!opts.plaintext).then(StaticKeypair::generate);
    let connection = Connection::open(opts, keypair.as_ref(), opts.server_key).await?;
    match connection.log_in(login).await? {
        Frame::Registered(registered) => {
            let malformed = || ClientError::Protocol(DecodeError::Malformed(FrameType::Registered));
            let secret = match &keypair {
                None => Some(
                    <[u8; 32]>::try_from(registered.secret.as_ref()).map_err(|_| malformed())?,
                ),
                Some(_) if registered.secret.is_empty() => None,
                Some(_) => return Err(malformed()),
            };
            Ok(Credentials {
                user: UserId(registered.user_id),
                device: DeviceId(registered.device_id),
                secret,
                noise_private: keypair.map(|pair| *pair.private()),
                server_key: connection.server_key.get(),
            })
        }
        other => Err(handshake_refusal(other)),
    }
}

fn handshake_refusal(frame: Frame) -> ClientError {
    match frame {
        Frame::Error(error) => ClientError::Server(error),
        Frame::GoAway(go_away) => ClientError::GoAway {
            reason: go_away.reason(),
            reconnect_after_ms: go_away.reconnect_after_ms,
        },
        other => ClientError::UnexpectedFrame(other.frame_type()),
    }
}

/// One authenticated device session. `!Send`: it belongs to the executor
/// that opened it. Every method takes `&self`; one task may read
/// (`next_event`) while another queues and flushes.
pub struct Session {
    connection: Connection,
    welcome: pb::Welcome,
    /// This login bound the credentials' Noise key to the device.
    bound_noise_key: bool,
}

impl Session {
    /// Connects and logs in: Hello → Welcome, within `opts.timeout`.
    ///
    /// How, by the credentials:
    /// - with a Noise key (and `opts.plaintext` not set): Noise, IK to the
    ///   pin (`opts.server_key`, else `creds.server_key`) or XX without one;
    ///   the Hello carries no secret;
    /// - with a Noise key and a secret: the same, but the Hello carries the
    ///   secret, which asks the server to bind the key to the device (see
    ///   [`Credentials::with_new_noise_key`]); if the server refuses with
    ///   AUTH_FAILED, the key alone is tried once, since a bind whose answer
    ///   was lost leaves the key bound. [`Session::bound_noise_key`] tells
    ///   whether this login bound it;
    /// - with a secret only (or `opts.plaintext`): a plaintext Hello with the
    ///   secret; [`ClientError::NoSecret`] if there is none.
    pub async fn connect(
        opts: &ConnectOptions,
        creds: &Credentials,
    ) -> Result<Session, ClientError> {
        with_timeout(opts.timeout, async {
            let keypair = creds.noise_keypair().filter(|_| !opts.plaintext);
            let Some(keypair) = keypair else {
                let secret = creds.secret.ok_or(ClientError::NoSecret)?;
                return Session::log_in(opts, creds, None, Some(secret)).await;
            };
            let noise = Some((&keypair, opts.server_key.or(creds.server_key)));
            match Session::log_in(opts, creds, noise, creds.secret).await {
                Err(e)
                    if creds.secret.is_some() && e.server_code() == Some(ErrorCode::AuthFailed) =>
                {
                    Session::log_in(opts, creds, noise, None).await
                }
                result => result,
            }
        })
        .await
    }

    /// One login attempt: plaintext when `noise` is `None`, else Noise with
    /// that key pair and pin.
    async fn log_in(
        opts: &ConnectOptions,
        creds: &Credentials,
        noise: Option<(&StaticKeypair, Option<[u8; KEY_BYTES]>)>,
        secret: Option<[u8; 32]>,
    ) -> Result<Session, ClientError> {
        let (keypair, pin) = noise.unzip();
        let connection = Connection::open(opts, keypair, pin.flatten()).await?;
        let hello = Frame::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            user_id: creds.user.0,
            device_id: creds.device.0,
            secret: secret.map_or_else(Bytes::new, |s| Bytes::copy_from_slice(&s)),
        });
        match connection.log_in(&hello).await? {
            Frame::Welcome(welcome) => Ok(Session {
                connection,
                welcome,
                bound_noise_key: noise.is_some() && secret.is_some(),
            }),
            other => Err(handshake_refusal(other)),
        }
    }

    /// The server's Welcome: its limits and idle timeout.
    pub fn welcome(&self) -> &pb::Welcome {
        &self.welcome
    }

    /// The server's Noise static key this session is encrypted to: the
    /// pinned key for IK, the key the server proved for XX, or the current
    /// key the server announced after an IK to its previous one (pin this
    /// one from now on). `None` in plaintext.
    pub fn server_key(&self) -> Option<[u8; KEY_BYTES]> {
        self.connection.server_key.get()
    }

    /// Whether this login bound the credentials' Noise key to the device
    /// (the credentials held a secret and a key). From now on only the key
    /// logs in: keep [`Credentials::key_bound`] in place of the credentials.
    pub fn bound_noise_key(&self) -> bool {
        self.bound_noise_key
    }

    /// Queues a Send (flush to write it).
    pub fn send(&self, to: UserId, id: ClientMessageId, payload: Bytes) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Send(pb::Send {
            client_message_id: id.0,
            recipient_user_id: to.0,
            payload,
            device_payloads: Vec::new(),
            ..Default::default()
        }))
    }

    /// Queues a Send with one payload per device of the recipient (each
    /// encrypted for its device by the caller).
    pub fn send_to_devices(
        &self,
        to: UserId,
        id: ClientMessageId,
        parts: &[(DeviceId, Bytes)],
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Send(pb::Send {
            client_message_id: id.0,
            recipient_user_id: to.0,
            payload: Bytes::new(),
            device_payloads: parts
                .iter()
                .map(|(device, payload)| pb::DevicePayload {
                    device_id: device.0,
                    payload: payload.clone(),
                })
                .collect(),
            ..Default::default()
        }))
    }

    /// Queues a Send to a group (one payload for every member device);
    /// answered with a ServerAck carrying the group sequence.
    pub fn send_to_group(
        &self,
        group: u64,
        id: ClientMessageId,
        payload: Bytes,
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Send(pb::Send {
            client_message_id: id.0,
            group_id: group,
            payload,
            ..Default::default()
        }))
    }

    /// Queues CreateGroup (the caller becomes its admin); answered with
    /// `Event::GroupInfo` once durable, or an Error carrying `request_id`.
    pub fn create_group(
        &self,
        request_id: u64,
        name: &str,
        members: &[UserId],
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::CreateGroup(pb::CreateGroup {
            request_id,
            name: name.to_string(),
            member_user_ids: members.iter().map(|u| u.0).collect(),
        }))
    }

    /// Queues UpdateGroup; answered like `create_group`.
    pub fn update_group(
        &self,
        request_id: u64,
        group: u64,
        action: crate::proto::GroupAction,
        users: &[UserId],
        name: &str,
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::UpdateGroup(pb::UpdateGroup {
            request_id,
            group_id: group,
            action: action as i32,
            user_ids: users.iter().map(|u| u.0).collect(),
            name: name.to_string(),
        }))
    }

    /// Queues GetGroup; answered with `Event::GroupInfo` (members only).
    pub fn get_group(&self, request_id: u64, group: u64) -> Result<(), ClientError> {
        self.connection.queue(&Frame::GetGroup(pb::GetGroup {
            request_id,
            group_id: group,
        }))
    }

    /// Queues UploadPrekeys (the identity key and signed prekey may be
    /// left out after the first upload); answered with
    /// `Event::PrekeysStored`.
    pub fn upload_prekeys(&self, upload: pb::UploadPrekeys) -> Result<(), ClientError> {
        self.connection.queue(&Frame::UploadPrekeys(upload))
    }

    /// Queues FetchPrekeys for `user`; answered with `Event::PrekeyBundle`.
    pub fn fetch_prekeys(&self, request_id: u64, user: UserId) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::FetchPrekeys(pb::FetchPrekeys {
                request_id,
                user_id: user.0,
            }))
    }

    /// Queues a typing notice to `to`'s devices that are online (never
    /// stored, never answered).
    pub fn send_typing(
        &self,
        to: UserId,
        state: crate::proto::TypingState,
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::SendTyping(pb::SendTyping {
            to_user_id: to.0,
            state: state as i32,
        }))
    }

    /// Queues SubscribePresence (replacing this session's list); the
    /// users' states come as `Event::PresenceUpdate`.
    pub fn subscribe_presence(&self, users: &[UserId]) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::SubscribePresence(pb::SubscribePresence {
                user_ids: users.iter().map(|u| u.0).collect(),
            }))
    }

    /// Queues RegisterPush (`PushKind::Unspecified` removes the endpoint);
    /// answered with `Event::PushRegistered`.
    pub fn register_push(
        &self,
        kind: crate::proto::PushKind,
        endpoint: &str,
    ) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::RegisterPush(pb::RegisterPush {
                kind: kind as i32,
                endpoint: endpoint.to_string(),
            }))
    }

    /// Queues RequestMediaGrant for an upload of `size` bytes; answered
    /// with `Event::MediaGrant` carrying `request_id`.
    pub fn request_upload_grant(&self, request_id: u64, size: u64) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::RequestMediaGrant(pb::RequestMediaGrant {
                request_id,
                kind: crate::proto::MediaGrantKind::Upload as i32,
                size,
                ..Default::default()
            }))
    }

    /// Queues RequestMediaGrant for downloading `blob`; answered with
    /// `Event::MediaGrant` carrying `request_id`.
    pub fn request_download_grant(
        &self,
        request_id: u64,
        blob: &[u8; 32],
    ) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::RequestMediaGrant(pb::RequestMediaGrant {
                request_id,
                kind: crate::proto::MediaGrantKind::Download as i32,
                blob_id: Bytes::copy_from_slice(blob),
                ..Default::default()
            }))
    }

    /// Queues SetPrivacy; answered with `Event::Privacy`.
    pub fn set_last_seen_visible(&self, visible: bool) -> Result<(), ClientError> {
        let last_seen = if visible {
            crate::proto::LastSeenVisibility::Everyone
        } else {
            crate::proto::LastSeenVisibility::Nobody
        };
        self.connection.queue(&Frame::SetPrivacy(pb::SetPrivacy {
            last_seen: last_seen as i32,
        }))
    }

    /// Queues RequestLinkCode (primary only); answered with `Event::LinkCode`.
    pub fn request_link_code(&self) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::RequestLinkCode(pb::RequestLinkCode {}))
    }

    /// Queues ListDevices; answered with `Event::DeviceList`.
    pub fn list_devices(&self) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::ListDevices(pb::ListDevices {}))
    }

    /// Queues RemoveDevice; answered with `Event::DeviceRemoved`.
    pub fn remove_device(&self, device: DeviceId) -> Result<(), ClientError> {
        self.connection
            .queue(&Frame::RemoveDevice(pb::RemoveDevice {
                device_id: device.0,
            }))
    }

    /// Queues an Ack of every inbox sequence up to and including `up_to`.
    pub fn ack(&self, up_to: InboxSeq) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Ack(pb::Ack {
            up_to_sequence: up_to.0,
            sequences: Vec::new(),
        }))
    }

    /// Queues an Ack of individual inbox sequences.
    pub fn ack_list(&self, seqs: &[InboxSeq]) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Ack(pb::Ack {
            up_to_sequence: 0,
            sequences: seqs.iter().map(|s| s.0).collect(),
        }))
    }

    /// Queues a ReadReceipt for messages of one sender device.
    pub fn read_receipt(
        &self,
        sender: UserId,
        sender_device: DeviceId,
        ids: &[ClientMessageId],
    ) -> Result<(), ClientError> {
        self.connection.queue(&Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: sender.0,
            sender_device_id: sender_device.0,
            client_message_ids: ids.iter().map(|id| id.0).collect(),
        }))
    }

    /// Queues a Ping; the server answers with `Event::Pong(nonce)`.
    pub fn ping(&self, nonce: u64) -> Result<(), ClientError> {
        self.connection.queue(&Frame::Ping(pb::Ping { nonce }))
    }

    /// Queues any frame, valid or not (for tests of the server's answers).
    pub fn send_raw(&self, frame: &Frame) -> Result<(), ClientError> {
        self.connection.queue(frame)
    }

    /// Queues bytes as they are, which need not be a frame at all.
    pub fn send_raw_bytes(&self, bytes: &[u8]) -> Result<(), ClientError> {
        if self.connection.closed.get() {
            return Err(ClientError::Closed);
        }
        self.connection.queue.borrow_mut().extend_from_slice(bytes);
        Ok(())
    }

    /// Socket writes and reads that moved bytes since connecting (the
    /// handshake included): frames per syscall is the coalescing achieved.
    pub fn io_calls(&self) -> (u64, u64) {
        (self.connection.writes.get(), self.connection.reads.get())
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.connection.queued_bytes()
    }

    /// Writes everything queued, coalesced into as few writes as the socket
    /// takes. Cancel safe: whatever was not written stays queued.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.connection.flush().await
    }

    /// The next event from the server; `Err(Closed)` at end of stream. A Ping
    /// from the server is answered (queued Pong) without surfacing. Cancel
    /// safe: bytes already read stay buffered for the next call.
    pub async fn next_event(&self) -> Result<Event, ClientError> {
        loop {
            let event = match self.connection.next_frame().await? {
                Frame::ServerAck(ack) => Event::ServerAck(ack),
                Frame::Deliver(deliver) => Event::Deliver(deliver),
                Frame::Receipt(receipt) => Event::Receipt(receipt),
                Frame::Error(error) => {
                    if error.fatal {
                        self.connection.closed.set(true);
                    }
                    Event::Error(error)
                }
                Frame::GoAway(go_away) => {
                    self.connection.closed.set(true);
                    Event::GoAway(go_away)
                }
                Frame::Pong(pong) => Event::Pong(pong.nonce),
                Frame::LinkCode(code) => Event::LinkCode(code),
                Frame::DeviceList(list) => Event::DeviceList(list),
                Frame::DeviceRemoved(removed) => Event::DeviceRemoved(removed),
                Frame::GroupInfo(info) => Event::GroupInfo(info),
                Frame::PrekeysStored(stored) => Event::PrekeysStored(stored),
                Frame::PrekeyBundle(bundle) => Event::PrekeyBundle(bundle),
                Frame::PrekeysLow(low) => Event::PrekeysLow(low),
                Frame::Typing(typing) => Event::Typing(typing),
                Frame::PresenceUpdate(update) => Event::PresenceUpdate(update),
                Frame::Privacy(privacy) => Event::Privacy(privacy),
                Frame::PushRegistered(registered) => Event::PushRegistered(registered),
                Frame::MediaGrant(grant) => Event::MediaGrant(grant),
                Frame::Ping(ping) => {
                    match self
                        .connection
                        .queue(&Frame::Pong(pb::Pong { nonce: ping.nonce }))
                    {
                        Ok(()) | Err(ClientError::QueueFull) => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
                other => {
                    self.connection.closed.set(true);
                    return Err(ClientError::UnexpectedFrame(other.frame_type()));
                }
            };
            return Ok(event);
        }
    }

    /// Whether the session saw end of stream, a fatal error, GoAway or a
    /// broken frame; queueing then fails with `Closed`.
    pub fn is_closed(&self) -> bool {
        self.connection.closed.get()
    }

    /// The local address of the socket.
    pub fn local_addr(&self) -> Result<std::net::SocketAddr, ClientError> {
        Ok(self
            .connection
            .stream
            .borrow()
            .local_addr()
            .map_err(io::Error::from)?)
    }
}

impl GoAwayReason {
    /// The protocol name of the reason (`REPLACED`), for messages.
    pub fn short_name(self) -> &'static str {
        self.as_str_name()
            .strip_prefix("GO_AWAY_REASON_")
            .unwrap_or("UNSPECIFIED")
    }
}
