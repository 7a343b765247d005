//! The migration thread: moves bytes and bitmaps between the sockets, the kernel and `Source`.
//!
//! This module owns [`start`] and the driver loop. Every protocol decision is the sans-IO
//! [`Source`]'s; the driver only
//! * connects the main channel (and, on `migrate … resume=true`, a recovery channel), and runs a
//!   reader thread per connection that feeds return-path bytes into the driver's inbox, so the
//!   sender never blocks on the return path;
//! * writes `poll_transmit` output in small budgets paced by a token bucket (`max-bandwidth`,
//!   `max-postcopy-bandwidth`), requested pages unpaced, and with postcopy keeps the kernel's
//!   unsent queue short (`TCP_NOTSENT_LOWAT`), so a requested page never waits behind more than
//!   one short burst of bulk data;
//! * answers `NeedDirtySync` with a kernel dirty-bitmap sync ([`DirtyTracker`]) and decides
//!   convergence: when the dirty bytes at the measured rate fit in `downtime-limit`, it stops the
//!   guest, syncs once more and completes;
//! * on `migrate-start-postcopy` stops the guest, syncs, and asks the machine to switch;
//! * maps channel loss, `migrate-pause`, `migrate_cancel` and resume onto the machine's
//!   `handle_channel_closed` / `handle_control` / `handle_channel_opened`, and the machine's
//!   events onto QMP status, events and `error-desc`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmig_host::dirty::{Choice, DirtyError, DirtyTracker, PageBitmap};
use qmig_host::memory::PAGE_SIZE;
use qmig_host::qmp_types::MigrationStatus as QmpStatus;
use qmig_host::transport::{self, ConnReader, ConnWriter, Socket, TransportConfig};
use qmig_host::uri::MigrationUri;
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::source::MultifdSourceConfig;
use qmig_protocol::machine::{
    Control, DeviceState, Event, Instant as MInstant, MigrationStatus, RamBlockSpec, Source,
    SourceConfig, SourceMemory,
};
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::rule::Rule;

use crate::devices::RAM_SECTION_ID;
use crate::state::{Msg, Shared};

/// Most bytes asked of `poll_transmit` per call.
const CHUNK: usize = 32 * 1024;
/// Kernel send buffer of a TCP main channel (the kernel doubles it).
const SEND_BUFFER: usize = 256 * 1024;
/// Unsent bytes the kernel may hold before a write blocks (`TCP_NOTSENT_LOWAT`): with the
/// destination's bounded receive window, what a requested page queues behind.
const NOTSENT_LOWAT: u32 = 32 * 1024;
/// How often an idle driver checks the return-path silence bound.
const TIMEOUT_TICK: Duration = Duration::from_millis(200);
/// Pages per RAM section part.
const PAGES_PER_SECTION: usize = 16;
/// Bytes write-protected per step by the arming thread.
const ARM_STEP: usize = 16 << 20;

/// Guest memory as the first pass may read it: a page is handed to the machine only once dirty
/// tracking covers it (the arming thread has passed it), so a write after the read is in the
/// next sync. Waits (yielding the CPU to the arming thread) for a page not covered yet.
struct Armed<'a> {
    ram: &'a qmig_host::memory::GuestRam,
    marks: &'a [AtomicU64],
}

impl SourceMemory for Armed<'_> {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        if let Some(m) = self.marks.get(block) {
            while m.load(Ordering::Acquire) <= offset {
                std::thread::yield_now();
            }
        }
        self.ram.page(block, offset)
    }
}

/// What a migration needs besides the shared state.
pub struct Plan {
    /// Where to connect.
    pub uri: MigrationUri,
    /// Machine type name for the configuration section.
    pub machine: String,
    /// Device sections.
    pub devices: Vec<DeviceState>,
    /// VM description written after a precopy EOF (a QEMU destination reads it, or at least
    /// its first byte, before it answers with SHUT).
    pub vmdesc: Vec<u8>,
    /// Dirty tracking mechanism choice.
    pub tracking: Choice,
}

