//! A device's credentials and their file: a few TOML keys, mode 0600.
//!
//! A device logs in one of two ways, and its credentials say which:
//!
//! | `secret` | `noise_private` | the device                              | logs in with                        |
//! |----------|-----------------|-----------------------------------------|-------------------------------------|
//! | yes      | no              | registered in plaintext                 | plaintext Hello carrying the secret |
//! | no       | yes             | registered (or bound) over Noise        | Noise with its key, Hello no secret |
//! | yes      | yes             | a plaintext device binding a Noise key  | Noise with its key, Hello + secret  |
//!
//! The third row is a step, not a resting state: the server binds the key at
//! that login, after which the secret no longer logs in anywhere; the caller
//! then drops it ([`Credentials::key_bound`]). Saving the credentials before
//! that login (key and secret together) means a crash in between loses
//! nothing: the next login binds again, or finds the key already bound.
//!
//! The file keeps the format of the plaintext era (`user`, `device`,
//! `secret`) and adds the optional `noise_private_key` and `server_key`, so
//! an old file still loads.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ids::{DeviceId, UserId};
use crate::noise::{fingerprint, StaticKeypair};

/// How a device logs in (see the module docs for the combinations), and
/// which server key it trusts. `Debug` never shows a secret or private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The account.
    pub user: UserId,
    /// This device of the account.
    pub device: DeviceId,
    /// The 32-byte secret a plaintext Hello carries; `None` for a device
    /// that logs in with its Noise key only.
    pub secret: Option<[u8; 32]>,
    /// The device's Noise static private key (X25519); `None` for a device
    /// that logs in in plaintext.
    pub noise_private: Option<[u8; 32]>,
    /// The server's Noise static public key this device trusts (pinned at
    /// first contact, re-pinned when the server announces a rotation).
    /// [`crate::client::Session::connect`] uses it for IK when
    /// `ConnectOptions::server_key` is not set.
    pub server_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Credentials {
    // Neither the secret nor the private key ever goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("device", &self.device)
            .field("secret", &self.secret.map(|_| "<hidden>"))
            .field(
                "noise_key",
                &self.noise_keypair().map(|pair| pair.fingerprint()),
            )
            .field("server_key", &self.server_key.as_ref().map(fingerprint))
            .finish()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    user: u64,
    device: u32,
    /// 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    noise_private_key: Option<String>,
    /// 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_key: Option<String>,
}

impl Credentials {
    /// The device's Noise key pair, if it has one.
    pub fn noise_keypair(&self) -> Option<StaticKeypair> {
        self.noise_private.map(StaticKeypair::from_private)
    }

    /// These credentials with a fresh Noise key added beside the secret, to
    /// bind it at the next login over Noise. Save the result before that
    /// login: once the server has bound the key, only the key logs in.
    pub fn with_new_noise_key(&self) -> Credentials {
        Credentials {
            noise_private: Some(*StaticKeypair::generate().private()),
            ..self.clone()
        }
    }

    /// Whether the next Noise login binds the key (both a secret and a key).
    pub fn binds_noise_key(&self) -> bool {
        self.secret.is_some() && self.noise_private.is_some()
    }

    /// These credentials once the server has bound the Noise key: the
    /// secret, which no longer logs in, is dropped.
    pub fn key_bound(&self) -> Credentials {
        Credentials {
            secret: None,
            ..self.clone()
        }
    }

    /// Writes the credentials as TOML, readable by the owner only. The file is
    /// written next to `path` first and renamed over it, so a crash leaves
    /// either the old file or the new one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let text = toml::to_string(&CredentialsFile {
            user: self.user.0,
            device: self.device.0,
            secret: self.secret.map(hex::encode),
            noise_private_key: self.noise_private.map(hex::encode),
            server_key: self.server_key.map(hex::encode),
        })
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = Path::new(&temporary);
        {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(temporary)?;
            // An existing temporary file keeps its mode; force it.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
        }
        fs::rename(temporary, path)
    }

    /// Reads credentials written by [`Credentials::save`] (or by a version
    /// that wrote only `user`, `device` and `secret`).
    pub fn load(path: &Path) -> io::Result<Credentials> {
        let text = fs::read_to_string(path)?;
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let file: CredentialsFile =
            toml::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let key = |name: &str, value: Option<String>| -> io::Result<Option<[u8; 32]>> {
            let Some(value) = value else {
                return Ok(None);
            };
            let bytes = hex::decode(value.trim())
                .map_err(|e| invalid(format!("{}: {name}: {e}", path.display())))?;
            let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                invalid(format!(
                    "{}: {name} has {} bytes, expected 32",
                    path.display(),
                    b.len()
                ))
            })?;
            Ok(Some(key))
        };
        let credentials = Credentials {
            user: UserId(file.user),
            device: DeviceId(file.device),
            secret: key("secret", file.secret)?,
            noise_private: key("noise_private_key", file.noise_private_key)?,
            server_key: key("server_key", file.server_key)?,
        };
        if credentials.secret.is_none() && credentials.noise_private.is_none() {
            return Err(invalid(format!(
                "{}: neither a secret nor a noise_private_key: these credentials cannot log in",
                path.display()
            )));
        }
        Ok(credentials)
    }
}
