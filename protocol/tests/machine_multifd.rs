//! Multifd on the destination machine: the real QEMU multifd captures (main `stream.bin` plus
//! `multifd-conn*.bin`) replayed through `Destination::handle_stream` and
//! `Destination::handle_multifd` in many interleavings give the manifest's `final_ram`; and the
//! rules of the multifd connections (MFD-CHANNEL, MFD-FLAGS, MFD-SYNC, RAM-OFFSET on a slot)
//! fail the migration with the rule and the offset of the offending field.

mod common;
mod harness;

use common::VectorDir;
use harness::Mem;
use qmig_protocol::machine::{
    Destination, DestinationConfig, Instant, MigrationStatus as S, MultifdConfig, RamBlockSpec,
};
use qmig_protocol::ram::RamBody;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::Rule;
use sha2::{Digest, Sha256};

const TPS: u64 = 4096;

/// Which input goes next, by step number.
type Order = Box<dyn FnMut(usize) -> usize>;

fn blocks_of(v: &VectorDir, stream: &[u8]) -> Vec<RamBlockSpec> {
    let mut d = StreamDecoder::new(Channel::Main, v.profile(), Default::default());
    let mut pos = 0;
    loop {
        let (item, n) = d.decode(&stream[pos..]).expect("stream decodes");
        pos += n;
        if let Item::Ram(r) = item {
            if let RamBody::MemSize(list) = r.body {
                return list
                    .iter()
                    .map(|b| {
                        RamBlockSpec::new(std::str::from_utf8(b.name).unwrap(), b.used_length, TPS)
                    })
                    .collect();
            }
        }
    }
}

fn final_ram_ok(v: &VectorDir, blocks: &[RamBlockSpec], mem: &Mem) {
    let fr = &v.manifest["final_ram"];
    let mut wanted = vec![(
        fr["block"].as_str().unwrap(),
        fr["sha256"].as_str().unwrap(),
    )];
    for o in fr["other_blocks"].as_array().into_iter().flatten() {
        wanted.push((o["block"].as_str().unwrap(), o["sha256"].as_str().unwrap()));
    }
    for (name, sha) in wanted {
        let i = blocks.iter().position(|b| b.name == name).unwrap();
        assert_eq!(
            common::hex(&Sha256::digest(&mem.blocks[i])),
            sha,
            "{}: final RAM of {name}",
            v.id()
        );
    }
}

fn multifd_vectors() -> Vec<VectorDir> {
    let v: Vec<_> = common::vectors()
        .into_iter()
        .filter(|v| v.name.contains("multifd"))
        .collect();
    assert_eq!(v.len(), 2, "the 7.2 and 10.0 multifd captures");
    v
}

fn conns_of(v: &VectorDir) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 1.. {
        let f = format!("multifd-conn{i}.bin");
        if !v.has(&f) {
            break;
        }
        out.push(v.read(&f));
    }
    out
}

fn destination(v: &VectorDir, blocks: &[RamBlockSpec], channels: u8) -> Destination {
    let machine = v.manifest["machine"]["type"].as_str().unwrap().to_string();
    let mut cfg = DestinationConfig::new(v.profile(), &machine, blocks.to_vec(), false);
    cfg.multifd = Some(MultifdConfig::new(&v.profile(), channels));
    let mut dst = Destination::new(cfg).expect("config");
    dst.handle_channel_opened(Instant(0)).unwrap();
    dst
}

