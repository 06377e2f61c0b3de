//! The media service's bookkeeping in memory: unfinished uploads (their
//! offsets and who is writing them), bytes stored and reserved, the upload
//! rate per device, and which blobs are being stored or deleted right now.
//! Pure: no I/O, the caller passes the time; one `Mutex<Ledger>` is shared
//! by the request handlers and the sweep, held only for these short calls,
//! never across I/O.
//!
//! Invariants:
//! - `reserved_bytes` is the sum of the sizes of `uploads`; `devices[d]`
//!   lists exactly `d`'s uploads and the sum of their sizes, and exists
//!   only while `d` has one. An upload's bytes are reserved from admission
//!   until it finishes or is dropped.
//! - an upload marked `busy` has one owner (a PATCH, its admission, or the
//!   sweep dropping it); nobody else changes its offset or removes it.
//! - a blob id in `claims` has one owner (an upload storing it, the sweep
//!   deleting it, or a POST extending its expiry): the others wait or step
//!   aside, so a blob is never deleted under a finishing upload or a
//!   renewal.

use std::collections::{HashMap, HashSet};

use super::error::ApiError;
use super::ids::{BlobId, UploadId, Uploader};
use super::limits::RateLimiter;
use crate::config::MediaConfig;

/// An unfinished upload as the ledger keeps it (about 100 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UploadEntry {
    pub uploader: Uploader,
    pub size_bytes: u64,
    /// The blob id announced at creation: the SHA-256 the bytes must have.
    pub blob: BlobId,
    pub created_ms: u64,
    /// Bytes staged durably so far.
    pub offset: u64,
    pub busy: bool,
}

/// What `admit` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A new upload, reserved and `busy` until `admitted` or `discard`.
    New(UploadEntry),
    /// The device's own unfinished upload of the same bytes (same SHA-256
    /// and size): the POST is a repeat, answered with this upload.
    Existing(UploadId, UploadEntry),
}

/// The bounds the ledger enforces (from `MediaConfig`).
#[derive(Clone, Copy, Debug)]
pub struct LedgerLimits {
    pub store_bytes_max: u64,
    pub uploads_in_flight_max: u32,
    pub device_uploads_in_flight_max: u32,
    pub device_bytes_per_day: u64,
    pub upload_ttl_ms: u64,
}

impl LedgerLimits {
    pub fn from_config(config: &MediaConfig) -> LedgerLimits {
        LedgerLimits {
            store_bytes_max: config.store_bytes_max,
            uploads_in_flight_max: config.uploads_in_flight_max,
            device_uploads_in_flight_max: config.device_uploads_in_flight_max,
            device_bytes_per_day: config.device_bytes_per_day,
            upload_ttl_ms: config.upload_ttl_s.saturating_mul(1_000),
        }
    }
}

/// One device's unfinished uploads: their ids (at most
/// `device_uploads_in_flight_max`, unless a restart recovered more under a
/// lower limit) and the bytes they reserve. About 80 bytes plus 16 per
/// upload.
#[derive(Debug, Default)]
struct DeviceUploads {
    reserved_bytes: u64,
    uploads: Vec<UploadId>,
}

#[derive(Debug)]
pub struct Ledger {
    limits: LedgerLimits,
    /// Bytes of the blobs in the index (expired ones too, until swept).
    blob_bytes: u64,
    reserved_bytes: u64,
    uploads: HashMap<UploadId, UploadEntry>,
    devices: HashMap<Uploader, DeviceUploads>,
    claims: HashSet<BlobId>,
    pub rate: RateLimiter,
}

impl Ledger {
    pub fn new(limits: LedgerLimits, uploads_per_minute: u32, blob_bytes: u64) -> Ledger {
        Ledger {
            limits,
            blob_bytes,
            reserved_bytes: 0,
            uploads: HashMap::new(),
            devices: HashMap::new(),
            claims: HashSet::new(),
            rate: RateLimiter::new(uploads_per_minute),
        }
    }

