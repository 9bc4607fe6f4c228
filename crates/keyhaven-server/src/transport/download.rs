//! File downloads: `GET /_download/keychaincredential/{id}/public_key` and
//! `/private_key`, authorised by an API key (`Authorization: Bearer`) or a
//! token from `auth.generate_token` (`?auth_token=`; single use honoured).
//! `POST` to the private-key URL with `{"passphrase": …}` returns the key
//! encrypted with it, so a passphrase never travels in a URL. Every
//! private-key download is audited; anonymous requests get 401.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde::Deserialize;

use crate::service::audit::{record, AuditEvent};
use crate::service::auth::{Caller, DownloadRefusal, Session};
use crate::service::keychain::KeychainEntry;
use crate::service::App;
use keyhaven_core::keys::{self, KeyAlgorithm};

pub(crate) fn plain(status: StatusCode, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{msg}\n")).into_response()
}

fn unauthorized() -> Response {
    let mut r = plain(
        StatusCode::UNAUTHORIZED,
        "Authentication required: send `Authorization: Bearer <API key>` or `?auth_token=<token from auth.generate_token>`",
    );
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Authenticate a download or upload request through the auth service
/// (limited and audited like a login) and open its session; `Err` is the
/// response to send.
#[allow(clippy::result_large_err)] // the error is the HTTP response to send
pub(crate) async fn authenticate(
    app: &App,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    peer: SocketAddr,
) -> Result<(Session, Caller), Response> {
    let origin = peer.ip().to_string();
    let bearer = match headers.get(header::AUTHORIZATION) {
        Some(h) => match h.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")) {
            Some(k) => Some(k.trim().to_string()),
            None => return Err(unauthorized()),
        },
        None => None,
    };
    let token = if bearer.is_none() { q.get("auth_token").map(String::as_str) } else { None };
    let caller = app.auth().authenticate_download(&origin, bearer.as_deref(), token).await.map_err(|r| match r {
        DownloadRefusal::Unauthenticated => unauthorized(),
        DownloadRefusal::Forbidden(m) => plain(StatusCode::FORBIDDEN, m),
    })?;
    Ok((Session::authenticated(origin, caller.clone()), caller))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassphraseBody {
    passphrase: crate::api::params::SecretText,
}

pub async fn get_key(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, which)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    serve_key(app, peer, id, which, q, headers, None).await
}

pub async fn post_key(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, which)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if which != "private_key" {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "POST is only for private_key (to encrypt it with a passphrase)");
    }
    let pass = match serde_json::from_slice::<PassphraseBody>(&body) {
        Ok(b) if !secrecy::ExposeSecret::expose_secret(&b.passphrase.0).is_empty() => b.passphrase.0,
        _ => {
            return plain(
                StatusCode::BAD_REQUEST,
                "Send a JSON body {\"passphrase\": \"…\"} with a non-empty passphrase",
            )
        }
    };
    serve_key(app, peer, id, which, q, headers, Some(pass)).await
}

async fn serve_key(
    app: Arc<App>,
    peer: SocketAddr,
    id: String,
    which: String,
    q: HashMap<String, String>,
    headers: HeaderMap,
    passphrase: Option<SecretString>,
) -> Response {
    let (session, caller) = match authenticate(&app, &headers, &q, peer).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<i64>() else { return plain(StatusCode::NOT_FOUND, "No such credential") };
    let entry = match app.keychain().get(id) {
        Ok(KeychainEntry::KeyPair(e)) => e,
        _ => return plain(StatusCode::NOT_FOUND, &format!("SSH key pair {id} does not exist")),
    };
    let name = entry.name.clone();
    let alg: KeyAlgorithm = entry.algorithm.as_deref().and_then(|a| a.parse().ok()).unwrap_or_default();
    let stem = keys::download_file_name(&name, alg, false);
    let (body, file) = match which.as_str() {
        "public_key" => match entry.attributes.full().map(|a| a.public_key.as_str()) {
            Some(p) => (zeroize::Zeroizing::new(p.to_string()), keys::download_file_name(&name, alg, true)),
            None => return plain(StatusCode::NOT_FOUND, "This key pair has no public key"),
        },
        "private_key" => {
            let desc = format!("Download private key: {name}");
            if !caller.role.can_write() {
                record(
                    &app,
                    &session,
                    AuditEvent::method("download.private_key", &desc, None, false, Some("Not authorized".into())),
                );
                return plain(StatusCode::FORBIDDEN, "Not authorized: read-only admins cannot download private keys");
            }
            let pk = match app.keychain().private_key(id) {
                Ok(Some(pk)) => pk,
                Ok(None) => return plain(StatusCode::NOT_FOUND, "This key pair has no private key (public key only)"),
                Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            };
            let body = match &passphrase {
                None => pk,
                Some(pass) => {
                    use secrecy::ExposeSecret;
                    let pass = zeroize::Zeroizing::new(pass.expose_secret().to_string());
                    match tokio::task::spawn_blocking(move || keys::encrypt_private_key(&pk, &pass)).await {
                        Ok(Ok(enc)) => enc,
                        _ => return plain(StatusCode::INTERNAL_SERVER_ERROR, "Encrypting the private key failed"),
                    }
                }
            };
            let desc = if passphrase.is_some() { format!("{desc} (passphrase-protected)") } else { desc };
            record(&app, &session, AuditEvent::method("download.private_key", &desc, None, true, None));
            (body, stem)
        }
        _ => return plain(StatusCode::NOT_FOUND, "Use public_key or private_key"),
    };
    attachment(body.as_str().to_string(), &file)
}

/// A file download response: octet-stream, saved as `filename`, never cached
/// (key material and configuration backups must not linger in a proxy or browser cache).
pub(crate) fn attachment(body: impl Into<axum::body::Body>, filename: &str) -> Response {
    let mut r = (StatusCode::OK, body.into()).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
