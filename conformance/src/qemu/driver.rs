//! Migration scenarios between two QEMUs through the recording proxy.
//!
//! [`run`] starts a source and a destination of the same QEMU and machine,
//! writes the guest pattern through qtest, migrates through a [`Proxy`]
//! (precopy, postcopy, or postcopy with a cut and recovery), dumps both
//! RAMs with `pmemsave`, and returns everything observed as an [`Outcome`].
//! The live tests assert on the outcome; [`super::capture`] writes it out
//! as a vector. Every wait is on a QMP event or a proxy condition; timeouts
//! only guard against hangs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::find::QemuBinary;
use super::launch::{Machine, Qemu};
use super::pattern::PAGE;
pub use super::pattern::{pattern, Write};
use super::proxy::{Proxy, Recording};
use super::QemuError;

/// Failure guard for one migration phase.
const PHASE: Duration = Duration::from_secs(90);

/// What to migrate and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Precopy over TCP with the return path.
    Precopy,
    /// Postcopy (switched to while the first pass is unfinished), no failure.
    Postcopy,
    /// Postcopy, the proxy cuts the connection mid-postcopy, both sides
    /// pause, `migrate-recover` + `migrate resume=true` over a new proxy.
    PostcopyRecover,
    /// As [`Kind::PostcopyRecover`], but the failure is `migrate-pause` on
    /// the source (which shuts its socket down) instead of a proxy cut.
    PostcopyPauseRecover,
}

/// A scenario: machine, RAM, content, migration kind.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Vector-style name (`precopy-none-nocpu`, ...).
    pub name: String,
    /// Migration kind.
    pub kind: Kind,
    /// Guest machine (both sides).
    pub machine: Machine,
    /// Guest RAM in MiB.
    pub ram_mb: u64,
    /// Pattern seed; `None` leaves RAM untouched (required without qtest).
    pub seed: Option<u64>,
    /// Number of random pages written besides the fixed ones.
    pub random_pages: u64,
    /// Source `max-bandwidth` (bytes/s) during precopy.
    pub max_bandwidth: Option<u64>,
    /// Source `max-postcopy-bandwidth` (bytes/s) before a recovery.
    pub max_postcopy_bandwidth: Option<u64>,
    /// Postcopy: how many of the highest written pages to read on the
    /// destination right after it entered postcopy (page requests).
    pub dst_reads: usize,
    /// For [`Kind::PostcopyRecover`]: cut this many source-to-destination
    /// bytes after the destination announced `postcopy-active`.
    pub cut_after: u64,
}

/// Everything a scenario run observed.
pub struct Outcome {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// The QEMU both sides ran.
    pub binary: QemuBinary,
    /// `query-version` of the source.
    pub query_version: Value,
    /// Source and destination command lines with placeholders.
    pub command_lines: (String, String),
    /// Capabilities set over QMP (source, destination), `events` included.
    pub capabilities: (Value, Value),
    /// Parameters set over QMP (source, destination).
    pub parameters: (Value, Value),
    /// Ordered steps with times (seconds from the start).
    pub steps: Vec<Value>,
    /// QMP events of both sides with times.
    pub events: Vec<Value>,
    /// Proxy recordings: `("initial", connection)` and, after a recovery,
    /// `("recovery", connection)`.
    pub recordings: Vec<(&'static str, Recording)>,
    /// Guest writes done before the migration.
    pub writes: Vec<Write>,
    /// Source RAM (pmemsave from 0) after completion.
    pub src_ram: Vec<u8>,
    /// Destination RAM (pmemsave from 0) after completion.
    pub dst_ram: Vec<u8>,
    /// Final `query-migrate` of both sides.
    pub migration_info: Value,
    /// For a recovery: the byte offset of the cut in the first connection.
    pub cut_at: Option<u64>,
    /// Pages read on the destination during postcopy (before any cut).
    pub destination_reads: Vec<DestinationRead>,
    /// Postcopy scenarios: the VM description JSON (as QEMU wrote it) from
    /// one more, precopy, migration of the destination; postcopy streams
    /// carry none.
    pub vmdesc: Option<Vec<u8>>,
}

/// One page read through qtest on the destination while in postcopy.
#[derive(Debug, Clone)]
pub struct DestinationRead {
    /// Page index.
    pub page: u64,
    /// Whether the content equals what the source had written.
    pub correct: bool,
    /// How long the read took (the page may have been requested).
    pub seconds: f64,
}

impl Outcome {
    /// The RAM the pattern writes predict (zero elsewhere).
    pub fn expected_ram(&self) -> Vec<u8> {
        let mut ram = vec![0u8; self.src_ram.len()];
        for w in &self.writes {
            let o = (w.page as usize) * PAGE;
            ram[o..o + PAGE].copy_from_slice(&w.data);
        }
        ram
    }
}

/// Two QEMUs and the step log.
struct Pair {
    src: Qemu,
    dst: Qemu,
    t0: Instant,
    steps: Vec<Value>,
}

impl Pair {
    fn t(&self) -> f64 {
        (self.t0.elapsed().as_secs_f64() * 1000.0).round() / 1000.0
    }

