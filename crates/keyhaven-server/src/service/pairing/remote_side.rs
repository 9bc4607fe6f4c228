//! The remote side of semi-automatic setup: `keychaincredential.ssh_pair`.

use super::*;
use crate::service::input;
use serde::{Deserialize, Serialize};

/// `keychaincredential.ssh_pair`'s argument, in TrueNAS's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairInput {
    #[serde(deserialize_with = "input::capped")]
    pub remote_hostname: String,
    #[serde(default = "input::default_username", deserialize_with = "input::capped")]
    pub username: String,
    pub public_key: String,
}

/// A public key [`PairInput::authorized_key`] accepted as an
/// `authorized_keys` line (trimmed).
#[derive(Debug)]
pub struct PairKey(String);

impl PairInput {
    /// Every field must be non-empty; all empty ones are reported together
    /// (field errors relative to the input, as every check here).
    pub fn check(&self) -> Result<(), ServiceError> {
        let mut errs = keyhaven_core::ValidationErrors::new();
        for (field, value) in
            [("remote_hostname", &self.remote_hostname), ("username", &self.username), ("public_key", &self.public_key)]
        {
            if value.trim().is_empty() {
                errs.add(field, "String should have at least 1 character");
            }
        }
        Ok(errs.check()?)
    }

    /// The key to authorize, once it parses as an `authorized_keys` line.
    pub fn authorized_key(&self) -> Result<PairKey, ServiceError> {
        let public_key = self.public_key.trim();
        authorized_keys::parse_authorized_keys(public_key).map_err(|e| e.to_field_error("public_key"))?;
        Ok(PairKey(public_key.to_string()))
    }
}

/// What `ssh_pair` tells the pairing side: where sshd listens and its host
/// keys as known_hosts lines for `remote_hostname`.
#[derive(Debug, Serialize)]
pub struct PairReply {
    pub port: u16,
    pub host_key: String,
}

impl<'a> Pairing<'a> {
    /// `keychaincredential.ssh_pair`, the remote side of semi-automatic setup:
    /// check the account, enable and start sshd if needed, authorize
    /// `public_key` once, report the SSH port and the host keys. Its errors
    /// name no field of its input: changes it makes to the account fail as
    /// `user_update`'s, sshd's refusals as the `ssh` settings'.
    pub async fn pair(
        &self,
        remote_hostname: &str,
        username: &str,
        public_key: &PairKey,
    ) -> Result<PairReply, ServiceError> {
        let public_key = public_key.0.as_str();
        let (_, data) = self
            .app
            .accounts()
            .by_name(username)?
            .ok_or_else(|| ServiceError::call(EFAULT, format!("User {username} does not exist")))?;
        if let KeysLocation::Home = self.app.keys_location {
            let home = data.home.as_str();
            if home.starts_with("/var/empty")
                || home.starts_with("/nonexistent")
                || !std::path::Path::new(home).is_dir()
            {
                return Err(ServiceError::call(ENOENT, format!("Home directory {home} does not exist")));
            }
            // A home or ~/.ssh that is a symbolic link or another account's:
            // refused now, before sshd is enabled and started for nothing.
            self.app.accounts().check_keys(username, &data)?;
        }
        // Before anything changes: an account that cannot run commands makes a
        // connection that fails every backup. With manage_os the pairing side
        // changes the shell afterwards (as TrueNAS does); without, it cannot.
        if !self.app.config.manage_os_accounts {
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
        if !self.app.sshd().enabled()? {
            self.app.sshd().set_enabled(true)?;
        }
        if self.app.sshd().supervisor().state() != SshdState::Running {
            self.app.sshd().control(crate::service::sshd::SshVerb::Start).await?;
        }
        let host_keys = self.app.sshd().host_public_keys()?;
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
            let _guard = self.app.accounts().lock().await;
            let (rec, data) = self
                .app
                .accounts()
                .by_name(username)?
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
                // Its field errors keep naming user.update's schema, as they always have.
                self.app.accounts().update_locked(rec.id, input).await.map_err(|e| e.in_schema("user_update"))?;
            }
        }
        Ok(PairReply { port: self.app.sshd().settings()?.tcpport, host_key: lines.concat() })
    }
}
