//! Throttling failed authentication per client address: a guesser gets a few tries a minute,
//! then its connections are refused before the handshake for a backoff that doubles each time
//! it spends its budget again (1 s, 2 s, 4 s, ... up to 5 minutes).
//!
//! Shared by the shards behind one lock, which is taken when a connection is accepted from an
//! address with a record and when a handshake fails or succeeds: never on the data path. The
//! table is bounded; when full, the record quiet longest is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The window in which an address may fail `max_failures` times before its backoff starts.
const WINDOW: Duration = Duration::from_secs(60);
/// The first backoff; each later one doubles, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest backoff.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Most addresses with a record.
const MAX_ADDRESSES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    window_start: Instant,
    blocked_until: Option<Instant>,
    /// The backoff the next block gets.
    backoff: Duration,
    last_seen: Instant,
}

/// Failed authentications per address.
#[derive(Debug)]
pub(crate) struct AuthThrottle {
    max_failures: u32,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl AuthThrottle {
    /// `max_failures` per address per minute before the backoff (`burst.nexus.server.auth.failures.max`).
    pub(crate) fn new(max_failures: u32) -> Self {
        AuthThrottle {
            max_failures: max_failures.max(1),
            records: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(time left)` when connections from `address` are refused now.
    pub(crate) fn blocked(&self, address: IpAddr, now: Instant) -> Option<Duration> {
        let records = self.records.lock();
        let until = records.get(&address)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// A handshake from `address` failed authentication.
    pub(crate) fn failed(&self, address: IpAddr, now: Instant) {
        let mut records = self.records.lock();
        if records.len() >= MAX_ADDRESSES && !records.contains_key(&address) {
            let oldest = records
                .iter()
                .min_by_key(|(_, r)| r.last_seen)
                .map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                records.remove(&oldest);
            }
        }
        let record = records.entry(address).or_insert(Record {
            failures: 0,
            window_start: now,
            blocked_until: None,
            backoff: FIRST_BACKOFF,
            last_seen: now,
        });
        record.last_seen = now;
        if now.duration_since(record.window_start) >= WINDOW {
            record.failures = 0;
            record.window_start = now;
            // A whole quiet window after a block forgives the doubling.
            if record
                .blocked_until
                .is_none_or(|u| now.duration_since(u) >= WINDOW)
            {
                record.backoff = FIRST_BACKOFF;
            }
        }
        record.failures += 1;
        if record.failures >= self.max_failures {
            record.blocked_until = Some(now + record.backoff);
            record.backoff = (record.backoff * 2).min(MAX_BACKOFF);
            record.failures = 0;
            record.window_start = now;
        }
    }

    /// A handshake from `address` authenticated: its record goes.
    pub(crate) fn succeeded(&self, address: IpAddr) {
        let mut records = self.records.lock();
        if !records.is_empty() {
            records.remove(&address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guesser_gets_its_budget_then_a_doubling_backoff() {
        let throttle = AuthThrottle::new(3);
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        let t0 = Instant::now();
        throttle.failed(guesser, t0);
        throttle.failed(guesser, t0);
        assert_eq!(throttle.blocked(guesser, t0), None);
        throttle.failed(guesser, t0);
        assert_eq!(throttle.blocked(guesser, t0), Some(Duration::from_secs(1)));
        assert_eq!(throttle.blocked(other, t0), None, "per address");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(throttle.blocked(guesser, t1), None, "the backoff passes");
        for _ in 0..3 {
            throttle.failed(guesser, t1);
        }
        assert_eq!(throttle.blocked(guesser, t1), Some(Duration::from_secs(2)));
        // Success clears the record.
        throttle.succeeded(guesser);
        assert_eq!(throttle.blocked(guesser, t1), None);
        // A quiet minute resets the count.
        let t2 = t1 + Duration::from_secs(5);
        throttle.failed(guesser, t2);
        throttle.failed(guesser, t2);
        throttle.failed(guesser, t2 + WINDOW);
        assert_eq!(throttle.blocked(guesser, t2 + WINDOW), None);
    }

    #[test]
    fn the_backoff_is_capped() {
        let throttle = AuthThrottle::new(1);
        let guesser: IpAddr = "2001:db8::1".parse().unwrap();
        let mut now = Instant::now();
        for _ in 0..20 {
            throttle.failed(guesser, now);
            now += throttle.blocked(guesser, now).unwrap();
        }
        throttle.failed(guesser, now);
        assert_eq!(throttle.blocked(guesser, now), Some(MAX_BACKOFF));
    }
}
