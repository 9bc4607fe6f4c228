//! The network edge: the HTTP router (both WebSocket dialects, downloads,
//! health and metrics), plain or TLS listeners, the local unix socket for `keyhaven call`, and
//! graceful shutdown.

pub mod config_files;
pub mod download;
pub mod limits;
pub mod monitoring;
pub mod tls;
pub mod ui;
pub mod unix;
pub mod wire;
pub mod ws;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::service::App;
use limits::{ConnTicket, Refused, Registry};
use ws::Dialect;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/current", get(api_current))
        .route("/api/versions", get(|| async { Json(json!(["current"])) }))
        .route("/websocket", get(legacy))
        .route("/_download/keychaincredential/{id}/{which}", get(download::get_key).post(download::post_key))
        .route("/_download/config/{token}", get(config_files::download))
        .route(
            "/_upload",
            axum::routing::post(config_files::upload)
                .layer(axum::extract::DefaultBodyLimit::max(crate::backup::online::UPLOAD_MAX as usize + 64 * 1024)),
        )
        .route("/healthz", get(monitoring::healthz))
        .route("/metrics", get(monitoring::metrics_with_key))
        .merge(ui::routes())
        .with_state(app)
}

/// The host part of a `Host` header value (`[::1]:8080` → `::1`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map(|(h, p)| if p.chars().all(|c| c.is_ascii_digit()) { h } else { host }).unwrap_or(host)
}

/// This machine's name, as a browser may address it.
fn own_hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().to_ascii_lowercase()
}

/// Whether a browser page at `origin` may open the API. Allowed: a configured
/// origin, or the page's own server (`Origin` equal to `scheme://Host`) when
/// that host is an IP address, `localhost` or this machine's name — a name
/// that someone else's DNS could point here (DNS rebinding) is not enough.
pub fn origin_allowed(origin: &str, host: Option<&str>, tls: bool, allowed: &[String]) -> bool {
    let o = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&o) {
        return true;
    }
    let Some(host) = host.map(|h| h.trim().to_ascii_lowercase()) else { return false };
    let scheme = if tls { "https" } else { "http" };
    if o != format!("{scheme}://{host}") {
        return false;
    }
    let name = host_name(&host);
    if name.parse::<IpAddr>().is_ok() || name == "localhost" {
        return true;
    }
    let me = own_hostname();
    !me.is_empty() && (name == me || name.split('.').next() == Some(me.as_str()) || me.split('.').next() == Some(name))
}

fn upgrade(
    app: Arc<App>,
    ws: WebSocketUpgrade,
    peer: SocketAddr,
    headers: &HeaderMap,
    ticket: Option<Arc<ConnTicket>>,
    dialect: Dialect,
) -> Response {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let ok = origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, host, app.config.use_tls(), &app.live_config().allowed_origins));
        if !ok {
            tracing::info!(%peer, origin = ?origin, "refused a WebSocket from a foreign browser origin");
            return (
                StatusCode::FORBIDDEN,
                "This origin may not use the keyhaven API; add it to the allowed_origins setting if it should\n",
            )
                .into_response();
        }
    }
    ws.max_message_size(ws::MAX_MESSAGE_AFTER_AUTH)
        .max_frame_size(ws::MAX_MESSAGE_AFTER_AUTH)
        .on_upgrade(move |socket| ws::serve(app, socket, peer, dialect, ticket))
}

async fn api_current(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ticket: Option<Extension<Arc<ConnTicket>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(app, ws, peer, &headers, ticket.map(|t| t.0), Dialect::JsonRpc)
}

async fn legacy(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ticket: Option<Extension<Arc<ConnTicket>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(app, ws, peer, &headers, ticket.map(|t| t.0), Dialect::Legacy)
}

/// Limits applied to every TCP connection.
#[derive(Clone)]
pub struct EdgeLimits {
    pub registry: Arc<Registry>,
    /// For the request head and the TLS handshake.
    pub header_read_timeout: Duration,
}

/// Answer a refused connection with a short 503 and close it; never waits long.
async fn refuse(mut stream: tokio::net::TcpStream, why: Refused) {
    let msg = match why {
        Refused::PerAddress => "too many connections from your address",
        Refused::Full => "the server is at its connection limit",
    };
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 10\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}\n",
        msg.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.write_all(reply.as_bytes())).await;
}

/// Accept connections until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    router: Router,
    tls: Option<tls::SharedAcceptor>,
    limits: EdgeLimits,
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
        let ticket = match limits.registry.admit(peer.ip()) {
            Ok(t) => Arc::new(t),
            Err(why) => {
                tracing::debug!(%peer, ?why, "connection refused");
                tokio::spawn(refuse(stream, why));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let tls = tls.as_ref().map(|t| t.read().unwrap_or_else(|e| e.into_inner()).clone());
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let state = ticket.state.clone();
            let conn_ticket = ticket.clone();
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(conn_ticket.clone());
                let router = router.clone();
                async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            // The header timer also closes keep-alive connections left idle.
            builder.timer(TokioTimer::new()).header_read_timeout(timeout);
            let serve = async {
                match tls {
                    Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => builder.serve_connection(TokioIo::new(s), svc).with_upgrades().await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    },
                    None => builder.serve_connection(TokioIo::new(stream), svc).with_upgrades().await,
                }
            };
            let result = tokio::select! {
                r = serve => r,
                _ = state.evicted() => {
                    tracing::debug!(%peer, "closed to make room for a new connection");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(ticket);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        assert!(origin_allowed("http://127.0.0.1:8080", Some("127.0.0.1:8080"), false, &none));
        assert!(origin_allowed("https://[::1]:8443", Some("[::1]:8443"), true, &none));
        assert!(origin_allowed("http://localhost:8080", Some("localhost:8080"), false, &none));
        // Scheme, host or port differ.
        assert!(!origin_allowed("https://127.0.0.1:8080", Some("127.0.0.1:8080"), false, &none));
        assert!(!origin_allowed("http://127.0.0.1:9", Some("127.0.0.1:8080"), false, &none));
        assert!(!origin_allowed("http://evil.example", Some("127.0.0.1:8080"), false, &none));
        // DNS rebinding: the Host header matches but names someone else's domain.
        assert!(!origin_allowed("http://evil.example:8080", Some("evil.example:8080"), false, &none));
        assert!(!origin_allowed("null", Some("127.0.0.1:8080"), false, &none));
        let allowed = vec!["https://nas.example:8443".to_string()];
        assert!(origin_allowed("https://NAS.example:8443/", Some("10.0.0.5:8443"), true, &allowed));
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("nas:8443"), "nas");
        assert_eq!(host_name("nas"), "nas");
    }
}
