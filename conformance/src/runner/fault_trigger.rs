//! The guest-access trigger of the fault cases (`replay_faults`): how the runner makes a
//! destination touch a page. qmig-dst answers QMP `x-qmig-probe-read` (a read on a thread of
//! its own; `x-qmig-probe-result` reports its return). A template serving qtest on `{QTEST}`
//! (QEMU: its template's `{FAULT_TRIGGER}`, [`qemu_trigger_args`], for a fault case) gets qtest `readq`,
//! which QEMU runs in its main thread and which blocks it until the page is placed: the reply is
//! read at the end, and `migrate-recover` goes out of band (`exec-oob`) on the second QMP
//! monitor `{QMP_OOB}` ([`OobQmp`]) meanwhile. A target with neither is unsupported.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use super::replay_dst::{listen_on, PHASE};
use super::shim::{free_port, Target};
use super::vector::Vector;

/// The qtest socket's name in the target's directory (`{QTEST}`).
pub(super) const QTEST_SOCK: &str = "qtest.sock";
/// The second QMP socket's name in the target's directory (`{QMP_OOB}`).
pub(super) const QMP_OOB_SOCK: &str = "qmp-oob.sock";

/// `{FAULT_TRIGGER}` (QEMU syntax; the last placeholder of [`super::shim::QEMU_DST_TEMPLATE`]): for a fault
/// case a qtest socket on `{QTEST}` (the guest accesses) and a second QMP monitor on
/// `{QMP_OOB}` (out-of-band `migrate-recover` while an access blocks QEMU's main thread);
/// nothing for any other vector.
pub(super) fn qemu_trigger_args(v: &Vector, dir: &Path) -> Vec<String> {
    if !v.manifest["replay"]["faults"].is_array() {
        return vec![];
    }
    let sock = |name: &str| format!("unix:{},server=on,wait=off", dir.join(name).display());
    vec![
        "-qtest".into(),
        sock(QTEST_SOCK),
        "-qtest-log".into(),
        "/dev/null".into(),
        "-qmp".into(),
        sock(QMP_OOB_SOCK),
    ]
}

/// A QMP session with out-of-band execution on (`{QMP_OOB}`): `exec-oob` commands run in the
/// monitor's own thread, while QEMU's main thread is blocked by a guest access.
pub(super) struct OobQmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    id: u64,
}

