//! The network edge: the HTTP router (both WebSocket dialects, downloads),
//! plain or TLS listeners, the local unix socket for `keyhaven call`, and
//! graceful shutdown.

/// Kept for existing imports; the client lives in [`crate::remote`].
pub mod download;
pub mod tls;
pub mod ui;
pub mod unix;
pub mod wire;
pub mod ws;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::service::App;
use ws::Dialect;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/current", get(api_current))
        .route("/api/versions", get(|| async { Json(json!(["current"])) }))
        .route("/websocket", get(legacy))
        .route("/_download/keychaincredential/{id}/{which}", get(download::get_key).post(download::post_key))
        .merge(ui::routes())
        .with_state(app)
}

fn upgrade(app: Arc<App>, ws: WebSocketUpgrade, peer: SocketAddr, dialect: Dialect) -> Response {
    ws.max_message_size(ws::MAX_MESSAGE_AFTER_AUTH)
        .max_frame_size(ws::MAX_MESSAGE_AFTER_AUTH)
        .on_upgrade(move |socket| ws::serve(app, socket, peer, dialect))
}

async fn api_current(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(app, ws, peer, Dialect::JsonRpc)
}

async fn legacy(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(app, ws, peer, Dialect::Legacy)
}

/// Accept connections until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
            });
            let builder = Builder::new(TokioExecutor::new());
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(s)) => builder.serve_connection_with_upgrades(TokioIo::new(s), svc).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                },
                None => builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}
