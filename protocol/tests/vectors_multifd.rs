//! Every multifd connection recording in `conformance/vectors/` decodes to its end with
//! `MultifdDecoder`, its packets equal the manifest's `multifd_channels`, and re-encoding gives
//! the identical bytes.

use qmig_protocol::limits::Limits;
use qmig_protocol::multifd::{MultifdDecoder, MultifdItem};
use qmig_protocol::profile::Profile;
use qmig_protocol::WireError;
use serde_json::Value;
use std::path::Path;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn every_multifd_recording_decodes_and_matches_manifest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    let mut conns = 0;
    let mut packets_total = 0;
    for (ver, profile) in [
        ("qemu-7.2", Profile::QEMU_7_2),
        ("qemu-10.0", Profile::QEMU_10),
    ] {
        let mut dirs: Vec<_> = std::fs::read_dir(root.join(ver))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let m: Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            for ch in m["channels"].as_array().unwrap() {
                let Some(list) = ch["multifd_channels"].as_array() else {
                    continue;
                };
                for mc in list {
                    let file = mc["file"].as_str().unwrap();
                    let ctx = format!("{}/{file}", dir.display());
                    let bytes = std::fs::read(dir.join(file)).unwrap();
                    let mut d = MultifdDecoder::new(profile, Limits::DEFAULT);
                    let mut pos = 0;
                    let mut re = Vec::new();
                    // Init packet.
                    let (item, used) = d.decode(&bytes).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let MultifdItem::Init(init) = item else {
                        panic!("{ctx}: {item:?}")
                    };
                    assert_eq!(used, 64);
                    let mi = &mc["init"];
                    assert_eq!(init.version.get() as u64, mi["version"].as_u64().unwrap());
                    assert_eq!(hex(&init.uuid), mi["uuid"].as_str().unwrap());
                    assert_eq!(init.id as u64, mi["channel_id"].as_u64().unwrap());
                    item.encode(&mut re);
                    pos += used;
                    let (mut pages, mut zeros, mut syncs) = (0u64, 0u64, 0u64);
                    for (i, e) in mc["packets"].as_array().unwrap().iter().enumerate() {
                        let ctx = format!("{ctx} packet {i}");
                        assert_eq!(d.offset(), e["offset"].as_u64().unwrap(), "{ctx}");
                        // A cut just before the end is Incomplete.
                        let len = e["length"].as_u64().unwrap() as usize;
                        assert!(matches!(
                            d.clone().decode(&bytes[pos..pos + len - 1]),
                            Err(WireError::Incomplete { .. })
                        ));
                        let (item, used) = d
                            .decode(&bytes[pos..])
                            .unwrap_or_else(|err| panic!("{ctx}: {err}"));
                        assert_eq!(used, len, "{ctx}: length");
                        let MultifdItem::Ram(p) = item else {
                            panic!("{ctx}: {item:?}")
                        };
                        let h = p.header;
                        assert_eq!(
                            h.packet_num.get(),
                            e["packet_num"].as_u64().unwrap(),
                            "{ctx}"
                        );
                        assert_eq!(p.flags() as u64, e["flags"].as_u64().unwrap(), "{ctx}");
                        assert_eq!(
                            h.pages_alloc.get() as u64,
                            e["pages_alloc"].as_u64().unwrap()
                        );
                        assert_eq!(p.normal_pages() as u64, e["normal_pages"].as_u64().unwrap());
                        assert_eq!(
                            h.next_packet_size.get() as u64,
                            e["next_packet_size"].as_u64().unwrap()
                        );
                        assert_eq!(p.ramblock(), e["ramblock"].as_str().unwrap().as_bytes());
                        assert_eq!(
                            p.zero_pages() as u64,
                            e["zero_pages"].as_u64().unwrap_or(0),
                            "{ctx}"
                        );
                        assert_eq!(p.pages(4096).count() as u32, p.normal_pages());
                        for off in p.normal_offsets().chain(p.zero_offsets()) {
                            assert_eq!(off % 4096, 0, "{ctx}: offset {off:#x}");
                        }
                        pages += p.normal_pages() as u64;
                        zeros += p.zero_pages() as u64;
                        syncs += p.is_sync() as u64;
                        item.encode(&mut re);
                        pos += used;
                        packets_total += 1;
                    }
                    assert_eq!(pos, bytes.len(), "{ctx}: decoded to the end");
                    assert_eq!(re, bytes, "{ctx}: re-encoding");
                    assert_eq!(pages, mc["total_pages"].as_u64().unwrap(), "{ctx}");
                    assert_eq!(zeros, mc["total_zero_pages"].as_u64().unwrap_or(0), "{ctx}");
                    assert_eq!(syncs, mc["sync_packets"].as_u64().unwrap(), "{ctx}");
                    conns += 1;
                }
            }
        }
    }
    assert_eq!(conns, 4);
    assert!(packets_total > 80);
}

