//! One interop cell: start both sides, migrate through the recording proxy in the cell's mode
//! (cuts, pause, recoveries), wait for `completed` on both sides (MIGRATION events), and compare
//! the whole guest RAM of both sides byte for byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use super::side::{Guest, Side, SideError};
use super::{Impl, Mode};
use crate::qemu::driver::pattern;
use crate::qemu::pattern::{random_page, sha256_hex, PAGE};
use crate::qemu::{Machine, Proxy};
use crate::runner::shim::free_port;

/// Where `double-failure` cuts the recovery channel: after 4 bytes, inside the source's first
/// MIG_CMD_RECV_BITMAP (type byte, be16 command, first byte of the be16 length), so both sides
/// are still in `postcopy-recover` whatever the guest. (At byte 64, used before, a one-block
/// guest's channel is already past RECV_BITMAP `ram` (9 bytes) and POSTCOPY_RESUME (5 bytes):
/// the destination had finished its side of the recovery before the cut.)
const SECOND_CUT: u64 = 4;

/// Failure guard for one phase.
const PHASE: Duration = Duration::from_secs(90);

/// How a cell did not pass.
pub enum CellError {
    /// Not runnable here (binary missing).
    Skip(String),
    /// Failed, with the reason.
    Fail(String),
}

/// The guest of a pair. A QEMU source runs a guest that qtest can write (the pattern before the
/// migration, more pages during `precopy-dirty`): QEMU 7.2 `-M none -cpu qemu64,apic-id=0`,
/// QEMU 10.0 microvm with the test firmware (QEMU 10.0 aborts saving an x86 CPU on `-M none`:
/// `X86_MACHINE_CLASS: Object … is not an instance of type x86-machine`), the destination on the
/// same machine. A qmig source runs `-M none` without CPU (qmig-src fills its RAM from a seed).
pub fn guest(s: Impl, _d: Impl, m: Mode) -> Guest {
    let postcopy = !matches!(m, Mode::Precopy | Mode::PrecopyDirty);
    let (machine, ram_mb) = match s {
        Impl::Qemu72 => (Machine::NoneCpu, 32),
        Impl::Qemu100 => (Machine::Microvm, 32),
        Impl::Qmig => (Machine::NoneNoCpu, if postcopy { 64 } else { 32 }),
    };
    Guest {
        machine,
        ram_mb,
        seed: 0x1e7 + m as u64,
    }
}

/// Runs one cell.
pub fn run(s: Impl, d: Impl, m: Mode) -> Result<String, CellError> {
    let g = guest(s, d, m);
    let start = |imp, incoming, peer| {
        Side::start(imp, incoming, g, peer, m == Mode::PrecopyDirty).map_err(|e| match e {
            SideError::Skip(w) => CellError::Skip(w),
            SideError::Fail(e) => {
                CellError::Fail(format!("start {}: {e:#}", imp_name(imp, incoming)))
            }
        })
    };
    let mut dst = start(d, true, s)?;
    let mut src = start(s, false, d)?;
    match migrate(&mut src, &mut dst, g, m) {
        Ok(detail) => Ok(detail),
        Err(e) => Err(CellError::Fail(format!(
            "{e:#}; source status {}, destination status {}; source log: {}; destination log: {}",
            src.status(),
            dst.status(),
            src.log(),
            dst.log()
        ))),
    }
}

fn imp_name(i: Impl, incoming: bool) -> String {
    match (i, incoming) {
        (Impl::Qmig, true) => "qmig-dst".into(),
        (Impl::Qmig, false) => "qmig-src".into(),
        (i, _) => i.name().into(),
    }
}

fn wait(side: &mut Side, which: &str, status: &str) -> anyhow::Result<()> {
    side.qmp()
        .wait_status(status, PHASE)
        .map_err(|e| anyhow!("{which} never reached {status}: {e}"))?;
    Ok(())
}

