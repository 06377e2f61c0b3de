//! Codec tests: golden vectors per frame type (`testdata/*.bin`), hand-broken
//! copies of them, the documented exchange, and property tests.
//!
//! `SWITCHBOARD_BLESS=1 cargo test --lib proto::` rewrites the golden files
//! from the codec; without it every test only compares.

use std::path::PathBuf;

use proptest::prelude::*;

use super::*;

const LIMIT: u32 = 66_560;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/proto/testdata")
        .join(name)
}

fn blessing() -> bool {
    std::env::var_os("SWITCHBOARD_BLESS").is_some()
}

/// Reads a golden file, or writes it first when blessing.
fn golden(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = testdata(name);
    if blessing() {
        std::fs::write(&path, bytes).expect("write golden file");
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn secret(first: u8) -> Bytes {
    Bytes::from((first..first + 32).collect::<Vec<u8>>())
}

/// One example of every frame type, with every field set; also the
/// documented exchange (docs/protocol.md) in order.
fn examples() -> Vec<(&'static str, &'static str, Frame)> {
    vec![
        (
            "register",
            "C→S",
            Frame::Register(pb::Register {
                protocol_version: 1,
                registration_token: "tok".to_string(),
            }),
        ),
        (
            "registered",
            "S→C",
            Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 12,
                device_id: 1,
                secret: secret(0),
            }),
        ),
        (
            "hello",
            "C→S",
            Frame::Hello(pb::Hello {
                protocol_version: 1,
                user_id: 12,
                device_id: 1,
                secret: secret(0),
            }),
        ),
        (
            "welcome",
            "S→C",
            Frame::Welcome(pb::Welcome {
                protocol_version: 1,
                server_time_ms: 1_700_000_000_000,
                max_payload_bytes: 65_536,
                max_frame_bytes: 66_560,
                delivery_window: 64,
                idle_timeout_ms: 120_000,
                ids_per_frame_max: 1_024,
                delivery_window_bytes: 262_144,
                inbox_pending_through: 0,
            }),
        ),
        (
            "send",
            "C→S",
            Frame::Send(pb::Send {
                client_message_id: 3,
                recipient_user_id: 13,
                payload: Bytes::from_static(b"hi"),
                device_payloads: vec![],
                ..Default::default()
            }),
        ),
        (
            "server_ack",
            "S→C",
            Frame::ServerAck(pb::ServerAck {
                client_message_id: 3,
                server_sequence: 5,
                timestamp_ms: 1_700_000_000_123,
            }),
        ),
        (
            "deliver",
            "S→C",
            Frame::Deliver(pb::Deliver {
                sequence: 7,
                sender_user_id: 13,
                sender_device_id: 1,
                client_message_id: 44,
                timestamp_ms: 1_700_000_000_200,
                payload: Bytes::from_static(b"yo"),
                ..Default::default()
            }),
        ),
        (
            "ack",
            "C→S",
            Frame::Ack(pb::Ack {
                up_to_sequence: 7,
                sequences: vec![9, 10],
            }),
        ),
        (
            "receipt",
            "S→C",
            Frame::Receipt(pb::Receipt {
                sequence: 8,
                kind: ReceiptKind::Delivered as i32,
                by_user_id: 13,
                by_device_id: 1,
                client_message_ids: vec![3],
                timestamp_ms: 1_700_000_000_300,
                ..Default::default()
            }),
        ),
        (
            "read_receipt",
            "C→S",
            Frame::ReadReceipt(pb::ReadReceipt {
                sender_user_id: 13,
                sender_device_id: 1,
                client_message_ids: vec![44],
            }),
        ),
        ("ping", "C→S", Frame::Ping(pb::Ping { nonce: 1 })),
        ("pong", "S→C", Frame::Pong(pb::Pong { nonce: 1 })),
        (
            "error",
            "S→C",
            Frame::Error(pb::Error {
                code: ErrorCode::UnknownRecipient as i32,
                message: "no such user".to_string(),
                client_message_id: 4,
                fatal: false,
                retry_after_ms: 0,
                ..Default::default()
            }),
        ),
        (
            "go_away",
            "S→C",
            Frame::GoAway(pb::GoAway {
                reason: GoAwayReason::ShuttingDown as i32,
                reconnect_after_ms: 1_000,
            }),
        ),
        // Linked devices (not part of the documented exchange).
        (
            "link",
            "C→S",
            Frame::Link(pb::Link {
                protocol_version: 1,
                code: "0123456789abcdef0123".to_string(),
                device_name: "laptop".to_string(),
            }),
        ),
        (
            "request_link_code",
            "C→S",
            Frame::RequestLinkCode(pb::RequestLinkCode {}),
        ),
        (
            "link_code",
            "S→C",
            Frame::LinkCode(pb::LinkCode {
                code: "0123456789abcdef0123".to_string(),
                expires_at_ms: 1_764_000_060_000,
            }),
        ),
        (
            "list_devices",
            "C→S",
            Frame::ListDevices(pb::ListDevices {}),
        ),
        (
            "device_list",
            "S→C",
            Frame::DeviceList(pb::DeviceList {
                version: 2,
                devices: vec![
                    pb::DeviceInfo {
                        device_id: 1,
                        name: String::new(),
                        linked_at_ms: 1_764_000_000_000,
                        last_seen_ms: 1_764_000_050_000,
                    },
                    pb::DeviceInfo {
                        device_id: 2,
                        name: "laptop".to_string(),
                        linked_at_ms: 1_764_000_030_000,
                        last_seen_ms: 0,
                    },
                ],
            }),
        ),
        (
            "remove_device",
            "C→S",
            Frame::RemoveDevice(pb::RemoveDevice { device_id: 2 }),
        ),
        (
            "device_removed",
            "S→C",
            Frame::DeviceRemoved(pb::DeviceRemoved {
                device_id: 2,
                version: 3,
            }),
        ),
        (
            "create_group",
            "C→S",
            Frame::CreateGroup(pb::CreateGroup {
                request_id: 1,
                name: "climbing".to_string(),
                member_user_ids: vec![2, 3],
            }),
        ),
        (
            "update_group",
            "C→S",
            Frame::UpdateGroup(pb::UpdateGroup {
                request_id: 2,
                group_id: 0x5eed_0000_0000_0001,
                action: pb::GroupAction::Add as i32,
                user_ids: vec![4],
                name: String::new(),
            }),
        ),
        (
            "get_group",
            "C→S",
            Frame::GetGroup(pb::GetGroup {
                request_id: 3,
                group_id: 0x5eed_0000_0000_0001,
            }),
        ),
        (
            "group_info",
            "S→C",
            Frame::GroupInfo(pb::GroupInfo {
                request_id: 2,
                group_id: 0x5eed_0000_0000_0001,
                name: "climbing".to_string(),
                version: 2,
                members: vec![
                    pb::GroupMember {
                        user_id: 1,
                        admin: true,
                    },
                    pb::GroupMember {
                        user_id: 2,
                        admin: false,
                    },
                ],
            }),
        ),
        (
            "upload_prekeys",
            "C→S",
            Frame::UploadPrekeys(pb::UploadPrekeys {
                request_id: 4,
                identity_key: Bytes::from(vec![0x11; 32]),
                signed_prekey: Some(pb::SignedPrekey {
                    key_id: 7,
                    public_key: Bytes::from(vec![0x22; 32]),
                    signature: Bytes::from(vec![0x33; 64]),
                }),
                one_time_prekeys: vec![pb::Prekey {
                    key_id: 100,
                    public_key: Bytes::from(vec![0x44; 32]),
                }],
            }),
        ),
        (
            "prekeys_stored",
            "S→C",
            Frame::PrekeysStored(pb::PrekeysStored {
                request_id: 4,
                one_time_prekeys: 1,
            }),
        ),
        (
            "fetch_prekeys",
            "C→S",
            Frame::FetchPrekeys(pb::FetchPrekeys {
                request_id: 5,
                user_id: 2,
            }),
        ),
        (
            "prekey_bundle",
            "S→C",
            Frame::PrekeyBundle(pb::PrekeyBundle {
                request_id: 5,
                user_id: 2,
                devices: vec![pb::DeviceBundle {
                    device_id: 1,
                    identity_key: Bytes::from(vec![0x11; 32]),
                    signed_prekey: Some(pb::SignedPrekey {
                        key_id: 7,
                        public_key: Bytes::from(vec![0x22; 32]),
                        signature: Bytes::from(vec![0x33; 64]),
                    }),
                    one_time_prekey: Some(pb::Prekey {
                        key_id: 100,
                        public_key: Bytes::from(vec![0x44; 32]),
                    }),
                }],
            }),
        ),
        (
            "prekeys_low",
            "S→C",
            Frame::PrekeysLow(pb::PrekeysLow {
                one_time_prekeys: 9,
            }),
        ),
        (
            "send_typing",
            "C→S",
            Frame::SendTyping(pb::SendTyping {
                to_user_id: 2,
                state: pb::TypingState::Composing as i32,
            }),
        ),
        (
            "typing",
            "S→C",
            Frame::Typing(pb::Typing {
                from_user_id: 1,
                from_device_id: 1,
                state: pb::TypingState::Composing as i32,
            }),
        ),
        (
            "subscribe_presence",
            "C→S",
            Frame::SubscribePresence(pb::SubscribePresence {
                user_ids: vec![2, 3],
            }),
        ),
        (
            "presence_update",
            "S→C",
            Frame::PresenceUpdate(pb::PresenceUpdate {
                user_id: 2,
                online: false,
                last_seen_ms: 1_764_000_050_000,
            }),
        ),
        (
            "set_privacy",
            "C→S",
            Frame::SetPrivacy(pb::SetPrivacy {
                last_seen: pb::LastSeenVisibility::Nobody as i32,
            }),
        ),
        (
            "privacy",
            "S→C",
            Frame::Privacy(pb::Privacy {
                last_seen: pb::LastSeenVisibility::Nobody as i32,
            }),
        ),
        (
            "register_push",
            "C→S",
            Frame::RegisterPush(pb::RegisterPush {
                kind: pb::PushKind::WebPush as i32,
                endpoint: "https://push.example/send/abc".to_string(),
            }),
        ),
        (
            "push_registered",
            "S→C",
            Frame::PushRegistered(pb::PushRegistered {
                kind: pb::PushKind::WebPush as i32,
                vapid_public_key: Bytes::from(vec![0x04; 65]),
            }),
        ),
        (
            "request_media_grant",
            "C→S",
            Frame::RequestMediaGrant(pb::RequestMediaGrant {
                request_id: 12,
                kind: pb::MediaGrantKind::Upload as i32,
                size: 1_048_576,
                blob_id: Bytes::new(),
            }),
        ),
        (
            "media_grant",
            "S→C",
            Frame::MediaGrant(pb::MediaGrant {
                request_id: 12,
                kind: pb::MediaGrantKind::Upload as i32,
                token: "AQEAAAAAAAAAKgAAAAE".to_string(),
                url: "http://127.0.0.1:7702".to_string(),
                expires_at_ms: 1_800_000_000_000,
                size_max: 1_048_576,
            }),
        ),
    ]
}

