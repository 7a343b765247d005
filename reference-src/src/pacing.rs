//! Bandwidth pacing of the main channel.
//!
//! This module owns [`TokenBucket`]: `max-bandwidth` (precopy) and `max-postcopy-bandwidth`
//! (postcopy) as a byte budget that refills continuously, with a burst of a tenth of a second.
//! The driver asks for at most [`TokenBucket::available`] bytes per `poll_transmit` call, so
//! the socket never holds more than a short burst of bulk data ahead of a requested page.

use std::time::{Duration, Instant};

/// A token bucket in bytes. A rate of 0 means unlimited.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// An empty-history bucket, full.
    pub fn new(now: Instant) -> Self {
        TokenBucket {
            tokens: 0.0,
            last: now,
        }
    }

    fn burst(rate: u64) -> f64 {
        (rate as f64 / 10.0).max(64.0 * 1024.0)
    }

    fn refill(&mut self, now: Instant, rate: u64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate as f64).min(Self::burst(rate));
    }

    /// Bytes that may be sent now (`usize::MAX` when unlimited).
    pub fn available(&mut self, now: Instant, rate: u64) -> usize {
        if rate == 0 {
            return usize::MAX;
        }
        self.refill(now, rate);
        if self.tokens <= 0.0 {
            0
        } else {
            self.tokens as usize
        }
    }

    /// Takes `n` sent bytes out of the bucket (it may go negative: a record overshoots).
    pub fn consume(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// How long until `want` bytes are available at `rate`.
    pub fn wait_for(&self, want: usize, rate: u64) -> Duration {
        if rate == 0 {
            return Duration::ZERO;
        }
        let missing = (want as f64).min(Self::burst(rate)) - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_the_rate_and_caps_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0);
        assert_eq!(b.available(t0, 0), usize::MAX);
        assert_eq!(b.available(t0, 1_000_000), 0);
        let t1 = t0 + Duration::from_millis(50);
        assert_eq!(b.available(t1, 1_000_000), 50_000);
        b.consume(60_000);
        assert_eq!(b.available(t1, 1_000_000), 0);
        assert_eq!(b.wait_for(10_000, 1_000_000), Duration::from_millis(20));
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!(b.available(t2, 1_000_000), 100_000);
    }
}
