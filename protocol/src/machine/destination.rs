//! The destination state machine.
//!
//! This module owns [`Destination`]: what an incoming migration does with each item of the main
//! channel and of every recovery channel, what it writes on the return path, its received bitmap
//! per block, the set of pages guest faults wait for, and how it fails, pauses, recovers and
//! cancels. Bytes are decoded only by [`StreamDecoder`] and return-path messages encoded only by
//! [`RpMessage::encode`]; pages go from the caller's input slice to [`GuestMemory`] unchanged.
//!
//! Rules applied here: CFG-MACHINE, RAM-BLOCK-UNKNOWN, RAM-OFFSET (against the local block),
//! RAM-PAGESIZE, CMD-ADVISE-LEN, CMD-ADVISE-PAGESIZE, CMD-BLOCK-UNKNOWN, CMD-DISCARD-RANGE,
//! CMD-ORDER, CMD-PING-NO-RP, SM-PONG, SM-SHUT-LAST, SM-FATAL-BEFORE-RUN, SM-PAUSE-AFTER-RUN,
//! SM-PAUSE-IN-RECOVER, SM-PARTIAL-HOSTPAGE, SM-RECOVER-NO-HEADER, SM-RESUME-STATE,
//! SM-REREQUEST, SM-FIRST-REQ-NAMED, SM-CANCEL, SM-TIMEOUT.
//!
//! Huge-page blocks (page size a multiple of the target page size): in postcopy the target
//! pages of one host page are collected with [`crate::hostpage::HostPageAssembler`] and placed
//! with one `place_page`/`place_zero`; faults and requests are per host page. A host page still
//! partial when a `handle_stream` call runs out of input is not kept: the decoder is rewound to
//! its first record and those bytes are reported unconsumed, so a channel loss drops it
//! (SM-PARTIAL-HOSTPAGE) and it is sent again after recovery. Before POSTCOPY_LISTEN (precopy)
//! target pages are placed one by one.
//!
//! Return-path bytes queued but not taken with [`Destination::poll_transmit`] when the channel
//! is lost are dropped with it.

use alloc::collections::{BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::control::{Control, ControlError};
use super::events::{ChannelKind, Event, Instant};
use super::memory::{GuestMemory, RamBlockSpec};
use super::status::{
    next_status, IllegalTransition, MigrationStatus, Trigger, DESTINATION_TRANSITIONS,
};
use crate::bitmap::PageBitmap;
use crate::command::Command;
use crate::error::{Violation, WireError};
use crate::hostpage::{HostPageAssembler, TargetPage};
use crate::limits::Limits;
use crate::profile::Profile;
use crate::ram::{RamBody, RamRecord};
use crate::rp::RpMessage;
use crate::rule::Rule;
use crate::section::SectionHeader;
use crate::stream::{Channel, Item, StreamDecoder};

#[cfg(test)]
mod known_devices_tests;
mod multifd;
pub use multifd::MultifdConfig;

/// Largest host page a block may have (1 GiB hugetlbfs): the assembly buffer's bound.
pub const MAX_HOST_PAGE: u64 = 1 << 30;

/// How a destination is set up.
#[derive(Clone, Debug)]
pub struct DestinationConfig {
    /// The version profile of both sides.
    pub profile: Profile,
    /// Caps on peer-controlled lengths.
    pub limits: Limits,
    /// The local machine type name; the stream's name must be a prefix of it (CFG-MACHINE).
    pub machine: String,
    /// The local RAM blocks; the stream must announce exactly these (RAM-BLOCK-UNKNOWN).
    pub blocks: Vec<RamBlockSpec>,
    /// Whether the `postcopy-ram` capability is on (decides the accepted ADVISE length).
    pub postcopy_ram: bool,
    /// A channel silent for longer than this many nanoseconds counts as failed (SM-TIMEOUT),
    /// checked by [`Destination::handle_timeout`]; `None`: never.
    pub silence_timeout: Option<u64>,
    /// Most device-section bytes kept for dumping over the whole migration (SEC-DEVICE-LEN
    /// beyond it); each section is also capped by `limits.max_device_payload`.
    pub max_device_bytes: usize,
    /// Multifd connections (capability `multifd`), see [`Destination::handle_multifd`].
    pub multifd: Option<MultifdConfig>,
    /// A VM description used to delimit device payloads (instead of the footer scan). Its
    /// devices are also the receiver's device table when `known_devices` is `None`.
    #[cfg(feature = "vmdesc")]
    pub vmdesc: Option<crate::vmdesc::VmDesc>,
    /// The receiver's devices `(idstr, instance_id, version_id)`: a START/FULL section naming
    /// another device breaks SEC-UNKNOWN-DEVICE, one with a newer version SEC-VERSION. `None`:
    /// the devices of `vmdesc` plus the iterative `ram` section (instance 0, version 4) when a
    /// VM description is configured (QEMU's description lists every non-iterative section),
    /// else every device is accepted.
    pub known_devices: Option<Vec<(String, u32, u32)>>,
}

impl DestinationConfig {
    /// A configuration with default limits, no timeout and no VM description.
    pub fn new(
        profile: Profile,
        machine: &str,
        blocks: Vec<RamBlockSpec>,
        postcopy_ram: bool,
    ) -> Self {
        DestinationConfig {
            profile,
            limits: Limits::DEFAULT,
            machine: String::from(machine),
            blocks,
            postcopy_ram,
            silence_timeout: None,
            max_device_bytes: 64 << 20,
            multifd: None,
            #[cfg(feature = "vmdesc")]
            vmdesc: None,
            known_devices: None,
        }
    }

    /// The device table the main channel's decoder checks sections against (see
    /// `known_devices`), `None` when every device is accepted.
    pub fn device_table(&self) -> Option<Vec<(String, u32, u32)>> {
        if let Some(t) = &self.known_devices {
            return Some(t.clone());
        }
        #[cfg(feature = "vmdesc")]
        if let Some(v) = &self.vmdesc {
            let mut t: Vec<(String, u32, u32)> = v
                .devices
                .iter()
                .map(|d| (d.name.clone(), d.instance_id, d.version))
                .collect();
            t.push((String::from("ram"), 0, 4));
            return Some(t);
        }
        None
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A block's length is not a multiple of the target page size, or zero.
    BlockLength(String),
    /// A block's page size differs from the target page size (host pages are not supported).
    HostPageSize(String),
    /// Two blocks have the same name, or a name is not 1..=255 bytes.
    BlockName(String),
}

/// Where the incoming postcopy is (QEMU's `PostcopyState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Pc {
    None,
    Advise,
    Discard,
    Listening,
    Running,
}

/// The answer to [`Destination::handle_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page is already present: no wait.
    Present,
    /// A request went onto the return path; wait for [`Event::FaultResolved`].
    Requested,
    /// The page was already requested; wait for [`Event::FaultResolved`].
    AlreadyWaiting,
    /// The migration cannot request it now (paused, recovering, before LISTEN): the wait is
    /// recorded and the request is sent after recovery (SM-REREQUEST).
    Queued,
    /// The migration is cancelled or failed: the page will never come.
    Released,
    /// No such block or offset.
    OutOfRange,
}

