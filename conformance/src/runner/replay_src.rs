//! Replay against a source: the runner plays the destination.
//!
//! Per captured vector whose source can be reproduced (machine, wire profile and capabilities
//! from the manifest, the RAM blocks its stream announces in MEM_SIZE): the runner rebuilds the
//! main RAM block as the capture ended (`qmig extract`'s rebuild of the vector's channels) and starts the target with
//! it as its guest RAM (`{RAM_FILE}`), a static guest. It listens on `{CONNECT}`, sends
//! `migrate`, and serves the migration with [`super::play_dst::Player`]: every byte through
//! the protocol crate's `StreamDecoder` (a violation fails the case with rule and offset),
//! PINGs answered, the return-path rules of the `Destination` machine.
//!
//! The vector decides the mode:
//!
//! * **precopy**: the migration must complete;
//! * **postcopy** (`postcopy-ram` on the captured source): `migrate-start-postcopy` at
//!   `active`; once POSTCOPY_RUN is in, the runner requests up to three pages it does not
//!   have (page requests on the return path) and each must arrive;
//! * **postcopy recovery** (two replay channels): as postcopy, then once the requested pages
//!   arrived the runner cuts the connection 16 KiB later (or, for a `migrate-pause` vector,
//!   sends `migrate-pause` to the source); both sides must pause; the source resumes with
//!   `migrate resume=true` to a new port, the runner answers each MIG_CMD_RECV_BITMAP with a
//!   CHOSEN bitmap (the pages it received on the first connection, odd page indices cleared)
//!   and checks that the recovery connection carries a record for exactly the clear pages,
//!   each once, and none for a set page.
//!
//! A template using `{QTEST}` (QEMU: [`QEMU_SRC_TEMPLATE`]) gets its RAM written through qtest
//! instead of `{RAM_FILE}`. A source with `multifd` gets the captured `multifd-channels`; the
//! runner accepts those connections after the main one ([`super::play_multifd`]).
//!
//! Then `completed` on both sides, every page of every block received, the main block equal
//! to the image the source started from, and to the source's own `pmemsave`.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::machine::MigrationStatus;
use serde_json::{json, Value};

use super::broken_src::{SrcBreakage, Tamper};
use super::play_dst::{End, Fail, NoStop, Player, Stop, TPS};
use super::play_multifd::MultifdReceiver;
use super::replay_dst::{block_list, values_for, Verdict};
use super::shim::{self, scratch_dir, StartError, Target};
use super::vector::Vector;
use crate::qemu::pattern::sha256_hex;

/// Failure guard for one migration phase.
pub(super) const PHASE: Duration = Duration::from_secs(120);

/// The qmig-src source template.
pub const QMIG_SRC_TEMPLATE: &str = "{BIN_DIR}/qmig-src --qmp unix:{QMP} --ram {RAM} --machine {MACHINE} --profile {PROFILE} --fill {RAM_FILE} {BLOCK_ARGS} {DEVICES}";

/// A QEMU source: its guest RAM is written through qtest (`{QTEST}`) before the migration;
/// `-S` keeps the vCPU stopped, so that the guest is static.
pub const QEMU_SRC_TEMPLATE: &str = "{QEMU} -M {MACHINE} {CPU} -m {RAM} -nodefaults -nographic -display none -S {BIOS} -qmp unix:{QMP},server=on,wait=off -qtest unix:{QTEST},server=on,wait=off -qtest-log /dev/null";

/// Capabilities of the captured source the runner does not set on the target: `events` (set
/// anyway) and `pause-before-switchover` (a capture-harness detail: the runner sends no
/// `migrate-continue`).
const NOT_PASSED: &[&str] = &["events", "pause-before-switchover"];

/// What a source target is.
#[derive(Clone, Debug)]
pub struct SrcTarget {
    /// Label in results.
    pub label: String,
    /// The command-line template.
    pub template: String,
    /// Extra scalar placeholder values (`BIN_DIR`).
    pub extra: Vec<(String, String)>,
    /// A deliberate defect placed between the source and the checks (self-test).
    pub breakage: Option<SrcBreakage>,
}

