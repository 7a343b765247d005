//! The QMP command set of `qmig-src`.
//!
//! This module owns [`SourceQmp`], the [`QmpHandler`] plugged into qmig-host's QMP server:
//! `migrate` (`uri`, `resume`), `migrate-start-postcopy`, `migrate-pause`, `migrate_cancel`,
//! `migrate-set-capabilities`, `query-migrate-capabilities`, `migrate-set-parameters`,
//! `query-migrate-parameters`, `query-migrate`, `query-status`, `stop`, `cont`, `pmemsave`
//! (`quit` and `query-version` are the server's), and one extension, `x-qmig-write`
//! (`addr`, `data` in hex): a guest store into RAM while the guest is still on the source,
//! which the dirty tracking sees (what a QEMU source gets through qtest; the conformance
//! runner's SM-DISCARD-DIRTY case uses it). Each command checks the request against the
//! current status, then hands the work to the migration thread; none waits for the migration.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use qmig_host::dirty::Choice;
use qmig_host::memory::PAGE_SIZE;
use qmig_host::qmp_server::QmpHandler;
use qmig_host::qmp_types::{
    parse_args, to_return, MigrateArgs, MigrateSetCapabilitiesArgs, MigrationCapabilityStatus,
    MigrationParameters, MigrationStatus, PmemsaveArgs, QmpError, StatusInfo,
};
use qmig_host::stats::RamFigures;
use qmig_host::uri::MigrationUri;
use qmig_protocol::machine::DeviceState;
use serde_json::{json, Value};

use crate::migration::{self, Plan};
use crate::page_caps::{check_cap, check_combination, PAGE_CAPS};
use crate::state::{Msg, Shared};

/// Capabilities `migrate-set-capabilities` accepts besides the page encodings of
/// [`crate::page_caps`] (`xbzrle`, `compress` with a 7.2 profile, `x-ignore-shared`); others
/// are refused, as QEMU refuses unknown names. `multifd` is precopy only (not with
/// `postcopy-ram`, as QEMU 7.2 and 10.0 refuse).
const KNOWN_CAPS: &[&str] = &[
    "postcopy-ram",
    "return-path",
    "events",
    "pause-before-switchover",
    "postcopy-blocktime",
    "validate-uuid",
    "multifd",
];

/// The handler; see the module doc.
pub struct SourceQmp {
    /// Shared with the migration thread.
    pub shared: Arc<Shared>,
    /// Machine type name.
    pub machine: String,
    /// Device sections to send.
    pub devices: Vec<DeviceState>,
    /// VM description written after a precopy EOF.
    pub vmdesc: Vec<u8>,
    /// Dirty tracking choice.
    pub tracking: Choice,
}

fn err(s: impl Into<String>) -> QmpError {
    QmpError::generic(s)
}

