//! The per-shard log over real files: appends, acks, reopen, dedupe,
//! expiry, reclamation, limits and group commit.

mod common;

use std::path::Path;
use std::rc::Rc;

use common::store::{clock, config, key};
use switchboard::config::{Durability, StoreConfig};
use switchboard::ids::{ClientMessageId, InboxKey, InboxSeq, ShardId};
use switchboard::store::storage::SimStorage;
use switchboard::store::{
    inspect, AckedMessage, Clock, Log, LogPosition, ManualClock, NewMessage, NewReceipt,
    ReceiptKind, StoreError, StoredEntry,
};

fn open(dir: &Path, config: &StoreConfig, clock: &Rc<ManualClock>) -> Log {
    let (log, report) = Log::open(dir, ShardId(0), config, clock.clone()).unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    log
}

fn send(log: &mut Log, to: InboxKey, from: InboxKey, id: u64, payload: &[u8]) -> InboxSeq {
    log.append_message(&NewMessage {
        recipient: to,
        sender: from,
        client_message_id: ClientMessageId(id),
        payload,
    })
    .unwrap()
    .seq
}

fn pending(log: &Log, inbox: InboxKey) -> Vec<(InboxSeq, LogPosition)> {
    let mut out = Vec::new();
    log.pending_after(inbox, InboxSeq(0), usize::MAX, &mut out);
    out
}

fn payload_of(log: &Log, position: LogPosition) -> Vec<u8> {
    match log.read(position).unwrap().unwrap() {
        StoredEntry::Message(m) => m.payload.to_vec(),
        StoredEntry::Receipt(_) => panic!("expected a message"),
    }
}

#[test]
fn appends_and_reads_back_messages_and_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut log = open(dir.path(), &config(Durability::Os), &clock);
    let (alice, bob) = (key(1, 1), key(2, 1));
    assert_eq!(send(&mut log, bob, alice, 10, b"one"), InboxSeq(1));
    assert_eq!(send(&mut log, bob, alice, 11, b"two"), InboxSeq(2));
    let receipt = log
        .append_receipt(&NewReceipt {
            recipient: alice,
            kind: ReceiptKind::Read,
            by: bob,
            client_message_ids: &[10, 11],
            timestamp_ms: None,
        })
        .unwrap();
    assert_eq!(receipt.seq, InboxSeq(1));
    assert_eq!(log.durable_ticket(), log.appended_ticket());
    let bobs = pending(&log, bob);
    assert_eq!(bobs.len(), 2);
    assert_eq!(payload_of(&log, bobs[1].1), b"two");
    match log.read(receipt.position).unwrap().unwrap() {
        StoredEntry::Receipt(r) => {
            assert_eq!(r.kind, ReceiptKind::Read);
            assert_eq!(r.by, bob);
            assert_eq!(r.client_message_ids, vec![10, 11]);
        }
        StoredEntry::Message(_) => panic!("expected a receipt"),
    }
    let mut out = Vec::new();
    log.pending_after(bob, InboxSeq(1), 10, &mut out);
    assert_eq!(
        out.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![InboxSeq(2)]
    );
    assert_eq!(log.pending_count(bob), 2);
    assert_eq!(log.pending_count(alice), 1);
    assert_eq!(log.stats().entries_pending, 3);
}

#[test]
fn reopened_log_has_the_same_inboxes_and_continues_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob) = (key(1, 1), key(2, 1));
    {
        let mut log = open(dir.path(), &config, &clock);
        for i in 0..300u64 {
            send(&mut log, bob, alice, i, &[i as u8; 200]);
        }
        assert!(log.stats().segments > 1, "rolled over");
    }
    let (mut log, report) = Log::open(dir.path(), ShardId(0), &config, clock.clone()).unwrap();
    assert_eq!(report.messages_pending, 300);
    assert_eq!(report.torn_tail_truncated_bytes, 0);
    let entries = pending(&log, bob);
    assert_eq!(entries.len(), 300);
    for (i, (seq, position)) in entries.iter().enumerate() {
        assert_eq!(seq.0, i as u64 + 1);
        assert_eq!(payload_of(&log, *position), vec![i as u8; 200]);
    }
    assert_eq!(send(&mut log, bob, alice, 1_000, b"next"), InboxSeq(301));
}

