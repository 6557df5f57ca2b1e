//! The HTTP API (axum): `/healthz`, `/status`, `/metrics`, the git webhook and the peer
//! API.
//!
//! | route | auth | answers |
//! |---|---|---|
//! | `GET /healthz` | none | 200 `ok` while the service runs |
//! | `GET /status` | none | the [`Status`](super::status::Status) as JSON |
//! | `GET /metrics` | none | Prometheus metrics: the text format 0.0.4 when `Accept` asks for it, else OpenMetrics |
//! | `POST /hooks/git` | `X-Hub-Signature-256` | 202, and the branch head is looked at; 413 (JSON) over [`WEBHOOK_BODY_LIMIT`] |
//! | `POST /v1/migrations/incoming` | a peer (see below) | listen address and token |
//! | `GET /v1/migrations/incoming/{guest}` | a peer (see below) | whether the guest runs here |
//!
//! A peer, under TLS (the default), is a client that presented a certificate of the
//! fleet CA naming exactly one Host of the enforced revision ([`PeerAuth::Certificates`]);
//! a request to prepare a migration must also come `from` that very host. With
//! `--insecure-plain-http` ([`PeerAuth::Secret`]) a peer is whoever presents the fleet
//! secret as a bearer token. The other routes need no client certificate (a TLS
//! connection without one is accepted; one of another CA is refused in the handshake).
//!
//! `/status` and `/metrics` tell what runs on the host, nothing secret; bind the
//! listener to an address the monitoring (and the fleet's peers) can reach, and no
//! further.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::source::Trigger;
use super::status::StatusStore;
use crate::auth::{verify_bearer, verify_signature, AuthError, Secret, SIGNATURE_HEADER};
use crate::fleet::peer::{IncomingMigrations, IncomingRequest, PeerError, INCOMING_PATH};
use crate::metrics::Metrics;

/// The largest webhook body read, 25 MiB: GitHub caps a webhook payload at 25 MB (and
/// sends none larger), so every GitHub delivery fits. The body is read whole before its
/// signature can be checked; a larger one is refused with 413 and a JSON error, and
/// logged.
pub const WEBHOOK_BODY_LIMIT: usize = 25 << 20;
use crate::tls::{Connection, HostNames};

/// Who may call the peer routes.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// TLS: a client certificate of the fleet CA naming a Host of these (the enforced
    /// revision's Host names).
    Certificates(HostNames),
    /// Plain HTTP (`--insecure-plain-http`): the fleet secret as a bearer token; `None`
    /// refuses every peer request.
    Secret(Option<Arc<Secret>>),
}

/// The connection's details, set by the TLS listener (absent over plain HTTP).
type Peer = Option<Extension<ConnectInfo<Connection>>>;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The service's status.
    pub status: StatusStore,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Where webhooks announce a possible new head.
    pub triggers: mpsc::Sender<Trigger>,
    /// The webhook secret; `None` refuses every webhook.
    pub webhook_secret: Option<Arc<Secret>>,
    /// Who may call the peer routes.
    pub peers: PeerAuth,
    /// Prepares incoming migrations.
    pub incoming: Arc<dyn IncomingMigrations>,
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route(
            "/hooks/git",
            post(webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .route(INCOMING_PATH, post(incoming))
        .route(&format!("{INCOMING_PATH}/{{guest}}"), get(incoming_outcome))
        .with_state(state)
}

async fn status(State(state): State<ApiState>) -> Response {
    Json(state.status.snapshot()).into_response()
}

async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::exposition::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        state.metrics.encode_as(format),
    )
        .into_response()
}

fn unauthorized(what: &str, error: AuthError) -> Response {
    warn!(%error, "{what} refused");
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "error": format!("{what} refused: {error}") })),
    )
        .into_response()
}

