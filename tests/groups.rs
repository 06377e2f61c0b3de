//! Groups over real sockets against the real binary: create, add, remove,
//! leave, admin rules, one order for every member device across two shards
//! with members offline, sends racing with a removal, bad inputs, and a
//! kill -9 with acknowledged group messages still to deliver.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::{Account, RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame, GroupAction};

fn create(c: &mut RawClient, request_id: u64, name: &str, members: &[u64]) -> pb::GroupInfo {
    c.send(&Frame::CreateGroup(pb::CreateGroup {
        request_id,
        name: name.into(),
        member_user_ids: members.to_vec(),
    }));
    expect_info(c, request_id)
}

/// Reads until the GroupInfo answering `request_id` (acking Delivers on
/// the way, which are the group's events).
fn expect_info(c: &mut RawClient, request_id: u64) -> pb::GroupInfo {
    expect_info_noting(c, request_id, &mut Seen::new())
}

/// `expect_info`, noting the group Delivers read on the way in `seen`.
fn expect_info_noting(c: &mut RawClient, request_id: u64, seen: &mut Seen) -> pb::GroupInfo {
    loop {
        match c.recv() {
            Some(Frame::GroupInfo(info)) if info.request_id == request_id => return info,
            Some(Frame::Deliver(d)) => {
                c.ack(d.sequence);
                note(seen, &d);
            }
            Some(Frame::Receipt(r)) => c.ack(r.sequence),
            other => panic!("expected GroupInfo {request_id}, got {other:?}"),
        }
    }
}

/// Reads until an Error for `request_id`, acking what comes before it.
fn expect_refusal(c: &mut RawClient, request_id: u64, code: ErrorCode) {
    loop {
        match c.recv() {
            Some(Frame::Error(e)) if e.client_message_id == request_id => {
                assert_eq!(e.code(), code, "{e:?}");
                assert!(!e.fatal);
                return;
            }
            Some(Frame::Deliver(d)) => c.ack(d.sequence),
            Some(Frame::Receipt(r)) => c.ack(r.sequence),
            other => panic!("expected Error {code:?} for {request_id}, got {other:?}"),
        }
    }
}

fn update(c: &mut RawClient, request_id: u64, group: u64, action: GroupAction, users: &[u64]) {
    c.send(&Frame::UpdateGroup(pb::UpdateGroup {
        request_id,
        group_id: group,
        action: action as i32,
        user_ids: users.to_vec(),
        name: String::new(),
    }));
}

fn group_send(c: &mut RawClient, group: u64, id: u64, payload: &[u8]) {
    c.send(&Frame::Send(pb::Send {
        client_message_id: id,
        group_id: group,
        payload: bytes::Bytes::copy_from_slice(payload),
        ..Default::default()
    }));
}

/// What one member device saw of one group: group sequence → (sender,
/// client id or event action).
type Seen = BTreeMap<u64, (u64, String)>;

fn note(seen: &mut Seen, d: &pb::Deliver) {
    let what = match &d.group_event {
        Some(e) => format!("{:?} {:?}", e.action(), e.user_ids),
        None => format!("message {}", d.client_message_id),
    };
    let previous = seen.insert(d.group_sequence, (d.sender_user_id, what));
    assert!(
        previous.is_none(),
        "group sequence {} twice",
        d.group_sequence
    );
}

/// Reads group Delivers (acking each) until the member has seen group
/// sequence `through`; other frames are acked and skipped.
fn read_group(c: &mut RawClient, group: u64, through: u64, seen: &mut Seen) {
    while seen.keys().next_back().copied().unwrap_or(0) < through {
        match c.recv() {
            Some(Frame::Deliver(d)) => {
                c.ack(d.sequence);
                if d.group_id == group {
                    let what = match &d.group_event {
                        Some(e) => format!("{:?} {:?}", e.action(), e.user_ids),
                        None => format!("message {}", d.client_message_id),
                    };
                    let previous = seen.insert(d.group_sequence, (d.sender_user_id, what));
                    assert!(
                        previous.is_none(),
                        "group sequence {} twice",
                        d.group_sequence
                    );
                }
            }
            Some(Frame::Receipt(r)) => c.ack(r.sequence),
            Some(Frame::ServerAck(_)) => {}
            other => panic!("expected a group Deliver, got {other:?}"),
        }
    }
}

fn login(addr: SocketAddr, a: &Account) -> RawClient {
    RawClient::login(addr, a).0
}

