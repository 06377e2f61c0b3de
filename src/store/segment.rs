//! Segment files: fixed-size, preallocated, mapped once with memmap2 and
//! never grown while mapped.
//!
//! A segment is named by its zero-padded sequence number (`0000000001.seg`)
//! so a directory listing sorts in log order. Its first 64 bytes are a
//! header (magic, format version, shard id, segment sequence, size,
//! creation time, CRC32C); records follow from byte 64. The unwritten rest
//! is zeros, which is how the end of the log is found.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use memmap2::{Mmap, MmapMut, MmapOptions};

use super::storage::Storage;

pub const SEGMENT_MAGIC: [u8; 8] = *b"SWBDLOG\0";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_BYTES: u32 = 64;
pub const SEGMENT_SUFFIX: &str = ".seg";

/// The decoded segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    pub seq: u32,
    pub size_bytes: u64,
    pub created_ms: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES as usize] {
        let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
        h[0..8].copy_from_slice(&SEGMENT_MAGIC);
        h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.shard.to_le_bytes());
        h[16..20].copy_from_slice(&self.seq.to_le_bytes());
        h[24..32].copy_from_slice(&self.size_bytes.to_le_bytes());
        h[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
        if bytes.len() < SEGMENT_HEADER_BYTES as usize {
            return Err("segment shorter than its header");
        }
        let h = &bytes[..SEGMENT_HEADER_BYTES as usize];
        if h.iter().all(|&b| b == 0) {
            return Err("segment header is zeros");
        }
        if h[0..8] != SEGMENT_MAGIC {
            return Err("bad segment magic");
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().expect("4 bytes"));
        if crc32c::crc32c(&h[..60]) != crc {
            return Err("segment header checksum mismatch");
        }
        let le32 = |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().expect("4"));
        let le64 = |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().expect("8"));
        if le32(8..12) != SEGMENT_VERSION {
            return Err("unknown segment version");
        }
        Ok(SegmentHeader {
            shard: le32(12..16),
            seq: le32(16..20),
            size_bytes: le64(24..32),
            created_ms: le64(32..40),
        })
    }
}

pub fn file_name(seq: u32) -> String {
    format!("{seq:010}{SEGMENT_SUFFIX}")
}

pub fn parse_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by sequence.
pub fn list(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A file the commit path fsyncs: a segment or the log directory. The
/// io_uring handle is made lazily, on the executor, from a duplicate of the
/// descriptor, and kept for the file's life.
pub struct SyncHandle {
    pub path: PathBuf,
    pub file: File,
    uring: RefCell<Option<Rc<glommio::io::BufferedFile>>>,
}

impl SyncHandle {
    pub fn new(path: PathBuf, file: File) -> SyncHandle {
        SyncHandle {
            path,
            file,
            uring: RefCell::new(None),
        }
    }

    /// fdatasync through the executor's ring; the executor keeps running.
    /// Must be called on a glommio executor thread.
    pub async fn fdatasync(&self) -> io::Result<()> {
        let handle = {
            let mut slot = self.uring.borrow_mut();
            match &*slot {
                Some(h) => h.clone(),
                None => {
                    let h = Rc::new(uring_handle(&self.file)?);
                    *slot = Some(h.clone());
                    h
                }
            }
        };
        handle.fdatasync().await.map_err(io::Error::from)
    }
}

/// One mapped segment.
pub struct Segment {
    pub seq: u32,
    pub handle: Rc<SyncHandle>,
    pub map: MmapMut,
    /// Next byte to write; everything from here to the end is zeros.
    pub write_offset: u32,
}

impl Segment {
    /// Creates, preallocates and maps a new segment and writes its header.
    pub fn create(storage: &dyn Storage, dir: &Path, header: SegmentHeader) -> io::Result<Segment> {
        let path = dir.join(file_name(header.seq));
        let file = storage.create_preallocated(&path, header.size_bytes)?;
        Segment::start(storage, path, file, header)
    }

    /// Maps a new segment's preallocated file and writes its header.
    fn start(
        storage: &dyn Storage,
        path: PathBuf,
        file: File,
        header: SegmentHeader,
    ) -> io::Result<Segment> {
        let mut map = map_mut(&file, header.size_bytes)?;
        map[..SEGMENT_HEADER_BYTES as usize].copy_from_slice(&header.encode());
        storage.wrote(&path, 0, SEGMENT_HEADER_BYTES as u64);
        let segment = Segment {
            seq: header.seq,
            handle: Rc::new(SyncHandle::new(path, file)),
            map,
            write_offset: SEGMENT_HEADER_BYTES,
        };
        segment.advise_unwritten();
        Ok(segment)
    }

    /// Makes a segment of a spare file made by `preallocate_spare`: renames
    /// it to the segment's name, maps it and writes the header. On an error
    /// neither the spare nor the segment's file is left behind.
    pub fn create_from_spare(
        storage: &dyn Storage,
        dir: &Path,
        spare: &Path,
        file: File,
        header: SegmentHeader,
    ) -> io::Result<Segment> {
        let sized = match file.metadata() {
            Ok(m) if m.len() == header.size_bytes => Ok(()),
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the spare file is not a segment's size",
            )),
            Err(e) => Err(e),
        };
        if let Err(error) = sized {
            let _ = std::fs::remove_file(spare);
            return Err(error);
        }
        let path = dir.join(file_name(header.seq));
        if let Err(error) = std::fs::rename(spare, &path) {
            let _ = std::fs::remove_file(spare);
            return Err(error);
        }
        Segment::start(storage, path.clone(), file, header).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    /// Maps an existing segment for recovery and appending.
    pub fn open(seq: u32, path: PathBuf) -> io::Result<Segment> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let size = file.metadata()?.len();
        let map = map_mut(&file, size)?;
        Ok(Segment {
            seq,
            handle: Rc::new(SyncHandle::new(path, file)),
            map,
            write_offset: SEGMENT_HEADER_BYTES,
        })
    }

    pub fn size_bytes(&self) -> u32 {
        self.map.len() as u32
    }

    /// Turns the kernel's read-ahead off for the part of the map not yet
    /// written (from the page holding `write_offset` to the end), so each
    /// append that reaches a new page faults in that page alone.
    ///
    /// With read-ahead on, the first write fault past a read-ahead window
    /// made the kernel read ahead of it: for a preallocated file that means
    /// zero-filling up to the device's read-ahead size (8 MiB on this
    /// machine's disk) in large folios, on the shard's thread, inside one
    /// append. At 20,000 msg/s that was a 15-28 ms stall every second or
    /// so, the longest single poll of the socket loop and the maximum
    /// latency (docs/benchmarks.md, "Read-ahead in the log's mapping").
    /// Nothing reads the unwritten part but the appends themselves, so
    /// read-ahead there never pays.
    pub fn advise_unwritten(&self) {
        let page = page_size();
        let start = (self.write_offset as usize / page) * page;
        if start >= self.map.len() {
            return;
        }
        if let Err(error) =
            self.map
                .advise_range(memmap2::Advice::Random, start, self.map.len() - start)
        {
            // Only a cost: appends then fault with read-ahead.
            tracing::debug!(%error, seq = self.seq, "madvise(MADV_RANDOM) on the segment's tail");
        }
    }
}

