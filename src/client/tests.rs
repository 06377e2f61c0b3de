//! The client against a small protocol-speaking fake server: a real loopback
//! listener in the same executor, real frames through `crate::proto`, and
//! for Noise the server's side of the handshake and transport from
//! `crate::noise`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;

use super::*;
use crate::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
use crate::noise::{
    wire, Intro, KeySlot, NoiseError, Pattern, Responder, ServerKeys, StaticKeypair, Transport,
};
use crate::proto::{next_frame, pb, ErrorCode, Frame};

const FRAME_BYTES_MAX: u32 = 66_560;

pub(crate) fn run<F, T>(test: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::default()
        .spawn(test)
        .expect("executor starts")
        .join()
        .expect("test executor finished")
}

/// The server end of one connection: plaintext, or Noise after
/// [`Peer::handshake`] (then `read` opens and `write` seals).
pub(crate) struct Peer {
    pub(crate) stream: TcpStream,
    /// Frame bytes not yet decoded (opened ones, in Noise mode).
    buffer: BytesMut,
    /// Noise: bytes read and not yet handled (handshake or transport).
    raw: BytesMut,
    transport: Option<Transport>,
}

/// What the server side saw of a Noise handshake.
#[derive(Debug)]
pub(crate) struct Handshake {
    pub(crate) pattern: Pattern,
    /// The client's static public key.
    pub(crate) client_key: [u8; 32],
    pub(crate) slot: KeySlot,
}

/// Why the server side's handshake did not finish.
#[derive(Debug, PartialEq)]
pub(crate) enum Refused {
    /// The client closed the connection.
    Closed,
    /// The responder refused a message (the server then closes).
    Noise(NoiseError),
}

impl Peer {
    pub(crate) async fn accept(listener: &TcpListener) -> Peer {
        Peer {
            stream: listener.accept().await.expect("accept"),
            buffer: BytesMut::new(),
            raw: BytesMut::new(),
            transport: None,
        }
    }

    /// Accepts a connection and finishes a Noise handshake on it.
    pub(crate) async fn accept_noise(
        listener: &TcpListener,
        keys: &ServerKeys,
    ) -> (Peer, Handshake) {
        let mut peer = Peer::accept(listener).await;
        let handshake = peer.handshake(keys).await.expect("handshake");
        (peer, handshake)
    }

    /// Reads more bytes into `raw`; false at end of stream (or a reset).
    async fn fill_raw(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Bytes the client sent that the server side has not handled.
    pub(crate) fn unread(&self) -> usize {
        self.raw.len() + self.buffer.len()
    }

    /// Plays the server's side of a Noise handshake with `keys`, as the
    /// server does: the intro, then the client's messages through a
    /// `Responder`, its replies written. The client's payload must be empty.
    pub(crate) async fn handshake(&mut self, keys: &ServerKeys) -> Result<Handshake, Refused> {
        let pattern = loop {
            if let Some((pattern, length)) = Intro::parse(&self.raw).map_err(Refused::Noise)? {
                self.raw.advance(length);
                break pattern;
            }
            if !self.fill_raw().await {
                return Err(Refused::Closed);
            }
        };
        let mut responder = Responder::new(pattern, keys).map_err(Refused::Noise)?;
        while !responder.is_finished() {
            let message = wire::next_message(&mut self.raw, responder.message_bytes_max())
                .map_err(Refused::Noise)?;
            let Some(message) = message else {
                if !self.fill_raw().await {
                    return Err(Refused::Closed);
                }
                continue;
            };
            if let Some(reply) = responder.read_message(&message).map_err(Refused::Noise)? {
                self.stream.write_all(&reply).await.expect("server write");
            }
        }
        assert!(
            responder.client_payload().is_empty(),
            "the client's handshake payload is empty"
        );
        let handshake = Handshake {
            pattern,
            client_key: responder.remote_static().expect("finished"),
            slot: responder.key_slot(),
        };
        let mut transport = responder.into_transport().expect("transport");
        // The client may have sent its first frames right behind the handshake.
        transport
            .open(&mut self.raw, &mut self.buffer)
            .expect("the client's transport messages open");
        self.transport = Some(transport);
        Ok(handshake)
    }

    /// The next frame, or None at end of stream.
    pub(crate) async fn read(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = next_frame(&mut self.buffer, FRAME_BYTES_MAX).expect("valid frame")
            {
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.expect("server read");
            if n == 0 {
                return None;
            }
            match &mut self.transport {
                None => self.buffer.extend_from_slice(&chunk[..n]),
                Some(transport) => {
                    self.raw.extend_from_slice(&chunk[..n]);
                    transport
                        .open(&mut self.raw, &mut self.buffer)
                        .expect("the client's transport messages open");
                }
            }
        }
    }

    /// `plaintext` as transport messages (Noise mode only), not written.
    pub(crate) fn seal(&mut self, plaintext: &[u8]) -> BytesMut {
        let mut sealed = BytesMut::new();
        self.transport
            .as_mut()
            .expect("after the handshake")
            .seal(plaintext, &mut sealed)
            .expect("sealed");
        sealed
    }

    pub(crate) async fn write(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for frame in frames {
            frame.encode(&mut out);
        }
        if self.transport.is_some() {
            out = self.seal(&out);
        }
        self.stream.write_all(&out).await.expect("server write");
    }

    pub(crate) async fn write_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("server write");
    }

    /// Expects Hello and answers Welcome.
    pub(crate) async fn welcome(&mut self) -> pb::Hello {
        let Some(Frame::Hello(hello)) = self.read().await else {
            panic!("expected Hello");
        };
        self.write(&[Frame::Welcome(test_welcome())]).await;
        hello
    }
}

fn test_welcome() -> pb::Welcome {
    pb::Welcome {
        protocol_version: 1,
        server_time_ms: 1_700_000_000_000,
        max_payload_bytes: 65_536,
        max_frame_bytes: FRAME_BYTES_MAX,
        delivery_window: 64,
        idle_timeout_ms: 120_000,
        ids_per_frame_max: 1_024,
        delivery_window_bytes: 262_144,
        inbox_pending_through: 0,
    }
}

