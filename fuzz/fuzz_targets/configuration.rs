//! Stream header and configuration section: `decode_header`, `decode_configuration`, the
//! subsections (target-page-bits, capabilities, uuid) and `check_capability_names`.
//!
//! Input: knob byte (bit 0 profile, bit 1 input is final, bit 2 with header, bit 7 tiny caps),
//! then bytes. Checks: no panic; the configuration re-encodes to exactly its bytes; the
//! capability list iterates to its count within the cap; an error consumes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::header::{
    check_capability_names, decode_configuration, decode_header, ConfigSubsection,
};
use qmig_protocol::reader::Reader;

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let (profile, limits) = (k.profile(), k.limits());
    let mut r = Reader::new(rest, 0);
    if k.bit(2) {
        match decode_header(&mut r) {
            Ok(v) => assert_eq!(r.consumed(), 8, "header version {v}"),
            Err(_) => {
                assert_eq!(r.consumed(), 0);
                return;
            }
        }
    }
    let start = r.consumed();
    let Ok(cfg) = decode_configuration(&mut r, &limits, k.bit(1)) else {
        assert_eq!(r.consumed(), start, "an error must consume nothing");
        return;
    };
    let used = r.consumed() - start;
    assert!(!cfg.name.is_empty() && cfg.name.len() as u32 <= limits.max_machine_name);
    for s in cfg.subsections() {
        if let ConfigSubsection::Capabilities(c) = s {
            assert!(c.count() <= limits.max_capabilities);
            assert_eq!(c.iter().count() as u32, c.count());
        }
    }
    let _ = check_capability_names(&cfg, start as u64, &profile);
    let mut out = Vec::new();
    cfg.encode(&mut out);
    assert_eq!(
        out.as_slice(),
        &rest[start..start + used],
        "{cfg:?} does not re-encode to its bytes"
    );
});
