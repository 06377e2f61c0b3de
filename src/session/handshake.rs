//! A connection's handshake as a state machine that does no I/O: bytes in,
//! one decision out at a time.
//!
//! The socket loop (`shard::io`) feeds it what a handshaking socket reads and
//! carries out each [`Step`]: an account lookup (Register, or a Hello
//! checked on the home shard of the client's address), a refusal, or the
//! close after a half-close. While a lookup runs the machine is busy and
//! decides nothing more; [`Handshake::lookup_done`] lets it go on. It reads
//! no clock and calls no runtime, so tests and the fuzz target drive it with
//! arbitrary input.
//!
//! Invariants: at most one Register per connection; a lookup is asked for
//! only when none is running; every refusal names a documented error code
//! (docs/protocol.md §3) and ends the handshake.

use std::net::IpAddr;

use bytes::{Bytes, BytesMut};

use super::noise::{NoiseLogin, NoiseStep};
use crate::config::RegistrationPolicy;
use crate::ids::{DeviceId, InboxKey, UserId};
use crate::noise::{NoiseError, ServerKeys};
use crate::proto::{self, pb, ErrorCode, Frame};
use crate::session::negotiate_version;

/// A refusal: the error code, a message for the client's logs, and the
/// `retry_after_ms` to send (0 for none).
pub type Refusal = (ErrorCode, &'static str, u32);

/// Who may register, as the handshake needs to know it.
#[derive(Clone, Copy, Debug)]
pub struct RegistrationRules<'a> {
    pub policy: RegistrationPolicy,
    pub tokens: &'a [String],
}

impl RegistrationRules<'_> {
    /// Whether `register` may create an account; compares tokens in
    /// constant time.
    pub fn check(&self, register: &pb::Register) -> Result<(), Refusal> {
        match self.policy {
            RegistrationPolicy::Open => Ok(()),
            RegistrationPolicy::Closed => {
                Err((ErrorCode::RegistrationClosed, "registration is closed", 0))
            }
            RegistrationPolicy::Token => {
                let offered = register.registration_token.as_bytes();
                let known = self
                    .tokens
                    .iter()
                    .any(|t| subtle::ConstantTimeEq::ct_eq(t.as_bytes(), offered).into());
                if known {
                    Ok(())
                } else {
                    Err((
                        ErrorCode::BadRegistrationToken,
                        "registration token not accepted",
                        0,
                    ))
                }
            }
        }
    }
}

/// Every code a handshake may refuse with (docs/protocol.md §3, §4.1); the
/// glue adds LINK_CODE_INVALID, TOO_MANY_DEVICES, AUTH_FAILED, RATE_LIMITED
/// and INTERNAL from the lookups it runs.
pub const REFUSAL_CODES: [ErrorCode; 8] = [
    ErrorCode::MalformedFrame,
    ErrorCode::FrameTooLarge,
    ErrorCode::UnknownFrameType,
    ErrorCode::NotAuthenticated,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnexpectedFrame,
    ErrorCode::RegistrationClosed,
    ErrorCode::BadRegistrationToken,
];

/// What the handshake needs done next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing until more input arrives (or a lookup ends).
    Wait,
    /// Create an account and answer Registered in `version`; then call
    /// `lookup_done`. `noise_key`: the Noise client's static key, to record
    /// as the device's login.
    Register {
        version: u32,
        noise_key: Option<[u8; 32]>,
    },
    /// Redeem a link code for a companion of its account (the home shard of
    /// the client's address decides, counting failures like Hello's) and
    /// answer Registered in the version `take_link` gives; then call
    /// `lookup_done`.
    Link {
        peer: IpAddr,
        code: String,
        name: String,
        noise_key: Option<[u8; 32]>,
    },
    /// Check this credential (the verdict goes to `hello_verdict`-style
    /// glue, which takes the pending Hello back with `take_hello`).
    /// `noise_key`: the Noise client's static key (checked against the
    /// device's, or bound to it when `secret` is given).
    Hello {
        peer: IpAddr,
        device: InboxKey,
        secret: Bytes,
        noise_key: Option<[u8; 32]>,
    },
    /// The peer half-closed and every frame it sent is handled: close.
    Done,
    /// Answer with this Error (fatal) and close.
    Refuse(Refusal),
}

