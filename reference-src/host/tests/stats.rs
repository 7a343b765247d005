//! Statistics: histogram percentiles against known distributions and exact sorted percentiles,
//! concurrent recording, counters into `query-migrate` shapes, windowed rates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qmig_host::qmp_types::{MigrationStats, MigrationStatus};
use qmig_host::stats::{
    Counters, CountersSnapshot, LatencyHistogram, MigrationRecorder, RamFigures, RateMeter,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Nearest-rank percentile of sorted values.
fn exact(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn assert_close(got: u64, want: u64, what: &str) {
    let err = (got as f64 - want as f64).abs() / (want as f64).max(1.0);
    assert!(
        err <= 0.01,
        "{what}: got {got}, exact {want}, error {:.3}%",
        err * 100.0
    );
    assert!(got >= want, "{what}: reported {got} below the exact {want}");
}

#[test]
fn uniform_known_percentiles() {
    let h = LatencyHistogram::new();
    for v in 1..=100_000u64 {
        h.record(v);
    }
    assert_eq!(h.count(), 100_000);
    assert_eq!(h.min(), Some(1));
    assert_eq!(h.max(), Some(100_000));
    assert_eq!(h.mean(), Some(50_000.5));
    assert_close(h.quantile(0.5).unwrap(), 50_000, "p50");
    assert_close(h.quantile(0.9).unwrap(), 90_000, "p90");
    assert_close(h.quantile(0.99).unwrap(), 99_000, "p99");
    assert_eq!(h.quantile(1.0), Some(100_000));
    assert_eq!(h.quantile(0.0), Some(1));
}

#[test]
fn random_distributions_match_exact_percentiles() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x51_6d_69_67);
    // Exponential with mean 50 us, a log-uniform spread over 1 ns .. 10 s, and a bimodal mix
    // (fast local faults and slow network round trips), all in nanoseconds.
    let exponential: Vec<u64> = (0..200_000)
        .map(|_| (-(1.0 - rng.gen::<f64>()).ln() * 50_000.0) as u64)
        .collect();
    let log_uniform: Vec<u64> = (0..200_000)
        .map(|_| 10f64.powf(rng.gen_range(0.0..10.0)) as u64)
        .collect();
    let bimodal: Vec<u64> = (0..200_000)
        .map(|i| {
            if i % 10 == 0 {
                rng.gen_range(800_000..1_200_000)
            } else {
                rng.gen_range(2_000..6_000)
            }
        })
        .collect();
    for (name, values) in [
        ("exponential", exponential),
        ("log-uniform", log_uniform),
        ("bimodal", bimodal),
    ] {
        let h = LatencyHistogram::new();
        values.iter().for_each(|&v| h.record(v));
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for q in [0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999] {
            assert_close(
                h.quantile(q).unwrap(),
                exact(&sorted, q),
                &format!("{name} q{q}"),
            );
        }
        assert_eq!(h.max(), sorted.last().copied());
        assert_eq!(h.min(), sorted.first().copied());
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        assert!((h.mean().unwrap() - mean).abs() <= mean * 1e-9);
    }
}

#[test]
fn single_values_are_reported_exactly_at_every_scale() {
    let mut v = 1u64;
    let mut values = vec![0, 1, 127, 128, 129, 255, 256, u64::MAX - 1, u64::MAX];
    while let Some(n) = v.checked_mul(3) {
        values.push(n);
        values.push(n + 1);
        v = n;
    }
    for v in values {
        let h = LatencyHistogram::new();
        h.record(v);
        assert_eq!(h.quantile(0.5), Some(v), "value {v}");
        assert_eq!((h.min(), h.max()), (Some(v), Some(v)));
    }
    let empty = LatencyHistogram::new();
    assert_eq!(
        (empty.quantile(0.5), empty.min(), empty.max(), empty.mean()),
        (None, None, None, None)
    );
    assert_eq!(empty.summary_us().count, 0);
}

#[test]
fn small_values_are_exact() {
    let h = LatencyHistogram::new();
    let values: Vec<u64> = (0..128).chain(0..64).collect();
    values.iter().for_each(|&v| h.record(v));
    let mut sorted = values.clone();
    sorted.sort_unstable();
    for q in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0] {
        assert_eq!(h.quantile(q), Some(exact(&sorted, q)), "q{q}");
    }
}

