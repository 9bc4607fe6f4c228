//! The SSH service: `ssh.config` / `ssh.update`, host keys, the rendering of
//! `sshd_config`, and `service.*` control of the supervised sshd.
//!
//! Every change is rendered, checked with `sshd -t` and only then swapped in
//! and applied with SIGHUP; a refused configuration leaves the running sshd
//! and the current file untouched.
//!
//! The checks of `options` that need this machine — whether an account is
//! uid 0, whether a `Banner` file is safe to show to everyone — live here
//! ([`SystemFacts`], [`banner_problem`]); the rules themselves are in
//! `keyhaven_core::sshd_config`.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::users::UserData;
use super::App;
use crate::error::{ServiceError, EFAULT};
use keyhaven_core::keys::{self, GenerateOptions, KeyAlgorithm};
use keyhaven_core::sshd_config::{self, HostFacts, RenderContext, SshSettings};
use keyhaven_ssh::files;
use keyhaven_ssh::supervisor::{SshdError, SshdState, Supervisor};

const SETTINGS_KEY: &str = "ssh";
const SERVICE_KEY: &str = "service.ssh";

/// The stored `service.ssh` setting: whether sshd starts with the daemon.
#[derive(Serialize, Deserialize)]
struct ServiceRow {
    enable: bool,
}

/// Host key algorithms keyhaven generates, with their file stems and TrueNAS field names.
const HOST_KEYS: &[(&str, KeyAlgorithm, Option<u32>, &str)] = &[
    ("ssh-ed25519", KeyAlgorithm::Ed25519, None, "ed25519"),
    ("ecdsa-sha2-nistp256", KeyAlgorithm::Ecdsa, Some(256), "ecdsa"),
    ("ssh-rsa", KeyAlgorithm::Rsa, Some(3072), "rsa"),
];

pub fn sshd_dir(app: &App) -> PathBuf {
    app.config.data_dir.join("sshd")
}

/// Names of the system's network interfaces.
pub fn interfaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Addresses of one interface (link-local IPv6 as `addr%iface`).
fn interface_addresses(name: &str) -> Vec<String> {
    let mut out = vec![];
    // SAFETY: getifaddrs/freeifaddrs pairing; we only read the list.
    unsafe {
        let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy() != name {
                continue;
            }
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)).to_string());
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    if ip.segments()[0] & 0xffc0 == 0xfe80 {
                        out.push(format!("{ip}%{name}"));
                    } else {
                        out.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// The SSH service area's state: the supervised sshd and the lock that
/// serialises configuration changes (render, check, swap, reload). Reached
/// through [`App::sshd`].
pub struct SshdArea {
    supervisor: Supervisor,
    lock: tokio::sync::Mutex<()>,
}

impl SshdArea {
    pub fn new(supervisor: Supervisor) -> SshdArea {
        SshdArea { supervisor, lock: tokio::sync::Mutex::new(()) }
    }
}

/// The SSH service (`ssh.*`, `service.*` for `ssh`): settings, sshd_config,
/// host keys and the supervised sshd.
pub struct Sshd<'a> {
    app: &'a App,
}

