//! Media grants over the chat connection (docs/protocol.md §4.16), used
//! against the real media service: the token a shard signs opens exactly
//! the upload or download it names; and `switchboard chat` sends a file
//! that the peer's chat fetches, checks and saves.

mod common;

use std::time::Duration;

use common::{admin_get, metric_sum, Chat, RawClient, Server};
use switchboard::client::media::{self, MediaError};
use switchboard::proto::{pb, ErrorCode, Frame, MediaGrantKind};

fn ask(client: &mut RawClient, request_id: u64, kind: MediaGrantKind, size: u64, blob: &[u8]) {
    client.send(&Frame::RequestMediaGrant(pb::RequestMediaGrant {
        request_id,
        kind: kind as i32,
        size,
        blob_id: bytes::Bytes::copy_from_slice(blob),
    }));
}

fn grant(client: &mut RawClient) -> pb::MediaGrant {
    loop {
        match client.recv_timeout(Duration::from_secs(10)) {
            Some(Frame::MediaGrant(grant)) => return grant,
            Some(Frame::Error(e)) => panic!("refused: {e:?}"),
            Some(_) => {}
            None => panic!("no grant"),
        }
    }
}

fn refused(result: Result<impl std::fmt::Debug, MediaError>) -> (u16, String) {
    match result {
        Err(MediaError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_grant_opens_exactly_the_upload_or_download_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |_| {});
    assert!(server.media.is_some(), "the media service runs by default");
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let (mut b, _) = RawClient::login(server.addr, &bob);

    let sealed = media::seal(&vec![7u8; 300_000]);
    let size = sealed.ciphertext.len() as u64;
    ask(&mut a, 1, MediaGrantKind::Upload, size, &[]);
    let upload = grant(&mut a);
    assert_eq!((upload.request_id, upload.size_max), (1, size));
    assert_eq!(upload.url, format!("http://{}", server.media.unwrap()));

    // A token for fewer bytes does not take this blob.
    ask(&mut a, 2, MediaGrantKind::Upload, size - 1, &[]);
    let small = grant(&mut a);
    assert_eq!(
        refused(media::upload(&small.url, &small.token, &sealed)),
        (413, "BLOB_TOO_LARGE".into())
    );
    media::upload(&upload.url, &upload.token, &sealed).expect("uploaded");

    // Bob downloads with his own grant for this blob.
    ask(&mut b, 3, MediaGrantKind::Download, 0, &sealed.blob_id);
    let download = grant(&mut b);
    let got = media::download(&download.url, &download.token, &sealed.blob_id, size).unwrap();
    assert_eq!(media::open(&got, &sealed.key).unwrap(), vec![7u8; 300_000]);

    // An upload token is not a download token, and a download token is for
    // its blob only.
    assert_eq!(
        refused(media::download(
            &upload.url,
            &upload.token,
            &sealed.blob_id,
            size
        ))
        .0,
        401
    );
    let other = media::seal(b"another");
    assert_eq!(
        refused(media::download(
            &download.url,
            &download.token,
            &other.blob_id,
            size
        ))
        .0,
        403
    );
    // A token altered in transit is refused.
    let mut forged = download.token.clone().into_bytes();
    let last = forged.len() - 3;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(
        refused(media::download(
            &download.url,
            &forged,
            &sealed.blob_id,
            size
        ))
        .0,
        401
    );

    // Bad requests get an error naming the request; the session goes on.
    for (id, kind, size, blob, code) in [
        (
            10,
            MediaGrantKind::Upload,
            0,
            &[][..],
            ErrorCode::MalformedFrame,
        ),
        (
            11,
            MediaGrantKind::Upload,
            server.config.media.blob_bytes_max + 1,
            &[][..],
            ErrorCode::PayloadTooLarge,
        ),
        (
            12,
            MediaGrantKind::Download,
            0,
            &[1u8; 31][..],
            ErrorCode::MalformedFrame,
        ),
        (
            13,
            MediaGrantKind::Unspecified,
            5,
            &[][..],
            ErrorCode::MalformedFrame,
        ),
    ] {
        ask(&mut b, id, kind, size, blob);
        let error = b.expect_error(code);
        assert_eq!((error.client_message_id, error.fatal), (id, false));
    }
    ask(&mut b, 14, MediaGrantKind::Download, 0, &sealed.blob_id);
    assert_eq!(grant(&mut b).request_id, 14);

    // The admin endpoint counts the service's answers and, within a
    // second, its stored bytes.
    let stored = |text: &str| metric_sum(text, "switchboard_media_blob_bytes", "");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, text) = loop {
        let (status, text) = admin_get(server.admin, "/metrics");
        if stored(&text) as u64 >= size || std::time::Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 200);
    assert_eq!(stored(&text) as u64, size);
    let answered = |code: &str| {
        metric_sum(
            &text,
            "switchboard_media_responses_total",
            &format!("status=\"{code}\""),
        )
    };
    assert!(answered("201") >= 2.0, "{text}");
    assert!(answered("413") >= 1.0 && answered("401") >= 2.0 && answered("403") >= 1.0);
    assert_eq!(
        metric_sum(&text, "switchboard_media_uploads_in_flight", ""),
        0.0
    );
}

