//! The HTTP/1.1 side of a WebSocket connection (RFC 6455 §4.2), sans-IO:
//! the bytes of a request head in, the answer's bytes out.
//!
//! A browser opens a WebSocket with a `GET` carrying `Upgrade: websocket`,
//! `Connection: Upgrade`, `Sec-WebSocket-Version: 13` and a
//! `Sec-WebSocket-Key`; the answer is `101 Switching Protocols` with the
//! key's `Sec-WebSocket-Accept`. Anything else is answered with a 4xx and
//! closed: a plain HTTP request gets `426 Upgrade Required`.
//!
//! No extension is ever accepted (`permessage-deflate` included: the bytes
//! are Noise ciphertext, which does not compress, and a compressor costs
//! tens of kilobytes per connection), nor a subprotocol: the answer names
//! none, so a browser that asked for one closes the connection itself.

use base64::Engine as _;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest request head read, bytes; a longer one is answered 431. A
/// browser's upgrade request is well under 2 KiB.
pub const HEAD_BYTES_MAX: usize = 8 << 10;

/// Most header lines parsed; more are answered 431.
const HEADERS_MAX: usize = 32;

/// What to do with the bytes of a request head read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The head is not complete: read more (unless `HEAD_BYTES_MAX` bytes
    /// are already in, which [`answer`] reports as a refusal itself).
    Incomplete,
    /// A WebSocket upgrade: write `response`; the WebSocket stream begins
    /// after the head's `head_bytes` bytes (anything past them is already
    /// WebSocket frames).
    Upgrade {
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the request head.
        head_bytes: usize,
    },
    /// Not an upgrade this server accepts: write `response` and close.
    Refuse {
        /// The status sent (400, 405, 426 or 431).
        status: u16,
        /// The full response, with a one-line plain text body.
        response: Vec<u8>,
    },
}

/// Answers the request head at the front of `buf`.
pub fn answer(buf: &[u8]) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let head_bytes = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => return Answer::Incomplete,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                431,
                "Request Header Fields Too Large",
                "",
                "request head too large",
            )
        }
        Err(_) => return refuse(400, "Bad Request", "", "malformed HTTP request"),
    };
    if head_bytes > HEAD_BYTES_MAX {
        return refuse(
            431,
            "Request Header Fields Too Large",
            "",
            "request head too large",
        );
    }
    if request.method != Some("GET") {
        return refuse(
            405,
            "Method Not Allowed",
            "Allow: GET\r\n",
            "a WebSocket upgrade is a GET",
        );
    }
    if request.version != Some(1) {
        return refuse(400, "Bad Request", "", "a WebSocket upgrade needs HTTP/1.1");
    }
    let headers: &[httparse::Header<'_>] = request.headers;
    let has_token = |name: &str, token: &str| {
        header_values(headers, name).any(|value| {
            std::str::from_utf8(value).is_ok_and(|value| {
                value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    let upgrade_required = "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n";
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refuse(
            426,
            "Upgrade Required",
            upgrade_required,
            "this port speaks WebSocket only (wss://), carrying the Noise stream",
        );
    }
    if !header_values(headers, "sec-websocket-version").any(|v| v == b"13") {
        return refuse(
            426,
            "Upgrade Required",
            upgrade_required,
            "unsupported WebSocket version: 13 only",
        );
    }
    let mut keys = header_values(headers, "sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) if is_valid_key(key) => key,
        _ => {
            return refuse(
                400,
                "Bad Request",
                "",
                "missing or malformed Sec-WebSocket-Key",
            )
        }
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key)
    );
    Answer::Upgrade {
        response: response.into_bytes(),
        head_bytes,
    }
}

/// The values of every header line named `name` (case-insensitive).
fn header_values<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &'h str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// A `Sec-WebSocket-Key` is the base64 of 16 bytes (RFC 6455 §4.1).
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|raw| raw.len() == 16)
}

fn refuse(status: u16, reason: &str, extra_headers: &str, body: &str) -> Answer {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{extra_headers}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    );
    Answer::Refuse {
        status,
        response: response.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §1.3's example key and its accept value.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn status(answer: &Answer) -> u16 {
        match answer {
            Answer::Refuse { status, .. } => *status,
            Answer::Upgrade { .. } => 101,
            Answer::Incomplete => 0,
        }
    }

    #[test]
    fn upgrades_a_browser_request_with_the_rfc_accept_key_and_no_extension() {
        let request = upgrade_request(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        );
        let mut bytes = request.clone().into_bytes();
        bytes.extend_from_slice(&[0x82, 0x85]);
        match answer(&bytes) {
            Answer::Upgrade {
                response,
                head_bytes,
            } => {
                assert_eq!(head_bytes, request.len());
                let response = String::from_utf8(response).unwrap();
                assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
                assert!(response.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")));
                assert!(!response.to_ascii_lowercase().contains("extensions"));
                assert!(!response.to_ascii_lowercase().contains("protocol:"));
            }
            other => panic!("expected an upgrade, got {other:?}"),
        }
    }

    #[test]
    fn waits_for_the_rest_of_a_head() {
        let request = upgrade_request("");
        for cut in [0, 1, 10, request.len() - 1] {
            assert_eq!(
                answer(&request.as_bytes()[..cut]),
                Answer::Incomplete,
                "{cut}"
            );
        }
    }

    #[test]
    fn answers_a_plain_request_with_426() {
        let answer = answer(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status(&answer), 426);
        let Answer::Refuse { response, .. } = answer else {
            unreachable!()
        };
        let response = String::from_utf8(response).unwrap();
        assert!(response.contains("Upgrade: websocket\r\n"), "{response}");
        assert!(response.contains("Connection: close\r\n"), "{response}");
    }

    #[test]
    fn refuses_other_methods_versions_and_keys() {
        let post = upgrade_request("").replacen("GET", "POST", 1);
        assert_eq!(status(&answer(post.as_bytes())), 405);
        let http10 = upgrade_request("").replacen("HTTP/1.1", "HTTP/1.0", 1);
        assert_eq!(status(&answer(http10.as_bytes())), 400);
        let version = upgrade_request("").replace("Version: 13", "Version: 8");
        assert_eq!(status(&answer(version.as_bytes())), 426);
        let short_key = upgrade_request("").replace(KEY, "c2hvcnQ=");
        assert_eq!(status(&answer(short_key.as_bytes())), 400);
        let two_keys = upgrade_request(&format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert_eq!(status(&answer(two_keys.as_bytes())), 400);
        assert_eq!(status(&answer(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")), 400);
    }

    #[test]
    fn refuses_an_oversized_head_once_the_bound_is_reached() {
        let mut head = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
        head.resize(HEAD_BYTES_MAX - 1, b'a');
        assert_eq!(answer(&head), Answer::Incomplete);
        head.push(b'a');
        assert_eq!(status(&answer(&head)), 431);
        let many: String = (0..HEADERS_MAX + 1)
            .map(|i| format!("X-{i}: y\r\n"))
            .collect();
        assert_eq!(status(&answer(upgrade_request(&many).as_bytes())), 431);
    }
}
