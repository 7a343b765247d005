//! `qmig verify`: every complete vector channel is valid (exit 0); mutated copies are invalid
//! (exit 1) with the exact rule and offset; cut streams are `STREAM-TRUNCATED`; a missing file
//! is unreadable (exit 2).

mod cli_util;

use cli_util::*;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qmig-cli-verify-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn every_complete_channel_and_return_path_is_valid() {
    let mut streams = 0;
    let mut rps = 0;
    for dir in vector_dirs() {
        let m = manifest(&dir);
        for ch in m["channels"].as_array().unwrap() {
            let file = dir.join(ch["file"].as_str().unwrap());
            // The first connection of a recovery vector was cut by the proxy.
            let cut = dir.join("resume-stream.bin").is_file() && ch["file"] == "stream.bin";
            let mut args = vec!["verify".to_string(), p(&file)];
            if ch["file"].as_str().unwrap().starts_with("resume") {
                args.push("--resume".into());
            }
            if dir.join("vmdesc.json").is_file() {
                args.extend(["--vmdesc".into(), p(&dir.join("vmdesc.json"))]);
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = run(&a);
            if cut {
                assert_eq!(code, 1, "{out}{err}");
                assert!(out.contains(": STREAM-TRUNCATED: "), "{out}");
            } else {
                assert_eq!(code, 0, "{out}{err}");
                assert!(
                    out.ends_with("valid (profile 7.2)\n") || out.ends_with("valid (profile 10)\n")
                );
                let want = if dir.parent().unwrap().ends_with("qemu-7.2") {
                    "7.2"
                } else {
                    "10"
                };
                assert!(out.contains(&format!("(profile {want})")), "{out}");
                streams += 1;
            }
            if let Some(rp) = ch["rp_file"].as_str() {
                let (code, out, err) = run(&[
                    "verify",
                    "--rp",
                    &p(&dir.join(rp)),
                    "--main",
                    &p(&dir.join("stream.bin")),
                ]);
                assert_eq!(code, 0, "{out}{err}");
                rps += 1;
            }
        }
    }
    assert_eq!(streams, 35, "complete channels");
    assert!(rps >= 24, "{rps}");
}

/// A copy of `src` with `f` applied.
fn mutated(src: &Path, name: &str, f: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    let out = tmp(name);
    std::fs::write(&out, b).unwrap();
    out
}

fn verify_line(file: &Path) -> (i32, String) {
    let (code, out, _) = run(&["verify", &p(file)]);
    (code, out.trim_end().to_string())
}

#[test]
fn mutations_name_rule_and_offset() {
    let dir = vectors().join("qemu-7.2/precopy-tcp-rp");
    let src = dir.join("stream.bin");
    let m = manifest(&dir);
    let recs = m["channels"][0]["records"].as_array().unwrap().clone();
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        let r = recs.iter().find(|r| pred(r)).unwrap();
        (
            r["offset"].as_u64().unwrap() as usize,
            r["length"].as_u64().unwrap_or(0) as usize,
        )
    };

    let f = mutated(&src, "magic.bin", |b| b[0] = b'X');
    let (code, line) = verify_line(&f);
    assert_eq!(code, 1);
    assert_eq!(line, format!("{}: offset 0: HDR-MAGIC: a main stream starts with the be32 magic 0x5145564D (\"QEVM\") (value {})", p(&f), 0x5845564du32));

    // PING: 08, be16 2, be16 4 -> length 5.
    let (ping, _) = at(&|r| r["cmd"] == "MIG_CMD_PING");
    let f = mutated(&src, "cmdlen.bin", |b| b[ping + 4] = 5);
    let (code, line) = verify_line(&f);
    assert_eq!(code, 1);
    assert!(line.ends_with(&format!(": offset {}: CMD-LEN: a fixed-length command's be16 length equals its table length (value 5)", ping + 3)), "{line}");

    // The first RAM record (MEM_SIZE, flags 0x04) after the 17-byte START header gets 0x80 too.
    let (start, _) = at(&|r| r["type"] == "SECTION_START");
    let rec = start + 17;
    let f = mutated(&src, "ramflag.bin", |b| b[rec + 7] |= 0x80);
    let (code, line) = verify_line(&f);
    assert_eq!(code, 1);
    assert!(line.ends_with(&format!(": offset {rec}: RAM-FLAGS: a RAM record has exactly one type flag, besides CONTINUE (value 132)")), "{line}");

    // The timer section's footer id (last 4 bytes of its record).
    let (t, len) = at(&|r| r["idstr"] == "timer");
    let id_at = t + len - 4;
    let f = mutated(&src, "footer.bin", |b| b[id_at + 3] ^= 1);
    let (code, line) = verify_line(&f);
    assert_eq!(code, 1);
    assert!(
        line.contains(&format!(": offset {id_at}: SEC-FOOTER-ID: ")),
        "{line}"
    );

    // Cut inside the timer section: the cut record's offset, STREAM-TRUNCATED.
    let f = mutated(&src, "cut.bin", |b| b.truncate(t + 10));
    let (code, line) = verify_line(&f);
    assert_eq!(code, 1);
    assert!(line.contains(": STREAM-TRUNCATED: "), "{line}");
    let (code, out, _) = run(&["inspect", "--json", &p(&f)]);
    assert_eq!(code, 0, "a clean cut is not an inspect error");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "TRUNCATED");
    assert_eq!(last["offset"].as_u64(), Some(t as u64));
    assert_eq!(last["bytes_left"].as_u64(), Some(10));
}

