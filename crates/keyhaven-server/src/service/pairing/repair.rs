//! Re-pairing an existing connection, optionally rotating its key, with an undo of remote changes.

use super::*;

/// What re-pairing did, besides updating the connection.
pub struct RePairOutcome {
    pub connection: KeychainEntry,
    /// The key pair the connection used before, when a new one replaced it.
    pub old_key_pair: Option<i64>,
    /// Whether the old public key was taken off the remote account.
    pub old_key_removed_from_remote: bool,
    /// Why it was not, when removal was asked for and did not happen.
    pub old_key_kept_because: Option<String>,
}

impl<'a> Pairing<'a> {
    /// `keychaincredential.re_pair_ssh_connection` (keyhaven extension): pair an
    /// existing connection again through the remote's API, optionally with a
    /// new key pair (key rotation). The new key must log in before the
    /// connection switches to it and before the old key leaves the remote;
    /// any failure restores the connection and removes a generated key pair.
    pub async fn re_pair(
        &self,
        id: i64,
        s: &SemiAutomatic,
        new_key: Option<(String, keys::GenerateOptions)>,
        remove_old_key: bool,
    ) -> Result<RePairOutcome, ServiceError> {
        const S: &str = "keychain_re_pair_ssh_connection";
        let conn = self.app.keychain().get(id)?;
        let Some(old_attrs) = conn.connection_attributes().cloned() else {
            return Err(ServiceError::field(format!("{S}.id"), format!("Credential {id} is not an SSH connection")));
        };
        let name = conn.name().to_string();
        let old_key_id = old_attrs.private_key;
        let old_public =
            self.app.keychain().get(old_key_id).ok().and_then(|k| k.public_key().map(|p| p.trim().to_string()));
        if let Some((key_name, _)) = &new_key {
            if self.app.keychain().entries()?.names.contains_key(key_name.as_str()) {
                return Err(ServiceError::field(
                    format!("{S}.new_key.name"),
                    "Is already in use by another Keychain Credential",
                ));
            }
        } else if !matches!(self.app.keychain().private_key(old_key_id), Ok(Some(k)) if !k.trim().is_empty()) {
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
                if let Err(e) = self.app.keychain().delete(key_id, false) {
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
        // Field errors are named as keychaincredential.update names them.
        let schema = "keychain_credential_update";
        let connection = match self
            .app
            .keychain()
            .update(id, None, Some(AttributesInput::Connection(updated)))
            .await
            .map_err(|e| e.in_schema(schema))
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
        let (passed, stage, why) = match self.test_connection(id, None).await {
            Ok(r) => (r.ok, r.stage.as_str(), r.error.unwrap_or_default()),
            Err(e) => (false, "connect", e.to_string()),
        };
        if !passed {
            let old = ConnectionInput {
                endpoint: SshEndpoint {
                    host: old_attrs.host.clone(),
                    port: old_attrs.port,
                    connect_timeout: old_attrs.connect_timeout,
                },
                username: old_attrs.username.clone(),
                private_key: old_key_id,
                remote_host_key: old_attrs.remote_host_key.clone(),
            };
            let restore = self.app.keychain().update(id, None, Some(AttributesInput::Connection(old))).await;
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
                    stage,
                    if why.is_empty() { "unknown error" } else { why.as_str() }
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
            let old_user = old_attrs.username.clone();
            let old_host = old_attrs.host.to_lowercase();
            let host = url_host(&s.url);
            let cached = self.app.keychain().entries()?;
            let others: Vec<String> = cached
                .connection_keys
                .iter()
                .filter(|(c, k)| **k == old_key_id && **c != id)
                .filter_map(|(c, _)| cached.get(*c).map(|e| e.name().to_string()))
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
