//! The huge-page synthetic cases (`*-huge-*`: one 4 MiB block `ram` of 2 MiB pages, postcopy):
//! their exact bytes, their decode check, and their replay against qmig-dst (`--ram-page-size`)
//! and QEMU 7.2 / 10.0 with a hugetlbfs block (`{MEM_BACKEND}`; the QEMU replays print a skip
//! note and pass without QEMU or without free huge pages). A destination configured with 4 KiB
//! pages must fail the valid cases: the page size in the manifest is what makes them pass. The
//! replays use the `qmig-dst` next to the test binary: build it first
//! (`cargo build -p qmig-dst -p qmig-conformance --bins`).

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::{self, report::CaseResult, report::Status, Options};
use serde_json::{json, Value};

mod synth_util;
use synth_util::{decode, dir, hex, read, run, status};

const VALID: [&str; 4] = [
    "valid-ram-hostpage-huge-postcopy-72",
    "valid-ram-hostpage-huge-postcopy-10",
    "valid-sm-partial-hostpage-huge-recover-72",
    "valid-sm-partial-hostpage-huge-recover-10",
];
const INVALID: [&str; 4] = [
    "invalid-ram-pagesize-huge-postcopy-72",
    "invalid-ram-pagesize-huge-postcopy-10",
    "invalid-ram-hostpage-huge-postcopy-72",
    "invalid-ram-hostpage-huge-postcopy-10",
];

/// Every result of `r` has the status `want` (`Pass` or `Fail`, message aside).
fn all(r: &[CaseResult], want: fn(&Status) -> bool) {
    for c in r {
        assert!(want(&c.status), "{}: {:?}", c.name, c.status);
    }
}

/// The message of case `prefix/case`, which must have passed.
fn passed<'a>(r: &'a [CaseResult], prefix: &str, case: &str) -> &'a str {
    match status(r, &format!("{prefix}/{case}")) {
        Status::Pass(m) => m,
        s => panic!("{case}: {s:?}"),
    }
}

fn manifest(case: &str) -> Value {
    serde_json::from_slice(&read(case, "manifest.json")).unwrap()
}

/// POSTCOPY_ADVISE with the 2 MiB summary, the MEM_SIZE entry with its `page_size` field, the
/// manifests' page sizes, and the recovery's return path: RECV_BITMAP(`ram`, 1024 pages = 128
/// bytes, pages 0-4 only: host page 1, cut unfinished, is clear), RESUME_ACK(1), SHUT(0).
#[test]
fn huge_page_bytes_and_manifests_are_exact() {
    // ADVISE (offset 31): summary 0x200000, target page 0x1000; ram START (52); MEM_SIZE (69):
    // total 4 MiB, `ram` 4 MiB, page_size 2 MiB; EOS.
    let head = "0800030010\
                00000000002000000000000000001000\
                0100000002\
                0372616d0000000000000004\
                00000000004000040372616d\
                00000000004000000000000000200000\
                0000000000000010";
    for case in VALID.iter().chain(&INVALID) {
        let m = manifest(case);
        assert_eq!(
            m["synthetic"]["blocks"],
            json!([["ram", 4 << 20, 2 << 20]]),
            "{case}"
        );
        assert_eq!(m["machine"]["ram_page_size"], json!(2 << 20), "{case}");
        assert_eq!(m["machine"]["ram_bytes"], json!(4 << 20), "{case}");
        let s = hex(&read(case, "stream.bin"));
        let want = if case.contains("pagesize") {
            // The page_size field says 1 GiB.
            head.replace(
                "0372616d00000000004000000000000000200000",
                "0372616d00000000004000000000000040000000",
            )
        } else {
            head.to_string()
        };
        assert_eq!(&s[62..62 + want.len()], want, "{case}");
    }
    assert_eq!(
        manifest(INVALID[0])["synthetic"]["expected"],
        json!({"rule": "RAM-PAGESIZE", "offset": 89})
    );
    let rp = format!(
        "000500040372616d{}1f{}0123456789abcdef\
         0006000400000001\
         0001000400000000",
        "0000000000000080",
        "00".repeat(127)
    );
    for case in &VALID[2..] {
        assert_eq!(hex(&read(case, "resume-rp.bin")), rp, "{case}");
        // The cut: page 612's ZERO|CONTINUE record whole, then 4 bytes into the record of page
        // 613 (host page 1's 102nd target page).
        let main = read(case, "stream.bin");
        assert_eq!(
            hex(&main[main.len() - 13..]),
            "00000000002640220000000000",
            "{case}"
        );
    }
}