pub(crate) fn listen() -> (TcpListener, ConnectOptions) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut opts = ConnectOptions::new(listener.local_addr().expect("local addr"));
    opts.timeout = Duration::from_secs(5);
    (listener, opts)
}

/// A device that logs in with a secret, in plaintext.
pub(crate) fn credentials() -> Credentials {
    Credentials {
        user: UserId(12),
        device: DeviceId(1),
        secret: Some([7; 32]),
        noise_private: None,
        server_key: None,
    }
}

/// A device that logs in with a Noise key, pinned to `server_key` if given.
pub(crate) fn noise_credentials(server_key: Option<[u8; 32]>) -> Credentials {
    Credentials {
        user: UserId(12),
        device: DeviceId(1),
        secret: None,
        noise_private: Some([5; 32]),
        server_key,
    }
}

/// The server's keys, made in a fresh directory (kept with them).
pub(crate) fn server_keys() -> (tempfile::TempDir, ServerKeys) {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = ServerKeys::load_or_create(dir.path()).expect("server keys");
    (dir, keys)
}

pub(crate) fn deliver(sequence: u64, id: u64) -> pb::Deliver {
    pb::Deliver {
        sequence,
        sender_user_id: 30,
        sender_device_id: 1,
        client_message_id: id,
        timestamp_ms: 1_700_000_000_001,
        payload: Bytes::from(format!("message {id}")),
        ..Default::default()
    }
}

#[test]
fn register_returns_the_registered_credentials() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.plaintext = true;
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            let Some(Frame::Register(register)) = peer.read().await else {
                panic!("expected Register");
            };
            assert_eq!(register.protocol_version, 1);
            assert_eq!(register.registration_token, "letmein");
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 41,
                device_id: 1,
                secret: Bytes::from(vec![9u8; 32]),
            })])
            .await;
        });
        let creds = register(&opts, Some("letmein")).await.expect("registered");
        assert_eq!(creds.user, UserId(41));
        assert_eq!(creds.device, DeviceId(1));
        assert_eq!(creds.secret, Some([9u8; 32]));
        assert_eq!(creds.noise_private, None);
        assert_eq!(creds.server_key, None);
        server.await;
    });
}

#[test]
fn register_reports_bad_registration_token() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.plaintext = true;
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.read().await;
            peer.write(&[crate::proto::error_frame(
                ErrorCode::BadRegistrationToken,
                "no",
                true,
            )])
            .await;
        });
        let err = register(&opts, None).await.expect_err("refused");
        assert_eq!(err.server_code(), Some(ErrorCode::BadRegistrationToken));
        server.await;
    });
}

#[test]
fn connect_sends_hello_with_the_credentials_and_returns_welcome() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        assert_eq!(session.welcome(), &test_welcome());
        let hello = server.await;
        assert_eq!(hello.protocol_version, 1);
        assert_eq!(hello.user_id, 12);
        assert_eq!(hello.device_id, 1);
        assert_eq!(hello.secret.as_ref(), &[7u8; 32]);
    });
}

#[test]
fn connect_reports_auth_failed() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.read().await;
            peer.write(&[crate::proto::error_frame(
                ErrorCode::AuthFailed,
                "bad secret",
                true,
            )])
            .await;
        });
        let err = Session::connect(&opts, &credentials())
            .await
            .err()
            .expect("refused");
        assert_eq!(err.server_code(), Some(ErrorCode::AuthFailed));
        server.await;
    });
}

#[test]
fn connect_times_out_when_the_server_never_answers() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.timeout = Duration::from_millis(200);
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.read().await;
            glommio::timer::sleep(Duration::from_secs(1)).await;
        });
        let err = Session::connect(&opts, &credentials())
            .await
            .err()
            .expect("timed out");
        assert!(matches!(err, ClientError::Timeout), "{err:?}");
        server.await;
    });
}

#[test]
fn connect_binds_the_requested_source_address() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.bind_ip = Some("127.0.0.2".parse().expect("ip"));
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            let from: SocketAddr = peer.stream.peer_addr().expect("peer addr");
            peer.welcome().await;
            from
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        let from = server.await;
        assert_eq!(from.ip().to_string(), "127.0.0.2");
        assert_eq!(
            session.local_addr().expect("local").ip().to_string(),
            "127.0.0.2"
        );
    });
}

#[test]
fn connect_with_bind_ip_reports_refused_connection() {
    run(|| async {
        // A port nobody listens on: bind, read the port, drop the listener.
        let (listener, mut opts) = listen();
        drop(listener);
        opts.bind_ip = Some("127.0.0.3".parse().expect("ip"));
        let err = Session::connect(&opts, &credentials())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, ClientError::Io(_) | ClientError::Closed),
            "{err:?}"
        );
    });
}

#[test]
fn flush_writes_queued_frames_in_order() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut frames = Vec::new();
            while let Some(frame) = peer.read().await {
                frames.push(frame);
            }
            frames
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        for id in 1..=100u64 {
            session
                .send(
                    UserId(30),
                    ClientMessageId(id),
                    Bytes::from(vec![id as u8; 100]),
                )
                .expect("queued");
        }
        session.ack(InboxSeq(5)).expect("queued");
        session
            .ack_list(&[InboxSeq(7), InboxSeq(9)])
            .expect("queued");
        session
            .read_receipt(
                UserId(30),
                DeviceId(1),
                &[ClientMessageId(3), ClientMessageId(4)],
            )
            .expect("queued");
        session.ping(77).expect("queued");
        assert!(session.queued_bytes() > 100 * 100);
        session.flush().await.expect("flushed");
        assert_eq!(session.queued_bytes(), 0);
        drop(session);
        let frames = server.await;
        assert_eq!(frames.len(), 104);
        for (i, frame) in frames[..100].iter().enumerate() {
            let Frame::Send(send) = frame else {
                panic!("expected Send")
            };
            assert_eq!(send.client_message_id, i as u64 + 1);
            assert_eq!(send.recipient_user_id, 30);
            assert_eq!(send.payload.len(), 100);
        }
        assert_eq!(
            frames[100],
            Frame::Ack(pb::Ack {
                up_to_sequence: 5,
                sequences: vec![]
            })
        );
        assert_eq!(
            frames[101],
            Frame::Ack(pb::Ack {
                up_to_sequence: 0,
                sequences: vec![7, 9]
            })
        );
        assert_eq!(
            frames[102],
            Frame::ReadReceipt(pb::ReadReceipt {
                sender_user_id: 30,
                sender_device_id: 1,
                client_message_ids: vec![3, 4]
            })
        );
        assert_eq!(frames[103], Frame::Ping(pb::Ping { nonce: 77 }));
    });
}

