//! Prekey bundles over real sockets against the real binary: upload,
//! fetch (one one-time prekey per device, never handed out twice, also
//! under concurrent fetches from both shards and across a kill -9), a
//! bundle without one when none is left, the low-prekey notice, the fetch
//! budget, and bad uploads.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use bytes::Bytes;
use common::{Account, RawClient, Server};
use switchboard::proto::{pb, ErrorCode, Frame};

fn login(addr: SocketAddr, a: &Account) -> RawClient {
    RawClient::login(addr, a).0
}

/// One-time prekey `id` of a device: 32 bytes naming it.
fn key(id: u32) -> Bytes {
    let mut k = vec![0u8; 32];
    k[..4].copy_from_slice(&id.to_le_bytes());
    Bytes::from(k)
}

fn upload(c: &mut RawClient, request_id: u64, identity: bool, ids: std::ops::Range<u32>) -> Frame {
    c.send(&Frame::UploadPrekeys(pb::UploadPrekeys {
        request_id,
        identity_key: if identity {
            Bytes::from(vec![0xA1; 32])
        } else {
            Bytes::new()
        },
        signed_prekey: identity.then(|| pb::SignedPrekey {
            key_id: 1,
            public_key: Bytes::from(vec![0xB2; 32]),
            signature: Bytes::from(vec![0xC3; 64]),
        }),
        one_time_prekeys: ids
            .map(|id| pb::Prekey {
                key_id: id,
                public_key: key(id),
            })
            .collect(),
    }));
    c.recv().expect("an answer")
}

fn fetch(c: &mut RawClient, request_id: u64, user: u64) -> Frame {
    c.send(&Frame::FetchPrekeys(pb::FetchPrekeys {
        request_id,
        user_id: user,
    }));
    loop {
        match c.recv() {
            Some(Frame::PrekeysLow(_)) => continue,
            other => return other.expect("an answer"),
        }
    }
}

/// The one-time prekey id a bundle carried for the device (None: none).
fn taken(frame: &Frame) -> Option<u32> {
    match frame {
        Frame::PrekeyBundle(b) => {
            assert_eq!(b.devices.len(), 1, "{b:?}");
            let d = &b.devices[0];
            assert_eq!(&d.identity_key[..], &[0xA1; 32]);
            let spk = d.signed_prekey.as_ref().unwrap();
            assert_eq!((spk.key_id, spk.signature.len()), (1, 64));
            d.one_time_prekey.as_ref().map(|k| {
                assert_eq!(k.public_key, key(k.key_id));
                k.key_id
            })
        }
        other => panic!("expected a PrekeyBundle, got {other:?}"),
    }
}

