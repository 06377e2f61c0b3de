//! The client against a small protocol-speaking fake server: a real loopback
//! listener in the same executor, real frames through `crate::proto`.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::LocalExecutorBuilder;

use super::*;
use crate::ids::{ClientMessageId, DeviceId, InboxSeq, UserId};
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

/// The server end of one connection.
pub(crate) struct Peer {
    pub(crate) stream: TcpStream,
    buffer: BytesMut,
}

impl Peer {
    pub(crate) async fn accept(listener: &TcpListener) -> Peer {
        Peer {
            stream: listener.accept().await.expect("accept"),
            buffer: BytesMut::new(),
        }
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
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    pub(crate) async fn write(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for frame in frames {
            frame.encode(&mut out);
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

pub(crate) fn credentials() -> Credentials {
    Credentials {
        user: UserId(12),
        device: DeviceId(1),
        secret: [7; 32],
    }
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
        let (listener, opts) = listen();
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
        assert_eq!(creds.secret, [9u8; 32]);
        server.await;
    });
}

#[test]
fn register_reports_bad_registration_token() {
    run(|| async {
        let (listener, opts) = listen();
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
        secret: std::array::from_fn(|i| i as u8),
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
