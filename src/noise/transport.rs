//! The sealed byte stream after the handshake.
//!
//! Each transport message is `u16 big-endian length | ciphertext | tag`,
//! the ChaCha20-Poly1305 encryption of one chunk (1..=[`CHUNK_BYTES_MAX`]
//! bytes) of the ordinary frame byte stream, under the Noise cipher state of
//! its direction: the key from the handshake's `Split()`, the nonce 4 zero
//! bytes then the message counter as a little-endian u64, empty associated
//! data. A sender may put several frames in one chunk or split a frame across
//! chunks; the receiver appends each chunk's plaintext to its frame buffer,
//! where the ordinary deframer (and its frame limit) takes over.
//!
//! Why not snow's `TransportState`: it holds each direction's cipher in a
//! `Box<dyn Cipher>` beside the pattern, the remote static key and lengths
//! (136 bytes inline and two 32-byte heap blocks, about 230 bytes with
//! allocator overhead); a connection in the transport phase needs only the
//! two keys and two counters, 80 bytes inline and nothing on the heap. The
//! keys come from snow's `dangerously_get_raw_split` and the AEAD is the
//! same `chacha20poly1305` crate snow uses; tests check both directions
//! against snow's own `TransportState`. Rekeying is not used.

use bytes::{Buf, BufMut, BytesMut};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

use super::wire::{self, LENGTH_PREFIX_BYTES, MESSAGE_BYTES_MAX};
use super::NoiseError;

/// Bytes of the Poly1305 tag after each chunk.
pub const TAG_BYTES: usize = 16;
/// Largest plaintext chunk in one transport message (65,519).
pub const CHUNK_BYTES_MAX: usize = MESSAGE_BYTES_MAX - TAG_BYTES;
/// Bytes of a ChaCha20-Poly1305 key.
const KEY_BYTES: usize = 32;

/// One connection's transport state: a key and a message counter per
/// direction. 80 bytes, no heap (checked at compile time below), so an idle
/// session's encryption costs 80 bytes on top of its connection.
///
/// Not `Clone`: two copies would reuse nonces.
pub struct Transport {
    send_key: [u8; KEY_BYTES],
    receive_key: [u8; KEY_BYTES],
    /// The nonce of the next message sent.
    send_nonce: u64,
    /// The nonce of the next message received.
    receive_nonce: u64,
}

// The idle-connection budget: these hold as long as `Transport` owns no heap
// memory (a type that needs no drop cannot own any) and stays this small.
const _: () = assert!(std::mem::size_of::<Transport>() == 80);
const _: () = assert!(!std::mem::needs_drop::<Transport>());

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("send_nonce", &self.send_nonce)
            .field("receive_nonce", &self.receive_nonce)
            .finish_non_exhaustive()
    }
}

/// The 96-bit ChaCha20-Poly1305 nonce Noise uses for counter `n`.
fn noise_nonce(n: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&n.to_le_bytes());
    Nonce::from(nonce)
}

impl Transport {
    /// The transport of one side, from the handshake's split keys
    /// (`initiator_to_responder`, `responder_to_initiator`).
    pub(crate) fn from_split(
        initiator: bool,
        initiator_to_responder: [u8; KEY_BYTES],
        responder_to_initiator: [u8; KEY_BYTES],
    ) -> Transport {
        let (send_key, receive_key) = if initiator {
            (initiator_to_responder, responder_to_initiator)
        } else {
            (responder_to_initiator, initiator_to_responder)
        };
        Transport {
            send_key,
            receive_key,
            send_nonce: 0,
            receive_nonce: 0,
        }
    }

    /// Bytes [`Transport::seal`] appends for `plaintext_bytes` of plaintext.
    pub const fn sealed_len(plaintext_bytes: usize) -> usize {
        let chunks = plaintext_bytes.div_ceil(CHUNK_BYTES_MAX);
        plaintext_bytes + chunks * (LENGTH_PREFIX_BYTES + TAG_BYTES)
    }