#[test]
fn bad_magic_version_and_pages() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    let bytes = std::fs::read(root.join("qemu-10.0/precopy-multifd/multifd-conn1.bin")).unwrap();
    let rule = |b: &[u8]| {
        let mut d = MultifdDecoder::new(Profile::QEMU_10, Limits::DEFAULT);
        let e = d.decode(b).unwrap_err();
        let v = *e.violation().unwrap();
        (v.rule.id(), v.offset, v.value)
    };
    let mut b = bytes[..64].to_vec();
    b[0] = 0x22;
    assert_eq!(rule(&b), ("MFD-MAGIC", 0, 0x2222_3344));
    let mut b = bytes[..64].to_vec();
    b[7] = 2;
    assert_eq!(rule(&b), ("MFD-VERSION", 4, 2));
    // Second packet (offset 1408): pages_alloc 129 > 128.
    let mut b = bytes[1408..1408 + 1344].to_vec();
    b[12..16].copy_from_slice(&129u32.to_be_bytes());
    let mut d = MultifdDecoder::new(Profile::QEMU_10, Limits::DEFAULT);
    d.decode(&bytes).unwrap();
    d.decode(&bytes[64..]).unwrap();
    let v = *d.decode(&b).unwrap_err().violation().unwrap();
    assert_eq!(
        (v.rule.id(), v.offset, v.value),
        ("MFD-PAGES", 1408 + 12, 129)
    );
    // normal + zero > pages_alloc.
    let mut b = bytes[1408..1408 + 1344].to_vec();
    b[32..36].copy_from_slice(&113u32.to_be_bytes());
    let v = *d.decode(&b).unwrap_err().violation().unwrap();
    assert_eq!(
        (v.rule.id(), v.offset, v.value),
        ("MFD-PAGES", 1408 + 32, 113)
    );
}

