//! `audit.*`.

use std::sync::Arc;

use serde_json::Value;

use super::{query, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::audit;

pub fn methods() -> Vec<MethodDef> {
    vec![method!("audit.query", Read, audit_query, heavy)]
}

async fn audit_query(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    // TrueNAS's audit.query takes one dict {services, query-filters, query-options};
    // keyhaven also accepts the plain [filters, options] form of every *.query.
    if let Some(Value::Object(m)) = p.raw(0) {
        let filters = m.get("query-filters").cloned().unwrap_or(Value::Array(vec![]));
        let options = m.get("query-options").cloned().unwrap_or(Value::Object(Default::default()));
        for k in m.keys() {
            if !["services", "query-filters", "query-options", "remote_controller"].contains(&k.as_str()) {
                return Err(ServiceError::field(format!("audit_query.{k}"), "Extra inputs are not permitted"));
            }
        }
        return query(&audit::entries(&ctx.app)?, &Params(vec![filters, options]), "audit_query");
    }
    query(&audit::entries(&ctx.app)?, &p, "audit_query")
}
