//! The runner against the reference binaries: every captured vector against qmig-src (the
//! runner plays the destination, `replay-src`; the multifd captures included), the deliberately broken sources (the suite can
//! fail), and every vector against qmig-dst (`replay-dst`, the multifd captures included, their
//! connections played alongside); and every captured vector against a QEMU source of the version
//! it was captured with (RAM written through qtest, multifd connections played; skipped
//! without QEMU).
//!
//! `qmig-src` / `qmig-dst` are built first into this test's target directory (cargo does not
//! build other packages' binaries for a test), so the binaries are never stale.

mod build_util;

use std::path::PathBuf;

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::{self, report::CaseResult, report::Status, Options};

fn run(src: &[&str], dst: &[&str], filter: &str) -> Vec<CaseResult> {
    run_with(src, dst, filter, vec![])
}

fn run_with(
    src: &[&str],
    dst: &[&str],
    filter: &str,
    skips: Vec<runner::skip::Skip>,
) -> Vec<CaseResult> {
    build_util::build_packages(&["qmig-src", "qmig-dst"]);
    runner::run_suite(&Options {
        vectors: vec![],
        dst: dst.iter().map(|s| s.to_string()).collect(),
        src: src.iter().map(|s| s.to_string()).collect(),
        skips,
        filter: Some(filter.to_string()),
        print: true,
    })
    .unwrap()
}

fn status<'a>(r: &'a [CaseResult], name: &str) -> &'a Status {
    &r.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .status
}

/// The captured vectors with multifd: qmig-src sends their pages over the multifd connections
/// the runner's played destination accepts.
const MULTIFD: &[&str] = &["qemu-7.2/precopy-multifd", "qemu-10.0/precopy-multifd"];

/// The captured vectors whose source uses a page encoding (xbzrle, 7.2's compress) or
/// x-ignore-shared: qmig-src reproduces them, and the played destination decodes every byte.
const PAGE_CAPS: &[&str] = &[
    "qemu-7.2/precopy-compress",
    "qemu-7.2/precopy-config-caps",
    "qemu-7.2/precopy-xbzrle",
    "qemu-10.0/precopy-config-caps",
    "qemu-10.0/precopy-xbzrle",
];

