//! The invalid side of the destination behaviour rules that no input can break: a destination
//! that answers every PING, keeps SHUT last or writes its bitmap little-endian does so whatever
//! the source sends. For each such rule a deliberately broken destination
//! ([`crate::runner::replay_dst::Breakage`]: qmig-dst with its return path altered the way the
//! rule forbids) must fail every valid synthetic case it names; `tests/synthetic.rs` runs them,
//! and `index.json` lists them under `broken_targets`.

use crate::runner::replay_dst::Breakage;

/// A broken destination and the valid cases it must fail.
#[derive(Clone, Debug)]
pub struct BrokenTarget {
    /// The behaviour rule the defect breaks.
    pub rule: &'static str,
    /// The `--dst` target: `broken-KIND:qmig`.
    pub target: String,
    /// The valid cases it must fail (a glob over case names).
    pub cases: &'static str,
}

/// The rules and the cases: the bitmap defects fail the valid recovery cases (the only ones
/// with a RECV_BITMAP; the huge-page recoveries, whose cut falls inside a host page, for
/// SM-PARTIAL-HOSTPAGE), the others every valid case (`drop-page` alters the RAM read back,
/// the others the return path).
const TABLE: [(&str, &str, &str); 8] = [
    ("BITMAP-LE", "bitmap-be", "valid-*-recover*"),
    ("BITMAP-MARK", "mark-all", "valid-*-recovery-*"),
    ("SM-PARTIAL-HOSTPAGE", "mark-all", "valid-*-huge-recover-*"),
    ("SM-PONG", "drop-pong", "valid-*"),
    ("SM-SHUT-LAST", "shut-first", "valid-*"),
    ("RP-ATOMIC", "interleave", "valid-*"),
    ("RAM-APPLY", "drop-page", "valid-*"),
    ("SM-RESUME-STATE", "ack-resume", "valid-sm-resume-state-*"),
];

/// Every broken destination with the rule it stands for.
pub fn all() -> Vec<BrokenTarget> {
    TABLE
        .iter()
        .map(|&(rule, kind, cases)| {
            debug_assert!(Breakage::parse(kind).is_some(), "{kind}");
            BrokenTarget {
                rule,
                target: format!("broken-{kind}:qmig"),
                cases,
            }
        })
        .collect()
}

/// The source behaviour rules no return-path input can break: a broken source
/// ([`crate::runner::broken_src::SrcBreakage`]: qmig-src with the stream the checks see
/// altered the way the rule forbids) must fail every valid source-side case it names
/// (`--src broken-KIND:qmig`; `tests/runner_src_rules.rs` runs them).
const SRC_TABLE: [(&str, &str, &str); 3] = [
    (
        "SM-SWITCHOVER-START",
        "switchover-start-72",
        "valid-*-source-*-72",
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

/// Every broken source with the rule it stands for.
pub fn sources() -> Vec<BrokenTarget> {
    SRC_TABLE
        .iter()
        .map(|&(rule, kind, cases)| {
            debug_assert!(
                crate::runner::broken_src::SrcBreakage::parse(kind).is_some(),
                "{kind}"
            );
            BrokenTarget {
                rule,
                target: format!("broken-{kind}:qmig"),
                cases,
            }
        })
        .collect()
}
