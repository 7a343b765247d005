//! Requests into the migration thread, and the eventfd that wakes it.
//!
//! This module owns [`Ctl`] (what the QMP thread and the accept threads ask the migration
//! thread to do), [`Waker`] (an eventfd the migration thread polls next to its sockets), and
//! [`CtlSender`], which queues a request and wakes the thread in one call. Requests that need
//! an answer carry a one-shot reply channel; the migration thread never blocks on the network
//! or on guest memory, so a QMP handler waiting for that answer waits only for one loop turn.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use qmig_host::transport::{Connection, Listener};
use rustix::event::{eventfd, EventfdFlags};
use serde_json::Value;

/// A reply channel for a request.
pub type Reply<T> = Sender<Result<T, String>>;

/// What the migration thread is asked to do.
pub enum Ctl {
    /// `migrate-incoming`: accept the main channel on this listener.
    Incoming(Listener, Reply<()>),
    /// `migrate-recover`: accept a recovery channel on this listener.
    Recover(Listener, Reply<()>),
    /// `migrate-pause`: drop the channel as a network failure would.
    Pause(Reply<()>),
    /// `migrate_cancel`.
    Cancel(Reply<()>),
    /// `x-qmig-dump-devices`: the device sections as JSON.
    DumpDevices(Reply<Value>),
    /// A connection was accepted on the listener of `Incoming` or `Recover`.
    Accepted(Connection),
    /// Stop the thread (process exit).
    Quit,
}

/// An eventfd: written by any thread, polled and drained by the migration thread.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new, unsignalled eventfd (non-blocking, close-on-exec).
    pub fn new() -> io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Waker { fd })
    }

    /// Signals the eventfd.
    pub fn wake(&self) {
        // EAGAIN only when the counter is about to overflow: it is signalled then anyway.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears the signal.
    pub fn drain(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut b);
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The sending side: queue a [`Ctl`] and wake the migration thread.
#[derive(Clone)]
pub struct CtlSender {
    tx: Sender<Ctl>,
    waker: Arc<Waker>,
}

/// How long a QMP command waits for the migration thread's answer (a hang guard only).
const REPLY_GUARD: Duration = Duration::from_secs(30);

impl CtlSender {
    /// A sender and the receiving end for the migration thread.
    pub fn new(waker: Arc<Waker>) -> (Self, Receiver<Ctl>) {
        let (tx, rx) = mpsc::channel();
        (CtlSender { tx, waker }, rx)
    }

    /// Queues `ctl` and wakes the thread; false if the thread is gone.
    pub fn send(&self, ctl: Ctl) -> bool {
        let ok = self.tx.send(ctl).is_ok();
        self.waker.wake();
        ok
    }

    /// Sends the request built by `make` and waits for its reply.
    pub fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Ctl) -> Result<T, String> {
        let (tx, rx) = mpsc::channel();
        if !self.send(make(tx)) {
            return Err("the migration thread has stopped".into());
        }
        rx.recv_timeout(REPLY_GUARD)
            .map_err(|_| "the migration thread did not answer".to_string())?
    }
}
