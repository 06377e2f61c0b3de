//! The media service over real sockets against the real binary: uploads
//! (resumable, deduplicated, hash-checked), range downloads, grants, every
//! limit, expiry, and restarts, with the local-disk backend. A few tests
//! that must reach inside the service (hold a blob's claim, shorten a
//! timeout) serve its router in the test process instead (`InProcess`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::media::{bytes, now_ms, send, sha_hex, Reply};
use common::Server;
use switchboard::config::Config;
use switchboard::media::api;
use switchboard::media::ids::BlobId;
use switchboard::media::service::Shared;
use switchboard::media::token::{Grant, MediaKey, Subject};

/// A server with its media service and the key its grants are signed with.
struct Media {
    server: Server,
    key: MediaKey,
}

impl Media {
    fn start(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Media {
        let server = Server::start(dir, tweak);
        let key = MediaKey::load_or_create(&server.config.server.data_dir).unwrap();
        Media { server, key }
    }
}

impl Api for Media {
    fn addr(&self) -> SocketAddr {
        self.server.media.expect("the media service runs")
    }

    fn key(&self) -> &MediaKey {
        &self.key
    }

    fn media_dir(&self) -> PathBuf {
        self.server.config.server.data_dir.join("media")
    }
}

/// The media service's router served in this process, on a runtime of its
/// own, with the shared state at hand: for tests that hold a blob's claim
/// or shorten a timeout. No sweep and no connection bounds run.
struct InProcess {
    shared: Arc<Shared>,
    addr: SocketAddr,
    key: MediaKey,
    media_dir: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl InProcess {
    fn start(dir: &Path, tweak: impl FnOnce(&mut Shared)) -> InProcess {
        let config = Config::for_tests(&dir.join("data"));
        let data_dir = config.server.data_dir.clone();
        std::fs::create_dir_all(&data_dir).unwrap();
        let key = MediaKey::load_or_create(&data_dir).unwrap();
        let (mut shared, _) = Shared::recover(&config.media, &data_dir, key.clone()).unwrap();
        tweak(&mut shared);
        let shared = Arc::new(shared);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = api::router(shared.clone());
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
        InProcess {
            shared,
            addr,
            key,
            media_dir: data_dir.join("media"),
            runtime: Some(runtime),
        }
    }
}

impl Api for InProcess {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn key(&self) -> &MediaKey {
        &self.key
    }

