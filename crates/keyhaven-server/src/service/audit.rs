//! The audit log: one entry per login failure or success, per state change made
//! through the API, per private-key download and per pairing — who, from where,
//! when, which method, on what, and whether it worked. Never a secret: entries
//! are built from method names and target names, never from parameters — the
//! one parameter kept is the new `options` text of an `ssh.update`, which is
//! sshd configuration (it can run programs), not a secret.
//!
//! `audit.query` runs in SQL, because a login flood makes the table large:
//! [`query`] translates the TrueNAS filters and `order_by` keys the audit
//! columns can answer into a [`keyhaven_store::AuditQuery`], and the store
//! filters, orders, pages and counts. What it cannot translate (`~`, fields
//! that are not columns such as `session`, a `select` alias that `order_by`
//! names) runs through the generic engine instead: SQL narrows the rows with
//! the translatable top-level entries, batch by batch, and the in-memory
//! engine applies every filter and the options to what remains. Either way
//! the answer is the one the generic engine gives over every entry (a test
//! compares them), within [`MAX_AUDIT_ENTRIES_IN_MEMORY`].
//!
//! Time ranges: `message_timestamp` (seconds) and `timestamp.$date`
//! (milliseconds) compare as numbers, in SQL. `timestamp` itself is the
//! object `{"$date": ms}`; as everywhere in keyhaven's engine, ordering
//! comparisons with an object are false (TrueNAS compares it as a datetime).

use serde::Serialize;
use serde_json::Value;

use super::session::Session;
use super::App;
use crate::error::{ServiceError, ENOENT};
use keyhaven_core::query::{
    casefold, filter_list, Cond, Filter, Filters, Matcher, Nulls, Op, QueryError, QueryOptions, QueryResult, MAX_LIMIT,
};
use keyhaven_store::{
    AuditCmp, AuditEntry, AuditExpr, AuditField, AuditFilter, AuditNulls, AuditOrder, AuditQuery, AuditRecord,
    AuditValue, Store,
};

/// Most entries one `audit.query` builds in memory: a page asked for without
/// `limit`, or the matches of filters that only run in memory.
pub const MAX_AUDIT_ENTRIES_IN_MEMORY: usize = 50_000;
/// Rows fetched per statement when filtering in memory, so the database is
/// never held for the whole scan.
const MEMORY_BATCH: usize = 2_000;
/// Longest `in`/`nin` list sent to SQL as bound parameters (SQLite allows
/// 32766 per statement); a longer one is matched in memory.
const MAX_SQL_LIST: usize = 1_000;

pub struct AuditEvent {
    pub event: &'static str,
    pub method: Option<String>,
    pub description: String,
    pub username: Option<String>,
    pub success: bool,
    pub error: Option<String>,
}

impl AuditEvent {
    pub fn login(username: Option<&str>, mechanism: &str, success: bool, error: Option<String>) -> Self {
        AuditEvent {
            event: "AUTHENTICATION",
            method: Some("auth.login_ex".into()),
            description: format!("Authentication attempt ({mechanism})"),
            username: username.map(str::to_string),
            success,
            error,
        }
    }

    pub fn method(
        method: &str,
        description: &str,
        username: Option<&str>,
        success: bool,
        error: Option<String>,
    ) -> Self {
        AuditEvent {
            event: "METHOD_CALL",
            method: Some(method.to_string()),
            description: description.to_string(),
            username: username.map(str::to_string),
            success,
            error,
        }
    }
}

/// Write an entry. A failure to audit is logged, never hidden and never fatal
/// to the request (the action already happened).
pub fn record(app: &App, session: &Session, ev: AuditEvent) {
    let entry = AuditEntry {
        username: ev.username.or_else(|| session.username()),
        address: Some(session.address.clone()),
        service: "MIDDLEWARE".into(),
        method: ev.method,
        event: ev.event.to_string(),
        target: Some(ev.description),
        success: ev.success,
        error: ev.error,
    };
    if let Err(e) = app.store.audit_insert(&entry) {
        tracing::error!("could not write audit entry: {e}");
    }
}

/// One entry in TrueNAS's `audit.query` shape (field names and nesting are
/// the wire contract; `session` is always null, `service_data` always `{}`).
#[derive(Debug, Serialize)]
pub struct AuditRow {
    pub audit_id: i64,
    /// Seconds since the epoch.
    pub message_timestamp: i64,
    pub timestamp: WireDate,
    pub address: Option<String>,
    pub username: Option<String>,
    pub session: Option<String>,
    pub service: String,
    pub service_data: NoData,
    pub event: String,
    pub event_data: AuditEventData,
    pub success: bool,
}

/// A datetime as TrueNAS's JSON carries it: `{"$date": <milliseconds>}`.
#[derive(Debug, Serialize)]
pub struct WireDate {
    #[serde(rename = "$date")]
    pub millis: i64,
}

