//! The QMP message shapes that the server ([`crate::qmp_server`]) and the client
//! (`crate::qmp_client`) share.
//!
//! This module owns the JSON shapes of the QEMU Machine Protocol as QEMU puts them on the wire:
//! the greeting, commands (`execute`/`arguments`/`id`), successful returns, errors, and events with
//! their timestamps; plus the typed arguments and return values of the migration commands that
//! qmig speaks (`migrate`, `migrate-incoming`, `migrate-recover`, `query-migrate`, …).
//!
//! The framing types stay generic (`serde_json::Value` arguments and returns) so that any command
//! can be sent or received; [`QmpCommandDef`] ties each command name to its typed arguments and
//! return value for callers that want types. Typed shapes that are *returned* by QEMU (such as
//! [`MigrationInfo`]) accept unknown members, so that output of any QEMU version parses; typed
//! *arguments* reject unknown members, as QEMU does.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// A command as a client sends it: `{"execute": NAME, "arguments": {...}, "id": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpCommand {
    /// The command name.
    pub execute: String,
    /// The arguments object; absent when the command takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
    /// Any JSON value; the server echoes it in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

impl QmpCommand {
    /// A command without arguments.
    pub fn new(execute: impl Into<String>) -> Self {
        Self {
            execute: execute.into(),
            arguments: None,
            id: None,
        }
    }

    /// A command whose arguments are serialised from `args` (which must serialise to an object).
    pub fn with_args<A: Serialize>(
        execute: impl Into<String>,
        args: &A,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            execute: execute.into(),
            arguments: Some(serde_json::to_value(args)?),
            id: None,
        })
    }

    /// The typed command `C` with arguments `args`.
    pub fn typed<C: QmpCommandDef>(args: &C::Args) -> Result<Self, serde_json::Error> {
        let value = serde_json::to_value(args)?;
        let arguments = match &value {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            _ => Some(value),
        };
        Ok(Self {
            execute: C::NAME.to_owned(),
            arguments,
            id: None,
        })
    }

    /// Sets the `id` member.
    pub fn id(mut self, id: impl Into<Value>) -> Self {
        self.id = Some(id.into());
        self
    }
}

/// A successful reply: `{"return": VALUE, "id": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpReturn {
    /// The command's result (`{}` for commands that return nothing).
    #[serde(rename = "return")]
    pub ret: Value,
    /// The command's `id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// An error reply: `{"error": {"class": ..., "desc": ...}, "id": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpErrorReply {
    /// The error.
    pub error: QmpError,
    /// The command's `id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
}

/// QEMU's error classes (`QapiErrorClass`); unknown ones are kept by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Every error without a more specific class.
    GenericError,
    /// The command does not exist, or is not allowed in this state (before negotiation).
    CommandNotFound,
    /// A device has no driver.
    DeviceNotActive,
    /// A device was not found.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
    /// A class this crate does not know.
    #[serde(untagged)]
    Other(String),
}

/// The body of an error reply; also what a [`crate::qmp_server::QmpHandler`] returns on failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class:?}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with this description.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// QEMU's reply to an unknown command: `The command NAME has not been found`.
    pub fn command_not_found(name: &str) -> Self {
        Self {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {name} has not been found"),
        }
    }
}

/// The time an event happened: seconds and microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: d.as_secs() as i64,
            microseconds: i64::from(d.subsec_micros()),
        }
    }
}

/// An asynchronous event: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// The event name (`MIGRATION`, `MIGRATION_PASS`, `STOP`, `RESUME`, …).
    pub event: String,
    /// Event data; absent for events without data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// When the event was emitted.
    pub timestamp: Timestamp,
}