/// Starts a migration: starts dirty tracking now (the first pass sends every page; writes from
/// here on are in the first sync) and spawns the migration thread. With the userfaultfd
/// mechanism the write protection runs on a thread of its own while the first pass sends the
/// pages it has covered ([`Armed`]); the first dirty sync waits for it.
pub fn start(shared: Arc<Shared>, plan: Plan) -> Result<(), String> {
    let ram = shared.guest.ram.clone();
    let (tracker, arming) =
        DirtyTracker::start_deferred(ram.clone(), plan.tracking).map_err(|e| e.to_string())?;
    let start_mark = if arming.is_some() { 0 } else { u64::MAX };
    let marks: Arc<Vec<AtomicU64>> = Arc::new(
        (0..ram.blocks().len())
            .map(|_| AtomicU64::new(start_mark))
            .collect(),
    );
    let arming = match arming {
        None => None,
        Some(a) => {
            let m = marks.clone();
            Some(
                std::thread::Builder::new()
                    .name("dirty-arm".into())
                    .spawn(move || a.run(&m, ARM_STEP))
                    .map_err(|e| e.to_string())?,
            )
        }
    };
    let postcopy = shared.cap("postcopy-ram");
    let blocks: Vec<RamBlockSpec> = ram
        .blocks()
        .iter()
        .map(|b| RamBlockSpec::new(b.name(), b.len(), PAGE_SIZE as u64))
        .collect();
    let mut cfg = SourceConfig::new(shared.profile, &plan.machine, blocks, postcopy);
    cfg.return_path = postcopy || shared.cap("return-path");
    cfg.ram_section_id = RAM_SECTION_ID;
    cfg.devices = plan.devices;
    cfg.pages_per_section = PAGES_PER_SECTION;
    cfg.vmdesc = Some(plan.vmdesc);
    cfg.silence_timeout = Some(Shared::get(&shared.rp_timeout).saturating_mul(1_000_000));
    cfg.page_caps = shared.page_params.caps(&|c| shared.cap(c));
    if shared.cap("multifd") && !postcopy {
        let n = Shared::get(&shared.multifd_channels).clamp(1, 255) as u8;
        cfg.multifd = Some(MultifdSourceConfig::new(n));
    }
    let src = Source::new(cfg);
    let (tx, rx) = mpsc::channel();
    {
        let mut g = shared.lock();
        g.tx = Some(tx.clone());
        g.error = None;
        g.mechanism = Some(tracker.mechanism().name());
    }
    shared.set_status(QmpStatus::Setup);
    let now = Instant::now();
    shared.recorder.start(now);
    let profile = shared.profile;
    let d = Driver {
        shared: shared.clone(),
        src,
        tracker,
        marks,
        arming,
        rx,
        tx,
        writer: None,
        mfd_writers: Vec::new(),
        mfd_out: Vec::new(),
        conn: 0,
        rp_buf: Vec::new(),
        rp_count: RpDecoder::new(profile, Limits::DEFAULT),
        bucket: crate::pacing::TokenBucket::new(now),
        out: Vec::with_capacity(2 * CHUNK),
        t0: now,
        iter_start: now,
        iter_bytes: 0,
        stopped_at: None,
        we_stopped_guest: false,
        urgent_since: None,
    };
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || d.run(plan.uri))
        .map_err(|e| e.to_string())?;
    Ok(())
}

struct Driver {
    shared: Arc<Shared>,
    src: Source,
    tracker: DirtyTracker,
    /// Bytes of each block under dirty tracking so far ([`Armed`]).
    marks: Arc<Vec<AtomicU64>>,
    /// The thread applying the write protection, joined by the first dirty sync.
    arming: Option<std::thread::JoinHandle<Result<(), DirtyError>>>,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    writer: Option<ConnWriter>,
    /// The multifd connections, by channel id (opened after the main channel).
    mfd_writers: Vec<ConnWriter>,
    /// Scratch buffer for one multifd connection's bytes.
    mfd_out: Vec<u8>,
    conn: u64,
    rp_buf: Vec<u8>,
    rp_count: RpDecoder,
    bucket: crate::pacing::TokenBucket,
    out: Vec<u8>,
    t0: Instant,
    iter_start: Instant,
    iter_bytes: u64,
    stopped_at: Option<Instant>,
    we_stopped_guest: bool,
    /// Page requests pending since (return-path bytes read, handed to the machine): the
    /// urgent-path timing logged at `debug` when the requested pages are written.
    urgent_since: Option<(Instant, Instant)>,
}

