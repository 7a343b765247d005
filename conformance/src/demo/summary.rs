//! The demo's closing statistics.
//!
//! This module owns [`Stats`], the figures the demo reports (throughput, precopy passes, page
//! requests, fault latency, pause and resume times), [`Stats::collect`] from the final
//! `query-migrate` of both sides, and [`Stats::lines`], their printed form.

use std::time::Duration;

use serde_json::Value;

/// Figures of one demo run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Guest RAM bytes.
    pub ram: u64,
    /// Bytes the source sent (`ram.transferred`).
    pub transferred: u64,
    /// Source's `total-time`, milliseconds.
    pub total_time_ms: u64,
    /// Precopy passes (dirty syncs) before the postcopy switch.
    pub precopy_passes: u64,
    /// Page requests the source served (`ram.postcopy-requests`).
    pub page_requests: u64,
    /// Page faults the destination took (`x-qmig.faults`).
    pub faults: u64,
    /// Destination fault latency p50 / p99 / max / samples, microseconds.
    pub fault_latency_us: Option<(f64, f64, f64, u64)>,
    /// Recoveries counted by the destination (`x-qmig.recoveries`).
    pub recoveries: u64,
    /// Cut to `postcopy-paused`, source and destination.
    pub cut_to_paused: (Duration, Duration),
    /// `migrate-recover` to `postcopy-active` again, source and destination.
    pub recover_to_active: (Duration, Duration),
    /// Cut to `postcopy-active` again on both sides (the outage).
    pub outage: Duration,
}

fn u(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, ptr: &str) -> f64 {
    v.pointer(ptr).and_then(Value::as_f64).unwrap_or(0.0)
}

impl Stats {
    /// Takes the figures of the final `query-migrate` of the source (`src`) and the
    /// destination (`dst`); the timings are filled in by the caller.
    pub fn collect(&mut self, src: &Value, dst: &Value) {
        self.transferred = u(src, "/ram/transferred");
        self.total_time_ms = u(src, "/total-time");
        self.page_requests = u(src, "/ram/postcopy-requests");
        self.faults = u(dst, "/x-qmig/faults");
        self.recoveries = u(dst, "/x-qmig/recoveries").max(u(src, "/x-qmig/recoveries"));
        self.fault_latency_us = dst
            .pointer("/x-qmig/fault-latency-us")
            .map(|l| (f(l, "/p50"), f(l, "/p99"), f(l, "/max"), u(l, "/count")));
    }

    /// The printed summary, one figure a line.
    pub fn lines(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        let secs = self.total_time_ms as f64 / 1e3;
        let rate = if secs > 0.0 {
            mib(self.transferred) / secs
        } else {
            0.0
        };
        let mut v = vec![
            format!("  guest RAM               {:.0} MiB", mib(self.ram)),
            format!(
                "  sent by the source      {:.1} MiB in {:.2} s ({:.1} MiB/s, {:.2}x RAM)",
                mib(self.transferred),
                secs,
                rate,
                self.transferred as f64 / self.ram.max(1) as f64
            ),
            format!("  precopy passes          {}", self.precopy_passes),
            format!(
                "  page requests           {} served by the source, {} faults on the destination",
                self.page_requests, self.faults
            ),
        ];
        v.push(match self.fault_latency_us {
            Some((p50, p99, max, n)) => format!(
                "  fault latency           p50 {p50:.0} us, p99 {p99:.0} us, max {max:.0} us ({n} faults)"
            ),
            None => "  fault latency           (no fault recorded)".into(),
        });
        v.push(format!(
            "  cut -> postcopy-paused  source {}, destination {}",
            ms(self.cut_to_paused.0),
            ms(self.cut_to_paused.1)
        ));
        v.push(format!(
            "  recover -> postcopy-active  source {}, destination {}",
            ms(self.recover_to_active.0),
            ms(self.recover_to_active.1)
        ));
        v.push(format!(
            "  outage (cut -> active)  {} ({} recovery)",
            ms(self.outage),
            self.recoveries
        ));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn figures_from_query_migrate() {
        let src = json!({"status": "completed", "total-time": 2000,
            "ram": {"transferred": 3u64 << 28, "postcopy-requests": 17},
            "x-qmig": {"recoveries": 1}});
        let dst = json!({"status": "completed",
            "x-qmig": {"faults": 19, "recoveries": 1,
                "fault-latency-us": {"count": 19, "min": 10.0, "mean": 80.0, "p50": 70.0,
                    "p90": 150.0, "p99": 400.0, "max": 410.0}}});
        let mut s = Stats {
            ram: 1 << 28,
            precopy_passes: 3,
            ..Stats::default()
        };
        s.collect(&src, &dst);
        assert_eq!((s.page_requests, s.faults, s.recoveries), (17, 19, 1));
        assert_eq!(s.fault_latency_us, Some((70.0, 400.0, 410.0, 19)));
        let text = s.lines().join("\n");
        assert!(
            text.contains("768.0 MiB in 2.00 s (384.0 MiB/s, 3.00x RAM)"),
            "{text}"
        );
        assert!(text.contains("p50 70 us, p99 400 us"), "{text}");
    }
}
