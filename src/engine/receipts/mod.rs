//! Receipts: device acks and the delivered receipts (✓✓) they cause, read
//! receipts, and the relay that keeps a receipt bound for another shard
//! until that shard has stored it.
//!
//! A receipt is stored and delivered like a message, in its recipient's
//! (the original sender device's) inbox on that device's home shard. One
//! caused here for a device homed elsewhere is first appended to this
//! shard's relay inbox for that shard (`InboxKey::relay_to_shard`), in the
//! same commit as its cause, then forwarded; the home shard answers
//! `Reply::Relayed` once its copy is durable and the relay entry is
//! acknowledged. After a crash, `Event::Recovered` forwards what is left: a
//! receipt is never lost while its cause is kept, and may arrive twice
//! (receipts are idempotent to the client).
//!
//! State: the log's relay inboxes, and the relay entries whose drop could
//! not be recorded yet (retried after each commit).

#[cfg(test)]
mod tests;

use tracing::{error, warn};

use super::{AfterCommit, Engine, Host, RelayRef, Reply, Request, SessionId};
use crate::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, ShardId, UserId};
use crate::proto::{error_frame, pb, ErrorCode};
use crate::store::{NewReceipt, ReceiptKind, StoredEntry};

/// The id list of a relay entry: the recipient device (user, device), then
/// the receipt's client message ids. A relay inbox serves every device of
/// its target shard, so each entry names its own.
pub fn relay_ids(recipient: InboxKey, client_message_ids: &[u64]) -> Vec<u64> {
    let mut ids = Vec::with_capacity(client_message_ids.len() + 2);
    ids.push(recipient.user.0);
    ids.push(recipient.device.0 as u64);
    ids.extend_from_slice(client_message_ids);
    ids
}

/// Reads back `relay_ids`: the recipient and the message ids.
pub fn split_relay_ids(ids: &[u64]) -> Option<(InboxKey, &[u64])> {
    match ids {
        [user, device, rest @ ..] => Some((
            InboxKey {
                user: UserId(*user),
                device: DeviceId(u32::try_from(*device).ok()?),
            },
            rest,
        )),
        _ => None,
    }
}

/// The `by` of a batched receipt: its entries name their devices (the
/// client message ids are (user, device, id) triples). User 0 is no one.
pub const BATCH_BY: InboxKey = InboxKey {
    user: UserId(0),
    device: DeviceId(0),
};

/// Reads back a batched receipt's ids: (by device, client message id).
pub fn split_batch(ids: &[u64]) -> impl Iterator<Item = (InboxKey, u64)> + '_ {
    ids.chunks_exact(3).map(|t| {
        (
            InboxKey {
                user: UserId(t[0]),
                device: DeviceId(t[1] as u32),
            },
            t[2],
        )
    })
}

/// Receipts' own state.
#[derive(Debug, Default)]
pub struct Receipts {
    /// Delivered receipts for group messages, per sender device: (member
    /// device, client message id). Stored as one batched receipt per
    /// sender before the next commit (`Event::BeforeCommit`), so a sender
    /// gets one Receipt for many members.
    batched: std::collections::BTreeMap<InboxKey, Vec<(InboxKey, u64)>>,
    /// Relay entries answered `Reply::Relayed` whose ack record could not be
    /// appended (the disk was full): dropped on a later try, so their
    /// segments can be reclaimed without waiting for a restart.
    undropped: Vec<(InboxKey, Vec<InboxSeq>)>,
}