fn reader(mut r: ConnReader, conn: u64, tx: Sender<Msg>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::RpEnd {
                    conn,
                    why: "end of file on the return path".into(),
                });
                return;
            }
            Ok(n) => {
                if tx
                    .send(Msg::Rp {
                        conn,
                        data: buf[..n].to_vec(),
                        at: Instant::now(),
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Msg::RpEnd {
                    conn,
                    why: format!("return path: {e}"),
                });
                return;
            }
        }
    }
}

impl Driver {
    fn now(&self) -> MInstant {
        MInstant(self.t0.elapsed().as_nanos() as u64)
    }

    fn run(mut self, uri: MigrationUri) {
        if let Err(e) = self.connect(&uri) {
            self.shared.set_error(format!("connecting to {uri}: {e}"));
            self.shared.set_status(QmpStatus::Failed);
            self.finish();
            return;
        }
        let now = self.now();
        if let Err(e) = self.src.handle_channel_opened(now) {
            self.shared.set_error(e.to_string());
        }
        loop {
            while let Ok(m) = self.rx.try_recv() {
                self.on_msg(m);
            }
            self.pump();
            if self.src.status().is_final() {
                break;
            }
            if self.writer.is_some()
                && self.src.status() == MigrationStatus::Active
                && !self.src.wants_transmit()
            {
                // Every page is sent: `poll_transmit` is where the machine asks for the next
                // dirty sync (`NeedDirtySync`); it writes nothing here.
                self.transmit(CHUNK);
                self.pump();
            }
            if self.writer.is_some() && self.src.wants_transmit() {
                if self.src.urgent_pending() {
                    // Requested pages go first, in a write of their own (the machine ends the
                    // part after them), so the driver is back for the next request as soon as
                    // the kernel took them. They are not paced: `max-postcopy-bandwidth` caps
                    // the background scan (the bucket goes negative and the scan waits longer).
                    self.transmit(1);
                    continue;
                }
                let rate = self.rate();
                let avail = self.bucket.available(Instant::now(), rate);
                if avail == 0 {
                    let wait = self
                        .bucket
                        .wait_for(CHUNK, rate)
                        .max(Duration::from_micros(200));
                    match self.rx.recv_timeout(wait) {
                        Ok(m) => self.on_msg(m),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    continue;
                }
                self.transmit(avail.min(CHUNK));
            } else {
                // Idle: wait for the return path or a command; tick for SM-TIMEOUT.
                match self.rx.recv_timeout(TIMEOUT_TICK) {
                    Ok(m) => self.on_msg(m),
                    Err(RecvTimeoutError::Timeout) => {
                        let now = self.now();
                        self.src.handle_timeout(now);
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            if self.writer.is_some()
                && matches!(
                    self.src.status(),
                    MigrationStatus::PostcopyPaused
                        | MigrationStatus::Failed
                        | MigrationStatus::Cancelled
                )
            {
                // The machine gave the channel up (timeout, bad input): close it.
                if let Some(w) = self.writer.take() {
                    w.cutter().cut();
                }
                self.rp_buf.clear();
            }
        }
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(w) = self.writer.take() {
            w.cutter().cut();
        }
        // Closed, not cut: what was written is delivered before the end of stream.
        self.mfd_writers.clear();
        let mut g = self.shared.lock();
        g.tx = None;
        g.cutter = None;
        drop(g);
        let st = self.src.status();
        if matches!(st, MigrationStatus::Failed | MigrationStatus::Cancelled)
            && self.we_stopped_guest
        {
            // QEMU resumes a guest it stopped for a migration that did not finish.
            if let Ok(true) = self.shared.guest.start() {
                self.shared.events.resume();
            }
        }
        self.update_remaining();
    }

    fn rate(&self) -> u64 {
        let st = self.src.status();
        if matches!(
            st,
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
        ) {
            Shared::get(&self.shared.max_postcopy_bandwidth)
        } else {
            Shared::get(&self.shared.max_bandwidth)
        }
    }

    fn connect(&mut self, uri: &MigrationUri) -> std::io::Result<()> {
        let c = transport::connect(uri, &TransportConfig::default())?;
        if let (Socket::Tcp(t), true) = (c.socket(), self.shared.cap("postcopy-ram")) {
            // Keep little bulk data queued in the kernel ahead of a requested page. Without
            // postcopy no page is ever requested: the kernel's autotuned buffers stay, so the
            // writer blocks (and waits for the destination to be scheduled) far less often.
            rustix::net::sockopt::set_socket_send_buffer_size(t, SEND_BUFFER)?;
            transport::set_notsent_lowat(t, NOTSENT_LOWAT)?;
        }
        self.conn += 1;
        self.shared.lock().cutter = Some(c.cutter());
        let (r, w) = c.split();
        let (tx, conn) = (self.tx.clone(), self.conn);
        std::thread::Builder::new()
            .name(format!("return-path-{conn}"))
            .spawn(move || reader(r, conn, tx))?;
        self.writer = Some(w);
        self.rp_buf.clear();
        self.rp_count.reset();
        tracing::info!("main channel {conn} connected to {uri}");
        // Multifd: the connections follow the main one (QEMU 7.2 takes the first connection as
        // the main channel), all before the first byte is written (the destination starts
        // loading once every channel is connected). Only the first migration opens them.
        if self.conn == 1 {
            for id in 0..self.src.multifd_channels() {
                let c = transport::connect(uri, &TransportConfig::default())?;
                let (_r, w) = c.split();
                self.mfd_writers.push(w);
                tracing::info!("multifd channel {id} connected to {uri}");
            }
        }
        Ok(())
    }

    /// Writes what the machine queued on each multifd connection; returns the byte count.
    fn transmit_multifd(&mut self) -> Result<usize, String> {
        let mut total = 0;
        for (ch, w) in self.mfd_writers.iter_mut().enumerate() {
            self.mfd_out.clear();
            let n = self.src.poll_transmit_multifd(ch, &mut self.mfd_out);
            if n == 0 {
                continue;
            }
            w.write_all(&self.mfd_out)
                .map_err(|e| format!("multifd channel {ch} write: {e}"))?;
            total += n;
        }
        Ok(total)
    }

    fn transmit(&mut self, budget: usize) {
        self.out.clear();
        let ram = self.shared.guest.ram.clone();
        let (pages0, zero0) = (self.src.pages_sent(), self.src.zero_pages_sent());
        let mem = Armed {
            ram: &ram,
            marks: &self.marks,
        };
        let n = self.src.poll_transmit(&mem, &mut self.out, budget);
        let c = &self.shared.recorder.counters;
        // The machine knows which records were zero pages: no second read of guest memory.
        let zero = self.src.zero_pages_sent() - zero0;
        let data = self.src.pages_sent() - pages0 - zero;
        c.zero_pages
            .fetch_add(zero, std::sync::atomic::Ordering::Relaxed);
        c.pages
            .fetch_add(data, std::sync::atomic::Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        let written = w
            .write_all(&self.out)
            .map_err(|e| format!("main channel write: {e}"));
        let written = written.and_then(|()| self.transmit_multifd());
        let c = &self.shared.recorder.counters;
        match written {
            Ok(m) => {
                if let Some((read, handled)) = self.urgent_since {
                    if !self.src.urgent_pending() {
                        self.urgent_since = None;
                        let us =
                            |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros();
                        let written = Instant::now();
                        tracing::debug!(
                            "urgent path: return path read -> handled {} us, handled -> requested pages written {} us",
                            us(read, handled),
                            us(handled, written)
                        );
                    }
                }
                let n = n + m;
                self.bucket.consume(n);
                c.add_bytes(n as u64);
                // Feed the throughput window (`mbps`) as bytes go out, not only when queried.
                let total = c
                    .transferred_bytes
                    .load(std::sync::atomic::Ordering::Relaxed);
                self.shared.recorder.rate.sample(Instant::now(), total);
                let phase = match self.src.status() {
                    MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover => {
                        &self.shared.postcopy_bytes
                    }
                    _ if self.stopped_at.is_some() => &self.shared.downtime_bytes,
                    _ => &self.shared.precopy_bytes,
                };
                phase.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                self.iter_bytes += n as u64;
            }
            Err(e) => self.lost(e),
        }
        self.update_remaining();
    }

    fn update_remaining(&self) {
        let n: u64 = (0..self.shared.guest.ram.blocks().len())
            .filter_map(|b| self.src.dirty(b).map(PageBitmap::count_ones))
            .sum();
        self.shared
            .remaining
            .store(n * PAGE_SIZE as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The channel is gone (write error, return-path EOF): tell the machine.
    fn lost(&mut self, why: String) {
        if let Some(w) = self.writer.take() {
            w.cutter().cut();
            tracing::warn!("main channel {} lost: {why}", self.conn);
            self.rp_buf.clear();
            let now = self.now();
            self.src.handle_channel_closed(now);
        }
    }

    fn on_msg(&mut self, m: Msg) {
        let now = self.now();
        match m {
            Msg::Rp { conn, data, at } => {
                if conn != self.conn || self.writer.is_none() {
                    return;
                }
                self.rp_buf.extend_from_slice(&data);
                match self.src.handle_return_path(now, &self.rp_buf) {
                    Ok(n) => {
                        self.count_requests(n);
                        self.rp_buf.drain(..n);
                        if self.urgent_since.is_none() && self.src.urgent_pending() {
                            self.urgent_since = Some((at, Instant::now()));
                        }
                    }
                    Err(v) => {
                        // The machine has paused or failed; the channel is dead.
                        self.shared.set_error(v.to_string());
                        if let Some(w) = self.writer.take() {
                            w.cutter().cut();
                        }
                        self.rp_buf.clear();
                    }
                }
            }
            Msg::RpEnd { conn, why } => {
                if conn == self.conn {
                    self.lost(why);
                }
            }
            Msg::StartPostcopy => {
                if matches!(
                    self.src.status(),
                    MigrationStatus::Setup | MigrationStatus::Active
                ) {
                    self.stop_guest();
                    self.sync_dirty();
                    if let Err(e) = self.src.handle_control(now, Control::StartPostcopy) {
                        self.shared.set_error(e.to_string());
                    }
                }
            }
            Msg::Pause => {
                if self.src.handle_control(now, Control::Pause).is_ok() {
                    self.writer = None;
                    self.rp_buf.clear();
                }
            }
            Msg::Cancel => {
                if self.src.handle_control(now, Control::Cancel).is_ok() {
                    if let Some(w) = self.writer.take() {
                        w.cutter().cut();
                    }
                }
            }
            Msg::Resume(uri) => self.resume(uri),
        }
    }

    fn resume(&mut self, uri: MigrationUri) {
        // A new attempt: error-desc reports what happens to this one.
        self.shared.lock().error = None;
        let now = self.now();
        if let Err(e) = self.src.handle_control(now, Control::Resume) {
            self.shared.set_error(e.to_string());
            return;
        }
        self.pump();
        if let Err(e) = self.connect(&uri) {
            self.shared
                .set_error(format!("connecting the recovery channel to {uri}: {e}"));
            // 10.x waits in postcopy-recover-setup: back to postcopy-paused, as a lost channel.
            if self.src.status() == MigrationStatus::PostcopyRecoverSetup {
                let now = self.now();
                let _ = self.src.handle_control(now, Control::Pause);
            }
            return;
        }
        self.shared.recorder.counters.add_recovery();
        let now = self.now();
        if let Err(e) = self.src.handle_channel_opened(now) {
            self.shared.set_error(e.to_string());
            if let Some(w) = self.writer.take() {
                w.cutter().cut();
            }
        }
    }

    /// Counts page requests among the `n` return-path bytes the machine just consumed.
    fn count_requests(&mut self, n: usize) {
        let mut pos = 0;
        let blocks = self.shared.guest.ram.clone();
        let expect = |name: &[u8]| {
            blocks
                .by_name(name)
                .ok()
                .map(|(_, b)| PageBitmap::wire_size(b.pages()))
        };
        while pos < n {
            match self.rp_count.decode(&self.rp_buf[pos..n], &expect) {
                Ok((msg, used)) => {
                    if matches!(
                        msg,
                        RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. }
                    ) {
                        self.shared.recorder.counters.add_request();
                    }
                    pos += used;
                }
                Err(_) => return,
            }
        }
    }

    fn stop_guest(&mut self) {
        if self.shared.guest.stop() {
            self.we_stopped_guest = true;
            self.shared.events.stop();
        }
        self.stopped_at.get_or_insert_with(Instant::now);
    }

    /// One kernel dirty sync handed to the machine; returns the dirty page count.
    fn sync_dirty(&mut self) -> u64 {
        if let Some(h) = self.arming.take() {
            let r = h.join().unwrap_or_else(|_| {
                Err(DirtyError::NoneAvailable("arming thread panicked".into()))
            });
            if let Err(e) = r {
                // Pages written during the first pass may be untracked: fail.
                self.shared.set_error(format!("dirty tracking: {e}"));
                let now = self.now();
                let _ = self.src.handle_control(now, Control::Cancel);
                return 0;
            }
        }
        // A tracker whose read-and-reset is not atomic needs the writers paused around it.
        let pause = !self.tracker.mechanism().atomic() && self.shared.guest.running();
        if pause {
            self.shared.guest.stop();
        }
        let r = self.tracker.sync();
        if pause {
            let _ = self.shared.guest.start();
        }
        let bitmaps = match r {
            Ok(b) => b,
            Err(e) => {
                // Without a sync nothing written since the last one would be resent: fail.
                self.shared.set_error(format!("dirty sync: {e}"));
                let now = self.now();
                let _ = self.src.handle_control(now, Control::Cancel);
                return 0;
            }
        };
        let pass = self.shared.recorder.counters.add_dirty_sync();
        self.shared
            .iterations
            .store(pass, std::sync::atomic::Ordering::Relaxed);
        if self.shared.cap("events") {
            self.shared.events.migration_pass(pass);
        }
        let mut dirty = 0;
        for (i, b) in bitmaps.iter().enumerate() {
            dirty += b.count_ones();
            self.src.handle_dirty_sync(i, b);
        }
        dirty
    }

    /// The machine sent every dirty page: sync, and complete if the rest fits the downtime.
    fn iterate(&mut self) {
        let elapsed = self.iter_start.elapsed().as_secs_f64().max(1e-3);
        let dirty = self.sync_dirty();
        if self.src.status().is_final() {
            return;
        }
        self.shared.dirty_pages_rate.store(
            (dirty as f64 / elapsed) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let measured = self.iter_bytes as f64 / elapsed;
        let limit = Shared::get(&self.shared.max_bandwidth) as f64;
        let bw = if measured > 0.0 { measured } else { limit };
        let downtime = Shared::get(&self.shared.downtime_limit) as f64 / 1000.0;
        let bytes = (dirty * PAGE_SIZE as u64) as f64;
        tracing::debug!(
            "iteration: {dirty} dirty pages, {:.1} MB/s, fits: {}",
            bw / 1e6,
            bytes <= bw * downtime
        );
        if bytes <= bw * downtime {
            self.stop_guest();
            self.sync_dirty();
            let now = self.now();
            if let Err(e) = self.src.handle_control(now, Control::Complete) {
                self.shared.set_error(e.to_string());
            }
        }
        self.iter_start = Instant::now();
        self.iter_bytes = 0;
        self.update_remaining();
    }

    /// Drains the machine's events into QMP status, events and errors.
    fn pump(&mut self) {
        while let Some(ev) = self.src.poll_event() {
            match ev {
                Event::Status { from, to } => {
                    if from == MigrationStatus::PostcopyRecover
                        && to == MigrationStatus::PostcopyActive
                    {
                        self.shared.lock().error = None;
                    }
                    if to == MigrationStatus::Completed {
                        if let Some(t) = self.stopped_at {
                            self.shared.downtime_ms.store(
                                t.elapsed().as_millis() as u64,
                                std::sync::atomic::Ordering::Relaxed,
                            );
                        }
                    }
                    if to == MigrationStatus::Setup {
                        continue; // already reported by `start`
                    }
                    self.shared.set_status(to.into());
                }
                Event::Error { violation, .. } => self.shared.set_error(violation.to_string()),
                Event::ChannelLost { rule } => {
                    tracing::warn!("channel lost: {}: {}", rule.id(), rule.summary());
                    if rule == Rule::SmTimeout || self.src.status() == MigrationStatus::Failed {
                        self.shared
                            .set_error(format!("{}: {}", rule.id(), rule.summary()));
                    }
                }
                Event::NeedDirtySync => self.iterate(),
                Event::IllegalTransition(t) => tracing::error!("machine: {t:?}"),
                other => tracing::debug!("machine event: {other:?}"),
            }
        }
    }
}
