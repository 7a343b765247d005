//! qmig-src → real QEMU 7.2 with the page-encoding capabilities: `xbzrle` (a guest that keeps
//! writing 64 bytes at a time into a small working set, so pages are resent and go as XBZRLE
//! deltas), `compress` (zlib pages) and `x-ignore-shared` (MEM_SIZE with block addresses).
//!
//! Each test ends, as every scenario, with QEMU's guest RAM (`pmemsave`) byte-identical to
//! qmig-src's at switchover, and asserts the record kinds the proxy saw on the main
//! connection. Without QEMU 7.2 the tests skip, unless `CI` or `QMIG_REQUIRE_QEMU` is set.

mod common;

use common::qemu;
use common::scenario::{run, Case, Dest, Mode, RAM_MB};
use qmig_conformance::qemu::{Machine, Qemu, QemuVersion};
use serde_json::{json, Value};

fn go(
    caps: &'static [&'static str],
    workload: Option<&'static str>,
    params: Value,
) -> Option<Value> {
    let bin = qemu(QemuVersion::V7_2)?;
    let dst = Qemu::launch(&bin, Machine::NoneNoCpu, RAM_MB, true, &[]).expect("QEMU destination");
    Some(run(
        Case {
            mode: Mode::Precopy,
            profile: "7.2",
            workload,
            params,
            caps,
            ..Case::default()
        },
        Dest::Qemu(Box::new(dst)),
    ))
}

#[test]
fn xbzrle_resent_pages_go_as_deltas() {
    let Some(info) = go(
        &["xbzrle"],
        Some("random,threads=1,rate=1000,working-set=1M"),
        json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 5, "xbzrle-cache-size": 8u64 << 20}),
    ) else {
        return;
    };
    let k = &info["x-test-records"];
    assert!(k["xbzrle"].as_u64().unwrap() >= 1, "{info}");
    assert_eq!(k["compressed"], 0, "{info}");
}

#[test]
fn compress_sends_zlib_pages() {
    let Some(info) = go(
        &["compress"],
        Some("random,threads=1,rate=1000,working-set=4M"),
        json!({"max-bandwidth": 64u64 << 20, "downtime-limit": 50, "compress-level": 1}),
    ) else {
        return;
    };
    let k = &info["x-test-records"];
    // Every non-zero page but the first of each block change is compressed.
    assert!(k["compressed"].as_u64().unwrap() >= 1000, "{info}");
    assert!(k["page"].as_u64().unwrap() <= 4, "{info}");
    assert_eq!(k["xbzrle"], 0, "{info}");
}

#[test]
fn x_ignore_shared_precopy() {
    let Some(info) = go(&["x-ignore-shared"], None, json!({})) else {
        return;
    };
    let k = &info["x-test-records"];
    assert_eq!(
        k["page"].as_u64().unwrap() + k["zero"].as_u64().unwrap(),
        RAM_MB << 8,
        "{info}"
    );
}
