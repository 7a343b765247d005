//! qmig-src with capability `multifd` (precopy) → real QEMU 7.2, real QEMU 10.0 and qmig-dst,
//! with 2 to 4 connections: the destination's RAM (`pmemsave`) ends byte-identical to
//! qmig-src's at switchover. In 7.2 zero pages stay on the main connection (recorded by the
//! proxy as ZERO records, no data pages); in 10.x the main connection carries no page records.
//! Without QEMU the QEMU tests skip, unless `CI` or `QMIG_REQUIRE_QEMU` is set.

mod common;

use common::qemu;
use common::scenario::{run, Case, Dest, Mode, QmigDst, RAM_MB};
use qmig_conformance::qemu::{Machine, Qemu, QemuVersion};
use serde_json::{json, Value};

fn case(profile: &'static str, channels: u64) -> Case {
    Case {
        mode: Mode::Precopy,
        profile,
        workload: Some("random,threads=1,rate=1000,working-set=4M"),
        params: json!({"multifd-channels": channels, "downtime-limit": 50}),
        caps: &["multifd"],
        ..Case::default()
    }
}

fn main_records_ok(info: &Value, v72: bool) {
    let k = &info["x-test-records"];
    // Data pages go through multifd: none on the main connection.
    assert_eq!(k["page"], 0, "{info}");
    if v72 {
        assert!(k["zero"].as_u64().unwrap() >= 1, "{info}");
    } else {
        assert_eq!(k["zero"], 0, "{info}");
    }
    assert_eq!(info["ram"]["remaining"], 0, "{info}");
    let _ = RAM_MB;
}

fn to_qemu(version: QemuVersion, profile: &'static str, channels: u64) {
    let Some(bin) = qemu(version) else {
        return;
    };
    let dst = Qemu::launch(&bin, Machine::NoneNoCpu, RAM_MB, true, &[]).expect("QEMU destination");
    let info = run(case(profile, channels), Dest::Qemu(Box::new(dst)));
    main_records_ok(&info, profile == "7.2");
}

#[test]
fn multifd_to_qemu72_two_channels() {
    to_qemu(QemuVersion::V7_2, "7.2", 2);
}

#[test]
fn multifd_to_qemu72_four_channels() {
    to_qemu(QemuVersion::V7_2, "7.2", 4);
}

#[test]
fn multifd_to_qemu100_two_channels() {
    to_qemu(QemuVersion::V10_0, "10", 2);
}

#[test]
fn multifd_to_qemu100_three_channels() {
    to_qemu(QemuVersion::V10_0, "10", 3);
}

#[test]
fn multifd_to_qmig_dst() {
    for (profile, channels) in [("10", 3u64), ("7.2", 2)] {
        let dst = QmigDst::spawn(&["--ram", "64M", "--profile", profile]);
        let info = run(case(profile, channels), Dest::Qmig(dst));
        main_records_ok(&info, profile == "7.2");
    }
}
