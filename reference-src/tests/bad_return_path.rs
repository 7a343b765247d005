//! Hostile return-path input: qmig-src pauses (postcopy) or fails (precopy) with the rule id and
//! the offset in `error-desc`, never crashes, and still recovers afterwards. A fake destination
//! in the test writes the bad messages.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;

use common::{decode_main, Src};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::profile::Profile;
use qmig_protocol::rp::RpMessage;
use qmig_protocol::stream::{Item, StreamDecoder};
use serde_json::{json, Value};

const PAGES: u64 = (16 << 20) / 4096;

fn rp(m: RpMessage<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

/// A qmig-src migrating 16 MiB (postcopy-ram, return-path) to a fake destination, slowly.
fn start(profile: &str, params: Value) -> (Src, TcpStream, JoinHandle<Vec<u8>>) {
    let mut src = Src::spawn(&[
        "--ram",
        "16M",
        "--profile",
        profile,
        "--fill",
        "random",
        "--seed",
        "5",
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
    src.cmd("migrate-set-parameters", params);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let (s, _) = l.accept().unwrap();
    let mut r = s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    });
    (src, s, drain)
}

fn error_desc(src: &mut Src) -> String {
    let info = src.cmd("query-migrate", Value::Null);
    info["error-desc"]
        .as_str()
        .unwrap_or_else(|| panic!("no error-desc: {info}"))
        .to_owned()
}

/// Reads a recovery channel until `want` matches an item.
fn read_until(
    s: &mut TcpStream,
    dec: &mut StreamDecoder,
    buf: &mut Vec<u8>,
    want: &dyn Fn(&Item) -> bool,
) {
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let mut pos = 0;
        let mut found = false;
        while let Ok((item, n)) = dec.decode(&buf[pos..]) {
            pos += n;
            if want(&item) {
                found = true;
                break;
            }
        }
        buf.drain(..pos);
        if found {
            return;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "channel ended before the expected item");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `migrate resume=true` to a new fake listener; returns the accepted recovery channel.
fn resume(src: &mut Src) -> TcpStream {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "resume": true}),
    );
    l.accept().unwrap().0
}

#[test]
fn page_request_in_precopy_fails_with_rp_order() {
    let (mut src, mut s, drain) = start("7.2", json!({}));
    src.wait("active");
    s.write_all(&rp(RpMessage::ReqPagesId {
        start: 0,
        len: 4096,
        name: b"ram",
    }))
    .unwrap();
    src.wait("failed");
    let e = error_desc(&mut src);
    assert!(e.starts_with("offset 0: RP-ORDER: "), "{e}");
    // qmig-src closed the channel and still answers.
    drain.join().unwrap();
    assert_eq!(src.cmd("query-status", Value::Null)["running"], true);
}

