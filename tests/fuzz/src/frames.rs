//! The `frame_decoder` target: arbitrary bytes through the deframer and
//! decoder of `switchboard::proto`, in arbitrary chunks.
//!
//! Input layout (all of it is fuzzer-controlled):
//!
//! ```text
//! offset size field
//!      0    4 frame_bytes_max, u32 big-endian: the limit given to the decoder
//!      4    1 chunk count k
//!      5    k chunk lengths, one byte each (0 is an empty read)
//!    5+k    - the byte stream; what the k chunks do not cover arrives last
//! ```
//!
//! Invariants checked (from the `proto` module docs and `docs/protocol.md`):
//! - decoding never panics, whatever the bytes, limit and chunking;
//! - a frame is returned only whole, and never one whose length prefix
//!   exceeds the limit; `FrameTooLarge` names the prefix and the limit;
//! - the result does not depend on how the bytes were chunked: one read of
//!   everything yields the same frames and the same first error;
//! - a refused prefix consumes nothing; "need more" consumes nothing and
//!   `bytes_wanted` then asks for at least one more byte, exactly up to the
//!   end of the frame once its prefix is there;
//! - a decoded frame re-encodes to `wire_len()` bytes that decode to the
//!   same frame, and encoding that again gives the same bytes.

use bytes::BytesMut;
use switchboard::proto::{
    bytes_wanted, next_frame, split_frame, DecodeError, Frame, HEADER_BYTES, LENGTH_PREFIX_BYTES,
};

/// The parts of one fuzz input.
pub struct FrameInput<'a> {
    pub frame_bytes_max: u32,
    pub chunk_lengths: &'a [u8],
    pub stream: &'a [u8],
}

impl<'a> FrameInput<'a> {
    /// Splits raw fuzzer bytes; `None` if too short to hold the fixed fields.
    pub fn parse(data: &'a [u8]) -> Option<FrameInput<'a>> {
        let limit: [u8; 4] = data.get(0..4)?.try_into().ok()?;
        let count = *data.get(4)? as usize;
        let chunk_lengths = data.get(5..5 + count)?;
        Some(FrameInput {
            frame_bytes_max: u32::from_be_bytes(limit),
            chunk_lengths,
            stream: &data[5 + count..],
        })
    }

    /// The inverse of `parse`, for the seed generator.
    pub fn to_bytes(&self) -> Vec<u8> {
        assert!(self.chunk_lengths.len() <= u8::MAX as usize);
        let mut out = Vec::with_capacity(5 + self.chunk_lengths.len() + self.stream.len());
        out.extend_from_slice(&self.frame_bytes_max.to_be_bytes());
        out.push(self.chunk_lengths.len() as u8);
        out.extend_from_slice(self.chunk_lengths);
        out.extend_from_slice(self.stream);
        out
    }
}

/// What a whole stream decoded to: frames with the bytes each consumed,
/// then how it stopped (`None`: waiting for more bytes).
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<(usize, Frame)>,
    error: Option<DecodeError>,
    left_over_bytes: usize,
}

