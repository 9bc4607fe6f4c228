//! The PostgreSQL backend: a pool of `tokio-postgres` connections driven by a
//! small tokio runtime of its own, its forward-only migrations run under an
//! advisory lock, and the master-key check shared by every node.
//!
//! The store's API is synchronous and is called from the server's tokio
//! worker threads, where `Runtime::block_on` would panic. Each operation is
//! therefore spawned onto this backend's runtime and its result sent back
//! over a channel the calling thread blocks on ([`PgStore::run`]), the same
//! blocking the SQLite backend does on its connection lock.
//!
//! Secrets are sealed here, in the node, with the same [`MasterKey`] and
//! associated data (table, row, column) as the SQLite backend, before any
//! SQL is sent: PostgreSQL only ever stores ciphertexts.
//!
//! TLS to the server: `sslmode=verify-full` or `require` (both check the
//! certificate and the host name, against `sslrootcert=FILE` or the system's
//! roots) with rustls; `prefer` (the default) and `disable` do not encrypt.
//!
//! Other nodes' writes reach this one through `LISTEN/NOTIFY` (migration
//! 0002's triggers, [`notify`]'s listening connection): [`PgStore::changes`].
//!
//! What this backend does not do (yet): master-key rotation (every node
//! would need the new key at once). Other nodes' writes reach this one
//! through `LISTEN/NOTIFY` (migration 0002's triggers, `notify.rs`'s
//! listening connection): [`PgStore::changes`].
//! Cluster membership and the leadership of scheduled work are in
//! `cluster.rs`. Backups are pg_dump's job: [`PgStore::snapshot_db`] says so.

mod audit;
mod cluster;
mod jobs;
mod limits;
mod notify;
mod records;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::changes::ChangeFeed;
use crate::crypto::{MasterKey, MASTER_KEY_FILE};
use crate::error::{Result, StoreError};
use crate::schema::KEY_CHECK;

/// Forward-only; never edit a released step, append a new one. Each step
/// carries its own version (its file's number) and is applied when the
/// database has not recorded that version yet, so steps that land out of
/// order (a gap filled later) are still each applied once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_change_notify.sql")),
    (3, include_str!("migrations/0003_cluster.sql")),
    (4, include_str!("migrations/0004_jobs.sql")),
    (5, include_str!("migrations/0005_token_notify.sql")),
    (6, include_str!("migrations/0006_table_versions.sql")),
];

/// The advisory lock every node takes to migrate and to check the master
/// key: two nodes starting together migrate once. ("keyhaven" in ASCII.)
const MIGRATE_LOCK: i64 = 0x6b65_7968_6176_656e;

/// Connections per node.
const POOL_SIZE: usize = 16;
/// How long an operation waits to connect (or for a free connection).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema version this binary migrates a PostgreSQL database to.
pub fn latest_pg_schema() -> u32 {
    MIGRATIONS.iter().map(|(v, _)| *v as u32).max().unwrap_or(0)
}

/// A store on PostgreSQL. Same record API as [`crate::Store`].
pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    key: Mutex<MasterKey>,
    key_path: PathBuf,
    /// host:port/database, for messages (never the password).
    target: String,
    /// Shared with the listening connection, which bumps it for other nodes' changes.
    users_generation: Arc<AtomicU64>,
    listening: Arc<notify::Listening>,
    /// For sessions of its own (leadership), outside the pool (boxed: it is large).
    cfg: Box<tokio_postgres::Config>,
    /// The TLS of those sessions: as the pool's (`None`: plain).
    session_tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// This node's leadership session (see `cluster.rs`).
    leader: cluster::SharedSession,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.target).field("key_path", &self.key_path).finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime
        // (the server drops its store on a worker thread): let it go.
        self.listening.close();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Where a URL points, without its password: `host:port/database`.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = cfg.get_ports().get(i).or(cfg.get_ports().first()).copied().unwrap_or(5432);
            match h {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let host = if hosts.is_empty() { "localhost:5432".to_string() } else { hosts.join(",") };
    let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
    format!("{host}/{db}")
}

