//! Migration channels over TCP and unix sockets.
//!
//! This module owns listening, accepting and connecting for a [`MigrationUri`], the socket
//! options every migration channel gets (`TCP_NODELAY`; silent-drop detection through TCP
//! keepalive and `TCP_USER_TIMEOUT`), [`set_notsent_lowat`] for a bounded send queue, splitting a connection into a reader and a writer that
//! different threads own, and [`Cutter`]: a cloneable handle that shuts a live connection down
//! from any thread (what `migrate-pause` does, and how tests inject a network failure), and
//! [`ListenStopper`], which ends a blocked accept from any thread.
//!
//! A [`Connection`] is an `Arc` around the socket: [`Connection::split`] gives halves that share
//! it, and the socket closes when the last half is dropped. A [`Cutter`] holds only a weak
//! reference, so it never keeps a dropped connection open.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::uri::MigrationUri;

/// Default bound within which a silently dropped TCP peer is detected.
pub const DEFAULT_DROP_DETECT: Duration = Duration::from_secs(2);

/// Default bound on a TCP connect.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket options applied to every TCP channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportConfig {
    /// Set `TCP_NODELAY` (default on).
    pub nodelay: bool,
    /// Detect a peer that vanished without a FIN or RST (cable pulled, host gone, packets
    /// silently dropped) within this bound: see [`DropDetect`]. `None` leaves the kernel defaults
    /// (minutes to hours).
    pub drop_detect: Option<Duration>,
    /// Give up a TCP connect after this long per address (default 10 s); `None`: the kernel's
    /// SYN retries (about two minutes).
    pub connect_timeout: Option<Duration>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            nodelay: true,
            drop_detect: Some(DEFAULT_DROP_DETECT),
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        }
    }
}

/// The socket options that detect a silently dropped peer within a bound `B`:
///
/// * `TCP_USER_TIMEOUT` = `B - 500 ms` (at least 500 ms): with data in flight, the connection
///   fails once nothing has been acknowledged for that long (the kernel clamps its
///   retransmission timer to it);
/// * keepalive after 1 s idle, probes every 1 s: an idle connection sends a probe at most 1 s
///   after the last packet it received, and the next keepalive tick (1 s later) finds the user
///   timeout passed and fails the connection, so at most `max(B, 2 s)` after the peer went
///   silent. The keepalive count is ignored by the kernel once a user timeout is set; it is set to
///   `B` in seconds for kernels that ignore the user timeout for keepalive.
///
/// Blocked reads and writes then fail with `ETIMEDOUT` (`ErrorKind::TimedOut`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropDetect {
    /// `TCP_KEEPIDLE`.
    pub keepidle: Duration,
    /// `TCP_KEEPINTVL`.
    pub keepintvl: Duration,
    /// `TCP_KEEPCNT`.
    pub keepcnt: u32,
    /// `TCP_USER_TIMEOUT`, milliseconds.
    pub user_timeout_ms: u32,
}

impl DropDetect {
    /// The options for bound `bound`.
    pub fn for_bound(bound: Duration) -> Self {
        let ms = u32::try_from(bound.as_millis()).unwrap_or(u32::MAX);
        Self {
            keepidle: Duration::from_secs(1),
            keepintvl: Duration::from_secs(1),
            keepcnt: u32::try_from(bound.as_secs())
                .unwrap_or(u32::MAX)
                .clamp(1, 127),
            user_timeout_ms: ms.saturating_sub(500).max(500),
        }
    }
}

/// Applies `cfg` to a TCP socket.
pub fn configure_tcp(stream: &TcpStream, cfg: &TransportConfig) -> io::Result<()> {
    use rustix::net::sockopt;
    if cfg.nodelay {
        sockopt::set_tcp_nodelay(stream, true)?;
    }
    if let Some(bound) = cfg.drop_detect {
        let d = DropDetect::for_bound(bound);
        sockopt::set_socket_keepalive(stream, true)?;
        sockopt::set_tcp_keepidle(stream, d.keepidle)?;
        sockopt::set_tcp_keepintvl(stream, d.keepintvl)?;
        sockopt::set_tcp_keepcnt(stream, d.keepcnt)?;
        sockopt::set_tcp_user_timeout(stream, d.user_timeout_ms)?;
    }
    Ok(())
}

