//! Replay of the synthetic cases with guest faults (`replay.faults`, `synth::faults`) against a
//! destination: the runner writes a channel up to a fault's `at`, waits for the moment the
//! fault names (`run`: the target ran POSTCOPY_RUN; `resume-ack`: it wrote RESUME_ACK on this
//! connection), makes a guest access to the page (`fault_trigger`: qmig-dst's
//! `x-qmig-probe-read`, QEMU's qtest; a target with neither is skipped as unsupported), reads the return path message by message
//! until the page request the access causes, checks it (SM-FIRST-REQ-NAMED, SM-REREQUEST), then
//! writes the rest of the channel. The end is judged as for any replay (`replay_dst`): the
//! return path per rule, `completed`, the final RAM; and the accesses must have returned.
//!
//! The return path is hostile input: a reader thread decodes it with the protocol crate's
//! [`RpDecoder`] as it arrives and hands over each message; a violation or a message ending
//! early fails the case with its offset. Waits block on that reader or on QMP events; the
//! phase guard only bounds a hang. The SM-REREQUEST bound is an event: after RESUME_ACK the
//! runner makes a second access (a new fault), whose request a conforming destination writes
//! only after re-requesting the page that still waits, so the first request after RESUME_ACK
//! decides.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qmig_protocol::codes::RpType;
use qmig_protocol::error::WireError;
use qmig_protocol::limits::Limits;
use qmig_protocol::rp::RpDecoder;
use serde_json::Value;

use super::fault_trigger::Trigger;
use super::replay_dst::{
    block_list, check_channel_rp, connect_migration, final_ram_verdict, wait_done, wait_status,
    Breakage, Verdict, PHASE,
};
use super::shim::Target;
use super::vector::Vector;
use crate::qemu::pattern::hex;

/// Target page size.
const TPS: u64 = 4096;

/// When the runner makes a fault's guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// Once the target ran POSTCOPY_RUN (its run state left `inmigrate`).
    Run,
    /// Once RESUME_ACK was read on this connection.
    ResumeAck,
}

/// A page request: block, byte offset, byte count.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Req {
    block: String,
    start: u64,
    len: u64,
}

impl std::fmt::Display for Req {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} page {} ({} bytes at {})",
            self.block,
            self.start / TPS,
            self.len,
            self.start
        )
    }
}

/// What the destination must write after the access.
#[derive(Clone, Debug)]
enum Expect {
    /// The first page request on the connection: REQ_PAGES_ID for exactly this page.
    FirstRequest(Req),
    /// The first message after RESUME_ACK: a request, REQ_PAGES_ID, for this page (requested
    /// on the lost connection and still waited for).
    RerequestFirst(Req),
}

/// One entry of `replay.faults`.
#[derive(Clone, Debug)]
struct Fault {
    channel: String,
    at: usize,
    after: After,
    block: String,
    page: u64,
    expect: Expect,
}

fn req_of(x: &Value) -> anyhow::Result<Req> {
    Ok(Req {
        block: x["block"].as_str().context("block")?.to_string(),
        start: x["start"].as_u64().context("start")?,
        len: x["len"].as_u64().context("len")?,
    })
}

fn parse_faults(v: &Vector) -> anyhow::Result<Vec<Fault>> {
    let mut out = Vec::new();
    for f in v.manifest["replay"]["faults"]
        .as_array()
        .context("replay.faults")?
    {
        let expect = if let Some(r) = f["expect"].get("first_request") {
            Expect::FirstRequest(req_of(r)?)
        } else if let Some(r) = f["expect"].get("rerequest_first") {
            Expect::RerequestFirst(req_of(r)?)
        } else {
            bail!("replay.faults: unknown expect {}", f["expect"]);
        };
        out.push(Fault {
            channel: f["channel"].as_str().context("channel")?.to_string(),
            at: usize::try_from(f["at"].as_u64().context("at")?)?,
            after: match f["after"].as_str() {
                Some("run") => After::Run,
                Some("resume-ack") => After::ResumeAck,
                other => bail!("replay.faults: unknown after {other:?}"),
            },
            block: f["block"].as_str().context("block")?.to_string(),
            page: f["page"].as_u64().context("page")?,
            expect,
        });
    }
    Ok(out)
}