impl QmpEvent {
    /// An event stamped with the current time.
    pub fn now(event: impl Into<String>, data: Option<Value>) -> Self {
        Self {
            event: event.into(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// The `status` of a `MIGRATION` event.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        if self.event != EVENT_MIGRATION {
            return None;
        }
        let data = self.data.as_ref()?;
        serde_json::from_value::<MigrationEventData>(data.clone())
            .ok()
            .map(|d| d.status)
    }
}

/// `MIGRATION` event name.
pub const EVENT_MIGRATION: &str = "MIGRATION";
/// `MIGRATION_PASS` event name.
pub const EVENT_MIGRATION_PASS: &str = "MIGRATION_PASS";
/// `STOP` event name.
pub const EVENT_STOP: &str = "STOP";
/// `RESUME` event name.
pub const EVENT_RESUME: &str = "RESUME";
/// `SHUTDOWN` event name.
pub const EVENT_SHUTDOWN: &str = "SHUTDOWN";

/// Data of a `MIGRATION` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationEventData {
    /// The new status.
    pub status: MigrationStatus,
}

/// Data of a `MIGRATION_PASS` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPassData {
    /// The dirty-sync pass number.
    pub pass: u64,
}

/// The server's first message: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Greeting {
    /// The greeting body.
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

/// Body of the [`Greeting`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GreetingBody {
    /// The server's version.
    pub version: VersionInfo,
    /// Capabilities offered for negotiation (QEMU: `["oob"]` or `[]`).
    pub capabilities: Vec<String>,
}

/// `VersionInfo`, as in the greeting and `query-version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The QEMU version triple this server speaks for.
    pub qemu: VersionTriple,
    /// The package string (`"qmig"` for qmig's binaries).
    pub package: String,
}

/// Major, minor, micro.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// Any message a server sends, for clients reading the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QmpMessage {
    /// The greeting.
    Greeting(Greeting),
    /// A successful reply.
    Return(QmpReturn),
    /// An error reply.
    Error(QmpErrorReply),
    /// An event.
    Event(QmpEvent),
}

impl QmpMessage {
    /// Parses one message (one line of the stream).
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

// ---------------------------------------------------------------------------------------------
// Typed commands
// ---------------------------------------------------------------------------------------------

/// Ties a command name to its typed arguments and return value.
pub trait QmpCommandDef {
    /// The command name on the wire.
    const NAME: &'static str;
    /// Its arguments (`Empty` for none).
    type Args: Serialize + DeserializeOwned;
    /// Its return value (`Empty` for `{}`).
    type Returns: Serialize + DeserializeOwned;
}

/// Decodes a command's `arguments` into `A`; a missing arguments object counts as `{}`.
/// The error is a `GenericError` whose description names the problem, as QEMU's does.
pub fn parse_args<A: DeserializeOwned>(args: &Value) -> Result<A, QmpError> {
    let v = match args {
        Value::Null => Value::Object(Map::new()),
        other => other.clone(),
    };
    serde_json::from_value(v).map_err(|e| QmpError::generic(format!("Invalid parameters: {e}")))
}

/// Encodes a typed return value into the `return` member.
pub fn to_return<R: Serialize>(ret: &R) -> Result<Value, QmpError> {
    serde_json::to_value(ret).map_err(|e| QmpError::generic(format!("cannot encode reply: {e}")))
}

/// Runs the typed command `C` for a handler: decodes `args` into `C::Args`, calls `f`, and
/// encodes its return value.
///
/// ```
/// use qmig_host::qmp_types::{run_typed, MigrateRecover, Empty};
/// let ret = run_typed::<MigrateRecover>(&serde_json::json!({"uri": "unix:/tmp/r"}), |a| {
///     assert_eq!(a.uri, "unix:/tmp/r");
///     Ok(Empty {})
/// });
/// assert_eq!(ret.unwrap(), serde_json::json!({}));
/// ```
pub fn run_typed<C: QmpCommandDef>(
    args: &Value,
    f: impl FnOnce(C::Args) -> Result<C::Returns, QmpError>,
) -> Result<Value, QmpError> {
    let a: C::Args = parse_args(args)?;
    to_return(&f(a)?)
}

/// The empty object `{}`: arguments of commands without arguments, return of commands that
/// return nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

macro_rules! command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $args:ty, $ret:ty) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $ty;
        impl QmpCommandDef for $ty {
            const NAME: &'static str = $name;
            type Args = $args;
            type Returns = $ret;
        }
    };
}

