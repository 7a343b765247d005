//! `qmig interop`: the live interop matrix.
//!
//! Every cell is one real migration between two running implementations — QEMU 7.2, QEMU 10.0
//! or qmig (`qmig-src` / `qmig-dst`) — in one mode, judged by comparing the whole guest RAM of
//! both sides (`pmemsave` over QMP) after `completed`. Modes: `precopy`, `precopy-dirty` (the
//! source guest keeps writing), `postcopy`, `postcopy-recover` (the recording proxy cuts the
//! link mid-postcopy; recovery on a new port), `postcopy-pause` (`migrate-pause` on the
//! source), `double-failure` (a second cut during the recovery, then recovery again).
//! Combinations QEMU itself cannot do are reported as unsupported with the reason
//! ([`unsupported`]: a double failure with QEMU 7.2).
//!
//! | module | owns |
//! |---|---|
//! | [`side`] | one running endpoint (QEMU or qmig) and its QMP |
//! | [`cell`] | running one cell: set-up, migration, failures, recovery, RAM comparison |
//! | this file | the matrix, its arguments, `unsupported` reasons and the table |

pub mod cell;
pub mod side;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::runner::report::{self, CaseResult, Status};

/// An implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Impl {
    /// QEMU 7.2.
    #[value(name = "qemu-7.2")]
    Qemu72,
    /// QEMU 10.0.
    #[value(name = "qemu-10.0")]
    Qemu100,
    /// qmig-src / qmig-dst.
    #[value(name = "qmig")]
    Qmig,
}

impl Impl {
    /// Name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Qemu72 => "qemu-7.2",
            Impl::Qemu100 => "qemu-10.0",
            Impl::Qmig => "qmig",
        }
    }
    /// Every implementation.
    pub const ALL: [Impl; 3] = [Impl::Qemu72, Impl::Qemu100, Impl::Qmig];
}

/// A mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Precopy with the return path.
    #[value(name = "precopy")]
    Precopy,
    /// Precopy while the source guest keeps writing.
    #[value(name = "precopy-dirty")]
    PrecopyDirty,
    /// Postcopy, no failure.
    #[value(name = "postcopy")]
    Postcopy,
    /// Postcopy, the proxy cuts the link, recovery on a new port.
    #[value(name = "postcopy-recover")]
    PostcopyRecover,
    /// Postcopy, `migrate-pause` on the source, recovery.
    #[value(name = "postcopy-pause")]
    PostcopyPause,
    /// Postcopy, cut, a second cut during the recovery, recovery again.
    #[value(name = "double-failure")]
    DoubleFailure,
}

impl Mode {
    /// Name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::PrecopyDirty => "precopy-dirty",
            Mode::Postcopy => "postcopy",
            Mode::PostcopyRecover => "postcopy-recover",
            Mode::PostcopyPause => "postcopy-pause",
            Mode::DoubleFailure => "double-failure",
        }
    }
    /// Every mode.
    pub const ALL: [Mode; 6] = [
        Mode::Precopy,
        Mode::PrecopyDirty,
        Mode::Postcopy,
        Mode::PostcopyRecover,
        Mode::PostcopyPause,
        Mode::DoubleFailure,
    ];
}

/// Arguments of `qmig interop`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Source implementation (repeatable; default all).
    #[arg(long = "src", value_enum)]
    pub src: Vec<Impl>,
    /// Destination implementation (repeatable; default all).
    #[arg(long = "dst", value_enum)]
    pub dst: Vec<Impl>,
    /// Mode (repeatable; default all).
    #[arg(long = "mode", value_enum)]
    pub mode: Vec<Mode>,
    /// Write JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write JSON results here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Why QEMU itself cannot run a cell (`None`: it can).
