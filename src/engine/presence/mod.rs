//! Presence, last seen and typing.
//!
//! A user is online while any of its devices has a session; presence lives
//! on the user's home shard, where its sessions are. When the last session
//! closes the user enters a grace period (`limits.presence_grace_ms`); a
//! session opening within it cancels it and nobody is told (a flapping
//! mobile connection costs its subscribers nothing). When it ends (the
//! `Event::Tick` after its end) the user is offline, last seen at the
//! moment its last session closed.
//!
//! A session follows up to `limits.presence_subscriptions_max` users
//! (`SubscribePresence`, replacing its list): its shard asks each followed
//! user's home shard (`Request::PresenceWatch`, one per shard), which
//! records the watcher and answers with the current state; every change is
//! sent to the watchers' shards, one `Request::PresenceNotify` per shard
//! per change batch, and each shard writes PresenceUpdate frames to its
//! sessions. A session's watches are dropped when it closes
//! (`Request::PresenceUnwatch`); a notice for a session that has gone is
//! answered the same way.
//!
//! Last seen (the privacy rule): a user who hides its last seen shows it to
//! nobody and sees nobody's (WhatsApp's reciprocity); online is shown to
//! everyone who follows.
//!
//! Typing: a notice goes to the recipient's home shard and to its devices'
//! live sessions there, never stored, dropped when none is live; each
//! device may send `limits.typing_per_second`, more are dropped.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{ConnRef, Engine, Host, Request, SessionId};
use crate::ids::{InboxKey, ShardId, UserId};
use crate::proto::{pb, ErrorCode, Frame, LastSeenVisibility};

/// Typing budgets kept before the stale ones are swept.
const TYPING_ENTRIES_MAX: usize = 65_536;

/// A state change of a user, as its home shard tells a watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PresenceState {
    pub user: UserId,
    pub online: bool,
    /// 0 when online, unknown, or hidden by the user.
    pub last_seen_ms: u64,
}

/// Presence's own state.
#[derive(Debug, Default)]
pub struct Presence {
    /// Users homed here shown as online (a session is live, or their grace
    /// period has not ended).
    online: HashSet<UserId>,
    /// Users homed here in their grace period: when their last session
    /// closed.
    grace: BTreeMap<UserId, u64>,
    /// Users homed here: the last time one of their devices was seen.
    last_seen: HashMap<UserId, u64>,
    /// Users homed here who hide their last seen.
    hidden: HashSet<UserId>,
    /// Users homed here → the sessions (anywhere) following them.
    watchers: HashMap<UserId, Vec<ConnRef>>,
    /// Sessions here → their device and the users they follow.
    following: HashMap<SessionId, (InboxKey, Vec<UserId>)>,
    /// Typing notices per device in the current second.
    typing: HashMap<InboxKey, (u64, u32)>,
}

impl Engine {
    /// Takes the presence data of the users homed here (at start).
    pub fn load_presence(&mut self, last_seen: HashMap<u64, u64>, hidden: HashSet<u64>) {
        let p = &mut self.presence;
        p.last_seen = last_seen.into_iter().map(|(u, t)| (UserId(u), t)).collect();
        p.hidden = hidden.into_iter().map(UserId).collect();
    }

    /// Whether a grace period waits for `Event::Tick`.
    pub fn presence_due(&self) -> bool {
        !self.presence.grace.is_empty()
    }

    fn user_has_session(&self, user: UserId) -> bool {
        self.sessions_of(user).next().is_some()
    }

