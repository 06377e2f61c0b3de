use super::*;
use crate::engine::testing::{device, user_on, Fixture};
use crate::engine::Event;
use crate::proto::pb;

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error(e) => Some(e.code()),
        _ => None,
    })
}

fn delivers(frames: &[Frame]) -> Vec<pb::Deliver> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Deliver(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// Creates a group of `members` (the first is the creator, admin) on a
/// one-shard engine, as the database would answer; returns its id.
fn create(fx: &mut Fixture, members: &[u64]) -> u64 {
    let creator = members[0];
    fx.frame(
        creator,
        100 + creator,
        Frame::CreateGroup(pb::CreateGroup {
            request_id: 7,
            name: "g".into(),
            member_user_ids: members[1..].to_vec(),
        }),
    );
    let Some(GroupOp::Create {
        session,
        creator: who,
        request_id,
        name,
        members: rows,
    }) = fx.host.group_ops.pop()
    else {
        panic!("a create for the database");
    };
    assert_eq!(who, device(creator));
    assert!(rows.contains(&(UserId(creator), true)));
    let row = GroupRow {
        id: 0xabc,
        name,
        version: 1,
        members: rows,
    };
    fx.handle(Event::Group(GroupDone::Created {
        session,
        creator: who,
        request_id,
        row,
    }));
    fx.commit();
    0xabc
}

fn send(fx: &mut Fixture, from: u64, id: u64, group: u64) {
    fx.frame(
        from,
        100 + from,
        Frame::Send(pb::Send {
            client_message_id: id,
            group_id: group,
            payload: bytes::Bytes::from_static(b"sender-key ciphertext"),
            ..Default::default()
        }),
    );
}

#[test]
fn a_group_message_reaches_every_member_device_but_the_sender() {
    let mut fx = Fixture::new(0, 1);
    for u in 1..=4 {
        fx.open(u, 100 + u);
    }
    let group = create(&mut fx, &[1, 2, 3]);
    let mut first = fx.host.take_frames(101);
    assert!(first.iter().any(|f| matches!(f, Frame::GroupInfo(i)
        if i.request_id == 7 && i.members.len() == 3 && i.version == 1)));
    // The creation is the group's first event, delivered to every member.
    for u in 1..=3 {
        let frames = if u == 1 {
            std::mem::take(&mut first)
        } else {
            fx.host.take_frames(100 + u)
        };
        let events = delivers(&frames);
        assert_eq!(events.len(), 1, "user {u}");
        assert_eq!(events[0].group_sequence, 1);
        assert_eq!(
            events[0].group_event.as_ref().map(|e| e.action()),
            Some(GroupAction::Create)
        );
    }
    send(&mut fx, 2, 50, group);
    fx.commit();
    let acks = fx.host.take_frames(102);
    assert!(acks.iter().any(|f| matches!(f, Frame::ServerAck(a)
        if a.client_message_id == 50 && a.server_sequence == 2)));
    for u in [1, 3] {
        let got = delivers(&fx.host.take_frames(100 + u));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].group_id, got[0].group_sequence), (group, 2));
        assert_eq!(got[0].sender_user_id, 2);
        assert_eq!(&got[0].payload[..], b"sender-key ciphertext");
    }
    assert!(delivers(&fx.host.take_frames(104)).is_empty());
    // A non-member and an unknown group are refused, nothing stored.
    send(&mut fx, 4, 51, group);
    assert_eq!(
        error_code(&fx.host.take_frames(104)),
        Some(ErrorCode::NotGroupMember)
    );
    send(&mut fx, 1, 52, 0xdead);
    assert_eq!(
        error_code(&fx.host.take_frames(101)),
        Some(ErrorCode::UnknownGroup)
    );
    assert_eq!(fx.engine.log().group_seq_stored(group), 2);
}

fn update(fx: &mut Fixture, from: u64, group: u64, action: GroupAction, users: &[u64]) {
    fx.frame(
        from,
        100 + from,
        Frame::UpdateGroup(pb::UpdateGroup {
            request_id: 9,
            group_id: group,
            action: action as i32,
            user_ids: users.to_vec(),
            name: String::new(),
        }),
    );
}

/// Answers the change in flight as the database would.
fn saved(fx: &mut Fixture, group: u64) {
    let Some(GroupOp::Save { group: g, .. }) = fx.host.group_ops.pop() else {
        panic!("a change for the database");
    };
    assert_eq!(g, group);
    fx.handle(Event::Group(GroupDone::Saved { group, ok: true }));
    fx.commit();
}

