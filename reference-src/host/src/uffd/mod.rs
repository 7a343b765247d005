//! Destination-side page placement with userfaultfd (MISSING mode).
//!
//! This module owns the destination's view of postcopy memory: [`UffdRam`] registers every block
//! of a [`GuestRam`] with one userfaultfd in `UFFDIO_REGISTER_MODE_MISSING`, places pages
//! atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, keeps each block's *received* bitmap (what
//! `MIG_RP_MSG_RECV_BITMAP` reports on recovery), and runs a fault-reader thread
//! ([`faults`]) that turns the kernel's page-fault messages into [`Fault`]s on a channel so the
//! driver can send page requests (or, with [`UffdRam::register_polled`], hands the descriptor
//! to the driver's own poll loop as a [`FaultSource`]). [`batch::Batcher`] groups contiguous
//! incoming pages into large copies and zero runs into ranged zero-fills.
//!
//! # Rules
//!
//! * **Atomic placement.** A page becomes visible to guest threads only through `UFFDIO_COPY` or
//!   `UFFDIO_ZEROPAGE`, which fill a missing page in one step and never overwrite a present one.
//!   A guest thread touching a missing page sleeps in the kernel until then.
//! * **Batching.** [`UffdRam::place`] takes any page-multiple run and issues one `UFFDIO_COPY`
//!   per [`PlaceConfig::max_batch`] bytes (64 KiB – 2 MiB calls are markedly cheaper per page
//!   than 4 KiB calls); [`UffdRam::place_zero`] issues one ranged `UFFDIO_ZEROPAGE`.
//! * **Partial fills.** The kernel fills a range page by page and stops at the first problem,
//!   reporting how many bytes it filled (`EAGAIN` with a positive count). Placement continues
//!   right after the filled prefix; nothing is copied twice.
//! * **`EEXIST` (page already present).** The page at the head of the range is already mapped.
//!   In postcopy this happens when the same page arrives twice (background stream and an urgent
//!   answer to a page request, or a re-send after recovery). After switchover the source VM is
//!   stopped, so both copies are the same source page; the present page may moreover already
//!   hold newer guest writes made on the destination, so it must *not* be overwritten. The page
//!   is counted ([`PlaceStats::already_present`]), skipped, explicitly woken (`UFFDIO_WAKE`, in
//!   case a waiter queued while it was being filled) and placement continues with the next page.
//!   It is not an error.
//! * **`EAGAIN` with no progress** means the address space is changing (the kernel's
//!   `mmap_changing`, e.g. a concurrent `madvise`/`mremap`). The same call is retried after a
//!   `yield_now`, up to [`PlaceConfig::max_again`] times in a row, then reported as
//!   [`UffdError::Busy`].
//! * **Wake-ups.** Fills are issued without `DONTWAKE`, so the kernel wakes exactly the threads
//!   waiting on the filled range as part of the same call. Faults that race a fill are
//!   re-checked by the reader thread against the received bitmap and woken instead of forwarded.
//! * **Lazy zero pages.** [`UffdRam::mark_zero`] records a zero run as received without mapping
//!   anything (no ioctl, no memory). If a guest thread later touches such a page, the reader
//!   thread resolves it itself with `UFFDIO_ZEROPAGE` and never forwards it.
//! * **Discard.** [`UffdRam::discard`] drops pages with `MADV_DONTNEED` and clears their received
//!   bits, so they fault again (as `MIG_CMD_POSTCOPY_RAM_DISCARD` requires).
//! * **Touching placed memory without faulting.** The thread that places pages is often the
//!   thread that resolves faults (a driver polling a [`FaultSource`]); if it ever touched a
//!   missing page it would sleep in the kernel's `handle_userfault` waiting for itself, for
//!   ever. So the placing side never dereferences guest memory except through
//!   [`UffdRam::overwrite`], [`UffdRam::overwrite_zero`] and [`UffdRam::read_received`], which
//!   make every page they touch present first: a one-page `UFFDIO_ZEROPAGE` (an ioctl, which
//!   cannot fault; `EEXIST` when the page is already there) before the store or load. Lazy
//!   zero pages are not mapped at all by these calls: a zero overwrite of one is a no-op and a
//!   read of one yields zeros. Nothing can make the page missing again between the ioctl and
//!   the access: [`UffdRam::discard`] (the only unmapping operation) takes the same lock, and
//!   the kernel never turns a present anonymous page back into a missing one by itself (swap,
//!   migration, compaction and THP collapse or split leave a non-empty entry; collapse skips
//!   userfaultfd-armed ranges with missing pages).
//! * **Cancel.** [`UffdRam::cancel`] unregisters every block (which wakes every waiter) and
//!   wakes each range once more; woken threads retry the access and see ordinary zero-fill
//!   anonymous memory. Placement afterwards fails with [`UffdError::Cancelled`].
//! * **State machine.** [`UffdRam`] implements the protocol's `GuestMemory`: `place_page` is
//!   [`UffdRam::place`], `place_zero` is the ranged [`UffdRam::place_zero`], `discard` is
//!   [`UffdRam::discard`]; errors map to their errno.
//! * **Fault latency** is measured from the moment the reader thread read the fault message to
//!   the placement that resolved it ([`UffdRam::take_fault_latencies`]).

