//! Prekeys: a device's upload of its identity key, signed prekey and
//! one-time prekeys, fetches of an account's bundle (one one-time prekey
//! per device, each handed out once), and the notice a device gets when
//! fetches leave it few one-time prekeys.
//!
//! The keys live in the metadata database (`meta::keys`), which only the
//! host touches: the engine checks the frame (lengths, counts, the
//! requester's fetch budget) and hands the work over as a [`KeysOp`]; the
//! outcome comes back as `Event::Keys`. A device whose one-time prekeys a
//! fetch takes below `limits.prekeys_low` is told on its home shard: at
//! once when it has a session, else when its next session opens (kept in
//! memory: a restart forgets it, and the device learns its count from its
//! next upload's answer).
//!
//! Invariants:
//! - a fetch costs the requesting device one unit of its per-minute
//!   budget, checked before the database is asked;
//! - keys are opaque: only their lengths are checked.

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use bytes::Bytes;

use super::{Engine, Host, Request, SessionId};
use crate::ids::{DeviceId, InboxKey, UserId};
use crate::meta::{DeviceKeys, IdentityKeys};
use crate::proto::{pb, ErrorCode, Frame};

/// Bytes of a public key: a raw Curve25519 key (Olm / vodozemac), or 33
/// with libsignal's 0x05 type byte first.
pub const KEY_BYTES: [usize; 2] = [32, 33];
/// Bytes of a signature (XEdDSA in libsignal, Ed25519 in Olm).
pub const SIGNATURE_BYTES: usize = 64;

/// Work on the prekey tables, done by the host off the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysOp {
    Upload {
        session: SessionId,
        device: InboxKey,
        request_id: u64,
        identity: Option<IdentityKeys>,
        one_time: Vec<(u32, Bytes)>,
        max: u32,
    },
    /// The bundle of `user`'s devices `devices`.
    Fetch {
        session: SessionId,
        request_id: u64,
        user: UserId,
        devices: Vec<DeviceId>,
    },
}

/// The outcome of a [`KeysOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysDone {
    Stored {
        session: SessionId,
        request_id: u64,
        one_time: u32,
    },
    Bundle {
        session: SessionId,
        request_id: u64,
        user: UserId,
        devices: Vec<DeviceKeys>,
    },
    /// Refused (`PREKEYS_INVALID`) or failed (`INTERNAL`).
    Failed {
        session: SessionId,
        request_id: u64,
        code: ErrorCode,
        message: &'static str,
    },
}

/// Fetch budgets kept before the stale ones are swept.
const BUDGET_ENTRIES_MAX: usize = 65_536;

/// Keys' own state.
#[derive(Debug, Default)]
pub struct Keys {
    /// Fetches per requesting device in the current minute: (minute, count).
    /// Past `BUDGET_ENTRIES_MAX` entries, those of earlier minutes go.
    budget: HashMap<InboxKey, (u64, u32)>,
    /// Low-prekey notices for devices homed here that had no session.
    low: HashMap<InboxKey, u32>,
}

fn refuse(
    host: &mut impl Host,
    session: SessionId,
    request_id: u64,
    code: ErrorCode,
    message: &str,
) {
    host.send(session, &crate::proto::refusal(code, message, request_id));
}

fn key_ok(key: &[u8]) -> bool {
    match key.len() {
        32 => true,
        33 => key[0] == 0x05,
        _ => false,
    }
}

fn to_frame(request_id: u64, user: UserId, devices: Vec<DeviceKeys>) -> Frame {
    Frame::PrekeyBundle(pb::PrekeyBundle {
        request_id,
        user_id: user.0,
        devices: devices
            .into_iter()
            .map(|d| pb::DeviceBundle {
                device_id: d.device.0,
                identity_key: d.identity.identity_key.into(),
                signed_prekey: Some(pb::SignedPrekey {
                    key_id: d.identity.signed_prekey_id,
                    public_key: d.identity.signed_prekey.into(),
                    signature: d.identity.signature.into(),
                }),
                one_time_prekey: d.one_time.map(|(key_id, key)| pb::Prekey {
                    key_id,
                    public_key: key.into(),
                }),
            })
            .collect(),
    })
}

