//! The migration thread: one `poll` loop around the `Destination` machine.
//!
//! This module owns [`run`]: the thread that polls the wake-up eventfd (QMP requests, accepted
//! connections), the userfaultfd (guest faults, read here: a fault becomes a page request with
//! no thread hop) and the migration connection. It feeds received bytes to
//! `Destination::handle_stream` with a [`Placer`] over userfaultfd memory, writes the
//! machine's return-path bytes on the same socket, turns forwarded guest faults into
//! `handle_fault` calls (page requests) and QMP requests into `handle_control`, and turns the
//! machine's events into QMP `MIGRATION` events, counters and the `error-desc`. Every protocol
//! decision is the machine's; this loop only moves bytes, pages and events.
//!
//! A silently dropped peer is detected by the transport (keepalive + `TCP_USER_TIMEOUT` within
//! `--drop-timeout`): the read fails and the channel counts as closed. After completion the
//! connection is read until the source closes it (so nothing unread makes the kernel reset it
//! before the source has read `SHUT`).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use qmig_host::qmp_server::EventSink;
use qmig_host::transport::{Connection, ListenStopper, Listener, Socket};
use qmig_host::uffd::{Fault, FaultSource};
use qmig_host::workload::Workload;
use qmig_protocol::error::Violation;
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, Event, FaultOutcome, Instant, MigrationStatus,
    RamBlockSpec,
};
use qmig_protocol::profile::Profile;
use qmig_protocol::rule::Rule;
use qmig_protocol::vmdesc::VmDesc;
use rustix::event::{poll, PollFd, PollFlags};
use serde_json::Value;

use crate::cli::{BlockArg, WorkloadSpec};
use crate::control::{Ctl, Waker};
use crate::devices;
use crate::memory::Placer;
use crate::recv_buf::RecvBuf;
use crate::state::Shared;

/// `offset N: STREAM-TRUNCATED: ...` for a channel that ended `left` bytes into an item that
/// starts at `offset`.
fn truncated_desc(offset: u64, left: u64) -> String {
    match Rule::from_id("STREAM-TRUNCATED") {
        Some(rule) => Violation::new(offset, rule, left).to_string(),
        None => format!(
            "offset {offset}: STREAM-TRUNCATED: the channel ended inside an item (value {left:#x})"
        ),
    }
}

/// Bytes read from the socket per `read`: small enough that a guest fault waits for at most
/// one chunk's placement before it becomes a page request (the loop polls the userfaultfd
/// between chunks).
const CHUNK: usize = 64 << 10;
/// Bytes read per `read` without postcopy: no page is ever requested, so nothing waits behind
/// the placement of a larger chunk (fewer `read`/`poll` turns, larger `UFFDIO_COPY` batches).
const BULK_CHUNK: usize = 256 << 10;
/// Kernel receive buffer of a TCP migration channel (the kernel doubles it). It bounds the
/// bulk data queued ahead of a requested page: the source's send queue is bounded too
/// (`TCP_NOTSENT_LOWAT`), so an urgent page waits behind at most these two queues. Set only
/// with the `postcopy-ram` capability; a precopy-only channel keeps the kernel's autotuning.
const RECV_BUFFER: usize = 64 << 10;
/// Most unconsumed bytes kept: beyond every item the decoder accepts under its limits.
const MAX_BUFFERED: usize = 64 << 20;
/// The migration parameter that sets the silence bound, milliseconds.
pub const SILENCE_PARAM: &str = "x-qmig-silence-timeout";
/// Bound on one return-path write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the migration thread is configured with.
pub struct Config {
    /// Wire profile.
    pub profile: Profile,
    /// Machine type name (CFG-MACHINE).
    pub machine: String,
    /// RAM blocks (name, bytes, page size), in order.
    pub blocks: Vec<BlockArg>,
    /// VM description for device sections.
    pub vmdesc: Option<VmDesc>,
    /// Guest workload.
    pub workload: Option<WorkloadSpec>,
    /// Where to write device state at completion.
    pub dump_devices: Option<PathBuf>,
    /// The silence bound (`--silence-timeout`), unless the `x-qmig-silence-timeout` parameter
    /// (milliseconds) overrides it.
    pub silence_timeout: Option<Duration>,
    /// Guest faults, read by this thread.
    pub faults: FaultSource,
}

