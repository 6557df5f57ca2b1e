//! [`EtcdCoordination`]: fleet coordination on etcd (`berth serve --etcd URL[,URL...]`),
//! on the leases and ownership records of [`crate::etcd`]. No host asks another how it
//! is: everything a host needs to know of the fleet is read from etcd.
//!
//! - **Liveness**: the host holds a lease ([`HostSession`]) and, after each full observe,
//!   publishes under it what it is (capacity: CPUs, memory, hugepage pools, CPU model;
//!   its API address) and the guests it runs. Only what changed is written.
//! - **Starting a guest** ([`Coordination::may_start`]): only after this host holds the
//!   guest's ownership record, created by a transaction that succeeds only if it is
//!   absent. A record held by another host refuses the start, naming the host.
//! - **Fencing token**: the record's `ModRevision`. It is kept next to the guest's VMM
//!   state, in `<state-dir>/owners/<guest>.json`, and checked against etcd (a
//!   linearizable read) before berth acts on the guest: start, retune, stop, migrate
//!   ([`Coordination::may_act`]). A stale token whose record another host now holds
//!   refuses the action; a record gone (its lease expired while etcd was away) is taken
//!   again first.
//! - **Live migration** from A to B hands the record over by compare-and-swap: A writes
//!   `A, moving to B` before it asks B to prepare (B refuses unless the record says so);
//!   when B's incoming VMM has read `Commit` (the guest runs on B), B swaps the record to
//!   `B`, bound to its own lease; when the migration ends before `Commit`, whoever sees
//!   it first (A on a failure it observes, B when its incoming VMM gives up) puts `A`
//!   back. An unknown switchover is resolved from the record alone: `B` means B runs the
//!   guest (A drops its paused copy), `A` means B never ran it (A resumes it), and
//!   `A, moving to B` means B has not decided yet: the guest stays paused on A.
//! - **Destination preparation** stays the direct request to B's API over mutual TLS
//!   (only a host with the fleet's certificate for B can answer); what B is, for
//!   planning the move, is read from etcd ([`Coordination::observe_host`]).
//! - **etcd outage**: no record is needed to keep a guest running. While etcd does not
//!   answer (or the lease is in doubt) every start, move, retune and stop is refused,
//!   the guests keep running as they are, and [`Coordination::health`] says why (shown
//!   as the `CoordinationLost` condition in `/status`). When etcd answers again the
//!   host publishes itself again, takes its running guests' records again where they
//!   expired, and the reconcile loop converges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_hypervisor::report::one_line;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::http::HttpPeers;
use super::peer::{IncomingMigration, IncomingOutcome, IncomingRequest};
use super::{
    BoxFuture, Coordination, CoordinationError, CoordinationLost, OwnershipError, Peer,
    StartRefused,
};
use crate::etcd::{
    read_host, read_owner, resolve_switchover, Acquire, EtcdError, FencingToken, HostSession,
    LeaseState, Ownership, Switchover,
};
use crate::model::{Desired, Observed, ObservedHost};

/// How often the host looks whether it must publish or take records again.
const TICK: Duration = Duration::from_secs(1);

/// The fencing token kept with a running guest: `<state-dir>/owners/<guest>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenFile {
    /// The record's `ModRevision` when this host last wrote or checked it.
    pub token: FencingToken,
    /// The lease the record was bound to.
    pub lease: i64,
    /// The destination of a handover this host began, if one is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
}

/// The token files of one host.
#[derive(Debug)]
struct Tokens {
    dir: PathBuf,
}

impl Tokens {
    fn path(&self, guest: &str) -> PathBuf {
        self.dir.join(format!("{guest}.json"))
    }

