//! The footer search shared by every footer scan of one device payload: the top-level scan,
//! the scans nested in its candidates' lookaheads, and theirs.
//!
//! A footer scan looks for `7E <section id>` in a window of up to the device cap. A payload
//! with many candidate footers starts one lookahead per candidate, and each lookahead may scan
//! the next cap bytes again for another section's footer: searched directly, that is
//! (candidates) x (cap) bytes. This module owns [`FooterSearch`]: it searches directly
//! (`memmem`) until the bytes searched exceed [`FooterSearch::budget`] (a small multiple of
//! the channel bytes seen after the payload start), then indexes every footer-shaped position
//! (`7E` and the four bytes after it) of the ranges queried, once, and answers later queries
//! from the index (binary search in a few sorted runs). The answer is always the first
//! position of the pattern in the range: the same as a direct search.
//!
//! Cost: direct bytes at most the budget; each channel byte is indexed at most once; a query
//! on indexed bytes is `O(log² n)`. Memory: 8 bytes per `7E` byte indexed, only once the
//! budget is exceeded; the ranges queried lie within a few device caps of the payload start
//! (the lookahead depth), so at most `8 x 3 x (max_device_payload + 5)` bytes plus the runs'
//! bookkeeping.

use crate::section::FOOTER_LEN;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

#[cfg(feature = "alloc")]
/// Bytes searched directly before the index is used, besides the budget's multiple.
const FREE_BYTES: u64 = 256 << 10;
#[cfg(feature = "alloc")]
/// How many times the channel bytes seen may be searched directly.
const DIRECT_FACTOR: u64 = 4;
#[cfg(feature = "alloc")]
/// The footer's type byte.
const FOOTER_BYTE: u8 = 0x7e;

#[cfg(feature = "alloc")]
/// One sorted run of indexed positions: `(section id, absolute offset)` in ascending order.
#[derive(Clone, Default)]
struct Run {
    entries: Vec<(u32, u64)>,
}

#[cfg(feature = "alloc")]
/// Footer search state for the device payload at [`FooterSearch::at`].
#[derive(Clone)]
pub(super) struct FooterSearch {
    /// Absolute offset of the payload this search serves.
    pub(super) at: u64,
    /// Absolute end of the farthest input seen.
    seen_end: u64,
    /// Bytes searched directly for this payload.
    direct: u64,
    /// Indexed ranges of positions, sorted, disjoint, not adjacent: `[lo, hi)` absolute.
    covered: Vec<(u64, u64)>,
    /// Sorted runs; a run is at most half the size of the one before it.
    runs: Vec<Run>,
    /// Work done (cumulative over the decoder's life, carried to the next payload's search):
    /// bytes searched directly, positions indexed, index probes.
    pub(super) work: u64,
}

#[cfg(feature = "alloc")]
impl FooterSearch {
    /// An empty search for the payload at `at`, carrying the `work` count.
    pub(super) fn new(at: u64, work: u64) -> Self {
        FooterSearch {
            at,
            seen_end: at,
            direct: 0,
            covered: Vec::new(),
            runs: Vec::new(),
            work,
        }
    }

    /// Bytes that may be searched directly before the index is used.
    fn budget(&self) -> u64 {
        DIRECT_FACTOR * (self.seen_end - self.at) + FREE_BYTES
    }

