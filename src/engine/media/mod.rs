//! Media grants, as the delivery core sees them: a device asks over its chat
//! connection for a token (`RequestMediaGrant`) and gets one signed with the
//! server's media key (`MediaGrant`), bound to the device, short-lived, and
//! for uploads of at most a stated size or the downloads of one blob. The media
//! service (`crate::media`, its own threads) checks the token; the shard only
//! signs, so a grant costs one HMAC and touches no storage.

use std::sync::Arc;

use super::{Engine, Host, SessionId};
use crate::ids::InboxKey;
use crate::media::token::{Grant, MediaKey, Subject};
use crate::proto::{pb, ErrorCode, Frame, MediaGrantKind};

/// Length of a blob id (SHA-256).
pub const BLOB_ID_BYTES: usize = 32;

/// Media's own state: present when the media service runs.
#[derive(Debug)]
pub struct Media {
    key: MediaKey,
    /// The base URL handed out with each grant.
    url: Arc<str>,
    grant_ttl_ms: u64,
    blob_bytes_max: u64,
}

impl Engine {
    /// Turns grants on (the host runs the media service).
    pub fn enable_media(
        &mut self,
        key: MediaKey,
        url: Arc<str>,
        grant_ttl_ms: u64,
        blob_bytes_max: u64,
    ) {
        self.media = Some(Media {
            key,
            url,
            grant_ttl_ms,
            blob_bytes_max,
        });
    }

    pub(super) fn on_request_media_grant(
        &mut self,
        device: InboxKey,
        session: SessionId,
        request: pb::RequestMediaGrant,
        host: &mut impl Host,
    ) {
        let now = self.now_ms();
        let frame = match self.media_grant(device, &request, now) {
            Ok(frame) => frame,
            Err((code, message)) => crate::proto::refusal(code, message, request.request_id),
        };
        host.send(session, &frame);
    }

    /// The grant a request earns, or why it is refused.
    fn media_grant(
        &self,
        device: InboxKey,
        request: &pb::RequestMediaGrant,
        now_ms: u64,
    ) -> Result<Frame, (ErrorCode, &'static str)> {
        let Some(media) = &self.media else {
            return Err((ErrorCode::UnsupportedFeature, "the media service is off"));
        };
        let subject = match request.kind() {
            MediaGrantKind::Upload if request.size == 0 => {
                return Err((ErrorCode::MalformedFrame, "an upload grant needs a size"))
            }
            MediaGrantKind::Upload if request.size > media.blob_bytes_max => {
                return Err((
                    ErrorCode::PayloadTooLarge,
                    "the blob is larger than media.blob_bytes_max",
                ))
            }
            MediaGrantKind::Upload => Subject::Upload {
                size_max: request.size,
            },
            MediaGrantKind::Download => Subject::Download {
                blob: request.blob_id.as_ref().try_into().map_err(|_| {
                    (
                        ErrorCode::MalformedFrame,
                        "a blob id is the 32-byte SHA-256 of the blob",
                    )
                })?,
            },
            MediaGrantKind::Unspecified => {
                return Err((ErrorCode::MalformedFrame, "the grant kind is missing"))
            }
        };
        let grant = Grant {
            user: device.user.0,
            device: device.device.0,
            expires_at_ms: now_ms.saturating_add(media.grant_ttl_ms),
            subject,
        };
        Ok(Frame::MediaGrant(pb::MediaGrant {
            request_id: request.request_id,
            kind: request.kind,
            token: grant.sign(&media.key),
            url: media.url.to_string(),
            expires_at_ms: grant.expires_at_ms,
            size_max: match subject {
                Subject::Upload { size_max } => size_max,
                Subject::Download { .. } => 0,
            },
        }))
    }
}

#[cfg(test)]
mod tests;
