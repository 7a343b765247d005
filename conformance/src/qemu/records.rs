//! The decoded part of a capture's manifest: `channels[i].records` (every top-level record of a
//! main-channel recording, package contents nested under `package`, a cut stream ending with
//! `TRUNCATED`), `channels[i].summary`, `rp_messages`, `page_requests`, `vmdesc_devices` and the
//! vector-wide `mig_cmds_present` / `rp_msgs_present`, in the shape and with the offsets of the
//! shared `qemu-migration-vector/1` manifests (`/work/shared/vectors/README.md`), all decoded
//! with the protocol crate.
//!
//! [`annotate`] fills them into a manifest from the files next to it; the capture tool calls it
//! on every vector it writes, and `qmig-capture --annotate DIR` on existing folders.

use std::path::Path;

use qmig_protocol::command::Command;
use qmig_protocol::device::{decode_device, NodeKind};
use qmig_protocol::header::ConfigSubsection;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::WireError;
use serde_json::{json, Map, Value};

use super::pattern::{hex, sha256_hex, PAGE};

/// Device payloads up to this size carry `payload_hex`; command bodies up to this size carry
/// `data_hex` (the shared manifests leave them out of large records too).
const HEX_MAX: usize = 128;

/// Why a recording does not decode.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {what}")]
pub struct DecodeError {
    /// The file.
    pub file: String,
    /// What went wrong, with the offset.
    pub what: String,
}

/// One main-channel recording decoded into manifest records.
pub struct ChannelRecords {
    /// The top-level records (the last one `TRUNCATED` for a cut stream).
    pub records: Vec<Value>,
    /// Offset of the `TRUNCATED` record, if the stream is cut.
    pub truncated_at: Option<u64>,
    /// Device names of a trailing VM description.
    pub vmdesc_devices: Option<Vec<String>>,
    /// The decoder after the last whole item (a recovery channel continues from it).
    pub decoder: StreamDecoder,
}

