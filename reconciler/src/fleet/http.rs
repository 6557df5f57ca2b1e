//! [`HttpPeers`]: fleet coordination over the other hosts' `berth serve` APIs.
//!
//! - The start guard asks every other host named in the manifests (`GET /status` at its
//!   `address`, concurrently, 2 s each) whether it runs the guest. With the local
//!   driver a host sees only its own guests, so the plan alone cannot tell "new guest"
//!   from "guest still running on its old host". A host that cannot be asked holds the
//!   start back only if it is where the guest was last placed ([`Placements`]):
//!   otherwise one dead host would keep every new guest of the fleet from starting.
//! - Another host's own observation is its `GET /status`'s `observedHost`.
//! - An incoming migration is prepared with `POST /v1/migrations/incoming` and its
//!   outcome read with `GET /v1/migrations/incoming/<guest>`.
//!
//! Every request goes through a [`Transport`] ([`crate::client`]): mutual TLS,
//! where only the host named can answer (a forged "not here" could start a second
//! copy, a forged "I run it" could drop the only one), or plain HTTP on loopback.

use std::sync::Arc;
use std::time::Duration;

use super::peer::{IncomingMigration, IncomingOutcome, IncomingRequest};
use super::placement::Placements;
use super::{BoxFuture, Coordination, CoordinationError, Peer, StartRefused};
use crate::client::{self, Transport};
use crate::model::{Desired, ObservedHost};

/// How long a host may take to answer the start guard before it counts as silent.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// What this module reads of another host's `/status` (the service's
/// `crate::serve::status::Status`; the rest of it is ignored).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerStatus {
    #[serde(default)]
    guests: Vec<PeerGuest>,
    #[serde(default)]
    observed_host: Option<ObservedHost>,
}

/// A guest in another host's `/status`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PeerGuest {
    name: String,
    /// Whether a VMM of the guest runs on that host.
    #[serde(default)]
    runs_here: bool,
}

/// A failed request to `peer`, as the fleet coordination reports it.
fn asking(peer: &Peer, error: client::ClientError) -> CoordinationError {
    CoordinationError {
        host: peer.name.clone(),
        source: Box::new(error),
    }
}

/// Fleet coordination over HTTP. See the module documentation.
pub struct HttpPeers {
    placements: Arc<Placements>,
    transport: Transport,
}

impl HttpPeers {
    /// Asks peers through `transport`; `placements` is where guests were last placed.
    pub fn new(placements: Arc<Placements>, transport: Transport) -> Self {
        HttpPeers {
            placements,
            transport,
        }
    }

    /// The URL of a peer's service (records of earlier versions hold the URL already).
    fn server(&self, peer: &Peer) -> String {
        if peer.address.starts_with("http://") || peer.address.starts_with("https://") {
            peer.address.clone()
        } else {
            self.transport.url(&peer.address)
        }
    }
}

impl Coordination for HttpPeers {
    fn record_placements(&self, me: &str, desired: &Desired) {
        self.placements.record(desired, me);
    }

