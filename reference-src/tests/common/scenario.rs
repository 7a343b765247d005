//! The live scenarios shared by the QEMU and qmig-dst destination tests: precopy (static or
//! dirtying guest), postcopy, postcopy with a cut by the recording proxy, postcopy with
//! `migrate-pause`; each recovered one resumes to a new port. Every scenario ends with the
//! destination's RAM byte-identical to qmig-src's RAM at switchover. Extra capabilities
//! (`xbzrle`, `compress`, `x-ignore-shared`) go to both sides; the returned `query-migrate`
//! answer carries `x-test-records`: the RAM record kinds counted on the first main connection.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmig_conformance::qemu::{Proxy, Qemu};
use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use qmig_protocol::codes::RamFlags;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};

use super::{first_diff_page, qemu_listen, workspace, Scratch, Src, PHASE};

/// Counts the page records of a main stream by kind (`page`, `zero`, `xbzrle`, `compressed`),
/// decoding every whole item.
pub fn record_kinds(stream: &[u8], profile: Profile) -> Value {
    let mut d = StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT);
    let (mut pos, mut n) = (0, [0u64; 4]);
    while let Ok((item, used)) = d.decode(&stream[pos..]) {
        pos += used;
        if let Item::Ram(r) = item {
            for (i, f) in [
                RamFlags::PAGE,
                RamFlags::ZERO,
                RamFlags::XBZRLE,
                RamFlags::COMPRESS_PAGE,
            ]
            .iter()
            .enumerate()
            {
                if r.flags.contains(*f) {
                    n[i] += 1;
                }
            }
        }
        if pos == stream.len() {
            break;
        }
    }
    json!({"page": n[0], "zero": n[1], "xbzrle": n[2], "compressed": n[3], "decoded": pos})
}

/// Guest RAM of every scenario, MiB.
pub const RAM_MB: u64 = 64;

/// The migration kind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Precopy.
    Precopy,
    /// Postcopy, switched to once precopy is active.
    Postcopy,
    /// Postcopy; the recording proxy cuts the link mid-stream.
    PostcopyCut,
    /// Postcopy; `migrate-pause` on qmig-src.
    PostcopyPause,
}

/// One scenario.
pub struct Case {
    /// Kind.
    pub mode: Mode,
    /// qmig-src's profile (`7.2` or `10`).
    pub profile: &'static str,
    /// Device sections from this captured stream (relative to the workspace).
    pub template: Option<&'static str>,
    /// qmig-src's guest workload.
    pub workload: Option<&'static str>,
    /// qmig-src parameters set before `migrate`.
    pub params: Value,
    /// More qmig-src arguments (`--machine`, `--block`).
    pub src_args: &'static [&'static str],
    /// Guest pages left out of the comparison (microvm maps its firmware over RAM there).
    pub skip_pages: std::ops::Range<u64>,
    /// The destination runs the guest after the migration (QEMU started with `-S` does not).
    pub dst_runs: bool,
    /// More capabilities, on both sides.
    pub caps: &'static [&'static str],
}

impl Default for Case {
    fn default() -> Self {
        Case {
            mode: Mode::Precopy,
            profile: "10",
            template: None,
            workload: None,
            params: json!({}),
            src_args: &[],
            skip_pages: 0..0,
            dst_runs: true,
            caps: &[],
        }
    }
}

/// A running qmig-dst; killed on drop.
pub struct QmigDst {
    child: Child,
    /// Scratch directory.
    pub dir: Scratch,
    /// QMP session.
    pub qmp: QmpClient,
}

impl Drop for QmigDst {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The qmig-dst binary: `QMIG_DST_BIN`, or built with `cargo build -p qmig-dst` into this
/// test's target directory.
pub fn qmig_dst_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QMIG_DST_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/debug/qmig-dst (cargo build's dev profile)
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-q", "-p", "qmig-dst", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("cargo build -p qmig-dst");
    assert!(st.success(), "cargo build -p qmig-dst failed");
    target.join("debug/qmig-dst")
}

impl QmigDst {
    /// Starts qmig-dst with `args` plus `--qmp`.
    pub fn spawn(args: &[&str]) -> QmigDst {
        let dir = Scratch::new("dst");
        let sock = dir.0.join("qmp.sock");
        let log = std::fs::File::create(dir.0.join("dst.log")).unwrap();
        let child = Command::new(qmig_dst_bin())
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let qmp = QmpClient::connect_retry(&sock, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("qmig-dst QMP: {e}"));
        QmigDst { child, dir, qmp }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("dst.log")).unwrap_or_default()
    }
}

