//! The HTTP API (axum): `/healthz`, `/status`, `/metrics`, the git webhook and the peer
//! API.
//!
//! | route | auth | answers |
//! |---|---|---|
//! | `GET /healthz` | none | 200 `ok` while the service runs |
//! | `GET /status` | none | the [`Status`](super::status::Status) as JSON |
//! | `GET /metrics` | none | Prometheus metrics: the text format 0.0.4 when `Accept` asks for it, else OpenMetrics |
//! | `POST /hooks/git` | `X-Hub-Signature-256` | 202, and the branch head is looked at; 413 (JSON) over [`WEBHOOK_BODY_LIMIT`] |
//! | `POST /v1/migrations/incoming` | fleet secret (bearer) | listen address and token |
//! | `GET /v1/migrations/incoming/{guest}` | fleet secret (bearer) | whether the guest runs here |
//!
//! `/status` and `/metrics` tell what runs on the host, nothing secret; bind the
//! listener to an address the monitoring (and the fleet's peers) can reach, and no
//! further.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::auth::{verify_bearer, verify_signature, AuthError, Secret, SIGNATURE_HEADER};
use super::metrics::Metrics;
use super::source::Trigger;
use super::status::StatusStore;
use crate::fleet::peer::{IncomingMigrations, IncomingRequest, PeerError, INCOMING_PATH};

/// The largest webhook body read, 25 MiB: GitHub caps a webhook payload at 25 MB (and
/// sends none larger), so every GitHub delivery fits. The body is read whole before its
/// signature can be checked; a larger one is refused with 413 and a JSON error, and
/// logged.
pub const WEBHOOK_BODY_LIMIT: usize = 25 << 20;

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
    /// The fleet secret; `None` refuses every peer request.
    pub fleet_secret: Option<Arc<Secret>>,
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
    let format = super::exposition::negotiate(accept);
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

async fn incoming(State(state): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let credentials = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if let Err(e) = verify_bearer(state.fleet_secret.as_deref(), credentials) {
        return unauthorized("peer request", e);
    }
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
            };
            warn!(error = %e, "incoming migration not prepared");
            (code, Json(json!({ "error": e.to_string() }))).into_response()
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
    Path(guest): Path<String>,
    headers: HeaderMap,
) -> Response {
    let credentials = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if let Err(e) = verify_bearer(state.fleet_secret.as_deref(), credentials) {
        return unauthorized("peer request", e);
    }
    let handler = Arc::clone(&state.incoming);
    match tokio::task::spawn_blocking(move || handler.running(&guest)).await {
        Ok(Ok(outcome)) => (StatusCode::OK, Json(outcome)).into_response(),
        Ok(Err(e)) => {
            let code = match e {
                PeerError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (code, Json(json!({ "error": e.to_string() }))).into_response()
        }
        Err(panic) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": format!("asking panicked: {panic}") })),
        )
            .into_response(),
    }
}

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
            fleet_secret: fleet.map(|s| Arc::new(Secret::new(s))),
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
