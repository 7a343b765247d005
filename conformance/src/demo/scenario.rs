//! The demo's story, step by step, driven over QMP as one would drive two QEMUs.
//!
//! This module owns [`run`]: start both reference processes, set the capabilities, listen on
//! the destination, put the cutting proxy between them, precopy for a few passes, switch to
//! postcopy with the destination guest faulting, cut the link, see both sides
//! `postcopy-paused`, recover on a new port, wait for `completed`, dump both memories and
//! compare them. Every step prints one line; the timings go into [`Stats`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use super::memcmp::{compare_dumps, DumpComparison};
use super::output::Output;
use super::procs::{find_binary, Peer};
use super::session::{Session, Side};
use super::summary::Stats;
use super::Args;
use crate::qemu::proxy::Proxy;

/// What a completed run found.
pub struct Outcome {
    /// The statistics.
    pub stats: Stats,
    /// The memory comparison.
    pub memory: DumpComparison,
}

/// Capabilities set on both sides, as for QEMU.
const CAPS: &[&str] = &["postcopy-ram", "return-path", "events"];

/// The TCP port in `query-migrate`'s `socket-address` (QEMU gives it as a string).
fn listen_port(info: &Value) -> Option<u16> {
    let a = info.get("socket-address")?.as_array()?.first()?;
    match a.get("port")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        _ => None,
    }
}

fn start_peers(args: &Args, dir: &Path) -> anyhow::Result<(Peer, Peer)> {
    let src_exe = find_binary("qmig-src")?;
    let dst_exe = find_binary("qmig-dst")?;
    let ram = args.ram.to_string();
    let dst = Peer::spawn(
        "qmig-dst",
        &dst_exe,
        &[
            "--ram".into(),
            ram.clone(),
            "--qmp".into(),
            format!("unix:{}", dir.join("dst.qmp").display()),
            "--workload".into(),
            // The destination guest reads random pages: each missing one is a fault.
            "random,threads=2".into(),
        ],
        dir.join("qmig-dst.log"),
    )?;
    let src = Peer::spawn(
        "qmig-src",
        &src_exe,
        &[
            "--ram".into(),
            ram,
            "--qmp".into(),
            format!("unix:{}", dir.join("src.qmp").display()),
            "--fill".into(),
            "random".into(),
            "--seed".into(),
            args.seed.to_string(),
            "--workload".into(),
            format!("random,working-set={}", args.working_set()),
        ],
        dir.join("qmig-src.log"),
    )?;
    Ok((src, dst))
}

fn connect(p: &mut Peer, sock: &Path, what: &str) -> anyhow::Result<QmpClient> {
    let c = QmpClient::connect_retry(sock, Duration::from_secs(60));
    if c.is_err() {
        p.check_alive()?;
    }
    c.with_context(|| format!("connecting to the {what}'s QMP socket {}", sock.display()))
}