    /// The live sessions of `user`'s devices (homed here).
    fn sessions_of(&self, user: UserId) -> impl Iterator<Item = (InboxKey, SessionId)> + '_ {
        let from = InboxKey {
            user,
            device: crate::ids::DeviceId(0),
        };
        let to = InboxKey {
            user,
            device: crate::ids::DeviceId(u32::MAX),
        };
        self.sessions_in(from..=to)
    }

    /// Sends a presence request, counting those that leave the shard.
    fn route_presence(&mut self, shard: ShardId, request: Request, host: &mut impl Host) {
        if shard != self.id {
            self.metrics.presence_requests_remote.inc();
        }
        self.route(shard, request, host);
    }

    /// A session of `user` opened or closed: update what it shows.
    pub(super) fn presence_changed(&mut self, user: UserId, host: &mut impl Host) {
        let now = self.now_ms();
        if self.user_has_session(user) {
            if self.presence.grace.remove(&user).is_none() && self.presence.online.insert(user) {
                self.tell_watchers(user, host);
            }
        } else if self.presence.online.contains(&user) {
            self.presence.grace.entry(user).or_insert(now);
            self.presence.last_seen.insert(user, now);
        }
    }

    /// Ends the grace periods that are over.
    pub(super) fn presence_tick(&mut self, host: &mut impl Host) {
        let now = self.now_ms();
        let grace = u64::from(self.limits.presence_grace_ms);
        let over: Vec<(UserId, u64)> = self
            .presence
            .grace
            .iter()
            .filter(|(_, &since)| since + grace <= now)
            .map(|(u, s)| (*u, *s))
            .collect();
        for (user, since) in over {
            self.presence.grace.remove(&user);
            self.presence.online.remove(&user);
            self.presence.last_seen.insert(user, since);
            self.tell_watchers(user, host);
        }
    }

    fn state_of(&self, user: UserId) -> PresenceState {
        let online = self.presence.online.contains(&user);
        let last_seen_ms = if online || self.presence.hidden.contains(&user) {
            0
        } else {
            self.presence.last_seen.get(&user).copied().unwrap_or(0)
        };
        PresenceState {
            user,
            online,
            last_seen_ms,
        }
    }

    /// Sends `user`'s state to every session following it, one request per
    /// shard.
    fn tell_watchers(&mut self, user: UserId, host: &mut impl Host) {
        let Some(watchers) = self.presence.watchers.get(&user) else {
            return;
        };
        let state = self.state_of(user);
        let mut by_shard: BTreeMap<ShardId, Vec<(SessionId, PresenceState)>> = BTreeMap::new();
        for w in watchers {
            by_shard.entry(w.shard).or_default().push((w.id, state));
        }
        for (shard, updates) in by_shard {
            self.metrics.presence_notices.inc();
            self.route_presence(shard, Request::PresenceNotify { updates }, host);
        }
    }

    // ---- frames ----------------------------------------------------------

    pub(super) fn on_subscribe_presence(
        &mut self,
        device: InboxKey,
        session: SessionId,
        subscribe: pb::SubscribePresence,
        host: &mut impl Host,
    ) {
        if subscribe.user_ids.len() > self.limits.presence_subscriptions_max as usize {
            return host.send(
                session,
                &crate::proto::error_frame(
                    ErrorCode::TooManyIds,
                    "too many users in one SubscribePresence",
                    false,
                ),
            );
        }
        let mut users: Vec<UserId> = subscribe.user_ids.into_iter().map(UserId).collect();
        users.sort();
        users.dedup();
        users.retain(|&u| self.directory.user_exists(u));
        self.unfollow(session, host);
        let me = ConnRef {
            shard: self.id,
            id: session,
        };
        let mut by_shard: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for &u in &users {
            by_shard.entry(self.home_of(u)).or_default().push(u);
        }
        self.presence.following.insert(session, (device, users));
        for (shard, users) in by_shard {
            self.route_presence(shard, Request::PresenceWatch { watcher: me, users }, host);
        }
    }

    /// Drops every watch of `session` (it closed, or subscribes anew).
    pub(super) fn unfollow(&mut self, session: SessionId, host: &mut impl Host) {
        let Some((_, users)) = self.presence.following.remove(&session) else {
            return;
        };
        let me = ConnRef {
            shard: self.id,
            id: session,
        };
        let mut by_shard: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for u in users {
            by_shard.entry(self.home_of(u)).or_default().push(u);
        }
        for (shard, users) in by_shard {
            self.route_presence(shard, Request::PresenceUnwatch { watcher: me, users }, host);
        }
    }

    pub(super) fn on_set_privacy(
        &mut self,
        device: InboxKey,
        session: SessionId,
        set: pb::SetPrivacy,
        host: &mut impl Host,
    ) {
        let hidden = set.last_seen() == LastSeenVisibility::Nobody;
        host.account(super::devices::AccountOp::SetLastSeenHidden {
            session,
            user: device.user,
            hidden,
        });
    }

    /// The privacy setting is stored: it applies, and its session hears.
    pub(super) fn privacy_set(
        &mut self,
        session: SessionId,
        user: UserId,
        hidden: bool,
        host: &mut impl Host,
    ) {
        if hidden {
            self.presence.hidden.insert(user);
        } else {
            self.presence.hidden.remove(&user);
        }
        let last_seen = if hidden {
            LastSeenVisibility::Nobody
        } else {
            LastSeenVisibility::Everyone
        };
        host.send(
            session,
            &Frame::Privacy(pb::Privacy {
                last_seen: last_seen as i32,
            }),
        );
        if !self.presence.online.contains(&user) {
            self.tell_watchers(user, host);
        }
    }

    pub(super) fn on_send_typing(
        &mut self,
        device: InboxKey,
        typing: pb::SendTyping,
        host: &mut impl Host,
    ) {
        let second = self.now_ms() / 1_000;
        if self.presence.typing.len() >= TYPING_ENTRIES_MAX {
            self.presence.typing.retain(|_, (s, _)| *s == second);
        }
        let used = self.presence.typing.entry(device).or_insert((second, 0));
        if used.0 != second {
            *used = (second, 0);
        }
        if used.1 >= self.limits.typing_per_second {
            self.metrics.typing_dropped.inc();
            return;
        }
        used.1 += 1;
        let to = UserId(typing.to_user_id);
        if !self.directory.user_exists(to) {
            return;
        }
        let state = typing.state();
        if state == pb::TypingState::Unspecified {
            return;
        }
        self.route(
            self.home_of(to),
            Request::Typing {
                from: device,
                to,
                state: state as i32,
            },
            host,
        );
    }

    // ---- requests ----------------------------------------------------------

    pub(super) fn presence_watch(
        &mut self,
        watcher: ConnRef,
        users: Vec<UserId>,
        host: &mut impl Host,
    ) {
        let mut states = Vec::with_capacity(users.len());
        for user in users {
            let list = self.presence.watchers.entry(user).or_default();
            if !list.contains(&watcher) {
                list.push(watcher);
            }
            states.push((watcher.id, self.state_of(user)));
        }
        self.route(
            watcher.shard,
            Request::PresenceNotify { updates: states },
            host,
        );
    }

    pub(super) fn presence_unwatch(&mut self, watcher: ConnRef, users: Vec<UserId>) {
        for user in users {
            if let Some(list) = self.presence.watchers.get_mut(&user) {
                list.retain(|w| *w != watcher);
                if list.is_empty() {
                    self.presence.watchers.remove(&user);
                }
            }
        }
    }

    /// States for sessions here; a session that no longer follows the user
    /// (it closed or changed its list) makes its watch go.
    pub(super) fn presence_notify(
        &mut self,
        updates: Vec<(SessionId, PresenceState)>,
        host: &mut impl Host,
    ) {
        let mut stale: BTreeMap<ShardId, Vec<(SessionId, UserId)>> = BTreeMap::new();
        for (session, state) in updates {
            let follower = self
                .presence
                .following
                .get(&session)
                .filter(|(_, users)| users.binary_search(&state.user).is_ok())
                .map(|(device, _)| *device);
            let Some(device) = follower else {
                stale
                    .entry(self.home_of(state.user))
                    .or_default()
                    .push((session, state.user));
                continue;
            };
            // Who hides its own last seen sees nobody's; its home is here.
            let hides = self.presence.hidden.contains(&device.user);
            host.send(
                session,
                &Frame::PresenceUpdate(pb::PresenceUpdate {
                    user_id: state.user.0,
                    online: state.online,
                    last_seen_ms: if hides { 0 } else { state.last_seen_ms },
                }),
            );
        }
        for (shard, gone) in stale {
            for (session, user) in gone {
                let watcher = ConnRef {
                    shard: self.id,
                    id: session,
                };
                self.route_presence(
                    shard,
                    Request::PresenceUnwatch {
                        watcher,
                        users: vec![user],
                    },
                    host,
                );
            }
        }
    }

    /// A typing notice for `to`, homed here: to its live sessions.
    pub(super) fn typing_here(
        &mut self,
        from: InboxKey,
        to: UserId,
        state: i32,
        host: &mut impl Host,
    ) {
        let frame = Frame::Typing(pb::Typing {
            from_user_id: from.user.0,
            from_device_id: from.device.0,
            state,
        });
        let sessions: Vec<SessionId> = self
            .sessions_of(to)
            .filter(|(d, _)| *d != from)
            .map(|(_, s)| s)
            .collect();
        for session in sessions {
            if !host.closing(session) {
                host.send(session, &frame);
            }
        }
    }
}
