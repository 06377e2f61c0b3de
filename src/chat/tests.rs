//! The chat loop against the client tests' fake server: real loopback
//! socket, real frames; input lines come from a local channel.

use std::rc::Rc;
use std::time::Duration;

use glommio::channels::local_channel;

use super::*;
use crate::client::tests::{credentials, deliver, listen, run, Peer};
use crate::proto::{pb, Frame, ReceiptKind};

/// These chats receive no files: the directory is never written.
fn transfers() -> media::Transfers {
    media::Transfers::new(std::env::temp_dir().join("switchboard-chat-test-downloads"))
}

/// A profile that is never written, for chats that do not change it.
fn no_profile() -> Profile {
    Profile::new(None, credentials())
}

fn receipt(sequence: u64, kind: ReceiptKind, id: u64) -> Frame {
    Frame::Receipt(pb::Receipt {
        sequence,
        kind: kind as i32,
        by_user_id: 13,
        by_device_id: 1,
        client_message_ids: vec![id],
        timestamp_ms: 1_700_000_000_500,
        ..Default::default()
    })
}

#[test]
fn chat_shows_sent_delivered_read_and_acks_and_reads_incoming() {
    let output = run(|| async {
        let (listener, opts) = listen();
        let (lines_in, lines) = local_channel::new_bounded::<String>(8);
        let lines_in = Rc::new(lines_in);
        let server = {
            let lines_in = lines_in.clone();
            glommio::spawn_local(async move {
                let mut peer = Peer::accept(&listener).await;
                peer.welcome().await;
                let Some(Frame::Send(send)) = peer.read().await else {
                    panic!("expected Send")
                };
                assert_eq!(send.recipient_user_id, 13);
                assert_eq!(send.payload, "hi there");
                let id = send.client_message_id;
                peer.write(&[
                    Frame::ServerAck(pb::ServerAck {
                        client_message_id: id,
                        server_sequence: 1,
                        timestamp_ms: 1,
                    }),
                    receipt(1, ReceiptKind::Delivered, id),
                ])
                .await;
                assert_eq!(
                    peer.read().await,
                    Some(Frame::Ack(pb::Ack {
                        up_to_sequence: 1,
                        sequences: vec![]
                    }))
                );
                peer.write(&[
                    receipt(2, ReceiptKind::Read, id),
                    Frame::Deliver(deliver(3, 900)),
                ])
                .await;
                let mut rest = Vec::new();
                while rest.len() < 3 {
                    rest.push(peer.read().await.expect("frame"));
                }
                assert_eq!(
                    rest,
                    vec![
                        Frame::Ack(pb::Ack {
                            up_to_sequence: 2,
                            sequences: vec![]
                        }),
                        Frame::Ack(pb::Ack {
                            up_to_sequence: 3,
                            sequences: vec![]
                        }),
                        Frame::ReadReceipt(pb::ReadReceipt {
                            sender_user_id: 30,
                            sender_device_id: 1,
                            client_message_ids: vec![900],
                        }),
                    ]
                );
                lines_in.send("/quit".to_string()).await.expect("line");
                peer
            })
        };
        let session =
            ReconnectingSession::connect(&opts, &credentials(), ReconnectOptions::default())
                .await
                .expect("connected");
        for line in ["/help", "hello?", "/to 13", "hi there"] {
            lines_in.send(format!("{line}\n")).await.expect("line");
        }
        let mut out = Vec::new();
        glommio::timer::timeout(Duration::from_secs(10), async {
            chat_loop(
                &session,
                &mut no_profile(),
                || lines.recv(),
                &mut transfers(),
                &mut out,
            )
            .await
            .expect("chat ran");
            Ok(())
        })
        .await
        .expect("chat finished in time");
        drop(server.await);
        String::from_utf8(out).expect("utf-8")
    });
    let expected = [
        "/to USER",
        "! no peer",
        "* talking to user 13",
        "[#1 → 13] hi there",
        "[#1 → 13] ✓ sent",
        "[#1 → 13] ✓✓ delivered",
        "[#1 → 13] ✓✓ read",
        "30: message 900",
    ];
    let mut rest = output.as_str();
    for piece in expected {
        let at = rest
            .find(piece)
            .unwrap_or_else(|| panic!("{piece:?} missing (in order) from:\n{output}"));
        rest = &rest[at + piece.len()..];
    }
}

