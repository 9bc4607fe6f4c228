//! Use cases. Each submodule owns one area; [`App`] ties them to the store.

pub mod audit;
pub mod auth;
pub mod cluster;
pub mod crypto;
pub mod events;
pub mod health;
pub mod input;
pub mod jobs;
pub mod keychain;
pub mod limiter;
pub mod metrics;
pub mod pairing;
pub mod rsync;
pub mod session;
pub mod sshd;
pub mod sync;
pub mod users;

use std::sync::Arc;

use keyhaven_store::Store;

use crate::config::Config;
use crate::error::ServiceError;

/// Everything a request handler can reach: configuration, store and the
/// in-memory state of each use case.
pub struct App {
    /// The configuration the daemon started with. Settings that SIGHUP
    /// reloads (`SettingDef::reload`) are read from [`App::live_config`] instead.
    pub config: Config,
    live: std::sync::RwLock<Arc<Config>>,
    pub store: Arc<Store>,
    pub auth: auth::AuthState,
    pub jobs: Arc<jobs::Jobs>,
    /// What `core.subscribe` / legacy `sub` deliver.
    pub events: Arc<events::Events>,
    pub keychain: keychain::KeychainCache,
    /// Rsync tasks' runs going on and their schedules (see [`App::rsync`]).
    rsync_area: rsync::RsyncState,
    /// The SSH service area's state (see [`App::sshd`]).
    sshd_area: sshd::SshdArea,
    /// Where account keys are written for sshd.
    pub keys_location: keyhaven_ssh::files::KeysLocation,
    /// The accounts area's state (see [`App::accounts`]).
    accounts_area: users::AccountsArea,
    /// SHA-256 fingerprint of the certificate served, when serving TLS
    /// (a reload on SIGHUP re-reads the certificate).
    pub tls_fingerprint: std::sync::RwLock<Option<String>>,
    /// What `GET /metrics` serves.
    pub metrics: Arc<metrics::Metrics>,
    /// This node and its leadership of scheduled work (see [`App::cluster`]).
    cluster_area: cluster::ClusterState,
    /// The last `GET /healthz` result (see [`App::monitoring`]).
    health_area: health::HealthCache,
    /// This `App` itself, for work that outlives a call (rsync runs, the
    /// scheduler): see [`App::shared`].
    me: std::sync::Weak<App>,
}

/// Each area of use cases is reached through a handle that borrows the
/// [`App`] and owns its area's locks: `app.sshd().update(…)`,
/// `app.accounts().create(…)`.
impl App {
    pub fn new(config: Config, store: Store) -> Arc<App> {
        let data = std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
        let sshd = keyhaven_ssh::supervisor::Supervisor::new(keyhaven_ssh::supervisor::SshdPaths {
            sshd: config.sshd_path.clone(),
            dir: data.join("sshd"),
        });
        let keys_location = if config.authorized_keys_in_home() {
            keyhaven_ssh::files::KeysLocation::Home
        } else {
            keyhaven_ssh::files::KeysLocation::Data(data.join("sshd").join("authorized_keys"))
        };
        let events = Arc::new(events::Events::default());
        let metrics = Arc::new(metrics::Metrics::default());
        let auth = auth::AuthState::new(
            limiter::Limits {
                lock_after: config.lockout_after,
                address_lock_after: config.address_lockout_after,
                lockout: config.lockout,
                ..limiter::Limits::default()
            },
            password_checks(config.password_checks),
        );
        let store = Arc::new(store);
        let jobs = Arc::new(jobs::Jobs::new(events.clone(), metrics.clone(), store.clone()));
        Arc::new_cyclic(|me| App {
            me: me.clone(),
            live: std::sync::RwLock::new(Arc::new(config.clone())),
            config,
            store,
            auth,
            jobs,
            events,
            keychain: keychain::KeychainCache::default(),
            rsync_area: rsync::RsyncState::default(),
            sshd_area: sshd::SshdArea::new(sshd),
            keys_location,
            accounts_area: users::AccountsArea::default(),
            tls_fingerprint: std::sync::RwLock::new(None),
            metrics,
            health_area: health::HealthCache::default(),
            cluster_area: cluster::ClusterState::default(),
        })
    }

    /// The SSH service: settings, sshd_config, host keys, the supervised sshd.
    pub fn sshd(&self) -> sshd::Sshd<'_> {
        sshd::Sshd::new(self)
    }

    /// Logins, tokens, API keys and the check of every call's caller.
    pub fn auth(&self) -> auth::Auth<'_> {
        auth::Auth::new(self)
    }

    /// Keychain credentials: SSH key pairs and SSH connections.
    pub fn keychain(&self) -> keychain::Keychain<'_> {
        keychain::Keychain::new(self)
    }

    /// Pairing with other systems and checking stored SSH connections.
    pub fn pairing(&self) -> pairing::Pairing<'_> {
        pairing::Pairing::new(self)
    }

    /// Local accounts, their OS accounts and authorized keys.
    pub fn accounts(&self) -> users::Accounts<'_> {
        users::Accounts::new(self)
    }

    /// Rsync tasks: CRUD, runs as jobs and the scheduler.
    pub fn rsync(&self) -> rsync::Rsync<'_> {
        rsync::Rsync::new(self)
    }

    /// The nodes sharing the database and which one leads scheduled work.
    pub fn cluster(&self) -> cluster::Cluster<'_> {
        cluster::Cluster::new(self)
    }

    /// `GET /healthz` and `GET /metrics`.
    pub fn monitoring(&self) -> health::Monitoring<'_> {
        health::Monitoring::new(self)
    }

    /// This `App` as an `Arc`, for work that outlives the call that starts it.
    pub fn shared(&self) -> Result<Arc<App>, ServiceError> {
        self.me.upgrade().ok_or_else(|| ServiceError::internal("starting background work", "the daemon is stopping"))
    }

    /// The configuration as last (re)loaded: read the reloadable settings here.
    pub fn live_config(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Make `config` the live configuration (after a reload on SIGHUP).
    pub fn set_live_config(&self, config: Config) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Concurrent password checks: the setting, or two per core.
fn password_checks(setting: usize) -> usize {
    if setting > 0 {
        return setting;
    }
    std::thread::available_parallelism().map(|n| n.get() * 2).unwrap_or(4)
}

/// Run a TrueNAS query (`filters`, `options`: the two positional parameters of
/// every `*.query`) over already-built entries. Errors in either are field
/// errors named relative to the query (`filters.0`, `options.limit`).
pub fn run_query<T: std::borrow::Borrow<serde_json::Value>>(
    items: &[T],
    filters: Option<&serde_json::Value>,
    options: Option<&serde_json::Value>,
) -> Result<serde_json::Value, ServiceError> {
    use keyhaven_core::query::{filter_list, parse_filters, QueryError, QueryOptions};
    let null = serde_json::Value::Null;
    let filters = parse_filters(filters.unwrap_or(&null))?;
    let options = QueryOptions::from_value(options.unwrap_or(&null))?;
    match filter_list(items, &filters, &options) {
        Ok(r) => Ok(r.into_value()),
        Err(QueryError::NotFound) => Err(ServiceError::call(crate::error::ENOENT, "No matching records found")),
        Err(QueryError::Invalid(v)) => Err(v.into()),
    }
}
