//! In-memory, deterministic two-endpoint harness for the sans-IO machines.
//!
//! No sockets and no threads: each connection is a pair of byte pipes (main: source to
//! destination; return path: destination to source) with a cut switch that closes the link once
//! a given number of bytes has crossed one direction. Memory is a `Vec<u8>` per block on each
//! side. The guest dirties pages on the source at every dirty sync during precopy and, on the
//! destination, touches missing pages during postcopy (faults). After a cut the harness plays
//! the operator: `Recover` on the destination, `Resume` on the source, and a new connection.
#![allow(dead_code)]

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, DeviceState, Event, GuestMemory, Instant, MemoryError,
    MigrationStatus, RamBlockSpec, Source, SourceConfig, SourceMemory,
};
use qmig_protocol::Profile;

/// Guest memory of one side: one `Vec<u8>` per block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mem {
    /// Block contents.
    pub blocks: Vec<Vec<u8>>,
    /// Per target page: placed since its last discard (models userfaultfd's EEXIST).
    pub present: Vec<Vec<bool>>,
    /// Whether placement is atomic-once (postcopy listening): placing a present page fails.
    pub uffd: bool,
    /// Target page size.
    pub tps: usize,
    /// Placements refused with EEXIST (must stay 0).
    pub eexist: u64,
}

impl Mem {
    /// Zeroed memory for `blocks`.
    pub fn new(blocks: &[RamBlockSpec], tps: usize) -> Self {
        Mem {
            blocks: blocks.iter().map(|b| vec![0u8; b.len as usize]).collect(),
            present: blocks
                .iter()
                .map(|b| vec![false; b.len as usize / tps])
                .collect(),
            uffd: false,
            tps,
            eexist: 0,
        }
    }

    fn check(&mut self, block: usize, offset: u64, len: usize) -> Result<usize, MemoryError> {
        let p = offset as usize / self.tps;
        let n = len.div_ceil(self.tps);
        if self.uffd && self.present[block][p..p + n].iter().any(|x| *x) {
            self.eexist += 1;
            return Err(MemoryError { code: 17 });
        }
        self.present[block][p..p + n].fill(true);
        Ok(offset as usize)
    }
}

impl GuestMemory for Mem {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let o = self.check(block, offset, data.len())?;
        self.blocks[block][o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        let o = self.check(block, offset, len as usize)?;
        self.blocks[block][o..o + len as usize].fill(0);
        Ok(())
    }
    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        self.read(block, offset, out)
    }
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        let o = offset as usize;
        self.blocks[block][o..o + len as usize].fill(0);
        for p in o / self.tps..(o + len as usize) / self.tps {
            self.present[block][p] = false;
        }
        Ok(())
    }
}

impl Mem {
    /// Reads a target page (for XBZRLE).
    pub fn read(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        let o = offset as usize;
        out.copy_from_slice(&self.blocks[block][o..o + out.len()]);
        true
    }
}

impl SourceMemory for Mem {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        let o = offset as usize;
        &self.blocks[block][o..o + self.tps]
    }
}

/// xorshift64*: a deterministic page-content and schedule generator.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Which direction of a connection a cut watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination.
    Main,
    /// Destination to source.
    Rp,
}

/// Cut connection number `conn` (0: first) when `at` bytes have crossed `dir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Connection index.
    pub conn: u32,
    /// Watched direction.
    pub dir: Dir,
    /// Bytes delivered in that direction when the link breaks.
    pub at: u64,
}

/// The scenario of a run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Profile of both sides.
    pub profile: Profile,
    /// RAM blocks.
    pub blocks: Vec<RamBlockSpec>,
    /// Postcopy (else precopy to completion).
    pub postcopy: bool,
    /// Dirty syncs (guest write rounds) before switchover.
    pub rounds: u32,
    /// Pages written per round.
    pub writes_per_round: u32,
    /// Pages (block, page) the destination guest touches during postcopy, in order.
    pub faults: Vec<(usize, u64)>,
    /// Seed for contents and schedule.
    pub seed: u64,
    /// Bytes the source writes per step.
    pub budget: usize,
    /// Pages per RAM section.
    pub pages_per_section: usize,
    /// Switch over (after the remaining write rounds) once this many pages were sent.
    pub switch_after_pages: Option<u64>,
    /// Links to cut, in any order.
    pub cuts: Vec<Cut>,
    /// A page of the initial guest is non-zero with probability `nonzero.0 / nonzero.1`.
    pub nonzero: (u64, u64),
    /// Most byte delivered per step and direction (None: everything pending).
    pub chunk: Option<usize>,
}

