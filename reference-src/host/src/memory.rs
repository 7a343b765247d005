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
//! [`GuestRam`] implements the protocol machines' `SourceMemory` (page reads) and, for a
//! destination outside userfaultfd (precopy), `GuestMemory` (plain stores).
//!
//! On a destination whose blocks are registered with userfaultfd (see [`crate::uffd`]), reading a
//! page that has not been placed yet blocks in the kernel until it is: do not call
//! [`RamBlock::snapshot`] or [`RamBlock::sha256`] there before every page is placed or the range is
//! unregistered. The thread that resolves faults must never touch such memory through
//! [`RamBlock::read`] / [`RamBlock::write`] at all (it would wait for itself for ever): it goes
//! through `UffdRam::overwrite`, `overwrite_zero` and `read_received`, which never fault.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use memmap2::{Advice, MmapOptions, MmapRaw, UncheckedAdvice};
use qmig_protocol::machine::memory::{GuestMemory, MemoryError, SourceMemory};
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

fn mem_err(e: MemError) -> MemoryError {
    let code = match &e {
        MemError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EINVAL,
    };
    tracing::warn!("guest memory: {e}");
    MemoryError { code }
}

/// Plain placement for a destination that is not under userfaultfd (precopy): stores, zero
/// stores, `MADV_DONTNEED`.
impl GuestMemory for GuestRam {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.block(block)
            .and_then(|b| b.write(offset, data))
            .map_err(mem_err)
    }
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        let b = self.block(block).map_err(mem_err)?;
        b.check(offset, len).map_err(mem_err)?;
        let zero = [0u8; PAGE_SIZE];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(PAGE_SIZE as u64) as usize;
            b.write(at, &zero[..n]).map_err(mem_err)?;
            at += n as u64;
        }
        Ok(())
    }
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.block(block)
            .and_then(|b| b.discard(offset, len))
            .map_err(mem_err)
    }
}

/// The source state machine reads pages straight out of guest memory.
///
/// The slice aliases live guest memory: a guest thread writing the page meanwhile can tear what
/// the machine copies out, exactly as in QEMU; dirty tracking reports that page again, so the
/// torn copy is superseded. A block index or offset outside the RAM yields an empty slice (the
/// machine only asks for pages of blocks it was configured with).
impl SourceMemory for GuestRam {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        match self
            .block(block)
            .and_then(|b| b.check_pages(offset, PAGE_SIZE as u64).map(|at| (b, at)))
        {
            // SAFETY: `check_pages` proved the page lies inside the mapping, which lives as long
            // as `self`; see the impl doc for concurrent writers.
            Ok((b, at)) => unsafe { std::slice::from_raw_parts(b.as_ptr().add(at), PAGE_SIZE) },
            Err(_) => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn accessors_check_bounds_and_alignment() {
        let ram = GuestRam::new(&[("a", 4 * P), ("b", P)], MapOptions::default()).unwrap();
        let a = &ram.blocks()[0];
        let mut buf = [0u8; 8];
        assert!(a.read(4 * P - 8, &mut buf).is_ok());
        assert!(matches!(
            a.read(4 * P - 7, &mut buf),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.write(u64::MAX, &buf),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(a.read_page(1), Err(MemError::Unaligned { .. })));
        assert!(matches!(
            a.read_page(4 * P),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.discard(0, 5 * P),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(ram.by_name(b"c"), Err(MemError::UnknownBlock(_))));
        assert!(matches!(ram.block(2), Err(MemError::UnknownBlock(_))));
        assert_eq!(ram.by_name(b"b").unwrap().0, 1);
        assert!(matches!(
            GuestRam::new(&[("x", P + 1)], MapOptions::default()),
            Err(MemError::BadSpec { .. })
        ));
        assert!(matches!(
            GuestRam::new(&[("x", P), ("x", P)], MapOptions::default()),
            Err(MemError::BadSpec { .. })
        ));
        assert!(matches!(
            RamBlock::new("z", 0, MapOptions::default()),
            Err(MemError::BadSpec { .. })
        ));
    }

    #[test]
    fn write_read_discard_snapshot_sha_dump() {
        let ram = GuestRam::new(&[("a", 4 * P)], MapOptions::default()).unwrap();
        let a = &ram.blocks()[0];
        a.write(P + 10, b"hello").unwrap();
        assert_eq!(&a.read_page(P).unwrap()[10..15], b"hello");
        let snap = a.snapshot();
        assert_eq!(snap.len() as u64, 4 * P);
        assert_eq!(&snap[P as usize + 10..P as usize + 15], b"hello");
        let want: [u8; 32] = Sha256::digest(&snap).into();
        assert_eq!(a.sha256(), want);
        assert_eq!(ram.sha256(), vec![want]);
        let path = std::env::temp_dir().join(format!("qmig-host-dump-{}", std::process::id()));
        a.dump(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), snap);
        std::fs::remove_file(&path).unwrap();
        a.discard(P, P).unwrap();
        assert_eq!(a.read_page(P).unwrap(), [0u8; PAGE_SIZE]);
        let (blk, off) = ram.locate(a.as_ptr() as usize + 3 * PAGE_SIZE + 5).unwrap();
        assert_eq!((blk, off), (0, 3 * P + 5));
        assert_eq!(ram.locate(a.as_ptr() as usize + 4 * PAGE_SIZE), None);
    }

    #[test]
    fn machine_traits() {
        let mut ram = GuestRam::new(&[("a", 4 * P)], MapOptions::default()).unwrap();
        ram.place_page(0, P, &[7u8; PAGE_SIZE]).unwrap();
        assert_eq!(SourceMemory::page(&ram, 0, P), &[7u8; PAGE_SIZE][..]);
        ram.place_zero(0, P, P).unwrap();
        assert_eq!(SourceMemory::page(&ram, 0, P), &[0u8; PAGE_SIZE][..]);
        assert_eq!(
            ram.place_page(0, 4 * P, &[1]).unwrap_err().code,
            libc::EINVAL
        );
        assert!(SourceMemory::page(&ram, 0, 4 * P).is_empty());
        assert!(SourceMemory::page(&ram, 1, 0).is_empty());
    }
}
