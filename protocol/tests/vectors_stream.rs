//! Every main-channel recording under `conformance/vectors/` (`stream.bin`,
//! `resume-stream.bin`) decodes with `StreamDecoder` to its end (a cut stream: to exactly the
//! manifest's `TRUNCATED` record, with `Incomplete` there); the decoded items, grouped into
//! records, equal the manifest's `records` (offsets, lengths, section identity, command fields,
//! discard ranges, package nesting, RAM counts and MEM_SIZE blocks, device payload length and
//! sha256); and re-encoding every item gives the identical bytes. Each stream is decoded twice:
//! with device payloads delimited by the footer scan, and by the VM description (the trailing
//! one of a precopy stream, or the vector's `vmdesc.json`). The device decoder is checked on the
//! postcopy vectors' device sections.

mod common;

use common::{hex, vectors, VectorDir};
use qmig_protocol::command::Command;
use qmig_protocol::device::{decode_device, NodeKind};
use qmig_protocol::header::ConfigSubsection;
use qmig_protocol::limits::Limits;
use qmig_protocol::ram::RamBody;
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::WireError;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Builds manifest-shaped records from items.
#[derive(Default)]
struct Recorder {
    top: Vec<Value>,
    package: Option<(Map<String, Value>, Vec<Value>)>,
    section: Option<Map<String, Value>>,
    ram: Option<Map<String, Value>>,
    subsections_seen: Vec<String>,
}

impl Recorder {
    fn push(&mut self, v: Value) {
        match &mut self.package {
            Some((_, list)) => list.push(v),
            None => self.top.push(v),
        }
    }

