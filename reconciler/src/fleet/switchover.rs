//! Unknown switchovers of migrations away from this host, resolved even when the
//! service that started the migration died.
//!
//! Once a source VMM has sent `Commit` it never resumes the guest by itself; when the
//! destination's `Running` does not come back it reports `switchoverUnknown` and keeps
//! the guest paused until `migrateResolve` says whether the destination runs it. The
//! migration that started it asks the destination at once ([`super::remote`]); when it
//! cannot get an answer in time, or when the service was SIGKILLed and started again,
//! the [`Resolver`] takes over.
//!
//! The resolver looks at every VMM of this host when the service starts, every resync
//! interval, and when a migration hands an unknown switchover over
//! ([`Switchovers::kick`]). For each VMM in `switchoverUnknown` that no migration of
//! this process follows, it asks the destination recorded for it before the migration
//! started ([`crate::driver::local::OutgoingRecord`]): the destination's service
//! (`GET /v1/migrations/incoming/{guest}`, over mutual TLS: only a server with the
//! fleet's certificate for that host can answer) for a migration to another
//! host, the incoming VMM for a local one. Then it calls `migrateResolve`: the
//! destination runs the guest, the copy here is dropped; it does not, the guest
//! resumes here.
//!
//! While the destination cannot be reached or cannot tell yet, nothing is resumed (the
//! destination might run the guest: resuming here could run it twice). The resolver
//! asks again with backoff, and the guest is shown stuck: phase `SwitchoverUnknown`
//! with a condition naming the peer and the last error in `/status`,
//! `berth_switchover_unknown{guest,peer}` at 1 in the metrics, and a warning per
//! attempt in the log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Coordination, Peer};
use crate::backoff::{BackoffPolicy, Backoffs};
use crate::conditions::{now_rfc3339, Condition, ConditionType, Reason};
use crate::driver::local::follow::CannotTell;
use crate::driver::local::{LockError, Resolved, SharedStateLock, UnknownSwitchover};
use crate::driver::{DriverError, LocalDriver};
use crate::metrics::Metrics;
use berth_hypervisor::report::one_line;

/// How long the destination's service may take to answer.
const PEER_ASK: Duration = Duration::from_secs(5);

/// Backoff between attempts on one guest: soon at first (a destination that is at
/// `Loaded` decides within its link timeout), then up to a minute.
pub const RESOLVE_BACKOFF: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

/// A switchover that could not be resolved yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The destination host, or `unknown` without a record.
    pub peer: String,
    /// Whether the migration was recorded (else nobody knows whom to ask).
    pub recorded: bool,
    /// When the first attempt failed (RFC 3339).
    pub since: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub error: String,
    /// When the next attempt is due.
    pub retry_at: Instant,
}

impl Unresolved {
    /// The condition `/status` shows on the guest.
    pub fn condition(&self) -> Condition {
        let wait = self
            .retry_at
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let (reason, message) = if self.recorded {
            (
                Reason::DestinationUnanswered,
                format!(
                    "the switchover to {peer} is unknown and {peer} has not said whether it \
                     runs the guest ({error}); the guest stays paused here, never resumed \
                     blindly (since {since}, attempt {attempts}, next in {wait:.1}s)",
                    peer = self.peer,
                    error = self.error,
                    since = self.since,
                    attempts = self.attempts,
                ),
            )
        } else {
            (
                Reason::DestinationNotRecorded,
                format!(
                    "the switchover is unknown and no record says where the guest went \
                     ({error}); the guest stays paused here: once you know whether the \
                     destination runs it, answer its VMM's migrateResolve by hand",
                    error = self.error,
                ),
            )
        };
        Condition::new(ConditionType::SwitchoverUnknown, true, reason, message)
    }
}

/// The switchovers the resolver could not resolve yet, for `/status`; and the way to
/// wake the resolver.
#[derive(Debug, Default)]
pub struct Switchovers {
    unresolved: Mutex<BTreeMap<String, Unresolved>>,
    kick: Notify,
}

impl Switchovers {
    /// The unresolved switchover of `guest`, if any.
    pub fn get(&self, guest: &str) -> Option<Unresolved> {
        self.lock().get(guest).cloned()
    }