pub mod batch;
pub mod faults;
pub mod sys;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::memory::{GuestRam, MemError, PAGE_SIZE};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::machine::memory::{GuestMemory, MemoryError};
use sys::{Fill, UffdFd};

pub use batch::{Batcher, ZeroPolicy};
pub use faults::{Fault, FaultSource};

/// Errors of page placement.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Block/offset/length rejected by guest memory.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A userfaultfd operation failed.
    #[error("{what}: {source}")]
    Os {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The address space kept changing (`EAGAIN` without progress) for too long.
    #[error("userfaultfd fill kept returning EAGAIN at block {block} offset {offset:#x}")]
    Busy {
        /// Block index.
        block: usize,
        /// Offset of the page that could not be filled.
        offset: u64,
    },
    /// [`UffdRam::cancel`] was called.
    #[error("placement cancelled")]
    Cancelled,
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> UffdError {
    move |source| UffdError::Os { what, source }
}

/// Placement tuning.
#[derive(Debug, Clone, Copy)]
pub struct PlaceConfig {
    /// Largest single `UFFDIO_COPY`, bytes (page multiple). Default 1 MiB.
    pub max_batch: usize,
    /// Consecutive no-progress `EAGAIN`s tolerated before [`UffdError::Busy`]. Default 10 000.
    pub max_again: u32,
}

impl Default for PlaceConfig {
    fn default() -> Self {
        Self {
            max_batch: 1 << 20,
            max_again: 10_000,
        }
    }
}

/// Counters of what placement did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PlaceStats {
    /// Pages filled by `UFFDIO_COPY`.
    pub copied_pages: u64,
    /// `UFFDIO_COPY` calls.
    pub copy_calls: u64,
    /// Pages filled by `UFFDIO_ZEROPAGE`.
    pub zero_pages: u64,
    /// `UFFDIO_ZEROPAGE` calls.
    pub zero_calls: u64,
    /// Pages skipped because already present (`EEXIST`).
    pub already_present: u64,
    /// No-progress `EAGAIN` retries.
    pub again_retries: u64,
    /// Pages recorded as lazy zero (nothing mapped).
    pub lazy_zero_pages: u64,
    /// Faults resolved by the reader thread itself (lazy zero or already received).
    pub faults_resolved_locally: u64,
    /// Faults forwarded to the driver.
    pub faults_forwarded: u64,
}

#[derive(Default)]
struct Counters {
    copied_pages: AtomicU64,
    copy_calls: AtomicU64,
    zero_pages: AtomicU64,
    zero_calls: AtomicU64,
    already_present: AtomicU64,
    again_retries: AtomicU64,
    lazy_zero_pages: AtomicU64,
    faults_resolved_locally: AtomicU64,
    faults_forwarded: AtomicU64,
}

/// An atomic page bitmap (one bit per page of a block).
struct AtomicBits(Vec<AtomicU64>);

impl AtomicBits {
    fn new(pages: u64) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn set_range(&self, first: u64, n: u64, on: bool) {
        for p in first..first + n {
            let bit = 1u64 << (p % 64);
            let w = &self.0[(p / 64) as usize];
            if on {
                w.fetch_or(bit, Ordering::SeqCst);
            } else {
                w.fetch_and(!bit, Ordering::SeqCst);
            }
        }
    }
    fn test(&self, p: u64) -> bool {
        self.0[(p / 64) as usize].load(Ordering::SeqCst) & (1 << (p % 64)) != 0
    }
    fn words(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.load(Ordering::SeqCst)).collect()
    }
}

