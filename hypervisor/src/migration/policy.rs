//! When pre-copy stops: a pure state machine over pass results, so that convergence,
//! auto-converge steps and the timeout policy are unit-tested without KVM.
//!
//! After each pass the sender reports the pages now dirty and the bandwidth measured;
//! [`Convergence::decide`] answers:
//! - switch over when the dirty pages fit in `maxDowntime` at that bandwidth;
//! - past `completionTimeoutPerGiB` x guest size, abort or switch over as `onTimeout`
//!   says;
//! - otherwise copy another pass, raising the throttle as QEMU's auto-converge does
//!   (20% first, then +10% per step, at most 99%) whenever the guest dirtied at least
//!   half as many bytes as the pass moved, two passes in a row.

use std::time::Duration;

use berth_schema::{MigrationPolicy, OnTimeout};

/// The first auto-converge throttle, percent.
pub const THROTTLE_INITIAL: u8 = 20;
/// Each further step, percent.
pub const THROTTLE_STEP: u8 = 10;
/// The most vCPU time auto-converge takes, percent.
pub const THROTTLE_MAX: u8 = 99;
/// How often a running pass samples the dirty rate for auto-converge.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(250);
/// What switching over costs besides the pages (pausing the vCPUs, state save, transfer,
/// restore, two round trips), counted into the estimated downtime. Measured here: 1.3 to
/// 1.4 ms for an idle guest on a quiet machine; 6 to 9 ms for a throttled guest that
/// dirties memory, on a loaded machine, when the last pass still went through the
/// bandwidth cap. After the cap was lifted for the paused phase such a guest's whole
/// downtime was 3.9 and 8.8 ms (BENCHMARKS.md); 5 ms sits between the two cases.
pub const SWITCHOVER_OVERHEAD: Duration = Duration::from_millis(5);

/// The settings of one migration, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Longest pause allowed at switchover.
    pub max_downtime: Duration,
    /// Transfer cap, bytes/s.
    pub bandwidth: Option<u64>,
    /// Throttle a guest that dirties memory faster than the link.
    pub auto_converge: bool,
    /// Timeout for the whole pre-copy.
    pub timeout: Duration,
    /// What to do past it.
    pub on_timeout: OnTimeout,
}

impl Policy {
    /// The policy of a guest of `guest_bytes` from its manifest block.
    pub fn new(p: &MigrationPolicy, guest_bytes: u64) -> Policy {
        let gib = (guest_bytes as f64 / (1u64 << 30) as f64).max(1.0 / 64.0);
        Policy {
            max_downtime: p.max_downtime.get(),
            bandwidth: p.bandwidth.limit(),
            auto_converge: p.auto_converge,
            timeout: p.completion_timeout_per_gib.get().mul_f64(gib),
            on_timeout: p.on_timeout,
        }
    }
}

/// What one pre-copy pass showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassResult {
    /// Bytes the pass put on the wire.
    pub bytes_sent: u64,
    /// How long the pass took.
    pub duration: Duration,
    /// Pages the guest dirtied meanwhile (to send next).
    pub dirty_pages: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// The decision after a pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Copy the dirty pages in another pass, with this throttle.
    Continue {
        /// Throttle percent to apply.
        throttle: u8,
    },
    /// Pause and copy the rest: it fits in maxDowntime.
    Switchover,
    /// Past the timeout, and the policy says switch over anyway.
    ForcedSwitchover,
    /// Past the timeout, and the policy says abort.
    Abort,
}

/// The convergence state across passes.
#[derive(Debug, Clone)]
pub struct Convergence {
    policy: Policy,
    bandwidth: Option<f64>,
    throttle: u8,
    high_dirty_passes: u32,
    estimate: Duration,
}

/// Passes moving less than this give no bandwidth figure (latency dominates).
const MIN_MEASURED_BYTES: u64 = 1 << 20;
/// The bandwidth assumed before any pass measured one, bytes/s.
const INITIAL_BANDWIDTH: f64 = 100e6;

impl Convergence {
    /// A fresh state for `policy`.
    pub fn new(policy: Policy) -> Convergence {
        Convergence {
            policy,
            bandwidth: None,
            throttle: 0,
            high_dirty_passes: 0,
            estimate: Duration::ZERO,
        }
    }

    /// The bandwidth measured so far (or the cap, or a guess), bytes/s.
    pub fn bandwidth(&self) -> f64 {
        let measured = self.bandwidth.unwrap_or(INITIAL_BANDWIDTH);
        match self.policy.bandwidth {
            Some(cap) => measured.min(cap as f64),
            None => measured,
        }
    }

    /// The throttle in force, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The downtime the last decision estimated.
    pub fn estimated_downtime(&self) -> Duration {
        self.estimate
    }

    /// The downtime `dirty_pages` would need now.
    pub fn downtime_for(&self, dirty_pages: u64) -> Duration {
        let bytes = dirty_pages as f64 * 4096.0;
        SWITCHOVER_OVERHEAD + Duration::from_secs_f64(bytes / self.bandwidth().max(1.0))
    }

    /// Takes a dirty-rate sample made while a pass runs (every
    /// [`SAMPLE_PERIOD`]): when the guest dirties more than half of what the link moves,
    /// the throttle goes one step up at once, so a long pass over a slow link does not
    /// wait for its end (QEMU only looks once per pass). Returns the new throttle.
    pub fn sample(&mut self, dirty_bytes_per_sec: f64) -> Option<u8> {
        if !self.policy.auto_converge || dirty_bytes_per_sec * 2.0 < self.bandwidth() {
            return None;
        }
        self.step();
        Some(self.throttle)
    }

