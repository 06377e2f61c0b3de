//! The media service against a real S3-compatible server: `s3s-fs`, started
//! by the test on loopback with a bucket in a temporary directory. Covers
//! the core flow (a small and a multipart-sized upload, range download,
//! dedupe, expiry) and checks the objects in the server's directory.
//!
//! Needs the `s3s-fs` binary (on PATH or in ~/.cargo/bin):
//! `cargo install s3s-fs@0.14.1 --features binary --locked`.
//! With `SWITCHBOARD_SKIP_S3=1` the tests skip instead of failing when it is
//! missing.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::media::{bytes, now_ms, send, sha_hex, Reply};
use common::Server;
use switchboard::config::{Config, MediaBackend};
use switchboard::media::token::{Grant, MediaKey, Subject};

const BUCKET: &str = "switchboard-media";
const ACCESS_KEY: &str = "switchboard-test";
const SECRET_KEY: &str = "switchboard-test-secret";
const INSTALL: &str = "cargo install s3s-fs@0.14.1 --features binary --locked";

/// The `s3s-fs` binary, or None (after saying so) when the run allows
/// skipping; panics with the install command otherwise.
fn s3s_fs() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("s3s-fs"))
            .find(|path| path.is_file())
    });
    let in_cargo = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|path| path.is_file());
    if let Some(path) = on_path.or(in_cargo) {
        return Some(path);
    }
    if std::env::var("SWITCHBOARD_SKIP_S3").is_ok_and(|v| v == "1") {
        eprintln!("skipped: s3s-fs is not installed (SWITCHBOARD_SKIP_S3=1)");
        return None;
    }
    panic!(
        "the S3 media tests need the s3s-fs binary on PATH or in ~/.cargo/bin; install it \
         with `{INSTALL}`, or set SWITCHBOARD_SKIP_S3=1 to skip these tests"
    );
}

/// A running s3s-fs with one bucket; killed on drop.
struct S3 {
    child: Child,
    addr: SocketAddr,
    root: PathBuf,
}