#[test]
fn one_time_prekeys_go_out_once_across_shards_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| {
        c.limits.prekeys_max = 100;
        c.limits.prekeys_low = 5;
        c.limits.prekey_fetches_per_minute = 1_000;
        c.limits.idle_timeout_ms = 60_000;
    });
    let owner = RawClient::register(server.addr);
    let fetchers: Vec<Account> = (0..6).map(|_| RawClient::register(server.addr)).collect();
    let mut o = login(server.addr, &owner);
    assert_eq!(
        upload(&mut o, 1, true, 0..40),
        Frame::PrekeysStored(pb::PrekeysStored {
            request_id: 1,
            one_time_prekeys: 40
        })
    );
    drop(o);
    // Six fetchers (on both shards) fetch at once, 5 each.
    let addr = server.addr;
    let owner_id = owner.user;
    let handles: Vec<_> = fetchers
        .iter()
        .cloned()
        .map(|f| {
            std::thread::spawn(move || {
                let mut c = login(addr, &f);
                (0..5)
                    .map(|i| taken(&fetch(&mut c, i, owner_id)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = BTreeSet::new();
    for h in handles {
        for id in h.join().unwrap() {
            let id = id.expect("40 keys for 30 fetches");
            assert!(seen.insert(id), "one-time prekey {id} handed out twice");
        }
    }
    assert_eq!(seen.len(), 30);
    server.kill9();
    server.launch();
    let mut c = login(server.addr, &fetchers[0]);
    for i in 0..10 {
        let id = taken(&fetch(&mut c, 100 + i, owner_id)).expect("10 keys left");
        assert!(
            seen.insert(id),
            "one-time prekey {id} handed out again after the restart"
        );
    }
    // None left: the bundle comes without one.
    assert_eq!(taken(&fetch(&mut c, 200, owner_id)), None);
    // The owner was told once, when its keys went below 5: at connect.
    let mut o = login(server.addr, &owner);
    assert_eq!(
        o.recv(),
        Some(Frame::PrekeysLow(pb::PrekeysLow {
            one_time_prekeys: 4
        }))
    );
    o.send(&Frame::Ping(pb::Ping { nonce: 1 }));
    assert_eq!(o.recv(), Some(Frame::Pong(pb::Pong { nonce: 1 })));
    // More keys without the identity again.
    assert_eq!(
        upload(&mut o, 2, false, 40..50),
        Frame::PrekeysStored(pb::PrekeysStored {
            request_id: 2,
            one_time_prekeys: 10
        })
    );
    assert_eq!(taken(&fetch(&mut c, 300, owner_id)), Some(40));
}

#[test]
fn bad_uploads_unknown_users_and_the_fetch_budget() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.limits.prekeys_max = 20;
        c.limits.prekey_fetches_per_minute = 3;
    });
    let a = RawClient::register(server.addr);
    let b = RawClient::register(server.addr);
    let mut ca = login(server.addr, &a);
    // One-time prekeys before any identity key, too many, a bad key.
    for (id, frame) in [
        (1, upload(&mut ca, 1, false, 0..3)),
        (2, upload(&mut ca, 2, true, 0..21)),
    ] {
        match frame {
            Frame::Error(e) => {
                assert_eq!(
                    (e.code(), e.client_message_id, e.fatal),
                    (ErrorCode::PrekeysInvalid, id, false)
                )
            }
            other => panic!("expected PREKEYS_INVALID, got {other:?}"),
        }
    }
    ca.send(&Frame::UploadPrekeys(pb::UploadPrekeys {
        request_id: 3,
        identity_key: Bytes::from(vec![1; 31]),
        signed_prekey: Some(pb::SignedPrekey {
            key_id: 1,
            public_key: Bytes::from(vec![2; 32]),
            signature: Bytes::from(vec![3; 64]),
        }),
        one_time_prekeys: vec![],
    }));
    ca.expect_error(ErrorCode::PrekeysInvalid);
    // An account that uploaded nothing has an empty bundle; an unknown
    // one is refused.
    match fetch(&mut ca, 4, b.user) {
        Frame::PrekeyBundle(bundle) => assert!(bundle.devices.is_empty()),
        other => panic!("expected an empty bundle, got {other:?}"),
    }
    match fetch(&mut ca, 5, 999_999) {
        Frame::Error(e) => assert_eq!(e.code(), ErrorCode::UnknownRecipient),
        other => panic!("expected UNKNOWN_RECIPIENT, got {other:?}"),
    }
    // The budget: 3 a minute, then RATE_LIMITED, not fatal.
    fetch(&mut ca, 6, b.user);
    match fetch(&mut ca, 7, b.user) {
        Frame::Error(e) => {
            assert_eq!(e.code(), ErrorCode::RateLimited);
            assert!(!e.fatal && e.retry_after_ms > 0 && e.retry_after_ms <= 60_000);
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    ca.send(&Frame::Ping(pb::Ping { nonce: 9 }));
    assert_eq!(ca.recv(), Some(Frame::Pong(pb::Pong { nonce: 9 })));
    // A client sending a server's frame is closed.
    ca.send(&Frame::PrekeyBundle(pb::PrekeyBundle::default()));
    ca.expect_error(ErrorCode::UnexpectedFrame);
    ca.expect_closed();
}
