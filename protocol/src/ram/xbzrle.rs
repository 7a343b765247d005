//! XBZRLE page deltas: validation and application onto the previous contents of a page, and
//! an encoder producing the same format.
//!
//! A delta is a sequence of (zero run, non-zero run) pairs: each run length is an unsigned
//! LEB128 number of one or two bytes (at most 14 bits); a zero run keeps that many bytes of the
//! old page; a non-zero run is followed by that many literal bytes that replace the page's
//! bytes. Only the first zero run may be 0, a non-zero run never is, and the final zero run is
//! left out. Anything else, or a run past the end of the page, breaks `RAM-XBZRLE-DECODE`.

use crate::error::Violation;
use crate::rule::Rule;
use crate::sink::Sink;

/// The encoding byte that precedes an XBZRLE delta (`ENCODING_FLAG_XBZRLE`).
pub const XBZRLE_ENCODING: u8 = 0x01;

/// Reads a one- or two-byte LEB128 run length at `d[i]`, `None` if it has more than 14 bits.
/// The caller guarantees two readable bytes.
#[inline]
fn uleb_small(d: &[u8], i: usize) -> Option<(usize, usize)> {
    let b0 = d[i];
    if b0 & 0x80 == 0 {
        return Some((b0 as usize, 1));
    }
    let b1 = d[i + 1];
    if b1 & 0x80 != 0 {
        return None;
    }
    Some(((b0 & 0x7f) as usize | (b1 as usize) << 7, 2))
}

/// Walks `delta` against a page of `page_len` bytes, calling `lit(page_pos, bytes)` for each
/// literal run. Returns the offset in `delta` of the first malformed byte on error.
fn walk(delta: &[u8], page_len: usize, mut lit: impl FnMut(usize, &[u8])) -> Result<usize, usize> {
    let (mut i, mut d) = (0usize, 0usize);
    while i < delta.len() {
        if delta.len() - i < 2 {
            return Err(i);
        }
        let (z, n) = uleb_small(delta, i).ok_or(i)?;
        if i != 0 && z == 0 {
            return Err(i);
        }
        let zat = i;
        i += n;
        d += z;
        if d > page_len {
            return Err(zat);
        }
        if delta.len() - i < 2 {
            return Err(i);
        }
        let nat = i;
        let (nz, n) = uleb_small(delta, i).ok_or(i)?;
        if nz == 0 {
            return Err(nat);
        }
        i += n;
        if d + nz > page_len || i + nz > delta.len() {
            return Err(nat);
        }
        lit(d, &delta[i..i + nz]);
        d += nz;
        i += nz;
    }
    Ok(d)
}

/// Applies an XBZRLE `delta` onto `page`, which holds the page's previous contents.
///
/// The delta is validated completely before `page` is touched: on error `page` is unchanged and
/// the violation (`RAM-XBZRLE-DECODE`) names `delta_offset` (the absolute channel offset of the
/// delta's first byte) plus the position of the malformed run. Returns the number of page bytes
/// the delta covers (the page's tail after that keeps its old bytes). No allocation.
pub fn xbzrle_apply(delta: &[u8], page: &mut [u8], delta_offset: u64) -> Result<usize, Violation> {
    let bad =
        |at: usize| Violation::new(delta_offset + at as u64, Rule::RamXbzrleDecode, at as u64);
    walk(delta, page.len(), |_, _| {}).map_err(bad)?;
    walk(delta, page.len(), |at, bytes| {
        page[at..at + bytes.len()].copy_from_slice(bytes)
    })
    .map_err(bad)
}

#[inline]
fn put_uleb_small(out: &mut impl Sink, v: usize) {
    if v < 0x80 {
        out.put_u8(v as u8);
    } else {
        out.put(&[(v as u8 & 0x7f) | 0x80, (v >> 7) as u8]);
    }
}

/// The length of the delta from `old` to `new` with QEMU's overflow checks against `cap`
/// (see [`xbzrle_encode`]); `None` on overflow.
fn measure(old: &[u8], new: &[u8], cap: usize) -> Option<usize> {
    let uleb = |v: usize| if v < 0x80 { 1 } else { 2 };
    let n = old.len();
    let (mut i, mut d) = (0usize, 0usize);
    while i < n {
        if d + 2 > cap {
            return None;
        }
        let zs = i;
        while i < n && old[i] == new[i] {
            i += 1;
        }
        if i == n {
            // Unchanged page (0) or a final zero run, which is left out.
            return Some(d);
        }
        d += uleb(i - zs);
        if d + 2 > cap {
            return None;
        }
        let ns = i;
        while i < n && old[i] != new[i] {
            i += 1;
        }
        d += uleb(i - ns);
        if d + (i - ns) > cap {
            return None;
        }
        d += i - ns;
    }
    Some(d)
}

/// Encodes the difference from `old` to `new` (equal lengths, at most 16 KiB so that every run
/// fits in 14 bits) into `out`, as a sender would. Returns the delta's length, or `None` without
/// writing anything if the pages differ in length or are longer than 16383 bytes, or if the
/// delta overflows `max_len` (a sender then sends the page raw). Identical pages give `Some(0)`.
///
/// The overflow test is QEMU's, not just "longer than `max_len`": before each run length the
/// encoder wants two free bytes (also before deciding that only a final zero run is left), and
/// after a non-zero run's length the run's literals must fit. So a delta that ends within the
/// last byte of `max_len` may still overflow, exactly as QEMU's sender decides (a sender that
/// passes the target page size as `max_len` chooses between delta and raw page like QEMU).
pub fn xbzrle_encode(old: &[u8], new: &[u8], max_len: usize, out: &mut impl Sink) -> Option<usize> {
    if old.len() != new.len() || old.len() > 0x3fff {
        return None;
    }
    // First pass: measure; second: write. Runs alternate equal / different.
    let runs = |mut emit: &mut dyn FnMut(usize, usize, usize)| {
        let n = old.len();
        let mut i = 0;
        while i < n {
            let zs = i;
            while i < n && old[i] == new[i] {
                i += 1;
            }
            if i == n {
                break;
            }
            let ns = i;
            while i < n && old[i] != new[i] {
                i += 1;
            }
            emit(ns - zs, ns, i - ns);
        }
        let _ = &mut emit;
    };
    let len = measure(old, new, max_len)?;
    runs(&mut |z, ns, nz| {
        put_uleb_small(out, z);
        put_uleb_small(out, nz);
        out.put(&new[ns..ns + nz]);
    });
    Some(len)
}
