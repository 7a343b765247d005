//! Cost of the memory mechanisms, printed as a Markdown table for BENCHMARKS.md ("Memory").
//!
//! `cargo run --release -p qmig-host --example mem_bench [-- GIB]` (root: userfaultfd).
//! * dirty sync: time of one `DirtyTracker::sync` over a GIB-GiB populated block with N dirty
//!   pages (spread evenly), per GiB;
//! * placement: `UFFDIO_COPY` throughput by batch size, `UFFDIO_ZEROPAGE` ranged vs per page;
//! * fault latency: fault read to resolving placement, with a reader thread touching missing
//!   pages one after another and this thread answering each fault with one page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qmig_host::dirty::{Choice, DirtyTracker};
use qmig_host::fill::{fill, Content};
use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};
use qmig_host::uffd::{PlaceConfig, UffdRam};
use qmig_host::workload::{Access, Pattern, Workload, WorkloadConfig};

const P: u64 = PAGE_SIZE as u64;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn dirty_sync(gib: u64) {
    let bytes = gib << 30;
    let pages = bytes / P;
    let ram = Arc::new(GuestRam::new(&[("pc.ram", bytes)], MapOptions::default()).unwrap());
    fill(&ram.blocks()[0], Content::Pattern { seed: 1 }).unwrap();
    let mut t = DirtyTracker::start(ram.clone(), Choice::Auto).unwrap();
    println!(
        "\n### dirty sync ({}, {gib} GiB populated block)\n",
        t.mechanism().name()
    );
    println!("| dirty pages | sync time (median of 5) | per GiB |");
    println!("|---:|---:|---:|");
    let b = &ram.blocks()[0];
    for n in [0u64, 1024, 16384, 131072, pages] {
        let n = n.min(pages);
        let mut times = Vec::new();
        for _ in 0..5 {
            if let Some(stride) = pages.checked_div(n) {
                for i in 0..n {
                    b.write(i * stride * P, &[i as u8]).unwrap();
                }
            }
            let t0 = Instant::now();
            let s = t.sync().unwrap();
            times.push(t0.elapsed());
            assert_eq!(s[0].count_ones(), n);
        }
        let m = median(times);
        println!(
            "| {n} | {:.3} ms | {:.3} ms |",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e3 / gib as f64
        );
    }
}

fn placement() {
    let mib = 256u64;
    let bytes = mib << 20;
    let src: Vec<u8> = (0..bytes).map(|i| (i * 7 + (i >> 12)) as u8).collect();
    println!("\n### placement ({mib} MiB into a registered block)\n");
    println!("| operation | calls | time | throughput |");
    println!("|---|---:|---:|---:|");
    for batch in [4096usize, 64 << 10, 256 << 10, 1 << 20, 2 << 20] {
        let ram = Arc::new(GuestRam::new(&[("pc.ram", bytes)], MapOptions::default()).unwrap());
        let cfg = PlaceConfig {
            max_batch: batch,
            ..Default::default()
        };
        let (u, _rx) = UffdRam::register(ram.clone(), cfg).unwrap();
        let t0 = Instant::now();
        u.place(0, 0, &src).unwrap();
        let el = t0.elapsed();
        let s = u.stats();
        assert_eq!(s.copied_pages, bytes / P);
        println!(
            "| UFFDIO_COPY, {} KiB batches | {} | {:.1} ms | {:.2} GiB/s |",
            batch / 1024,
            s.copy_calls,
            el.as_secs_f64() * 1e3,
            bytes as f64 / (1u64 << 30) as f64 / el.as_secs_f64()
        );
    }
    for ranged in [false, true] {
        let ram = Arc::new(GuestRam::new(&[("pc.ram", bytes)], MapOptions::default()).unwrap());
        let (u, _rx) = UffdRam::register(ram.clone(), PlaceConfig::default()).unwrap();
        let t0 = Instant::now();
        if ranged {
            u.place_zero(0, 0, bytes).unwrap();
        } else {
            for p in 0..bytes / P {
                u.place_zero(0, p * P, P).unwrap();
            }
        }
        let el = t0.elapsed();
        let s = u.stats();
        assert_eq!(s.zero_pages, bytes / P);
        println!(
            "| UFFDIO_ZEROPAGE, {} | {} | {:.1} ms | {:.2} GiB/s |",
            if ranged {
                "one ranged call"
            } else {
                "per page"
            },
            s.zero_calls,
            el.as_secs_f64() * 1e3,
            bytes as f64 / (1u64 << 30) as f64 / el.as_secs_f64()
        );
    }
}

fn fault_latency() {
    let pages = 4096u64;
    let ram = Arc::new(GuestRam::new(&[("pc.ram", pages * P)], MapOptions::default()).unwrap());
    let (u, faults) = UffdRam::register(ram.clone(), PlaceConfig::default()).unwrap();
    let mut w = Workload::start(
        ram.clone(),
        WorkloadConfig {
            threads: 1,
            access: Access::Read,
            pattern: Pattern::Sequential,
            max_ops_per_thread: Some(pages),
            ..Default::default()
        },
    )
    .unwrap();
    let page = [0x5Au8; PAGE_SIZE];
    while u.missing_pages(0).unwrap() > 0 {
        let f = faults.recv().unwrap();
        u.place(f.block, f.offset, &page).unwrap();
    }
    w.join();
    let mut l = u.take_fault_latencies();
    l.sort();
    let q = |x: f64| l[((l.len() - 1) as f64 * x) as usize].as_secs_f64() * 1e6;
    println!(
        "\n### fault latency ({} faults, fault read -> placement)\n",
        l.len()
    );
    println!("| p50 | p90 | p99 | max |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
}

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    dirty_sync(gib);
    placement();
    fault_latency();
}
