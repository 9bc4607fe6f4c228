//! Typed access to each table on PostgreSQL: the same methods, records and
//! meanings as the SQLite backend's (`crate::records`, `crate::rsync`,
//! `crate::audit`). Secret columns are sealed before the SQL is sent and
//! opened after the row comes back. A row whose sealing binds its id gets the
//! id from the table's identity sequence first, so it is written once,
//! already sealed.

use serde_json::Value;
use tokio_postgres::types::FromSql;
use tokio_postgres::Row;
use zeroize::Zeroizing;

use super::{Pg, PgStore};
use crate::audit::{AuditEntry, AuditRecord, AUDIT_PRUNE_BATCH};
use crate::error::{Result, StoreError};
use crate::records::{ApiKeyRecord, ConnectionTestRecord, HostKeyRecord, KeychainRecord, TokenRecord, UserRecord};
use crate::rsync::{RsyncRunRecord, RsyncTaskRecord};

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// One column, or [`StoreError::Corrupt`] when its type is not the expected one.
pub(super) fn col<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i).map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
}

pub(super) fn json(r: &Row, i: usize) -> Result<Value> {
    let s: String = col(r, i)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column {i} is not JSON: {e}")))
}

/// The next id of `table`'s identity column.
pub(super) async fn next_id(pg: &Pg, c: &tokio_postgres::Client, table: &str) -> Result<i64> {
    let row = c
        .query_one(&format!("SELECT nextval(pg_get_serial_sequence('{table}', 'id'))"), &[])
        .await
        .map_err(|e| pg.err(e))?;
    col(&row, 0)
}

// ---------------------------------------------------------------- users

const USER_COLS: &str = "id, username, data, password_hash, twofactor_secret IS NOT NULL";

fn user_row(r: &Row) -> Result<UserRecord> {
    Ok(UserRecord {
        id: col(r, 0)?,
        username: col(r, 1)?,
        data: json(r, 2)?,
        password_hash: col(r, 3)?,
        has_twofactor_secret: col(r, 4)?,
    })
}

