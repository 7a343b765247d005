//! qmig-src's QMP surface outside a migration: run state, pmemsave, parameters and
//! capabilities, and the refusals QEMU gives for commands that do not apply.

mod common;

use common::Src;
use qmig_host::fill::{page_content, Content};
use serde_json::{json, Value};

fn err(src: &mut Src, cmd: &str, args: Value) -> String {
    match src.qmp.execute(cmd, args) {
        Ok(v) => panic!("{cmd} succeeded: {v}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn run_state_memory_and_settings() {
    let mut src = Src::spawn(&[
        "--ram",
        "1M",
        "--block",
        "extra:64K",
        "--fill",
        "pattern",
        "--seed",
        "11",
        "--workload",
        "random,threads=1,rate=100",
    ]);
    assert_eq!(src.cmd("query-migrate", Value::Null), json!({}));
    assert_eq!(
        src.cmd("query-status", Value::Null),
        json!({"status": "running", "running": true})
    );
    src.cmd("stop", Value::Null);
    assert_eq!(
        src.cmd("query-status", Value::Null),
        json!({"status": "paused", "running": false})
    );
    let stop = src
        .qmp
        .wait_event("STOP", |_| true, common::PHASE)
        .expect("STOP event");
    assert_eq!(stop.name, "STOP");

    // pmemsave: blocks back to back from guest-physical 0; the second block is untouched by
    // the workload (which writes block 0 only), so it is exactly its fill.
    let all = src.dump((1 << 20) + (64 << 10));
    assert_eq!(all.len(), (1 << 20) + (64 << 10));
    let mut want = [0u8; 4096];
    for p in 0..16u64 {
        page_content(Content::Pattern { seed: 11 }, p, &mut want);
        let at = (1 << 20) + (p as usize) * 4096;
        assert_eq!(&all[at..at + 4096], &want[..], "page {p} of block extra");
    }
    let e = err(
        &mut src,
        "pmemsave",
        json!({"val": 1 << 20, "size": 1 << 20, "filename": "/dev/null"}),
    );
    assert!(e.contains("beyond RAM"), "{e}");

    src.cmd("cont", Value::Null);
    assert_eq!(src.cmd("query-status", Value::Null)["running"], true);

    // Parameters and capabilities round-trip.
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1234567, "downtime-limit": 77, "max-postcopy-bandwidth": 99}),
    );
    let p = src.cmd("query-migrate-parameters", Value::Null);
    assert_eq!(p["max-bandwidth"], 1234567);
    assert_eq!(p["downtime-limit"], 77);
    assert_eq!(p["max-postcopy-bandwidth"], 99);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]}),
    );
    let caps = src.cmd("query-migrate-capabilities", Value::Null);
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "postcopy-ram", "state": true})));
    let e = err(
        &mut src,
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    assert!(e.contains("multifd"), "{e}");

    // Commands that need a migration.
    let e = err(&mut src, "migrate-start-postcopy", Value::Null);
    assert!(e.contains("after migration has been started"), "{e}");
    let e = err(&mut src, "migrate-pause", Value::Null);
    assert!(e.contains("postcopy-active"), "{e}");
    let e = err(
        &mut src,
        "migrate",
        json!({"uri": "tcp:127.0.0.1:1", "resume": true}),
    );
    assert!(e.contains("no paused migration"), "{e}");
    let e = err(&mut src, "migrate", json!({"uri": "exec:cat"}));
    assert!(e.contains("exec"), "{e}");
    let e = err(&mut src, "no-such-command", Value::Null);
    assert!(e.contains("has not been found"), "{e}");

    // A migration to a closed port fails with the reason, and the guest keeps running.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    src.qmp
        .poll_until(
            "query-migrate",
            Value::Null,
            |v| v["status"] == "failed",
            std::time::Duration::from_millis(10),
            common::PHASE,
        )
        .unwrap();
    let info = src.cmd("query-migrate", Value::Null);
    assert!(
        info["error-desc"]
            .as_str()
            .unwrap()
            .contains("connecting to"),
        "{info}"
    );
    assert_eq!(src.cmd("query-status", Value::Null)["running"], true);
}

#[test]
fn migrate_cancel_during_precopy() {
    use std::io::Read;
    let mut src = Src::spawn(&[
        "--ram",
        "16M",
        "--fill",
        "random",
        "--workload",
        "random,threads=1,rate=100",
    ]);
    src.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    );
    src.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 20}),
    );
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let (mut s, _) = l.accept().unwrap();
    src.wait("active");
    src.cmd("migrate_cancel", Value::Null);
    src.wait("cancelling");
    src.wait("cancelled");
    // The channel is closed: the destination reads to its end.
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert_eq!(&v[..4], b"QEVM");
    assert!(v.len() < 16 << 20);
    assert_eq!(src.cmd("query-status", Value::Null)["running"], true);
    assert_eq!(src.cmd("query-migrate", Value::Null)["status"], "cancelled");
}

/// `x-qmig-write`: a store at a guest-physical address (blocks back to back), seen by
/// `pmemsave`; a range past RAM, odd or non-hex data are refused.
#[test]
fn x_qmig_write_stores_guest_bytes() {
    let mut src = Src::spawn(&["--ram", "1M", "--block", "extra:64K", "--fill", "zero"]);
    src.cmd(
        "x-qmig-write",
        json!({"addr": 5 * 4096 + 3, "data": "00a1b2ff"}),
    );
    src.cmd(
        "x-qmig-write",
        json!({"addr": (1 << 20) + 4096, "data": "7e"}),
    );
    let all = src.dump((1 << 20) + (64 << 10));
    assert_eq!(
        &all[5 * 4096..5 * 4096 + 8],
        &[0, 0, 0, 0, 0xa1, 0xb2, 0xff, 0]
    );
    assert_eq!(all[(1 << 20) + 4096], 0x7e);
    let nonzero = all.iter().filter(|&&b| b != 0).count();
    assert_eq!(nonzero, 4);
    let e = err(
        &mut src,
        "x-qmig-write",
        json!({"addr": (1 << 20) + (64 << 10), "data": "00"}),
    );
    assert!(e.contains("beyond RAM"), "{e}");
    for bad in ["abc", "zz"] {
        let e = err(&mut src, "x-qmig-write", json!({"addr": 0, "data": bad}));
        assert!(e.contains("hex digits"), "{bad}: {e}");
    }
}
