//! `qmig inspect`: one line (or JSON record) per record of a main or recovery channel, and of a
//! return-path capture, with offsets; a `TRUNCATED` line where a cut input ends.

use super::record::{name, sha256_hex, Emitted, Recorder};
use super::report::{Header, Record, FORMAT};
use super::scan::{scan, End};
use super::{open, prepare, version_name, StreamOpts};
use anyhow::Context as _;
use qmig_protocol::bitmap::BitmapView;
use qmig_protocol::device::{decode_device, Node, NodeKind};
use qmig_protocol::limits::Limits;
use qmig_protocol::multifd::{MultifdDecoder, MultifdItem};
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::stream::{Item, StreamDecoder};
use qmig_protocol::{Profile, WireError};
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

/// `--compat` shapes (like QEMU's `scripts/analyze-migration.py -d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compat {
    /// `-d state`: `{"idstr (instance)": {field: value}}`.
    State,
    /// `-d desc`: the VM description.
    Desc,
}

/// Arguments of `qmig inspect`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The stream (`-` for stdin, read incrementally).
    pub file: PathBuf,
    /// A return-path capture to list after the stream.
    #[arg(long, value_name = "FILE")]
    pub rp: Option<PathBuf>,
    /// A RAM block `NAME:BYTES` the return path names (sizes its bitmaps when no stream says).
    #[arg(long, value_name = "NAME:BYTES")]
    pub block: Vec<BlockArg>,
    /// Multifd connection captures to list after the stream (and return path), in order.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub multifd: Vec<PathBuf>,
    /// Newline-delimited JSON (`qmig-inspect/1`) instead of text.
    #[arg(long)]
    pub json: bool,
    /// List every RAM record (indented, before its section's summary line).
    #[arg(short = 'v', long)]
    pub pages: bool,
    /// Text output: leave out the device field lines (shown when a VM description is known).
    #[arg(long)]
    pub no_fields: bool,
    /// Output shaped like analyze-migration.py's `-d state` / `-d desc`.
    #[arg(long, value_enum)]
    pub compat: Option<Compat>,
    /// Profile, recovery channel and VM description options.
    #[command(flatten)]
    pub stream: StreamOpts,
}

/// Runs `qmig inspect`; returns the exit code.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    let (prep, mut dec) = prepare(&a.file, &a.stream)?;
    if let Some(c) = a.compat {
        return compat(a, c, &prep, dec);
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let channel = if a.stream.resume { "resume" } else { "main" };
    let header = Header {
        format: FORMAT,
        file: a.file.display().to_string(),
        channel,
        profile: version_name(prep.version),
        profile_source: prep.source,
        vmdesc: prep.vmdesc_source,
    };
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&header)?)?;
    } else {
        writeln!(
            out,
            "# {FORMAT} {} channel={channel} profile={} ({}) vmdesc={}",
            header.file, header.profile, header.profile_source, header.vmdesc
        )?;
    }
    let mut rec = Recorder::new(channel, prep.vmdesc.clone(), a.pages);
    let mut io_err: Option<std::io::Error> = None;
    let mut emit = |r: &Record, out: &mut BufWriter<std::io::StdoutLock<'_>>| {
        let line = if a.json {
            serde_json::to_string(r).expect("records serialize")
        } else if a.no_fields && r.fields.is_some() {
            let mut r = r.clone();
            r.fields = None;
            r.text()
        } else {
            r.text()
        };
        if io_err.is_none() {
            if let Err(e) = writeln!(out, "{line}") {
                io_err = Some(e);
            }
        }
    };
    let end = scan(open(&a.file)?, &mut dec, |d| {
        rec.item(&d, &mut |(r, _): Emitted| emit(&r, &mut out));
        Ok(())
    })?;
    let mut code = 0;
    if let End::Invalid(v) = end {
        if prep.source == "default" && super::profile_rule(v.rule) {
            tracing::warn!(
                "decoded under the default 10.x profile; a 7.2 stream needs --profile 7.2"
            );
        }
    }
    if let Some(r) = rec.finish(&end) {
        if matches!(end, End::Invalid(_)) {
            code = 1;
        }
        emit(&r, &mut out);
    }
    if let Some(rp) = &a.rp {
        let profile = Profile::for_version(prep.version);
        for r in rp_records(rp, profile, &known_blocks(&dec, &a.block))? {
            if r.ty == "INVALID" {
                code = 1;
            }
            emit(&r, &mut out);
        }
    }
    for (i, m) in a.multifd.iter().enumerate() {
        for mut r in multifd_records(m, Profile::for_version(prep.version))? {
            r.conn = Some(i as u64);
            if r.ty == "INVALID" {
                code = 1;
            }
            emit(&r, &mut out);
        }
    }
    out.flush()?;
    if let Some(e) = io_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e.into());
        }
    }
    Ok(code)
}