#[test]
fn acked_messages_are_reported_and_not_resurrected_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob) = (key(1, 1), key(2, 1));
    {
        let mut log = open(dir.path(), &config, &clock);
        for i in 1..=10u64 {
            send(&mut log, bob, alice, 100 + i, b"m");
        }
        log.append_receipt(&NewReceipt {
            recipient: bob,
            kind: ReceiptKind::Delivered,
            by: alice,
            client_message_ids: &[7],
            timestamp_ms: None,
        })
        .unwrap();
        // What the ack will remove can be read first, removing nothing.
        let preview = log.acked_messages(bob, InboxSeq(3), &[InboxSeq(5), InboxSeq(11)]);
        assert_eq!(log.pending_count(bob), 11);
        let outcome = log
            .ack(bob, InboxSeq(3), &[InboxSeq(5), InboxSeq(11)])
            .unwrap();
        // Four messages and the receipt.
        assert_eq!(outcome.removed, 5);
        assert_eq!(
            preview,
            [101, 102, 103, 105]
                .iter()
                .map(|&id| AckedMessage {
                    sender: alice,
                    client_message_id: ClientMessageId(id),
                    group: false,
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(log.pending_count(bob), 6);
        let nothing = log.ack(bob, InboxSeq(2), &[]).unwrap();
        assert_eq!(nothing.removed, 0);
    }
    let log = open(dir.path(), &config, &clock);
    let left: Vec<u64> = pending(&log, bob).iter().map(|e| e.0 .0).collect();
    assert_eq!(left, vec![4, 6, 7, 8, 9, 10]);
}

#[test]
fn sequence_never_goes_backwards_after_full_ack_reclaim_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob, carol) = (key(1, 1), key(2, 1), key(3, 1));
    let last;
    {
        let mut log = open(dir.path(), &config, &clock);
        send(&mut log, carol, alice, 1, b"carol's only message");
        for i in 0..600u64 {
            send(&mut log, bob, alice, 10 + i, &[0; 300]);
        }
        last = log.last_seq(bob);
        log.ack(bob, last, &[]).unwrap();
        log.ack(carol, InboxSeq(1), &[]).unwrap();
        // Roll past the segment holding the acks so every older one can go.
        for i in 0..200u64 {
            let s = send(&mut log, alice, bob, 10_000 + i, &[0; 300]);
            log.ack(alice, s, &[]).unwrap();
        }
        log.expire_and_reclaim().unwrap();
        assert!(log.stats().segments <= 2, "{:?}", log.stats());
    }
    let mut log = open(dir.path(), &config, &clock);
    assert_eq!(log.pending_count(bob), 0);
    assert_eq!(send(&mut log, bob, alice, 5_000, b"x").0, last.0 + 1);
    assert_eq!(send(&mut log, carol, alice, 5_001, b"x"), InboxSeq(2));
}

#[test]
fn dedupe_finds_messages_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob) = (key(1, 1), key(2, 1));
    {
        let mut log = open(dir.path(), &config, &clock);
        send(&mut log, bob, alice, 77, b"hello");
        let dup = log.find_duplicate(alice, ClientMessageId(77)).unwrap();
        assert_eq!(dup.recipient, bob);
        assert!(log.find_duplicate(alice, ClientMessageId(78)).is_none());
    }
    let mut log = open(dir.path(), &config, &clock);
    let dup = log.find_duplicate(alice, ClientMessageId(77)).unwrap();
    assert_eq!((dup.recipient, dup.seq), (bob, InboxSeq(1)));
    assert!(dup.ticket <= log.durable_ticket());
    log.set_dedupe_capacity(1);
    send(&mut log, bob, alice, 78, b"second");
    assert!(
        log.find_duplicate(alice, ClientMessageId(77)).is_none(),
        "evicted"
    );
    assert!(log.find_duplicate(alice, ClientMessageId(78)).is_some());
}

