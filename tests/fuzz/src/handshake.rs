//! The `handshake` target: arbitrary reads, half-closes and lookup ends
//! fed to the sans-IO handshake (`switchboard::session::handshake`), driven
//! as the socket loop drives it: one `step` after each event.
//!
//! Input layout:
//!
//! ```text
//! offset size field
//!      0    1 registration policy: 0 open, 1 closed, 2 or 3 token (the one
//!             accepted token is "tok", the golden Register's)
//!      1    4 frame_bytes_max, u32 big-endian
//!      5    - events, each an op byte (taken mod 4) and its operands:
//!             0 read: a length byte n, then n bytes (fewer at the end)
//!             1 the account lookup asked for by a Register ended
//!               (ignored unless one is running, as the loop never sends it)
//!             2 the peer half-closed
//!             3 nothing (a spurious wake-up)
//! ```
//!
//! Invariants checked, from the module's doc and `docs/protocol.md` §3–4.1:
//! - nothing panics;
//! - each decision is the one the protocol prescribes for the next frame of
//!   the bytes read so far, decoded on their own with `proto::next_frame`:
//!   a decode error is refused with its code; no whole frame is a wait, or
//!   the end once the peer half-closed; a frame other than Register or
//!   Hello is NOT_AUTHENTICATED; a second Register UNEXPECTED_FRAME;
//!   version 0 UNSUPPORTED_VERSION; the registration policy's refusals;
//!   else a lookup, with the negotiated version min(offered, ours), and the
//!   Hello's device and secret;
//! - nothing is decided while a lookup runs, and at most one Register
//!   lookup is asked for per connection;
//! - every refusal is fatal, names a documented handshake code and no
//!   retry time, and ends the handshake;
//! - after a Hello, `take_hello` gives its device and version, and the
//!   bytes read after it are handed to the session unchanged.

use std::net::{IpAddr, Ipv4Addr};

use bytes::BytesMut;
use switchboard::config::RegistrationPolicy;
use switchboard::proto::{next_frame, ErrorCode, Frame, PROTOCOL_VERSION};
use switchboard::session::handshake::{Handshake, RegistrationRules, Step};

/// The one token a `token` policy accepts in this target.
pub const TOKEN: &str = "tok";

/// The codes a handshake may refuse with, as the machine declares them.
use switchboard::session::handshake::REFUSAL_CODES as HANDSHAKE_CODES;

/// One event of an input.
#[derive(Clone, Debug)]
pub enum Event<'a> {
    Read(&'a [u8]),
    LookupDone,
    InputClosed,
    Wake,
}