impl Engine {
    pub(super) fn on_upload_prekeys(
        &mut self,
        device: InboxKey,
        session: SessionId,
        upload: pb::UploadPrekeys,
        host: &mut impl Host,
    ) {
        let id = upload.request_id;
        let max = self.limits.prekeys_max;
        let identity = match (upload.identity_key.is_empty(), upload.signed_prekey) {
            (true, None) => None,
            (false, Some(spk))
                if key_ok(&upload.identity_key)
                    && key_ok(&spk.public_key)
                    && spk.signature.len() == SIGNATURE_BYTES =>
            {
                Some(IdentityKeys {
                    identity_key: upload.identity_key.to_vec(),
                    signed_prekey_id: spk.key_id,
                    signed_prekey: spk.public_key.to_vec(),
                    signature: spk.signature.to_vec(),
                })
            }
            _ => {
                return refuse(
                    host,
                    session,
                    id,
                    ErrorCode::PrekeysInvalid,
                    "an identity key (32 bytes, or 33 starting 0x05) comes with a signed prekey of the same form and a 64-byte signature",
                )
            }
        };
        if upload.one_time_prekeys.len() > max as usize
            || upload
                .one_time_prekeys
                .iter()
                .any(|k| !key_ok(&k.public_key))
        {
            return refuse(
                host,
                session,
                id,
                ErrorCode::PrekeysInvalid,
                "too many one-time prekeys, or one of a wrong length",
            );
        }
        host.keys(KeysOp::Upload {
            session,
            device,
            request_id: id,
            identity,
            one_time: upload
                .one_time_prekeys
                .into_iter()
                .map(|k| (k.key_id, k.public_key))
                .collect(),
            max,
        });
    }

    pub(super) fn on_fetch_prekeys(
        &mut self,
        device: InboxKey,
        session: SessionId,
        fetch: pb::FetchPrekeys,
        host: &mut impl Host,
    ) {
        let user = UserId(fetch.user_id);
        let minute = self.now_ms() / 60_000;
        let per_minute = self.limits.prekey_fetches_per_minute;
        if self.keys.budget.len() >= BUDGET_ENTRIES_MAX {
            self.keys.budget.retain(|_, (m, _)| *m == minute);
        }
        let used = self.keys.budget.entry(device).or_insert((minute, 0));
        if used.0 != minute {
            *used = (minute, 0);
        }
        if used.1 >= per_minute {
            let retry_after_ms = (60_000 - self.now_ms() % 60_000) as u32;
            host.send(
                session,
                &Frame::Error(pb::Error {
                    code: ErrorCode::RateLimited as i32,
                    message: "too many prekey fetches; try again later".into(),
                    client_message_id: fetch.request_id,
                    retry_after_ms,
                    ..Default::default()
                }),
            );
            return;
        }
        used.1 += 1;
        let Some((_, devices)) = self.directory.device_set(user) else {
            return refuse(
                host,
                session,
                fetch.request_id,
                ErrorCode::UnknownRecipient,
                "no such user",
            );
        };
        host.keys(KeysOp::Fetch {
            session,
            request_id: fetch.request_id,
            user,
            devices,
        });
    }

    /// The host finished a [`KeysOp`].
    pub(super) fn keys_done(&mut self, done: KeysDone, host: &mut impl Host) {
        match done {
            KeysDone::Stored {
                session,
                request_id,
                one_time,
            } => host.send(
                session,
                &Frame::PrekeysStored(pb::PrekeysStored {
                    request_id,
                    one_time_prekeys: one_time,
                }),
            ),
            KeysDone::Bundle {
                session,
                request_id,
                user,
                devices,
            } => {
                // A device this fetch took below the threshold is told once
                // (the fetch that crossed it).
                let low = self.limits.prekeys_low;
                for d in &devices {
                    if d.one_time.is_some() && d.remaining + 1 == low {
                        let device = InboxKey {
                            user,
                            device: d.device,
                        };
                        let request = Request::PrekeysLow {
                            device,
                            remaining: d.remaining,
                        };
                        self.route(self.home_of(user), request, host);
                    }
                }
                host.send(session, &to_frame(request_id, user, devices));
            }
            KeysDone::Failed {
                session,
                request_id,
                code,
                message,
            } => refuse(host, session, request_id, code, message),
        }
    }

    /// A device homed here has few one-time prekeys left: tell its session,
    /// or its next one.
    pub(super) fn prekeys_low(&mut self, device: InboxKey, remaining: u32, host: &mut impl Host) {
        let frame = Frame::PrekeysLow(pb::PrekeysLow {
            one_time_prekeys: remaining,
        });
        match self.session(device).map(|s| s.id) {
            Some(live) if !host.closing(live) => host.send(live, &frame),
            _ => {
                self.keys.low.insert(device, remaining);
            }
        }
    }

    /// A session opened: a low-prekey notice kept for it goes out.
    pub(super) fn keys_session_opened(
        &mut self,
        device: InboxKey,
        session: SessionId,
        host: &mut impl Host,
    ) {
        if let Some(remaining) = self.keys.low.remove(&device) {
            host.send(
                session,
                &Frame::PrekeysLow(pb::PrekeysLow {
                    one_time_prekeys: remaining,
                }),
            );
        }
    }
}
