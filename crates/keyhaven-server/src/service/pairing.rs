//! Pairing and connection checks: host-key discovery, testing a stored SSH
//! connection, the remote side of semi-automatic setup (`ssh_pair`) and the
//! local side (`remote_ssh_semiautomatic_setup`, `setup_ssh_connection`).
//!
//! The local side talks to the other system through [`crate::remote`] (the
//! API client shared with `keyhaven call --url`), never through the transport.

use std::time::Duration;

use serde_json::{json, Value};

use super::keychain::{AttributesInput, ConnectionInput, KeyPairInput, SSH_KEY_PAIR};
use super::session::Role;
use super::users::UserInput;
use super::App;
use crate::error::{ServiceError, EFAULT, EINVAL, ENOENT, ESSLCERTVERIFICATIONERROR};
use crate::remote::{ClientError, Dialect, RpcClient, TlsTrust};
use keyhaven_core::{authorized_keys, keys};
use keyhaven_ssh::client::{self as ssh_client, ScanError, ScannedKey, TestTarget};
use keyhaven_ssh::files::KeysLocation;
use keyhaven_ssh::supervisor::SshdState;
use secrecy::{ExposeSecret, SecretString};

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

impl App {
    /// Test a stored SSH connection: pinned host keys, its key pair, `true`.
    pub async fn test_ssh_connection(&self, id: i64, timeout: Option<u64>) -> Result<Value, ServiceError> {
        self.test_ssh_connection_with(id, timeout, None, "").await
    }

    /// [`App::test_ssh_connection`], optionally logging in with another key
    /// pair than the connection's (`key_field` names it in errors).
    pub async fn test_ssh_connection_with(
        &self,
        id: i64,
        timeout: Option<u64>,
        key_pair: Option<i64>,
        key_field: &str,
    ) -> Result<Value, ServiceError> {
        let e = self.keychain_get(id)?;
        if e["type"] != super::keychain::SSH_CREDENTIALS {
            return Err(ServiceError::call(EINVAL, "Credential is not of type SSH_CREDENTIALS"));
        }
        let a = &e["attributes"];
        if let Some(k) = key_pair {
            // The cached entry is enough to check the type; the key itself is read once, below.
            if !self.keychain_entries()?.get(k).is_some_and(|kp| kp["type"] == SSH_KEY_PAIR) {
                return Err(ServiceError::field(key_field, format!("SSH key pair {k} does not exist")));
            }
        }
        let kp_id = key_pair.unwrap_or_else(|| a["private_key"].as_i64().unwrap_or_default());
        let private =
            self.keypair_private_key(kp_id).ok().flatten().filter(|p| !p.trim().is_empty()).ok_or_else(|| {
                match key_pair {
                    Some(k) => ServiceError::field(
                        key_field,
                        format!("SSH key pair {k} has no private key (public key only); it cannot log in"),
                    ),
                    None => ServiceError::call(
                        ENOENT,
                        format!("SSH key pair {kp_id} of this connection does not exist or has no private key"),
                    ),
                }
            })?;
        let pinned = keys::parse_host_key_lines(a["remote_host_key"].as_str().unwrap_or(""))
            .map_err(|(line, m)| ServiceError::call(EINVAL, format!("Stored remote_host_key, line {line}: {m}")))?;
        let port = a["port"].as_i64().and_then(|p| u16::try_from(p).ok()).unwrap_or(22);
        let secs = timeout.unwrap_or_else(|| a["connect_timeout"].as_u64().unwrap_or(10)).clamp(1, 300);
        let target = TestTarget {
            host: a["host"].as_str().unwrap_or("").to_string(),
            port,
            username: a["username"].as_str().unwrap_or("root").to_string(),
            private_key_openssh: private,
            pinned_host_keys: pinned.into_iter().map(|k| (k.key_type, k.base64)).collect(),
            timeout: Duration::from_secs(secs),
        };
        let r = ssh_client::test_connection(&target).await;
        // A test with the connection's own key is its status in the connection list.
        if key_pair.is_none() {
            let rec = keyhaven_store::ConnectionTestRecord {
                connection_id: id,
                ok: r.ok,
                stage: r.stage.as_str().to_string(),
                error: r.error.clone(),
                latency_ms: r.latency_ms as i64,
                tested_at: super::now_secs(),
            };
            if let Err(e) = self.store.connection_test_record(&rec) {
                tracing::warn!(connection = id, "could not keep the test result: {e}");
            }
        }
        Ok(json!({
            "ok": r.ok,
            "stage": r.stage.as_str(),
            "host_key_fingerprint": r.host_key_fingerprint,
            "latency_ms": r.latency_ms,
            "error": r.error,
            // keyhaven extension: where the time went (0 for stages not reached).
            "stages_ms": r.stages_ms,
        }))
    }

