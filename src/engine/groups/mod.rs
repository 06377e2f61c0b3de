//! Groups: membership kept on the group's home shard, one order of
//! messages per group, and fan-out that stores each message once per shard
//! holding members.
//!
//! A group lives on its home shard (`route::shard_for` on its id): its
//! name, version and members are in this feature's memory there, loaded
//! from the metadata database at start; a change is written to the
//! database by the host (off the shard) before it takes effect here. Its
//! order is the group sequence, assigned here: every message and every
//! change (an event) takes the next one, so a send racing with a change
//! lands on one side of it for every member.
//!
//! Fan-out: the home shard appends one group-message record holding the
//! payload, an entry for each member device homed here, an entry in its
//! relay inbox for each other shard holding members, and the list of those
//! members. Once durable it answers the sender (ServerAck with the group
//! sequence), makes the local entries deliverable and forwards the message
//! to each of those shards as one request carrying the shared payload
//! buffer. Each stores it once (one record, one entry per member device
//! there) and answers `Reply::Relayed`, which drops the relay entry. A
//! crash before that forwards it again at start (`Event::Recovered`); the
//! receiving shard knows the last group sequence it stored
//! (`Log::group_seq_stored`) and takes a repeat for what it is. Forwards
//! leave in commit order over FIFO channels, so every shard stores a
//! group's messages in group order, and every member device reads them in
//! that order from its inbox.
//!
//! Invariants:
//! - one change per group at a time (the next waits, at most
//!   `CHANGES_WAITING_MAX`), so the database and memory never disagree on
//!   which change came first;
//! - a group's message reaches the devices of the members at its sequence
//!   (the remote ones as listed in its record), never those added later;
//!   a removed member gets the removal event, then nothing.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use prost::Message;
use tracing::{error, warn};

use super::{AfterCommit, ConnRef, Engine, Host, RelayRef, Reply, Request, SessionId};
use crate::ids::{ClientMessageId, InboxKey, ShardId, UserId};
use crate::meta::{clip_group_name, GroupRow};
use crate::proto::{pb, ErrorCode, Frame, GroupAction};
use crate::route::shard_for;
use crate::store::{CommitTicket, NewGroupMessage};

/// Changes to one group waiting while another is written; past it a
/// change gets SERVER_BUSY.
pub const CHANGES_WAITING_MAX: usize = 16;

/// Work on the group tables of the metadata database, done by the host off
/// the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupOp {
    /// A new group with a fresh id (chosen by the database).
    Create {
        session: SessionId,
        creator: InboxKey,
        request_id: u64,
        name: String,
        members: Vec<(UserId, bool)>,
    },
    /// One change to a group homed here.
    Save {
        group: u64,
        name: String,
        version: u64,
        upserts: Vec<(UserId, bool)>,
        removals: Vec<UserId>,
    },
}

/// The outcome of a [`GroupOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupDone {
    Created {
        session: SessionId,
        creator: InboxKey,
        request_id: u64,
        row: GroupRow,
    },
    CreateFailed {
        session: SessionId,
        request_id: u64,
    },
    /// The change in flight for `group` was written (`ok`) or not.
    Saved {
        group: u64,
        ok: bool,
    },
}

/// A change asked of a group's home shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub origin: ConnRef,
    pub actor: InboxKey,
    pub request_id: u64,
    pub group: u64,
    pub action: GroupAction,
    pub users: Vec<UserId>,
    pub name: String,
}

/// A change written to the database and waiting to take effect.
#[derive(Debug)]
struct Planned {
    change: Change,
    name: String,
    members: BTreeMap<UserId, bool>,
    /// Events in the group's order, and users who get them without being
    /// members any more (the removed).
    events: Vec<pb::GroupEvent>,
    departed: Vec<UserId>,
}

/// A group homed here.
#[derive(Debug)]
struct Group {
    name: String,
    version: u64,
    members: BTreeMap<UserId, bool>,
    saving: Option<Box<Planned>>,
    waiting: VecDeque<Change>,
}

