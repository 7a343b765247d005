//! A QMP server on a unix socket, speaking QEMU's QMP.
//!
//! This module owns the server side of the QEMU Machine Protocol: the greeting,
//! `qmp_capabilities` negotiation, command framing and dispatch to a [`QmpHandler`], the
//! built-in `qmp_capabilities`, `query-version` and `quit`, and the [`EventSink`] that broadcasts
//! events to every negotiated client. The message shapes live in [`crate::qmp_types`].
//!
//! Threads and robustness:
//! * the accept loop has its own thread; each client has a reader thread (parse, dispatch) and a
//!   writer thread that drains a bounded queue of outgoing lines;
//! * no lock is held across a blocking call: the handler runs without any server lock, and event
//!   broadcast only `try_send`s into each client's queue, so a client that stops reading never
//!   blocks the broadcaster or other clients (its queue overflows and it is disconnected);
//! * a line is capped at [`QmpServerConfig::max_line`] bytes, and an incomplete line must be
//!   finished within [`QmpServerConfig::line_timeout`] of its first byte, else the client is
//!   disconnected (slow-loris, half-open); so is a client that has not negotiated within
//!   [`QmpServerConfig::negotiation_timeout`]; a negotiated idle client with no partial line
//!   may stay;
//! * a handler that panics yields a `GenericError` for that command, not a dead server.
//!
//! Framing: QMP is a JSON stream. Clients send one or more JSON objects per line; replies and
//! events are sent one per line, ended with `\r\n` as QEMU does.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::qmp_types::{
    parse_args, ErrorClass, Greeting, GreetingBody, MigrationEventData, MigrationPassData,
    MigrationStatus, QmpCapabilitiesArgs, QmpError, QmpErrorReply, QmpEvent, QmpReturn,
    VersionInfo, VersionTriple, EVENT_MIGRATION, EVENT_MIGRATION_PASS, EVENT_RESUME,
    EVENT_SHUTDOWN, EVENT_STOP,
};

/// What qmig-src and qmig-dst plug into the server: their command set.
///
/// `execute` runs on the calling client's thread without any server lock; other clients keep
/// being served while it runs. It should return quickly (start work, don't wait for it).
pub trait QmpHandler: Send + Sync {
    /// Runs `cmd` with `args` (always an object; `{}` when the client sent none). Unknown
    /// commands return [`QmpError::command_not_found`].
    fn execute(&self, cmd: &str, args: &Value) -> Result<Value, QmpError>;

