//! How a source encodes each RAM page it sends: plain, zero, XBZRLE delta or zlib page.
//!
//! This module owns [`PageCaps`] (the page-encoding capabilities of a source: `xbzrle` with its
//! cache size, 7.2's `compress` with its level, `x-ignore-shared`), [`XbzrleCache`] (the page
//! cache of previously sent pages) and [`PageCodec`], which picks the record body for one page
//! with QEMU's sender rules:
//!
//! * a zero page is a `ZERO` record, and with XBZRLE started it also enters the cache as zeros;
//! * XBZRLE starts after the first complete round over the RAM blocks (never in postcopy): a
//!   page not in the cache is inserted (unless its slot holds a page of the last two
//!   generations) and sent whole; a cached page is delta-encoded against the cached copy: an
//!   unchanged page is not sent at all, a delta that overflows one target page is replaced by
//!   the whole page, else an `XBZRLE` record; the cache then holds what was sent; during the
//!   final stage (precopy completion) the cache is no longer updated;
//! * `compress` (7.2 only, precopy only): a non-zero page of the block the previous record
//!   named becomes a `COMPRESS_PAGE` zlib record (the first page after a block change goes
//!   plain, as QEMU's sender flushes its compression threads there);
//! * pages under XBZRLE are sent from a copy taken before encoding, so the delta base at the
//!   destination is exactly the cache contents even if the guest writes the page meanwhile.

use alloc::vec;
use alloc::vec::Vec;

use crate::ram::xbzrle_encode;

/// Pages of the last this many dirty-sync generations are not evicted from the cache by a
/// different page mapping to the same slot.
const CACHED_PAGE_LIFETIME: u64 = 2;

/// The page-encoding capabilities of a source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageCaps {
    /// `xbzrle`: the cache size in bytes (`xbzrle-cache-size`), `None`: off.
    pub xbzrle_cache_size: Option<u64>,
    /// `compress` (7.2 only): the zlib level (`compress-level`, 0..=9), `None`: off.
    pub compress_level: Option<u8>,
    /// `x-ignore-shared`: MEM_SIZE entries carry each block's `mr->addr`, and the capability is
    /// listed in the configuration section. Shared blocks would not be sent; a source whose
    /// RAM is all private sends every block.
    pub ignore_shared: bool,
}

/// Why a cache size is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSizeError {
    /// Smaller than one target page.
    TooSmall,
    /// Not a power of two (bytes), so not a power-of-two number of pages.
    NotPowerOfTwo,
}