impl PgStore {
    pub fn users_list(&self) -> Result<Vec<UserRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows =
                c.query(&format!("SELECT {USER_COLS} FROM users ORDER BY id"), &[]).await.map_err(|e| pg.err(e))?;
            rows.iter().map(user_row).collect()
        })
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let username = username.to_string();
        self.run(|pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {USER_COLS} FROM users WHERE username = $1"), &[&username])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(user_row).transpose()
        })
    }

    pub fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {USER_COLS} FROM users WHERE id = $1"), &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(user_row).transpose()
        })
    }

    pub fn user_insert(&self, username: &str, data: &Value, password_hash: Option<&str>) -> Result<i64> {
        let (username, data, hash) = (username.to_string(), data.to_string(), password_hash.map(str::to_string));
        let id = self.run(|pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO users(username, data, password_hash) VALUES($1, $2, $3) RETURNING id",
                    &[&username, &data, &hash],
                )
                .await
                .map_err(|e| pg.unique(e, &format!("user {username}")))?;
            col(&row, 0)
        })?;
        self.users_changed();
        Ok(id)
    }

    /// Replace the row's username and data; `password_hash: Some(x)` sets it (x may be None).
    pub fn user_update(
        &self,
        id: i64,
        username: &str,
        data: &Value,
        password_hash: Option<Option<&str>>,
    ) -> Result<()> {
        let (username, data) = (username.to_string(), data.to_string());
        let hash = password_hash.map(|h| h.map(str::to_string));
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = match hash {
                Some(h) => {
                    c.execute(
                        "UPDATE users SET username = $1, data = $2, password_hash = $3 WHERE id = $4",
                        &[&username, &data, &h, &id],
                    )
                    .await
                }
                None => {
                    c.execute("UPDATE users SET username = $1, data = $2 WHERE id = $3", &[&username, &data, &id]).await
                }
            }
            .map_err(|e| pg.unique(e, &format!("user {username}")))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("user {id}")));
            }
            Ok(())
        })?;
        self.users_changed();
        Ok(())
    }

    /// Delete an account with its API keys and tokens, in one transaction.
    pub fn user_delete_with_credentials(&self, id: i64, username: &str) -> Result<()> {
        let username = username.to_string();
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            tx.execute("DELETE FROM api_keys WHERE username = $1", &[&username]).await.map_err(|e| pg.err(e))?;
            tx.execute("DELETE FROM tokens WHERE username = $1", &[&username]).await.map_err(|e| pg.err(e))?;
            tx.execute("DELETE FROM users WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))?;
            tx.commit().await.map_err(|e| pg.err(e))
        })?;
        self.users_changed();
        Ok(())
    }

    pub fn user_delete(&self, id: i64) -> Result<()> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute("DELETE FROM users WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))?;
            Ok(())
        })?;
        self.users_changed();
        Ok(())
    }

    /// Seal (or clear with `None`) an account's TOTP seed.
    pub fn user_set_twofactor_secret(&self, id: i64, secret: Option<&str>) -> Result<()> {
        let sealed = secret.map(|s| self.seal("users", id, "twofactor_secret", s.as_bytes()));
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute("UPDATE users SET twofactor_secret = $1, totp_last_step = NULL WHERE id = $2", &[&sealed, &id])
                .await
                .map_err(|e| pg.err(e))?;
            Ok(())
        })?;
        self.users_changed();
        Ok(())
    }

    /// See [`crate::Store::user_totp_consume`]: one statement, so two logins
    /// racing with the same code (on any nodes) cannot both win.
    pub fn user_totp_consume(&self, id: i64, step: i64) -> Result<bool> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    "UPDATE users SET totp_last_step = $2 WHERE id = $1 AND (totp_last_step IS NULL OR totp_last_step < $2)",
                    &[&id, &step],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n == 1)
        })
    }

    pub fn user_twofactor_secret(&self, id: i64) -> Result<Option<Zeroizing<String>>> {
        let sealed: Option<Vec<u8>> = self.run(move |pg| async move {
            let c = pg.client().await?;
            let row =
                c.query_opt("SELECT twofactor_secret FROM users WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))?;
            Ok(match row {
                Some(r) => col::<Option<Vec<u8>>>(&r, 0)?,
                None => None,
            })
        })?;
        sealed.map(|s| self.open_sealed("users", "twofactor_secret", id, &s)).transpose()
    }
}

// ---------------------------------------------------------------- api keys

const API_KEY_COLS: &str = "id, name, username, key_hash, created_at, expires_at";

fn api_key_row(r: &Row) -> Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: col(r, 0)?,
        name: col(r, 1)?,
        username: col(r, 2)?,
        key_hash: col(r, 3)?,
        created_at: col(r, 4)?,
        expires_at: col(r, 5)?,
    })
}

impl PgStore {
    pub fn api_keys_list(&self) -> Result<Vec<ApiKeyRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(&format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY id"), &[])
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter().map(api_key_row).collect()
        })
    }

    pub fn api_key_by_id(&self, id: i64) -> Result<Option<ApiKeyRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {API_KEY_COLS} FROM api_keys WHERE id = $1"), &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(api_key_row).transpose()
        })
    }

    /// Insert with a hash computed by the caller from the id it will get: the
    /// id is drawn from the sequence first, then the row written whole.
    pub fn api_key_insert(
        &self,
        name: &str,
        username: &str,
        expires_at: Option<i64>,
        hash_for_id: impl FnOnce(i64) -> String,
    ) -> Result<ApiKeyRecord> {
        let id = self.run(|pg| async move {
            let c = pg.client().await?;
            next_id(&pg, &c, "api_keys").await
        })?;
        let rec = ApiKeyRecord {
            id,
            name: name.to_string(),
            username: username.to_string(),
            key_hash: hash_for_id(id),
            created_at: now_secs(),
            expires_at,
        };
        let row = rec.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "INSERT INTO api_keys(id, name, username, key_hash, created_at, expires_at) VALUES($1, $2, $3, $4, $5, $6)",
                &[&row.id, &row.name, &row.username, &row.key_hash, &row.created_at, &row.expires_at],
            )
            .await
            .map_err(|e| pg.unique(e, &format!("API key {}", row.name)))?;
            Ok(())
        })?;
        Ok(rec)
    }

    /// Delete one key; sessions opened with it look again (the accounts'
    /// generation changes, on other nodes through the notification).
    pub fn api_key_delete(&self, id: i64) -> Result<bool> {
        let deleted = self.run(move |pg| async move {
            let c = pg.client().await?;
            Ok(c.execute("DELETE FROM api_keys WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))? > 0)
        })?;
        self.users_changed();
        Ok(deleted)
    }

    pub fn api_keys_delete_for_user(&self, username: &str) -> Result<()> {
        let username = username.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute("DELETE FROM api_keys WHERE username = $1", &[&username]).await.map_err(|e| pg.err(e))?;
            Ok(())
        })?;
        self.users_changed();
        Ok(())
    }
}

