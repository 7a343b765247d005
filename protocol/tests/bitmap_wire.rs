//! Byte-level RECV_BITMAP tests: the wire form is little-endian bytes (bit i = bit i%8 of byte
//! i/8), whatever the word size; big-endian or 32-bit word orders are told apart and rejected
//! or decode to a different page set.

use qmig_protocol::bitmap::{wire_size, BitmapView, PageBitmap};
use qmig_protocol::codes::RECV_BITMAP_END_MARK;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::{Rule, WireError};

const SET: [u64; 5] = [0, 9, 33, 63, 64];
/// 70 pages: two 64-bit words, 16 wire bytes (9 bytes of bits, padded to a multiple of 8).
const PAGES: u64 = 70;

fn bitmap() -> PageBitmap {
    let mut b = PageBitmap::new(PAGES);
    for i in SET {
        b.set(i);
    }
    b
}

#[test]
fn wire_sizes_round_up_to_eight_bytes() {
    assert_eq!(wire_size(0), 0);
    assert_eq!(wire_size(1), 8);
    assert_eq!(wire_size(64), 8);
    assert_eq!(wire_size(65), 16);
    assert_eq!(wire_size(32), 8); // 128 KiB block: 32 bits, padded to 8 bytes
    assert_eq!(wire_size(16384), 2048); // 64 MiB of 4 KiB pages
}

#[test]
fn exact_little_endian_bytes() {
    let b = bitmap();
    let bytes = b.to_le_vec();
    #[rustfmt::skip]
    let expect: [u8; 16] = [
        0x01, 0x02, 0x00, 0x00, 0x02, 0x00, 0x00, 0x80, // 0, 9, 33, 63
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 64
    ];
    assert_eq!(bytes, expect);
    assert_eq!(b.iter_ones().collect::<Vec<_>>(), SET);
    let v = BitmapView::new(&bytes, PAGES, 0).unwrap();
    assert_eq!(v.iter_ones().collect::<Vec<_>>(), SET);
    assert_eq!(PageBitmap::from_le_bytes(&bytes, PAGES, 0).unwrap(), b);
}

#[test]
fn whole_recv_bitmap_message_bytes() {
    let bytes = bitmap().to_le_vec();
    let mut wire = Vec::new();
    RpMessage::RecvBitmap {
        name: b"ram",
        bitmap: &bytes,
    }
    .encode(&mut wire);
    #[rustfmt::skip]
    let expect: Vec<u8> = [
        &[0x00, 0x05, 0x00, 0x04, 0x03, b'r', b'a', b'm'][..],       // header, 1+n, str8
        &[0, 0, 0, 0, 0, 0, 0, 16],                                  // be64 size
        &[0x01, 0x02, 0x00, 0x00, 0x02, 0x00, 0x00, 0x80],           // LE bitmap
        &[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
        &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],           // be64 end mark
    ]
    .concat();
    assert_eq!(wire, expect);
    let mut d = RpDecoder::new(Profile::QEMU_10, Limits::DEFAULT);
    let (m, used) = d.decode(&wire, &|_| Some(wire_size(PAGES))).unwrap();
    assert_eq!(used, wire.len());
    assert_eq!(d.last_bitmap_offset(), 16);
    let RpMessage::RecvBitmap { name, bitmap } = m else {
        panic!("{m:?}")
    };
    assert_eq!(name, b"ram");
    let pages = PageBitmap::from_le_bytes(bitmap, PAGES, d.last_bitmap_offset()).unwrap();
    assert_eq!(pages.iter_ones().collect::<Vec<_>>(), SET);
}

fn words_u64(b: &PageBitmap) -> Vec<u64> {
    b.words().to_vec()
}

#[test]
fn big_endian_64_bit_words_are_told_apart() {
    let be: Vec<u8> = words_u64(&bitmap())
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect();
    assert_ne!(be, bitmap().to_le_vec());
    // Read as the wire form: page 64 lands on bit 7 of byte 15 => page 127, which is padding
    // for 70 pages: rejected.
    let err = PageBitmap::from_le_bytes(&be, PAGES, 1000).unwrap_err();
    assert_eq!(err.rule, Rule::BitmapPadding);
    assert_eq!(err.offset, 1000 + 15);
    // With 128 pages (no padding) it decodes to a different set.
    let got: Vec<u64> = PageBitmap::from_le_bytes(&be, 128, 0)
        .unwrap()
        .iter_ones()
        .collect();
    // Bit b of a word lands on page (7 - b/8)*8 + b%8 of its 8 bytes.
    assert_eq!(got, [7, 25, 49, 56, 120]);
    assert_ne!(got, SET);
}

