use super::*;
use crate::engine::testing::Fixture;
use crate::engine::Event;

fn upload(identity: &[u8], spk: &[u8], sig: &[u8], one_time: &[&[u8]]) -> Frame {
    Frame::UploadPrekeys(pb::UploadPrekeys {
        request_id: 1,
        identity_key: Bytes::copy_from_slice(identity),
        signed_prekey: (!spk.is_empty()).then(|| pb::SignedPrekey {
            key_id: 1,
            public_key: Bytes::copy_from_slice(spk),
            signature: Bytes::copy_from_slice(sig),
        }),
        one_time_prekeys: one_time
            .iter()
            .enumerate()
            .map(|(i, k)| pb::Prekey {
                key_id: i as u32,
                public_key: Bytes::copy_from_slice(k),
            })
            .collect(),
    })
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error(e) => Some(e.code()),
        _ => None,
    })
}

#[test]
fn uploads_are_checked_before_the_database_is_asked() {
    let mut fx = Fixture::new(0, 1);
    fx.open(1, 10);
    fx.host.frames.clear();
    let k = [7u8; 32];
    let libsignal = {
        let mut k = [7u8; 33];
        k[0] = 0x05;
        k
    };
    for bad in [
        upload(&k, &[], &[], &[]),
        upload(&[7; 31], &k, &[0; 64], &[]),
        upload(&[7; 33], &k, &[0; 64], &[]),
        upload(&k, &k, &[0; 63], &[]),
        upload(&k, &k, &[0; 64], &[&[1; 16]]),
    ] {
        fx.frame(1, 10, bad);
        assert_eq!(
            error_code(&fx.host.take_frames(10)),
            Some(ErrorCode::PrekeysInvalid)
        );
    }
    let too_many: Vec<&[u8]> = (0..fx.engine.limits().prekeys_max + 1)
        .map(|_| &k[..])
        .collect();
    fx.frame(1, 10, upload(&k, &k, &[0; 64], &too_many));
    assert_eq!(
        error_code(&fx.host.take_frames(10)),
        Some(ErrorCode::PrekeysInvalid)
    );
    assert!(fx.host.keys_ops.is_empty());
    fx.frame(1, 10, upload(&libsignal, &k, &[0; 64], &[&k, &libsignal]));
    fx.frame(1, 10, upload(&[], &[], &[], &[&k]));
    assert!(matches!(
        fx.host.keys_ops.as_slice(),
        [KeysOp::Upload { identity: Some(_), one_time: a, .. }, KeysOp::Upload { identity: None, one_time: b, .. }]
            if a.len() == 2 && b.len() == 1
    ));
}

#[test]
fn fetches_are_rate_limited_per_device_and_low_prekeys_are_told_once() {
    let mut fx = Fixture::new(0, 1);
    fx.open(1, 10);
    fx.host.frames.clear();
    let per_minute = fx.engine.limits().prekey_fetches_per_minute;
    let fetch = |id| {
        Frame::FetchPrekeys(pb::FetchPrekeys {
            request_id: id,
            user_id: 2,
        })
    };
    for id in 0..per_minute as u64 {
        fx.frame(1, 10, fetch(id));
    }
    assert_eq!(fx.host.keys_ops.len(), per_minute as usize);
    fx.frame(1, 10, fetch(99));
    let refused = fx.host.take_frames(10);
    assert!(matches!(refused.as_slice(), [Frame::Error(e)]
        if e.code() == ErrorCode::RateLimited && !e.fatal && e.retry_after_ms > 0 && e.client_message_id == 99));
    fx.clock.advance_ms(60_000);
    fx.frame(1, 10, fetch(100));
    assert_eq!(fx.host.keys_ops.len(), per_minute as usize + 1);
    // Device 2/1 is offline: told when it connects, once.
    let low = fx.engine.limits().prekeys_low;
    let bundle = |remaining| KeysDone::Bundle {
        session: 10,
        request_id: 100,
        user: UserId(2),
        devices: vec![DeviceKeys {
            device: DeviceId(1),
            identity: IdentityKeys {
                identity_key: vec![1; 32],
                signed_prekey_id: 1,
                signed_prekey: vec![2; 32],
                signature: vec![3; 64],
            },
            one_time: Some((5, vec![4; 32])),
            remaining,
        }],
    };
    fx.handle(Event::Keys(bundle(low)));
    fx.handle(Event::Keys(bundle(low - 1)));
    fx.handle(Event::Keys(bundle(low - 2)));
    assert_eq!(
        fx.host
            .take_frames(10)
            .iter()
            .filter(|f| matches!(f, Frame::PrekeyBundle(_)))
            .count(),
        3
    );
    fx.open(2, 20);
    let notices: Vec<Frame> = fx
        .host
        .take_frames(20)
        .into_iter()
        .filter(|f| matches!(f, Frame::PrekeysLow(_)))
        .collect();
    assert_eq!(
        notices,
        vec![Frame::PrekeysLow(pb::PrekeysLow {
            one_time_prekeys: low - 1
        })]
    );
}
