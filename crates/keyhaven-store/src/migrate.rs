//! `keyhaven store migrate`: copy a whole installation between the two
//! backends — an embedded SQLite data dir into an empty PostgreSQL database
//! ([`sqlite_to_postgres`]), or a PostgreSQL database into an empty data dir
//! ([`postgres_to_sqlite`]) — with its ids, sealed columns and id counters,
//! verified before it is committed.
//!
//! Sealed columns are copied as they are: a seal binds only the master key
//! and `keyhaven:v1:<table>:<row>:<column>` (see `crypto`), both schemas use
//! the same table and column names, ids are kept and the same `master.key`
//! serves both sides (the destination's key check is compared first).
//! Nothing backend-specific is bound, so a re-seal would only change the
//! nonces. The verification opens every sealed value on both sides anyway.
//!
//! The source keeps running: SQLite is read from a `VACUUM INTO` snapshot
//! (as `keyhaven backup` does), PostgreSQL in one `REPEATABLE READ READ ONLY`
//! transaction. The destination is written in one transaction, compared row
//! by row with the source inside it, and committed only when every row and
//! every decrypted secret is the same: a refused or failed migration leaves
//! no rows behind.
//!
//! Only the tables both schemas share are copied (listed in [`TABLES`]);
//! each backend's schema history stays its own, and the key check is
//! recorded by the destination's own open with the same key.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, OptionalExtension};
use tokio_postgres::types::ToSql;

use crate::crypto::{MasterKey, MASTER_KEY_FILE};
use crate::db::{SqliteStore, SECRET_COLUMNS};
use crate::error::{Result, StoreError};
use crate::pg::{Pg, PgStore};
use crate::schema::{DB_FILE, KEY_CHECK};

/// Rows read (and compared) per statement.
const CHUNK: usize = 2_000;
/// Rows per multi-row INSERT on PostgreSQL (12 columns at most: well under
/// its 65,535 parameters per statement).
const PG_INSERT_ROWS: usize = 500;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Real,
    Text,
    Bytes,
    Bool,
}

/// A table both schemas have: its columns (the primary key first) and
/// whether its `id` has a counter (SQLite AUTOINCREMENT, PostgreSQL identity).
struct Table {
    name: &'static str,
    cols: &'static [(&'static str, Ty)],
    counter: bool,
    /// Rows left out: the key check, which each side records itself.
    skip: &'static str,
}

impl Table {
    fn int_key(&self) -> bool {
        self.cols[0].1 == Ty::Int
    }

    fn key(&self) -> &'static str {
        self.cols[0].0
    }

    fn col_list(&self) -> String {
        self.cols.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    }
}

use Ty::*;

/// Every table `store migrate` copies, parents before children (foreign keys).
const TABLES: &[Table] = &[
    Table { name: "meta", cols: &[("key", Text), ("value", Bytes)], counter: false, skip: "key <> 'key_check'" },
    Table {
        name: "users",
        cols: &[
            ("id", Int),
            ("username", Text),
            ("data", Text),
            ("password_hash", Text),
            ("twofactor_secret", Bytes),
            ("totp_last_step", Int),
        ],
        counter: true,
        skip: "",
    },
    Table {
        name: "api_keys",
        cols: &[
            ("id", Int),
            ("name", Text),
            ("username", Text),
            ("key_hash", Text),
            ("created_at", Int),
            ("expires_at", Int),
        ],
        counter: true,
        skip: "",
    },
    Table {
        name: "tokens",
        cols: &[
            ("id", Int),
            ("token_hash", Text),
            ("username", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("single_use", Bool),
            ("origin", Text),
            ("attrs", Text),
        ],
        counter: true,
        skip: "",
    },
    Table {
        name: "keychain",
        cols: &[
            ("id", Int),
            ("name", Text),
            ("type", Text),
            ("attributes", Text),
            ("private_key", Bytes),
            ("created_at", Int),
        ],
        counter: true,
        skip: "",
    },
    Table {
        name: "connection_tests",
        cols: &[
            ("connection_id", Int),
            ("ok", Bool),
            ("stage", Text),
            ("error", Text),
            ("latency_ms", Int),
            ("tested_at", Int),
        ],
        counter: false,
        skip: "",
    },
    Table { name: "settings", cols: &[("key", Text), ("value", Text)], counter: false, skip: "" },
    Table {
        name: "host_keys",
        cols: &[("id", Int), ("algorithm", Text), ("private_key", Bytes), ("public_key", Text)],
        counter: true,
        skip: "",
    },
    Table {
        name: "rsync_tasks",
        cols: &[("id", Int), ("data", Text), ("enabled", Bool), ("ssh_credentials", Int)],
        counter: true,
        skip: "",
    },
    Table {
        name: "rsync_runs",
        cols: &[
            ("task_id", Int),
            ("job_id", Int),
            ("state", Text),
            ("started", Real),
            ("finished", Real),
            ("error", Text),
            ("log", Text),
        ],
        counter: false,
        skip: "",
    },
    Table { name: "rsync_last_success", cols: &[("task_id", Int), ("at", Real)], counter: false, skip: "" },
    Table {
        name: "audit",
        cols: &[
            ("id", Int),
            ("ts", Real),
            ("username", Text),
            ("address", Text),
            ("service", Text),
            ("method", Text),
            ("event", Text),
            ("target", Text),
            ("success", Bool),
            ("error", Text),
        ],
        counter: true,
        skip: "",
    },
];

/// One value of a row. No `Debug`: rows carry password hashes and sealed keys.
#[derive(Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
}