command!(
    /// `qmp_capabilities`: leave capabilities-negotiation mode.
    QmpCapabilities, "qmp_capabilities", QmpCapabilitiesArgs, Empty);
command!(
    /// `migrate`: start (or with `resume`, recover) an outgoing migration.
    Migrate, "migrate", MigrateArgs, Empty);
command!(
    /// `migrate-incoming`: start listening for an incoming migration.
    MigrateIncoming, "migrate-incoming", MigrateIncomingArgs, Empty);
command!(
    /// `migrate-recover`: listen for the recovery channel of a paused postcopy (destination).
    MigrateRecover, "migrate-recover", MigrateRecoverArgs, Empty);
command!(
    /// `migrate-pause`: shut the migration channel down, as a network failure would.
    MigratePause, "migrate-pause", Empty, Empty);
command!(
    /// `migrate_cancel`: cancel the outgoing migration.
    MigrateCancel, "migrate_cancel", Empty, Empty);
command!(
    /// `migrate-continue`: leave `pre-switchover` (with the `pause-before-switchover` capability).
    MigrateContinue, "migrate-continue", MigrateContinueArgs, Empty);
command!(
    /// `migrate-start-postcopy`: switch to postcopy at the next iteration.
    MigrateStartPostcopy, "migrate-start-postcopy", Empty, Empty);
command!(
    /// `migrate-set-capabilities`.
    MigrateSetCapabilities, "migrate-set-capabilities", MigrateSetCapabilitiesArgs, Empty);
command!(
    /// `migrate-set-parameters`.
    MigrateSetParameters, "migrate-set-parameters", MigrationParameters, Empty);
command!(
    /// `query-migrate`.
    QueryMigrate, "query-migrate", Empty, MigrationInfo);
command!(
    /// `query-migrate-capabilities`.
    QueryMigrateCapabilities, "query-migrate-capabilities", Empty, Vec<MigrationCapabilityStatus>);
command!(
    /// `query-migrate-parameters`.
    QueryMigrateParameters, "query-migrate-parameters", Empty, MigrationParameters);
command!(
    /// `query-status`.
    QueryStatus, "query-status", Empty, StatusInfo);
command!(
    /// `query-version`.
    QueryVersion, "query-version", Empty, VersionInfo);
command!(
    /// `pmemsave`: write guest-physical memory to a file.
    Pmemsave, "pmemsave", PmemsaveArgs, Empty);
command!(
    /// `stop`: pause the guest.
    Stop, "stop", Empty, Empty);
command!(
    /// `cont`: resume the guest.
    Cont, "cont", Empty, Empty);
command!(
    /// `quit`: exit the process after replying.
    Quit, "quit", Empty, Empty);

/// Arguments of `qmp_capabilities`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities to enable (qmig offers none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Vec<String>>,
}

/// Arguments of `migrate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateArgs {
    /// Destination URI (`tcp:HOST:PORT`, `unix:PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Resume a paused postcopy migration on a new channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
    /// Deprecated and ignored by QEMU; accepted for compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
}

/// Arguments of `migrate-incoming`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MigrateIncomingArgs {
    /// URI to listen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Exit on failure (QEMU 9.1+); accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

/// Arguments of `migrate-recover`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRecoverArgs {
    /// URI to listen on for the recovery channel.
    pub uri: String,
}

/// Arguments of `migrate-continue`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateContinueArgs {
    /// The state being left (`pre-switchover`).
    pub state: MigrationStatus,
}

/// One `{capability, state}` pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationCapabilityStatus {
    /// Capability name (`postcopy-ram`, `return-path`, `multifd`, …).
    pub capability: String,
    /// Whether it is on.
    pub state: bool,
}

/// Arguments of `migrate-set-capabilities`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateSetCapabilitiesArgs {
    /// The capabilities to set.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