    fn step(&mut self) {
        self.throttle = match self.throttle {
            0 => THROTTLE_INITIAL,
            t => t.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
        };
    }

    /// Decides after a pass.
    pub fn decide(&mut self, pass: &PassResult) -> Decision {
        if pass.bytes_sent >= MIN_MEASURED_BYTES && !pass.duration.is_zero() {
            let rate = pass.bytes_sent as f64 / pass.duration.as_secs_f64();
            // The latest pass counts most: the link and the guest change.
            self.bandwidth = Some(match self.bandwidth {
                Some(old) => 0.5 * old + 0.5 * rate,
                None => rate,
            });
        }
        self.estimate = self.downtime_for(pass.dirty_pages);
        if self.estimate <= self.policy.max_downtime {
            return Decision::Switchover;
        }
        if pass.elapsed >= self.policy.timeout {
            return match self.policy.on_timeout {
                OnTimeout::Abort => Decision::Abort,
                OnTimeout::Switchover => Decision::ForcedSwitchover,
            };
        }
        if self.policy.auto_converge {
            let dirty_bytes = pass.dirty_pages * 4096;
            if dirty_bytes * 2 >= pass.bytes_sent {
                self.high_dirty_passes += 1;
            } else {
                self.high_dirty_passes = 0;
            }
            if self.high_dirty_passes >= 2 {
                self.high_dirty_passes = 0;
                self.step();
            }
        }
        Decision::Continue {
            throttle: self.throttle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(auto_converge: bool, on_timeout: OnTimeout) -> Policy {
        Policy {
            max_downtime: Duration::from_millis(30),
            bandwidth: None,
            auto_converge,
            timeout: Duration::from_secs(10),
            on_timeout,
        }
    }

    fn pass(bytes: u64, ms: u64, dirty: u64, elapsed_s: u64) -> PassResult {
        PassResult {
            bytes_sent: bytes,
            duration: Duration::from_millis(ms),
            dirty_pages: dirty,
            elapsed: Duration::from_secs(elapsed_s),
        }
    }

    #[test]
    fn switches_over_when_the_rest_fits_the_downtime() {
        let mut c = Convergence::new(policy(false, OnTimeout::Abort));
        // 100 MB in 100 ms: 1 GB/s; 1000 pages = 4 MB = 4 ms.
        assert_eq!(
            c.decide(&pass(100_000_000, 100, 1000, 0)),
            Decision::Switchover
        );
        assert!((c.bandwidth() - 1e9).abs() < 1.0);
        // 25,000 pages = 100 MB = 100 ms: keep copying.
        assert_eq!(
            c.decide(&pass(100_000_000, 100, 25_000, 1)),
            Decision::Continue { throttle: 0 }
        );
    }

    #[test]
    fn auto_converge_steps_like_qemu_and_caps_at_99() {
        let mut c = Convergence::new(policy(true, OnTimeout::Abort));
        let mut seen = Vec::new();
        for i in 0..40 {
            if let Decision::Continue { throttle } = c.decide(&pass(4 << 20, 1000, 2000, i / 10)) {
                seen.push(throttle);
            }
        }
        assert_eq!(&seen[..6], &[0, 20, 20, 30, 30, 40]);
        assert_eq!(*seen.last().unwrap(), THROTTLE_MAX);
    }

    #[test]
    fn samples_during_a_long_pass_step_the_throttle() {
        let mut c = Convergence::new(policy(true, OnTimeout::Abort));
        // No bandwidth measured yet: the 100 MB/s guess; 10 MB/s of dirtying is fine.
        assert_eq!(c.sample(10e6), None);
        let steps: Vec<_> = (0..11).filter_map(|_| c.sample(80e6)).collect();
        assert_eq!(steps[..3], [20, 30, 40]);
        assert_eq!(*steps.last().unwrap(), THROTTLE_MAX);
        let mut off = Convergence::new(policy(false, OnTimeout::Abort));
        assert_eq!(off.sample(1e12), None);
    }

    #[test]
    fn the_timeout_aborts_or_switches_over_as_told() {
        let slow = pass(4 << 20, 1000, 100_000, 11);
        let mut c = Convergence::new(policy(true, OnTimeout::Abort));
        assert_eq!(c.decide(&slow), Decision::Abort);
        let mut c = Convergence::new(policy(false, OnTimeout::Switchover));
        assert_eq!(c.decide(&slow), Decision::ForcedSwitchover);
    }

    #[test]
    fn a_bandwidth_cap_bounds_the_estimate() {
        let mut p = policy(false, OnTimeout::Abort);
        p.bandwidth = Some(1 << 20);
        let mut c = Convergence::new(p);
        // 10 pages at 1 MiB/s: 39 ms > 30 ms although the link measured 1 GB/s.
        assert_eq!(
            c.decide(&pass(100_000_000, 100, 10, 0)),
            Decision::Continue { throttle: 0 }
        );
        let policy = Policy::new(&berth_schema::MigrationPolicy::default(), 512 << 20);
        assert_eq!(policy.timeout, Duration::from_secs(30));
    }
}
