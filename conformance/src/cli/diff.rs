//! `qmig diff A B`: compare two streams record by record: commands and configuration in order,
//! device sections by (idstr, instance, occurrence) and then field by field through the VM
//! description (else by byte ranges), RAM blocks by content hash and differing page indexes.
//! Every difference names its offsets in both files. Exit 0 when equal, 1 when different.

use super::extract::rebuild;
use super::image::file_sha256;
use super::record::{flatten, hex, Recorder};
use super::report::Record;
use super::scan::scan;
use super::{open, prepare, StreamOpts};
use qmig_protocol::command::Command;
use qmig_protocol::device::decode_device;
use qmig_protocol::limits::Limits;
use qmig_protocol::stream::Item;
use qmig_protocol::vmdesc::VmDesc;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `qmig diff`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// First stream.
    pub a: PathBuf,
    /// Second stream.
    pub b: PathBuf,
    /// VM description for device fields (default: A's trailing one, else B's).
    #[arg(long, value_name = "FILE")]
    pub vmdesc: Option<PathBuf>,
    /// Profile of both streams (detected when not given).
    #[arg(long, value_enum)]
    pub profile: Option<super::ProfileArg>,
}

/// A device section with its payload.
struct Dev {
    rec: Record,
    at: u64,
    payload: Vec<u8>,
}

/// What one side holds.
struct Side {
    others: Vec<Record>,
    devices: BTreeMap<(String, u32, usize), Dev>,
    vmdesc: Option<Arc<VmDesc>>,
}

fn load(path: &Path, opts: &StreamOpts) -> anyhow::Result<Side> {
    let (prep, mut dec) = prepare(path, opts)?;
    let mut rec = Recorder::new("main", None, false).keep_payloads();
    let mut others = Vec::new();
    let mut devices = BTreeMap::new();
    let mut seen: BTreeMap<(String, u32), usize> = BTreeMap::new();
    let end = scan(open(path)?, &mut dec, |d| {
        rec.item(&d, &mut |(r, p)| {
            if let (Some((at, payload)), Some(id)) = (p, r.idstr.clone()) {
                let inst = r.instance_id.unwrap_or(0);
                let n = seen.entry((id.clone(), inst)).or_default();
                devices.insert(
                    (id, inst, *n),
                    Dev {
                        rec: r,
                        at,
                        payload,
                    },
                );
                *n += 1;
            } else if r.ram.is_none() && r.ty != "VMDESCRIPTION" {
                others.push(r);
            }
        });
        Ok(())
    })?;
    if let Some(r) = rec.finish(&end) {
        others.push(r);
    }
    Ok(Side {
        others,
        devices,
        vmdesc: prep.vmdesc,
    })
}

/// The comparable content of a record (without offsets and lengths).
fn key(r: &Record) -> String {
    let mut r = r.clone();
    r.offset = 0;
    r.length = 0;
    r.in_package = r.in_package.map(|_| 0);
    serde_json::to_string(&r).unwrap_or_default()
}

/// Runs `qmig diff`; returns the exit code.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    let mut opts = StreamOpts {
        profile: a.profile,
        vmdesc: a.vmdesc.clone(),
        ..StreamOpts::default()
    };
    let sa = load(&a.a, &opts)?;
    let sb = load(&a.b, &opts)?;
    let desc = sa.vmdesc.clone().or(sb.vmdesc.clone());
    let mut lines = Vec::new();
    // Commands, header, configuration, EOF: aligned by longest common subsequence.
    let ka: Vec<String> = sa.others.iter().map(key).collect();
    let kb: Vec<String> = sb.others.iter().map(key).collect();
    for step in align(&ka, &kb) {
        match step {
            (Some(i), None) => lines.push(format!("only in A: {}", sa.others[i].text().trim())),
            (None, Some(j)) => lines.push(format!("only in B: {}", sb.others[j].text().trim())),
            _ => {}
        }
    }
    // Device sections.
    for (k, da) in &sa.devices {
        let (id, inst, n) = k;
        let what = if *n == 0 {
            format!("device \"{id}\" ({inst})")
        } else {
            format!("device \"{id}\" ({inst}) #{n}")
        };
        let Some(db) = sb.devices.get(k) else {
            lines.push(format!("only in A: {what} at offset {}", da.rec.offset));
            continue;
        };
        if da.payload == db.payload {
            continue;
        }
        lines.extend(device_diff(&what, da, db, desc.as_deref()));
    }
    for (k, db) in &sb.devices {
        if !sa.devices.contains_key(k) {
            lines.push(format!(
                "only in B: device \"{}\" ({}) at offset {}",
                k.0, k.1, db.rec.offset
            ));
        }
    }
    // RAM.
    let base = std::env::temp_dir().join(format!("qmig-diff-{}", std::process::id()));
    opts.vmdesc = a.vmdesc.clone();
    let res = ram_diff(&a.a, &a.b, &opts, &base, &mut lines);
    let _ = std::fs::remove_dir_all(&base);
    res?;
    for l in &lines {
        println!("{l}");
    }
    if lines.is_empty() {
        println!("no difference");
        Ok(0)
    } else {
        Ok(1)
    }
}

