//! `decode_record`: RAM records and flags, MEM_SIZE block lists, CONTINUE state, XBZRLE deltas
//! applied to a page, and 7.2 zlib (COMPRESS_PAGE) pages.
//!
//! Input: knob byte (bit 0 profile, bit 1 postcopy rules, bit 2 x-ignore-shared, bit 3 every
//! MEM_SIZE entry carries a page size, bit 7 tiny caps), then records back to back. Checks: no
//! panic; a record re-encodes to exactly its bytes; a MEM_SIZE list iterates to its count
//! within the cap; XBZRLE/zlib decoding of any body never writes outside one page and leaves
//! the page untouched on a rejected delta.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::ram::{
    compress_page_decode, decode_record, xbzrle_apply, RamBody, RamChannel, RamCtx,
};
use qmig_protocol::reader::Reader;

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let (profile, limits) = (k.profile(), k.limits());
    let all = |_: &[u8]| true;
    let ctx = RamCtx {
        profile: &profile,
        limits: &limits,
        ignore_shared: k.bit(2),
        postcopy: k.bit(1),
        page_size_field: if k.bit(3) { Some(&all) } else { None },
    };
    let tps = profile.target_page_size as usize;
    let mut ch = RamChannel::new();
    let mut page = vec![0x5au8; tps];
    let mut pos = 0usize;
    let mut out = Vec::new();
    while pos < rest.len() {
        let mut r = Reader::new(&rest[pos..], pos as u64);
        let last_before = ch.last_block().map(<[u8]>::to_vec);
        let Ok(rec) = decode_record(&mut r, &mut ch, &ctx) else {
            assert_eq!(r.consumed(), 0, "an error must consume nothing");
            assert_eq!(ch.last_block().map(<[u8]>::to_vec), last_before);
            break;
        };
        let n = r.consumed();
        assert!(n >= 8);
        assert_eq!(
            rec.addr % tps as u64,
            0,
            "offset bits overlap the flag bits"
        );
        match rec.body {
            RamBody::Page(p) => assert_eq!(p.len(), tps),
            RamBody::MemSize(list) => {
                assert!(list.len() as u64 <= limits.max_blocks as u64);
                let mut sum = 0u64;
                let mut count = 0usize;
                for b in list.iter() {
                    assert!(!b.name.is_empty() && b.name.len() <= 255);
                    sum = sum.wrapping_add(b.used_length);
                    count += 1;
                }
                assert_eq!(count, list.len());
                assert_eq!(sum, rec.addr, "MEM_SIZE accepted with a wrong total");
            }
            RamBody::Xbzrle(delta) => {
                let old = page.clone();
                match xbzrle_apply(delta, &mut page, pos as u64) {
                    Ok(covered) => assert!(covered <= tps),
                    Err(_) => assert_eq!(page, old, "a rejected delta changed the page"),
                }
            }
            RamBody::Compressed(z) => {
                let _ = compress_page_decode(z, &mut page, pos as u64);
            }
            _ => {}
        }
        if rec.is_page() {
            assert!(rec.block(&ch).is_some(), "a page record without a block");
        }
        out.clear();
        rec.encode(&mut out);
        assert_eq!(
            out.as_slice(),
            &rest[pos..pos + n],
            "{rec:?} does not re-encode to its bytes"
        );
        pos += n;
    }
});
