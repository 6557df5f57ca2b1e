//! The reconciler talks to guests only through a [`Driver`]: observe, start, retune,
//! stop, migrate, and configure host settings. A driver also says which guests it sees
//! ([`Scope`]) and declares what it can do ([`Capabilities`], in [`capabilities`]): the
//! planner classifies every change from that declaration.
//!
//! - [`local`]: berth-vmm processes on this host ([`LocalDriver`], scope: this host).
//! - [`sim`]: a simulated fleet, for tests and scale ([`SimDriver`], scope: the fleet).
//!
//! The trait is synchronous and object-safe (`Arc<dyn Driver>`): a driver talks to
//! processes and files, and `berth serve` calls it from `tokio::task::spawn_blocking`.
//! Implementations must be safe to call from several threads at once for different
//! guests; the reconciler never runs two actions on one guest at the same time.

pub mod capabilities;
pub mod libvirt;
pub mod local;
pub mod sim;

use berth_hypervisor::report::one_line;
use berth_schema::Guest;

use crate::diff::{Field, HostSetting};
use crate::model::{Desired, Observed};

pub use capabilities::{Capabilities, CrossHost, DriverKind, FleetCapabilities, Scope};
pub use libvirt::LibvirtDriver;
pub use local::LocalDriver;
pub use sim::SimDriver;

/// Why a driver could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The host has no room (memory, hugepages, CPUs) for what was asked.
    #[error("no capacity on host {host}: {detail}")]
    Capacity {
        /// Host name.
        host: String,
        /// What is short, with the numbers.
        detail: String,
    },
    /// The guest or host is not where the action expects it.
    #[error("{0}")]
    NotFound(String),
    /// The change cannot be made this way (for example a restart-class field asked
    /// for live).
    #[error("refused: {0}")]
    Refused(String),
    /// A failure injected into the simulated fleet by a test.
    #[error("simulated failure: {0}")]
    Simulated(String),
    /// The guest or host reported an error. The message names its cause (with the
    /// cause's own causes, each once), so the cause is not also its `source`: every
    /// place that shows a driver error (apply's report, serve's status and log, the
    /// HTTP API) shows it whole on one line.
    #[error("{context}: {}", one_line(&**cause))]
    Failed {
        /// What was being done.
        context: String,
        /// The error.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DriverError {
    /// [`DriverError::Failed`]: `context` says what was being done.
    pub fn failed(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DriverError::Failed {
            context: context.into(),
            cause: source.into(),
        }
    }
}

/// Runs guests and host settings somewhere: berth-vmm processes on this host, a
/// simulated fleet, later libvirt or remote hosts.
pub trait Driver: Send + Sync {
    /// Which driver this is.
    fn kind(&self) -> DriverKind;

    /// A short name for messages: `local`, `sim`.
    fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Which guests it sees and acts on.
    fn scope(&self) -> Scope;

    /// What it can do; the planner classifies changes from this.
    fn capabilities(&self) -> Capabilities {
        self.kind().capabilities()
    }

    /// The planner's capabilities input for `desired`: this driver's declaration for
    /// the hosts it acts on, the Host manifests' drivers for the others.
    fn plan_capabilities(&self, desired: &Desired) -> FleetCapabilities {
        match self.scope() {
            Scope::Host(host) => {
                FleetCapabilities::from_manifests(desired).with_host(&host, self.capabilities())
            }
            Scope::Fleet => FleetCapabilities::uniform(self.capabilities()),
        }
    }

    /// Every guest and host as they are now, read back from them.
    ///
    /// # Errors
    /// When a host cannot be read.
    fn observe(&self) -> Result<Observed, DriverError>;

    /// Sets host-wide settings (hugepage pools, KSM, transparent hugepages).
    ///
    /// # Errors
    /// When the host refuses (a pool cannot shrink below what guests hold).
    fn configure_host(&self, host: &str, settings: &[HostSetting]) -> Result<(), DriverError>;

    /// Starts `guest` on `host` as its manifest says, running or paused.
    ///
    /// # Errors
    /// When the host lacks room or the guest already runs.
    fn start(&self, guest: &Guest, host: &str) -> Result<(), DriverError>;

    /// Brings the live `fields` of the running guest on `host` to the manifest's values.
    ///
    /// # Errors
    /// When a field cannot be changed live.
    fn retune(&self, guest: &Guest, host: &str, fields: &[Field]) -> Result<(), DriverError>;

    /// Stops the guest `name` on `host`.
    ///
    /// # Errors
    /// When no such guest runs there.
    fn stop(&self, name: &str, host: &str) -> Result<(), DriverError>;

    /// Live-migrates the guest from `from` into a new VMM on `to` built from the
    /// manifest; `from == to` is a local migration. The guest keeps its run state; on
    /// failure it keeps running on `from`.
    ///
    /// # Errors
    /// When the destination lacks room or is incompatible, or the migration fails.
    fn migrate(&self, guest: &Guest, from: &str, to: &str) -> Result<(), DriverError>;
}
