//! The russh client: host-key discovery and connection tests.
//!
//! * [`scan_host_keys`] is keyhaven's `ssh-keyscan`: it resolves the host once, then opens
//!   one SSH connection per host-key family (Ed25519, ECDSA, RSA) in parallel. Each
//!   connection restricts the host-key algorithms to that family, records the key the server
//!   proves it holds during the key exchange and then refuses it, so nothing is ever
//!   authenticated. Families the server does not offer are skipped; the result is ordered
//!   Ed25519, ECDSA, RSA. When every connection fails, the most meaningful [`ScanError`]
//!   is returned (not an SSH server > connection refused > other > timeout).
//! * [`test_connection`] is "test this SSH connection": connect, check the presented host key
//!   against the pinned ones **before** authenticating, log in with the private key, run
//!   `true` and wait for its exit status. The [`TestReport`] says at which [`Stage`] it stopped
//!   and why, in words meant for an administrator.
//! * [`run_command`] shares that code path and returns the exit status and stdout of any
//!   command.
//!
//! Timeouts: the scan (name resolution and every connection) finishes within `timeout`.
//! A connection test allows `timeout` for resolving, connecting and the key exchange, and
//! `timeout` again for authentication and for the command each.
//!
//! All connections use `nodelay` (Nagle off), which saves about 40 ms per round trip.
//! Error messages never contain key material (fingerprints and key types only).
//!
//! This module knows nothing about API types: callers pass plain values.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use russh::client::{self, Handle};
use russh::keys::ssh_key::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{AlgorithmKind, ChannelMsg, Disconnect, MethodKind, Preferred};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// How many bytes of the server's first output are kept to tell an SSH server from
/// something else.
const SNIFF_MAX: usize = 512;
/// How much of the remote command's stderr is quoted in an error.
const STDERR_QUOTE_MAX: usize = 300;

// ---------------------------------------------------------------------------
// Host-key scan
// ---------------------------------------------------------------------------

/// One host key offered by a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScannedKey {
    /// `ssh-ed25519`, `ecdsa-sha2-nistp256` (384, 521) or `ssh-rsa`.
    pub key_type: String,
    /// The key blob in base64, as in a `.pub` file.
    pub base64: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

impl ScannedKey {
    /// `"type base64"`, the form of one `remote_host_key` line.
    pub fn line(&self) -> String {
        format!("{} {}", self.key_type, self.base64)
    }

    fn from_public_key(key: &PublicKey) -> Option<ScannedKey> {
        let (key_type, base64) = key_line(key)?;
        Some(ScannedKey { key_type, base64, fingerprint: fingerprint(key) })
    }
}

/// Why a host-key scan (or the connect step of a connection test) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// Nothing listens on that port (TCP RST).
    #[error("Connection refused by {host} port {port}: is sshd running there and is the port right?")]
    Refused { host: String, port: u16 },
    /// The host name could not be resolved.
    #[error("Cannot resolve host name \"{host}\": {detail}. Check the spelling, or use an IP address")]
    Resolve { host: String, detail: String },
    /// No SSH answer within the timeout.
    #[error("SSH timeout")]
    Timeout,
    /// Something answered, but not with an SSH identification string.
    #[error("Not an SSH server: {detail}")]
    NotSsh { detail: String },
    /// Anything else (network unreachable, reset, handshake failure, ...).
    #[error("{0}")]
    Other(String),
}

impl ScanError {
    /// Higher is more telling; used to pick one error when every connection failed.
    fn rank(&self) -> u8 {
        match self {
            ScanError::NotSsh { .. } => 5,
            ScanError::Resolve { .. } => 4,
            ScanError::Refused { .. } => 3,
            ScanError::Other(_) => 2,
            ScanError::Timeout => 1,
        }
    }
}

/// The host-key families scanned, in result order.
#[derive(Debug, Clone, Copy)]
enum Family {
    Ed25519,
    Ecdsa,
    Rsa,
}

impl Family {
    fn algorithms(self) -> Vec<Algorithm> {
        match self {
            Family::Ed25519 => vec![Algorithm::Ed25519],
            Family::Ecdsa => vec![
                Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 },
                Algorithm::Ecdsa { curve: EcdsaCurve::NistP384 },
                Algorithm::Ecdsa { curve: EcdsaCurve::NistP521 },
            ],
            Family::Rsa => rsa_algorithms(),
        }
    }
}

