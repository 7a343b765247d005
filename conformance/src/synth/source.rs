//! The source behaviour cases: valid source-side cases (bases `source-precopy` and
//! `source-postcopy`) for the rules only a source's behaviour can break — SM-SWITCHOVER-START,
//! SM-DISCARD-DIRTY and SM-URGENT-FIRST — and the `source_replay` fields they add to their
//! manifests (`switchover_start`, `dirty_pages`, `urgent`). Their invalid side is a broken
//! source ([`super::broken::sources`]); the runner's checks are in
//! [`crate::runner::src_rules`].
//!
//! DISCARD-DIRTY and URGENT-FIRST exist in the 7.2 profile only: they need a source guest RAM
//! of distinct non-zero pages (written through qtest on QEMU), which a QEMU 10.0 source of
//! machine `none` cannot have ([`super::base::source_ram`]).

use serde_json::{json, Value};

use super::base::{self, TPS};
use super::cases::{Base, Case, Class};
use qmig_protocol::rp::RpMessage;

/// Pages of block `ram` the runner writes on the source (DISCARD-DIRTY) after their record
/// arrived and before `migrate-start-postcopy`.
pub const DIRTY_PAGES: [u64; 3] = [2, 3, 5];

/// Pages the URGENT-FIRST case requests after POSTCOPY_RUN, in this order (far from the
/// source's scan position, not in address order).
pub const URGENT_PAGES: [u64; 3] = [200, 120, 160];

/// Page records of pages not requested that may arrive between a request and its page: what a
/// source had already put in its buffers when it read the request (see
/// `conformance/README.md`, SM-URGENT-FIRST).
pub const URGENT_SLACK: u64 = 32;

/// The bytes the runner writes to dirty page `page`: byte `j` is `(29 page + 3 j) mod 253 + 2`,
/// never the page's bytes in [`base::source_ram`] (`(131 page + 7 j) mod 251 + 1`) for the
/// [`DIRTY_PAGES`].
pub fn dirty_page(page: u64) -> Vec<u8> {
    (0..TPS as usize)
        .map(|j| ((29 * page as usize + 3 * j) % 253 + 2) as u8)
        .collect()
}

/// The source's RAM at the end of a DISCARD-DIRTY case: [`base::source_ram`] with the
/// [`DIRTY_PAGES`] rewritten.
pub fn dirty_ram() -> Vec<u8> {
    let mut ram = base::source_ram(false);
    for p in DIRTY_PAGES {
        let o = (p * TPS) as usize;
        ram[o..o + TPS as usize].copy_from_slice(&dirty_page(p));
    }
    ram
}

fn case(rule: &'static str, profile: &'static str, base: Base, description: &'static str) -> Case {
    Case {
        name: String::new(),
        rule,
        class: Class::Valid,
        profile,
        base,
        description,
        patch: |_| None,
        exercises: &[],
    }
}

/// The cases.
pub fn cases() -> Vec<Case> {
    let mut urgent = case(
        "SM-URGENT-FIRST",
        "7.2",
        Base::SrcPostcopy,
        "after POSTCOPY_RUN, requests for pages 200, 120 and 160 (far from the scan position) with the postcopy bandwidth capped: they arrive in request order, each with at most `urgent.slack` records of other pages after its request",
    );
    urgent.patch = |p| {
        for (i, page) in URGENT_PAGES.iter().enumerate() {
            let name = ["req0", "req1", "req2"][i];
            p.push(
                name,
                base::rp(RpMessage::ReqPagesId {
                    start: page * TPS,
                    len: TPS as u32,
                    name: b"ram",
                }),
            );
        }
        None
    };
    urgent.exercises = &["RP-ORDER", "RP-REQ-RANGE"];
    vec![
        case(
            "SM-SWITCHOVER-START",
            "7.2",
            Base::SrcPrecopy,
            "nothing injected: a precopy migration to a 7.2 destination carries no SWITCHOVER_START",
        ),
        case(
            "SM-SWITCHOVER-START",
            "10",
            Base::SrcPrecopy,
            "nothing injected: a precopy migration to a 10.x destination carries SWITCHOVER_START once, after the last RAM PART and before the RAM END",
        ),
        case(
            "SM-DISCARD-DIRTY",
            "7.2",
            Base::SrcPostcopy,
            "pages 2, 3 and 5 written on the source after their records arrived, then migrate-start-postcopy: every page the destination holds undiscarded at POSTCOPY_RUN equals the source's final copy",
        ),
        urgent,
    ]
}

/// Whether `c` is one of [`cases`].
fn is_source_rule(c: &Case) -> bool {
    matches!(c.base, Base::SrcPrecopy | Base::SrcPostcopy)
        && matches!(
            c.rule,
            "SM-SWITCHOVER-START" | "SM-DISCARD-DIRTY" | "SM-URGENT-FIRST"
        )
}

/// Sets the `source_replay` fields of case `c` (nothing for other cases).
pub fn extend(c: &Case, r: &mut Value) {
    if !is_source_rule(c) {
        return;
    }
    r["requested_pages"] = json!([]);
    match c.rule {
        "SM-SWITCHOVER-START" => {
            r["switchover_start"] = json!(u64::from(c.profile == "10"));
        }
        "SM-DISCARD-DIRTY" => {
            r["dirty_pages"] = json!({
                "block": "ram",
                "pages": DIRTY_PAGES,
                "generator": "dirty_page (conformance/src/synth/source.rs)",
                "sha256": crate::qemu::pattern::sha256_hex(&dirty_ram()),
            });
        }
        _ => {
            let pages: Vec<Value> = URGENT_PAGES.iter().map(|p| json!(["ram", p])).collect();
            r["requested_pages"] = json!(pages);
            r["urgent"] = json!({"slack": URGENT_SLACK});
        }
    }
}