/// How a vector is replayed against a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Precopy,
    Postcopy,
    /// A recovery after a cut (`pause` false) or `migrate-pause`; with `cancel`, the runner
    /// cancels the paused source instead of resuming it (SM-CANCEL).
    Recover {
        pause: bool,
        cancel: bool,
    },
}

impl Mode {
    /// The mode of captured vector `v`.
    fn of(v: &Vector) -> Mode {
        if v.replay_channels().len() >= 2 {
            let pause = v.manifest["failure_trigger"] == "migrate-pause"
                || v.manifest["scenario"]
                    .as_str()
                    .is_some_and(|s| s.contains("pause"));
            Mode::Recover {
                pause,
                cancel: false,
            }
        } else if v.manifest["sides"]["source"]["capabilities"]["postcopy-ram"] == true {
            Mode::Postcopy
        } else {
            Mode::Precopy
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Recover { cancel: true, .. } => "postcopy cancel while paused",
            Mode::Recover { pause: false, .. } => "postcopy recovery after a cut",
            Mode::Recover { pause: true, .. } => "postcopy recovery after migrate-pause",
        }
    }
}

/// Why a vector has no replay against a source (`None`: it has one).
pub fn not_replayable(v: &Vector) -> Option<String> {
    if v.synthetic().is_some() {
        return Some("synthetic vector: no source to reproduce".into());
    }
    if v.replay_channels().is_empty() || v.manifest["final_ram"]["sha256"].as_str().is_none() {
        return Some("no replay section or final_ram".into());
    }
    match v.manifest["machine"]["type"].as_str() {
        Some("none" | "microvm") => None,
        m => Some(format!("machine {m:?}")),
    }
}

/// The capabilities the target source gets (besides `events`).
fn source_caps(v: &Vector) -> Vec<String> {
    v.manifest["sides"]["source"]["capabilities"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, on)| on.as_bool() == Some(true) && !NOT_PASSED.contains(&k.as_str()))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Rebuilds the vector's main RAM block as the capture ended (every channel, multifd
