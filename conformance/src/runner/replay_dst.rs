//! Replay against a destination: the runner plays the captured source byte for byte over TCP.
//!
//! Per vector: start the target (shim template), set `replay.destination_capabilities` and
//! parameters over QMP, `migrate-incoming` (unless the template listens by itself), connect,
//! write `feed_to_destination` while a reader thread collects the return path. A cut channel
//! (`ends_mid_stream`) is then shut down (the cut); the target must reach `postcopy-paused`,
//! accept `migrate-recover` on a new port, and take `resume-stream.bin` on a new connection.
//! Multifd vectors: the `multifd_connections_in_order` files are played on extra connections
//! opened right after the main one; a target refusing the `multifd` capability (a QMP error)
//! is a skip ("target refuses multifd"). With `multifd_close_after_write` (a synthetic MFD-SYNC
//! case) each is shut down for writing once written, as a source ending it.
//! Checks: the return path per `return_path_rule` (`exact`, `postcopy`, `recovery`), the final
//! status `completed`, and guest RAM read back with `pmemsave` against `final_ram`. A synthetic
//! invalid vector must end the migration in `failed` instead. A synthetic recovery case's
//! invalid recovery channel (`expect_failure` on a channel after the first) must be taken
//! (`postcopy-recover`) and rejected back to `expect_status` (`postcopy-paused`,
//! SM-PAUSE-IN-RECOVER; qmig-dst: rule and offset in `error-desc`); the vector's next recovery
//! channel then completes the migration, so the final RAM shows nothing received was lost.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qmig_protocol::limits::Limits;
use qmig_protocol::rp::RpDecoder;
use qmig_protocol::stream::{Channel, StreamDecoder};
use serde_json::{json, Value};

use super::shim::{self, free_port, scratch_dir, StartError, Target, Values};
use super::vector::Vector;
use crate::qemu::firmware::test_firmware;
use crate::qemu::pattern::{hex, sha256_hex};

/// Failure guard for one migration phase.
pub(super) const PHASE: Duration = Duration::from_secs(120);
/// Target page size.
const TPS: usize = 4096;

/// What a destination target is.
#[derive(Clone, Debug)]
pub struct DstTarget {
    /// Label in results (`qemu-7.2`, `qmig-dst`, or the template).
    pub label: String,
    /// The command-line template.
    pub template: String,
    /// Extra scalar placeholder values (`QEMU`, `BIN_DIR`).
    pub extra: Vec<(String, String)>,
    /// A deliberate defect (the suite's self-test): the target's return path is altered
    /// between the target and the checks.
    pub breakage: Option<Breakage>,
}

/// A deliberately broken destination, to prove the suite fails it (`--dst broken-KIND:TARGET`):
/// each defect breaks one behaviour rule of a destination, which no input can make a correct
/// destination break (the rule in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breakage {
    /// Every 64-bit word of every RECV_BITMAP body byte-swapped: big-endian words [BITMAP-LE].
    BitmapBe,
    /// Every PONG dropped [SM-PONG].
    DropPong,
    /// SHUT written first, before the PONGs [SM-SHUT-LAST].
    ShutFirst,
    /// Every page bit of every RECV_BITMAP set: pages claimed received that never arrived
    /// whole [BITMAP-MARK], a partly received host page kept [SM-PARTIAL-HOSTPAGE].
    MarkAll,
    /// The first message written in two pieces with the second message between them: two
    /// writers interleaving on the return path [RP-ATOMIC].
    Interleave,
    /// The guest RAM read back (`pmemsave`) with its last page that holds data zeroed: a page
    /// record never applied [RAM-APPLY].
    DropPage,
    /// RESUME_ACK(1) written before SHUT when the main channel carries a POSTCOPY_RESUME: a
    /// destination acting on it outside postcopy-recover [SM-RESUME-STATE].
    AckResume,
    /// The first REQ_PAGES_ID of every connection written as a bare REQ_PAGES (its block name
    /// dropped) [SM-FIRST-REQ-NAMED]; fault cases only (`replay_faults`).
    BareFirstReq,
    /// After RESUME_ACK, the requests for pages requested on an earlier connection dropped: a
    /// destination that forgot the faults still waiting [SM-REREQUEST]; fault cases only.
    NoRerequest,
}