    /// Generate a key pair and store it as `name`: its id and its public key line.
    async fn create_generated_key(
        &self,
        name: &str,
        options: keys::GenerateOptions,
    ) -> Result<(i64, String), ServiceError> {
        let kp = self.generate_key_pair(options).await?;
        let input = KeyPairInput {
            private_key: Some(super::input::SecretText(secrecy::SecretString::from(kp.private_key.to_string()))),
            public_key: Some(kp.public_key.clone()),
            passphrase: None,
        };
        let e = self.keychain_create(name, AttributesInput::KeyPair(input), CREATE).await?;
        Ok((e["id"].as_i64().unwrap_or_default(), kp.public_key.trim().to_string()))
    }

    /// The last test of every SSH connection tested so far (keyhaven
    /// extension), as a caller of `role` may see it: error texts name hosts
    /// and users, which read-only admins do not see (connection attributes
    /// are redacted for them too).
    pub fn ssh_connection_status(&self, role: Role) -> Result<Vec<Value>, ServiceError> {
        let tests = self.store.connection_tests()?;
        Ok(tests
            .into_iter()
            .map(|t| {
                let error = match t.error {
                    Some(_) if !role.can_write() => Some(super::keychain::REDACTED.to_string()),
                    e => e,
                };
                json!({
                    "id": t.connection_id,
                    "ok": t.ok,
                    "stage": t.stage,
                    "error": error,
                    "latency_ms": t.latency_ms,
                    "tested_at": {"$date": t.tested_at * 1000},
                })
            })
            .collect())
    }

