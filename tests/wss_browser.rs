//! A real browser: headless Chromium, driven over WebDriver (chromedriver),
//! loads a page (tests/browser/) over https from a server in this test and
//! speaks to the real binary over wss://: the page checks its JavaScript
//! Noise against the known-answer vector, runs Noise XX in binary
//! messages, registers, logs in, sends a message to a native Noise client
//! (this test) and shows the reply it gets.
//!
//! Needs `chromium` and `chromedriver` (Debian: `chromium`,
//! `chromium-driver`; `.ci/run` installs them), `curl` and `tar`. The page's
//! primitives, @noble/curves, @noble/ciphers and @noble/hashes, are fetched
//! from the npm registry at pinned versions, checked against their
//! integrity hashes, cached under the target directory and served to the
//! page from here; no third-party code is kept in the repository.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::wss::TestCa;
use common::{RawClient, Server};
use serde_json::{json, Value};
use sha2::Digest;
use switchboard::noise::StaticKeypair;
use switchboard::proto::{pb, Frame, PROTOCOL_VERSION};

/// An npm package the page imports, pinned with its registry integrity.
struct Package {
    name: &'static str,
    version: &'static str,
    /// The registry's `dist.integrity` (SHA-512 of the tarball).
    integrity: &'static str,
}

/// @noble/curves 2.4.0 depends on exactly @noble/hashes 2.4.0.
const PACKAGES: [Package; 3] = [
    Package {
        name: "@noble/hashes",
        version: "2.4.0",
        integrity: "sha512-X5XaVWZIBCT7HHZGm5I7ZQXDwLG+bGXuSrMQAW+7Zvl87h1kmc1ZB1VSRJcpUfoUrGQp4Fkoxm5kZ+Ms+aW+eA==",
    },
    Package {
        name: "@noble/curves",
        version: "2.4.0",
        integrity: "sha512-P4/62zrgfH33CneE3Dn4WhJVA22YUU0eR51wKIan4NVRvwsA0YnPTwWGpNbpuacSujmSFLvyzpyuR30+fbq2Ew==",
    },
    Package {
        name: "@noble/ciphers",
        version: "2.4.0",
        integrity: "sha512-AnjFn0Jv92laAkvMrghlFZq4qQCIN/4DxFV/eooqtC2YTjB7kBeLMS2T9KJX4Dn+ZVXLOwK0lSgqDtx9gvxtiw==",
    },
];

/// How long the page has to finish (Chromium starts in a few seconds).
const PAGE_DEADLINE: Duration = Duration::from_secs(90);