/// Bytes from hex digits, two per byte (`None`: an odd count or another character).
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl SourceQmp {
    fn send(&self, m: Msg) -> Result<(), QmpError> {
        let tx = self.shared.lock().tx.clone();
        tx.ok_or_else(|| err("There's a migration process in progress"))?
            .send(m)
            .map_err(|_| err("the migration thread has ended"))
    }

    fn migrate(&self, a: MigrateArgs) -> Result<Value, QmpError> {
        let uri = a.uri.ok_or_else(|| err("Parameter 'uri' is missing"))?;
        let uri = MigrationUri::parse(&uri).map_err(|e| err(e.to_string()))?;
        let status = self.shared.status();
        if a.resume.unwrap_or(false) {
            if status != MigrationStatus::PostcopyPaused {
                return Err(err(format!(
                    "Cannot resume if there is no paused migration (status {status})"
                )));
            }
            self.send(Msg::Resume(uri))?;
            return Ok(json!({}));
        }
        let busy = self.shared.lock().tx.is_some();
        if busy
            || !matches!(
                status,
                MigrationStatus::None
                    | MigrationStatus::Completed
                    | MigrationStatus::Failed
                    | MigrationStatus::Cancelled
            )
        {
            return Err(err("There's a migration process in progress"));
        }
        if status == MigrationStatus::Completed {
            return Err(err("the guest has already been migrated"));
        }
        migration::start(
            self.shared.clone(),
            Plan {
                uri,
                machine: self.machine.clone(),
                devices: self.devices.clone(),
                vmdesc: self.vmdesc.clone(),
                tracking: self.tracking,
            },
        )
        .map_err(err)?;
        Ok(json!({}))
    }

    fn set_caps(&self, a: MigrateSetCapabilitiesArgs) -> Result<Value, QmpError> {
        if !matches!(
            self.shared.status(),
            MigrationStatus::None
                | MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
        ) {
            return Err(err("There's a migration process in progress"));
        }
        for c in &a.capabilities {
            let name = c.capability.as_str();
            if !KNOWN_CAPS.contains(&name) && !PAGE_CAPS.contains(&name) && c.state {
                return Err(err(format!(
                    "capability '{}' is not supported by qmig-src",
                    c.capability
                )));
            }
            check_cap(&self.shared.profile, name, c.state).map_err(err)?;
        }
        let mut g = self.shared.lock();
        let on = |name: &str| {
            a.capabilities
                .iter()
                .rev()
                .find(|c| c.capability == name)
                .map(|c| c.state)
                .unwrap_or_else(|| g.caps.get(name).copied().unwrap_or(false))
        };
        check_combination(&on).map_err(err)?;
        for c in a.capabilities {
            g.caps.insert(c.capability, c.state);
        }
        Ok(json!({}))
    }

    fn query_caps(&self) -> Result<Value, QmpError> {
        let g = self.shared.lock();
        let list: Vec<MigrationCapabilityStatus> = KNOWN_CAPS
            .iter()
            .chain(PAGE_CAPS)
            .map(|c| MigrationCapabilityStatus {
                capability: (*c).to_owned(),
                state: g.caps.get(*c).copied().unwrap_or(false),
            })
            .collect();
        to_return(&list)
    }

    fn set_params(&self, p: MigrationParameters) -> Result<Value, QmpError> {
        let s = &self.shared;
        s.page_params
            .set(&p, s.profile.target_page_size as u64)
            .map_err(err)?;
        if let Some(n) = p.multifd_channels {
            if !(1..=255).contains(&n) {
                return Err(err(
                    "Parameter 'multifd-channels' expects a value between 1 and 255",
                ));
            }
        }
        if let Some(n) = p.multifd_channels {
            s.multifd_channels.store(n, Ordering::Relaxed);
        }
        if let Some(b) = p.max_bandwidth {
            s.max_bandwidth.store(b, Ordering::Relaxed);
        }
        if let Some(b) = p.max_postcopy_bandwidth {
            s.max_postcopy_bandwidth.store(b, Ordering::Relaxed);
        }
        if let Some(v) = p.other.get("x-return-path-timeout") {
            let ms = v
                .as_u64()
                .filter(|&ms| ms > 0)
                .ok_or_else(|| err("Parameter 'x-return-path-timeout' expects milliseconds > 0"))?;
            s.rp_timeout.store(ms, Ordering::Relaxed);
        }
        if let Some(d) = p.downtime_limit {
            if d > 2_000_000 {
                return Err(err("Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 milliseconds"));
            }
            s.downtime_limit.store(d, Ordering::Relaxed);
        }
        Ok(json!({}))
    }

    fn query_params(&self) -> Result<Value, QmpError> {
        let s = &self.shared;
        let mut params = MigrationParameters {
            max_bandwidth: Some(Shared::get(&s.max_bandwidth)),
            max_postcopy_bandwidth: Some(Shared::get(&s.max_postcopy_bandwidth)),
            downtime_limit: Some(Shared::get(&s.downtime_limit)),
            multifd_channels: Some(Shared::get(&s.multifd_channels)),
            other: [(
                "x-return-path-timeout".to_owned(),
                json!(Shared::get(&s.rp_timeout)),
            )]
            .into_iter()
            .collect(),
            ..MigrationParameters::default()
        };
        s.page_params.query(&mut params, &s.profile);
        to_return(&params)
    }

    fn query_migrate(&self) -> Result<Value, QmpError> {
        let s = &self.shared;
        let status = s.status();
        if status == MigrationStatus::None {
            return Ok(json!({}));
        }
        let ram = RamFigures {
            page_size: PAGE_SIZE as u64,
            total: s.guest.ram.total_len(),
            remaining: Shared::get(&s.remaining),
        };
        let mut info = s.recorder.info(Instant::now(), status.clone(), ram);
        if let Some(r) = info.ram.as_mut() {
            r.dirty_pages_rate = Shared::get(&s.dirty_pages_rate);
            r.precopy_bytes = Shared::get(&s.precopy_bytes);
            r.downtime_bytes = Shared::get(&s.downtime_bytes);
            r.postcopy_bytes = Shared::get(&s.postcopy_bytes);
        }
        let g = s.lock();
        info.error_desc = g.error.clone();
        if status == MigrationStatus::Completed {
            info.downtime = Some(Shared::get(&s.downtime_ms));
        }
        if let Some(x) = info.x_qmig.as_mut() {
            if let Some(m) = g.mechanism {
                x.other.insert("dirty-tracking".into(), json!(m));
            }
            x.other
                .insert("iterations".into(), json!(Shared::get(&s.iterations)));
            x.other
                .insert("profile".into(), json!(format!("{:?}", s.profile.version)));
        }
        to_return(&info)
    }

    /// Refuses a command that acts on the guest once it has moved to the destination.
    fn guest_here(&self) -> Result<(), QmpError> {
        let st = self.shared.status();
        if matches!(
            st,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
                | MigrationStatus::PostcopyRecover
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::Completed
        ) {
            return Err(err(format!(
                "the guest has moved to the destination (status {st})"
            )));
        }
        Ok(())
    }

    fn query_status(&self) -> Result<Value, QmpError> {
        let running = self.shared.guest.running();
        let status = match (running, self.shared.status()) {
            (true, _) => "running",
            (false, MigrationStatus::Completed) => "postmigrate",
            (false, MigrationStatus::PostcopyActive | MigrationStatus::PostcopyPaused) => {
                "finish-migrate"
            }
            (false, _) => "paused",
        };
        to_return(&StatusInfo {
            status: status.into(),
            running,
        })
    }
}

