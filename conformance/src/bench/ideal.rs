//! The idealised pipeline: the physical ceiling of moving guest RAM over one loopback TCP
//! stream into userfaultfd-registered memory, with no migration protocol at all.
//!
//! * [`transfer`]: a sender thread walks the source block page by page, skips zero pages with
//!   the same memcmp check the qmig source uses, and writes an 8-byte frame header (page offset,
//!   bit 0 = zero page) plus the page; the receiver reads each run of contiguous data pages
//!   straight into a staging buffer and places it with one `UFFDIO_COPY` per run (at most
//!   [`PlaceConfig::max_batch`] bytes), and records zero runs as received without mapping
//!   anything (`UffdRam::mark_zero`, what qmig-dst does).
//! * [`fault_round_trip`]: the raw postcopy page-request round trip: a thread touches missing
//!   pages of the registered block; the fault reader forwards each fault, a forwarder writes
//!   the page offset on a request socket, the source answers on the page stream (urgent pages
//!   first), the receiver places the page (`UFFDIO_COPY`, which wakes the thread). Measured by
//!   the touching thread from the access to its return, with the page stream idle or saturated
//!   by background pages (cycling over the lower half of the block for as long as the touches,
//!   in the upper half, last; pages already received are read and dropped).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmig_host::fill::{fill, Content};
use qmig_host::memory::{GuestRam, MapOptions, RamBlock, PAGE_SIZE};
use qmig_host::uffd::{PlaceConfig, UffdRam};

use super::cpu::thread_seconds;

const P: u64 = PAGE_SIZE as u64;
/// Frame header bit: the page is all zero and no payload follows.
const ZERO: u64 = 1;
/// Frame header bit: the page answers a request.
const URGENT: u64 = 2;
/// Frame header value that ends the stream.
const END: u64 = u64::MAX;

/// What one ideal transfer measured.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    /// Wall time from the sender's connect to the last page placed, seconds.
    pub seconds: f64,
    /// CPU seconds of the sender thread.
    pub src_cpu: f64,
    /// CPU seconds of the receiver thread.
    pub dst_cpu: f64,
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Whether every byte of `page` is zero: the check the qmig source applies (memcmp against a
/// static zero buffer).
fn is_zero(page: &[u8]) -> bool {
    static ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    page == &ZEROS[..page.len()]
}

/// A filled source block of `size` bytes.
pub fn source_ram(size: u64, content: Content) -> io::Result<Arc<GuestRam>> {
    let ram = GuestRam::new(&[("ram", size)], MapOptions::default()).map_err(io_err)?;
    fill(&ram.blocks()[0], content).map_err(io_err)?;
    Ok(Arc::new(ram))
}

/// Receives frames into `uffd`, batching contiguous data pages into one copy.
struct Placer<'a> {
    uffd: &'a UffdRam,
    buf: Vec<u8>,
    start: u64,
    zero: Option<(u64, u64)>,
    cap: usize,
}

impl<'a> Placer<'a> {
    fn new(uffd: &'a UffdRam) -> Self {
        let cap = PlaceConfig::default().max_batch;
        Placer {
            uffd,
            buf: Vec::with_capacity(cap),
            start: 0,
            zero: None,
            cap,
        }
    }

