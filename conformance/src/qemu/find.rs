//! Locating the QEMU binaries of each supported version.
//!
//! QEMU 7.2 is the host's `qemu-system-x86_64` (Debian bookworm); QEMU 10.0
//! is the `conformance/scripts/qemu-10.0` wrapper around the trixie chroot
//! that `provision-qemu.sh` builds. `QMIG_QEMU_7_2` / `QMIG_QEMU_10_0`
//! override either path. When a binary is missing, [`find_qemu`] returns
//! `Ok(None)` (callers skip) unless `CI` or `QMIG_REQUIRE_QEMU` is set, in
//! which case it is an error.

use std::path::PathBuf;
use std::process::Command;

use super::QemuError;

/// The QEMU versions the harness drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QemuVersion {
    /// QEMU 7.2 (Debian bookworm).
    V7_2,
    /// QEMU 10.0 (Debian trixie, chrooted).
    V10_0,
}

impl QemuVersion {
    /// `"7.2"` or `"10.0"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QemuVersion::V7_2 => "7.2",
            QemuVersion::V10_0 => "10.0",
        }
    }

    fn env_override(self) -> &'static str {
        match self {
            QemuVersion::V7_2 => "QMIG_QEMU_7_2",
            QemuVersion::V10_0 => "QMIG_QEMU_10_0",
        }
    }

    fn default_program(self) -> PathBuf {
        match self {
            QemuVersion::V7_2 => PathBuf::from("qemu-system-x86_64"),
            QemuVersion::V10_0 => {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/qemu-10.0"))
            }
        }
    }
}

/// A runnable QEMU of a known version.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    /// Which version it is.
    pub version: QemuVersion,
    /// What to execute (the binary, or the 10.0 chroot wrapper).
    pub program: PathBuf,
    /// First line of `--version`.
    pub version_string: String,
}

/// Whether a missing QEMU is an error (`CI` or `QMIG_REQUIRE_QEMU` set and non-empty).
pub fn qemu_required() -> bool {
    ["CI", "QMIG_REQUIRE_QEMU"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty() && v != "0" && v != "false"))
}

/// Finds QEMU `version`. `Ok(None)` means "not installed, skip"; with
/// [`qemu_required`] a missing or wrong-version QEMU is `Err`.
pub fn find_qemu(version: QemuVersion) -> Result<Option<QemuBinary>, QemuError> {
    let program = std::env::var_os(version.env_override())
        .map(PathBuf::from)
        .unwrap_or_else(|| version.default_program());
    find_qemu_at(version, program, qemu_required())
}

/// [`find_qemu`] with the program and the policy given explicitly.
pub fn find_qemu_at(
    version: QemuVersion,
    program: PathBuf,
    required: bool,
) -> Result<Option<QemuBinary>, QemuError> {
    let found = Command::new(&program).arg("--version").output();
    let problem = match found {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or("").to_string();
            if first.contains(&format!("version {}.", version.as_str())) {
                return Ok(Some(QemuBinary {
                    version,
                    program,
                    version_string: first,
                }));
            }
            format!(
                "{} reports `{first}`, not QEMU {}",
                program.display(),
                version.as_str()
            )
        }
        Ok(out) => format!(
            "{} --version failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("{} not runnable: {e}", program.display()),
    };
    if required {
        Err(QemuError::Missing(format!(
            "QEMU {} required (CI/QMIG_REQUIRE_QEMU set) but unavailable: {problem}; run conformance/scripts/provision-qemu.sh",
            version.as_str()
        )))
    } else {
        eprintln!("skipping: QEMU {} unavailable: {problem}", version.as_str());
        Ok(None)
    }
}