#[test]
fn send_fails_with_queue_full_at_the_bound_and_recovers_after_flush() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.frame_bytes_max = 1024;
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut sends = 0;
            while let Some(frame) = peer.read().await {
                assert!(matches!(frame, Frame::Send(_)));
                sends += 1;
            }
            sends
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        let payload = Bytes::from(vec![1u8; 900]);
        let mut queued = 0u64;
        let full = loop {
            match session.send(UserId(30), ClientMessageId(queued + 1), payload.clone()) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued < 1000, "queue never filled");
        };
        assert!(matches!(full, ClientError::QueueFull), "{full:?}");
        assert!(session.queued_bytes() <= 1024 * QUEUE_FRAMES_MAX as usize);
        session.flush().await.expect("flushed");
        session
            .send(UserId(30), ClientMessageId(queued + 1), payload)
            .expect("room again after flush");
        session.flush().await.expect("flushed");
        drop(session);
        assert_eq!(server.await, queued + 1);
    });
}

#[test]
fn next_event_surfaces_server_frames_and_answers_pings() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let receipt = pb::Receipt {
                sequence: 2,
                kind: pb::ReceiptKind::Delivered as i32,
                by_user_id: 30,
                by_device_id: 1,
                client_message_ids: vec![5, 6],
                timestamp_ms: 9,
                ..Default::default()
            };
            peer.write(&[
                Frame::ServerAck(pb::ServerAck {
                    client_message_id: 5,
                    server_sequence: 3,
                    timestamp_ms: 8,
                }),
                Frame::Deliver(deliver(1, 100)),
                Frame::Ping(pb::Ping { nonce: 42 }),
                Frame::Receipt(receipt),
                Frame::Pong(pb::Pong { nonce: 7 }),
            ])
            .await;
            // Split one frame across two writes: the reader must resume.
            let bytes = Frame::Deliver(deliver(3, 101)).to_bytes();
            peer.write_bytes(&bytes[..7]).await;
            glommio::timer::sleep(Duration::from_millis(20)).await;
            peer.write_bytes(&bytes[7..]).await;
            peer.write(&[Frame::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::ShuttingDown as i32,
                reconnect_after_ms: 10,
            })])
            .await;
            let pong = peer.read().await;
            assert_eq!(pong, Some(Frame::Pong(pb::Pong { nonce: 42 })));
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        let mut events = Vec::new();
        for _ in 0..6 {
            events.push(session.next_event().await.expect("event"));
        }
        assert!(matches!(&events[0], Event::ServerAck(a) if a.client_message_id == 5));
        assert!(
            matches!(&events[1], Event::Deliver(d) if d.sequence == 1 && d.payload == "message 100")
        );
        assert!(matches!(&events[2], Event::Receipt(r) if r.client_message_ids == vec![5, 6]));
        assert_eq!(events[3], Event::Pong(7));
        assert!(matches!(&events[4], Event::Deliver(d) if d.sequence == 3));
        assert!(
            matches!(&events[5], Event::GoAway(g) if g.reason() == pb::GoAwayReason::ShuttingDown)
        );
        assert!(session.is_closed());
        // The Pong to the server's Ping was queued while reading.
        session.flush().await.expect("pong flushed");
        server.await;
    });
}

#[test]
fn next_event_returns_closed_at_end_of_stream() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        server.await;
        let err = session.next_event().await.expect_err("closed");
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        assert!(matches!(
            session.send(UserId(1), ClientMessageId(1), Bytes::new()),
            Err(ClientError::Closed)
        ));
    });
}

#[test]
fn next_event_rejects_an_oversized_frame_before_its_body() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            // Only the prefix: the client must not wait for 16 MiB.
            peer.write_bytes(&[0x01, 0x00, 0x00, 0x00]).await;
            peer
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        let err = session.next_event().await.expect_err("too large");
        assert!(
            matches!(
                err,
                ClientError::Protocol(crate::proto::DecodeError::FrameTooLarge { .. })
            ),
            "{err:?}"
        );
        drop(server.await);
    });
}

#[test]
fn a_sending_task_and_a_receiving_task_share_one_session() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            // Echo a ServerAck for every Send.
            while let Some(frame) = peer.read().await {
                if let Frame::Send(send) = frame {
                    peer.write(&[Frame::ServerAck(pb::ServerAck {
                        client_message_id: send.client_message_id,
                        server_sequence: send.client_message_id,
                        timestamp_ms: 1,
                    })])
                    .await;
                }
            }
        });
        let session = Rc::new(
            Session::connect(&opts, &credentials())
                .await
                .expect("connected"),
        );
        let receiver = {
            let session = session.clone();
            glommio::spawn_local(async move {
                let mut acked = Vec::new();
                while acked.len() < 500 {
                    match session.next_event().await.expect("event") {
                        Event::ServerAck(ack) => acked.push(ack.client_message_id),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                acked
            })
        };
        for id in 1..=500u64 {
            session
                .send(UserId(2), ClientMessageId(id), Bytes::from_static(b"x"))
                .expect("queued");
            if id % 7 == 0 {
                session.flush().await.expect("flushed");
            }
        }
        session.flush().await.expect("flushed");
        let acked = receiver.await;
        assert_eq!(acked, (1..=500).collect::<Vec<_>>());
        drop(session);
        server.await;
    });
}

