//! The invalid side of the destination behaviour rules that no input can break: a destination
//! that answers every PING, keeps SHUT last or writes its bitmap little-endian does so whatever
//! the source sends. For each such rule a deliberately broken destination
//! ([`crate::runner::replay_dst::Breakage`]: qmig-dst with its return path altered the way the
//! rule forbids) must fail every valid synthetic case it names; `tests/synthetic.rs` runs them,
//! and `index.json` lists them under `broken_targets`.
//!
//! Source behaviour rules have the same: a deliberately broken source
//! ([`crate::runner::broken_src::SrcBreakage`]: qmig-src with what it sends altered between it
//! and the runner's checks) must fail the valid source-side cases it names
//! (`tests/runner_src.rs`).

use crate::runner::broken_src::SrcBreakage;
use crate::runner::replay_dst::Breakage;

/// A broken destination and the valid cases it must fail.
#[derive(Clone, Debug)]
pub struct BrokenTarget {
    /// The behaviour rule the defect breaks.
    pub rule: &'static str,
    /// The runner option that selects it: `--dst` or `--src`.
    pub option: &'static str,
    /// The target: `broken-KIND:qmig`.
    pub target: String,
    /// The valid cases it must fail (a glob over case names).
    pub cases: &'static str,
}

/// The rules and the cases: the bitmap defects fail the valid recovery cases (the only ones
/// with a RECV_BITMAP; the huge-page recoveries, whose cut falls inside a host page, for
/// SM-PARTIAL-HOSTPAGE), the others every valid case (`drop-page` alters the RAM read back,
/// the others the return path). The page-request defects fail the cases with guest faults
/// (`replay.faults`, [`super::faults`]): the only ones where a destination requests pages.
const TABLE: [(&str, &str, &str); 11] = [
    ("BITMAP-LE", "bitmap-be", "valid-*-recover*"),
    ("BITMAP-MARK", "mark-all", "valid-*-recovery-*"),
    ("SM-PARTIAL-HOSTPAGE", "mark-all", "valid-*-huge-recover-*"),
    ("SM-PONG", "drop-pong", "valid-*"),
    ("SM-SHUT-LAST", "shut-first", "valid-*"),
    ("RP-ATOMIC", "interleave", "valid-*"),
    ("RAM-APPLY", "drop-page", "valid-*"),
    ("SM-RESUME-STATE", "ack-resume", "valid-sm-resume-state-*"),
    (
        "SM-FIRST-REQ-NAMED",
        "bare-first-req",
        "valid-sm-first-req-named-*",
    ),
    (
        "SM-FIRST-REQ-NAMED",
        "bare-first-req",
        "valid-sm-rerequest-*",
    ),
    ("SM-REREQUEST", "no-rerequest", "valid-sm-rerequest-*"),
];

/// The source rules and the cases: the valid source-side recoveries (the only source cases
/// with a RECV_BITMAP and a resend).
const SRC_TABLE: [(&str, &str, &str); 3] = [
    ("SM-REBUILD", "resend-all", "valid-sm-re*-source-recovery-*"),
    ("SM-REBUILD", "skip-clear", "valid-sm-re*-source-recovery-*"),
    (
        "SM-RECOVER-BITMAP-ALL",
        "early-page",
        "valid-sm-re*-source-recovery-*",
    ),
];

/// Every broken destination and source with the rule it stands for.
pub fn all() -> Vec<BrokenTarget> {
    let entry = |option, (rule, kind, cases): (&'static str, &str, &'static str)| BrokenTarget {
        rule,
        option,
        target: format!("broken-{kind}:qmig"),
        cases,
    };
    TABLE
        .iter()
        .map(|&t| {
            debug_assert!(Breakage::parse(t.1).is_some(), "{}", t.1);
            entry("--dst", t)
        })
        .chain(SRC_TABLE.iter().map(|&t| {
            debug_assert!(SrcBreakage::parse(t.1).is_some(), "{}", t.1);
            entry("--src", t)
        }))
        .collect()
}
