//! What a shard reports besides its counters: stream histograms through the `metrics`
//! facade (a no-op until the application installs a recorder), and a limiter that keeps a
//! hostile client from flooding the logs.

use std::cell::Cell;
use std::time::{Duration, Instant};

use nexus_config::metric_names;

/// Handles to the stream histograms, taken once per shard so that recording one is an atomic
/// push into a bucket, not a registry lookup.
pub(crate) struct ShardMetrics {
    duration: metrics::Histogram,
    size: metrics::Histogram,
    first_byte: metrics::Histogram,
}

impl ShardMetrics {
    pub(crate) fn new() -> ShardMetrics {
        ShardMetrics {
            duration: metrics::histogram!(metric_names::SERVER_STREAM_DURATION),
            size: metrics::histogram!(metric_names::SERVER_STREAM_SIZE),
            first_byte: metrics::histogram!(metric_names::SERVER_TIME_TO_FIRST_BYTE),
        }
    }

    /// A stream's first chunk went to its connection `elapsed` after its INITIATE.
    pub(crate) fn first_byte(&self, elapsed: Duration) {
        self.first_byte.record(elapsed.as_secs_f64());
    }

    /// A stream ended after `elapsed`, having sent `bytes`.
    pub(crate) fn stream_ended(&self, elapsed: Duration, bytes: u64) {
        self.duration.record(elapsed.as_secs_f64());
        self.size.record(bytes as f64);
    }
}

/// Lets through at most `burst` lines per `window`; says how many it held back since.
pub(crate) struct LogLimiter {
    window: Duration,
    burst: u32,
    started: Cell<Option<Instant>>,
    allowed: Cell<u32>,
    suppressed: Cell<u64>,
}

impl LogLimiter {
    pub(crate) fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            window,
            burst,
            started: Cell::new(None),
            allowed: Cell::new(0),
            suppressed: Cell::new(0),
        }
    }

    /// `Some(lines suppressed since the last one let through)` if a line may be logged now.
    pub(crate) fn allow(&self, now: Instant) -> Option<u64> {
        let fresh = self
            .started
            .get()
            .is_none_or(|start| now.duration_since(start) >= self.window);
        if fresh {
            self.started.set(Some(now));
            self.allowed.set(0);
        }
        if self.allowed.get() >= self.burst {
            self.suppressed.set(self.suppressed.get() + 1);
            return None;
        }
        self.allowed.set(self.allowed.get() + 1);
        Some(self.suppressed.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_lets_a_burst_through_per_window_and_counts_the_rest() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let firsts: Vec<_> = (0..3).map(|_| limiter.allow(t0)).collect();
        assert_eq!(firsts, vec![Some(0), Some(0), Some(0)]);
        for i in 0..100 {
            assert_eq!(limiter.allow(t0 + Duration::from_millis(i)), None);
        }
        // The next window lets lines through again and reports the 100 held back once.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(limiter.allow(t1), Some(100));
        assert_eq!(limiter.allow(t1), Some(0));
    }
}