impl Breakage {
    /// Every kind with its name (the rules each breaks: `synth::broken`).
    pub const ALL: [(Breakage, &'static str); 9] = [
        (Breakage::BitmapBe, "bitmap-be"),
        (Breakage::DropPong, "drop-pong"),
        (Breakage::ShutFirst, "shut-first"),
        (Breakage::MarkAll, "mark-all"),
        (Breakage::Interleave, "interleave"),
        (Breakage::DropPage, "drop-page"),
        (Breakage::AckResume, "ack-resume"),
        (Breakage::BareFirstReq, "bare-first-req"),
        (Breakage::NoRerequest, "no-rerequest"),
    ];

    /// Parses a kind name (`bitmap-be`, `drop-pong`, `shut-first`, `mark-all`, `interleave`,
    /// `drop-page`, `ack-resume`, `bare-first-req`, `no-rerequest`).
    pub fn parse(s: &str) -> Option<Breakage> {
        Self::ALL.iter().find(|(_, n)| *n == s).map(|(b, _)| *b)
    }

    /// Applies the defect to a return path the target wrote (the page-request defects are
    /// applied as the messages arrive, by `replay_faults`).
    pub(super) fn apply(self, v: &Vector, rp: Vec<u8>) -> Vec<u8> {
        let Ok(mut msgs) = messages(v, &rp) else {
            return rp;
        };
        match self {
            Breakage::ShutFirst => {
                if let Some(i) = msgs.iter().position(|(t, _)| *t == 1) {
                    let shut = msgs.remove(i);
                    msgs.insert(0, shut);
                }
            }
            Breakage::AckResume if main_has_resume(v) => {
                let at = msgs.iter().position(|(t, _)| *t == 1).unwrap_or(msgs.len());
                msgs.insert(at, (6, vec![0, 6, 0, 4, 0, 0, 0, 1]));
            }
            Breakage::Interleave if msgs.len() >= 2 => {
                let (_, first) = msgs.remove(0);
                let (_, second) = msgs.remove(0);
                let half = first.len() / 2;
                let mixed = [&first[..half], &second[..], &first[half..]].concat();
                msgs.insert(0, (0, mixed));
            }
            _ => {}
        }
        let mut out = Vec::with_capacity(rp.len());
        for (ty, mut b) in msgs {
            match (self, ty) {
                (Breakage::DropPong, 2) => continue,
                (Breakage::BitmapBe, 5) => {
                    let start = 4 + 1 + b[4] as usize + 8;
                    let end = b.len() - 8;
                    for w in b[start..end].chunks_exact_mut(8) {
                        w.reverse();
                    }
                }
                (Breakage::MarkAll, 5) => {
                    // Header (type, len), name, be64 size in bytes, body, end mark; the set
                    // bits stop at the block's last page (BITMAP-PADDING stays right).
                    let name_len = b[4] as usize;
                    let start = 4 + 1 + name_len + 8;
                    let name = String::from_utf8_lossy(&b[5..5 + name_len]).into_owned();
                    let pages = block_list(v)
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, l)| l / TPS as u64)
                        .unwrap_or(0) as usize;
                    let end = b.len() - 8;
                    for i in 0..pages.min((end - start) * 8) {
                        // Little-endian words: bit i is bit i % 8 of byte i / 8.
                        b[start + i / 8] |= 1 << (i % 8);
                    }
                }
                _ => {}
            }
            out.extend_from_slice(&b);
        }
        out
    }
}

/// Whether vector `v`'s main channel (`stream.bin`, never a recovery channel) carries a
/// POSTCOPY_RESUME.
fn main_has_resume(v: &Vector) -> bool {
    use qmig_protocol::command::Command;
    use qmig_protocol::stream::Item;
    let Ok(stream) = v.read("stream.bin") else {
        return false;
    };
    let mut d = main_decoder(v);
    let mut pos = 0;
    while let Ok((item, n)) = d.decode(&stream[pos..]) {
        if matches!(item, Item::Command(Command::PostcopyResume)) {
            return true;
        }
        pos += n;
        if n == 0 && pos >= stream.len() {
            break;
        }
    }
    false
}

/// The result of one replay: `Ok(detail)`, `Err(Fail)` or `Err(Skip)`.
pub enum Verdict {
    /// Passed.
    Pass(String),
    /// Failed.
    Fail(String),
    /// Not applicable / unsupported.
    Skip(String),
}

/// Why a vector cannot be replayed by this runner at all (`None`: it can).
pub fn not_replayable(v: &Vector) -> Option<String> {
    let chans = v.replay_channels();
    if chans.is_empty() {
        return Some("no replay section (not a main-channel vector)".into());
    }
    if v.synthetic().is_none() && v.manifest["final_ram"]["sha256"].as_str().is_none() {
        return Some("no final_ram".into());
    }
    None
}

pub fn caps_list(v: &Vector) -> Vec<String> {
    v.manifest["replay"]["destination_capabilities"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, on)| on.as_bool() == Some(true) && k.as_str() != "events")
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The placeholder values for vector `v`.
pub fn values_for(
    v: &Vector,
    dir: &std::path::Path,
    extra: &[(String, String)],
) -> anyhow::Result<Values> {
    let m = &v.manifest["machine"];
    let mut vals = Values::default();
    let ram_bytes = m["ram_bytes"].as_u64().context("machine.ram_bytes")?;
    vals.set("QMP", dir.join("qmp.sock").display().to_string());
    vals.set("DIR", dir.display().to_string());
    // A destination template may serve qtest there: the guest-access trigger of the fault cases
    // (`replay_faults`).
    vals.set(
        "QTEST",
        dir.join(super::fault_trigger::QTEST_SOCK)
            .display()
            .to_string(),
    );
    vals.set(
        "QMP_OOB",
        dir.join(super::fault_trigger::QMP_OOB_SOCK)
            .display()
            .to_string(),
    );
    vals.list(
        "FAULT_TRIGGER",
        super::fault_trigger::qemu_trigger_args(v, dir),
    );
    vals.set("RAM", format!("{}M", ram_bytes >> 20));
    vals.set("RAM_BYTES", ram_bytes.to_string());
    let machine = m["type"].as_str().unwrap_or("none");
    vals.set("MACHINE", machine);
    vals.set("BLOCKS", "");
    vals.set(
        "PROFILE",
        if v.qemu_version() == "7.2" {
            "7.2"
        } else {
            "10"
        },
    );
    let caps = caps_list(v);
    vals.set(
        "CAPS",
        if caps.is_empty() {
            "events".to_string()
        } else {
            caps.join(",")
        },
    );
    vals.list(
        "CPU",
        match m["cpu"].as_str() {
            Some(c) => vec!["-cpu".into(), c.into()],
            None => vec![],
        },
    );
    if machine == "microvm" {
        let fw = dir.join("test-firmware.bin");
        std::fs::write(&fw, test_firmware())?;
        vals.list("BIOS", vec!["-bios".into(), fw.display().to_string()]);
        // microvm is started with -S in the recordings.
        vals.lists
            .get_mut("BIOS")
            .expect("set")
            .insert(0, "-S".into());
    } else {
        vals.list("BIOS", vec![]);
    }
    let vmdesc = if v.manifest["replay"]["destination_vmdesc"] == false {
        None
    } else if v.has("vmdesc.json") {
        Some(v.dir.join("vmdesc.json"))
    } else {
        let s = v.read("stream.bin").ok();
        match s.as_deref().and_then(crate::qemu::driver::vmdesc_of_stream) {
            Some(j) => {
                let p = dir.join("vmdesc.json");
                std::fs::write(&p, j)?;
                Some(p)
            }
            None => None,
        }
    };
    vals.list(
        "VMDESC",
        vmdesc
            .map(|p: PathBuf| vec!["--vmdesc".into(), p.display().to_string()])
            .unwrap_or_default(),
    );
    // A main block of another page size than the target page (`machine.ram_page_size`):
    // QEMU backs it with a hugetlbfs file named like the block, qmig-dst declares it.
    let (backend, page_size) = match m["ram_page_size"].as_u64() {
        Some(ps) if ps != TPS as u64 => {
            let block = m["ram_block"].as_str().unwrap_or("ram");
            (
                crate::qemu::hugetlbfs_backend_args(block, &ram_bytes.to_string()),
                vec!["--ram-page-size".into(), ps.to_string()],
            )
        }
        _ => (vec![], vec![]),
    };
    vals.list("MEM_BACKEND", backend);
    vals.list("RAM_PAGE_SIZE", page_size);
    for (k, x) in extra {
        vals.set(k, x.clone());
    }
    Ok(vals)
}

