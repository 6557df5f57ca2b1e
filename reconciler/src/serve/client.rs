//! A small HTTP client for the service's API: `berth status` reads `/status`, and the
//! source host of a migration asks the destination's service to prepare
//! ([`request_incoming`]).
//!
//! Plain HTTP/1.1 (hyper) over TCP: the API is meant for a management network or
//! loopback; put a TLS proxy in front of it to cross an untrusted network.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::auth::Secret;
use super::status::Status;
use crate::fleet::peer::{IncomingMigration, IncomingOutcome, IncomingRequest, INCOMING_PATH};

/// The longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response body read.
const MAX_BODY: usize = 16 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address is not an `http://host:port` URL.
    #[error("bad server URL {0:?} (expected http://HOST:PORT)")]
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

/// `host:port` of an `http://host:port[/]` URL (or of a bare `host:port`).
fn authority(server: &str) -> Result<String, ClientError> {
    let rest = server.strip_prefix("http://").unwrap_or(server);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let uri: Uri = rest
        .parse()
        .map_err(|_| ClientError::Url(server.to_owned()))?;
    match (uri.host(), uri.port_u16(), uri.path()) {
        (Some(_), Some(_), "" | "/") if !rest.contains('/') => Ok(rest.to_owned()),
        _ => Err(ClientError::Url(server.to_owned())),
    }
}

async fn send(server: &str, request: Request<Body>) -> Result<(StatusCode, Vec<u8>), ClientError> {
    let authority = authority(server)?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|source| ClientError::Connect {
                server: server.to_owned(),
                source,
            })?;
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
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout(server.to_owned()))?
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

/// Reads `/status` of the service at `server` (`http://host:port`).
///
/// # Errors
/// When the service cannot be reached or answers with an error.
pub async fn status(server: &str) -> Result<Status, ClientError> {
    let request = Request::get("/status")
        .body(Body::empty())
        .expect("a valid request");
    decode(server, send(server, request).await?)
}

/// Asks the service at `server` to prepare an incoming migration, with the fleet
/// secret.
///
/// # Errors
/// When the service cannot be reached, refuses (401 without the right secret, 501 while
/// it cannot receive migrations) or fails.
pub async fn request_incoming(
    server: &str,
    fleet_secret: &Secret,
    request: &IncomingRequest,
) -> Result<IncomingMigration, ClientError> {
    let body = serde_json::to_vec(request).expect("the request serializes");
    let request = Request::post(INCOMING_PATH)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, fleet_secret.bearer())
        .body(Body::from(body))
        .expect("a valid request");
    decode(server, send(server, request).await?)
}

/// Asks the service at `server` whether `guest` runs there after an incoming
/// migration (the source's question after a `switchoverUnknown`), and the switchover
/// pause its VMM measured.
///
/// # Errors
/// When the service cannot be reached, refuses, or cannot tell yet.
pub async fn incoming_running(
    server: &str,
    fleet_secret: &Secret,
    guest: &str,
) -> Result<IncomingOutcome, ClientError> {
    let request = Request::get(format!("{INCOMING_PATH}/{guest}"))
        .header(header::AUTHORIZATION, fleet_secret.bearer())
        .body(Body::empty())
        .expect("a valid request");
    decode(server, send(server, request).await?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;
    use crate::fleet::peer::NoIncoming;
    use crate::serve::http::{router, ApiState};
    use crate::serve::metrics::Metrics;
    use crate::serve::status::StatusStore;

    #[test]
    fn server_urls() {
        assert_eq!(
            authority("http://127.0.0.1:7410").expect("ok"),
            "127.0.0.1:7410"
        );
        assert_eq!(authority("http://kvm01:7410/").expect("ok"), "kvm01:7410");
        assert_eq!(authority("[::1]:7410").expect("ok"), "[::1]:7410");
        assert!(authority("https://kvm01:7410").is_err());
        assert!(authority("http://kvm01").is_err());
        assert!(authority("http://kvm01:7410/status").is_err());
    }

    #[tokio::test]
    async fn talks_to_the_api_over_tcp() {
        let (triggers, _rx) = mpsc::channel(1);
        let status = StatusStore::default();
        status.update(|s| s.host = "kvm02".into());
        let app = router(ApiState {
            status,
            metrics: Arc::new(Metrics::new()),
            triggers,
            webhook_secret: None,
            fleet_secret: Some(Arc::new(Secret::new("fleet"))),
            incoming: Arc::new(NoIncoming),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        assert_eq!(status_of(&server).await, "kvm02");
        let request = IncomingRequest {
            guest: "web-1".into(),
            from: "kvm01".into(),
            revision: "0".repeat(40),
        };
        let wrong = request_incoming(&server, &Secret::new("nope"), &request).await;
        assert!(
            matches!(&wrong, Err(ClientError::Status { status, .. }) if *status == StatusCode::UNAUTHORIZED),
            "{wrong:?}"
        );
        let right = request_incoming(&server, &Secret::new("fleet"), &request).await;
        assert!(
            matches!(&right, Err(ClientError::Status { status, .. }) if *status == StatusCode::NOT_IMPLEMENTED),
            "{right:?}"
        );
    }

    async fn status_of(server: &str) -> String {
        status(server).await.expect("status").host
    }
}
