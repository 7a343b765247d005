//! Postcopy host-page assembly: the target pages of one host page of a huge-page block (for
//! example 2 MiB) are collected and placed together, atomically.
//!
//! This module owns the rule `RAM-HOSTPAGE`: in postcopy the target pages of one host page
//! arrive consecutively, in order, on one channel; a target page of another host page (or
//! block) while one is incomplete is a violation. It also owns the mechanics of
//! `SM-PARTIAL-HOSTPAGE`: [`HostPageAssembler::reset`] drops a partial host page when its
//! channel fails, so that nothing partial is ever placed (the page stays unreceived and is sent
//! again after recovery).
//!
//! One assembler serves one channel. The caller supplies the buffer (as large as the largest
//! host page it handles); nothing is allocated. Blocks whose page size is the target page size
//! pass straight through without a copy.

use crate::error::Violation;
use crate::rule::Rule;

/// The content of one target page as a RAM record gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetPage<'a> {
    /// A ZERO record: every byte is `fill`.
    Zero {
        /// The fill byte.
        fill: u8,
    },
    /// A PAGE record's bytes (one target page).
    Data(&'a [u8]),
}

/// A complete host page, ready to be placed atomically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostPage<'s> {
    /// The block.
    pub block: &'s [u8],
    /// Offset of the host page in the block (aligned to the block's page size).
    pub offset: u64,
    /// Its bytes; `None` for a one-target-page ZERO record passed through (place a page of
    /// `fill` bytes, see `zero_fill`).
    pub data: Option<&'s [u8]>,
    /// Every target page was a ZERO record with fill 0: the page can be placed as a zero page.
    pub all_zero: bool,
    /// The fill byte when `data` is `None`.
    pub zero_fill: u8,
}

/// Collects the target pages of one host page at a time, for one channel.
#[derive(Debug)]
pub struct HostPageAssembler<'b> {
    buf: &'b mut [u8],
    tps: usize,
    block: [u8; 255],
    block_len: u8,
    host_size: usize,
    host_offset: u64,
    received: usize,
    all_zero: bool,
}

impl<'b> HostPageAssembler<'b> {
    /// An assembler for target pages of `target_page_size` bytes, collecting into `buf` (which
    /// bounds the largest host page it accepts).
    pub fn new(buf: &'b mut [u8], target_page_size: usize) -> Self {
        HostPageAssembler {
            buf,
            tps: target_page_size.max(1),
            block: [0; 255],
            block_len: 0,
            host_size: 0,
            host_offset: 0,
            received: 0,
            all_zero: true,
        }
    }

    /// Whether a host page is partly received.
    pub fn is_partial(&self) -> bool {
        self.received != 0
    }

    /// The partial host page: block, offset, target pages received so far.
    pub fn partial(&self) -> Option<(&[u8], u64, usize)> {
        self.is_partial().then(|| {
            (
                &self.block[..self.block_len as usize],
                self.host_offset,
                self.received,
            )
        })
    }

    /// Drops a partial host page (`SM-PARTIAL-HOSTPAGE`); returns whether there was one.
    pub fn reset(&mut self) -> bool {
        let had = self.received != 0;
        self.received = 0;
        self.all_zero = true;
        had
    }