fn rsa_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
        Algorithm::Rsa { hash: Some(HashAlg::Sha256) },
        // Servers older than OpenSSH 7.2 only know the SHA-1 signature.
        Algorithm::Rsa { hash: None },
    ]
}

/// Discover the host keys of `host:port`, like `ssh-keyscan -p port host` (Ed25519, ECDSA
/// and RSA; ordered that way). `host` may be a name, an IPv4 address or an IPv6 address with
/// or without brackets. The whole scan finishes within about `timeout`.
pub async fn scan_host_keys(host: &str, port: u16, timeout: Duration) -> Result<Vec<ScannedKey>, ScanError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let host = strip_brackets(host);
    let addrs = resolve(host, port, deadline).await?;
    let target = Target { host, port, addrs: &addrs };

    let (ed, ec, rsa) = tokio::join!(
        scan_family(&target, Family::Ed25519, deadline),
        scan_family(&target, Family::Ecdsa, deadline),
        scan_family(&target, Family::Rsa, deadline),
    );

    let mut keys = Vec::new();
    let mut best_err: Option<ScanError> = None;
    let mut any_connected = false;
    for (family, result) in [(Family::Ed25519, ed), (Family::Ecdsa, ec), (Family::Rsa, rsa)] {
        match result {
            Ok(Some(key)) => {
                any_connected = true;
                keys.push(key);
            }
            Ok(None) => {
                any_connected = true;
                tracing::debug!(host, port, ?family, "host key family not offered");
            }
            Err(e) => {
                tracing::debug!(host, port, ?family, error = %e, "host key scan connection failed");
                if best_err.as_ref().is_none_or(|b| e.rank() > b.rank()) {
                    best_err = Some(e);
                }
            }
        }
    }
    if !keys.is_empty() {
        return Ok(keys);
    }
    if !any_connected {
        if let Some(e) = best_err {
            return Err(e);
        }
    }
    Err(ScanError::Other(format!(
        "{} offers no host key of a supported type (ssh-ed25519, ecdsa-sha2-nistp256/384/521, \
         ssh-rsa)",
        target.display()
    )))
}

/// One scan connection: `Ok(None)` when the server has no key of that family.
async fn scan_family(
    target: &Target<'_>,
    family: Family,
    deadline: tokio::time::Instant,
) -> Result<Option<ScannedKey>, ScanError> {
    let seen = Arc::new(Mutex::new(None));
    let handler = KeyHandler { seen: seen.clone(), accept: Vec::new() };
    let result = open(target, family.algorithms(), handler, deadline).await;
    let presented = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(key) = presented {
        // The handler refused the key, so the connection ended with an error: expected.
        return match ScannedKey::from_public_key(&key) {
            Some(k) => Ok(Some(k)),
            None => Err(ScanError::Other(format!("{} presented a host key that cannot be encoded", target.display()))),
        };
    }
    match result {
        Ok(handle) => {
            // Cannot happen (the handler never accepts without recording), but be tidy.
            let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
            Ok(None)
        }
        Err(ConnectError::Scan(e)) => Err(e),
        Err(ConnectError::Ssh(russh::Error::NoCommonAlgo { kind: AlgorithmKind::Key, .. })) => Ok(None),
        Err(ConnectError::Ssh(e)) => {
            Err(ScanError::Other(format!("SSH handshake with {} failed: {e}", target.display())))
        }
    }
}

// ---------------------------------------------------------------------------
// Connection test
// ---------------------------------------------------------------------------

/// What to connect to and how to log in. `Debug` does not show the private key,
/// and it cannot be cloned: the key has one owner.
pub struct TestTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    /// The private key (OpenSSH format; PEM/PKCS#8 are accepted too), unencrypted.
    pub private_key_openssh: Zeroizing<String>,
    /// Pinned host keys as `(type, base64)`, e.g. `("ssh-ed25519", "AAAA…")`.
    pub pinned_host_keys: Vec<(String, String)>,
    pub timeout: Duration,
}

impl fmt::Debug for TestTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("private_key_openssh", &"<redacted>")
            .field("pinned_host_keys", &self.pinned_host_keys)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The step a connection test reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Resolving, TCP connect, SSH identification and key exchange.
    Connect,
    /// Checking the presented host key against the pinned ones.
    HostKey,
    /// Public-key authentication.
    Auth,
    /// Running the command.
    Exec,
}

