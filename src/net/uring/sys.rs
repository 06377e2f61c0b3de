//! The only module of `net::uring` with `unsafe` code: the ring, the
//! provided-buffer ring, the send slots, the eventfd.
//!
//! The ring shares memory with the kernel. Every pointer an SQE carries must
//! stay valid until the kernel posts the operation's last completion. This
//! module makes that true by owning everything an SQE points to:
//! - provided buffers and the buffer ring live in `BufRing`, owned by
//!   `Ring`, and the kernel only writes buffers it has not handed to us yet;
//!   we read a buffer only between the completion that hands it over and
//!   `recycle`, which gives it back;
//! - a sendmsg points at a `SendSlot` (boxed, so its address never moves)
//!   that holds the `msghdr`, the iovecs and a clone of every `Bytes` handle
//!   the iovecs point into; a slot is freed only by the completion of its
//!   send;
//! - timeouts point at timespecs boxed inside `Ring`;
//! - `Ring::drop` cancels everything and waits for the last completion
//!   before any of the above is freed (and leaks them if the kernel never
//!   answers, rather than free memory the kernel may still write).
//!
//! Nothing outside this module can make the kernel touch freed memory: the
//! safe API takes no raw pointer and hands out no buffer the kernel owns.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{info, warn};

/// iovecs in one sendmsg: how many queued frames one send can carry.
pub const IOVECS_PER_SEND: usize = 16;

/// What an operation is; the top byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Accept = 1,
    AcceptRetry = 2,
    Recv = 3,
    Send = 4,
    Cancel = 5,
    Shutdown = 6,
    Linger = 7,
    /// Cancels issued by `Ring::drop`; no record behind them.
    Drain = 8,
    /// An fdatasync for the shard's log; `index` is the caller's number.
    Sync = 9,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Accept,
            2 => Kind::AcceptRetry,
            3 => Kind::Recv,
            4 => Kind::Send,
            5 => Kind::Cancel,
            6 => Kind::Shutdown,
            7 => Kind::Linger,
            8 => Kind::Drain,
            9 => Kind::Sync,
            _ => return None,
        })
    }
}

/// The 64-bit user data of an SQE: `kind (8 bits) | generation (24 bits) |
/// index (32 bits)`. For connection operations `index` is the slab slot and
/// `generation` the slot's generation when the operation was submitted, so
/// a completion that outlives its connection never matches a reused slot.
/// For sends the user data names the send slot; the slot remembers the
/// connection's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    pub generation: u32,
    pub index: u32,
}

/// Generations wrap at 24 bits.
pub const GENERATION_MASK: u32 = (1 << 24) - 1;

impl Token {
    pub fn encode(self) -> u64 {
        ((self.kind as u64) << 56)
            | (((self.generation & GENERATION_MASK) as u64) << 32)
            | self.index as u64
    }

    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            kind: Kind::from_byte((user_data >> 56) as u8)?,
            generation: ((user_data >> 32) as u32) & GENERATION_MASK,
            index: user_data as u32,
        })
    }
}

/// One completion, decoded. For sends, `token` is the owning connection's
/// (kind `Send`), copied from the send slot, which is already free.
#[derive(Debug)]
pub struct Completion {
    pub token: Token,
    pub result: i32,
    /// The operation stays armed (a multishot that goes on).
    pub more: bool,
    /// The provided buffer holding the data of a recv; ours until recycled.
    pub buffer: Option<u16>,
    /// The socket of a successful accept.
    pub accepted: Option<OwnedFd>,
}

/// The completions a batched wait in the ring (`Ring::wait`) gathers before
/// it returns early: a loop turn's worth of socket events.
const WAIT_BATCH_COMPLETIONS: usize = 64;

/// How the ring was set up, for logs and docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupMode {
    /// SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG: completions are posted
    /// only when this thread enters the ring; nothing interrupts the shard.
    DeferTaskrun,
    /// SINGLE_ISSUER | COOP_TASKRUN | TASKRUN_FLAG.
    CoopTaskrun,
    /// No optional flags (old kernels).
    Plain,
}

/// Counters the driver reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounters {
    /// io_uring_enter calls made by this ring.
    pub enters: u64,
    /// Completions reaped.
    pub completions: u64,
    /// Recvs that ended with ENOBUFS (buffer ring empty).
    pub no_buffers: u64,
}