/// Groups decoded items into records.
#[derive(Default)]
struct Recorder {
    top: Vec<Value>,
    package: Option<(Map<String, Value>, Vec<Value>)>,
    section: Option<Map<String, Value>>,
    ram: Option<Map<String, Value>>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
                        let name = text(s.name());
                        match s {
                            ConfigSubsection::Capabilities(caps) => json!({
                                "name": name, "version_id": 1,
                                "capabilities": caps.iter().map(text).collect::<Vec<_>>()
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
                    "offset": at, "type": "CONFIGURATION", "name": text(c.name),
                    "subsections": subs, "length": used
                }));
            }
            Item::Section(h) => {
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
                let info = d.current_section();
                let idstr = info.map(|i| text(i.idstr())).unwrap_or_default();
                m.insert("idstr".into(), json!(idstr));
                if let Some(i) = h.ident() {
                    m.insert("instance_id".into(), json!(i.instance_id));
                    m.insert("version_id".into(), json!(i.version_id));
                }
                self.ram = info.is_some_and(|i| i.is_ram).then(|| {
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
                let Some(r) = self.ram.as_mut() else { return };
                let mut bump = |k: &str| {
                    let n = r.get(k).and_then(Value::as_u64).unwrap_or(0);
                    r.insert(k.into(), json!(n + 1));
                };
                match rec.body {
                    RamBody::Zero { .. } => bump("zero"),
                    RamBody::Page(_) => bump("page"),
                    RamBody::Xbzrle(_) => bump("xbzrle"),
                    RamBody::Compressed(_) => bump("compress"),
                    RamBody::MultifdFlush => bump("multifd_flush"),
                    RamBody::Hook => bump("hook"),
                    RamBody::Eos => {
                        r.insert("eos".into(), json!(true));
                    }
                    RamBody::MemSize(list) => {
                        let blocks: Vec<Value> = list
                            .iter()
                            .map(|b| {
                                let mut o = Map::new();
                                o.insert("idstr".into(), json!(text(b.name)));
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
                }
            }
            Item::DeviceData(p) => {
                let Some(s) = self.section.as_mut() else {
                    return;
                };
                s.insert(
                    "delimited_by".into(),
                    json!(if desc.is_some() { "vmdesc" } else { "footer" }),
                );
                s.insert("payload_length".into(), json!(p.len()));
                s.insert("payload_sha256".into(), json!(sha256_hex(p)));
                if p.len() <= HEX_MAX {
                    s.insert("payload_hex".into(), json!(hex(p)));
                }
                let dev = desc
                    .zip(d.current_section())
                    .and_then(|(desc, info)| desc.device(info.idstr(), info.instance_id));
                if let Some(dev) = dev {
                    if let Ok(tree) = decode_device(dev, p, at, &Limits::DEFAULT) {
                        let seen: Vec<String> = tree
                            .nodes
                            .iter()
                            .filter(|n| n.kind == NodeKind::Subsection)
                            .map(|n| n.name.to_string())
                            .collect();
                        if !seen.is_empty() {
                            s.insert("subsections_seen".into(), json!(seen));
                        }
                    }
                }
            }
            Item::Footer { .. } => {
                let Some(mut s) = self.section.take() else {
                    return;
                };
                if let Some(r) = self.ram.take() {
                    s.insert("ram".into(), Value::Object(r));
                }
                let off = s["offset"].as_u64().unwrap_or(at);
                s.insert("length".into(), json!(at + used as u64 - off));
                self.push(Value::Object(s));
            }
            Item::Command(c) => {
                let mut m = Map::new();
                m.insert("offset".into(), json!(at));
                m.insert("type".into(), json!("COMMAND"));
                m.insert(
                    "cmd".into(),
                    json!(c.code().name().unwrap_or("MIG_CMD_UNKNOWN")),
                );
                m.insert("cmd_id".into(), json!(c.code().0));
                m.insert("data_length".into(), json!(c.payload_len()));
                let mut enc = Vec::new();
                c.encode(&mut enc);
                let body = enc.get(5..).unwrap_or_default();
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
                        m.insert("block".into(), json!(text(dd.name)));
                        let ranges: Vec<Value> = dd.ranges().map(|(s, l)| json!([s, l])).collect();
                        m.insert("ranges".into(), json!(ranges));
                    }
                    Command::RecvBitmap { name } => {
                        m.insert("block".into(), json!(text(name)));
                    }
                    Command::Packaged { len } => {
                        m.insert("package_length".into(), json!(len));
                        if !body.is_empty() && body.len() <= HEX_MAX {
                            m.insert("data_hex".into(), json!(hex(body)));
                        }
                        self.package = Some((m, Vec::new()));
                        return;
                    }
                    _ => {}
                }
                if !body.is_empty() && body.len() <= HEX_MAX {
                    m.insert("data_hex".into(), json!(hex(body)));
                }
                m.insert("length".into(), json!(used));
                self.push(Value::Object(m));
            }
            Item::PackageEnd => {
                if let Some((mut m, list)) = self.package.take() {
                    let off = m["offset"].as_u64().unwrap_or(at);
                    m.insert("package".into(), json!(list));
                    m.insert("length".into(), json!(at - off));
                    self.push(Value::Object(m));
                }
            }
            Item::Eof => self.push(json!({"offset": at, "type": "EOF"})),
            Item::VmDescription(j) => self.push(json!({
                "offset": at, "type": "VMDESCRIPTION", "length": used, "json_length": j.len()
            })),
        }
    }

    /// The record of a cut stream: where the incomplete (section-level) record starts.
    fn truncated(&mut self, at: u64, total: u64, detail: String) -> u64 {
        let (off, partial) = match self.section.take() {
            Some(s) => (s["offset"].as_u64().unwrap_or(at), self.ram.take()),
            None => (at, None),
        };
        let mut m = Map::new();
        m.insert("offset".into(), json!(off));
        m.insert("type".into(), json!("TRUNCATED"));
        m.insert("detail".into(), json!(detail));
        m.insert("bytes_left".into(), json!(total - off));
        if let Some(r) = partial {
            m.insert("partial_ram".into(), Value::Object(r));
        }
        self.push(Value::Object(m));
        off
    }
}

/// Decodes a main-channel recording with `dec` (a fresh decoder, or the previous channel's
/// `resume_from()`); `desc` delimits device payloads (and names their subsections) when given,
/// otherwise the footer scan does.
pub fn stream_records(
    file: &str,
    dec: StreamDecoder,
    bytes: &[u8],
    desc: Option<&VmDesc>,
) -> Result<ChannelRecords, DecodeError> {
    let mut d = dec;
    if let Some(desc) = desc {
        d.set_vmdesc(desc.clone());
    }
    let mut rec = Recorder::default();
    let mut pos = 0usize;
    let mut vmdesc_devices = None;
    let end = loop {
        let at = d.offset();
        if pos == bytes.len() && d.at_end() {
            break None;
        }
        match d.decode(&bytes[pos..]) {
            Ok((item, used)) => {
                if let Item::VmDescription(j) = &item {
                    vmdesc_devices = VmDesc::parse(j, 0, &Limits::DEFAULT)
                        .ok()
                        .map(|v| v.devices.iter().map(|x| x.name.clone()).collect());
                }
                rec.item(&d, at, used, &item, desc);
                pos += used;
            }
            Err(WireError::Incomplete { needed }) => break Some(needed),
            Err(WireError::Invalid(v)) => {
                return Err(DecodeError {
                    file: file.into(),
                    what: format!("{} at offset {} (value {})", v.rule.id(), v.offset, v.value),
                })
            }
        }
    };
    let truncated_at = end.map(|needed| {
        let left = bytes.len() - pos;
        let detail = if left == 0 {
            format!("input ends at offset {} before the stream's EOF", d.offset())
        } else {
            format!(
                "input ends inside the item at offset {}: at least {needed} more bytes needed, {left} present",
                d.offset()
            )
        };
        rec.truncated(d.offset(), d.offset() + left as u64, detail)
    });
    Ok(ChannelRecords {
        records: rec.top,
        truncated_at,
        vmdesc_devices,
        decoder: d,
    })
}

