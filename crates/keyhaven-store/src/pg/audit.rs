//! `audit.query` on PostgreSQL: the same [`AuditQuery`] the SQLite backend
//! runs (`crate::audit`), compiled to PostgreSQL with the same meaning.
//!
//! Where the two SQL dialects differ, this side is written to give SQLite's
//! answer:
//! - text compares byte by byte: `COLLATE "C"` for order and ranges, and the
//!   UTF-8 bytes (`convert_to(.., 'UTF8')`, a `bytea`) for prefixes,
//!   suffixes and substrings, as SQLite's BINARY collation and BLOB casts do;
//! - PostgreSQL text cannot hold a NUL, so no stored value contains one; a
//!   filter value that does is compared as bytes (or, in a list, can match
//!   nothing);
//! - NULLs sort as the lowest value (SQLite's order), not PostgreSQL's highest;
//! - `message_timestamp` is `trunc(ts)::bigint`, SQLite's `CAST(ts AS
//!   INTEGER)` and the expression the `audit_message_timestamp` index is on.
//!
//! Case folding: SQLite calls the caller's Rust function from SQL, which
//! PostgreSQL cannot. Here the distinct values of each folded column that
//! folding can change at all (those with an ASCII capital or a non-ASCII
//! character) are read first and folded in Rust; the query then replaces a
//! value by its folded form through two bound arrays. Both statements run in
//! one REPEATABLE READ transaction, so a row inserted in between cannot be
//! missed by the map. The result is the caller's folding exactly, whatever
//! the database's locale.

use tokio_postgres::types::ToSql;

use super::records::{audit_row, AUDIT_COLUMNS};
use super::{Pg, PgStore};
use crate::audit::{
    AuditCmp, AuditExpr, AuditField, AuditFilter, AuditNulls, AuditOrder, AuditQuery, AuditRecord, AuditValue,
};
use crate::error::{Result, StoreError};

type Param = Box<dyn ToSql + Sync + Send>;

fn is_text(f: AuditField) -> bool {
    !matches!(f, AuditField::Id | AuditField::MessageTimestamp | AuditField::TimestampMs | AuditField::Success)
}

fn field_sql(f: AuditField) -> &'static str {
    match f {
        AuditField::Id => "id",
        AuditField::MessageTimestamp => "trunc(ts)::bigint",
        AuditField::TimestampMs => "trunc(ts * 1000.0)::bigint",
        AuditField::Address => "address",
        AuditField::Username => "username",
        AuditField::Service => "service",
        AuditField::Event => "event",
        AuditField::Method => "method",
        AuditField::Target => "target",
        AuditField::Error => "error",
        AuditField::Success => "(CASE WHEN success THEN 1 ELSE 0 END)::bigint",
    }
}

fn cmp_sql(op: AuditCmp) -> &'static str {
    match op {
        AuditCmp::Eq => "=",
        AuditCmp::Ne => "<>",
        AuditCmp::Lt => "<",
        AuditCmp::Le => "<=",
        AuditCmp::Gt => ">",
        AuditCmp::Ge => ">=",
    }
}

/// The folded form of each value folding changes, per folded column.
struct FoldMap {
    field: AuditField,
    from: Vec<String>,
    to: Vec<String>,
}

#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<Param>,
    /// Text columns compared folded, in first-use order.
    folded: Vec<AuditField>,
    /// Parameter numbers of each folded column's two arrays (filled in
    /// after the map is read; see [`Sql::fold_params`]).
    fold_slots: Vec<(AuditField, usize, usize)>,
}

impl Sql {
    fn bind(&mut self, p: Param, cast: &str) {
        self.params.push(p);
        self.text.push_str(&format!("${}::{cast}", self.params.len()));
    }