    fn flush_data(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.uffd.place(0, self.start, &self.buf).map_err(io_err)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> io::Result<()> {
        if let Some((s, l)) = self.zero.take() {
            self.uffd.mark_zero(0, s, l).map_err(io_err)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_data()?;
        self.flush_zero()
    }

    /// Takes one frame whose header is `h`; reads its payload from `r`.
    fn frame(&mut self, h: u64, r: &mut impl Read) -> io::Result<()> {
        let off = h & !(P - 1);
        if h & ZERO != 0 {
            self.flush_data()?;
            match &mut self.zero {
                Some((s, l)) if *s + *l == off => *l += P,
                _ => {
                    self.flush_zero()?;
                    self.zero = Some((off, P));
                }
            }
            return Ok(());
        }
        self.flush_zero()?;
        let urgent = h & URGENT != 0;
        if !urgent && self.uffd.is_received(0, off) {
            // A background page sent again (the saturating stream cycles): read and drop.
            self.flush_data()?;
            let mut sink = [0u8; PAGE_SIZE];
            return r.read_exact(&mut sink);
        }
        if urgent || self.start + self.buf.len() as u64 != off || self.buf.len() >= self.cap {
            self.flush_data()?;
            self.start = off;
        }
        let at = self.buf.len();
        self.buf.resize(at + PAGE_SIZE, 0);
        r.read_exact(&mut self.buf[at..])?;
        if urgent || self.uffd.pending_faults() > 0 {
            self.flush_data()?;
        }
        Ok(())
    }
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn send_page(w: &mut impl Write, block: &RamBlock, off: u64, flags: u64) -> io::Result<()> {
    // SAFETY-free page view: copy through the block's checked reader.
    let mut page = [0u8; PAGE_SIZE];
    block.read(off, &mut page).map_err(io_err)?;
    if is_zero(&page) {
        w.write_all(&(off | ZERO | flags).to_le_bytes())
    } else {
        w.write_all(&(off | flags).to_le_bytes())?;
        w.write_all(&page)
    }
}

/// Moves `src` (one block) into a fresh userfaultfd-registered block over loopback TCP and
/// checks a sample of the placed pages. See the module doc.
pub fn transfer(src: &Arc<GuestRam>) -> io::Result<Transfer> {
    let size = src.blocks()[0].len();
    let dst = Arc::new(GuestRam::new(&[("ram", size)], MapOptions::default()).map_err(io_err)?);
    let (uffd, _faults) = UffdRam::register(dst.clone(), PlaceConfig::default()).map_err(io_err)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let s = src.clone();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || -> io::Result<f64> {
        let c0 = thread_seconds();
        let sock = TcpStream::connect(addr)?;
        sock.set_nodelay(true)?;
        let mut w = BufWriter::with_capacity(1 << 20, &sock);
        let b = &s.blocks()[0];
        for p in 0..b.pages() {
            send_page(&mut w, b, p * P, 0)?;
        }
        w.write_all(&END.to_le_bytes())?;
        w.flush()?;
        Ok(thread_seconds() - c0)
    });
    let c0 = thread_seconds();
    let (sock, _) = listener.accept()?;
    let mut r = BufReader::with_capacity(1 << 20, sock);
    let mut placer = Placer::new(&uffd);
    loop {
        let h = read_u64(&mut r)?;
        if h == END {
            break;
        }
        placer.frame(h, &mut r)?;
    }
    placer.flush()?;
    let seconds = t0.elapsed().as_secs_f64();
    let dst_cpu = thread_seconds() - c0;
    let src_cpu = sender
        .join()
        .map_err(|_| io_err("ideal sender panicked"))??;
    check_sample(src, &dst)?;
    Ok(Transfer {
        seconds,
        src_cpu,
        dst_cpu,
    })
}

/// Compares every 97th page (and the last) of the two blocks.
fn check_sample(src: &GuestRam, dst: &GuestRam) -> io::Result<()> {
    let (a, b) = (&src.blocks()[0], &dst.blocks()[0]);
    let mut x = [0u8; PAGE_SIZE];
    let mut y = [0u8; PAGE_SIZE];
    let pages = a.pages();
    for p in (0..pages).step_by(97).chain([pages - 1]) {
        a.read(p * P, &mut x).map_err(io_err)?;
        b.read(p * P, &mut y).map_err(io_err)?;
        if x != y {
            return Err(io_err(format!("ideal pipeline: page {p} differs")));
        }
    }
    Ok(())
}

/// Fault round-trip latencies of one run.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    /// Each touch's duration.
    pub samples: Vec<Duration>,
    /// Background pages the source streamed meanwhile (0 when idle).
    pub background_pages: u64,
    /// Fault read → placement of the faults the fault reader forwarded (the same span
    /// qmig-dst reports as `x-qmig.fault-latency-us`).
    pub fault_to_place: Vec<Duration>,
}

/// Measures `touches` raw page-request round trips on a fresh registered block copy of `src`,
/// with the page stream idle or saturated by a background stream. See the module doc.
pub fn fault_round_trip(
    src: &Arc<GuestRam>,
    touches: usize,
    saturate: bool,
) -> io::Result<RoundTrips> {
    let block0 = &src.blocks()[0];
    let pages = block0.pages();
    let dst =
        Arc::new(GuestRam::new(&[("ram", block0.len())], MapOptions::default()).map_err(io_err)?);
    let (uffd, faults) = UffdRam::register(dst.clone(), PlaceConfig::default()).map_err(io_err)?;
    let page_l = TcpListener::bind("127.0.0.1:0")?;
    let req_l = TcpListener::bind("127.0.0.1:0")?;
    let (page_addr, req_addr) = (page_l.local_addr()?, req_l.local_addr()?);
    let stop = Arc::new(AtomicBool::new(false));

    // Source: requests arrive on their own socket; a reader thread queues them; the sender
    // answers them before any background page.
    let s = src.clone();
    let stop_s = stop.clone();
    let source = std::thread::spawn(move || -> io::Result<u64> {
        let page_sock = TcpStream::connect(page_addr)?;
        page_sock.set_nodelay(true)?;
        let req_sock = TcpStream::connect(req_addr)?;
        req_sock.set_nodelay(true)?;
        let (qtx, qrx) = mpsc::channel::<u64>();
        let req_reader = std::thread::spawn(move || {
            let mut r = BufReader::new(req_sock);
            while let Ok(off) = read_u64(&mut r) {
                if qtx.send(off).is_err() {
                    break;
                }
            }
        });
        let b = &s.blocks()[0];
        let mut w = BufWriter::with_capacity(256 << 10, &page_sock);
        let mut next = 0u64;
        let mut background = 0u64;
        loop {
            if stop_s.load(Ordering::Relaxed) {
                break;
            }
            let mut urgent = false;
            while let Ok(off) = qrx.try_recv() {
                send_page(&mut w, b, off, URGENT)?;
                urgent = true;
            }
            if urgent {
                w.flush()?;
            }
            if saturate {
                // Background pages cycle over the lower half (the touched pages are in the
                // upper half), so the stream stays saturated for as long as the touches last.
                send_page(&mut w, b, next * P, 0)?;
                next = (next + 1) % (pages / 2).max(1);
                background += 1;
            } else {
                w.flush()?;
                match qrx.recv_timeout(Duration::from_millis(50)) {
                    Ok(off) => {
                        send_page(&mut w, b, off, URGENT)?;
                        w.flush()?;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        w.write_all(&END.to_le_bytes())?;
        w.flush()?;
        drop(w);
        let _ = page_sock.shutdown(Shutdown::Write);
        // The request reader ends when the forwarder closes the request socket, which happens
        // only after the receiver is done; it is not joined here.
        drop(req_reader);
        Ok(background)
    });

    let (page_sock, _) = page_l.accept()?;
    let (req_sock, _) = req_l.accept()?;
    // Forwarder: faults to requests.
    let forwarder = std::thread::spawn(move || {
        let mut req = &req_sock;
        for f in faults.iter() {
            if req.write_all(&f.offset.to_le_bytes()).is_err() {
                break;
            }
        }
        let _ = req_sock.shutdown(Shutdown::Both);
    });
    // Toucher: pages spread over the upper half (the background stream, sequential from the
    // start, reaches them last), each touched once.
    let d = dst.clone();
    let toucher = std::thread::spawn(move || -> io::Result<Vec<Duration>> {
        let b = &d.blocks()[0];
        let mut out = Vec::with_capacity(touches);
        let upper = pages / 2;
        let stride = (upper / touches.max(1) as u64).max(1);
        let mut x = [0u8; 8];
        for i in 0..touches as u64 {
            let p = pages - 1 - (i * stride) % upper;
            let t = Instant::now();
            // black_box: the bytes are never used, and the copy must not be optimised away.
            b.read(p * P, std::hint::black_box(&mut x))
                .map_err(io_err)?;
            std::hint::black_box(&x);
            out.push(t.elapsed());
        }
        Ok(out)
    });
    let uffd = Arc::new(uffd);
    let u = uffd.clone();
    let receiver = std::thread::spawn(move || -> io::Result<()> {
        let mut r = BufReader::with_capacity(256 << 10, page_sock);
        let mut placer = Placer::new(&u);
        loop {
            let h = read_u64(&mut r)?;
            if h == END {
                break;
            }
            placer.frame(h, &mut r)?;
            if r.buffer().is_empty() {
                placer.flush()?;
            }
        }
        placer.flush()
    });
    let samples = toucher.join().map_err(|_| io_err("toucher panicked"))??;
    stop.store(true, Ordering::Relaxed);
    let background = source.join().map_err(|_| io_err("source panicked"))??;
    receiver.join().map_err(|_| io_err("receiver panicked"))??;
    let fault_to_place = uffd.take_fault_latencies();
    // Ends the fault reader (and with it the forwarder's channel).
    drop(uffd);
    let _ = forwarder.join();
    Ok(RoundTrips {
        samples,
        background_pages: background,
        fault_to_place,
    })
}
