//! The synthetic cases with guest faults: the destination rules a replay can only judge when a
//! guest access waits for a page (SM-FIRST-REQ-NAMED, SM-REREQUEST). The stream is the
//! [`base::postcopy`] channel, in which page [`X_PAGE`] (non-zero, discarded before RUN) is not
//! sent before POSTCOPY_RUN; the manifest's `replay.faults` tells the runner where to stop
//! writing, which page a guest access must touch (the target's trigger: `x-qmig-probe-read`),
//! and which page request the destination must then write (`runner::replay_faults` plays it).
//!
//! * `valid-sm-first-req-named-postcopy-*`: the whole postcopy stream; the access to page 2 comes
//!   once RUN took effect, before page 2 is written: the first request of the connection must
//!   be REQ_PAGES_ID(`ram`, page 2, one page).
//! * `valid-sm-rerequest-fault-recover-*` ([`recovery_main`], [`recovery_channel`]): the same
//!   request, then the main channel is cut before page 2 was sent (the access still waits);
//!   the recovery channel carries RECV_BITMAP, POSTCOPY_RESUME, then pages 2 and 3. Once the
//!   destination wrote RESUME_ACK, a second access (page 3, a new fault) is made: the first
//!   request after RESUME_ACK must be page 2 again, naming `ram` (before page 3's).

use serde_json::{json, Value};

use super::base::{self, named, word, TPS};
use super::build::{cat, Parts};
use super::cases::{Base, Case, Class};
use super::recovery;
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;

/// The page the first guest access waits for (page 2 of `ram`: discarded by RAM_DISCARD,
/// sent after POSTCOPY_RUN, non-zero).
pub const X_PAGE: u64 = 2;
/// The page of the second access in the rerequest case (page 3, discarded, sent after it).
pub const Y_PAGE: u64 = 3;
/// The part of the postcopy base before which the runner stops writing and makes the access:
/// everything up to PING(4) after the package is written (RUN included), pages 2 and 3 not.
pub const STOP_AT: &str = "pc_part_hdr";

/// The CPU a fault case's machine has (`machine.cpu`, QEMU's `{CPU}`): QEMU's qtest memory
/// accesses, the guest-access trigger on QEMU, need one (machine `none`, both profiles).
pub const QEMU_CPU: &str = "qemu64,apic-id=0";

/// Whether case `c` is a fault case (its manifest gets `replay.faults`).
pub fn is_fault_case(c: &Case) -> bool {
    c.class == Class::Valid && matches!(c.rule, "SM-FIRST-REQ-NAMED" | "SM-REREQUEST")
}

/// The main channel of the rerequest case: [`base::postcopy`] up to (not including)
/// [`STOP_AT`], where it is cut (the destination must pause with the access to page 2
/// waiting).
pub fn recovery_main(ten: bool) -> Parts {
    let mut p = base::postcopy(ten);
    p.truncate_at(STOP_AT);
    p
}

/// The recovery channel of the rerequest case: RECV_BITMAP(`ram`), POSTCOPY_RESUME, `ram` PART
/// (page 2 as PAGE naming `ram`, page 3 as ZERO|CONTINUE, EOS), END, EOF.
pub fn recovery_channel() -> Parts {
    recovery::channel_with(|p| {
        p.push(
            "page2",
            cat(&[&named(X_PAGE * TPS, RamFlags::PAGE, "ram"), &base::page2()]),
        );
        p.push(
            "zero3",
            cat(&[
                &word(Y_PAGE * TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)),
                &[0],
            ]),
        );
    })
}

/// The received bitmap of `ram` at the cut of [`recovery_main`]: pages 0, 1 and 4 (pages 2 and
/// 3 were discarded and never sent).
pub fn received_at_cut() -> PageBitmap {
    let mut bm = PageBitmap::new(base::RAM_BYTES / TPS);
    for pg in [0, 1, 4] {
        bm.set(pg);
    }
    bm
}

/// The return path a destination writes on [`recovery_channel`] (page requests aside, which
/// the runner checks as they come): RECV_BITMAP(`ram`, [`received_at_cut`]), RESUME_ACK(1),
/// SHUT(0).
pub fn recovery_rp() -> Vec<u8> {
    recovery::rp_for(&received_at_cut())
}

/// One page request as the runner expects it (`start`/`len` in bytes of block `block`).
fn request(page: u64) -> Value {
    json!({"block": "ram", "start": page * TPS, "len": TPS})
}

/// The `replay.faults` list of fault case `c` (see `conformance/README.md`, "Fault cases"):
/// per access, the channel (its `label` in `replay.channels`), the offset in that channel's
/// bytes at which the runner stops writing, when it makes the access (`after`: `run`, once the
/// target ran POSTCOPY_RUN; `resume-ack`, once it read RESUME_ACK on that connection), the
/// page, and what the destination must write next (`expect`).
pub fn faults(c: &Case, ten: bool) -> Value {
    let stop = base::postcopy(ten).offset_of(STOP_AT);
    let first = |channel: &str| {
        json!({"channel": channel, "at": stop, "after": "run", "block": "ram", "page": X_PAGE,
               "expect": {"first_request": request(X_PAGE)}})
    };
    if c.base == Base::FaultRecover {
        json!([first("initial"), {
            "channel": "recovery",
            "at": recovery_channel().offset_of("part_hdr"),
            "after": "resume-ack",
            "block": "ram",
            "page": Y_PAGE,
            "expect": {"rerequest_first": request(X_PAGE)},
        }])
    } else {
        json!([first("main")])
    }
}
