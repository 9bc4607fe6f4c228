//! Typed access to each table. Secret columns are sealed on the way in and
//! opened on the way out; nothing here decides what is valid.

use rusqlite::{params, OptionalExtension, Row};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::db::SqliteStore;
use crate::error::{Result, StoreError};

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub(crate) fn json_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<Value> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e)))
}

fn map_unique(e: rusqlite::Error, what: &str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            StoreError::Conflict(what.to_string())
        }
        _ => e.into(),
    }
}

fn utf8(bytes: Zeroizing<Vec<u8>>, table: &'static str, column: &'static str, row: i64) -> Result<Zeroizing<String>> {
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_string())),
        Err(_) => Err(StoreError::Decrypt { table, column, row }),
    }
}

// ---------------------------------------------------------------- users

/// An account row. `data` holds the non-secret TrueNAS fields; `Debug`
/// never shows the password hash.
#[derive(Clone)]
pub struct UserRecord {
    pub id: i64,
    pub username: String,
    pub data: Value,
    pub password_hash: Option<String>,
    pub has_twofactor_secret: bool,
}

impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("id", &self.id)
            .field("username", &self.username)
            .field("data", &self.data)
            .field("password_hash", &self.password_hash.as_ref().map(|_| "[REDACTED]"))
            .field("has_twofactor_secret", &self.has_twofactor_secret)
            .finish()
    }
}

const USER_COLS: &str = "id, username, data, password_hash, twofactor_secret IS NOT NULL";

fn user_row(r: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        id: r.get(0)?,
        username: r.get(1)?,
        data: json_col(r, 2)?,
        password_hash: r.get(3)?,
        has_twofactor_secret: r.get(4)?,
    })
}

impl SqliteStore {
    pub fn users_list(&self) -> Result<Vec<UserRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users ORDER BY id"))?;
        let rows = st.query_map([], user_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE username = ?1"))?;
        Ok(st.query_row([username], user_row).optional()?)
    }

    pub fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {USER_COLS} FROM users WHERE id = ?1"))?;
        Ok(st.query_row([id], user_row).optional()?)
    }

    pub fn user_insert(&self, username: &str, data: &Value, password_hash: Option<&str>) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO users(username, data, password_hash) VALUES(?1, ?2, ?3)",
            params![username, data.to_string(), password_hash],
        )
        .map_err(|e| map_unique(e, &format!("user {username}")))?;
        let id = conn.last_insert_rowid();
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
        let conn = self.conn();
        let n = match password_hash {
            Some(h) => conn.execute(
                "UPDATE users SET username = ?1, data = ?2, password_hash = ?3 WHERE id = ?4",
                params![username, data.to_string(), h, id],
            ),
            None => conn.execute(
                "UPDATE users SET username = ?1, data = ?2 WHERE id = ?3",
                params![username, data.to_string(), id],
            ),
        }
        .map_err(|e| map_unique(e, &format!("user {username}")))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user {id}")));
        }
        self.users_changed();
        Ok(())
    }

    /// Delete an account with its API keys and tokens, in one transaction.
    pub fn user_delete_with_credentials(&self, id: i64, username: &str) -> Result<()> {
        self.tx(|tx, _| {
            tx.execute("DELETE FROM api_keys WHERE username = ?1", [username])?;
            tx.execute("DELETE FROM tokens WHERE username = ?1", [username])?;
            tx.execute("DELETE FROM users WHERE id = ?1", [id])?;
            Ok(())
        })?;
        self.users_changed();
        Ok(())
    }

    pub fn user_delete(&self, id: i64) -> Result<()> {
        let conn = self.conn();
        conn.execute("DELETE FROM users WHERE id = ?1", [id])?;
        self.users_changed();
        Ok(())
    }

    /// Seal (or clear with `None`) an account's TOTP seed.
    pub fn user_set_twofactor_secret(&self, id: i64, secret: Option<&str>) -> Result<()> {
        let key = self.key();
        let sealed = secret.map(|s| key.seal("users", id, "twofactor_secret", s.as_bytes()));
        let conn = self.conn();
        conn.execute(
            "UPDATE users SET twofactor_secret = ?1, totp_last_step = NULL WHERE id = ?2",
            params![sealed, id],
        )?;
        self.users_changed();
        Ok(())
    }

    /// Record that account `id` used the one-time password of time step
    /// `step`. `false` when that step (or a later one) was already used: the
    /// code is a replay and must be refused. One statement, so two logins
    /// racing with the same code cannot both win.
    pub fn user_totp_consume(&self, id: i64, step: i64) -> Result<bool> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE users SET totp_last_step = ?2 WHERE id = ?1 AND (totp_last_step IS NULL OR totp_last_step < ?2)",
            params![id, step],
        )?;
        Ok(n == 1)
    }

    pub fn user_twofactor_secret(&self, id: i64) -> Result<Option<Zeroizing<String>>> {
        let sealed: Option<Option<Vec<u8>>> = {
            let conn = self.conn();
            conn.query_row("SELECT twofactor_secret FROM users WHERE id = ?1", [id], |r| r.get(0)).optional()?
        };
        match sealed.flatten() {
            None => Ok(None),
            Some(s) => {
                let plain = self.key().open("users", id, "twofactor_secret", &s).ok_or(StoreError::Decrypt {
                    table: "users",
                    column: "twofactor_secret",
                    row: id,
                })?;
                Ok(Some(utf8(plain, "users", "twofactor_secret", id)?))
            }
        }
    }
}