    fn expr(&mut self, e: AuditExpr) -> Result<()> {
        if !e.folded {
            self.text.push_str(field_sql(e.field));
            return Ok(());
        }
        if !is_text(e.field) {
            return Err(StoreError::InvalidArgument(format!("{:?} is not text and cannot be case-folded", e.field)));
        }
        if !self.folded.contains(&e.field) {
            self.folded.push(e.field);
        }
        // The arrays are bound once per column and referred to by number.
        let (from, to) = match self.fold_slots.iter().find(|(f, ..)| *f == e.field) {
            Some(&(_, a, b)) => (a, b),
            None => {
                self.params.push(Box::new(Vec::<String>::new()));
                let a = self.params.len();
                self.params.push(Box::new(Vec::<String>::new()));
                let b = self.params.len();
                self.fold_slots.push((e.field, a, b));
                (a, b)
            }
        };
        let col = field_sql(e.field);
        self.text.push_str(&format!("coalesce((${to}::text[])[array_position(${from}::text[], {col})], {col})"));
        Ok(())
    }

    /// The expression's UTF-8 bytes.
    fn bytes(&mut self, e: AuditExpr) -> Result<()> {
        self.text.push_str("convert_to(");
        self.expr(e)?;
        self.text.push_str(", 'UTF8')");
        Ok(())
    }

    fn bind_value(&mut self, e: AuditExpr, v: &AuditValue) -> Result<()> {
        match (is_text(e.field), v) {
            (false, AuditValue::Int(n)) => self.bind(Box::new(*n), "bigint"),
            (true, AuditValue::Text(s)) => self.bind(Box::new(s.clone()), "text"),
            _ => {
                return Err(StoreError::InvalidArgument(format!(
                    "an audit query compares {:?} with a value of another type",
                    e.field
                )))
            }
        }
        Ok(())
    }

    fn not_null_and(&mut self, e: AuditExpr) -> Result<()> {
        self.expr(e)?;
        self.text.push_str(" IS NOT NULL AND ");
        Ok(())
    }

