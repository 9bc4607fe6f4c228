//! A client for another system's API (keyhaven or TrueNAS): JSON-RPC 2.0 at
//! `<url>/api/current`, or the legacy dialect at `<url>/websocket`. Used by
//! `keyhaven call --url` and by semi-automatic pairing (service layer), so it
//! sits beside both layers rather than inside the transport. Certificates are
//! verified against the web PKI unless the caller turns verification off.

// A remote error carries the peer's whole error object; it is built once per
// failed call, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// Which WebSocket dialect a connection speaks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dialect {
    /// JSON-RPC 2.0 at `/api/current`.
    JsonRpc,
    /// TrueNAS's legacy DDP-style dialect at `/websocket`.
    Legacy,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    CertificateVerification(String),
    #[error("{0}")]
    Connect(String),
    /// The endpoint does not exist (HTTP 404 on upgrade).
    #[error("{0}: endpoint not found")]
    NotFound(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{reason}")]
    Remote { code: i64, errno: Option<i64>, errname: Option<String>, reason: String, extra: Value },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// True when the remote says the method does not exist.
    pub fn is_no_method(&self) -> bool {
        matches!(self, ClientError::Remote { code: -32601, .. })
            || matches!(self, ClientError::Remote { errno: Some(201), .. })
    }
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(verify: bool, extra_ca: Option<&[CertificateDer<'static>]>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    if verify {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for c in extra_ca.unwrap_or_default() {
            let _ = roots.add(c.clone());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
    }
}

fn is_cert_error(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error as E;
    if let E::Io(io) = e {
        if let Some(inner) = io.get_ref() {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                if matches!(r, rustls::Error::InvalidCertificate(_)) {
                    return Some(format!("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {r}"));
                }
            }
        }
    }
    None
}

/// Turn `http(s)://host[:port][/prefix]` into the WebSocket URL of `endpoint`.
pub fn ws_url(base: &str, endpoint: &str) -> Result<String, ClientError> {
    let base = base.trim();
    let rest = if let Some(r) = base.strip_prefix("https://") {
        format!("wss://{r}")
    } else if let Some(r) = base.strip_prefix("http://") {
        format!("ws://{r}")
    } else if base.starts_with("ws://") || base.starts_with("wss://") {
        base.to_string()
    } else {
        return Err(ClientError::Connect(format!("{base}: the URL must start with http:// or https://")));
    };
    Ok(format!("{}/{}", rest.trim_end_matches('/'), endpoint.trim_start_matches('/')))
}

pub struct RpcClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    dialect: Dialect,
    next_id: u64,
    timeout: Duration,
}

impl RpcClient {
    /// Connect to `<base>/api/current` (JSON-RPC) or `<base>/websocket` (legacy).
    pub async fn connect(
        base: &str,
        dialect: Dialect,
        verify_tls: bool,
        timeout: Duration,
    ) -> Result<RpcClient, ClientError> {
        let endpoint = match dialect {
            Dialect::JsonRpc => "api/current",
            Dialect::Legacy => "websocket",
        };
        let url = ws_url(base, endpoint)?;
        let connector = Connector::Rustls(Arc::new(tls_config(verify_tls, None)));
        let fut = tokio_tungstenite::connect_async_tls_with_config(&url, None, true, Some(connector));
        let (ws, _) = match tokio::time::timeout(timeout, fut).await {
            Err(_) => return Err(ClientError::Timeout(timeout)),
            Ok(Err(e)) => {
                if let Some(m) = is_cert_error(&e) {
                    return Err(ClientError::CertificateVerification(m));
                }
                if let tokio_tungstenite::tungstenite::Error::Http(r) = &e {
                    if r.status().as_u16() == 404 {
                        return Err(ClientError::NotFound(url));
                    }
                }
                return Err(ClientError::Connect(e.to_string()));
            }
            Ok(Ok(x)) => x,
        };
        let mut c = RpcClient { ws, dialect, next_id: 0, timeout };
        if dialect == Dialect::Legacy {
            c.send(json!({"msg": "connect", "version": "1", "support": ["1"]})).await?;
            loop {
                let m = c.recv().await?;
                match m.get("msg").and_then(Value::as_str) {
                    Some("connected") => break,
                    Some("failed") => return Err(ClientError::Protocol(format!("legacy connect refused: {m}"))),
                    _ => continue,
                }
            }
        }
        Ok(c)
    }

    async fn send(&mut self, v: Value) -> Result<(), ClientError> {
        self.ws.send(Message::Text(v.to_string().into())).await.map_err(|e| ClientError::Connect(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Value, ClientError> {
        loop {
            let m = match tokio::time::timeout(self.timeout, self.ws.next()).await {
                Err(_) => return Err(ClientError::Timeout(self.timeout)),
                Ok(None) => return Err(ClientError::Connect("the remote closed the connection".into())),
                Ok(Some(Err(e))) => return Err(ClientError::Connect(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Text(t) => {
                    return serde_json::from_str(&t)
                        .map_err(|e| ClientError::Protocol(format!("invalid JSON from the remote: {e}")))
                }
                Message::Close(f) => {
                    return Err(ClientError::Connect(format!(
                        "the remote closed the connection{}",
                        f.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                    )))
                }
                _ => continue,
            }
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Call a method and wait for its reply.
    pub async fn call(&mut self, method: &str, params: Vec<Value>) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = self.next_id;
        match self.dialect {
            Dialect::JsonRpc => {
                self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await?
            }
            Dialect::Legacy => {
                self.send(json!({"msg": "method", "id": id.to_string(), "method": method, "params": params})).await?
            }
        }
        loop {
            let m = self.recv().await?;
            let matches = match self.dialect {
                Dialect::JsonRpc => m.get("id") == Some(&json!(id)),
                Dialect::Legacy => {
                    m.get("msg") == Some(&json!("result")) && m.get("id") == Some(&json!(id.to_string()))
                }
            };
            if !matches {
                continue;
            }
            if let Some(err) = m.get("error").filter(|e| !e.is_null()) {
                return Err(remote_error(self.dialect, err));
            }
            return Ok(m.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn remote_error(dialect: Dialect, err: &Value) -> ClientError {
    match dialect {
        Dialect::JsonRpc => {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let data = err.get("data").cloned().unwrap_or(Value::Null);
            let reason = data
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| err.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| err.to_string());
            ClientError::Remote {
                code,
                errno: data.get("error").and_then(Value::as_i64),
                errname: data.get("errname").and_then(Value::as_str).map(str::to_string),
                reason,
                extra: data.get("extra").cloned().unwrap_or(Value::Null),
            }
        }
        Dialect::Legacy => {
            let errno = err.get("error").and_then(Value::as_i64);
            ClientError::Remote {
                code: if errno == Some(201) { -32601 } else { -32001 },
                errno,
                errname: err.get("errname").and_then(Value::as_str).map(str::to_string),
                reason: err.get("reason").and_then(Value::as_str).unwrap_or("remote error").to_string(),
                extra: err.get("extra").cloned().unwrap_or(Value::Null),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        assert_eq!(ws_url("http://h", "api/current").unwrap(), "ws://h/api/current");
        assert_eq!(ws_url("https://h:8443/", "websocket").unwrap(), "wss://h:8443/websocket");
        assert_eq!(ws_url("https://[::1]:1/p", "websocket").unwrap(), "wss://[::1]:1/p/websocket");
        assert!(ws_url("ftp://h", "x").is_err());
    }
}