/// Frames of the linked-devices feature, left out of the documented
/// exchange.
fn device_frame(frame: &Frame) -> bool {
    matches!(
        frame.frame_type(),
        FrameType::Link
            | FrameType::RequestLinkCode
            | FrameType::LinkCode
            | FrameType::ListDevices
            | FrameType::DeviceList
            | FrameType::RemoveDevice
            | FrameType::DeviceRemoved
            | FrameType::CreateGroup
            | FrameType::UpdateGroup
            | FrameType::GetGroup
            | FrameType::GroupInfo
            | FrameType::UploadPrekeys
            | FrameType::PrekeysStored
            | FrameType::FetchPrekeys
            | FrameType::PrekeyBundle
            | FrameType::PrekeysLow
            | FrameType::SendTyping
            | FrameType::Typing
            | FrameType::SubscribePresence
            | FrameType::PresenceUpdate
            | FrameType::SetPrivacy
            | FrameType::Privacy
            | FrameType::RegisterPush
            | FrameType::PushRegistered
            | FrameType::RequestMediaGrant
            | FrameType::MediaGrant
    )
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = next_frame(&mut buf, LIMIT)? {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(frames)
}

#[test]
fn every_frame_type_has_an_example() {
    let types: Vec<FrameType> = examples().iter().map(|(_, _, f)| f.frame_type()).collect();
    assert_eq!(types, FrameType::ALL.to_vec());
}

#[test]
fn encodes_every_frame_type_to_its_golden_bytes() {
    for (name, _, frame) in examples() {
        let bytes = frame.to_bytes();
        assert_eq!(
            bytes.as_ref(),
            golden(&format!("{name}.bin"), &bytes).as_slice(),
            "{name}.bin"
        );
    }
}

#[test]
fn decodes_every_golden_vector_to_its_frame() {
    for (name, _, frame) in examples() {
        let bytes = std::fs::read(testdata(&format!("{name}.bin"))).expect("golden file");
        assert_eq!(decode_all(&bytes), Ok(vec![frame]), "{name}.bin");
    }
}

macro_rules! round_trip_tests {
    ($($test:ident: $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            let (_, _, frame) = examples().into_iter().find(|(n, _, _)| *n == $name).expect("example");
            assert_eq!(decode_all(&frame.to_bytes()), Ok(vec![frame]));
        }
    )*};
}

