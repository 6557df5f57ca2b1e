//! Servers of the API over TLS, for tests: the real router behind the real
//! [`crate::tls::TlsListener`], with certificates of a test fleet.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{router, ApiState, PeerAuth};
use crate::fleet::peer::{IncomingMigrations, IncomingOutcome, NoIncoming, PeerError};
use crate::metrics::Metrics;
use crate::serve::status::StatusStore;
use crate::tls::{Connection, FleetTls, HostNames, TestFiles, TlsListener};

/// A host that answers "I run it" for every guest (the real kvm02, or a forger).
pub struct RunsEverything;

impl IncomingMigrations for RunsEverything {
    fn prepare(
        &self,
        _: &crate::fleet::peer::IncomingRequest,
    ) -> Result<crate::fleet::peer::IncomingMigration, PeerError> {
        Err(PeerError::Refused("not in this test".into()))
    }

    fn running(&self, _: &str) -> Result<IncomingOutcome, PeerError> {
        Ok(IncomingOutcome {
            running: true,
            downtime_ms: Some(1.0),
        })
    }
}

/// Serves the API as `name` with the certificate `name` of `files`, accepting the
/// Hosts `hosts` as peers; returns `127.0.0.1:port`.
pub async fn serve_tls(
    files: &TestFiles,
    name: &str,
    hosts: &[&str],
    incoming: Arc<dyn IncomingMigrations>,
) -> String {
    let tls = FleetTls::load_for_host(&files.args(Some(name)), name).expect("tls");
    let names = HostNames::default();
    names.set(hosts.iter().map(|h| (*h).to_owned()));
    let (triggers, rx) = mpsc::channel(1);
    // Kept open for the server's life.
    std::mem::forget(rx);
    let status = StatusStore::default();
    status.update(|s| s.host = name.to_owned());
    let app = router(ApiState {
        status,
        metrics: Arc::new(Metrics::new()),
        triggers,
        webhook_secret: None,
        peers: PeerAuth::Certificates(names),
        incoming,
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr").to_string();
    let listener =
        TlsListener::new(tcp, tls.server_config().expect("server config")).expect("listener");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<Connection>(),
        )
        .await
    });
    addr
}

/// A host without incoming migrations.
pub fn no_incoming() -> Arc<dyn IncomingMigrations> {
    Arc::new(NoIncoming)
}
