//! Names of the things the media service keeps: blobs (by content),
//! unfinished uploads (by a random id) and the device that uploads.

use std::fmt;

use crate::ids::{DeviceId, UserId};

/// A blob's id: the SHA-256 of its bytes (the client's ciphertext), shown
/// as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// Parses 64 hex digits (either case).
    pub fn parse(text: &str) -> Option<BlobId> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(BlobId(bytes))
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

/// An unfinished upload's id: 128 random bits, shown as 32 lowercase hex
/// digits. Random so one device cannot guess another's upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId(pub u128);

impl UploadId {
    pub fn random() -> UploadId {
        use rand::RngCore;
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        UploadId(u128::from_be_bytes(bytes))
    }

    /// Parses exactly 32 hex digits (either case).
    pub fn parse(text: &str) -> Option<UploadId> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(UploadId(u128::from_be_bytes(bytes)))
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The device a grant was given to: uploads, rates and quotas are its.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uploader {
    pub user: UserId,
    pub device: DeviceId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let blob = BlobId([0xab; 32]);
        assert_eq!(BlobId::parse(&blob.to_hex()), Some(blob));
        assert_eq!(blob.to_string(), blob.to_hex());
        assert_eq!(BlobId::parse(&blob.to_hex().to_uppercase()), Some(blob));
        let upload = UploadId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(upload.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(UploadId::parse(&upload.to_string()), Some(upload));
    }

    #[test]
    fn rejects_ids_of_the_wrong_shape() {
        assert_eq!(BlobId::parse(""), None);
        assert_eq!(BlobId::parse(&"a".repeat(63)), None);
        assert_eq!(BlobId::parse(&"a".repeat(65)), None);
        assert_eq!(BlobId::parse(&"g".repeat(64)), None);
        assert_eq!(UploadId::parse(&"0".repeat(31)), None);
        assert_eq!(UploadId::parse("+0123456789abcdef0011223344556677"), None);
    }
}
