//! One side of a benchmarked migration: a QEMU 7.2 (through [`crate::qemu::Qemu`]) or a
//! reference binary (`qmig-src` / `qmig-dst`, spawned here), reached over QMP, with its pid for
//! CPU accounting and, for QEMU, its qtest session.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use super::cpu;
use crate::qemu::{Machine, Qemu, QemuBinary, Qtest};

/// How long a peer gets to open its QMP socket (a 1 GiB random fill happens first).
const START_TIMEOUT: Duration = Duration::from_secs(300);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running reference binary, killed on drop.
pub struct QmigProc {
    child: Child,
    dir: PathBuf,
    qmp: QmpClient,
    /// Its exact command line.
    pub command_line: String,
}

impl QmigProc {
    /// Spawns `program args... --qmp unix:DIR/qmp.sock` and connects to its QMP socket.
    pub fn spawn(program: &Path, args: &[String]) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "qmig-bench-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let sock = dir.join("qmp.sock");
        let mut all: Vec<String> = args.to_vec();
        all.extend(["--qmp".into(), format!("unix:{}", sock.display())]);
        let log = fs::File::create(dir.join("log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(program)
            .args(&all)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let exited = |c: &mut std::process::Child| match c.try_wait() {
            Ok(Some(st)) => Err(format!("the process exited ({st})")),
            _ => Ok(()),
        };
        let qmp = match QmpClient::connect_while(&sock, START_TIMEOUT, || exited(&mut child)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = fs::read_to_string(dir.join("log")).unwrap_or_default();
                let _ = fs::remove_dir_all(&dir);
                return Err(format!(
                    "{} did not start: {e}; log: {log}",
                    program.display()
                ));
            }
        };
        let command_line = format!("{} {}", program.display(), all.join(" "));
        Ok(QmigProc {
            child,
            dir,
            qmp,
            command_line,
        })
    }

    /// Its log (stdout and stderr).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

impl Drop for QmigProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A benchmarked migration endpoint.
pub enum Peer {
    /// QEMU and its pid.
    Qemu(Box<Qemu>, u32),
    /// `qmig-src` or `qmig-dst`.
    Qmig(Box<QmigProc>),
}

impl Peer {
    /// QEMU `bin` on `-M none -cpu qemu64,apic-id=0` with `size` bytes of RAM; `incoming` adds
    /// `-incoming defer`.
    pub fn qemu(bin: &QemuBinary, size: u64, incoming: bool) -> Result<Peer, String> {
        let q = Qemu::launch(bin, Machine::NoneCpu, size >> 20, incoming, &[])
            .map_err(|e| e.to_string())?;
        let sock = q.dir().join("qmp.sock").display().to_string();
        let pid = cpu::find_pid_by_cmdline(&sock)
            .ok_or_else(|| format!("no process with {sock} on its command line"))?;
        Ok(Peer::Qemu(Box::new(q), pid))
    }

    /// A reference binary, with the `events` capability turned on.
    pub fn qmig(program: &Path, args: &[String]) -> Result<Peer, String> {
        let mut p = QmigProc::spawn(program, args)?;
        p.qmp
            .execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "events", "state": true}]}),
            )
            .map_err(|e| format!("events capability: {e}; log: {}", p.log()))?;
        Ok(Peer::Qmig(Box::new(p)))
    }

    /// The QMP session.
    pub fn qmp(&mut self) -> &mut QmpClient {
        match self {
            Peer::Qemu(q, _) => &mut q.qmp,
            Peer::Qmig(p) => &mut p.qmp,
        }
    }

    /// Runs a QMP command; errors carry the peer's log.
    pub fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        match self.qmp().execute(cmd, args) {
            Ok(v) => Ok(v),
            Err(e) => Err(format!("{cmd}: {e}; log: {}", self.log_tail())),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        match self {
            Peer::Qemu(_, pid) => *pid,
            Peer::Qmig(p) => p.child.id(),
        }
    }

    /// CPU seconds used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu::process_seconds(self.pid()).unwrap_or(f64::NAN)
    }

    /// The qtest session (QEMU only).
    pub fn qtest(&mut self) -> Option<&mut Qtest> {
        match self {
            Peer::Qemu(q, _) => q.qtest.as_mut(),
            Peer::Qmig(_) => None,
        }
    }

    /// The exact command line.
    pub fn command_line(&self) -> String {
        match self {
            Peer::Qemu(q, _) => format!("{} {}", q.binary.program.display(), q.args.join(" ")),
            Peer::Qmig(p) => p.command_line.clone(),
        }
    }

    /// The last lines of the peer's log.
    pub fn log_tail(&self) -> String {
        let log = match self {
            Peer::Qemu(q, _) => q.log(),
            Peer::Qmig(p) => p.log(),
        };
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}
