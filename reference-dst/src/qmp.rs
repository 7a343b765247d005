//! The destination's QMP commands.
//!
//! This module owns [`Handler`], the `qmig_host::qmp_server::QmpHandler` of qmig-dst:
//! `migrate-incoming`, `migrate-recover` (listeners are bound here, so a bad address is an
//! error of the command, and handed to the migration thread), `migrate-pause`,
//! `migrate_cancel`, `migrate-set-capabilities` / `-parameters` and their queries (parameters
//! are kept as given; the migration thread reads `multifd-channels` and
//! `x-qmig-silence-timeout`),
//! `query-migrate` (status, RAM figures, `error-desc`, `socket-address`, `x-qmig` with the
//! fault latency histogram), `query-status`, `pmemsave` (guest-physical 0 is the first RAM
//! block), `x-qmig-ramsave` (one whole block by name), `x-qmig-dump-devices`, and
//! `x-qmig-probe-read` / `x-qmig-probe-result` (one timed guest access, for benchmarks). `qmp_capabilities`, `query-version` and `quit` are the
//! server's own. Handlers never wait on guest memory except `pmemsave`, which reads pages and
//! so may wait for a missing page in postcopy; other clients are served meanwhile.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use qmig_host::qmp_server::QmpHandler;
use qmig_host::qmp_types::{
    parse_args, MigrateIncomingArgs, MigrateRecoverArgs, MigrateSetCapabilitiesArgs,
    MigrationCapabilityStatus, PmemsaveArgs, QmpError,
};
use qmig_host::stats::RamFigures;
use qmig_host::transport;
use qmig_host::uri::MigrationUri;
use qmig_protocol::machine::MigrationStatus;
use serde_json::{json, Value};

use crate::control::Ctl;
use crate::state::{socket_address, Shared};

/// Capabilities qmig-dst accepts (recorded; only `postcopy-ram` changes what it accepts).
const KNOWN_CAPS: &[&str] = &[
    "postcopy-ram",
    "return-path",
    "postcopy-preempt",
    "events",
    "pause-before-switchover",
    "validate-uuid",
    "x-ignore-shared",
    "xbzrle",
    "compress",
    "postcopy-blocktime",
    "switchover-ack",
    "release-ram",
    "zero-blocks",
    "late-block-activate",
];

/// qmig-dst's QMP command set.
pub struct Handler {
    sh: Arc<Shared>,
    /// The last `x-qmig-probe-read`: `None` before any, `Some(None)` while it waits,
    /// `Some(Some(t))` once done at `CLOCK_MONOTONIC` nanoseconds `t`.
    probe: Arc<Mutex<Option<Option<u64>>>>,
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

impl Handler {
    /// A handler over the shared state.
    pub fn new(sh: Arc<Shared>) -> Self {
        Handler {
            sh,
            probe: Arc::new(Mutex::new(None)),
        }
    }

    fn listen(&self, uri: &str) -> Result<transport::Listener, QmpError> {
        let uri = MigrationUri::parse(uri).map_err(generic)?;
        if uri == MigrationUri::Defer {
            return Err(generic("'defer' is not a listening address"));
        }
        let l = transport::listen(&uri, &self.sh.transport)
            .map_err(|e| generic(format!("Failed to listen on '{uri}': {e}")))?;
        let local = l.local_uri().map_err(generic)?;
        self.sh.view().socket_address = vec![socket_address(&local)];
        Ok(l)
    }

    fn migrate_incoming(&self, args: &Value) -> Result<Value, QmpError> {
        let a: MigrateIncomingArgs = parse_args(args)?;
        let uri = a
            .uri
            .ok_or_else(|| generic("migrate-incoming needs 'uri'"))?;
        if self.sh.view().incoming {
            return Err(generic("The incoming migration has already been started"));
        }
        let l = self.listen(&uri)?;
        self.sh
            .ctl
            .request(|r| Ctl::Incoming(l, r))
            .map_err(generic)?;
        self.sh.view().incoming = true;
        Ok(json!({}))
    }

