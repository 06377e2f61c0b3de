//! `switchboard log inspect` on a real server's data directory.

mod common;

use std::process::Command;

use common::{RawClient, Server};

#[test]
fn inspect_reports_records_of_a_stopped_server_without_changing_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), |_| {});
    let alice = RawClient::register(server.addr);
    let bob = RawClient::register(server.addr);
    let (mut a, _) = RawClient::login(server.addr, &alice);
    for id in 1..=3 {
        a.send_message(bob.user, id, b"kept for inspection");
    }
    a.collect_acks(3);
    assert_eq!(server.terminate(), Some(0));

    let data = dir.path().join("data");
    let snapshot = |dir: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        for shard in std::fs::read_dir(dir).unwrap().flatten() {
            if shard.path().is_dir() {
                for entry in walk(&shard.path()) {
                    files.push((entry.display().to_string(), std::fs::read(&entry).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let before = snapshot(&data);
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["log", "inspect"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.contains("message=3"),
        "three messages in the report:\n{text}"
    );
    assert!(text.contains("shard"), "{text}");
    assert_eq!(before, snapshot(&data), "inspect wrote nothing");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