#[test]
fn expired_entries_are_never_returned_and_are_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob) = (key(1, 1), key(2, 1));
    let mut log = open(dir.path(), &config, &clock);
    let first = log
        .append_message(&NewMessage {
            recipient: bob,
            sender: alice,
            client_message_id: ClientMessageId(1),
            payload: &[1; 1000],
        })
        .unwrap();
    for i in 0..200 {
        send(&mut log, bob, alice, 2 + i, &[1; 1000]);
    }
    let segments_full = log.stats().segments;
    assert!(segments_full >= 3);
    clock.advance_ms(1_800_000);
    let young = send(&mut log, bob, alice, 999, b"young");
    clock.advance_ms(1_800_000); // The first 201 are now an hour old.
    assert_eq!(log.read(first.position).unwrap(), None);
    assert_eq!(log.pending_count(bob), 1);
    assert_eq!(
        pending(&log, bob).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![young]
    );
    let dropped = log.expire_and_reclaim().unwrap();
    assert_eq!(dropped, 201);
    assert_eq!(log.stats().expired_total, 201);
    assert!(log.stats().segments < segments_full, "{:?}", log.stats());
    drop(log);
    let log = open(dir.path(), &config, &clock);
    assert_eq!(
        pending(&log, bob).iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![young]
    );
}

#[test]
fn reclamation_brings_disk_back_to_about_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let mut log = open(dir.path(), &config, &clock);
    let senders: Vec<InboxKey> = (1..=20).map(|u| key(u, 1)).collect();
    let bob = key(1_000, 1);
    for round in 0..50u64 {
        for (i, s) in senders.iter().enumerate() {
            send(&mut log, bob, *s, round * 100 + i as u64, &[0; 500]);
        }
    }
    let peak = log.stats().segments;
    assert!(peak >= 8, "{peak}");
    log.ack(bob, log.last_seq(bob), &[]).unwrap();
    log.expire_and_reclaim().unwrap();
    let after = log.stats();
    assert!(after.segments <= 2, "{after:?}");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files as u32, after.segments);
    assert_eq!(after.entries_pending, 0);
}

#[test]
fn log_cap_answers_full_then_recovers_after_acks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut config = config(Durability::Os);
    config.log_bytes_max = 3 * (64 << 10);
    let mut log = open(dir.path(), &config, &clock);
    let (alice, bob) = (key(1, 1), key(2, 1));
    let mut id = 0;
    let full = loop {
        id += 1;
        match log.append_message(&NewMessage {
            recipient: bob,
            sender: alice,
            client_message_id: ClientMessageId(id),
            payload: &[0; 1000],
        }) {
            Ok(_) => assert!(id < 1_000, "cap never reached"),
            Err(e) => break e,
        }
    };
    assert!(matches!(full, StoreError::Full(_)), "{full}");
    assert!(log.stats().bytes_on_disk <= config.log_bytes_max);
    // Still serving: reads and acks work, and acks free space.
    assert_eq!(pending(&log, bob).len() as u64, id - 1);
    log.ack(bob, log.last_seq(bob), &[]).unwrap();
    log.expire_and_reclaim().unwrap();
    send(&mut log, bob, alice, 1_000_000, &[0; 1000]);
}

#[test]
fn disk_full_answers_full_then_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let storage = Rc::new(SimStorage::new(1));
    let (mut log, _) = Log::open_with_storage(
        dir.path(),
        ShardId(0),
        &config,
        clock.clone(),
        storage.clone(),
    )
    .unwrap();
    let (alice, bob) = (key(1, 1), key(2, 1));
    storage.disk_full.set(true);
    let mut sent = 0;
    let error = loop {
        match log.append_message(&NewMessage {
            recipient: bob,
            sender: alice,
            client_message_id: ClientMessageId(sent),
            payload: &[0; 1000],
        }) {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(error, StoreError::Full(_)), "{error}");
    assert_eq!(log.pending_count(bob), sent);
    storage.disk_full.set(false);
    send(&mut log, bob, alice, 9_999, b"after space returned");
    assert_eq!(log.pending_count(bob), sent + 1);
}

