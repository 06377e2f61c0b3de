//! Both sides together, through the real wire bytes: round trips, key
//! rotation, every rejection, and the known-answer vector in
//! `testdata/vector.txt`.

use bytes::{Buf, BytesMut};

use super::handshake::{Initiator, Responder};
use super::keys::{KeySlot, ServerKeys, StaticKeypair};
use super::transport::Transport;
use super::wire::{self, Intro, Pattern, MESSAGE_BYTES_MAX};
use super::{NoiseError, CLIENT_PAYLOAD_BYTES_MAX, SERVER_PAYLOAD_BYTES_MAX};
use crate::proto::{self, pb, Frame};

fn keypair(seed: u8) -> StaticKeypair {
    StaticKeypair::from_private([seed; 32])
}

fn server_keys(seed: u8) -> ServerKeys {
    ServerKeys {
        current: keypair(seed),
        previous: None,
    }
}

fn hello_frame() -> Vec<u8> {
    Frame::Hello(pb::Hello {
        protocol_version: 1,
        ..Default::default()
    })
    .to_bytes()
    .to_vec()
}

/// The server side as a socket driver would run it: intro, then handshake
/// messages, then transport messages into a frame buffer.
#[derive(Debug)]
struct Server {
    keys: ServerKeys,
    input: BytesMut,
    responder: Option<Responder>,
    transport: Option<Transport>,
    /// What the finished handshake gave: the client's key, payload and the
    /// server key used.
    login: Option<([u8; 32], Vec<u8>, KeySlot)>,
    plaintext: BytesMut,
}

impl Server {
    fn new(keys: ServerKeys) -> Server {
        Server {
            keys,
            input: BytesMut::new(),
            responder: None,
            transport: None,
            login: None,
            plaintext: BytesMut::new(),
        }
    }

    /// Takes bytes from the client; returns the bytes to send back.
    fn receive(&mut self, bytes: &[u8]) -> Result<Vec<u8>, NoiseError> {
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some(transport) = &mut self.transport {
                transport.open(&mut self.input, &mut self.plaintext)?;
                return Ok(out);
            }
            let Some(responder) = &mut self.responder else {
                let Some((pattern, taken)) = Intro::parse(&self.input)? else {
                    return Ok(out);
                };
                self.input.advance(taken);
                self.responder = Some(Responder::new(pattern, &self.keys)?);
                continue;
            };
            let Some(message) = wire::next_message(&mut self.input, responder.message_bytes_max())?
            else {
                return Ok(out);
            };
            if let Some(reply) = responder.read_message(&message)? {
                out.extend_from_slice(&reply);
            }
            if responder.is_finished() {
                let responder = self.responder.take().unwrap();
                self.login = Some((
                    responder.remote_static().unwrap(),
                    responder.client_payload().to_vec(),
                    responder.key_slot(),
                ));
                self.transport = Some(responder.into_transport()?);
            }
        }
    }
}

/// The client side: an initiator, then a transport.
#[derive(Debug)]
struct Client {
    input: BytesMut,
    initiator: Option<Initiator>,
    transport: Option<Transport>,
    server_static: Option<[u8; 32]>,
    rotated: Option<[u8; 32]>,
    plaintext: BytesMut,
}

impl Client {
    fn new(initiator: Initiator) -> Client {
        Client {
            input: BytesMut::new(),
            initiator: Some(initiator),
            transport: None,
            server_static: None,
            rotated: None,
            plaintext: BytesMut::new(),
        }
    }

    fn receive(&mut self, bytes: &[u8]) -> Result<Vec<u8>, NoiseError> {
        self.input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            if let Some(transport) = &mut self.transport {
                transport.open(&mut self.input, &mut self.plaintext)?;
                return Ok(out);
            }
            let initiator = self.initiator.as_mut().unwrap();
            let Some(message) = wire::next_message(&mut self.input, initiator.message_bytes_max())?
            else {
                return Ok(out);
            };
            if let Some(reply) = initiator.read_message(&message)? {
                out.extend_from_slice(&reply);
            }
            if initiator.is_finished() {
                let initiator = self.initiator.take().unwrap();
                self.server_static = initiator.server_static();
                self.rotated = initiator.rotated_server_key();
                self.transport = Some(initiator.into_transport()?);
            }
        }
    }
}