/// The RAM of the multifd vectors agrees page by page with `final_ram` when rebuilt from the
/// main stream's RAM records plus the multifd packets' pages, round by round: a round ends at a
/// sync marker on the main channel (EOS in 7.2, MULTIFD_FLUSH in 10.x) and at a SYNC packet on
/// each multifd connection. A page's content is its last round's write; where a page was written
/// twice in that round (the order between connections is not recorded) one of the writes must
/// be the final content, and such pages must be few.
#[test]
fn multifd_vectors_rebuild_ram() {
    use qmig_protocol::ram::{decode_record, RamBody, RamChannel, RamCtx};
    use qmig_protocol::reader::Reader;
    use sha2::{Digest, Sha256};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    for (ver, p) in [
        ("qemu-7.2", Profile::QEMU_7_2),
        ("qemu-10.0", Profile::QEMU_10),
    ] {
        let dir = root.join(ver).join("precopy-multifd");
        let m: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let fr = &m["final_ram"];
        let block = fr["block"].as_str().unwrap().as_bytes();
        let len: usize = fr["bytes"].as_str().map_or_else(
            || fr["bytes"].as_u64().unwrap() as usize,
            |s| s.parse().unwrap(),
        );
        // (round, source: 0 main / 1 multifd, offset, page or zero)
        let mut events: Vec<(u32, u8, u64, Option<Vec<u8>>)> = Vec::new();
        let ch = &m["channels"][0];
        let bytes = std::fs::read(dir.join(ch["file"].as_str().unwrap())).unwrap();
        let limits = Limits::DEFAULT;
        let ctx = RamCtx::new(&p, &limits);
        let mut rch = RamChannel::new();
        let mut round = 0u32;
        for rec in ch["records"].as_array().unwrap() {
            if rec.get("ram").is_none() {
                continue;
            }
            let off = rec["offset"].as_u64().unwrap() as usize;
            let hdr = if rec["type"] == "SECTION_START" {
                17
            } else {
                5
            };
            let end = off + rec["length"].as_u64().unwrap() as usize - 5;
            let mut r = Reader::new(&bytes[off + hdr..end], 0);
            while r.remaining() > 0 {
                let x = decode_record(&mut r, &mut rch, &ctx).unwrap();
                match x.body {
                    RamBody::Eos if ver == "qemu-7.2" => round += 1,
                    RamBody::MultifdFlush => round += 1,
                    RamBody::Zero { .. } if x.block(&rch) == Some(block) => {
                        events.push((round, 0, x.addr, None))
                    }
                    RamBody::Page(d) if x.block(&rch) == Some(block) => {
                        events.push((round, 0, x.addr, Some(d.to_vec())))
                    }
                    _ => {}
                }
            }
        }
        for mc in ch["multifd_channels"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(mc["file"].as_str().unwrap())).unwrap();
            let mut d = MultifdDecoder::new(p, limits);
            let mut pos = 0;
            let mut round = 0u32;
            while pos < bytes.len() {
                let (item, used) = d.decode(&bytes[pos..]).unwrap();
                pos += used;
                let MultifdItem::Ram(pk) = item else { continue };
                if pk.ramblock() == block {
                    for (off, page) in pk.pages(4096) {
                        events.push((round, 1, off, Some(page.to_vec())));
                    }
                    for off in pk.zero_offsets() {
                        events.push((round, 1, off, None));
                    }
                }
                round += pk.is_sync() as u32;
            }
        }
        // Expected page hashes from the manifest.
        let zero_hash = fr["zero_page_sha256"].as_str().unwrap().to_string();
        let mut expect = vec![zero_hash; len / 4096];
        for e in fr["nonzero_pages"].as_array().unwrap() {
            expect[e[0].as_u64().unwrap() as usize] = e[1].as_str().unwrap().to_string();
        }
        // For every page, the writes of its last round; the order inside one round between
        // the main channel and the multifd connections is not recorded.
        let mut last: Vec<(u32, Vec<Option<&[u8]>>)> = vec![(0, Vec::new()); len / 4096];
        for (round, _, off, data) in &events {
            let slot = &mut last[(*off / 4096) as usize];
            if slot.1.is_empty() || *round > slot.0 {
                *slot = (*round, Vec::new());
            }
            slot.1.push(data.as_deref());
        }
        let zero = [0u8; 4096];
        let hash = |d: &[u8]| -> String {
            Sha256::digest(d)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let mut ambiguous = 0;
        for (i, (_, writes)) in last.iter().enumerate() {
            let hashes: Vec<String> = writes.iter().map(|w| hash(w.unwrap_or(&zero))).collect();
            match hashes.len() {
                0 => assert_eq!(expect[i], hash(&zero), "{ver}: page {i} never sent"),
                1 => assert_eq!(hashes[0], expect[i], "{ver}: page {i}"),
                _ => {
                    ambiguous += 1;
                    assert!(hashes.contains(&expect[i]), "{ver}: page {i}");
                }
            }
        }
        eprintln!(
            "{ver}: {} writes, {ambiguous} pages written twice in their last round",
            events.len()
        );
        assert!(
            ambiguous <= 8,
            "{ver}: {ambiguous} pages sent twice in one round"
        );
    }
}
