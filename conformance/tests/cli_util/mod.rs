//! Shared helpers of the `qmig` CLI tests: running the binary, listing vectors, reading
//! manifests.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `qmig` binary built for this test run.
pub fn qmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qmig"))
}

/// Runs `qmig` with `args`; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let o: Output = qmig().args(args).output().expect("qmig runs");
    (
        o.status.code().expect("qmig exits with a code"),
        String::from_utf8(o.stdout).expect("utf-8 stdout"),
        String::from_utf8(o.stderr).expect("utf-8 stderr"),
    )
}

/// `conformance/vectors`.
pub fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// Every captured vector directory (`qemu-*/<name>/` with a manifest), sorted.
pub fn vector_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for v in std::fs::read_dir(vectors()).expect("vectors dir") {
        let v = v.expect("entry").path();
        let captured = v
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("qemu-"));
        if !v.is_dir() || !captured {
            continue;
        }
        for d in std::fs::read_dir(&v).expect("version dir") {
            let d = d.expect("entry").path();
            if d.join("manifest.json").is_file() {
                out.push(d);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 31, "vectors missing: {}", out.len());
    out
}

/// The manifest of a vector directory.
pub fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
        .expect("manifest JSON")
}

/// `s` as a path string.
pub fn p(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

/// The inspect arguments for one manifest channel (recovery channels get `--resume`, the
/// vector's `vmdesc.json` is passed when present, `rp_file` as `--rp`).
pub fn inspect_args(dir: &Path, ch: &Value) -> Vec<String> {
    let file = ch["file"].as_str().expect("channel file");
    let mut a = vec!["inspect".to_string(), "--json".into(), p(&dir.join(file))];
    if file.starts_with("resume") {
        a.push("--resume".into());
    }
    if let Some(rp) = ch["rp_file"].as_str() {
        a.push("--rp".into());
        a.push(p(&dir.join(rp)));
    }
    if dir.join("vmdesc.json").is_file() {
        a.push("--vmdesc".into());
        a.push(p(&dir.join("vmdesc.json")));
    }
    if let Some(m) = ch["multifd_channels"].as_array() {
        a.push("--multifd".into());
        for c in m {
            a.push(p(&dir.join(c["file"].as_str().expect("multifd file"))));
        }
    }
    a
}

/// Parses `--json` output into (header, records).
pub fn parse_json_lines(out: &str) -> (Value, Vec<Value>) {
    let mut lines = out.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header line")).expect("header");
    let recs = lines
        .map(|l| serde_json::from_str(l).expect("record line"))
        .collect();
    (header, recs)
}

/// Top-level records of the stream (not return path or multifd, not nested).
pub fn top_level(recs: &[Value]) -> Vec<&Value> {
    recs.iter()
        .filter(|r| {
            (r["channel"] == "main" || r["channel"] == "resume")
                && r.get("in_package").is_none()
                && r.get("in_section").is_none()
        })
        .collect()
}
