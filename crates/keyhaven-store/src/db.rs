//! Opening the database, migrations, the master-key check and key rotation.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use rusqlite_migration::{Migrations, M};

use crate::crypto::{MasterKey, MASTER_KEY_FILE};
use crate::error::{Result, StoreError};

pub const DB_FILE: &str = "keyhaven.db";
const NEW_KEY_SUFFIX: &str = ".new";
const KEY_CHECK: &[u8] = b"keyhaven master key check";

/// Every sealed column: what `rotate-master-key` re-encrypts. A new secret
/// column must be listed here or rotation would leave it unreadable.
pub(crate) const SECRET_COLUMNS: &[(&str, &str)] =
    &[("users", "twofactor_secret"), ("keychain", "private_key"), ("host_keys", "private_key")];

/// Forward-only; never edit a released step, append a new one.
fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("migrations/0001_initial.sql")),
        M::up(include_str!("migrations/0002_connection_tests.sql")),
        M::up(include_str!("migrations/0003_totp_replay.sql")),
        M::up(include_str!("migrations/0004_audit.sql")),
    ])
}

/// The database and the key that seals its secret columns.
pub struct Store {
    conn: Mutex<Connection>,
    key: Mutex<MasterKey>,
    key_path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("key_path", &self.key_path).finish_non_exhaustive()
    }
}

impl Store {
    /// Open (creating on first start) `<dir>/keyhaven.db` and `<dir>/master.key`,
    /// run migrations and check that the key belongs to the database.
    /// Returns the store and whether this was a first start.
    pub fn open(dir: &Path) -> Result<(Store, bool)> {
        let db_path = dir.join(DB_FILE);
        let key_path = dir.join(MASTER_KEY_FILE);
        let first_start = !db_path.exists();
        if first_start {
            // Create the file 0600 ourselves so SQLite never creates it world-readable.
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&db_path)
                .map_err(|e| StoreError::io(&db_path, e))?;
        }
        if !key_path.exists() {
            if !first_start {
                return Err(StoreError::io(
                    &key_path,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the master key is missing but the database exists; restore master.key from your backup",
                    ),
                ));
            }
            MasterKey::generate().create_file(&key_path)?;
        }
        let mut conn = Connection::open(&db_path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a write is acknowledged only once it survives power loss. In
        // WAL mode NORMAL may lose the last commits, e.g. a key pair whose
        // public half pairing already installed on a remote.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations().to_latest(&mut conn)?;

        let key = recover_rotation(&conn, &key_path)?;
        check_or_set_key(&conn, &key, &key_path)?;
        Ok((Store { conn: Mutex::new(conn), key: Mutex::new(key), key_path }, first_start))
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn key(&self) -> MutexGuard<'_, MasterKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` in one transaction; commit on `Ok`, roll back on `Err`.
    pub(crate) fn tx<T>(&self, f: impl FnOnce(&Transaction<'_>, &MasterKey) -> Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let key = self.key();
        let tx = conn.transaction()?;
        let out = f(&tx, &key)?;
        tx.commit()?;
        Ok(out)
    }

    /// Re-encrypt every secret column under a fresh master key, in one
    /// transaction. The new key is written to `master.key.new` before the commit
    /// and renamed over `master.key` after it; `open` finishes or discards a
    /// rotation that a crash interrupted, so no step loses data.
    /// Returns the number of secrets re-encrypted.
    pub fn rotate_master_key(&self) -> Result<usize> {
        let new_key = MasterKey::generate();
        let new_path = new_key_path(&self.key_path);
        let _ = std::fs::remove_file(&new_path);
        let mut conn = self.conn();
        let mut key = self.key();
        let tx = conn.transaction()?;
        let mut count = 0usize;
        for (table, column) in SECRET_COLUMNS {
            let rows: Vec<(i64, Vec<u8>)> = {
                let mut st = tx.prepare(&format!("SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL"))?;
                let it = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                it.collect::<std::result::Result<_, _>>()?
            };
            for (id, sealed) in rows {
                let plain =
                    key.open(table, id, column, &sealed).ok_or(StoreError::Decrypt { table, column, row: id })?;
                let resealed = new_key.seal(table, id, column, &plain);
                tx.execute(&format!("UPDATE {table} SET {column} = ?1 WHERE id = ?2"), params![resealed, id])?;
                count += 1;
            }
        }
        set_key_check(&tx, &new_key)?;
        new_key.create_file(&new_path)?;
        if let Err(e) = tx.commit() {
            let _ = std::fs::remove_file(&new_path);
            return Err(e.into());
        }
        std::fs::rename(&new_path, &self.key_path).map_err(|e| StoreError::io(&self.key_path, e))?;
        if let Some(dir) = self.key_path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        *key = new_key;
        Ok(count)
    }

    /// Path of the key file (for messages).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

fn new_key_path(key_path: &Path) -> PathBuf {
    let mut p = key_path.as_os_str().to_owned();
    p.push(NEW_KEY_SUFFIX);
    PathBuf::from(p)
}

/// A rotation that crashed leaves `master.key.new`. If the database already
/// answers to it the commit happened: finish the rename. Otherwise drop it.
fn recover_rotation(conn: &Connection, key_path: &Path) -> Result<MasterKey> {
    let new_path = new_key_path(key_path);
    if new_path.exists() {
        let new_key = MasterKey::load(&new_path)?;
        if key_check_matches(conn, &new_key)? == Some(true) {
            std::fs::rename(&new_path, key_path).map_err(|e| StoreError::io(key_path, e))?;
            tracing::warn!("finished an interrupted master key rotation");
            return Ok(new_key);
        }
        std::fs::remove_file(&new_path).map_err(|e| StoreError::io(&new_path, e))?;
        tracing::warn!("discarded the key of an interrupted master key rotation (nothing had been committed)");
    }
    MasterKey::load(key_path)
}

fn key_check_matches(conn: &Connection, key: &MasterKey) -> Result<Option<bool>> {
    let sealed: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional()?;
    Ok(sealed.map(|s| key.open("meta", 0, "key_check", &s).is_some_and(|p| p.as_slice() == KEY_CHECK)))
}

fn set_key_check(conn: &Connection, key: &MasterKey) -> Result<()> {
    let sealed = key.seal("meta", 0, "key_check", KEY_CHECK);
    conn.execute(
        "INSERT INTO meta(key, value) VALUES('key_check', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![sealed],
    )?;
    Ok(())
}

fn check_or_set_key(conn: &Connection, key: &MasterKey, key_path: &Path) -> Result<()> {
    match key_check_matches(conn, key)? {
        Some(true) => Ok(()),
        Some(false) => Err(StoreError::WrongMasterKey { path: key_path.to_path_buf() }),
        None => set_key_check(conn, key),
    }
}
