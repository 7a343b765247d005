//! The runner as a migration destination, for replays against a source.
//!
//! This module owns [`Player`]: one incoming migration over one or more TCP connections (the
//! main channel, then recovery channels). Every byte the source sends goes, in order, through
//! the runner's own [`StreamDecoder`] (any violation stops the case with its rule id and
//! offset) and through the protocol crate's sans-IO [`Destination`] machine, which keeps the
//! guest RAM (plain vectors here) and writes the return path (PONG, page requests, SHUT,
//! RESUME_ACK). The runner's own books — which page records arrived on which connection, the
//! pages it requested and where each arrived, the RECV_BITMAP it chose — are kept here from
//! the runner's decoder, never from the machine. The RECV_BITMAP the machine would send is
//! replaced by the chosen one. The source behaviour books of [`super::src_rules`] are fed
//! here too: every decoded item (SM-SWITCHOVER-START), the records of other pages after each
//! request (SM-URGENT-FIRST), and what the machine holds once it has processed POSTCOPY_RUN
//! (SM-DISCARD-DIRTY: the machine is fed up to the end of that command, then snapshotted).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, Event, FaultOutcome, GuestMemory, Instant,
    MemoryError, MigrationStatus, RamBlockSpec,
};
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::{Profile, WireError};

use super::broken_src::Tamper;
use super::src_rules::{switchover_to_72, AtRun, Dirtied, Switchover};

/// Target page size.
pub const TPS: u64 = 4096;

/// Guest RAM of the played destination: one vector per block.
pub struct Ram {
    /// Block contents, in the configured order.
    pub blocks: Vec<Vec<u8>>,
}

impl GuestMemory for Ram {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        let b = self.blocks.get_mut(block).ok_or(MemoryError { code: 22 })?;
        let o = offset as usize;
        b.get_mut(o..o + data.len())
            .ok_or(MemoryError { code: 22 })?
            .copy_from_slice(data);
        Ok(())
    }
    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        let b = self.blocks.get_mut(block).ok_or(MemoryError { code: 22 })?;
        let o = offset as usize;
        b.get_mut(o..o + len as usize)
            .ok_or(MemoryError { code: 22 })?
            .fill(0);
        Ok(())
    }
    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.place_zero(block, offset, len)
    }
    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        let o = offset as usize;
        match self.blocks.get(block).and_then(|b| b.get(o..o + out.len())) {
            Some(p) => {
                out.copy_from_slice(p);
                true
            }
            None => false,
        }
    }
}

/// A page the runner asked for with a page request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Block index.
    pub block: usize,
    /// Target page index.
    pub page: u64,
    /// Stream offset (main channel) when the request was written.
    pub asked_at: u64,
    /// Stream offset of the record that brought it, once arrived.
    pub arrived_at: Option<u64>,
    /// Records of pages nobody requested decoded after the request, until it arrived.
    pub others: u64,
}

/// Return-path bytes the runner writes to the source once (a source-side synthetic case).
#[derive(Clone, Debug)]
pub struct Inject {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// `false`: once the first RAM page record has arrived; `true`: once POSTCOPY_RUN has.
    pub after_run: bool,
    /// Return-path offset of the first injected byte, once written.
    pub at: Option<u64>,
    /// Page requests the bytes make (block index, target page), tracked as [`Request`]s.
    pub pages: Vec<(usize, u64)>,
}

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The source closed after the migration completed on the played destination.
    Completed,
    /// The runner cut the connection (stop condition met).
    Cut,
    /// The source closed (or reset) the connection before the end of the migration.
    Closed,
}

/// A failed check: the message of the case.
pub type Fail = String;

/// When [`Player::serve`] stops reading a connection before the end.
pub trait Stop {
    /// Called after each batch of bytes; `true`: stop (cut) now.
    fn cut_now(&mut self, p: &mut Player, sock: &mut TcpStream) -> Result<bool, Fail>;
}

/// Never stops early.
pub struct NoStop;
impl Stop for NoStop {
    fn cut_now(&mut self, _: &mut Player, _: &mut TcpStream) -> Result<bool, Fail> {
        Ok(false)
    }
}

