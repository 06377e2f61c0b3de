//! Push wake-ups, as the delivery core sees them: a device registers where
//! its wake-ups go (`RegisterPush`, stored through the host), and an entry
//! made deliverable for a device with no live session asks the host for a
//! wake-up (`Host::wake`), at most once per `push.interval_ms` per device
//! until the device connects. The sending itself (Web Push with VAPID, or
//! the operator's webhook) is the host's, off the shards (`crate::push`).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Engine, Host, SessionId};
use crate::ids::InboxKey;
use crate::meta::PushEndpoint;
use crate::proto::{pb, ErrorCode, Frame, PushKind};

/// Longest endpoint URL or token kept, bytes.
pub const ENDPOINT_BYTES_MAX: usize = 1_024;
/// Devices remembered as woken before the old entries are swept.
const WOKEN_ENTRIES_MAX: usize = 65_536;

/// Push's own state.
#[derive(Debug, Default)]
pub struct Push {
    /// The server's VAPID public key, when wake-ups are on.
    vapid_public_key: Option<Arc<Vec<u8>>>,
    /// Whether the operator's webhook is configured.
    webhook: bool,
    /// Whether `http://` Web Push endpoints are accepted.
    allow_http: bool,
    interval_ms: u64,
    /// Devices woken (when), forgotten when they connect.
    woken: HashMap<InboxKey, u64>,
}

impl Engine {
    /// Turns wake-ups on (the host has a push thread).
    pub fn enable_push(
        &mut self,
        vapid_public_key: Arc<Vec<u8>>,
        webhook: bool,
        allow_http: bool,
        interval_ms: u64,
    ) {
        self.push = Push {
            vapid_public_key: Some(vapid_public_key),
            webhook,
            allow_http,
            interval_ms,
            woken: HashMap::new(),
        };
    }

    pub(super) fn on_register_push(
        &mut self,
        device: InboxKey,
        session: SessionId,
        register: pb::RegisterPush,
        host: &mut impl Host,
    ) {
        match self.push_endpoint(register) {
            Ok(endpoint) => host.account(super::devices::AccountOp::SetPush {
                session,
                device,
                endpoint,
            }),
            Err((code, message)) => {
                host.send(session, &crate::proto::error_frame(code, message, false))
            }
        }
    }

    /// What a RegisterPush asks to store, or why it is refused.
    fn push_endpoint(
        &self,
        register: pb::RegisterPush,
    ) -> Result<Option<PushEndpoint>, (ErrorCode, &'static str)> {
        if self.push.vapid_public_key.is_none() {
            return Err((ErrorCode::UnsupportedFeature, "push wake-ups are off"));
        }
        if register.endpoint.len() > ENDPOINT_BYTES_MAX {
            return Err((ErrorCode::MalformedFrame, "push endpoint too long"));
        }
        match register.kind() {
            PushKind::Unspecified => Ok(None),
            PushKind::WebPush
                if register.endpoint.starts_with("https://")
                    || (self.push.allow_http && register.endpoint.starts_with("http://")) =>
            {
                Ok(Some(PushEndpoint::WebPush(register.endpoint)))
            }
            PushKind::WebPush => Err((
                ErrorCode::MalformedFrame,
                "a Web Push endpoint is an https:// URL",
            )),
            PushKind::Webhook if self.push.webhook && !register.endpoint.is_empty() => {
                Ok(Some(PushEndpoint::Webhook(register.endpoint)))
            }
            PushKind::Webhook => Err((
                ErrorCode::UnsupportedFeature,
                "no webhook is configured, or the token is empty",
            )),
        }
    }

    /// The endpoint is stored (or removed).
    pub(super) fn push_set(&mut self, session: SessionId, kind: PushKind, host: &mut impl Host) {
        let key = self.push.vapid_public_key.clone().unwrap_or_default();
        host.send(
            session,
            &Frame::PushRegistered(pb::PushRegistered {
                kind: kind as i32,
                vapid_public_key: bytes::Bytes::from(key.as_ref().clone()),
            }),
        );
    }

    /// Something became deliverable for `device`, which has no session.
    pub(super) fn maybe_wake(&mut self, device: InboxKey, host: &mut impl Host) {
        if self.push.vapid_public_key.is_none() || device.is_relay() || device.is_group() {
            return;
        }
        let now = self.now_ms();
        let interval = self.push.interval_ms;
        let woken = &mut self.push.woken;
        if woken.len() >= WOKEN_ENTRIES_MAX {
            woken.retain(|_, at| now.saturating_sub(*at) < interval);
        }
        if woken
            .get(&device)
            .is_some_and(|at| now.saturating_sub(*at) < interval)
        {
            return;
        }
        woken.insert(device, now);
        host.wake(device);
    }

    /// A device connected: its next wake-up may go at once.
    pub(super) fn push_session_opened(&mut self, device: InboxKey) {
        self.push.woken.remove(&device);
    }
}