/// Decodes a return-path recording into `rp_messages` (offset, type, type_id, data_length,
/// length and the message's fields).
pub fn rp_messages(file: &str, bytes: &[u8], profile: Profile) -> Result<Vec<Value>, DecodeError> {
    let mut dec = RpDecoder::new(profile, Limits::DEFAULT);
    let unknown = |_: &[u8]| None;
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let at = dec.offset();
        let (msg, used) = dec
            .decode(&bytes[pos..], &unknown)
            .map_err(|e| DecodeError {
                file: file.into(),
                what: format!("return-path message at offset {at}: {e}"),
            })?;
        let mut m = Map::new();
        m.insert("offset".into(), json!(at));
        m.insert(
            "type".into(),
            json!(msg.ty().name().unwrap_or("MIG_RP_MSG_UNKNOWN")),
        );
        m.insert("type_id".into(), json!(msg.ty().0));
        m.insert(
            "data_length".into(),
            json!(u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]])),
        );
        match msg {
            RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
                m.insert("value".into(), json!(v));
            }
            RpMessage::ReqPagesId { start, len, name } => {
                m.insert("start".into(), json!(start));
                m.insert("len".into(), json!(len));
                m.insert("block".into(), json!(text(name)));
            }
            RpMessage::ReqPages { start, len } => {
                m.insert("start".into(), json!(start));
                m.insert("len".into(), json!(len));
            }
            RpMessage::RecvBitmap { name, bitmap } => {
                m.insert("block".into(), json!(text(name)));
                m.insert("bitmap_size".into(), json!(bitmap.len()));
                m.insert("bitmap_sha256".into(), json!(sha256_hex(bitmap)));
                let bits: u64 = bitmap.iter().map(|b| b.count_ones() as u64).sum();
                m.insert("bitmap_bits_set".into(), json!(bits));
            }
            _ => {}
        }
        m.insert("length".into(), json!(used));
        out.push(Value::Object(m));
        pos += used;
    }
    Ok(out)
}

/// The page requests among `rp_messages`, with their page number.
fn page_requests(msgs: &[Value]) -> Vec<Value> {
    msgs.iter()
        .filter(|m| {
            matches!(
                m["type"].as_str(),
                Some("MIG_RP_MSG_REQ_PAGES" | "MIG_RP_MSG_REQ_PAGES_ID")
            )
        })
        .map(|m| {
            let start = m["start"].as_u64().unwrap_or(0);
            json!({"type": m["type"], "start": start, "len": m["len"], "page": start / PAGE as u64})
        })
        .collect()
}

/// Names in first-appearance order, with their counts.
type Counts = Vec<(String, u64)>;

/// `commands`, `section_counts` and `rp_messages` counts of a channel (package contents count),
/// and the command and message names in the order they first appear.
fn summary(records: &[Value], rp: &[Value]) -> (Value, Counts, Counts) {
    fn walk(rs: &[Value], cmds: &mut Vec<(String, u64)>, secs: &mut Vec<(String, u64)>) {
        for r in rs {
            let ty = r["type"].as_str().unwrap_or("");
            if ty == "COMMAND" {
                bump(cmds, r["cmd"].as_str().unwrap_or(""));
            } else if ty.starts_with("SECTION_") {
                bump(secs, &format!("{ty} {}", r["idstr"].as_str().unwrap_or("")));
            }
            if let Some(p) = r["package"].as_array() {
                walk(p, cmds, secs);
            }
        }
    }
    let (mut cmds, mut secs, mut rps): (Counts, Counts, Counts) = Default::default();
    walk(records, &mut cmds, &mut secs);
    for m in rp {
        bump(&mut rps, m["type"].as_str().unwrap_or(""));
    }
    let obj = |v: &Counts| Value::Object(v.iter().map(|(k, n)| (k.clone(), json!(n))).collect());
    let mut s = json!({"commands": obj(&cmds), "section_counts": obj(&secs)});
    if !rp.is_empty() {
        s["rp_messages"] = obj(&rps);
    }
    (s, cmds, rps)
}

/// Counts `key` in an insertion-ordered list.
fn bump(list: &mut Vec<(String, u64)>, key: &str) {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some((_, n)) => *n += 1,
        None => list.push((key.to_string(), 1)),
    }
}