#[test]
fn admin_rules_and_a_removed_member_gets_the_removal_then_nothing() {
    let mut fx = Fixture::new(0, 1);
    for u in 1..=4 {
        fx.open(u, 100 + u);
    }
    let group = create(&mut fx, &[1, 2, 3]);
    fx.host.frames.clear();
    // Only admins add or remove; nobody names a non-member.
    update(&mut fx, 2, group, GroupAction::Add, &[4]);
    assert_eq!(
        error_code(&fx.host.take_frames(102)),
        Some(ErrorCode::NotGroupAdmin)
    );
    update(&mut fx, 1, group, GroupAction::Remove, &[4]);
    assert_eq!(
        error_code(&fx.host.take_frames(101)),
        Some(ErrorCode::NotGroupMember)
    );
    update(&mut fx, 1, group, GroupAction::Add, &[4, 99]);
    assert_eq!(
        error_code(&fx.host.take_frames(101)),
        Some(ErrorCode::UnknownRecipient)
    );
    assert!(fx.host.group_ops.is_empty());
    // A send racing with a removal: the removal waits for the database,
    // the send taken meanwhile goes to the old membership.
    update(&mut fx, 1, group, GroupAction::Remove, &[3]);
    send(&mut fx, 2, 60, group);
    saved(&mut fx, group);
    send(&mut fx, 2, 61, group);
    fx.commit();
    let three = delivers(&fx.host.take_frames(103));
    let seqs: Vec<(u64, bool)> = three
        .iter()
        .map(|d| (d.group_sequence, d.group_event.is_some()))
        .collect();
    assert_eq!(seqs, vec![(2, false), (3, true)]);
    assert_eq!(
        three[1].group_event.as_ref().unwrap().action(),
        GroupAction::Remove
    );
    let one: Vec<u64> = delivers(&fx.host.take_frames(101))
        .iter()
        .map(|d| d.group_sequence)
        .collect();
    assert_eq!(one, vec![2, 3, 4]);
    // The last admin leaving makes the lowest member an admin.
    update(&mut fx, 1, group, GroupAction::Leave, &[]);
    saved(&mut fx, group);
    let two = delivers(&fx.host.take_frames(102));
    let actions: Vec<GroupAction> = two
        .iter()
        .filter_map(|d| d.group_event.as_ref().map(|e| e.action()))
        .collect();
    assert_eq!(
        actions,
        vec![
            GroupAction::Remove,
            GroupAction::Leave,
            GroupAction::Promote
        ]
    );
    fx.frame(
        2,
        102,
        Frame::GetGroup(pb::GetGroup {
            request_id: 3,
            group_id: group,
        }),
    );
    let info = fx.host.take_frames(102);
    assert!(matches!(info.as_slice(), [Frame::GroupInfo(i)]
        if i.members == vec![pb::GroupMember { user_id: 2, admin: true }] && i.version == 3));
}

#[test]
fn the_home_shard_forwards_once_durable_and_a_repeat_is_only_answered() {
    let shards = 2;
    let home_id = (1..u64::MAX)
        .find(|&g| shard_for(g, shards) == ShardId(0))
        .unwrap();
    let mut home = Fixture::new(0, shards);
    let mut other = Fixture::new(1, shards);
    let (a, b) = (user_on(0, shards, 0), user_on(1, shards, 0));
    home.engine.load_groups(vec![GroupRow {
        id: home_id,
        name: "g".into(),
        version: 1,
        members: vec![(UserId(a), true), (UserId(b), false)],
    }]);
    home.open(a, 100 + a);
    other.open(b, 100 + b);
    home.send(a, 100 + a, 1, 0, b"");
    home.host.frames.clear();
    send(&mut home, a, 70, home_id);
    assert!(
        home.host.requests.is_empty(),
        "nothing leaves before the commit"
    );
    home.commit();
    let (target, request) = home.host.requests.pop().expect("forwarded");
    assert_eq!(target, ShardId(1));
    let Request::GroupStore(store) = request else {
        panic!("a group store");
    };
    assert_eq!(store.members, vec![UserId(b)]);
    let again = Request::GroupStore(Box::new(Store {
        members: store.members.clone(),
        payload: store.payload.clone(),
        ..*store
    }));
    other.handle(Event::Request(Request::GroupStore(store)));
    other.commit();
    other.handle(Event::Request(again));
    other.commit();
    let got = delivers(&other.host.take_frames(100 + b));
    assert_eq!(got.len(), 1, "stored once");
    assert_eq!(got[0].group_sequence, 1);
    let relayed: Vec<_> = other
        .host
        .replies
        .iter()
        .filter(|(_, r)| matches!(r, Reply::Relayed { .. }))
        .collect();
    assert_eq!(relayed.len(), 2, "each copy answered");
    assert_eq!(other.engine.log().group_seq_stored(home_id), 1);
}