/// Message types the checks look at.
const REQ_ID: u16 = RpType::REQ_PAGES_ID.0;
const REQ_BARE: u16 = RpType::REQ_PAGES.0;
const ACK: u16 = RpType::RESUME_ACK.0;

/// Pages requested: (block, byte offset).
type Pages = BTreeSet<(String, u64)>;

/// One decoded return-path message: its type and whole bytes.
type Msg = (u16, Vec<u8>);

/// The request a REQ_PAGES_ID (3) or REQ_PAGES (4) message makes; a bare one in the block of
/// the connection's last named request (`last`).
fn request_of(m: &Msg, last: Option<&str>) -> Option<(Req, bool)> {
    let b = &m.1;
    let start = u64::from_be_bytes(b.get(4..12)?.try_into().ok()?);
    let len = u64::from(u32::from_be_bytes(b.get(12..16)?.try_into().ok()?));
    match m.0 {
        REQ_BARE => Some((
            Req {
                block: last.unwrap_or("(no block named yet)").to_string(),
                start,
                len,
            },
            false,
        )),
        REQ_ID => {
            let n = *b.get(16)? as usize;
            let name = String::from_utf8_lossy(b.get(17..17 + n)?).into_owned();
            Some((
                Req {
                    block: name,
                    start,
                    len,
                },
                true,
            ))
        }
        _ => None,
    }
}

/// A migration connection whose return path is decoded as it arrives; the self-test defects
/// of page requests (`bare-first-req`, `no-rerequest`) are applied here, between the target
/// and the checks.
struct LiveConn {
    sock: TcpStream,
    rx: Receiver<Result<Msg, String>>,
    /// The messages kept, in order (after the defects): the connection's return path.
    kept: Vec<u8>,
    /// The block of the last REQ_PAGES_ID kept.
    last_block: Option<String>,
    /// Whether a REQ_PAGES_ID was seen on this connection (before the defects).
    named_seen: bool,
    /// Whether RESUME_ACK was seen.
    acked: bool,
    /// The requests kept on this connection.
    requested: Pages,
    /// Pages requested on the earlier connections.
    earlier: Pages,
    breakage: Option<Breakage>,
    /// Whether the reader ended (the target closed, or a decode error was reported).
    ended: bool,
}

