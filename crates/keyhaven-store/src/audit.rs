//! Querying and pruning the audit table in SQL.
//!
//! `audit.query` must not load the whole table (a login flood makes it
//! large), so the service translates the TrueNAS filters and options it can
//! into an [`AuditQuery`] and this module runs it: filter, order, offset and
//! limit, or count. The description is typed and every value is a bound
//! parameter; nothing a caller sends is ever interpolated into SQL.
//!
//! Each primitive has one meaning, which the service relies on to give the
//! same answer as its in-memory filter engine:
//! - a NULL column never matches, except in [`AuditFilter::IsNull`] and
//!   [`AuditFilter::Differs`];
//! - text is compared byte by byte (SQLite's BINARY collation, and `BLOB`
//!   casts for prefixes, suffixes and substrings, so neither `LIKE`'s ASCII
//!   case folding nor an embedded NUL changes a result);
//! - ties in `order_by` keep insertion order (`id` ascending) whatever the
//!   direction, as a stable sort of the rows in `id` order would.

use rusqlite::functions::FunctionFlags;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter};

use crate::db::SqliteStore;
use crate::error::{Result, StoreError};

/// Rows deleted per statement by [`SqliteStore::audit_prune`]: small enough that
/// no statement holds the database lock for long.
pub const AUDIT_PRUNE_BATCH: usize = 10_000;

// ---------------------------------------------------------------- entries

#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub username: Option<String>,
    pub address: Option<String>,
    pub service: String,
    pub method: Option<String>,
    pub event: String,
    pub target: Option<String>,
    pub success: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: i64,
    pub ts: f64,
    pub entry: AuditEntry,
}

impl SqliteStore {
    pub fn audit_insert(&self, e: &AuditEntry) -> Result<i64> {
        let ts =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.audit_insert_at(ts, e)
    }

    /// [`SqliteStore::audit_insert`] with a given time (seconds since the epoch),
    /// for imports and tests.
    pub fn audit_insert_at(&self, ts: f64, e: &AuditEntry) -> Result<i64> {
        // Not waited on: an audit entry rides with the next durable write, so
        // a login does not pay an fsync for its own audit row.
        let conn = self.conn_volatile();
        let mut st = conn.prepare_cached(
            "INSERT INTO audit(ts, username, address, service, method, event, target, success, error)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        st.execute(params![ts, e.username, e.address, e.service, e.method, e.event, e.target, e.success, e.error])?;
        Ok(conn.last_insert_rowid())
    }

    /// Every entry, in insertion (`id`) order. `audit.query` filters in SQL
    /// instead ([`SqliteStore::audit_query`]); this is for tests and exports.
    pub fn audit_list(&self) -> Result<Vec<AuditRecord>> {
        self.audit_query(&AuditQuery::default())
    }
}

// ---------------------------------------------------------------- queries

/// The SQL name of [`AuditQuery::casefold`].
const CASEFOLD_FN: &str = "keyhaven_casefold";

/// What `audit.query` exposes of an audit row, as a column or expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditField {
    /// `audit_id`: integer.
    Id,
    /// `message_timestamp`: whole seconds (the stored time truncated).
    MessageTimestamp,
    /// `timestamp.$date`: milliseconds (the stored time × 1000, truncated).
    TimestampMs,
    /// Text or NULL.
    Address,
    /// Text or NULL.
    Username,
    /// Text.
    Service,
    /// Text.
    Event,
    /// `event_data.method`: text or NULL.
    Method,
    /// `event_data.description`: text or NULL.
    Target,
    /// `event_data.error`: text or NULL.
    Error,
    /// 0 or 1.
    Success,
}