impl Scenario {
    /// A small postcopy scenario: one block `ram` of `pages` 4 KiB pages.
    pub fn small(pages: u64, postcopy: bool) -> Self {
        Scenario {
            profile: Profile::QEMU_7_2,
            blocks: vec![RamBlockSpec::new("ram", pages * 4096, 4096)],
            postcopy,
            rounds: 2,
            writes_per_round: 6,
            faults: Vec::new(),
            seed: 0x5eed,
            budget: 16 * 1024,
            pages_per_section: 8,
            switch_after_pages: None,
            cuts: Vec::new(),
            chunk: None,
            nonzero: (3, 4),
        }
    }
}

/// One connection's in-flight bytes.
#[derive(Clone, Debug, Default)]
pub struct Link {
    /// Bytes written by the source, not yet delivered.
    pub main: Vec<u8>,
    /// Bytes written by the destination, not yet delivered.
    pub rp: Vec<u8>,
    /// Bytes delivered so far per direction.
    pub main_delivered: u64,
    /// Bytes delivered so far on the return path.
    pub rp_delivered: u64,
    /// Unconsumed bytes at the destination.
    pub dst_in: Vec<u8>,
    /// Unconsumed bytes at the source.
    pub src_in: Vec<u8>,
}

/// A whole two-endpoint world.
#[derive(Clone, Debug)]
pub struct World {
    /// Scenario.
    pub sc: Scenario,
    /// Source machine.
    pub src: Source,
    /// Destination machine.
    pub dst: Destination,
    /// Source memory.
    pub src_mem: std::rc::Rc<Mem>,
    /// Destination memory.
    pub dst_mem: Mem,
    /// The current connection (None between a cut and the reconnection).
    pub link: Option<Link>,
    /// Connection index of `link`.
    pub conn: u32,
    /// Source status sequence.
    pub src_statuses: Vec<MigrationStatus>,
    /// Destination status sequence.
    pub dst_statuses: Vec<MigrationStatus>,
    /// Every event of the destination.
    pub dst_events: Vec<Event>,
    /// Every event of the source.
    pub src_events: Vec<Event>,
    /// Main-channel bytes per connection (total written by the source).
    pub main_bytes: Vec<Vec<u8>>,
    /// Whether to keep every byte in `main_bytes` / `rp_bytes`.
    pub record: bool,
    /// Return-path bytes per connection.
    pub rp_bytes: Vec<Vec<u8>>,
    /// Rounds of precopy writes done.
    pub rounds_done: u32,
    /// Next fault to take.
    pub next_fault: usize,
    /// Faults waiting for their page.
    pub waiting: Vec<(usize, u64)>,
    /// Faults resolved.
    pub resolved: u64,
    /// Time.
    pub now: u64,
    /// Cuts that happened.
    pub cuts_done: u32,
    /// Connections opened so far.
    pub opened: u32,
    rng: Rng,
}

/// The VM description of [`devices`], so that the destination delimits their payloads.
pub fn vmdesc() -> qmig_protocol::vmdesc::VmDesc {
    qmig_protocol::vmdesc::VmDesc::parse(VMDESC_JSON, 0, &qmig_protocol::limits::Limits::DEFAULT)
        .expect("valid vmdesc")
}

/// The JSON of [`vmdesc`]; the source also sends it after EOF in precopy.
pub const VMDESC_JSON: &[u8] = br#"{"page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
         "fields": [{"name": "data", "type": "buffer", "size": 24}]},
        {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
         "fields": [{"name": "data", "type": "buffer", "size": 104}]}]}"#;

/// Builds the device states the source sends (opaque payloads, like `-M none`'s).
pub fn devices() -> Vec<DeviceState> {
    vec![
        DeviceState {
            section_id: 0,
            idstr: "timer".into(),
            instance_id: 0,
            version_id: 2,
            data: (0u8..24).collect(),
        },
        DeviceState {
            section_id: 4,
            idstr: "globalstate".into(),
            instance_id: 0,
            version_id: 1,
            data: vec![0x42; 104],
        },
    ]
}

