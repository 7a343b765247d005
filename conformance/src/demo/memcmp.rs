//! Comparing the two guests' memory dumps.
//!
//! This module owns [`compare_dumps`]: it reads the source's and the destination's `pmemsave`
//! files side by side in 1 MiB chunks, counts differing 4 KiB pages (and notes the first), and
//! hashes both with SHA-256, so the verdict and the printed digests come from one read.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Page granularity of the difference count.
const PAGE: usize = 4096;

/// The outcome of comparing two dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpComparison {
    /// Bytes of each dump (the shorter one's if they differ in length).
    pub len: u64,
    /// Whether the files differ in length.
    pub length_differs: bool,
    /// 4 KiB pages whose bytes differ.
    pub differing_pages: u64,
    /// Byte offset of the first differing page.
    pub first_difference: Option<u64>,
    /// SHA-256 of the source's dump, hex.
    pub sha256_src: String,
    /// SHA-256 of the destination's dump, hex.
    pub sha256_dst: String,
}

impl DumpComparison {
    /// Byte for byte equal.
    pub fn identical(&self) -> bool {
        !self.length_differs && self.differing_pages == 0 && self.sha256_src == self.sha256_dst
    }
}

fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Compares the dumps at `src` and `dst`.
pub fn compare_dumps(src: &Path, dst: &Path) -> anyhow::Result<DumpComparison> {
    let open = |p: &Path| {
        File::open(p)
            .map(|f| BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("opening {}", p.display()))
    };
    let (mut a, mut b) = (open(src)?, open(dst)?);
    let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut cmp = DumpComparison {
        len: 0,
        length_differs: false,
        differing_pages: 0,
        first_difference: None,
        sha256_src: String::new(),
        sha256_dst: String::new(),
    };
    loop {
        let na = fill(&mut a, &mut ba)?;
        let nb = fill(&mut b, &mut bb)?;
        ha.update(&ba[..na]);
        hb.update(&bb[..nb]);
        let n = na.min(nb);
        for (i, (pa, pb)) in ba[..n].chunks(PAGE).zip(bb[..n].chunks(PAGE)).enumerate() {
            if pa != pb {
                cmp.differing_pages += 1;
                cmp.first_difference
                    .get_or_insert(cmp.len + (i * PAGE) as u64);
            }
        }
        cmp.len += n as u64;
        if na != nb {
            cmp.length_differs = true;
        }
        if na == 0 || nb == 0 {
            // Hash whatever remains of the longer file so both digests cover whole files.
            let mut rest = Vec::new();
            a.read_to_end(&mut rest)?;
            ha.update(&rest);
            rest.clear();
            b.read_to_end(&mut rest)?;
            hb.update(&rest);
            cmp.length_differs |= na != nb;
            break;
        }
    }
    cmp.sha256_src = hex(&ha.finalize());
    cmp.sha256_dst = hex(&hb.finalize());
    Ok(cmp)
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn equal_and_different_dumps() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 8192).map(|i| (i * 7 % 251) as u8).collect();
        let a = write(dir.path(), "a", &data);
        let b = write(dir.path(), "b", &data);
        let c = compare_dumps(&a, &b).unwrap();
        assert!(c.identical());
        assert_eq!(c.len, data.len() as u64);
        assert_eq!(
            c.sha256_src,
            hex(&Sha256::digest(&data)),
            "digest of the whole file"
        );

        let mut other = data.clone();
        other[(2 << 20) + 5] ^= 1;
        other[(2 << 20) + 4096 * 3] ^= 1;
        let d = write(dir.path(), "d", &other);
        let c = compare_dumps(&a, &d).unwrap();
        assert!(!c.identical());
        assert_eq!(c.differing_pages, 2);
        assert_eq!(c.first_difference, Some(2 << 20));

        let e = write(dir.path(), "e", &data[..data.len() - 1]);
        let c = compare_dumps(&a, &e).unwrap();
        assert!(c.length_differs && !c.identical());
        assert_eq!(c.sha256_dst, hex(&Sha256::digest(&data[..data.len() - 1])));
    }
}
