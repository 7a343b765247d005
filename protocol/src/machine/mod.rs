//! Sans-IO migration state machines: [`Source`] and [`Destination`].
//!
//! This module owns the protocol's behaviour over time: which status each side is in, what it
//! sends in answer to what it receives, and how postcopy pauses and recovers. It does no I/O,
//! starts no threads and reads no clock (quinn-proto style): the caller feeds bytes, channel
//! events, memory faults and operator controls in through `handle_*` methods, and takes bytes
//! and events out through `poll_*` methods. Wire bytes are decoded and encoded only by the codec
//! modules of this crate ([`crate::stream`], [`crate::rp`], [`crate::ram`], [`crate::command`]).
//!
//! Submodules:
//! - [`status`]: `MigrationStatus` and the transition table of each side.
//! - [`memory`]: the RAM block description and the memory traits.
//! - [`control`]: operator commands.
//! - [`events`]: what the machines report, and the caller-supplied time.
//! - [`destination`], [`source`]: the two machines.

pub mod control;
pub mod destination;
pub mod events;
pub mod memory;
pub mod source;
pub mod status;

pub use control::{Control, ControlError};
pub use destination::{Destination, DestinationConfig, DeviceSection, FaultOutcome, MultifdConfig};
pub use events::{ChannelKind, Event, Instant};
pub use memory::{DiscardMemory, GuestMemory, MemoryError, RamBlockSpec, SourceMemory};
pub use source::{DeviceState, Source, SourceConfig};
pub use status::{
    MigrationStatus, Transition, Trigger, DESTINATION_TRANSITIONS, SOURCE_TRANSITIONS,
};
