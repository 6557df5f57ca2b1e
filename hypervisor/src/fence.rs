//! Self-fencing: a deadline this VMM enforces on its own unless `berth serve` keeps
//! renewing it (the `fenceDeadline` control request), as Proxmox's watchdog-mux does for
//! its nodes.
//!
//! `berth serve` arms it for a guest that must be restarted elsewhere when its host
//! fails (an HA guest), renewing it while the host's etcd lease is held, each time to
//! the moment the host must have fenced itself. When the renewals stop, because `serve`
//! died, hangs or lost etcd, the VMM stops the guest at the deadline and exits, before
//! the lease can expire and another host restart the guest. The VMM outlives the
//! service, so the fence cannot rest on the service. For the same reason it is armed
//! from the VMM's start (`berth-vmm run --fence-file`, [`read_deadline_file`]), before
//! the service could renew it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::vmm::Vmm;

/// How long the vCPUs get to stop once the deadline passes.
const STOP_TIMEOUT: Duration = Duration::from_millis(500);
/// How long after the deadline the process exits even if the orderly shutdown hangs.
const EXIT_AFTER: Duration = Duration::from_millis(1500);

/// Arguments of `fenceDeadline`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FenceArgs {
    /// Stop the guest this many milliseconds from now unless renewed before; absent
    /// disarms the fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_ms: Option<u64>,
}

/// The reply to `fenceDeadline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FenceState {
    /// Whether a deadline is set.
    pub armed: bool,
    /// Milliseconds until the deadline, when armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<u64>,
}

/// The deadline and the thread that enforces it (started when first armed).
#[derive(Debug)]
pub struct Fence {
    deadline: Mutex<Option<Instant>>,
    changed: Condvar,
    watcher: Once,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            deadline: Mutex::new(None),
            changed: Condvar::new(),
            watcher: Once::new(),
        }
    }
}

fn lock(m: &Mutex<Option<Instant>>) -> MutexGuard<'_, Option<Instant>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fence {
    /// How long until the deadline, while one is armed (zero once it passed).
    pub fn remaining(&self) -> Option<Duration> {
        lock(&self.deadline).map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Arms, renews or (with `in_ms: None`) disarms the fence of `vmm`.
    pub fn set(&self, vmm: &Arc<Vmm>, args: FenceArgs) -> FenceState {
        let now = Instant::now();
        let deadline = args.in_ms.map(|ms| now + Duration::from_millis(ms));
        *lock(&self.deadline) = deadline;
        if deadline.is_some() {
            let vmm = Arc::clone(vmm);
            self.watcher.call_once(move || {
                let spawned = std::thread::Builder::new()
                    .name("fence".into())
                    .spawn(move || watch(&vmm));
                if spawned.is_err() {
                    // Without the watcher the deadline cannot be kept: stop now rather
                    // than run a guest that believes it is fenced.
                    eprintln!("berth-vmm: cannot start the fence thread; exiting");
                    std::process::exit(3);
                }
            });
        }
        self.changed.notify_all();
        FenceState {
            armed: deadline.is_some(),
            remaining_ms: deadline.map(|d| d.saturating_duration_since(now).as_millis() as u64),
        }
    }
}

/// Now on `CLOCK_MONOTONIC`, in milliseconds: the clock of the deadline in a fence file
/// ([`read_deadline_file`]), shared by every process of the host and set by no one.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer it is given;
    // CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// How long until `at` (a [`monotonic_ms`] value); `None` once it has passed.
fn left_until(at: u64) -> Option<Duration> {
    at.checked_sub(monotonic_ms())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// How long is left until the deadline in the fence file at `path` (`berth-vmm run
/// --fence-file`): one line, the `CLOCK_MONOTONIC` milliseconds by which this host must
/// have fenced itself, which `berth serve` writes afresh each time it renews the VMMs'
/// deadlines and only while its etcd lease is held.
///
/// # Errors
/// The file cannot be read or parsed, or its deadline has passed (the service died, or
/// the lease is in doubt): a guest must not start then.
pub fn read_deadline_file(path: &std::path::Path) -> Result<Duration, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the fence deadline {}: {e}", path.display()))?;
    let at: u64 = text.trim().parse().map_err(|_| {
        format!(
            "the fence deadline {} says {:?}, not milliseconds",
            path.display(),
            text.trim()
        )
    })?;
    left_until(at).ok_or_else(|| {
        format!(
            "the fence deadline in {} has passed (berth serve stopped renewing it: it is \
             gone, or its etcd lease is in doubt)",
            path.display()
        )
    })
}

/// Waits for the deadline to pass without a renewal, then stops the guest: an orderly
/// shutdown first, the process's exit if that does not end it in time.
fn watch(vmm: &Arc<Vmm>) {
    let fence = vmm.fence();
    let mut deadline = lock(&fence.deadline);
    loop {
        match *deadline {
            None => {
                deadline = fence
                    .changed
                    .wait(deadline)
                    .unwrap_or_else(|e| e.into_inner());
            }
            Some(at) => {
                let now = Instant::now();
                if now >= at {
                    break;
                }
                deadline = fence
                    .changed
                    .wait_timeout(deadline, at - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
    drop(deadline);
    vmm.request_shutdown(
        Some(STOP_TIMEOUT.as_millis() as u64),
        "fence deadline passed without a renewal from berth serve",
    );
    std::thread::sleep(EXIT_AFTER);
    eprintln!("berth-vmm: the fence shutdown did not finish in time; exiting");
    std::process::exit(3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_file_gives_the_time_left_or_why_not_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fence-deadline");
        let missing = read_deadline_file(&file).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
        std::fs::write(&file, "soon\n").unwrap();
        let garbage = read_deadline_file(&file).unwrap_err();
        assert!(garbage.contains("not milliseconds"), "{garbage}");
        std::fs::write(&file, format!("{}\n", monotonic_ms().saturating_sub(1))).unwrap();
        let passed = read_deadline_file(&file).unwrap_err();
        assert!(passed.contains("has passed"), "{passed}");
        std::fs::write(&file, format!("{}\n", monotonic_ms() + 5000)).unwrap();
        let left = read_deadline_file(&file).unwrap();
        assert!(
            left <= Duration::from_secs(5) && left > Duration::from_secs(4),
            "{left:?}"
        );
    }
}