round_trip_tests! {
    round_trips_register: "register",
    round_trips_registered: "registered",
    round_trips_hello: "hello",
    round_trips_welcome: "welcome",
    round_trips_send: "send",
    round_trips_server_ack: "server_ack",
    round_trips_deliver: "deliver",
    round_trips_ack: "ack",
    round_trips_receipt: "receipt",
    round_trips_read_receipt: "read_receipt",
    round_trips_ping: "ping",
    round_trips_pong: "pong",
    round_trips_error: "error",
    round_trips_go_away: "go_away",
}

// Hand-broken copies of the golden vectors.

fn deliver_bytes() -> Vec<u8> {
    std::fs::read(testdata("deliver.bin")).expect("golden file")
}

#[test]
fn waits_for_the_rest_of_a_truncated_frame() {
    let mut bytes = deliver_bytes();
    bytes.truncate(bytes.len() - 3);
    let bytes = golden("broken_deliver_truncated.bin", &bytes);
    let mut buf = BytesMut::from(bytes.as_slice());
    assert_eq!(next_frame(&mut buf, LIMIT), Ok(None));
    assert_eq!(buf.len(), bytes.len(), "nothing consumed while waiting");
    assert_eq!(bytes_wanted(&buf), 3);
}

#[test]
fn rejects_truncated_frame() {
    // The length prefix agrees with the shortened body, so the frame is
    // complete but its last field is cut in the middle.
    let mut bytes = deliver_bytes();
    bytes.truncate(bytes.len() - 1);
    let length = (bytes.len() - LENGTH_PREFIX_BYTES) as u32;
    bytes[..4].copy_from_slice(&length.to_be_bytes());
    let bytes = golden("broken_deliver_cut_body.bin", &bytes);
    assert_eq!(
        decode_all(&bytes),
        Err(DecodeError::Malformed(FrameType::Deliver))
    );
}

