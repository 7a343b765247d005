//! What the QMP thread and the migration thread share.
//!
//! This module owns [`Shared`]: the migration thread writes the [`View`] (status, error,
//! listening address, guest run state) and the recorder's counters; the QMP handler reads them
//! and writes the capabilities and parameters, which the migration thread reads when the main
//! channel arrives. Locks are held only to copy values in or out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use qmig_host::memory::GuestRam;
use qmig_host::stats::MigrationRecorder;
use qmig_host::transport::TransportConfig;
use qmig_host::uffd::UffdRam;
use qmig_host::uri::MigrationUri;
use qmig_protocol::machine::MigrationStatus;
use serde_json::{json, Map, Value};

use crate::control::CtlSender;

/// The migration's state as QMP reports it.
#[derive(Debug, Clone)]
pub struct View {
    /// Current status.
    pub status: MigrationStatus,
    /// `error-desc` (`offset N: RULE-ID: message`) of the last failure or pause.
    pub error_desc: Option<String>,
    /// Addresses being listened on (`query-migrate` `socket-address`).
    pub socket_address: Vec<Value>,
    /// Capabilities as set.
    pub caps: BTreeMap<String, bool>,
    /// Parameters as set.
    pub params: Map<String, Value>,
    /// Whether the "guest" runs (postcopy or completed).
    pub guest_running: bool,
    /// Whether `migrate-incoming` (or `--incoming`) was given.
    pub incoming: bool,
}

impl View {
    /// Whether capability `name` is on.
    pub fn cap(&self, name: &str) -> bool {
        self.caps.get(name).copied().unwrap_or(false)
    }
}

/// State shared by every thread of the process.
pub struct Shared {
    /// See [`View`].
    pub view: Mutex<View>,
    /// Counters and the fault latency histogram.
    pub recorder: MigrationRecorder,
    /// Guest RAM (block 0 is guest-physical 0).
    pub ram: Arc<GuestRam>,
    /// Userfaultfd placement over `ram`.
    pub uffd: Arc<UffdRam>,
    /// Requests into the migration thread.
    pub ctl: CtlSender,
    /// Socket options of migration channels.
    pub transport: TransportConfig,
}

impl Shared {
    /// Locks the view (a poisoned lock is still used: the view is plain data).
    pub fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `socket-address` entry of a listening URI, as QEMU's `query-migrate` shows it.
pub fn socket_address(uri: &MigrationUri) -> Value {
    match uri {
        MigrationUri::Tcp { host, port } => {
            json!({"type": "inet", "host": host, "port": port.to_string()})
        }
        MigrationUri::Unix { path } => json!({"type": "unix", "path": path.display().to_string()}),
        MigrationUri::Defer => json!({"type": "defer"}),
    }
}