    fn item(
        &mut self,
        d: &StreamDecoder,
        at: u64,
        used: usize,
        item: &Item<'_>,
        desc: Option<&VmDesc>,
    ) {
        match item {
            Item::Header { version } => self.push(json!({
                "offset": at, "type": "HEADER", "magic": "0x5145564d", "version": version
            })),
            Item::Configuration(c) => {
                let subs: Vec<Value> = c
                    .subsections()
                    .map(|s| {
                        let name = String::from_utf8_lossy(s.name()).into_owned();
                        match s {
                            ConfigSubsection::Capabilities(caps) => json!({
                                "name": name, "version_id": 1,
                                "capabilities": caps.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>()
                            }),
                            ConfigSubsection::Uuid(u) => {
                                json!({"name": name, "version_id": 1, "uuid": hex(&u[..])})
                            }
                            ConfigSubsection::TargetPageBits(b) => {
                                json!({"name": name, "version_id": 1, "target_page_bits": b})
                            }
                        }
                    })
                    .collect();
                self.push(json!({
                    "offset": at, "type": "CONFIGURATION", "name": String::from_utf8_lossy(c.name),
                    "subsections": subs, "length": used
                }));
            }
            Item::Section(h) => {
                let info = d.current_section().expect("section bound");
                let mut m = Map::new();
                m.insert("offset".into(), json!(at));
                let ty = match h {
                    SectionHeader::Start(_) => "SECTION_START",
                    SectionHeader::Full(_) => "SECTION_FULL",
                    SectionHeader::Part { .. } => "SECTION_PART",
                    SectionHeader::End { .. } => "SECTION_END",
                };
                m.insert("type".into(), json!(ty));
                m.insert("section_id".into(), json!(h.section_id()));
                m.insert("idstr".into(), json!(String::from_utf8_lossy(info.idstr())));
                if let Some(i) = h.ident() {
                    m.insert("instance_id".into(), json!(i.instance_id));
                    m.insert("version_id".into(), json!(i.version_id));
                }
                self.ram = info.is_ram.then(|| {
                    let mut r = Map::new();
                    for k in ["zero", "page", "xbzrle", "compress"] {
                        r.insert(k.into(), json!(0));
                    }
                    r.insert("eos".into(), json!(false));
                    r
                });
                self.section = Some(m);
            }
            Item::Ram(rec) => {
                let r = self.ram.as_mut().expect("ram section open");
                let bump = |r: &mut Map<String, Value>, k: &str| {
                    let n = r.get(k).and_then(Value::as_u64).unwrap_or(0);
                    r.insert(k.into(), json!(n + 1));
                };
                match rec.body {
                    RamBody::Zero { .. } => bump(r, "zero"),
                    RamBody::Page(_) => bump(r, "page"),
                    RamBody::Xbzrle(_) => bump(r, "xbzrle"),
                    RamBody::Compressed(_) => bump(r, "compress"),
                    RamBody::MultifdFlush => bump(r, "multifd_flush"),
                    RamBody::Eos => {
                        r.insert("eos".into(), json!(true));
                    }
                    RamBody::MemSize(list) => {
                        let blocks: Vec<Value> = list
                            .iter()
                            .map(|b| {
                                let mut o = Map::new();
                                o.insert("idstr".into(), json!(String::from_utf8_lossy(b.name)));
                                o.insert("used_length".into(), json!(b.used_length));
                                if let Some(p) = b.page_size {
                                    o.insert("page_size".into(), json!(p));
                                }
                                if let Some(a) = b.mr_addr {
                                    o.insert("mr_addr".into(), json!(a));
                                }
                                Value::Object(o)
                            })
                            .collect();
                        r.insert(
                            "mem_size".into(),
                            json!({"total": rec.addr, "blocks": blocks}),
                        );
                    }
                    RamBody::Hook => panic!("HOOK decoded"),
                }
            }
            Item::DeviceData(p) => {
                let s = self.section.as_mut().expect("device section open");
                s.insert("payload_length".into(), json!(p.len()));
                s.insert("payload_sha256".into(), json!(hex(&Sha256::digest(p))));
                s.insert("payload_hex".into(), json!(hex(p)));
                if let Some(desc) = desc {
                    let info = d.current_section().unwrap();
                    if let Some(dev) = desc.device(info.idstr(), info.instance_id) {
                        let tree = decode_device(dev, p, at, &Limits::DEFAULT)
                            .unwrap_or_else(|e| panic!("device {:?}: {e}", dev.name));
                        let seen: Vec<String> = tree
                            .nodes
                            .iter()
                            .filter(|n| n.kind == NodeKind::Subsection)
                            .map(|n| n.name.to_string())
                            .collect();
                        if !seen.is_empty() {
                            s.insert("subsections_seen".into(), json!(seen));
                        }
                        self.subsections_seen.extend(seen);
                    }
                }
            }
            Item::Footer { .. } => {
                let mut s = self.section.take().expect("section open");
                if let Some(r) = self.ram.take() {
                    s.insert("ram".into(), Value::Object(r));
                }
                let off = s["offset"].as_u64().unwrap();
                s.insert("length".into(), json!(at + used as u64 - off));
                self.push(Value::Object(s));
            }
            Item::Command(c) => {
                let mut m = Map::new();
                m.insert("offset".into(), json!(at));
                m.insert("type".into(), json!("COMMAND"));
                m.insert("cmd".into(), json!(c.code().name().unwrap()));
                m.insert("cmd_id".into(), json!(c.code().0));
                m.insert("data_length".into(), json!(c.payload_len()));
                m.insert("length".into(), json!(used));
                let mut enc = Vec::new();
                c.encode(&mut enc);
                m.insert("data_hex".into(), json!(hex(&enc[5..])));
                match c {
                    Command::Ping(v) => {
                        m.insert("value".into(), json!(v));
                    }
                    Command::PostcopyAdvise(Some(a)) => {
                        m.insert("ram_pagesize_summary".into(), json!(a.ram_pagesize_summary));
                        m.insert("target_page_size".into(), json!(a.target_page_size));
                    }
                    Command::RamDiscard(dd) => {
                        m.insert("version".into(), json!(0));
                        m.insert("block".into(), json!(String::from_utf8_lossy(dd.name)));
                        let ranges: Vec<Value> = dd.ranges().map(|(s, l)| json!([s, l])).collect();
                        m.insert("ranges".into(), json!(ranges));
                    }
                    Command::RecvBitmap { name } => {
                        m.insert("block".into(), json!(String::from_utf8_lossy(name)));
                    }
                    Command::Packaged { len } => {
                        m.insert("package_length".into(), json!(len));
                        assert!(self.package.is_none(), "nested package decoded");
                        self.package = Some((m, Vec::new()));
                        return;
                    }
                    _ => {}
                }
                self.push(Value::Object(m));
            }
            Item::PackageEnd => {
                let (mut m, list) = self.package.take().expect("package open");
                let off = m["offset"].as_u64().unwrap();
                m.insert("package".into(), json!(list));
                m.insert("length".into(), json!(at - off));
                self.push(Value::Object(m));
            }
            Item::Eof => self.push(json!({"offset": at, "type": "EOF"})),
            Item::VmDescription(j) => self.push(json!({
                "offset": at, "type": "VMDESCRIPTION", "length": used, "json_length": j.len()
            })),
        }
    }

