//! Linked devices over real sockets against the real binary: link codes,
//! Link, the device list, removal (GoAway, revoked secret), the refusal of a
//! single payload to an account with companions, limits, bad codes and
//! their throttle, and a restart.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{hello, Account, Chat, RawClient, Server};
use switchboard::proto::{self, pb, ErrorCode, Frame, GoAwayReason, PROTOCOL_VERSION};

fn link_code(primary: &mut RawClient) -> pb::LinkCode {
    primary.send(&Frame::RequestLinkCode(pb::RequestLinkCode {}));
    match primary.recv() {
        Some(Frame::LinkCode(code)) => code,
        other => panic!("expected LinkCode, got {other:?}"),
    }
}

/// Sends Link on a new connection; returns its first answer and the client.
fn link(addr: SocketAddr, code: &str, name: &str) -> (Option<Frame>, RawClient) {
    let mut c = RawClient::connect(addr);
    c.send(&Frame::Link(pb::Link {
        protocol_version: PROTOCOL_VERSION,
        code: code.to_string(),
        device_name: name.to_string(),
    }));
    let answer = c.recv();
    (answer, c)
}

fn linked(addr: SocketAddr, code: &str, name: &str) -> Account {
    match link(addr, code, name).0 {
        Some(Frame::Registered(r)) => Account {
            user: r.user_id,
            device: r.device_id,
            secret: r.secret,
        },
        other => panic!("expected Registered, got {other:?}"),
    }
}

fn device_list(c: &mut RawClient) -> pb::DeviceList {
    c.send(&Frame::ListDevices(pb::ListDevices {}));
    match c.recv() {
        Some(Frame::DeviceList(list)) => list,
        other => panic!("expected DeviceList, got {other:?}"),
    }
}

fn ping(c: &mut RawClient, nonce: u64) {
    c.send(&Frame::Ping(pb::Ping { nonce }));
    assert_eq!(c.recv(), Some(Frame::Pong(pb::Pong { nonce })));
}

#[test]
fn a_primary_links_lists_and_removes_a_companion() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.server.shards = 2);
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let bob = RawClient::register(addr);
    let (mut primary, _) = RawClient::login(addr, &alice);

    let code = link_code(&mut primary);
    assert_eq!(code.code.len(), 20);
    let laptop = linked(addr, &code.code, "laptop");
    assert_eq!((laptop.user, laptop.device), (alice.user, 2));
    let (mut companion, welcome) = RawClient::login(addr, &laptop);
    assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);

    // The code was used up.
    let (answer, mut again) = link(addr, &code.code, "thief");
    assert!(
        matches!(&answer, Some(Frame::Error(e)) if e.code() == ErrorCode::LinkCodeInvalid && e.fatal),
        "{answer:?}"
    );
    again.expect_closed();

    let list = device_list(&mut companion);
    assert_eq!(list.version, 2);
    let ids: Vec<_> = list.devices.iter().map(|d| d.device_id).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(list.devices[1].name, "laptop");
    assert!(list.devices[0].linked_at_ms > 0 && list.devices[1].linked_at_ms > 0);
    assert_eq!(device_list(&mut primary), list);

    // Only the primary links; the companion's session goes on.
    companion.send(&Frame::RequestLinkCode(pb::RequestLinkCode {}));
    let refused = companion.expect_error(ErrorCode::NotPrimary);
    assert!(!refused.fatal);
    ping(&mut companion, 1);

    // One payload for an account with a companion is refused whole.
    let (mut sender, _) = RawClient::login(addr, &bob);
    sender.send_message(alice.user, 1, b"for every device");
    let mismatch = sender.expect_error(ErrorCode::DeviceMismatch);
    assert_eq!(mismatch.client_message_id, 1);
    assert_eq!(mismatch.missing_devices, vec![2]);
    assert_eq!(mismatch.device_list_version, 2);
    assert!(!mismatch.fatal);

    // Removal: the primary hears first, the companion gets GoAway and is
    // closed, its secret stops working.
    primary.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: 2 }));
    assert_eq!(
        primary.recv(),
        Some(Frame::DeviceRemoved(pb::DeviceRemoved {
            device_id: 2,
            version: 3
        }))
    );
    match companion.recv() {
        Some(Frame::GoAway(g)) => assert_eq!(g.reason(), GoAwayReason::DeviceRemoved),
        other => panic!("expected GoAway, got {other:?}"),
    }
    companion.expect_closed();
    let mut retry = RawClient::connect(addr);
    retry.send(&hello(&laptop));
    retry.expect_error(ErrorCode::AuthFailed);
    let list = device_list(&mut primary);
    assert_eq!(list.version, 3);
    assert_eq!(list.devices.len(), 1);

    // With the primary alone again, one payload is accepted.
    sender.send_message(alice.user, 2, b"just the phone");
    match sender.recv() {
        Some(Frame::ServerAck(ack)) => assert_eq!(ack.client_message_id, 2),
        other => panic!("expected ServerAck, got {other:?}"),
    }
    assert!(matches!(primary.recv(), Some(Frame::Deliver(d)) if d.client_message_id == 2));
}

