//! Smoke test of `qmig bench`: a 64 MiB run of the ideal pipeline and QEMU 7.2 pairs, one
//! repetition, precopy only, checked for a well-formed report (never for timings). QEMU cases
//! are reported as not run when QEMU 7.2 is not installed (unless CI/QMIG_REQUIRE_QEMU).

use std::process::Command;

use qmig_conformance::bench::report::{BEGIN, END};
use qmig_conformance::qemu::{find_qemu, QemuVersion};
use serde_json::Value;

#[test]
fn bench_writes_a_well_formed_report() {
    let dir = std::env::temp_dir().join(format!("qmig-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let md = dir.join("BENCHMARKS.md");
    std::fs::write(&md, "# Benchmarks\n\n## Memory\n\nkept\n").unwrap();
    let json = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qmig"))
        .args([
            "bench",
            "--size",
            "64M",
            "--reps",
            "1",
            "--cases",
            "ideal,qemu",
        ])
        .args(["--modes", "precopy", "--contents", "random,zero"])
        .arg("--write")
        .arg(&md)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qmig bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(BEGIN) && stdout.contains(END));

    // The file keeps what was there and gains exactly one generated section.
    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.starts_with("# Benchmarks\n\n## Memory\n\nkept\n"));
    assert_eq!(text.matches(BEGIN).count(), 1);
    assert_eq!(text.matches(END).count(), 1);
    for heading in [
        "### Migration time",
        "### CPU seconds per GiB",
        "### Targets",
    ] {
        assert!(text.contains(heading), "missing {heading}");
    }
    assert!(text.contains("| random | precopy |"));
    assert!(text.contains("| zero | precopy |"));

    // JSON: one sample per run case, with positive times.
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["size"], 64 << 20);
    let cases = v["cases"].as_object().unwrap();
    let mut expected = vec!["migrate/ideal/random/precopy", "migrate/ideal/zero/precopy"];
    if find_qemu(QemuVersion::V7_2).unwrap().is_some() {
        expected.extend(["migrate/qemu/random/precopy", "migrate/qemu/zero/precopy"]);
    } else {
        assert!(v["failures"]["migrate/qemu/random/precopy"].is_string());
    }
    for k in expected {
        let s = cases
            .get(k)
            .unwrap_or_else(|| panic!("no samples for {k}: {v}"));
        assert_eq!(s.as_array().unwrap().len(), 1, "{k}");
        assert!(s[0]["seconds"].as_f64().unwrap() > 0.0, "{k}");
        assert!(s[0]["src_cpu"].as_f64().unwrap() >= 0.0, "{k}");
    }
    assert!(!v["targets"].as_array().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