impl OobQmp {
    fn connect(path: &Path) -> anyhow::Result<OobQmp> {
        let w = UnixStream::connect(path)
            .with_context(|| format!("QMP (out-of-band) socket {}", path.display()))?;
        w.set_read_timeout(Some(PHASE))?;
        let mut q = OobQmp {
            r: BufReader::new(w.try_clone()?),
            w,
            id: 0,
        };
        let greeting = q.read()?;
        if !greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "oob"))
        {
            bail!("the QMP monitor does not offer out-of-band execution: {greeting}");
        }
        q.send(&json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}))?;
        q.reply(None)?;
        Ok(q)
    }

    fn send(&mut self, x: &Value) -> anyhow::Result<()> {
        self.w.write_all(format!("{x}\n").as_bytes())?;
        Ok(())
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        self.r.read_line(&mut line).context("QMP (out-of-band)")?;
        if line.is_empty() {
            bail!("QMP (out-of-band) closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// The reply to the command with `id` (events skipped: the main session has them too).
    fn reply(&mut self, id: Option<&str>) -> anyhow::Result<Value> {
        loop {
            let x = self.read()?;
            if x.get("event").is_some() || (id.is_some() && x["id"].as_str() != id) {
                continue;
            }
            if let Some(e) = x.get("error") {
                bail!("{}: {}", e["class"], e["desc"]);
            }
            return Ok(x["return"].clone());
        }
    }

    /// `exec-oob command arguments`.
    fn exec(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        self.id += 1;
        let id = format!("oob-{}", self.id);
        self.send(&json!({"exec-oob": command, "arguments": arguments, "id": id}))?;
        self.reply(Some(&id))
            .with_context(|| format!("exec-oob {command}"))
    }
}

/// How the runner makes guest accesses on the target.
pub(super) enum Trigger {
    /// QMP `x-qmig-probe-read` (qmig-dst): the access runs on a thread of the target's own;
    /// `x-qmig-probe-result` reports its return.
    Probe,
    /// qtest `readq` on the socket `{QTEST}` (a template that serves qtest there: QEMU). The
    /// access runs in QEMU's main thread, which it blocks until the page is placed: the reply
    /// is read only at the end (`pending` replies owed).
    Qtest {
        path: PathBuf,
        conn: Option<(UnixStream, BufReader<UnixStream>)>,
        pending: usize,
        /// The out-of-band QMP session, when the target serves `{QMP_OOB}`.
        oob: Option<OobQmp>,
    },
}

impl Trigger {
    /// The trigger of target `t`: qtest when its command line serves `{QTEST}`, else the
    /// probe.
    pub(super) fn of(t: &Target) -> anyhow::Result<Trigger> {
        let serves = |name: &str| {
            let path = t.dir.join(name);
            let sock = path.display().to_string();
            t.argv.iter().any(|a| a.contains(&sock)).then_some(path)
        };
        Ok(match serves(QTEST_SOCK) {
            Some(path) => Trigger::Qtest {
                path,
                conn: None,
                pending: 0,
                oob: serves(QMP_OOB_SOCK)
                    .map(|p| OobQmp::connect(&p))
                    .transpose()?,
            },
            None => Trigger::Probe,
        })
    }

    /// `migrate-recover` on a free port: out of band while an access blocks the main thread
    /// (an error if the target serves no `{QMP_OOB}`), else as usual. The port listened on.
    pub(super) fn recover(&mut self, t: &mut Target) -> anyhow::Result<u16> {
        if let Trigger::Qtest {
            pending, oob: q, ..
        } = self
        {
            if *pending > 0 {
                let q = q.as_mut().context(
                    "a guest access blocks the target's main thread and it serves no out-of-band QMP monitor ({QMP_OOB}) for migrate-recover",
                )?;
                let port = free_port()?;
                q.exec(
                    "migrate-recover",
                    json!({"uri": format!("tcp:127.0.0.1:{port}")}),
                )?;
                return Ok(port);
            }
        }
        listen_on(t, "migrate-recover", free_port()?)
    }

    /// Makes a guest access: 8 bytes read at guest-physical `addr`.
    /// `Ok(Some(reason))`: the target has no trigger (the case is unsupported).
    pub(super) fn access(&mut self, t: &mut Target, addr: u64) -> anyhow::Result<Option<String>> {
        match self {
            Trigger::Probe => match t
                .qmp
                .execute("x-qmig-probe-read", json!({ "offset": addr }))
            {
                Ok(_) => Ok(None),
                Err(qmig_host::qmp_client::QmpError::Command { class, desc, .. })
                    if class == "CommandNotFound" =>
                {
                    Ok(Some(format!(
                        "unsupported: a fault case needs a guest-access trigger, and the target \
                         has no x-qmig-probe-read ({class}: {desc}) and serves no qtest ({{QTEST}})"
                    )))
                }
                Err(e) => Err(anyhow!(e).context("x-qmig-probe-read")),
            },
            Trigger::Qtest {
                path,
                conn,
                pending,
                ..
            } => {
                if conn.is_none() {
                    let s = UnixStream::connect(&*path)
                        .with_context(|| format!("qtest socket {}", path.display()))?;
                    s.set_read_timeout(Some(PHASE))?;
                    let r = BufReader::new(s.try_clone()?);
                    *conn = Some((s, r));
                }
                let (s, _) = conn.as_mut().context("qtest")?;
                // Written, not answered yet: the reply comes once the page is placed.
                s.write_all(format!("readq 0x{addr:x}\n").as_bytes())
                    .context("qtest readq")?;
                *pending += 1;
                Ok(None)
            }
        }
    }

    /// Waits (bounded by the phase guard) until the accesses returned.
    pub(super) fn wait_done(&mut self, t: &mut Target) -> anyhow::Result<()> {
        match self {
            Trigger::Probe => wait_probe(t),
            Trigger::Qtest { conn, pending, .. } => {
                let Some((_, r)) = conn.as_mut() else {
                    return Ok(());
                };
                while *pending > 0 {
                    let mut line = String::new();
                    r.read_line(&mut line).context("qtest reply")?;
                    if line.is_empty() {
                        bail!("qtest closed before the access returned");
                    }
                    if line.starts_with("IRQ") {
                        continue;
                    }
                    if !line.starts_with("OK") {
                        bail!("qtest readq: {}", line.trim());
                    }
                    *pending -= 1;
                }
                Ok(())
            }
        }
    }
}

/// Waits (bounded by the phase guard) until qmig-dst reports the last probe returned.
fn wait_probe(t: &mut Target) -> anyhow::Result<()> {
    let end = Instant::now() + PHASE;
    loop {
        let r = t
            .qmp
            .execute("x-qmig-probe-result", json!({}))
            .map_err(|e| anyhow!(e).context("x-qmig-probe-result"))?;
        if r["done"] == true {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("the guest access never returned ({r})");
        }
        // No event announces the access's return: polled (the page is placed by then).
        std::thread::sleep(Duration::from_millis(10));
    }
}
