//! Decode checks: no target involved, only the protocol crate.
//!
//! * A captured vector: every channel file decodes with [`StreamDecoder`] (a recovery channel
//!   continues the decoder of the channel before it) and the offsets of its top-level records
//!   equal the manifest's `records`; a cut channel ends with `Incomplete` at or after its
//!   `TRUNCATED` record, never with a violation. Every return-path file decodes with
//!   [`RpDecoder`] and its message offsets and types equal `rp_messages`.
//! * A synthetic vector: a main channel is fed to the protocol's [`Destination`] machine
//!   configured from the manifest; a valid one completes with the expected return path and RAM,
//!   an invalid one stops with `synthetic.expected` (rule and offset). A return path is decoded
//!   with [`RpDecoder`] (and each received bitmap checked with [`BitmapView`]), a multifd
//!   connection with [`MultifdDecoder`] to its end or first violation, under the same
//!   expectation.

use std::sync::Arc;

use qmig_protocol::bitmap::{BitmapView, PageBitmap};
use qmig_protocol::command::Command;
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{Destination, Instant, MigrationStatus};
use qmig_protocol::multifd::MultifdDecoder;
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::{Violation, WireError};
use serde_json::Value;

use super::synth_dst;
use super::vector::Vector;
use crate::qemu::driver::vmdesc_of_stream;

/// Target page size of every vector.
const TPS: u64 = 4096;

/// Runs the decode check of `v`: `Ok(detail)` or `Err(why it failed)`.
pub fn check(v: &Vector) -> Result<String, String> {
    match v.synthetic() {
        Some(s) => check_synthetic(v, s),
        None => check_capture(v),
    }
}

fn fmt_violation(x: &Violation) -> String {
    format!("{} at offset {} (value {})", x.rule.id(), x.offset, x.value)
}

/// The VM description of a captured vector: `vmdesc.json`, else the one after `stream.bin`'s EOF.
fn vmdesc(v: &Vector) -> Option<Arc<VmDesc>> {
    let json = if v.has("vmdesc.json") {
        v.read("vmdesc.json").ok()?
    } else {
        let s = v.read("stream.bin").ok()?;
        vmdesc_of_stream(&s)?.to_vec()
    };
    VmDesc::parse(&json, 0, &Limits::DEFAULT).ok().map(Arc::new)
}

/// Offsets of the top-level records of a channel, as the manifest lists them.
fn manifest_offsets(ch: &Value) -> (Vec<u64>, Option<u64>) {
    let mut offs = Vec::new();
    let mut truncated = None;
    for r in ch["records"].as_array().into_iter().flatten() {
        let off = r["offset"].as_u64().unwrap_or(u64::MAX);
        if r["type"] == "TRUNCATED" {
            truncated = Some(off);
        } else {
            offs.push(off);
        }
    }
    (offs, truncated)
}

/// What a whole-channel decode found: top-level record offsets, how it ended, and the
/// MEM_SIZE block list `(name, used_length)`.
type Decoded = (Vec<u64>, Result<(), WireError>, Vec<(Vec<u8>, u64)>);

