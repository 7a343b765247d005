//! Postcopy recovery driven by a vector's return path: a fake destination in the test speaks
//! the return path from `rp.bin` (first channel) and `resume-rp.bin` (recovery channel) of a
//! QEMU capture, and reads what qmig-src sends. After the destination's received bitmap,
//! qmig-src must resend exactly the pages whose bit is clear, each once.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::time::Duration;

use common::{decode_main, workspace, Src, PHASE};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::stream::Item;
use serde_json::{json, Value};

/// One return-path message: its kind and its exact bytes.
struct RpMsg {
    kind: &'static str,
    bytes: Vec<u8>,
    /// RECV_BITMAP: block name and bitmap bytes.
    bitmap: Option<(String, Vec<u8>)>,
}

/// The RAM blocks of a vector: (name, used length).
type Blocks = Vec<(String, u64)>;

fn pages_of(blocks: &Blocks, name: &[u8]) -> Option<u64> {
    blocks
        .iter()
        .find(|(n, _)| n.as_bytes() == name)
        .map(|(_, l)| l.div_ceil(4096))
}

fn split_rp(bytes: &[u8], profile: Profile, blocks: &Blocks) -> Vec<RpMsg> {
    let mut d = RpDecoder::new(profile, Limits::DEFAULT);
    let expect = |name: &[u8]| pages_of(blocks, name).map(PageBitmap::wire_size);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (m, n) = d
            .decode(&bytes[pos..], &expect)
            .unwrap_or_else(|e| panic!("vector return path at {pos}: {e:?}"));
        let (kind, bitmap) = match m {
            RpMessage::Shut(_) => ("shut", None),
            RpMessage::Pong(_) => ("pong", None),
            RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. } => ("req", None),
            RpMessage::RecvBitmap { bitmap, name } => (
                "bitmap",
                Some((String::from_utf8_lossy(name).into_owned(), bitmap.to_vec())),
            ),
            RpMessage::ResumeAck(_) => ("ack", None),
            _ => ("other", None),
        };
        out.push(RpMsg {
            kind,
            bytes: bytes[pos..pos + n].to_vec(),
            bitmap,
        });
        pos += n;
    }
    out
}

fn cat(msgs: &[&RpMsg]) -> Vec<u8> {
    msgs.iter().flat_map(|m| m.bytes.iter().copied()).collect()
}