async fn webhook(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let error = rejection.body_text();
            warn!(%status, limit = WEBHOOK_BODY_LIMIT, %error, "webhook refused: its body could not be read");
            let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("webhook refused: the body is larger than {WEBHOOK_BODY_LIMIT} bytes")
            } else {
                format!("webhook refused: {error}")
            };
            return (status, Json(json!({ "error": error }))).into_response();
        }
    };
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    if let Err(e) = verify_signature(state.webhook_secret.as_deref(), signature, &body) {
        return unauthorized("webhook", e);
    }
    let event = headers
        .get("x-github-event")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    info!(event, "signed webhook");
    // A full channel already holds a look at the head; this one would be the same.
    let _ = state.triggers.try_send(Trigger::Webhook);
    (StatusCode::ACCEPTED, Json(json!({ "accepted": true }))).into_response()
}

/// Why a peer request was refused.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// Plain HTTP without the right fleet secret.
    Secret(AuthError),
    /// TLS without a client certificate.
    NoCertificate,
    /// TLS with a certificate of the fleet CA that names no (single) Host.
    NotAHost,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Secret(e) => unauthorized("peer request", e),
            Refused::NoCertificate => (
                StatusCode::UNAUTHORIZED,
                Json(
                    json!({ "error": "peer request refused: no client certificate \
                    (hosts present their certificate of the fleet CA)" }),
                ),
            )
                .into_response(),
            Refused::NotAHost => forbidden(
                "peer request refused: the client certificate names no (single) Host of \
                 the enforced revision"
                    .to_owned(),
            ),
        }
    }
}

/// The peer making the request: `Ok(Some(host))` under TLS, `Ok(None)` with the
/// fleet secret; why not otherwise.
fn authorize_peer(
    state: &ApiState,
    connection: Option<&Connection>,
    headers: &HeaderMap,
) -> Result<Option<String>, Refused> {
    match &state.peers {
        PeerAuth::Secret(secret) => {
            let credentials = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
            verify_bearer(secret.as_deref(), credentials)
                .map(|()| None)
                .map_err(Refused::Secret)
        }
        PeerAuth::Certificates(hosts) => {
            let remote = connection.map(|c| c.remote.to_string());
            let Some(certificate) = connection.and_then(|c| c.client.as_ref()) else {
                warn!(?remote, "peer request refused: no client certificate");
                return Err(Refused::NoCertificate);
            };
            match hosts.host_of(certificate) {
                Some(host) => Ok(Some(host)),
                None => {
                    warn!(?remote, "peer request refused: the client certificate names no Host of the manifests");
                    Err(Refused::NotAHost)
                }
            }
        }
    }
}

fn forbidden(error: String) -> Response {
    (StatusCode::FORBIDDEN, Json(json!({ "error": error }))).into_response()
}

async fn incoming(
    State(state): State<ApiState>,
    peer: Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let host = match authorize_peer(&state, peer.as_ref().map(|p| &p.0 .0), &headers) {
        Ok(host) => host,
        Err(refused) => return refused.into_response(),
    };
    let request: IncomingRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "error": format!("bad request: {e}") })),
            )
                .into_response()
        }
    };
    if let Some(host) = host.filter(|h| *h != request.from) {
        warn!(guest = %request.guest, from = %request.from, certificate = %host, "incoming migration refused: the request is not from the host it names");
        return forbidden(format!(
            "peer request refused: {host} cannot ask on behalf of {}",
            request.from
        ));
    }
    info!(guest = %request.guest, from = %request.from, "incoming migration requested");
    let handler = Arc::clone(&state.incoming);
    let prepared = tokio::task::spawn_blocking(move || handler.prepare(&request)).await;
    match prepared {
        Ok(Ok(prepared)) => (StatusCode::OK, Json(prepared)).into_response(),
        Ok(Err(e)) => {
            let code = match e {
                PeerError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
                PeerError::Refused(_) => StatusCode::CONFLICT,
                PeerError::Capacity(_) => StatusCode::INSUFFICIENT_STORAGE,
                PeerError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                PeerError::Busy(_) | PeerError::CannotTell(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            let error = berth_hypervisor::report::one_line(&e);
            warn!(%error, "incoming migration not prepared");
            (code, Json(json!({ "error": error }))).into_response()
        }
        Err(panic) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("preparing panicked: {panic}") })),
        )
            .into_response(),
    }
}

