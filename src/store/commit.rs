//! Group commit: one batch makes every record written before it started
//! durable with one fdatasync per dirty segment (and one of the directory
//! when segments were created or removed), submitted to the executor's
//! io_uring so the shard keeps running while the device flushes.
//!
//! On Linux an fdatasync of a file persists the pages dirtied through a
//! shared mapping of it (`msync(MS_SYNC)` is the same `vfs_fsync_range`),
//! so the mapping needs no separate flush. Only one batch is in flight per
//! log, hence one fsync per segment at a time.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::segment::SyncHandle;
use super::storage::Storage;
use super::{CommitTicket, LogPosition, StoreError};

/// State shared between a log and its batch in flight.
#[derive(Default)]
pub(super) struct CommitShared {
    pub(super) in_flight: Cell<bool>,
    /// Files of a batch dropped unfinished, to be synced by the next one.
    pub(super) returned_files: RefCell<Vec<Rc<SyncHandle>>>,
    pub(super) returned_dir: Cell<bool>,
}

/// Work for one group commit: the files and ranges to make durable.
pub struct CommitBatch {
    /// Every append with a ticket at or below this is covered.
    pub ticket: CommitTicket,
    /// End of the last record covered (exclusive).
    end: LogPosition,
    files: Vec<(Rc<SyncHandle>, u64)>,
    dir: Option<Rc<SyncHandle>>,
    unlinks: Vec<u32>,
    storage: Rc<dyn Storage>,
    shared: Rc<CommitShared>,
    started: Instant,
    finished: bool,
}

/// What `Log::finish_commit` needs from a synced batch.
pub(super) struct Finished {
    pub(super) ticket: CommitTicket,
    pub(super) end: LogPosition,
    pub(super) files: Vec<(Rc<SyncHandle>, u64)>,
    pub(super) unlinks: Vec<u32>,
    pub(super) elapsed: Duration,
}

impl CommitBatch {
    pub(super) fn new(
        ticket: CommitTicket,
        end: LogPosition,
        files: Vec<(Rc<SyncHandle>, u64)>,
        dir: Option<Rc<SyncHandle>>,
        unlinks: Vec<u32>,
        storage: Rc<dyn Storage>,
        shared: Rc<CommitShared>,
    ) -> CommitBatch {
        shared.in_flight.set(true);
        CommitBatch {
            ticket,
            end,
            files,
            dir,
            unlinks,
            storage,
            shared,
            started: Instant::now(),
            finished: false,
        }
    }

    /// Segment files this batch syncs (for logs and tests).
    pub fn segment_count(&self) -> usize {
        self.files.len()
    }

    /// Makes the batch durable without blocking the executor: an io_uring
    /// fdatasync of each dirty segment, then of the directory if segments
    /// were created or removed. Must run on a glommio executor. A failure is
    /// returned as `StoreError::Io` and must be treated as fatal: after a
    /// failed fsync the kernel may have dropped the dirty pages, so retrying
    /// could report durability that does not exist.
    ///
    /// Cancel safety: dropping the future leaves the batch unfinished; drop
    /// the batch and call `begin_commit` again, which syncs its files anew.
    pub async fn sync(&self) -> Result<(), StoreError> {
        for handle in self.sync_files() {
            handle?.fdatasync().await?;
        }
        Ok(())
    }

    /// The files `sync` makes durable, in its order (the dirty segments,
    /// then the directory if segments were created or removed), once the
    /// storage allows each, checked as each is reached: for a caller that
    /// runs the fdatasyncs itself (the shard, through its socket ring). The
    /// same rules as `sync`: a failure is fatal, and the files stay open
    /// while the batch lives.
    pub fn sync_files(&self) -> impl Iterator<Item = Result<&SyncHandle, StoreError>> + '_ {
        self.files
            .iter()
            .map(|(h, _)| h)
            .chain(&self.dir)
            .map(|handle| {
                self.storage.check_sync(&handle.path)?;
                Ok(&**handle)
            })
    }

    /// Makes the batch durable with blocking fdatasyncs on this thread,
    /// for code that runs without an executor: the simulation and tests of
    /// the delivery engine. The server uses `sync`.
    pub fn sync_blocking(&self) -> Result<(), StoreError> {
        for (handle, _) in &self.files {
            self.storage.check_sync(&handle.path)?;
            handle.file.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            self.storage.check_sync(&dir.path)?;
            dir.file.sync_data()?;
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Finished {
        self.finished = true;
        self.shared.in_flight.set(false);
        Finished {
            ticket: self.ticket,
            end: self.end,
            files: std::mem::take(&mut self.files),
            unlinks: std::mem::take(&mut self.unlinks),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for CommitBatch {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.shared.in_flight.set(false);
        self.shared
            .returned_files
            .borrow_mut()
            .extend(self.files.drain(..).map(|(h, _)| h));
        if self.dir.is_some() {
            self.shared.returned_dir.set(true);
        }
    }
}