/// Aligns two sequences: pairs of equal elements `(Some(i), Some(j))` and unmatched ones, in
/// order (longest common subsequence; plain index pairing when the table would be too large).
fn align(a: &[String], b: &[String]) -> Vec<(Option<usize>, Option<usize>)> {
    let (n, m) = (a.len(), b.len());
    if n.saturating_mul(m) > 16_000_000 {
        return (0..n.max(m))
            .flat_map(|i| {
                let (x, y) = ((i < n).then_some(i), (i < m).then_some(i));
                if x.is_some() && y.is_some() && a[i] == b[i] {
                    vec![(x, y)]
                } else {
                    vec![(x, None), (None, y)]
                }
            })
            .filter(|p| *p != (None, None))
            .collect();
    }
    // t[i][j]: LCS length of a[i..] and b[j..].
    let w = m + 1;
    let mut t = vec![0u32; (n + 1) * w];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            t[i * w + j] = if a[i] == b[j] {
                t[(i + 1) * w + j + 1] + 1
            } else {
                t[(i + 1) * w + j].max(t[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push((Some(i), Some(j)));
            i += 1;
            j += 1;
        } else if j == m || (i < n && t[(i + 1) * w + j] >= t[i * w + j + 1]) {
            out.push((Some(i), None));
            i += 1;
        } else {
            out.push((None, Some(j)));
            j += 1;
        }
    }
    out
}

fn device_diff(what: &str, da: &Dev, db: &Dev, desc: Option<&VmDesc>) -> Vec<String> {
    let mut out = Vec::new();
    let (id, inst) = (
        da.rec.idstr.clone().unwrap_or_default(),
        da.rec.instance_id.unwrap_or(0),
    );
    if let Some(dev) = desc.and_then(|d| d.device(id.as_bytes(), inst)) {
        let ta = decode_device(dev, &da.payload, da.at, &Limits::DEFAULT);
        let tb = decode_device(dev, &db.payload, db.at, &Limits::DEFAULT);
        if let (Ok(ta), Ok(tb)) = (ta, tb) {
            let (mut fa, mut fb) = (Vec::new(), Vec::new());
            flatten(&ta.nodes, "", &mut fa);
            flatten(&tb.nodes, "", &mut fb);
            let ib: BTreeMap<_, _> = fb.iter().map(|f| (f.path.clone(), f)).collect();
            for f in &fa {
                match ib.get(&f.path) {
                    Some(g) if g.hex == f.hex => {}
                    Some(g) => out.push(format!(
                        "{what} field {}: A offset {} = {} | B offset {} = {}",
                        f.path, f.offset, f.hex, g.offset, g.hex
                    )),
                    None => out.push(format!(
                        "{what} field {}: only in A (offset {})",
                        f.path, f.offset
                    )),
                }
            }
            let ia: BTreeMap<_, _> = fa.iter().map(|f| (f.path.clone(), f)).collect();
            for g in &fb {
                if !ia.contains_key(&g.path) {
                    out.push(format!(
                        "{what} field {}: only in B (offset {})",
                        g.path, g.offset
                    ));
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
    }
    // Byte ranges.
    let n = da.payload.len().max(db.payload.len());
    let mut i = 0;
    while i < n {
        if da.payload.get(i) == db.payload.get(i) {
            i += 1;
            continue;
        }
        let s = i;
        while i < n && da.payload.get(i) != db.payload.get(i) {
            i += 1;
        }
        let ha = hex(da.payload.get(s..i.min(da.payload.len())).unwrap_or(&[]));
        let hb = hex(db.payload.get(s..i.min(db.payload.len())).unwrap_or(&[]));
        out.push(format!(
            "{what} payload bytes [{s}..{i}): A offset {} = {ha} | B offset {} = {hb}",
            da.at + s as u64,
            db.at + s as u64
        ));
    }
    out
}

fn ram_diff(
    a: &Path,
    b: &Path,
    opts: &StreamOpts,
    base: &Path,
    lines: &mut Vec<String>,
) -> anyhow::Result<()> {
    let (ia, _, _) = rebuild(a, opts, &[], None, &base.join("a"))?;
    let (ib, _, _) = rebuild(b, opts, &[], None, &base.join("b"))?;
    for x in &ia.blocks {
        let Some(y) = ib.blocks.iter().find(|y| y.name == x.name) else {
            lines.push(format!("RAM block \"{}\": only in A", x.name));
            continue;
        };
        if x.len != y.len {
            lines.push(format!(
                "RAM block \"{}\": length A {} | B {}",
                x.name, x.len, y.len
            ));
        }
        let (ha, hb) = (file_sha256(&x.path)?, file_sha256(&y.path)?);
        if ha == hb {
            continue;
        }
        let pages = differing_pages(&x.path, &y.path, 4096)?;
        let shown: Vec<String> = pages.iter().take(16).map(|p| p.to_string()).collect();
        lines.push(format!(
            "RAM block \"{}\": sha256 A {ha} | B {hb}; {} differing pages: {}{}",
            x.name,
            pages.len(),
            shown.join(","),
            if pages.len() > 16 { ",..." } else { "" }
        ));
        let wanted: BTreeSet<(String, u64)> = pages
            .iter()
            .take(16)
            .map(|p| (x.name.clone(), *p))
            .collect();
        let (wa, wb) = (
            last_writers(a, opts, &wanted)?,
            last_writers(b, opts, &wanted)?,
        );
        let at = |m: &BTreeMap<(String, u64), u64>, k: &(String, u64)| {
            m.get(k)
                .map_or("never written".to_string(), |o| format!("offset {o}"))
        };
        for k in &wanted {
            lines.push(format!(
                "RAM block \"{}\" page {}: last written A {} | B {}",
                k.0,
                k.1,
                at(&wa, k),
                at(&wb, k)
            ));
        }
    }
    for y in &ib.blocks {
        if !ia.blocks.iter().any(|x| x.name == y.name) {
            lines.push(format!("RAM block \"{}\": only in B", y.name));
        }
    }
    Ok(())
}

/// For each wanted (block, page), the offset of the last record that wrote it (a page record,
/// or a RAM_DISCARD covering it).
fn last_writers(
    path: &Path,
    opts: &StreamOpts,
    wanted: &BTreeSet<(String, u64)>,
) -> anyhow::Result<BTreeMap<(String, u64), u64>> {
    let (prep, mut dec) = prepare(path, opts)?;
    let tps = qmig_protocol::Profile::for_version(prep.version).target_page_size as u64;
    let mut out = BTreeMap::new();
    scan(open(path)?, &mut dec, |d| {
        match &d.item {
            Item::Ram(r) if r.is_page() => {
                if let Some(b) = r.block(d.dec.ram()) {
                    let k = (String::from_utf8_lossy(b).into_owned(), r.addr / tps);
                    if wanted.contains(&k) {
                        out.insert(k, d.at);
                    }
                }
            }
            Item::Command(Command::RamDiscard(dc)) => {
                let name = String::from_utf8_lossy(dc.name).into_owned();
                for (start, len) in dc.ranges() {
                    for k in wanted.iter().filter(|k| k.0 == name) {
                        let a = k.1 * tps;
                        if a >= start && a < start.saturating_add(len) {
                            out.insert(k.clone(), d.at);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(out)
}

fn differing_pages(a: &Path, b: &Path, tps: usize) -> anyhow::Result<Vec<u64>> {
    let fa = std::fs::File::open(a)?;
    let fb = std::fs::File::open(b)?;
    let la = fa.metadata()?.len();
    let lb = fb.metadata()?.len();
    let mut out = Vec::new();
    let (mut pa, mut pb) = (vec![0u8; tps], vec![0u8; tps]);
    let mut off = 0u64;
    while off < la.max(lb) {
        pa.fill(0);
        pb.fill(0);
        if off < la {
            let n = (la - off).min(tps as u64) as usize;
            fa.read_exact_at(&mut pa[..n], off)?;
        }
        if off < lb {
            let n = (lb - off).min(tps as u64) as usize;
            fb.read_exact_at(&mut pb[..n], off)?;
        }
        if pa != pb {
            out.push(off / tps as u64);
        }
        off += tps as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::align;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn align_pairs_the_longest_common_subsequence() {
        let a = s(&["h", "c", "o", "p", "e"]);
        let b = s(&["h", "o", "x", "e"]);
        assert_eq!(
            align(&a, &b),
            vec![
                (Some(0), Some(0)),
                (Some(1), None),
                (Some(2), Some(1)),
                (Some(3), None),
                (None, Some(2)),
                (Some(4), Some(3)),
            ]
        );
        assert_eq!(
            align(&a, &a)
                .iter()
                .filter(|p| p.0.is_none() || p.1.is_none())
                .count(),
            0
        );
    }
}
