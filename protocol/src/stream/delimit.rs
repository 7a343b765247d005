//! Delimiting a device section's payload: by its VM description when the decoder has one,
//! otherwise by a footer scan that accepts a candidate `7E <id>` only if the bytes after it
//! decode as the next items of the stream (validated by a copy of the decoder, recursively, to
//! a bounded depth). A scan that runs out of bytes keeps its progress (the first candidate not
//! yet rejected, and that candidate's lookahead decoder) so that the next call on a longer
//! input resumes instead of starting over.

use super::footer_index::direct;
#[cfg(feature = "alloc")]
use super::footer_index::FooterSearch;
use super::{Item, Phase, StreamDecoder, LOOKAHEAD_DEPTH, LOOKAHEAD_ITEMS, NESTED_CANDIDATES};
use crate::error::{WireError, WireResult};
use crate::rule::Rule;
use crate::section::{footer_bytes, FOOTER_LEN};

impl StreamDecoder {
    /// The payload length of the current device section in `input` (which starts at the
    /// payload). `package_limited`: `input` ends at the package boundary.
    pub(super) fn delimit(
        &mut self,
        input: &[u8],
        section_id: u32,
        package_limited: bool,
    ) -> WireResult<usize> {
        #[cfg(feature = "vmdesc")]
        if let (Some(desc), Some(info)) = (&self.vmdesc, &self.current) {
            if let Some(dev) = desc.device(info.idstr(), info.instance_id) {
                let cap = self.limits.max_device_payload as usize;
                // The payload and the byte after it (which tells whether a subsection follows).
                let window = &input[..input.len().min(cap + 1)];
                return match crate::device::measure(dev, window, self.offset, &self.limits) {
                    Err(WireError::Incomplete { .. }) if window.len() > cap => Err(
                        WireError::invalid(self.offset, Rule::SecDeviceLen, window.len() as u64),
                    ),
                    Ok(n) if n > cap => Err(WireError::invalid(
                        self.offset,
                        Rule::SecDeviceLen,
                        n as u64,
                    )),
                    // The described fields and subsections end here, so the footer must
                    // follow: any other byte (extra data, a subsection of another device) is
                    // a payload that does not match its description.
                    Ok(n) => match window.get(n) {
                        Some(&b) if b != crate::codes::SectionType::FOOTER.0 => Err(
                            WireError::invalid(self.offset + n as u64, Rule::DevSchema, b as u64),
                        ),
                        _ => Ok(n),
                    },
                    r => r,
                };
            }
        }
        // Candidates already rejected for this payload (on an earlier, shorter input) stay
        // rejected: a violation found in a prefix is one in any extension of it. A candidate
        // whose lookahead was waiting for bytes resumes that lookahead where it stopped (the
        // items it decoded are the same in any extension), so that a payload fed a few bytes
        // at a time costs time linear in its length, not quadratic.
        self.start_search();
        let (from, rejected, saved) = match self.scan_hint.take() {
            Some(h) if h.at == self.offset => (h.from, h.rejected, h.look),
            _ => (0, 0, Saved::default()),
        };
        let scan = Scan {
            from,
            rejected,
            saved,
        };
        let (r, scan) = self.footer_scan(input, section_id, package_limited, scan);
        self.scan_hint = match r {
            Err(WireError::Incomplete { .. }) => Some(ScanHint {
                at: self.offset,
                from: scan.from,
                rejected: scan.rejected,
                look: scan.saved,
            }),
            _ => None,
        };
        r
    }