/// How this node talks to the server: in plaintext (`sslmode` disable or
/// prefer, as before TLS was supported: prefer never encrypts here), or over
/// TLS that checks the server's certificate and host name against `roots`
/// (a PEM file of trusted certificates, `sslrootcert=`) or the system's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tls {
    Off,
    Verify { roots: Option<PathBuf> },
}

/// Parse a `postgres://` URL. The message never repeats the URL, which may
/// carry a password. Two libpq parameters tokio-postgres does not know are
/// taken out first: `sslmode=verify-full` (TLS, certificate and host name
/// checked) and `sslrootcert=FILE`. `sslmode=require` is verified the same
/// way (stricter than libpq, which checks nothing unless given a root file).
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Tls)> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::BadDatabaseUrl("it does not start with postgres:// or postgresql://".into()));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept: Vec<&str> = Vec::new();
    let mut verify_full = false;
    let mut roots = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", "verify-full")) => {
                verify_full = true;
                kept.push("sslmode=require");
            }
            Some(("sslmode", "verify-ca")) => {
                return Err(StoreError::BadDatabaseUrl(
                    "sslmode=verify-ca: use sslmode=verify-full (the certificate and the host name are checked)".into(),
                ));
            }
            Some(("sslrootcert", path)) if !path.is_empty() => roots = Some(PathBuf::from(path)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    let mut cfg: tokio_postgres::Config =
        rest.parse().map_err(|e: tokio_postgres::Error| StoreError::BadDatabaseUrl(e.to_string()))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("keyhaven");
    }
    let tls = if verify_full || cfg.get_ssl_mode() == SslMode::Require {
        Tls::Verify { roots }
    } else if roots.is_some() {
        return Err(StoreError::BadDatabaseUrl(
            "sslrootcert is given but TLS is not asked for: add sslmode=verify-full".into(),
        ));
    } else {
        Tls::Off
    };
    Ok((cfg, tls))
}

/// The rustls connector for [`Tls::Verify`]: the roots from the file, or
/// the system's (`SSL_CERT_FILE`/`SSL_CERT_DIR` are honoured).
fn tls_connector(roots: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| StoreError::BadDatabaseUrl(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| StoreError::BadDatabaseUrl(format!("sslrootcert {}: {e}", path.display())))?;
                store
                    .add(cert)
                    .map_err(|e| StoreError::BadDatabaseUrl(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system certificate rustls cannot use is skipped, as by other clients.
                let _ = store.add(cert);
            }
        }
    }
    if store.is_empty() {
        return Err(StoreError::BadDatabaseUrl(match roots {
            Some(p) => format!("sslrootcert {} holds no certificate", p.display()),
            None => "TLS asked for but the system has no trusted root certificates: install ca-certificates or give sslrootcert=FILE".into(),
        }));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::BadDatabaseUrl(format!("TLS: {e}")))?
            .with_root_certificates(store)
            .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A PostgreSQL error as a [`StoreError`]: a broken or refused connection
/// says where and what to check; a database error carries its message.
pub(crate) fn pg_err(target: &str, e: tokio_postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        return StoreError::Postgres(format!("{} ({}): {}", db.message(), db.code().code(), db.severity()));
    }
    if e.is_closed() || e.code().is_none() {
        let detail = match std::error::Error::source(&e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        };
        return StoreError::PgConnect { target: target.to_string(), detail };
    }
    StoreError::Postgres(e.to_string())
}

/// A unique-constraint violation is a conflict on `what`; anything else as [`pg_err`].
pub(crate) fn unique_err(target: &str, e: tokio_postgres::Error, what: &str) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return StoreError::Conflict(what.to_string());
    }
    pg_err(target, e)
}