/// The destination of a scenario.
pub enum Dest {
    /// A real QEMU (`-incoming defer`).
    Qemu(Box<Qemu>),
    /// qmig-dst.
    Qmig(QmigDst),
}

impl Dest {
    fn qmp(&mut self) -> &mut QmpClient {
        match self {
            Dest::Qemu(q) => &mut q.qmp,
            Dest::Qmig(d) => &mut d.qmp,
        }
    }

    fn log(&self) -> String {
        match self {
            Dest::Qemu(q) => q.log(),
            Dest::Qmig(d) => d.log(),
        }
    }

    fn cmd(&mut self, cmd: &str, args: Value) -> Value {
        let r = self.qmp().execute(cmd, args);
        r.unwrap_or_else(|e| panic!("destination {cmd}: {e}\nlog:\n{}", self.log()))
    }

    fn wait(&mut self, status: &str) {
        let r = self.qmp().wait_status(status, PHASE);
        if let Err(e) = r {
            panic!(
                "destination never reached {status}: {e}\nlog:\n{}",
                self.log()
            );
        }
    }

    fn listen(&mut self, cmd: &str) -> u16 {
        match self {
            Dest::Qemu(q) => qemu_listen(q, cmd),
            Dest::Qmig(_) => {
                self.cmd(cmd, json!({"uri": "tcp:127.0.0.1:0"}));
                let info = self.cmd("query-migrate", Value::Null);
                info["socket-address"]
                    .as_array()
                    .and_then(|a| a.last())
                    .and_then(|a| {
                        a["port"]
                            .as_str()
                            .and_then(|p| p.parse().ok())
                            .or_else(|| a["port"].as_u64().map(|p| p as u16))
                    })
                    .unwrap_or_else(|| panic!("no port in {info}"))
            }
        }
    }

    fn dump(&mut self, size: u64) -> Vec<u8> {
        match self {
            Dest::Qemu(q) => q.dump_ram().unwrap(),
            Dest::Qmig(d) => {
                let f = d.dir.0.join("dump.bin");
                self.cmd(
                    "pmemsave",
                    json!({"val": 0, "size": size, "filename": f.display().to_string()}),
                );
                std::fs::read(f).unwrap()
            }
        }
    }

    /// Reads of high pages on the destination while in postcopy (page requests). `false` if
    /// this destination cannot read its memory on demand.
    fn read_pages(&mut self) -> bool {
        match self {
            Dest::Qemu(q) if q.qtest.is_some() => {
                let t = q.qtest().unwrap();
                for p in [RAM_MB * 256 - 1, RAM_MB * 256 - 37, RAM_MB * 256 - 300] {
                    t.read(p * 4096, 4096).unwrap();
                }
                true
            }
            _ => false,
        }
    }
}

