//! The local side of pairing: semi-automatic setup through the other system's API, and manual setup.

use super::*;

impl<'a> Pairing<'a> {
    /// `keychaincredential.remote_ssh_semiautomatic_setup` (reference §2.8).
    pub async fn semiautomatic_setup(
        &self,
        name: &str,
        key_id: i64,
        s: &SemiAutomatic,
    ) -> Result<KeychainEntry, ServiceError> {
        let not_found = || ServiceError::call(EFAULT, "Specified key pair not found");
        let kp = self.app.keychain().get(key_id).map_err(|_| not_found())?;
        if !kp.is_key_pair() || !matches!(self.app.keychain().private_key(key_id), Ok(Some(k)) if !k.trim().is_empty())
        {
            return Err(not_found());
        }
        let public_key = kp.public_key().unwrap_or("").trim().to_string();
        let mut c = connect_remote(s).await?;
        let (port, host_key, changes) = match self.pair_with(&mut c, &public_key, s).await {
            Ok(r) => r,
            Err(e) => {
                c.close().await;
                return Err(e);
            }
        };
        let conn = paired_connection(s, port, &host_key, key_id);
        let created =
            self.app.keychain().create(name, AttributesInput::Connection(conn)).await.map_err(|e| e.in_schema(CREATE));
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
    pub(super) async fn pair_with(
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
    pub async fn setup_connection(
        &self,
        connection_name: &str,
        key: KeyChoice,
        kind: SetupKind,
    ) -> Result<KeychainEntry, ServiceError> {
        const S: &str = "setup_ssh_connection";
        let cached = self.app.keychain().entries()?;
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
                self.app.keychain().get_of_type(id, crate::service::keychain::SSH_KEY_PAIR)?;
                (id, false)
            }
        };
        let r = match kind {
            SetupKind::SemiAutomatic(s) => self.semiautomatic_setup(connection_name, key_id, &s).await,
            SetupKind::Manual(m) => {
                let conn = ConnectionInput {
                    endpoint: m.endpoint,
                    username: m.username,
                    private_key: key_id,
                    remote_host_key: m.remote_host_key,
                };
                self.app
                    .keychain()
                    .create(connection_name, AttributesInput::Connection(conn))
                    .await
                    .map_err(|e| e.in_schema(CREATE))
            }
        };
        if r.is_err() && generated {
            if let Err(e) = self.app.keychain().delete(key_id, false) {
                tracing::error!("could not remove the key pair generated for {connection_name}: {e}");
            }
        }
        r
    }
}