/// Runs one fuzz input; panics when an invariant does not hold.
pub fn check(data: &[u8]) {
    let Some(input) = FrameInput::parse(data) else {
        return;
    };
    let limit = input.frame_bytes_max;

    // The whole stream in one read, through `next_frame`.
    let mut buf = BytesMut::from(input.stream);
    let mut whole = Decoded {
        frames: Vec::new(),
        error: None,
        left_over_bytes: 0,
    };
    loop {
        let before = buf.len();
        match next_frame(&mut buf, limit) {
            Ok(Some(frame)) => whole.frames.push((before - buf.len(), frame)),
            Ok(None) => {
                assert_eq!(buf.len(), before, "waiting consumed bytes");
                break;
            }
            Err(error) => {
                whole.error = Some(error);
                break;
            }
        }
    }
    whole.left_over_bytes = buf.len();

    // The same stream in the input's chunks, through `split_frame` and
    // `Frame::decode`, checking the deframer's contract at every step.
    let mut chunks = Vec::new();
    let mut rest = input.stream;
    for &length in input.chunk_lengths {
        let (chunk, after) = rest.split_at((length as usize).min(rest.len()));
        chunks.push(chunk);
        rest = after;
    }
    chunks.push(rest);
    let mut buf = BytesMut::new();
    let mut chunked = Decoded {
        frames: Vec::new(),
        error: None,
        left_over_bytes: 0,
    };
    'read: for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match split_frame(&mut buf, limit) {
                Ok(Some((frame_type, body))) => {
                    let consumed = before.len() - buf.len();
                    assert_eq!(
                        consumed,
                        HEADER_BYTES + body.len(),
                        "frame is prefix and body"
                    );
                    let length = u32::from_be_bytes([before[0], before[1], before[2], before[3]]);
                    assert_eq!(length as usize, consumed - LENGTH_PREFIX_BYTES);
                    assert!(
                        length <= limit,
                        "frame of {length} bytes over limit {limit}"
                    );
                    assert_eq!(before[4], frame_type as u8, "type byte");
                    assert_eq!(&before[HEADER_BYTES..consumed], &body[..], "body bytes");
                    match Frame::decode(frame_type, body) {
                        Ok(frame) => {
                            assert_eq!(frame.frame_type(), frame_type);
                            check_round_trip(&frame);
                            chunked.frames.push((consumed, frame));
                        }
                        Err(error) => {
                            assert_eq!(error, DecodeError::Malformed(frame_type));
                            chunked.error = Some(error);
                            break 'read;
                        }
                    }
                }
                Ok(None) => {
                    assert_eq!(buf, before, "waiting consumed bytes");
                    let wanted = bytes_wanted(&buf);
                    assert!(wanted > 0, "waiting, yet no byte wanted");
                    if buf.len() >= LENGTH_PREFIX_BYTES {
                        let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        assert_eq!(
                            buf.len() + wanted,
                            LENGTH_PREFIX_BYTES + length as usize,
                            "bytes_wanted reaches the end of the frame"
                        );
                    }
                    break;
                }
                Err(error) => {
                    assert_eq!(buf, before, "a refused prefix consumed bytes");
                    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    match error {
                        DecodeError::FrameTooLarge {
                            length: reported,
                            limit: reported_limit,
                        } => {
                            assert_eq!((reported, reported_limit), (length, limit));
                            assert!(length > limit);
                        }
                        DecodeError::EmptyFrame => assert_eq!(length, 0),
                        DecodeError::UnknownType(byte) => assert_eq!(byte, buf[4]),
                        DecodeError::Malformed(_) => panic!("split_frame does not parse bodies"),
                    }
                    chunked.error = Some(error);
                    break 'read;
                }
            }
        }
    }
    chunked.left_over_bytes = if chunked.error.is_some() {
        // `next_frame` consumed the malformed frame before failing; only
        // the frames and the error itself are compared.
        whole.left_over_bytes
    } else {
        buf.len()
    };
    assert_eq!(whole, chunked, "the result depends on the chunking");
}

/// A decoded frame re-encodes to bytes that decode to the same frame.
fn check_round_trip(frame: &Frame) {
    let encoded = frame.to_bytes();
    assert_eq!(encoded.len(), frame.wire_len(), "wire_len of {frame:?}");
    let mut buf = BytesMut::from(&encoded[..]);
    let again = next_frame(&mut buf, u32::MAX)
        .unwrap_or_else(|e| panic!("re-encoded {frame:?} does not decode: {e}"))
        .unwrap_or_else(|| panic!("re-encoded {frame:?} is incomplete"));
    assert!(buf.is_empty(), "re-encoded frame left bytes over");
    assert_eq!(&again, frame, "round trip changed the frame");
    assert_eq!(again.to_bytes(), encoded, "encoding is not stable");
}