/// Feeds every input in `chunk`-byte steps, `order` choosing which input goes next, until no
/// input makes progress. Returns the bytes left per input (main first), or the first violation
/// with the input it came from.
fn try_drive(
    dst: &mut Destination,
    mem: &mut Mem,
    inputs: &[Vec<u8>],
    chunk: usize,
    order: &mut dyn FnMut(usize) -> usize,
) -> Result<Vec<usize>, (usize, qmig_protocol::Violation)> {
    let n = inputs.len();
    let mut fed = vec![0usize; n];
    let mut buf: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut step = 0usize;
    let mut idle = 0usize;
    while idle < 64 * n {
        let i = order(step) % n;
        step += 1;
        let take = chunk.min(inputs[i].len() - fed[i]);
        buf[i].extend_from_slice(&inputs[i][fed[i]..fed[i] + take]);
        fed[i] += take;
        let used = if i == 0 {
            dst.handle_stream(Instant(step as u64), &buf[0], mem)
        } else {
            dst.handle_multifd(Instant(step as u64), i - 1, &buf[i], mem)
        }
        .map_err(|e| (i, e))?;
        buf[i].drain(..used);
        if take == 0 && used == 0 {
            idle += 1;
        } else {
            idle = 0;
        }
    }
    Ok((0..n)
        .map(|i| inputs[i].len() - fed[i] + buf[i].len())
        .collect())
}

fn drive(
    dst: &mut Destination,
    mem: &mut Mem,
    inputs: &[Vec<u8>],
    chunk: usize,
    order: &mut dyn FnMut(usize) -> usize,
) -> Vec<usize> {
    try_drive(dst, mem, inputs, chunk, order).unwrap_or_else(|(i, e)| panic!("input {i}: {e}"))
}

/// Both captures, in several interleavings (main first, channels first, round robin with small
/// and large chunks, a skewed order): every byte consumed, completed, `final_ram` equal.
#[test]
fn multifd_captures_replay_to_final_ram() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        assert!(conns.len() >= 2, "{}", v.id());
        let mut inputs = vec![stream.clone()];
        inputs.extend(conns.iter().cloned());
        let n = inputs.len();
        let orders: Vec<(&str, usize, Order)> = vec![
            ("round robin 64 KiB", 65536, Box::new(|s| s)),
            ("round robin 1000 B", 1000, Box::new(|s| s)),
            (
                "main-heavy",
                4096,
                Box::new(move |s| if s % 5 == 0 { s / 5 } else { 0 }),
            ),
            (
                "last channel first",
                65536,
                Box::new(move |s| n - 1 - s % n),
            ),
        ];
        for (label, chunk, mut order) in orders {
            let mut dst = destination(&v, &blocks, conns.len() as u8);
            let mut mem = Mem::new(&blocks, TPS as usize);
            let left = drive(&mut dst, &mut mem, &inputs, chunk, &mut *order);
            assert_eq!(left, vec![0; n], "{} {label}: every byte consumed", v.id());
            assert_eq!(dst.status(), S::Completed, "{} {label}", v.id());
            assert!(dst.multifd_packets() > 0, "{} {label}", v.id());
            final_ram_ok(&v, &blocks, &mem);
        }
        println!(
            "{}: {} channels, final_ram equal in 4 orders",
            v.id(),
            conns.len()
        );
    }
}

/// Main channel only: it waits for the init packets and consumes nothing more (the migration
/// must not complete without the channels' pages).
#[test]
fn main_channel_waits_for_every_channel() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        assert_eq!(dst.handle_stream(Instant(1), &stream, &mut mem), Ok(0));
        assert!(dst.main_waits_for_multifd());
        // One channel's init packet only: still waiting.
        assert_eq!(
            dst.handle_multifd(Instant(2), 0, &conns[0][..64], &mut mem),
            Ok(64)
        );
        assert_eq!(dst.handle_stream(Instant(3), &stream, &mut mem), Ok(0));
        // All init packets: the main channel runs up to its first sync point and stops there.
        for (i, c) in conns.iter().enumerate().skip(1) {
            assert_eq!(
                dst.handle_multifd(Instant(4), i, &c[..64], &mut mem),
                Ok(64)
            );
        }
        let used = dst.handle_stream(Instant(5), &stream, &mut mem).unwrap();
        assert!(used > 0 && used < stream.len(), "{}: {used}", v.id());
        assert!(dst.main_waits_for_multifd(), "{}", v.id());
        assert_eq!(dst.status(), S::Active);
    }
}

fn expect_failure(dst: &Destination, e: qmig_protocol::Violation, rule: Rule, offset: u64) {
    assert_eq!((e.rule, e.offset), (rule, offset), "{e}");
    assert_eq!(dst.status(), S::Failed);
}

