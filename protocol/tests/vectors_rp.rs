//! Every return-path recording in `conformance/vectors/` decodes to its end with `RpDecoder`;
//! the messages equal the manifest's `rp_messages`; re-encoding gives the identical bytes; and
//! every proper prefix of a message is `Incomplete`, never a wrong message.

use qmig_protocol::bitmap::{wire_size, PageBitmap};
use qmig_protocol::codes::RpType;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::WireError;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors")
}

fn profile_of(dir: &Path) -> Profile {
    let v = dir.parent().unwrap().file_name().unwrap().to_str().unwrap();
    match v {
        "qemu-7.2" => Profile::QEMU_7_2,
        "qemu-10.0" | "qemu-10.0-qmig" => Profile::QEMU_10,
        other => panic!("unknown vector folder {other}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes a whole RP recording; checks each message against the manifest entry.
fn check_file(dir: &Path, file: &str, expect: &[Value], profile: Profile) -> usize {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let mut dec = RpDecoder::new(profile, Limits::DEFAULT);
    let unknown = |_: &[u8]| None;
    let mut pos = 0usize;
    let mut re = Vec::new();
    for (i, e) in expect.iter().enumerate() {
        let ctx = format!("{}/{file} message {i}", dir.display());
        assert_eq!(dec.offset(), e["offset"].as_u64().unwrap(), "{ctx}: offset");
        let (msg, used) = dec
            .decode(&bytes[pos..], &unknown)
            .unwrap_or_else(|err| panic!("{ctx}: {err}"));
        assert_eq!(used as u64, e["length"].as_u64().unwrap(), "{ctx}: length");
        assert_eq!(
            msg.ty(),
            RpType(e["type_id"].as_u64().unwrap() as u16),
            "{ctx}: type"
        );
        assert_eq!(msg.ty().name(), e["type"].as_str(), "{ctx}: type name");
        assert_eq!(
            u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as u64,
            e["data_length"].as_u64().unwrap(),
            "{ctx}: data_length"
        );
        match msg {
            RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
                assert_eq!(v as u64, e["value"].as_u64().unwrap(), "{ctx}: value")
            }
            RpMessage::ReqPagesId { start, len, name } => {
                assert_eq!(start, e["start"].as_u64().unwrap(), "{ctx}");
                assert_eq!(len as u64, e["len"].as_u64().unwrap(), "{ctx}");
                assert_eq!(name, e["block"].as_str().unwrap().as_bytes(), "{ctx}");
                assert_eq!(dec.last_req_block(), Some(name), "{ctx}");
            }
            RpMessage::ReqPages { start, len } => {
                assert_eq!(start, e["start"].as_u64().unwrap(), "{ctx}");
                assert_eq!(len as u64, e["len"].as_u64().unwrap(), "{ctx}");
                assert!(dec.last_req_block().is_some(), "{ctx}");
            }
            RpMessage::RecvBitmap { name, bitmap } => {
                assert_eq!(name, e["block"].as_str().unwrap().as_bytes(), "{ctx}");
                let size = e["bitmap_size"].as_u64().unwrap();
                assert_eq!(bitmap.len() as u64, size, "{ctx}: bitmap_size");
                assert_eq!(
                    hex(&Sha256::digest(bitmap)),
                    e["bitmap_sha256"].as_str().unwrap(),
                    "{ctx}: bitmap_sha256"
                );
                let bits: u64 = bitmap.iter().map(|b| b.count_ones() as u64).sum();
                assert_eq!(
                    bits,
                    e["bitmap_bits_set"].as_u64().unwrap(),
                    "{ctx}: bits set"
                );
                // The bitmap is an exact PageBitmap of size*8 pages (QEMU block lengths are
                // multiples of 64 pages here), and it round-trips byte-exactly.
                let pages = size * 8;
                assert_eq!(wire_size(pages), size);
                let pb = PageBitmap::from_le_bytes(bitmap, pages, dec.last_bitmap_offset())
                    .unwrap_or_else(|err| panic!("{ctx}: {err}"));
                assert_eq!(pb.count_ones(), bits);
                assert_eq!(pb.to_le_vec(), bitmap, "{ctx}: bitmap re-encoding");
                // With the block's exact size known, the same bytes decode the same way.
                let mut d2 = RpDecoder::new(profile, Limits::DEFAULT);
                let known = |n: &[u8]| (n == name).then_some(size);
                let (m2, u2) = d2.decode(&bytes[pos..], &known).unwrap();
                assert_eq!((m2, u2), (msg, used));
                // A wrong expected size is RP-BITMAP-SIZE at the size field.
                let wrong = |_: &[u8]| Some(size + 8);
                let err = RpDecoder::new(profile, Limits::DEFAULT)
                    .decode(&bytes[pos..], &wrong)
                    .unwrap_err();
                let v = err.violation().unwrap();
                assert_eq!(v.rule.id(), "RP-BITMAP-SIZE");
                assert_eq!(v.offset, (5 + name.len()) as u64);
            }
            other => panic!("{ctx}: unexpected {other:?}"),
        }
        let msg_bytes = &bytes[pos..pos + used];
        let mut enc = Vec::new();
        msg.encode(&mut enc);
        assert_eq!(enc, msg_bytes, "{ctx}: re-encoding");
        re.extend_from_slice(&enc);
        pos += used;
    }
    assert_eq!(
        pos,
        bytes.len(),
        "{}/{file}: decoded to the end",
        dir.display()
    );
    assert_eq!(re, bytes);
    expect.len()
}

/// Every proper prefix of every message is `Incomplete` (nothing consumed, no state change).
fn check_prefixes(dir: &Path, file: &str, profile: Profile) {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let mut dec = RpDecoder::new(profile, Limits::DEFAULT);
    let unknown = |_: &[u8]| None;
    let mut pos = 0;
    while pos < bytes.len() {
        let before = dec.clone();
        let (_, used) = dec.decode(&bytes[pos..], &unknown).unwrap();
        let step = (used / 97).max(1);
        let mut k = 0;
        while k < used {
            let mut probe = before.clone();
            match probe.decode(&bytes[pos..pos + k], &unknown) {
                Err(WireError::Incomplete { needed }) => assert!(needed >= 1),
                other => panic!("{}/{file} at {pos}+{k}: {other:?}", dir.display()),
            }
            assert_eq!(probe.offset(), before.offset());
            assert_eq!(probe.last_req_block(), before.last_req_block());
            k += step;
        }
        pos += used;
    }
}

#[test]
fn every_rp_recording_decodes_matches_manifest_and_reencodes() {
    let mut files = 0;
    let mut messages = 0;
    let mut bitmaps = 0;
    // qemu-10.0-qmig: the suite's own captures (manifests decoded by its capture tool).
    for ver in ["qemu-7.2", "qemu-10.0", "qemu-10.0-qmig"] {
        let mut dirs: Vec<_> = std::fs::read_dir(vectors().join(ver))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let m: Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let profile = profile_of(&dir);
            for ch in m["channels"].as_array().unwrap() {
                let (Some(file), Some(list)) =
                    (ch["rp_file"].as_str(), ch["rp_messages"].as_array())
                else {
                    continue;
                };
                messages += check_file(&dir, file, list, profile);
                bitmaps += list.iter().filter(|e| e["type_id"] == 5).count();
                check_prefixes(&dir, file, profile);
                files += 1;
            }
            // Every rp file on disk is covered by a manifest channel.
            for f in ["rp.bin", "resume-rp.bin"] {
                if dir.join(f).exists() {
                    assert!(
                        m["channels"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|c| c["rp_file"] == f),
                        "{} {f} has no manifest entry",
                        dir.display()
                    );
                }
            }
        }
    }
    eprintln!("{files} rp files, {messages} messages, {bitmaps} RECV_BITMAPs");
    assert_eq!(files, 24 + 6);
    assert!(bitmaps >= 4);
}
