//! Source rules that have hurt servers like this one, checked as a test:
//! no locks in shard-owned code, no `dbg!`, no prints in server code (it
//! logs with `tracing`; a print on a hot path is a write per call), and
//! every `unsafe` block or function carries its `SAFETY:` / `# Safety`
//! reasoning.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn source_files() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["src", "bench/src"]
        .iter()
        .flat_map(|dir| rust_files(&root.join(dir)))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect()
}

/// Code lines only: comments and doc comments stripped.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let code = line.split("//").next().unwrap_or("");
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

#[test]
fn shard_owned_code_takes_no_locks() {
    // Shard state is single-threaded (`Rc`/`RefCell`); a lock there means
    // state shared between shards, which the design forbids.
    let mut offenders = Vec::new();
    for (path, text) in source_files() {
        let p = path.to_string_lossy();
        let shard_owned = ["/src/shard/", "/src/net/", "/src/session/", "/src/store/"]
            .iter()
            .any(|dir| p.contains(dir));
        if !shard_owned {
            continue;
        }
        for (line, code) in code_lines(&text) {
            if code.contains("Mutex") || code.contains("RwLock") {
                offenders.push(format!("{p}:{line}: {}", code.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "locks in shard-owned code:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn no_dbg_macros() {
    let mut offenders = Vec::new();
    for (path, text) in source_files() {
        for (line, code) in code_lines(&text) {
            if code.contains("dbg!(") {
                offenders.push(format!("{}:{line}", path.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "dbg! left in:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn every_unsafe_block_says_why() {
    let mut offenders = Vec::new();
    for (path, text) in source_files() {
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let is_block = code.contains("unsafe {") || code.contains("unsafe{");
            let is_fn = code.contains("unsafe fn");
            let is_impl = code.contains("unsafe impl");
            if !(is_block || is_fn || is_impl) {
                continue;
            }
            // The reason sits in the comment lines just above (a SAFETY:
            // comment, or `# Safety` in an unsafe fn's doc), possibly
            // above the statement the block is part of.
            let window = lines[index.saturating_sub(12)..=index].join("\n");
            let explained = window.contains("SAFETY:") || window.contains("# Safety");
            if !explained {
                offenders.push(format!("{}:{}", path.display(), index + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "unsafe without its reason:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn server_code_logs_instead_of_printing() {
    // Unit tests (after a file's `#[cfg(test)]`) may print their reports.
    let server = [
        "/src/shard/",
        "/src/net/",
        "/src/session/",
        "/src/store/",
        "/src/route/",
        "/src/wss/",
    ];
    let mut offenders = Vec::new();
    for (path, text) in source_files() {
        let p = path.to_string_lossy();
        if !server.iter().any(|dir| p.contains(dir)) {
            continue;
        }
        let tests_from = text
            .lines()
            .position(|l| l.trim() == "#[cfg(test)]")
            .map_or(usize::MAX, |i| i + 1);
        for (line, code) in code_lines(&text) {
            if line < tests_from && (code.contains("println!(") || code.contains("print!(")) {
                offenders.push(format!("{p}:{line}: {}", code.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "prints in server code (use tracing):\n{}",
        offenders.join("\n")
    );
}
