//! Delimiting a device section's payload: by its VM description when the decoder has one,
//! otherwise by a footer scan that accepts a candidate `7E <id>` only if the bytes after it
//! decode as the next items of the stream (validated by a copy of the decoder, recursively, to
//! a bounded depth).

use super::{Item, Phase, StreamDecoder, LOOKAHEAD_ITEMS};
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
                    r => r,
                };
            }
        }
        // Candidates already rejected for this payload (on an earlier, shorter input) stay
        // rejected: a violation found in a prefix is one in any extension of it.
        let from = match self.scan_hint {
            Some((at, from)) if at == self.offset => from,
            _ => 0,
        };
        let (r, next) = self.footer_scan(input, section_id, package_limited, from);
        self.scan_hint = match r {
            Err(WireError::Incomplete { .. }) => Some((self.offset, next)),
            _ => None,
        };
        r
    }

    /// Scans for the first plausible footer at or after payload offset `from`. Also returns
    /// where a later call on a longer input may resume.
    fn footer_scan(
        &self,
        input: &[u8],
        section_id: u32,
        package_limited: bool,
        mut from: usize,
    ) -> (WireResult<usize>, usize) {
        let pat = footer_bytes(section_id);
        let cap = self.limits.max_device_payload as usize;
        let is_final = self.is_final || package_limited;
        let invalid = |rule, value| Err(WireError::invalid(self.offset, rule, value));
        while let Some(q) = find(input, from, &pat) {
            if q > cap {
                return (invalid(Rule::SecDeviceLen, q as u64), q);
            }
            if self.depth == 0 {
                return (Ok(q), q);
            }
            match self.plausible_after(input, q, is_final) {
                Ok(true) => return (Ok(q), q),
                Ok(false) => from = q + 1,
                Err(e) => return (Err(e), q),
            }
        }
        if input.len() >= cap + FOOTER_LEN {
            return (invalid(Rule::SecDeviceLen, input.len() as u64), from);
        }
        if is_final {
            return (invalid(Rule::SecDelimit, section_id as u64), from);
        }
        // No candidate starts before the last FOOTER_LEN - 1 bytes.
        let next = from.max(input.len().saturating_sub(FOOTER_LEN - 1));
        (Err(WireError::Incomplete { needed: 1 }), next)
    }

    /// Whether the bytes after a candidate footer at payload offset `q` decode as the next
    /// items. `Incomplete` when they run out and the input is not final.
    fn plausible_after(&self, input: &[u8], q: usize, is_final: bool) -> WireResult<bool> {
        let mut look = self.clone();
        look.depth = self.depth - 1;
        look.phase = Phase::Body;
        look.current = None;
        look.offset = self.offset + (q + FOOTER_LEN) as u64;
        let mut rest = &input[q + FOOTER_LEN..];
        for _ in 0..LOOKAHEAD_ITEMS {
            match look.decode(rest) {
                Ok((Item::VmDescription(_), _)) => return Ok(true),
                Ok((_, n)) => rest = &rest[n..],
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

/// The first position at or after `from` where `pat` starts in `hay`.
fn find(hay: &[u8], from: usize, pat: &[u8; FOOTER_LEN]) -> Option<usize> {
    let mut i = from;
    while i + FOOTER_LEN <= hay.len() {
        let j = hay[i..hay.len() - FOOTER_LEN + 1]
            .iter()
            .position(|&b| b == pat[0])?
            + i;
        if hay[j..j + FOOTER_LEN] == *pat {
            return Some(j);
        }
        i = j + 1;
    }
    None
}