    /// Makes the resolver look now (a migration handed an unknown switchover over).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Unresolved>> {
        self.unresolved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an unknown switchover could not be resolved (yet).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The destination cannot tell whether it runs the guest, or cannot be asked.
    #[error(transparent)]
    CannotTell(#[from] CannotTell),
    /// The blocking task that asks or resolves failed.
    #[error("the task resolving the switchover of {guest} failed")]
    Task {
        /// The guest.
        guest: String,
        /// The task's error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The source VMM could not be told the destination's answer.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// `berth apply` or `berth stop` by hand holds the state lock: tried again later.
    #[error("resolving the switchover of {guest}: not now: {error}")]
    Busy {
        /// The guest.
        guest: String,
        /// Who holds the lock.
        error: LockError,
    },
}

/// Whom to ask about an unknown switchover.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ask {
    /// Host `peer`, through the fleet coordination.
    Peer(Peer),
    /// The incoming VMM of a local migration.
    Local,
    /// Nobody: the migration was not recorded (or its record names another VMM).
    Unrecorded,
}

fn whom_to_ask(switchover: &UnknownSwitchover) -> Ask {
    match &switchover.record {
        Some(record) => match &record.peer {
            Some(address) => Ask::Peer(Peer {
                name: record.to.clone(),
                address: address.clone(),
            }),
            None => Ask::Local,
        },
        None => Ask::Unrecorded,
    }
}

/// Resolves unknown switchovers. See the module documentation.
pub struct Resolver {
    local: Arc<LocalDriver>,
    state_lock: Arc<SharedStateLock>,
    coordination: Arc<dyn Coordination>,
    metrics: Arc<Metrics>,
    store: Arc<Switchovers>,
    backoffs: Backoffs,
}

impl Resolver {
    /// A resolver over the VMMs of `local`, acting under `state_lock` (the service's),
    /// asking peers through `coordination`, reporting into `store` and `metrics`.
    pub fn new(
        (local, state_lock): (Arc<LocalDriver>, Arc<SharedStateLock>),
        coordination: Arc<dyn Coordination>,
        metrics: Arc<Metrics>,
        store: Arc<Switchovers>,
    ) -> Self {
        Resolver {
            local,
            state_lock,
            coordination,
            metrics,
            store,
            backoffs: Backoffs::new(RESOLVE_BACKOFF),
        }
    }

    /// Looks now, then every `interval`, on a kick, and when an attempt is due, until
    /// `stop` turns true; `poke` wakes the reconcile loop when something changed.
    pub async fn run(
        mut self,
        interval: Duration,
        poke: Arc<Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let store = Arc::clone(&self.store);
        loop {
            if self.pass().await {
                poke.notify_one();
            }
            let retry_at = self.backoffs.next_deadline(Instant::now());
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = store.kick.notified() => {}
                () = tokio::time::sleep(interval) => {}
                () = sleep_until(retry_at), if retry_at.is_some() => {}
            }
        }
    }

    /// One look at every VMM; whether anything changed.
    async fn pass(&mut self) -> bool {
        let local = Arc::clone(&self.local);
        let Ok(found) = tokio::task::spawn_blocking(move || local.unknown_switchovers()).await
        else {
            return false;
        };
        let mut changed = false;
        // Resolved meanwhile (by hand), or the VMM is gone: nothing to show any more.
        let gone: Vec<String> = self
            .store
            .lock()
            .keys()
            .filter(|guest| !found.iter().any(|s| &s.guest == *guest))
            .cloned()
            .collect();
        for guest in gone {
            self.clear(&guest);
            changed = true;
        }
        for switchover in found {
            if !self.backoffs.ready(&switchover.guest, Instant::now()) {
                continue;
            }
            let ask = whom_to_ask(&switchover);
            let outcome = match self.answer(&switchover, &ask).await {
                Ok(running) => self.resolve(&switchover, running).await,
                Err(e) => Err(e),
            };
            let peer = match &ask {
                Ask::Peer(peer) => peer.name.clone(),
                Ask::Local => self.local.host().to_owned(),
                Ask::Unrecorded => "unknown".to_owned(),
            };
            match outcome {
                Ok(resolved) => {
                    self.resolved(&switchover.guest, &peer, resolved);
                    self.clear(&switchover.guest);
                }
                Err(error) => self.failed(&switchover, &ask, peer, &error),
            }
            changed = true;
        }
        changed
    }