    /// The first position `p >= from` with `hay[p..p + 5] == pat`. `hay[0]` is the channel
    /// byte at absolute offset `hay_at` (at or after [`FooterSearch::at`]).
    pub(super) fn find(
        &mut self,
        hay: &[u8],
        hay_at: u64,
        from: usize,
        pat: &[u8; FOOTER_LEN],
    ) -> Option<usize> {
        if hay.len() < from.saturating_add(FOOTER_LEN) || hay_at < self.at {
            return direct(hay, from, pat);
        }
        self.seen_end = self.seen_end.max(hay_at + hay.len() as u64);
        // Positions [s, e) may hold a whole pattern.
        let s = hay_at + from as u64;
        let e = hay_at + (hay.len() - (FOOTER_LEN - 1)) as u64;
        if self.covered.is_empty() && self.direct + (e - s) <= self.budget() {
            // Nothing indexed and within the budget (every ordinary stream): search directly.
            let r = direct(hay, from, pat);
            let n = r.map_or(hay.len() - from, |p| p + FOOTER_LEN - from) as u64;
            self.direct += n;
            self.work += n;
            return r;
        }
        let gaps = self.gaps(s, e);
        let gap_bytes: u64 = gaps.iter().map(|(a, b)| b - a).sum();
        if !gaps.is_empty() && self.direct + gap_bytes > self.budget() {
            for &(a, b) in &gaps {
                self.index(hay, hay_at, a, b);
            }
        }
        let id = u32::from_be_bytes([pat[1], pat[2], pat[3], pat[4]]);
        let mut best: Option<u64> = None;
        if !self.covered.is_empty() {
            for run in &self.runs {
                self.work += 1 + run.entries.len().max(1).ilog2() as u64;
                let i = run.entries.partition_point(|&(k, p)| (k, p) < (id, s));
                if let Some(&(k, p)) = run.entries.get(i) {
                    if k == id && p < e && best.map_or(true, |b| p < b) {
                        best = Some(p);
                    }
                }
            }
        }
        // Ranges not indexed: searched directly, up to the best indexed hit.
        for (a, b) in self.gaps(s, e) {
            if best.is_some_and(|x| x <= a) {
                break;
            }
            let lo = (a - hay_at) as usize;
            let hi = (b.min(best.unwrap_or(b)) - hay_at) as usize + FOOTER_LEN - 1;
            let n = (hi - lo) as u64;
            self.direct += n;
            self.work += n;
            if let Some(j) = memchr::memmem::find(&hay[lo..hi], pat) {
                best = Some(hay_at + (lo + j) as u64);
                break;
            }
        }
        best.map(|p| (p - hay_at) as usize)
    }

    /// The parts of `[s, e)` not covered by the index, in order.
    fn gaps(&self, s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut cur = s;
        let first = self.covered.partition_point(|&(_, hi)| hi <= s);
        for &(lo, hi) in &self.covered[first..] {
            if lo >= e {
                break;
            }
            if lo > cur {
                out.push((cur, lo));
            }
            cur = cur.max(hi);
        }
        if cur < e {
            out.push((cur, e));
        }
        out
    }

    /// Indexes the positions `[a, b)` (each with its four id bytes inside `hay`).
    fn index(&mut self, hay: &[u8], hay_at: u64, a: u64, b: u64) {
        let lo = (a - hay_at) as usize;
        let hi = (b - hay_at) as usize;
        self.work += (hi - lo) as u64;
        let mut run: Vec<(u32, u64)> = memchr::memchr_iter(FOOTER_BYTE, &hay[lo..hi])
            .map(|j| {
                let p = lo + j;
                let id = u32::from_be_bytes([hay[p + 1], hay[p + 2], hay[p + 3], hay[p + 4]]);
                (id, hay_at + p as u64)
            })
            .collect();
        run.sort_unstable();
        self.work += run.len() as u64;
        // Keep each run at most half the size of the one before: O(log n) runs, each entry
        // merged O(log n) times. A range without a `7E` adds no run (a decoder fed a byte at a
        // time indexes a byte at a time).
        if !run.is_empty() {
            self.runs.push(Run { entries: run });
        }
        while self.runs.len() >= 2 {
            let n = self.runs.len();
            if self.runs[n - 1].entries.len() * 2 <= self.runs[n - 2].entries.len() {
                break;
            }
            let top = self.runs.pop().unwrap_or_default();
            let below = self.runs.pop().unwrap_or_default();
            self.work += (top.entries.len() + below.entries.len()) as u64;
            self.runs.push(Run {
                entries: merge(below.entries, top.entries),
            });
        }
        // Record [a, b) as covered, joining neighbours.
        let i = self.covered.partition_point(|&(_, hi)| hi < a);
        let mut lo = a;
        let mut hi = b;
        let mut j = i;
        while j < self.covered.len() && self.covered[j].0 <= hi {
            lo = lo.min(self.covered[j].0);
            hi = hi.max(self.covered[j].1);
            j += 1;
        }
        self.covered.splice(i..j, [(lo, hi)]);
    }
}

#[cfg(feature = "alloc")]
/// Merges two sorted lists.
fn merge(a: Vec<(u32, u64)>, b: Vec<(u32, u64)>) -> Vec<(u32, u64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// The first position at or after `from` where `pat` starts in `hay`.
pub(super) fn direct(hay: &[u8], from: usize, pat: &[u8; FOOTER_LEN]) -> Option<usize> {
    let tail = hay.get(from..)?;
    memchr::memmem::find(tail, pat).map(|j| from + j)
}