#[test]
fn a_companion_unlinks_itself_and_the_primary_cannot_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let (mut primary, _) = RawClient::login(addr, &alice);
    let tablet = linked(addr, &link_code(&mut primary).code, "tablet");
    let (mut companion, _) = RawClient::login(addr, &tablet);

    for bad in [1, 9] {
        companion.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: bad }));
        assert!(!companion.expect_error(ErrorCode::UnknownDevice).fatal);
    }
    primary.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: 1 }));
    primary.expect_error(ErrorCode::UnknownDevice);

    companion.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: 2 }));
    assert_eq!(
        companion.recv(),
        Some(Frame::DeviceRemoved(pb::DeviceRemoved {
            device_id: 2,
            version: 3
        }))
    );
    assert!(
        matches!(companion.recv(), Some(Frame::GoAway(g)) if g.reason() == GoAwayReason::DeviceRemoved)
    );
    companion.expect_closed();
    ping(&mut primary, 2);
    // Device ids are never reused.
    let next = linked(addr, &link_code(&mut primary).code, "tablet again");
    assert_eq!(next.device, 3);
}

#[test]
fn limits_expiry_bad_codes_and_their_throttle() {
    let dir = tempfile::tempdir().unwrap();
    // Test bounds: 2 companions, codes live 2 s, 2 failures before delay.
    let server = Server::start(dir.path(), |_| {});
    let addr = server.addr;
    let limits = server.config.limits.clone();
    assert_eq!(limits.companions_max, 2);
    let alice = RawClient::register(addr);
    let (mut primary, _) = RawClient::login(addr, &alice);
    for n in 0..limits.companions_max {
        let account = linked(addr, &link_code(&mut primary).code, &format!("d{n}"));
        assert_eq!(account.device, 2 + n);
    }
    let (answer, mut c) = link(addr, &link_code(&mut primary).code, "one too many");
    assert!(
        matches!(&answer, Some(Frame::Error(e)) if e.code() == ErrorCode::TooManyDevices && e.fatal),
        "{answer:?}"
    );
    c.expect_closed();

    // An expired code: refused like an unknown one.
    primary.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: 2 }));
    assert!(matches!(primary.recv(), Some(Frame::DeviceRemoved(_))));
    let code = link_code(&mut primary);
    std::thread::sleep(Duration::from_millis(
        u64::from(limits.link_code_ttl_ms) + 200,
    ));
    let (answer, _) = link(addr, &code.code, "late");
    assert!(
        matches!(&answer, Some(Frame::Error(e)) if e.code() == ErrorCode::LinkCodeInvalid),
        "{answer:?}"
    );
    // (The test idle timeout is 3 s: keep the primary's session alive.)
    ping(&mut primary, 2);

    // Garbage codes count as failed logins of the address: after the
    // budget, RATE_LIMITED with a wait.
    let started = Instant::now();
    let mut limited = None;
    for attempt in 0..10 {
        let (answer, _) = link(addr, &format!("not a code {attempt}"), "x");
        match answer {
            Some(Frame::Error(e)) if e.code() == ErrorCode::RateLimited => {
                limited = Some(e);
                break;
            }
            Some(Frame::Error(e)) => assert_eq!(e.code(), ErrorCode::LinkCodeInvalid),
            other => panic!("expected an Error, got {other:?}"),
        }
    }
    let limited = limited.expect("the address was throttled");
    assert!(limited.retry_after_ms > 0 && limited.fatal);
    assert!(started.elapsed() < Duration::from_secs(20));
    // The server stays up for everyone else.
    ping(&mut primary, 3);
}

