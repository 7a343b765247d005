//! The synthetic cases with guest faults (`valid-sm-first-req-named-*`,
//! `valid-sm-rerequest-*`, `replay.faults`): their manifests and bytes, their decode check, and
//! their replay against qmig-dst (the access made with `x-qmig-probe-read`), the broken
//! destinations `bare-first-req` / `no-rerequest` (which must fail them naming their rule), and
//! QEMU 7.2 / 10.0 (the access made with qtest `readq`, `migrate-recover` out of band). Tests
//! that need QEMU print a note and pass without it, unless `CI` or `QMIG_REQUIRE_QEMU` is set:
//! then `find_qemu` fails them. The replays use the `qmig-dst` next to the test binary: build it
//! first (`cargo build -p qmig-dst -p qmig-conformance --bins`).

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::report::Status;
use qmig_conformance::synth::base;
use serde_json::{json, Value};

mod synth_util;
use synth_util::{decode, read, run, status};

const FIRST: [&str; 2] = [
    "valid-sm-first-req-named-postcopy-72",
    "valid-sm-first-req-named-postcopy-10",
];
const REREQUEST: [&str; 2] = [
    "valid-sm-rerequest-fault-recover-72",
    "valid-sm-rerequest-fault-recover-10",
];

fn manifest(case: &str) -> Value {
    serde_json::from_slice(&read(case, "manifest.json")).unwrap()
}

/// The first access's request: REQ_PAGES_ID(`ram`, page 2 = byte 8192, one page).
fn page2() -> Value {
    json!({"block": "ram", "start": 8192, "len": 4096})
}

/// Where the runner stops writing: right before the `ram` PART after PING(4) (section type
/// 0x02, section id 2), i.e. after POSTCOPY_RUN and before pages 2 and 3.
#[test]
fn fault_manifests_name_the_access_and_the_request() {
    for (case, ten) in [(FIRST[0], false), (FIRST[1], true)] {
        let m = manifest(case);
        let stop = base::postcopy(ten).offset_of("pc_part_hdr");
        assert_eq!(
            m["replay"]["faults"],
            json!([{"channel": "main", "at": stop, "after": "run", "block": "ram", "page": 2,
                    "expect": {"first_request": page2()}}]),
            "{case}"
        );
        // The main channel is the postcopy base whole; pages 2 and 3 come after the stop.
        let s = read(case, "stream.bin");
        assert_eq!(s, base::postcopy(ten).bytes(), "{case}");
        assert_eq!(&s[stop as usize..stop as usize + 5], &[2, 0, 0, 0, 2]);
        assert_eq!(m["machine"]["cpu"], "qemu64,apic-id=0");
    }
    for (case, ten) in [(REREQUEST[0], false), (REREQUEST[1], true)] {
        let m = manifest(case);
        let stop = base::postcopy(ten).offset_of("pc_part_hdr");
        // The main channel ends at the stop: the cut comes with the access waiting.
        assert_eq!(read(case, "stream.bin").len() as u64, stop, "{case}");
        // RECV_BITMAP(ram) (9 bytes), POSTCOPY_RESUME (5): the second access after RESUME_ACK.
        assert_eq!(
            m["replay"]["faults"],
            json!([
                {"channel": "initial", "at": stop, "after": "run", "block": "ram", "page": 2,
                 "expect": {"first_request": page2()}},
                {"channel": "recovery", "at": 14, "after": "resume-ack", "block": "ram", "page": 3,
                 "expect": {"rerequest_first": page2()}}
            ]),
            "{case}"
        );
        let r = read(case, "resume-stream.bin");
        assert_eq!(&r[14..19], &[2, 0, 0, 0, 2], "{case}");
        // Page 2 as PAGE (0x08) naming `ram` (no CONTINUE): the header word is the page's
        // address | flags, then the name, then its 4096 bytes, equal to the final RAM's page 2.
        assert_eq!(&r[19..27], &(8192u64 | 0x08).to_be_bytes(), "{case}");
        assert_eq!(&r[27..31], b"\x03ram", "{case}");
        assert_eq!(
            &r[31..31 + 4096],
            &base::final_ram(true)[8192..12288],
            "{case}"
        );
        // The destination's bitmap at the cut: pages 0, 1, 4 (0x13).
        let rp = read(case, "resume-rp.bin");
        assert_eq!(rp[16], 0x13, "{case}");
    }
}

#[test]
fn fault_cases_pass_their_decode_check() {
    let r = decode("decode/synthetic/valid-sm-*re*-*");
    for case in FIRST.iter().chain(&REREQUEST) {
        assert!(
            matches!(
                status(&r, &format!("decode/synthetic/{case}")),
                Status::Pass(_)
            ),
            "{case}: {r:#?}"
        );
    }
}