fn listen(dst: &mut Side, cmd: &str) -> anyhow::Result<SocketAddr> {
    let port = free_port()?;
    dst.cmd(cmd, json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn migrate(src: &mut Side, dst: &mut Side, g: Guest, m: Mode) -> anyhow::Result<String> {
    let postcopy = !matches!(m, Mode::Precopy | Mode::PrecopyDirty);
    let mut caps = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "return-path", "state": true}),
    ];
    if postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    for side in [&mut *src, &mut *dst] {
        side.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": caps.clone()}),
        )?;
    }
    // Guest content of a QEMU source with qtest.
    let mut written = 0;
    if g.machine.has_qtest() {
        for w in pattern(g.seed, g.machine, g.ram_mb, 48) {
            if src.qtest_write(w.page * PAGE as u64, &w.data)? {
                written += 1;
            }
        }
    }
    let mut params = serde_json::Map::new();
    if postcopy {
        params.insert("max-bandwidth".into(), json!(8192));
        params.insert("max-postcopy-bandwidth".into(), json!(32768));
    } else if m == Mode::PrecopyDirty && g.machine.has_qtest() {
        // Slow enough that precopy cannot converge while pages are being dirtied; raised once
        // the writes stop (a write after the final dirty sync would be a harness race: a real
        // guest is stopped by then).
        params.insert("max-bandwidth".into(), json!(8192));
    }
    if !params.is_empty() {
        src.cmd("migrate-set-parameters", Value::Object(params))?;
    }
    let dest = listen(dst, "migrate-incoming")?;
    let proxy1 = Proxy::start(dest)?;
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", proxy1.port())}),
    )?;
    let mut notes = Vec::new();
    let mut proxies = vec![proxy1];
    match m {
        Mode::Precopy => {}
        Mode::PrecopyDirty => {
            wait(src, "source", "active")?;
            let pages = (g.ram_mb << 20) / PAGE as u64;
            let mut n = 0u32;
            // Keep writing while the first passes run (QEMU through qtest; qmig-src has its
            // own workload), then let it converge.
            while src.status() == "active" && n < 300 {
                let p = 1 + (n as u64 * 7919) % (pages - 1);
                if g.machine.reserved_pages().contains(&p) {
                    n += 1;
                    continue;
                }
                if !src.qtest_write(p * PAGE as u64, &random_page(g.seed, p, n + 1))? {
                    break;
                }
                n += 1;
            }
            if n > 0 {
                notes.push(format!(
                    "{n} pages written through qtest during the migration"
                ));
                src.cmd(
                    "migrate-set-parameters",
                    json!({"max-bandwidth": 1u64 << 30}),
                )?;
            } else {
                notes.push(
                    "the source's own workload (random, 200 pages/s) wrote during the migration"
                        .into(),
                );
            }
        }
        _ => {
            // Postcopy from the source's first iteration (allowed from `setup` on): nearly all
            // RAM is then left for the postcopy phase, so a cut or pause after the destination's
            // RUN lands before completion even on a mostly-zero guest, which QEMU sends at
            // about one 32 KiB buffer per 100 ms rate-limit epoch whatever the bandwidth cap.
            wait(src, "source", "setup")?;
            src.cmd("migrate-start-postcopy", Value::Null)?;
            wait(dst, "destination", "postcopy-active")?;
            wait(src, "source", "postcopy-active")?;
            match m {
                Mode::Postcopy => {
                    src.cmd(
                        "migrate-set-parameters",
                        json!({"max-postcopy-bandwidth": 1u64 << 30}),
                    )?;
                }
                Mode::PostcopyPause => {
                    ran(dst)?;
                    src.cmd("migrate-pause", Value::Null)?;
                    paused(src, dst)?;
                    proxies.push(recover(src, dst, None)?);
                }
                Mode::PostcopyRecover | Mode::DoubleFailure => {
                    ran(dst)?;
                    cut(&proxies[0], 1024)?;
                    paused(src, dst)?;
                    if m == Mode::DoubleFailure {
                        // The second failure: the recovery connection is cut after its first
                        // SECOND_CUT bytes, inside the source's first MIG_CMD_RECV_BITMAP;
                        // both sides pause again from postcopy-recover.
                        let p = recover(src, dst, Some(SECOND_CUT))?;
                        p.wait_closed(0, PHASE)
                            .map_err(|e| anyhow!("second cut: {e}"))?;
                        paused(src, dst).context("after the second cut")?;
                        proxies.push(p);
                        notes.push(format!(
                            "second cut at byte {SECOND_CUT} of the recovery channel"
                        ));
                    }
                    proxies.push(recover(src, dst, None)?);
                }
                _ => unreachable!(),
            }
        }
    }
    wait(src, "source", "completed")?;
    wait(dst, "destination", "completed")?;
    let bytes = g.ram_mb << 20;
    let a = src.ram(bytes)?;
    let mut b = dst.ram(bytes)?;
    if a.len() as u64 != bytes || b.len() as u64 != bytes {
        bail!("pmemsave sizes {} / {} (want {bytes})", a.len(), b.len());
    }
    if g.machine == Machine::Microvm {
        if let Some(n) = firmware_view(src, dst, &mut b)? {
            notes.push(n);
        }
    }
    if let Some(p) = crate::qemu::driver::first_diff_page(&a, &b) {
        bail!(
            "guest RAM differs: first page {p} (source sha256 {}, destination sha256 {})",
            sha256_hex(&a[p * PAGE..(p + 1) * PAGE]),
            sha256_hex(&b[p * PAGE..(p + 1) * PAGE])
        );
    }
    let nonzero = a
        .chunks(PAGE)
        .filter(|pg| pg.iter().any(|&x| x != 0))
        .count();
    let conns: Vec<String> = proxies
        .iter()
        .flat_map(|p| p.recordings())
        .map(|r| format!("{}{}", r.s2d.bytes.len(), if r.cut { " (cut)" } else { "" }))
        .collect();
    let mut s =
        format!(
        "RAM equal ({} MiB, {nonzero} non-zero pages{}, sha256 {}…); connections s->d bytes [{}]",
        g.ram_mb,
        if written > 0 { format!(", {written} written by qtest") } else { String::new() },
        &sha256_hex(&a)[..16],
        conns.join(", ")
    );
    for n in notes {
        s.push_str("; ");
        s.push_str(&n);
    }
    Ok(s)
}