// ---------------------------------------------------------------- tokens

const TOKEN_COLS: &str = "id, username, created_at, expires_at, single_use, origin, attrs";

fn token_row(r: &Row) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: col(r, 0)?,
        username: col(r, 1)?,
        created_at: col(r, 2)?,
        expires_at: col(r, 3)?,
        single_use: col(r, 4)?,
        origin: col(r, 5)?,
        attrs: json(r, 6)?,
    })
}

impl PgStore {
    /// Store a token valid for `ttl_secs` from now, dropping expired ones.
    pub fn token_insert(
        &self,
        token_hash: &str,
        username: &str,
        ttl_secs: i64,
        single_use: bool,
        origin: Option<&str>,
        attrs: &Value,
    ) -> Result<i64> {
        let (hash, username, origin, attrs) =
            (token_hash.to_string(), username.to_string(), origin.map(str::to_string), attrs.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let now = now_secs();
            let reusable = c
                .query_one(
                    "WITH gone AS (DELETE FROM tokens WHERE expires_at < $1 RETURNING single_use)
                     SELECT count(*) FILTER (WHERE NOT single_use) FROM gone",
                    &[&now],
                )
                .await
                .map_err(|e| pg.err(e))?;
            let reusable: i64 = col(&reusable, 0)?;
            let row = c
                .query_one(
                    "INSERT INTO tokens(token_hash, username, created_at, expires_at, single_use, origin, attrs)
                     VALUES($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[&hash, &username, &now, &(now + ttl_secs), &single_use, &origin, &attrs],
                )
                .await
                .map_err(|e| pg.unique(e, "token"))?;
            Ok((col(&row, 0)?, reusable > 0))
        })
        .map(|(id, removed_reusable)| {
            // Sessions opened with a reusable token last as long as it does
            // (other nodes hear of it through migration 0005's trigger).
            if removed_reusable {
                self.users_changed();
            }
            id
        })
    }

    /// Look a token up by hash. A single-use (or expired) token is deleted by
    /// the statement that returns it, so two nodes cannot both take it.
    pub fn token_take(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let hash = token_hash.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let taken = c
                .query_opt(
                    &format!(
                        "DELETE FROM tokens WHERE token_hash = $1 AND (single_use OR expires_at < $2) RETURNING {TOKEN_COLS}"
                    ),
                    &[&hash, &now_secs()],
                )
                .await
                .map_err(|e| pg.err(e))?;
            if let Some(r) = taken {
                return token_row(&r).map(Some);
            }
            let row = c
                .query_opt(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE token_hash = $1"), &[&hash])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(token_row).transpose()
        })
        .inspect(|t| {
            if t.as_ref().is_some_and(|t| !t.single_use && t.expires_at < now_secs()) {
                self.users_changed();
            }
        })
    }

    /// A token by id, whatever its state (sessions opened with a reusable
    /// token check that it is still there).
    pub fn token_by_id(&self, id: i64) -> Result<Option<TokenRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = $1"), &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(token_row).transpose()
        })
    }
}

// ---------------------------------------------------------------- keychain

const KEYCHAIN_COLS: &str = "id, name, type, attributes, private_key IS NOT NULL";

