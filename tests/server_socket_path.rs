//! The server's io_uring socket path over real sockets: frames split at every
//! byte (handshake and session, with the handoff between shards in the
//! middle), resets in the middle of a frame, pipelined floods that meet
//! every backpressure bound, handoff churn that reuses the driver's slots,
//! and a graceful stop under load.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{hello, Account, RawClient, Server};
use switchboard::proto::{pb, Frame, GoAwayReason};

fn send_frame(id: u64, to: u64, payload: &str) -> Frame {
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload: Bytes::from(payload.to_string()),
        device_payloads: vec![],
        ..Default::default()
    })
}

/// Logs `to` in and reads every message due, acknowledging each; returns
/// the client message ids in delivery order.
fn drain_inbox(addr: SocketAddr, to: &Account, expected: usize) -> Vec<u64> {
    let (mut c, _) = RawClient::login(addr, to);
    let ids = c.receive_and_ack(expected);
    // Nothing more is due.
    c.send(&Frame::Ping(pb::Ping { nonce: 99 }));
    loop {
        match c.recv() {
            Some(Frame::Pong(p)) if p.nonce == 99 => break,
            Some(Frame::Deliver(d)) => panic!("unexpected extra delivery {d:?}"),
            Some(_) => {}
            None => panic!("closed while draining"),
        }
    }
    ids
}

/// Reads until `acks` ServerAcks and a Pong with `nonce` arrived.
fn expect_acks_and_pong(c: &mut RawClient, acks: &[u64], nonce: u64) {
    let mut got = Vec::new();
    let mut pong = false;
    while got.len() < acks.len() || !pong {
        match c.recv() {
            Some(Frame::ServerAck(a)) => got.push(a.client_message_id),
            Some(Frame::Pong(p)) => {
                assert_eq!(p.nonce, nonce);
                pong = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, acks);
}

#[test]
fn hello_and_session_frames_split_at_every_byte_are_handled_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    let bob = RawClient::register(server.addr);
    // One sender homed on each shard: whichever shard accepts a connection,
    // half of them are handed off with part of their bytes already read.
    let senders: Vec<Account> = (0..shards)
        .map(|s| RawClient::register_on_shard(server.addr, s, shards))
        .collect();
    let mut expected = Vec::new();
    // Ids from 1,000 and fixed-width payloads keep every frame the same
    // length, so each split point falls at the same place in the layout.
    let mut next_id = 1_000u64;
    for (which, sender) in senders.iter().enumerate() {
        let layout = |a: u64, b: u64| {
            let mut bytes = hello(sender).to_bytes().to_vec();
            bytes.extend_from_slice(&send_frame(a, bob.user, &format!("m{a:06}")).to_bytes());
            bytes.extend_from_slice(&Frame::Ping(pb::Ping { nonce: 7 }).to_bytes());
            bytes.extend_from_slice(&send_frame(b, bob.user, &format!("m{b:06}")).to_bytes());
            bytes
        };
        let length = layout(next_id, next_id + 1).len();
        for split in 1..length {
            // Fresh ids per connection: a repeated id would be deduplicated.
            let (a, b) = (next_id, next_id + 1);
            next_id += 2;
            let bytes = layout(a, b);
            assert_eq!(bytes.len(), length, "same layout for every split");
            let mut c = RawClient::connect(server.addr);
            c.send_bytes(&bytes[..split]).unwrap();
            c.stream.flush().unwrap();
            std::thread::sleep(Duration::from_millis(2));
            c.send_bytes(&bytes[split..]).unwrap();
            match c.recv() {
                Some(Frame::Welcome(_)) => {}
                other => panic!("sender {which}, split {split}: expected Welcome, got {other:?}"),
            }
            expect_acks_and_pong(&mut c, &[a, b], 7);
            expected.extend([a, b]);
        }
    }
    assert_eq!(
        drain_inbox(server.addr, &bob, expected.len()),
        expected,
        "every message delivered once, in order"
    );
}

/// Closes with a reset instead of a FIN (SO_LINGER 0).
fn reset(c: RawClient) {
    nix::sys::socket::setsockopt(
        &c.stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(c);
}

#[test]
fn reset_in_the_middle_of_a_frame_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let mut acked = Vec::new();
    for round in 0..20u64 {
        let (mut c, _) = RawClient::login(server.addr, &alice);
        let ids: Vec<u64> = (0..5).map(|i| round * 10 + i + 1).collect();
        for &id in &ids {
            c.send(&send_frame(id, bob.user, &format!("r{id}")));
        }
        let (acks, _) = c.collect_acks(ids.len());
        acked.extend(acks.iter().map(|a| a.client_message_id));
        // Half of the next frame, then a reset (SO_LINGER 0 and close).
        let partial = send_frame(round * 10 + 9, bob.user, "never whole").to_bytes();
        c.send_bytes(&partial[..partial.len() / 2 + (round as usize % 3)])
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        reset(c);
    }
    // A reset in the middle of a handshake frame too.
    for cut in [1usize, 3, 4, 5, 20] {
        let mut c = RawClient::connect(server.addr);
        let bytes = hello(&alice).to_bytes();
        c.send_bytes(&bytes[..cut.min(bytes.len() - 1)]).unwrap();
        reset(c);
    }
    assert_eq!(drain_inbox(server.addr, &bob, acked.len()), acked);
}

#[test]
fn pipelined_flood_meets_every_bound_and_is_fully_acknowledged() {
    // for_tests bounds: 8 unanswered Sends, a 64 KiB output queue, shard
    // channels of 4: the flood meets each of them many times over.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    let alice = RawClient::register_on_shard(server.addr, 0, shards);
    let bob = RawClient::register_on_shard(server.addr, 1 % shards, shards);
    let (c, _) = RawClient::login(server.addr, &alice);
    const N: u64 = 3_000;
    let mut writer = c.stream.try_clone().unwrap();
    let to = bob.user;
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for id in 1..=N {
            batch.extend_from_slice(&send_frame(id, to, &format!("f{id}")).to_bytes());
            if id % 100 == 0 {
                writer.write_all(&batch).expect("flood write");
                batch.clear();
            }
        }
        writer.write_all(&batch).expect("flood write");
    });
    let mut c = c;
    let (acks, others) = c.collect_acks(N as usize);
    writer.join().unwrap();
    assert!(others.is_empty(), "no errors: {others:?}");
    // ServerAcks may come in another order than the Sends (protocol.md);
    // each one exactly once.
    let mut ids: Vec<u64> = acks.iter().map(|a| a.client_message_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=N).collect::<Vec<_>>(), "acked once each");
    assert_eq!(
        drain_inbox(server.addr, &bob, N as usize),
        (1..=N).collect::<Vec<_>>()
    );
}

