//! `user.*`: accounts, their authorized keys (`sshpubkey`) and two-factor login.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::Str;
use super::{query, to_json, Ctx, MethodDef, Params};
use crate::error::{ServiceError, EACCES};
use crate::method;
use crate::service::auth::{Scope, PAIRING_USER_FIELDS};
use crate::service::users::{UserEntry, UserInput};

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("user.query", Read, query_m, 2, heavy),
        method!("user.get_instance", Read, get_instance, 2),
        method!("user.create", Write, create, 1),
        method!("user.update", Write, update, 2),
        method!("user.delete", Write, delete, 2),
        method!("user.renew_2fa_secret", Write, renew_2fa, 2),
        method!("user.unset_2fa_secret", Write, unset_2fa, 1),
    ]
}

async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let entries = ctx.app.accounts().entries()?;
    let as_json = |entries: &[UserEntry]| entries.iter().map(to_json).collect::<Result<Vec<Value>, _>>();
    if ctx.caller()?.scope == Scope::Pairing {
        // A pairing session sees the one account it pairs; the first query
        // that names an account by `username =` binds the session to it.
        let account = match ctx.session.pairing_account() {
            Some(a) => a,
            None => {
                let named = p.raw(0).and_then(exact_username).ok_or_else(|| {
                    ServiceError::field(
                        "user.query.filters",
                        "A pairing session must name its account: filter with [\"username\", \"=\", NAME]",
                    )
                })?;
                ctx.session.pairing_may_use(&named)?;
                named
            }
        };
        let own: Vec<_> = entries.into_iter().filter(|e| e.username == account).collect();
        return query(&as_json(&own)?, &p, "user.query");
    }
    query(&as_json(&entries)?, &p, "user.query")
}

/// The username a top-level `["username", "=", NAME]` filter names.
fn exact_username(filters: &Value) -> Option<String> {
    filters.as_array()?.iter().find_map(|f| match f.as_array().map(Vec::as_slice) {
        Some([Value::String(k), Value::String(op), Value::String(v)]) if k == "username" && op == "=" => {
            Some(v.clone())
        }
        _ => None,
    })
}

async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "user_get_instance.id")?;
    let (r, _) = ctx.app.accounts().by_id(id)?;
    pairing_bound(&ctx, &r.username)?;
    to_json(&ctx.app.accounts().entry(&r))
}

/// In a pairing session, only the account it pairs (already named by a query
/// or `ssh_pair`) may be read or changed.
fn pairing_bound(ctx: &Ctx, username: &str) -> Result<(), ServiceError> {
    if ctx.caller()?.scope != Scope::Pairing {
        return Ok(());
    }
    match ctx.session.pairing_account() {
        Some(a) if a == username => Ok(()),
        Some(a) => Err(ServiceError::call(
            EACCES,
            format!("Not authorized: this pairing session pairs the account {a}, not {username}"),
        )),
        None => Err(ServiceError::call(
            EACCES,
            "Not authorized: a pairing session must name its account first (user.query by username, or ssh_pair)",
        )),
    }
}

async fn create(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "user_create";
    let u: UserInput = p.req(0, S)?;
    // Checked again by the service; here first so that the audit entry of a
    // refused call reads as it always has.
    u.check_size().map_err(|e| e.in_schema(S))?;
    ctx.describe(format!("Create user: {}", u.username.as_deref().unwrap_or("")));
    to_json(&ctx.app.accounts().create(u).await.map_err(|e| e.in_schema(S))?)
}

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "user_update";
    let id: i64 = p.req(0, "user_update.id")?;
    let u: UserInput = p.req(1, S)?;
    u.check_size().map_err(|e| e.in_schema(S))?;
    let (r, _) = ctx.app.accounts().by_id(id)?;
    pairing_bound(&ctx, &r.username)?;
    if ctx.caller()?.scope == Scope::Pairing {
        if let Some(Value::Object(m)) = p.raw(1) {
            if let Some(k) = m.keys().find(|k| !PAIRING_USER_FIELDS.contains(&k.as_str())) {
                return Err(ServiceError::field(
                    format!("{S}.{k}"),
                    format!("A pairing session may only change {}", PAIRING_USER_FIELDS.join(", ")),
                ));
            }
        }
    }
    ctx.describe(format!("Update user: {}", r.username));
    to_json(&ctx.app.accounts().update(id, u).await.map_err(|e| e.in_schema(S))?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteOptions {
    #[allow(dead_code)]
    #[serde(default)]
    delete_group: bool,
}

async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "user_delete.id")?;
    let _: DeleteOptions = p.opt(1, "user_delete.options")?;
    if let Ok((r, _)) = ctx.app.accounts().by_id(id) {
        ctx.describe(format!("Delete user: {}", r.username));
    }
    ctx.app.accounts().delete(id).await?;
    Ok(json!(true))
}

async fn renew_2fa(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "user_renew_2fa_secret";
    let username: Str = p.req(0, "user_renew_2fa_secret.username")?;
    let _: Option<serde_json::Map<String, Value>> = p.opt(1, "user_renew_2fa_secret.twofactor_options")?;
    ctx.describe(format!("Renew two-factor secret: {}", &*username));
    to_json(&ctx.app.accounts().twofactor_renew(&username).await.map_err(|e| e.in_schema(S))?)
}

async fn unset_2fa(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "user_unset_2fa_secret";
    let username: Str = p.req(0, "user_unset_2fa_secret.username")?;
    ctx.describe(format!("Disable two-factor login: {}", &*username));
    ctx.app.accounts().twofactor_unset(&username).await.map_err(|e| e.in_schema(S))?;
    Ok(Value::Null)
}