/// Connects to the target's migration port (retried for up to 30 s while the target's
/// listener comes up), without Nagle.
pub(super) fn connect_migration(port: u16) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let sock = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("cannot connect to the target's migration port {port}: {e}"),
        }
    };
    sock.set_nodelay(true)?;
    Ok(sock)
}

/// A connection to the target's migration port with a return-path reader thread.
struct Conn {
    sock: TcpStream,
    done: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Conn {
    fn open(port: u16) -> anyhow::Result<Conn> {
        let sock = connect_migration(port)?;
        let mut r = sock.try_clone()?;
        r.set_read_timeout(Some(PHASE))?;
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(out);
        });
        Ok(Conn { sock, done })
    }

    /// Writes everything; a write error (the target closed) is reported, not fatal.
    fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        self.sock
            .write_all(bytes)
            .err()
            .map(|e| format!("write failed after the target closed: {e}"))
    }

    /// Ends the sending side and collects the return path until the target closes its side
    /// (at most `guard`; then the connection is torn down).
    fn close(self, guard: Duration) -> Vec<u8> {
        let _ = self.sock.shutdown(Shutdown::Write);
        self.collect(guard)
    }

    /// Collects the return path until the target closes its side (at most `guard`; then the
    /// connection is torn down). Alone, with the sending side left open and silent: the cut by
    /// silence of SM-TIMEOUT, which the target must give up by itself.
    fn collect(self, guard: Duration) -> Vec<u8> {
        match self.done.recv_timeout(guard) {
            Ok(v) => v,
            Err(_) => {
                let _ = self.sock.shutdown(Shutdown::Both);
                self.done.recv().unwrap_or_default()
            }
        }
    }

    /// The cut: closes the sending side right after the bytes written so far (the target sees
    /// the channel end inside a record), then collects the return path until the target closes.
    fn cut(self) -> Vec<u8> {
        self.close(PHASE)
    }

    /// After the migration ended on the target: the return path until it closes (a target that
    /// keeps the channel open gets 5 s after our side closed).
    fn finish(self) -> Vec<u8> {
        self.close(Duration::from_secs(5))
    }
}

/// A multifd connection's writer: its file name and the thread writing it.
type MultifdWriter = (String, std::thread::JoinHandle<Result<TcpStream, String>>);

/// Opens the channel's `multifd_connections_in_order` to `port` (after the main connection, one
/// after the other) and starts a thread writing each file; the thread hands the connection back
/// so that it stays open until the migration ended.
fn open_multifd(v: &Vector, ch: &Value, port: u16) -> anyhow::Result<Vec<MultifdWriter>> {
    let mut out = Vec::new();
    for f in ch["multifd_connections_in_order"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = f
            .as_str()
            .context("multifd_connections_in_order entry")?
            .to_string();
        let bytes = v.read(&name)?;
        let mut sock = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("multifd connection {name}"))?;
        sock.set_nodelay(true)?;
        sock.set_write_timeout(Some(PHASE))?;
        let label = name.clone();
        let close = ch["multifd_close_after_write"].as_bool() == Some(true);
        let h = std::thread::spawn(move || {
            sock.write_all(&bytes)
                .map_err(|e| format!("write failed after {label} was closed: {e}"))?;
            if close {
                // The source ends the connection here (a synthetic MFD-SYNC case).
                let _ = sock.shutdown(Shutdown::Write);
            }
            // Else the connection stays open until the migration ended (the caller drops it).
            Ok(sock)
        });
        out.push((name, h));
    }
    Ok(out)
}

/// Return-path messages as (type, whole bytes).
fn messages(v: &Vector, bytes: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let blocks: Vec<(String, u64)> = block_list(v);
    let expect = |name: &[u8]| {
        blocks
            .iter()
            .find(|(n, _)| n.as_bytes() == name)
            .map(|(_, l)| qmig_protocol::bitmap::PageBitmap::wire_size(l / TPS as u64))
    };
    let mut d = RpDecoder::new(v.profile(), Limits::DEFAULT);
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        match d.decode(&bytes[pos..], &expect) {
            Ok((m, n)) => {
                out.push((m.ty().0, bytes[pos..pos + n].to_vec()));
                pos += n;
            }
            Err(e) => {
                return Err(format!(
                    "return path from the target does not decode at {}: {e:?}",
                    d.offset()
                ))
            }
        }
    }
    Ok(out)
}

