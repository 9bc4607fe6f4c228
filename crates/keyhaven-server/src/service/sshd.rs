//! The SSH service: `ssh.config` / `ssh.update`, host keys, the rendering of
//! `sshd_config`, and `service.*` control of the supervised sshd.
//!
//! Every change is rendered, checked with `sshd -t` and only then swapped in
//! and applied with SIGHUP; a refused configuration leaves the running sshd
//! and the current file untouched.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

use serde_json::{json, Value};

use super::users::UserData;
use super::App;
use crate::error::{ServiceError, EFAULT};
use keyhaven_core::keys::{self, GenerateOptions, KeyAlgorithm};
use keyhaven_core::sshd_config::{self, RenderContext, SshSettings};
use keyhaven_ssh::files;
use keyhaven_ssh::supervisor::{SshdError, SshdState};

const SETTINGS_KEY: &str = "ssh";
const SERVICE_KEY: &str = "service.ssh";

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

impl App {
    pub fn ssh_settings(&self) -> Result<SshSettings, ServiceError> {
        Ok(match self.store.setting_get(SETTINGS_KEY)? {
            Some(v) => serde_json::from_value(v).map_err(|e| ServiceError::internal("reading the SSH settings", e))?,
            None => SshSettings::default(),
        })
    }

    pub fn ssh_enabled(&self) -> Result<bool, ServiceError> {
        Ok(self.store.setting_get(SERVICE_KEY)?.and_then(|v| v["enable"].as_bool()).unwrap_or(false))
    }

