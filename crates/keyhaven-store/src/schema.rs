//! What the database of a data dir is: its file name, the migrations this
//! binary knows, and the check that a master key is the one that sealed it.
//! A leaf shared by `db` (opening, migrating) and `snapshot` (backups,
//! pre-migration copies), so neither imports the other.

use rusqlite::{Connection, OptionalExtension};
use rusqlite_migration::{Migrations, M};

use crate::crypto::MasterKey;
use crate::error::Result;

pub const DB_FILE: &str = "keyhaven.db";
pub(crate) const KEY_CHECK: &[u8] = b"keyhaven master key check";

/// Forward-only; never edit a released step, append a new one.
pub(crate) fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("migrations/0001_initial.sql")),
        M::up(include_str!("migrations/0002_connection_tests.sql")),
        M::up(include_str!("migrations/0003_totp_replay.sql")),
        M::up(include_str!("migrations/0004_audit.sql")),
        M::up(include_str!("migrations/0005_rsync_tasks.sql")),
        M::up(include_str!("migrations/0006_rsync_last_success.sql")),
        M::up(include_str!("migrations/0007_schema_history.sql")),
    ])
}

/// How many migration steps this binary has (its latest schema version).
pub(crate) fn migration_count() -> usize {
    MIGRATION_COUNT
}

/// Keep in step with [`migrations`] (checked by a test).
pub(crate) const MIGRATION_COUNT: usize = 7;

pub(crate) fn key_check_matches(conn: &Connection, key: &MasterKey) -> Result<Option<bool>> {
    let sealed: Option<Vec<u8>> =
        conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional()?;
    Ok(sealed.map(|s| key.open("meta", 0, "key_check", &s).is_some_and(|p| p.as_slice() == KEY_CHECK)))
}
