//! Page bitmaps: the destination's received bitmap and the source's dirty bitmap, and their
//! wire form in `MIG_RP_MSG_RECV_BITMAP`.
//!
//! This module owns the bit layout. On the wire a bitmap is explicit little-endian bytes,
//! independent of the host's word size and byte order: page `i` is bit `i % 8` of byte `i / 8`
//! (`BITMAP-LE`), and the byte count is `round_up(ceil(pages / 8), 8)` ([`PageBitmap::wire_size`]).
//! Bits past the last page are padding.
//!
//! Padding policy: **strict**. QEMU never sets padding bits (pages past a block's length are
//! never received), so [`PageBitmap::from_le_bytes`] rejects a set padding bit with
//! `BITMAP-PADDING`; [`PageBitmap::from_le_bytes_masked`] is the lenient variant that drops
//! them, for callers that prefer QEMU's own behaviour (it copies and ignores them).
//!
//! [`PageBitmap`] (feature `alloc`) owns its words; [`BitmapView`] reads wire bytes in place.

use crate::error::Violation;
use crate::rule::Rule;
#[cfg(feature = "alloc")]
use crate::sink::Sink;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

/// Byte size of the wire form of a bitmap of `pages` pages: `round_up(ceil(pages / 8), 8)`.
#[inline]
pub const fn wire_size(pages: u64) -> u64 {
    pages.div_ceil(8).div_ceil(8) * 8
}

/// Checks that no bit at or past `pages` is set in the wire bytes `bytes` (which are at least
/// `ceil(pages / 8)` long); the error names the first offending byte.
fn check_padding(bytes: &[u8], pages: u64, offset: u64) -> Result<(), Violation> {
    let full = (pages / 8) as usize;
    let part = (pages % 8) as u32;
    let mut from = full;
    if part != 0 {
        if let Some(&b) = bytes.get(full) {
            if b >> part != 0 {
                return Err(Violation::new(
                    offset + full as u64,
                    Rule::BitmapPadding,
                    b as u64,
                ));
            }
        }
        from += 1;
    }
    match bytes
        .get(from..)
        .and_then(|t| t.iter().position(|&b| b != 0))
    {
        Some(i) => Err(Violation::new(
            offset + (from + i) as u64,
            Rule::BitmapPadding,
            bytes[from + i] as u64,
        )),
        None => Ok(()),
    }
}

/// A read-only view of a bitmap's wire bytes (little-endian), without copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapView<'a> {
    bytes: &'a [u8],
    pages: u64,
}

impl<'a> BitmapView<'a> {
    /// A view of `pages` pages over wire bytes. `bytes` must be exactly
    /// [`wire_size(pages)`](wire_size) long (`RP-BITMAP-SIZE`) and have no padding bit set
    /// (`BITMAP-PADDING`); errors name `offset` (the absolute offset of `bytes[0]`) plus the
    /// offending byte.
    pub fn new(bytes: &'a [u8], pages: u64, offset: u64) -> Result<Self, Violation> {
        if bytes.len() as u64 != wire_size(pages) {
            return Err(Violation::new(
                offset,
                Rule::RpBitmapSize,
                bytes.len() as u64,
            ));
        }
        check_padding(bytes, pages, offset)?;
        Ok(BitmapView { bytes, pages })
    }

    /// Number of pages.
    #[inline]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The wire bytes.
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Whether page `i` is set (`false` past the end).
    #[inline]
    pub fn test(&self, i: u64) -> bool {
        i < self.pages && self.bytes[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Number of set pages.
    pub fn count_ones(&self) -> u64 {
        self.bytes.iter().map(|b| b.count_ones() as u64).sum()
    }

    /// The set pages in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + 'a {
        let bytes = self.bytes;
        bytes.iter().enumerate().flat_map(|(i, &b)| {
            (0..8u64)
                .filter(move |k| b & (1 << k) != 0)
                .map(move |k| i as u64 * 8 + k)
        })
    }
}

/// An owned bitmap of `pages` pages, stored as `u64` words (bit `i % 64` of word `i / 64`).
/// Bits past `pages` are kept clear by every operation. Operations on pages past the end are
/// ignored (`test` answers `false`): nothing here panics.
#[cfg(feature = "alloc")]
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

#[cfg(feature = "alloc")]
impl core::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "PageBitmap({} pages, {} set)",
            self.pages,
            self.count_ones()
        )
    }
}

#[cfg(feature = "alloc")]
impl PageBitmap {
    /// Byte size of the wire form for `pages` pages (see [`wire_size`]).
    #[inline]
    pub const fn wire_size(pages: u64) -> u64 {
        wire_size(pages)
    }

