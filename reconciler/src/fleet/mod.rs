//! Fleet coordination: what one host needs from the other hosts of its fleet, behind
//! one trait, [`Coordination`].
//!
//! A host asks the fleet five things:
//! - before it starts a guest: may another host still run it? ([`Coordination::may_start`],
//!   the start guard `berth apply` and `berth serve` share: a host that runs it, or
//!   that cannot be asked and is where the guest was last placed, holds the start back,
//!   naming that host);
//! - to prepare an incoming guest on a destination ([`Coordination::prepare_incoming`]);
//! - whether the destination runs the guest after a migration, to follow it to its end
//!   and to resolve an unknown switchover ([`Coordination::incoming_outcome`]);
//! - how another host observes itself, to plan moves to it
//!   ([`Coordination::observe_host`]);
//! - and it tells the fleet where each enforced revision places the guests
//!   ([`Coordination::record_placements`]).
//!
//! Two implementations:
//! - [`etcd::EtcdCoordination`] (`berth serve --etcd`): a fleet's. Leases, ownership
//!   records with fencing tokens, the host records other hosts plan with; besides the
//!   five questions it checks the fencing token before every action
//!   ([`Coordination::may_act`]) and follows a migration's handover
//!   ([`Coordination::arrived`], [`Coordination::incoming_failed`],
//!   [`Coordination::migration_failed`]); it says in status when etcd is away
//!   ([`Coordination::health`]).
//! - [`http::HttpPeers`] (no etcd): the hosts' `berth serve` APIs over mutual TLS
//!   (transport: [`crate::client`]), with the last placements kept in the state
//!   directory ([`placement::Placements`]); for one host, or a few on a trusted link (a
//!   partition can start a guest twice). It also carries the etcd implementation's
//!   destination preparation.
//!
//! Neither polls the fleet: another host is asked only about a start, or about the
//! destination of a pending move.
//!
//! The rest of this module is the cross-host migration machinery built on it:
//! - [`remote`]: the source side, `berth serve --driver local`'s driver (the local
//!   driver plus live migration to another host);
//! - [`incoming`]: the destination side, preparing incoming VMMs ([`peer::IncomingMigrations`]);
//! - [`switchover`]: resolving unknown switchovers, also after a restart;
//! - [`peer`]: the peer API's messages.

pub mod etcd;
pub mod http;
pub mod incoming;
pub mod libvirt;
pub mod peer;
pub mod placement;
pub mod remote;
pub mod switchover;

use std::future::Future;
use std::pin::Pin;

use crate::model::{Desired, Observed, ObservedHost};
use peer::{IncomingMigration, IncomingOutcome, IncomingRequest};

/// A future a [`Coordination`] returns (object-safe `async`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Another host of the fleet, as its Host manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Host name.
    pub name: String,
    /// `host:port` of its `berth serve` API (`spec.address`).
    pub address: String,
}

impl Peer {
    /// Host `name` of `desired`, if a Host manifest names it.
    pub fn of(desired: &Desired, name: &str) -> Option<Peer> {
        desired
            .hosts
            .iter()
            .find(|h| h.metadata.name == name)
            .map(|h| Peer {
                name: name.to_owned(),
                address: h.spec.address.clone(),
            })
    }
}

/// Why a guest is not started here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartRefused {
    /// Another host runs it (a migration to this host is under way, or the manifests
    /// moved it and its old host still runs it).
    #[error("{host} still runs {guest}; not starting a second copy")]
    RunsElsewhere {
        /// The guest.
        guest: String,
        /// The host that runs it.
        host: String,
    },
    /// This host does not hold the guest's ownership record (another host holds it,
    /// or etcd cannot be reached to take or check it).
    #[error("{guest}: {reason}; not acting on it")]
    NotOwner {
        /// The guest.
        guest: String,
        /// Who holds it, or why the record cannot be read.
        reason: String,
    },
    /// A host that may run it cannot be asked.
    #[error(
        "{host} may still run {guest} and cannot be asked ({reason}); not starting a second copy"
    )]
    CannotAsk {
        /// The guest.
        guest: String,
        /// The host.
        host: String,
        /// Why it cannot be asked.
        reason: String,
    },
}

impl StartRefused {
    /// The host that runs the guest or cannot be asked.
    pub fn host(&self) -> &str {
        match self {
            StartRefused::RunsElsewhere { host, .. } | StartRefused::CannotAsk { host, .. } => host,
            StartRefused::NotOwner { .. } => "etcd",
        }
    }
}

