//! Recording TCP proxy on loopback with a cut switch.
//!
//! [`Proxy::start`] listens on `127.0.0.1:0` and forwards every accepted
//! connection to a target, recording each direction of each connection
//! exactly as the receiving side got it. [`Proxy::cut`] (or a cut armed at a
//! byte offset with [`Proxy::arm_cut`]) shuts both sockets of a connection
//! down mid-stream: the receiver sees EOF, the sender a dead peer. Waiting
//! for traffic is event-driven ([`Proxy::wait_forwarded`], condition variable).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source (the side that connected) to destination (the target).
    SrcToDst,
    /// Destination back to source (the return path).
    DstToSrc,
}

/// What one direction of one connection carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes delivered to the receiver, in order.
    pub bytes: Vec<u8>,
    /// Bytes read from the sender but not delivered because of a cut.
    pub dropped: u64,
    /// The sender closed (or the cut closed) this direction.
    pub eof: bool,
}

/// Everything recorded for one accepted connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recording {
    /// Source to destination.
    pub s2d: Flow,
    /// Destination to source.
    pub d2s: Flow,
    /// Whether the connection was cut.
    pub cut: bool,
    /// Why it was cut.
    pub cut_reason: Option<String>,
}

impl Recording {
    fn flow(&mut self, d: Dir) -> &mut Flow {
        match d {
            Dir::SrcToDst => &mut self.s2d,
            Dir::DstToSrc => &mut self.d2s,
        }
    }
}

struct Conn {
    rec: Recording,
    sockets: Option<(TcpStream, TcpStream)>,
    cut_at: Option<u64>,
}