fn pool_err(target: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_err(target, e),
        other => StoreError::PgConnect { target: target.to_string(), detail: other.to_string() },
    }
}

/// A pooled connection with the target for its error messages.
pub(crate) struct Pg {
    pool: Pool,
    target: String,
}

impl Pg {
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| pool_err(&self.target, e))
    }

    pub(crate) fn err(&self, e: tokio_postgres::Error) -> StoreError {
        pg_err(&self.target, e)
    }

    /// A read-only transaction on one snapshot (REPEATABLE READ): all its
    /// statements see the same rows while other nodes write.
    pub(crate) async fn read_snapshot<'c>(
        &self,
        client: &'c mut tokio_postgres::Client,
    ) -> Result<tokio_postgres::Transaction<'c>> {
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.err(e))
    }

    /// host:port/database (never the password).
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    pub(crate) fn unique(&self, e: tokio_postgres::Error, what: &str) -> StoreError {
        unique_err(&self.target, e, what)
    }
}

impl PgStore {
    /// Connect to `url`, migrate under the advisory lock and check (or, on a
    /// new database, record) the master key in `dir/master.key`, which is
    /// created when neither it nor any sealed secret exists yet. Returns the
    /// store and whether the database was new.
    pub fn open(dir: &Path, url: &str) -> Result<(PgStore, bool)> {
        PgStore::open_key_file(dir.join(MASTER_KEY_FILE), url)
    }

