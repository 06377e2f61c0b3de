//! Media grants: short-lived tokens a shard signs for a device over its chat
//! connection and the media service checks on each HTTP request, so media
//! needs no second login.
//!
//! A token is `base64url` (no padding) of
//! `version (1) | kind (1) | user (8, BE) | device (4, BE) | expires_at_ms
//! (8, BE) | subject | HMAC-SHA256 (32)`, where `subject` is the largest
//! upload size (8, BE) for an upload grant and the blob id (32) for a
//! download grant, and the HMAC covers every byte before it under the
//! server's media key (`media.key` in the data directory, 32 random bytes,
//! 0600). Clients treat tokens as opaque strings.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key file in the data directory.
pub const KEY_FILE: &str = "media.key";
const VERSION: u8 = 1;
const KIND_UPLOAD: u8 = 1;
const KIND_DOWNLOAD: u8 = 2;
const HEADER_BYTES: usize = 1 + 1 + 8 + 4 + 8;
const MAC_BYTES: usize = 32;
/// Longest token text accepted (a download token, the longer kind).
pub const TOKEN_CHARS_MAX: usize = (HEADER_BYTES + 32 + MAC_BYTES).div_ceil(3) * 4;

/// The server's media signing key.
#[derive(Clone)]
pub struct MediaKey([u8; 32]);

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(..)")
    }
}

impl MediaKey {
    pub fn from_bytes(bytes: [u8; 32]) -> MediaKey {
        MediaKey(bytes)
    }

    /// Loads the key from the data directory, or makes one (0600).
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<MediaKey> {
        let path = data_dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice())
                .map(MediaKey)
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{KEY_FILE} must hold exactly 32 bytes"),
                    )
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use rand::RngCore;
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(MediaKey(key))
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Upload one blob of at most this many bytes.
    Upload { size_max: u64 },
    /// Download the blob with this id (the SHA-256 of its ciphertext).
    Download { blob: [u8; 32] },
}

/// A grant: who it was given to, until when, for what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub user: u64,
    pub device: u32,
    pub expires_at_ms: u64,
    pub subject: Subject,
}

/// Why a token is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a media token")]
    Malformed,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
}

impl Grant {
    /// The token text for this grant.
    pub fn sign(&self, key: &MediaKey) -> String {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + 32 + MAC_BYTES);
        bytes.push(VERSION);
        bytes.push(match self.subject {
            Subject::Upload { .. } => KIND_UPLOAD,
            Subject::Download { .. } => KIND_DOWNLOAD,
        });
        bytes.extend_from_slice(&self.user.to_be_bytes());
        bytes.extend_from_slice(&self.device.to_be_bytes());
        bytes.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        match &self.subject {
            Subject::Upload { size_max } => bytes.extend_from_slice(&size_max.to_be_bytes()),
            Subject::Download { blob } => bytes.extend_from_slice(blob),
        }
        let mut mac = key.mac();
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Checks `token`'s signature and expiry against `now_ms` (Unix ms).
    pub fn verify(key: &MediaKey, token: &str, now_ms: u64) -> Result<Grant, TokenError> {
        if token.len() > TOKEN_CHARS_MAX {
            return Err(TokenError::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() < HEADER_BYTES + MAC_BYTES || bytes[0] != VERSION {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = bytes.split_at(bytes.len() - MAC_BYTES);
        let subject_bytes = &signed[HEADER_BYTES..];
        let subject = match (signed[1], subject_bytes.len()) {
            (KIND_UPLOAD, 8) => Subject::Upload {
                size_max: u64::from_be_bytes(subject_bytes.try_into().expect("8 bytes")),
            },
            (KIND_DOWNLOAD, 32) => Subject::Download {
                blob: subject_bytes.try_into().expect("32 bytes"),
            },
            _ => return Err(TokenError::Malformed),
        };
        let mut mac = key.mac();
        mac.update(signed);
        // verify_slice compares in constant time.
        mac.verify_slice(tag)
            .map_err(|_| TokenError::BadSignature)?;
        let grant = Grant {
            user: u64::from_be_bytes(signed[2..10].try_into().expect("8 bytes")),
            device: u32::from_be_bytes(signed[10..14].try_into().expect("4 bytes")),
            expires_at_ms: u64::from_be_bytes(signed[14..22].try_into().expect("8 bytes")),
            subject,
        };
        if now_ms >= grant.expires_at_ms {
            return Err(TokenError::Expired);
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> MediaKey {
        MediaKey::from_bytes([byte; 32])
    }

    #[test]
    fn a_signed_grant_verifies_until_it_expires() {
        for subject in [
            Subject::Upload { size_max: 1 << 20 },
            Subject::Download { blob: [7; 32] },
        ] {
            let grant = Grant {
                user: 42,
                device: 3,
                expires_at_ms: 10_000,
                subject,
            };
            let token = grant.sign(&key(1));
            assert!(token.len() <= TOKEN_CHARS_MAX);
            assert_eq!(Grant::verify(&key(1), &token, 9_999), Ok(grant));
            assert_eq!(
                Grant::verify(&key(1), &token, 10_000),
                Err(TokenError::Expired)
            );
            assert_eq!(
                Grant::verify(&key(2), &token, 0),
                Err(TokenError::BadSignature)
            );
        }
    }

    #[test]
    fn an_altered_or_foreign_token_is_refused() {
        let grant = Grant {
            user: 1,
            device: 1,
            expires_at_ms: u64::MAX,
            subject: Subject::Upload { size_max: 10 },
        };
        let token = grant.sign(&key(1));
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        // A larger size under the old signature.
        bytes[HEADER_BYTES + 7] = 0xff;
        let forged = URL_SAFE_NO_PAD.encode(&bytes);
        assert_eq!(
            Grant::verify(&key(1), &forged, 0),
            Err(TokenError::BadSignature)
        );
        for bad in ["", "not base64!", "AAAA", &"A".repeat(TOKEN_CHARS_MAX + 1)] {
            assert_eq!(Grant::verify(&key(1), bad, 0), Err(TokenError::Malformed));
        }
    }

    #[test]
    fn the_key_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = MediaKey::load_or_create(dir.path()).unwrap();
        let again = MediaKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.0, again.0);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