/// A ring of provided buffers (IORING_REGISTER_PBUF_RING).
struct BufRing {
    /// The ring entries shared with the kernel; page-aligned. Raw (no
    /// `&[u8]` over it ever exists): the kernel reads it concurrently.
    entries: memmap2::MmapRaw,
    /// The buffers; page-aligned, `count * size` bytes. Raw for the same
    /// reason: the kernel writes buffers we do not hold.
    memory: memmap2::MmapRaw,
    count: u16,
    size: u32,
    group: u16,
    /// Our copy of the tail, published with a release store.
    tail: u16,
    /// Buffers the kernel handed to us and that we have not recycled.
    ours: Vec<bool>,
}

/// The kernel's `struct io_uring_buf`.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    /// Of the first entry, the ring's tail; never written as a field here.
    resv: u16,
}

impl BufRing {
    fn new(count: u16, size: u32, group: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two(), "buffer count is a power of two");
        assert!(size > 0, "buffers have a size");
        // Populated up front: the buffers are a fixed cost of the shard, so
        // its RSS does not creep up as connections touch fresh buffers, and
        // the hot path takes no page faults.
        let entries = memmap2::MmapRaw::from(
            memmap2::MmapOptions::new()
                .len(count as usize * std::mem::size_of::<RawBuf>())
                .populate()
                .map_anon()?,
        );
        let memory = memmap2::MmapRaw::from(
            memmap2::MmapOptions::new()
                .len(count as usize * size as usize)
                .populate()
                .map_anon()?,
        );
        Ok(BufRing {
            entries,
            memory,
            count,
            size,
            group,
            tail: 0,
            ours: vec![true; count as usize],
        })
    }

    fn entry(&mut self, slot: u16) -> *mut RawBuf {
        let base = self.entries.as_mut_ptr().cast::<RawBuf>();
        // SAFETY: `slot & (count - 1)` is below `count`, and the mapping holds
        // `count` entries, so the pointer stays inside the mapping.
        unsafe { base.add((slot & (self.count - 1)) as usize) }
    }

    /// Puts buffer `bid` at the tail (not yet published).
    fn push(&mut self, bid: u16) {
        assert!(
            self.ours[bid as usize],
            "only a buffer we hold is given back"
        );
        self.ours[bid as usize] = false;
        let addr = self.memory.as_ptr() as u64 + bid as u64 * self.size as u64;
        let len = self.size;
        let entry = self.entry(self.tail);
        // SAFETY: the entry at the unpublished tail is not read by the kernel
        // (it reads only between its head and our published tail, and at most
        // `count` buffers are ever in the ring, so this slot was consumed).
        // The fields are written one by one: `resv` of the first entry is the
        // shared tail and must not be overwritten.
        unsafe {
            std::ptr::addr_of_mut!((*entry).addr).write(addr);
            std::ptr::addr_of_mut!((*entry).len).write(len);
            std::ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed buffer visible to the kernel.
    fn publish(&mut self) {
        let base = self.entries.as_mut_ptr();
        // SAFETY: the tail is the u16 at byte 14 of the page-aligned ring
        // (the `resv` of entry 0), so it is aligned for an AtomicU16; the
        // kernel reads it with an acquire load, we store with release so the
        // entries written before are visible first.
        let tail = unsafe { &*(base.add(14).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }

    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(self.ours[bid as usize], "only a buffer we hold is read");
        assert!(len <= self.size as usize, "a recv fits its buffer");
        let start = bid as usize * self.size as usize;
        // SAFETY: `bid` is ours (asserted): the kernel handed it over with
        // its completion and writes it again only after `push` gives it
        // back, which needs `&mut self` and so ends this borrow first. The
        // slice covers only this buffer, never memory the kernel may be
        // writing, and lies inside the mapping (`bid < count`,
        // `len <= size`).
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().add(start), len) }
    }
}

/// The memory one sendmsg points to.
struct SendSlot {
    msg: libc::msghdr,
    iov: [libc::iovec; IOVECS_PER_SEND],
    /// Keeps the bytes the iovecs point into alive until the completion.
    frames: Vec<Bytes>,
    /// The owning connection (kind `Send`).
    owner: Token,
    busy: bool,
}

