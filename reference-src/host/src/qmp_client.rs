//! Blocking QMP client over a unix socket.
//!
//! Owns the client side of the QEMU Machine Protocol as the tests, the
//! conformance runner and the demo use it to drive QEMU and qmig alike:
//! greeting + `qmp_capabilities`, [`QmpClient::execute`], and an event queue
//! with [`QmpClient::wait_event`] / [`QmpClient::wait_status`]. Waiting is
//! event-driven (a blocking read with the remaining time as read timeout);
//! the timeout is only a failure guard. Where the server sends no event,
//! [`QmpClient::poll_until`] polls a query command.
//!
//! Framing uses the shared shapes of [`crate::qmp_types`] (commands are
//! serialised as [`QmpCommand`], events parsed as [`QmpEvent`]); arguments and
//! results stay [`serde_json::Value`] so any command of any QEMU version can
//! be sent, and [`QmpClient::execute_typed`] gives the typed form for
//! commands described by a [`QmpCommandDef`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::qmp_types::{QmpCommand, QmpCommandDef, QmpEvent};

/// Largest QMP message (one line) the client accepts from the server.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Default failure guard for one command's reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP i/o: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection.
    #[error("QMP connection closed by the server")]
    Closed,
    /// The server sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// The command was answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// The error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// The human-readable description.
        desc: String,
    },
    /// The migration failed while the client waited for another status.
    #[error("migration failed while waiting for status {0}")]
    MigrationFailed(String),
    /// A wait ran out of time (a failure guard, not a synchronisation means).
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The server will never answer (its process exited), as reported by the caller.
    #[error("QMP server gone: {0}")]
    Exited(String),
}

/// Result of a QMP operation.
pub type QmpResult<T> = Result<T, QmpError>;

/// One asynchronous event received from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    /// Event name (`MIGRATION`, `STOP`, ...).
    pub name: String,
    /// The `data` member (`Value::Null` when absent).
    pub data: Value,
    /// The server's timestamp in microseconds since the epoch (0 when absent).
    pub timestamp_us: u64,
    /// When the client read it.
    pub received: Instant,
}

impl ReceivedEvent {
    /// `data.status` of a `MIGRATION` event, if any.
    pub fn status(&self) -> Option<&str> {
        self.data.get("status").and_then(Value::as_str)
    }
}

/// A connected, capabilities-negotiated QMP session.
pub struct QmpClient {
    stream: UnixStream,
    buf: Vec<u8>,
    greeting: Value,
    pending: VecDeque<ReceivedEvent>,
    log: Vec<ReceivedEvent>,
    next_id: u64,
    command_timeout: Option<Duration>,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and enters command mode.
    pub fn connect(path: impl AsRef<Path>) -> QmpResult<Self> {
        let stream = UnixStream::connect(path)?;
        Self::handshake(stream)
    }

    /// Like [`QmpClient::connect`], retrying while the socket does not exist
    /// or refuses connections (the server is still starting) until `timeout`.
    pub fn connect_retry(path: impl AsRef<Path>, timeout: Duration) -> QmpResult<Self> {
        Self::connect_while(path, timeout, || Ok(()))
    }