/// A group message to forward once its home record is durable: per other
/// shard, its members there and the relay entry that keeps the message.
#[derive(Debug)]
pub(super) struct Forward {
    group: u64,
    group_seq: u64,
    event: bool,
    sender: InboxKey,
    client_message_id: ClientMessageId,
    timestamp_ms: u64,
    payload: Bytes,
    targets: Vec<(ShardId, Vec<UserId>, u64)>,
}

/// A group's message, in its place `group_seq`, forwarded to the shard
/// of `members`; kept by the home shard's relay entry `relay` until
/// answered with `Reply::Relayed`.
#[derive(Debug)]
pub struct Store {
    pub group_id: u64,
    pub group_seq: u64,
    pub event: bool,
    pub sender: InboxKey,
    pub client_message_id: ClientMessageId,
    pub timestamp_ms: u64,
    pub members: Vec<UserId>,
    pub payload: Bytes,
    pub relay: RelayRef,
}

/// Groups' own state: the groups homed on this shard, and the messages
/// forwarded here that the log refused (full or failing), per group in
/// order, tried again after each commit.
#[derive(Debug, Default)]
pub struct Groups {
    groups: HashMap<u64, Group>,
    unstored: BTreeMap<u64, VecDeque<Box<Store>>>,
}

fn answer_error(origin: ConnRef, request_id: u64, code: ErrorCode, message: &str) -> Reply {
    Reply::Answer {
        origin,
        frame: crate::proto::refusal(code, message, request_id),
    }
}

fn info_frame(id: u64, request_id: u64, group: &Group) -> Frame {
    Frame::GroupInfo(pb::GroupInfo {
        request_id,
        group_id: id,
        name: group.name.clone(),
        version: group.version,
        members: group
            .members
            .iter()
            .map(|(u, admin)| pb::GroupMember {
                user_id: u.0,
                admin: *admin,
            })
            .collect(),
    })
}

impl Engine {
    /// The home shard of a group.
    pub fn group_home(&self, group: u64) -> ShardId {
        shard_for(group, self.shards)
    }

    /// Takes the groups homed here, as the database holds them (at start).
    pub fn load_groups(&mut self, rows: Vec<GroupRow>) {
        for row in rows {
            debug_assert_eq!(self.group_home(row.id), self.id);
            self.groups.groups.insert(
                row.id,
                Group {
                    name: row.name,
                    version: row.version,
                    members: row.members.into_iter().collect(),
                    saving: None,
                    waiting: VecDeque::new(),
                },
            );
        }
    }

    /// Groups homed here.
    pub fn group_count(&self) -> usize {
        self.groups.groups.len()
    }

    /// A group's members (ascending), if it is homed here.
    pub fn group_members(&self, group: u64) -> Option<Vec<UserId>> {
        self.groups
            .groups
            .get(&group)
            .map(|g| g.members.keys().copied().collect())
    }

    // ---- frames from this shard's sessions ------------------------------

    pub(super) fn on_create_group(
        &mut self,
        device: InboxKey,
        session: SessionId,
        create: pb::CreateGroup,
        host: &mut impl Host,
    ) {
        let request_id = create.request_id;
        let refuse = |host: &mut dyn FnMut(&Frame), code: ErrorCode, message: &str| {
            host(&crate::proto::refusal(code, message, request_id))
        };
        let mut send = |frame: &Frame| host.send(session, frame);
        let mut members: Vec<UserId> = create
            .member_user_ids
            .iter()
            .map(|&u| UserId(u))
            .filter(|&u| u != device.user)
            .collect();
        members.sort();
        members.dedup();
        if members.len() + 1 > self.limits.group_members_max as usize {
            return refuse(&mut send, ErrorCode::GroupFull, "too many members");
        }
        if members.iter().any(|&u| !self.directory.user_exists(u)) {
            return refuse(&mut send, ErrorCode::UnknownRecipient, "no such user");
        }
        let mut rows: Vec<(UserId, bool)> = members.into_iter().map(|u| (u, false)).collect();
        rows.push((device.user, true));
        rows.sort();
        host.group(GroupOp::Create {
            session,
            creator: device,
            request_id: create.request_id,
            name: clip_group_name(&create.name).to_string(),
            members: rows,
        });
    }