    /// Called once when a client runs `quit`, after the reply is queued and before the server's
    /// [`QuitSignal`] is raised.
    fn on_quit(&self) {}
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct QmpServerConfig {
    /// The QEMU version the greeting and `query-version` report.
    pub version: VersionTriple,
    /// The package string (`"qmig"`).
    pub package: String,
    /// Longest accepted input line, bytes (default 1 MiB).
    pub max_line: usize,
    /// Time allowed to finish a line once its first byte arrived (default 10 s).
    pub line_timeout: Duration,
    /// Time allowed from connecting to a successful `qmp_capabilities` (default 30 s); a client
    /// that does not negotiate in time is disconnected, so that silent connections cannot use
    /// up the client slots.
    pub negotiation_timeout: Duration,
    /// Time allowed for one write to a client before it is dropped (default 10 s).
    pub write_timeout: Duration,
    /// Most clients at once; more are closed on accept (default 64).
    pub max_clients: usize,
    /// Outgoing lines queued per client before it counts as stalled (default 4096).
    pub queue: usize,
}

impl Default for QmpServerConfig {
    fn default() -> Self {
        Self {
            version: VersionTriple {
                major: 10,
                minor: 0,
                micro: 0,
            },
            package: "qmig".into(),
            max_line: 1 << 20,
            line_timeout: Duration::from_secs(10),
            negotiation_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            max_clients: 64,
            queue: 4096,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

enum Target {
    /// A negotiated client: its outgoing queue and its socket (to drop it when it stalls).
    Client(SyncSender<Arc<str>>, Weak<UnixStream>),
    /// An in-process subscriber.
    Local(SyncSender<QmpEvent>),
}

struct Subscriber {
    id: u64,
    target: Target,
}

#[derive(Default)]
struct EventInner {
    subs: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
}

/// Broadcasts events to every negotiated client of a server (and to in-process subscribers).
/// Cheap to clone; emitting never blocks on a client.
#[derive(Clone, Default)]
pub struct EventSink {
    inner: Arc<EventInner>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("subscribers", &lock(&self.inner.subs).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EventSink {
    /// A sink with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, target: Target) -> u64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.subs).push(Subscriber { id, target });
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.inner.subs).retain(|s| s.id != id);
    }

    /// An in-process subscription: every event emitted from now on, up to `capacity` unread
    /// (later ones are dropped for this subscriber until it catches up).
    pub fn subscribe(&self, capacity: usize) -> Receiver<QmpEvent> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        self.add(Target::Local(tx));
        rx
    }

    /// Sends `event` to every subscriber.
    pub fn emit(&self, event: QmpEvent) {
        let line: Arc<str> = match serde_json::to_string(&event) {
            Ok(s) => Arc::from(s + "\r\n"),
            Err(_) => return,
        };
        lock(&self.inner.subs).retain(|s| match &s.target {
            Target::Client(tx, sock) => match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!("QMP client does not read its events; disconnecting it");
                    if let Some(sock) = sock.upgrade() {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
            Target::Local(tx) => !matches!(
                tx.try_send(event.clone()),
                Err(TrySendError::Disconnected(_))
            ),
        });
    }

    /// Emits `name` with `data`, stamped now.
    pub fn emit_named(&self, name: &str, data: Option<Value>) {
        self.emit(QmpEvent::now(name, data));
    }

    /// `MIGRATION {"status": ...}`.
    /// Takes a [`MigrationStatus`] or the state machines' `qmig_protocol::machine::MigrationStatus`.
    pub fn migration(&self, status: impl Into<MigrationStatus>) {
        let status = status.into();
        let data = serde_json::to_value(MigrationEventData { status }).ok();
        self.emit_named(EVENT_MIGRATION, data);
    }

    /// `MIGRATION_PASS {"pass": n}`.
    pub fn migration_pass(&self, pass: u64) {
        let data = serde_json::to_value(MigrationPassData { pass }).ok();
        self.emit_named(EVENT_MIGRATION_PASS, data);
    }

    /// `STOP`.
    pub fn stop(&self) {
        self.emit_named(EVENT_STOP, None);
    }

    /// `RESUME`.
    pub fn resume(&self) {
        self.emit_named(EVENT_RESUME, None);
    }
}

// ---------------------------------------------------------------------------------------------
// Quit
// ---------------------------------------------------------------------------------------------

/// Raised when a client runs `quit`; the binary waits on it and exits.
#[derive(Clone, Debug, Default)]
pub struct QuitSignal {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl QuitSignal {
    /// Raises the signal.
    pub fn raise(&self) {
        *lock(&self.inner.0) = true;
        self.inner.1.notify_all();
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        *lock(&self.inner.0)
    }

    /// Blocks until raised.
    pub fn wait(&self) {
        let mut g = lock(&self.inner.0);
        while !*g {
            g = self.inner.1.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until raised or `timeout` passed; returns whether it was raised.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let g = lock(&self.inner.0);
        let (g, _) = self
            .inner
            .1
            .wait_timeout_while(g, timeout, |r| !*r)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

struct Shared {
    handler: Arc<dyn QmpHandler>,
    config: QmpServerConfig,
    events: EventSink,
    quit: QuitSignal,
    stopping: AtomicBool,
    live: AtomicUsize,
    clients: Mutex<HashMap<u64, Arc<UnixStream>>>,
    next_client: AtomicU64,
}

/// A running QMP server. Dropping it stops accepting, disconnects every client and removes the
/// socket file.
pub struct QmpServer {
    shared: Arc<Shared>,
    path: PathBuf,
    listener: Arc<UnixListener>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QmpServer {
    /// Binds `path` (replacing a stale socket file) and starts serving with `handler`; events
    /// go through `events` (create it first so that the migration code can hold a clone).
    pub fn start(
        path: impl AsRef<Path>,
        handler: Arc<dyn QmpHandler>,
        events: EventSink,
        config: QmpServerConfig,
    ) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        crate::transport::remove_stale_socket(&path);
        let listener = Arc::new(UnixListener::bind(&path)?);
        let shared = Arc::new(Shared {
            handler,
            config,
            events,
            quit: QuitSignal::default(),
            stopping: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
        });
        let (s, l) = (shared.clone(), listener.clone());
        let accept = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(&l, s))?;
        Ok(Self {
            shared,
            path,
            listener,
            accept: Some(accept),
        })
    }

    /// [`QmpServer::start`] with a new [`EventSink`] and the default configuration.
    pub fn bind(path: impl AsRef<Path>, handler: Arc<dyn QmpHandler>) -> io::Result<Self> {
        Self::start(path, handler, EventSink::new(), QmpServerConfig::default())
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The event broadcaster.
    pub fn events(&self) -> EventSink {
        self.shared.events.clone()
    }

    /// The signal raised by `quit`.
    pub fn quit_signal(&self) -> QuitSignal {
        self.shared.quit.clone()
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // shutdown(2) on the listening socket wakes the blocked accept(2) (EINVAL on Linux).
        let _ = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::ReadWrite);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for s in lock(&self.shared.clients).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!("QMP accept failed: {e}");
                // EMFILE and the like: don't spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if shared.live.load(Ordering::SeqCst) >= shared.config.max_clients {
            tracing::warn!("QMP: too many clients, closing a new connection");
            continue;
        }
        shared.live.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        // Registered here, before its thread runs, so that dropping the server reaches it.
        let stream = Arc::new(stream);
        lock(&shared.clients).insert(id, stream.clone());
        let s = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .spawn(move || {
                let sh = s.clone();
                serve_client(stream, id, sh);
                s.live.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            lock(&shared.clients).remove(&id);
            shared.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Per-client state on its reader thread.
struct Client {
    id: u64,
    shared: Arc<Shared>,
    stream: Arc<UnixStream>,
    tx: SyncSender<Arc<str>>,
    /// Event subscription id once negotiated.
    subscription: Option<u64>,
}

fn serve_client(stream: Arc<UnixStream>, id: u64, shared: Arc<Shared>) {
    let (tx, rx) = mpsc::sync_channel::<Arc<str>>(shared.config.queue.max(1));
    let wstream = stream.clone();
    let wtimeout = shared.config.write_timeout;
    let writer = thread::Builder::new()
        .name(format!("qmp-write-{id}"))
        .spawn(move || write_loop(&wstream, rx, wtimeout));
    let mut client = Client {
        id,
        shared: shared.clone(),
        stream: stream.clone(),
        tx,
        subscription: None,
    };
    if writer.is_ok() {
        let greeting = Greeting {
            qmp: GreetingBody {
                version: VersionInfo {
                    qemu: shared.config.version,
                    package: shared.config.package.clone(),
                },
                capabilities: Vec::new(),
            },
        };
        client.send(&greeting);
        if let Err(e) = client.read_loop() {
            tracing::debug!("QMP client {id} gone: {e}");
        }
    }
    if let Some(sub) = client.subscription.take() {
        shared.events.remove(sub);
    }
    // Let the writer flush what is queued (a final error reply), bounded by its write timeout,
    // then close.
    drop(client);
    if let Ok(w) = writer {
        let _ = w.join();
    }
    let _ = stream.shutdown(Shutdown::Both);
    lock(&shared.clients).remove(&id);
}

fn write_loop(stream: &UnixStream, rx: Receiver<Arc<str>>, timeout: Duration) {
    let _ = stream.set_write_timeout(Some(timeout));
    let mut w = stream;
    for line in rx {
        if w.write_all(line.as_bytes()).is_err() {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

impl Client {
    fn send<T: serde::Serialize>(&self, msg: &T) {
        if let Ok(s) = serde_json::to_string(msg) {
            // Blocks only this client's thread when its own queue is full.
            let _ = self.tx.send(Arc::from(s + "\r\n"));
        }
    }

    fn reply(&self, id: Option<Value>, result: Result<Value, QmpError>) {
        match result {
            Ok(ret) => self.send(&QmpReturn { ret, id }),
            Err(error) => self.send(&QmpErrorReply { error, id }),
        }
    }

    fn read_loop(&mut self) -> io::Result<()> {
        let cfg = self.shared.config.clone();
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut partial_since: Option<Instant> = None;
        let connected = Instant::now();
        let stream = self.stream.clone();
        let mut r = &*stream;
        loop {
            // Complete lines first.
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                self.handle_line(&line[..nl]);
            }
            if buf.len() > cfg.max_line {
                self.reply(None, Err(QmpError::generic("QMP input line too long")));
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if buf.is_empty() {
                partial_since = None;
            } else {
                partial_since.get_or_insert_with(Instant::now);
            }
            // The nearest deadline: finishing a partial line, or negotiating at all.
            let mut deadline = partial_since.map(|t| (t + cfg.line_timeout, "incomplete line"));
            if self.subscription.is_none() {
                let neg = (
                    connected + cfg.negotiation_timeout,
                    "no capabilities negotiation",
                );
                deadline = Some(match deadline {
                    Some(d) if d.0 <= neg.0 => d,
                    _ => neg,
                });
            }
            match deadline {
                None => self.stream.set_read_timeout(None)?,
                Some((at, what)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("{what}: timed out"),
                        ));
                    }
                    self.stream.set_read_timeout(Some(left))?;
                }
            }
            match r.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn handle_line(&mut self, line: &[u8]) {
        let mut it = serde_json::Deserializer::from_slice(line).into_iter::<Value>();
        loop {
            match it.next() {
                None => return,
                Some(Ok(v)) => self.handle_value(v),
                Some(Err(e)) => {
                    self.reply(
                        None,
                        Err(QmpError::generic(format!("JSON parse error, {e}"))),
                    );
                    return;
                }
            }
        }
    }

    fn handle_value(&mut self, v: Value) {
        let Value::Object(mut obj) = v else {
            self.reply(
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            );
            return;
        };
        let id = obj.remove("id");
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
        {
            let msg = format!("QMP input member '{k}' is unexpected");
            self.reply(id, Err(QmpError::generic(msg)));
            return;
        }
        let cmd = match obj.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                self.reply(
                    id,
                    Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    )),
                );
                return;
            }
            None => {
                self.reply(
                    id,
                    Err(QmpError::generic("QMP input lacks member 'execute'")),
                );
                return;
            }
        };
        let args = match obj.remove("arguments") {
            None => Value::Object(Map::new()),
            Some(a @ Value::Object(_)) => a,
            Some(_) => {
                let e = QmpError::generic("QMP input member 'arguments' must be an object");
                self.reply(id, Err(e));
                return;
            }
        };
        let result = self.dispatch(&cmd, &args);
        self.reply(id, result);
        if cmd == "quit" && self.shared.quit.is_raised() {
            // The reply is queued; the event follows it, as in QEMU.
            self.shared.events.emit_named(
                EVENT_SHUTDOWN,
                Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            );
        }
    }

    fn dispatch(&mut self, cmd: &str, args: &Value) -> Result<Value, QmpError> {
        if self.subscription.is_none() {
            if cmd != "qmp_capabilities" {
                return Err(QmpError {
                    class: ErrorClass::CommandNotFound,
                    desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
                });
            }
            let a: QmpCapabilitiesArgs = parse_args(args)?;
            if let Some(cap) = a.enable.unwrap_or_default().first() {
                return Err(QmpError::generic(format!(
                    "Capability '{cap}' not available"
                )));
            }
            let sub = self.shared.events.add(Target::Client(
                self.tx.clone(),
                Arc::downgrade(&self.stream),
            ));
            self.subscription = Some(sub);
            return Ok(json!({}));
        }
        match cmd {
            "qmp_capabilities" => Err(QmpError {
                class: ErrorClass::CommandNotFound,
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            }),
            "query-version" => {
                let v = VersionInfo {
                    qemu: self.shared.config.version,
                    package: self.shared.config.package.clone(),
                };
                serde_json::to_value(v).map_err(|e| QmpError::generic(e.to_string()))
            }
            "quit" => {
                let handler = self.shared.handler.clone();
                guarded(|| handler.on_quit())?;
                self.shared.quit.raise();
                Ok(json!({}))
            }
            _ => {
                let handler = self.shared.handler.clone();
                tracing::debug!(client = self.id, cmd, "QMP command");
                guarded(|| handler.execute(cmd, args))?
            }
        }
    }
}

/// Runs `f`, turning a panic into a `GenericError`.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, QmpError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| QmpError::generic("internal error: command handler panicked"))
}
