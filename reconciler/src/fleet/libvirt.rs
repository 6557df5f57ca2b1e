//! `berth serve` on a libvirt host (its Host manifest says `driver: libvirt`): the
//! libvirt driver, plus what only the service can do because it knows the fleet.
//!
//! A live migration from this host A to libvirt host B:
//! 1. B's start guard holds B back while A runs the guest: B's loop sees the guest
//!    placed on B and not running there, and [`Coordination::may_start`] says A still
//!    runs it (a domain arriving at B is not B's guest until the move finishes, see
//!    [`crate::driver::libvirt`]).
//! 2. A's libvirtd migrates the domain to B's, peer-to-peer, at the URI B's Host
//!    manifest gives (`libvirt.remoteUri`, the stream to `libvirt.migrationUri`), after
//!    the pre-checks ([`LibvirtDriver::migrate_away`]). Each sample of libvirt's job
//!    statistics goes into the metrics (`berth_migration_*{kind="libvirt"}`), and
//!    `/status` shows the guest `Migrating` to B meanwhile.
//! 3. A follows the move to its end through the coordination: B says it runs the guest
//!    ([`Coordination::incoming_outcome`], answered by [`LibvirtIncoming`] from B's
//!    libvirtd); then B's loop adopts the domain like any of its guests.
//!
//! libvirt does the rest of a two-host move (its own prepare, switchover and confirm):
//! a migration that fails leaves the guest running on A.
//!
//! Other hosts are planned against what they last said of themselves
//! ([`Coordination::observe_host`], asked with each observe, [`PEER_TIMEOUT`] each).

use std::sync::Arc;
use std::time::Duration;

use berth_schema::Guest;
use tracing::{info, warn};

use super::peer::{
    IncomingMigration, IncomingMigrations, IncomingOutcome, IncomingRequest, PeerError,
};
use super::remote::Enforced;
use super::{Coordination, Peer};
use crate::diff::{Field, HostSetting};
use crate::driver::local::follow::CannotTell;
use crate::driver::{Capabilities, Driver, DriverError, DriverKind, LibvirtDriver, Scope};
use crate::metrics::Metrics;
use crate::model::Observed;

/// How long another host may take to say how it is, per observe.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the destination may take to confirm it runs a migrated guest.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver `berth serve` uses on a libvirt host. See the module documentation.
pub struct LibvirtServe {
    libvirt: Arc<LibvirtDriver>,
    enforced: Arc<Enforced>,
    coordination: Arc<dyn Coordination>,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
}

impl LibvirtServe {
    /// The driver over `libvirt`, asking the fleet through `coordination` about the hosts
    /// of the `enforced` revision (on `runtime`), reporting into `metrics`.
    pub fn new(
        libvirt: Arc<LibvirtDriver>,
        enforced: Arc<Enforced>,
        coordination: Arc<dyn Coordination>,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        LibvirtServe {
            libvirt,
            enforced,
            coordination,
            metrics,
            runtime,
        }
    }

    fn peer(&self, name: &str) -> Option<Peer> {
        let (_, desired) = self.enforced.get()?;
        Peer::of(&desired, name)
    }

