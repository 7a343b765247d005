//! Filling guest RAM blocks with known content, and checking it.
//!
//! This module owns the synthetic content used by tests, benchmarks and the reference binaries:
//! every page's bytes are a pure function of `(content, seed, page index)` ([`page_content`]), so
//! any page can be regenerated and compared on the other side of a migration without keeping a
//! copy. It also loads a block from a raw image file (e.g. a `pmemsave` dump) and compares a
//! block with one.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::memory::{MemError, RamBlock, PAGE_SIZE};

/// Synthetic content of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zero.
    Zero,
    /// Every page random (ChaCha8 keyed by seed and page index).
    Random {
        /// Seed.
        seed: u64,
    },
    /// Each page zero or random with probability 1/2, chosen by the seed.
    Mixed {
        /// Seed.
        seed: u64,
    },
    /// A cheap recognisable pattern: word `i` of page `p` is `(p << 32 | i) ^ seed`.
    Pattern {
        /// Seed.
        seed: u64,
    },
}

fn page_rng(seed: u64, page: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&page.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Writes page `page`'s content into `out` ([`PAGE_SIZE`] bytes).
pub fn page_content(content: Content, page: u64, out: &mut [u8; PAGE_SIZE]) {
    match content {
        Content::Zero => out.fill(0),
        Content::Random { seed } => page_rng(seed, page).fill_bytes(out),
        Content::Mixed { seed } => {
            let mut rng = page_rng(seed, page);
            if rng.next_u32() & 1 == 0 {
                out.fill(0);
            } else {
                rng.fill_bytes(out);
            }
        }
        Content::Pattern { seed } => {
            for (i, w) in out.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(((page << 32) | i as u64) ^ seed).to_le_bytes());
            }
        }
    }
}

/// Fills the whole block with `content`.
pub fn fill(block: &RamBlock, content: Content) -> Result<(), MemError> {
    let (mut page, mut have) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
    for p in 0..block.pages() {
        page_content(content, p, &mut page);
        if page == [0u8; PAGE_SIZE] {
            // Store zeros only over non-zero bytes: fresh anonymous memory stays unpopulated.
            block.read(p * PAGE_SIZE as u64, &mut have)?;
            if have == page {
                continue;
            }
        }
        block.write(p * PAGE_SIZE as u64, &page)?;
    }
    Ok(())
}

/// Fills the block from a raw image file: the file may be shorter than the block (the rest is
/// left as it is), not longer.
pub fn fill_from_image(block: &RamBlock, path: &Path) -> Result<(), MemError> {
    let io = |what| move |source| MemError::Io { what, source };
    let mut f = File::open(path).map_err(io("open image"))?;
    let len = f.metadata().map_err(io("stat image"))?.len();
    block.check(0, len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = buf.len().min((len - off) as usize);
        f.read_exact(&mut buf[..n]).map_err(io("read image"))?;
        block.write(off, &buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Pages of `block` whose bytes differ from `content` (ascending page indices).
pub fn mismatches(block: &RamBlock, content: Content) -> Vec<u64> {
    let (mut want, mut have) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
    (0..block.pages())
        .filter(|&p| {
            page_content(content, p, &mut want);
            // Cannot fail: p is inside the block.
            let _ = block.read(p * PAGE_SIZE as u64, &mut have);
            want != have
        })
        .collect()
}

/// Pages of `block` whose bytes differ from the raw image file at `path` (a page past the end
/// of the file is compared with zeros).
pub fn image_mismatches(block: &RamBlock, path: &Path) -> Result<Vec<u64>, MemError> {
    let io = |what| move |source| MemError::Io { what, source };
    let mut f = File::open(path).map_err(io("open image"))?;
    let len = f.metadata().map_err(io("stat image"))?.len();
    block.check(0, len)?;
    let (mut want, mut have) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
    let mut out = Vec::new();
    for p in 0..block.pages() {
        let start = p * PAGE_SIZE as u64;
        want.fill(0);
        if start < len {
            let n = (len - start).min(PAGE_SIZE as u64) as usize;
            f.read_exact(&mut want[..n]).map_err(io("read image"))?;
        }
        block.read(start, &mut have)?;
        if want != have {
            out.push(p);
        }
    }
    Ok(out)
}

/// Pages that differ between two equally long snapshots (ascending page indices).
pub fn diff_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, MapOptions};

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn contents_are_deterministic_and_verifiable() {
        let ram = GuestRam::new(&[("a", 64 * P)], MapOptions::default()).unwrap();
        let b = &ram.blocks()[0];
        for c in [
            Content::Zero,
            Content::Random { seed: 1 },
            Content::Mixed { seed: 2 },
            Content::Zero,
            Content::Pattern { seed: 3 },
        ] {
            fill(b, c).unwrap();
            assert!(mismatches(b, c).is_empty(), "{c:?}");
        }
        // Pattern is what it says; Random differs by seed and page.
        let mut x = [0u8; PAGE_SIZE];
        page_content(Content::Pattern { seed: 3 }, 5, &mut x);
        assert_eq!(
            u64::from_le_bytes(x[8..16].try_into().unwrap()),
            (5 << 32 | 1) ^ 3
        );
        let (mut r1, mut r2) = ([0u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        page_content(Content::Random { seed: 1 }, 0, &mut r1);
        page_content(Content::Random { seed: 1 }, 1, &mut r2);
        assert_ne!(r1, r2);
        // Mixed is about half zero pages.
        let zero = (0..1000)
            .filter(|&p| {
                page_content(Content::Mixed { seed: 9 }, p, &mut x);
                x == [0u8; PAGE_SIZE]
            })
            .count();
        assert!((400..600).contains(&zero), "{zero} zero pages of 1000");
        // A changed page is found.
        b.write(7 * P + 1, &[0xFF]).unwrap();
        assert_eq!(mismatches(b, Content::Pattern { seed: 3 }), [7]);
    }

    #[test]
    fn image_round_trip() {
        let ram = GuestRam::new(&[("a", 8 * P), ("b", 8 * P)], MapOptions::default()).unwrap();
        let (a, b) = (&ram.blocks()[0], &ram.blocks()[1]);
        fill(a, Content::Mixed { seed: 4 }).unwrap();
        let path = std::env::temp_dir().join(format!("qmig-host-img-{}", std::process::id()));
        a.dump(&path).unwrap();
        fill_from_image(b, &path).unwrap();
        assert_eq!(a.snapshot(), b.snapshot());
        assert!(image_mismatches(b, &path).unwrap().is_empty());
        b.write(3 * P, &[1]).unwrap();
        assert_eq!(image_mismatches(b, &path).unwrap(), [3]);
        assert_eq!(diff_pages(&a.snapshot(), &b.snapshot()), [3]);
        std::fs::remove_file(&path).unwrap();
    }
}
