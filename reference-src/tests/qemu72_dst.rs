//! qmig-src → real QEMU 7.2 (`-incoming defer` + `migrate-incoming`).
//!
//! Each test ends with QEMU's guest RAM (`pmemsave`) byte-identical to qmig-src's RAM at
//! switchover (`pmemsave` on qmig-src after completion; its guest is stopped from the
//! switchover on). Without QEMU 7.2 the tests skip, unless `CI` or `QMIG_REQUIRE_QEMU` is set:
//! then they fail.

mod common;

use common::{first_diff_page, qemu, qemu_listen, workspace, Src, PHASE};
use qmig_conformance::qemu::{Machine, Proxy, Qemu, QemuVersion};
use serde_json::{json, Value};

const RAM_MB: u64 = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Precopy,
    Postcopy,
    /// Postcopy; the recording proxy cuts the link mid-stream.
    PostcopyCut,
    /// Postcopy; `migrate-pause` on qmig-src.
    PostcopyPause,
}

struct Case {
    mode: Mode,
    /// `-M none -cpu qemu64,apic-id=0` with qmig-src's devices from a captured 7.2 stream, and
    /// qtest reads on the destination during postcopy (page requests).
    with_cpu: bool,
    workload: Option<&'static str>,
    /// Extra qmig-src parameters before `migrate`.
    params: Value,
}

fn run(case: Case) -> Option<Value> {
    let bin = qemu(QemuVersion::V7_2)?;
    let postcopy = case.mode != Mode::Precopy;
    let template = workspace().join("conformance/vectors/qemu-7.2/precopy-tcp-rp/stream.bin");
    let template = template.display().to_string();
    let mut args = vec![
        "--ram", "64M", "--profile", "7.2", "--fill", "mixed", "--seed", "7",
    ];
    if case.with_cpu {
        args.extend(["--device-template", &template]);
    }
    if let Some(w) = case.workload {
        args.extend(["--workload", w]);
    }
    let mut src = Src::spawn(&args);
    let machine = if case.with_cpu {
        Machine::NoneCpu
    } else {
        Machine::NoneNoCpu
    };
    let mut dst = Qemu::launch(&bin, machine, RAM_MB, true, &[]).expect("QEMU destination");

    let mut caps = vec![json!({"capability": "return-path", "state": true})];
    if postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    dst.qmp(
        "migrate-set-capabilities",
        json!({ "capabilities": caps.clone() }),
    )
    .unwrap();
    caps.push(json!({"capability": "events", "state": true}));
    src.cmd("migrate-set-capabilities", json!({ "capabilities": caps }));
    if case.params.as_object().is_some_and(|o| !o.is_empty()) {
        src.cmd("migrate-set-parameters", case.params.clone());
    }

    let port = qemu_listen(&mut dst, "migrate-incoming");
    let proxy = Proxy::start(([127, 0, 0, 1], port).into()).unwrap();
    src.cmd(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", proxy.port())}),
    );
    let mut requests_expected = false;
    if postcopy {
        src.wait("active");
        src.cmd("migrate-start-postcopy", Value::Null);
        dst.qmp.wait_status("postcopy-active", PHASE).unwrap();
        src.wait("postcopy-active");
        if case.with_cpu {
            // Reads of the highest pages fault on the destination: page requests.
            let q = dst.qtest().unwrap();
            for p in [RAM_MB * 256 - 1, RAM_MB * 256 - 37, RAM_MB * 256 - 300] {
                q.read(p * 4096, 4096).unwrap();
            }
            requests_expected = true;
        }
    }
    match case.mode {
        Mode::PostcopyCut => {
            let (now, _) = proxy.bytes_forwarded(0);
            proxy.arm_cut(0, now + 64 * 1024);
            proxy.wait_closed(0, PHASE).unwrap();
            assert!(
                proxy.recordings()[0].cut,
                "postcopy finished before the cut"
            );
        }
        Mode::PostcopyPause => {
            src.cmd("migrate-pause", Value::Null);
        }
        _ => {}
    }
    if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
        src.wait("postcopy-paused");
        dst.qmp.wait_status("postcopy-paused", PHASE).unwrap();
        assert_eq!(
            src.cmd("query-migrate", Value::Null)["status"],
            "postcopy-paused"
        );
        src.cmd(
            "migrate-set-parameters",
            json!({"max-postcopy-bandwidth": 0}),
        );
        let port2 = qemu_listen(&mut dst, "migrate-recover");
        assert_ne!(port2, proxy.port());
        src.cmd(
            "migrate",
            json!({"uri": format!("tcp:127.0.0.1:{port2}"), "resume": true}),
        );
        src.wait("postcopy-recover");
        src.wait("postcopy-active");
    }
    src.wait("completed");
    dst.qmp
        .wait_status("completed", PHASE)
        .unwrap_or_else(|e| panic!("QEMU: {e}; log: {}", dst.log()));
    let info = src.cmd("query-migrate", Value::Null);
    let src_ram = src.dump(RAM_MB << 20);
    let dst_ram = dst.dump_ram().unwrap();
    assert_eq!(src_ram.len(), dst_ram.len());
    assert_eq!(
        first_diff_page(&src_ram, &dst_ram),
        None,
        "QEMU's RAM differs from qmig-src's; src info {info}"
    );
    assert_eq!(info["status"], "completed");
    assert_eq!(info["ram"]["remaining"], 0);
    assert!(info["x-qmig"]["dirty-tracking"].is_string(), "{info}");
    if requests_expected {
        assert!(
            info["ram"]["postcopy-requests"].as_u64().unwrap() >= 1,
            "{info}"
        );
    }
    if matches!(case.mode, Mode::PostcopyCut | Mode::PostcopyPause) {
        assert_eq!(info["x-qmig"]["recoveries"], 1, "{info}");
    }
    eprintln!("qmig-src query-migrate: {info}");
    // The destination really runs what it got.
    let st = dst.qmp("query-status", Value::Null).unwrap();
    assert_eq!(st["status"], "running", "{st}");
    drop(proxy);
    Some(info)
}