#[test]
fn init_packet_channel_ids_are_checked() {
    let v = &multifd_vectors()[0];
    let stream = v.read("stream.bin");
    let blocks = blocks_of(v, &stream);
    let conns = conns_of(v);
    // invalid: MFD-CHANNEL, an id twice.
    let mut dst = destination(v, &blocks, 2);
    let mut mem = Mem::new(&blocks, TPS as usize);
    let init = &conns[0][..64];
    assert_eq!(dst.handle_multifd(Instant(1), 0, init, &mut mem), Ok(64));
    let e = dst
        .handle_multifd(Instant(2), 1, init, &mut mem)
        .unwrap_err();
    expect_failure(&dst, e, Rule::MfdChannel, 24);
    // invalid: MFD-CHANNEL, an id past multifd-channels.
    let mut dst = destination(v, &blocks, 2);
    let mut bad = init.to_vec();
    bad[24] = 2;
    let e = dst
        .handle_multifd(Instant(1), 0, &bad, &mut mem)
        .unwrap_err();
    expect_failure(&dst, e, Rule::MfdChannel, 24);
    // invalid: MFD-CHANNEL, a connection the configuration does not have.
    let mut dst = destination(v, &blocks, 2);
    let e = dst
        .handle_multifd(Instant(1), 2, init, &mut mem)
        .unwrap_err();
    expect_failure(&dst, e, Rule::MfdChannel, 0);
    // invalid: MFD-MAGIC through the machine.
    let mut dst = destination(v, &blocks, 2);
    bad = init.to_vec();
    bad[0] ^= 0xff;
    let e = dst
        .handle_multifd(Instant(1), 0, &bad, &mut mem)
        .unwrap_err();
    expect_failure(&dst, e, Rule::MfdMagic, 0);
}

/// Offset of the first packet with pages on a connection (after the init packet).
fn first_data_packet(conn: &[u8]) -> usize {
    let mut at = 64;
    loop {
        let normal = u32::from_be_bytes(conn[at + 16..at + 20].try_into().unwrap()) as usize;
        if normal > 0 {
            return at;
        }
        at += 320 + 128 * 8 + normal * TPS as usize;
    }
}

#[test]
fn hostile_packets_fail_with_rule_and_offset() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        let c = &conns[0];
        let p = first_data_packet(c);
        let run = |patch: &dyn Fn(&mut Vec<u8>)| {
            let mut dst = destination(&v, &blocks, conns.len() as u8);
            let mut mem = Mem::new(&blocks, TPS as usize);
            let mut inputs = vec![stream.clone()];
            inputs.extend(conns.iter().cloned());
            patch(&mut inputs[1]);
            let (i, e) = try_drive(&mut dst, &mut mem, &inputs, 65536, &mut |s| s).unwrap_err();
            assert_eq!(i, 1, "{e}");
            (dst, e)
        };
        // invalid: RAM-OFFSET, a page slot past the block.
        let (dst, e) = run(&|b| b[p + 320..p + 328].copy_from_slice(&u64::MAX.to_be_bytes()));
        expect_failure(&dst, e, Rule::RamOffset, p as u64 + 320);
        // invalid: RAM-BLOCK-UNKNOWN, a block name the destination does not have.
        let (dst, e) = run(&|b| b[p + 64] = b'#');
        expect_failure(&dst, e, Rule::RamBlockUnknown, p as u64 + 64);
        // invalid: MFD-FLAGS, compression the destination did not negotiate.
        let (dst, e) = run(&|b| b[p + 11] |= 2);
        expect_failure(&dst, e, Rule::MfdFlags, p as u64 + 8);
        // invalid: MFD-PAGES, more pages than slots.
        let (dst, e) = run(&|b| b[p + 12..p + 16].copy_from_slice(&1000u32.to_be_bytes()));
        expect_failure(&dst, e, Rule::MfdPages, p as u64 + 12);
        // Truncated: nothing past the whole items is consumed, no failure.
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        assert_eq!(
            dst.handle_multifd(Instant(1), 0, &c[..p + 100], &mut mem),
            Ok(p)
        );
        assert_ne!(dst.status(), S::Failed);
    }
}

