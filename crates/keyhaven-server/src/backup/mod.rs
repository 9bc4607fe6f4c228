//! Encrypted backup and restore of a data dir (`keyhaven backup`/`restore`,
//! `config.save`/`config.upload`).
//!
//! A backup is one [age](https://age-encryption.org) file (passphrase
//! recipient, scrypt) holding a tar: `manifest.json` first (keyhaven version,
//! time, schema version, each part's size and SHA-256), then the parts — a
//! consistent copy of the database (`VACUUM INTO`, never a copy of the live
//! file), `master.key`, the sshd host key files and the data dir's TLS
//! certificate and key when present. `age -d` opens it.
//!
//! A restore first *stages*: decrypts, checks every part against the manifest
//! and the database against its master key and this binary's schema, into
//! `restore-staged/` in the data dir; nothing else changes until that
//! succeeded. It then *applies*: the current parts move to
//! `restore-previous-<time>/`, the staged ones into place. The previous state
//! is removed once the restored one has started ([`restore::forget_previous`]).
//! The daemon applies a staged restore at start, so `config.upload` stages,
//! then restarts the process in place ([`restart`]).
//!
//! * [`format`]: the manifest, part names, encryption and decryption.
//! * [`create`]: making a backup file.
//! * [`restore`]: staging and applying one.
//! * [`lock`]: the data dir lock that tells a running daemon apart.
//! * [`online`]: `config.save` and `config.upload` in the running daemon.
//! * [`restart`]: re-executing the daemon onto a restored state, keeping its listener.

pub mod create;
pub mod format;
pub mod lock;
pub mod online;
pub mod restart;
pub mod restore;

use std::path::PathBuf;

pub use create::{create_backup, BackupSummary};
pub use format::{read_passphrase_file, Passphrase};
pub use restore::{apply_staged, forget_previous, stage, Staged};

/// Errors of backup and restore; each says what to do next. None carries a
/// passphrase or key material.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] keyhaven_store::StoreError),
    #[error("the passphrase file {0} is empty; put the backup passphrase in it (one line)")]
    EmptyPassphrase(PathBuf),
    #[error("the passphrase is empty; give the passphrase the backup is encrypted with")]
    NoPassphrase,
    #[error("the passphrase does not open this backup; check the passphrase (nothing was changed)")]
    WrongPassphrase,
    #[error(
        "this backup asks for scrypt work factor 2^{required}, more than keyhaven accepts (2^{max}); it was not made by keyhaven (nothing was changed)"
    )]
    ExcessiveWork { required: u8, max: u8 },
    #[error("this is not a keyhaven backup (not an age passphrase-encrypted file): {0} (nothing was changed)")]
    NotABackup(String),
    #[error("the backup file is damaged or truncated ({0}); use another copy (nothing was changed)")]
    Damaged(String),
    #[error("the backup's manifest is invalid: {0} (nothing was changed)")]
    Manifest(String),
    #[error(
        "the backup's part {part} does not match its manifest ({what}); the file was altered, use another copy (nothing was changed)"
    )]
    PartMismatch { part: String, what: &'static str },
    #[error(
        "the backup has database schema version {found}, newer than this keyhaven ({}) knows ({known}); it was made by keyhaven {made_by}: install that version or newer to restore it (nothing was changed)",
        env!("CARGO_PKG_VERSION")
    )]
    NewerSchema { found: u32, known: u32, made_by: String },
    #[error("the backup's database does not check out: {0} (nothing was changed)")]
    BadDatabase(String),
    #[error("{0}")]
    Running(String),
    #[error("the backup is larger than {limit} bytes; keyhaven refuses it (nothing was changed)")]
    TooLarge { limit: u64 },
}

impl BackupError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, BackupError>;