/// The profile of a manifest's QEMU (`qemu.version_string`, e.g. `QEMU emulator version 7.2.22
/// (…)`: 7.x is the 7.2 profile, anything later the 10 profile).
pub fn profile_of(manifest: &Value) -> Profile {
    let v = manifest["qemu"]["version_string"].as_str().unwrap_or("");
    let number = v.rsplit_once("version ").map_or(v, |(_, n)| n);
    if number.starts_with("7.") {
        Profile::QEMU_7_2
    } else {
        Profile::QEMU_10
    }
}

/// Fills the decoded fields into `manifest` from the files in `dir`: per channel `records`,
/// `summary`, `truncated_at` (offset of the `TRUNCATED` record, as in the shared manifests),
/// `rp_messages`, `page_requests`, `vmdesc_devices`; vector-wide `mig_cmds_present` and
/// `rp_msgs_present` (first-appearance order); a capture-tool manifest's
/// `capture.decoded_fields` note says where they come from. Returns the number of records and
/// messages.
pub fn annotate(manifest: &mut Value, dir: &Path) -> Result<(usize, usize), DecodeError> {
    let profile = profile_of(manifest);
    let read = |f: &str| {
        std::fs::read(dir.join(f)).map_err(|e| DecodeError {
            file: f.into(),
            what: e.to_string(),
        })
    };
    let desc = match dir.join("vmdesc.json").is_file() {
        true => {
            let j = read("vmdesc.json")?;
            Some(
                VmDesc::parse(&j, 0, &Limits::DEFAULT).map_err(|e| DecodeError {
                    file: "vmdesc.json".into(),
                    what: e.to_string(),
                })?,
            )
        }
        false => None,
    };
    let mut prev: Option<StreamDecoder> = None;
    let (mut cmds, mut rps): (Counts, Counts) = Default::default();
    let (mut n_rec, mut n_rp) = (0, 0);
    let Some(channels) = manifest["channels"].as_array_mut() else {
        return Ok((0, 0));
    };
    for ch in channels.iter_mut() {
        let Some(file) = ch["file"].as_str().map(str::to_owned) else {
            continue;
        };
        let bytes = read(&file)?;
        let dec = match (&prev, file.as_str()) {
            (Some(p), "resume-stream.bin") => p.resume_from(),
            _ => StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT),
        };
        let r = stream_records(&file, dec, &bytes, desc.as_ref())?;
        let rp = match ch["rp_file"].as_str().map(str::to_owned) {
            Some(f) => Some(rp_messages(&f, &read(&f)?, profile)?),
            None => None,
        };
        let (sum, c, m) = summary(&r.records, rp.as_deref().unwrap_or_default());
        for (k, _) in c {
            bump(&mut cmds, &k);
        }
        for (k, _) in m {
            bump(&mut rps, &k);
        }
        let o = ch.as_object_mut().expect("channel object");
        n_rec += r.records.len();
        o.insert("records".into(), json!(r.records));
        o.insert("summary".into(), sum);
        match r.truncated_at {
            Some(t) => o.insert("truncated_at".into(), json!(t)),
            None => o.remove("truncated_at"),
        };
        if let Some(rp) = rp {
            n_rp += rp.len();
            let pr = page_requests(&rp);
            o.insert("rp_messages".into(), json!(rp));
            if !pr.is_empty() {
                o.insert("page_requests".into(), json!(pr));
            }
        }
        if let Some(v) = r.vmdesc_devices {
            o.insert("vmdesc_devices".into(), json!(v));
        }
        prev = Some(r.decoder);
    }
    let names = |v: Counts| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    if manifest["capture"]["decoded_fields"].is_string() {
        manifest["capture"]["decoded_fields"] = json!(super::capture::DECODED_FIELDS);
    }
    let m = manifest.as_object_mut().expect("manifest object");
    m.insert("mig_cmds_present".into(), json!(names(cmds)));
    m.insert("rp_msgs_present".into(), json!(names(rps)));
    Ok((n_rec, n_rp))
}

/// Reads `dir/manifest.json`, [`annotate`]s it and writes it back (the recordings are not
/// touched). Returns the number of records and return-path messages.
pub fn annotate_dir(dir: &Path) -> Result<(usize, usize), DecodeError> {
    let path = dir.join("manifest.json");
    let err = |what: String| DecodeError {
        file: path.display().to_string(),
        what,
    };
    let text = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
    let mut m: Value = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    let n = annotate(&mut m, dir)?;
    let out = serde_json::to_string_pretty(&m).map_err(|e| err(e.to_string()))?;
    std::fs::write(&path, out + "\n").map_err(|e| err(e.to_string()))?;
    Ok(n)
}
