//! The QMP server against a tiny raw client: greeting, negotiation, dispatch, errors, events to
//! several clients, stalled and slow clients, a blocked handler, oversized lines and `quit`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmig_host::qmp_server::{EventSink, QmpHandler, QmpServer, QmpServerConfig};
use qmig_host::qmp_types::{
    parse_args, run_typed, to_return, Empty, MigrateArgs, MigrateRecover, MigrationInfo,
    MigrationStats, MigrationStatus, QmpError, QmpEvent, QmpMessage,
};
use serde_json::{json, Value};

/// Failure guard for reads: a broken server fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(20);

struct TestHandler {
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
    quit_seen: AtomicBool,
}

impl QmpHandler for TestHandler {
    fn execute(&self, cmd: &str, args: &Value) -> Result<Value, QmpError> {
        match cmd {
            "echo" => Ok(args.clone()),
            "fail" => Err(QmpError::generic("boom")),
            "panic" => panic!("handler panic (expected by the test)"),
            "migrate" => {
                let a: MigrateArgs = parse_args(args)?;
                Ok(json!({"uri": a.uri, "resume": a.resume}))
            }
            "query-migrate" => to_return(&MigrationInfo {
                status: Some(MigrationStatus::PostcopyActive),
                ram: Some(MigrationStats {
                    transferred: 4096,
                    page_size: 4096,
                    mbps: 1.5,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "migrate-recover" => run_typed::<MigrateRecover>(args, |a| {
                if a.uri.starts_with("unix:") {
                    Ok(Empty {})
                } else {
                    Err(QmpError::generic(format!("unsupported uri {}", a.uri)))
                }
            }),
            "block" => {
                let _ = self.entered.lock().unwrap().send(());
                let _ = self.release.lock().unwrap().recv();
                Ok(json!("released"))
            }
            _ => Err(QmpError::command_not_found(cmd)),
        }
    }

    fn on_quit(&self) {
        self.quit_seen.store(true, Ordering::SeqCst);
    }
}

struct Fixture {
    server: QmpServer,
    handler: Arc<TestHandler>,
    entered: Receiver<()>,
    release: Sender<()>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(name: &str, config: QmpServerConfig) -> Fixture {
    let dir = std::env::temp_dir().join(format!("qmig-qmp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (etx, erx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    let handler = Arc::new(TestHandler {
        entered: Mutex::new(etx),
        release: Mutex::new(rrx),
        quit_seen: AtomicBool::new(false),
    });
    let server = QmpServer::start(
        dir.join("qmp.sock"),
        handler.clone(),
        EventSink::new(),
        config,
    )
    .unwrap();
    Fixture {
        server,
        handler,
        entered: erx,
        release: rtx,
        _dir: TempDir(dir),
    }
}

/// A raw QMP client: bytes in, lines out.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(f: &Fixture) -> (Self, Value) {
        let s = UnixStream::connect(f.server.path()).unwrap();
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut c = Raw {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        let g = c.recv();
        (c, g)
    }

    fn negotiated(f: &Fixture) -> Self {
        let (mut c, _) = Raw::connect(f);
        assert_eq!(
            c.call(r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
        c
    }

    fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).unwrap();
    }

    fn recv_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).unwrap();
        assert!(n > 0, "server closed the connection");
        assert!(line.ends_with("\r\n"), "line not ended by CRLF: {line:?}");
        line
    }

    fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_line()).unwrap()
    }

    fn call(&mut self, s: &str) -> Value {
        self.send(s);
        self.send("\n");
        self.recv()
    }