    /// [`PgStore::open`] with the master key in `key_path` (any file name).
    pub fn open_key_file(key_path: PathBuf, url: &str) -> Result<(PgStore, bool)> {
        let (mut cfg, tls) = parse_url(url)?;
        let target = describe(&cfg);
        // Every connection of this node names it, so the change triggers can
        // tell its own writes apart (see migration 0002).
        let node = format!("{:016x}", rand::random::<u64>());
        let options = match cfg.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} -c keyhaven.node={node}"),
            _ => format!("-c keyhaven.node={node}"),
        };
        cfg.options(&options);
        let mut listen_cfg = cfg.clone();
        // Named apart from the pool's connections (operators see it in
        // pg_stat_activity), with TCP keepalives so the kernel too gives up
        // on a peer that vanished (the ping in `notify` covers a stall).
        listen_cfg.application_name("keyhaven-listen");
        listen_cfg.keepalives(true).keepalives_idle(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keyhaven-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("tokio runtime for PostgreSQL", e))?;
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let session_tls = match &tls {
            Tls::Off => None,
            Tls::Verify { roots } => Some(tls_connector(roots.as_deref())?),
        };
        let mgr = match &session_tls {
            None => Manager::from_config(cfg.clone(), NoTls, manager_config),
            Some(connector) => Manager::from_config(cfg.clone(), connector.clone(), manager_config),
        };
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT * 6))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::PgConnect { target: target.clone(), detail: e.to_string() })?;
        let listen_tls = match &session_tls {
            None => notify::ListenTls::Off,
            Some(c) => notify::ListenTls::Verify(c.clone()),
        };
        let handle = rt.handle().clone();
        let users_generation = Arc::new(AtomicU64::new(0));
        let listening = Arc::new(notify::Listening {
            node,
            feeds: Mutex::new(Vec::new()),
            users_generation: users_generation.clone(),
            connects: AtomicU64::new(0),
        });
        let store = PgStore {
            rt: Some(rt),
            handle,
            pool,
            // Replaced by the checked key below.
            key: Mutex::new(MasterKey::generate()),
            key_path: key_path.clone(),
            target: target.clone(),
            users_generation,
            listening: listening.clone(),
            cfg: Box::new(cfg),
            session_tls,
            leader: Default::default(),
        };
        let (key, first) = store.run(move |pg| migrate_and_check_key(pg, key_path))?;
        *store.key_lock() = key;
        store.handle.spawn(notify::listen(listen_cfg, listen_tls, target, listening));
        Ok((store, first))
    }

    /// Run one operation on the backend's runtime and wait for it. Safe to
    /// call from any thread, including another runtime's worker.
    pub(crate) fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(Pg) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = op(Pg { pool: self.pool.clone(), target: self.target.clone() });
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| StoreError::PgConnect {
            target: self.target.clone(),
            detail: "the operation was abandoned (the store is shutting down)".into(),
        })?
    }

    pub(crate) fn key_lock(&self) -> std::sync::MutexGuard<'_, MasterKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seal a secret for one cell with the node's master key.
    pub(crate) fn seal(&self, table: &str, row: i64, column: &str, plain: &[u8]) -> Vec<u8> {
        self.key_lock().seal(table, row, column, plain)
    }

    /// Open a sealed cell; [`StoreError::Decrypt`] when it was sealed for
    /// another cell or key.
    pub(crate) fn open_sealed(
        &self,
        table: &'static str,
        column: &'static str,
        row: i64,
        sealed: &[u8],
    ) -> Result<zeroize::Zeroizing<String>> {
        let plain =
            self.key_lock().open(table, row, column, sealed).ok_or(StoreError::Decrypt { table, column, row })?;
        match std::str::from_utf8(&plain) {
            Ok(s) => Ok(zeroize::Zeroizing::new(s.to_string())),
            Err(_) => Err(StoreError::Decrypt { table, column, row }),
        }
    }

    /// Where the database is: host:port/database (no password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Path of the key file (for messages).
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// See [`crate::Store::users_generation`]: this node's changes, and
    /// other nodes' as their notifications arrive.
    pub fn users_generation(&self) -> u64 {
        self.users_generation.load(Ordering::Acquire)
    }

    pub(crate) fn users_changed(&self) {
        self.users_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A subscription to other nodes' changes (this node's own writes are
    /// not in it). Each call is a subscription of its own.
    pub fn changes(&self) -> ChangeFeed {
        let (feed, state) = ChangeFeed::new();
        self.listening.feeds.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&state));
        feed
    }

    /// How many times the listening connection has connected (1 once it
    /// listens; more after reconnects). For tests.
    pub fn listen_connects(&self) -> u64 {
        self.listening.connects.load(Ordering::Acquire)
    }

    /// The change count of `table` in `keyhaven_table_versions` (migration
    /// 0006; see [`crate::Store::keychain_version`]).
    pub fn table_version(&self, table: &'static str) -> Result<i64> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_one("SELECT version FROM keyhaven_table_versions WHERE name = $1", &[&table])
                .await
                .map_err(|e| pg.err(e))?;
            Ok(row.get::<_, i64>(0))
        })
    }

    /// The database's schema version (0 before the first migration).
    pub fn schema_version(&self) -> Result<u32> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let row = c
                .query_one(
                    "SELECT CASE WHEN to_regclass('keyhaven_schema_history') IS NULL THEN 0
                     ELSE (SELECT coalesce(max(version), 0) FROM keyhaven_schema_history) END::bigint",
                    &[],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(row.get::<_, i64>(0).max(0) as u32)
        })
    }

    /// Whether the database answers a query within `wait`.
    pub fn health_check(&self, wait: Duration) -> Result<()> {
        let target = self.target.clone();
        self.run(move |pg| async move {
            let probe = async {
                let c = pg.client().await?;
                c.query_one("SELECT 1", &[]).await.map_err(|e| pg.err(e))?;
                Ok(())
            };
            match tokio::time::timeout(wait, probe).await {
                Ok(r) => r,
                Err(_) => {
                    Err(StoreError::PgConnect { target, detail: format!("no answer within {} ms", wait.as_millis()) })
                }
            }
        })
    }

    /// `keyhaven backup` copies the embedded SQLite file; on PostgreSQL the
    /// database is backed up with its own tools. Always this error, naming them.
    pub fn snapshot_db(&self, _dest: &Path) -> Result<u32> {
        Err(StoreError::BackupOnPostgres { target: self.target.clone() })
    }
}

