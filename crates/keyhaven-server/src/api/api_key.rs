//! `api_key.*`: keys are `<id>-<secret>`, shown once at creation, stored hashed.

use std::sync::Arc;

use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::params::Str;
use super::{query, Ctx, MethodDef, Params};
use crate::error::{ServiceError, ENOENT};
use crate::method;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("api_key.create", Write, create, 1),
        method!("api_key.query", Read, list, 2, heavy),
        method!("api_key.delete", Write, delete, 1),
    ]
}

fn entry(r: &keyhaven_store::ApiKeyRecord) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "username": r.username,
        "user_identifier": r.username,
        "created_at": {"$date": r.created_at * 1000},
        "expires_at": r.expires_at.map(|e| json!({"$date": e * 1000})),
        "local": true,
        "revoked": false,
        "revoked_reason": null,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    name: Str,
    username: Str,
}

async fn create(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let c: Create = p.req(0, "api_key_create")?;
    ctx.describe(format!("Create API key: {}", &*c.name));
    let (rec, key) = ctx.app.auth().create_api_key(&c.name, &c.username)?;
    let mut v = entry(&rec);
    v["key"] = json!(key.expose_secret());
    Ok(v)
}

async fn list(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let items: Vec<Value> = ctx.app.store.api_keys_list()?.iter().map(entry).collect();
    query(&items, &p, "api_key_query")
}

async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "api_key_delete.id")?;
    let rec = ctx
        .app
        .store
        .api_key_by_id(id)?
        .ok_or_else(|| ServiceError::field_errno("", format!("API key {id} does not exist"), ENOENT))?;
    ctx.describe(format!("Delete API key: {}", rec.name));
    ctx.app.store.api_key_delete(id)?;
    Ok(json!(true))
}