/// Runs a handshake between `opening`'s client and a server with `keys`,
/// delivering bytes `piece` at a time; then a frame each way.
fn connect(
    initiator: Initiator,
    opening: Vec<u8>,
    keys: ServerKeys,
    piece: usize,
) -> Result<(Client, Server), NoiseError> {
    let mut client = Client::new(initiator);
    let mut server = Server::new(keys);
    let mut to_server = opening;
    for _ in 0..4 {
        let mut to_client = Vec::new();
        for bytes in to_server.chunks(piece) {
            to_client.extend(server.receive(bytes)?);
        }
        to_server = Vec::new();
        for bytes in to_client.chunks(piece) {
            to_server.extend(client.receive(bytes)?);
        }
        if client.transport.is_some() && server.transport.is_some() && to_server.is_empty() {
            return Ok((client, server));
        }
    }
    panic!("the handshake did not finish in 4 round trips");
}

/// Sends a Ping from the client and a Pong back, as sealed frames, and
/// deframes them on the other side.
fn exchange_frames(client: &mut Client, server: &mut Server) {
    let ping = Frame::Ping(pb::Ping { nonce: 7 }).to_bytes();
    let mut sealed = BytesMut::new();
    client
        .transport
        .as_mut()
        .unwrap()
        .seal(&ping, &mut sealed)
        .unwrap();
    assert!(server.receive(&sealed).unwrap().is_empty());
    let frame = proto::next_frame(&mut server.plaintext, 66_560).unwrap();
    assert_eq!(frame, Some(Frame::Ping(pb::Ping { nonce: 7 })));

    let pong = Frame::Pong(pb::Pong { nonce: 7 }).to_bytes();
    let mut sealed = BytesMut::new();
    server
        .transport
        .as_mut()
        .unwrap()
        .seal(&pong, &mut sealed)
        .unwrap();
    assert!(client.receive(&sealed).unwrap().is_empty());
    let frame = proto::next_frame(&mut client.plaintext, 66_560).unwrap();
    assert_eq!(frame, Some(Frame::Pong(pb::Pong { nonce: 7 })));
}

#[test]
fn round_trips_xx_over_the_wire() {
    let device = keypair(11);
    let keys = server_keys(22);
    for piece in [1, 3, 7, 1000] {
        let (initiator, opening) = Initiator::xx(&device, &hello_frame()).unwrap();
        assert_eq!(&opening[..5], b"SBN1X");
        assert_eq!(opening.len(), 5 + 2 + 32);
        let (mut client, mut server) = connect(initiator, opening, keys.clone(), piece).unwrap();
        let (client_key, payload, slot) = server.login.clone().unwrap();
        assert_eq!(client_key, *device.public());
        assert_eq!(payload, hello_frame());
        assert_eq!(slot, KeySlot::Current);
        assert_eq!(client.server_static, Some(*keys.public()));
        assert_eq!(client.rotated, None);
        exchange_frames(&mut client, &mut server);
    }
}

#[test]
fn round_trips_ik_with_the_key_pinned_by_xx() {
    let device = keypair(11);
    let keys = server_keys(22);
    let (initiator, opening) = Initiator::xx(&device, &hello_frame()).unwrap();
    let (client, _) = connect(initiator, opening, keys.clone(), 1000).unwrap();
    let pinned = client.server_static.unwrap();

    for piece in [1, 5, 1000] {
        let (initiator, opening) = Initiator::ik(&device, &pinned, &hello_frame()).unwrap();
        assert_eq!(&opening[..5], b"SBN1I");
        assert_eq!(opening.len(), 5 + 2 + 96 + hello_frame().len());
        let (mut client, mut server) = connect(initiator, opening, keys.clone(), piece).unwrap();
        let (client_key, payload, slot) = server.login.clone().unwrap();
        assert_eq!(client_key, *device.public());
        assert_eq!(payload, hello_frame());
        assert_eq!(slot, KeySlot::Current);
        assert_eq!(client.rotated, None);
        exchange_frames(&mut client, &mut server);
    }
}