    fn media_dir(&self) -> PathBuf {
        self.media_dir.clone()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Requests to a media service, wherever it runs.
trait Api {
    fn addr(&self) -> SocketAddr;
    fn key(&self) -> &MediaKey;
    fn media_dir(&self) -> PathBuf;

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn upload_token(&self, user: u64, device: u32, size_max: u64) -> String {
        Grant {
            user,
            device,
            expires_at_ms: now_ms() + 600_000,
            subject: Subject::Upload { size_max },
        }
        .sign(self.key())
    }

    fn download_token(&self, blob_hex: &str) -> String {
        let mut blob = [0u8; 32];
        hex::decode_to_slice(blob_hex, &mut blob).unwrap();
        Grant {
            user: 1,
            device: 1,
            expires_at_ms: now_ms() + 600_000,
            subject: Subject::Download { blob },
        }
        .sign(self.key())
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut all: Vec<(&str, String)> =
            headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        if let Some(token) = token {
            all.push(("Authorization", format!("Bearer {token}")));
        }
        send(method, &self.url(path), &all, body)
    }

    /// POST /v1/uploads.
    fn create(&self, token: &str, size: usize, sha: &str) -> Reply {
        let body = format!(r#"{{"size": {size}, "sha256": "{sha}"}}"#);
        self.send(
            "POST",
            "/v1/uploads",
            Some(token),
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    }

    fn patch(&self, token: &str, upload_id: &str, offset: u64, body: &[u8]) -> Reply {
        let offset = offset.to_string();
        self.send(
            "PATCH",
            &format!("/v1/uploads/{upload_id}"),
            Some(token),
            &[("Upload-Offset", &offset)],
            Some(body),
        )
    }

    /// Creates an upload; gives its id.
    fn begin(&self, token: &str, data: &[u8]) -> String {
        let reply = self.create(token, data.len(), &sha_hex(data));
        assert_eq!(reply.status, 201, "{reply:?}");
        let json = reply.json();
        assert_eq!(json["offset"], 0);
        assert_eq!(json["size"], data.len() as u64);
        assert_eq!(json["complete"], false);
        json["upload_id"].as_str().unwrap().to_string()
    }

    /// A whole upload in one PATCH; gives the blob id.
    fn upload(&self, token: &str, data: &[u8]) -> String {
        let id = self.begin(token, data);
        let reply = self.patch(token, &id, 0, data);
        assert_eq!(reply.status, 201, "{reply:?}");
        let json = reply.json();
        assert_eq!(json["complete"], true);
        assert_eq!(json["size"], data.len() as u64);
        json["blob_id"].as_str().unwrap().to_string()
    }

    fn download(&self, blob: &str, headers: &[(&str, &str)]) -> Reply {
        let token = self.download_token(blob);
        self.send(
            "GET",
            &format!("/v1/blobs/{blob}"),
            Some(&token),
            headers,
            None,
        )
    }

    fn upload_offset(&self, token: &str, upload_id: &str) -> Reply {
        self.send(
            "HEAD",
            &format!("/v1/uploads/{upload_id}"),
            Some(token),
            &[],
            None,
        )
    }

    fn healthy(&self) -> bool {
        let reply = send("GET", &self.url("/healthz"), &[], None);
        reply.status == 200 && reply.body == b"ok"
    }

    fn blob_file(&self, blob: &str) -> PathBuf {
        self.media_dir().join("blobs").join(blob)
    }
}

/// Waits for `done` for at most `limit`.
fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn an_upload_in_parts_downloads_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(300_000, 1);
    let token = media.upload_token(1, 1, 1 << 20);
    let id = media.begin(&token, &data);
    assert_eq!(id.len(), 32, "128 random bits in hex");

    let reply = media.patch(&token, &id, 0, &data[..100_000]);
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(reply.header("Upload-Offset"), Some("100000"));
    let reply = media.upload_offset(&token, &id);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Upload-Offset"), Some("100000"));
    assert_eq!(reply.header("Upload-Length"), Some("300000"));
    let reply = media.send("GET", &format!("/v1/uploads/{id}"), Some(&token), &[], None);
    assert_eq!(reply.status, 200);
    let json = reply.json();
    assert_eq!(
        (json["offset"].as_u64(), json["size"].as_u64()),
        (Some(100_000), Some(300_000))
    );
    assert_eq!(json["upload_id"], id.as_str());
    assert_eq!(json["complete"], false);

    let reply = media.patch(&token, &id, 100_000, &data[100_000..]);
    assert_eq!(reply.status, 201, "{reply:?}");
    let blob = reply.json()["blob_id"].as_str().unwrap().to_string();
    assert_eq!(
        blob,
        sha_hex(&data),
        "the blob id is the SHA-256 of its bytes"
    );

    let reply = media.download(&blob, &[]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), data.len());
    assert!(reply.body == data, "downloaded bytes differ");
    assert_eq!(sha_hex(&reply.body), blob);
    assert_eq!(reply.header("Content-Length"), Some("300000"));
    assert_eq!(reply.header("Accept-Ranges"), Some("bytes"));
    assert_eq!(
        reply.header("Content-Type"),
        Some("application/octet-stream")
    );
    assert_eq!(reply.header("ETag"), Some(format!("\"{blob}\"").as_str()));

    // Browsers pass the token in the query instead.
    let query = format!("/v1/blobs/{blob}?token={}", media.download_token(&blob));
    let reply = media.send("GET", &query, None, &[], None);
    assert_eq!(reply.status, 200);
    assert!(reply.body == data);
    let reply = media.send("HEAD", &query, None, &[], None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Content-Length"), Some("300000"));
    assert!(reply.body.is_empty());

    // The blob is a file of its own; the staging file is gone, and so is
    // the upload.
    assert!(std::fs::read(media.blob_file(&blob)).unwrap() == data);
    assert!(files_in(&media.media_dir().join("uploads")).is_empty());
    media
        .upload_offset(&token, &id)
        .assert_error_status_only(404);
    assert!(media.healthy());
}

impl Reply {
    /// For HEAD answers, which carry no body.
    fn assert_error_status_only(&self, status: u16) {
        assert_eq!(self.status, status, "{self:?}");
    }
}

#[test]
fn the_same_bytes_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(50_000, 2);
    let blob = media.upload(&media.upload_token(1, 1, 1 << 20), &data);
    // Another device announcing the same bytes needs no upload.
    let reply = media.create(&media.upload_token(2, 1, 1 << 20), data.len(), &blob);
    assert_eq!(reply.status, 200, "{reply:?}");
    let json = reply.json();
    assert_eq!(json["blob_id"], blob.as_str());
    assert_eq!(json["size"], 50_000);
    assert_eq!(json["complete"], true);
    assert!(json.get("upload_id").is_none());
    // Two uploads of the same bytes at once (two devices; one device
    // would get its own upload back) both finish, into one file, written
    // once: the second finds the blob stored and only records it.
    let data = bytes(20_000, 3);
    let blob = sha_hex(&data);
    let (one, two) = (
        media.upload_token(3, 1, 1 << 20),
        media.upload_token(3, 2, 1 << 20),
    );
    let first = media.begin(&one, &data);
    let second = media.begin(&two, &data);
    assert_eq!(media.patch(&one, &first, 0, &data).status, 201);
    let written = std::fs::metadata(media.blob_file(&blob)).unwrap().ino();
    let reply = media.patch(&two, &second, 0, &data);
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["blob_id"], blob.as_str());
    assert_eq!(
        std::fs::metadata(media.blob_file(&blob)).unwrap().ino(),
        written,
        "the stored blob was written again"
    );
    assert_eq!(files_in(&media.media_dir().join("blobs")).len(), 2);
    assert!(files_in(&media.media_dir().join("uploads")).is_empty());
    assert_eq!(media.download(&blob, &[]).body, data);
}

#[test]
fn a_cut_patch_keeps_what_arrived_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(100_000, 4);
    let token = media.upload_token(1, 1, 1 << 20);
    let id = media.begin(&token, &data);
    {
        // Announce every byte, send 40,000, and go away.
        let mut stream = TcpStream::connect(media.addr()).unwrap();
        write!(
            stream,
            "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: media\r\nAuthorization: Bearer {token}\r\n\
             Upload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .unwrap();
        stream.write_all(&data[..40_000]).unwrap();
        stream.flush().unwrap();
        // While that PATCH is open, nobody else writes to the upload. (A
        // wrong offset, so that a PATCH arriving first changes nothing.)
        assert!(
            eventually(Duration::from_secs(5), || {
                let reply = media.patch(&token, &id, 1, b"x");
                reply.status == 409 && reply.json()["error"] == "UPLOAD_BUSY"
            }),
            "a second PATCH was not refused as UPLOAD_BUSY"
        );
    }
    let offset = || {
        media
            .upload_offset(&token, &id)
            .header("Upload-Offset")
            .map(str::to_string)
    };
    assert!(
        eventually(Duration::from_secs(10), || offset().as_deref()
            == Some("40000")),
        "offset after the cut: {:?}",
        offset()
    );
    // The upload is free again: the rest completes it.
    let reply = media.patch(&token, &id, 40_000, &data[40_000..]);
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["blob_id"], sha_hex(&data).as_str());
    assert!(media.download(&sha_hex(&data), &[]).body == data);
}

#[test]
fn a_patch_at_the_wrong_offset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(10_000, 5);
    let token = media.upload_token(1, 1, 1 << 20);
    let id = media.begin(&token, &data);
    let reply = media.patch(&token, &id, 5, &data[5..100]);
    reply.assert_error(409, "OFFSET_MISMATCH");
    assert_eq!(reply.header("Upload-Offset"), Some("0"));
    assert_eq!(reply.json()["offset"], 0);
    assert_eq!(media.patch(&token, &id, 0, &data[..100]).status, 204);
    let reply = media.patch(&token, &id, 0, &data[..100]);
    reply.assert_error(409, "OFFSET_MISMATCH");
    assert_eq!(reply.header("Upload-Offset"), Some("100"));
}

#[test]
fn ranges_are_served_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(1_000, 6);
    let blob = media.upload(&media.upload_token(1, 1, 1 << 20), &data);
    let cases: [(&str, usize, usize); 4] = [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=900-5000", 900, 999),
    ];
    for (range, first, last) in cases {
        let reply = media.download(&blob, &[("Range", range)]);
        assert_eq!(reply.status, 206, "{range}: {reply:?}");
        assert_eq!(
            reply.header("Content-Range"),
            Some(format!("bytes {first}-{last}/1000").as_str()),
            "{range}"
        );
        assert_eq!(
            reply.header("Content-Length"),
            Some((last - first + 1).to_string().as_str())
        );
        assert!(reply.body == data[first..=last], "{range}");
    }
    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let reply = media.download(&blob, &[("Range", range)]);
        reply.assert_error(416, "RANGE_NOT_SATISFIABLE");
        assert_eq!(reply.header("Content-Range"), Some("bytes */1000"));
    }
    // A range this service does not serve is ignored: the whole blob.
    for range in ["bytes=0-1,5-6", "lines=1-2", "bytes=9-3"] {
        let reply = media.download(&blob, &[("Range", range)]);
        assert_eq!(reply.status, 200, "{range}");
        assert!(reply.body == data);
    }
}