/// One connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    pub peer: IpAddr,
    /// When the socket was accepted (`net::conn::connected_now`).
    pub connected_at: u32,
    /// One Register or Link per connection: both write to the metadata
    /// database, so a connection may not become a registration loop.
    registered: bool,
    /// An account lookup is running: nothing more is decided until it ends.
    busy: bool,
    /// The peer half-closed: once its frames are handled, the socket closes.
    input_closed: bool,
    /// Frames received and not yet handled.
    input: BytesMut,
    /// The Hello being checked: its device and the negotiated version.
    hello: Option<(InboxKey, u32)>,
    /// The Link being redeemed: its negotiated version.
    link: Option<u32>,
    /// Plaintext, a Noise handshake, or sealed.
    channel: Channel,
}

/// How a handshaking connection speaks.
#[derive(Debug)]
enum Channel {
    /// Nothing from a Noise client (yet): plaintext frames.
    Plain,
    /// A Noise handshake is under way.
    Noise(Box<NoiseLogin>),
    /// The Noise handshake is done; frames are sealed. The client's static
    /// key is its login.
    Sealed { client_key: [u8; 32] },
}

impl Handshake {
    pub fn new(peer: IpAddr, connected_at: u32) -> Handshake {
        Handshake {
            peer,
            connected_at,
            registered: false,
            busy: false,
            input_closed: false,
            input: BytesMut::new(),
            hello: None,
            link: None,
            channel: Channel::Plain,
        }
    }

    /// Bytes a Noise client sent during its handshake. On `Finished` the
    /// frames that follow are sealed and the client's key goes with the
    /// login. Errors are final (close without an answer).
    pub fn noise_input(
        &mut self,
        bytes: &[u8],
        keys: &ServerKeys,
    ) -> Result<NoiseStep, NoiseError> {
        let login = match &mut self.channel {
            Channel::Noise(login) => login,
            Channel::Plain => {
                self.channel = Channel::Noise(Box::default());
                let Channel::Noise(login) = &mut self.channel else {
                    unreachable!("just set");
                };
                login
            }
            Channel::Sealed { .. } => return Err(NoiseError::UnexpectedMessage),
        };
        let step = login.input(bytes, keys)?;
        if let NoiseStep::Finished { client_key, .. } = &step {
            self.channel = Channel::Sealed {
                client_key: *client_key,
            };
        }
        Ok(step)
    }

    /// Whether the connection has said nothing of Noise: its frames are
    /// plaintext.
    pub fn is_plaintext(&self) -> bool {
        matches!(self.channel, Channel::Plain)
    }

    /// Whether the Noise handshake is done (later bytes are sealed frames).
    pub fn is_sealed(&self) -> bool {
        matches!(self.channel, Channel::Sealed { .. })
    }

    fn noise_key(&self) -> Option<[u8; 32]> {
        match self.channel {
            Channel::Sealed { client_key } => Some(client_key),
            _ => None,
        }
    }