impl World {
    /// The initial source memory of `sc` and the generator state after it.
    pub fn initial_memory(sc: &Scenario) -> (Mem, Rng) {
        let tps = sc.profile.target_page_size as usize;
        let mut rng = Rng(sc.seed | 1);
        let mut src_mem = Mem::new(&sc.blocks, tps);
        for b in 0..src_mem.blocks.len() {
            let pages = src_mem.blocks[b].len() / tps;
            for p in 0..pages {
                if rng.next() % sc.nonzero.1 < sc.nonzero.0 {
                    fill_page(&mut rng, &mut src_mem.blocks[b][p * tps..(p + 1) * tps]);
                }
            }
        }
        (src_mem, rng)
    }

    /// A world for `sc`, with source memory filled deterministically (some zero pages).
    pub fn new(sc: Scenario) -> Self {
        let (m, r) = World::initial_memory(&sc);
        World::with_memory(sc, m, r)
    }

    /// A world for `sc` starting from a given source memory and generator.
    pub fn with_memory(sc: Scenario, src_mem: Mem, rng: Rng) -> Self {
        let tps = sc.profile.target_page_size as usize;
        let mut scfg = SourceConfig::new(sc.profile, "none", sc.blocks.clone(), sc.postcopy);
        scfg.return_path = true;
        scfg.devices = devices();
        scfg.pages_per_section = sc.pages_per_section;
        scfg.vmdesc = Some(VMDESC_JSON.to_vec());
        let mut dcfg = DestinationConfig::new(sc.profile, "none", sc.blocks.clone(), sc.postcopy);
        dcfg.vmdesc = Some(vmdesc());
        let dst_mem = Mem::new(&sc.blocks, tps);
        World {
            src: Source::new(scfg),
            dst: Destination::new(dcfg).expect("valid destination config"),
            src_mem: std::rc::Rc::new(src_mem),
            dst_mem,
            link: None,
            conn: 0,
            src_statuses: vec![MigrationStatus::None],
            dst_statuses: vec![MigrationStatus::None],
            dst_events: Vec::new(),
            src_events: Vec::new(),
            main_bytes: Vec::new(),
            rp_bytes: Vec::new(),
            record: true,
            rounds_done: 0,
            next_fault: 0,
            waiting: Vec::new(),
            resolved: 0,
            now: 0,
            cuts_done: 0,
            opened: 0,
            rng,
            sc,
        }
    }

    /// Opens the first connection.
    pub fn start(&mut self) {
        self.connect();
    }

    fn connect(&mut self) {
        let now = Instant(self.now);
        self.conn = self.opened;
        self.opened += 1;
        self.link = Some(Link::default());
        if self.record {
            self.main_bytes.push(Vec::new());
            self.rp_bytes.push(Vec::new());
        }
        self.dst
            .handle_channel_opened(now)
            .expect("destination accepts the connection");
        self.src
            .handle_channel_opened(now)
            .expect("source accepts the connection");
    }

    /// Breaks the current link now (both sides see the channel close).
    pub fn cut_now(&mut self) {
        let now = Instant(self.now);
        self.link = None;
        self.cuts_done += 1;
        self.src.handle_channel_closed(now);
        self.dst.handle_channel_closed(now);
    }

    fn cut_limit(&self, dir: Dir) -> Option<u64> {
        self.sc
            .cuts
            .iter()
            .filter(|c| c.conn == self.conn && c.dir == dir)
            .map(|c| c.at)
            .min()
    }

    /// Drains both machines' events into the logs and reacts as the guest/operator.
    pub fn drain_events(&mut self) {
        while let Some(e) = self.src.poll_event() {
            match &e {
                Event::Status { to, .. } => self.src_statuses.push(*to),
                Event::NeedDirtySync => self.dirty_round(),
                _ => {}
            }
            self.src_events.push(e);
        }
        while let Some(e) = self.dst.poll_event() {
            match &e {
                Event::Status { to, .. } => {
                    self.dst_statuses.push(*to);
                    if *to == MigrationStatus::PostcopyActive {
                        self.dst_mem.uffd = true;
                    }
                }
                Event::FaultResolved { block, offset } => {
                    let key = (*block, offset / self.sc.profile.target_page_size as u64);
                    self.waiting.retain(|w| *w != key);
                    self.resolved += 1;
                }
                Event::WaitsReleased { .. } => self.waiting.clear(),
                _ => {}
            }
            self.dst_events.push(e);
        }
    }

