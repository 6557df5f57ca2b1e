//! Fleet coordination on etcd: host leases, the fleet's published state, guest ownership
//! with fencing tokens, and leader election. This is the etcd side only; the reconcile
//! loop reaches it through the fleet-coordination trait (one host needs no etcd at all).
//!
//! Everything berth keeps in etcd lives under one prefix (`/berth/` unless configured),
//! so that one range read returns the whole fleet at one revision:
//!
//! | key | value (JSON) | bound to the lease of |
//! |---|---|---|
//! | `<prefix>hosts/<host>` | [`HostRecord`]: the host as observed, its address and its lease timeouts | the host |
//! | `<prefix>observed/<host>/<guest>` | the guest as that host observes it ([`crate::ObservedGuest`]) | the host |
//! | `<prefix>owners/<guest>` | [`OwnerRecord`]: the host that may run the guest, and where it is moving | the owning host |
//! | `<prefix>leader/<lease id, hex>` | the candidate host's name (etcd's election API) | the candidate |
//! | `<prefix>placements/<guest>` | [`PlacementRecord`]: the host the leader chose for a selector-placed guest, or why none fits | nothing (outlives leaders) |
//!
//! What each guarantees:
//! - **Liveness** ([`HostSession`]): a host holds one lease, renewed every
//!   [`LeaseTimeouts::renew_every`]; everything it publishes is bound to it, so a host that
//!   dies (or is cut off) disappears from etcd, with its ownership records, one TTL after
//!   its last renewal. The host counts its own deadline from the moment it *sent* the last
//!   renewal that etcd answered, which is never later than etcd's own count, and must have
//!   fenced itself (stopped its HA guests) [`LeaseTimeouts::self_fence_after`] that
//!   renewal, strictly before the lease can expire.
//! - **Ownership** ([`HostSession::acquire`] and the handover methods): a record is
//!   created only if absent (`CreateRevision == 0`) and changed only by compare-and-swap
//!   on its `ModRevision`. The `ModRevision` of the record a host holds is its
//!   [`FencingToken`]: the host writes it into the guest's state and checks it
//!   ([`HostSession::verify`]) before it acts on the guest; any change by anyone else
//!   makes the token stale. A migration hands the record over in two swaps, `A` ->
//!   `A, moving to B` -> `B`, the second made by the destination once its VMM read
//!   `Commit`; a migration that ends before `Commit` puts `A` back (by A, or by B with
//!   [`HostSession::refuse_handover`]). So an unknown switchover is resolved from the
//!   record ([`resolve_switchover`]) and never from what a peer says; while it still
//!   says `A, moving to B` the destination has not decided and the source waits.
//! - **Leadership** ([`Leadership`]): etcd's election API over the candidates' leases.
//!   When the leader's lease expires its key goes with it and the next candidate is
//!   elected, one TTL after the leader's last renewal (etcd checks for expired leases
//!   every 500 ms). The leader's writes can be
//!   fenced by the creation revision of its election key ([`Leadership::guard`]).
//!
//! How the fleet-coordination trait's questions map onto this module (the integration
//! step; nothing here depends on the trait):
//! - *may this host start the guest* (does another host still run it): [`HostSession::acquire`];
//!   `HeldElsewhere` names the host, and the record outlives that host only by one TTL;
//! - *prepare an incoming guest / follow a migration*: [`HostSession::begin_handover`] by
//!   the source, [`HostSession::complete_handover`] by the destination at the
//!   switchover's commit, [`HostSession::abort_handover`] when the move is abandoned;
//! - *resolve an unknown switchover*: [`resolve_switchover`];
//! - *before acting on a guest*: [`HostSession::verify`] with the token in its state;
//! - the leader follows hosts with [`read_fleet`] then [`HostWatch`] from its revision,
//!   and berth serve renews each HA guest VMM's `fenceDeadline` to
//!   [`LeaseHealth::vmm_fence_in`].
//!
//! An etcd outage stops nothing that runs: no record is needed to keep a guest running,
//! only to start or move one. A host whose lease is in doubt ([`LeaseHealth`]) starts and
//! moves nothing and stops only its HA guests.

