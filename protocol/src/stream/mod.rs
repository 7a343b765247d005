//! The incremental main-stream decoder.
//!
//! This module owns the grammar of a main channel and of a recovery channel: header and
//! configuration first (main channel), then top-level items (sections, commands, EOF, the VM
//! description), the section table (section id → idstr, instance, version; `SEC-UNKNOWN-ID`,
//! `SEC-DUPLICATE-ID`), the split of a `ram` section into RAM records up to EOS and of a device
//! section into one payload (delimited by a VM description or a validated footer scan), the
//! PACKAGED blob decoded inline with its boundary tracked, and the announced RAM blocks.
//!
//! [`StreamDecoder::decode`] takes the bytes at [`StreamDecoder::offset`] and returns one
//! [`Item`] and the bytes it used, or `Incomplete` (nothing consumed; call again with the same
//! start and more bytes), or a violation naming the absolute offset. Any chunking of the input
//! gives the same items.
//!
//! Submodules: [`item`] (the [`Item`] type and its encoder), [`table`] (section and block
//! tables), `top` (top-level items and the section table), `delimit` (device payload
//! delimiting).

mod delimit;
mod footer_index;
pub mod item;
pub mod table;
mod top;

pub use item::Item;
pub use table::{BlockInfoOwned, SectionInfo, NO_ALLOC_SECTIONS};

use crate::codes::SectionType;
use crate::error::{WireError, WireResult};
use crate::header::{check_capability_names, decode_configuration, decode_header};
use crate::limits::Limits;
use crate::profile::Profile;
use crate::ram::{decode_record, RamBody, RamChannel, RamCtx};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::section::decode_footer;
use table::Table;

/// A test on a block name (which MEM_SIZE entries carry a page size).
#[cfg(feature = "alloc")]
type BlockPredicate<'p> = dyn Fn(&[u8]) -> bool + 'p;

/// Which kind of channel a decoder reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// A main channel: header and (if the profile says so) configuration first.
    Main,
    /// A postcopy recovery channel: no header; continues an existing stream (see
    /// [`StreamDecoder::resume_from`]).
    Resume,
    /// A PACKAGED blob on its own: commands and sections only, no EOF, no nested package.
    Packaged,
}

/// Where in the grammar the decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Header,
    Config,
    Body,
    Ram { section_id: u32, start: bool },
    Device { section_id: u32 },
    Footer { section_id: u32 },
    AfterEof,
    Done,
}

/// The footer search a decoder owns or borrows (nothing is kept without `alloc`).
#[cfg(feature = "alloc")]
type Search = Option<alloc::boxed::Box<footer_index::FooterSearch>>;
#[cfg(not(feature = "alloc"))]
type Search = ();

/// How many items past a candidate footer the footer scan validates.
const LOOKAHEAD_ITEMS: usize = 4;
/// How deep footer scans nest inside a lookahead.
const LOOKAHEAD_DEPTH: u8 = 2;
/// How many candidate footers a footer scan inside a lookahead validates before it gives up
/// (the enclosing candidate is then rejected): keeps nested lookalike footers linear.
const NESTED_CANDIDATES: u32 = 16;

/// The incremental decoder of a main, recovery or packaged channel.
#[derive(Clone)]
pub struct StreamDecoder {
    channel: Channel,
    profile: Profile,
    limits: Limits,
    phase: Phase,
    offset: u64,
    package_end: Option<u64>,
    sections: Table<SectionInfo, NO_ALLOC_SECTIONS>,
    current: Option<SectionInfo>,
    ram: RamChannel,
    #[cfg(feature = "alloc")]
    blocks: Table<BlockInfoOwned, 0>,
    blocks_known: bool,
    ignore_shared: bool,
    advised: bool,
    #[cfg(feature = "alloc")]
    huge_blocks: alloc::vec::Vec<alloc::vec::Vec<u8>>,
    #[cfg(feature = "alloc")]
    known_devices: Option<alloc::vec::Vec<(alloc::vec::Vec<u8>, u32, u32)>>,
    postcopy: bool,
    is_final: bool,
    depth: u8,
    /// Footer-scan progress for the payload at this offset: where to resume looking, and the
    /// lookahead of a candidate footer that was waiting for more bytes.
    scan_hint: Option<delimit::ScanHint>,
    /// The footer search (and its index) of the payload being delimited; lent to lookaheads.
    search: Search,
    #[cfg(feature = "vmdesc")]
    vmdesc: Option<alloc::sync::Arc<crate::vmdesc::VmDesc>>,
}

