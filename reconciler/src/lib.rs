//! The berth reconciler: observe what runs, diff it against the manifests, classify each
//! change, plan the actions in a safe order, and render the plan.
//!
//! The layers point one way:
//! - [`model`]: the desired side (schema types) and the observed side ([`ObservedGuest`],
//!   [`ObservedHost`]).
//! - [`diff`] and [`classify`]: field changes and how each is applied (DESIGN.md's table),
//!   from what the host's driver declares it can do.
//! - [`mod@plan`]: the pure, deterministic `plan(desired, observed, capabilities) -> Plan`.
//! - [`driver`]: the [`driver::Driver`] trait, what drivers declare
//!   ([`driver::Capabilities`], [`driver::Scope`], [`driver::DriverKind`]), the local
//!   driver (berth-vmm) and `SimDriver`, a simulated fleet.
//! - [`fleet`]: coordination with the other hosts ([`fleet::Coordination`]: the start
//!   guard, incoming migrations, switchover outcomes) and the cross-host migration built
//!   on it.
//! - [`etcd`]: fleet coordination on etcd (host leases, guest ownership with fencing
//!   tokens, leader election); not yet behind [`fleet::Coordination`].
//! - [`apply`]: runs a plan through a driver, wave by wave; the only place with effects.
//! - Shared by [`fleet`] and [`serve`]: [`client`] (the service API's HTTP client) and
//!   [`auth`] (its secrets), [`metrics`] (Prometheus), [`backoff`] (per-guest retry
//!   delays), [`conditions`] (a guest's conditions) and [`revision`] (one revision of
//!   the manifest repository, read and validated).
//! - [`git`]: a revision's manifest files, read with the git CLI (no checkout).
//! - [`machine`]: the Host manifest checked against this machine before acting.
//! - [`output`]: the `-o/--output` flag every command that prints data shares.
//! - [`render`]: the plan as text, JSON (with its JSON Schema) and markdown.
//! - [`serve`]: `berth serve`, the host-resident service (git source, reconcile loop,
//!   HTTP API, status), and `berth status`.
#![warn(missing_docs)]

pub mod apply;
pub mod auth;
pub mod backoff;
pub mod classify;
pub mod client;
pub mod conditions;
pub mod diff;
pub mod driver;
pub mod etcd;
pub mod fleet;
pub mod git;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod output;
pub mod plan;
pub mod render;
pub mod revision;
pub mod scheduler;
pub mod serve;
pub mod tls;

pub use model::{Desired, Observed, ObservedGuest, ObservedHost};
pub use plan::{plan, Plan};
