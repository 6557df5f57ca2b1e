//! The API's client ([`crate::client`]) against the real router: the fleet secret,
//! certificates, and what each kind of caller may ask.

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::mpsc;

use super::testing::{no_incoming, serve_tls, RunsEverything};
use super::{router, ApiState, PeerAuth};
use crate::auth::Secret;
use crate::client::*;
use crate::fleet::peer::IncomingRequest;
use crate::fleet::peer::NoIncoming;
use crate::metrics::Metrics;
use crate::serve::status::{Status, StatusStore};
use crate::tls::{FleetTls, TestFiles};

/// The whole `/status`.
async fn status(transport: &Transport, server: &str, name: &str) -> Result<Status, ClientError> {
    crate::client::status(transport, server, name).await
}

#[tokio::test]
async fn talks_to_the_api_over_plain_tcp_with_the_fleet_secret() {
    let (triggers, _rx) = mpsc::channel(1);
    let store = StatusStore::default();
    store.update(|s| s.host = "kvm02".into());
    let app = router(ApiState {
        status: store,
        metrics: Arc::new(Metrics::new()),
        triggers,
        webhook_secret: None,
        peers: PeerAuth::Secret(Some(Arc::new(Secret::new("fleet")))),
        incoming: Arc::new(NoIncoming),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let plain = Transport::plain();
    assert_eq!(
        status(&plain, &server, "kvm02").await.expect("status").host,
        "kvm02"
    );
    let with = |secret: &str| Transport::Plain {
        fleet_secret: Some(Arc::new(Secret::new(secret))),
    };
    let wrong = request_incoming(&with("nope"), &server, "kvm02", &request("kvm01")).await;
    assert_eq!(code(&wrong), Some(StatusCode::UNAUTHORIZED), "{wrong:?}");
    let right = request_incoming(&with("fleet"), &server, "kvm02", &request("kvm01")).await;
    assert_eq!(code(&right), Some(StatusCode::NOT_IMPLEMENTED), "{right:?}");
}

fn request(from: &str) -> IncomingRequest {
    IncomingRequest {
        guest: "web-1".into(),
        from: from.into(),
        revision: "0".repeat(40),
    }
}

fn code<T>(result: &Result<T, ClientError>) -> Option<StatusCode> {
    match result {
        Err(ClientError::Status { status, .. }) => Some(*status),
        _ => None,
    }
}

fn client(files: &TestFiles, name: Option<&str>) -> Transport {
    let tls = FleetTls::load(&files.args(name)).expect("tls");
    Transport::Tls(Arc::new(tls.client().expect("client")))
}

/// What a host with the fleet's certificate gets, and what anyone else gets: no
/// client certificate, one of another CA, one naming no Host, plain HTTP on the TLS
/// port.
#[tokio::test]
async fn over_tls_only_hosts_of_the_fleet_reach_the_peer_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = TestFiles::make(dir.path(), &["kvm01", "kvm02", "kvm03", "admin"]);
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = TestFiles::make(other_dir.path(), &["kvm01"]);
    let addr = serve_tls(&fleet, "kvm02", &["kvm01", "kvm02", "kvm03"], no_incoming()).await;
    let server = format!("https://{addr}");

    // kvm01, with its certificate: through to the handler (501: no incoming here).
    let kvm01 = client(&fleet, Some("kvm01"));
    assert_eq!(
        status(&kvm01, &server, "kvm02").await.expect("status").host,
        "kvm02"
    );
    let asked = request_incoming(&kvm01, &server, "kvm02", &request("kvm01")).await;
    assert_eq!(code(&asked), Some(StatusCode::NOT_IMPLEMENTED), "{asked:?}");
    // ... but not on behalf of another host.
    let forged_from = request_incoming(&kvm01, &server, "kvm02", &request("kvm03")).await;
    assert_eq!(
        code(&forged_from),
        Some(StatusCode::FORBIDDEN),
        "{forged_from:?}"
    );

    // No client certificate: /status yes, the peer API no.
    let anonymous = client(&fleet, None);
    assert_eq!(
        status(&anonymous, &server, "kvm02")
            .await
            .expect("status")
            .host,
        "kvm02"
    );
    let refused = request_incoming(&anonymous, &server, "kvm02", &request("kvm01")).await;
    assert_eq!(
        code(&refused),
        Some(StatusCode::UNAUTHORIZED),
        "{refused:?}"
    );
    let refused = incoming_running(&anonymous, &server, "kvm02", "web-1").await;
    assert_eq!(
        code(&refused),
        Some(StatusCode::UNAUTHORIZED),
        "{refused:?}"
    );

    // A certificate of the fleet CA naming no Host.
    let admin = client(&fleet, Some("admin"));
    let refused = request_incoming(&admin, &server, "kvm02", &request("admin")).await;
    assert_eq!(code(&refused), Some(StatusCode::FORBIDDEN), "{refused:?}");
    let refused = incoming_running(&admin, &server, "kvm02", "web-1").await;
    assert_eq!(code(&refused), Some(StatusCode::FORBIDDEN), "{refused:?}");

    // A client certificate of another CA: refused in the handshake, for every
    // route (the client trusts the fleet CA, so only its own certificate is foreign).
    let foreign = FleetTls::load(&crate::tls::TlsArgs {
        tls_ca: fleet.args(None).tls_ca,
        ..other.args(Some("kvm01"))
    })
    .expect("tls");
    let foreign = Transport::Tls(Arc::new(foreign.client().expect("client")));
    let refused = request_incoming(&foreign, &server, "kvm02", &request("kvm01")).await;
    assert!(
        matches!(
            refused,
            Err(ClientError::Http { .. } | ClientError::Connect { .. })
        ),
        "{refused:?}"
    );
    let refused = status(&foreign, &server, "kvm02").await;
    assert!(refused.is_err(), "{refused:?}");

    // Plain HTTP to the TLS port: no HTTP answer at all.
    let plain = Transport::Plain {
        fleet_secret: Some(Arc::new(Secret::new("guess"))),
    };
    let refused = status(&plain, &format!("http://{addr}"), "kvm02").await;
    assert!(
        matches!(refused, Err(ClientError::Http { .. })),
        "{refused:?}"
    );
    let refused = request_incoming(
        &plain,
        &format!("http://{addr}"),
        "kvm02",
        &request("kvm01"),
    )
    .await;
    assert!(
        matches!(refused, Err(ClientError::Http { .. })),
        "{refused:?}"
    );

    // The server must be the host asked for: kvm02's certificate does not answer
    // for kvm03.
    let wrong_host = status(&kvm01, &server, "kvm03").await;
    assert!(
        matches!(wrong_host, Err(ClientError::Connect { .. })),
        "{wrong_host:?}"
    );
}

/// A forged "I run it": a server with a certificate of another CA (or of the fleet
/// CA but for another host) answers `running: true` for kvm02; the source never
/// gets that answer.
#[tokio::test]
async fn a_forged_i_run_it_never_reaches_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fleet = TestFiles::make(dir.path(), &["kvm01", "kvm02", "kvm03"]);
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = TestFiles::make(other_dir.path(), &["kvm01", "kvm02"]);
    let kvm01 = client(&fleet, Some("kvm01"));
    let forger = Arc::new(RunsEverything);

    let real = serve_tls(&fleet, "kvm02", &["kvm01", "kvm02"], forger.clone()).await;
    let answer = incoming_running(&kvm01, &format!("https://{real}"), "kvm02", "web-1").await;
    assert!(answer.expect("the real kvm02 answers").running);

    let foreign = serve_tls(&other, "kvm02", &["kvm01", "kvm02"], forger.clone()).await;
    let answer = incoming_running(&kvm01, &format!("https://{foreign}"), "kvm02", "web-1").await;
    let error = answer.expect_err("a certificate of another CA");
    let error = berth_hypervisor::report::one_line(&error);
    assert!(error.contains("TLS with kvm02 failed"), "{error}");

    let impostor = serve_tls(&fleet, "kvm03", &["kvm01", "kvm03"], forger).await;
    let answer = incoming_running(&kvm01, &format!("https://{impostor}"), "kvm02", "web-1").await;
    assert!(answer.is_err(), "kvm03 cannot answer for kvm02: {answer:?}");
}