impl S3 {
    fn start(binary: &Path, root: &Path) -> S3 {
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        let mut child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root)
            // Its address is only in its info log.
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some((_, url)) = line.split_once("server is running at http://") {
                        let _ = tx.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("s3s-fs did not report its address within 20 s");
            }
        };
        S3 {
            child,
            addr,
            root: root.to_path_buf(),
        }
    }

    fn object(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    fn point(&self, config: &mut Config) {
        config.media.backend = MediaBackend::S3;
        config.media.s3.endpoint = format!("http://{}", self.addr);
        config.media.s3.bucket = BUCKET.into();
        config.media.s3.region = "us-east-1".into();
        config.media.s3.access_key_id = ACCESS_KEY.into();
        config.media.s3.secret_access_key = SECRET_KEY.into();
        config.media.s3.allow_http = true;
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    base: String,
    key: MediaKey,
}

impl Client {
    fn new(server: &Server) -> Client {
        Client {
            base: format!("http://{}", server.media.expect("media runs")),
            key: MediaKey::load_or_create(&server.config.server.data_dir).unwrap(),
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let headers: Vec<(&str, String)> = headers
            .iter()
            .map(|(name, value)| (*name, value.to_string()))
            .collect();
        send(method, &format!("{}{path}", self.base), &headers, body)
    }

    fn upload_token(&self, user: u64) -> String {
        Grant {
            user,
            device: 1,
            expires_at_ms: now_ms() + 600_000,
            subject: Subject::Upload { size_max: 64 << 20 },
        }
        .sign(&self.key)
    }

    fn create(&self, token: &str, data: &[u8]) -> Reply {
        let body = format!(
            r#"{{"size": {}, "sha256": "{}"}}"#,
            data.len(),
            sha_hex(data)
        );
        let auth = format!("Bearer {token}");
        self.send(
            "POST",
            "/v1/uploads",
            &[("Authorization", &auth)],
            Some(body.as_bytes()),
        )
    }

    /// A whole upload in two PATCHes; gives the blob id.
    fn upload(&self, user: u64, data: &[u8]) -> String {
        let token = self.upload_token(user);
        let reply = self.create(&token, data);
        assert_eq!(
            reply.status,
            201,
            "{:?}",
            String::from_utf8_lossy(&reply.body)
        );
        let id = reply.json()["upload_id"].as_str().unwrap().to_string();
        let auth = format!("Bearer {token}");
        let half = data.len() / 2;
        for (offset, part) in [(0, &data[..half]), (half, &data[half..])] {
            let offset = offset.to_string();
            let reply = self.send(
                "PATCH",
                &format!("/v1/uploads/{id}"),
                &[("Authorization", &auth), ("Upload-Offset", &offset)],
                Some(part),
            );
            if offset != "0" {
                assert_eq!(
                    reply.status,
                    201,
                    "{:?}",
                    String::from_utf8_lossy(&reply.body)
                );
                let blob = reply.json()["blob_id"].as_str().unwrap().to_string();
                assert_eq!(blob, sha_hex(data));
                return blob;
            }
            assert_eq!(reply.status, 204);
        }
        unreachable!()
    }

    fn download(&self, blob: &str, range: Option<&str>) -> Reply {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(blob, &mut raw).unwrap();
        let token = Grant {
            user: 9,
            device: 1,
            expires_at_ms: now_ms() + 600_000,
            subject: Subject::Download { blob: raw },
        }
        .sign(&self.key);
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(range) = range {
            headers.push(("Range", range));
        }
        self.send("GET", &format!("/v1/blobs/{blob}"), &headers, None)
    }
}

#[test]
fn blobs_go_to_s3_in_one_put_or_in_parts() {
    let Some(binary) = s3s_fs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(&binary, &dir.path().join("s3"));
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server = Server::start(&server_dir, |config| {
        s3.point(config);
        config.media.blob_bytes_max = 24 << 20;
    });
    let client = Client::new(&server);

    // Small: one put.
    let small = bytes(100_000, 1);
    let blob = client.upload(1, &small);
    assert!(std::fs::read(s3.object(&format!("blobs/{blob}"))).unwrap() == small);
    let reply = client.download(&blob, None);
    assert_eq!(reply.status, 200);
    assert!(reply.body == small);
    let reply = client.download(&blob, Some("bytes=1000-1999"));
    assert_eq!(reply.status, 206);
    assert_eq!(
        reply.header("Content-Range"),
        Some("bytes 1000-1999/100000")
    );
    assert!(reply.body == small[1000..2000]);
    let reply = client.download(&blob, Some("bytes=-10"));
    assert_eq!(reply.status, 206);
    assert!(reply.body == small[small.len() - 10..]);
    assert_eq!(client.download(&blob, Some("bytes=100000-")).status, 416);

    // Large: more than one 8 MiB part.
    let large = bytes((8 << 20) * 2 + 12_345, 2);
    let big_blob = client.upload(2, &large);
    let stored = std::fs::read(s3.object(&format!("blobs/{big_blob}"))).unwrap();
    assert_eq!(stored.len(), large.len());
    assert!(stored == large, "the multipart object differs");
    let reply = client.download(&big_blob, None);
    assert_eq!(reply.status, 200);
    assert!(reply.body == large);
    let first = (8 << 20) - 5;
    let range = format!("bytes={first}-{}", first + 9);
    let reply = client.download(&big_blob, Some(&range));
    assert_eq!(reply.status, 206);
    assert!(
        reply.body == large[first..first + 10],
        "a range across parts"
    );

    // Dedupe: the same bytes again are not uploaded.
    let reply = client.create(&client.upload_token(3), &small);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["blob_id"], blob.as_str());
    // Nothing staged is left on the server's disk.
    let uploads = server.config.server.data_dir.join("media/uploads");
    assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);
}

#[test]
fn expired_blobs_are_deleted_from_s3() {
    let Some(binary) = s3s_fs() else { return };
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3::start(&binary, &dir.path().join("s3"));
    let server_dir = dir.path().join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let server = Server::start(&server_dir, |config| {
        s3.point(config);
        config.media.ttl_s = 2;
        config.media.sweep_interval_s = 1;
    });
    let client = Client::new(&server);
    let data = bytes(10_000, 3);
    let blob = client.upload(1, &data);
    let object = s3.object(&format!("blobs/{blob}"));
    assert!(object.is_file());
    assert_eq!(client.download(&blob, None).status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while object.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !object.exists(),
        "the expired object is still in the bucket"
    );
    assert_eq!(client.download(&blob, None).status, 404);
}
