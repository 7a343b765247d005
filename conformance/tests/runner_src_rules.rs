//! The source behaviour cases (conformance/src/synth/source.rs) against live sources:
//! SM-SWITCHOVER-START, SM-DISCARD-DIRTY and SM-URGENT-FIRST pass against qmig-src and against
//! QEMU 7.2 / 10.0 sources (each case of the version's profile; without QEMU the QEMU test
//! returns early, unless `CI` or `QMIG_REQUIRE_QEMU` is set, when it fails), and each broken
//! source (`--src broken-KIND:qmig`, `synth::broken::sources`) fails exactly the valid
//! source-side cases it names, with its rule in the message.
//!
//! `qmig-src` is built first into this test's target directory (cargo does not build other
//! packages' binaries for a test), so the binary is never stale.

mod build_util;

use std::path::PathBuf;

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::{self, report::CaseResult, report::Status, skip::glob, Options};
use qmig_conformance::synth;

fn run(src: &str, filter: &str) -> Vec<CaseResult> {
    build_util::build_packages(&["qmig-src"]);
    runner::run_suite(&Options {
        vectors: vec![PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vectors/synthetic"
        ))],
        dst: vec!["none".into()],
        src: vec![src.to_string()],
        filter: Some(filter.to_string()),
        print: true,
        ..Default::default()
    })
    .unwrap()
}

/// The source behaviour cases and what each valid pass must say.
const CASES: &[(&str, &str)] = &[
    (
        "valid-sm-switchover-start-source-precopy-72",
        "; no SWITCHOVER_START",
    ),
    (
        "valid-sm-switchover-start-source-precopy-10",
        "; SWITCHOVER_START once, at offset ",
    ),
    (
        "valid-sm-discard-dirty-source-postcopy-72",
        " pages held undiscarded at POSTCOPY_RUN equal the source's final copy; dirtied pages discarded: [2, 3, 5]",
    ),
    (
        "valid-sm-urgent-first-source-postcopy-72",
        "; requested pages in request order, within 32 other records (page@+records): 200@+",
    ),
];

fn check_passes(r: &[CaseResult], label: &str, profile: &str) {
    let want: Vec<&(&str, &str)> = CASES.iter().filter(|(c, _)| c.ends_with(profile)).collect();
    assert_eq!(r.len(), want.len(), "{r:#?}");
    for (case, says) in want {
        let name = format!("replay-src[{label}]/synthetic/{case}");
        let c = r
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no case {name}"));
        match &c.status {
            Status::Pass(m) => assert!(
                m.contains(says) && m.contains("equal to the source's"),
                "{name}: {m}"
            ),
            s => panic!("{name}: {s:?}"),
        }
    }
}

#[test]
fn source_rule_cases_pass_against_qmig_src() {
    let r = run("qmig", "replay-src[qmig]/synthetic/valid-sm-*-source-p*");
    check_passes(&r, "qmig", "");
}

/// QEMU 7.2 runs the 7.2 cases (guest RAM and the dirty pages written through qtest), QEMU
/// 10.0 the 10.x case.
#[test]
fn source_rule_cases_pass_against_qemu_sources() {
    for (v, profile) in [(QemuVersion::V7_2, "-72"), (QemuVersion::V10_0, "-10")] {
        if find_qemu(v).unwrap().is_none() {
            continue;
        }
        let r = run(
            "qemu",
            &format!("replay-src[qemu]/synthetic/valid-sm-*-source-p*{profile}"),
        );
        check_passes(&r, "qemu", profile);
    }
}

/// Each broken source fails every valid source-side case its glob names, the message naming
/// its rule; the other valid source-side cases pass.
#[test]
fn broken_sources_fail_exactly_the_cases_they_name() {
    for b in synth::broken::sources() {
        let r = run(
            &b.target,
            &format!("replay-src[{}]/synthetic/valid-*-source-*", b.target),
        );
        assert!(r.len() >= CASES.len(), "{}: {r:#?}", b.target);
        let mut failed = 0;
        for c in &r {
            let case = c.name.rsplit('/').next().unwrap();
            match (&c.status, glob(b.cases, case)) {
                (Status::Fail(m), true) => {
                    assert!(
                        m.contains(&format!("{}: ", b.rule)) && m.contains("(broken source: "),
                        "{}: {m}",
                        c.name
                    );
                    failed += 1;
                }
                (Status::Pass(_), false) => {}
                (s, named) => panic!("{} (named: {named}): {s:?}", c.name),
            }
        }
        assert!(failed >= 1, "{}: no case named", b.target);
    }
}