impl QmpHandler for SourceQmp {
    fn execute(&self, cmd: &str, args: &Value) -> Result<Value, QmpError> {
        match cmd {
            "migrate" => self.migrate(parse_args(args)?),
            "migrate-start-postcopy" => {
                if !self.shared.cap("postcopy-ram") {
                    return Err(err(
                        "Enable postcopy with migrate_set_capability before the start of migration",
                    ));
                }
                if !matches!(
                    self.shared.status(),
                    MigrationStatus::Setup | MigrationStatus::Active
                ) {
                    return Err(err(
                        "Postcopy must be started after migration has been started",
                    ));
                }
                self.send(Msg::StartPostcopy)?;
                Ok(json!({}))
            }
            "migrate-pause" => {
                let st = self.shared.status();
                if !matches!(
                    st,
                    MigrationStatus::PostcopyActive
                        | MigrationStatus::PostcopyRecover
                        | MigrationStatus::PostcopyRecoverSetup
                ) {
                    return Err(err(format!(
                        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state (status {st})"
                    )));
                }
                self.send(Msg::Pause)?;
                if let Some(c) = self.shared.lock().cutter.clone() {
                    c.cut();
                }
                Ok(json!({}))
            }
            "migrate_cancel" => {
                if self.send(Msg::Cancel).is_ok() {
                    if let Some(c) = self.shared.lock().cutter.clone() {
                        c.cut();
                    }
                }
                Ok(json!({}))
            }
            "migrate-set-capabilities" => self.set_caps(parse_args(args)?),
            "query-migrate-capabilities" => self.query_caps(),
            "migrate-set-parameters" => self.set_params(parse_args(args)?),
            "query-migrate-parameters" => self.query_params(),
            "query-migrate" => self.query_migrate(),
            "query-status" => self.query_status(),
            "stop" => {
                if self.shared.guest.stop() {
                    self.shared.events.stop();
                }
                Ok(json!({}))
            }
            "cont" => {
                self.guest_here()?;
                match self.shared.guest.start() {
                    Ok(true) => self.shared.events.resume(),
                    Ok(false) => {}
                    Err(e) => return Err(err(e.to_string())),
                }
                Ok(json!({}))
            }
            "x-qmig-write" => {
                self.guest_here()?;
                let addr = args["addr"]
                    .as_u64()
                    .ok_or_else(|| err("Parameter 'addr' expects an integer"))?;
                let data = args["data"]
                    .as_str()
                    .and_then(from_hex)
                    .ok_or_else(|| err("Parameter 'data' expects hex digits, two per byte"))?;
                self.shared.guest.write(addr, &data).map_err(err)?;
                Ok(json!({}))
            }
            "pmemsave" => {
                let a: PmemsaveArgs = parse_args(args)?;
                self.shared
                    .guest
                    .pmemsave(a.val, a.size, std::path::Path::new(&a.filename))
                    .map_err(err)?;
                Ok(json!({}))
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }
}