impl Stage {
    /// `"connect"`, `"host_key"`, `"auth"` or `"exec"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::HostKey => "host_key",
            Stage::Auth => "auth",
            Stage::Exec => "exec",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a connection test spent its time, in milliseconds (0.1 ms steps):
/// what an admin needs to tell a slow network from a slow login on the remote.
/// The stage where a test stopped shows the time until it stopped; stages
/// not reached are 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
    /// Resolve, TCP connect, key exchange and the host-key check.
    pub connect: f64,
    /// Public-key authentication.
    pub auth: f64,
    /// Opening the session channel.
    pub channel: f64,
    /// From the exec request to the command's exit status (on the remote:
    /// its session setup, e.g. PAM, then the command itself).
    pub command: f64,
}

/// The outcome of [`test_connection`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestReport {
    pub ok: bool,
    /// Where the test stopped; [`Stage::Exec`] when `ok`.
    pub stage: Stage,
    /// `SHA256:…` of the host key the server presented, if it got that far.
    pub host_key_fingerprint: Option<String>,
    /// Wall time of the whole test.
    pub latency_ms: u64,
    /// What went wrong and what to do about it; `None` when `ok`.
    pub error: Option<String>,
    /// Time per stage reached (0 for stages not reached).
    pub stages_ms: StageTimes,
}

/// Test an SSH connection: connect, verify the host key against the pinned keys (before
/// authenticating), log in with the private key and run `true`. Never panics or errors: the
/// report says where it stopped.
pub async fn test_connection(t: &TestTarget) -> TestReport {
    let start = Instant::now();
    let mut times = StageTimes::default();
    let result = session(t, "true", &mut times).await;
    match result {
        Ok(out) => {
            if out.exit_status == Some(0) {
                TestReport {
                    ok: true,
                    stage: Stage::Exec,
                    host_key_fingerprint: Some(out.host_key_fingerprint),
                    latency_ms: elapsed_ms(start),
                    error: None,
                    stages_ms: times,
                }
            } else {
                let what = match (&out.exit_status, &out.exit_signal) {
                    (Some(code), _) => format!("exited with status {code}"),
                    (None, Some(sig)) => format!("was killed by signal {sig}"),
                    (None, None) => "ended without an exit status".to_string(),
                };
                let stderr = quote_stderr(&out.stderr);
                TestReport {
                    ok: false,
                    stage: Stage::Exec,
                    host_key_fingerprint: Some(out.host_key_fingerprint),
                    latency_ms: elapsed_ms(start),
                    stages_ms: times,
                    error: Some(format!(
                        "Logged in as {user}, but the test command `true` {what}{stderr}. \
                         Check that {user} has a working login shell on the remote (not nologin) \
                         and no ForceCommand restricting it",
                        user = t.username
                    )),
                }
            }
        }
        Err(f) => f.into_report(start, times),
    }
}

/// Log in like [`test_connection`] and run `command`; returns its exit status and stdout
/// (stdout is collected in memory). A failure is reported as a [`TestReport`] with the stage
/// where it stopped; a command killed by a signal fails at [`Stage::Exec`].
pub async fn run_command(t: &TestTarget, command: &str) -> Result<(u32, Vec<u8>), TestReport> {
    let start = Instant::now();
    let mut times = StageTimes::default();
    match session(t, command, &mut times).await {
        Ok(out) => match out.exit_status {
            Some(code) => Ok((code, out.stdout)),
            None => {
                let what = match out.exit_signal {
                    Some(sig) => format!("was killed by signal {sig}"),
                    None => "ended without an exit status".to_string(),
                };
                Err(TestReport {
                    ok: false,
                    stage: Stage::Exec,
                    host_key_fingerprint: Some(out.host_key_fingerprint),
                    latency_ms: elapsed_ms(start),
                    error: Some(format!("The remote command {what}{}", quote_stderr(&out.stderr))),
                    stages_ms: times,
                })
            }
        },
        Err(f) => Err(f.into_report(start, times)),
    }
}

