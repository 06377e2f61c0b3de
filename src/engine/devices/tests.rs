use super::*;
use crate::engine::testing::{device, Fixture};
use crate::engine::Event;

fn companion(user: u64, id: u32) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: DeviceId(id),
    }
}

fn open_companion(fx: &mut Fixture, user: u64, id: u32, session: SessionId) {
    fx.handle(Event::Opened {
        device: companion(user, id),
        session,
        connected_at: session as u32,
        protocol_version: 1,
    });
}

fn frame_from(fx: &mut Fixture, from: InboxKey, session: SessionId, frame: Frame) {
    fx.handle(Event::Frame {
        device: from,
        session,
        frame,
    });
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error(e) => Some(e.code()),
        _ => None,
    })
}

#[test]
fn only_the_primary_asks_for_link_codes() {
    let mut fx = Fixture::new(0, 1);
    fx.users.set_devices(1, &[2]);
    fx.open(1, 10);
    open_companion(&mut fx, 1, 2, 11);
    fx.host.frames.clear();
    frame_from(
        &mut fx,
        device(1),
        10,
        Frame::RequestLinkCode(pb::RequestLinkCode {}),
    );
    assert!(matches!(
        fx.host.account_ops.as_slice(),
        [AccountOp::CreateLinkCode { session: 10, user: UserId(1), ttl_ms, .. }]
            if *ttl_ms == u64::from(fx.engine.limits().link_code_ttl_ms)
    ));
    frame_from(
        &mut fx,
        companion(1, 2),
        11,
        Frame::RequestLinkCode(pb::RequestLinkCode {}),
    );
    assert_eq!(fx.host.account_ops.len(), 1);
    assert_eq!(
        error_code(&fx.host.take_frames(11)),
        Some(ErrorCode::NotPrimary)
    );
}

#[test]
fn removal_rules_are_checked_before_the_database_is_asked() {
    let mut fx = Fixture::new(0, 1);
    fx.users.set_devices(1, &[2, 3]);
    fx.open(1, 10);
    open_companion(&mut fx, 1, 2, 11);
    fx.host.frames.clear();
    let remove = |id| Frame::RemoveDevice(pb::RemoveDevice { device_id: id });
    // Nobody removes the primary or a device the account lacks.
    for (from, session, id) in [
        (device(1), 10, 1),
        (device(1), 10, 9),
        (companion(1, 2), 11, 1),
    ] {
        frame_from(&mut fx, from, session, remove(id));
        assert_eq!(
            error_code(&fx.host.take_frames(session)),
            Some(ErrorCode::UnknownDevice),
            "removing {id}"
        );
    }
    // A companion removes only itself.
    frame_from(&mut fx, companion(1, 2), 11, remove(3));
    assert_eq!(
        error_code(&fx.host.take_frames(11)),
        Some(ErrorCode::NotPrimary)
    );
    assert!(fx.host.account_ops.is_empty());
    frame_from(&mut fx, companion(1, 2), 11, remove(2));
    frame_from(&mut fx, device(1), 10, remove(3));
    assert_eq!(
        fx.host.account_ops,
        vec![
            AccountOp::RemoveDevice {
                session: 11,
                user: UserId(1),
                device: DeviceId(2)
            },
            AccountOp::RemoveDevice {
                session: 10,
                user: UserId(1),
                device: DeviceId(3)
            },
        ]
    );
}

#[test]
fn a_removed_device_is_told_closed_and_cannot_open_again() {
    let mut fx = Fixture::new(0, 1);
    fx.users.set_devices(1, &[2]);
    fx.open(1, 10);
    open_companion(&mut fx, 1, 2, 11);
    fx.host.frames.clear();
    // The database has removed it (the directory with it).
    fx.users.set_devices(1, &[]);
    fx.handle(Event::Account(AccountDone::Removed {
        session: 10,
        user: UserId(1),
        device: DeviceId(2),
        version: 3,
    }));
    assert_eq!(
        fx.host.take_frames(10),
        vec![Frame::DeviceRemoved(pb::DeviceRemoved {
            device_id: 2,
            version: 3
        })]
    );
    assert_eq!(fx.host.closes, vec![(11, Closing::Removed)]);
    let told = fx.host.take_frames(11);
    assert!(matches!(
        told.as_slice(),
        [Frame::GoAway(g)] if g.reason() == GoAwayReason::DeviceRemoved
    ));
    // A Hello checked just before the removal opens nothing.
    open_companion(&mut fx, 1, 2, 12);
    assert_eq!(fx.host.closes.last(), Some(&(12, Closing::Removed)));
    assert!(fx
        .host
        .take_frames(12)
        .iter()
        .all(|f| !matches!(f, Frame::Welcome(_))));
}

#[test]
fn one_payload_for_an_account_with_companions_is_refused_with_the_device_list() {
    let mut fx = Fixture::new(0, 1);
    fx.users.set_devices(2, &[2, 5]);
    fx.open(1, 10);
    fx.host.frames.clear();
    fx.send(1, 10, 77, 2, b"hi");
    let frames = fx.host.take_frames(10);
    let [Frame::Error(e)] = frames.as_slice() else {
        panic!("expected one Error, got {frames:?}");
    };
    assert_eq!(e.code(), ErrorCode::DeviceMismatch);
    assert_eq!(e.client_message_id, 77);
    assert_eq!(e.missing_devices, vec![2, 5]);
    assert!(e.stale_devices.is_empty());
    assert_eq!(e.device_list_version, 2);
    assert!(!e.fatal);
    assert_eq!(fx.engine.log().stats().entries_pending, 0, "nothing stored");
}

#[test]
fn outcomes_become_frames() {
    let mut fx = Fixture::new(0, 1);
    fx.open(1, 10);
    fx.host.frames.clear();
    fx.handle(Event::Account(AccountDone::LinkCode {
        session: 10,
        code: "ab".into(),
        expires_at_ms: 5,
    }));
    fx.handle(Event::Account(AccountDone::Failed {
        session: 10,
        code: ErrorCode::Internal,
        message: "x",
    }));
    let frames = fx.host.take_frames(10);
    assert_eq!(
        frames[0],
        Frame::LinkCode(pb::LinkCode {
            code: "ab".into(),
            expires_at_ms: 5
        })
    );
    assert_eq!(error_code(&frames[1..]), Some(ErrorCode::Internal));
}
