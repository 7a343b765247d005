//! `RpDecoder`: every `MIG_RP_MSG_*`, including the RECV_BITMAP body outside the length and
//! its conversion into a `PageBitmap`.
//!
//! Input: knob byte (bit 0 profile, bits 1-2 which block sizes the caller knows, bit 7 tiny
//! caps), then return-path bytes. Checks: no panic; a message re-encodes to exactly its bytes;
//! a RECV_BITMAP of a known block has exactly its wire size and converts (or names
//! BITMAP-PADDING); the decoder's offset advances by the bytes used.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::bitmap::{wire_size, BitmapView, PageBitmap};
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::rule::Rule;

fn known(sel: u8, name: &[u8]) -> Option<u64> {
    let pages = match (sel, name) {
        (0, _) => return None,
        (1, b"ram") => 16,
        (1, b"microvm.ram") | (2, b"microvm.ram") => 16384,
        (2, b"pc.bios") => 32,
        (3, _) => 1 + name.len() as u64 * 7,
        _ => return None,
    };
    Some(pages)
}

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let sel = (k.0 >> 1) & 3;
    let mut d = RpDecoder::new(k.profile(), k.limits());
    let mut pos = 0usize;
    let mut out = Vec::new();
    while pos < rest.len() {
        let before = d.offset();
        let expected = |name: &[u8]| known(sel, name).map(wire_size);
        let Ok((msg, n)) = d.decode(&rest[pos..], &expected) else {
            assert_eq!(d.offset(), before, "an error must consume nothing");
            break;
        };
        assert!(n > 0 && pos + n <= rest.len());
        assert_eq!(d.offset(), before + n as u64);
        if let RpMessage::RecvBitmap { name, bitmap } = msg {
            if let Some(pages) = known(sel, name) {
                assert_eq!(bitmap.len() as u64, wire_size(pages));
                let at = d.last_bitmap_offset();
                match PageBitmap::from_le_bytes(bitmap, pages, at) {
                    Ok(b) => {
                        assert_eq!(b.pages(), pages);
                        let v = BitmapView::new(bitmap, pages, at).expect("view of a good bitmap");
                        assert_eq!(v.count_ones(), b.count_ones());
                        let mut again = Vec::new();
                        b.to_le_bytes(&mut again);
                        assert_eq!(again.as_slice(), bitmap, "bitmap does not round-trip");
                    }
                    Err(v) => assert_eq!(v.rule, Rule::BitmapPadding),
                }
            } else {
                assert_eq!(bitmap.len() % 8, 0);
            }
        }
        out.clear();
        msg.encode(&mut out);
        assert_eq!(
            out.as_slice(),
            &rest[pos..pos + n],
            "{msg:?} does not re-encode to its bytes"
        );
        pos += n;
    }
});