/// microvm's firmware window: QEMU maps the last 128 KiB of `pc.bios` over RAM here (an alias),
/// so QEMU's `pmemsave` from 0 shows the firmware there, not `microvm.ram`.
const FIRMWARE_WINDOW: std::ops::Range<usize> = 0xe0000..0x100000;
/// Where QEMU maps the whole `pc.bios` (it ends at 4 GiB).
const FIRMWARE_TOP: u64 = 1 << 32;

/// With a qmig-dst destination on microvm, whose `pmemsave` reads the `microvm.ram` block
/// itself: checks qmig-dst's `pc.bios` block against QEMU's firmware (read where QEMU maps it,
/// below 4 GiB) and qmig-dst's RAM under the window (zero: nothing on the QEMU side writes it,
/// the VM never runs and the harness never writes there), then shows qmig-dst's RAM the way
/// QEMU's address space does (the firmware in the window), so the comparison that follows is
/// over the whole guest-physical range. `None` when the destination is not qmig-dst.
fn firmware_view(src: &mut Side, dst: &mut Side, b: &mut [u8]) -> anyhow::Result<Option<String>> {
    let Some(bios) = dst.block("pc.bios")? else {
        return Ok(None);
    };
    let len = bios.len() as u64;
    let Some(src_bios) = src.phys(FIRMWARE_TOP - len, len)? else {
        return Ok(None);
    };
    if bios != src_bios {
        let p = crate::qemu::driver::first_diff_page(&src_bios, &bios).unwrap_or(0);
        bail!("pc.bios differs ({len} bytes): first page {p}");
    }
    if bios.len() < FIRMWARE_WINDOW.len() || bios.iter().all(|&x| x == 0) {
        bail!("qmig-dst's pc.bios is {len} bytes, all zero or smaller than the firmware window");
    }
    let hidden = &mut b[FIRMWARE_WINDOW];
    if let Some(i) = hidden.iter().position(|&x| x != 0) {
        bail!(
            "qmig-dst's microvm.ram under the firmware window is not zero at 0x{:x}",
            FIRMWARE_WINDOW.start + i
        );
    }
    hidden.copy_from_slice(&bios[bios.len() - FIRMWARE_WINDOW.len()..]);
    Ok(Some(format!(
        "pc.bios equal ({len} bytes); qmig-dst's microvm.ram under the firmware window \
         0x{:x}-0x{:x} zero, compared through the firmware as QEMU maps it",
        FIRMWARE_WINDOW.start,
        FIRMWARE_WINDOW.end - 1
    )))
}

