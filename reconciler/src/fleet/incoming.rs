//! The destination side of a migration between hosts, for `--driver local`: the
//! [`IncomingMigrations`] the peer API calls.
//!
//! On a request it builds the guest from its own copy of the named revision (never
//! from manifest text sent over the wire), checks the guest is placed on this host and
//! neither runs nor arrives here already, and starts `berth-vmm --incoming` on the IP
//! of this host's address (its Host manifest), port chosen by the kernel. A watcher
//! follows the incoming VMM: a token unused for [`TOKEN_TTL`] is discarded (the VMM is
//! shut down), and a migration that fails is noted so that `/status` here says why.
//! Once the VMM runs the guest and hands its directory over, the local driver observes
//! it like any guest: the service has adopted it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_hypervisor::control::{Client, GuestRunState, Op};
use berth_hypervisor::migration::{MigrationPhase, MigrationStatus};
use tracing::{info, warn};

use super::peer::{
    IncomingMigration, IncomingMigrations, IncomingOutcome, IncomingRequest, PeerError,
};
use super::remote::Enforced;
use super::Coordination;
use crate::driver::local::follow::CannotTell;
use crate::driver::local::SharedStateLock;
use crate::driver::{DriverError, LocalDriver};
use crate::git::{CommitId, GitRepo};
use crate::revision::{read_revision, Trigger};

/// How long a prepared incoming VMM waits for its source before it is discarded.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);

/// Why the last migration to this host of each guest failed, for `/status`.
#[derive(Debug, Default)]
pub struct IncomingNotes {
    notes: Mutex<HashMap<String, String>>,
}

impl IncomingNotes {
    /// The note about `guest`, if its last incoming migration failed.
    pub fn get(&self, guest: &str) -> Option<String> {
        self.lock().get(guest).cloned()
    }

    fn set(&self, guest: &str, note: String) {
        self.lock().insert(guest.to_owned(), note);
    }