#[test]
fn tokens_must_be_genuine_current_and_for_the_right_thing() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(2_000, 7);
    let token = media.upload_token(1, 1, 1 << 20);
    let blob = media.upload(&token, &data);
    let other = media.upload(&token, &bytes(2_000, 8));
    let path = format!("/v1/blobs/{blob}");

    // No token, a bit flipped in the signature, the wrong scheme.
    media
        .send("GET", &path, None, &[], None)
        .assert_error(401, "BAD_TOKEN");
    let good = media.download_token(&blob);
    let mut raw = base64_decode(&good);
    let last = raw.len() - 1;
    raw[last] ^= 1;
    let forged = base64_encode(&raw);
    media
        .send("GET", &path, Some(&forged), &[], None)
        .assert_error(401, "BAD_TOKEN");
    media
        .send(
            "GET",
            &path,
            None,
            &[("Authorization", &format!("Basic {good}"))],
            None,
        )
        .assert_error(401, "BAD_TOKEN");
    media
        .send("GET", &path, Some("garbage"), &[], None)
        .assert_error(401, "BAD_TOKEN");

    // Expired: signed correctly, but its time has passed.
    let expired = Grant {
        user: 1,
        device: 1,
        expires_at_ms: now_ms() - 1_000,
        subject: Subject::Download {
            blob: raw_blob(&blob),
        },
    }
    .sign(&media.key);
    media
        .send("GET", &path, Some(&expired), &[], None)
        .assert_error(401, "TOKEN_EXPIRED");
    let expired_upload = Grant {
        user: 1,
        device: 1,
        expires_at_ms: now_ms() - 1_000,
        subject: Subject::Upload { size_max: 1 << 20 },
    }
    .sign(&media.key);
    media
        .create(&expired_upload, 10, &sha_hex(b"0123456789"))
        .assert_error(401, "TOKEN_EXPIRED");

    // A download token for another blob; an upload token to download; a
    // download token to upload.
    let for_other = media.download_token(&other);
    media
        .send("GET", &path, Some(&for_other), &[], None)
        .assert_error(403, "WRONG_BLOB");
    media
        .send("GET", &path, Some(&token), &[], None)
        .assert_error(401, "BAD_TOKEN");
    media
        .create(&good, 10, &sha_hex(b"0123456789"))
        .assert_error(401, "BAD_TOKEN");
    // HEAD checks the same way.
    assert_eq!(
        media
            .send("HEAD", &path, Some(&for_other), &[], None)
            .status,
        403
    );
    assert_eq!(
        media.send("HEAD", &path, Some(&good), &[], None).status,
        200
    );

    // An unknown blob, with a token for it.
    let unknown = sha_hex(b"never uploaded");
    media
        .send(
            "GET",
            &format!("/v1/blobs/{unknown}"),
            Some(&media.download_token(&unknown)),
            &[],
            None,
        )
        .assert_error(404, "NOT_FOUND");
}