#[test]
fn handoff_churn_reuses_slots_without_mixing_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    let accounts: Vec<Account> = (0..shards)
        .map(|s| RawClient::register_on_shard(server.addr, s, shards))
        .collect();
    let addr = server.addr;
    let threads: Vec<_> = accounts
        .into_iter()
        .enumerate()
        .map(|(t, account)| {
            std::thread::spawn(move || {
                for round in 0..150u64 {
                    let (mut c, welcome) = RawClient::login(addr, &account);
                    assert!(welcome.protocol_version >= 1);
                    let nonce = (t as u64) << 32 | round;
                    c.send(&Frame::Ping(pb::Ping { nonce }));
                    // The newest connection of the device: no GoAway is due
                    // to it, only the Pong.
                    match c.recv() {
                        Some(Frame::Pong(p)) => {
                            assert_eq!(p.nonce, nonce, "a Pong for another session")
                        }
                        other => panic!("round {round}: unexpected {other:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (_, body) = common::admin_get(server.admin, "/metrics");
    assert!(common::metric_sum(&body, "switchboard_handoffs_in_total", "") > 0.0);
}

#[test]
fn graceful_stop_under_load_exits_zero_and_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let bob = RawClient::register(server.addr);
    let senders: Vec<Account> = (0..6).map(|_| RawClient::register(server.addr)).collect();
    let addr = server.addr;
    let threads: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(t, sender)| {
            let to = bob.user;
            std::thread::spawn(move || {
                let (mut c, _) = RawClient::login(addr, &sender);
                let mut acked = BTreeSet::new();
                let mut id = 0u64;
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut went_away = false;
                while !went_away && Instant::now() < deadline && id < 20_000 {
                    for _ in 0..4 {
                        id += 1;
                        let frame = send_frame(id, to, &format!("{t}:{id}"));
                        if c.send_bytes(&frame.to_bytes()).is_err() {
                            went_away = true;
                            break;
                        }
                    }
                    let mut answered = 0;
                    while answered < 4 && !went_away {
                        match c.recv_timeout(Duration::from_secs(5)) {
                            Some(Frame::ServerAck(a)) => {
                                acked.insert(a.client_message_id);
                                answered += 1;
                            }
                            Some(Frame::GoAway(g)) => {
                                assert_eq!(g.reason, GoAwayReason::ShuttingDown as i32);
                                went_away = true;
                            }
                            Some(Frame::Error(e)) => panic!("error under load: {e:?}"),
                            Some(_) => {}
                            None => went_away = true,
                        }
                    }
                }
                assert!(went_away, "sender {t} never saw the stop");
                (sender, acked)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A connection still in its handshake is told to go away as well.
    let mut handshaking = RawClient::connect(server.addr);
    std::thread::sleep(Duration::from_millis(100));
    let status = server.terminate();
    assert_eq!(status, Some(0), "clean exit on SIGTERM under load");
    match handshaking.recv() {
        Some(Frame::GoAway(g)) => assert_eq!(g.reason, GoAwayReason::ShuttingDown as i32),
        other => panic!("expected GoAway during the handshake, got {other:?}"),
    }
    handshaking.expect_closed();
    let results: Vec<(Account, BTreeSet<u64>)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    server.launch();
    let total: usize = results.iter().map(|(_, a)| a.len()).sum();
    assert!(total > 0, "the load ran before the stop");
    // Every acknowledged message is delivered after the restart, each
    // sender's in order (unacknowledged ones may be there too).
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let mut delivered: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); results.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    let complete = |d: &Vec<BTreeSet<u64>>| {
        results
            .iter()
            .zip(d)
            .all(|((_, acked), got)| acked.is_subset(got))
    };
    while !complete(&delivered) {
        assert!(Instant::now() < deadline, "acknowledged messages missing");
        let d = b.collect_delivers(1).remove(0);
        let text = String::from_utf8(d.payload.to_vec()).unwrap();
        let (t, id) = text.split_once(':').unwrap();
        delivered[t.parse::<usize>().unwrap()].insert(id.parse().unwrap());
        b.ack(d.sequence);
    }
}

#[test]
fn never_reading_pinger_is_paused_then_closed_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.server.shards = 1);
    let account = RawClient::register(server.addr);
    let (c, _) = RawClient::login(server.addr, &account);
    let rss_before = server.rss_bytes();
    // Pings until the server stops reading (the write blocks), bounded in
    // count and time; the Pongs are never read, so the kernel's buffers
    // fill, then the server's output bound, then the server pauses.
    let mut writer = c.stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let ping = Frame::Ping(pb::Ping { nonce: 1 }).to_bytes();
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 1_000)
        .collect();
    let mut written = 0u64;
    let started = Instant::now();
    let mut blocked = false;
    while written < 5_000_000 && started.elapsed() < Duration::from_secs(10) {
        if writer.write_all(&batch).is_err() {
            blocked = true;
            break;
        }
        written += 1_000;
    }
    assert!(blocked, "the server kept reading {written} Pings");
    let grown = server.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 8 << 20, "server grew by {grown} bytes");
    // Paused, the session receives nothing; the idle timeout (3 s) closes
    // it even though its socket takes no more output.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = common::admin_get(server.admin, "/metrics");
        if common::metric_sum(&metrics, "switchboard_connections", "") == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent session was never closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(c);
    let other = RawClient::register(server.addr);
    let (mut o, _) = RawClient::login(server.addr, &other);
    o.send(&Frame::Ping(pb::Ping { nonce: 5 }));
    assert!(matches!(o.recv(), Some(Frame::Pong(p)) if p.nonce == 5));
}

#[test]
fn every_socket_ring_setup_serves_sessions_and_handoffs() {
    use switchboard::config::SocketRingSetup;
    for setup in [
        SocketRingSetup::DeferTaskrun,
        SocketRingSetup::CoopTaskrun,
        SocketRingSetup::Plain,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), |c| c.server.socket_ring_setup = setup);
        let shards = server.shards();
        let alice = RawClient::register_on_shard(server.addr, 0, shards);
        let bob = RawClient::register_on_shard(server.addr, 1 % shards, shards);
        let (mut a, _) = RawClient::login(server.addr, &alice);
        for id in 1..=20 {
            a.send(&send_frame(id, bob.user, &format!("{setup:?} {id}")));
        }
        let (acks, _) = a.collect_acks(20);
        assert_eq!(acks.len(), 20, "{setup:?}");
        assert_eq!(
            drain_inbox(server.addr, &bob, 20),
            (1..=20).collect::<Vec<_>>(),
            "{setup:?}"
        );
    }
}

#[test]
fn random_splits_resets_and_garbage_leave_no_session_behind() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("SWITCHBOARD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (SWITCHBOARD_FUZZ_SEED to repeat)");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    let shards = server.shards();
    let bob = RawClient::register(server.addr);
    let addr = server.addr;
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            // Each thread its own devices (one homed on each shard): two
            // threads sharing one would replace each other's sessions.
            let senders: Vec<Account> = (0..shards)
                .map(|s| RawClient::register_on_shard(addr, s, shards))
                .collect();
            let to = bob.user;
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (t << 32));
                let mut acked = Vec::new();
                for round in 0..30u64 {
                    let sender = &senders[rng.gen_range(0..senders.len())];
                    let mut bytes = hello(sender).to_bytes().to_vec();
                    let sends = rng.gen_range(0..6u64);
                    let base = (t << 40) | (round << 8);
                    for i in 0..sends {
                        bytes.extend_from_slice(
                            &send_frame(base + i, to, &"x".repeat(rng.gen_range(1..300)))
                                .to_bytes(),
                        );
                    }
                    let mut c = RawClient::connect(addr);
                    // Random chunks with short pauses between some of them.
                    let mut at = 0;
                    while at < bytes.len() {
                        let n = rng.gen_range(1..=(bytes.len() - at).min(64));
                        if c.send_bytes(&bytes[at..at + n]).is_err() {
                            break;
                        }
                        at += n;
                        if rng.gen_bool(0.1) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    match rng.gen_range(0..4) {
                        // Read every answer, then close cleanly.
                        0 | 1 => {
                            let mut got = 0;
                            while got < sends {
                                match c.recv() {
                                    Some(Frame::ServerAck(a)) => {
                                        acked.push(a.client_message_id);
                                        got += 1;
                                    }
                                    Some(Frame::Welcome(_)) => {}
                                    // This device's previous connection, reset
                                    // just now on the other shard, finished its
                                    // handshake late and was taken as the newer
                                    // one: the race the protocol resolves with
                                    // REPLACED (docs/protocol.md, 4.9).
                                    Some(Frame::GoAway(g))
                                        if g.reason == GoAwayReason::Replaced as i32 =>
                                    {
                                        break
                                    }
                                    other => panic!("seed {seed}: unexpected {other:?}"),
                                }
                            }
                        }
                        // Garbage after the frames: the session ends with an error.
                        2 => {
                            let junk: Vec<u8> =
                                (0..rng.gen_range(5..40)).map(|_| rng.gen()).collect();
                            let _ = c.send_bytes(&junk);
                            let _ = c.stream.shutdown(std::net::Shutdown::Write);
                            while c.recv_timeout(Duration::from_secs(10)).is_some() {}
                        }
                        // A reset without reading anything.
                        _ => reset(c),
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    // Every acknowledged message is in Bob's inbox (others may be too).
    acked.sort_unstable();
    let (mut b, _) = RawClient::login(server.addr, &bob);
    let mut delivered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !acked.iter().all(|id| delivered.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: acknowledged messages missing"
        );
        let d = b.collect_delivers(1).remove(0);
        delivered.insert(d.client_message_id);
        b.ack(d.sequence);
    }
    drop(b);
    // No session or socket is left behind, and no completion was stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let (_, metrics) = common::admin_get(server.admin, "/metrics");
        let sessions = common::metric_sum(&metrics, "switchboard_connections", "");
        let stale = common::metric_sum(
            &metrics,
            "switchboard_socket_ring_stale_completions_total",
            "",
        );
        assert_eq!(stale, 0.0, "seed {seed}");
        if sessions == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {sessions} sessions left"
        );
    }
}