/// A device section kept for dumping: an owned copy of its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    /// Section id from the stream.
    pub section_id: u32,
    /// Device idstr.
    pub idstr: Vec<u8>,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// The payload bytes (between header and footer).
    pub data: Vec<u8>,
}

/// The destination side of a migration. See the module documentation.
#[derive(Clone, Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    tps: u64,
    status: MigrationStatus,
    pc: Pc,
    decoder: Option<StreamDecoder>,
    channel_open: bool,
    channels_opened: u32,
    recover_armed: bool,
    rp_open: bool,
    eof_seen: bool,
    received: Vec<PageBitmap>,
    pending: BTreeSet<(usize, u64)>,
    last_req_block: Option<usize>,
    rp_out: Vec<u8>,
    events: VecDeque<Event>,
    devices: Vec<DeviceSection>,
    cur_device: Option<usize>,
    fill: Vec<u8>,
    last_activity: Instant,
    pages_placed: u64,
    duplicates: u64,
    last_block: Option<usize>,
    device_bytes: usize,
    has_huge: bool,
    hp_buf: Vec<u8>,
    mfd: Option<multifd::MultifdState>,
}

/// A failure while acting on one item: a violation of the peer, or a machine bug.
enum Stop {
    Peer(Violation),
    Local(Violation),
}

impl From<Violation> for Stop {
    fn from(v: Violation) -> Self {
        Stop::Peer(v)
    }
}

impl Destination {
    /// A destination waiting for its main channel ([`Destination::handle_channel_opened`]).
    pub fn new(cfg: DestinationConfig) -> Result<Self, ConfigError> {
        let tps = cfg.profile.target_page_size as u64;
        for (i, b) in cfg.blocks.iter().enumerate() {
            if b.name.is_empty()
                || b.name.len() > 255
                || cfg.blocks[..i].iter().any(|o| o.name == b.name)
            {
                return Err(ConfigError::BlockName(b.name.clone()));
            }
            if b.len == 0 || b.len % tps != 0 || b.len > cfg.limits.max_block_bytes {
                return Err(ConfigError::BlockLength(b.name.clone()));
            }
            if b.page_size < tps
                || b.page_size % tps != 0
                || b.page_size > MAX_HOST_PAGE
                || b.len % b.page_size != 0
            {
                return Err(ConfigError::HostPageSize(b.name.clone()));
            }
        }
        let max_ps = cfg.blocks.iter().map(|b| b.page_size).max().unwrap_or(tps);
        let received = cfg
            .blocks
            .iter()
            .map(|b| PageBitmap::new(b.pages(tps)))
            .collect();
        let mfd = cfg
            .multifd
            .map(|m| multifd::MultifdState::new(m, cfg.profile, cfg.limits));
        Ok(Destination {
            mfd,
            tps,
            status: MigrationStatus::None,
            pc: Pc::None,
            decoder: None,
            channel_open: false,
            channels_opened: 0,
            recover_armed: false,
            rp_open: false,
            eof_seen: false,
            received,
            pending: BTreeSet::new(),
            last_req_block: None,
            rp_out: Vec::new(),
            events: VecDeque::new(),
            devices: Vec::new(),
            cur_device: None,
            fill: vec![0u8; tps as usize],
            last_activity: Instant(0),
            pages_placed: 0,
            duplicates: 0,
            last_block: None,
            device_bytes: 0,
            has_huge: max_ps > tps,
            hp_buf: if max_ps > tps {
                vec![0u8; max_ps as usize]
            } else {
                Vec::new()
            },
            cfg,
        })
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        self.status
    }