#[test]
fn reconnecting_session_resends_unacked_sends_and_drops_redeliveries() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            // First connection: take two Sends, ack only the first, deliver
            // seq 1 and 2, then drop the connection.
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut sends = Vec::new();
            while sends.len() < 2 {
                if let Some(Frame::Send(send)) = peer.read().await {
                    sends.push(send.client_message_id);
                }
            }
            assert_eq!(sends, vec![1, 2]);
            peer.write(&[
                Frame::ServerAck(pb::ServerAck {
                    client_message_id: 1,
                    server_sequence: 10,
                    timestamp_ms: 1,
                }),
                Frame::Deliver(deliver(1, 500)),
                Frame::Deliver(deliver(2, 501)),
            ])
            .await;
            // Wait for the client's ack of 1 only, then cut it off.
            let ack = peer.read().await;
            assert_eq!(
                ack,
                Some(Frame::Ack(pb::Ack {
                    up_to_sequence: 1,
                    sequences: vec![]
                }))
            );
            drop(peer);

            // Second connection: the unacked Send 2 comes again; seq 2 is
            // redelivered (the client saw it) and must be re-acked, seq 3 is new.
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let Some(Frame::Send(send)) = peer.read().await else {
                panic!("expected resend")
            };
            assert_eq!(send.client_message_id, 2);
            assert_eq!(send.payload, "second");
            peer.write(&[
                Frame::ServerAck(pb::ServerAck {
                    client_message_id: 2,
                    server_sequence: 11,
                    timestamp_ms: 2,
                }),
                Frame::Deliver(deliver(2, 501)),
                Frame::Deliver(deliver(3, 502)),
            ])
            .await;
            let reack = peer.read().await;
            assert_eq!(
                reack,
                Some(Frame::Ack(pb::Ack {
                    up_to_sequence: 0,
                    sequences: vec![2]
                }))
            );
            peer.read().await
        });
        let options = ReconnectOptions {
            backoff_initial: Duration::from_millis(10),
            ..ReconnectOptions::default()
        };
        let session = ReconnectingSession::connect(&opts, &credentials(), options)
            .await
            .expect("connected");
        session
            .send(UserId(30), ClientMessageId(1), Bytes::from_static(b"first"))
            .expect("queued");
        session
            .send(
                UserId(30),
                ClientMessageId(2),
                Bytes::from_static(b"second"),
            )
            .expect("queued");
        session.flush().await.expect("flushed");
        assert!(
            matches!(session.next_event().await.expect("event"), Event::ServerAck(a) if a.client_message_id == 1)
        );
        assert_eq!(session.unacked_sends(), 1);
        assert!(
            matches!(session.next_event().await.expect("event"), Event::Deliver(d) if d.sequence == 1)
        );
        session.ack(InboxSeq(1)).expect("queued");
        session.flush().await.expect("flushed");
        assert!(
            matches!(session.next_event().await.expect("event"), Event::Deliver(d) if d.sequence == 2)
        );
        // The server drops the connection; the next events come from the second one.
        assert!(
            matches!(session.next_event().await.expect("event"), Event::ServerAck(a) if a.client_message_id == 2)
        );
        assert_eq!(session.reconnects(), 1);
        assert_eq!(session.unacked_sends(), 0);
        assert!(
            matches!(session.next_event().await.expect("event"), Event::Deliver(d) if d.sequence == 3)
        );
        session.ack(InboxSeq(3)).expect("queued");
        session.flush().await.expect("flushed");
        assert_eq!(
            server.await,
            Some(Frame::Ack(pb::Ack {
                up_to_sequence: 3,
                sequences: vec![]
            }))
        );
    });
}

#[test]
fn reconnecting_session_pings_when_quiet() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let Some(Frame::Ping(ping)) = peer.read().await else {
                panic!("expected Ping")
            };
            peer.write(&[Frame::Pong(pb::Pong { nonce: ping.nonce })])
                .await;
            ping.nonce
        });
        let options = ReconnectOptions {
            ping_interval: Some(Duration::from_millis(50)),
            ..ReconnectOptions::default()
        };
        let session = ReconnectingSession::connect(&opts, &credentials(), options)
            .await
            .expect("connected");
        let event = session.next_event().await.expect("event");
        let nonce = server.await;
        assert_eq!(event, Event::Pong(nonce));
    });
}

#[test]
fn reconnecting_session_gives_up_on_auth_failure() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            drop(peer);
            let mut peer = Peer::accept(&listener).await;
            peer.read().await;
            peer.write(&[crate::proto::error_frame(
                ErrorCode::AuthFailed,
                "revoked",
                true,
            )])
            .await;
        });
        let options = ReconnectOptions {
            backoff_initial: Duration::from_millis(5),
            ..ReconnectOptions::default()
        };
        let session = ReconnectingSession::connect(&opts, &credentials(), options)
            .await
            .expect("connected");
        let err = session.next_event().await.expect_err("gave up");
        assert_eq!(err.server_code(), Some(ErrorCode::AuthFailed));
        server.await;
    });
}

#[test]
fn credentials_round_trip_through_an_owner_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.cred");
    let creds = Credentials {
        user: UserId(123_456),
        device: DeviceId(3),
        secret: Some(std::array::from_fn(|i| i as u8)),
        noise_private: None,
        server_key: None,
    };
    creds.save(&path).expect("saved");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(Credentials::load(&path).expect("loaded"), creds);
    assert!(
        !format!("{creds:?}").contains("123, 4"),
        "Debug hides the secret"
    );
}

#[test]
fn credentials_load_rejects_a_short_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.cred");
    std::fs::write(&path, "user = 1\ndevice = 1\nsecret = \"abcd\"\n").expect("written");
    let err = Credentials::load(&path).expect_err("rejected");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn reconnecting_session_stops_after_being_replaced() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            peer.write(&[Frame::GoAway(pb::GoAway {
                reason: pb::GoAwayReason::Replaced as i32,
                reconnect_after_ms: 0,
            })])
            .await;
            // No second connection may come.
            futures_lite::future::or(
                async {
                    Peer::accept(&listener).await;
                    panic!("reconnected after REPLACED");
                },
                glommio::timer::sleep(Duration::from_millis(300)),
            )
            .await;
        });
        let session =
            ReconnectingSession::connect(&opts, &credentials(), ReconnectOptions::default())
                .await
                .expect("connected");
        let event = session.next_event().await.expect("event");
        assert!(matches!(event, Event::GoAway(g) if g.reason() == pb::GoAwayReason::Replaced));
        let err = session.next_event().await.expect_err("no reconnect");
        assert!(
            matches!(
                err,
                ClientError::GoAway {
                    reason: pb::GoAwayReason::Replaced,
                    ..
                }
            ),
            "{err:?}"
        );
        server.await;
    });
}

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}