    fn step(&mut self, mut v: Value) {
        v.as_object_mut()
            .expect("step is an object")
            .insert("t".into(), json!(self.t()));
        self.steps.push(v);
    }

    fn side(&mut self, side: &str) -> &mut Qemu {
        if side == "src" {
            &mut self.src
        } else {
            &mut self.dst
        }
    }

    /// A logged QMP command on `side`.
    fn qmp(&mut self, side: &str, cmd: &str, args: Value) -> Result<Value, QemuError> {
        let mut s = json!({"side": side, "action": "qmp", "qmp": cmd});
        if !args.is_null() {
            s["arguments"] = args.clone();
        }
        self.step(s);
        self.side(side).qmp(cmd, args)
    }

    fn wait_status(&mut self, side: &str, status: &str) -> Result<(), QemuError> {
        let q = self.side(side);
        q.qmp.wait_status(status, PHASE).map_err(|e| {
            QemuError::Failed(format!(
                "{side} never reached {status}: {e}; log: {}",
                q.log()
            ))
        })?;
        self.step(json!({"side": side, "action": "observed", "status": status}));
        Ok(())
    }

    /// `migrate-incoming`/`migrate-recover` with port 0 on the destination;
    /// the port QEMU picked comes from `query-migrate` `socket-address`.
    fn listen(&mut self, cmd: &str) -> Result<SocketAddr, QemuError> {
        self.qmp("dst", cmd, json!({"uri": "tcp:127.0.0.1:0"}))?;
        let info = self.dst.qmp("query-migrate", Value::Null)?;
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
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| {
                QemuError::Failed(format!("no listening port in query-migrate: {info}"))
            })?;
        let label = if cmd == "migrate-recover" {
            "RECOVER_PORT"
        } else {
            "DEST_PORT"
        };
        self.step(json!({"side": "dst", "action": "listening", "address": format!("127.0.0.1:{{{label}}}"),
            "note": "port 0 requested; actual port read from query-migrate socket-address (last entry)"}));
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn proxy(&mut self, target: SocketAddr, n: usize) -> Result<Proxy, QemuError> {
        let p = Proxy::start(target)?;
        let port = if n == 1 { "PROXY_PORT" } else { "PROXY2_PORT" };
        self.step(json!({"side": "harness", "action": "proxy", "listen": format!("127.0.0.1:{{{port}}}"),
            "records": {"source->destination": format!("s2d-{n}.bin"), "destination->source": format!("d2s-{n}.bin")}}));
        Ok(p)
    }