    /// Whether POSTCOPY_RUN has been processed: from here on the guest runs on this side
    /// (QEMU starts its vCPUs here, not at LISTEN, where the status already reads
    /// `postcopy-active`). Stays true through pauses and recoveries.
    pub fn postcopy_running(&self) -> bool {
        self.pc == Pc::Running
    }

    /// The configuration.
    pub fn config(&self) -> &DestinationConfig {
        &self.cfg
    }

    /// The received bitmap of block `block` (one bit per target page).
    pub fn received(&self, block: usize) -> Option<&PageBitmap> {
        self.received.get(block)
    }

    /// Pages (block, target page index) that guest faults wait for.
    pub fn pending_faults(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.pending.iter().copied()
    }

    /// The device sections received so far, in stream order.
    pub fn devices(&self) -> &[DeviceSection] {
        &self.devices
    }

    /// Host pages placed so far.
    pub fn pages_placed(&self) -> u64 {
        self.pages_placed
    }

    /// Postcopy page records for pages already present, dropped (not applied twice).
    pub fn duplicate_pages(&self) -> u64 {
        self.duplicates
    }

    /// Whether a channel is open and being read.
    pub fn channel_open(&self) -> bool {
        self.channel_open
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends the pending return-path bytes to `out`; returns how many.
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.rp_out.len();
        out.append(&mut self.rp_out);
        n
    }

    /// Whether return-path bytes are waiting.
    pub fn wants_transmit(&self) -> bool {
        !self.rp_out.is_empty()
    }

    /// A new incoming connection: the main channel at first, then a recovery channel (only in
    /// `postcopy-paused` after [`Control::Recover`]).
    pub fn handle_channel_opened(&mut self, now: Instant) -> Result<(), ControlError> {
        self.last_activity = now;
        match self.status {
            MigrationStatus::None if self.channels_opened == 0 => {
                self.decoder = Some(self.new_main_decoder());
                self.channel_open = true;
                self.channels_opened = 1;
                if self.cfg.profile.has_recover_setup() {
                    // 10.x destinations have a real `setup` status.
                    self.step(Trigger::Start).ok();
                }
                Ok(())
            }
            MigrationStatus::PostcopyPaused if self.recover_armed => {
                let Some(old) = self.decoder.as_ref() else {
                    return Err(ControlError::WrongStatus {
                        control: Control::Recover,
                        status: self.status,
                    });
                };
                // SM-RECOVER-NO-HEADER: the recovery channel continues the stream.
                self.decoder = Some(old.resume_from());
                self.channel_open = true;
                self.channels_opened += 1;
                self.recover_armed = false;
                self.last_req_block = None;
                self.rp_open = true;
                self.rp_out.clear();
                self.step(Trigger::ChannelOpened).ok();
                Ok(())
            }
            status => Err(ControlError::WrongStatus {
                control: Control::Recover,
                status,
            }),
        }
    }

    fn new_main_decoder(&self) -> StreamDecoder {
        #[allow(unused_mut)]
        let mut d = StreamDecoder::new(Channel::Main, self.cfg.profile, self.cfg.limits);
        #[cfg(feature = "vmdesc")]
        if let Some(v) = &self.cfg.vmdesc {
            d.set_vmdesc(v.clone());
        }
        if let Some(t) = self.cfg.device_table() {
            d.set_known_devices(t.iter().map(|(n, i, v)| (n.as_bytes(), *i, *v)));
        }
        let tps = self.tps;
        d.set_huge_page_blocks(
            self.cfg
                .blocks
                .iter()
                .filter(|b| b.page_size != tps)
                .map(|b| b.name.as_bytes()),
        );
        d
    }

    /// The current channel closed (EOF or error on the socket).
    pub fn handle_channel_closed(&mut self, now: Instant) {
        self.last_activity = now;
        if !self.channel_open {
            return;
        }
        self.channel_open = false;
        if self.status.is_final() {
            return;
        }
        let rule = self.loss_rule();
        self.events.push_back(Event::ChannelLost { rule });
        self.interrupt(rule);
    }

    /// When [`Destination::handle_timeout`] will find the open channel silent for longer than
    /// the configured bound, unless bytes arrive first; `None` without a bound, without an
    /// open channel or once the migration has ended. A driver sleeps at most until then.
    pub fn silence_deadline(&self) -> Option<Instant> {
        let limit = self.cfg.silence_timeout?;
        (self.channel_open && !self.status.is_final())
            .then(|| Instant(self.last_activity.0.saturating_add(limit).saturating_add(1)))
    }

