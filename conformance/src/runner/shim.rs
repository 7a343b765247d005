//! The shim contract: how the runner starts an implementation under test.
//!
//! A target is a command-line template. The runner splits it into words (whitespace; single or
//! double quotes group), then replaces placeholders inside each word. A word that is exactly a
//! list placeholder (`{CPU}`, `{BIOS}`, `{VMDESC}`, `{BLOCK_ARGS}`, `{DEVICES}`, `{MEM_BACKEND}`,
//! `{RAM_PAGE_SIZE}`) expands to zero or more words.
//!
//! | placeholder | value |
//! |---|---|
//! | `{QMP}` | path of the unix socket the target must serve QMP on (server side) |
//! | `{LISTEN}` | `tcp:127.0.0.1:PORT`: if the template uses it the target listens there from the start; otherwise the runner sends `migrate-incoming` with that URI |
//! | `{CONNECT}` | `tcp:127.0.0.1:PORT` where the runner (playing the destination) listens; sources get it in `migrate` too |
//! | `{RAM}` | main RAM block size, QEMU syntax (`64M`) |
//! | `{RAM_BYTES}` | the same in bytes |
//! | `{MACHINE}` | `none` or `microvm` |
//! | `{BLOCKS}` | extra RAM blocks `NAME:BYTES,...` beyond the machine's own (usually empty) |
//! | `{PROFILE}` | `7.2` or `10` |
//! | `{CAPS}` | capabilities the vector needs, comma-separated (`postcopy-ram,return-path`) |
//! | `{CPU}` | list: `-cpu MODEL` when the vector's machine had a CPU, else nothing |
//! | `{BIOS}` | list: `-bios FILE` (the generated test firmware) on microvm, else nothing |
//! | `{VMDESC}` | list: `--vmdesc FILE` when the vector has a VM description, else nothing |
//! | `{DIR}` | a private scratch directory |
//! | `{RAM_FILE}` | (sources) a raw image of the main RAM block the source starts from |
//! | `{BLOCK_ARGS}` | (sources) list: `--block NAME:BYTES` per RAM block beyond the main one |
//! | `{DEVICES}` | (sources) list: `--device-template FILE` on microvm, else nothing |
//! | `{QTEST}` | (sources) a qtest socket path: if used, the runner writes the RAM image through it |
//! | `{MEM_BACKEND}` | list, QEMU syntax: for a main block whose page size is not 4 KiB (`machine.ram_page_size`, the huge-page synthetic cases) `-object memory-backend-file,id=BLOCK,size=BYTES,mem-path=/dev/hugepages,share=on -machine memory-backend=BLOCK` (a hugetlbfs file named like the block); else nothing |
//! | `{RAM_PAGE_SIZE}` | list: `--ram-page-size BYTES` for such a block (qmig-dst syntax), else nothing |
//!
//! Exit code [`EXIT_UNSUPPORTED`] (89) from the target at any point means "this case is not
//! supported": the case is skipped, not failed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use qmig_host::qmp_client::QmpClient;

/// Exit status meaning "unsupported case".
pub const EXIT_UNSUPPORTED: i32 = 89;

/// The QEMU 7.2 destination template (proves the contract: QEMU itself is a valid target).
pub const QEMU_DST_TEMPLATE: &str = "{QEMU} -M {MACHINE} {CPU} -m {RAM} {MEM_BACKEND} -nodefaults -nographic -display none {BIOS} -incoming defer -qmp unix:{QMP},server=on,wait=off {FAULT_TRIGGER}";

/// The qmig-dst destination template.
pub const QMIG_DST_TEMPLATE: &str =
    "{BIN_DIR}/qmig-dst --qmp unix:{QMP} -m {RAM} {RAM_PAGE_SIZE} --machine {MACHINE} --profile {PROFILE} --capabilities {CAPS} {VMDESC}";

/// Values for one target start.
#[derive(Clone, Debug, Default)]
pub struct Values {
    /// Scalar placeholders (`QMP`, `RAM`, ...), without braces.
    pub scalars: BTreeMap<String, String>,
    /// List placeholders (`CPU`, `BIOS`, `VMDESC`).
    pub lists: BTreeMap<String, Vec<String>>,
}

impl Values {
    /// Sets a scalar.
    pub fn set(&mut self, k: &str, v: impl Into<String>) {
        self.scalars.insert(k.into(), v.into());
    }
    /// Sets a list.
    pub fn list(&mut self, k: &str, v: Vec<String>) {
        self.lists.insert(k.into(), v);
    }
}