async fn incoming_outcome(
    State(state): State<ApiState>,
    peer: Peer,
    Path(guest): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = authorize_peer(&state, peer.as_ref().map(|p| &p.0 .0), &headers) {
        return refused.into_response();
    }
    let handler = Arc::clone(&state.incoming);
    match tokio::task::spawn_blocking(move || handler.running(&guest)).await {
        Ok(Ok(outcome)) => (StatusCode::OK, Json(outcome)).into_response(),
        Ok(Err(e)) => {
            let code = match e {
                PeerError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let error = berth_hypervisor::report::one_line(&e);
            (code, Json(json!({ "error": error }))).into_response()
        }
        Err(panic) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("asking panicked: {panic}") })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod client_tests;
#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::peer::{IncomingMigration, NoIncoming};
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt as _;

    struct Counting(AtomicUsize);

    impl IncomingMigrations for Counting {
        fn prepare(&self, request: &IncomingRequest) -> Result<IncomingMigration, PeerError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(IncomingMigration {
                listen: "127.0.0.1:7411".parse().expect("addr"),
                token: format!("token-for-{}", request.guest),
            })
        }
    }

    fn state(
        webhook: Option<&str>,
        fleet: Option<&str>,
        incoming: Arc<dyn IncomingMigrations>,
    ) -> (ApiState, mpsc::Receiver<Trigger>) {
        let (triggers, rx) = mpsc::channel(4);
        let state = ApiState {
            status: StatusStore::default(),
            metrics: Arc::new(Metrics::new()),
            triggers,
            webhook_secret: webhook.map(|s| Arc::new(Secret::new(s))),
            peers: PeerAuth::Secret(fleet.map(|s| Arc::new(Secret::new(s)))),
            incoming,
        };
        (state, rx)
    }

    async fn call(app: &Router, request: Request<Body>) -> (StatusCode, String) {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let code = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    fn peer_request(auth: Option<&str>) -> Request<Body> {
        let mut builder = Request::post(INCOMING_PATH);
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        let body = json!({"guest": "web-1", "from": "kvm01", "revision": "0".repeat(40)});
        builder.body(Body::from(body.to_string())).expect("request")
    }

    #[tokio::test]
    async fn the_peer_api_needs_the_fleet_secret() {
        let handler = Arc::new(Counting(AtomicUsize::new(0)));
        let (state, _rx) = state(None, Some("fleet-secret"), handler.clone());
        let app = router(state);
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("fleet-secret"),
            Some("Basic Zm9v"),
        ] {
            let (code, body) = call(&app, peer_request(auth)).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        }
        assert_eq!(
            handler.0.load(Ordering::SeqCst),
            0,
            "refused requests reach no handler"
        );
        let (code, body) = call(&app, peer_request(Some("Bearer fleet-secret"))).await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let prepared: IncomingMigration = serde_json::from_str(&body).expect("json");
        assert_eq!(prepared.token, "token-for-web-1");
        assert_eq!(handler.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn with_no_fleet_secret_the_peer_api_refuses_everything() {
        let handler = Arc::new(Counting(AtomicUsize::new(0)));
        let (state, _rx) = state(Some("w"), None, handler.clone());
        let app = router(state);
        for auth in [None, Some("Bearer "), Some("Bearer fleet-secret")] {
            let (code, body) = call(&app, peer_request(auth)).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
        }
        assert_eq!(handler.0.load(Ordering::SeqCst), 0);
    }

    /// Under TLS the peer routes look at the connection's certificate only: a request
    /// with no TLS connection details (or no certificate) is refused, bearer or not.
    #[tokio::test]
    async fn with_certificates_a_bearer_is_not_enough() {
        let handler = Arc::new(Counting(AtomicUsize::new(0)));
        let (mut state, _rx) = state(None, None, handler.clone());
        let hosts = crate::tls::HostNames::default();
        hosts.set(["kvm01".to_owned()]);
        state.peers = PeerAuth::Certificates(hosts);
        let app = router(state);
        for auth in [None, Some("Bearer anything")] {
            let (code, body) = call(&app, peer_request(auth)).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}: {body}");
            assert!(body.contains("no client certificate"), "{body}");
        }
        let mut request = peer_request(None);
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(Connection {
                remote: "127.0.0.1:1".parse().expect("addr"),
                client: None,
            }));
        let (code, _) = call(&app, request).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert_eq!(handler.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_host_without_incoming_migrations_answers_501() {
        let (state, _rx) = state(None, Some("s"), Arc::new(NoIncoming));
        let (code, body) = call(&router(state), peer_request(Some("Bearer s"))).await;
        assert_eq!(code, StatusCode::NOT_IMPLEMENTED);
        assert!(body.contains("receives no migrations"), "{body}");
    }

    #[tokio::test]
    async fn webhooks_need_a_valid_signature() {
        let (state, mut rx) = state(Some("hook-secret"), None, Arc::new(NoIncoming));
        let app = router(state);
        let body = r#"{"ref":"refs/heads/main"}"#;
        let post = |signature: Option<String>| {
            let mut builder = Request::post("/hooks/git").header("x-github-event", "push");
            if let Some(s) = signature {
                builder = builder.header(SIGNATURE_HEADER, s);
            }
            builder.body(Body::from(body)).expect("request")
        };
        let good = format!(
            "sha256={}",
            Secret::new("hook-secret").sign(body.as_bytes())
        );
        let wrong = format!("sha256={}", Secret::new("other").sign(body.as_bytes()));
        for signature in [None, Some(wrong), Some("sha1=00".to_owned())] {
            let (code, _) = call(&app, post(signature)).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED);
        }
        assert!(rx.try_recv().is_err(), "a refused webhook triggers nothing");
        let (code, _) = call(&app, post(Some(good))).await;
        assert_eq!(code, StatusCode::ACCEPTED);
        assert_eq!(rx.try_recv(), Ok(Trigger::Webhook));
    }

    #[tokio::test]
    async fn a_webhook_up_to_25_mib_is_read_and_a_larger_one_refused_in_json() {
        let (state, mut rx) = state(Some("hook-secret"), None, Arc::new(NoIncoming));
        let app = router(state);
        let post = |body: Vec<u8>| {
            let signature = format!("sha256={}", Secret::new("hook-secret").sign(&body));
            Request::post("/hooks/git")
                .header(SIGNATURE_HEADER, signature)
                .body(Body::from(body))
                .expect("request")
        };
        // Larger than axum's default limit (2 MB), as GitHub may send.
        let (code, body) = call(&app, post(vec![b' '; 3 << 20])).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{body}");
        assert_eq!(rx.try_recv(), Ok(Trigger::Webhook));
        let (code, body) = call(&app, post(vec![b' '; WEBHOOK_BODY_LIMIT + 1])).await;
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
        let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(
            error["error"],
            "webhook refused: the body is larger than 26214400 bytes"
        );
        assert!(rx.try_recv().is_err(), "a refused webhook triggers nothing");
    }

    #[tokio::test]
    async fn health_status_and_metrics() {
        let (state, _rx) = state(None, None, Arc::new(NoIncoming));
        state.status.update(|s| s.host = "kvm01".into());
        let app = router(state);
        let get = |path: &str| Request::get(path).body(Body::empty()).expect("request");
        assert_eq!(
            call(&app, get("/healthz")).await,
            (StatusCode::OK, "ok\n".into())
        );
        let (code, body) = call(&app, get("/status")).await;
        assert_eq!(code, StatusCode::OK);
        let status: crate::serve::status::Status = serde_json::from_str(&body).expect("json");
        assert_eq!(status.host, "kvm01");
        let (code, body) = call(&app, get("/metrics")).await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("# TYPE berth_reconcile_duration_seconds histogram"),
            "{body}"
        );
    }
}
