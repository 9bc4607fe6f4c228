//! Errors of the store layer. They never carry secret plaintext.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid master key (expected exactly 32 bytes); restore it from your backup")]
    BadMasterKey { path: PathBuf },
    #[error("the master key in {path} does not match this database; restore the master.key that belongs to it")]
    WrongMasterKey { path: PathBuf },
    #[error(
        "a secret in {table}.{column} (row {row}) could not be decrypted; the master key or the row was tampered with"
    )]
    Decrypt { table: &'static str, column: &'static str, row: i64 },
    #[error(
        "{path} has database schema version {found}, newer than this keyhaven ({}) knows ({known}); it was made by keyhaven {}: install that version or newer, or restore a backup made by this one",
        env!("CARGO_PKG_VERSION"),
        needed.as_deref().unwrap_or("of a later release")
    )]
    NewerSchema { path: PathBuf, found: u32, known: u32, needed: Option<String> },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// PostgreSQL could not be reached (or the connection broke). `target`
    /// is host:port/database, never the password.
    #[error("cannot reach PostgreSQL at {target}: {detail}; check the database setting and that the server is up and accepts this node")]
    PgConnect { target: String, detail: String },
    #[error("PostgreSQL error: {0}")]
    Postgres(String),
    #[error("invalid database setting: {0}; give a URL like postgres://user:password@host:5432/keyhaven, or leave it empty for the embedded SQLite database")]
    BadDatabaseUrl(String),
    #[error(
        "the PostgreSQL database {target} has keyhaven schema version {found}, newer than this keyhaven ({}) knows ({known}); it was migrated by keyhaven {}: upgrade this node to that version or newer",
        env!("CARGO_PKG_VERSION"),
        needed.as_deref().unwrap_or("of a later release")
    )]
    PgNewerSchema { target: String, found: u32, known: u32, needed: Option<String> },
    #[error("the master key in {path} does not match the PostgreSQL database {target}: every node must hold the same master.key; copy it from a node that already uses this database")]
    PgWrongMasterKey { path: PathBuf, target: String },
    #[error("{path} is missing but the PostgreSQL database {target} already holds secrets sealed with a master key: copy master.key from a node that already uses this database")]
    PgMissingMasterKey { path: PathBuf, target: String },
    #[error("keyhaven backup copies the embedded SQLite database only; this node stores its data in PostgreSQL ({target}): back it up with pg_dump (or your PostgreSQL backups) and keep a copy of master.key apart from it")]
    BackupOnPostgres { target: String },
    #[error("{what} is not available with a PostgreSQL database in this keyhaven version; use the embedded SQLite database (an empty database setting) for it")]
    NotOnPostgres { what: &'static str },
    #[error("the destination {target} is not empty: table {table} has {rows} row(s); store migrate copies into an empty PostgreSQL database (create a new one with createdb) or an empty data dir only; nothing was changed")]
    MigrateNotEmpty { target: String, table: &'static str, rows: u64 },
    #[error("{path} holds another master key than the source's; migrate into a data dir without master.key (or with the same key)")]
    MigrateKeyMismatch { path: PathBuf },
    #[error("the copy of table {table} does not match the source ({detail}); nothing was committed: check the destination (disk, server log) and run store migrate again")]
    MigrateVerify { table: &'static str, detail: String },
    /// A caller asked for something the store cannot do (a programming error).
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
