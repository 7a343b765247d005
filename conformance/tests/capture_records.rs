//! The capture tool's decoded manifest fields (`qemu::records::annotate`):
//! * on every shared QEMU 7.2 / 10.0 capture they equal what the shared manifests list:
//!   `records` (offsets, lengths, types, section identity, command fields, RAM counts, device
//!   payload length and sha256, package nesting, the `TRUNCATED` record and its `bytes_left`),
//!   `rp_messages`, `page_requests`, `summary`, `truncated_at`, `mig_cmds_present`,
//!   `rp_msgs_present`;
//! * the committed `qemu-10.0-qmig` manifests are exactly what `qmig-capture --annotate`
//!   writes (regenerating changes nothing), and their `.bin` files are the ones the manifest's
//!   `files` sha256 name.

use std::path::{Path, PathBuf};

use qmig_conformance::qemu::pattern::sha256_hex;
use qmig_conformance::qemu::records::annotate;
use serde_json::Value;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn dirs(folder: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(vectors().join(folder))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    v.sort();
    v
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Keys of the shared records that describe their tool's cross-checks, not wire content.
const TOOL_ONLY: &[&str] = &[
    "delimited_by",
    "footer_scan_agrees",
    "vmdesc_length_ok",
    "footer_pattern_inside_payload",
    "detail",
    "bitmap_matches_previous_channels",
];
/// Keys either side writes only for some records (hex of small bodies, subsections seen with a
/// VM description, the counts of a cut RAM section); compared where both have them.
const SOMETIMES: &[&str] = &["payload_hex", "data_hex", "subsections_seen", "partial_ram"];

fn compare(ctx: &str, got: &[Value], want: &[Value]) -> usize {
    assert_eq!(got.len(), want.len(), "{ctx}: count");
    let mut n = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ctx = format!("{ctx}[{i}] @{}", w["offset"]);
        let (g, w) = (g.as_object().unwrap(), w.as_object().unwrap());
        for (k, wv) in w {
            if TOOL_ONLY.contains(&k.as_str()) {
                continue;
            }
            let Some(gv) = g.get(k) else {
                assert!(SOMETIMES.contains(&k.as_str()), "{ctx}: {k} missing");
                continue;
            };
            if k == "package" {
                n += compare(&ctx, gv.as_array().unwrap(), wv.as_array().unwrap());
            } else {
                assert_eq!(gv, wv, "{ctx}: {k}");
            }
        }
        for k in g.keys() {
            assert!(
                w.contains_key(k)
                    || SOMETIMES.contains(&k.as_str())
                    || TOOL_ONLY.contains(&k.as_str()),
                "{ctx}: extra key {k}"
            );
        }
        n += 1;
    }
    n
}

#[test]
fn decoded_fields_equal_the_shared_manifests() {
    let (mut records, mut msgs, mut vectors_seen) = (0, 0, 0);
    for folder in ["qemu-7.2", "qemu-10.0"] {
        for dir in dirs(folder) {
            let want = manifest(&dir);
            let mut got = want.clone();
            // Only the decoded fields are rewritten: drop them first.
            for ch in got["channels"].as_array_mut().unwrap() {
                let o = ch.as_object_mut().unwrap();
                for k in [
                    "records",
                    "summary",
                    "rp_messages",
                    "page_requests",
                    "truncated_at",
                ] {
                    o.remove(k);
                }
            }
            annotate(&mut got, &dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let id = dir.display().to_string();
            for k in ["mig_cmds_present", "rp_msgs_present"] {
                assert_eq!(got[k], want[k], "{id}: {k}");
            }
            let (gc, wc) = (
                got["channels"].as_array().unwrap(),
                want["channels"].as_array().unwrap(),
            );
            for (g, w) in gc.iter().zip(wc) {
                let ctx = format!("{id} {}", w["file"]);
                records += compare(
                    &ctx,
                    g["records"].as_array().unwrap(),
                    w["records"].as_array().unwrap(),
                );
                assert_eq!(g["truncated_at"], w["truncated_at"], "{ctx}: truncated_at");
                assert_eq!(g["summary"], w["summary"], "{ctx}: summary");
                if let Some(wm) = w["rp_messages"].as_array() {
                    msgs += compare(&ctx, g["rp_messages"].as_array().unwrap(), wm);
                    assert_eq!(
                        g["page_requests"], w["page_requests"],
                        "{ctx}: page_requests"
                    );
                }
            }
            vectors_seen += 1;
        }
    }
    eprintln!(
        "{vectors_seen} shared vectors: {records} records, {msgs} return-path messages equal"
    );
    assert_eq!(vectors_seen, 31);
    assert_eq!((records, msgs), (889, 125));
}

#[test]
fn qmig_captures_are_annotated_as_the_tool_writes_them() {
    let all = dirs("qemu-10.0-qmig");
    assert_eq!(all.len(), 4);
    for dir in all {
        let m = manifest(&dir);
        for (name, f) in m["files"].as_object().unwrap() {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(bytes.len() as u64, f["bytes"].as_u64().unwrap(), "{name}");
            assert_eq!(sha256_hex(&bytes), f["sha256"].as_str().unwrap(), "{name}");
        }
        let mut again = m.clone();
        annotate(&mut again, &dir).unwrap();
        assert_eq!(
            again,
            m,
            "{}: regenerating changes the manifest",
            dir.display()
        );
        for ch in m["channels"].as_array().unwrap() {
            assert!(ch["records"].as_array().is_some_and(|r| !r.is_empty()));
            if ch["rp_file"].is_string() {
                assert!(ch["rp_messages"].as_array().is_some_and(|r| !r.is_empty()));
            }
        }
    }
}