struct Loop {
    sh: Arc<Shared>,
    rx: Receiver<Ctl>,
    waker: Arc<Waker>,
    events: EventSink,
    cfg: Config,
    t0: StdInstant,
    machine: Option<Destination>,
    listening: Option<ListenStopper>,
    conn: Option<Connection>,
    buf: RecvBuf,
    out: Vec<u8>,
    workload: Option<Workload>,
    released: bool,
    finished: bool,
    /// Bytes of the current channel consumed by the machine (its decoder's offset).
    consumed: u64,
    /// Where the current channel ended inside an item (STREAM-TRUNCATED), for the error-desc.
    truncated: Option<String>,
    /// The main channel has ended: its remaining bytes are fed as the rest of the channel.
    at_eof: bool,
    /// Multifd connections (crate::multifd).
    mfd: crate::multifd::Channels,
    /// Bytes per `read` of the main channel: [`CHUNK`] with postcopy, else [`BULK_CHUNK`].
    chunk: usize,
    /// The guest was started (`RESUME` emitted, workload launched).
    guest_started: bool,
}

fn sock_fd(c: &Connection) -> BorrowedFd<'_> {
    match c.socket() {
        Socket::Tcp(s) => s.as_fd(),
        Socket::Unix(s) => s.as_fd(),
    }
}

/// Accepts one connection on `l` in a thread of its own and hands it to the migration thread
/// ([`Ctl::Accepted`]); a [`ListenStopper`] ends the wait (cancel, a new `migrate-recover`).
/// With multifd, the main channel and `multifd-channels` more, each once its first bytes are
/// there (so the migration thread can tell them apart without waiting).
fn spawn_acceptor(l: Listener, sh: &Shared) -> Option<ListenStopper> {
    let stopper = l.stopper();
    let ctl = sh.ctl.clone();
    let extra = crate::multifd::channels(sh).map_or(0, usize::from);
    let r = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            for k in 0..=extra {
                match l.accept() {
                    Ok(c) => {
                        if extra > 0 {
                            let _ = c.socket().set_read_timeout(Some(WRITE_TIMEOUT));
                            let _ = crate::multifd::peek_is_multifd(&c);
                            let _ = c.socket().set_read_timeout(None);
                        }
                        ctl.send(Ctl::Accepted(c));
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionAborted => return,
                    Err(e) => {
                        tracing::warn!("accept {k} failed: {e}");
                        return;
                    }
                }
            }
        });
    match r {
        Ok(_) => Some(stopper),
        Err(e) => {
            tracing::error!("cannot start the accept thread: {e}");
            None
        }
    }
}

/// Runs the migration thread until [`Ctl::Quit`].
pub fn run(sh: Arc<Shared>, rx: Receiver<Ctl>, waker: Arc<Waker>, events: EventSink, cfg: Config) {
    let mut l = Loop {
        sh,
        rx,
        waker,
        events,
        cfg,
        t0: StdInstant::now(),
        machine: None,
        listening: None,
        conn: None,
        buf: RecvBuf::new(),
        out: Vec::new(),
        workload: None,
        released: false,
        finished: false,
        consumed: 0,
        truncated: None,
        at_eof: false,
        mfd: Default::default(),
        chunk: CHUNK,
        guest_started: false,
    };
    l.run();
}

impl Loop {
    fn now(&self) -> Instant {
        Instant(self.t0.elapsed().as_nanos() as u64)
    }

