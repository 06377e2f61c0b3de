//! The spare segment file: made ahead of a roll (the fallocate through the
//! executor's ring), taken by the roll, and never a danger to recovery.

mod common;

use std::path::Path;

use common::store::{clock, config, key};
use switchboard::config::Durability;
use switchboard::ids::{ClientMessageId, InboxKey, InboxSeq, ShardId};
use switchboard::store::segment::preallocate_spare;
use switchboard::store::{Log, NewMessage, SpareRequest, StoredEntry, SPARE_FILE};

const PAYLOAD: &[u8] = &[7u8; 1000];

fn append(log: &mut Log, to: InboxKey, id: u64) {
    log.append_message(&NewMessage {
        recipient: to,
        sender: key(1, 1),
        client_message_id: ClientMessageId(id),
        payload: PAYLOAD,
    })
    .unwrap();
}

fn segments(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

fn pending(log: &Log, inbox: InboxKey) -> usize {
    let mut out = Vec::new();
    log.pending_after(inbox, InboxSeq(0), usize::MAX, &mut out);
    for (_, position) in &out {
        match log.read(*position).unwrap().unwrap() {
            StoredEntry::Message(m) => assert_eq!(&m.payload[..], PAYLOAD),
            StoredEntry::Receipt(_) => panic!("expected a message"),
        }
    }
    out.len()
}

/// Appends messages to `to` (ids after `*sent`) until the log asks for a
/// spare; fails if a whole segment goes by without one.
fn fill_until_spare_wanted(log: &mut Log, to: InboxKey, sent: &mut u64) -> SpareRequest {
    let start = *sent;
    loop {
        if let Some(request) = log.spare_wanted() {
            return request;
        }
        *sent += 1;
        append(log, to, *sent);
        assert!(*sent - start < 64, "no spare asked for within one segment");
    }
}

/// Appends messages to `to` until `dir` holds `count` segments.
fn fill_until_segments(log: &mut Log, dir: &Path, to: InboxKey, sent: &mut u64, count: usize) {
    while segments(dir).len() < count {
        *sent += 1;
        append(log, to, *sent);
    }
}

/// Runs `preallocate_spare` on a glommio executor, as the shard does.
fn make_spare(path: &Path, size_bytes: u64) -> std::io::Result<std::fs::File> {
    let path = path.to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async move { preallocate_spare(&path, size_bytes).await })
}

#[test]
fn the_spare_is_asked_for_at_half_and_taken_by_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(Durability::Os);
    let bob = key(2, 1);
    let (mut log, _) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    let mut sent = 0u64;
    let request = fill_until_spare_wanted(&mut log, bob, &mut sent);
    // Asked for once a half segment is written, and only once.
    assert!(
        sent * 1000 >= config.segment_size_bytes / 2 - 2000,
        "asked for at {sent} KB"
    );
    assert!(log.spare_wanted().is_none());
    assert_eq!(request.path, dir.path().join(SPARE_FILE));
    assert_eq!(request.size_bytes, config.segment_size_bytes);
    log.spare_prepared(make_spare(&request.path, request.size_bytes));
    assert!(log.spare_ready());
    assert_eq!(segments(dir.path()).len(), 1);
    fill_until_segments(&mut log, dir.path(), bob, &mut sent, 2);
    // The roll renamed the spare into the new segment.
    assert!(!log.spare_ready());
    assert!(!dir.path().join(SPARE_FILE).exists());
    let second = dir.path().join(&segments(dir.path())[1]);
    assert_eq!(
        std::fs::metadata(&second).unwrap().len(),
        config.segment_size_bytes
    );
    assert_eq!(pending(&log, bob), sent as usize);
    drop(log);
    let (log, report) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(pending(&log, bob), sent as usize);
}

#[test]
fn a_spare_left_by_a_crash_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(Durability::Fsync);
    let bob = key(2, 1);
    {
        let (mut log, _) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
        append(&mut log, bob, 1);
        let batch = log.begin_commit().unwrap();
        batch.sync_blocking().unwrap();
        log.finish_commit(batch);
    }
    let spare = dir.path().join(SPARE_FILE);
    make_spare(&spare, config.segment_size_bytes).unwrap();
    let (mut log, report) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert!(!spare.exists());
    assert_eq!(pending(&log, bob), 1);
    // Made again when wanted: the name is free.
    let mut sent = 1;
    let request = fill_until_spare_wanted(&mut log, bob, &mut sent);
    log.spare_prepared(make_spare(&request.path, request.size_bytes));
    assert!(log.spare_ready());
}

#[test]
fn a_bad_or_failed_spare_leaves_the_roll_to_create_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(Durability::Os);
    let bob = key(2, 1);
    let (mut log, _) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    let mut sent = 0u64;
    // A failed preparation: nothing is asked for again before the roll.
    let request = fill_until_spare_wanted(&mut log, bob, &mut sent);
    log.spare_prepared(Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
    assert!(!log.spare_ready());
    assert!(log.spare_wanted().is_none());
    fill_until_segments(&mut log, dir.path(), bob, &mut sent, 2);
    // After the roll it is asked for again; this time the file handed over
    // is short (not a segment's size): the roll creates its own.
    let request2 = fill_until_spare_wanted(&mut log, bob, &mut sent);
    assert_eq!(request2.path, request.path);
    std::fs::write(&request2.path, b"short").unwrap();
    let short = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&request2.path)
        .unwrap();
    log.spare_prepared(Ok(short));
    fill_until_segments(&mut log, dir.path(), bob, &mut sent, 3);
    assert!(!request2.path.exists());
    for name in segments(dir.path()) {
        let len = std::fs::metadata(dir.path().join(name)).unwrap().len();
        assert_eq!(len, config.segment_size_bytes);
    }
    assert_eq!(pending(&log, bob), sent as usize);
    drop(log);
    let (log, report) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    assert_eq!(pending(&log, bob), sent as usize);
}

#[test]
fn preallocate_spare_refuses_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SPARE_FILE);
    std::fs::write(&path, b"someone else's").unwrap();
    let err = make_spare(&path, 64 << 10).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    // Left as it was.
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
}

#[test]
fn no_spare_is_made_past_log_bytes_max() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(Durability::Os);
    config.log_bytes_max = 2 * config.segment_size_bytes;
    let bob = key(2, 1);
    let (mut log, _) = Log::open(dir.path(), ShardId(0), &config, clock()).unwrap();
    let mut sent = 0u64;
    // One segment on disk: the spare fits beside it.
    let request = fill_until_spare_wanted(&mut log, bob, &mut sent);
    log.spare_prepared(make_spare(&request.path, request.size_bytes));
    fill_until_segments(&mut log, dir.path(), bob, &mut sent, 2);
    // Two on disk fill the bound: no spare while the last one fills up.
    for _ in 0..128 {
        assert!(log.spare_wanted().is_none(), "a spare past the bound");
        sent += 1;
        let appended = log.append_message(&NewMessage {
            recipient: bob,
            sender: key(1, 1),
            client_message_id: ClientMessageId(sent),
            payload: PAYLOAD,
        });
        if appended.is_err() {
            break;
        }
    }
    assert!(!dir.path().join(SPARE_FILE).exists());
    assert_eq!(segments(dir.path()).len(), 2);
}
