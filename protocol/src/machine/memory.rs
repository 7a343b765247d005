//! The traits through which the machines touch guest memory, and the RAM block description.
//!
//! This module owns [`RamBlockSpec`] (what a side knows about one RAM block), [`GuestMemory`]
//! (the destination's placement operations: the binary implements them with `UFFDIO_COPY`,
//! `UFFDIO_ZEROPAGE` and `MADV_DONTNEED`; tests with a `Vec<u8>`), and [`SourceMemory`] (the
//! source's read access to a page). Page data goes from the caller's input buffer straight to
//! [`GuestMemory::place_page`]: the machines never copy a page.

use alloc::string::String;

/// One RAM block as both sides configure it: QEMU's RAMBlock idstr, used length, page size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlockSpec {
    /// The block's idstr as on the wire (`ram`, `pc.ram`, `microvm.ram`, ...), 1..=255 bytes.
    pub name: String,
    /// Used length in bytes: a multiple of the target page size.
    pub len: u64,
    /// The block's (host) page size in bytes; equal to the target page size for ordinary RAM.
    pub page_size: u64,
}

impl RamBlockSpec {
    /// A block of `len` bytes with pages of `page_size` bytes.
    pub fn new(name: &str, len: u64, page_size: u64) -> Self {
        RamBlockSpec {
            name: String::from(name),
            len,
            page_size,
        }
    }

    /// Number of target pages of `tps` bytes in the block.
    pub fn pages(&self, tps: u64) -> u64 {
        self.len.div_ceil(tps.max(1))
    }
}

/// A placement the memory backend could not do (the binary maps its errno here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryError {
    /// The backend's error code (an errno for the reference binaries).
    pub code: i32,
}

impl core::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "memory backend error {}", self.code)
    }
}

/// The destination's guest memory.
///
/// `block` is the index of the block in the destination's configured block list; `offset` is a
/// byte offset in the block, aligned to the target page size and inside the block. In postcopy
/// (after POSTCOPY_LISTEN) the machine calls `place_page`/`place_zero` with whole host pages
/// (for ordinary blocks: one target page) and never twice for the same page; before it
/// (precopy) with single target pages, possibly again for a page sent again.
pub trait GuestMemory {
    /// Places `data` at `offset` (atomically for a host page: `UFFDIO_COPY`).
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError>;
    /// Places `len` zero bytes at `offset` (`UFFDIO_ZEROPAGE`).
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError>;
    /// Drops `len` bytes at `offset` so that the next access faults (`MADV_DONTNEED`): used by
    /// ADVISE (whole blocks) and POSTCOPY_RAM_DISCARD.
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError>;
    /// Copies the current target page at `offset` into `out` (one target page long), for
    /// precopy XBZRLE deltas, which apply to the page as received before. Returns `false` if the
    /// backend cannot read its pages; XBZRLE records are then refused (RAM-XBZRLE-BASE).
    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        let _ = (block, offset, out);
        false
    }
}

/// A [`GuestMemory`] that accepts every placement and keeps nothing: for driving a
/// [`Destination`](super::Destination) only to check a stream (decoding, rules, events), as
/// tests and fuzz targets do. It cannot read pages back, so XBZRLE records are refused
/// (RAM-XBZRLE-BASE).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiscardMemory;

impl GuestMemory for DiscardMemory {
    fn place_page(&mut self, _: usize, _: u64, _: &[u8]) -> Result<(), MemoryError> {
        Ok(())
    }
    fn place_zero(&mut self, _: usize, _: u64, _: u64) -> Result<(), MemoryError> {
        Ok(())
    }
    fn discard(&mut self, _: usize, _: u64, _: u64) -> Result<(), MemoryError> {
        Ok(())
    }
}

/// The source's read access to guest memory.
pub trait SourceMemory {
    /// The target page at `offset` of `block` (exactly one target page long).
    fn page(&self, block: usize, offset: u64) -> &[u8];
}

impl<M: GuestMemory + ?Sized> GuestMemory for &mut M {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        (**self).place_page(block, offset, data)
    }
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        (**self).place_zero(block, offset, len)
    }
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        (**self).discard(block, offset, len)
    }
    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        (**self).read_page(block, offset, out)
    }
}

impl<M: SourceMemory + ?Sized> SourceMemory for &M {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        (**self).page(block, offset)
    }
}