struct BlockState {
    received: AtomicBits,
    lazy_zero: AtomicBits,
}

/// State shared by the driver side and the fault-reader thread.
pub(crate) struct Shared {
    ram: Arc<GuestRam>,
    fd: UffdFd,
    blocks: Vec<BlockState>,
    /// Faults forwarded and not yet resolved: (block, page) -> when the fault was read.
    pending: Mutex<HashMap<(usize, u64), Instant>>,
    pending_count: AtomicUsize,
    latencies: Mutex<Vec<Duration>>,
    counters: Counters,
    cancelled: AtomicBool,
    cfg: PlaceConfig,
    /// Held across "make present, then touch" and across `discard`, so no page is unmapped
    /// between the two steps.
    touch: Mutex<()>,
}

impl Shared {
    fn base(&self, block: usize, offset: u64) -> *mut u8 {
        // Callers checked `offset` against the block.
        self.ram.blocks()[block]
            .as_ptr()
            .wrapping_add(offset as usize)
    }

    /// Resolves pending faults on pages `[first, first+n)` of `block`: records their latency.
    fn resolve_pending(&self, block: usize, first: u64, n: u64) {
        if self.pending_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.resolve_locked(&mut pending, block, first, n);
    }

    fn resolve_locked(
        &self,
        pending: &mut HashMap<(usize, u64), Instant>,
        block: usize,
        first: u64,
        n: u64,
    ) {
        let now = Instant::now();
        let mut done = Vec::new();
        if n as usize <= pending.len() {
            for p in first..first + n {
                if let Some(at) = pending.remove(&(block, p)) {
                    done.push(now.duration_since(at));
                }
            }
        } else {
            pending.retain(|&(b, p), at| {
                let hit = b == block && p >= first && p < first + n;
                if hit {
                    done.push(now.duration_since(*at));
                }
                !hit
            });
        }
        if !done.is_empty() {
            self.pending_count.store(pending.len(), Ordering::SeqCst);
            self.latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(done);
        }
    }

    /// One ranged fill (copy when `src` is some, else zeropage) with the partial/EEXIST/EAGAIN
    /// rules of the module doc. Marks filled and already-present pages received.
    fn fill(
        &self,
        block: usize,
        offset: u64,
        len: usize,
        src: Option<&[u8]>,
    ) -> Result<(), UffdError> {
        let (mut done, mut again) = (0usize, 0u32);
        while done < len {
            if self.cancelled.load(Ordering::SeqCst) {
                return Err(UffdError::Cancelled);
            }
            let dst = self.base(block, offset + done as u64);
            let n = len - done;
            // Pages are counted before the call, which wakes the faulting threads: a woken
            // thread that reads the statistics at once must see its page counted. Whatever the
            // call did not fill is taken back below.
            let ctr = if src.is_some() {
                &self.counters.copied_pages
            } else {
                &self.counters.zero_pages
            };
            let counted = (n / PAGE_SIZE) as u64;
            ctr.fetch_add(counted, Ordering::Relaxed);
            let res = match src {
                Some(s) => {
                    self.counters.copy_calls.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: `s[done..]` is a live slice of at least `n` bytes; `dst..dst+n` is
                    // inside a registered block (the caller checked offset and length).
                    unsafe { self.fd.copy(dst, s[done..].as_ptr(), n, true) }
                        .map_err(os("UFFDIO_COPY"))
                        .inspect_err(|_| {
                            ctr.fetch_sub(counted, Ordering::Relaxed);
                        })?
                }
                None => {
                    self.counters.zero_calls.fetch_add(1, Ordering::Relaxed);
                    self.fd
                        .zeropage(dst, n, true)
                        .map_err(os("UFFDIO_ZEROPAGE"))
                        .inspect_err(|_| {
                            ctr.fetch_sub(counted, Ordering::Relaxed);
                        })?
                }
            };
            let filled = match res {
                Fill::Done => n,
                Fill::Partial(k) => k as usize,
                Fill::Exists => {
                    ctr.fetch_sub(counted, Ordering::Relaxed);
                    self.counters
                        .already_present
                        .fetch_add(1, Ordering::Relaxed);
                    // A waiter may have queued on this page while another fill mapped it.
                    self.fd.wake(dst, PAGE_SIZE).map_err(os("UFFDIO_WAKE"))?;
                    self.mark_received(block, offset + done as u64, PAGE_SIZE as u64);
                    done += PAGE_SIZE;
                    again = 0;
                    continue;
                }
                Fill::Again => {
                    ctr.fetch_sub(counted, Ordering::Relaxed);
                    self.counters.again_retries.fetch_add(1, Ordering::Relaxed);
                    again += 1;
                    if again > self.cfg.max_again {
                        return Err(UffdError::Busy {
                            block,
                            offset: offset + done as u64,
                        });
                    }
                    std::thread::yield_now();
                    continue;
                }
            };
            let pages = (filled / PAGE_SIZE) as u64;
            ctr.fetch_sub(counted - pages.min(counted), Ordering::Relaxed);
            self.mark_received(block, offset + done as u64, filled as u64);
            done += filled;
            again = 0;
        }
        Ok(())
    }