#[test]
fn rejects_oversized_length_before_the_body() {
    let mut bytes = deliver_bytes();
    bytes[..4].copy_from_slice(&(LIMIT + 1).to_be_bytes());
    let bytes = golden("broken_deliver_oversized_length.bin", &bytes);
    assert_eq!(
        decode_all(&bytes[..4]),
        Err(DecodeError::FrameTooLarge {
            length: LIMIT + 1,
            limit: LIMIT
        })
    );
    assert_eq!(
        DecodeError::FrameTooLarge {
            length: 0,
            limit: 0
        }
        .code(),
        ErrorCode::FrameTooLarge
    );
}

#[test]
fn rejects_oversized_frame_from_prefix_alone() {
    let mut buf = BytesMut::from(&[0u8, 0, 0x10, 0x01][..]);
    assert_eq!(
        next_frame(&mut buf, 1024),
        Err(DecodeError::FrameTooLarge {
            length: 0x1001,
            limit: 1024
        })
    );
}

#[test]
fn rejects_zero_length() {
    let bytes = golden("broken_zero_length.bin", &[0, 0, 0, 0]);
    assert_eq!(decode_all(&bytes), Err(DecodeError::EmptyFrame));
    assert_eq!(DecodeError::EmptyFrame.code(), ErrorCode::MalformedFrame);
}

#[test]
fn rejects_unknown_type_before_the_body() {
    let mut bytes = deliver_bytes();
    bytes[4] = 0x7f;
    let bytes = golden("broken_deliver_unknown_type.bin", &bytes);
    assert_eq!(decode_all(&bytes[..5]), Err(DecodeError::UnknownType(0x7f)));
    assert_eq!(
        DecodeError::UnknownType(0x7f).code(),
        ErrorCode::UnknownFrameType
    );
}