/// The RAM blocks `(idstr, used length)` the main decoder learned from MEM_SIZE, plus `extra`.
pub fn known_blocks(main: &StreamDecoder, extra: &[BlockArg]) -> Vec<(Vec<u8>, u64)> {
    let mut v: Vec<(Vec<u8>, u64)> = main
        .blocks()
        .iter()
        .map(|b| (b.name().to_vec(), b.used_length))
        .collect();
    v.extend(extra.iter().map(|b| (b.name.as_bytes().to_vec(), b.bytes)));
    v
}

/// A `--block NAME:BYTES` value: a RAM block the return path may name, when no main channel
/// tells its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockArg {
    /// Block idstr.
    pub name: String,
    /// Used length in bytes.
    pub bytes: u64,
}

impl std::str::FromStr for BlockArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, b) = s.rsplit_once(':').ok_or("expected NAME:BYTES")?;
        let bytes = b.parse().map_err(|e| format!("{b}: {e}"))?;
        Ok(BlockArg {
            name: n.to_string(),
            bytes,
        })
    }
}

/// Decodes a return-path capture into records; `blocks` (idstr, used length) size the bitmaps
/// (RECV_BITMAP of a known block: `RP-BITMAP-SIZE`, `BITMAP-PADDING` are checked).
pub fn rp_records(
    path: &PathBuf,
    profile: Profile,
    blocks: &[(Vec<u8>, u64)],
) -> anyhow::Result<Vec<Record>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let tps = profile.target_page_size as u64;
    let pages_of = |n: &[u8]| blocks.iter().find(|b| b.0 == n).map(|b| b.1.div_ceil(tps));
    let expected = |n: &[u8]| pages_of(n).map(qmig_protocol::bitmap::wire_size);
    let mut d = RpDecoder::new(profile, Limits::DEFAULT);
    let mut pos = 0usize;
    let mut out = Vec::new();
    loop {
        let at = d.offset();
        match d.decode(&bytes[pos..], &expected) {
            Ok((m, n)) => {
                let ty = m.ty();
                let mut r = Record::new(
                    "rp",
                    at,
                    ty.name().unwrap_or("MIG_RP_MSG_UNKNOWN"),
                    n as u64,
                );
                r.cmd_id = Some(ty.0);
                match m {
                    RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
                        r.value = Some(v as u64)
                    }
                    RpMessage::ReqPagesId {
                        start,
                        len,
                        name: b,
                    } => {
                        r.start = Some(start);
                        r.len = Some(len as u64);
                        r.block = Some(name(b));
                    }
                    RpMessage::ReqPages { start, len } => {
                        r.start = Some(start);
                        r.len = Some(len as u64);
                        r.block = d.last_req_block().map(name);
                    }
                    RpMessage::RecvBitmap { name: b, bitmap } => {
                        r.block = Some(name(b));
                        r.bitmap_size = Some(bitmap.len() as u64);
                        r.bitmap_sha256 = Some(sha256_hex(bitmap));
                        match pages_of(b) {
                            // The block is known: size and padding are checked.
                            Some(pages) => {
                                match BitmapView::new(bitmap, pages, d.last_bitmap_offset()) {
                                    Ok(v) => r.bitmap_bits_set = Some(v.count_ones()),
                                    Err(v) => {
                                        out.push(r);
                                        let mut bad = Record::new("rp", v.offset, "INVALID", 0);
                                        bad.rule = Some(v.rule.id().into());
                                        bad.detail = Some(format!(
                                            "{} (value {})",
                                            v.rule.summary(),
                                            v.value
                                        ));
                                        out.push(bad);
                                        break;
                                    }
                                }
                            }
                            None => {
                                r.bitmap_bits_set =
                                    Some(bitmap.iter().map(|x| x.count_ones() as u64).sum())
                            }
                        }
                    }
                    _ => {}
                }
                out.push(r);
                pos += n;
            }
            Err(WireError::Incomplete { needed }) => {
                if pos < bytes.len() {
                    let mut r = Record::new("rp", at, "TRUNCATED", 0);
                    r.bytes_left = Some((bytes.len() - pos) as u64);
                    r.rule = Some(super::TRUNCATED_RULE.into());
                    r.detail = Some(format!("at least {needed} more bytes needed"));
                    out.push(r);
                }
                break;
            }
            Err(WireError::Invalid(v)) => {
                let mut r = Record::new("rp", v.offset, "INVALID", 0);
                r.rule = Some(v.rule.id().into());
                r.detail = Some(format!("{} (value {})", v.rule.summary(), v.value));
                out.push(r);
                break;
            }
        }
    }
    Ok(out)
}