    pub(super) fn on_update_group(
        &mut self,
        device: InboxKey,
        session: SessionId,
        update: pb::UpdateGroup,
        host: &mut impl Host,
    ) {
        let origin = ConnRef {
            shard: self.id,
            id: session,
        };
        let action = update.action();
        if matches!(action, GroupAction::Unspecified | GroupAction::Create) {
            host.send(
                session,
                &crate::proto::refusal(
                    ErrorCode::MalformedFrame,
                    "not a change a client can ask for",
                    update.request_id,
                ),
            );
            return;
        }
        let mut users: Vec<UserId> = match action {
            GroupAction::Leave | GroupAction::Rename => Vec::new(),
            _ => update.user_ids.into_iter().map(UserId).collect(),
        };
        users.sort();
        users.dedup();
        // More distinct users than a group holds: no change can name them
        // all (the request is not carried to the group's shard).
        if users.len() > self.limits.group_members_max as usize {
            let code = if action == GroupAction::Add {
                ErrorCode::GroupFull
            } else {
                ErrorCode::NotGroupMember
            };
            host.send(
                session,
                &crate::proto::refusal(code, "more users than a group holds", update.request_id),
            );
            return;
        }
        let change = Change {
            origin,
            actor: device,
            request_id: update.request_id,
            group: update.group_id,
            action,
            users,
            name: clip_group_name(&update.name).to_string(),
        };
        let home = self.group_home(change.group);
        self.route(home, Request::GroupChange(Box::new(change)), host);
    }

    pub(super) fn on_get_group(
        &mut self,
        device: InboxKey,
        session: SessionId,
        get: pb::GetGroup,
        host: &mut impl Host,
    ) {
        let request = Request::GroupGet {
            origin: ConnRef {
                shard: self.id,
                id: session,
            },
            actor: device,
            request_id: get.request_id,
            group: get.group_id,
        };
        self.route(self.group_home(get.group_id), request, host);
    }

    /// A Send to a group (already checked against the payload limits).
    pub(super) fn on_group_send(
        &mut self,
        device: InboxKey,
        session: SessionId,
        send: pb::Send,
        host: &mut impl Host,
    ) {
        if let Some(live) = self.session_mut(device, session) {
            live.sends_in_flight = live.sends_in_flight.saturating_add(1);
        }
        let request = Request::GroupSend {
            origin: ConnRef {
                shard: self.id,
                id: session,
            },
            sender: device,
            client_message_id: ClientMessageId(send.client_message_id),
            group: send.group_id,
            payload: send.payload,
        };
        self.route(self.group_home(send.group_id), request, host);
    }

    /// The host finished a [`GroupOp`].
    pub(super) fn group_done(&mut self, done: GroupDone, host: &mut impl Host) {
        match done {
            GroupDone::Created {
                session,
                creator,
                request_id,
                row,
            } => {
                let request = Request::GroupInstall {
                    origin: ConnRef {
                        shard: self.id,
                        id: session,
                    },
                    actor: creator,
                    request_id,
                    row,
                };
                let home = self.group_home(match &request {
                    Request::GroupInstall { row, .. } => row.id,
                    _ => unreachable!(),
                });
                self.route(home, request, host);
            }
            GroupDone::CreateFailed {
                session,
                request_id,
            } => host.send(
                session,
                &crate::proto::refusal(
                    ErrorCode::Internal,
                    "the group could not be created",
                    request_id,
                ),
            ),
            GroupDone::Saved { group, ok } => self.change_saved(group, ok, host),
        }
    }

    // ---- on the group's home shard --------------------------------------

