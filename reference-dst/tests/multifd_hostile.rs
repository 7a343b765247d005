//! Hostile multifd connections into qmig-dst: the migration fails with the rule id and the
//! offset in `query-migrate`'s `error-desc`, and qmig-dst stays up answering QMP.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;

use common::Dst;
use serde_json::{json, Value};

fn vector(file: &str) -> Vec<u8> {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/qemu-7.2/precopy-multifd"
    ))
    .join(file);
    std::fs::read(p).unwrap()
}

fn send(addr: SocketAddr, data: Vec<u8>) -> (TcpStream, std::thread::JoinHandle<()>) {
    let s = TcpStream::connect(addr).expect("connect");
    let mut w = s.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.shutdown(Shutdown::Write);
    });
    (s, t)
}

/// The 7.2 capture's main stream, then `conns` as its two multifd connections; returns
/// `query-migrate` once failed.
fn run(conns: [Vec<u8>; 2]) -> Value {
    let mut dst = Dst::spawn(&[
        "--ram",
        "32M",
        "--machine",
        "none",
        "--profile",
        "7.2",
        "--capabilities",
        "multifd,return-path",
    ]);
    dst.cmd("migrate-set-parameters", json!({"multifd-channels": 2}));
    let addr = dst.listen("migrate-incoming");
    let mut keep = vec![send(addr, vector("stream.bin"))];
    for c in conns {
        keep.push(send(addr, c));
    }
    let ev = dst
        .qmp
        .wait_event("MIGRATION", |d| d["status"] == "failed", common::GUARD);
    if let Err(e) = ev {
        panic!("not failed: {e}; log:\n{}", dst.log());
    }
    let info = dst.info();
    assert_eq!(info["status"], "failed", "{info}");
    let st = dst.cmd("query-status", json!({}));
    assert!(st["status"].is_string(), "{st}");
    drop(keep);
    info
}

fn desc(info: &Value) -> &str {
    info["error-desc"].as_str().unwrap_or_default()
}

#[test]
fn garbage_after_the_magic_fails_mfd_version() {
    let mut bad = vector("multifd-conn2.bin");
    bad[4..64].fill(0xa5);
    let info = run([vector("multifd-conn1.bin"), bad]);
    assert!(desc(&info).starts_with("offset 4: MFD-VERSION:"), "{info}");
}

#[test]
fn duplicate_channel_id_fails_mfd_channel() {
    let c1 = vector("multifd-conn1.bin");
    let mut c2 = vector("multifd-conn2.bin");
    c2[24] = c1[24];
    let info = run([c1, c2]);
    assert!(desc(&info).starts_with("offset 24: MFD-CHANNEL:"), "{info}");
}

#[test]
fn truncated_connection_fails_stream_truncated() {
    let c1 = vector("multifd-conn1.bin");
    // Cut 100 bytes into the packet after the init packet.
    let cut = c1[..64 + 100].to_vec();
    let info = run([cut, vector("multifd-conn2.bin")]);
    assert!(
        desc(&info).starts_with("offset 64: STREAM-TRUNCATED:"),
        "{info}"
    );
}