fn keychain_row(r: &Row) -> Result<KeychainRecord> {
    Ok(KeychainRecord {
        id: col(r, 0)?,
        name: col(r, 1)?,
        kind: col(r, 2)?,
        attributes: json(r, 3)?,
        has_private_key: col(r, 4)?,
    })
}

impl PgStore {
    pub fn keychain_list(&self) -> Result<Vec<KeychainRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(&format!("SELECT {KEYCHAIN_COLS} FROM keychain ORDER BY id"), &[])
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter().map(keychain_row).collect()
        })
    }

    pub fn keychain_get(&self, id: i64) -> Result<Option<KeychainRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {KEYCHAIN_COLS} FROM keychain WHERE id = $1"), &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(keychain_row).transpose()
        })
    }

    pub fn keychain_private_key(&self, id: i64) -> Result<Option<Zeroizing<String>>> {
        let sealed: Option<Vec<u8>> = self.run(move |pg| async move {
            let c = pg.client().await?;
            let row =
                c.query_opt("SELECT private_key FROM keychain WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))?;
            Ok(match row {
                Some(r) => col::<Option<Vec<u8>>>(&r, 0)?,
                None => None,
            })
        })?;
        sealed.map(|s| self.open_sealed("keychain", "private_key", id, &s)).transpose()
    }

    /// Insert a credential with its private key already sealed to the row's id.
    pub fn keychain_insert(
        &self,
        name: &str,
        kind: &str,
        attributes: &Value,
        private_key: Option<&str>,
    ) -> Result<i64> {
        let id = self.run(|pg| async move {
            let c = pg.client().await?;
            next_id(&pg, &c, "keychain").await
        })?;
        let sealed = private_key.map(|pk| self.seal("keychain", id, "private_key", pk.as_bytes()));
        let (name, kind, attributes) = (name.to_string(), kind.to_string(), attributes.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "INSERT INTO keychain(id, name, type, attributes, private_key, created_at) VALUES($1, $2, $3, $4, $5, $6)",
                &[&id, &name, &kind, &attributes, &sealed, &now_secs()],
            )
            .await
            .map_err(|e| pg.unique(e, &format!("credential {name}")))?;
            Ok(id)
        })
    }

    /// Replace name, attributes and private key (None clears it) of one row;
    /// changed attributes drop the connection's last test, in the same transaction.
    pub fn keychain_update(&self, id: i64, name: &str, attributes: &Value, private_key: Option<&str>) -> Result<()> {
        let sealed = private_key.map(|pk| self.seal("keychain", id, "private_key", pk.as_bytes()));
        let (name, attrs_value, attributes) = (name.to_string(), attributes.clone(), attributes.to_string());
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            let before = tx
                .query_opt("SELECT attributes FROM keychain WHERE id = $1 FOR UPDATE", &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            let before: Option<String> = before.map(|r| col(&r, 0)).transpose()?;
            let changed = before.and_then(|b| serde_json::from_str::<Value>(&b).ok()).as_ref() != Some(&attrs_value);
            if changed {
                tx.execute("DELETE FROM connection_tests WHERE connection_id = $1", &[&id])
                    .await
                    .map_err(|e| pg.err(e))?;
            }
            let n = tx
                .execute(
                    "UPDATE keychain SET name = $1, attributes = $2, private_key = $3 WHERE id = $4",
                    &[&name, &attributes, &sealed, &id],
                )
                .await
                .map_err(|e| pg.unique(e, &format!("credential {name}")))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("credential {id}")));
            }
            tx.commit().await.map_err(|e| pg.err(e))
        })
    }

    /// Delete several rows at once (a cascade), all or nothing.
    pub fn keychain_delete_many(&self, ids: &[i64]) -> Result<()> {
        let ids = ids.to_vec();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute("DELETE FROM keychain WHERE id = ANY($1)", &[&ids]).await.map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    /// Delete keychain rows and, in the same transaction, disable the tasks
    /// that used any of them and clear their connection (TrueNAS's cascade).
    pub fn keychain_delete_unbinding_tasks(&self, ids: &[i64]) -> Result<Vec<i64>> {
        let ids = ids.to_vec();
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            let rows = tx
                .query(
                    "UPDATE rsync_tasks SET enabled = false, ssh_credentials = NULL
                     WHERE ssh_credentials = ANY($1) RETURNING id",
                    &[&ids],
                )
                .await
                .map_err(|e| pg.err(e))?;
            let mut unbound = rows.iter().map(|r| col::<i64>(r, 0)).collect::<Result<Vec<_>>>()?;
            unbound.sort_unstable();
            tx.execute("DELETE FROM keychain WHERE id = ANY($1)", &[&ids]).await.map_err(|e| pg.err(e))?;
            tx.commit().await.map_err(|e| pg.err(e))?;
            Ok(unbound)
        })
    }
}

