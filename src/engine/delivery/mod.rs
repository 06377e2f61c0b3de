//! Delivery: the sessions of the devices homed on this shard, their
//! delivery windows, and the path of a Send (check → store on the
//! recipient's home shard with dedupe → ServerAck once durable → delivered
//! from the inbox in sequence order, within the window).
//!
//! State: one `Session` per device with a live connection. Its window is
//! boxed and released when nothing is in flight, so an idle session holds
//! its last sent sequence and no allocation.

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use bytes::Bytes;
use tracing::{debug, error, warn};

use super::{AfterCommit, Closing, ConnRef, Engine, Host, Reply, Request, SessionId};
use crate::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, UserId, PRIMARY_DEVICE};
use crate::proto::{pb, ErrorCode, Frame, GoAwayReason};
use crate::session::DeliveryWindow;
use crate::store::{LogPosition, NewMessage, ReceiptKind, StoreError, StoredEntry};

/// The devices a Send must cover: the recipient's, except the sending
/// device itself when it writes to its own account (copies for its other
/// devices, so they show what it sent).
fn required_devices(devices: &[DeviceId], sender: InboxKey, recipient: UserId) -> Vec<DeviceId> {
    devices
        .iter()
        .copied()
        .filter(|d| !(recipient == sender.user && *d == sender.device))
        .collect()
}

/// The required devices a per-device Send lacks, and the device ids it
/// names that the recipient does not have (a repeated id counts as stale).
/// `given` is sorted by device.
fn device_mismatch(
    devices: &[DeviceId],
    required: &[DeviceId],
    given: &[(DeviceId, Bytes)],
) -> (Vec<u32>, Vec<u32>) {
    let missing = required
        .iter()
        .filter(|d| given.binary_search_by_key(*d, |(g, _)| *g).is_err())
        .map(|d| d.0)
        .collect();
    let stale = given
        .iter()
        .enumerate()
        .filter(|(i, (d, _))| !devices.contains(d) || (*i > 0 && given[i - 1].0 == *d))
        .map(|(_, (d, _))| d.0)
        .collect();
    (missing, stale)
}

/// A device's live session, as delivery sees it.
#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    /// When its socket was accepted: of two sessions of one device, the one
    /// connected later wins (`session::accepted_after`).
    pub connected_at: u32,
    /// Sends read and not yet answered (the socket loop stops reading at
    /// `sends_in_flight_max`, at most 65,535 by the configuration's check).
    pub sends_in_flight: u16,
    /// The pump stopped at the output bound with window room left.
    pump_blocked: bool,
    /// Highest sequence written while `window` is released.
    last_sent: u64,
    window: Option<Box<DeliveryWindow>>,
}

// One per live session, in the B-tree's nodes beside its 16-byte key.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Session>() <= 32);

impl Session {
    fn new(id: SessionId, connected_at: u32) -> Session {
        Session {
            id,
            connected_at,
            sends_in_flight: 0,
            pump_blocked: false,
            last_sent: 0,
            window: None,
        }
    }

    /// Highest sequence written to the session.
    pub fn last_sent(&self) -> u64 {
        self.window.as_ref().map_or(self.last_sent, |w| w.last_sent)
    }

    /// Entries the window still admits.
    pub fn window_room(&self, messages_max: u32, bytes_max: u32) -> usize {
        self.window
            .as_ref()
            .map_or(messages_max as usize, |w| w.room(messages_max, bytes_max))
    }

    /// Entries on the wire and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.window.as_ref().map_or(0, |w| w.in_flight())
    }

    fn window(&mut self) -> &mut DeliveryWindow {
        let last_sent = self.last_sent;
        self.window
            .get_or_insert_with(|| Box::new(DeliveryWindow::resume(last_sent)))
    }

    fn skip(&mut self, seq: u64) {
        match self.window.as_deref_mut() {
            Some(window) => window.on_skipped(seq),
            None => {
                assert!(
                    seq > self.last_sent,
                    "entries are visited in sequence order"
                );
                self.last_sent = seq;
            }
        }
    }

    /// Applies a device ack to the window; releases it once empty.
    pub(super) fn on_ack(&mut self, up_to: u64, list: &[u64]) {
        if let Some(window) = self.window.as_deref_mut() {
            window.on_ack(up_to, list);
            if window.in_flight() == 0 {
                self.last_sent = window.last_sent;
                self.window = None;
            }
        }
    }
}