    fn run(&mut self) {
        loop {
            let (wake, fault, readable, mfd_ready) = {
                let waker = self.waker.clone();
                let mut fds = vec![
                    PollFd::new(&*waker, PollFlags::IN),
                    PollFd::new(&self.cfg.faults, PollFlags::IN),
                ];
                // A main channel held back by multifd is not read further until it may go on.
                let main_waits = !self.buf.is_empty()
                    && self
                        .machine
                        .as_ref()
                        .is_some_and(Destination::main_waits_for_multifd);
                let ci = self.conn.as_ref().filter(|_| !main_waits).map(|c| {
                    fds.push(PollFd::from_borrowed_fd(sock_fd(c), PollFlags::IN));
                    fds.len() - 1
                });
                let mfd_fds = self.mfd.readable_fds(self.machine.as_ref());
                let first_mfd = fds.len();
                for (_, fd) in &mfd_fds {
                    fds.push(PollFd::from_borrowed_fd(*fd, PollFlags::IN));
                }
                // Asleep at most until the silence bound would expire (SM-TIMEOUT).
                let timeout = self
                    .machine
                    .as_ref()
                    .and_then(Destination::silence_deadline)
                    .map_or(-1, |d| {
                        let ns = d.since(self.now());
                        ns.div_ceil(1_000_000).min(i32::MAX as u64) as i32
                    });
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => {
                        tracing::error!("poll failed: {e}");
                        return;
                    }
                }
                let ready = |i: Option<usize>| i.is_some_and(|i| !fds[i].revents().is_empty());
                let mfd_ready: Vec<usize> = mfd_fds
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| ready(Some(first_mfd + k)))
                    .map(|(_, (i, _))| *i)
                    .collect();
                (ready(Some(0)), ready(Some(1)), ready(ci), mfd_ready)
            };
            if wake {
                self.waker.drain();
                while let Ok(c) = self.rx.try_recv() {
                    if !self.on_ctl(c) {
                        return;
                    }
                }
            }
            if fault {
                let t = StdInstant::now();
                let n = self.faults();
                // The page requests go out now, before the next chunk of bulk data is placed.
                self.settle();
                if n > 0 {
                    tracing::debug!(
                        "urgent path: {n} faults read -> page requests written {} us",
                        t.elapsed().as_micros()
                    );
                }
            }
            if readable {
                self.read();
            }
            if !mfd_ready.is_empty() {
                self.mfd_read(&mfd_ready);
            }
            let now = self.now();
            if let Some(m) = self.machine.as_mut() {
                m.handle_timeout(now);
            }
            self.settle();
        }
    }

    /// Handles one request; false to stop the thread.
    fn on_ctl(&mut self, c: Ctl) -> bool {
        let now = self.now();
        match c {
            Ctl::Incoming(l, reply) => {
                let r = if self.machine.is_some() || self.listening.is_some() {
                    Err("The incoming migration has already been started".into())
                } else {
                    self.listening = spawn_acceptor(l, &self.sh);
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Ctl::Recover(l, reply) => {
                let r = match self.machine.as_mut() {
                    None => Err("No incoming migration to recover".into()),
                    Some(m) => match m.handle_control(now, Control::Recover) {
                        Ok(()) => {
                            if let Some(old) = self.listening.take() {
                                old.stop();
                            }
                            self.listening = spawn_acceptor(l, &self.sh);
                            Ok(())
                        }
                        Err(e) => Err(format!(
                            "Migrate recover can only be run when postcopy is paused ({e})"
                        )),
                    },
                };
                let _ = reply.send(r);
            }
            Ctl::Pause(reply) => {
                let r = match self.machine.as_mut() {
                    None => Err("No migration in progress".into()),
                    Some(m) => m
                        .handle_control(now, Control::Pause)
                        .map_err(|e| e.to_string()),
                };
                let _ = reply.send(r);
            }
            Ctl::Cancel(reply) => {
                let r = match self.machine.as_mut() {
                    None => Ok(()),
                    Some(m) => m
                        .handle_control(now, Control::Cancel)
                        .map_err(|e| e.to_string()),
                };
                if r.is_ok() {
                    if let Some(old) = self.listening.take() {
                        old.stop();
                    }
                    self.conn = None;
                }
                let _ = reply.send(r);
            }
            Ctl::DumpDevices(reply) => {
                let _ = reply.send(Ok(self.devices_json()));
            }
            Ctl::Accepted(c) => self.accept(c),
            Ctl::Quit => {
                if let Some(old) = self.listening.take() {
                    old.stop();
                }
                return false;
            }
        }
        true
    }

    /// Guest faults waiting on the userfaultfd become `handle_fault` calls (page requests);
    /// returns how many were read.
    fn faults(&mut self) -> usize {
        let mut got: Vec<Fault> = Vec::new();
        if let Err(e) = self.cfg.faults.read(&mut got) {
            tracing::error!("reading guest faults: {e}");
        }
        let n = got.len();
        for f in got {
            self.sh.recorder.counters.add_fault();
            let Some(m) = self.machine.as_mut() else {
                // No migration yet (a pmemsave before any channel): the page is zero.
                if let Err(e) = self.sh.uffd.place_zero(f.block, f.offset, 4096) {
                    tracing::warn!("zero-filling {f:?}: {e}");
                }
                continue;
            };
            match m.handle_fault(f.block, f.offset) {
                FaultOutcome::Released => self.release(),
                FaultOutcome::OutOfRange => tracing::warn!("fault outside the blocks: {f:?}"),
                _ => {}
            }
        }
        n
    }

    fn devices_json(&self) -> Value {
        let Some(m) = self.machine.as_ref() else {
            return Value::Array(Vec::new());
        };
        devices::to_json(m.devices(), self.cfg.vmdesc.as_ref(), &m.config().limits)
    }

    /// The silence bound: the `x-qmig-silence-timeout` parameter (milliseconds, 0: none), else
    /// `--silence-timeout`.
    fn silence_timeout(&self) -> Option<Duration> {
        match self
            .sh
            .view()
            .params
            .get(SILENCE_PARAM)
            .and_then(Value::as_u64)
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => self.cfg.silence_timeout,
        }
    }

    fn new_machine(&self) -> Result<Destination, String> {
        let caps = self.sh.view().caps.clone();
        let postcopy = caps.get("postcopy-ram").copied().unwrap_or(false);
        let blocks = self
            .cfg
            .blocks
            .iter()
            .map(|b| RamBlockSpec::new(&b.name, b.len, b.page_size))
            .collect();
        let mut dc = DestinationConfig::new(self.cfg.profile, &self.cfg.machine, blocks, postcopy);
        dc.vmdesc = self.cfg.vmdesc.clone();
        dc.silence_timeout = self.silence_timeout().map(|d| d.as_nanos() as u64);
        dc.multifd = crate::multifd::channels(&self.sh)
            .map(|n| qmig_protocol::machine::MultifdConfig::new(&self.cfg.profile, n));
        Destination::new(dc).map_err(|e| format!("bad configuration: {e:?}"))
    }

    fn accept(&mut self, conn: Connection) {
        if self.conn.is_some()
            && crate::multifd::channels(&self.sh).is_some()
            && crate::multifd::is_multifd_now(&conn)
        {
            let i = self.mfd.add(conn);
            tracing::info!("multifd connection {i}");
            return;
        }
        self.listening = None;
        tracing::info!("channel from {}", conn.socket().peer());
        let _ = conn.socket().set_write_timeout(Some(WRITE_TIMEOUT));
        let postcopy = self.sh.view().cap("postcopy-ram");
        self.chunk = if postcopy { CHUNK } else { BULK_CHUNK };
        if let (Socket::Tcp(t), true) = (conn.socket(), postcopy) {
            if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size(t, RECV_BUFFER) {
                tracing::warn!("SO_RCVBUF: {e}");
            }
        }
        if self.machine.is_none() {
            match self.new_machine() {
                Ok(m) => {
                    self.machine = Some(m);
                    self.sh.recorder.start(StdInstant::now());
                }
                Err(e) => {
                    tracing::error!("{e}");
                    self.sh.view().error_desc = Some(e);
                    return;
                }
            }
        }
        let now = self.now();
        let m = self.machine.as_mut().expect("created above");
        match m.handle_channel_opened(now) {
            Ok(()) => {
                self.conn = Some(conn);
                self.buf.clear();
                self.consumed = 0;
            }
            Err(e) => tracing::warn!("channel refused: {e}"),
        }
    }

    fn read(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let r = conn.read(self.buf.spare(self.chunk));
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                return;
            }
            Err(e) => {
                tracing::warn!("channel read failed: {e}");
                0
            }
        };
        self.buf.commit(n);
        if n == 0 {
            // The rest of the channel is all there is: let the decoder decide what waited for
            // a next byte (a footer, SEC-DELIMIT) before calling what is left truncated.
            if !self.buf.is_empty() {
                self.at_eof = true;
                self.feed_main();
                self.at_eof = false;
            }
            let left = self.buf.len() as u64;
            // A channel that ends before the stream's EOF ends inside it (STREAM-TRUNCATED).
            let open = self
                .machine
                .as_ref()
                .is_some_and(|m| !m.status().is_final());
            self.truncated = open.then(|| truncated_desc(self.consumed, left));
            self.close_channel();
            return;
        }
        self.sh.recorder.counters.add_bytes(n as u64);
        self.feed();
    }

    /// Feeds the main channel; with multifd, then lets both sides go on in turn.
    fn feed(&mut self) {
        self.feed_main();
        if self
            .machine
            .as_ref()
            .is_some_and(|m| m.config().multifd.is_some())
        {
            self.mfd_pump();
        }
    }

    /// Reads the ready multifd connections, then lets each side consume what the other
    /// unblocked (crate::multifd).
    fn mfd_read(&mut self, ready: &[usize]) {
        let now = self.now();
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        for &i in ready {
            let _ = self.mfd.read(i, m, &self.sh, now);
        }
        self.mfd_pump();
    }

    /// Main channel and multifd connections in turn until neither consumes more.
    fn mfd_pump(&mut self) {
        loop {
            let before = self.consumed;
            if !self.buf.is_empty() {
                self.feed_main();
            }
            let now = self.now();
            let Some(m) = self.machine.as_mut() else {
                return;
            };
            let fed = self.mfd.feed_all(m, &self.sh, now);
            if !fed && self.consumed == before {
                return;
            }
        }
    }

    fn close_channel(&mut self) {
        self.conn = None;
        let now = self.now();
        if let Some(m) = self.machine.as_mut() {
            m.handle_channel_closed(now);
        }
    }

    fn feed_main(&mut self) {
        let now = self.now();
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        let uffd = self.sh.uffd.clone();
        let mut placer = Placer::new(&uffd);
        let input = self.buf.unread();
        let r = if self.at_eof {
            m.handle_stream_end(now, input, &mut placer)
        } else {
            m.handle_stream(now, input, &mut placer)
        };
        if let Err(e) = placer.finish() {
            tracing::error!("placing staged pages failed: {e}");
            self.sh.view().error_desc = Some(format!("guest memory: {e}"));
            let _ = m.handle_control(now, Control::Cancel);
        }
        match r {
            Ok(n) => {
                self.buf.consume(n);
                self.consumed += n as u64;
            }
            Err(v) => {
                tracing::error!("migration stream rejected: {v}");
                self.conn = None;
                self.buf.clear();
                return;
            }
        }
        if self.buf.len() > MAX_BUFFERED {
            tracing::error!("an item larger than {MAX_BUFFERED} bytes: closing the channel");
            self.close_channel();
        }
    }

    /// After every loop turn: return-path bytes out, machine events handled, latencies taken.
    fn settle(&mut self) {
        let Some(m) = self.machine.as_mut() else {
            return;
        };
        self.out.clear();
        m.poll_transmit(&mut self.out);
        if !self.out.is_empty() {
            if let Some(c) = self.conn.as_mut() {
                if let Err(e) = c.write_all(&self.out).and_then(|_| c.flush()) {
                    tracing::warn!("return path write failed: {e}");
                    self.close_channel();
                }
            }
        }
        let mut evs = Vec::new();
        while let Some(ev) = self.machine.as_mut().and_then(Destination::poll_event) {
            evs.push(ev);
        }
        // Errors first: whoever sees the MIGRATION event that follows them finds the
        // error-desc already in query-migrate.
        let (errs, rest): (Vec<Event>, Vec<Event>) = evs
            .into_iter()
            .partition(|e| matches!(e, Event::Error { .. }));
        for ev in errs.into_iter().chain(rest) {
            self.on_event(ev);
        }
        // The guest runs from POSTCOPY_RUN on, as QEMU's vCPUs do (query-status leaves
        // `inmigrate` there, not at LISTEN).
        if self
            .machine
            .as_ref()
            .is_some_and(Destination::postcopy_running)
        {
            self.start_guest();
        }
        for d in self.sh.uffd.take_fault_latencies() {
            self.sh.recorder.fault_latency.record_duration(d);
        }
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            if let Err(e) = self.sh.uffd.cancel() {
                tracing::warn!("releasing fault waits: {e}");
            }
        }
    }

    /// Starts the guest once: `RESUME`, the running state and the workload (called on every
    /// loop turn from `POSTCOPY_RUN` on, so it must do nothing after the first call).
    fn start_guest(&mut self) {
        if self.guest_started {
            return;
        }
        self.guest_started = true;
        self.sh.view().guest_running = true;
        self.events.resume();
        if let Some(spec) = &self.cfg.workload {
            match crate::workload::start(self.sh.ram.clone(), spec) {
                Ok(w) => self.workload = Some(w),
                Err(e) => tracing::error!("workload did not start: {e}"),
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Status { from, to } => {
                tracing::info!("migration status {from} -> {to}");
                self.sh.view().status = to;
                self.events.migration(to);
                match to {
                    MigrationStatus::PostcopyActive if from == MigrationStatus::PostcopyRecover => {
                        self.sh.recorder.counters.add_recovery();
                    }
                    MigrationStatus::Completed => self.complete(),
                    MigrationStatus::Failed | MigrationStatus::Cancelled => {
                        self.conn = None;
                        self.mfd.clear();
                        self.release();
                    }
                    MigrationStatus::PostcopyPaused => self.conn = None,
                    _ => {}
                }
            }
            Event::Error { channel, violation } => {
                tracing::error!("{channel:?}: {violation}");
                self.sh.view().error_desc = Some(violation.to_string());
            }
            Event::ChannelLost { rule } => {
                tracing::warn!("channel lost ({rule})");
                let lost = format!("channel lost: {}: {}", rule.id(), rule.summary());
                self.sh.view().error_desc = Some(match self.truncated.take() {
                    Some(v) => format!("{v}; {lost}"),
                    None => lost,
                });
                self.conn = None;
            }
            Event::PageRequested { .. } => self.sh.recorder.counters.add_request(),
            Event::PagesPlaced { count } => {
                self.sh
                    .recorder
                    .counters
                    .pages
                    .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
            }
            Event::WaitsReleased { .. } => self.release(),
            Event::IllegalTransition(t) => tracing::error!("machine: {t:?}"),
            _ => {}
        }
    }

    fn complete(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Err(e) = self.sh.uffd.finish() {
            tracing::warn!("unregistering guest RAM: {e}");
        }
        self.start_guest();
        if let Some(path) = self.cfg.dump_devices.clone() {
            let json = self.devices_json();
            let text = serde_json::to_string_pretty(&json).unwrap_or_default();
            if let Err(e) = std::fs::write(&path, text) {
                tracing::error!("--dump-devices {}: {e}", path.display());
            }
        }
    }
}
