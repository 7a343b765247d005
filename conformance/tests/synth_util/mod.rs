//! Helpers shared by the synthetic-vector tests (`synthetic_recovery.rs`,
//! `synthetic_multifd.rs`): where the synthetic vectors are, a case's files, a suite run over
//! them with the QEMU skip list, and one case's status in the results.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use qmig_conformance::runner::{self, report::CaseResult, report::Status, skip, Options};

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/synthetic")
}

pub fn read(case: &str, file: &str) -> Vec<u8> {
    std::fs::read(dir().join(case).join(file)).unwrap()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn run(dst: &str, filter: &str) -> Vec<CaseResult> {
    let skips = skip::load(&PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/runner/skip-qemu.txt"
    )))
    .unwrap();
    runner::run_suite(&Options {
        vectors: vec![dir()],
        dst: vec![dst.to_string()],
        src: vec![],
        skips,
        filter: Some(filter.to_string()),
        print: true,
    })
    .unwrap()
}

/// The decode checks of the synthetic cases whose names match `filter` (no replay).
pub fn decode(filter: &str) -> Vec<CaseResult> {
    runner::run_suite(&Options {
        vectors: vec![dir()],
        filter: Some(filter.to_string()),
        ..Default::default()
    })
    .unwrap()
}

pub fn status<'a>(r: &'a [CaseResult], name: &str) -> &'a Status {
    &r.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}: {r:#?}"))
        .status
}