    fn get(&self, guest: &str) -> Option<TokenFile> {
        let text = std::fs::read(self.path(guest)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn set(&self, o: &Ownership) {
        let file = TokenFile {
            token: o.token,
            lease: o.lease,
            moving_to: o.record.moving_to.clone(),
        };
        if let Err(e) = write_atomically(
            &self.path(&o.guest),
            &serde_json::to_vec(&file).expect("a token file serializes"),
        ) {
            warn!(guest = %o.guest, error = %e, "cannot keep the fencing token");
        }
    }

    fn remove(&self, guest: &str) {
        let _ = std::fs::remove_file(self.path(guest));
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// What the background task publishes and checks.
#[derive(Debug, Default)]
struct Pending {
    /// The last full observe of this host.
    observed: Option<Observed>,
    /// This host's API address, from its Host manifest.
    address: Option<String>,
    /// Whether `observed` changed since it was published.
    dirty: bool,
}

/// Fleet coordination on etcd. See the module documentation.
pub struct EtcdCoordination {
    session: Arc<HostSession>,
    tokens: Tokens,
    /// Destination preparation over the hosts' APIs (mutual TLS).
    direct: HttpPeers,
    pending: Mutex<Pending>,
    wake: Notify,
    /// The last etcd failure, and when.
    failed: Mutex<Option<(Instant, String)>>,
    endpoints: String,
}

impl EtcdCoordination {
    /// Coordinates through `session`, keeping tokens under `state_dir/owners`,
    /// preparing destinations through `direct`.
    pub fn new(
        session: Arc<HostSession>,
        state_dir: &Path,
        direct: HttpPeers,
        endpoints: String,
    ) -> Self {
        EtcdCoordination {
            session,
            tokens: Tokens {
                dir: state_dir.join("owners"),
            },
            direct,
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            failed: Mutex::new(None),
            endpoints,
        }
    }

    /// The host's etcd session (lease, health), for what else runs on it (the leader's
    /// scheduler, self-fencing).
    pub fn session(&self) -> &Arc<HostSession> {
        &self.session
    }

    fn me(&self) -> &str {
        self.session.host()
    }

    fn note_failure(&self, e: &EtcdError) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), one_line(e)));
    }