/// Measurement, not a check: `cargo test --lib --release -- --ignored
/// --nocapture client_memory_per_idle_session`. Opens N raw glommio
/// streams, then N Sessions, against a server thread doing the same work for
/// both; the difference per connection is what a Session adds to a stream.
#[test]
#[ignore]
fn client_memory_per_idle_session() {
    const SESSIONS: usize = 3000;
    let listener_addr = {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let server = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
                addr_tx
                    .send((listener.local_addr().expect("addr"), done_tx))
                    .expect("addr sent");
                let welcome = Frame::Welcome(test_welcome()).to_bytes();
                let mut held = Vec::with_capacity(2 * SESSIONS);
                while held.len() < 2 * SESSIONS {
                    let mut stream = listener.accept().await.expect("accept");
                    let mut hello = [0u8; 128];
                    let mut got = 0;
                    while got < crate::proto::HEADER_BYTES
                        || got
                            < crate::proto::LENGTH_PREFIX_BYTES
                                + u32::from_be_bytes([hello[0], hello[1], hello[2], hello[3]])
                                    as usize
                    {
                        got += stream.read(&mut hello[got..]).await.expect("read hello");
                    }
                    stream.write_all(&welcome).await.expect("welcome");
                    held.push(stream);
                }
                done_rx.recv().expect("done");
            })
            .expect("server thread");
        let (addr, done_tx) = addr_rx.recv().expect("server address");
        (addr, done_tx, server)
    };
    let (addr, done_tx, server) = listener_addr;
    let (raw_per, session_per, struct_bytes) = run(move || async move {
        let hello = Frame::Hello(pb::Hello {
            protocol_version: 1,
            user_id: 1,
            device_id: 1,
            secret: Bytes::from(vec![0u8; 32]),
        })
        .to_bytes();
        let welcome_len = Frame::Welcome(test_welcome()).wire_len();
        let before = resident_bytes();
        let mut raw = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(&hello).await.expect("hello");
            let mut welcome = [0u8; 128];
            let mut got = 0;
            while got < welcome_len {
                got += stream.read(&mut welcome[got..]).await.expect("welcome");
            }
            raw.push(stream);
        }
        let after_raw = resident_bytes();
        let opts = ConnectOptions::new(addr);
        let mut sessions = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            sessions.push(
                Session::connect(&opts, &credentials())
                    .await
                    .expect("session"),
            );
        }
        let after_sessions = resident_bytes();
        // Signed: another test of this binary may free memory meanwhile (run
        // this one alone).
        let raw_per = (after_raw as i64 - before as i64) / SESSIONS as i64;
        let session_per = (after_sessions as i64 - after_raw as i64) / SESSIONS as i64;
        drop(sessions);
        drop(raw);
        (raw_per, session_per, std::mem::size_of::<Session>())
    });
    done_tx.send(()).expect("server told");
    server.join().expect("server joined");
    println!(
        "{SESSIONS} connections, RSS per connection (client + server side): raw glommio stream {raw_per} B, Session {session_per} B; Session adds {} B; size_of::<Session>() = {struct_bytes} B",
        session_per - raw_per
    );
}

#[test]
fn reconnecting_session_resends_more_unacked_sends_than_the_queue_holds() {
    const SENDS: u64 = 100;
    run(|| async {
        let (listener, mut opts) = listen();
        // A 16 KiB output queue: 100 sends of 900 bytes need several flushes.
        opts.frame_bytes_max = 1024;
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut first = 0;
            while first < SENDS {
                if let Some(Frame::Send(_)) = peer.read().await {
                    first += 1;
                }
            }
            drop(peer);
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut resent = Vec::new();
            while resent.len() < SENDS as usize {
                let Some(Frame::Send(send)) = peer.read().await else {
                    panic!("expected a resent Send")
                };
                resent.push(send.client_message_id);
            }
            peer.write(&[Frame::Pong(pb::Pong { nonce: 1 })]).await;
            resent
        });
        let options = ReconnectOptions {
            backoff_initial: Duration::from_millis(5),
            ..ReconnectOptions::default()
        };
        let session = ReconnectingSession::connect(&opts, &credentials(), options)
            .await
            .expect("connected");
        for id in 1..=SENDS {
            session
                .send(UserId(2), ClientMessageId(id), Bytes::from(vec![0u8; 900]))
                .expect("queued");
            if id % 10 == 0 {
                session.flush().await.expect("flushed");
            }
        }
        session.flush().await.expect("flushed");
        assert_eq!(session.unacked_sends(), SENDS as usize);
        assert_eq!(session.next_event().await.expect("event"), Event::Pong(1));
        assert_eq!(session.reconnects(), 1);
        assert_eq!(server.await, (1..=SENDS).collect::<Vec<_>>());
    });
}

#[test]
fn flush_writes_a_whole_batch_in_one_call() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut sends = 0;
            while let Some(Frame::Send(_)) = peer.read().await {
                sends += 1;
            }
            sends
        });
        let session = Session::connect(&opts, &credentials())
            .await
            .expect("connected");
        let (writes_before, _) = session.io_calls();
        for id in 1..=64 {
            session
                .send(UserId(2), ClientMessageId(id), Bytes::from(vec![1u8; 100]))
                .expect("queued");
        }
        session.flush().await.expect("flushed");
        let (writes_after, _) = session.io_calls();
        // 64 frames, about 7.5 KB: one send() on an idle loopback socket.
        assert_eq!(writes_after - writes_before, 1);
        drop(session);
        assert_eq!(server.await, 64);
    });
}

