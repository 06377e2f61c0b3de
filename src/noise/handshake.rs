//! Both sides of the handshake, as state machines over message bytes: the
//! caller splits messages off the stream ([`super::wire`]), feeds them in,
//! and writes out what comes back. Nothing here does I/O or reads a clock.
//!
//! Message sizes (without the `u16` prefix; `p` is the payload):
//!
//! | message          | tokens             | bytes   | payload              |
//! |------------------|--------------------|---------|----------------------|
//! | XX 1, C→S        | `e`                | 32      | none (must be empty) |
//! | XX 2, S→C        | `e, ee, s, es`     | 96 + p  | server, ≤ 4 KiB      |
//! | XX 3, C→S        | `s, se`            | 64 + p  | client, ≤ 4 KiB      |
//! | IK 1, C→S        | `e, es, s, ss`     | 96 + p  | client, ≤ 4 KiB      |
//! | IK 2, S→C        | `e, ee, se`        | 48 + p  | server, ≤ 4 KiB      |
//!
//! A length is checked against the message's size before anything is
//! allocated for its payload. Any error ends the handshake: the state machine
//! refuses every later message.
//!
//! Security notes for the caller:
//! - The client payload is handed out only once the handshake has
//!   authenticated the client's static key ([`Responder::is_finished`]).
//! - IK's first message can be replayed by anyone who recorded it (Noise
//!   §7.7: its payload has no replay protection), and the server cannot tell:
//!   it finishes its side, although the replayer can read nothing and send
//!   nothing. So the login in an IK payload must be safe to repeat (a Hello;
//!   not a Register or Link), or the server must wait for the client's first
//!   transport message, which only the real client can produce, before it
//!   acts on it. XX has no such replay: its client payload is bound to the
//!   server's fresh ephemeral key.
//! - An IK to a key the server does not hold cannot be answered (the server
//!   cannot decrypt the client's identity): the server closes, and the client
//!   should start again with XX.

use snow::params::NoiseParams;
use snow::HandshakeState;

use super::keys::{is_low_order, KeySlot, ServerKeys, StaticKeypair, KEY_BYTES};
use super::transport::{Transport, TAG_BYTES};
use super::wire::{Pattern, LENGTH_PREFIX_BYTES, MESSAGE_BYTES_MAX};
use super::{NoiseError, CLIENT_PAYLOAD_BYTES_MAX, SERVER_PAYLOAD_BYTES_MAX};

/// Bytes of an X25519 public key in a message (`e`, or `s` in the clear).
const DH_BYTES: usize = KEY_BYTES;
/// Bytes of an encrypted static key (`s` once a key is mixed in).
const SEALED_DH_BYTES: usize = DH_BYTES + TAG_BYTES;
/// Fixed part of each handshake message, without its payload.
const XX_1_BYTES: usize = DH_BYTES;
const XX_2_BYTES: usize = DH_BYTES + SEALED_DH_BYTES + TAG_BYTES;
const XX_3_BYTES: usize = SEALED_DH_BYTES + TAG_BYTES;
const IK_1_BYTES: usize = DH_BYTES + SEALED_DH_BYTES + TAG_BYTES;
const IK_2_BYTES: usize = DH_BYTES + TAG_BYTES;
const _: () = assert!(IK_1_BYTES + CLIENT_PAYLOAD_BYTES_MAX <= MESSAGE_BYTES_MAX);
const _: () = assert!(XX_2_BYTES + SERVER_PAYLOAD_BYTES_MAX <= MESSAGE_BYTES_MAX);

/// Where a handshake is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waiting for the peer's message number `n` (1-based).
    Await(u8),
    Finished,
    Failed,
}

/// The payload length of a message of `length` bytes whose fixed part is
/// `fixed` bytes, checked against `limit` before anything is allocated.
fn payload_len(length: usize, fixed: usize, limit: usize) -> Result<usize, NoiseError> {
    let payload = length
        .checked_sub(fixed)
        .ok_or(NoiseError::HandshakeTruncated {
            length,
            needed: fixed,
        })?;
    if payload > limit {
        return Err(NoiseError::PayloadTooLarge {
            length: payload,
            limit,
        });
    }
    Ok(payload)
}