struct SessionOutput {
    host_key_fingerprint: String,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

struct Failure {
    stage: Stage,
    host_key_fingerprint: Option<String>,
    message: String,
}

impl Failure {
    fn new(stage: Stage, fp: Option<&str>, message: impl fmt::Display) -> Failure {
        Failure { stage, host_key_fingerprint: fp.map(str::to_string), message: message.to_string() }
    }

    fn into_report(self, start: Instant, stages_ms: StageTimes) -> TestReport {
        TestReport {
            ok: false,
            stage: self.stage,
            host_key_fingerprint: self.host_key_fingerprint,
            latency_ms: elapsed_ms(start),
            error: Some(self.message),
            stages_ms,
        }
    }
}

const REPIN_HINT: &str = "If the host key changed legitimately, discover it again and re-pin it \
                          in the connection's Remote Host Key";

/// The shared path of [`test_connection`] and [`run_command`].
async fn session(t: &TestTarget, command: &str, times: &mut StageTimes) -> Result<SessionOutput, Failure> {
    let mut clock = Instant::now();
    let mut lap = move || {
        let ms = ms_since(clock);
        clock = Instant::now();
        ms
    };
    let host = strip_brackets(t.host.trim());
    let port = t.port;

    // Pinned keys and the host-key algorithms they allow.
    let pinned: Vec<(String, String)> = t
        .pinned_host_keys
        .iter()
        .map(|(k, b)| (k.trim().to_string(), b.trim().to_string()))
        .filter(|(k, b)| !k.is_empty() && !b.is_empty())
        .collect();
    if pinned.is_empty() {
        return Err(Failure::new(
            Stage::HostKey,
            None,
            format!(
                "No host key is pinned for {host} port {port}: discover the remote host key first \
                 (Discover Remote Host Key / ssh-keyscan) and pin it in the connection's Remote \
                 Host Key"
            ),
        ));
    }
    let algorithms = pinned_algorithms(&pinned);
    if algorithms.is_empty() {
        let types: Vec<&str> = pinned.iter().map(|(k, _)| k.as_str()).collect();
        return Err(Failure::new(
            Stage::HostKey,
            None,
            format!(
                "None of the pinned host key types ({}) can be checked: pin an ssh-ed25519, \
                 ecdsa-sha2-nistp256/384/521 or ssh-rsa host key",
                types.join(", ")
            ),
        ));
    }

    // Parse the private key before touching the network; its error is reported at the auth
    // stage, after the host key has been checked.
    let private_key = parse_private_key(&t.private_key_openssh);

    // Connect, key exchange, host-key check.
    let deadline = tokio::time::Instant::now() + t.timeout;
    let addrs = resolve(host, port, deadline).await.map_err(|e| {
        times.connect = lap();
        Failure::new(Stage::Connect, None, connect_message(&e, host, port, t.timeout))
    })?;
    let target = Target { host, port, addrs: &addrs };
    let seen = Arc::new(Mutex::new(None));
    let handler = KeyHandler { seen: seen.clone(), accept: pinned.clone() };
    let result = open(&target, algorithms, handler, deadline).await;
    times.connect = lap();
    let presented: Option<PublicKey> = seen.lock().unwrap_or_else(|p| p.into_inner()).take();
    let presented_fp = presented.as_ref().map(fingerprint);
    let fp = presented_fp.as_deref();
    let mut handle = match result {
        Ok(handle) => handle,
        Err(e) => {
            return Err(match (e, &presented) {
                (_, Some(key)) => Failure::new(Stage::HostKey, fp, mismatch_message(&target, key, &pinned)),
                (ConnectError::Ssh(russh::Error::NoCommonAlgo { kind: AlgorithmKind::Key, theirs, .. }), None) => {
                    let types: Vec<&str> = pinned.iter().map(|(k, _)| k.as_str()).collect();
                    Failure::new(
                        Stage::HostKey,
                        None,
                        format!(
                            "{} offers no host key of the pinned type(s) {} (it offers {}). {REPIN_HINT}",
                            target.display(),
                            types.join(", "),
                            if theirs.is_empty() { "none".to_string() } else { theirs.join(", ") }
                        ),
                    )
                }
                (ConnectError::Scan(e), None) => {
                    Failure::new(Stage::Connect, None, connect_message(&e, host, port, t.timeout))
                }
                (ConnectError::Ssh(e), None) => {
                    Failure::new(Stage::Connect, None, format!("SSH handshake with {} failed: {e}", target.display()))
                }
            });
        }
    };
    let fp = fp.unwrap_or_default().to_string();
    let fpo = Some(fp.as_str());

    let out = async {
        // Authentication.
        let key = private_key.map_err(|m| Failure::new(Stage::Auth, fpo, m))?;
        let user = t.username.as_str();
        let auth = tokio::time::timeout(t.timeout, authenticate(&mut handle, user, key)).await;
        times.auth = lap();
        match auth {
            Err(_) => {
                return Err(Failure::new(
                    Stage::Auth,
                    fpo,
                    format!("Authentication as {user} timed out after {}", secs(t.timeout)),
                ));
            }
            Ok(Err(m)) => return Err(Failure::new(Stage::Auth, fpo, m)),
            Ok(Ok(())) => {}
        }

        // The command.
        match tokio::time::timeout(t.timeout, exec(&handle, command, times)).await {
            Err(_) => Err(Failure::new(
                Stage::Exec,
                fpo,
                format!("Logged in as {user}, but the command did not finish within {}", secs(t.timeout)),
            )),
            Ok(Err(m)) => Err(Failure::new(Stage::Exec, fpo, format!("Logged in as {user}, but {m}"))),
            Ok(Ok(mut out)) => {
                out.host_key_fingerprint = fp.clone();
                Ok(out)
            }
        }
    }
    .await;

    let _ = handle.disconnect(Disconnect::ByApplication, "", "en").await;
    out
}

/// Milliseconds since `t`, in 0.1 ms steps.
fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
}

