//! `MultifdDecoder`: the init packet, then RAM packets (7.2 and 10.x layouts) and 10.x
//! device-state packets.
//!
//! Input: knob byte (bit 0 profile, bit 7 tiny caps), then one multifd connection's bytes.
//! Checks: no panic; an item re-encodes to exactly its bytes; page offsets and pages iterate
//! within the packet; the offset advances by the bytes used.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::multifd::{MultifdDecoder, MultifdItem};

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let profile = k.profile();
    let mut d = MultifdDecoder::new(profile, k.limits());
    let mut pos = 0usize;
    let mut out = Vec::new();
    while pos < rest.len() {
        let before = d.offset();
        let Ok((item, n)) = d.decode(&rest[pos..]) else {
            assert_eq!(d.offset(), before, "an error must consume nothing");
            break;
        };
        assert!(n > 0 && pos + n <= rest.len());
        assert_eq!(d.offset(), before + n as u64);
        if let MultifdItem::Ram(p) = &item {
            assert!(p.normal_pages() <= 128 && p.zero_pages() <= 128);
            assert_eq!(p.normal_offsets().count() as u32, p.normal_pages());
            assert_eq!(p.zero_offsets().count() as u32, p.zero_pages());
            let _ = p.ramblock();
            for (_, page) in p.pages(profile.target_page_size as usize) {
                assert_eq!(page.len(), profile.target_page_size as usize);
            }
        }
        out.clear();
        item.encode(&mut out);
        assert_eq!(
            out.as_slice(),
            &rest[pos..pos + n],
            "{item:?} does not re-encode to its bytes"
        );
        pos += n;
    }
});
