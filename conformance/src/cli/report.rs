//! The versioned output shapes of `qmig inspect` (`--json`), and their one-line text form.
//!
//! This module owns `qmig-inspect/1`: a [`Header`] line, then one [`Record`] per line. The
//! shapes are documented in `conformance/docs/inspect-json.md` and checked against
//! `conformance/docs/inspect.schema.json` by the tests. New optional keys may be added within
//! version 1; renaming or removing one bumps the version.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The format tag of the first JSON line.
pub const FORMAT: &str = "qmig-inspect/1";

/// The first line of `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: &'static str,
    /// The input (`-` for stdin).
    pub file: String,
    /// `main` or `resume` (the kind of the input channel).
    pub channel: &'static str,
    /// `7.2` or `10`.
    pub profile: &'static str,
    /// `option` (`--profile`), `detected` (by content, see the docs) or `default`.
    pub profile_source: &'static str,
    /// Where device layouts come from: `trailing`, `file` or `none`.
    pub vmdesc: &'static str,
}

/// A RAM block as announced by MEM_SIZE.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BlockEntry {
    /// Block idstr.
    pub idstr: String,
    /// Used length in bytes.
    pub used_length: u64,
    /// Page size, when the entry carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Region address (x-ignore-shared), when the entry carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mr_addr: Option<u64>,
}

/// MEM_SIZE: the total and the block list.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemSize {
    /// Total bytes (the record's offset field).
    pub total: u64,
    /// Blocks in wire order.
    pub blocks: Vec<BlockEntry>,
}

/// Counts of the RAM records of one `ram` section payload.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RamSummary {
    /// ZERO records.
    pub zero: u64,
    /// PAGE records.
    pub page: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// COMPRESS_PAGE records.
    pub compress: u64,
    /// MULTIFD_FLUSH records.
    pub multifd_flush: u64,
    /// HOOK records.
    pub hook: u64,
    /// Whether the payload ended with EOS.
    pub eos: bool,
    /// MEM_SIZE, if the section carried it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_size: Option<MemSize>,
    /// Page records (ZERO/PAGE/XBZRLE/COMPRESS) per block.
    pub blocks: BTreeMap<String, u64>,
}

/// One decoded device field (a leaf of the VM description tree).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Field {
    /// Dotted path: `field`, `array[3]`, `struct.field`, `sub/name.field`.
    pub path: String,
    /// VMState type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Absolute channel offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// The bytes in hex (at most 64 bytes shown, then `...`).
    pub hex: String,
    /// Big-endian value of a 1/2/4/8-byte field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
}