/// The played destination; see the module documentation.
pub struct Player {
    /// The protocol machine.
    pub dest: Destination,
    /// Its RAM.
    pub mem: Ram,
    /// Block names and page counts, in the configured order.
    pub blocks: Vec<(String, u64)>,
    /// The runner's own decoder of the current connection.
    dec: StreamDecoder,
    /// Connections served so far (1: main; 2+: recovery).
    pub conns: u32,
    /// Pages whose records arrived on the first connection (cleared by RAM_DISCARD).
    pub first: Vec<PageBitmap>,
    /// Pages whose records arrived on recovery connections.
    pub resent: Vec<PageBitmap>,
    /// Page records on recovery connections for a page that already came on one.
    pub resent_twice: Vec<(usize, u64)>,
    /// The RECV_BITMAP the runner answers with, per block (set on recovery).
    pub chosen: Option<Vec<PageBitmap>>,
    /// RECV_BITMAPs sent (block names, in order).
    pub bitmaps_sent: Vec<String>,
    /// Blocks named by a MIG_CMD_RECV_BITMAP on the current recovery connection.
    bitmap_asked: Vec<bool>,
    /// Whether RESUME_ACK was written on the current connection (a source sends no page
    /// record on a recovery connection before it: SM-RECOVER-BITMAP-ALL).
    ack_written: bool,
    /// Page requests sent.
    pub requests: Vec<Request>,
    /// Whether POSTCOPY_RUN was decoded.
    pub run_seen: bool,
    /// Whether EOF was decoded on the current connection.
    pub eof_seen: bool,
    /// Stream bytes received on the current connection (after any tamper stage).
    pub bytes: u64,
    /// PONGs and other return-path messages written (type codes, in order).
    pub rp_types: Vec<u16>,
    /// A deliberate defect placed between the source and the checks.
    pub tamper: Option<Tamper>,
    /// Return-path bytes written on the current connection (the machine's and injected ones).
    pub rp_bytes: u64,
    /// Bytes to write on the return path once, at a defined point (source-side synthetic
    /// cases): before the machine's own return-path bytes of that batch.
    pub inject: Option<Inject>,
    /// Decoder of the return path the machine writes (per connection: REQ_PAGES names no
    /// block and follows the last REQ_PAGES_ID).
    rpd: RpDecoder,
    now: u64,
    /// SM-SWITCHOVER-START books (every connection).
    pub switchover: Switchover,
    /// Pages the runner wrote on the source after they arrived (SM-DISCARD-DIRTY), checked
    /// against [`Player::at_run`] as soon as it is taken.
    pub dirtied: Option<Dirtied>,
    /// What the machine held once it had processed POSTCOPY_RUN (main connection; taken when
    /// [`Player::dirtied`] was set by then).
    pub at_run: Option<AtRun>,
    /// [`Player::first`] when POSTCOPY_RUN was decoded, until [`Player::at_run`] is taken.
    held_at_run: Option<Vec<PageBitmap>>,
    /// Stream offset of the end of POSTCOPY_RUN (main connection).
    run_end: Option<u64>,
    /// Bytes of the current connection the machine has consumed.
    fed: u64,
}

/// Whether bytes from the peer wait unread in `sock`'s receive queue (a non-blocking peek).
fn input_pending(sock: &TcpStream) -> bool {
    if sock.set_nonblocking(true).is_err() {
        return false;
    }
    let pending = sock.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
    let _ = sock.set_nonblocking(false);
    pending
}

fn violation(what: &str, v: &qmig_protocol::Violation) -> Fail {
    format!(
        "{what}: {} at offset {} (value {:#x})",
        v.rule.id(),
        v.offset,
        v.value
    )
}

