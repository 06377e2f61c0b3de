//! The server's Noise static keys: made at first start, kept in the data
//! directory, rotated with an overlap.
//!
//! Files (each exactly 32 bytes, the raw X25519 private key, mode 0600):
//! - `noise.key`: the current key. XX handshakes always use it.
//! - `noise.key.previous`: present during a rotation's overlap. An IK client
//!   names the key it knows only implicitly (it encrypts to it), so the
//!   responder runs the IK first message against `current`, then against
//!   `previous`. A client that used `previous` is sent the current public key
//!   in the server payload, authenticated by the handshake with the key it
//!   already trusts, so it can re-pin; once clients have moved, the overlap
//!   ends ([`ServerKeys::end_overlap`]) and an IK to the old key fails, and
//!   the client falls back to XX.
//!
//! Cost of the overlap: an IK first message that does not decrypt under
//! `current` is tried again under `previous`, which costs one more handshake
//! setup (snow derives the static public key: an X25519 base-point
//! multiplication), one more X25519 (`es`) and a failed 48-byte AEAD check.
//! Measured here (release build): a setup is about 60 µs, a try that fails
//! about 150 µs, a good IK first message about 190 µs. So a login to the
//! previous key costs about 150 µs more than one to the current key, and a
//! message for neither key (a forgotten key, or garbage) costs one failed
//! try, or two during an overlap (about 300 µs), before it is refused.
//!
//! Writes are crash-safe: a new file is written to a temporary name, synced,
//! then linked or renamed into place and the directory synced. After a crash
//! in the middle of [`ServerKeys::rotate`] the files hold either the old pair
//! or the new one, or (between the two renames) the old key as both current
//! and previous, which still works; rotating again finishes the job.
//!
//! Touched by: the server's start-up and admin commands; the loaded
//! [`ServerKeys`] is then read-only.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

/// The current key's file in the data directory.
pub const KEY_FILE: &str = "noise.key";
/// The previous key's file, present during a rotation's overlap.
pub const PREVIOUS_KEY_FILE: &str = "noise.key.previous";
/// Bytes of an X25519 private or public key.
pub const KEY_BYTES: usize = 32;
/// Key files are created with this mode and refused when group or others
/// may read them.
const KEY_FILE_MODE: u32 = 0o600;

/// Why the server's key files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {length} bytes; a Noise key file holds exactly 32")]
    Length { path: PathBuf, length: usize },
    #[error("{path}: mode {mode:o} lets others read the server's private key (chmod 600 it)")]
    Permissions { path: PathBuf, mode: u32 },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An X25519 key pair. `Debug` shows the fingerprint, never the private key.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKeypair {
    private: [u8; KEY_BYTES],
    public: [u8; KEY_BYTES],
}

impl StaticKeypair {
    /// A fresh key pair from the operating system's random generator.
    pub fn generate() -> StaticKeypair {
        let mut private = [0u8; KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut private);
        StaticKeypair::from_private(private)
    }

    /// The key pair of `private` (any 32 bytes; X25519 clamps them).
    pub fn from_private(private: [u8; KEY_BYTES]) -> StaticKeypair {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow is built with Curve25519");
        dh.set(&private);
        let public = dh
            .pubkey()
            .try_into()
            .expect("an X25519 public key is 32 bytes");
        StaticKeypair { private, public }
    }

    pub fn public(&self) -> &[u8; KEY_BYTES] {
        &self.public
    }

    pub fn private(&self) -> &[u8; KEY_BYTES] {
        &self.private
    }

    /// See [`fingerprint`].
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public)
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A short, readable name for a public key, to show and compare by eye:
/// the first 16 bytes of its SHA-256, in hex, in 8 groups of 4 digits
/// joined by `:` (e.g. `1f0c:9a3e:…`). Not a substitute for the full key when
/// pinning.
pub fn fingerprint(public: &[u8; KEY_BYTES]) -> String {
    let digest = Sha256::digest(public);
    digest[..16]
        .chunks(2)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(":")
}

/// Which of the server's keys a handshake used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeySlot {
    Current,
    Previous,
}

/// The server's static keys: the current one and, during a rotation's
/// overlap, the previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerKeys {
    pub current: StaticKeypair,
    pub previous: Option<StaticKeypair>,
}