    /// Scans for the first plausible footer at or after payload offset `scan.from`. Also
    /// returns where a later call on a longer input may resume (the first candidate not yet
    /// rejected, how many were rejected before it, and its lookahead).
    ///
    /// A scan inside a lookahead (a payload that follows a candidate footer of an enclosing
    /// payload) validates at most [`NESTED_CANDIDATES`] candidates; one more makes it fail
    /// (SEC-DELIMIT), so the enclosing candidate is rejected. Without that bound, lookalike
    /// footers nested one level down cost each enclosing candidate a validation of every
    /// nested candidate after it: quadratic in the candidates. The top-level scan has no
    /// bound (its candidates are validated once each).
    fn footer_scan(
        &mut self,
        input: &[u8],
        section_id: u32,
        package_limited: bool,
        scan: Scan,
    ) -> (WireResult<usize>, Scan) {
        let Scan {
            mut from,
            mut rejected,
            mut saved,
        } = scan;
        let nested = self.depth != LOOKAHEAD_DEPTH;
        let pat = footer_bytes(section_id);
        let cap = self.limits.max_device_payload as usize;
        let is_final = self.is_final || package_limited;
        let at = self.offset;
        let invalid = |rule, value| Err(WireError::invalid(at, rule, value));
        // A footer within the cap lies inside the first cap + FOOTER_LEN bytes: nothing after
        // them is looked at, so the scan costs at most the cap, and the violation for a payload
        // without one (its value: that window's length) is the same for any chunking.
        let window = &input[..input.len().min(cap.saturating_add(FOOTER_LEN))];
        let done = |from, rejected| Scan {
            from,
            rejected,
            saved: Saved::default(),
        };
        while let Some(q) = self.find_footer(window, from, &pat) {
            if self.depth == 0 {
                return (Ok(q), done(q, rejected));
            }
            if nested && rejected >= NESTED_CANDIDATES {
                return (
                    invalid(Rule::SecDelimit, section_id as u64),
                    done(q, rejected),
                );
            }
            match self.plausible_after(input, q, is_final, restore(&mut saved, q)) {
                (Ok(true), _) => return (Ok(q), done(q, rejected)),
                (Ok(false), _) => {
                    from = q + 1;
                    rejected += 1;
                }
                (Err(e), look) => {
                    let scan = Scan {
                        from: q,
                        rejected,
                        saved: look,
                    };
                    return (Err(e), scan);
                }
            }
        }
        if window.len() >= cap.saturating_add(FOOTER_LEN) {
            return (
                invalid(Rule::SecDeviceLen, window.len() as u64),
                done(from, rejected),
            );
        }
        if is_final {
            return (
                invalid(Rule::SecDelimit, section_id as u64),
                done(from, rejected),
            );
        }
        // No candidate starts before the last FOOTER_LEN - 1 bytes.
        let next = from.max(window.len().saturating_sub(FOOTER_LEN - 1));
        (
            Err(WireError::Incomplete { needed: 1 }),
            done(next, rejected),
        )
    }

    /// Whether the bytes after a candidate footer at payload offset `q` decode as the next
    /// items. `Incomplete` when they run out and the input is not final; the lookahead is then
    /// returned, to be resumed by the next call (`resumed`) on a longer input.
    fn plausible_after(
        &mut self,
        input: &[u8],
        q: usize,
        is_final: bool,
        resumed: Option<Held>,
    ) -> (WireResult<bool>, Saved) {
        // Taken out first: a lookahead borrows the search, it never copies it.
        #[allow(clippy::let_unit_value)] // `()` without alloc
        let search = core::mem::take(&mut self.search);
        // A lookahead resumes only over the bytes it had: a caller that gives a shorter input
        // than before (against `decode`'s contract) gets a fresh one, not a panic.
        let resumed = resumed.filter(|l| q + FOOTER_LEN + l.used <= input.len());
        let mut st = resumed.unwrap_or_else(|| {
            let mut look = self.clone();
            look.depth = self.depth - 1;
            look.phase = Phase::Body;
            look.current = None;
            look.scan_hint = None;
            look.offset = self.offset + (q + FOOTER_LEN) as u64;
            hold(Lookahead {
                q,
                decoder: look,
                used: 0,
                items: 0,
            })
        });
        st.decoder.is_final = self.is_final;
        // The lookahead (and the scans nested in it) search with this payload's index.
        st.decoder.search = search;
        let r = Self::run_lookahead(&mut st, &input[q + FOOTER_LEN..], is_final);
        self.search = core::mem::take(&mut st.decoder.search);
        self.count_scan_work(1);
        match r {
            Err(e) => (Err(e), save(st)),
            Ok(v) => (Ok(v), Saved::default()),
        }
    }