/// The per-shard socket ring.
pub struct Ring {
    ring: IoUring,
    mode: SetupMode,
    bufs: BufRing,
    /// Boxed so a slot's address (held by the kernel while its send is in
    /// flight) never moves when the vector grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<SendSlot>>,
    free_slots: Vec<u32>,
    send_slots_max: u32,
    timespecs: Box<[types::Timespec; 2]>,
    /// Operations submitted (or queued) whose last completion has not been
    /// reaped.
    in_flight: u64,
    counters: RingCounters,
    /// Raw completions of one reap, kept so reaping does not allocate.
    reaped: Vec<(u64, i32, u32)>,
}

/// Which boxed timespec a timeout uses.
#[derive(Clone, Copy, Debug)]
pub enum Delay {
    /// Before re-arming an accept that failed (EMFILE and friends).
    AcceptRetry = 0,
    /// How long a closing connection lingers for the peer's FIN.
    Linger = 1,
}

/// Settings of `Ring::new`.
#[derive(Clone, Copy, Debug)]
pub struct RingSetup {
    /// The most capable setup to try (tests force the fallbacks).
    pub mode_max: SetupMode,
    pub sq_entries: u32,
    pub buffer_count: u16,
    pub buffer_bytes: u32,
    pub buffer_group: u16,
    pub send_slots_max: u32,
    pub accept_retry: Duration,
    pub linger: Duration,
}