    /// An all-clear bitmap of `pages` pages. The caller bounds `pages` (for instance by
    /// `Limits::max_block_bytes / TPS`): this allocates `pages / 8` bytes.
    pub fn new(pages: u64) -> Self {
        PageBitmap {
            pages,
            words: alloc::vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// An all-set bitmap of `pages` pages.
    pub fn full(pages: u64) -> Self {
        let mut b = PageBitmap::new(pages);
        b.set_range(0, pages);
        b
    }

    /// Number of pages.
    #[inline]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words (bit `i % 64` of word `i / 64`), padding bits clear.
    #[inline]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets page `i`.
    #[inline]
    pub fn set(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears page `i`.
    #[inline]
    pub fn clear(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Whether page `i` is set.
    #[inline]
    pub fn test(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn range(&mut self, start: u64, len: u64, set: bool) {
        let end = start.saturating_add(len).min(self.pages);
        let mut i = start;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let hi = (end - (i - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if set {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i = i - lo + 64;
        }
    }

    /// Sets pages `start .. start + len` (clipped to the bitmap).
    pub fn set_range(&mut self, start: u64, len: u64) {
        self.range(start, len, true);
    }

    /// Clears pages `start .. start + len` (clipped to the bitmap).
    pub fn clear_range(&mut self, start: u64, len: u64) {
        self.range(start, len, false);
    }

    /// Number of set pages.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Whether every page is set.
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.pages
    }

    /// The set pages, in increasing order.
    pub fn iter_ones(&self) -> impl Iterator<Item = u64> + '_ {
        BitIter {
            words: &self.words,
            idx: 0,
            cur: self.words.first().copied().unwrap_or(0),
            invert: false,
            pages: self.pages,
        }
    }

    /// The first set page at or after `from`, scanning whole words.
    pub fn next_one(&self, from: u64) -> Option<u64> {
        self.next(from, false)
    }

    /// The first clear page at or after `from`, scanning whole words.
    pub fn next_zero(&self, from: u64) -> Option<u64> {
        self.next(from, true)
    }

    fn next(&self, from: u64, invert: bool) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let flip = |w: u64| if invert { !w } else { w };
        let mut w = (from / 64) as usize;
        let mut bits = flip(*self.words.get(w)?) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let p = w as u64 * 64 + bits.trailing_zeros() as u64;
                return (p < self.pages).then_some(p);
            }
            w += 1;
            bits = flip(*self.words.get(w)?);
        }
    }

    /// The clear pages, in increasing order.
    pub fn iter_zeros(&self) -> impl Iterator<Item = u64> + '_ {
        BitIter {
            words: &self.words,
            idx: 0,
            cur: !self.words.first().copied().unwrap_or(0),
            invert: true,
            pages: self.pages,
        }
    }

    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Inverts every page (received → still dirty), keeping padding clear.
    pub fn complement(&mut self) {
        for w in &mut self.words {
            *w = !*w;
        }
        self.mask_tail();
    }

    /// Clears every page set in `other` (`self & !other`), over the common pages.
    pub fn and_not(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !*b;
        }
        self.mask_tail();
    }

    /// Sets every page set in `other` (`self | other`), over the common pages.
    pub fn or(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.mask_tail();
    }

    /// Writes the wire form: [`wire_size(pages)`](wire_size) bytes, little-endian words.
    pub fn to_le_bytes(&self, out: &mut impl Sink) {
        let size = wire_size(self.pages) as usize;
        let mut left = size;
        for w in &self.words {
            let b = w.to_le_bytes();
            let n = left.min(8);
            out.put(&b[..n]);
            left -= n;
        }
    }

    /// The wire form as a vector.
    pub fn to_le_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(wire_size(self.pages) as usize);
        self.to_le_bytes(&mut v);
        v
    }

    /// Reads the wire form of a bitmap of `pages` pages. `bytes` must be exactly
    /// [`wire_size(pages)`](wire_size) long (`RP-BITMAP-SIZE`, named at `offset`) and have
    /// every padding bit clear (`BITMAP-PADDING`, named at the offending byte); `offset` is the
    /// absolute channel offset of `bytes[0]`. Nothing is allocated before the size check.
    pub fn from_le_bytes(bytes: &[u8], pages: u64, offset: u64) -> Result<Self, Violation> {
        if bytes.len() as u64 != wire_size(pages) {
            return Err(Violation::new(
                offset,
                Rule::RpBitmapSize,
                bytes.len() as u64,
            ));
        }
        check_padding(bytes, pages, offset)?;
        Ok(Self::from_checked(bytes, pages))
    }

    /// Like [`from_le_bytes`](Self::from_le_bytes) but padding bits are dropped instead of
    /// rejected (what QEMU does).
    pub fn from_le_bytes_masked(bytes: &[u8], pages: u64, offset: u64) -> Result<Self, Violation> {
        if bytes.len() as u64 != wire_size(pages) {
            return Err(Violation::new(
                offset,
                Rule::RpBitmapSize,
                bytes.len() as u64,
            ));
        }
        let mut b = Self::from_checked(bytes, pages);
        b.mask_tail();
        Ok(b)
    }

    fn from_checked(bytes: &[u8], pages: u64) -> Self {
        let mut words: Vec<u64> = bytes
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        words.truncate(pages.div_ceil(64) as usize);
        let mut b = PageBitmap { pages, words };
        b.mask_tail();
        b
    }
}

#[cfg(feature = "alloc")]
struct BitIter<'a> {
    words: &'a [u64],
    idx: usize,
    cur: u64,
    invert: bool,
    pages: u64,
}

#[cfg(feature = "alloc")]
impl Iterator for BitIter<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        loop {
            if self.cur != 0 {
                let bit = self.cur.trailing_zeros() as u64;
                self.cur &= self.cur - 1;
                let i = self.idx as u64 * 64 + bit;
                return if i < self.pages { Some(i) } else { None };
            }
            self.idx += 1;
            let w = *self.words.get(self.idx)?;
            self.cur = if self.invert { !w } else { w };
        }
    }
}