#[test]
fn without_the_media_service_grants_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.media.enabled = false);
    assert_eq!(server.media, None);
    let alice = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    ask(&mut a, 1, MediaGrantKind::Upload, 10, &[]);
    let error = a.expect_error(ErrorCode::UnsupportedFeature);
    assert_eq!(error.client_message_id, 1);
}

#[test]
fn chat_sends_a_file_that_the_peer_fetches_checks_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| c.limits.idle_timeout_ms = 60_000);
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let photo: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(path("photo.jpg"), &photo).unwrap();

    let mut bob = Chat::start(
        server.addr,
        &[
            "--profile",
            &path("b.cred"),
            "--register",
            "--downloads",
            &path("inbox"),
        ],
    );
    let registered = bob.wait_for("registered: you are user");
    let bob_id: u64 = registered
        .split("user ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("user id");
    bob.wait_for("connected.");

    let mut alice = Chat::start(server.addr, &["--profile", &path("a.cred"), "--register"]);
    alice.wait_for("connected.");
    alice.type_line("/send-file photo.jpg");
    alice.wait_for("! no peer");
    alice.type_line(&format!("/to {bob_id}"));
    alice.type_line(&format!("/send-file {}", path("missing.jpg")));
    alice.wait_for("! cannot read");
    // Larger than the server takes: refused before the file is read.
    let big = std::fs::File::create(path("big.bin")).unwrap();
    big.set_len(server.config.media.blob_bytes_max).unwrap();
    alice.type_line(&format!("/send-file {}", path("big.bin")));
    alice.wait_for("! sending big.bin refused");
    alice.type_line(&format!("/send-file {}", path("photo.jpg")));
    alice.wait_for("* uploading photo.jpg");
    alice.wait_for("* sent photo.jpg to user");
    alice.wait_for("✓ sent");

    bob.wait_for("[file photo.jpg");
    let saved = bob.wait_for("* saved photo.jpg (200000 bytes)");
    assert!(saved.contains(&path("inbox")), "{saved}");
    assert_eq!(
        std::fs::read(dir.path().join("inbox").join("photo.jpg")).unwrap(),
        photo
    );
    alice.wait_for("✓✓ read");
}

#[test]
fn a_slow_finish_is_the_servers_wait_not_an_idle_client() {
    // Hashing and storing 40 MiB takes the service longer than the idle
    // timeout here; the connection waiting for that answer is not idle.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), |c| {
        c.limits.idle_timeout_ms = 120_000;
        c.media.idle_timeout_s = 1;
        c.media.blob_bytes_max = 64 << 20;
        c.media.device_bytes_per_day = 256 << 20;
    });
    let alice = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    let plain: Vec<u8> = (0..40u32 << 20).map(|i| (i % 253) as u8).collect();
    let sealed = media::seal(&plain);
    ask(
        &mut a,
        1,
        MediaGrantKind::Upload,
        sealed.ciphertext.len() as u64,
        &[],
    );
    let upload = grant(&mut a);
    let started = std::time::Instant::now();
    media::upload(&upload.url, &upload.token, &sealed).expect("uploaded");
    eprintln!("40 MiB uploaded in {:?}", started.elapsed());
    ask(&mut a, 2, MediaGrantKind::Download, 0, &sealed.blob_id);
    let download = grant(&mut a);
    let got = media::download(
        &download.url,
        &download.token,
        &sealed.blob_id,
        sealed.ciphertext.len() as u64,
    )
    .unwrap();
    assert_eq!(got.len(), sealed.ciphertext.len());
}