    /// The record of a cut stream: where the incomplete (section-level) record starts.
    fn truncated(&mut self, at: u64) {
        let (off, partial) = match self.section.take() {
            Some(s) => (s["offset"].as_u64().unwrap(), self.ram.take()),
            None => (at, None),
        };
        let mut m = Map::new();
        m.insert("offset".into(), json!(off));
        m.insert("type".into(), json!("TRUNCATED"));
        if let Some(r) = partial {
            m.insert("partial_ram".into(), Value::Object(r));
        }
        self.push(Value::Object(m));
    }
}

/// Keys of manifest records that describe the capture tool's cross-checks, not wire content.
const NOT_WIRE: &[&str] = &[
    "delimited_by",
    "footer_scan_agrees",
    "vmdesc_length_ok",
    "footer_pattern_inside_payload",
    "detail",
    "bytes_left",
];
/// Keys the manifest carries only for some records; compared where present.
const WHERE_PRESENT: &[&str] = &["payload_hex", "data_hex", "subsections_seen", "partial_ram"];

fn compare(ctx: &str, got: &[Value], want: &[Value], with_desc: bool) {
    assert_eq!(
        got.len(),
        want.len(),
        "{ctx}: record count; last got {:?}",
        got.last()
            .map(|v| v.to_string().chars().take(300).collect::<String>())
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ctx = format!("{ctx} record {i} @{}", w["offset"]);
        let (g, w) = (g.as_object().unwrap(), w.as_object().unwrap());
        for (k, wv) in w {
            if NOT_WIRE.contains(&k.as_str()) {
                continue;
            }
            if k == "subsections_seen" && !with_desc {
                continue;
            }
            let Some(gv) = g.get(k) else {
                panic!("{ctx}: key {k} missing, want {wv}")
            };
            if k == "package" {
                compare(
                    &ctx,
                    gv.as_array().unwrap(),
                    wv.as_array().unwrap(),
                    with_desc,
                );
            } else {
                assert_eq!(gv, wv, "{ctx}: key {k}");
            }
        }
        for k in g.keys() {
            if !WHERE_PRESENT.contains(&k.as_str()) {
                assert!(w.contains_key(k), "{ctx}: extra key {k} = {}", g[k]);
            }
        }
    }
}

/// A record without the device decoder's `subsections_seen` (absent from the scan pass).
fn without_seen(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("subsections_seen");
        if let Some(Value::Array(p)) = o.get_mut("package") {
            for x in p.iter_mut() {
                *x = without_seen(x);
            }
        }
    }
    v
}

struct Outcome {
    decoder: StreamDecoder,
    records: Vec<Value>,
    consumed: usize,
    items: usize,
    vmdesc_json: Option<Vec<u8>>,
    subsections_seen: Vec<String>,
}