    fn filter(&mut self, f: &AuditFilter) -> Result<()> {
        match f {
            AuditFilter::Const(b) => self.text.push_str(if *b { "TRUE" } else { "FALSE" }),
            AuditFilter::IsNull(e) | AuditFilter::NotNull(e) => {
                self.text.push('(');
                self.expr(*e)?;
                self.text.push_str(if matches!(f, AuditFilter::IsNull(_)) { " IS NULL)" } else { " IS NOT NULL)" });
            }
            AuditFilter::Cmp(e, op, AuditValue::Text(s)) if s.contains('\0') => {
                // Only bytes can hold a NUL: compare bytes (the same order as "C").
                self.text.push('(');
                self.bytes(*e)?;
                self.text.push_str(&format!(" {} ", cmp_sql(*op)));
                self.bind(Box::new(s.as_bytes().to_vec()), "bytea");
                self.text.push(')');
            }
            AuditFilter::Cmp(e, op, v) => {
                self.text.push('(');
                self.expr(*e)?;
                if is_text(e.field) {
                    self.text.push_str(" COLLATE \"C\"");
                }
                self.text.push_str(&format!(" {} ", cmp_sql(*op)));
                self.bind_value(*e, v)?;
                self.text.push(')');
            }
            AuditFilter::Differs(e, AuditValue::Text(s)) if s.contains('\0') => {
                // No stored text holds a NUL: every row differs (NULL too).
                if !is_text(e.field) {
                    return Err(StoreError::InvalidArgument(format!(
                        "an audit query compares {:?} with a value of another type",
                        e.field
                    )));
                }
                self.text.push_str("TRUE");
            }
            AuditFilter::Differs(e, v) => {
                self.text.push('(');
                self.expr(*e)?;
                self.text.push_str(" IS DISTINCT FROM ");
                self.bind_value(*e, v)?;
                self.text.push(')');
            }
            AuditFilter::In(e, vs) | AuditFilter::NotIn(e, vs) => {
                let negated = matches!(f, AuditFilter::NotIn(..));
                // A text with a NUL equals no stored value.
                let vs: Vec<&AuditValue> =
                    vs.iter().filter(|v| !matches!(v, AuditValue::Text(s) if s.contains('\0'))).collect();
                if vs.is_empty() {
                    if negated {
                        return self.filter(&AuditFilter::NotNull(*e));
                    }
                    self.text.push_str("FALSE");
                    return Ok(());
                }
                self.text.push('(');
                if negated {
                    self.not_null_and(*e)?;
                }
                self.expr(*e)?;
                self.text.push_str(if negated { " NOT IN (" } else { " IN (" });
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        self.text.push_str(", ");
                    }
                    self.bind_value(*e, v)?;
                }
                self.text.push_str("))");
            }
            AuditFilter::StartsWith { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr)?;
                self.text.push_str("substr(");
                self.bytes(*expr)?;
                self.text.push_str(", 1, ");
                self.bind(Box::new(i32::try_from(text.len()).unwrap_or(i32::MAX)), "int");
                self.text.push_str(if *negated { ") <> " } else { ") = " });
                self.bind(Box::new(text.as_bytes().to_vec()), "bytea");
                self.text.push(')');
            }
            AuditFilter::EndsWith { expr, text, negated } => {
                self.text.push('(');
                self.not_null_and(*expr)?;
                if text.is_empty() {
                    self.text.push_str(if *negated { "FALSE)" } else { "TRUE)" });
                    return Ok(());
                }
                if *negated {
                    self.text.push_str("NOT ");
                }
                self.text.push_str("(octet_length(");
                self.bytes(*expr)?;
                self.text.push_str(") >= ");
                let len = i32::try_from(text.len()).unwrap_or(i32::MAX);
                self.bind(Box::new(len), "int");
                self.text.push_str(" AND substr(");
                self.bytes(*expr)?;
                self.text.push_str(", octet_length(");
                self.bytes(*expr)?;
                self.text.push_str(") - ");
                self.bind(Box::new(len), "int");
                self.text.push_str(" + 1) = ");
                self.bind(Box::new(text.as_bytes().to_vec()), "bytea");
                self.text.push_str("))");
            }
            AuditFilter::Contains { expr, text, negated } => {
                self.text.push('(');
                if *negated {
                    self.not_null_and(*expr)?;
                }
                self.text.push_str("position(");
                self.bind(Box::new(text.as_bytes().to_vec()), "bytea");
                self.text.push_str(" IN ");
                self.bytes(*expr)?;
                self.text.push_str(if *negated { ") = 0)" } else { ") > 0)" });
            }
            AuditFilter::ContainedIn { expr, text, negated } => {
                self.text.push('(');
                if *negated {
                    self.not_null_and(*expr)?;
                }
                self.text.push_str("position(");
                self.bytes(*expr)?;
                self.text.push_str(" IN ");
                self.bind(Box::new(text.as_bytes().to_vec()), "bytea");
                self.text.push_str(if *negated { ") = 0)" } else { ") > 0)" });
            }
            AuditFilter::All(fs) | AuditFilter::Any(fs) => {
                let all = matches!(f, AuditFilter::All(_));
                if fs.is_empty() {
                    self.text.push_str(if all { "TRUE" } else { "FALSE" });
                    return Ok(());
                }
                self.text.push('(');
                for (i, f) in fs.iter().enumerate() {
                    if i > 0 {
                        self.text.push_str(if all { " AND " } else { " OR " });
                    }
                    self.filter(f)?;
                }
                self.text.push(')');
            }
        }
        Ok(())
    }

    fn order(&mut self, keys: &[AuditOrder]) {
        self.text.push_str(" ORDER BY ");
        for key in keys {
            self.text.push_str(field_sql(key.field));
            if is_text(key.field) {
                self.text.push_str(" COLLATE \"C\"");
            }
            self.text.push_str(match (key.descending, key.nulls) {
                // SQLite's NULL is the lowest value.
                (false, AuditNulls::Natural) | (false, AuditNulls::First) => " ASC NULLS FIRST",
                (false, AuditNulls::Last) => " ASC NULLS LAST",
                (true, AuditNulls::Natural) | (true, AuditNulls::Last) => " DESC NULLS LAST",
                (true, AuditNulls::First) => " DESC NULLS FIRST",
            });
            if key.field == AuditField::Id {
                return;
            }
            self.text.push_str(", ");
        }
        self.text.push_str("id ASC");
    }

    /// Put the folding maps into their parameter slots.
    fn fold_params(&mut self, maps: Vec<FoldMap>) {
        for m in maps {
            if let Some(&(_, a, b)) = self.fold_slots.iter().find(|(f, ..)| *f == m.field) {
                self.params[a - 1] = Box::new(m.from);
                self.params[b - 1] = Box::new(m.to);
            }
        }
    }
}

