//! The runner on every vector: decode checks (no target), replay against real QEMU 7.2 (the
//! 7.2 captures and the 7.2 synthetic vectors, through the documented shim template), and the
//! suite's self-test: a deliberately broken destination fails exactly the cases its defect
//! touches, with a message naming what differs.
//!
//! Replays need QEMU 7.2 (`qemu-system-x86_64`); without it they print a skip note and pass,
//! unless `CI` or `QMIG_REQUIRE_QEMU` is set.

use std::path::PathBuf;

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::{self, report::CaseResult, report::Status, skip, Options};

fn skips() -> Vec<skip::Skip> {
    skip::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/runner/skip-qemu.txt"
    )))
    .unwrap()
}

fn run_once(dst: &str, filter: &str) -> Vec<CaseResult> {
    runner::run_suite(&Options {
        vectors: vec![],
        dst: vec![dst.to_string()],
        src: vec![],
        skips: skips(),
        filter: Some(filter.to_string()),
        print: true,
    })
    .unwrap()
}

/// A replay's cut waits until the destination ran POSTCOPY_RUN (its run state left
/// `inmigrate`), so no case needs a rerun.
fn run(dst: &str, filter: &str) -> Vec<CaseResult> {
    run_once(dst, filter)
}

fn failures(r: &[CaseResult]) -> Vec<String> {
    r.iter()
        .filter_map(|c| match &c.status {
            Status::Fail(m) => Some(format!("{}: {m}", c.name)),
            _ => None,
        })
        .collect()
}

fn status<'a>(r: &'a [CaseResult], name: &str) -> &'a Status {
    &r.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .status
}

fn have_qemu72() -> bool {
    find_qemu(QemuVersion::V7_2).unwrap().is_some()
}

#[test]
fn decode_checks_pass_on_every_vector() {
    let r = runner::run_suite(&Options::default()).unwrap();
    let f = failures(&r);
    assert!(f.is_empty(), "{f:#?}");
    // 15 QEMU 7.2 + 16 QEMU 10.0 + 4 qmig-captured vectors, plus the synthetic set.
    let captured = r.iter().filter(|c| !c.name.contains("/synthetic/")).count();
    assert_eq!(captured, 35);
    assert!(r.len() > 100, "{} cases", r.len());
    assert!(
        r.iter().all(|c| matches!(c.status, Status::Pass(_))),
        "nothing skipped in decode checks"
    );
}

#[test]
fn replay_qemu_7_2_captures_against_qemu_7_2() {
    if !have_qemu72() {
        return;
    }
    let r = run("qemu", "replay-dst[qemu]/qemu-7.2/*");
    let f = failures(&r);
    assert!(f.is_empty(), "{f:#?}");
    assert_eq!(r.len(), 15);
    // Everything passes, recovery and multifd (two extra connections) included.
    let passed = r
        .iter()
        .filter(|c| matches!(c.status, Status::Pass(_)))
        .count();
    assert_eq!(passed, 15, "{r:#?}");
    assert!(matches!(
        status(&r, "replay-dst[qemu]/qemu-7.2/precopy-multifd"),
        Status::Pass(m) if m.contains("2 multifd connection(s) played alongside")
    ));
    assert!(matches!(
        status(&r, "replay-dst[qemu]/qemu-7.2/postcopy-recover"),
        Status::Pass(_)
    ));
}

#[test]
fn replay_synthetic_7_2_vectors_against_qemu_7_2() {
    if !have_qemu72() {
        return;
    }
    let r = run("qemu", "replay-dst[qemu]/synthetic/*-72*");
    let f = failures(&r);
    assert!(f.is_empty(), "{f:#?}");
    // Valid ones complete with the exact return path and RAM; invalid ones make QEMU fail the
    // migration, except the leniencies in the skip list (each with its reason).
    assert!(matches!(
        status(&r, "replay-dst[qemu]/synthetic/valid-sm-pong-precopy-72"),
        Status::Pass(m) if m.contains("final RAM (1 MiB) equal")
    ));
    assert!(matches!(
        status(&r, "replay-dst[qemu]/synthetic/invalid-hdr-magic-precopy-72"),
        Status::Pass(m) if m.starts_with("rejected")
    ));
    assert!(matches!(
        status(&r, "replay-dst[qemu]/synthetic/invalid-sec-duplicate-id-precopy-72"),
        Status::Skip(m) if m.contains("QEMU does not check")
    ));
}

#[test]
fn broken_destination_bitmap_be_fails_only_the_recovery_vectors() {
    if !have_qemu72() {
        return;
    }
    let r = run(
        "broken-bitmap-be:qemu",
        "replay-dst[broken-bitmap-be:qemu]/qemu-7.2/p*",
    );
    for name in ["postcopy-recover", "postcopy-recover-pause"] {
        match status(
            &r,
            &format!("replay-dst[broken-bitmap-be:qemu]/qemu-7.2/{name}"),
        ) {
            Status::Fail(m) => assert!(
                m.contains("recovery: recovery return path: RECV_BITMAP #0 differs from byte ")
                    && m.contains(" of the message: got "),
                "{name}: {m}"
            ),
            s => panic!("{name}: the broken bitmap passed: {s:?}"),
        }
    }
    for name in ["postcopy", "postcopy-noreads", "precopy-tcp-rp"] {
        assert!(
            matches!(
                status(
                    &r,
                    &format!("replay-dst[broken-bitmap-be:qemu]/qemu-7.2/{name}")
                ),
                Status::Pass(_)
            ),
            "{name} has no RECV_BITMAP and must pass: {r:#?}"
        );
    }
}

#[test]
fn broken_destination_drop_pong_fails_every_vector_with_a_return_path() {
    if !have_qemu72() {
        return;
    }
    let r = run(
        "broken-drop-pong:qemu",
        "replay-dst[broken-drop-pong:qemu]/qemu-7.2/pr*",
    );
    match status(&r, "replay-dst[broken-drop-pong:qemu]/qemu-7.2/precopy-tcp-rp") {
        Status::Fail(m) => assert!(
            m.contains("return path differs (rule exact): got 8 bytes 0001000400000000, want 16 bytes 00020004000000010001000400000000"),
            "{m}"
        ),
        s => panic!("dropped PONG passed: {s:?}"),
    }
    // A file-migration vector has no return path to check: it still passes.
    assert!(matches!(
        status(
            &r,
            "replay-dst[broken-drop-pong:qemu]/qemu-7.2/precopy-file-zero"
        ),
        Status::Pass(_)
    ));
}

#[test]
fn replay_multifd_captures_against_qemu_10_0() {
    if find_qemu(QemuVersion::V10_0).unwrap().is_none() {
        return;
    }
    let r = run("qemu", "replay-dst[qemu]/qemu-10.0/precopy-multifd");
    assert_eq!(r.len(), 1);
    assert!(
        matches!(
            status(&r, "replay-dst[qemu]/qemu-10.0/precopy-multifd"),
            Status::Pass(m) if m.contains("2 multifd connection(s) played alongside")
                && m.contains("final RAM (32 MiB) equal")
        ),
        "{r:#?}"
    );
}