#[test]
fn rejects_corrupt_varint() {
    // Deliver's first field (tag 0x08, sequence) followed by eleven bytes
    // with the continuation bit set: no varint is that long.
    let mut body = vec![FrameType::Deliver as u8, 0x08];
    body.extend_from_slice(&[0xff; 11]);
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    let bytes = golden("broken_deliver_corrupt_varint.bin", &bytes);
    assert_eq!(
        decode_all(&bytes),
        Err(DecodeError::Malformed(FrameType::Deliver))
    );
    assert_eq!(
        DecodeError::Malformed(FrameType::Deliver).code(),
        ErrorCode::MalformedFrame
    );
}

#[test]
fn rejects_wrong_wire_type_for_a_field() {
    // Deliver field 1 (sequence, a varint) sent as length-delimited.
    let bytes = [0, 0, 0, 4, FrameType::Deliver as u8, 0x0a, 0x01, 0x00];
    assert_eq!(
        decode_all(&bytes),
        Err(DecodeError::Malformed(FrameType::Deliver))
    );
}

#[test]
fn decodes_payload_as_a_slice_of_the_input() {
    let bytes = Bytes::from(deliver_bytes());
    let mut buf = BytesMut::from(bytes.as_ref());
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Frame::Deliver(deliver)) = next_frame(&mut buf, LIMIT).expect("valid") else {
        panic!("expected Deliver");
    };
    let payload = deliver.payload.as_ptr() as usize;
    assert!(payload >= start && payload < end, "payload was copied");
}

// The documented exchange.

/// The exchange in docs/protocol.md, as the codec writes it: one line per
/// frame with direction and name, then the bytes in hex, 16 per line.
fn exchange_transcript() -> String {
    let mut text = String::new();
    for (name, direction, frame) in examples() {
        if name == "error" || device_frame(&frame) {
            continue;
        }
        let bytes = frame.to_bytes();
        text.push_str(&format!(
            "{direction} {} (0x{:02x}, {} bytes)\n",
            frame.frame_type().name(),
            frame.frame_type() as u8,
            bytes.len()
        ));
        for line in bytes.chunks(16) {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str("    ");
            text.push_str(&hex.join(" "));
            text.push('\n');
        }
    }
    text
}

#[test]
fn protocol_doc_shows_the_exchange_as_the_codec_encodes_it() {
    let transcript = exchange_transcript();
    let stored = golden("exchange.txt", transcript.as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&stored),
        transcript,
        "testdata/exchange.txt"
    );
    let doc_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/protocol.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/protocol.md");
    assert!(
        doc.contains(&transcript),
        "docs/protocol.md does not contain src/proto/testdata/exchange.txt verbatim"
    );
}

// Property tests.

fn arbitrary_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

fn arbitrary_ids() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(any::<u64>(), 0..8)
}

