//! `audit.*`.

use std::sync::Arc;

use serde_json::Value;

use super::{Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::audit;
use keyhaven_core::query::{parse_filters, QueryOptions, QueryResult};
use keyhaven_core::ValidationErrors;

const SCHEMA: &str = "audit_query";

pub fn methods() -> Vec<MethodDef> {
    vec![method!("audit.query", Read, audit_query, 2, heavy)]
}

async fn audit_query(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    // TrueNAS's audit.query takes one dict {services, query-filters, query-options};
    // keyhaven also accepts the plain [filters, options] form of every *.query.
    let (filters, options) = if let Some(Value::Object(m)) = p.raw(0) {
        for k in m.keys() {
            if !["services", "query-filters", "query-options", "remote_controller"].contains(&k.as_str()) {
                return Err(ServiceError::field(format!("{SCHEMA}.{k}"), "Extra inputs are not permitted"));
            }
        }
        let filters = m.get("query-filters").cloned().unwrap_or(Value::Array(vec![]));
        let options = m.get("query-options").cloned().unwrap_or(Value::Object(Default::default()));
        (filters, options)
    } else {
        (p.raw(0).cloned().unwrap_or(Value::Null), p.raw(1).cloned().unwrap_or(Value::Null))
    };
    let app = ctx.app.clone();
    // Off the async workers: compiling patterns and reading a large table
    // take a while (both bounded, see service::audit).
    let result = tokio::task::spawn_blocking(move || {
        let filters = parse_filters(&filters)?;
        let options = QueryOptions::from_value(&options)?;
        audit::query(&app.store, &filters, &options)
    })
    .await
    .map_err(|e| ServiceError::internal("audit.query", e))?;
    result.map(QueryResult::into_value).map_err(|e| match e {
        ServiceError::Validation(v) => {
            ServiceError::Validation(ValidationErrors(v.0.into_iter().map(|e| e.prefixed(SCHEMA)).collect()))
        }
        other => other,
    })
}
