//! The fault-reader thread: userfaultfd page-fault messages to [`Fault`]s on a channel.
//!
//! The thread sleeps in `poll(2)` on the userfaultfd and on an eventfd used only to stop it.
//! For each page-fault message it finds the block and page-aligned offset, then, under the
//! pending-fault lock:
//! * a page recorded as a lazy zero page is zero-filled here (`UFFDIO_ZEROPAGE`, waking the
//!   waiter) and not forwarded;
//! * a page already received (its fill raced the fault) is woken and not forwarded;
//! * a page with a forwarded fault still pending is not forwarded again (several threads may
//!   fault on one page);
//! * otherwise the fault is recorded as pending with the time it was read and sent to the driver.
//!
//! [`FaultSource`] applies the same rules without a thread: a driver that polls the userfaultfd
//! itself (next to its sockets) reads faults straight into its own loop, with no thread hop
//! between the kernel's message and the page request.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::sys::{UffdMsg, EVENT_PAGEFAULT, PAGEFAULT_FLAG_WRITE};
use super::Shared;
use crate::memory::PAGE_SIZE;

/// A guest access to a page that has not been placed: the driver should request it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Block index in the [`crate::memory::GuestRam`].
    pub block: usize,
    /// Page-aligned offset in the block.
    pub offset: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// When the reader thread read the fault message.
    pub at: Instant,
}

/// Stops and joins the reader thread.
pub(crate) struct ReaderHandle {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl ReaderHandle {
    pub(crate) fn stop(mut self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn spawn(shared: Arc<Shared>) -> io::Result<(ReaderHandle, Receiver<Fault>)> {
    // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `efd` is a fresh descriptor owned by nobody else.
    let stop = unsafe { OwnedFd::from_raw_fd(efd) };
    let (tx, rx) = channel();
    let thread = std::thread::Builder::new()
        .name("uffd-faults".into())
        .spawn(move || run(shared, efd, tx))?;
    Ok((
        ReaderHandle {
            stop,
            thread: Some(thread),
        },
        rx,
    ))
}

fn run(sh: Arc<Shared>, stop_fd: i32, tx: Sender<Fault>) {
    let mut msgs = [UffdMsg::default(); 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sh.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(
                "uffd fault reader: poll failed: {}",
                io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            tracing::warn!("uffd fault reader: descriptor closed");
            return;
        }
        let n = match sh.fd.read_msgs(&mut msgs) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("uffd fault reader: read failed: {e}");
                return;
            }
        };
        let at = Instant::now();
        for m in &msgs[..n] {
            if m.event != EVENT_PAGEFAULT {
                tracing::debug!("uffd fault reader: ignoring event {:#x}", m.event);
                continue;
            }
            handle(&sh, m, at, &mut |f| {
                let _ = tx.send(f);
            });
        }
    }
}

fn handle(sh: &Shared, m: &UffdMsg, at: Instant, out: &mut dyn FnMut(Fault)) {
    let addr = (m.address as usize) & !(PAGE_SIZE - 1);
    let Some((block, offset)) = sh.ram.locate(addr) else {
        tracing::warn!("uffd fault at {addr:#x} outside every block");
        return;
    };
    let page = offset / PAGE_SIZE as u64;
    let st = &sh.blocks[block];
    let mut pending = sh.pending.lock().unwrap_or_else(|e| e.into_inner());
    if st.lazy_zero.test(page) {
        drop(pending);
        sh.counters
            .faults_resolved_locally
            .fetch_add(1, Ordering::Relaxed);
        if let Err(e) = sh.fill(block, offset, PAGE_SIZE, None) {
            tracing::error!("uffd fault reader: zero-fill of lazy page failed: {e}");
        }
        return;
    }
    if st.received.test(page) {
        drop(pending);
        sh.counters
            .faults_resolved_locally
            .fetch_add(1, Ordering::Relaxed);
        let _ = sh.fd.wake(addr as *mut u8, PAGE_SIZE);
        return;
    }
    if pending.contains_key(&(block, page)) {
        return;
    }
    pending.insert((block, page), at);
    sh.pending_count.store(pending.len(), Ordering::SeqCst);
    drop(pending);
    sh.counters.faults_forwarded.fetch_add(1, Ordering::Relaxed);
    out(Fault {
        block,
        offset,
        write: m.flags & PAGEFAULT_FLAG_WRITE != 0,
        at,
    });
}

/// Faults read by the caller's thread (see the module doc): poll its descriptor for
/// readability, then [`FaultSource::read`].
pub struct FaultSource {
    shared: Arc<Shared>,
    msgs: Vec<UffdMsg>,
}

impl FaultSource {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            msgs: vec![UffdMsg::default(); 64],
        }
    }

    /// Reads every waiting fault message (never blocks) and appends the faults to forward to
    /// `out`, after the same local resolution as the reader thread (lazy zero pages, pages
    /// already received, faults already forwarded).
    pub fn read(&mut self, out: &mut Vec<Fault>) -> io::Result<()> {
        loop {
            let n = self.shared.fd.read_msgs(&mut self.msgs)?;
            if n == 0 {
                return Ok(());
            }
            let at = Instant::now();
            for m in &self.msgs[..n] {
                if m.event == EVENT_PAGEFAULT {
                    handle(&self.shared, m, at, &mut |f| out.push(f));
                }
            }
            if n < self.msgs.len() {
                return Ok(());
            }
        }
    }
}

impl AsFd for FaultSource {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.fd.as_fd()
    }
}
