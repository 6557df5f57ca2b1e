//! Self-fencing: a deadline this VMM enforces on its own unless `berth serve` keeps
//! renewing it (the `fenceDeadline` control request), as Proxmox's watchdog-mux does for
//! its nodes.
//!
//! `berth serve` arms it for a guest that must be restarted elsewhere when its host
//! fails (an HA guest), renewing it while the host's etcd lease is held, each time to
//! the moment the host must have fenced itself. When the renewals stop, because `serve`
//! died, hangs or lost etcd, the VMM stops the guest at the deadline and exits, before
//! the lease can expire and another host restart the guest. The VMM outlives the
//! service, so the fence cannot rest on the service.

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
