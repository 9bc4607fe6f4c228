//! Checking stored SSH connections: the connection test and each connection's last result.

use super::*;
use keyhaven_core::net::{ConnectTimeout, Port};

/// The field of `keychaincredential.test_ssh_connection` that names another key pair.
const KEY_FIELD: &str = "options.private_key";

impl<'a> Pairing<'a> {
    /// Test a stored SSH connection: pinned host keys, its key pair, `true`.
    pub async fn test_connection(&self, id: i64, timeout: Option<ConnectTimeout>) -> Result<TestReport, ServiceError> {
        self.test_connection_with(id, timeout, None).await
    }

    /// [`Pairing::test_connection`], optionally logging in with another key
    /// pair than the connection's (named `options.private_key` in errors, as
    /// in `keychaincredential.test_ssh_connection`'s input).
    pub async fn test_connection_with(
        &self,
        id: i64,
        timeout: Option<ConnectTimeout>,
        key_pair: Option<i64>,
    ) -> Result<TestReport, ServiceError> {
        let target = self.connection_target_with(id, timeout, key_pair)?;
        let r = ssh_client::test_connection(&target).await;
        self.app.metrics.connection_test(r.ok);
        // A test with the connection's own key is its status in the connection list.
        if key_pair.is_none() {
            let rec = keyhaven_store::ConnectionTestRecord {
                connection_id: id,
                ok: r.ok,
                stage: r.stage.as_str().to_string(),
                error: r.error.clone(),
                latency_ms: r.latency_ms as i64,
                tested_at: crate::service::now_secs(),
            };
            if let Err(e) = self.app.store.connection_test_record(&rec) {
                tracing::warn!(connection = id, "could not keep the test result: {e}");
            }
        }
        Ok(r)
    }

    /// How to reach a stored SSH connection: its host, port, user, private key
    /// and pinned host keys; `timeout` overrides its `connect_timeout`.
    pub fn connection_target(&self, id: i64, timeout: Option<ConnectTimeout>) -> Result<TestTarget, ServiceError> {
        self.connection_target_with(id, timeout, None)
    }

    fn connection_target_with(
        &self,
        id: i64,
        timeout: Option<ConnectTimeout>,
        key_pair: Option<i64>,
    ) -> Result<TestTarget, ServiceError> {
        let e = self.app.keychain().get(id)?;
        let Some(a) = e.connection_attributes() else {
            return Err(ServiceError::call(EINVAL, "Credential is not of type SSH_CREDENTIALS"));
        };
        if let Some(k) = key_pair {
            // The cached entry is enough to check the type; the key itself is read once, below.
            if !self.app.keychain().entries()?.get(k).is_some_and(|kp| kp.is_key_pair()) {
                return Err(ServiceError::field(KEY_FIELD, format!("SSH key pair {k} does not exist")));
            }
        }
        let kp_id = key_pair.unwrap_or(a.private_key);
        let private =
            self.app.keychain().private_key(kp_id).ok().flatten().filter(|p| !p.trim().is_empty()).ok_or_else(
                || match key_pair {
                    Some(k) => ServiceError::field(
                        KEY_FIELD,
                        format!("SSH key pair {k} has no private key (public key only); it cannot log in"),
                    ),
                    None => ServiceError::call(
                        ENOENT,
                        format!("SSH key pair {kp_id} of this connection does not exist or has no private key"),
                    ),
                },
            )?;
        let pinned = keys::parse_host_key_lines(&a.remote_host_key)
            .map_err(|(line, m)| ServiceError::call(EINVAL, format!("Stored remote_host_key, line {line}: {m}")))?;
        let port = Port::new(a.port).unwrap_or(Port::SSH);
        let timeout =
            timeout.unwrap_or_else(|| ConnectTimeout::new(a.connect_timeout).unwrap_or(ConnectTimeout::DEFAULT));
        Ok(TestTarget {
            host: a.host.clone(),
            port: port.get(),
            username: if a.username.is_empty() { "root".into() } else { a.username.clone() },
            private_key_openssh: private,
            pinned_host_keys: pinned.into_iter().map(|k| (k.key_type, k.base64)).collect(),
            timeout: timeout.duration(),
        })
    }

    /// Generate a key pair and store it as `name`: its id and its public key line.
    pub(super) async fn create_generated_key(
        &self,
        name: &str,
        options: keys::GenerateOptions,
    ) -> Result<(i64, String), ServiceError> {
        let kp = self.app.keychain().generate_key_pair(options).await?;
        let input = KeyPairInput {
            private_key: Some(crate::service::input::SecretText(secrecy::SecretString::from(
                kp.private_key.to_string(),
            ))),
            public_key: Some(kp.public_key.clone()),
            passphrase: None,
        };
        let e =
            self.app.keychain().create(name, AttributesInput::KeyPair(input)).await.map_err(|e| e.in_schema(CREATE))?;
        Ok((e.id(), kp.public_key.trim().to_string()))
    }

    /// The last test of every SSH connection tested so far (keyhaven
    /// extension), as a caller of `role` may see it: error texts name hosts
    /// and users, which read-only admins do not see (connection attributes
    /// are redacted for them too).
    pub fn connection_status(&self, role: Role) -> Result<Vec<ConnectionStatus>, ServiceError> {
        let tests = self.app.store.connection_tests()?;
        Ok(tests
            .into_iter()
            .map(|t| ConnectionStatus {
                id: t.connection_id,
                ok: t.ok,
                stage: t.stage,
                error: match t.error {
                    Some(_) if !role.can_write() => Some(crate::service::keychain::REDACTED.to_string()),
                    e => e,
                },
                latency_ms: t.latency_ms,
                tested_at: EpochMillis(t.tested_at * 1000),
            })
            .collect())
    }
}

/// The last test of one connection (`keychaincredential.ssh_connection_status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionStatus {
    pub id: i64,
    pub ok: bool,
    pub stage: String,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub tested_at: EpochMillis,
}

/// A time as TrueNAS's extended JSON writes it: `{"$date": milliseconds}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochMillis(pub i64);

impl serde::Serialize for EpochMillis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("$date", &self.0)?;
        m.end()
    }
}