/// Runs `case` from a fresh qmig-src to `dst`; returns qmig-src's final `query-migrate`.
pub fn run(case: Case, mut dst: Dest) -> Value {
    let postcopy = case.mode != Mode::Precopy;
    let template = case
        .template
        .map(|t| workspace().join(t).display().to_string());
    let mut args = vec![
        "--ram",
        "64M",
        "--profile",
        case.profile,
        "--fill",
        "mixed",
        "--seed",
        "7",
    ];
    if let Some(t) = &template {
        args.extend(["--device-template", t]);
    }
    if let Some(w) = case.workload {
        args.extend(["--workload", w]);
    }
    args.extend(case.src_args);
    let mut src = Src::spawn(&args);

    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    caps.push(json!({"capability": "events", "state": true}));
    for c in case.caps {
        caps.push(json!({"capability": c, "state": true}));
    }
    dst.cmd(
        "migrate-set-capabilities",
        json!({ "capabilities": caps.clone() }),
    );
    src.cmd("migrate-set-capabilities", json!({ "capabilities": caps }));
    if case.params.as_object().is_some_and(|o| !o.is_empty()) {
        src.cmd("migrate-set-parameters", case.params.clone());
    }
    if let Some(n) = case.params.get("multifd-channels") {
        // Both sides must agree on the number of multifd connections.
        dst.cmd("migrate-set-parameters", json!({ "multifd-channels": n }));
    }

    let port = dst.listen("migrate-incoming");
    let proxy = Proxy::start(([127, 0, 0, 1], port).into()).unwrap();
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", proxy.port())}),
    );
    let mut requests_expected = false;
    if postcopy {
        src.wait("active");
        src.cmd("migrate-start-postcopy", Value::Null);
        dst.wait("postcopy-active");
        src.wait("postcopy-active");
        if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
            super::wait_destination_ran(dst.qmp());
        }
        requests_expected = dst.read_pages();
    }
    match case.mode {
        Mode::PostcopyCut => {
            let (now, _) = proxy.bytes_forwarded(0);
            proxy.arm_cut(0, now + 64 * 1024);
            proxy.wait_closed(0, PHASE).unwrap();
            assert!(
                proxy.recordings()[0].cut,
                "postcopy finished before the cut"
            );
        }
        Mode::PostcopyPause => {
            src.cmd("migrate-pause", Value::Null);
        }
        _ => {}
    }
    if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
        src.wait("postcopy-paused");
        dst.wait("postcopy-paused");
        assert_eq!(
            src.cmd("query-migrate", Value::Null)["status"],
            "postcopy-paused"
        );
        src.cmd(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 0}),
        );
        let port2 = dst.listen("migrate-recover");
        assert_ne!(port2, proxy.port());
        src.cmd(
            "migrate",
            json!({"uri": format!("tcp:127.0.0.1:{port2}"), "resume": true}),
        );
        src.wait("postcopy-recover");
        src.wait("postcopy-active");
    }
    src.wait("completed");
    dst.wait("completed");
    let mut info = src.cmd("query-migrate", Value::Null);
    let profile = if case.profile == "7.2" {
        Profile::QEMU_7_2
    } else {
        Profile::QEMU_10
    };
    info["x-test-records"] = record_kinds(&proxy.recordings()[0].s2d.bytes, profile);
    let mut src_ram = src.dump(RAM_MB << 20);
    let mut dst_ram = dst.dump(RAM_MB << 20);
    for p in case.skip_pages.clone() {
        let r = (p as usize) * 4096..(p as usize + 1) * 4096;
        src_ram[r.clone()].fill(0);
        dst_ram[r].fill(0);
    }
    assert_eq!(src_ram.len(), dst_ram.len());
    assert_eq!(
        first_diff_page(&src_ram, &dst_ram),
        None,
        "destination RAM differs from qmig-src's; src info {info}"
    );
    assert_eq!(info["status"], "completed");
    assert_eq!(info["ram"]["remaining"], 0);
    let phases: u64 = ["precopy-bytes", "downtime-bytes", "postcopy-bytes"]
        .iter()
        .map(|k| info["ram"][k].as_u64().unwrap())
        .sum();
    assert_eq!(Some(phases), info["ram"]["transferred"].as_u64(), "{info}");
    if postcopy {
        assert!(
            info["ram"]["postcopy-bytes"].as_u64().unwrap() > 0,
            "{info}"
        );
    }
    assert!(info["x-qmig"]["dirty-tracking"].is_string(), "{info}");
    if requests_expected {
        assert!(
            info["ram"]["postcopy-requests"].as_u64().unwrap() >= 1,
            "{info}"
        );
    }
    if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
        assert_eq!(info["x-qmig"]["recoveries"], 1, "{info}");
    }
    // The exact status sequence qmig-src announced (QEMU's names and order for the profile).
    let seen: Vec<String> = src
        .qmp
        .event_log()
        .iter()
        .filter_map(|e| e.status().map(str::to_owned))
        .collect();
    let v10 = case.profile == "10";
    let mut want = vec!["setup", "active"];
    if v10 {
        want.push("device");
    }
    if postcopy {
        want.push("postcopy-active");
    }
    if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
        want.push("postcopy-paused");
        if v10 {
            want.push("postcopy-recover-setup");
        }
        want.extend(["postcopy-recover", "postcopy-active"]);
    }
    want.push("completed");
    assert_eq!(seen, want, "qmig-src MIGRATION events");
    eprintln!("qmig-src query-migrate: {info}");
    let st = dst.cmd("query-status", Value::Null);
    let want = if case.dst_runs { "running" } else { "paused" };
    assert_eq!(st["status"], want, "{st}");
    drop(proxy);
    info
}
