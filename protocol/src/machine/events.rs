//! What the machines report to the caller.
//!
//! This module owns [`Event`] (drained with `poll_event()` on either machine) and [`Instant`],
//! the opaque time the caller passes in (the machines never read a clock).

use super::status::{IllegalTransition, MigrationStatus};
use crate::error::Violation;
use crate::rule::Rule;

/// A point in time given by the caller: nanoseconds on a clock of its choice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// Nanoseconds from `earlier` to `self` (0 if `earlier` is later).
    pub const fn since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Which channel an error was found on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// The main stream (first connection or a recovery connection).
    Main,
    /// The return path.
    ReturnPath,
    /// No channel: a local condition (memory backend, timeout, operator).
    Local,
}

/// An event from a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The status changed.
    Status {
        /// Before.
        from: MigrationStatus,
        /// After.
        to: MigrationStatus,
    },
    /// A rule was broken (by the peer's bytes, or locally with `ChannelKind::Local`). The status
    /// change it causes (failed or paused) follows as its own event.
    Error {
        /// Where it was found.
        channel: ChannelKind,
        /// The violation: absolute channel offset, rule, value.
        violation: Violation,
    },
    /// The channel was lost (closed, timed out or paused by the operator) under `rule`
    /// (SM-FATAL-BEFORE-RUN, SM-PAUSE-AFTER-RUN, SM-PAUSE-IN-RECOVER, SM-TIMEOUT).
    ChannelLost {
        /// The rule that decides what the loss does.
        rule: Rule,
    },
    /// Destination: pages were placed by the last `handle_stream` call.
    PagesPlaced {
        /// Host pages placed (data or zero).
        count: u64,
    },
    /// Destination: a page a fault was waiting for is now present: wake its waiters.
    FaultResolved {
        /// Block index.
        block: usize,
        /// Byte offset of the host page.
        offset: u64,
    },
    /// Destination: every fault wait was released without its page (cancel): wake all waiters.
    WaitsReleased {
        /// How many distinct pages had waiters.
        count: u64,
    },
    /// Destination: a page request went onto the return path.
    PageRequested {
        /// Block index.
        block: usize,
        /// Byte offset of the host page.
        offset: u64,
    },
    /// Destination: SHUT was queued on the return path (the last message, SM-SHUT-LAST).
    ShutSent {
        /// The value sent (0: success).
        value: u32,
    },
    /// Source: a PONG arrived.
    Pong {
        /// The echoed PING value.
        value: u32,
    },
    /// Source: the destination sent SHUT.
    ShutReceived {
        /// Its value.
        value: u32,
    },
    /// Source: every page is sent; precopy needs the next dirty sync (or `Complete`).
    NeedDirtySync,
    /// The machine tried a status change its transition table does not have: a bug in the
    /// machine, reported instead of panicking; the status did not change.
    IllegalTransition(IllegalTransition),
}