    fn mark_received(&self, block: usize, offset: u64, len: u64) {
        let first = offset / PAGE_SIZE as u64;
        let n = len / PAGE_SIZE as u64;
        let st = &self.blocks[block];
        st.lazy_zero.set_range(first, n, false);
        st.received.set_range(first, n, true);
        self.resolve_pending(block, first, n);
    }

    /// Makes the page at `offset` of `block` present without touching it: a one-page
    /// `UFFDIO_ZEROPAGE`, which maps a zero page if the page is missing and fails with `EEXIST`
    /// (nothing done) if it is present. Afterwards a load or store cannot fault to userfaultfd.
    /// A page that had to be mapped becomes received (it was a lazy zero page).
    fn ensure_present(&self, block: usize, offset: u64) -> Result<(), UffdError> {
        let dst = self.base(block, offset);
        let mut again = 0u32;
        loop {
            if self.cancelled.load(Ordering::SeqCst) {
                return Err(UffdError::Cancelled);
            }
            match self
                .fd
                .zeropage(dst, PAGE_SIZE, true)
                .map_err(os("UFFDIO_ZEROPAGE (make present)"))?
            {
                Fill::Exists => return Ok(()),
                Fill::Done | Fill::Partial(_) => {
                    self.counters.zero_calls.fetch_add(1, Ordering::Relaxed);
                    self.counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                    self.mark_received(block, offset, PAGE_SIZE as u64);
                    return Ok(());
                }
                Fill::Again => {
                    self.counters.again_retries.fetch_add(1, Ordering::Relaxed);
                    again += 1;
                    if again > self.cfg.max_again {
                        return Err(UffdError::Busy { block, offset });
                    }
                    std::thread::yield_now();
                }
            }
        }
    }

    fn lock_touch(&self) -> std::sync::MutexGuard<'_, ()> {
        self.touch.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A [`GuestRam`] whose blocks are registered with userfaultfd for postcopy placement.
pub struct UffdRam {
    shared: Arc<Shared>,
    reader: Option<faults::ReaderHandle>,
}

impl UffdRam {
    /// Registers every block of `ram` in MISSING mode and starts the fault-reader thread.
    /// Returns the placement handle and the channel on which faults arrive.
    pub fn register(
        ram: Arc<GuestRam>,
        cfg: PlaceConfig,
    ) -> Result<(Self, Receiver<Fault>), UffdError> {
        let shared = Self::register_blocks(ram, cfg)?;
        let (reader, rx) = faults::spawn(shared.clone()).map_err(os("start fault reader"))?;
        Ok((
            Self {
                shared,
                reader: Some(reader),
            },
            rx,
        ))
    }

    /// Registers every block of `ram` in MISSING mode without a reader thread: the caller polls
    /// the returned [`FaultSource`] in its own loop (see [`faults`]).
    pub fn register_polled(
        ram: Arc<GuestRam>,
        cfg: PlaceConfig,
    ) -> Result<(Self, FaultSource), UffdError> {
        let shared = Self::register_blocks(ram, cfg)?;
        let source = FaultSource::new(shared.clone());
        Ok((
            Self {
                shared,
                reader: None,
            },
            source,
        ))
    }