/// Checks an `xbzrle-cache-size` value as QEMU does: at least one target page and a power of
/// two.
pub fn check_cache_size(bytes: u64, target_page_size: u64) -> Result<(), CacheSizeError> {
    if bytes < target_page_size {
        Err(CacheSizeError::TooSmall)
    } else if !bytes.is_power_of_two() {
        Err(CacheSizeError::NotPowerOfTwo)
    } else {
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Slot {
    addr: u64,
    age: u64,
    data: Vec<u8>,
}

/// A direct-mapped cache of sent pages, keyed by RAM address (the block's offset in the RAM
/// list plus the page's offset): slot = (address / page size) mod slots, slots a power of two.
/// A slot's page buffer is allocated when first used.
#[derive(Clone, Debug)]
pub struct XbzrleCache {
    page: usize,
    slots: Vec<Option<Slot>>,
}

impl XbzrleCache {
    /// A cache of `bytes` (rounded down to a power-of-two number of pages of `page` bytes, at
    /// least one).
    pub fn new(bytes: u64, page: usize) -> Self {
        let n = (bytes / page.max(1) as u64).max(1);
        let n = 1u64 << (63 - n.leading_zeros());
        XbzrleCache {
            page,
            slots: vec![None; n as usize],
        }
    }

    /// Number of page slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    fn pos(&self, addr: u64) -> usize {
        ((addr / self.page as u64) as usize) & (self.slots.len() - 1)
    }

    /// Whether `addr` is cached; a hit refreshes the page's generation to `age`.
    pub fn is_cached(&mut self, addr: u64, age: u64) -> bool {
        let pos = self.pos(addr);
        match &mut self.slots[pos] {
            Some(s) if s.addr == addr => {
                s.age = age;
                true
            }
            _ => false,
        }
    }

    /// Stores `data` for `addr`, unless the slot holds another page of a recent generation.
    /// Returns whether it was stored.
    pub fn insert(&mut self, addr: u64, data: &[u8], age: u64) -> bool {
        let pos = self.pos(addr);
        let page = self.page;
        match &mut self.slots[pos] {
            Some(s) if s.addr != addr && s.age + CACHED_PAGE_LIFETIME > age => false,
            Some(s) => {
                s.addr = addr;
                s.age = age;
                s.data.copy_from_slice(&data[..page]);
                true
            }
            empty => {
                *empty = Some(Slot {
                    addr,
                    age,
                    data: data[..page].to_vec(),
                });
                true
            }
        }
    }

    /// The cached copy of `addr`, if cached.
    pub fn get(&self, addr: u64) -> Option<&[u8]> {
        match &self.slots[self.pos(addr)] {
            Some(s) if s.addr == addr => Some(&s.data),
            _ => None,
        }
    }

    fn get_mut(&mut self, addr: u64) -> Option<&mut Vec<u8>> {
        let pos = self.pos(addr);
        match &mut self.slots[pos] {
            Some(s) if s.addr == addr => Some(&mut s.data),
            _ => None,
        }
    }
}

/// The body [`PageCodec::encode`] chose; the bytes are in [`PageCodec::buf`] unless noted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageChoice {
    /// A zero page.
    Zero,
    /// The page as the caller passed it.
    Page,
    /// The page as copied into [`PageCodec::buf`] (the bytes the cache now holds).
    PageCopy,
    /// An XBZRLE delta in [`PageCodec::buf`].
    Xbzrle,
    /// A zlib stream in [`PageCodec::buf`].
    Compressed,
    /// Nothing to send: the page equals its cached copy.
    Skip,
}

/// Where a page is sent from, for [`PageCodec::encode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCtx {
    /// The RAM address (block offset in the RAM list + page offset): the cache key.
    pub addr: u64,
    /// The previous record named the same block (the record will carry CONTINUE).
    pub same_block: bool,
    /// Precopy completion: the cache is no longer updated.
    pub last_stage: bool,
    /// The postcopy phase: neither XBZRLE nor compression.
    pub postcopy: bool,
}

/// Per-page encoding choice with its buffers. See the module documentation.
#[derive(Clone, Debug)]
pub struct PageCodec {
    caps: PageCaps,
    cache: Option<XbzrleCache>,
    started: bool,
    generation: u64,
    buf: Vec<u8>,
    copy: Vec<u8>,
    /// XBZRLE records sent.
    pub xbzrle_pages: u64,
    /// Pages skipped as unchanged since their cached copy.
    pub xbzrle_skipped: u64,
    /// XBZRLE overflows (sent whole).
    pub xbzrle_overflows: u64,
    /// XBZRLE cache misses.
    pub xbzrle_misses: u64,
    /// Compressed pages sent.
    pub compressed_pages: u64,
}

impl PageCodec {
    /// A codec for pages of `page` bytes.
    pub fn new(caps: PageCaps, page: usize) -> Self {
        PageCodec {
            cache: caps.xbzrle_cache_size.map(|b| XbzrleCache::new(b, page)),
            caps,
            started: false,
            generation: 0,
            buf: Vec::new(),
            copy: Vec::new(),
            xbzrle_pages: 0,
            xbzrle_skipped: 0,
            xbzrle_overflows: 0,
            xbzrle_misses: 0,
            compressed_pages: 0,
        }
    }

    /// The capabilities.
    pub fn caps(&self) -> &PageCaps {
        &self.caps
    }

    /// The background scan completed a round over every block: XBZRLE starts (if on).
    pub fn round_complete(&mut self) {
        self.started = self.cache.is_some();
    }

    /// Whether XBZRLE has started.
    pub fn xbzrle_started(&self) -> bool {
        self.started
    }