/// Decodes a whole channel; returns the top-level record offsets and how it ended.
fn decode_channel(dec: &mut StreamDecoder, bytes: &[u8]) -> Decoded {
    dec.set_final(true);
    let mut pos = 0usize;
    let mut offs = Vec::new();
    let mut depth = 0u32;
    let mut blocks = Vec::new();
    let end = loop {
        if pos == bytes.len() && dec.at_end() {
            break Ok(());
        }
        let at = dec.offset();
        match dec.decode(&bytes[pos..]) {
            Ok((item, n)) => {
                pos += n;
                let top = depth == 0;
                match &item {
                    Item::Header { .. }
                    | Item::Configuration(_)
                    | Item::Section(_)
                    | Item::Eof
                    | Item::VmDescription(_)
                        if top =>
                    {
                        offs.push(at)
                    }
                    Item::Command(c) => {
                        if top {
                            offs.push(at);
                        }
                        if matches!(c, Command::Packaged { .. }) {
                            depth += 1;
                        }
                    }
                    Item::PackageEnd => depth = depth.saturating_sub(1),
                    Item::Ram(r) => {
                        if let RamBody::MemSize(list) = r.body {
                            for b in list.iter() {
                                blocks.push((b.name.to_vec(), b.used_length));
                            }
                        }
                    }
                    _ => {}
                }
                if pos == bytes.len() && dec.at_end() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    (offs, end, blocks)
}

fn check_capture(v: &Vector) -> Result<String, String> {
    let desc = vmdesc(v);
    let mut prev: Option<StreamDecoder> = None;
    let mut blocks: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut records = 0usize;
    let mut rp_msgs = 0usize;
    let mut notes = Vec::new();
    for ch in v.channels() {
        let Some(file) = ch["file"].as_str() else {
            continue;
        };
        let label = ch["label"].as_str().unwrap_or("main");
        let bytes = v.read(file).map_err(|e| e.to_string())?;
        let mut dec = match (&prev, label) {
            (Some(p), "recovery") => p.resume_from(),
            _ => {
                let mut d = StreamDecoder::new(Channel::Main, v.profile(), Limits::DEFAULT);
                if let Some(d2) = &desc {
                    d.set_vmdesc((**d2).clone());
                }
                d
            }
        };
        let (got, end, b) = decode_channel(&mut dec, &bytes);
        if !b.is_empty() {
            blocks = b;
        }
        let (mut want, mut truncated) = manifest_offsets(ch);
        let has_records = ch["records"].is_array();
        if truncated.is_none() && (ch.get("truncated_at").is_some() || cut_in_replay(v, label)) {
            // A capture whose records were not added yet: the cut is known, not where.
            truncated = Some(0);
        }
        match (&end, truncated) {
            (Ok(()), None) => {}
            (Err(WireError::Incomplete { .. }), Some(t)) => {
                if dec.offset() < t {
                    return Err(format!(
                        "{file}: stopped (incomplete) at {}, before the manifest's TRUNCATED record at {t}",
                        dec.offset()
                    ));
                }
            }
            (Err(WireError::Invalid(x)), _) => {
                return Err(format!("{file}: {}", fmt_violation(x)));
            }
            (Err(WireError::Incomplete { needed }), None) => {
                return Err(format!(
                    "{file}: ends inside a record at {} ({needed} more bytes needed); the manifest lists no cut",
                    dec.offset()
                ));
            }
            (Ok(()), Some(t)) => {
                return Err(format!(
                    "{file}: decoded to a proper end, the manifest says it is cut at {t}"
                ))
            }
        }
        if let Some(t) = truncated {
            // The cut record itself starts a section whose header decoded.
            if got.last() == Some(&t) {
                want.push(t);
            }
        }
        if !has_records {
            notes.push(
                "no records in the manifest: decoded to the end (or the cut), offsets not compared",
            );
            want = got.clone();
        }
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b);
            return Err(format!(
                "{file}: {} top-level records decoded, manifest lists {}; first difference at record {:?} (decoded {:?}, manifest {:?})",
                got.len(),
                want.len(),
                i,
                i.and_then(|i| got.get(i)),
                i.and_then(|i| want.get(i)),
            ));
        }
        records += got.len();
        if let Some(rp_file) = ch["rp_file"].as_str() {
            let rp = v.read(rp_file).map_err(|e| e.to_string())?;
            let n = check_rp_offsets(v, &rp, &blocks, &ch["rp_messages"])
                .map_err(|e| format!("{rp_file}: {e}"))?;
            rp_msgs += n;
        }
        if ch["multifd_channels"].is_array() {
            notes.push("multifd connections not decoded here (protocol vectors_multifd test)");
        }
        prev = Some(dec);
    }
    let mut s = format!("{records} records, {rp_msgs} return-path messages match the manifest");
    for n in notes {
        s.push_str("; ");
        s.push_str(n);
    }
    Ok(s)
}

/// Whether `replay` says the channel labelled `label` ends mid-stream.
fn cut_in_replay(v: &Vector, label: &str) -> bool {
    v.replay_channels()
        .iter()
        .any(|c| c["label"] == label && c["ends_mid_stream"].as_bool() == Some(true))
}

fn bitmap_bytes_for(blocks: &[(Vec<u8>, u64)]) -> impl Fn(&[u8]) -> Option<u64> + '_ {
    move |name: &[u8]| {
        blocks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, len)| PageBitmap::wire_size(len / TPS))
    }
}

