//! Attachments, the client's side: a file is sealed under a fresh key
//! (ChaCha20-Poly1305), uploaded to the media service with a grant token
//! (resuming where a cut connection stopped), and announced to the
//! recipients as a small message (`FileRef`) holding the blob id, the key
//! and the name; a recipient downloads the blob with its own grant, checks
//! that its SHA-256 is the blob id, and opens it. The HTTP calls block:
//! run them off an executor's thread (`glommio::executor().spawn_blocking`).

use std::io::Read;
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::ChaCha20Poly1305;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes sent per upload request; a cut connection loses at most this.
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
/// Failures in a row (cut connections, busy or vanished uploads) before
/// an upload gives up.
const CHUNK_ATTEMPTS_MAX: u32 = 5;
/// How a message announcing a file starts (what follows is JSON).
const FILE_REF_PREFIX: &[u8] = b"SBFILE1 ";
/// Longest name kept from a FileRef.
const FILE_NAME_CHARS_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("the media service answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the media service could not be reached: {0}")]
    Transport(String),
    #[error("the media service answered something unexpected: {0}")]
    Protocol(String),
    #[error("the downloaded blob's SHA-256 is not its id")]
    HashMismatch,
    #[error("the blob does not open with the key it was sent with")]
    Decrypt,
}

/// A file sealed for upload.
pub struct Sealed {
    pub ciphertext: Vec<u8>,
    /// The fresh key it was sealed with (sent to the recipients only).
    pub key: [u8; 32],
    /// The SHA-256 of the ciphertext: the blob's id.
    pub blob_id: [u8; 32],
}

/// Seals `plaintext` under a fresh random key. The key seals this one file
/// only, so the nonce can be fixed (zero).
pub fn seal(plaintext: &[u8]) -> Sealed {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let cipher = ChaCha20Poly1305::new(&key.into());
    let ciphertext = cipher
        .encrypt(&[0u8; 12].into(), plaintext)
        .expect("sealing in memory cannot fail");
    let blob_id = Sha256::digest(&ciphertext).into();
    Sealed {
        ciphertext,
        key,
        blob_id,
    }
}

/// Opens a blob sealed by `seal`.
pub fn open(ciphertext: &[u8], key: &[u8; 32]) -> Result<Vec<u8>, MediaError> {
    ChaCha20Poly1305::new(key.into())
        .decrypt(&[0u8; 12].into(), ciphertext)
        .map_err(|_| MediaError::Decrypt)
}

/// The message that announces a file: everything a recipient needs to
/// fetch and open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The blob id, hex.
    pub blob: String,
    /// The key, hex.
    pub key: String,
    /// The ciphertext's size in bytes.
    pub size: u64,
    /// The file's name (a recipient keeps only a safe base name).
    pub name: String,
}

impl FileRef {
    pub fn new(sealed: &Sealed, name: &str) -> FileRef {
        FileRef {
            blob: hex::encode(sealed.blob_id),
            key: hex::encode(sealed.key),
            size: sealed.ciphertext.len() as u64,
            name: name.to_string(),
        }
    }

    /// The message payload.
    pub fn to_payload(&self) -> Vec<u8> {
        let mut payload = FILE_REF_PREFIX.to_vec();
        payload.extend_from_slice(&serde_json::to_vec(self).expect("a FileRef serializes"));
        payload
    }

    /// A FileRef, if `payload` is one.
    pub fn from_payload(payload: &[u8]) -> Option<FileRef> {
        let json = payload.strip_prefix(FILE_REF_PREFIX)?;
        let parsed: FileRef = serde_json::from_slice(json).ok()?;
        (parsed.blob_id().is_some() && parsed.key_bytes().is_some()).then_some(parsed)
    }

    pub fn blob_id(&self) -> Option<[u8; 32]> {
        hex::decode(&self.blob).ok()?.try_into().ok()
    }

    pub fn key_bytes(&self) -> Option<[u8; 32]> {
        hex::decode(&self.key).ok()?.try_into().ok()
    }

