//! Hostile or wrong input: the migration fails (or, after postcopy RUN, pauses) with the rule id
//! and offset in `query-migrate`'s `error-desc`, and qmig-dst stays up answering QMP.

mod common;

use std::path::PathBuf;

use common::{feed, Dst};
use serde_json::{json, Value};

fn vectors() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors"
    ))
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(vectors().join(rel)).unwrap()
}

/// Feeds `data`, waits for `status`, returns `query-migrate`; checks the process still answers.
fn run(args: &[&str], data: &[u8], status: &str) -> (Dst, Value) {
    run_any(args, data, &[status])
}

/// Like [`run`], for the first of several statuses.
fn run_any(args: &[&str], data: &[u8], statuses: &[&str]) -> (Dst, Value) {
    let mut dst = Dst::spawn(args);
    let addr = dst.listen("migrate-incoming");
    feed(addr, data);
    let ev = dst.qmp.wait_event(
        "MIGRATION",
        |d| statuses.iter().any(|s| d["status"] == *s),
        common::GUARD,
    );
    if let Err(e) = ev {
        panic!("none of {statuses:?}: {e}; log:\n{}", dst.log());
    }
    let info = dst.info();
    assert!(statuses.iter().any(|s| info["status"] == *s), "{info}");
    let st = dst.cmd("query-status", json!({}));
    assert!(st["status"].is_string(), "{st}");
    (dst, info)
}

fn desc(info: &Value) -> &str {
    info["error-desc"].as_str().unwrap_or_default()
}

#[test]
fn bad_magic_fails_at_offset_0() {
    let mut s = read("qemu-7.2/precopy-tcp-rp/stream.bin");
    s[0] ^= 0xff;
    let (_d, info) = run(&["--ram", "64M", "--profile", "7.2"], &s, "failed");
    assert!(desc(&info).starts_with("offset 0: HDR-MAGIC:"), "{info}");
}

#[test]
fn machine_type_mismatch_fails_cfg_machine() {
    let s = read("qemu-7.2/precopy-file-zero/stream.bin");
    let (_d, info) = run(
        &["--ram", "16M", "--profile", "7.2", "--machine", "microvm"],
        &s,
        "failed",
    );
    assert!(desc(&info).starts_with("offset 13: CFG-MACHINE:"), "{info}");
}

#[test]
fn unknown_block_size_fails() {
    // The stream announces a 16 MiB `ram`; this destination has 32 MiB.
    let s = read("qemu-7.2/precopy-file-zero/stream.bin");
    let (_d, info) = run(&["--ram", "32M", "--profile", "7.2"], &s, "failed");
    // SECTION_START `ram` at 17 (17 bytes), MEM_SIZE's header word at 34, its entry at 42:
    // name length byte, `ram`, then used_length at 46.
    assert!(
        desc(&info).starts_with("offset 46: RAM-BLOCK-UNKNOWN:"),
        "{info}"
    );
}

#[test]
fn unknown_block_name_fails_at_its_entry() {
    let mut s = read("qemu-7.2/precopy-file-zero/stream.bin");
    assert_eq!(&s[42..46], b"\x03ram");
    s[45] = b'x';
    let (_d, info) = run(&["--ram", "16M", "--profile", "7.2"], &s, "failed");
    assert!(
        desc(&info).starts_with("offset 42: RAM-BLOCK-UNKNOWN:"),
        "{info}"
    );
}

/// Garbage before postcopy RUN fails the migration; the guest RAM is left as received.
#[test]
fn garbage_before_run_fails() {
    let s = read("qemu-7.2/postcopy/stream.bin");
    // Records: ... ADVISE at 31 (21 bytes); garbage right after it.
    let mut bad = s[..52].to_vec();
    bad.extend_from_slice(&[0xff; 64]);
    let (_d, info) = run(
        &[
            "--ram",
            "64M",
            "--profile",
            "7.2",
            "--capabilities",
            "postcopy-ram,return-path",
        ],
        &bad,
        "failed",
    );
    assert!(desc(&info).starts_with("offset 52: "), "{info}");
}

