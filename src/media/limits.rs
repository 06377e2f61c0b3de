//! The media service's fixed bounds (the tunable ones are `MediaConfig`'s)
//! and its per-device upload rate limiter. Pure: the caller passes the time.

use std::collections::HashMap;
use std::time::Duration;

use super::ids::Uploader;

/// Bytes of one object-store part when a staged blob is stored: blobs up
/// to this size are one `put`, larger ones a multipart upload of parts this
/// size (S3 wants at least 5 MiB per part but the last). One part is in
/// memory per finishing upload.
pub const PART_BYTES: u64 = 8 << 20;

/// Uploads finishing at once (hashing and storing their staged bytes).
/// Bounds the memory of finishing to `FINALIZES_MAX * PART_BYTES` (32 MiB);
/// more wait their turn.
pub const FINALIZES_MAX: usize = 4;

/// Longest pause inside a PATCH body before the service stops reading,
/// keeps what arrived and answers; a silent client cannot hold an upload
/// busy for longer. Also the longest a `POST /v1/uploads` body (at most
/// `CREATE_BODY_BYTES_MAX`) may take to arrive whole, so a client that
/// sends headers and stalls is answered 400. The connection's idle clock
/// is held while a handler runs, so this is what bounds those waits.
/// (`Shared` carries it, so tests can shorten it.)
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest `POST /v1/uploads` body, bytes (`{"size":…,"sha256":"…"}`).
pub const CREATE_BODY_BYTES_MAX: usize = 1024;

/// Index entries (blobs or stale uploads) handled per sweep transaction;
/// the sweep yields between batches.
pub const SWEEP_BATCH: usize = 256;

/// Longest wait for a blob that the sweep is deleting, or that another
/// upload of the same bytes is storing, before a finishing upload gives up
/// (503) and leaves its upload to retry. The finishing upload holds no
/// `FINALIZES_MAX` slot while it waits.
pub const BLOB_CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Longest wait of `POST /v1/uploads` for a blob someone else has claimed
/// (a renewal, a finishing upload of the same bytes, the sweep) before it
/// answers as if the blob were not stored and begins an upload. Claims
/// other than a finishing upload's are held for one index call, so this
/// is long enough for them and short enough for a client waiting on its
/// POST.
pub const RENEW_CLAIM_WAIT: Duration = Duration::from_secs(1);

/// Devices whose upload rate is tracked. A device whose bucket is full is
/// not kept, so the map holds only devices that uploaded within the last
/// minute; past this many the fullest bucket is dropped (that device gets
/// a fresh allowance). About 48 bytes each: 3 MiB at most.
pub const RATE_DEVICES_MAX: usize = 65_536;

/// redb's page cache for the media index, bytes. The index holds small
/// rows; the default (1 GiB) would let it grow far past its use.
pub const INDEX_CACHE_BYTES: usize = 16 << 20;

/// Milliseconds in a UTC day; quotas reset at 00:00 UTC.
pub const DAY_MS: u64 = 86_400_000;

/// The UTC day number of a Unix time in ms.
pub fn utc_day(now_ms: u64) -> u64 {
    now_ms / DAY_MS
}

/// One upload costs this many units; a bucket refills `per_minute` units
/// per millisecond and holds `per_minute` uploads' worth. Integers, so the
/// arithmetic is exact.
const UNITS_PER_UPLOAD: u64 = 60_000;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    units: u64,
    at_ms: u64,
}