// ---------------------------------------------------------------- api keys

#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: i64,
    pub name: String,
    pub username: String,
    pub key_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

fn api_key_row(r: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        username: r.get(2)?,
        key_hash: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
    })
}

const API_KEY_COLS: &str = "id, name, username, key_hash, created_at, expires_at";

impl SqliteStore {
    pub fn api_keys_list(&self) -> Result<Vec<ApiKeyRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {API_KEY_COLS} FROM api_keys ORDER BY id"))?;
        let rows = st.query_map([], api_key_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn api_key_by_id(&self, id: i64) -> Result<Option<ApiKeyRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {API_KEY_COLS} FROM api_keys WHERE id = ?1"))?;
        Ok(st.query_row([id], api_key_row).optional()?)
    }

    /// Insert with a hash computed by the caller from the id it will get: the
    /// closure receives the new id and returns the hash to store.
    pub fn api_key_insert(
        &self,
        name: &str,
        username: &str,
        expires_at: Option<i64>,
        hash_for_id: impl FnOnce(i64) -> String,
    ) -> Result<ApiKeyRecord> {
        self.tx(|tx, _| {
            let created = now_secs();
            tx.execute(
                "INSERT INTO api_keys(name, username, key_hash, created_at, expires_at) VALUES(?1, ?2, '', ?3, ?4)",
                params![name, username, created, expires_at],
            )
            .map_err(|e| map_unique(e, &format!("API key {name}")))?;
            let id = tx.last_insert_rowid();
            let hash = hash_for_id(id);
            tx.execute("UPDATE api_keys SET key_hash = ?1 WHERE id = ?2", params![hash, id])?;
            Ok(ApiKeyRecord {
                id,
                name: name.to_string(),
                username: username.to_string(),
                key_hash: hash,
                created_at: created,
                expires_at,
            })
        })
    }

    /// Delete one key; sessions opened with it look again (the accounts'
    /// generation changes).
    pub fn api_key_delete(&self, id: i64) -> Result<bool> {
        let n = self.conn().execute("DELETE FROM api_keys WHERE id = ?1", [id])?;
        self.users_changed();
        Ok(n > 0)
    }

    pub fn api_keys_delete_for_user(&self, username: &str) -> Result<()> {
        self.conn().execute("DELETE FROM api_keys WHERE username = ?1", [username])?;
        self.users_changed();
        Ok(())
    }
}

// ---------------------------------------------------------------- tokens

#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: i64,
    pub username: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub single_use: bool,
    pub origin: Option<String>,
    pub attrs: Value,
}

/// The columns [`token_row`] reads, in order.
const TOKEN_COLS: &str = "id, username, created_at, expires_at, single_use, origin, attrs";

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        username: r.get(1)?,
        created_at: r.get(2)?,
        expires_at: r.get(3)?,
        single_use: r.get(4)?,
        origin: r.get(5)?,
        attrs: json_col(r, 6)?,
    })
}