impl core::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("channel", &self.channel)
            .field("phase", &self.phase)
            .field("offset", &self.offset)
            .field("package_end", &self.package_end)
            .field("current", &self.current)
            .field("ram", &self.ram)
            .field("postcopy", &self.postcopy)
            .finish()
    }
}

impl StreamDecoder {
    /// A decoder at offset 0 of a new channel.
    pub fn new(channel: Channel, profile: Profile, limits: Limits) -> Self {
        let phase = match channel {
            Channel::Main => Phase::Header,
            Channel::Resume | Channel::Packaged => Phase::Body,
        };
        StreamDecoder {
            channel,
            profile,
            limits,
            phase,
            offset: 0,
            package_end: None,
            sections: Table::new(),
            current: None,
            ram: RamChannel::new(),
            #[cfg(feature = "alloc")]
            blocks: Table::new(),
            blocks_known: false,
            ignore_shared: false,
            advised: false,
            #[cfg(feature = "alloc")]
            huge_blocks: alloc::vec::Vec::new(),
            #[cfg(feature = "alloc")]
            known_devices: None,
            postcopy: matches!(channel, Channel::Resume),
            is_final: false,
            depth: LOOKAHEAD_DEPTH,
            scan_hint: None,
            search: Search::default(),
            #[cfg(feature = "vmdesc")]
            vmdesc: None,
        }
    }

    /// A decoder for a recovery channel continuing this stream: offset 0, no header, the same
    /// section table, announced blocks, RAM CONTINUE state and postcopy mode.
    pub fn resume_from(&self) -> StreamDecoder {
        let mut d = self.clone();
        d.channel = Channel::Resume;
        d.phase = Phase::Body;
        d.offset = 0;
        d.package_end = None;
        d.current = None;
        // Footer-scan progress belongs to the old channel's bytes.
        d.scan_hint = None;
        d.search = Search::default();
        d.is_final = false;
        d.postcopy = true;
        d
    }

    /// Absolute offset of the next byte to decode.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The channel kind.
    pub fn channel(&self) -> Channel {
        self.channel
    }

    /// The profile in use.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The RAM CONTINUE state of this channel.
    pub fn ram(&self) -> &RamChannel {
        &self.ram
    }

    /// The blocks announced by MEM_SIZE (empty before it, and always without `alloc`).
    pub fn blocks(&self) -> &[BlockInfoOwned] {
        #[cfg(feature = "alloc")]
        return self.blocks.as_slice();
        #[cfg(not(feature = "alloc"))]
        return &[];
    }

    /// The section bound to `id` by a START/FULL header.
    pub fn section(&self, id: u32) -> Option<&SectionInfo> {
        self.sections.iter().find(|s| s.section_id == id)
    }

    /// The section whose payload or footer is being decoded.
    pub fn current_section(&self) -> Option<&SectionInfo> {
        self.current.as_ref()
    }

    /// Whether the decoder is inside a PACKAGED blob; the absolute offset where it ends.
    pub fn package_end(&self) -> Option<u64> {
        self.package_end
    }

    /// Whether RAM records are decoded under postcopy rules (after POSTCOPY_LISTEN, and on a
    /// recovery channel).
    pub fn postcopy(&self) -> bool {
        self.postcopy
    }

    /// Sets postcopy rules for RAM records (e.g. for a preempt or recovery channel).
    pub fn set_postcopy(&mut self, on: bool) {
        self.postcopy = on;
    }

