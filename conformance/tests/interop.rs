//! A small, fast set of live interop cells for `cargo test` users; the whole matrix (54 cells)
//! runs as `qmig interop` in `conformance/scripts/test-all.sh` (CI), so it is not repeated here.
//! The cells: both QEMU pairs with `migrate-pause` (10.0 ↔ 10.0, 7.2 ↔ 7.2), qmig-src to a QEMU
//! 10.0 destination with `migrate-pause` (the pause waits for the destination's POSTCOPY_RUN:
//! no retry), QEMU 7.2 to qmig-dst with a cut and recovery, and qmig ↔ qmig precopy. Each cell
//! compares the whole guest RAM of both sides; any failed cell fails the test. Needs QEMU 7.2 and
//! 10.0 (skips without them unless CI/QMIG_REQUIRE_QEMU), and qmig-src/qmig-dst built into the
//! same target directory for the qmig cells.

use qmig_conformance::interop::{run_matrix, unsupported, Impl, Mode};
use qmig_conformance::qemu::{find_qemu, QemuVersion};
use qmig_conformance::runner::report::{CaseResult, Status};
use qmig_conformance::runner::{bin_dir, find_bin};

fn check(r: &[CaseResult]) {
    let failed: Vec<String> = r
        .iter()
        .filter_map(|c| match &c.status {
            Status::Fail(m) => Some(format!("{}: {m}", c.name)),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    for c in r {
        assert!(matches!(c.status, Status::Pass(_)), "{c:#?}");
        eprintln!("{} ({:.1}s)", c.name, c.time.as_secs_f64());
    }
}

fn qemu(v: QemuVersion) -> bool {
    find_qemu(v).unwrap().is_some()
}

fn qmig_built() -> bool {
    let built =
        find_bin("qmig-dst", &bin_dir()).is_some() && find_bin("qmig-src", &bin_dir()).is_some();
    if !built {
        eprintln!("skipping: qmig-src/qmig-dst not built in this target directory");
    }
    built
}

/// Runs the cells whose implementations are here (QEMU versions installed, qmig built).
fn run_cells(cells: &[(Impl, Impl, Mode)]) {
    let here = |i: Impl| match i {
        Impl::Qemu72 => qemu(QemuVersion::V7_2),
        Impl::Qemu100 => qemu(QemuVersion::V10_0),
        Impl::Qmig => qmig_built(),
    };
    let mut r = Vec::new();
    for &(s, d, m) in cells {
        if here(s) && here(d) {
            r.extend(run_matrix(&[s], &[d], &[m], true));
        }
    }
    check(&r);
}

#[test]
fn qemu_pairs_pause_and_recover() {
    run_cells(&[
        (Impl::Qemu100, Impl::Qemu100, Mode::PostcopyPause),
        (Impl::Qemu72, Impl::Qemu72, Mode::PostcopyPause),
    ]);
}

#[test]
fn qmig_with_qemu_and_itself() {
    run_cells(&[
        (Impl::Qmig, Impl::Qmig, Mode::Precopy),
        (Impl::Qmig, Impl::Qemu100, Mode::PostcopyPause),
        (Impl::Qemu72, Impl::Qmig, Mode::PostcopyRecover),
    ]);
}

/// The matrix's unsupported cells and their count (no QEMU needed): 9 of 54. QEMU 10.0 → 7.2
/// `postcopy-pause` runs: it only failed when the pause landed before the destination's RUN.
#[test]
fn unsupported_cells_are_the_documented_nine() {
    let mut n = 0;
    for s in Impl::ALL {
        for d in Impl::ALL {
            for m in Mode::ALL {
                if let Some(why) = unsupported(s, d, m) {
                    assert!(!why.is_empty());
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 9);
    assert!(unsupported(Impl::Qemu72, Impl::Qemu72, Mode::DoubleFailure)
        .is_some_and(|m| m.starts_with("QEMU 7.2 cannot survive")));
    assert!(unsupported(Impl::Qmig, Impl::Qemu100, Mode::PostcopyPause).is_none());
    assert!(unsupported(Impl::Qemu100, Impl::Qemu72, Mode::PostcopyPause).is_none());
}
