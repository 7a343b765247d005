//! Multifd on the destination: the extra connections as inputs of [`Destination`].
//!
//! This module owns what a destination does with each multifd connection (precopy only): the
//! init packet (MFD-CHANNEL: an id below the configured channel count, each id once), page
//! placement from each packet's normal pages (and, in profile 10.x, its zero pages) through the
//! same [`GuestMemory`] bookkeeping as main-channel pages, and the synchronisation with the main
//! channel (MFD-SYNC). Bytes are decoded only by [`MultifdDecoder`]; its checks (MFD-MAGIC,
//! MFD-VERSION, MFD-PAGES against the pages per packet, SEC-DEVICE-LEN) apply unchanged, and no
//! buffer is sized by the peer.
//!
//! Synchronisation, as counters: the main channel *arrives* at a sync point with each EOS
//! (profile 7.2, or [`MultifdConfig::sync_on_eos`]) or each MULTIFD_FLUSH (10.x), and *passes*
//! it only once every channel has consumed its matching SYNC packet. A channel consumes packets
//! only while it has not gone past the main channel's last passed sync point, so at most one
//! round is in flight on either side: no main-channel page after a sync point is applied before
//! the multifd pages that precede it, and no multifd page of the next round is applied before the
//! main-channel pages of this one. The main channel also waits until every channel has sent its
//! init packet (QEMU starts loading only then). A blocked side consumes nothing: the caller keeps
//! its bytes and offers them again after feeding the other side
//! ([`Destination::main_waits_for_multifd`], [`Destination::multifd_waits`]).

use alloc::vec::Vec;

use super::{Destination, Pc, Stop};
use crate::error::{Violation, WireError};
use crate::machine::events::{ChannelKind, Event, Instant};
use crate::machine::memory::GuestMemory;
use crate::machine::status::MigrationStatus;
use crate::multifd::{compression_bits, MultifdDecoder, MultifdItem, RamPacket};
use crate::profile::{Profile, Version};
use crate::ram::RamBody;
use crate::rule::Rule;
use crate::stream::Item;

/// Byte offset of the channel id in an init packet.
const INIT_ID_AT: u64 = 24;
/// Byte offset of the flags in a packet.
const FLAGS_AT: u64 = 8;
/// Byte offset of the block name in a RAM packet.
const RAMBLOCK_AT: u64 = 64;
/// Byte offset of the first offset slot in a RAM packet.
const SLOTS_AT: u64 = crate::multifd::MULTIFD_RAM_PACKET_HEADER as u64;

/// The multifd setup of a destination (capability `multifd`, parameter `multifd-channels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultifdConfig {
    /// Number of multifd connections (`multifd-channels`, 1..=255).
    pub channels: u8,
    /// Whether each EOS of the main channel is a sync point (QEMU 7.2; 10.x with machine types
    /// that flush after each section). Otherwise MULTIFD_FLUSH is.
    pub sync_on_eos: bool,
}

impl MultifdConfig {
    /// `channels` connections with the sync points of `profile` (7.2: EOS, 10.x: MULTIFD_FLUSH).
    pub const fn new(profile: &Profile, channels: u8) -> Self {
        MultifdConfig {
            channels,
            sync_on_eos: matches!(profile.version, Version::V7_2),
        }
    }
}

/// One multifd connection, by the caller's index (the order it was accepted in).
#[derive(Clone, Debug)]
struct Conn {
    decoder: MultifdDecoder,
    /// The channel id its init packet named.
    id: Option<u8>,
    /// SYNC packets consumed.
    syncs: u64,
    /// The connection ended.
    closed: bool,
}

/// The destination's multifd state.
#[derive(Clone, Debug)]
pub(super) struct MultifdState {
    cfg: MultifdConfig,
    conns: Vec<Conn>,
    /// Sync points the main channel arrived at.
    arrived: u64,
    /// Sync points the main channel passed (`arrived` or one less).
    passed: u64,
    /// Multifd packets consumed, all connections.
    packets: u64,
}

impl MultifdState {
    pub(super) fn new(cfg: MultifdConfig, profile: Profile, limits: crate::limits::Limits) -> Self {
        let conns = (0..cfg.channels)
            .map(|_| Conn {
                decoder: MultifdDecoder::new(profile, limits),
                id: None,
                syncs: 0,
                closed: false,
            })
            .collect();
        MultifdState {
            cfg,
            conns,
            arrived: 0,
            passed: 0,
            packets: 0,
        }
    }

    fn all_init(&self) -> bool {
        self.conns.iter().all(|c| c.id.is_some())
    }

    /// Whether the main channel must wait (init packets missing, or a sync point not yet met).
    fn main_blocked(&self) -> bool {
        !self.all_init() || self.passed < self.arrived
    }