impl AuditField {
    fn sql(self) -> &'static str {
        match self {
            AuditField::Id => "id",
            // The expression the `audit_message_timestamp` index is built on.
            AuditField::MessageTimestamp => "CAST(ts AS INTEGER)",
            AuditField::TimestampMs => "CAST(ts * 1000.0 AS INTEGER)",
            AuditField::Address => "address",
            AuditField::Username => "username",
            AuditField::Service => "service",
            AuditField::Event => "event",
            AuditField::Method => "method",
            AuditField::Target => "target",
            AuditField::Error => "error",
            AuditField::Success => "success",
        }
    }
}

/// A field, optionally case-folded with [`AuditQuery::casefold`] (text
/// fields only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditExpr {
    pub field: AuditField,
    pub folded: bool,
}

impl From<AuditField> for AuditExpr {
    fn from(field: AuditField) -> Self {
        AuditExpr { field, folded: false }
    }
}

/// A bound value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditValue {
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditCmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl AuditCmp {
    fn sql(self) -> &'static str {
        match self {
            AuditCmp::Eq => "=",
            AuditCmp::Ne => "!=",
            AuditCmp::Lt => "<",
            AuditCmp::Le => "<=",
            AuditCmp::Gt => ">",
            AuditCmp::Ge => ">=",
        }
    }
}

/// A condition on audit rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditFilter {
    /// Every row, or none.
    Const(bool),
    IsNull(AuditExpr),
    NotNull(AuditExpr),
    /// `expr <op> value`.
    Cmp(AuditExpr, AuditCmp, AuditValue),
    /// `expr` is not `value`; NULL differs from every value.
    Differs(AuditExpr, AuditValue),
    /// `expr` equals one of the values.
    In(AuditExpr, Vec<AuditValue>),
    /// `expr` is not NULL and equals none of the values.
    NotIn(AuditExpr, Vec<AuditValue>),
    /// Text `expr` starts with `text` (or, negated, is not NULL and does not).
    StartsWith {
        expr: AuditExpr,
        text: String,
        negated: bool,
    },
    /// Text `expr` ends with `text` (or, negated, is not NULL and does not).
    EndsWith {
        expr: AuditExpr,
        text: String,
        negated: bool,
    },
    /// Text `expr` contains `text` (or, negated, is not NULL and does not).
    Contains {
        expr: AuditExpr,
        text: String,
        negated: bool,
    },
    /// Text `expr` occurs in `text` (or, negated, is not NULL and does not).
    ContainedIn {
        expr: AuditExpr,
        text: String,
        negated: bool,
    },
    /// All of them (the empty list matches every row).
    All(Vec<AuditFilter>),
    /// Any of them (the empty list matches no row).
    Any(Vec<AuditFilter>),
}

impl Default for AuditFilter {
    fn default() -> Self {
        AuditFilter::All(Vec::new())
    }
}

/// Where an order key puts NULLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditNulls {
    /// As the lowest value: first ascending, last descending.
    #[default]
    Natural,
    First,
    Last,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditOrder {
    pub field: AuditField,
    pub descending: bool,
    pub nulls: AuditNulls,
}

/// One `audit.query`, translated.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub filter: AuditFilter,
    /// Primary key first; ties end in `id` order.
    pub order_by: Vec<AuditOrder>,
    /// `None`: every row.
    pub limit: Option<usize>,
    pub offset: usize,
    /// The case folding of [`AuditExpr::folded`] expressions, registered as
    /// an SQL function for the query. Required when any expression is folded.
    pub casefold: Option<fn(&str) -> String>,
}

/// SQL text and the parameters it binds, in order.
#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<SqlValue>,
    folds: bool,
}

impl Sql {
    fn bind(&mut self, v: SqlValue) {
        self.params.push(v);
        self.text.push('?');
    }

    fn expr(&mut self, e: AuditExpr) {
        if e.folded {
            self.folds = true;
            self.text.push_str(CASEFOLD_FN);
            self.text.push('(');
            self.text.push_str(e.field.sql());
            self.text.push(')');
        } else {
            self.text.push_str(e.field.sql());
        }
    }