/// The vector's RAM blocks (name, bytes): the synthetic list, or main + `final_ram.other_blocks`.
pub fn block_list(v: &Vector) -> Vec<(String, u64)> {
    if v.synthetic().is_some() {
        return block_pages(v).into_iter().map(|(n, l, _)| (n, l)).collect();
    }
    let fr = &v.manifest["final_ram"];
    let mut out = vec![(
        fr["block"]
            .as_str()
            .or(v.manifest["machine"]["ram_block"].as_str())
            .unwrap_or("ram")
            .to_string(),
        fr["bytes"].as_u64().unwrap_or(0),
    )];
    for o in fr["other_blocks"].as_array().into_iter().flatten() {
        if let (Some(n), Some(b)) = (o["block"].as_str(), o["bytes"].as_u64()) {
            out.push((n.to_string(), b));
        }
    }
    out
}

/// A synthetic vector's RAM blocks with their page sizes (name, bytes, page size): entries of
/// `synthetic.blocks` are `[name, bytes]` (pages of the target page size) or
/// `[name, bytes, page_size]` (a huge-page block).
pub fn block_pages(v: &Vector) -> Vec<(String, u64, u64)> {
    v.synthetic()
        .map(|s| &s["blocks"])
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let ps = b.get(2).map_or(Some(TPS as u64), Value::as_u64)?;
            Some((b[0].as_str()?.to_string(), b[1].as_u64()?, ps))
        })
        .collect()
}

/// A [`StreamDecoder`] for synthetic vector `v`'s main channel: its profile, and its blocks of
/// another page size than the target page declared (their MEM_SIZE entries carry a `page_size`
/// field once postcopy is advised, RAM-PAGESIZE).
pub fn main_decoder(v: &Vector) -> StreamDecoder {
    let mut d = StreamDecoder::new(Channel::Main, v.profile(), Limits::DEFAULT);
    let pages = block_pages(v);
    d.set_huge_page_blocks(
        pages
            .iter()
            .filter(|(_, _, ps)| *ps != TPS as u64)
            .map(|(n, _, _)| n.as_bytes()),
    );
    d
}

fn is_req(t: u16) -> bool {
    t == 3 || t == 4
}

/// Compares a return path under `rule`.
pub fn compare_rp(v: &Vector, rule: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if rule == "exact" {
        if got == want {
            return Ok(());
        }
        return Err(format!(
            "return path differs (rule exact): got {} bytes {}, want {} bytes {}",
            got.len(),
            short_hex(got),
            want.len(),
            short_hex(want)
        ));
    }
    let g = messages(v, got)?;
    let w = messages(v, want).map_err(|e| format!("vector's own return path: {e}"))?;
    let norm = |m: &[(u16, Vec<u8>)], keep_bitmaps: bool| {
        let mut out: Vec<Vec<u8>> = m
            .iter()
            .filter(|(t, _)| !is_req(*t) && (keep_bitmaps || *t != 5))
            .map(|(_, b)| b.clone())
            .collect();
        let p3 = vec![0u8, 2, 0, 4, 0, 0, 0, 3];
        let p4 = vec![0u8, 2, 0, 4, 0, 0, 0, 4];
        for i in 0..out.len().saturating_sub(1) {
            if out[i] == p4 && out[i + 1] == p3 {
                out.swap(i, i + 1);
            }
        }
        out
    };
    if rule == "recovery" {
        // RECV_BITMAPs first, byte for byte, in order.
        let gb: Vec<&Vec<u8>> = g
            .iter()
            .take_while(|(t, _)| *t == 5)
            .map(|(_, b)| b)
            .collect();
        let wb: Vec<&Vec<u8>> = w
            .iter()
            .take_while(|(t, _)| *t == 5)
            .map(|(_, b)| b)
            .collect();
        if gb != wb {
            let i = gb.iter().zip(&wb).position(|(a, b)| a != b);
            let detail = match i {
                Some(i) => {
                    let (a, b) = (gb[i], wb[i]);
                    let at = a
                        .iter()
                        .zip(b.iter())
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    format!(
                        "RECV_BITMAP #{i} differs from byte {at} of the message: got {} want {}",
                        short_hex(&a[at..]),
                        short_hex(&b[at..])
                    )
                }
                None => format!("{} RECV_BITMAP messages, want {}", gb.len(), wb.len()),
            };
            return Err(format!("recovery return path: {detail}"));
        }
    }
    let (gn, wn) = (norm(&g, rule != "recovery"), norm(&w, rule != "recovery"));
    if gn != wn {
        let show = |m: &[Vec<u8>]| m.iter().map(|b| hex(b)).collect::<Vec<_>>().join(" ");
        return Err(format!(
            "return path (rule {rule}, page requests ignored): got [{}], want [{}]",
            show(&gn),
            show(&wn)
        ));
    }
    if g.last().map(|(t, b)| (*t, b.as_slice())) != Some((1, &[0u8, 1, 0, 4, 0, 0, 0, 0][..])) {
        return Err("the return path does not end with SHUT(0)".into());
    }
    Ok(())
}

pub fn short_hex(b: &[u8]) -> String {
    if b.len() <= 48 {
        hex(b)
    } else {
        format!("{}…", hex(&b[..48]))
    }
}

fn status_of(t: &mut Target) -> String {
    t.qmp
        .migration_status()
        .unwrap_or_else(|e| format!("(query-migrate failed: {e})"))
}

pub(super) fn wait_status(t: &mut Target, want: &str) -> anyhow::Result<()> {
    if status_of(t) == want {
        return Ok(());
    }
    // MIGRATION events (the `events` capability is on); the timeout only guards against hangs.
    t.qmp
        .wait_status(want, PHASE)
        .map_err(|e| anyhow!("waiting for {want}: {e} (status now {})", status_of(t)))?;
    Ok(())
}

