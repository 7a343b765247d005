//! Guest RAM: one anonymous private mapping per RAM block.
//!
//! This module owns the mappings that stand for a guest's memory on either side of a migration:
//! [`GuestRam`] is a list of [`RamBlock`]s (name, length, 4 KiB target pages), each backed by one
//! anonymous `memmap2` mapping. Every accessor checks offset and length against the block and
//! returns a typed [`MemError`] instead of touching memory outside the mapping.
//!
//! Guest memory is shared memory in the QEMU sense: workload threads, the fault path (the kernel
//! placing pages through userfaultfd) and the migration driver all reach it at once. Access is
//! therefore through raw pointers (`&self` methods copying bytes in or out); a reader that races
//! a writer may see a torn page, which is exactly what dirty tracking exists to catch. Nothing here
//! hands out a Rust reference into guest memory.
//!
//! On a destination whose blocks are registered with userfaultfd (see [`crate::uffd`]), reading a
//! page that has not been placed yet blocks in the kernel until it is: do not call
//! [`RamBlock::snapshot`] or [`RamBlock::sha256`] there before every page is placed or the range is
//! unregistered.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};
use sha2::{Digest, Sha256};

/// Target page size of every block (QEMU's `TARGET_PAGE_SIZE` on x86).
pub const PAGE_SIZE: usize = 4096;

/// Errors of guest-memory accessors.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The range `[offset, offset + len)` is not inside the block.
    #[error("range {offset:#x}+{len:#x} outside block {block:?} of {block_len:#x} bytes")]
    OutOfRange {
        /// Block name.
        block: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Length of the block.
        block_len: u64,
    },
    /// An offset or length that must be page aligned is not.
    #[error("offset {offset:#x} / length {len:#x} not aligned to {PAGE_SIZE} in block {block:?}")]
    Unaligned {
        /// Block name.
        block: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// No block has this name or index.
    #[error("unknown RAM block {0:?}")]
    UnknownBlock(String),
    /// A block spec is unusable (zero or unaligned length, duplicate name).
    #[error("bad block spec {name:?}: {why}")]
    BadSpec {
        /// Block name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// mmap/madvise/file I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How to map a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapOptions {
    /// Map with `MAP_NORESERVE` (no swap reservation for the whole length).
    pub no_reserve: bool,
    /// Allow transparent huge pages. Off by default: userfaultfd placement and write-protect
    /// dirty tracking both work at 4 KiB granularity, and a THP would make one write dirty 2 MiB.
    pub transparent_huge: bool,
}

impl Default for MapOptions {
    fn default() -> Self {
        Self {
            no_reserve: true,
            transparent_huge: false,
        }
    }
}

/// One RAM block: a named anonymous mapping of `len` bytes (a multiple of [`PAGE_SIZE`]).
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    map: MmapRaw,
}

impl RamBlock {
    /// Maps a new zero-filled block. `len` must be a non-zero multiple of [`PAGE_SIZE`].
    pub fn new(name: &str, len: u64, opts: MapOptions) -> Result<Self, MemError> {
        let bad = |why| MemError::BadSpec {
            name: name.to_owned(),
            why,
        };
        if len == 0 {
            return Err(bad("zero length"));
        }
        if len % PAGE_SIZE as u64 != 0 {
            return Err(bad("length not a multiple of the page size"));
        }
        let len_usize = usize::try_from(len).map_err(|_| bad("length does not fit in usize"))?;
        let mut o = MmapOptions::new();
        o.len(len_usize);
        if opts.no_reserve {
            o.no_reserve_swap();
        }
        let map: MmapRaw = o
            .map_anon()
            .map_err(|source| MemError::Io {
                what: "mmap anonymous block",
                source,
            })?
            .into();
        let advice = if opts.transparent_huge {
            Advice::HugePage
        } else {
            Advice::NoHugePage
        };
        // THP advice is best effort: kernels without THP reject it, and that is fine.
        let _ = map.advise(advice);
        Ok(Self {
            name: name.to_owned(),
            map,
        })
    }

    /// Block name (QEMU's RAMBlock idstr, e.g. `pc.ram`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Always false: blocks have a non-zero length.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Number of [`PAGE_SIZE`] pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }

    /// Page size of the block (always [`PAGE_SIZE`] here).
    pub fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    /// Base address of the mapping, for kernel interfaces (userfaultfd, pagemap).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Checks that `[offset, offset + len)` lies inside the block; returns `offset` as usize.
    pub fn check(&self, offset: u64, len: u64) -> Result<usize, MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(offset as usize),
            _ => Err(MemError::OutOfRange {
                block: self.name.clone(),
                offset,
                len,
                block_len: self.len(),
            }),
        }
    }

    /// Like [`check`](Self::check), and also requires page alignment of offset and length.
    pub fn check_pages(&self, offset: u64, len: u64) -> Result<usize, MemError> {
        let at = self.check(offset, len)?;
        if offset % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE as u64 != 0 {
            return Err(MemError::Unaligned {
                block: self.name.clone(),
                offset,
                len,
            });
        }
        Ok(at)
    }

    /// Copies `out.len()` bytes at `offset` out of guest memory.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), MemError> {
        let at = self.check(offset, out.len() as u64)?;
        // SAFETY: `check` proved [at, at+len) is inside the live mapping; `out` is a distinct
        // Rust buffer, so the regions cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(at), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Copies `data` into guest memory at `offset` (a plain store: on a userfaultfd-registered
    /// destination use [`crate::uffd::UffdRam::place`] instead).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        let at = self.check(offset, data.len() as u64)?;
        // SAFETY: `check` proved the destination range is inside the mapping, which is writable;
        // `data` is a Rust slice and cannot overlap guest memory handed out by this module.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(at), data.len()) };
        Ok(())
    }

    /// Reads the page at page-aligned `offset`.
    pub fn read_page(&self, offset: u64) -> Result<[u8; PAGE_SIZE], MemError> {
        self.check_pages(offset, PAGE_SIZE as u64)?;
        let mut page = [0u8; PAGE_SIZE];
        self.read(offset, &mut page)?;
        Ok(page)
    }

    /// A copy of the whole block.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.map.len()];
        // Cannot fail: the range is the whole block.
        let _ = self.read(0, &mut v);
        v
    }

    /// SHA-256 of the whole block, read page by page (no full copy).
    pub fn sha256(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < self.len() {
            let n = chunk.len().min((self.len() - off) as usize);
            let _ = self.read(off, &mut chunk[..n]);
            h.update(&chunk[..n]);
            off += n as u64;
        }
        h.finalize().into()
    }

    /// Writes the whole block, raw, to `path` (like QEMU's `pmemsave` of the block).
    pub fn dump(&self, path: &Path) -> Result<(), MemError> {
        let io = |what| move |source| MemError::Io { what, source };
        let mut f = File::create(path).map_err(io("create dump file"))?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < self.len() {
            let n = chunk.len().min((self.len() - off) as usize);
            self.read(off, &mut chunk[..n])?;
            f.write_all(&chunk[..n]).map_err(io("write dump file"))?;
            off += n as u64;
        }
        f.sync_all().map_err(io("sync dump file"))
    }

    /// Drops the pages of `[offset, offset + len)` (`MADV_DONTNEED`): they read as zero again,
    /// or, on a userfaultfd-registered range, fault again.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), MemError> {
        let at = self.check_pages(offset, len)?;
        // SAFETY: MADV_DONTNEED on a private anonymous mapping only replaces the range's contents
        // with zero-fill-on-demand (or missing, under userfaultfd); no Rust reference into guest
        // memory exists (this module never hands one out), so nothing observes freed memory.
        unsafe {
            self.map
                .unchecked_advise_range(UncheckedAdvice::DontNeed, at, len as usize)
        }
        .map_err(|source| MemError::Io {
            what: "madvise(MADV_DONTNEED)",
            source,
        })
    }
}

/// A guest's RAM: its blocks in migration order.
#[derive(Debug, Default)]
pub struct GuestRam {
    blocks: Vec<RamBlock>,
}

impl GuestRam {
    /// Maps one block per `(name, length)`; names must be unique.
    pub fn new(specs: &[(&str, u64)], opts: MapOptions) -> Result<Self, MemError> {
        let mut blocks: Vec<RamBlock> = Vec::with_capacity(specs.len());
        for &(name, len) in specs {
            if blocks.iter().any(|b| b.name == name) {
                return Err(MemError::BadSpec {
                    name: name.to_owned(),
                    why: "duplicate block name",
                });
            }
            blocks.push(RamBlock::new(name, len, opts)?);
        }
        Ok(Self { blocks })
    }

    /// The blocks, in order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Block by index.
    pub fn block(&self, index: usize) -> Result<&RamBlock, MemError> {
        self.blocks
            .get(index)
            .ok_or_else(|| MemError::UnknownBlock(format!("#{index}")))
    }

    /// Index and block for a name as it appears on the wire (bytes, not necessarily UTF-8).
    pub fn by_name(&self, name: &[u8]) -> Result<(usize, &RamBlock), MemError> {
        self.blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.name.as_bytes() == name)
            .ok_or_else(|| MemError::UnknownBlock(String::from_utf8_lossy(name).into_owned()))
    }

    /// Which block (index) contains host address `addr`, and the offset in it.
    pub fn locate(&self, addr: usize) -> Option<(usize, u64)> {
        self.blocks.iter().enumerate().find_map(|(i, b)| {
            let base = b.as_ptr() as usize;
            (addr >= base && addr < base + b.map.len()).then(|| (i, (addr - base) as u64))
        })
    }

    /// Total bytes over all blocks.
    pub fn total_len(&self) -> u64 {
        self.blocks.iter().map(RamBlock::len).sum()
    }

    /// SHA-256 of each block, in order.
    pub fn sha256(&self) -> Vec<[u8; 32]> {
        self.blocks.iter().map(RamBlock::sha256).collect()
    }
}

/// Lower-case hex of a digest (for logs and reports).
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