/// Builds an input, for the seed generator.
pub fn input(policy: u8, frame_bytes_max: u32, events: &[Event<'_>]) -> Vec<u8> {
    let mut out = vec![policy];
    out.extend_from_slice(&frame_bytes_max.to_be_bytes());
    for event in events {
        match event {
            Event::Read(bytes) => {
                for chunk in bytes.chunks(u8::MAX as usize) {
                    out.push(0);
                    out.push(chunk.len() as u8);
                    out.extend_from_slice(chunk);
                }
            }
            Event::LookupDone => out.push(1),
            Event::InputClosed => out.push(2),
            Event::Wake => out.push(3),
        }
    }
    out
}

/// What the protocol prescribes for the next frame, as far as a test can
/// tell from the outside.
fn expected(
    reference: &mut BytesMut,
    frame_bytes_max: u32,
    input_closed: bool,
    registered: bool,
    policy: RegistrationPolicy,
) -> Expected {
    let frame = match next_frame(reference, frame_bytes_max) {
        Err(error) => return Expected::Refuse(error.code()),
        Ok(None) if input_closed => return Expected::Done,
        Ok(None) => return Expected::Wait,
        Ok(Some(frame)) => frame,
    };
    match frame {
        Frame::Register(register) => {
            if registered {
                Expected::Refuse(ErrorCode::UnexpectedFrame)
            } else if register.protocol_version == 0 {
                Expected::Refuse(ErrorCode::UnsupportedVersion)
            } else {
                match policy {
                    RegistrationPolicy::Open => {
                        Expected::Register(register.protocol_version.min(PROTOCOL_VERSION))
                    }
                    RegistrationPolicy::Closed => Expected::Refuse(ErrorCode::RegistrationClosed),
                    RegistrationPolicy::Token if register.registration_token == TOKEN => {
                        Expected::Register(register.protocol_version.min(PROTOCOL_VERSION))
                    }
                    RegistrationPolicy::Token => Expected::Refuse(ErrorCode::BadRegistrationToken),
                }
            }
        }
        Frame::Hello(hello) if hello.protocol_version == 0 => {
            Expected::Refuse(ErrorCode::UnsupportedVersion)
        }
        Frame::Hello(hello) => Expected::Hello(hello),
        _ => Expected::Refuse(ErrorCode::NotAuthenticated),
    }
}

#[derive(Debug)]
enum Expected {
    Wait,
    Done,
    Refuse(ErrorCode),
    Register(u32),
    Hello(switchboard::proto::pb::Hello),
}

/// Runs one fuzz input; panics when an invariant does not hold.
pub fn check(data: &[u8]) {
    let Some((&policy, rest)) = data.split_first() else {
        return;
    };
    let Some(limit) = rest.get(..4) else {
        return;
    };
    let frame_bytes_max = u32::from_be_bytes(limit.try_into().expect("4 bytes"));
    let mut events = &rest[4..];
    let policy = match policy % 4 {
        0 => RegistrationPolicy::Open,
        1 => RegistrationPolicy::Closed,
        _ => RegistrationPolicy::Token,
    };
    let tokens = [TOKEN.to_string()];
    let rules = RegistrationRules {
        policy,
        tokens: &tokens,
    };
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    let mut hs = Handshake::new(peer, 0);
    // The same bytes, decoded on their own.
    let mut reference = BytesMut::new();
    let mut input_closed = false;
    let mut registered = false;
    let mut register_running = false;
    let mut hello_running = false;
    while let Some((&op, rest)) = events.split_first() {
        events = rest;
        match op % 4 {
            0 => {
                let Some((&length, rest)) = events.split_first() else {
                    return;
                };
                let (bytes, rest) = rest.split_at((length as usize).min(rest.len()));
                events = rest;
                hs.input(bytes);
                reference.extend_from_slice(bytes);
            }
            1 => {
                if !register_running {
                    continue;
                }
                register_running = false;
                hs.lookup_done();
            }
            2 => {
                input_closed = true;
                hs.input_closed();
                assert!(hs.is_input_closed());
            }
            _ => {}
        }

        let step = hs.step(rules, frame_bytes_max);
        if register_running || hello_running {
            assert_eq!(step, Step::Wait, "decided while a lookup runs");
            continue;
        }
        let want = expected(
            &mut reference,
            frame_bytes_max,
            input_closed,
            registered,
            policy,
        );
        match (step, want) {
            (Step::Wait, Expected::Wait) => {}
            (Step::Done, Expected::Done) => return,
            (Step::Refuse((code, message, retry_after_ms)), Expected::Refuse(want)) => {
                assert_eq!(code, want, "refused with the wrong code: {message}");
                assert!(HANDSHAKE_CODES.contains(&code), "{code:?} undocumented");
                assert!(!message.is_empty());
                assert_eq!(retry_after_ms, 0, "a handshake refusal has no retry time");
                return;
            }
            (Step::Register { version }, Expected::Register(want)) => {
                assert!(!registered, "a second Register lookup");
                assert_eq!(version, want, "negotiated version");
                registered = true;
                register_running = true;
            }
            (
                Step::Hello {
                    peer: asked_for,
                    device,
                    secret,
                },
                Expected::Hello(hello),
            ) => {
                assert_eq!(asked_for, peer);
                assert_eq!(
                    (device.user.0, device.device.0),
                    (hello.user_id, hello.device_id)
                );
                assert_eq!(secret, hello.secret);
                let version = hello.protocol_version.min(PROTOCOL_VERSION);
                hello_running = true;
                // The verdict: the loop takes the Hello back, then hands
                // what was read after it to the session.
                assert_eq!(hs.take_hello(), Some((device, version)));
                assert_eq!(hs.take_hello(), None, "one verdict per Hello");
                assert_eq!(hs.step(rules, frame_bytes_max), Step::Wait);
                break;
            }
            (step, want) => panic!("step {step:?}, protocol says {want:?}"),
        }
    }
    if hello_running {
        // The rest of the events arrive in the session's input.
        while let Some((&op, rest)) = events.split_first() {
            events = rest;
            if op % 4 == 0 {
                let Some((&length, rest)) = events.split_first() else {
                    break;
                };
                let (bytes, rest) = rest.split_at((length as usize).min(rest.len()));
                events = rest;
                hs.input(bytes);
                reference.extend_from_slice(bytes);
            }
        }
        assert_eq!(
            &hs.into_input()[..],
            &reference[..],
            "bytes after the Hello changed"
        );
    }
}
