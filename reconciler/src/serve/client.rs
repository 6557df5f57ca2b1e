//! A small HTTP client for the service's API: `berth status` reads `/status`, and the
//! source host of a migration asks the destination's service to prepare
//! ([`request_incoming`]).
//!
//! HTTP/1.1 (hyper) over TLS ([`crate::tls`]): the server must present a certificate
//! of the fleet CA naming the host asked for, and a host presents its own certificate.
//! Plain HTTP, with the fleet secret as bearer for peer requests, only with
//! `--insecure-plain-http` (loopback experiments).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::auth::Secret;
use super::status::Status;
use crate::fleet::peer::{IncomingMigration, IncomingOutcome, IncomingRequest, INCOMING_PATH};
use crate::tls::ClientTls;

/// The longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body read.
const MAX_BODY: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not an `https://host:port` URL.
    #[error("bad server URL {0:?} (expected https://HOST:PORT)")]
    Url(String),
    /// The connection failed.
    #[error("cannot reach {server}: {source}")]
    Connect {
        /// The server.
        server: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request to {server} failed: {detail}")]
    Http {
        /// The server.
        server: String,
        /// What failed.
        detail: String,
    },
    /// The request took longer than the timeout.
    #[error("{0} did not answer within {TIMEOUT:?}")]
    Timeout(String),
    /// The server answered with an error status.
    #[error("{server} answered {status}: {body}")]
    Status {
        /// The server.
        server: String,
        /// The status.
        status: StatusCode,
        /// The body, for the reason.
        body: String,
    },
    /// The answer is not what was expected.
    #[error("unexpected answer from {server}: {source}")]
    Decode {
        /// The server.
        server: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

/// How requests reach another host's API.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TLS with the fleet CA (see the module documentation).
    Tls(Arc<ClientTls>),
    /// Plain HTTP (`--insecure-plain-http`); peer requests carry the fleet secret, when
    /// there is one.
    Plain {
        /// The fleet secret.
        fleet_secret: Option<Arc<Secret>>,
    },
}

impl Transport {
    /// Plain HTTP without a fleet secret (`berth status` against a plain server).
    pub fn plain() -> Transport {
        Transport::Plain { fleet_secret: None }
    }

    /// The URL of the API at `address` (`host:port`).
    pub fn url(&self, address: &str) -> String {
        match self {
            Transport::Tls(_) => format!("https://{address}"),
            Transport::Plain { .. } => format!("http://{address}"),
        }
    }

    fn authorize(&self, request: axum::http::request::Builder) -> axum::http::request::Builder {
        match self {
            Transport::Plain {
                fleet_secret: Some(secret),
            } => request.header(header::AUTHORIZATION, secret.bearer()),
            _ => request,
        }
    }
}

/// The host part of a server URL: the name its certificate must carry, unless told
/// otherwise (`[::1]` gives `::1`).
pub fn host_of(server: &str) -> Result<String, ClientError> {
    let authority = authority(server)?;
    let uri: Uri = authority
        .parse()
        .map_err(|_| ClientError::Url(server.to_owned()))?;
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Url(server.to_owned()))?;
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned())
}

/// `host:port` of an `https://host:port[/]` or `http://host:port[/]` URL (or of a bare
/// `host:port`). The transport, not the scheme, decides whether TLS is spoken.
fn authority(server: &str) -> Result<String, ClientError> {
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let uri: Uri = rest
        .parse()
        .map_err(|_| ClientError::Url(server.to_owned()))?;
    match (uri.host(), uri.port_u16(), uri.path()) {
        (Some(_), Some(_), "" | "/") if !rest.contains('/') => Ok(rest.to_owned()),
        _ => Err(ClientError::Url(server.to_owned())),
    }
}

/// Sends `request` to `server`, which must prove to be `name` when the transport is TLS.
async fn send(
    transport: &Transport,
    server: &str,
    name: &str,
    request: Request<Body>,
) -> Result<(StatusCode, Vec<u8>), ClientError> {
    let authority = authority(server)?;
    let exchange = async {
        let connect = |source| ClientError::Connect {
            server: server.to_owned(),
            source,
        };
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(connect)?;
        match transport {
            Transport::Plain { .. } => exchange(server, &authority, stream, request).await,
            Transport::Tls(tls) => {
                let stream = tls.connect(stream, name).await.map_err(|e| {
                    connect(std::io::Error::new(
                        e.kind(),
                        format!("TLS with {name} failed: {e}"),
                    ))
                })?;
                exchange(server, &authority, stream, request).await
            }
        }
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout(server.to_owned()))?
}

