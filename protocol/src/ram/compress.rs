//! zlib pages of QEMU 7.2's `COMPRESS_PAGE` records (feature `compress`).

use crate::error::Violation;
use crate::rule::Rule;

/// Inflates a `COMPRESS_PAGE` body (a zlib stream) into `page`, which must come out exactly
/// full: a malformed stream, a stream that ends early or one that inflates past `page.len()`
/// breaks `RAM-COMPRESS-DECODE`, named at `body_offset` (the absolute offset of the zlib
/// stream's first byte). `page` may hold partial output after an error.
pub fn compress_page_decode(
    body: &[u8],
    page: &mut [u8],
    body_offset: u64,
) -> Result<(), Violation> {
    let bad = |v: u64| Violation::new(body_offset, Rule::RamCompressDecode, v);
    match miniz_oxide::inflate::decompress_slice_iter_to_slice(
        page,
        core::iter::once(body),
        true,
        false,
    ) {
        Ok(n) if n == page.len() => Ok(()),
        Ok(n) => Err(bad(n as u64)),
        Err(_) => Err(bad(page.len() as u64 + 1)),
    }
}

/// Deflates `page` into a zlib stream at level `level` (0..=10), as a 7.2 sender with the
/// compress capability would (QEMU's `compress-level` defaults to 1).
pub fn compress_page_encode(page: &[u8], level: u8) -> alloc::vec::Vec<u8> {
    miniz_oxide::deflate::compress_to_vec_zlib(page, level)
}