    /// Whether the destination runs the guest.
    async fn answer(
        &self,
        switchover: &UnknownSwitchover,
        ask: &Ask,
    ) -> Result<bool, ResolveError> {
        let guest = &switchover.guest;
        match ask {
            Ask::Peer(peer) => {
                match tokio::time::timeout(
                    PEER_ASK,
                    self.coordination.incoming_outcome(peer, guest),
                )
                .await
                {
                    Ok(Ok(outcome)) => Ok(outcome.running),
                    Ok(Err(e)) => Err(CannotTell::Unasked {
                        host: peer.name.clone(),
                        source: e.source,
                    }
                    .into()),
                    Err(_) => Err(CannotTell::Timeout {
                        host: peer.name.clone(),
                        address: peer.address.clone(),
                        timeout: PEER_ASK,
                    }
                    .into()),
                }
            }
            Ask::Local => {
                let (local, guest) = (Arc::clone(&self.local), guest.clone());
                let task = tokio::task::spawn_blocking({
                    let guest = guest.clone();
                    move || local.local_incoming_runs(&guest)
                });
                let runs = task.await.map_err(|source| ResolveError::Task {
                    guest: guest.clone(),
                    source,
                })?;
                Ok(runs?)
            }
            Ask::Unrecorded => Err(CannotTell::Unrecorded {
                destination: switchover
                    .destination
                    .clone()
                    .unwrap_or_else(|| "an unknown address".to_owned()),
                error: switchover
                    .error
                    .clone()
                    .unwrap_or_else(|| "no answer after Commit".to_owned()),
            }
            .into()),
        }
    }

    async fn resolve(
        &self,
        switchover: &UnknownSwitchover,
        destination_running: bool,
    ) -> Result<Resolved, ResolveError> {
        let (local, lock) = (Arc::clone(&self.local), Arc::clone(&self.state_lock));
        let (guest, pid) = (switchover.guest.clone(), switchover.pid);
        // Resuming or dropping the guest acts on it: under the state lock, as every
        // action of the service.
        let task = tokio::task::spawn_blocking(move || {
            let _hold = lock.hold().map_err(|error| ResolveError::Busy {
                guest: guest.clone(),
                error,
            })?;
            Ok(local.resolve_switchover(&guest, pid, destination_running)?)
        });
        task.await.map_err(|source| ResolveError::Task {
            guest: switchover.guest.clone(),
            source,
        })?
    }

    fn resolved(&self, guest: &str, peer: &str, resolved: Resolved) {
        let outcome = match resolved {
            Resolved::DestinationRuns => {
                info!(
                    guest,
                    peer, "unknown switchover resolved: the destination runs the guest; the copy here was dropped"
                );
                "destination"
            }
            Resolved::ResumedHere => {
                info!(
                    guest,
                    peer, "unknown switchover resolved: the destination does not run the guest; it runs here again"
                );
                "source"
            }
            Resolved::AlreadyEnded => {
                info!(guest, peer, "unknown switchover already ended");
                return;
            }
        };
        self.metrics.switchover_resolved(outcome);
    }

    fn clear(&mut self, guest: &str) {
        self.backoffs.succeeded(guest);
        // The series carries the peer it was set with.
        if let Some(was) = self.store.lock().remove(guest) {
            self.metrics.switchover_unknown(guest, &was.peer, false);
        }
    }

