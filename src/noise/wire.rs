//! The bytes around Noise messages: the 5-byte intro a Noise client opens
//! with, and the `u16` big-endian length before every Noise message.
//!
//! Both parsers are resumable: they return `Ok(None)` while bytes are missing,
//! consume nothing until a whole item is there, and check a length against
//! its limit from the 2-byte prefix alone, before the message arrives.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::NoiseError;

/// The first 4 bytes of a Noise connection. As a plaintext frame length it
/// reads 0x53424E31 (1.4 GB), far above any frame limit, so a server tells a
/// Noise client from a plaintext one by these 4 bytes.
pub const MAGIC: [u8; 4] = *b"SBN1";
/// Bytes of the intro: the magic and the pattern byte.
pub const INTRO_BYTES: usize = MAGIC.len() + 1;
/// Bytes of the length prefix before each Noise message.
pub const LENGTH_PREFIX_BYTES: usize = 2;
/// Largest Noise message (the Noise specification's limit, and all a `u16`
/// prefix can say).
pub const MESSAGE_BYTES_MAX: usize = u16::MAX as usize;

/// The handshake pattern a client asks for in its intro.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `Noise_XX_25519_ChaChaPoly_SHA256`: first contact; the server sends
    /// its static key, the client sends its own in the third message.
    Xx,
    /// `Noise_IK_25519_ChaChaPoly_SHA256`: the client already knows the
    /// server's static key and sends its own and its payload in the first
    /// message (one round trip).
    Ik,
}

impl Pattern {
    /// The intro byte naming this pattern.
    pub const fn byte(self) -> u8 {
        match self {
            Pattern::Xx => b'X',
            Pattern::Ik => b'I',
        }
    }

    pub const fn from_byte(byte: u8) -> Option<Pattern> {
        match byte {
            b'X' => Some(Pattern::Xx),
            b'I' => Some(Pattern::Ik),
            _ => None,
        }
    }

    /// The full Noise protocol name.
    pub const fn noise_name(self) -> &'static str {
        match self {
            Pattern::Xx => "Noise_XX_25519_ChaChaPoly_SHA256",
            Pattern::Ik => "Noise_IK_25519_ChaChaPoly_SHA256",
        }
    }

    /// The intro bytes, which are also the handshake's Noise prologue.
    pub const fn intro(self) -> [u8; INTRO_BYTES] {
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], self.byte()]
    }
}

/// The 5 bytes a Noise client opens with: `"SBN1"` and a pattern byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intro;

impl Intro {
    /// Parses the intro at the front of `buf`.
    ///
    /// Returns `Ok(None)` when more bytes are needed, the pattern and the
    /// number of bytes the intro took (always [`INTRO_BYTES`]) when it is
    /// complete, [`NoiseError::BadMagic`] as soon as the bytes so far differ
    /// from `"SBN1"` (a plaintext client, or garbage), and
    /// [`NoiseError::UnknownPattern`] for a pattern byte other than `X`/`I`.
    pub fn parse(buf: &[u8]) -> Result<Option<(Pattern, usize)>, NoiseError> {
        let magic_seen = buf.len().min(MAGIC.len());
        if buf[..magic_seen] != MAGIC[..magic_seen] {
            return Err(NoiseError::BadMagic);
        }
        let Some(&byte) = buf.get(MAGIC.len()) else {
            return Ok(None);
        };
        let pattern = Pattern::from_byte(byte).ok_or(NoiseError::UnknownPattern(byte))?;
        Ok(Some((pattern, INTRO_BYTES)))
    }
}

/// The body length of the Noise message at the front of `buf`, once the
/// whole message is there.
///
/// Returns `Ok(None)` when more bytes are needed, [`NoiseError::EmptyMessage`]
/// for a length of 0 and [`NoiseError::MessageTooLarge`] for a length above
/// `limit`, both as soon as the 2-byte prefix is in.
pub fn message_len(buf: &[u8], limit: usize) -> Result<Option<usize>, NoiseError> {
    assert!(limit <= MESSAGE_BYTES_MAX, "limit above the u16 prefix");
    let [high, low, ..] = *buf else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    if length == 0 {
        return Err(NoiseError::EmptyMessage);
    }
    if length > limit {
        return Err(NoiseError::MessageTooLarge { length, limit });
    }
    if buf.len() < LENGTH_PREFIX_BYTES + length {
        return Ok(None);
    }
    Ok(Some(length))
}