impl Ring {
    /// Builds the ring with the best setup this kernel accepts, registers
    /// the provided-buffer ring and fills it.
    pub fn new(setup: RingSetup) -> io::Result<Ring> {
        let (ring, mode) = build_ring(setup.sq_entries, setup.mode_max)?;
        let mut bufs = BufRing::new(setup.buffer_count, setup.buffer_bytes, setup.buffer_group)?;
        // SAFETY: the entries mapping is page-aligned, holds `buffer_count`
        // entries and lives in `self.bufs` until after the ring is closed
        // (field order of `Ring`, and `Drop` drains first).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.entries.as_ptr() as u64,
                bufs.count,
                bufs.group,
                0,
            )?;
        }
        for bid in 0..bufs.count {
            bufs.push(bid);
        }
        bufs.publish();
        Ok(Ring {
            ring,
            mode,
            bufs,
            slots: Vec::new(),
            free_slots: Vec::new(),
            send_slots_max: setup.send_slots_max,
            timespecs: Box::new([
                types::Timespec::from(setup.accept_retry),
                types::Timespec::from(setup.linger),
            ]),
            in_flight: 0,
            counters: RingCounters::default(),
            reaped: Vec::new(),
        })
    }

    pub fn mode(&self) -> SetupMode {
        self.mode
    }

    pub fn counters(&self) -> RingCounters {
        self.counters
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Operations queued in the submission queue and not yet submitted.
    pub fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// The kernel signals `fd` when completions (or deferred work) wait.
    pub fn register_eventfd(&self, fd: RawFd) -> io::Result<()> {
        self.ring.submitter().register_eventfd(fd)
    }

    /// Turns the kernel's eventfd signals on or off
    /// (`IORING_CQ_EVENTFD_DISABLED`). Off while the shard's loop runs, so
    /// completions it collects itself (its own sends, mostly) do not wake
    /// it again; on before it parks.
    pub fn set_eventfd_enabled(&mut self, enabled: bool) {
        let cq = self.ring.completion();
        if enabled {
            cq.enable_eventfd();
        } else {
            cq.disable_eventfd();
        }
        // The kernel posts a completion, then reads the flag; we write the
        // flag, then read the queue. Without a full fence both reads could
        // see the old value and a completion would wake nobody.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        for attempt in 0.. {
            if attempt == 2 {
                // The kernel took nothing (its completion queue is full):
                // the caller reaps and tries again next turn.
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            {
                let mut sq = self.ring.submission();
                if !sq.is_full() {
                    // SAFETY: every entry built by this module points only to
                    // memory owned by `self` (buffer ring, send slots,
                    // timespecs) that outlives the operation; see the module
                    // doc.
                    unsafe { sq.push(&entry) }.expect("the queue has room");
                    break;
                }
            }
            self.submit()?;
        }
        self.in_flight += 1;
        Ok(())
    }

    pub fn accept_multishot(&mut self, listener: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    pub fn recv_multishot(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), self.bufs.group)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Cancels the operation with user data `target`.
    pub fn cancel(&mut self, target: Token, token: Token) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target.encode())
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Cancels the sendmsg in flight for `owner` (a connection's `Send`
    /// token), if any; returns whether a cancel was queued.
    ///
    /// A send's user data names its slot, not its connection, so the slot is
    /// looked up here. It cannot name another connection's send by the time
    /// the kernel sees the cancel: a slot is freed only when its completion
    /// is reaped, and the next enter submits this cancel before it reaps.
    ///
    /// Cancels always name one operation's user data: the kernel finds that
    /// in a hash table, while a cancel by descriptor scans every armed poll
    /// of the ring (a burst of N closes then costs N × N).
    pub fn cancel_send(&mut self, owner: Token, token: Token) -> io::Result<bool> {
        let Some(index) = self
            .slots
            .iter()
            .position(|slot| slot.busy && slot.owner == owner)
        else {
            return Ok(false);
        };
        let target = Token {
            kind: Kind::Send,
            generation: 0,
            index: index as u32,
        };
        self.cancel(target, token)?;
        Ok(true)
    }

    /// fdatasync of `fd`, which must stay open until its completion; the
    /// kernel runs it on a worker thread.
    pub fn fdatasync(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    pub fn shutdown_write(&mut self, fd: RawFd, token: Token) -> io::Result<()> {
        let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    pub fn timeout(&mut self, delay: Delay, token: Token) -> io::Result<()> {
        let timespec: *const types::Timespec = &self.timespecs[delay as usize];
        let entry = opcode::Timeout::new(timespec)
            .build()
            .user_data(token.encode());
        self.push(entry)
    }

    /// Starts one sendmsg of the front of `queue` (skipping `offset` bytes of
    /// the first frame), at most `bytes_max` bytes and `IOVECS_PER_SEND`
    /// frames. Returns the bytes in flight, or `None` when every send slot is
    /// busy (try again after a send completes).
    pub fn send(
        &mut self,
        fd: RawFd,
        owner: Token,
        queue: &VecDeque<Bytes>,
        offset: usize,
        bytes_max: usize,
    ) -> io::Result<Option<usize>> {
        assert!(!queue.is_empty(), "a send carries bytes");
        let index = match self.free_slots.pop() {
            Some(index) => index,
            None if (self.slots.len() as u32) < self.send_slots_max => {
                self.slots.push(Box::new(SendSlot {
                    // SAFETY: msghdr and iovec are plain C structs for which
                    // all-zero bytes are a valid (empty) value.
                    msg: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    iov: unsafe { std::mem::zeroed() },
                    frames: Vec::with_capacity(IOVECS_PER_SEND),
                    owner,
                    busy: false,
                }));
                (self.slots.len() - 1) as u32
            }
            None => return Ok(None),
        };
        let slot = &mut self.slots[index as usize];
        assert!(!slot.busy, "a free slot is not in flight");
        slot.owner = owner;
        slot.frames.clear();
        let mut total = 0usize;
        let mut count = 0usize;
        for (position, frame) in queue.iter().enumerate() {
            if count == IOVECS_PER_SEND || total == bytes_max {
                break;
            }
            let skip = if position == 0 { offset } else { 0 };
            assert!(skip < frame.len(), "the offset lies inside the first frame");
            let len = (frame.len() - skip).min(bytes_max - total);
            slot.iov[count] = libc::iovec {
                iov_base: frame[skip..].as_ptr() as *mut libc::c_void,
                iov_len: len,
            };
            slot.frames.push(frame.clone());
            total += len;
            count += 1;
        }
        slot.msg.msg_name = std::ptr::null_mut();
        slot.msg.msg_namelen = 0;
        slot.msg.msg_iov = slot.iov.as_mut_ptr();
        slot.msg.msg_iovlen = count as _;
        slot.msg.msg_control = std::ptr::null_mut();
        slot.msg.msg_controllen = 0;
        slot.msg.msg_flags = 0;
        slot.busy = true;
        let msg: *const libc::msghdr = &slot.msg;
        let entry = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(
                Token {
                    kind: Kind::Send,
                    generation: 0,
                    index,
                }
                .encode(),
            );
        if let Err(err) = self.push(entry) {
            let slot = &mut self.slots[index as usize];
            slot.busy = false;
            slot.frames.clear();
            self.free_slots.push(index);
            return Err(err);
        }
        Ok(Some(total))
    }

    /// Submits queued operations and, where completions are deferred, runs
    /// the kernel's pending work so they are posted. Makes no syscall when
    /// nothing is queued and the kernel has nothing pending.
    pub fn submit(&mut self) -> io::Result<()> {
        let queued = self.ring.submission().len();
        let (taskrun, overflow) = {
            let sq = self.ring.submission();
            (sq.taskrun(), sq.cq_overflow())
        };
        let deferred = self.mode != SetupMode::Plain;
        if queued == 0 && !overflow && (deferred && !taskrun) {
            return Ok(());
        }
        self.counters.enters += 1;
        match self.ring.submitter().submit() {
            Ok(_) => Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => Ok(()),
            // The completion queue is full: the caller reaps, then submits.
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Submits what is queued and sleeps in this ring until a completion or
    /// deferred work is there, or `timeout` passes. With DEFER_TASKRUN the
    /// kernel wakes a thread waiting here directly when work is queued for
    /// it, without the eventfd.
    ///
    /// `batch_us` above 0 (and a kernel with `IORING_FEAT_MIN_TIMEOUT`,
    /// 6.12+): the wait gathers a batch first. It returns once
    /// `WAIT_BATCH_COMPLETIONS` completions are there, or after `batch_us`
    /// if at least one is; with none by then it goes on waiting for the
    /// first until `timeout`. A lone arrival in a quiet ring still wakes
    /// the thread at once after `batch_us` has passed since the wait began.
    pub fn wait(&mut self, timeout: Duration, batch_us: u32) -> io::Result<()> {
        let timeout = types::Timespec::from(timeout);
        let (want, args) = if batch_us > 0 && self.supports_wait_batch() {
            (
                WAIT_BATCH_COMPLETIONS,
                types::SubmitArgs::new()
                    .timespec(&timeout)
                    .min_wait_usec(batch_us),
            )
        } else {
            (1, types::SubmitArgs::new().timespec(&timeout))
        };
        self.counters.enters += 1;
        match self.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Whether the kernel takes a minimum batch wait (`wait`'s `batch_us`).
    pub fn supports_wait_batch(&self) -> bool {
        self.ring.params().is_feature_min_timeout()
    }

    /// Whether the kernel holds work for this ring that only an enter with
    /// GETEVENTS runs (`IORING_SQ_TASKRUN`): deferred task work it has not
    /// run yet, or completions in its overflow list. Cheap; no syscall.
    pub fn kernel_work_pending(&mut self) -> bool {
        let sq = self.ring.submission();
        sq.taskrun() || sq.cq_overflow()
    }

    /// Whether completions wait in the queue (cheap; no syscall).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Reaps at most `max` completions into `out`.
    pub fn reap(&mut self, max: usize, out: &mut Vec<Completion>) {
        let mut raw = std::mem::take(&mut self.reaped);
        {
            let cq = self.ring.completion();
            for cqe in cq.take(max) {
                raw.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
        }
        for (user_data, result, flags) in raw.drain(..) {
            if let Some(completion) = self.complete(user_data, result, flags) {
                out.push(completion);
            }
        }
        self.reaped = raw;
    }

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> Option<Completion> {
        self.counters.completions += 1;
        let more = cqueue::more(flags);
        if !more {
            self.in_flight -= 1;
        }
        let mut token = Token::decode(user_data).expect("user data was encoded here");
        let buffer = cqueue::buffer_select(flags);
        if let Some(bid) = buffer {
            assert!(
                !self.bufs.ours[bid as usize],
                "the kernel hands out a buffer once"
            );
            self.bufs.ours[bid as usize] = true;
        }
        if token.kind == Kind::Recv && result == -libc::ENOBUFS {
            self.counters.no_buffers += 1;
        }
        if token.kind == Kind::Send {
            let slot = &mut self.slots[token.index as usize];
            assert!(slot.busy, "a send completes once");
            slot.busy = false;
            // The kernel is done with the iovecs: the bytes may go.
            slot.frames.clear();
            self.free_slots.push(token.index);
            token = slot.owner;
        }
        let accepted = if token.kind == Kind::Accept && result >= 0 {
            // SAFETY: a successful accept completion carries a new descriptor
            // that nothing else owns.
            Some(unsafe { OwnedFd::from_raw_fd(result) })
        } else {
            None
        };
        if token.kind == Kind::Drain {
            if let Some(bid) = buffer {
                self.bufs.push(bid);
            }
            return None;
        }
        Some(Completion {
            token,
            result,
            more,
            buffer,
            accepted,
        })
    }

    /// The bytes a recv completion put in provided buffer `bid`.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        self.bufs.bytes(bid, len)
    }

    /// Gives buffer `bid` back to the kernel (visible after `publish`).
    pub fn recycle(&mut self, bid: u16) {
        self.bufs.push(bid);
    }

    pub fn publish(&mut self) {
        self.bufs.publish();
    }

    /// Buffers currently in the kernel's hands.
    pub fn buffers_available(&self) -> usize {
        self.bufs.ours.iter().filter(|ours| !**ours).count()
    }

    /// Cancels everything and waits for every completion, so nothing the
    /// kernel may still write is freed. Returns false if the kernel did not
    /// answer in time (the caller must then leak the memory).
    fn drain(&mut self) -> bool {
        let token = Token {
            kind: Kind::Drain,
            generation: 0,
            index: 0,
        };
        for _ in 0..100 {
            if self.in_flight == 0 {
                return true;
            }
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(token.encode());
            if self.push(cancel).is_err() {
                continue;
            }
            let timeout = types::Timespec::from(Duration::from_millis(100));
            let args = types::SubmitArgs::new().timespec(&timeout);
            self.counters.enters += 1;
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let mut done = Vec::new();
            loop {
                let before = done.len();
                self.reap(1024, &mut done);
                for completion in done.drain(..) {
                    if let Some(bid) = completion.buffer {
                        self.bufs.push(bid);
                    }
                }
                if before == done.len() && !self.has_completions() {
                    break;
                }
            }
        }
        self.in_flight == 0
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.drain() {
            warn!(
                in_flight = self.in_flight,
                "socket ring did not drain; leaking its buffers"
            );
            let bufs = std::mem::replace(
                &mut self.bufs,
                BufRing::new(1, 1, 0).expect("a one-byte mapping"),
            );
            std::mem::forget(bufs);
            std::mem::forget(std::mem::take(&mut self.slots));
            let timespecs =
                std::mem::replace(&mut self.timespecs, Box::new([types::Timespec::new(); 2]));
            std::mem::forget(timespecs);
        }
    }
}

fn build_ring(entries: u32, mode_max: SetupMode) -> io::Result<(IoUring, SetupMode)> {
    let cq_entries = entries.saturating_mul(4);
    if mode_max == SetupMode::DeferTaskrun {
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq_entries)
            .build(entries);
        match deferred {
            Ok(ring) => return Ok((ring, SetupMode::DeferTaskrun)),
            Err(err) => info!(%err, "socket ring: DEFER_TASKRUN refused, trying COOP_TASKRUN"),
        }
    }
    if mode_max != SetupMode::Plain {
        let coop = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(cq_entries)
            .build(entries);
        match coop {
            Ok(ring) => return Ok((ring, SetupMode::CoopTaskrun)),
            Err(err) => info!(%err, "socket ring: COOP_TASKRUN refused, using no setup flags"),
        }
    }
    let ring = IoUring::builder().setup_cqsize(cq_entries).build(entries)?;
    Ok((ring, SetupMode::Plain))
}

/// A new eventfd (blocking reads, so a read through glommio waits).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; a non-negative result is a new
    // descriptor nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter (wakes its reader).
pub fn eventfd_signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    let _ = nix::unistd::write(fd, &one);
}

/// Hands an eventfd to glommio for reading.
pub fn glommio_file(fd: OwnedFd) -> glommio::io::BufferedFile {
    use std::os::fd::IntoRawFd;
    // SAFETY: `fd` is open and its ownership moves into the file.
    unsafe { glommio::io::BufferedFile::from_raw_fd(fd.into_raw_fd()) }
}