    fn failed(
        &mut self,
        switchover: &UnknownSwitchover,
        ask: &Ask,
        peer: String,
        error: &ResolveError,
    ) {
        let guest = &switchover.guest;
        let error = one_line(error);
        let retry = self.backoffs.failed(guest, Instant::now());
        let wait = retry.not_before.saturating_duration_since(Instant::now());
        warn!(
            guest = %guest, peer = %peer, attempt = retry.failures, retry_in = ?wait, error = %error,
            "switchover unknown and the destination cannot tell; the guest stays paused here, never resumed blindly"
        );
        let mut store = self.store.lock();
        let since = store
            .get(guest)
            .map_or_else(now_rfc3339, |u| u.since.clone());
        if let Some(old) = store.get(guest).filter(|u| u.peer != peer) {
            // A new peer label: the old series ends.
            self.metrics.switchover_unknown(guest, &old.peer, false);
        }
        store.insert(
            guest.clone(),
            Unresolved {
                peer: peer.clone(),
                recorded: *ask != Ask::Unrecorded,
                since,
                attempts: retry.failures,
                error,
                retry_at: retry.not_before,
            },
        );
        drop(store);
        self.metrics.switchover_unknown(guest, &peer, true);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::local::OutgoingRecord;

    fn switchover(record: Option<OutgoingRecord>) -> UnknownSwitchover {
        UnknownSwitchover {
            guest: "web-1".into(),
            pid: 42,
            destination: Some("10.0.0.2:40123".into()),
            error: Some("no Running after Commit: timed out".into()),
            record,
        }
    }

    fn record(peer: Option<&str>) -> OutgoingRecord {
        OutgoingRecord {
            guest: "web-1".into(),
            to: "kvm02".into(),
            peer: peer.map(str::to_owned),
            destination: "10.0.0.2:40123".into(),
            source_pid: 42,
            destination_pid: None,
        }
    }

    /// The local driver of kvm01 over `state` (no berth-vmm: nothing is started) and
    /// the service's state lock.
    fn on_kvm01(state: &std::path::Path) -> (Arc<LocalDriver>, Arc<SharedStateLock>) {
        let vmm = std::path::PathBuf::from("/nonexistent/berth-vmm");
        (
            Arc::new(LocalDriver::new("kvm01", state, vmm)),
            Arc::new(SharedStateLock::new(state, "berth serve")),
        )
    }

    #[test]
    fn asks_whom_the_record_names() {
        assert_eq!(
            whom_to_ask(&switchover(Some(record(Some("http://10.0.0.2:7410"))))),
            Ask::Peer(Peer {
                name: "kvm02".into(),
                address: "http://10.0.0.2:7410".into()
            })
        );
        assert_eq!(whom_to_ask(&switchover(Some(record(None)))), Ask::Local);
        assert_eq!(whom_to_ask(&switchover(None)), Ask::Unrecorded);
    }

    #[test]
    fn the_condition_names_the_peer_and_the_error() {
        let unresolved = Unresolved {
            peer: "kvm02".into(),
            recorded: true,
            since: "2025-01-01T00:00:00Z".into(),
            attempts: 3,
            error: "cannot reach http://10.0.0.2:7410: connection refused".into(),
            retry_at: Instant::now() + Duration::from_secs(4),
        };
        let c = unresolved.condition();
        assert_eq!(
            (c.kind, c.status, c.reason),
            (
                ConditionType::SwitchoverUnknown,
                crate::conditions::ConditionStatus::True,
                Reason::DestinationUnanswered
            )
        );
        for part in [
            "to kvm02",
            "connection refused",
            "never resumed blindly",
            "attempt 3",
        ] {
            assert!(c.message.contains(part), "{part}: {}", c.message);
        }
        let c = Unresolved {
            recorded: false,
            peer: "unknown".into(),
            ..unresolved
        }
        .condition();
        assert_eq!(c.reason, Reason::DestinationNotRecorded);
        assert!(c.message.contains("migrateResolve"), "{}", c.message);
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_asked_again_and_nothing_is_resumed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Switchovers::default());
        let metrics = Arc::new(Metrics::new());
        let coordination = crate::fleet::http::HttpPeers::new(
            Arc::new(crate::fleet::placement::Placements::open(None)),
            crate::client::Transport::Plain {
                fleet_secret: Some(Arc::new(crate::auth::Secret::new("fleet"))),
            },
        );
        let mut resolver = Resolver::new(
            on_kvm01(tmp.path()),
            Arc::new(coordination),
            Arc::clone(&metrics),
            Arc::clone(&store),
        );
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let stuck = switchover(Some(record(Some(&server))));
        let ask = whom_to_ask(&stuck);
        let error = resolver
            .answer(&stuck, &ask)
            .await
            .expect_err("unreachable");
        assert!(one_line(&error).contains("cannot reach"), "{error}");
        resolver.failed(&stuck, &ask, "kvm02".into(), &error);
        let unresolved = store.get("web-1").expect("shown stuck");
        assert_eq!(
            (unresolved.peer.as_str(), unresolved.attempts),
            ("kvm02", 1)
        );
        assert!(
            !resolver.backoffs.ready("web-1", Instant::now()),
            "backs off"
        );
        let text = metrics.encode();
        assert!(
            text.contains("berth_switchover_unknown{guest=\"web-1\",peer=\"kvm02\"} 1"),
            "{text}"
        );
        // The VMM is gone (resolved by hand): the next look clears it.
        assert!(resolver.pass().await);
        assert!(store.get("web-1").is_none());
        assert!(!metrics.encode().contains("berth_switchover_unknown{"));
    }

