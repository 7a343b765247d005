//! The deterministic content generator of the vectors ("Pattern generator"
//! in the vectors README): `stream(seed, label, n)` and the page kinds built
//! on it, so guest RAM written through qtest can be regenerated anywhere;
//! and [`pattern`], the set of pages a scenario writes.

use sha2::{Digest, Sha256};

use super::launch::Machine;

/// Target page size of every machine the harness runs.
pub const PAGE: usize = 4096;

/// The first `n` bytes of `SHA256("qemu-mig-vector" || u64le(seed) || label || u32le(i))`
/// for `i = 0, 1, ...` concatenated.
pub fn stream(seed: u64, label: &[u8], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 32);
    let mut i: u32 = 0;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(b"qemu-mig-vector");
        h.update(seed.to_le_bytes());
        h.update(label);
        h.update(i.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        i += 1;
    }
    out.truncate(n);
    out
}

/// Random page `page`, generation `gen`: `stream(seed, "page" || u64le(page) || u32le(gen), 4096)`.
pub fn random_page(seed: u64, page: u64, gen: u32) -> Vec<u8> {
    let mut label = b"page".to_vec();
    label.extend_from_slice(&page.to_le_bytes());
    label.extend_from_slice(&gen.to_le_bytes());
    stream(seed, &label, PAGE)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// One guest page written through qtest before the migration.
#[derive(Debug, Clone)]
pub struct Write {
    /// Page index from guest-physical 0.
    pub page: u64,
    /// `random` or `fill`.
    pub kind: &'static str,
    /// Generation (always 0 here).
    pub gen: u32,
    /// The page content.
    pub data: Vec<u8>,
}

/// The pages a scenario writes: pages 0-7 random, 8-11 repeated bytes
/// (0x01, 0x80, 0xff, 0x5a), 511 random and 512 repeated (a 2 MiB
/// boundary), the last page random, then `random_pages` random pages chosen
/// by `stream(seed, "select")`; never the machine's reserved pages.
pub fn pattern(seed: u64, machine: Machine, ram_mb: u64, random_pages: u64) -> Vec<Write> {
    let pages = (ram_mb << 20) / PAGE as u64;
    let reserved = machine.reserved_pages();
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |page: u64, kind: &'static str, data: Vec<u8>, out: &mut Vec<Write>| {
        if page < pages && !reserved.contains(&page) && used.insert(page) {
            out.push(Write {
                page,
                kind,
                gen: 0,
                data,
            });
        }
    };
    for p in 0..8 {
        add(p, "random", random_page(seed, p, 0), &mut out);
    }
    for (p, b) in [(8u64, 0x01u8), (9, 0x80), (10, 0xff), (11, 0x5a)] {
        add(p, "fill", vec![b; PAGE], &mut out);
    }
    add(511, "random", random_page(seed, 511, 0), &mut out);
    add(512, "fill", vec![0x33; PAGE], &mut out);
    add(
        pages - 1,
        "random",
        random_page(seed, pages - 1, 0),
        &mut out,
    );
    let sel = stream(seed, b"select", (random_pages as usize) * 16 + 64);
    let mut n = 0;
    for c in sel.chunks_exact(4) {
        if n == random_pages {
            break;
        }
        let p = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64 % pages;
        let before = out.len();
        add(p, "random", random_page(seed, p, 0), &mut out);
        n += (out.len() > before) as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_prefix_stable() {
        let a = stream(1, b"x", 100);
        let b = stream(1, b"x", 40);
        assert_eq!(&a[..40], &b[..]);
        assert_ne!(stream(2, b"x", 40), b);
        assert_eq!(random_page(1, 3, 0).len(), PAGE);
    }
}
