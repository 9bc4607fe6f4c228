//! The configuration backup's files over HTTP: `GET /_download/config/{token}`
//! (the link `config.save` returns; single use) and `POST /_upload` carrying
//! `config.upload` (TrueNAS's multipart form: a `data` field with
//! `{"method": "config.upload", "params": [{"passphrase": …}]}` and a `file`
//! field; or the file as the raw body with the passphrase in the
//! `X-Keyhaven-Passphrase` header). Both authenticate as every download does
//! (API key or token) and need a full admin; the upload is at most
//! [`UPLOAD_MAX`] bytes, refused before it is read when it says it is larger,
//! and dropped (408) when it sends nothing for [`online::upload_idle`], so a
//! stalled client cannot hold the one upload slot forever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::download::{attachment, authenticate, plain};
use crate::backup::online::{self, UploadSlot, UPLOAD_MAX};
use crate::backup::Passphrase;
use crate::service::audit::{record, AuditEvent};
use crate::service::auth::{Caller, Session};
use crate::service::App;

/// The header that carries the passphrase of a raw upload.
pub const PASSPHRASE_HEADER: &str = "x-keyhaven-passphrase";

#[allow(clippy::result_large_err)] // the error is the HTTP response to send
fn require_admin(app: &App, session: &Session, caller: &Caller, what: &str) -> Result<(), Response> {
    if caller.role.can_write() {
        return Ok(());
    }
    record(app, session, AuditEvent::method(what, what, None, false, Some("Not authorized".into())));
    Err(plain(StatusCode::FORBIDDEN, "Not authorized: only full admins may save or restore the configuration"))
}

pub async fn download(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let (session, caller) = match authenticate(&app, &headers, &q, peer).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = require_admin(&app, &session, &caller, "download.config") {
        return r;
    }
    let Some((bytes, filename)) = online::take_download(&token) else {
        return plain(
            StatusCode::NOT_FOUND,
            "No such configuration download (links are single use and last 10 minutes); run config.save again",
        );
    };
    record(&app, &session, AuditEvent::method("download.config", "Download configuration backup", None, true, None));
    attachment(bytes, &filename)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadData {
    method: String,
    #[serde(default)]
    params: Vec<serde_json::Value>,
}

/// A file being received into the data dir, removed on drop unless kept.
struct Incoming {
    path: PathBuf,
    file: tokio::fs::File,
    size: u64,
    keep: bool,
}

impl Incoming {
    async fn new(app: &App) -> std::io::Result<Incoming> {
        let dir = app.config.data_dir.join(online::EXPORTS_DIR);
        tokio::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).await?;
        let path = dir.join(format!(".upload-{}", std::process::id()));
        let file =
            tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).await?;
        Ok(Incoming { path, file, size: 0, keep: false })
    }

    /// Append a chunk; `Err` is the response when the upload is too large.
    async fn push(&mut self, chunk: &[u8]) -> Result<(), Response> {
        self.size += chunk.len() as u64;
        if self.size > UPLOAD_MAX {
            return Err(too_large());
        }
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Cannot store the upload: {e}")))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn too_large() -> Response {
    plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("The upload is larger than {UPLOAD_MAX} bytes; keyhaven refuses it"))
}

/// Await the next part of the body, or the 408 response once it stalls.
#[allow(clippy::result_large_err)] // the error is the HTTP response to send
async fn within_idle<T>(next: impl std::future::Future<Output = T>) -> Result<T, Response> {
    let idle = online::upload_idle();
    tokio::time::timeout(idle, next).await.map_err(|_| {
        plain(
            StatusCode::REQUEST_TIMEOUT,
            &format!("The upload sent nothing for {} ms; keyhaven dropped it, send it again", idle.as_millis()),
        )
    })
}

fn bad(msg: &str) -> Response {
    plain(StatusCode::BAD_REQUEST, msg)
}

#[allow(clippy::result_large_err)] // the error is the HTTP response to send
fn passphrase_of(params: &[serde_json::Value]) -> Result<Passphrase, Response> {
    let opts: crate::api::config::SaveOptions = match params.first() {
        None => return Err(bad("config.upload needs params [{\"passphrase\": …}]")),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|_| bad("config.upload's params[0] must be {\"passphrase\": \"…\"}"))?,
    };
    crate::api::config::passphrase(opts, "config_upload").map_err(|e| bad(&e.to_string()))
}