impl ServerKeys {
    /// Reads the keys from `data_dir` (which must exist), making the current
    /// key first if there is none (first start).
    pub fn load_or_create(data_dir: &Path) -> Result<ServerKeys, KeyFileError> {
        let path = data_dir.join(KEY_FILE);
        let current = match read_key(&path)? {
            Some(private) => StaticKeypair::from_private(private),
            None => {
                let fresh = StaticKeypair::generate();
                let temporary = write_temporary(data_dir, KEY_FILE, fresh.private())?;
                // A hard link puts the complete file in place only if none is
                // there, so a crash never leaves a short key file and a racing
                // process never replaces a key already handed out.
                let linked = std::fs::hard_link(&temporary, &path);
                std::fs::remove_file(&temporary).map_err(io_error(&temporary))?;
                sync_dir(data_dir)?;
                match linked {
                    Ok(()) => fresh,
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        let private = read_key(&path)?.ok_or_else(|| KeyFileError::Io {
                            path: path.clone(),
                            source: ErrorKind::NotFound.into(),
                        })?;
                        StaticKeypair::from_private(private)
                    }
                    Err(e) => return Err(io_error(&path)(e)),
                }
            }
        };
        let previous =
            read_key(&data_dir.join(PREVIOUS_KEY_FILE))?.map(StaticKeypair::from_private);
        Ok(ServerKeys { current, previous })
    }

    /// Starts a rotation: the current key becomes the previous one (the
    /// former previous key, if any, is dropped) and a fresh key becomes
    /// current. Returns the keys now on disk; a running server must load
    /// them to use them.
    pub fn rotate(data_dir: &Path) -> Result<ServerKeys, KeyFileError> {
        let old = ServerKeys::load_or_create(data_dir)?;
        let fresh = StaticKeypair::generate();
        let new_current = write_temporary(data_dir, KEY_FILE, fresh.private())?;
        let new_previous = write_temporary(data_dir, PREVIOUS_KEY_FILE, old.current.private())?;
        // Previous first: between the renames the old key is both current
        // and previous, which serves every client the old state served.
        let previous_path = data_dir.join(PREVIOUS_KEY_FILE);
        std::fs::rename(&new_previous, &previous_path).map_err(io_error(&previous_path))?;
        sync_dir(data_dir)?;
        let current_path = data_dir.join(KEY_FILE);
        std::fs::rename(&new_current, &current_path).map_err(io_error(&current_path))?;
        sync_dir(data_dir)?;
        Ok(ServerKeys {
            current: fresh,
            previous: Some(old.current),
        })
    }

    /// Ends a rotation's overlap: the previous key is deleted, and IK
    /// handshakes to it fail from the next load on.
    pub fn end_overlap(data_dir: &Path) -> Result<ServerKeys, KeyFileError> {
        let path = data_dir.join(PREVIOUS_KEY_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(data_dir)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path)(e)),
        }
        ServerKeys::load_or_create(data_dir)
    }

    /// The current public key: what a client pins and uses for IK.
    pub fn public(&self) -> &[u8; KEY_BYTES] {
        self.current.public()
    }

    /// The key in `slot`, if held.
    pub fn get(&self, slot: KeySlot) -> Option<&StaticKeypair> {
        match slot {
            KeySlot::Current => Some(&self.current),
            KeySlot::Previous => self.previous.as_ref(),
        }
    }
}

/// Reads a key file: `Ok(None)` when it does not exist.
fn read_key(path: &Path) -> Result<Option<[u8; KEY_BYTES]>, KeyFileError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let mode = file.metadata().map_err(io_error(path))?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // One byte more than a key, to tell a long file from a key without
    // reading a file of any size.
    let mut bytes = Vec::with_capacity(KEY_BYTES + 1);
    file.take(KEY_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    let key: [u8; KEY_BYTES] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyFileError::Length {
            path: path.to_path_buf(),
            length: bytes.len(),
        })?;
    Ok(Some(key))
}

/// Writes `private` to `<name>.tmp` in `data_dir` (replacing a stale one
/// from a crash), mode 0600, synced. Returns its path.
fn write_temporary(
    data_dir: &Path,
    name: &str,
    private: &[u8; KEY_BYTES],
) -> Result<PathBuf, KeyFileError> {
    let path = data_dir.join(format!("{name}.tmp"));
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(&path)
        .map_err(io_error(&path))?;
    file.write_all(private).map_err(io_error(&path))?;
    file.sync_all().map_err(io_error(&path))?;
    Ok(path)
}