#[test]
fn chat_reports_a_failed_send_and_keeps_going() {
    let output = run(|| async {
        let (listener, opts) = listen();
        let (lines_in, lines) = local_channel::new_bounded::<String>(8);
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let Some(Frame::Send(send)) = peer.read().await else {
                panic!("expected Send")
            };
            peer.write(&[Frame::Error(pb::Error {
                code: crate::proto::ErrorCode::UnknownRecipient as i32,
                message: "no such user".to_string(),
                client_message_id: send.client_message_id,
                fatal: false,
                retry_after_ms: 0,
                ..Default::default()
            })])
            .await;
            peer.read().await
        });
        let session =
            ReconnectingSession::connect(&opts, &credentials(), ReconnectOptions::default())
                .await
                .expect("connected");
        lines_in
            .send("/msg 999 anyone?".to_string())
            .await
            .expect("line");
        let mut out = Vec::new();
        let chat = glommio::spawn_local(async move {
            chat_loop(
                &session,
                &mut no_profile(),
                || lines.recv(),
                &mut transfers(),
                &mut out,
            )
            .await
            .expect("chat ran");
            out
        });
        glommio::timer::sleep(Duration::from_millis(200)).await;
        lines_in.send("/quit".to_string()).await.expect("line");
        let out = chat.await;
        drop(server.await);
        String::from_utf8(out).expect("utf-8")
    });
    assert!(
        output.contains("[#1 → 999] ✗ not sent: UNKNOWN_RECIPIENT: no such user"),
        "{output}"
    );
}

#[test]
fn log_in_registers_when_the_profile_is_missing_and_reuses_it_after() {
    run(|| async {
        let (listener, mut opts) = listen();
        opts.plaintext = true;
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ChatArgs {
            server: opts.server.to_string(),
            profile: dir.path().join("me.cred"),
            register: false,
            token: None,
            link: None,
            device_name: "chat".to_string(),
            downloads: dir.path().join("downloads"),
            plaintext: true,
            accept_new_server_key: false,
        };
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            let Some(Frame::Register(_)) = peer.read().await else {
                panic!("expected Register")
            };
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 55,
                device_id: 1,
                secret: bytes::Bytes::from(vec![3u8; 32]),
            })])
            .await;
        });
        let mut out = Vec::new();
        let first = log_in_or_register(&opts, &args, &mut out)
            .await
            .expect("registered");
        server.await;
        assert_eq!(first.user, UserId(55));
        // Second start: no server contact needed, the profile is read.
        let again = log_in_or_register(&opts, &args, &mut out)
            .await
            .expect("loaded");
        assert_eq!(again, first);
        // Asking to register over an existing profile is refused.
        let clobber = ChatArgs {
            register: true,
            ..args
        };
        assert!(log_in_or_register(&opts, &clobber, &mut out).await.is_err());
    });
}

#[test]
fn chat_waits_for_the_server_ack_before_leaving_at_end_of_input() {
    let output = run(|| async {
        let (listener, opts) = listen();
        let server = glommio::spawn_local(async move {
            let mut peer = Peer::accept(&listener).await;
            peer.welcome().await;
            let Some(Frame::Send(send)) = peer.read().await else {
                panic!("expected Send")
            };
            glommio::timer::sleep(Duration::from_millis(100)).await;
            peer.write(&[Frame::ServerAck(pb::ServerAck {
                client_message_id: send.client_message_id,
                server_sequence: 1,
                timestamp_ms: 1,
            })])
            .await;
            peer
        });
        let session =
            ReconnectingSession::connect(&opts, &credentials(), ReconnectOptions::default())
                .await
                .expect("connected");
        // Piped input: one message, then end of input at once.
        let mut lines = vec!["/msg 13 bye".to_string()].into_iter();
        let mut out = Vec::new();
        chat_loop(
            &session,
            &mut no_profile(),
            || std::future::ready(lines.next()),
            &mut transfers(),
            &mut out,
        )
        .await
        .expect("chat ran");
        drop(server.await);
        String::from_utf8(out).expect("utf-8")
    });
    assert!(output.contains("[#1 → 13] ✓ sent"), "{output}");
}

// The server's key: pinned at first contact, IK after, a change refused
// until accepted, a rotation re-pinned.

use crate::client::tests::{noise_credentials, server_keys, Refused};
use crate::noise::{fingerprint, KeySlot, Pattern, ServerKeys, StaticKeypair};
use pin::{key_changed_message, pin_change, PinChange};

