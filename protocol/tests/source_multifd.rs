//! Multifd on the source machine: a `Source` with multifd feeds a `Destination` with multifd
//! (the destination machine's sync rules) over the main channel and N connections, in both
//! profiles; the guest memory ends byte-identical, with pages dirtied between rounds, zero and
//! data pages mixed, two blocks; and the connections carry exactly the init packets, page
//! packets and SYNC packets the rules ask for.

mod harness;

use harness::Mem;
use qmig_protocol::machine::source::MultifdSourceConfig;
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, Event, Instant, MigrationStatus as S, MultifdConfig,
    RamBlockSpec, Source, SourceConfig,
};
use qmig_protocol::multifd::{MultifdDecoder, MultifdItem};
use qmig_protocol::Profile;

const TPS: usize = 4096;

fn blocks() -> Vec<RamBlockSpec> {
    vec![
        RamBlockSpec::new("pc.ram", 1200 * TPS as u64, TPS as u64),
        RamBlockSpec::new("vga.vram", 70 * TPS as u64, TPS as u64),
    ]
}

/// Data in most pages, every third page zero, the rest a pattern.
fn fill(mem: &mut Mem, seed: u8) {
    for (b, m) in mem.blocks.iter_mut().enumerate() {
        for (p, page) in m.chunks_mut(TPS).enumerate() {
            if p % 3 == 0 {
                page.fill(0);
            } else {
                for (i, x) in page.iter_mut().enumerate() {
                    *x = (i as u8) ^ (p as u8) ^ (b as u8) ^ seed;
                }
            }
        }
    }
}

struct Run {
    main: Vec<u8>,
    conns: Vec<Vec<u8>>,
    syncs: u64,
    zero_sent: u64,
}

/// Migrates with `channels` connections; dirties pages 0..300 of pc.ram (new content) after the
/// first round. Returns the bytes of every channel.
fn migrate(profile: Profile, channels: u8) -> Run {
    let blocks = blocks();
    let mut src_mem = Mem::new(&blocks, TPS);
    fill(&mut src_mem, 1);
    let mut cfg = SourceConfig::new(profile, "pc-q35-7.2", blocks.clone(), false);
    cfg.multifd = Some(MultifdSourceConfig::new(channels));
    let mut src = Source::new(cfg);
    assert_eq!(src.multifd_channels(), channels as usize);
    let mut dcfg = DestinationConfig::new(profile, "pc-q35-7.2", blocks.clone(), false);
    dcfg.multifd = Some(MultifdConfig::new(&profile, channels));
    let mut dst = Destination::new(dcfg).expect("config");
    let mut dst_mem = Mem::new(&blocks, TPS);
    src.handle_channel_opened(Instant(0)).unwrap();
    dst.handle_channel_opened(Instant(0)).unwrap();

    let n = channels as usize;
    let mut all = vec![Vec::new(); n + 1];
    let mut buf = vec![Vec::new(); n + 1];
    let mut rounds = 0;
    for step in 1u64..100_000 {
        let now = Instant(step);
        let mut main = Vec::new();
        src.poll_transmit(&src_mem, &mut main, 200_000);
        all[0].extend_from_slice(&main);
        buf[0].extend_from_slice(&main);
        for ch in 0..n {
            let mut b = Vec::new();
            src.poll_transmit_multifd(ch, &mut b);
            all[ch + 1].extend_from_slice(&b);
            buf[ch + 1].extend_from_slice(&b);
        }
        // Feed the destination until nothing moves (the main channel and the connections wait
        // for each other at sync points).
        loop {
            let mut moved = 0;
            let used = dst.handle_stream(now, &buf[0], &mut dst_mem).expect("main");
            buf[0].drain(..used);
            moved += used;
            for ch in 0..n {
                let used = dst
                    .handle_multifd(now, ch, &buf[ch + 1], &mut dst_mem)
                    .expect("multifd");
                buf[ch + 1].drain(..used);
                moved += used;
            }
            if moved == 0 {
                break;
            }
        }
        while let Some(e) = src.poll_event() {
            if e == Event::NeedDirtySync {
                rounds += 1;
                if rounds == 1 {
                    fill(&mut src_mem, 7);
                    let mut d = qmig_protocol::bitmap::PageBitmap::new(1200);
                    d.set_range(0, 300);
                    src.handle_dirty_sync(0, &d);
                } else {
                    src.handle_control(now, Control::Complete).unwrap();
                }
            }
        }
        while dst.poll_event().is_some() {}
        if src.status() == S::Completed && dst.status() == S::Completed {
            break;
        }
    }
    assert_eq!(src.status(), S::Completed);
    assert_eq!(dst.status(), S::Completed, "destination completes");
    assert!(buf.iter().all(|b| b.is_empty()), "every byte consumed");
    // Only pages 0..300 of pc.ram were re-sent with the new content: the rest keeps seed 1.
    let mut want = Mem::new(&blocks, TPS);
    fill(&mut want, 1);
    let mut new = Mem::new(&blocks, TPS);
    fill(&mut new, 7);
    want.blocks[0][..300 * TPS].copy_from_slice(&new.blocks[0][..300 * TPS]);
    assert!(src_mem.blocks[0][300 * TPS..] != want.blocks[0][300 * TPS..]);
    // The source's memory was fully rewritten (seed 7) but only dirty pages resent.
    assert_eq!(
        dst_mem.blocks[0][..300 * TPS],
        src_mem.blocks[0][..300 * TPS]
    );
    assert_eq!(dst_mem.blocks, want.blocks, "destination memory");
    assert!(dst.multifd_packets() > 0);
    Run {
        main: all.remove(0),
        conns: all,
        syncs: src.multifd_syncs(),
        zero_sent: src.zero_pages_sent(),
    }
}