    fn register_blocks(ram: Arc<GuestRam>, cfg: PlaceConfig) -> Result<Arc<Shared>, UffdError> {
        let fd = UffdFd::open(0).map_err(os("userfaultfd open/UFFDIO_API"))?;
        for b in ram.blocks() {
            fd.register(b.as_ptr(), b.len() as usize, sys::mode::MISSING)
                .map_err(os("UFFDIO_REGISTER missing"))?;
        }
        let blocks = ram
            .blocks()
            .iter()
            .map(|b| BlockState {
                received: AtomicBits::new(b.pages()),
                lazy_zero: AtomicBits::new(b.pages()),
            })
            .collect();
        let shared = Arc::new(Shared {
            ram,
            fd,
            blocks,
            pending: Mutex::new(HashMap::new()),
            pending_count: AtomicUsize::new(0),
            latencies: Mutex::new(Vec::new()),
            counters: Counters::default(),
            cancelled: AtomicBool::new(false),
            cfg,
            touch: Mutex::new(()),
        });
        Ok(shared)
    }

    /// The guest memory being filled.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.shared.ram
    }

    fn check(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        if self.shared.cancelled.load(Ordering::SeqCst) {
            return Err(UffdError::Cancelled);
        }
        self.shared.ram.block(block)?.check_pages(offset, len)?;
        Ok(())
    }

