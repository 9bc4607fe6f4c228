//! What monitoring reads over HTTP: `GET /healthz` (no login; says only
//! which check failed) and `GET /metrics` (Prometheus text), which needs an
//! API key (`Authorization: Bearer`) on the main listener and nothing on the
//! optional loopback listener of the `metrics.listen` setting.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::service::auth::DownloadRefusal;
use crate::service::{metrics, App};

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{msg}\n")).into_response()
}

fn unauthorized() -> Response {
    let mut r = plain(StatusCode::UNAUTHORIZED, "Authentication required: send `Authorization: Bearer <API key>`");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// `GET /healthz`: 200 `{"status":"ok"}`, or 503
/// `{"status":"fail","failed":["database"|"sshd"|"disk", …]}`.
pub async fn healthz(State(app): State<Arc<App>>) -> Response {
    let failed = app.monitoring().health_failures().await;
    let (status, body) = if failed.is_empty() {
        (StatusCode::OK, json!({"status": "ok"}))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, json!({"status": "fail", "failed": failed}))
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// `GET /metrics` on the main listener: an API key, checked like a login.
pub async fn metrics_with_key(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let key = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(h) => match h.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")) {
            Some(k) => Some(k.trim().to_string()),
            None => return unauthorized(),
        },
    };
    match app.auth().authenticate_metrics(&peer.ip().to_string(), key.as_deref()).await {
        Ok(_) => render(app).await,
        Err(DownloadRefusal::Unauthenticated) => unauthorized(),
        Err(DownloadRefusal::Forbidden(m)) => plain(StatusCode::FORBIDDEN, m),
    }
}

/// `GET /metrics` on the loopback listener: no login.
async fn metrics_open(State(app): State<Arc<App>>) -> Response {
    render(app).await
}

async fn render(app: Arc<App>) -> Response {
    match tokio::task::spawn_blocking(move || app.monitoring().metrics_text()).await {
        Ok(Ok(text)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, metrics::CONTENT_TYPE), (header::CACHE_CONTROL, "no-store")], text)
                .into_response()
        }
        Ok(Err(e)) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => {
            tracing::error!("collecting the metrics: {e}");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "Collecting the metrics failed; the server log has the details")
        }
    }
}

/// The loopback listener's routes: `/metrics` only.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new().route("/metrics", get(metrics_open)).with_state(app)
}
