//! The local unix socket `<data>/keyhaven.sock` used by `keyhaven call`.
//!
//! Like TrueNAS's `midclt`, a local caller is full admin without a password:
//! the socket is 0600 and only connections from root or keyhaven's own uid are
//! served (checked with SO_PEERCRED). One JSON-RPC 2.0 request per line, one
//! response per line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use super::wire;
use crate::api::dispatch;
use crate::service::auth::Session;
use crate::service::App;

pub const SOCKET_FILE: &str = "keyhaven.sock";
const MAX_LINE: usize = 1024 * 1024;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(data_dir);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(app: Arc<App>, listener: UnixListener) {
    let me = keyhaven_ssh::uid::effective();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // e.g. out of file descriptors: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == 0 || c.uid() == me => {}
            _ => continue,
        }
        let app = app.clone();
        tokio::spawn(async move {
            let session = Arc::new(Session::local_root());
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r);
            let mut line = String::new();
            loop {
                line.clear();
                match (&mut lines).take(MAX_LINE as u64).read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let reply = match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let id = v.get("id").cloned().unwrap_or(Value::Null);
                        let method = v.get("method").and_then(Value::as_str).unwrap_or("").to_string();
                        let params = match v.get("params") {
                            Some(Value::Array(a)) => a.clone(),
                            _ => vec![],
                        };
                        match dispatch(&app, &session, &method, params).await {
                            Ok(r) => json!({"jsonrpc": "2.0", "result": r, "id": id}),
                            Err(f) => json!({"jsonrpc": "2.0", "error": wire::rpc_error(&f), "id": id}),
                        }
                    }
                    Err(e) => {
                        json!({"jsonrpc": "2.0", "error": {"code": wire::PARSE_ERROR, "message": format!("Parse error: {e}")}, "id": null})
                    }
                };
                let mut s = reply.to_string();
                s.push('\n');
                if w.write_all(s.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
