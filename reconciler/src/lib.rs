//! The berth reconciler: observe what runs, diff it against the manifests, classify each
//! change, plan the actions in a safe order, and render the plan.
//!
//! - [`model`]: the desired side (schema types) and the observed side ([`ObservedGuest`],
//!   [`ObservedHost`]).
//! - [`diff`] and [`classify`]: field changes and how each is applied (DESIGN.md's table).
//! - [`plan`]: the pure, deterministic `plan(desired, observed) -> Plan`.
//! - [`driver`]: the [`driver::Driver`] trait and `SimDriver`, a simulated fleet.
//! - [`etcd`]: fleet coordination on etcd (host leases, guest ownership with fencing
//!   tokens, leader election).
//! - [`apply`]: runs a plan through a driver, wave by wave.
//! - [`git`]: a revision's manifest files, read with the git CLI (no checkout).
//! - [`render`]: the plan as text, JSON (with its JSON Schema) and markdown.
//! - [`serve`]: `berth serve`, the host-resident service (git source, reconcile loop,
//!   HTTP API), and `berth status`.
#![warn(missing_docs)]

pub mod apply;
pub mod classify;
pub mod diff;
pub mod driver;
pub mod etcd;
pub mod git;
pub mod model;
pub mod plan;
pub mod render;
pub mod serve;

pub use model::{Desired, Observed, ObservedGuest, ObservedHost};
pub use plan::{plan, Plan};