/// An always-empty object (`{}`).
#[derive(Debug, Serialize)]
pub struct NoData {}

/// `event_data` of an audit entry: the method called, what it did, its error.
#[derive(Debug, Serialize)]
pub struct AuditEventData {
    pub method: Option<String>,
    pub description: Option<String>,
    pub error: Option<String>,
}

impl From<AuditRecord> for AuditRow {
    fn from(r: AuditRecord) -> Self {
        let e = r.entry;
        AuditRow {
            audit_id: r.id,
            message_timestamp: r.ts as i64,
            timestamp: WireDate { millis: (r.ts * 1000.0) as i64 },
            address: e.address,
            username: e.username,
            session: None,
            service: e.service,
            service_data: NoData {},
            event: e.event,
            event_data: AuditEventData { method: e.method, description: e.target, error: e.error },
            success: e.success,
        }
    }
}

/// One entry as JSON, for the query engine (filters and `select` work on
/// the wire shape).
pub fn to_entry(r: AuditRecord) -> Result<Value, ServiceError> {
    serde_json::to_value(AuditRow::from(r)).map_err(|e| ServiceError::internal("encoding an audit entry", e))
}

/// Run `audit.query`. Validation errors name `filters` or `options.*`; the
/// caller prefixes its schema.
pub fn query(store: &Store, filters: &Filters, options: &QueryOptions) -> Result<QueryResult, ServiceError> {
    let plan = Plan::new(filters, options);
    match plan.order_by {
        Some(order_by) if !plan.in_memory => in_sql(store, plan.sql, order_by, options),
        _ => in_memory(store, plan.sql, filters, options),
    }
}

/// How [`query`] splits a query between SQL and memory.
struct Plan {
    /// The translatable top-level entries (an AND).
    sql: AuditQuery,
    /// Some entry is not translatable.
    in_memory: bool,
    /// `None`: the order cannot be given in SQL.
    order_by: Option<Vec<AuditOrder>>,
}

impl Plan {
    fn new(filters: &Filters, options: &QueryOptions) -> Plan {
        let mut all = Vec::new();
        let mut in_memory = false;
        for entry in filters.entries() {
            match translate(entry) {
                Some(f) => all.push(f),
                None => in_memory = true,
            }
        }
        let sql = AuditQuery { filter: AuditFilter::All(all), casefold: Some(fold), ..Default::default() };
        // A count needs no order.
        let order_by = if options.count { Some(Vec::new()) } else { translate_order(options) };
        Plan { sql, in_memory, order_by }
    }
}

fn fold(s: &str) -> String {
    casefold(s).into_owned()
}

fn in_sql(
    store: &Store,
    mut q: AuditQuery,
    order_by: Vec<AuditOrder>,
    options: &QueryOptions,
) -> Result<QueryResult, ServiceError> {
    if options.count {
        return Ok(QueryResult::Count(usize::try_from(store.audit_count(&q)?).unwrap_or(usize::MAX)));
    }
    let unlimited = !options.get && options.limit == 0;
    q.order_by = order_by;
    q.offset = options.offset;
    q.limit = Some(match (options.get, options.limit) {
        (true, _) => 1,
        (false, 0) => MAX_AUDIT_ENTRIES_IN_MEMORY + 1,
        (false, n) => n,
    });
    let rows = store.audit_query(&q)?;
    if unlimited && rows.len() > MAX_AUDIT_ENTRIES_IN_MEMORY {
        return Err(ServiceError::field(
            "options.limit",
            format!(
                "More than {MAX_AUDIT_ENTRIES_IN_MEMORY} audit entries match: page through them with limit (at most \
                 {MAX_LIMIT}) and offset, or narrow the filters (for example on message_timestamp)"
            ),
        ));
    }
    let page: Vec<Value> = rows.into_iter().map(to_entry).collect::<Result<_, _>>()?;
    // Filtered, ordered and paged already: what remains is `get` and `select`.
    let rest = QueryOptions { get: options.get, select: options.select.clone(), ..Default::default() };
    engine(filter_list(&page, &Filters::all(), &rest))
}

