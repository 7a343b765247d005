//! Migration statuses and the transition tables of both sides.
//!
//! This module owns [`MigrationStatus`] (QEMU's QAPI `MigrationStatus` names, so that events and
//! `query-migrate`-like output read the same as QEMU's) and the two transition tables,
//! [`SOURCE_TRANSITIONS`] and [`DESTINATION_TRANSITIONS`]. The tables are data: the machines
//! consult them for every status change through [`next_status`], and the specification prints
//! them. A change that is not in the table is a bug in the machine; it is reported as an
//! [`IllegalTransition`] error, never a panic.

use crate::profile::Version;
use core::fmt;

/// A migration status, named as QEMU's QAPI `MigrationStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigrationStatus {
    /// Nothing started yet.
    None,
    /// Setting up (source: header and setup sections; 10.x destination: before the header).
    Setup,
    /// Cancel requested; the source is winding down.
    Cancelling,
    /// Cancelled (final).
    Cancelled,
    /// Precopy running.
    Active,
    /// 10.2+: the destination is still loading the postcopy package (not used by qmig's machines).
    PostcopyDevice,
    /// Postcopy running: the destination runs the guest and faults pages in.
    PostcopyActive,
    /// Postcopy interrupted by a channel failure; waiting for recovery.
    PostcopyPaused,
    /// 10.x source only: resume requested, the new channel is not connected yet.
    PostcopyRecoverSetup,
    /// A recovery channel is up; the bitmap/resume handshake is running.
    PostcopyRecover,
    /// Finished successfully (final).
    Completed,
    /// Failed (final).
    Failed,
    /// COLO (not used by qmig's machines).
    Colo,
    /// Source paused before switchover (not used by qmig's machines).
    PreSwitchover,
    /// Source is sending the final device state (10.x: always at switchover).
    Device,
    /// Source waits for a failover unplug (not used by qmig's machines).
    WaitUnplug,
}

impl MigrationStatus {
    /// Every status, in QAPI order.
    pub const ALL: &'static [MigrationStatus] = &[
        MigrationStatus::None,
        MigrationStatus::Setup,
        MigrationStatus::Cancelling,
        MigrationStatus::Cancelled,
        MigrationStatus::Active,
        MigrationStatus::PostcopyDevice,
        MigrationStatus::PostcopyActive,
        MigrationStatus::PostcopyPaused,
        MigrationStatus::PostcopyRecoverSetup,
        MigrationStatus::PostcopyRecover,
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Colo,
        MigrationStatus::PreSwitchover,
        MigrationStatus::Device,
        MigrationStatus::WaitUnplug,
    ];

    /// The QAPI string, e.g. `"postcopy-paused"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyDevice => "postcopy-device",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
        }
    }

    /// Looks a status up by its QAPI string.
    pub fn from_qapi(s: &str) -> Option<MigrationStatus> {
        MigrationStatus::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == s)
    }

    /// Whether nothing follows this status (`completed`, `failed`, `cancelled`).
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }

    /// Whether this is one of the postcopy statuses in which a failure pauses instead of failing.
    pub const fn is_postcopy_recoverable(self) -> bool {
        matches!(
            self,
            MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyRecoverSetup
                | MigrationStatus::PostcopyRecover
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What makes a status change: the row label of a transition table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// Source: migration started. Destination (10.x): incoming migration started.
    Start,
    /// Source: setup sections sent. Destination: stream header and configuration accepted.
    SetupDone,
    /// Source: the guest is stopped for the switchover (10.x `device`).
    Switchover,
    /// Source: postcopy starts (package sent). Destination: POSTCOPY_LISTEN processed.
    Postcopy,
    /// The migration finished (destination: EOF; source: EOF sent and SHUT(0) received).
    Complete,
    /// An error or channel loss where no recovery is possible.
    Fatal,
    /// An error, channel loss or `Pause` after the point of no return (postcopy): pause.
    Interrupt,
    /// Source (10.x): `Resume` requested while paused.
    ResumeRequested,
    /// A new channel is up while paused or in recover-setup.
    ChannelOpened,
    /// Destination: POSTCOPY_RESUME handled. Source: RESUME_ACK(1) received.
    Resumed,
    /// `Cancel` requested.
    Cancel,
    /// Source: cancellation finished.
    CancelDone,
}

impl Trigger {
    /// A stable lower-case name for tables and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::SetupDone => "setup-done",
            Trigger::Switchover => "switchover",
            Trigger::Postcopy => "postcopy",
            Trigger::Complete => "complete",
            Trigger::Fatal => "fatal",
            Trigger::Interrupt => "interrupt",
            Trigger::ResumeRequested => "resume-requested",
            Trigger::ChannelOpened => "channel-opened",
            Trigger::Resumed => "resumed",
            Trigger::Cancel => "cancel",
            Trigger::CancelDone => "cancel-done",
        }
    }
}

/// Which QEMU versions a transition row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Applies {
    /// Every profile.
    All,
    /// Only the 7.2 profile.
    V7_2,
    /// Only the 10.x profile.
    V10,
}

