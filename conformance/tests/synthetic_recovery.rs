//! The synthetic postcopy recovery cases (`*-recovery-*`): their exact bytes, their decode
//! check, and their replay against qmig-dst, a deliberately broken qmig-dst (big-endian bitmap
//! words), and QEMU 7.2 / 10.0 when installed (the QEMU replays print a skip note and pass
//! without it). The replays use the `qmig-dst` next to the test binary: build it first
//! (`cargo build -p qmig-dst -p qmig-conformance --bins`).

use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::{self, report::Status, Options};

mod synth_util;
use synth_util::{decode, dir, hex, read, run, status};

const VALID: [&str; 2] = [
    "valid-cmd-recv-bitmap-len-recovery-72",
    "valid-sm-recover-no-header-recovery-10",
];
/// Valid, with the first recovery channel lost after RECV_BITMAP (SM-PAUSE-IN-RECOVER).
const LOST: [&str; 2] = [
    "valid-sm-pause-in-recover-recovery-72",
    "valid-sm-pause-in-recover-recovery-10",
];
const INVALID: [(&str, &str); 7] = [
    (
        "invalid-cmd-recv-bitmap-len-recovery-72",
        "offset 3: CMD-RECV-BITMAP-LEN:",
    ),
    (
        "invalid-cmd-recv-bitmap-len-recovery-10",
        "offset 3: CMD-RECV-BITMAP-LEN:",
    ),
    (
        "invalid-cmd-block-unknown-recovery-10",
        "offset 5: CMD-BLOCK-UNKNOWN:",
    ),
    // After POSTCOPY_RESUME: RECV_BITMAP (9) + POSTCOPY_RESUME (5) + PART header (5).
    ("invalid-ram-offset-recovery-72", "offset 19: RAM-OFFSET:"),
    ("invalid-ram-offset-recovery-10", "offset 19: RAM-OFFSET:"),
    // The QEVM header where RECV_BITMAP must come first.
    (
        "invalid-sm-recover-no-header-recovery-72",
        "offset 0: SM-RECOVER-NO-HEADER:",
    ),
    (
        "invalid-sm-recover-no-header-recovery-10",
        "offset 0: SM-RECOVER-NO-HEADER:",
    ),
];

/// The valid recovery channel and the return path a destination must write on it, byte for
/// byte: RECV_BITMAP(`ram`), POSTCOPY_RESUME, PART with page 3 as ZERO naming `ram`, EOS,
/// footer, END, EOS, footer, EOF; RECV_BITMAP(`ram`, 32 bytes: pages 0, 1, 2, 4 = 0x17, end
/// mark), RESUME_ACK(1), SHUT(0). The main channel is cut 4 bytes into page 3's record.
#[test]
fn recovery_channels_and_return_paths_are_exact() {
    let channel = "08000a00040372616d\
                   0800090000\
                   0200000002\
                   00000000000030020372616d00\
                   0000000000000010\
                   7e00000002\
                   0300000002\
                   0000000000000010\
                   7e00000002\
                   00";
    let rp = format!(
        "000500040372616d{}17{}0123456789abcdef\
         0006000400000001\
         0001000400000000",
        "0000000000000020",
        "00".repeat(31)
    );
    for case in VALID {
        assert_eq!(hex(&read(case, "resume-stream.bin")), channel, "{case}");
        assert_eq!(hex(&read(case, "resume-rp.bin")), rp, "{case}");
        let main = read(case, "stream.bin");
        assert_eq!(
            &main[main.len() - 4..],
            &[0, 0, 0, 0],
            "{case}: cut inside page 3's word"
        );
        assert_eq!(
            hex(&read(case, "rp.bin")),
            "00020004000000010002000400000002\
             00020004000000030002000400000004",
            "{case}: PONG 1-4, no SHUT"
        );
    }
    for (case, _) in INVALID {
        assert_eq!(hex(&read(case, "resume2-stream.bin")), channel, "{case}");
        assert_eq!(hex(&read(case, "resume2-rp.bin")), rp, "{case}");
        assert!(!dir().join(case).join("resume-rp.bin").exists(), "{case}");
    }
    assert!(
        hex(&read(INVALID[0].0, "resume-stream.bin")).starts_with("08000a00050372616d000800090000")
    );
    assert!(
        hex(&read(INVALID[2].0, "resume-stream.bin")).starts_with("08000a000403726f6d0800090000")
    );
    assert!(hex(&read(INVALID[3].0, "resume-stream.bin")).contains("00000000001000020372616d00"));
}