#[test]
fn both_sides_share_the_handshake_hash() {
    for pattern in [Pattern::Xx, Pattern::Ik] {
        let keys = server_keys(3);
        let device = keypair(4);
        let (mut initiator, opening) = match pattern {
            Pattern::Xx => Initiator::xx(&device, b"login").unwrap(),
            Pattern::Ik => Initiator::ik(&device, keys.public(), b"login").unwrap(),
        };
        let mut responder = Responder::new(pattern, &keys).unwrap();
        assert_eq!(responder.handshake_hash(), None);
        let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
        if let Some(third) = initiator.read_message(&reply[2..]).unwrap() {
            assert_eq!(responder.read_message(&third[2..]).unwrap(), None);
        }
        assert!(initiator.is_finished() && responder.is_finished());
        assert_eq!(responder.handshake_hash(), initiator.handshake_hash());
        assert!(responder.handshake_hash().is_some());
    }
}

#[test]
fn xx_always_uses_the_current_key() {
    let dir = tempfile::tempdir().unwrap();
    let before = ServerKeys::load_or_create(dir.path()).unwrap();
    let keys = ServerKeys::rotate(dir.path()).unwrap();
    let (initiator, opening) = Initiator::xx(&keypair(1), b"hi").unwrap();
    let (client, server) = connect(initiator, opening, keys.clone(), 1000).unwrap();
    assert_eq!(client.server_static, Some(*keys.public()));
    assert_ne!(client.server_static, Some(*before.public()));
    assert_eq!(server.login.unwrap().2, KeySlot::Current);
}

#[test]
fn ik_to_the_previous_key_works_during_the_overlap_and_names_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let old = ServerKeys::load_or_create(dir.path()).unwrap();
    let keys = ServerKeys::rotate(dir.path()).unwrap();
    let device = keypair(5);

    // A client that pinned the old key still gets in, and learns the new
    // key inside the handshake authenticated by the old one.
    let (initiator, opening) = Initiator::ik(&device, old.public(), b"hello").unwrap();
    let (mut client, mut server) = connect(initiator, opening, keys.clone(), 1000).unwrap();
    let (client_key, payload, slot) = server.login.clone().unwrap();
    assert_eq!(client_key, *device.public());
    assert_eq!(payload, b"hello");
    assert_eq!(slot, KeySlot::Previous);
    assert_eq!(client.rotated, Some(*keys.public()));
    exchange_frames(&mut client, &mut server);

    // With the new key, no notice.
    let (initiator, opening) = Initiator::ik(&device, keys.public(), b"hello").unwrap();
    let (client, server) = connect(initiator, opening, keys.clone(), 1000).unwrap();
    assert_eq!(server.login.unwrap().2, KeySlot::Current);
    assert_eq!(client.rotated, None);

    // Once the overlap ends, the old key is refused.
    let ended = ServerKeys::end_overlap(dir.path()).unwrap();
    let (initiator, opening) = Initiator::ik(&device, old.public(), b"hello").unwrap();
    assert_eq!(
        connect(initiator, opening, ended, 1000).unwrap_err(),
        NoiseError::UnknownServerKey
    );
}

#[test]
fn rejects_ik_to_a_key_never_held() {
    let stranger = keypair(99);
    let mut keys = server_keys(1);
    keys.previous = Some(keypair(2));
    let (initiator, opening) = Initiator::ik(&keypair(3), stranger.public(), b"hi").unwrap();
    assert_eq!(
        connect(initiator, opening, keys, 1000).unwrap_err(),
        NoiseError::UnknownServerKey
    );
}