    /// One precopy round of guest writes, then the dirty sync (and the switchover after the
    /// last round).
    fn dirty_round(&mut self) {
        let now = Instant(self.now);
        if self.rounds_done >= self.sc.rounds {
            return;
        }
        self.rounds_done += 1;
        let tps = self.sc.profile.target_page_size as usize;
        let src_mem = std::rc::Rc::make_mut(&mut self.src_mem);
        for b in 0..src_mem.blocks.len() {
            let pages = src_mem.blocks[b].len() / tps;
            let mut dirty = PageBitmap::new(pages as u64);
            for _ in 0..self.sc.writes_per_round {
                let p = (self.rng.next() % pages as u64) as usize;
                let page = &mut src_mem.blocks[b][p * tps..(p + 1) * tps];
                if self.rng.next() % 5 == 0 {
                    page.fill(0);
                } else {
                    fill_page(&mut self.rng, page);
                }
                dirty.set(p as u64);
            }
            self.src.handle_dirty_sync(b, &dirty);
        }
        if self.rounds_done == self.sc.rounds {
            let c = if self.sc.postcopy {
                Control::StartPostcopy
            } else {
                Control::Complete
            };
            // Refused only if the operator already chose the other way (property tests).
            let _ = self.src.handle_control(now, c);
        }
    }

    /// Whether both sides are done (final, or the destination completed and the source can
    /// no longer learn it: a cut inside SHUT).
    pub fn done(&self) -> bool {
        let s = self.src.status();
        let d = self.dst.status();
        (s.is_final() && d.is_final())
            || (d == MigrationStatus::Completed && s == MigrationStatus::PostcopyPaused)
    }

    /// One step: source writes, bytes cross, destination reads and answers, source reads.
    /// Returns whether anything happened.
    pub fn step(&mut self) -> bool {
        self.now += 1;
        let now = Instant(self.now);
        let mut progress = false;
        self.drain_events();
        if self.link.is_none() {
            // The operator recovers a paused migration over a new connection.
            let src_ready = matches!(
                self.src.status(),
                MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecoverSetup
            );
            if src_ready && self.dst.status() == MigrationStatus::PostcopyPaused {
                self.dst
                    .handle_control(now, Control::Recover)
                    .expect("recover");
                if self.src.status() == MigrationStatus::PostcopyPaused {
                    self.src
                        .handle_control(now, Control::Resume)
                        .expect("resume");
                }
                self.connect();
                self.drain_events();
                return true;
            }
            return false;
        }
        if let Some(n) = self.sc.switch_after_pages {
            if self.rounds_done < self.sc.rounds
                && self.src.pages_sent() >= n
                && self.src.status() == MigrationStatus::Active
            {
                while self.rounds_done < self.sc.rounds {
                    self.dirty_round();
                }
            }
        }
        // Source writes.
        {
            let link = self.link.as_mut().unwrap();
            let before = link.main.len();
            self.src
                .poll_transmit(&*self.src_mem, &mut link.main, self.sc.budget);
            if self.record {
                let new = &link.main[before..];
                self.main_bytes.last_mut().unwrap().extend_from_slice(new);
            }
            progress |= link.main.len() > before;
        }
        // Deliver the main channel.
        if self.deliver(Dir::Main) {
            progress = true;
        }
        if self.link.is_none() {
            return true;
        }
        // The destination guest touches a page.
        if self.dst.status() == MigrationStatus::PostcopyActive
            && self.next_fault < self.sc.faults.len()
        {
            let (b, p) = self.sc.faults[self.next_fault];
            self.next_fault += 1;
            let out = self
                .dst
                .handle_fault(b, p * self.sc.profile.target_page_size as u64);
            use qmig_protocol::machine::FaultOutcome as F;
            if matches!(out, F::Requested | F::Queued | F::AlreadyWaiting)
                && !self.waiting.contains(&(b, p))
            {
                self.waiting.push((b, p));
            }
            progress = true;
        }
        // Destination answers.
        {
            let link = self.link.as_mut().unwrap();
            let before = link.rp.len();
            self.dst.poll_transmit(&mut link.rp);
            if self.record {
                let new = &link.rp[before..];
                self.rp_bytes.last_mut().unwrap().extend_from_slice(new);
            }
            progress |= link.rp.len() > before;
        }
        if self.deliver(Dir::Rp) {
            progress = true;
        }
        self.drain_events();
        progress
    }

