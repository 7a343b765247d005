//! Real QEMU 10.0 as the source, qmig-dst as the destination: issue #4's scenarios 1–6.
//!
//! QEMU 10.0 runs `-M microvm -cpu qemu64 -m 64M -S -bios TEST_FIRMWARE` (the vectors' 10.0
//! guest, launched by `qmig_conformance::qemu::Qemu`), guest RAM written through qtest with
//! the vectors' pattern; qmig-dst runs `--ram 64M --machine microvm --profile 10` with the 10.0
//! microvm VM description. Every scenario ends with QEMU's RAM (`pmemsave` after the source
//! stopped) byte-identical to qmig-dst's, except the firmware window QEMU maps over RAM at
//! pages 192..256 (qmig-dst's RAM must be zero there: nothing writes it), and with QEMU's
//! firmware (`pc.bios`, read at the top of the 4 GiB space) identical to qmig-dst's `pc.bios`
//! block.
//!
//! QEMU is found by `qmig_conformance::qemu::find_qemu` (the `conformance/scripts/qemu-10.0`
//! chroot wrapper): a missing QEMU skips the tests, or fails them when `CI` or
//! `QMIG_REQUIRE_QEMU` is set. Waits are on QMP events and on the proxy's traffic (timeouts are
//! failure guards only).
//!
//! Failures are injected only after qmig-dst processed `POSTCOPY_RUN`: its `postcopy-active`
//! comes at `POSTCOPY_LISTEN`, and a failure between LISTEN and RUN is fatal by design
//! (SM-FATAL-BEFORE-RUN). qmig-dst handles the stream in order on one thread, so its answer to
//! QEMU's PING 4 (sent after the package that ends with RUN) on the return path, observed in
//! the proxy, proves RUN was processed. So no cut lands in that window and no scenario needs
//! a rerun (the QEMU-destination tests rerun on QEMU's `loadvm failed` in that window; with
//! QEMU as the source there is no such failure).

mod common;

use std::net::SocketAddr;

use common::{decode_rp, wait_pong, Dst, Rp, GUARD};
use qmig_conformance::qemu::driver::pattern;
use qmig_conformance::qemu::pattern::{random_page, PAGE};
use qmig_conformance::qemu::{find_qemu, Machine, Proxy, Qemu, QemuVersion};
use qmig_protocol::profile::Profile;
use serde_json::{json, Value};

const RAM_MB: u64 = 64;
const RAM: u64 = RAM_MB << 20;
const MACHINE: Machine = Machine::Microvm;
/// The firmware block and where QEMU maps it (the top of the 4 GiB space).
const BIOS: (&str, u64, u64) = ("pc.bios", (1 << 32) - 131072, 131072);

fn vmdesc() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/qemu-10.0/postcopy/vmdesc.json"
    )
    .to_string()
}

