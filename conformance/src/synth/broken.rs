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

/// Every broken destination, one per [`Breakage`] kind: the bitmap defects fail the valid
/// recovery cases (the only ones with a RECV_BITMAP), the others every valid case.
pub fn all() -> Vec<BrokenTarget> {
    Breakage::ALL
        .iter()
        .map(|&(b, kind, rule)| BrokenTarget {
            rule,
            target: format!("broken-{kind}:qmig"),
            cases: match b {
                Breakage::BitmapBe | Breakage::MarkAll => "valid-*-recovery-*",
                Breakage::DropPong | Breakage::ShutFirst | Breakage::Interleave => "valid-*",
            },
        })
        .collect()
}