    fn note_success(&self) {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn unreachable(&self, guest: &str, e: &EtcdError) -> StartRefused {
        self.note_failure(e);
        StartRefused::NotOwner {
            guest: guest.to_owned(),
            reason: format!(
                "its ownership record cannot be read or written ({}); nothing is started, moved or changed until etcd answers",
                one_line(e)
            ),
        }
    }

    /// Holds `guest`'s record: checks the kept token, else takes the record if nobody
    /// holds it. The ownership, or why this host may not act on the guest.
    async fn hold(&self, guest: &str) -> Result<Ownership, StartRefused> {
        let health = self.session.health();
        if health.state != LeaseState::Held {
            return Err(StartRefused::NotOwner {
                guest: guest.to_owned(),
                reason: format!(
                    "this host's etcd lease was last renewed {:.1}s ago; nothing is started, moved or changed until it is renewed",
                    health.since_renewal.as_secs_f64()
                ),
            });
        }
        if let Some(kept) = self.tokens.get(guest) {
            match self.session.verify(guest, kept.token).await {
                Ok(Ok(o)) => {
                    self.note_success();
                    return Ok(o);
                }
                Ok(Err(fenced)) => match &fenced.current {
                    Some(o) if o.record.host != self.me() => {
                        self.tokens.remove(guest);
                        return Err(StartRefused::NotOwner {
                            guest: guest.to_owned(),
                            reason: fenced.to_string(),
                        });
                    }
                    // Gone (the lease expired) or ours under another lease: take it again.
                    _ => debug!(guest, %fenced, "the kept token is stale; taking the record again"),
                },
                Err(e) => return Err(self.unreachable(guest, &e)),
            }
        }
        match self.session.acquire(guest).await {
            Ok(Acquire::Owned(o)) => {
                self.note_success();
                self.tokens.set(&o);
                Ok(o)
            }
            Ok(Acquire::HeldElsewhere(o)) => {
                self.note_success();
                Err(StartRefused::RunsElsewhere {
                    guest: guest.to_owned(),
                    host: o.record.host,
                })
            }
            Err(e) => Err(self.unreachable(guest, &e)),
        }
    }

    /// Takes over a guest that arrived here from `from`: `from, moving to me` -> `me`.
    async fn take_over(&self, guest: &str, from: Option<&str>) -> Result<(), OwnershipError> {
        let current = read_owner(self.session.store(), guest).await?;
        match current {
            Some(o)
                if o.record.moving_to.as_deref() == Some(self.me())
                    && from.is_none_or(|f| f == o.record.host) =>
            {
                match self.session.complete_handover(guest, o.token).await {
                    Ok(Ok(owned)) => {
                        info!(guest, from = %o.record.host, token = %owned.token, "took the ownership over after the switchover");
                        self.tokens.set(&owned);
                        Ok(())
                    }
                    Ok(Err(fenced)) => Err(fenced.into()),
                    Err(e) => Err(e.into()),
                }
            }
            // Ours (with a handover this host began, if moving).
            Some(o) if o.record.host == self.me() => {
                self.tokens.set(&o);
                Ok(())
            }
            Some(o) => Err(OwnershipError::Elsewhere {
                guest: guest.to_owned(),
                host: o.record.host,
                moving_to: o.record.moving_to,
                expected: format!(
                    "{}, nor {} moving to it",
                    self.me(),
                    from.unwrap_or("a host")
                ),
            }),
            None => self.hold(guest).await.map(drop).map_err(Into::into),
        }
    }

    /// Publishes what changed and takes the records of running guests again where
    /// they are gone, every second or when woken, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut generation = None;
        let mut unsure: BTreeSet<String> = BTreeSet::new();
        loop {
            let health = self.session.health();
            let renewed = generation != Some(health.generation);
            let (observed, address, dirty) = {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                let dirty = std::mem::take(&mut p.dirty);
                (p.observed.clone(), p.address.clone(), dirty)
            };
            if let Some(observed) = observed.filter(|_| dirty || renewed || !unsure.is_empty()) {
                match self.publish_now(&observed, address.as_deref()).await {
                    Ok(()) => {
                        generation = Some(health.generation);
                        // Every guest that runs here should be ours: take the records
                        // that are gone (expired with an old lease) or were handed to us.
                        let running: Vec<String> = observed
                            .guests
                            .iter()
                            .filter(|g| g.host == self.me() && g.migrating_to.is_none())
                            .map(|g| g.name.clone())
                            .collect();
                        let was_unsure = std::mem::take(&mut unsure);
                        for guest in running {
                            // Checked once: under a new lease, without a token, or
                            // after a failed check; never again while nothing changes.
                            let kept = self.tokens.get(&guest);
                            if !renewed && kept.is_some() && !was_unsure.contains(&guest) {
                                continue;
                            }
                            if let Err(why) = self.take_over(&guest, None).await {
                                warn!(guest, why = %one_line(&why), "a guest running here is not owned by this host");
                                unsure.insert(guest);
                            }
                        }
                    }
                    Err(e) => {
                        self.note_failure(&e);
                        self.pending.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
                        debug!(error = %one_line(&e), "cannot publish to etcd");
                    }
                }
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn publish_now(
        &self,
        observed: &Observed,
        address: Option<&str>,
    ) -> Result<(), EtcdError> {
        let me = self.me();
        if let Some(host) = observed.hosts.iter().find(|h| h.name == me) {
            self.session.publish_host(host, address).await?;
        }
        let mine: Vec<_> = observed
            .guests
            .iter()
            .filter(|g| g.host == me)
            .cloned()
            .collect();
        self.session.publish_observed(&mine).await?;
        self.note_success();
        Ok(())
    }
}

impl Coordination for EtcdCoordination {
    fn record_placements(&self, me: &str, desired: &Desired) {
        let address = desired
            .hosts
            .iter()
            .find(|h| h.metadata.name == me)
            .map(|h| h.spec.address.clone());
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.address != address {
            p.address = address;
            p.dirty = true;
            self.wake.notify_one();
        }
    }

    fn may_start<'a>(
        &'a self,
        me: &'a str,
        guest: &'a str,
        _desired: &'a Desired,
    ) -> BoxFuture<'a, Result<(), StartRefused>> {
        Box::pin(async move {
            let o = self.hold(guest).await?;
            if let Some(to) = &o.record.moving_to {
                return Err(StartRefused::NotOwner {
                    guest: guest.to_owned(),
                    reason: format!("{me} is handing it over to {to}"),
                });
            }
            Ok(())
        })
    }

    fn may_act<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, Result<(), StartRefused>> {
        Box::pin(async move { self.hold(guest).await.map(|_| ()) })
    }

    fn released<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(kept) = self.tokens.get(guest) else {
                return;
            };
            match self.session.release(guest, kept.token).await {
                Ok(Ok(())) => {
                    info!(guest, token = %kept.token, "stopped here: ownership released");
                    self.tokens.remove(guest);
                }
                Ok(Err(fenced)) => {
                    debug!(guest, %fenced, "not released");
                    self.tokens.remove(guest);
                }
                // The record expires with the lease, or is taken again if it runs again.
                Err(e) => self.note_failure(&e),
            }
        })
    }

    fn prepare_incoming<'a>(
        &'a self,
        to: &'a Peer,
        request: &'a IncomingRequest,
    ) -> BoxFuture<'a, Result<IncomingMigration, CoordinationError>> {
        Box::pin(async move {
            let guest = request.guest.as_str();
            let fail = |e: Box<dyn std::error::Error + Send + Sync>| CoordinationError {
                host: "etcd".to_owned(),
                source: e,
            };
            let owned = self.hold(guest).await.map_err(|e| fail(Box::new(e)))?;
            let moving = match self
                .session
                .begin_handover(guest, owned.token, &to.name)
                .await
            {
                Ok(Ok(moving)) => moving,
                Ok(Err(fenced)) => return Err(fail(Box::new(fenced))),
                Err(e) => {
                    self.note_failure(&e);
                    return Err(fail(Box::new(e)));
                }
            };
            self.tokens.set(&moving);
            info!(guest, to = %to.name, token = %moving.token, "handing the ownership over");
            match self.direct.prepare_incoming(to, request).await {
                Ok(prepared) => Ok(prepared),
                Err(e) => {
                    self.migration_failed(guest).await;
                    Err(e)
                }
            }
        })
    }

    fn migration_failed<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(kept) = self.tokens.get(guest) else {
                return;
            };
            match self.session.abort_handover(guest, kept.token).await {
                Ok(Ok(back)) => {
                    info!(guest, token = %back.token, "migration abandoned: the ownership stays here");
                    self.tokens.set(&back);
                }
                Ok(Err(fenced)) => match fenced.current {
                    // The destination gave it back already.
                    Some(o) if o.record.host == self.me() && o.record.moving_to.is_none() => {
                        self.tokens.set(&o)
                    }
                    _ => warn!(guest, %fenced, "cannot take the handover back"),
                },
                Err(e) => {
                    self.note_failure(&e);
                    warn!(guest, error = %one_line(&e), "cannot take the handover back now; the destination gives it back when its incoming VMM ends");
                }
            }
        })
    }

    fn leader_places(&self) -> bool {
        true
    }

    fn expects_incoming<'a>(
        &'a self,
        guest: &'a str,
        from: &'a str,
    ) -> BoxFuture<'a, Result<(), OwnershipError>> {
        Box::pin(async move {
            match read_owner(self.session.store(), guest).await {
                Ok(Some(o))
                    if o.record.host == from
                        && o.record.moving_to.as_deref() == Some(self.me()) =>
                {
                    Ok(())
                }
                Ok(Some(o)) => Err(OwnershipError::Elsewhere {
                    guest: guest.to_owned(),
                    host: o.record.host,
                    moving_to: o.record.moving_to,
                    expected: format!("{from} moving to {}", self.me()),
                }),
                Ok(None) => Err(OwnershipError::Missing {
                    guest: guest.to_owned(),
                }),
                Err(e) => {
                    self.note_failure(&e);
                    Err(e.into())
                }
            }
        })
    }

    fn arrived<'a>(&'a self, guest: &'a str, from: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            // The guest runs here now: the record must follow. Tried for a while here;
            // the background task takes it over later if etcd is away.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match self.take_over(guest, Some(from)).await {
                    Ok(()) => return true,
                    Err(why) if Instant::now() > deadline => {
                        warn!(guest, from, why = %one_line(&why), "cannot take the ownership over yet");
                        self.pending.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
                        return false;
                    }
                    Err(why) => {
                        debug!(guest, from, why = %one_line(&why), "taking the ownership over: retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    }

    fn incoming_failed<'a>(&'a self, guest: &'a str, from: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let outcome: Result<(), EtcdError> = match read_owner(self.session.store(), guest)
                    .await
                {
                    Ok(Some(o))
                        if o.record.host == from
                            && o.record.moving_to.as_deref() == Some(self.me()) =>
                    {
                        match self.session.refuse_handover(guest, o.token).await {
                            Ok(Ok(back)) => {
                                info!(guest, from, token = %back.token, "the incoming migration ended before Commit: the ownership goes back to its source");
                                return;
                            }
                            Ok(Err(_)) => continue,
                            Err(e) => Err(e),
                        }
                    }
                    Ok(_) => return,
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    self.note_failure(&e);
                    if Instant::now() > deadline {
                        warn!(guest, from, error = %one_line(&e), "cannot give the ownership back to the source");
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    }

    fn observe_host<'a>(
        &'a self,
        host: &'a Peer,
    ) -> BoxFuture<'a, Result<Option<ObservedHost>, CoordinationError>> {
        Box::pin(async move {
            match read_host(self.session.store(), &host.name).await {
                Ok(record) => Ok(record.map(|r| r.observed).filter(|o| o.name == host.name)),
                Err(e) => {
                    self.note_failure(&e);
                    Err(CoordinationError {
                        host: host.name.clone(),
                        source: Box::new(e),
                    })
                }
            }
        })
    }

    fn incoming_outcome<'a>(
        &'a self,
        host: &'a Peer,
        guest: &'a str,
    ) -> BoxFuture<'a, Result<IncomingOutcome, CoordinationError>> {
        Box::pin(async move {
            let undecided = |why: OwnershipError| CoordinationError {
                host: host.name.clone(),
                source: why.into(),
            };
            let switchover = resolve_switchover(self.session.store(), guest, self.me(), &host.name)
                .await
                .map_err(|e| {
                    self.note_failure(&e);
                    CoordinationError {
                        host: "etcd".to_owned(),
                        source: Box::new(e),
                    }
                })?;
            match switchover {
                Switchover::Destination(_) => Ok(IncomingOutcome {
                    running: true,
                    downtime_ms: None,
                }),
                Switchover::Source(_) => Ok(IncomingOutcome {
                    running: false,
                    downtime_ms: None,
                }),
                Switchover::Moving(o) => Err(undecided(OwnershipError::Moving {
                    guest: guest.to_owned(),
                    from: o.record.host,
                    to: o.record.moving_to.unwrap_or_else(|| host.name.clone()),
                })),
                Switchover::Neither(Some(o)) => Err(undecided(OwnershipError::Elsewhere {
                    guest: guest.to_owned(),
                    host: o.record.host,
                    moving_to: o.record.moving_to,
                    expected: format!("this host alone, nor {}", host.name),
                })),
                Switchover::Neither(None) => Err(undecided(OwnershipError::Missing {
                    guest: guest.to_owned(),
                })),
            }
        })
    }

    /// Keeps this host's part of `observed` (a driver may see more: the simulated
    /// fleet, the destinations of moves) for the background task to publish.
    fn publish(&self, observed: &Observed) {
        let me = self.me();
        let mine = Observed {
            guests: observed
                .guests
                .iter()
                .filter(|g| g.host == me)
                .cloned()
                .collect(),
            hosts: observed
                .hosts
                .iter()
                .filter(|h| h.name == me)
                .cloned()
                .collect(),
        };
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.observed.as_ref() != Some(&mine) {
            p.observed = Some(mine);
            p.dirty = true;
            self.wake.notify_one();
        }
    }

    fn health(&self) -> Option<CoordinationLost> {
        let health = self.session.health();
        let timeouts = self.session.store().lease_timeouts();
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let keeps = "this host keeps running its guests and starts, moves, stops and retunes nothing until etcd answers";
        match health.state {
            LeaseState::Expired => Some(CoordinationLost {
                reason: "LeaseExpired",
                message: format!(
                    "this host's etcd lease ({}) expired {:.1}s after its last renewal; {keeps}",
                    self.endpoints,
                    health.since_renewal.as_secs_f64()
                ),
            }),
            _ if health.since_renewal > 3 * timeouts.renew_every
                || health.state == LeaseState::MustFence =>
            {
                Some(CoordinationLost {
                    reason: "EtcdUnreachable",
                    message: format!(
                        "etcd ({}) has not renewed this host's lease for {:.1}s{}; {keeps}",
                        self.endpoints,
                        health.since_renewal.as_secs_f64(),
                        failed
                            .map(|(_, e)| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    ),
                })
            }
            _ => match failed {
                Some((at, e)) if at.elapsed() < 2 * TICK => Some(CoordinationLost {
                    reason: "EtcdUnreachable",
                    message: format!("etcd ({}) failed a request: {e}; {keeps}", self.endpoints),
                }),
                _ => None,
            },
        }
    }
}

