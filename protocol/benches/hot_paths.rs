//! Hot paths not covered by `decode.rs`:
//!
//! * **encoder**: `RamRecord::encode` of 64 MiB of guest RAM as page records (random contents)
//!   and as zero-page records, into a reused `Vec<u8>` (what the source's `poll_transmit` sink
//!   does); `memcpy` of the same page bytes alongside as the reference;
//! * **bitmap rebuild** on recovery (SM-REBUILD in `machine::source`): the destination's
//!   received bitmap of a 1 GiB block read from its wire bytes (`PageBitmap::from_le_bytes`),
//!   complemented, minus the discarded pages (`and_not`);
//! * **zero detection**: the source's page-is-zero check (`machine::source::is_zero`, a memcmp
//!   against a static zero buffer; private, so reproduced here verbatim) on a zero page (the
//!   worst case: the whole page is read) and on a data page, against two alternatives (a
//!   byte-by-byte `all`, and an OR-fold over `u64` words).
//!
//! Run: `cargo bench -p qmig-protocol --bench hot_paths`. Results go in BENCHMARKS.md ("Hot
//! paths").

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::ram::{RamBody, RamRecord};
use std::time::Duration;

const TPS: usize = 4096;
/// 64 MiB of guest RAM per encoded stream.
const PAGES: usize = 16384;
/// Pages of a 1 GiB block.
const GIB_PAGES: u64 = 1 << 18;

fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
    for c in buf.chunks_exact_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        c.copy_from_slice(&seed.to_le_bytes());
    }
}

/// Encodes `ram` (page `i` at `i * TPS`) as RAM records into `out`: the first names the block,
/// the rest CONTINUE; zero pages as ZERO records when `zero`.
fn encode(ram: &[u8], zero: bool, out: &mut Vec<u8>) {
    out.clear();
    for (i, page) in ram.chunks_exact(TPS).enumerate() {
        let mut flags = if zero { RamFlags::ZERO } else { RamFlags::PAGE };
        if i > 0 {
            flags = flags.with(RamFlags::CONTINUE);
        }
        RamRecord {
            flags,
            addr: (i * TPS) as u64,
            name: (i == 0).then_some(&b"pc.ram"[..]),
            body: if zero {
                RamBody::Zero { fill: 0 }
            } else {
                RamBody::Page(page)
            },
        }
        .encode(out);
    }
}

fn encoder(c: &mut Criterion) {
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut ram = vec![0u8; PAGES * TPS];
    xorshift_fill(&mut ram, &mut seed);
    let mut out = Vec::with_capacity(PAGES * (TPS + 32));
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Bytes(ram.len() as u64));
    g.bench_function("page_records_64MiB", |b| {
        b.iter(|| {
            encode(black_box(&ram), false, &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("zero_records_64MiB", |b| {
        b.iter(|| {
            encode(black_box(&ram), true, &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("memcpy_64MiB_reference", |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&ram));
            black_box(out.len())
        })
    });
    g.finish();
}

fn bitmap_rebuild(c: &mut Criterion) {
    // Received: ~3/4 of the pages, in a pseudo-random pattern; discarded: every 64th page.
    let mut received = PageBitmap::new(GIB_PAGES);
    let mut discarded = PageBitmap::new(GIB_PAGES);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for p in 0..GIB_PAGES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x & 3 != 0 {
            received.set(p);
        }
        if p % 64 == 0 {
            discarded.set(p);
        }
    }
    let wire = received.to_le_vec();
    let mut g = c.benchmark_group("bitmap_rebuild");
    g.throughput(Throughput::Elements(GIB_PAGES));
    g.bench_function("1GiB_block_from_wire_not_received_minus_discarded", |b| {
        b.iter(|| {
            let mut d = PageBitmap::from_le_bytes(black_box(&wire), GIB_PAGES, 0).expect("valid");
            d.complement();
            d.and_not(black_box(&discarded));
            black_box(d.count_ones())
        })
    });
    g.finish();
}

/// Verbatim copy of `machine::source::is_zero` (private there): memcmp against a static
/// 64 KiB zero buffer.
static ZEROS: [u8; 65536] = [0; 65536];
fn is_zero_source(data: &[u8]) -> bool {
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

fn is_zero_bytes(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

fn is_zero_fold(data: &[u8]) -> bool {
    data.chunks_exact(8).fold(0u64, |a, c| {
        a | u64::from_ne_bytes(c.try_into().expect("8 bytes"))
    }) == 0
        && data.chunks_exact(8).remainder().iter().all(|&b| b == 0)
}

fn zero_detection(c: &mut Criterion) {
    let zero = vec![0u8; TPS];
    let mut data = vec![0u8; TPS];
    let mut seed = 7;
    xorshift_fill(&mut data, &mut seed);
    // Out of cache: 64 MiB of zero pages scanned page by page.
    let big = vec![0u8; PAGES * TPS];
    let mut g = c.benchmark_group("zero_detection");
    g.throughput(Throughput::Bytes(TPS as u64));
    g.bench_function("source_memcmp/zero_page", |b| {
        b.iter(|| is_zero_source(black_box(&zero)))
    });
    g.bench_function("source_memcmp/data_page", |b| {
        b.iter(|| is_zero_source(black_box(&data)))
    });
    g.bench_function("bytes_all/zero_page", |b| {
        b.iter(|| is_zero_bytes(black_box(&zero)))
    });
    g.bench_function("u64_fold/zero_page", |b| {
        b.iter(|| is_zero_fold(black_box(&zero)))
    });
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("source_memcmp/64MiB_of_zero_pages", |b| {
        b.iter(|| {
            black_box(&big)
                .chunks_exact(TPS)
                .filter(|p| is_zero_source(p))
                .count()
        })
    });
    g.bench_function("u64_fold/64MiB_of_zero_pages", |b| {
        b.iter(|| {
            black_box(&big)
                .chunks_exact(TPS)
                .filter(|p| is_zero_fold(p))
                .count()
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = encoder, bitmap_rebuild, zero_detection
}
criterion_main!(benches);
