//! One RAM record: the header word, the block name, the per-type body, and the per-channel
//! CONTINUE state that decides whether a name is on the wire.

use super::memsize::{decode_mem_size, MemSizeList};
use crate::codes::RamFlags;
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::profile::Profile;
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// zlib's `compressBound(n)`: the largest zlib stream `compress()` produces for `n` input bytes.
/// A 7.2 `COMPRESS_PAGE` length above `compress_bound(TPS)` breaks `RAM-COMPRESS-LEN`.
#[inline]
pub const fn compress_bound(n: u64) -> u64 {
    n + (n >> 12) + (n >> 14) + (n >> 25) + 13
}

/// The last block named by a page record on one channel, which a CONTINUE record refers to.
///
/// QEMU keeps this per channel (`last_recv_block[channel]`) and across section boundaries; reset
/// it only where the peer resets its sender side (a recovery, a new channel). The name is
/// stored inline (at most 255 bytes): no allocation.
#[derive(Clone)]
pub struct RamChannel {
    name: [u8; 255],
    len: u8,
}

impl RamChannel {
    /// A channel on which no block has been named yet.
    pub const fn new() -> Self {
        RamChannel {
            name: [0; 255],
            len: 0,
        }
    }

    /// Forgets the last block: the next page record must carry a name.
    #[inline]
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// The last block named on this channel, if any.
    #[inline]
    pub fn last_block(&self) -> Option<&[u8]> {
        if self.len == 0 {
            None
        } else {
            Some(&self.name[..self.len as usize])
        }
    }

    /// Records `name` as the last block named on this channel (what a sender does after
    /// writing a named page record). Names longer than 255 bytes are truncated, as on the wire;
    /// an empty name resets the channel.
    #[inline]
    pub fn set_last_block(&mut self, name: &[u8]) {
        let n = name.len().min(255);
        self.name[..n].copy_from_slice(&name[..n]);
        self.len = n as u8;
    }
}

impl RamChannel {
    /// Sender side: the name to write for a page record of `block` on this channel, `None`
    /// when the record can use CONTINUE instead (the block is the channel's last one). Updates
    /// the channel as the receiver will.
    #[inline]
    pub fn sender_name<'n>(&mut self, block: &'n [u8]) -> Option<&'n [u8]> {
        if self.last_block() == Some(block) {
            None
        } else {
            self.set_last_block(block);
            Some(block)
        }
    }

    /// Sender side: the flags for a page record of type `kind` for `block` (with CONTINUE when
    /// the name can be left out) and the name to write; updates the channel.
    #[inline]
    pub fn sender_flags<'n>(
        &mut self,
        kind: RamFlags,
        block: &'n [u8],
    ) -> (RamFlags, Option<&'n [u8]>) {
        match self.sender_name(block) {
            None => (kind.with(RamFlags::CONTINUE), None),
            Some(n) => (kind, Some(n)),
        }
    }
}

impl Default for RamChannel {
    fn default() -> Self {
        RamChannel::new()
    }
}

impl core::fmt::Debug for RamChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RamChannel")
            .field(
                "last_block",
                &self
                    .last_block()
                    .map(|n| core::str::from_utf8(n).unwrap_or("<non-utf8>")),
            )
            .finish()
    }
}

/// A question about a block, asked by name: `true` or `false`.
pub type BlockPredicate<'c> = &'c dyn Fn(&[u8]) -> bool;

/// What the receiver knows that a RAM record's bytes depend on or are checked against.
#[derive(Clone, Copy)]
pub struct RamCtx<'c> {
    /// Version profile: flag mask (TPS), legal flags, ZERO fill rule.
    pub profile: &'c Profile,
    /// Caps (MEM_SIZE block count).
    pub limits: &'c Limits,
    /// `x-ignore-shared`: every MEM_SIZE entry carries a be64 `mr->addr`.
    pub ignore_shared: bool,
    /// Postcopy receive rules apply (`RAM-POSTCOPY-FLAG`): only ZERO, PAGE, EOS (and 7.2
    /// COMPRESS_PAGE) records are accepted.
    pub postcopy: bool,
    /// Which MEM_SIZE entries carry a be64 `page_size`: QEMU's receiver reads it iff postcopy
    /// was advised, postcopy-ram is on and the *receiver's* block of that name has a page size
    /// other than the host page size. `None`: no entry carries one.
    ///
    /// (An addition to the DESIGN.md interface: the field's presence is decided by the
    /// receiver's block table, which this module does not own.)
    pub page_size_field: Option<BlockPredicate<'c>>,
}