// ---------------------------------------------------------------- connection tests, settings, host keys

impl PgStore {
    /// Keep `t` as the connection's last test (replacing the one before).
    pub fn connection_test_record(&self, t: &ConnectionTestRecord) -> Result<()> {
        let t = t.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "INSERT INTO connection_tests(connection_id, ok, stage, error, latency_ms, tested_at)
                 VALUES($1, $2, $3, $4, $5, $6)
                 ON CONFLICT(connection_id) DO UPDATE SET ok = excluded.ok, stage = excluded.stage,
                     error = excluded.error, latency_ms = excluded.latency_ms, tested_at = excluded.tested_at",
                &[&t.connection_id, &t.ok, &t.stage, &t.error, &t.latency_ms, &t.tested_at],
            )
            .await
            .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    /// Last tests of connections that still exist, by connection id.
    pub fn connection_tests(&self) -> Result<Vec<ConnectionTestRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(
                    "SELECT t.connection_id, t.ok, t.stage, t.error, t.latency_ms, t.tested_at FROM connection_tests t
                     JOIN keychain k ON k.id = t.connection_id ORDER BY t.connection_id",
                    &[],
                )
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter()
                .map(|r| {
                    Ok(ConnectionTestRecord {
                        connection_id: col(r, 0)?,
                        ok: col(r, 1)?,
                        stage: col(r, 2)?,
                        error: col(r, 3)?,
                        latency_ms: col(r, 4)?,
                        tested_at: col(r, 5)?,
                    })
                })
                .collect()
        })
    }

    pub fn setting_get(&self, key: &str) -> Result<Option<Value>> {
        let key = key.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c.query_opt("SELECT value FROM settings WHERE key = $1", &[&key]).await.map_err(|e| pg.err(e))?;
            match row {
                None => Ok(None),
                Some(r) => {
                    let s: String = col(&r, 0)?;
                    serde_json::from_str(&s).map(Some).map_err(|e| StoreError::Corrupt(format!("setting {key}: {e}")))
                }
            }
        })
    }

    pub fn setting_set(&self, key: &str, value: &Value) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "INSERT INTO settings(key, value) VALUES($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .await
            .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    pub fn host_keys_list(&self) -> Result<Vec<HostKeyRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows =
                c.query("SELECT algorithm, public_key FROM host_keys ORDER BY id", &[]).await.map_err(|e| pg.err(e))?;
            rows.iter().map(|r| Ok(HostKeyRecord { algorithm: col(r, 0)?, public_key: col(r, 1)? })).collect()
        })
    }

    pub fn host_key_private(&self, algorithm: &str) -> Result<Option<Zeroizing<String>>> {
        let algorithm = algorithm.to_string();
        let row: Option<(i64, Vec<u8>)> = self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt("SELECT id, private_key FROM host_keys WHERE algorithm = $1", &[&algorithm])
                .await
                .map_err(|e| pg.err(e))?;
            row.map(|r| Ok((col(&r, 0)?, col(&r, 1)?))).transpose()
        })?;
        row.map(|(id, s)| self.open_sealed("host_keys", "private_key", id, &s)).transpose()
    }

    pub fn host_key_insert(&self, algorithm: &str, private_key: &str, public_key: &str) -> Result<()> {
        let id = self.run(|pg| async move {
            let c = pg.client().await?;
            next_id(&pg, &c, "host_keys").await
        })?;
        let sealed = self.seal("host_keys", id, "private_key", private_key.as_bytes());
        let (algorithm, public_key) = (algorithm.to_string(), public_key.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "INSERT INTO host_keys(id, algorithm, private_key, public_key) VALUES($1, $2, $3, $4)",
                &[&id, &algorithm, &sealed, &public_key],
            )
            .await
            .map_err(|e| pg.unique(e, &format!("host key {algorithm}")))?;
            Ok(())
        })
    }
}