/// Delivery's state: the live sessions of this shard's devices, and a
/// scratch list the pump reuses.
///
/// The sessions are in a B-tree: its nodes run about 70 % full whatever the
/// count, where a hash map of these 48-byte entries keeps up to half its
/// buckets empty after it doubles (memory per idle connection is the
/// figure this server is judged by; a lookup costs a few node visits).
#[derive(Debug, Default)]
pub struct Delivery {
    sessions: BTreeMap<InboxKey, Session>,
    positions: Vec<(InboxSeq, LogPosition)>,
}

impl Engine {
    /// The live session of `device`, if any.
    pub fn session(&self, device: InboxKey) -> Option<&Session> {
        self.delivery.sessions.get(&device)
    }

    /// The live sessions of the devices in `range`.
    pub(super) fn sessions_in(
        &self,
        range: std::ops::RangeInclusive<InboxKey>,
    ) -> impl Iterator<Item = (InboxKey, SessionId)> + '_ {
        self.delivery.sessions.range(range).map(|(k, s)| (*k, s.id))
    }

    /// Sessions open here.
    pub fn session_count(&self) -> usize {
        self.delivery.sessions.len()
    }

    /// Every session and its device (the simulation checks their bounds).
    pub fn sessions(&self) -> impl Iterator<Item = (&InboxKey, &Session)> {
        self.delivery.sessions.iter()
    }

    pub(super) fn session_mut(
        &mut self,
        device: InboxKey,
        session: SessionId,
    ) -> Option<&mut Session> {
        self.delivery
            .sessions
            .get_mut(&device)
            .filter(|s| s.id == session)
    }

    /// Opens the session of an authenticated device homed here.
    ///
    /// A device has one session: a session connected later replaces an
    /// earlier one (GoAway REPLACED to the earlier). A connection that
    /// finishes its handshake after a later one of the same device (its
    /// Hello's lookup or handoff was slower, typically a connection the
    /// client has already given up) does not take over: it is the one told
    /// REPLACED, and the live session stays.
    pub(super) fn session_opened(
        &mut self,
        device: InboxKey,
        session: SessionId,
        connected_at: u32,
        protocol_version: u32,
        host: &mut impl Host,
    ) {
        assert_eq!(
            self.home_of(device.user),
            self.id,
            "sessions run on the home shard"
        );
        let replaced = Frame::GoAway(pb::GoAway {
            reason: GoAwayReason::Replaced as i32,
            reconnect_after_ms: 0,
        });
        let newer = self.delivery.sessions.get(&device).is_some_and(|live| {
            crate::session::accepted_after(live.connected_at, connected_at)
                && !host.closing(live.id)
        });
        if newer {
            debug!(%device, "a later connection of this device is live; this one is replaced");
            host.close(session, &replaced, Closing::Replaced);
            return;
        }
        if self.refuse_removed(device, session, host) {
            return;
        }
        let limits = &self.limits;
        let inbox_pending_through = self.log.last_pending(device).0;
        host.send(
            session,
            &Frame::Welcome(pb::Welcome {
                protocol_version,
                server_time_ms: self.now_ms(),
                max_payload_bytes: limits.payload_bytes_max,
                max_frame_bytes: limits.frame_bytes_max,
                delivery_window: limits.delivery_window_messages,
                idle_timeout_ms: limits.idle_timeout_ms,
                ids_per_frame_max: limits.ids_per_frame_max,
                delivery_window_bytes: u64::from(limits.delivery_window_bytes),
                inbox_pending_through,
            }),
        );
        let previous = self
            .delivery
            .sessions
            .insert(device, Session::new(session, connected_at));
        if let Some(previous) = previous {
            debug!(%device, "session replaced by a newer connection");
            host.close(previous.id, &replaced, Closing::Replaced);
        }
        self.keys_session_opened(device, session, host);
        self.push_session_opened(device);
        self.presence_changed(device.user, host);
        self.pump(device, host);
    }

    /// Forgets a session whose socket is closing or closed.
    pub(super) fn session_closed(&mut self, device: InboxKey, session: SessionId) {
        if self
            .delivery
            .sessions
            .get(&device)
            .is_some_and(|s| s.id == session)
        {
            self.delivery.sessions.remove(&device);
        }
    }

    fn refuse_send(
        host: &mut impl Host,
        session: SessionId,
        client_message_id: u64,
        code: ErrorCode,
        message: &str,
    ) {
        host.send(
            session,
            &crate::proto::refusal(code, message, client_message_id),
        );
    }

    pub(super) fn on_send(
        &mut self,
        device: InboxKey,
        session: SessionId,
        send: pb::Send,
        host: &mut impl Host,
    ) {
        if let Err(code) = crate::session::check_send(&send, &self.limits) {
            Self::refuse_send(host, session, send.client_message_id, code, "send refused");
            return;
        }
        let recipient = UserId(send.recipient_user_id);
        // The common case, one payload to an account that never linked a
        // device, needs no device set (and allocates none).
        let plain = send.device_payloads.is_empty() && !self.directory.has_companions(recipient);
        let set = if plain {
            self.directory
                .user_exists(recipient)
                .then(|| (1, Vec::new()))
        } else {
            self.directory.device_set(recipient)
        };
        let Some((version, devices)) = set else {
            Self::refuse_send(
                host,
                session,
                send.client_message_id,
                ErrorCode::UnknownRecipient,
                "no such user",
            );
            return;
        };
        // Every device of the recipient needs its own payload (encrypted
        // for it): a Send that does not cover exactly the current device
        // set is refused whole, nothing stored, and the client learns the
        // list (missing and stale devices, its version).
        let mut per_device: Vec<(DeviceId, Bytes)> = send
            .device_payloads
            .into_iter()
            .map(|p| (DeviceId(p.device_id), p.payload))
            .collect();
        per_device.sort_by_key(|(d, _)| *d);
        let required = required_devices(&devices, device, recipient);
        let (missing, stale) = if per_device.is_empty() {
            // One payload goes to the primary: every other required device
            // is missing.
            let missing: Vec<u32> = required
                .iter()
                .filter(|d| **d != PRIMARY_DEVICE)
                .map(|d| d.0)
                .collect();
            (missing, Vec::new())
        } else {
            device_mismatch(&devices, &required, &per_device)
        };
        if !missing.is_empty() || !stale.is_empty() {
            host.send(
                session,
                &Frame::Error(pb::Error {
                    code: ErrorCode::DeviceMismatch as i32,
                    message: "the payloads do not match the recipient's devices".into(),
                    client_message_id: send.client_message_id,
                    missing_devices: missing,
                    stale_devices: stale,
                    device_list_version: version,
                    ..Default::default()
                }),
            );
            return;
        }
        // Counted against the session's bound; a frame of a session already
        // replaced is stored all the same (its ServerAck may not reach it,
        // and the retry is answered by dedupe).
        if let Some(live) = self.session_mut(device, session) {
            live.sends_in_flight = live.sends_in_flight.saturating_add(1);
        }
        let request = Request::Store {
            origin: ConnRef {
                shard: self.id,
                id: session,
            },
            sender: device,
            client_message_id: ClientMessageId(send.client_message_id),
            recipient,
            payload: send.payload,
            per_device,
        };
        self.route(self.home_of(recipient), request, host);
    }

    /// Stores a message here, its recipient's home shard, and answers its
    /// origin once the record (or the duplicate it repeats) is durable.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_message(
        &mut self,
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        recipient: UserId,
        payload: Bytes,
        per_device: Vec<(DeviceId, Bytes)>,
        host: &mut impl Host,
    ) {
        let inbox = InboxKey {
            user: recipient,
            device: PRIMARY_DEVICE,
        };
        let digest = if per_device.is_empty() {
            crate::store::payload_digest(&payload)
        } else {
            crate::store::payload_digest_parts(per_device.iter().map(|(_, p)| &p[..]))
        };
        if let Some(dup) = self.log.find_duplicate(sender, client_message_id) {
            // A retry must carry what the first Send carried; a client that
            // reuses an id for other content is told so (its new content is
            // not stored).
            if dup.recipient.user != recipient || dup.payload_digest != digest {
                self.send_reply(
                    Reply::Refused {
                        origin,
                        sender,
                        client_message_id,
                        code: ErrorCode::DuplicateIdMismatch,
                    },
                    host,
                );
                return;
            }
            let stored = Reply::Stored {
                origin,
                sender,
                client_message_id,
                seq: dup.seq.0,
                timestamp_ms: dup.timestamp_ms,
            };
            self.push_after_commit(dup.ticket, AfterCommit::Ack(stored), host);
            return;
        }
        if !per_device.is_empty() {
            return self.store_per_device(
                origin,
                sender,
                client_message_id,
                recipient,
                per_device,
                host,
            );
        }
        let appended = self.log.append_message(&NewMessage {
            recipient: inbox,
            sender,
            client_message_id,
            payload: &payload,
        });
        match appended {
            Ok(appended) => {
                self.metrics.messages_accepted.inc();
                let stored = Reply::Stored {
                    origin,
                    sender,
                    client_message_id,
                    seq: appended.seq.0,
                    timestamp_ms: appended.timestamp_ms,
                };
                self.answer_stored(stored, appended.ticket, [inbox], host);
            }
            Err(err) => {
                let code = self.store_error_code(&err);
                self.send_reply(
                    Reply::Refused {
                        origin,
                        sender,
                        client_message_id,
                        code,
                    },
                    host,
                );
            }
        }
    }

    /// Stores a Send with one payload per device of the recipient: one
    /// record, an entry in every device's inbox, ServerAck (with the
    /// primary's sequence) once durable. The device set is checked again
    /// here, on the recipient's home shard, where links and removals land.
    fn store_per_device(
        &mut self,
        origin: ConnRef,
        sender: InboxKey,
        client_message_id: ClientMessageId,
        recipient: UserId,
        per_device: Vec<(DeviceId, Bytes)>,
        host: &mut impl Host,
    ) {
        let refuse = |code| Reply::Refused {
            origin,
            sender,
            client_message_id,
            code,
        };
        let current = self.directory.device_set(recipient);
        let matches = current.is_some_and(|(_, devices)| {
            let required = required_devices(&devices, sender, recipient);
            let (missing, stale) = device_mismatch(&devices, &required, &per_device);
            missing.is_empty() && stale.is_empty()
        });
        if !matches {
            return self.send_reply(refuse(ErrorCode::DeviceMismatch), host);
        }
        let parts: Vec<(InboxKey, &[u8])> = per_device
            .iter()
            .map(|(device, payload)| {
                (
                    InboxKey {
                        user: recipient,
                        device: *device,
                    },
                    &payload[..],
                )
            })
            .collect();
        match self
            .log
            .append_device_message(&parts, sender, client_message_id)
        {
            Ok(appended) => {
                self.metrics.messages_accepted.inc();
                let stored = Reply::Stored {
                    origin,
                    sender,
                    client_message_id,
                    seq: appended.seqs[0].1 .0,
                    timestamp_ms: appended.timestamp_ms,
                };
                let inboxes = appended.seqs.iter().map(|(inbox, _)| *inbox);
                self.answer_stored(stored, appended.ticket, inboxes, host);
            }
            Err(err) => {
                let code = self.store_error_code(&err);
                self.send_reply(refuse(code), host);
            }
        }
    }

    /// A message was appended: ServerAck once its commit is durable, and
    /// each inbox it went to becomes deliverable then.
    fn answer_stored(
        &mut self,
        stored: Reply,
        ticket: crate::store::CommitTicket,
        inboxes: impl IntoIterator<Item = InboxKey>,
        host: &mut impl Host,
    ) {
        if self.flaws.ack_before_durable {
            self.send_reply(stored, host);
        } else {
            self.push_after_commit(ticket, AfterCommit::Ack(stored), host);
        }
        for inbox in inboxes {
            self.push_after_commit(ticket, AfterCommit::Visible { inbox }, host);
        }
    }

    /// The error code a Send that could not be appended gets (logged).
    pub(super) fn store_error_code(&self, err: &StoreError) -> ErrorCode {
        warn!(shard = %self.id, %err, "message not stored");
        match err {
            StoreError::Full(_) => ErrorCode::StoreFull,
            _ => ErrorCode::StoreFailed,
        }
    }

    /// A Send of a session here was stored (ServerAck) or refused (Error).
    /// A session that went away gets nothing: its client retries the Send
    /// and dedupe answers it with the same ServerAck.
    pub(super) fn send_answered(&mut self, reply: Reply, host: &mut impl Host) {
        let (origin, sender, frame) = match reply {
            Reply::Stored {
                origin,
                sender,
                client_message_id,
                seq,
                timestamp_ms,
            } => (
                origin,
                sender,
                Frame::ServerAck(pb::ServerAck {
                    client_message_id: client_message_id.0,
                    server_sequence: seq,
                    timestamp_ms,
                }),
            ),
            Reply::Refused {
                origin,
                sender,
                client_message_id,
                code,
            } => (
                origin,
                sender,
                Frame::Error(pb::Error {
                    code: code as i32,
                    message: "message not stored".to_string(),
                    client_message_id: client_message_id.0,
                    fatal: false,
                    retry_after_ms: 0,
                    ..Default::default()
                }),
            ),
            Reply::Relayed { .. } | Reply::Answer { .. } => {
                unreachable!("relay replies go to receipts, answers to their session")
            }
        };
        if let Some(live) = self.session_mut(sender, origin.id) {
            live.sends_in_flight = live.sends_in_flight.saturating_sub(1);
        }
        // Sent even to a session replaced meanwhile (the host drops it if
        // the session is closing), as it always was.
        host.send(origin.id, &frame);
    }

    /// Pumps the live session of `device`, if it has one.
    pub(super) fn pump_device(&mut self, device: InboxKey, host: &mut impl Host) {
        if self.delivery.sessions.contains_key(&device) {
            self.pump(device, host);
        } else {
            self.maybe_wake(device, host);
        }
    }

    /// The session's output queue drained after the pump stopped at it.
    pub(super) fn output_drained(
        &mut self,
        device: InboxKey,
        session: SessionId,
        host: &mut impl Host,
    ) {
        let blocked = self
            .session_mut(device, session)
            .is_some_and(|s| std::mem::take(&mut s.pump_blocked));
        if blocked {
            self.pump(device, host);
        }
    }

    /// Whether the pump of this session stopped at the output bound.
    pub fn pump_blocked(&self, device: InboxKey) -> bool {
        self.delivery
            .sessions
            .get(&device)
            .is_some_and(|s| s.pump_blocked)
    }

    /// Writes deliverable inbox entries to the device's session, in order,
    /// while its window and output queue have room.
    pub(super) fn pump(&mut self, device: InboxKey, host: &mut impl Host) {
        let Engine {
            limits,
            log,
            delivery,
            metrics,
            id: shard,
            ..
        } = self;
        let Delivery {
            sessions,
            positions,
        } = delivery;
        let Some(session) = sessions.get_mut(&device) else {
            return;
        };
        if host.closing(session.id) {
            return;
        }
        let (messages_max, bytes_max) = (
            limits.delivery_window_messages,
            limits.delivery_window_bytes,
        );
        session.pump_blocked = false;
        loop {
            let room = session.window_room(messages_max, bytes_max);
            if room == 0 {
                break;
            }
            if host.output_full(session.id) {
                session.pump_blocked = true;
                break;
            }
            positions.clear();
            log.pending_after(
                device,
                InboxSeq(session.last_sent()),
                room.min(64),
                positions,
            );
            if positions.is_empty() {
                break;
            }
            let mut progressed = false;
            for &(seq, position) in positions.iter() {
                // Only durable entries: a record lost before its commit
                // would give its sequence to a different message.
                if !log.is_durable(position) {
                    break;
                }
                if session.window_room(messages_max, bytes_max) == 0 {
                    break;
                }
                // The output bound holds per frame, not per batch: a peer
                // that stops reading never has more than one frame past it.
                // The socket loop reports when the queue has moved to the
                // socket (`Event::OutputDrained`).
                if host.output_full(session.id) {
                    session.pump_blocked = true;
                    break;
                }
                progressed = true;
                match log.read_for(device, position) {
                    Ok(Some(entry)) => {
                        let (frame, bytes) = entry_frame(entry);
                        session.window().on_sent(seq.0, bytes);
                        host.send(session.id, &frame);
                        match frame {
                            Frame::Deliver(_) => metrics.messages_delivered.inc(),
                            _ => metrics.receipts_sent.inc(),
                        }
                    }
                    Ok(None) => session.skip(seq.0),
                    Err(err) => {
                        // Reported by recovery or a damaged read: skip it so
                        // one bad record does not stall the inbox.
                        error!(shard = %shard, %device, seq = seq.0, %err, "unreadable inbox entry skipped");
                        session.skip(seq.0);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }
}

/// The frame that delivers an inbox entry, and what it weighs in the
/// window's byte budget.
fn entry_frame(entry: StoredEntry) -> (Frame, u32) {
    match entry {
        StoredEntry::Message(m) => {
            let bytes = m.payload.len() as u32;
            let mut deliver = pb::Deliver {
                sequence: m.seq.0,
                sender_user_id: m.sender.user.0,
                sender_device_id: m.sender.device.0,
                client_message_id: m.client_message_id.0,
                timestamp_ms: m.timestamp_ms,
                payload: m.payload,
                ..Default::default()
            };
            if let Some(group) = m.group {
                deliver.group_id = group.group_id;
                deliver.group_sequence = group.group_seq;
                if group.event {
                    // The server wrote this payload: the event itself.
                    use prost::Message as _;
                    deliver.group_event =
                        pb::GroupEvent::decode(std::mem::take(&mut deliver.payload)).ok();
                }
            }
            (Frame::Deliver(deliver), bytes)
        }
        StoredEntry::Receipt(r) if r.by == super::receipts::BATCH_BY => {
            let bytes = 8 * r.client_message_ids.len() as u32;
            let mut receipt = pb::Receipt {
                sequence: r.seq.0,
                kind: match r.kind {
                    ReceiptKind::Delivered => pb::ReceiptKind::Delivered as i32,
                    ReceiptKind::Read => pb::ReceiptKind::Read as i32,
                },
                timestamp_ms: r.timestamp_ms,
                ..Default::default()
            };
            for (by, id) in super::receipts::split_batch(&r.client_message_ids) {
                receipt.by_user_ids.push(by.user.0);
                receipt.by_device_ids.push(by.device.0);
                receipt.client_message_ids.push(id);
            }
            (Frame::Receipt(receipt), bytes)
        }
        StoredEntry::Receipt(r) => {
            let bytes = 8 * r.client_message_ids.len() as u32;
            (
                Frame::Receipt(pb::Receipt {
                    sequence: r.seq.0,
                    kind: match r.kind {
                        ReceiptKind::Delivered => pb::ReceiptKind::Delivered as i32,
                        ReceiptKind::Read => pb::ReceiptKind::Read as i32,
                    },
                    by_user_id: r.by.user.0,
                    by_device_id: r.by.device.0,
                    client_message_ids: r.client_message_ids,
                    timestamp_ms: r.timestamp_ms,
                    ..Default::default()
                }),
                bytes,
            )
        }
    }
}
