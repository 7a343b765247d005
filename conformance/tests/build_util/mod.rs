//! Builds the reference binaries a test spawns into the test's own target directory and
//! profile (cargo builds only this package's binaries for a test), so they are never stale.

use std::path::PathBuf;
use std::process::Command;

/// `cargo build -p PKG...` into the target directory and profile of the running test binary
/// (`<target>/<profile>/deps/<test>`).
pub fn build_packages(packages: &[&str]) {
    let exe = std::env::current_exe().unwrap();
    let profile_dir: PathBuf = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").env("CARGO_TARGET_DIR", target);
    for p in packages {
        cmd.args(["-p", p]);
    }
    if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "cargo build of {packages:?} failed"
    );
}
