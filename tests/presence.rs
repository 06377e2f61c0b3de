//! Presence, last seen and typing over real sockets against the real
//! binary: followers hear online / offline (after the grace period, not for
//! a flap), last seen and its privacy rule, last seen across a restart,
//! typing to online devices only and its rate limit, bad inputs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Account, RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame, LastSeenVisibility, TypingState};

fn login(addr: SocketAddr, a: &Account) -> RawClient {
    RawClient::login(addr, a).0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn subscribe(c: &mut RawClient, users: &[u64]) {
    c.send(&Frame::SubscribePresence(pb::SubscribePresence {
        user_ids: users.to_vec(),
    }));
}

/// The next PresenceUpdate (other frames are skipped).
fn next_update(c: &mut RawClient) -> pb::PresenceUpdate {
    loop {
        match c.recv() {
            Some(Frame::PresenceUpdate(u)) => return u,
            Some(Frame::Pong(_)) => {}
            other => panic!("expected PresenceUpdate, got {other:?}"),
        }
    }
}

/// Asserts nothing arrives for `quiet` (a Ping answered closes the wait).
fn nothing_for(c: &mut RawClient, quiet: Duration) {
    std::thread::sleep(quiet);
    c.send(&Frame::Ping(pb::Ping { nonce: 77 }));
    assert_eq!(c.recv(), Some(Frame::Pong(pb::Pong { nonce: 77 })));
}

fn set_privacy(c: &mut RawClient, hidden: bool) {
    let last_seen = if hidden {
        LastSeenVisibility::Nobody
    } else {
        LastSeenVisibility::Everyone
    } as i32;
    c.send(&Frame::SetPrivacy(pb::SetPrivacy { last_seen }));
    loop {
        match c.recv() {
            Some(Frame::Privacy(p)) => {
                assert_eq!(p.last_seen, last_seen);
                return;
            }
            Some(Frame::PresenceUpdate(_)) => {}
            other => panic!("expected Privacy, got {other:?}"),
        }
    }
}

#[test]
fn followers_hear_online_offline_after_the_grace_and_last_seen() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| {
        c.limits.presence_grace_ms = 300;
        c.limits.idle_timeout_ms = 60_000;
    });
    let grace = Duration::from_millis(300);
    // Several followers so some sit on the other shard than the followed.
    let b = RawClient::register(server.addr);
    let followers: Vec<Account> = (0..4).map(|_| RawClient::register(server.addr)).collect();
    let mut fs: Vec<RawClient> = followers.iter().map(|a| login(server.addr, a)).collect();
    for f in fs.iter_mut() {
        subscribe(f, &[b.user, 999_999]);
        let first = next_update(f);
        assert_eq!(
            (first.user_id, first.online, first.last_seen_ms),
            (b.user, false, 0)
        );
    }
    // B comes online: every follower hears it.
    let mut cb = login(server.addr, &b);
    for f in fs.iter_mut() {
        let u = next_update(f);
        assert_eq!((u.user_id, u.online), (b.user, true));
    }
    // A flap shorter than the grace period: nobody hears anything.
    drop(cb);
    std::thread::sleep(Duration::from_millis(50));
    cb = login(server.addr, &b);
    nothing_for(&mut fs[0], grace * 2);
    // Gone for good: offline after the grace period, last seen when it left.
    let left = now_ms();
    drop(cb);
    let started = Instant::now();
    for f in fs.iter_mut() {
        let u = next_update(f);
        assert_eq!((u.user_id, u.online), (b.user, false));
        assert!(
            u.last_seen_ms + 1_000 >= left && u.last_seen_ms <= left + 1_000,
            "last seen {} vs left {left}",
            u.last_seen_ms
        );
    }
    assert!(started.elapsed() >= grace - Duration::from_millis(50));
    // B hides its last seen: followers see none.
    let mut cb = login(server.addr, &b);
    for f in fs.iter_mut() {
        assert!(next_update(f).online);
    }
    set_privacy(&mut cb, true);
    drop(cb);
    for f in fs.iter_mut() {
        let u = next_update(f);
        assert_eq!((u.online, u.last_seen_ms), (false, 0));
    }
    // Shown again; a follower that hides its own sees nobody's.
    let mut cb = login(server.addr, &b);
    set_privacy(&mut cb, false);
    for f in fs.iter_mut() {
        assert!(next_update(f).online);
    }
    set_privacy(&mut fs[1], true);
    drop(cb);
    let seen: Vec<u64> = fs.iter_mut().map(|f| next_update(f).last_seen_ms).collect();
    assert!(seen[0] > 0 && seen[1] == 0, "{seen:?}");
    // Last seen survives a restart (a graceful stop writes it).
    drop(fs);
    assert_eq!(server.terminate(), Some(0));
    server.launch();
    let mut f = login(server.addr, &followers[0]);
    subscribe(&mut f, &[b.user]);
    let u = next_update(&mut f);
    assert!(!u.online);
    assert!(
        u.last_seen_ms.abs_diff(seen[0]) < 2_000,
        "{} vs {}",
        u.last_seen_ms,
        seen[0]
    );
}

#[test]
fn typing_reaches_online_devices_only_and_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.typing_per_second = 5);
    let a = RawClient::register(server.addr);
    let b = RawClient::register(server.addr);
    let mut ca = login(server.addr, &a);
    let typing = |state: TypingState| {
        Frame::SendTyping(pb::SendTyping {
            to_user_id: b.user,
            state: state as i32,
        })
    };
    // B offline: dropped, no error, nothing stored for later.
    ca.send(&typing(TypingState::Composing));
    nothing_for(&mut ca, Duration::from_millis(100));
    std::thread::sleep(Duration::from_millis(1_100));
    let mut cb = login(server.addr, &b);
    nothing_for(&mut cb, Duration::from_millis(200));
    ca.send(&typing(TypingState::Composing));
    ca.send(&typing(TypingState::Paused));
    for state in [TypingState::Composing, TypingState::Paused] {
        assert_eq!(
            cb.recv(),
            Some(Frame::Typing(pb::Typing {
                from_user_id: a.user,
                from_device_id: 1,
                state: state as i32,
            }))
        );
    }
    // A burst: at most 5 a second get through.
    std::thread::sleep(Duration::from_millis(1_100));
    for _ in 0..20 {
        ca.send(&typing(TypingState::Composing));
    }
    nothing_for(&mut ca, Duration::from_millis(200));
    let mut got = 0;
    cb.send(&Frame::Ping(pb::Ping { nonce: 5 }));
    loop {
        match cb.recv() {
            Some(Frame::Typing(_)) => got += 1,
            Some(Frame::Pong(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((1..=10).contains(&got), "{got} typing notices");
    // Too many users to follow.
    let many: Vec<u64> = (1..=server.config.limits.presence_subscriptions_max as u64 + 1).collect();
    subscribe(&mut ca, &many);
    ca.expect_error(ErrorCode::TooManyIds);
}