/// connections and the recovery channel included) into `dir`; returns its path and the RAM
/// blocks (name, bytes) the captured source announced in MEM_SIZE, main block first.
fn ram_image(v: &Vector, dir: &Path) -> anyhow::Result<(PathBuf, Vec<(String, u64)>)> {
    let mut opts = crate::cli::StreamOpts::default();
    if v.has("vmdesc.json") {
        opts.vmdesc = Some(v.dir.join("vmdesc.json"));
    }
    let chans = v.replay_channels();
    let multifd: Vec<PathBuf> = chans
        .iter()
        .flat_map(|c| {
            c["multifd_connections_in_order"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|f| f.as_str().map(|f| v.dir.join(f)))
        .collect();
    let main = chans[0]["feed_to_destination"]
        .as_str()
        .context("feed_to_destination")?;
    let recovery = chans
        .get(1)
        .and_then(|c| c["feed_to_destination"].as_str())
        .map(|f| v.dir.join(f));
    let out = dir.join("image");
    let (img, _, _) = crate::cli::extract::rebuild(
        &v.dir.join(main),
        &opts,
        &multifd,
        recovery.as_deref(),
        &out,
    )?;
    let want = block_list(v)[0].0.clone();
    let path = img
        .blocks
        .iter()
        .find(|b| b.name == want)
        .map(|b| b.path.clone())
        .ok_or_else(|| anyhow!("the vector's stream has no block {want}"))?;
    let mut blocks: Vec<(String, u64)> = vec![(want.clone(), 0)];
    for b in &img.blocks {
        if b.name == want {
            blocks[0].1 = b.len;
        } else {
            blocks.push((b.name.clone(), b.len));
        }
    }
    Ok((path, blocks))
}

/// Replays `v` against source `target`.
pub fn replay(v: &Vector, target: &SrcTarget) -> Verdict {
    if let Some(why) = not_replayable(v) {
        return Verdict::Skip(why);
    }
    in_scratch("src", |dir| replay_in(v, target, dir))
}

/// Runs `f` in a fresh scratch directory (removed afterwards); an error fails the case.
pub(super) fn in_scratch(tag: &str, f: impl FnOnce(&Path) -> anyhow::Result<Verdict>) -> Verdict {
    let dir = match scratch_dir(tag) {
        Ok(d) => d,
        Err(e) => return Verdict::Fail(format!("{e:#}")),
    };
    let r = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    match r {
        Ok(v) => v,
        Err(e) => Verdict::Fail(format!("{e:#}")),
    }
}

fn replay_in(v: &Vector, target: &SrcTarget, dir: &Path) -> anyhow::Result<Verdict> {
    let (image, blocks) = ram_image(v, dir).context("rebuilding the vector's RAM")?;
    let fill = std::fs::read(&image)?;
    let block_args = blocks[1..]
        .iter()
        .flat_map(|(n, l)| ["--block".to_string(), format!("{n}:{l}")])
        .collect();
    let devices = if v.manifest["machine"]["type"] == "microvm" {
        vec![
            "--device-template".into(),
            v.dir.join("stream.bin").display().to_string(),
        ]
    } else {
        vec![]
    };
    let placed = Placed {
        image: &image,
        fill: &fill,
        block_args,
        devices,
    };
    let plan = Plan {
        mode: Mode::of(v),
        caps: source_caps(v),
        breakage: target.breakage,
    };
    run_source(v, target, dir, placed, |t, l| {
        drive(v, t, l, &fill, &blocks, plan)
    })
}

/// The guest RAM a source target starts with.
pub(super) struct Placed<'a> {
    /// The main block's image file (`{RAM_FILE}`).
    pub image: &'a Path,
    /// Its bytes (written through qtest when the template uses `{QTEST}`).
    pub fill: &'a [u8],
    /// `{BLOCK_ARGS}`.
    pub block_args: Vec<String>,
    /// `{DEVICES}`.
    pub devices: Vec<String>,
}

/// Starts source `target` for `v` in `dir` with the guest RAM of `ram` and a listener on
/// `{CONNECT}`, then runs `drive`; an error is reported with the source's status and log
/// tail, and exit code 89 (or a refused start) as a skip.
pub(super) fn run_source(
    v: &Vector,
    target: &SrcTarget,
    dir: &Path,
    ram: Placed<'_>,
    drive: impl FnOnce(&mut Target, TcpListener) -> anyhow::Result<Verdict>,
) -> anyhow::Result<Verdict> {
    let mut vals = values_for(v, dir, &target.extra)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    vals.set("CONNECT", format!("tcp:127.0.0.1:{port}"));
    vals.set("LISTEN", format!("tcp:127.0.0.1:{port}"));
    vals.set("RAM_FILE", ram.image.display().to_string());
    vals.list("BLOCK_ARGS", ram.block_args);
    vals.list("DEVICES", ram.devices);
    let qtest = dir.join("qtest.sock");
    vals.set("QTEST", qtest.display().to_string());
    let argv = shim::expand(&target.template, &vals)?;
    let mut t = match Target::start(argv, dir, &dir.join("qmp.sock")) {
        Ok(t) => t,
        Err(StartError::Unsupported(m)) => {
            return Ok(Verdict::Skip(format!(
                "target reports unsupported (exit 89): {m}"
            )))
        }
        Err(StartError::Failed(e)) => return Err(e),
    };
    if target.template.contains("{QTEST}") {
        load_through_qtest(v, &qtest, ram.fill).context("writing the guest RAM through qtest")?;
    }
    match drive(&mut t, listener) {
        Err(e) => {
            if t.exit_code() == Some(shim::EXIT_UNSUPPORTED) {
                return Ok(Verdict::Skip(format!(
                    "target reports unsupported (exit 89): {}",
                    t.log_tail()
                )));
            }
            Err(e.context(format!(
                "source status {}; source log: {}",
                status_of(&mut t),
                t.log_tail()
            )))
        }
        ok => ok,
    }
}

/// Writes the non-zero pages of `fill` into the target's guest-physical RAM from
/// `ram_guest_physical_base` through qtest (on microvm pages 192-255 are the firmware window
/// and are left alone).
fn load_through_qtest(v: &Vector, sock: &Path, fill: &[u8]) -> anyhow::Result<()> {
    let mut q = crate::qemu::qtest::Qtest::connect(sock, Duration::from_secs(30))?;
    let base = v.manifest["machine"]["ram_guest_physical_base"]
        .as_u64()
        .unwrap_or(0);
    let microvm = v.manifest["machine"]["type"] == "microvm";
    for (i, pg) in fill.chunks(TPS as usize).enumerate() {
        if (microvm && (192..256).contains(&i)) || pg.iter().all(|&b| b == 0) {
            continue;
        }
        q.write(base + i as u64 * TPS, pg)?;
    }
    Ok(())
}

pub(super) fn status_of(t: &mut Target) -> String {
    t.qmp
        .migration_status()
        .unwrap_or_else(|e| format!("(query-migrate failed: {e})"))
}

pub(super) fn wait_status(t: &mut Target, want: &str) -> anyhow::Result<()> {
    if status_of(t) == want {
        return Ok(());
    }
    t.qmp.wait_status(want, PHASE).map_err(|e| {
        anyhow!(
            "source: waiting for {want}: {e} (status now {})",
            status_of(t)
        )
    })?;
    Ok(())
}

/// Sends `migrate` to the runner's `listener`; in postcopy first the slow precopy (8 KiB/s,
/// so that pages are left to request after POSTCOPY_RUN) and a 256 KiB/s postcopy cap.
pub(super) fn start_migration(
    t: &mut Target,
    postcopy: bool,
    listener: &TcpListener,
) -> anyhow::Result<()> {
    if postcopy {
        t.qmp
            .execute(
                "migrate-set-parameters",
                json!({"max-bandwidth": 8192, "max-postcopy-bandwidth": 262144}),
            )
            .context("migrate-set-parameters")?;
    }
    let port = listener.local_addr()?.port();
    t.qmp
        .execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .context("migrate")?;
    Ok(())
}

/// Lifts the postcopy bandwidth cap (the requested pages arrived: the rest may follow fast).
pub(super) fn unthrottle(t: &mut Target) -> Result<(), Fail> {
    t.qmp
        .execute(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 1u64 << 30}),
        )
        .map_err(|e| format!("migrate-set-parameters: {e}"))?;
    Ok(())
}

