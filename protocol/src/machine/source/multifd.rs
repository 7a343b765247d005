//! Multifd on the source: the extra connections as outputs of [`Source`].
//!
//! This module owns what a source writes on each multifd connection (precopy only, capability
//! `multifd` with `multifd-channels` N): the init packet (the configured UUID, the channel id
//! 0..N), page data as RAM packets of up to *pages-per-packet* pages of one block with a packet
//! number shared by all connections, handed out round-robin, and the sync points: before every
//! EOS of the `ram` section each connection gets a SYNC packet (after the page packets that
//! precede it) and, in profile 10.x, the main channel gets a `MULTIFD_FLUSH` record. So a
//! destination that syncs at each EOS (7.2) or at each MULTIFD_FLUSH (10.x) finds every SYNC
//! packet it waits for.
//!
//! Zero pages: in 7.2 they stay on the main channel as `ZERO` records (QEMU 7.2 detects them
//! before handing a page to multifd); in 10.x they are listed in the packets' zero-page slots
//! (QEMU 10.x's default `zero-page-detection=multifd`). Page encodings (`xbzrle`, `compress`)
//! do not apply to multifd pages, as in QEMU. Bytes are encoded only through the codec's
//! [`RamPacketHeader`] / [`InitPacket`] structs.

use alloc::vec::Vec;

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromZeros, IntoBytes};

use super::{Source, SourceMemory};
use crate::codes::{RamFlags, MULTIFD_MAGIC};
use crate::multifd::{pages_per_packet, InitPacket, RamPacketHeader, FLAG_SYNC, MULTIFD_VERSION};
use crate::profile::{Profile, Version};
use crate::ram::{RamBody, RamRecord};
use crate::sink::Sink;

/// The multifd setup of a source (capability `multifd`, parameter `multifd-channels`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultifdSourceConfig {
    /// Number of multifd connections (1..=255).
    pub channels: u8,
    /// The UUID every init packet carries (a QEMU destination requires its own, zero unless
    /// started with `-uuid`).
    pub uuid: [u8; 16],
}

impl MultifdSourceConfig {
    /// `channels` connections with the zero UUID.
    pub const fn new(channels: u8) -> Self {
        MultifdSourceConfig {
            channels,
            uuid: [0; 16],
        }
    }
}

/// The page packet being filled.
#[derive(Clone, Debug, Default)]
struct Pending {
    block: usize,
    normal: Vec<u64>,
    zero: Vec<u64>,
    data: Vec<u8>,
}

/// The source's multifd state: bytes waiting per connection and the packet being filled.
#[derive(Clone, Debug)]
pub(super) struct MultifdTx {
    /// Bytes not yet taken by the caller, per connection.
    out: Vec<Vec<u8>>,
    /// The connection the next page packet goes to.
    next: usize,
    /// The next packet number (shared by all connections).
    packet_num: u64,
    /// Slots per packet.
    ppp: usize,
    /// Whether zero pages go in packets (10.x) rather than on the main channel (7.2).
    zero_in_packets: bool,
    pending: Pending,
    /// Bytes queued so far, all connections (a running total).
    total: u64,
    /// SYNC rounds written.
    syncs: u64,
}

impl MultifdTx {
    pub(super) fn new(cfg: MultifdSourceConfig, profile: &Profile) -> Self {
        let n = cfg.channels.max(1) as usize;
        let mut out = Vec::with_capacity(n);
        let mut total = 0u64;
        for id in 0..n {
            let mut init = InitPacket::new_zeroed();
            init.magic = U32::new(MULTIFD_MAGIC);
            init.version = U32::new(MULTIFD_VERSION);
            init.uuid = cfg.uuid;
            init.id = id as u8;
            out.push(Vec::from(init.as_bytes()));
            total += init.as_bytes().len() as u64;
        }
        MultifdTx {
            out,
            next: 0,
            packet_num: 0,
            ppp: pages_per_packet(profile) as usize,
            zero_in_packets: matches!(profile.version, Version::V10),
            pending: Pending::default(),
            total,
            syncs: 0,
        }
    }

    pub(super) fn total(&self) -> u64 {
        self.total
    }

    fn write_packet(&mut self, ch: usize, flags: u32, block: Option<&[u8]>, tps: u64) {
        let mut h = RamPacketHeader::new_zeroed();
        h.magic = U32::new(MULTIFD_MAGIC);
        h.version = U32::new(MULTIFD_VERSION);
        h.flags = U32::new(flags);
        let p = &self.pending;
        let normal = p.normal.len() as u32;
        h.pages_alloc = U32::new(self.ppp as u32);
        h.normal_pages = U32::new(normal);
        h.next_packet_size = U32::new(normal * tps as u32);
        h.packet_num = U64::new(self.packet_num);
        if self.zero_in_packets {
            h.zero_pages = U32::new(p.zero.len() as u32);
        }
        if let Some(name) = block {
            let n = name.len().min(h.ramblock.len() - 1);
            h.ramblock[..n].copy_from_slice(&name[..n]);
        }
        self.packet_num += 1;
        let o = &mut self.out[ch];
        let before = o.len();
        o.extend_from_slice(h.as_bytes());
        let slots = p.normal.iter().chain(p.zero.iter());
        let mut written = 0usize;
        for off in slots {
            o.extend_from_slice(&off.to_be_bytes());
            written += 1;
        }
        o.resize(o.len() + 8 * (self.ppp - written.min(self.ppp)), 0);
        o.extend_from_slice(&p.data);
        self.total += (o.len() - before) as u64;
    }