    /// Decodes the lookahead's items up to [`LOOKAHEAD_ITEMS`] from `after` (the bytes after
    /// the candidate footer): `Ok(false)` on a violation, `Ok(true)` when they are all there
    /// (or the input ends and is final), `Incomplete` otherwise.
    fn run_lookahead(st: &mut Held, after: &[u8], is_final: bool) -> WireResult<bool> {
        let mut rest = &after[st.used..];
        while st.items < LOOKAHEAD_ITEMS {
            match st.decoder.decode(rest) {
                Ok((Item::VmDescription(_), _)) => return Ok(true),
                Ok((_, n)) => {
                    rest = &rest[n..];
                    st.used += n;
                    st.items += 1;
                }
                Err(WireError::Invalid(_)) => return Ok(false),
                Err(WireError::Incomplete { .. }) => {
                    return if is_final {
                        Ok(true)
                    } else {
                        Err(WireError::Incomplete { needed: 1 })
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Where a footer scan that needed more bytes resumes (kept in [`StreamDecoder`]).
#[derive(Clone)]
pub(super) struct ScanHint {
    /// The payload offset the hint is for.
    at: u64,
    /// Payload offset of the first candidate not yet rejected.
    from: usize,
    /// Candidates rejected before `from` (bounded in nested scans).
    rejected: u32,
    /// The lookahead of the candidate at `from`, if it was waiting for bytes.
    look: Saved,
}

/// A footer scan's progress, passed in and out of [`StreamDecoder::footer_scan`].
struct Scan {
    /// Payload offset of the first candidate not yet rejected.
    from: usize,
    /// Candidates rejected before `from`.
    rejected: u32,
    /// The lookahead of the candidate at `from`, if it was waiting for bytes.
    saved: Saved,
}

/// A candidate footer's lookahead, stopped for want of bytes.
#[derive(Clone)]
struct Lookahead {
    /// Payload offset of the candidate.
    #[cfg_attr(not(feature = "alloc"), allow(dead_code))]
    q: usize,
    /// The decoder after the items decoded so far.
    decoder: StreamDecoder,
    /// Bytes after the candidate footer those items used.
    used: usize,
    /// How many items it decoded.
    items: usize,
}

/// A saved lookahead: boxed with `alloc`; without it nothing is kept (each call starts the
/// lookahead again).
#[cfg(feature = "alloc")]
type Saved = Option<alloc::boxed::Box<Lookahead>>;
#[cfg(not(feature = "alloc"))]
type Saved = ();

/// A lookahead in use: boxed with `alloc` (kept across calls without copying it again).
#[cfg(feature = "alloc")]
type Held = alloc::boxed::Box<Lookahead>;
#[cfg(not(feature = "alloc"))]
type Held = Lookahead;

#[cfg(feature = "alloc")]
fn hold(l: Lookahead) -> Held {
    alloc::boxed::Box::new(l)
}

#[cfg(not(feature = "alloc"))]
fn hold(l: Lookahead) -> Held {
    l
}

#[cfg(feature = "alloc")]
fn save(st: Held) -> Saved {
    Some(st)
}

#[cfg(not(feature = "alloc"))]
fn save(_: Held) -> Saved {}

/// The saved lookahead if it is the one of the candidate at `q`.
#[cfg(feature = "alloc")]
fn restore(saved: &mut Saved, q: usize) -> Option<Held> {
    saved.take().filter(|l| l.q == q)
}

#[cfg(not(feature = "alloc"))]
fn restore(_: &mut Saved, _: usize) -> Option<Held> {
    None
}

impl StreamDecoder {
    /// Starts the footer search of the payload at the current offset (the decoder that is no
    /// lookahead owns it; a lookahead uses the one its parent lends it).
    #[cfg(feature = "alloc")]
    fn start_search(&mut self) {
        if self.depth != LOOKAHEAD_DEPTH {
            return;
        }
        let at = self.offset;
        match &mut self.search {
            Some(s) if s.at == at => {}
            s => {
                let work = s.as_ref().map_or(0, |s| s.work);
                *s = Some(alloc::boxed::Box::new(FooterSearch::new(at, work)));
            }
        }
    }

    #[cfg(not(feature = "alloc"))]
    fn start_search(&mut self) {
        let _ = LOOKAHEAD_DEPTH;
    }

    /// The first footer `pat` at or after `from` in `window` (which starts at the payload).
    #[cfg(feature = "alloc")]
    fn find_footer(&mut self, window: &[u8], from: usize, pat: &[u8; FOOTER_LEN]) -> Option<usize> {
        match &mut self.search {
            Some(s) => s.find(window, self.offset, from, pat),
            None => direct(window, from, pat),
        }
    }

    #[cfg(not(feature = "alloc"))]
    fn find_footer(&mut self, window: &[u8], from: usize, pat: &[u8; FOOTER_LEN]) -> Option<usize> {
        direct(window, from, pat)
    }

    /// Adds `n` to the footer-scan work count.
    fn count_scan_work(&mut self, n: u64) {
        #[cfg(feature = "alloc")]
        if let Some(s) = &mut self.search {
            s.work += n;
        }
        #[cfg(not(feature = "alloc"))]
        let _ = n;
    }

    /// The work the footer scans of device payloads have done so far on this channel,
    /// counted in steps independent of the machine: bytes searched directly, footer positions
    /// indexed, index probes and candidate footers validated (see `footer_index`). It grows
    /// linearly in the bytes of the payloads (with the index's logarithmic factor), whatever
    /// those hold; tests assert bounds on it. Always 0 without `alloc`.
    #[doc(hidden)]
    pub fn footer_scan_work(&self) -> u64 {
        #[cfg(feature = "alloc")]
        return self.search.as_ref().map_or(0, |s| s.work);
        #[cfg(not(feature = "alloc"))]
        return 0;
    }
}
