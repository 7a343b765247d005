//! What the QMP handler and the migration thread share.
//!
//! This module owns [`Shared`]: the migration status as the QMP side reports it, the
//! capabilities and parameters set over QMP, the last error (`error-desc`, `offset N: RULE-ID:
//! message`), the counters ([`MigrationRecorder`]) and the figures only the migration thread
//! knows (remaining bytes, dirty rate, the dirty-tracking mechanism), the event sink, and the
//! channel to the running migration thread ([`Msg`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qmig_host::qmp_server::EventSink;
use qmig_host::qmp_types::MigrationStatus;
use qmig_host::stats::MigrationRecorder;
use qmig_host::transport::Cutter;
use qmig_host::uri::MigrationUri;
use qmig_protocol::profile::Profile;

use crate::guest::Guest;

/// Default `max-bandwidth`: QEMU's 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// Default `x-return-path-timeout`: how long the source waits for an awaited return-path answer
/// (received bitmaps, RESUME_ACK, SHUT) before it treats the channel as lost (SM-TIMEOUT).
pub const DEFAULT_RP_TIMEOUT_MS: u64 = 60_000;
/// Default `downtime-limit`: QEMU's 300 ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

/// A request to the migration thread, or return-path bytes from its reader thread.
#[derive(Debug)]
pub enum Msg {
    /// Bytes read from the return path of connection `conn`.
    Rp {
        /// Connection generation.
        conn: u64,
        /// The bytes.
        data: Vec<u8>,
        /// When the reader thread's `read` returned them (the urgent-path timing in the
        /// driver's debug log starts here).
        at: std::time::Instant,
    },
    /// The return path of connection `conn` ended (EOF or error).
    RpEnd {
        /// Connection generation.
        conn: u64,
        /// What ended it.
        why: String,
    },
    /// `migrate-start-postcopy`.
    StartPostcopy,
    /// `migrate-pause` (the socket was already shut down by the QMP thread).
    Pause,
    /// `migrate_cancel` (the socket was already shut down by the QMP thread).
    Cancel,
    /// `migrate resume=true` to a new address.
    Resume(MigrationUri),
}

/// Mutable shared fields, behind one short lock (never held across blocking calls).
#[derive(Debug, Default)]
pub struct Inner {
    /// QEMU status name as reported by `query-migrate`.
    pub status: Option<MigrationStatus>,
    /// Capabilities by name.
    pub caps: BTreeMap<String, bool>,
    /// The last error, `offset N: RULE-ID: message`.
    pub error: Option<String>,
    /// The running migration thread's inbox.
    pub tx: Option<Sender<Msg>>,
    /// Cuts the current main channel (migrate-pause, migrate_cancel).
    pub cutter: Option<Cutter>,
    /// The dirty-tracking mechanism of the current migration.
    pub mechanism: Option<&'static str>,
}

/// QEMU's default `multifd-channels`.
pub const DEFAULT_MULTIFD_CHANNELS: u64 = 2;

/// See the module doc.
pub struct Shared {
    /// Mutable fields.
    inner: Mutex<Inner>,
    /// The destination's profile.
    pub profile: Profile,
    /// The guest.
    pub guest: Arc<Guest>,
    /// QMP events.
    pub events: EventSink,
    /// Counters and rates.
    pub recorder: MigrationRecorder,
    /// `max-bandwidth`, bytes/s.
    pub max_bandwidth: AtomicU64,
    /// `max-postcopy-bandwidth`, bytes/s (0: unlimited).
    pub max_postcopy_bandwidth: AtomicU64,
    /// `downtime-limit`, ms.
    pub downtime_limit: AtomicU64,
    /// `x-return-path-timeout`, ms (SM-TIMEOUT), read when a migration starts.
    pub rp_timeout: AtomicU64,
    /// Bytes still to send.
    pub remaining: AtomicU64,
    /// Pages dirtied per second over the last iteration.
    pub dirty_pages_rate: AtomicU64,
    /// Iterations (dirty-bitmap syncs).
    pub iterations: AtomicU64,
    /// Downtime of the completed precopy, ms.
    pub downtime_ms: AtomicU64,
    /// Main-channel bytes sent while precopy ran with the guest running.
    pub precopy_bytes: AtomicU64,
    /// Main-channel bytes sent with the guest stopped before postcopy or completion.
    pub downtime_bytes: AtomicU64,
    /// Main-channel bytes sent in postcopy.
    pub postcopy_bytes: AtomicU64,
    /// `multifd-channels` (with capability `multifd`), read when a migration starts.
    pub multifd_channels: AtomicU64,
    /// `xbzrle-cache-size`, `compress-level`, `compress-threads`.
    pub page_params: crate::page_caps::PageParams,
}

impl Shared {
    /// Fresh shared state.
    pub fn new(profile: Profile, guest: Arc<Guest>, events: EventSink, caps: &[String]) -> Self {
        let inner = Inner {
            caps: caps.iter().map(|c| (c.clone(), true)).collect(),
            ..Inner::default()
        };
        Shared {
            inner: Mutex::new(inner),
            profile,
            guest,
            events,
            recorder: MigrationRecorder::new(Duration::from_secs(1)),
            max_bandwidth: AtomicU64::new(DEFAULT_MAX_BANDWIDTH),
            max_postcopy_bandwidth: AtomicU64::new(0),
            downtime_limit: AtomicU64::new(DEFAULT_DOWNTIME_LIMIT_MS),
            rp_timeout: AtomicU64::new(DEFAULT_RP_TIMEOUT_MS),
            remaining: AtomicU64::new(0),
            dirty_pages_rate: AtomicU64::new(0),
            iterations: AtomicU64::new(0),
            downtime_ms: AtomicU64::new(0),
            precopy_bytes: AtomicU64::new(0),
            downtime_bytes: AtomicU64::new(0),
            postcopy_bytes: AtomicU64::new(0),
            multifd_channels: AtomicU64::new(DEFAULT_MULTIFD_CHANNELS),
            page_params: crate::page_caps::PageParams::default(),
        }
    }

    /// The mutable fields.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether capability `name` is on.
    pub fn cap(&self, name: &str) -> bool {
        self.lock().caps.get(name).copied().unwrap_or(false)
    }

    /// Records a status change and emits `MIGRATION` (with the `events` capability).
    pub fn set_status(&self, status: MigrationStatus) {
        let events = {
            let mut g = self.lock();
            g.status = Some(status.clone());
            g.caps.get("events").copied().unwrap_or(false)
        };
        tracing::info!("migration status: {status}");
        if events {
            self.events.migration(status);
        }
    }

    /// The current status (`none` before any migration).
    pub fn status(&self) -> MigrationStatus {
        self.lock().status.clone().unwrap_or(MigrationStatus::None)
    }

    /// Records an error for `error-desc` (the first one of a migration is kept).
    pub fn set_error(&self, e: String) {
        tracing::warn!("migration error: {e}");
        let mut g = self.lock();
        if g.error.is_none() {
            g.error = Some(e);
        }
    }

    /// A relaxed load.
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }
}
