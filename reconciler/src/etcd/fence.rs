//! The self-fence of HA guests that outlives `berth serve`: each HA guest's VMM stops
//! its guest at a deadline unless renewed (berth-vmm's `fenceDeadline`), and the service
//! renews it only while the host's lease is held, each time to the moment the host must
//! have fenced itself ([`super::LeaseHealth::vmm_fence_in`]). When the service dies,
//! hangs or loses etcd, the renewals stop and every HA guest stops at its last deadline,
//! before the lease can expire and the leader restart it elsewhere. Guests without
//! `availability: {onHostFailure: restart}` get no deadline: an etcd outage never
//! touches them.
//!
//! The fence follows where a guest *runs*, not where it is placed: an HA guest whose
//! placement moved to another host keeps running here until its migration ends, so its
//! deadline is renewed meanwhile (else it would stop mid-migration). A guest that is no
//! longer HA has its deadline taken away once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::HostSession;

/// What one round of [`keep_fences`] does.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FenceTargets {
    /// VMMs whose deadline is renewed (HA guests running here).
    pub renew: Vec<PathBuf>,
    /// VMMs whose deadline is taken away (guests running here that may have had one and
    /// are no longer HA).
    pub disarm: Vec<PathBuf>,
}

/// The guests of one round: `renew` the HA guests among those running `here`; `disarm`
/// those running here that were renewed last round (`renewed_before`) or may have been
/// armed by an earlier service (all of them, the first round) and are not HA now.
/// Returns (renew, disarm), by name.
pub fn fence_round(
    here: &[String],
    ha: &BTreeSet<String>,
    renewed_before: &BTreeSet<String>,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let renew: BTreeSet<String> = here.iter().filter(|g| ha.contains(*g)).cloned().collect();
    let disarm = here
        .iter()
        .filter(|g| renewed_before.contains(*g) && !renew.contains(*g))
        .cloned()
        .collect();
    (renew, disarm)
}

/// Renews the fence deadlines of the VMMs `targets` names (each call asks anew) every
/// `every`, while the lease is held, and takes away those it says, until `stop` turns
/// true. A socket that does not answer is skipped (the guest is not running here).
///
/// Every `every` it also writes the deadline, as `CLOCK_MONOTONIC` milliseconds, to
/// `deadline_file` (when given; [`begin_deadline_file`] wrote it first): a VMM that is
/// starting, and cannot be asked yet, arms its fence from it (`berth-vmm run
/// --fence-file`). Only while the lease is held: once it is in doubt the file keeps its
/// last deadline, which passes on its own.
pub async fn keep_fences(
    session: Arc<HostSession>,
    mut targets: impl FnMut() -> FenceTargets + Send + 'static,
    every: Duration,
    deadline_file: Option<PathBuf>,
    mut stop: watch::Receiver<bool>,
) {
    if let Some(file) = deadline_file {
        // On a timer of its own: a VMM slow to answer a renewal must not leave the file
        // stale (new HA guests would be refused).
        tokio::spawn(keep_deadline_file(
            Arc::clone(&session),
            file,
            every,
            stop.clone(),
        ));
    }
    loop {
        if session.health().vmm_fence_in(Instant::now()).is_some() {
            let round = targets();
            let session = Arc::clone(&session);
            let renewed = tokio::task::spawn_blocking(move || {
                for path in round.disarm {
                    let disarm = berth_hypervisor::control::Client::connect(&path)
                        .and_then(|mut c| c.fence_deadline(None));
                    if let Err(e) = disarm {
                        tracing::debug!(socket = %path.display(), error = %e, "fence deadline not taken away");
                    }
                }
                for path in round.renew {
                    // Reckoned for each VMM just before it is asked: one slow to answer
                    // must not push the next one's deadline past the lease's.
                    let Some(left) = session.health().vmm_fence_in(Instant::now()) else {
                        break;
                    };
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

/// [`publish_deadline`] every `every` until `stop`.
async fn keep_deadline_file(
    session: Arc<HostSession>,
    file: PathBuf,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // The first write was [`begin_deadline_file`]'s.
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
        publish_logged(&session, &file);
    }
}

/// Starts the fence deadline file `file` afresh, before any guest can be started: one
/// left from an earlier boot (whose clock was ahead) goes, then the deadline is written
/// while the lease is held. [`keep_fences`] keeps it current from then on.
pub fn begin_deadline_file(session: &HostSession, file: &std::path::Path) {
    let _ = std::fs::remove_file(file);
    publish_logged(session, file);
}

/// [`publish_deadline`], with a failure logged.
fn publish_logged(session: &HostSession, file: &std::path::Path) {
    if let Err(e) = publish_deadline(session, file) {
        tracing::warn!(file = %file.display(), error = %e, "cannot write the fence deadline; HA guests cannot start here until it is");
    }
}

/// Writes the moment this host must have fenced itself, as `CLOCK_MONOTONIC`
/// milliseconds, to `file` (whole: beside it, then renamed over it), while the lease is
/// held; returns whether it did. A file that cannot be written is removed, so that no
/// VMM reads an old deadline (one written before a reboot reads as far ahead: the
/// clock starts again at boot). See [`keep_fences`].
///
/// # Errors
/// The file cannot be written.
fn publish_deadline(session: &HostSession, file: &std::path::Path) -> std::io::Result<bool> {
    // The clock first, then the time left: the deadline written errs early, never late.
    let base = berth_hypervisor::fence::monotonic_ms();
    let Some(left) = session.health().vmm_fence_in(Instant::now()) else {
        return Ok(false);
    };
    let at = base + left.as_millis() as u64;
    let mut staged = file.as_os_str().to_owned();
    staged.push(".new");
    let written =
        std::fs::write(&staged, format!("{at}\n")).and_then(|()| std::fs::rename(&staged, file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_file(file);
        return Err(e);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn fences_follow_the_guests_that_run_here() {
        let here: Vec<String> = ["db-1", "web-1", "batch-1"].map(str::to_owned).to_vec();
        // db-1 and web-1 are HA; web-1 may be placed elsewhere meanwhile (moving away):
        // it runs here, so its deadline is renewed. api-1 is HA but does not run here.
        let ha = names(&["db-1", "web-1", "api-1"]);
        // The first round disarms every non-HA guest running here once (an earlier
        // service may have armed it).
        let (renew, disarm) = fence_round(&here, &ha, &here.iter().cloned().collect());
        assert_eq!(renew, names(&["db-1", "web-1"]));
        assert_eq!(disarm, names(&["batch-1"]));
        // Then nothing is disarmed while nothing changes.
        let (again, none) = fence_round(&here, &ha, &renew);
        assert_eq!(again, renew);
        assert!(none.is_empty());
        // A commit takes HA away from web-1: disarmed once, then left alone.
        let ha = names(&["db-1", "api-1"]);
        let (renew2, disarm2) = fence_round(&here, &ha, &again);
        assert_eq!(renew2, names(&["db-1"]));
        assert_eq!(disarm2, names(&["web-1"]));
        let (_, disarm3) = fence_round(&here, &ha, &renew2);
        assert!(disarm3.is_empty());
        // A guest that stopped running here is neither renewed nor disarmed.
        let (renew4, disarm4) = fence_round(&["batch-1".to_owned()], &ha, &renew2);
        assert!(renew4.is_empty() && disarm4.is_empty());
    }
}