    fn migrate(&mut self, proxy: &Proxy, resume: bool) -> Result<(), QemuError> {
        let uri = format!("tcp:127.0.0.1:{}", proxy.port());
        let mut args = json!({"uri": uri});
        if resume {
            args["resume"] = json!(true);
        }
        let mut logged = args.clone();
        logged["uri"] = json!(if resume {
            "tcp:127.0.0.1:{PROXY2_PORT}"
        } else {
            "tcp:127.0.0.1:{PROXY_PORT}"
        });
        self.step(json!({"side": "src", "action": "qmp", "qmp": "migrate", "arguments": logged}));
        self.src.qmp("migrate", args)?;
        Ok(())
    }
}

/// Runs `scenario` on `bin`: see the module documentation.
pub fn run(bin: &QemuBinary, scenario: &Scenario) -> Result<Outcome, QemuError> {
    let t0 = Instant::now();
    let m = scenario.machine;
    let src = Qemu::launch(bin, m, scenario.ram_mb, false, &[])?;
    let dst = Qemu::launch(bin, m, scenario.ram_mb, true, &[])?;
    let mut p = Pair {
        src,
        dst,
        t0,
        steps: Vec::new(),
    };
    let (src_cl, dst_cl) = (
        p.src.command_line_template("SRC"),
        p.dst.command_line_template("DST"),
    );
    p.step(json!({"side": "src", "action": "start", "command_line": src_cl}));
    p.step(json!({"side": "dst", "action": "start", "command_line": dst_cl}));
    for side in ["src", "dst"] {
        p.step(
            json!({"side": side, "action": "qmp", "qmp": "migrate-set-capabilities",
            "arguments": {"capabilities": [{"capability": "events", "state": true}]},
            "note": "done by Qemu::launch"}),
        );
    }
    let query_version = p.src.qmp("query-version", Value::Null)?;

    // Guest content.
    let writes = match scenario.seed {
        Some(seed) => {
            let w = pattern(seed, m, scenario.ram_mb, scenario.random_pages);
            let q = p.src.qtest()?;
            for wr in &w {
                q.write(wr.page * PAGE as u64, &wr.data)?;
            }
            p.step(
                json!({"side": "src", "action": "qtest-writes", "count": w.len(),
                "note": "pattern written before migration (see pattern.writes)"}),
            );
            w
        }
        None => Vec::new(),
    };

    // Capabilities and parameters.
    let postcopy = scenario.kind != Kind::Precopy;
    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if postcopy {
        caps.insert(0, json!({"capability": "postcopy-ram", "state": true}));
    }
    p.qmp(
        "src",
        "migrate-set-capabilities",
        json!({"capabilities": caps.clone()}),
    )?;
    p.qmp(
        "dst",
        "migrate-set-capabilities",
        json!({"capabilities": caps.clone()}),
    )?;
    let mut src_params = serde_json::Map::new();
    if let Some(b) = scenario.max_bandwidth {
        src_params.insert("max-bandwidth".into(), json!(b));
    }
    if let Some(b) = scenario.max_postcopy_bandwidth {
        src_params.insert("max-postcopy-bandwidth".into(), json!(b));
    }
    if !src_params.is_empty() {
        p.qmp(
            "src",
            "migrate-set-parameters",
            Value::Object(src_params.clone()),
        )?;
    }
    let mut cap_obj = json!({"events": true});
    for c in &caps {
        cap_obj[c["capability"].as_str().expect("name")] = json!(true);
    }

    // First connection.
    let dest = p.listen("migrate-incoming")?;
    let proxy1 = p.proxy(dest, 1)?;
    p.migrate(&proxy1, false)?;
    let mut cut_at = None;
    let mut proxy2 = None;
    let mut reads = Vec::new();
    if postcopy {
        p.wait_status("src", "active")?;
        p.qmp("src", "migrate-start-postcopy", Value::Null)?;
        p.wait_status("dst", "postcopy-active")?;
        p.wait_status("src", "postcopy-active")?;
        reads = destination_reads(&mut p, &writes, scenario.dst_reads)?;
    }
    if scenario.kind == Kind::PostcopyPauseRecover {
        p.qmp("src", "migrate-pause", Value::Null)?;
    }
    if scenario.kind == Kind::PostcopyRecover {
        let (now, _) = proxy1.bytes_forwarded(0);
        let at = now + scenario.cut_after;
        proxy1.arm_cut(0, at);
        p.step(json!({"side": "harness", "action": "proxy-cut-armed", "direction": "source->destination",
            "byte_offset": at, "note": "the proxy forwards exactly this many bytes, then shuts both sockets down"}));
        proxy1
            .wait_closed(0, PHASE)
            .map_err(|e| QemuError::Failed(format!("the cut never happened: {e}")))?;
        let rec = &proxy1.recordings()[0];
        if !rec.cut {
            return Err(QemuError::Failed(format!(
                "postcopy finished before the cut at {at} ({} bytes forwarded)",
                rec.s2d.bytes.len()
            )));
        }
        p.step(json!({"side": "harness", "action": "proxy-cut", "reason": rec.cut_reason}));
        cut_at = Some(at);
    }
    if matches!(
        scenario.kind,
        Kind::PostcopyRecover | Kind::PostcopyPauseRecover
    ) {
        p.wait_status("src", "postcopy-paused")?;
        p.wait_status("dst", "postcopy-paused")?;
        proxy1
            .wait_closed(0, PHASE)
            .map_err(|e| QemuError::Failed(format!("the first channel stayed open: {e}")))?;
        // Finish quickly once recovered.
        p.qmp(
            "src",
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 1u64 << 30}),
        )?;
        let recover = p.listen("migrate-recover")?;
        let px2 = p.proxy(recover, 2)?;
        p.migrate(&px2, true)?;
        proxy2 = Some(px2);
    }
    p.wait_status("src", "completed")?;
    p.wait_status("dst", "completed")?;
    proxy1.wait_closed(0, PHASE)?;
    if let Some(px) = &proxy2 {
        px.wait_closed(0, PHASE)?;
    }

    let info = json!({
        "src": p.src.qmp("query-migrate", Value::Null)?,
        "dst": p.dst.qmp("query-migrate", Value::Null)?,
    });
    let ram = p.src.ram_bytes();
    p.step(json!({"side": "src", "action": "qmp", "qmp": "pmemsave",
        "arguments": {"val": 0, "size": ram, "filename": "{WORKDIR}/src.ram"}}));
    let src_ram = p.src.dump_ram()?;
    p.step(json!({"side": "dst", "action": "qmp", "qmp": "pmemsave",
        "arguments": {"val": 0, "size": ram, "filename": "{WORKDIR}/dst.ram"}}));
    let dst_ram = p.dst.dump_ram()?;

    let vmdesc = if postcopy {
        Some(vmdesc_by_extra_migration(&mut p)?)
    } else {
        None
    };

    let mut recordings = vec![("initial", proxy1.recordings().remove(0))];
    if let Some(px) = &proxy2 {
        recordings.push(("recovery", px.recordings().remove(0)));
    }
    p.src.qmp.drain_available()?;
    p.dst.qmp.drain_available()?;
    let mut events: Vec<Value> = Vec::new();
    for (side, q) in [("src", &p.src), ("dst", &p.dst)] {
        for e in q.qmp.event_log() {
            let t = e.received.saturating_duration_since(t0).as_secs_f64();
            events.push(json!({"t": (t * 1000.0).round() / 1000.0, "side": side, "event": e.name, "data": e.data}));
        }
    }
    events.sort_by(|a, b| {
        a["t"]
            .as_f64()
            .partial_cmp(&b["t"].as_f64())
            .expect("finite")
    });
    Ok(Outcome {
        scenario: scenario.clone(),
        binary: bin.clone(),
        query_version,
        command_lines: (src_cl, dst_cl),
        capabilities: (cap_obj.clone(), cap_obj),
        parameters: (Value::Object(src_params), json!({})),
        steps: std::mem::take(&mut p.steps),
        events,
        recordings,
        writes,
        src_ram,
        dst_ram,
        migration_info: info,
        cut_at,
        destination_reads: reads,
        vmdesc,
    })
}