async fn exchange<S>(
    server: &str,
    authority: &str,
    stream: S,
    request: Request<Body>,
) -> Result<(StatusCode, Vec<u8>), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    {
        let http = |detail: String| ClientError::Http {
            server: server.to_owned(),
            detail,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        parts.headers.insert(
            header::HOST,
            authority
                .parse()
                .map_err(|_| ClientError::Url(server.to_owned()))?,
        );
        let response = sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = response.status();
        let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_BODY)
            .await
            .map_err(|e| http(e.to_string()))?;
        Ok((status, body.to_vec()))
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    server: &str,
    (status, body): (StatusCode, Vec<u8>),
) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(ClientError::Status {
            server: server.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
        server: server.to_owned(),
        source,
    })
}

/// Reads `/status` of the service at `server` (`https://host:port`), which must be
/// `name` (a Host name, or the name or address its certificate carries).
///
/// # Errors
/// When the service cannot be reached or answers with an error.
pub async fn status(
    transport: &Transport,
    server: &str,
    name: &str,
) -> Result<Status, ClientError> {
    let request = Request::get("/status")
        .body(Body::empty())
        .expect("a valid request");
    decode(server, send(transport, server, name, request).await?)
}

/// Asks the service of host `name` at `server` to prepare an incoming migration.
///
/// # Errors
/// When the service cannot be reached, refuses (401/403 without this host's certificate
/// or the right secret, 501 while it cannot receive migrations) or fails.
pub async fn request_incoming(
    transport: &Transport,
    server: &str,
    name: &str,
    request: &IncomingRequest,
) -> Result<IncomingMigration, ClientError> {
    let body = serde_json::to_vec(request).expect("the request serializes");
    let request = transport
        .authorize(Request::post(INCOMING_PATH))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a valid request");
    decode(server, send(transport, server, name, request).await?)
}

/// Asks the service of host `name` at `server` whether `guest` runs there after an
/// incoming migration (the source's question after a `switchoverUnknown`), and the
/// switchover pause its VMM measured. Under TLS only host `name`, with a certificate
/// of the fleet CA, can answer.
///
/// # Errors
/// When the service cannot be reached or proven to be `name`, refuses, or cannot tell
/// yet.
pub async fn incoming_running(
    transport: &Transport,
    server: &str,
    name: &str,
    guest: &str,
) -> Result<IncomingOutcome, ClientError> {
    let request = transport
        .authorize(Request::get(format!("{INCOMING_PATH}/{guest}")))
        .body(Body::empty())
        .expect("a valid request");
    decode(server, send(transport, server, name, request).await?)
}

/// Servers of the API over TLS, for tests: the real router behind the real
/// [`crate::tls::TlsListener`], with certificates of a test fleet.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use crate::fleet::peer::{IncomingMigrations, IncomingOutcome, NoIncoming, PeerError};
    use crate::serve::http::{router, ApiState, PeerAuth};
    use crate::serve::metrics::Metrics;
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
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::testing::{no_incoming, serve_tls, RunsEverything};
    use super::*;
    use crate::fleet::peer::NoIncoming;
    use crate::serve::http::{router, ApiState, PeerAuth};
    use crate::serve::metrics::Metrics;
    use crate::serve::status::StatusStore;
    use crate::tls::{FleetTls, TestFiles};

    #[test]
    fn server_urls() {
        assert_eq!(
            authority("http://127.0.0.1:7410").expect("ok"),
            "127.0.0.1:7410"
        );
        assert_eq!(authority("https://kvm01:7410/").expect("ok"), "kvm01:7410");
        assert_eq!(authority("[::1]:7410").expect("ok"), "[::1]:7410");
        assert!(authority("ftp://kvm01:7410").is_err());
        assert!(authority("https://kvm01").is_err());
        assert!(authority("https://kvm01:7410/status").is_err());
        assert_eq!(host_of("https://[::1]:7410").expect("ok"), "::1");
        assert_eq!(host_of("https://kvm01:7410").expect("ok"), "kvm01");
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
        let answer =
            incoming_running(&kvm01, &format!("https://{foreign}"), "kvm02", "web-1").await;
        let error = answer.expect_err("a certificate of another CA").to_string();
        assert!(error.contains("TLS with kvm02 failed"), "{error}");

        let impostor = serve_tls(&fleet, "kvm03", &["kvm01", "kvm03"], forger).await;
        let answer =
            incoming_running(&kvm01, &format!("https://{impostor}"), "kvm02", "web-1").await;
        assert!(answer.is_err(), "kvm03 cannot answer for kvm02: {answer:?}");
    }
}
