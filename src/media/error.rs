//! The media API's refusals: one variant per documented error code, each
//! answered as `{"error": CODE, "message": text}` with its HTTP status and,
//! where the client needs it to carry on, a header (`Retry-After`,
//! `Upload-Offset`, `Content-Range`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The header carrying an upload's offset (bytes stored so far).
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// The header carrying an upload's total size.
pub const UPLOAD_LENGTH: &str = "upload-length";

/// Why a media request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No token, or one that is malformed, forged, or of the wrong kind.
    #[error("{0}")]
    BadToken(&'static str),
    #[error("the token has expired; ask for a new grant")]
    TokenExpired,
    #[error("{0}")]
    BadRequest(String),
    /// The blob is larger than the grant or the server allows; `offset` is
    /// set when an upload's bytes were cut at its size.
    #[error("the blob is larger than the {limit_bytes} bytes allowed")]
    BlobTooLarge {
        limit_bytes: u64,
        offset: Option<u64>,
    },
    #[error("too many uploads from this device; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("this device's daily upload quota is used up")]
    QuotaExceeded,
    /// The device has `media.device_uploads_in_flight_max` uploads begun
    /// and not finished. No `Retry-After`: a slot frees when the client
    /// finishes one of them, or when one expires after `upload_ttl_s`.
    #[error(
        "this device has {limit} unfinished uploads, the most allowed \
         (media.device_uploads_in_flight_max); finish one before beginning another"
    )]
    DeviceUploadsInFlight { limit: u32 },
    #[error("too many uploads in progress; retry later")]
    TooManyUploads,
    #[error("the media store is full")]
    StoreFull,
    #[error("no such upload or blob (or it expired)")]
    NotFound,
    #[error("this upload belongs to another device")]
    NotYourUpload,
    #[error("the upload is at offset {offset}")]
    OffsetMismatch { offset: u64 },
    #[error("another request is writing to this upload")]
    UploadBusy,
    #[error("the uploaded bytes do not hash to the announced sha256; the upload was dropped")]
    HashMismatch,
    #[error("the token is for another blob")]
    WrongBlob,
    #[error("the range is outside the blob's {size_bytes} bytes")]
    RangeNotSatisfiable { size_bytes: u64 },
    #[error("this method is not supported on this path")]
    MethodNotAllowed,
    /// The index or the staging disk failed; details are in the log.
    #[error("internal error")]
    Internal,
    /// The object store failed; details are in the log.
    #[error("the blob store is unavailable; retry later")]
    StoreUnavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadToken(_) | ApiError::TokenExpired => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BlobTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } | ApiError::DeviceUploadsInFlight { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::QuotaExceeded | ApiError::NotYourUpload | ApiError::WrongBlob => {
                StatusCode::FORBIDDEN
            }
            ApiError::TooManyUploads | ApiError::StoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::StoreFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::OffsetMismatch { .. } | ApiError::UploadBusy => StatusCode::CONFLICT,
            ApiError::HashMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadToken(_) => "BAD_TOKEN",
            ApiError::TokenExpired => "TOKEN_EXPIRED",
            ApiError::BadRequest(_) => "BAD_REQUEST",
            ApiError::BlobTooLarge { .. } => "BLOB_TOO_LARGE",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::QuotaExceeded => "QUOTA_EXCEEDED",
            ApiError::DeviceUploadsInFlight { .. } => "DEVICE_UPLOADS_IN_FLIGHT",
            ApiError::TooManyUploads => "TOO_MANY_UPLOADS",
            ApiError::StoreFull => "STORE_FULL",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::NotYourUpload => "NOT_YOUR_UPLOAD",
            ApiError::OffsetMismatch { .. } => "OFFSET_MISMATCH",
            ApiError::UploadBusy => "UPLOAD_BUSY",
            ApiError::HashMismatch => "HASH_MISMATCH",
            ApiError::WrongBlob => "WRONG_BLOB",
            ApiError::RangeNotSatisfiable { .. } => "RANGE_NOT_SATISFIABLE",
            ApiError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ApiError::Internal => "INTERNAL",
            ApiError::StoreUnavailable => "STORE_UNAVAILABLE",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
        });
        let offset = match self {
            ApiError::OffsetMismatch { offset } => Some(offset),
            ApiError::BlobTooLarge { offset, .. } => offset,
            _ => None,
        };
        if let Some(offset) = offset {
            body["offset"] = offset.into();
        }
        let mut response = (self.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(offset) = offset {
            headers.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
        }
        match self {
            ApiError::RateLimited { retry_after_s } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            }
            ApiError::RangeNotSatisfiable { size_bytes } => {
                let value = format!("bytes */{size_bytes}");
                if let Ok(value) = HeaderValue::try_from(value) {
                    headers.insert(header::CONTENT_RANGE, value);
                }
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_mismatch_carries_the_offset_in_header_and_body() {
        let response = ApiError::OffsetMismatch { offset: 42 }.into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[UPLOAD_OFFSET], "42");
    }

    #[test]
    fn a_rate_limit_says_when_to_retry() {
        let response = ApiError::RateLimited { retry_after_s: 7 }.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }

    #[test]
    fn too_many_unfinished_uploads_of_a_device_names_the_limit_and_no_retry_time() {
        let error = ApiError::DeviceUploadsInFlight { limit: 32 };
        assert!(error.to_string().contains("32"), "{error}");
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn an_unsatisfiable_range_names_the_size() {
        let response = ApiError::RangeNotSatisfiable { size_bytes: 10 }.into_response();
        assert_eq!(response.headers()[header::CONTENT_RANGE], "bytes */10");
    }
}
