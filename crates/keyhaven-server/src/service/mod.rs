//! Use cases. Each submodule owns one area; [`App`] ties them to the store.

pub mod audit;
pub mod auth;
pub mod jobs;
pub mod keychain;
pub mod users;

use std::sync::Arc;

use keyhaven_store::Store;

use crate::config::Config;

/// Everything a request handler can reach: configuration, store and the
/// in-memory state of each use case.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub auth: auth::AuthState,
    pub jobs: Arc<jobs::Jobs>,
    pub keychain: keychain::KeychainCache,
}

impl App {
    pub fn new(config: Config, store: Store) -> Arc<App> {
        Arc::new(App { config, store, auth: auth::AuthState::default(), jobs: Arc::new(jobs::Jobs::default()),
            keychain: keychain::KeychainCache::default(),
        })
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