/// Measurement: `cargo test --lib --release -- --ignored --nocapture
/// client_send_throughput`. One session streams Sends (100-byte payloads,
/// a flush per 64) to a server thread that decodes every frame.
#[test]
#[ignore]
fn client_send_throughput() {
    const SENDS: u64 = 500_000;
    const BATCH: u64 = 64;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = LocalExecutorBuilder::default()
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            addr_tx
                .send(listener.local_addr().expect("addr"))
                .expect("addr sent");
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let mut sends = 0u64;
            while let Some(frame) = peer.read().await {
                if matches!(frame, Frame::Send(_)) {
                    sends += 1;
                }
            }
            sends
        })
        .expect("server thread");
    let addr = addr_rx.recv().expect("server address");
    let (elapsed, writes) = run(move || async move {
        let session = Session::connect(&ConnectOptions::new(addr), &credentials())
            .await
            .expect("connected");
        let payload = Bytes::from(vec![7u8; 100]);
        let start = std::time::Instant::now();
        for id in 1..=SENDS {
            session
                .send(UserId(2), ClientMessageId(id), payload.clone())
                .expect("queued");
            if id % BATCH == 0 {
                session.flush().await.expect("flushed");
            }
        }
        session.flush().await.expect("flushed");
        let elapsed = start.elapsed();
        (elapsed, session.io_calls().0)
    });
    let received = server.join().expect("server joined");
    assert_eq!(received, SENDS);
    println!(
        "{SENDS} Sends of 100 B in {:.3} s: {:.0} frames/s from one session, {} write calls ({:.1} frames per write)",
        elapsed.as_secs_f64(),
        SENDS as f64 / elapsed.as_secs_f64(),
        writes,
        SENDS as f64 / writes as f64
    );
}

// Noise: the fake server plays the server's side with `crate::noise`.

#[test]
fn register_over_noise_returns_a_key_and_no_secret() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server_public = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            assert_eq!(handshake.pattern, Pattern::Xx);
            let Some(Frame::Register(register)) = peer.read().await else {
                panic!("expected Register");
            };
            assert_eq!(register.registration_token, "letmein");
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 41,
                device_id: 1,
                secret: Bytes::new(),
            })])
            .await;
            handshake.client_key
        });
        let creds = register(&opts, Some("letmein")).await.expect("registered");
        let client_key = server.await;
        assert_eq!(creds.user, UserId(41));
        assert_eq!(creds.secret, None);
        let keypair = creds.noise_keypair().expect("a Noise key");
        assert_eq!(keypair.public(), &client_key);
        assert_eq!(creds.server_key, Some(server_public));
    });
}

#[test]
fn link_with_a_pinned_server_key_uses_ik() {
    run(|| async {
        let (listener, mut opts) = listen();
        let (_dir, keys) = server_keys();
        opts.server_key = Some(*keys.public());
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            let Some(Frame::Link(link)) = peer.read().await else {
                panic!("expected Link");
            };
            assert_eq!(link.code, "1234-5678");
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 41,
                device_id: 2,
                secret: Bytes::new(),
            })])
            .await;
            handshake.pattern
        });
        let creds = link(&opts, "1234-5678", "laptop").await.expect("linked");
        assert_eq!(server.await, Pattern::Ik);
        assert_eq!(creds.device, DeviceId(2));
        assert_eq!(creds.server_key, opts.server_key);
    });
}

#[test]
fn register_over_noise_rejects_a_registered_with_a_secret() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.read().await;
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 41,
                device_id: 1,
                secret: Bytes::from(vec![9u8; 32]),
            })])
            .await;
        });
        let err = register(&opts, None).await.expect_err("refused");
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        server.await;
    });
}

#[test]
fn connect_over_noise_sends_the_hello_with_the_third_message_in_one_write() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server_public = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            (handshake, peer.welcome().await)
        });
        let creds = noise_credentials(None);
        let session = Session::connect(&opts, &creds).await.expect("connected");
        let (handshake, hello) = server.await;
        assert_eq!(handshake.pattern, Pattern::Xx);
        assert_eq!(
            &handshake.client_key,
            creds.noise_keypair().expect("key").public()
        );
        assert!(hello.secret.is_empty(), "no secret over Noise");
        assert_eq!(hello.user_id, 12);
        assert_eq!(session.server_key(), Some(server_public));
        assert!(!session.bound_noise_key());
        // The intro with message 1, then message 3 with the Hello.
        assert_eq!(session.io_calls().0, 2);
    });
}

#[test]
fn connect_with_a_pinned_key_uses_ik() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let pin = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            peer.write(&[Frame::Pong(pb::Pong { nonce: 3 })]).await;
            handshake
        });
        let session = Session::connect(&opts, &noise_credentials(Some(pin)))
            .await
            .expect("connected");
        let handshake = server.await;
        assert_eq!(handshake.pattern, Pattern::Ik);
        assert_eq!(handshake.slot, KeySlot::Current);
        assert_eq!(session.server_key(), Some(pin));
        assert_eq!(session.next_event().await.expect("event"), Event::Pong(3));
    });
}

#[test]
fn connect_refuses_a_changed_server_key_without_sending_message_3() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server_public = *keys.public();
        let pin = *StaticKeypair::generate().public();
        let server = glommio::spawn_local(async move {
            // The IK to the pinned key: this server does not hold it, and
            // closes without a word.
            let mut peer = Peer::accept(&listener).await;
            assert_eq!(
                peer.handshake(&keys).await.err(),
                Some(Refused::Noise(NoiseError::UnknownServerKey))
            );
            drop(peer);
            // The XX that follows: the client reads message 2 and hangs up.
            let mut peer = Peer::accept(&listener).await;
            assert_eq!(peer.handshake(&keys).await.err(), Some(Refused::Closed));
            peer.unread()
        });
        let err = Session::connect(&opts, &noise_credentials(Some(pin)))
            .await
            .err()
            .expect("refused");
        match err {
            ClientError::ServerKeyChanged { expected, got } => {
                assert_eq!(expected, pin);
                assert_eq!(got, server_public);
            }
            other => panic!("expected ServerKeyChanged, got {other:?}"),
        }
        assert_eq!(server.await, 0, "nothing was sent after message 2");
        let text = ClientError::ServerKeyChanged {
            expected: pin,
            got: server_public,
        }
        .to_string();
        assert!(text.contains(&crate::noise::fingerprint(&pin)), "{text}");
    });
}