#[test]
fn rejects_record_larger_than_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let mut log = open(dir.path(), &config(Durability::Os), &clock);
    let error = log
        .append_message(&NewMessage {
            recipient: key(2, 1),
            sender: key(1, 1),
            client_message_id: ClientMessageId(1),
            payload: &[0; 70_000],
        })
        .unwrap_err();
    assert!(matches!(error, StoreError::RecordTooLarge(_)));
}

#[test]
fn multi_recipient_message_is_indexed_in_every_inbox_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let alice = key(1, 1);
    let members = [key(2, 1), key(3, 1), key(3, 2)];
    {
        let mut log = open(dir.path(), &config, &clock);
        send(&mut log, members[1], alice, 1, b"before");
        let multi = log
            .append_multi_message(&members, alice, ClientMessageId(2), b"to the group")
            .unwrap();
        assert_eq!(multi.seqs[1], (members[1], InboxSeq(2)));
        log.ack(members[0], InboxSeq(1), &[]).unwrap();
    }
    let log = open(dir.path(), &config, &clock);
    assert_eq!(log.pending_count(members[0]), 0);
    for m in &members[1..] {
        let last = *pending(&log, *m).last().unwrap();
        match log.read_for(*m, last.1).unwrap().unwrap() {
            StoredEntry::Message(msg) => {
                assert_eq!(msg.seq, last.0);
                assert_eq!(&msg.payload[..], b"to the group");
            }
            StoredEntry::Receipt(_) => panic!("expected a message"),
        }
    }
    assert!(log.find_duplicate(alice, ClientMessageId(2)).is_some());
}

#[test]
fn a_group_record_read_for_each_member_shares_one_payload_copy() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let alice = key(1, 1);
    let members = [key(2, 1), key(3, 1), key(4, 1)];
    let mut log = open(dir.path(), &config, &clock);
    log.append_multi_message(&members, alice, ClientMessageId(1), b"to the group")
        .unwrap();
    let devices = [key(5, 1), key(5, 2)];
    let parts: Vec<(InboxKey, &[u8])> = vec![(devices[0], b"phone"), (devices[1], b"laptop")];
    log.append_device_message(&parts, alice, ClientMessageId(2))
        .unwrap();
    let read = |log: &Log, inbox: InboxKey| {
        let (_, position) = pending(log, inbox)[0];
        match log.read_for(inbox, position).unwrap().unwrap() {
            StoredEntry::Message(msg) => msg.payload,
            StoredEntry::Receipt(_) => panic!("expected a message"),
        }
    };
    let first = read(&log, members[0]);
    for m in &members[1..] {
        let payload = read(&log, *m);
        assert_eq!(&payload[..], b"to the group");
        assert_eq!(
            payload.as_ptr(),
            first.as_ptr(),
            "one copy for every member"
        );
    }
    // Per-device parts are each their own, before and after another read.
    assert_eq!(&read(&log, devices[0])[..], b"phone");
    assert_eq!(&read(&log, members[0])[..], b"to the group");
    assert_eq!(&read(&log, devices[1])[..], b"laptop");
    // The record's sequence is still each member's own.
    let (seq, position) = pending(&log, members[2])[0];
    match log.read_for(members[2], position).unwrap().unwrap() {
        StoredEntry::Message(msg) => assert_eq!(msg.seq, seq),
        StoredEntry::Receipt(_) => panic!("expected a message"),
    }
}

