//! [`Store`]: the one store interface the server uses, over either backend —
//! the embedded SQLite database in the data dir ([`SqliteStore`], the
//! default) or PostgreSQL ([`PgStore`]). Each method forwards to the backend
//! with the same meaning; the few that only one backend can do say so with a
//! typed error naming what to do instead.

use std::path::Path;

use serde_json::Value;
use zeroize::Zeroizing;

use crate::audit::{AuditEntry, AuditQuery, AuditRecord};
use crate::changes::ChangeFeed;
use crate::cluster::{ClusterView, NodeRecord, NodeStatus};
use crate::db::{SqliteStore, SyncTicket};
use crate::error::{Result, StoreError};
use crate::jobs::SharedJobs;
use crate::pg::PgStore;
use crate::records::{
    ApiKeyRecord, ConnectionTestRecord, HostKeyRecord, KeychainRecord, LoginFailure, LoginFailureRecord, TokenRecord,
    UserRecord,
};
use crate::rsync::{RsyncRunRecord, RsyncTaskRecord};

/// The store: the database and the master key that seals its secret columns.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Sqlite(s) => s.fmt(f),
            Backend::Postgres(p) => p.fmt(f),
        }
    }
}

/// Forward `&self` methods with the same signature to either backend.
macro_rules! forward {
    ($( $(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        impl Store {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match &self.backend {
                        Backend::Sqlite(s) => s.$name($($arg),*),
                        Backend::Postgres(p) => p.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

forward! {
    fn users_list(&self) -> Result<Vec<UserRecord>>;
    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>>;
    fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>>;
    fn user_insert(&self, username: &str, data: &Value, password_hash: Option<&str>) -> Result<i64>;
    /// Replace the row's username and data; `password_hash: Some(x)` sets it (x may be None).
    fn user_update(&self, id: i64, username: &str, data: &Value, password_hash: Option<Option<&str>>) -> Result<()>;
    /// Delete an account with its API keys and tokens, in one transaction.
    fn user_delete_with_credentials(&self, id: i64, username: &str) -> Result<()>;
    fn user_delete(&self, id: i64) -> Result<()>;
    /// Seal (or clear with `None`) an account's TOTP seed.
    fn user_set_twofactor_secret(&self, id: i64, secret: Option<&str>) -> Result<()>;
    /// Record that account `id` used the one-time password of time step
    /// `step`. `false` when that step (or a later one) was already used: the
    /// code is a replay and must be refused. One statement, so two logins
    /// racing with the same code cannot both win.
    fn user_totp_consume(&self, id: i64, step: i64) -> Result<bool>;
    fn user_twofactor_secret(&self, id: i64) -> Result<Option<Zeroizing<String>>>;
    fn api_keys_list(&self) -> Result<Vec<ApiKeyRecord>>;
    fn api_key_by_id(&self, id: i64) -> Result<Option<ApiKeyRecord>>;
    fn api_key_delete(&self, id: i64) -> Result<bool>;
    fn api_keys_delete_for_user(&self, username: &str) -> Result<()>;
    /// Store a token valid for `ttl_secs` from now (one clock reading, so
    /// `expires_at - created_at` is exactly the lifetime).
    fn token_insert(
        &self,
        token_hash: &str,
        username: &str,
        ttl_secs: i64,
        single_use: bool,
        origin: Option<&str>,
        attrs: &Value
    ) -> Result<i64>;
    /// Look a token up by hash. A single-use (or expired) token is deleted so
    /// it cannot be used twice.
    fn token_take(&self, token_hash: &str) -> Result<Option<TokenRecord>>;
    /// A token by id. Removing a reusable token (expired, its account
    /// deleted) moves the accounts' generation, on every node.
    fn token_by_id(&self, id: i64) -> Result<Option<TokenRecord>>;
    fn keychain_list(&self) -> Result<Vec<KeychainRecord>>;
    fn keychain_get(&self, id: i64) -> Result<Option<KeychainRecord>>;
    fn keychain_private_key(&self, id: i64) -> Result<Option<Zeroizing<String>>>;
    /// Insert a credential; the private key is sealed to the new row id, so
    /// no row ever holds a plaintext or misplaced key.
    fn keychain_insert(&self, name: &str, kind: &str, attributes: &Value, private_key: Option<&str>) -> Result<i64>;
    /// Replace name, attributes and private key (None clears it) of one row.
    fn keychain_update(&self, id: i64, name: &str, attributes: &Value, private_key: Option<&str>) -> Result<()>;
    /// Delete several rows at once (a cascade), all or nothing.
    fn keychain_delete_many(&self, ids: &[i64]) -> Result<()>;
    /// Delete keychain rows and, in the same transaction, disable the tasks
    /// that used any of them and clear their connection (TrueNAS's cascade).
    fn keychain_delete_unbinding_tasks(&self, ids: &[i64]) -> Result<Vec<i64>>;
    /// Keep `t` as the connection's last test (replacing the one before).
    fn connection_test_record(&self, t: &ConnectionTestRecord) -> Result<()>;
    /// Last tests of connections that still exist, by connection id.
    fn connection_tests(&self) -> Result<Vec<ConnectionTestRecord>>;
    fn setting_get(&self, key: &str) -> Result<Option<Value>>;
    fn setting_set(&self, key: &str, value: &Value) -> Result<()>;
    fn host_keys_list(&self) -> Result<Vec<HostKeyRecord>>;
    fn host_key_private(&self, algorithm: &str) -> Result<Option<Zeroizing<String>>>;
    fn host_key_insert(&self, algorithm: &str, private_key: &str, public_key: &str) -> Result<()>;
    fn rsync_tasks(&self) -> Result<Vec<RsyncTaskRecord>>;
    fn rsync_task(&self, id: i64) -> Result<Option<RsyncTaskRecord>>;
    fn rsync_task_insert(&self, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<i64>;
    fn rsync_task_update(&self, id: i64, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<()>;
    /// Delete a task and its last run.
    fn rsync_task_delete(&self, id: i64) -> Result<()>;
    /// Every task's last run, without its log (`log` is empty; see [`Store::rsync_run`]).
    fn rsync_runs(&self) -> Result<Vec<RsyncRunRecord>>;
    fn rsync_run(&self, task_id: i64) -> Result<Option<RsyncRunRecord>>;
    /// Record a task's run (replacing the one before); a successful one is
    /// also the task's last success.
    fn rsync_run_record(&self, r: &RsyncRunRecord) -> Result<()>;
    /// Every task's id with the time (Unix seconds) its last successful run
    /// ended, `None` for a task that never succeeded; by task id.
    fn rsync_last_successes(&self) -> Result<Vec<(i64, Option<f64>)>>;
    /// Start a run of `task_id` on node `node` (RUNNING, job `job_id`), one
    /// statement: `None` when this node now runs it, `Some(job)` when another
    /// node's run (job `job`) is RUNNING — the task is busy. A RUNNING row of
    /// `node` itself is taken (the caller checks its own runs first). On
    /// SQLite, one node, the row is always taken.
    fn rsync_run_claim(&self, task_id: i64, job_id: i64, started: f64, node: &str) -> Result<Option<i64>>;
    /// Record the end of run `r.job_id` if the task's row is still that run;
    /// a successful one is also the task's last success. `true` when recorded.
    fn rsync_run_finish(&self, r: &RsyncRunRecord) -> Result<bool>;
    /// At start: runs node `node` left RUNNING are FAILED with `error`
    /// (SQLite: every RUNNING run; PostgreSQL: this node's and those recorded
    /// without a node). Returns how many there were.
    fn rsync_runs_fail_interrupted(&self, node: &str, error: &str, finished: f64) -> Result<usize>;
    fn audit_insert(&self, e: &AuditEntry) -> Result<i64>;
    /// [`Store::audit_insert`] with a given time (seconds since the epoch),
    /// for imports and tests.
    fn audit_insert_at(&self, ts: f64, e: &AuditEntry) -> Result<i64>;
    /// Every entry, in insertion (`id`) order.
    fn audit_list(&self) -> Result<Vec<AuditRecord>>;
    /// Delete entries older than `older_than_secs`, in batches. Returns how
    /// many rows were deleted.
    fn audit_prune(&self, older_than_secs: i64) -> Result<usize>;
    /// The accounts' generation: changes whenever a `users` row or an API
    /// key changed (after the change is committed; on PostgreSQL also when
    /// another node's notification of such a change arrives). Read without I/O.
    fn users_generation(&self) -> u64;
}

impl Store {
    /// Open (creating on first start) the embedded SQLite store of data dir
    /// `dir`: `<dir>/keyhaven.db` and `<dir>/master.key`. Returns the store
    /// and whether this was a first start.
    pub fn open(dir: &Path) -> Result<(Store, bool)> {
        let (s, first) = SqliteStore::open(dir)?;
        Ok((Store { backend: Backend::Sqlite(s) }, first))
    }

    /// Open the store on the PostgreSQL database at `url`, with the master
    /// key in `<dir>/master.key` (see [`PgStore::open`]).
    pub fn open_postgres(dir: &Path, url: &str) -> Result<(Store, bool)> {
        let (p, first) = PgStore::open(dir, url)?;
        Ok((Store { backend: Backend::Postgres(p) }, first))
    }

    /// `database` empty: [`Store::open`]; otherwise [`Store::open_postgres`].
    pub fn open_database(dir: &Path, database: &str) -> Result<(Store, bool)> {
        if database.trim().is_empty() {
            Store::open(dir)
        } else {
            Store::open_postgres(dir, database)
        }
    }

    /// Where the data is, for messages: the SQLite file, or PostgreSQL's
    /// host:port/database (never a password).
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.db_path().display().to_string(),
            Backend::Postgres(p) => p.target().to_string(),
        }
    }

    /// Which backend this is: `"sqlite"` or `"postgresql"`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgresql",
        }
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
        match &self.backend {
            Backend::Sqlite(s) => s.api_key_insert(name, username, expires_at, hash_for_id),
            Backend::Postgres(p) => p.api_key_insert(name, username, expires_at, hash_for_id),
        }
    }

    /// Run `f` (synchronous store calls, typically under a lock of the
    /// caller's) without waiting for its writes to reach the disk; the ticket
    /// waits. On PostgreSQL a commit is durable when it returns: the ticket is done.
    pub fn deferring_sync<T>(&self, f: impl FnOnce() -> T) -> (T, SyncTicket) {
        match &self.backend {
            Backend::Sqlite(s) => s.deferring_sync(f),
            Backend::Postgres(_) => (f(), SyncTicket::done()),
        }
    }

    /// fsyncs run so far by SQLite's group commit (for tests and figures); 0 on PostgreSQL.
    pub fn journal_syncs(&self) -> u64 {
        match &self.backend {
            Backend::Sqlite(s) => s.journal_syncs(),
            Backend::Postgres(_) => 0,
        }
    }

    /// Path of the key file (for messages).
    pub fn key_path(&self) -> &Path {
        match &self.backend {
            Backend::Sqlite(s) => s.key_path(),
            Backend::Postgres(p) => p.key_path(),
        }
    }

    /// Whether the embedded database of data dir `dir` can be written now,
    /// checked on a connection of its own (see [`SqliteStore::health_check_at`]).
    pub fn health_check_at(dir: &Path, wait: std::time::Duration) -> Result<()> {
        SqliteStore::health_check_at(dir, wait)
    }

    /// Whether this store's database answers within `wait`: SQLite's write
    /// lock is free (on a connection of its own, in `dir`), or PostgreSQL
    /// answers a query.
    pub fn health_check(&self, dir: &Path, wait: std::time::Duration) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => SqliteStore::health_check_at(dir, wait),
            Backend::Postgres(p) => p.health_check(wait),
        }
    }

    /// `audit.query`: filter, order and page in SQL, with the same meaning
    /// on both backends (see `crate::audit` and the PostgreSQL compiler).
    pub fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        match &self.backend {
            Backend::Sqlite(s) => s.audit_query(q),
            Backend::Postgres(p) => p.audit_query(q),
        }
    }

    /// How many entries [`Store::audit_query`] would return without paging.
    pub fn audit_count(&self, q: &AuditQuery) -> Result<u64> {
        match &self.backend {
            Backend::Sqlite(s) => s.audit_count(q),
            Backend::Postgres(p) => p.audit_count(q),
        }
    }

    /// Re-encrypt every secret column under a fresh master key (SQLite; on
    /// PostgreSQL every node would need the new key at once, which is not
    /// supported yet).
    pub fn rotate_master_key(&self) -> Result<usize> {
        match &self.backend {
            Backend::Sqlite(s) => s.rotate_master_key(),
            Backend::Postgres(_) => Err(not_on_postgres("master key rotation")),
        }
    }

    /// The backup path's check: `Ok` on SQLite (snapshot the data dir with
    /// [`crate::snapshot::snapshot_db`]); on PostgreSQL the error that says to
    /// use pg_dump.
    pub fn check_backup_supported(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => Err(StoreError::BackupOnPostgres { target: p.target().to_string() }),
        }
    }
}

