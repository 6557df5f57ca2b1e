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

use crate::auth::Secret;
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
    #[error("cannot reach {server}")]
    Connect {
        /// The server.
        server: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request to {server} failed")]
    Http {
        /// The server.
        server: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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
    #[error("unexpected answer from {server}")]
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
        let http = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Http {
            server: server.to_owned(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.into()))?;
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
            .map_err(|e| http(e.into()))?;
        let status = response.status();
        let body = axum::body::to_bytes(Body::new(response.into_body()), MAX_BODY)
            .await
            .map_err(|e| http(e.into()))?;
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
/// `name` (a Host name, or the name or address its certificate carries), as `T`: the
/// whole status (`crate::serve::status::Status`), or the part a caller reads.
///
/// # Errors
/// When the service cannot be reached or answers with an error.
pub async fn status<T: serde::de::DeserializeOwned>(
    transport: &Transport,
    server: &str,
    name: &str,
) -> Result<T, ClientError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