    /// Like [`QmpClient::connect_retry`], but between attempts asks `alive` whether the server
    /// can still come up: an `Err(why)` from it (e.g. the server process has exited) ends the
    /// wait at once with [`QmpError::Exited`], instead of running out the timeout.
    pub fn connect_while(
        path: impl AsRef<Path>,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> QmpResult<Self> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(2);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::handshake(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    alive().map_err(QmpError::Exited)?;
                    if Instant::now() >= deadline {
                        return Err(QmpError::Timeout(
                            timeout,
                            format!("QMP socket {}", path.display()),
                        ));
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wraps an already connected stream: greeting + `qmp_capabilities`.
    pub fn handshake(stream: UnixStream) -> QmpResult<Self> {
        let mut c = QmpClient {
            stream,
            buf: Vec::new(),
            greeting: Value::Null,
            pending: VecDeque::new(),
            log: Vec::new(),
            next_id: 1,
            command_timeout: Some(DEFAULT_COMMAND_TIMEOUT),
        };
        let mut greeting = c.read_message(Some(Duration::from_secs(30)))?;
        // An event can come before the greeting: QEMU (7.2) sends events to a QMP monitor that
        // has not yet handled its client's connection (its command table is still unset, not
        // the negotiation one), e.g. RESUME at start-up racing a client that just connected.
        // It is kept like any event.
        while greeting.get("event").is_some() {
            c.push_event(greeting)?;
            greeting = c.read_message(Some(Duration::from_secs(30)))?;
        }
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        c.greeting = greeting;
        c.execute("qmp_capabilities", Value::Null)?;
        Ok(c)
    }

    /// Sets how long [`QmpClient::execute`] waits for a reply (`None`: forever).
    pub fn set_command_timeout(&mut self, timeout: Option<Duration>) {
        self.command_timeout = timeout;
    }

    /// The server's greeting (`{"QMP": {"version": ..., "capabilities": ...}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns
    /// its `return` value. Events read meanwhile are queued.
    pub fn execute(&mut self, command: &str, arguments: Value) -> QmpResult<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let cmd = QmpCommand {
            execute: command.to_string(),
            arguments: (!arguments.is_null()).then_some(arguments),
            id: Some(json!(id)),
        };
        let mut line = serde_json::to_vec(&cmd).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        let deadline = self.command_timeout.map(|t| (Instant::now() + t, t));
        loop {
            let left = match deadline {
                Some((d, t)) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(QmpError::Timeout(t, format!("the reply to {command}")));
                    }
                    Some(d - now)
                }
                None => None,
            };
            let m = match self.read_message(left) {
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let t = deadline.map(|(_, t)| t).unwrap_or_default();
                    return Err(QmpError::Timeout(t, format!("the reply to {command}")));
                }
                other => other?,
            };
            if m.get("event").is_some() {
                self.push_event(m)?;
                continue;
            }
            if m.get("id") != Some(&json!(id)) {
                // A reply to nothing we asked (e.g. an id-less error): protocol error.
                return Err(QmpError::Protocol(format!("unexpected reply {m}")));
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply without return or error: {m}"
            )));
        }
    }

    /// Runs the typed command `C`: arguments serialised from `args`, the
    /// `return` value deserialised into `C::Returns`.
    pub fn execute_typed<C: QmpCommandDef>(&mut self, args: &C::Args) -> QmpResult<C::Returns> {
        let cmd = QmpCommand::typed::<C>(args).map_err(|e| QmpError::Protocol(e.to_string()))?;
        let ret = self.execute(C::NAME, cmd.arguments.unwrap_or(Value::Null))?;
        serde_json::from_value(ret).map_err(|e| {
            QmpError::Protocol(format!("{} returned an unexpected shape: {e}", C::NAME))
        })
    }

    /// Takes the first queued or arriving event named `name` whose data
    /// satisfies `pred`, waiting at most `timeout`. Other events stay queued.
    pub fn wait_event(
        &mut self,
        name: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> QmpResult<ReceivedEvent> {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        loop {
            if let Some(i) = self
                .pending
                .iter()
                .skip(scanned)
                .position(|e| e.name == name && pred(&e.data))
            {
                return Ok(self.pending.remove(scanned + i).expect("index in range"));
            }
            scanned = self.pending.len();
            self.read_event_until(deadline, timeout, name)?;
        }
    }

    /// Waits for the `MIGRATION` event with `status` (the `events` migration
    /// capability must be on). Migration statuses form a sequence, so every
    /// queued `MIGRATION` event up to and including the match is consumed.
    /// A `failed` status on the way ends the wait with
    /// [`QmpError::MigrationFailed`].
    pub fn wait_status(&mut self, status: &str, timeout: Duration) -> QmpResult<ReceivedEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(pos) = self.pending.iter().position(|e| e.name == "MIGRATION") {
                let e = self.pending.remove(pos).expect("index in range");
                if e.status() == Some(status) {
                    return Ok(e);
                }
                if e.status() == Some("failed") {
                    return Err(QmpError::MigrationFailed(status.to_string()));
                }
            }
            self.read_event_until(deadline, timeout, &format!("MIGRATION status {status}"))?;
        }
    }

    /// Runs `command` every `interval` until `pred` accepts its return value;
    /// for states the server announces with no event.
    pub fn poll_until(
        &mut self,
        command: &str,
        arguments: Value,
        mut pred: impl FnMut(&Value) -> bool,
        interval: Duration,
        timeout: Duration,
    ) -> QmpResult<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.execute(command, arguments.clone())?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(
                    timeout,
                    format!("{command} to satisfy a predicate"),
                ));
            }
            std::thread::sleep(interval);
        }
    }

    /// `query-migrate`'s `status`.
    pub fn migration_status(&mut self) -> QmpResult<String> {
        let v = self.execute("query-migrate", Value::Null)?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string())
    }

    /// Events received and not yet taken by a wait, oldest first.
    pub fn pending_events(&self) -> impl Iterator<Item = &ReceivedEvent> {
        self.pending.iter()
    }

    /// Reads whatever events are already available without blocking.
    pub fn drain_available(&mut self) -> QmpResult<()> {
        loop {
            match self.read_message(Some(Duration::from_millis(1))) {
                Ok(m) if m.get("event").is_some() => self.push_event(m)?,
                Ok(m) => return Err(QmpError::Protocol(format!("unsolicited reply {m}"))),
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Every event received on this session, in order (taken or not).
    pub fn event_log(&self) -> &[ReceivedEvent] {
        &self.log
    }

    fn read_event_until(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        what: &str,
    ) -> QmpResult<()> {
        let now = Instant::now();
        if now >= deadline {
            return Err(QmpError::Timeout(timeout, what.to_string()));
        }
        match self.read_message(Some(deadline - now)) {
            Ok(m) if m.get("event").is_some() => self.push_event(m),
            Ok(m) => Err(QmpError::Protocol(format!("unsolicited reply {m}"))),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Timeout(timeout, what.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    fn push_event(&mut self, m: Value) -> QmpResult<()> {
        let ev: QmpEvent = serde_json::from_value(m)
            .map_err(|e| QmpError::Protocol(format!("malformed event: {e}")))?;
        let secs = u64::try_from(ev.timestamp.seconds).unwrap_or(0);
        let us = u64::try_from(ev.timestamp.microseconds).unwrap_or(0);
        let ev = ReceivedEvent {
            name: ev.event,
            data: ev.data.unwrap_or(Value::Null),
            timestamp_us: secs.saturating_mul(1_000_000).saturating_add(us),
            received: Instant::now(),
        };
        self.log.push(ev.clone());
        self.pending.push_back(ev);
        Ok(())
    }

    /// Reads one newline-terminated JSON message. `timeout` bounds the wait
    /// for the first byte of a message not yet buffered; `None` blocks.
    fn read_message(&mut self, timeout: Option<Duration>) -> QmpResult<Value> {
        // Bytes of `buf` already known to hold no newline.
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let nl = scanned + i;
                scanned = 0;
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = line.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_slice(text)
                    .map_err(|e| QmpError::Protocol(format!("bad JSON from server: {e}")));
            }
            if self.buf.len() > MAX_MESSAGE_BYTES {
                return Err(QmpError::Protocol(format!(
                    "message longer than {MAX_MESSAGE_BYTES} bytes"
                )));
            }
            scanned = self.buf.len();
            self.stream.set_read_timeout(timeout)?;
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk);
            self.stream.set_read_timeout(None)?;
            match n? {
                0 => return Err(QmpError::Closed),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp_types::{MigrateStartPostcopy, QueryMigrate};
    use std::io::BufRead;

    fn ts() -> Value {
        json!({"seconds": 1, "microseconds": 2})
    }

    /// A scripted server: greeting, then answers each line with the next
    /// canned message(s), substituting the request id.
    fn server(script: Vec<Vec<Value>>) -> (UnixStream, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = io::BufReader::new(b);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            for replies in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let req: Value = serde_json::from_str(&line).unwrap();
                for mut rep in replies {
                    if rep.get("event").is_none() {
                        rep["id"] = req["id"].clone();
                    }
                    writeln!(w, "{rep}").unwrap();
                }
            }
        });
        (a, h)
    }

    #[test]
    fn execute_returns_value_and_queues_events() {
        let (s, h) = server(vec![
            vec![json!({"return": {}})],
            vec![
                json!({"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": ts()}),
                json!({"event": "MIGRATION", "data": {"status": "active"}, "timestamp": ts()}),
                json!({"return": {"status": "active"}}),
            ],
            vec![json!({"error": {"class": "GenericError", "desc": "nope"}})],
        ]);
        let mut c = QmpClient::handshake(s).unwrap();
        let r = c.execute("query-migrate", Value::Null).unwrap();
        assert_eq!(r, json!({"status": "active"}));
        let e = c.wait_status("active", Duration::from_secs(5)).unwrap();
        assert_eq!(e.status(), Some("active"));
        assert_eq!(c.event_log()[0].timestamp_us, 1_000_002);
        assert_eq!(
            c.pending_events().count(),
            0,
            "setup consumed before active"
        );
        match c.execute("migrate", json!({"uri": "x"})) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "nope"))
            }
            other => panic!("{other:?}"),
        }
        drop(c);
        h.join().unwrap();
    }

    /// An event before the greeting (QEMU's start-up race) is kept as an event, and the
    /// handshake goes on; anything else before it is still a protocol error.
    #[test]
    fn an_event_before_the_greeting_is_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = io::BufReader::new(b);
            writeln!(w, r#"{{"event": "RESUME", "timestamp": {}}}"#, ts()).unwrap();
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            writeln!(w, "{}", json!({"return": {}, "id": req["id"]})).unwrap();
        });
        let c = QmpClient::handshake(a).unwrap();
        let names: Vec<&str> = c.pending_events().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["RESUME"]);
        drop(c);
        h.join().unwrap();

        let (a, b) = UnixStream::pair().unwrap();
        let mut w = b.try_clone().unwrap();
        writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
        match QmpClient::handshake(a) {
            Err(QmpError::Protocol(m)) => assert!(m.starts_with("expected a greeting"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// A server that can no longer come up ends the wait at the first check, not at the
    /// timeout (an hour here: the test would hang on the old behaviour); the check is asked
    /// only while the socket is missing, and a socket that appears is connected.
    #[test]
    fn connect_while_stops_when_the_server_is_gone() {
        let dir = std::env::temp_dir().join(format!("qmp-connect-while-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let mut asked = 0;
        let r = QmpClient::connect_while(&sock, Duration::from_secs(3600), || {
            asked += 1;
            if asked < 3 {
                Ok(())
            } else {
                Err("exited (status 1)".into())
            }
        });
        match r {
            Err(QmpError::Exited(why)) => assert_eq!(why, "exited (status 1)"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert_eq!(asked, 3);
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            writeln!(s, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
            s
        });
        let c = QmpClient::connect_while(&sock, Duration::from_secs(3600), || {
            Err("must not be asked".into())
        });
        assert!(c.is_ok(), "{:?}", c.map(|_| ()));
        drop(server.join().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_silent_server_is_a_timeout_not_a_hang() {
        let (a, mut b) = UnixStream::pair().unwrap();
        writeln!(b, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
        writeln!(b, r#"{{"return": {{}}, "id": 1}}"#).unwrap();
        let mut c = QmpClient::handshake(a).unwrap();
        c.set_command_timeout(Some(Duration::from_millis(20)));
        assert!(matches!(
            c.execute("query-status", Value::Null),
            Err(QmpError::Timeout(..))
        ));
        // An oversized line is refused, not buffered without bound.
        c.set_command_timeout(None);
        let big = vec![b'x'; MAX_MESSAGE_BYTES + 2];
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&big);
            b
        });
        assert!(matches!(
            c.execute("query-status", Value::Null),
            Err(QmpError::Protocol(_))
        ));
        drop(c);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_failed_migration_ends_a_status_wait() {
        let (s, h) = server(vec![
            vec![json!({"return": {}})],
            vec![
                json!({"event": "MIGRATION", "data": {"status": "active"}, "timestamp": ts()}),
                json!({"event": "MIGRATION", "data": {"status": "failed"}, "timestamp": ts()}),
                json!({"return": {}}),
            ],
        ]);
        let mut c = QmpClient::handshake(s).unwrap();
        c.execute("migrate", json!({"uri": "tcp:127.0.0.1:1"}))
            .unwrap();
        assert!(matches!(
            c.wait_status("completed", Duration::from_secs(5)),
            Err(QmpError::MigrationFailed(s)) if s == "completed"
        ));
        h.join().unwrap();
    }

    #[test]
    fn typed_commands_use_the_shared_shapes() {
        let (s, h) = server(vec![
            vec![json!({"return": {}})],
            vec![json!({"return": {}})],
            vec![json!({"return": {"status": "postcopy-paused"}})],
        ]);
        let mut c = QmpClient::handshake(s).unwrap();
        c.execute_typed::<MigrateStartPostcopy>(&Default::default())
            .unwrap();
        let info = c
            .execute_typed::<QueryMigrate>(&Default::default())
            .unwrap();
        assert_eq!(
            serde_json::to_value(&info).unwrap()["status"],
            json!("postcopy-paused")
        );
        drop(c);
        h.join().unwrap();
    }

    #[test]
    fn wait_event_keeps_other_events_and_times_out() {
        let (s, h) = server(vec![
            vec![json!({"return": {}})],
            vec![
                json!({"event": "STOP", "timestamp": ts()}),
                json!({"event": "RESUME", "timestamp": ts()}),
                json!({"return": {}}),
            ],
        ]);
        let mut c = QmpClient::handshake(s).unwrap();
        c.execute("stop", Value::Null).unwrap();
        let e = c
            .wait_event("RESUME", |_| true, Duration::from_secs(5))
            .unwrap();
        assert_eq!(e.name, "RESUME");
        assert_eq!(
            c.pending_events()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
            ["STOP"]
        );
        h.join().unwrap();
        // The server is gone: waiting reports the close, not a hang.
        assert!(matches!(
            c.wait_event("NEVER", |_| true, Duration::from_secs(5)),
            Err(QmpError::Closed)
        ));
    }
}
