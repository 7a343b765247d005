//! The silence bound (SM-TIMEOUT): with `--silence-timeout` or the `x-qmig-silence-timeout`
//! parameter, a migration channel that stays open but delivers nothing for longer than the
//! bound counts as lost — the migration fails before POSTCOPY_RUN and pauses after it, with
//! `SM-TIMEOUT` in `error-desc`, and qmig-dst closes the connection. Bytes that keep coming,
//! however slowly, never trip it. Without a bound a silent channel waits forever (QEMU's
//! behaviour, deviation D-12).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::Dst;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use serde_json::{json, Value};

/// Where PING 4 after the PACKAGED blob (LISTEN .. RUN) ends in the 7.2 postcopy capture.
const AFTER_RUN: usize = 752287;

fn postcopy_stream() -> Vec<u8> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/qemu-7.2/postcopy/stream.bin"
    ));
    std::fs::read(p).unwrap()
}

fn vmdesc() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/qemu-7.2/postcopy/vmdesc.json"
    )
    .to_string()
}

/// A postcopy destination of the 7.2 capture with `extra` arguments and migration
/// parameters `params` (none: `Value::Null`), listening.
fn start(extra: &[&str], params: Value) -> (Dst, std::net::SocketAddr) {
    let vd = vmdesc();
    let mut args = vec![
        "--ram",
        "64M",
        "--profile",
        "7.2",
        "--capabilities",
        "postcopy-ram,return-path",
        "--vmdesc",
        &vd,
    ];
    args.extend_from_slice(extra);
    let mut d = Dst::spawn(&args);
    if !params.is_null() {
        d.cmd("migrate-set-parameters", params);
    }
    let addr = d.listen("migrate-incoming");
    (d, addr)
}

/// Waits for the MIGRATION event `status`; returns `query-migrate`.
fn wait(d: &mut Dst, status: &str) -> Value {
    d.wait_status(status);
    d.info()
}

/// Reads the connection to its end (the destination closed it); returns the bytes read.
fn read_to_close(c: &mut TcpStream) -> Vec<u8> {
    c.set_read_timeout(Some(common::GUARD)).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out)
        .expect("the destination closes the silent channel");
    out
}

#[test]
fn a_silent_channel_after_run_pauses() {
    let s = postcopy_stream();
    let (mut d, addr) = start(&["--silence-timeout", "300ms"], Value::Null);
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&s[..AFTER_RUN]).unwrap();
    // The source stays connected and says nothing more.
    let info = wait(&mut d, "postcopy-paused");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.starts_with("channel lost: SM-TIMEOUT: "),
        "{info}; log:\n{}",
        d.log()
    );
    let rp = read_to_close(&mut c);
    assert!(!rp.is_empty(), "the return path carried the PONGs first");
    // Recoverable like any loss after RUN.
    d.listen("migrate-recover");
}

#[test]
fn a_silent_channel_before_run_fails() {
    let s = postcopy_stream();
    let (mut d, addr) = start(&["--silence-timeout", "300ms"], Value::Null);
    let mut c = TcpStream::connect(addr).unwrap();
    // Header, configuration and the first sections: precopy, before any postcopy command.
    c.write_all(&s[..4096]).unwrap();
    let info = wait(&mut d, "failed");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(desc.starts_with("channel lost: SM-TIMEOUT: "), "{info}");
    read_to_close(&mut c);
}

/// The bound measures silence, not time: the stream trickles in for 20 gaps of 100 ms (2 s in
/// all, well past the 500 ms bound) and the migration stays open; the loss that follows is an
/// ordinary close, not a timeout. The parameter sets the bound here.
#[test]
fn bytes_that_keep_coming_never_trip_the_bound() {
    let s = postcopy_stream();
    let (mut d, addr) = start(&[], json!({"x-qmig-silence-timeout": 500}));
    let mut c = TcpStream::connect(addr).unwrap();
    let parts = 20;
    let step = AFTER_RUN.div_ceil(parts);
    for chunk in s[..AFTER_RUN].chunks(step) {
        c.write_all(chunk).unwrap();
        // Pacing of the trickle (the bound must not fire between chunks), not a wait for
        // an event.
        std::thread::sleep(Duration::from_millis(100));
    }
    let info = d.info();
    assert_eq!(info["status"], "postcopy-active", "{info}");
    drop(c);
    let info = wait(&mut d, "postcopy-paused");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("SM-PAUSE-AFTER-RUN") && !desc.contains("SM-TIMEOUT"),
        "{info}"
    );
}

/// The PONG values of the complete messages in `rp`.
fn pongs(rp: &[u8]) -> Vec<u32> {
    let mut d = RpDecoder::new(Profile::QEMU_7_2, Limits::DEFAULT);
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok((m, n)) = d.decode(&rp[pos..], &|_| None) {
        if let RpMessage::Pong(v) = m {
            out.push(v);
        }
        pos += n;
    }
    out
}

/// `x-qmig-silence-timeout` 0 turns a `--silence-timeout` off.
#[test]
fn parameter_zero_turns_the_bound_off() {
    let s = postcopy_stream();
    let (mut d, addr) = start(
        &["--silence-timeout", "100ms"],
        json!({"x-qmig-silence-timeout": 0}),
    );
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&s[..AFTER_RUN]).unwrap();
    // The PONG of PING 4 (the last message before the silence) proves every byte was read.
    c.set_read_timeout(Some(common::GUARD)).unwrap();
    let mut rp = Vec::new();
    let mut buf = [0u8; 4096];
    while !pongs(&rp).contains(&4) {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", d.log());
        rp.extend_from_slice(&buf[..n]);
    }
    // Far past the 100 ms of --silence-timeout, the silent channel is still open: a
    // `query-migrate` answered in postcopy-active after a second read that times out.
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let r = c.read(&mut buf);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    assert_eq!(d.info()["status"], "postcopy-active");
}