/// Decodes `bytes` to the end with `d`; checks the re-encoding on the way.
fn run(ctx: &str, mut d: StreamDecoder, bytes: &[u8], desc: Option<&VmDesc>) -> Outcome {
    let mut rec = Recorder::default();
    let mut re = Vec::with_capacity(bytes.len());
    let mut pos = 0usize;
    let mut items = 0;
    let mut vmdesc_json = None;
    loop {
        let at = d.offset();
        assert_eq!(at, pos as u64, "{ctx}: offset");
        match d.decode(&bytes[pos..]) {
            Ok((item, used)) => {
                item.encode(&mut re);
                assert_eq!(
                    re.len(),
                    pos + used,
                    "{ctx}: re-encoded length at {at} {item:?}"
                );
                if let Item::VmDescription(j) = item {
                    vmdesc_json = Some(j.to_vec());
                }
                rec.item(&d, at, used, &item, desc);
                pos += used;
                items += 1;
            }
            Err(WireError::Incomplete { .. }) => break,
            Err(e) => panic!("{ctx}: {e}"),
        }
    }
    assert!(re == bytes[..pos], "{ctx}: re-encoding differs");
    if pos < bytes.len() || !d.at_end() {
        rec.truncated(pos as u64);
    }
    Outcome {
        decoder: d,
        records: rec.top,
        consumed: pos,
        items,
        vmdesc_json,
        subsections_seen: rec.subsections_seen,
    }
}

fn check_vector(v: &VectorDir, summary: &mut Vec<String>) {
    let profile = v.profile();
    let vmdesc_file = v.has("vmdesc.json").then(|| v.read("vmdesc.json"));
    let mut initial: Option<(StreamDecoder, StreamDecoder)> = None;
    for ch in v.channels() {
        let file = ch["file"].as_str().unwrap();
        let ctx = format!("{}/{file}", v.id());
        let bytes = v.read(file);
        // Captures of the project's own tool carry no decoded records (yet): those are checked
        // for decoding to the end and re-encoding only.
        let want = ch["records"].as_array();
        let (scan_dec, desc_dec) = match file {
            "stream.bin" => {
                let d = StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT);
                (d.clone(), d)
            }
            "resume-stream.bin" => {
                let (a, b) = initial.as_ref().expect("initial channel first");
                (a.resume_from(), b.resume_from())
            }
            other => panic!("{ctx}: unexpected main-channel file {other}"),
        };
        // Pass 1: footer scan.
        let a = run(&format!("{ctx} [scan]"), scan_dec, &bytes, None);
        if let Some(want) = want {
            compare(&format!("{ctx} [scan]"), &a.records, want, false);
        }
        // Pass 2: the VM description delimits device payloads.
        let json = vmdesc_file.clone().or(a.vmdesc_json.clone());
        let desc = json.as_ref().map(|j| {
            VmDesc::parse(j, 0, &Limits::DEFAULT).unwrap_or_else(|e| panic!("{ctx}: {e}"))
        });
        let mut desc_dec = desc_dec;
        if let Some(desc) = &desc {
            desc_dec.set_vmdesc(desc.clone());
        }
        let b = run(&format!("{ctx} [vmdesc]"), desc_dec, &bytes, desc.as_ref());
        if let Some(want) = want {
            compare(&format!("{ctx} [vmdesc]"), &b.records, want, desc.is_some());
        }
        assert_eq!(a.consumed, b.consumed);
        assert_eq!(
            a.records,
            b.records.iter().map(without_seen).collect::<Vec<_>>()
        );
        // Where the decoding stopped.
        let trunc = match want {
            Some(w) => w.iter().find(|r| r["type"] == "TRUNCATED").cloned(),
            None => a
                .records
                .last()
                .filter(|r| r["type"] == "TRUNCATED")
                .cloned(),
        };
        if want.is_none() {
            // A cut capture says where it was cut; a complete one must not end in a cut.
            let label = &ch["label"];
            let cut = ch.get("truncated_at").is_some()
                || v.manifest["replay"]["channels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| &r["label"] == label && r["ends_mid_stream"] == true);
            assert_eq!(trunc.is_some(), cut, "{ctx}");
        }
        match &trunc {
            None => {
                assert_eq!(a.consumed, bytes.len(), "{ctx}: not decoded to the end");
                assert!(a.decoder.at_end(), "{ctx}: no EOF");
            }
            Some(t) => {
                let t_off = t["offset"].as_u64().unwrap() as usize;
                assert!(a.consumed >= t_off && a.consumed <= bytes.len(), "{ctx}");
                // Nothing complete beyond the cut: the rest is one incomplete RAM record.
                let mut d = a.decoder.clone();
                assert!(matches!(
                    d.decode(&bytes[a.consumed..]),
                    Err(WireError::Incomplete { .. })
                ));
                assert!(matches!(
                    d.decode_final(&bytes[a.consumed..]),
                    Err(WireError::Incomplete { .. })
                ));
            }
        }
        summary.push(format!(
            "{ctx}: {} items, {} bytes, {} records{}{}",
            a.items,
            a.consumed,
            a.records.len(),
            if trunc.is_some() { " (cut)" } else { "" },
            if b.subsections_seen.is_empty() {
                String::new()
            } else {
                format!(", subsections {:?}", b.subsections_seen)
            }
        ));
        if file == "stream.bin" {
            initial = Some((a.decoder, b.decoder));
        }
    }
}