/// Uploads begun per device per minute, as a token bucket per device: a
/// device may begin `per_minute` uploads at once, then one every
/// `60 / per_minute` s. In memory only: a restart gives every device a
/// full bucket.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u64,
    buckets: HashMap<Uploader, Bucket>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute: u64::from(per_minute),
            buckets: HashMap::new(),
        }
    }

    fn capacity(&self) -> u64 {
        self.per_minute * UNITS_PER_UPLOAD
    }

    fn refilled(&self, bucket: Bucket, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(bucket.at_ms);
        bucket
            .units
            .saturating_add(elapsed.saturating_mul(self.per_minute))
            .min(self.capacity())
    }

    /// Takes one upload from `who`'s allowance, or says in how many
    /// seconds (at least 1) the next one is allowed.
    pub fn take(&mut self, who: Uploader, now_ms: u64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Err(60);
        }
        let units = match self.buckets.get(&who) {
            Some(bucket) => self.refilled(*bucket, now_ms),
            None => {
                self.make_room(now_ms);
                self.capacity()
            }
        };
        if units >= UNITS_PER_UPLOAD {
            self.buckets.insert(
                who,
                Bucket {
                    units: units - UNITS_PER_UPLOAD,
                    at_ms: now_ms,
                },
            );
            Ok(())
        } else {
            self.buckets.insert(
                who,
                Bucket {
                    units,
                    at_ms: now_ms,
                },
            );
            let wait_ms = (UNITS_PER_UPLOAD - units).div_ceil(self.per_minute);
            Err(wait_ms.div_ceil(1_000).max(1))
        }
    }

    /// Keeps the map within `RATE_DEVICES_MAX` before a new device is
    /// added: full buckets go first (dropping one changes nothing), then
    /// the fullest.
    fn make_room(&mut self, now_ms: u64) {
        if self.buckets.len() < RATE_DEVICES_MAX {
            return;
        }
        let capacity = self.capacity();
        let per_minute = self.per_minute;
        self.buckets.retain(|_, bucket| {
            let elapsed = now_ms.saturating_sub(bucket.at_ms);
            bucket
                .units
                .saturating_add(elapsed.saturating_mul(per_minute))
                < capacity
        });
        if self.buckets.len() >= RATE_DEVICES_MAX {
            let fullest = self
                .buckets
                .iter()
                .max_by_key(|(_, bucket)| self.refilled(**bucket, now_ms))
                .map(|(who, _)| *who);
            if let Some(who) = fullest {
                self.buckets.remove(&who);
            }
        }
    }

    /// Devices tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, UserId};

    fn device(n: u64) -> Uploader {
        Uploader {
            user: UserId(n),
            device: DeviceId(1),
        }
    }

    #[test]
    fn a_device_gets_a_burst_then_one_upload_per_interval() {
        let mut limiter = RateLimiter::new(3);
        for _ in 0..3 {
            assert_eq!(limiter.take(device(1), 1_000), Ok(()));
        }
        // One upload every 20 s.
        assert_eq!(limiter.take(device(1), 1_000), Err(20));
        assert_eq!(limiter.take(device(1), 11_000), Err(10));
        assert_eq!(limiter.take(device(1), 21_000), Ok(()));
        assert_eq!(limiter.take(device(1), 21_000), Err(20));
        // Another device has its own allowance.
        assert_eq!(limiter.take(device(2), 21_000), Ok(()));
    }

    #[test]
    fn retry_after_is_at_least_a_second() {
        let mut limiter = RateLimiter::new(60_000);
        for _ in 0..60_000 {
            assert_eq!(limiter.take(device(1), 0), Ok(()));
        }
        assert_eq!(limiter.take(device(1), 0), Err(1));
    }

    #[test]
    fn a_zero_rate_refuses_every_upload() {
        let mut limiter = RateLimiter::new(0);
        assert_eq!(limiter.take(device(1), 0), Err(60));
    }

    #[test]
    fn the_map_stays_bounded() {
        let mut limiter = RateLimiter::new(2);
        for n in 0..(RATE_DEVICES_MAX as u64 + 10) {
            assert_eq!(limiter.take(device(n), 0), Ok(()));
        }
        assert!(limiter.tracked() <= RATE_DEVICES_MAX);
        // A minute later every bucket is full again and is dropped to make
        // room rather than kept.
        assert_eq!(limiter.take(device(u64::MAX), 60_000), Ok(()));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn days_are_utc() {
        assert_eq!(utc_day(0), 0);
        assert_eq!(utc_day(DAY_MS - 1), 0);
        assert_eq!(utc_day(DAY_MS), 1);
    }
}
