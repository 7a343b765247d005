//! The reference processes under attack: `qmig-dst` / `qmig-src` children with a QMP client,
//! each in its own scratch directory, killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use crate::demo::procs::find_binary;

/// How long a QMP command may take before the test fails (a failure guard, not a measurement).
pub const QMP_GUARD: Duration = Duration::from_secs(20);

/// A free TCP port on 127.0.0.1 for a target to listen on ([`crate::runner::shim::free_port`]).
pub fn free_port() -> u16 {
    crate::runner::shim::free_port().expect("a free port")
}

/// A reference binary running with a QMP socket.
pub struct Proc {
    child: Child,
    dir: PathBuf,
    /// Its QMP client.
    pub qmp: QmpClient,
}

impl Proc {
    fn spawn(exe: &str, dir: &Path, args: &[String], netns: Option<&str>) -> anyhow::Result<Proc> {
        let exe = find_binary(exe)?;
        let log = std::fs::File::create(dir.join("log.txt"))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut qmp = QmpClient::connect_retry(dir.join("qmp.sock"), QMP_GUARD)
            .with_context(|| format!("QMP of {}", exe.display()))?;
        qmp.set_command_timeout(Some(QMP_GUARD));
        Ok(Proc {
            child,
            dir: dir.to_path_buf(),
            qmp,
        })
    }

    /// The process is still running and QMP still answers (`query-status`).
    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("exited: {st}; log:\n{}", self.log());
        }
        self.qmp
            .execute("query-status", Value::Null)
            .context("query-status")?;
        Ok(())
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> anyhow::Result<Value> {
        Ok(self.qmp.execute("query-migrate", Value::Null)?)
    }

    /// Waits for the `MIGRATION` event with `status` (the guard bounds the wait), then
    /// returns `query-migrate`, which must report that status.
    pub fn wait_status(&mut self, status: &str) -> anyhow::Result<Value> {
        let q = self.query_migrate()?;
        if q["status"] != status {
            // A `failed` event while waiting for another status ends the wait; the check
            // below reports it.
            let _ = self.qmp.wait_status(status, QMP_GUARD);
        }
        let q = self.query_migrate()?;
        if q["status"] != status {
            bail!(
                "status {} instead of {status}: {q}\nlog:\n{}",
                q["status"],
                self.log()
            );
        }
        Ok(q)
    }

    /// The end of the process's log.
    pub fn log(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("log.txt")).unwrap_or_default();
        let n = s.len().saturating_sub(4000);
        s[n..].to_string()
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qmig-dst` for a `none` machine with one `ram` block, listening on a TCP port.
pub struct DstProcess {
    /// The process.
    pub proc: Proc,
    /// Its migration port.
    pub port: u16,
    /// RAM bytes.
    pub ram: u64,
}

impl DstProcess {
    /// Starts `qmig-dst -M none -m RAM --incoming tcp:ADDR:PORT` in `dir` (optionally inside a
    /// network namespace), with `--drop-timeout` `drop_ms`.
    pub fn start(
        dir: &Path,
        ram: u64,
        addr: &str,
        netns: Option<&str>,
        drop_ms: u64,
    ) -> anyhow::Result<DstProcess> {
        let port = free_port();
        let args = vec![
            "--qmp".to_string(),
            format!("unix:{}", dir.join("qmp.sock").display()),
            "--incoming".to_string(),
            format!("tcp:{addr}:{port}"),
            "-M".to_string(),
            "none".to_string(),
            "-m".to_string(),
            ram.to_string(),
            "--profile".to_string(),
            "10".to_string(),
            "--drop-timeout".to_string(),
            format!("{drop_ms}ms"),
        ];
        let mut proc = Proc::spawn("qmig-dst", dir, &args, netns)?;
        proc.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )?;
        Ok(DstProcess { proc, port, ram })
    }

    /// Guest RAM read back with `pmemsave`.
    pub fn ram(&mut self) -> anyhow::Result<Vec<u8>> {
        let f = self.proc.dir().join("ram.bin");
        self.proc.qmp.execute(
            "pmemsave",
            json!({"val": 0, "size": self.ram, "filename": f.display().to_string()}),
        )?;
        Ok(std::fs::read(&f)?)
    }
}

/// `qmig-src` for a `none` machine with one `ram` block.
pub struct SrcProcess {
    /// The process.
    pub proc: Proc,
}

impl SrcProcess {
    /// Starts `qmig-src -M none --ram RAM` in `dir` with the return path on.
    pub fn start(dir: &Path, ram: u64) -> anyhow::Result<SrcProcess> {
        let args = vec![
            "--qmp".to_string(),
            format!("unix:{}", dir.join("qmp.sock").display()),
            "--machine".to_string(),
            "none".to_string(),
            "--ram".to_string(),
            ram.to_string(),
            "--profile".to_string(),
            "10".to_string(),
            "--fill".to_string(),
            "random".to_string(),
        ];
        let mut proc = Proc::spawn("qmig-src", dir, &args, None)?;
        proc.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "return-path", "state": true},
                {"capability": "events", "state": true}
            ]}),
        )?;
        Ok(SrcProcess { proc })
    }

    /// `migrate` to `tcp:127.0.0.1:PORT`.
    pub fn migrate(&mut self, port: u16) -> anyhow::Result<()> {
        self.proc
            .qmp
            .execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
        Ok(())
    }
}
