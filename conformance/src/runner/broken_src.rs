//! Deliberately broken sources (`--src broken-KIND:TARGET`), the suite's self-test for replays
//! against a source.
//!
//! This module owns [`SrcBreakage`] and [`Tamper`]: a stage between the source's socket and
//! the runner's checks that alters the stream the way a broken source would. On the recovery
//! channel: `skip-clear` drops the first page record sent after the recovery (a page the
//! chosen RECV_BITMAP left clear is then never resent), `resend-all` follows the first one with
//! a ZERO record for every page of that block the chosen bitmap marks received (a source that
//! ignores the bitmap), `early-page` puts a RAM section part with one page record (a ZERO
//! record for the first page the chosen RECV_BITMAP leaves clear) before POSTCOPY_RESUME (a
//! source that sends pages before RESUME_ACK). On the main connection:
//! `switchover-start-72` inserts a SWITCHOVER_START command before the first SECTION_END of a
//! 7.2-profile stream (the place a 10.x source puts it), `no-discard` drops every
//! POSTCOPY_RAM_DISCARD command, `urgent-late` holds back the record of each requested page
//! until [`URGENT_LATE`] later page records have passed (or the final RAM END's EOS comes).
//! Records are cut and re-encoded with the protocol crate's own decoder and encoder, so the
//! altered stream stays well-formed and only the rule's check can catch the defect.

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::command::Command;
use qmig_protocol::ram::{RamBody, RamRecord};
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::{Item, StreamDecoder};
use qmig_protocol::{Profile, WireError};

/// Target page size.
const TPS: u64 = 4096;

/// Later page records `urgent-late` lets pass before a held record of a requested page (more
/// than the URGENT-FIRST slack, [`crate::synth::source::URGENT_SLACK`]).
pub const URGENT_LATE: u64 = 64;

/// What a broken source does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrcBreakage {
    /// Sends every page again after a recovery, set bits of the RECV_BITMAP included.
    ResendAll,
    /// Skips one page the RECV_BITMAP left clear after a recovery.
    SkipClear,
    /// Sends a page record on a recovery connection before POSTCOPY_RESUME
    /// (SM-RECOVER-BITMAP-ALL).
    EarlyPage,
    /// Sends SWITCHOVER_START to a 7.2 destination (SM-SWITCHOVER-START).
    SwitchoverStart72,
    /// Sends no POSTCOPY_RAM_DISCARD (SM-DISCARD-DIRTY).
    NoDiscard,
    /// Serves page requests late (SM-URGENT-FIRST).
    UrgentLate,
}

/// Every kind with its `--src broken-KIND:…` name.
pub const KINDS: [(&str, SrcBreakage); 6] = [
    ("resend-all", SrcBreakage::ResendAll),
    ("skip-clear", SrcBreakage::SkipClear),
    ("early-page", SrcBreakage::EarlyPage),
    ("switchover-start-72", SrcBreakage::SwitchoverStart72),
    ("no-discard", SrcBreakage::NoDiscard),
    ("urgent-late", SrcBreakage::UrgentLate),
];

impl SrcBreakage {
    /// Parses a kind name of [`KINDS`].
    pub fn parse(s: &str) -> Option<SrcBreakage> {
        KINDS.iter().find(|(n, _)| *n == s).map(|&(_, k)| k)
    }

    /// Whether the kind alters recovery connections (else: the main connection).
    fn on_recovery(self) -> bool {
        matches!(
            self,
            SrcBreakage::ResendAll | SrcBreakage::SkipClear | SrcBreakage::EarlyPage
        )
    }
}