#[test]
fn postcopy_bad_inputs_pause_and_recovery_still_completes() {
    let (mut src, mut s, drain) = start("7.2", json!({}));
    src.wait("active");
    src.cmd("migrate-start-postcopy", Value::Null);
    src.wait("postcopy-active");

    // 1. A page request beyond the block: RP-REQ-RANGE at the start field (offset 4).
    s.write_all(&rp(RpMessage::ReqPagesId {
        start: 16 << 20,
        len: 4096,
        name: b"ram",
    }))
    .unwrap();
    src.wait("postcopy-paused");
    let e = error_desc(&mut src);
    assert!(e.starts_with("offset 4: RP-REQ-RANGE: "), "{e}");
    let main = drain.join().unwrap();
    drop(s);
    let main_dec = decode_main(&main, Profile::QEMU_7_2);

    let bitmap = PageBitmap::full(PAGES).to_le_vec();
    let good = rp(RpMessage::RecvBitmap {
        name: b"ram",
        bitmap: &bitmap,
    });
    let is_recv_bitmap = |i: &Item| matches!(i, Item::Command(Command::RecvBitmap { .. }));

    // 2. A received bitmap with a broken end mark (it follows 4 + 4 + 8 + 512 bytes).
    let mut s2 = resume(&mut src);
    src.wait("postcopy-recover");
    let (mut dec, mut buf) = (main_dec.resume_from(), Vec::new());
    read_until(&mut s2, &mut dec, &mut buf, &is_recv_bitmap);
    let mut bad = good.clone();
    *bad.last_mut().unwrap() ^= 0xff;
    s2.write_all(&bad).unwrap();
    src.wait("postcopy-paused");
    let e = error_desc(&mut src);
    assert!(e.starts_with("offset 528: RP-BITMAP-ENDMARK: "), "{e}");

    // 3. A bitmap size that does not fit the block: RP-BITMAP-SIZE at the size field (8).
    let mut s3 = resume(&mut src);
    src.wait("postcopy-recover");
    let (mut dec, mut buf) = (main_dec.resume_from(), Vec::new());
    read_until(&mut s3, &mut dec, &mut buf, &is_recv_bitmap);
    let mut bad = good[..8].to_vec();
    bad.extend_from_slice(&8u64.to_be_bytes());
    bad.extend_from_slice(&[0xff; 8]);
    bad.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    s3.write_all(&bad).unwrap();
    src.wait("postcopy-paused");
    let e = error_desc(&mut src);
    assert!(e.starts_with("offset 8: RP-BITMAP-SIZE: "), "{e}");

    // 4. A good recovery: everything received, so nothing is resent; EOF, SHUT, completed.
    let mut s4 = resume(&mut src);
    src.wait("postcopy-recover");
    let (mut dec, mut buf) = (main_dec.resume_from(), Vec::new());
    read_until(&mut s4, &mut dec, &mut buf, &is_recv_bitmap);
    s4.write_all(&good).unwrap();
    read_until(&mut s4, &mut dec, &mut buf, &|i| {
        matches!(i, Item::Command(Command::PostcopyResume))
    });
    s4.write_all(&rp(RpMessage::ResumeAck(1))).unwrap();
    src.wait("postcopy-active");
    let pages = std::cell::Cell::new(0u32);
    read_until(&mut s4, &mut dec, &mut buf, &|i| {
        if matches!(i, Item::Ram(r) if r.addr % 4096 == 0 && !matches!(r.body, qmig_protocol::ram::RamBody::Eos))
        {
            pages.set(pages.get() + 1);
        }
        matches!(i, Item::Eof)
    });
    assert_eq!(pages.get(), 0, "a page was resent although received");
    s4.write_all(&rp(RpMessage::Shut(0))).unwrap();
    src.wait("completed");
    let info = src.cmd("query-migrate", Value::Null);
    assert_eq!(info["x-qmig"]["recoveries"], 3, "{info}");
    let _ = s4.shutdown(Shutdown::Both);
}

#[test]
fn silent_destination_in_recovery_times_out_and_pauses() {
    let (mut src, s, drain) = start("10", json!({"x-return-path-timeout": 300}));
    src.wait("active");
    src.cmd("migrate-start-postcopy", Value::Null);
    src.wait("postcopy-active");
    s.shutdown(Shutdown::Both).unwrap();
    src.wait("postcopy-paused");
    let main = drain.join().unwrap();
    let main_dec = decode_main(&main, Profile::QEMU_10);
    // The recovery channel asks for the bitmap and gets no answer.
    let mut s2 = resume(&mut src);
    src.wait("postcopy-recover-setup");
    src.wait("postcopy-recover");
    let (mut dec, mut buf) = (main_dec.resume_from(), Vec::new());
    read_until(&mut s2, &mut dec, &mut buf, &|i| {
        matches!(i, Item::Command(Command::RecvBitmap { .. }))
    });
    src.wait("postcopy-paused");
    let e = error_desc(&mut src);
    assert!(e.starts_with("SM-TIMEOUT: "), "{e}");
    // qmig-src closed the silent channel.
    let mut rest = Vec::new();
    s2.read_to_end(&mut rest).unwrap();
}
