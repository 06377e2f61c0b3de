//! Per-connection protocol logic that does no I/O.
//!
//! The delivery window, the handshake state machine (`handshake`), the
//! validation of client frames and the failed-login throttle are plain
//! values driven by the
//! shard's socket loop in `shard::io` (on the shard thread that owns the
//! connection).
//! They take the time as an argument, so tests drive them deterministically.

pub mod handshake;
pub mod noise;
pub mod throttle;
pub mod window;

use crate::config::Limits;
use crate::proto::{pb, ErrorCode, FrameType, PROTOCOL_VERSION};

pub use throttle::AuthThrottle;
pub use window::DeliveryWindow;

/// The version a session speaks with a client offering `offered`, or the
/// error that ends the handshake.
pub fn negotiate_version(offered: u32) -> Result<u32, ErrorCode> {
    if offered == 0 {
        Err(ErrorCode::UnsupportedVersion)
    } else {
        Ok(offered.min(PROTOCOL_VERSION))
    }
}

/// Whether `a` was taken by `net::conn::connected_now` strictly after `b`
/// (the two less than 24 days apart; 4 bytes per connection instead of 8).
/// Of two sessions of one device, the one connected later wins.
pub fn accepted_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Why a Send is refused before it is routed (answered with a non-fatal
/// Error carrying its client message id).
pub fn check_send(send: &pb::Send, limits: &Limits) -> Result<(), ErrorCode> {
    // A payload for every device, or one payload: not both.
    if !send.device_payloads.is_empty() && !send.payload.is_empty() {
        return Err(ErrorCode::UnsupportedFeature);
    }
    // A group message has one payload for every member and no recipient.
    if send.group_id != 0 && (send.recipient_user_id != 0 || !send.device_payloads.is_empty()) {
        return Err(ErrorCode::UnsupportedFeature);
    }
    let max = limits.payload_bytes_max as usize;
    if send.payload.len() > max || send.device_payloads.iter().any(|p| p.payload.len() > max) {
        return Err(ErrorCode::PayloadTooLarge);
    }
    Ok(())
}

/// Whether a client may send this frame type at all once authenticated.
/// Server-to-client types and handshake frames are answered with a fatal
/// UNEXPECTED_FRAME.
pub fn client_may_send_in_session(frame_type: FrameType) -> bool {
    matches!(
        frame_type,
        FrameType::Send
            | FrameType::Ack
            | FrameType::ReadReceipt
            | FrameType::Ping
            | FrameType::Pong
            | FrameType::RequestLinkCode
            | FrameType::ListDevices
            | FrameType::RemoveDevice
            | FrameType::CreateGroup
            | FrameType::UpdateGroup
            | FrameType::GetGroup
            | FrameType::UploadPrekeys
            | FrameType::FetchPrekeys
            | FrameType::SendTyping
            | FrameType::SubscribePresence
            | FrameType::SetPrivacy
            | FrameType::RegisterPush
            | FrameType::RequestMediaGrant
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn negotiates_down_to_our_version_and_rejects_zero() {
        assert_eq!(negotiate_version(1), Ok(1));
        assert_eq!(negotiate_version(7), Ok(PROTOCOL_VERSION));
        assert_eq!(negotiate_version(0), Err(ErrorCode::UnsupportedVersion));
    }

    #[test]
    fn refuses_oversized_payloads_and_a_payload_beside_device_payloads() {
        let limits = Limits::default();
        let mut send = pb::Send {
            client_message_id: 1,
            recipient_user_id: 2,
            payload: Bytes::from(vec![0u8; limits.payload_bytes_max as usize]),
            device_payloads: vec![],
            ..Default::default()
        };
        assert_eq!(check_send(&send, &limits), Ok(()));
        send.payload = Bytes::from(vec![0u8; limits.payload_bytes_max as usize + 1]);
        assert_eq!(check_send(&send, &limits), Err(ErrorCode::PayloadTooLarge));
        send.payload = Bytes::new();
        send.device_payloads.push(pb::DevicePayload::default());
        assert_eq!(check_send(&send, &limits), Ok(()));
        send.device_payloads.push(pb::DevicePayload {
            device_id: 2,
            payload: Bytes::from(vec![0u8; limits.payload_bytes_max as usize + 1]),
        });
        assert_eq!(check_send(&send, &limits), Err(ErrorCode::PayloadTooLarge));
        send.device_payloads.pop();
        send.payload = Bytes::from_static(b"both");
        assert_eq!(
            check_send(&send, &limits),
            Err(ErrorCode::UnsupportedFeature)
        );
    }

    #[test]
    fn session_rejects_server_frames_and_handshake_frames() {
        assert!(client_may_send_in_session(FrameType::Send));
        assert!(!client_may_send_in_session(FrameType::Deliver));
        assert!(!client_may_send_in_session(FrameType::Hello));
        assert!(!client_may_send_in_session(FrameType::Welcome));
    }
}
