//! qmig-src's QMP for the page encodings: `compress` only with a 7.2 profile and never with
//! postcopy, `xbzrle-cache-size` / `compress-level` / `compress-threads` checked as QEMU checks
//! them and reported back; `multifd` accepted (precopy only: refused with `postcopy-ram`).

mod common;

use common::Src;
use serde_json::{json, Value};

fn err(src: &mut Src, cmd: &str, args: Value) -> String {
    match src.qmp.execute(cmd, args) {
        Ok(v) => panic!("{cmd} succeeded: {v}"),
        Err(e) => e.to_string(),
    }
}

fn caps(list: &[&str]) -> Value {
    let l: Vec<Value> = list
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    json!({ "capabilities": l })
}

fn cap_on(src: &mut Src, name: &str) -> bool {
    let l = src.cmd("query-migrate-capabilities", Value::Null);
    l.as_array()
        .unwrap()
        .iter()
        .any(|c| c["capability"] == name && c["state"] == true)
}

#[test]
fn compress_is_refused_with_profile_10() {
    let mut src = Src::spawn(&["--ram", "1M", "--profile", "10"]);
    let e = err(&mut src, "migrate-set-capabilities", caps(&["compress"]));
    assert!(e.contains("'compress' was removed"), "{e}");
    assert!(!cap_on(&mut src, "compress"));
    src.cmd(
        "migrate-set-capabilities",
        caps(&["xbzrle", "x-ignore-shared"]),
    );
    assert!(cap_on(&mut src, "xbzrle") && cap_on(&mut src, "x-ignore-shared"));
    src.cmd("migrate-set-capabilities", caps(&["multifd"]));
    assert!(cap_on(&mut src, "multifd"));
    let e = err(
        &mut src,
        "migrate-set-capabilities",
        caps(&["postcopy-ram"]),
    );
    assert!(e.contains("not yet compatible with multifd"), "{e}");
    assert!(!cap_on(&mut src, "postcopy-ram"));
    let p = src.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(p["xbzrle-cache-size"], 64u64 << 20, "{p}");
    assert!(p.get("compress-level").is_none(), "{p}");
}

#[test]
fn compress_with_profile_72_and_its_parameters() {
    let mut src = Src::spawn(&["--ram", "1M", "--profile", "7.2"]);
    src.cmd("migrate-set-capabilities", caps(&["compress"]));
    assert!(cap_on(&mut src, "compress"));
    let e = err(
        &mut src,
        "migrate-set-capabilities",
        caps(&["postcopy-ram"]),
    );
    assert!(
        e.contains("not currently compatible with compression"),
        "{e}"
    );
    let e = err(
        &mut src,
        "migrate-set-parameters",
        json!({"xbzrle-cache-size": 3 * 4096}),
    );
    assert!(e.contains("xbzrle_cache_size"), "{e}");
    let e = err(
        &mut src,
        "migrate-set-parameters",
        json!({"compress-level": 10}),
    );
    assert!(e.contains("compress_level"), "{e}");
    let e = err(
        &mut src,
        "migrate-set-parameters",
        json!({"compress-threads": 0}),
    );
    assert!(e.contains("compress_threads"), "{e}");
    src.cmd(
        "migrate-set-parameters",
        json!({"xbzrle-cache-size": 1u64 << 20, "compress-level": 6, "compress-threads": 2}),
    );
    let p = src.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(p["xbzrle-cache-size"], 1u64 << 20, "{p}");
    assert_eq!(p["compress-level"], 6, "{p}");
    assert_eq!(p["compress-threads"], 2, "{p}");
}

#[test]
fn command_line_capabilities_get_the_same_checks() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qmig-src"))
        .args([
            "--ram",
            "1M",
            "--profile",
            "10",
            "--capabilities",
            "compress",
        ])
        .args(["--qmp", "unix:/nonexistent/qmp.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("'compress' was removed"), "{e}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qmig-src"))
        .args(["--ram", "1M", "--profile", "7.2"])
        .args(["--capabilities", "compress,postcopy-ram"])
        .args(["--qmp", "unix:/nonexistent/qmp.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("not currently compatible with compression"),
        "{e}"
    );
}