/// The size of a memory page (4 KiB where `sysconf` cannot say).
fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(size)) if size > 0 => size as usize,
        _ => 4096,
    }
}

/// A glommio handle on a duplicate of `file`'s descriptor, for operations
/// through the executor's ring.
fn uring_handle(file: &File) -> io::Result<glommio::io::BufferedFile> {
    let fd = file.try_clone()?.into_raw_fd();
    // SAFETY: `fd` was just duplicated for this handle alone; the
    // BufferedFile becomes its only owner and closes it.
    Ok(unsafe { glommio::io::BufferedFile::from_raw_fd(fd) })
}

/// Creates `path` (new) with `size_bytes` allocated, the fallocate going
/// through the executor's ring (the kernel runs it on a worker thread, so
/// the shard keeps running). Must be called on a glommio executor thread.
/// The roll that takes the file checks its size.
pub async fn preallocate_spare(path: &Path, size_bytes: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let allocated = match uring_handle(&file) {
        Ok(uring) => {
            let allocated = uring.pre_allocate(size_bytes, false).await;
            let _ = uring.close().await;
            allocated.map_err(io::Error::from)
        }
        Err(error) => Err(error),
    };
    match allocated {
        Ok(()) => Ok(file),
        Err(error) => {
            let _ = std::fs::remove_file(path);
            Err(error)
        }
    }
}

fn map_mut(file: &File, size_bytes: u64) -> io::Result<MmapMut> {
    if size_bytes == 0 || size_bytes > u32::MAX as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "segment size out of range",
        ));
    }
    // SAFETY: the segment file lives in the shard's own log directory and is
    // touched only by this log (or, read-only, by `log inspect`); it is never
    // truncated or resized while mapped, so the mapping stays backed for its
    // whole life. Concurrent external modification is outside the contract.
    unsafe { MmapOptions::new().len(size_bytes as usize).map_mut(file) }
}

/// Maps a segment read-only (for `log inspect`).
pub fn map_read_only(path: &Path) -> io::Result<Option<Mmap>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(None);
    }
    // SAFETY: read-only mapping of a segment file; a server running at the
    // same time only appends into zeroed, preallocated space and never
    // truncates, so every mapped page stays backed.
    unsafe { MmapOptions::new().len(size as usize).map(&file) }.map(Some)
}