fn recover_from_vector(vector: &str, profile_arg: &str, profile: Profile) {
    let dir = workspace().join("conformance/vectors").join(vector);
    let template = dir.join("stream.bin");
    let vector_dec = decode_main(&std::fs::read(&template).unwrap(), profile);
    let blocks: Blocks = vector_dec
        .blocks()
        .iter()
        .map(|b| {
            (
                String::from_utf8_lossy(b.name()).into_owned(),
                b.used_length,
            )
        })
        .collect();
    let rp1 = split_rp(
        &std::fs::read(dir.join("rp.bin")).unwrap(),
        profile,
        &blocks,
    );
    let rp2 = split_rp(
        &std::fs::read(dir.join("resume-rp.bin")).unwrap(),
        profile,
        &blocks,
    );
    let requests1 = rp1.iter().filter(|m| m.kind == "req").count() as u64;
    let last_bitmap = rp2.iter().rposition(|m| m.kind == "bitmap").unwrap();
    let mut expected: BTreeSet<(String, u64)> = BTreeSet::new();
    for m in &rp2 {
        if let Some((name, bits)) = &m.bitmap {
            let pages = pages_of(&blocks, name.as_bytes()).unwrap();
            let received = PageBitmap::from_le_bytes(bits, pages, 0).unwrap();
            expected.extend(received.iter_zeros().map(|p| (name.clone(), p)));
        }
    }
    let total: u64 = blocks.iter().map(|(_, l)| l.div_ceil(4096)).sum();
    assert!(!expected.is_empty() && (expected.len() as u64) < total);

    let (main_name, main_len) = blocks[0].clone();
    let ram = format!("{main_len}");
    let machine = if main_name == "ram" {
        "none"
    } else {
        "microvm"
    };
    let template = template.display().to_string();
    let extra: Vec<String> = blocks[1..]
        .iter()
        .map(|(n, l)| format!("{n}:{l}"))
        .collect();
    let mut args: Vec<&str> = vec![
        "--ram",
        &ram,
        "--machine",
        machine,
        "--profile",
        profile_arg,
        "--fill",
        "random",
        "--seed",
        "3",
    ];
    if machine != "none" {
        args.extend(["--device-template", &template]);
    }
    for b in &extra {
        args.extend(["--block", b]);
    }
    let mut src = Src::spawn(&args);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "postcopy-ram", "state": true},
            {"capability": "return-path", "state": true},
            {"capability": "events", "state": true}]}),
    );
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 2u64 << 20}),
    );

    // First channel: the stream is drained by a thread; the return path is rp.bin.
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port1 = l1.local_addr().unwrap().port();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port1}")}));
    let (mut s1, _) = l1.accept().unwrap();
    let mut r1 = s1.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r1.read_to_end(&mut v);
        v
    });
    src.wait("active");
    src.cmd("migrate-start-postcopy", Value::Null);
    src.wait("postcopy-active");
    s1.write_all(&cat(&rp1.iter().collect::<Vec<_>>())).unwrap();
    // qmig-src has consumed the first return path once it counted its page requests.
    src.qmp
        .poll_until(
            "query-migrate",
            Value::Null,
            |v| v["ram"]["postcopy-requests"].as_u64() == Some(requests1),
            Duration::from_millis(20),
            PHASE,
        )
        .unwrap();
    s1.shutdown(Shutdown::Both).unwrap();
    src.wait("postcopy-paused");
    let main = drain.join().unwrap();
    let main_dec = decode_main(&main, profile);

    // Recovery channel on another port.
    let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let port2 = l2.local_addr().unwrap().port();
    assert_ne!(port1, port2);
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port2}"), "resume": true}),
    );
    let (mut s2, _) = l2.accept().unwrap();
    let mut dec = main_dec.resume_from();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut pages: Vec<(String, u64)> = Vec::new();
    let mut done = false;
    let mut bitmaps_asked = 0;
    let before_ack: Vec<&RpMsg> = rp2[..=last_bitmap].iter().collect();
    let after: Vec<&RpMsg> = rp2[last_bitmap + 1..]
        .iter()
        .filter(|m| m.kind != "shut")
        .collect();
    let shut: Vec<&RpMsg> = rp2.iter().filter(|m| m.kind == "shut").collect();
    assert_eq!(shut.len(), 1);
    while !done {
        let n = s2.read(&mut chunk).unwrap();
        assert!(n > 0, "recovery stream ended before EOF");
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        loop {
            let (item, used) = match dec.decode(&buf[pos..]) {
                Ok(x) => x,
                Err(e) => {
                    assert!(e.is_incomplete(), "recovery stream: {e:?}");
                    break;
                }
            };
            pos += used;
            match item {
                Item::Command(Command::RecvBitmap { name }) => {
                    assert_eq!(name, blocks[bitmaps_asked].0.as_bytes());
                    bitmaps_asked += 1;
                    if bitmaps_asked == blocks.len() {
                        s2.write_all(&cat(&before_ack)).unwrap();
                    }
                }
                Item::Command(Command::PostcopyResume) => {
                    s2.write_all(&cat(&after)).unwrap();
                }
                Item::Ram(rec) => {
                    if matches!(rec.body, RamBody::Page(_) | RamBody::Zero { .. }) {
                        let block = rec.block(dec.ram()).expect("a named block");
                        let block = String::from_utf8_lossy(block).into_owned();
                        pages.push((block, rec.addr / 4096));
                    }
                }
                Item::Eof => {
                    s2.write_all(&cat(&shut)).unwrap();
                    done = true;
                    break;
                }
                _ => {}
            }
        }
        buf.drain(..pos);
    }
    src.wait("completed");
    let sent: BTreeSet<(String, u64)> = pages.iter().cloned().collect();
    assert_eq!(sent.len(), pages.len(), "a page was resent twice");
    assert_eq!(
        sent, expected,
        "resent pages differ from the clear bits of the received bitmap"
    );
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(info["x-qmig"]["recoveries"], 1, "{info}");
}

#[test]
fn qemu72_resume_rp_resends_exactly_the_clear_bits() {
    recover_from_vector("qemu-7.2/postcopy-recover", "7.2", Profile::QEMU_7_2);
}

#[test]
fn qemu100_microvm_resume_rp_resends_exactly_the_clear_bits() {
    recover_from_vector("qemu-10.0/postcopy-recover", "10", Profile::QEMU_10);
}