    /// A group created in the database: it lives here from now on; its
    /// members hear of it (the group's first event), the creator once that
    /// is durable.
    pub(super) fn install_group(
        &mut self,
        origin: ConnRef,
        actor: InboxKey,
        request_id: u64,
        row: GroupRow,
        host: &mut impl Host,
    ) {
        let id = row.id;
        let event = pb::GroupEvent {
            action: GroupAction::Create as i32,
            user_ids: row.members.iter().map(|(u, _)| u.0).collect(),
            name: row.name.clone(),
        };
        self.load_groups(vec![row]);
        let members = self.group_members(id).unwrap_or_default();
        let ticket = self.group_event(id, actor, &event, &members, host);
        let group = &self.groups.groups[&id];
        let answer = Reply::Answer {
            origin,
            frame: info_frame(id, request_id, group),
        };
        self.answer_when_durable(ticket, answer, host);
    }

    pub(super) fn group_get(
        &mut self,
        origin: ConnRef,
        actor: InboxKey,
        request_id: u64,
        group_id: u64,
        host: &mut impl Host,
    ) {
        let reply = match self.groups.groups.get(&group_id) {
            None => answer_error(origin, request_id, ErrorCode::UnknownGroup, "no such group"),
            Some(g) if !g.members.contains_key(&actor.user) => answer_error(
                origin,
                request_id,
                ErrorCode::NotGroupMember,
                "not a member of this group",
            ),
            Some(g) => Reply::Answer {
                origin,
                frame: info_frame(group_id, request_id, g),
            },
        };
        self.send_reply(reply, host);
    }

    pub(super) fn group_change(&mut self, change: Change, host: &mut impl Host) {
        let Some(group) = self.groups.groups.get_mut(&change.group) else {
            let reply = answer_error(
                change.origin,
                change.request_id,
                ErrorCode::UnknownGroup,
                "no such group",
            );
            return self.send_reply(reply, host);
        };
        if group.saving.is_some() {
            if group.waiting.len() >= CHANGES_WAITING_MAX {
                let reply = answer_error(
                    change.origin,
                    change.request_id,
                    ErrorCode::ServerBusy,
                    "too many changes to this group at once; try again",
                );
                return self.send_reply(reply, host);
            }
            group.waiting.push_back(change);
            return;
        }
        self.start_change(change, host);
    }

    /// Checks a change against the group as it is now and writes it to the
    /// database; answers at once when it is refused or changes nothing.
    fn start_change(&mut self, change: Change, host: &mut impl Host) {
        let group_id = change.group;
        let members_max = self.limits.group_members_max as usize;
        let Some(group) = self.groups.groups.get_mut(&group_id) else {
            return;
        };
        let planned = plan(group, &change, members_max, |u| {
            self.directory.user_exists(u)
        });
        match planned {
            Err((code, message)) => {
                let reply = answer_error(change.origin, change.request_id, code, message);
                self.send_reply(reply, host);
                self.next_change(group_id, host);
            }
            Ok(None) => {
                let reply = Reply::Answer {
                    origin: change.origin,
                    frame: info_frame(group_id, change.request_id, group),
                };
                self.send_reply(reply, host);
                self.next_change(group_id, host);
            }
            Ok(Some(planned)) => {
                let upserts: Vec<(UserId, bool)> = planned
                    .members
                    .iter()
                    .filter(|(u, admin)| group.members.get(u) != Some(admin))
                    .map(|(u, a)| (*u, *a))
                    .collect();
                let removals: Vec<UserId> = group
                    .members
                    .keys()
                    .filter(|u| !planned.members.contains_key(u))
                    .copied()
                    .collect();
                host.group(GroupOp::Save {
                    group: group_id,
                    name: planned.name.clone(),
                    version: group.version + 1,
                    upserts,
                    removals,
                });
                group.saving = Some(Box::new(planned));
            }
        }
    }

    /// Starts the next waiting change of a group, if any.
    fn next_change(&mut self, group_id: u64, host: &mut impl Host) {
        let next = self
            .groups
            .groups
            .get_mut(&group_id)
            .filter(|g| g.saving.is_none())
            .and_then(|g| g.waiting.pop_front());
        if let Some(next) = next {
            self.start_change(next, host);
        }
    }

