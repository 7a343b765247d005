//! # qmig-protocol
//!
//! QEMU's live-migration wire protocol as a `no_std` library: the savevm stream (magic `QEVM`,
//! version 3), its sections and `MIG_CMD_*` commands, the return path (`MIG_RP_MSG_*`), RAM
//! records, received bitmaps and device state, for QEMU 7.2 and 10.x; and sans-IO source and
//! destination state machines for precopy, postcopy, pause and recovery.
//!
//! The crate does no I/O, starts no threads and reads no clock. Decoders take borrowed bytes in
//! any chunking and return either an item, `Incomplete`, or a [`error::Violation`] naming the
//! absolute byte offset and the [`rule::Rule`] broken; no input makes them panic, and no length
//! from the peer is allocated before it is checked against [`limits::Limits`].
//!
//! Layers, bottom up:
//! - [`rule`], [`error`], [`reader`], [`sink`], [`codes`], [`profile`], [`limits`]: shared
//!   vocabulary: rule ids, the wire error, the input cursor, the output sink, open wire codes,
//!   version profiles and caps.
//! - Wire codec: [`header`], [`section`], [`command`], [`ram`], [`rp`], [`bitmap`], [`multifd`],
//!   [`stream`] (the incremental main-stream decoder) and, with `vmdesc`, [`vmdesc`] and
//!   [`device`].
//! - State machines: [`machine`] (`Source`, `Destination`).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod bitmap;
pub mod codes;
pub mod command;
#[cfg(feature = "vmdesc")]
pub mod device;
pub mod error;
pub mod header;
pub mod hostpage;
pub mod limits;
#[cfg(feature = "alloc")]
pub mod machine;
pub mod multifd;
pub mod profile;
pub mod ram;
pub mod reader;
pub mod rp;
pub mod rule;
pub mod section;
pub mod sink;
pub mod stream;
#[cfg(feature = "vmdesc")]
pub mod vmdesc;

pub use error::{Violation, WireError, WireResult};
pub use profile::{Profile, Version};
pub use rule::Rule;