    /// A dirty-bitmap sync: the cache's generation advances.
    pub fn dirty_sync(&mut self) {
        self.generation += 1;
    }

    /// The bytes of the last [`PageChoice::PageCopy`], [`PageChoice::Xbzrle`] or
    /// [`PageChoice::Compressed`].
    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    /// Chooses the body for `data` (one target page, `is_zero`: all zero bytes).
    pub fn encode(&mut self, data: &[u8], is_zero: bool, ctx: PageCtx) -> PageChoice {
        let age = self.generation;
        if let Some(level) = self.caps.compress_level {
            if !self.started && !ctx.postcopy && ctx.same_block && !is_zero {
                return self.compress(data, level);
            }
        }
        if is_zero {
            if self.started {
                if let Some(c) = self.cache.as_mut() {
                    self.copy.clear();
                    self.copy.resize(data.len(), 0);
                    c.insert(ctx.addr, &self.copy, age);
                }
            }
            return PageChoice::Zero;
        }
        let Some(cache) = self
            .cache
            .as_mut()
            .filter(|_| self.started && !ctx.postcopy)
        else {
            return PageChoice::Page;
        };
        // One copy of the page: the guest may write it while it is encoded and sent.
        self.copy.clear();
        self.copy.extend_from_slice(data);
        if !cache.is_cached(ctx.addr, age) {
            self.xbzrle_misses += 1;
            if !ctx.last_stage {
                cache.insert(ctx.addr, &self.copy, age);
            }
            core::mem::swap(&mut self.buf, &mut self.copy);
            return PageChoice::PageCopy;
        }
        let Some(old) = cache.get_mut(ctx.addr) else {
            return PageChoice::Page;
        };
        self.buf.clear();
        let n = xbzrle_encode(old, &self.copy, self.copy.len(), &mut self.buf);
        if n != Some(0) && !ctx.last_stage {
            old.copy_from_slice(&self.copy);
        }
        match n {
            Some(0) => {
                self.xbzrle_skipped += 1;
                PageChoice::Skip
            }
            Some(_) => {
                self.xbzrle_pages += 1;
                PageChoice::Xbzrle
            }
            None => {
                self.xbzrle_overflows += 1;
                core::mem::swap(&mut self.buf, &mut self.copy);
                PageChoice::PageCopy
            }
        }
    }

    #[cfg(feature = "compress")]
    fn compress(&mut self, data: &[u8], level: u8) -> PageChoice {
        self.buf = crate::ram::compress_page_encode(data, level);
        self.compressed_pages += 1;
        PageChoice::Compressed
    }

