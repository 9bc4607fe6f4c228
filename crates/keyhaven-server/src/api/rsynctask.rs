//! `rsynctask.*` (TrueNAS's names and shapes): decode, call the rsync service, encode.

use std::sync::Arc;

use serde_json::{json, Value};

use super::params::decode;
use super::{to_json, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::rsync::{RsyncTaskInput, Trigger};

const CREATE: &str = "rsync_task_create";
const UPDATE: &str = "rsync_task_update";

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("rsynctask.query", Read, query, 2, heavy),
        method!("rsynctask.get_instance", Read, get_instance, 2),
        method!("rsynctask.create", Write, create, 1),
        method!("rsynctask.update", Write, update, 2),
        method!("rsynctask.delete", Write, delete, 1),
        method!("rsynctask.run", Write, run, 1),
        // keyhaven extension: the last run's output, kept with the task.
        method!("rsynctask.last_log", Read, last_log, 1),
    ]
}

async fn query(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    ctx.app.rsync().query(ctx.caller()?.role, p.raw(0), p.raw(1)).map_err(|e| e.in_schema("rsync_task_query"))
}

async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "rsync_task_get_instance.id")?;
    to_json(&ctx.app.rsync().get(id, ctx.caller()?.role)?)
}

fn describe(ctx: &Ctx, verb: &str, t: &RsyncTaskInput) {
    ctx.describe(format!("{verb} Rsync Task: {} {}", t.path, t.remotepath));
}

async fn create(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let t: RsyncTaskInput = p.req(0, CREATE)?;
    describe(&ctx, "Create", &t);
    to_json(&ctx.app.rsync().create(t).await.map_err(|e| e.in_schema(CREATE))?)
}

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, &format!("{UPDATE}.id"))?;
    let changes: serde_json::Map<String, Value> = p.req(1, UPDATE)?;
    let merged = ctx.app.rsync().merge(id, changes).map_err(|e| e.in_schema(UPDATE))?;
    let t: RsyncTaskInput = decode(merged, UPDATE)?;
    describe(&ctx, "Update", &t);
    to_json(&ctx.app.rsync().update(id, t).await.map_err(|e| e.in_schema(UPDATE))?)
}

async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "rsync_task_delete.id")?;
    ctx.describe(format!("Delete Rsync Task: {id}"));
    ctx.app.rsync().delete(id).await?;
    Ok(json!(true))
}

async fn run(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "rsync_task_run.id")?;
    ctx.describe(format!("Run Rsync Task: {id}"));
    Ok(json!(ctx.app.rsync().run(id, Trigger::Manual)?))
}

async fn last_log(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "rsync_task_last_log.id")?;
    Ok(json!(ctx.app.rsync().last_log(id)?))
}
