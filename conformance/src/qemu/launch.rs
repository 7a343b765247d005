//! Starting QEMU: [`Qemu::launch`] runs one `qemu-system-x86_64` with a QMP
//! (and, where the machine supports it, qtest) unix socket in a private
//! temporary directory, and kills it and removes the directory on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qmig_host::qmp_client::QmpClient;
use serde_json::{json, Value};

use super::find::{QemuBinary, QemuVersion};
use super::firmware::test_firmware;
use super::qtest::Qtest;
use super::QemuError;

/// How long QEMU gets to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest machines the harness knows how to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M none -cpu qemu64,apic-id=0` with qtest (QEMU 7.2: qtest memory
    /// accessors need a CPU). RAM block `ram` at guest-physical 0.
    NoneCpu,
    /// `-M none` without CPU and without qtest (RAM cannot be written).
    NoneNoCpu,
    /// `-M microvm -cpu qemu64 -S -bios TEST_FIRMWARE` with qtest (QEMU 10.0).
    /// RAM block `microvm.ram` at guest-physical 0.
    Microvm,
}

impl Machine {
    /// `-M` value.
    pub fn type_name(self) -> &'static str {
        match self {
            Machine::NoneCpu | Machine::NoneNoCpu => "none",
            Machine::Microvm => "microvm",
        }
    }

    /// The `-cpu` model, if any.
    pub fn cpu(self) -> Option<&'static str> {
        match self {
            Machine::NoneCpu => Some("qemu64,apic-id=0"),
            Machine::NoneNoCpu => None,
            Machine::Microvm => Some("qemu64"),
        }
    }

    /// Whether a qtest socket is opened (guest RAM can be read and written).
    pub fn has_qtest(self) -> bool {
        !matches!(self, Machine::NoneNoCpu)
    }

    /// Name of the main RAM block.
    pub fn ram_block(self) -> &'static str {
        match self {
            Machine::NoneCpu | Machine::NoneNoCpu => "ram",
            Machine::Microvm => "microvm.ram",
        }
    }

    /// Guest pages a test must not write: microvm maps the firmware over
    /// RAM at 0xe0000-0xfffff; pages 192-255 are left alone.
    pub fn reserved_pages(self) -> std::ops::Range<u64> {
        match self {
            Machine::Microvm => 192..256,
            _ => 0..0,
        }
    }
}