/// One record: a top-level item of a channel (header, configuration, a whole section, a
/// command, EOF, VM description), a nested record of a package, a page record (`--pages`), a
/// return-path message, or the final `TRUNCATED` / `INVALID` line.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Record {
    /// `main`, `resume`, `rp` or `multifd`.
    pub channel: &'static str,
    /// Absolute channel offset of the record's first byte.
    pub offset: u64,
    /// Record type: `HEADER`, `CONFIGURATION`, `SECTION_START`/`PART`/`END`/`FULL`, `COMMAND`,
    /// `EOF`, `VMDESCRIPTION`, `RAM` (a page record), `MIG_RP_MSG_*`, `MULTIFD_INIT`,
    /// `MULTIFD_PACKET`, `MULTIFD_DEVICE_STATE`, `TRUNCATED`,
    /// `INVALID`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Bytes on the wire (header, payload and footer for a section).
    pub length: u64,
    /// For records inside a PACKAGED blob: the offset of the PACKAGED command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_package: Option<u64>,
    /// For page records: the offset of their section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_section: Option<u64>,
    /// HEADER: stream version; DISCARD: body version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// CONFIGURATION: machine name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// CONFIGURATION: subsection names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subsections: Option<Vec<String>>,
    /// CONFIGURATION: capability names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Sections: id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_id: Option<u32>,
    /// Sections: idstr.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idstr: Option<String>,
    /// START/FULL: instance id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<u32>,
    /// START/FULL: version id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<u32>,
    /// RAM sections: counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamSummary>,
    /// Device sections: payload length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_length: Option<u64>,
    /// Device sections: payload sha256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_sha256: Option<String>,
    /// Device sections with a VM description: every field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<Field>>,
    /// COMMAND: `MIG_CMD_*` name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// COMMAND: the command code; return path: the message type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd_id: Option<u16>,
    /// COMMAND / return path: payload length field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_length: Option<u64>,
    /// PING, PONG, SHUT, RESUME_ACK: the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    /// ADVISE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_pagesize_summary: Option<u64>,
    /// ADVISE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_page_size: Option<u64>,
    /// DISCARD, RECV_BITMAP, REQ_PAGES(_ID), page records: block name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    /// DISCARD: `[start, length]` byte ranges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<[u64; 2]>>,
    /// PACKAGED: blob length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package_length: Option<u64>,
    /// VMDESCRIPTION: JSON length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_length: Option<u64>,
    /// REQ_PAGES(_ID): start byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<u64>,
    /// REQ_PAGES(_ID): byte count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    /// RP RECV_BITMAP: bitmap bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_size: Option<u64>,
    /// RP RECV_BITMAP: bits set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_bits_set: Option<u64>,
    /// RP RECV_BITMAP: sha256 of the bitmap bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_sha256: Option<String>,
    /// Page records: flag name (`ZERO`, `PAGE`, `XBZRLE`, `COMPRESS_PAGE`, `MEM_SIZE`, `EOS`,
    /// `MULTIFD_FLUSH`, `HOOK`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// Page records: offset in the block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<u64>,
    /// Multifd records: index of the connection among the `--multifd` files (0-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn: Option<u64>,
    /// MULTIFD_INIT: the channel id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<u64>,
    /// MULTIFD_PACKET: the packet's flags word.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_flags: Option<u64>,
    /// MULTIFD_PACKET: sequence number across all channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet_num: Option<u64>,
    /// MULTIFD_PACKET: pages with data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal_pages: Option<u64>,
    /// MULTIFD_PACKET: zero pages (10.x).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_pages: Option<u64>,
    /// TRUNCATED: bytes after `offset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_left: Option<u64>,
    /// TRUNCATED: the records of the cut RAM section that were complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_ram: Option<RamSummary>,
    /// INVALID: rule id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// INVALID: offending value; TRUNCATED/INVALID: explanation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

fn put<T: std::fmt::Display>(s: &mut String, key: &str, v: &Option<T>) {
    if let Some(v) = v {
        let _ = write!(s, " {key}={v}");
    }
}

impl RamSummary {
    /// `zero=.. page=.. ...`: the non-zero counters and the per-block counts.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for (k, v) in [
            ("zero", self.zero),
            ("page", self.page),
            ("xbzrle", self.xbzrle),
            ("compress", self.compress),
            ("multifd_flush", self.multifd_flush),
            ("hook", self.hook),
        ] {
            if v != 0 {
                let _ = write!(s, " {k}={v}");
            }
        }
        if let Some(m) = &self.mem_size {
            let _ = write!(s, " mem_size={}[", m.total);
            for (i, b) in m.blocks.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(s, "{sep}{}:{}", b.idstr, b.used_length);
            }
            s.push(']');
        }
        if !self.blocks.is_empty() {
            s.push_str(" blocks{");
            for (i, (b, n)) in self.blocks.iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                let _ = write!(s, "{sep}{b}:{n}");
            }
            s.push('}');
        }
        s.push_str(if self.eos { " eos" } else { " no-eos" });
        s
    }
}

impl Record {
    /// A record of `channel` at `offset`.
    pub fn new(channel: &'static str, offset: u64, ty: impl Into<String>, length: u64) -> Self {
        Record {
            channel,
            offset,
            ty: ty.into(),
            length,
            ..Record::default()
        }
    }

    /// Whether this record is nested (package content or a page record): indented in text.
    pub fn nested(&self) -> bool {
        self.in_package.is_some() || self.in_section.is_some()
    }