/// A snow error, by what it means to the connection.
fn from_snow(error: snow::Error) -> NoiseError {
    match error {
        snow::Error::Decrypt => NoiseError::HandshakeDecrypt,
        snow::Error::Input => NoiseError::Library("input rejected"),
        snow::Error::State(_) => NoiseError::Library("handshake state"),
        snow::Error::Init(_) | snow::Error::Prereq(_) | snow::Error::Pattern(_) => {
            NoiseError::Library("handshake setup")
        }
        snow::Error::Rng => NoiseError::Library("random generator"),
        snow::Error::Dh => NoiseError::Library("Diffie-Hellman"),
        _ => NoiseError::Library("other"),
    }
}

/// A snow handshake state for one side.
fn build(
    pattern: Pattern,
    local: &StaticKeypair,
    remote: Option<&[u8; KEY_BYTES]>,
    ephemeral: Option<&[u8; KEY_BYTES]>,
    initiator: bool,
) -> Result<HandshakeState, NoiseError> {
    let params: NoiseParams = pattern
        .noise_name()
        .parse()
        .map_err(|_| NoiseError::Library("protocol name"))?;
    let prologue = pattern.intro();
    let mut builder = snow::Builder::new(params)
        .local_private_key(local.private())
        .and_then(|b| b.prologue(&prologue))
        .map_err(from_snow)?;
    if let Some(remote) = remote {
        builder = builder.remote_public_key(remote).map_err(from_snow)?;
    }
    if let Some(ephemeral) = ephemeral {
        builder = builder.fixed_ephemeral_key_for_testing_only(ephemeral);
    }
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(from_snow)
}

