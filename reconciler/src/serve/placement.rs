//! Never two copies of a guest: before this host starts a guest that does not run here,
//! it asks the other hosts' services whether they still run it (a guest moving here is
//! migrated by its source; this host waits for that and says so).
//!
//! With the local driver a host sees only its own guests, so the plan alone cannot
//! tell "new guest" from "guest still running on its old host". The guard asks every
//! other host named in the manifests (`GET /status` at its `address`). A host that does
//! not answer blocks the start only if it is where the guest was last placed (from the
//! revisions enforced here, remembered across restarts in the state directory):
//! otherwise one dead host would keep every new guest of the fleet from starting.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use crate::model::Desired;

/// Another host of the fleet, as the guard asks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Host name.
    pub name: String,
    /// Its service's `host:port`.
    pub address: String,
    /// Whether the guest was last placed there: then a silent peer blocks the start.
    pub last_placement: bool,
}

/// Why a start must wait.
pub type Wait = String;

/// The future a guard returns: `Ok` to go ahead, `Err` with the reason to wait.
pub type GuardFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Wait>> + Send + 'a>>;

/// Checks, before a start, that no other host runs the guest.
pub trait StartGuard: Send + Sync {
    /// `Ok` when no peer runs `guest`; `Err` saying which does, or which could not be
    /// asked.
    fn check<'a>(&'a self, guest: &'a str, peers: Vec<Peer>) -> GuardFuture<'a>;
}

/// Asks the peers' `/status` over HTTP: over mutual TLS, where only the peer named can
/// answer (a forged "not here" could start a second copy).
#[derive(Debug, Clone)]
pub struct HttpPeers(pub super::client::Transport);

/// How long a peer may take to answer before it counts as silent.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

impl StartGuard for HttpPeers {
    fn check<'a>(&'a self, guest: &'a str, peers: Vec<Peer>) -> GuardFuture<'a> {
        Box::pin(async move {
            let asks = peers.into_iter().map(|peer| {
                let transport = self.0.clone();
                async move {
                    let server = transport.url(&peer.address);
                    let answer = tokio::time::timeout(
                        PEER_TIMEOUT,
                        super::client::status(&transport, &server, &peer.name),
                    )
                    .await;
                    (peer, answer)
                }
            });
            for (peer, answer) in futures_join_all(asks).await {
                match answer {
                    Ok(Ok(status)) => {
                        if status.guests.iter().any(|g| g.name == guest && g.runs_here) {
                            return Err(format!(
                                "{} still runs {guest}; waiting for its migration",
                                peer.name
                            ));
                        }
                    }
                    Ok(Err(e)) if peer.last_placement => {
                        return Err(format!(
                            "{guest} was last placed on {}, which cannot be asked ({e}); \
                             not starting a second copy",
                            peer.name
                        ))
                    }
                    Err(_) if peer.last_placement => {
                        return Err(format!(
                            "{guest} was last placed on {}, which did not answer within {PEER_TIMEOUT:?}; \
                             not starting a second copy",
                            peer.name
                        ))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer.name, error = %e, "peer not asked")
                    }
                    Err(_) => tracing::debug!(peer = %peer.name, "peer did not answer"),
                }
            }
            Ok(())
        })
    }
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F: Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a peer check does not panic"));
    }
    out
}

/// Where each guest was last placed on another host than this one, by the revisions
/// enforced here; kept in a JSON file so that it survives a restart.
#[derive(Debug, Default)]
pub struct Placements {
    file: Option<PathBuf>,
    elsewhere: Mutex<BTreeMap<String, String>>,
}

impl Placements {
    /// Loads the record from `file` (a missing or unreadable file is an empty record).
    pub fn open(file: Option<PathBuf>) -> Self {
        let elsewhere = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Placements {
            file,
            elsewhere: Mutex::new(elsewhere),
        }
    }

    /// Records the placements of a newly enforced revision.
    pub fn record(&self, desired: &Desired, me: &str) {
        let mut map = self.elsewhere.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for g in desired.guests.iter().filter(|g| g.spec.host != me) {
            if map.get(&g.metadata.name) != Some(&g.spec.host) {
                map.insert(g.metadata.name.clone(), g.spec.host.clone());
                changed = true;
            }
        }
        if let (true, Some(file)) = (changed, &self.file) {
            let text = serde_json::to_vec_pretty(&*map).expect("a map of strings serializes");
            let tmp = file.with_extension("json.tmp");
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, file)) {
                tracing::error!(error = %e, file = %file.display(), "cannot save the placements");
            }
        }
    }

    /// The other host `guest` was last placed on.
    pub fn last_elsewhere(&self, guest: &str) -> Option<String> {
        self.elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(guest)
            .cloned()
    }

    /// The peers to ask before starting `guest` on `me`: every other host of
    /// `desired` with an address.
    pub fn peers(&self, desired: &Desired, me: &str, guest: &str) -> Vec<Peer> {
        let last = self.last_elsewhere(guest);
        desired
            .hosts
            .iter()
            .filter(|h| h.metadata.name != me)
            .map(|h| Peer {
                name: h.metadata.name.clone(),
                address: h.spec.address.clone(),
                last_placement: last.as_deref() == Some(h.metadata.name.as_str()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;
    use crate::serve::http::{router, ApiState};
    use crate::serve::metrics::Metrics;
    use crate::serve::peer::NoIncoming;
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

    fn peer(name: &str, address: &str, last_placement: bool) -> Peer {
        Peer {
            name: name.into(),
            address: address.into(),
            last_placement,
        }
    }

    #[tokio::test]
    async fn waits_while_a_peer_runs_the_guest() {
        let kvm01 = peer_running(&["web-1"]).await;
        let guard = HttpPeers(crate::serve::client::Transport::plain());
        let wait = guard
            .check("web-1", vec![peer("kvm01", &kvm01, true)])
            .await;
        assert!(wait
            .expect_err("must wait")
            .contains("kvm01 still runs web-1"));
        assert_eq!(
            guard
                .check("db-1", vec![peer("kvm01", &kvm01, false)])
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_silent_peer_blocks_only_where_the_guest_was_last_placed() {
        let guard = HttpPeers(crate::serve::client::Transport::plain());
        let dead = silent();
        assert_eq!(
            guard
                .check("web-1", vec![peer("kvm03", &dead, false)])
                .await,
            Ok(())
        );
        let wait = guard.check("web-1", vec![peer("kvm03", &dead, true)]).await;
        assert!(wait
            .expect_err("must wait")
            .contains("last placed on kvm03"));
    }

    #[test]
    fn placements_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("placements.json");
        let text = "apiVersion: berth.dev/v1\nkind: Host\nmetadata: {name: kvm01}\n\
                    spec: {address: 127.0.0.1:7410, cpus: 0-1, memory: 4GiB}\n---\n\
                    apiVersion: berth.dev/v1\nkind: Guest\nmetadata: {name: web-1}\n\
                    spec: {host: kvm01, cpu: {vcpus: 1}, memory: {size: 64MiB}}\n";
        let v = berth_schema::load_files([("g.yaml", text)]).expect("valid");
        let desired = Desired::from_manifests(&v.manifests);
        let placements = Placements::open(Some(file.clone()));
        placements.record(&desired, "kvm02");
        placements.record(&desired, "kvm01"); // placed here: the record keeps kvm01
        drop(placements);
        let placements = Placements::open(Some(file));
        assert_eq!(placements.last_elsewhere("web-1").as_deref(), Some("kvm01"));
        assert_eq!(placements.last_elsewhere("db-1"), None);
    }
}