#[test]
fn device_message_gives_each_inbox_its_own_payload_and_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(Durability::Os);
    let clock = clock();
    let alice = key(1, 1);
    let devices = [key(2, 1), key(2, 2), key(2, 5)];
    let parts: Vec<(InboxKey, &[u8])> = vec![
        (devices[0], b"for the phone"),
        (devices[1], b""),
        (devices[2], b"for the laptop, longer"),
    ];
    let framed = {
        let mut log = open(dir.path(), &config, &clock);
        send(&mut log, devices[1], alice, 1, b"earlier");
        let appended = log
            .append_device_message(&parts, alice, ClientMessageId(2))
            .unwrap();
        assert_eq!(appended.seqs[1], (devices[1], InboxSeq(2)));
        appended.position
    };
    let log = open(dir.path(), &config, &clock);
    for (inbox, part) in &parts {
        let last = *pending(&log, *inbox).last().unwrap();
        assert_eq!(last.1, framed, "every entry points into the one record");
        match log.read_for(*inbox, last.1).unwrap().unwrap() {
            StoredEntry::Message(msg) => {
                assert_eq!(msg.seq, last.0);
                assert_eq!(&msg.payload[..], *part);
                assert_eq!(msg.client_message_id, ClientMessageId(2));
            }
            StoredEntry::Receipt(_) => panic!("expected a message"),
        }
    }
    assert!(log.find_duplicate(alice, ClientMessageId(2)).is_some());
}

#[test]
fn group_commit_advances_the_durable_ticket() {
    let dir = tempfile::tempdir().unwrap();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move {
            let clock = clock();
            let mut log = open(dir.path(), &config(Durability::Fsync), &clock);
            let (alice, bob) = (key(1, 1), key(2, 1));
            let mut last = None;
            for i in 0..100 {
                last = Some(
                    log.append_message(&NewMessage {
                        recipient: bob,
                        sender: alice,
                        client_message_id: ClientMessageId(i),
                        payload: &[7; 1000],
                    })
                    .unwrap(),
                );
            }
            let last = last.unwrap();
            assert!(log.durable_ticket() < last.ticket);
            assert!(log.needs_commit());
            let batch = log.begin_commit().unwrap();
            assert!(log.begin_commit().is_none(), "one batch in flight");
            assert!(batch.segment_count() >= 2, "rolled segments are synced too");
            // Written after the batch started: not covered by it.
            let later = log
                .append_message(&NewMessage {
                    recipient: bob,
                    sender: alice,
                    client_message_id: ClientMessageId(1_000),
                    payload: b"later",
                })
                .unwrap();
            assert!(!log.is_durable(last.position));
            batch.sync().await.unwrap();
            log.finish_commit(batch);
            assert!(log.durable_ticket() >= last.ticket);
            assert!(log.durable_ticket() < later.ticket);
            assert!(log.is_durable(last.position));
            assert!(!log.is_durable(later.position));
            let batch = log.begin_commit().unwrap();
            batch.sync().await.unwrap();
            log.finish_commit(batch);
            assert_eq!(log.durable_ticket(), log.appended_ticket());
            assert!(!log.needs_commit());
            assert!(log.begin_commit().is_none(), "nothing left to sync");
            assert_eq!(log.commit_latency_histogram().len(), 2);
        });
}

#[test]
fn failed_fsync_is_an_error_and_a_dropped_batch_is_retried_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move {
            let clock = clock();
            let storage = Rc::new(SimStorage::new(2));
            let (mut log, _) = Log::open_with_storage(
                dir.path(),
                ShardId(0),
                &config(Durability::Fsync),
                clock.clone(),
                storage.clone(),
            )
            .unwrap();
            send(&mut log, key(2, 1), key(1, 1), 1, b"x");
            storage.fsync_fails.set(true);
            let batch = log.begin_commit().unwrap();
            let error = batch.sync().await.unwrap_err();
            assert!(matches!(error, StoreError::Io(_)), "{error}");
            drop(batch);
            assert_eq!(log.durable_ticket().0, 0);
            storage.fsync_fails.set(false);
            let batch = log.begin_commit().expect("dropped batch's files come back");
            assert_eq!(batch.segment_count(), 1);
            batch.sync().await.unwrap();
            log.finish_commit(batch);
            assert_eq!(log.durable_ticket(), log.appended_ticket());
        });
}

