//! The source machine's page encodings end to end: a source with `xbzrle` (or 7.2's
//! `compress`, or `x-ignore-shared`) over guest memory that changes between rounds; its whole
//! stream decodes with the crate's `StreamDecoder`, and the pages it carries, applied in order
//! (XBZRLE deltas onto the previous contents, zlib pages inflated), rebuild the memory as it was
//! when the migration completed, byte for byte. Also: the XBZRLE encoder's overflow decision
//! against the length of the unbounded delta.

use proptest::prelude::*;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{Control, Event, Instant, RamBlockSpec, Source, SourceConfig};
use qmig_protocol::machine::{MigrationStatus, SourceMemory};
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::page_codec::PageCaps;
use qmig_protocol::ram::{xbzrle_apply, xbzrle_encode, RamBody};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};

const TPS: usize = 4096;

struct Mem(Vec<Vec<u8>>);

impl SourceMemory for Mem {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        &self.0[block][offset as usize..offset as usize + TPS]
    }
}

/// Counts of the record kinds a stream carried.
#[derive(Default, Debug)]
struct Kinds {
    page: u64,
    zero: u64,
    xbzrle: u64,
    compressed: u64,
}

/// Decodes `stream` and applies its RAM records onto `image` (one buffer per block, in
/// MEM_SIZE order, named `names`).
fn apply(stream: &[u8], profile: Profile, names: &[&str], image: &mut [Vec<u8>]) -> Kinds {
    let mut dec = StreamDecoder::new(Channel::Main, profile, Limits::DEFAULT);
    let mut at = 0;
    let mut k = Kinds::default();
    loop {
        let (item, n) = dec
            .decode(&stream[at..])
            .unwrap_or_else(|e| panic!("at {at}: {e:?}"));
        let abs = at as u64;
        at += n;
        match item {
            Item::Eof => break,
            Item::Ram(r) => {
                let body = r.body;
                let name = r.block(dec.ram()).map(|b| b.to_vec());
                let Some(name) = name else { continue };
                let b = names
                    .iter()
                    .position(|x| x.as_bytes() == name.as_slice())
                    .unwrap();
                let off = r.addr as usize;
                let page = &mut image[b][off..off + TPS];
                match body {
                    RamBody::Page(d) => {
                        k.page += 1;
                        page.copy_from_slice(d)
                    }
                    RamBody::Zero { fill } => {
                        k.zero += 1;
                        page.fill(fill)
                    }
                    RamBody::Xbzrle(d) => {
                        k.xbzrle += 1;
                        xbzrle_apply(d, page, abs).unwrap();
                    }
                    #[cfg(feature = "compress")]
                    RamBody::Compressed(z) => {
                        k.compressed += 1;
                        qmig_protocol::ram::compress_page_decode(z, page, abs).unwrap();
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    k
}

/// Migrates `mem` with `caps`; between rounds `edit(round, mem)` changes it and returns the
/// pages it wrote; returns the stream.
fn migrate(
    profile: Profile,
    caps: PageCaps,
    mem: &mut Mem,
    rounds: usize,
    mut edit: impl FnMut(usize, &mut Mem) -> Vec<(usize, u64)>,
) -> (Vec<u8>, Source) {
    let blocks: Vec<RamBlockSpec> = mem
        .0
        .iter()
        .enumerate()
        .map(|(i, m)| RamBlockSpec::new(&format!("b{i}"), m.len() as u64, TPS as u64))
        .collect();
    let mut cfg = SourceConfig::new(profile, "pc", blocks, false);
    cfg.page_caps = caps;
    cfg.pages_per_section = 7;
    let mut s = Source::new(cfg);
    s.handle_channel_opened(Instant(0)).unwrap();
    let mut out = Vec::new();
    let mut round = 0;
    loop {
        s.poll_transmit(mem, &mut out, usize::MAX);
        let mut need_sync = false;
        while let Some(e) = s.poll_event() {
            need_sync |= e == Event::NeedDirtySync;
        }
        if s.status() == MigrationStatus::Completed {
            break;
        }
        assert!(need_sync, "{:?}", s.status());
        if round == rounds {
            s.handle_control(Instant(1), Control::Complete).unwrap();
            continue;
        }
        let written = edit(round, mem);
        round += 1;
        for (b, m) in mem.0.iter().enumerate() {
            let mut bm = qmig_protocol::bitmap::PageBitmap::new((m.len() / TPS) as u64);
            for &(wb, p) in &written {
                if wb == b {
                    bm.set(p);
                }
            }
            s.handle_dirty_sync(b, &bm);
        }
    }
    (out, s)
}

fn xbzrle_caps() -> PageCaps {
    PageCaps {
        xbzrle_cache_size: Some(1 << 20),
        ..PageCaps::default()
    }
}

#[test]
fn xbzrle_deltas_rebuild_memory_that_changes_between_rounds() {
    let pages = 24;
    let mut mem = Mem(vec![
        (0..pages * TPS).map(|i| (i / 7) as u8).collect(),
        (0..8 * TPS)
            .map(|i| if i / TPS == 6 { 0x33 } else { 0 })
            .collect(),
    ]);
    let (stream, s) = migrate(Profile::QEMU_7_2, xbzrle_caps(), &mut mem, 4, |r, m| {
        // Round 0: every page rewritten slightly (cache misses, pages go whole); later rounds:
        // small edits (deltas), a page dirty but unchanged (skipped) and a page first sent as
        // a zero page before XBZRLE started (a miss, then deltas).
        let mut w = Vec::new();
        for p in 0..24u64 {
            let at = p as usize * TPS + (r * 97) % TPS;
            m.0[0][at] ^= 0x5a;
            w.push((0, p));
        }
        m.0[1][3 * TPS + r] = r as u8 + 1;
        w.push((1, 3));
        w.push((1, 6)); // dirty, but unchanged
        w
    });
    let mut image = vec![vec![0xee; pages * TPS], vec![0xee; 8 * TPS]];
    let k = apply(&stream, Profile::QEMU_7_2, &["b0", "b1"], &mut image);
    assert_eq!(image[0], mem.0[0]);
    assert_eq!(image[1], mem.0[1]);
    let c = s.page_codec();
    // Round 0's resends miss the cache (XBZRLE starts after the first round) and go whole;
    // rounds 1..3 send 25 deltas each and skip b1's page 6 (dirty but unchanged).
    assert_eq!(k.xbzrle, c.xbzrle_pages);
    let counts = (
        c.xbzrle_misses,
        c.xbzrle_pages,
        c.xbzrle_skipped,
        c.xbzrle_overflows,
    );
    assert_eq!(counts, (26, 75, 3, 0));
    assert_eq!(k.compressed, 0);
    assert_eq!(k.page + k.zero + k.xbzrle, s.pages_sent());
}

#[cfg(feature = "compress")]
#[test]
fn compress_pages_rebuild_memory() {
    let mut mem = Mem(vec![
        (0..16 * TPS).map(|i| (i % 251) as u8).collect(),
        (0..4 * TPS).map(|i| (i / 3) as u8).collect(),
    ]);
    let caps = PageCaps {
        compress_level: Some(1),
        ..PageCaps::default()
    };
    let (stream, s) = migrate(Profile::QEMU_7_2, caps, &mut mem, 2, |r, m| {
        m.0[0][5 * TPS + r] ^= 1;
        m.0[0][9 * TPS..10 * TPS].fill(0);
        vec![(0, 5), (0, 9)]
    });
    let mut image = vec![vec![0xee; 16 * TPS], vec![0xee; 4 * TPS]];
    let k = apply(&stream, Profile::QEMU_7_2, &["b0", "b1"], &mut image);
    assert_eq!(image[0], mem.0[0]);
    assert_eq!(image[1], mem.0[1]);
    // The first page after each block change goes plain; every other non-zero page is
    // compressed.
    assert!(k.page >= 2 && k.page <= 4, "{k:?}");
    assert_eq!(k.compressed, s.page_codec().compressed_pages);
    assert!(k.compressed >= 16 + 4 - 2, "{k:?}");
}

#[test]
fn ignore_shared_announces_the_capability_and_block_addresses() {
    let mut mem = Mem(vec![vec![1; 2 * TPS]]);
    let caps = PageCaps {
        ignore_shared: true,
        ..PageCaps::default()
    };
    let (stream, _) = migrate(Profile::QEMU_10, caps, &mut mem, 0, |_, _| Vec::new());
    let mut dec = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut at = 0;
    let mut seen = (false, false);
    loop {
        let (item, n) = dec.decode(&stream[at..]).unwrap();
        at += n;
        match item {
            Item::Configuration(c) => seen.0 = c.has_capability(b"x-ignore-shared"),
            Item::Ram(r) if r.flags.contains(RamFlags::MEM_SIZE) => {
                let RamBody::MemSize(list) = r.body else {
                    panic!()
                };
                let b: Vec<_> = list.iter().collect();
                assert_eq!(b.len(), 1);
                assert_eq!(b[0].mr_addr, Some(0));
                seen.1 = true;
            }
            Item::Eof => break,
            _ => {}
        }
    }
    assert_eq!(seen, (true, true));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The encoder's choice against one page's cap: a delta it returns is the whole unbounded
    /// delta and fits; an overflow happens only when the unbounded delta comes within two bytes
    /// of the cap (QEMU's headroom check) or passes it.
    #[test]
    fn xbzrle_overflow_is_qemus(old in prop::collection::vec(any::<u8>(), TPS),
                                edits in prop::collection::vec((0usize..TPS, 1usize..600, 1u8..), 0..40)) {
        let mut new = old.clone();
        for (at, len, b) in edits {
            for x in &mut new[at..(at + len).min(TPS)] { *x = x.wrapping_add(b); }
        }
        let mut full = Vec::new();
        let l = xbzrle_encode(&old, &new, usize::MAX, &mut full).unwrap();
        let mut capped = Vec::new();
        match xbzrle_encode(&old, &new, TPS, &mut capped) {
            Some(n) => {
                prop_assert_eq!(n, l);
                prop_assert!(n <= TPS);
                prop_assert_eq!(&capped, &full);
            }
            None => {
                prop_assert!(l + 2 > TPS, "overflow with an unbounded delta of {}", l);
                prop_assert!(capped.is_empty());
            }
        }
    }

    /// Random edits over random rounds: the XBZRLE source's stream rebuilds the final memory.
    #[test]
    fn xbzrle_stream_rebuilds_memory(seed in any::<u64>(), rounds in 1usize..5,
                                     cache_pages in 1u64..16) {
        let pages = 12usize;
        let mut mem = Mem(vec![(0..pages * TPS).map(|i| (i as u64 ^ seed) as u8).collect()]);
        let caps = PageCaps { xbzrle_cache_size: Some(cache_pages.next_power_of_two() * TPS as u64), ..PageCaps::default() };
        let mut x = seed | 1;
        let (stream, _) = migrate(Profile::QEMU_10, caps, &mut mem, rounds, |_, m| {
            let mut w = Vec::new();
            for _ in 0..8 {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                let p = (x % pages as u64) as usize;
                let at = p * TPS + (x >> 20) as usize % TPS;
                let len = ((x >> 40) as usize % 3000).min(TPS * (p + 1) - at);
                for b in &mut m.0[0][at..at + len] { *b = b.wrapping_add((x >> 8) as u8); }
                w.push((0, p as u64));
            }
            w
        });
        let mut image = vec![vec![0xee; pages * TPS]];
        apply(&stream, Profile::QEMU_10, &["b0"], &mut image);
        prop_assert!(image[0] == mem.0[0]);
    }
}
