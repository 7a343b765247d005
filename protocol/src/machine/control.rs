//! Commands from the operator (QMP-like) to the machines.
//!
//! This module owns [`Control`]: what a management layer asks a side to do (`migrate-recover`,
//! `migrate-pause`, `migrate_cancel`, `migrate-start-postcopy`, `migrate resume=true`, and the
//! guest having stopped for completion), and [`ControlError`], the answer when the request does
//! not apply to the side or to its current status. A refused control changes nothing.

use super::status::MigrationStatus;

/// An operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Control {
    /// Destination: accept a new recovery channel while paused (`migrate-recover`).
    Recover,
    /// Either side: act as if the channel failed (`migrate-pause`); postcopy statuses only.
    Pause,
    /// Either side: cancel (`migrate_cancel`), releasing every wait (SM-CANCEL).
    Cancel,
    /// Source: switch to postcopy at the next opportunity (`migrate-start-postcopy`).
    StartPostcopy,
    /// Source: resume a paused postcopy over a new channel (`migrate resume=true`).
    Resume,
    /// Source: the guest is stopped and the last dirty sync was given; finish precopy.
    Complete,
}

/// Why a [`Control`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// This side has no such command.
    NotForThisSide(Control),
    /// The command does not apply in the current status.
    WrongStatus {
        /// The command.
        control: Control,
        /// The status it was refused in.
        status: MigrationStatus,
    },
    /// The configuration does not allow it (e.g. `StartPostcopy` without postcopy-ram).
    NotConfigured(Control),
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ControlError::NotForThisSide(c) => write!(f, "{c:?} does not apply to this side"),
            ControlError::WrongStatus { control, status } => {
                write!(f, "{control:?} refused in status {status}")
            }
            ControlError::NotConfigured(c) => write!(f, "{c:?} needs a capability that is off"),
        }
    }
}

impl core::error::Error for ControlError {}