// ---------------------------------------------------------------- rsync tasks and runs

fn task_row(r: &Row) -> Result<RsyncTaskRecord> {
    Ok(RsyncTaskRecord { id: col(r, 0)?, data: json(r, 1)?, enabled: col(r, 2)?, ssh_credentials: col(r, 3)? })
}

/// A successful run `r` is also its task's last success (what
/// `/metrics` reports); in the caller's transaction.
pub(super) async fn record_last_success(
    pg: &Pg,
    tx: &tokio_postgres::Transaction<'_>,
    r: &RsyncRunRecord,
) -> Result<()> {
    if let (true, Some(at)) = (r.state == "SUCCESS", r.finished) {
        tx.execute(
            "INSERT INTO rsync_last_success(task_id, at) VALUES($1, $2)
             ON CONFLICT(task_id) DO UPDATE SET at = excluded.at",
            &[&r.task_id, &at],
        )
        .await
        .map_err(|e| pg.err(e))?;
    }
    Ok(())
}

fn run_row(r: &Row) -> Result<RsyncRunRecord> {
    Ok(RsyncRunRecord {
        task_id: col(r, 0)?,
        job_id: col(r, 1)?,
        state: col(r, 2)?,
        started: col(r, 3)?,
        finished: col(r, 4)?,
        error: col(r, 5)?,
        log: col(r, 6)?,
    })
}

const RUN_COLS: &str = "task_id, job_id, state, started, finished, error, log";

impl PgStore {
    pub fn rsync_tasks(&self) -> Result<Vec<RsyncTaskRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query("SELECT id, data, enabled, ssh_credentials FROM rsync_tasks ORDER BY id", &[])
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter().map(task_row).collect()
        })
    }

    pub fn rsync_task(&self, id: i64) -> Result<Option<RsyncTaskRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt("SELECT id, data, enabled, ssh_credentials FROM rsync_tasks WHERE id = $1", &[&id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(task_row).transpose()
        })
    }

    pub fn rsync_task_insert(&self, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<i64> {
        let data = data.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO rsync_tasks(data, enabled, ssh_credentials) VALUES($1, $2, $3) RETURNING id",
                    &[&data, &enabled, &ssh_credentials],
                )
                .await
                .map_err(|e| pg.err(e))?;
            col(&row, 0)
        })
    }

    pub fn rsync_task_update(&self, id: i64, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<()> {
        let data = data.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    "UPDATE rsync_tasks SET data = $1, enabled = $2, ssh_credentials = $3 WHERE id = $4",
                    &[&data, &enabled, &ssh_credentials, &id],
                )
                .await
                .map_err(|e| pg.err(e))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("rsync task {id}")));
            }
            Ok(())
        })
    }

    /// Delete a task and its last run.
    pub fn rsync_task_delete(&self, id: i64) -> Result<()> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            if c.execute("DELETE FROM rsync_tasks WHERE id = $1", &[&id]).await.map_err(|e| pg.err(e))? == 0 {
                return Err(StoreError::NotFound(format!("rsync task {id}")));
            }
            Ok(())
        })
    }

    /// Every task's last run, without its log (`log` is empty; see [`PgStore::rsync_run`]).
    pub fn rsync_runs(&self) -> Result<Vec<RsyncRunRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(
                    "SELECT task_id, job_id, state, started, finished, error, '' FROM rsync_runs ORDER BY task_id",
                    &[],
                )
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter().map(run_row).collect()
        })
    }

    pub fn rsync_run(&self, task_id: i64) -> Result<Option<RsyncRunRecord>> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_opt(&format!("SELECT {RUN_COLS} FROM rsync_runs WHERE task_id = $1"), &[&task_id])
                .await
                .map_err(|e| pg.err(e))?;
            row.as_ref().map(run_row).transpose()
        })
    }

    /// Record a task's run (replacing the one before); a successful one is
    /// also the task's last success. One transaction.
    pub fn rsync_run_record(&self, r: &RsyncRunRecord) -> Result<()> {
        let r = r.clone();
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            tx.execute(
                &format!(
                    "INSERT INTO rsync_runs({RUN_COLS}) VALUES($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT(task_id) DO UPDATE SET job_id = excluded.job_id, state = excluded.state,
                         started = excluded.started, finished = excluded.finished, error = excluded.error,
                         log = excluded.log"
                ),
                &[&r.task_id, &r.job_id, &r.state, &r.started, &r.finished, &r.error, &r.log],
            )
            .await
            .map_err(|e| pg.err(e))?;
            record_last_success(&pg, &tx, &r).await?;
            tx.commit().await.map_err(|e| pg.err(e))
        })
    }

    /// Every task's id with the time its last successful run ended; by task id.
    pub fn rsync_last_successes(&self) -> Result<Vec<(i64, Option<f64>)>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(
                    "SELECT t.id, s.at FROM rsync_tasks t LEFT JOIN rsync_last_success s ON s.task_id = t.id ORDER BY t.id",
                    &[],
                )
                .await
                .map_err(|e| pg.err(e))?;
            rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
        })
    }
}