impl<'c> RamCtx<'c> {
    /// A precopy context without ignore-shared and without per-block page sizes.
    pub const fn new(profile: &'c Profile, limits: &'c Limits) -> Self {
        RamCtx {
            profile,
            limits,
            ignore_shared: false,
            postcopy: false,
            page_size_field: None,
        }
    }
}

impl core::fmt::Debug for RamCtx<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RamCtx")
            .field("profile", self.profile)
            .field("limits", self.limits)
            .field("ignore_shared", &self.ignore_shared)
            .field("postcopy", &self.postcopy)
            .field("page_size_field", &self.page_size_field.is_some())
            .finish()
    }
}

/// The body of a RAM record, by type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamBody<'a> {
    /// `ZERO`: the page is filled with `fill` (0 from every QEMU source).
    Zero {
        /// The fill byte.
        fill: u8,
    },
    /// `PAGE`: one target page, borrowed from the input.
    Page(&'a [u8]),
    /// `XBZRLE`: the delta (after the 0x01 encoding byte and be16 length), borrowed.
    Xbzrle(&'a [u8]),
    /// `COMPRESS_PAGE` (7.2): the zlib stream (after its be32 length), borrowed.
    Compressed(&'a [u8]),
    /// `MEM_SIZE`: the block list; the record's `addr` is the total byte count.
    MemSize(MemSizeList<'a>),
    /// `EOS`: end of this section's RAM data.
    Eos,
    /// `MULTIFD_FLUSH` (10.x): a multifd sync point.
    MultifdFlush,
    /// `HOOK` (RDMA): never returned by [`decode_record`] (it rejects it with `RAM-HOOK`); here
    /// so that a record can be described and encoded.
    Hook,
}

/// One RAM record as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRecord<'a> {
    /// The flag bits (low bits of the header word, masked with `profile.flag_mask()`),
    /// including CONTINUE.
    pub flags: RamFlags,
    /// The high part of the header word: the byte offset in the block for page records, the
    /// total RAM byte count for MEM_SIZE, 0 (as QEMU sends) for the others.
    pub addr: u64,
    /// The block name as on the wire; `None` when CONTINUE is set or the type carries none.
    pub name: Option<&'a [u8]>,
    /// The body.
    pub body: RamBody<'a>,
}

#[inline]
const fn is_page_kind(kind: u64) -> bool {
    matches!(kind, 0x002 | 0x008 | 0x040 | 0x100)
}

#[inline]
const fn postcopy_kind_ok(kind: u64, profile: &Profile) -> bool {
    match kind {
        0x002 | 0x008 | 0x010 => true,
        0x100 => matches!(profile.version, crate::profile::Version::V7_2),
        _ => false,
    }
}

/// Decodes one RAM record from `r`.
///
/// Atomic: on `Incomplete` or `Invalid` neither `r` nor `ch` changes; on success `r` is past the
/// record and, for a named page record, `ch` remembers its block. Checks, in wire order:
/// `RAM-FLAGS` (exactly one type bit besides CONTINUE), `RAM-HOOK`, `RAM-FLAG-PROFILE`,
/// `RAM-POSTCOPY-FLAG` (with `ctx.postcopy`), all at the header word; `RAM-CONTINUE` (header
/// word); `STR8-EMPTY`; then per type `RAM-ZERO-FILL`, `RAM-XBZRLE-ENC`, `RAM-XBZRLE-LEN`,
/// `RAM-COMPRESS-LEN`, `RAM-MEMSIZE-COUNT`, `RAM-MEMSIZE-SUM` at the offending field.
///
/// Like QEMU, a name is read only for page records (ZERO, PAGE, XBZRLE, COMPRESS_PAGE); a
/// CONTINUE bit on another record type is accepted and has no effect.
pub fn decode_record<'a>(
    r: &mut Reader<'a>,
    ch: &mut RamChannel,
    ctx: &RamCtx<'_>,
) -> WireResult<RamRecord<'a>> {
    let mut c = r.clone();
    let at = c.offset();
    let word = c.be64()?;
    let mask = ctx.profile.flag_mask();
    let flags = RamFlags(word & mask);
    let addr = word & !mask;
    let kind = flags.kind().0;
    if kind.count_ones() != 1 {
        return Err(WireError::invalid(at, Rule::RamFlags, flags.0));
    }
    if kind == RamFlags::HOOK.0 {
        return Err(WireError::invalid(at, Rule::RamHook, flags.0));
    }
    if !ctx.profile.ram_flag_legal(RamFlags(kind)) {
        return Err(WireError::invalid(at, Rule::RamFlagProfile, flags.0));
    }
    if ctx.postcopy && !postcopy_kind_ok(kind, ctx.profile) {
        return Err(WireError::invalid(at, Rule::RamPostcopyFlag, flags.0));
    }
    let page = is_page_kind(kind);
    let name = if !page {
        None
    } else if flags.contains(RamFlags::CONTINUE) {
        if ch.last_block().is_none() {
            return Err(WireError::invalid(at, Rule::RamContinue, flags.0));
        }
        None
    } else {
        Some(c.str8()?)
    };
    let tps = ctx.profile.target_page_size as usize;
    let body = match kind {
        0x002 => {
            let fat = c.offset();
            let fill = c.u8()?;
            if fill != 0 && ctx.profile.zero_fill_must_be_zero() {
                return Err(WireError::invalid(fat, Rule::RamZeroFill, fill as u64));
            }
            RamBody::Zero { fill }
        }
        0x008 => RamBody::Page(c.take(tps)?),
        0x040 => {
            let eat = c.offset();
            let enc = c.u8()?;
            if enc != super::XBZRLE_ENCODING {
                return Err(WireError::invalid(eat, Rule::RamXbzrleEnc, enc as u64));
            }
            let lat = c.offset();
            let len = c.be16()?;
            if len as usize > tps {
                return Err(WireError::invalid(lat, Rule::RamXbzrleLen, len as u64));
            }
            RamBody::Xbzrle(c.take(len as usize)?)
        }
        0x100 => {
            let lat = c.offset();
            let len = c.be32()?;
            if len as u64 > compress_bound(tps as u64) {
                return Err(WireError::invalid(lat, Rule::RamCompressLen, len as u64));
            }
            RamBody::Compressed(c.take(len as usize)?)
        }
        0x004 => RamBody::MemSize(decode_mem_size(&mut c, addr, ctx)?),
        0x010 => RamBody::Eos,
        // 0x200: the only other kind the profile admits.
        _ => RamBody::MultifdFlush,
    };
    if let Some(n) = name {
        ch.set_last_block(n);
    }
    *r = c;
    Ok(RamRecord {
        flags,
        addr,
        name,
        body,
    })
}

