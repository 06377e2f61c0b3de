//! A device's credentials and their file: three TOML keys, mode 0600.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ids::{DeviceId, UserId};

/// What a device presents in Hello. The secret is shown once, at registration.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: UserId,
    pub device: DeviceId,
    pub secret: [u8; 32],
}

impl std::fmt::Debug for Credentials {
    // The secret never goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("device", &self.device)
            .field("secret", &"<hidden>")
            .finish()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    user: u64,
    device: u32,
    /// 64 hex digits.
    secret: String,
}

impl Credentials {
    /// Writes the credentials as TOML, readable by the owner only. The file is
    /// written next to `path` first and renamed over it, so a crash leaves
    /// either the old file or the new one.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let text = toml::to_string(&CredentialsFile {
            user: self.user.0,
            device: self.device.0,
            secret: hex::encode(self.secret),
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

    /// Reads credentials written by [`Credentials::save`].
    pub fn load(path: &Path) -> io::Result<Credentials> {
        let text = fs::read_to_string(path)?;
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let file: CredentialsFile =
            toml::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        let bytes = hex::decode(file.secret.trim())
            .map_err(|e| invalid(format!("{}: secret: {e}", path.display())))?;
        let secret: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            invalid(format!(
                "{}: secret has {} bytes, expected 32",
                path.display(),
                b.len()
            ))
        })?;
        Ok(Credentials {
            user: UserId(file.user),
            device: DeviceId(file.device),
            secret,
        })
    }
}
