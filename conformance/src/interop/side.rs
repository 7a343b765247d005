//! One running endpoint of an interop cell: a QEMU ([`crate::qemu::Qemu`]) or a qmig binary
//! ([`crate::runner::shim::Target`]), both driven over QMP.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use super::Impl;
use crate::qemu::{find_qemu, Machine, Qemu, QemuVersion};
use crate::runner::shim::{scratch_dir, StartError, Target};
use crate::runner::{bin_dir, find_bin};

/// A running endpoint.
pub enum Side {
    /// A QEMU process.
    Qemu(Box<Qemu>),
    /// qmig-src or qmig-dst.
    Qmig(Box<Target>, PathBuf),
}

/// Why a side cannot start.
pub enum SideError {
    /// Not installed / unsupported: skip.
    Skip(String),
    /// Failure.
    Fail(anyhow::Error),
}

impl From<anyhow::Error> for SideError {
    fn from(e: anyhow::Error) -> Self {
        SideError::Fail(e)
    }
}

/// How a cell's guests look.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    /// Machine (both sides).
    pub machine: Machine,
    /// RAM in MiB.
    pub ram_mb: u64,
    /// Seed of the qmig-src fill / QEMU qtest pattern.
    pub seed: u64,
}

impl Side {
    /// Starts `imp` as a source (`incoming` false) or destination. `peer` is the other side's
    /// implementation (the qmig profile follows the QEMU it talks to).
    pub fn start(
        imp: Impl,
        incoming: bool,
        g: Guest,
        peer: Impl,
        dirty: bool,
    ) -> Result<Side, SideError> {
        match imp {
            Impl::Qemu72 | Impl::Qemu100 => {
                let v = if imp == Impl::Qemu72 {
                    QemuVersion::V7_2
                } else {
                    QemuVersion::V10_0
                };
                let bin = match find_qemu(v) {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        return Err(SideError::Skip(format!("{} not installed", imp.name())))
                    }
                    Err(e) => return Err(SideError::Fail(anyhow!("{e}"))),
                };
                let mut extra: Vec<&str> = Vec::new();
                if imp == Impl::Qemu100 && !incoming && peer == Impl::Qemu72 {
                    // QEMU 7.2 does not know MIG_CMD_SWITCHOVER_START.
                    extra.extend(["-global", "migration.send-switchover-start=off"]);
                }
                let q = Qemu::launch(&bin, g.machine, g.ram_mb, incoming, &extra)
                    .map_err(|e| SideError::Fail(anyhow!("{e}")))?;
                Ok(Side::Qemu(Box::new(q)))
            }
            Impl::Qmig => {
                let name = if incoming { "qmig-dst" } else { "qmig-src" };
                let bin = find_bin(name, &bin_dir()).ok_or_else(|| {
                    SideError::Skip(format!("{name} not found next to qmig or on PATH"))
                })?;
                let dir = scratch_dir(name)?;
                let qmp = dir.join("qmp.sock");
                let profile = if peer == Impl::Qemu72 { "7.2" } else { "10" };
                let machine = g.machine.type_name();
                let mut argv: Vec<String> = vec![
                    bin.display().to_string(),
                    "--qmp".into(),
                    format!("unix:{}", qmp.display()),
                    "--profile".into(),
                    profile.into(),
                    "--machine".into(),
                    machine.into(),
                ];
                if incoming {
                    argv.extend(["-m".into(), format!("{}M", g.ram_mb)]);
                    if let Some(vd) = dst_vmdesc(g.machine, peer) {
                        // The CPU's (and microvm's) device sections are delimited by the VM
                        // description of the QEMU they come from.
                        argv.extend(["--vmdesc".into(), vd]);
                    }
                } else {
                    argv.extend([
                        "--ram".into(),
                        format!("{}M", g.ram_mb),
                        "--fill".into(),
                        "mixed".into(),
                        "--seed".into(),
                        g.seed.to_string(),
                    ]);
                    if dirty {
                        argv.extend(["--workload".into(), "random,rate=200".into()]);
                    }
                }
                match Target::start(argv, &dir, &qmp) {
                    Ok(t) => Ok(Side::Qmig(Box::new(t), dir)),
                    Err(StartError::Unsupported(m)) => {
                        Err(SideError::Skip(format!("{name}: unsupported: {m}")))
                    }
                    Err(StartError::Failed(e)) => Err(SideError::Fail(e)),
                }
            }
        }
    }

    /// The QMP session.
    pub fn qmp(&mut self) -> &mut QmpClient {
        match self {
            Side::Qemu(q) => &mut q.qmp,
            Side::Qmig(t, _) => &mut t.qmp,
        }
    }

    /// Runs a QMP command.
    pub fn cmd(&mut self, c: &str, args: Value) -> anyhow::Result<Value> {
        self.qmp().execute(c, args).map_err(|e| anyhow!("{c}: {e}"))
    }

    /// `query-migrate` status.
    pub fn status(&mut self) -> String {
        self.qmp()
            .migration_status()
            .unwrap_or_else(|e| format!("(query-migrate failed: {e})"))
    }

    /// Whole guest RAM from guest-physical 0 (`bytes` long).
    pub fn ram(&mut self, bytes: u64) -> anyhow::Result<Vec<u8>> {
        match self {
            Side::Qemu(q) => q.pmemsave(0, bytes).map_err(|e| anyhow!("pmemsave: {e}")),
            Side::Qmig(t, dir) => {
                let f = dir.join("pmemsave.bin");
                t.qmp
                    .execute(
                        "pmemsave",
                        json!({"val": 0, "size": bytes, "filename": f.display().to_string()}),
                    )
                    .map_err(|e| anyhow!("pmemsave: {e}"))?;
                let d = std::fs::read(&f).context("pmemsave output")?;
                let _ = std::fs::remove_file(&f);
                Ok(d)
            }
        }
    }

    /// `len` bytes of guest-physical memory from `addr` as the guest sees them (QEMU only:
    /// `pmemsave`, so ROM and firmware mapped over RAM read as such).
    pub fn phys(&mut self, addr: u64, len: u64) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Side::Qemu(q) => Ok(Some(
                q.pmemsave(addr, len)
                    .map_err(|e| anyhow!("pmemsave: {e}"))?,
            )),
            Side::Qmig(..) => Ok(None),
        }
    }

    /// One whole RAM block by name (qmig only: `x-qmig-ramsave`).
    pub fn block(&mut self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        match self {
            Side::Qemu(_) => Ok(None),
            Side::Qmig(t, dir) => {
                let f = dir.join("ramsave.bin");
                t.qmp
                    .execute(
                        "x-qmig-ramsave",
                        json!({"block": name, "filename": f.display().to_string()}),
                    )
                    .map_err(|e| anyhow!("x-qmig-ramsave {name}: {e}"))?;
                let d = std::fs::read(&f).context("x-qmig-ramsave output")?;
                let _ = std::fs::remove_file(&f);
                Ok(Some(d))
            }
        }
    }

    /// Whether this is qmig (`qmig-src` / `qmig-dst`).
    pub fn is_qmig(&self) -> bool {
        matches!(self, Side::Qmig(..))
    }

    /// Console output (last part).
    pub fn log(&self) -> String {
        match self {
            Side::Qemu(q) => {
                let l = q.log();
                l[l.len().saturating_sub(1500)..].to_string()
            }
            Side::Qmig(t, _) => t.log_tail(),
        }
    }

    /// Writes guest pages through qtest (QEMU with qtest only); `false` if impossible.
    pub fn qtest_write(&mut self, addr: u64, data: &[u8]) -> anyhow::Result<bool> {
        match self {
            Side::Qemu(q) if q.machine.has_qtest() => {
                q.qtest()
                    .map_err(|e| anyhow!("{e}"))?
                    .write(addr, data)
                    .map_err(|e| anyhow!("qtest: {e}"))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// The VM description qmig-dst needs to delimit the device sections of a QEMU source on a
/// machine with a CPU: the one captured from that QEMU version on that machine (`None` for
/// `-M none` without CPU, which has no device sections, and for a qmig source).
fn dst_vmdesc(machine: Machine, peer: Impl) -> Option<String> {
    let version = match (machine, peer) {
        (Machine::NoneNoCpu, _) | (_, Impl::Qmig) => return None,
        (_, Impl::Qemu72) => "qemu-7.2",
        (_, Impl::Qemu100) => "qemu-10.0",
    };
    Some(format!(
        "{}/vectors/{version}/postcopy/vmdesc.json",
        env!("CARGO_MANIFEST_DIR")
    ))
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Side::Qmig(_, dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