#[test]
fn connect_reports_a_server_closing_before_message_2() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut patterns = Vec::new();
            // Both the IK and the XX retry are refused.
            for _ in 0..2 {
                let mut peer = Peer::accept(&listener).await;
                assert!(peer.fill_raw().await);
                patterns.push(peer.raw[4]);
            }
            patterns
        });
        let pin = *StaticKeypair::generate().public();
        let err = Session::connect(&opts, &noise_credentials(Some(pin)))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, ClientError::HandshakeClosed), "{err:?}");
        assert_eq!(server.await, vec![b'I', b'X']);
        // Without a pin there is no retry.
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            drop(Peer::accept(&listener).await);
        });
        let err = Session::connect(&opts, &noise_credentials(None))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, ClientError::HandshakeClosed), "{err:?}");
        server.await;
    });
}

#[test]
fn connect_exposes_the_key_a_rotating_server_announces() {
    run(|| async {
        let (listener, opts) = listen();
        let (dir, old) = server_keys();
        let keys = ServerKeys::rotate(dir.path()).expect("rotated");
        let current = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            handshake.slot
        });
        let session = Session::connect(&opts, &noise_credentials(Some(*old.public())))
            .await
            .expect("connected");
        assert_eq!(server.await, KeySlot::Previous);
        assert_eq!(session.server_key(), Some(current));
    });
}

#[test]
fn next_event_fails_on_a_tampered_transport_message_after_the_good_ones() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            let mut out = peer.seal(&Frame::Deliver(deliver(1, 100)).to_bytes());
            let mut tampered = peer.seal(&Frame::Deliver(deliver(2, 101)).to_bytes());
            let last = tampered.len() - 1;
            tampered[last] ^= 0x01;
            out.extend_from_slice(&tampered);
            peer.write_bytes(&out).await;
            peer
        });
        let session = Session::connect(&opts, &noise_credentials(None))
            .await
            .expect("connected");
        let first = session.next_event().await.expect("the good message");
        assert!(matches!(first, Event::Deliver(d) if d.sequence == 1));
        let err = session.next_event().await.expect_err("tampered");
        assert!(
            matches!(err, ClientError::Noise(NoiseError::TransportDecrypt)),
            "{err:?}"
        );
        assert!(session.is_closed());
        drop(server.await);
    });
}

#[test]
fn next_event_fails_on_garbage_after_the_handshake() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            // A plaintext frame where transport messages belong: its length
            // prefix reads as a 0-byte Noise message.
            peer.write_bytes(&Frame::Pong(pb::Pong { nonce: 1 }).to_bytes())
                .await;
            peer
        });
        let session = Session::connect(&opts, &noise_credentials(None))
            .await
            .expect("connected");
        let err = session.next_event().await.expect_err("garbage");
        assert!(matches!(err, ClientError::Noise(_)), "{err:?}");
        drop(server.await);
    });
}

#[test]
fn connect_fails_on_a_garbled_handshake_message() {
    run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            assert!(peer.fill_raw().await);
            // A message 2 of the right size, but not from a Noise server.
            let mut garbage = BytesMut::new();
            wire::put_message(&mut garbage, &[0x5a; 96]);
            peer.write_bytes(&garbage).await;
            peer
        });
        let err = Session::connect(&opts, &noise_credentials(None))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, ClientError::Noise(NoiseError::HandshakeDecrypt)),
            "{err:?}"
        );
        drop(server.await);
    });
}

#[test]
fn noise_frames_may_span_transport_messages_and_reads() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            // One frame in two transport messages, the second cut across
            // two writes.
            let bytes = Frame::Deliver(deliver(1, 100)).to_bytes();
            let mut sealed = peer.seal(&bytes[..7]);
            sealed.extend_from_slice(&peer.seal(&bytes[7..]));
            let cut = sealed.len() - 5;
            peer.write_bytes(&sealed[..cut]).await;
            glommio::timer::sleep(Duration::from_millis(20)).await;
            peer.write_bytes(&sealed[cut..]).await;
            // A frame larger than one transport message's chunk, and two
            // frames in one message.
            let big = pb::Deliver {
                payload: Bytes::from(vec![3u8; 66_000]),
                ..deliver(2, 101)
            };
            peer.write(&[Frame::Deliver(big)]).await;
            peer.write(&[
                Frame::Deliver(deliver(3, 102)),
                Frame::Pong(pb::Pong { nonce: 4 }),
            ])
            .await;
            // And the other way: the client's large Send.
            let Some(Frame::Send(send)) = peer.read().await else {
                panic!("expected Send")
            };
            send.payload.len()
        });
        let session = Session::connect(&opts, &noise_credentials(None))
            .await
            .expect("connected");
        let mut sequences = Vec::new();
        for _ in 0..3 {
            match session.next_event().await.expect("event") {
                Event::Deliver(d) => {
                    if d.sequence == 2 {
                        assert_eq!(d.payload.len(), 66_000);
                    }
                    sequences.push(d.sequence);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sequences, vec![1, 2, 3]);
        assert_eq!(session.next_event().await.expect("event"), Event::Pong(4));
        session
            .send(
                UserId(2),
                ClientMessageId(1),
                Bytes::from(vec![1u8; 66_000]),
            )
            .expect("queued");
        session.flush().await.expect("flushed");
        assert_eq!(server.await, 66_000);
    });
}

