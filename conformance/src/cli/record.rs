//! Grouping decoded items into records: one per header, configuration, whole section (header,
//! payload, footer), command, EOF and VM description, as the vectors' manifests list them.
//!
//! [`Recorder`] owns the grouping state (the open section, the open package) and turns the scan's
//! end into the final `TRUNCATED` or `INVALID` record. Page records (`--pages`) and device fields
//! (with a VM description) are attached here too.

use super::report::{BlockEntry, Field, MemSize, RamSummary, Record};
use super::scan::{Decoded, End};
use qmig_protocol::command::Command;
use qmig_protocol::device::{decode_device, Node, NodeKind};
use qmig_protocol::header::ConfigSubsection;
use qmig_protocol::limits::Limits;
use qmig_protocol::ram::RamBody;
use qmig_protocol::stream::Item;
use qmig_protocol::vmdesc::VmDesc;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Lowercase hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// sha256 of `b` in hex.
pub fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// Lossy text of a wire name.
pub fn name(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Groups items into records.
pub struct Recorder {
    channel: &'static str,
    vmdesc: Option<Arc<VmDesc>>,
    pages: bool,
    open: Option<Record>,
    package: Option<u64>,
    /// Device payloads (offset, bytes) of the records emitted, when asked to keep them.
    keep_payloads: bool,
    /// The payload of the open section.
    payload: Option<(u64, Vec<u8>)>,
}

/// A record and, for a device section when kept, its payload (offset, bytes).
pub type Emitted = (Record, Option<(u64, Vec<u8>)>);

impl Recorder {
    /// A recorder for `channel`; `vmdesc` decodes device fields; `pages` lists page records.
    pub fn new(channel: &'static str, vmdesc: Option<Arc<VmDesc>>, pages: bool) -> Self {
        Recorder {
            channel,
            vmdesc,
            pages,
            open: None,
            package: None,
            keep_payloads: false,
            payload: None,
        }
    }

    /// Also hand out each device section's payload bytes (for `diff`).
    pub fn keep_payloads(mut self) -> Self {
        self.keep_payloads = true;
        self
    }

    fn rec(&self, at: u64, ty: &str, len: usize) -> Record {
        let mut r = Record::new(self.channel, at, ty, len as u64);
        r.in_package = self.package;
        r
    }

    /// Feeds one decoded item; complete records go to `out`.
    pub fn item(&mut self, d: &Decoded<'_, '_>, out: &mut dyn FnMut(Emitted)) {
        let (at, len) = (d.at, d.len);
        match &d.item {
            Item::Header { version } => {
                let mut r = self.rec(at, "HEADER", len);
                r.version = Some(*version as u64);
                out((r, None));
            }
            Item::Configuration(c) => {
                let mut r = self.rec(at, "CONFIGURATION", len);
                r.name = Some(name(c.name));
                let mut subs = Vec::new();
                for s in c.subsections() {
                    subs.push(s.name().escape_ascii().to_string());
                    if let ConfigSubsection::Capabilities(caps) = s {
                        r.capabilities = Some(caps.iter().map(name).collect());
                    }
                }
                r.subsections = Some(subs);
                out((r, None));
            }
            Item::Section(h) => {
                let mut r = self.rec(at, h.section_type().name().unwrap_or("SECTION"), len);
                r.section_id = Some(h.section_id());
                if let Some(i) = h.ident() {
                    r.idstr = Some(name(i.idstr));
                    r.instance_id = Some(i.instance_id);
                    r.version_id = Some(i.version_id);
                } else if let Some(s) = d.dec.section(h.section_id()) {
                    r.idstr = Some(name(s.idstr()));
                }
                if d.dec.current_section().is_some_and(|s| s.is_ram) {
                    r.ram = Some(RamSummary::default());
                }
                self.open = Some(r);
            }
            Item::Ram(rec) => {
                let block = rec.block(d.dec.ram()).map(name);
                let Some(open) = self.open.as_mut() else {
                    return;
                };
                open.length += len as u64;
                let sum = open.ram.get_or_insert_with(RamSummary::default);
                let kind = match &rec.body {
                    RamBody::Zero { .. } => {
                        sum.zero += 1;
                        "ZERO"
                    }
                    RamBody::Page(_) => {
                        sum.page += 1;
                        "PAGE"
                    }
                    RamBody::Xbzrle(_) => {
                        sum.xbzrle += 1;
                        "XBZRLE"
                    }
                    RamBody::Compressed(_) => {
                        sum.compress += 1;
                        "COMPRESS_PAGE"
                    }
                    RamBody::MemSize(list) => {
                        sum.mem_size = Some(MemSize {
                            total: rec.addr,
                            blocks: list
                                .iter()
                                .map(|b| BlockEntry {
                                    idstr: name(b.name),
                                    used_length: b.used_length,
                                    page_size: b.page_size,
                                    mr_addr: b.mr_addr,
                                })
                                .collect(),
                        });
                        "MEM_SIZE"
                    }
                    RamBody::Eos => {
                        sum.eos = true;
                        "EOS"
                    }
                    RamBody::MultifdFlush => {
                        sum.multifd_flush += 1;
                        "MULTIFD_FLUSH"
                    }
                    RamBody::Hook => {
                        sum.hook += 1;
                        "HOOK"
                    }
                };
                if rec.is_page() {
                    if let Some(b) = &block {
                        *sum.blocks.entry(b.clone()).or_default() += 1;
                    }
                }
                if self.pages {
                    let section_at = open.offset;
                    let mut r = self.rec(at, "RAM", len);
                    r.in_section = Some(section_at);
                    r.flags = Some(kind.into());
                    r.addr = Some(rec.addr);
                    if rec.is_page() {
                        r.block = block;
                    }
                    out((r, None));
                }
            }
            Item::DeviceData(p) => {
                if let Some(open) = self.open.as_mut() {
                    open.length += len as u64;
                    open.payload_length = Some(p.len() as u64);
                    open.payload_sha256 = Some(sha256_hex(p));
                    if let (Some(desc), Some(s)) = (&self.vmdesc, d.dec.current_section()) {
                        if let Some(dev) = desc.device(s.idstr(), s.instance_id) {
                            if let Ok(tree) = decode_device(dev, p, at, &Limits::DEFAULT) {
                                let mut fields = Vec::new();
                                flatten(&tree.nodes, "", &mut fields);
                                open.fields = Some(fields);
                            }
                        }
                    }
                }
                if self.keep_payloads {
                    self.payload = Some((at, p.to_vec()));
                }
            }
            Item::Footer { .. } => {
                if let Some(mut open) = self.open.take() {
                    open.length += len as u64;
                    out((open, self.payload.take()));
                }
            }
            Item::Command(c) => {
                let mut r = self.rec(at, "COMMAND", len);
                let code = c.code();
                r.cmd = Some(code.name().unwrap_or("MIG_CMD_UNKNOWN").to_string());
                r.cmd_id = Some(code.0);
                r.data_length = Some(c.payload_len() as u64);
                match c {
                    Command::Ping(v) => r.value = Some(*v as u64),
                    Command::PostcopyAdvise(Some(a)) => {
                        r.ram_pagesize_summary = Some(a.ram_pagesize_summary);
                        r.target_page_size = Some(a.target_page_size);
                    }
                    Command::RamDiscard(dc) => {
                        r.version = Some(0);
                        r.block = Some(name(dc.name));
                        r.ranges = Some(dc.ranges().map(|(a, b)| [a, b]).collect());
                    }
                    Command::Packaged { len } => r.package_length = Some(*len as u64),
                    Command::RecvBitmap { name: n } => r.block = Some(name(n)),
                    _ => {}
                }
                let is_package = matches!(c, Command::Packaged { .. });
                out((r, None));
                if is_package {
                    self.package = Some(at);
                }
            }
            Item::PackageEnd => self.package = None,
            Item::Eof => out((self.rec(at, "EOF", len), None)),
            Item::VmDescription(j) => {
                let mut r = self.rec(at, "VMDESCRIPTION", len);
                r.json_length = Some(j.len() as u64);
                out((r, None));
            }
        }
    }

    /// The final record for how the scan ended (`TRUNCATED` or `INVALID`), if not complete.
    pub fn finish(&mut self, end: &End) -> Option<Record> {
        match *end {
            End::Complete { .. } => None,
            End::Truncated {
                at,
                left,
                needed,
                total,
            } => {
                let open = self.open.take();
                let start = open.as_ref().map_or(at, |o| o.offset);
                let mut r = Record::new(self.channel, start, "TRUNCATED", 0);
                r.in_package = self.package;
                r.bytes_left = Some(total - start);
                r.detail = Some(if left == 0 {
                    format!("input ends at offset {at} before the stream's EOF")
                } else {
                    format!(
                        "input ends inside the item at offset {at}: at least {needed} more bytes needed, {left} present"
                    )
                });
                r.rule = Some(super::TRUNCATED_RULE.into());
                r.partial_ram = open.and_then(|o| o.ram);
                Some(r)
            }
            End::Invalid(v) => {
                let mut r = Record::new(self.channel, v.offset, "INVALID", 0);
                r.rule = Some(v.rule.id().into());
                r.detail = Some(format!("{} (value {})", v.rule.summary(), v.value));
                Some(r)
            }
        }
    }
}

/// Appends the leaves of a decoded device tree as fields with dotted paths.
pub fn flatten(nodes: &[Node<'_, '_>], prefix: &str, out: &mut Vec<Field>) {
    for n in nodes {
        let path = if prefix.is_empty() {
            n.name.to_string()
        } else {
            format!("{prefix}.{}", n.name)
        };
        match n.kind {
            NodeKind::Leaf | NodeKind::Null => {
                let mut h = hex(&n.bytes[..n.bytes.len().min(64)]);
                if n.bytes.len() > 64 {
                    h.push_str("...");
                }
                out.push(Field {
                    path,
                    ty: n.ty.to_string(),
                    offset: n.offset,
                    size: n.bytes.len() as u64,
                    hex: h,
                    value: n.as_u64(),
                });
            }
            NodeKind::Array => {
                for (i, c) in n.children.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    if matches!(c.kind, NodeKind::Leaf | NodeKind::Null) {
                        let mut one = Vec::new();
                        flatten(std::slice::from_ref(c), "", &mut one);
                        for mut f in one {
                            f.path = p.clone();
                            out.push(f);
                        }
                    } else {
                        flatten(&c.children, &p, out);
                    }
                }
            }
            NodeKind::Struct | NodeKind::Subsection => flatten(&n.children, &path, out),
        }
    }
}
