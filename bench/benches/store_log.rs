//! Store log benchmarks: append throughput per payload size and durability
//! level (fsync with group commit); the delivery read path (what the pump
//! does per delivered entry: find the next pending entry of a device's
//! inbox and read it back), for a group's record fanned out to 1,024
//! member devices and for 1:1 messages; then a one-shot report of commit
//! latency percentiles, recovery scan speed and index bytes per pending
//! message.
//!
//! Run: `cargo bench -p switchboard-bench --bench store_log`.
//! Segments live in a temporary directory on the file system of `TMPDIR`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use hdrhistogram::Histogram;
use switchboard::config::{Durability, StoreConfig};
use switchboard::ids::{ClientMessageId, DeviceId, InboxKey, InboxSeq, ShardId, UserId};
use switchboard::store::{Clock, Log, NewGroupMessage, NewMessage, SystemClock};

/// Records appended between two group commits in the fsync runs.
const COMMIT_BATCH_RECORDS: u64 = 64;

/// Group sizes compared in the report.
const REPORT_BATCH_SIZES: [u64; 4] = [1, 16, 64, 512];

fn key(user: u64) -> InboxKey {
    InboxKey {
        user: UserId(user),
        device: DeviceId(1),
    }
}

fn config(durability: Durability) -> StoreConfig {
    StoreConfig {
        segment_size_bytes: 64 << 20,
        durability,
        ..StoreConfig::default()
    }
}

fn executor() -> glommio::LocalExecutor {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor")
}

/// Appends `count` messages of `payload` bytes round-robin over 1,000
/// inboxes, committing every `COMMIT_BATCH_RECORDS` (fsync) and acking what
/// was appended so segments are reclaimed as in steady state. Returns the
/// time spent and the commit latencies.
async fn append_run(
    log: &mut Log,
    count: u64,
    batch_records: u64,
    payload: &[u8],
    next_id: &Cell<u64>,
    latencies: &mut Histogram<u64>,
) -> Duration {
    let start = Instant::now();
    let mut in_batch = 0;
    for _ in 0..count {
        let id = next_id.get();
        next_id.set(id + 1);
        let recipient = key(id % 1_000);
        log.append_message(&NewMessage {
            recipient,
            sender: key(1_000_000),
            client_message_id: ClientMessageId(id),
            payload,
        })
        .expect("append");
        in_batch += 1;
        if in_batch == batch_records {
            in_batch = 0;
            commit(log, latencies).await;
        }
    }
    commit(log, latencies).await;
    let elapsed = start.elapsed();
    for u in 0..1_000 {
        let inbox = key(u);
        let last = log.last_seq(inbox);
        if last > InboxSeq(0) {
            log.ack(inbox, last, &[]).expect("ack");
        }
    }
    commit(log, latencies).await;
    log.expire_and_reclaim().expect("reclaim");
    elapsed
}

async fn commit(log: &mut Log, latencies: &mut Histogram<u64>) {
    if let Some(batch) = log.begin_commit() {
        let start = Instant::now();
        batch.sync().await.expect("fdatasync");
        log.finish_commit(batch);
        let _ = latencies.record(start.elapsed().as_micros().max(1) as u64);
    }
}

fn append_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_append");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    for durability in [Durability::Os, Durability::Fsync] {
        for size in [100usize, 4_096] {
            let payload = vec![0xA5u8; size];
            group.throughput(Throughput::Bytes(size as u64));
            let id = BenchmarkId::new(format!("{durability:?}").to_lowercase(), size);
            group.bench_with_input(id, &payload, |b, payload| {
                let dir = tempfile::tempdir().expect("temp dir");
                let clock: Rc<dyn Clock> = Rc::new(SystemClock);
                let (mut log, _) =
                    Log::open(dir.path(), ShardId(0), &config(durability), clock).expect("open");
                let next_id = Cell::new(0);
                b.iter_custom(|iters| {
                    let mut latencies = Histogram::new(3).expect("histogram");
                    executor().run(append_run(
                        &mut log,
                        iters,
                        COMMIT_BATCH_RECORDS,
                        payload,
                        &next_id,
                        &mut latencies,
                    ))
                });
            });
        }
    }
    group.finish();
}

/// Member devices of the group in `delivery_reads`.
const GROUP_MEMBERS: u64 = 1_024;