#[test]
fn inspect_reports_counts_and_leaves_files_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let log_dir = dir.path().join("shard-0").join("log");
    let config = config(Durability::Os);
    {
        let mut log = open(&log_dir, &config, &clock);
        for i in 0..100 {
            send(&mut log, key(2, 1), key(1, 1), i, &[3; 700]);
        }
        log.ack(key(2, 1), InboxSeq(40), &[]).unwrap();
    }
    let before: Vec<Vec<u8>> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let report = inspect(dir.path()).unwrap();
    assert_eq!(report.logs.len(), 1);
    let log = &report.logs[0];
    assert_eq!(log.shard, Some(0));
    assert_eq!(log.records_by_kind[0], 100);
    assert_eq!(log.records_by_kind[2], 1);
    assert_eq!(log.entries_live, 60);
    assert_eq!(log.entries_dead, 40);
    assert!(log.corruptions.is_empty());
    let text = report.to_string();
    assert!(text.contains("live=60"), "{text}");
    let after: Vec<Vec<u8>> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(before == after, "inspect modified a segment");
}

#[test]
fn fsync_reclamation_waits_for_commits_then_returns_to_about_one_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move {
            let clock = clock();
            let config = config(Durability::Fsync);
            let (alice, bob) = (key(1, 1), key(2, 1));
            let last;
            {
                let mut log = open(&path, &config, &clock);
                for i in 0..400 {
                    send(&mut log, bob, alice, i, &[9; 600]);
                }
                last = log.last_seq(bob);
                let peak = log.stats().segments;
                assert!(peak >= 4, "{peak}");
                log.ack(bob, last, &[]).unwrap();
                let mut commits = 0;
                while log.needs_commit() {
                    commits += 1;
                    assert!(commits <= 10, "commits never settle");
                    let batch = log.begin_commit().unwrap();
                    batch.sync().await.unwrap();
                    log.finish_commit(batch);
                    log.expire_and_reclaim().unwrap();
                }
                assert!(log.stats().segments <= 2, "{:?}", log.stats());
            }
            let mut log = open(&path, &config, &clock);
            assert_eq!(log.pending_count(bob), 0);
            assert_eq!(send(&mut log, bob, alice, 10_000, b"x").0, last.0 + 1);
        });
}