fn chat_args(dir: &std::path::Path, opts: &ConnectOptions) -> ChatArgs {
    ChatArgs {
        server: opts.server.to_string(),
        profile: dir.join("me.cred"),
        register: false,
        token: None,
        link: None,
        device_name: "chat".to_string(),
        downloads: dir.join("downloads"),
        plaintext: false,
        accept_new_server_key: false,
    }
}

#[test]
fn pin_change_pins_first_contact_and_repins_a_rotation() {
    let (old, new) = ([1u8; 32], [2u8; 32]);
    assert_eq!(pin_change(None, None), PinChange::Unchanged);
    assert_eq!(pin_change(Some(old), None), PinChange::Unchanged);
    assert_eq!(pin_change(Some(old), Some(old)), PinChange::Unchanged);
    assert_eq!(pin_change(None, Some(new)), PinChange::Pinned(new));
    assert_eq!(
        pin_change(Some(old), Some(new)),
        PinChange::Rotated { old, new }
    );
    assert_eq!(PinChange::Unchanged.note(), None);
    let pinned = PinChange::Pinned(new).note().expect("a note");
    assert!(pinned.contains(&fingerprint(&new)), "{pinned}");
    let rotated = PinChange::Rotated { old, new }.note().expect("a note");
    assert!(
        rotated.contains("rotated") && rotated.contains(&fingerprint(&old)),
        "{rotated}"
    );
}

#[test]
fn key_changed_message_names_both_keys_and_how_to_accept_the_new_one() {
    let text = key_changed_message(
        "chat.example:7700",
        std::path::Path::new("me.cred"),
        &[1; 32],
        &[2; 32],
    );
    for piece in [
        "HAS CHANGED",
        "chat.example:7700",
        &fingerprint(&[1; 32]),
        &fingerprint(&[2; 32]),
        "man in the middle",
        "--profile me.cred --server chat.example:7700 --accept-new-server-key",
        "server_key line",
    ] {
        assert!(text.contains(piece), "{piece:?} missing from:\n{text}");
    }
}

#[test]
fn chat_pins_the_server_key_at_registration_and_uses_ik_after() {
    run(|| async {
        let (listener, opts) = listen();
        let dir = tempfile::tempdir().expect("tempdir");
        let args = chat_args(dir.path(), &opts);
        let (_keys_dir, keys) = server_keys();
        let server_public = *keys.public();
        let server = glommio::spawn_local(async move {
            let (mut peer, first) = Peer::accept_noise(&listener, &keys).await;
            let Some(Frame::Register(_)) = peer.read().await else {
                panic!("expected Register")
            };
            peer.write(&[Frame::Registered(pb::Registered {
                protocol_version: 1,
                user_id: 55,
                device_id: 1,
                secret: bytes::Bytes::new(),
            })])
            .await;
            let (mut peer, second) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            (first.pattern, second.pattern, peer)
        });
        let mut out = Vec::new();
        let creds = log_in_or_register(&opts, &args, &mut out)
            .await
            .expect("registered");
        let output = String::from_utf8(out.clone()).expect("utf-8");
        assert!(
            output.contains(&format!(
                "the server's key fingerprint is {}",
                fingerprint(&server_public)
            )),
            "{output}"
        );
        let saved = Credentials::load(&args.profile).expect("profile");
        assert_eq!(saved.server_key, Some(server_public));
        assert_eq!(saved.secret, None);
        let mut profile = Profile::new(Some(args.profile.clone()), creds);
        let session = connect_profile(&opts, &args, &mut profile, &mut out)
            .await
            .expect("connected");
        let (first, second, _peer) = server.await;
        assert_eq!((first, second), (Pattern::Xx, Pattern::Ik));
        assert_eq!(session.credentials(), saved);
    });
}