#[test]
fn rejects_ik_with_an_altered_payload_as_decrypt_not_unknown_key() {
    // The client's identity decrypts (right server key) but the payload
    // was altered: a distinct error from a wrong key.
    for previous in [false, true] {
        let mut keys = server_keys(1);
        let target = if previous {
            keys.previous = Some(keypair(8));
            keypair(8)
        } else {
            keys.current.clone()
        };
        let (_, opening) = Initiator::ik(&keypair(3), target.public(), b"payload").unwrap();
        let mut message = opening[7..].to_vec();
        let last = message.len() - 1;
        message[last] ^= 1;
        let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
        assert_eq!(
            responder.read_message(&message),
            Err(NoiseError::HandshakeDecrypt),
            "previous: {previous}"
        );
    }
}

#[test]
fn rejects_garbage_handshake_messages() {
    let keys = server_keys(1);
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 256) as u8).collect();

    // IK: garbage cannot be told from a message to another key.
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(
        responder.read_message(&garbage[..96 + 10]),
        Err(NoiseError::UnknownServerKey)
    );

    // XX: the first message is any 32 bytes (an ephemeral key), but a
    // garbage third message fails authentication.
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    let (mut initiator, opening) = Initiator::xx(&keypair(2), b"x").unwrap();
    let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
    assert!(initiator.read_message(&reply[2..]).unwrap().is_some());
    assert_eq!(
        responder.read_message(&garbage[..64 + 10]),
        Err(NoiseError::HandshakeDecrypt)
    );

    // The client side: a garbage server message.
    for pattern in [Pattern::Xx, Pattern::Ik] {
        let (mut initiator, _) = match pattern {
            Pattern::Xx => Initiator::xx(&keypair(2), b"x").unwrap(),
            Pattern::Ik => Initiator::ik(&keypair(2), keys.public(), b"x").unwrap(),
        };
        assert_eq!(
            initiator.read_message(&garbage[..100]),
            Err(NoiseError::HandshakeDecrypt),
            "{pattern:?}"
        );
    }
}

#[test]
fn rejects_truncated_handshake_messages() {
    let keys = server_keys(1);
    let device = keypair(2);

    // Shorter than the pattern's fixed part: told from the length alone.
    let (_, opening) = Initiator::xx(&device, b"").unwrap();
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    assert_eq!(
        responder.read_message(&opening[7..38]),
        Err(NoiseError::HandshakeTruncated {
            length: 31,
            needed: 32
        })
    );
    let (_, opening) = Initiator::ik(&device, keys.public(), b"").unwrap();
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(
        responder.read_message(&opening[7..opening.len() - 1]),
        Err(NoiseError::HandshakeTruncated {
            length: 95,
            needed: 96
        })
    );

    // Cut inside the payload: the tag fails.
    let (_, opening) = Initiator::ik(&device, keys.public(), b"a login frame").unwrap();
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(
        responder.read_message(&opening[7..opening.len() - 1]),
        Err(NoiseError::HandshakeDecrypt)
    );

    // XX third message and the server's messages, cut short.
    let (mut initiator, opening) = Initiator::xx(&device, b"login").unwrap();
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
    let mut cut = Initiator::xx(&device, b"login").unwrap().0;
    assert_eq!(
        cut.read_message(&reply[2..reply.len() - 1]),
        Err(NoiseError::HandshakeTruncated {
            length: 95,
            needed: 96
        })
    );
    let third = initiator.read_message(&reply[2..]).unwrap().unwrap();
    assert_eq!(
        responder.read_message(&third[2..third.len() - 1]),
        Err(NoiseError::HandshakeDecrypt)
    );
    let (mut ik_client, opening) = Initiator::ik(&device, keys.public(), b"").unwrap();
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
    assert_eq!(
        ik_client.read_message(&reply[2..reply.len() - 1]),
        Err(NoiseError::HandshakeTruncated {
            length: 47,
            needed: 48
        })
    );
}