impl Conn {
    fn cut(&mut self, reason: String) {
        if let Some((a, b)) = self.sockets.take() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        if !self.rec.cut {
            self.rec.cut = true;
            self.rec.cut_reason = Some(reason);
        }
    }
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    /// Cut offset to apply to the next accepted connection (index, offset).
    pending_cut: Option<(usize, u64)>,
    accept_error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running proxy. Dropping it closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `target`.
    pub fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, target, sh))?;
        Ok(Proxy {
            addr,
            target,
            shared,
            accept: Some(accept),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where connections are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Number of connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Arms a cut of connection `conn` (accepted or not yet) when its
    /// source-to-destination direction has delivered exactly `offset` bytes.
    pub fn arm_cut(&self, conn: usize, offset: u64) {
        let mut st = self.shared.lock();
        if let Some(c) = st.conns.get_mut(conn) {
            c.cut_at = Some(offset);
            if c.rec.s2d.bytes.len() as u64 >= offset {
                c.cut(format!("src2dst reached byte offset {offset}"));
            }
        } else {
            st.pending_cut = Some((conn, offset));
        }
        self.shared.cv.notify_all();
    }

    /// Cuts every open connection now.
    pub fn cut(&self) {
        let mut st = self.shared.lock();
        for c in st.conns.iter_mut().filter(|c| c.sockets.is_some()) {
            let at = c.rec.s2d.bytes.len();
            c.cut(format!("cut by the harness at src2dst byte offset {at}"));
        }
        self.shared.cv.notify_all();
    }

    /// Bytes delivered so far on connection `conn`: (source to destination,
    /// destination to source); zeros if it is not accepted yet.
    pub fn bytes_forwarded(&self, conn: usize) -> (u64, u64) {
        let st = self.shared.lock();
        st.conns
            .get(conn)
            .map(|c| (c.rec.s2d.bytes.len() as u64, c.rec.d2s.bytes.len() as u64))
            .unwrap_or((0, 0))
    }

    /// Waits until connection `conn` has delivered at least `at_least` bytes
    /// in direction `dir`; returns the count. `timeout` is a failure guard.
    pub fn wait_forwarded(
        &self,
        conn: usize,
        dir: Dir,
        at_least: u64,
        timeout: Duration,
    ) -> io::Result<u64> {
        self.wait(timeout, |st| {
            let c = st.conns.get(conn)?;
            let f = match dir {
                Dir::SrcToDst => &c.rec.s2d,
                Dir::DstToSrc => &c.rec.d2s,
            };
            let n = f.bytes.len() as u64;
            if n >= at_least {
                Some(Ok(n))
            } else if f.eof || c.rec.cut {
                Some(Err(io::Error::other(format!(
                    "connection {conn} {dir:?} ended at {n} bytes, before {at_least}"
                ))))
            } else {
                None
            }
        })?
    }

    /// Waits until connection `conn` is closed in both directions.
    pub fn wait_closed(&self, conn: usize, timeout: Duration) -> io::Result<()> {
        self.wait(timeout, |st| {
            let c = st.conns.get(conn)?;
            (c.rec.s2d.eof && c.rec.d2s.eof).then_some(())
        })
    }

    /// A copy of every connection's recording, in accept order.
    pub fn recordings(&self) -> Vec<Recording> {
        self.shared
            .lock()
            .conns
            .iter()
            .map(|c| c.rec.clone())
            .collect()
    }

    fn wait<T>(&self, timeout: Duration, mut f: impl FnMut(&State) -> Option<T>) -> io::Result<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(v) = f(&st) {
                return Ok(v);
            }
            if let Some(e) = &st.accept_error {
                return Err(io::Error::other(e.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "proxy wait timed out",
                ));
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let mut st = self.shared.lock();
        for c in st.conns.iter_mut() {
            if let Some((a, b)) = c.sockets.take() {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, sh: Arc<Shared>) {
    for incoming in listener.incoming() {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let res = incoming.and_then(|src| {
            let dst = TcpStream::connect(target)?;
            src.set_nodelay(true)?;
            dst.set_nodelay(true)?;
            let pumps = [
                (Dir::SrcToDst, src.try_clone()?, dst.try_clone()?),
                (Dir::DstToSrc, dst.try_clone()?, src.try_clone()?),
            ];
            let idx = {
                let mut st = sh.lock();
                let idx = st.conns.len();
                let cut_at = match st.pending_cut {
                    Some((i, off)) if i == idx => {
                        st.pending_cut = None;
                        Some(off)
                    }
                    _ => None,
                };
                st.conns.push(Conn {
                    rec: Recording::default(),
                    sockets: Some((src, dst)),
                    cut_at,
                });
                sh.cv.notify_all();
                idx
            };
            for (dir, from, to) in pumps {
                let sh = sh.clone();
                std::thread::Builder::new()
                    .name(format!("proxy-{idx}-{dir:?}"))
                    .spawn(move || pump(idx, dir, from, to, sh))?;
            }
            Ok(())
        });
        if let Err(e) = res {
            let mut st = sh.lock();
            st.accept_error = Some(format!("proxy accept/connect to {target}: {e}"));
            sh.cv.notify_all();
        }
    }
}

fn pump(idx: usize, dir: Dir, mut from: TcpStream, mut to: TcpStream, sh: Arc<Shared>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).unwrap_or(0);
        // Decide, under the lock, how much of this chunk is delivered, and
        // record it before writing: an armed cut or a byte count read
        // meanwhile then sees every byte handed to the receiver's socket.
        let (deliver, cut_after) = {
            let mut st = sh.lock();
            let c = &mut st.conns[idx];
            if n == 0 || c.rec.cut {
                c.rec.flow(dir).dropped += n as u64;
                c.rec.flow(dir).eof = true;
                if !c.rec.cut {
                    let _ = to.shutdown(Shutdown::Write);
                }
                sh.cv.notify_all();
                return;
            }
            let (deliver, cut_after) = match (dir, c.cut_at) {
                (Dir::SrcToDst, Some(off)) => {
                    let room = off.saturating_sub(c.rec.s2d.bytes.len() as u64) as usize;
                    if room <= n {
                        (room, Some(off))
                    } else {
                        (n, None)
                    }
                }
                _ => (n, None),
            };
            let f = c.rec.flow(dir);
            f.bytes.extend_from_slice(&buf[..deliver]);
            f.dropped += (n - deliver) as u64;
            sh.cv.notify_all();
            (deliver, cut_after)
        };
        let mut written = 0;
        while written < deliver {
            match to.write(&buf[written..deliver]) {
                Ok(0) => break,
                Ok(k) => written += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut st = sh.lock();
        let c = &mut st.conns[idx];
        let lost = deliver - written;
        if lost > 0 {
            // Only this thread appends to this flow: the tail is ours.
            let f = c.rec.flow(dir);
            let keep = f.bytes.len() - lost;
            f.bytes.truncate(keep);
            f.dropped += lost as u64;
        }
        if let (Some(off), 0) = (cut_after, lost) {
            c.cut(format!("src2dst reached byte offset {off}"));
        }
        let done = lost > 0 || c.rec.cut;
        if done {
            c.rec.flow(dir).eof = true;
        }
        sh.cv.notify_all();
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_records_and_cuts_at_offset() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let proxy = Proxy::start(target).unwrap();
        proxy.arm_cut(0, 10);
        let mut client = TcpStream::connect(proxy.addr()).unwrap();
        let (mut peer, _) = server.accept().unwrap();
        peer.write_all(b"back").unwrap();
        let mut four = [0u8; 4];
        client.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"back");
        client.write_all(b"0123456789abcdef").unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"0123456789");
        proxy.wait_closed(0, Duration::from_secs(10)).unwrap();
        let rec = &proxy.recordings()[0];
        assert_eq!(rec.s2d.bytes, b"0123456789");
        assert_eq!(rec.d2s.bytes, b"back");
        assert!(rec.cut);
        assert_eq!(proxy.bytes_forwarded(0), (10, 4));
    }

    #[test]
    fn cut_closes_both_sides_mid_stream() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy::start(server.local_addr().unwrap()).unwrap();
        let mut client = TcpStream::connect(proxy.addr()).unwrap();
        let (mut peer, _) = server.accept().unwrap();
        client.write_all(b"hello").unwrap();
        assert_eq!(
            proxy
                .wait_forwarded(0, Dir::SrcToDst, 5, Duration::from_secs(10))
                .unwrap(),
            5
        );
        proxy.cut();
        // Both ends see the connection end; nothing more gets through. The five bytes were
        // recorded before the pump wrote them, so the cut may land before or after that write:
        // the receiver got all of them or none, and the recording says which.
        let mut got = Vec::new();
        peer.read_to_end(&mut got).unwrap();
        assert!(got.is_empty() || got == b"hello", "{got:?}");
        let mut back = Vec::new();
        let _ = client.read_to_end(&mut back);
        assert!(back.is_empty());
        proxy.wait_closed(0, Duration::from_secs(10)).unwrap();
        let rec = &proxy.recordings()[0];
        assert!(rec.cut);
        assert_eq!(
            rec.cut_reason.as_deref(),
            Some("cut by the harness at src2dst byte offset 5")
        );
        assert_eq!(rec.s2d.bytes, got, "the recording is what the receiver got");
        assert_eq!(proxy.bytes_forwarded(0), (got.len() as u64, 0));
        assert_eq!(proxy.connections(), 1);
    }
}
