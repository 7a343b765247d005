//! The destination machine's `GuestMemory`, over userfaultfd-registered guest RAM.
//!
//! This module owns [`Placer`]: the adapter the migration thread hands to
//! `Destination::handle_stream` for one call. Every block of guest RAM is registered with
//! userfaultfd in missing mode from the start (`qmig_host::uffd::UffdRam`), so:
//!
//! * **First arrival of a page** (not received yet): staged in `qmig_host::uffd::Batcher`, which
//!   places contiguous runs with one `UFFDIO_COPY` (atomic: a guest thread touching the page
//!   sleeps in the kernel until the whole page is there, and is woken by the same call). When a
//!   fault is outstanding the batcher flushes on every page, so a waited-for page never sits
//!   in the buffer; and [`Placer::finish`] flushes at the end of every `handle_stream` call.
//! * **Zero pages** not received yet are only recorded (lazy: nothing mapped, no ioctl); if a
//!   guest thread touches one later, the fault reader maps it with `UFFDIO_ZEROPAGE` itself and
//!   never forwards it. A zero page a thread already waits on is zero-filled at once.
//! * **Pages already present** (precopy resends, and zero pages that replace data): written
//!   directly with stores. `UFFDIO_COPY` would refuse them with `EEXIST`, which the host layer
//!   treats as "keep the present page" (right in postcopy, where the machine drops duplicates
//!   itself, wrong for a precopy resend). A received page may be a lazy zero page, not mapped
//!   yet: a store to it would fault, and the thread that resolves faults is this very thread
//!   (it polls the userfaultfd). So the page is first mapped with a one-page `UFFDIO_ZEROPAGE`
//!   (`EEXIST`, a no-op, when it is already mapped), then stored to; the same before XBZRLE
//!   base reads. The migration thread never touches a missing page.
//! * **Ordering**: a page staged in the batcher and arriving again in the same call would be
//!   lost (the second copy would see `EEXIST`); the placer remembers the staged range and
//!   flushes before touching any page in it. XBZRLE reads (`read_page`) flush the same way.
//! * **`EAGAIN`** (the address space changing) is retried by the host layer; `EEXIST` is never
//!   an error; any other errno reaches the machine as a `MemoryError`, which fails (or, after
//!   postcopy RUN, pauses) the migration with the machine's rule.
//! * **Discard** (`ADVISE`, `POSTCOPY_RAM_DISCARD`): `MADV_DONTNEED` and the received bits
//!   cleared, so the pages fault again.

use std::cell::RefCell;

use qmig_host::memory::PAGE_SIZE;
use qmig_host::uffd::{Batcher, UffdError, UffdRam, ZeroPolicy};
use qmig_protocol::machine::memory::{GuestMemory, MemoryError};

const P: u64 = PAGE_SIZE as u64;

/// Staged pages: block and `[lo, hi)` byte range covering every page pushed since the flush.
#[derive(Clone, Copy)]
struct Staged {
    block: usize,
    lo: u64,
    hi: u64,
}

struct Inner<'a> {
    batch: Batcher<'a>,
    staged: Option<Staged>,
}

/// The `GuestMemory` of one `handle_stream` call; see the module doc.
pub struct Placer<'a> {
    uffd: &'a UffdRam,
    inner: RefCell<Inner<'a>>,
    direct: u64,
}

fn err(e: UffdError) -> MemoryError {
    tracing::warn!("placement failed: {e}");
    MemoryError { code: e.errno() }
}

impl<'a> Placer<'a> {
    /// A placer over `uffd` with lazy zero pages.
    pub fn new(uffd: &'a UffdRam) -> Self {
        Placer {
            uffd,
            inner: RefCell::new(Inner {
                batch: Batcher::new(uffd, ZeroPolicy::Lazy),
                staged: None,
            }),
            direct: 0,
        }
    }

    /// Places everything staged; returns how many pages were written directly (resends).
    pub fn finish(self) -> Result<u64, MemoryError> {
        self.flush()?;
        Ok(self.direct)
    }

    fn flush(&self) -> Result<(), MemoryError> {
        let mut i = self.inner.borrow_mut();
        i.staged = None;
        i.batch.flush().map_err(err)
    }

    /// Flushes if `[offset, offset+len)` of `block` may be staged.
    fn settle(&self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        let hit = self
            .inner
            .borrow()
            .staged
            .is_some_and(|s| s.block == block && offset < s.hi && offset + len > s.lo);
        if hit {
            self.flush()?;
        }
        Ok(())
    }

    fn note_staged(&self, block: usize, offset: u64) {
        let mut i = self.inner.borrow_mut();
        i.staged = Some(match i.staged {
            Some(s) if s.block == block => Staged {
                block,
                lo: s.lo.min(offset),
                hi: s.hi.max(offset + P),
            },
            _ => {
                // The batcher flushes by itself when the block changes.
                Staged {
                    block,
                    lo: offset,
                    hi: offset + P,
                }
            }
        });
    }

    /// Maps the received page at `offset` if it is a lazy zero page (see the module doc).
    fn ensure_mapped(&self, block: usize, offset: u64) -> Result<(), MemoryError> {
        self.uffd.place_zero(block, offset, P).map_err(err)
    }

    fn store(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.direct += 1;
        self.ensure_mapped(block, offset)?;
        let b = self
            .uffd
            .ram()
            .block(block)
            .map_err(|e| err(UffdError::Mem(e)))?;
        b.write(offset, data).map_err(|e| err(UffdError::Mem(e)))
    }
}

impl GuestMemory for Placer<'_> {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let len = data.len() as u64;
        self.settle(block, offset, len)?;
        if len != P {
            // A whole host page of a huge-page block: one atomic copy of its own.
            self.flush()?;
            return self.uffd.place(block, offset, data).map_err(err);
        }
        if self.uffd.is_received(block, offset) {
            return self.store(block, offset, data);
        }
        self.inner
            .borrow_mut()
            .batch
            .push_page(block, offset, data)
            .map_err(err)?;
        self.note_staged(block, offset);
        Ok(())
    }

    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.settle(block, offset, len)?;
        let zero = [0u8; PAGE_SIZE];
        let mut at = offset;
        while at < offset + len {
            if self.uffd.is_received(block, at) {
                self.store(block, at, &zero)?;
            } else {
                self.inner
                    .borrow_mut()
                    .batch
                    .push_zero(block, at)
                    .map_err(err)?;
                self.note_staged(block, at);
            }
            at += P;
        }
        Ok(())
    }

    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.flush()?;
        self.uffd.discard(block, offset, len).map_err(err)
    }

    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        if self.settle(block, offset, out.len() as u64).is_err()
            || !self.uffd.is_received(block, offset)
            || self.ensure_mapped(block, offset).is_err()
        {
            return false;
        }
        match self.uffd.ram().block(block) {
            Ok(b) => b.read(offset, out).is_ok(),
            Err(_) => false,
        }
    }
}
