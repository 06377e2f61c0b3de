//! Files in the chat: `/send-file PATH` seals the file, asks the server for
//! an upload grant, uploads it to the media service and sends the peer a
//! `FileRef`; an incoming `FileRef` is fetched with a download grant,
//! checked against its hash, opened and saved under `--downloads`. The
//! blocking work (reading, sealing, HTTP, saving) runs on glommio's
//! blocking pool in a task of its own, which hands its outcome back
//! through a channel (`Transfers::next_done`), so the chat goes on serving
//! the session and the keyboard meanwhile. A file is read only once the
//! server granted its size.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};

use crate::client::media::{self, FileRef};
use crate::client::ReconnectingSession;
use crate::ids::UserId;
use crate::proto::pb;

/// Grants asked for and not yet answered, each direction.
const PENDING_MAX: usize = 16;
/// Request ids of media grants start here, so an Error answering one is
/// told apart from one answering a message.
const REQUEST_ID_BASE: u64 = 1 << 62;

/// A file waiting for its upload grant.
pub struct PendingUpload {
    pub to: UserId,
    pub name: String,
    pub path: PathBuf,
    /// The size the grant is asked for (the file's, sealed).
    pub size: u64,
}

/// Bytes sealing adds to a file (the AEAD tag).
const SEAL_OVERHEAD_BYTES: u64 = 16;

/// Transfers waiting for their grant, and the channel their outcomes come
/// back on.
pub struct Transfers {
    downloads_dir: PathBuf,
    next_request: u64,
    uploads: HashMap<u64, PendingUpload>,
    downloads: HashMap<u64, (FileRef, u64)>,
    done_tx: std::rc::Rc<LocalSender<Done>>,
    done_rx: LocalReceiver<Done>,
    /// Transfers started and not yet reported.
    running: usize,
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
        // Unbounded, but at most 2 × PENDING_MAX transfers run at once.
        let (done_tx, done_rx) = local_channel::new_unbounded();
        Transfers {
            downloads_dir,
            next_request: REQUEST_ID_BASE,
            uploads: HashMap::new(),
            downloads: HashMap::new(),
            done_tx: std::rc::Rc::new(done_tx),
            done_rx,
            running: 0,
        }
    }

    /// The next finished transfer (waits; cancel safe).
    pub async fn next_done(&mut self) -> Option<Done> {
        let done = self.done_rx.recv().await;
        self.running = self.running.saturating_sub(usize::from(done.is_some()));
        done
    }

    /// Files waiting for a grant or moving.
    pub fn pending(&self) -> usize {
        self.uploads.len() + self.downloads.len() + self.running
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

    /// Asks for an upload grant for `path`'s size; the file is read when
    /// the grant comes.
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
        let size = match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => meta.len() + SEAL_OVERHEAD_BYTES,
            Ok(_) => {
                writeln!(out, "! cannot read {}: not a file", path.display())?;
                return Ok(());
            }
            Err(e) => {
                writeln!(out, "! cannot read {}: {e}", path.display())?;
                return Ok(());
            }
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let request = self.next_request;
        self.next_request += 1;
        match session.request_upload_grant(request, size) {
            Ok(()) => {
                writeln!(out, "* uploading {name} ({size} bytes)")?;
                let path = path.to_path_buf();
                self.uploads.insert(
                    request,
                    PendingUpload {
                        to,
                        name,
                        path,
                        size,
                    },
                );
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

    /// A grant arrived: starts its transfer off the executor thread; its
    /// outcome comes from `next_done`. False if the grant is not ours.
    pub fn on_grant(&mut self, grant: pb::MediaGrant) -> bool {
        let work: Box<dyn FnOnce() -> Done + Send> =
            if let Some(upload) = self.uploads.remove(&grant.request_id) {
                Box::new(move || read_seal_and_upload(&grant, upload))
            } else if let Some((file, from)) = self.downloads.remove(&grant.request_id) {
                let dir = self.downloads_dir.clone();
                Box::new(move || fetch_and_save(&grant, &file, from, &dir))
            } else {
                return false;
            };
        let done = self.done_tx.clone();
        self.running += 1;
        glommio::spawn_local(async move {
            let outcome = glommio::executor().spawn_blocking(work).await;
            // The receiver lives as long as the chat; gone means leaving.
            let _ = done.send(outcome).await;
        })
        .detach();
        true
    }
}

fn read_seal_and_upload(grant: &pb::MediaGrant, upload: PendingUpload) -> Done {
    let PendingUpload {
        to,
        name,
        path,
        size,
    } = upload;
    let plain = match std::fs::read(&path) {
        Ok(plain) => plain,
        Err(e) => return Done::Failed(format!("! cannot read {}: {e}", path.display())),
    };
    let sealed = media::seal(&plain);
    if sealed.ciphertext.len() as u64 != size {
        return Done::Failed(format!(
            "! {name} changed while it was being sent; not sent"
        ));
    }
    match media::upload(&grant.url, &grant.token, &sealed) {
        Ok(()) => Done::Uploaded {
            to,
            file: FileRef::new(&sealed, &name),
        },
        Err(e) => Done::Failed(format!("! {name} not sent: {e}")),
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