// Every vector passes these checks (valid cases):
// valid: HDR-MAGIC HDR-VERSION CFG-PRESENT CFG-NAME-LEN CFG-SUBSECTION CFG-CAPS-COUNT
// valid: CFG-CAP-NAME STR8-EMPTY SEC-TYPE SEC-UNKNOWN-ID SEC-DUPLICATE-ID SEC-FOOTER
// valid: SEC-FOOTER-ID SEC-DELIMIT SEC-DEVICE-LEN VMDESC-PLACE VMDESC-LEN VMDESC-JSON
// valid: EOF-TRAILING CMD-UNKNOWN CMD-LEN CMD-ADVISE-LEN CMD-DISCARD-LEN CMD-DISCARD-VERSION
// valid: CMD-DISCARD-TERM CMD-PACKAGED-LEN CMD-PACKAGED-CONTENT CMD-RECV-BITMAP-LEN
// valid: RAM-VERSION RAM-MEMSIZE-PLACE RAM-BLOCK-UNKNOWN RAM-OFFSET RAM-EOS
// valid: DEV-SCHEMA DEV-SUBSECTION DEV-NESTING
#[test]
fn every_main_channel_vector_decodes_matches_manifest_and_reencodes() {
    let mut summary = Vec::new();
    let all = vectors();
    assert!(all.len() >= 31, "vectors missing: {}", all.len());
    for v in &all {
        check_vector(v, &mut summary);
    }
    for s in &summary {
        eprintln!("{s}");
    }
    let files: usize = all.iter().map(|v| v.channels().len()).sum();
    assert_eq!(summary.len(), files);
}

/// Checks that a node's bytes are exactly its children's bytes (plus a subsection's header).
fn sizes_add_up(n: &qmig_protocol::device::Node<'_, '_>) {
    match n.kind {
        NodeKind::Leaf | NodeKind::Null => assert!(n.children.is_empty()),
        NodeKind::Array | NodeKind::Struct | NodeKind::Subsection => {
            let header = if n.kind == NodeKind::Subsection {
                1 + 1 + n.name.len() + 4
            } else {
                0
            };
            let sum: usize = n.children.iter().map(|c| c.bytes.len()).sum();
            assert_eq!(header + sum, n.bytes.len(), "{}", n.name);
            let mut at = n.offset + header as u64;
            for c in &n.children {
                assert_eq!(c.offset, at, "{} / {}", n.name, c.name);
                at += c.bytes.len() as u64;
                sizes_add_up(c);
            }
        }
    }
}