fn raw_blob(blob_hex: &str) -> [u8; 32] {
    let mut blob = [0u8; 32];
    hex::decode_to_slice(blob_hex, &mut blob).unwrap();
    blob
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn an_upload_belongs_to_the_device_that_began_it() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let data = bytes(5_000, 9);
    let owner = media.upload_token(1, 1, 1 << 20);
    let id = media.begin(&owner, &data);
    for stranger in [
        media.upload_token(1, 2, 1 << 20),
        media.upload_token(2, 1, 1 << 20),
    ] {
        media
            .patch(&stranger, &id, 0, &data)
            .assert_error(403, "NOT_YOUR_UPLOAD");
        media
            .send(
                "GET",
                &format!("/v1/uploads/{id}"),
                Some(&stranger),
                &[],
                None,
            )
            .assert_error(403, "NOT_YOUR_UPLOAD");
        assert_eq!(media.upload_offset(&stranger, &id).status, 403);
    }
    assert_eq!(media.patch(&owner, &id, 0, &data).status, 201);
    // Unknown upload ids.
    media
        .patch(&owner, "00000000000000000000000000000000", 0, b"x")
        .assert_error(404, "NOT_FOUND");
    media
        .patch(&owner, "nothex", 0, b"x")
        .assert_error(404, "NOT_FOUND");
}

#[test]
fn blobs_larger_than_allowed_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let limit = media.server.config.media.blob_bytes_max;
    let token = media.upload_token(1, 1, u64::MAX);
    let sha = sha_hex(b"x");
    let reply = media.create(&token, (limit + 1) as usize, &sha);
    reply.assert_error(413, "BLOB_TOO_LARGE");
    // The grant's own limit.
    let small = media.upload_token(1, 1, 1_000);
    media
        .create(&small, 1_001, &sha)
        .assert_error(413, "BLOB_TOO_LARGE");
    assert_eq!(media.create(&small, 1_000, &sha).status, 201);
    // Bytes past the announced size: nothing past it is kept.
    let data = bytes(1_000, 10);
    let id = media.begin(&token, &data);
    let mut longer = data.clone();
    longer.extend_from_slice(b"extra");
    let reply = media.patch(&token, &id, 0, &longer);
    reply.assert_error(413, "BLOB_TOO_LARGE");
    assert_eq!(
        media.upload_offset(&token, &id).header("Upload-Offset"),
        Some("0")
    );
    let staged = media.media_dir().join("uploads").join(&id);
    assert!(std::fs::metadata(&staged).map_or(0, |m| m.len()) <= 1_000);
    assert_eq!(media.patch(&token, &id, 0, &data[..600]).status, 204);
    // A chunked body (no length announced) that runs past the size: what
    // fits is kept, the rest refused.
    let mut tail = data[600..].to_vec();
    tail.extend_from_slice(b"extra");
    let (status, head) = raw_chunked_patch(media.addr(), &token, &id, 600, &tail);
    assert_eq!(status, 413, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upload-offset: 1000"),
        "{head}"
    );
    assert_eq!(std::fs::metadata(&staged).unwrap().len(), 1_000);
    // Every byte is there: an empty PATCH at the end finishes it.
    let reply = media.patch(&token, &id, 1_000, b"");
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.json()["blob_id"], sha_hex(&data).as_str());
}

