//! qmig-src → real QEMU 7.2 (`-incoming defer` + `migrate-incoming`).
//!
//! Each test ends with QEMU's guest RAM (`pmemsave`) byte-identical to qmig-src's RAM at
//! switchover (`pmemsave` on qmig-src after completion; its guest is stopped from the
//! switchover on). Without QEMU 7.2 the tests skip, unless `CI` or `QMIG_REQUIRE_QEMU` is set:
//! then they fail.
//!
//! Machines: `-M none` without CPU (qmig-src's built-in `timer` + `globalstate`), and
//! `-M none -cpu qemu64,apic-id=0` with qmig-src's device sections taken from a 7.2 capture of
//! that machine (`--device-template`), whose qtest reads fault on the destination during
//! postcopy and become page requests.

mod common;

use common::qemu;
use common::scenario::{run, Case, Dest, Mode, RAM_MB};
use qmig_conformance::qemu::{Machine, Qemu, QemuVersion};
use serde_json::{json, Value};

const TEMPLATE: &str = "conformance/vectors/qemu-7.2/precopy-tcp-rp/stream.bin";

fn go(mode: Mode, with_cpu: bool, workload: Option<&'static str>, params: Value) -> Option<Value> {
    let bin = qemu(QemuVersion::V7_2)?;
    let machine = if with_cpu {
        Machine::NoneCpu
    } else {
        Machine::NoneNoCpu
    };
    Some({
        let dst = Qemu::launch(&bin, machine, RAM_MB, true, &[]).expect("QEMU destination");
        run(
            Case {
                mode,
                profile: "7.2",
                template: with_cpu.then_some(TEMPLATE),
                workload,
                params: params.clone(),
                ..Case::default()
            },
            Dest::Qemu(Box::new(dst)),
        )
    })
}

#[test]
fn precopy_static_guest() {
    go(Mode::Precopy, false, None, json!({}));
}

#[test]
fn precopy_static_guest_with_cpu_devices_from_template() {
    go(Mode::Precopy, true, None, json!({}));
}

#[test]
fn precopy_dirtying_guest_converges_over_iterations() {
    let Some(info) = go(
        Mode::Precopy,
        false,
        Some("random,threads=1,rate=1000,working-set=4M"),
        json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 50}),
    ) else {
        return;
    };
    let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(syncs >= 3, "expected several iterations: {info}");
}

#[test]
fn postcopy_with_page_requests() {
    go(
        Mode::Postcopy,
        true,
        Some("random,threads=1,rate=2000,working-set=8M"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 8u64 << 20}),
    );
}

#[test]
fn postcopy_background_pages_only() {
    go(
        Mode::Postcopy,
        false,
        None,
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 16u64 << 20}),
    );
}

#[test]
fn postcopy_link_cut_then_resume_to_new_port() {
    go(
        Mode::PostcopyCut,
        true,
        Some("random,threads=1,rate=2000,working-set=8M"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    );
}

#[test]
fn postcopy_migrate_pause_then_resume() {
    go(
        Mode::PostcopyPause,
        false,
        Some("sequential,threads=1,rate=1000"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    );
}
