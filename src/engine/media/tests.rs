use super::*;
use crate::engine::testing::Fixture;
use crate::media::token::TokenError;
use crate::store::Clock;

const KEY: [u8; 32] = [9; 32];

fn request(kind: MediaGrantKind, size: u64, blob_id: &[u8]) -> Frame {
    Frame::RequestMediaGrant(pb::RequestMediaGrant {
        request_id: 77,
        kind: kind as i32,
        size,
        blob_id: bytes::Bytes::copy_from_slice(blob_id),
    })
}

fn enabled() -> Fixture {
    let mut fx = Fixture::new(0, 1);
    fx.engine.enable_media(
        MediaKey::from_bytes(KEY),
        "http://media".into(),
        60_000,
        1_000,
    );
    fx.open(1, 10);
    fx.host.frames.clear();
    fx
}

fn only_frame(fx: &mut Fixture) -> Frame {
    let mut frames = fx.host.take_frames(10);
    assert_eq!(frames.len(), 1, "{frames:?}");
    frames.remove(0)
}

#[test]
fn a_grant_is_a_token_bound_to_the_device_the_kind_and_the_subject() {
    let mut fx = enabled();
    let now = fx.clock.now_ms();
    fx.frame(1, 10, request(MediaGrantKind::Upload, 1_000, &[]));
    let Frame::MediaGrant(grant) = only_frame(&mut fx) else {
        panic!("no grant")
    };
    assert_eq!((grant.request_id, grant.size_max), (77, 1_000));
    assert_eq!(grant.url, "http://media");
    assert_eq!(grant.expires_at_ms, now + 60_000);
    let checked = Grant::verify(&MediaKey::from_bytes(KEY), &grant.token, now).unwrap();
    assert_eq!(
        (checked.user, checked.device),
        (1, crate::ids::PRIMARY_DEVICE.0)
    );
    assert_eq!(checked.subject, Subject::Upload { size_max: 1_000 });
    assert_eq!(
        Grant::verify(&MediaKey::from_bytes(KEY), &grant.token, now + 60_000),
        Err(TokenError::Expired)
    );

    fx.frame(1, 10, request(MediaGrantKind::Download, 0, &[5; 32]));
    let Frame::MediaGrant(grant) = only_frame(&mut fx) else {
        panic!("no grant")
    };
    let checked = Grant::verify(&MediaKey::from_bytes(KEY), &grant.token, now).unwrap();
    assert_eq!(checked.subject, Subject::Download { blob: [5; 32] });
}

#[test]
fn bad_requests_are_refused_with_their_request_id() {
    let mut fx = enabled();
    for (bad, code) in [
        (
            request(MediaGrantKind::Upload, 0, &[]),
            ErrorCode::MalformedFrame,
        ),
        (
            request(MediaGrantKind::Upload, 1_001, &[]),
            ErrorCode::PayloadTooLarge,
        ),
        (
            request(MediaGrantKind::Download, 0, &[5; 31]),
            ErrorCode::MalformedFrame,
        ),
        (
            request(MediaGrantKind::Unspecified, 10, &[]),
            ErrorCode::MalformedFrame,
        ),
    ] {
        fx.frame(1, 10, bad);
        let Frame::Error(error) = only_frame(&mut fx) else {
            panic!("no error")
        };
        assert_eq!((error.code(), error.client_message_id), (code, 77));
    }
}

#[test]
fn without_the_media_service_grants_are_unsupported() {
    let mut fx = Fixture::new(0, 1);
    fx.open(1, 10);
    fx.host.frames.clear();
    fx.frame(1, 10, request(MediaGrantKind::Upload, 10, &[]));
    let Frame::Error(error) = only_frame(&mut fx) else {
        panic!("no error")
    };
    assert_eq!(error.code(), ErrorCode::UnsupportedFeature);
}