fn in_memory(
    store: &Store,
    narrowing: AuditQuery,
    filters: &Filters,
    options: &QueryOptions,
) -> Result<QueryResult, ServiceError> {
    // Without order_by the first matches are the page: stop there.
    let wanted = match (options.order_by.is_empty() && !options.count, options.get, options.limit) {
        (true, true, _) => Some(options.offset.saturating_add(1)),
        (true, false, n) if n > 0 => Some(options.offset.saturating_add(n)),
        _ => None,
    };
    let mut matcher = Matcher::new(filters);
    let mut hits = Vec::new();
    let mut count = 0usize;
    let mut after: Option<i64> = None;
    'batches: loop {
        let mut filter = vec![narrowing.filter.clone()];
        if let Some(id) = after {
            filter.push(AuditFilter::Cmp(AuditField::Id.into(), AuditCmp::Gt, AuditValue::Int(id)));
        }
        let batch = store.audit_query(&AuditQuery {
            filter: AuditFilter::All(filter),
            limit: Some(MEMORY_BATCH),
            casefold: narrowing.casefold,
            ..Default::default()
        })?;
        let last_batch = batch.len() < MEMORY_BATCH;
        after = batch.last().map(|r| r.id).or(after);
        for r in batch {
            let entry = to_entry(r)?;
            // Every filter, the translated ones included: SQL only narrowed.
            if !matcher.try_matches(&entry).map_err(query_error)? {
                continue;
            }
            if options.count {
                count += 1;
                continue;
            }
            if hits.len() == MAX_AUDIT_ENTRIES_IN_MEMORY {
                return Err(ServiceError::field(
                    "filters",
                    format!(
                        "More than {MAX_AUDIT_ENTRIES_IN_MEMORY} audit entries match filters that only run in \
                         memory (~, or fields other than audit_id, message_timestamp, timestamp.$date, address, \
                         username, service, event, success and event_data.method/description/error); narrow the \
                         query with filters on those fields, or page with limit and offset without order_by"
                    ),
                ));
            }
            hits.push(entry);
            if wanted.is_some_and(|w| hits.len() >= w) {
                break 'batches;
            }
        }
        if last_batch {
            break;
        }
    }
    if options.count {
        return Ok(QueryResult::Count(count));
    }
    engine(filter_list(&hits, &Filters::all(), options))
}

fn query_error(e: QueryError) -> ServiceError {
    match e {
        QueryError::NotFound => ServiceError::call(ENOENT, "No matching records found"),
        QueryError::Invalid(v) => ServiceError::Validation(v),
    }
}

fn engine(r: Result<QueryResult, QueryError>) -> Result<QueryResult, ServiceError> {
    r.map_err(query_error)
}

// ------------------------------------------------------------ translation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Never null.
    Int,
    /// Never null.
    Bool,
    /// A string or null.
    Text,
}

/// The column behind an entry's field path.
fn column(path: &[&str]) -> Option<(AuditField, Kind)> {
    Some(match path {
        ["audit_id"] => (AuditField::Id, Kind::Int),
        ["message_timestamp"] => (AuditField::MessageTimestamp, Kind::Int),
        ["timestamp", "$date"] => (AuditField::TimestampMs, Kind::Int),
        ["address"] => (AuditField::Address, Kind::Text),
        ["username"] => (AuditField::Username, Kind::Text),
        ["service"] => (AuditField::Service, Kind::Text),
        ["event"] => (AuditField::Event, Kind::Text),
        ["success"] => (AuditField::Success, Kind::Bool),
        ["event_data", "method"] => (AuditField::Method, Kind::Text),
        ["event_data", "description"] => (AuditField::Target, Kind::Text),
        ["event_data", "error"] => (AuditField::Error, Kind::Text),
        _ => return None,
    })
}

fn translate(f: &Filter) -> Option<AuditFilter> {
    match f {
        Filter::Cond(c) => translate_cond(c),
        Filter::Or(branches) => {
            let branches = branches
                .iter()
                .map(|b| b.iter().map(translate).collect::<Option<Vec<_>>>().map(AuditFilter::All))
                .collect::<Option<Vec<_>>>()?;
            Some(AuditFilter::Any(branches))
        }
    }
}

/// The condition as SQL, giving exactly what the generic engine gives on the
/// entry's JSON value (see `keyhaven_core::query`): a missing or null field,
/// a type mismatch (Python's `TypeError`) or an unfoldable value makes a
/// condition false, `!=` is true for null, `nin`/`rin`/`rnin` never match null.
fn translate_cond(c: &Cond) -> Option<AuditFilter> {
    let path: Vec<&str> = c.path().collect();
    let (field, kind) = column(&path)?;
    let (op, y) = (c.op(), c.value());
    if op == Op::Re {
        return None;
    }
    if let Value::Array(items) = y {
        if items.len() > MAX_SQL_LIST {
            return None;
        }
    }
    Some(match kind {
        // Case folding a number or a boolean fails: never a match.
        _ if c.case_insensitive() && kind != Kind::Text => AuditFilter::Const(false),
        Kind::Text => text_cond(AuditExpr { field, folded: c.case_insensitive() }, op, y),
        Kind::Int => int_cond(field.into(), op, y),
        Kind::Bool => bool_cond(field.into(), op, y),
    })
}