    fn set_caps(&self, args: &Value) -> Result<Value, QmpError> {
        let a: MigrateSetCapabilitiesArgs = parse_args(args)?;
        let mut v = self.sh.view();
        if v.status != MigrationStatus::None {
            return Err(generic("There's a migration process in progress"));
        }
        for c in &a.capabilities {
            if !KNOWN_CAPS.contains(&c.capability.as_str()) && c.capability != "multifd" {
                return Err(generic(format!("Capability '{}' not found", c.capability)));
            }
        }
        for c in a.capabilities {
            v.caps.insert(c.capability, c.state);
        }
        Ok(json!({}))
    }

    fn query_migrate(&self) -> Result<Value, QmpError> {
        let now = Instant::now();
        let v = self.sh.view().clone();
        let total = self.sh.ram.total_len();
        let missing: u64 = (0..self.sh.ram.blocks().len())
            .filter_map(|b| self.sh.uffd.missing_pages(b).ok())
            .sum();
        let remaining = if v.status.is_final() {
            0
        } else {
            missing * 4096
        };
        let info = self.sh.recorder.info(
            now,
            v.status.into(),
            RamFigures {
                // QEMU's `ram.page-size` is the target page size whatever the blocks' page
                // sizes (`--ram-page-size` changes the migration unit, not this figure), and the
                // missing pages above are counted in target pages too.
                page_size: 4096,
                total,
                remaining,
            },
        );
        let mut out = serde_json::to_value(info).map_err(generic)?;
        if v.status == MigrationStatus::None && !v.incoming {
            return Ok(json!({}));
        }
        if let Some(e) = &v.error_desc {
            out["error-desc"] = json!(e);
        }
        if !v.socket_address.is_empty() {
            out["socket-address"] = Value::Array(v.socket_address);
        }
        Ok(out)
    }

    fn pmemsave(&self, args: &Value) -> Result<Value, QmpError> {
        let a: PmemsaveArgs = parse_args(args)?;
        let block = self.sh.ram.block(0).map_err(generic)?;
        block
            .check(a.val, a.size)
            .map_err(|_| generic(format!("Invalid addr 0x{:x}/size {}", a.val, a.size)))?;
        let mut f = File::create(&a.filename)
            .map_err(|e| generic(format!("Could not open '{}': {e}", a.filename)))?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < a.size {
            let n = chunk.len().min((a.size - off) as usize);
            block.read(a.val + off, &mut chunk[..n]).map_err(generic)?;
            f.write_all(&chunk[..n]).map_err(generic)?;
            off += n as u64;
        }
        f.sync_all().map_err(generic)?;
        Ok(json!({}))
    }

    /// `x-qmig-ramsave {block, filename}`: one whole RAM block, raw, to a file.
    fn ramsave(&self, args: &Value) -> Result<Value, QmpError> {
        let name = args
            .get("block")
            .and_then(Value::as_str)
            .ok_or_else(|| generic("x-qmig-ramsave needs 'block'"))?;
        let file = args
            .get("filename")
            .and_then(Value::as_str)
            .ok_or_else(|| generic("x-qmig-ramsave needs 'filename'"))?;
        let (_, block) = self.sh.ram.by_name(name.as_bytes()).map_err(generic)?;
        block.dump(std::path::Path::new(file)).map_err(generic)?;
        Ok(json!({}))
    }