impl LiveConn {
    fn open(
        v: &Vector,
        port: u16,
        earlier: Pages,
        breakage: Option<Breakage>,
    ) -> anyhow::Result<LiveConn> {
        let sock = connect_migration(port)?;
        let mut r = sock.try_clone()?;
        r.set_read_timeout(Some(PHASE))?;
        let blocks = block_list(v);
        let mut d = RpDecoder::new(v.profile(), Limits::DEFAULT);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let expect = |name: &[u8]| {
                blocks
                    .iter()
                    .find(|(n, _)| n.as_bytes() == name)
                    .map(|(_, l)| qmig_protocol::bitmap::PageBitmap::wire_size(l / TPS))
            };
            let mut buf = Vec::new();
            let mut tmp = [0u8; 65536];
            loop {
                let n = match r.read(&mut tmp) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                if n == 0 {
                    if !buf.is_empty() {
                        let _ = tx.send(Err(format!(
                            "the return path ends inside a message at offset {}: {}",
                            d.offset(),
                            hex(&buf)
                        )));
                    }
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
                let mut pos = 0;
                loop {
                    match d.decode(&buf[pos..], &expect) {
                        Ok((m, used)) => {
                            let _ = tx.send(Ok((m.ty().0, buf[pos..pos + used].to_vec())));
                            pos += used;
                        }
                        Err(WireError::Incomplete { .. }) => break,
                        Err(e) => {
                            let _ = tx.send(Err(format!(
                                "the return path from the target does not decode: {e:?}"
                            )));
                            return;
                        }
                    }
                }
                buf.drain(..pos);
            }
        });
        Ok(LiveConn {
            sock,
            rx,
            kept: Vec::new(),
            last_block: None,
            named_seen: false,
            acked: false,
            requested: BTreeSet::new(),
            earlier,
            breakage,
            ended: false,
        })
    }

    /// Writes `bytes`; a write error (the target closed) is returned as a note.
    fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        self.sock
            .write_all(bytes)
            .err()
            .map(|e| format!("write failed after the target closed: {e}"))
    }

    /// The next message the checks see (`None`: the target closed the return path), waiting
    /// at most `guard`.
    fn next(&mut self, guard: Duration) -> anyhow::Result<Option<Msg>> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let m = match self.rx.recv_timeout(guard) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    self.ended = true;
                    bail!(e);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.ended = true;
                    return Ok(None);
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no return-path message within {guard:?}")
                }
            };
            if let Some(m) = self.alter(m) {
                if let Some((r, named)) = request_of(&m, self.last_block.as_deref()) {
                    if named {
                        self.last_block = Some(r.block.clone());
                    }
                    self.requested.insert((r.block.clone(), r.start));
                }
                if m.0 == ACK {
                    self.acked = true;
                }
                self.kept.extend_from_slice(&m.1);
                return Ok(Some(m));
            }
        }
    }

    /// The self-test defects on page requests: `bare-first-req` writes the connection's first
    /// REQ_PAGES_ID as a bare REQ_PAGES; `no-rerequest` drops, after RESUME_ACK, the requests
    /// for pages requested on an earlier connection (a destination that forgot its waiting
    /// faults).
    fn alter(&mut self, m: Msg) -> Option<Msg> {
        let first_named = m.0 == REQ_ID && !self.named_seen;
        if m.0 == REQ_ID {
            self.named_seen = true;
        }
        match self.breakage {
            Some(Breakage::BareFirstReq) if first_named => {
                let mut b = [REQ_BARE.to_be_bytes(), 12u16.to_be_bytes()].concat();
                b.extend_from_slice(&m.1[4..16]);
                Some((REQ_BARE, b))
            }
            Some(Breakage::NoRerequest) if self.acked => {
                match request_of(&m, self.last_block.as_deref()) {
                    Some((r, _)) if self.earlier.contains(&(r.block.clone(), r.start)) => None,
                    _ => Some(m),
                }
            }
            _ => Some(m),
        }
    }

    /// Reads until a message `want` accepts; the messages before it are kept (PONGs, ...).
    fn until(&mut self, what: &str, want: impl Fn(&Msg) -> bool) -> anyhow::Result<Msg> {
        loop {
            match self.next(PHASE)? {
                Some(m) if want(&m) => return Ok(m),
                Some(_) => {}
                None => bail!("the target closed the return path before {what}"),
            }
        }
    }

    /// Ends our sending side (the cut, or the end of a complete channel) and collects the rest
    /// of the return path until the target closes it (at most `guard`).
    fn close(mut self, guard: Duration) -> anyhow::Result<(Vec<u8>, Pages)> {
        let _ = self.sock.shutdown(Shutdown::Write);
        let end = Instant::now() + guard;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.next(left) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.to_string().starts_with("no return-path message") => {
                    // A target that keeps its side open: torn down after the guard.
                    let _ = self.sock.shutdown(Shutdown::Both);
                    while self.next(PHASE).ok().flatten().is_some() {}
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok((self.kept, self.requested))
    }
}

