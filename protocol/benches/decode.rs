//! Decoder throughput: an in-memory RAM stream of page records (random page contents) and of
//! zero-page records, decoded with `ram::decode_record` (pages are borrowed, never copied), with
//! a `memcpy` of the same bytes measured alongside as the reference.
//!
//! Run: `cargo bench -p qmig-protocol --bench decode`. Results go in BENCHMARKS.md ("Decoder").

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use qmig_protocol::codes::RamFlags;
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::ram::{decode_record, RamBody, RamChannel, RamCtx, RamRecord};
use qmig_protocol::reader::Reader;
use std::time::Duration;

const TPS: usize = 4096;
/// 64 MiB of guest RAM per stream.
const PAGES: usize = 16384;

/// A RAM stream as QEMU writes it: the first record names the block, the rest CONTINUE; EOS last.
fn stream(zero: bool) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut page = vec![0u8; TPS];
    let mut out = Vec::with_capacity(PAGES * (TPS + 16));
    for i in 0..PAGES {
        let mut flags = if zero { RamFlags::ZERO } else { RamFlags::PAGE };
        if i > 0 {
            flags = flags.with(RamFlags::CONTINUE);
        }
        if !zero {
            for c in page.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        RamRecord {
            flags,
            addr: (i * TPS) as u64,
            name: (i == 0).then_some(&b"pc.ram"[..]),
            body: if zero {
                RamBody::Zero { fill: 0 }
            } else {
                RamBody::Page(&page)
            },
        }
        .encode(&mut out);
    }
    RamRecord {
        flags: RamFlags::EOS,
        addr: 0,
        name: None,
        body: RamBody::Eos,
    }
    .encode(&mut out);
    out
}

/// Decodes the whole stream; returns (pages, sum of page pointers' low bits) so nothing is
/// optimised away.
fn decode_all(bytes: &[u8], ctx: &RamCtx<'_>) -> (usize, usize) {
    let mut ch = RamChannel::new();
    let mut r = Reader::new(bytes, 0);
    let mut n = 0;
    let mut acc = 0usize;
    loop {
        let rec = decode_record(&mut r, &mut ch, ctx).expect("valid stream");
        match rec.body {
            RamBody::Page(p) => {
                acc = acc.wrapping_add(black_box(p).as_ptr() as usize);
                n += 1;
            }
            RamBody::Zero { fill } => {
                acc = acc.wrapping_add(fill as usize);
                n += 1;
            }
            RamBody::Eos => break,
            _ => unreachable!(),
        }
        acc = acc.wrapping_add(rec.addr as usize);
    }
    (n, acc)
}

fn bench(c: &mut Criterion) {
    let profile = Profile::QEMU_10;
    let limits = Limits::DEFAULT;
    let ctx = RamCtx::new(&profile, &limits);
    for (label, zero) in [("page_records", false), ("zero_records", true)] {
        let bytes = stream(zero);
        assert_eq!(decode_all(&bytes, &ctx).0, PAGES);
        let mut g = c.benchmark_group(label);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function("decode_record", |b| {
            b.iter(|| decode_all(black_box(&bytes), &ctx))
        });
        let mut dst = vec![0u8; bytes.len()];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&bytes));
                black_box(&dst);
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