    /// `keychaincredential.ssh_pair`, the remote side of semi-automatic setup:
    /// check the account, enable and start sshd if needed, authorize
    /// `public_key` once, report the SSH port and the host keys.
    pub async fn ssh_pair(
        &self,
        remote_hostname: &str,
        username: &str,
        public_key: &str,
        schema: &str,
    ) -> Result<Value, ServiceError> {
        let public_key = public_key.trim();
        if let Err(e) = authorized_keys::parse_authorized_keys(public_key) {
            return Err(e.to_field_error(format!("{schema}.public_key")).into());
        }
        let (_, data) = self
            .user(username)?
            .ok_or_else(|| ServiceError::call(EFAULT, format!("User {username} does not exist")))?;
        if let KeysLocation::Home = self.keys_location {
            let home = data.home.as_str();
            if home.starts_with("/var/empty")
                || home.starts_with("/nonexistent")
                || !std::path::Path::new(home).is_dir()
            {
                return Err(ServiceError::call(ENOENT, format!("Home directory {home} does not exist")));
            }
            // A home or ~/.ssh that is a symbolic link or another account's:
            // refused now, before sshd is enabled and started for nothing.
            self.check_user_keys(username, &data)?;
        }
        // Before anything changes: an account that cannot run commands makes a
        // connection that fails every backup. With manage_os the pairing side
        // changes the shell afterwards (as TrueNAS does); without, it cannot.
        if !self.config.manage_os_accounts {
            let os = keyhaven_ssh::accounts::lookup(username).ok_or_else(|| {
                ServiceError::call(
                    EFAULT,
                    format!("User {username} has no OS account on this system; create it first (useradd {username})"),
                )
            })?;
            if let Err(why) = keyhaven_ssh::accounts::shell_runs_commands(&os.shell) {
                return Err(ServiceError::call(
                    EINVAL,
                    format!(
                        "User {username} cannot run commands over SSH: {why}. Give it a shell on this system \
                         (usermod -s /bin/bash {username}) or set accounts.manage_os = true so pairing can change it"
                    ),
                ));
            }
        }
        if !self.ssh_enabled()? {
            self.ssh_set_enabled(true)?;
        }
        if self.sshd.state() != SshdState::Running {
            self.ssh_control("START").await?;
        }
        let host_keys = self.host_public_keys()?;
        let mut lines = Vec::new();
        for (label, pred) in [
            ("RSA", (|t: &str| t == "ssh-rsa") as fn(&str) -> bool),
            ("ECDSA", |t: &str| t.starts_with("ecdsa-")),
            ("ED25519", |t: &str| t == "ssh-ed25519"),
        ] {
            let k = host_keys
                .iter()
                .find(|k| pred(&k.key_type))
                .ok_or_else(|| ServiceError::call(EFAULT, format!("Host {label} key not configured")))?;
            lines.push(format!("{remote_hostname} {}\n", k.to_line()));
        }
        {
            // Read and write the keys under the accounts lock: two pairings at
            // once must both end up authorized.
            let _guard = self.users_lock.lock().await;
            let (rec, data) = self
                .user(username)?
                .ok_or_else(|| ServiceError::call(EFAULT, format!("User {username} does not exist")))?;
            let current = data.sshpubkey.clone().unwrap_or_default();
            if !current.contains(public_key) {
                let mut new = current.trim_end().to_string();
                if !new.is_empty() {
                    new.push('\n');
                }
                new.push_str(public_key);
                new.push('\n');
                let input = UserInput { sshpubkey: Some(Some(new)), ..UserInput::default() };
                self.user_update_locked(rec.id, input).await?;
            }
        }
        Ok(json!({"port": self.ssh_settings()?.tcpport, "host_key": lines.concat()}))
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
    pub host: String,
    pub port: i64,
    pub username: String,
    pub remote_host_key: String,
    pub connect_timeout: i64,
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
        host: url_host(&s.url),
        port,
        username: s.username.clone(),
        private_key: key_id,
        remote_host_key: strip_host_tokens(host_key),
        connect_timeout: s.connect_timeout,
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

impl App {
    /// `keychaincredential.remote_ssh_semiautomatic_setup` (reference §2.8).
    pub async fn remote_semiautomatic_setup(
        &self,
        name: &str,
        key_id: i64,
        s: &SemiAutomatic,
    ) -> Result<Value, ServiceError> {
        let not_found = || ServiceError::call(EFAULT, "Specified key pair not found");
        let kp = self.keychain_get(key_id).map_err(|_| not_found())?;
        if kp["type"] != SSH_KEY_PAIR
            || !matches!(self.keypair_private_key(key_id), Ok(Some(k)) if !k.trim().is_empty())
        {
            return Err(not_found());
        }
        let public_key = kp["attributes"]["public_key"].as_str().unwrap_or("").trim().to_string();
        let mut c = connect_remote(s).await?;
        let (port, host_key, changes) = match self.pair_with(&mut c, &public_key, s).await {
            Ok(r) => r,
            Err(e) => {
                c.close().await;
                return Err(e);
            }
        };
        let conn = paired_connection(s, port, &host_key, key_id);
        let created = self.keychain_create(name, AttributesInput::Connection(conn), CREATE).await;
        if created.is_err() {
            changes.undo(&mut c, &s.username).await;
        }
        c.close().await;
        created
    }

    /// Log in to the remote, authorize `public_key` there (`ssh_pair`) and
    /// adjust the account (login shell, sudo for zfs). Returns the SSH port,
    /// the host keys and what changed on the remote, for a later undo; a
    /// failure here undoes its own changes.
    async fn pair_with(
        &self,
        c: &mut RpcClient,
        public_key: &str,
        s: &SemiAutomatic,
    ) -> Result<(i64, String, RemoteChanges), ServiceError> {
        remote_login(c, s).await?;
        let mut changes = RemoteChanges::default();
        // Whether the key is already there decides whether an undo takes it off.
        // Unknown (the query failed) counts as there: never remove what may predate us.
        let had_key =
            match c.call("user.query", vec![json!([["username", "=", s.username], ["local", "=", true]])]).await {
                Ok(Value::Array(users)) => users.first().is_some_and(|u| {
                    let want = key_body(public_key);
                    u["sshpubkey"].as_str().unwrap_or("").lines().any(|l| want.is_some() && key_body(l) == want)
                }),
                Ok(_) => false,
                Err(_) => true,
            };
        let pair = c
            .call("keychaincredential.ssh_pair", vec![json!({"remote_hostname": "any-host", "username": s.username, "public_key": public_key})])
            .await
            .map_err(|e| match e {
                ClientError::Remote { reason, .. } => ServiceError::call(
                    EFAULT,
                    format!(
                        "Semi-automatic SSH connection setup failed: {reason}\n\nPlease make sure that home directory for {} user on the remote system exists and is writeable.",
                        s.username
                    ),
                ),
                other => ServiceError::call(EFAULT, format!("Semi-automatic SSH connection setup failed: {other}")),
            })?;
        if !had_key {
            changes.key_added = Some(public_key.to_string());
        }
        let result = async {
            let port = pair["port"].as_i64().ok_or_else(|| {
                ServiceError::call(
                    EFAULT,
                    format!("Semi-automatic SSH connection setup failed: the remote returned no SSH port ({pair})"),
                )
            })?;
            let host_key = pair["host_key"].as_str().unwrap_or("").to_string();
            let upd_err = |e: ClientError| {
                ServiceError::call(EFAULT, format!("Error updating remote user attributes: {}", remote_reason(&e)))
            };
            let user = c
                .call(
                    "user.query",
                    vec![json!([["username", "=", s.username], ["local", "=", true]]), json!({"get": true})],
                )
                .await
                .map_err(upd_err)?;
            changes.user_id = Some(user["id"].clone());
            let mut update = serde_json::Map::new();
            if user["shell"] == "/usr/sbin/nologin" {
                update.insert("shell".into(), json!("/usr/bin/bash"));
            }
            if s.sudo {
                let mut cmds: Vec<Value> = user["sudo_commands_nopasswd"].as_array().cloned().unwrap_or_default();
                if !cmds.iter().any(|c| c == "ALL" || c == "/usr/sbin/zfs") {
                    cmds.push(json!("/usr/sbin/zfs"));
                    update.insert("sudo_commands_nopasswd".into(), Value::Array(cmds));
                }
            }
            c.call("user.update", vec![user["id"].clone(), Value::Object(update.clone())]).await.map_err(upd_err)?;
            for k in update.keys() {
                changes.restore.insert(k.clone(), user[k].clone());
            }
            // Trust what the remote reports now, not that it accepted the
            // update: a login shell that refuses commands fails every backup.
            if update.contains_key("shell") {
                let now = c.call("user.get_instance", vec![user["id"].clone()]).await.map_err(upd_err)?;
                if now["shell"] == "/usr/sbin/nologin" {
                    return Err(ServiceError::call(
                        EFAULT,
                        format!(
                            "Error updating remote user attributes: the remote account {} still has the login shell \
                             /usr/sbin/nologin, so it cannot run commands; give it a shell on the remote system",
                            s.username
                        ),
                    ));
                }
            }
            Ok::<_, ServiceError>((port, host_key))
        }
        .await;
        match result {
            Ok((port, host_key)) => Ok((port, host_key, changes)),
            Err(e) => {
                changes.undo(c, &s.username).await;
                Err(e)
            }
        }
    }

    /// `keychaincredential.setup_ssh_connection` (reference §2.10). Names are
    /// checked first; a key pair generated here is removed again on failure.
    pub async fn setup_ssh_connection(
        &self,
        connection_name: &str,
        key: KeyChoice,
        kind: SetupKind,
    ) -> Result<Value, ServiceError> {
        const S: &str = "setup_ssh_connection";
        let cached = self.keychain_entries()?;
        let taken = |n: &str| cached.names.contains_key(n);
        let mut errs = keyhaven_core::ValidationErrors::new();
        match &key {
            KeyChoice::Generate { name, .. } if taken(name) => {
                errs.add(format!("{S}.private_key.name"), "Is already in use by another SSH Key pair")
            }
            KeyChoice::Existing(id) if !cached.contains(*id) => {
                errs.add(format!("{S}.private_key.existing_key_id"), "SSH Key Pair not found")
            }
            _ => {}
        }
        if taken(connection_name) {
            errs.add(format!("{S}.connection_name"), "Is already in use by another Keychain Credential");
        }
        drop(cached);
        errs.check()?;
        let (key_id, generated) = match key {
            KeyChoice::Generate { name, options } => (self.create_generated_key(&name, options).await?.0, true),
            KeyChoice::Existing(id) => {
                let e = self.keychain_get(id).map_err(|_| ServiceError::call(ENOENT, "Credential does not exist"))?;
                if e["type"] != SSH_KEY_PAIR {
                    return Err(ServiceError::call(EINVAL, "Credential is not of type SSH_KEY_PAIR"));
                }
                (id, false)
            }
        };
        let r = match kind {
            SetupKind::SemiAutomatic(s) => self.remote_semiautomatic_setup(connection_name, key_id, &s).await,
            SetupKind::Manual(m) => {
                let conn = ConnectionInput {
                    host: m.host,
                    port: m.port,
                    username: m.username,
                    private_key: key_id,
                    remote_host_key: m.remote_host_key,
                    connect_timeout: m.connect_timeout,
                };
                self.keychain_create(connection_name, AttributesInput::Connection(conn), CREATE).await
            }
        };
        if r.is_err() && generated {
            if let Err(e) = self.keychain_delete(key_id, false) {
                tracing::error!("could not remove the key pair generated for {connection_name}: {e}");
            }
        }
        r
    }
}

/// What re-pairing did, besides updating the connection.
pub struct RePairOutcome {
    pub connection: Value,
    /// The key pair the connection used before, when a new one replaced it.
    pub old_key_pair: Option<i64>,
    /// Whether the old public key was taken off the remote account.
    pub old_key_removed_from_remote: bool,
    /// Why it was not, when removal was asked for and did not happen.
    pub old_key_kept_because: Option<String>,
}

impl App {
    /// `keychaincredential.re_pair_ssh_connection` (keyhaven extension): pair an
    /// existing connection again through the remote's API, optionally with a
    /// new key pair (key rotation). The new key must log in before the
    /// connection switches to it and before the old key leaves the remote;
    /// any failure restores the connection and removes a generated key pair.
    pub async fn re_pair_ssh_connection(
        &self,
        id: i64,
        s: &SemiAutomatic,
        new_key: Option<(String, keys::GenerateOptions)>,
        remove_old_key: bool,
    ) -> Result<RePairOutcome, ServiceError> {
        const S: &str = "keychain_re_pair_ssh_connection";
        let conn = self.keychain_get(id)?;
        if conn["type"] != super::keychain::SSH_CREDENTIALS {
            return Err(ServiceError::field(format!("{S}.id"), format!("Credential {id} is not an SSH connection")));
        }
        let name = conn["name"].as_str().unwrap_or_default().to_string();
        let old_attrs = conn["attributes"].clone();
        let old_key_id = old_attrs["private_key"].as_i64().unwrap_or_default();
        let old_public = self
            .keychain_get(old_key_id)
            .ok()
            .and_then(|k| k["attributes"]["public_key"].as_str().map(|p| p.trim().to_string()));
        if let Some((key_name, _)) = &new_key {
            if self.keychain_entries()?.names.contains_key(key_name.as_str()) {
                return Err(ServiceError::field(
                    format!("{S}.new_key.name"),
                    "Is already in use by another Keychain Credential",
                ));
            }
        } else if !matches!(self.keypair_private_key(old_key_id), Ok(Some(k)) if !k.trim().is_empty()) {
            return Err(ServiceError::call(
                ENOENT,
                format!("The key pair of {name} has no private key; re-pair with a new key instead"),
            ));
        }

        let mut c = connect_remote(s).await?;
        let (key_id, public_key) = match new_key {
            Some((key_name, options)) => self.create_generated_key(&key_name, options).await?,
            None => (old_key_id, old_public.clone().unwrap_or_default()),
        };
        let rotated = key_id != old_key_id;
        let discard_new_key = |why: &str| {
            if rotated {
                if let Err(e) = self.keychain_delete(key_id, false) {
                    tracing::error!("could not remove the key pair generated to re-pair {name} ({why}): {e}");
                }
            }
        };

        let paired = self.pair_with(&mut c, &public_key, s).await;
        let (port, host_key, changes) = match paired {
            Ok(p) => p,
            Err(e) => {
                c.close().await;
                discard_new_key("pairing failed");
                return Err(e);
            }
        };
        let updated = paired_connection(s, port, &host_key, key_id);
        let schema = "keychain_credential_update";
        let connection = match self.keychain_update(id, None, Some(AttributesInput::Connection(updated)), schema).await
        {
            Ok(e) => e,
            Err(e) => {
                changes.undo(&mut c, &s.username).await;
                c.close().await;
                discard_new_key("updating the connection failed");
                return Err(e);
            }
        };
        // The new key must work before anything old goes away.
        let test = self
            .test_ssh_connection(id, None)
            .await
            .unwrap_or_else(|e| json!({"ok": false, "stage": "connect", "error": e.to_string()}));
        if test["ok"] != json!(true) {
            let old = ConnectionInput {
                host: old_attrs["host"].as_str().unwrap_or_default().to_string(),
                port: old_attrs["port"].as_i64().unwrap_or(22),
                username: old_attrs["username"].as_str().unwrap_or_default().to_string(),
                private_key: old_key_id,
                remote_host_key: old_attrs["remote_host_key"].as_str().unwrap_or_default().to_string(),
                connect_timeout: old_attrs["connect_timeout"].as_i64().unwrap_or(10),
            };
            let restore = self.keychain_update(id, None, Some(AttributesInput::Connection(old)), schema).await;
            if let Err(e) = restore {
                tracing::error!("could not restore connection {name} after a failed re-pair: {e}");
            }
            changes.undo(&mut c, &s.username).await;
            c.close().await;
            discard_new_key("the new key did not log in");
            return Err(ServiceError::call(
                EFAULT,
                format!(
                    "Re-pairing {name} failed: the remote accepted the key but logging in with it did not work \
                     (stage {}: {}). The connection is unchanged",
                    test["stage"].as_str().unwrap_or("?"),
                    test["error"].as_str().unwrap_or("unknown error")
                ),
            ));
        }

        let mut out = RePairOutcome {
            connection,
            old_key_pair: rotated.then_some(old_key_id),
            old_key_removed_from_remote: false,
            old_key_kept_because: None,
        };
        if rotated && remove_old_key {
            // The old key was authorized for the connection's previous account;
            // it can only be taken off through this session when that account
            // is on the host just paired with.
            let old_user = old_attrs["username"].as_str().unwrap_or_default().to_string();
            let old_host = old_attrs["host"].as_str().unwrap_or_default().to_lowercase();
            let host = url_host(&s.url);
            let cached = self.keychain_entries()?;
            let others: Vec<String> = cached
                .connection_keys
                .iter()
                .filter(|(c, k)| **k == old_key_id && **c != id)
                .filter_map(|(c, _)| cached.get(*c).and_then(|e| e["name"].as_str().map(str::to_string)))
                .collect();
            drop(cached);
            out.old_key_kept_because = if !others.is_empty() {
                Some(format!("other connections still use the old key pair ({})", others.join(", ")))
            } else if old_host != host {
                Some(format!(
                    "the old key was authorized on {old_host}, not on {host} (the address paired with now); \
                     remove it there yourself"
                ))
            } else if old_public.is_none() {
                Some("the old key pair has no public key".into())
            } else {
                None
            };
            if out.old_key_kept_because.is_none() {
                let old = old_public.as_deref().unwrap_or_default();
                match remove_remote_key(&mut c, &old_user, old).await {
                    Ok(true) => out.old_key_removed_from_remote = true,
                    Ok(false) => {
                        out.old_key_kept_because =
                            Some(format!("it was not among the authorized keys of {old_user} on {host}"))
                    }
                    Err(e) => out.old_key_kept_because = Some(format!("removing it from {old_user} failed: {e}")),
                }
            }
        }
        c.close().await;
        Ok(out)
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

/// Take `public_key` (compared by type and base64) off the remote account's
/// authorized keys through its API. `Ok(false)` when it was not there.
async fn remove_remote_key(c: &mut RpcClient, username: &str, public_key: &str) -> Result<bool, String> {
    let target = key_body(public_key).ok_or("the key is not a valid public key")?;
    let user = c
        .call("user.query", vec![json!([["username", "=", username], ["local", "=", true]]), json!({"get": true})])
        .await
        .map_err(|e| remote_reason(&e))?;
    let current = user["sshpubkey"].as_str().unwrap_or("");
    let kept: Vec<&str> = current.lines().filter(|l| key_body(l).as_deref() != Some(target.as_str())).collect();
    if kept.len() == current.lines().count() {
        return Ok(false);
    }
    let text = if kept.iter().all(|l| l.trim().is_empty()) { Value::Null } else { json!(kept.join("\n") + "\n") };
    c.call("user.update", vec![user["id"].clone(), json!({"sshpubkey": text})]).await.map_err(|e| remote_reason(&e))?;
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