// ---------------------------------------------------------------- audit

pub(super) const AUDIT_COLUMNS: &str = "id, ts, username, address, service, method, event, target, success, error";

pub(super) fn audit_row(r: &Row) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: col(r, 0)?,
        ts: col(r, 1)?,
        entry: AuditEntry {
            username: col(r, 2)?,
            address: col(r, 3)?,
            service: col(r, 4)?,
            method: col(r, 5)?,
            event: col(r, 6)?,
            target: col(r, 7)?,
            success: col(r, 8)?,
            error: col(r, 9)?,
        },
    })
}

impl PgStore {
    pub fn audit_insert(&self, e: &AuditEntry) -> Result<i64> {
        let ts =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.audit_insert_at(ts, e)
    }

    /// [`PgStore::audit_insert`] with a given time (seconds since the epoch).
    pub fn audit_insert_at(&self, ts: f64, e: &AuditEntry) -> Result<i64> {
        let e = e.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO audit(ts, username, address, service, method, event, target, success, error)
                     VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[&ts, &e.username, &e.address, &e.service, &e.method, &e.event, &e.target, &e.success, &e.error],
                )
                .await
                .map_err(|e| pg.err(e))?;
            col(&row, 0)
        })
    }

    /// Every entry, in insertion (`id`) order.
    pub fn audit_list(&self) -> Result<Vec<AuditRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows =
                c.query(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY id"), &[]).await.map_err(|e| pg.err(e))?;
            rows.iter().map(audit_row).collect()
        })
    }

    /// Delete entries older than `older_than_secs`, in batches of
    /// [`AUDIT_PRUNE_BATCH`]. Returns how many rows were deleted.
    pub fn audit_prune(&self, older_than_secs: i64) -> Result<usize> {
        if older_than_secs < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "audit retention of {older_than_secs} seconds: give 0 or more (0 deletes everything older than now)"
            )));
        }
        let cutoff = now_secs().saturating_sub(older_than_secs);
        let batch = AUDIT_PRUNE_BATCH as i64;
        let mut total = 0usize;
        loop {
            let deleted = self.run(move |pg| async move {
                let c = pg.client().await?;
                let n = c
                    .execute(
                        "DELETE FROM audit WHERE id IN
                           (SELECT id FROM audit WHERE trunc(ts)::bigint < $1 LIMIT $2)",
                        &[&cutoff, &batch],
                    )
                    .await
                    .map_err(|e| pg.err(e))?;
                Ok(n as usize)
            })?;
            total += deleted;
            if (deleted as i64) < batch {
                return Ok(total);
            }
        }
    }
}