#[test]
fn recovery_cases_pass_their_decode_check() {
    let r = decode("decode/synthetic/*-recovery-*");
    assert_eq!(r.len(), 13, "{r:#?}");
    assert_eq!(
        status(&r, "decode/synthetic/valid-sm-pause-in-recover-recovery-10"),
        &Status::Pass(
            "recovery: lost in postcopy-recover after 9 bytes, then postcopy-paused; \
             3 channels: completed, return paths and final RAM as expected"
                .into()
        )
    );
    assert_eq!(
        status(&r, "decode/synthetic/invalid-cmd-recv-bitmap-len-recovery-72"),
        &Status::Pass(
            "recovery: rejected as expected: CMD-RECV-BITMAP-LEN at offset 3, then postcopy-paused; \
             3 channels: completed, return paths and final RAM as expected"
                .into()
        )
    );
    assert_eq!(
        status(&r, "decode/synthetic/valid-cmd-recv-bitmap-len-recovery-72"),
        &Status::Pass("2 channels: completed, return paths and final RAM as expected".into())
    );
}

/// qmig-dst: the valid cases complete with the exact bitmap; an invalid recovery channel is
/// rejected with its rule and offset in `error-desc`, back to `postcopy-paused`, and the second
/// recovery completes with the final RAM equal.
#[test]
fn recovery_cases_against_qmig_dst() {
    let r = run("qmig", "replay-dst[qmig]/synthetic/*-recovery-*");
    assert_eq!(r.len(), 13, "{r:#?}");
    // RECV_BITMAP(ram) answered on the lost channel, exactly: 9 bytes in, 56 out.
    for case in LOST {
        match status(&r, &format!("replay-dst[qmig]/synthetic/{case}")) {
            Status::Pass(m) => assert!(
                m.starts_with("3 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal; recovery: lost in postcopy-recover after 9 bytes, back to postcopy-paused (56 return-path bytes as expected)"),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    for case in VALID {
        match status(&r, &format!("replay-dst[qmig]/synthetic/{case}")) {
            Status::Pass(m) => assert!(
                m.starts_with("2 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal"),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    for (case, desc) in INVALID {
        match status(&r, &format!("replay-dst[qmig]/synthetic/{case}")) {
            Status::Pass(m) => assert!(
                m.starts_with("3 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal; recovery: rejected, back to postcopy-paused, error-desc `")
                    && m.contains(desc),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
    // Cut by silence: qmig-dst's 1 s bound gives the channel up (SM-TIMEOUT), then recovers.
    for p in ["72", "10"] {
        let case = format!("replay-dst[qmig]/synthetic/valid-sm-timeout-recovery-{p}");
        match status(&r, &case) {
            Status::Pass(m) => assert!(
                m.starts_with("2 channel(s) replayed, return path per rule, completed, final RAM (1 MiB) equal; main channel: silent, given up: `channel lost: SM-TIMEOUT: "),
                "{case}: {m}"
            ),
            s => panic!("{case}: {s:?}"),
        }
    }
}

/// The suite's self-test: a destination writing big-endian bitmap words fails every recovery
/// case at the RECV_BITMAP it writes (the invalid ones at their second recovery).
#[test]
fn broken_bitmap_be_fails_every_recovery_case() {
    let r = run(
        "broken-bitmap-be:qmig",
        "replay-dst[broken-bitmap-be:qmig]/synthetic/*-recovery-*",
    );
    assert_eq!(r.len(), 13, "{r:#?}");
    for c in &r {
        match &c.status {
            // A lost first recovery channel is compared byte for byte.
            Status::Fail(m) if LOST.iter().any(|l| c.name.ends_with(l)) => assert!(
                m.starts_with("recovery: return path differs"),
                "{}: {m}",
                c.name
            ),
            Status::Fail(m) => assert!(
                m.contains("recovery return path: RECV_BITMAP #0 differs from byte "),
                "{}: {m}",
                c.name
            ),
            s => panic!("{}: the broken bitmap passed: {s:?}", c.name),
        }
    }
}

/// QEMU 10.0 passes every recovery case (it returns to postcopy-paused after a bad recovery
/// channel and recovers again); QEMU 7.2 passes the valid one and RAM-OFFSET (a violation
/// after POSTCOPY_RESUME, in postcopy-active), the one before POSTCOPY_RESUME is skipped (spec
/// deviations D-1: it cannot leave postcopy-recover).
#[test]
fn recovery_cases_against_qemu() {
    if find_qemu(QemuVersion::V10_0).unwrap().is_some() {
        let r = run("qemu", "replay-dst[qemu]/synthetic/*-recovery-10*");
        assert_eq!(r.len(), 7, "{r:#?}");
        for c in &r {
            assert!(
                matches!(&c.status, Status::Pass(_))
                    || (c.name.contains("/valid-sm-timeout-")
                        && matches!(&c.status, Status::Skip(m) if m.starts_with("unsupported: the target takes no silence bound"))),
                "{}: {:?}",
                c.name,
                c.status
            );
        }
    } else {
        eprintln!("QEMU 10.0 not installed: recovery replays against it not run");
    }
    if find_qemu(QemuVersion::V7_2).unwrap().is_some() {
        let r = run("qemu", "replay-dst[qemu]/synthetic/*-recovery-72*");
        assert_eq!(r.len(), 6, "{r:#?}");
        // QEMU has no silence bound (spec deviations D-12): SM-TIMEOUT is optional.
        assert!(matches!(
            status(&r, "replay-dst[qemu]/synthetic/valid-sm-timeout-recovery-72"),
            Status::Skip(m) if m.starts_with("unsupported: the target takes no silence bound")
        ));
        assert!(matches!(
            status(&r, "replay-dst[qemu]/synthetic/valid-sm-pause-in-recover-recovery-72"),
            Status::Skip(m) if m.contains("D-1")
        ));
        // A violation after POSTCOPY_RESUME comes in postcopy-active, from which 7.2 pauses.
        assert!(matches!(
            status(&r, "replay-dst[qemu]/synthetic/invalid-ram-offset-recovery-72"),
            Status::Pass(m) if m.contains("recovery: rejected, back to postcopy-paused")
        ));
        assert!(matches!(
            status(
                &r,
                "replay-dst[qemu]/synthetic/valid-cmd-recv-bitmap-len-recovery-72"
            ),
            Status::Pass(_)
        ));
        assert!(matches!(
            status(&r, "replay-dst[qemu]/synthetic/invalid-cmd-recv-bitmap-len-recovery-72"),
            Status::Skip(m) if m.contains("D-1")
        ));
        assert!(matches!(
            status(&r, "replay-dst[qemu]/synthetic/invalid-sm-recover-no-header-recovery-72"),
            Status::Skip(m) if m.contains("D-1")
        ));
    } else {
        eprintln!("QEMU 7.2 not installed: recovery replays against it not run");
    }
}

/// The runner fails a destination that takes an invalid recovery channel as a good one: a copy
/// of an invalid case whose "invalid" channel is in fact the valid recovery makes qmig-dst
/// complete there, and the case fails at once, naming the status (no waiting for a pause).
#[test]
fn a_destination_completing_on_the_invalid_channel_fails_the_case() {
    let case = "invalid-cmd-recv-bitmap-len-recovery-72";
    let tmp = std::env::temp_dir().join(format!("qmig-recovery-accept-{}", std::process::id()));
    let dst = tmp.join(case);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(dir().join(case)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        dst.join("resume2-stream.bin"),
        dst.join("resume-stream.bin"),
    )
    .unwrap();
    let r = runner::run_suite(&Options {
        vectors: vec![tmp.clone()],
        dst: vec!["qmig".into()],
        src: vec![],
        skips: vec![],
        filter: Some("replay-dst[qmig]/*".into()),
        print: true,
    })
    .unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert_eq!(r.len(), 1, "{r:#?}");
    match &r[0].status {
        Status::Fail(m) => assert!(
            m.starts_with(
                "recovery: invalid recovery channel: the target ended in completed, not postcopy-paused"
            ),
            "{m}"
        ),
        s => panic!("an accepted invalid channel passed: {s:?}"),
    }
}
