//! The `Range` request header of a blob download (RFC 9110 §14), reduced
//! to what a media client needs: one byte range. Pure: no I/O.
//!
//! A header this service does not serve as a range (a multi-range, another
//! unit, anything unparsable) is ignored and the whole blob is sent, as the
//! RFC allows; only a well-formed single range outside the blob is
//! refused (416).

/// What to send for a download of a blob of `size_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole blob, 200.
    Full,
    /// Bytes `first..=last`, 206.
    Partial { first: u64, last: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Resolves a `Range` header value against a blob of `size_bytes`.
pub fn resolve(header: Option<&[u8]>, size_bytes: u64) -> RangeAnswer {
    let Some(header) = header else {
        return RangeAnswer::Full;
    };
    let Ok(text) = std::str::from_utf8(header) else {
        return RangeAnswer::Full;
    };
    let Some((unit, spec)) = text.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (number(first), number(last)) {
        // bytes=-n: the last n bytes.
        (None, Some(suffix)) if first.is_empty() => {
            if suffix == 0 || size_bytes == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    first: size_bytes.saturating_sub(suffix),
                    last: size_bytes - 1,
                }
            }
        }
        // bytes=a-: from a to the end.
        (Some(first), None) if last.is_empty() => {
            if first >= size_bytes {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    first,
                    last: size_bytes - 1,
                }
            }
        }
        // bytes=a-b; b past the end means the end.
        (Some(first), Some(last)) if first <= last => {
            if first >= size_bytes {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    first,
                    last: last.min(size_bytes - 1),
                }
            }
        }
        _ => RangeAnswer::Full,
    }
}

/// Decimal digits only (no sign, no spaces inside), without overflow.
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(header: &str, size: u64) -> RangeAnswer {
        resolve(Some(header.as_bytes()), size)
    }

    #[test]
    fn serves_the_three_single_range_forms() {
        assert_eq!(
            answer("bytes=2-5", 10),
            RangeAnswer::Partial { first: 2, last: 5 }
        );
        assert_eq!(
            answer("bytes=7-", 10),
            RangeAnswer::Partial { first: 7, last: 9 }
        );
        assert_eq!(
            answer("bytes=-3", 10),
            RangeAnswer::Partial { first: 7, last: 9 }
        );
        assert_eq!(
            answer(" Bytes = 0 - 0 ", 10),
            RangeAnswer::Partial { first: 0, last: 0 }
        );
    }

    #[test]
    fn clamps_a_range_that_runs_past_the_end() {
        assert_eq!(
            answer("bytes=8-100", 10),
            RangeAnswer::Partial { first: 8, last: 9 }
        );
        assert_eq!(
            answer("bytes=-100", 10),
            RangeAnswer::Partial { first: 0, last: 9 }
        );
    }

    #[test]
    fn refuses_a_range_that_starts_past_the_end() {
        assert_eq!(answer("bytes=10-", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(answer("bytes=10-20", 10), RangeAnswer::Unsatisfiable);
        assert_eq!(answer("bytes=-0", 10), RangeAnswer::Unsatisfiable);
    }

    #[test]
    fn ignores_what_it_does_not_serve() {
        for header in [
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=5-2",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=99999999999999999999999-",
            "bytes",
            "",
        ] {
            assert_eq!(answer(header, 10), RangeAnswer::Full, "{header:?}");
        }
        assert_eq!(resolve(None, 10), RangeAnswer::Full);
        assert_eq!(resolve(Some(&[0xff, 0xfe]), 10), RangeAnswer::Full);
    }
}