/// A PATCH with a chunked body over a raw socket; gives the status and the
/// response's head.
fn raw_chunked_patch(
    addr: SocketAddr,
    token: &str,
    id: &str,
    offset: u64,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: media\r\nAuthorization: Bearer {token}\r\n\
         Upload-Offset: {offset}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    stream.write_all(b"\r\n0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let head = answer.split("\r\n\r\n").next().unwrap_or("").to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    (status, head)
}

#[test]
fn a_device_past_its_daily_quota_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| c.media.device_bytes_per_day = 10_000);
    let token = media.upload_token(1, 1, 1 << 20);
    media.upload(&token, &bytes(6_000, 11));
    let next = bytes(5_000, 12);
    media
        .create(&token, next.len(), &sha_hex(&next))
        .assert_error(403, "QUOTA_EXCEEDED");
    // Uploads begun count too: 4,000 fits, a second 4,000 does not.
    let small = bytes(4_000, 13);
    let id = media.begin(&token, &small);
    let another = bytes(4_000, 14);
    media
        .create(&token, another.len(), &sha_hex(&another))
        .assert_error(403, "QUOTA_EXCEEDED");
    assert_eq!(media.patch(&token, &id, 0, &small).status, 201);
    // Another device of the same user has its own quota.
    media.upload(&media.upload_token(1, 2, 1 << 20), &next);
    // Bytes already stored cost nothing.
    assert_eq!(
        media.create(&token, small.len(), &sha_hex(&small)).status,
        200
    );
}

#[test]
fn a_device_beginning_uploads_too_fast_is_told_to_wait() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| c.media.device_uploads_per_minute = 2);
    let token = media.upload_token(1, 1, 1 << 20);
    for seed in 0..2 {
        let data = bytes(100, 20 + seed);
        assert_eq!(media.create(&token, 100, &sha_hex(&data)).status, 201);
    }
    let reply = media.create(&token, 100, &sha_hex(&bytes(100, 30)));
    reply.assert_error(429, "RATE_LIMITED");
    let retry: u64 = reply.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Other devices are not slowed.
    let other = media.upload_token(1, 2, 1 << 20);
    assert_eq!(
        media.create(&other, 100, &sha_hex(&bytes(100, 31))).status,
        201
    );
}

#[test]
fn a_full_store_and_too_many_uploads_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| {
        c.media.store_bytes_max = 10_000;
        // The configuration insists the store holds one largest blob.
        c.media.blob_bytes_max = 10_000;
        c.media.uploads_in_flight_max = 2;
    });
    media.upload(&media.upload_token(1, 1, 1 << 20), &bytes(6_000, 40));
    // 6,000 stored + 5,000 > 10,000.
    let big = bytes(5_000, 41);
    media
        .create(
            &media.upload_token(2, 1, 1 << 20),
            big.len(),
            &sha_hex(&big),
        )
        .assert_error(507, "STORE_FULL");
    // Reserved bytes of unfinished uploads count: 6,000 + 3,000 + 3,000.
    let a = bytes(3_000, 42);
    media.begin(&media.upload_token(3, 1, 1 << 20), &a);
    let b = bytes(3_000, 43);
    media
        .create(&media.upload_token(4, 1, 1 << 20), b.len(), &sha_hex(&b))
        .assert_error(507, "STORE_FULL");
    // Two unfinished uploads are the most.
    media.begin(&media.upload_token(5, 1, 1 << 20), &bytes(10, 44));
    let c = bytes(10, 45);
    media
        .create(&media.upload_token(6, 1, 1 << 20), c.len(), &sha_hex(&c))
        .assert_error(503, "TOO_MANY_UPLOADS");
    assert!(media.healthy());
}

#[test]
fn bytes_that_do_not_match_their_hash_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let token = media.upload_token(1, 1, 1 << 20);
    let announced = bytes(3_000, 50);
    let sent = bytes(3_000, 51);
    let id = media.begin(&token, &announced);
    media
        .patch(&token, &id, 0, &sent)
        .assert_error(422, "HASH_MISMATCH");
    assert_eq!(media.upload_offset(&token, &id).status, 404);
    media
        .patch(&token, &id, 0, &announced)
        .assert_error(404, "NOT_FOUND");
    assert!(files_in(&media.media_dir().join("uploads")).is_empty());
    assert!(files_in(&media.media_dir().join("blobs")).is_empty());
    let reply = media.download(&sha_hex(&sent), &[]);
    reply.assert_error(404, "NOT_FOUND");
}

#[test]
fn blobs_expire_and_their_files_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| {
        c.media.ttl_s = 2;
        c.media.upload_ttl_s = 2;
        c.media.sweep_interval_s = 1;
    });
    let token = media.upload_token(1, 1, 1 << 20);
    let data = bytes(4_000, 60);
    let blob = media.upload(&token, &data);
    // An upload left unfinished is dropped after upload_ttl_s.
    let left = bytes(4_000, 61);
    let left_id = media.begin(&token, &left);
    assert_eq!(media.patch(&token, &left_id, 0, &left[..1_000]).status, 204);
    assert_eq!(media.download(&blob, &[]).status, 200);
    assert!(media.blob_file(&blob).exists());
    assert!(
        eventually(Duration::from_secs(8), || media.download(&blob, &[]).status
            == 404),
        "the blob is still served after its ttl"
    );
    assert!(
        eventually(Duration::from_secs(5), || !media.blob_file(&blob).exists()),
        "the expired blob's file was not deleted"
    );
    assert_eq!(media.upload_offset(&token, &left_id).status, 404);
    assert!(
        eventually(Duration::from_secs(5), || files_in(
            &media.media_dir().join("uploads")
        )
        .is_empty()),
        "the stale upload's staging file was not deleted"
    );
    // Gone means gone: announcing it again asks for an upload.
    assert_eq!(media.create(&token, data.len(), &blob).status, 201);
}

