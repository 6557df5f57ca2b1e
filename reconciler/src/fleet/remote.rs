//! `berth serve --driver local`: the local driver, plus what only the service can do
//! because it knows the other hosts: a live migration to another host (the source side,
//! driven from here) and the source half of a cold move.
//!
//! A live migration from this host A to host B:
//! 1. A asks B's service to prepare an incoming VMM (`POST /v1/migrations/incoming`
//!    over mutual TLS, naming the guest and the revision A plans from); B builds
//!    it from its own copy of that revision and answers with the listen address and a
//!    one-time token ([`super::incoming`]).
//! 2. A tells the guest's VMM to migrate there and follows its progress until it
//!    completes or fails ([`crate::driver::local::follow`], as for a local
//!    migration); on failure the guest keeps running here. What the VMM reports
//!    (time, downtime, bytes) goes into the metrics.
//! 3. On SIGTERM ([`ServeDriver::cancel`]) a migration before its switchover is
//!    cancelled (`migrateCancel`): the guest stays here.
//!
//! The local driver sees this host only, so the plan of a move is made against what
//! the destination last said of itself, asked through the fleet coordination (etcd's
//! host record with `--etcd`, else the destination's `/status`): only the destinations
//! of pending moves are asked, every 2 s while the move is pending
//! ([`ServeDriver::follow_destinations`], which wakes the loop when one becomes
//! observed); no host polls the fleet. A destination silent for 15 s is unobserved:
//! moves to it are blocked, with that reason, until it answers again.
//!
//! With `--etcd` the guest's ownership record is handed over on the way
//! ([`super::etcd`]): every action here first checks this host still holds it.
//!
//! A `switchoverUnknown` outcome (the source sent the commit but lost the link before
//! the destination's answer) is resolved by asking B whether its VMM runs the guest;
//! while B cannot tell, the guest stays paused here rather than risk two copies. Where
//! the migration went is recorded in the state directory before it starts
//! ([`crate::driver::local::OutgoingRecord`]); when B cannot tell within
//! [`RESOLVE_INLINE`], or this service dies meanwhile, the
//! [`super::switchover::Resolver`] goes on asking, also after a restart.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use berth_hypervisor::control::{Client, Op};
use berth_hypervisor::migration::MigrateArgs;
use berth_schema::Guest;
use tracing::{info, warn};

use super::peer::IncomingRequest;
use super::switchover::Switchovers;
use super::{Coordination, Peer};
use crate::diff::{Field, HostSetting};
use crate::driver::local::follow::{follow, CannotTell, Destination, Follow, FollowError};
use crate::driver::local::{process_exists, OutgoingRecord};
use crate::driver::{Driver, DriverError, DriverKind, LocalDriver, Scope};
use crate::git::CommitId;
use crate::metrics::Metrics;
use crate::model::{Desired, Observed, ObservedHost};
use crate::scheduler::{PlacementIndex, Placer};

/// The longest a migration to another host may run before it is cancelled (the
/// policy's completion timeout applies inside the VMM first).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

/// How long the source VMM gets to exit after a completed migration.
const SOURCE_EXIT: Duration = Duration::from_secs(10);

/// How long a migration asks the destination about an unknown switchover itself
/// before it leaves it to the resolver: longer than the destination's link timeout, so
/// that a destination that never read `Commit` has given up by then.
pub const RESOLVE_INLINE: Duration = Duration::from_secs(10);