/// Makes the directory's entries (a new, renamed or removed file) durable.
fn sync_dir(dir: &Path) -> Result<(), KeyFileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Whether `public` is a low-order X25519 point (or a non-canonical encoding
/// of one): a Diffie-Hellman with it gives all zeros whatever the private
/// key, so it authenticates no one. The list is libsodium's; bit 255 is
/// ignored, as X25519 ignores it.
pub(crate) fn is_low_order(public: &[u8; KEY_BYTES]) -> bool {
    const LOW_ORDER: [[u8; KEY_BYTES]; 7] = [
        // 0 (order 4)
        [0; 32],
        // 1 (order 1)
        [
            1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ],
        // order 8
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        // order 8
        [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ],
        // p - 1 (order 2)
        [
            0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
        // p (= 0)
        [
            0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
        // p + 1 (= 1)
        [
            0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0x7f,
        ],
    ];
    let mut masked = *public;
    masked[31] &= 0x7f;
    LOW_ORDER.contains(&masked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_key_0600_at_first_start_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerKeys::load_or_create(dir.path()).unwrap();
        assert!(first.previous.is_none());
        let path = dir.path().join(KEY_FILE);
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), first.current.private());
        let again = ServerKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(again, first);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE]);
    }

    #[test]
    fn rotation_keeps_the_old_key_as_previous_until_the_overlap_ends() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerKeys::load_or_create(dir.path()).unwrap();
        let rotated = ServerKeys::rotate(dir.path()).unwrap();
        assert_ne!(rotated.current, first.current);
        assert_eq!(rotated.previous.as_ref(), Some(&first.current));
        assert_eq!(ServerKeys::load_or_create(dir.path()).unwrap(), rotated);
        assert_eq!(mode_of(&dir.path().join(KEY_FILE)), 0o600);
        assert_eq!(mode_of(&dir.path().join(PREVIOUS_KEY_FILE)), 0o600);

        // A second rotation drops the oldest key.
        let twice = ServerKeys::rotate(dir.path()).unwrap();
        assert_eq!(twice.previous.as_ref(), Some(&rotated.current));
        assert_eq!(ServerKeys::load_or_create(dir.path()).unwrap(), twice);

        let ended = ServerKeys::end_overlap(dir.path()).unwrap();
        assert_eq!(ended.current, twice.current);
        assert!(ended.previous.is_none());
        assert!(!dir.path().join(PREVIOUS_KEY_FILE).exists());
        // Ending an overlap that is not running is harmless.
        assert_eq!(ServerKeys::end_overlap(dir.path()).unwrap(), ended);
    }

    #[test]
    fn rotation_ignores_stale_temporaries_from_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let first = ServerKeys::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join("noise.key.tmp"), b"torn").unwrap();
        std::fs::write(dir.path().join("noise.key.previous.tmp"), b"torn").unwrap();
        // Loading ignores them; rotating replaces them.
        assert_eq!(ServerKeys::load_or_create(dir.path()).unwrap(), first);
        let rotated = ServerKeys::rotate(dir.path()).unwrap();
        assert_eq!(rotated.previous.as_ref(), Some(&first.current));
        assert!(!dir.path().join("noise.key.tmp").exists());
    }

    #[test]
    fn rejects_key_file_of_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, [1u8; 31]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = ServerKeys::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(error, KeyFileError::Length { length: 31, .. }),
            "{error}"
        );
        std::fs::write(&path, [1u8; 4096]).unwrap();
        let error = ServerKeys::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(error, KeyFileError::Length { length: 33, .. }),
            "{error}"
        );
    }

    #[test]
    fn rejects_key_file_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        ServerKeys::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = ServerKeys::load_or_create(dir.path()).unwrap_err();
        assert!(
            matches!(error, KeyFileError::Permissions { mode: 0o644, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }

    #[test]
    fn fingerprint_is_grouped_hex_of_sha256() {
        let keypair = StaticKeypair::from_private([7; 32]);
        let shown = keypair.fingerprint();
        assert_eq!(shown.len(), 8 * 4 + 7);
        let digest = Sha256::digest(keypair.public());
        assert_eq!(shown.replace(':', ""), hex::encode(&digest[..16]));
        // Debug never shows the private key.
        let debug = format!("{keypair:?}");
        assert!(debug.contains(&shown));
        assert!(!debug.contains(&hex::encode(keypair.private())));
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 section 6.1, Alice.
        let private: [u8; 32] =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex::encode(StaticKeypair::from_private(private).public()),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn low_order_points_give_an_all_zero_diffie_hellman() {
        let mut dh = DefaultResolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        dh.set(&[0x42; 32]);
        let zero_with = |point: &[u8; 32]| {
            let mut out = [0u8; 32];
            dh.dh(point, &mut out).unwrap();
            out == [0; 32]
        };
        let mut seen = 0;
        for first in [0u8, 1, 0xe0, 0x5f, 0xec, 0xed, 0xee] {
            let mut candidate = [0u8; 32];
            candidate[0] = first;
            if first >= 0xec {
                candidate[1..31].fill(0xff);
                candidate[31] = 0x7f;
            }
            if is_low_order(&candidate) {
                seen += 1;
                assert!(zero_with(&candidate), "{}", hex::encode(candidate));
                // Bit 255 is ignored.
                candidate[31] |= 0x80;
                assert!(is_low_order(&candidate));
                assert!(zero_with(&candidate));
            }
        }
        assert_eq!(seen, 5, "0, 1, p-1, p, p+1");
        for point in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        ] {
            let point: [u8; 32] = hex::decode(point).unwrap().try_into().unwrap();
            assert!(is_low_order(&point));
            assert!(zero_with(&point));
        }
        let ordinary = StaticKeypair::from_private([9; 32]);
        assert!(!is_low_order(ordinary.public()));
        assert!(!zero_with(ordinary.public()));
    }
}