#[test]
fn every_captured_vector_passes_against_qmig_src() {
    let r = run(&["qmig"], &[], "replay-src[qmig]/*");
    let failed: Vec<String> = r
        .iter()
        .filter_map(|c| match &c.status {
            Status::Fail(m) => Some(format!("{}: {m}", c.name)),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // 15 QEMU 7.2 + 16 QEMU 10.0 + 4 qmig-captured vectors + the 9 source-side synthetic cases
    // the source-side recoveries and the source behaviour cases (the other synthetic vectors
    // have no source).
    assert_eq!(
        r.len(),
        35 + SOURCE_CASES.len() + RECOVERY_CASES.len() + SOURCE_RULE_CASES,
        "{r:#?}"
    );
    for v in MULTIFD {
        match status(&r, &format!("replay-src[qmig]/{v}")) {
            Status::Pass(m) => assert!(
                m.contains("every byte decoded, completed")
                    && m.contains("equal to the source's")
                    && m.contains("2 multifd connection(s): "),
                "{v}: {m}"
            ),
            s => panic!("{v}: {s:?}"),
        }
    }
    for v in PAGE_CAPS {
        match status(&r, &format!("replay-src[qmig]/{v}")) {
            Status::Pass(m) => assert!(
                m.contains("every byte decoded, completed") && m.contains("equal to the source's"),
                "{v}: {m}"
            ),
            s => panic!("{v}: {s:?}"),
        }
    }
    let passed = r
        .iter()
        .filter(|c| matches!(c.status, Status::Pass(_)))
        .count();
    assert_eq!(
        passed,
        35 + SOURCE_CASES.len() + RECOVERY_CASES.len() + SOURCE_RULE_CASES
    );
    for v in [
        "qemu-7.2/postcopy-recover",
        "qemu-7.2/postcopy-recover-pause",
        "qemu-10.0/postcopy-recover",
        "qemu-10.0/postcopy-recover-pause",
    ] {
        match status(&r, &format!("replay-src[qmig]/{v}")) {
            Status::Pass(m) => assert!(
                m.contains("postcopy recovery after ")
                    && m.contains("requested pages arrived")
                    && m.contains("clear pages resent, once each")
                    && m.contains("equal to the source's"),
                "{v}: {m}"
            ),
            s => panic!("{v}: {s:?}"),
        }
    }
    assert!(matches!(
        status(&r, "replay-src[qmig]/qemu-7.2/postcopy"),
        Status::Pass(m) if m.starts_with("postcopy: every byte decoded, completed") && m.contains("requested pages arrived")
    ));
    assert!(matches!(
        status(&r, "replay-src[qmig]/qemu-7.2/precopy-tcp-rp"),
        Status::Pass(m) if m.starts_with("precopy: every byte decoded, completed; RAM (64 MiB) equal")
    ));
}

/// The source-side synthetic recoveries (no bytes injected: the runner's cut and chosen
/// RECV_BITMAP, or its cancel of the paused source), with how their verdict starts.
const RECOVERY_CASES: &[(&str, &str)] = &[
    (
        "valid-sm-rebuild-source-recover-72",
        "postcopy recovery after a cut: every byte decoded, completed",
    ),
    (
        "valid-sm-recover-bitmap-all-source-recover-72",
        "postcopy recovery after a cut: every byte decoded, completed",
    ),
    (
        "valid-sm-cancel-source-recover-72",
        "postcopy cancel while paused: both sides paused after the cut (played destination postcopy-paused); migrate_cancel -> cancelled; QMP answers",
    ),
];
/// The source behaviour cases (`valid-sm-*-source-*`, tests/runner_src_rules.rs).
const SOURCE_RULE_CASES: usize = 4;

/// The source-side synthetic cases: (case, rule and return-path offset qmig-src must name in
/// `error-desc`; `None`: the valid case).
const SOURCE_CASES: &[(&str, Option<&str>)] = &[
    ("valid-rp-req-range-source-postcopy-72", None),
    (
        "invalid-rp-order-source-precopy-72",
        Some("offset 0: RP-ORDER: "),
    ),
    (
        "invalid-rp-order-source-precopy-10",
        Some("offset 0: RP-ORDER: "),
    ),
    (
        "invalid-rp-pong-unknown-source-precopy-72",
        Some("offset 4: RP-PONG-UNKNOWN: "),
    ),
    (
        "invalid-rp-pong-unknown-source-precopy-10",
        Some("offset 4: RP-PONG-UNKNOWN: "),
    ),
    (
        "invalid-rp-req-range-source-precopy-72",
        Some("offset 4: RP-REQ-RANGE: "),
    ),
    (
        "invalid-rp-req-range-source-precopy-10",
        Some("offset 4: RP-REQ-RANGE: "),
    ),
    (
        "invalid-rp-shut-error-source-precopy-72",
        Some("offset 4: RP-SHUT-ERROR: "),
    ),
    (
        "invalid-rp-shut-error-source-precopy-10",
        Some("offset 4: RP-SHUT-ERROR: "),
    ),
];

/// Return-path bytes written to qmig-src at the injection point: each invalid case fails the
/// migration with the rule and the return-path offset in `error-desc`, qmig-src still answers
/// QMP and its RAM is untouched; the valid page request is served whole.
#[test]
fn source_side_synthetic_cases_against_qmig_src() {
    let all = run(&["qmig"], &[], "replay-src[qmig]/synthetic/*");
    assert_eq!(
        all.len(),
        SOURCE_CASES.len() + RECOVERY_CASES.len() + SOURCE_RULE_CASES,
        "{all:#?}"
    );
    for (case, want) in RECOVERY_CASES {
        let name = format!("replay-src[qmig]/synthetic/{case}");
        let resent = |m: &str| {
            m.contains("RECV_BITMAP sent for [ram]") && m.contains("clear pages resent, once each")
        };
        match status(&all, &name) {
            Status::Pass(m) => assert!(
                m.starts_with(want) && (case.contains("-cancel-") || resent(m)),
                "{name}: {m}"
            ),
            s => panic!("{name}: {s:?}"),
        }
    }
    // The source behaviour cases: tests/runner_src_rules.rs.
    let r: Vec<CaseResult> = all
        .into_iter()
        .filter(|c| c.name.contains("/synthetic/invalid-") || c.name.contains("-rp-req-range-"))
        .collect();
    assert_eq!(r.len(), SOURCE_CASES.len(), "{r:#?}");
    for (case, want) in SOURCE_CASES {
        let name = format!("replay-src[qmig]/synthetic/{case}");
        match (status(&r, &name), want) {
            (Status::Pass(m), Some(w)) => assert!(
                m.contains("source failed")
                    && m.contains(&format!("error-desc `{w}"))
                    && m.ends_with("QMP answers; RAM untouched"),
                "{name}: {m}"
            ),
            (Status::Pass(m), None) => assert!(
                m.contains("completed; requested pages arrived whole")
                    && m.contains(" 254@+")
                    && m.contains(" 255@+")
                    && m.contains("equal to the source's"),
                "{name}: {m}"
            ),
            (s, _) => panic!("{name}: {s:?}"),
        }
    }
}

#[test]
fn broken_sources_fail_exactly_the_recovery_vectors() {
    let r = run(
        &["broken-resend-all:qmig", "broken-skip-clear:qmig"],
        &[],
        "replay-src[broken-*]/qemu-7.2/p*",
    );
    for kind in ["resend-all", "skip-clear"] {
        for v in ["postcopy-recover", "postcopy-recover-pause"] {
            let name = format!("replay-src[broken-{kind}:qmig]/qemu-7.2/{v}");
            match status(&r, &name) {
                Status::Fail(m) => {
                    let want = if kind == "resend-all" {
                        " page(s) the RECV_BITMAP marked received were resent (first: ram page "
                    } else {
                        "recovery: 1 page(s) the RECV_BITMAP left clear were not resent (first: ram page "
                    };
                    assert!(
                        m.contains(want) && m.contains("(broken source: "),
                        "{name}: {m}"
                    );
                }
                s => panic!("{name}: the broken source passed: {s:?}"),
            }
        }
        // No recovery, nothing to alter: these pass.
        for v in [
            "postcopy",
            "postcopy-noreads",
            "postcopy-advise-precopy",
            "precopy-tcp-rp",
        ] {
            let name = format!("replay-src[broken-{kind}:qmig]/qemu-7.2/{v}");
            assert!(
                matches!(status(&r, &name), Status::Pass(_)),
                "{name}: {:?}",
                status(&r, &name)
            );
        }
    }
}

#[test]
fn every_vector_passes_against_qmig_dst_multifd_included() {
    let r = run(&[], &["qmig"], "replay-dst[qmig]/*");
    // 35 captures and every synthetic main-channel vector.
    assert!(r.len() > 80, "{} cases", r.len());
    for c in &r {
        match &c.status {
            Status::Pass(m) => assert!(
                !c.name.ends_with("/precopy-multifd")
                    || m.contains("2 multifd connection(s) played alongside"),
                "{}: {m}",
                c.name
            ),
            Status::Skip(m) => panic!("{}: skipped: {m}", c.name),
            Status::Fail(m) => panic!("{}: {m}", c.name),
        }
    }
    for name in ["qemu-7.2/precopy-multifd", "qemu-10.0/precopy-multifd"] {
        assert!(matches!(
            status(&r, &format!("replay-dst[qmig]/{name}")),
            Status::Pass(m) if m.contains("final RAM")
        ));
    }
    assert!(matches!(
        status(&r, "replay-dst[qmig]/qemu-7.2/postcopy-recover"),
        Status::Pass(m) if m.contains("2 channel(s) replayed")
    ));
    // Invalid synthetic cases: qmig-dst names the rule and offset; a destination that knows its
    // devices (--vmdesc) rejects an unknown one and a newer version.
    for (case, want) in [
        (
            "invalid-sec-unknown-device-precopy-72",
            "error-desc `offset 8361: SEC-UNKNOWN-DEVICE: ",
        ),
        (
            "invalid-sec-version-precopy-10",
            "error-desc `offset 8382: SEC-VERSION: ",
        ),
        (
            "invalid-sec-delimit-precopy-72",
            "error-desc `offset 8381: SEC-DELIMIT: ",
        ),
    ] {
        let name = format!("replay-dst[qmig]/synthetic/{case}");
        assert!(
            matches!(status(&r, &name), Status::Pass(m) if m.contains(want)),
            "{name}: {:?}",
            status(&r, &name)
        );
    }
}

fn qemu_skips() -> Vec<runner::skip::Skip> {
    runner::skip::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/runner/skip-qemu.txt"
    )))
    .unwrap()
}