/// How often, and how long each time, the destination is asked meanwhile.
const ASK_INTERVAL: Duration = Duration::from_millis(200);
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the destinations of pending moves are asked how they are (for planning
/// migrations to them).
const PEER_REFRESH: Duration = Duration::from_secs(2);

/// How long a peer's last answer is planned with; after that it counts as unobserved
/// and migrations to it are blocked, with that reason.
const PEER_STALE: Duration = Duration::from_secs(15);

/// The revision being enforced, shared by the loop (which sets it), the migration
/// source (which names it to the destination) and the destination (which builds the
/// incoming VMM from it).
#[derive(Default)]
pub struct Enforced {
    inner: RwLock<Option<(CommitId, Arc<Desired>)>>,
    /// Where the fleet's leader places selector-placed guests, when a leader does.
    placer: RwLock<Option<Arc<dyn Placer>>>,
    /// Without a leader: where the scheduler places them on the enforced revision alone
    /// (every host up, no previous placement), worked out once per revision.
    scheduled: RwLock<Option<Arc<PlacementIndex>>>,
}

impl std::fmt::Debug for Enforced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforced")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Enforced {
    /// Places selector-placed guests with `placer` (the fleet leader's records) in
    /// [`Enforced::host_of`]; without one, by the revision's own scheduling.
    pub fn place_with(&self, placer: Arc<dyn Placer>) {
        *self.placer.write().unwrap_or_else(|e| e.into_inner()) = Some(placer);
    }

    /// The host the enforced revision places `guest` on (as the reconcile loop places
    /// it), when it has one.
    pub fn host_of(&self, guest: &Guest) -> Option<String> {
        if !guest.spec.placed_by_selector() {
            return Some(guest.spec.host.clone()).filter(|h| !h.is_empty());
        }
        let name = &guest.metadata.name;
        let placement = match &*self.placer.read().unwrap_or_else(|e| e.into_inner()) {
            Some(placer) => placer.placement(name),
            None => self
                .scheduled
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(|s| s.placement(name)),
        };
        placement?.host().map(str::to_owned)
    }

    /// Records a newly enforced revision (shared, not copied).
    pub fn set(&self, commit: &CommitId, desired: &Arc<Desired>) {
        let leader = self
            .placer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let scheduled = (!leader && desired.guests.iter().any(|g| g.spec.placed_by_selector()))
            .then(|| {
                Arc::new(PlacementIndex::new(crate::scheduler::schedule(
                    desired,
                    &[],
                    &|_| true,
                    &BTreeMap::new(),
                )))
            });
        *self.scheduled.write().unwrap_or_else(|e| e.into_inner()) = scheduled;
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *inner = Some((commit.clone(), Arc::clone(desired)));
    }

    /// The revision being enforced.
    pub fn get(&self) -> Option<(CommitId, Arc<Desired>)> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The service address of each host of the enforced revision.
    fn addresses(&self) -> BTreeMap<String, String> {
        self.get()
            .map(|(_, d)| {
                d.hosts
                    .iter()
                    .map(|h| (h.metadata.name.clone(), h.spec.address.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The driver `berth serve --driver local` uses. See the module documentation.
pub struct ServeDriver {
    local: Arc<LocalDriver>,
    enforced: Arc<Enforced>,
    coordination: Arc<dyn Coordination>,
    metrics: Arc<Metrics>,
    switchovers: Arc<Switchovers>,
    runtime: tokio::runtime::Handle,
    /// The destinations of pending moves as they last reported themselves, and when.
    peers: RwLock<BTreeMap<String, (Instant, ObservedHost)>>,
    /// The guests this host ran at the last observe.
    running: RwLock<std::collections::BTreeSet<String>>,
}

impl ServeDriver {
    /// A driver over `local`, asking peers through `coordination`, reporting into
    /// `metrics`, handing unknown switchovers it cannot resolve to `switchovers`; peer
    /// requests run on `runtime`.
    pub fn new(
        local: Arc<LocalDriver>,
        enforced: Arc<Enforced>,
        coordination: Arc<dyn Coordination>,
        metrics: Arc<Metrics>,
        switchovers: Arc<Switchovers>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        ServeDriver {
            local,
            enforced,
            coordination,
            metrics,
            switchovers,
            runtime,
            peers: RwLock::new(BTreeMap::new()),
            running: RwLock::new(std::collections::BTreeSet::new()),
        }
    }

    /// Keeps what the destinations of pending moves say of themselves, until `stop`
    /// turns true: every 2 s, for each guest that ran here at the last observe and that
    /// the enforced revision places on another host, that host is asked (through the
    /// fleet coordination: etcd, or that host's API) how it observes itself. The local
    /// driver sees this host only; a migration is planned against what the destination
    /// last said. Nobody is asked while no move is pending: no host polls the fleet.
    /// `poke` is notified when a destination becomes observed (first answer, or again
    /// after going stale), so that migrations blocked for want of it are planned at once.
    pub async fn follow_destinations(
        self: Arc<Self>,
        poke: Arc<tokio::sync::Notify>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let asks = self.destinations().into_iter().map(|peer| {
                let coordination = Arc::clone(&self.coordination);
                async move {
                    let answer =
                        tokio::time::timeout(PEER_REFRESH, coordination.observe_host(&peer)).await;
                    (peer.name, answer)
                }
            });
            for (name, answer) in super::join_all(asks).await {
                match answer {
                    Ok(Ok(observed)) => {
                        if let Some(host) = observed {
                            let previous = self
                                .peers
                                .write()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name, (Instant::now(), host));
                            if previous.is_none_or(|(at, _)| at.elapsed() >= PEER_STALE) {
                                poke.notify_one();
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %name, error = %e.chain(), "destination not observed")
                    }
                    Err(_) => tracing::debug!(peer = %name, "destination did not answer"),
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(PEER_REFRESH) => {}
            }
        }
    }

    /// The hosts the enforced revision moves guests that run here to.
    fn destinations(&self) -> Vec<Peer> {
        let Some((_, desired)) = self.enforced.get() else {
            return Vec::new();
        };
        let here = self.running.read().unwrap_or_else(|e| e.into_inner());
        let wanted: std::collections::BTreeSet<String> = desired
            .guests
            .iter()
            .filter(|g| here.contains(&g.metadata.name))
            .filter_map(|g| self.enforced.host_of(g))
            .filter(|host| host != self.me())
            .collect();
        wanted
            .into_iter()
            .filter_map(|name| Peer::of(&desired, &name))
            .collect()
    }

    /// Runs `act` on the runtime: whether this host may act on `guest` now.
    fn may_act(&self, guest: &str) -> Result<(), DriverError> {
        self.runtime
            .block_on(self.coordination.may_act(guest))
            .map_err(|e| DriverError::Refused(e.to_string()))
    }

    /// Takes back the handover of `guest` when it still runs here.
    fn take_back_if_here(&self, guest: &str) {
        let runs = Client::connect(self.local.control_socket(guest))
            .and_then(|mut c| c.status())
            .is_ok_and(|s| {
                matches!(
                    s.state,
                    berth_hypervisor::control::GuestRunState::Running
                        | berth_hypervisor::control::GuestRunState::Paused
                )
            });
        if runs {
            self.runtime
                .block_on(self.coordination.migration_failed(guest));
        }
    }

    /// Cancels the migrations in flight (before their switchover) and refuses new ones;
    /// returns the guests that were migrating.
    pub fn cancel(&self) -> Vec<String> {
        self.local.cancel_migrations();
        self.local.outgoing_in_flight()
    }

    fn me(&self) -> &str {
        self.local.host()
    }

    /// Migrates `guest` from this host to `to`, as the module documentation says.
    fn migrate_away(&self, guest: &Guest, to: &str) -> Result<(), DriverError> {
        let name = &guest.metadata.name;
        if self.local.cancelling() {
            return Err(DriverError::Refused(format!(
                "{name}: not migrating, the service is stopping"
            )));
        }
        let following = self.local.begin_outgoing(name)?;
        let (revision, _) = self
            .enforced
            .get()
            .ok_or_else(|| DriverError::NotFound(format!("{name}: no revision enforced yet")))?;
        let address = self.enforced.addresses().remove(to).ok_or_else(|| {
            DriverError::NotFound(format!("{name}: host {to} has no Host manifest"))
        })?;
        let peer = Peer {
            name: to.to_owned(),
            address,
        };
        let request = IncomingRequest {
            guest: name.clone(),
            from: self.me().to_owned(),
            revision: revision.to_string(),
        };
        let prepared = self
            .runtime
            .block_on(self.coordination.prepare_incoming(&peer, &request))
            .map_err(|e| DriverError::Failed {
                context: format!("preparing the migration of {name} to {to}"),
                cause: Box::new(e),
            })?;
        info!(guest = %name, to, listen = %prepared.listen, "migrating live");
        let socket = self.local.control_socket(name);
        let mut source = Client::connect(&socket).map_err(|e| {
            DriverError::NotFound(format!("guest {name} does not run on {} ({e})", self.me()))
        })?;
        let source_pid = source
            .status()
            .map_err(|e| DriverError::failed(format!("reading the status of {name}"), e))?
            .pid;
        let record = OutgoingRecord {
            guest: name.clone(),
            to: to.to_owned(),
            peer: Some(peer.address.clone()),
            destination: prepared.listen.to_string(),
            source_pid,
            destination_pid: None,
        };
        self.local.record_outgoing(&record)?;
        if let Err(e) = source.call(Op::Migrate(MigrateArgs {
            destination: prepared.listen.to_string(),
            token: prepared.token,
            policy: guest.spec.migration,
            connections: None,
        })) {
            self.local.forget_outgoing(name);
            self.take_back_if_here(name);
            return Err(DriverError::failed(
                format!("starting the migration of {name} to {to}"),
                e,
            ));
        }
        let outcome = follow(
            &mut source,
            &PeerDestination {
                serve: self,
                peer: &peer,
                guest: name,
            },
            &Follow {
                guest: name,
                deadline: MIGRATION_DEADLINE,
                resolve_within: RESOLVE_INLINE,
                ask_every: ASK_INTERVAL,
                cancelling: &|| self.local.cancelling(),
            },
        );
        self.local.forget_outgoing_if_ended(&record);
        drop(following);
        match outcome {
            Ok(status) => {
                // The source exits right after completing; when its last status went
                // unread, the destination's measure of the pause stands in.
                let downtime_ms = status.downtime_ms.or_else(|| {
                    self.runtime
                        .block_on(self.coordination.incoming_outcome(&peer, name))
                        .ok()
                        .and_then(|o| o.downtime_ms)
                });
                self.metrics.migration(
                    "remote",
                    Duration::from_millis(status.elapsed_ms),
                    downtime_ms.map(|ms| ms / 1000.0),
                    status.bytes_sent,
                );
                info!(
                    guest = %name, to, elapsed_ms = status.elapsed_ms,
                    downtime_ms = ?downtime_ms, bytes = status.bytes_sent,
                    "migration completed"
                );
                if !wait_gone(source_pid, SOURCE_EXIT) {
                    warn!(guest = %name, pid = source_pid, "the source VMM has not exited after the migration");
                }
                Ok(())
            }
            Err(FollowError::Failed(reason)) => {
                // Ended before its switchover, or resolved against the destination: the
                // ownership stays here if the guest does.
                self.take_back_if_here(name);
                Err(DriverError::Failed {
                    context: format!("migrating {name} to {to}; the guest stays on {}", self.me()),
                    cause: reason.into(),
                })
            }
            Err(FollowError::Unknown(reason)) => {
                // No longer followed here: the resolver may take it now.
                self.switchovers.kick();
                Err(DriverError::Failed {
                    context: format!(
                        "migrating {name} to {to}: the switchover is unknown; {} neither resumes nor drops the guest until {to} says whether it runs it",
                        self.me()
                    ),
                    cause: reason.into(),
                })
            }
        }
    }

    /// Whether `peer` runs `name` after its incoming migration.
    fn ask_destination(&self, peer: &Peer, name: &str) -> Result<bool, CannotTell> {
        let asked = self.runtime.block_on(tokio::time::timeout(
            ASK_TIMEOUT,
            self.coordination.incoming_outcome(peer, name),
        ));
        match asked {
            Ok(Ok(outcome)) => Ok(outcome.running),
            Ok(Err(e)) => Err(CannotTell::Unasked {
                host: peer.name.clone(),
                source: e.source,
            }),
            Err(_) => Err(CannotTell::Timeout {
                host: peer.name.clone(),
                address: peer.address.clone(),
                timeout: ASK_TIMEOUT,
            }),
        }
    }

    /// Maps the destination address a VMM reports to the name of the host it belongs
    /// to, so that status and plan name hosts.
    fn host_of(&self, destination: &str) -> Option<String> {
        let ip = destination.parse::<std::net::SocketAddr>().ok()?.ip();
        self.enforced
            .addresses()
            .into_iter()
            .find(|(_, address)| {
                address
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.ip() == ip)
            })
            .map(|(name, _)| name)
    }
}

impl Driver for ServeDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Local
    }

    fn scope(&self) -> Scope {
        self.local.scope()
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        // The reconcile loop publishes it (through the fleet coordination).
        let mut observed = self.local.observe()?;
        *self.running.write().unwrap_or_else(|e| e.into_inner()) = observed
            .guests
            .iter()
            .filter(|g| g.host == self.me())
            .map(|g| g.name.clone())
            .collect();
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        observed.hosts.extend(
            peers
                .values()
                .filter(|(at, host)| at.elapsed() < PEER_STALE && host.name != self.me())
                .map(|(_, host)| host.clone()),
        );
        drop(peers);
        for g in &mut observed.guests {
            if let Some(host) = g.migrating_to.as_deref().and_then(|to| self.host_of(to)) {
                g.migrating_to = Some(host);
            }
        }
        Ok(observed)
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.local.configure_host(host, settings)
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.may_act(&guest.metadata.name)?;
        self.local.start(guest, host)
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.may_act(&guest.metadata.name)?;
        self.local.retune(guest, host, fields)
    }

    /// Stops the guest here; the source half of a cold move stops here too, and the
    /// destination's service starts it once this host no longer runs it.
    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.may_act(name)?;
        self.local.stop(name, host)?;
        self.runtime.block_on(self.coordination.released(name));
        Ok(())
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        if from == to {
            self.may_act(&guest.metadata.name)?;
            return self.local.migrate(guest, from, to);
        }
        if from != self.me() {
            return Err(DriverError::NotFound(format!(
                "{}: a migration from {from} is driven by {from}'s service",
                guest.metadata.name
            )));
        }
        self.migrate_away(guest, to)
    }
}

/// The destination host of a migration, as the follower asks it.
struct PeerDestination<'a> {
    serve: &'a ServeDriver,
    peer: &'a Peer,
    guest: &'a str,
}

impl Destination for PeerDestination<'_> {
    fn runs_guest(&self) -> Result<bool, CannotTell> {
        self.serve.ask_destination(self.peer, self.guest)
    }

    fn name(&self) -> String {
        self.peer.name.clone()
    }
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_exists(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}