/// Capability names qmig knows.
pub mod capability {
    /// `postcopy-ram`.
    pub const POSTCOPY_RAM: &str = "postcopy-ram";
    /// `return-path`.
    pub const RETURN_PATH: &str = "return-path";
    /// `multifd`.
    pub const MULTIFD: &str = "multifd";
    /// `postcopy-preempt`.
    pub const POSTCOPY_PREEMPT: &str = "postcopy-preempt";
    /// `xbzrle`.
    pub const XBZRLE: &str = "xbzrle";
    /// `events`.
    pub const EVENTS: &str = "events";
    /// `postcopy-blocktime`.
    pub const POSTCOPY_BLOCKTIME: &str = "postcopy-blocktime";
    /// `x-ignore-shared`.
    pub const X_IGNORE_SHARED: &str = "x-ignore-shared";
    /// `validate-uuid`.
    pub const VALIDATE_UUID: &str = "validate-uuid";
    /// `switchover-ack`.
    pub const SWITCHOVER_ACK: &str = "switchover-ack";
    /// `pause-before-switchover`.
    pub const PAUSE_BEFORE_SWITCHOVER: &str = "pause-before-switchover";
    /// `release-ram`.
    pub const RELEASE_RAM: &str = "release-ram";
}

/// Migration parameters: the arguments of `migrate-set-parameters` and the return of
/// `query-migrate-parameters`. Every member is optional; members this struct does not name are
/// kept in [`MigrationParameters::other`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Maximum precopy bandwidth, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Maximum postcopy bandwidth, bytes per second (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Bandwidth assumed for switchover decisions, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Maximum downtime, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Number of multifd channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u64>,
    /// Multifd compression method (`none`, `zlib`, `zstd`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<String>,
    /// XBZRLE cache size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// Zero-page detection (`none`, `legacy`, `multifd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<String>,
    /// Any other parameter, by name.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// A `MigrationStatus` as QMP carries it: one of the state machines' statuses
/// ([`qmig_protocol::machine::MigrationStatus`], where the QAPI names live), or a name this crate
/// does not know, kept as it came (a newer QEMU's status parses and prints back unchanged).
/// On the wire it is the bare QAPI string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MigrationStatus {
    /// A status the protocol crate names.
    Known(ProtocolStatus),
    /// A status this crate does not know, by name.
    Other(String),
}

/// The state machines' status type, which owns the QAPI names.
pub use qmig_protocol::machine::MigrationStatus as ProtocolStatus;

/// The known statuses under their QAPI-derived names, so that `MigrationStatus::PostcopyPaused`
/// reads as before (and works in patterns); the names themselves are the protocol crate's.
#[allow(non_upper_case_globals)]
impl MigrationStatus {
    /// `none`.
    pub const None: Self = Self::Known(ProtocolStatus::None);
    /// `setup`.
    pub const Setup: Self = Self::Known(ProtocolStatus::Setup);
    /// `cancelling`.
    pub const Cancelling: Self = Self::Known(ProtocolStatus::Cancelling);
    /// `cancelled`.
    pub const Cancelled: Self = Self::Known(ProtocolStatus::Cancelled);
    /// `active`.
    pub const Active: Self = Self::Known(ProtocolStatus::Active);
    /// `postcopy-device` (10.2).
    pub const PostcopyDevice: Self = Self::Known(ProtocolStatus::PostcopyDevice);
    /// `postcopy-active`.
    pub const PostcopyActive: Self = Self::Known(ProtocolStatus::PostcopyActive);
    /// `postcopy-paused`.
    pub const PostcopyPaused: Self = Self::Known(ProtocolStatus::PostcopyPaused);
    /// `postcopy-recover-setup` (10.x).
    pub const PostcopyRecoverSetup: Self = Self::Known(ProtocolStatus::PostcopyRecoverSetup);
    /// `postcopy-recover`.
    pub const PostcopyRecover: Self = Self::Known(ProtocolStatus::PostcopyRecover);
    /// `completed`.
    pub const Completed: Self = Self::Known(ProtocolStatus::Completed);
    /// `failed`.
    pub const Failed: Self = Self::Known(ProtocolStatus::Failed);
    /// `colo`.
    pub const Colo: Self = Self::Known(ProtocolStatus::Colo);
    /// `pre-switchover`.
    pub const PreSwitchover: Self = Self::Known(ProtocolStatus::PreSwitchover);
    /// `device`.
    pub const Device: Self = Self::Known(ProtocolStatus::Device);
    /// `wait-unplug`.
    pub const WaitUnplug: Self = Self::Known(ProtocolStatus::WaitUnplug);
}