    /// Places `data` (a page-multiple run) at page-aligned `offset` of `block`, in copies of at
    /// most [`PlaceConfig::max_batch`] bytes, waking any thread waiting on those pages.
    pub fn place(&self, block: usize, offset: u64, data: &[u8]) -> Result<(), UffdError> {
        self.check(block, offset, data.len() as u64)?;
        let step = self.shared.cfg.max_batch.max(PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE;
        for (i, chunk) in data.chunks(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.shared.fill(block, at, chunk.len(), Some(chunk))?;
        }
        Ok(())
    }

    /// Maps zero pages over `[offset, offset+len)` with one ranged `UFFDIO_ZEROPAGE`.
    pub fn place_zero(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        self.check(block, offset, len)?;
        self.shared.fill(block, offset, len as usize, None)
    }

    /// Records `[offset, offset+len)` as received zero pages without mapping anything; a later
    /// touch is resolved by the fault-reader thread with `UFFDIO_ZEROPAGE`. Pages a thread is
    /// already waiting on are zero-filled now.
    pub fn mark_zero(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        self.check(block, offset, len)?;
        let sh = &self.shared;
        let (first, n) = (offset / PAGE_SIZE as u64, len / PAGE_SIZE as u64);
        let waited: Vec<u64> = {
            // Under the pending lock so the reader either sees the lazy bit or has already
            // queued its fault (which is then resolved below).
            let pending = sh.pending.lock().unwrap_or_else(|e| e.into_inner());
            let st = &sh.blocks[block];
            st.lazy_zero.set_range(first, n, true);
            st.received.set_range(first, n, true);
            (first..first + n)
                .filter(|p| pending.contains_key(&(block, *p)))
                .collect()
        };
        sh.counters.lazy_zero_pages.fetch_add(n, Ordering::Relaxed);
        for p in waited {
            sh.fill(block, p * PAGE_SIZE as u64, PAGE_SIZE, None)?;
        }
        Ok(())
    }

    /// Records `[offset, offset+len)` as received without placing anything: for pages that
    /// were loaded by plain stores before the blocks were registered (the precopy phase).
    /// The pages must be present; a missing page marked this way would never be requested.
    pub fn note_received(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        self.check(block, offset, len)?;
        self.shared.mark_received(block, offset, len);
        Ok(())
    }

    /// Drops `[offset, offset+len)` (`MADV_DONTNEED`) and clears its received bits: the pages
    /// fault again on next touch.
    pub fn discard(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        self.check(block, offset, len)?;
        let _touch = self.shared.lock_touch();
        let st = &self.shared.blocks[block];
        let (first, n) = (offset / PAGE_SIZE as u64, len / PAGE_SIZE as u64);
        st.received.set_range(first, n, false);
        st.lazy_zero.set_range(first, n, false);
        self.shared.ram.block(block)?.discard(offset, len)?;
        Ok(())
    }

    /// Writes `data` (a page-multiple run) at page-aligned `offset` of `block`, whatever the
    /// pages' state, without ever faulting (see "Touching placed memory" in the module doc):
    /// a page received already (a precopy resend) is made present and stored to, replacing
    /// its content; a page not received yet is placed with `UFFDIO_COPY` (atomic).
    pub fn overwrite(&self, block: usize, offset: u64, data: &[u8]) -> Result<(), UffdError> {
        self.check(block, offset, data.len() as u64)?;
        let b = self.shared.ram.block(block)?;
        let _touch = self.shared.lock_touch();
        for (i, page) in data.chunks(PAGE_SIZE).enumerate() {
            let at = offset + (i * PAGE_SIZE) as u64;
            if self.is_received(block, at) {
                self.shared.ensure_present(block, at)?;
                b.write(at, page)?;
            } else {
                self.shared.fill(block, at, PAGE_SIZE, Some(page))?;
            }
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` of `block` zero without ever faulting: lazy zero pages
    /// are left as they are (already zero, nothing mapped), other received pages are made
    /// present and zeroed with stores, pages not received yet are recorded as lazy zero pages
    /// ([`UffdRam::mark_zero`]).
    pub fn overwrite_zero(&self, block: usize, offset: u64, len: u64) -> Result<(), UffdError> {
        self.check(block, offset, len)?;
        let b = self.shared.ram.block(block)?;
        let st = &self.shared.blocks[block];
        let zero = [0u8; PAGE_SIZE];
        let _touch = self.shared.lock_touch();
        let mut at = offset;
        while at < offset + len {
            let p = at / PAGE_SIZE as u64;
            if st.lazy_zero.test(p) {
                // Zero already; mapping it only to store zeros would cost memory.
            } else if st.received.test(p) {
                self.shared.ensure_present(block, at)?;
                b.write(at, &zero)?;
            } else {
                self.mark_zero(block, at, PAGE_SIZE as u64)?;
            }
            at += PAGE_SIZE as u64;
        }
        Ok(())
    }

    /// Copies received pages `[offset, offset + out.len())` of `block` into `out` without ever
    /// faulting (see "Touching placed memory" in the module doc): lazy zero pages read as
    /// zeros without being mapped, other pages are made present, then read. Returns
    /// `Ok(false)`, leaving `out` unspecified, if any page of the range is not received (its
    /// content does not exist yet).
    pub fn read_received(
        &self,
        block: usize,
        offset: u64,
        out: &mut [u8],
    ) -> Result<bool, UffdError> {
        self.check(block, offset, out.len() as u64)?;
        let b = self.shared.ram.block(block)?;
        let st = &self.shared.blocks[block];
        let _touch = self.shared.lock_touch();
        for (i, chunk) in out.chunks_mut(PAGE_SIZE).enumerate() {
            let at = offset + (i * PAGE_SIZE) as u64;
            let p = at / PAGE_SIZE as u64;
            if !st.received.test(p) {
                return Ok(false);
            }
            if st.lazy_zero.test(p) {
                chunk.fill(0);
            } else {
                self.shared.ensure_present(block, at)?;
                b.read(at, chunk)?;
            }
        }
        Ok(true)
    }

    /// Whether the page at `offset` of `block` is a lazy zero page: received as zero and not
    /// mapped ([`UffdRam::mark_zero`]).
    pub fn is_lazy_zero(&self, block: usize, offset: u64) -> bool {
        self.shared
            .blocks
            .get(block)
            .map(|st| {
                let p = offset / PAGE_SIZE as u64;
                p < self.shared.ram.blocks()[block].pages() && st.lazy_zero.test(p)
            })
            .unwrap_or(false)
    }

    /// Whether the page at `offset` of `block` has been received (placed or lazily zero).
    pub fn is_received(&self, block: usize, offset: u64) -> bool {
        self.shared
            .blocks
            .get(block)
            .map(|st| {
                let p = offset / PAGE_SIZE as u64;
                p < self.shared.ram.blocks()[block].pages() && st.received.test(p)
            })
            .unwrap_or(false)
    }

    /// The received bitmap of `block` as 64-bit words, bit `i` of word `w` = page `64*w + i`
    /// (the layout of `MIG_RP_MSG_RECV_BITMAP` before its little-endian encoding).
    pub fn received_words(&self, block: usize) -> Result<Vec<u64>, UffdError> {
        self.shared.ram.block(block)?;
        Ok(self.shared.blocks[block].received.words())
    }

    /// The received bitmap of `block` as the protocol's [`PageBitmap`], ready for
    /// `MIG_RP_MSG_RECV_BITMAP` (`to_le_bytes`).
    pub fn received_bitmap(&self, block: usize) -> Result<PageBitmap, UffdError> {
        let pages = self.shared.ram.block(block)?.pages();
        let mut out = PageBitmap::new(pages);
        for (w, word) in self.received_words(block)?.into_iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                out.set(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        Ok(out)
    }

    /// Forwarded faults not yet resolved, as `(block, offset)` in ascending order: after a
    /// postcopy recovery the driver requests these pages again (a request sent on the failed
    /// channel may never have been answered; the reader does not forward a fault twice).
    pub fn pending_fault_pages(&self) -> Vec<(usize, u64)> {
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(usize, u64)> = pending
            .keys()
            .map(|&(b, p)| (b, p * PAGE_SIZE as u64))
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of pages of `block` not received yet.
    pub fn missing_pages(&self, block: usize) -> Result<u64, UffdError> {
        let b = self.shared.ram.block(block)?;
        let got: u64 = self
            .received_words(block)?
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum();
        Ok(b.pages() - got)
    }

    /// Unblocks every waiter for good: unregisters all blocks (waking their waiters), wakes
    /// each range once more, and makes further placement fail with [`UffdError::Cancelled`].
    pub fn cancel(&self) -> Result<(), UffdError> {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        self.unregister_all()
    }

    /// Ends postcopy normally (every page placed): unregisters all blocks so memory behaves as
    /// ordinary anonymous memory again.
    pub fn finish(&self) -> Result<(), UffdError> {
        self.unregister_all()
    }

    fn unregister_all(&self) -> Result<(), UffdError> {
        for b in self.shared.ram.blocks() {
            let (p, l) = (b.as_ptr(), b.len() as usize);
            self.shared
                .fd
                .unregister(p, l)
                .map_err(os("UFFDIO_UNREGISTER"))?;
            self.shared.fd.wake(p, l).map_err(os("UFFDIO_WAKE"))?;
        }
        Ok(())
    }

    /// Drains the fault latencies measured so far (fault read → resolving placement).
    pub fn take_fault_latencies(&self) -> Vec<Duration> {
        std::mem::take(
            &mut *self
                .shared
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    /// Number of forwarded faults not yet resolved by a placement.
    pub fn pending_faults(&self) -> usize {
        self.shared.pending_count.load(Ordering::SeqCst)
    }

    /// Whether a forwarded, unresolved fault waits on one of the pages `[first, first + n)` of
    /// `block` (page indices). Without pending faults this is one atomic load.
    pub fn pending_in(&self, block: usize, first: u64, n: u64) -> bool {
        if self.pending_faults() == 0 {
            return false;
        }
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        pending
            .keys()
            .any(|&(b, p)| b == block && p >= first && p - first < n)
    }

    /// Placement counters.
    pub fn stats(&self) -> PlaceStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PlaceStats {
            copied_pages: l(&c.copied_pages),
            copy_calls: l(&c.copy_calls),
            zero_pages: l(&c.zero_pages),
            zero_calls: l(&c.zero_calls),
            already_present: l(&c.already_present),
            again_retries: l(&c.again_retries),
            lazy_zero_pages: l(&c.lazy_zero_pages),
            faults_resolved_locally: l(&c.faults_resolved_locally),
            faults_forwarded: l(&c.faults_forwarded),
        }
    }
}

impl Drop for UffdRam {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.stop();
        }
        // Leave no thread stuck on a page that will never come.
        let _ = self.unregister_all();
    }
}

impl UffdError {
    /// The errno this error stands for (the protocol machines' `MemoryError::code`).
    pub fn errno(&self) -> i32 {
        match self {
            UffdError::Mem(MemError::Io { source, .. }) | UffdError::Os { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            UffdError::Mem(_) => libc::EINVAL,
            UffdError::Busy { .. } => libc::EAGAIN,
            UffdError::Cancelled => libc::ECANCELED,
        }
    }
}

fn mem_err(e: UffdError) -> MemoryError {
    tracing::warn!("placement failed: {e}");
    MemoryError { code: e.errno() }
}

/// The destination state machine places straight into userfaultfd-registered memory.
impl GuestMemory for UffdRam {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.place(block, offset, data).map_err(mem_err)
    }
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        UffdRam::place_zero(self, block, offset, len).map_err(mem_err)
    }
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        UffdRam::discard(self, block, offset, len).map_err(mem_err)
    }
}