impl Engine {
    /// A device acknowledged entries of its inbox: they are dropped, and
    /// each message among them gives its sender a delivered receipt.
    pub(super) fn on_ack(
        &mut self,
        device: InboxKey,
        session: SessionId,
        ack: pb::Ack,
        host: &mut impl Host,
    ) {
        if ack.sequences.len() > self.limits.ids_per_frame_max as usize {
            host.send(
                session,
                &error_frame(
                    ErrorCode::TooManyIds,
                    "too many sequences in one Ack",
                    false,
                ),
            );
            return;
        }
        // Only what this session was sent can be acknowledged: an ack of
        // entries never delivered would drop them unseen, and its receipt
        // could list a whole inbox. The window bounds every ack's work.
        let Some(last_sent) = self.session_mut(device, session).map(|s| s.last_sent()) else {
            return;
        };
        let up_to = ack.up_to_sequence.min(last_sent);
        let list: Vec<InboxSeq> = ack
            .sequences
            .iter()
            .filter(|&&s| s <= last_sent)
            .map(|&s| InboxSeq(s))
            .collect();
        // Delivered receipts are written before the ack record, one per
        // sender device listing its message ids: a crash between the two
        // then repeats a receipt (the message comes again and is acked
        // again) instead of losing it.
        let mut acked = self.log.acked_messages(device, InboxSeq(up_to), &list);
        let acked_count = acked.len();
        // A group message's receipt waits for the batch of its sender
        // (stored before the commit that holds this ack).
        let batch_max = self.limits.ids_per_frame_max.max(1) as usize;
        for m in acked.iter().filter(|m| m.group) {
            let batch = self.receipts.batched.entry(m.sender).or_default();
            batch.push((device, m.client_message_id.0));
            if batch.len() >= batch_max {
                let full = std::mem::take(batch);
                self.store_batch(m.sender, full, host);
            }
        }
        acked.retain(|m| !m.group);
        acked.sort_by_key(|m| m.sender);
        for group in acked.chunk_by(|a, b| a.sender == b.sender) {
            let ids: Vec<u64> = group.iter().map(|m| m.client_message_id.0).collect();
            self.store_receipt(group[0].sender, ReceiptKind::Delivered, device, ids, host);
        }
        // The window frees whether or not the record is written: the device
        // has the entries, and a session that kept them in flight would
        // stall until it reconnected.
        if let Some(live) = self.session_mut(device, session) {
            live.on_ack(ack.up_to_sequence, &ack.sequences);
        }
        match self.log.ack(device, InboxSeq(up_to), &list) {
            Ok(outcome) => {
                debug_assert!(outcome.removed as usize >= acked_count);
                self.metrics.messages_acked.add(acked_count as u64);
                host.commit_due();
            }
            Err(err) => {
                // The entries stay in the inbox: a later cumulative Ack
                // covers them, or the next session delivers them again. The
                // receipts stand, and come twice when they are acked again.
                error!(shard = %self.id, %err, "appending an ack record failed");
                host.send(
                    session,
                    &error_frame(ErrorCode::StoreFailed, "ack not recorded", false),
                );
            }
        }
        self.pump(device, host);
    }

    pub(super) fn on_read_receipt(
        &mut self,
        device: InboxKey,
        session: SessionId,
        read: pb::ReadReceipt,
        host: &mut impl Host,
    ) {
        if read.client_message_ids.len() > self.limits.ids_per_frame_max as usize {
            host.send(
                session,
                &error_frame(
                    ErrorCode::TooManyIds,
                    "too many ids in one ReadReceipt",
                    false,
                ),
            );
            return;
        }
        // Nothing was read: nothing to relay, and nothing wrong either.
        if read.client_message_ids.is_empty() {
            return;
        }
        let sender = UserId(read.sender_user_id);
        let sender_device = DeviceId(read.sender_device_id);
        if !self.directory.device_exists(sender, sender_device) {
            host.send(
                session,
                &error_frame(
                    ErrorCode::UnknownRecipient,
                    "read receipt for a sender device that does not exist",
                    false,
                ),
            );
            return;
        }
        let recipient = InboxKey {
            user: sender,
            device: sender_device,
        };
        // Only messages this reader got are relayed; other ids are dropped.
        let last_sent = self
            .session_mut(device, session)
            .map_or(0, |s| s.last_sent());
        let mut ids = read.client_message_ids;
        ids.retain(|&id| self.reader_got(device, recipient, id, last_sent));
        if ids.is_empty() {
            return;
        }
        self.store_receipt(recipient, ReceiptKind::Read, device, ids, host);
    }

    /// Whether `sender`'s message `client_message_id` reached `reader`, as
    /// far as this shard knows. It is the reader's home, where every message
    /// to the reader is stored, and its dedupe table remembers the messages
    /// stored here (the last `dedupe_entries_max`, and since a restart those
    /// still in the log): one it remembers must be the reader's account's,
    /// and, when it is the reader's own entry, either
    /// acknowledged (no longer pending) or written to the reader's current
    /// session. One it does not remember (older than that, or never stored
    /// for anyone here) cannot be told apart and is relayed.
    fn reader_got(
        &self,
        reader: InboxKey,
        sender: InboxKey,
        client_message_id: u64,
        last_sent: u64,
    ) -> bool {
        let Some(stored) = self
            .log
            .find_duplicate(sender, ClientMessageId(client_message_id))
        else {
            return true;
        };
        if stored.recipient.is_group() {
            // A group's message (this shard is the group's home): whether
            // the reader is a member is the group's to say; relayed.
            return true;
        }
        if stored.recipient.user != reader.user {
            return false;
        }
        if stored.recipient != reader {
            // A per-device Send to the reader's account: dedupe remembers
            // the primary's entry only, and reading is the account's.
            return true;
        }
        stored.seq.0 <= last_sent || !self.log.is_pending(reader, stored.seq)
    }

