//! `qmig demo` end to end: the real `qmig`, `qmig-src` and `qmig-dst` binaries, a 64 MiB guest,
//! a cut link in postcopy, recovery on a new port, and byte-equal memories.
//!
//! The reference binaries are built first when they are not next to `qmig` (cargo builds only
//! this package's binaries for its tests). Needs root (userfaultfd); without root the test
//! checks that the demo refuses with a clear message instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Makes sure `qmig-src` and `qmig-dst` sit next to `qmig` (same target directory and profile).
fn build_reference_binaries(qmig: &Path) {
    let dir = qmig.parent().expect("qmig has a directory");
    if dir.join("qmig-src").is_file() && dir.join("qmig-dst").is_file() {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "qmig-src", "-p", "qmig-dst"]);
    if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    // `<target>/<profile>/qmig`: build into the same target directory.
    if let Some(target) = dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let st = cmd.status().expect("running cargo build");
    assert!(st.success(), "cargo build -p qmig-src -p qmig-dst failed");
    assert!(dir.join("qmig-src").is_file() && dir.join("qmig-dst").is_file());
}

/// Whether `wanted` is an in-order subsequence of `seq`.
fn subsequence(seq: &[&str], wanted: &[&str]) -> bool {
    let mut it = seq.iter();
    wanted.iter().all(|w| it.any(|s| s == w))
}

fn sequence<'a>(out: &'a str, side: &str) -> Vec<&'a str> {
    let prefix = format!("{side} status sequence: ");
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}"));
    line.split(" -> ").collect()
}

#[test]
fn demo_cuts_recovers_and_memories_match() {
    let qmig = PathBuf::from(env!("CARGO_BIN_EXE_qmig"));
    if !is_root() {
        let out = Command::new(&qmig)
            .args(["demo", "--ram", "64M", "--no-progress"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("must run as root"), "{err}");
        eprintln!("not root: checked the refusal only; the full demo needs root (userfaultfd)");
        return;
    }
    build_reference_binaries(&qmig);
    let out = Command::new(&qmig)
        .args(["demo", "--ram", "64M", "--no-progress", "--timeout", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qmig demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // The story, in order, as printed.
    let steps = [
        "source: migrate tcp:127.0.0.1:",
        "source: precopy pass 3:",
        "source: migrate-start-postcopy",
        "both sides: postcopy-active",
        "cutting the link now",
        "both sides: postcopy-paused",
        "destination: migrate-recover tcp:127.0.0.1:",
        "resume=true",
        "both sides: recovered, postcopy-active again",
        "both sides: completed",
        "memories identical: 67108864 bytes, sha256 ",
    ];
    let mut at = 0;
    for s in steps {
        let i = stdout[at..]
            .find(s)
            .unwrap_or_else(|| panic!("`{s}` missing (or out of order) in:\n{stdout}"));
        at += i + s.len();
    }

    // The status sequence of each side, from its MIGRATION events.
    let wanted = [
        "setup",
        "active",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "postcopy-active",
        "completed",
    ];
    for side in ["source", "destination"] {
        let seq = sequence(&stdout, side);
        assert!(
            subsequence(&seq, &wanted),
            "{side}: {seq:?} does not pass through {wanted:?}"
        );
        assert_eq!(seq.last(), Some(&"completed"), "{side}: {seq:?}");
        assert_eq!(
            seq.iter().filter(|s| **s == "postcopy-paused").count(),
            1,
            "{side}: one cut, one pause: {seq:?}"
        );
    }

    // Both digests printed and equal.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("memories identical"))
        .unwrap();
    let digests: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert_eq!(digests.len(), 2, "{line}");
    assert_eq!(digests[0], digests[1]);

    // The statistics name a recovery and at least one page fault served.
    assert!(stdout.contains("(1 recovery)"), "{stdout}");
    assert!(stdout.contains("precopy passes          3"), "{stdout}");
}
