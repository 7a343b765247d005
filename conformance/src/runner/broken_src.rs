//! Deliberately broken sources (`--src broken-KIND:TARGET`), the suite's self-test for replays
//! against a source.
//!
//! This module owns [`SrcBreakage`] and [`Tamper`]: a stage between the source's socket and
//! the runner's checks that alters the page records of the recovery channel the way a broken
//! source would — `skip-clear` drops the first page record sent after the recovery (a page the
//! chosen RECV_BITMAP left clear is then never resent), `resend-all` follows the first one with
//! a ZERO record for every page of that block the chosen bitmap marks received (a source that
//! ignores the bitmap), `early-page` puts a RAM section with one page record (a ZERO record for
//! the first page the chosen RECV_BITMAP leaves clear) before POSTCOPY_RESUME (a source that
//! sends pages before RESUME_ACK). The main connection passes unchanged. Records are cut and re-encoded
//! with the protocol crate's own decoder and encoder, so the altered stream stays well-formed
//! and only the resend check can catch the defect.

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::command::Command;
use qmig_protocol::ram::{RamBody, RamRecord};
use qmig_protocol::section::SectionHeader;
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
    /// Sends a page record before POSTCOPY_RESUME.
    EarlyPage,
}

impl SrcBreakage {
    /// Parses `resend-all` / `skip-clear` / `early-page`.
    pub fn parse(s: &str) -> Option<SrcBreakage> {
        match s {
            "resend-all" => Some(SrcBreakage::ResendAll),
            "skip-clear" => Some(SrcBreakage::SkipClear),
            "early-page" => Some(SrcBreakage::EarlyPage),
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
                    if let (Item::Command(Command::PostcopyResume), SrcBreakage::EarlyPage) =
                        (&item, self.kind)
                    {
                        if let Some(early) = early_section(dec, chosen, blocks) {
                            out.extend_from_slice(&early.0);
                            self.done = true;
                            self.note = Some(early.1);
                        }
                    }
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

/// A RAM section part holding one ZERO record (naming its block: the first record of the
/// connection) for the first page of block 0 that `chosen` leaves clear, then EOS and the
/// footer; `None` when the decoder knows no `ram` section or no page is clear.
fn early_section(
    dec: &StreamDecoder,
    chosen: Option<&[PageBitmap]>,
    blocks: &[(String, u64)],
) -> Option<(Vec<u8>, String)> {
    let section_id = (0..=u8::MAX as u32).find(|&id| dec.section(id).is_some_and(|s| s.is_ram))?;
    let page = chosen?.first()?.iter_zeros().next()?;
    let (name, _) = blocks.first()?;
    let mut out = Vec::new();
    Item::Section(SectionHeader::Part { section_id }).encode(&mut out);
    Item::Ram(RamRecord {
        flags: RamFlags::ZERO,
        addr: page * TPS,
        name: Some(name.as_bytes()),
        body: RamBody::Zero { fill: 0 },
    })
    .encode(&mut out);
    Item::Ram(RamRecord {
        flags: RamFlags::EOS,
        addr: 0,
        name: None,
        body: RamBody::Eos,
    })
    .encode(&mut out);
    Item::Footer { section_id }.encode(&mut out);
    Some((
        out,
        format!("a RAM section with a ZERO record of {name} page {page} before POSTCOPY_RESUME"),
    ))
}
