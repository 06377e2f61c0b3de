//! Files in the chat: `/send-file PATH` seals the file, asks the server for
//! an upload grant, uploads it to the media service and sends the peer a
//! `FileRef`; an incoming `FileRef` is fetched with a download grant,
//! checked against its hash, opened and saved under `--downloads`. The
//! blocking HTTP and file work runs on glommio's blocking pool, so the
//! session keeps being served meanwhile.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::client::media::{self, FileRef, Sealed};
use crate::client::ReconnectingSession;
use crate::ids::UserId;
use crate::proto::pb;

/// Grants asked for and not yet answered, each direction.
const PENDING_MAX: usize = 16;
/// Request ids of media grants start here, so an Error answering one is
/// told apart from one answering a message.
const REQUEST_ID_BASE: u64 = 1 << 62;

pub struct PendingUpload {
    pub to: UserId,
    pub name: String,
    pub sealed: Sealed,
}

/// Transfers waiting for their grant.
pub struct Transfers {
    downloads_dir: PathBuf,
    next_request: u64,
    uploads: HashMap<u64, PendingUpload>,
    downloads: HashMap<u64, (FileRef, u64)>,
}

/// What a grant leads to, once its transfer ran.
pub enum Done {
    /// Uploaded: send this FileRef to `to`.
    Uploaded { to: UserId, file: FileRef },
    /// Downloaded and saved (a line to print).
    Saved(String),
    /// Failed (a line to print).
    Failed(String),
}

impl Transfers {
    pub fn new(downloads_dir: PathBuf) -> Transfers {
        Transfers {
            downloads_dir,
            next_request: REQUEST_ID_BASE,
            uploads: HashMap::new(),
            downloads: HashMap::new(),
        }
    }

    /// Whether `id` is one of ours (an Error's `client_message_id`).
    pub fn owns(&self, id: u64) -> bool {
        id >= REQUEST_ID_BASE
    }

    /// An Error answered request `id`: the transfer is dropped.
    pub fn refused(&mut self, error: &pb::Error) -> String {
        let what = match (
            self.uploads.remove(&error.client_message_id),
            self.downloads.remove(&error.client_message_id),
        ) {
            (Some(upload), _) => format!("sending {}", upload.name),
            (_, Some((file, _))) => format!("fetching {}", file.safe_name()),
            _ => "a file transfer".to_string(),
        };
        format!(
            "! {what} refused: {} ({})",
            error.message,
            error.code().as_str_name()
        )
    }

    /// Reads and seals `path` off the executor thread, then asks for an
    /// upload grant.
    pub async fn send_file(
        &mut self,
        session: &ReconnectingSession,
        to: UserId,
        path: &Path,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        if self.uploads.len() >= PENDING_MAX {
            writeln!(out, "! {PENDING_MAX} files are waiting already")?;
            return Ok(());
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let read_from = path.to_path_buf();
        let sealed = glommio::executor()
            .spawn_blocking(move || std::fs::read(read_from).map(|bytes| media::seal(&bytes)))
            .await;
        let sealed = match sealed {
            Ok(sealed) => sealed,
            Err(e) => {
                writeln!(out, "! cannot read {}: {e}", path.display())?;
                return Ok(());
            }
        };
        let request = self.next_request;
        self.next_request += 1;
        match session.request_upload_grant(request, sealed.ciphertext.len() as u64) {
            Ok(()) => {
                writeln!(
                    out,
                    "* uploading {name} ({} bytes)",
                    sealed.ciphertext.len()
                )?;
                self.uploads
                    .insert(request, PendingUpload { to, name, sealed });
            }
            Err(e) => writeln!(out, "! not sent: {e}")?,
        }
        session.flush().await?;
        Ok(())
    }

    /// An incoming FileRef from `from`: asks for a download grant.
    pub async fn fetch(
        &mut self,
        session: &ReconnectingSession,
        file: FileRef,
        from: u64,
        out: &mut dyn Write,
    ) -> anyhow::Result<()> {
        let Some(blob) = file.blob_id() else {
            return Ok(());
        };
        if self.downloads.len() >= PENDING_MAX {
            writeln!(
                out,
                "! too many files arriving; {} skipped",
                file.safe_name()
            )?;
            return Ok(());
        }
        let request = self.next_request;
        self.next_request += 1;
        match session.request_download_grant(request, &blob) {
            Ok(()) => {
                self.downloads.insert(request, (file, from));
            }
            Err(e) => writeln!(out, "! cannot fetch {}: {e}", file.safe_name())?,
        }
        session.flush().await?;
        Ok(())
    }

    /// A grant arrived: runs its transfer off the executor thread.
    pub async fn on_grant(&mut self, grant: pb::MediaGrant) -> Option<Done> {
        if let Some(upload) = self.uploads.remove(&grant.request_id) {
            let PendingUpload { to, name, sealed } = upload;
            return Some(
                glommio::executor()
                    .spawn_blocking(move || {
                        match media::upload(&grant.url, &grant.token, &sealed) {
                            Ok(()) => Done::Uploaded {
                                to,
                                file: FileRef::new(&sealed, &name),
                            },
                            Err(e) => Done::Failed(format!("! {name} not sent: {e}")),
                        }
                    })
                    .await,
            );
        }
        let (file, from) = self.downloads.remove(&grant.request_id)?;
        let dir = self.downloads_dir.clone();
        Some(
            glommio::executor()
                .spawn_blocking(move || fetch_and_save(&grant, &file, from, &dir))
                .await,
        )
    }
}

fn fetch_and_save(grant: &pb::MediaGrant, file: &FileRef, from: u64, dir: &Path) -> Done {
    let name = file.safe_name();
    let (Some(blob), Some(key)) = (file.blob_id(), file.key_bytes()) else {
        return Done::Failed(format!("! {name}: not a valid file reference"));
    };
    let plain = media::download(&grant.url, &grant.token, &blob, file.size)
        .and_then(|ciphertext| media::open(&ciphertext, &key));
    let plain = match plain {
        Ok(plain) => plain,
        Err(e) => return Done::Failed(format!("! {name} from user {from}: {e}")),
    };
    match save(dir, &name, &plain) {
        Ok(path) => Done::Saved(format!(
            "* saved {name} ({} bytes) from user {from} to {}",
            plain.len(),
            path.display()
        )),
        Err(e) => Done::Failed(format!("! cannot save {name}: {e}")),
    }
}

/// Writes `bytes` under `dir` as `name`, or `name (2)`, `name (3)`, … when
/// taken: nothing is overwritten.
fn save(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for n in 1..1_000 {
        let path = if n == 1 {
            dir.join(name)
        } else {
            dir.join(format!("{name} ({n})"))
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(bytes)?;
                file.sync_all()?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "too many files of that name",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let first = save(dir.path(), "a.txt", b"1").unwrap();
        let second = save(dir.path(), "a.txt", b"2").unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read(first).unwrap(), b"1");
        assert_eq!(std::fs::read(second).unwrap(), b"2");
    }
}