#[test]
fn links_survive_a_restart_and_last_seen_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| c.server.shards = 2);
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let (mut primary, _) = RawClient::login(addr, &alice);
    let phone2 = linked(addr, &link_code(&mut primary).code, "second phone");
    let (companion, _) = RawClient::login(addr, &phone2);
    drop(companion);
    // Last-seen times are written every 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = device_list(&mut primary);
        if list.devices.iter().all(|d| d.last_seen_ms > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last seen never recorded: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(primary);
    server.kill9();
    server.launch();
    let (mut companion, _) = RawClient::login(server.addr, &phone2);
    let list = device_list(&mut companion);
    assert_eq!(list.version, 2);
    assert_eq!(list.devices.len(), 2);
    assert_eq!(list.devices[1].name, "second phone");
    assert!(list.devices.iter().all(|d| d.last_seen_ms > 0));
}

#[test]
fn link_frames_out_of_place_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let addr = server.addr;
    let alice = RawClient::register(addr);
    // Link inside a session is a handshake frame: fatal.
    let (mut session, _) = RawClient::login(addr, &alice);
    session.send(&Frame::Link(pb::Link {
        protocol_version: PROTOCOL_VERSION,
        code: "00".into(),
        device_name: String::new(),
    }));
    assert!(session.expect_error(ErrorCode::UnexpectedFrame).fatal);
    session.expect_closed();
    // Device frames before authentication: NOT_AUTHENTICATED.
    let mut c = RawClient::connect(addr);
    c.send(&Frame::ListDevices(pb::ListDevices {}));
    c.expect_error(ErrorCode::NotAuthenticated);
    // A Link after a Register on the same connection.
    let mut c = RawClient::connect(addr);
    c.send(&Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: String::new(),
    }));
    assert!(matches!(c.recv(), Some(Frame::Registered(_))));
    c.send(&Frame::Link(pb::Link {
        protocol_version: PROTOCOL_VERSION,
        code: "00".into(),
        device_name: String::new(),
    }));
    c.expect_error(ErrorCode::UnexpectedFrame);
    // A malformed Link body.
    let mut c = RawClient::connect(addr);
    let mut bytes = vec![0, 0, 0, 3, proto::FrameType::Link as u8, 0xff, 0xff];
    bytes.truncate(7);
    c.send_bytes(&bytes).unwrap();
    c.expect_error(ErrorCode::MalformedFrame);
}

fn per_device_send(to: u64, id: u64, parts: &[(u32, &[u8])]) -> Frame {
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload: Default::default(),
        device_payloads: parts
            .iter()
            .map(|(device, payload)| pb::DevicePayload {
                device_id: *device,
                payload: bytes::Bytes::copy_from_slice(payload),
            })
            .collect(),
        ..Default::default()
    })
}

fn server_ack(c: &mut RawClient) -> pb::ServerAck {
    match c.recv() {
        Some(Frame::ServerAck(ack)) => ack,
        other => panic!("expected ServerAck, got {other:?}"),
    }
}