    /// Passes the main channel's pending sync point if every channel has delivered it.
    fn try_pass(&mut self) {
        if self.passed < self.arrived && self.conns.iter().all(|c| c.syncs >= self.arrived) {
            self.passed = self.arrived;
        }
    }

    fn is_sync_point(&self, item: &Item<'_>) -> bool {
        match item {
            Item::Ram(r) => match r.body {
                RamBody::Eos => self.cfg.sync_on_eos,
                RamBody::MultifdFlush => !self.cfg.sync_on_eos,
                _ => false,
            },
            _ => false,
        }
    }
}

impl Destination {
    /// Whether the main channel is held back by multifd: it consumes nothing until every
    /// connection sent its init packet and, at a sync point, its matching SYNC packet. Feed the
    /// multifd connections ([`Destination::handle_multifd`]), then offer the main bytes again.
    pub fn main_waits_for_multifd(&self) -> bool {
        self.mfd.as_ref().is_some_and(|m| m.main_blocked())
    }

    /// Whether multifd connection `conn` is held back until the main channel reaches its next
    /// sync point (it consumed its SYNC packet of this round). Feed the main channel, then offer
    /// the connection's bytes again.
    pub fn multifd_waits(&self, conn: usize) -> bool {
        self.mfd
            .as_ref()
            .and_then(|m| m.conns.get(conn).map(|c| c.syncs > m.passed))
            .unwrap_or(false)
    }

    /// Multifd connection `conn` ended with `unconsumed` bytes not taken by
    /// [`Destination::handle_multifd`]. Mid-item (`unconsumed > 0`) the migration fails
    /// (STREAM-TRUNCATED at the item's offset); on an item boundary it fails only if the main
    /// channel needs more from it: it is waiting for its init packet or its SYNC packet
    /// (MFD-SYNC), now or when it reaches its next sync point. Returns the violation if it failed.
    pub fn handle_multifd_closed(
        &mut self,
        now: Instant,
        conn: usize,
        unconsumed: usize,
    ) -> Option<Violation> {
        let _ = now;
        if self.status.is_final() {
            return None;
        }
        let m = self.mfd.as_mut()?;
        let c = m.conns.get_mut(conn)?;
        c.closed = true;
        let at = c.decoder.offset();
        let v = if unconsumed > 0 {
            Some(Violation::new(at, Rule::StreamTruncated, unconsumed as u64))
        } else {
            self.mfd_starved()
        };
        if let Some(v) = v {
            self.fail_multifd(v);
        }
        v
    }

    /// A violation if the main channel waits for a connection that has ended.
    fn mfd_starved(&self) -> Option<Violation> {
        let m = self.mfd.as_ref()?;
        let c = m.conns.iter().find(|c| {
            c.closed && (c.id.is_none() || (m.passed < m.arrived && c.syncs < m.arrived))
        })?;
        Some(Violation::new(c.decoder.offset(), Rule::MfdSync, c.syncs))
    }

    fn fail_multifd(&mut self, v: Violation) {
        self.events.push_back(Event::Error {
            channel: ChannelKind::Main,
            violation: v,
        });
        let rule = self.loss_rule();
        self.interrupt(rule);
    }

    /// Multifd packets consumed so far, all connections.
    pub fn multifd_packets(&self) -> u64 {
        self.mfd.as_ref().map_or(0, |m| m.packets)
    }

    /// Consumes bytes of multifd connection `conn` (the caller's index, `0..channels`, in accept
    /// order; the channel id comes from its init packet). Returns the bytes consumed: whole
    /// items only, nothing while the connection waits for the main channel
    /// ([`Destination::multifd_waits`]). Pages go from `input` to `mem` unchanged. On a violation
    /// the migration fails (multifd is precopy only) and the violation is returned with its
    /// offset in this connection.
    pub fn handle_multifd(
        &mut self,
        now: Instant,
        conn: usize,
        input: &[u8],
        mem: &mut impl GuestMemory,
    ) -> Result<usize, Violation> {
        if matches!(
            self.status,
            MigrationStatus::Failed | MigrationStatus::Cancelled
        ) {
            return Ok(0);
        }
        if !input.is_empty() {
            self.last_activity = now;
        }
        let placed_before = self.pages_placed;
        let mut pos = 0usize;
        let result = loop {
            let Some(m) = self.mfd.as_mut() else {
                // Not configured: the peer opened a connection the destination did not allow.
                break Err(Stop::Peer(Violation::new(0, Rule::MfdChannel, conn as u64)));
            };
            let Some(c) = m.conns.get_mut(conn) else {
                break Err(Stop::Peer(Violation::new(0, Rule::MfdChannel, conn as u64)));
            };
            if c.syncs > m.passed {
                break Ok(pos);
            }
            let at = c.decoder.offset();
            match c.decoder.decode(&input[pos..]) {
                Ok((item, n)) => {
                    pos += n;
                    if let Err(stop) = self.on_multifd_item(conn, item, at, mem) {
                        break Err(stop);
                    }
                }
                Err(WireError::Incomplete { .. }) => break Ok(pos),
                Err(WireError::Invalid(v)) => break Err(Stop::Peer(v)),
            }
        };
        self.conclude(placed_before, result)
    }