#[test]
fn precopy_static_guest() {
    run(Case {
        mode: Mode::Precopy,
        with_cpu: false,
        workload: None,
        params: json!({}),
    });
}

#[test]
fn precopy_static_guest_with_cpu_devices_from_template() {
    run(Case {
        mode: Mode::Precopy,
        with_cpu: true,
        workload: None,
        params: json!({}),
    });
}

#[test]
fn precopy_dirtying_guest_converges_over_iterations() {
    let Some(info) = run(Case {
        mode: Mode::Precopy,
        with_cpu: false,
        workload: Some("random,threads=1,rate=4000,working-set=4M"),
        params: json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 50}),
    }) else {
        return;
    };
    let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap();
    assert!(syncs >= 3, "expected several iterations: {info}");
}

#[test]
fn postcopy_with_page_requests() {
    run(Case {
        mode: Mode::Postcopy,
        with_cpu: true,
        workload: Some("random,threads=1,rate=2000,working-set=8M"),
        params: json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 8u64 << 20}),
    });
}

#[test]
fn postcopy_background_pages_only() {
    run(Case {
        mode: Mode::Postcopy,
        with_cpu: false,
        workload: None,
        params: json!({"max-bandwidth": 8u64 << 20}),
    });
}

#[test]
fn postcopy_link_cut_then_resume_to_new_port() {
    run(Case {
        mode: Mode::PostcopyCut,
        with_cpu: true,
        workload: Some("random,threads=1,rate=2000,working-set=8M"),
        params: json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    });
}

#[test]
fn postcopy_migrate_pause_then_resume() {
    run(Case {
        mode: Mode::PostcopyPause,
        with_cpu: false,
        workload: Some("sequential,threads=1,rate=1000"),
        params: json!({"max-bandwidth": 8u64 << 20, "max-postcopy-bandwidth": 4u64 << 20}),
    });
}