/// Checks the request the access of `f` caused (`m`, the first request read after it, or for
/// `RerequestFirst` the first message after RESUME_ACK). `Err(message)` names the rule.
fn judge(f: &Fault, m: &Msg, last: Option<&str>) -> Result<String, String> {
    let (want, rule, what) = match &f.expect {
        Expect::FirstRequest(r) => (
            r,
            "SM-FIRST-REQ-NAMED",
            "the first page request on the connection",
        ),
        Expect::RerequestFirst(r) => (r, "SM-REREQUEST", "the first message after RESUME_ACK"),
    };
    let Some((got, named)) = request_of(m, last) else {
        return Err(format!(
            "{rule}: {what} is not a page request but {} (type {}), while the access to {} page {} waits{}",
            hex(&m.1),
            m.0,
            f.block,
            f.page,
            match &f.expect {
                Expect::RerequestFirst(r) => format!(" and {r} still waits from before the cut"),
                Expect::FirstRequest(_) => String::new(),
            }
        ));
    };
    if let Expect::RerequestFirst(r) = &f.expect {
        if (got.start, got.len) != (r.start, r.len) || (named && got.block != r.block) {
            return Err(format!(
                "SM-REREQUEST: {what} requests {got}, not {r}, which a guest access has waited for since before the cut: a destination must request every waiting page again before any new request"
            ));
        }
    }
    if !named {
        return Err(format!(
            "SM-FIRST-REQ-NAMED: {what} is a bare REQ_PAGES ({}), which names no block: the first request on every connection must be REQ_PAGES_ID",
            hex(&m.1)
        ));
    }
    if got != *want {
        return Err(format!("{rule}: {what} requests {got}, want {want}"));
    }
    Ok(format!("{what}: REQ_PAGES_ID {got}"))
}