    /// Moves pending bytes of `dir` to the receiver (up to a cut), lets it consume them, and
    /// cuts the link if the cut point is reached. Returns whether bytes moved.
    fn deliver(&mut self, dir: Dir) -> bool {
        let now = Instant(self.now);
        let limit = self.cut_limit(dir);
        let chunk = self.sc.chunk;
        let link = self.link.as_mut().unwrap();
        let (pending, delivered) = match dir {
            Dir::Main => (&mut link.main, &mut link.main_delivered),
            Dir::Rp => (&mut link.rp, &mut link.rp_delivered),
        };
        let mut n = pending.len();
        if let Some(c) = chunk {
            n = n.min(c);
        }
        if let Some(l) = limit {
            n = n.min(l.saturating_sub(*delivered) as usize);
        }
        let moved = n > 0;
        *delivered += n as u64;
        let hit = limit.is_some_and(|l| *delivered >= l);
        let inbox = match dir {
            Dir::Main => &mut link.dst_in,
            Dir::Rp => &mut link.src_in,
        };
        inbox.extend_from_slice(&pending[..n]);
        pending.drain(..n);
        let result = match dir {
            Dir::Main => self.dst.handle_stream(now, &link.dst_in, &mut self.dst_mem),
            Dir::Rp => self.src.handle_return_path(now, &link.src_in),
        };
        match result {
            Ok(used) => {
                let inbox = match dir {
                    Dir::Main => &mut link.dst_in,
                    Dir::Rp => &mut link.src_in,
                };
                inbox.drain(..used);
            }
            Err(_) => {
                // The receiver stopped the channel: the link goes down.
                self.cut_now();
                return true;
            }
        }
        if hit {
            self.cut_now();
        }
        moved
    }

    /// Runs until done or until nothing moves any more (no panic); returns whether done.
    pub fn run_quiet(&mut self, max_steps: usize) -> bool {
        let mut idle = 0;
        for _ in 0..max_steps {
            if self.done() {
                return true;
            }
            if self.step() {
                idle = 0;
            } else {
                idle += 1;
                if idle > 3 {
                    return self.done();
                }
            }
        }
        self.done()
    }

    /// Runs until done or stuck; returns the number of steps. Panics if it exceeds `max_steps`.
    pub fn run(&mut self, max_steps: usize) -> usize {
        for i in 0..max_steps {
            if self.done() {
                return i;
            }
            let progress = self.step();
            if !progress && !self.done() {
                // Nothing moves: the source may wait for a dirty sync it already asked for.
                self.drain_events();
                if !self.step() && !self.done() {
                    panic!(
                        "stuck at step {i}: src {} dst {} (cuts {:?}, conn {})",
                        self.src.status(),
                        self.dst.status(),
                        self.sc.cuts,
                        self.conn
                    );
                }
            }
        }
        panic!(
            "did not finish in {max_steps} steps: src {} dst {} (cuts {:?}, conn {}, cuts done {}); dst events tail {:?}; src events tail {:?}",
            self.src.status(),
            self.dst.status(),
            self.sc.cuts,
            self.conn,
            self.cuts_done,
            &self.dst_events[self.dst_events.len().saturating_sub(6)..],
            &self.src_events[self.src_events.len().saturating_sub(6)..]
        );
    }

    /// Every error event of either side.
    pub fn errors(&self) -> Vec<&Event> {
        self.dst_events
            .iter()
            .chain(&self.src_events)
            .filter(|e| matches!(e, Event::Error { .. } | Event::IllegalTransition(_)))
            .collect()
    }

    /// Asserts that the destination memory equals the source memory, block by block.
    pub fn assert_memory_equal(&self) {
        for (b, (s, d)) in self
            .src_mem
            .blocks
            .iter()
            .zip(&self.dst_mem.blocks)
            .enumerate()
        {
            if s != d {
                let tps = self.sc.profile.target_page_size as usize;
                let bad: Vec<usize> = (0..s.len() / tps)
                    .filter(|p| s[p * tps..(p + 1) * tps] != d[p * tps..(p + 1) * tps])
                    .collect();
                panic!("block {b}: pages differ: {bad:?} (cuts {:?})", self.sc.cuts);
            }
        }
        assert_eq!(self.dst_mem.eexist, 0, "a page was placed twice");
    }
}

/// Fills a page with pseudo-random bytes.
pub fn fill_page(rng: &mut Rng, page: &mut [u8]) {
    for c in page.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}