    /// Bytes read from the socket (whole frames or a refused header).
    pub fn input(&mut self, bytes: &[u8]) {
        if self.input.is_empty() {
            self.input = BytesMut::from(bytes);
        } else {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The peer sent its FIN.
    pub fn input_closed(&mut self) {
        self.input_closed = true;
    }

    /// Whether the peer half-closed.
    pub fn is_input_closed(&self) -> bool {
        self.input_closed
    }

    /// A lookup asked for by `Register` ended (Registered was sent).
    pub fn lookup_done(&mut self) {
        self.busy = false;
    }

    /// The Hello being checked, taken when its verdict arrives.
    pub fn take_hello(&mut self) -> Option<(InboxKey, u32)> {
        self.hello.take()
    }

    /// The Link being redeemed (its version), taken when its outcome
    /// arrives.
    pub fn take_link(&mut self) -> Option<u32> {
        self.link.take()
    }

    /// The frames received after the Hello (they belong to the session).
    pub fn into_input(self) -> BytesMut {
        self.input
    }

    /// Decides on the next buffered frame.
    pub fn step(&mut self, rules: RegistrationRules<'_>, frame_bytes_max: u32) -> Step {
        match self.next(rules, frame_bytes_max) {
            Ok(step) => step,
            Err(refusal) => Step::Refuse(refusal),
        }
    }

    fn next(
        &mut self,
        rules: RegistrationRules<'_>,
        frame_bytes_max: u32,
    ) -> Result<Step, Refusal> {
        if self.busy {
            return Ok(Step::Wait);
        }
        let frame = proto::next_frame(&mut self.input, frame_bytes_max)
            .map_err(|e| (e.code(), "bad frame during handshake", 0))?;
        if self.input.is_empty() && self.input.capacity() > 0 {
            // A connect storm's buffers are not kept once they are read.
            self.input = BytesMut::new();
        }
        match frame {
            None if self.input_closed => Ok(Step::Done),
            None => Ok(Step::Wait),
            Some(Frame::Register(register)) => {
                if self.registered {
                    return Err((
                        ErrorCode::UnexpectedFrame,
                        "one Register or Link per connection",
                        0,
                    ));
                }
                self.registered = true;
                let version = negotiate_version(register.protocol_version)
                    .map_err(|c| (c, "unsupported protocol version", 0))?;
                rules.check(&register)?;
                self.busy = true;
                Ok(Step::Register {
                    version,
                    noise_key: self.noise_key(),
                })
            }
            Some(Frame::Link(link)) => {
                if self.registered {
                    return Err((
                        ErrorCode::UnexpectedFrame,
                        "one Register or Link per connection",
                        0,
                    ));
                }
                self.registered = true;
                let version = negotiate_version(link.protocol_version)
                    .map_err(|c| (c, "unsupported protocol version", 0))?;
                self.busy = true;
                self.link = Some(version);
                Ok(Step::Link {
                    peer: self.peer,
                    code: link.code,
                    name: link.device_name,
                    noise_key: self.noise_key(),
                })
            }
            Some(Frame::Hello(hello)) => {
                let version = negotiate_version(hello.protocol_version)
                    .map_err(|c| (c, "unsupported protocol version", 0))?;
                let device = InboxKey {
                    user: UserId(hello.user_id),
                    device: DeviceId(hello.device_id),
                };
                self.busy = true;
                self.hello = Some((device, version));
                Ok(Step::Hello {
                    peer: self.peer,
                    device,
                    secret: hello.secret,
                    noise_key: self.noise_key(),
                })
            }
            Some(_) => Err((
                ErrorCode::NotAuthenticated,
                "the first frame must be Hello, Register or Link",
                0,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u32 = 4_096;

    fn open() -> RegistrationRules<'static> {
        RegistrationRules {
            policy: RegistrationPolicy::Open,
            tokens: &[],
        }
    }

    fn handshake() -> Handshake {
        Handshake::new("127.0.0.1".parse().unwrap(), 0)
    }

    fn register() -> Frame {
        Frame::Register(pb::Register {
            protocol_version: 1,
            registration_token: String::new(),
        })
    }

    fn hello() -> Frame {
        Frame::Hello(pb::Hello {
            protocol_version: 3,
            user_id: 7,
            device_id: 1,
            secret: Bytes::from_static(&[1; 32]),
        })
    }

    #[test]
    fn register_then_hello_then_the_pipelined_rest_stays_for_the_session() {
        let mut hs = handshake();
        let mut bytes = register().to_bytes().to_vec();
        bytes.extend_from_slice(&hello().to_bytes());
        let ping = Frame::Ping(pb::Ping { nonce: 5 }).to_bytes();
        bytes.extend_from_slice(&ping);
        hs.input(&bytes);
        assert_eq!(
            hs.step(open(), MAX),
            Step::Register {
                version: 1,
                noise_key: None
            }
        );
        assert_eq!(hs.step(open(), MAX), Step::Wait, "busy with the lookup");
        hs.lookup_done();
        let Step::Hello { device, .. } = hs.step(open(), MAX) else {
            panic!("expected the Hello");
        };
        assert_eq!(device.user, UserId(7));
        assert_eq!(hs.take_hello(), Some((device, 1)));
        assert_eq!(&hs.into_input()[..], &ping[..]);
    }

    #[test]
    fn refuses_a_second_register_and_frames_before_authentication() {
        let mut hs = handshake();
        hs.input(&register().to_bytes());
        hs.input(&register().to_bytes());
        assert!(matches!(hs.step(open(), MAX), Step::Register { .. }));
        hs.lookup_done();
        assert!(matches!(
            hs.step(open(), MAX),
            Step::Refuse((ErrorCode::UnexpectedFrame, _, 0))
        ));
        let mut hs = handshake();
        hs.input(&Frame::Ping(pb::Ping { nonce: 1 }).to_bytes());
        assert!(matches!(
            hs.step(open(), MAX),
            Step::Refuse((ErrorCode::NotAuthenticated, _, 0))
        ));
    }

    #[test]
    fn registration_rules_refuse_with_their_codes() {
        let tokens = ["sesame".to_string()];
        let token = RegistrationRules {
            policy: RegistrationPolicy::Token,
            tokens: &tokens,
        };
        let mut hs = handshake();
        hs.input(&register().to_bytes());
        assert!(matches!(
            hs.step(token, MAX),
            Step::Refuse((ErrorCode::BadRegistrationToken, _, 0))
        ));
        let closed = RegistrationRules {
            policy: RegistrationPolicy::Closed,
            tokens: &[],
        };
        let mut hs = handshake();
        hs.input(&register().to_bytes());
        assert!(matches!(
            hs.step(closed, MAX),
            Step::Refuse((ErrorCode::RegistrationClosed, _, 0))
        ));
    }

    #[test]
    fn link_is_a_first_frame_once_and_then_hello_follows() {
        let mut hs = handshake();
        let link = Frame::Link(pb::Link {
            protocol_version: 1,
            code: "00ff".into(),
            device_name: "laptop".into(),
        });
        hs.input(&link.to_bytes());
        hs.input(&register().to_bytes());
        let Step::Link { code, name, .. } = hs.step(open(), MAX) else {
            panic!("expected the Link");
        };
        assert_eq!((code.as_str(), name.as_str()), ("00ff", "laptop"));
        assert_eq!(hs.step(open(), MAX), Step::Wait, "busy with the lookup");
        hs.lookup_done();
        assert!(matches!(
            hs.step(open(), MAX),
            Step::Refuse((ErrorCode::UnexpectedFrame, _, 0))
        ));
    }

    #[test]
    fn a_half_close_after_the_last_frame_is_done() {
        let mut hs = handshake();
        hs.input_closed();
        assert_eq!(hs.step(open(), MAX), Step::Done);
    }

    proptest! {
        /// Any bytes in any chunks: no panic, documented codes only, one
        /// Register at most, nothing decided while a lookup runs, and
        /// nothing after a refusal is acted on (the glue closes).
        #[test]
        fn any_input_gets_documented_steps_only(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
            done_after in proptest::collection::vec(any::<bool>(), 16),
            closed in any::<bool>(),
        ) {
            let mut hs = handshake();
            let mut registers = 0;
            for (i, chunk) in chunks.iter().enumerate() {
                hs.input(chunk);
                if closed && i + 1 == chunks.len() {
                    hs.input_closed();
                }
                match hs.step(open(), MAX) {
                    Step::Refuse((code, _, _)) => {
                        prop_assert!(REFUSAL_CODES.contains(&code), "{code:?}");
                        break;
                    }
                    Step::Register { version, .. } => {
                        prop_assert_eq!(version, crate::proto::PROTOCOL_VERSION);
                        registers += 1;
                        prop_assert!(registers <= 1);
                        prop_assert_eq!(hs.step(open(), MAX), Step::Wait);
                        if done_after[i] {
                            hs.lookup_done();
                        }
                    }
                    Step::Link { .. } => {
                        prop_assert_eq!(hs.take_link(), Some(crate::proto::PROTOCOL_VERSION));
                        registers += 1;
                        prop_assert!(registers <= 1);
                        prop_assert_eq!(hs.step(open(), MAX), Step::Wait);
                        if done_after[i] {
                            hs.lookup_done();
                        }
                    }
                    Step::Hello { .. } => {
                        prop_assert!(hs.take_hello().is_some());
                        prop_assert_eq!(hs.step(open(), MAX), Step::Wait);
                        break;
                    }
                    Step::Done | Step::Wait => {}
                }
            }
        }
    }
}