#[test]
fn a_payload_per_device_reaches_each_device_with_receipts_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| c.server.shards = 2);
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let bob = RawClient::register(addr);
    let (mut phone, _) = RawClient::login(addr, &alice);
    let laptop = linked(addr, &link_code(&mut phone).code, "laptop");
    let (mut sender, _) = RawClient::login(addr, &bob);

    // Sets that do not match are refused whole: missing, stale, repeated.
    for (parts, missing, stale) in [
        (vec![(1u32, &b"a"[..])], vec![2u32], vec![]),
        (vec![(1, &b"a"[..]), (3, &b"c"[..])], vec![2], vec![3]),
        (
            vec![(1, &b"a"[..]), (1, &b"a"[..]), (2, &b"b"[..])],
            vec![],
            vec![1],
        ),
    ] {
        sender.send(&per_device_send(alice.user, 9, &parts));
        let e = sender.expect_error(ErrorCode::DeviceMismatch);
        assert_eq!((e.missing_devices, e.stale_devices), (missing, stale));
        assert_eq!(
            (e.device_list_version, e.client_message_id, e.fatal),
            (2, 9, false)
        );
    }
    // One payload and per-device payloads together.
    let mut both = per_device_send(alice.user, 10, &[(1, b"a"), (2, b"b")]);
    if let Frame::Send(s) = &mut both {
        s.payload = bytes::Bytes::from_static(b"x");
    }
    sender.send(&both);
    sender.expect_error(ErrorCode::UnsupportedFeature);

    // The laptop is offline: its copy waits in its own inbox.
    sender.send(&per_device_send(
        alice.user,
        1,
        &[(2, b"for the laptop"), (1, b"for the phone")],
    ));
    let ack = server_ack(&mut sender);
    let delivered = phone.collect_delivers(1).remove(0);
    assert_eq!(&delivered.payload[..], b"for the phone");
    assert_eq!(ack.server_sequence, delivered.sequence);
    // A retry with the same payloads is the same message; other payloads
    // under the same id are refused.
    sender.send(&per_device_send(
        alice.user,
        1,
        &[(1, b"for the phone"), (2, b"for the laptop")],
    ));
    assert_eq!(server_ack(&mut sender), ack);
    sender.send(&per_device_send(
        alice.user,
        1,
        &[(1, b"changed"), (2, b"for the laptop")],
    ));
    sender.expect_error(ErrorCode::DuplicateIdMismatch);

    // Acknowledged, so it survives a kill -9.
    drop((phone, sender));
    server.kill9();
    server.launch();
    let addr = server.addr;
    let (mut laptop_c, _) = RawClient::login(addr, &laptop);
    let got = laptop_c.collect_delivers(1).remove(0);
    assert_eq!(&got.payload[..], b"for the laptop");
    assert_eq!((got.sender_user_id, got.client_message_id), (bob.user, 1));
    let (mut phone, _) = RawClient::login(addr, &alice);
    let again = phone.collect_delivers(1).remove(0);
    assert_eq!(&again.payload[..], b"for the phone");

    // One delivered receipt per device, each naming its device.
    let (mut sender, _) = RawClient::login(addr, &bob);
    laptop_c.ack(got.sequence);
    phone.ack(again.sequence);
    let mut by = Vec::new();
    while by.len() < 2 {
        match sender.recv() {
            Some(Frame::Receipt(r)) => {
                assert_eq!(r.client_message_ids, vec![1]);
                assert_eq!(r.by_user_id, alice.user);
                by.push(r.by_device_id);
                sender.ack(r.sequence);
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    by.sort();
    assert_eq!(by, vec![1, 2]);
}

#[test]
fn chat_links_a_device_sends_to_every_device_and_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.idle_timeout_ms = 60_000);
    let addr = server.addr;
    let profile = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (a, b, c) = (profile("a.cred"), profile("b.cred"), profile("c.cred"));

    let mut phone = Chat::start(addr, &["--profile", &a, "--register"]);
    let registered = phone.wait_for("registered: you are user");
    let alice: u64 = registered
        .split("user ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("user id in the registration line");
    phone.wait_for("connected.");
    phone.type_line("/link");
    let line = phone.wait_for("* link code ");
    let code = line
        .split("* link code ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the code")
        .to_string();

    let mut laptop = Chat::start(
        addr,
        &["--profile", &b, "--link", &code, "--device-name", "laptop"],
    );
    laptop.wait_for(&format!("linked: this is device 2 of user {alice}"));
    laptop.wait_for("connected.");

    let mut bob = Chat::start(addr, &["--profile", &c, "--register"]);
    bob.wait_for("connected.");
    bob.type_line(&format!("/msg {alice} hello both"));
    bob.wait_for(&format!("* user {alice} has 2 devices; sending to each"));
    bob.wait_for("✓ sent");
    phone.wait_for("hello both");
    laptop.wait_for("hello both");
    // Each device shows it and sends its receipts (whether ✓✓ waits for
    // both devices is the chat state's unit test).
    bob.wait_for("✓✓");

    // The laptop's own message: Bob gets it, and the phone a copy.
    let bob_id = bob
        .seen
        .iter()
        .find_map(|l| l.strip_prefix("registered: you are user "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("bob's user id")
        .to_string();
    laptop.type_line(&format!("/msg {bob_id} from the laptop"));
    bob.wait_for("from the laptop");
    phone.wait_for(&format!("(you → {bob_id}) from the laptop"));

    phone.type_line("/devices");
    phone.wait_for("(list version 2)");
    phone.wait_for("2 laptop");
    // Now the phone knows the laptop: its messages are copied there.
    phone.type_line(&format!("/msg {bob_id} from the phone"));
    bob.wait_for("from the phone");
    laptop.wait_for(&format!("(you → {bob_id}) from the phone"));
    phone.type_line("/remove 2");
    phone.wait_for("* device 2 removed (list version 3)");
    laptop.wait_for("removed from the account");
}

#[test]
fn removing_a_device_drops_its_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.server.shards = 1);
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let bob = RawClient::register(addr);
    let (mut phone, _) = RawClient::login(addr, &alice);
    let _laptop = linked(addr, &link_code(&mut phone).code, "laptop");
    let (mut sender, _) = RawClient::login(addr, &bob);
    for id in 1..=3 {
        sender.send(&per_device_send(
            alice.user,
            id,
            &[(1, b"phone"), (2, b"laptop")],
        ));
        server_ack(&mut sender);
    }
    // The phone takes its copies; the laptop, offline, keeps three.
    for d in phone.collect_delivers(3) {
        phone.ack(d.sequence);
    }
    // Bob takes the phone's three delivered receipts.
    let mut receipts = 0;
    while receipts < 3 {
        if let Some(Frame::Receipt(r)) = sender.recv() {
            sender.ack(r.sequence);
            receipts += 1;
        }
    }
    let depth = || {
        let (_, text) = common::admin_get(server.admin, "/metrics");
        common::metric_sum(&text, "switchboard_inbox_depth", "")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth() != 3.0 {
        assert!(Instant::now() < deadline, "inbox depth {} not 3", depth());
        ping(&mut phone, 9);
        std::thread::sleep(Duration::from_millis(100));
    }
    phone.send(&Frame::RemoveDevice(pb::RemoveDevice { device_id: 2 }));
    assert!(matches!(phone.recv(), Some(Frame::DeviceRemoved(_))));
    while depth() != 0.0 {
        assert!(Instant::now() < deadline, "inbox depth {} not 0", depth());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_device_sends_copies_to_its_own_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let addr = server.addr;
    let alice = RawClient::register(addr);
    let (mut phone, _) = RawClient::login(addr, &alice);
    let laptop = linked(addr, &link_code(&mut phone).code, "laptop");
    let (mut laptop_c, _) = RawClient::login(addr, &laptop);
    // The laptop's copy for the phone: its own device is not needed.
    laptop_c.send(&per_device_send(
        alice.user,
        1,
        &[(1, b"sent from the laptop")],
    ));
    server_ack(&mut laptop_c);
    let d = phone.collect_delivers(1).remove(0);
    assert_eq!((d.sender_user_id, d.sender_device_id), (alice.user, 2));
    assert_eq!(&d.payload[..], b"sent from the laptop");
    // The phone's copy must cover the laptop: one payload (for the primary,
    // the phone itself) is not enough.
    phone.send_message(alice.user, 2, b"note");
    let e = phone.expect_error(ErrorCode::DeviceMismatch);
    assert_eq!(e.missing_devices, vec![2]);
    phone.send(&per_device_send(
        alice.user,
        3,
        &[(2, b"sent from the phone")],
    ));
    assert_eq!(server_ack(&mut phone).client_message_id, 3);
    let d = laptop_c.collect_delivers(1).remove(0);
    assert_eq!(
        (d.sender_device_id, &d.payload[..]),
        (1, &b"sent from the phone"[..])
    );
}