impl Applies {
    /// Whether the row applies to `version`.
    pub const fn to(self, version: Version) -> bool {
        match self {
            Applies::All => true,
            Applies::V7_2 => matches!(version, Version::V7_2),
            Applies::V10 => matches!(version, Version::V10),
        }
    }
}

/// One row of a transition table: in `from`, `trigger` leads to `to` (for the profiles in `when`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Status before.
    pub from: MigrationStatus,
    /// What happened.
    pub trigger: Trigger,
    /// Status after.
    pub to: MigrationStatus,
    /// The profiles the row applies to.
    pub when: Applies,
}

const fn t(
    from: MigrationStatus,
    trigger: Trigger,
    to: MigrationStatus,
    when: Applies,
) -> Transition {
    Transition {
        from,
        trigger,
        to,
        when,
    }
}

use MigrationStatus as S;
use Trigger as T;

/// The source's transitions (QEMU's `migrate_set_state()` calls that qmig performs).
pub const SOURCE_TRANSITIONS: &[Transition] = &[
    t(S::None, T::Start, S::Setup, Applies::All),
    t(S::Setup, T::SetupDone, S::Active, Applies::All),
    t(S::Setup, T::Fatal, S::Failed, Applies::All),
    // Precopy end: 7.2 goes straight to completed, 10.x through `device`.
    t(S::Active, T::Complete, S::Completed, Applies::V7_2),
    t(S::Active, T::Switchover, S::Device, Applies::V10),
    t(S::Device, T::Complete, S::Completed, Applies::V10),
    t(S::Active, T::Fatal, S::Failed, Applies::All),
    t(S::Device, T::Fatal, S::Failed, Applies::V10),
    // Postcopy start.
    t(S::Active, T::Postcopy, S::PostcopyActive, Applies::V7_2),
    t(S::Device, T::Postcopy, S::PostcopyActive, Applies::V10),
    // Postcopy failure and recovery.
    t(
        S::PostcopyActive,
        T::Interrupt,
        S::PostcopyPaused,
        Applies::All,
    ),
    t(
        S::PostcopyPaused,
        T::ResumeRequested,
        S::PostcopyRecoverSetup,
        Applies::V10,
    ),
    t(
        S::PostcopyRecoverSetup,
        T::ChannelOpened,
        S::PostcopyRecover,
        Applies::V10,
    ),
    t(
        S::PostcopyRecoverSetup,
        T::Interrupt,
        S::PostcopyPaused,
        Applies::V10,
    ),
    t(
        S::PostcopyPaused,
        T::ChannelOpened,
        S::PostcopyRecover,
        Applies::V7_2,
    ),
    t(
        S::PostcopyRecover,
        T::Interrupt,
        S::PostcopyPaused,
        Applies::All,
    ),
    t(
        S::PostcopyRecover,
        T::Resumed,
        S::PostcopyActive,
        Applies::All,
    ),
    t(S::PostcopyActive, T::Complete, S::Completed, Applies::All),
    t(S::PostcopyActive, T::Fatal, S::Failed, Applies::All),
    // Cancel from every non-final status (SM-CANCEL).
    t(S::None, T::Cancel, S::Cancelling, Applies::All),
    t(S::Setup, T::Cancel, S::Cancelling, Applies::All),
    t(S::Active, T::Cancel, S::Cancelling, Applies::All),
    t(S::Device, T::Cancel, S::Cancelling, Applies::V10),
    t(S::PostcopyActive, T::Cancel, S::Cancelling, Applies::All),
    t(S::PostcopyPaused, T::Cancel, S::Cancelling, Applies::All),
    t(
        S::PostcopyRecoverSetup,
        T::Cancel,
        S::Cancelling,
        Applies::V10,
    ),
    t(S::PostcopyRecover, T::Cancel, S::Cancelling, Applies::All),
    t(S::Cancelling, T::CancelDone, S::Cancelled, Applies::All),
];

