//! The web UI: static assets embedded in the binary (`crates/keyhaven-server/ui/`),
//! served with a strict Content-Security-Policy. The UI is a plain client of
//! `/api/current`; nothing here reads or writes data.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Assets;

/// No inline script or style, no third-party origins. The WebSocket goes to
/// the same origin only: `'self'` covers ws/wss to this host (CSP Level 3),
/// where the scheme sources `ws:`/`wss:` would have allowed any host.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The UI routes: `/` (index.html) and `/ui/{file}` (assets).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index)).route("/ui/{file}", get(asset))
}

async fn index() -> Response {
    serve("index.html")
}

async fn asset(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// Security headers on every UI response (also on 404s).
pub fn security_headers(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

fn serve(name: &str) -> Response {
    // Only flat file names: no traversal, no hidden files.
    let ok = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']);
    let mut resp = match Assets::get(name).filter(|_| ok) {
        Some(f) => {
            let mut r = f.data.into_owned().into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
            r
        }
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    security_headers(resp.headers_mut());
    resp
}