    /// The expression's bytes, for byte-wise prefix, suffix and substring tests.
    fn blob(&mut self, e: AuditExpr) {
        self.text.push_str("CAST(");
        self.expr(e);
        self.text.push_str(" AS BLOB)");
    }

    /// `len` bytes of the expression from `start` (1-based; negative counts
    /// from the end). SQLite's substr() gives NULL, not an empty blob, for an
    /// empty value, hence the COALESCE (callers exclude NULL values first).
    fn bytes(&mut self, e: AuditExpr, start: i64, len: usize) {
        self.text.push_str("COALESCE(substr(");
        self.blob(e);
        self.text.push_str(", ");
        self.bind(SqlValue::Integer(start));
        self.text.push_str(", ");
        self.bind(SqlValue::Integer(len as i64));
        self.text.push_str("), x'')");
    }

    fn not_null_and(&mut self, e: AuditExpr, negated: bool) {
        if negated {
            self.expr(e);
            self.text.push_str(" IS NOT NULL AND ");
        }
    }

    fn filter(&mut self, f: &AuditFilter) {
        match f {
            AuditFilter::Const(b) => self.text.push_str(if *b { "1" } else { "0" }),
            AuditFilter::IsNull(e) | AuditFilter::NotNull(e) => {
                self.text.push('(');
                self.expr(*e);
                self.text.push_str(if matches!(f, AuditFilter::IsNull(_)) { " IS NULL)" } else { " IS NOT NULL)" });
            }
            AuditFilter::Cmp(e, op, v) => {
                self.text.push('(');
                self.expr(*e);
                self.text.push(' ');
                self.text.push_str(op.sql());
                self.text.push(' ');
                self.bind(value(v));
                self.text.push(')');
            }
            AuditFilter::Differs(e, v) => {
                self.text.push('(');
                self.expr(*e);
                self.text.push_str(" IS NOT ");
                self.bind(value(v));
                self.text.push(')');
            }
            AuditFilter::In(_, vs) if vs.is_empty() => self.text.push('0'),
            AuditFilter::NotIn(e, vs) if vs.is_empty() => self.filter(&AuditFilter::NotNull(*e)),
            AuditFilter::In(e, vs) | AuditFilter::NotIn(e, vs) => {
                let negated = matches!(f, AuditFilter::NotIn(..));
                self.text.push('(');
                self.not_null_and(*e, negated);
                self.expr(*e);
                self.text.push_str(if negated { " NOT IN (" } else { " IN (" });
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        self.text.push_str(", ");
                    }
                    self.bind(value(v));
                }
                self.text.push_str("))");
            }
            AuditFilter::StartsWith { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr, true);
                if !*negated {
                    // Lets SQLite range-scan an index. It matches a superset
                    // (its pattern stops at the first NUL); the bytes decide.
                    self.expr(*expr);
                    self.text.push_str(" GLOB ");
                    self.bind(SqlValue::Text(glob_prefix(text)));
                    self.text.push_str(" AND ");
                }
                self.bytes(*expr, 1, text.len());
                self.text.push_str(if *negated { " != " } else { " = " });
                self.bind(SqlValue::Blob(text.as_bytes().to_vec()));
                self.text.push(')');
            }
            AuditFilter::EndsWith { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr, true);
                if text.is_empty() {
                    // substr() cannot take the last 0 bytes.
                    self.text.push_str(if *negated { "0)" } else { "1)" });
                    return;
                }
                self.bytes(*expr, -(text.len() as i64), text.len());
                self.text.push_str(if *negated { " != " } else { " = " });
                self.bind(SqlValue::Blob(text.as_bytes().to_vec()));
                self.text.push(')');
            }
            AuditFilter::Contains { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr, *negated);
                self.text.push_str("instr(");
                self.blob(*expr);
                self.text.push_str(", ");
                self.bind(SqlValue::Blob(text.as_bytes().to_vec()));
                self.text.push_str(if *negated { ") = 0)" } else { ") > 0)" });
            }
            AuditFilter::ContainedIn { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr, *negated);
                self.text.push_str("instr(");
                self.bind(SqlValue::Blob(text.as_bytes().to_vec()));
                self.text.push_str(", ");
                self.blob(*expr);
                self.text.push_str(if *negated { ") = 0)" } else { ") > 0)" });
            }
            AuditFilter::All(fs) | AuditFilter::Any(fs) => {
                let all = matches!(f, AuditFilter::All(_));
                if fs.is_empty() {
                    self.text.push_str(if all { "1" } else { "0" });
                    return;
                }
                self.text.push('(');
                for (i, f) in fs.iter().enumerate() {
                    if i > 0 {
                        self.text.push_str(if all { " AND " } else { " OR " });
                    }
                    self.filter(f);
                }
                self.text.push(')');
            }
        }
    }

    fn order(&mut self, keys: &[AuditOrder]) {
        self.text.push_str(" ORDER BY ");
        for key in keys {
            self.text.push_str(key.field.sql());
            self.text.push_str(if key.descending { " DESC" } else { " ASC" });
            self.text.push_str(match key.nulls {
                AuditNulls::Natural => "",
                AuditNulls::First => " NULLS FIRST",
                AuditNulls::Last => " NULLS LAST",
            });
            // Unique: later keys, the tie-break included, change nothing.
            if key.field == AuditField::Id {
                return;
            }
            self.text.push_str(", ");
        }
        self.text.push_str("id ASC");
    }
}