    /// Checks the silence bound: a channel silent for longer than the configured timeout is
    /// handled as lost (SM-TIMEOUT).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(limit) = self.cfg.silence_timeout else {
            return;
        };
        if self.channel_open && !self.status.is_final() && now.since(self.last_activity) > limit {
            self.channel_open = false;
            self.events.push_back(Event::ChannelLost {
                rule: Rule::SmTimeout,
            });
            let rule = self.loss_rule();
            self.interrupt(rule);
        }
    }

    /// Which rule a failure falls under now.
    fn loss_rule(&self) -> Rule {
        match self.status {
            MigrationStatus::PostcopyRecover => Rule::SmPauseInRecover,
            MigrationStatus::PostcopyActive if self.pc == Pc::Running => Rule::SmPauseAfterRun,
            _ => Rule::SmFatalBeforeRun,
        }
    }

    /// Fails or pauses after a channel loss or an error, by `rule`.
    fn interrupt(&mut self, rule: Rule) {
        self.channel_open = false;
        self.cur_device = None;
        if self.status.is_final() {
            // Bytes after EOF on a channel still open: the violation is reported, the
            // completed migration (and its queued SHUT) stays as it is.
            return;
        }
        self.rp_out.clear();
        match rule {
            Rule::SmPauseAfterRun | Rule::SmPauseInRecover => {
                // SM-PARTIAL-HOSTPAGE: a record cut short was never placed; nothing to undo.
                self.step(Trigger::Interrupt).ok();
            }
            _ => {
                if self.step(Trigger::Fatal).is_ok() {
                    self.release_waits();
                }
            }
        }
    }

    fn release_waits(&mut self) {
        let count = self.pending.len() as u64;
        self.pending.clear();
        if count > 0 {
            self.events.push_back(Event::WaitsReleased { count });
        }
    }

    fn step(&mut self, trigger: Trigger) -> Result<MigrationStatus, IllegalTransition> {
        let to = next_status(
            DESTINATION_TRANSITIONS,
            self.cfg.profile.version,
            self.status,
            trigger,
        )
        .inspect_err(|e| self.events.push_back(Event::IllegalTransition(*e)))?;
        let from = self.status;
        self.status = to;
        self.events.push_back(Event::Status { from, to });
        Ok(to)
    }

    /// An operator command: [`Control::Recover`], [`Control::Pause`] or [`Control::Cancel`].
    pub fn handle_control(&mut self, now: Instant, control: Control) -> Result<(), ControlError> {
        self.last_activity = now;
        let refuse = ControlError::WrongStatus {
            control,
            status: self.status,
        };
        match control {
            Control::Recover => {
                if self.status != MigrationStatus::PostcopyPaused {
                    return Err(refuse);
                }
                self.recover_armed = true;
                Ok(())
            }
            Control::Pause => {
                let rule = self.loss_rule();
                if rule == Rule::SmFatalBeforeRun {
                    return Err(refuse);
                }
                self.events.push_back(Event::ChannelLost { rule });
                self.interrupt(rule);
                Ok(())
            }
            Control::Cancel => {
                if self.status.is_final() || self.step(Trigger::Cancel).is_err() {
                    return Err(refuse);
                }
                self.channel_open = false;
                self.recover_armed = false;
                self.rp_out.clear();
                self.release_waits();
                Ok(())
            }
            other => Err(ControlError::NotForThisSide(other)),
        }
    }

    /// A guest access to a missing page at `offset` of `block`: request it on the return path
    /// unless it is present or already requested.
    pub fn handle_fault(&mut self, block: usize, offset: u64) -> FaultOutcome {
        let Some(spec) = self.cfg.blocks.get(block) else {
            return FaultOutcome::OutOfRange;
        };
        if offset >= spec.len {
            return FaultOutcome::OutOfRange;
        }
        // Faults wait on whole host pages, keyed by the host page's first target page.
        let per = spec.page_size / self.tps;
        let page = offset / spec.page_size * per;
        if self.host_page_present(block, page, per) {
            return FaultOutcome::Present;
        }
        match self.status {
            MigrationStatus::Cancelled | MigrationStatus::Failed => return FaultOutcome::Released,
            MigrationStatus::Completed => return FaultOutcome::Present,
            _ => {}
        }
        if !self.pending.insert((block, page)) {
            return FaultOutcome::AlreadyWaiting;
        }
        if self.can_request() {
            self.send_request(block, page);
            FaultOutcome::Requested
        } else {
            FaultOutcome::Queued
        }
    }

    fn can_request(&self) -> bool {
        self.status == MigrationStatus::PostcopyActive
            && self.channel_open
            && self.rp_open
            && self.pc >= Pc::Listening
    }

    fn send_request(&mut self, block: usize, page: u64) {
        let start = page * self.tps;
        let len = self.cfg.blocks[block].page_size as u32;
        // SM-FIRST-REQ-NAMED: the first request on a connection, and any change of block, names it.
        let msg = if self.last_req_block == Some(block) {
            RpMessage::ReqPages { start, len }
        } else {
            self.last_req_block = Some(block);
            RpMessage::ReqPagesId {
                start,
                len,
                name: self.cfg.blocks[block].name.as_bytes(),
            }
        };
        msg.encode(&mut self.rp_out);
        self.events.push_back(Event::PageRequested {
            block,
            offset: start,
        });
    }

    /// Ends one feeding call (main channel or multifd connection): reports the pages it placed
    /// and, if it stopped on a violation, reports it and loses the channel under the rule the
    /// status decides (failed before RUN, paused after).
    fn conclude(
        &mut self,
        placed_before: u64,
        result: Result<usize, Stop>,
    ) -> Result<usize, Violation> {
        let placed = self.pages_placed - placed_before;
        if placed > 0 {
            self.events.push_back(Event::PagesPlaced { count: placed });
        }
        match result {
            Ok(n) => Ok(n),
            Err(stop) => {
                let (channel, v) = match stop {
                    Stop::Peer(v) => (ChannelKind::Main, v),
                    Stop::Local(v) => (ChannelKind::Local, v),
                };
                self.events.push_back(Event::Error {
                    channel,
                    violation: v,
                });
                let rule = self.loss_rule();
                self.interrupt(rule);
                Err(v)
            }
        }
    }

    /// Feeds the last bytes of a channel that has ended (closed, or a file at its end): like
    /// [`Destination::handle_stream`], with `input` declared to be the rest of the channel, so
    /// that decisions needing a next byte (a device payload's footer, SEC-DELIMIT; the end of
    /// the configuration) are made now rather than waiting. Bytes still unconsumed afterwards
    /// end inside an item (STREAM-TRUNCATED, the caller's to report).
    pub fn handle_stream_end(
        &mut self,
        now: Instant,
        input: &[u8],
        mem: &mut impl GuestMemory,
    ) -> Result<usize, Violation> {
        if let Some(d) = self.decoder.as_mut() {
            d.set_final(true);
        }
        let r = self.handle_stream(now, input, mem);
        if let Some(d) = self.decoder.as_mut() {
            d.set_final(false);
        }
        r
    }

    /// Consumes bytes of the current channel, starting at its first unconsumed byte. Returns how
    /// many were consumed (whole items; keep the rest and call again with more), or the
    /// violation that stopped the channel (the status has then changed to failed or paused, and
    /// the channel must be closed).
    ///
    /// Page data is placed straight from `input`. The caller's buffer must be able to hold the
    /// largest item plus, for huge-page blocks in postcopy, one whole host page of records: a
    /// host page not complete in `input` is left unconsumed.
    pub fn handle_stream(
        &mut self,
        now: Instant,
        input: &[u8],
        mem: &mut impl GuestMemory,
    ) -> Result<usize, Violation> {
        if !self.channel_open
            || matches!(
                self.status,
                MigrationStatus::Failed | MigrationStatus::Cancelled
            )
        {
            return Ok(0);
        }
        if !input.is_empty() {
            self.last_activity = now;
        }
        let placed_before = self.pages_placed;
        let mut pos = 0usize;
        // Host pages of huge-page blocks are assembled within one call: if one is still partial
        // when the input runs out, the decoder is rewound to its first record and those bytes
        // are left unconsumed, so nothing partial outlives the call (SM-PARTIAL-HOSTPAGE).
        let mut hp_buf = core::mem::take(&mut self.hp_buf);
        let mut asm = HostPageAssembler::new(&mut hp_buf, self.tps as usize);
        let mut mark: Option<(usize, StreamDecoder)> = None;
        let result = loop {
            if self.mfd_main_blocked() {
                break Ok(pos);
            }
            let Some(dec) = self.decoder.as_mut() else {
                break Ok(pos);
            };
            if matches!(
                self.status,
                MigrationStatus::Cancelled | MigrationStatus::Failed
            ) {
                break Ok(pos);
            }
            let at = dec.offset();
            // A rewind point before every item that may start a host page (only for huge-page
            // configurations; LISTEN may come within this call).
            let before = (self.has_huge && self.pc >= Pc::Listening && !asm.is_partial())
                .then(|| dec.clone());
            match dec.decode(&input[pos..]) {
                Ok((item, n)) => {
                    let start = pos;
                    pos += n;
                    if let Err(stop) = self.on_item(item, at, mem, &mut asm) {
                        break Err(stop);
                    }
                    if let Err(stop) = self.mfd_after_item(&item) {
                        break Err(stop);
                    }
                    if !asm.is_partial() {
                        mark = None;
                    } else if mark.is_none() {
                        if let Some(d) = before {
                            mark = Some((start, d));
                        }
                    }
                }
                Err(WireError::Incomplete { .. }) => {
                    if asm.is_partial() {
                        let Some((start, d)) = mark.take() else {
                            // Unreachable by construction; never drop a partial page silently.
                            break Err(Stop::Local(Violation::new(at, Rule::SmPartialHostPage, 0)));
                        };
                        self.decoder = Some(d);
                        break Ok(start);
                    }
                    break Ok(pos);
                }
                Err(WireError::Invalid(v)) => break Err(Stop::Peer(v)),
            }
        };
        self.hp_buf = hp_buf;
        self.conclude(placed_before, result)
    }

    fn block_index(&mut self, name: &[u8]) -> Option<usize> {
        if let Some(i) = self.last_block {
            if self.cfg.blocks[i].name.as_bytes() == name {
                return Some(i);
            }
        }
        let i = self
            .cfg
            .blocks
            .iter()
            .position(|b| b.name.as_bytes() == name)?;
        self.last_block = Some(i);
        Some(i)
    }

    fn on_item(
        &mut self,
        item: Item<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
        asm: &mut HostPageAssembler<'_>,
    ) -> Result<(), Stop> {
        if asm.is_partial() {
            // Only the rest of the host page (and section framing) may follow its first page.
            let ok = matches!(
                item,
                Item::Ram(_)
                    | Item::Footer { .. }
                    | Item::Section(SectionHeader::Part { .. } | SectionHeader::End { .. })
            );
            if !ok {
                return Err(Violation::new(at, Rule::RamHostPage, 0).into());
            }
        }
        match item {
            Item::Header { .. } => Ok(()),
            Item::Configuration(c) => {
                // CFG-MACHINE: QEMU compares with strncmp(received, local, received_len).
                if !self.cfg.machine.as_bytes().starts_with(c.name) {
                    return Err(
                        Violation::new(at + 5, Rule::CfgMachine, c.name.len() as u64).into(),
                    );
                }
                self.setup_done()
            }
            Item::Section(h) => {
                if self.status == MigrationStatus::None || self.status == MigrationStatus::Setup {
                    // A stream without configuration section (profile without it).
                    self.setup_done()?;
                }
                self.on_section(h, at)
            }
            Item::Ram(rec) => self.on_ram(rec, at, mem, asm),
            Item::DeviceData(d) => {
                // Kept copies are bounded: no peer makes the destination hold more than this.
                self.device_bytes += d.len();
                if self.device_bytes > self.cfg.max_device_bytes {
                    return Err(
                        Violation::new(at, Rule::SecDeviceLen, self.device_bytes as u64).into(),
                    );
                }
                if let Some(i) = self.cur_device {
                    if let Some(dev) = self.devices.get_mut(i) {
                        dev.data.extend_from_slice(d);
                    }
                }
                Ok(())
            }
            Item::Footer { .. } => {
                self.cur_device = None;
                Ok(())
            }
            Item::Command(c) => {
                if self.status == MigrationStatus::None || self.status == MigrationStatus::Setup {
                    self.setup_done()?;
                }
                self.on_command(c, at, mem)
            }
            Item::PackageEnd => Ok(()),
            Item::Eof => {
                self.eof_seen = true;
                if self.status == MigrationStatus::PostcopyRecover || self.pc == Pc::Listening {
                    return Err(Violation::new(at, Rule::CmdOrder, 0).into());
                }
                self.mfd_check_complete(at)?;
                self.step(Trigger::Complete).map_err(|e| local_bug(at, e))?;
                if self.rp_open {
                    // SM-SHUT-LAST: nothing is sent after SHUT.
                    RpMessage::Shut(0).encode(&mut self.rp_out);
                    self.events.push_back(Event::ShutSent { value: 0 });
                }
                self.pending.clear();
                Ok(())
            }
            Item::VmDescription(_) => Ok(()),
        }
    }

    fn setup_done(&mut self) -> Result<(), Stop> {
        if matches!(self.status, MigrationStatus::None | MigrationStatus::Setup) {
            self.step(Trigger::SetupDone).map_err(|e| local_bug(0, e))?;
        }
        Ok(())
    }

    fn on_section(&mut self, h: SectionHeader<'_>, at: u64) -> Result<(), Stop> {
        self.cur_device = None;
        let is_ram = self
            .decoder
            .as_ref()
            .and_then(|d| d.current_section())
            .is_some_and(|s| s.is_ram);
        if is_ram {
            return Ok(());
        }
        let (section_id, idstr, instance_id, version_id) = match h {
            SectionHeader::Start(i) | SectionHeader::Full(i) => {
                (i.section_id, i.idstr.to_vec(), i.instance_id, i.version_id)
            }
            SectionHeader::Part { section_id } | SectionHeader::End { section_id } => {
                match self.decoder.as_ref().and_then(|d| d.section(section_id)) {
                    Some(s) => (section_id, s.idstr().to_vec(), s.instance_id, s.version_id),
                    None => (section_id, Vec::new(), 0, 0),
                }
            }
        };
        self.devices.push(DeviceSection {
            section_id,
            idstr,
            instance_id,
            version_id,
            data: Vec::new(),
        });
        self.cur_device = Some(self.devices.len() - 1);
        // Each kept section counts with its bookkeeping, so that empty sections are bounded too.
        self.device_bytes += core::mem::size_of::<DeviceSection>()
            + self.devices[self.devices.len() - 1].idstr.len();
        if self.device_bytes > self.cfg.max_device_bytes {
            return Err(Violation::new(at, Rule::SecDeviceLen, self.device_bytes as u64).into());
        }
        Ok(())
    }

    fn on_ram(
        &mut self,
        rec: RamRecord<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
        asm: &mut HostPageAssembler<'_>,
    ) -> Result<(), Stop> {
        if let RamBody::MemSize(list) = rec.body {
            let mut count = 0usize;
            let mut entries = list.iter();
            loop {
                // The list follows the record's 8-byte header word.
                let entry_at = at + 8 + entries.offset();
                let Some(b) = entries.next() else { break };
                count += 1;
                // RAM-BLOCK-UNKNOWN for an entry: a name the receiver lacks at the entry (its
                // name's length byte), a length it cannot take at the used_length field.
                let Some(i) = self.block_index(b.name) else {
                    return Err(
                        Violation::new(entry_at, Rule::RamBlockUnknown, b.used_length).into(),
                    );
                };
                if self.cfg.blocks[i].len != b.used_length {
                    let len_at = entry_at + 1 + b.name.len() as u64;
                    return Err(Violation::new(len_at, Rule::RamBlockUnknown, b.used_length).into());
                }
                if let Some(ps) = b.page_size {
                    if ps != self.cfg.blocks[i].page_size {
                        // At the field: after the counted name and the be64 used_length.
                        let field_at = entry_at + 1 + b.name.len() as u64 + 8;
                        return Err(Violation::new(field_at, Rule::RamPageSize, ps).into());
                    }
                }
            }
            if count != self.cfg.blocks.len() {
                return Err(Violation::new(at, Rule::RamBlockUnknown, count as u64).into());
            }
            return Ok(());
        }
        if !rec.is_page() {
            return Ok(());
        }
        let name = match rec.name {
            Some(n) => n,
            None => match self.decoder.as_ref().and_then(|d| d.ram().last_block()) {
                Some(n) => {
                    // Look the block up through the cache without holding the decoder borrow.
                    let mut buf = [0u8; 255];
                    let len = n.len();
                    buf[..len].copy_from_slice(n);
                    return self.place(&buf[..len], rec, at, mem, asm);
                }
                None => return Err(Violation::new(at, Rule::RamContinue, 0).into()),
            },
        };
        self.place(name, rec, at, mem, asm)
    }

    fn place(
        &mut self,
        name: &[u8],
        rec: RamRecord<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
        asm: &mut HostPageAssembler<'_>,
    ) -> Result<(), Stop> {
        let Some(b) = self.block_index(name) else {
            return Err(Violation::new(at, Rule::RamBlockUnknown, 0).into());
        };
        let offset = rec.addr;
        if offset % self.tps != 0 || offset >= self.cfg.blocks[b].len {
            return Err(Violation::new(at, Rule::RamOffset, offset).into());
        }
        let ps = self.cfg.blocks[b].page_size;
        if self.pc >= Pc::Listening && (ps != self.tps || asm.is_partial()) {
            return self.place_host_page(b, rec, at, mem, asm);
        }
        let page = offset / self.tps;
        if self.pc >= Pc::Listening && self.received[b].test(page) {
            // A page requested and also sent in the background: placing it twice would fail
            // (EEXIST) and must never change memory.
            self.duplicates += 1;
            return Ok(());
        }
        let placed = match rec.body {
            RamBody::Page(data) => mem.place_page(b, offset, data),
            RamBody::Zero { fill: 0 } => mem.place_zero(b, offset, self.tps),
            RamBody::Zero { fill } => {
                self.fill.fill(fill);
                mem.place_page(b, offset, &self.fill)
            }
            RamBody::Xbzrle(delta) => {
                // The delta applies to the page as received before.
                if !self.received[b].test(page) || !mem.read_page(b, offset, &mut self.fill) {
                    return Err(Violation::new(at, Rule::RamXbzrleBase, offset).into());
                }
                let delta_at = at + 8 + rec.name.map_or(0, |n| 1 + n.len() as u64) + 3;
                crate::ram::xbzrle_apply(delta, &mut self.fill, delta_at).map_err(Stop::Peer)?;
                mem.place_page(b, offset, &self.fill)
            }
            #[cfg(feature = "compress")]
            RamBody::Compressed(z) => {
                // The zlib stream starts after the header word, the name and the be32 length.
                let z_at = at + 8 + rec.name.map_or(0, |n| 1 + n.len() as u64) + 4;
                crate::ram::compress_page_decode(z, &mut self.fill, z_at).map_err(Stop::Peer)?;
                mem.place_page(b, offset, &self.fill)
            }
            _ => return Err(Violation::new(at, Rule::RamFlags, rec.flags.0).into()),
        };
        self.placed(b, offset, self.tps, at, placed)
    }

    /// Postcopy target page of a huge-page block: collected until its host page is whole, then
    /// placed atomically (RAM-HOSTPAGE through the assembler).
    fn place_host_page(
        &mut self,
        b: usize,
        rec: RamRecord<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
        asm: &mut HostPageAssembler<'_>,
    ) -> Result<(), Stop> {
        let tp = match rec.body {
            RamBody::Page(d) => TargetPage::Data(d),
            RamBody::Zero { fill } => TargetPage::Zero { fill },
            _ => return Err(Violation::new(at, Rule::RamPostcopyFlag, rec.flags.0).into()),
        };
        let spec = &self.cfg.blocks[b];
        let ps = spec.page_size;
        let Some(hp) = asm.push(spec.name.as_bytes(), ps, rec.addr, tp, at)? else {
            return Ok(());
        };
        let offset = hp.offset;
        let first = offset / self.tps;
        if self.host_page_present(b, first, ps / self.tps) {
            self.duplicates += 1;
            return Ok(());
        }
        let placed = match hp.data {
            _ if hp.all_zero => mem.place_zero(b, offset, ps),
            Some(d) => mem.place_page(b, offset, d),
            None => {
                self.fill.fill(hp.zero_fill);
                mem.place_page(b, offset, &self.fill)
            }
        };
        self.placed(b, offset, ps, at, placed)
    }

    fn host_page_present(&self, b: usize, first: u64, count: u64) -> bool {
        (first..first + count).all(|p| self.received[b].test(p))
    }

    /// Bookkeeping after a placement of `len` bytes at `offset`.
    fn placed(
        &mut self,
        b: usize,
        offset: u64,
        len: u64,
        at: u64,
        placed: Result<(), super::memory::MemoryError>,
    ) -> Result<(), Stop> {
        if let Err(e) = placed {
            return Err(Stop::Local(Violation::new(
                at,
                self.loss_rule(),
                e.code as u64,
            )));
        }
        let first = offset / self.tps;
        self.received[b].set_range(first, len / self.tps);
        self.pages_placed += 1;
        // A fault waits on the host page, keyed by its first target page.
        let host_first = first - first % (self.cfg.blocks[b].page_size / self.tps);
        if self.pending.remove(&(b, host_first)) {
            self.events.push_back(Event::FaultResolved {
                block: b,
                offset: host_first * self.tps,
            });
        }
        Ok(())
    }

    fn on_command(
        &mut self,
        c: Command<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
    ) -> Result<(), Stop> {
        let payload = at + 5;
        match c {
            Command::OpenReturnPath => {
                self.rp_open = true;
                Ok(())
            }
            Command::Ping(v) => {
                if !self.rp_open {
                    return Err(Violation::new(at, Rule::CmdPingNoRp, v as u64).into());
                }
                // SM-PONG.
                RpMessage::Pong(v).encode(&mut self.rp_out);
                Ok(())
            }
            Command::PostcopyAdvise(adv) => {
                if self.pc != Pc::None || self.status != MigrationStatus::Active {
                    return Err(Violation::new(at, Rule::CmdOrder, 3).into());
                }
                let Some(adv) = adv else {
                    if self.cfg.postcopy_ram {
                        return Err(Violation::new(at + 3, Rule::CmdAdviseLen, 0).into());
                    }
                    return Ok(());
                };
                if !self.cfg.postcopy_ram {
                    return Err(Violation::new(at + 3, Rule::CmdAdviseLen, 16).into());
                }
                let summary = self.cfg.blocks.iter().fold(0u64, |a, b| a | b.page_size);
                if adv.ram_pagesize_summary != summary {
                    return Err(Violation::new(
                        payload,
                        Rule::CmdAdvisePageSize,
                        adv.ram_pagesize_summary,
                    )
                    .into());
                }
                if adv.target_page_size != self.tps {
                    return Err(Violation::new(
                        payload + 8,
                        Rule::CmdAdvisePageSize,
                        adv.target_page_size,
                    )
                    .into());
                }
                // QEMU discards every block at ADVISE: its received bitmap starts empty.
                for (i, b) in self.cfg.blocks.iter().enumerate() {
                    if let Err(e) = mem.discard(i, 0, b.len) {
                        return Err(Stop::Local(Violation::new(
                            at,
                            Rule::SmFatalBeforeRun,
                            e.code as u64,
                        )));
                    }
                    let n = self.received[i].pages();
                    self.received[i].clear_range(0, n);
                }
                self.pc = Pc::Advise;
                Ok(())
            }
            Command::RamDiscard(d) => {
                if !matches!(self.pc, Pc::Advise | Pc::Discard) {
                    return Err(Violation::new(at, Rule::CmdOrder, 6).into());
                }
                let Some(b) = self.block_index(d.name) else {
                    return Err(Violation::new(payload + 1, Rule::CmdBlockUnknown, 0).into());
                };
                let len = self.cfg.blocks[b].len;
                let ranges_at = payload + 3 + d.name.len() as u64;
                for (i, (start, n)) in d.ranges().enumerate() {
                    let end = start.checked_add(n);
                    if start % self.tps != 0 || n % self.tps != 0 || end.map_or(true, |e| e > len) {
                        return Err(Violation::new(
                            ranges_at + 16 * i as u64,
                            Rule::CmdDiscardRange,
                            start,
                        )
                        .into());
                    }
                    if let Err(e) = mem.discard(b, start, n) {
                        return Err(Stop::Local(Violation::new(
                            at,
                            Rule::SmFatalBeforeRun,
                            e.code as u64,
                        )));
                    }
                    self.received[b].clear_range(start / self.tps, n / self.tps);
                }
                self.pc = Pc::Discard;
                Ok(())
            }
            Command::PostcopyListen => {
                if !matches!(self.pc, Pc::Advise | Pc::Discard)
                    || self.status != MigrationStatus::Active
                {
                    return Err(Violation::new(at, Rule::CmdOrder, 4).into());
                }
                self.pc = Pc::Listening;
                self.step(Trigger::Postcopy).map_err(|e| local_bug(at, e))?;
                // Faults taken before LISTEN could not be requested; request them now.
                let waiting: Vec<_> = self.pending.iter().copied().collect();
                for (b, p) in waiting {
                    self.send_request(b, p);
                }
                Ok(())
            }
            Command::PostcopyRun => {
                if self.pc != Pc::Listening {
                    return Err(Violation::new(at, Rule::CmdOrder, 5).into());
                }
                self.pc = Pc::Running;
                Ok(())
            }
            Command::Packaged { .. } => {
                if self.pc < Pc::Advise {
                    return Err(Violation::new(at, Rule::CmdOrder, 7).into());
                }
                Ok(())
            }
            Command::RecvBitmap { name } => {
                // The name's length byte opens RECV_BITMAP's payload.
                let Some(b) = self.block_index(name) else {
                    return Err(Violation::new(payload, Rule::CmdBlockUnknown, 0).into());
                };
                if self.status != MigrationStatus::PostcopyRecover {
                    // QEMU only logs this and answers nothing.
                    return Ok(());
                }
                let bytes = self.received[b].to_le_vec();
                RpMessage::RecvBitmap {
                    name: self.cfg.blocks[b].name.as_bytes(),
                    bitmap: &bytes,
                }
                .encode(&mut self.rp_out);
                Ok(())
            }
            Command::PostcopyResume => {
                // SM-RESUME-STATE: ignored outside postcopy-recover.
                if self.status != MigrationStatus::PostcopyRecover {
                    return Ok(());
                }
                self.last_req_block = None;
                self.step(Trigger::Resumed).map_err(|e| local_bug(at, e))?;
                RpMessage::ResumeAck(crate::codes::RESUME_ACK_VALUE).encode(&mut self.rp_out);
                // SM-REREQUEST.
                let waiting: Vec<_> = self.pending.iter().copied().collect();
                for (b, p) in waiting {
                    self.send_request(b, p);
                }
                Ok(())
            }
            Command::SwitchoverStart => Ok(()),
            Command::EnableColo | Command::Unknown { .. } => {
                Err(Violation::new(at + 1, Rule::CmdOrder, c.code().0 as u64).into())
            }
        }
    }
}

fn local_bug(at: u64, e: IllegalTransition) -> Stop {
    // A transition the table does not allow: reported as a local violation of CMD-ORDER.
    let _ = e;
    Stop::Local(Violation::new(at, Rule::CmdOrder, 0))
}