/// Runs the whole demo in `dir` (sockets, logs, dumps).
pub fn run(args: &Args, dir: &Path) -> anyhow::Result<Outcome> {
    let out = Output::new(args.ram, !args.no_progress);
    let (mut src_proc, mut dst_proc) = start_peers(args, dir)?;
    out.line(format!(
        "started qmig-src (pid {}) and qmig-dst (pid {}): {} MiB guest writing {} MiB of it, seed {}, logs in {}",
        src_proc.pid(),
        dst_proc.pid(),
        args.ram >> 20,
        args.working_set() >> 20,
        args.seed,
        dir.display()
    ));
    let src = connect(&mut src_proc, &dir.join("src.qmp"), "source")?;
    let dst = connect(&mut dst_proc, &dir.join("dst.qmp"), "destination")?;
    let mut s = Session {
        out,
        src,
        dst,
        src_proc,
        dst_proc,
        guard: Duration::from_secs(args.timeout),
        phase: "setup",
    };
    let mut stats = Stats {
        ram: args.ram,
        ..Stats::default()
    };

    for side in [Side::Src, Side::Dst] {
        s.set_capabilities(side, CAPS)?;
    }
    s.execute(
        Side::Src,
        "migrate-set-parameters",
        // Downtime limit 0: precopy never converges by itself, the demo switches to postcopy.
        json!({"downtime-limit": 0, "max-postcopy-bandwidth": args.postcopy_bandwidth}),
    )?;
    if let Some(b) = args.bandwidth {
        s.execute(
            Side::Src,
            "migrate-set-parameters",
            json!({"max-bandwidth": b}),
        )?;
    }
    s.out
        .line(format!("capabilities on both sides: {}", CAPS.join(", ")));

    s.execute(
        Side::Dst,
        "migrate-incoming",
        json!({"uri": "tcp:127.0.0.1:0"}),
    )?;
    let info = s.query_migrate(Side::Dst)?;
    let dst_port = listen_port(&info).context("destination reports no listening port")?;
    let proxy =
        Proxy::start(SocketAddr::from(([127, 0, 0, 1], dst_port))).context("starting the proxy")?;
    s.out.line(format!(
        "destination listens on tcp:127.0.0.1:{dst_port}; proxy with a cut switch on tcp:127.0.0.1:{}",
        proxy.port()
    ));

    let uri = format!("tcp:127.0.0.1:{}", proxy.port());
    s.execute(Side::Src, "migrate", json!({ "uri": uri }))?;
    s.phase = "precopy";
    s.out.line(format!("source: migrate {uri}"));
    s.wait_status(Side::Src, "active")?;
    s.out
        .line("source: active (precopy), guest still running and writing");
    loop {
        let pass = s.wait_pass()?;
        let info = s.query_migrate(Side::Src)?;
        let sent = info
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let rate = info
            .pointer("/ram/dirty-pages-rate")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        s.out.line(format!(
            "source: precopy pass {pass}: {:.1} MiB sent so far{}",
            sent as f64 / 1048576.0,
            if rate > 0 {
                format!(", guest dirtying {rate} pages/s")
            } else {
                String::new()
            }
        ));
        if pass >= args.precopy_passes {
            stats.precopy_passes = pass;
            break;
        }
    }

    s.execute(Side::Src, "migrate-start-postcopy", Value::Null)?;
    s.phase = "postcopy";
    s.out.line("source: migrate-start-postcopy");
    s.wait_status(Side::Src, "postcopy-active")?;
    s.wait_status(Side::Dst, "postcopy-active")?;
    s.out.line(
        "both sides: postcopy-active; the destination guest runs and faults on missing pages",
    );

    // Some postcopy traffic and at least one destination fault before the cut.
    let (at_switch, _) = proxy.bytes_forwarded(0);
    let info = s.poll_migrate(
        Side::Dst,
        "postcopy traffic and a destination page fault",
        |i| {
            i.pointer("/x-qmig/faults")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                > 0
                && proxy.bytes_forwarded(0).0 >= at_switch + (2 << 20)
        },
    )?;
    s.out.line(format!(
        "destination: {} page faults so far, {:.1} MiB sent in postcopy; cutting the link now",
        info.pointer("/x-qmig/faults")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        (proxy.bytes_forwarded(0).0 - at_switch) as f64 / 1048576.0
    ));

    let cut = Instant::now();
    proxy.cut();
    s.phase = "link cut";
    let ps = s.wait_status(Side::Src, "postcopy-paused")?;
    let pd = s.wait_status(Side::Dst, "postcopy-paused")?;
    stats.cut_to_paused = (
        ps.received.saturating_duration_since(cut),
        pd.received.saturating_duration_since(cut),
    );
    s.out.line(format!(
        "both sides: postcopy-paused (source after {:.1} ms, destination after {:.1} ms)",
        stats.cut_to_paused.0.as_secs_f64() * 1e3,
        stats.cut_to_paused.1.as_secs_f64() * 1e3
    ));

    let recover = Instant::now();
    s.execute(
        Side::Dst,
        "migrate-recover",
        json!({"uri": "tcp:127.0.0.1:0"}),
    )?;
    let info = s.query_migrate(Side::Dst)?;
    let new_port = listen_port(&info).context("destination reports no recovery port")?;
    if new_port == dst_port {
        bail!("the destination recovers on its old port {dst_port}");
    }
    s.out.line(format!(
        "destination: migrate-recover tcp:127.0.0.1:{new_port} (a new port; the first channel came to {dst_port})"
    ));
    let uri = format!("tcp:127.0.0.1:{new_port}");
    s.execute(Side::Src, "migrate", json!({"uri": uri, "resume": true}))?;
    s.phase = "recovering";
    s.out.line(format!("source: migrate {uri} resume=true"));
    let rs = s.wait_status(Side::Src, "postcopy-active")?;
    let rd = s.wait_status(Side::Dst, "postcopy-active")?;
    stats.recover_to_active = (
        rs.received.saturating_duration_since(recover),
        rd.received.saturating_duration_since(recover),
    );
    stats.outage = rs.received.max(rd.received).saturating_duration_since(cut);
    s.out.line(format!(
        "both sides: recovered, postcopy-active again (source after {:.1} ms, destination after {:.1} ms)",
        stats.recover_to_active.0.as_secs_f64() * 1e3,
        stats.recover_to_active.1.as_secs_f64() * 1e3
    ));
    s.execute(
        Side::Src,
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 0}),
    )?;
    s.phase = "postcopy";
    s.out.line("source: postcopy bandwidth limit lifted");

    s.wait_status(Side::Src, "completed")?;
    s.wait_status(Side::Dst, "completed")?;
    s.out.line("both sides: completed");
    let src_info = s.query_migrate(Side::Src)?;
    let dst_info = s.query_migrate(Side::Dst)?;
    stats.collect(&src_info, &dst_info);
    s.out.progress(stats.transferred, "completed");

    // The guest is stopped on the source (it moved); make sure of it before dumping.
    s.execute(Side::Src, "stop", Value::Null)?;
    let (src_dump, dst_dump) = (dir.join("src.mem"), dir.join("dst.mem"));
    for (side, file) in [(Side::Src, &src_dump), (Side::Dst, &dst_dump)] {
        s.execute(
            side,
            "pmemsave",
            json!({"val": 0, "size": args.ram, "filename": file.display().to_string()}),
        )?;
    }
    s.out
        .line("pmemsave on both sides; comparing byte for byte");
    let memory = compare_dumps(&src_dump, &dst_dump)?;

    s.out.finish();
    for side in [Side::Src, Side::Dst] {
        s.out.plain(format!(
            "{} status sequence: {}",
            side.name(),
            s.status_sequence(side).join(" -> ")
        ));
    }
    if !args.keep_dumps() {
        let _ = std::fs::remove_file(&src_dump);
        let _ = std::fs::remove_file(&dst_dump);
    }
    Ok(Outcome { stats, memory })
}

#[cfg(test)]
mod tests {
    use super::listen_port;
    use serde_json::json;

    #[test]
    fn listening_port_from_query_migrate() {
        let qemu = json!({"status": "setup", "socket-address":
            [{"type": "inet", "host": "127.0.0.1", "port": "40975"}]});
        assert_eq!(listen_port(&qemu), Some(40975));
        let numeric = json!({"socket-address": [{"type": "inet", "port": 8}]});
        assert_eq!(listen_port(&numeric), Some(8));
        assert_eq!(listen_port(&json!({"status": "active"})), None);
        assert_eq!(
            listen_port(&json!({"socket-address": [{"port": "70000"}]})),
            None
        );
        assert_eq!(listen_port(&json!({"socket-address": []})), None);
    }
}