    /// The text line: `OFFSET TYPE key=value...`, channel-prefixed for `rp`/`resume`/`multifd`,
    /// indented when nested (so a top-level record is exactly a line that does not start with a
    /// space). Device fields follow on their own indented lines.
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.in_package.is_some() {
            s.push_str("    ");
        }
        if self.in_section.is_some() {
            s.push_str("    ");
        }
        if self.channel != "main" {
            let _ = write!(s, "{} ", self.channel);
        }
        let _ = write!(s, "{:<10} {}", self.offset, self.ty);
        if let Some(c) = &self.cmd {
            let _ = write!(s, " {c}");
        }
        if let Some(f) = &self.flags {
            let _ = write!(s, " {f}");
        }
        put(&mut s, "id", &self.section_id);
        if let Some(i) = &self.idstr {
            let _ = write!(s, " \"{i}\"");
        }
        put(&mut s, "instance", &self.instance_id);
        put(&mut s, "version", &self.version_id);
        put(&mut s, "version", &self.version);
        put(&mut s, "name", &self.name);
        if let Some(c) = &self.capabilities {
            let _ = write!(s, " capabilities=[{}]", c.join(","));
        }
        if let Some(c) = &self.subsections {
            if !c.is_empty() {
                let _ = write!(s, " subsections=[{}]", c.join(","));
            }
        }
        put(&mut s, "value", &self.value);
        put(&mut s, "ram_pagesize_summary", &self.ram_pagesize_summary);
        put(&mut s, "target_page_size", &self.target_page_size);
        put(&mut s, "block", &self.block);
        put(&mut s, "addr", &self.addr.map(|a| format!("{a:#x}")));
        put(&mut s, "start", &self.start.map(|a| format!("{a:#x}")));
        put(&mut s, "len", &self.len);
        if let Some(r) = &self.ranges {
            let _ = write!(s, " ranges={}", r.len());
            for (i, [a, l]) in r.iter().enumerate().take(4) {
                let sep = if i == 0 { "[" } else { "," };
                let _ = write!(s, "{sep}{a:#x}+{l:#x}");
            }
            s.push_str(if r.len() > 4 { ",...]" } else { "]" });
        }
        put(&mut s, "conn", &self.conn);
        put(&mut s, "channel_id", &self.channel_id);
        put(&mut s, "packet_num", &self.packet_num);
        put(
            &mut s,
            "flags",
            &self.packet_flags.map(|f| format!("{f:#x}")),
        );
        put(&mut s, "normal_pages", &self.normal_pages);
        put(&mut s, "zero_pages", &self.zero_pages);
        put(&mut s, "package_length", &self.package_length);
        put(&mut s, "json_length", &self.json_length);
        put(&mut s, "bitmap_size", &self.bitmap_size);
        put(&mut s, "bits_set", &self.bitmap_bits_set);
        put(&mut s, "sha256", &self.bitmap_sha256);
        if let Some(r) = &self.ram {
            s.push_str(&r.text());
        }
        put(&mut s, "payload", &self.payload_length);
        put(&mut s, "sha256", &self.payload_sha256);
        if self.ty != "TRUNCATED" && self.ty != "INVALID" {
            let _ = write!(s, " length={}", self.length);
        }
        put(&mut s, "rule", &self.rule);
        put(&mut s, "bytes_left", &self.bytes_left);
        if let Some(r) = self
            .partial_ram
            .as_ref()
            .filter(|r| **r != RamSummary::default())
        {
            let _ = write!(s, " cut_section_complete_records:{}", r.text());
        }
        if let Some(d) = &self.detail {
            let _ = write!(s, ": {d}");
        }
        if let Some(fields) = &self.fields {
            let pad = if self.in_package.is_some() {
                "    "
            } else {
                ""
            };
            for f in fields {
                let _ = write!(
                    s,
                    "\n{pad}    {:<10} {} ({}, {}) = {}",
                    f.offset, f.path, f.ty, f.size, f.hex
                );
                if let Some(v) = f.value {
                    let _ = write!(s, " ({v})");
                }
            }
        }
        s
    }
}