#[test]
fn a_large_group_across_two_shards_gives_every_member_one_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.limits.group_members_max = 1_024;
        c.limits.delivery_window_messages = 64;
        c.limits.ids_per_frame_max = 1_024;
        c.limits.connections_per_shard_max = 4_096;
        c.limits.sends_in_flight_max = 64;
        c.limits.idle_timeout_ms = 120_000;
    });
    assert_eq!(server.shards(), 2);
    let accounts: Vec<Account> = (0..1_024)
        .map(|_| RawClient::register(server.addr))
        .collect();
    let ids: Vec<u64> = accounts.iter().map(|a| a.user).collect();
    // Every tenth member stays offline until the end.
    let offline = |i: usize| i % 10 == 9;
    let mut clients: Vec<Option<RawClient>> = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| (!offline(i)).then(|| login(server.addr, a)))
        .collect();
    let mut sender_seen: BTreeMap<usize, Seen> = BTreeMap::new();
    let info = {
        let creator = clients[0].as_mut().unwrap();
        creator.send(&Frame::CreateGroup(pb::CreateGroup {
            request_id: 1,
            name: "everyone".into(),
            member_user_ids: ids[1..].to_vec(),
        }));
        expect_info_noting(creator, 1, sender_seen.entry(0).or_default())
    };
    assert_eq!(info.members.len(), 1_024);
    let group = info.group_id;
    // Three members send interleaved, 10 messages each.
    let senders = [0usize, 1, 2];
    for round in 0..10u64 {
        for &s in &senders {
            group_send(
                clients[s].as_mut().unwrap(),
                group,
                1_000 + round,
                b"ciphertext",
            );
        }
    }
    let mut acked = 0;
    for &s in &senders {
        let c = clients[s].as_mut().unwrap();
        let seen = sender_seen.entry(s).or_default();
        let mut mine = 0;
        while mine < 10 {
            match c.recv() {
                Some(Frame::ServerAck(_)) => mine += 1,
                Some(Frame::Deliver(d)) => {
                    c.ack(d.sequence);
                    note(seen, &d);
                }
                Some(Frame::Receipt(r)) => c.ack(r.sequence),
                Some(Frame::GroupInfo(_)) => {}
                other => panic!("expected ServerAck, got {other:?}"),
            }
        }
        acked += mine;
    }
    assert_eq!(acked, 30);
    // 1 creation event + 30 messages: group sequences 1..=31.
    let mut reference: Option<Seen> = None;
    let mut check = |i: usize, seen: Seen| {
        // A sender does not get its own messages: compare the rest.
        let mine = senders.contains(&i).then(|| ids[i]);
        let others: Seen = match &reference {
            Some(r) => r
                .iter()
                .filter(|(_, (sender, what))| Some(*sender) != mine || !what.starts_with("message"))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            None => seen.clone(),
        };
        if reference.is_none() && mine.is_none() {
            assert_eq!(seen.len(), 31, "member {i}");
            reference = Some(seen);
        } else if reference.is_some() {
            assert_eq!(seen, others, "member {i} saw another order");
        }
    };
    for i in (3..1_024).chain(0..3) {
        if let Some(c) = clients[i].as_mut() {
            let mut seen = sender_seen.remove(&i).unwrap_or_default();
            let count = if senders.contains(&i) { 21 } else { 31 };
            read_group_upto(c, group, count, &mut seen);
            check(i, seen);
        }
    }
    drop(clients);
    for (i, a) in accounts.iter().enumerate().filter(|(i, _)| offline(*i)) {
        let mut c = login(server.addr, a);
        let mut seen = Seen::new();
        read_group(&mut c, group, 31, &mut seen);
        check(i, seen);
    }
}

/// `read_group` for a member that may not see the last sequences (they
/// are its own messages): reads until it has `count` entries.
fn read_group_upto(c: &mut RawClient, group: u64, count: usize, seen: &mut Seen) {
    while seen.len() < count {
        let before = seen.len();
        let through = seen.keys().next_back().copied().unwrap_or(0) + 1;
        read_group(c, group, through, seen);
        assert!(seen.len() > before);
    }
}