    /// Generate missing host keys (stored sealed) and write all of them for sshd.
    pub async fn ensure_host_keys(&self) -> Result<Vec<String>, ServiceError> {
        let dir = sshd_dir(self);
        files::ensure_dir(&dir, 0o755).map_err(|e| ServiceError::internal("creating the sshd directory", e))?;
        let existing = self.store.host_keys_list()?;
        let mut paths = vec![];
        for (alg_name, alg, bits, stem) in HOST_KEYS {
            if !existing.iter().any(|k| k.algorithm == *alg_name) {
                let o = GenerateOptions { algorithm: *alg, bits: *bits, comment: Some("keyhaven host key".into()) };
                let kp = tokio::task::spawn_blocking(move || keys::generate(&o))
                    .await
                    .map_err(|e| ServiceError::internal("host key generation", e))?
                    .map_err(|e| ServiceError::internal("host key generation", e.message))?;
                match self.store.host_key_insert(alg_name, &kp.private_key, &kp.public_key) {
                    // Another caller generated it first: keep theirs.
                    Ok(()) | Err(keyhaven_store::StoreError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let private = self
                .store
                .host_key_private(alg_name)?
                .ok_or_else(|| ServiceError::internal("host keys", "missing after generation"))?;
            let public = self
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
            }
            if !same(&pub_path, public.as_bytes()) {
                files::write_atomic(&pub_path, public.as_bytes(), 0o644, None)
                    .map_err(|e| ServiceError::internal("writing host keys", e))?;
            }
            paths.push(path.display().to_string());
        }
        Ok(paths)
    }

    /// Public host keys as `type base64` lines with fingerprints.
    pub fn host_public_keys(&self) -> Result<Vec<keys::HostKeyLine>, ServiceError> {
        let text: Vec<String> = self.store.host_keys_list()?.into_iter().map(|k| k.public_key).collect();
        keys::parse_host_key_lines(&text.join("\n")).map_err(|(_, m)| ServiceError::internal("reading host keys", m))
    }

    fn render_context(&self, s: &SshSettings, host_key_paths: Vec<String>) -> Result<RenderContext, ServiceError> {
        let mut listen = vec![];
        for i in &s.bindiface {
            listen.extend(interface_addresses(i));
        }
        let users = self.store.users_list()?;
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
        let dir = sshd_dir(self);
        Ok(RenderContext {
            listen_addresses: listen,
            host_key_paths,
            pid_file: abs(&dir.join("sshd.pid")),
            authorized_keys_file: self.keys_location.sshd_pattern(),
            password_users,
            root_password_login: root_pw,
            twofactor_ssh: false,
            sftp_server: "internal-sftp".into(),
        })
    }

    async fn render_ssh(&self, s: &SshSettings) -> Result<String, ServiceError> {
        let paths = self.ensure_host_keys().await?;
        let ctx = self.render_context(s, paths)?;
        Ok(sshd_config::render(s, &ctx))
    }

    /// `ssh.config`.
    pub fn ssh_config_entry(&self) -> Result<Value, ServiceError> {
        let s = self.ssh_settings()?;
        let mut v = serde_json::to_value(&s).map_err(|e| ServiceError::internal("ssh.config", e))?;
        v["id"] = json!(1);
        let hk = self.host_public_keys()?;
        use base64::Engine;
        let b64 = |stem: &str| {
            hk.iter()
                .find(|k| match stem {
                    "ed25519" => k.key_type == "ssh-ed25519",
                    "ecdsa" => k.key_type.starts_with("ecdsa-"),
                    _ => k.key_type == "ssh-rsa",
                })
                .map(|k| json!(base64::engine::general_purpose::STANDARD.encode(format!("{}\n", k.to_line()))))
                .unwrap_or(Value::Null)
        };
        // TrueNAS exposes private host keys here; keyhaven never returns them.
        for stem in ["dsa", "ecdsa", "ed25519", "rsa"] {
            v[format!("host_{stem}_key")] = Value::Null;
            v[format!("host_{stem}_key_pub")] = if stem == "dsa" { Value::Null } else { b64(stem) };
            v[format!("host_{stem}_key_cert_pub")] = Value::Null;
        }
        v["privatekey"] = Value::Null;
        v["host_key"] = Value::Null;
        v["host_key_pub"] = Value::Null;
        v["host_keys"] = Value::Array(
            hk.iter()
                .map(|k| json!({"type": k.key_type, "public_key": k.to_line(), "fingerprint": k.fingerprint}))
                .collect(),
        );
        Ok(v)
    }

    /// `ssh.update`: validate, render, `sshd -t`, then save and apply.
    pub async fn ssh_update(&self, new: SshSettings) -> Result<Value, ServiceError> {
        let _guard = self.ssh_lock.lock().await;
        let old = self.ssh_settings()?;
        sshd_config::validate_settings(&new, &interfaces(), "ssh_update")?;
        if new.tcpport != old.tcpport || self.sshd.state() != SshdState::Running {
            if let Some(msg) = port_in_use(new.tcpport) {
                return Err(ServiceError::field("ssh_update.tcpport", msg));
            }
        }
        let text = self.render_ssh(&new).await?;
        // apply_config runs `sshd -t` first and touches nothing on refusal;
        // the settings are saved only once sshd has them.
        self.sshd.apply_config(&text).await.map_err(|e| sshd_error("ssh_update", e))?;
        self.store.setting_set(
            SETTINGS_KEY,
            &serde_json::to_value(&new).map_err(|e| ServiceError::internal("ssh.update", e))?,
        )?;
        self.ssh_config_entry()
    }

    /// Re-render after account changes (password users); keys files are read
    /// by sshd at each login, so they need no reload.
    pub async fn ssh_users_changed(&self) {
        if self.sshd.state() == SshdState::Stopped {
            return;
        }
        let _guard = self.ssh_lock.lock().await;
        let r = async {
            let s = self.ssh_settings()?;
            let text = self.render_ssh(&s).await?;
            if std::fs::read_to_string(self.sshd.paths().config_file()).is_ok_and(|cur| cur == text) {
                return Ok(());
            }
            self.sshd.apply_config(&text).await.map_err(|e| sshd_error("ssh", e))
        }
        .await;
        if let Err(e) = r {
            tracing::error!("could not apply account changes to sshd: {e}");
        }
    }

    /// `service.query` row for ssh.
    pub fn ssh_service_entry(&self) -> Result<Value, ServiceError> {
        let state = match self.sshd.state() {
            SshdState::Running => "RUNNING",
            SshdState::Stopped => "STOPPED",
            SshdState::Crashed => "CRASHED",
        };
        Ok(json!({"id": 1, "service": "ssh", "enable": self.ssh_enabled()?, "state": state, "pids": self.sshd.pids()}))
    }

    pub fn ssh_set_enabled(&self, enable: bool) -> Result<(), ServiceError> {
        self.store.setting_set(SERVICE_KEY, &json!({"enable": enable}))?;
        Ok(())
    }

    /// Render, write and start sshd (keys synced first).
    pub async fn ssh_start(&self) -> Result<(), ServiceError> {
        let _guard = self.ssh_lock.lock().await;
        self.ssh_start_locked().await
    }

    /// `ssh_start` for a caller that holds `ssh_lock`.
    async fn ssh_start_locked(&self) -> Result<(), ServiceError> {
        if !self.config.authorized_keys_in_home {
            if let Some(problem) = crate::startup::strict_modes_problem(&self.config.data_dir) {
                return Err(ServiceError::call(EFAULT, format!("Cannot start the SSH service: {problem}")));
            }
        }
        self.sync_all_user_keys()?;
        let s = self.ssh_settings()?;
        let text = self.render_ssh(&s).await?;
        self.sshd.apply_config(&text).await.map_err(|e| sshd_error("ssh", e))?;
        self.sshd.start().await.map_err(|e| sshd_error("ssh", e))
    }

    pub async fn ssh_control(&self, verb: &str) -> Result<(), ServiceError> {
        // One change at a time: a restart must not interleave with an update.
        let _guard = self.ssh_lock.lock().await;
        match verb {
            "START" => {
                if self.sshd.state() == SshdState::Running {
                    return Ok(());
                }
                self.ssh_start_locked().await
            }
            "STOP" => self.sshd.stop().await.map_err(|e| sshd_error("ssh", e)),
            "RESTART" => {
                self.sshd.stop().await.map_err(|e| sshd_error("ssh", e))?;
                self.ssh_start_locked().await
            }
            "RELOAD" => {
                if self.sshd.state() != SshdState::Running {
                    return self.ssh_start_locked().await;
                }
                self.sync_all_user_keys()?;
                let s = self.ssh_settings()?;
                let text = self.render_ssh(&s).await?;
                self.sshd.apply_config(&text).await.map_err(|e| sshd_error("ssh", e))
            }
            other => Err(ServiceError::field(
                "service_control.verb",
                format!("Input should be 'START', 'STOP', 'RESTART' or 'RELOAD'; got {other}"),
            )),
        }
    }

    /// At daemon start: start sshd if the service is enabled.
    pub async fn start_enabled_services(&self) {
        match self.ssh_enabled() {
            Ok(true) => {
                if let Err(e) = self.ssh_start().await {
                    tracing::error!("the SSH service is enabled but did not start: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::error!("{e}"),
        }
    }
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

fn sshd_error(schema: &str, e: SshdError) -> ServiceError {
    match e {
        SshdError::ConfigRejected { message } => {
            ServiceError::field(format!("{schema}.options"), format!("sshd refused the configuration: {message}"))
        }
        SshdError::PortInUse { port } => ServiceError::field(
            format!("{schema}.tcpport"),
            format!("Port {port} is already in use by another process; choose another port or stop that process"),
        ),
        other => ServiceError::call(202, other.to_string()),
    }
}
