//! Proves that qmig-protocol builds without `std`: builds `tests/no_std_proof`, a `#![no_std]`
//! staticlib with its own panic handler that links the crate with default features off. If any
//! dependency pulled in `std`, the link would fail with a duplicate `panic_impl` lang item.

use std::process::Command;

#[test]
fn protocol_links_into_a_no_std_staticlib() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/no_std_proof");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(|d| format!("{d}/no_std_proof"))
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/no_std_proof").into());
    let out = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(format!("{dir}/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "no_std build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