#[test]
fn blobs_and_unfinished_uploads_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut media = Media::start(dir.path(), |_| {});
    let token = media.upload_token(1, 1, 1 << 20);
    let stored = bytes(70_000, 70);
    let blob = media.upload(&token, &stored);
    let pending = bytes(90_000, 71);
    let id = media.begin(&token, &pending);
    assert_eq!(media.patch(&token, &id, 0, &pending[..30_000]).status, 204);

    media.server.kill9();
    media.server.launch();
    assert!(media.download(&blob, &[]).body == stored);
    assert_eq!(
        media.upload_offset(&token, &id).header("Upload-Offset"),
        Some("30000")
    );
    assert_eq!(
        media
            .patch(&token, &id, 30_000, &pending[30_000..60_000])
            .status,
        204
    );

    assert_eq!(media.server.terminate(), Some(0));
    media.server.launch();
    assert_eq!(
        media.upload_offset(&token, &id).header("Upload-Offset"),
        Some("60000")
    );
    let reply = media.patch(&token, &id, 60_000, &pending[60_000..]);
    assert_eq!(reply.status, 201, "{reply:?}");
    assert!(media.download(&sha_hex(&pending), &[]).body == pending);
    assert!(media.download(&blob, &[]).body == stored);
    // The dedupe check still knows the first blob.
    assert_eq!(media.create(&token, stored.len(), &blob).status, 200);
}

#[test]
fn malformed_requests_get_400_and_the_service_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |_| {});
    let token = media.upload_token(1, 1, 1 << 20);
    let json = [("Content-Type", "application/json")];
    for body in [
        &b"not json"[..],
        b"{}",
        br#"{"size": 10}"#,
        br#"{"size": -1, "sha256": "00"}"#,
        br#"{"size": 10, "sha256": "xyz"}"#,
        br#"{"size": 0, "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}"#,
        br#"{"size": 10, "sha256": 5}"#,
        &[0xff; 2_000],
    ] {
        let reply = media.send("POST", "/v1/uploads", Some(&token), &json, Some(body));
        reply.assert_error(400, "BAD_REQUEST");
    }
    let data = bytes(100, 80);
    let id = media.begin(&token, &data);
    let path = format!("/v1/uploads/{id}");
    media
        .send("PATCH", &path, Some(&token), &[], Some(&data))
        .assert_error(400, "BAD_REQUEST");
    for offset in ["abc", "-1", "1e3", ""] {
        media
            .send(
                "PATCH",
                &path,
                Some(&token),
                &[("Upload-Offset", offset)],
                Some(&data),
            )
            .assert_error(400, "BAD_REQUEST");
    }
    // Unknown paths and methods answer in JSON too.
    media
        .send("GET", "/nothing/here", None, &[], None)
        .assert_error(404, "NOT_FOUND");
    media
        .send("DELETE", &path, Some(&token), &[], None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
    // Bytes that are not HTTP at all.
    for garbage in [
        &b"\x00\x01\x02\x03garbage\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"PATCH",
    ] {
        let mut stream = TcpStream::connect(media.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(garbage).unwrap();
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    }
    assert!(media.healthy());
    // The upload is untouched by all of that.
    assert_eq!(media.patch(&token, &id, 0, &data).status, 201);
}

#[test]
fn many_unfinished_uploads_wait_side_by_side() {
    // Their memory is measured by the bench (`switchboard-bench media`);
    // here: each keeps its staging file and its place, and the service
    // stays healthy.
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| c.media.uploads_in_flight_max = 300);
    let mut waiting = Vec::new();
    for user in 0..250u64 {
        let token = media.upload_token(user + 1, 1, 1 << 20);
        let data = bytes(8 << 10, user);
        let id = media.begin(&token, &data);
        assert_eq!(media.patch(&token, &id, 0, &data[..4 << 10]).status, 204);
        waiting.push((token, id, data));
    }
    assert_eq!(files_in(&media.media_dir().join("uploads")).len(), 250);
    assert!(media.healthy());
    for (token, id, data) in waiting.iter().step_by(25) {
        assert_eq!(
            media.patch(token, id, 4 << 10, &data[4 << 10..]).status,
            201
        );
    }
    assert_eq!(files_in(&media.media_dir().join("uploads")).len(), 240);
}

#[test]
fn connections_past_the_cap_wait_and_silent_ones_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| {
        c.media.connections_max = 3;
        c.media.idle_timeout_s = 2;
    });
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(media.addr()).unwrap())
        .collect();
    // The fourth is not served while three are open...
    let mut fourth = TcpStream::connect(media.addr()).unwrap();
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: media\r\nConnection: close\r\n\r\n")
        .unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut answer = Vec::new();
    assert!(
        fourth.read_to_end(&mut answer).is_err() && answer.is_empty(),
        "served past the cap: {:?}",
        String::from_utf8_lossy(&answer)
    );
    // ...until the silent ones are closed for idling; then it is.
    fourth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    fourth.read_to_end(&mut answer).unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(
            stream.read_to_end(&mut rest).unwrap(),
            0,
            "closed by the server"
        );
    }
    assert!(media.healthy());
}