/// A recipient that stops reading, with far more pending than its output
/// bound and a delivery window wider than that: the server's memory grows
/// by about the output bound (one frame past it, then what the driver
/// queues), not by the window. The pump stops at the bound frame by frame
/// and starts again each time the queue has gone to the socket, so once
/// the client reads again it gets the whole window without acknowledging
/// anything first (a client may wait for its window to fill before it
/// acknowledges).
#[test]
fn a_stalled_recipient_holds_the_output_bound_and_then_gets_the_whole_window() {
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 128;
    let (server, bob) = common::backlog_of_large_messages(dir.path(), N);
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = server.rss_bytes();
    // 7.7 MB due; the connection reads nothing for a while.
    let (mut b, _) = RawClient::login(server.addr, &bob);
    std::thread::sleep(Duration::from_millis(500));
    let grown = server.rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 2 << 20,
        "server grew by {grown} bytes for one stalled recipient"
    );
    // Reading now, it gets the whole window, in order, before any Ack.
    let delivered = b.collect_delivers(N as usize);
    let sequences: Vec<u64> = delivered.iter().map(|d| d.sequence).collect();
    assert_eq!(sequences, (1..=N).collect::<Vec<_>>());
    assert!(delivered
        .iter()
        .all(|d| d.payload.len() == common::LARGE_PAYLOAD));
    b.ack(N);
    b.send(&Frame::Ping(pb::Ping { nonce: 3 }));
    match b.recv() {
        Some(Frame::Pong(p)) => assert_eq!(p.nonce, 3),
        other => panic!("expected only a Pong, got {other:?}"),
    }
}
