//! Source-side dirty tracking by the kernel: which guest pages were written since the last sync.
//!
//! This module owns [`DirtyTracker`]. The workload never reports its writes: the kernel's page
//! tables do. Two mechanisms, chosen at run time ([`Choice::Auto`] takes the first that works):
//!
//! 1. **userfaultfd async write-protect + `PAGEMAP_SCAN`** ([`Mechanism::UffdWpAsync`], Linux
//!    6.7+; [`wp_async`]): every block is registered in `UFFDIO_REGISTER_MODE_WP` on a
//!    userfaultfd opened with `UFFD_FEATURE_WP_ASYNC` (plus `UFFD_FEATURE_WP_UNPOPULATED` when
//!    offered, so never-touched pages are tracked too) and write-protected. A write to a
//!    protected page is resolved by the kernel itself (no message, no user thread): it just
//!    unprotects the PTE. [`DirtyTracker::sync`] issues `PAGEMAP_SCAN` with
//!    `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, matching pages that are `PAGE_IS_WRITTEN`
//!    and not `PAGE_IS_PFNZERO` (a read of a never-written page maps the shared zero page, which
//!    is not a write): the kernel reports and re-protects them in the same page-table walk, so
//!    a write racing the sync is either in this report or in the next one. Nothing is lost.
//! 2. **soft-dirty** ([`Mechanism::SoftDirty`]; [`soft_dirty`]): `/proc/self/clear_refs` "4"
//!    clears the soft-dirty bits of the whole process, `/proc/self/pagemap` bit 55 reports them.
//!    Reading and clearing are two steps: a write landing between the read of a page's bit and
//!    the clear is lost, so with this mechanism writers must be paused around `sync` (as a VM's
//!    vCPUs are for the final pass). [`Mechanism::atomic`] tells which kind is in use. It also
//!    clears bits process-wide: one soft-dirty tracker per process.
//!
//! Tracking starts at [`DirtyTracker::start`]: the first sync reports pages written after it.
//! [`DirtyTracker::start_deferred`] registers at once and hands the write protection (the costly
//! part: one PTE change per present page) to an [`Arming`] that another thread runs while the
//! caller reads pages it has already covered; tracking of a page starts when its step is done.
//! Bitmaps are per block, one bit per 4 KiB page ([`PageBitmap`] of the protocol crate, whose
//! little-endian wire form is what the source state machine consumes).

pub mod soft_dirty;
pub mod wp_async;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use qmig_protocol::bitmap::PageBitmap;

use crate::memory::{GuestRam, PAGE_SIZE};

/// Which kernel mechanism a tracker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// userfaultfd `WP_ASYNC` write-protection read and re-armed by `PAGEMAP_SCAN`.
    UffdWpAsync,
    /// `/proc/self/clear_refs` + pagemap soft-dirty bit.
    SoftDirty,
}

impl Mechanism {
    /// Whether read-and-reset is one kernel operation (no write can be lost to a racing sync).
    pub fn atomic(self) -> bool {
        matches!(self, Mechanism::UffdWpAsync)
    }

    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::UffdWpAsync => "uffd-wp-async+pagemap-scan",
            Mechanism::SoftDirty => "soft-dirty",
        }
    }
}

/// Which mechanism to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// The first of [`Mechanism::UffdWpAsync`], [`Mechanism::SoftDirty`] that works.
    #[default]
    Auto,
    /// Exactly this one, or an error.
    Only(Mechanism),
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The mechanism is not available on this kernel (the text says why).
    #[error("{mechanism:?} unavailable: {why}")]
    Unavailable {
        /// The mechanism.
        mechanism: Mechanism,
        /// Why.
        why: String,
    },
    /// No mechanism works.
    #[error("no dirty-tracking mechanism available: {0}")]
    NoneAvailable(String),
    /// A kernel call failed while tracking.
    #[error("{what}: {source}")]
    Os {
        /// The operation.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn os(what: &'static str) -> impl FnOnce(io::Error) -> DirtyError {
    move |source| DirtyError::Os { what, source }
}

enum Imp {
    Wp(wp_async::WpAsync),
    Soft(soft_dirty::SoftDirty),
}

/// Kernel dirty tracking over every block of a [`GuestRam`]; see the module doc.
pub struct DirtyTracker {
    ram: Arc<GuestRam>,
    imp: Imp,
}

