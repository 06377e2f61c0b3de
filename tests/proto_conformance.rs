//! The edges of docs/protocol.md, checked against the real binary over real
//! sockets: each test names the section whose sentence it holds the server to.

mod common;

use std::time::Duration;

use common::{RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame};

fn start(dir: &std::path::Path) -> Server {
    Server::start(dir, |_| {})
}

/// §1: an unknown type byte is fatal (UNKNOWN_FRAME_TYPE), checked before
/// the body arrives: a header alone gets the Error and the close.
#[test]
fn unknown_type_is_refused_from_the_header_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    // First frame of a connection.
    let mut client = RawClient::connect(server.addr);
    client.send_bytes(&[0, 0, 0, 40, 0x7f]).unwrap();
    match client.recv_timeout(Duration::from_secs(2)) {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, ErrorCode::UnknownFrameType as i32, "{e:?}");
            assert!(e.fatal);
        }
        other => panic!("expected UNKNOWN_FRAME_TYPE, got {other:?}"),
    }
    client.expect_closed();
    // The header split over two writes: the fifth byte decides.
    let mut client = RawClient::connect(server.addr);
    client.send_bytes(&[0, 0, 0, 40]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    client.send_bytes(&[0x7f]).unwrap();
    client.expect_error(ErrorCode::UnknownFrameType);
    client.expect_closed();
    // In a session, after a good frame that is answered first.
    let account = RawClient::register(server.addr);
    let (mut session, _) = RawClient::login(server.addr, &account);
    let mut bytes = Frame::Ping(pb::Ping { nonce: 7 }).to_bytes().to_vec();
    bytes.extend_from_slice(&[0, 0, 1, 0, 0x66]);
    session.send_bytes(&bytes).unwrap();
    match session.recv_timeout(Duration::from_secs(2)) {
        Some(Frame::Pong(p)) => assert_eq!(p.nonce, 7),
        other => panic!("expected the Pong first, got {other:?}"),
    }
    session.expect_error(ErrorCode::UnknownFrameType);
    session.expect_closed();
    // The server still serves.
    let (mut again, _) = RawClient::login(server.addr, &account);
    again.send(&Frame::Ping(pb::Ping { nonce: 8 }));
    assert!(matches!(again.recv(), Some(Frame::Pong(p)) if p.nonce == 8));
}

/// §4.2: an account is durable when Registered arrives; a crash right
/// after it loses nothing.
#[test]
fn an_account_is_durable_when_registered_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let accounts: Vec<_> = (0..5).map(|_| RawClient::register(server.addr)).collect();
    server.kill9();
    server.launch();
    for account in &accounts {
        let (mut client, welcome) = RawClient::login(server.addr, account);
        assert!(welcome.protocol_version >= 1);
        client.send(&Frame::Ping(pb::Ping { nonce: 1 }));
        assert!(matches!(client.recv(), Some(Frame::Pong(_))));
    }
}

fn register_frame() -> Frame {
    Frame::Register(pb::Register {
        protocol_version: 1,
        registration_token: String::new(),
    })
}

fn ping_pongs(client: &mut RawClient, nonce: u64) {
    client.send(&Frame::Ping(pb::Ping { nonce }));
    match client.recv_timeout(Duration::from_secs(2)) {
        Some(Frame::Pong(p)) => assert_eq!(p.nonce, nonce),
        other => panic!("expected Pong {nonce}, got {other:?}"),
    }
}

/// §4.1: before authentication, every frame but Register and Hello gets
/// NOT_AUTHENTICATED, a server-to-client type included, and also after
/// Registered; §3: in a session a server-to-client type, a Hello or a
/// Register gets UNEXPECTED_FRAME; a second Register gets UNEXPECTED_FRAME.
#[test]
fn frames_out_of_place_get_the_documented_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let welcome = Frame::Welcome(pb::Welcome::default());
    // A server-to-client type as the first frame.
    let mut client = RawClient::connect(server.addr);
    client.send(&welcome);
    client.expect_error(ErrorCode::NotAuthenticated);
    client.expect_closed();
    // Ping before authentication.
    let mut client = RawClient::connect(server.addr);
    client.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    client.expect_error(ErrorCode::NotAuthenticated);
    client.expect_closed();
    // After Registered, anything but Hello.
    let mut client = RawClient::connect(server.addr);
    client.send(&register_frame());
    assert!(matches!(client.recv(), Some(Frame::Registered(_))));
    client.send(&Frame::Ping(pb::Ping { nonce: 2 }));
    client.expect_error(ErrorCode::NotAuthenticated);
    client.expect_closed();
    // A second Register on one connection.
    let mut client = RawClient::connect(server.addr);
    client.send(&register_frame());
    assert!(matches!(client.recv(), Some(Frame::Registered(_))));
    client.send(&register_frame());
    client.expect_error(ErrorCode::UnexpectedFrame);
    client.expect_closed();
    // In a session: Register, Hello, a server-to-client type.
    let account = RawClient::register(server.addr);
    for frame in [register_frame(), common::hello(&account), welcome] {
        let (mut session, _) = RawClient::login(server.addr, &account);
        session.send(&frame);
        session.expect_error(ErrorCode::UnexpectedFrame);
        session.expect_closed();
    }
}

