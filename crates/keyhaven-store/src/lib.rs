//! keyhaven's store layer: the SQLite schema (the default, embedded backend)
//! and the PostgreSQL one ([`pg::PgStore`]), each with its own forward-only
//! migrations, the encryption of secret columns shared by both, and the
//! transactions around them.
//!
//! No business rules live here: callers hand in validated records and get records
//! back. Secret columns (private keys, sshd host private keys, TOTP seeds) are
//! sealed with XChaCha20-Poly1305 under the data dir's `master.key`, with the
//! table, row id and column bound as associated data so a ciphertext cannot be
//! moved to another row. Passwords, API keys and tokens are stored only as hashes
//! computed by the service layer.

#![forbid(unsafe_code)]

pub mod audit;
#[cfg(test)]
mod backend_tests;
mod changes;
pub mod cluster;
mod crypto;
mod db;
mod error;
pub mod jobs;
pub mod migrate;
pub mod pg;
pub mod records;
pub mod rsync;
mod schema;
pub mod snapshot;
mod store;

pub use audit::*;
pub use changes::{ChangeFeed, Changes};
pub use crypto::{MasterKey, MASTER_KEY_FILE};
pub use db::SyncTicket;
pub use error::StoreError;
pub use jobs::{JobRecord, SharedJobs};
pub use pg::PgStore;
pub use records::*;
pub use rsync::*;
pub use schema::DB_FILE;
pub use store::Store;
