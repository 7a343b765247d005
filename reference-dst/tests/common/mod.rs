//! Test helpers: running `qmig-dst` as a process and driving it over QMP, feeding channels,
//! and comparing return paths by the vectors' rules.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qmig_conformance::qemu::proxy::Dir;
use qmig_conformance::qemu::Proxy;
use qmig_host::qmp_client::QmpClient;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Failure guard for one wait (never a synchronisation means).
pub const GUARD: Duration = Duration::from_secs(90);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running qmig-dst, killed on drop.
pub struct Dst {
    child: Child,
    /// Its private directory (QMP socket, log, dumps).
    pub dir: PathBuf,
    /// A negotiated QMP session.
    pub qmp: QmpClient,
}

impl Dst {
    /// Starts `qmig-dst` with `args` (the QMP socket is added) and connects to its QMP socket.
    pub fn spawn(args: &[&str]) -> Dst {
        let dir = std::env::temp_dir().join(format!(
            "qmig-dst-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sock = dir.join("qmp.sock");
        let log = std::fs::File::create(dir.join("dst.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_qmig-dst"))
            .arg("--qmp")
            .arg(format!("unix:{}", sock.display()))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn qmig-dst");
        let mut qmp = QmpClient::connect_retry(&sock, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("qmig-dst QMP: {e}; log: {}", read_log(&dir)));
        qmp.set_command_timeout(Some(GUARD));
        Dst { child, dir, qmp }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir)
    }

    /// Runs a command; panics with the log on error.
    pub fn cmd(&mut self, cmd: &str, args: Value) -> Value {
        match self.qmp.execute(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("qmig-dst {cmd}: {e}; log:\n{}", self.log()),
        }
    }

    /// `cmd` with `uri` `tcp:127.0.0.1:0`, then the port from `query-migrate` `socket-address`.
    pub fn listen(&mut self, cmd: &str) -> SocketAddr {
        self.cmd(cmd, json!({"uri": "tcp:127.0.0.1:0"}));
        let info = self.cmd("query-migrate", json!({}));
        let port: u16 = info["socket-address"][0]["port"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {info}"));
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Waits for the `MIGRATION` event with `status`.
    pub fn wait_status(&mut self, status: &str) {
        if let Err(e) = self.qmp.wait_status(status, GUARD) {
            panic!("qmig-dst never reached {status}: {e}; log:\n{}", self.log());
        }
    }

    /// `query-migrate`.
    pub fn info(&mut self) -> Value {
        self.cmd("query-migrate", json!({}))
    }

    /// `pmemsave` of `size` bytes from guest-physical 0.
    pub fn pmemsave(&mut self, size: u64) -> Vec<u8> {
        let f = self
            .dir
            .join(format!("pmem-{}.bin", SEQ.fetch_add(1, Ordering::Relaxed)));
        self.cmd(
            "pmemsave",
            json!({"val": 0, "size": size, "filename": f.display().to_string()}),
        );
        std::fs::read(&f).expect("pmemsave file")
    }

    /// One whole RAM block by name.
    pub fn ramsave(&mut self, block: &str) -> Vec<u8> {
        let f = self
            .dir
            .join(format!("block-{}.bin", SEQ.fetch_add(1, Ordering::Relaxed)));
        self.cmd(
            "x-qmig-ramsave",
            json!({"block": block, "filename": f.display().to_string()}),
        );
        std::fs::read(&f).expect("ramsave file")
    }
}

impl Drop for Dst {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "qmig-dst log ({}):\n{}",
                self.dir.display(),
                read_log(&self.dir)
            );
        }
    }
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("dst.log")).unwrap_or_default()
}

/// Connects to `addr`, writes `data`, half-closes, and returns everything read back until the
/// peer closes.
pub fn feed(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect to qmig-dst");
    let mut r = s.try_clone().expect("clone");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out);
        out
    });
    // The destination may stop reading (a rejected stream): a failed write is not an error here.
    let _ = s.write_all(data);
    let _ = s.shutdown(Shutdown::Write);
    reader.join().expect("reader")
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A return-path message in a comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rp {
    /// SHUT(v).
    Shut(u32),
    /// PONG(v).
    Pong(u32),
    /// A page request (either form).
    Req,
    /// RECV_BITMAP: name and bitmap bytes.
    Bitmap(Vec<u8>, Vec<u8>),
    /// RESUME_ACK(v).
    ResumeAck(u32),
    /// Anything else.
    Other,
}

/// Decodes a whole return path.
pub fn decode_rp(bytes: &[u8], profile: Profile) -> Vec<Rp> {
    let mut d = RpDecoder::new(profile, Limits::DEFAULT);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (m, n) = d
            .decode(&bytes[pos..], &|_| None)
            .unwrap_or_else(|e| panic!("return path at {pos}: {e:?}"));
        out.push(match m {
            RpMessage::Shut(v) => Rp::Shut(v),
            RpMessage::Pong(v) => Rp::Pong(v),
            RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. } => Rp::Req,
            RpMessage::RecvBitmap { name, bitmap } => Rp::Bitmap(name.to_vec(), bitmap.to_vec()),
            RpMessage::ResumeAck(v) => Rp::ResumeAck(v),
            _ => Rp::Other,
        });
        pos += n;
    }
    out
}