/// Waits until the destination behind `qmp` has processed POSTCOPY_RUN: its run state
/// (`query-status`) leaves `inmigrate` (QEMU moves to `running`, or `paused` with `-S`, in the
/// bottom half that RUN schedules after setting its postcopy state to RUNNING; qmig-dst reports
/// `running` from RUN on). Both QEMU versions announce `postcopy-active` already at
/// POSTCOPY_LISTEN, and a failure between LISTEN and RUN is fatal, not a pause
/// (SM-FATAL-BEFORE-RUN), so every cut or `migrate-pause` waits for this first. PONGs cannot
/// tell: the listen thread answers PING 4 concurrently with the main thread's package, so
/// PONG 4 may precede RUN. `-S` leaves QEMU paused with no event, hence the state is polled
/// (every 10 ms); a `failed` migration ends the wait at once. Returns the run state.
pub fn wait_destination_ran(qmp: &mut QmpClient, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp
            .execute("query-status", Value::Null)
            .map_err(|e| anyhow!("query-status: {e}"))?;
        let status = st["status"].as_str().unwrap_or("").to_string();
        if !status.is_empty() && status != "inmigrate" {
            return Ok(status);
        }
        let mig = qmp.migration_status().map_err(|e| anyhow!("{e}"))?;
        if mig == "failed" {
            bail!("the destination failed before it ran POSTCOPY_RUN (run state {status})");
        }
        if Instant::now() >= deadline {
            bail!("the destination never left inmigrate (migration status {mig})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ran(dst: &mut Side) -> anyhow::Result<()> {
    wait_destination_ran(dst.qmp(), PHASE)
        .map(|_| ())
        .context("waiting for the destination's POSTCOPY_RUN")
}

fn cut(p: &Proxy, after: u64) -> anyhow::Result<()> {
    let (now, _) = p.bytes_forwarded(0);
    p.arm_cut(0, now + after);
    p.wait_closed(0, PHASE)
        .map_err(|e| anyhow!("the cut never happened: {e}"))?;
    if !p.recordings()[0].cut {
        bail!("postcopy finished before the cut");
    }
    Ok(())
}

fn paused(src: &mut Side, dst: &mut Side) -> anyhow::Result<()> {
    wait(dst, "destination", "postcopy-paused")?;
    wait(src, "source", "postcopy-paused")?;
    Ok(())
}

/// `migrate-recover` on a new port, a new proxy (cutting after `cut_at` bytes if given),
/// `migrate resume=true`.
fn recover(src: &mut Side, dst: &mut Side, cut_at: Option<u64>) -> anyhow::Result<Proxy> {
    let addr = listen(dst, "migrate-recover")?;
    let p = Proxy::start(addr)?;
    if let Some(n) = cut_at {
        p.arm_cut(0, n);
    } else {
        src.cmd(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 1u64 << 30}),
        )?;
    }
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", p.port()), "resume": true}),
    )?;
    Ok(p)
}
