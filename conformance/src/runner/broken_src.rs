//! Deliberately broken sources (`--src broken-KIND:TARGET`), the suite's self-test for replays
//! against a source.
//!
//! This module owns [`SrcBreakage`] and [`Tamper`]: a stage between the source's socket and
//! the runner's checks that alters the page records of the recovery channel the way a broken
//! source would — `skip-clear` drops the first page record sent after the recovery (a page the
//! chosen RECV_BITMAP left clear is then never resent), `resend-all` follows the first one with
//! a ZERO record for every page of that block the chosen bitmap marks received (a source that
//! ignores the bitmap). The main connection passes unchanged. Records are cut and re-encoded
//! with the protocol crate's own decoder and encoder, so the altered stream stays well-formed
//! and only the resend check can catch the defect.

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::ram::{RamBody, RamRecord};
use qmig_protocol::stream::{Item, StreamDecoder};
use qmig_protocol::WireError;

/// Target page size.
const TPS: u64 = 4096;

/// What a broken source does wrong after a postcopy recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcBreakage {
    /// Sends every page again, set bits of the RECV_BITMAP included.
    ResendAll,
    /// Skips one page the RECV_BITMAP left clear.
    SkipClear,
}

impl SrcBreakage {
    /// Parses `resend-all` / `skip-clear`.
    pub fn parse(s: &str) -> Option<SrcBreakage> {
        match s {
            "resend-all" => Some(SrcBreakage::ResendAll),
            "skip-clear" => Some(SrcBreakage::SkipClear),
            _ => None,
        }
    }
}

/// The tamper stage of one migration.
pub struct Tamper {
    kind: SrcBreakage,
    dec: Option<StreamDecoder>,
    buf: Vec<u8>,
    done: bool,
    /// What was altered (for the case message).
    pub note: Option<String>,
}

impl Tamper {
    /// A stage for `kind`.
    pub fn new(kind: SrcBreakage) -> Tamper {
        Tamper {
            kind,
            dec: None,
            buf: Vec::new(),
            done: false,
            note: None,
        }
    }

    /// A new connection: `dec` is the runner's decoder for it (a recovery channel continues the
    /// stream); only recovery connections (`n` > 1) are altered.
    pub fn connection(&mut self, dec: &StreamDecoder, n: u32) {
        self.buf.clear();
        self.dec = (n > 1 && !self.done).then(|| dec.clone());
    }

    /// Takes the next bytes from the source; returns the bytes the checks see.
    pub fn push(
        &mut self,
        data: &[u8],
        at_end: bool,
        chosen: Option<&[PageBitmap]>,
        blocks: &[(String, u64)],
    ) -> Vec<u8> {
        let Some(dec) = self.dec.as_mut() else {
            return data.to_vec();
        };
        self.buf.extend_from_slice(data);
        if at_end {
            dec.set_final(true);
        }
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            match dec.decode(&self.buf[pos..]) {
                Ok((item, n)) => {
                    let whole = &self.buf[pos..pos + n];
                    let mut keep = true;
                    let mut extra = Vec::new();
                    if let Item::Ram(r) = &item {
                        if !self.done && r.is_page() && r.name.is_none() {
                            let block = dec.ram().last_block().map(<[u8]>::to_vec);
                            let page = r.addr / TPS;
                            let bi = block
                                .as_deref()
                                .and_then(|b| blocks.iter().position(|(x, _)| x.as_bytes() == b));
                            match (self.kind, bi, chosen) {
                                (SrcBreakage::SkipClear, Some(b), _) => {
                                    keep = false;
                                    self.done = true;
                                    self.note = Some(format!(
                                        "dropped the record of {} page {page}",
                                        blocks[b].0
                                    ));
                                }
                                (SrcBreakage::ResendAll, Some(b), Some(ch)) => {
                                    let mut count = 0;
                                    for p in ch[b].iter_ones() {
                                        RamRecord {
                                            flags: RamFlags::ZERO.with(RamFlags::CONTINUE),
                                            addr: p * TPS,
                                            name: None,
                                            body: RamBody::Zero { fill: 0 },
                                        }
                                        .encode(&mut extra);
                                        count += 1;
                                    }
                                    self.done = true;
                                    self.note = Some(format!(
                                        "added {count} ZERO records for the pages of {} set in the RECV_BITMAP",
                                        blocks[b].0
                                    ));
                                }
                                _ => {}
                            }
                        }
                    }
                    if keep {
                        out.extend_from_slice(whole);
                    }
                    out.extend_from_slice(&extra);
                    pos += n;
                    if self.done {
                        // The rest passes unchanged.
                        out.extend_from_slice(&self.buf[pos..]);
                        self.buf.clear();
                        self.dec = None;
                        return out;
                    }
                }
                Err(WireError::Incomplete { .. }) => break,
                Err(WireError::Invalid(_)) => {
                    // Not ours to judge: everything passes on unchanged, the checks report it.
                    out.extend_from_slice(&self.buf[pos..]);
                    self.buf.clear();
                    self.dec = None;
                    return out;
                }
            }
        }
        if at_end {
            // Whatever is left goes on as it is (the checks report it).
            out.extend_from_slice(&self.buf[pos..]);
            pos = self.buf.len();
        }
        self.buf.drain(..pos);
        out
    }
}
