//! The MEM_SIZE block list of the RAM section's setup record: validated once at decode time,
//! kept as borrowed bytes, read back with an iterator.

use super::record::RamCtx;
use crate::error::{WireError, WireResult};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// Hard ceiling on the entries of one MEM_SIZE list, whatever `Limits::max_blocks` says: which
/// entries carry a page size is remembered in an inline 1024-bit set (no allocation).
pub const MAX_MEM_SIZE_BLOCKS: u32 = 1024;

const SET_WORDS: usize = MAX_MEM_SIZE_BLOCKS as usize / 64;

/// One entry of a MEM_SIZE list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo<'a> {
    /// The RAMBlock idstr (no NUL).
    pub name: &'a [u8],
    /// The block's `used_length` in bytes.
    pub used_length: u64,
    /// The block's page size, where the entry carries one (postcopy, huge-page blocks).
    pub page_size: Option<u64>,
    /// The block's guest-physical address, with `x-ignore-shared`.
    pub mr_addr: Option<u64>,
}

/// A validated MEM_SIZE block list, borrowed from the input: the entries' lengths sum exactly to
/// the announced total and there are at most the cap of them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MemSizeList<'a> {
    raw: &'a [u8],
    count: u32,
    ignore_shared: bool,
    sized: [u64; SET_WORDS],
}

impl<'a> MemSizeList<'a> {
    /// The list's wire bytes (after the record's header word).
    #[inline]
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Number of entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the list has no entries (a total of 0).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The entries in wire order.
    #[inline]
    pub fn iter(&self) -> MemSizeIter<'a> {
        MemSizeIter {
            r: Reader::new(self.raw, 0),
            idx: 0,
            count: self.count,
            ignore_shared: self.ignore_shared,
            sized: self.sized,
        }
    }
}

impl<'a> IntoIterator for &MemSizeList<'a> {
    type Item = BlockInfo<'a>;
    type IntoIter = MemSizeIter<'a>;
    fn into_iter(self) -> MemSizeIter<'a> {
        self.iter()
    }
}

impl core::fmt::Debug for MemSizeList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Iterator over a [`MemSizeList`].
#[derive(Clone, Debug)]
pub struct MemSizeIter<'a> {
    r: Reader<'a>,
    idx: u32,
    count: u32,
    ignore_shared: bool,
    sized: [u64; SET_WORDS],
}

impl MemSizeIter<'_> {
    /// Offset of the next entry's first byte (its name's length) from the start of the list,
    /// the byte after the record's header word: where a receiver points a violation in it.
    #[inline]
    pub fn offset(&self) -> u64 {
        self.r.offset()
    }
}

impl<'a> Iterator for MemSizeIter<'a> {
    type Item = BlockInfo<'a>;

    fn next(&mut self) -> Option<BlockInfo<'a>> {
        if self.idx >= self.count {
            return None;
        }
        let i = self.idx as usize;
        self.idx += 1;
        // The list was validated when it was decoded, so these reads cannot fail.
        let name = self.r.str8().ok()?;
        let used_length = self.r.be64().ok()?;
        let page_size = if self.sized[i / 64] & (1 << (i % 64)) != 0 {
            Some(self.r.be64().ok()?)
        } else {
            None
        };
        let mr_addr = if self.ignore_shared {
            Some(self.r.be64().ok()?)
        } else {
            None
        };
        Some(BlockInfo {
            name,
            used_length,
            page_size,
            mr_addr,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.count - self.idx) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for MemSizeIter<'_> {}

/// Reads the block list after a MEM_SIZE header word whose address part is `total`.
pub(super) fn decode_mem_size<'a>(
    c: &mut Reader<'a>,
    total: u64,
    ctx: &RamCtx<'_>,
) -> WireResult<MemSizeList<'a>> {
    let start = c.rest();
    let start_pos = c.consumed();
    let cap = ctx.limits.max_blocks.min(MAX_MEM_SIZE_BLOCKS);
    let mut remaining = total;
    let mut count: u32 = 0;
    let mut sized = [0u64; SET_WORDS];
    while remaining > 0 {
        if count >= cap {
            return Err(WireError::invalid(
                c.offset(),
                Rule::RamMemSizeCount,
                count as u64 + 1,
            ));
        }
        let name = c.str8()?;
        let lat = c.offset();
        let len = c.be64()?;
        if len > remaining {
            return Err(WireError::invalid(lat, Rule::RamMemSizeSum, len));
        }
        if ctx.page_size_field.is_some_and(|f| f(name)) {
            c.be64()?;
            sized[count as usize / 64] |= 1 << (count % 64);
        }
        if ctx.ignore_shared {
            c.be64()?;
        }
        remaining -= len;
        count += 1;
    }
    let used = c.consumed() - start_pos;
    Ok(MemSizeList {
        raw: &start[..used],
        count,
        ignore_shared: ctx.ignore_shared,
        sized,
    })
}

/// Writes a MEM_SIZE list body for `blocks` (each entry's optional fields as present in its
/// [`BlockInfo`]). The header word (`total | MEM_SIZE`) is the caller's: total is the sum of the
/// `used_length`s.
pub fn encode_mem_size<'b>(blocks: impl IntoIterator<Item = BlockInfo<'b>>, out: &mut impl Sink) {
    for b in blocks {
        out.put_str8(b.name);
        out.put_be64(b.used_length);
        if let Some(ps) = b.page_size {
            out.put_be64(ps);
        }
        if let Some(a) = b.mr_addr {
            out.put_be64(a);
        }
    }
}