    /// A change was written to the database (or failed to be): it takes
    /// effect, its events take their places in the group's order, and the
    /// asker is answered once they are durable.
    fn change_saved(&mut self, group_id: u64, ok: bool, host: &mut impl Host) {
        let Some(planned) = self
            .groups
            .groups
            .get_mut(&group_id)
            .and_then(|g| g.saving.take())
        else {
            return;
        };
        let Planned {
            change,
            name,
            members,
            events,
            departed,
        } = *planned;
        if !ok {
            let reply = answer_error(
                change.origin,
                change.request_id,
                ErrorCode::Internal,
                "the change could not be written",
            );
            self.send_reply(reply, host);
            return self.next_change(group_id, host);
        }
        let group = self.groups.groups.get_mut(&group_id).expect("saving group");
        group.name = name;
        group.version += 1;
        group.members = members;
        let mut recipients: Vec<UserId> = group.members.keys().copied().collect();
        recipients.extend(departed);
        recipients.sort();
        recipients.dedup();
        let mut ticket = None;
        for event in &events {
            ticket = self
                .group_event(group_id, change.actor, event, &recipients, host)
                .or(ticket);
        }
        let group = &self.groups.groups[&group_id];
        let answer = Reply::Answer {
            origin: change.origin,
            frame: info_frame(group_id, change.request_id, group),
        };
        self.answer_when_durable(ticket, answer, host);
        self.next_change(group_id, host);
    }

    /// Answers once `ticket` is durable (at once without one).
    fn answer_when_durable(
        &mut self,
        ticket: Option<CommitTicket>,
        answer: Reply,
        host: &mut impl Host,
    ) {
        match ticket {
            Some(ticket) => self.push_after_commit(ticket, AfterCommit::Ack(answer), host),
            None => self.send_reply(answer, host),
        }
    }

    /// Puts an event in the group's order, for `recipients`.
    fn group_event(
        &mut self,
        group_id: u64,
        actor: InboxKey,
        event: &pb::GroupEvent,
        recipients: &[UserId],
        host: &mut impl Host,
    ) -> Option<CommitTicket> {
        let payload = Bytes::from(event.encode_to_vec());
        match self.fan_out(
            group_id,
            recipients,
            true,
            actor,
            ClientMessageId(0),
            payload,
            |_, _| None,
            host,
        ) {
            Ok((_, ticket, _)) => Some(ticket),
            Err(code) => {
                error!(shard = %self.id, group = group_id, ?code, "group event not stored");
                None
            }
        }
    }

    /// A member's message to a group homed here.
    pub(super) fn group_send(
        &mut self,
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        group_id: u64,
        payload: Bytes,
        host: &mut impl Host,
    ) {
        let refuse = |code| Reply::Refused {
            origin,
            sender,
            client_message_id,
            code,
        };
        // A retry is answered as the first Send was, even if the sender
        // left the group since.
        if let Some(dup) = self.log.find_duplicate(sender, client_message_id) {
            if dup.recipient != InboxKey::group(group_id)
                || dup.payload_digest != crate::store::payload_digest(&payload)
            {
                return self.send_reply(refuse(ErrorCode::DuplicateIdMismatch), host);
            }
            let stored = Reply::Stored {
                origin,
                sender,
                client_message_id,
                seq: dup.seq.0,
                timestamp_ms: dup.timestamp_ms,
            };
            return self.push_after_commit(dup.ticket, AfterCommit::Ack(stored), host);
        }
        let members = match self.groups.groups.get(&group_id) {
            None => return self.send_reply(refuse(ErrorCode::UnknownGroup), host),
            Some(g) if !g.members.contains_key(&sender.user) => {
                return self.send_reply(refuse(ErrorCode::NotGroupMember), host)
            }
            Some(g) => g.members.keys().copied().collect::<Vec<_>>(),
        };
        let early = self.flaws.ack_before_durable;
        let stored = |group_seq, timestamp_ms| Reply::Stored {
            origin,
            sender,
            client_message_id,
            seq: group_seq,
            timestamp_ms,
        };
        // The sender's ServerAck is the first action of the commit, before
        // the member devices' deliveries.
        let answer = |group_seq, timestamp_ms| (!early).then(|| stored(group_seq, timestamp_ms));
        match self.fan_out(
            group_id,
            &members,
            false,
            sender,
            client_message_id,
            payload,
            answer,
            host,
        ) {
            Ok((group_seq, _, timestamp_ms)) => {
                self.metrics.messages_accepted.inc();
                if early {
                    self.send_reply(stored(group_seq, timestamp_ms), host);
                }
            }
            Err(code) => self.send_reply(refuse(code), host),
        }
    }