mod args;
mod election;
mod fence;
mod ownership;
pub mod placements;
mod session;
mod view;

use std::path::PathBuf;
use std::time::Duration;

pub use args::{EtcdArgs, LeaseArgs, NoEtcd};
pub use election::{current_leader, Leadership};
pub use fence::{begin_deadline_file, fence_round, keep_fences, FenceTargets};
pub use ownership::{
    read_owner, resolve_switchover, Acquire, Fenced, FencingToken, OwnerRecord, Ownership,
    Switchover,
};
pub use placements::{
    decide, follow_placements, follow_placements_for, lead, lead_on, lead_round, placements_of,
    read_placements, LeaderSettings, PlacementChange, PlacementRecord, Round, SharedPlacements,
};
pub use session::{HostRecord, HostSession, LeaseHealth, LeaseState};
pub use view::{read_fleet, read_host, FleetView, HostEvent, HostWatch, PublishedHost};

/// A failure talking to etcd, or a value in etcd berth cannot read.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The client could not be set up (bad endpoint URL, TLS or credentials).
    #[error("cannot connect to etcd at {endpoints}")]
    Connect {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client's error.
        #[source]
        source: EtcdCause,
    },
    /// A request failed.
    #[error("etcd: {what} failed")]
    Request {
        /// What berth asked, e.g. `granting a lease`.
        what: String,
        /// The client's error.
        #[source]
        source: EtcdCause,
    },
    /// A request got no answer in time (etcd unreachable, or partitioned away).
    #[error("etcd: {what} got no answer within {timeout:?}")]
    Timeout {
        /// What berth asked.
        what: String,
        /// How long berth waited.
        timeout: Duration,
    },
    /// A key holds a value that is not what berth writes there.
    #[error("etcd key {key} holds a value berth cannot read")]
    Decode {
        /// The key.
        key: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A TLS file could not be read.
    #[error("cannot read the etcd TLS file {}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The lease timeouts do not leave the self-fence time before the lease expires.
    #[error("invalid etcd lease timeouts: {0}")]
    Timeouts(&'static str),
}

/// etcd-client's error, printed for an operator. Its own text of a failed gRPC request is
/// tonic's `Status`, which ends in the Debug form of the transport error
/// (`source: tonic::transport::Error(Transport, ConnectError(...))`); this prints the
/// status's message, then each cause once (down to the operating system's error, such
/// as `Connection refused`), then the gRPC code: `tcp connect error: Connection refused
/// (os error 111) (Unavailable)`, `etcdserver: user name is empty (InvalidArgument)`.
#[derive(Debug)]
pub struct EtcdCause(pub etcd_client::Error);

impl From<etcd_client::Error> for EtcdCause {
    fn from(error: etcd_client::Error) -> EtcdCause {
        EtcdCause(error)
    }
}

impl std::fmt::Display for EtcdCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::error::Error as _;
        let (first, cause, code) = match &self.0 {
            etcd_client::Error::GRpcStatus(status) => (
                status.message().to_owned(),
                status.source(),
                Some(status.code()),
            ),
            other => (other.to_string(), other.source(), None),
        };
        let chain = std::iter::once(first)
            .chain(std::iter::successors(cause, |e| (*e).source()).map(|e| e.to_string()));
        let text = berth_hypervisor::report::causes_once(chain).join(": ");
        match code {
            Some(code) if text.is_empty() => write!(f, "{code:?}"),
            Some(code) => write!(f, "{text} ({code:?})"),
            None => f.write_str(&text),
        }
    }
}

// Its causes are part of its text (above), so it has no `source` of its own.
impl std::error::Error for EtcdCause {}