/// Splits a template into words (whitespace, quotes group).
pub fn split(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in template.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Expands a template into argv.
pub fn expand(template: &str, vals: &Values) -> anyhow::Result<Vec<String>> {
    let mut argv = Vec::new();
    for w in split(template) {
        if let Some(k) = w.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            if let Some(l) = vals.lists.get(k) {
                argv.extend(l.iter().cloned());
                continue;
            }
        }
        let mut s = w.clone();
        for (k, v) in &vals.scalars {
            s = s.replace(&format!("{{{k}}}"), v);
        }
        if let Some(i) = s.find('{') {
            if let Some(j) = s[i..].find('}') {
                bail!("unknown placeholder {} in `{template}`", &s[i..i + j + 1]);
            }
        }
        argv.push(s);
    }
    if argv.is_empty() {
        bail!("empty target template");
    }
    Ok(argv)
}

/// A running target; killed on drop.
pub struct Target {
    child: Child,
    /// Its private directory (QMP socket, log).
    pub dir: PathBuf,
    /// The QMP session.
    pub qmp: QmpClient,
    /// The argv it runs.
    pub argv: Vec<String>,
}

/// Why a target could not be used.
#[derive(Debug)]
pub enum StartError {
    /// It exited with [`EXIT_UNSUPPORTED`].
    Unsupported(String),
    /// Anything else.
    Failed(anyhow::Error),
}

impl Target {
    /// Starts `argv` in `dir` (which holds the `{QMP}` socket) and connects to QMP.
    pub fn start(argv: Vec<String>, dir: &Path, qmp_path: &Path) -> Result<Target, StartError> {
        let log = File::create(dir.join("target.log"))
            .and_then(|f| Ok((f.try_clone()?, f)))
            .map_err(|e| StartError::Failed(e.into()));
        let (out, err) = log?;
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", argv[0]))
            .map_err(StartError::Failed)?;
        // Connect as soon as the socket answers; stop at once if the target exits first.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let result = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break Err((Some(st), "exited before serving QMP".to_string()));
            }
            if qmp_path.exists() {
                match QmpClient::connect(qmp_path) {
                    Ok(q) => break Ok(q),
                    Err(e) if std::time::Instant::now() >= deadline => {
                        break Err((None, e.to_string()))
                    }
                    Err(_) => {}
                }
            } else if std::time::Instant::now() >= deadline {
                break Err((None, "no QMP socket after 30 s".to_string()));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match result {
            Ok(qmp) => Ok(Target {
                child,
                dir: dir.to_path_buf(),
                qmp,
                argv,
            }),
            Err((status, e)) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(dir.join("target.log")).unwrap_or_default();
                if status.and_then(|s| s.code()) == Some(EXIT_UNSUPPORTED) {
                    return Err(StartError::Unsupported(log.trim().to_string()));
                }
                Err(StartError::Failed(anyhow::anyhow!(
                    "no QMP on {}: {e}; exit {status:?}; log: {}",
                    qmp_path.display(),
                    log.trim()
                )))
            }
        }
    }

    /// The exit code, if the target has exited.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// The signal that killed the target, if it has died of one (a crash, not a rejection).
    pub fn killed_by(&mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.child
            .try_wait()
            .ok()
            .flatten()
            .and_then(|s| s.signal())
    }

    /// Waits (at most `guard`) for the process to exit after its QMP socket closed; its code
    /// (128 when a signal killed it: see [`Target::killed_by`]).
    pub fn wait_exit(&mut self, guard: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + guard;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().or(Some(128));
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// How the process stands, for a failure message: `exited with code N`, `killed by signal
    /// S` (waiting at most `guard` for it to end, e.g. after its QMP socket closed) or `still
    /// running`.
    pub fn exit_note(&mut self, guard: Duration) -> String {
        use std::os::unix::process::ExitStatusExt;
        self.wait_exit(guard);
        match self.child.try_wait().ok().flatten() {
            Some(st) => match (st.code(), st.signal()) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                (None, None) => "ended".into(),
            },
            None => "still running".into(),
        }
    }

    /// The target's console output so far (last 2000 bytes).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("target.log")).unwrap_or_default();
        let n = s.len();
        let mut i = n.saturating_sub(2000);
        while !s.is_char_boundary(i) {
            i += 1;
        }
        s[i..].trim().to_string()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh private directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> anyhow::Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "qmig-conf-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A free loopback port (bound then released).
///
/// Chosen at random below the kernel's ephemeral range (`ip_local_port_range`), not by
/// binding port 0: a port from the ephemeral range can be taken, between this call and the
/// target's `listen`, as the local port of an outgoing connection of whatever runs beside (seen
/// in CI: `migrate-recover` failing with "Address already in use" while tests ran in parallel).
/// A port is handed out once per process, so two threads never get the same one.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (from, to) = (10_000u32, ephemeral_low.saturating_sub(1).min(65_535));
    if to > from {
        for _ in 0..64 {
            // A fresh RandomState is randomly keyed: a random number without a dependency.
            let r = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let port = (from + (r % u64::from(to - from + 1)) as u32) as u16;
            let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