/// Garbage after postcopy RUN pauses the migration (the source may recover it).
#[test]
fn garbage_after_run_pauses() {
    let s = read("qemu-7.2/postcopy/stream.bin");
    // PACKAGED (LISTEN .. RUN) ends at 752278, PING 4 ends at 752287: garbage there.
    let mut bad = s[..752287].to_vec();
    bad.extend_from_slice(&[0xff; 64]);
    let vd = vectors().join("qemu-7.2/postcopy/vmdesc.json");
    let vd = vd.display().to_string();
    let (mut d, info) = run(
        &[
            "--ram",
            "64M",
            "--profile",
            "7.2",
            "--capabilities",
            "postcopy-ram,return-path",
            "--vmdesc",
            &vd,
        ],
        &bad,
        "postcopy-paused",
    );
    assert!(desc(&info).starts_with("offset 752287: "), "{info}");
    // Still recoverable: migrate-recover is accepted.
    d.listen("migrate-recover");
}

/// Every synthetic destination vector of `conformance/vectors/synthetic` (when present):
/// invalid ones fail with exactly their rule and offset, valid ones complete.
#[test]
fn synthetic_destination_vectors() {
    let dir = vectors().join("synthetic");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no synthetic vectors at {}", dir.display());
        return;
    };
    let mut checked = 0;
    let mut names: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    names.sort();
    for v in names {
        let Ok(text) = std::fs::read(v.join("manifest.json")) else {
            continue;
        };
        let m: Value = serde_json::from_slice(&text).unwrap();
        let s = &m["synthetic"];
        let checker = s["checker"].as_str().unwrap_or_default();
        if !matches!(checker, "destination" | "destination-huge-pages") || s["channel"] != "main" {
            continue;
        }
        let name = v.file_name().unwrap().to_string_lossy().to_string();
        let profile = s["profile"].as_str().unwrap().to_string();
        let mut blocks = s["blocks"].as_array().unwrap().iter();
        let first = blocks.next().unwrap();
        let ram = first[1].as_u64().unwrap().to_string();
        let caps: Vec<String> = m["replay"]["destination_capabilities"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, v)| v.as_bool() == Some(true) && k.as_str() != "events")
            .map(|(k, _)| k.clone())
            .collect();
        let caps = caps.join(",");
        let machine = m["machine"]["type"].as_str().unwrap_or("none").to_string();
        let mut args: Vec<String> = vec![
            "--ram".into(),
            ram,
            "--profile".into(),
            profile,
            "--machine".into(),
            machine,
        ];
        if first[0] != "ram" && first[0] != "microvm.ram" {
            panic!("{name}: first block {first}");
        }
        // A block of larger pages carries its page size third (the huge-page cases).
        if let Some(ps) = first.get(2) {
            args.extend(["--ram-page-size".into(), ps.to_string()]);
        }
        for b in blocks {
            let ps = b.get(2).map(|p| format!(":{p}")).unwrap_or_default();
            args.extend([
                "--block".into(),
                format!("{}:{}{ps}", b[0].as_str().unwrap(), b[1]),
            ]);
        }
        if !caps.is_empty() {
            args.extend(["--capabilities".into(), caps]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let data = std::fs::read(v.join("stream.bin")).unwrap();
        if s["class"] == "invalid" {
            // Bytes after a complete stream (EOF-TRAILING) arrive once the machine has
            // completed: it reports the violation but cannot fail any more.
            // After postcopy RUN a violation pauses instead (the source may recover). Bytes
            // after EOF (EOF-TRAILING, VMDESC-*) arrive once the machine has completed: it
            // reports the violation but cannot fail any more.
            let end = ["failed", "postcopy-paused", "completed"];
            let (_d, info) = run_any(&args, &data, &end);
            let want = format!(
                "offset {}: {}:",
                s["expected"]["offset"],
                s["expected"]["rule"].as_str().unwrap()
            );
            assert!(
                desc(&info).starts_with(&want),
                "{name}: want {want}, got {info}"
            );
        } else {
            let (_d, info) = run(&args, &data, "completed");
            assert!(info.get("error-desc").is_none(), "{name}: {info}");
        }
        checked += 1;
    }
    assert!(checked > 0, "synthetic folder without destination vectors");
}