/// Why public-key authentication did not log in (the message of the report's `auth` stage).
#[derive(Debug, thiserror::Error)]
enum AuthError {
    #[error("The connection failed before authentication: {0}")]
    BeforeAuth(russh::Error),
    #[error(
        "The server accepted the {key} for user {user} but requires a further authentication method \
         ({methods}), which keyhaven cannot provide"
    )]
    Partial { key: String, user: String, methods: String },
    #[error(
        "The server does not accept public key authentication for user {user} (it offers: {methods}): \
         enable key logins for {user} on the remote"
    )]
    NoPublicKey { user: String, methods: String },
    #[error(
        "The server refused the {key} for user {user}: add the public key to ~/.ssh/authorized_keys of {user} \
         on the remote (and check that the server allows key logins for {user}, e.g. PermitRootLogin / AllowUsers)"
    )]
    Refused { key: String, user: String },
    #[error("Authentication as {0} failed")]
    Failed(String),
    #[error("The connection failed during authentication as {user}: {source}")]
    During { user: String, source: russh::Error },
}

/// Public-key authentication.
async fn authenticate(handle: &mut Handle<KeyHandler>, user: &str, key: PrivateKey) -> Result<(), AuthError> {
    let key_desc = format!("{} key {}", key.algorithm().as_str(), key.public_key().fingerprint(HashAlg::Sha256));
    let hash = if key.algorithm().is_rsa() {
        match handle.best_supported_rsa_hash().await {
            Ok(Some(h)) => h,
            Ok(None) => None,
            Err(e) => return Err(AuthError::BeforeAuth(e)),
        }
    } else {
        None
    };
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
    let user_s = user.to_string();
    match handle.authenticate_publickey(user, key).await {
        Ok(r) if r.success() => Ok(()),
        Ok(russh::client::AuthResult::Failure { remaining_methods, partial_success }) => {
            if partial_success {
                Err(AuthError::Partial { key: key_desc, user: user_s, methods: method_list(&remaining_methods) })
            } else if !remaining_methods.is_empty() && !remaining_methods.contains(&MethodKind::PublicKey) {
                Err(AuthError::NoPublicKey { user: user_s, methods: method_list(&remaining_methods) })
            } else {
                Err(AuthError::Refused { key: key_desc, user: user_s })
            }
        }
        Ok(_) => Err(AuthError::Failed(user_s)),
        Err(source) => Err(AuthError::During { user: user_s, source }),
    }
}

fn method_list(m: &russh::MethodSet) -> String {
    let names: Vec<&str> = m.iter().map(<&str>::from).collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// Why the command did not run after a login; completes the sentence "Logged in as X, but …".
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("the server refused to open a session channel: {0}")]
    Channel(russh::Error),
    #[error("the command could not be sent: {0}")]
    Send(russh::Error),
    #[error("the server refused to run a command (exec request denied): the account may be restricted")]
    Denied,
    #[error("the server refused to open a session channel ({0})")]
    OpenFailure(String),
}

