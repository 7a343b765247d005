//! The deterministic content generator of the vectors ("Pattern generator"
//! in the vectors README): `stream(seed, label, n)` and the page kinds built
//! on it, so guest RAM written through qtest can be regenerated anywhere.

use sha2::{Digest, Sha256};

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
