//! Test helpers: a `qmig-src` process with its QMP session, and a QEMU destination.

#![allow(dead_code)]

pub mod scenario;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qmig_conformance::qemu::{find_qemu, Qemu, QemuBinary, QemuVersion};
use qmig_host::qmp_client::QmpClient;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::stream::{Channel, StreamDecoder};
use serde_json::{json, Value};

/// Guard against hangs only; every wait is on an event.
pub const PHASE: Duration = Duration::from_secs(120);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A private scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory.
    pub fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!(
            "qmig-src-test-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `qmig-src`; killed on drop.
pub struct Src {
    child: Child,
    /// Its scratch directory (QMP socket, log, dumps).
    pub dir: Scratch,
    /// The QMP session (negotiated).
    pub qmp: QmpClient,
}

impl Src {
    /// Starts `qmig-src` with `args` (plus `--qmp`).
    pub fn spawn(args: &[&str]) -> Src {
        let dir = Scratch::new("src");
        let sock = dir.0.join("qmp.sock");
        let log = std::fs::File::create(dir.0.join("src.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_qmig-src"))
            .args(args)
            .arg("--qmp")
            .arg(format!("unix:{}", sock.display()))
            .env("QMIG_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let qmp = QmpClient::connect_retry(&sock, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("qmig-src QMP: {e}"));
        Src { child, dir, qmp }
    }

    /// Runs a command; panics with the log on error.
    pub fn cmd(&mut self, cmd: &str, args: Value) -> Value {
        match self.qmp.execute(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("qmig-src {cmd}: {e}\nlog:\n{}", self.log()),
        }
    }

    /// Waits for a MIGRATION status.
    pub fn wait(&mut self, status: &str) {
        if let Err(e) = self.qmp.wait_status(status, PHASE) {
            let info = self.qmp.execute("query-migrate", Value::Null);
            panic!(
                "qmig-src never reached {status}: {e}\nquery-migrate: {info:?}\nlog:\n{}",
                self.log()
            );
        }
    }

    /// The whole guest RAM (`size` bytes from 0) through `pmemsave`.
    pub fn dump(&mut self, size: u64) -> Vec<u8> {
        let f = self.dir.0.join("dump.bin");
        self.cmd(
            "pmemsave",
            json!({"val": 0, "size": size, "filename": f.display().to_string()}),
        );
        let d = std::fs::read(&f).unwrap();
        let _ = std::fs::remove_file(&f);
        d
    }

    /// The process log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("src.log")).unwrap_or_default()
    }
}

impl Drop for Src {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU of `v`, `None` to skip (fails instead when `CI`/`QMIG_REQUIRE_QEMU` is set).
pub fn qemu(v: QemuVersion) -> Option<QemuBinary> {
    find_qemu(v).unwrap_or_else(|e| panic!("{e}"))
}

/// The QEMU destination's listening port after `cmd` (`migrate-incoming`/`migrate-recover`)
/// on port 0, read from `query-migrate` `socket-address`.
pub fn qemu_listen(dst: &mut Qemu, cmd: &str) -> u16 {
    dst.qmp(cmd, json!({"uri": "tcp:127.0.0.1:0"}))
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let info = dst.qmp("query-migrate", Value::Null).unwrap();
    info.get("socket-address")
        .and_then(Value::as_array)
        .and_then(|a| a.last())
        .and_then(|a| a.get("port"))
        .and_then(|p| {
            p.as_str()
                .map(str::to_owned)
                .or_else(|| p.as_u64().map(|n| n.to_string()))
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {info}"))
}

/// Index of the first differing 4 KiB page.
pub fn first_diff_page(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y)
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Decodes the whole items of a (possibly cut) main stream; the decoder is left after the
/// last whole item (ready for `resume_from`).
pub fn decode_main(stream: &[u8], profile: Profile) -> StreamDecoder {
    let mut d = StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT);
    let mut pos = 0;
    while pos < stream.len() {
        match d.decode(&stream[pos..]) {
            Ok((_, n)) => pos += n,
            Err(e) => {
                assert!(e.is_incomplete(), "main stream at {pos}: {e:?}");
                break;
            }
        }
    }
    d
}

/// Waits until the destination has processed POSTCOPY_RUN (its run state leaves `inmigrate`).
/// QEMU announces `postcopy-active` at LISTEN already, and a cut or `migrate-pause` before RUN
/// is fatal by design (SM-FATAL-BEFORE-RUN; spec/deviations.md), so a scenario that cuts or
/// pauses waits for this first (the interop matrix's rule, shared from there).
pub fn wait_destination_ran(qmp: &mut QmpClient) {
    if let Err(e) = qmig_conformance::interop::cell::wait_destination_ran(qmp, PHASE) {
        panic!("{e:#}");
    }
}