/// Accepts the source's connection (guarded: the target exiting or 30 s).
pub(super) fn accept(l: &TcpListener, t: &mut Target) -> anyhow::Result<TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(c) = t.exit_code() {
                    anyhow::bail!("the source exited ({c}) before connecting");
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "the source did not connect within 30 s (status {})",
                        status_of(t)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The first connection's stop policy in postcopy: page requests after RUN, then (recovery
/// modes) the cut or `migrate-pause` once they arrived.
struct Postcopy<'t> {
    t: &'t mut Target,
    mode: Mode,
    fill: &'t [u8],
    asked: bool,
    acted: bool,
    cut_at: Option<u64>,
}

impl Postcopy<'_> {
    /// Up to three main-block pages not received yet: non-zero ones of the image first, from
    /// the end of the block.
    fn choose(&self, p: &Player) -> Vec<u64> {
        let pages = p.blocks[0].1;
        let missing = |i: &u64| !p.first[0].test(*i);
        let nonzero = |i: &u64| {
            let o = (*i * TPS) as usize;
            self.fill[o..o + TPS as usize].iter().any(|&b| b != 0)
        };
        let mut out: Vec<u64> = (0..pages)
            .rev()
            .filter(missing)
            .filter(nonzero)
            .take(3)
            .collect();
        for i in (0..pages).rev().filter(missing) {
            if out.len() >= 3 {
                break;
            }
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out
    }
}

