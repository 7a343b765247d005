//! The device-payload cases: the precopy base with a `timer` FULL section (QEMU's
//! `vmstate_timers`, version 2: `cpu_ticks_offset` int64, 8 unused bytes, `cpu_clock_offset`
//! int64) whose payload a destination decodes by the VM description the stream ends with
//! ([`VMDESC_JSON`]), optionally followed by its subsection `timer/icount` (version 1:
//! `qemu_icount_bias`, `qemu_icount`, both int64). Every QEMU machine registers `timer`, so
//! QEMU destinations judge these payloads with their own layout, qmig-dst and the decode
//! check with the description.
//!
//! Also the flawed descriptions ([`Class::Acceptable`]): a VM description after EOF that is
//! not JSON of the documented shape (VMDESC-JSON) or nests deeper than 32 levels
//! (DEV-NESTING). A verifier must report them; a destination, which does not read what
//! follows EOF (QEMU never does), may complete the migration.

use super::base::{footer, sec_start, vmdesc_of};
use super::build::{be32, cat, Parts};
use super::cases::{Base, Case, Class};

/// Section id of `timer` (QEMU gives it 0: it registers first).
pub const TIMER_ID: u32 = 0;

/// The VM description of the device cases: `timer` with its `timer/icount` subsection, then
/// `globalstate` as in [`super::base::VMDESC_JSON`].
pub const VMDESC_JSON: &[u8] = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,"fields":[{"name":"cpu_ticks_offset","type":"int64","size":8},{"name":"unused","type":"unused_buffer","size":8},{"name":"cpu_clock_offset","type":"int64","size":8}],"subsections":[{"vmsd_name":"timer/icount","version":1,"fields":[{"name":"qemu_icount_bias","type":"int64","size":8},{"name":"qemu_icount","type":"int64","size":8}]}]},{"name":"globalstate","instance_id":0,"vmsd_name":"globalstate","version":1,"fields":[{"name":"size","type":"uint32","size":4},{"name":"runstate","type":"buffer","size":100}]}]}"#;

/// Bytes of the `timer` fields.
const FIELDS: usize = 24;

/// A subsection header: `0x05`, counted name, be32 version.
fn subsection(name: &str, version: u32) -> Vec<u8> {
    cat(&[&[0x05, name.len() as u8], name.as_bytes(), &be32(version)])
}

/// `timer/icount` version `version` with zero counters.
fn icount(version: u32) -> Vec<u8> {
    cat(&[&subsection("timer/icount", version), &[0u8; 16]])
}

/// Adds `timer` FULL (zero fields, then `tail`) before `globalstate` and describes it.
fn with_timer(p: &mut Parts, tail: Vec<u8>) {
    p.insert_before("gs_hdr", "timer_hdr", sec_start(0x04, TIMER_ID, "timer", 2));
    p.insert_before("gs_hdr", "timer_fields", vec![0u8; FIELDS]);
    p.insert_before("gs_hdr", "timer_tail", tail);
    p.insert_before("gs_hdr", "timer_footer", footer(TIMER_ID));
    p.set("vmdesc", vmdesc_of(VMDESC_JSON));
}

/// Whether case `c` is judged by a destination that decodes device payloads by the VM
/// description (checker `destination-described`): the payload cases. A destination without one
/// (the runner's played destination) delimits by the footer scan and cannot see them.
pub fn described(c: &Case) -> bool {
    c.class != Class::Acceptable && matches!(c.rule, "DEV-SCHEMA" | "DEV-SUBSECTION")
}

fn case(
    class: Class,
    rule: &'static str,
    profile: &'static str,
    description: &'static str,
    patch: fn(&mut Parts) -> Option<u64>,
    exercises: &'static [&'static str],
) -> Case {
    Case {
        name: String::new(),
        rule,
        class,
        profile,
        base: Base::Precopy,
        description,
        patch,
        exercises,
    }
}

/// [`super::base::VMDESC_JSON`] with a struct field nested `levels` deep added to `globalstate`
/// (a description whose depth is `levels`).
fn nested_vmdesc(levels: usize) -> Vec<u8> {
    let mut field = String::from(r#"{"name":"b","type":"uint8","size":1}"#);
    for _ in 0..levels {
        field = format!(
            r#"{{"name":"s","type":"struct","size":1,"struct":{{"vmsd_name":"s","version":1,"fields":[{field}]}}}}"#
        );
    }
    let base = std::str::from_utf8(super::base::VMDESC_JSON).expect("ASCII");
    let with = base.replacen(
        r#"{"name":"runstate","type":"buffer","size":100}"#,
        &format!(r#"{{"name":"runstate","type":"buffer","size":100}},{field}"#),
        1,
    );
    assert_ne!(with, base, "globalstate's last field is runstate");
    with.into_bytes()
}

/// The device cases, for both profiles.
pub fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for profile in ["7.2", "10"] {
        v.push(case(
            Class::Valid,
            "DEV-SUBSECTION",
            profile,
            "`timer` FULL with its 24 bytes of fields and the subsection `timer/icount` version 1, both in the VM description",
            |p| {
                with_timer(p, icount(1));
                None
            },
            &["DEV-SCHEMA", "DEV-NESTING"],
        ));
        v.push(case(
            Class::Acceptable,
            "VMDESC-JSON",
            profile,
            "the VM description after EOF is JSON that ends early (`{\"page_size\":4096,\"devices\":[`): a verifier reports it at its first byte, a destination may complete",
            |p| {
                p.set("vmdesc", vmdesc_of(br#"{"page_size":4096,"devices":["#));
                Some(p.offset_of("vmdesc") + 5)
            },
            &[],
        ));
        v.push(case(
            Class::Acceptable,
            "DEV-NESTING",
            profile,
            "the VM description after EOF describes globalstate with a struct nested 33 levels (the cap is 32): a verifier reports it at the description's first byte, a destination may complete",
            |p| {
                p.set("vmdesc", vmdesc_of(&nested_vmdesc(33)));
                Some(p.offset_of("vmdesc") + 5)
            },
            &[],
        ));
        v.push(case(
            Class::Invalid,
            "DEV-SCHEMA",
            profile,
            "`timer` FULL with one byte (0x33) after its described fields, before the footer",
            |p| {
                with_timer(p, vec![0x33]);
                Some(p.offset_of("timer_tail"))
            },
            &[],
        ));
        v.push(case(
            Class::Invalid,
            "DEV-SUBSECTION",
            profile,
            "`timer` FULL followed by a subsection `timer/bogus`: the parent's prefix, not in its description",
            |p| {
                with_timer(p, cat(&[&subsection("timer/bogus", 1), &[0u8; 16]]));
                Some(p.offset_of("timer_tail"))
            },
            &[],
        ));
        v.push(case(
            Class::Invalid,
            "DEV-SUBSECTION",
            profile,
            "`timer` FULL followed by `timer/icount` version 2, newer than described (1)",
            |p| {
                with_timer(p, icount(2));
                Some(p.offset_of("timer_tail") + 2 + "timer/icount".len() as u64)
            },
            &[],
        ));
    }
    v
}
