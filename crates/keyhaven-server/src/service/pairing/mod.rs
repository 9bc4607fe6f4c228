//! Pairing and connection checks: host-key discovery, testing a stored SSH
//! connection, the remote side of semi-automatic setup (`ssh_pair`) and the
//! local side (`remote_ssh_semiautomatic_setup`, `setup_ssh_connection`).
//!
//! The local side talks to the other system through [`crate::remote`] (the
//! API client shared with `keyhaven call --url`), never through the transport.

use std::time::Duration;

use serde_json::{json, Value};

use super::input::SshEndpoint;
use super::keychain::{AttributesInput, ConnectionInput, KeyPairInput, KeychainEntry};
use super::session::Role;
use super::users::UserInput;
use super::App;
use crate::error::{ServiceError, EFAULT, EINVAL, ENOENT, ESSLCERTVERIFICATIONERROR};
use crate::remote::{ClientError, Dialect, RpcClient, TlsTrust};
use keyhaven_core::{authorized_keys, keys};
use keyhaven_ssh::client::{self as ssh_client, ScanError, ScannedKey, TestReport, TestTarget};
use keyhaven_ssh::files::KeysLocation;
use keyhaven_ssh::supervisor::SshdState;
use secrecy::{ExposeSecret, SecretString};

mod connections;
mod remote_side;
mod repair;
mod setup;

pub use connections::{ConnectionStatus, EpochMillis};
pub use remote_side::{PairInput, PairKey, PairReply};
pub use repair::RePairOutcome;

/// Pairing and stored connections (`keychaincredential.ssh_pair`, the
/// setup methods, re-pairing, connection tests): the handle of this area.
pub struct Pairing<'a> {
    app: &'a App,
}

impl<'a> Pairing<'a> {
    pub(in crate::service) fn new(app: &'a App) -> Self {
        Pairing { app }
    }
}

/// Discover the host keys of `host:port` (keyhaven's `ssh-keyscan`).
pub async fn host_key_scan(host: &str, port: u16, timeout: Duration) -> Result<Vec<ScannedKey>, ServiceError> {
    match ssh_client::scan_host_keys(host, port, timeout).await {
        Ok(k) if k.is_empty() => Err(ServiceError::call(
            EFAULT,
            format!("ssh-keyscan failed: {host} port {port} offered no Ed25519, ECDSA or RSA host key"),
        )),
        Ok(k) => Ok(k),
        Err(ScanError::Timeout) => Err(ServiceError::call(EFAULT, "SSH timeout")),
        Err(e) => Err(ServiceError::call(EFAULT, format!("ssh-keyscan failed: {e}"))),
    }
}

/// How long one remote API call may take (pairing may start the remote sshd,
/// which generates its host keys on first start).
const REMOTE_CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CREATE: &str = "keychain_credential_create";

/// Arguments of semi-automatic setup besides the connection name and key pair.
pub struct SemiAutomatic {
    pub url: String,
    pub verify_ssl: bool,
    /// Trust exactly this certificate (keyhaven extension); overrides `verify_ssl`.
    pub tls_pin: Option<String>,
    pub token: Option<SecretString>,
    pub admin_username: String,
    pub password: Option<SecretString>,
    pub otp_token: Option<SecretString>,
    pub username: String,
    pub connect_timeout: i64,
    pub sudo: bool,
}

/// A manual connection (SSH_CREDENTIALS attributes without the key pair).
pub struct Manual {
    pub endpoint: SshEndpoint,
    pub username: String,
    pub remote_host_key: String,
}

pub enum KeyChoice {
    /// Generate (Ed25519 unless chosen otherwise) and store a key pair under this name.
    Generate {
        name: String,
        options: keys::GenerateOptions,
    },
    Existing(i64),
}

pub enum SetupKind {
    Manual(Manual),
    SemiAutomatic(SemiAutomatic),
}

fn filled(s: &Option<SecretString>) -> Option<&str> {
    s.as_ref().map(|s| s.expose_secret()).filter(|s| !s.is_empty())
}

