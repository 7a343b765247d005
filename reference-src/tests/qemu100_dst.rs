//! qmig-src → real QEMU 10.0 (`-incoming defer` + `migrate-incoming`), the 10.x profile
//! (`postcopy-recover-setup`, SWITCHOVER_START, 10.x `globalstate`).
//!
//! Machines: `-M none` without CPU (qmig-src's built-in `timer` + `globalstate`), and
//! `-M microvm` with qmig-src's device sections and extra RAM blocks taken from a 10.0 microvm
//! capture (`--device-template`), whose qtest reads fault on the destination during postcopy.
//! Each test ends with QEMU's RAM (`pmemsave`) byte-identical to qmig-src's RAM at switchover
//! (microvm: except the firmware window QEMU maps over RAM at pages 192..256). Without QEMU
//! 10.0 the tests skip, unless `CI` or `QMIG_REQUIRE_QEMU` is set: then they fail.

mod common;

use common::qemu;
use common::scenario::{run, Case, Dest, Mode, RAM_MB};
use qmig_conformance::qemu::{Machine, Qemu, QemuVersion};
use serde_json::{json, Value};

const MICROVM_TEMPLATE: &str = "conformance/vectors/qemu-10.0/postcopy/stream.bin";
const MICROVM_BLOCKS: &[&str] = &[
    "--machine",
    "microvm",
    "--block",
    "/rom@etc/acpi/tables:4096",
    "--block",
    "pc.bios:131072",
    "--block",
    "/rom@etc/table-loader:4096",
    "--block",
    "/rom@etc/acpi/rsdp:4096",
];

fn go(mode: Mode, microvm: bool, workload: Option<&'static str>, params: Value) -> Option<Value> {
    let bin = qemu(QemuVersion::V10_0)?;
    let machine = if microvm {
        Machine::Microvm
    } else {
        Machine::NoneNoCpu
    };
    Some({
        let dst = Qemu::launch(&bin, machine, RAM_MB, true, &[]).expect("QEMU destination");
        let case = if microvm {
            Case {
                template: Some(MICROVM_TEMPLATE),
                src_args: MICROVM_BLOCKS,
                skip_pages: machine.reserved_pages(),
                dst_runs: false, // launched with -S
                ..Case::default()
            }
        } else {
            Case::default()
        };
        run(
            Case {
                mode,
                profile: "10",
                workload,
                params: params.clone(),
                ..case
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
fn postcopy_background_pages_only() {
    go(
        Mode::Postcopy,
        false,
        Some("random,threads=1,rate=2000,working-set=8M"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 16u64 << 20}),
    );
}

#[test]
fn postcopy_microvm_with_page_requests() {
    go(
        Mode::Postcopy,
        true,
        Some("random,threads=1,rate=2000,working-set=8M"),
        json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 8u64 << 20}),
    );
}

#[test]
fn postcopy_link_cut_then_resume_to_new_port() {
    go(
        Mode::PostcopyCut,
        false,
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