/// Checks `got` against `expected` under the vectors' `return_path_rule`; `complete`: the
/// channel ran to the end (SHUT(0) last).
pub fn check_rp(
    rule: &str,
    got: &[u8],
    expected: &[u8],
    profile: Profile,
    complete: bool,
    what: &str,
) {
    if rule == "exact" {
        assert_eq!(got, expected, "{what}: return path differs");
        return;
    }
    let g = decode_rp(got, profile);
    let e = decode_rp(expected, profile);
    if complete {
        assert_eq!(g.last(), Some(&Rp::Shut(0)), "{what}: SHUT(0) last: {g:?}");
    }
    let strip = |v: &[Rp]| -> (Vec<Rp>, Vec<u32>) {
        let mut pongs: Vec<u32> = Vec::new();
        let mut rest = Vec::new();
        for m in v.iter().filter(|m| **m != Rp::Req) {
            match m {
                Rp::Pong(p) => pongs.push(*p),
                other => rest.push(other.clone()),
            }
        }
        pongs.sort_unstable();
        (rest, pongs)
    };
    if rule == "recovery" {
        // Bitmaps byte for byte first, in order, then RESUME_ACK(1).
        let nb = e.iter().take_while(|m| matches!(m, Rp::Bitmap(..))).count();
        assert!(nb > 0, "{what}: expected bitmaps first");
        assert_eq!(&g[..nb], &e[..nb], "{what}: RECV_BITMAP answers differ");
        assert_eq!(g[nb], Rp::ResumeAck(1), "{what}: RESUME_ACK after bitmaps");
    }
    assert_eq!(strip(&g), strip(&e), "{what}: return path messages differ");
}

/// Pages of a recorded main channel sent again as data (a page, XBZRLE or compressed
/// record) after a first copy that was a ZERO record (on qmig-dst: a lazy zero page, nothing
/// mapped, when the resend arrives), as `(block name, offset)`, in order of the resends. Decodes up to EOF (or the end of the
/// recording).
pub fn resent_after_zero(stream: &[u8], profile: Profile) -> Vec<(Vec<u8>, u64)> {
    let mut d = StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT);
    let mut first_zero: std::collections::HashMap<(Vec<u8>, u64), bool> = Default::default();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let Ok((item, n)) = d.decode(&stream[pos..]) else {
            break;
        };
        pos += n;
        match item {
            Item::Ram(rec) => {
                let zero = match rec.body {
                    RamBody::Zero { .. } => true,
                    RamBody::Page(_) | RamBody::Xbzrle(_) | RamBody::Compressed(_) => false,
                    _ => continue,
                };
                let Some(name) = rec.block(d.ram()) else {
                    continue;
                };
                let key = (name.to_vec(), rec.addr);
                match first_zero.get(&key) {
                    Some(true) if !zero => out.push(key),
                    Some(_) => {}
                    None => {
                        first_zero.insert(key, zero);
                    }
                }
            }
            Item::Eof => break,
            _ => {}
        }
    }
    out
}

/// Waits until qmig-dst has answered PING `n` on connection 0 of `proxy` (its return path).
/// qmig-dst handles its stream in order on one thread, so PONG 4 (QEMU sends PING 4 after
/// the package that ends with POSTCOPY_RUN) proves RUN was processed: a failure injected
/// after it pauses (SM-PAUSE-AFTER-RUN) instead of failing (SM-FATAL-BEFORE-RUN).
pub fn wait_pong(proxy: &Proxy, n: u32) {
    let mut seen = 0;
    loop {
        let got = proxy
            .wait_forwarded(0, Dir::DstToSrc, seen + 1, GUARD)
            .unwrap_or_else(|e| panic!("no PONG {n} from qmig-dst: {e}"));
        let rp = proxy.recordings()[0].d2s.bytes.clone();
        if complete_prefix(&rp).contains(&Rp::Pong(n)) {
            return;
        }
        seen = got;
    }
}

/// The return-path messages of the longest whole-message prefix of `rp`.
pub fn complete_prefix(rp: &[u8]) -> Vec<Rp> {
    // A message header is type (2) + length (2); RECV_BITMAP bodies never occur before RUN.
    let mut end = 0;
    while end + 4 <= rp.len() {
        let len = u16::from_be_bytes([rp[end + 2], rp[end + 3]]) as usize;
        if end + 4 + len > rp.len() {
            break;
        }
        end += 4 + len;
    }
    decode_rp(&rp[..end], Profile::QEMU_10)
}