#[test]
fn a_headless_chromium_page_messages_a_native_client_over_wss() {
    let chromium =
        find_program(&["chromium", "chromium-browser", "google-chrome"]).unwrap_or_else(|| {
            panic!(
                "this test needs Chromium: install the Debian packages `chromium` and \
                 `chromium-driver` (.ci/run does)"
            )
        });
    let chromedriver = find_program(&["chromedriver"]).unwrap_or_else(|| {
        panic!("this test needs chromedriver: install the Debian package `chromium-driver`")
    });
    let dir = tempfile::tempdir().unwrap();
    let npm = fetch_packages(&dir.path().join("npm"));

    let ca = TestCa::new();
    let leaf = ca.leaf("switchboard browser test");
    let (cert, key) = (dir.path().join("wss.crt"), dir.path().join("wss.key"));
    leaf.write(&cert, &key);
    let server = Server::start(dir.path(), |c| {
        c.wss.enabled = true;
        c.wss.cert_path = cert.clone();
        c.wss.key_path = key.clone();
        // Room for a browser that starts slowly on a loaded machine.
        c.limits.handshake_timeout_ms = 10_000;
        c.limits.idle_timeout_ms = 120_000;
        c.wss.handshake_timeout_ms = 10_000;
        c.wss.idle_timeout_ms = 120_000;
    });
    let wss = server.wss.expect("wss listener");
    let server_key = server.noise_key.expect("noise key");

    // The native device the page talks to.
    let native_key = StaticKeypair::generate();
    let (mut c, _) = RawClient::noise(server.addr, &native_key, None).expect("XX");
    c.send(&register());
    let (native_user, native_device) = match c.recv() {
        Some(Frame::Registered(r)) => (r.user_id, r.device_id),
        other => panic!("expected Registered, got {other:?}"),
    };
    let (mut native, _) =
        RawClient::noise(server.addr, &native_key, Some(&server_key)).expect("IK");
    native.send(&Frame::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        user_id: native_user,
        device_id: native_device,
        secret: Default::default(),
    }));
    assert!(matches!(native.recv(), Some(Frame::Welcome(_))));
    let native_side = std::thread::spawn(move || {
        // The browser's message, then the reply to its sender.
        let deadline = Instant::now() + PAGE_DEADLINE;
        let d = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match native.recv_timeout(left) {
                Some(Frame::Deliver(d)) => break d,
                Some(_) => continue,
                None => panic!("the native session closed"),
            }
        };
        native.ack(d.sequence);
        native.send_message(d.sender_user_id, 1, b"reply from native");
        native.collect_acks(1);
        (String::from_utf8_lossy(&d.payload).to_string(), native)
    });

    let pages = serve_pages(leaf.server_config(), npm);
    let driver = ChromeDriver::start(&chromedriver, &dir.path().join("chromedriver.log"));
    let session = driver.new_session(
        &chromium,
        &leaf.spki_sha256_base64,
        &dir.path().join("profile"),
    );
    let url = format!(
        "https://127.0.0.1:{}/index.html?wss={}&peer={}&key={}",
        pages.port(),
        wss.port(),
        native_user,
        hex::encode(server_key)
    );
    session.navigate(&url);
    let deadline = Instant::now() + PAGE_DEADLINE;
    let result = loop {
        let result = session.text("result");
        if result.starts_with("done") || result.starts_with("error") {
            break result;
        }
        if Instant::now() > deadline {
            break format!("timed out: {result}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = session.text("log");
    assert_eq!(result, "done: reply from native", "the page's log:\n{log}");
    assert!(log.contains("known-answer vector: ok"), "{log}");
    let (got, _native) = native_side.join().expect("the native side");
    assert_eq!(got, "hello from the browser");
}

fn register() -> Frame {
    Frame::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        registration_token: String::new(),
    })
}

/// The first of `names` found on PATH.
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// Fetches (or takes from the cache) every pinned package, checks its
/// integrity, and unpacks it to `root/<name>/`; returns `root`.
fn fetch_packages(root: &Path) -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("npm");
    std::fs::create_dir_all(&cache).unwrap();
    for package in &PACKAGES {
        let (scope, base) = package.name.split_once('/').unwrap();
        let tarball = cache.join(format!("{scope}-{base}-{}.tgz", package.version));
        let fresh = !tarball.exists() || !integrity_matches(&tarball, package.integrity);
        if fresh {
            let url = format!(
                "https://registry.npmjs.org/{}/-/{base}-{}.tgz",
                package.name, package.version
            );
            let part = tarball.with_extension("part");
            let status = Command::new("curl")
                .args(["--fail", "--silent", "--show-error", "--location"])
                .args(["--retry", "3", "--max-time", "120", "--output"])
                .arg(&part)
                .arg(&url)
                .status()
                .unwrap_or_else(|e| panic!("this test needs curl to fetch {url}: {e}"));
            assert!(status.success(), "fetching {url} failed: {status}");
            assert!(
                integrity_matches(&part, package.integrity),
                "{url} does not match its pinned integrity {}",
                package.integrity
            );
            std::fs::rename(&part, &tarball).unwrap();
        }
        let dest = root.join(package.name);
        std::fs::create_dir_all(&dest).unwrap();
        // npm tarballs hold one top directory, `package/`.
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dest)
            .arg("--strip-components=1")
            .status()
            .expect("tar");
        assert!(status.success(), "unpacking {}", tarball.display());
    }
    root.to_path_buf()
}

fn integrity_matches(file: &Path, integrity: &str) -> bool {
    let expected = integrity
        .strip_prefix("sha512-")
        .expect("a sha512 integrity");
    let bytes = std::fs::read(file).unwrap();
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(&bytes)) == expected
}

/// The page server: https on loopback with the test's leaf certificate, one
/// request per connection, a thread per connection.
struct Pages {
    addr: SocketAddr,
}