#[test]
fn rejects_replayed_handshake_messages() {
    let keys = server_keys(1);
    let device = keypair(2);

    // A recorded XX third message, replayed into a new session: the server's
    // fresh ephemeral key makes it fail.
    let (mut initiator, opening) = Initiator::xx(&device, b"login").unwrap();
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
    let third = initiator.read_message(&reply[2..]).unwrap().unwrap();
    let mut fresh = Responder::new(Pattern::Xx, &keys).unwrap();
    fresh.read_message(&opening[7..]).unwrap().unwrap();
    assert_eq!(
        fresh.read_message(&third[2..]),
        Err(NoiseError::HandshakeDecrypt)
    );

    // A recorded server reply, replayed to a new client session.
    let (mut another, _) = Initiator::xx(&device, b"login").unwrap();
    assert_eq!(
        another.read_message(&reply[2..]),
        Err(NoiseError::HandshakeDecrypt)
    );

    // The first message replayed into the same session, where the third is
    // expected.
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    responder.read_message(&opening[7..]).unwrap().unwrap();
    assert!(matches!(
        responder.read_message(&opening[7..]),
        Err(NoiseError::HandshakeTruncated { .. })
    ));
}

#[test]
fn ik_replay_finishes_but_yields_a_session_no_one_can_use() {
    // Noise IK's first message is replayable (see the handshake notes): the
    // server finishes, but its keys depend on its fresh ephemeral key, so
    // neither the recorded client traffic nor anything the replayer makes
    // opens on the replayed session.
    let keys = server_keys(1);
    let device = keypair(2);
    let (initiator, opening) = Initiator::ik(&device, keys.public(), b"hello").unwrap();
    let (mut client, _) = connect(initiator, opening.clone(), keys.clone(), 1000).unwrap();
    let mut recorded = BytesMut::new();
    client
        .transport
        .as_mut()
        .unwrap()
        .seal(b"\x00\x00\x00\x03\x20\x08\x07", &mut recorded)
        .unwrap();

    let mut replayed = Server::new(keys);
    replayed.receive(&opening).unwrap();
    assert_eq!(replayed.login.as_ref().unwrap().1, b"hello");
    assert_eq!(
        replayed.receive(&recorded),
        Err(NoiseError::TransportDecrypt)
    );
}

#[test]
fn rejects_an_unexpected_extra_message() {
    let keys = server_keys(1);
    let device = keypair(2);
    for pattern in [Pattern::Xx, Pattern::Ik] {
        let (mut initiator, opening) = match pattern {
            Pattern::Xx => Initiator::xx(&device, b"x").unwrap(),
            Pattern::Ik => Initiator::ik(&device, keys.public(), b"x").unwrap(),
        };
        let mut responder = Responder::new(pattern, &keys).unwrap();
        let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
        if let Some(third) = initiator.read_message(&reply[2..]).unwrap() {
            responder.read_message(&third[2..]).unwrap();
        }
        assert!(responder.is_finished() && initiator.is_finished());
        assert_eq!(
            responder.read_message(&[0; 64]),
            Err(NoiseError::UnexpectedMessage)
        );
        assert_eq!(
            initiator.read_message(&reply[2..]),
            Err(NoiseError::UnexpectedMessage)
        );
        // An extra message does not spoil the finished state.
        assert!(responder.into_transport().is_ok());
        assert!(initiator.into_transport().is_ok());
    }
}

#[test]
fn a_failed_handshake_refuses_everything_after() {
    let keys = server_keys(1);
    let (_, opening) = Initiator::ik(&keypair(2), keys.public(), b"x").unwrap();
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert!(responder.read_message(&[0; 10]).is_err());
    assert_eq!(
        responder.read_message(&opening[7..]),
        Err(NoiseError::UnexpectedMessage)
    );
    assert!(!responder.is_finished());
    assert!(responder.client_payload().is_empty());
    assert_eq!(responder.remote_static(), None);
    assert_eq!(
        responder.into_transport().unwrap_err(),
        NoiseError::HandshakeUnfinished
    );
}