/// Reads the `n` highest written pages on the destination (they are sent
/// last, so they are most likely still missing and get requested).
fn destination_reads(
    p: &mut Pair,
    writes: &[Write],
    n: usize,
) -> Result<Vec<DestinationRead>, QemuError> {
    let mut sorted: Vec<&Write> = writes.iter().collect();
    sorted.sort_by_key(|w| std::cmp::Reverse(w.page));
    let mut out = Vec::new();
    for w in sorted.into_iter().take(n) {
        let start = Instant::now();
        let data = p.dst.qtest()?.read(w.page * PAGE as u64, PAGE)?;
        let seconds = (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        out.push(DestinationRead {
            page: w.page,
            correct: data == w.data,
            seconds,
        });
    }
    if !out.is_empty() {
        let pages: Vec<u64> = out.iter().map(|r| r.page).collect();
        p.step(
            json!({"side": "dst", "action": "qtest-reads", "label": "postcopy, before any failure",
            "pages": pages, "note": "b64read of whole pages on the destination during postcopy"}),
        );
    }
    Ok(out)
}

/// Migrates the destination once more, precopy to a loopback socket the
/// harness reads to EOF, and returns the VM description that ends that
/// stream.
fn vmdesc_by_extra_migration(p: &mut Pair) -> Result<Vec<u8>, QemuError> {
    use std::io::Read as _;
    let caps = json!({"capabilities": [
        {"capability": "postcopy-ram", "state": false},
        {"capability": "return-path", "state": false}]});
    p.qmp("dst", "migrate-set-capabilities", caps)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        Ok(data)
    });
    p.step(json!({"side": "dst", "action": "qmp", "qmp": "migrate",
        "arguments": {"uri": "tcp:127.0.0.1:{SINK_PORT}"},
        "note": "precopy of the destination to a harness socket read to EOF, only to take its VM description"}));
    p.dst
        .qmp("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    p.wait_status("dst", "completed")?;
    let stream = reader
        .join()
        .map_err(|_| QemuError::Failed("vmdesc reader panicked".into()))??;
    vmdesc_of_stream(&stream)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| QemuError::Failed("no VM description at the end of the stream".into()))
}

/// The VM description JSON that ends a complete precopy stream:
/// `QEMU_VM_EOF` (0x00), `QEMU_VM_VMDESCRIPTION` (0x06), be32 length, JSON.
pub fn vmdesc_of_stream(stream: &[u8]) -> Option<&[u8]> {
    let n = stream.len();
    (0..n.saturating_sub(6)).rev().find_map(|i| {
        let len = u32::from_be_bytes(stream[i + 2..i + 6].try_into().ok()?) as usize;
        let json = &stream[i + 6..];
        (stream[i] == 0 && stream[i + 1] == 6 && len == json.len() && json.first() == Some(&b'{'))
            .then_some(json)
    })
}

/// Index of the first differing page of two equal-length RAM dumps.
pub fn first_diff_page(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(PAGE).zip(b.chunks(PAGE)).position(|(x, y)| x != y)
}