    pub fn blob_bytes(&self) -> u64 {
        self.blob_bytes
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    pub fn uploads_in_flight(&self) -> usize {
        self.uploads.len()
    }

    fn reserve(&mut self, id: UploadId, entry: UploadEntry) {
        let previous = self.uploads.insert(id, entry);
        assert!(previous.is_none(), "upload ids are unique");
        self.reserved_bytes += entry.size_bytes;
        let device = self.devices.entry(entry.uploader).or_default();
        device.reserved_bytes += entry.size_bytes;
        device.uploads.push(id);
    }

    fn release(&mut self, id: UploadId) -> Option<UploadEntry> {
        let entry = self.uploads.remove(&id)?;
        self.reserved_bytes -= entry.size_bytes;
        let device = self
            .devices
            .get_mut(&entry.uploader)
            .expect("a reserved upload is listed under its device");
        device.reserved_bytes -= entry.size_bytes;
        let at = device
            .uploads
            .iter()
            .position(|listed| *listed == id)
            .expect("a reserved upload is listed under its device");
        device.uploads.swap_remove(at);
        if device.uploads.is_empty() {
            assert_eq!(
                device.reserved_bytes, 0,
                "a device's bytes are its uploads'"
            );
            self.devices.remove(&entry.uploader);
        }
        Some(entry)
    }

    /// `uploader`'s live unfinished upload of `blob` with `size_bytes`, if
    /// any (at most `device_uploads_in_flight_max` entries are looked at).
    fn existing(
        &self,
        uploader: Uploader,
        size_bytes: u64,
        blob: BlobId,
        now_ms: u64,
    ) -> Option<(UploadId, UploadEntry)> {
        let device = self.devices.get(&uploader)?;
        device.uploads.iter().find_map(|id| {
            let entry = self.uploads.get(id).expect("listed uploads are reserved");
            let same = entry.blob == blob && entry.size_bytes == size_bytes;
            (same && !self.is_stale(entry, now_ms)).then_some((*id, *entry))
        })
    }

    /// An upload found in the index at start (no limits apply: it was
    /// admitted before).
    pub fn recover(&mut self, id: UploadId, entry: UploadEntry) {
        self.reserve(
            id,
            UploadEntry {
                busy: false,
                ..entry
            },
        );
    }

    /// Admits a new upload or says why not. First, a device that has an
    /// unfinished upload of the same bytes (SHA-256 and size) gets that
    /// one back, whatever the limits: it reserves nothing new. Otherwise,
    /// in the documented order: the device's daily quota
    /// (`used_today_bytes` charged already, plus what its unfinished
    /// uploads reserve), the device's uploads in flight, all uploads in
    /// flight, then the store's total. An admitted upload is reserved and
    /// `busy` until `admitted` (its index row is written) or `discard`.
    pub fn admit(
        &mut self,
        id: UploadId,
        uploader: Uploader,
        size_bytes: u64,
        blob: BlobId,
        used_today_bytes: u64,
        now_ms: u64,
    ) -> Result<Admission, ApiError> {
        if let Some((existing, entry)) = self.existing(uploader, size_bytes, blob, now_ms) {
            return Ok(Admission::Existing(existing, entry));
        }
        let (reserved, device_uploads) = self.devices.get(&uploader).map_or((0, 0), |device| {
            (device.reserved_bytes, device.uploads.len())
        });
        if used_today_bytes
            .saturating_add(reserved)
            .saturating_add(size_bytes)
            > self.limits.device_bytes_per_day
        {
            return Err(ApiError::QuotaExceeded);
        }
        let device_limit = self.limits.device_uploads_in_flight_max;
        if device_uploads >= device_limit as usize {
            return Err(ApiError::DeviceUploadsInFlight {
                limit: device_limit,
            });
        }
        if self.uploads.len() >= self.limits.uploads_in_flight_max as usize {
            return Err(ApiError::TooManyUploads);
        }
        if self
            .blob_bytes
            .saturating_add(self.reserved_bytes)
            .saturating_add(size_bytes)
            > self.limits.store_bytes_max
        {
            return Err(ApiError::StoreFull);
        }
        let entry = UploadEntry {
            uploader,
            size_bytes,
            blob,
            created_ms: now_ms,
            offset: 0,
            busy: true,
        };
        self.reserve(id, entry);
        Ok(Admission::New(entry))
    }

    /// The admitted upload's index row is durable: it may be written.
    pub fn admitted(&mut self, id: UploadId) {
        if let Some(entry) = self.uploads.get_mut(&id) {
            entry.busy = false;
        }
    }

    fn live(
        &self,
        id: UploadId,
        uploader: Uploader,
        now_ms: u64,
    ) -> Result<&UploadEntry, ApiError> {
        let entry = self.uploads.get(&id).ok_or(ApiError::NotFound)?;
        if self.is_stale(entry, now_ms) {
            return Err(ApiError::NotFound);
        }
        if entry.uploader != uploader {
            return Err(ApiError::NotYourUpload);
        }
        Ok(entry)
    }

    fn is_stale(&self, entry: &UploadEntry, now_ms: u64) -> bool {
        entry.created_ms.saturating_add(self.limits.upload_ttl_ms) <= now_ms
    }

    /// An upload's state for HEAD and GET.
    pub fn status(
        &self,
        id: UploadId,
        uploader: Uploader,
        now_ms: u64,
    ) -> Result<UploadEntry, ApiError> {
        self.live(id, uploader, now_ms).copied()
    }

    /// Starts a PATCH at `offset`: the caller owns the upload until
    /// `end_patch`, `finish` or `discard`.
    pub fn begin_patch(
        &mut self,
        id: UploadId,
        uploader: Uploader,
        offset: u64,
        now_ms: u64,
    ) -> Result<UploadEntry, ApiError> {
        let entry = *self.live(id, uploader, now_ms)?;
        if entry.busy {
            return Err(ApiError::UploadBusy);
        }
        if entry.offset != offset {
            return Err(ApiError::OffsetMismatch {
                offset: entry.offset,
            });
        }
        let slot = self.uploads.get_mut(&id).expect("checked above");
        slot.busy = true;
        Ok(*slot)
    }

    /// Ends a PATCH that left the upload unfinished at `offset`.
    pub fn end_patch(&mut self, id: UploadId, offset: u64) {
        let entry = self
            .uploads
            .get_mut(&id)
            .expect("a busy upload stays until its owner removes it");
        assert!(entry.busy, "only the owner ends a patch");
        assert!(
            offset <= entry.size_bytes,
            "an offset never passes the size"
        );
        entry.offset = offset;
        entry.busy = false;
    }

    /// The upload became a blob (`new_blob`: one that was not in the index
    /// before, so its bytes now count).
    pub fn finish(&mut self, id: UploadId, new_blob: bool) {
        let entry = self.release(id).expect("the owner finishes its upload");
        if new_blob {
            self.blob_bytes += entry.size_bytes;
        }
    }

    /// The upload is dropped (hash mismatch, expiry, or a failed
    /// admission).
    pub fn discard(&mut self, id: UploadId) {
        self.release(id);
    }

    /// Up to `max` uploads past `upload_ttl` that nobody is writing, now
    /// owned (busy) by the caller, who discards them.
    pub fn take_stale(&mut self, now_ms: u64, max: usize) -> Vec<(UploadId, UploadEntry)> {
        let ttl_ms = self.limits.upload_ttl_ms;
        let mut out = Vec::new();
        for (id, entry) in self.uploads.iter_mut() {
            if out.len() == max {
                break;
            }
            if !entry.busy && entry.created_ms.saturating_add(ttl_ms) <= now_ms {
                entry.busy = true;
                out.push((*id, *entry));
            }
        }
        out
    }

    /// Takes ownership of `blob`, unless someone has it.
    pub fn claim(&mut self, blob: BlobId) -> bool {
        self.claims.insert(blob)
    }

    pub fn unclaim(&mut self, blob: BlobId) {
        let had = self.claims.remove(&blob);
        assert!(had, "only a claimed blob is released");
    }

    /// The sweep removed blobs of these many bytes from the index.
    pub fn blobs_removed(&mut self, bytes: u64) {
        assert!(bytes <= self.blob_bytes, "removed bytes were counted");
        self.blob_bytes -= bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, UserId};

    const LIMITS: LedgerLimits = LedgerLimits {
        store_bytes_max: 1_000,
        uploads_in_flight_max: 3,
        device_uploads_in_flight_max: 2,
        device_bytes_per_day: 500,
        upload_ttl_ms: 10_000,
    };

    fn device(n: u32) -> Uploader {
        Uploader {
            user: UserId(1),
            device: DeviceId(n),
        }
    }

    fn admit(ledger: &mut Ledger, id: u128, who: Uploader, size: u64) -> Result<(), ApiError> {
        match ledger.admit(UploadId(id), who, size, BlobId([id as u8; 32]), 0, 0)? {
            Admission::New(_) => {
                ledger.admitted(UploadId(id));
                Ok(())
            }
            Admission::Existing(..) => panic!("each test upload has bytes of its own"),
        }
    }

    #[test]
    fn refuses_in_the_documented_order() {
        let mut ledger = Ledger::new(LIMITS, 60, 600);
        // Quota before everything else.
        assert_eq!(
            ledger.admit(UploadId(1), device(1), 10, BlobId([1; 32]), 495, 0),
            Err(ApiError::QuotaExceeded)
        );
        admit(&mut ledger, 1, device(1), 300).unwrap();
        // The device's unfinished uploads count against its quota.
        assert_eq!(
            admit(&mut ledger, 2, device(1), 201),
            Err(ApiError::QuotaExceeded)
        );
        // 600 stored + 300 reserved + 101 > 1,000.
        assert_eq!(
            admit(&mut ledger, 2, device(2), 101),
            Err(ApiError::StoreFull)
        );
        admit(&mut ledger, 2, device(2), 50).unwrap();
        admit(&mut ledger, 3, device(2), 50).unwrap();
        // Quota before the device's uploads in flight (50 + 50 + 401 >
        // 500), and those before all uploads in flight (3 of 3).
        assert_eq!(
            admit(&mut ledger, 4, device(2), 401),
            Err(ApiError::QuotaExceeded)
        );
        assert_eq!(
            admit(&mut ledger, 4, device(2), 400),
            Err(ApiError::DeviceUploadsInFlight { limit: 2 })
        );
        // In flight before the store's total.
        assert_eq!(
            admit(&mut ledger, 4, device(4), 400),
            Err(ApiError::TooManyUploads)
        );
        assert_eq!(ledger.reserved_bytes(), 400);
        ledger.discard(UploadId(3));
        ledger.discard(UploadId(2));
        assert_eq!(ledger.reserved_bytes(), 300);
    }

    #[test]
    fn a_device_past_its_uploads_in_flight_waits_for_one_to_end() {
        let mut ledger = Ledger::new(LIMITS, 60, 0);
        admit(&mut ledger, 1, device(1), 10).unwrap();
        admit(&mut ledger, 2, device(1), 10).unwrap();
        assert_eq!(
            admit(&mut ledger, 3, device(1), 10),
            Err(ApiError::DeviceUploadsInFlight { limit: 2 })
        );
        // Another device is not held back.
        admit(&mut ledger, 3, device(2), 10).unwrap();
        ledger.begin_patch(UploadId(1), device(1), 0, 1).unwrap();
        ledger.finish(UploadId(1), true);
        admit(&mut ledger, 4, device(1), 10).unwrap();
        ledger.discard(UploadId(2));
        ledger.discard(UploadId(3));
        ledger.discard(UploadId(4));
        assert_eq!(ledger.reserved_bytes(), 0);
        assert!(
            ledger.devices.is_empty(),
            "no device is kept without uploads"
        );
    }

    #[test]
    fn a_repeated_admission_gets_the_devices_upload_back() {
        let mut ledger = Ledger::new(LIMITS, 60, 0);
        let blob = BlobId([7; 32]);
        let first = ledger.admit(UploadId(1), device(1), 300, blob, 0, 0);
        let Ok(Admission::New(entry)) = first else {
            panic!("{first:?}")
        };
        ledger.admitted(UploadId(1));
        ledger.begin_patch(UploadId(1), device(1), 0, 1).unwrap();
        ledger.end_patch(UploadId(1), 120);
        // Same bytes, same device: that upload at its offset, though a
        // second reservation would pass the quota (300 + 300 > 500).
        let again = ledger.admit(UploadId(2), device(1), 300, blob, 0, 2);
        let offset_120 = UploadEntry {
            offset: 120,
            busy: false,
            ..entry
        };
        assert_eq!(again, Ok(Admission::Existing(UploadId(1), offset_120)));
        assert_eq!(ledger.reserved_bytes(), 300);
        // Another size, or another device, is another upload.
        assert_eq!(
            ledger.admit(UploadId(2), device(1), 299, blob, 0, 2),
            Err(ApiError::QuotaExceeded)
        );
        assert!(matches!(
            ledger.admit(UploadId(3), device(2), 300, blob, 0, 2),
            Ok(Admission::New(_))
        ));
        // A stale upload is not handed out again.
        assert!(matches!(
            ledger.admit(UploadId(4), device(1), 300, blob, 0, 10_000),
            Err(ApiError::QuotaExceeded)
        ));
    }

    #[test]
    fn a_patch_owns_the_upload_until_it_ends() {
        let mut ledger = Ledger::new(LIMITS, 60, 0);
        admit(&mut ledger, 1, device(1), 100).unwrap();
        let id = UploadId(1);
        assert_eq!(
            ledger.begin_patch(id, device(2), 0, 1),
            Err(ApiError::NotYourUpload)
        );
        assert_eq!(
            ledger.begin_patch(id, device(1), 5, 1),
            Err(ApiError::OffsetMismatch { offset: 0 })
        );
        ledger.begin_patch(id, device(1), 0, 1).unwrap();
        assert_eq!(
            ledger.begin_patch(id, device(1), 0, 1),
            Err(ApiError::UploadBusy)
        );
        ledger.end_patch(id, 40);
        assert_eq!(ledger.status(id, device(1), 2).unwrap().offset, 40);
        ledger.begin_patch(id, device(1), 40, 2).unwrap();
        ledger.finish(id, true);
        assert_eq!(ledger.blob_bytes(), 100);
        assert_eq!(ledger.reserved_bytes(), 0);
        assert_eq!(ledger.status(id, device(1), 3), Err(ApiError::NotFound));
    }

    #[test]
    fn a_stale_upload_is_gone_for_clients_and_taken_by_the_sweep() {
        let mut ledger = Ledger::new(LIMITS, 60, 0);
        admit(&mut ledger, 1, device(1), 100).unwrap();
        admit(&mut ledger, 2, device(1), 100).unwrap();
        ledger.begin_patch(UploadId(2), device(1), 0, 1).unwrap();
        assert_eq!(
            ledger.status(UploadId(1), device(1), 10_000),
            Err(ApiError::NotFound)
        );
        // The busy one is left to its PATCH.
        let stale = ledger.take_stale(10_000, 10);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, UploadId(1));
        ledger.discard(UploadId(1));
        assert_eq!(ledger.uploads_in_flight(), 1);
    }

    #[test]
    fn a_blob_has_one_owner_at_a_time() {
        let mut ledger = Ledger::new(LIMITS, 60, 0);
        assert!(ledger.claim(BlobId([1; 32])));
        assert!(!ledger.claim(BlobId([1; 32])));
        assert!(ledger.claim(BlobId([2; 32])));
        ledger.unclaim(BlobId([1; 32]));
        assert!(ledger.claim(BlobId([1; 32])));
    }
}