fn caps(postcopy: bool, extra: &[&str]) -> Value {
    let mut v = vec![json!({"capability": "return-path", "state": true})];
    if postcopy {
        v.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    for c in extra {
        v.push(json!({"capability": c, "state": true}));
    }
    json!({ "capabilities": v })
}

/// A QEMU 10.0 microvm source with the pattern written, and a qmig-dst.
struct Pair {
    src: Qemu,
    dst: Dst,
}

/// Starts both sides, or `None` when QEMU 10.0 is not provisioned (and not required).
fn start(seed: u64, random_pages: u64, postcopy: bool, workload: Option<&str>) -> Option<Pair> {
    let bin = find_qemu(QemuVersion::V10_0).expect("QEMU 10.0 is required")?;
    let mut src = Qemu::launch(&bin, MACHINE, RAM_MB, false, &[]).expect("launch QEMU 10.0");
    let q = src.qtest().expect("qtest");
    for w in pattern(seed, MACHINE, RAM_MB, random_pages) {
        q.write(w.page * PAGE as u64, &w.data).expect("qtest write");
    }
    let vd = vmdesc();
    let mut args = vec![
        "--ram",
        "64M",
        "--machine",
        "microvm",
        "--profile",
        "10",
        "--vmdesc",
        &vd,
    ];
    if let Some(w) = workload {
        args.extend(["--workload", w]);
    }
    let mut dst = Dst::spawn(&args);
    src.qmp("migrate-set-capabilities", caps(postcopy, &[]))
        .expect("source capabilities");
    dst.cmd("migrate-set-capabilities", caps(postcopy, &[]));
    Some(Pair { src, dst })
}

impl Pair {
    fn src_wait(&mut self, status: &str) {
        if let Err(e) = self.src.qmp.wait_status(status, GUARD) {
            let info = self.src.qmp("query-migrate", json!({}));
            panic!(
                "QEMU 10.0 never reached {status}: {e}\nQEMU query-migrate: {info:?}\n\
                 QEMU log: {}\nqmig-dst log:\n{}",
                self.src.log(),
                self.dst.log()
            );
        }
    }

    fn migrate(&mut self, to: SocketAddr, resume: bool) {
        let mut a = json!({"uri": format!("tcp:{to}")});
        if resume {
            a["resume"] = json!(true);
        }
        self.src.qmp("migrate", a).expect("migrate");
    }

    fn params(&mut self, p: Value) {
        self.src
            .qmp("migrate-set-parameters", p)
            .expect("set parameters");
    }

    /// `migrate-incoming` on qmig-dst behind a recording proxy; `migrate` on QEMU.
    fn migrate_via_proxy(&mut self) -> Proxy {
        let addr = self.dst.listen("migrate-incoming");
        let proxy = Proxy::start(addr).expect("proxy");
        self.migrate(proxy.addr(), false);
        proxy
    }

    /// Both sides completed; QEMU's RAM equals qmig-dst's, byte for byte (see the module doc).
    fn finish(&mut self) {
        self.src_wait("completed");
        self.dst.wait_status("completed");
        let a = self.src.dump_ram().expect("QEMU pmemsave");
        let b = self.dst.pmemsave(RAM);
        assert_eq!(a.len(), b.len());
        let window = MACHINE.reserved_pages();
        let diff = a
            .chunks(PAGE)
            .zip(b.chunks(PAGE))
            .enumerate()
            .find(|(i, (x, y))| !window.contains(&(*i as u64)) && x != y);
        if let Some((p, _)) = diff {
            panic!(
                "RAM differs first at page {p}; qmig-dst log:\n{}",
                self.dst.log()
            );
        }
        let hidden = &b[window.start as usize * PAGE..window.end as usize * PAGE];
        assert!(
            hidden.iter().all(|&x| x == 0),
            "qmig-dst RAM under QEMU's firmware window is not zero"
        );
        // Not a trivially equal (all-zero) guest.
        assert!(a.chunks(PAGE).filter(|p| p.iter().any(|&x| x != 0)).count() > 10);
        let (name, addr, len) = BIOS;
        let bios_src = self
            .src
            .pmemsave(addr, len)
            .expect("QEMU pmemsave of the firmware");
        let bios_dst = self.dst.ramsave(name);
        assert_eq!(bios_src.len(), bios_dst.len());
        assert!(bios_src == bios_dst, "pc.bios differs");
        assert!(
            bios_src.iter().any(|&x| x != 0),
            "the firmware is not empty"
        );
        let status = self.dst.cmd("query-status", json!({}));
        assert_eq!(status["status"], "running", "{status}");
    }

    /// Starts postcopy once precopy is active; waits for postcopy-active on both sides and
    /// for qmig-dst's PONG 4 through `proxy` (POSTCOPY_RUN processed, see the module doc).
    fn start_postcopy(&mut self, proxy: &Proxy) {
        self.src_wait("active");
        self.src
            .qmp("migrate-start-postcopy", json!({}))
            .expect("start postcopy");
        self.dst.wait_status("postcopy-active");
        self.src_wait("postcopy-active");
        wait_pong(proxy, 4);
    }

    /// Both sides paused; qmig-dst's error-desc names `rule`.
    fn paused(&mut self, rule: &str) {
        self.dst.wait_status("postcopy-paused");
        self.src_wait("postcopy-paused");
        let info = self.dst.info();
        assert_eq!(info["status"], "postcopy-paused", "{info}");
        let desc = info["error-desc"].as_str().unwrap_or_default();
        assert!(desc.contains(rule), "error-desc without {rule}: {info}");
    }

    /// `migrate-recover` on qmig-dst (a new port, behind a new proxy), `migrate resume=true`
    /// on QEMU, which goes through `postcopy-recover-setup`; returns the proxy.
    fn resume(&mut self) -> Proxy {
        let addr = self.dst.listen("migrate-recover");
        let proxy = Proxy::start(addr).expect("recovery proxy");
        self.migrate(proxy.addr(), true);
        self.src_wait("postcopy-recover-setup");
        self.dst.wait_status("postcopy-recover");
        proxy
    }

    /// A recovery that completes: both sides back in postcopy-active.
    fn recover(&mut self) -> Proxy {
        self.params(json!({"max-postcopy-bandwidth": 1u64 << 30}));
        let p = self.resume();
        self.dst.wait_status("postcopy-active");
        self.src_wait("postcopy-active");
        p
    }

    fn recoveries(&mut self) -> u64 {
        self.dst.info()["x-qmig"]["recoveries"]
            .as_u64()
            .unwrap_or(0)
    }
}

/// Scenario 1: precopy of a static guest.
#[test]
fn precopy_static_guest() {
    let Some(mut p) = start(201, 150, false, None) else {
        return;
    };
    let _proxy = p.migrate_via_proxy();
    p.finish();
    let info = p.dst.info();
    assert_eq!(info["status"], "completed");
    assert!(
        info["ram"]["transferred"].as_u64().unwrap() > 150 * 4096,
        "{info}"
    );
}

/// Scenario 2: precopy while QEMU's guest memory keeps being written (qtest writes while the
/// source is `active`, held back by a low bandwidth, with `pause-before-switchover` so that
/// no write lands after the final dirty sync).
#[test]
fn precopy_while_guest_writes() {
    let Some(mut p) = start(202, 100, false, None) else {
        return;
    };
    p.src
        .qmp(
            "migrate-set-capabilities",
            caps(false, &["pause-before-switchover"]),
        )
        .expect("caps");
    p.params(json!({"max-bandwidth": 256 << 10, "downtime-limit": 1}));
    let _proxy = p.migrate_via_proxy();
    p.src_wait("active");
    let reserved = MACHINE.reserved_pages();
    let mut during = 0;
    for gen in 1..=12u32 {
        let q = p.src.qtest().expect("qtest");
        for k in 0..8u64 {
            let page = (u64::from(gen) * 97 + k * 1031) % (RAM / PAGE as u64);
            if reserved.contains(&page) {
                continue;
            }
            q.write(page * PAGE as u64, &random_page(9, page, gen))
                .expect("qtest write");
        }
        let st = p.src.qmp.migration_status().expect("status");
        if st == "active" {
            during += 1;
        } else {
            break;
        }
    }
    assert!(during > 0, "no write happened while precopy was active");
    p.params(json!({"max-bandwidth": 1u64 << 30}));
    p.src_wait("pre-switchover");
    p.src
        .qmp("migrate-continue", json!({"state": "pre-switchover"}))
        .expect("continue");
    p.finish();
    let info = p
        .src
        .qmp("query-migrate", json!({}))
        .expect("query-migrate");
    assert!(
        info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2,
        "{info}"
    );
}

/// Scenario 3: postcopy with the qmig-dst workload faulting; page requests in the statistics.
#[test]
fn postcopy_with_faulting_workload() {
    let Some(mut p) = start(203, 150, true, Some("random,threads=2,rate=2000")) else {
        return;
    };
    p.params(json!({"max-bandwidth": 128 << 10, "max-postcopy-bandwidth": 256 << 10}));
    let proxy = p.migrate_via_proxy();
    p.start_postcopy(&proxy);
    p.finish();
    let info = p.dst.info();
    let req = info["ram"]["postcopy-requests"].as_u64().unwrap_or(0);
    assert!(req > 0, "no page request: {info}");
    let x = &info["x-qmig"];
    assert!(x["faults"].as_u64().unwrap_or(0) > 0, "{info}");
    let lat = &x["fault-latency-us"];
    assert!(lat["count"].as_u64().unwrap_or(0) > 0, "{info}");
    assert!(lat["p50"].as_f64().unwrap() <= lat["p99"].as_f64().unwrap());
    assert!(lat["p99"].as_f64().unwrap() <= lat["max"].as_f64().unwrap());
    // QEMU saw the requests too.
    let rp = decode_rp(&proxy.recordings()[0].d2s.bytes, Profile::QEMU_10);
    assert!(rp.contains(&Rp::Req), "no page request on the return path");
    assert_eq!(rp.last(), Some(&Rp::Shut(0)));
}

/// Scenario 4: postcopy with the TCP link cut mid-stream: both sides pause, then
/// `migrate-recover` on qmig-dst and `migrate resume=true` on QEMU complete the migration.
#[test]
fn postcopy_link_cut_then_recover() {
    let Some(mut p) = start(204, 150, true, Some("random,threads=2,rate=500")) else {
        return;
    };
    p.params(json!({"max-bandwidth": 128 << 10, "max-postcopy-bandwidth": 64 << 10}));
    let proxy = p.migrate_via_proxy();
    p.start_postcopy(&proxy);
    proxy.cut();
    p.paused("SM-PAUSE-AFTER-RUN");
    assert!(proxy.recordings()[0].cut);
    let rec = p.recover();
    p.finish();
    assert_eq!(p.recoveries(), 1);
    // The recovery channel carried one RECV_BITMAP answer per block, then RESUME_ACK.
    let rp = decode_rp(&rec.recordings()[0].d2s.bytes, Profile::QEMU_10);
    let bitmaps = rp
        .iter()
        .take_while(|m| matches!(m, Rp::Bitmap(..)))
        .count();
    assert_eq!(bitmaps, 5, "{rp:?}");
    assert_eq!(rp.get(bitmaps), Some(&Rp::ResumeAck(1)), "{rp:?}");
}

/// Scenario 5: the same with `migrate-pause` on qmig-dst as the failure. qmig-dst closes its
/// end; connected directly, QEMU would see its writes fail at once, while the recording proxy
/// only half-closes towards QEMU (QEMU 10.0 then sees just its return path end and goes to
/// `failed` rather than `postcopy-paused`), so the proxy passes the close on.
#[test]
fn postcopy_pause_then_recover() {
    let Some(mut p) = start(205, 150, true, Some("random,threads=2,rate=500")) else {
        return;
    };
    p.params(json!({"max-bandwidth": 128 << 10, "max-postcopy-bandwidth": 64 << 10}));
    let proxy = p.migrate_via_proxy();
    p.start_postcopy(&proxy);
    p.dst.cmd("migrate-pause", json!({}));
    // qmig-dst closed its end; a direct connection would now fail QEMU's writes too, the
    // proxy only half-closes towards QEMU: pass the close on.
    proxy.cut();
    p.paused("SM-PAUSE-AFTER-RUN");
    let _rec = p.recover();
    p.finish();
    assert_eq!(p.recoveries(), 1);
}

/// Scenario 6: two failures in a row, the second during the recovery (QEMU 10.0 in
/// `postcopy-recover-setup` / `postcopy-recover`): the link is cut in postcopy, then the
/// recovery channel is cut after 64 bytes (inside the RECV_BITMAP exchange); both sides pause
/// again, and a second recovery completes the migration.
#[test]
fn postcopy_second_failure_during_recovery() {
    let Some(mut p) = start(206, 150, true, Some("random,threads=2,rate=500")) else {
        return;
    };
    p.params(json!({"max-bandwidth": 128 << 10, "max-postcopy-bandwidth": 32 << 10}));
    let proxy = p.migrate_via_proxy();
    p.start_postcopy(&proxy);
    proxy.cut();
    p.paused("SM-PAUSE-AFTER-RUN");
    // The second failure: the recovery channel dies after 64 bytes.
    let addr = p.dst.listen("migrate-recover");
    let broken = Proxy::start(addr).expect("recovery proxy");
    broken.arm_cut(0, 64);
    p.migrate(broken.addr(), true);
    p.src_wait("postcopy-recover-setup");
    broken
        .wait_closed(0, GUARD)
        .expect("the recovery channel was never cut");
    assert!(broken.recordings()[0].cut);
    p.paused("SM-PAUSE-IN-RECOVER");
    assert_eq!(p.recoveries(), 0);
    let _rec = p.recover();
    p.finish();
    assert_eq!(p.recoveries(), 1);
}
