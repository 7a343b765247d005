//! [`Batcher`]: turns a stream of single incoming pages into few, large fills.
//!
//! The stream delivers one page per RAM record. The batcher stages contiguous data pages of one
//! block in a buffer and places them with one `UFFDIO_COPY` when the run breaks (another block,
//! a gap, a zero page), when the buffer reaches [`super::PlaceConfig::max_batch`], or on
//! [`Batcher::flush`]. Zero pages accumulate into runs that become one ranged `UFFDIO_ZEROPAGE`
//! ([`ZeroPolicy::Populate`]) or are only recorded as received ([`ZeroPolicy::Lazy`]).
//!
//! A page some guest thread is waiting on must not sit in the buffer: a page a forwarded,
//! unresolved fault waits on ([`super::UffdRam::pending_in`]) is placed at once, alone, ahead
//! of the staged run (unless it is a resend of a staged page: then the run goes first), and a
//! push flushes when such a fault waits on a page of the staged run. Pages nobody waits on keep
//! batching while faults are outstanding, so the bulk data queued ahead of a requested page
//! drains at batch speed, not one `UFFDIO_COPY` per page. The driver should also call [`Batcher::flush`] whenever it runs
//! out of input.

use super::{UffdError, UffdRam};
use crate::memory::PAGE_SIZE;

/// What to do with zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroPolicy {
    /// Map zero pages with ranged `UFFDIO_ZEROPAGE`.
    Populate,
    /// Record them as received and map nothing until touched.
    #[default]
    Lazy,
}

enum Run {
    None,
    Data { block: usize, start: u64 },
    Zero { block: usize, start: u64, len: u64 },
}

/// Stages incoming pages for [`UffdRam`]; see the module doc.
pub struct Batcher<'a> {
    ram: &'a UffdRam,
    policy: ZeroPolicy,
    run: Run,
    buf: Vec<u8>,
    cap: usize,
}

impl<'a> Batcher<'a> {
    /// A batcher placing into `ram`.
    pub fn new(ram: &'a UffdRam, policy: ZeroPolicy) -> Self {
        let cap = ram.shared.cfg.max_batch.max(PAGE_SIZE) / PAGE_SIZE * PAGE_SIZE;
        Self {
            ram,
            policy,
            run: Run::None,
            buf: Vec::with_capacity(cap),
            cap,
        }
    }

    /// Adds one data page (`data.len()` == [`PAGE_SIZE`]) at page-aligned `offset` of `block`.
    pub fn push_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), UffdError> {
        self.ram.check(block, offset, data.len() as u64)?;
        let p = PAGE_SIZE as u64;
        if self.ram.pending_in(block, offset / p, 1) && !self.stages(block, offset) {
            // A guest thread waits on this page: it goes out now, alone, ahead of the staged
            // run (distinct pages, so the order of placement does not matter).
            return self.ram.place(block, offset, data);
        }
        let extends = matches!(self.run, Run::Data { block: b, start }
            if b == block && start + self.buf.len() as u64 == offset && self.buf.len() < self.cap);
        if !extends {
            self.flush()?;
            self.run = Run::Data {
                block,
                start: offset,
            };
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= self.cap || self.waited_on() {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds one zero page at page-aligned `offset` of `block`.
    pub fn push_zero(&mut self, block: usize, offset: u64) -> Result<(), UffdError> {
        self.ram.check(block, offset, PAGE_SIZE as u64)?;
        match &mut self.run {
            Run::Zero {
                block: b,
                start,
                len,
            } if *b == block && *start + *len == offset => *len += PAGE_SIZE as u64,
            _ => {
                self.flush()?;
                self.run = Run::Zero {
                    block,
                    start: offset,
                    len: PAGE_SIZE as u64,
                };
            }
        }
        if self.waited_on() {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether the staged run holds the page at `offset` of `block` (a resend of a staged page
    /// must be placed after it, never before).
    fn stages(&self, block: usize, offset: u64) -> bool {
        match self.run {
            Run::None => false,
            Run::Data { block: b, start } => {
                b == block && offset >= start && offset - start < self.buf.len() as u64
            }
            Run::Zero {
                block: b,
                start,
                len,
            } => b == block && offset >= start && offset - start < len,
        }
    }

    /// Whether a pending fault waits on a page of the staged run.
    fn waited_on(&self) -> bool {
        let p = PAGE_SIZE as u64;
        match self.run {
            Run::None => false,
            Run::Data { block, start } => {
                self.ram
                    .pending_in(block, start / p, self.buf.len() as u64 / p)
            }
            Run::Zero { block, start, len } => self.ram.pending_in(block, start / p, len / p),
        }
    }

    /// Places whatever is staged.
    pub fn flush(&mut self) -> Result<(), UffdError> {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => Ok(()),
            Run::Data { block, start } => {
                let r = self.ram.place(block, start, &self.buf);
                self.buf.clear();
                r
            }
            Run::Zero { block, start, len } => match self.policy {
                ZeroPolicy::Populate => self.ram.place_zero(block, start, len),
                ZeroPolicy::Lazy => self.ram.mark_zero(block, start, len),
            },
        }
    }
}

impl Drop for Batcher<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("batcher dropped with unplaced pages: {e}");
        }
    }
}