/// One running QEMU with its sockets; killed on drop.
pub struct Qemu {
    child: Child,
    dir: PathBuf,
    /// Which QEMU runs.
    pub binary: QemuBinary,
    /// The machine it runs.
    pub machine: Machine,
    /// Guest RAM size in MiB.
    pub ram_mb: u64,
    /// Exact arguments (after the program).
    pub args: Vec<String>,
    /// The QMP session.
    pub qmp: QmpClient,
    /// The qtest session (machines with a CPU).
    pub qtest: Option<Qtest>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Qemu {
    /// Starts QEMU `bin` on `machine` with `ram_mb` MiB; `incoming` adds
    /// `-incoming defer`; `extra` arguments are appended. Returns once QMP
    /// (and qtest) are connected.
    pub fn launch(
        bin: &QemuBinary,
        machine: Machine,
        ram_mb: u64,
        incoming: bool,
        extra: &[&str],
    ) -> Result<Qemu, QemuError> {
        let dir = std::env::temp_dir().join(format!(
            "qmig-qemu-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let qmp_path = dir.join("qmp.sock");
        let qtest_path = dir.join("qtest.sock");
        let mut args: Vec<String> = vec!["-M".into(), machine.type_name().into()];
        if let Some(cpu) = machine.cpu() {
            args.extend(["-cpu".into(), cpu.into()]);
        }
        args.extend(
            [
                "-m",
                &format!("{ram_mb}M"),
                "-nodefaults",
                "-nographic",
                "-display",
                "none",
            ]
            .map(String::from),
        );
        if machine == Machine::Microvm {
            let fw = dir.join("test-firmware.bin");
            fs::write(&fw, test_firmware())?;
            args.extend(["-S".into(), "-bios".into(), fw.display().to_string()]);
        }
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ]);
        if machine.has_qtest() {
            args.extend([
                "-qtest".into(),
                format!("unix:{},server=on,wait=off", qtest_path.display()),
                "-qtest-log".into(),
                "/dev/null".into(),
            ]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = File::create(dir.join("qemu.log"))?;
        let mut child = Command::new(&bin.program)
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let connected = (|| -> Result<(QmpClient, Option<Qtest>), QemuError> {
            let qmp =
                QmpClient::connect_while(&qmp_path, START_TIMEOUT, || match child.try_wait() {
                    Ok(Some(st)) => Err(format!("QEMU exited ({st})")),
                    _ => Ok(()),
                })?;
            let qtest = if machine.has_qtest() {
                Some(Qtest::connect(&qtest_path, START_TIMEOUT)?)
            } else {
                None
            };
            Ok((qmp, qtest))
        })();
        match connected {
            Ok((mut qmp, qtest)) => {
                // MIGRATION events are what the drivers wait on.
                qmp.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "events", "state": true}]}),
                )?;
                Ok(Qemu {
                    child,
                    dir,
                    binary: bin.clone(),
                    machine,
                    ram_mb,
                    args,
                    qmp,
                    qtest,
                })
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                let _ = fs::remove_dir_all(&dir);
                Err(QemuError::Failed(format!(
                    "QEMU did not start: {e}; log: {log}"
                )))
            }
        }
    }

    /// The private directory holding sockets, logs and dumps.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Guest RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_mb << 20
    }

    /// The qtest session, or an error on machines without one.
    pub fn qtest(&mut self) -> Result<&mut Qtest, QemuError> {
        self.qtest
            .as_mut()
            .ok_or_else(|| QemuError::Failed(format!("{:?} has no qtest", self.machine)))
    }

    /// Runs a QMP command.
    pub fn qmp(&mut self, command: &str, arguments: Value) -> Result<Value, QemuError> {
        Ok(self.qmp.execute(command, arguments)?)
    }

    /// Dumps `size` bytes of guest-physical memory from `addr` with
    /// `pmemsave` and returns them.
    pub fn pmemsave(&mut self, addr: u64, size: u64) -> Result<Vec<u8>, QemuError> {
        let file = self.dir.join(format!(
            "pmemsave-{}.bin",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        self.qmp.execute(
            "pmemsave",
            json!({"val": addr, "size": size, "filename": file.display().to_string()}),
        )?;
        let data = fs::read(&file)?;
        let _ = fs::remove_file(&file);
        if data.len() as u64 != size {
            return Err(QemuError::Failed(format!(
                "pmemsave wrote {} of {size} bytes",
                data.len()
            )));
        }
        Ok(data)
    }

    /// The whole guest RAM as seen by `pmemsave` from guest-physical 0.
    pub fn dump_ram(&mut self) -> Result<Vec<u8>, QemuError> {
        self.pmemsave(0, self.ram_bytes())
    }

    /// The command line with the binary as `{QEMU}`, socket paths as
    /// `{<ROLE>_QMP_SOCK}` / `{<ROLE>_QTEST_SOCK}` and the firmware as
    /// `{TEST_FIRMWARE}`, quoted like the vectors' manifests.
    pub fn command_line_template(&self, role: &str) -> String {
        let d = self.dir.display().to_string();
        let mut out = String::from("{QEMU}");
        for a in &self.args {
            let t = a
                .replace(&format!("{d}/qmp.sock"), &format!("{{{role}_QMP_SOCK}}"))
                .replace(
                    &format!("{d}/qtest.sock"),
                    &format!("{{{role}_QTEST_SOCK}}"),
                )
                .replace(&format!("{d}/test-firmware.bin"), "{TEST_FIRMWARE}");
            out.push(' ');
            if t.contains(['{', ',', ' ']) {
                out.push_str(&format!("'{t}'"));
            } else {
                out.push_str(&t);
            }
        }
        out
    }

    /// Whether the QEMU process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// QEMU's console/stderr output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }

    /// The version this QEMU runs.
    pub fn version(&self) -> QemuVersion {
        self.binary.version
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
