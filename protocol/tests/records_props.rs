//! Property tests: every RAM record type and every return-path message round-trips through
//! encode/decode byte-exactly; arbitrary and mutated bytes never make `decode_record`,
//! `RpDecoder`, `MultifdDecoder` or `xbzrle_apply` panic, and a failed decode consumes nothing;
//! the bitmap wire form round-trips for arbitrary page counts; XBZRLE deltas reproduce the page.

use proptest::prelude::*;
use qmig_protocol::bitmap::{wire_size, BitmapView, PageBitmap};
use qmig_protocol::codes::{RamFlags, RpType};
use qmig_protocol::limits::Limits;
use qmig_protocol::multifd::MultifdDecoder;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::{
    decode_record, encode_mem_size, xbzrle_apply, xbzrle_encode, BlockInfo, RamBody, RamChannel,
    RamCtx, RamRecord,
};
use qmig_protocol::reader::Reader;
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::sink::Sink;

const TPS: usize = 4096;

fn profile(v10: bool) -> Profile {
    if v10 {
        Profile::QEMU_10
    } else {
        Profile::QEMU_7_2
    }
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=255)
}

/// Blocks whose name starts with 'h' carry a page size in MEM_SIZE (the receiver's view).
fn huge(n: &[u8]) -> bool {
    n.first() == Some(&b'h')
}

#[derive(Debug, Clone)]
enum Kind {
    Zero(u8),
    Page(Vec<u8>),
    Xbzrle(Vec<u8>),
    Compressed(Vec<u8>),
    Eos,
    Flush,
}