/// Cluster membership and leadership (see [`crate::cluster`]). On SQLite
/// the process is the only node and always leads.
impl Store {
    /// Stamp this node's heartbeat (creating its row). Nothing to keep on SQLite.
    pub fn node_heartbeat(&self, me: &NodeRecord) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.node_heartbeat(me),
        }
    }

    /// Whether node `node_id` leads the scheduled work now (taking the lead
    /// when it is free). Always `true` on SQLite.
    pub fn try_lead(&self, node_id: &str) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(true),
            Backend::Postgres(p) => p.try_lead(node_id),
        }
    }

    /// Give up leadership at shutdown so another node takes it at once.
    pub fn resign(&self) {
        if let Backend::Postgres(p) = &self.backend {
            p.resign();
        }
    }

    /// Every node and the leader. On SQLite: `me`, up and leading.
    pub fn cluster_view(&self, me: &NodeRecord) -> Result<ClusterView> {
        match &self.backend {
            Backend::Sqlite(_) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                Ok(ClusterView {
                    nodes: vec![NodeStatus { node: me.clone(), heartbeat_at: now, up: true }],
                    leader: Some(me.node_id.clone()),
                })
            }
            Backend::Postgres(p) => p.cluster_view(),
        }
    }
}

/// Several nodes on one database: change notification and shared login limits.
impl Store {
    /// Other nodes' changes (see [`ChangeFeed`]): on PostgreSQL a
    /// subscription to the node's listening connection; `None` on SQLite,
    /// where this node is the only writer.
    pub fn changes(&self) -> Option<ChangeFeed> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.changes()),
        }
    }

    /// The keychain table's change count (PostgreSQL, migration 0006: moved
    /// in the transaction of every statement that changes the table, an
    /// update in place included). Read before [`Store::keychain_list`], it
    /// tells a node whose cache was built from that list whether anything
    /// changed since, without reading the rows. `None` on SQLite, where the
    /// node is the only writer.
    pub fn keychain_version(&self) -> Result<Option<i64>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(p) => p.table_version("keychain").map(Some),
        }
    }

    /// Whether failed logins are counted in the database (PostgreSQL: every
    /// node shares them) rather than in the node's memory alone (SQLite).
    pub fn shares_login_failures(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The shared failures of limiter `keys` (empty on SQLite).
    pub fn login_failures(&self, keys: &[String]) -> Result<Vec<LoginFailureRecord>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.login_failures(keys),
        }
    }

    /// Count one shared failure per key (see [`PgStore::login_failures_add`]);
    /// nothing is counted on SQLite (empty answer).
    pub fn login_failures_add(
        &self,
        keys: &[(String, Option<u32>)],
        window_secs: i64,
        lockout_secs: i64,
    ) -> Result<Vec<LoginFailure>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.login_failures_add(keys, window_secs, lockout_secs),
        }
    }

    /// Forget the shared failures of `keys` (no-op on SQLite).
    pub fn login_failures_clear(&self, keys: &[String]) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(p) => p.login_failures_clear(keys),
        }
    }

    /// The leader's sweep: RUNNING rsync runs of nodes that are down (no
    /// heartbeat for [`crate::cluster::DOWN_AFTER_SECS`]) are FAILED with
    /// `error`. 0 on SQLite, whose one node fails its runs at start.
    pub fn rsync_runs_fail_down_nodes(&self, error: &str, finished: f64) -> Result<usize> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(0),
            Backend::Postgres(p) => p.rsync_runs_fail_down_nodes(error, finished),
        }
    }

    /// The cluster's job history ([`SharedJobs`]): on PostgreSQL the `jobs`
    /// table every node writes; `None` on SQLite, where the one node keeps
    /// its jobs in memory.
    pub fn shared_jobs(&self) -> Option<SharedJobs<'_>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(pg) => Some(SharedJobs { pg }),
        }
    }

    /// Drop shared failures whose window and lock are over (0 on SQLite).
    pub fn login_failures_prune(&self, window_secs: i64) -> Result<usize> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(0),
            Backend::Postgres(p) => p.login_failures_prune(window_secs),
        }
    }
}

fn not_on_postgres(what: &'static str) -> StoreError {
    StoreError::NotOnPostgres { what }
}