/// Write protection still to apply after [`DirtyTracker::start_deferred`] (see the module doc).
pub struct Arming {
    ram: Arc<GuestRam>,
    uffd: Arc<crate::uffd::sys::UffdFd>,
}

impl Arming {
    /// Write-protects every block, in block order, `step` bytes at a time; after each step
    /// `marks[b]` holds how many bytes of block `b` are tracked (a page at `offset` is tracked
    /// once `marks[b] > offset`). On an error every mark is set to `u64::MAX`, so no reader
    /// waits for ever, and the error is returned: the tracking is incomplete.
    pub fn run(self, marks: &[AtomicU64], step: usize) -> Result<(), DirtyError> {
        let step = step.max(PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE;
        for (b, block) in self.ram.blocks().iter().enumerate() {
            let len = block.len() as usize;
            let mut at = 0;
            while at < len {
                let n = step.min(len - at);
                if let Err(e) = self
                    .uffd
                    .writeprotect(block.as_ptr().wrapping_add(at), n, true)
                {
                    for m in marks {
                        m.store(u64::MAX, Ordering::Release);
                    }
                    return Err(os("UFFDIO_WRITEPROTECT")(e));
                }
                at += n;
                if let Some(m) = marks.get(b) {
                    m.store(at as u64, Ordering::Release);
                }
            }
        }
        Ok(())
    }
}

impl DirtyTracker {
    /// Like [`start`](Self::start), but with the userfaultfd mechanism the write protection is
    /// returned as an [`Arming`] to run (on any thread) before the first [`sync`](Self::sync)
    /// and before reading a page to send it; `None` when tracking is already fully armed
    /// (soft-dirty).
    pub fn start_deferred(
        ram: Arc<GuestRam>,
        choice: Choice,
    ) -> Result<(Self, Option<Arming>), DirtyError> {
        let wp = match choice {
            Choice::Only(Mechanism::SoftDirty) => None,
            Choice::Only(Mechanism::UffdWpAsync) => Some(wp_async::WpAsync::registered(&ram)?),
            Choice::Auto => wp_async::WpAsync::registered(&ram).ok(),
        };
        match wp {
            Some(w) => {
                let arming = Arming {
                    ram: ram.clone(),
                    uffd: w.uffd(),
                };
                Ok((
                    Self {
                        ram,
                        imp: Imp::Wp(w),
                    },
                    Some(arming),
                ))
            }
            None => Ok((Self::start(ram, choice)?, None)),
        }
    }

    /// Arms tracking on every block of `ram` with the chosen mechanism.
    pub fn start(ram: Arc<GuestRam>, choice: Choice) -> Result<Self, DirtyError> {
        let imp = match choice {
            Choice::Only(Mechanism::UffdWpAsync) => Imp::Wp(wp_async::WpAsync::start(&ram)?),
            Choice::Only(Mechanism::SoftDirty) => Imp::Soft(soft_dirty::SoftDirty::start(&ram)?),
            Choice::Auto => match wp_async::WpAsync::start(&ram) {
                Ok(w) => Imp::Wp(w),
                Err(e1) => match soft_dirty::SoftDirty::start(&ram) {
                    Ok(s) => {
                        tracing::info!("dirty tracking falls back to soft-dirty: {e1}");
                        Imp::Soft(s)
                    }
                    Err(e2) => return Err(DirtyError::NoneAvailable(format!("{e1}; {e2}"))),
                },
            },
        };
        Ok(Self { ram, imp })
    }

    /// The mechanism in use.
    pub fn mechanism(&self) -> Mechanism {
        match self.imp {
            Imp::Wp(_) => Mechanism::UffdWpAsync,
            Imp::Soft(_) => Mechanism::SoftDirty,
        }
    }

    /// The tracked memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Pages written since the previous sync (or [`start`](Self::start)), one bitmap per block
    /// in block order; tracking is re-armed for exactly those pages.
    pub fn sync(&mut self) -> Result<Vec<PageBitmap>, DirtyError> {
        match &mut self.imp {
            Imp::Wp(w) => self.ram.blocks().iter().map(|b| w.sync_block(b)).collect(),
            Imp::Soft(s) => s.sync(&self.ram),
        }
    }
}

/// Whether each mechanism works on this kernel, with the reason when not (probes on a scratch
/// mapping).
pub fn probe() -> [(Mechanism, Result<(), String>); 2] {
    [
        (Mechanism::UffdWpAsync, wp_async::probe()),
        (Mechanism::SoftDirty, soft_dirty::probe()),
    ]
}