/// How long a host's lease lives and when the host must have fenced itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimeouts {
    /// The lease's TTL: etcd drops the host's records this long after its last renewal.
    /// Whole seconds (etcd's unit), at least 2.
    pub ttl: Duration,
    /// How often the host renews.
    pub renew_every: Duration,
    /// How long after the last answered renewal the host must have stopped its HA
    /// guests. Shorter than `ttl` by at least a second, the time to stop them.
    pub self_fence_after: Duration,
}

impl Default for LeaseTimeouts {
    /// A 10 s lease renewed every second, with the self-fence due 6 s after the last
    /// renewal: a dead host's HA guests can be restarted elsewhere about 10 s after it
    /// died, and it has 4 s to stop them before that.
    fn default() -> Self {
        LeaseTimeouts {
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(1),
            self_fence_after: Duration::from_secs(6),
        }
    }
}

impl LeaseTimeouts {
    /// Checks the relations the fencing guarantee rests on.
    pub fn validate(&self) -> Result<(), EtcdError> {
        if self.ttl.subsec_nanos() != 0 || self.ttl < Duration::from_secs(2) {
            return Err(EtcdError::Timeouts(
                "the lease TTL must be whole seconds, at least 2",
            ));
        }
        if self.renew_every.is_zero() || self.renew_every >= self.self_fence_after {
            return Err(EtcdError::Timeouts(
                "the lease must be renewed more often than the self-fence timeout",
            ));
        }
        if self.self_fence_after + Duration::from_secs(1) > self.ttl {
            return Err(EtcdError::Timeouts(
                "the self-fence timeout must be at least 1 s shorter than the lease TTL",
            ));
        }
        Ok(())
    }

    /// The TTL in etcd's unit.
    fn ttl_seconds(&self) -> i64 {
        self.ttl.as_secs() as i64
    }
}

/// Client certificates for etcd over TLS (`https://` endpoints).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate (PEM); the system roots otherwise.
    pub ca: Option<PathBuf>,
    /// This host's client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub key: Option<PathBuf>,
    /// The name to check etcd's certificate against, when not the endpoint's host.
    pub domain: Option<String>,
}

/// etcd's own authentication (a user with a password).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Where the fleet's etcd is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// The key prefix all of berth's keys live under; ends with `/`.
    pub prefix: String,
    /// TLS client settings; `None` for plain `http://` endpoints.
    pub tls: Option<EtcdTls>,
    /// etcd user and password, when etcd has authentication enabled.
    pub auth: Option<EtcdAuth>,
    /// How long one request may take before berth counts etcd as unreachable.
    pub request_timeout: Duration,
    /// The host lease's timeouts.
    pub lease: LeaseTimeouts,
}

impl EtcdConfig {
    /// The default settings for the comma-separated endpoint list `urls` (as
    /// `--etcd URL[,URL...]` takes it).
    pub fn new(urls: &str) -> Self {
        EtcdConfig {
            endpoints: urls
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
            prefix: "/berth/".to_owned(),
            tls: None,
            auth: None,
            request_timeout: Duration::from_secs(2),
            lease: LeaseTimeouts::default(),
        }
    }