/// Waits for the migration to end (`failed`, `completed`, `postcopy-paused`, or the target
/// gone); returns the last status seen.
fn wait_end(t: &mut Target) -> String {
    let ended = |s: &str| matches!(s, "failed" | "completed" | "postcopy-paused");
    let s = status_of(t);
    if ended(&s) || s.starts_with("(query-migrate failed") {
        return s;
    }
    let _ = t.qmp.wait_event(
        "MIGRATION",
        |d| d["status"].as_str().is_some_and(ended),
        PHASE,
    );
    status_of(t)
}

/// Waits for `completed` or `failed` (a recovery starts from `postcopy-paused`); the status.
pub(super) fn wait_done(t: &mut Target) -> String {
    let s = status_of(t);
    if s == "failed" || s == "completed" || s.starts_with("(query-migrate failed") {
        return s;
    }
    let _ = t.qmp.wait_event(
        "MIGRATION",
        |d| matches!(d["status"].as_str(), Some("failed" | "completed")),
        PHASE,
    );
    status_of(t)
}

/// Whether the target's `error-desc` starts with synthetic case `v`'s expected rule and offset
/// (`offset N: RULE-ID:`): the description, or why not.
fn error_desc_names(v: &Vector, t: &mut Target) -> Result<String, String> {
    let s = v.synthetic().ok_or("not a synthetic case")?;
    let want = format!(
        "offset {}: {}:",
        s["expected"]["offset"],
        s["expected"]["rule"].as_str().unwrap_or("")
    );
    let info = t.qmp.execute("query-migrate", json!({}));
    let desc = info
        .as_ref()
        .ok()
        .and_then(|i| i["error-desc"].as_str())
        .unwrap_or("")
        .to_string();
    if desc.starts_with(&want) {
        Ok(desc)
    } else {
        Err(format!("error-desc `{desc}` does not start with `{want}`"))
    }
}

/// Replays `v` against `target`.
pub fn replay(v: &Vector, target: &DstTarget) -> Verdict {
    match replay_inner(v, target) {
        Ok(v) => v,
        Err(e) => Verdict::Fail(format!("{e:#}")),
    }
}