/// Open a session channel, run `command`, collect stdout, stderr (capped) and the exit status.
async fn exec(handle: &Handle<KeyHandler>, command: &str, times: &mut StageTimes) -> Result<SessionOutput, ExecError> {
    let clock = Instant::now();
    let opened = handle.channel_open_session().await;
    times.channel = ms_since(clock);
    let mut channel = opened.map_err(ExecError::Channel)?;
    let clock = Instant::now();
    channel.exec(true, command).await.map_err(ExecError::Send)?;
    let mut out = SessionOutput {
        host_key_fingerprint: String::new(),
        exit_status: None,
        exit_signal: None,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, .. } => {
                let room = STDERR_QUOTE_MAX.saturating_sub(out.stderr.len());
                out.stderr.extend_from_slice(&data[..room.min(data.len())]);
            }
            ChannelMsg::ExitStatus { exit_status } => {
                out.exit_status = Some(exit_status);
                times.command = ms_since(clock);
            }
            ChannelMsg::ExitSignal { signal_name, .. } => out.exit_signal = Some(format!("{signal_name:?}")),
            ChannelMsg::Failure => return Err(ExecError::Denied),
            ChannelMsg::OpenFailure(reason) => return Err(ExecError::OpenFailure(format!("{reason:?}"))),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    if times.command == 0.0 {
        times.command = ms_since(clock);
    }
    Ok(out)
}

/// Host-key algorithms allowed by the pinned keys, in pinned order, deduplicated.
fn pinned_algorithms(pinned: &[(String, String)]) -> Vec<Algorithm> {
    let mut out: Vec<Algorithm> = Vec::new();
    for (key_type, _) in pinned {
        let algs = match Algorithm::new(key_type) {
            Ok(Algorithm::Ed25519) => vec![Algorithm::Ed25519],
            Ok(a @ Algorithm::Ecdsa { .. }) => vec![a],
            Ok(Algorithm::Rsa { .. }) => rsa_algorithms(),
            _ => Vec::new(),
        };
        for a in algs {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

fn mismatch_message(target: &Target<'_>, presented: &PublicKey, pinned: &[(String, String)]) -> String {
    let presented_type = presented.algorithm().as_str().to_string();
    let expected: Vec<String> = pinned
        .iter()
        .map(|(k, b)| match PublicKey::from_openssh(&format!("{k} {b}")) {
            Ok(p) => format!("{k} {}", fingerprint(&p)),
            Err(_) => format!("{k} (unreadable pinned key)"),
        })
        .collect();
    format!(
        "HOST KEY MISMATCH for {}: the server presented the {presented_type} key {}, but the \
         connection expects {}. Authentication was not attempted. {REPIN_HINT}; otherwise someone \
         may be intercepting the connection",
        target.display(),
        fingerprint(presented),
        expected.join(" or ")
    )
}

fn connect_message(e: &ScanError, host: &str, port: u16, timeout: Duration) -> String {
    match e {
        ScanError::Timeout => format!(
            "SSH timeout: {} did not complete the SSH handshake within {} (host down, \
             firewalled, or wrong address?)",
            display_host_port(host, port),
            secs(timeout)
        ),
        other => other.to_string(),
    }
}

/// Why a connection's private key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrivateKeyError {
    #[error("The connection has no private key")]
    Missing,
    #[error("The private key cannot be read")]
    Unreadable,
    #[error("The key pair has no private key")]
    PublicOnly,
    #[error("The private key cannot be used: {0}")]
    Unusable(String),
}

/// Read the private key: OpenSSH first, then any format keyhaven can import.
pub fn parse_private_key(text: &str) -> Result<PrivateKey, PrivateKeyError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(PrivateKeyError::Missing);
    }
    if let Ok(k) = russh::keys::decode_secret_key(text, None) {
        return Ok(k);
    }
    match keyhaven_core::keys::validate_key_pair(Some(text), None, None) {
        Ok(v) => match v.private_key {
            Some(openssh) => PrivateKey::from_openssh(openssh.as_bytes()).map_err(|_| PrivateKeyError::Unreadable),
            None => Err(PrivateKeyError::PublicOnly),
        },
        Err(e) => Err(PrivateKeyError::Unusable(e.message)),
    }
}