#[test]
fn concurrent_recording_loses_nothing() {
    let h = Arc::new(LatencyHistogram::new());
    let c = Arc::new(Counters::new());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (h, c) = (h.clone(), c.clone());
            std::thread::spawn(move || {
                for i in 0..50_000u64 {
                    h.record(t * 1_000_000 + i);
                    c.add_bytes(4096 + 8);
                    c.add_page();
                    if i % 4 == 0 {
                        c.add_zero_page();
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert_eq!(h.count(), 200_000);
    assert_eq!(h.min(), Some(0));
    assert_eq!(h.max(), Some(3_049_999));
    let s = c.snapshot();
    assert_eq!(
        (s.transferred_bytes, s.pages, s.zero_pages),
        (200_000 * 4104, 200_000, 50_000)
    );
    h.reset();
    assert_eq!((h.count(), h.quantile(0.5)), (0, None));
}

#[test]
fn summary_in_microseconds() {
    let h = LatencyHistogram::new();
    for us in [10u64, 20, 30, 40, 1000] {
        h.record_duration(Duration::from_micros(us));
    }
    let s = h.summary_us();
    assert_eq!((s.count, s.min, s.max, s.mean), (5, 10.0, 1000.0, 220.0));
    assert!(
        (30.0..=30.3).contains(&s.p50) && (1000.0..=1000.0).contains(&s.p99),
        "{s:?}"
    );
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["count"], 5);
}

#[test]
fn counters_fill_query_migrate_ram() {
    let c = Counters::new();
    c.add_bytes(10 * 4096 + 100);
    (0..10).for_each(|_| c.add_page());
    (0..3).for_each(|_| c.add_zero_page());
    c.add_request();
    assert_eq!(c.add_dirty_sync(), 1);
    assert_eq!(c.add_dirty_sync(), 2);
    c.add_fault();
    c.add_recovery();
    let s = c.snapshot();
    assert_eq!(
        s,
        CountersSnapshot {
            transferred_bytes: 41_060,
            pages: 10,
            zero_pages: 3,
            requests: 1,
            dirty_syncs: 2,
            faults: 1,
            recoveries: 1
        }
    );
    assert_eq!(
        s.ram_stats(4096, 1 << 20, 1 << 19, 12.5),
        MigrationStats {
            transferred: 41_060,
            remaining: 1 << 19,
            total: 1 << 20,
            duplicate: 3,
            normal: 10,
            normal_bytes: 40_960,
            mbps: 12.5,
            dirty_sync_count: 2,
            postcopy_requests: 1,
            page_size: 4096,
            ..MigrationStats::default()
        }
    );
}

#[test]
fn rate_over_a_sliding_window() {
    let m = RateMeter::new(Duration::from_secs(2));
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    assert_eq!(m.sample(at(0), 0), 0.0);
    assert_eq!(m.sample(at(1000), 1_000_000), 1_000_000.0);
    assert_eq!(m.sample(at(2000), 3_000_000), 1_500_000.0); // 3 MB over 2 s
                                                            // Now the window is (1 s, 3 s]: the sample at 0 s leaves, the one at 1 s stays.
    assert_eq!(m.sample(at(3000), 3_000_000), 1_000_000.0); // (3 MB - 1 MB) / 2 s
    assert_eq!(m.sample(at(5000), 3_000_000), 0.0); // idle for the whole window
                                                    // Window start 4 s: the last sample at or before it (3 s) is the base: 1 MB over 3 s.
    let mbps = m.sample_mbps(at(6000), 4_000_000);
    assert!((mbps - 8.0 / 3.0).abs() < 1e-9, "{mbps}");
    // A counter that restarts (a new migration) restarts the window.
    assert_eq!(m.sample(at(7000), 10), 0.0);
    assert_eq!(m.sample(at(7500), 1010), 2000.0);
}

#[test]
fn recorder_builds_the_query_migrate_reply() {
    let r = MigrationRecorder::new(Duration::from_secs(1));
    let t0 = Instant::now();
    r.start(t0);
    let ram = RamFigures {
        page_size: 4096,
        total: 1 << 20,
        remaining: 1 << 19,
    };
    let first = r.info(t0, MigrationStatus::Active, ram);
    assert_eq!(first.total_time, Some(0));
    assert_eq!(first.x_qmig.as_ref().unwrap().fault_latency_us, None);

    r.counters.add_bytes(500_000);
    r.counters.add_fault();
    r.fault_latency.record_duration(Duration::from_micros(100));
    let info = r.info(
        t0 + Duration::from_millis(500),
        MigrationStatus::PostcopyActive,
        ram,
    );
    let v = serde_json::to_value(&info).unwrap();
    assert_eq!(v["status"], "postcopy-active");
    assert_eq!(v["total-time"], 500);
    assert_eq!(v["ram"]["transferred"], 500_000);
    assert_eq!(v["ram"]["remaining"], 1 << 19);
    assert_eq!(v["ram"]["mbps"], 8.0); // 500 kB in 0.5 s
    assert_eq!(v["x-qmig"]["faults"], 1);
    assert_eq!(v["x-qmig"]["recoveries"], 0);
    assert_eq!(v["x-qmig"]["fault-latency-us"]["count"], 1);
    assert_eq!(v["x-qmig"]["fault-latency-us"]["p99"], 100.0);
}