    /// Names the receiver's RAM blocks whose page size differs from the host page size: after
    /// a 16-byte POSTCOPY_ADVISE their MEM_SIZE entries carry a be64 page size (QEMU reads the
    /// field by the receiver's own block table). Empty by default (4 KiB pages everywhere).
    #[cfg(feature = "alloc")]
    pub fn set_huge_page_blocks<'n>(&mut self, names: impl IntoIterator<Item = &'n [u8]>) {
        self.huge_blocks = names.into_iter().map(<[u8]>::to_vec).collect();
    }

    /// Declares the receiver's devices as `(idstr, instance_id, version_id)`: a START/FULL
    /// naming another device breaks `SEC-UNKNOWN-DEVICE`, one with a newer version
    /// `SEC-VERSION`. Without this call every device is accepted. Include `("ram", 0, 4)`.
    #[cfg(feature = "alloc")]
    pub fn set_known_devices<'n>(
        &mut self,
        devices: impl IntoIterator<Item = (&'n [u8], u32, u32)>,
    ) {
        self.known_devices = Some(
            devices
                .into_iter()
                .map(|(n, i, v)| (n.to_vec(), i, v))
                .collect(),
        );
    }

    /// Whether a 16-byte POSTCOPY_ADVISE (postcopy-ram) has been decoded.
    pub fn advised(&self) -> bool {
        self.advised
    }

    /// Whether MEM_SIZE entries carry the x-ignore-shared region address. Set automatically
    /// from the configuration's capability list.
    pub fn set_ignore_shared(&mut self, on: bool) {
        self.ignore_shared = on;
    }

    /// Declares that the input given to `decode` is the whole rest of the channel, so that
    /// decisions that need a next byte (end of configuration, footer scan) can be made at the
    /// end of the input.
    pub fn set_final(&mut self, is_final: bool) {
        self.is_final = is_final;
    }

    /// Whether the stream has ended properly (after EOF, or after the VM description).
    pub fn at_end(&self) -> bool {
        matches!(self.phase, Phase::AfterEof | Phase::Done)
    }

    /// Uses a VM description to delimit device payloads (instead of the footer scan).
    #[cfg(feature = "vmdesc")]
    pub fn set_vmdesc(&mut self, desc: crate::vmdesc::VmDesc) {
        self.vmdesc = Some(alloc::sync::Arc::new(desc));
    }

    /// Like [`StreamDecoder::decode`], with `input` declared to be the rest of the channel.
    pub fn decode_final<'a>(&mut self, input: &'a [u8]) -> WireResult<(Item<'a>, usize)> {
        let f = self.is_final;
        self.is_final = true;
        let r = self.decode(input);
        self.is_final = f;
        r
    }

    /// Decodes one item from `input`, whose first byte is at [`StreamDecoder::offset`].
    ///
    /// Atomic: on error the decoder is unchanged. [`Item::PackageEnd`] uses zero bytes.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> WireResult<(Item<'a>, usize)> {
        if let Some(end) = self.package_end {
            if self.offset == end && matches!(self.phase, Phase::Body) {
                self.package_end = None;
                return Ok((Item::PackageEnd, 0));
            }
            let left = end.saturating_sub(self.offset);
            if (input.len() as u64) >= left {
                let limited = &input[..left as usize];
                return match self.decode_inner(limited, true) {
                    Err(WireError::Incomplete { .. }) => Err(WireError::invalid(
                        self.offset,
                        Rule::CmdPackagedContent,
                        left,
                    )),
                    r => r,
                };
            }
        }
        self.decode_inner(input, false)
    }

    fn in_package(&self) -> bool {
        self.package_end.is_some() || self.channel == Channel::Packaged
    }

    fn decode_inner<'a>(
        &mut self,
        input: &'a [u8],
        package_limited: bool,
    ) -> WireResult<(Item<'a>, usize)> {
        let mut r = Reader::new(input, self.offset);
        let at = self.offset;
        let item = match self.phase {
            Phase::Header => {
                let version = decode_header(&mut r)?;
                self.phase = if self.profile.configuration {
                    Phase::Config
                } else {
                    Phase::Body
                };
                Item::Header { version }
            }
            Phase::Config => {
                let c =
                    decode_configuration(&mut r, &self.limits, self.is_final || package_limited)?;
                check_capability_names(&c, at, &self.profile)?;
                if c.has_capability(b"x-ignore-shared") {
                    self.ignore_shared = true;
                }
                self.phase = Phase::Body;
                Item::Configuration(c)
            }
            Phase::Body => return self.decode_top(input),
            Phase::Ram { section_id, start } => {
                let mut ch = self.ram.clone();
                #[cfg(feature = "alloc")]
                let huge = |name: &[u8]| self.huge_blocks.iter().any(|b| b == name);
                #[cfg(feature = "alloc")]
                let page_size_field: Option<&BlockPredicate<'_>> =
                    (self.advised && !self.huge_blocks.is_empty()).then_some(&huge);
                #[cfg(not(feature = "alloc"))]
                let page_size_field = None;
                let ctx = RamCtx {
                    profile: &self.profile,
                    limits: &self.limits,
                    ignore_shared: self.ignore_shared,
                    postcopy: self.postcopy,
                    page_size_field,
                };
                let rec = match decode_record(&mut r, &mut ch, &ctx) {
                    Ok(rec) => rec,
                    // The section's footer where a record should be: EOS is missing.
                    Err(WireError::Invalid(_))
                        if input.starts_with(&crate::section::footer_bytes(section_id)) =>
                    {
                        return Err(WireError::invalid(at, Rule::RamEos, section_id as u64));
                    }
                    Err(e) => return Err(e),
                };
                if let RamBody::MemSize(_) = rec.body {
                    if !start {
                        return Err(WireError::invalid(at, Rule::RamMemSizePlace, rec.flags.0));
                    }
                }
                if rec.is_page() && self.blocks_known {
                    self.check_block(at, rec.addr, rec.block(&ch))?;
                }
                match rec.body {
                    RamBody::MemSize(list) => {
                        #[cfg(feature = "alloc")]
                        {
                            self.blocks.clear();
                            for b in list.iter() {
                                self.blocks.push_shared(BlockInfoOwned::from_info(&b));
                            }
                        }
                        #[cfg(not(feature = "alloc"))]
                        let _ = list;
                        self.blocks_known = cfg!(feature = "alloc");
                    }
                    RamBody::Eos => self.phase = self.after_payload(section_id),
                    _ => {}
                }
                self.ram = ch;
                Item::Ram(rec)
            }
            Phase::Device { section_id } => {
                let n = self.delimit(input, section_id, package_limited)?;
                self.phase = self.after_payload(section_id);
                r.skip(n)?;
                Item::DeviceData(&input[..n])
            }
            Phase::Footer { section_id } => {
                decode_footer(&mut r, section_id)?;
                self.phase = Phase::Body;
                self.current = None;
                Item::Footer { section_id }
            }
            Phase::AfterEof => {
                let b = r.u8()?;
                if b != SectionType::VMDESCRIPTION.0 {
                    return Err(WireError::invalid(at, Rule::EofTrailing, b as u64));
                }
                let len_at = r.offset();
                let len = r.be32()?;
                if len > self.limits.max_vmdesc {
                    return Err(WireError::invalid(len_at, Rule::VmdescLen, len as u64));
                }
                let json = r.take(len as usize)?;
                self.phase = Phase::Done;
                Item::VmDescription(json)
            }
            Phase::Done => {
                let b = r.u8()?;
                return Err(WireError::invalid(at, Rule::EofTrailing, b as u64));
            }
        };
        let n = r.consumed();
        self.offset += n as u64;
        Ok((item, n))
    }

    #[cfg(feature = "alloc")]
    fn check_block(&self, at: u64, addr: u64, name: Option<&[u8]>) -> WireResult<()> {
        let Some(name) = name else { return Ok(()) };
        match self.blocks.iter().find(|b| b.name() == name) {
            None => Err(WireError::invalid(
                at,
                Rule::RamBlockUnknown,
                name.len() as u64,
            )),
            Some(b) if addr >= b.used_length => Err(WireError::invalid(at, Rule::RamOffset, addr)),
            Some(_) => Ok(()),
        }
    }

    #[cfg(not(feature = "alloc"))]
    fn check_block(&self, _at: u64, _addr: u64, _name: Option<&[u8]>) -> WireResult<()> {
        Ok(())
    }

    fn after_payload(&self, section_id: u32) -> Phase {
        if self.profile.section_footers {
            Phase::Footer { section_id }
        } else {
            Phase::Body
        }
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests;