/// The destination's transitions.
pub const DESTINATION_TRANSITIONS: &[Transition] = &[
    // 7.2 has no destination `setup`; 10.x does.
    t(S::None, T::SetupDone, S::Active, Applies::V7_2),
    t(S::None, T::Start, S::Setup, Applies::V10),
    t(S::Setup, T::SetupDone, S::Active, Applies::V10),
    t(S::None, T::Fatal, S::Failed, Applies::All),
    t(S::Setup, T::Fatal, S::Failed, Applies::V10),
    t(S::Active, T::Complete, S::Completed, Applies::All),
    t(S::Active, T::Fatal, S::Failed, Applies::All),
    t(S::Active, T::Postcopy, S::PostcopyActive, Applies::All),
    // Before POSTCOPY_RUN an error is fatal (SM-FATAL-BEFORE-RUN), after it pauses (SM-PAUSE-AFTER-RUN).
    t(S::PostcopyActive, T::Fatal, S::Failed, Applies::All),
    t(
        S::PostcopyActive,
        T::Interrupt,
        S::PostcopyPaused,
        Applies::All,
    ),
    t(
        S::PostcopyPaused,
        T::ChannelOpened,
        S::PostcopyRecover,
        Applies::All,
    ),
    // SM-PAUSE-IN-RECOVER: QEMU 7.2 cannot; qmig does on every profile.
    t(
        S::PostcopyRecover,
        T::Interrupt,
        S::PostcopyPaused,
        Applies::All,
    ),
    t(
        S::PostcopyRecover,
        T::Resumed,
        S::PostcopyActive,
        Applies::All,
    ),
    t(S::PostcopyActive, T::Complete, S::Completed, Applies::All),
    // Cancel from every non-final status (SM-CANCEL); the destination has no `cancelling`.
    t(S::None, T::Cancel, S::Cancelled, Applies::All),
    t(S::Setup, T::Cancel, S::Cancelled, Applies::V10),
    t(S::Active, T::Cancel, S::Cancelled, Applies::All),
    t(S::PostcopyActive, T::Cancel, S::Cancelled, Applies::All),
    t(S::PostcopyPaused, T::Cancel, S::Cancelled, Applies::All),
    t(S::PostcopyRecover, T::Cancel, S::Cancelled, Applies::All),
];

/// A status change that the table does not allow: a bug in the machine, reported, never panicking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IllegalTransition {
    /// Status the machine was in.
    pub from: MigrationStatus,
    /// What it tried to act on.
    pub trigger: Trigger,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "illegal transition: {} on {}",
            self.from,
            self.trigger.as_str()
        )
    }
}

impl core::error::Error for IllegalTransition {}

/// Looks up where `trigger` leads from `from` in `table` for `version`.
pub fn next_status(
    table: &[Transition],
    version: Version,
    from: MigrationStatus,
    trigger: Trigger,
) -> Result<MigrationStatus, IllegalTransition> {
    table
        .iter()
        .find(|r| r.from == from && r.trigger == trigger && r.when.to(version))
        .map(|r| r.to)
        .ok_or(IllegalTransition { from, trigger })
}

/// Writes `table` as a Markdown table (`| from | trigger | to | profiles |`), for the spec.
pub fn write_table(table: &[Transition], out: &mut impl fmt::Write) -> fmt::Result {
    out.write_str("| from | trigger | to | profiles |\n|---|---|---|---|\n")?;
    for r in table {
        let when = match r.when {
            Applies::All => "7.2, 10.x",
            Applies::V7_2 => "7.2",
            Applies::V10 => "10.x",
        };
        writeln!(
            out,
            "| `{}` | {} | `{}` | {} |",
            r.from,
            r.trigger.as_str(),
            r.to,
            when
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qapi_names_round_trip() {
        for s in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::from_qapi(s.as_str()), Some(*s));
        }
        assert_eq!(
            MigrationStatus::PostcopyRecoverSetup.as_str(),
            "postcopy-recover-setup"
        );
    }

    #[test]
    fn tables_are_deterministic_and_leave_finals_alone() {
        for table in [SOURCE_TRANSITIONS, DESTINATION_TRANSITIONS] {
            for v in [Version::V7_2, Version::V10] {
                let rows: alloc::vec::Vec<_> = table.iter().filter(|r| r.when.to(v)).collect();
                for (i, a) in rows.iter().enumerate() {
                    assert!(!a.from.is_final(), "{a:?}");
                    for b in &rows[i + 1..] {
                        assert!(!(a.from == b.from && a.trigger == b.trigger), "{a:?} {b:?}");
                    }
                }
            }
        }
        // The destination never has recover-setup (QEMU's own tests assert this).
        assert!(DESTINATION_TRANSITIONS
            .iter()
            .all(|r| r.to != MigrationStatus::PostcopyRecoverSetup));
    }

    #[test]
    fn tables_render_as_markdown() {
        let mut s = alloc::string::String::new();
        write_table(DESTINATION_TRANSITIONS, &mut s).unwrap();
        assert!(s.contains("| `postcopy-recover` | interrupt | `postcopy-paused` | 7.2, 10.x |"));
        assert_eq!(s.lines().count(), DESTINATION_TRANSITIONS.len() + 2);
    }

    #[test]
    fn pause_and_recover_cycle() {
        let v = Version::V10;
        let tb = SOURCE_TRANSITIONS;
        let p = next_status(tb, v, S::PostcopyActive, T::Interrupt).unwrap();
        let rs = next_status(tb, v, p, T::ResumeRequested).unwrap();
        let r = next_status(tb, v, rs, T::ChannelOpened).unwrap();
        assert_eq!(next_status(tb, v, r, T::Resumed), Ok(S::PostcopyActive));
        assert!(next_status(tb, Version::V7_2, p, T::ResumeRequested).is_err());
        assert_eq!(
            next_status(tb, v, S::Completed, T::Cancel),
            Err(IllegalTransition {
                from: S::Completed,
                trigger: T::Cancel
            })
        );
    }
}
