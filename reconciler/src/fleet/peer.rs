//! The peer API hosts use for cross-host live migration: the source host's service asks
//! the destination's to prepare an incoming VMM (`POST /v1/migrations/incoming`) and
//! gets back the address to stream to and a one-time token that authenticates the
//! stream.
//!
//! Requests come over mutual TLS from a host of the fleet (a client certificate of the
//! fleet CA naming a Host; see [`super::http`]); with `--insecure-plain-http` they carry
//! the fleet's shared secret instead (`Authorization: Bearer <secret>`), and with no
//! secret configured the API refuses everything. What preparing means (building the
//! VMM, reserving memory, listening) belongs to the driver: with `--driver local`,
//! [`super::incoming::LocalIncoming`] implements [`IncomingMigrations`].

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The path of the request.
pub const INCOMING_PATH: &str = "/v1/migrations/incoming";

/// A request to prepare an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingRequest {
    /// The guest.
    pub guest: String,
    /// The host it comes from.
    pub from: String,
    /// The commit id of the revision the source plans from: the destination builds the
    /// VMM from its own copy of that revision, never from manifest text sent over the
    /// wire.
    pub revision: String,
}

/// A prepared incoming migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingMigration {
    /// Where the source streams the guest to.
    pub listen: SocketAddr,
    /// Single-use token that authenticates the stream; expires unused.
    pub token: String,
}

/// Why an incoming migration could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// This host's driver cannot receive migrations.
    #[error("this host receives no migrations: {0}")]
    Unsupported(&'static str),
    /// The request names a guest that is not placed on this host, or one that already
    /// runs here.
    #[error("refused: {0}")]
    Refused(String),
    /// No room (memory, hugepages, CPUs) for the guest.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// Preparing failed.
    #[error("cannot prepare the incoming migration: {0}")]
    Failed(String),
    /// This host cannot tell yet whether it runs the guest of an incoming migration.
    #[error(transparent)]
    CannotTell(crate::driver::local::follow::CannotTell),
    /// Another process (`berth apply` or `berth stop` by hand) holds this host's state
    /// lock: asked again later, it may succeed.
    #[error("not now: {0}")]
    Busy(crate::driver::local::LockError),
}

/// Prepares incoming VMMs on this host; implemented by the migration engine.
///
/// Called from a blocking thread, so implementations may block. Implementations must
/// refuse a guest that already runs on this host and must clean up a prepared VMM whose
/// token goes unused.
pub trait IncomingMigrations: Send + Sync {
    /// Prepares an incoming VMM for `request.guest`.
    ///
    /// # Errors
    /// [`PeerError`] saying why not.
    fn prepare(&self, request: &IncomingRequest) -> Result<IncomingMigration, PeerError>;

    /// Whether the guest runs here after an incoming migration: what a source whose
    /// switchover ended unknown asks (`GET /v1/migrations/incoming/<guest>`) before it
    /// resumes or drops its copy.
    ///
    /// # Errors
    /// [`PeerError`] when this host cannot tell yet.
    fn running(&self, guest: &str) -> Result<IncomingOutcome, PeerError> {
        let _ = guest;
        Err(PeerError::Unsupported("its driver cannot receive them"))
    }
}

/// The answer to `GET /v1/migrations/incoming/<guest>`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingOutcome {
    /// Whether the guest runs on this host.
    pub running: bool,
    /// The switchover pause as the incoming VMM measured it (state read to vCPUs
    /// started), once it runs the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
}

/// What a host whose driver cannot receive migrations answers (the simulated fleet).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIncoming;

impl IncomingMigrations for NoIncoming {
    fn prepare(&self, _: &IncomingRequest) -> Result<IncomingMigration, PeerError> {
        Err(PeerError::Unsupported(
            "its driver (the simulated fleet) cannot receive them",
        ))
    }
}