fn value(v: &AuditValue) -> SqlValue {
    match v {
        AuditValue::Int(i) => SqlValue::Integer(*i),
        AuditValue::Text(s) => SqlValue::Text(s.clone()),
    }
}

/// A GLOB pattern matching every text that starts with `prefix` up to its
/// first NUL (where SQLite's GLOB stops reading), wildcards escaped.
fn glob_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars().take_while(|&c| c != '\0') {
        match c {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    out.push('*');
    out
}

const AUDIT_COLUMNS: &str = "id, ts, username, address, service, method, event, target, success, error";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.get(0)?,
        ts: r.get(1)?,
        entry: AuditEntry {
            username: r.get(2)?,
            address: r.get(3)?,
            service: r.get(4)?,
            method: r.get(5)?,
            event: r.get(6)?,
            target: r.get(7)?,
            success: r.get(8)?,
            error: r.get(9)?,
        },
    })
}

fn where_clause(q: &AuditQuery) -> Result<Sql> {
    let mut sql = Sql::default();
    sql.text.push_str(" WHERE ");
    sql.filter(&q.filter);
    if sql.folds && q.casefold.is_none() {
        return Err(StoreError::InvalidArgument(
            "an audit query compares case-folded text but gives no casefold function".into(),
        ));
    }
    Ok(sql)
}

fn register_casefold(conn: &rusqlite::Connection, q: &AuditQuery, sql: &Sql) -> Result<()> {
    if let (true, Some(fold)) = (sql.folds, q.casefold) {
        conn.create_scalar_function(
            CASEFOLD_FN,
            1,
            FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
            move |ctx| Ok(ctx.get::<Option<String>>(0)?.map(|s| fold(&s))),
        )?;
    }
    Ok(())
}

