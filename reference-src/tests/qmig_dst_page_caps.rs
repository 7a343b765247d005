//! qmig-src → qmig-dst (profile 10) with `xbzrle` on a guest that keeps writing 64 bytes at a
//! time into a small working set (resent pages go as XBZRLE deltas), and with
//! `x-ignore-shared`; qmig-dst's RAM ends byte-identical to qmig-src's at switchover, and the
//! proxy's main connection carries the expected record kinds.

mod common;

use common::scenario::{run, Case, Dest, Mode, QmigDst, RAM_MB};
use serde_json::{json, Value};

fn go(caps: &'static [&'static str], workload: Option<&'static str>, params: Value) -> Value {
    let dst = QmigDst::spawn(&["--ram", "64M", "--profile", "10"]);
    run(
        Case {
            mode: Mode::Precopy,
            profile: "10",
            workload,
            params,
            caps,
            ..Case::default()
        },
        Dest::Qmig(dst),
    )
}

#[test]
fn xbzrle_resent_pages_go_as_deltas() {
    let info = go(
        &["xbzrle"],
        Some("random,threads=1,rate=1000,working-set=1M"),
        json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 5, "xbzrle-cache-size": 8u64 << 20}),
    );
    let k = &info["x-test-records"];
    assert!(k["xbzrle"].as_u64().unwrap() >= 1, "{info}");
}

#[test]
fn x_ignore_shared_precopy() {
    let info = go(&["x-ignore-shared"], None, json!({}));
    let k = &info["x-test-records"];
    assert_eq!(
        k["page"].as_u64().unwrap() + k["zero"].as_u64().unwrap(),
        RAM_MB << 8,
        "{info}"
    );
}