impl Stop for Postcopy<'_> {
    fn cut_now(&mut self, p: &mut Player, sock: &mut TcpStream) -> Result<bool, Fail> {
        if !self.asked {
            if !(p.run_seen && p.status() == MigrationStatus::PostcopyActive) {
                return Ok(false);
            }
            self.asked = true;
            for page in self.choose(p) {
                p.request(sock, 0, page)?;
            }
            return Ok(false);
        }
        if p.requests.iter().any(|q| q.arrived_at.is_none()) || self.acted {
            if let Some(at) = self.cut_at {
                return Ok(p.bytes >= at);
            }
            return Ok(false);
        }
        // The chosen bitmap keeps the even pages that arrived: wait for two of them, so that
        // it marks some pages received whatever the requested pages were (three odd requested
        // pages and no background page yet gave an empty bitmap, against which a source that
        // resends received pages cannot be caught).
        if matches!(self.mode, Mode::Recover { .. }) && even_received(p) < 2 {
            return Ok(false);
        }
        self.acted = true;
        match self.mode {
            Mode::Recover { pause: false, .. } => {
                self.cut_at = Some(p.bytes + 16384);
                Ok(false)
            }
            Mode::Recover { pause: true, .. } => {
                self.t
                    .qmp
                    .execute("migrate-pause", Value::Null)
                    .map_err(|e| format!("migrate-pause on the source: {e}"))?;
                Ok(false)
            }
            _ => {
                unthrottle(self.t)?;
                Ok(false)
            }
        }
    }
}

/// SM-CANCEL on a paused source: `migrate_cancel` is accepted, the source reaches `cancelled`
/// (its MIGRATION event; `cancelling` may come first), every wait released (it does not stay
/// in `cancelling` waiting for a recovery), and it still answers QMP.
fn cancel_paused(t: &mut Target, p: &Player, notes: &[String]) -> anyhow::Result<Verdict> {
    if let Err(e) = t.qmp.execute("migrate_cancel", Value::Null) {
        return Ok(Verdict::Fail(format!(
            "SM-CANCEL: migrate_cancel refused in postcopy-paused: {e}"
        )));
    }
    if let Err(e) = t.qmp.wait_status("cancelled", PHASE) {
        return Ok(Verdict::Fail(format!(
            "SM-CANCEL: no `cancelled` after migrate_cancel in postcopy-paused: {e} (status {})",
            status_of(t)
        )));
    }
    let status = status_of(t);
    if status != "cancelled" {
        return Ok(Verdict::Fail(format!(
            "SM-CANCEL: query-migrate says {status} after the `cancelled` event"
        )));
    }
    Ok(Verdict::Pass(format!(
        "postcopy cancel while paused: both sides paused after the cut (played destination {}); migrate_cancel -> cancelled; QMP answers; {}",
        p.status(),
        notes.join("; ")
    )))
}

/// Pages with an even index received on the first connection, over all blocks (the pages the
/// chosen RECV_BITMAP keeps set).
fn even_received(p: &Player) -> usize {
    p.first
        .iter()
        .map(|b| b.iter_ones().filter(|i| i % 2 == 0).count())
        .sum()
}

fn first_page(b: &PageBitmap) -> Option<u64> {
    b.iter_ones().next()
}

/// How [`drive`] runs a migration.
pub(super) struct Plan {
    /// Precopy, postcopy or a recovery.
    pub mode: Mode,
    /// The capabilities the source gets (besides `events`).
    pub caps: Vec<String>,
    /// A deliberate defect placed between the source and the checks.
    pub breakage: Option<SrcBreakage>,
}