impl SqliteStore {
    /// The rows `q` selects, in its order, after its offset, up to its limit.
    pub fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut sql = where_clause(q)?;
        sql.order(&q.order_by);
        sql.text.push_str(" LIMIT ");
        sql.bind(SqlValue::Integer(q.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))));
        sql.text.push_str(" OFFSET ");
        sql.bind(SqlValue::Integer(i64::try_from(q.offset).unwrap_or(i64::MAX)));
        let conn = self.conn();
        register_casefold(&conn, q, &sql)?;
        let mut st = conn.prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit{}", sql.text))?;
        let rows = st.query_map(params_from_iter(sql.params.iter()), audit_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// How many rows `q.filter` selects (its order, offset and limit do not
    /// matter).
    pub fn audit_count(&self, q: &AuditQuery) -> Result<u64> {
        let sql = where_clause(q)?;
        let conn = self.conn();
        register_casefold(&conn, q, &sql)?;
        let n: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM audit{}", sql.text),
            params_from_iter(sql.params.iter()),
            |r| r.get(0),
        )?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Retention: delete the entries whose `message_timestamp` is more than
    /// `older_than_secs` seconds before now (TrueNAS's rule, with its
    /// retention setting in days × 86400). Deletes [`AUDIT_PRUNE_BATCH`] rows
    /// per statement and releases the database between statements, so logins
    /// and queries are not held up behind a large prune. Returns how many
    /// rows were deleted. The server calls it at start and hourly with its
    /// `audit.retention_days` setting.
    pub fn audit_prune(&self, older_than_secs: i64) -> Result<usize> {
        if older_than_secs < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "audit retention of {older_than_secs} seconds: give 0 or more (0 deletes everything older than now)"
            )));
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.audit_prune_before(now.saturating_sub(older_than_secs), AUDIT_PRUNE_BATCH)
    }

    fn audit_prune_before(&self, cutoff_secs: i64, batch: usize) -> Result<usize> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let mut total = 0usize;
        loop {
            let deleted = {
                let conn = self.conn();
                let mut st = conn.prepare_cached(
                    "DELETE FROM audit WHERE id IN
                       (SELECT id FROM audit WHERE CAST(ts AS INTEGER) < ?1 LIMIT ?2)",
                )?;
                st.execute(params![cutoff_secs, batch])?
            };
            total += deleted;
            if (deleted as i64) < batch {
                return Ok(total);
            }
            // Let whoever waits for the database go first.
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = SqliteStore::open(d.path()).unwrap();
        (d, s)
    }

    fn entry(username: Option<&str>, event: &str, success: bool) -> AuditEntry {
        AuditEntry {
            username: username.map(str::to_string),
            address: Some("10.0.0.1".into()),
            service: "MIDDLEWARE".into(),
            method: Some("auth.login_ex".into()),
            event: event.into(),
            target: Some("Authentication attempt".into()),
            success,
            error: None,
        }
    }

    fn ids(s: &SqliteStore, q: &AuditQuery) -> Vec<i64> {
        s.audit_query(q).unwrap().into_iter().map(|r| r.id).collect()
    }

    fn filtered(filter: AuditFilter) -> AuditQuery {
        AuditQuery { filter, ..Default::default() }
    }

    fn text(s: &str) -> AuditValue {
        AuditValue::Text(s.into())
    }

    #[test]
    fn filters_order_page_and_count_in_sql() {
        let (_d, s) = store();
        let names = [Some("admin"), Some("bob"), None, Some("admin"), Some("a*b?[c]"), Some("ad\0min")];
        for (i, name) in names.iter().enumerate() {
            s.audit_insert_at(1_000.0 + i as f64 * 0.5, &entry(*name, "AUTHENTICATION", i % 2 == 0)).unwrap();
        }
        let user = AuditExpr::from(AuditField::Username);
        assert_eq!(ids(&s, &filtered(AuditFilter::Cmp(user, AuditCmp::Eq, text("admin")))), [1, 4]);
        // NULL never equals, but differs from everything.
        assert_eq!(ids(&s, &filtered(AuditFilter::Cmp(user, AuditCmp::Ne, text("admin")))), [2, 5, 6]);
        assert_eq!(ids(&s, &filtered(AuditFilter::Differs(user, text("admin")))), [2, 3, 5, 6]);
        assert_eq!(ids(&s, &filtered(AuditFilter::IsNull(user))), [3]);
        assert_eq!(ids(&s, &filtered(AuditFilter::NotIn(user, vec![text("bob")]))), [1, 4, 5, 6]);
        assert_eq!(ids(&s, &filtered(AuditFilter::In(user, vec![]))), Vec::<i64>::new());
        // Prefixes are byte-exact: wildcards and case are literal, NUL is a byte.
        let starts = |t: &str, negated| AuditFilter::StartsWith { expr: user, text: t.into(), negated };
        assert_eq!(ids(&s, &filtered(starts("a*b?[", false))), [5]);
        assert_eq!(ids(&s, &filtered(starts("a", false))), [1, 4, 5, 6]);
        assert_eq!(ids(&s, &filtered(starts("A", false))), Vec::<i64>::new());
        assert_eq!(ids(&s, &filtered(starts("ad\0", false))), [6]);
        assert_eq!(ids(&s, &filtered(starts("ad", true))), [2, 5]);
        let ends = |t: &str, negated| AuditFilter::EndsWith { expr: user, text: t.into(), negated };
        assert_eq!(ids(&s, &filtered(ends("min", false))), [1, 4, 6]);
        assert_eq!(ids(&s, &filtered(ends("", false))), [1, 2, 4, 5, 6]);
        assert_eq!(ids(&s, &filtered(ends("min", true))), [2, 5]);
        let contains = AuditFilter::Contains { expr: user, text: "\0m".into(), negated: false };
        assert_eq!(ids(&s, &filtered(contains)), [6]);
        let within = AuditFilter::ContainedIn { expr: user, text: "xadminx bob".into(), negated: true };
        assert_eq!(ids(&s, &filtered(within)), [5, 6]);
        // Integers, whole seconds and OR.
        let secs = AuditExpr::from(AuditField::MessageTimestamp);
        let any = AuditFilter::Any(vec![
            AuditFilter::Cmp(secs, AuditCmp::Ge, AuditValue::Int(1_002)),
            AuditFilter::Cmp(AuditField::Id.into(), AuditCmp::Eq, AuditValue::Int(1)),
        ]);
        assert_eq!(ids(&s, &filtered(any.clone())), [1, 5, 6]);
        assert_eq!(s.audit_count(&filtered(any)).unwrap(), 3);
        // Order: ties keep id order in either direction; NULLs placed as asked.
        let order = |field, descending, nulls| AuditOrder { field, descending, nulls };
        let q = AuditQuery {
            order_by: vec![order(AuditField::MessageTimestamp, true, AuditNulls::Natural)],
            ..Default::default()
        };
        assert_eq!(ids(&s, &q), [5, 6, 3, 4, 1, 2]);
        let q =
            AuditQuery { order_by: vec![order(AuditField::Username, false, AuditNulls::Last)], ..Default::default() };
        // Byte order: "a*b?[c]" < "ad\0min" < "admin" < "bob", then NULL.
        assert_eq!(ids(&s, &q), [5, 6, 1, 4, 2, 3]);
        let q = AuditQuery {
            order_by: vec![
                order(AuditField::Id, true, AuditNulls::Natural),
                order(AuditField::Username, false, AuditNulls::First),
            ],
            limit: Some(2),
            offset: 1,
            ..Default::default()
        };
        assert_eq!(ids(&s, &q), [5, 4]);
        assert_eq!(ids(&s, &AuditQuery { offset: 4, ..Default::default() }), [5, 6]);
    }

    #[test]
    fn empty_text_is_a_value_not_null() {
        let (_d, s) = store();
        s.audit_insert_at(1.0, &entry(Some(""), "AUTHENTICATION", true)).unwrap();
        s.audit_insert_at(2.0, &entry(None, "AUTHENTICATION", true)).unwrap();
        let user = AuditExpr::from(AuditField::Username);
        let cases = [
            (AuditFilter::StartsWith { expr: user, text: "".into(), negated: false }, vec![1]),
            (AuditFilter::StartsWith { expr: user, text: "ad".into(), negated: true }, vec![1]),
            (AuditFilter::StartsWith { expr: user, text: "".into(), negated: true }, vec![]),
            (AuditFilter::EndsWith { expr: user, text: "".into(), negated: false }, vec![1]),
            (AuditFilter::EndsWith { expr: user, text: "min".into(), negated: true }, vec![1]),
            (AuditFilter::EndsWith { expr: user, text: "".into(), negated: true }, vec![]),
            (AuditFilter::Contains { expr: user, text: "".into(), negated: false }, vec![1]),
            (AuditFilter::Contains { expr: user, text: "a".into(), negated: true }, vec![1]),
            (AuditFilter::ContainedIn { expr: user, text: "abc".into(), negated: false }, vec![1]),
            (AuditFilter::ContainedIn { expr: user, text: "".into(), negated: true }, vec![]),
        ];
        for (f, want) in cases {
            assert_eq!(ids(&s, &filtered(f.clone())), want, "{f:?}");
        }
    }

    #[test]
    fn case_folded_expressions_need_the_callers_folding() {
        let (_d, s) = store();
        s.audit_insert_at(1.0, &entry(Some("Admin"), "AUTHENTICATION", true)).unwrap();
        s.audit_insert_at(2.0, &entry(None, "AUTHENTICATION", true)).unwrap();
        let folded = AuditExpr { field: AuditField::Username, folded: true };
        let q = filtered(AuditFilter::Cmp(folded, AuditCmp::Eq, text("admin")));
        assert!(matches!(s.audit_query(&q), Err(StoreError::InvalidArgument(_))));
        let q = AuditQuery { casefold: Some(|s: &str| s.to_lowercase()), ..q };
        assert_eq!(ids(&s, &q), [1]);
        assert_eq!(s.audit_count(&q).unwrap(), 1);
    }

    #[test]
    fn prune_deletes_old_entries_in_batches() {
        let (_d, s) = store();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        // Whole seconds are compared (message_timestamp), so keep clear of the cutoff.
        for age in [7.0 * 86_400.0, 3_602.0, 100.0, 10.0] {
            s.audit_insert_at(now - age, &entry(Some("admin"), "AUTHENTICATION", true)).unwrap();
        }
        assert!(matches!(s.audit_prune(-1), Err(StoreError::InvalidArgument(_))));
        assert_eq!(s.audit_prune(86_400).unwrap(), 1);
        assert_eq!(s.audit_prune(3_600).unwrap(), 1);
        assert_eq!(s.audit_prune(3_600).unwrap(), 0);
        assert_eq!(ids(&s, &AuditQuery::default()), [3, 4]);

        // Several batches: every old row goes, the new ones stay.
        for i in 0..7 {
            s.audit_insert_at(500.0 + f64::from(i), &entry(None, "METHOD_CALL", false)).unwrap();
        }
        assert_eq!(s.audit_prune_before(505, 3).unwrap(), 5);
        assert_eq!(s.audit_prune_before(1_000, 3).unwrap(), 2);
        assert_eq!(ids(&s, &AuditQuery::default()), [3, 4]);
    }

    #[test]
    fn queries_and_pruning_use_the_indexes() {
        let (_d, s) = store();
        let conn = s.conn();
        let plan = |sql: &str| -> String {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.collect::<rusqlite::Result<Vec<_>>>().unwrap().join("; ")
        };
        let p = plan("SELECT id FROM audit WHERE CAST(ts AS INTEGER) < 5 LIMIT 10");
        assert!(p.contains("audit_message_timestamp"), "{p}");
        let p = plan("SELECT id FROM audit WHERE (username = 'x') ORDER BY id ASC");
        assert!(p.contains("audit_username"), "{p}");
        let p = plan("SELECT id FROM audit WHERE (address GLOB '10.0.*' AND 1) ORDER BY id ASC");
        assert!(p.contains("audit_address"), "{p}");
    }
}