#[test]
fn little_endian_32_bit_words_in_64_bit_order_are_told_apart() {
    // A 32-bit host writing its longs little-endian gives the same bytes (the format is
    // word-size independent)...
    let le32: Vec<u8> = words_u64(&bitmap())
        .iter()
        .flat_map(|w| [(*w as u32).to_le_bytes(), ((*w >> 32) as u32).to_le_bytes()])
        .flatten()
        .collect();
    assert_eq!(le32, bitmap().to_le_vec());
    // ...while swapping the two 32-bit halves of each 64-bit word (a 64-bit reader of 32-bit
    // words, or a 32-bit big-endian pairing) moves pages 0, 9 to 32, 41 and 33, 63 to 1, 31.
    let swapped: Vec<u8> = words_u64(&bitmap())
        .iter()
        .flat_map(|w| w.rotate_left(32).to_le_bytes())
        .collect();
    let got: Vec<u64> = PageBitmap::from_le_bytes(&swapped, 128, 0)
        .unwrap()
        .iter_ones()
        .collect();
    assert_eq!(got, [1, 31, 32, 41, 96]);
    // For 70 pages the half-swapped second word sets page 96: padding, rejected.
    let err = PageBitmap::from_le_bytes(&swapped, PAGES, 0).unwrap_err();
    assert_eq!((err.rule, err.offset), (Rule::BitmapPadding, 12));
    // Big-endian 32-bit words: bit 0 lands on byte 3.
    let be32: Vec<u8> = words_u64(&bitmap())
        .iter()
        .flat_map(|w| [(*w as u32).to_be_bytes(), ((*w >> 32) as u32).to_be_bytes()])
        .flatten()
        .collect();
    let got: Vec<u64> = PageBitmap::from_le_bytes(&be32, 128, 0)
        .unwrap()
        .iter_ones()
        .collect();
    assert_eq!(got, [17, 24, 39, 57, 88]);
}

#[test]
fn size_and_end_mark_are_checked() {
    let bytes = bitmap().to_le_vec();
    let mut wire = Vec::new();
    RpMessage::RecvBitmap {
        name: b"ram",
        bitmap: &bytes,
    }
    .encode(&mut wire);
    // Expected size differs: RP-BITMAP-SIZE at the be64 size (offset 8), before any bitmap byte.
    let mut d = RpDecoder::new(Profile::QEMU_7_2, Limits::DEFAULT);
    let e = d.decode(&wire[..16], &|_| Some(8)).unwrap_err();
    assert_eq!(e, WireError::invalid(8, Rule::RpBitmapSize, 16));
    // Unknown block with a size above the Limits cap: rejected from the 16 header bytes alone.
    let mut huge = wire[..8].to_vec();
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    let e = d.decode(&huge, &|_| None).unwrap_err();
    assert_eq!(e, WireError::invalid(8, Rule::RpBitmapSize, u64::MAX));
    // Wrong end mark.
    let mut bad = wire.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    let e = d.decode(&bad, &|_| Some(16)).unwrap_err();
    assert_eq!(
        e,
        WireError::invalid(32, Rule::RpBitmapEndmark, RECV_BITMAP_END_MARK ^ 1)
    );
    // Incomplete until the end mark's last byte.
    for k in 0..wire.len() {
        assert!(d
            .decode(&wire[..k], &|_| Some(16))
            .unwrap_err()
            .is_incomplete());
    }
    assert_eq!(d.offset(), 0);
    // Header length must be 1 + n.
    let mut badlen = wire.clone();
    badlen[3] = 5;
    let e = d.decode(&badlen, &|_| Some(16)).unwrap_err();
    assert_eq!(e, WireError::invalid(2, Rule::RpBitmapLen, 5));
}

#[test]
fn ranges_complement_and_not() {
    let mut b = PageBitmap::new(200);
    b.set_range(3, 130);
    assert_eq!(b.count_ones(), 130);
    assert_eq!(b.iter_ones().next(), Some(3));
    assert_eq!(b.iter_ones().last(), Some(132));
    b.clear_range(64, 64);
    assert_eq!(b.count_ones(), 130 - 64);
    let mut c = b.clone();
    c.complement();
    assert_eq!(c.count_ones(), 200 - 66);
    assert_eq!(
        c.iter_zeros().collect::<Vec<_>>(),
        b.iter_ones().collect::<Vec<_>>()
    );
    // Padding stays clear: the wire form has no bit past page 199.
    let w = c.to_le_vec();
    assert_eq!(w.len(), 32);
    assert_eq!(w[25], 0); // pages 200..207
    assert!(PageBitmap::from_le_bytes(&w, 200, 0).is_ok());
    let mut d = PageBitmap::full(200);
    d.and_not(&b);
    assert_eq!(d, c);
    // next_one / next_zero agree with the iterators from any start.
    for from in [0, 1, 3, 63, 64, 65, 132, 133, 199, 200, 500] {
        assert_eq!(
            b.next_one(from),
            b.iter_ones().find(|&i| i >= from),
            "{from}"
        );
        assert_eq!(
            b.next_zero(from),
            b.iter_zeros().find(|&i| i >= from),
            "{from}"
        );
    }
    assert_eq!(PageBitmap::full(130).next_zero(0), None);
    assert_eq!(PageBitmap::new(0).next_one(0), None);
    // Out-of-range operations are ignored.
    d.set(500);
    d.set_range(190, 1000);
    assert!(!d.test(500));
    assert_eq!(d.pages(), 200);
}
