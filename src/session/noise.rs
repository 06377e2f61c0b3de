//! The server's side of a Noise client's handshake, over the bytes a
//! handshaking socket reads (`net::uring::Event::Raw`): the intro, then the
//! handshake messages of the pattern it names. Does no I/O and reads no
//! clock: the socket loop (`shard::io`) feeds it and sends what it returns.
//!
//! When the handshake finishes, the connection's transport state and the
//! bytes read past the last handshake message go to the socket driver
//! (`Driver::start_sealing`), which opens and frames everything after; the
//! login frame (Register, Hello or Link) is the first sealed frame, handled
//! by [`super::handshake::Handshake`] like a plaintext one, with the
//! client's static key beside it.
//!
//! Why the login is not a handshake payload: IK's first message can be
//! replayed, and a replayed Hello would push out the device's live session.
//! A transport message can only come from the holder of this handshake's
//! keys, so a login read from one is fresh. A client payload is refused.
//!
//! Invariants: input held is bounded by [`INPUT_BYTES_MAX`] (a message's
//! length is checked against its pattern's limit from its 2-byte prefix);
//! every error is final.

use bytes::{Buf, BytesMut};

use crate::noise::{wire, Intro, NoiseError, Pattern, Responder, ServerKeys, Transport};

/// Bytes of handshake input held at most: the largest handshake message a
/// client may send (an IK first message with the largest payload the
/// responder checks for, or XX's third) with its prefix, plus one socket
/// read of sealed frames pipelined behind it.
pub const INPUT_BYTES_MAX: usize = 16 * 1024;

/// What the handshake needs done after some input.
#[derive(Debug)]
pub enum NoiseStep {
    /// Nothing to send; wait for more input.
    Wait,
    /// Send these bytes (a handshake message, length-prefixed) as they are.
    Reply(Vec<u8>),
    /// The handshake is finished: send `reply` (if any) as it is, then seal
    /// everything with `transport`. `unopened` is what the client sent past
    /// its last handshake message (sealed frames).
    Finished {
        reply: Option<Vec<u8>>,
        transport: Transport,
        client_key: [u8; 32],
        pattern: Pattern,
        unopened: BytesMut,
    },
}

/// One connection's Noise handshake, on the server.
#[derive(Debug, Default)]
pub struct NoiseLogin {
    responder: Option<Responder>,
    input: BytesMut,
    failed: bool,
}

impl NoiseLogin {
    pub fn new() -> NoiseLogin {
        NoiseLogin::default()
    }

    /// Feeds bytes read from the socket; returns what to do next. Any error
    /// is final: the connection is to be closed without an answer (there is
    /// no key to seal one with, and a plaintext answer would tell a prober
    /// more than it needs).
    pub fn input(&mut self, bytes: &[u8], keys: &ServerKeys) -> Result<NoiseStep, NoiseError> {
        if self.failed {
            return Err(NoiseError::UnexpectedMessage);
        }
        let step = self.advance(bytes, keys);
        if step.is_err() {
            self.failed = true;
            self.input = BytesMut::new();
        }
        step
    }

