//! The migration as the control socket sees it: the `migrate`, `migrateStatus`,
//! `migrateCancel` and `migrateResolve` arguments, and the progress a [`Migration`]
//! slot holds while a migration runs in its thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Arguments of `migrate`:
/// `{"destination":"10.0.0.2:7420","token":"<64 hex>","policy":{...},"connections":2}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateArgs {
    /// The incoming VMM's listen address (`host:port`).
    pub destination: String,
    /// The one-time token the incoming VMM reported.
    pub token: String,
    /// maxDowntime, bandwidth, autoConverge, completionTimeoutPerGiB, onTimeout (the
    /// manifest's `migration` block; absent fields take its defaults).
    #[serde(default)]
    pub policy: berth_schema::MigrationPolicy,
    /// Parallel TCP connections (default 2, at most [`super::MAX_CONNECTIONS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
}

/// Arguments of `migrateResolve`, which ends a `switchoverUnknown` state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateResolveArgs {
    /// Whether the destination runs the guest (it read `Commit`). `true`: this VMM
    /// shuts down; `false`: it resumes the guest.
    pub destination_running: bool,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MigrationPhase {
    /// No migration.
    #[default]
    Idle,
    /// Destination: waiting for the source to connect.
    Listening,
    /// Connected; checking compatibility.
    Prechecks,
    /// Copying memory while the guest runs.
    Precopy,
    /// The guest is paused; last pages and state in flight.
    Switchover,
    /// Destination: state loaded, waiting for `Commit`.
    Loaded,
    /// The guest runs on the destination; the source is shutting down.
    Completed,
    /// Failed before `Commit`: the guest runs on the source.
    Failed,
    /// Cancelled before `Commit`: the guest runs on the source.
    Cancelled,
    /// Source: `Commit` was sent and `Running` never came; the guest stays paused here
    /// until `migrateResolve`.
    SwitchoverUnknown,
}

impl MigrationPhase {
    /// Whether the migration ended: completed, failed or cancelled. `SwitchoverUnknown`
    /// has not: it waits for `migrateResolve`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }

    /// Whether a migration is under way: started and not ended.
    pub fn is_active(self) -> bool {
        self != MigrationPhase::Idle && !self.is_terminal()
    }
}

/// Progress and outcome, as `migrateStatus` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// `outgoing`, `incoming`, or absent when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The phase.
    pub phase: MigrationPhase,
    /// Destination: the address it listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Destination: the one-time token to hand to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Source: where it migrates to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// Connections in use.
    pub connections: u32,
    /// Guest RAM, bytes.
    pub guest_bytes: u64,
    /// Pre-copy passes done (1 = the full pass).
    pub pass: u32,
    /// Bytes put on the wire (frames, headers and tags included).
    pub bytes_sent: u64,
    /// Pages sent with their content.
    pub pages_sent: u64,
    /// Pages sent as zero (or skipped as zero in the first pass).
    pub zero_pages: u64,
    /// Pages dirtied since the last pass started.
    pub dirty_pages: u64,
    /// Guest dirty rate measured over the last pass, bytes/s.
    pub dirty_rate: u64,
    /// Transfer rate measured so far, bytes/s.
    pub bandwidth: u64,
    /// The pause the dirty pages would need now, ms.
    pub estimated_downtime_ms: f64,
    /// Auto-converge throttle in force, percent of vCPU time taken away.
    pub throttle_percent: u8,
    /// Since the migration started, ms.
    pub elapsed_ms: u64,
    /// Source: from pausing the guest to `Running` received, ms (once completed).
    /// Destination: from `State` read to vCPUs started, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of XSAVE area carried per vCPU (the source host's KVM area size):
    /// source once the config is sent, destination once the state is restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xsave_bytes: Option<u32>,
    /// Source: `Commit` is being sent or was sent. Until `Running` comes back the
    /// destination may run the guest, so this VMM refuses to shut down or resume as in
    /// `switchoverUnknown` ([`Migration::holds_the_only_sure_copy`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit_sent: bool,
    /// Destination: `Commit` was read and the committed marker written: the guest
    /// counts as run here, whatever happens next.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub committed: bool,
    /// Whether KVM's dirty logging is on for guest memory (read from the VM).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dirty_logging: bool,
    /// Destination: where the lock and files went after commit, or why they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relocation: Option<String>,
}