    #[cfg(not(feature = "compress"))]
    fn compress(&mut self, _data: &[u8], _level: u8) -> PageChoice {
        // Without the `compress` feature there is no deflate: pages go plain.
        PageChoice::Page
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::xbzrle_apply;

    const P: usize = 4096;

    fn ctx(addr: u64) -> PageCtx {
        PageCtx {
            addr,
            same_block: true,
            last_stage: false,
            postcopy: false,
        }
    }

    #[test]
    fn cache_slots_are_a_power_of_two_and_recent_pages_stay() {
        let mut c = XbzrleCache::new(3 * P as u64, P);
        assert_eq!(c.slots(), 2);
        let a = [1u8; P];
        assert!(c.insert(0, &a, 5));
        // Address 2*P maps to the same slot: refused while page 0 is of a recent generation.
        assert!(!c.insert(2 * P as u64, &a, 6));
        assert!(c.insert(2 * P as u64, &a, 7));
        assert!(!c.is_cached(0, 7));
        assert!(c.is_cached(2 * P as u64, 7));
        assert_eq!(
            check_cache_size(P as u64 - 1, P as u64),
            Err(CacheSizeError::TooSmall)
        );
        assert_eq!(
            check_cache_size(3 * P as u64, P as u64),
            Err(CacheSizeError::NotPowerOfTwo)
        );
        assert_eq!(check_cache_size(1 << 26, P as u64), Ok(()));
    }

    #[test]
    fn xbzrle_starts_after_a_round_then_miss_delta_skip_overflow() {
        let caps = PageCaps {
            xbzrle_cache_size: Some(1 << 20),
            ..PageCaps::default()
        };
        let mut c = PageCodec::new(caps, P);
        let mut page = [7u8; P];
        // First round: plain pages, nothing cached.
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::Page);
        c.round_complete();
        c.dirty_sync();
        // Miss: inserted, sent whole from the copy.
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::PageCopy);
        assert_eq!(c.buf(), &page[..]);
        // Small change: a delta that rebuilds the page.
        page[100] = 9;
        page[3000..3010].fill(1);
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::Xbzrle);
        let mut at_dst = [7u8; P];
        xbzrle_apply(c.buf(), &mut at_dst, 0).unwrap();
        assert_eq!(at_dst, page);
        assert_eq!(
            c.buf(),
            &[100, 1, 9, 0xd3, 0x16, 10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
        );
        // Unchanged: skipped.
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::Skip);
        // Every other byte changed: overflow, sent whole, and the cache follows.
        for (i, b) in page.iter_mut().enumerate() {
            if i % 2 == 0 {
                *b = 0xaa;
            }
        }
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::PageCopy);
        assert_eq!(c.buf(), &page[..]);
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::Skip);
        // Postcopy: plain pages.
        let pc = PageCtx {
            postcopy: true,
            ..ctx(0)
        };
        page[0] = 1;
        assert_eq!(c.encode(&page, false, pc), PageChoice::Page);
        assert_eq!(
            (
                c.xbzrle_pages,
                c.xbzrle_skipped,
                c.xbzrle_overflows,
                c.xbzrle_misses
            ),
            (1, 2, 1, 1)
        );
    }

    #[test]
    fn a_zero_page_enters_the_cache_once_started() {
        let caps = PageCaps {
            xbzrle_cache_size: Some(1 << 16),
            ..PageCaps::default()
        };
        let mut c = PageCodec::new(caps, P);
        c.round_complete();
        assert_eq!(c.encode(&[0u8; P], true, ctx(P as u64)), PageChoice::Zero);
        let mut page = [0u8; P];
        page[5] = 1;
        assert_eq!(c.encode(&page, false, ctx(P as u64)), PageChoice::Xbzrle);
        assert_eq!(c.buf(), &[5, 1, 1]);
    }

    #[test]
    fn last_stage_does_not_update_the_cache() {
        let caps = PageCaps {
            xbzrle_cache_size: Some(1 << 16),
            ..PageCaps::default()
        };
        let mut c = PageCodec::new(caps, P);
        c.round_complete();
        let last = PageCtx {
            last_stage: true,
            ..ctx(0)
        };
        assert_eq!(c.encode(&[1u8; P], false, last), PageChoice::PageCopy);
        assert_eq!(c.encode(&[1u8; P], false, last), PageChoice::PageCopy);
        assert_eq!(c.encode(&[1u8; P], false, ctx(0)), PageChoice::PageCopy);
        let mut page = [1u8; P];
        page[0] = 2;
        assert_eq!(c.encode(&page, false, last), PageChoice::Xbzrle);
        assert_eq!(c.encode(&page, false, last), PageChoice::Xbzrle);
    }

    #[cfg(feature = "compress")]
    #[test]
    fn compress_only_within_a_block_and_not_zero_pages() {
        let caps = PageCaps {
            compress_level: Some(1),
            ..PageCaps::default()
        };
        let mut c = PageCodec::new(caps, P);
        let page = [3u8; P];
        let other = PageCtx {
            same_block: false,
            ..ctx(0)
        };
        assert_eq!(c.encode(&page, false, other), PageChoice::Page);
        assert_eq!(c.encode(&[0u8; P], true, ctx(0)), PageChoice::Zero);
        assert_eq!(c.encode(&page, false, ctx(0)), PageChoice::Compressed);
        let mut back = [0u8; P];
        crate::ram::compress_page_decode(c.buf(), &mut back, 0).unwrap();
        assert_eq!(back, page);
    }
}