    fn migrate_away(&self, guest: &Guest, to: &str) -> Result<(), DriverError> {
        let name = &guest.metadata.name;
        let peer = self.peer(to).ok_or_else(|| {
            DriverError::NotFound(format!("{name}: host {to} has no Host manifest"))
        })?;
        info!(guest = %name, to, "migrating live through libvirt");
        let metrics = &self.metrics;
        let report = self.libvirt.migrate_away(guest, to, |p| {
            metrics.migration_progress(name, p.data_processed, p.data_remaining);
        });
        metrics.migration_progress_done(name);
        let report = report?;
        let bytes = report.last.map_or(0, |p| p.data_processed);
        let downtime_ms = report.downtime.map(|d| d.as_secs_f64() * 1000.0);
        self.metrics.migration(
            "libvirt",
            report.elapsed,
            report.downtime.map(|d| d.as_secs_f64()),
            bytes,
        );
        // libvirt says the domain runs on the destination; the destination's service
        // confirms it, through the fleet coordination.
        let confirmed = self.runtime.block_on(tokio::time::timeout(
            CONFIRM_TIMEOUT,
            self.coordination.incoming_outcome(&peer, name),
        ));
        match confirmed {
            Ok(Ok(outcome)) if outcome.running => info!(
                guest = %name, to, elapsed_ms = report.elapsed.as_millis() as u64,
                downtime_ms = ?downtime_ms, bytes, outcome = ?report.outcome,
                "migration completed"
            ),
            Ok(Ok(_)) => {
                warn!(guest = %name, to, "libvirt completed the migration but the destination's service does not see the guest yet")
            }
            Ok(Err(e)) => {
                warn!(guest = %name, to, error = %e.chain(), "libvirt completed the migration; the destination's service could not be asked")
            }
            Err(_) => {
                warn!(guest = %name, to, "libvirt completed the migration; the destination's service did not answer in time")
            }
        }
        Ok(())
    }
}

impl Driver for LibvirtServe {
    fn kind(&self) -> DriverKind {
        DriverKind::Libvirt
    }

    fn scope(&self) -> Scope {
        self.libvirt.scope()
    }

    fn capabilities(&self) -> Capabilities {
        self.libvirt.capabilities()
    }

    fn observe(&self) -> Result<Observed, DriverError> {
        let mut observed = self.libvirt.observe()?;
        let peers: Vec<Peer> = self
            .enforced
            .get()
            .map(|(_, desired)| {
                desired
                    .hosts
                    .iter()
                    .filter(|h| h.metadata.name != self.libvirt.host())
                    .filter_map(|h| Peer::of(&desired, &h.metadata.name))
                    .collect()
            })
            .unwrap_or_default();
        let asks = peers.into_iter().map(|peer| {
            let coordination = Arc::clone(&self.coordination);
            async move {
                tokio::time::timeout(PEER_TIMEOUT, coordination.observe_host(&peer))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
            }
        });
        let hosts = self.runtime.block_on(super::join_all(asks));
        observed.hosts.extend(hosts.into_iter().flatten());
        Ok(observed)
    }

    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError> {
        self.libvirt.configure_host(host, settings)
    }

    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError> {
        self.libvirt.start(guest, host)
    }

    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError> {
        self.libvirt.retune(guest, host, fields)
    }

    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError> {
        self.libvirt.stop(name, host)
    }

    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError> {
        if from == to || from != self.libvirt.host() {
            return self.libvirt.migrate(guest, from, to);
        }
        self.migrate_away(guest, to)
    }
}

/// The destination side on a libvirt host: libvirtd receives the guest itself, so
/// there is nothing to prepare; the source asks whether the guest runs here.
pub struct LibvirtIncoming {
    libvirt: Arc<LibvirtDriver>,
}

impl LibvirtIncoming {
    /// Answers from `libvirt`.
    pub fn new(libvirt: Arc<LibvirtDriver>) -> Self {
        LibvirtIncoming { libvirt }
    }
}

impl IncomingMigrations for LibvirtIncoming {
    fn prepare(&self, _: &IncomingRequest) -> Result<IncomingMigration, PeerError> {
        Err(PeerError::Unsupported(
            "a libvirt host receives guests from the source's libvirtd (spec.libvirt.remoteUri)",
        ))
    }

    fn running(&self, guest: &str) -> Result<IncomingOutcome, PeerError> {
        let running = self.libvirt.runs(guest).map_err(|e| {
            PeerError::CannotTell(CannotTell::Unasked {
                host: "libvirtd".to_owned(),
                source: Box::new(e),
            })
        })?;
        Ok(IncomingOutcome {
            running,
            downtime_ms: None,
        })
    }
}