    /// The name to save under: the last path component, without leading
    /// dots or control characters, never empty.
    pub fn safe_name(&self) -> String {
        let base = self.name.rsplit(['/', '\\']).next().unwrap_or_default();
        let cleaned: String = base
            .chars()
            .filter(|c| !c.is_control())
            .take(FILE_NAME_CHARS_MAX)
            .collect();
        let cleaned = cleaned.trim_start_matches('.').trim().to_string();
        if cleaned.is_empty() {
            format!("{}.bin", &self.blob[..16.min(self.blob.len())])
        } else {
            cleaned
        }
    }
}

#[derive(Deserialize)]
struct UploadState {
    #[serde(default)]
    upload_id: String,
    #[serde(default)]
    offset: u64,
    complete: bool,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: String,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(60))
        .timeout_write(Duration::from_secs(60))
        .build()
}

/// A refusal as its status and error code; a transport failure as such.
fn failure(error: ureq::Error) -> MediaError {
    match error {
        ureq::Error::Status(status, response) => {
            let body = response.into_string().unwrap_or_default();
            match serde_json::from_str::<ErrorBody>(&body) {
                Ok(e) => MediaError::Refused {
                    status,
                    code: e.error,
                    message: e.message,
                },
                Err(_) => MediaError::Refused {
                    status,
                    code: String::new(),
                    message: body,
                },
            }
        }
        ureq::Error::Transport(t) => MediaError::Transport(t.to_string()),
    }
}

fn upload_offset(response: &ureq::Response) -> Result<u64, MediaError> {
    response
        .header("Upload-Offset")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| MediaError::Protocol("no Upload-Offset".into()))
}