    /// Seals `plaintext` (any length; nothing for an empty one) into
    /// transport messages of at most [`CHUNK_BYTES_MAX`] plaintext bytes each,
    /// appended to `out` with their length prefixes. Encrypts in place in
    /// `out`: no allocation beyond growing `out` (reserved once).
    ///
    /// Fails only when the 2^64 - 1 nonces of this direction would run out
    /// (then nothing is appended and the session must end).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut BytesMut) -> Result<(), NoiseError> {
        let chunks = plaintext.len().div_ceil(CHUNK_BYTES_MAX) as u64;
        // The last nonce used is `send_nonce + chunks - 1`, which must stay
        // below u64::MAX (reserved by the Noise specification).
        if self.send_nonce.checked_add(chunks).is_none() {
            return Err(NoiseError::NonceExhausted);
        }
        out.reserve(Transport::sealed_len(plaintext.len()));
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.send_key));
        for chunk in plaintext.chunks(CHUNK_BYTES_MAX) {
            let length = u16::try_from(chunk.len() + TAG_BYTES).expect("a chunk fits a message");
            out.put_u16(length);
            let start = out.len();
            out.extend_from_slice(chunk);
            let tag = cipher
                .encrypt_in_place_detached(&noise_nonce(self.send_nonce), &[], &mut out[start..])
                .expect("ChaCha20-Poly1305 seals any chunk under 256 GiB");
            out.extend_from_slice(&tag);
            self.send_nonce += 1;
        }
        Ok(())
    }

    /// Opens every complete transport message at the front of `input`,
    /// consuming it and appending its plaintext to `plaintext`; a partial
    /// message at the end stays in `input`. Returns the plaintext bytes
    /// appended. Never appends more than the consumed messages held, and
    /// reserves nothing for a message before all of it is in.
    ///
    /// A message that fails authentication (altered, replayed, reordered,
    /// cut short, or from another session) is fatal: its bytes are not
    /// appended, and the session must end. The plaintext of the messages
    /// before it in `input` has been appended and may be processed first.
    pub fn open(
        &mut self,
        input: &mut BytesMut,
        plaintext: &mut BytesMut,
    ) -> Result<usize, NoiseError> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.receive_key));
        let mut appended = 0;
        while let Some(length) = wire::message_len(input, MESSAGE_BYTES_MAX)? {
            if length <= TAG_BYTES {
                return Err(NoiseError::TransportTooShort { length });
            }
            if self.receive_nonce == u64::MAX {
                return Err(NoiseError::NonceExhausted);
            }
            let body = &input[LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + length];
            let chunk_len = length - TAG_BYTES;
            let (ciphertext, tag) = body.split_at(chunk_len);
            let start = plaintext.len();
            plaintext.extend_from_slice(ciphertext);
            let opened = cipher.decrypt_in_place_detached(
                &noise_nonce(self.receive_nonce),
                &[],
                &mut plaintext[start..],
                Tag::from_slice(tag),
            );
            if opened.is_err() {
                plaintext.truncate(start);
                return Err(NoiseError::TransportDecrypt);
            }
            self.receive_nonce += 1;
            input.advance(LENGTH_PREFIX_BYTES + length);
            appended += chunk_len;
        }
        Ok(appended)
    }

    /// The nonce (message counter) of the next message sent.
    pub fn send_nonce(&self) -> u64 {
        self.send_nonce
    }

    /// The nonce (message counter) of the next message expected.
    pub fn receive_nonce(&self) -> u64 {
        self.receive_nonce
    }

    /// Test hook: start the counters elsewhere, to reach exhaustion.
    #[cfg(test)]
    pub(crate) fn set_nonces_for_tests(&mut self, send: u64, receive: u64) {
        self.send_nonce = send;
        self.receive_nonce = receive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::keys::StaticKeypair;
    use crate::noise::wire::Pattern;

    /// A finished snow XX handshake: the initiator's and responder's
    /// handshake states, ready to split.
    fn snow_pair() -> (snow::HandshakeState, snow::HandshakeState) {
        let client = StaticKeypair::from_private([1; 32]);
        let server = StaticKeypair::from_private([2; 32]);
        let params: snow::params::NoiseParams = Pattern::Xx.noise_name().parse().unwrap();
        let prologue = Pattern::Xx.intro();
        let mut i = snow::Builder::new(params.clone())
            .local_private_key(client.private())
            .unwrap()
            .prologue(&prologue)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut r = snow::Builder::new(params)
            .local_private_key(server.private())
            .unwrap()
            .prologue(&prologue)
            .unwrap()
            .build_responder()
            .unwrap();
        let mut buf = [0u8; 1024];
        let mut scratch = [0u8; 1024];
        let n = i.write_message(&[], &mut buf).unwrap();
        r.read_message(&buf[..n], &mut scratch).unwrap();
        let n = r.write_message(&[], &mut buf).unwrap();
        i.read_message(&buf[..n], &mut scratch).unwrap();
        let n = i.write_message(&[], &mut buf).unwrap();
        r.read_message(&buf[..n], &mut scratch).unwrap();
        assert!(i.is_handshake_finished() && r.is_handshake_finished());
        (i, r)
    }

    fn ours(state: &mut snow::HandshakeState) -> Transport {
        let (k1, k2) = state.dangerously_get_raw_split();
        Transport::from_split(state.is_initiator(), k1, k2)
    }

    /// Our transport (one side) and snow's (the other side).
    fn mixed(ours_is_initiator: bool) -> (Transport, snow::TransportState) {
        let (mut i, mut r) = snow_pair();
        if ours_is_initiator {
            (ours(&mut i), r.into_transport_mode().unwrap())
        } else {
            (ours(&mut r), i.into_transport_mode().unwrap())
        }
    }

    /// Two of ours, connected.
    fn pair() -> (Transport, Transport) {
        let (mut i, mut r) = snow_pair();
        (ours(&mut i), ours(&mut r))
    }

    fn sealed(transport: &mut Transport, plaintext: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        transport.seal(plaintext, &mut out).unwrap();
        out
    }

    #[test]
    fn interoperates_with_snow_transport_both_ways() {
        for ours_is_initiator in [true, false] {
            let (mut mine, mut theirs) = mixed(ours_is_initiator);
            for round in 0..5u8 {
                let text = vec![round; 100 + usize::from(round)];
                // Ours seals, snow opens.
                let mut wire_bytes = sealed(&mut mine, &text);
                let length = wire::next_message(&mut wire_bytes, MESSAGE_BYTES_MAX)
                    .unwrap()
                    .unwrap();
                let mut out = vec![0u8; length.len()];
                let n = theirs.read_message(&length, &mut out).unwrap();
                assert_eq!(&out[..n], &text[..]);
                // Snow seals, ours opens.
                let mut message = vec![0u8; text.len() + TAG_BYTES];
                let n = theirs.write_message(&text, &mut message).unwrap();
                let mut input = BytesMut::new();
                wire::put_message(&mut input, &message[..n]);
                let mut plaintext = BytesMut::new();
                assert_eq!(mine.open(&mut input, &mut plaintext), Ok(text.len()));
                assert_eq!(&plaintext[..], &text[..]);
                assert!(input.is_empty());
            }
            assert_eq!(mine.send_nonce(), 5);
            assert_eq!(mine.receive_nonce(), 5);
        }
    }

    #[test]
    fn chunks_a_200_kib_frame_stream_across_messages() {
        let (mut client, mut server) = pair();
        // Ordinary frames (u32 length, type, body) concatenated: 200 KiB.
        let mut stream = Vec::new();
        let mut i = 0u32;
        while stream.len() < 200 * 1024 {
            let body = vec![(i % 251) as u8; 1 + (i as usize * 7919) % 30_000];
            stream.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
            stream.push(0x10);
            stream.extend_from_slice(&body);
            i += 1;
        }
        let sealed_bytes = sealed(&mut client, &stream);
        assert_eq!(sealed_bytes.len(), Transport::sealed_len(stream.len()));
        let messages = stream.len().div_ceil(CHUNK_BYTES_MAX);
        assert_eq!(messages, 4);
        assert_eq!(client.send_nonce(), messages as u64);
        // Deliver it in awkward pieces: every message is opened only once
        // complete, and the plaintext is the stream, in order.
        let mut input = BytesMut::new();
        let mut plaintext = BytesMut::new();
        for piece in sealed_bytes.chunks(4093) {
            input.extend_from_slice(piece);
            let before = plaintext.len();
            let n = server.open(&mut input, &mut plaintext).unwrap();
            assert_eq!(plaintext.len() - before, n);
            assert!(input.len() < LENGTH_PREFIX_BYTES + MESSAGE_BYTES_MAX);
        }
        assert!(input.is_empty());
        assert_eq!(&plaintext[..], &stream[..]);
        assert_eq!(server.receive_nonce(), messages as u64);
    }

    #[test]
    fn seals_full_chunks_at_the_message_limit() {
        let (mut client, mut server) = pair();
        let text = vec![5u8; CHUNK_BYTES_MAX + 1];
        let mut out = sealed(&mut client, &text);
        assert_eq!(&out[..2], &[0xff, 0xff]);
        assert_eq!(out.len(), 2 + 65535 + 2 + 1 + TAG_BYTES);
        let mut plaintext = BytesMut::new();
        assert_eq!(server.open(&mut out, &mut plaintext), Ok(text.len()));
        // Nothing at all for an empty plaintext.
        assert!(sealed(&mut client, &[]).is_empty());
        assert_eq!(client.send_nonce(), 2);
    }

    #[test]
    fn opens_several_messages_in_one_call_in_both_directions() {
        let (mut client, mut server) = pair();
        let mut input = sealed(&mut client, b"one");
        input.extend_from_slice(&sealed(&mut client, b"two"));
        input.extend_from_slice(&sealed(&mut client, b"three")[..5]);
        let mut plaintext = BytesMut::new();
        assert_eq!(server.open(&mut input, &mut plaintext), Ok(6));
        assert_eq!(&plaintext[..], b"onetwo");
        assert_eq!(input.len(), 5, "the partial third message waits");
        let mut back = sealed(&mut server, b"reply");
        let mut got = BytesMut::new();
        assert_eq!(client.open(&mut back, &mut got), Ok(5));
        assert_eq!(&got[..], b"reply");
    }

    #[test]
    fn rejects_altered_message() {
        // Flip each byte past the prefix in turn, each time in a fresh
        // session with the same keys: every one fails, appends nothing and
        // does not advance the counter.
        let (mut i, _r) = snow_pair();
        let (k1, k2) = i.dangerously_get_raw_split();
        let good = sealed(&mut Transport::from_split(true, k1, k2), b"flip me");
        assert_eq!(good.len(), 2 + 7 + TAG_BYTES);
        for index in LENGTH_PREFIX_BYTES..good.len() {
            let mut server = Transport::from_split(false, k1, k2);
            let mut altered = good.clone();
            altered[index] ^= 0x01;
            let mut plaintext = BytesMut::new();
            assert_eq!(
                server.open(&mut altered, &mut plaintext),
                Err(NoiseError::TransportDecrypt),
                "byte {index}"
            );
            assert!(plaintext.is_empty(), "nothing of a bad message is appended");
            assert_eq!(server.receive_nonce(), 0, "a failure does not advance");
        }
        let mut server = Transport::from_split(false, k1, k2);
        let mut plaintext = BytesMut::new();
        assert_eq!(server.open(&mut good.clone(), &mut plaintext), Ok(7));
    }

    #[test]
    fn rejects_message_from_another_session() {
        let (mut client, _) = pair();
        let (_, mut other_server) = pair();
        let mut input = sealed(&mut client, b"not yours");
        let mut plaintext = BytesMut::new();
        assert_eq!(
            other_server.open(&mut input, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
    }

    #[test]
    fn rejects_replayed_message() {
        let (mut client, mut server) = pair();
        let first = sealed(&mut client, b"pay 10");
        let mut input = first.clone();
        let mut plaintext = BytesMut::new();
        assert_eq!(server.open(&mut input, &mut plaintext), Ok(6));
        let mut replay = first.clone();
        assert_eq!(
            server.open(&mut replay, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
        assert_eq!(&plaintext[..], b"pay 10");
    }

    #[test]
    fn rejects_reordered_messages() {
        // The second message first: a skipped message is never accepted.
        let (mut client, mut server) = pair();
        let _skipped = sealed(&mut client, b"first");
        let mut second = sealed(&mut client, b"second");
        let mut plaintext = BytesMut::new();
        assert_eq!(
            server.open(&mut second, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
        // Swapped within one read: the first to arrive fails.
        let (mut client, mut server) = pair();
        let first = sealed(&mut client, b"first");
        let mut input = sealed(&mut client, b"second");
        input.extend_from_slice(&first);
        assert_eq!(
            server.open(&mut input, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
    }

    #[test]
    fn rejects_truncated_message() {
        let (mut client, mut server) = pair();
        let good = sealed(&mut client, b"truncate me");
        // Cut short but with its prefix rewritten to match: fails the tag.
        let body = &good[2..good.len() - 1];
        let mut input = BytesMut::new();
        wire::put_message(&mut input, body);
        let mut plaintext = BytesMut::new();
        assert_eq!(
            server.open(&mut input, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
        // Cut short without rewriting: simply incomplete, nothing consumed.
        let (mut client, mut server) = pair();
        let good = sealed(&mut client, b"truncate me");
        let mut input = BytesMut::from(&good[..good.len() - 1]);
        assert_eq!(server.open(&mut input, &mut plaintext), Ok(0));
        assert_eq!(input.len(), good.len() - 1);
        // A message too short to hold a tag and a byte.
        let mut input = BytesMut::from(&[0u8, 16][..]);
        input.extend_from_slice(&[0; 16]);
        assert_eq!(
            server.open(&mut input, &mut plaintext),
            Err(NoiseError::TransportTooShort { length: 16 })
        );
        let mut input = BytesMut::from(&[0u8, 0][..]);
        assert_eq!(
            server.open(&mut input, &mut plaintext),
            Err(NoiseError::EmptyMessage)
        );
    }

    #[test]
    fn rejects_message_sealed_for_the_other_direction() {
        let (mut client, _server) = pair();
        // A client's message reflected back to the client.
        let mut reflected = sealed(&mut client, b"echo");
        let mut plaintext = BytesMut::new();
        assert_eq!(
            client.open(&mut reflected, &mut plaintext),
            Err(NoiseError::TransportDecrypt)
        );
    }

    #[test]
    fn refuses_to_reuse_the_last_nonce() {
        let (mut client, mut server) = pair();
        client.set_nonces_for_tests(u64::MAX - 1, 0);
        server.set_nonces_for_tests(0, u64::MAX - 1);
        let mut input = sealed(&mut client, b"last");
        let mut plaintext = BytesMut::new();
        assert_eq!(server.open(&mut input, &mut plaintext), Ok(4));
        let mut out = BytesMut::new();
        assert_eq!(
            client.seal(b"one more", &mut out),
            Err(NoiseError::NonceExhausted)
        );
        assert!(out.is_empty());
        let mut forged = BytesMut::from(&[0u8, 17][..]);
        forged.extend_from_slice(&[0; 17]);
        assert_eq!(
            server.open(&mut forged, &mut plaintext),
            Err(NoiseError::NonceExhausted)
        );
    }

    #[test]
    fn idle_transport_is_80_bytes_with_no_heap() {
        // Ours: two keys and two counters inline.
        assert_eq!(std::mem::size_of::<Transport>(), 80);
        assert!(!std::mem::needs_drop::<Transport>());
        // For the record, snow's TransportState is larger inline and keeps
        // each direction's cipher in a 32-byte heap block.
        assert!(std::mem::size_of::<snow::TransportState>() > 80);
    }
}