    /// Appends a group's message (or event) in the group's next place, for
    /// the devices of `members` homed here and, through the relay inboxes,
    /// for the shards of the others; they get it once it is durable, after
    /// `answer` (made from the group sequence and time), if any.
    #[allow(clippy::too_many_arguments)]
    fn fan_out(
        &mut self,
        group_id: u64,
        members: &[UserId],
        event: bool,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        payload: Bytes,
        answer: impl FnOnce(u64, u64) -> Option<Reply>,
        host: &mut impl Host,
    ) -> Result<(u64, CommitTicket, u64), ErrorCode> {
        let group_seq = self.log.group_seq_stored(group_id) + 1;
        let mut recipients: Vec<InboxKey> = Vec::new();
        let mut remote: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
        for &user in members {
            let home = self.home_of(user);
            if home == self.id {
                self.member_devices(user, sender, event, &mut recipients);
            } else {
                remote.entry(home).or_default().push(user);
            }
        }
        for &shard in remote.keys() {
            recipients.push(InboxKey::relay_to_shard(shard));
        }
        recipients.sort();
        let remote_members: Vec<u64> = {
            let mut all: Vec<u64> = remote.values().flatten().map(|u| u.0).collect();
            all.sort_unstable();
            all
        };
        let appended = self
            .log
            .append_group_message(&NewGroupMessage {
                group_id,
                group_seq,
                event,
                sender,
                client_message_id,
                recipients: &recipients,
                remote_members: &remote_members,
                timestamp_ms: None,
                payload: &payload,
            })
            .map_err(|err| self.store_error_code(&err))?;
        let ticket = appended.ticket;
        if let Some(answer) = answer(group_seq, appended.timestamp_ms) {
            self.push_after_commit(ticket, AfterCommit::Ack(answer), host);
        }
        let mut targets = Vec::with_capacity(remote.len());
        for (inbox, seq) in &appended.seqs {
            if inbox.is_relay() {
                let shard = ShardId(inbox.user.0 as u32);
                let users = remote.remove(&shard).unwrap_or_default();
                targets.push((shard, users, seq.0));
            } else {
                self.push_after_commit(ticket, AfterCommit::Visible { inbox: *inbox }, host);
            }
        }
        if !targets.is_empty() {
            let forward = Forward {
                group: group_id,
                group_seq,
                event,
                sender,
                client_message_id,
                timestamp_ms: appended.timestamp_ms,
                payload,
                targets,
            };
            self.push_after_commit(ticket, AfterCommit::ForwardGroup(Box::new(forward)), host);
        }
        Ok((group_seq, ticket, appended.timestamp_ms))
    }

    /// The devices of `user` (homed here) that get a group's message: all
    /// of them, but the sending device for a member's message.
    fn member_devices(&self, user: UserId, sender: InboxKey, event: bool, out: &mut Vec<InboxKey>) {
        let devices = if self.directory.has_companions(user) {
            match self.directory.device_set(user) {
                Some((_, devices)) => devices,
                None => return,
            }
        } else if self.directory.user_exists(user) {
            vec![crate::ids::PRIMARY_DEVICE]
        } else {
            return;
        };
        for device in devices {
            let inbox = InboxKey { user, device };
            if event || inbox != sender {
                out.push(inbox);
            }
        }
    }

    /// A group message's home record is durable: each other shard holding
    /// members gets it (the payload buffer shared, not copied).
    pub(super) fn forward_group(&mut self, forward: Forward, host: &mut impl Host) {
        for (shard, members, relay_seq) in forward.targets {
            let request = Request::GroupStore(Box::new(Store {
                group_id: forward.group,
                group_seq: forward.group_seq,
                event: forward.event,
                sender: forward.sender,
                client_message_id: forward.client_message_id,
                timestamp_ms: forward.timestamp_ms,
                members,
                payload: forward.payload.clone(),
                relay: RelayRef {
                    shard: self.id,
                    inbox: InboxKey::relay_to_shard(shard),
                    seq: relay_seq,
                },
            }));
            self.route(shard, request, host);
        }
    }