/// For tests and status: the fencing tokens kept in `state_dir`.
pub fn kept_tokens(state_dir: &Path) -> BTreeMap<String, TokenFile> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(state_dir.join("owners")) else {
        return out;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(guest) = name.strip_suffix(".json") else {
            continue;
        };
        if let Some(file) = std::fs::read(entry.path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            out.insert(guest.to_owned(), file);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::OwnerRecord;

    #[test]
    fn tokens_are_kept_next_to_the_guests_and_read_back() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tokens = Tokens {
            dir: tmp.path().join("owners"),
        };
        assert_eq!(tokens.get("web-1"), None);
        let owned = |token, moving_to: Option<&str>| Ownership {
            guest: "web-1".into(),
            record: OwnerRecord {
                host: "kvm01".into(),
                moving_to: moving_to.map(str::to_owned),
            },
            token: FencingToken(token),
            lease: 7,
        };
        tokens.set(&owned(12, None));
        tokens.set(&owned(13, Some("kvm02")));
        assert_eq!(
            tokens.get("web-1"),
            Some(TokenFile {
                token: FencingToken(13),
                lease: 7,
                moving_to: Some("kvm02".into()),
            })
        );
        assert_eq!(kept_tokens(tmp.path()).len(), 1);
        tokens.remove("web-1");
        assert_eq!(tokens.get("web-1"), None);
        assert!(kept_tokens(tmp.path()).is_empty());
    }
}
