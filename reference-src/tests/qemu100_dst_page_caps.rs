//! qmig-src → real QEMU 10.0 (`-M none`) with `xbzrle` (a guest writing 64 bytes at a time into
//! a small working set: resent pages go as XBZRLE deltas) and with `x-ignore-shared`. QEMU's
//! guest RAM (`pmemsave`) ends byte-identical to qmig-src's at switchover, and the proxy's main
//! connection carries the expected record kinds. Without QEMU 10.0 the tests skip, unless `CI`
//! or `QMIG_REQUIRE_QEMU` is set.

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
    let bin = qemu(QemuVersion::V10_0)?;
    let dst = Qemu::launch(&bin, Machine::NoneNoCpu, RAM_MB, true, &[]).expect("QEMU destination");
    Some(run(
        Case {
            mode: Mode::Precopy,
            profile: "10",
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
    assert!(
        info["x-test-records"]["xbzrle"].as_u64().unwrap() >= 1,
        "{info}"
    );
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