#[test]
fn membership_changes_admin_rules_and_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.group_members_max = 4);
    let a: Vec<Account> = (0..6).map(|_| RawClient::register(server.addr)).collect();
    let mut c: Vec<RawClient> = a.iter().map(|x| login(server.addr, x)).collect();
    let u = |i: usize| a[i].user;
    // Over the limit, unknown users.
    c[0].send(&Frame::CreateGroup(pb::CreateGroup {
        request_id: 1,
        name: "big".into(),
        member_user_ids: vec![u(1), u(2), u(3), u(4)],
    }));
    expect_refusal(&mut c[0], 1, ErrorCode::GroupFull);
    c[0].send(&Frame::CreateGroup(pb::CreateGroup {
        request_id: 2,
        name: "ghosts".into(),
        member_user_ids: vec![u(1), 999_999],
    }));
    expect_refusal(&mut c[0], 2, ErrorCode::UnknownRecipient);
    let info = create(&mut c[0], 3, "climbing", &[u(1), u(2)]);
    let g = info.group_id;
    assert_eq!(info.version, 1);
    assert_eq!(info.members, {
        let mut m: Vec<pb::GroupMember> = [0, 1, 2]
            .iter()
            .map(|&i| pb::GroupMember {
                user_id: u(i),
                admin: i == 0,
            })
            .collect();
        m.sort_by_key(|m| m.user_id);
        m
    });
    // Non-admins do not add; non-members neither read nor send; unknown
    // groups are unknown.
    update(&mut c[1], 10, g, GroupAction::Add, &[u(3)]);
    expect_refusal(&mut c[1], 10, ErrorCode::NotGroupAdmin);
    c[3].send(&Frame::GetGroup(pb::GetGroup {
        request_id: 11,
        group_id: g,
    }));
    expect_refusal(&mut c[3], 11, ErrorCode::NotGroupMember);
    group_send(&mut c[3], g, 12, b"let me in");
    expect_refusal(&mut c[3], 12, ErrorCode::NotGroupMember);
    group_send(&mut c[0], g ^ 1, 13, b"nowhere");
    expect_refusal(&mut c[0], 13, ErrorCode::UnknownGroup);
    update(&mut c[0], 14, g, GroupAction::Add, &[u(3), u(4)]);
    expect_refusal(&mut c[0], 14, ErrorCode::GroupFull);
    // A Send naming a group and a recipient is refused.
    c[0].send(&Frame::Send(pb::Send {
        client_message_id: 15,
        group_id: g,
        recipient_user_id: u(1),
        ..Default::default()
    }));
    expect_refusal(&mut c[0], 15, ErrorCode::UnsupportedFeature);
    // Add, promote, remove; the removed member gets the removal, then
    // nothing sent after it.
    update(&mut c[0], 20, g, GroupAction::Add, &[u(3)]);
    assert_eq!(expect_info(&mut c[0], 20).members.len(), 4);
    update(&mut c[0], 21, g, GroupAction::Promote, &[u(1)]);
    assert_eq!(expect_info(&mut c[0], 21).version, 3);
    update(&mut c[1], 22, g, GroupAction::Remove, &[u(2)]);
    let after = expect_info(&mut c[1], 22);
    assert!(after.members.iter().all(|m| m.user_id != u(2)));
    group_send(&mut c[1], g, 23, b"after the removal");
    loop {
        match c[1].recv() {
            Some(Frame::ServerAck(ack)) if ack.client_message_id == 23 => {
                assert_eq!(ack.server_sequence, 5);
                break;
            }
            Some(Frame::Deliver(d)) => c[1].ack(d.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    }
    let mut seen = Seen::new();
    read_group(&mut c[2], g, 4, &mut seen);
    let events: Vec<&str> = seen.values().map(|(_, w)| w.as_str()).collect();
    assert_eq!(events.len(), 4);
    assert!(events[3].starts_with("Remove"), "{events:?}");
    c[2].send(&Frame::Ping(pb::Ping { nonce: 5 }));
    assert_eq!(c[2].recv(), Some(Frame::Pong(pb::Pong { nonce: 5 })));
    let mut seen3 = Seen::new();
    read_group(&mut c[3], g, 5, &mut seen3);
    assert_eq!(seen3[&5], (u(1), "message 23".to_string()));
    // A member's message, then it leaves: a retry of that message still
    // gets its ServerAck; a new one is refused.
    group_send(&mut c[3], g, 29, b"before leaving");
    let first = loop {
        match c[3].recv() {
            Some(Frame::ServerAck(ack)) if ack.client_message_id == 29 => break ack,
            Some(Frame::Deliver(d)) => c[3].ack(d.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    };
    update(&mut c[3], 30, g, GroupAction::Leave, &[]);
    expect_info(&mut c[3], 30);
    group_send(&mut c[3], g, 29, b"before leaving");
    loop {
        match c[3].recv() {
            Some(Frame::ServerAck(ack)) => {
                assert_eq!(ack, first, "the retry gets the first answer");
                break;
            }
            Some(Frame::Deliver(d)) => c[3].ack(d.sequence),
            other => panic!("expected the same ServerAck, got {other:?}"),
        }
    }
    group_send(&mut c[3], g, 31, b"gone");
    expect_refusal(&mut c[3], 31, ErrorCode::NotGroupMember);
    // A client sending a server's frame is still closed.
    c[4].send(&Frame::GroupInfo(pb::GroupInfo::default()));
    c[4].expect_error(ErrorCode::UnexpectedFrame);
    c[4].expect_closed();
}

#[test]
fn acknowledged_group_messages_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| c.limits.delivery_window_messages = 64);
    let a: Vec<Account> = (0..8).map(|_| RawClient::register(server.addr)).collect();
    let others: Vec<u64> = a[1..].iter().map(|x| x.user).collect();
    let mut sender = login(server.addr, &a[0]);
    let g = create(&mut sender, 1, "offline", &others).group_id;
    for id in 0..40u64 {
        group_send(&mut sender, g, 100 + id, b"durable");
    }
    let mut acked = 0;
    while acked < 40 {
        match sender.recv() {
            Some(Frame::ServerAck(_)) => acked += 1,
            Some(Frame::Deliver(d)) => sender.ack(d.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    }
    server.kill9();
    server.launch();
    // The group is still there, its order goes on.
    let mut sender = login(server.addr, &a[0]);
    sender.send(&Frame::GetGroup(pb::GetGroup {
        request_id: 2,
        group_id: g,
    }));
    assert_eq!(expect_info(&mut sender, 2).members.len(), 8);
    group_send(&mut sender, g, 999, b"after the restart");
    loop {
        match sender.recv() {
            Some(Frame::ServerAck(ack)) if ack.client_message_id == 999 => {
                assert_eq!(ack.server_sequence, 42);
                break;
            }
            Some(Frame::Deliver(d)) => sender.ack(d.sequence),
            Some(Frame::Receipt(r)) => sender.ack(r.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    }
    for member in &a[1..] {
        let mut c = login(server.addr, member);
        let mut seen = Seen::new();
        read_group(&mut c, g, 42, &mut seen);
        assert_eq!(seen.len(), 42, "member {}", member.user);
    }
    // Every member device's ack reached the sender as a delivered
    // receipt, batched: many members' receipts to a frame.
    let mut owed: std::collections::BTreeSet<(u64, u64)> = a[1..]
        .iter()
        .flat_map(|m| (100..140u64).chain([999]).map(move |id| (m.user, id)))
        .collect();
    let entries = owed.len();
    let mut frames = 0;
    while !owed.is_empty() {
        match sender.recv() {
            Some(Frame::Receipt(r)) => {
                sender.ack(r.sequence);
                frames += 1;
                if r.by_user_ids.is_empty() {
                    for id in &r.client_message_ids {
                        owed.remove(&(r.by_user_id, *id));
                    }
                } else {
                    assert_eq!(r.by_user_ids.len(), r.client_message_ids.len());
                    assert_eq!(r.by_device_ids.len(), r.client_message_ids.len());
                    assert_eq!((r.by_user_id, r.by_device_id), (0, 0));
                    for (by, id) in r.by_user_ids.iter().zip(&r.client_message_ids) {
                        owed.remove(&(*by, *id));
                    }
                }
            }
            Some(Frame::Deliver(d)) => sender.ack(d.sequence),
            other => panic!("expected a Receipt, got {other:?}"),
        }
    }
    assert!(
        frames * 4 <= entries,
        "{frames} receipt frames for {entries} member receipts"
    );
}

#[test]
fn a_kill_9_mid_load_loses_no_acknowledged_group_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| {
        c.limits.delivery_window_messages = 64;
        c.limits.sends_in_flight_max = 64;
        c.limits.idle_timeout_ms = 60_000;
    });
    let a: Vec<Account> = (0..12).map(|_| RawClient::register(server.addr)).collect();
    let others: Vec<u64> = a[1..].iter().map(|x| x.user).collect();
    let mut sender = login(server.addr, &a[0]);
    let g = create(&mut sender, 1, "crash", &others).group_id;
    // Half the members stay online and read as messages come; the kill
    // lands while sends are in flight.
    let mut online: Vec<RawClient> = a[1..7].iter().map(|x| login(server.addr, x)).collect();
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for id in 0..300u64 {
        group_send(&mut sender, g, 10_000 + id, format!("m{id}").as_bytes());
    }
    while acked.len() < 120 {
        match sender.recv() {
            Some(Frame::ServerAck(ack)) => {
                acked.insert(ack.client_message_id, ack.server_sequence);
            }
            Some(Frame::Deliver(d)) => sender.ack(d.sequence),
            Some(Frame::Receipt(r)) => sender.ack(r.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    }
    // Some members read part of it before the crash (and may get some of
    // it again after: acks not yet durable).
    let mut before: Vec<Seen> = vec![Seen::new(); a.len()];
    for (i, c) in online.iter_mut().enumerate().take(3) {
        read_group(c, g, 20, &mut before[i + 1]);
    }
    server.kill9();
    drop(online);
    server.launch();
    let last = *acked.values().max().unwrap();
    for (i, member) in a.iter().enumerate().skip(1) {
        let mut c = login(server.addr, member);
        let mut seen = Seen::new();
        read_group(&mut c, g, last, &mut seen);
        for (seq, what) in &before[i] {
            let again = seen.insert(*seq, what.clone());
            assert!(
                again.is_none_or(|w| &w == what),
                "group sequence {seq} changed"
            );
        }
        for (id, seq) in &acked {
            assert_eq!(
                seen.get(seq),
                Some(&(a[0].user, format!("message {id}"))),
                "member {} lacks acknowledged message {id} (group sequence {seq})",
                member.user
            );
        }
    }
}

#[test]
fn a_removal_racing_with_sends_lands_on_one_side_for_every_member() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.limits.delivery_window_messages = 64;
        c.limits.sends_in_flight_max = 64;
        c.limits.idle_timeout_ms = 60_000;
    });
    let a: Vec<Account> = (0..6).map(|_| RawClient::register(server.addr)).collect();
    let others: Vec<u64> = a[1..].iter().map(|x| x.user).collect();
    let mut admin = login(server.addr, &a[0]);
    let mut reference = Seen::new();
    admin.send(&Frame::CreateGroup(pb::CreateGroup {
        request_id: 1,
        name: "race".into(),
        member_user_ids: others,
    }));
    let g = expect_info_noting(&mut admin, 1, &mut reference).group_id;
    let mut sender = login(server.addr, &a[1]);
    // The sender streams while the admin removes member 2 and adds it back.
    for id in 0..60u64 {
        group_send(&mut sender, g, 500 + id, b"racing");
        if id == 20 {
            update(&mut admin, 2, g, GroupAction::Remove, &[a[2].user]);
        }
        if id == 40 {
            update(&mut admin, 3, g, GroupAction::Add, &[a[2].user]);
        }
    }
    let mut acked = BTreeMap::new();
    while acked.len() < 60 {
        match sender.recv() {
            Some(Frame::ServerAck(ack)) => {
                acked.insert(ack.client_message_id, ack.server_sequence);
            }
            Some(Frame::Deliver(d)) => sender.ack(d.sequence),
            Some(Frame::Receipt(r)) => sender.ack(r.sequence),
            other => panic!("expected ServerAck, got {other:?}"),
        }
    }
    // The two answers (in either order: each names its request), and the
    // group's messages read meanwhile.
    let mut answered = Vec::new();
    while answered.len() < 2 {
        match admin.recv() {
            Some(Frame::GroupInfo(info)) => answered.push(info.request_id),
            Some(Frame::Deliver(d)) => {
                admin.ack(d.sequence);
                note(&mut reference, &d);
            }
            Some(Frame::Receipt(r)) => admin.ack(r.sequence),
            other => panic!("expected GroupInfo, got {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, vec![2, 3]);
    let last = 1 + 60 + 2;
    // Every member but the removed one saw all 63 group sequences, the
    // same message at each.
    read_group(&mut admin, g, last, &mut reference);
    assert_eq!(reference.len() as u64, last);
    let removal = *reference
        .iter()
        .find(|(_, (_, w))| w.starts_with("Remove"))
        .unwrap()
        .0;
    let readd = *reference
        .iter()
        .find(|(_, (_, w))| w.starts_with("Add"))
        .unwrap()
        .0;
    assert!(removal < readd);
    for member in &a[3..] {
        let mut c = login(server.addr, member);
        let mut seen = Seen::new();
        read_group(&mut c, g, last, &mut seen);
        assert_eq!(seen, reference, "member {}", member.user);
    }
    // The removed member: everything up to its removal (the removal
    // included), nothing between it and the re-add, everything after.
    let mut c = login(server.addr, &a[2]);
    let mut seen = Seen::new();
    read_group(&mut c, g, last, &mut seen);
    let expected: Seen = reference
        .iter()
        .filter(|(seq, _)| **seq <= removal || **seq >= readd)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    assert_eq!(seen, expected);
    // The sender's acks name the same places.
    for (id, seq) in &acked {
        assert_eq!(reference[seq], (a[1].user, format!("message {id}")));
    }
}