fn replay_inner(v: &Vector, target: &DstTarget) -> anyhow::Result<Verdict> {
    if let Some(why) = not_replayable(v) {
        return Ok(Verdict::Skip(why));
    }
    let dir = scratch_dir("dst")?;
    let result = (|| -> anyhow::Result<Verdict> {
        let mut vals = values_for(v, &dir, &target.extra)?;
        let port = free_port()?;
        let uses_listen = target.template.contains("{LISTEN}");
        vals.set("LISTEN", format!("tcp:127.0.0.1:{port}"));
        vals.set("CONNECT", format!("tcp:127.0.0.1:{port}"));
        let template = target.template.clone();
        let argv = shim::expand(&template, &vals)?;
        let mut t = match Target::start(argv, &dir, &dir.join("qmp.sock")) {
            Ok(t) => t,
            Err(StartError::Unsupported(m)) => {
                return Ok(Verdict::Skip(format!(
                    "target reports unsupported (exit 89): {m}"
                )))
            }
            Err(StartError::Failed(e)) => return Err(e),
        };
        let names_rules = target.label == "qmig";
        let r = drive(v, &mut t, port, uses_listen, target.breakage, names_rules);
        match r {
            Err(e) => {
                if t.exit_code() == Some(shim::EXIT_UNSUPPORTED) {
                    return Ok(Verdict::Skip(format!(
                        "target reports unsupported (exit 89): {}",
                        t.log_tail()
                    )));
                }
                Err(e.context(format!("target log: {}", t.log_tail())))
            }
            ok => ok,
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Sends `command` (`migrate-incoming` or `migrate-recover`) with `tcp:127.0.0.1:PORT`, first
/// `port`; when the target cannot listen there because the port was taken after it was picked
/// ("Address already in use": seen in CI, on ports chosen free a moment before), again on
/// another free port, at most 5 times. A failed listen changes nothing on the target (QEMU and
/// qmig-dst bind before they change state). Returns the port the target listens on.
pub(super) fn listen_on(t: &mut Target, command: &str, mut port: u16) -> anyhow::Result<u16> {
    let mut attempts = 1;
    loop {
        let uri = format!("tcp:127.0.0.1:{port}");
        match t.qmp.execute(command, json!({ "uri": uri })) {
            Ok(_) => return Ok(port),
            Err(e) if attempts < 5 && e.to_string().contains("Address already in use") => {
                attempts += 1;
                port = free_port()?;
            }
            Err(e) => return Err(anyhow!(e).context(command.to_string())),
        }
    }
}

/// `names_rules`: the target is qmig-dst, whose `error-desc` must name an invalid synthetic
/// case's rule and offset (`offset N: RULE-ID: ...`).
fn drive(
    v: &Vector,
    t: &mut Target,
    port: u16,
    uses_listen: bool,
    target_breakage: Option<Breakage>,
    names_rules: bool,
) -> anyhow::Result<Verdict> {
    let mut caps: Vec<Value> = vec![json!({"capability": "events", "state": true})];
    for c in caps_list(v) {
        caps.push(json!({"capability": c, "state": true}));
    }
    if let Err(e) = t
        .qmp
        .execute("migrate-set-capabilities", json!({"capabilities": caps}))
    {
        // A target without multifd refuses the capability with a QMP error: not applicable.
        if caps_list(v).iter().any(|c| c == "multifd") {
            return Ok(Verdict::Skip(format!("target refuses multifd: {e}")));
        }
        return Err(anyhow!(e).context("migrate-set-capabilities"));
    }
    let silent_cut = v.replay_channels().iter().any(|c| c["cut_by"] == "silence");
    if let Some(p) = v.manifest["replay"]["destination_parameters"].as_object() {
        if !p.is_empty() {
            if let Err(e) = t
                .qmp
                .execute("migrate-set-parameters", Value::Object(p.clone()))
            {
                if silent_cut {
                    // SM-TIMEOUT is a MAY: a target without a configurable silence bound
                    // cannot run the case (QEMU has none: spec deviation D-12).
                    return Ok(Verdict::Skip(format!(
                        "unsupported: the target takes no silence bound ({e})"
                    )));
                }
                return Err(anyhow!(e).context("migrate-set-parameters"));
            }
        }
    }
    let mut port = port;
    if !uses_listen {
        port = listen_on(t, "migrate-incoming", port)?;
    }
    if v.manifest["replay"]["faults"].is_array() {
        // A case with guest faults: the runner makes the accesses (`replay_faults`).
        return super::replay_faults::drive(v, t, port, target_breakage);
    }
    let chans = v.replay_channels().to_vec();
    let invalid = v.synthetic().is_some_and(|s| s["class"] == "invalid");
    let mut notes = Vec::new();
    for (i, ch) in chans.iter().enumerate() {
        let feed = ch["feed_to_destination"]
            .as_str()
            .context("feed_to_destination")?;
        let bytes = v.read(feed)?;
        // The channel a synthetic invalid case breaks (a recovery case's later channel is valid).
        let ch_invalid = invalid && ch["expect_failure"].as_bool() == Some(true);
        if i > 0 {
            // Recovery: the target must be paused; migrate-recover on a new port.
            wait_status(t, "postcopy-paused").context("before recovery")?;
            port = listen_on(t, "migrate-recover", free_port()?)?;
        }
        let mut conn = Conn::open(port)?;
        // Multifd: the extra connections, opened one after the other after the main one (the
        // order the destination accepts them in), each written by its own thread while the main
        // channel is fed (the destination reads them concurrently: the main channel waits for
        // multifd sync points).
        let multifd = open_multifd(v, ch, port)?;
        // A violation after POSTCOPY_RUN in the main channel: deliver it only once the target
        // has acted on RUN. In stream order it comes after RUN, but QEMU reads the bytes after
        // a package on its listen thread while the main thread still works through the
        // package: fed at once, QEMU 7.2 sometimes meets the violation before RUN took effect
        // and fails instead of pausing (seen 1 run in 4).
        let after_run = v
            .synthetic()
            .filter(|s| i == 0 && ch_invalid && s["reaction"] == "SM-PAUSE-AFTER-RUN")
            .and_then(|s| s["expected"]["offset"].as_u64())
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o <= bytes.len());
        let fed = match after_run {
            Some(at) => conn.feed(&bytes[..at]).or_else(|| {
                let ran = wait_status(t, "postcopy-active")
                    .and_then(|_| crate::interop::cell::wait_destination_ran(&mut t.qmp, PHASE));
                match ran {
                    Ok(_) => conn.feed(&bytes[at..]),
                    Err(e) => Some(format!("the target never ran before the violation: {e}")),
                }
            }),
            None => conn.feed(&bytes),
        };
        if let Some(w) = fed {
            if !ch_invalid {
                notes.push(w);
            }
        }
        let cut = ch["ends_mid_stream"].as_bool() == Some(true);
        let breakage = target_breakage;
        if i > 0 && (ch_invalid || cut) {
            // An invalid recovery channel (synthetic recovery case), or one that is lost (ends
            // before POSTCOPY_RESUME): the target takes it (`postcopy-recover`), rejects it or
            // sees it end, and returns to `expect_status` (SM-PAUSE-IN-RECOVER); the next
            // channel recovers again. Ending our side after the bytes is deterministic: the
            // target acts on every byte written (a lost channel's RECV_BITMAP is answered)
            // before it reads the end.
            // End the sending side (a target waiting for more sees EOF); the return path is
            // collected once the target ended the attempt.
            let _ = conn.sock.shutdown(Shutdown::Write);
            let want = ch["expect_status"].as_str().unwrap_or("postcopy-paused");
            let what = if ch_invalid { "invalid" } else { "lost" };
            // By the MIGRATION events in order (not the status now, which may still be that of
            // before the channel was taken): `postcopy-recover`, then the first end after it
            // (`want`, or `completed` / `failed`, which fail the case at once).
            t.qmp.wait_status("postcopy-recover", PHASE).map_err(|e| {
                anyhow!("recovery channel taken: {e} (status now {})", status_of(t))
            })?;
            let ended = |st: &str| st == want || matches!(st, "completed" | "failed");
            let end = t
                .qmp
                .wait_event(
                    "MIGRATION",
                    |d| d["status"].as_str().is_some_and(ended),
                    PHASE,
                )
                .map_err(|e| anyhow!("after the {what} recovery channel: {e}"))?;
            let got = end.data["status"].as_str().unwrap_or("?").to_string();
            let rp = conn.finish();
            let label = ch["label"].as_str().unwrap_or("?");
            if got != want {
                return Ok(Verdict::Fail(format!(
                    "{label}: {what} recovery channel: the target ended in {got}, not {want} ({})",
                    v.synthetic()
                        .map(|s| s["expected"].to_string())
                        .unwrap_or_default()
                )));
            }
            if !ch_invalid {
                let rp = match breakage {
                    Some(b) => b.apply(v, rp),
                    None => rp,
                };
                if let Some(file) = ch["expected_return_path"].as_str() {
                    let rule = ch["return_path_rule"].as_str().unwrap_or("exact");
                    if let Err(e) = compare_rp(v, rule, &rp, &v.read(file)?) {
                        return Ok(Verdict::Fail(format!("{label}: {e}")));
                    }
                }
                notes.push(format!(
                    "{label}: lost in postcopy-recover after {} bytes, back to {want} ({} return-path bytes as expected)",
                    bytes.len(),
                    rp.len()
                ));
                continue;
            }
            let mut desc = String::new();
            if names_rules {
                match error_desc_names(v, t) {
                    Ok(d) => desc = format!(", error-desc `{d}`"),
                    Err(why) => return Ok(Verdict::Fail(format!("{label}: {want}, but {why}"))),
                }
            }
            notes.push(format!(
                "{label}: rejected, back to {want}{desc} ({} return-path bytes)",
                rp.len()
            ));
            continue;
        }
        let rp = if cut {
            // The captured cut happened mid-postcopy: deliver it only once the target ran
            // POSTCOPY_RUN, or a fast reader would see the end of the channel before RUN,
            // which is fatal rather than a pause (SM-FATAL-BEFORE-RUN). QEMU announces
            // `postcopy-active` already at LISTEN; its run state leaves `inmigrate` only in
            // the bottom half RUN schedules (qmig-dst: from RUN on).
            wait_status(t, "postcopy-active").context("before the cut")?;
            crate::interop::cell::wait_destination_ran(&mut t.qmp, PHASE)
                .context("before the cut")?;
            if ch["cut_by"] == "silence" {
                // The target must give the silent channel up by itself (SM-TIMEOUT) and
                // pause; qmig-dst names the rule in `error-desc`.
                let rp = conn.collect(PHASE);
                wait_status(t, "postcopy-paused").context("after the silence")?;
                if names_rules {
                    let info = t.qmp.execute("query-migrate", json!({}))?;
                    let desc = info["error-desc"].as_str().unwrap_or("");
                    if !desc.contains("SM-TIMEOUT") {
                        return Ok(Verdict::Fail(format!(
                            "main channel: paused after the silence, but error-desc `{desc}` does not name SM-TIMEOUT"
                        )));
                    }
                    notes.push(format!("main channel: silent, given up: `{desc}`"));
                } else {
                    notes.push("main channel: silent, given up by the target".to_string());
                }
                rp
            } else {
                let rp = conn.cut();
                wait_status(t, "postcopy-paused").context("after the cut")?;
                rp
            }
        } else if ch_invalid {
            // End the channel after the bytes (a target waiting for more sees EOF), then the
            // migration must fail: `failed`, the process exiting non-zero (QEMU exits when an
            // incoming migration fails), or `postcopy-paused` for an error after POSTCOPY_RUN.
            let rp = conn.cut();
            let s = wait_end(t);
            let exit = if s.starts_with("(query-migrate failed") {
                t.wait_exit(Duration::from_secs(10))
            } else {
                t.exit_code()
            };
            // Bytes after EOF reach a destination that already has the whole VM: it stays
            // `completed` and reports the violation instead of failing a finished migration.
            let after_eof = |t: &mut Target| {
                let want = v.synthetic().map(|s| {
                    format!(
                        "offset {}: {}:",
                        s["expected"]["offset"],
                        s["expected"]["rule"].as_str().unwrap_or("")
                    )
                })?;
                let info = t.qmp.execute("query-migrate", serde_json::json!({})).ok()?;
                let desc = info["error-desc"].as_str()?.to_string();
                desc.contains(&want).then_some(desc)
            };
            // A target killed by a signal crashed on the input: that is not a rejection.
            if let Some(sig) = t.killed_by() {
                return Ok(Verdict::Fail(format!(
                    "the target crashed (killed by signal {sig}) instead of rejecting the stream; log: {}",
                    t.log_tail()
                )));
            }
            // The end state the violation's place requires (`synthetic.reaction`).
            match (
                v.synthetic().and_then(|s| s["reaction"].as_str()),
                s.as_str(),
            ) {
                (Some(r @ "SM-PAUSE-AFTER-RUN"), st) if st != "postcopy-paused" => {
                    return Ok(Verdict::Fail(format!(
                        "the violation comes after POSTCOPY_RUN: the target must pause ({r}), it ended in {st} (exit {exit:?})"
                    )));
                }
                (Some(r @ "SM-FATAL-BEFORE-RUN"), "postcopy-paused") => {
                    return Ok(Verdict::Fail(format!(
                        "the violation comes before POSTCOPY_RUN: the target must fail ({r}), it paused"
                    )));
                }
                _ => {}
            }
            if matches!(s.as_str(), "failed" | "postcopy-paused")
                && names_rules
                && v.synthetic().is_some()
            {
                return Ok(match error_desc_names(v, t) {
                    Err(why) => Verdict::Fail(format!("failed, but {why}")),
                    Ok(desc) => Verdict::Pass(format!(
                        "rejected: migration {s}, error-desc `{desc}` ({} return-path bytes)",
                        rp.len()
                    )),
                });
            }
            let why = match (s.as_str(), exit) {
                ("failed", _) => Some("migration failed".to_string()),
                ("completed", _) => after_eof(t).map(|d| format!("reported after completion: {d}")),
                ("postcopy-paused", _) => {
                    Some("postcopy paused (error after POSTCOPY_RUN)".to_string())
                }
                (_, Some(c)) if c != 0 => Some(format!("target exited with code {c}")),
                _ => None,
            };
            return Ok(match why {
                Some(why) => {
                    Verdict::Pass(format!("rejected: {why} ({} return-path bytes)", rp.len()))
                }
                None => {
                    Verdict::Fail(format!(
                    "invalid stream accepted: target status {s} (expected a failed migration; {})",
                    v.synthetic().map(|s| s["expected"].to_string()).unwrap_or_default()
                ))
                }
            });
        } else {
            // A complete stream: the target ends the migration (QMP), then its side closes.
            let s = wait_done(t);
            let rp = conn.finish();
            if !multifd.is_empty() {
                notes.push(format!(
                    "{} multifd connection(s) played alongside",
                    multifd.len()
                ));
            }
            for (name, h) in multifd {
                match h.join() {
                    Ok(Ok(sock)) => drop(sock),
                    Ok(Err(e)) => notes.push(format!("{name}: {e}")),
                    Err(_) => notes.push(format!("{name}: writer thread panicked")),
                }
            }
            if s != "completed" && ch["accept_failure"].as_bool() == Some(true) {
                // An acceptable synthetic case: rejecting it is conforming too.
                let exit = t.exit_code();
                if s == "failed" || exit.is_some_and(|c| c != 0) {
                    return Ok(Verdict::Pass(format!(
                        "acceptable case rejected: status {s}, exit {exit:?} ({} return-path bytes)",
                        rp.len()
                    )));
                }
            }
            if s != "completed" {
                // A QMP that stopped answering: whether the process exited or crashed.
                let process = t.exit_note(Duration::from_secs(2));
                return Ok(Verdict::Fail(format!(
                    "{}: the target ended in {s}, not completed (process {process}); log: {}",
                    ch["label"].as_str().unwrap_or("?"),
                    t.log_tail()
                )));
            }
            rp
        };
        if let Some(fail) = check_channel_rp(v, ch, rp, breakage, cut)? {
            return Ok(Verdict::Fail(fail));
        }
    }
    wait_status(t, "completed").context("at the end")?;
    final_ram_verdict(v, t, target_breakage, chans.len(), notes)
}

/// Checks the return path `rp` a target wrote on channel `ch` (the defect `breakage` applied
/// first) against the channel's `expected_return_path` under its `return_path_rule` (a `cut`
/// channel: its PONGs only). `Ok(Some(message))`: the check failed.
pub(super) fn check_channel_rp(
    v: &Vector,
    ch: &Value,
    rp: Vec<u8>,
    breakage: Option<Breakage>,
    cut: bool,
) -> anyhow::Result<Option<String>> {
    let rp = match breakage {
        Some(b) => b.apply(v, rp),
        None => rp,
    };
    if let (Some(want), Some(rule)) = (
        ch["expected_return_path"].as_str(),
        ch["return_path_rule"].as_str(),
    ) {
        let want = v.read(want)?;
        let rule = if cut { "postcopy-cut" } else { rule };
        match rule {
            "postcopy-cut" => {
                // The first connection of a recovery vector: PONGs as captured (a prefix,
                // page requests aside), no SHUT.
                let g = messages(v, &rp).map_err(|e| anyhow!(e))?;
                let w = messages(v, &want).map_err(|e| anyhow!("vector: {e}"))?;
                let pongs = |m: &[(u16, Vec<u8>)]| {
                    let mut p: Vec<Vec<u8>> = m
                        .iter()
                        .filter(|(t, _)| *t == 2)
                        .map(|(_, b)| b.clone())
                        .collect();
                    p.sort();
                    p
                };
                if pongs(&g) != pongs(&w) {
                    return Ok(Some(format!(
                        "first connection: PONGs {:?} differ from the capture's {:?}",
                        pongs(&g).iter().map(|b| hex(b)).collect::<Vec<_>>(),
                        pongs(&w).iter().map(|b| hex(b)).collect::<Vec<_>>()
                    )));
                }
            }
            rule => {
                if let Err(e) = compare_rp(v, rule, &rp, &want) {
                    return Ok(Some(format!(
                        "{}: {e}",
                        ch["label"].as_str().unwrap_or("?")
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// The end of a replay that completed: the guest RAM read back (`pmemsave`) against
/// `final_ram` (the `drop-page` defect applied), and the pass message with `notes`.
pub(super) fn final_ram_verdict(
    v: &Vector,
    t: &mut Target,
    target_breakage: Option<Breakage>,
    n_channels: usize,
    mut notes: Vec<String>,
) -> anyhow::Result<Verdict> {
    let fr = &v.manifest["final_ram"];
    let bytes = fr["bytes"].as_u64().context("final_ram.bytes")?;
    let base = v.manifest["machine"]["ram_guest_physical_base"]
        .as_u64()
        .unwrap_or(0);
    let file = t.dir.join("pmemsave.bin");
    t.qmp
        .execute(
            "pmemsave",
            json!({"val": base, "size": bytes, "filename": file.display().to_string()}),
        )
        .context("pmemsave")?;
    let mut ram = std::fs::read(&file).context("pmemsave output")?;
    let _ = std::fs::remove_file(&file);
    if target_breakage == Some(Breakage::DropPage) {
        // The last page holding data reads as zero: a record that was never applied.
        if let Some(pg) = ram
            .chunks_mut(TPS)
            .rev()
            .find(|p| p.iter().any(|&b| b != 0))
        {
            pg.fill(0);
        }
    }
    if ram.len() as u64 != bytes {
        bail!("pmemsave wrote {} of {bytes} bytes", ram.len());
    }
    let microvm = v.manifest["machine"]["type"] == "microvm";
    let sha = sha256_hex(&ram);
    if sha != fr["sha256"].as_str().unwrap_or("") {
        // Page by page (microvm: pages 192-255 are the firmware mapping, not the RAM block).
        let zero = fr["zero_page_sha256"].as_str().unwrap_or("");
        let nonzero: std::collections::BTreeMap<u64, String> = fr["nonzero_pages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p[0].as_u64()?, p[1].as_str()?.to_string())))
            .collect();
        for (i, pg) in ram.chunks(TPS).enumerate() {
            let i = i as u64;
            if microvm && (192..256).contains(&i) {
                continue;
            }
            let want = nonzero.get(&i).map(String::as_str).unwrap_or(zero);
            if sha256_hex(pg) != want {
                return Ok(Verdict::Fail(format!(
                    "final RAM: page {i} differs (sha256 {} want {want})",
                    sha256_hex(pg)
                )));
            }
        }
        notes.push("RAM equal page by page (microvm: firmware window 192-255 not compared)".into());
    }
    let mut s = format!(
        "{} channel(s) replayed, return path per rule, completed, final RAM ({} MiB) equal",
        n_channels,
        bytes >> 20
    );
    for n in notes {
        s.push_str("; ");
        s.push_str(&n);
    }
    Ok(Verdict::Pass(s))
}