    fn clear(&self, guest: &str) {
        self.lock().remove(guest);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Prepares incoming VMMs with the local driver. See the module documentation.
pub struct LocalIncoming {
    local: Arc<LocalDriver>,
    state_lock: Arc<SharedStateLock>,
    enforced: Arc<Enforced>,
    repo: GitRepo,
    path: Option<String>,
    notes: Arc<IncomingNotes>,
    fleet: Option<FleetHooks>,
}

/// The fleet coordination the destination tells about arrivals, and the runtime its
/// futures run on (the watchers are plain threads).
#[derive(Clone)]
struct FleetHooks {
    coordination: Arc<dyn Coordination>,
    runtime: tokio::runtime::Handle,
}

impl LocalIncoming {
    /// Prepares with `local`, holding `state_lock` (the service's) while it starts an
    /// incoming VMM, reading revisions other than the enforced one from `repo` (under
    /// `path`), noting failures in `notes`.
    pub fn new(
        (local, state_lock): (Arc<LocalDriver>, Arc<SharedStateLock>),
        enforced: Arc<Enforced>,
        repo: GitRepo,
        path: Option<String>,
        notes: Arc<IncomingNotes>,
    ) -> Self {
        LocalIncoming {
            local,
            state_lock,
            enforced,
            repo,
            path,
            notes,
            fleet: None,
        }
    }

    /// Checks each request against `coordination` (the guest must be moving here from
    /// its sender) and tells it when a guest arrived or its migration ended before
    /// `Commit`; its futures run on `runtime`.
    pub fn with_coordination(
        mut self,
        coordination: Arc<dyn Coordination>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        self.fleet = Some(FleetHooks {
            coordination,
            runtime,
        });
        self
    }

    fn desired_at(&self, revision: &str) -> Result<Arc<crate::model::Desired>, PeerError> {
        let commit = CommitId::parse(revision)
            .ok_or_else(|| PeerError::Refused(format!("{revision:?} is not a commit id")))?;
        if let Some((enforced, desired)) = self.enforced.get() {
            if enforced == commit {
                return Ok(desired);
            }
        }
        let read = read_revision(&self.repo, self.path.as_deref(), &commit, Trigger::Poll)
            .map_err(|e| {
                PeerError::Refused(format!(
                    "revision {} cannot be read here ({}); is the repository fetched?",
                    commit.short(),
                    berth_hypervisor::report::one_line(&e)
                ))
            })?;
        read.manifests.map_err(|invalid| {
            PeerError::Refused(format!(
                "revision {} is invalid ({} errors)",
                commit.short(),
                invalid.error_count()
            ))
        })
    }
}

impl LocalIncoming {
    /// Discards every incoming VMM that does not run its guest yet (SIGTERM: the
    /// migrations fail before their commit and the guests stay on their sources).
    pub fn abort_pending(&self) {
        let Ok(entries) = std::fs::read_dir(self.local.state_dir().join("guests")) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let Some(guest) = dir_name.strip_suffix(".incoming") else {
                continue;
            };
            let Some(status) = incoming_status(&self.local, guest) else {
                continue;
            };
            if status.phase == MigrationPhase::Completed {
                continue;
            }
            info!(guest, phase = ?status.phase, "stopping: discarding the incoming migration");
            let _ = Client::connect(entry.path().join("control.sock"))
                .and_then(|c| c.shutdown(Duration::from_secs(5)));
        }
    }
}

impl IncomingMigrations for LocalIncoming {
    fn prepare(&self, request: &IncomingRequest) -> Result<IncomingMigration, PeerError> {
        let me = self.local.host();
        let name = &request.guest;
        let desired = self.desired_at(&request.revision)?;
        let guest = desired
            .guests
            .iter()
            .find(|g| &g.metadata.name == name)
            .ok_or_else(|| PeerError::Refused(format!("no guest {name} in that revision")))?;
        if guest.spec.placed_by_selector() {
            // The revision names no host: the fleet's leader placed it (then the
            // ownership record, checked below, must say it moves here), or, with no
            // fleet store, every host places it alike from the revision.
            let leader = self
                .fleet
                .as_ref()
                .is_some_and(|f| f.coordination.leader_places());
            if !leader {
                let mut placed = (*desired).clone();
                crate::scheduler::place(&mut placed, &crate::model::Observed::default());
                let host = placed
                    .guests
                    .iter()
                    .find(|g| &g.metadata.name == name)
                    .map(|g| g.spec.host.clone())
                    .unwrap_or_default();
                if host != me {
                    return Err(PeerError::Refused(format!(
                        "{name} is placed by selector on {}, not on {me}, in that revision",
                        if host.is_empty() { "no host" } else { &host }
                    )));
                }
            }
        } else if guest.spec.host != me {
            return Err(PeerError::Refused(format!(
                "{name} is placed on {}, not on {me}, in that revision",
                guest.spec.host
            )));
        }
        if let Some(fleet) = &self.fleet {
            fleet
                .runtime
                .block_on(fleet.coordination.expects_incoming(name, &request.from))
                .map_err(|e| PeerError::Refused(berth_hypervisor::report::one_line(&e)))?;
        }
        let address = desired
            .hosts
            .iter()
            .find(|h| h.metadata.name == me)
            .map(|h| h.spec.address.clone())
            .ok_or_else(|| PeerError::Refused(format!("host {me} has no Host manifest")))?;
        let ip = address
            .parse::<SocketAddr>()
            .map_err(|e| PeerError::Failed(format!("the address of {me} ({address}): {e}")))?
            .ip();
        // Starting a VMM acts on this host's guests: under the state lock, as every
        // action of the service (an apply by hand meanwhile makes this one "not now").
        let hold = self.state_lock.hold().map_err(PeerError::Busy)?;
        let prepared = self
            .local
            .prepare_incoming(guest, &SocketAddr::new(ip, 0).to_string());
        drop(hold);
        let (pid, listen, token) = prepared.map_err(|e| match e {
            DriverError::Refused(m) | DriverError::NotFound(m) => PeerError::Refused(m),
            DriverError::Capacity { detail, .. } => PeerError::Capacity(detail),
            other => PeerError::Failed(other.to_string()),
        })?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|e| PeerError::Failed(format!("the incoming VMM's address {listen}: {e}")))?;
        info!(guest = %name, from = %request.from, %listen, pid, "incoming VMM ready");
        self.notes.clear(name);
        let (local, notes, guest, from, fleet) = (
            Arc::clone(&self.local),
            Arc::clone(&self.notes),
            name.clone(),
            request.from.clone(),
            self.fleet.clone(),
        );
        let watcher = std::thread::Builder::new()
            .name("incoming-watch".into())
            .spawn(move || {
                let arrived = watch(&local, &notes, &guest, &from, pid);
                if let Some(fleet) = fleet {
                    let c = &fleet.coordination;
                    match arrived {
                        Arrival::Arrived => {
                            if fleet.runtime.block_on(c.arrived(&guest, &from)) {
                                forget_committed(&local, &guest, pid);
                            }
                        }
                        Arrival::NeverRan => {
                            fleet.runtime.block_on(c.incoming_failed(&guest, &from))
                        }
                        Arrival::Unknown => {}
                    }
                }
            });
        if let Err(e) = watcher {
            warn!(error = %e, "cannot watch the incoming VMM; an unused token will not expire");
        }
        Ok(IncomingMigration { listen, token })
    }