fn cmp(op: Op) -> AuditCmp {
    match op {
        Op::Ne => AuditCmp::Ne,
        Op::Lt => AuditCmp::Lt,
        Op::Le => AuditCmp::Le,
        Op::Gt => AuditCmp::Gt,
        Op::Ge => AuditCmp::Ge,
        _ => AuditCmp::Eq,
    }
}

fn text(s: &str) -> AuditValue {
    AuditValue::Text(s.to_string())
}

fn text_cond(e: AuditExpr, op: Op, y: &Value) -> AuditFilter {
    use AuditFilter as F;
    let operand = y.as_str();
    match op {
        Op::Eq => match y {
            Value::String(s) => F::Cmp(e, AuditCmp::Eq, text(s)),
            Value::Null => F::IsNull(e),
            _ => F::Const(false),
        },
        Op::Ne => match y {
            Value::String(s) => F::Differs(e, text(s)),
            Value::Null => F::NotNull(e),
            _ => F::Const(true),
        },
        Op::Gt | Op::Ge | Op::Lt | Op::Le => match operand {
            Some(s) => F::Cmp(e, cmp(op), text(s)),
            None => F::Const(false),
        },
        Op::In | Op::Nin => {
            let negated = op == Op::Nin;
            match y {
                Value::Array(items) => {
                    let texts = items.iter().filter_map(Value::as_str).map(text).collect();
                    if negated {
                        F::NotIn(e, texts)
                    } else if items.iter().any(Value::is_null) {
                        F::Any(vec![F::In(e, texts), F::IsNull(e)])
                    } else {
                        F::In(e, texts)
                    }
                }
                Value::String(haystack) => F::ContainedIn { expr: e, text: haystack.clone(), negated },
                Value::Object(m) => {
                    let keys = m.keys().map(|k| text(k)).collect();
                    if negated {
                        F::NotIn(e, keys)
                    } else {
                        F::In(e, keys)
                    }
                }
                // parse_filters refuses other operands.
                _ => F::Const(false),
            }
        }
        Op::Rin | Op::Rnin => match operand {
            Some(s) => F::Contains { expr: e, text: s.to_string(), negated: op == Op::Rnin },
            None => F::Const(false),
        },
        Op::StartsWith | Op::NotStartsWith => match operand {
            Some(s) => F::StartsWith { expr: e, text: s.to_string(), negated: op == Op::NotStartsWith },
            None => F::Const(false),
        },
        Op::EndsWith | Op::NotEndsWith => match operand {
            Some(s) => F::EndsWith { expr: e, text: s.to_string(), negated: op == Op::NotEndsWith },
            None => F::Const(false),
        },
        Op::Re => F::Const(false),
    }
}

/// `n` as an `i64` when it is a whole number in range (`2.0` is 2).
fn exact_i64(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64().filter(|f| f.fract() == 0.0)?;
    // 2^63 is exactly representable; everything below it in magnitude fits.
    (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f).then_some(f as i64)
}

/// An integer column (never null) against a JSON operand.
fn int_cond(e: AuditExpr, op: Op, y: &Value) -> AuditFilter {
    use AuditFilter as F;
    match (op, y) {
        (Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge, Value::Number(n)) => int_cmp(e, op, n),
        // Booleans, strings, null, lists: never equal, never ordered.
        (Op::Eq | Op::Lt | Op::Le | Op::Gt | Op::Ge, _) => F::Const(false),
        (Op::Ne, _) => F::Const(true),
        (Op::In | Op::Nin, Value::Array(items)) => {
            let ints = items.iter().filter_map(Value::as_number).filter_map(exact_i64).map(AuditValue::Int).collect();
            if op == Op::Nin {
                F::NotIn(e, ints)
            } else {
                F::In(e, ints)
            }
        }
        // A number is never a key of an object (so always `nin`), and
        // testing it against a string is a TypeError (neither).
        (Op::In | Op::Nin, Value::Object(_)) => F::Const(op == Op::Nin),
        _ => F::Const(false),
    }
}

/// Exact integer-column comparison with any JSON number: a float bound is
/// rounded to the integer that keeps the comparison's meaning, and a bound
/// outside `i64` makes it constant.
fn int_cmp(e: AuditExpr, op: Op, n: &serde_json::Number) -> AuditFilter {
    use AuditFilter as F;
    let (op, bound): (AuditCmp, i128) = match n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from)) {
        Some(i) => (cmp(op), i),
        None => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.is_nan() {
                return F::Const(op == Op::Ne);
            }
            match op {
                Op::Eq | Op::Ne if f.fract() != 0.0 => return F::Const(op == Op::Ne),
                Op::Eq | Op::Ne => (cmp(op), f as i128),
                // x < 2.5 is x < 3; x <= 2.5 is x <= 2; x > 2.5 is x > 2; x >= 2.5 is x >= 3.
                Op::Lt | Op::Ge => (cmp(op), f.ceil() as i128),
                _ => (cmp(op), f.floor() as i128),
            }
        }
    };
    if bound > i128::from(i64::MAX) {
        return F::Const(matches!(op, AuditCmp::Ne | AuditCmp::Lt | AuditCmp::Le));
    }
    if bound < i128::from(i64::MIN) {
        return F::Const(matches!(op, AuditCmp::Ne | AuditCmp::Gt | AuditCmp::Ge));
    }
    F::Cmp(e, op, AuditValue::Int(bound as i64))
}