impl SqliteStore {
    /// Store a token valid for `ttl_secs` from now (one clock reading, so
    /// `expires_at - created_at` is exactly the lifetime).
    pub fn token_insert(
        &self,
        token_hash: &str,
        username: &str,
        ttl_secs: i64,
        single_use: bool,
        origin: Option<&str>,
        attrs: &Value,
    ) -> Result<i64> {
        let conn = self.conn();
        let now = now_secs();
        // Sessions opened with a reusable token last as long as it does:
        // removing one moves the accounts' generation, so they look again.
        let reusable = conn.execute("DELETE FROM tokens WHERE expires_at < ?1 AND NOT single_use", [now])?;
        conn.execute("DELETE FROM tokens WHERE expires_at < ?1", [now])?;
        if reusable > 0 {
            self.users_changed();
        }
        conn.execute(
            "INSERT INTO tokens(token_hash, username, created_at, expires_at, single_use, origin, attrs)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![token_hash, username, now, now + ttl_secs, single_use, origin, attrs.to_string()],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// Look a token up by hash. A single-use token is deleted in the same
    /// statement sequence, under the connection lock, so it cannot be used twice.
    pub fn token_take(&self, token_hash: &str) -> Result<Option<TokenRecord>> {
        let conn = self.conn();
        let rec = conn
            .query_row(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE token_hash = ?1"), [token_hash], token_row)
            .optional()?;
        if let Some(t) = &rec {
            if t.single_use || t.expires_at < now_secs() {
                conn.execute("DELETE FROM tokens WHERE id = ?1", [t.id])?;
                if !t.single_use {
                    self.users_changed();
                }
            }
        }
        Ok(rec)
    }

    /// A token by id, whatever its state (sessions opened with a reusable
    /// token check that it is still there).
    pub fn token_by_id(&self, id: i64) -> Result<Option<TokenRecord>> {
        let conn = self.conn();
        Ok(conn.query_row(&format!("SELECT {TOKEN_COLS} FROM tokens WHERE id = ?1"), [id], token_row).optional()?)
    }
}

// ---------------------------------------------------------------- keychain

/// A keychain credential without its private key (opened on demand).
#[derive(Debug, Clone)]
pub struct KeychainRecord {
    pub id: i64,
    pub name: String,
    pub kind: String,
    pub attributes: Value,
    pub has_private_key: bool,
}

const KEYCHAIN_COLS: &str = "id, name, type, attributes, private_key IS NOT NULL";

fn keychain_row(r: &Row<'_>) -> rusqlite::Result<KeychainRecord> {
    Ok(KeychainRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        attributes: json_col(r, 3)?,
        has_private_key: r.get(4)?,
    })
}

impl SqliteStore {
    pub fn keychain_list(&self) -> Result<Vec<KeychainRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {KEYCHAIN_COLS} FROM keychain ORDER BY id"))?;
        let rows = st.query_map([], keychain_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn keychain_get(&self, id: i64) -> Result<Option<KeychainRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {KEYCHAIN_COLS} FROM keychain WHERE id = ?1"))?;
        Ok(st.query_row([id], keychain_row).optional()?)
    }

    pub fn keychain_private_key(&self, id: i64) -> Result<Option<Zeroizing<String>>> {
        let sealed: Option<Option<Vec<u8>>> = {
            let conn = self.conn();
            let mut st = conn.prepare_cached("SELECT private_key FROM keychain WHERE id = ?1")?;
            st.query_row([id], |r| r.get(0)).optional()?
        };
        match sealed.flatten() {
            None => Ok(None),
            Some(s) => {
                let plain = self.key().open("keychain", id, "private_key", &s).ok_or(StoreError::Decrypt {
                    table: "keychain",
                    column: "private_key",
                    row: id,
                })?;
                Ok(Some(utf8(plain, "keychain", "private_key", id)?))
            }
        }
    }

    /// Insert a credential; the private key is sealed to the new row id in the
    /// same transaction, so no row ever holds a plaintext or misplaced key.
    pub fn keychain_insert(
        &self,
        name: &str,
        kind: &str,
        attributes: &Value,
        private_key: Option<&str>,
    ) -> Result<i64> {
        self.tx(|tx, key| {
            tx.execute(
                "INSERT INTO keychain(name, type, attributes, private_key, created_at) VALUES(?1, ?2, ?3, NULL, ?4)",
                params![name, kind, attributes.to_string(), now_secs()],
            )
            .map_err(|e| map_unique(e, &format!("credential {name}")))?;
            let id = tx.last_insert_rowid();
            if let Some(pk) = private_key {
                let sealed = key.seal("keychain", id, "private_key", pk.as_bytes());
                tx.execute("UPDATE keychain SET private_key = ?1 WHERE id = ?2", params![sealed, id])?;
            }
            Ok(id)
        })
    }

    /// Replace name, attributes and private key (None clears it) of one row.
    pub fn keychain_update(&self, id: i64, name: &str, attributes: &Value, private_key: Option<&str>) -> Result<()> {
        self.tx(|tx, key| {
            let sealed = private_key.map(|pk| key.seal("keychain", id, "private_key", pk.as_bytes()));
            let before: Option<String> =
                tx.query_row("SELECT attributes FROM keychain WHERE id = ?1", [id], |r| r.get(0)).optional()?;
            let changed = before.and_then(|b| serde_json::from_str::<Value>(&b).ok()).as_ref() != Some(attributes);
            if changed {
                // A connection's last test was of its old settings.
                tx.execute("DELETE FROM connection_tests WHERE connection_id = ?1", [id])?;
            }
            let n = tx
                .execute(
                    "UPDATE keychain SET name = ?1, attributes = ?2, private_key = ?3 WHERE id = ?4",
                    params![name, attributes.to_string(), sealed, id],
                )
                .map_err(|e| map_unique(e, &format!("credential {name}")))?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("credential {id}")));
            }
            Ok(())
        })
    }

    /// Delete several rows at once (a cascade), all or nothing.
    pub fn keychain_delete_many(&self, ids: &[i64]) -> Result<()> {
        self.tx(|tx, _| {
            for id in ids {
                tx.execute("DELETE FROM keychain WHERE id = ?1", [id])?;
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------- connection tests

/// The last test of one SSH connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionTestRecord {
    pub connection_id: i64,
    pub ok: bool,
    pub stage: String,
    pub error: Option<String>,
    pub latency_ms: i64,
    pub tested_at: i64,
}

impl SqliteStore {
    /// Keep `t` as the connection's last test (replacing the one before).
    pub fn connection_test_record(&self, t: &ConnectionTestRecord) -> Result<()> {
        self.conn().execute(
            "INSERT INTO connection_tests(connection_id, ok, stage, error, latency_ms, tested_at)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(connection_id) DO UPDATE SET ok = excluded.ok, stage = excluded.stage,
                 error = excluded.error, latency_ms = excluded.latency_ms, tested_at = excluded.tested_at",
            params![t.connection_id, t.ok, t.stage, t.error, t.latency_ms, t.tested_at],
        )?;
        Ok(())
    }

    /// Last tests of connections that still exist, by connection id.
    pub fn connection_tests(&self) -> Result<Vec<ConnectionTestRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT t.connection_id, t.ok, t.stage, t.error, t.latency_ms, t.tested_at FROM connection_tests t
             JOIN keychain k ON k.id = t.connection_id ORDER BY t.connection_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(ConnectionTestRecord {
                connection_id: r.get(0)?,
                ok: r.get(1)?,
                stage: r.get(2)?,
                error: r.get(3)?,
                latency_ms: r.get(4)?,
                tested_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

// ---------------------------------------------------------------- settings, host keys

#[derive(Debug, Clone)]
pub struct HostKeyRecord {
    pub algorithm: String,
    pub public_key: String,
}

/// One login-limiter key's failures as shared by every node (PostgreSQL only:
/// on SQLite the one node's memory is the state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFailureRecord {
    pub key: String,
    /// Failures in the current window.
    pub failures: u32,
    /// The last failure, Unix seconds.
    pub last_at: i64,
    /// Locked until then (Unix seconds), once the key's limit was reached.
    pub locked_until: Option<i64>,
}

/// What counting one failure for a key came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginFailure {
    pub failures: u32,
    /// This failure locked the key (exactly one node sees `true`).
    pub locked_now: bool,
}

impl SqliteStore {
    pub fn setting_get(&self, key: &str) -> Result<Option<Value>> {
        let conn = self.conn();
        let s: Option<String> =
            conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0)).optional()?;
        match s {
            None => Ok(None),
            Some(s) => {
                serde_json::from_str(&s).map(Some).map_err(|e| StoreError::Corrupt(format!("setting {key}: {e}")))
            }
        }
    }

    pub fn setting_set(&self, key: &str, value: &Value) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO settings(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value.to_string()],
        )?;
        Ok(())
    }

    pub fn host_keys_list(&self) -> Result<Vec<HostKeyRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT algorithm, public_key FROM host_keys ORDER BY id")?;
        let rows = st
            .query_map([], |r| Ok(HostKeyRecord { algorithm: r.get(0)?, public_key: r.get(1)? }))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn host_key_private(&self, algorithm: &str) -> Result<Option<Zeroizing<String>>> {
        let row: Option<(i64, Vec<u8>)> = {
            let conn = self.conn();
            conn.query_row("SELECT id, private_key FROM host_keys WHERE algorithm = ?1", [algorithm], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
        };
        match row {
            None => Ok(None),
            Some((id, s)) => {
                let plain = self.key().open("host_keys", id, "private_key", &s).ok_or(StoreError::Decrypt {
                    table: "host_keys",
                    column: "private_key",
                    row: id,
                })?;
                Ok(Some(utf8(plain, "host_keys", "private_key", id)?))
            }
        }
    }

    pub fn host_key_insert(&self, algorithm: &str, private_key: &str, public_key: &str) -> Result<()> {
        self.tx(|tx, key| {
            tx.execute(
                "INSERT INTO host_keys(algorithm, private_key, public_key) VALUES(?1, x'', ?2)",
                params![algorithm, public_key],
            )
            .map_err(|e| map_unique(e, &format!("host key {algorithm}")))?;
            let id = tx.last_insert_rowid();
            let sealed = key.seal("host_keys", id, "private_key", private_key.as_bytes());
            tx.execute("UPDATE host_keys SET private_key = ?1 WHERE id = ?2", params![sealed, id])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_record_debug_hides_the_password_hash() {
        let r = UserRecord {
            id: 1,
            username: "alice".into(),
            data: json!({}),
            password_hash: Some("$6$salt$hashvalue".into()),
            has_twofactor_secret: false,
        };
        let shown = format!("{r:?}");
        assert!(!shown.contains("hashvalue"), "{shown}");
        assert!(shown.contains("[REDACTED]") && shown.contains("alice"), "{shown}");
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let (s, first) = SqliteStore::open(d.path()).unwrap();
        assert!(first);
        (d, s)
    }

    #[test]
    fn keychain_secret_never_plaintext_on_disk_and_rotation_keeps_it() {
        let (d, s) = store();
        let secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAsecretmaterialZZZZ\n-----END OPENSSH PRIVATE KEY-----\n";
        let id =
            s.keychain_insert("k", "SSH_KEY_PAIR", &json!({"public_key": "ssh-ed25519 AAAA"}), Some(secret)).unwrap();
        s.user_insert("alice", &json!({}), None).unwrap();
        let uid = s.user_by_name("alice").unwrap().unwrap().id;
        s.user_set_twofactor_secret(uid, Some("JBSWY3DPEHPK3PXP")).unwrap();
        s.host_key_insert("ssh-ed25519", "HOSTSECRETMATERIAL", "ssh-ed25519 AAAA").unwrap();
        assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), secret);

        let n = s.rotate_master_key().unwrap();
        assert_eq!(n, 3);
        assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), secret);
        assert_eq!(s.user_twofactor_secret(uid).unwrap().unwrap().as_str(), "JBSWY3DPEHPK3PXP");
        assert_eq!(s.host_key_private("ssh-ed25519").unwrap().unwrap().as_str(), "HOSTSECRETMATERIAL");
        drop(s);

        // Reopen with the rotated key file.
        let (s2, first) = SqliteStore::open(d.path()).unwrap();
        assert!(!first);
        assert_eq!(s2.keychain_private_key(id).unwrap().unwrap().as_str(), secret);
        drop(s2);
        // Checkpoint the WAL so every page is in the main file, then scan all files.
        let c = rusqlite::Connection::open(d.path().join(crate::DB_FILE)).unwrap();
        c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
        drop(c);
        for entry in std::fs::read_dir(d.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for needle in [&b"secretmaterial"[..], b"HOSTSECRETMATERIAL", b"JBSWY3DPEHPK3PXP"] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle));
            }
        }
    }

    #[test]
    fn interrupted_rotation_is_recovered_either_way() {
        let (d, s) = store();
        let id = s.keychain_insert("k", "SSH_KEY_PAIR", &json!({}), Some("PRIV")).unwrap();
        drop(s);
        // Crash before commit: a stray master.key.new that the DB does not answer to.
        let stray = d.path().join("master.key.new");
        crate::MasterKey::generate().create_file(&stray).unwrap();
        let (s, _) = SqliteStore::open(d.path()).unwrap();
        assert!(!stray.exists());
        assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), "PRIV");

        // Crash after commit, before rename: the DB answers to master.key.new.
        s.rotate_master_key().unwrap();
        drop(s);
        let key_path = d.path().join("master.key");
        std::fs::rename(&key_path, &stray).unwrap();
        // Put back some other (old) key in master.key.
        crate::MasterKey::generate().create_file(&key_path).unwrap();
        let (s, _) = SqliteStore::open(d.path()).unwrap();
        assert!(!stray.exists());
        assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), "PRIV");
    }

    #[test]
    fn connection_tests_keep_the_last_one_and_go_with_the_connection() {
        let (d, s) = store();
        let c1 = s.keychain_insert("c1", "SSH_CREDENTIALS", &json!({}), None).unwrap();
        let c2 = s.keychain_insert("c2", "SSH_CREDENTIALS", &json!({}), None).unwrap();
        let t = |id, ok, stage: &str, at| ConnectionTestRecord {
            connection_id: id,
            ok,
            stage: stage.into(),
            error: (!ok).then(|| "HOST KEY MISMATCH".to_string()),
            latency_ms: 12,
            tested_at: at,
        };
        s.connection_test_record(&t(c1, false, "host_key", 100)).unwrap();
        s.connection_test_record(&t(c1, true, "exec", 200)).unwrap();
        s.connection_test_record(&t(c2, false, "auth", 300)).unwrap();
        assert_eq!(s.connection_tests().unwrap(), vec![t(c1, true, "exec", 200), t(c2, false, "auth", 300)]);
        s.keychain_delete_many(&[c2]).unwrap();
        assert_eq!(s.connection_tests().unwrap(), vec![t(c1, true, "exec", 200)]);
        // No row for a connection that does not exist (a test that outlived its connection).
        assert!(s.connection_test_record(&t(c2, true, "exec", 400)).is_err());
        // A rename keeps the status; changed settings clear it.
        s.keychain_update(c1, "renamed", &json!({}), None).unwrap();
        assert_eq!(s.connection_tests().unwrap().len(), 1);
        let c3 = s.keychain_insert("c3", "SSH_CREDENTIALS", &json!({"port": 22}), None).unwrap();
        s.connection_test_record(&t(c3, true, "exec", 500)).unwrap();
        s.keychain_update(c3, "c3", &json!({"port": 2222}), None).unwrap();
        assert_eq!(s.connection_tests().unwrap(), vec![t(c1, true, "exec", 200)]);
        drop(s);
        let (s, _) = SqliteStore::open(d.path()).unwrap();
        assert_eq!(s.connection_tests().unwrap(), vec![t(c1, true, "exec", 200)], "kept across a restart");
    }

    #[test]
    fn wrong_master_key_is_refused() {
        let (d, s) = store();
        drop(s);
        let key_path = d.path().join("master.key");
        std::fs::remove_file(&key_path).unwrap();
        crate::MasterKey::generate().create_file(&key_path).unwrap();
        assert!(matches!(SqliteStore::open(d.path()), Err(StoreError::WrongMasterKey { .. })));
    }

    #[test]
    fn unique_names_and_single_use_tokens() {
        let (_d, s) = store();
        s.keychain_insert("a", "SSH_KEY_PAIR", &json!({}), None).unwrap();
        assert!(matches!(s.keychain_insert("a", "SSH_CREDENTIALS", &json!({}), None), Err(StoreError::Conflict(_))));
        s.token_insert("h1", "admin", 60, true, None, &json!({})).unwrap();
        assert!(s.token_take("h1").unwrap().is_some());
        assert!(s.token_take("h1").unwrap().is_none());
    }
}