// ---------------------------------------------------------------------------
// Shared plumbing: resolution, connect, the handler, banner sniffing
// ---------------------------------------------------------------------------

struct Target<'a> {
    host: &'a str,
    port: u16,
    addrs: &'a [SocketAddr],
}

impl Target<'_> {
    fn display(&self) -> String {
        display_host_port(self.host, self.port)
    }
}

fn display_host_port(host: &str, port: u16) -> String {
    format!("{host} port {port}")
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// Resolve once; the addresses are reused by every connection.
async fn resolve(host: &str, port: u16, deadline: tokio::time::Instant) -> Result<Vec<SocketAddr>, ScanError> {
    if host.is_empty() {
        return Err(ScanError::Resolve { host: String::new(), detail: "the host name is empty".to_string() });
    }
    match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err(ScanError::Resolve { host: host.to_string(), detail: "name resolution timed out".to_string() }),
        Ok(Err(e)) => Err(ScanError::Resolve { host: host.to_string(), detail: e.to_string() }),
        Ok(Ok(it)) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for a in it {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
            if addrs.is_empty() {
                Err(ScanError::Resolve { host: host.to_string(), detail: "no address found".to_string() })
            } else {
                Ok(addrs)
            }
        }
    }
}

enum ConnectError {
    /// Transport-level or identification failure.
    Scan(ScanError),
    /// The SSH handshake failed after a valid SSH identification (includes the handler's
    /// refusal of the host key, and "no common host key algorithm").
    Ssh(russh::Error),
}

fn client_config(algorithms: Vec<Algorithm>) -> Arc<client::Config> {
    Arc::new(client::Config {
        nodelay: true,
        preferred: Preferred { key: Cow::Owned(algorithms), ..Preferred::DEFAULT },
        ..Default::default()
    })
}

/// TCP connect (addresses in order) and SSH handshake, all before `deadline`.
async fn open(
    target: &Target<'_>,
    algorithms: Vec<Algorithm>,
    handler: KeyHandler,
    deadline: tokio::time::Instant,
) -> Result<Handle<KeyHandler>, ConnectError> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let attempt = async {
        let stream = tcp_connect(target).await.map_err(ConnectError::Scan)?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("set_nodelay failed: {e}");
        }
        let stream = SniffStream { inner: stream, seen: seen.clone(), done: false };
        client::connect_stream(client_config(algorithms), stream, handler).await.map_err(ConnectError::Ssh)
    };
    let result = tokio::time::timeout_at(deadline, attempt).await;
    let sniffed = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match result {
        Ok(Ok(handle)) => Ok(handle),
        Ok(Err(ConnectError::Scan(e))) => Err(ConnectError::Scan(e)),
        Ok(Err(ConnectError::Ssh(e))) => {
            if let Some(detail) = not_ssh_detail(target, &sniffed) {
                return Err(ConnectError::Scan(ScanError::NotSsh { detail }));
            }
            if !has_ssh_banner(&sniffed) {
                return Err(ConnectError::Scan(ScanError::Other(format!(
                    "{} closed the connection without sending an SSH identification string \
                     ({e}): is it an SSH server, and does sshd accept connections from here \
                     (MaxStartups, TCP wrappers, firewall)?",
                    target.display()
                ))));
            }
            Err(ConnectError::Ssh(e))
        }
        Err(_) => match not_ssh_detail(target, &sniffed) {
            Some(detail) => Err(ConnectError::Scan(ScanError::NotSsh { detail })),
            None => Err(ConnectError::Scan(ScanError::Timeout)),
        },
    }
}

async fn tcp_connect(target: &Target<'_>) -> Result<TcpStream, ScanError> {
    let mut refused = false;
    let mut last: Option<io::Error> = None;
    for addr in target.addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    refused = true;
                } else {
                    last = Some(e);
                }
            }
        }
    }
    match last {
        Some(e) if !refused => Err(ScanError::Other(format!("Cannot connect to {}: {e}", target.display()))),
        _ => Err(ScanError::Refused { host: target.host.to_string(), port: target.port }),
    }
}

fn has_ssh_banner(sniffed: &[u8]) -> bool {
    sniffed.split(|&b| b == b'\n').any(|l| l.starts_with(b"SSH-"))
}

