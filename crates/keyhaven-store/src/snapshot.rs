//! Consistent copies of the database and the schema-version rules around them.
//!
//! A copy is made with `VACUUM INTO` on a connection of its own: it reads one
//! snapshot of the database (WAL readers do not block the daemon's writers)
//! and writes a compact, self-contained file (no `-wal`), never a copy of the
//! live file. Used by `keyhaven backup`, `config.save` and the automatic copy
//! taken before migrations. Opening a database whose schema is newer than this
//! binary's is refused with the keyhaven version that made it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::crypto::MasterKey;
use crate::error::{Result, StoreError};

/// The schema version this binary migrates to (the number of migrations).
pub fn latest_schema() -> u32 {
    crate::schema::migration_count() as u32
}

/// The keyhaven release that first shipped each schema version, for messages
/// (the database's own `schema_history` names the release that migrated it;
/// this table covers files from before that table existed).
pub const SCHEMA_RELEASES: &[(u32, &str)] = &[(1, "0.1.0"), (6, "0.1.0"), (7, "0.1.0")];

/// A database's schema version (SQLite's `user_version`, which the migrations keep).
pub fn schema_version(conn: &Connection) -> Result<u32> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?.max(0) as u32)
}

/// The keyhaven version that made a database's schema `version`: the newest
/// row of its `schema_history`, else [`SCHEMA_RELEASES`], else unknown.
fn made_by(conn: &Connection, version: u32) -> Option<String> {
    let from_history: Option<String> = conn
        .query_row(
            "SELECT keyhaven_version FROM schema_history WHERE version >= ?1 ORDER BY version DESC LIMIT 1",
            [version],
            |r| r.get(0),
        )
        .optional()
        .ok()
        .flatten();
    from_history.or_else(|| SCHEMA_RELEASES.iter().find(|(v, _)| *v >= version).map(|(_, r)| r.to_string()))
}

/// Refuse a database whose schema is newer than this binary knows.
pub(crate) fn check_schema_known(conn: &Connection, path: &Path) -> Result<u32> {
    let version = schema_version(conn)?;
    let latest = latest_schema();
    if version > latest {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: version,
            known: latest,
            needed: made_by(conn, version),
        });
    }
    Ok(version)
}

/// Copy the database of `dir` to `dest` (created 0600, must not exist) as one
/// consistent snapshot, whether or not the daemon runs. Returns the copy's
/// schema version. The copy has no journal beside it (`journal_mode=DELETE`).
pub fn snapshot_db(dir: &Path, dest: &Path) -> Result<u32> {
    let src = dir.join(crate::schema::DB_FILE);
    if !src.exists() {
        return Err(StoreError::io(
            &src,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no keyhaven database here; check --data-dir"),
        ));
    }
    let conn = Connection::open_with_flags(&src, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    snapshot_conn(&conn, dest)
}

/// [`snapshot_db`] on an open connection.
pub(crate) fn snapshot_conn(conn: &Connection, dest: &Path) -> Result<u32> {
    // Create the file 0600 first so the copy is never readable by others;
    // VACUUM INTO wants an empty (or absent) file.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| StoreError::io(dest, e))?;
    let dest_str = dest.to_str().ok_or_else(|| StoreError::InvalidArgument("snapshot path is not UTF-8".into()))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", [dest_str]) {
        let _ = std::fs::remove_file(dest);
        return Err(e.into());
    }
    let copy = Connection::open(dest)?;
    copy.pragma_update(None, "journal_mode", "DELETE")?;
    let version = schema_version(&copy)?;
    drop(copy);
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600)).map_err(|e| StoreError::io(dest, e))?;
    std::fs::File::open(dest).and_then(|f| f.sync_all()).map_err(|e| StoreError::io(dest, e))?;
    Ok(version)
}

/// Check a copied database before it is put in place: it is intact, its
/// schema is one this binary knows, and `key` opens it. Returns its schema version.
pub fn check_copy(db: &Path, key_path: &Path) -> Result<u32> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if ok != "ok" {
        return Err(StoreError::Corrupt(format!("{}: {ok}", db.display())));
    }
    let version = check_schema_known(&conn, db)?;
    let key = MasterKey::load(key_path)?;
    match crate::schema::key_check_matches(&conn, &key)? {
        Some(true) => Ok(version),
        Some(false) => Err(StoreError::WrongMasterKey { path: key_path.to_path_buf() }),
        None => Err(StoreError::Corrupt(format!("{} has no master key check", db.display()))),
    }
}

/// Where the copies taken before migrations go, and how many are kept.
pub const PRE_MIGRATE_DIR: &str = "backups";
pub const PRE_MIGRATE_KEEP: usize = 5;

/// Copy the database to `<dir>/backups/pre-migrate-v<from>-<time>.db` (0600)
/// and keep the newest [`PRE_MIGRATE_KEEP`] such copies.
pub(crate) fn pre_migrate_copy(conn: &Connection, dir: &Path, from: u32) -> Result<PathBuf> {
    let backups = dir.join(PRE_MIGRATE_DIR);
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&backups).map_err(|e| StoreError::io(&backups, e))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let dest = backups.join(format!("pre-migrate-v{from}-{}-{:09}.db", now.as_secs(), now.subsec_nanos()));
    snapshot_conn(conn, &dest)?;
    let mut copies: Vec<PathBuf> = std::fs::read_dir(&backups)
        .map_err(|e| StoreError::io(&backups, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("pre-migrate-") && n.ends_with(".db"))
        })
        .collect();
    // Oldest first by the time in the name (seconds, then nanoseconds: fixed width).
    copies.sort_by_key(|p| {
        let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let mut parts = n.trim_end_matches(".db").rsplitn(3, '-');
        let nanos = parts.next().unwrap_or_default().to_string();
        let secs: u64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        (secs, nanos)
    });
    while copies.len() > PRE_MIGRATE_KEEP {
        let old = copies.remove(0);
        std::fs::remove_file(&old).map_err(|e| StoreError::io(&old, e))?;
    }
    Ok(dest)
}

/// Record in `schema_history` that this binary migrated from `from` to `to`.
pub(crate) fn record_migration(conn: &Connection, from: u32, to: u32) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    conn.execute(
        "INSERT OR REPLACE INTO schema_history(version, from_version, keyhaven_version, applied_at) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![to, from, env!("CARGO_PKG_VERSION"), now],
    )?;
    Ok(())
}