    // ---- on a shard holding members -------------------------------------

    /// Stores a group's message forwarded by its home shard for `members`
    /// (homed here), once: a repeat (forwarded again after the home shard
    /// restarted) is only answered. Repeats are told by the group
    /// sequences this log holds, not by the highest: after a power loss a
    /// later record can survive where an earlier one did not, and the
    /// earlier one comes again and is stored (its members then read it
    /// after the later one; its group sequence says where it belongs).
    pub(super) fn group_store_here(&mut self, store: Box<Store>, host: &mut impl Host) {
        let group_id = store.group_id;
        // Behind the group's messages that could not be stored yet, so
        // the group's order holds here.
        if let Some(waiting) = self.groups.unstored.get_mut(&group_id) {
            waiting.push_back(store);
            return;
        }
        if let Err(store) = self.try_group_store(store, host) {
            self.groups
                .unstored
                .entry(group_id)
                .or_default()
                .push_back(store);
        }
    }

    /// Stores one forwarded group message, or gives it back when the log
    /// refuses it (full or failing).
    fn try_group_store(
        &mut self,
        store: Box<Store>,
        host: &mut impl Host,
    ) -> Result<(), Box<Store>> {
        if let Some(ticket) = self
            .log
            .group_message_ticket(store.group_id, store.group_seq)
        {
            self.push_after_commit(ticket, AfterCommit::Relayed(store.relay), host);
            return Ok(());
        }
        let mut recipients = Vec::with_capacity(store.members.len());
        for &user in &store.members {
            self.member_devices(user, store.sender, store.event, &mut recipients);
        }
        recipients.sort();
        recipients.dedup();
        let appended = self.log.append_group_message(&NewGroupMessage {
            group_id: store.group_id,
            group_seq: store.group_seq,
            event: store.event,
            sender: store.sender,
            client_message_id: store.client_message_id,
            recipients: &recipients,
            remote_members: &[],
            timestamp_ms: Some(store.timestamp_ms),
            payload: &store.payload,
        });
        match appended {
            Ok(appended) => {
                for (inbox, _) in &appended.seqs {
                    self.push_after_commit(
                        appended.ticket,
                        AfterCommit::Visible { inbox: *inbox },
                        host,
                    );
                }
                self.push_after_commit(appended.ticket, AfterCommit::Relayed(store.relay), host);
                Ok(())
            }
            Err(err) => {
                // Kept here and tried again after each commit (the home
                // shard keeps it too, in its relay inbox, until answered).
                warn!(shard = %self.id, group = store.group_id, group_seq = store.group_seq, %err, "group message not stored yet");
                Err(store)
            }
        }
    }

    /// Tries again the forwarded group messages the log refused, each
    /// group's in order.
    pub(super) fn retry_unstored(&mut self, host: &mut impl Host) {
        if self.groups.unstored.is_empty() {
            return;
        }
        let groups: Vec<u64> = self.groups.unstored.keys().copied().collect();
        for group_id in groups {
            let Some(mut waiting) = self.groups.unstored.remove(&group_id) else {
                continue;
            };
            while let Some(store) = waiting.pop_front() {
                if let Err(store) = self.try_group_store(store, host) {
                    waiting.push_front(store);
                    break;
                }
            }
            if !waiting.is_empty() {
                self.groups.unstored.insert(group_id, waiting);
            }
        }
    }

