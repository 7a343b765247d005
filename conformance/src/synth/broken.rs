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

/// The source behaviour rules no return-path input can break, and the valid source-side
/// cases each broken source must fail: the recovery defects the two recoveries (the only
/// source cases with a RECV_BITMAP and a resend), `switchover-start-72` every 7.2 precopy
/// and postcopy source case, the others the case of their rule. `tests/runner_src_rules.rs`
/// runs each against every valid source-side case: the named ones must fail with the rule
/// in the message, the others pass.
const SRC_TABLE: [(&str, &str, &str); 6] = [
    ("SM-REBUILD", "resend-all", "valid-sm-re*-source-recover-*"),
    ("SM-REBUILD", "skip-clear", "valid-sm-re*-source-recover-*"),
    (
        "SM-RECOVER-BITMAP-ALL",
        "early-page",
        "valid-sm-re*-source-recover-*",
    ),
    (
        "SM-SWITCHOVER-START",
        "switchover-start-72",
        "valid-*-source-p*-72",
    ),
    (
        "SM-DISCARD-DIRTY",
        "no-discard",
        "valid-sm-discard-dirty-source-postcopy-*",
    ),
    (
        "SM-URGENT-FIRST",
        "urgent-late",
        "valid-sm-urgent-first-source-postcopy-*",
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

/// Every broken source ([`all`]'s `--src` entries).
pub fn sources() -> Vec<BrokenTarget> {
    all().into_iter().filter(|b| b.option == "--src").collect()
}
