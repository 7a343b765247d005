//! `qmig inspect` against every vector: the records (offsets and types) of every channel,
//! postcopy and recovery channels included, and of every return-path capture equal the
//! manifest's; a cut stream ends with a TRUNCATED record at the manifest's offset; stdin is read
//! incrementally with the same result.

mod cli_util;

use cli_util::*;
use std::io::Write;
use std::process::Stdio;

#[test]
fn inspect_lists_every_manifest_record_of_every_vector() {
    let mut channels = 0;
    let mut rp_files = 0;
    let mut truncated = 0;
    let mut multifd_conns = 0;
    for dir in vector_dirs() {
        let m = manifest(&dir);
        for ch in m["channels"].as_array().expect("channels") {
            let args = inspect_args(&dir, ch);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = run(&args);
            assert_eq!(code, 0, "{}: {err}", dir.display());
            let (header, recs) = parse_json_lines(&out);
            assert_eq!(header["format"], "qmig-inspect/1");
            let top = top_level(&recs);
            if let Some(expect) = ch["records"].as_array() {
                let got: Vec<(u64, String)> = top
                    .iter()
                    .map(|r| {
                        (
                            r["offset"].as_u64().unwrap(),
                            r["type"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                let want: Vec<(u64, String)> = expect
                    .iter()
                    .map(|r| {
                        (
                            r["offset"].as_u64().unwrap(),
                            r["type"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect();
                assert_eq!(got, want, "{} {}", dir.display(), ch["file"]);
                if let Some(t) = expect.iter().find(|r| r["type"] == "TRUNCATED") {
                    let last = top.last().unwrap();
                    assert_eq!(last["offset"], t["offset"]);
                    assert_eq!(last["bytes_left"], t["bytes_left"], "{}", dir.display());
                    truncated += 1;
                }
                // Commands carry the manifest's decoded fields.
                for (g, w) in top.iter().zip(expect) {
                    if w["type"] == "COMMAND" {
                        assert_eq!(g["cmd"], w["cmd"]);
                        for k in ["value", "block", "package_length", "ram_pagesize_summary"] {
                            if !w[k].is_null() {
                                assert_eq!(g[k], w[k], "{} {k}", dir.display());
                            }
                        }
                    }
                    if let Some(n) = w["payload_length"].as_u64() {
                        assert_eq!(g["payload_length"].as_u64(), Some(n));
                        assert_eq!(g["payload_sha256"], w["payload_sha256"]);
                    }
                }
                channels += 1;
            } else {
                // Vectors whose manifest leaves the records to qmig: no INVALID, ends as said.
                assert!(recs.iter().all(|r| r["type"] != "INVALID"));
            }
            if let Some(expect) = ch["rp_messages"].as_array() {
                let rp: Vec<_> = recs.iter().filter(|r| r["channel"] == "rp").collect();
                assert_eq!(rp.len(), expect.len(), "{}", dir.display());
                for (g, w) in rp.iter().zip(expect) {
                    assert_eq!(g["offset"], w["offset"]);
                    assert_eq!(g["type"], w["type"]);
                    if let Some(sha) = w["bitmap_sha256"].as_str() {
                        assert_eq!(g["bitmap_sha256"], sha);
                        assert_eq!(g["bitmap_bits_set"], w["bitmap_bits_set"]);
                        assert_eq!(g["bitmap_size"], w["bitmap_size"]);
                    }
                }
                rp_files += 1;
            }
            if let Some(conns) = ch["multifd_channels"].as_array() {
                for (i, c) in conns.iter().enumerate() {
                    let got: Vec<(u64, u64)> = recs
                        .iter()
                        .filter(|r| r["type"] == "MULTIFD_PACKET" && r["conn"] == i as u64)
                        .map(|r| {
                            (
                                r["offset"].as_u64().unwrap(),
                                r["packet_num"].as_u64().unwrap(),
                            )
                        })
                        .collect();
                    let want: Vec<(u64, u64)> = c["packets"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| {
                            (
                                r["offset"].as_u64().unwrap(),
                                r["packet_num"].as_u64().unwrap(),
                            )
                        })
                        .collect();
                    assert_eq!(got, want, "{} conn {i}", dir.display());
                    let init = recs
                        .iter()
                        .find(|r| r["type"] == "MULTIFD_INIT" && r["conn"] == i as u64)
                        .unwrap();
                    assert_eq!(init["channel_id"], c["init"]["channel_id"]);
                    multifd_conns += 1;
                }
            }
        }
    }
    // 35 channels and 24 return-path files of the shared captures, 6 and 6 of the suite's own
    // (qemu-10.0-qmig, decoded by its capture tool); 4 + 2 cut streams.
    assert_eq!(channels, 35 + 6, "channels with manifest records");
    assert_eq!(
        rp_files,
        24 + 6,
        "return-path captures with manifest messages"
    );
    assert_eq!(truncated, 4 + 2, "the cut streams");
    assert_eq!(
        multifd_conns, 4,
        "two multifd vectors, two connections each"
    );
}

#[test]
fn text_output_has_one_unindented_line_per_record() {
    let dir = vectors().join("qemu-7.2/postcopy-recover");
    let m = manifest(&dir);
    let (code, out, _) = run(&["inspect", &p(&dir.join("stream.bin")), "--no-fields"]);
    assert_eq!(code, 0);
    // A top-level record is a line that does not start with a space (nested records, page
    // records and device fields are indented); `#` starts the header comment.
    let top: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' '))
        .collect();
    assert_eq!(
        top.len(),
        m["channels"][0]["records"].as_array().unwrap().len()
    );
    let last = top.last().unwrap();
    assert!(
        last.starts_with("890276     TRUNCATED rule=STREAM-TRUNCATED bytes_left=2877"),
        "{last}"
    );
}

#[test]
fn stdin_is_read_incrementally_with_the_same_records() {
    let dir = vectors().join("qemu-10.0/precopy-xbzrle");
    let file = dir.join("stream.bin");
    let (code, want, _) = run(&["inspect", "--json", "--profile", "10", &p(&file)]);
    assert_eq!(code, 0);
    let bytes = std::fs::read(&file).unwrap();
    let mut child = qmig()
        .args(["inspect", "--json", "--profile", "10", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for c in bytes.chunks(1000) {
            stdin.write_all(c).unwrap();
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let got = String::from_utf8(out.stdout).unwrap();
    let (_, want) = parse_json_lines(&want);
    let (h, got) = parse_json_lines(&got);
    assert_eq!(h["file"], "-");
    // From stdin the trailing VM description is not known in advance: no device fields.
    let strip = |v: &Vec<serde_json::Value>| {
        v.iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove("fields");
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&got), strip(&want));
    assert_eq!(got.len(), 37);
}

#[test]
fn pages_lists_every_ram_record() {
    let dir = vectors().join("qemu-7.2/precopy-file-zero");
    let (code, out, _) = run(&["inspect", "--json", "-v", &p(&dir.join("stream.bin"))]);
    assert_eq!(code, 0);
    let (_, recs) = parse_json_lines(&out);
    let zero_pages = recs
        .iter()
        .filter(|r| r["type"] == "RAM" && r["flags"] == "ZERO")
        .count() as u64;
    let summed: u64 = recs.iter().filter_map(|r| r["ram"]["zero"].as_u64()).sum();
    assert_eq!(zero_pages, summed);
    assert_eq!(zero_pages, 4096, "16 MiB of ZERO records");
}

#[test]
fn compat_state_and_desc_have_analyze_migration_shapes() {
    let file = vectors().join("qemu-7.2/precopy-file-zero/stream.bin");
    let (code, out, _) = run(&["inspect", "--compat", "state", &p(&file)]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["globalstate (0)", "ram (0)", "timer (0)"]);
    // timer: FULL header of 19 bytes at the manifest's offset, then be64 cpu_ticks_offset.
    let m = manifest(&vectors().join("qemu-7.2/precopy-file-zero"));
    let t = m["channels"][0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["idstr"] == "timer")
        .unwrap()["offset"]
        .as_u64()
        .unwrap() as usize
        + 19;
    let b = std::fs::read(&file).unwrap();
    let want: String = b[t..t + 8].iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(v["timer (0)"]["cpu_ticks_offset"], format!("0x{want}"));
    assert_eq!(v["globalstate (0)"]["size"], "0x00000008");

    let (code, out, _) = run(&["inspect", "--compat", "desc", &p(&file)]);
    assert_eq!(code, 0);
    let desc: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The trailing VM description: the last `json_length` bytes of the file.
    let (_, recs) = parse_json_lines(&run(&["inspect", "--json", &p(&file)]).1);
    let n = recs.last().unwrap()["json_length"].as_u64().unwrap() as usize;
    let tail: serde_json::Value = serde_json::from_slice(&b[b.len() - n..]).unwrap();
    assert_eq!(desc, tail);
}
