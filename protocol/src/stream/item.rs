//! [`Item`]: one decoded piece of a main or recovery channel, and its exact re-encoding.

use crate::codes::SectionType;
use crate::command::Command;
use crate::header::{encode_header, Configuration};
use crate::ram::RamRecord;
use crate::section::{encode_footer, SectionHeader};
use crate::sink::Sink;

/// One item of a stream, borrowing from the decoder's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// The header (magic `QEVM` and this version).
    Header {
        /// The stream version (3).
        version: u32,
    },
    /// The configuration section.
    Configuration(Configuration<'a>),
    /// A section header (START/FULL/PART/END).
    Section(SectionHeader<'a>),
    /// One RAM record of a `ram` section.
    Ram(RamRecord<'a>),
    /// The whole payload of a device section (between header and footer).
    DeviceData(&'a [u8]),
    /// A section footer.
    Footer {
        /// The section id it closes.
        section_id: u32,
    },
    /// A command. For PACKAGED, the blob's items follow, then [`Item::PackageEnd`].
    Command(Command<'a>),
    /// The end of a PACKAGED blob (zero bytes on the wire).
    PackageEnd,
    /// `QEMU_VM_EOF`.
    Eof,
    /// The trailing VM description's JSON bytes (after `0x06` and the be32 length).
    VmDescription(&'a [u8]),
}

impl Item<'_> {
    /// Writes the item's exact wire bytes (nothing for [`Item::PackageEnd`]).
    pub fn encode(&self, out: &mut impl Sink) {
        match self {
            Item::Header { version } => encode_header(*version, out),
            Item::Configuration(c) => c.encode(out),
            Item::Section(h) => h.encode(out),
            Item::Ram(r) => r.encode(out),
            Item::DeviceData(d) => out.put(d),
            Item::Footer { section_id } => encode_footer(*section_id, out),
            Item::Command(c) => c.encode(out),
            Item::PackageEnd => {}
            Item::Eof => out.put_u8(SectionType::EOF.0),
            Item::VmDescription(j) => {
                out.put_u8(SectionType::VMDESCRIPTION.0);
                out.put_be32(j.len() as u32);
                out.put(j);
            }
        }
    }
}
