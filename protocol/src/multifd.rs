//! Multifd connections: the 64-byte init packet and the page packets, in QEMU 7.2's and 10.x's
//! layouts (decoded here; the destination machine applies them, see
//! `machine::destination`'s multifd module, and the source machine produces them, see
//! `machine::source`'s multifd module).
//!
//! This module owns the byte layout of a multifd connection as fixed-size big-endian structs
//! (`zerocopy`), the checks `MFD-MAGIC`, `MFD-VERSION` and `MFD-PAGES`, and the framing of the
//! page data that follows each packet.
//!
//! A RAM packet is `MULTIFD_RAM_PACKET_HEADER` (320) bytes of fixed fields, then an offset
//! array of *pages-per-packet* be64 slots (`512 KiB / TPS`, 128 for 4 KiB pages: the array's
//! size is fixed by the receiver, whatever `pages_alloc` says; the captures confirm this even
//! for SYNC packets with `pages_alloc` 0), then the page data: `normal_pages × TPS` bytes
//! without compression, `next_packet_size` bytes with it. In 10.x the first "unused" be64 of 7.2
//! became be32 `zero_pages` + be32 unused, and the offsets are the normal pages' then the zero
//! pages'. Slots past them, the block name after its NUL and the unused fields are kept as they
//! are on the wire (QEMU reuses its packet buffer, so they can hold stale values) so that a
//! packet re-encodes to the same bytes.

use crate::codes::MULTIFD_MAGIC;
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::profile::{Profile, Version};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;
use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of page data one packet carries at most: 512 KiB.
pub const MULTIFD_PACKET_SIZE: u32 = 512 * 1024;
/// The multifd version every packet carries.
pub const MULTIFD_VERSION: u32 = 1;
/// Packet flag: a sync point.
pub const FLAG_SYNC: u32 = 1;
/// Packet flag (10.x): a device-state packet (VFIO), not RAM.
pub const FLAG_DEVICE_STATE: u32 = 1 << 6;
/// Byte size of the fixed part of a RAM packet (before the offset array).
pub const MULTIFD_RAM_PACKET_HEADER: usize = core::mem::size_of::<RamPacketHeader>();

/// Offset slots in every RAM packet: `MULTIFD_PACKET_SIZE / TPS` (128 for 4 KiB pages).
#[inline]
pub const fn pages_per_packet(profile: &Profile) -> u32 {
    let tps = if profile.target_page_size == 0 {
        1
    } else {
        profile.target_page_size
    };
    MULTIFD_PACKET_SIZE / tps
}

/// The compression bits of a packet's flags (7.2: bits 1-3, 10.x: bits 1-5).
#[inline]
pub const fn compression_bits(profile: &Profile, flags: u32) -> u32 {
    match profile.version {
        Version::V7_2 => flags & 0x0e,
        Version::V10 => flags & 0x3e,
    }
}

/// The 64-byte init packet that opens every multifd connection, as on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct InitPacket {
    /// `MULTIFD_MAGIC`.
    pub magic: U32,
    /// `MULTIFD_VERSION`.
    pub version: U32,
    /// The source's UUID (zero unless set).
    pub uuid: [u8; 16],
    /// The channel number.
    pub id: u8,
    /// Unused.
    pub unused1: [u8; 7],
    /// Unused.
    pub unused2: [U64; 4],
}

/// The fixed part of a RAM packet, as on the wire (10.x names; in 7.2 `zero_pages` and
/// `unused32` are the first unused be64).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RamPacketHeader {
    /// `MULTIFD_MAGIC`.
    pub magic: U32,
    /// `MULTIFD_VERSION`.
    pub version: U32,
    /// `FLAG_SYNC`, compression bits, `FLAG_DEVICE_STATE`.
    pub flags: U32,
    /// Pages the sender allocated for this packet (≤ pages per packet).
    pub pages_alloc: U32,
    /// Pages carried with data.
    pub normal_pages: U32,
    /// Bytes of data after the packet (10.x; 7.2 leaves a stale value in SYNC packets).
    pub next_packet_size: U32,
    /// Packet sequence number across all channels.
    pub packet_num: U64,
    /// 10.x: zero pages (offsets only); 7.2: high half of an unused be64.
    pub zero_pages: U32,
    /// Unused.
    pub unused32: U32,
    /// Unused.
    pub unused64: [U64; 3],
    /// NUL-terminated block idstr.
    pub ramblock: [u8; 256],
}