fn kind(v10: bool) -> impl Strategy<Value = Kind> {
    let fill = if v10 {
        Just(0u8).boxed()
    } else {
        any::<u8>().boxed()
    };
    let last = if v10 {
        Just(Kind::Flush).boxed()
    } else {
        prop::collection::vec(
            any::<u8>(),
            0..=qmig_protocol::ram::compress_bound(4096) as usize,
        )
        .prop_map(Kind::Compressed)
        .boxed()
    };
    prop_oneof![
        fill.prop_map(Kind::Zero),
        prop::collection::vec(any::<u8>(), TPS).prop_map(Kind::Page),
        prop::collection::vec(any::<u8>(), 0..=TPS).prop_map(Kind::Xbzrle),
        Just(Kind::Eos),
        last,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ram_records_round_trip(
        (v10, k, cont, nm, page_no, prev) in any::<bool>().prop_flat_map(|v| (
            Just(v), kind(v), any::<bool>(), name(), 0u64..(1 << 28), name())),
        postcopy in any::<bool>(),
    ) {
        let p = profile(v10);
        let (flag, body) = match &k {
            Kind::Zero(f) => (RamFlags::ZERO, RamBody::Zero { fill: if v10 { 0 } else { *f } }),
            Kind::Page(d) => (RamFlags::PAGE, RamBody::Page(d)),
            Kind::Xbzrle(d) => (RamFlags::XBZRLE, RamBody::Xbzrle(d)),
            Kind::Compressed(d) => (RamFlags::COMPRESS_PAGE, RamBody::Compressed(d)),
            Kind::Eos => (RamFlags::EOS, RamBody::Eos),
            Kind::Flush => (RamFlags::MULTIFD_FLUSH, RamBody::MultifdFlush),
        };
        prop_assert!(p.ram_flag_legal(flag));
        let is_page = matches!(k, Kind::Zero(_) | Kind::Page(_) | Kind::Xbzrle(_) | Kind::Compressed(_));
        let flags = if cont { flag.with(RamFlags::CONTINUE) } else { flag };
        let rec = RamRecord {
            flags,
            addr: if is_page { page_no * TPS as u64 } else { 0 },
            name: if is_page && !cont { Some(&nm[..]) } else { None },
            body,
        };
        let mut wire = Vec::new();
        rec.encode(&mut wire);
        let limits = Limits::DEFAULT;
        let ctx = RamCtx { postcopy, ..RamCtx::new(&p, &limits) };
        let mut ch = RamChannel::new();
        ch.set_last_block(&prev);
        let mut r = Reader::new(&wire, 77);
        let res = decode_record(&mut r, &mut ch, &ctx);
        let postcopy_ok = matches!(k, Kind::Zero(_) | Kind::Page(_) | Kind::Eos)
            || (!v10 && matches!(k, Kind::Compressed(_)));
        if postcopy && !postcopy_ok {
            let v = res.unwrap_err();
            prop_assert_eq!(v.violation().unwrap().rule.id(), "RAM-POSTCOPY-FLAG");
            prop_assert_eq!(v.violation().unwrap().offset, 77);
            prop_assert_eq!(r.consumed(), 0);
            return Ok(());
        }
        let got = res.unwrap();
        prop_assert_eq!(got, rec);
        prop_assert_eq!(r.consumed(), wire.len());
        let expect_block: Option<&[u8]> = if !is_page { None } else if cont { Some(&prev) } else { Some(&nm) };
        prop_assert_eq!(got.block(&ch), expect_block);
        let mut again = Vec::new();
        got.encode(&mut again);
        prop_assert_eq!(again, wire.clone());
        // Every proper prefix is Incomplete and consumes nothing.
        for cut in [0, 1, 7, 8, wire.len() / 2, wire.len() - 1] {
            if cut < wire.len() {
                let mut ch2 = RamChannel::new();
                ch2.set_last_block(&prev);
                let mut r2 = Reader::new(&wire[..cut], 0);
                let e = decode_record(&mut r2, &mut ch2, &ctx).unwrap_err();
                prop_assert!(e.is_incomplete());
                prop_assert_eq!(r2.consumed(), 0);
                prop_assert_eq!(ch2.last_block(), Some(&prev[..]));
            }
        }
    }

    #[test]
    fn mem_size_round_trips(
        v10 in any::<bool>(),
        ignore_shared in any::<bool>(),
        blocks in prop::collection::vec((name(), 1u64..(1 << 40), any::<u64>(), any::<u64>()), 0..20),
    ) {
        let p = profile(v10);
        let entries: Vec<BlockInfo> = blocks
            .iter()
            .map(|(n, len, ps, a)| BlockInfo {
                name: n,
                used_length: len * TPS as u64,
                page_size: huge(n).then_some(*ps),
                mr_addr: ignore_shared.then_some(*a),
            })
            .collect();
        let total: u64 = entries.iter().map(|b| b.used_length).sum();
        let mut wire = Vec::new();
        wire.put_be64(total | RamFlags::MEM_SIZE.0);
        encode_mem_size(entries.iter().copied(), &mut wire);
        let limits = Limits::DEFAULT;
        let ctx = RamCtx { ignore_shared, page_size_field: Some(&huge), ..RamCtx::new(&p, &limits) };
        let mut ch = RamChannel::new();
        let mut r = Reader::new(&wire, 0);
        let rec = decode_record(&mut r, &mut ch, &ctx).unwrap();
        prop_assert_eq!(r.consumed(), wire.len());
        prop_assert_eq!(rec.addr, total);
        let RamBody::MemSize(list) = rec.body else { panic!("{rec:?}") };
        prop_assert_eq!(list.iter().collect::<Vec<_>>(), entries);
        let mut again = Vec::new();
        rec.encode(&mut again);
        prop_assert_eq!(again, wire);
    }

    #[test]
    fn rp_messages_round_trip(
        v10 in any::<bool>(),
        which in 0u8..7,
        v in any::<u32>(),
        start in any::<u64>(),
        nm in name(),
        pages in 0u64..5000,
        seed in any::<u64>(),
    ) {
        let p = profile(v10);
        let mut bm = PageBitmap::new(pages);
        let mut x = seed | 1;
        for i in 0..pages {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            if x & 3 == 0 { bm.set(i) }
        }
        let bytes = bm.to_le_vec();
        let msg = match which {
            0 => RpMessage::Shut(v),
            1 => RpMessage::Pong(v),
            2 => RpMessage::ReqPagesId { start, len: v, name: &nm },
            3 => RpMessage::ReqPages { start, len: v },
            4 => RpMessage::RecvBitmap { name: &nm, bitmap: &bytes },
            5 => RpMessage::ResumeAck(1),
            _ => RpMessage::SwitchoverAck,
        };
        prop_assume!(p.rp_type_legal(msg.ty()));
        let mut wire = Vec::new();
        // REQ_PAGES needs a named block first.
        let pre = RpMessage::ReqPagesId { start: 0, len: 4096, name: b"ram" };
        pre.encode(&mut wire);
        let pre_len = wire.len();
        msg.encode(&mut wire);
        let mut d = RpDecoder::new(p, Limits::DEFAULT);
        let lookup = |n: &[u8]| (n == &nm[..]).then_some(wire_size(pages));
        let (m0, u0) = d.decode(&wire, &lookup).unwrap();
        prop_assert_eq!((m0, u0), (pre, pre_len));
        for cut in pre_len..wire.len() {
            let mut probe = d.clone();
            prop_assert!(probe.decode(&wire[pre_len..cut], &lookup).unwrap_err().is_incomplete());
            prop_assert_eq!(probe.offset(), pre_len as u64);
        }
        let (m, u) = d.decode(&wire[pre_len..], &lookup).unwrap();
        prop_assert_eq!(m, msg);
        prop_assert_eq!(u, wire.len() - pre_len);
        prop_assert_eq!(d.offset(), wire.len() as u64);
        let mut again = Vec::new();
        m.encode(&mut again);
        prop_assert_eq!(&again[..], &wire[pre_len..]);
        if let RpMessage::RecvBitmap { bitmap, .. } = m {
            prop_assert_eq!(PageBitmap::from_le_bytes(bitmap, pages, d.last_bitmap_offset()).unwrap(), bm);
        }
    }

    #[test]
    fn bitmap_wire_round_trip(pages in 0u64..20_000, ones in prop::collection::vec(any::<u64>(), 0..300),
                              ranges in prop::collection::vec((any::<u64>(), 0u64..300), 0..5)) {
        let mut b = PageBitmap::new(pages);
        let mut model = std::collections::BTreeSet::new();
        for o in ones {
            if pages > 0 { b.set(o % pages); model.insert(o % pages); }
        }
        for (s, l) in ranges {
            let s = if pages > 0 { s % pages } else { 0 };
            b.set_range(s, l);
            for i in s..(s + l).min(pages) { model.insert(i); }
        }
        prop_assert_eq!(b.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        prop_assert_eq!(b.count_ones(), model.len() as u64);
        let w = b.to_le_vec();
        prop_assert_eq!(w.len() as u64, wire_size(pages));
        for i in 0..pages {
            prop_assert_eq!(w[(i / 8) as usize] >> (i % 8) & 1 == 1, model.contains(&i));
        }
        prop_assert_eq!(PageBitmap::from_le_bytes(&w, pages, 0).unwrap(), b.clone());
        let v = BitmapView::new(&w, pages, 0).unwrap();
        prop_assert_eq!(v.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        let mut c = b.clone();
        c.complement();
        prop_assert_eq!(c.count_ones(), pages - model.len() as u64);
        prop_assert_eq!(c.iter_ones().collect::<Vec<_>>(), b.iter_zeros().collect::<Vec<_>>());
        prop_assert!(PageBitmap::from_le_bytes(&c.to_le_vec(), pages, 0).is_ok());
        // Wrong sizes are RP-BITMAP-SIZE.
        prop_assert_eq!(PageBitmap::from_le_bytes(&w[..w.len().saturating_sub(1)], pages.max(1), 5)
            .err().map(|v| v.rule.id()), if pages == 0 { None } else { Some("RP-BITMAP-SIZE") });
    }

    #[test]
    fn xbzrle_encode_then_apply(old in prop::collection::vec(any::<u8>(), TPS),
                                edits in prop::collection::vec((0usize..TPS, 1usize..300, any::<u8>()), 0..12)) {
        let mut new = old.clone();
        for (at, len, b) in edits {
            for x in &mut new[at..(at + len).min(TPS)] { *x = x.wrapping_add(b | 1); }
        }
        let mut delta = Vec::new();
        match xbzrle_encode(&old, &new, TPS, &mut delta) {
            Some(n) => {
                prop_assert_eq!(n, delta.len());
                let mut page = old.clone();
                xbzrle_apply(&delta, &mut page, 0).unwrap();
                prop_assert_eq!(page, new);
            }
            None => prop_assert!(delta.is_empty()),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600),
                                   v10 in any::<bool>(), postcopy in any::<bool>(),
                                   ignore_shared in any::<bool>(), named in any::<bool>()) {
        let p = profile(v10);
        let limits = Limits::DEFAULT;
        let ctx = RamCtx { postcopy, ignore_shared, page_size_field: Some(&huge), ..RamCtx::new(&p, &limits) };
        let mut ch = RamChannel::new();
        if named { ch.set_last_block(b"ram"); }
        let mut r = Reader::new(&bytes, 0);
        loop {
            let before = r.consumed();
            match decode_record(&mut r, &mut ch, &ctx) {
                Ok(_) => prop_assert!(r.consumed() > before),
                Err(_) => { prop_assert_eq!(r.consumed(), before); break; }
            }
        }
        let mut d = RpDecoder::new(p, limits);
        let mut pos = 0;
        while let Ok((_, u)) = d.decode(&bytes[pos..], &|n: &[u8]| (n.len() % 2 == 0).then_some(16)) {
            prop_assert!(u > 0);
            pos += u;
        }
        let mut m = MultifdDecoder::new(p, limits);
        let mut pos = 0;
        while let Ok((_, u)) = m.decode(&bytes[pos..]) { pos += u; }
        let mut page = vec![0u8; TPS];
        let _ = xbzrle_apply(&bytes, &mut page, 0);
    }

    #[test]
    fn mutated_records_never_panic(v10 in any::<bool>(), which in 0u8..6, flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let p = profile(v10);
        let page = [0x5au8; TPS];
        let delta = [0u8, 2, 0xaa, 0xbb];
        let mut wire = Vec::new();
        let name: &[u8] = b"pc.ram";
        let rec = |flags, body| RamRecord { flags, addr: 0x1000, name: Some(name), body };
        match which {
            0 => rec(RamFlags::ZERO, RamBody::Zero { fill: 0 }).encode(&mut wire),
            1 => rec(RamFlags::PAGE, RamBody::Page(&page)).encode(&mut wire),
            2 => rec(RamFlags::XBZRLE, RamBody::Xbzrle(&delta)).encode(&mut wire),
            3 => {
                wire.put_be64(8192 | RamFlags::MEM_SIZE.0);
                encode_mem_size([BlockInfo { name, used_length: 8192, page_size: None, mr_addr: None }], &mut wire);
            }
            4 => RpMessage::RecvBitmap { name, bitmap: &[0xff; 16] }.encode(&mut wire),
            _ => RpMessage::ReqPagesId { start: 0, len: 4096, name }.encode(&mut wire),
        }
        for (at, x) in flips {
            let n = wire.len();
            wire[at % n] ^= x;
        }
        let limits = Limits::DEFAULT;
        let ctx = RamCtx::new(&p, &limits);
        let mut ch = RamChannel::new();
        let mut r = Reader::new(&wire, 0);
        let _ = decode_record(&mut r, &mut ch, &ctx);
        let mut d = RpDecoder::new(p, limits);
        let _ = d.decode(&wire, &|_: &[u8]| None);
        let mut pg = [0u8; TPS];
        let _ = xbzrle_apply(&wire, &mut pg, 0);
    }
}

#[test]
fn rp_unknown_type_and_lengths_are_rejected() {
    use qmig_protocol::{Rule, WireError};
    let mut d = RpDecoder::new(Profile::QEMU_7_2, Limits::DEFAULT);
    let none = |_: &[u8]| None;
    // SWITCHOVER_ACK is not a 7.2 message.
    assert_eq!(
        d.decode(&[0, 7, 0, 0], &none),
        Err(WireError::invalid(0, Rule::RpType, 7))
    );
    assert_eq!(
        d.decode(&[0, 0, 0, 0], &none),
        Err(WireError::invalid(0, Rule::RpType, 0))
    );
    assert_eq!(
        d.decode(&[0, 1, 0, 5], &none),
        Err(WireError::invalid(2, Rule::RpLen, 5))
    );
    // REQ_PAGES before any REQ_PAGES_ID.
    let mut w = Vec::new();
    RpMessage::ReqPages {
        start: 0,
        len: 4096,
    }
    .encode(&mut w);
    assert_eq!(
        d.decode(&w, &none),
        Err(WireError::invalid(0, Rule::RpReqNoBlock, 4))
    );
    // REQ_PAGES_ID with len != 13 + n.
    let mut w = Vec::new();
    RpMessage::ReqPagesId {
        start: 0,
        len: 4096,
        name: b"ram",
    }
    .encode(&mut w);
    w[3] += 1;
    w.push(0);
    assert_eq!(
        d.decode(&w, &none),
        Err(WireError::invalid(2, Rule::RpReqIdLen, 17))
    );
    // Over 512: rejected from the header alone.
    assert_eq!(
        d.decode(&[0, 3, 2, 1], &none),
        Err(WireError::invalid(2, Rule::RpLenMax, 513))
    );
    // RESUME_ACK must carry 1.
    let mut w = Vec::new();
    RpMessage::ResumeAck(2).encode(&mut w);
    assert_eq!(
        d.decode(&w, &none),
        Err(WireError::invalid(4, Rule::RpResumeAckValue, 2))
    );
    // Unknown messages encode with their payload.
    let mut w = Vec::new();
    RpMessage::Unknown {
        ty: RpType(9),
        payload: b"xy",
    }
    .encode(&mut w);
    assert_eq!(w, [0, 9, 0, 2, b'x', b'y']);
    assert_eq!(d.offset(), 0);
}

#[test]
fn ram_record_rules_name_their_offsets() {
    use qmig_protocol::{Rule, WireError};
    let limits = Limits::DEFAULT;
    let dec = |p: &Profile, postcopy: bool, named: bool, wire: &[u8]| {
        let ctx = RamCtx {
            postcopy,
            ..RamCtx::new(p, &limits)
        };
        let mut ch = RamChannel::new();
        if named {
            ch.set_last_block(b"ram");
        }
        decode_record(&mut Reader::new(wire, 100), &mut ch, &ctx).map(|_| ())
    };
    let v10 = Profile::QEMU_10;
    let v72 = Profile::QEMU_7_2;
    let w = |x: u64| x.to_be_bytes();
    // Two type bits, none, FULL, HOOK, profile-illegal flags.
    assert_eq!(
        dec(&v10, false, true, &w(0x1000 | 0x00a)),
        Err(WireError::invalid(100, Rule::RamFlags, 0xa))
    );
    assert_eq!(
        dec(&v10, false, true, &w(0x1000 | 0x020)),
        Err(WireError::invalid(100, Rule::RamFlags, 0x20))
    );
    assert_eq!(
        dec(&v10, false, true, &w(0x001)),
        Err(WireError::invalid(100, Rule::RamFlagProfile, 1))
    );
    assert_eq!(
        dec(&v10, false, true, &w(0x080)),
        Err(WireError::invalid(100, Rule::RamHook, 0x80))
    );
    assert_eq!(
        dec(&v10, false, true, &w(0x100)),
        Err(WireError::invalid(100, Rule::RamFlagProfile, 0x100))
    );
    assert_eq!(
        dec(&v72, false, true, &w(0x200)),
        Err(WireError::invalid(100, Rule::RamFlagProfile, 0x200))
    );
    assert_eq!(
        dec(&v10, false, true, &w(0x400)),
        Err(WireError::invalid(100, Rule::RamFlagProfile, 0x400))
    );
    // Postcopy forbids XBZRLE and MEM_SIZE.
    assert_eq!(
        dec(&v72, true, true, &w(0x060)),
        Err(WireError::invalid(100, Rule::RamPostcopyFlag, 0x60))
    );
    // CONTINUE without a named block.
    assert_eq!(
        dec(&v10, false, false, &w(0x2000 | 0x028)),
        Err(WireError::invalid(100, Rule::RamContinue, 0x28))
    );
    // ZERO fill 1: fine in 7.2, RAM-ZERO-FILL in 10.x at the fill byte.
    let mut z = w(0x2000 | 0x022).to_vec();
    z.push(1);
    assert!(dec(&v72, false, true, &z).is_ok());
    assert_eq!(
        dec(&v10, false, true, &z),
        Err(WireError::invalid(108, Rule::RamZeroFill, 1))
    );
    // XBZRLE encoding byte and length.
    let mut x = w(0x060).to_vec();
    x.extend_from_slice(&[2, 0, 0]);
    assert_eq!(
        dec(&v10, false, true, &x),
        Err(WireError::invalid(108, Rule::RamXbzrleEnc, 2))
    );
    let mut x = w(0x060).to_vec();
    x.extend_from_slice(&[1, 0x10, 0x01]);
    assert_eq!(
        dec(&v10, false, true, &x),
        Err(WireError::invalid(109, Rule::RamXbzrleLen, 4097))
    );
    // COMPRESS_PAGE length above compressBound(4096) = 4096 + 1 + 0 + 0 + 13 = 4110.
    let mut c = w(0x120).to_vec();
    c.extend_from_slice(&4111u32.to_be_bytes());
    assert_eq!(
        dec(&v72, false, true, &c),
        Err(WireError::invalid(108, Rule::RamCompressLen, 4111))
    );
    // Empty name.
    let mut e = w(0x008).to_vec();
    e.push(0);
    assert_eq!(
        dec(&v10, false, true, &e),
        Err(WireError::invalid(108, Rule::Str8Empty, 0))
    );
    // MEM_SIZE: an entry longer than what remains of the total; too many entries.
    let mut m = w(0x2000 | 0x004).to_vec();
    m.extend_from_slice(&[3, b'r', b'a', b'm']);
    m.extend_from_slice(&w(0x3000));
    assert_eq!(
        dec(&v10, false, false, &m),
        Err(WireError::invalid(112, Rule::RamMemSizeSum, 0x3000))
    );
    let mut m = w(0x1000 | 0x004).to_vec();
    for _ in 0..1025 {
        m.extend_from_slice(&[1, b'z']);
        m.extend_from_slice(&w(0));
    }
    let e = dec(&v10, false, false, &m).unwrap_err();
    assert_eq!(
        e,
        WireError::invalid(100 + 8 + 1024 * 10, Rule::RamMemSizeCount, 1025)
    );
}

#[test]
fn xbzrle_malformed_deltas_are_rejected_without_touching_the_page() {
    use qmig_protocol::Rule;
    let mut page = [7u8; 16];
    // zero run 4, literal run 2 -> bytes 4,5 replaced.
    assert_eq!(xbzrle_apply(&[4, 2, 1, 2], &mut page, 0), Ok(6));
    assert_eq!(page[..7], [7, 7, 7, 7, 1, 2, 7]);
    for bad in [
        &[4u8][..],          // truncated
        &[4, 0, 1],          // empty literal run
        &[20, 1, 1],         // zero run past the page
        &[4, 20, 1],         // literal run past the page
        &[4, 3, 1, 2],       // literal run past the delta
        &[0, 1, 1, 0, 1, 1], // a later zero run of 0
        &[0x80, 0x80, 1, 1], // three-byte LEB128
    ] {
        let before = page;
        let e = xbzrle_apply(bad, &mut page, 1000).unwrap_err();
        assert_eq!(e.rule, Rule::RamXbzrleDecode, "{bad:?}");
        assert!(e.offset >= 1000);
        assert_eq!(page, before);
    }
    // Identical pages encode to nothing.
    let mut out = Vec::new();
    assert_eq!(xbzrle_encode(&page, &page, 16, &mut out), Some(0));
}

#[cfg(feature = "compress")]
#[test]
fn zlib_pages_inflate_to_exactly_one_page() {
    use qmig_protocol::ram::{compress_page_decode, compress_page_encode};
    use qmig_protocol::Rule;
    let src: Vec<u8> = (0..TPS).map(|i| (i * 7 % 251) as u8).collect();
    let z = compress_page_encode(&src, 1);
    let mut page = [0u8; TPS];
    compress_page_decode(&z, &mut page, 0).unwrap();
    assert_eq!(&page[..], &src[..]);
    // A stream of half a page, or of two pages, is rejected.
    let half = compress_page_encode(&src[..TPS / 2], 1);
    assert_eq!(
        compress_page_decode(&half, &mut page, 9).unwrap_err().rule,
        Rule::RamCompressDecode
    );
    let two = compress_page_encode(&[src.clone(), src.clone()].concat(), 1);
    assert_eq!(
        compress_page_decode(&two, &mut page, 9).unwrap_err().rule,
        Rule::RamCompressDecode
    );
    assert_eq!(
        compress_page_decode(&[1, 2, 3], &mut page, 9)
            .unwrap_err()
            .offset,
        9
    );
}

/// Every RAM section of every captured main/recovery stream decodes record by record with
/// `decode_record` exactly to its footer, with the manifest's per-type counts; and for the
/// precopy vectors whose pages all travel on the main channel, applying the records (pages,
/// zero pages, XBZRLE deltas and, with `compress`, zlib pages) rebuilds RAM byte-equal to
/// `final_ram` (by sha256).
#[test]
fn ram_sections_of_every_vector_decode_and_rebuild_ram() {
    use serde_json::Value;
    use sha2::{Digest, Sha256};
    use std::path::Path;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
    let (mut sections, mut records, mut rebuilt) = (0, 0u64, Vec::new());
    for (ver, p) in [
        ("qemu-7.2", Profile::QEMU_7_2),
        ("qemu-10.0", Profile::QEMU_10),
    ] {
        let mut dirs: Vec<_> = std::fs::read_dir(root.join(ver))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let vname = dir.file_name().unwrap().to_str().unwrap().to_string();
            let m: Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let fr = &m["final_ram"];
            let block = fr["block"].as_str().unwrap().as_bytes().to_vec();
            let ram_len: usize = fr["bytes"].as_str().map_or_else(
                || fr["bytes"].as_u64().unwrap() as usize,
                |s| s.parse().unwrap(),
            );
            let rebuild = vname.starts_with("precopy-")
                && vname != "precopy-multifd"
                && (cfg!(feature = "compress") || vname != "precopy-compress");
            let mut ram = if rebuild {
                vec![0u8; ram_len]
            } else {
                Vec::new()
            };
            let limits = Limits::DEFAULT;
            for ch in m["channels"].as_array().unwrap() {
                let Some(recs) = ch["records"].as_array() else {
                    continue;
                };
                let bytes = std::fs::read(dir.join(ch["file"].as_str().unwrap())).unwrap();
                let ignore_shared = recs.iter().any(|r| {
                    r["type"] == "CONFIGURATION" && r.to_string().contains("x-ignore-shared")
                });
                let ctx = RamCtx {
                    ignore_shared,
                    ..RamCtx::new(&p, &limits)
                };
                let mut rch = RamChannel::new();
                for rec in recs {
                    let Some(counts) = rec.get("ram") else {
                        continue;
                    };
                    let off = rec["offset"].as_u64().unwrap() as usize;
                    let len = rec["length"].as_u64().unwrap() as usize;
                    let hdr = match rec["type"].as_str().unwrap() {
                        "SECTION_START" => 1 + 4 + 1 + 3 + 4 + 4,
                        _ => 5,
                    };
                    let end = off + len - 5;
                    assert_eq!(bytes[end], 0x7e, "{vname} footer at {end}");
                    let mut r = Reader::new(&bytes[off + hdr..end], (off + hdr) as u64);
                    let mut n = std::collections::BTreeMap::<&str, u64>::new();
                    let mut eos = false;
                    while r.remaining() > 0 {
                        let at = r.offset();
                        let x = decode_record(&mut r, &mut rch, &ctx)
                            .unwrap_or_else(|e| panic!("{ver}/{vname} at {at}: {e}"));
                        records += 1;
                        assert!(!eos, "{vname}: record after EOS at {at}");
                        let key = match x.body {
                            RamBody::Zero { .. } => "zero",
                            RamBody::Page(_) => "page",
                            RamBody::Xbzrle(_) => "xbzrle",
                            RamBody::Compressed(_) => "compress",
                            RamBody::MemSize(_) => "mem_size",
                            RamBody::MultifdFlush => "multifd_flush",
                            RamBody::Eos => {
                                eos = true;
                                "eos"
                            }
                            RamBody::Hook => unreachable!(),
                        };
                        *n.entry(key).or_default() += 1;
                        if let RamBody::MemSize(list) = x.body {
                            let want = &counts["mem_size"];
                            assert_eq!(x.addr, want["total"].as_u64().unwrap(), "{vname}");
                            let blocks: Vec<_> = list.iter().collect();
                            let wb = want["blocks"].as_array().unwrap();
                            assert_eq!(blocks.len(), wb.len(), "{vname}");
                            for (b, w) in blocks.iter().zip(wb) {
                                assert_eq!(b.name, w["idstr"].as_str().unwrap().as_bytes());
                                assert_eq!(b.used_length, w["used_length"].as_u64().unwrap());
                                assert_eq!(b.mr_addr.is_some(), ignore_shared);
                            }
                        }
                        // Re-encoding gives the same bytes.
                        let mut again = Vec::new();
                        x.encode(&mut again);
                        let s = (at - (off + hdr) as u64) as usize + off + hdr;
                        assert_eq!(&again[..], &bytes[s..s + again.len()], "{vname} at {at}");
                        if !rebuild || !x.is_page() || x.block(&rch) != Some(&block[..]) {
                            continue;
                        }
                        let a = x.addr as usize;
                        let page = &mut ram[a..a + TPS];
                        match x.body {
                            RamBody::Zero { fill } => page.fill(fill),
                            RamBody::Page(d) => page.copy_from_slice(d),
                            RamBody::Xbzrle(d) => {
                                xbzrle_apply(d, page, at).unwrap();
                            }
                            #[cfg(feature = "compress")]
                            RamBody::Compressed(z) => {
                                qmig_protocol::ram::compress_page_decode(z, page, at).unwrap()
                            }
                            _ => unreachable!(),
                        }
                    }
                    for key in ["zero", "page", "xbzrle", "compress", "multifd_flush"] {
                        assert_eq!(
                            n.get(key).copied().unwrap_or(0),
                            counts[key].as_u64().unwrap_or(0),
                            "{ver}/{vname} section at {off}: {key}"
                        );
                    }
                    assert_eq!(eos, counts["eos"].as_bool().unwrap(), "{vname}");
                    sections += 1;
                }
            }
            if rebuild {
                let got: String = Sha256::digest(&ram)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(
                    got,
                    fr["sha256"].as_str().unwrap(),
                    "{ver}/{vname}: rebuilt RAM"
                );
                rebuilt.push(format!("{ver}/{vname}"));
            }
        }
    }
    eprintln!("{sections} RAM sections, {records} records; RAM rebuilt for {rebuilt:?}");
    assert!(sections > 100);
    assert!(rebuilt.len() >= 16, "{rebuilt:?}");
}

#[test]
fn sender_side_continue_matches_what_the_receiver_accepts() {
    let p = Profile::QEMU_10;
    let limits = Limits::DEFAULT;
    let ctx = RamCtx::new(&p, &limits);
    let page = [1u8; TPS];
    let mut tx = RamChannel::new();
    let mut wire = Vec::new();
    let blocks: [&[u8]; 5] = [b"a", b"a", b"b", b"b", b"a"];
    for (i, b) in blocks.iter().enumerate() {
        let (flags, name) = tx.sender_flags(RamFlags::PAGE, b);
        RamRecord {
            flags,
            addr: (i * TPS) as u64,
            name,
            body: RamBody::Page(&page),
        }
        .encode(&mut wire);
    }
    let named: Vec<bool> = {
        let mut rx = RamChannel::new();
        let mut r = Reader::new(&wire, 0);
        blocks
            .iter()
            .map(|b| {
                let rec = decode_record(&mut r, &mut rx, &ctx).unwrap();
                assert_eq!(rec.block(&rx), Some(*b));
                rec.name.is_some()
            })
            .collect()
    };
    assert_eq!(named, [true, false, true, false, true]);
    assert_eq!(wire.len(), 5 * (8 + TPS) + 3 * 2);
}

proptest! {
    /// Host-page assembly against a model: in-order target pages yield exactly the host page
    /// built from them; any out-of-sequence page is RAM-HOSTPAGE and changes nothing; reset
    /// drops the partial page.
    #[test]
    fn hostpage_assembly_matches_model(
        per_host in 1usize..8,
        ops in prop::collection::vec((0u8..10, any::<u8>(), 0u64..4), 1..80),
    ) {
        use qmig_protocol::hostpage::{HostPageAssembler, TargetPage};
        const T: usize = 16;
        let hp = (per_host * T) as u64;
        let mut buf = vec![0u8; 8 * T];
        let mut a = HostPageAssembler::new(&mut buf, T);
        // Model: (host page index, pages so far).
        let mut model: Option<(u64, Vec<Vec<u8>>)> = None;
        for (op, byte, host) in ops {
            if op == 0 {
                prop_assert_eq!(a.reset(), model.is_some());
                model = None;
                continue;
            }
            let next = model.as_ref().map_or(0, |m| m.1.len() as u64);
            let base = model.as_ref().map_or(host, |m| m.0);
            // op 1: another host page while one is partial, or a start in the middle of a host
            // page; op 2: a skipped target page; otherwise the next target page.
            let (hidx, k) = match (op, model.is_some()) {
                (1, true) => (base + 1, next),
                (1, false) => (base, 1),
                (2, _) if next + 1 < per_host as u64 => (base, next + 1),
                _ => (base, next),
            };
            let k = if k >= per_host as u64 { next } else { k };
            let off = hidx * hp + k * T as u64;
            let right = hidx == base && k == next;
            let page = if byte % 3 == 0 { vec![0u8; T] } else { vec![byte; T] };
            let tp = if byte % 3 == 0 { TargetPage::Zero { fill: 0 } } else { TargetPage::Data(&page) };
            let got = a.push(b"blk", hp, off, tp, 7).map(|o| o.map(|h| (h.offset, h.data.map(|d| d.to_vec()), h.all_zero)));
            if !right {
                if per_host == 1 {
                    // No assembly: every aligned page passes through.
                    prop_assert!(got.is_ok());
                } else {
                    prop_assert_eq!(got.unwrap_err().rule.id(), "RAM-HOSTPAGE");
                }
                continue;
            }
            let m = model.get_or_insert_with(|| (base, Vec::new()));
            m.1.push(page.clone());
            if m.1.len() == per_host {
                let (b, pages) = model.take().unwrap();
                let all_zero = pages.iter().all(|p| p.iter().all(|&x| x == 0));
                let got = got.unwrap().unwrap();
                prop_assert_eq!(got.0, b * hp);
                if per_host > 1 {
                    prop_assert_eq!(got.1.unwrap(), pages.concat());
                }
                prop_assert_eq!(got.2, all_zero && (per_host > 1 || byte % 3 == 0));
            } else {
                prop_assert_eq!(got.unwrap(), None);
            }
        }
    }
}