/// Writes our next handshake message with `payload`, length-prefixed.
fn write(state: &mut HandshakeState, fixed: usize, payload: &[u8]) -> Result<Vec<u8>, NoiseError> {
    let length = fixed + payload.len();
    // snow wants room for a tag after the payload even where the payload
    // goes unencrypted (XX's first message); the slack is cut off below.
    let mut out = vec![0u8; LENGTH_PREFIX_BYTES + length + TAG_BYTES];
    let written = state
        .write_message(payload, &mut out[LENGTH_PREFIX_BYTES..])
        .map_err(from_snow)?;
    assert_eq!(
        written, length,
        "snow wrote the message size the pattern gives"
    );
    out.truncate(LENGTH_PREFIX_BYTES + length);
    let prefix = u16::try_from(length).expect("handshake messages fit a u16 length");
    out[..LENGTH_PREFIX_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// The remote static key once the handshake has authenticated it, refused
/// if it is a low-order point.
fn remote_static(state: &HandshakeState) -> Result<[u8; KEY_BYTES], NoiseError> {
    let key: [u8; KEY_BYTES] = state
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(NoiseError::Library("no remote static key"))?;
    if is_low_order(&key) {
        return Err(NoiseError::WeakStaticKey);
    }
    Ok(key)
}

/// The transport keys of a finished handshake, for the side that
/// `initiator` says.
fn split(state: &mut HandshakeState, step: Step, initiator: bool) -> Result<Transport, NoiseError> {
    if step != Step::Finished {
        return Err(NoiseError::HandshakeUnfinished);
    }
    let (initiator_to_responder, responder_to_initiator) = state.dangerously_get_raw_split();
    Ok(Transport::from_split(
        initiator,
        initiator_to_responder,
        responder_to_initiator,
    ))
}

fn handshake_hash(state: &HandshakeState) -> [u8; 32] {
    state
        .get_handshake_hash()
        .try_into()
        .expect("SHA-256 handshake hash is 32 bytes")
}

/// The server's side of one handshake.
///
/// Created from the intro's pattern; fed each client handshake message;
/// finished when [`Responder::is_finished`] says so, then turned into a
/// [`Transport`].
pub struct Responder {
    pattern: Pattern,
    step: Step,
    state: HandshakeState,
    /// The key to try second for IK (during a rotation's overlap).
    previous: Option<StaticKeypair>,
    /// Sent to an IK client that used `previous`, so it can re-pin.
    current_public: [u8; KEY_BYTES],
    slot: KeySlot,
    fixed_ephemeral: Option<[u8; KEY_BYTES]>,
    client_payload: Vec<u8>,
    remote_static: Option<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("pattern", &self.pattern)
            .field("step", &self.step)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// A responder for `pattern` with the server's keys (XX uses the current
    /// key; IK tries the current, then the previous).
    pub fn new(pattern: Pattern, keys: &ServerKeys) -> Result<Responder, NoiseError> {
        Responder::start(pattern, keys, None)
    }

    /// As [`Responder::new`], with a fixed ephemeral key, for test vectors
    /// only: a fixed ephemeral key destroys forward secrecy.
    #[cfg(test)]
    pub(crate) fn with_fixed_ephemeral_for_tests(
        pattern: Pattern,
        keys: &ServerKeys,
        ephemeral: [u8; KEY_BYTES],
    ) -> Result<Responder, NoiseError> {
        Responder::start(pattern, keys, Some(ephemeral))
    }

    fn start(
        pattern: Pattern,
        keys: &ServerKeys,
        fixed_ephemeral: Option<[u8; KEY_BYTES]>,
    ) -> Result<Responder, NoiseError> {
        let state = build(
            pattern,
            &keys.current,
            None,
            fixed_ephemeral.as_ref(),
            false,
        )?;
        Ok(Responder {
            pattern,
            step: Step::Await(1),
            state,
            previous: match pattern {
                Pattern::Ik => keys.previous.clone(),
                Pattern::Xx => None,
            },
            current_public: *keys.public(),
            slot: KeySlot::Current,
            fixed_ephemeral,
            client_payload: Vec::new(),
            remote_static: None,
        })
    }

    /// The largest message the responder accepts next, for the splitter
    /// ([`super::wire::message_len`]): a longer one is refused from its prefix.
    pub fn message_bytes_max(&self) -> usize {
        match (self.pattern, self.step) {
            (Pattern::Xx, Step::Await(1)) => XX_1_BYTES,
            (Pattern::Xx, Step::Await(_)) => XX_3_BYTES + CLIENT_PAYLOAD_BYTES_MAX,
            (Pattern::Ik, Step::Await(_)) => IK_1_BYTES + CLIENT_PAYLOAD_BYTES_MAX,
            (_, Step::Finished | Step::Failed) => MESSAGE_BYTES_MAX,
        }
    }

    /// Reads the client's next handshake message (without its length
    /// prefix). Returns the reply to send, already length-prefixed, if the
    /// pattern has one at this point. Any error is final.
    pub fn read_message(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, NoiseError> {
        let result = match (self.pattern, self.step) {
            (_, Step::Finished | Step::Failed) => return Err(NoiseError::UnexpectedMessage),
            (Pattern::Xx, Step::Await(1)) => self.read_xx_1(message).map(Some),
            (Pattern::Xx, Step::Await(_)) => self.read_xx_3(message).map(|()| None),
            (Pattern::Ik, Step::Await(_)) => self.read_ik_1(message).map(Some),
        };
        if result.is_err() {
            self.step = Step::Failed;
        }
        result
    }

    fn read_xx_1(&mut self, message: &[u8]) -> Result<Vec<u8>, NoiseError> {
        payload_len(message.len(), XX_1_BYTES, 0)?;
        self.state
            .read_message(message, &mut [])
            .map_err(from_snow)?;
        let reply = write(&mut self.state, XX_2_BYTES, &[])?;
        self.step = Step::Await(3);
        Ok(reply)
    }

    fn read_xx_3(&mut self, message: &[u8]) -> Result<(), NoiseError> {
        let length = payload_len(message.len(), XX_3_BYTES, CLIENT_PAYLOAD_BYTES_MAX)?;
        let mut payload = vec![0u8; length];
        self.state
            .read_message(message, &mut payload)
            .map_err(from_snow)?;
        self.finish(payload)
    }

    fn read_ik_1(&mut self, message: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let length = payload_len(message.len(), IK_1_BYTES, CLIENT_PAYLOAD_BYTES_MAX)?;
        let mut payload = vec![0u8; length];
        match self.state.read_message(message, &mut payload) {
            Ok(_) => {}
            Err(snow::Error::Decrypt) => {
                // snow marks the remote static as known once the client's
                // encrypted `s` has decrypted: the key was right and a later
                // part (the payload) is bad. If `s` did not decrypt, the
                // client used another server key (or sent garbage: the two
                // look alike); try the previous key, if any.
                if self.state.get_remote_static().is_some() {
                    return Err(NoiseError::HandshakeDecrypt);
                }
                let previous = self.previous.take().ok_or(NoiseError::UnknownServerKey)?;
                self.state = build(
                    self.pattern,
                    &previous,
                    None,
                    self.fixed_ephemeral.as_ref(),
                    false,
                )?;
                match self.state.read_message(message, &mut payload) {
                    Ok(_) => self.slot = KeySlot::Previous,
                    Err(snow::Error::Decrypt) if self.state.get_remote_static().is_some() => {
                        return Err(NoiseError::HandshakeDecrypt)
                    }
                    Err(snow::Error::Decrypt) => return Err(NoiseError::UnknownServerKey),
                    Err(other) => return Err(from_snow(other)),
                }
            }
            Err(other) => return Err(from_snow(other)),
        }
        let server_payload: &[u8] = match self.slot {
            KeySlot::Current => &[],
            KeySlot::Previous => &self.current_public,
        };
        let reply = write(&mut self.state, IK_2_BYTES, server_payload)?;
        self.finish(payload)?;
        Ok(reply)
    }

    fn finish(&mut self, payload: Vec<u8>) -> Result<(), NoiseError> {
        assert!(
            self.state.is_handshake_finished(),
            "the pattern is complete"
        );
        self.remote_static = Some(remote_static(&self.state)?);
        self.client_payload = payload;
        self.step = Step::Finished;
        Ok(())
    }

    /// Whether the handshake is complete (the client's static key is
    /// authenticated and its payload available).
    pub fn is_finished(&self) -> bool {
        self.step == Step::Finished
    }

    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// The client's static public key (its login), once finished.
    pub fn remote_static(&self) -> Option<[u8; KEY_BYTES]> {
        self.remote_static
    }

    /// The client's payload (its login frame); empty until finished.
    pub fn client_payload(&self) -> &[u8] {
        &self.client_payload
    }

    /// Which server key the handshake used (always current for XX).
    pub fn key_slot(&self) -> KeySlot {
        self.slot
    }

    /// The Noise handshake hash, once finished: a value both sides share and
    /// no one else knows, for binding a login to this session.
    pub fn handshake_hash(&self) -> Option<[u8; 32]> {
        self.is_finished().then(|| handshake_hash(&self.state))
    }

    /// The transport state for the rest of the connection.
    pub fn into_transport(mut self) -> Result<Transport, NoiseError> {
        split(&mut self.state, self.step, false)
    }
}

/// The client's side of one handshake.
///
/// [`Initiator::xx`] or [`Initiator::ik`] return the bytes to open the
/// connection with (the intro and the first message); each server message
/// is then fed to [`Initiator::read_message`], whose reply (XX's third
/// message) is to be sent; when finished, [`Initiator::into_transport`].
pub struct Initiator {
    pattern: Pattern,
    step: Step,
    state: HandshakeState,
    /// XX: the payload for the third message, kept until it is written.
    client_payload: Vec<u8>,
    server_payload: Vec<u8>,
    server_static: Option<[u8; KEY_BYTES]>,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator")
            .field("pattern", &self.pattern)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// First contact: an XX handshake. `client_payload` (at most
    /// [`CLIENT_PAYLOAD_BYTES_MAX`]) goes in the third message, after the
    /// server's static key is known ([`Initiator::server_static`]) and
    /// authenticated. Returns the initiator and the opening bytes: the intro
    /// then the first message, length-prefixed.
    pub fn xx(
        client: &StaticKeypair,
        client_payload: &[u8],
    ) -> Result<(Initiator, Vec<u8>), NoiseError> {
        Initiator::start(Pattern::Xx, client, None, client_payload, None)
    }

    /// Reconnect: an IK handshake to `server_public` (pinned from an earlier
    /// session). `client_payload` (at most [`CLIENT_PAYLOAD_BYTES_MAX`])
    /// goes in the first message, encrypted to the server's key; see the
    /// module notes on its replay. Returns the initiator and the opening
    /// bytes.
    pub fn ik(
        client: &StaticKeypair,
        server_public: &[u8; KEY_BYTES],
        client_payload: &[u8],
    ) -> Result<(Initiator, Vec<u8>), NoiseError> {
        Initiator::start(
            Pattern::Ik,
            client,
            Some(server_public),
            client_payload,
            None,
        )
    }

    /// As [`Initiator::xx`] or [`Initiator::ik`] with a fixed ephemeral key,
    /// for test vectors only: a fixed ephemeral key destroys forward secrecy.
    #[cfg(test)]
    pub(crate) fn with_fixed_ephemeral_for_tests(
        pattern: Pattern,
        client: &StaticKeypair,
        server_public: Option<&[u8; KEY_BYTES]>,
        client_payload: &[u8],
        ephemeral: [u8; KEY_BYTES],
    ) -> Result<(Initiator, Vec<u8>), NoiseError> {
        Initiator::start(
            pattern,
            client,
            server_public,
            client_payload,
            Some(&ephemeral),
        )
    }

    fn start(
        pattern: Pattern,
        client: &StaticKeypair,
        server_public: Option<&[u8; KEY_BYTES]>,
        client_payload: &[u8],
        ephemeral: Option<&[u8; KEY_BYTES]>,
    ) -> Result<(Initiator, Vec<u8>), NoiseError> {
        if client_payload.len() > CLIENT_PAYLOAD_BYTES_MAX {
            return Err(NoiseError::PayloadTooLarge {
                length: client_payload.len(),
                limit: CLIENT_PAYLOAD_BYTES_MAX,
            });
        }
        let mut state = build(pattern, client, server_public, ephemeral, true)?;
        let mut opening = pattern.intro().to_vec();
        let (first, kept) = match pattern {
            Pattern::Xx => (write(&mut state, XX_1_BYTES, &[])?, client_payload.to_vec()),
            Pattern::Ik => (write(&mut state, IK_1_BYTES, client_payload)?, Vec::new()),
        };
        opening.extend_from_slice(&first);
        let initiator = Initiator {
            pattern,
            step: Step::Await(2),
            state,
            client_payload: kept,
            server_payload: Vec::new(),
            server_static: server_public.copied(),
        };
        Ok((initiator, opening))
    }

    /// The largest message the initiator accepts next.
    pub fn message_bytes_max(&self) -> usize {
        match (self.pattern, self.step) {
            (Pattern::Xx, Step::Await(_)) => XX_2_BYTES + SERVER_PAYLOAD_BYTES_MAX,
            (Pattern::Ik, Step::Await(_)) => IK_2_BYTES + SERVER_PAYLOAD_BYTES_MAX,
            (_, Step::Finished | Step::Failed) => MESSAGE_BYTES_MAX,
        }
    }

    /// Reads the server's handshake message (without its length prefix).
    /// For XX returns the third message to send, length-prefixed; the caller
    /// may first check [`Initiator::server_static`] against a pinned key and
    /// not send it. Any error is final.
    pub fn read_message(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, NoiseError> {
        if self.step != Step::Await(2) {
            return Err(NoiseError::UnexpectedMessage);
        }
        let result = self.read_second(message);
        if result.is_err() {
            self.step = Step::Failed;
        }
        result
    }

    fn read_second(&mut self, message: &[u8]) -> Result<Option<Vec<u8>>, NoiseError> {
        let fixed = match self.pattern {
            Pattern::Xx => XX_2_BYTES,
            Pattern::Ik => IK_2_BYTES,
        };
        let length = payload_len(message.len(), fixed, SERVER_PAYLOAD_BYTES_MAX)?;
        let mut payload = vec![0u8; length];
        self.state
            .read_message(message, &mut payload)
            .map_err(from_snow)?;
        self.server_payload = payload;
        let reply = match self.pattern {
            Pattern::Xx => {
                self.server_static = Some(remote_static(&self.state)?);
                let client_payload = std::mem::take(&mut self.client_payload);
                Some(write(&mut self.state, XX_3_BYTES, &client_payload)?)
            }
            Pattern::Ik => None,
        };
        assert!(
            self.state.is_handshake_finished(),
            "the pattern is complete"
        );
        self.step = Step::Finished;
        Ok(reply)
    }

    pub fn is_finished(&self) -> bool {
        self.step == Step::Finished
    }

    pub fn pattern(&self) -> Pattern {
        self.pattern
    }

    /// The server's static public key: for IK the one given; for XX the one
    /// the server proved it holds, once its message is read (pin it).
    pub fn server_static(&self) -> Option<[u8; KEY_BYTES]> {
        self.server_static
    }

    /// The server's payload; empty until its message is read.
    pub fn server_payload(&self) -> &[u8] {
        &self.server_payload
    }

    /// After an IK answered under the server's previous key: the server's
    /// current key, to pin for the next session (the server payload of
    /// exactly 32 bytes).
    pub fn rotated_server_key(&self) -> Option<[u8; KEY_BYTES]> {
        match self.pattern {
            Pattern::Ik if self.is_finished() => self.server_payload.as_slice().try_into().ok(),
            _ => None,
        }
    }

    /// The Noise handshake hash, once finished.
    pub fn handshake_hash(&self) -> Option<[u8; 32]> {
        self.is_finished().then(|| handshake_hash(&self.state))
    }

    /// The transport state for the rest of the connection.
    pub fn into_transport(mut self) -> Result<Transport, NoiseError> {
        split(&mut self.state, self.step, true)
    }
}