    fn may_start<'a>(
        &'a self,
        me: &'a str,
        guest: &'a str,
        desired: &'a Desired,
    ) -> BoxFuture<'a, Result<(), StartRefused>> {
        Box::pin(async move {
            let last = self.placements.last_elsewhere(guest);
            let asks = desired
                .hosts
                .iter()
                .filter(|h| h.metadata.name != me)
                .map(|h| {
                    let peer = Peer {
                        name: h.metadata.name.clone(),
                        address: h.spec.address.clone(),
                    };
                    let server = self.server(&peer);
                    let transport = self.transport.clone();
                    async move {
                        let answer = tokio::time::timeout(
                            PEER_TIMEOUT,
                            client::status::<PeerStatus>(&transport, &server, &peer.name),
                        )
                        .await;
                        (peer, answer)
                    }
                });
            for (peer, answer) in super::join_all(asks).await {
                let reason = match answer {
                    Ok(Ok(status)) => {
                        if status.guests.iter().any(|g| g.name == guest && g.runs_here) {
                            return Err(StartRefused::RunsElsewhere {
                                guest: guest.to_owned(),
                                host: peer.name,
                            });
                        }
                        continue;
                    }
                    Ok(Err(e)) => berth_hypervisor::report::one_line(&e),
                    Err(_) => format!("no answer from {} within {PEER_TIMEOUT:?}", peer.address),
                };
                if last.as_deref() == Some(&peer.name) {
                    return Err(StartRefused::CannotAsk {
                        guest: guest.to_owned(),
                        host: peer.name,
                        reason,
                    });
                }
                tracing::debug!(peer = %peer.name, %reason, "peer not asked");
            }
            Ok(())
        })
    }

    fn prepare_incoming<'a>(
        &'a self,
        to: &'a Peer,
        request: &'a IncomingRequest,
    ) -> BoxFuture<'a, Result<IncomingMigration, CoordinationError>> {
        Box::pin(async move {
            client::request_incoming(&self.transport, &self.server(to), &to.name, request)
                .await
                .map_err(|e| asking(to, e))
        })
    }

    fn observe_host<'a>(
        &'a self,
        host: &'a Peer,
    ) -> BoxFuture<'a, Result<Option<ObservedHost>, CoordinationError>> {
        Box::pin(async move {
            let status: PeerStatus =
                client::status(&self.transport, &self.server(host), &host.name)
                    .await
                    .map_err(|e| asking(host, e))?;
            Ok(status.observed_host.filter(|h| h.name == host.name))
        })
    }

    fn incoming_outcome<'a>(
        &'a self,
        host: &'a Peer,
        guest: &'a str,
    ) -> BoxFuture<'a, Result<IncomingOutcome, CoordinationError>> {
        Box::pin(async move {
            client::incoming_running(&self.transport, &self.server(host), &host.name, guest)
                .await
                .map_err(|e| asking(host, e))
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;
    use crate::fleet::peer::NoIncoming;
    use crate::metrics::Metrics;
    use crate::serve::http::{router, ApiState};
    use crate::serve::status::{GuestStatus, StatusStore};

    async fn peer_running(guests: &[&str]) -> String {
        let (triggers, _rx) = mpsc::channel(1);
        let status = StatusStore::default();
        status.update(|s| {
            s.guests = guests
                .iter()
                .map(|name| GuestStatus {
                    name: (*name).to_owned(),
                    host: "kvm01".into(),
                    phase: "Running".into(),
                    runs_here: true,
                    observed_revision: None,
                    conditions: Vec::new(),
                })
                .collect();
        });
        let app = router(ApiState {
            status,
            metrics: Arc::new(Metrics::new()),
            triggers,
            webhook_secret: None,
            peers: crate::serve::http::PeerAuth::Secret(None),
            incoming: Arc::new(NoIncoming),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// An address nothing listens on.
    fn silent() -> String {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").to_string()
    }

    /// Host kvm02 (this one) and `other` at `address`.
    fn fleet(other: &str, address: &str) -> Desired {
        crate::model::desired_from_yaml([format!(
            "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: kvm02}}\n\
             spec: {{address: '127.0.0.1:1', cpus: '0-1', memory: 1GiB}}\n---\n\
             apiVersion: berth.dev/v1\nkind: Host\nmetadata: {{name: {other}}}\n\
             spec: {{address: '{address}', cpus: '0-1', memory: 1GiB}}\n"
        )
        .as_str()])
    }

    fn guard(last_placed_on: Option<&str>) -> HttpPeers {
        let placements = Arc::new(Placements::open(None));
        if let Some(host) = last_placed_on {
            let placed = crate::model::desired_from_yaml([format!(
                "apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {{name: web-1}}\n\
                 spec: {{host: {host}, cpu: {{vcpus: 1}}, memory: {{size: 64MiB}}}}\n"
            )
            .as_str()]);
            placements.record(&placed, "kvm02");
        }
        HttpPeers::new(placements, Transport::plain())
    }

    #[tokio::test]
    async fn waits_while_a_peer_runs_the_guest() {
        let kvm01 = fleet("kvm01", &peer_running(&["web-1"]).await);
        let guard = guard(None);
        let refused = guard.may_start("kvm02", "web-1", &kvm01).await;
        assert_eq!(
            refused.expect_err("must wait").to_string(),
            "kvm01 still runs web-1; not starting a second copy"
        );
        assert_eq!(guard.may_start("kvm02", "db-1", &kvm01).await, Ok(()));
    }

    #[tokio::test]
    async fn a_silent_peer_blocks_only_where_the_guest_was_last_placed() {
        let kvm03 = fleet("kvm03", &silent());
        assert_eq!(
            guard(None).may_start("kvm02", "web-1", &kvm03).await,
            Ok(())
        );
        let refused = guard(Some("kvm03"))
            .may_start("kvm02", "web-1", &kvm03)
            .await
            .expect_err("must wait");
        assert_eq!(refused.host(), "kvm03");
        assert!(
            refused
                .to_string()
                .starts_with("kvm03 may still run web-1 and cannot be asked ("),
            "{refused}"
        );
    }
}
