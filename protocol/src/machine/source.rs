//! The source state machine.
//!
//! This module owns [`Source`]: what an outgoing migration sends and when (setup, precopy
//! iterations driven by the caller's dirty bitmaps, precopy completion, the postcopy switch with
//! its discards and package, postcopy pages with requested pages first), how it reads the return
//! path (PONG, page requests, SHUT, received bitmaps, RESUME_ACK), and how it pauses, recovers
//! and cancels. Bytes are encoded only by the codec ([`Item::encode`], [`Command::encode`],
//! [`RamRecord::encode`]) and return-path messages decoded only by [`RpDecoder`].
//!
//! Rules applied here: SM-URGENT-FIRST, SM-DISCARD-DIRTY, SM-RECOVER-BITMAP-ALL, SM-REBUILD,
//! SM-SWITCHOVER-START, SM-PAUSE-AFTER-RUN, SM-PAUSE-IN-RECOVER, SM-FATAL-BEFORE-RUN, SM-CANCEL,
//! RP-PONG-UNKNOWN, RP-SHUT-ERROR, RP-ORDER, RP-REQ-RANGE, RP-BITMAP-SIZE (through the decoder).

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;

use super::control::{Control, ControlError};
use super::events::{ChannelKind, Event, Instant};
use super::memory::{RamBlockSpec, SourceMemory};
use super::status::{next_status, MigrationStatus, Trigger, SOURCE_TRANSITIONS};
use crate::bitmap::PageBitmap;
use crate::codes::{RamFlags, QEVM_VERSION};
use crate::command::{encode_ranges, Advise, Command, Discard};
use crate::error::{Violation, WireError};
use crate::header::{capabilities_from, encode_configuration, ConfigSubsection};
use crate::limits::Limits;
use crate::profile::{Profile, Version};
use crate::ram::page_codec::{PageCaps, PageChoice, PageCodec, PageCtx};
use crate::ram::{encode_mem_size, BlockInfo, RamBody, RamRecord};
use crate::rp::{RpDecoder, RpMessage};
use crate::rule::Rule;
use crate::section::{SectionHeader, SectionIdent};
use crate::sink::Sink;
use crate::stream::Item;

mod multifd;
pub use multifd::MultifdSourceConfig;

/// Most page-request ranges queued at once; further requests wait for the background scan.
pub const MAX_URGENT: usize = 4096;

/// The state of one non-iterative device, sent as a SECTION_FULL (opaque payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// Section id (the source's registration index).
    pub section_id: u32,
    /// Device idstr, e.g. `timer`.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// The payload bytes.
    pub data: Vec<u8>,
}

/// How a source is set up.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The version profile of the destination.
    pub profile: Profile,
    /// Caps on peer-controlled lengths (return path).
    pub limits: Limits,
    /// Machine type name for the configuration section.
    pub machine: String,
    /// The RAM blocks, in MEM_SIZE order.
    pub blocks: Vec<RamBlockSpec>,
    /// `return-path` (or `postcopy-ram`, which implies it).
    pub return_path: bool,
    /// `postcopy-ram`.
    pub postcopy_ram: bool,
    /// Section id of the `ram` section.
    pub ram_section_id: u32,
    /// Non-iterative devices, in the order their FULL sections are sent.
    pub devices: Vec<DeviceState>,
    /// Most page records per RAM SECTION_PART.
    pub pages_per_section: usize,
    /// A VM description (JSON) written after EOF at the end of a precopy migration (QEMU
    /// writes none in postcopy); `None`: none.
    pub vmdesc: Option<Vec<u8>>,
    /// A return path silent for longer than this many nanoseconds while an answer is awaited
    /// counts as a lost channel (SM-TIMEOUT), checked by [`Source::handle_timeout`].
    pub silence_timeout: Option<u64>,
    /// Page encodings: `xbzrle`, `compress`, `x-ignore-shared` (see [`PageCaps`]).
    pub page_caps: PageCaps,
    /// Multifd connections (capability `multifd`; precopy only: ignored with `postcopy_ram`,
    /// which QEMU refuses to combine with it), see [`Source::poll_transmit_multifd`].
    pub multifd: Option<MultifdSourceConfig>,
}

impl SourceConfig {
    /// A configuration with default limits, `ram` section id 2 and 32 pages per section.
    pub fn new(
        profile: Profile,
        machine: &str,
        blocks: Vec<RamBlockSpec>,
        postcopy_ram: bool,
    ) -> Self {
        SourceConfig {
            profile,
            limits: Limits::DEFAULT,
            machine: String::from(machine),
            blocks,
            return_path: postcopy_ram,
            postcopy_ram,
            ram_section_id: 2,
            devices: Vec::new(),
            pages_per_section: 32,
            silence_timeout: None,
            vmdesc: None,
            page_caps: PageCaps::default(),
            multifd: None,
        }
    }
}

/// What the source writes next on the main channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing (before the channel, or paused, or done).
    Idle,
    /// Header, configuration, setup section.
    Setup,
    /// Precopy iterations.
    Precopy,
    /// Precopy END section being written.
    PrecopyEnd,
    /// Postcopy switch (discards, package).
    PostcopyStart,
    /// Postcopy pages.
    Postcopy,
    /// Recovery: RECV_BITMAP commands to send.
    SendBitmaps,
    /// Recovery: waiting for the bitmaps.
    WaitBitmaps,
    /// Recovery: POSTCOPY_RESUME to send.
    SendResume,
    /// Recovery: waiting for RESUME_ACK.
    WaitAck,
    /// EOF written: waiting for SHUT.
    WaitShut,
}