    fn advance(&mut self, bytes: &[u8], keys: &ServerKeys) -> Result<NoiseStep, NoiseError> {
        if self.input.len() + bytes.len() > INPUT_BYTES_MAX {
            return Err(NoiseError::MessageTooLarge {
                length: self.input.len() + bytes.len(),
                limit: INPUT_BYTES_MAX,
            });
        }
        self.input.extend_from_slice(bytes);
        if self.responder.is_none() {
            let Some((pattern, used)) = Intro::parse(&self.input)? else {
                return Ok(NoiseStep::Wait);
            };
            self.input.advance(used);
            self.responder = Some(Responder::new(pattern, keys)?);
        }
        let responder = self.responder.as_mut().expect("made above");
        let limit = responder.message_bytes_max();
        let Some(message) = wire::next_message(&mut self.input, limit)? else {
            return Ok(NoiseStep::Wait);
        };
        let reply = responder.read_message(&message)?;
        if !responder.is_finished() {
            if !self.input.is_empty() {
                // The client sent past a message it must wait on an answer
                // for: it is not following the pattern.
                return Err(NoiseError::UnexpectedMessage);
            }
            return Ok(match reply {
                Some(reply) => NoiseStep::Reply(reply),
                None => NoiseStep::Wait,
            });
        }
        if !responder.client_payload().is_empty() {
            return Err(NoiseError::PayloadNotEmpty);
        }
        let responder = self.responder.take().expect("present");
        let pattern = responder.pattern();
        let client_key = responder
            .remote_static()
            .ok_or(NoiseError::HandshakeUnfinished)?;
        let transport = responder.into_transport()?;
        Ok(NoiseStep::Finished {
            reply,
            transport,
            client_key,
            pattern,
            unopened: std::mem::take(&mut self.input),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::{Initiator, StaticKeypair};

    fn keys() -> (tempfile::TempDir, ServerKeys) {
        let dir = tempfile::tempdir().unwrap();
        let keys = ServerKeys::load_or_create(dir.path()).unwrap();
        (dir, keys)
    }

    /// Splits a length-prefixed message off `bytes`.
    fn body(bytes: &[u8]) -> &[u8] {
        &bytes[wire::LENGTH_PREFIX_BYTES..]
    }

    #[test]
    fn xx_byte_by_byte_finishes_with_the_client_key_and_the_pipelined_rest() {
        let (_dir, keys) = keys();
        let client = StaticKeypair::generate();
        let (mut initiator, opening) = Initiator::xx(&client, &[]).unwrap();
        let mut login = NoiseLogin::new();
        let mut reply = None;
        for byte in &opening {
            match login.input(&[*byte], &keys).unwrap() {
                NoiseStep::Wait => {}
                NoiseStep::Reply(r) => reply = Some(r),
                other => panic!("unexpected {other:?}"),
            }
        }
        let reply = reply.expect("message 2");
        let third = initiator.read_message(body(&reply)).unwrap().unwrap();
        let mut client_transport = initiator.into_transport().unwrap();
        let mut sealed = BytesMut::new();
        client_transport.seal(b"hello frame", &mut sealed).unwrap();
        let mut input = third.clone();
        input.extend_from_slice(&sealed);
        let NoiseStep::Finished {
            reply,
            mut transport,
            client_key,
            pattern,
            mut unopened,
        } = login.input(&input, &keys).unwrap()
        else {
            panic!("expected the end of the handshake");
        };
        assert!(reply.is_none());
        assert_eq!(client_key, *client.public());
        assert_eq!(pattern, Pattern::Xx);
        let mut plaintext = BytesMut::new();
        transport.open(&mut unopened, &mut plaintext).unwrap();
        assert_eq!(&plaintext[..], b"hello frame");
    }

    #[test]
    fn ik_finishes_in_one_message_and_refuses_a_payload() {
        let (_dir, keys) = keys();
        let client = StaticKeypair::generate();
        let (_, opening) = Initiator::ik(&client, keys.public(), &[]).unwrap();
        let mut login = NoiseLogin::new();
        let NoiseStep::Finished { reply, .. } = login.input(&opening, &keys).unwrap() else {
            panic!("IK finishes on its first message");
        };
        assert!(reply.is_some(), "message 2 goes back");

        let (_, opening) = Initiator::ik(&client, keys.public(), b"Hello").unwrap();
        let mut login = NoiseLogin::new();
        assert_eq!(
            login.input(&opening, &keys).unwrap_err(),
            NoiseError::PayloadNotEmpty
        );
        assert!(login.input(&[], &keys).is_err(), "errors are final");
    }

    #[test]
    fn refuses_garbage_unknown_keys_oversize_and_running_ahead() {
        let (_dir, keys) = keys();
        let mut login = NoiseLogin::new();
        assert_eq!(
            login.input(b"SBN2X", &keys).unwrap_err(),
            NoiseError::BadMagic
        );

        let stranger = StaticKeypair::generate();
        let client = StaticKeypair::generate();
        let (_, opening) = Initiator::ik(&client, stranger.public(), &[]).unwrap();
        let mut login = NoiseLogin::new();
        assert!(login.input(&opening, &keys).is_err());

        let mut login = NoiseLogin::new();
        let mut big = b"SBNX".to_vec();
        big.resize(INPUT_BYTES_MAX + 1, 0);
        assert!(matches!(
            login.input(&big, &keys).unwrap_err(),
            NoiseError::MessageTooLarge { .. }
        ));

        // XX: bytes after the first message, before the server answered.
        let (_, mut opening) = Initiator::xx(&client, &[]).unwrap();
        opening.extend_from_slice(&[0, 1, 0]);
        let mut login = NoiseLogin::new();
        assert_eq!(
            login.input(&opening, &keys).unwrap_err(),
            NoiseError::UnexpectedMessage
        );

        // A first message longer than the pattern allows, refused by its prefix.
        let mut login = NoiseLogin::new();
        let mut long = b"SBN1X".to_vec();
        long.extend_from_slice(&33u16.to_be_bytes());
        assert!(matches!(
            login.input(&long, &keys).unwrap_err(),
            NoiseError::MessageTooLarge { .. }
        ));
    }
}
