//! A requested page does not wait behind bulk data: in postcopy, a page request from a fake
//! destination (which keeps reading) is answered within a short burst of the stream, although
//! the background scan would reach that page only after the whole guest.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use common::{Src, PHASE};
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::RpMessage;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use serde_json::{json, Value};

/// In flight between a request and its page, at most: the pacing burst (64 KiB at these rates),
/// one `poll_transmit` budget and section (32 KiB + 16 pages), the kernel send buffer
/// (2 x 256 KiB) and what the reader has not read yet.
const BOUND: u64 = 1 << 20;

#[test]
fn requested_page_overtakes_the_background_scan() {
    let mut src = Src::spawn(&[
        "--ram",
        "16M",
        "--profile",
        "7.2",
        "--fill",
        "random",
        "--seed",
        "9",
    ]);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "postcopy-ram", "state": true},
            {"capability": "return-path", "state": true},
            {"capability": "events", "state": true}]}),
    );
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 2u64 << 20, "max-postcopy-bandwidth": 1u64 << 20}),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let (mut s, _) = l.accept().unwrap();

    // The reader decodes everything and reports page records with their stream offsets.
    let read = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<(u64, u64)>();
    let (mut r, read2) = (s.try_clone().unwrap(), read.clone());
    std::thread::spawn(move || {
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 1 << 16]);
        loop {
            let n = match r.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            read2.fetch_add(n as u64, Ordering::SeqCst);
            let mut pos = 0;
            while let Ok((item, used)) = d.decode(&buf[pos..]) {
                pos += used;
                if let Item::Ram(rec) = item {
                    if matches!(rec.body, RamBody::Page(_)) {
                        // (stream offset just after the record, page index)
                        let _ = tx.send((d.offset(), rec.addr / 4096));
                    }
                }
            }
            buf.drain(..pos);
        }
    });

    src.wait("active");
    src.cmd("migrate-start-postcopy", Value::Null);
    src.wait("postcopy-active");
    let page = 4096 - 5; // near the end of the 16 MiB block
    let at = read.load(Ordering::SeqCst);
    let mut req = Vec::new();
    RpMessage::ReqPagesId {
        start: page * 4096,
        len: 4096,
        name: b"ram",
    }
    .encode(&mut req);
    s.write_all(&req).unwrap();
    let arrived = loop {
        let (off, p) = rx
            .recv_timeout(PHASE)
            .expect("the requested page never came");
        if p == page {
            break off;
        }
    };
    assert!(
        arrived > at && arrived - at <= BOUND,
        "the requested page came {} bytes after the request (bound {BOUND})",
        arrived - at
    );
    eprintln!(
        "requested page {page}: {} bytes after the request (stream at {at})",
        arrived - at
    );
    // The background scan was far from it: the guest is 16 MiB and only a part was sent.
    assert!(at < 12 << 20, "the stream was already at {at}");
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["ram"]["postcopy-requests"], 1, "{info}");
}