/// The tamper stage of one migration.
pub struct Tamper {
    kind: SrcBreakage,
    dec: Option<StreamDecoder>,
    buf: Vec<u8>,
    done: bool,
    /// `no-discard`: commands dropped so far.
    dropped: u64,
    /// `urgent-late`: held records (bytes, later page records still to pass).
    held: Vec<(Vec<u8>, u64)>,
    /// `urgent-late`: inside the final (SECTION_END) part.
    in_end: bool,
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
            dropped: 0,
            held: Vec::new(),
            in_end: false,
            note: None,
        }
    }

    /// A new connection: `dec` is the runner's decoder for it (a recovery channel continues the
    /// stream); `resend-all`, `skip-clear` and `early-page` alter recovery connections (`n` > 1) only, the
    /// other kinds the main connection (`n` = 1) only.
    pub fn connection(&mut self, dec: &StreamDecoder, n: u32) {
        self.buf.clear();
        let ours = if self.kind.on_recovery() {
            n > 1
        } else {
            n == 1
        };
        self.dec = (ours && !self.done).then(|| dec.clone());
    }

    /// Takes the next bytes from the source; returns the bytes the checks see. `requested`:
    /// the pages (block index, page) requested and not arrived yet.
    pub fn push(
        &mut self,
        data: &[u8],
        at_end: bool,
        chosen: Option<&[PageBitmap]>,
        blocks: &[(String, u64)],
        requested: &[(usize, u64)],
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
                    let mut before = Vec::new();
                    let mut extra = Vec::new();
                    let page = match &item {
                        Item::Ram(r) if r.is_page() => {
                            let block = r.block(dec.ram()).map(<[u8]>::to_vec);
                            let bi = block
                                .as_deref()
                                .and_then(|b| blocks.iter().position(|(x, _)| x.as_bytes() == b));
                            bi.map(|b| (b, r.addr / TPS, r.name.is_none()))
                        }
                        _ => None,
                    };
                    match (self.kind, &item) {
                        (SrcBreakage::SkipClear, _) if !self.done => {
                            if let Some((b, p, true)) = page {
                                keep = false;
                                self.done = true;
                                self.note =
                                    Some(format!("dropped the record of {} page {p}", blocks[b].0));
                            }
                        }
                        (SrcBreakage::ResendAll, _) if !self.done => {
                            if let (Some((b, _, true)), Some(ch)) = (page, chosen) {
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
                        }
                        (SrcBreakage::EarlyPage, Item::Command(Command::PostcopyResume)) => {
                            if let Some((bytes, note)) = early_section(dec, chosen, blocks) {
                                before.extend_from_slice(&bytes);
                                self.done = true;
                                self.note = Some(note);
                            }
                        }
                        (
                            SrcBreakage::SwitchoverStart72,
                            Item::Section(SectionHeader::End { .. }),
                        ) if *dec.profile() == Profile::QEMU_7_2 => {
                            Command::SwitchoverStart.encode(&mut before);
                            self.done = true;
                            self.note = Some(format!(
                                "inserted SWITCHOVER_START before the SECTION_END at source offset {}",
                                dec.offset() - n as u64
                            ));
                        }
                        (SrcBreakage::NoDiscard, Item::Command(Command::RamDiscard(_))) => {
                            keep = false;
                            self.dropped += 1;
                            self.note = Some(format!(
                                "dropped {} POSTCOPY_RAM_DISCARD command(s)",
                                self.dropped
                            ));
                        }
                        (SrcBreakage::NoDiscard, Item::Command(Command::Packaged { .. })) => {
                            // The discards come before the package: nothing left to drop.
                            self.done = true;
                        }
                        (SrcBreakage::UrgentLate, _) => {
                            if let Item::Section(h) = &item {
                                self.in_end = matches!(h, SectionHeader::End { .. });
                            }
                            match (page, &item) {
                                (Some((b, p, _)), _) if requested.contains(&(b, p)) => {
                                    keep = false;
                                    self.held.push((whole.to_vec(), URGENT_LATE));
                                    self.note = Some(format!(
                                        "held back the record of each requested page until {URGENT_LATE} later page records had passed (last: {} page {p})",
                                        blocks[b].0
                                    ));
                                }
                                (Some(_), _) => {
                                    for h in self.held.iter_mut() {
                                        h.1 -= 1;
                                    }
                                    while self.held.first().is_some_and(|h| h.1 == 0) {
                                        extra.extend_from_slice(&self.held.remove(0).0);
                                    }
                                }
                                (None, Item::Ram(_)) if self.in_end => {
                                    // The final EOS: whatever is held goes now.
                                    for (h, _) in self.held.drain(..) {
                                        before.extend_from_slice(&h);
                                    }
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                    out.extend_from_slice(&before);
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
            for (h, _) in self.held.drain(..) {
                out.extend_from_slice(&h);
            }
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
