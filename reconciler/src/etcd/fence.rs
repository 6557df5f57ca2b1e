//! The self-fence of HA guests that outlives `berth serve`: each HA guest's VMM stops
//! its guest at a deadline unless renewed (berth-vmm's `fenceDeadline`), and the service
//! renews it only while the host's lease is held, each time to the moment the host must
//! have fenced itself ([`super::LeaseHealth::vmm_fence_in`]). When the service dies,
//! hangs or loses etcd, the renewals stop and every HA guest stops at its last deadline,
//! before the lease can expire and the leader restart it elsewhere. Guests without
//! `availability: {onHostFailure: restart}` get no deadline: an etcd outage never
//! touches them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::HostSession;

/// Renews the fence deadline of the VMMs `sockets` names (HA guests running here; each
/// call asks anew) every `every`, while the lease is held, until `stop` turns true.
/// A socket that does not answer is skipped (the guest is not running here).
pub async fn keep_fences(
    session: Arc<HostSession>,
    sockets: impl Fn() -> Vec<PathBuf> + Send + 'static,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if let Some(left) = session.health().vmm_fence_in(Instant::now()) {
            let paths = sockets();
            let renewed = tokio::task::spawn_blocking(move || {
                for path in paths {
                    let renew = berth_hypervisor::control::Client::connect(&path)
                        .and_then(|mut c| c.fence_deadline(Some(left)));
                    if let Err(e) = renew {
                        tracing::debug!(socket = %path.display(), error = %e, "fence deadline not renewed");
                    }
                }
            });
            let _ = renewed.await;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