#[test]
fn no_transport_before_the_handshake_finishes() {
    let keys = server_keys(1);
    let (initiator, opening) = Initiator::xx(&keypair(2), b"x").unwrap();
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    responder.read_message(&opening[7..]).unwrap();
    assert!(!responder.is_finished());
    assert!(responder.client_payload().is_empty());
    assert_eq!(
        responder.into_transport().unwrap_err(),
        NoiseError::HandshakeUnfinished
    );
    assert_eq!(
        initiator.into_transport().unwrap_err(),
        NoiseError::HandshakeUnfinished
    );
}

/// A raw snow initiator, to send what our `Initiator` refuses to.
fn raw_initiator(
    pattern: Pattern,
    client: &StaticKeypair,
    server: Option<&[u8; 32]>,
) -> snow::HandshakeState {
    let mut builder = snow::Builder::new(pattern.noise_name().parse().unwrap())
        .local_private_key(client.private())
        .unwrap();
    let prologue = pattern.intro();
    builder = builder.prologue(&prologue).unwrap();
    if let Some(server) = server {
        builder = builder.remote_public_key(server).unwrap();
    }
    builder.build_initiator().unwrap()
}

#[test]
fn rejects_oversized_payloads_before_allocating() {
    let keys = server_keys(1);
    let device = keypair(2);
    let too_big = vec![0u8; CLIENT_PAYLOAD_BYTES_MAX + 1];

    // Our own initiator refuses to send one.
    assert_eq!(
        Initiator::xx(&device, &too_big).unwrap_err(),
        NoiseError::PayloadTooLarge {
            length: 4097,
            limit: 4096
        }
    );
    assert_eq!(
        Initiator::ik(&device, keys.public(), &too_big).unwrap_err(),
        NoiseError::PayloadTooLarge {
            length: 4097,
            limit: 4096
        }
    );
    // At the limit is fine.
    let at_limit = vec![1u8; CLIENT_PAYLOAD_BYTES_MAX];
    let (initiator, opening) = Initiator::ik(&device, keys.public(), &at_limit).unwrap();
    let (_, server) = connect(initiator, opening, keys.clone(), 1000).unwrap();
    assert_eq!(server.login.unwrap().1, at_limit);

    // Another client sends one: the splitter refuses it from its prefix...
    let mut raw = raw_initiator(Pattern::Ik, &device, Some(keys.public()));
    let mut message = vec![0u8; 96 + too_big.len()];
    let n = raw.write_message(&too_big, &mut message).unwrap();
    let mut stream = BytesMut::new();
    wire::put_message(&mut stream, &message[..n]);
    let responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(
        wire::next_message(
            &mut stream.clone().split_to(2),
            responder.message_bytes_max()
        ),
        Err(NoiseError::MessageTooLarge {
            length: 96 + 4097,
            limit: 96 + 4096
        })
    );
    // ...and the responder by the message length alone.
    let mut responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(
        responder.read_message(&message[..n]),
        Err(NoiseError::PayloadTooLarge {
            length: 4097,
            limit: 4096
        })
    );

    // XX's first message carries no payload at all.
    let mut raw = raw_initiator(Pattern::Xx, &device, None);
    let mut message = [0u8; 64];
    let n = raw.write_message(b"early", &mut message).unwrap();
    let mut responder = Responder::new(Pattern::Xx, &keys).unwrap();
    assert_eq!(
        responder.read_message(&message[..n]),
        Err(NoiseError::PayloadTooLarge {
            length: 5,
            limit: 0
        })
    );

    // A server payload over the client's limit.
    let mut raw_server = snow::Builder::new(Pattern::Ik.noise_name().parse().unwrap())
        .local_private_key(keys.current.private())
        .unwrap()
        .prologue(&Pattern::Ik.intro())
        .unwrap()
        .build_responder()
        .unwrap();
    let (mut initiator, opening) = Initiator::ik(&device, keys.public(), b"x").unwrap();
    let mut scratch = [0u8; 64];
    raw_server
        .read_message(&opening[7..], &mut scratch)
        .unwrap();
    let big = vec![0u8; SERVER_PAYLOAD_BYTES_MAX + 1];
    let mut reply = vec![0u8; 48 + big.len()];
    let n = raw_server.write_message(&big, &mut reply).unwrap();
    assert_eq!(
        initiator.read_message(&reply[..n]),
        Err(NoiseError::PayloadTooLarge {
            length: 4097,
            limit: 4096
        })
    );
}

