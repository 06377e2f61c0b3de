//! The few file-system operations the log performs, behind a trait so tests
//! can inject the faults real disks produce: ENOSPC on create, failed
//! fsyncs, and, at a simulated power loss, torn, lost and bit-flipped writes
//! of everything not yet synced.
//!
//! The log's data path is the shared mapping, so writes are not calls on
//! this trait; the log reports them (`wrote`) and the commit path reports
//! which of them a sync covered (`sync_begin`, `sync_done`). `SimStorage`
//! remembers the unsynced ranges and damages them in `crash`, driven by one
//! seed that the test prints, so a failing run replays exactly.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// File operations of the log. One instance per log; used on its thread only.
pub trait Storage {
    /// Creates `path` (which must not exist), readable and writable, with
    /// `size_bytes` allocated on the device so writes through a mapping can
    /// never fail for space later (a SIGBUS otherwise).
    fn create_preallocated(&self, path: &Path, size_bytes: u64) -> io::Result<File>;

    /// Removes a segment file.
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    /// Called before every fsync of `path`; an error is what the fsync returns.
    fn check_sync(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Bytes `offset..offset + len` of `path` were written through the mapping.
    fn wrote(&self, _path: &Path, _offset: u64, _len: u64) {}

    /// A sync of `path` is about to be submitted; returns a marker for `sync_done`.
    fn sync_begin(&self, _path: &Path) -> u64 {
        0
    }

    /// The sync started with `marker` returned: everything written before it is durable.
    fn sync_done(&self, _path: &Path, _marker: u64) {}
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealStorage;

impl Storage for RealStorage {
    fn create_preallocated(&self, path: &Path, size_bytes: u64) -> io::Result<File> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(errno) = nix::fcntl::fallocate(
            file.as_raw_fd(),
            nix::fcntl::FallocateFlags::empty(),
            0,
            size_bytes as libc::off_t,
        ) {
            // Do not leave a file that is shorter than a segment behind.
            let _ = std::fs::remove_file(path);
            return Err(io::Error::from_raw_os_error(errno as i32));
        }
        Ok(file)
    }
}

/// Whether an I/O error means "no space": ENOSPC or a quota.
pub fn is_out_of_space(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    )
}

/// What `SimStorage::crash` does to one unsynced write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashFate {
    Kept,
    Lost,
    Torn,
    BitFlipped,
}

/// Real files plus injected faults, driven by one seed.
pub struct SimStorage {
    seed: u64,
    rng: RefCell<StdRng>,
    /// Fail every segment creation with ENOSPC while set.
    pub disk_full: Cell<bool>,
    /// Fail every fsync with EIO while set.
    pub fsync_fails: Cell<bool>,
    /// Creations allowed before the disk counts as full; `u64::MAX` for no limit.
    pub creates_left: Cell<u64>,
    unsynced: RefCell<HashMap<PathBuf, Vec<(u64, u64)>>>,
}

impl SimStorage {
    pub fn new(seed: u64) -> SimStorage {
        SimStorage {
            seed,
            rng: RefCell::new(StdRng::seed_from_u64(seed)),
            disk_full: Cell::new(false),
            fsync_fails: Cell::new(false),
            creates_left: Cell::new(u64::MAX),
            unsynced: RefCell::new(HashMap::new()),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Unsynced byte ranges still remembered, over all files.
    pub fn unsynced_writes(&self) -> usize {
        self.unsynced.borrow().values().map(Vec::len).sum()
    }

    /// Simulates a power loss after the log was dropped: each unsynced write
    /// is kept, lost (zeroed), torn (a prefix kept) or bit-flipped, as the
    /// seed decides. Returns each write's fate in file order.
    pub fn crash(&self) -> io::Result<Vec<(PathBuf, u64, u64, CrashFate)>> {
        let mut fates = Vec::new();
        let mut unsynced: Vec<(PathBuf, Vec<(u64, u64)>)> =
            self.unsynced.borrow_mut().drain().collect();
        unsynced.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rng = self.rng.borrow_mut();
        for (path, writes) in unsynced {
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue; // Removed since; nothing to damage.
            };
            for (offset, len) in writes {
                let fate = match rng.gen_range(0..4) {
                    0 => CrashFate::Kept,
                    1 => CrashFate::Lost,
                    2 => CrashFate::Torn,
                    _ => CrashFate::BitFlipped,
                };
                match fate {
                    CrashFate::Kept => {}
                    CrashFate::Lost => file.write_all_at(&vec![0; len as usize], offset)?,
                    CrashFate::Torn => {
                        let keep = rng.gen_range(0..len);
                        file.write_all_at(&vec![0; (len - keep) as usize], offset + keep)?;
                    }
                    CrashFate::BitFlipped => {
                        let at = offset + rng.gen_range(0..len);
                        let mut byte = [0u8];
                        file.read_exact_at(&mut byte, at)?;
                        byte[0] ^= 1 << rng.gen_range(0..8);
                        file.write_all_at(&byte, at)?;
                    }
                }
                fates.push((path.clone(), offset, len, fate));
            }
        }
        Ok(fates)
    }
}

impl Storage for SimStorage {
    fn create_preallocated(&self, path: &Path, size_bytes: u64) -> io::Result<File> {
        let left = self.creates_left.get();
        if self.disk_full.get() || left == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if left != u64::MAX {
            self.creates_left.set(left - 1);
        }
        RealStorage.create_preallocated(path, size_bytes)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.unsynced.borrow_mut().remove(path);
        std::fs::remove_file(path)
    }

    fn check_sync(&self, _path: &Path) -> io::Result<()> {
        if self.fsync_fails.get() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn wrote(&self, path: &Path, offset: u64, len: u64) {
        let mut unsynced = self.unsynced.borrow_mut();
        if let Some(writes) = unsynced.get_mut(path) {
            writes.push((offset, len));
        } else {
            unsynced.insert(path.to_path_buf(), vec![(offset, len)]);
        }
    }

    fn sync_begin(&self, path: &Path) -> u64 {
        self.unsynced
            .borrow()
            .get(path)
            .map_or(0, |w| w.len() as u64)
    }

    fn sync_done(&self, path: &Path, marker: u64) {
        if let Some(writes) = self.unsynced.borrow_mut().get_mut(path) {
            let covered = (marker as usize).min(writes.len());
            writes.drain(..covered);
        }
    }
}