/// Runs the migration of `plan` from source `t` (which starts with guest RAM `fill`, blocks
/// `blocks`) to the runner's played destination on `listener`, and judges it.
pub(super) fn drive(
    v: &Vector,
    t: &mut Target,
    listener: TcpListener,
    fill: &[u8],
    blocks: &[(String, u64)],
    plan: Plan,
) -> anyhow::Result<Verdict> {
    let Plan {
        mode,
        caps,
        breakage,
    } = plan;
    let postcopy = mode != Mode::Precopy;
    let mut list = vec![json!({"capability": "events", "state": true})];
    list.extend(caps.iter().map(|c| json!({"capability": c, "state": true})));
    if let Err(e) = t
        .qmp
        .execute("migrate-set-capabilities", json!({"capabilities": list}))
    {
        let special: Vec<&String> = caps
            .iter()
            .filter(|c| !matches!(c.as_str(), "return-path" | "postcopy-ram"))
            .collect();
        if !special.is_empty() {
            let names: Vec<&str> = special.iter().map(|s| s.as_str()).collect();
            return Ok(Verdict::Skip(format!(
                "target refuses {}: {e}",
                names.join(", ")
            )));
        }
        return Err(anyhow!(e).context("migrate-set-capabilities"));
    }
    // Multifd: the captured number of channels; the runner accepts them after the main one.
    let multifd = caps.iter().any(|c| c == "multifd").then(|| {
        v.manifest["sides"]["source"]["parameters"]["multifd-channels"]
            .as_u64()
            .unwrap_or(2)
    });
    if let Some(n) = multifd {
        t.qmp
            .execute("migrate-set-parameters", json!({"multifd-channels": n}))
            .context("migrate-set-parameters multifd-channels")?;
    }
    start_migration(t, postcopy, &listener)?;
    let mut sock = accept(&listener, t)?;
    let mfd = match multifd {
        Some(n) => Some(MultifdReceiver::start(
            listener.try_clone()?,
            n as usize,
            v.profile(),
        )),
        None => None,
    };
    let machine = v.manifest["machine"]["type"].as_str().unwrap_or("none");
    let mut p = Player::new(
        v.profile(),
        machine,
        blocks,
        postcopy,
        breakage.map(Tamper::new),
    )
    .map_err(|e| anyhow!(e))?;
    let fail = |p: &Player, m: String| Ok(Verdict::Fail(format!("{m}{}", p.broken_note())));
    if postcopy {
        wait_status(t, "active")?;
        t.qmp
            .execute("migrate-start-postcopy", Value::Null)
            .context("migrate-start-postcopy")?;
    }
    let end = {
        let mut stop: Box<dyn Stop> = if postcopy {
            Box::new(Postcopy {
                t: &mut *t,
                mode,
                fill,
                asked: false,
                acted: false,
                cut_at: None,
            })
        } else {
            Box::new(NoStop)
        };
        match p.serve(&mut sock, stop.as_mut()) {
            Ok(e) => e,
            Err(m) => return fail(&p, m),
        }
    };
    drop(sock);
    let mut notes = vec![format!("{} bytes on the main connection", p.bytes)];
    let first_bytes = p.bytes;
    if let Mode::Recover { pause, cancel } = mode {
        let want = if pause { End::Closed } else { End::Cut };
        if end != want {
            return fail(
                &p,
                format!(
                    "first connection ended {end:?}, expected {want:?} (status {})",
                    p.status()
                ),
            );
        }
        if p.status() != MigrationStatus::PostcopyPaused {
            return fail(
                &p,
                format!(
                    "the played destination is {} after the {}, not postcopy-paused",
                    p.status(),
                    if pause { "pause" } else { "cut" }
                ),
            );
        }
        wait_status(t, "postcopy-paused").context("after the first connection")?;
        if cancel {
            return cancel_paused(t, &p, &notes);
        }
        // The chosen bitmap: what arrived, odd pages cleared.
        let chosen: Vec<PageBitmap> = p
            .first
            .iter()
            .map(|b| {
                let mut c = b.clone();
                for i in (1..c.pages()).step_by(2) {
                    c.clear(i);
                }
                c
            })
            .collect();
        p.chosen = Some(chosen);
        p.recover().map_err(|e| anyhow!(e))?;
        let l2 = TcpListener::bind("127.0.0.1:0")?;
        let port2 = l2.local_addr()?.port();
        t.qmp
            .execute(
                "migrate-set-parameters",
                json!({"max-postcopy-bandwidth": 1u64 << 30}),
            )
            .context("migrate-set-parameters")?;
        t.qmp
            .execute(
                "migrate",
                json!({"uri": format!("tcp:127.0.0.1:{port2}"), "resume": true}),
            )
            .context("migrate resume=true")?;
        let mut s2 = accept(&l2, t)?;
        let end2 = match p.serve(&mut s2, &mut NoStop) {
            Ok(e) => e,
            Err(m) => return fail(&p, format!("recovery connection: {m}")),
        };
        if end2 != End::Completed {
            return fail(
                &p,
                format!(
                    "recovery connection ended before completion (played destination {})",
                    p.status()
                ),
            );
        }
        notes.push(format!("{} bytes on the recovery connection", p.bytes));
    } else if end != End::Completed {
        return fail(
            &p,
            format!(
                "the source closed before the migration completed (played destination {}, offset {first_bytes})",
                p.status()
            ),
        );
    }
    if let Some(m) = mfd {
        let pages = match m.finish() {
            Ok(x) => x,
            Err(e) => return fail(&p, e),
        };
        let n = pages.len();
        for (name, addr, data) in pages {
            if let Err(e) = p.place_multifd(&name, addr, data.as_deref()) {
                return fail(&p, e);
            }
        }
        notes.push(format!(
            "{} multifd connection(s): {n} pages",
            multifd.unwrap_or(0)
        ));
    }
    wait_status(t, "completed").context("at the end")?;
    // Page requests.
    if postcopy {
        if p.requests.is_empty() {
            return fail(
                &p,
                "postcopy never reached POSTCOPY_RUN with pages left to request".into(),
            );
        }
        let mut arr = Vec::new();
        for q in &p.requests {
            match q.arrived_at {
                Some(a) => arr.push(format!("{}@+{}", q.page, a.saturating_sub(q.asked_at))),
                None => {
                    return fail(
                        &p,
                        format!(
                            "requested page {} of {} (asked at offset {}) never arrived on the connection",
                            q.page, blocks[q.block].0, q.asked_at
                        ),
                    )
                }
            }
        }
        notes.push(format!(
            "requested pages arrived (page@+bytes after the request): {}",
            arr.join(" ")
        ));
    }
    // The resend rule.
    if let Some(chosen) = p.chosen.clone() {
        let mut set = 0;
        let mut clear = 0;
        for (b, c) in chosen.iter().enumerate() {
            let mut missing = c.clone();
            missing.or(&p.resent[b]);
            missing.complement();
            if let Some(i) = first_page(&missing) {
                return fail(
                    &p,
                    format!(
                        "SM-REBUILD: recovery: {} page(s) the RECV_BITMAP left clear were not resent (first: {} page {i})",
                        missing.count_ones(),
                        blocks[b].0
                    ),
                );
            }
            let mut extra = p.resent[b].clone();
            let mut not_chosen = c.clone();
            not_chosen.complement();
            extra.and_not(&not_chosen);
            if let Some(i) = first_page(&extra) {
                return fail(
                    &p,
                    format!(
                        "SM-REBUILD: recovery: {} page(s) the RECV_BITMAP marked received were resent (first: {} page {i})",
                        extra.count_ones(),
                        blocks[b].0
                    ),
                );
            }
            set += c.count_ones();
            clear += c.pages() - c.count_ones();
        }
        if let Some((b, i)) = p.resent_twice.first() {
            return fail(
                &p,
                format!(
                    "SM-REBUILD: recovery: {} page record(s) sent twice (first: {} page {i})",
                    p.resent_twice.len(),
                    blocks[*b].0
                ),
            );
        }
        notes.push(format!(
            "RECV_BITMAP sent for [{}] ({set} pages set = received, odd pages cleared); exactly the {clear} clear pages resent, once each",
            p.bitmaps_sent.join(", ")
        ));
    }
    // Every page arrived, RAM equal.
    for (b, first) in p.first.iter().enumerate() {
        let mut all = first.clone();
        all.or(&p.resent[b]);
        let missing = all.iter_zeros().next();
        if let Some(i) = missing {
            return fail(&p, format!("{} page {i} never arrived", blocks[b].0));
        }
    }
    let ram = &p.mem.blocks[0];
    let microvm = v.manifest["machine"]["type"] == "microvm";
    if let Some(i) = diff_page(ram, fill, microvm) {
        return fail(
            &p,
            format!(
                "final RAM: {} page {i} differs from the source's initial RAM (sha256 {} want {})",
                blocks[0].0,
                sha256_hex(&ram[i * TPS as usize..(i + 1) * TPS as usize]),
                sha256_hex(&fill[i * TPS as usize..(i + 1) * TPS as usize])
            ),
        );
    }
    let base = v.manifest["machine"]["ram_guest_physical_base"]
        .as_u64()
        .unwrap_or(0);
    if let Some(m) = pmemsave_differs(t, base, ram, microvm)? {
        return fail(&p, m);
    }
    let mut s = format!(
        "{}: every byte decoded, completed; RAM ({} MiB) equal to the source's",
        mode.name(),
        ram.len() >> 20
    );
    for n in notes {
        s.push_str("; ");
        s.push_str(&n);
    }
    if let Some(n) = p.tamper.as_ref().and_then(|t| t.note.clone()) {
        s.push_str(&format!("; broken source: {n}"));
    }
    Ok(Verdict::Pass(s))
}

