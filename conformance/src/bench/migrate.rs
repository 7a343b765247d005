//! Driving one benchmarked migration between two [`Peer`]s over QMP, the way a management
//! layer drives QEMU: capabilities, `migrate-incoming` on port 0, `migrate`, and for postcopy
//! `migrate-start-postcopy` right after `migrate`. Every wait is on a `MIGRATION` event; the
//! timeout only guards against hangs.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::peer::Peer;

/// Guard for one migration phase.
const PHASE: Duration = Duration::from_secs(600);
/// `max-bandwidth` given to every source: far above what loopback carries, so no source is
/// held back by QEMU's 128 MiB/s default.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// How long a qmig-dst workload faults on a throttled (idle) link before its report is taken.
pub const QMIG_IDLE_WINDOW: Duration = Duration::from_secs(2);

/// Precopy or postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Precopy until completion.
    Precopy,
    /// `migrate-start-postcopy` right after `migrate`.
    Postcopy,
}

impl Mode {
    /// `precopy` / `postcopy`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
        }
    }
}

/// What one migration measured.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// From just before `migrate` to the source's `completed` event, seconds.
    pub seconds: f64,
    /// Source CPU seconds over the same span.
    pub src_cpu: f64,
    /// Destination CPU seconds over the same span (to its `completed`).
    pub dst_cpu: f64,
}

fn wait(p: &mut Peer, side: &str, status: &str) -> Result<Instant, String> {
    match p.qmp().wait_status(status, PHASE) {
        Ok(e) => Ok(e.received),
        Err(e) => Err(format!(
            "{side} never reached {status}: {e}; log tail:\n{}",
            p.log_tail()
        )),
    }
}

/// Turns on `return-path` (and `postcopy-ram`) on both sides and lifts the source's bandwidth
/// limit.
fn prepare(src: &mut Peer, dst: &mut Peer, postcopy: bool) -> Result<(), String> {
    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    src.exec("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    dst.exec("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    if let Err(e) = src.exec(
        "migrate-set-parameters",
        json!({"max-bandwidth": UNLIMITED_BANDWIDTH}),
    ) {
        tracing::warn!("source refused max-bandwidth: {e}");
    }
    Ok(())
}

/// `cmd` (`migrate-incoming` / `migrate-recover`) with port 0 on `dst`; the chosen port comes
/// from `query-migrate`'s `socket-address`.
fn listen(dst: &mut Peer, cmd: &str) -> Result<String, String> {
    dst.exec(cmd, json!({"uri": "tcp:127.0.0.1:0"}))?;
    let info = dst.exec("query-migrate", Value::Null)?;
    let port = info
        .get("socket-address")
        .and_then(Value::as_array)
        .and_then(|a| a.last())
        .and_then(|a| a.get("port"))
        .and_then(|p| {
            p.as_str()
                .map(str::to_owned)
                .or_else(|| p.as_u64().map(|n| n.to_string()))
        })
        .ok_or_else(|| format!("no listening port in query-migrate: {info}"))?;
    Ok(format!("tcp:127.0.0.1:{port}"))
}

fn finish(
    src: &mut Peer,
    dst: &mut Peer,
    t0: Instant,
    cpu0: (f64, f64),
) -> Result<Measured, String> {
    let end = wait(src, "src", "completed")?;
    let src_cpu = src.cpu_seconds() - cpu0.0;
    wait(dst, "dst", "completed")?;
    let dst_cpu = dst.cpu_seconds() - cpu0.1;
    Ok(Measured {
        seconds: end.saturating_duration_since(t0).as_secs_f64(),
        src_cpu,
        dst_cpu,
    })
}

/// Migrates `src` to `dst` in `mode` and measures it.
pub fn migrate(src: &mut Peer, dst: &mut Peer, mode: Mode) -> Result<Measured, String> {
    let postcopy = mode == Mode::Postcopy;
    prepare(src, dst, postcopy)?;
    let uri = listen(dst, "migrate-incoming")?;
    let cpu0 = (src.cpu_seconds(), dst.cpu_seconds());
    let t0 = Instant::now();
    src.exec("migrate", json!({ "uri": uri }))?;
    if postcopy {
        src.exec("migrate-start-postcopy", Value::Null)?;
    }
    finish(src, dst, t0, cpu0)
}

/// Postcopy page-request latency as seen by destination accesses.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Access durations of pages not yet received (each page touched once), microseconds.
    pub faults_us: Vec<f64>,
    /// Durations of the same accesses repeated on now-present pages (the access path's own
    /// cost, e.g. a qtest round trip), microseconds.
    pub present_us: Vec<f64>,
    /// The destination's own fault-to-placement summary (`x-qmig.fault-latency-us`), if any.
    pub reported: Option<Value>,
}