/// The fixed part of a 10.x device-state packet, as on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct DeviceStatePacketHeader {
    /// `MULTIFD_MAGIC`.
    pub magic: U32,
    /// `MULTIFD_VERSION`.
    pub version: U32,
    /// Flags, with `FLAG_DEVICE_STATE`.
    pub flags: U32,
    /// NUL-terminated device idstr.
    pub idstr: [u8; 256],
    /// Device instance.
    pub instance_id: U32,
    /// Bytes of device data after the header.
    pub next_packet_size: U32,
}

/// A RAM packet, borrowed from the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamPacket<'a> {
    /// The fixed fields.
    pub header: &'a RamPacketHeader,
    /// The whole offset array (pages-per-packet slots).
    pub slots: &'a [U64],
    /// The page data.
    pub data: &'a [u8],
    /// Whether the 10.x layout (zero pages) applies.
    pub has_zero_pages: bool,
}

impl<'a> RamPacket<'a> {
    /// The packet's flags.
    pub fn flags(&self) -> u32 {
        self.header.flags.get()
    }
    /// Whether this is a SYNC packet.
    pub fn is_sync(&self) -> bool {
        self.flags() & FLAG_SYNC != 0
    }
    /// Pages with data.
    pub fn normal_pages(&self) -> u32 {
        self.header.normal_pages.get()
    }
    /// Zero pages (0 in the 7.2 layout).
    pub fn zero_pages(&self) -> u32 {
        if self.has_zero_pages {
            self.header.zero_pages.get()
        } else {
            0
        }
    }
    /// The block name (up to the first NUL).
    pub fn ramblock(&self) -> &'a [u8] {
        let r = &self.header.ramblock;
        &r[..r.iter().position(|&b| b == 0).unwrap_or(r.len())]
    }
    /// Offsets (in the block) of the pages with data, in data order.
    pub fn normal_offsets(&self) -> impl Iterator<Item = u64> + 'a {
        self.slots[..self.normal_pages() as usize]
            .iter()
            .map(|o| o.get())
    }
    /// Offsets of the zero pages (10.x).
    pub fn zero_offsets(&self) -> impl Iterator<Item = u64> + 'a {
        let n = self.normal_pages() as usize;
        self.slots[n..n + self.zero_pages() as usize]
            .iter()
            .map(|o| o.get())
    }
    /// The pages with data, each with its offset (uncompressed packets only; `tps` bytes each).
    pub fn pages(&self, tps: usize) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.normal_offsets()
            .zip(self.data.chunks_exact(tps.max(1)))
    }
    /// Writes the packet: fixed fields, offset slots, data.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put(self.header.as_bytes());
        out.put(self.slots.as_bytes());
        out.put(self.data);
    }
}

/// One item of a multifd connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultifdItem<'a> {
    /// The init packet (first on every connection).
    Init(&'a InitPacket),
    /// A RAM packet with its data.
    Ram(RamPacket<'a>),
    /// A 10.x device-state packet with its data.
    DeviceState {
        /// The fixed fields.
        header: &'a DeviceStatePacketHeader,
        /// The device data.
        data: &'a [u8],
    },
}

impl MultifdItem<'_> {
    /// Writes the item exactly as decoded.
    pub fn encode(&self, out: &mut impl Sink) {
        match self {
            MultifdItem::Init(p) => out.put(p.as_bytes()),
            MultifdItem::Ram(p) => p.encode(out),
            MultifdItem::DeviceState { header, data } => {
                out.put(header.as_bytes());
                out.put(data);
            }
        }
    }
}

fn check_magic_version(at: u64, magic: u32, version: u32) -> WireResult<()> {
    if magic != MULTIFD_MAGIC {
        return Err(WireError::invalid(at, Rule::MfdMagic, magic as u64));
    }
    if version != MULTIFD_VERSION {
        return Err(WireError::invalid(at + 4, Rule::MfdVersion, version as u64));
    }
    Ok(())
}

