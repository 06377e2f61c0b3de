//! Crash testing the real server: several senders write to offline
//! recipients while the server is killed with SIGKILL at random moments and
//! restarted; senders retry what was not acknowledged with the same client
//! message ids. At the end every acknowledged message must be delivered, in
//! order, exactly once after dedupe by sequence, never stored twice, and
//! nothing may appear that no client sent. One recipient account has a
//! companion device: Sends to it carry one payload per device, and each
//! device must get every acknowledged message with its own payload.
//!
//! Rounds: `SWITCHBOARD_CRASH_ROUNDS` (default 3; the full run uses 20).
//! The seed is printed; `SWITCHBOARD_CRASH_SEED` replays a run.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Account, RawClient, Server};
use rand::{Rng, SeedableRng};
use switchboard::config::Durability;
use switchboard::proto::{pb, Frame};

const SENDERS: usize = 3;
const RECIPIENTS: usize = 2;

fn payload(sender: u64, id: u64, device: u32) -> Vec<u8> {
    format!(
        "from {sender} id {id} for device {device} {}",
        "x".repeat((id % 50) as usize)
    )
    .into_bytes()
}

/// The Send of message `id` to `to`: one payload per device of an account
/// with a companion (`linked`), one payload otherwise.
fn send_frame(sender: u64, id: u64, to: u64, linked: u64) -> Frame {
    let (payload, device_payloads) = if to == linked {
        let parts = [1, 2]
            .iter()
            .map(|&device| pb::DevicePayload {
                device_id: device,
                payload: payload(sender, id, device).into(),
            })
            .collect();
        (Default::default(), parts)
    } else {
        (payload(sender, id, 1).into(), vec![])
    };
    Frame::Send(pb::Send {
        client_message_id: id,
        recipient_user_id: to,
        payload,
        device_payloads,
        ..Default::default()
    })
}

/// Links a companion (device 2) to `primary`'s account.
fn link_companion(addr: SocketAddr, primary: &Account) -> Account {
    let (mut c, _) = RawClient::login(addr, primary);
    c.send(&Frame::RequestLinkCode(pb::RequestLinkCode {}));
    let Some(Frame::LinkCode(code)) = c.recv() else {
        panic!("expected LinkCode")
    };
    let mut new = RawClient::connect(addr);
    new.send(&Frame::Link(pb::Link {
        protocol_version: switchboard::proto::PROTOCOL_VERSION,
        code: code.code,
        device_name: "companion".into(),
    }));
    match new.recv() {
        Some(Frame::Registered(r)) => Account {
            user: r.user_id,
            device: r.device_id,
            secret: r.secret,
        },
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// One sender's view across rounds.
#[derive(Default)]
struct SenderState {
    /// id → recipient, for every id ever sent.
    sent: BTreeMap<u64, u64>,
    acked: BTreeSet<u64>,
    next_id: u64,
}

/// Sends (retries first) until the connection dies or the budget is spent.
fn sender_round(
    addr: SocketAddr,
    account: &Account,
    recipients: &[u64],
    linked: u64,
    mut state: SenderState,
    budget: u64,
) -> SenderState {
    let mut c = match std::panic::catch_unwind(|| RawClient::login(addr, account)) {
        Ok((c, _)) => c,
        Err(_) => return state,
    };
    let mut queue: Vec<(u64, u64)> = state
        .sent
        .iter()
        .filter(|(id, _)| !state.acked.contains(id))
        .map(|(&id, &to)| (id, to))
        .collect();
    for _ in 0..budget {
        state.next_id += 1;
        let to = recipients[(state.next_id as usize) % recipients.len()];
        queue.push((state.next_id, to));
    }
    for chunk in queue.chunks(8) {
        for &(id, to) in chunk {
            state.sent.insert(id, to);
            let frame = send_frame(account.user, id, to, linked);
            if c.send_bytes(&frame.to_bytes()).is_err() {
                return state;
            }
        }
        let mut got = 0;
        while got < chunk.len() {
            let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.recv_timeout(Duration::from_secs(10))
            }));
            match frame {
                Ok(Some(Frame::ServerAck(a))) => {
                    state.acked.insert(a.client_message_id);
                    got += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return state,
            }
        }
    }
    state
}

