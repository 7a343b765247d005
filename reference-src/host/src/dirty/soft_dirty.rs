//! Soft-dirty fallback: `/proc/self/clear_refs` "4" and `/proc/self/pagemap` bit 55.
//!
//! Owns the two proc files. Not atomic (see the parent module doc): reading every block's bits
//! and then clearing them process-wide loses writes that land in between.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use super::{os, DirtyError, Mechanism, PageBitmap};
use crate::memory::{GuestRam, MapOptions, RamBlock, PAGE_SIZE};

const SOFT_DIRTY_BIT: u64 = 1 << 55;
/// Pagemap entries read per `pread`.
const CHUNK: usize = 4096;

fn unavailable(why: String) -> DirtyError {
    DirtyError::Unavailable {
        mechanism: Mechanism::SoftDirty,
        why,
    }
}

/// An armed soft-dirty tracker.
pub(crate) struct SoftDirty {
    clear_refs: File,
    pagemap: File,
    entries: Vec<u64>,
}

impl SoftDirty {
    pub(crate) fn start(_ram: &GuestRam) -> Result<Self, DirtyError> {
        probe().map_err(unavailable)?;
        let clear_refs = OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")
            .map_err(|e| unavailable(format!("/proc/self/clear_refs: {e}")))?;
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| unavailable(format!("/proc/self/pagemap: {e}")))?;
        let mut s = Self {
            clear_refs,
            pagemap,
            entries: vec![0; CHUNK],
        };
        s.clear()?;
        Ok(s)
    }

    fn clear(&mut self) -> Result<(), DirtyError> {
        self.clear_refs
            .write_all(b"4")
            .map_err(os("write /proc/self/clear_refs"))
    }

    fn read_block(&mut self, block: &RamBlock) -> Result<PageBitmap, DirtyError> {
        read_bits(&self.pagemap, block, &mut self.entries)
    }

    pub(crate) fn sync(&mut self, ram: &GuestRam) -> Result<Vec<PageBitmap>, DirtyError> {
        let out = ram
            .blocks()
            .iter()
            .map(|b| self.read_block(b))
            .collect::<Result<Vec<_>, _>>()?;
        self.clear()?;
        Ok(out)
    }
}

fn read_bits(pagemap: &File, block: &RamBlock, buf: &mut [u64]) -> Result<PageBitmap, DirtyError> {
    let mut out = PageBitmap::new(block.pages());
    let first_vpn = block.as_ptr() as u64 / PAGE_SIZE as u64;
    let mut page = 0u64;
    while page < block.pages() {
        let n = buf.len().min((block.pages() - page) as usize);
        // SAFETY: viewing `n` initialised u64s as `8n` bytes; u8 has no invalid values.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), n * 8) };
        pagemap
            .read_exact_at(bytes, (first_vpn + page) * 8)
            .map_err(os("read /proc/self/pagemap"))?;
        for (i, e) in buf[..n].iter().enumerate() {
            if e & SOFT_DIRTY_BIT != 0 {
                out.set(page + i as u64);
            }
        }
        page += n as u64;
    }
    Ok(out)
}

/// Probes soft-dirty on a scratch page: after a clear and a write, bit 55 must be set.
pub(crate) fn probe() -> Result<(), String> {
    let ram = GuestRam::new(&[("probe", PAGE_SIZE as u64)], MapOptions::default())
        .map_err(|e| e.to_string())?;
    let b = &ram.blocks()[0];
    b.write(0, &[1]).map_err(|e| e.to_string())?;
    let mut clear = OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .map_err(|e| format!("/proc/self/clear_refs: {e}"))?;
    clear
        .write_all(b"4")
        .map_err(|e| format!("clear_refs 4: {e}"))?;
    b.write(0, &[2]).map_err(|e| e.to_string())?;
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut buf = [0u64; 1];
    let bits = read_bits(&pagemap, b, &mut buf).map_err(|e| e.to_string())?;
    if bits.test(0) {
        Ok(())
    } else {
        Err(
            "pagemap bit 55 not set after a write (kernel built without CONFIG_MEM_SOFT_DIRTY?)"
                .into(),
        )
    }
}