impl Player {
    /// A destination for `blocks` (name, bytes) of machine `machine`.
    pub fn new(
        profile: Profile,
        machine: &str,
        blocks: &[(String, u64)],
        postcopy: bool,
        tamper: Option<Tamper>,
    ) -> Result<Player, Fail> {
        let specs: Vec<RamBlockSpec> = blocks
            .iter()
            .map(|(n, l)| RamBlockSpec::new(n, *l, TPS))
            .collect();
        let cfg = DestinationConfig::new(profile, machine, specs, postcopy);
        let dest = Destination::new(cfg).map_err(|e| format!("destination config: {e:?}"))?;
        let pages: Vec<(String, u64)> = blocks
            .iter()
            .map(|(n, l)| (n.clone(), l.div_ceil(TPS)))
            .collect();
        Ok(Player {
            dest,
            mem: Ram {
                blocks: blocks.iter().map(|(_, l)| vec![0u8; *l as usize]).collect(),
            },
            first: pages.iter().map(|(_, p)| PageBitmap::new(*p)).collect(),
            resent: pages.iter().map(|(_, p)| PageBitmap::new(*p)).collect(),
            blocks: pages,
            dec: StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT),
            conns: 0,
            resent_twice: Vec::new(),
            chosen: None,
            bitmaps_sent: Vec::new(),
            bitmap_asked: vec![false; blocks.len()],
            ack_written: false,
            requests: Vec::new(),
            run_seen: false,
            eof_seen: false,
            bytes: 0,
            rp_types: Vec::new(),
            tamper,
            rp_bytes: 0,
            inject: None,
            rpd: RpDecoder::new(profile, Limits::DEFAULT),
            now: 0,
            switchover: Switchover::default(),
            dirtied: None,
            at_run: None,
            held_at_run: None,
            run_end: None,
            fed: 0,
        })
    }

    fn tick(&mut self) -> Instant {
        self.now += 1;
        Instant(self.now)
    }

    /// ` (broken source: what the tamper stage altered)`, or empty.
    pub fn broken_note(&self) -> String {
        self.tamper
            .as_ref()
            .and_then(|t| t.note.as_ref())
            .map(|n| format!(" (broken source: {n})"))
            .unwrap_or_default()
    }

    /// The status of the machine.
    pub fn status(&self) -> MigrationStatus {
        self.dest.status()
    }

    /// Arms a recovery (`migrate-recover`): the next [`Player::serve`] is a recovery channel.
    pub fn recover(&mut self) -> Result<(), Fail> {
        let now = self.tick();
        self.dest
            .handle_control(now, Control::Recover)
            .map_err(|e| format!("migrate-recover on the played destination: {e}"))
    }

    /// Asks for page `page` of block `block` (a page request on the return path).
    pub fn request(&mut self, sock: &mut TcpStream, block: usize, page: u64) -> Result<(), Fail> {
        match self.dest.handle_fault(block, page * TPS) {
            FaultOutcome::Requested => {}
            o => return Err(format!("page request for block {block} page {page}: {o:?}")),
        }
        self.requests.push(Request {
            block,
            page,
            asked_at: self.dec.offset(),
            arrived_at: None,
            others: 0,
        });
        self.flush_rp(sock)
    }

    /// A page that came on a multifd connection: placed in RAM and counted as arrived on the
    /// first connection (`data` `None`: a zero page).
    pub fn place_multifd(
        &mut self,
        block: &str,
        addr: u64,
        data: Option<&[u8]>,
    ) -> Result<(), Fail> {
        let b = self
            .block_index(block.as_bytes())
            .ok_or_else(|| format!("multifd page for unknown block {block}"))?;
        let page = addr / TPS;
        if addr % TPS != 0 || page >= self.blocks[b].1 {
            return Err(format!("multifd page at {addr:#x} outside block {block}"));
        }
        let r = match data {
            Some(d) if d.len() == TPS as usize => self.mem.place_page(b, addr, d),
            Some(d) => return Err(format!("multifd page of {} bytes", d.len())),
            None => self.mem.place_zero(b, addr, TPS),
        };
        r.map_err(|e| format!("multifd page: {e}"))?;
        self.first[b].set(page);
        Ok(())
    }

    fn block_index(&self, name: &[u8]) -> Option<usize> {
        self.blocks.iter().position(|(n, _)| n.as_bytes() == name)
    }

    /// Serves one connection until the migration completes, the source closes, or `stop`
    /// says cut. The caller then shuts the socket.
    pub fn serve(&mut self, sock: &mut TcpStream, stop: &mut dyn Stop) -> Result<End, Fail> {
        let now = self.tick();
        self.dest
            .handle_channel_opened(now)
            .map_err(|e| format!("the played destination refused the connection: {e}"))?;
        self.conns += 1;
        self.dec = if self.conns == 1 {
            StreamDecoder::new(Channel::Main, *self.dec.profile(), Limits::DEFAULT)
        } else {
            self.dec.resume_from()
        };
        if let Some(t) = self.tamper.as_mut() {
            t.connection(&self.dec, self.conns);
        }
        self.eof_seen = false;
        self.bitmap_asked.fill(false);
        self.ack_written = false;
        self.bytes = 0;
        self.rp_bytes = 0;
        self.fed = 0;
        self.rpd = RpDecoder::new(*self.dec.profile(), Limits::DEFAULT);
        let _ = sock.set_read_timeout(Some(Duration::from_secs(120)));
        let mut vbuf: Vec<u8> = Vec::new();
        let mut dbuf: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut done = false;
        loop {
            let n = match sock.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if done {
                        // Completed, and the source keeps its side open: that is its choice.
                        let now = self.tick();
                        self.dest.handle_channel_closed(now);
                        self.events()?;
                        return Ok(End::Completed);
                    }
                    return Err(format!(
                        "no bytes from the source for 120 s (connection {}, offset {}, status {})",
                        self.conns,
                        self.dec.offset(),
                        self.status()
                    ));
                }
                Err(_) => 0,
            };
            let at_end = n == 0;
            let mut data = buf[..n].to_vec();
            if let Some(t) = self.tamper.as_mut() {
                let pending: Vec<(usize, u64)> = self
                    .requests
                    .iter()
                    .filter(|q| q.arrived_at.is_none())
                    .map(|q| (q.block, q.page))
                    .collect();
                data = t.push(
                    &data,
                    at_end,
                    self.chosen.as_deref(),
                    &self.blocks,
                    &pending,
                );
            }
            self.bytes += data.len() as u64;
            vbuf.extend_from_slice(&data);
            dbuf.extend_from_slice(&data);
            self.validate(&mut vbuf, at_end)?;
            self.inject_now(sock)?;
            // Up to the end of POSTCOPY_RUN first (the snapshot of SM-DISCARD-DIRTY), then the
            // rest.
            let cap = match self.run_end {
                Some(e) if self.held_at_run.is_some() && e > self.fed => {
                    ((e - self.fed) as usize).min(dbuf.len())
                }
                _ => dbuf.len(),
            };
            let mut used = self.feed(&dbuf[..cap])?;
            if cap < dbuf.len() {
                used += self.feed(&dbuf[used..])?;
            }
            dbuf.drain(..used);
            self.events()?;
            self.flush_rp(sock)?;
            if at_end {
                let now = self.tick();
                self.dest.handle_channel_closed(now);
                self.events()?;
                return Ok(if self.status() == MigrationStatus::Completed {
                    End::Completed
                } else {
                    End::Closed
                });
            }
            if !done && self.status() == MigrationStatus::Completed && self.eof_seen {
                // Done: our side closes for writing; the source closes after its last bytes
                // (the VM description after a precopy EOF), which are still read and checked.
                // A source that keeps its side open gets 5 s.
                done = true;
                let _ = sock.shutdown(Shutdown::Write);
                let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
            }
            if stop.cut_now(self, sock)? {
                let _ = sock.shutdown(Shutdown::Both);
                let now = self.tick();
                self.dest.handle_channel_closed(now);
                self.events()?;
                return Ok(End::Cut);
            }
        }
    }

    /// Hands `bytes` to the machine; takes [`Player::at_run`] once it has consumed the end of
    /// POSTCOPY_RUN (and checks the dirtied pages against it).
    fn feed(&mut self, bytes: &[u8]) -> Result<usize, Fail> {
        let now = self.tick();
        let used = self
            .dest
            .handle_stream(now, bytes, &mut self.mem)
            .map_err(|v| violation("the played destination stopped", &v))?;
        self.fed += used as u64;
        if self.run_end.is_some_and(|e| self.fed >= e) {
            if let Some(held) = self.held_at_run.take() {
                let snap = AtRun {
                    held,
                    ram: self.mem.blocks.clone(),
                };
                if let Some(d) = &self.dirtied {
                    snap.dirtied_discarded(d, &self.blocks[d.block].0)?;
                }
                self.at_run = Some(snap);
            }
        }
        Ok(used)
    }

    /// Writes [`Player::inject`]'s bytes once its point has come.
    fn inject_now(&mut self, sock: &mut TcpStream) -> Result<(), Fail> {
        let due = match &self.inject {
            Some(i) if i.at.is_none() => {
                if i.after_run {
                    self.run_seen
                } else {
                    self.first.iter().any(|b| b.count_ones() > 0)
                }
            }
            _ => false,
        };
        if !due {
            return Ok(());
        }
        // After RUN (page requests, SM-URGENT-FIRST): written only once everything the source
        // had sent is read, so that the records counted after the request are ones the source
        // sent after it was written, however long the runner was descheduled (else the next
        // turn of the loop reads what is pending, and tries again).
        if self.inject.as_ref().is_some_and(|i| i.after_run) && input_pending(sock) {
            return Ok(());
        }
        let at = self.rp_bytes;
        let asked_at = self.dec.offset();
        let i = self.inject.as_mut().expect("due");
        i.at = Some(at);
        let (bytes, pages) = (i.bytes.clone(), i.pages.clone());
        for (block, page) in pages {
            self.requests.push(Request {
                block,
                page,
                asked_at,
                arrived_at: None,
                others: 0,
            });
        }
        self.rp_bytes += bytes.len() as u64;
        sock.write_all(&bytes)
            .map_err(|e| format!("writing the injected return-path bytes: {e}"))
    }

    /// The runner's own decoding of everything complete in `vbuf`.
    fn validate(&mut self, vbuf: &mut Vec<u8>, at_end: bool) -> Result<(), Fail> {
        if at_end {
            self.dec.set_final(true);
        }
        let mut pos = 0usize;
        let recovery = self.conns > 1;
        loop {
            let at = self.dec.offset();
            match self.dec.decode(&vbuf[pos..]) {
                Ok((item, n)) => {
                    pos += n;
                    self.switchover.item(&item, at)?;
                    match &item {
                        Item::Ram(r) if r.is_page() => {
                            let name = r.block(self.dec.ram()).map(<[u8]>::to_vec);
                            let Some(b) = name.as_deref().and_then(|x| self.block_index(x)) else {
                                return Err(format!(
                                    "page record at offset {at} names a block the vector does not have ({})",
                                    String::from_utf8_lossy(name.as_deref().unwrap_or(b"?"))
                                ));
                            };
                            let page = r.addr / TPS;
                            if page >= self.blocks[b].1 {
                                return Err(format!(
                                    "page record at offset {at}: page {page} beyond block {}",
                                    self.blocks[b].0
                                ));
                            }
                            if recovery && !self.ack_written {
                                return Err(format!(
                                    "SM-RECOVER-BITMAP-ALL: page record ({} page {page}) at offset {at} of the recovery connection before the runner's RESUME_ACK",
                                    self.blocks[b].0
                                ));
                            }
                            if recovery {
                                if self.resent[b].test(page) {
                                    self.resent_twice.push((b, page));
                                }
                                self.resent[b].set(page);
                            } else {
                                self.first[b].set(page);
                            }
                            let asked =
                                self.requests.iter().any(|q| q.block == b && q.page == page);
                            for q in self.requests.iter_mut() {
                                if q.block == b && q.page == page && q.arrived_at.is_none() {
                                    q.arrived_at = Some(at);
                                } else if !asked && q.arrived_at.is_none() {
                                    q.others += 1;
                                }
                            }
                        }
                        Item::Ram(r) => {
                            if let RamBody::MemSize(list) = &r.body {
                                let got: Vec<(String, u64)> = list
                                    .iter()
                                    .map(|b| {
                                        (
                                            String::from_utf8_lossy(b.name).into_owned(),
                                            b.used_length.div_ceil(TPS),
                                        )
                                    })
                                    .collect();
                                if got != self.blocks {
                                    return Err(format!(
                                        "MEM_SIZE at offset {at} announces blocks {got:?}, the vector's machine has {:?} (name, pages)",
                                        self.blocks
                                    ));
                                }
                            }
                        }
                        Item::Command(Command::PostcopyRun) => {
                            self.run_seen = true;
                            // Snapshotted only when the runner dirtied pages (the RAM of
                            // a capture's replay is large and static).
                            if !recovery && self.run_end.is_none() && self.dirtied.is_some() {
                                self.run_end = Some(self.dec.offset());
                                self.held_at_run = Some(self.first.clone());
                            }
                        }
                        Item::Command(Command::RecvBitmap { name }) if recovery => {
                            if let Some(b) = self.block_index(name) {
                                self.bitmap_asked[b] = true;
                            }
                        }
                        Item::Command(Command::PostcopyResume) if recovery => {
                            if let Some(b) = self.bitmap_asked.iter().position(|&x| !x) {
                                return Err(format!(
                                    "SM-RECOVER-BITMAP-ALL: POSTCOPY_RESUME at offset {at} of the recovery connection, but no RECV_BITMAP for block {} before it",
                                    self.blocks[b].0
                                ));
                            }
                        }
                        Item::Command(Command::RamDiscard(d)) if !recovery => {
                            if let Some(b) = self.block_index(d.name) {
                                for (start, len) in d.ranges() {
                                    let (p0, p1) = (start / TPS, (start + len).div_ceil(TPS));
                                    for p in p0..p1.min(self.blocks[b].1) {
                                        self.first[b].clear(p);
                                    }
                                }
                            }
                        }
                        Item::Eof => self.eof_seen = true,
                        _ => {}
                    }
                }
                // A record not complete yet (or cut: the rest never comes).
                Err(WireError::Incomplete { .. }) => break,
                Err(WireError::Invalid(v)) => {
                    let m = violation(&format!("source stream (connection {})", self.conns), &v);
                    return Err(switchover_to_72(&v, *self.dec.profile(), &m).unwrap_or(m));
                }
            }
        }
        vbuf.drain(..pos);
        Ok(())
    }

    fn events(&mut self) -> Result<(), Fail> {
        while let Some(e) = self.dest.poll_event() {
            match e {
                Event::Error {
                    channel,
                    violation: v,
                } => {
                    return Err(violation(
                        &format!("the played destination ({channel:?})"),
                        &v,
                    ))
                }
                Event::IllegalTransition(t) => {
                    return Err(format!("the played destination: {t:?}"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes the machine's return-path bytes, with each RECV_BITMAP replaced by the chosen one.
    fn flush_rp(&mut self, sock: &mut TcpStream) -> Result<(), Fail> {
        let mut out = Vec::new();
        if self.dest.poll_transmit(&mut out) == 0 {
            return Ok(());
        }
        let sizes: Vec<(String, u64)> = self
            .blocks
            .iter()
            .map(|(n, p)| (n.clone(), PageBitmap::wire_size(*p)))
            .collect();
        let expect = |name: &[u8]| {
            sizes
                .iter()
                .find(|(n, _)| n.as_bytes() == name)
                .map(|x| x.1)
        };
        let mut pos = 0;
        let mut wire = Vec::with_capacity(out.len());
        while pos < out.len() {
            let (m, n) = self
                .rpd
                .decode(&out[pos..], &expect)
                .map_err(|e| format!("the played destination's return path: {e:?}"))?;
            self.rp_types.push(m.ty().0);
            match m {
                RpMessage::RecvBitmap { name, .. } => {
                    let b = self
                        .block_index(name)
                        .ok_or_else(|| "RECV_BITMAP for an unknown block".to_string())?;
                    let chosen = self
                        .chosen
                        .as_ref()
                        .ok_or_else(|| "RECV_BITMAP before a bitmap was chosen".to_string())?;
                    let bytes = chosen[b].to_le_vec();
                    RpMessage::RecvBitmap {
                        name,
                        bitmap: &bytes,
                    }
                    .encode(&mut wire);
                    self.bitmaps_sent.push(self.blocks[b].0.clone());
                }
                RpMessage::ResumeAck(_) => {
                    self.ack_written = true;
                    wire.extend_from_slice(&out[pos..pos + n]);
                }
                _ => wire.extend_from_slice(&out[pos..pos + n]),
            }
            pos += n;
        }
        self.rp_bytes += wire.len() as u64;
        sock.write_all(&wire)
            .map_err(|e| format!("writing the return path: {e}"))
    }
}