fn fixed<'a, T: FromBytes + KnownLayout + Immutable>(r: &mut Reader<'a>) -> WireResult<&'a T> {
    let b = r.take(core::mem::size_of::<T>())?;
    T::ref_from_bytes(b).map_err(|_| WireError::Incomplete { needed: 1 })
}

/// Incremental decoder of one multifd connection: the init packet, then packets.
#[derive(Clone, Debug)]
pub struct MultifdDecoder {
    profile: Profile,
    limits: Limits,
    offset: u64,
    init_seen: bool,
}

impl MultifdDecoder {
    /// A decoder at the start of a connection.
    pub const fn new(profile: Profile, limits: Limits) -> Self {
        MultifdDecoder {
            profile,
            limits,
            offset: 0,
            init_seen: false,
        }
    }

    /// Absolute offset of the next item.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Decodes the next item from `input` (starting at [`offset`](Self::offset)). Atomic: on
    /// error nothing changes. Checks `MFD-MAGIC`, `MFD-VERSION`, `MFD-PAGES` (pages_alloc ≤
    /// pages per packet, normal (+ zero) ≤ pages_alloc, compressed data ≤ its bound) and, for
    /// device state, `SEC-DEVICE-LEN` against `limits.max_device_payload`.
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> WireResult<(MultifdItem<'a>, usize)> {
        let mut r = Reader::new(input, self.offset);
        let at = r.offset();
        let item = if !self.init_seen {
            let p: &InitPacket = fixed(&mut r)?;
            check_magic_version(at, p.magic.get(), p.version.get())?;
            MultifdItem::Init(p)
        } else {
            // Look at the common header first, to pick the layout.
            let mut peek = r.clone();
            let magic = peek.be32()?;
            let version = peek.be32()?;
            let flags = peek.be32()?;
            check_magic_version(at, magic, version)?;
            if matches!(self.profile.version, Version::V10) && flags & FLAG_DEVICE_STATE != 0 {
                let h: &DeviceStatePacketHeader = fixed(&mut r)?;
                let n = h.next_packet_size.get();
                if n > self.limits.max_device_payload {
                    return Err(WireError::invalid(at + 272, Rule::SecDeviceLen, n as u64));
                }
                let data = r.take(n as usize)?;
                MultifdItem::DeviceState { header: h, data }
            } else {
                MultifdItem::Ram(self.ram_packet(&mut r, at)?)
            }
        };
        self.init_seen = true;
        let used = r.consumed();
        self.offset += used as u64;
        Ok((item, used))
    }

    fn ram_packet<'a>(&self, r: &mut Reader<'a>, at: u64) -> WireResult<RamPacket<'a>> {
        let h: &RamPacketHeader = fixed(r)?;
        let ppp = pages_per_packet(&self.profile);
        let alloc = h.pages_alloc.get();
        if alloc > ppp {
            return Err(WireError::invalid(at + 12, Rule::MfdPages, alloc as u64));
        }
        let has_zero = matches!(self.profile.version, Version::V10);
        let normal = h.normal_pages.get();
        if normal > alloc {
            return Err(WireError::invalid(at + 16, Rule::MfdPages, normal as u64));
        }
        if has_zero {
            let zero = h.zero_pages.get();
            if zero > alloc - normal {
                return Err(WireError::invalid(at + 32, Rule::MfdPages, zero as u64));
            }
        }
        let tps = self.profile.target_page_size as u64;
        let slot_bytes = r.take(ppp as usize * 8)?;
        let slots =
            <[U64]>::ref_from_bytes(slot_bytes).map_err(|_| WireError::Incomplete { needed: 1 })?;
        let data_len = if compression_bits(&self.profile, h.flags.get()) == 0 {
            normal as u64 * tps
        } else {
            let n = h.next_packet_size.get() as u64;
            let bound = crate::ram::compress_bound(normal as u64 * tps);
            if n > bound {
                return Err(WireError::invalid(at + 20, Rule::MfdPages, n));
            }
            n
        };
        let data = r.take(data_len as usize)?;
        Ok(RamPacket {
            header: h,
            slots,
            data,
            has_zero_pages: has_zero,
        })
    }
}