/// Decodes a multifd connection capture into records (init packet, then packets).
pub fn multifd_records(path: &PathBuf, profile: Profile) -> anyhow::Result<Vec<Record>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let mut d = MultifdDecoder::new(profile, Limits::DEFAULT);
    let mut pos = 0usize;
    let mut out = Vec::new();
    loop {
        let at = d.offset();
        match d.decode(&bytes[pos..]) {
            Ok((item, n)) => {
                let r = match item {
                    MultifdItem::Init(p) => {
                        let mut r = Record::new("multifd", at, "MULTIFD_INIT", n as u64);
                        r.version = Some(p.version.get() as u64);
                        r.channel_id = Some(p.id as u64);
                        r
                    }
                    MultifdItem::Ram(p) => {
                        let mut r = Record::new("multifd", at, "MULTIFD_PACKET", n as u64);
                        r.packet_num = Some(p.header.packet_num.get());
                        r.packet_flags = Some(p.flags() as u64);
                        r.normal_pages = Some(p.normal_pages() as u64);
                        r.zero_pages = Some(p.zero_pages() as u64);
                        if !p.ramblock().is_empty() {
                            r.block = Some(name(p.ramblock()));
                        }
                        r
                    }
                    MultifdItem::DeviceState { data, .. } => {
                        let mut r = Record::new("multifd", at, "MULTIFD_DEVICE_STATE", n as u64);
                        r.payload_length = Some(data.len() as u64);
                        r.payload_sha256 = Some(sha256_hex(data));
                        r
                    }
                };
                out.push(r);
                pos += n;
            }
            Err(WireError::Incomplete { needed }) => {
                if pos < bytes.len() {
                    let mut r = Record::new("multifd", at, "TRUNCATED", 0);
                    r.bytes_left = Some((bytes.len() - pos) as u64);
                    r.rule = Some(super::TRUNCATED_RULE.into());
                    r.detail = Some(format!("at least {needed} more bytes needed"));
                    out.push(r);
                }
                break;
            }
            Err(WireError::Invalid(v)) => {
                let mut r = Record::new("multifd", v.offset, "INVALID", 0);
                r.rule = Some(v.rule.id().into());
                r.detail = Some(format!("{} (value {})", v.rule.summary(), v.value));
                out.push(r);
                break;
            }
        }
    }
    Ok(out)
}

/// A device tree as analyze-migration.py prints it: integers as `0x..` strings of their width,
/// other leaves as hex strings, arrays as lists, structs and subsections as objects.
fn state_value(nodes: &[Node<'_, '_>]) -> Value {
    let mut m = Map::new();
    for n in nodes {
        m.insert(n.name.to_string(), node_value(n));
    }
    Value::Object(m)
}

fn node_value(n: &Node<'_, '_>) -> Value {
    match n.kind {
        NodeKind::Leaf | NodeKind::Null => match n.as_u64() {
            Some(v) => json!(format!("0x{:0w$x}", v, w = n.bytes.len() * 2)),
            None => json!(super::record::hex(n.bytes)),
        },
        NodeKind::Array => Value::Array(n.children.iter().map(node_value).collect()),
        NodeKind::Struct | NodeKind::Subsection => state_value(&n.children),
    }
}

/// `--compat state|desc`.
fn compat(
    a: &Args,
    c: Compat,
    prep: &super::Prepared,
    mut dec: StreamDecoder,
) -> anyhow::Result<i32> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if c == Compat::Desc {
        let j = prep
            .vmdesc_json
            .as_ref()
            .context("no VM description: the stream has none (give --vmdesc FILE)")?;
        let v: Value = serde_json::from_slice(j)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(0);
    }
    let desc = prep.vmdesc.clone();
    let mut state = Map::new();
    let mut cur: Option<(String, u32)> = None;
    let end = scan(open(&a.file)?, &mut dec, |d| {
        match &d.item {
            Item::Section(_) => {
                cur = d
                    .dec
                    .current_section()
                    .map(|s| (name(s.idstr()), s.instance_id));
                if let Some((n, i)) = &cur {
                    state
                        .entry(format!("{n} ({i})"))
                        .or_insert_with(|| json!({}));
                }
            }
            Item::DeviceData(p) => {
                if let Some((n, i)) = &cur {
                    let v = match desc.as_ref().and_then(|x| x.device(n.as_bytes(), *i)) {
                        Some(dev) => match decode_device(dev, p, d.at, &Limits::DEFAULT) {
                            Ok(t) => state_value(&t.nodes),
                            Err(e) => json!({ "error": e.to_string() }),
                        },
                        None => json!({ "payload_hex": super::record::hex(p) }),
                    };
                    state.insert(format!("{n} ({i})"), v);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&Value::Object(state))?
    )?;
    Ok(if matches!(end, End::Invalid(_)) { 1 } else { 0 })
}