pub async fn upload(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    // Who and how much, before a byte of the body is read.
    let (session, caller) = match authenticate(&app, &headers, &q, peer).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = require_admin(&app, &session, &caller, "config.upload") {
        return r;
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > UPLOAD_MAX + 64 * 1024) {
        return too_large();
    }
    let slot = match UploadSlot::take() {
        Ok(s) => s,
        Err(e) => return plain(StatusCode::CONFLICT, &e.to_string()),
    };
    let mut incoming = match Incoming::new(&app).await {
        Ok(i) => i,
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Cannot store the upload: {e}")),
    };
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let pass = if is_multipart {
        let mut form = match Multipart::from_request(request, &()).await {
            Ok(m) => m,
            Err(e) => return bad(&format!("Not a multipart form: {e}")),
        };
        let mut data: Option<UploadData> = None;
        let mut got_file = false;
        loop {
            let next = match within_idle(form.next_field()).await {
                Ok(n) => n,
                Err(r) => return r,
            };
            let mut field = match next {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return bad(&format!("The multipart form is malformed: {e}")),
            };
            match field.name() {
                Some("data") => {
                    let text = match within_idle(field.text()).await {
                        Ok(t) => t,
                        Err(r) => return r,
                    };
                    let text = match text {
                        Ok(t) if t.len() <= 64 * 1024 => t,
                        _ => return bad("The `data` field must be a short JSON text"),
                    };
                    match serde_json::from_str::<UploadData>(&text) {
                        Ok(d) => data = Some(d),
                        Err(e) => return bad(&format!("The `data` field is not {{\"method\", \"params\"}}: {e}")),
                    }
                }
                Some("file") => {
                    loop {
                        let next = match within_idle(field.chunk()).await {
                            Ok(n) => n,
                            Err(r) => return r,
                        };
                        match next {
                            Ok(Some(c)) => {
                                if let Err(r) = incoming.push(&c).await {
                                    return r;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return bad(&format!("The upload broke off: {e}")),
                        }
                    }
                    got_file = true;
                }
                _ => return bad("Unknown form field; send `data` and `file`"),
            }
        }
        let Some(data) = data else { return bad("The form has no `data` field") };
        if data.method != "config.upload" {
            return bad(&format!("POST /_upload serves config.upload, not {}", data.method));
        }
        if !got_file {
            return bad("The form has no `file` field");
        }
        match passphrase_of(&data.params) {
            Ok(p) => p,
            Err(r) => return r,
        }
    } else {
        if q.get("method").is_some_and(|m| m != "config.upload") {
            return bad("POST /_upload serves config.upload only");
        }
        let pass = match headers.get(PASSPHRASE_HEADER).and_then(|v| v.to_str().ok()).map(Passphrase::new) {
            Some(Ok(p)) => p,
            _ => return bad("Send the passphrase in the X-Keyhaven-Passphrase header, or use the multipart form"),
        };
        let mut body = Body::into_data_stream(request.into_body());
        loop {
            let chunk = match within_idle(body.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(r) => return r,
            };
            match chunk {
                Ok(c) => {
                    if let Err(r) = incoming.push(&c).await {
                        return r;
                    }
                }
                Err(e) => return bad(&format!("The upload broke off: {e}")),
            }
        }
        pass
    };
    if let Err(e) = incoming.file.flush().await {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Cannot store the upload: {e}"));
    }
    if incoming.size == 0 {
        return bad("The uploaded file is empty");
    }
    let file = incoming.path.clone();
    let job_app = app.clone();
    let id = match app.jobs.spawn("config.upload", move |job| async move {
        let _slot = slot;
        online::upload(job_app, file, pass, job).await
    }) {
        Ok(id) => id,
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("Cannot start the restore: {e}")),
    };
    // The job removes the file once read.
    incoming.keep = true;
    let entry = app.jobs.wait(id).await;
    let ok = entry.as_ref().is_some_and(|e| e.state == "SUCCESS");
    let error = entry.as_ref().and_then(|e| e.error.clone());
    record(&app, &session, AuditEvent::method("config.upload", "Upload configuration backup", None, ok, error.clone()));
    if ok {
        (StatusCode::OK, axum::Json(json!({"job_id": id, "result": entry.map(|e| e.result)}))).into_response()
    } else {
        let status = if error.as_deref().is_some_and(|e| e.contains("failed; the server log")) {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        (status, axum::Json(json!({"job_id": id, "error": error}))).into_response()
    }
}
