//! Writes the committed seed corpus: `corpus/frame_decoder/seed-*` and
//! `corpus/handshake/seed-*` from the golden frames in `src/proto/testdata/`,
//! and `corpus/log_recovery/seed-*`, real segments written through `Log`
//! (plus hand-damaged copies).
//!
//! Run from anywhere: `cargo run --manifest-path tests/fuzz/Cargo.toml
//! --bin make_seeds`. The output is deterministic (a fixed clock), so a
//! rerun rewrites the same bytes unless the formats changed.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use switchboard::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, ShardId, UserId};
use switchboard::store::{Log, NewMessage, NewReceipt, ReceiptKind};
use switchboard_fuzz::frames::FrameInput;
use switchboard_fuzz::handshake::{self, Event};
use switchboard_fuzz::recovery::{config, FixedClock, SEED_EPOCH_MS, SHARD};

/// The limit the server uses by default (`limits.frame_bytes_max`).
const FRAME_BYTES_MAX: u32 = 66_560;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn key(user: u64, device: u32) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: DeviceId(device),
    }
}

/// Removes the old seeds of one target and returns its corpus directory.
fn fresh_seeds(target: &str) -> PathBuf {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for entry in std::fs::read_dir(&dir).expect("list corpus") {
        let path = entry.expect("corpus entry").path();
        let is_seed = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"));
        if is_seed {
            std::fs::remove_file(&path).expect("remove old seed");
        }
    }
    dir
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    println!("seed-{name}: {} bytes", bytes.len());
}

fn frame_seeds() {
    let out = fresh_seeds("frame_decoder");
    let testdata = fuzz_dir().join("../../src/proto/testdata");
    let mut names: Vec<String> = std::fs::read_dir(&testdata)
        .expect("golden frames")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| n.ends_with(".bin"))
        .collect();
    names.sort();
    let mut exchange = Vec::new();
    for name in &names {
        let frame = std::fs::read(testdata.join(name)).expect("read golden frame");
        let stem = name.trim_end_matches(".bin");
        let input = FrameInput {
            frame_bytes_max: FRAME_BYTES_MAX,
            chunk_lengths: &[],
            stream: &frame,
        };
        write_seed(&out, stem, &input.to_bytes());
        if !stem.starts_with("broken_") {
            exchange.extend_from_slice(&frame);
        }
    }
    // Every valid frame back to back, in one read and in small reads.
    let whole = FrameInput {
        frame_bytes_max: FRAME_BYTES_MAX,
        chunk_lengths: &[],
        stream: &exchange,
    };
    write_seed(&out, "all_frames", &whole.to_bytes());
    let dribbled = FrameInput {
        frame_bytes_max: FRAME_BYTES_MAX,
        chunk_lengths: &[1, 2, 3, 4, 5, 0, 7, 11, 13, 17, 1, 1, 1, 1, 64],
        stream: &exchange,
    };
    write_seed(&out, "all_frames_dribbled", &dribbled.to_bytes());
    // A limit below the Deliver frame's length.
    let deliver = std::fs::read(testdata.join("deliver.bin")).expect("deliver");
    let small = FrameInput {
        frame_bytes_max: 8,
        chunk_lengths: &[4, 1],
        stream: &deliver,
    };
    write_seed(&out, "deliver_over_limit", &small.to_bytes());
}

/// A scratch log directory for one scenario.
struct Scenario {
    dir: PathBuf,
    clock: Rc<FixedClock>,
    ttl_s: u64,
}

impl Scenario {
    fn new(name: &str, ttl_s: u64) -> Scenario {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-fuzz-seeds-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Scenario {
            dir,
            clock: Rc::new(FixedClock(Cell::new(SEED_EPOCH_MS))),
            ttl_s,
        }
    }

    fn open(&self) -> Log {
        let (log, report) = Log::open(&self.dir, SHARD, &config(self.ttl_s), self.clock.clone())
            .expect("open seed log");
        assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
        log
    }

    fn tick(&self) {
        self.clock.0.set(self.clock.0.get() + 7);
    }