/// Sets `TCP_NOTSENT_LOWAT`: a write blocks (and `POLLOUT` waits) until fewer than `bytes`
/// written bytes are still unsent. With a small value the kernel holds little bulk data ahead
/// of the next write, so a page written on request is not queued behind megabytes of earlier
/// background pages (the queue is then bounded by this and the peer's receive window).
pub fn set_notsent_lowat(stream: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor, a pointer to a live c_int and its exact size.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket under a [`Connection`].
#[derive(Debug)]
pub enum Socket {
    /// A TCP socket.
    Tcp(TcpStream),
    /// A unix stream socket.
    Unix(UnixStream),
}

impl Socket {
    /// `shutdown(2)` in the given direction.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(how),
            Self::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets `SO_RCVTIMEO` (`None`: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets `SO_SNDTIMEO` (`None`: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_write_timeout(t),
            Self::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// A printable peer address.
    pub fn peer(&self) -> String {
        match self {
            Self::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Self::Unix(_) => "unix".into(),
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Socket::Tcp(s) => (&*s).write(buf),
            Socket::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A migration channel. Reads and writes go straight to the socket (no buffering).
#[derive(Clone, Debug)]
pub struct Connection {
    sock: Arc<Socket>,
}

impl Connection {
    /// Wraps a connected TCP stream, applying `cfg`.
    pub fn from_tcp(s: TcpStream, cfg: &TransportConfig) -> io::Result<Self> {
        configure_tcp(&s, cfg)?;
        Ok(Self {
            sock: Arc::new(Socket::Tcp(s)),
        })
    }

    /// Wraps a connected unix stream.
    pub fn from_unix(s: UnixStream) -> Self {
        Self {
            sock: Arc::new(Socket::Unix(s)),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Socket {
        &self.sock
    }

    /// Splits into a reader half and a writer half for two threads; both share the socket.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        (
            ConnReader {
                sock: self.sock.clone(),
            },
            ConnWriter { sock: self.sock },
        )
    }

    /// A handle that can shut this connection down from another thread.
    pub fn cutter(&self) -> Cutter {
        Cutter {
            sock: Arc::downgrade(&self.sock),
        }
    }

    /// `shutdown(Both)`: both directions fail from now on, here and at the peer.
    pub fn shutdown_both(&self) -> io::Result<()> {
        self.sock.shutdown(Shutdown::Both)
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.sock).read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.sock).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Splits a plain `TcpStream` into a reader and a writer (two descriptors of one socket, via
/// `try_clone`), for code that wants `std` types; shutting either down affects both.
pub fn split_tcp(s: TcpStream) -> io::Result<(TcpStream, TcpStream)> {
    let w = s.try_clone()?;
    Ok((s, w))
}

/// The reading half of a [`Connection`].
#[derive(Debug)]
pub struct ConnReader {
    sock: Arc<Socket>,
}

impl ConnReader {
    /// A cutter for the whole connection.
    pub fn cutter(&self) -> Cutter {
        Cutter {
            sock: Arc::downgrade(&self.sock),
        }
    }
}

impl Read for ConnReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.sock).read(buf)
    }
}

/// The writing half of a [`Connection`].
#[derive(Debug)]
pub struct ConnWriter {
    sock: Arc<Socket>,
}

impl ConnWriter {
    /// A cutter for the whole connection.
    pub fn cutter(&self) -> Cutter {
        Cutter {
            sock: Arc::downgrade(&self.sock),
        }
    }
}

impl Write for ConnWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.sock).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Cuts a live connection from any thread: `shutdown(Both)`, so blocked reads here return
/// end-of-file, writes fail, and the peer sees end-of-file. Does nothing once the connection
/// is gone.
#[derive(Clone, Debug)]
pub struct Cutter {
    sock: Weak<Socket>,
}

impl Cutter {
    /// Cuts the connection. Returns whether it was still open (held by someone).
    pub fn cut(&self) -> bool {
        match self.sock.upgrade() {
            Some(s) => {
                // ENOTCONN when the peer already went away: the connection is cut either way.
                let _ = s.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }
}

/// The socket under a [`Listener`].
#[derive(Debug)]
enum ListenSocket {
    Tcp(TcpListener),
    /// The path is removed when the socket is closed.
    Unix(UnixListener, PathBuf),
}

impl Drop for ListenSocket {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A listening socket for a migration URI. A unix listener removes its socket file when dropped.
#[derive(Debug)]
pub struct Listener {
    sock: Arc<ListenSocket>,
    cfg: TransportConfig,
    stopped: Arc<AtomicBool>,
}

/// Stops a [`Listener`] from another thread: a blocked [`Listener::accept`] returns
/// `ErrorKind::ConnectionAborted`, and so does every later one (`migrate_cancel`, `quit`, a
/// superseded `migrate-recover`). Does nothing once the listener is gone.
#[derive(Clone, Debug)]
pub struct ListenStopper {
    sock: Weak<ListenSocket>,
    stopped: Arc<AtomicBool>,
}

impl ListenStopper {
    /// Stops the listener.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(s) = self.sock.upgrade() {
            // shutdown(2) on a listening socket wakes accept(2) with EINVAL on Linux.
            let _ = match &*s {
                ListenSocket::Tcp(l) => rustix::net::shutdown(l, rustix::net::Shutdown::ReadWrite),
                ListenSocket::Unix(l, _) => {
                    rustix::net::shutdown(l, rustix::net::Shutdown::ReadWrite)
                }
            };
        }
    }
}

/// Errors of [`listen`] and [`connect`] for URIs that cannot be used.
fn bad_uri(uri: &MigrationUri) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("cannot open a channel for '{uri}'"),
    )
}

/// Listens on `uri` (`tcp:HOST:0` picks a free port: see [`Listener::local_uri`]). A stale unix
/// socket file at the path is replaced.
pub fn listen(uri: &MigrationUri, cfg: &TransportConfig) -> io::Result<Listener> {
    match uri {
        MigrationUri::Tcp { .. } => {
            let addr = uri.socket_addr_string().ok_or_else(|| bad_uri(uri))?;
            Ok(Listener::new(
                ListenSocket::Tcp(TcpListener::bind(addr)?),
                cfg,
            ))
        }
        MigrationUri::Unix { path } => {
            remove_stale_socket(path);
            let l = UnixListener::bind(path)?;
            Ok(Listener::new(ListenSocket::Unix(l, path.clone()), cfg))
        }
        MigrationUri::Defer => Err(bad_uri(uri)),
    }
}

/// Removes `path` if it is a socket (left by an earlier process).
pub fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    fn new(sock: ListenSocket, cfg: &TransportConfig) -> Self {
        Self {
            sock: Arc::new(sock),
            cfg: *cfg,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The URI a peer connects to; for TCP with the bound port filled in.
    pub fn local_uri(&self) -> io::Result<MigrationUri> {
        match &*self.sock {
            ListenSocket::Tcp(l) => {
                let a = l.local_addr()?;
                Ok(MigrationUri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
            ListenSocket::Unix(_, p) => Ok(MigrationUri::Unix { path: p.clone() }),
        }
    }

    /// The bound TCP port (`None` for unix).
    pub fn port(&self) -> Option<u16> {
        match &*self.sock {
            ListenSocket::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            ListenSocket::Unix(..) => None,
        }
    }

    /// A handle that stops this listener from another thread.
    pub fn stopper(&self) -> ListenStopper {
        ListenStopper {
            sock: Arc::downgrade(&self.sock),
            stopped: self.stopped.clone(),
        }
    }

    /// Accepts one connection, with the channel options applied. After
    /// [`ListenStopper::stop`]: `ErrorKind::ConnectionAborted`.
    pub fn accept(&self) -> io::Result<Connection> {
        let aborted = || io::Error::new(io::ErrorKind::ConnectionAborted, "listener stopped");
        if self.stopped.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        let r = match &*self.sock {
            ListenSocket::Tcp(l) => l
                .accept()
                .and_then(|(s, _)| Connection::from_tcp(s, &self.cfg)),
            ListenSocket::Unix(l, _) => l.accept().map(|(s, _)| Connection::from_unix(s)),
        };
        match r {
            Err(_) if self.stopped.load(Ordering::SeqCst) => Err(aborted()),
            r => r,
        }
    }
}

/// Connects to `uri`, trying each resolved address in turn.
pub fn connect(uri: &MigrationUri, cfg: &TransportConfig) -> io::Result<Connection> {
    match uri {
        MigrationUri::Tcp { .. } => {
            let addr = uri.socket_addr_string().ok_or_else(|| bad_uri(uri))?;
            let mut last = None;
            for a in addr.to_socket_addrs()? {
                let r = match cfg.connect_timeout {
                    Some(t) => TcpStream::connect_timeout(&a, t),
                    None => TcpStream::connect(a),
                };
                match r {
                    Ok(s) => return Connection::from_tcp(s, cfg),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| bad_uri(uri)))
        }
        MigrationUri::Unix { path } => Ok(Connection::from_unix(UnixStream::connect(path)?)),
        MigrationUri::Defer => Err(bad_uri(uri)),
    }
}
