//! Linked devices: the frames that manage an account's devices
//! (RequestLinkCode, ListDevices, RemoveDevice) and what a removal does on
//! the account's home shard.
//!
//! The device list itself lives in the metadata database (`meta`), which
//! only the host may touch (its calls block): the engine checks who may ask,
//! hands the work to the host as an [`AccountOp`], and gets the outcome
//! back as `Event::Account` with an [`AccountDone`]. A removal then drops the
//! device's inbox (an ack record covering everything in it, so recovery
//! agrees) and closes its live session with GoAway DEVICE_REMOVED.
//!
//! Invariants:
//! - only the primary asks for link codes; a companion may remove only
//!   itself, the primary any companion; nobody removes the primary;
//! - a removed device's inbox is empty from the removal on, and it has no
//!   session (one opening after the removal is closed at once).

#[cfg(test)]
mod tests;

use tracing::warn;

use super::{Closing, Engine, Host, SessionId};
use crate::ids::{DeviceId, InboxKey, InboxSeq, UserId, PRIMARY_DEVICE};
use crate::proto::{pb, ErrorCode, Frame, GoAwayReason};

/// Work on the account's device list, done by the host off the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountOp {
    /// A one-time link code for `user`, valid for `ttl_ms` from `now_ms`.
    CreateLinkCode {
        session: SessionId,
        user: UserId,
        now_ms: u64,
        ttl_ms: u64,
    },
    /// The account's device list.
    ListDevices { session: SessionId, user: UserId },
    /// Where `device`'s wake-ups go (`None`: nowhere).
    SetPush {
        session: SessionId,
        device: InboxKey,
        endpoint: Option<crate::meta::PushEndpoint>,
    },
    /// Whether `user` hides its last seen (SetPrivacy).
    SetLastSeenHidden {
        session: SessionId,
        user: UserId,
        hidden: bool,
    },
    /// Remove a companion (already checked: `device` is not the primary,
    /// and the asker may remove it).
    RemoveDevice {
        session: SessionId,
        user: UserId,
        device: DeviceId,
    },
}

/// The outcome of an [`AccountOp`].
#[derive(Clone, Debug, PartialEq)]
pub enum AccountDone {
    LinkCode {
        session: SessionId,
        code: String,
        expires_at_ms: u64,
    },
    DeviceList {
        session: SessionId,
        list: pb::DeviceList,
    },
    /// The device is gone from the database, its secret with it.
    Removed {
        session: SessionId,
        user: UserId,
        device: DeviceId,
        version: u64,
    },
    /// The push endpoint is stored.
    PushSet {
        session: SessionId,
        kind: crate::proto::PushKind,
    },
    /// The privacy setting is stored.
    LastSeenHidden {
        session: SessionId,
        user: UserId,
        hidden: bool,
    },
    /// Refused or failed; answered with this (non-fatal) Error.
    Failed {
        session: SessionId,
        code: ErrorCode,
        message: &'static str,
    },
}

fn refuse(host: &mut impl Host, session: SessionId, code: ErrorCode, message: &str) {
    host.send(session, &crate::proto::error_frame(code, message, false));
}

impl Engine {
    pub(super) fn on_request_link_code(
        &mut self,
        device: InboxKey,
        session: SessionId,
        host: &mut impl Host,
    ) {
        if device.device != PRIMARY_DEVICE {
            return refuse(
                host,
                session,
                ErrorCode::NotPrimary,
                "only the primary device links devices",
            );
        }
        host.account(AccountOp::CreateLinkCode {
            session,
            user: device.user,
            now_ms: self.now_ms(),
            ttl_ms: u64::from(self.limits.link_code_ttl_ms),
        });
    }

    pub(super) fn on_list_devices(
        &mut self,
        device: InboxKey,
        session: SessionId,
        host: &mut impl Host,
    ) {
        host.account(AccountOp::ListDevices {
            session,
            user: device.user,
        });
    }

    pub(super) fn on_remove_device(
        &mut self,
        device: InboxKey,
        session: SessionId,
        remove: pb::RemoveDevice,
        host: &mut impl Host,
    ) {
        let target = DeviceId(remove.device_id);
        if target == PRIMARY_DEVICE || !self.directory.device_exists(device.user, target) {
            return refuse(
                host,
                session,
                ErrorCode::UnknownDevice,
                "no such companion device",
            );
        }
        if device.device != PRIMARY_DEVICE && device.device != target {
            return refuse(
                host,
                session,
                ErrorCode::NotPrimary,
                "a companion may remove only itself",
            );
        }
        host.account(AccountOp::RemoveDevice {
            session,
            user: device.user,
            device: target,
        });
    }

    /// The host finished an [`AccountOp`].
    pub(super) fn account_done(&mut self, done: AccountDone, host: &mut impl Host) {
        match done {
            AccountDone::LinkCode {
                session,
                code,
                expires_at_ms,
            } => host.send(
                session,
                &Frame::LinkCode(pb::LinkCode {
                    code,
                    expires_at_ms,
                }),
            ),
            AccountDone::DeviceList { session, list } => {
                host.send(session, &Frame::DeviceList(list))
            }
            AccountDone::LastSeenHidden {
                session,
                user,
                hidden,
            } => self.privacy_set(session, user, hidden, host),
            AccountDone::PushSet { session, kind } => self.push_set(session, kind, host),
            AccountDone::Removed {
                session,
                user,
                device,
                version,
            } => {
                // The asker hears first: it may be the removed device itself.
                host.send(
                    session,
                    &Frame::DeviceRemoved(pb::DeviceRemoved {
                        device_id: device.0,
                        version,
                    }),
                );
                self.device_removed(InboxKey { user, device }, host);
            }
            AccountDone::Failed {
                session,
                code,
                message,
            } => refuse(host, session, code, message),
        }
    }

    /// Drops a removed device's inbox and closes its live session.
    pub(super) fn device_removed(&mut self, inbox: InboxKey, host: &mut impl Host) {
        let last = self.log.last_seq(inbox);
        if last.0 > 0 {
            match self.log.ack(inbox, InboxSeq(last.0), &[]) {
                Ok(outcome) if outcome.removed > 0 => host.commit_due(),
                Ok(_) => {}
                Err(err) => warn!(%inbox, %err, "dropping a removed device's inbox failed"),
            }
        }
        if let Some(live) = self.session(inbox).map(|s| s.id) {
            host.close(live, &removed_frame(), Closing::Removed);
        }
    }

    /// Whether a session about to open belongs to a device removed since
    /// its Hello was checked; if so it is told and closed.
    pub(super) fn refuse_removed(
        &self,
        device: InboxKey,
        session: SessionId,
        host: &mut impl Host,
    ) -> bool {
        if self.directory.device_exists(device.user, device.device) {
            return false;
        }
        host.close(session, &removed_frame(), Closing::Removed);
        true
    }
}

fn removed_frame() -> Frame {
    Frame::GoAway(pb::GoAway {
        reason: GoAwayReason::DeviceRemoved as i32,
        reconnect_after_ms: 0,
    })
}