#[test]
fn every_captured_vector_passes_against_a_qemu_source() {
    let have = |v| find_qemu(v).unwrap().is_some();
    let filter = match (have(QemuVersion::V7_2), have(QemuVersion::V10_0)) {
        (true, true) => "replay-src[qemu]/*",
        (true, false) => "replay-src[qemu]/qemu-7.2/*",
        (false, true) => "replay-src[qemu]/qemu-10.0*",
        (false, false) => return,
    };
    let r = run_with(&["qemu"], &[], filter, qemu_skips());
    for c in &r {
        match &c.status {
            Status::Pass(m) => assert!(
                !c.name.ends_with("/precopy-multifd") || m.contains("2 multifd connection(s): "),
                "{}: {m}",
                c.name
            ),
            // QEMU's leniencies on the source-side synthetic cases (skip-qemu.txt).
            Status::Skip(_)
                if c.name.contains("/synthetic/invalid-rp-order-source-")
                    || c.name.contains("/synthetic/valid-sm-cancel-source-")
                    || c.name
                        .contains("/synthetic/invalid-rp-pong-unknown-source-") => {}
            s => panic!("{}: {s:?}", c.name),
        }
    }
    if filter == "replay-src[qemu]/*" {
        assert_eq!(
            r.len(),
            35 + SOURCE_CASES.len() + RECOVERY_CASES.len() + SOURCE_RULE_CASES
        );
        // The recovery against real QEMU: the chosen bitmap is honoured exactly.
        for v in [
            "qemu-7.2/postcopy-recover",
            "qemu-7.2/postcopy-recover-pause",
            "qemu-10.0/postcopy-recover",
            "qemu-10.0/postcopy-recover-pause",
            "synthetic/valid-sm-rebuild-source-recover-72",
            "synthetic/valid-sm-recover-bitmap-all-source-recover-72",
        ] {
            assert!(
                matches!(
                    status(&r, &format!("replay-src[qemu]/{v}")),
                    Status::Pass(m) if m.contains("clear pages resent, once each")
                ),
                "{v}"
            );
        }
    }
}