    /// Resuming or dropping the guest acts on it: while `berth apply` holds the state
    /// lock the resolver does not touch the VMM, and reports "not now", naming the
    /// apply, where `/status` shows the stuck guest; once it is free, the VMM is asked.
    #[tokio::test]
    async fn the_resolver_acts_only_under_the_state_lock() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A VMM socket that notes whether it was asked (and then answers nothing).
        let dir = tmp.path().join("guests").join("web-1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let vmm = std::os::unix::net::UnixListener::bind(dir.join("control.sock")).expect("bind");
        vmm.set_nonblocking(true).expect("nonblocking");
        let store = Arc::new(Switchovers::default());
        let coordination = crate::fleet::http::HttpPeers::new(
            Arc::new(crate::fleet::placement::Placements::open(None)),
            crate::client::Transport::plain(),
        );
        let mut resolver = Resolver::new(
            on_kvm01(tmp.path()),
            Arc::new(coordination),
            Arc::new(Metrics::new()),
            Arc::clone(&store),
        );
        let stuck = switchover(Some(record(None)));

        let apply = crate::driver::local::StateLock::acquire(tmp.path(), false, "berth apply")
            .expect("lock");
        let error = resolver.resolve(&stuck, false).await.expect_err("not now");
        assert!(matches!(error, ResolveError::Busy { .. }), "{error}");
        assert!(
            vmm.accept()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "the VMM was not asked"
        );
        resolver.failed(&stuck, &Ask::Local, "kvm01".into(), &error);
        let shown = store.get("web-1").expect("shown stuck").condition();
        assert!(
            shown.message.contains(&format!(
                "not now: berth apply (pid {}) holds",
                std::process::id()
            )),
            "{}",
            shown.message
        );

        drop(apply);
        // The VMM is asked: it takes the connection and closes it (no answer). A child
        // that another test of this binary forks holds a copy of a released lock until
        // it execs: "not now" is retried for that moment, as the service does.
        vmm.set_nonblocking(false).expect("blocking");
        let asked = std::thread::spawn(move || vmm.accept().map(drop));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let error = loop {
            let error = resolver
                .resolve(&stuck, false)
                .await
                .expect_err("no answer");
            if !matches!(error, ResolveError::Busy { .. }) || std::time::Instant::now() >= deadline
            {
                break error;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        assert!(matches!(error, ResolveError::Driver(_)), "{error}");
        assert!(asked.join().expect("join").is_ok(), "the VMM was asked");
    }

    /// A man in the middle answers "kvm02 runs it" with a certificate of another CA:
    /// the resolver gets no answer, so nothing is dropped or resumed, and the guest
    /// shows stuck, naming the TLS failure. The real kvm02 is then believed.
    #[tokio::test]
    async fn a_forged_answer_without_the_fleet_certificate_resolves_nothing() {
        use crate::serve::http::testing::{serve_tls, RunsEverything};
        use crate::tls::{FleetTls, TestFiles};
        let tmp = tempfile::tempdir().expect("tempdir");
        let (fleet_dir, other_dir) = (tmp.path().join("fleet"), tmp.path().join("other"));
        std::fs::create_dir_all(&fleet_dir).expect("mkdir");
        std::fs::create_dir_all(&other_dir).expect("mkdir");
        let fleet = TestFiles::make(&fleet_dir, &["kvm01", "kvm02"]);
        let other = TestFiles::make(&other_dir, &["kvm02"]);
        let tls = FleetTls::load(&fleet.args(Some("kvm01"))).expect("tls");
        let store = Arc::new(Switchovers::default());
        let mut resolver = Resolver::new(
            on_kvm01(tmp.path()),
            Arc::new(crate::fleet::http::HttpPeers::new(
                Arc::new(crate::fleet::placement::Placements::open(None)),
                crate::client::Transport::Tls(Arc::new(tls.client().expect("client"))),
            )),
            Arc::new(Metrics::new()),
            Arc::clone(&store),
        );
        let forger = serve_tls(
            &other,
            "kvm02",
            &["kvm01", "kvm02"],
            Arc::new(RunsEverything),
        )
        .await;
        let stuck = switchover(Some(record(Some(&format!("https://{forger}")))));
        let ask = whom_to_ask(&stuck);
        let error = resolver
            .answer(&stuck, &ask)
            .await
            .expect_err("a forged answer is no answer");
        assert!(
            one_line(&error).contains("TLS with kvm02 failed"),
            "{error}"
        );
        resolver.failed(&stuck, &ask, "kvm02".into(), &error);
        let shown = store.get("web-1").expect("shown stuck").condition();
        assert!(
            shown.message.contains("TLS with kvm02 failed"),
            "{}",
            shown.message
        );

        let real = serve_tls(
            &fleet,
            "kvm02",
            &["kvm01", "kvm02"],
            Arc::new(RunsEverything),
        )
        .await;
        let stuck = switchover(Some(record(Some(&format!("https://{real}")))));
        let ask = whom_to_ask(&stuck);
        assert_eq!(resolver.answer(&stuck, &ask).await.ok(), Some(true));
    }
}