fn crash_rounds(durability: Durability) {
    let rounds: u32 = std::env::var("SWITCHBOARD_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("SWITCHBOARD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("crash test: durability {durability:?}, {rounds} rounds, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |c| c.store.durability = durability);
    let senders: Vec<Account> = (0..SENDERS)
        .map(|_| RawClient::register(server.addr))
        .collect();
    let recipients: Vec<Account> = (0..RECIPIENTS)
        .map(|_| RawClient::register(server.addr))
        .collect();
    let recipient_ids: Vec<u64> = recipients.iter().map(|r| r.user).collect();
    let linked = recipients[RECIPIENTS - 1].user;
    let companion = link_companion(server.addr, &recipients[RECIPIENTS - 1]);
    let mut states: Vec<SenderState> = (0..SENDERS).map(|_| SenderState::default()).collect();

    for round in 0..rounds {
        if round > 0 {
            server.launch();
        }
        let addr = server.addr;
        let handles: Vec<_> = senders
            .iter()
            .cloned()
            .zip(std::mem::take(&mut states))
            .map(|(account, state)| {
                let recipients = recipient_ids.clone();
                std::thread::spawn(move || {
                    sender_round(addr, &account, &recipients, linked, state, 50_000)
                })
            })
            .collect();
        let kill_after = Duration::from_millis(rng.gen_range(50..600));
        std::thread::sleep(kill_after);
        server.kill9();
        states = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let acked: usize = states.iter().map(|s| s.acked.len()).sum();
        println!("round {round}: killed after {kill_after:?}, {acked} acknowledged so far");
    }
    // Last start: retry what is still unacknowledged, then drain.
    server.launch();
    let addr = server.addr;
    for (account, state) in senders.iter().zip(states.iter_mut()) {
        *state = sender_round(
            addr,
            account,
            &recipient_ids,
            linked,
            std::mem::take(state),
            0,
        );
        assert_eq!(
            state.acked.len(),
            state.sent.len(),
            "every retried message is acknowledged after the last restart"
        );
    }

    let sender_of: HashMap<u64, usize> = senders
        .iter()
        .enumerate()
        .map(|(i, a)| (a.user, i))
        .collect();
    let mut devices: Vec<&Account> = recipients.iter().collect();
    devices.push(&companion);
    for recipient in devices {
        let expected: BTreeSet<(u64, u64)> = senders
            .iter()
            .zip(&states)
            .flat_map(|(s, st)| {
                st.sent
                    .iter()
                    .filter(|(_, &to)| to == recipient.user)
                    .map(move |(&id, _)| (s.user, id))
            })
            .collect();
        let (mut c, _) = RawClient::login(addr, recipient);
        let mut seen: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut last_seq = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.len() < expected.len() {
            assert!(Instant::now() < deadline, "drain took too long");
            let d = c.collect_delivers(1).remove(0);
            if d.sequence <= last_seq {
                continue; // redelivery: client-side dedupe by sequence
            }
            assert!(d.sequence > last_seq, "in order per inbox");
            last_seq = d.sequence;
            let key = (d.sender_user_id, d.client_message_id);
            assert!(
                sender_of.contains_key(&d.sender_user_id),
                "unknown sender {key:?}"
            );
            assert!(
                expected.contains(&key),
                "delivered a message nobody sent: {key:?}"
            );
            assert_eq!(
                &d.payload[..],
                &payload(key.0, key.1, recipient.device)[..],
                "payload intact, the device's own"
            );
            if let Some(previous) = seen.insert(key, d.sequence) {
                panic!(
                    "{key:?} stored twice: sequences {previous} and {}",
                    d.sequence
                );
            }
            c.ack(d.sequence);
        }
        // Every acknowledged message (here: every message, after the retries).
        for (s, st) in senders.iter().zip(&states) {
            for id in &st.acked {
                if st.sent[id] == recipient.user {
                    assert!(
                        seen.contains_key(&(s.user, *id)),
                        "acked ({}, {id}) lost for device {}/{}",
                        s.user,
                        recipient.user,
                        recipient.device
                    );
                }
            }
        }
    }
}

#[test]
fn sigkill_rounds_lose_nothing_acknowledged_fsync() {
    crash_rounds(Durability::Fsync);
}

#[test]
fn sigkill_rounds_lose_nothing_acknowledged_os() {
    crash_rounds(Durability::Os);
}