/// The source side of a migration. See the module documentation.
#[derive(Clone, Debug)]
pub struct Source {
    cfg: SourceConfig,
    tps: u64,
    status: MigrationStatus,
    phase: Phase,
    dirty: Vec<PageBitmap>,
    discarded: Vec<PageBitmap>,
    bitmaps_in: Vec<bool>,
    /// Requested ranges (block, first target page, count), oldest first, at most [`MAX_URGENT`].
    urgent: VecDeque<(usize, u64, u64)>,
    cursor: (usize, u64),
    last_sent_block: Option<usize>,
    rp: RpDecoder,
    pings: Vec<u32>,
    channel_open: bool,
    resume_armed: bool,
    want_postcopy: bool,
    want_complete: bool,
    sync_asked: bool,
    events: VecDeque<Event>,
    pages_sent: u64,
    /// Page records sent as zero pages (`RAM_SAVE_FLAG_ZERO`).
    zero_pages_sent: u64,
    sent_log: Option<Vec<(usize, u64)>>,
    last_activity: Instant,
    /// The next target page of a host page being sent (they go consecutively).
    hp_cont: Option<(usize, u64)>,
    /// Per-page body choice (XBZRLE cache, zlib).
    codec: PageCodec,
    /// Multifd connections' output (precopy only).
    mfd: Option<multifd::MultifdTx>,
    /// [`multifd::MultifdTx::total`] when the current `poll_transmit` began.
    mfd_mark: u64,
}

/// A sink that counts what passes through it.
struct Counted<'s, S: Sink> {
    inner: &'s mut S,
    n: usize,
}

impl<S: Sink> Sink for Counted<'_, S> {
    fn put(&mut self, bytes: &[u8]) {
        self.n += bytes.len();
        self.inner.put(bytes);
    }
}

