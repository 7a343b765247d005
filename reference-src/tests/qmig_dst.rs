//! qmig-src → qmig-dst, the same scenarios as against QEMU 7.2 (both sides speak the 10.x
//! profile here; qmig-dst is built with `cargo build -p qmig-dst`, or taken from
//! `QMIG_DST_BIN`). Each test ends with qmig-dst's RAM (`pmemsave`) byte-identical to
//! qmig-src's RAM at switchover.

mod common;

use common::scenario::{run, Case, Dest, Mode, QmigDst};
use serde_json::{json, Value};

fn go(
    mode: Mode,
    workload: Option<&'static str>,
    dst_workload: Option<&str>,
    params: Value,
) -> Value {
    let mut args = vec!["--ram", "64M", "--profile", "10"];
    if let Some(w) = dst_workload {
        args.extend(["--workload", w]);
    }
    let dst = QmigDst::spawn(&args);
    run(
        Case {
            mode,
            profile: "10",
            template: None,
            workload,
            params,
            ..Case::default()
        },
        Dest::Qmig(dst),
    )
}

#[test]
fn precopy_static_guest() {
    go(Mode::Precopy, None, None, json!({}));
}

#[test]
fn precopy_dirtying_guest_converges_over_iterations() {
    let info = go(
        Mode::Precopy,
        Some("random,threads=1,rate=1000,working-set=4M"),
        None,
        json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 50}),
    );
    let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(syncs >= 3, "expected several iterations: {info}");
}

#[test]
fn postcopy_with_destination_faults() {
    let info = go(
        Mode::Postcopy,
        Some("random,threads=1,rate=2000,working-set=8M"),
        Some("random,threads=1,rate=2000"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 8u64 << 20}),
    );
    assert!(
        info["ram"]["postcopy-requests"].as_u64().unwrap() >= 1,
        "the destination's guest faulted no page in: {info}"
    );
}

#[test]
fn postcopy_link_cut_then_resume_to_new_port() {
    go(
        Mode::PostcopyCut,
        Some("random,threads=1,rate=2000,working-set=8M"),
        Some("random,threads=1,rate=500"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    );
}

#[test]
fn postcopy_migrate_pause_then_resume() {
    go(
        Mode::PostcopyPause,
        Some("sequential,threads=1,rate=1000"),
        None,
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    );
}

#[test]
fn precopy_dirtying_guest_with_soft_dirty_tracking() {
    let soft = qmig_host::dirty::probe()
        .into_iter()
        .find(|(m, _)| *m == qmig_host::dirty::Mechanism::SoftDirty);
    if let Some((_, Err(why))) = soft {
        eprintln!("SKIP: this kernel has no soft-dirty tracking: {why}");
        return;
    }
    let dst = QmigDst::spawn(&["--ram", "64M", "--profile", "10"]);
    let info = run(
        Case {
            workload: Some("random,threads=1,rate=1000,working-set=4M"),
            params: json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 50}),
            src_args: &["--dirty-tracking", "soft-dirty"],
            ..Case::default()
        },
        Dest::Qmig(dst),
    );
    assert_eq!(info["x-qmig"]["dirty-tracking"], "soft-dirty", "{info}");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap() >= 3,
        "{info}"
    );
}