/// Why the fleet's ownership record of a guest (etcd) does not let this host take a
/// step, or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// etcd could not be asked.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// The record names other hosts than the step needs.
    #[error("the ownership record of {guest} names {host}{}, not {expected}", moving_to.as_ref().map(|to| format!(" moving to {to}")).unwrap_or_default())]
    Elsewhere {
        /// The guest.
        guest: String,
        /// The host it names.
        host: String,
        /// The host it names as the destination of a move, if any.
        moving_to: Option<String>,
        /// What the step needs it to name.
        expected: String,
    },
    /// The record still names a move that its destination has not ended yet.
    #[error("the ownership record of {guest} still says {from} moving to {to}: {to} has not taken it over or given it back yet")]
    Moving {
        /// The guest.
        guest: String,
        /// The source.
        from: String,
        /// The destination.
        to: String,
    },
    /// There is no record (its owner's lease expired, or it never had one).
    #[error("{guest} has no ownership record")]
    Missing {
        /// The guest.
        guest: String,
    },
    /// Another host changed the record first.
    #[error(transparent)]
    Fenced(#[from] crate::etcd::Fenced),
    /// This host could not take the record.
    #[error(transparent)]
    Refused(#[from] StartRefused),
}

/// Why another host could not be asked or refused.
#[derive(Debug, thiserror::Error)]
#[error("host {host}")]
pub struct CoordinationError {
    /// The host asked.
    pub host: String,
    /// What failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl CoordinationError {
    /// The error and its causes on one line, for a status message.
    pub fn chain(&self) -> String {
        berth_hypervisor::report::one_line(self)
    }
}

/// How this host coordinates with the other hosts of its fleet. See the module
/// documentation. Implementations are shared between threads and called from async
/// code; the futures must not block a runtime thread.
pub trait Coordination: Send + Sync {
    /// Records where `desired`, a revision enforced by host `me`, places each guest.
    fn record_placements(&self, me: &str, desired: &Desired);

    /// Before host `me` starts `guest`: `Ok` when no other host of `desired` may still
    /// run it; else why not, naming the host.
    fn may_start<'a>(
        &'a self,
        me: &'a str,
        guest: &'a str,
        desired: &'a Desired,
    ) -> BoxFuture<'a, Result<(), StartRefused>>;

    /// Asks `to` to prepare an incoming VMM for a guest migrating there.
    fn prepare_incoming<'a>(
        &'a self,
        to: &'a Peer,
        request: &'a IncomingRequest,
    ) -> BoxFuture<'a, Result<IncomingMigration, CoordinationError>>;

    /// How `host` last observed itself (capacity, settings, CPU), for planning moves
    /// to it: a driver scoped to one host sees no other. `None` while it has not said.
    fn observe_host<'a>(
        &'a self,
        host: &'a Peer,
    ) -> BoxFuture<'a, Result<Option<ObservedHost>, CoordinationError>>;

    /// Whether `host` runs `guest` after an incoming migration.
    fn incoming_outcome<'a>(
        &'a self,
        host: &'a Peer,
        guest: &'a str,
    ) -> BoxFuture<'a, Result<IncomingOutcome, CoordinationError>>;

    /// What this host observes now (its capacity and guests), after each full observe:
    /// published to the fleet, for other hosts to plan with. The reconcile loop calls it,
    /// whatever the driver; a driver may see more than this host (the simulated fleet,
    /// the destinations of moves), so only this host's part is published. Must not block.
    fn publish(&self, observed: &Observed) {
        let _ = observed;
    }

    /// Before this host acts on `guest` it runs (retune, stop, migrate): `Ok` while
    /// this host holds its ownership record (the fencing token kept with the guest
    /// still matches); else why not.
    fn may_act<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, Result<(), StartRefused>> {
        let _ = guest;
        Box::pin(async { Ok(()) })
    }

    /// `guest` was stopped here for good (stopped, or stopped for a cold move): its
    /// ownership, if any, is given up.
    fn released<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, ()> {
        let _ = guest;
        Box::pin(async {})
    }

    /// Source side: the migration of `guest` failed before its switchover (the guest
    /// runs here): the handover begun by [`Coordination::prepare_incoming`] is taken back.
    fn migration_failed<'a>(&'a self, guest: &'a str) -> BoxFuture<'a, ()> {
        let _ = guest;
        Box::pin(async {})
    }

    /// Whether a fleet leader places the selector-placed guests (etcd) and
    /// [`Coordination::expects_incoming`] is the word on where they move; else every
    /// host places them alike from the revision (the scheduler with no fleet).
    fn leader_places(&self) -> bool {
        false
    }

    /// Destination side, before an incoming VMM is prepared: `Ok` when the fleet says
    /// `guest` is moving from `from` to this host; else why not.
    fn expects_incoming<'a>(
        &'a self,
        guest: &'a str,
        from: &'a str,
    ) -> BoxFuture<'a, Result<(), OwnershipError>> {
        let _ = (guest, from);
        Box::pin(async { Ok(()) })
    }

    /// Destination side: `guest`, migrating from `from`, committed here (its incoming
    /// VMM read `Commit`): this host takes the ownership over. True once the fleet's
    /// record names this host: a source in an unknown switchover then resolves from
    /// the record, and no longer needs this host's committed marker.
    fn arrived<'a>(&'a self, guest: &'a str, from: &'a str) -> BoxFuture<'a, bool> {
        let _ = (guest, from);
        Box::pin(async { false })
    }

    /// Destination side: the incoming migration of `guest` from `from` ended before
    /// `Commit` (the guest never ran here): the ownership goes back to `from`.
    fn incoming_failed<'a>(&'a self, guest: &'a str, from: &'a str) -> BoxFuture<'a, ()> {
        let _ = (guest, from);
        Box::pin(async {})
    }

    /// Whether this host can coordinate with its fleet now: `None` when it needs no
    /// store or the store answers; else why not (shown in status).
    fn health(&self) -> Option<CoordinationLost> {
        None
    }
}

/// Why a host cannot coordinate with its fleet now: while this lasts it keeps running
/// what it runs and starts, moves, stops and retunes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinationLost {
    /// A CamelCase word: `EtcdUnreachable`, `LeaseExpired`.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// Runs the futures concurrently (one task each) and collects their outputs in order.
pub(crate) async fn join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a request to another host does not panic"));
    }
    out
}