    /// Whether group receipts wait for their batch to be stored.
    pub fn receipts_batched(&self) -> bool {
        !self.receipts.batched.is_empty()
    }

    /// Stores every waiting batch of group receipts (before a commit).
    pub(super) fn flush_batched_receipts(&mut self, host: &mut impl Host) {
        for (sender, batch) in std::mem::take(&mut self.receipts.batched) {
            self.store_batch(sender, batch, host);
        }
    }

    /// One batched delivered receipt for `sender`.
    fn store_batch(&mut self, sender: InboxKey, batch: Vec<(InboxKey, u64)>, host: &mut impl Host) {
        if batch.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(batch.len() * 3);
        for (by, id) in batch {
            ids.extend_from_slice(&[by.user.0, u64::from(by.device.0), id]);
        }
        self.store_receipt(sender, ReceiptKind::Delivered, BATCH_BY, ids, host);
    }

    /// Stores a receipt for `recipient` (a sender device) here, or sends it
    /// to that device's home shard after keeping a copy in the relay inbox.
    pub(super) fn store_receipt(
        &mut self,
        recipient: InboxKey,
        kind: ReceiptKind,
        by: InboxKey,
        client_message_ids: Vec<u64>,
        host: &mut impl Host,
    ) {
        let home = self.home_of(recipient.user);
        let relay_inbox = InboxKey::relay_to_shard(home);
        let appended = if home == self.id {
            None
        } else {
            let kept = self.log.append_receipt(&NewReceipt {
                recipient: relay_inbox,
                kind,
                by,
                client_message_ids: &relay_ids(recipient, &client_message_ids),
                timestamp_ms: None,
            });
            match kept {
                Ok(appended) => Some(appended),
                Err(err) => {
                    // Forwarded all the same; only a crash before the home
                    // shard's commit could lose it now.
                    warn!(shard = %self.id, %err, %recipient, "receipt not kept for relay");
                    None
                }
            }
        };
        let request = Request::StoreReceipt {
            recipient,
            kind,
            by,
            client_message_ids,
            timestamp_ms: appended.map_or_else(|| self.now_ms(), |a| a.timestamp_ms),
            relay: appended.map(|a| RelayRef {
                shard: self.id,
                inbox: relay_inbox,
                seq: a.seq.0,
            }),
        };
        self.route(home, request, host);
    }