    fn on_multifd_item(
        &mut self,
        conn: usize,
        item: MultifdItem<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
    ) -> Result<(), Stop> {
        let Some(m) = self.mfd.as_mut() else {
            return Err(Violation::new(at, Rule::MfdChannel, conn as u64).into());
        };
        match item {
            MultifdItem::Init(p) => {
                let id = p.id;
                let dup = m.conns.iter().any(|c| c.id == Some(id));
                if id >= m.cfg.channels || dup {
                    return Err(Violation::new(at + INIT_ID_AT, Rule::MfdChannel, id as u64).into());
                }
                m.conns[conn].id = Some(id);
                Ok(())
            }
            MultifdItem::DeviceState { header, .. } => {
                Err(Violation::new(at + FLAGS_AT, Rule::MfdFlags, header.flags.get() as u64).into())
            }
            MultifdItem::Ram(p) => {
                m.packets += 1;
                let flags = p.flags();
                if compression_bits(&self.cfg.profile, flags) != 0 {
                    return Err(Violation::new(at + FLAGS_AT, Rule::MfdFlags, flags as u64).into());
                }
                let has_pages = p.normal_pages() + p.zero_pages() > 0;
                if has_pages {
                    if self.status == MigrationStatus::Completed {
                        return Err(
                            Violation::new(at, Rule::MfdSync, p.normal_pages() as u64).into()
                        );
                    }
                    if self.pc >= Pc::Listening {
                        // Multifd is precopy only.
                        return Err(Violation::new(at, Rule::CmdOrder, 0).into());
                    }
                    self.place_packet(&p, at, mem)?;
                }
                if p.is_sync() {
                    if let Some(m) = self.mfd.as_mut() {
                        m.conns[conn].syncs += 1;
                        m.try_pass();
                    }
                }
                Ok(())
            }
        }
    }

    fn place_packet(
        &mut self,
        p: &RamPacket<'_>,
        at: u64,
        mem: &mut impl GuestMemory,
    ) -> Result<(), Stop> {
        let Some(b) = self.block_index(p.ramblock()) else {
            return Err(Violation::new(at + RAMBLOCK_AT, Rule::RamBlockUnknown, 0).into());
        };
        let tps = self.tps;
        let len = self.cfg.blocks[b].len;
        let normal = p.normal_pages() as u64;
        for (i, (offset, data)) in p.pages(tps as usize).enumerate() {
            let slot_at = at + SLOTS_AT + 8 * i as u64;
            if offset % tps != 0 || offset >= len {
                return Err(Violation::new(slot_at, Rule::RamOffset, offset).into());
            }
            let placed = mem.place_page(b, offset, data);
            self.placed(b, offset, tps, slot_at, placed)?;
        }
        for (i, offset) in p.zero_offsets().enumerate() {
            let slot_at = at + SLOTS_AT + 8 * (normal + i as u64);
            if offset % tps != 0 || offset >= len {
                return Err(Violation::new(slot_at, Rule::RamOffset, offset).into());
            }
            let placed = mem.place_zero(b, offset, tps);
            self.placed(b, offset, tps, slot_at, placed)?;
        }
        Ok(())
    }

    /// Main-channel hook, before an item is acted on: whether the main channel must stop here.
    pub(super) fn mfd_main_blocked(&self) -> bool {
        self.main_waits_for_multifd()
    }

    /// Main-channel hook, after `item` was acted on: records a sync point. A violation if a
    /// channel that must deliver it has ended (the caller fails the migration).
    pub(super) fn mfd_after_item(&mut self, item: &Item<'_>) -> Result<(), Stop> {
        if let Some(m) = self.mfd.as_mut() {
            if m.is_sync_point(item) {
                m.arrived += 1;
                m.try_pass();
            }
        }
        match self.mfd_starved() {
            Some(v) => Err(Stop::Peer(v)),
            None => Ok(()),
        }
    }

    /// Main-channel hook at end of stream: every channel delivered exactly the sync points the
    /// main channel passed (MFD-SYNC).
    pub(super) fn mfd_check_complete(&self, at: u64) -> Result<(), Stop> {
        if let Some(m) = self.mfd.as_ref() {
            if let Some(c) = m.conns.iter().find(|c| c.syncs != m.passed) {
                return Err(Violation::new(at, Rule::MfdSync, c.syncs).into());
            }
        }
        Ok(())
    }
}