impl<'a> RamRecord<'a> {
    /// The block this record applies to: its own name, or with CONTINUE the channel's last
    /// block (pass the channel state as it was *before* or *after* decoding this record: a
    /// CONTINUE record does not change it).
    #[inline]
    pub fn block<'s>(&'s self, ch: &'s RamChannel) -> Option<&'s [u8]> {
        match self.name {
            Some(n) => Some(n),
            None if is_page_kind(self.flags.kind().0) => ch.last_block(),
            None => None,
        }
    }

    /// Whether this is a page record (ZERO, PAGE, XBZRLE, COMPRESS_PAGE).
    #[inline]
    pub fn is_page(&self) -> bool {
        is_page_kind(self.flags.kind().0)
    }

    /// Writes the record exactly as QEMU lays it out: be64 `addr | flags`, the str8 name if
    /// present, then the body. The caller keeps `flags`, `name` and `body` consistent (as every
    /// decoded record is) and `addr` aligned to the target page; an XBZRLE delta is written with
    /// at most 65535 bytes and a compressed body with at most `u32::MAX`, so that the length
    /// fields stay truthful.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put_be64(self.addr | self.flags.0);
        if let Some(n) = self.name {
            out.put_str8(n);
        }
        match self.body {
            RamBody::Zero { fill } => out.put_u8(fill),
            RamBody::Page(p) => out.put(p),
            RamBody::Xbzrle(d) => {
                let d = &d[..d.len().min(u16::MAX as usize)];
                out.put_u8(super::XBZRLE_ENCODING);
                out.put_be16(d.len() as u16);
                out.put(d);
            }
            RamBody::Compressed(z) => {
                let z = &z[..z.len().min(u32::MAX as usize)];
                out.put_be32(z.len() as u32);
                out.put(z);
            }
            RamBody::MemSize(list) => out.put(list.raw()),
            RamBody::Eos | RamBody::MultifdFlush | RamBody::Hook => {}
        }
    }
}