    fn running(&self, guest: &str) -> Result<IncomingOutcome, PeerError> {
        let outcome = |running: bool, status: Option<&MigrationStatus>| IncomingOutcome {
            running,
            downtime_ms: status.and_then(|s| s.downtime_ms),
        };
        let incoming = incoming_status(&self.local, guest);
        if let Some(status) = &incoming {
            return match status.phase {
                MigrationPhase::Completed => Ok(outcome(true, Some(status))),
                MigrationPhase::Failed | MigrationPhase::Cancelled => Ok(outcome(false, None)),
                phase => Err(PeerError::CannotTell(CannotTell::Incoming {
                    guest: guest.to_owned(),
                    phase,
                })),
            };
        }
        if self.local.incoming_under_way(guest) {
            return Err(PeerError::CannotTell(CannotTell::IncomingSilent {
                guest: guest.to_owned(),
            }));
        }
        // An incoming VMM read Commit here and the source never confirmed Running: the
        // guest ran here, even if its VMM has stopped since.
        if self.local.incoming_committed(guest) {
            return Ok(outcome(true, None));
        }
        // Handed over (or never arrived): the guest's own VMM tells.
        let socket = self.local.control_socket(guest);
        let running = Client::connect(&socket)
            .and_then(|mut c| c.status())
            .is_ok_and(|s| matches!(s.state, GuestRunState::Running | GuestRunState::Paused));
        let arrived: Option<MigrationStatus> = Client::connect(&socket)
            .and_then(|mut c| c.call(Op::MigrateStatus))
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .filter(|s: &MigrationStatus| s.role.as_deref() == Some("incoming"));
        Ok(outcome(running, arrived.as_ref()))
    }
}

/// Removes the committed marker the incoming VMM `pid` left (its source did not
/// confirm `Running`) once the ownership record names this host.
fn forget_committed(local: &LocalDriver, guest: &str, pid: i32) {
    match local.forget_committed(guest, pid) {
        Ok(true) => info!(
            guest,
            pid, "the ownership record names this host: the committed marker is no longer needed, removed"
        ),
        Ok(false) => {}
        Err(e) => warn!(guest, error = %e, "cannot remove the committed marker"),
    }
}

