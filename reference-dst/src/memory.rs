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
//!
//!   **Why copy into a buffer first.** Pages could instead be placed straight from the receive
//!   buffer, one `UFFDIO_COPY` per 4 KiB page (no user-space copy): each payload follows its
//!   record header there, so consecutive pages are never contiguous and cannot go in one call.
//!   Measured with `cargo bench -p qmig-dst --bench placement` (64 MiB into a fresh
//!   MISSING-registered block, medians of 10, two runs on the shared 2-core machine): per page
//!   from the receive buffer 92.0 / 92.2 ms (0.70 GiB/s), batched through the buffer 61.9 /
//!   56.7 ms (1.01 / 1.10 GiB/s). The memcpy into the buffer costs far less than the 255 extra
//!   ioctls per MiB it saves, so the batched path stays.
//! * **Zero pages** not received yet are only recorded (lazy: nothing mapped, no ioctl); if a
//!   guest thread touches one later, the fault reader maps it with `UFFDIO_ZEROPAGE` itself and
//!   never forwards it. A zero page a thread already waits on is zero-filled at once.
//! * **Pages received already** (precopy resends, and zero pages that replace data): written
//!   in place through `UffdRam::overwrite` / `overwrite_zero`. `UFFDIO_COPY` would refuse
//!   them with `EEXIST`, which the host layer treats as "keep the present page" (right in
//!   postcopy, where the machine drops duplicates itself, wrong for a precopy resend).
//! * **The migration thread never touches a missing page, by construction.** It is the thread
//!   that resolves userfaultfd faults (it polls the descriptor next to its sockets), so a
//!   load or store of a missing page would block it in the kernel's `handle_userfault`
//!   waiting for itself, for ever. That is the 1 GiB benchmark hang: QEMU 7.2 sends page 0
//!   again in its completion pass (`dirty-sync-count` 3, `duplicate` = pages + 1); on a
//!   zero-filled guest the first copy of page 0 was a lazy zero page, never mapped, and the
//!   resend was stored to it directly. Any guest size hangs that way (reproduced at 64 MiB
//!   and 1 GiB with the store unguarded); patterned guests did not, because their page 0 holds
//!   data and is mapped. The placer therefore holds no pointer into guest memory at all: every
//!   access goes through `UffdRam::overwrite`, `overwrite_zero` and `read_received` (XBZRLE
//!   bases), which make each page present with a one-page `UFFDIO_ZEROPAGE` before the access
//!   (or skip lazy zero pages: a zero resend onto one is a no-op, a read of one yields zeros),
//!   under the lock that `discard` takes. Every other path of this thread places with ioctls
//!   only (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `MADV_DONTNEED`), which never fault. Huge pages:
//!   blocks are 4 KiB-paged, a whole host page is one `UFFDIO_COPY`; THP is off for the blocks
//!   (`MADV_NOHUGEPAGE`), and would not change this (a present THP is `EEXIST` to the ioctl).
//! * **Other threads** touching guest memory (QMP `pmemsave` / `x-qmig-ramsave`, the workload)
//!   may fault; the migration thread resolves their faults (page requests in postcopy, lazy
//!   zero pages locally, everything at completion or failure by unregistering).
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

    /// A resend onto a received page (see the module doc).
    fn store(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.direct += 1;
        self.uffd.overwrite(block, offset, data).map_err(err)
    }

    /// A zero resend onto a received page.
    fn store_zero(&mut self, block: usize, offset: u64) -> Result<(), MemoryError> {
        self.direct += 1;
        self.uffd.overwrite_zero(block, offset, P).map_err(err)
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
        let mut at = offset;
        while at < offset + len {
            if self.uffd.is_received(block, at) {
                self.store_zero(block, at)?;
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
        if self.settle(block, offset, out.len() as u64).is_err() {
            return false;
        }
        self.uffd
            .read_received(block, offset, out)
            .unwrap_or_else(|e| {
                tracing::warn!("reading the XBZRLE base failed: {e}");
                false
            })
    }
}

#[cfg(test)]
mod tests {
    //! The placer against a polled userfaultfd, as qmig-dst runs it: each call sequence runs on
    //! a helper thread while the test thread serves the fault descriptor (the migration
    //! thread's role), counting every fault the kernel raises meanwhile. The placer must raise
    //! none: in qmig-dst the thread that places is the thread that resolves faults, so one
    //! fault is a hang for ever. Before the fix, the zero resend onto a lazy zero page (QEMU
    //! 7.2's completion pass resends page 0) raised one here and hung qmig-dst.

    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};
    use qmig_host::uffd::{FaultSource, PlaceConfig, UffdRam};
    use qmig_protocol::machine::memory::GuestMemory;
    use rustix::event::{poll, PollFd, PollFlags};

    use super::{Placer, P};

    fn setup(pages: u64) -> (UffdRam, FaultSource) {
        let ram = Arc::new(GuestRam::new(&[("ram", pages * P)], MapOptions::default()).unwrap());
        UffdRam::register_polled(ram, PlaceConfig::default()).unwrap()
    }

    fn faults_seen(uffd: &UffdRam) -> u64 {
        let s = uffd.stats();
        s.faults_resolved_locally + s.faults_forwarded
    }

    /// Runs `f` on a helper thread while this thread serves `faults`; returns `f`'s result and
    /// the number of faults raised. Forwarded faults get a zero page so that nothing hangs.
    fn watched<T: Send>(
        uffd: &UffdRam,
        faults: &mut FaultSource,
        f: impl FnOnce() -> T + Send,
    ) -> (T, u64) {
        let before = faults_seen(uffd);
        let (done_rx, mut done_tx) = UnixStream::pair().unwrap();
        let r = std::thread::scope(|s| {
            let h = s.spawn(move || {
                let r = f();
                done_tx.write_all(&[1]).unwrap();
                r
            });
            loop {
                let (fault, done) = {
                    let mut fds = [
                        PollFd::new(&*faults, PollFlags::IN),
                        PollFd::new(&done_rx, PollFlags::IN),
                    ];
                    poll(&mut fds, -1).unwrap();
                    (!fds[0].revents().is_empty(), !fds[1].revents().is_empty())
                };
                if fault {
                    let mut got = Vec::new();
                    faults.read(&mut got).unwrap();
                    for f in got {
                        uffd.place_zero(f.block, f.offset, P).unwrap();
                    }
                }
                if done {
                    break;
                }
            }
            h.join().unwrap()
        });
        (r, faults_seen(uffd) - before)
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    fn content(uffd: &UffdRam, offset: u64) -> Vec<u8> {
        let mut out = page(0xcc);
        assert!(uffd.read_received(0, offset, &mut out).unwrap());
        out
    }

    /// The QEMU 7.2 zero-guest stream: every page ZERO in one call, then page 0 ZERO again
    /// in a later call (the completion pass).
    #[test]
    fn zero_resend_onto_a_lazy_zero_page_never_faults() {
        let (uffd, mut faults) = setup(64);
        let ((), n) = watched(&uffd, &mut faults, || {
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 0, 64 * P).unwrap();
            assert_eq!(p.finish().unwrap(), 0);
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 0, P).unwrap();
            assert_eq!(p.finish().unwrap(), 1, "the resend is an overwrite");
        });
        assert_eq!(n, 0, "the placer touched a missing page");
        assert!(
            uffd.is_lazy_zero(0, 0),
            "a zero resend onto a lazy page maps nothing"
        );
        assert_eq!(content(&uffd, 0), page(0));
    }

    /// A data resend onto a lazy zero page, in a later call and in the same call (the page
    /// still staged in the batcher when the resend arrives).
    #[test]
    fn data_resend_onto_a_lazy_zero_page_never_faults() {
        let (uffd, mut faults) = setup(16);
        let ((), n) = watched(&uffd, &mut faults, || {
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 0, 4 * P).unwrap();
            p.finish().unwrap();
            let mut p = Placer::new(&uffd);
            p.place_page(0, 2 * P, &page(0x42)).unwrap();
            p.finish().unwrap();
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 8 * P, P).unwrap();
            p.place_page(0, 8 * P, &page(0x43)).unwrap();
            p.finish().unwrap();
        });
        assert_eq!(n, 0, "the placer touched a missing page");
        assert_eq!(content(&uffd, 2 * P), page(0x42));
        assert_eq!(content(&uffd, 8 * P), page(0x43));
        assert_eq!(content(&uffd, 3 * P), page(0));
    }

    /// A zero resend onto a data page zeroes it; a data resend onto a data page replaces it
    /// (`UFFDIO_COPY` alone would keep the old page).
    #[test]
    fn resends_onto_data_pages_replace_them() {
        let (uffd, mut faults) = setup(16);
        let ((), n) = watched(&uffd, &mut faults, || {
            let mut p = Placer::new(&uffd);
            p.place_page(0, 0, &page(1)).unwrap();
            p.place_page(0, P, &page(2)).unwrap();
            p.finish().unwrap();
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 0, P).unwrap();
            p.place_page(0, P, &page(3)).unwrap();
            assert_eq!(p.finish().unwrap(), 2);
        });
        assert_eq!(n, 0);
        assert_eq!(content(&uffd, 0), page(0));
        assert_eq!(content(&uffd, P), page(3));
    }

    /// XBZRLE reads the page as received: a lazy zero page reads as zeros without a fault, a
    /// staged page is flushed first, a page never received is refused.
    #[test]
    fn xbzrle_base_reads_never_fault() {
        let (uffd, mut faults) = setup(16);
        let ((lazy, staged, missing), n) = watched(&uffd, &mut faults, || {
            let mut p = Placer::new(&uffd);
            p.place_zero(0, 0, P).unwrap();
            p.finish().unwrap();
            let mut p = Placer::new(&uffd);
            let mut a = page(0xff);
            let lazy = p.read_page(0, 0, &mut a).then_some(a);
            p.place_page(0, 4 * P, &page(0x77)).unwrap();
            let mut b = page(0);
            let staged = p.read_page(0, 4 * P, &mut b).then_some(b);
            let mut c = page(0);
            let missing = p.read_page(0, 9 * P, &mut c);
            p.finish().unwrap();
            (lazy, staged, missing)
        });
        assert_eq!(n, 0);
        assert_eq!(lazy, Some(page(0)));
        assert_eq!(staged, Some(page(0x77)));
        assert!(!missing);
    }
}