/// Per delivered entry, what the pump asks of the log: the device's next
/// pending entry (`pending_after`), whether it is durable, and the entry
/// itself (`read_for`). One iteration delivers one group message to every
/// member device, or one 1:1 message to each of as many devices.
fn delivery_reads(c: &mut Criterion) {
    let mut group = c.benchmark_group("delivery_read");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(GROUP_MEMBERS));
    let payload = vec![0xA5u8; 100];
    let members: Vec<InboxKey> = (0..GROUP_MEMBERS).map(key).collect();
    for shape in ["group", "one_to_one"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock: Rc<dyn Clock> = Rc::new(SystemClock);
        let (mut log, _) =
            Log::open(dir.path(), ShardId(0), &config(Durability::Os), clock).expect("open");
        if shape == "group" {
            log.append_group_message(&NewGroupMessage {
                group_id: 7,
                group_seq: 1,
                event: false,
                sender: key(1_000_000),
                client_message_id: ClientMessageId(1),
                recipients: &members,
                remote_members: &[],
                timestamp_ms: None,
                payload: &payload,
            })
            .expect("append");
        } else {
            for (i, &recipient) in members.iter().enumerate() {
                log.append_message(&NewMessage {
                    recipient,
                    sender: key(1_000_000),
                    client_message_id: ClientMessageId(i as u64 + 1),
                    payload: &payload,
                })
                .expect("append");
            }
        }
        let mut latencies = Histogram::new(3).expect("histogram");
        executor().run(commit(&mut log, &mut latencies));
        let mut positions = Vec::new();
        group.bench_function(shape, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for &member in &members {
                    log.pending_after(member, InboxSeq(0), 64, &mut positions);
                    let &(_, position) = positions.first().expect("a pending entry");
                    assert!(log.is_durable(position));
                    let entry = log.read_for(member, position).expect("read");
                    bytes += std::hint::black_box(entry).is_some() as usize;
                }
                bytes
            })
        });
    }
    group.finish();
}

/// One-shot measurements criterion does not fit: printed as a report.
fn report() {
    println!("== store_log report ==");
    for size in [100usize, 4_096] {
        for batch_records in REPORT_BATCH_SIZES {
            let dir = tempfile::tempdir().expect("temp dir");
            let clock: Rc<dyn Clock> = Rc::new(SystemClock);
            let (mut log, _) =
                Log::open(dir.path(), ShardId(0), &config(Durability::Fsync), clock).expect("open");
            let payload = vec![0x5Au8; size];
            let next_id = Cell::new(0);
            let mut latencies = Histogram::new(3).expect("histogram");
            // About two seconds of work at the rates seen on a small machine.
            let count = (batch_records * 2_000).min(if size <= 100 { 200_000 } else { 50_000 });
            let elapsed = executor().run(append_run(
                &mut log,
                count,
                batch_records,
                &payload,
                &next_id,
                &mut latencies,
            ));
            println!(
                "fsync, {size} B payload, groups of {batch_records}: {count} appends in {:.3} s = {:.0} records/s, {:.1} MB/s payload; commit us p50={} p90={} p99={} p99.9={} max={} (n={})",
                elapsed.as_secs_f64(),
                count as f64 / elapsed.as_secs_f64(),
                (count * size as u64) as f64 / elapsed.as_secs_f64() / 1e6,
                latencies.value_at_quantile(0.50),
                latencies.value_at_quantile(0.90),
                latencies.value_at_quantile(0.99),
                latencies.value_at_quantile(0.999),
                latencies.max(),
                latencies.len()
            );
        }
    }

    // Recovery scan and index size: 1,000,000 pending 100-byte messages
    // over 10,000 inboxes (100 each), written with durability os.
    let dir = tempfile::tempdir().expect("temp dir");
    let clock: Rc<dyn Clock> = Rc::new(SystemClock);
    let pending = 1_000_000u64;
    let inboxes = 10_000u64;
    {
        let (mut log, _) = Log::open(
            dir.path(),
            ShardId(0),
            &config(Durability::Os),
            clock.clone(),
        )
        .expect("open");
        let payload = [0x11u8; 100];
        for id in 0..pending {
            log.append_message(&NewMessage {
                recipient: key(id % inboxes),
                sender: key(1_000_000),
                client_message_id: ClientMessageId(id),
                payload: &payload,
            })
            .expect("append");
        }
        let dedupe = log.dedupe_bytes();
        println!(
            "dedupe: {} entries, about {dedupe} bytes = {:.1} bytes per entry",
            log.dedupe_len(),
            dedupe as f64 / log.dedupe_len() as f64
        );
        let index = log.index_bytes();
        println!(
            "index: {pending} pending entries in {inboxes} inboxes: {index} bytes of entries = {:.1} bytes per pending message",
            index as f64 / pending as f64
        );
    }
    let start = Instant::now();
    let (log, report) =
        Log::open(dir.path(), ShardId(0), &config(Durability::Os), clock).expect("reopen");
    let elapsed = start.elapsed();
    let bytes = log.stats().bytes_on_disk;
    println!(
        "recovery: {} records, {} segments ({} MB mapped) in {:.3} s = {:.0} MB/s of segment, {:.0} records/s",
        report.records,
        report.segments,
        bytes / 1_000_000,
        elapsed.as_secs_f64(),
        bytes as f64 / elapsed.as_secs_f64() / 1e6,
        report.records as f64 / elapsed.as_secs_f64()
    );
    println!(
        "after recovery: index {:.1} bytes per pending message",
        log.index_bytes() as f64 / report.messages_pending as f64
    );
}

criterion_group!(benches, append_throughput, delivery_reads);

fn main() {
    report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