/// Decodes one connection: init packet with `id`, then packets; returns (packet numbers, SYNC
/// count, normal pages, zero pages).
fn decode_conn(profile: Profile, id: u8, bytes: &[u8]) -> (Vec<u64>, u64, u64, u64) {
    let mut d = MultifdDecoder::new(profile, Default::default());
    let mut pos = 0;
    let (mut nums, mut syncs, mut normal, mut zero) = (Vec::new(), 0, 0, 0);
    let mut first = true;
    while pos < bytes.len() {
        let (item, n) = d.decode(&bytes[pos..]).expect("decodes");
        pos += n;
        match item {
            MultifdItem::Init(p) => {
                assert!(first);
                assert_eq!(p.id, id);
                assert_eq!(p.uuid, [0; 16]);
            }
            MultifdItem::Ram(p) => {
                assert!(!first);
                nums.push(p.header.packet_num.get());
                assert_eq!(p.header.pages_alloc.get(), 128);
                if p.is_sync() {
                    syncs += 1;
                    assert_eq!(p.normal_pages() + p.zero_pages(), 0);
                } else {
                    assert!(p.normal_pages() + p.zero_pages() > 0);
                    assert!(p.normal_pages() + p.zero_pages() <= 128);
                }
                normal += p.normal_pages() as u64;
                zero += p.zero_pages() as u64;
            }
            MultifdItem::DeviceState { .. } => panic!("no device state"),
        }
        first = false;
    }
    (nums, syncs, normal, zero)
}

fn check(profile: Profile, channels: u8) {
    let run = migrate(profile, channels);
    let mut nums = Vec::new();
    let (mut normal, mut zero) = (0, 0);
    for (i, c) in run.conns.iter().enumerate() {
        let (n, s, nn, z) = decode_conn(profile, i as u8, c);
        assert_eq!(s, run.syncs, "SYNC packets on connection {i}");
        assert!(
            n.windows(2).all(|w| w[0] < w[1]),
            "increasing packet numbers"
        );
        nums.extend(n);
        normal += nn;
        zero += z;
    }
    nums.sort_unstable();
    assert_eq!(
        nums,
        (0..nums.len() as u64).collect::<Vec<_>>(),
        "one shared counter"
    );
    // Pages sent: 1270 in round 1, 300 re-sent; a third of them zero.
    let zeros_r1 =
        (0..1200).filter(|p| p % 3 == 0).count() + (0..70).filter(|p| p % 3 == 0).count();
    let zeros_r2 = (0..300).filter(|p| p % 3 == 0).count();
    let zero_total = (zeros_r1 + zeros_r2) as u64;
    assert_eq!(run.zero_sent, zero_total);
    assert_eq!(normal + zero_total, 1570);
    if profile.version == qmig_protocol::profile::Version::V7_2 {
        assert_eq!(zero, 0, "7.2: zero pages on the main channel");
    } else {
        assert_eq!(zero, zero_total, "10.x: zero pages in the packets");
    }
    assert!(run.syncs >= 3, "setup, rounds, completion: {}", run.syncs);
    println!(
        "{:?} x{channels}: main {} B, {} SYNC rounds, {} packets",
        profile.version,
        run.main.len(),
        run.syncs,
        nums.len()
    );
}

#[test]
fn multifd_source_to_destination_7_2() {
    for ch in [1, 2, 4] {
        check(Profile::QEMU_7_2, ch);
    }
}

#[test]
fn multifd_source_to_destination_10() {
    for ch in [1, 3] {
        check(Profile::QEMU_10, ch);
    }
}

/// With postcopy-ram, multifd is off (QEMU refuses the combination).
#[test]
fn multifd_is_ignored_with_postcopy() {
    let mut cfg = SourceConfig::new(Profile::QEMU_7_2, "pc", blocks(), true);
    cfg.multifd = Some(MultifdSourceConfig::new(2));
    assert_eq!(Source::new(cfg).multifd_channels(), 0);
}