///
/// Only a second failure during `postcopy-recover` with a QEMU 7.2 side: the 7.2 source waits
/// for each block's RECV_BITMAP (and for RESUME_ACK) on a semaphore that only a received
/// message posts, while its return-path thread parks itself on the error, so it stays in
/// `postcopy-recover` for good; the 7.2 destination moves to `postcopy-paused` only from
/// `postcopy-active`, so from `postcopy-recover` it never pauses again (QEMU 7.2 has no
/// `postcopy-recover-setup`). The README's interop section gives the evidence.
pub fn unsupported(src: Impl, dst: Impl, mode: Mode) -> Option<&'static str> {
    if mode == Mode::DoubleFailure && (src == Impl::Qemu72 || dst == Impl::Qemu72) {
        return Some("QEMU 7.2 cannot survive a failure during postcopy-recover: as the source it waits for RECV_BITMAP / RESUME_ACK on a semaphore no error posts and stays in postcopy-recover; as the destination it pauses only from postcopy-active (no postcopy-recover-setup state)");
    }
    None
}

/// Name of a cell.
pub fn cell_name(src: Impl, dst: Impl, mode: Mode) -> String {
    format!("interop/{}->{}/{}", src.name(), dst.name(), mode.name())
}

/// Runs the selected cells; prints a line per cell when `print`.
pub fn run_matrix(srcs: &[Impl], dsts: &[Impl], modes: &[Mode], print: bool) -> Vec<CaseResult> {
    let mut out = Vec::new();
    for &s in srcs {
        for &d in dsts {
            for &m in modes {
                let name = cell_name(s, d, m);
                let t0 = Instant::now();
                let status = match unsupported(s, d, m) {
                    Some(why) => Status::Skip(format!("unsupported: {why}")),
                    None => match cell::run(s, d, m) {
                        Ok(detail) => Status::Pass(detail),
                        Err(cell::CellError::Skip(why)) => Status::Skip(why),
                        Err(cell::CellError::Fail(e)) => Status::Fail(e),
                    },
                };
                let r = CaseResult {
                    name,
                    status,
                    time: t0.elapsed(),
                };
                if print {
                    println!("{}", report::line(&r));
                }
                out.push(r);
            }
        }
    }
    out
}

/// The matrix as a markdown table: one row per (source, destination), one column per mode,
/// each cell `pass 3.1s`, `FAIL 2.0s`, or `n/a` (unsupported).
pub fn table(results: &[CaseResult], srcs: &[Impl], dsts: &[Impl], modes: &[Mode]) -> String {
    let mut t = String::from("| source → destination |");
    for m in modes {
        let _ = write!(t, " {} |", m.name());
    }
    t.push_str("\n|---|");
    for _ in modes {
        t.push_str("---|");
    }
    t.push('\n');
    for &s in srcs {
        for &d in dsts {
            let _ = write!(t, "| {} → {} |", s.name(), d.name());
            for &m in modes {
                let name = cell_name(s, d, m);
                let cell = match results.iter().find(|r| r.name == name) {
                    None => "".to_string(),
                    Some(r) => match &r.status {
                        Status::Pass(_) => format!("pass {:.1}s", r.time.as_secs_f64()),
                        Status::Fail(_) => format!("FAIL {:.1}s", r.time.as_secs_f64()),
                        Status::Skip(m) if m.starts_with("unsupported") => "n/a".to_string(),
                        Status::Skip(_) => "skip".to_string(),
                    },
                };
                let _ = write!(t, " {cell} |");
            }
            t.push('\n');
        }
    }
    t
}

/// `qmig interop`.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    let pick = |v: &Vec<Impl>| {
        if v.is_empty() {
            Impl::ALL.to_vec()
        } else {
            v.clone()
        }
    };
    let (srcs, dsts) = (pick(&a.src), pick(&a.dst));
    let modes = if a.mode.is_empty() {
        Mode::ALL.to_vec()
    } else {
        a.mode.clone()
    };
    let results = run_matrix(&srcs, &dsts, &modes, true);
    println!();
    print!("{}", table(&results, &srcs, &dsts, &modes));
    for r in &results {
        if let Status::Skip(m) = &r.status {
            println!("{}: {m}", r.name);
        }
    }
    if let Some(p) = &a.junit {
        std::fs::write(p, report::junit("qmig-interop", &results))?;
    }
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&report::json("qmig-interop", &results))?,
        )?;
    }
    println!("{}", report::summary(&results));
    Ok(if results.iter().any(CaseResult::failed) {
        1
    } else {
        0
    })
}