impl<'a> Sshd<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Sshd { app }
    }

    /// The supervised OpenSSH sshd.
    pub fn supervisor(&self) -> &'a Supervisor {
        &self.app.sshd_area.supervisor
    }
    pub fn settings(&self) -> Result<SshSettings, ServiceError> {
        Ok(match self.app.store.setting_get(SETTINGS_KEY)? {
            Some(v) => serde_json::from_value(v).map_err(|e| ServiceError::internal("reading the SSH settings", e))?,
            None => SshSettings::default(),
        })
    }

    pub fn enabled(&self) -> Result<bool, ServiceError> {
        let row = self.app.store.setting_get(SERVICE_KEY)?;
        Ok(row.and_then(|v| ServiceRow::deserialize(&v).ok()).is_some_and(|r| r.enable))
    }

    /// Generate missing host keys (stored sealed) and write all of them for sshd.
    pub async fn ensure_host_keys(&self) -> Result<Vec<String>, ServiceError> {
        Ok(self.host_key_files().await?.0)
    }

    /// [`Sshd::ensure_host_keys`], also saying whether a file was rewritten.
    /// A key another node inserted first (the nodes started together) wins:
    /// this node's insert is refused as a conflict and it writes the
    /// stored one, so every node serves the same host keys.
    async fn host_key_files(&self) -> Result<(Vec<String>, bool), ServiceError> {
        let mut rewrote = false;
        let dir = sshd_dir(self.app);
        files::ensure_dir(&dir, 0o755).map_err(|e| ServiceError::internal("creating the sshd directory", e))?;
        let existing = self.app.store.host_keys_list()?;
        let mut paths = vec![];
        for (alg_name, alg, bits, stem) in HOST_KEYS {
            if !existing.iter().any(|k| k.algorithm == *alg_name) {
                let o = GenerateOptions { algorithm: *alg, bits: *bits, comment: Some("keyhaven host key".into()) };
                let kp = tokio::task::spawn_blocking(move || keys::generate(&o))
                    .await
                    .map_err(|e| ServiceError::internal("host key generation", e))?
                    .map_err(|e| ServiceError::internal("host key generation", e.message))?;
                match self.app.store.host_key_insert(alg_name, &kp.private_key, &kp.public_key) {
                    // Another caller generated it first: keep theirs.
                    Ok(()) | Err(keyhaven_store::StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let private = self
                .app
                .store
                .host_key_private(alg_name)?
                .ok_or_else(|| ServiceError::internal("host keys", "missing after generation"))?;
            let public = self
                .app
                .store
                .host_keys_list()?
                .into_iter()
                .find(|k| k.algorithm == *alg_name)
                .map(|k| k.public_key)
                .unwrap_or_default();
            let path = dir.join(format!("ssh_host_{stem}_key"));
            let pub_path = dir.join(format!("ssh_host_{stem}_key.pub"));
            // Rewrite only what differs: this runs on every render.
            let same = |p: &std::path::Path, want: &[u8]| std::fs::read(p).is_ok_and(|have| have == want);
            if !same(&path, private.as_bytes()) {
                files::write_atomic(&path, private.as_bytes(), 0o600, None)
                    .map_err(|e| ServiceError::internal("writing host keys", e))?;
                rewrote = true;
            }
            if !same(&pub_path, public.as_bytes()) {
                files::write_atomic(&pub_path, public.as_bytes(), 0o644, None)
                    .map_err(|e| ServiceError::internal("writing host keys", e))?;
                rewrote = true;
            }
            paths.push(path.display().to_string());
        }
        Ok((paths, rewrote))
    }

    /// Another node changed the SSH settings, the accounts (who may log in
    /// with a password) or the host keys: render again and, when the
    /// configuration differs, check and apply it (a reload when only host
    /// key files changed). A stopped sshd is left alone: it renders
    /// everything when it starts.
    pub async fn follow_shared_state(&self) -> Result<(), ServiceError> {
        if self.supervisor().state() == SshdState::Stopped {
            return Ok(());
        }
        let _guard = self.app.sshd_area.lock.lock().await;
        let s = self.settings()?;
        let (paths, rewrote) = self.host_key_files().await?;
        let text = sshd_config::render(&s, &self.render_context(&s, paths)?);
        if std::fs::read_to_string(self.supervisor().paths().config_file()).is_ok_and(|cur| cur == text) {
            if rewrote {
                self.supervisor().reload().await.map_err(sshd_error_in_ssh)?;
            }
            return Ok(());
        }
        self.supervisor().apply_config(&text).await.map_err(sshd_error_in_ssh)
    }

    /// Public host keys as `type base64` lines with fingerprints.
    pub fn host_public_keys(&self) -> Result<Vec<keys::HostKeyLine>, ServiceError> {
        let text: Vec<String> = self.app.store.host_keys_list()?.into_iter().map(|k| k.public_key).collect();
        keys::parse_host_key_lines(&text.join("\n")).map_err(|(_, m)| ServiceError::internal("reading host keys", m))
    }

    fn render_context(&self, s: &SshSettings, host_key_paths: Vec<String>) -> Result<RenderContext, ServiceError> {
        let mut listen = vec![];
        for i in &s.bindiface {
            listen.extend(interface_addresses(i));
        }
        let users = self.app.store.users_list()?;
        let mut password_users = vec![];
        let mut root_pw = false;
        for u in &users {
            let d = UserData::from_record(u);
            if d.ssh_password_enabled {
                if u.username == "root" {
                    root_pw = true;
                }
                password_users.push(u.username.clone());
            }
        }
        let dir = sshd_dir(self.app);
        Ok(RenderContext {
            listen_addresses: listen,
            host_key_paths,
            pid_file: abs(&dir.join("sshd.pid")),
            authorized_keys_file: self.app.keys_location.sshd_pattern(),
            password_users,
            root_password_login: root_pw,
            twofactor_ssh: false,
            sftp_server: "internal-sftp".into(),
        })
    }

    async fn render(&self, s: &SshSettings) -> Result<String, ServiceError> {
        let paths = self.ensure_host_keys().await?;
        let ctx = self.render_context(s, paths)?;
        Ok(sshd_config::render(s, &ctx))
    }

    /// `ssh.config`: the entry, with host keys made on first use (under the
    /// SSH lock, like every other change).
    pub async fn config(&self) -> Result<SshConfigEntry, ServiceError> {
        {
            let _guard = self.app.sshd_area.lock.lock().await;
            self.ensure_host_keys().await?;
        }
        self.config_entry()
    }

    pub fn config_entry(&self) -> Result<SshConfigEntry, ServiceError> {
        let settings = self.settings()?;
        let hk = self.host_public_keys()?;
        use base64::Engine;
        let public = |pred: fn(&str) -> bool| {
            hk.iter()
                .find(|k| pred(&k.key_type))
                .map(|k| base64::engine::general_purpose::STANDARD.encode(format!("{}\n", k.to_line())))
        };
        Ok(SshConfigEntry {
            settings,
            id: 1,
            host_dsa_key: Withheld,
            host_dsa_key_pub: Withheld,
            host_dsa_key_cert_pub: Withheld,
            host_ecdsa_key: Withheld,
            host_ecdsa_key_pub: public(|t| t.starts_with("ecdsa-")),
            host_ecdsa_key_cert_pub: Withheld,
            host_ed25519_key: Withheld,
            host_ed25519_key_pub: public(|t| t == "ssh-ed25519"),
            host_ed25519_key_cert_pub: Withheld,
            host_rsa_key: Withheld,
            host_rsa_key_pub: public(|t| t == "ssh-rsa"),
            host_rsa_key_cert_pub: Withheld,
            privatekey: Withheld,
            host_key: Withheld,
            host_key_pub: Withheld,
            host_keys: hk
                .iter()
                .map(|k| HostKeyEntry {
                    key_type: k.key_type.clone(),
                    public_key: k.to_line(),
                    fingerprint: k.fingerprint.clone(),
                })
                .collect(),
        })
    }

    /// `ssh.update`: validate, render, `sshd -t`, then save and apply.
    /// Returns the new `ssh.config` entry and the `options` it replaced
    /// (read under the lock, so the caller can audit an options change).
    pub async fn update(&self, new: SshSettings) -> Result<SshUpdated, ServiceError> {
        let _guard = self.app.sshd_area.lock.lock().await;
        let old = self.settings()?;
        {
            // NSS (possibly LDAP) and filesystem look-ups: off the executor.
            let (settings, facts) = (new.clone(), SystemFacts { data_dir: self.app.config.data_dir.clone() });
            tokio::task::spawn_blocking(move || sshd_config::validate_settings(&settings, &interfaces(), &facts, ""))
                .await
                .map_err(|e| ServiceError::internal("checking the SSH settings", e))??;
        }
        if new.tcpport != old.tcpport || self.supervisor().state() != SshdState::Running {
            if let Some(msg) = port_in_use(new.tcpport) {
                return Err(ServiceError::field("tcpport", msg));
            }
        }
        let text = self.render(&new).await?;
        // apply_config runs `sshd -t` first and touches nothing on refusal;
        // the settings are saved only once sshd has them.
        self.supervisor().apply_config(&text).await.map_err(sshd_error)?;
        self.app.store.setting_set(
            SETTINGS_KEY,
            &serde_json::to_value(&new).map_err(|e| ServiceError::internal("ssh.update", e))?,
        )?;
        Ok(SshUpdated { entry: self.config_entry()?, previous_options: old.options })
    }

    /// Re-render after account changes (password users); keys files are read
    /// by sshd at each login, so they need no reload.
    pub async fn users_changed(&self) {
        if self.supervisor().state() == SshdState::Stopped {
            return;
        }
        let _guard = self.app.sshd_area.lock.lock().await;
        let r = async {
            let s = self.settings()?;
            let text = self.render(&s).await?;
            if std::fs::read_to_string(self.supervisor().paths().config_file()).is_ok_and(|cur| cur == text) {
                return Ok(());
            }
            self.supervisor().apply_config(&text).await.map_err(sshd_error_in_ssh)
        }
        .await;
        if let Err(e) = r {
            tracing::error!("could not apply account changes to sshd: {e}");
        }
    }

    /// `service.query` row for ssh.
    pub fn service_entry(&self) -> Result<ServiceStatus, ServiceError> {
        let state = match self.supervisor().state() {
            SshdState::Running => "RUNNING",
            SshdState::Stopped => "STOPPED",
            SshdState::Crashed => "CRASHED",
        };
        Ok(ServiceStatus { id: 1, service: "ssh", enable: self.enabled()?, state, pids: self.supervisor().pids() })
    }

    pub fn set_enabled(&self, enable: bool) -> Result<(), ServiceError> {
        let row = serde_json::to_value(ServiceRow { enable })
            .map_err(|e| ServiceError::internal("encoding the service setting", e))?;
        self.app.store.setting_set(SERVICE_KEY, &row)?;
        Ok(())
    }

    /// Render, write and start sshd (keys synced first).
    pub async fn start(&self) -> Result<(), ServiceError> {
        let _guard = self.app.sshd_area.lock.lock().await;
        self.start_locked().await
    }

    /// `ssh_start` for a caller that holds `ssh_lock`. A failure leaves sshd
    /// counted as down (what `/healthz` reports) until it runs or is stopped.
    async fn start_locked(&self) -> Result<(), ServiceError> {
        let r = self.start_checked().await;
        if let Err(e) = &r {
            self.supervisor().start_failed(&e.to_string());
        }
        r
    }

    async fn start_checked(&self) -> Result<(), ServiceError> {
        if !self.app.config.authorized_keys_in_home() {
            if let Some(problem) = keyhaven_ssh::reach::strict_modes_problem(&self.app.config.data_dir) {
                return Err(ServiceError::call(EFAULT, format!("Cannot start the SSH service: {problem}")));
            }
        }
        self.app.accounts().sync_all_keys()?;
        let s = self.settings()?;
        // Settings saved by an older keyhaven may hold what is refused now
        // (e.g. a Banner naming a secret file): never start sshd with them.
        {
            let (settings, facts) = (s.clone(), SystemFacts { data_dir: self.app.config.data_dir.clone() });
            let checked = tokio::task::spawn_blocking(move || {
                sshd_config::validate_settings(&settings, &interfaces(), &facts, "")
            })
            .await
            .map_err(|e| ServiceError::internal("checking the SSH settings", e))?;
            if let Err(errors) = checked {
                let why = errors.0.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ");
                return Err(ServiceError::call(
                    EFAULT,
                    format!(
                        "Cannot start the SSH service: its saved settings are no longer accepted ({why}). \
                         Change them with ssh.update (System › Services › SSH), then start it again"
                    ),
                ));
            }
        }
        let text = self.render(&s).await?;
        self.supervisor().apply_config(&text).await.map_err(sshd_error_in_ssh)?;
        self.supervisor().start().await.map_err(sshd_error_in_ssh)
    }

    pub async fn control(&self, verb: SshVerb) -> Result<(), ServiceError> {
        // One change at a time: a restart must not interleave with an update.
        let _guard = self.app.sshd_area.lock.lock().await;
        match verb {
            SshVerb::Start => {
                if self.supervisor().state() == SshdState::Running {
                    return Ok(());
                }
                self.start_locked().await
            }
            SshVerb::Stop => self.supervisor().stop().await.map_err(sshd_error_in_ssh),
            SshVerb::Restart => {
                self.supervisor().stop().await.map_err(sshd_error_in_ssh)?;
                self.start_locked().await
            }
            SshVerb::Reload => {
                if self.supervisor().state() != SshdState::Running {
                    return self.start_locked().await;
                }
                self.app.accounts().sync_all_keys()?;
                let s = self.settings()?;
                let text = self.render(&s).await?;
                self.supervisor().apply_config(&text).await.map_err(sshd_error_in_ssh)
            }
        }
    }

    /// At daemon start: start sshd if the service is enabled.
    pub async fn start_enabled_services(&self) {
        match self.enabled() {
            Ok(true) => {
                if let Err(e) = self.start().await {
                    tracing::error!("the SSH service is enabled but did not start: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!("{e}"),
        }
    }
}

/// What `service.control` asks of the SSH service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshVerb {
    Start,
    Stop,
    Restart,
    Reload,
}

impl SshVerb {
    /// The verb as TrueNAS spells it (`START`, …), `None` for any other text.
    pub fn parse(s: &str) -> Option<SshVerb> {
        match s {
            "START" => Some(SshVerb::Start),
            "STOP" => Some(SshVerb::Stop),
            "RESTART" => Some(SshVerb::Restart),
            "RELOAD" => Some(SshVerb::Reload),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SshVerb::Start => "START",
            SshVerb::Stop => "STOP",
            SshVerb::Restart => "RESTART",
            SshVerb::Reload => "RELOAD",
        }
    }
}

/// TrueNAS's `ssh.config` entry: the settings, the public host keys, and
/// (keyhaven extension) `host_keys` with their fingerprints.
#[derive(Debug, Clone, Serialize)]
pub struct SshConfigEntry {
    #[serde(flatten)]
    pub settings: SshSettings,
    pub id: i64,
    // TrueNAS exposes private host keys (and DSA, certificates) here;
    // keyhaven never returns them.
    pub host_dsa_key: Withheld,
    pub host_dsa_key_pub: Withheld,
    pub host_dsa_key_cert_pub: Withheld,
    pub host_ecdsa_key: Withheld,
    /// The public key line (`type base64\n`), base64-encoded as TrueNAS does.
    pub host_ecdsa_key_pub: Option<String>,
    pub host_ecdsa_key_cert_pub: Withheld,
    pub host_ed25519_key: Withheld,
    pub host_ed25519_key_pub: Option<String>,
    pub host_ed25519_key_cert_pub: Withheld,
    pub host_rsa_key: Withheld,
    pub host_rsa_key_pub: Option<String>,
    pub host_rsa_key_cert_pub: Withheld,
    pub privatekey: Withheld,
    pub host_key: Withheld,
    pub host_key_pub: Withheld,
    pub host_keys: Vec<HostKeyEntry>,
}

/// A TrueNAS field keyhaven never fills in: always `null`.
#[derive(Debug, Clone, Copy)]
pub struct Withheld;

impl Serialize for Withheld {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_none()
    }
}

/// One public host key in `ssh.config`'s `host_keys`.
#[derive(Debug, Clone, Serialize)]
pub struct HostKeyEntry {
    #[serde(rename = "type")]
    pub key_type: String,
    pub public_key: String,
    pub fingerprint: String,
}

/// What `ssh.update` did.
pub struct SshUpdated {
    /// The new `ssh.config` entry.
    pub entry: SshConfigEntry,
    /// `options` before this update.
    pub previous_options: String,
}

/// [`HostFacts`] answered from this machine: NSS for account uids, the
/// filesystem for banner files.
struct SystemFacts {
    data_dir: PathBuf,
}

impl HostFacts for SystemFacts {
    fn is_superuser(&self, account: &str) -> bool {
        // An account NSS cannot find is not uid 0 now; sshd looks it up
        // again at each login and skips the command if it is still missing.
        keyhaven_ssh::accounts::lookup(account).is_some_and(|a| a.uid == 0)
    }

    fn banner_problem(&self, path: &str) -> Option<String> {
        banner_problem(Path::new(path), &self.data_dir)
    }
}

/// Why sshd must not send the file at `path` to everyone who connects, or
/// `None` when it is safe: sshd reads the banner as root, before
/// authentication, at every connection.
///
/// Safe means: a regular file, named by its real path (no symbolic link, no
/// `..`, so what is checked is what sshd opens), outside keyhaven's data
/// directory, readable by everyone (o+r) under directories everyone may
/// search (o+x) — so it is public already — and, file and directories alike,
/// owned by root (or the account keyhaven runs as) and writable by nobody
/// else: otherwise another account could later swap the file for a link to a
/// secret, which sshd, as root, would follow.
pub fn banner_problem(path: &Path, data_dir: &Path) -> Option<String> {
    let real = match std::fs::canonicalize(path) {
        Ok(r) => r,
        Err(e) => return Some(format!("it cannot be opened ({e})")),
    };
    let data = std::fs::canonicalize(data_dir)
        .or_else(|_| std::path::absolute(data_dir))
        .unwrap_or_else(|_| data_dir.to_path_buf());
    if real.starts_with(&data) {
        return Some(format!(
            "it is inside keyhaven's data directory {}, which holds the master key, the database and the host keys",
            data.display()
        ));
    }
    if real != path {
        return Some(format!(
            "it is a symbolic link or its path goes through one (or through ..): the file is {}; name that path \
             if it is the one you mean",
            real.display()
        ));
    }
    let me = keyhaven_ssh::uid::effective();
    let only_root_writes = |m: &std::fs::Metadata| (m.uid() == 0 || m.uid() == me) && m.mode() & 0o022 == 0;
    let meta = match std::fs::metadata(&real) {
        Ok(m) => m,
        Err(e) => return Some(format!("it cannot be opened ({e})")),
    };
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() {
        return Some("it is not a regular file".to_string());
    }
    if mode & 0o004 == 0 {
        return Some(format!(
            "it is not readable by everyone (mode {mode:04o}); only a file that is already public may be named here"
        ));
    }
    if !only_root_writes(&meta) {
        return Some(format!(
            "it can be changed by accounts other than root (owner uid {}, mode {mode:04o}), who could swap it for \
             a link to a secret",
            meta.uid()
        ));
    }
    for dir in real.ancestors().skip(1) {
        let m = match std::fs::metadata(dir) {
            Ok(m) => m,
            Err(e) => return Some(format!("directory {} cannot be read ({e})", dir.display())),
        };
        let mode = m.mode() & 0o7777;
        if mode & 0o001 == 0 {
            return Some(format!("directory {} is not searchable by everyone (mode {mode:04o})", dir.display()));
        }
        if !only_root_writes(&m) {
            return Some(format!(
                "directory {} can be written by accounts other than root (owner uid {}, mode {mode:04o}), who \
                 could swap the file for a link to a secret",
                dir.display(),
                m.uid()
            ));
        }
    }
    None
}

fn abs(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Whether something already listens on `port` (any address).
fn port_in_use(port: u16) -> Option<String> {
    for ip in [IpAddr::from([0, 0, 0, 0]), IpAddr::from([127, 0, 0, 1])] {
        if let Err(e) = TcpListener::bind(SocketAddr::new(ip, port)) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Some(format!(
                    "Port {port} is already in use by another process; choose another port or stop that process"
                ));
            }
        }
    }
    None
}

/// sshd's refusal of a configuration as field errors of the settings
/// (`options`, `tcpport`), other failures as ESERVICESTARTFAILURE.
fn sshd_error(e: SshdError) -> ServiceError {
    match e {
        SshdError::ConfigRejected { message } => {
            ServiceError::field("options", format!("sshd refused the configuration: {message}"))
        }
        SshdError::PortInUse { port } => ServiceError::field(
            "tcpport",
            format!("Port {port} is already in use by another process; choose another port or stop that process"),
        ),
        other => ServiceError::call(crate::error::ESERVICESTARTFAILURE, other.to_string()),
    }
}

/// [`sshd_error`] outside `ssh.update` (starting, reloading, account
/// changes): the fields are named in the saved settings' schema, `ssh`.
fn sshd_error_in_ssh(e: SshdError) -> ServiceError {
    sshd_error(e).in_schema("ssh")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn write(path: &Path, mode: u32) {
        std::fs::write(path, b"Authorised use only\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A 0755 directory on a path no other account can write: below the
    /// integration harness's root-owned base when running as root (a temp dir
    /// under /tmp, which is 1777, could never hold an acceptable banner).
    fn safe_dir() -> Option<tempfile::TempDir> {
        if !keyhaven_ssh::uid::is_root() {
            return None;
        }
        let base = Path::new("/var/lib/keyhaven-test");
        std::fs::create_dir_all(base).unwrap();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = tempfile::Builder::new().prefix("banner-").tempdir_in(base).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(d)
    }

    #[test]
    fn banner_files_must_be_public_real_paths_outside_the_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        // The checks compare real paths; a TMPDIR reached through a link must not matter.
        let root = tmp.path().canonicalize().unwrap();
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        let master = data.join("master.key");
        write(&master, 0o600);
        let problem = |p: &Path| banner_problem(p, &data).unwrap_or_default();

        // The master key itself, a link to it, and a world-readable file in the data dir.
        assert!(problem(&master).starts_with("it is inside keyhaven's data directory"), "{}", problem(&master));
        let link = root.join("issue.net");
        symlink(&master, &link).unwrap();
        assert!(problem(&link).starts_with("it is inside keyhaven's data directory"));
        let public_in_data = data.join("public");
        write(&public_in_data, 0o644);
        assert!(problem(&public_in_data).starts_with("it is inside keyhaven's data directory"));
        // The data dir spelled another way (through ..) is recognised too.
        let cwd_relative = banner_problem(&master, Path::new(&format!("{}/../data", data.display())));
        assert!(cwd_relative.unwrap().starts_with("it is inside keyhaven's data directory"));

        // A private file, a directory, a missing file.
        let private = root.join("private");
        write(&private, 0o600);
        assert_eq!(
            problem(&private),
            "it is not readable by everyone (mode 0600); only a file that is already public may be named here"
        );
        assert_eq!(problem(&root), "it is not a regular file");
        assert!(problem(&root.join("missing")).starts_with("it cannot be opened"));

        // A link to a public file elsewhere: the real path is named.
        let public = root.join("public");
        write(&public, 0o644);
        let link2 = root.join("link2");
        symlink(&public, &link2).unwrap();
        assert!(problem(&link2).contains(&format!("the file is {}", public.display())), "{}", problem(&link2));
        let dotdot = root.join("data/../public");
        assert!(problem(&dotdot).starts_with("it is a symbolic link"), "{}", problem(&dotdot));
    }

    #[test]
    fn superusers_are_found_through_nss() {
        let facts = SystemFacts { data_dir: PathBuf::from("/nonexistent") };
        assert!(facts.is_superuser("root"));
        assert!(!facts.is_superuser("nobody"));
        assert!(!facts.is_superuser("no-such-account-here"));
        assert!(!facts.is_superuser("%u"));
    }

    #[test]
    fn a_public_root_owned_banner_is_accepted_and_writable_places_are_not() {
        let Some(dir) = safe_dir() else {
            eprintln!("skipped: needs root for a root-owned directory outside /tmp");
            return;
        };
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let issue = dir.path().join("issue.net");
        write(&issue, 0o644);
        assert_eq!(banner_problem(&issue, &data), None);

        // A group-writable file could be rewritten into a link by its group.
        write(&issue, 0o664);
        assert!(banner_problem(&issue, &data).unwrap().starts_with("it can be changed by accounts other than root"));
        write(&issue, 0o644);
        // A directory that is not searchable, or that others can write.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let inner = sub.join("banner");
        write(&inner, 0o644);
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(banner_problem(&inner, &data).unwrap().contains("is not searchable by everyone (mode 0750)"));
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(banner_problem(&inner, &data).unwrap().contains("can be written by accounts other than root"));
        // Under a world-writable temp dir such as /tmp (1777) nothing is acceptable.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let in_tmp = tmp.path().canonicalize().unwrap().join("b");
        write(&in_tmp, 0o644);
        let temp_dir = std::env::temp_dir().canonicalize().unwrap();
        if std::fs::metadata(&temp_dir).unwrap().mode() & 0o002 != 0 {
            let msg = banner_problem(&in_tmp, &data).unwrap();
            assert!(msg.contains(&format!("directory {} can be written", temp_dir.display())), "{msg}");
        }
    }
}

/// The `service.query` row for the one supervised service (TrueNAS field
/// names; serialised at the API edge).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub id: i64,
    pub service: &'static str,
    pub enable: bool,
    /// `RUNNING`, `STOPPED` or `CRASHED`.
    pub state: &'static str,
    pub pids: Vec<u32>,
}