/// A channel that never sends its SYNC packet: the main channel stays at the sync point and
/// never completes (nothing past it is consumed).
#[test]
fn missing_sync_holds_the_main_channel() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        for (i, c) in conns.iter().enumerate() {
            let cut = if i == 0 { 64 } else { c.len() };
            dst.handle_multifd(Instant(1), i, &c[..cut], &mut mem)
                .unwrap();
        }
        let used = dst.handle_stream(Instant(2), &stream, &mut mem).unwrap();
        assert!(used < stream.len());
        assert_ne!(dst.status(), S::Completed, "{}", v.id());
        assert!(dst.main_waits_for_multifd());
    }
}

/// invalid: MFD-SYNC, a packet with pages after the migration completed: rejected at its offset;
/// the completed migration and its memory stay as they were.
#[test]
fn pages_after_completion_are_rejected() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        let mut inputs = vec![stream.clone()];
        inputs.extend(conns.iter().cloned());
        drive(&mut dst, &mut mem, &inputs, 65536, &mut |s| s);
        assert_eq!(dst.status(), S::Completed);
        let before = mem.blocks.clone();
        let p = first_data_packet(&conns[0]);
        let len = 320
            + 128 * 8
            + TPS as usize
                * u32::from_be_bytes(conns[0][p + 16..p + 20].try_into().unwrap()) as usize;
        let e = dst
            .handle_multifd(Instant(9), 0, &conns[0][p..p + len], &mut mem)
            .unwrap_err();
        assert_eq!((e.rule, e.offset), (Rule::MfdSync, conns[0].len() as u64));
        assert_eq!(dst.status(), S::Completed);
        assert!(mem.blocks == before, "{}: memory unchanged", v.id());
    }
}

/// A connection that ends mid-packet fails the migration (STREAM-TRUNCATED at the packet's
/// offset); one that ends on a packet boundary before delivering a SYNC the main channel waits
/// for fails it with MFD-SYNC.
#[test]
fn closed_connections_fail_the_migration_when_needed() {
    for v in multifd_vectors() {
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let conns = conns_of(&v);
        let p = first_data_packet(&conns[0]);
        // invalid: STREAM-TRUNCATED, a multifd connection cut inside a packet.
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        let mut inputs = vec![stream.clone()];
        inputs.extend(conns.iter().cloned());
        inputs[1].truncate(p + 100);
        let left = drive(&mut dst, &mut mem, &inputs, 65536, &mut |s| s);
        assert_eq!(left[1], 100, "{}", v.id());
        let e = dst.handle_multifd_closed(Instant(99), 0, left[1]).unwrap();
        assert_eq!((e.rule, e.offset), (Rule::StreamTruncated, p as u64));
        assert_eq!(dst.status(), S::Failed);
        // invalid: MFD-SYNC, a connection closed after its init packet only.
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        inputs[1].truncate(64);
        let left = drive(&mut dst, &mut mem, &inputs, 65536, &mut |s| s);
        assert_eq!(left[1], 0);
        assert_ne!(dst.status(), S::Failed);
        let e = dst.handle_multifd_closed(Instant(99), 0, 0).unwrap();
        assert_eq!((e.rule, e.offset, e.value), (Rule::MfdSync, 64, 0));
        assert_eq!(dst.status(), S::Failed);
        // valid: MFD-SYNC, connections closed once the migration completed.
        let mut dst = destination(&v, &blocks, conns.len() as u8);
        let mut mem = Mem::new(&blocks, TPS as usize);
        let mut inputs = vec![stream.clone()];
        inputs.extend(conns.iter().cloned());
        drive(&mut dst, &mut mem, &inputs, 65536, &mut |s| s);
        assert_eq!(dst.status(), S::Completed, "{}", v.id());
        for i in 0..conns.len() {
            assert_eq!(dst.handle_multifd_closed(Instant(60), i, 0), None);
        }
        assert_eq!(dst.status(), S::Completed);
    }
}