/// Takes the Noise message at the front of `buf` (prefix stripped); the
/// result shares `buf`'s allocation. Nothing is consumed or reserved until
/// the whole message is there. Errors as [`message_len`].
pub fn next_message(buf: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, NoiseError> {
    let Some(length) = message_len(buf, limit)? else {
        return Ok(None);
    };
    buf.advance(LENGTH_PREFIX_BYTES);
    Ok(Some(buf.split_to(length).freeze()))
}

/// Bytes still needed before the message at the front of `buf` is complete
/// (0 when one is, or when its prefix is invalid). Lets a reader size its
/// next read.
pub fn bytes_wanted(buf: &[u8]) -> usize {
    let [high, low, ..] = *buf else {
        return LENGTH_PREFIX_BYTES - buf.len();
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    (LENGTH_PREFIX_BYTES + length).saturating_sub(buf.len())
}

/// Appends `body` with its length prefix. The caller guarantees the length
/// is 1..=65535 (our own messages always are).
pub fn put_message(out: &mut impl BufMut, body: &[u8]) {
    let length = u16::try_from(body.len()).expect("a Noise message fits a u16 length");
    assert!(length > 0, "a Noise message is never empty");
    out.put_u16(length);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_intros() {
        assert_eq!(Intro::parse(b"SBN1X"), Ok(Some((Pattern::Xx, 5))));
        assert_eq!(Intro::parse(b"SBN1I\x00\x20"), Ok(Some((Pattern::Ik, 5))));
        assert_eq!(Pattern::Xx.intro(), *b"SBN1X");
        assert_eq!(Pattern::Ik.intro(), [0x53, 0x42, 0x4e, 0x31, 0x49]);
    }

    #[test]
    fn intro_needs_more_bytes_until_the_pattern_byte() {
        for n in 0..INTRO_BYTES {
            assert_eq!(Intro::parse(&b"SBN1X"[..n]), Ok(None), "{n} bytes");
        }
    }

    #[test]
    fn rejects_plaintext_frame_as_bad_magic() {
        // A plaintext Hello frame: u32 length then type 0x03.
        assert_eq!(Intro::parse(&[0, 0, 0, 9, 3]), Err(NoiseError::BadMagic));
        // Told as soon as the first differing byte is in.
        assert_eq!(Intro::parse(&[0]), Err(NoiseError::BadMagic));
        assert_eq!(Intro::parse(b"SBN2"), Err(NoiseError::BadMagic));
        // As a frame length the magic is far above any frame limit.
        assert_eq!(u32::from_be_bytes(MAGIC), 0x5342_4e31);
    }

    #[test]
    fn rejects_unknown_pattern() {
        assert_eq!(
            Intro::parse(b"SBN1N"),
            Err(NoiseError::UnknownPattern(b'N'))
        );
        assert_eq!(
            Intro::parse(b"SBN1x"),
            Err(NoiseError::UnknownPattern(b'x'))
        );
    }

    #[test]
    fn splits_messages_and_waits_for_partial_ones() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[0, 3, 1, 2, 3, 0, 2, 9]);
        assert_eq!(
            next_message(&mut buf, 10),
            Ok(Some(Bytes::from_static(&[1, 2, 3])))
        );
        // The second message is missing a byte: nothing consumed.
        assert_eq!(next_message(&mut buf, 10), Ok(None));
        assert_eq!(&buf[..], &[0, 2, 9]);
        assert_eq!(bytes_wanted(&buf), 1);
        buf.put_u8(8);
        assert_eq!(
            next_message(&mut buf, 10),
            Ok(Some(Bytes::from_static(&[9, 8])))
        );
        assert!(buf.is_empty());
        assert_eq!(next_message(&mut buf, 10), Ok(None));
        assert_eq!(bytes_wanted(&buf), 2);
    }

    #[test]
    fn rejects_zero_length_message() {
        let mut buf = BytesMut::from(&[0u8, 0, 7][..]);
        assert_eq!(next_message(&mut buf, 10), Err(NoiseError::EmptyMessage));
    }

    #[test]
    fn rejects_oversized_message_from_its_prefix_alone() {
        // Only the prefix has arrived; the limit is checked before waiting
        // for (or reserving room for) the body.
        let mut buf = BytesMut::from(&[0xff_u8, 0xff][..]);
        assert_eq!(
            next_message(&mut buf, 4096),
            Err(NoiseError::MessageTooLarge {
                length: 65535,
                limit: 4096
            })
        );
        assert_eq!(buf.capacity(), 2);
        // At the u16 limit itself a full-size message is fine.
        let mut big = BytesMut::with_capacity(2 + MESSAGE_BYTES_MAX);
        put_message(&mut big, &[7; MESSAGE_BYTES_MAX]);
        let message = next_message(&mut big, MESSAGE_BYTES_MAX).unwrap().unwrap();
        assert_eq!(message.len(), MESSAGE_BYTES_MAX);
    }

    #[test]
    fn message_len_is_the_limit_inclusive() {
        assert_eq!(message_len(&[0, 2, 1, 1], 2), Ok(Some(2)));
        assert_eq!(
            message_len(&[0, 3, 1, 1, 1], 2),
            Err(NoiseError::MessageTooLarge {
                length: 3,
                limit: 2
            })
        );
        assert_eq!(message_len(&[0], 2), Ok(None));
    }
}
