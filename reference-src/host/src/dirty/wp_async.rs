//! userfaultfd asynchronous write-protect + `PAGEMAP_SCAN` (Linux 6.7+).
//!
//! Owns the WP-mode userfaultfd and the `/proc/self/pagemap` descriptor used to read and
//! re-protect written pages in one ioctl per block (looping when the output vector fills).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::{os, DirtyError, Mechanism, PageBitmap};
use crate::memory::{GuestRam, MapOptions, RamBlock, PAGE_SIZE};
use crate::uffd::sys::pagemap::{
    PageRegion, PmScanArg, PAGEMAP_SCAN, PAGE_IS_PFNZERO, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC,
    PM_SCAN_WP_MATCHING,
};
use crate::uffd::sys::{feature, mode, UffdFd};

/// Regions fetched per `PAGEMAP_SCAN` call.
const VEC_LEN: usize = 1024;

fn unavailable(why: String) -> DirtyError {
    DirtyError::Unavailable {
        mechanism: Mechanism::UffdWpAsync,
        why,
    }
}

/// An armed WP-async tracker.
pub(crate) struct WpAsync {
    uffd: Arc<UffdFd>,
    pagemap: File,
    regions: Vec<PageRegion>,
    ranges: Vec<(*mut u8, usize)>,
}

// SAFETY: the raw pointers are only addresses of mappings owned by the `GuestRam` the tracker
// was started on (kept alive by `DirtyTracker`); they are passed to the kernel, never
// dereferenced here.
unsafe impl Send for WpAsync {}

impl WpAsync {
    /// Registers and write-protects every block.
    pub(crate) fn start(ram: &GuestRam) -> Result<Self, DirtyError> {
        let w = Self::registered(ram)?;
        for &(p, l) in &w.ranges {
            w.uffd
                .writeprotect(p, l, true)
                .map_err(os("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(w)
    }

    /// The userfaultfd, for write-protecting from another thread ([`super::Arming`]).
    pub(crate) fn uffd(&self) -> Arc<UffdFd> {
        self.uffd.clone()
    }

    /// Registers every block in write-protect mode without protecting anything yet.
    pub(crate) fn registered(ram: &GuestRam) -> Result<Self, DirtyError> {
        let avail =
            UffdFd::available_features().map_err(|e| unavailable(format!("userfaultfd: {e}")))?;
        if avail & feature::WP_ASYNC == 0 {
            return Err(unavailable(
                "kernel lacks UFFD_FEATURE_WP_ASYNC (6.7+)".into(),
            ));
        }
        let want = feature::WP_ASYNC | (avail & feature::WP_UNPOPULATED);
        let uffd = UffdFd::open(want).map_err(|e| unavailable(format!("UFFDIO_API: {e}")))?;
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| unavailable(format!("/proc/self/pagemap: {e}")))?;
        let mut ranges = Vec::new();
        for b in ram.blocks() {
            let (p, l) = (b.as_ptr(), b.len() as usize);
            uffd.register(p, l, mode::WP)
                .map_err(|e| unavailable(format!("UFFDIO_REGISTER wp: {e}")))?;
            ranges.push((p, l));
        }
        Ok(Self {
            uffd: Arc::new(uffd),
            pagemap,
            regions: vec![PageRegion::default(); VEC_LEN],
            ranges,
        })
    }

    pub(crate) fn sync_block(&mut self, block: &RamBlock) -> Result<PageBitmap, DirtyError> {
        let base = block.as_ptr() as u64;
        let end = base + block.len();
        let mut out = PageBitmap::new(block.pages());
        let mut start = base;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                // written AND NOT zero-pfn
                category_inverted: PAGE_IS_PFNZERO,
                category_mask: PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: PAGEMAP_SCAN reads one `pm_scan_arg` and writes at most `vec_len`
            // `page_region`s into `self.regions`, which has that many; it only changes page
            // protection of our own tracked range.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                return Err(os("PAGEMAP_SCAN")(std::io::Error::last_os_error()));
            }
            for r in &self.regions[..n as usize] {
                let first = (r.start - base) / PAGE_SIZE as u64;
                let count = (r.end - r.start) / PAGE_SIZE as u64;
                out.set_range(first, count);
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(out)
    }
}

impl Drop for WpAsync {
    fn drop(&mut self) {
        for &(p, l) in &self.ranges {
            let _ = self.uffd.unregister(p, l);
        }
    }
}

/// Probes the mechanism on a scratch block: arm, write one page, expect exactly that page.
pub(crate) fn probe() -> Result<(), String> {
    let ram = GuestRam::new(&[("probe", 4 * PAGE_SIZE as u64)], MapOptions::default())
        .map_err(|e| e.to_string())?;
    let mut t = WpAsync::start(&ram).map_err(|e| e.to_string())?;
    ram.blocks()[0]
        .write(PAGE_SIZE as u64, &[1])
        .map_err(|e| e.to_string())?;
    let got = t.sync_block(&ram.blocks()[0]).map_err(|e| e.to_string())?;
    let ones: Vec<u64> = got.iter_ones().collect();
    if ones == [1] {
        Ok(())
    } else {
        Err(format!("probe wrote page 1, scan reported {ones:?}"))
    }
}