/// The device decoder against `vmdesc.json` on every postcopy vector's device sections (inside
/// the PACKAGED blob): the trees use each payload exactly, sizes add up at every level, and
/// globalstate's runstate reads as the manifest's machine implies.
#[test]
fn device_decoder_on_postcopy_device_sections() {
    let mut devices = 0;
    let mut checked_runstate = 0;
    for v in vectors().iter().filter(|v| v.has("vmdesc.json")) {
        let desc = VmDesc::parse(&v.read("vmdesc.json"), 0, &Limits::DEFAULT).unwrap();
        let bytes = v.read("stream.bin");
        // 10.x describes the configuration section too: its bytes after 0x07 decode with it.
        if let Some(cfg) = &desc.configuration {
            assert_eq!(cfg.vmsd_name, "configuration");
            let cfg_dev = qmig_protocol::vmdesc::Device {
                name: "configuration".into(),
                instance_id: 0,
                vmsd_name: cfg.vmsd_name.clone(),
                version: cfg.version,
                fields: cfg.fields.clone(),
                subsections: cfg.subsections.clone(),
            };
            let len = u32::from_be_bytes(bytes[9..13].try_into().unwrap()) as usize;
            let tree = decode_device(&cfg_dev, &bytes[9..13 + len], 9, &Limits::DEFAULT).unwrap();
            assert_eq!(tree.get("len").unwrap().as_u64(), Some(len as u64));
            let machine = v.manifest["machine"]["type"].as_str().unwrap();
            assert_eq!(tree.get("name").unwrap().bytes, machine.as_bytes());
        }
        let mut d = StreamDecoder::new(Channel::Main, v.profile(), Limits::DEFAULT);
        d.set_vmdesc(desc.clone());
        let mut pos = 0;
        let mut in_package = false;
        while let Ok((item, used)) = d.decode(&bytes[pos..]) {
            let at = d.offset() - used as u64;
            match item {
                Item::Command(Command::Packaged { .. }) => in_package = true,
                Item::PackageEnd => in_package = false,
                Item::DeviceData(p) => {
                    assert!(in_package, "{}: device section outside the package", v.id());
                    let info = d.current_section().unwrap();
                    let dev = desc.device(info.idstr(), info.instance_id).unwrap();
                    let tree = decode_device(dev, p, at, &Limits::DEFAULT).unwrap();
                    assert_eq!(
                        tree.nodes.iter().map(|n| n.bytes.len()).sum::<usize>(),
                        p.len()
                    );
                    let mut off = at;
                    for n in &tree.nodes {
                        assert_eq!(n.offset, off);
                        off += n.bytes.len() as u64;
                        sizes_add_up(n);
                    }
                    devices += 1;
                    if info.idstr() == b"globalstate" {
                        let size = tree.get("size").unwrap().as_u64().unwrap() as usize;
                        let rs = tree.get("runstate").unwrap().bytes;
                        let text = &rs[..rs.iter().position(|&b| b == 0).unwrap()];
                        assert_eq!(size, text.len() + 1, "{}", v.id());
                        let machine = v.manifest["machine"]["type"].as_str().unwrap();
                        let want: &[u8] = if machine == "microvm" {
                            b"prelaunch"
                        } else {
                            b"running"
                        };
                        assert_eq!(text, want, "{}", v.id());
                        if v.version == "qemu-10.0" {
                            assert_eq!(tree.get("has_vm_was_suspended").unwrap().as_u64(), Some(1));
                        }
                        checked_runstate += 1;
                    }
                }
                _ => {}
            }
            pos += used;
        }
        assert!(d.at_end() || pos + 100_000 > bytes.len(), "{}", v.id());
    }
    // 7.2: 4 postcopy vectors x 6 devices; 10.0: 4 microvm vectors x 14, none-nocpu x 2;
    // qemu-10.0-qmig (the suite's own captures): 2 microvm vectors x 14, none-nocpu x 2.
    assert_eq!(devices, 4 * 6 + 4 * 14 + 2 + 2 * 14 + 2);
    assert_eq!(checked_runstate, 9 + 3);
}