    /// Reads until the server closes; returns the lines read.
    fn drain_to_eof(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => return out,
                Ok(_) => out.push(line),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

fn generic(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

#[test]
fn greeting_negotiation_and_commands() {
    let f = fixture("cmds", QmpServerConfig::default());
    let (mut c, greeting) = Raw::connect(&f);
    assert_eq!(
        greeting,
        json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "qmig"}, "capabilities": []}})
    );
    assert!(matches!(
        QmpMessage::parse(&greeting.to_string()).unwrap(),
        QmpMessage::Greeting(_)
    ));

    // Nothing but qmp_capabilities before negotiation.
    assert_eq!(
        c.call(r#"{"execute":"echo","id":7}"#),
        json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7})
    );
    assert_eq!(
        c.call(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#),
        generic("Capability 'oob' not available")
    );
    assert_eq!(
        c.call(r#"{"execute":"qmp_capabilities","id":"neg"}"#),
        json!({"return": {}, "id": "neg"})
    );

    // Dispatch to the handler, ids echoed as any JSON value.
    assert_eq!(
        c.call(r#"{"execute":"echo","arguments":{"a":[1,2],"b":"x"},"id":{"n":1}}"#),
        json!({"return": {"a": [1, 2], "b": "x"}, "id": {"n": 1}})
    );
    assert_eq!(c.call(r#"{"execute":"echo"}"#), json!({"return": {}}));
    assert_eq!(
        c.call(r#"{"execute":"fail","id":2}"#),
        json!({"error": {"class": "GenericError", "desc": "boom"}, "id": 2})
    );
    assert_eq!(
        c.call(r#"{"execute":"nope"}"#),
        json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})
    );
    assert_eq!(
        c.call(r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","resume":true}}"#),
        json!({"return": {"uri": "tcp:127.0.0.1:1", "resume": true}})
    );
    assert_eq!(
        c.call(r#"{"execute":"migrate-recover","arguments":{"uri":"unix:/r"}}"#),
        json!({"return": {}})
    );
    assert_eq!(
        c.call(r#"{"execute":"migrate-recover","arguments":{"uri":"tcp:h:1"}}"#),
        generic("unsupported uri tcp:h:1")
    );
    let missing = c.call(r#"{"execute":"migrate-recover"}"#);
    assert!(
        missing["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("missing field `uri`"),
        "{missing}"
    );
    let bad = c.call(r#"{"execute":"migrate","arguments":{"url":"x"}}"#);
    assert_eq!(bad["error"]["class"], "GenericError");
    assert!(
        bad["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("unknown field `url`"),
        "{bad}"
    );
    assert_eq!(
        c.call(r#"{"execute":"query-migrate"}"#)["return"],
        json!({"status": "postcopy-active", "ram": {
            "transferred": 4096, "remaining": 0, "total": 0, "duplicate": 0, "normal": 0, "normal-bytes": 0,
            "dirty-pages-rate": 0, "mbps": 1.5, "dirty-sync-count": 0, "postcopy-requests": 0, "page-size": 4096,
            "multifd-bytes": 0, "pages-per-second": 0, "precopy-bytes": 0, "downtime-bytes": 0, "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0}})
    );
    assert_eq!(
        c.call(r#"{"execute":"query-version"}"#),
        json!({"return": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "qmig"}})
    );
    assert_eq!(
        c.call(r#"{"execute":"qmp_capabilities"}"#),
        json!({"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}})
    );

    // Malformed input: typed errors, the connection stays usable.
    let parse = c.call(r#"{"execute": "#);
    assert_eq!(parse["error"]["class"], "GenericError");
    assert!(
        parse["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{parse}"
    );
    assert_eq!(c.call("[1,2]"), generic("QMP input must be a JSON object"));
    assert_eq!(
        c.call(r#"{"id":3}"#),
        json!({"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 3})
    );
    assert_eq!(
        c.call(r#"{"execute":5}"#),
        generic("QMP input member 'execute' must be a string")
    );
    assert_eq!(
        c.call(r#"{"execute":"echo","arguments":[1]}"#),
        generic("QMP input member 'arguments' must be an object")
    );
    assert_eq!(
        c.call(r#"{"execute":"echo","extra":1}"#),
        generic("QMP input member 'extra' is unexpected")
    );
    assert_eq!(
        c.call(r#"{"execute":"panic"}"#),
        generic("internal error: command handler panicked")
    );
    // Hostile shapes: deep nesting and invalid UTF-8 are parse errors, not crashes.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(c.call(&deep)["error"]["class"], "GenericError");
    c.w.write_all(b"{\"execute\":\"echo\",\"id\":\"\xff\xfe\"}\n")
        .unwrap();
    let utf8 = c.recv();
    assert!(
        utf8["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"),
        "{utf8}"
    );

    // Two commands on one line, blank lines ignored.
    c.send("\n\r\n{\"execute\":\"echo\",\"id\":1} {\"execute\":\"echo\",\"id\":2}\r\n");
    assert_eq!(c.recv(), json!({"return": {}, "id": 1}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
}

#[test]
fn events_reach_every_negotiated_client() {
    let f = fixture("events", QmpServerConfig::default());
    let mut a = Raw::negotiated(&f);
    let mut b = Raw::negotiated(&f);
    let (mut unnegotiated, _) = Raw::connect(&f);
    let local = f.server.events().subscribe(16);

    let ev = f.server.events();
    ev.migration(MigrationStatus::PostcopyActive);
    ev.migration_pass(3);
    ev.stop();
    ev.resume();

    for c in [&mut a, &mut b] {
        let got: Vec<Value> = (0..4).map(|_| c.recv()).collect();
        let strip: Vec<Value> = got
            .iter()
            .map(|e| {
                let ts = &e["timestamp"];
                assert!(ts["seconds"].as_i64().unwrap() > 1_600_000_000, "{e}");
                assert!(
                    (0..1_000_000).contains(&ts["microseconds"].as_i64().unwrap()),
                    "{e}"
                );
                let mut e = e.clone();
                e.as_object_mut().unwrap().remove("timestamp");
                e
            })
            .collect();
        assert_eq!(
            strip,
            vec![
                json!({"event": "MIGRATION", "data": {"status": "postcopy-active"}}),
                json!({"event": "MIGRATION_PASS", "data": {"pass": 3}}),
                json!({"event": "STOP"}),
                json!({"event": "RESUME"}),
            ]
        );
        let parsed: QmpEvent = serde_json::from_value(got[0].clone()).unwrap();
        assert_eq!(
            parsed.migration_status(),
            Some(MigrationStatus::PostcopyActive)
        );
    }
    let names: Vec<String> = local.try_iter().map(|e| e.event).collect();
    assert_eq!(names, ["MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"]);

    // A client in capabilities-negotiation mode got none of them: its next line is its reply.
    assert_eq!(
        unnegotiated.call(r#"{"execute":"qmp_capabilities","id":1}"#),
        json!({"return": {}, "id": 1})
    );
    ev.migration(MigrationStatus::Completed);
    assert_eq!(unnegotiated.recv()["data"]["status"], "completed");
}

#[test]
fn stalled_client_does_not_block_others_and_is_dropped() {
    let config = QmpServerConfig {
        line_timeout: Duration::from_millis(300),
        ..QmpServerConfig::default()
    };
    let f = fixture("stall", config);
    let (mut stalled, _) = Raw::connect(&f);
    stalled.send(r#"{"execute": "qmp_capab"#); // half a line, never finished

    let mut other = Raw::negotiated(&f);
    for i in 0..200 {
        let cmd = format!(r#"{{"execute":"echo","arguments":{{"i":{i}}},"id":{i}}}"#);
        assert_eq!(other.call(&cmd), json!({"return": {"i": i}, "id": i}));
    }
    // The incomplete line ran out of time: the server closed that client, and nothing was
    // answered for the half line.
    assert_eq!(stalled.drain_to_eof(), Vec::<String>::new());
    // A fresh client is still served.
    let mut again = Raw::negotiated(&f);
    assert_eq!(
        again.call(r#"{"execute":"echo","id":1}"#),
        json!({"return": {}, "id": 1})
    );
}

#[test]
fn client_that_never_negotiates_is_dropped() {
    let config = QmpServerConfig {
        negotiation_timeout: Duration::from_millis(300),
        ..QmpServerConfig::default()
    };
    let f = fixture("noneg", config);
    let (mut silent, _) = Raw::connect(&f);
    // A negotiated client is not affected by the negotiation timeout.
    let mut good = Raw::negotiated(&f);
    assert_eq!(silent.drain_to_eof(), Vec::<String>::new());
    assert_eq!(
        good.call(r#"{"execute":"echo","id":1}"#),
        json!({"return": {}, "id": 1})
    );
}

#[test]
fn idle_client_without_partial_line_stays() {
    let config = QmpServerConfig {
        line_timeout: Duration::from_millis(100),
        ..QmpServerConfig::default()
    };
    let f = fixture("idle", config);
    let mut idle = Raw::negotiated(&f);
    // Not synchronisation: time has to pass beyond the line timeout to show that it applies to
    // partial lines only.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        idle.call(r#"{"execute":"echo","id":5}"#),
        json!({"return": {}, "id": 5})
    );
}

#[test]
fn answers_while_another_clients_handler_is_blocked() {
    let f = fixture("blocked", QmpServerConfig::default());
    let mut a = Raw::negotiated(&f);
    let mut b = Raw::negotiated(&f);
    a.send("{\"execute\":\"block\",\"id\":\"a\"}\n");
    f.entered.recv_timeout(GUARD).expect("handler entered");
    // A's handler is blocked now: B is served, and events still reach A.
    for i in 0..20 {
        assert_eq!(
            b.call(&format!(r#"{{"execute":"echo","id":{i}}}"#)),
            json!({"return": {}, "id": i})
        );
    }
    f.server.events().migration(MigrationStatus::PostcopyPaused);
    assert_eq!(b.recv()["data"]["status"], "postcopy-paused");
    assert_eq!(a.recv()["data"]["status"], "postcopy-paused");
    f.release.send(()).unwrap();
    assert_eq!(a.recv(), json!({"return": "released", "id": "a"}));
}

#[test]
fn oversized_line_is_rejected_and_disconnected() {
    let config = QmpServerConfig {
        max_line: 1024,
        ..QmpServerConfig::default()
    };
    let f = fixture("long", config);
    let mut c = Raw::negotiated(&f);
    c.send(&"x".repeat(4096));
    let lines = c.drain_to_eof();
    assert_eq!(
        lines,
        vec!["{\"error\":{\"class\":\"GenericError\",\"desc\":\"QMP input line too long\"}}\r\n"]
    );
    let mut d = Raw::negotiated(&f);
    assert_eq!(d.call(r#"{"execute":"echo"}"#), json!({"return": {}}));
}

#[test]
fn client_that_never_reads_events_is_dropped_without_blocking_emit() {
    let config = QmpServerConfig {
        queue: 16,
        ..QmpServerConfig::default()
    };
    let f = fixture("slow", config);
    let mut slow = Raw::negotiated(&f);
    let ev = f.server.events();
    let big = "y".repeat(4096);
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..2000u64 {
            ev.emit_named("TEST", Some(json!({"i": i, "pad": big})));
        }
        done_tx.send(()).unwrap();
    });
    done_rx
        .recv_timeout(GUARD)
        .expect("emit must not block on a client that does not read");
    // The slow client was cut: it reads what the kernel buffered (possibly nothing, if its
    // queue overflowed before its writer ran), in order and whole, then end-of-file.
    let got = slow.drain_to_eof();
    assert!(got.len() < 2000, "{} events", got.len());
    for (i, line) in got.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!((&v["event"], &v["data"]["i"]), (&json!("TEST"), &json!(i)));
    }
    // The server goes on.
    let mut c = Raw::negotiated(&f);
    assert_eq!(c.call(r#"{"execute":"echo"}"#), json!({"return": {}}));
}

#[test]
fn quit_replies_then_signals() {
    let f = fixture("quit", QmpServerConfig::default());
    let mut a = Raw::negotiated(&f);
    let mut b = Raw::negotiated(&f);
    let quit = f.server.quit_signal();
    assert!(!quit.is_raised());
    assert_eq!(
        a.call(r#"{"execute":"quit","id":9}"#),
        json!({"return": {}, "id": 9})
    );
    let shutdown = a.recv();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(b.recv()["event"], "SHUTDOWN");
    assert!(quit.wait_timeout(GUARD));
    assert!(f.handler.quit_seen.load(Ordering::SeqCst));

    // Dropping the server disconnects its clients and removes the socket.
    let path = f.server.path().to_path_buf();
    let Fixture { server, .. } = f;
    drop(server);
    let mut rest = Vec::new();
    b.r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(!path.exists());
}

// ---------------------------------------------------------------------------------------------
// Shared QMP types against what real QEMU 7.2 and 10.0 sent and accepted (vector manifests)
// ---------------------------------------------------------------------------------------------

fn manifests() -> Vec<(PathBuf, Value)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../conformance/vectors");
    let mut out = Vec::new();
    for set in std::fs::read_dir(&root).unwrap() {
        let set = set.unwrap().path();
        let Ok(entries) = std::fs::read_dir(&set) else {
            continue;
        };
        for v in entries {
            let m = v.unwrap().path().join("manifest.json");
            if let Ok(text) = std::fs::read_to_string(&m) {
                out.push((m, serde_json::from_str(&text).unwrap()));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn typed<C: qmig_host::qmp_types::QmpCommandDef>(args: &Value) -> Result<Value, QmpError>
where
    C::Args: serde::Serialize,
{
    let a: C::Args = parse_args(args)?;
    Ok(serde_json::to_value(a).unwrap())
}

#[test]
fn captured_commands_events_and_migration_info_parse() {
    use qmig_host::qmp_types::*;
    let all = manifests();
    assert!(all.len() >= 10, "vectors missing: {}", all.len());
    let (mut commands, mut events, mut infos) = (0, 0, 0);
    for (path, m) in &all {
        for step in m["steps"].as_array().into_iter().flatten() {
            if step["action"] != "qmp" {
                continue;
            }
            let args = step.get("arguments").cloned().unwrap_or(json!({}));
            let name = step["qmp"].as_str().unwrap();
            let back = match name {
                "migrate" => typed::<Migrate>(&args),
                "migrate-incoming" => typed::<MigrateIncoming>(&args),
                "migrate-recover" => typed::<MigrateRecover>(&args),
                "migrate-pause" => typed::<MigratePause>(&args),
                "migrate-start-postcopy" => typed::<MigrateStartPostcopy>(&args),
                "migrate-continue" => typed::<MigrateContinue>(&args),
                "migrate-set-capabilities" => typed::<MigrateSetCapabilities>(&args),
                "migrate-set-parameters" => typed::<MigrateSetParameters>(&args),
                "pmemsave" => typed::<Pmemsave>(&args),
                other => panic!("{}: command {other} has no typed shape", path.display()),
            };
            // Typed and back gives the same JSON: nothing lost, nothing added.
            assert_eq!(
                back.unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display())),
                args,
                "{}",
                path.display()
            );
            commands += 1;
        }
        for e in m["qmp_events"].as_array().into_iter().flatten() {
            let ev = QmpEvent {
                event: e["event"].as_str().unwrap().into(),
                data: e.get("data").cloned(),
                timestamp: Timestamp {
                    seconds: 0,
                    microseconds: 0,
                },
            };
            match ev.event.as_str() {
                EVENT_MIGRATION => {
                    let st = ev.migration_status().unwrap();
                    assert!(
                        !matches!(st, MigrationStatus::Other(_)),
                        "{}: unknown status {st:?}",
                        path.display()
                    );
                    assert_eq!(serde_json::to_value(&st).unwrap(), e["data"]["status"]);
                }
                EVENT_MIGRATION_PASS => {
                    let d: MigrationPassData = serde_json::from_value(e["data"].clone()).unwrap();
                    assert_eq!(d.pass, e["data"]["pass"].as_u64().unwrap());
                }
                _ => {}
            }
            events += 1;
        }
        for (_side, info) in m["migration_info"].as_object().into_iter().flatten() {
            let mi: MigrationInfo = serde_json::from_value(info.clone()).unwrap();
            match (&mi.ram, info.get("ram")) {
                (Some(ram), Some(want)) => {
                    assert_eq!(ram.transferred, want["transferred"].as_u64().unwrap());
                    assert_eq!(ram.mbps, want["mbps"].as_f64().unwrap());
                    assert_eq!(ram.page_size, 4096);
                }
                (None, None) => {} // a destination reports only its status
                (got, want) => panic!("{}: ram {got:?} vs {want:?}", path.display()),
            }
            assert_eq!(mi.total_time, info["total-time"].as_u64());
            assert_eq!(serde_json::to_value(&mi.status).unwrap(), info["status"]);
            infos += 1;
        }
    }
    eprintln!(
        "{} manifests: {commands} commands, {events} events, {infos} query-migrate replies",
        all.len()
    );
    assert!(commands > 0 && events > 0 && infos > 0);
}

#[test]
fn migration_info_exact_shape_and_extensions() {
    use qmig_host::qmp_types::*;
    // A 10.0 reply from the postcopy-recover-pause capture, member for member.
    let captured = json!({"status": "completed", "setup-time": 0, "downtime": 11, "total-time": 1549, "ram": {
        "total": 67252224, "postcopy-requests": 8, "dirty-sync-count": 2, "multifd-bytes": 0, "pages-per-second": 11360,
        "downtime-bytes": 1011461, "page-size": 4096, "remaining": 0, "postcopy-bytes": 1033307, "mbps": 10.608986442866366,
        "transferred": 2054165, "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 0, "duplicate": 16042,
        "dirty-pages-rate": 0, "normal-bytes": 1896448, "normal": 463}});
    let mi: MigrationInfo = serde_json::from_value(captured.clone()).unwrap();
    assert_eq!(serde_json::to_value(&mi).unwrap(), captured);

    let mut ext = MigrationInfo {
        status: Some(MigrationStatus::PostcopyActive),
        ..Default::default()
    };
    ext.x_qmig = Some(QmigInfo {
        fault_latency_us: Some(LatencySummary {
            count: 2,
            min: 1.0,
            mean: 1.5,
            p50: 1.0,
            p90: 2.0,
            p99: 2.0,
            max: 2.0,
        }),
        faults: Some(2),
        ..Default::default()
    });
    assert_eq!(
        serde_json::to_value(&ext).unwrap(),
        json!({"status": "postcopy-active", "x-qmig": {"fault-latency-us":
            {"count": 2, "min": 1.0, "mean": 1.5, "p50": 1.0, "p90": 2.0, "p99": 2.0, "max": 2.0}, "faults": 2}})
    );
    let unknown: MigrationStatus = serde_json::from_value(json!("x-future")).unwrap();
    assert_eq!(unknown, MigrationStatus::Other("x-future".into()));
    let class: ErrorClass = serde_json::from_value(json!("SomethingNew")).unwrap();
    assert_eq!(class, ErrorClass::Other("SomethingNew".into()));

    // Typed commands on the wire.
    let c = QmpCommand::typed::<Migrate>(&MigrateArgs {
        uri: Some("unix:/x".into()),
        resume: Some(true),
        detach: None,
    })
    .unwrap()
    .id(1);
    assert_eq!(
        serde_json::to_value(&c).unwrap(),
        json!({"execute": "migrate", "arguments": {"uri": "unix:/x", "resume": true}, "id": 1})
    );
    let c = QmpCommand::typed::<QueryMigrate>(&Empty {}).unwrap();
    assert_eq!(
        serde_json::to_string(&c).unwrap(),
        r#"{"execute":"query-migrate"}"#
    );
    let p: MigrationParameters =
        serde_json::from_value(json!({"max-bandwidth": 1, "announce-step": 100})).unwrap();
    assert_eq!(p.max_bandwidth, Some(1));
    assert_eq!(p.other.get("announce-step"), Some(&json!(100)));
    assert!(matches!(
        QmpMessage::parse(r#"{"error":{"class":"GenericError","desc":"x"},"id":1}"#).unwrap(),
        QmpMessage::Error(_)
    ));
    assert!(matches!(
        QmpMessage::parse(r#"{"event":"STOP","timestamp":{"seconds":1,"microseconds":2}}"#)
            .unwrap(),
        QmpMessage::Event(_)
    ));
    assert!(matches!(
        QmpMessage::parse(r#"{"return":{}}"#).unwrap(),
        QmpMessage::Return(_)
    ));
}

#[test]
fn migration_status_matches_the_state_machines() {
    use qmig_protocol::machine::MigrationStatus as Machine;
    for &m in Machine::ALL {
        let q = MigrationStatus::from(m);
        assert!(!matches!(q, MigrationStatus::Other(_)), "{m:?}");
        assert_eq!(q.as_str(), m.as_str());
        assert_eq!(serde_json::to_value(&q).unwrap(), json!(m.as_str()));
        assert_eq!(q.to_machine(), Some(m));
        assert_eq!(MigrationStatus::from_qapi(m.as_str()), q);
    }
    assert_eq!(MigrationStatus::from_qapi("x-new").to_machine(), None);
    assert_eq!(MigrationStatus::from_qapi("x-new").to_string(), "x-new");

    // The event helper takes either type.
    let sink = EventSink::new();
    let rx = sink.subscribe(4);
    sink.migration(Machine::PostcopyRecover);
    let ev = rx.try_recv().unwrap();
    assert_eq!(
        ev.migration_status(),
        Some(MigrationStatus::PostcopyRecover)
    );
}

#[test]
fn clients_over_the_cap_are_closed_at_once() {
    let config = QmpServerConfig {
        max_clients: 2,
        ..QmpServerConfig::default()
    };
    let f = fixture("cap", config);
    let mut a = Raw::negotiated(&f);
    let _b = Raw::negotiated(&f);
    assert_eq!(f.server.client_count(), 2);
    let over = UnixStream::connect(f.server.path()).unwrap();
    over.set_read_timeout(Some(GUARD)).unwrap();
    let mut rest = Vec::new();
    (&over).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no greeting past the cap");
    assert_eq!(a.call(r#"{"execute":"echo"}"#), json!({"return": {}}));
}

#[test]
fn the_crates_qmp_client_drives_the_server() {
    use qmig_host::qmp_client::{QmpClient, QmpError as ClientError};
    use qmig_host::qmp_types::{QueryMigrate, QueryVersion};
    let f = fixture("client", QmpServerConfig::default());
    let mut c = QmpClient::connect(f.server.path()).unwrap();
    assert_eq!(c.greeting()["QMP"]["version"]["package"], "qmig");
    let info = c.execute_typed::<QueryMigrate>(&Empty {}).unwrap();
    assert_eq!(info.status, Some(MigrationStatus::PostcopyActive));
    assert_eq!(
        c.execute_typed::<QueryVersion>(&Empty {}).unwrap().package,
        "qmig"
    );
    assert_eq!(c.execute("echo", json!({"k": 1})).unwrap(), json!({"k": 1}));
    match c.execute("fail", json!({})) {
        Err(ClientError::Command { class, desc, .. }) => {
            assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "boom"))
        }
        other => panic!("{other:?}"),
    }
    let ev = f.server.events();
    ev.migration(MigrationStatus::PostcopyPaused);
    ev.migration(MigrationStatus::PostcopyRecover);
    assert_eq!(
        c.wait_status("postcopy-recover", GUARD).unwrap().status(),
        Some("postcopy-recover")
    );
}

#[test]
fn many_clients_commands_and_events_interleave_without_loss() {
    const CLIENTS: usize = 12;
    const COMMANDS: usize = 150;
    const EVENTS: u64 = 300;
    let f = fixture("many", QmpServerConfig::default());
    let clients: Vec<Raw> = (0..CLIENTS).map(|_| Raw::negotiated(&f)).collect();
    let ev = f.server.events();
    let emitter = std::thread::spawn(move || {
        for pass in 1..=EVENTS {
            ev.migration_pass(pass);
        }
    });
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut c)| {
            std::thread::spawn(move || {
                let mut passes = Vec::new();
                let mut replies = 0;
                for i in 0..COMMANDS {
                    c.send(&format!(
                        "{{\"execute\":\"echo\",\"arguments\":{{\"c\":{n}}},\"id\":{i}}}\n"
                    ));
                    loop {
                        let v = c.recv();
                        if v["event"] == "MIGRATION_PASS" {
                            passes.push(v["data"]["pass"].as_u64().unwrap());
                        } else {
                            assert_eq!(v, json!({"return": {"c": n}, "id": i}));
                            replies += 1;
                            break;
                        }
                    }
                }
                (c, passes, replies)
            })
        })
        .collect();
    emitter.join().unwrap();
    for w in workers {
        let (mut c, mut passes, replies) = w.join().unwrap();
        assert_eq!(replies, COMMANDS);
        // The events still in flight to this client arrive after its last reply.
        while passes.len() < EVENTS as usize {
            passes.push(c.recv()["data"]["pass"].as_u64().unwrap());
        }
        assert_eq!(
            passes,
            (1..=EVENTS).collect::<Vec<_>>(),
            "every event, in order"
        );
    }
}