/// The `success` column (0 or 1, never null) against a JSON operand:
/// booleans compare with booleans only (`true` is not `1`).
fn bool_cond(e: AuditExpr, op: Op, y: &Value) -> AuditFilter {
    use AuditFilter as F;
    let as_int = |v: &Value| v.as_bool().map(|b| AuditValue::Int(i64::from(b)));
    match (op, y) {
        (Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge, _) => match as_int(y) {
            Some(v) => F::Cmp(e, cmp(op), v),
            None => F::Const(op == Op::Ne),
        },
        (Op::In | Op::Nin, Value::Array(items)) => {
            let values = items.iter().filter_map(as_int).collect();
            if op == Op::Nin {
                F::NotIn(e, values)
            } else {
                F::In(e, values)
            }
        }
        (Op::In | Op::Nin, Value::Object(_)) => F::Const(op == Op::Nin),
        _ => F::Const(false),
    }
}

/// `order_by` as SQL, or `None` when some key is not a column.
fn translate_order(options: &QueryOptions) -> Option<Vec<AuditOrder>> {
    // The generic engine looks an order key up in the projected entry first,
    // where a `select` alias may stand for another field.
    if !options.order_by.is_empty() && options.select.iter().any(Value::is_array) {
        return None;
    }
    let mut out = Vec::new();
    for key in options.order_keys() {
        let path: Vec<&str> = key.path().collect();
        // The same value in every entry (null, or objects, which all compare
        // equal): ordering by it changes nothing.
        if matches!(path.as_slice(), [] | ["session"] | ["service_data"] | ["timestamp"] | ["event_data"]) {
            continue;
        }
        let (field, _) = column(&path)?;
        let nulls = match key.nulls() {
            Nulls::Natural => AuditNulls::Natural,
            Nulls::First => AuditNulls::First,
            Nulls::Last => AuditNulls::Last,
        };
        out.push(AuditOrder { field, descending: key.descending(), nulls });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyhaven_core::query::parse_filters;
    use serde_json::json;

    /// A small deterministic generator (no test-only dependency needed).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }

        fn pick<T: Clone>(&mut self, pool: &[T]) -> T {
            pool[self.below(pool.len() as u64) as usize].clone()
        }
    }

    /// A few hundred rows with every awkward value the columns can hold:
    /// NULLs, case and Unicode folding pairs, GLOB and LIKE wildcards, an
    /// embedded NUL, empty strings, ties in whole seconds.
    fn store_with_rows() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(d.path()).unwrap();
        let mut r = Lcg(0xa0d1);
        let users = [
            None,
            Some("admin"),
            Some("Admin"),
            Some("ADMIN"),
            Some("bob"),
            Some("a*b?[c]%_"),
            Some("ad\0min"),
            Some(""),
            Some("STRASSE"),
            Some("straße"),
            Some("\u{212A}elvin"),
            Some("ünïcödé"),
        ];
        let addresses = [None, Some("127.0.0.1"), Some("10.0.0.7"), Some("10.0.1.9"), Some("::1")];
        let methods = [None, Some("auth.login_ex"), Some("api_key.create"), Some("keychaincredential.delete")];
        let targets = [None, Some("Authentication attempt (PASSWORD_PLAIN)"), Some("Create API key: x"), Some("")];
        let errors = [None, Some("Not authorized"), Some("too many failed logins; try again later"), Some("AUTH_ERR")];
        for _ in 0..300 {
            let ts = 1_000.0 + r.below(100) as f64 + r.pick(&[0.0, 0.25, 0.5, 0.999]);
            let entry = AuditEntry {
                username: r.pick(&users).map(str::to_string),
                address: r.pick(&addresses).map(str::to_string),
                service: r.pick(&["MIDDLEWARE", "SMB"]).to_string(),
                method: r.pick(&methods).map(str::to_string),
                event: r.pick(&["AUTHENTICATION", "METHOD_CALL"]).to_string(),
                target: r.pick(&targets).map(str::to_string),
                success: r.below(2) == 0,
                error: r.pick(&errors).map(str::to_string),
            };
            store.audit_insert_at(ts, &entry).unwrap();
        }
        (d, store)
    }

    fn filters() -> Vec<Value> {
        let conds = [
            json!(["username", "=", "admin"]),
            json!(["username", "=", null]),
            json!(["username", "=", 5]),
            json!(["username", "!=", "admin"]),
            json!(["username", "!=", null]),
            json!(["username", "!=", 5]),
            json!(["username", ">", "b"]),
            json!(["username", "<=", "admin"]),
            json!(["username", "<", null]),
            json!(["username", ">=", ""]),
            json!(["username", "in", ["admin", "bob", null]]),
            json!(["username", "in", ["admin", 1]]),
            json!(["username", "in", []]),
            json!(["username", "nin", ["admin"]]),
            json!(["username", "nin", [null]]),
            json!(["username", "in", "xadminx bob"]),
            json!(["username", "nin", "xadminx"]),
            json!(["username", "in", {"admin": 1, "bob": 2}]),
            json!(["username", "nin", {"admin": 1}]),
            json!(["username", "rin", "dm"]),
            json!(["username", "rnin", "dm"]),
            json!(["username", "rin", ""]),
            json!(["username", "rin", 1]),
            json!(["username", "rnin", 1]),
            json!(["username", "^", "ad"]),
            json!(["username", "!^", "ad"]),
            json!(["username", "^", ""]),
            json!(["username", "^", "a*"]),
            json!(["username", "^", "a*b?[c]%"]),
            json!(["username", "^", "ad\u{0}"]),
            json!(["username", "^", "AD"]),
            json!(["username", "$", "min"]),
            json!(["username", "!$", "min"]),
            json!(["username", "$", ""]),
            json!(["username", "!$", ""]),
            json!(["username", "$", "\u{0}min"]),
            json!(["username", "$", "%_"]),
            json!(["username", "C=", "ADMIN"]),
            json!(["username", "C=", null]),
            json!(["username", "C!=", "admin"]),
            json!(["username", "C^", "AD"]),
            json!(["username", "C!^", "AD"]),
            json!(["username", "C$", "MIN"]),
            json!(["username", "Cin", ["ADMIN", "Bob"]]),
            json!(["username", "Cnin", ["ADMIN"]]),
            json!(["username", "Cin", "XADMINX"]),
            json!(["username", "Crin", "DM"]),
            json!(["username", "Crnin", "DM"]),
            json!(["username", "C=", "strasse"]),
            json!(["username", "C=", "kelvin"]),
            json!(["username", "C<", "b"]),
            json!(["username", "C^", "ÜNÏ"]),
            json!(["audit_id", ">", 250]),
            json!(["audit_id", "<=", 10.5]),
            json!(["audit_id", "<", 10.5]),
            json!(["audit_id", ">=", 290.0]),
            json!(["audit_id", "in", [1, 2, 3.0, 4.5, "5", null, true]]),
            json!(["audit_id", "nin", [1, 2]]),
            json!(["audit_id", "nin", []]),
            json!(["audit_id", "=", 1.5]),
            json!(["audit_id", "!=", 1.0]),
            json!(["audit_id", "!=", 1.5]),
            json!(["audit_id", "=", "1"]),
            json!(["audit_id", "!=", "1"]),
            json!(["audit_id", "<", u64::MAX]),
            json!(["audit_id", ">", -1e300]),
            json!(["audit_id", "<", 1e300]),
            json!(["audit_id", "=", null]),
            json!(["audit_id", "in", "123"]),
            json!(["audit_id", "nin", "123"]),
            json!(["audit_id", "in", {"a": 1}]),
            json!(["audit_id", "nin", {"a": 1}]),
            json!(["audit_id", "rin", 1]),
            json!(["audit_id", "^", "1"]),
            json!(["audit_id", "C=", "1"]),
            json!(["audit_id", "C!=", "1"]),
            json!(["message_timestamp", ">=", 1_050]),
            json!(["message_timestamp", "<", 1_020.5]),
            json!(["message_timestamp", "=", 1_033]),
            json!(["message_timestamp", "in", [1_001, 1_002, 1_099.0]]),
            json!(["timestamp.$date", ">", 1_050_000]),
            json!(["timestamp.$date", "<=", 1_020_500.0]),
            json!(["timestamp.$date", "=", 1_010_250]),
            json!(["success", "=", true]),
            json!(["success", "!=", false]),
            json!(["success", "=", 1]),
            json!(["success", "!=", 1]),
            json!(["success", ">", false]),
            json!(["success", "<", 1]),
            json!(["success", "in", [true, 1]]),
            json!(["success", "nin", [true]]),
            json!(["success", "nin", {"x": 1}]),
            json!(["success", "in", "true"]),
            json!(["success", "C=", "true"]),
            json!(["event", "=", "AUTHENTICATION"]),
            json!(["service", "!=", "MIDDLEWARE"]),
            json!(["address", "^", "10.0."]),
            json!(["address", "=", null]),
            json!(["address", "Crin", "0.1"]),
            json!(["event_data.method", "=", "auth.login_ex"]),
            json!(["event_data.method", "=", null]),
            json!(["event_data.method", "^", "keychain"]),
            json!(["event_data.description", "rin", "attempt"]),
            json!(["event_data.description", "=", ""]),
            json!(["event_data.error", "!=", null]),
            json!(["event_data.error", "Crin", "TOO MANY"]),
            json!(["event_data.error", "in", ["AUTH_ERR", "Not authorized"]]),
            // Only in memory:
            json!(["username", "~", "ad.*"]),
            json!(["username", "C~", "AD"]),
            json!(["session", "=", null]),
            json!(["service_data", "=", {}]),
            json!(["timestamp", "=", {"$date": 1_010_250}]),
            json!(["event_data", "rin", "error"]),
            json!(["nope", "!=", 1]),
            json!(["audit_id", "in", (0..1_500).collect::<Vec<_>>()]),
        ];
        let mut out: Vec<Value> = conds.iter().map(|c| json!([c])).collect();
        out.push(json!([]));
        out.push(json!([["event", "=", "METHOD_CALL"], ["success", "=", false], ["audit_id", ">", 20]]));
        out.push(json!([["OR", [["username", "=", "admin"], ["success", "=", false]]]]));
        out.push(json!([["OR", [[["event", "=", "METHOD_CALL"], ["audit_id", ">", 100]], ["address", "=", null]]]]));
        out.push(json!([[
            "OR",
            [["OR", [["username", "C=", "bob"], ["message_timestamp", "<", 1_005]]], ["username", "$", "min"]]
        ]]));
        out.push(json!([["event", "=", "AUTHENTICATION"], ["username", "~", "^a"]]));
        out.push(json!([["OR", [["username", "~", "b"], ["audit_id", "<", 5]]], ["success", "=", true]]));
        out.push(json!([
            ["address", "^", "10."],
            ["session", "=", null],
            ["OR", [["audit_id", "<", 50], ["audit_id", ">", 250]]]
        ]));
        out
    }

    fn options() -> Vec<Value> {
        vec![
            json!({}),
            json!({"order_by": ["-message_timestamp"]}),
            json!({"order_by": ["username", "-audit_id"], "limit": 7, "offset": 3}),
            json!({"order_by": ["nulls_last:username", "event_data.error"]}),
            json!({"order_by": ["nulls_first:-event_data.error", "timestamp.$date"], "limit": 20}),
            json!({"order_by": ["-success", "address"]}),
            json!({"count": true}),
            json!({"count": true, "limit": 3, "order_by": ["username"]}),
            json!({"count": true, "order_by": ["unknown"]}),
            json!({"get": true, "order_by": ["-audit_id"]}),
            json!({"get": true}),
            json!({"select": ["audit_id", "username", "event_data.method"], "order_by": ["-timestamp.$date"], "limit": 5}),
            json!({"select": [["username", "audit_id"]], "order_by": ["audit_id"]}),
            json!({"order_by": ["timestamp", "-session", "event_data"]}),
            json!({"order_by": ["unknown", "audit_id"]}),
            json!({"limit": 3}),
            json!({"offset": 250}),
            json!({"limit": 10, "offset": 5}),
        ]
    }

    /// A refused query, comparable across the two implementations.
    #[derive(Debug, PartialEq)]
    enum Refused {
        NotFound,
        Invalid(String),
    }

    fn generic(entries: &[Value], f: &Filters, o: &QueryOptions) -> Result<QueryResult, Refused> {
        filter_list(entries, f, o).map_err(|e| match e {
            QueryError::NotFound => Refused::NotFound,
            QueryError::Invalid(v) => Refused::Invalid(v.to_string()),
        })
    }

    fn through_sql(store: &Store, f: &Filters, o: &QueryOptions) -> Result<QueryResult, Refused> {
        query(store, f, o).map_err(|e| match e {
            ServiceError::Call { errno: ENOENT, message } if message == "No matching records found" => {
                Refused::NotFound
            }
            other => Refused::Invalid(other.to_string()),
        })
    }

    /// Ids (or the whole entry when it has no id) of a result, for messages.
    fn brief(r: &Result<QueryResult, Refused>) -> String {
        let id = |e: &Value| e.get("audit_id").map_or_else(|| e.to_string(), Value::to_string);
        match r {
            Ok(QueryResult::List(l)) => format!("{:?}", l.iter().map(id).collect::<Vec<_>>()),
            Ok(QueryResult::One(e)) => format!("one {}", id(e)),
            Ok(QueryResult::Count(n)) => format!("count {n}"),
            Err(e) => format!("error {e:?}"),
        }
    }

    #[test]
    fn sql_and_in_memory_paths_answer_like_the_generic_engine() {
        let (_d, store) = store_with_rows();
        let entries: Vec<Value> = store.audit_list().unwrap().into_iter().map(|r| to_entry(r).unwrap()).collect();
        assert_eq!(entries.len(), 300);
        let (mut in_sql, mut in_memory, mut non_empty) = (0, 0, 0);
        for fv in filters() {
            let f = parse_filters(&fv).unwrap_or_else(|e| panic!("{fv}: {e}"));
            for ov in options() {
                let o = QueryOptions::from_value(&ov).unwrap();
                let plan = Plan::new(&f, &o);
                if !plan.in_memory && plan.order_by.is_some() {
                    in_sql += 1;
                } else {
                    in_memory += 1;
                }
                let want = generic(&entries, &f, &o);
                if matches!(&want, Ok(QueryResult::List(l)) if !l.is_empty()) {
                    non_empty += 1;
                }
                let got = through_sql(&store, &f, &o);
                assert!(got == want, "filters {fv}, options {ov}:\n  got  {}\n  want {}", brief(&got), brief(&want));
            }
        }
        // The table exercises both paths, mostly with results to compare.
        assert!(in_sql > 1_000 && in_memory > 150, "{in_sql} in SQL, {in_memory} in memory");
        assert!(non_empty > 700, "only {non_empty} non-empty lists");
    }

    #[test]
    fn the_plan_sends_what_sql_can_answer_to_sql() {
        let plan = |f: Value, o: Value| {
            let p = Plan::new(&parse_filters(&f).unwrap(), &QueryOptions::from_value(&o).unwrap());
            (p.in_memory, p.order_by.is_some())
        };
        // The web UI's query, the compat tests' and the TrueNAS dict form's.
        assert_eq!(plan(json!([]), json!({"order_by": ["-audit_id"], "limit": 200})), (false, true));
        assert_eq!(plan(json!([["event", "=", "AUTHENTICATION"], ["success", "=", false]]), json!({})), (false, true));
        assert_eq!(plan(json!([["event_data.description", "=", "x"]]), json!({"select": ["username"]})), (false, true));
        assert_eq!(
            plan(json!([["OR", [["username", "C^", "a"], ["audit_id", "in", [1, 2]]]]]), json!({})),
            (false, true)
        );
        assert_eq!(plan(json!([["username", "~", "a"]]), json!({})), (true, true));
        assert_eq!(plan(json!([["OR", [["username", "=", "a"], ["session", "=", null]]]]), json!({})), (true, true));
        assert_eq!(plan(json!([]), json!({"order_by": ["session", "timestamp"]})), (false, true));
        assert_eq!(plan(json!([]), json!({"order_by": ["username.x"]})), (false, false));
        assert_eq!(plan(json!([]), json!({"order_by": ["username.x"], "count": true})), (false, true));
        assert_eq!(plan(json!([]), json!({"order_by": ["n"], "select": [["username", "n"]]})), (false, false));
    }

    #[test]
    fn in_memory_matches_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(d.path()).unwrap();
        let entry = AuditEntry { service: "MIDDLEWARE".into(), event: "AUTHENTICATION".into(), ..Default::default() };
        for i in 0..(MAX_AUDIT_ENTRIES_IN_MEMORY + 1) {
            store.audit_insert_at(i as f64, &entry).unwrap();
        }
        let all = parse_filters(&json!([["session", "=", null]])).unwrap();
        let err = query(&store, &all, &QueryOptions::default()).unwrap_err();
        assert!(
            matches!(&err, ServiceError::Validation(v) if v.0[0].attribute == "filters" && v.0[0].message.contains("only run in memory")),
            "{err}"
        );
        // Counting and paging without order_by need no more than the page.
        let count = QueryOptions { count: true, ..Default::default() };
        assert_eq!(query(&store, &all, &count).unwrap(), QueryResult::Count(MAX_AUDIT_ENTRIES_IN_MEMORY + 1));
        let page = QueryOptions { limit: 2, offset: 40_000, ..Default::default() };
        let QueryResult::List(l) = query(&store, &all, &page).unwrap() else { panic!("a list") };
        assert_eq!(l.iter().map(|e| e["audit_id"].as_i64().unwrap()).collect::<Vec<_>>(), [40_001, 40_002]);
        // In SQL, an unlimited page is refused the same way; a limited one is fine.
        let err = query(&store, &Filters::all(), &QueryOptions::default()).unwrap_err();
        assert!(matches!(&err, ServiceError::Validation(v) if v.0[0].attribute == "options.limit"), "{err}");
        let newest = QueryOptions { limit: 1, order_by: vec!["-audit_id".into()], ..Default::default() };
        let QueryResult::List(l) = query(&store, &Filters::all(), &newest).unwrap() else { panic!("a list") };
        assert_eq!(l[0]["audit_id"], json!(MAX_AUDIT_ENTRIES_IN_MEMORY + 1));
    }
}
