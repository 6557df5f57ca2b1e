//! Exponential backoff with jitter, per guest: after the n-th failure in a row the next
//! attempt waits a random time in `[d/2, d]` with `d = min(initial * 2^(n-1), max)`
//! ("equal jitter": never less than half the nominal delay, so retries do not bunch up
//! at zero, and spread so that many guests failing together do not retry together).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// The delays of a backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Nominal delay after the first failure.
    pub initial: Duration,
    /// The largest nominal delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// The nominal delay after `failures` failures in a row (at least one).
    pub fn nominal(&self, failures: u32) -> Duration {
        2u32.checked_pow(failures.saturating_sub(1))
            .and_then(|factor| self.initial.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The delay after `failures` failures, jittered by `unit` in `[0, 1)`.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let nominal = self.nominal(failures);
        let half = nominal / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// One key's failures in a row and when it may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Failures in a row.
    pub failures: u32,
    /// Not before this instant.
    pub not_before: Instant,
}

/// Backoff state per key (guest name).
#[derive(Debug, Default)]
pub struct Backoffs {
    policy: BackoffPolicy,
    retries: HashMap<String, Retry>,
}

impl Backoffs {
    /// No failures yet.
    pub fn new(policy: BackoffPolicy) -> Self {
        Backoffs {
            policy,
            retries: HashMap::new(),
        }
    }

    /// Records a failure of `key` at `now`; returns when it may be tried again.
    pub fn failed(&mut self, key: &str, now: Instant) -> Retry {
        let failures = self.retries.get(key).map_or(0, |r| r.failures) + 1;
        let retry = Retry {
            failures,
            not_before: now + self.policy.delay(failures, fastrand::f64()),
        };
        self.retries.insert(key.to_owned(), retry);
        retry
    }

    /// Records a success of `key`: the next failure starts from the initial delay.
    pub fn succeeded(&mut self, key: &str) {
        self.retries.remove(key);
    }

    /// The retry state of `key`, if it failed last time.
    pub fn get(&self, key: &str) -> Option<Retry> {
        self.retries.get(key).copied()
    }

    /// Whether `key` may be tried at `now`.
    pub fn ready(&self, key: &str, now: Instant) -> bool {
        self.get(key).is_none_or(|r| r.not_before <= now)
    }

    /// The earliest instant at which a key waiting now becomes ready.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.retries
            .values()
            .map(|r| r.not_before)
            .filter(|&t| t > now)
            .min()
    }

    /// Forgets keys that `keep` rejects (guests no longer managed here).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.retries.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nominal_delays_double_up_to_the_cap() {
        let p = BackoffPolicy::default();
        let ms = |n| p.nominal(n).as_millis();
        assert_eq!([ms(1), ms(2), ms(3), ms(4)], [200, 400, 800, 1600]);
        assert_eq!(p.nominal(11).as_secs(), 204);
        assert_eq!(p.nominal(12), p.max);
        assert_eq!(p.nominal(u32::MAX), p.max);
        assert_eq!(p.nominal(0), p.initial);
    }

    #[test]
    fn jittered_delays_stay_within_half_and_full_nominal() {
        let p = BackoffPolicy::default();
        for failures in 1..40 {
            let nominal = p.nominal(failures);
            for unit in [0.0, 0.25, 0.5, 0.999_999, fastrand::f64()] {
                let d = p.delay(failures, unit);
                assert!(
                    d >= nominal / 2 && d <= nominal,
                    "{failures}: {d:?} of {nominal:?}"
                );
            }
        }
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(200));
    }

    #[test]
    fn failures_grow_and_a_success_resets() {
        let mut b = Backoffs::new(BackoffPolicy::default());
        let now = Instant::now();
        let first = b.failed("web-1", now);
        assert_eq!(first.failures, 1);
        assert!(!b.ready("web-1", now));
        assert!(b.ready("web-1", now + Duration::from_millis(200)));
        assert!(b.ready("db-1", now));
        let second = b.failed("web-1", now);
        assert_eq!(second.failures, 2);
        assert!(second.not_before >= now + Duration::from_millis(200));
        assert_eq!(b.next_deadline(now), Some(second.not_before));
        b.succeeded("web-1");
        assert!(b.ready("web-1", now));
        assert_eq!(b.failed("web-1", now).failures, 1);
        b.retain(|k| k != "web-1");
        assert_eq!(b.get("web-1"), None);
    }
}