#[test]
fn noise_session_carries_a_stream_of_sends_and_acks() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.frame_bytes_max = 1024;
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            while let Some(frame) = peer.read().await {
                if let Frame::Send(send) = frame {
                    peer.write(&[Frame::ServerAck(pb::ServerAck {
                        client_message_id: send.client_message_id,
                        server_sequence: send.client_message_id,
                        timestamp_ms: 1,
                    })])
                    .await;
                }
            }
        });
        let session = Rc::new(
            Session::connect(&opts, &noise_credentials(None))
                .await
                .expect("connected"),
        );
        let receiver = {
            let session = session.clone();
            glommio::spawn_local(async move {
                let mut acked = Vec::new();
                while acked.len() < 300 {
                    match session.next_event().await.expect("event") {
                        Event::ServerAck(ack) => acked.push(ack.client_message_id),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                acked
            })
        };
        // The queue's bound counts plaintext bytes, as in plaintext mode.
        let mut id = 0u64;
        while id < 300 {
            match session.send(
                UserId(2),
                ClientMessageId(id + 1),
                Bytes::from(vec![1u8; 900]),
            ) {
                Ok(()) => id += 1,
                Err(ClientError::QueueFull) => {
                    assert!(session.queued_bytes() <= 1024 * QUEUE_FRAMES_MAX as usize);
                    session.flush().await.expect("flushed");
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        session.flush().await.expect("flushed");
        assert_eq!(receiver.await, (1..=300).collect::<Vec<_>>());
        drop(session);
        server.await;
    });
}

#[test]
fn connect_binds_a_new_noise_key_with_the_secret() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let creds = credentials().with_new_noise_key();
        assert!(creds.binds_noise_key());
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            (handshake.client_key, peer.welcome().await)
        });
        let session = Session::connect(&opts, &creds).await.expect("connected");
        let (client_key, hello) = server.await;
        assert_eq!(&client_key, creds.noise_keypair().expect("key").public());
        assert_eq!(hello.secret.as_ref(), &[7u8; 32]);
        assert!(session.bound_noise_key());
        let bound = creds.key_bound();
        assert_eq!(bound.secret, None);
        assert_eq!(bound.noise_private, creds.noise_private);
    });
}

#[test]
fn connect_logs_in_with_the_key_alone_when_it_was_bound_already() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server = glommio::spawn_local(async move {
            // The key is bound already: a Hello with the secret is refused.
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            let Some(Frame::Hello(hello)) = peer.read().await else {
                panic!("expected Hello")
            };
            assert_eq!(hello.secret.len(), 32);
            peer.write(&[crate::proto::error_frame(
                ErrorCode::AuthFailed,
                "bound",
                true,
            )])
            .await;
            drop(peer);
            let (mut peer, _) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await
        });
        let creds = credentials().with_new_noise_key();
        let session = Session::connect(&opts, &creds).await.expect("connected");
        assert!(server.await.secret.is_empty());
        assert!(!session.bound_noise_key());
    });
}

#[test]
fn plaintext_login_without_a_secret_fails_with_no_secret() {
    run(|| async {
        let (_listener, mut opts) = listen();
        opts.plaintext = true;
        let err = Session::connect(&opts, &noise_credentials(None))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, ClientError::NoSecret), "{err:?}");
    });
}

#[test]
fn reconnecting_session_reconnects_with_ik_and_drops_a_bound_secret() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let server_public = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, first) = Peer::accept_noise(&listener, &keys).await;
            let bind = peer.welcome().await;
            drop(peer);
            let (mut peer, second) = Peer::accept_noise(&listener, &keys).await;
            let again = peer.welcome().await;
            peer.write(&[Frame::Pong(pb::Pong { nonce: 8 })]).await;
            (first.pattern, bind, second.pattern, again, peer)
        });
        let options = ReconnectOptions {
            backoff_initial: Duration::from_millis(5),
            ..ReconnectOptions::default()
        };
        let creds = credentials().with_new_noise_key();
        let session = ReconnectingSession::connect(&opts, &creds, options)
            .await
            .expect("connected");
        assert_eq!(session.credentials().server_key, Some(server_public));
        assert_eq!(session.credentials().secret, None);
        assert_eq!(session.next_event().await.expect("event"), Event::Pong(8));
        let (first, bind, second, again, _peer) = server.await;
        assert_eq!((first, second), (Pattern::Xx, Pattern::Ik));
        assert_eq!(bind.secret.len(), 32);
        assert!(again.secret.is_empty());
        assert_eq!(session.reconnects(), 1);
    });
}

#[test]
fn reconnecting_session_gives_up_on_a_changed_server_key() {
    run(|| async {
        let (listener, opts) = listen();
        let (_dir, keys) = server_keys();
        let (_other_dir, other) = server_keys();
        let server = glommio::spawn_local(async move {
            let (peer, _) = Peer::accept_noise(&listener, &keys).await;
            let mut peer = peer;
            peer.welcome().await;
            drop(peer);
            // The server comes back with another key: the IK fails, the XX
            // shows the new key.
            let mut peer = Peer::accept(&listener).await;
            assert!(peer.handshake(&other).await.is_err());
            drop(peer);
            let mut peer = Peer::accept(&listener).await;
            assert!(peer.handshake(&other).await.is_err());
        });
        let options = ReconnectOptions {
            backoff_initial: Duration::from_millis(5),
            ..ReconnectOptions::default()
        };
        let session = ReconnectingSession::connect(&opts, &noise_credentials(None), options)
            .await
            .expect("connected");
        let err = session.next_event().await.expect_err("gave up");
        assert!(
            matches!(err, ClientError::ServerKeyChanged { .. }),
            "{err:?}"
        );
        server.await;
    });
}

#[test]
fn credentials_of_a_noise_device_round_trip_and_old_files_still_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("device.cred");
    let creds = noise_credentials(Some([9; 32]));
    creds.save(&path).expect("saved");
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(!text.contains("secret"), "{text}");
    assert_eq!(Credentials::load(&path).expect("loaded"), creds);
    let debug = format!("{creds:?}");
    assert!(
        !debug.contains("0505"),
        "Debug hides the private key: {debug}"
    );
    // A file from before Noise: user, device, secret.
    std::fs::write(
        &path,
        format!("user = 1\ndevice = 2\nsecret = \"{}\"\n", "ab".repeat(32)),
    )
    .expect("written");
    let old = Credentials::load(&path).expect("loaded");
    assert_eq!(old.secret, Some([0xab; 32]));
    assert_eq!((old.noise_private, old.server_key), (None, None));
    // Neither a secret nor a key: nothing to log in with.
    std::fs::write(&path, "user = 1\ndevice = 2\n").expect("written");
    let err = Credentials::load(&path).expect_err("rejected");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}