#[test]
fn a_plaintext_client_is_told_apart_by_its_first_bytes() {
    let mut server = Server::new(server_keys(1));
    let hello = hello_frame();
    assert_eq!(server.receive(&hello[..1]), Err(NoiseError::BadMagic));
    let mut server = Server::new(server_keys(1));
    assert_eq!(
        server.receive(b"SBN1Z"),
        Err(NoiseError::UnknownPattern(b'Z'))
    );
}

#[test]
fn rejects_a_handshake_message_of_length_zero() {
    let mut server = Server::new(server_keys(1));
    assert_eq!(
        server.receive(b"SBN1X\x00\x00"),
        Err(NoiseError::EmptyMessage)
    );
}

#[test]
fn message_limits_fit_the_u16_prefix() {
    let keys = server_keys(1);
    let responder = Responder::new(Pattern::Xx, &keys).unwrap();
    assert_eq!(responder.message_bytes_max(), 32);
    let responder = Responder::new(Pattern::Ik, &keys).unwrap();
    assert_eq!(responder.message_bytes_max(), 96 + 4096);
    let (initiator, _) = Initiator::xx(&keypair(2), b"").unwrap();
    assert_eq!(initiator.message_bytes_max(), 96 + 4096);
    assert!(initiator.message_bytes_max() <= MESSAGE_BYTES_MAX);
}

// ---------------------------------------------------------------------------
// The known-answer vector.

/// `key = value` lines of `testdata/vector.txt` (`#` starts a comment).
fn vector() -> Vec<(String, String)> {
    let text = include_str!("testdata/vector.txt");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line.split_once('=').expect("key = value");
            (key.trim().to_string(), value.trim().to_string())
        })
        .collect()
}

fn value(vector: &[(String, String)], key: &str) -> Vec<u8> {
    let (_, hex_value) = vector
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} missing from vector.txt"));
    hex::decode(hex_value).unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn key32(vector: &[(String, String)], key: &str) -> [u8; 32] {
    value(vector, key).try_into().expect("32 bytes")
}