impl Pages {
    fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn serve_pages(tls: Arc<rustls::ServerConfig>, npm: PathBuf) -> Pages {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (tls, npm) = (tls.clone(), npm.clone());
            std::thread::spawn(move || {
                let _ = serve_page(stream, tls, &npm);
            });
        }
    });
    Pages { addr }
}

fn serve_page(
    stream: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    npm: &Path,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(tls).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tls.read(&mut byte)? == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_string();
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let file = match path.as_str() {
        "/" | "/index.html" => Some(ours.join("index.html")),
        "/app.js" | "/noise.js" | "/frames.js" => Some(ours.join(&path[1..])),
        "/vector.txt" => {
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/noise/testdata/vector.txt"))
        }
        _ => path
            .strip_prefix("/npm/")
            .filter(|rest| !rest.split('/').any(|part| part == ".." || part.is_empty()))
            .map(|rest| npm.join(rest)),
    };
    let (status, kind, body) = match file.and_then(|f| std::fs::read(&f).ok().map(|b| (f, b))) {
        Some((file, body)) => {
            let kind = match file.extension().and_then(|e| e.to_str()) {
                Some("html") => "text/html; charset=utf-8",
                Some("js") => "text/javascript; charset=utf-8",
                _ => "text/plain; charset=utf-8",
            };
            ("200 OK", kind, body)
        }
        None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    write!(
        tls,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    tls.write_all(&body)?;
    tls.flush()?;
    tls.conn.send_close_notify();
    tls.flush()
}

/// A chromedriver process, killed on drop.
struct ChromeDriver {
    child: Child,
    base: String,
}

impl ChromeDriver {
    fn start(program: &Path, log: &Path) -> ChromeDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let driver = ChromeDriver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(status) = driver.call("GET", "/status", None) {
                if status["value"]["ready"] == json!(true) {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One WebDriver command; the response's JSON.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let request = ureq::request(method, &url).timeout(Duration::from_secs(120));
        let response = match body {
            Some(body) => request
                .set("Content-Type", "application/json")
                .send_string(&body.to_string()),
            None => request.call(),
        };
        let text = match response {
            Ok(response) => response.into_string().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                return Err(format!("{method} {path}: {code} {text}"));
            }
            Err(e) => return Err(format!("{method} {path}: {e}")),
        };
        serde_json::from_str(&text).map_err(|e| format!("{method} {path}: {e}: {text}"))
    }

    fn new_session(&self, chromium: &Path, spki: &str, profile: &Path) -> Session<'_> {
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": chromium.to_string_lossy(),
                        "args": [
                            "--headless=new",
                            // Chromium's sandbox needs user namespaces or
                            // a non-root user; the page is our own.
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--no-first-run",
                            // Trust exactly the test's leaf certificate,
                            // by the hash of its public key (Chromium
                            // honours this with a --user-data-dir).
                            format!("--ignore-certificate-errors-spki-list={spki}"),
                            format!("--user-data-dir={}", profile.display()),
                        ],
                    },
                },
            },
        });
        let response = self
            .call("POST", "/session", Some(capabilities))
            .unwrap_or_else(|e| panic!("starting Chromium over WebDriver: {e}"));
        let id = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {response}"))
            .to_string();
        Session { driver: self, id }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session (one Chromium), ended on drop.
struct Session<'a> {
    driver: &'a ChromeDriver,
    id: String,
}

impl Session<'_> {
    fn navigate(&self, url: &str) {
        self.driver
            .call(
                "POST",
                &format!("/session/{}/url", self.id),
                Some(json!({ "url": url })),
            )
            .unwrap_or_else(|e| panic!("navigating to {url}: {e}"));
    }

    /// The text of the element with id `id`.
    fn text(&self, id: &str) -> String {
        let script =
            format!("const e = document.getElementById('{id}'); return e ? e.textContent : '';");
        let response = self
            .driver
            .call(
                "POST",
                &format!("/session/{}/execute/sync", self.id),
                Some(json!({ "script": script, "args": [] })),
            )
            .unwrap_or_else(|e| panic!("reading #{id}: {e}"));
        response["value"].as_str().unwrap_or_default().to_string()
    }
}

impl Drop for Session<'_> {
    /// Quits Chromium, also when the test failed: killing chromedriver
    /// alone would leave the browser running.
    fn drop(&mut self) {
        let _ = self
            .driver
            .call("DELETE", &format!("/session/{}", self.id), None);
    }
}