/// §4.6: an empty ReadReceipt is ignored; one naming a sender device that
/// does not exist (device 0, a device the account does not have, an
/// unknown user) gets UNKNOWN_RECIPIENT, non-fatal.
#[test]
fn read_receipts_name_an_existing_sender_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let read = |user: u64, device: u32, ids: Vec<u64>| {
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: user,
            sender_device_id: device,
            client_message_ids: ids,
        })
    };
    b.send(&read(alice.user, 1, vec![]));
    ping_pongs(&mut b, 1);
    for (user, device) in [
        (alice.user, 0),
        (alice.user, 2),
        (alice.user, 1 << 31),
        (999_999, 1),
    ] {
        b.send(&read(user, device, vec![1]));
        let error = b.expect_error(ErrorCode::UnknownRecipient);
        assert!(!error.fatal, "{error:?}");
    }
    ping_pongs(&mut b, 2);
}

/// §4.6: a ReadReceipt is relayed only for messages the reader got: ids of
/// a message stored for another recipient, or for the reader but not yet
/// sent to it, are dropped; the rest of the frame is relayed.
#[test]
fn read_receipts_are_relayed_only_for_messages_the_reader_got() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let shards = server.shards();
    let alice = RawClient::register_on_shard(server.addr, 0, shards);
    let bob = RawClient::register_on_shard(server.addr, shards - 1, shards);
    let carol = RawClient::register_on_shard(server.addr, shards - 1, shards);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let window = server.config.limits.delivery_window_messages as u64;
    // Bob gets 1 and 10.. (a window more than he is sent); Carol gets 2.
    a.send_message(bob.user, 1, b"one");
    a.send_message(carol.user, 2, b"two");
    for id in 10..10 + window {
        a.send_message(bob.user, id, b"more");
    }
    a.collect_acks(2 + window as usize);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let got: Vec<u64> = b
        .collect_delivers(window as usize)
        .iter()
        .map(|d| d.client_message_id)
        .collect();
    let unsent = 10 + window - 1;
    assert!(got.contains(&1) && !got.contains(&unsent), "{got:?}");
    let read = |ids: Vec<u64>| {
        Frame::ReadReceipt(pb::ReadReceipt {
            sender_user_id: alice.user,
            sender_device_id: 1,
            client_message_ids: ids,
        })
    };
    b.send(&read(vec![2]));
    b.send(&read(vec![unsent]));
    b.send(&read(vec![2, 1, unsent]));
    ping_pongs(&mut b, 1);
    let receipt = loop {
        match a.recv() {
            Some(Frame::Receipt(r)) => break r,
            Some(_) => continue,
            None => panic!("alice's connection closed"),
        }
    };
    assert_eq!(receipt.kind, pb::ReceiptKind::Read as i32);
    assert_eq!(receipt.client_message_ids, vec![1], "only what Bob got");
}

/// §4.4: an empty payload is stored and delivered; ServerAck and Deliver
/// carry the same timestamp; a retry with the same id and content is
/// answered with the original ServerAck, one with other content gets
/// DUPLICATE_ID_MISMATCH, and neither is stored again.
#[test]
fn empty_payloads_timestamps_and_retries_are_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send_message(bob.user, 1, b"");
    let (acks, _) = a.collect_acks(1);
    a.send_message(bob.user, 1, b"");
    let (retry, _) = a.collect_acks(1);
    assert_eq!(retry, acks, "the retry gets the original ServerAck");
    a.send_message(bob.user, 1, b"a different payload");
    let error = a.expect_error(ErrorCode::DuplicateIdMismatch);
    assert_eq!(error.client_message_id, 1);
    assert!(!error.fatal);
    // Another recipient on the same shard (one shard here would be simplest;
    // with 2 shards, Alice herself lands where she lands): only a recipient
    // homed with the original one can see the reuse.
    let carol = RawClient::register_on_shard(
        server.addr,
        switchboard::route::shard_for(bob.user, server.shards()).0,
        server.shards(),
    );
    a.send_message(carol.user, 1, b"");
    let error = a.expect_error(ErrorCode::DuplicateIdMismatch);
    assert_eq!(error.client_message_id, 1);
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let delivered = b.collect_delivers(1);
    assert!(delivered[0].payload.is_empty());
    assert_eq!(delivered[0].timestamp_ms, acks[0].timestamp_ms);
    assert_eq!(delivered[0].sequence, acks[0].server_sequence);
    b.ack(delivered[0].sequence);
    // Nothing else was stored: the next message is the next sequence.
    a.send_message(bob.user, 2, b"next");
    let next = b.collect_delivers(1);
    assert_eq!(next[0].sequence, delivered[0].sequence + 1);
    assert_eq!(next[0].client_message_id, 2);
}