fn where_clause(q: &AuditQuery) -> Result<Sql> {
    let mut sql = Sql::default();
    sql.text.push_str(" WHERE ");
    sql.filter(&q.filter)?;
    if !sql.folded.is_empty() && q.casefold.is_none() {
        return Err(StoreError::InvalidArgument(
            "an audit query compares case-folded text but gives no casefold function".into(),
        ));
    }
    Ok(sql)
}

/// Read (in `tx`) the values of each folded column that folding may change,
/// and fold them with the caller's function.
async fn fold_maps(
    pg: &Pg,
    tx: &tokio_postgres::Transaction<'_>,
    fields: &[AuditField],
    fold: fn(&str) -> String,
) -> Result<Vec<FoldMap>> {
    let mut maps = Vec::with_capacity(fields.len());
    for &field in fields {
        let col = field_sql(field);
        // A superset of what can change: ASCII capitals (lower() changes
        // them in any locale) and anything beyond ASCII.
        let rows = tx
            .query(
                &format!(
                    "SELECT DISTINCT {col} FROM audit WHERE {col} <> lower({col}) OR octet_length({col}) <> char_length({col})"
                ),
                &[],
            )
            .await
            .map_err(|e| pg.err(e))?;
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for r in rows {
            let v: String = r.try_get(0).map_err(|e| pg.err(e))?;
            let f = fold(&v);
            if f != v {
                from.push(v);
                to.push(f);
            }
        }
        maps.push(FoldMap { field, from, to });
    }
    Ok(maps)
}

impl PgStore {
    /// The rows `q` selects, in its order, after its offset, up to its limit
    /// (see [`crate::Store::audit_query`]).
    pub fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut sql = where_clause(q)?;
        sql.order(&q.order_by);
        if let Some(limit) = q.limit {
            sql.text.push_str(" LIMIT ");
            sql.bind(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)), "bigint");
        }
        sql.text.push_str(" OFFSET ");
        sql.bind(Box::new(i64::try_from(q.offset).unwrap_or(i64::MAX)), "bigint");
        let fold = q.casefold;
        self.run(move |pg| async move {
            let rows = query(&pg, sql, fold, |s| format!("SELECT {AUDIT_COLUMNS} FROM audit{s}")).await?;
            rows.iter().map(audit_row).collect()
        })
    }

    /// How many rows `q.filter` selects.
    pub fn audit_count(&self, q: &AuditQuery) -> Result<u64> {
        let sql = where_clause(q)?;
        let fold = q.casefold;
        self.run(move |pg| async move {
            let rows = query(&pg, sql, fold, |s| format!("SELECT count(*) FROM audit{s}")).await?;
            let n: i64 = rows.first().map(|r| r.try_get(0)).transpose().map_err(|e| pg.err(e))?.unwrap_or(0);
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

async fn query(
    pg: &Pg,
    mut sql: Sql,
    fold: Option<fn(&str) -> String>,
    statement: impl FnOnce(&str) -> String,
) -> Result<Vec<tokio_postgres::Row>> {
    let mut client = pg.client().await?;
    let tx = pg.read_snapshot(&mut client).await?;
    if let (false, Some(fold)) = (sql.folded.is_empty(), fold) {
        let maps = fold_maps(pg, &tx, &sql.folded, fold).await?;
        sql.fold_params(maps);
    }
    let text = statement(&sql.text);
    let params: Vec<&(dyn ToSql + Sync)> = sql.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = tx.query(&text, &params).await.map_err(|e| pg.err(e))?;
    tx.commit().await.map_err(|e| pg.err(e))?;
    Ok(rows)
}