/// Every huge-page case passes its decode check; the same cases checked by a destination with
/// 4 KiB pages (the manifest's page size dropped) fail every valid one.
#[test]
fn huge_cases_pass_their_decode_check_and_need_the_page_size() {
    let r = decode("decode/synthetic/*-huge-*");
    assert_eq!(r.len(), 8, "{r:#?}");
    all(&r, |s| matches!(s, Status::Pass(_)));
    assert_eq!(
        status(&r, "decode/synthetic/invalid-ram-hostpage-huge-postcopy-72"),
        &Status::Pass(
            "rejected as expected: RAM-HOSTPAGE at offset 16791 (value 0), then postcopy-paused"
                .into()
        )
    );
    assert_eq!(
        status(
            &r,
            "decode/synthetic/valid-sm-partial-hostpage-huge-recover-10"
        ),
        &Status::Pass("2 channels: completed, return paths and final RAM as expected".into())
    );
    // The negative control: the valid cases with `blocks` of 4 KiB pages.
    let tmp = std::env::temp_dir().join(format!("qmig-huge-4k-{}", std::process::id()));
    for case in VALID {
        let d = tmp.join(case);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(dir().join(case)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        let mut m = manifest(case);
        m["synthetic"]["blocks"] = json!([["ram", 4 << 20]]);
        std::fs::write(d.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }
    let r = runner::run_suite(&Options {
        vectors: vec![tmp.clone()],
        filter: Some("decode/*".into()),
        ..Default::default()
    })
    .unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(r.len(), 4, "{r:#?}");
    all(&r, |s| matches!(s, Status::Fail(_)));
}

/// qmig-dst with `--ram-page-size 2097152`: the valid cases complete with the exact return
/// paths and RAM, RAM-PAGESIZE fails with rule and offset in `error-desc`, RAM-HOSTPAGE (after
/// POSTCOPY_RUN) pauses; qmig-dst started without the page size fails every valid case.
#[test]
fn huge_cases_against_qmig_dst() {
    let r = run("qmig", "replay-dst[qmig]/synthetic/*-huge-*");
    assert_eq!(r.len(), 8, "{r:#?}");
    let at = "replay-dst[qmig]/synthetic";
    for case in VALID {
        let m = passed(&r, at, case);
        assert!(
            m.contains("return path per rule, completed, final RAM (4 MiB) equal"),
            "{case}: {m}"
        );
    }
    for case in &INVALID[..2] {
        let m = passed(&r, at, case);
        assert!(
            m.contains("migration failed, error-desc `offset 89: RAM-PAGESIZE:"),
            "{case}: {m}"
        );
    }
    for case in &INVALID[2..] {
        let m = passed(&r, at, case);
        assert!(
            m.starts_with("rejected: migration postcopy-paused, error-desc `offset ")
                && m.contains(": RAM-HOSTPAGE:"),
            "{case}: {m}"
        );
    }
    let no_page_size = "{BIN_DIR}/qmig-dst --qmp unix:{QMP} -m {RAM} --machine {MACHINE} \
                        --profile {PROFILE} --capabilities {CAPS} {VMDESC}";
    let r = run(no_page_size, "replay-dst[custom]/synthetic/valid-*-huge-*");
    assert_eq!(r.len(), 4, "{r:#?}");
    // It runs (`{BIN_DIR}` is where the `qmig` target finds qmig-dst) and refuses the 2 MiB
    // page-size summary of ADVISE.
    all(
        &r,
        |s| matches!(s, Status::Fail(m) if m.contains("CMD-ADVISE-PAGESIZE")),
    );
}

/// Two free 2 MiB pages on a hugetlbfs at /dev/hugepages (what `{MEM_BACKEND}` needs).
fn hugetlbfs_ready() -> bool {
    qmig_conformance::qemu::hugetlbfs_free_pages() >= 2
}

/// QEMU 7.2 and 10.0 with block `ram` on hugetlbfs pass every huge-page case: the valid ones
/// complete with the exact return paths and RAM, RAM-PAGESIZE fails the migration, RAM-HOSTPAGE
/// pauses it (the runner delivers the page once QEMU ran POSTCOPY_RUN: spec deviations D-20).
/// Without a hugetlbfs the test fails under `CI` / `QMIG_REQUIRE_QEMU` (`.ci/run` mounts one).
#[test]
fn huge_cases_against_qemu() {
    if !hugetlbfs_ready() {
        assert!(
            !qmig_conformance::qemu::qemu_required(),
            "no hugetlbfs with 2 free 2 MiB pages at /dev/hugepages (CI / QMIG_REQUIRE_QEMU set)"
        );
        eprintln!(
            "no hugetlbfs with 2 free pages at /dev/hugepages: QEMU huge-page replays not run"
        );
        return;
    }
    for (v, profile) in [(QemuVersion::V7_2, "72"), (QemuVersion::V10_0, "10")] {
        if find_qemu(v).unwrap().is_none() {
            eprintln!("QEMU {v:?} not installed: its huge-page replays not run");
            continue;
        }
        let r = run(
            "qemu",
            &format!("replay-dst[qemu]/synthetic/*-huge-*-{profile}"),
        );
        assert_eq!(r.len(), 4, "{r:#?}");
        for c in &r {
            match &c.status {
                Status::Pass(m) if c.name.contains("/valid-") => {
                    assert!(
                        m.contains("completed, final RAM (4 MiB) equal"),
                        "{}: {m}",
                        c.name
                    )
                }
                Status::Pass(m) if c.name.contains("ram-hostpage") => assert!(
                    m.starts_with("rejected: postcopy paused (error after POSTCOPY_RUN)"),
                    "{}: {m}",
                    c.name
                ),
                Status::Pass(m) => assert!(m.starts_with("rejected: "), "{}: {m}", c.name),
                s => panic!("{}: {s:?}", c.name),
            }
        }
    }
}