/// Postcopy from `src` to `dst` with page accesses on the destination while postcopy runs:
/// `reads` qtest `readq`s of pages spread over the upper half of RAM, from the top down (QEMU
/// moves its background position to a requested page, so the next lower page is still
/// missing). With `saturate` false the source's `max-postcopy-bandwidth` is 1 MiB/s while the
/// reads run (idle link), then unlimited. Without qtest (qmig-dst) only the destination's own
/// report is taken (its workload makes the faults): with `saturate` false it is taken after
/// [`QMIG_IDLE_WINDOW`] at 1 MiB/s, before the limit is lifted, so it holds idle-link faults
/// only; with `saturate` it covers the whole migration.
pub fn postcopy_latency(
    src: &mut Peer,
    dst: &mut Peer,
    size: u64,
    reads: usize,
    saturate: bool,
) -> Result<Latencies, String> {
    prepare(src, dst, true)?;
    if !saturate {
        src.exec(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 1u64 << 20}),
        )?;
    }
    let uri = listen(dst, "migrate-incoming")?;
    src.exec("migrate", json!({ "uri": uri }))?;
    src.exec("migrate-start-postcopy", Value::Null)?;
    wait(dst, "dst", "postcopy-active")?;
    let mut out = Latencies::default();
    if let Some(q) = dst.qtest() {
        let pages = size / 4096;
        let upper = pages / 2;
        let stride = (upper / reads.max(1) as u64).max(2);
        let addrs: Vec<u64> = (0..reads as u64)
            .map(|i| (pages - 1 - (i * stride) % upper) * 4096)
            .collect();
        for &a in &addrs {
            let t = Instant::now();
            q.readq(a).map_err(|e| format!("qtest readq: {e}"))?;
            out.faults_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for &a in &addrs {
            let t = Instant::now();
            q.readq(a).map_err(|e| format!("qtest readq: {e}"))?;
            out.present_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let mut idle_report = None;
    if dst.qtest().is_none() && !saturate {
        // The workload faults meanwhile; nothing to wait for but time.
        std::thread::sleep(QMIG_IDLE_WINDOW);
        idle_report = fault_report(dst)?;
    }
    if !saturate {
        src.exec(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 0}),
        )?;
    }
    wait(src, "src", "completed")?;
    wait(dst, "dst", "completed")?;
    out.reported = match idle_report {
        Some(r) => Some(r),
        None => fault_report(dst)?,
    };
    Ok(out)
}

/// The destination's `x-qmig.fault-latency-us` so far (qmig-dst only).
fn fault_report(dst: &mut Peer) -> Result<Option<Value>, String> {
    let info = dst.exec("query-migrate", Value::Null)?;
    Ok(info
        .get("x-qmig")
        .and_then(|x| x.get("fault-latency-us"))
        .cloned())
}

/// What one recovery measured.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// From the source's `migrate resume=true` to its `postcopy-active` event, seconds.
    pub src_resume_to_active: f64,
    /// From the same command to the destination's `postcopy-active` event, seconds.
    pub dst_resume_to_active: f64,
    /// From the same command to the completion of a destination access of a missing page that
    /// was blocked during the pause, seconds (qmig-dst's `x-qmig-probe-read`; `None` for a
    /// destination without the probe, or when the access did not complete after the command).
    pub blocked_access_wait: Option<f64>,
}

/// Postcopy throttled to 8 MiB/s so it is still running, `migrate-pause` on the source, both
/// sides `postcopy-paused`, bandwidth unlimited, `migrate-recover` on the destination, then
/// `migrate resume=true`; measures resume to `postcopy-active` and lets it complete. With
/// `probe = Some(offset)` (a qmig destination), a destination access of guest-physical
/// `offset` (a page still missing: the top of RAM, which the throttled scan has not reached) is
/// started while both sides are paused, and its completion is timed from the resume command.
pub fn recovery(src: &mut Peer, dst: &mut Peer, probe: Option<u64>) -> Result<Recovery, String> {
    prepare(src, dst, true)?;
    src.exec(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 8u64 << 20}),
    )?;
    let uri = listen(dst, "migrate-incoming")?;
    src.exec("migrate", json!({ "uri": uri }))?;
    src.exec("migrate-start-postcopy", Value::Null)?;
    wait(src, "src", "postcopy-active")?;
    wait(dst, "dst", "postcopy-active")?;
    src.exec("migrate-pause", Value::Null)?;
    wait(src, "src", "postcopy-paused")?;
    wait(dst, "dst", "postcopy-paused")?;
    if let Some(offset) = probe {
        dst.exec("x-qmig-probe-read", json!({ "offset": offset }))?;
    }
    src.exec(
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )?;
    let uri = listen(dst, "migrate-recover")?;
    let t0 = Instant::now();
    let t0_ns = qmig_host::stats::monotonic_ns();
    src.exec("migrate", json!({"uri": uri, "resume": true}))?;
    let s = wait(src, "src", "postcopy-active")?;
    let d = wait(dst, "dst", "postcopy-active")?;
    wait(src, "src", "completed")?;
    wait(dst, "dst", "completed")?;
    let blocked_access_wait = match probe {
        None => None,
        Some(_) => {
            let r = dst.exec("x-qmig-probe-result", Value::Null)?;
            if r.get("monotonic-ns")
                .and_then(Value::as_u64)
                .map_or(true, |t| t < t0_ns)
            {
                eprintln!("bench: the probe access did not complete after the resume: {r}");
            }
            r.get("monotonic-ns")
                .and_then(Value::as_u64)
                .filter(|&t| t >= t0_ns)
                .map(|t| (t - t0_ns) as f64 / 1e9)
        }
    };
    Ok(Recovery {
        src_resume_to_active: s.saturating_duration_since(t0).as_secs_f64(),
        dst_resume_to_active: d.saturating_duration_since(t0).as_secs_f64(),
        blocked_access_wait,
    })
}