#[test]
fn chat_refuses_a_changed_server_key_until_it_is_accepted() {
    run(|| async {
        let (listener, opts) = listen();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = chat_args(dir.path(), &opts);
        let (_keys_dir, keys) = server_keys();
        let server_public = *keys.public();
        let pinned = *StaticKeypair::generate().public();
        let creds = noise_credentials(Some(pinned));
        creds.save(&args.profile).expect("saved");
        let server = glommio::spawn_local(async move {
            // Refused: the IK to the old key, then the XX the client drops.
            let mut peer = Peer::accept(&listener).await;
            assert!(peer.handshake(&keys).await.is_err());
            drop(peer);
            let mut peer = Peer::accept(&listener).await;
            assert_eq!(peer.handshake(&keys).await.err(), Some(Refused::Closed));
            drop(peer);
            // Accepted: an XX with no pin.
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            (handshake.pattern, peer)
        });
        let mut out = Vec::new();
        let mut profile = Profile::new(Some(args.profile.clone()), creds.clone());
        let err = connect_profile(&opts, &args, &mut profile, &mut out)
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains("HAS CHANGED"), "{text}");
        assert!(text.contains(&fingerprint(&pinned)), "{text}");
        assert!(text.contains(&fingerprint(&server_public)), "{text}");
        assert!(text.contains("--accept-new-server-key"), "{text}");
        assert_eq!(Credentials::load(&args.profile).expect("profile"), creds);

        args.accept_new_server_key = true;
        let mut profile = Profile::new(Some(args.profile.clone()), creds.clone());
        let session = connect_profile(&opts, &args, &mut profile, &mut out)
            .await
            .expect("accepted");
        let (pattern, _peer) = server.await;
        assert_eq!(pattern, Pattern::Xx);
        assert_eq!(session.credentials().server_key, Some(server_public));
        let saved = Credentials::load(&args.profile).expect("profile");
        assert_eq!(saved.server_key, Some(server_public));
        let output = String::from_utf8(out).expect("utf-8");
        assert!(
            output.contains(&format!(
                "forgetting the pinned server key {}",
                fingerprint(&pinned)
            )),
            "{output}"
        );
        assert!(
            output.contains(&format!(
                "the server's key fingerprint is {}",
                fingerprint(&server_public)
            )),
            "{output}"
        );
    });
}

#[test]
fn chat_repins_a_key_the_server_rotates() {
    run(|| async {
        let (listener, opts) = listen();
        let dir = tempfile::tempdir().expect("tempdir");
        let args = chat_args(dir.path(), &opts);
        let (keys_dir, old) = server_keys();
        let keys = ServerKeys::rotate(keys_dir.path()).expect("rotated");
        let current = *keys.public();
        let creds = noise_credentials(Some(*old.public()));
        creds.save(&args.profile).expect("saved");
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            peer.welcome().await;
            (handshake.slot, peer)
        });
        let mut out = Vec::new();
        let mut profile = Profile::new(Some(args.profile.clone()), creds);
        let _session = connect_profile(&opts, &args, &mut profile, &mut out)
            .await
            .expect("connected");
        let (slot, _peer) = server.await;
        assert_eq!(slot, KeySlot::Previous);
        let saved = Credentials::load(&args.profile).expect("profile");
        assert_eq!(saved.server_key, Some(current));
        let output = String::from_utf8(out).expect("utf-8");
        assert!(
            output.contains(&format!(
                "the server rotated its key: re-pinned {}",
                fingerprint(&current)
            )),
            "{output}"
        );
    });
}

#[test]
fn chat_binds_a_noise_key_to_a_profile_from_before_noise() {
    run(|| async {
        let (listener, opts) = listen();
        let dir = tempfile::tempdir().expect("tempdir");
        let args = chat_args(dir.path(), &opts);
        let (_keys_dir, keys) = server_keys();
        let server_public = *keys.public();
        credentials().save(&args.profile).expect("saved");
        let server = glommio::spawn_local(async move {
            let (mut peer, handshake) = Peer::accept_noise(&listener, &keys).await;
            let hello = peer.welcome().await;
            (handshake.client_key, hello, peer)
        });
        let mut out = Vec::new();
        let mut profile = Profile::new(Some(args.profile.clone()), credentials());
        let _session = connect_profile(&opts, &args, &mut profile, &mut out)
            .await
            .expect("connected");
        let (client_key, hello, _peer) = server.await;
        assert_eq!(hello.secret.as_ref(), &[7u8; 32]);
        let saved = Credentials::load(&args.profile).expect("profile");
        assert_eq!(saved.secret, None);
        assert_eq!(
            saved.noise_keypair().expect("a Noise key").public(),
            &client_key
        );
        assert_eq!(saved.server_key, Some(server_public));
        let output = String::from_utf8(out).expect("utf-8");
        assert!(output.contains("binding a new Noise key"), "{output}");
        assert!(output.contains("logs in with it alone"), "{output}");
    });
}