#[test]
fn a_device_with_too_many_unfinished_uploads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| c.media.device_uploads_in_flight_max = 2);
    let token = media.upload_token(1, 1, 1 << 20);
    media.begin(&token, &bytes(1_000, 100));
    let second = bytes(1_000, 101);
    let second_id = media.begin(&token, &second);
    let third = bytes(1_000, 102);
    let reply = media.create(&token, third.len(), &sha_hex(&third));
    reply.assert_error(429, "DEVICE_UPLOADS_IN_FLIGHT");
    let message = reply.json()["message"].as_str().unwrap().to_string();
    assert!(message.contains("2 unfinished uploads"), "{message}");
    assert_eq!(reply.header("Retry-After"), None, "{reply:?}");
    // Another device of the same user is not held back.
    let other = media.upload_token(1, 2, 1 << 20);
    assert_eq!(
        media.create(&other, third.len(), &sha_hex(&third)).status,
        201
    );
    // Finishing one frees its place.
    assert_eq!(media.patch(&token, &second_id, 0, &second).status, 201);
    assert_eq!(
        media.create(&token, third.len(), &sha_hex(&third)).status,
        201
    );
}

#[test]
fn a_repeated_post_gets_the_same_upload_back() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| c.media.device_bytes_per_day = 10_000);
    let token = media.upload_token(1, 1, 1 << 20);
    let data = bytes(6_000, 110);
    let sha = sha_hex(&data);
    let first = media.create(&token, data.len(), &sha);
    assert_eq!(first.status, 201, "{first:?}");
    let id = first.json()["upload_id"].as_str().unwrap().to_string();
    assert_eq!(media.patch(&token, &id, 0, &data[..2_500]).status, 204);
    // The same POST again (its answer was lost, say): the same upload at
    // its offset, not a second one (which the quota would refuse: 6,000
    // reserved + 6,000 > 10,000).
    let again = media.create(&token, data.len(), &sha);
    assert_eq!(again.status, 201, "{again:?}");
    let json = again.json();
    assert_eq!(json["upload_id"], id.as_str());
    assert_eq!(json["offset"], 2_500);
    assert_eq!(json["size"], 6_000);
    assert_eq!(json["complete"], false);
    let location = format!("/v1/uploads/{id}");
    assert_eq!(first.header("Location"), Some(location.as_str()));
    assert_eq!(again.header("Location"), Some(location.as_str()));
    // Another size is another upload (and this one does not fit).
    media
        .create(&token, data.len() - 1, &sha)
        .assert_error(403, "QUOTA_EXCEEDED");
    // Another device's POST is its own upload.
    let other = media.create(&media.upload_token(1, 2, 1 << 20), data.len(), &sha);
    assert_eq!(other.status, 201, "{other:?}");
    assert_ne!(other.json()["upload_id"], id.as_str());
    // The upload continues from the offset the repeat gave.
    let reply = media.patch(&token, &id, 2_500, &data[2_500..]);
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(media.create(&token, data.len(), &sha).status, 200);
}

#[test]
fn bytes_that_do_not_match_their_hash_count_against_the_quota() {
    let dir = tempfile::tempdir().unwrap();
    let mut media = Media::start(dir.path(), |c| c.media.device_bytes_per_day = 10_000);
    let token = media.upload_token(1, 1, 1 << 20);
    let announced = bytes(6_000, 120);
    let id = media.begin(&token, &announced);
    media
        .patch(&token, &id, 0, &bytes(6_000, 121))
        .assert_error(422, "HASH_MISMATCH");
    // The service wrote and hashed those 6,000 bytes: 6,000 + 5,000 is
    // past the day's 10,000, even after a restart.
    let next = bytes(5_000, 122);
    media
        .create(&token, next.len(), &sha_hex(&next))
        .assert_error(403, "QUOTA_EXCEEDED");
    media.server.kill9();
    media.server.launch();
    media
        .create(&token, next.len(), &sha_hex(&next))
        .assert_error(403, "QUOTA_EXCEEDED");
    let fits = bytes(4_000, 123);
    assert_eq!(
        media.create(&token, fits.len(), &sha_hex(&fits)).status,
        201
    );
}

#[test]
fn a_stale_upload_is_kept_until_the_object_it_left_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let media = Media::start(dir.path(), |c| {
        c.media.upload_ttl_s = 2;
        c.media.sweep_interval_s = 1;
    });
    let token = media.upload_token(1, 1, 1 << 20);
    let data = bytes(5_000, 130);
    let blob = sha_hex(&data);
    // A directory where the blob's object goes: storing it fails, and so
    // does deleting it.
    let object = media.blob_file(&blob);
    std::fs::create_dir_all(object.join("in-the-way")).unwrap();
    let id = media.begin(&token, &data);
    media
        .patch(&token, &id, 0, &data)
        .assert_error(503, "STORE_UNAVAILABLE");
    // An upload with bytes missing, stale just after: its staging file
    // going shows that the sweep has been over both.
    let partial = bytes(5_000, 131);
    let partial_id = media.begin(&token, &partial);
    assert_eq!(
        media
            .patch(&token, &partial_id, 0, &partial[..1_000])
            .status,
        204
    );
    let uploads = media.media_dir().join("uploads");
    assert!(
        eventually(Duration::from_secs(10), || !uploads
            .join(&partial_id)
            .exists()),
        "the stale upload with bytes missing was not dropped"
    );
    // What is in the blob's place could not be deleted: the upload, the
    // only thing that leads to it, stays, sweep after sweep.
    std::thread::sleep(Duration::from_millis(1_500));
    assert!(
        uploads.join(&id).exists(),
        "the upload was dropped while the object it may have left remains"
    );
    // An object left there (stored, then not recorded): the next sweep
    // deletes it, then drops the upload.
    std::fs::remove_dir_all(&object).unwrap();
    std::fs::write(&object, &data).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !object.exists()),
        "the orphaned object was not deleted"
    );
    assert!(
        eventually(Duration::from_secs(10), || !uploads.join(&id).exists()),
        "the stale upload was not dropped once its object was gone"
    );
    media.download(&blob, &[]).assert_error(404, "NOT_FOUND");
    // Nothing is left in the way of uploading it again.
    assert_eq!(media.upload(&token, &data), blob);
}

