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