    /// `x-qmig-probe-read {offset}`: a guest access in a thread of its own: reads 8 bytes at
    /// guest-physical `offset` (the first RAM block) and records when the read returned. On a
    /// postcopy destination a missing page blocks it until placed, through a pause and a
    /// recovery if need be. Returns at once; `x-qmig-probe-result` reports the completion.
    fn probe_read(&self, args: &Value) -> Result<Value, QmpError> {
        let offset = args
            .get("offset")
            .and_then(Value::as_u64)
            .ok_or_else(|| generic("x-qmig-probe-read needs 'offset'"))?;
        let ram = self.sh.ram.clone();
        let len = ram.blocks().first().map_or(0, |b| b.len());
        if offset.checked_add(8).map_or(true, |end| end > len) {
            return Err(generic("offset outside the first RAM block"));
        }
        let slot = self.probe.clone();
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(None);
        std::thread::Builder::new()
            .name("probe-read".into())
            .spawn(move || {
                let mut b = [0u8; 8];
                let _ = ram.blocks()[0].read(offset, &mut b);
                // The bytes are unused: keep the compiler from dropping the load.
                std::hint::black_box(&b);
                let t = qmig_host::stats::monotonic_ns();
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Some(t));
            })
            .map_err(generic)?;
        Ok(json!({}))
    }

    /// `x-qmig-probe-result`: `{"started", "done", "monotonic-ns"}` of the last probe read.
    fn probe_result(&self) -> Value {
        match *self.probe.lock().unwrap_or_else(|e| e.into_inner()) {
            None => json!({"started": false, "done": false}),
            Some(None) => json!({"started": true, "done": false}),
            Some(Some(t)) => json!({"started": true, "done": true, "monotonic-ns": t}),
        }
    }

    fn query_status(&self) -> Value {
        let v = self.sh.view();
        let (status, running) = if v.guest_running {
            ("running", true)
        } else {
            ("inmigrate", false)
        };
        json!({"status": status, "running": running, "singlestep": false})
    }
}

impl QmpHandler for Handler {
    fn execute(&self, cmd: &str, args: &Value) -> Result<Value, QmpError> {
        match cmd {
            "migrate-incoming" => self.migrate_incoming(args),
            "migrate-recover" => {
                let a: MigrateRecoverArgs = parse_args(args)?;
                let l = self.listen(&a.uri)?;
                self.sh
                    .ctl
                    .request(|r| Ctl::Recover(l, r))
                    .map_err(generic)?;
                Ok(json!({}))
            }
            "migrate-pause" => {
                self.sh.ctl.request(Ctl::Pause).map_err(generic)?;
                Ok(json!({}))
            }
            "migrate_cancel" => {
                self.sh.ctl.request(Ctl::Cancel).map_err(generic)?;
                Ok(json!({}))
            }
            "migrate-set-capabilities" => self.set_caps(args),
            "query-migrate-capabilities" => {
                let v = self.sh.view();
                let list: Vec<MigrationCapabilityStatus> = KNOWN_CAPS
                    .iter()
                    .map(|c| MigrationCapabilityStatus {
                        capability: c.to_string(),
                        state: v.cap(c),
                    })
                    .collect();
                serde_json::to_value(list).map_err(generic)
            }
            "migrate-set-parameters" => {
                let Value::Object(m) = args else {
                    return Err(generic("arguments must be an object"));
                };
                let mut v = self.sh.view();
                for (k, val) in m {
                    v.params.insert(k.clone(), val.clone());
                }
                Ok(json!({}))
            }
            "query-migrate-parameters" => Ok(Value::Object(self.sh.view().params.clone())),
            "query-migrate" => self.query_migrate(),
            "query-status" => Ok(self.query_status()),
            "pmemsave" => self.pmemsave(args),
            "x-qmig-ramsave" => self.ramsave(args),
            "x-qmig-probe-read" => self.probe_read(args),
            "x-qmig-probe-result" => Ok(self.probe_result()),
            "x-qmig-dump-devices" => self.sh.ctl.request(Ctl::DumpDevices).map_err(generic),
            "stop" | "cont" => Ok(json!({})),
            _ => Err(QmpError::command_not_found(cmd)),
        }
    }

    fn on_quit(&self) {
        self.sh.ctl.send(Ctl::Quit);
    }
}