/// Sends a PATCH from a thread of its own; its answer comes on the handle.
fn patch_in_background(
    url: String,
    token: String,
    body: Vec<u8>,
) -> std::thread::JoinHandle<Reply> {
    std::thread::spawn(move || {
        let headers = [
            ("Authorization", format!("Bearer {token}")),
            ("Upload-Offset", "0".to_string()),
        ];
        send("PATCH", &url, &headers, Some(&body))
    })
}

#[test]
fn uploads_waiting_for_a_claimed_blob_do_not_hold_up_other_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let media = InProcess::start(dir.path(), |_| {});
    let data = bytes(10_000, 140);
    let blob = sha_hex(&data);
    // Someone holds the blob (as a slow store of the same bytes would).
    let claim = media
        .shared
        .try_claim(BlobId::parse(&blob).unwrap())
        .unwrap();
    // More uploads of it finishing than there are finalize slots (4).
    let waiting: Vec<_> = (0..6u32)
        .map(|device| {
            let token = media.upload_token(1, device + 1, 1 << 20);
            let id = media.begin(&token, &data);
            patch_in_background(media.url(&format!("/v1/uploads/{id}")), token, data.clone())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // An upload of other bytes finishes meanwhile, at once.
    let started = Instant::now();
    let other = bytes(10_000, 141);
    assert_eq!(
        media.upload(&media.upload_token(2, 1, 1 << 20), &other),
        sha_hex(&other)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an unrelated upload waited {:?} behind the claimed blob",
        started.elapsed()
    );
    // Released, the waiting uploads all finish: one stores the blob, the
    // rest find it stored.
    drop(claim);
    for handle in waiting {
        let reply = handle.join().unwrap();
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.json()["blob_id"], blob.as_str());
    }
    assert_eq!(media.download(&blob, &[]).body, data);
    assert!(files_in(&media.media_dir().join("uploads")).is_empty());
}

#[test]
fn a_post_waits_briefly_for_a_claimed_blob_and_renews_it() {
    let dir = tempfile::tempdir().unwrap();
    let media = InProcess::start(dir.path(), |_| {});
    let data = bytes(3_000, 150);
    let blob = media.upload(&media.upload_token(1, 1, 1 << 20), &data);
    let id = BlobId::parse(&blob).unwrap();
    let announce = |device: u32| {
        let url = media.url("/v1/uploads");
        let token = media.upload_token(2, device, 1 << 20);
        let body = format!(r#"{{"size": {}, "sha256": "{blob}"}}"#, data.len());
        std::thread::spawn(move || {
            let headers = [("Authorization", format!("Bearer {token}"))];
            send("POST", &url, &headers, Some(body.as_bytes()))
        })
    };
    // Held briefly (a renewal, the sweep looking at it): the POST waits
    // and finds the blob stored.
    let claim = media.shared.try_claim(id).unwrap();
    let post = announce(1);
    std::thread::sleep(Duration::from_millis(300));
    drop(claim);
    let reply = post.join().unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["complete"], true);
    // Held longer (an upload of the same bytes being stored): after a
    // bounded wait it begins an upload.
    let claim = media.shared.try_claim(id).unwrap();
    let started = Instant::now();
    let reply = announce(2).join().unwrap();
    assert_eq!(reply.status, 201, "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(claim);
}

#[test]
fn a_create_body_that_never_arrives_is_answered_400() {
    let dir = tempfile::tempdir().unwrap();
    let media = InProcess::start(dir.path(), |shared| {
        shared.body_idle_timeout = Duration::from_millis(300);
    });
    let token = media.upload_token(1, 1, 1 << 20);
    let mut stream = TcpStream::connect(media.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The headers promise a body; none follows, and the socket stays open.
    write!(
        stream,
        "POST /v1/uploads HTTP/1.1\r\nHost: media\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains('}') {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(err) => panic!(
                "no answer after {:?} ({err}): {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"BAD_REQUEST\""), "{answer}");
    assert!(answer.contains("did not arrive in time"), "{answer}");
    // The service is there for the next client.
    assert_eq!(
        media.create(&token, 10, &sha_hex(b"0123456789")).status,
        201
    );
}