/// Random appends, receipts, list and cumulative acks, clock jumps, expiry
/// and reopens against a plain model of the inboxes; the log must agree
/// with the model after every step, and sequences never repeat.
#[test]
fn random_operations_agree_with_a_model_across_reopens() {
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, HashMap};
    let seed: u64 = std::env::var("STORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("store model test seed {seed} (rerun with STORE_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let inboxes: Vec<InboxKey> = (0..5).map(|u| key(100 + u, 1 + (u % 2) as u32)).collect();
    // inbox -> seq -> (payload byte, len, expires_ms)
    let mut model: HashMap<InboxKey, BTreeMap<u64, (u8, usize, u64)>> = HashMap::new();
    let mut last_seq: HashMap<InboxKey, u64> = HashMap::new();
    let mut log = open(dir.path(), &config, &clock);
    for step in 0..3_000u32 {
        match rng.gen_range(0..20) {
            0..=9 => {
                let inbox = inboxes[rng.gen_range(0..inboxes.len())];
                let byte = rng.gen::<u8>();
                let len = rng.gen_range(0..2_500);
                let a = log
                    .append_message(&NewMessage {
                        recipient: inbox,
                        sender: key(1, 1),
                        client_message_id: ClientMessageId(step as u64),
                        payload: &vec![byte; len],
                    })
                    .unwrap();
                let last = last_seq.entry(inbox).or_default();
                assert!(
                    a.seq.0 > *last,
                    "seed {seed} step {step}: sequence repeated"
                );
                *last = a.seq.0;
                let expires = a.timestamp_ms + config.message_ttl_s * 1000;
                model
                    .entry(inbox)
                    .or_default()
                    .insert(a.seq.0, (byte, len, expires));
            }
            10..=11 => {
                let inbox = inboxes[rng.gen_range(0..inboxes.len())];
                let a = log
                    .append_receipt(&NewReceipt {
                        recipient: inbox,
                        kind: ReceiptKind::Delivered,
                        by: key(1, 1),
                        client_message_ids: &[step as u64],
                        timestamp_ms: None,
                    })
                    .unwrap();
                let last = last_seq.entry(inbox).or_default();
                assert!(
                    a.seq.0 > *last,
                    "seed {seed} step {step}: sequence repeated"
                );
                *last = a.seq.0;
                let expires = a.timestamp_ms + config.message_ttl_s * 1000;
                model
                    .entry(inbox)
                    .or_default()
                    .insert(a.seq.0, (0, usize::MAX, expires));
            }
            12..=15 => {
                let inbox = inboxes[rng.gen_range(0..inboxes.len())];
                let entries = model.entry(inbox).or_default();
                let keys: Vec<u64> = entries.keys().copied().collect();
                if keys.is_empty() {
                    continue;
                }
                let up_to = if rng.gen_bool(0.5) {
                    keys[rng.gen_range(0..keys.len())]
                } else {
                    0
                };
                let list: Vec<InboxSeq> = (0..rng.gen_range(0..4))
                    .map(|_| InboxSeq(keys[rng.gen_range(0..keys.len())]))
                    .collect();
                log.ack(inbox, InboxSeq(up_to), &list).unwrap();
                entries.retain(|s, _| *s > up_to && !list.contains(&InboxSeq(*s)));
            }
            16 => {
                clock.advance_ms(rng.gen_range(0..1_200_000));
                log.expire_and_reclaim().unwrap();
            }
            17 => {
                drop(log);
                log = open(dir.path(), &config, &clock);
            }
            _ => {
                log.expire_and_reclaim().unwrap();
            }
        }
        let now = clock.now_ms();
        for inbox in &inboxes {
            let expected: Vec<(u64, (u8, usize))> = model
                .get(inbox)
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.2 > now)
                        .map(|(s, v)| (*s, (v.0, v.1)))
                        .collect()
                })
                .unwrap_or_default();
            let got: Vec<(u64, (u8, usize))> = pending(&log, *inbox)
                .into_iter()
                .map(
                    |(seq, position)| match log.read(position).unwrap().unwrap() {
                        StoredEntry::Message(m) => (
                            seq.0,
                            (m.payload.first().copied().unwrap_or(0), m.payload.len()),
                        ),
                        StoredEntry::Receipt(_) => (seq.0, (0, usize::MAX)),
                    },
                )
                .map(|(s, (b, l))| (s, (if l == 0 { 0 } else { b }, l)))
                .collect();
            let expected: Vec<(u64, (u8, usize))> = expected
                .into_iter()
                .map(|(s, (b, l))| (s, (if l == 0 { 0 } else { b }, l)))
                .collect();
            assert_eq!(got, expected, "seed {seed} step {step} inbox {inbox}");
            assert_eq!(log.pending_count(*inbox), expected.len() as u64);
        }
    }
    let stats = log.stats();
    assert!(stats.segments >= 1);
}

