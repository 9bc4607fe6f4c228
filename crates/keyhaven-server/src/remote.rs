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

use crate::error::ENOMETHOD;

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
            || matches!(self, ClientError::Remote { errno: Some(n), .. } if *n == i64::from(ENOMETHOD.code()))
    }
}

/// Which server certificates a connection accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsTrust {
    /// Chains to a web-PKI root (the default).
    WebPki,
    /// Any certificate (TrueNAS's `verify_ssl: false`).
    Insecure,
    /// Exactly the certificate with this SHA-256 fingerprint (see [`cert_fingerprint`]),
    /// whoever signed it: a self-signed certificate the admin checked once.
    Pinned(String),
}

/// SHA-256 of a certificate as `openssl x509 -fingerprint -sha256` prints it
/// (`AB:CD:…`, upper-case hex).
pub fn cert_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(der);
    d.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Normalise a fingerprint given by a caller: 64 hex digits, colons and case free.
/// Accepts openssl's whole output line (`sha256 Fingerprint=AB:…`) too.
pub fn parse_cert_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.rsplit_once('=').map(|(_, f)| f).unwrap_or(s).trim();
    let s = if s.len() > 7 && s[..7].eq_ignore_ascii_case("SHA256:") { &s[7..] } else { s };
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| {
        hex.to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(":")
    })
}

/// Checks certificates by [`TlsTrust`] and remembers the fingerprint of the
/// one the server presented, so a refusal can say which certificate it was.
#[derive(Debug)]
struct Verifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    trust: TlsTrust,
    webpki: Option<Arc<dyn ServerCertVerifier>>,
    seen: Arc<std::sync::Mutex<Option<String>>>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = cert_fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp.clone());
        match (&self.trust, &self.webpki) {
            (TlsTrust::Insecure, _) => Ok(ServerCertVerified::assertion()),
            (TlsTrust::Pinned(want), _) if *want == fp => Ok(ServerCertVerified::assertion()),
            (TlsTrust::Pinned(_), _) => {
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
            }
            (TlsTrust::WebPki, Some(v)) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            (TlsTrust::WebPki, None) => Err(rustls::Error::General("no certificate roots".into())),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(trust: &TlsTrust, seen: Arc<std::sync::Mutex<Option<String>>>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let webpki = (*trust == TlsTrust::WebPki).then(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map(|v| v as Arc<dyn ServerCertVerifier>)
            .ok()
    });
    let verifier = Verifier { provider, trust: trust.clone(), webpki: webpki.flatten(), seen };
    builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
}

fn is_cert_error(e: &tokio_tungstenite::tungstenite::Error, trust: &TlsTrust, seen: Option<String>) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error as E;
    let E::Io(io) = e else { return None };
    let r = io.get_ref()?.downcast_ref::<rustls::Error>()?;
    if !matches!(r, rustls::Error::InvalidCertificate(_)) {
        return None;
    }
    let presented =
        seen.map(|fp| format!("; the server's certificate has SHA-256 fingerprint {fp}")).unwrap_or_default();
    Some(match trust {
        TlsTrust::Pinned(want) => format!(
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: the certificate changed since you \
             trusted it (expected SHA-256 fingerprint {want}){presented}"
        ),
        _ => format!("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {r}{presented}"),
    })
}

/// The largest message accepted from a remote system (1 MiB).
pub const MAX_REPLY_BYTES: usize = 1 << 20;

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
        let trust = if verify_tls { TlsTrust::WebPki } else { TlsTrust::Insecure };
        Self::connect_with(base, dialect, &trust, timeout).await
    }

    /// [`RpcClient::connect`] with any [`TlsTrust`].
    pub async fn connect_with(
        base: &str,
        dialect: Dialect,
        trust: &TlsTrust,
        timeout: Duration,
    ) -> Result<RpcClient, ClientError> {
        let endpoint = match dialect {
            Dialect::JsonRpc => "api/current",
            Dialect::Legacy => "websocket",
        };
        let url = ws_url(base, endpoint)?;
        let seen = Arc::new(std::sync::Mutex::new(None));
        let connector = Connector::Rustls(Arc::new(tls_config(trust, seen.clone())));
        // A hostile remote must not make us buffer without bound: no reply
        // keyhaven expects comes near this.
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_REPLY_BYTES))
            .max_frame_size(Some(MAX_REPLY_BYTES));
        let fut = tokio_tungstenite::connect_async_tls_with_config(&url, Some(config), true, Some(connector));
        let (ws, _) = match tokio::time::timeout(timeout, fut).await {
            Err(_) => return Err(ClientError::Timeout(timeout)),
            Ok(Err(e)) => {
                let presented = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(m) = is_cert_error(&e, trust, presented) {
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
                code: if errno == Some(i64::from(ENOMETHOD.code())) { -32601 } else { -32001 },
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
    fn cert_fingerprints_in_openssl_forms() {
        let fp = (0..32).map(|i| format!("{i:02X}")).collect::<Vec<_>>().join(":");
        for input in [
            fp.clone(),
            fp.to_lowercase(),
            fp.replace(':', ""),
            format!("sha256 Fingerprint={fp}"),
            format!("SHA256 Fingerprint={fp}\n"),
            format!("SHA256:{}", fp.replace(':', "")),
        ] {
            assert_eq!(parse_cert_fingerprint(&input).as_deref(), Some(fp.as_str()), "{input}");
        }
        for bad in ["", "AB:CD", &"G".repeat(64), &format!("{fp}:00")] {
            assert_eq!(parse_cert_fingerprint(bad), None, "{bad}");
        }
        assert_eq!(cert_fingerprint(b"x").len(), 95);
    }

    #[test]
    fn ws_urls() {
        assert_eq!(ws_url("http://h", "api/current").unwrap(), "ws://h/api/current");
        assert_eq!(ws_url("https://h:8443/", "websocket").unwrap(), "wss://h:8443/websocket");
        assert_eq!(ws_url("https://[::1]:1/p", "websocket").unwrap(), "wss://[::1]:1/p/websocket");
        assert!(ws_url("ftp://h", "x").is_err());
    }
}