type Row = Vec<Cell>;

/// What a migration copied.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    /// The source: the SQLite file, or PostgreSQL's host:port/database.
    pub from: String,
    /// The destination, likewise.
    pub to: String,
    /// Rows copied per table, in copy order.
    pub tables: Vec<(&'static str, u64)>,
    /// Sealed values opened on both sides and found equal.
    pub secrets_verified: u64,
}

/// Called after each table is copied, with its name and row count.
pub type Progress = Box<dyn Fn(&'static str, u64) + Send + Sync + 'static>;

// ---------------------------------------------------------------- SQLite side

fn lite_where(t: &Table, keyed: bool) -> String {
    let mut conds: Vec<String> = Vec::new();
    if !t.skip.is_empty() {
        conds.push(t.skip.to_string());
    }
    if keyed {
        conds.push(format!("{} > ?1", t.key()));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

fn lite_cell(t: &Table, i: usize, v: ValueRef<'_>) -> Result<Cell> {
    let (col, ty) = t.cols[i];
    let bad = |what: &str| StoreError::Corrupt(format!("{}.{col} holds {what}, not the expected type", t.name));
    Ok(match (ty, v) {
        (_, ValueRef::Null) => Cell::Null,
        (Int, ValueRef::Integer(n)) => Cell::Int(n),
        (Real, ValueRef::Real(f)) => Cell::Real(f),
        (Real, ValueRef::Integer(n)) => Cell::Real(n as f64),
        (Bool, ValueRef::Integer(n)) => Cell::Bool(n != 0),
        (Text, ValueRef::Text(b)) => {
            Cell::Text(String::from_utf8(b.to_vec()).map_err(|_| bad("text that is not UTF-8"))?)
        }
        (Bytes, ValueRef::Blob(b)) => Cell::Bytes(b.to_vec()),
        (_, ValueRef::Integer(_)) => return Err(bad("an integer")),
        (_, ValueRef::Real(_)) => return Err(bad("a real")),
        (_, ValueRef::Text(_)) => return Err(bad("text")),
        (_, ValueRef::Blob(_)) => return Err(bad("a blob")),
    })
}

/// Up to [`CHUNK`] rows after key `after` (a table keyed by text is read whole).
fn lite_chunk(conn: &Mutex<Connection>, t: &Table, after: Option<i64>) -> Result<Vec<Row>> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    let keyed = t.int_key() && after.is_some();
    let limit = if t.int_key() { format!(" LIMIT {CHUNK}") } else { String::new() };
    let sql = format!("SELECT {} FROM {}{} ORDER BY {}{limit}", t.col_list(), t.name, lite_where(t, keyed), t.key());
    let mut st = conn.prepare(&sql)?;
    let params: Vec<i64> = after.filter(|_| keyed).into_iter().collect();
    let mut rows = st.query(params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(t.cols.len());
        for i in 0..t.cols.len() {
            row.push(lite_cell(t, i, r.get_ref(i)?)?);
        }
        out.push(row);
    }
    Ok(out)
}

fn lite_count(conn: &Mutex<Connection>, t: &Table) -> Result<u64> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    let n: i64 =
        conn.query_row(&format!("SELECT count(*) FROM {}{}", t.name, lite_where(t, false)), [], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

fn lite_insert(conn: &Mutex<Connection>, t: &Table, rows: &[Row]) -> Result<()> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    let marks = (1..=t.cols.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let mut st = conn.prepare(&format!("INSERT INTO {}({}) VALUES({marks})", t.name, t.col_list()))?;
    for row in rows {
        let values = row.iter().map(|c| match c {
            Cell::Null => SqlValue::Null,
            Cell::Int(n) => SqlValue::Integer(*n),
            Cell::Real(f) => SqlValue::Real(*f),
            Cell::Text(s) => SqlValue::Text(s.clone()),
            Cell::Bytes(b) => SqlValue::Blob(b.clone()),
            Cell::Bool(b) => SqlValue::Integer(i64::from(*b)),
        });
        st.execute(params_from_iter(values))?;
    }
    Ok(())
}

/// The table's id counter: the highest id it ever handed out.
fn lite_counter(conn: &Mutex<Connection>, t: &Table) -> Result<Option<i64>> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    Ok(conn
        .query_row("SELECT seq FROM sqlite_sequence WHERE name = ?1", [t.name], |r| r.get::<_, i64>(0))
        .optional()?)
}

fn lite_set_counter(conn: &Mutex<Connection>, t: &Table, at_least: i64) -> Result<()> {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    // Inserting explicit ids already raised it to the highest id copied.
    conn.execute(
        "INSERT INTO sqlite_sequence(name, seq) SELECT ?1, ?2
         WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?1)",
        rusqlite::params![t.name, at_least],
    )?;
    conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?2) WHERE name = ?1", rusqlite::params![t.name, at_least])?;
    Ok(())
}