#[test]
fn unreadable_file_exits_2() {
    let (code, out, _) = run(&["verify", "/nonexistent/qmig/stream.bin"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unreadable"));
}

/// A return path holding one RECV_BITMAP for block `ram` with `bitmap` as its body.
fn recv_bitmap_rp(name: &str, bitmap: &[u8]) -> PathBuf {
    let mut b = Vec::new();
    b.extend(5u16.to_be_bytes());
    b.extend((1 + 3u16).to_be_bytes());
    b.push(3);
    b.extend(b"ram");
    b.extend((bitmap.len() as u64).to_be_bytes());
    b.extend(bitmap);
    b.extend(0x0123_4567_89ab_cdefu64.to_be_bytes());
    let f = tmp(name);
    std::fs::write(&f, b).unwrap();
    f
}

#[test]
fn return_path_bitmaps_are_checked_against_block_sizes() {
    // 100 pages: 16 bitmap bytes, bits 100..127 are padding. The bitmap starts at offset 16.
    let mut bm = vec![0u8; 16];
    bm[0] = 0xff;
    let ok = recv_bitmap_rp("rp-ok.bin", &bm);
    let (code, out, _) = run(&["verify", "--rp", "--block", "ram:409600", &p(&ok)]);
    assert_eq!(
        (code, out.ends_with(": valid (profile 10)\n")),
        (0, true),
        "{out}"
    );
    let (code, out, _) = run(&[
        "inspect",
        "--json",
        "--block",
        "ram:409600",
        "--rp",
        &p(&ok),
        &p(&vectors().join("qemu-10.0/precopy-file-zero/stream.bin")),
    ]);
    assert_eq!(code, 0);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["type"].as_str(), last["bitmap_bits_set"].as_u64()),
        (Some("MIG_RP_MSG_RECV_BITMAP"), Some(8))
    );

    bm[12] = 0x10; // page 100
    let pad = recv_bitmap_rp("rp-pad.bin", &bm);
    let (code, out, _) = run(&["verify", "--rp", "--block", "ram:409600", &p(&pad)]);
    assert_eq!(code, 1);
    assert!(out.contains(": offset 28: BITMAP-PADDING: "), "{out}");

    let size = recv_bitmap_rp("rp-size.bin", &[0u8; 24]);
    let (code, out, _) = run(&["verify", "--rp", "--block", "ram:409600", &p(&size)]);
    assert_eq!(code, 1);
    assert!(out.contains(": RP-BITMAP-SIZE: "), "{out}");
    // Without the block's size only the framing is checked.
    let (code, _, _) = run(&["verify", "--rp", &p(&pad)]);
    assert_eq!(code, 0);
}