/// qmig-dst: the access waits for page 2, the first request names `ram` and page 2; after the
/// cut and RESUME_ACK, page 2 is requested again, named, before page 3's new access.
#[test]
fn fault_cases_against_qmig_dst() {
    let r = run("qmig", "replay-dst[qmig]/synthetic/valid-sm-*re*-*");
    for case in FIRST {
        match status(&r, &format!("replay-dst[qmig]/synthetic/{case}")) {
            Status::Pass(m) => assert_eq!(
                m,
                "1 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal; \
                 main: access to ram page 2; the first page request on the connection: \
                 REQ_PAGES_ID ram page 2 (4096 bytes at 8192); the guest accesses returned",
                "{case}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    for case in REREQUEST {
        match status(&r, &format!("replay-dst[qmig]/synthetic/{case}")) {
            Status::Pass(m) => assert_eq!(
                m,
                "2 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal; \
                 initial: access to ram page 2; the first page request on the connection: \
                 REQ_PAGES_ID ram page 2 (4096 bytes at 8192); recovery: access to ram page 3; \
                 the first message after RESUME_ACK: REQ_PAGES_ID ram page 2 (4096 bytes at 8192); \
                 the guest accesses returned",
                "{case}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
}

/// The page-request defects fail the fault cases with a message naming their rule:
/// `bare-first-req` all four (at the first request of the main connection), `no-rerequest` the
/// two rerequest cases (the first request after RESUME_ACK is page 3's); the first-request cases
/// have no recovery, so `no-rerequest` passes them.
#[test]
fn broken_page_requests_fail_with_their_rule() {
    let r = run(
        "broken-bare-first-req:qmig",
        "replay-dst[broken-bare-first-req:qmig]/synthetic/valid-sm-*re*-*",
    );
    for case in FIRST.iter().chain(&REREQUEST) {
        let name = format!("replay-dst[broken-bare-first-req:qmig]/synthetic/{case}");
        match status(&r, &name) {
            Status::Fail(m) => assert!(
                m.ends_with(
                    ": SM-FIRST-REQ-NAMED: the first page request on the connection is a bare \
                     REQ_PAGES (0004000c000000000000200000001000), which names no block: the first \
                     request on every connection must be REQ_PAGES_ID"
                ),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    let r = run(
        "broken-no-rerequest:qmig",
        "replay-dst[broken-no-rerequest:qmig]/synthetic/valid-sm-*re*-*",
    );
    for case in REREQUEST {
        let name = format!("replay-dst[broken-no-rerequest:qmig]/synthetic/{case}");
        match status(&r, &name) {
            Status::Fail(m) => assert!(
                m.starts_with(
                    "recovery: SM-REREQUEST: the first message after RESUME_ACK requests \
                     (no block named yet) page 3 (4096 bytes at 12288), not ram page 2"
                ),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    for case in FIRST {
        let name = format!("replay-dst[broken-no-rerequest:qmig]/synthetic/{case}");
        assert!(matches!(status(&r, &name), Status::Pass(_)), "{case}");
    }
}

/// QEMU 7.2 and 10.0 pass the four cases: qtest `readq` blocks their main thread until page 2
/// is placed, their fault thread requests it (REQ_PAGES_ID), and after the cut they accept
/// `migrate-recover` out of band, answer RECV_BITMAP, RESUME_ACK, then request page 2 again.
/// A QEMU template without qtest cannot make the access: the case is skipped as unsupported.
#[test]
fn fault_cases_against_qemu() {
    for (version, profile) in [(QemuVersion::V7_2, "72"), (QemuVersion::V10_0, "10")] {
        let Some(q) = find_qemu(version).unwrap() else {
            eprintln!(
                "QEMU {} not installed: fault replays against it not run",
                version.as_str()
            );
            continue;
        };
        let r = run(
            "qemu",
            &format!("replay-dst[qemu]/synthetic/valid-sm-*re*-{profile}"),
        );
        for case in FIRST
            .iter()
            .chain(&REREQUEST)
            .filter(|c| c.ends_with(profile))
        {
            match status(&r, &format!("replay-dst[qemu]/synthetic/{case}")) {
                Status::Pass(m) => assert!(
                    m.contains(
                        "REQ_PAGES_ID ram page 2 (4096 bytes at 8192); the guest accesses returned"
                    ),
                    "{case}: {m}"
                ),
                // QEMU 7.2's intermittent bare request during postcopy-recover (skip list).
                Status::Skip(m) if case.contains("rerequest") && profile == "72" => {
                    assert!(m.contains("D-23"), "{case}: {m}")
                }
                s => panic!("QEMU {}: {case}: {s:?}", version.as_str()),
            }
        }
        let plain = format!(
            "{} -M {{MACHINE}} {{CPU}} -m {{RAM}} -nodefaults -nographic -display none \
             -incoming defer -qmp unix:{{QMP}},server=on,wait=off",
            q.program.display()
        );
        let case = FIRST.iter().find(|c| c.ends_with(profile)).unwrap();
        let r = run(&plain, &format!("replay-dst[custom]/synthetic/{case}"));
        match &r[0].status {
            Status::Skip(m) => assert!(
                m.starts_with("unsupported: a fault case needs a guest-access trigger")
                    && m.contains("CommandNotFound"),
                "{m}"
            ),
            s => panic!("QEMU {} without qtest: {s:?}", version.as_str()),
        }
    }
}