impl Source {
    /// A source waiting for its channel ([`Source::handle_channel_opened`]).
    pub fn new(cfg: SourceConfig) -> Self {
        let tps = cfg.profile.target_page_size as u64;
        let dirty: Vec<PageBitmap> = cfg
            .blocks
            .iter()
            .map(|b| PageBitmap::full(b.pages(tps)))
            .collect();
        let discarded = cfg
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages(tps)))
            .collect();
        Source {
            tps,
            status: MigrationStatus::None,
            phase: Phase::Idle,
            bitmaps_in: alloc::vec![false; dirty.len()],
            dirty,
            discarded,
            urgent: VecDeque::new(),
            cursor: (0, 0),
            last_sent_block: None,
            rp: RpDecoder::new(cfg.profile, cfg.limits),
            pings: Vec::new(),
            channel_open: false,
            resume_armed: false,
            want_postcopy: false,
            want_complete: false,
            sync_asked: false,
            events: VecDeque::new(),
            pages_sent: 0,
            zero_pages_sent: 0,
            sent_log: None,
            last_activity: Instant(0),
            hp_cont: None,
            codec: PageCodec::new(cfg.page_caps.clone(), tps as usize),
            mfd: cfg
                .multifd
                .filter(|_| !cfg.postcopy_ram)
                .map(|m| multifd::MultifdTx::new(m, &cfg.profile)),
            mfd_mark: 0,
            cfg,
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        self.status
    }

    /// The configuration.
    pub fn config(&self) -> &SourceConfig {
        &self.cfg
    }

    /// The dirty bitmap of `block`: pages still to send.
    pub fn dirty(&self, block: usize) -> Option<&PageBitmap> {
        self.dirty.get(block)
    }

    /// Page records sent so far.
    pub fn pages_sent(&self) -> u64 {
        self.pages_sent
    }

    /// Page records sent so far as zero pages (a subset of [`Source::pages_sent`]): the caller
    /// counts zero and data pages from these two without reading guest memory again.
    pub fn zero_pages_sent(&self) -> u64 {
        self.zero_pages_sent
    }

    /// The page encoder (XBZRLE / zlib counters).
    pub fn page_codec(&self) -> &PageCodec {
        &self.codec
    }

    /// Whether requested pages (page requests from the return path) wait to be sent: a caller
    /// that paces bulk data sends these at once (SM-URGENT-FIRST).
    pub fn urgent_pending(&self) -> bool {
        self.channel_open && !self.urgent.is_empty()
    }

    /// Starts (or stops) recording every page record sent, as (block, target page index).
    pub fn record_sent_pages(&mut self, on: bool) {
        self.sent_log = if on { Some(Vec::new()) } else { None };
    }

    /// Takes the recorded page records (see [`Source::record_sent_pages`]).
    pub fn take_sent_pages(&mut self) -> Vec<(usize, u64)> {
        self.sent_log
            .as_mut()
            .map(core::mem::take)
            .unwrap_or_default()
    }

    /// Marks pages of `block` that must never be sent (a RamDiscardManager's unplugged ranges):
    /// removed from the dirty bitmap now and at every rebuild (SM-REBUILD).
    pub fn set_discarded(&mut self, block: usize, pages: &PageBitmap) {
        if let (Some(d), Some(x)) = (self.discarded.get_mut(block), self.dirty.get_mut(block)) {
            if d.pages() == pages.pages() {
                *d = pages.clone();
                x.and_not(pages);
            }
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn step(&mut self, trigger: Trigger) -> bool {
        match next_status(
            SOURCE_TRANSITIONS,
            self.cfg.profile.version,
            self.status,
            trigger,
        ) {
            Ok(to) => {
                let from = self.status;
                self.status = to;
                self.events.push_back(Event::Status { from, to });
                true
            }
            Err(e) => {
                self.events.push_back(Event::IllegalTransition(e));
                false
            }
        }
    }

    /// A dirty-bitmap sync from the caller: pages set in `dirty` must be (re)sent.
    pub fn handle_dirty_sync(&mut self, block: usize, dirty: &PageBitmap) {
        if !matches!(
            self.status,
            MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::None
        ) {
            return;
        }
        if let (Some(d), Some(x)) = (self.dirty.get_mut(block), self.discarded.get(block)) {
            if d.pages() == dirty.pages() {
                d.or(dirty);
                d.and_not(x);
                self.sync_asked = false;
            }
        }
        if block == 0 {
            self.codec.dirty_sync();
        }
    }

    /// The main channel is up: the first one starts the migration; later ones are recovery
    /// channels (10.x: after [`Control::Resume`] in `postcopy-recover-setup`; 7.2: in
    /// `postcopy-paused` after `Resume`).
    pub fn handle_channel_opened(&mut self, now: Instant) -> Result<(), ControlError> {
        self.last_activity = now;
        let refuse = ControlError::WrongStatus {
            control: Control::Resume,
            status: self.status,
        };
        match self.status {
            MigrationStatus::None => {
                self.step(Trigger::Start);
                self.phase = Phase::Setup;
            }
            MigrationStatus::PostcopyRecoverSetup => {
                self.step(Trigger::ChannelOpened);
                self.phase = Phase::SendBitmaps;
            }
            MigrationStatus::PostcopyPaused
                if self.resume_armed && self.cfg.profile.version == Version::V7_2 =>
            {
                self.step(Trigger::ChannelOpened);
                self.phase = Phase::SendBitmaps;
            }
            _ => return Err(refuse),
        }
        self.resume_armed = false;
        self.channel_open = true;
        self.rp.reset();
        self.bitmaps_in.iter_mut().for_each(|b| *b = false);
        Ok(())
    }

    /// The main channel (and with it the return path) is gone.
    pub fn handle_channel_closed(&mut self, _now: Instant) {
        if !self.channel_open || self.status.is_final() {
            self.channel_open = false;
            return;
        }
        let rule = self.loss_rule();
        self.events.push_back(Event::ChannelLost { rule });
        self.interrupt();
    }

    /// Checks the silence bound while the source waits for an answer (bitmaps, RESUME_ACK,
    /// SHUT): a return path silent for longer than the configured timeout is handled as a lost
    /// channel (SM-TIMEOUT).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(limit) = self.cfg.silence_timeout else {
            return;
        };
        let waiting = matches!(
            self.phase,
            Phase::WaitBitmaps | Phase::WaitAck | Phase::WaitShut
        );
        if self.channel_open && waiting && now.since(self.last_activity) > limit {
            self.events.push_back(Event::ChannelLost {
                rule: Rule::SmTimeout,
            });
            self.interrupt();
        }
    }

    fn loss_rule(&self) -> Rule {
        match self.status {
            MigrationStatus::PostcopyActive => Rule::SmPauseAfterRun,
            MigrationStatus::PostcopyRecover | MigrationStatus::PostcopyRecoverSetup => {
                Rule::SmPauseInRecover
            }
            _ => Rule::SmFatalBeforeRun,
        }
    }

    fn interrupt(&mut self) {
        self.channel_open = false;
        self.urgent.clear();
        self.hp_cont = None;
        self.phase = Phase::Idle;
        if self.status.is_postcopy_recoverable() {
            self.step(Trigger::Interrupt);
        } else {
            self.step(Trigger::Fatal);
        }
    }

    /// An operator command: `StartPostcopy`, `Complete`, `Pause`, `Resume` or `Cancel`.
    pub fn handle_control(&mut self, now: Instant, control: Control) -> Result<(), ControlError> {
        self.last_activity = self.last_activity.max(now);
        let refuse = ControlError::WrongStatus {
            control,
            status: self.status,
        };
        match control {
            Control::StartPostcopy => {
                if !self.cfg.postcopy_ram {
                    return Err(ControlError::NotConfigured(control));
                }
                if !matches!(
                    self.status,
                    MigrationStatus::Setup | MigrationStatus::Active
                ) || self.want_complete
                {
                    return Err(refuse);
                }
                self.want_postcopy = true;
                Ok(())
            }
            Control::Complete => {
                if !matches!(
                    self.status,
                    MigrationStatus::Setup | MigrationStatus::Active
                ) || self.want_postcopy
                {
                    return Err(refuse);
                }
                self.want_complete = true;
                Ok(())
            }
            Control::Pause => {
                if !self.status.is_postcopy_recoverable() {
                    return Err(refuse);
                }
                let rule = self.loss_rule();
                self.events.push_back(Event::ChannelLost { rule });
                self.interrupt();
                Ok(())
            }
            Control::Resume => {
                if self.status != MigrationStatus::PostcopyPaused {
                    return Err(refuse);
                }
                if self.cfg.profile.has_recover_setup() {
                    self.step(Trigger::ResumeRequested);
                } else {
                    self.resume_armed = true;
                }
                Ok(())
            }
            Control::Cancel => {
                if self.status.is_final() || !self.step(Trigger::Cancel) {
                    return Err(refuse);
                }
                self.channel_open = false;
                self.phase = Phase::Idle;
                self.urgent.clear();
                self.step(Trigger::CancelDone);
                Ok(())
            }
            Control::Recover => Err(ControlError::NotForThisSide(control)),
        }
    }

    /// Consumes return-path bytes, from the first unconsumed one. Returns how many were consumed
    /// (whole messages), or the violation that stopped the channel (the status has then moved to
    /// postcopy-paused or failed).
    pub fn handle_return_path(&mut self, now: Instant, input: &[u8]) -> Result<usize, Violation> {
        if !self.channel_open {
            return Ok(0);
        }
        if !input.is_empty() {
            self.last_activity = now;
        }
        let mut pos = 0;
        loop {
            let at = self.rp.offset();
            let blocks = &self.cfg.blocks;
            let tps = self.tps;
            let expect = |name: &[u8]| {
                blocks
                    .iter()
                    .find(|b| b.name.as_bytes() == name)
                    .map(|b| PageBitmap::wire_size(b.pages(tps)))
            };
            match self.rp.decode(&input[pos..], &expect) {
                Ok((msg, n)) => {
                    pos += n;
                    if let Err(v) = self.on_rp(msg, at) {
                        return Err(self.rp_error(v));
                    }
                    if !self.channel_open {
                        return Ok(pos);
                    }
                }
                Err(WireError::Incomplete { .. }) => return Ok(pos),
                Err(WireError::Invalid(v)) => return Err(self.rp_error(v)),
            }
        }
    }

    fn rp_error(&mut self, v: Violation) -> Violation {
        self.events.push_back(Event::Error {
            channel: ChannelKind::ReturnPath,
            violation: v,
        });
        self.interrupt();
        v
    }

    fn block_index(&self, name: &[u8]) -> Option<usize> {
        self.cfg
            .blocks
            .iter()
            .position(|b| b.name.as_bytes() == name)
    }

    fn on_rp(&mut self, msg: RpMessage<'_>, at: u64) -> Result<(), Violation> {
        match msg {
            RpMessage::Pong(v) => {
                if !self.pings.contains(&v) {
                    return Err(Violation::new(at + 4, Rule::RpPongUnknown, v as u64));
                }
                self.events.push_back(Event::Pong { value: v });
                Ok(())
            }
            RpMessage::Shut(v) => {
                self.events.push_back(Event::ShutReceived { value: v });
                if v != 0 {
                    return Err(Violation::new(at + 4, Rule::RpShutError, v as u64));
                }
                if self.phase != Phase::WaitShut {
                    return Err(Violation::new(at, Rule::RpOrder, 1));
                }
                self.phase = Phase::Idle;
                self.channel_open = false;
                self.step(Trigger::Complete);
                Ok(())
            }
            RpMessage::ReqPagesId { start, len, name } => {
                let Some(b) = self.block_index(name) else {
                    // The name's length byte: after type, len, be64 start and be32 length.
                    return Err(Violation::new(at + 16, Rule::CmdBlockUnknown, 0));
                };
                self.request(b, start, len, at)
            }
            RpMessage::ReqPages { start, len } => {
                let name = self.rp.last_req_block().unwrap_or_default();
                let Some(b) = self.block_index(name) else {
                    return Err(Violation::new(at, Rule::RpReqNoBlock, 0));
                };
                self.request(b, start, len, at)
            }
            RpMessage::RecvBitmap { name, bitmap } => {
                let Some(b) = self.block_index(name) else {
                    // The name's length byte: after type and len.
                    return Err(Violation::new(at + 4, Rule::CmdBlockUnknown, 0));
                };
                if self.status != MigrationStatus::PostcopyRecover
                    || self.phase != Phase::WaitBitmaps
                {
                    return Err(Violation::new(at, Rule::RpOrder, 5));
                }
                let pages = self.dirty[b].pages();
                let mut received =
                    PageBitmap::from_le_bytes(bitmap, pages, self.rp.last_bitmap_offset())?;
                // SM-REBUILD: dirty = NOT(received) minus discarded.
                received.complement();
                received.and_not(&self.discarded[b]);
                self.dirty[b] = received;
                self.bitmaps_in[b] = true;
                if self.bitmaps_in.iter().all(|x| *x) {
                    self.phase = Phase::SendResume;
                }
                Ok(())
            }
            RpMessage::ResumeAck(_) => {
                if self.status != MigrationStatus::PostcopyRecover || self.phase != Phase::WaitAck {
                    return Err(Violation::new(at, Rule::RpOrder, 6));
                }
                self.step(Trigger::Resumed);
                self.last_sent_block = None;
                self.cursor = (0, 0);
                self.phase = Phase::Postcopy;
                Ok(())
            }
            RpMessage::SwitchoverAck => Ok(()),
            RpMessage::Unknown { ty, .. } => Err(Violation::new(at, Rule::RpType, ty.0 as u64)),
        }
    }

    fn request(&mut self, b: usize, start: u64, len: u32, at: u64) -> Result<(), Violation> {
        let spec = &self.cfg.blocks[b];
        let ps = spec.page_size;
        let len = len as u64;
        if start % ps != 0
            || len == 0
            || len % ps != 0
            || start.checked_add(len).map_or(true, |e| e > spec.len)
        {
            return Err(Violation::new(at + 4, Rule::RpReqRange, start));
        }
        if self.status != MigrationStatus::PostcopyActive {
            return Err(Violation::new(at, Rule::RpOrder, 3));
        }
        // Bounded queue: a request beyond it is served by the background scan anyway.
        if self.urgent.len() < MAX_URGENT {
            self.urgent.push_back((b, start / self.tps, len / self.tps));
        }
        Ok(())
    }

    /// Whether [`Source::poll_transmit`] would write something now.
    pub fn wants_transmit(&self) -> bool {
        self.channel_open
            && match self.phase {
                Phase::Setup | Phase::PrecopyEnd | Phase::PostcopyStart | Phase::Postcopy => true,
                Phase::SendBitmaps | Phase::SendResume => true,
                Phase::Precopy => self.any_dirty() || self.want_complete || self.want_postcopy,
                _ => false,
            }
    }

    /// Whether any page is dirty: the scan position first (where the next dirty page almost
    /// always is), then every word, stopping at the first set one (this runs once per RAM
    /// section part, so it must not count the whole bitmap).
    fn any_dirty(&self) -> bool {
        let (b, p) = self.cursor;
        if self.dirty.get(b).is_some_and(|d| next_set(d, p).is_some()) {
            return true;
        }
        self.dirty.iter().any(|d| d.words().iter().any(|&w| w != 0))
    }

    /// Writes main-channel bytes into `out`, whole records, until at least `budget` bytes are
    /// written or nothing is left to send now. Returns the byte count.
    pub fn poll_transmit(
        &mut self,
        mem: &impl SourceMemory,
        out: &mut impl Sink,
        budget: usize,
    ) -> usize {
        let mut o = Counted { inner: out, n: 0 };
        self.mfd_mark = self.mfd_total();
        while self.channel_open && o.n + self.mfd_spent() < budget {
            let before = o.n;
            match self.phase {
                Phase::Setup => self.write_setup(&mut o),
                Phase::Precopy => {
                    if self.want_postcopy {
                        self.phase = Phase::PostcopyStart;
                    } else if self.any_dirty() {
                        self.write_part(mem, &mut o);
                    } else if self.want_complete {
                        self.begin_precopy_end(&mut o);
                    } else {
                        if !self.sync_asked {
                            self.sync_asked = true;
                            self.events.push_back(Event::NeedDirtySync);
                        }
                        break;
                    }
                }
                Phase::PrecopyEnd => self.write_precopy_end(mem, &mut o, budget),
                Phase::PostcopyStart => self.write_postcopy_start(&mut o),
                Phase::Postcopy => {
                    if self.any_dirty() {
                        self.write_part(mem, &mut o);
                    } else {
                        self.write_final_end(&mut o);
                    }
                }
                Phase::SendBitmaps => {
                    // SM-RECOVER-BITMAP-ALL.
                    for b in &self.cfg.blocks {
                        Command::RecvBitmap {
                            name: b.name.as_bytes(),
                        }
                        .encode(&mut o);
                    }
                    self.phase = Phase::WaitBitmaps;
                }
                Phase::SendResume => {
                    Command::PostcopyResume.encode(&mut o);
                    self.phase = Phase::WaitAck;
                }
                Phase::Idle | Phase::WaitBitmaps | Phase::WaitAck | Phase::WaitShut => break,
            }
            if o.n == before
                && matches!(
                    self.phase,
                    Phase::Idle | Phase::WaitBitmaps | Phase::WaitAck | Phase::WaitShut
                )
            {
                break;
            }
        }
        o.n
    }

    fn ping(&mut self, v: u32, out: &mut impl Sink) {
        self.pings.push(v);
        Command::Ping(v).encode(out);
    }

    fn write_setup(&mut self, o: &mut impl Sink) {
        Item::Header {
            version: QEVM_VERSION,
        }
        .encode(o);
        if self.cfg.profile.configuration {
            let mut buf = [0u8; 32];
            let caps = self
                .cfg
                .page_caps
                .ignore_shared
                .then(|| capabilities_from(&[b"x-ignore-shared"], &mut buf))
                .flatten();
            let subs: &[ConfigSubsection<'_>] = match &caps {
                Some(c) => &[ConfigSubsection::Capabilities(*c)],
                None => &[],
            };
            encode_configuration(self.cfg.machine.as_bytes(), subs, o);
        }
        if self.cfg.return_path || self.cfg.postcopy_ram {
            Command::OpenReturnPath.encode(o);
            self.ping(1, o);
        }
        if self.cfg.postcopy_ram {
            let summary = self.cfg.blocks.iter().fold(0u64, |a, b| a | b.page_size);
            Command::PostcopyAdvise(Some(Advise {
                ram_pagesize_summary: summary,
                target_page_size: self.tps,
            }))
            .encode(o);
        }
        SectionHeader::Start(SectionIdent {
            section_id: self.cfg.ram_section_id,
            idstr: b"ram",
            instance_id: 0,
            version_id: 4,
        })
        .encode(o);
        let total: u64 = self.cfg.blocks.iter().map(|b| b.len).sum();
        o.put_be64(total | RamFlags::MEM_SIZE.0);
        let tps = self.tps;
        let postcopy = self.cfg.postcopy_ram;
        let ignore_shared = self.cfg.page_caps.ignore_shared;
        encode_mem_size(
            self.cfg.blocks.iter().map(|b| BlockInfo {
                name: b.name.as_bytes(),
                used_length: b.len,
                page_size: (postcopy && b.page_size != tps).then_some(b.page_size),
                // Every block of this source is private RAM at address 0 of its region.
                mr_addr: ignore_shared.then_some(0),
            }),
            o,
        );
        self.eos_footer(o);
        self.step(Trigger::SetupDone);
        self.phase = Phase::Precopy;
    }

    /// Multifd bytes queued since the current `poll_transmit` began.
    fn mfd_spent(&self) -> usize {
        (self.mfd_total() - self.mfd_mark) as usize
    }

    fn eos_footer(&mut self, o: &mut impl Sink) {
        self.mfd_sync(o);
        RamRecord {
            flags: RamFlags::EOS,
            addr: 0,
            name: None,
            body: RamBody::Eos,
        }
        .encode(o);
        Item::Footer {
            section_id: self.cfg.ram_section_id,
        }
        .encode(o);
    }

    /// The next page to send: requested pages first (SM-URGENT-FIRST), then the background scan.
    fn next_page(&mut self) -> Option<(usize, u64)> {
        // The rest of a host page first: its target pages go consecutively (RAM-HOSTPAGE).
        if let Some((b, p)) = self.hp_cont.take() {
            if self.dirty[b].test(p) {
                return Some((b, p));
            }
        }
        while let Some(&(b, first, count)) = self.urgent.front() {
            // The first page of the range still dirty; the rest stays queued.
            let end = first + count;
            match next_set(&self.dirty[b], first).filter(|&p| p < end) {
                Some(p) => {
                    let per = self.cfg.blocks[b].page_size / self.tps;
                    let p = next_set(&self.dirty[b], p - p % per).unwrap_or(p);
                    if p + 1 >= end {
                        self.urgent.pop_front();
                    } else if let Some(f) = self.urgent.front_mut() {
                        *f = (b, p + 1, end - p - 1);
                    }
                    // Continue the background scan after the requested page, as QEMU does.
                    self.cursor = (b, p + 1);
                    return Some((b, p));
                }
                None => {
                    self.urgent.pop_front();
                }
            }
        }
        let n = self.dirty.len();
        for i in 0..=n {
            if self.cursor.0 + i == n {
                // The scan passed the last block: a round is complete (XBZRLE starts).
                self.codec.round_complete();
            }
            let b = (self.cursor.0 + i) % n.max(1);
            let from = if i == 0 { self.cursor.1 } else { 0 };
            if let Some(p) = next_set(&self.dirty[b], from) {
                // Start at the first dirty target page of its host page.
                let per = self.cfg.blocks[b].page_size / self.tps;
                let p = next_set(&self.dirty[b], p - p % per).unwrap_or(p);
                self.cursor = (b, p + 1);
                return Some((b, p));
            }
        }
        None
    }

    fn send_page(&mut self, mem: &impl SourceMemory, b: usize, p: u64, o: &mut impl Sink) {
        let offset = p * self.tps;
        let data = mem.page(b, offset);
        let continue_flag = self.last_sent_block == Some(b);
        let name = if continue_flag {
            None
        } else {
            Some(self.cfg.blocks[b].name.as_bytes())
        };
        let zero = is_zero(data);
        let ctx = PageCtx {
            // RAM address: the blocks laid out one after the other in MEM_SIZE order.
            addr: self.cfg.blocks[..b].iter().map(|x| x.len).sum::<u64>() + offset,
            same_block: continue_flag,
            last_stage: self.phase == Phase::PrecopyEnd,
            postcopy: self.phase == Phase::Postcopy,
        };
        let (flags, body) = match self.codec.encode(data, zero, ctx) {
            PageChoice::Zero => {
                self.zero_pages_sent += 1;
                (RamFlags::ZERO, RamBody::Zero { fill: 0 })
            }
            PageChoice::Page => (RamFlags::PAGE, RamBody::Page(data)),
            PageChoice::PageCopy => (RamFlags::PAGE, RamBody::Page(self.codec.buf())),
            PageChoice::Xbzrle => (RamFlags::XBZRLE, RamBody::Xbzrle(self.codec.buf())),
            PageChoice::Compressed => (
                RamFlags::COMPRESS_PAGE,
                RamBody::Compressed(self.codec.buf()),
            ),
            PageChoice::Skip => {
                // Unchanged since the copy the destination holds: nothing is written.
                self.page_done(b, p);
                return;
            }
        };
        let flags = if continue_flag {
            flags.with(RamFlags::CONTINUE)
        } else {
            flags
        };
        RamRecord {
            flags,
            addr: offset,
            name,
            body,
        }
        .encode(o);
        self.last_sent_block = Some(b);
        self.page_sent(b, p);
    }

    /// Page `p` of block `b` is dealt with: clean in the dirty bitmap, and the scan goes on
    /// with the rest of its host page, if any is left.
    fn page_done(&mut self, b: usize, p: u64) {
        self.dirty[b].clear(p);
        let per = self.cfg.blocks[b].page_size / self.tps;
        self.hp_cont = (per > 1 && (p + 1) % per != 0).then_some((b, p + 1));
    }

    /// [`Self::page_done`] for a page written to a channel (main or multifd): counted, and
    /// logged when the log is on.
    fn page_sent(&mut self, b: usize, p: u64) {
        self.page_done(b, p);
        self.pages_sent += 1;
        if let Some(log) = self.sent_log.as_mut() {
            log.push((b, p));
        }
    }

    fn write_part(&mut self, mem: &impl SourceMemory, o: &mut impl Sink) {
        SectionHeader::Part {
            section_id: self.cfg.ram_section_id,
        }
        .encode(o);
        let mfd = self.mfd_active();
        let per_part = if mfd {
            // One sync point per part: parts of many packets per connection.
            let ppp = crate::multifd::pages_per_packet(&self.cfg.profile) as usize;
            self.cfg
                .pages_per_section
                .max(ppp * self.multifd_channels() * 4)
        } else {
            self.cfg.pages_per_section
        };
        for _ in 0..per_part.max(1) {
            let urgent = !self.urgent.is_empty();
            let Some((b, p)) = self.next_page() else {
                break;
            };
            if mfd {
                self.mfd_send_page(mem, b, p, o);
                continue;
            }
            self.send_page(mem, b, p, o);
            // The part that carries requested pages ends with the last of them (and its host
            // page), so the destination can place them without waiting for background pages.
            if urgent && self.urgent.is_empty() && self.hp_cont.is_none() {
                break;
            }
        }
        self.eos_footer(o);
    }

    fn switchover(&mut self, o: &mut impl Sink) {
        if self.cfg.profile.version == Version::V10 {
            self.step(Trigger::Switchover);
            // SM-SWITCHOVER-START: only a 10.x destination knows the command.
            if self.cfg.profile.switchover_start {
                Command::SwitchoverStart.encode(o);
            }
        }
    }

    fn begin_precopy_end(&mut self, o: &mut impl Sink) {
        self.switchover(o);
        SectionHeader::End {
            section_id: self.cfg.ram_section_id,
        }
        .encode(o);
        self.phase = Phase::PrecopyEnd;
    }

    fn write_devices(&self, o: &mut impl Sink) {
        for d in &self.cfg.devices {
            SectionHeader::Full(SectionIdent {
                section_id: d.section_id,
                idstr: d.idstr.as_bytes(),
                instance_id: d.instance_id,
                version_id: d.version_id,
            })
            .encode(o);
            o.put(&d.data);
            Item::Footer {
                section_id: d.section_id,
            }
            .encode(o);
        }
    }

    fn write_precopy_end(
        &mut self,
        mem: &impl SourceMemory,
        o: &mut Counted<'_, impl Sink>,
        budget: usize,
    ) {
        while o.n + self.mfd_spent() < budget {
            let Some((b, p)) = self.next_page() else {
                self.eos_footer(o);
                self.write_devices(o);
                Item::Eof.encode(o);
                if let Some(json) = &self.cfg.vmdesc {
                    Item::VmDescription(json).encode(o);
                }
                self.finish_stream();
                return;
            };
            if self.mfd_active() {
                self.mfd_send_page(mem, b, p, o);
            } else {
                self.send_page(mem, b, p, o);
            }
        }
    }

    fn finish_stream(&mut self) {
        if self.cfg.return_path || self.cfg.postcopy_ram {
            self.phase = Phase::WaitShut;
        } else {
            self.phase = Phase::Idle;
            self.channel_open = false;
            self.step(Trigger::Complete);
        }
    }

    fn write_postcopy_start(&mut self, o: &mut impl Sink) {
        self.switchover(o);
        // A partly dirty host page is sent whole: round the dirty bitmaps out to host pages.
        for (b, spec) in self.cfg.blocks.iter().enumerate() {
            let per = spec.page_size / self.tps;
            if per > 1 {
                let hosts: Vec<u64> = self.dirty[b].iter_ones().map(|p| p / per).collect();
                for h in hosts {
                    self.dirty[b].set_range(h * per, per);
                }
            }
        }
        self.hp_cont = None;
        // SM-DISCARD-DIRTY: every page dirty now (never sent or dirtied since its last send).
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut raw: Vec<u8> = Vec::new();
        for (b, spec) in self.cfg.blocks.iter().enumerate() {
            ranges.clear();
            let mut run: Option<(u64, u64)> = None;
            for p in self.dirty[b].iter_ones() {
                run = match run {
                    Some((s, n)) if s + n == p => Some((s, n + 1)),
                    Some(r) => {
                        ranges.push(r);
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
            ranges.extend(run);
            for chunk in ranges.chunks(12) {
                raw.clear();
                let bytes: Vec<(u64, u64)> = chunk
                    .iter()
                    .map(|&(s, n)| (s * self.tps, n * self.tps))
                    .collect();
                encode_ranges(&bytes, &mut raw);
                if let Some(d) = Discard::new(spec.name.as_bytes(), &raw) {
                    Command::RamDiscard(d).encode(o);
                }
            }
        }
        self.last_sent_block = None;
        self.ping(2, o);
        let mut blob: Vec<u8> = Vec::new();
        Command::PostcopyListen.encode(&mut blob);
        self.write_devices(&mut blob);
        self.ping(3, &mut blob);
        Command::PostcopyRun.encode(&mut blob);
        Command::Packaged {
            len: blob.len() as u32,
        }
        .encode(o);
        o.put(&blob);
        self.ping(4, o);
        self.step(Trigger::Postcopy);
        self.phase = Phase::Postcopy;
    }

    fn write_final_end(&mut self, o: &mut impl Sink) {
        SectionHeader::End {
            section_id: self.cfg.ram_section_id,
        }
        .encode(o);
        self.eos_footer(o);
        Item::Eof.encode(o);
        self.finish_stream();
    }
}

/// A zero page to compare against (memcmp is far faster than a byte loop).
static ZEROS: [u8; 65536] = [0; 65536];

/// Whether every byte of `data` is zero (the source's zero-page detection).
fn is_zero(data: &[u8]) -> bool {
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// The first set page at or after `from`, scanning whole words.
fn next_set(bm: &PageBitmap, from: u64) -> Option<u64> {
    let words = bm.words();
    let mut w = (from / 64) as usize;
    let mut bits = *words.get(w)? & (u64::MAX << (from % 64));
    loop {
        if bits != 0 {
            let p = w as u64 * 64 + bits.trailing_zeros() as u64;
            return (p < bm.pages()).then_some(p);
        }
        w += 1;
        bits = *words.get(w)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory whose every page is 0xab.
    struct Pages;
    static PAGE: [u8; 4096] = [0xab; 4096];
    impl SourceMemory for Pages {
        fn page(&self, _block: usize, _offset: u64) -> &[u8] {
            &PAGE
        }
    }

    #[test]
    fn a_requested_page_goes_out_alone_in_the_next_part() {
        let blocks = alloc::vec![RamBlockSpec::new("pc.ram", 64 * 4096, 4096)];
        let mut cfg = SourceConfig::new(Profile::QEMU_7_2, "pc", blocks, true);
        cfg.pages_per_section = 16;
        let mut s = Source::new(cfg);
        s.handle_channel_opened(Instant(0)).unwrap();
        let mut out = Vec::new();
        s.poll_transmit(&Pages, &mut out, 1);
        s.handle_control(Instant(1), Control::StartPostcopy)
            .unwrap();
        s.poll_transmit(&Pages, &mut out, 1);
        assert_eq!(s.status(), MigrationStatus::PostcopyActive);
        let sent = s.pages_sent();

        let mut rp = Vec::new();
        RpMessage::ReqPagesId {
            start: 40 * 4096,
            len: 4096,
            name: b"pc.ram",
        }
        .encode(&mut rp);
        assert_eq!(s.handle_return_path(Instant(2), &rp), Ok(rp.len()));
        assert!(s.urgent_pending());

        // Budget 1: one part, and it holds the requested page only (the background scan's
        // pages would otherwise fill it up to 16 pages ahead of the destination's placement).
        out.clear();
        s.poll_transmit(&Pages, &mut out, 1);
        let mut want = Vec::new();
        SectionHeader::Part { section_id: 2 }.encode(&mut want);
        RamRecord {
            flags: RamFlags::PAGE,
            addr: 40 * 4096,
            name: Some(b"pc.ram"),
            body: RamBody::Page(&PAGE),
        }
        .encode(&mut want);
        RamRecord {
            flags: RamFlags::EOS,
            addr: 0,
            name: None,
            body: RamBody::Eos,
        }
        .encode(&mut want);
        Item::Footer { section_id: 2 }.encode(&mut want);
        assert_eq!(out, want);
        assert_eq!(s.pages_sent(), sent + 1);
        assert!(!s.urgent_pending());

        // Then the background scan fills whole parts again, from after the requested page.
        out.clear();
        s.poll_transmit(&Pages, &mut out, 1);
        assert_eq!(s.pages_sent(), sent + 17);
        assert!(!s.dirty(0).unwrap().test(41) && !s.dirty(0).unwrap().test(56));
        assert!(s.dirty(0).unwrap().test(57));
    }

    #[test]
    fn zero_pages_are_counted_apart() {
        struct Mixed;
        static ZERO: [u8; 4096] = [0; 4096];
        impl SourceMemory for Mixed {
            fn page(&self, _block: usize, offset: u64) -> &[u8] {
                if (offset / 4096) % 2 == 0 {
                    &ZERO
                } else {
                    &PAGE
                }
            }
        }
        let blocks = alloc::vec![RamBlockSpec::new("pc.ram", 10 * 4096, 4096)];
        let mut s = Source::new(SourceConfig::new(Profile::QEMU_7_2, "pc", blocks, false));
        s.handle_channel_opened(Instant(0)).unwrap();
        let mut out = Vec::new();
        s.poll_transmit(&Mixed, &mut out, usize::MAX);
        assert_eq!((s.pages_sent(), s.zero_pages_sent()), (10, 5));
    }

    #[test]
    fn next_set_scans_words() {
        let mut b = PageBitmap::new(200);
        for p in [3, 64, 130, 199] {
            b.set(p);
        }
        assert_eq!(next_set(&b, 0), Some(3));
        assert_eq!(next_set(&b, 4), Some(64));
        assert_eq!(next_set(&b, 65), Some(130));
        assert_eq!(next_set(&b, 131), Some(199));
        assert_eq!(next_set(&b, 200), None);
        assert_eq!(next_set(&PageBitmap::new(0), 0), None);
    }
}