fn arbitrary_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u32>(), ".{0,16}").prop_map(|(v, t)| Frame::Register(pb::Register {
            protocol_version: v,
            registration_token: t
        })),
        (any::<u32>(), any::<u64>(), any::<u32>(), arbitrary_bytes()).prop_map(|(v, u, d, s)| {
            Frame::Registered(pb::Registered {
                protocol_version: v,
                user_id: u,
                device_id: d,
                secret: s,
            })
        }),
        (any::<u32>(), any::<u64>(), any::<u32>(), arbitrary_bytes()).prop_map(|(v, u, d, s)| {
            Frame::Hello(pb::Hello {
                protocol_version: v,
                user_id: u,
                device_id: d,
                secret: s,
            })
        }),
        (any::<[u32; 6]>(), any::<[u64; 3]>()).prop_map(|(v, t)| Frame::Welcome(pb::Welcome {
            protocol_version: v[0],
            server_time_ms: t[0],
            max_payload_bytes: v[1],
            max_frame_bytes: v[2],
            delivery_window: v[3],
            idle_timeout_ms: v[4],
            ids_per_frame_max: v[5],
            delivery_window_bytes: t[1],
            inbox_pending_through: t[2],
        })),
        (
            any::<u64>(),
            any::<u64>(),
            arbitrary_bytes(),
            proptest::collection::vec((any::<u32>(), arbitrary_bytes()), 0..3)
        )
            .prop_map(|(id, to, payload, devices)| Frame::Send(pb::Send {
                client_message_id: id,
                recipient_user_id: to,
                payload,
                device_payloads: devices
                    .into_iter()
                    .map(|(device_id, payload)| pb::DevicePayload { device_id, payload })
                    .collect(),
                ..Default::default()
            })),
        any::<[u64; 3]>().prop_map(|v| Frame::ServerAck(pb::ServerAck {
            client_message_id: v[0],
            server_sequence: v[1],
            timestamp_ms: v[2]
        })),
        (any::<[u64; 4]>(), any::<u32>(), arbitrary_bytes()).prop_map(|(v, d, p)| {
            Frame::Deliver(pb::Deliver {
                sequence: v[0],
                sender_user_id: v[1],
                sender_device_id: d,
                client_message_id: v[2],
                timestamp_ms: v[3],
                payload: p,
                ..Default::default()
            })
        }),
        (any::<u64>(), arbitrary_ids()).prop_map(|(u, s)| Frame::Ack(pb::Ack {
            up_to_sequence: u,
            sequences: s
        })),
        (any::<[u64; 3]>(), 0..3i32, any::<u32>(), arbitrary_ids()).prop_map(|(v, k, d, ids)| {
            Frame::Receipt(pb::Receipt {
                sequence: v[0],
                kind: k,
                by_user_id: v[1],
                by_device_id: d,
                client_message_ids: ids,
                timestamp_ms: v[2],
                ..Default::default()
            })
        }),
        (any::<u64>(), any::<u32>(), arbitrary_ids()).prop_map(|(u, d, ids)| {
            Frame::ReadReceipt(pb::ReadReceipt {
                sender_user_id: u,
                sender_device_id: d,
                client_message_ids: ids,
            })
        }),
        any::<u64>().prop_map(|nonce| Frame::Ping(pb::Ping { nonce })),
        any::<u64>().prop_map(|nonce| Frame::Pong(pb::Pong { nonce })),
        (
            0..21i32,
            ".{0,16}",
            any::<u64>(),
            any::<bool>(),
            any::<u32>()
        )
            .prop_map(|(code, message, id, fatal, retry)| Frame::Error(pb::Error {
                code,
                message,
                client_message_id: id,
                fatal,
                retry_after_ms: retry,
                ..Default::default()
            })),
        (0..3i32, any::<u32>()).prop_map(|(reason, after)| Frame::GoAway(pb::GoAway {
            reason,
            reconnect_after_ms: after
        })),
    ]
}

proptest! {
    #[test]
    fn decode_never_panics_on_any_input(bytes in proptest::collection::vec(any::<u8>(), 0..256), limit in 0u32..300) {
        let mut buf = BytesMut::from(bytes.as_slice());
        // Every call either consumes a frame, waits, or fails; never panics.
        while let Ok(Some(_)) = next_frame(&mut buf, limit) {}
        let _ = bytes_wanted(&buf);
    }

    #[test]
    fn decode_never_panics_on_any_body_of_any_type(type_byte in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..128)) {
        let mut bytes = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        bytes.push(type_byte);
        bytes.extend_from_slice(&body);
        let mut buf = BytesMut::from(bytes.as_slice());
        let _ = next_frame(&mut buf, LIMIT);
    }

    #[test]
    fn encode_then_decode_round_trips_every_frame_type(frames in proptest::collection::vec(arbitrary_frame(), 1..6)) {
        let mut buf = BytesMut::new();
        for frame in &frames {
            let before = buf.len();
            frame.encode(&mut buf);
            prop_assert_eq!(buf.len() - before, frame.wire_len());
        }
        prop_assert_eq!(decode_all(&buf), Ok(frames));
    }

    #[test]
    fn split_at_every_byte_boundary_yields_the_same_frames(frames in proptest::collection::vec(arbitrary_frame(), 1..4)) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire);
        }
        for split in 0..=wire.len() {
            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(part);
                while let Some(frame) = next_frame(&mut buf, LIMIT).expect("valid stream") {
                    decoded.push(frame);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(&decoded, &frames);
        }
    }
}