/// Every value the vector's inputs produce, in file order.
fn compute_vector(inputs: &[(String, String)]) -> Vec<(&'static str, Vec<u8>)> {
    let server = StaticKeypair::from_private(key32(inputs, "server_static_private"));
    let rotated = StaticKeypair::from_private(key32(inputs, "rotated_server_static_private"));
    let client = StaticKeypair::from_private(key32(inputs, "client_static_private"));
    let client_e = key32(inputs, "client_ephemeral_private");
    let server_e = key32(inputs, "server_ephemeral_private");
    // The served protocol sends no handshake payload: the login is the
    // first sealed frame (transport_client_plaintext).
    let payload: Vec<u8> = Vec::new();
    let client_frame = value(inputs, "transport_client_plaintext");
    let server_frame = value(inputs, "transport_server_plaintext");
    let mut out: Vec<(&'static str, Vec<u8>)> = vec![
        ("server_static_public", server.public().to_vec()),
        ("client_static_public", client.public().to_vec()),
        ("rotated_server_static_public", rotated.public().to_vec()),
    ];

    let run = |pattern: Pattern, keys: ServerKeys, server_public: Option<&[u8; 32]>| {
        let mut messages = Vec::new();
        let (mut initiator, opening) = Initiator::with_fixed_ephemeral_for_tests(
            pattern,
            &client,
            server_public,
            &payload,
            client_e,
        )
        .unwrap();
        let mut responder =
            Responder::with_fixed_ephemeral_for_tests(pattern, &keys, server_e).unwrap();
        messages.push(opening[5..].to_vec());
        let reply = responder.read_message(&opening[7..]).unwrap().unwrap();
        messages.push(reply.clone());
        if let Some(third) = initiator.read_message(&reply[2..]).unwrap() {
            assert_eq!(responder.read_message(&third[2..]).unwrap(), None);
            messages.push(third);
        }
        assert_eq!(responder.client_payload(), &payload[..]);
        let hash = responder.handshake_hash().unwrap().to_vec();
        assert_eq!(initiator.handshake_hash().unwrap().to_vec(), hash);
        let mut client_transport = initiator.into_transport().unwrap();
        let mut server_transport = responder.into_transport().unwrap();
        let mut from_client = BytesMut::new();
        client_transport
            .seal(&client_frame, &mut from_client)
            .unwrap();
        let mut from_server = BytesMut::new();
        server_transport
            .seal(&server_frame, &mut from_server)
            .unwrap();
        // And they open on the other side.
        let mut plaintext = BytesMut::new();
        server_transport
            .open(&mut from_client.clone(), &mut plaintext)
            .unwrap();
        assert_eq!(&plaintext[..], &client_frame[..]);
        (messages, hash, from_client.to_vec(), from_server.to_vec())
    };

    let xx_keys = ServerKeys {
        current: server.clone(),
        previous: None,
    };
    let (messages, hash, from_client, from_server) = run(Pattern::Xx, xx_keys.clone(), None);
    out.push(("xx_intro", Pattern::Xx.intro().to_vec()));
    out.push(("xx_message_1", messages[0].clone()));
    out.push(("xx_message_2", messages[1].clone()));
    out.push(("xx_message_3", messages[2].clone()));
    out.push(("xx_handshake_hash", hash));
    out.push(("xx_transport_client_1", from_client));
    out.push(("xx_transport_server_1", from_server));

    let (messages, hash, from_client, from_server) =
        run(Pattern::Ik, xx_keys, Some(server.public()));
    out.push(("ik_intro", Pattern::Ik.intro().to_vec()));
    out.push(("ik_message_1", messages[0].clone()));
    out.push(("ik_message_2", messages[1].clone()));
    out.push(("ik_handshake_hash", hash));
    out.push(("ik_transport_client_1", from_client));
    out.push(("ik_transport_server_1", from_server));

    let rotated_keys = ServerKeys {
        current: rotated.clone(),
        previous: Some(server.clone()),
    };
    let (messages, hash, from_client, from_server) =
        run(Pattern::Ik, rotated_keys, Some(server.public()));
    // As the file says: the same first message and transport messages as
    // the plain IK case, only the reply (and so the hash) differs.
    out.push(("ik_message_1", messages[0].clone()));
    out.push(("ik_rotated_message_2", messages[1].clone()));
    out.push(("ik_rotated_handshake_hash", hash));
    out.push(("ik_transport_client_1", from_client));
    out.push(("ik_transport_server_1", from_server));
    out
}

#[test]
fn matches_the_known_answer_vector() {
    let vector = vector();
    if std::env::var_os("SWITCHBOARD_BLESS").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/noise/testdata/vector.txt");
        let mut text = std::fs::read_to_string(path).unwrap();
        for (key, computed) in compute_vector(&vector) {
            let old = format!("{key} = {}", hex::encode(value(&vector, key)));
            let new = format!("{key} = {}", hex::encode(&computed));
            text = text.replace(&old, &new);
        }
        std::fs::write(path, text).unwrap();
        return;
    }
    for (key, expected) in compute_vector(&vector) {
        assert_eq!(
            hex::encode(&expected),
            hex::encode(value(&vector, key)),
            "{key} (computed on the left)"
        );
    }
}

#[test]
fn vector_payloads_are_the_frames_its_comments_name() {
    let vector = vector();
    assert_eq!(value(&vector, "transport_client_plaintext"), hello_frame());
    assert_eq!(
        value(&vector, "transport_server_plaintext"),
        Frame::Welcome(pb::Welcome {
            protocol_version: 1,
            ..Default::default()
        })
        .to_bytes()
        .to_vec()
    );
}