/// The migration slot of one VMM: status, cancel flag, and the answer to a
/// `switchoverUnknown`.
#[derive(Debug, Default)]
pub struct Migration {
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    resolution: Mutex<Option<bool>>,
    resolved: Condvar,
    /// Signalled (with `status`) when an outgoing migration reaches a phase where it no
    /// longer moves by itself; see [`Migration::wait_settled`].
    settled: Condvar,
}

impl Migration {
    /// The status, locked for reading or updating.
    pub fn status(&self) -> MutexGuard<'_, MigrationStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the callers of [`Migration::wait_settled`] (the source, after it set a
    /// phase that is not `prechecks`, `precopy` or `switchover`).
    pub fn notify_settled(&self) {
        let _st = self.status();
        self.settled.notify_all();
    }

    /// Waits, at most `timeout`, until the phase is no longer `prechecks`, `precopy` or
    /// `switchover` (an outgoing migration completed, failed, was cancelled or waits for
    /// `migrateResolve`), without polling; returns the phase then.
    pub fn wait_settled(&self, timeout: std::time::Duration) -> MigrationPhase {
        let moving = |st: &mut MigrationStatus| {
            matches!(
                st.phase,
                MigrationPhase::Prechecks | MigrationPhase::Precopy | MigrationPhase::Switchover
            )
        };
        let (st, _) = self
            .settled
            .wait_timeout_while(self.status(), timeout, moving)
            .unwrap_or_else(|e| e.into_inner());
        st.phase
    }

    /// A copy of the status as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(&*self.status()).unwrap_or_default()
    }

    /// Whether a migration runs (not idle and not finished).
    pub fn active(&self) -> bool {
        self.status().phase.is_active()
    }

    /// Asks the running migration to stop before `Commit`.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether cancel was asked for.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Clears the cancel flag for a new migration.
    pub fn reset_cancel(&self) {
        self.cancel.store(false, Ordering::SeqCst);
        *self.resolution.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Why this VMM must neither shut down nor resume the guest on request, if it must
    /// not: the source sent `Commit` and has no `Running` yet (the destination may run
    /// the guest; within the `Running` timeout this becomes `completed` or
    /// `switchoverUnknown`), or it is in `switchoverUnknown`. Exiting then would lose the
    /// guest if the destination did not run it; resuming would run it twice if it did.
    pub fn holds_the_only_sure_copy(&self) -> Option<&'static str> {
        let st = self.status();
        match st.phase {
            MigrationPhase::SwitchoverUnknown => Some(
                "the migration's switchover is unknown: this VMM may hold the only copy of \
                 the guest; answer it with migrateResolve",
            ),
            MigrationPhase::Switchover if st.commit_sent => Some(
                "the migration's switchover is under way (Commit sent, no Running yet): the \
                 guest may already run on the destination; wait until the migration is \
                 completed or switchoverUnknown",
            ),
            _ => None,
        }
    }

    /// Records the answer to `switchoverUnknown`.
    pub fn resolve(&self, destination_running: bool) {
        *self.resolution.lock().unwrap_or_else(|e| e.into_inner()) = Some(destination_running);
        self.resolved.notify_all();
    }

    /// Waits for [`Migration::resolve`].
    pub fn wait_resolution(&self) -> bool {
        let mut r = self.resolution.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(answer) = *r {
                return answer;
            }
            r = self.resolved.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn wait_settled_wakes_when_the_source_settles_and_not_before() {
        let m = Migration::default();
        m.status().phase = MigrationPhase::Precopy;
        // Still moving: the wait ends at its timeout, in that phase.
        let t = Instant::now();
        assert_eq!(
            m.wait_settled(Duration::from_millis(30)),
            MigrationPhase::Precopy
        );
        assert!(t.elapsed() >= Duration::from_millis(30));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                m.status().phase = MigrationPhase::Switchover;
                m.notify_settled();
                std::thread::sleep(Duration::from_millis(20));
                m.status().phase = MigrationPhase::Completed;
                m.notify_settled();
            });
            // A wakeup in `switchover` is not the end; `completed` is, long before the
            // timeout.
            let t = Instant::now();
            assert_eq!(
                m.wait_settled(Duration::from_secs(60)),
                MigrationPhase::Completed
            );
            assert!(t.elapsed() < Duration::from_secs(30));
        });
    }
}