    /// Stores a receipt in the inbox of `recipient`, a device homed here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store_receipt_here(
        &mut self,
        recipient: InboxKey,
        kind: ReceiptKind,
        by: InboxKey,
        client_message_ids: Vec<u64>,
        timestamp_ms: u64,
        relay: Option<RelayRef>,
        host: &mut impl Host,
    ) {
        let appended = self.log.append_receipt(&NewReceipt {
            recipient,
            kind,
            by,
            client_message_ids: &client_message_ids,
            timestamp_ms: Some(timestamp_ms),
        });
        match appended {
            Ok(appended) => {
                self.push_after_commit(
                    appended.ticket,
                    AfterCommit::Visible { inbox: recipient },
                    host,
                );
                if let Some(relay) = relay {
                    self.push_after_commit(appended.ticket, AfterCommit::Relayed(relay), host);
                }
            }
            Err(err) => {
                // The acked messages stay acked; only the tick is lost.
                warn!(shard = %self.id, %err, %recipient, "receipt not stored");
                if let Some(relay) = relay {
                    self.send_reply(
                        Reply::Relayed {
                            shard: relay.shard,
                            inbox: relay.inbox,
                            seqs: vec![relay.seq],
                        },
                        host,
                    );
                }
            }
        }
    }

    /// Relayed receipts are stored on their home shard: drop the copies.
    pub(super) fn relayed(&mut self, inbox: InboxKey, seqs: Vec<u64>, host: &mut impl Host) {
        let seqs: Vec<InboxSeq> = seqs.into_iter().map(InboxSeq).collect();
        self.drop_relayed(inbox, seqs);
        host.commit_due();
    }

    fn drop_relayed(&mut self, inbox: InboxKey, seqs: Vec<InboxSeq>) {
        if let Err(err) = self.log.ack(inbox, InboxSeq(0), &seqs) {
            // Kept, tried again after the next commit (and forwarded again
            // after a restart).
            warn!(shard = %self.id, %err, %inbox, "relayed receipts not dropped");
            self.receipts.undropped.push((inbox, seqs));
        }
    }

    /// Tries again to drop relay entries whose drop failed.
    pub(super) fn retry_undropped(&mut self, host: &mut impl Host) {
        if self.receipts.undropped.is_empty() {
            return;
        }
        for (inbox, seqs) in std::mem::take(&mut self.receipts.undropped) {
            self.drop_relayed(inbox, seqs);
        }
        host.commit_due();
    }

    /// Answers the origins of relayed receipts that became durable here,
    /// once per origin and relay inbox, at most `ids_per_frame_max` each.
    pub(super) fn answer_relayed(&mut self, mut relayed: Vec<RelayRef>, host: &mut impl Host) {
        if relayed.is_empty() {
            return;
        }
        relayed.sort_by_key(|r| (r.shard, r.inbox, r.seq));
        let chunk = self.limits.ids_per_frame_max.max(1) as usize;
        for group in relayed.chunk_by(|a, b| (a.shard, a.inbox) == (b.shard, b.inbox)) {
            for part in group.chunks(chunk) {
                self.send_reply(
                    Reply::Relayed {
                        shard: part[0].shard,
                        inbox: part[0].inbox,
                        seqs: part.iter().map(|r| r.seq).collect(),
                    },
                    host,
                );
            }
        }
    }

    /// Forwards the receipts left in this shard's relay inboxes (a crash
    /// came between their cause's commit and their home shard's). Runs once
    /// at start, on what recovery found: receipts relayed from then on are
    /// forwarded as they arise.
    pub(super) fn forward_relayed(&mut self, host: &mut impl Host) {
        let inboxes: Vec<(InboxKey, InboxSeq)> = self
            .log
            .relay_inboxes()
            .into_iter()
            .map(|inbox| (inbox, self.log.last_seq(inbox)))
            .collect();
        let mut positions = Vec::new();
        let mut forwarded = 0u64;
        for (inbox, last) in inboxes {
            let mut after = InboxSeq(0);
            while after < last {
                positions.clear();
                self.log.pending_after(inbox, after, 64, &mut positions);
                if positions.is_empty() {
                    break;
                }
                for &(seq, position) in positions.iter() {
                    if seq > last {
                        after = last;
                        break;
                    }
                    after = seq;
                    let receipt = match self.log.read_for(inbox, position) {
                        Ok(Some(StoredEntry::Receipt(r))) => r,
                        Ok(Some(StoredEntry::Message(message))) => {
                            // A group's message kept for the shard of some
                            // of its members.
                            self.forward_group_again(inbox, seq.0, position, message, host);
                            forwarded += 1;
                            continue;
                        }
                        Ok(None) => continue,
                        Err(err) => {
                            error!(shard = %self.id, %inbox, seq = seq.0, %err, "unreadable relayed receipt skipped");
                            continue;
                        }
                    };
                    let Some((recipient, ids)) = split_relay_ids(&receipt.client_message_ids)
                    else {
                        error!(shard = %self.id, %inbox, seq = seq.0, "relayed receipt without its recipient skipped");
                        continue;
                    };
                    let request = Request::StoreReceipt {
                        recipient,
                        kind: receipt.kind,
                        by: receipt.by,
                        client_message_ids: ids.to_vec(),
                        timestamp_ms: receipt.timestamp_ms,
                        relay: Some(RelayRef {
                            shard: self.id,
                            inbox,
                            seq: seq.0,
                        }),
                    };
                    let home: ShardId = self.home_of(recipient.user);
                    self.route(home, request, host);
                    self.metrics.receipts_relayed_again.inc();
                    forwarded += 1;
                }
            }
        }
        if forwarded > 0 {
            warn!(shard = %self.id, forwarded, "receipts relayed again after a restart");
        }
    }
}