#[test]
fn relay_inboxes_hold_receipts_until_acknowledged_and_survive_reopen() {
    use switchboard::shard::{relay_ids, split_relay_ids};
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let (alice, bob) = (key(1, 1), key(2, 1));
    // One relay inbox for every device homed on shard 1.
    let relay = InboxKey::relay_to_shard(ShardId(1));
    // A relayed receipt keeps the time it arose.
    let then = switchboard::store::Clock::now_ms(&*clock) - 5_000;
    assert!(relay.is_relay() && !alice.is_relay());
    {
        let mut log = open(dir.path(), &config, &clock);
        for id in [[7u64], [8]] {
            log.append_receipt(&NewReceipt {
                recipient: relay,
                kind: ReceiptKind::Delivered,
                by: bob,
                client_message_ids: &relay_ids(alice, &id),
                timestamp_ms: Some(then),
            })
            .unwrap();
        }
        assert_eq!(log.relay_inboxes(), vec![relay]);
        // The home shard stored the first: it is acknowledged by sequence.
        log.ack(relay, InboxSeq(0), &[InboxSeq(1)]).unwrap();
        assert_eq!(log.pending_count(relay), 1);
    }
    // After a restart the second is still there to forward, with its
    // recipient and its time.
    let log = open(dir.path(), &config, &clock);
    assert_eq!(log.relay_inboxes(), vec![relay]);
    let entries = pending(&log, relay);
    assert_eq!(entries.len(), 1);
    match log.read_for(relay, entries[0].1).unwrap() {
        Some(switchboard::store::StoredEntry::Receipt(r)) => {
            assert_eq!(r.seq, InboxSeq(2));
            let (recipient, ids) = split_relay_ids(&r.client_message_ids).unwrap();
            assert_eq!(recipient, alice);
            assert_eq!(ids, &[8]);
            assert_eq!(r.timestamp_ms, then);
            assert_eq!(r.by, bob);
        }
        other => panic!("expected the relayed receipt, got {other:?}"),
    }
    assert!(split_relay_ids(&[1]).is_none());
}

/// The `VmFlags` of every mapping of `file` in this process, with each
/// mapping's size in bytes.
fn mappings_of(file: &Path) -> Vec<(u64, String)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = file.to_str().unwrap();
    let mut out = Vec::new();
    let mut current: Option<u64> = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: "start-end perms offset dev inode path".
            current = line.ends_with(name).then(|| {
                let (start, end) = first.split_once('-').unwrap();
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap()
            });
        } else if let (Some(size), Some(flags)) = (current, line.strip_prefix("VmFlags:")) {
            out.push((size, flags.trim().to_string()));
        }
    }
    out
}

/// The part of a segment not yet written has read-ahead off (`rr`, the
/// kernel's MADV_RANDOM), so an append's page fault never zero-fills
/// megabytes ahead of it on the shard's thread; after a reopen, the active
/// segment's tail is advised again and what is written keeps read-ahead
/// for the recovery scan and reads.
#[test]
fn the_unwritten_part_of_a_segment_is_mapped_without_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let config = config(Durability::Os);
    let segment = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        names.sort();
        names.pop().expect("a segment file")
    };
    let (alice, bob) = (key(1, 1), key(2, 1));
    {
        let mut log = open(dir.path(), &config, &clock);
        send(&mut log, bob, alice, 1, b"hello");
        let maps = mappings_of(&segment(dir.path()));
        assert_eq!(maps.len(), 1, "{maps:?}");
        assert!(maps[0].1.split(' ').any(|f| f == "rr"), "{maps:?}");
        // Well past the first page.
        let payload = vec![7u8; 1000];
        for id in 2..40 {
            send(&mut log, bob, alice, id, &payload);
        }
    }
    let log = open(dir.path(), &config, &clock);
    let maps = mappings_of(&segment(dir.path()));
    let random: u64 = maps
        .iter()
        .filter(|(_, flags)| flags.split(' ').any(|f| f == "rr"))
        .map(|(size, _)| *size)
        .sum();
    let total: u64 = maps.iter().map(|(size, _)| *size).sum();
    assert_eq!(total, config.segment_size_bytes, "{maps:?}");
    assert!(random > 0 && random < total, "{maps:?}");
    // The written part (about 40 KB) keeps read-ahead.
    assert!(total - random >= 32 * 1024, "{maps:?}");
    drop(log);
}