fn check_rp_offsets(
    v: &Vector,
    rp: &[u8],
    blocks: &[(Vec<u8>, u64)],
    want: &Value,
) -> Result<usize, String> {
    let mut d = RpDecoder::new(v.profile(), Limits::DEFAULT);
    let expect = bitmap_bytes_for(blocks);
    let mut pos = 0;
    let mut got = Vec::new();
    while pos < rp.len() {
        let at = d.offset();
        let (m, n) = d.decode(&rp[pos..], &expect).map_err(|e| match e {
            WireError::Invalid(x) => fmt_violation(&x),
            e => format!("{e:?} at {at}"),
        })?;
        got.push((at, m.ty().0 as u64));
        pos += n;
    }
    if !want.is_array() {
        // No rp_messages in the manifest: decoding to the end is the check.
        return Ok(got.len());
    }
    let want: Vec<(u64, u64)> = want
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap_or(u64::MAX),
                m["type_id"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect();
    if got != want {
        return Err(format!(
            "messages (offset, type) {got:?} differ from the manifest's {want:?}"
        ));
    }
    Ok(got.len())
}

fn synthetic_blocks(s: &Value) -> Vec<(Vec<u8>, u64)> {
    s["blocks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b[0].as_str()?.as_bytes().to_vec(), b[1].as_u64()?)))
        .collect()
}

fn expected_of(s: &Value) -> Option<(String, u64)> {
    let e = &s["expected"];
    Some((e["rule"].as_str()?.to_string(), e["offset"].as_u64()?))
}

fn judge(s: &Value, got: Option<Violation>, what: &str) -> Result<String, String> {
    match (expected_of(s), got) {
        (None, None) => Ok(format!("valid: {what}")),
        (None, Some(x)) => Err(format!("valid case rejected: {}", fmt_violation(&x))),
        (Some((rule, off)), None) => Err(format!(
            "invalid case accepted; expected {rule} at offset {off}"
        )),
        (Some((rule, off)), Some(x)) => {
            if x.rule.id() == rule && x.offset == off {
                Ok(format!("rejected as expected: {}", fmt_violation(&x)))
            } else {
                Err(format!(
                    "expected {rule} at offset {off}, got {}",
                    fmt_violation(&x)
                ))
            }
        }
    }
}

fn check_synthetic(v: &Vector, s: &Value) -> Result<String, String> {
    let blocks = synthetic_blocks(s);
    match s["checker"].as_str() {
        // Bytes written to a live source: each message is well-formed (the RpDecoder accepts
        // it); the rule is judged by the source (`replay-src`, [`super::synth_src`]).
        Some("source-replay") => {
            let rp = v.read("rp.bin").map_err(|e| e.to_string())?;
            let mut d = RpDecoder::new(v.profile(), Limits::DEFAULT);
            let expect = bitmap_bytes_for(&blocks);
            let mut pos = 0;
            let mut n_msgs = 0;
            while pos < rp.len() {
                match d.decode(&rp[pos..], &expect) {
                    Ok((_, n)) => {
                        pos += n;
                        n_msgs += 1;
                    }
                    Err(WireError::Invalid(x)) => {
                        return Err(format!(
                            "source-side bytes must be well-formed: {}",
                            fmt_violation(&x)
                        ))
                    }
                    Err(e) => return Err(format!("return path ends inside a message: {e:?}")),
                }
            }
            Ok(format!(
                "{n_msgs} well-formed message(s); {} judged by a source (replay-src)",
                match expected_of(s) {
                    Some((rule, off)) => format!("{rule} at offset {off} of the injected bytes"),
                    None => "acceptance".into(),
                }
            ))
        }
        // No bytes of the case's own: the runner's requests, cut and chosen RECV_BITMAP are
        // played live against a source (`replay-src`, [`super::replay_src`]).
        Some("source-recover") => Ok(format!(
            "no injected bytes; {} judged by a source in a live postcopy cut (replay-src)",
            s["rule"].as_str().unwrap_or("?")
        )),
        Some("source") => {
            let rp = v.read("rp.bin").map_err(|e| e.to_string())?;
            let mut d = RpDecoder::new(v.profile(), Limits::DEFAULT);
            let expect = bitmap_bytes_for(&blocks);
            let mut pos = 0;
            let mut got = None;
            let mut n_msgs = 0;
            while pos < rp.len() {
                match d.decode(&rp[pos..], &expect) {
                    Ok((m, n)) => {
                        if let RpMessage::RecvBitmap { name, bitmap } = m {
                            let pages = blocks
                                .iter()
                                .find(|(b, _)| b == name)
                                .map(|(_, l)| l / TPS)
                                .unwrap_or(0);
                            let at = d.last_bitmap_offset();
                            if let Err(x) = BitmapView::new(bitmap, pages, at) {
                                got = Some(x);
                                break;
                            }
                        }
                        pos += n;
                        n_msgs += 1;
                    }
                    Err(WireError::Invalid(x)) => {
                        got = Some(x);
                        break;
                    }
                    Err(e) => return Err(format!("return path ends inside a message: {e:?}")),
                }
            }
            judge(s, got, &format!("{n_msgs} messages decoded"))
        }
        // `destination-devices`: the same, with the destination's device table declared;
        // `destination-huge-pages`: the same (blocks of larger pages, as `blocks` gives them).
        // `destination-described`: the same (device payloads decoded by the VM description).
        Some(
            "destination"
            | "destination-devices"
            | "destination-huge-pages"
            | "destination-described",
        ) => {
            let stream = v.read("stream.bin").map_err(|e| e.to_string())?;
            let flags: Vec<&str> = s["flags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let (mut cfg, mut mem) = synth_dst::setup(v, flags.contains(&"postcopy-ram"));
            // The destination's device table (SEC-UNKNOWN-DEVICE, SEC-VERSION), when declared.
            cfg.known_devices = s["known_devices"].as_array().map(|l| {
                l.iter()
                    .filter_map(|d| {
                        Some((
                            d[0].as_str()?.to_string(),
                            u32::try_from(d[1].as_u64()?).ok()?,
                            u32::try_from(d[2].as_u64()?).ok()?,
                        ))
                    })
                    .collect()
            });
            // Device payloads are delimited (and decoded) by the VM description the stream
            // ends with, as the replay gives it to the destination, unless the case is about
            // the footer scan (`replay.destination_vmdesc: false`).
            let desc = (v.manifest["replay"]["destination_vmdesc"] != false)
                .then(|| vmdesc(v))
                .flatten();
            cfg.vmdesc = desc.as_deref().cloned();
            // The plain decoder first (the whole channel, declared final): stream-level rules,
            // including what follows EOF; then the machine for the state-dependent rules.
            // (Blocks of another page size than the target page declared: RAM-PAGESIZE.)
            let mut dec = super::replay_dst::main_decoder(v);
            if let Some(d) = &desc {
                dec.set_vmdesc((**d).clone());
            }
            match decode_channel(&mut dec, &stream) {
                // With a `reaction`, the machine below must report it too and end as required.
                (_, Err(WireError::Invalid(x)), _) if s["reaction"].is_string() => {
                    judge(s, Some(x), "")?;
                }
                (_, Err(WireError::Invalid(x)), _) => return judge(s, Some(x), ""),
                // The file is the whole channel: ending inside a record (or before EOF) is a
                // truncation at the first byte of the incomplete record.
                (_, Err(WireError::Incomplete { .. }), _) => {
                    let x = Violation::new(dec.offset(), qmig_protocol::Rule::StreamTruncated, 0);
                    return judge(s, Some(x), "");
                }
                _ => {}
            }
            // The VM description after EOF, as a verifier reads it (destinations skip it). An
            // acceptable case breaks a rule there, and its migration must still complete as a
            // valid one: the machine below is judged with no expected violation.
            let acceptable = s["class"] == "acceptable";
            let mut verified = String::new();
            if let Some(json) = vmdesc_of_stream(&stream) {
                let at = (stream.len() - json.len()) as u64;
                if let Err(WireError::Invalid(x)) = VmDesc::parse(json, at, &Limits::DEFAULT) {
                    let r = judge(s, Some(x), "");
                    if !acceptable || r.is_err() {
                        return r;
                    }
                    verified = format!("verifier: {}; ", r?);
                }
            }
            if acceptable && verified.is_empty() {
                return judge(s, None, "");
            }
            let mut judged = s.clone();
            if acceptable {
                judged["expected"] = Value::Null;
            }
            let s = &judged;
            let mut dst = Destination::new(cfg).map_err(|e| format!("{e:?}"))?;
            dst.handle_channel_opened(Instant(0))
                .map_err(|e| e.to_string())?;
            let mut rp = Vec::new();
            let mut pos = 0;
            let mut got = None;
            loop {
                match dst.handle_stream(Instant(1), &stream[pos..], &mut mem) {
                    Ok(0) => break,
                    Ok(n) => pos += n,
                    Err(x) => {
                        got = Some(x);
                        break;
                    }
                }
            }
            dst.poll_transmit(&mut rp);
            let r = judge(s, got, "")?;
            if expected_of(s).is_some() {
                // The end state the violation's place requires (`reaction`).
                let want = match s["reaction"].as_str() {
                    Some("SM-FATAL-BEFORE-RUN") => Some(MigrationStatus::Failed),
                    Some("SM-PAUSE-AFTER-RUN") => Some(MigrationStatus::PostcopyPaused),
                    _ => None,
                };
                return match want {
                    Some(w) if dst.status() != w => Err(format!(
                        "{r}, but the machine ends in {}, not {w} ({})",
                        dst.status(),
                        s["reaction"]
                    )),
                    Some(w) => Ok(format!("{r}, then {w}")),
                    None => Ok(r),
                };
            }
            // Valid: consumed to the end, completed, the expected return path and RAM.
            if pos != stream.len() {
                return Err(format!(
                    "valid case: only {pos} of {} bytes consumed",
                    stream.len()
                ));
            }
            if dst.status() != MigrationStatus::Completed {
                return Err(format!(
                    "valid case ends in {}, not completed",
                    dst.status()
                ));
            }
            synth_dst::same_return_path(v, &rp, "rp.bin")?;
            synth_dst::same_final_ram(v, &mem)?;
            Ok(format!(
                "{verified}valid: completed, return path and final RAM as expected ({} bytes)",
                stream.len()
            ))
        }
        Some("multifd") => {
            // One multifd connection, decoded item by item to its end or first violation.
            let conn = v.read("multifd-conn0.bin").map_err(|e| e.to_string())?;
            let mut d = MultifdDecoder::new(v.profile(), Limits::DEFAULT);
            let (mut pos, mut n, mut got) = (0, 0, None);
            while pos < conn.len() {
                match d.decode(&conn[pos..]) {
                    Ok((_, used)) => {
                        pos += used;
                        n += 1;
                    }
                    Err(WireError::Invalid(x)) => {
                        got = Some(x);
                        break;
                    }
                    Err(e) => return Err(format!("connection ends inside a packet: {e:?}")),
                }
            }
            judge(s, got, &format!("{n} multifd items decoded"))
        }
        Some("destination-multifd") => {
            super::decode_multifd::check(v).unwrap_or_else(|| Err("not a multifd case".into()))
        }
        other => Err(format!("unknown synthetic checker {other:?}")),
    }
}
