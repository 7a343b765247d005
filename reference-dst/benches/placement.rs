//! Page placement on the destination: `UFFDIO_COPY` of every page straight from the receive
//! buffer (one call per 4 KiB page, no copy in user space) against the batched path qmig-dst
//! uses (`qmig_host::uffd::Batcher`: each page copied into a buffer, contiguous runs placed
//! with one `UFFDIO_COPY` per `PlaceConfig::max_batch` bytes, 1 MiB by default).
//!
//! The receive buffer is laid out as the stream carries pages: each 4 KiB payload follows its
//! 8-byte record header (`addr | flags`, CONTINUE), so consecutive payloads are never
//! contiguous and a run cannot be copied from the buffer with one call. Every iteration maps
//! and registers a fresh block (setup, not timed) and places 64 MiB into it. Run as root
//! (userfaultfd): `cargo bench -p qmig-dst --bench placement`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};
use qmig_host::uffd::{Batcher, PlaceConfig, UffdRam, ZeroPolicy};

const BYTES: u64 = 64 << 20;
const PAGES: u64 = BYTES / PAGE_SIZE as u64;
const HEADER: usize = 8;

/// A receive buffer of `PAGES` page records: header, then the page's bytes.
fn receive_buffer() -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGES as usize * (HEADER + PAGE_SIZE));
    for p in 0..PAGES {
        v.extend_from_slice(&((p * PAGE_SIZE as u64) | 0x28).to_be_bytes());
        let fill = (p as u8).wrapping_mul(31) | 1;
        v.resize(v.len() + PAGE_SIZE, fill);
    }
    v
}

fn payload(buf: &[u8], p: u64) -> &[u8] {
    let at = p as usize * (HEADER + PAGE_SIZE) + HEADER;
    &buf[at..at + PAGE_SIZE]
}

fn fresh() -> (Arc<GuestRam>, UffdRam) {
    let ram = Arc::new(GuestRam::new(&[("ram", BYTES)], MapOptions::default()).unwrap());
    let (uffd, _faults) = UffdRam::register_polled(ram.clone(), PlaceConfig::default()).unwrap();
    (ram, uffd)
}

fn placement(c: &mut Criterion) {
    let buf = receive_buffer();
    let mut g = c.benchmark_group("placement_64MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BYTES));
    g.bench_function("per_page_copy_from_receive_buffer", |b| {
        b.iter_batched(
            fresh,
            |(ram, uffd)| {
                for p in 0..PAGES {
                    uffd.place(0, p * PAGE_SIZE as u64, payload(&buf, p))
                        .unwrap();
                }
                (ram, uffd)
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("batched_copy_through_buffer", |b| {
        b.iter_batched(
            fresh,
            |(ram, uffd)| {
                {
                    let mut batch = Batcher::new(&uffd, ZeroPolicy::Lazy);
                    for p in 0..PAGES {
                        batch
                            .push_page(0, p * PAGE_SIZE as u64, payload(&buf, p))
                            .unwrap();
                    }
                    batch.flush().unwrap();
                }
                (ram, uffd)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