// ---------------------------------------------------------------- PostgreSQL side

fn pg_where(t: &Table, keyed: bool) -> String {
    let mut conds: Vec<String> = Vec::new();
    if !t.skip.is_empty() {
        conds.push(t.skip.to_string());
    }
    if keyed {
        conds.push(format!("{} > $1", t.key()));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

fn pg_cell(t: &Table, i: usize, r: &tokio_postgres::Row) -> Result<Cell> {
    let (col, ty) = t.cols[i];
    let bad = |e: tokio_postgres::Error| StoreError::Corrupt(format!("{}.{col}: {e}", t.name));
    Ok(match ty {
        Int => r.try_get::<_, Option<i64>>(i).map_err(bad)?.map_or(Cell::Null, Cell::Int),
        Real => r.try_get::<_, Option<f64>>(i).map_err(bad)?.map_or(Cell::Null, Cell::Real),
        Text => r.try_get::<_, Option<String>>(i).map_err(bad)?.map_or(Cell::Null, Cell::Text),
        Bytes => r.try_get::<_, Option<Vec<u8>>>(i).map_err(bad)?.map_or(Cell::Null, Cell::Bytes),
        Bool => r.try_get::<_, Option<bool>>(i).map_err(bad)?.map_or(Cell::Null, Cell::Bool),
    })
}

async fn pg_chunk(pg: &Pg, tx: &tokio_postgres::Transaction<'_>, t: &Table, after: Option<i64>) -> Result<Vec<Row>> {
    let keyed = t.int_key() && after.is_some();
    // Text keys in byte order, as SQLite's BINARY collation sorts them.
    let (order, limit) = if t.int_key() {
        (t.key().to_string(), format!(" LIMIT {CHUNK}"))
    } else {
        (format!("{} COLLATE \"C\"", t.key()), String::new())
    };
    let sql = format!("SELECT {} FROM {}{} ORDER BY {order}{limit}", t.col_list(), t.name, pg_where(t, keyed));
    let rows = match after.filter(|_| keyed) {
        Some(a) => tx.query(&sql, &[&a]).await,
        None => tx.query(&sql, &[]).await,
    }
    .map_err(|e| pg.err(e))?;
    rows.iter().map(|r| (0..t.cols.len()).map(|i| pg_cell(t, i, r)).collect::<Result<Row>>()).collect()
}

async fn pg_count(pg: &Pg, tx: &tokio_postgres::Transaction<'_>, t: &Table) -> Result<u64> {
    let row = tx
        .query_one(&format!("SELECT count(*) FROM {}{}", t.name, pg_where(t, false)), &[])
        .await
        .map_err(|e| pg.err(e))?;
    Ok(row.try_get::<_, i64>(0).map_err(|e| pg.err(e))?.max(0) as u64)
}

fn pg_param(t: &Table, i: usize, c: &Cell) -> Result<Box<dyn ToSql + Sync + Send>> {
    Ok(match (t.cols[i].1, c) {
        (Int, Cell::Null) => Box::new(None::<i64>),
        (Real, Cell::Null) => Box::new(None::<f64>),
        (Text, Cell::Null) => Box::new(None::<String>),
        (Bytes, Cell::Null) => Box::new(None::<Vec<u8>>),
        (Bool, Cell::Null) => Box::new(None::<bool>),
        (Int, Cell::Int(n)) => Box::new(*n),
        (Real, Cell::Real(f)) => Box::new(*f),
        (Text, Cell::Text(s)) => Box::new(s.clone()),
        (Bytes, Cell::Bytes(b)) => Box::new(b.clone()),
        (Bool, Cell::Bool(b)) => Box::new(*b),
        _ => {
            return Err(StoreError::Corrupt(format!("{}.{}: a value of another type was read", t.name, t.cols[i].0)));
        }
    })
}

async fn pg_insert(pg: &Pg, tx: &tokio_postgres::Transaction<'_>, t: &Table, rows: &[Row]) -> Result<()> {
    let n = t.cols.len();
    for batch in rows.chunks(PG_INSERT_ROWS) {
        let mut sql = format!("INSERT INTO {}({}) VALUES ", t.name, t.col_list());
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(batch.len() * n);
        for (ri, row) in batch.iter().enumerate() {
            if ri > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for (ci, cell) in row.iter().enumerate() {
                if ci > 0 {
                    sql.push_str(", ");
                }
                params.push(pg_param(t, ci, cell)?);
                sql.push_str(&format!("${}", params.len()));
            }
            sql.push(')');
        }
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        tx.execute(&sql, &refs).await.map_err(|e| match pg.err(e) {
            StoreError::Postgres(m) => StoreError::Postgres(format!("copying {}: {m}", t.name)),
            other => other,
        })?;
    }
    Ok(())
}

async fn pg_counter(pg: &Pg, tx: &tokio_postgres::Transaction<'_>, t: &Table) -> Result<Option<i64>> {
    let row = tx
        .query_one("SELECT pg_sequence_last_value(pg_get_serial_sequence($1, 'id')::regclass)", &[&t.name])
        .await
        .map_err(|e| pg.err(e))?;
    row.try_get::<_, Option<i64>>(0).map_err(|e| pg.err(e))
}

async fn pg_set_counter(pg: &Pg, tx: &tokio_postgres::Transaction<'_>, t: &Table, at_least: i64) -> Result<()> {
    // setval(.., false) for a table that never handed out an id: the next is 1.
    tx.execute(
        "SELECT setval(pg_get_serial_sequence($1, 'id'), greatest($2::bigint, 1), $2::bigint >= 1)",
        &[&t.name, &at_least],
    )
    .await
    .map_err(|e| pg.err(e))?;
    Ok(())
}

// ---------------------------------------------------------------- both

/// One side of a migration: a SQLite connection (inside its transaction or
/// snapshot) or a PostgreSQL transaction.
enum Side<'a> {
    Lite(&'a Mutex<Connection>),
    Pg(&'a Pg, &'a tokio_postgres::Transaction<'a>),
}

impl Side<'_> {
    async fn chunk(&self, t: &Table, after: Option<i64>) -> Result<Vec<Row>> {
        match self {
            Side::Lite(c) => lite_chunk(c, t, after),
            Side::Pg(pg, tx) => pg_chunk(pg, tx, t, after).await,
        }
    }

    async fn count(&self, t: &Table) -> Result<u64> {
        match self {
            Side::Lite(c) => lite_count(c, t),
            Side::Pg(pg, tx) => pg_count(pg, tx, t).await,
        }
    }

    async fn insert(&self, t: &Table, rows: &[Row]) -> Result<()> {
        match self {
            Side::Lite(c) => lite_insert(c, t, rows),
            Side::Pg(pg, tx) => pg_insert(pg, tx, t, rows).await,
        }
    }

    async fn counter(&self, t: &Table) -> Result<Option<i64>> {
        match self {
            Side::Lite(c) => lite_counter(c, t),
            Side::Pg(pg, tx) => pg_counter(pg, tx, t).await,
        }
    }

    async fn set_counter(&self, t: &Table, at_least: i64) -> Result<()> {
        match self {
            Side::Lite(c) => lite_set_counter(c, t, at_least),
            Side::Pg(pg, tx) => pg_set_counter(pg, tx, t, at_least).await,
        }
    }
}

fn int_key(row: &Row) -> Option<i64> {
    match row.first() {
        Some(Cell::Int(n)) => Some(*n),
        _ => None,
    }
}

/// Refuse a destination that holds any row, naming the first table that does.
async fn check_empty(dst: &Side<'_>, target: &str) -> Result<()> {
    for t in TABLES {
        let rows = dst.count(t).await?;
        if rows > 0 {
            return Err(StoreError::MigrateNotEmpty { target: target.to_string(), table: t.name, rows });
        }
    }
    Ok(())
}

/// Copy every table, then raise the destination's id counters to the
/// source's (ids of deleted rows are not handed out again).
async fn copy(src: &Side<'_>, dst: &Side<'_>, progress: &Progress) -> Result<Vec<(&'static str, u64)>> {
    let mut counts = Vec::with_capacity(TABLES.len());
    for t in TABLES {
        let mut after = None;
        let mut copied = 0u64;
        let mut max_id = 0i64;
        loop {
            let rows = src.chunk(t, after).await?;
            if rows.is_empty() {
                break;
            }
            dst.insert(t, &rows).await?;
            copied += rows.len() as u64;
            let last = rows.last().and_then(int_key);
            max_id = max_id.max(last.unwrap_or(0));
            if !t.int_key() || rows.len() < CHUNK {
                break;
            }
            after = last;
        }
        if t.counter {
            let high = src.counter(t).await?.unwrap_or(0).max(max_id);
            dst.set_counter(t, high).await?;
        }
        progress(t.name, copied);
        counts.push((t.name, copied));
    }
    Ok(counts)
}

/// Compare every table row by row, open every sealed value on both sides
/// and compare the plaintexts, and the key checks. Returns how many sealed
/// values were compared.
async fn verify(src: &Side<'_>, dst: &Side<'_>, key: &MasterKey) -> Result<u64> {
    let mut secrets = 0u64;
    for t in TABLES {
        let (a, b) = (src.count(t).await?, dst.count(t).await?);
        if a != b {
            return Err(StoreError::MigrateVerify {
                table: t.name,
                detail: format!("{a} rows in the source, {b} in the copy"),
            });
        }
        let sealed: Vec<(usize, &'static str)> = SECRET_COLUMNS
            .iter()
            .filter(|(table, _)| *table == t.name)
            .filter_map(|(_, column)| t.cols.iter().position(|(c, _)| c == column).map(|i| (i, *column)))
            .collect();
        let mut after = None;
        loop {
            let (left, right) = (src.chunk(t, after).await?, dst.chunk(t, after).await?);
            if left.len() != right.len() {
                return Err(StoreError::MigrateVerify { table: t.name, detail: "the rows differ in number".into() });
            }
            for (l, r) in left.iter().zip(&right) {
                let id = int_key(l).unwrap_or(0);
                if l != r {
                    let which = match &l[0] {
                        Cell::Text(k) => format!("the row of {} {k:?}", t.key()),
                        _ => format!("row {id}"),
                    };
                    return Err(StoreError::MigrateVerify { table: t.name, detail: format!("{which} differs") });
                }
                for &(i, column) in &sealed {
                    let (Cell::Bytes(ls), Cell::Bytes(rs)) = (&l[i], &r[i]) else { continue };
                    let lp = key.open(t.name, id, column, ls).ok_or(StoreError::Decrypt {
                        table: t.name,
                        column,
                        row: id,
                    })?;
                    let rp = key.open(t.name, id, column, rs).ok_or(StoreError::MigrateVerify {
                        table: t.name,
                        detail: format!("{column} of row {id} does not decrypt in the copy"),
                    })?;
                    if lp.as_slice() != rp.as_slice() {
                        return Err(StoreError::MigrateVerify {
                            table: t.name,
                            detail: format!("{column} of row {id} decrypts to other bytes in the copy"),
                        });
                    }
                    secrets += 1;
                }
            }
            if !t.int_key() || left.len() < CHUNK {
                break;
            }
            after = left.last().and_then(int_key);
        }
    }
    for (side, name) in [(src, "source"), (dst, "copy")] {
        if !key_check_opens(side, key).await? {
            return Err(StoreError::MigrateVerify {
                table: "meta",
                detail: format!("the {name}'s master key check does not open with the key"),
            });
        }
        secrets += 1;
    }
    Ok(secrets)
}

async fn key_check_opens(side: &Side<'_>, key: &MasterKey) -> Result<bool> {
    let sealed: Option<Vec<u8>> = match side {
        Side::Lite(c) => {
            let c = c.lock().unwrap_or_else(|p| p.into_inner());
            c.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional()?
        }
        Side::Pg(pg, tx) => tx
            .query_opt("SELECT value FROM meta WHERE key = 'key_check'", &[])
            .await
            .map_err(|e| pg.err(e))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| pg.err(e))?,
    };
    Ok(sealed.is_some_and(|s| key.open("meta", 0, "key_check", &s).is_some_and(|p| p.as_slice() == KEY_CHECK)))
}

// ---------------------------------------------------------------- the two directions

/// A file removed when dropped (the snapshot of the source).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Copy the SQLite database of data dir `dir` (which may be in use by a
/// running daemon) into the empty PostgreSQL database at `url`, sealed with
/// `dir/master.key`. Refused, changing nothing, when the destination holds
/// rows or was set up with another master key.
pub fn sqlite_to_postgres(dir: &Path, url: &str, progress: Progress) -> Result<MigrateReport> {
    let key_path = dir.join(MASTER_KEY_FILE);
    let db = dir.join(DB_FILE);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let snap = TempFile(dir.join(format!(".store-migrate-{}-{}.db", std::process::id(), now.as_nanos())));
    crate::snapshot::snapshot_db(dir, &snap.0)?;
    crate::snapshot::check_copy(&snap.0, &key_path)?;
    let mut conn = Connection::open(&snap.0)?;
    // An older schema is brought up to date in the snapshot, never in the source.
    crate::schema::migrations().to_latest(&mut conn)?;
    let key = MasterKey::load(&key_path)?;

    let (store, _) = PgStore::open(dir, url)?;
    let to = store.target().to_string();
    let conn = Mutex::new(conn);
    let (tables, secrets) = store.run(move |pg| async move {
        let mut client = pg.client().await?;
        let tx = client.transaction().await.map_err(|e| pg.err(e))?;
        let (src, dst) = (Side::Lite(&conn), Side::Pg(&pg, &tx));
        check_empty(&dst, pg.target()).await?;
        let tables = copy(&src, &dst, &progress).await?;
        let secrets = verify(&src, &dst, &key).await?;
        tx.commit().await.map_err(|e| pg.err(e))?;
        Ok((tables, secrets))
    })?;
    Ok(MigrateReport { from: db.display().to_string(), to, tables, secrets_verified: secrets })
}

/// Copy the PostgreSQL database at `url` (nodes may keep running) into data
/// dir `dir`, which must hold no keyhaven rows, with the master key in
/// `key_file` (copied to `dir/master.key` when that is absent; an existing
/// one must be the same key). On failure nothing this created is left.
pub fn postgres_to_sqlite(url: &str, key_file: &Path, dir: &Path, progress: Progress) -> Result<MigrateReport> {
    if !key_file.exists() {
        return Err(StoreError::io(
            key_file,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the master key of the PostgreSQL database is needed: copy master.key from a node that uses it (or name it with --master-key)",
            ),
        ));
    }
    let key = MasterKey::load(key_file)?;
    let (store, _) = PgStore::open_key_file(key_file.to_path_buf(), url)?;
    let from = store.target().to_string();

    let dest_key = dir.join(MASTER_KEY_FILE);
    let db = dir.join(DB_FILE);
    let created_key = if dest_key.exists() {
        if !MasterKey::load(&dest_key)?.same_as(&key) {
            return Err(StoreError::MigrateKeyMismatch { path: dest_key });
        }
        false
    } else {
        key.create_file(&dest_key)?;
        true
    };
    let created_db = !db.exists();
    let cleanup = |created_key: bool, created_db: bool| {
        if created_db {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
        }
        if created_key {
            let _ = std::fs::remove_file(&dest_key);
        }
    };
    let result = (|| {
        // The schema and key check, made (or checked) as a first start would.
        drop(SqliteStore::open(dir)?);
        let conn = Connection::open(&db)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let conn = Mutex::new(conn);
        let target = db.display().to_string();
        store.run(move |pg| async move {
            let mut client = pg.client().await?;
            let tx = pg.read_snapshot(&mut client).await?;
            let (src, dst) = (Side::Pg(&pg, &tx), Side::Lite(&conn));
            check_empty(&dst, &target).await?;
            let tables = copy(&src, &dst, &progress).await?;
            let secrets = verify(&src, &dst, &key).await?;
            conn.lock().unwrap_or_else(|p| p.into_inner()).execute_batch("COMMIT")?;
            Ok((tables, secrets))
        })
    })();
    match result {
        Ok((tables, secrets)) => {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io(dir, e))?;
            Ok(MigrateReport { from, to: db.display().to_string(), tables, secrets_verified: secrets })
        }
        Err(e) => {
            cleanup(created_key, created_db);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