    /// Forwards a group message found in a relay inbox at start (`None` if
    /// the entry is not a group's).
    pub(super) fn forward_group_again(
        &mut self,
        relay_inbox: InboxKey,
        seq: u64,
        position: crate::store::LogPosition,
        message: crate::store::StoredMessage,
        host: &mut impl Host,
    ) {
        let Some(group) = message.group else {
            return;
        };
        let target = ShardId(relay_inbox.user.0 as u32);
        let members: Vec<UserId> = match self.log.group_remote_members(position) {
            Ok(all) => all
                .into_iter()
                .map(UserId)
                .filter(|&u| self.home_of(u) == target)
                .collect(),
            Err(err) => {
                error!(shard = %self.id, %err, "group message to forward again unreadable");
                return;
            }
        };
        let request = Request::GroupStore(Box::new(Store {
            group_id: group.group_id,
            group_seq: group.group_seq,
            event: group.event,
            sender: message.sender,
            client_message_id: message.client_message_id,
            timestamp_ms: message.timestamp_ms,
            members,
            payload: message.payload,
            relay: RelayRef {
                shard: self.id,
                inbox: relay_inbox,
                seq,
            },
        }));
        self.route(target, request, host);
    }
}

/// What `change` does to `group`: an error, nothing, or the new state and
/// its events.
fn plan(
    group: &Group,
    change: &Change,
    members_max: usize,
    user_exists: impl Fn(UserId) -> bool,
) -> Result<Option<Planned>, (ErrorCode, &'static str)> {
    let actor = change.actor.user;
    let Some(&actor_admin) = group.members.get(&actor) else {
        return Err((ErrorCode::NotGroupMember, "not a member of this group"));
    };
    let admin_only = !matches!(change.action, GroupAction::Leave);
    if admin_only && !actor_admin {
        return Err((ErrorCode::NotGroupAdmin, "only admins change this group"));
    }
    let mut users = change.users.clone();
    users.sort();
    users.dedup();
    let mut members = group.members.clone();
    let mut name = group.name.clone();
    let mut departed = Vec::new();
    let event = |action: GroupAction, users: &[UserId], name: &str| pb::GroupEvent {
        action: action as i32,
        user_ids: users.iter().map(|u| u.0).collect(),
        name: name.to_string(),
    };
    let mut events = Vec::new();
    match change.action {
        GroupAction::Add => {
            let new: Vec<UserId> = users
                .into_iter()
                .filter(|u| !members.contains_key(u))
                .collect();
            if new.iter().any(|&u| !user_exists(u)) {
                return Err((ErrorCode::UnknownRecipient, "no such user"));
            }
            if members.len() + new.len() > members_max {
                return Err((
                    ErrorCode::GroupFull,
                    "the group would have too many members",
                ));
            }
            if new.is_empty() {
                return Ok(None);
            }
            for &u in &new {
                members.insert(u, false);
            }
            events.push(event(GroupAction::Add, &new, ""));
        }
        GroupAction::Remove | GroupAction::Promote | GroupAction::Demote => {
            if users.is_empty() {
                return Ok(None);
            }
            if users.iter().any(|u| !members.contains_key(u)) {
                return Err((ErrorCode::NotGroupMember, "a user named is not a member"));
            }
            match change.action {
                GroupAction::Remove => {
                    for u in &users {
                        members.remove(u);
                    }
                    departed = users.clone();
                }
                action => {
                    let admin = action == GroupAction::Promote;
                    for u in &users {
                        members.insert(*u, admin);
                    }
                }
            }
            events.push(event(change.action, &users, ""));
        }
        GroupAction::Leave => {
            members.remove(&actor);
            departed.push(actor);
            events.push(event(GroupAction::Leave, &[actor], ""));
        }
        GroupAction::Rename => {
            if change.name == group.name {
                return Ok(None);
            }
            name = change.name.clone();
            events.push(event(GroupAction::Rename, &[], &name));
        }
        GroupAction::Unspecified | GroupAction::Create => {
            return Err((
                ErrorCode::MalformedFrame,
                "not a change a client can ask for",
            ))
        }
    }
    // A group with members keeps an admin: the member with the lowest id
    // becomes one when the last admin goes.
    if !members.is_empty() && !members.values().any(|a| *a) {
        let (&first, _) = members.iter().next().expect("not empty");
        members.insert(first, true);
        events.push(event(GroupAction::Promote, &[first], ""));
    }
    Ok(Some(Planned {
        change: change.clone(),
        name,
        members,
        events,
        departed,
    }))
}