    /// Sends the packet being filled (if it holds pages) on the next connection.
    fn flush(&mut self, names: &[&[u8]], tps: u64) {
        if self.pending.normal.is_empty() && self.pending.zero.is_empty() {
            return;
        }
        let ch = self.next;
        self.next = (self.next + 1) % self.out.len();
        let name = names.get(self.pending.block).copied();
        self.write_packet(ch, 0, name, tps);
        self.pending.normal.clear();
        self.pending.zero.clear();
        self.pending.data.clear();
    }

    /// Sends the packet being filled, then a SYNC packet on every connection.
    fn sync(&mut self, names: &[&[u8]], tps: u64) {
        self.flush(names, tps);
        for ch in 0..self.out.len() {
            self.write_packet(ch, FLAG_SYNC, None, tps);
        }
        self.syncs += 1;
    }
}

impl Source {
    /// Number of multifd connections (0 without multifd).
    pub fn multifd_channels(&self) -> usize {
        self.mfd.as_ref().map_or(0, |m| m.out.len())
    }

    /// Bytes waiting on multifd connection `ch`.
    pub fn multifd_pending(&self, ch: usize) -> usize {
        self.mfd
            .as_ref()
            .and_then(|m| m.out.get(ch))
            .map_or(0, Vec::len)
    }

    /// SYNC rounds written on the multifd connections so far.
    pub fn multifd_syncs(&self) -> u64 {
        self.mfd.as_ref().map_or(0, |m| m.syncs)
    }

    /// Moves every byte waiting on multifd connection `ch` (its init packet first, then
    /// packets, whole) into `out`. Returns the byte count. Connection `ch` carries channel id
    /// `ch`. Main-channel bytes from [`Source::poll_transmit`] produce these; take them after
    /// each call (a destination waits for the SYNC packets of a sync point before it reads
    /// further on the main channel).
    pub fn poll_transmit_multifd(&mut self, ch: usize, out: &mut impl Sink) -> usize {
        let Some(buf) = self.mfd.as_mut().and_then(|m| m.out.get_mut(ch)) else {
            return 0;
        };
        let n = buf.len();
        out.put(buf);
        buf.clear();
        n
    }

    /// Whether pages go to multifd now (configured, and a precopy phase).
    pub(super) fn mfd_active(&self) -> bool {
        self.mfd.is_some() && matches!(self.phase, super::Phase::Precopy | super::Phase::PrecopyEnd)
    }

    /// Running total of multifd bytes queued (for the caller's budget).
    pub(super) fn mfd_total(&self) -> u64 {
        self.mfd.as_ref().map_or(0, MultifdTx::total)
    }

    /// Sends page `p` of block `b` through multifd (7.2: a zero page on the main channel).
    pub(super) fn mfd_send_page(
        &mut self,
        mem: &impl SourceMemory,
        b: usize,
        p: u64,
        o: &mut impl Sink,
    ) {
        let offset = p * self.tps;
        let data = mem.page(b, offset);
        let zero = super::is_zero(data);
        let tps = self.tps;
        let Some(m) = self.mfd.as_mut() else {
            return;
        };
        if zero && !m.zero_in_packets {
            // QEMU 7.2: zero pages are detected before multifd and go on the main channel.
            let continue_flag = self.last_sent_block == Some(b);
            let name = (!continue_flag).then(|| self.cfg.blocks[b].name.as_bytes());
            let flags = if continue_flag {
                RamFlags::ZERO.with(RamFlags::CONTINUE)
            } else {
                RamFlags::ZERO
            };
            RamRecord {
                flags,
                addr: offset,
                name,
                body: RamBody::Zero { fill: 0 },
            }
            .encode(o);
            self.last_sent_block = Some(b);
        } else {
            let full = m.pending.normal.len() + m.pending.zero.len() >= m.ppp;
            let other_block = m.pending.block != b;
            if full || other_block {
                let names: Vec<&[u8]> = self.cfg.blocks.iter().map(|x| x.name.as_bytes()).collect();
                m.flush(&names, tps);
            }
            m.pending.block = b;
            if zero {
                m.pending.zero.push(offset);
            } else {
                m.pending.normal.push(offset);
                m.pending.data.extend_from_slice(data);
            }
        }
        if zero {
            self.zero_pages_sent += 1;
        }
        self.page_sent(b, p);
    }

    /// Before an EOS of the `ram` section: the pending packet, a SYNC packet on every
    /// connection and (10.x) `MULTIFD_FLUSH` on the main channel.
    pub(super) fn mfd_sync(&mut self, o: &mut impl Sink) {
        let tps = self.tps;
        let Some(m) = self.mfd.as_mut() else {
            return;
        };
        let names: Vec<&[u8]> = self.cfg.blocks.iter().map(|x| x.name.as_bytes()).collect();
        m.sync(&names, tps);
        if m.zero_in_packets {
            RamRecord {
                flags: RamFlags::MULTIFD_FLUSH,
                addr: 0,
                name: None,
                body: RamBody::MultifdFlush,
            }
            .encode(o);
        }
    }
}
