//! Multifd connections of qmig-dst: telling them apart from the main channel, reading them and
//! feeding them to the machine.
//!
//! This module owns the multifd side of the migration thread: how many connections the
//! capability `multifd` and the parameter `multifd-channels` ask for ([`channels`]), how an
//! accepted connection is recognised (its first four bytes are the multifd magic: peeked, never
//! consumed, once the main channel is open), and [`Channels`]: each connection with its receive
//! buffer, fed to `Destination::handle_multifd` with a [`Placer`] over the same userfaultfd
//! memory as the main channel. Which side may consume is the machine's decision
//! (`main_waits_for_multifd`, `multifd_waits`); a connection that must wait is not polled for
//! reading, so no buffer grows while it waits.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, BorrowedFd};

use qmig_host::transport::{Connection, Socket};
use qmig_protocol::codes::MULTIFD_MAGIC;
use qmig_protocol::error::Violation;
use qmig_protocol::machine::{Destination, Instant};

use crate::memory::Placer;
use crate::state::Shared;

/// Bytes read per `read` call on a multifd connection.
const CHUNK: usize = 1 << 20;
/// Largest unconsumed tail kept: beyond one packet (1344 bytes + 512 KiB of pages).
const MAX_BUFFERED: usize = 4 << 20;

/// The number of multifd connections the migration expects: `None` without capability
/// `multifd`, else `multifd-channels` (QEMU's default 2).
pub fn channels(sh: &Shared) -> Option<u8> {
    let v = sh.view();
    if !v.caps.get("multifd").copied().unwrap_or(false) {
        return None;
    }
    let n = v
        .params
        .get("multifd-channels")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(2);
    u8::try_from(n).ok().filter(|n| *n > 0)
}

/// The socket of a connection, for `poll` and `recv`.
pub fn sock_fd(c: &Connection) -> BorrowedFd<'_> {
    match c.socket() {
        Socket::Tcp(s) => s.as_fd(),
        Socket::Unix(s) => s.as_fd(),
    }
}

/// Waits (up to the socket's read timeout) until the connection's first four bytes are there,
/// without consuming them; true if they are the multifd magic. One blocking `MSG_PEEK |
/// MSG_WAITALL` receive: the kernel wakes it when all four bytes are queued (or at the timeout,
/// end of stream or an error, all of which mean "not a multifd connection we can use yet").
pub fn peek_is_multifd(c: &Connection) -> bool {
    let mut b = [0u8; 4];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::WAITALL;
    loop {
        match rustix::net::recv(sock_fd(c), &mut b, flags) {
            Ok(4) => return u32::from_be_bytes(b) == MULTIFD_MAGIC,
            Err(rustix::io::Errno::INTR) => {}
            Ok(_) | Err(_) => return false,
        }
    }
}

/// Whether the connection's first four bytes, already received, are the multifd magic (one
/// non-blocking peek: the migration thread never waits on a connection here).
pub fn is_multifd_now(c: &Connection) -> bool {
    let mut b = [0u8; 4];
    let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
    matches!(rustix::net::recv(sock_fd(c), &mut b, flags), Ok(4))
        && u32::from_be_bytes(b) == MULTIFD_MAGIC
}

struct Chan {
    conn: Connection,
    buf: Vec<u8>,
    pos: usize,
}

/// The accepted multifd connections, in accept order (the machine's connection index).
#[derive(Default)]
pub struct Channels {
    conns: Vec<Option<Chan>>,
}

impl Channels {
    /// Adds an accepted connection; returns its index.
    pub fn add(&mut self, conn: Connection) -> usize {
        self.conns.push(Some(Chan {
            conn,
            buf: Vec::new(),
            pos: 0,
        }));
        self.conns.len() - 1
    }

    /// Drops every connection (failure, cancel, completion).
    pub fn clear(&mut self) {
        self.conns.clear();
    }

    /// The sockets to poll for reading: connections the machine lets consume, or with nothing
    /// buffered. Each with its index.
    pub fn readable_fds<'a>(&'a self, m: Option<&Destination>) -> Vec<(usize, BorrowedFd<'a>)> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                let waits = m.is_some_and(|m| m.multifd_waits(i));
                (!waits || c.pos == c.buf.len()).then(|| (i, sock_fd(&c.conn)))
            })
            .collect()
    }

    /// Reads what connection `i` has and feeds it. `Ok(true)` if the machine consumed bytes.
    /// A closed connection is dropped and reported to the machine, which fails the migration
    /// if it ended mid-packet or before delivering what the main channel waits for.
    pub fn read(
        &mut self,
        i: usize,
        m: &mut Destination,
        sh: &Shared,
        now: Instant,
    ) -> Result<bool, Violation> {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return Ok(false);
        };
        let len = c.buf.len();
        c.buf.resize(len + CHUNK, 0);
        let n = match c.conn.read(&mut c.buf[len..]) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                c.buf.truncate(len);
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!("multifd connection {i}: read failed: {e}");
                0
            }
        };
        c.buf.truncate(len + n);
        if n == 0 {
            tracing::info!("multifd connection {i} closed");
            let left = c.buf.len() - c.pos;
            self.conns[i] = None;
            // The machine decides whether the migration needed more from it.
            return match m.handle_multifd_closed(now, i, left) {
                Some(v) => Err(v),
                None => Ok(false),
            };
        }
        sh.recorder.counters.add_bytes(n as u64);
        self.feed(i, m, sh, now)
    }

    /// Feeds connection `i`'s buffered bytes. `Ok(true)` if any were consumed.
    pub fn feed(
        &mut self,
        i: usize,
        m: &mut Destination,
        sh: &Shared,
        now: Instant,
    ) -> Result<bool, Violation> {
        let Some(Some(c)) = self.conns.get_mut(i) else {
            return Ok(false);
        };
        if c.pos == c.buf.len() {
            return Ok(false);
        }
        let uffd = sh.uffd.clone();
        let mut placer = Placer::new(&uffd);
        let r = m.handle_multifd(now, i, &c.buf[c.pos..], &mut placer);
        if let Err(e) = placer.finish() {
            tracing::error!("placing staged pages failed: {e}");
            sh.view().error_desc = Some(format!("guest memory: {e}"));
            let _ = m.handle_control(now, qmig_protocol::machine::Control::Cancel);
        }
        let n = match r {
            Ok(n) => n,
            Err(v) => {
                tracing::error!("multifd connection {i} rejected: {v}");
                self.conns[i] = None;
                return Err(v);
            }
        };
        c.pos += n;
        if c.pos == c.buf.len() {
            c.buf.clear();
            c.pos = 0;
        } else if c.pos > c.buf.len() / 2 {
            c.buf.drain(..c.pos);
            c.pos = 0;
        }
        if c.buf.len() > MAX_BUFFERED {
            tracing::error!("multifd connection {i}: an item beyond {MAX_BUFFERED} bytes");
            self.conns[i] = None;
        }
        Ok(n > 0)
    }

    /// Feeds every connection's buffered bytes; true if any were consumed.
    pub fn feed_all(&mut self, m: &mut Destination, sh: &Shared, now: Instant) -> bool {
        let mut any = false;
        for i in 0..self.conns.len() {
            // A violation is already the machine's failure (error-desc through its events).
            any |= self.feed(i, m, sh, now).unwrap_or(false);
        }
        any
    }
}