/// First differing page (microvm: pages 192-255, the firmware window of a QEMU guest that a
/// QEMU source's guest cannot write, skipped).
pub(super) fn diff_page(a: &[u8], b: &[u8], microvm: bool) -> Option<usize> {
    a.chunks(TPS as usize)
        .zip(b.chunks(TPS as usize))
        .enumerate()
        .find(|(i, (x, y))| x != y && !(microvm && (192..256).contains(i)))
        .map(|(i, _)| i)
}

/// The source's `pmemsave` of `want.len()` bytes from guest-physical `base` compared with
/// `want`: a message when they differ (microvm: as [`diff_page`]).
pub(super) fn pmemsave_differs(
    t: &mut Target,
    base: u64,
    want: &[u8],
    microvm: bool,
) -> anyhow::Result<Option<String>> {
    let file = t.dir.join("src-pmemsave.bin");
    t.qmp
        .execute(
            "pmemsave",
            json!({"val": base, "size": want.len(), "filename": file.display().to_string()}),
        )
        .context("pmemsave on the source")?;
    let theirs = std::fs::read(&file).context("pmemsave output")?;
    let _ = std::fs::remove_file(&file);
    if theirs.len() != want.len() {
        return Ok(Some(format!(
            "source pmemsave wrote {} of {} bytes",
            theirs.len(),
            want.len()
        )));
    }
    Ok(diff_page(want, &theirs, microvm).map(|i| {
        format!(
            "final RAM: page {i} differs from the source's pmemsave (sha256 {} want {})",
            sha256_hex(&theirs[i * TPS as usize..(i + 1) * TPS as usize]),
            sha256_hex(&want[i * TPS as usize..(i + 1) * TPS as usize])
        )
    }))
}