/// §4.3: failed Hellos are limited per address for the whole server: on 2
/// shards, exactly 5 AUTH_FAILED, then RATE_LIMITED for every Hello, a
/// correct one included, until the delay has passed; then a correct Hello
/// is welcomed.
#[test]
fn failed_hellos_are_limited_per_address_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.server.shards = 2;
        c.limits.auth_failures_before_delay = 5;
        c.limits.auth_failure_delay_ms = 1_000;
    });
    let account = RawClient::register(server.addr);
    let mut wrong = account.clone();
    wrong.secret = bytes::Bytes::from(vec![0u8; 32]);
    let attempt = |account: &common::Account| {
        let mut client = RawClient::connect(server.addr);
        client.send(&common::hello(account));
        match client.recv_timeout(Duration::from_secs(5)) {
            Some(Frame::Error(e)) => Err((e.code, e.retry_after_ms)),
            Some(Frame::Welcome(_)) => Ok(()),
            other => panic!("expected Welcome or Error, got {other:?}"),
        }
    };
    let mut answers = Vec::new();
    for _ in 0..20 {
        answers.push(attempt(&wrong));
    }
    let failed = ErrorCode::AuthFailed as i32;
    let limited = ErrorCode::RateLimited as i32;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Err((code, _)) if i < 5 => assert_eq!(*code, failed, "attempt {i}: {answers:?}"),
            Err((code, after)) => {
                assert_eq!(*code, limited, "attempt {i}: {answers:?}");
                assert!((1..=1_000).contains(after), "attempt {i}: {answers:?}");
            }
            Ok(()) => panic!("a wrong secret was welcomed: {answers:?}"),
        }
    }
    // A correct Hello inside the delay is refused too.
    let Err((code, after)) = attempt(&account) else {
        panic!("welcomed inside the delay")
    };
    assert_eq!(code, limited);
    std::thread::sleep(Duration::from_millis(u64::from(after) + 50));
    assert_eq!(attempt(&account), Ok(()));
    // Both shards accepted some of these connections: the budget held
    // across them.
    let (_, metrics) = common::admin_get(server.admin, "/metrics");
    for shard in 0..2 {
        let accepted = common::metric_sum(
            &metrics,
            "switchboard_accepts_total",
            &format!("shard=\"{shard}\""),
        );
        assert!(accepted > 0.0, "shard {shard} accepted nothing");
    }
}

/// §4.4: the dedupe memory, payload digest included, is rebuilt from the
/// log after a kill -9.
#[test]
fn retries_are_recognised_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send_message(bob.user, 9, b"before the crash");
    let (acks, _) = a.collect_acks(1);
    drop(a);
    server.kill9();
    server.launch();
    let (mut a, _) = RawClient::login(server.addr, &alice);
    a.send_message(bob.user, 9, b"before the crash");
    assert_eq!(a.collect_acks(1).0, acks);
    a.send_message(bob.user, 9, b"after the crash");
    a.expect_error(ErrorCode::DuplicateIdMismatch);
}

/// §2, §4.5, §5: Welcome announces every limit a client must stay within,
/// and the "up to date" mark: the highest sequence pending at connect.
#[test]
fn welcome_announces_the_limits_and_the_up_to_date_mark() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let limits = &server.config.limits;
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (_, welcome) = RawClient::login(server.addr, &bob);
    assert_eq!(welcome.ids_per_frame_max, limits.ids_per_frame_max);
    assert_eq!(
        welcome.delivery_window_bytes,
        u64::from(limits.delivery_window_bytes)
    );
    assert_eq!(welcome.inbox_pending_through, 0, "nothing is pending");
    // Ten messages while Bob is away (in steps: Sends in flight are bounded).
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let mut last_seq = 0;
    for first in [1u64, 6] {
        for id in first..first + 5 {
            a.send_message(bob.user, id, b"while away");
        }
        let (acks, _) = a.collect_acks(5);
        last_seq = last_seq.max(acks.iter().map(|x| x.server_sequence).max().unwrap());
    }
    let (mut b, welcome) = RawClient::login(server.addr, &bob);
    assert_eq!(welcome.inbox_pending_through, last_seq);
    let mut seen = 0;
    while seen < welcome.inbox_pending_through {
        let d = b.collect_delivers(1).remove(0);
        seen = d.sequence;
        b.ack(d.sequence);
    }
    assert_eq!(seen, last_seq, "up to date at the mark");
    // Acknowledged: the next session has nothing pending.
    drop(b);
    let (_, welcome) = RawClient::login(server.addr, &bob);
    assert_eq!(welcome.inbox_pending_through, 0);
}
