//! The embedded SQLite backend: opening the database, migrations, the
//! master-key check, key rotation and group commit.

use std::fs::OpenOptions;
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use rusqlite::{params, Connection, Transaction};

use crate::crypto::{MasterKey, MASTER_KEY_FILE};
use crate::error::{Result, StoreError};
use crate::schema::{key_check_matches, migrations, DB_FILE, KEY_CHECK};

const NEW_KEY_SUFFIX: &str = ".new";

/// Every sealed column: what `rotate-master-key` re-encrypts. A new secret
/// column must be listed here or rotation would leave it unreadable.
pub(crate) const SECRET_COLUMNS: &[(&str, &str)] =
    &[("users", "twofactor_secret"), ("keychain", "private_key"), ("host_keys", "private_key")];

/// The embedded SQLite backend: the database and the key that seals its
/// secret columns. Reached through [`crate::Store`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
    key: Mutex<MasterKey>,
    key_path: PathBuf,
    syncer: std::sync::Arc<Syncer>,
    /// Bumped after every committed change to the `users` table, so that
    /// sessions can tell, without I/O, whether what they know of their
    /// account (locked, role, deleted) may be stale.
    users_generation: std::sync::atomic::AtomicU64,
}

thread_local! {
    /// Inside [`SqliteStore::deferring_sync`]: the newest commit whose wait was deferred.
    static DEFERRED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// A promise that some writes will be durable; [`SyncTicket::wait`] keeps it.
#[must_use = "the writes are not acknowledged as durable until the ticket is waited on"]
pub struct SyncTicket {
    /// `None` on PostgreSQL, where a commit is durable when it returns.
    syncer: Option<std::sync::Arc<Syncer>>,
    upto: u64,
}

impl SyncTicket {
    /// Block until the writes are on disk.
    pub fn wait(self) {
        if let (Some(syncer), true) = (&self.syncer, self.upto > 0) {
            syncer.wait(self.upto);
        }
    }

    /// A ticket with nothing to wait for.
    pub(crate) fn done() -> SyncTicket {
        SyncTicket { syncer: None, upto: 0 }
    }

    /// Whether nothing is left to wait for (already synced by someone else).
    pub fn is_done(&self) -> bool {
        match &self.syncer {
            Some(syncer) => self.upto == 0 || syncer.lock().synced >= self.upto,
            None => true,
        }
    }
}

/// Durable writes with shared fsyncs (group commit).
///
/// The connection runs WAL with `synchronous=NORMAL`, so a commit appends to
/// the WAL without syncing it. Every write is nevertheless acknowledged only
/// once durable: when a [`Conn`] guard that changed rows is released, it waits
/// until an `fdatasync` of the WAL that started after its commit has
/// finished. That is what `synchronous=FULL` does per commit (sync the WAL
/// before the commit returns); here writers that commit while a sync is
/// running share the next one instead of each paying their own. Checkpoints
/// sync the database file themselves under NORMAL, so the WAL is all that is
/// ever at risk.
struct Syncer {
    wal: PathBuf,
    dir: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
    /// A slow disk, for the group-commit test (tmpfs syncs take no time).
    #[cfg(test)]
    test_slow_disk: std::time::Duration,
}

#[derive(Default)]
struct SyncState {
    /// Commits counted so far (each a number, in commit order).
    committed: u64,
    /// Every commit up to this number is on disk.
    synced: u64,
    syncing: bool,
    /// fsyncs run (for tests and figures).
    syncs: u64,
    dir_synced: bool,
}

impl Syncer {
    fn new(db_path: &Path) -> Syncer {
        let mut wal = db_path.as_os_str().to_owned();
        wal.push("-wal");
        Syncer {
            wal: PathBuf::from(wal),
            dir: db_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
            #[cfg(test)]
            test_slow_disk: std::time::Duration::ZERO,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number a commit; called while the connection is still held, so the
    /// numbers follow the order of the commits.
    fn committed(&self) -> u64 {
        let mut s = self.lock();
        s.committed += 1;
        s.committed
    }

    /// Block until commit `n` is on disk, running the sync when nobody is.
    fn wait(&self, n: u64) {
        let mut s = self.lock();
        loop {
            if s.synced >= n {
                return;
            }
            if s.syncing {
                s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.syncing = true;
            let target = s.committed;
            let sync_dir = !s.dir_synced;
            drop(s);
            let r = self.sync_files(sync_dir);
            s = self.lock();
            s.syncing = false;
            s.syncs += 1;
            match r {
                Ok(()) => {
                    s.dir_synced = true;
                }
                Err(e) => {
                    // Nothing sensible to retry forever: say so loudly; the
                    // write itself has committed.
                    tracing::error!(
                        "could not sync the database journal {} to disk ({e}); recent writes may be lost on power failure",
                        self.wal.display()
                    );
                }
            }
            s.synced = s.synced.max(target);
            self.done.notify_all();
        }
    }

    fn sync_files(&self, sync_dir: bool) -> std::io::Result<()> {
        #[cfg(test)]
        std::thread::sleep(self.test_slow_disk);
        match std::fs::File::open(&self.wal) {
            Ok(f) => f.sync_data()?,
            // No WAL: everything is in the (checkpointed, synced) database file.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        if sync_dir {
            // The WAL's directory entry, once: a new file must survive too.
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The connection, held; released by drop. When the holder changed rows, the
/// drop waits until they are durable (see [`Syncer`]).
pub(crate) struct Conn<'a> {
    guard: Option<MutexGuard<'a, Connection>>,
    syncer: Option<&'a Syncer>,
    changes_before: u64,
}

impl Deref for Conn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.guard.as_ref().expect("held until drop")
    }
}

impl DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        let wrote = guard.total_changes() != self.changes_before && guard.is_autocommit();
        match (self.syncer, wrote) {
            (Some(syncer), true) => {
                let n = syncer.committed();
                drop(guard);
                let deferred = DEFERRED.with(|d| match d.get() {
                    Some(prev) => {
                        d.set(Some(prev.max(n)));
                        true
                    }
                    None => false,
                });
                if !deferred {
                    syncer.wait(n);
                }
            }
            _ => drop(guard),
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("key_path", &self.key_path).finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open (creating on first start) `<dir>/keyhaven.db` and `<dir>/master.key`,
    /// run migrations and check that the key belongs to the database.
    /// Returns the store and whether this was a first start.
    pub fn open(dir: &Path) -> Result<(SqliteStore, bool)> {
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
        // NORMAL plus the Syncer's group commit: as durable as FULL (no write
        // is acknowledged before it survives power loss, e.g. a key pair whose
        // public half pairing already installed on a remote), with one fsync
        // shared by every writer that commits while another one syncs.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // A newer keyhaven's database is refused before anything touches it.
        let from = crate::snapshot::check_schema_known(&conn, &db_path)?;
        let latest = crate::snapshot::latest_schema();
        if from < latest && from > 0 {
            // Upgrades keep data: a consistent copy first, then the migration.
            let copy = crate::snapshot::pre_migrate_copy(&conn, dir, from)?;
            tracing::info!(
                "database schema {from} is older than this keyhaven's ({latest}): copied it to {} before migrating",
                copy.display()
            );
        }
        migrations().to_latest(&mut conn)?;
        if from < latest {
            crate::snapshot::record_migration(&conn, from, latest)?;
        }

        let key = recover_rotation(&conn, &key_path)?;
        check_or_set_key(&conn, &key, &key_path)?;
        let syncer = std::sync::Arc::new(Syncer::new(&db_path));
        let store = SqliteStore {
            conn: Mutex::new(conn),
            key: Mutex::new(key),
            key_path,
            syncer,
            users_generation: std::sync::atomic::AtomicU64::new(1),
        };
        Ok((store, first_start))
    }

    /// The connection; a holder that writes returns only once the write is durable.
    pub(crate) fn conn(&self) -> Conn<'_> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let changes_before = guard.total_changes();
        Conn { guard: Some(guard), syncer: Some(&self.syncer), changes_before }
    }

    /// The connection for writes whose loss on power failure is acceptable
    /// (audit entries): they do not wait for a sync, and become durable with
    /// the next durable write or checkpoint.
    pub(crate) fn conn_volatile(&self) -> Conn<'_> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Conn { guard: Some(guard), syncer: None, changes_before: 0 }
    }

    /// Run `f` (synchronous store calls, typically under a lock of the
    /// caller's) without waiting for its writes to reach the disk; the ticket
    /// waits, once the caller has released its locks, so that writers
    /// serialised by such a lock still share fsyncs.
    pub fn deferring_sync<T>(&self, f: impl FnOnce() -> T) -> (T, SyncTicket) {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                DEFERRED.with(|d| d.set(None));
            }
        }
        assert!(DEFERRED.with(|d| d.get()).is_none(), "deferring_sync does not nest");
        DEFERRED.with(|d| d.set(Some(0)));
        let reset = Reset;
        let out = f();
        let upto = DEFERRED.with(|d| d.get()).unwrap_or(0);
        drop(reset);
        (out, SyncTicket { syncer: Some(self.syncer.clone()), upto })
    }

    /// The accounts' generation: changes whenever a `users` row changed
    /// (after the change is committed). Read without I/O.
    pub fn users_generation(&self) -> u64 {
        self.users_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Called after a change to the `users` table committed.
    pub(crate) fn users_changed(&self) {
        self.users_generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// fsyncs run so far by the group commit (for tests and figures).
    pub fn journal_syncs(&self) -> u64 {
        self.syncer.lock().syncs
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

    /// Whether the database can be written now, checked on a connection of
    /// its own (so a slow holder of the main one is not waited for): the file must open read-write and its write lock must be free
    /// within `wait`. Takes the lock and releases it without writing.
    /// `dir` is the data dir the store was opened from.
    pub fn health_check_at(dir: &Path, wait: std::time::Duration) -> Result<()> {
        let path = dir.join(DB_FILE);
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(wait)?;
        conn.execute_batch("BEGIN IMMEDIATE; SELECT count(*) FROM sqlite_master; ROLLBACK;")?;
        Ok(())
    }

    /// Path of the key file (for messages).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Path of the database file (for messages).
    pub fn db_path(&self) -> PathBuf {
        self.key_path.parent().unwrap_or(Path::new(".")).join(DB_FILE)
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

#[cfg(test)]
mod schema_tests {
    use super::*;
    use crate::schema::MIGRATION_COUNT;

    #[test]
    fn the_migration_count_matches_the_migrations() {
        assert!(migrations().validate().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let conn = store.conn();
        assert_eq!(crate::snapshot::schema_version(&conn).unwrap() as usize, MIGRATION_COUNT);
        let recorded: i64 = conn.query_row("SELECT max(version) FROM schema_history", [], |r| r.get(0)).unwrap();
        assert_eq!(recorded as usize, MIGRATION_COUNT);
    }

    #[test]
    fn a_newer_schema_is_refused_naming_the_version_needed_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let db = dir.path().join(DB_FILE);
        {
            let c = Connection::open(&db).unwrap();
            c.execute_batch("PRAGMA user_version = 99; INSERT INTO schema_history VALUES (99, 7, '9.9.9', 0);")
                .unwrap();
        }
        let before = std::fs::read(&db).unwrap();
        let e = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("schema version 99") && e.contains("keyhaven 9.9.9"), "{e}");
        assert_eq!(std::fs::read(&db).unwrap(), before, "the refused database was changed");
        assert!(!dir.path().join(crate::snapshot::PRE_MIGRATE_DIR).exists());
    }

    #[test]
    fn an_older_schema_is_copied_before_migrating_and_five_copies_kept() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..7 {
            {
                let (store, _) = SqliteStore::open(dir.path()).unwrap();
                store.setting_set(&format!("k{round}"), &serde_json::json!(round)).unwrap();
            }
            // Pretend the last step has not run yet.
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch("DROP TABLE schema_history; PRAGMA user_version = 6;").unwrap();
        }
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        for round in 0..7 {
            assert_eq!(store.setting_get(&format!("k{round}")).unwrap(), Some(serde_json::json!(round)));
        }
        let copies: Vec<_> = std::fs::read_dir(dir.path().join("backups")).unwrap().flatten().collect();
        assert_eq!(copies.len(), crate::snapshot::PRE_MIGRATE_KEEP, "{copies:?}");
        for c in &copies {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(c.metadata().unwrap().permissions().mode() & 0o777, 0o600);
            let name = c.file_name().to_string_lossy().to_string();
            assert!(name.starts_with("pre-migrate-v6-"), "{name}");
        }
    }
}

#[cfg(test)]
mod durability_tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_write_returns_durable_and_concurrent_writers_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = SqliteStore::open(dir.path()).unwrap();
        std::sync::Arc::get_mut(&mut store.syncer).expect("not shared yet").test_slow_disk =
            std::time::Duration::from_millis(30);
        // One writer: each write returns only after a sync covering it.
        for i in 0..3 {
            store.setting_set(&format!("k{i}"), &serde_json::json!(i)).unwrap();
            let s = store.syncer.lock();
            assert_eq!(s.synced, s.committed, "a write returned before its sync");
        }
        // Reads never sync.
        let syncs = store.journal_syncs();
        for _ in 0..10 {
            store.setting_get("k0").unwrap();
        }
        assert_eq!(store.journal_syncs(), syncs);
        // Eight writers at once: far fewer syncs than writes.
        let store = Arc::new(store);
        let before = store.journal_syncs();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        store.setting_set(&format!("t{t}-{i}"), &serde_json::json!(i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let syncs = store.journal_syncs() - before;
        assert!(syncs < 40, "80 concurrent writes took {syncs} syncs; they should share them");
        {
            let s = store.syncer.lock();
            assert_eq!(s.synced, s.committed);
        }
        // Deferred: the writes return at once, the ticket makes them durable.
        let (_, ticket) = store.deferring_sync(|| {
            store.setting_set("deferred-1", &serde_json::json!(1)).unwrap();
            store.setting_set("deferred-2", &serde_json::json!(2)).unwrap();
        });
        let upto = ticket.upto;
        assert!(store.syncer.lock().synced < upto, "deferred writes waited");
        assert!(!ticket.is_done());
        ticket.wait();
        assert!(store.syncer.lock().synced >= upto);
        // A read-only closure needs no wait at all.
        let (_, nothing) = store.deferring_sync(|| store.setting_get("deferred-1").unwrap());
        assert!(nothing.is_done());
    }
}
