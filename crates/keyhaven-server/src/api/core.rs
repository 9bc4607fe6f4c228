//! `core.*`: ping, jobs, and the method list.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{query, to_json, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("core.ping", Public, ping, 0),
        method!("core.get_jobs", Read, get_jobs, 2, heavy),
        method!("core.get_methods", Read, get_methods, 0),
        // Answered by the WebSocket transport (they need the connection);
        // listed here so clients find them, and refused elsewhere.
        method!("core.subscribe", Read, websocket_only, 1),
        method!("core.unsubscribe", Read, websocket_only, 1),
    ]
}

async fn ping(_: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    Ok(json!("pong"))
}

async fn get_jobs(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let rows = ctx.app.jobs.list().iter().map(to_json).collect::<Result<Vec<_>, _>>()?;
    query(&rows, &p, "core.get_jobs")
}

async fn get_methods(_: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    let mut out = serde_json::Map::new();
    for (name, access) in super::method_list() {
        out.insert(name.to_string(), json!({"access": format!("{access:?}").to_uppercase()}));
    }
    Ok(Value::Object(out))
}

async fn websocket_only(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    Err(ServiceError::call(
        crate::error::EINVAL,
        format!("{} works on a WebSocket connection (/api/current) only", ctx.method),
    ))
}