/// Uploads `sealed` to the media service at `url` with an upload grant's
/// `token`, resuming after cut connections. Returns once the blob is
/// stored (or was stored already).
///
/// Recovery: after a transport error it asks for the offset (`HEAD`) and
/// continues from there; an upload the service no longer knows (its last
/// PATCH finished it but the answer was lost, or it expired) is declared
/// again, which answers "complete" for a stored blob; `UPLOAD_BUSY` (an
/// earlier, cut request still writing) is waited out. At most
/// `CHUNK_ATTEMPTS_MAX` failures in a row.
pub fn upload(url: &str, token: &str, sealed: &Sealed) -> Result<(), MediaError> {
    let agent = agent();
    let bearer = format!("Bearer {token}");
    let total = sealed.ciphertext.len() as u64;
    let begin = || -> Result<UploadState, MediaError> {
        let body = serde_json::json!({
            "size": total,
            "sha256": hex::encode(sealed.blob_id),
        });
        let response = agent
            .post(&format!("{url}/v1/uploads"))
            .set("Authorization", &bearer)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .map_err(failure)?;
        let text = response
            .into_string()
            .map_err(|e| MediaError::Protocol(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| MediaError::Protocol(e.to_string()))
    };
    let mut state = begin()?;
    let mut failures = 0;
    // Counts a failure in a row and waits a little longer each time; the
    // last one is returned.
    let fail = |failures: &mut u32, error: MediaError| -> Result<(), MediaError> {
        *failures += 1;
        if *failures >= CHUNK_ATTEMPTS_MAX {
            return Err(error);
        }
        std::thread::sleep(Duration::from_millis(100 << *failures));
        Ok(())
    };
    loop {
        if state.complete {
            return Ok(());
        }
        let at = format!("{url}/v1/uploads/{}", state.upload_id);
        let offset = state.offset.min(total) as usize;
        let end = (offset + UPLOAD_CHUNK_BYTES).min(sealed.ciphertext.len());
        // At `total` the chunk is empty: that retries the finish.
        let sent = agent
            .request("PATCH", &at)
            .set("Authorization", &bearer)
            .set("Content-Type", "application/offset+octet-stream")
            .set("Upload-Offset", &offset.to_string())
            .send_bytes(&sealed.ciphertext[offset..end]);
        match sent {
            Ok(response) if response.status() == 201 => return Ok(()),
            Ok(response) => {
                state.offset = upload_offset(&response)?;
                failures = 0;
            }
            // The service kept a different amount (an earlier attempt was
            // cut after its bytes arrived): continue from there.
            Err(ureq::Error::Status(409, response))
                if response.header("Upload-Offset").is_some() =>
            {
                state.offset = upload_offset(&response)?;
            }
            Err(ureq::Error::Status(404, _)) => {
                fail(
                    &mut failures,
                    MediaError::Protocol("the upload keeps disappearing".into()),
                )?;
                state = begin()?;
            }
            Err(ureq::Error::Status(status @ (409 | 503), response)) => {
                fail(
                    &mut failures,
                    failure(ureq::Error::Status(status, response)),
                )?;
                state.offset = resume_offset(&agent, &at, &bearer, state.offset);
            }
            Err(ureq::Error::Transport(t)) => {
                fail(&mut failures, MediaError::Transport(t.to_string()))?;
                state.offset = resume_offset(&agent, &at, &bearer, state.offset);
            }
            Err(e) => return Err(failure(e)),
        }
    }
}

/// How much of an upload the service holds (`HEAD`); `known` when it
/// cannot say (the next PATCH then corrects it, or finds the upload gone).
fn resume_offset(agent: &ureq::Agent, at: &str, bearer: &str, known: u64) -> u64 {
    agent
        .head(at)
        .set("Authorization", bearer)
        .call()
        .ok()
        .and_then(|response| upload_offset(&response).ok())
        .unwrap_or(known)
}

/// Downloads blob `blob_id` with a download grant's `token` and checks its
/// hash; at most `size_max` bytes are read.
pub fn download(
    url: &str,
    token: &str,
    blob_id: &[u8; 32],
    size_max: u64,
) -> Result<Vec<u8>, MediaError> {
    let response = agent()
        .get(&format!("{url}/v1/blobs/{}", hex::encode(blob_id)))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(failure)?;
    let mut body = Vec::new();
    response
        .into_reader()
        .take(size_max.saturating_add(1))
        .read_to_end(&mut body)
        .map_err(|e| MediaError::Transport(e.to_string()))?;
    if body.len() as u64 > size_max || Sha256::digest(&body).as_slice() != blob_id {
        return Err(MediaError::HashMismatch);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_file_opens_with_its_key_only() {
        let sealed = seal(b"a photo");
        assert_ne!(sealed.ciphertext, b"a photo");
        assert_eq!(
            sealed.blob_id.as_slice(),
            Sha256::digest(&sealed.ciphertext).as_slice()
        );
        assert_eq!(open(&sealed.ciphertext, &sealed.key).unwrap(), b"a photo");
        assert!(matches!(
            open(&sealed.ciphertext, &[0; 32]),
            Err(MediaError::Decrypt)
        ));
        // Two seals of one file differ: each has its own key.
        assert_ne!(seal(b"a photo").blob_id, sealed.blob_id);
    }

    #[test]
    fn a_file_ref_round_trips_and_text_is_not_one() {
        let sealed = seal(b"x");
        let r = FileRef::new(&sealed, "../../etc/passwd");
        assert_eq!(FileRef::from_payload(&r.to_payload()), Some(r.clone()));
        assert_eq!(r.safe_name(), "passwd");
        assert_eq!(FileRef::from_payload(b"hello"), None);
        assert_eq!(FileRef::from_payload(b"SBFILE1 {\"blob\":\"zz\"}"), None);
        for (name, safe) in [("..", ""), (".hidden", "hidden"), ("a\nb", "ab")] {
            let r = FileRef {
                name: name.into(),
                ..r.clone()
            };
            let expected = if safe.is_empty() {
                format!("{}.bin", &r.blob[..16])
            } else {
                safe.to_string()
            };
            assert_eq!(r.safe_name(), expected);
        }
    }
}
