//! The runner's checks of source behaviour rules, on what the played destination
//! ([`super::play_dst::Player`]) decoded from a live source.
//!
//! This module owns the books and verdicts of three rules (every message starts with the rule
//! id):
//!
//! * [`Switchover`] — SM-SWITCHOVER-START: no SWITCHOVER_START to a 7.2 destination (the 7.2
//!   decoder's CMD-UNKNOWN for command 11 is reported as this rule, [`switchover_to_72`]); to
//!   10.x at most once, before the `ram` SECTION_END, with no `ram` PART after it before the
//!   postcopy package, and before the first POSTCOPY_RAM_DISCARD; [`Switchover::expect`]
//!   checks the count a case requires.
//! * [`AtRun`] — SM-DISCARD-DIRTY: the pages the played destination holds, not discarded, when
//!   it has processed POSTCOPY_RUN, with their bytes. [`AtRun::dirtied_discarded`] checks the
//!   pages the runner wrote on the source after they arrived (dirty at the switchover unless
//!   sent again): each must be discarded or held with the written bytes;
//!   [`AtRun::equal_to_final`] checks every held page against the source's RAM at the end
//!   (`pmemsave`; the source is stopped since the switchover).
//! * [`urgent_first`] — SM-URGENT-FIRST: the requested pages arrive in request order, each
//!   with at most `slack` records of pages nobody requested between its request and its
//!   record. The runner cannot see when the source read a request; the slack stands for what
//!   the source had already queued (its buffers) when it did, with the postcopy bandwidth
//!   capped so that little is in flight (`conformance/README.md`).

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::Item;
use qmig_protocol::{Profile, Rule, Violation};

use super::play_dst::{Fail, Request, TPS};

/// SWITCHOVER_START command code.
const SWITCHOVER_START: u64 = 11;

/// The 7.2 decoder's rejection of command 11 as SM-SWITCHOVER-START, with the decoder's own
/// message `detail` (`None`: another violation).
pub fn switchover_to_72(v: &Violation, profile: Profile, detail: &str) -> Option<Fail> {
    (profile == Profile::QEMU_7_2 && v.rule == Rule::CmdUnknown && v.value == SWITCHOVER_START)
        .then(|| {
            format!(
                "SM-SWITCHOVER-START: the source sent SWITCHOVER_START (command 11) to a 7.2 destination ({detail})"
            )
        })
}

/// SM-SWITCHOVER-START books of one migration (every connection).
#[derive(Clone, Debug, Default)]
pub struct Switchover {
    /// Stream offsets of the SWITCHOVER_START commands.
    pub sent: Vec<u64>,
    ram_section: Option<u32>,
    ram_end: Option<u64>,
    discard: Option<u64>,
    package: bool,
}

impl Switchover {
    /// Books `item`, decoded at stream offset `at`; a misplaced or repeated SWITCHOVER_START
    /// (or a `ram` PART after one, outside postcopy) fails.
    pub fn item(&mut self, item: &Item<'_>, at: u64) -> Result<(), Fail> {
        match item {
            Item::Section(SectionHeader::Start(id)) if id.idstr == b"ram" => {
                self.ram_section = Some(id.section_id);
            }
            Item::Section(SectionHeader::End { section_id })
                if Some(*section_id) == self.ram_section =>
            {
                self.ram_end.get_or_insert(at);
            }
            Item::Section(SectionHeader::Part { section_id })
                if Some(*section_id) == self.ram_section
                    && !self.package
                    && !self.sent.is_empty() =>
            {
                return Err(format!(
                    "SM-SWITCHOVER-START: a ram SECTION_PART at offset {at} after SWITCHOVER_START (offset {}): it must follow the last PART",
                    self.sent[0]
                ));
            }
            Item::Command(Command::RamDiscard(_)) => {
                self.discard.get_or_insert(at);
            }
            Item::Command(Command::Packaged { .. } | Command::PostcopyListen) => {
                self.package = true;
            }
            Item::Command(Command::SwitchoverStart) => {
                if let Some(first) = self.sent.first() {
                    return Err(format!(
                        "SM-SWITCHOVER-START: a second SWITCHOVER_START at offset {at} (the first at {first})"
                    ));
                }
                if let Some(end) = self.ram_end {
                    return Err(format!(
                        "SM-SWITCHOVER-START: SWITCHOVER_START at offset {at} after the ram SECTION_END at {end}"
                    ));
                }
                if let Some(d) = self.discard {
                    return Err(format!(
                        "SM-SWITCHOVER-START: SWITCHOVER_START at offset {at} after the first POSTCOPY_RAM_DISCARD at {d}"
                    ));
                }
                self.sent.push(at);
            }
            _ => {}
        }
        Ok(())
    }