    /// Connects (lazily: the first request finds out whether etcd answers, except that
    /// credentials are checked at once).
    pub async fn connect(&self) -> Result<EtcdStore, EtcdError> {
        self.lease.validate()?;
        let endpoints = self.endpoints.join(",");
        let connect_error = |source: etcd_client::Error| EtcdError::Connect {
            endpoints: endpoints.clone(),
            source: source.into(),
        };
        // HTTP/2 pings notice a dead or partitioned etcd on a connection with a stream
        // open (a host's always has its lease's keep-alive stream), so that the client
        // reconnects. Not more often than every 10 s: etcd closes connections that ping
        // more often than its --grpc-keepalive-min-time (5 s by default), or that ping
        // with no stream open.
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(10), self.request_timeout)
            .with_keep_alive_while_idle(false);
        if let Some(auth) = &self.auth {
            options = options.with_user(auth.user.clone(), auth.password.clone());
        }
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = tokio::time::timeout(
            self.request_timeout,
            etcd_client::Client::connect(&self.endpoints, Some(options)),
        )
        .await
        .map_err(|_| EtcdError::Timeout {
            what: format!("connection to {endpoints}"),
            timeout: self.request_timeout,
        })?
        .map_err(connect_error)?;
        Ok(EtcdStore {
            client,
            endpoints,
            keys: Keys {
                prefix: self.prefix.clone(),
            },
            request_timeout: self.request_timeout,
            lease: self.lease,
        })
    }
}

fn tls_options(tls: &EtcdTls) -> Result<etcd_client::TlsOptions, EtcdError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| EtcdError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(domain) = &tls.domain {
        options = options.domain_name(domain.clone());
    }
    Ok(options)
}

/// The key layout under the prefix (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>hosts/`: every host's record.
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }

    /// `<prefix>observed/`: every observed guest of every host.
    pub fn observed_all(&self) -> String {
        format!("{}observed/", self.prefix)
    }

    /// `<prefix>owners/`: every ownership record.
    pub fn owners(&self) -> String {
        format!("{}owners/", self.prefix)
    }

    /// `<prefix>hosts/<host>`.
    pub fn host(&self, host: &str) -> String {
        format!("{}hosts/{host}", self.prefix)
    }

    /// `<prefix>observed/<host>/`: every guest `host` publishes.
    pub fn observed_of(&self, host: &str) -> String {
        format!("{}observed/{host}/", self.prefix)
    }

    /// `<prefix>observed/<host>/<guest>`.
    pub fn observed(&self, host: &str, guest: &str) -> String {
        format!("{}observed/{host}/{guest}", self.prefix)
    }

    /// `<prefix>owners/<guest>`.
    pub fn owner(&self, guest: &str) -> String {
        format!("{}owners/{guest}", self.prefix)
    }

    /// `<prefix>placements/`: every placement record.
    pub fn placements(&self) -> String {
        format!("{}placements/", self.prefix)
    }

    /// `<prefix>placements/<guest>`.
    pub fn placement(&self, guest: &str) -> String {
        format!("{}placements/{guest}", self.prefix)
    }

    /// `<prefix>leader`: the election's name (candidates' keys are `<name>/<lease>`).
    pub fn election(&self) -> String {
        format!("{}leader", self.prefix)
    }
}

/// A connection to the fleet's etcd, with berth's key layout and timeouts.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
    /// The endpoints, comma-separated, for error messages.
    endpoints: String,
    keys: Keys,
    request_timeout: Duration,
    lease: LeaseTimeouts,
}

impl EtcdStore {
    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The lease timeouts hosts of this store use.
    pub fn lease_timeouts(&self) -> LeaseTimeouts {
        self.lease
    }

    /// A clone of the raw client, for what this module does not wrap (tests inspect
    /// keys with it).
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    /// Runs one request with the request timeout, naming it and the endpoints in the
    /// error.
    async fn call<T>(
        &self,
        what: impl Fn() -> String,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(source)) => Err(EtcdError::Request {
                what: format!("{} at {}", what(), self.endpoints),
                source: source.into(),
            }),
            Err(_) => Err(EtcdError::Timeout {
                what: format!("{} at {}", what(), self.endpoints),
                timeout: self.request_timeout,
            }),
        }
    }
}

/// The store revision a response was served at.
fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map(|h| h.revision()).unwrap_or_default()
}

/// Parses a JSON value stored at `key`.
fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, EtcdError> {
    serde_json::from_slice(value).map_err(|source| EtcdError::Decode {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

/// Serializes a value berth writes (its types always serialize).
fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("berth's etcd records serialize")
}