fn incoming_status(local: &LocalDriver, guest: &str) -> Option<MigrationStatus> {
    let socket = local
        .state_dir()
        .join("guests")
        .join(format!("{guest}.incoming"))
        .join("control.sock");
    Client::connect(socket)
        .and_then(|mut c| c.call(Op::MigrateStatus))
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// How an incoming migration ended.
enum Arrival {
    /// The guest runs here.
    Arrived,
    /// The incoming VMM ended before `Commit`: the guest never ran here.
    NeverRan,
    /// The VMM read `Commit` and ended without handing over (its committed marker
    /// stays): the guest counts as run here; a person decides.
    Unknown,
}

/// Follows the incoming VMM `pid` of `guest` until it hands over or exits.
fn watch(local: &LocalDriver, notes: &IncomingNotes, guest: &str, from: &str, pid: i32) -> Arrival {
    let started = Instant::now();
    let mut last: Option<MigrationStatus> = None;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let alive = crate::driver::local::process_exists(pid);
        match incoming_status(local, guest) {
            Some(status) => {
                if status.phase == MigrationPhase::Listening && started.elapsed() > TOKEN_TTL {
                    warn!(
                        guest,
                        from, "the migration never came; discarding the incoming VMM"
                    );
                    notes.set(
                        guest,
                        format!("the migration from {from} never came within {TOKEN_TTL:?}; the incoming VMM was discarded"),
                    );
                    let _ = Client::connect(
                        local
                            .state_dir()
                            .join("guests")
                            .join(format!("{guest}.incoming"))
                            .join("control.sock"),
                    )
                    .and_then(|c| c.shutdown(Duration::from_secs(5)));
                    return Arrival::NeverRan;
                }
                last = Some(status);
            }
            None if alive && !local.incoming_under_way(guest) => {
                info!(guest, from, pid, "the guest arrived and runs here");
                notes.clear(guest);
                return Arrival::Arrived;
            }
            None if alive => {}
            None => {
                let ended = last
                    .as_ref()
                    .map(|s| (s.phase, s.error.clone()))
                    .unwrap_or((MigrationPhase::Failed, None));
                if ended.0 != MigrationPhase::Completed {
                    let why = ended.1.unwrap_or_else(|| {
                        "the incoming VMM exited before the switchover".to_owned()
                    });
                    warn!(guest, from, error = %why, "incoming migration failed");
                    notes.set(
                        guest,
                        format!(
                            "the migration from {from} failed: {why}; the guest stays on {from}"
                        ),
                    );
                }
                let marker = berth_hypervisor::migration::incoming::committed_marker(
                    local.state_dir(),
                    guest,
                );
                return if marker.exists() || ended.0 == MigrationPhase::Completed {
                    Arrival::Unknown
                } else {
                    Arrival::NeverRan
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::driver::local::StateLock;

    /// Preparing starts a VMM, an action on this host's guests: while `berth apply`
    /// holds the state lock it is refused as "not now" (503 to the source, which tries
    /// again later), before anything is made; once the lock is free it goes on.
    /// A `LocalIncoming` of host kvm01 (state in `tmp/state`), guest web-1 placed on it,
    /// and the revision that places it.
    fn kvm01(tmp: &std::path::Path) -> (LocalIncoming, PathBuf, CommitId) {
        let repo_dir = tmp.join("repo");
        std::fs::create_dir_all(&repo_dir).unwrap();
        let init = std::process::Command::new("git")
            .args(["init", "-q"])
            .current_dir(&repo_dir)
            .status()
            .unwrap();
        assert!(init.success());
        let state = tmp.join("state");
        let local = Arc::new(LocalDriver::new(
            "kvm01",
            &state,
            PathBuf::from("/nonexistent/berth-vmm"),
        ));
        let desired = crate::model::desired_from_yaml([
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
             spec: {address: \"127.0.0.1:7410\", cpus: \"0-1\", memory: 4GiB}\n",
            "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\n\
             spec: {host: kvm01, cpu: {vcpus: 1}, memory: {size: 64MiB}}\n",
        ]);
        let commit = CommitId::parse(&"a".repeat(40)).unwrap();
        let enforced = Arc::new(Enforced::default());
        enforced.set(&commit, &Arc::new(desired));
        let incoming = LocalIncoming::new(
            (local, Arc::new(SharedStateLock::new(&state, "berth serve"))),
            enforced,
            GitRepo::open(&repo_dir).unwrap(),
            None,
            Arc::new(IncomingNotes::default()),
        );
        (incoming, state, commit)
    }

    #[test]
    fn prepare_takes_the_state_lock_and_refuses_while_apply_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (incoming, state, commit) = kvm01(tmp.path());
        let request = IncomingRequest {
            guest: "web-1".into(),
            from: "kvm02".into(),
            revision: commit.to_string(),
        };

        let apply = StateLock::acquire(&state, false, "berth apply").unwrap();
        let busy = incoming.prepare(&request).unwrap_err();
        let text = busy.to_string();
        assert!(matches!(busy, PeerError::Busy(_)), "{text}");
        assert!(
            text.starts_with(&format!(
                "not now: berth apply (pid {}) holds",
                std::process::id()
            )),
            "{text}"
        );
        assert!(
            !state.join("guests").exists(),
            "nothing was made under the lock of apply"
        );

        // Free: preparing goes on (and fails here only for want of a berth-vmm). A child
        // that another test of this binary forks holds a copy of a released lock until
        // it execs: "not now" is retried for that moment, as the source does.
        drop(apply);
        let error = StateLock::retry_while_held(|| incoming.prepare(&request)).unwrap_err();
        assert!(!matches!(error, PeerError::Busy(_)), "{error}");
        assert!(error.to_string().contains("berth-vmm"), "{error}");
        // And it held the lock only while it acted.
        StateLock::wait_free(&state);
    }

    /// An incoming VMM that read `Commit` here and is gone (the guest stopped, or it
    /// died) leaves its committed marker while its source has not confirmed `Running`:
    /// the answer to that source stays "it runs here", never "no" (which would resume
    /// its stale copy). The marker goes only for the VMM that wrote it.
    #[test]
    fn a_committed_marker_answers_ran_until_it_is_forgotten_by_its_own_vmm() {
        use berth_hypervisor::migration::{incoming as vmm_incoming, receive};
        let tmp = tempfile::tempdir().unwrap();
        let (incoming, state, _) = kvm01(tmp.path());
        assert!(!incoming.running("web-1").unwrap().running);
        let marker = vmm_incoming::committed_marker(&state, "web-1");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        receive::write_committed_marker(&marker).unwrap();
        assert!(incoming.running("web-1").unwrap().running);
        // The marker names this process's pid (it wrote it): another VMM's is kept.
        let me = std::process::id() as i32;
        assert!(!incoming.local.forget_committed("web-1", me + 1).unwrap());
        assert!(incoming.running("web-1").unwrap().running);
        assert!(incoming.local.forget_committed("web-1", me).unwrap());
        assert!(!marker.parent().unwrap().exists());
        assert!(!incoming.running("web-1").unwrap().running);
    }
}