    fn message(&self, log: &mut Log, to: InboxKey, id: u64, payload: &[u8]) -> InboxSeq {
        self.tick();
        log.append_message(&NewMessage {
            recipient: to,
            sender: key(1, 1),
            client_message_id: ClientMessageId(id),
            payload,
        })
        .expect("append message")
        .seq
    }

    /// Every segment file of the log, by sequence.
    fn segments(&self) -> Vec<(u32, Vec<u8>)> {
        let mut out: Vec<(u32, Vec<u8>)> = std::fs::read_dir(&self.dir)
            .expect("list log")
            .map(|e| e.expect("entry").path())
            .filter_map(|p| {
                let seq = switchboard::store::segment::parse_file_name(p.file_name()?.to_str()?)?;
                Some((seq, std::fs::read(&p).expect("read segment")))
            })
            .collect();
        out.sort();
        out
    }

    fn save(&self, out: &Path, name: &str) -> Vec<(u32, Vec<u8>)> {
        let segments = self.segments();
        for (seq, bytes) in &segments {
            write_seed(out, &format!("{name}-{seq}.seg"), bytes);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        segments
    }
}

/// Offsets of the records of a segment the store wrote.
fn record_offsets(seq: u32, bytes: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    switchboard::store::recovery::scan_segment(seq, bytes, |offset, _| out.push(offset as usize));
    out
}

fn segment_seeds() {
    let out = fresh_seeds("log_recovery");
    let (alice, bob, carol) = (key(2, 1), key(3, 1), key(3, 2));

    // Messages to two inboxes, one segment.
    let s = Scenario::new("messages", 3_600);
    let mut log = s.open();
    for i in 0..6u64 {
        let to = if i % 2 == 0 { alice } else { bob };
        s.message(&mut log, to, i + 1, &[b'a' + i as u8; 40]);
    }
    drop(log);
    let messages = s.save(&out, "messages");

    // Messages, receipts (one into a relay inbox), a cumulative and a listed ack.
    let s = Scenario::new("acks", 3_600);
    let mut log = s.open();
    for i in 0..5u64 {
        s.message(&mut log, bob, 10 + i, &[0x42; 24]);
    }
    s.tick();
    log.append_receipt(&NewReceipt {
        recipient: key(1, 1),
        kind: ReceiptKind::Delivered,
        by: bob,
        client_message_ids: &[10, 11],
        timestamp_ms: None,
    })
    .expect("receipt");
    s.tick();
    log.append_receipt(&NewReceipt {
        recipient: InboxKey::relay_to_shard(ShardId(1)),
        kind: ReceiptKind::Read,
        by: bob,
        client_message_ids: &[2, 7, 12],
        timestamp_ms: None,
    })
    .expect("relay receipt");
    log.ack(bob, InboxSeq(2), &[InboxSeq(4)]).expect("ack");
    drop(log);
    s.save(&out, "acks");

    // A group message to three inboxes, one of which acknowledges it.
    let s = Scenario::new("multi", 3_600);
    let mut log = s.open();
    s.tick();
    log.append_multi_message(
        &[alice, bob, carol],
        key(1, 1),
        ClientMessageId(99),
        b"to the group",
    )
    .expect("multi message");
    s.message(&mut log, carol, 100, b"direct");
    log.ack(bob, InboxSeq(1), &[]).expect("ack");
    drop(log);
    s.save(&out, "multi");

    // Enough to roll over; everything acknowledged and reclaimed, so the
    // inbox floors are carried into the active segment.
    let s = Scenario::new("floors", 3_600);
    let mut log = s.open();
    for i in 0..40u64 {
        let to = [alice, bob, carol][i as usize % 3];
        s.message(&mut log, to, 200 + i, &[i as u8; 200]);
    }
    for inbox in [alice, bob, carol] {
        log.ack(inbox, InboxSeq(u64::from(u32::MAX)), &[])
            .expect("ack all");
    }
    log.expire_and_reclaim().expect("reclaim");
    s.message(&mut log, alice, 300, b"after the floors");
    drop(log);
    s.save(&out, "floors");

    // Two full segments and an active one; the acks in the later segments
    // remove entries of the first.
    let s = Scenario::new("rolled", 3_600);
    let mut log = s.open();
    for i in 0..36u64 {
        let to = [alice, bob][i as usize % 2];
        s.message(&mut log, to, 500 + i, &[0x30 + i as u8; 180]);
    }
    log.ack(alice, InboxSeq(3), &[InboxSeq(5), InboxSeq(9)])
        .expect("ack");
    log.ack(bob, InboxSeq(0), &[InboxSeq(2)]).expect("ack");
    drop(log);
    s.save(&out, "rolled");

    // Records written with a 30 s TTL: expired when the target opens them.
    let s = Scenario::new("expired", 30);
    let mut log = s.open();
    for i in 0..3u64 {
        s.message(&mut log, alice, 400 + i, &[7; 16]);
    }
    drop(log);
    s.save(&out, "expired");

    // Hand-damaged copies of the first segment: a torn last record, a
    // flipped bit in a middle record, a zeroed middle record, a damaged
    // length field, and a header-only segment.
    let (seq, pristine) = &messages[0];
    let offsets = record_offsets(*seq, pristine);
    assert!(offsets.len() >= 4, "messages seed holds several records");
    let last = *offsets.last().expect("a record");
    let mut torn = pristine.clone();
    torn[last + 30..last + 112].fill(0);
    write_seed(&out, "damaged-torn-tail.seg", &torn);
    let mut flipped = pristine.clone();
    flipped[offsets[2] + 50] ^= 0x08;
    write_seed(&out, "damaged-bit-flip.seg", &flipped);
    let mut hole = pristine.clone();
    hole[offsets[1]..offsets[2]].fill(0);
    write_seed(&out, "damaged-zeroed-record.seg", &hole);
    let mut length = pristine.clone();
    length[offsets[3] + 2] ^= 0x01;
    write_seed(&out, "damaged-length.seg", &length);
    write_seed(
        &out,
        "empty-1.seg",
        &switchboard_fuzz::recovery::empty_segment(1),
    );
}

fn handshake_seeds() {
    let out = fresh_seeds("handshake");
    let testdata = fuzz_dir().join("../../src/proto/testdata");
    let golden = |name: &str| std::fs::read(testdata.join(name)).expect("golden frame");
    let (register, hello, ping) = (
        golden("register.bin"),
        golden("hello.bin"),
        golden("ping.bin"),
    );
    let (open, closed, token) = (0, 1, 2);
    let mut pipelined = register.clone();
    pipelined.extend_from_slice(&hello);
    pipelined.extend_from_slice(&ping);
    let seeds: Vec<(&str, u8, Vec<Event<'_>>)> = vec![
        ("hello", open, vec![Event::Read(&hello)]),
        (
            "register_hello_ping_in_one_read",
            open,
            vec![Event::Read(&pipelined), Event::LookupDone],
        ),
        (
            "register_then_hello",
            token,
            vec![
                Event::Read(&register),
                Event::LookupDone,
                Event::Read(&hello),
                Event::Read(&ping),
            ],
        ),
        (
            "register_twice",
            open,
            vec![
                Event::Read(&register),
                Event::LookupDone,
                Event::Read(&register),
            ],
        ),
        ("register_closed", closed, vec![Event::Read(&register)]),
        ("ping_first", open, vec![Event::Read(&ping)]),
        (
            "hello_byte_by_byte_then_half_close",
            open,
            hello[..20]
                .chunks(1)
                .map(Event::Read)
                .chain([Event::Wake, Event::InputClosed])
                .collect(),
        ),
        ("half_close_only", open, vec![Event::InputClosed]),
    ];
    for (name, policy, events) in &seeds {
        write_seed(
            &out,
            name,
            &handshake::input(*policy, FRAME_BYTES_MAX, events),
        );
    }
    for name in [
        "broken_deliver_unknown_type.bin",
        "broken_zero_length.bin",
        "broken_deliver_oversized_length.bin",
    ] {
        let bytes = golden(name);
        let seed = handshake::input(open, FRAME_BYTES_MAX, &[Event::Read(&bytes)]);
        write_seed(&out, name.trim_end_matches(".bin"), &seed);
    }
}

fn main() {
    frame_seeds();
    segment_seeds();
    handshake_seeds();
}