/// One transaction under the advisory lock: apply the missing migrations,
/// refuse a newer schema, then check the master key against the database's
/// key check (recording it on a new database). Returns the key and whether
/// the database was new.
async fn migrate_and_check_key(pg: Pg, key_path: PathBuf) -> Result<(MasterKey, bool)> {
    let mut client = pg.client().await?;
    let tx = client.transaction().await.map_err(|e| pg.err(e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK]).await.map_err(|e| pg.err(e))?;
    // The bookkeeping table is ours, named apart from the SQLite one so a
    // database shared with other software cannot be mistaken for keyhaven's.
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS keyhaven_schema_history (
             version          INTEGER PRIMARY KEY,
             from_version     INTEGER NOT NULL,
             keyhaven_version TEXT NOT NULL,
             applied_at       BIGINT NOT NULL
         )",
    )
    .await
    .map_err(|e| pg.err(e))?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM keyhaven_schema_history", &[])
        .await
        .map_err(|e| pg.err(e))?
        .get(0);
    let known = latest_pg_schema();
    if found as u32 > known {
        let needed: Option<String> = tx
            .query_opt("SELECT keyhaven_version FROM keyhaven_schema_history ORDER BY version DESC LIMIT 1", &[])
            .await
            .map_err(|e| pg.err(e))?
            .map(|r| r.get(0));
        return Err(StoreError::PgNewerSchema { target: pg.target.clone(), found: found as u32, known, needed });
    }
    let first = found == 0;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let applied: Vec<i32> = tx
        .query("SELECT version FROM keyhaven_schema_history", &[])
        .await
        .map_err(|e| pg.err(e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut migrated = false;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| !applied.contains(v)) {
        tx.batch_execute(sql).await.map_err(|e| pg.err(e))?;
        tx.execute(
            "INSERT INTO keyhaven_schema_history(version, from_version, keyhaven_version, applied_at)
             VALUES($1, $2, $3, $4)",
            &[version, &found, &env!("CARGO_PKG_VERSION"), &now],
        )
        .await
        .map_err(|e| pg.err(e))?;
        migrated = true;
    }
    if migrated {
        tracing::info!("migrated the PostgreSQL database {} from schema {found} to {known}", pg.target);
    }

    let sealed: Option<Vec<u8>> = tx
        .query_opt("SELECT value FROM meta WHERE key = 'key_check'", &[])
        .await
        .map_err(|e| pg.err(e))?
        .map(|r| r.get(0));
    let mut created_key_file = false;
    let key = match (&sealed, key_path.exists()) {
        (Some(_), false) => {
            return Err(StoreError::PgMissingMasterKey { path: key_path, target: pg.target.clone() });
        }
        (_, true) => MasterKey::load(&key_path)?,
        (None, false) => {
            let k = MasterKey::generate();
            k.create_file(&key_path)?;
            created_key_file = true;
            k
        }
    };
    match sealed {
        Some(s) => {
            let ok = key.open("meta", 0, "key_check", &s).is_some_and(|p| p.as_slice() == KEY_CHECK);
            if !ok {
                return Err(StoreError::PgWrongMasterKey { path: key_path, target: pg.target.clone() });
            }
        }
        None => {
            let s = key.seal("meta", 0, "key_check", KEY_CHECK);
            if let Err(e) = tx.execute("INSERT INTO meta(key, value) VALUES('key_check', $1)", &[&s]).await {
                if created_key_file {
                    let _ = std::fs::remove_file(&key_path);
                }
                return Err(pg.err(e));
            }
        }
    }
    if let Err(e) = tx.commit().await {
        if created_key_file {
            let _ = std::fs::remove_file(&key_path);
        }
        return Err(pg.err(e));
    }
    Ok((key, first))
}

#[cfg(test)]
mod tests;