impl MigrationStatus {
    /// The QAPI name (`"postcopy-paused"`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Known(s) => s.as_str(),
            Self::Other(s) => s,
        }
    }

    /// The status by QAPI name; unknown names give [`MigrationStatus::Other`].
    pub fn from_qapi(name: &str) -> Self {
        ProtocolStatus::from_qapi(name).map_or_else(|| Self::Other(name.to_owned()), Self::Known)
    }

    /// The state machines' status of the same name (`None` for [`MigrationStatus::Other`]).
    pub fn to_machine(&self) -> Option<ProtocolStatus> {
        match self {
            Self::Known(s) => Some(*s),
            Self::Other(_) => None,
        }
    }
}

impl From<ProtocolStatus> for MigrationStatus {
    fn from(s: ProtocolStatus) -> Self {
        Self::Known(s)
    }
}

impl Serialize for MigrationStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MigrationStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(Self::from_qapi(&name))
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RAM statistics of `query-migrate` (QEMU's `MigrationStats`). Members missing in a given
/// QEMU version read as 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes remaining.
    pub remaining: u64,
    /// Total guest RAM bytes.
    pub total: u64,
    /// Zero pages sent as such.
    pub duplicate: u64,
    /// Normal pages sent.
    pub normal: u64,
    /// Bytes of normal pages.
    pub normal_bytes: u64,
    /// Dirty pages per second.
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Dirty-bitmap sync passes.
    pub dirty_sync_count: u64,
    /// Page requests received in postcopy.
    pub postcopy_requests: u64,
    /// Target page size.
    pub page_size: u64,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: u64,
    /// Pages per second.
    pub pages_per_second: u64,
    /// Bytes sent during precopy.
    pub precopy_bytes: u64,
    /// Bytes sent during downtime.
    pub downtime_bytes: u64,
    /// Bytes sent during postcopy.
    pub postcopy_bytes: u64,
    /// Zero-copy sends that missed (10.x).
    pub dirty_sync_missed_zero_copy: u64,
}

/// Latency figures of a histogram, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// qmig's extensions to `query-migrate`, under `x-qmig`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QmigInfo {
    /// Postcopy page-fault latency (fault to page placed), microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_us: Option<LatencySummary>,
    /// Page faults seen by the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<u64>,
    /// Times the channel was recovered after `postcopy-paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recoveries: Option<u64>,
    /// Anything else.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// The return of `query-migrate` (QEMU's `MigrationInfo`). Members are omitted when unknown, as
/// QEMU does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Current status (absent before any migration on some versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    /// RAM statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Expected downtime, milliseconds (while active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Actual downtime, milliseconds (when completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Setup time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Error description when failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Total vCPU block time in postcopy, milliseconds (destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u64>,
    /// Per-vCPU block time, milliseconds (destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_blocktime: Option<Vec<u64>>,
    /// qmig's extensions.
    #[serde(default, rename = "x-qmig", skip_serializing_if = "Option::is_none")]
    pub x_qmig: Option<QmigInfo>,
}

/// The return of `query-status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// QEMU's `RunState` name (`running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, …).
    pub status: String,
    /// Whether the guest runs.
    pub running: bool,
}

/// Arguments of `pmemsave`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemsaveArgs {
    /// Guest-physical start address.
    pub val: u64,
    /// Bytes to save.
    pub size: u64,
    /// Output file.
    pub filename: String,
}