/// `Some(detail)` when the peer sent something that is not an SSH identification.
fn not_ssh_detail(target: &Target<'_>, sniffed: &[u8]) -> Option<String> {
    if sniffed.is_empty() || has_ssh_banner(sniffed) {
        return None;
    }
    // A partial first line that could still become "SSH-…" is not conclusive.
    if !sniffed.contains(&b'\n') && b"SSH-".starts_with(&sniffed[..sniffed.len().min(4)]) {
        return None;
    }
    let first = sniffed.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let shown: String = first.escape_ascii().to_string().chars().take(80).collect();
    Some(format!("{} answered \"{shown}\" instead of an SSH identification string (wrong port?)", target.display()))
}

/// The client handler: records the presented host key and accepts it only if it is one of
/// `accept` (type and base64 equal). With an empty `accept` it refuses every key.
struct KeyHandler {
    seen: Arc<Mutex<Option<PublicKey>>>,
    accept: Vec<(String, String)>,
}

impl client::Handler for KeyHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, server_public_key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = server_public_key.public_key();
        let accepted = match key_line(&key) {
            Some((t, b)) => self.accept.iter().any(|(pt, pb)| *pt == t && *pb == b),
            None => false,
        };
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
        Ok(accepted)
    }
}

/// `(type, base64)` of a public key.
fn key_line(key: &PublicKey) -> Option<(String, String)> {
    let line = key.to_openssh().ok()?;
    let mut parts = line.split_whitespace();
    let t = parts.next()?.to_string();
    let b = parts.next()?.to_string();
    Some((t, b))
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// A TCP stream that keeps a copy of the first bytes the server sends.
struct SniffStream {
    inner: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
    done: bool,
}

impl AsyncRead for SniffStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.done {
            if let Poll::Ready(Ok(())) = r {
                let new = &buf.filled()[before..];
                let mut seen = this.seen.lock().unwrap_or_else(|p| p.into_inner());
                let take = SNIFF_MAX.saturating_sub(seen.len()).min(new.len());
                seen.extend_from_slice(&new[..take]);
                this.done = seen.len() >= SNIFF_MAX;
            }
        }
        r
    }
}

impl AsyncWrite for SniffStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{s:.1} s")
    }
}

fn quote_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        let one_line: String = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" / ");
        format!(" (remote said: \"{one_line}\")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names() {
        assert_eq!(Stage::Connect.as_str(), "connect");
        assert_eq!(Stage::HostKey.as_str(), "host_key");
        assert_eq!(Stage::Auth.as_str(), "auth");
        assert_eq!(Stage::Exec.as_str(), "exec");
    }

    #[test]
    fn brackets_are_stripped() {
        assert_eq!(strip_brackets("[::1]"), "::1");
        assert_eq!(strip_brackets("::1"), "::1");
        assert_eq!(strip_brackets("host"), "host");
    }

    #[test]
    fn pinned_types_map_to_algorithms() {
        let p = |t: &str| (t.to_string(), "AAAA".to_string());
        let algs = pinned_algorithms(&[p("ssh-rsa"), p("ssh-ed25519"), p("ssh-rsa"), p("ssh-dss")]);
        assert_eq!(algs.len(), 4);
        assert_eq!(algs[3], Algorithm::Ed25519);
        assert!(pinned_algorithms(&[p("bogus")]).is_empty());
    }

    #[test]
    fn banner_sniffing() {
        let t = Target { host: "h", port: 1, addrs: &[] };
        assert!(not_ssh_detail(&t, b"").is_none());
        assert!(not_ssh_detail(&t, b"SSH-2.0-OpenSSH_9.2\r\n").is_none());
        assert!(not_ssh_detail(&t, b"SS").is_none());
        assert!(not_ssh_detail(&t, b"hello\r\nSSH-2.0-x\r\n").is_none());
        let d = not_ssh_detail(&t, b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert!(d.contains("\"HTTP/1.1 400 Bad Request\""), "{d}");
    }

    #[test]
    fn debug_redacts_private_key() {
        let t = TestTarget {
            host: "h".into(),
            port: 22,
            username: "root".into(),
            private_key_openssh: Zeroizing::new("-----BEGIN OPENSSH PRIVATE KEY-----".into()),
            pinned_host_keys: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(!format!("{t:?}").contains("BEGIN"));
    }
}