    /// Adds the target page at `offset` (bytes, in `block`, whose page size is
    /// `block_page_size`). Returns the host page once its last target page has arrived.
    ///
    /// `at` is the absolute channel offset of the record, named by a violation:
    /// `RAM-HOSTPAGE` when the page is not the next target page of the partial host page (other
    /// block, other host page, out of order), when a new host page does not start at its first
    /// target page, or when `offset` is not target-page aligned; `RAM-PAGESIZE` when
    /// `block_page_size` is not a multiple of the target page size or exceeds the buffer; and
    /// `RAM-HOSTPAGE` when a data page is not exactly one target page long. On a violation the
    /// partial host page is kept as it was.
    pub fn push<'s>(
        &'s mut self,
        block: &'s [u8],
        block_page_size: u64,
        offset: u64,
        page: TargetPage<'s>,
        at: u64,
    ) -> Result<Option<HostPage<'s>>, Violation> {
        let tps = self.tps as u64;
        if block_page_size < tps
            || block_page_size % tps != 0
            || block_page_size > self.buf.len() as u64
        {
            return Err(Violation::new(at, Rule::RamPageSize, block_page_size));
        }
        if offset % tps != 0 {
            return Err(Violation::new(at, Rule::RamHostPage, offset));
        }
        if let TargetPage::Data(d) = page {
            if d.len() != self.tps {
                return Err(Violation::new(at, Rule::RamHostPage, d.len() as u64));
            }
        }
        let host_size = block_page_size as usize;
        if self.received == 0 {
            if host_size == self.tps {
                // Small-page block: no assembly, no copy.
                let (data, all_zero, zero_fill) = match page {
                    TargetPage::Zero { fill } => (None, fill == 0, fill),
                    TargetPage::Data(d) => (Some(d), false, 0),
                };
                return Ok(Some(HostPage {
                    block,
                    offset,
                    data,
                    all_zero,
                    zero_fill,
                }));
            }
            if offset % block_page_size != 0 {
                return Err(Violation::new(at, Rule::RamHostPage, offset));
            }
            let n = block.len().min(255);
            self.block[..n].copy_from_slice(&block[..n]);
            self.block_len = n as u8;
            self.host_size = host_size;
            self.host_offset = offset;
            self.all_zero = true;
        } else {
            let expect = self.host_offset + (self.received * self.tps) as u64;
            if block != &self.block[..self.block_len as usize]
                || host_size != self.host_size
                || offset != expect
            {
                return Err(Violation::new(at, Rule::RamHostPage, offset));
            }
        }
        let from = self.received * self.tps;
        let dst = &mut self.buf[from..from + self.tps];
        match page {
            TargetPage::Zero { fill } => {
                dst.fill(fill);
                self.all_zero &= fill == 0;
            }
            TargetPage::Data(d) => {
                dst.copy_from_slice(d);
                self.all_zero = false;
            }
        }
        self.received += 1;
        if self.received * self.tps < self.host_size {
            return Ok(None);
        }
        self.received = 0;
        let all_zero = core::mem::replace(&mut self.all_zero, true);
        Ok(Some(HostPage {
            block: &self.block[..self.block_len as usize],
            offset: self.host_offset,
            data: Some(&self.buf[..self.host_size]),
            all_zero,
            zero_fill: 0,
        }))
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const TPS: usize = 4096;
    const HP: u64 = 2 << 20;

    #[test]
    fn assembles_a_2mib_host_page_in_order() {
        let mut buf = vec![0xaau8; HP as usize];
        let mut a = HostPageAssembler::new(&mut buf, TPS);
        let base = 3 * HP;
        let n = (HP as usize) / TPS;
        let pages: Vec<Vec<u8>> = (0..n).map(|i| vec![(i % 251) as u8; TPS]).collect();
        for (i, p) in pages.iter().enumerate() {
            let off = base + (i * TPS) as u64;
            let got = a.push(b"pc.ram", HP, off, TargetPage::Data(p), 0).unwrap();
            if i + 1 < n {
                assert!(got.is_none());
            } else {
                let hp = got.unwrap();
                assert_eq!(
                    (hp.block, hp.offset, hp.all_zero),
                    (&b"pc.ram"[..], base, false)
                );
                let data = hp.data.unwrap();
                assert_eq!(data.len(), HP as usize);
                for (k, chunk) in data.chunks(TPS).enumerate() {
                    assert_eq!(chunk, &pages[k][..]);
                }
            }
        }
        assert!(!a.is_partial());
    }

    #[test]
    fn interleaving_is_rejected_and_reset_drops_partial() {
        let mut buf = vec![0u8; HP as usize];
        let mut a = HostPageAssembler::new(&mut buf, TPS);
        let z = TargetPage::Zero { fill: 0 };
        assert_eq!(a.push(b"pc.ram", HP, 0, z, 10).unwrap(), None);
        assert_eq!(a.push(b"pc.ram", HP, 4096, z, 20).unwrap(), None);
        // Another host page while one is partial.
        let e = a.push(b"pc.ram", HP, HP, z, 30).unwrap_err();
        assert_eq!((e.rule, e.offset, e.value), (Rule::RamHostPage, 30, HP));
        // Out of order within the host page.
        let e = a.push(b"pc.ram", HP, 3 * 4096, z, 40).unwrap_err();
        assert_eq!(e.rule, Rule::RamHostPage);
        // Another block.
        let e = a.push(b"other", HP, 2 * 4096, z, 50).unwrap_err();
        assert_eq!(e.rule, Rule::RamHostPage);
        assert_eq!(a.partial(), Some((&b"pc.ram"[..], 0, 2)));
        assert!(a.reset());
        assert!(!a.reset());
        // A new host page must start at its first target page.
        let e = a.push(b"pc.ram", HP, HP + 4096, z, 60).unwrap_err();
        assert_eq!(e.rule, Rule::RamHostPage);
        // All-zero host page.
        let n = HP / TPS as u64;
        let mut last = None;
        for i in 0..n {
            last = a
                .push(b"pc.ram", HP, HP + i * 4096, z, 0)
                .unwrap()
                .map(|h| h.all_zero);
        }
        assert_eq!(last, Some(true));
    }

    #[test]
    fn small_pages_pass_through_without_copy() {
        let mut buf = [0u8; TPS];
        let mut a = HostPageAssembler::new(&mut buf, TPS);
        let page = vec![7u8; TPS];
        let hp = a
            .push(b"ram", TPS as u64, 8192, TargetPage::Data(&page), 0)
            .unwrap()
            .unwrap();
        assert!(core::ptr::eq(hp.data.unwrap().as_ptr(), page.as_ptr()));
        let hp = a
            .push(b"ram", TPS as u64, 0, TargetPage::Zero { fill: 0 }, 0)
            .unwrap()
            .unwrap();
        assert_eq!((hp.data, hp.all_zero), (None, true));
        let e = a
            .push(b"ram", HP, 0, TargetPage::Zero { fill: 0 }, 5)
            .unwrap_err();
        assert_eq!(e.rule, Rule::RamPageSize);
    }
}