/// Replays fault case `v` on a target that listens on `port` (capabilities set,
/// `migrate-incoming` sent).
pub(super) fn drive(
    v: &Vector,
    t: &mut Target,
    port: u16,
    breakage: Option<Breakage>,
) -> anyhow::Result<Verdict> {
    let faults = parse_faults(v)?;
    let chans = v.replay_channels().to_vec();
    let mut port = port;
    let mut notes = Vec::new();
    let mut earlier = BTreeSet::new();
    let mut trigger = Trigger::of(t)?;
    for (i, ch) in chans.iter().enumerate() {
        let label = ch["label"].as_str().unwrap_or("?").to_string();
        let bytes = v.read(ch["feed_to_destination"].as_str().context("feed")?)?;
        if i > 0 {
            // The pause was seen after the cut (below).
            port = trigger.recover(t)?;
        }
        let mut conn = LiveConn::open(v, port, earlier.clone(), breakage)?;
        let fault = faults.iter().find(|f| f.channel == label);
        let at = fault.map_or(bytes.len(), |f| f.at.min(bytes.len()));
        if let Some(w) = conn.feed(&bytes[..at]) {
            notes.push(w);
        }
        if let Some(f) = fault {
            match f.after {
                After::Run => {
                    wait_status(t, "postcopy-active").context("before the guest access")?;
                    crate::interop::cell::wait_destination_ran(&mut t.qmp, PHASE)
                        .context("before the guest access")?;
                }
                After::ResumeAck => {
                    conn.until("RESUME_ACK", |m| m.0 == ACK)?;
                }
            }
            let base = v.manifest["machine"]["ram_guest_physical_base"]
                .as_u64()
                .unwrap_or(0);
            if let Some(why) = trigger.access(t, base + f.page * TPS)? {
                return Ok(Verdict::Skip(why));
            }
            let last_before = conn.last_block.clone();
            let m = match f.expect {
                Expect::FirstRequest(_) => conn
                    .until("the page request of the guest access", |m| {
                        m.0 == REQ_ID || m.0 == REQ_BARE
                    })?,
                Expect::RerequestFirst(_) => match conn.next(PHASE) {
                    Ok(Some(m)) => m,
                    Ok(None) => bail!("the target closed the return path after RESUME_ACK"),
                    // The event bound is the new access's request; a target whose accesses are
                    // serialised (QEMU's qtest queues the second behind the first) has only the
                    // phase guard.
                    Err(e) => {
                        return Ok(Verdict::Fail(format!(
                            "{label}: SM-REREQUEST: nothing after RESUME_ACK ({e}) while a guest access has waited for {} page {} since before the cut",
                            f.block, f.page
                        )))
                    }
                },
            };
            let last = if m.0 == REQ_BARE {
                last_before.as_deref()
            } else {
                None
            };
            match judge(f, &m, last) {
                Ok(d) => notes.push(format!(
                    "{label}: access to {} page {}; {d}",
                    f.block, f.page
                )),
                Err(e) => return Ok(Verdict::Fail(format!("{label}: {e}"))),
            }
        }
        if let Some(w) = conn.feed(&bytes[at..]) {
            notes.push(w);
        }
        let cut = ch["ends_mid_stream"].as_bool() == Some(true);
        let (rp, requested) = if cut {
            let r = conn.close(PHASE)?;
            // By the MIGRATION event: a query would wait for a main thread a guest access may
            // block (qtest).
            t.qmp
                .wait_status("postcopy-paused", PHASE)
                .map_err(|e| anyhow!("after the cut: {e}"))?;
            r
        } else {
            let s = wait_done(t);
            let r = conn.close(Duration::from_secs(5))?;
            if s != "completed" {
                return Ok(Verdict::Fail(format!(
                    "{label}: the target ended in {s}, not completed; log: {}",
                    t.log_tail()
                )));
            }
            r
        };
        earlier.extend(requested);
        if let Some(fail) = check_channel_rp(v, ch, rp, breakage, cut)? {
            return Ok(Verdict::Fail(fail));
        }
    }
    wait_status(t, "completed").context("at the end")?;
    trigger.wait_done(t)?;
    notes.push("the guest accesses returned".into());
    final_ram_verdict(v, t, breakage, chans.len(), notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn fault(expect: Expect) -> Fault {
        Fault {
            channel: "main".into(),
            at: 0,
            after: After::Run,
            block: "ram".into(),
            page: 3,
            expect,
        }
    }

    fn page2() -> Req {
        Req {
            block: "ram".into(),
            start: 8192,
            len: 4096,
        }
    }

    /// REQ_PAGES_ID(`ram`, `start`, one page) / REQ_PAGES(`start`, one page) as a target writes
    /// them.
    fn named(start: u64) -> Msg {
        let mut b = vec![0, 3, 0, 16];
        b.extend_from_slice(&start.to_be_bytes());
        b.extend_from_slice(&4096u32.to_be_bytes());
        b.extend_from_slice(b"\x03ram");
        (REQ_ID, b)
    }

    fn bare(start: u64) -> Msg {
        let mut b = vec![0, 4, 0, 12];
        b.extend_from_slice(&start.to_be_bytes());
        b.extend_from_slice(&4096u32.to_be_bytes());
        (REQ_BARE, b)
    }

    #[test]
    fn judge_names_the_rule_each_wrong_request_breaks() {
        let first = fault(Expect::FirstRequest(page2()));
        assert!(judge(&first, &named(8192), None).is_ok());
        let e = judge(&first, &bare(8192), Some("ram")).unwrap_err();
        assert!(e.starts_with("SM-FIRST-REQ-NAMED: "), "{e}");
        let e = judge(&first, &named(4096), None).unwrap_err();
        assert!(e.starts_with("SM-FIRST-REQ-NAMED: "), "{e}");
        let again = fault(Expect::RerequestFirst(page2()));
        assert!(judge(&again, &named(8192), None).is_ok());
        // The new access's page first: the waiting one was not requested again first.
        let e = judge(&again, &named(12288), None).unwrap_err();
        assert!(e.starts_with("SM-REREQUEST: "), "{e}");
        // The right page, bare: the first request of the connection must name its block.
        let e = judge(&again, &bare(8192), Some("ram")).unwrap_err();
        assert!(e.starts_with("SM-FIRST-REQ-NAMED: "), "{e}");
        // Anything else first (a PONG).
        let e = judge(&again, &(2, vec![0, 2, 0, 4, 0, 0, 0, 7]), None).unwrap_err();
        assert!(
            e.starts_with("SM-REREQUEST: the first message after RESUME_ACK is not a page request but 0002000400000007"),
            "{e}"
        );
    }

    fn vector() -> Vector {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("vectors/synthetic/valid-sm-first-req-named-postcopy-72");
        let manifest =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        Vector {
            id: "synthetic/valid-sm-first-req-named-postcopy-72".into(),
            dir,
            manifest,
        }
    }

    /// A "destination" on a local socket writing `bytes` on its return path, then closing.
    fn peer(bytes: &'static [u8]) -> (u16, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(bytes).unwrap();
        });
        (port, h)
    }

    #[test]
    fn hostile_return_path_bytes_fail_with_their_offset() {
        // A PONG, then type 0xffff: RP-TYPE at offset 8.
        let (port, h) = peer(b"\x00\x02\x00\x04\x00\x00\x00\x01\xff\xff\x00\x00");
        let mut c = LiveConn::open(&vector(), port, Pages::new(), None).unwrap();
        assert_eq!(c.next(PHASE).unwrap().unwrap().0, 2);
        let e = c.next(PHASE).unwrap_err().to_string();
        assert!(
            e.contains("does not decode") && e.contains("offset: 8"),
            "{e}"
        );
        assert!(c.next(PHASE).unwrap().is_none());
        h.join().unwrap();
        // A REQ_PAGES_ID cut short by the end of the connection.
        let (port, h) = peer(b"\x00\x03\x00\x10\x00\x00");
        let mut c = LiveConn::open(&vector(), port, Pages::new(), None).unwrap();
        let e = c.next(PHASE).unwrap_err().to_string();
        assert_eq!(
            e,
            "the return path ends inside a message at offset 0: 000300100000"
        );
        h.join().unwrap();
    }

    #[test]
    fn page_request_defects_alter_what_the_checks_see() {
        let all: &'static [u8] = Box::leak(
            [
                named(8192).1,
                bare(12288).1,
                vec![0, 6, 0, 4, 0, 0, 0, 1],
                named(8192).1,
                bare(16384).1,
            ]
            .concat()
            .into_boxed_slice(),
        );
        let seen = |b: Option<Breakage>| {
            let (port, h) = peer(all);
            let earlier: Pages = [("ram".to_string(), 8192)].into_iter().collect();
            let mut c = LiveConn::open(&vector(), port, earlier, b).unwrap();
            let mut out = Vec::new();
            while let Some(m) = c.next(PHASE).unwrap() {
                out.push(m.1);
            }
            h.join().unwrap();
            out
        };
        let ack = vec![0, 6, 0, 4, 0, 0, 0, 1];
        for (b, want) in [
            (
                None,
                vec![
                    named(8192).1,
                    bare(12288).1,
                    ack.clone(),
                    named(8192).1,
                    bare(16384).1,
                ],
            ),
            // bare-first-req: only the connection's first REQ_PAGES_ID loses its name.
            (
                Some(Breakage::BareFirstReq),
                vec![
                    bare(8192).1,
                    bare(12288).1,
                    ack.clone(),
                    named(8192).1,
                    bare(16384).1,
                ],
            ),
            // no-rerequest: after RESUME_ACK the request for page 2 (asked before) is gone.
            (
                Some(Breakage::NoRerequest),
                vec![named(8192).1, bare(12288).1, ack.clone(), bare(16384).1],
            ),
        ] {
            assert_eq!(seen(b), want, "{b:?}");
        }
    }
}