/// Host part of an http(s) URL: lower-cased, IPv6 without brackets, port dropped.
pub fn url_host(url: &str) -> String {
    let rest = url.trim().split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let host = if let Some(r) = authority.strip_prefix('[') {
        r.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host.to_lowercase()
}

/// The connection that pairing through `s` yields: SSH to the URL's host at the
/// port and with the host keys the remote reported, as `s.username`.
fn paired_connection(s: &SemiAutomatic, port: i64, host_key: &str, key_id: i64) -> ConnectionInput {
    ConnectionInput {
        endpoint: SshEndpoint { host: url_host(&s.url), port, connect_timeout: s.connect_timeout },
        username: s.username.clone(),
        private_key: key_id,
        remote_host_key: strip_host_tokens(host_key),
    }
}

/// `remote_host_key` text from `ssh_pair`'s `host_key`: first token of each line dropped.
pub fn strip_host_tokens(host_key: &str) -> String {
    host_key
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("# "))
        .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn remote_reason(e: &ClientError) -> String {
    match e {
        ClientError::Remote { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// Connect to the remote API: JSON-RPC at `/api/current`, or the legacy
/// `/websocket` when the remote does not have the former (older TrueNAS).
async fn connect_remote(s: &SemiAutomatic) -> Result<RpcClient, ServiceError> {
    let trust = match (&s.tls_pin, s.verify_ssl) {
        (Some(pin), _) => TlsTrust::Pinned(pin.clone()),
        (None, true) => TlsTrust::WebPki,
        (None, false) => TlsTrust::Insecure,
    };
    let url = s.url.as_str();
    let map = |e: ClientError| match e {
        ClientError::CertificateVerification(m) => ServiceError::call(ESSLCERTVERIFICATIONERROR, m),
        other => ServiceError::call(EFAULT, format!("Unable to connect to remote system: {other}")),
    };
    match RpcClient::connect_with(url, Dialect::JsonRpc, &trust, REMOTE_CALL_TIMEOUT).await {
        Ok(c) => Ok(c),
        Err(ClientError::NotFound(_)) => {
            RpcClient::connect_with(url, Dialect::Legacy, &trust, REMOTE_CALL_TIMEOUT).await.map_err(map)
        }
        Err(e) => Err(map(e)),
    }
}

fn login_failure(r: &Value) -> String {
    match r.get("response_type").and_then(Value::as_str) {
        Some("EXPIRED") => "Account credentials have expired".into(),
        Some("DENIED") => "Account does not have API access".into(),
        Some("OTP_REQUIRED") => "Two-factor authentication is enabled for this account on the remote system: \
                                 give the current one-time password (otp_token)"
            .into(),
        Some("REDIRECT") => "The remote system is not the active controller; use the URL of the active one".into(),
        _ => "Invalid username or password".into(),
    }
}

/// Log in on the remote with a token or a password (+ OTP).
async fn remote_login(c: &mut RpcClient, s: &SemiAutomatic) -> Result<(), ServiceError> {
    let fail = |m: String| ServiceError::call(EFAULT, m);
    let err = |e: ClientError| ServiceError::call(EFAULT, remote_reason(&e));
    if let Some(token) = filled(&s.token) {
        let ok = match c.dialect() {
            Dialect::JsonRpc => {
                let r = c
                    .call("auth.login_ex", vec![json!({"mechanism": "TOKEN_PLAIN", "token": token})])
                    .await
                    .map_err(err)?;
                r["response_type"] == "SUCCESS"
            }
            Dialect::Legacy => c.call("auth.login_with_token", vec![json!(token)]).await.map_err(err)? == json!(true),
        };
        return if ok { Ok(()) } else { Err(fail("Invalid token".into())) };
    }
    let Some(password) = filled(&s.password) else {
        return Err(fail("You should specify either remote system password or temporary authentication token".into()));
    };
    let otp = filled(&s.otp_token);
    let mut legacy_params = vec![json!(s.admin_username), json!(password)];
    if let Some(o) = otp {
        legacy_params.push(json!(o));
    }
    if c.dialect() == Dialect::JsonRpc {
        let r = c
            .call(
                "auth.login_ex",
                vec![json!({"mechanism": "PASSWORD_PLAIN", "username": s.admin_username, "password": password})],
            )
            .await;
        let r = match r {
            Err(e) if e.is_no_method() => None,
            Err(e) => return Err(err(e)),
            Ok(r) => Some(r),
        };
        if let Some(mut r) = r {
            if r["response_type"] == "OTP_REQUIRED" {
                if let Some(o) = otp {
                    r = c
                        .call("auth.login_ex", vec![json!({"mechanism": "OTP_TOKEN", "otp_token": o})])
                        .await
                        .map_err(err)?;
                }
            }
            return if r["response_type"] == "SUCCESS" { Ok(()) } else { Err(fail(login_failure(&r))) };
        }
    }
    match c.call("auth.login", legacy_params).await.map_err(err)? {
        Value::Bool(true) => Ok(()),
        _ => Err(fail("Invalid username or password".into())),
    }
}

/// What pairing changed on the remote account, so a failure can put it back.
#[derive(Default)]
struct RemoteChanges {
    user_id: Option<Value>,
    /// The key `ssh_pair` added (absent when it was there before).
    key_added: Option<String>,
    /// Account fields changed, with their previous values.
    restore: serde_json::Map<String, Value>,
}

impl RemoteChanges {
    /// Best effort; what cannot be put back is logged for the admin.
    async fn undo(&self, c: &mut RpcClient, username: &str) {
        if let (Some(id), false) = (&self.user_id, self.restore.is_empty()) {
            if let Err(e) = c.call("user.update", vec![id.clone(), Value::Object(self.restore.clone())]).await {
                tracing::error!(username, "could not restore the remote account after a failed pairing: {e}");
            }
        }
        if let Some(k) = &self.key_added {
            if let Err(e) = remove_remote_key(c, username, k).await {
                tracing::error!(username, "a failed pairing left its key on the remote account ({e}); remove it there");
            }
        }
    }
}

/// `type base64` of an authorized-keys or public-key line.
fn key_body(line: &str) -> Option<String> {
    authorized_keys::parse_authorized_keys(line)
        .ok()
        .and_then(|v| v.into_iter().next())
        .map(|k| format!("{} {}", k.key_type, k.base64))
}

/// Why a key could not be taken off a remote account.
#[derive(Debug, thiserror::Error)]
enum RemoveKeyError {
    #[error("the key is not a valid public key")]
    InvalidKey,
    #[error("{}", remote_reason(.0))]
    Remote(#[from] ClientError),
}

/// Take `public_key` (compared by type and base64) off the remote account's
/// authorized keys through its API. `Ok(false)` when it was not there.
async fn remove_remote_key(c: &mut RpcClient, username: &str, public_key: &str) -> Result<bool, RemoveKeyError> {
    let target = key_body(public_key).ok_or(RemoveKeyError::InvalidKey)?;
    let user = c
        .call("user.query", vec![json!([["username", "=", username], ["local", "=", true]]), json!({"get": true})])
        .await?;
    let current = user["sshpubkey"].as_str().unwrap_or("");
    let kept: Vec<&str> = current.lines().filter(|l| key_body(l).as_deref() != Some(target.as_str())).collect();
    if kept.len() == current.lines().count() {
        return Ok(false);
    }
    let text = if kept.iter().all(|l| l.trim().is_empty()) { Value::Null } else { json!(kept.join("\n") + "\n") };
    c.call("user.update", vec![user["id"].clone(), json!({"sshpubkey": text})]).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_urls() {
        assert_eq!(url_host("https://NAS.example:8443/ui"), "nas.example");
        assert_eq!(url_host("http://[fe80::1]:80"), "fe80::1");
        assert_eq!(url_host("http://10.0.0.5"), "10.0.0.5");
        assert_eq!(url_host("http://"), "");
    }

    #[test]
    fn host_tokens_dropped() {
        assert_eq!(
            strip_host_tokens("any-host ssh-rsa AAA\n\nany-host ssh-ed25519 BBB c\n"),
            "ssh-rsa AAA\nssh-ed25519 BBB c"
        );
    }
}
