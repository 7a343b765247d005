//! The two reference processes of the demo: finding `qmig-src` / `qmig-dst` and running them.
//!
//! This module owns [`find_binary`] (next to the running `qmig`, else on `PATH`, else an error
//! with the build command) and [`Peer`], a child process whose stderr goes to a log file in the
//! demo's temporary directory and which is killed and reaped when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// Finds the executable `name`: in the directory of the running executable first (where cargo
/// puts every binary of the workspace), then on `PATH`.
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)));
    // `cargo test` runs from `target/<profile>/deps`; its binaries are one level up.
    let above = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|d| d.join(name)));
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(above)
        .chain(on_path)
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "cannot find `{name}` next to this executable nor on PATH; \
                 build it with `cargo build -p qmig-src -p qmig-dst` (same profile as qmig)"
            )
        })
}

/// A running reference process; killed (and reaped) on drop.
pub struct Peer {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Peer {
    /// Starts `exe` with `args`; its stdout and stderr go to `log`.
    pub fn spawn(
        name: &'static str,
        exe: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Peer> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("QMIG_DEMO_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // The child dies with the demo, even when the demo is killed outright.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(Peer { name, child, log })
    }

    /// Fails when the process has already exited (with its status and the end of its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early ({st})", self.name);
        }
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the process logs.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process runs as root (effective uid 0), read from `/proc/self`'s owner.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