/// The played destination on every invalid synthetic main-channel stream, sent by a plain
/// socket writer: the case fails with the vector's rule id and offset (from the runner's own
/// decoder or from the `Destination` machine), except a stream that just stops (a truncated
/// one: the source closed the connection early, which `replay-src` reports as such).
#[test]
fn the_played_destination_reports_each_invalid_stream_with_rule_and_offset() {
    use qmig_conformance::runner::play_dst::{End, NoStop, Player};
    use qmig_conformance::runner::vector;
    use std::io::Write;
    let mut checked = 0;
    for v in vector::discover(&vector::default_dir()).unwrap() {
        let Some(s) = v.synthetic() else { continue };
        // The played destination declares no device table (it plays a destination for any
        // source): the `destination-devices` cases are judged by replay-dst.
        if s["class"] != "invalid" || s["channel"] != "main" || s["checker"] != "destination" {
            continue;
        }
        let rule = s["expected"]["rule"].as_str().unwrap().to_string();
        let offset = s["expected"]["offset"].as_u64().unwrap();
        let blocks: Vec<(String, u64)> = s["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b[0].as_str().unwrap().to_string(), b[1].as_u64().unwrap()))
            .collect();
        let postcopy = s["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "postcopy-ram");
        let machine = v.manifest["machine"]["type"].as_str().unwrap().to_string();
        let bytes = v.read("stream.bin").unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let writer = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = c.write_all(&bytes);
            let _ = c.shutdown(std::net::Shutdown::Write);
            // Hold the connection until the reader is done with it.
            let mut sink = [0u8; 4096];
            while matches!(std::io::Read::read(&mut c, &mut sink), Ok(n) if n > 0) {}
        });
        let (mut sock, _) = l.accept().unwrap();
        let mut p = Player::new(v.profile(), &machine, &blocks, postcopy, None).unwrap();
        let r = p.serve(&mut sock, &mut NoStop);
        drop(sock);
        writer.join().unwrap();
        let want = format!("{rule} at offset {offset} ");
        match r {
            Err(m) => assert!(m.contains(&want), "{}: {m} (want {want})", v.id),
            Ok(End::Closed) if rule == "STREAM-TRUNCATED" => {}
            Ok(e) => panic!("{}: accepted ({e:?}, status {})", v.id, p.status()),
        }
        checked += 1;
    }
    assert!(checked > 40, "{checked} invalid streams");
}
