//! A small, fast set of live interop cells for `cargo test` users; the whole matrix (54 cells)
//! runs as `qmig interop` in `conformance/scripts/test-all.sh` (CI), so it is not repeated here.
//! The cells: both QEMU pairs with `migrate-pause` (10.0 ↔ 10.0, 7.2 ↔ 7.2), qmig-src to a QEMU
//! 10.0 destination with `migrate-pause` (the pause waits for the destination's POSTCOPY_RUN:
//! no retry), QEMU 7.2 to qmig-dst with a cut and recovery, QEMU 10.0 (microvm, qtest writes
//! during the migration) to qmig-dst in precopy-dirty, and qmig ↔ qmig precopy. Each cell
//! compares the whole guest RAM of both sides; any failed cell fails the test. Needs QEMU 7.2 and
//! 10.0 (skips without them unless CI/QMIG_REQUIRE_QEMU), and qmig-src/qmig-dst built into the
//! same target directory for the qmig cells.

use qmig_conformance::interop::cell::guest;
use qmig_conformance::interop::{run_matrix, unsupported, Impl, Mode};
use qmig_conformance::qemu::{find_qemu, Machine, QemuVersion};
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
        (Impl::Qemu100, Impl::Qmig, Mode::PrecopyDirty),
    ]);
}

/// The matrix's unsupported cells and their count (no QEMU needed): 5 of 54, the double
/// failures with a QEMU 7.2 side. Every other cell runs, precopy-dirty included.
#[test]
fn unsupported_cells_are_the_documented_five() {
    let mut cells = Vec::new();
    for s in Impl::ALL {
        for d in Impl::ALL {
            for m in Mode::ALL {
                if let Some(why) = unsupported(s, d, m) {
                    assert!(why.starts_with("QEMU 7.2 cannot survive"), "{why}");
                    cells.push((s, d, m));
                }
            }
        }
    }
    assert_eq!(
        cells,
        [
            (Impl::Qemu72, Impl::Qemu72, Mode::DoubleFailure),
            (Impl::Qemu72, Impl::Qemu100, Mode::DoubleFailure),
            (Impl::Qemu72, Impl::Qmig, Mode::DoubleFailure),
            (Impl::Qemu100, Impl::Qemu72, Mode::DoubleFailure),
            (Impl::Qmig, Impl::Qemu72, Mode::DoubleFailure),
        ]
    );
}

/// Every QEMU source runs a guest qtest can write (7.2: `-M none` with a CPU; 10.0: microvm),
/// whatever the destination; a qmig source `-M none` without CPU.
#[test]
fn qemu_sources_run_writable_guests() {
    for d in Impl::ALL {
        for m in Mode::ALL {
            assert_eq!(guest(Impl::Qemu72, d, m).machine, Machine::NoneCpu);
            assert_eq!(guest(Impl::Qemu100, d, m).machine, Machine::Microvm);
            assert_eq!(guest(Impl::Qmig, d, m).machine, Machine::NoneNoCpu);
            for s in [Impl::Qemu72, Impl::Qemu100] {
                assert!(guest(s, d, m).machine.has_qtest());
            }
        }
    }
}