    /// The count a case requires (`want`: 0 or 1); a description for the case message.
    pub fn expect(&self, want: u64) -> Result<String, Fail> {
        if self.sent.len() as u64 != want {
            return Err(format!(
                "SM-SWITCHOVER-START: {} SWITCHOVER_START command(s) in the stream, expected {want}",
                self.sent.len()
            ));
        }
        Ok(match (self.sent.first(), self.ram_end) {
            (None, _) => "no SWITCHOVER_START".into(),
            (Some(a), Some(e)) => {
                format!("SWITCHOVER_START once, at offset {a}, before the ram SECTION_END at {e}")
            }
            (Some(a), None) => format!("SWITCHOVER_START once, at offset {a}"),
        })
    }
}

/// Pages the runner wrote on the source after their record had arrived (block index, page,
/// the bytes written), before `migrate-start-postcopy`.
#[derive(Clone, Debug)]
pub struct Dirtied {
    /// Block index.
    pub block: usize,
    /// (page, bytes written).
    pub pages: Vec<(u64, Vec<u8>)>,
}

/// What the played destination held when it had processed POSTCOPY_RUN.
#[derive(Clone, Debug)]
pub struct AtRun {
    /// Pages received on the first connection and not discarded, per block.
    pub held: Vec<PageBitmap>,
    /// Its RAM, per block.
    pub ram: Vec<Vec<u8>>,
}

fn page_of(ram: &[u8], p: u64) -> &[u8] {
    &ram[(p * TPS) as usize..((p + 1) * TPS) as usize]
}

impl AtRun {
    /// Each dirtied page is discarded or held with the written bytes.
    pub fn dirtied_discarded(&self, d: &Dirtied, name: &str) -> Result<(), Fail> {
        for (p, bytes) in &d.pages {
            if self.held[d.block].test(*p) && page_of(&self.ram[d.block], *p) != &bytes[..] {
                return Err(format!(
                    "SM-DISCARD-DIRTY: {name} page {p}, written on the source after its record arrived and before migrate-start-postcopy, is neither discarded nor sent again before POSTCOPY_RUN: the destination holds its old copy"
                ));
            }
        }
        Ok(())
    }

    /// Every held page of `block` equals the source's RAM at the end; returns the number of
    /// held pages.
    pub fn equal_to_final(&self, block: usize, fin: &[u8], name: &str) -> Result<u64, Fail> {
        let held = &self.held[block];
        for p in held.iter_ones() {
            if page_of(&self.ram[block], p) != page_of(fin, p) {
                return Err(format!(
                    "SM-DISCARD-DIRTY: {name} page {p}, held (not discarded) by the destination at POSTCOPY_RUN, differs from the source's copy (pmemsave at the end)"
                ));
            }
        }
        Ok(held.count_ones())
    }
}

/// SM-URGENT-FIRST over the requests of one migration, in request order; a description
/// (`page@+N`: N records of other pages between the request and the page).
pub fn urgent_first(reqs: &[Request], slack: u64, names: &[(String, u64)]) -> Result<String, Fail> {
    let mut last: Option<(u64, &Request)> = None;
    let mut out = Vec::new();
    for q in reqs {
        let Some(a) = q.arrived_at else {
            return Err(format!(
                "SM-URGENT-FIRST: requested {} page {} never arrived",
                names[q.block].0, q.page
            ));
        };
        if q.others > slack {
            return Err(format!(
                "SM-URGENT-FIRST: {} page {} arrived after {} records of pages not requested since its request (offset {}), more than the slack of {slack}",
                names[q.block].0, q.page, q.others, q.asked_at
            ));
        }
        if let Some((b, prev)) = last {
            if a < b {
                return Err(format!(
                    "SM-URGENT-FIRST: {} page {} (requested after page {}) arrived first (offset {a} < {b})",
                    names[q.block].0, q.page, prev.page
                ));
            }
        }
        last = Some((a, q));
        out.push(format!("{}@+{}", q.page, q.others));
    }
    Ok(out.join(" "))
}
