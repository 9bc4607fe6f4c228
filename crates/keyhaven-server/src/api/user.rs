//! `user.*`: accounts, their authorized keys (`sshpubkey`) and two-factor login.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{Secret, Str};
use super::{query, Ctx, MethodDef, Params};
use crate::error::{ServiceError, EACCES};
use crate::method;
use crate::service::auth::{Scope, PAIRING_USER_FIELDS};
use crate::service::users::UserInput;

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

/// Accepted fields; TrueNAS-only ones (`group_create`, `smb`, …) are accepted
/// and ignored so existing clients keep working.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UserIn {
    username: Option<Str>,
    uid: Option<i64>,
    full_name: Option<Str>,
    home: Option<Str>,
    shell: Option<Str>,
    #[serde(default, deserialize_with = "double_option")]
    email: Option<Option<Str>>,
    password: Option<Secret>,
    password_disabled: Option<bool>,
    locked: Option<bool>,
    ssh_password_enabled: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    sshpubkey: Option<Option<String>>,
    sudo_commands: Option<Vec<Str>>,
    sudo_commands_nopasswd: Option<Vec<Str>>,
    roles: Option<Vec<Str>>,
    // Accepted for TrueNAS compatibility; keyhaven's OS accounts use their own group.
    #[allow(dead_code)]
    group_create: Option<bool>,
    #[allow(dead_code)]
    group: Option<Value>,
    #[allow(dead_code)]
    groups: Option<Vec<Value>>,
    #[allow(dead_code)]
    smb: Option<bool>,
    home_create: Option<bool>,
    #[allow(dead_code)]
    home_mode: Option<Str>,
}

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn to_input(u: UserIn) -> UserInput {
    let strs = |v: Option<Vec<Str>>| v.map(|l| l.into_iter().map(|s| s.0).collect());
    UserInput {
        username: u.username.map(|s| s.0),
        uid: u.uid,
        full_name: u.full_name.map(|s| s.0),
        home: u.home.map(|s| s.0),
        shell: u.shell.map(|s| s.0),
        email: u.email.map(|e| e.map(|s| s.0)),
        password: u.password.map(|p| p.0),
        password_disabled: u.password_disabled,
        locked: u.locked,
        ssh_password_enabled: u.ssh_password_enabled,
        sshpubkey: u.sshpubkey,
        sudo_commands: strs(u.sudo_commands),
        sudo_commands_nopasswd: strs(u.sudo_commands_nopasswd),
        roles: strs(u.roles),
        group: u.group.as_ref().and_then(Value::as_i64),
        home_create: u.home_create,
    }
}

fn check_size(u: &UserIn, schema: &str) -> Result<(), ServiceError> {
    if let Some(Some(k)) = &u.sshpubkey {
        if k.len() > keyhaven_core::authorized_keys::MAX_AUTHORIZED_KEYS_BYTES {
            return Err(ServiceError::field(
                format!("{schema}.sshpubkey"),
                format!(
                    "Authorized keys are limited to {} bytes",
                    keyhaven_core::authorized_keys::MAX_AUTHORIZED_KEYS_BYTES
                ),
            ));
        }
    }
    Ok(())
}

async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let entries = ctx.app.user_entries()?;
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
        let own: Vec<Value> = entries.into_iter().filter(|e| e["username"] == account.as_str()).collect();
        return query(&own, &p, "user.query");
    }
    query(&entries, &p, "user.query")
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
    let (r, _) = ctx.app.user_by_id(id)?;
    pairing_bound(&ctx, &r.username)?;
    Ok(ctx.app.user_entry(&r))
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
    let u: UserIn = p.req(0, "user_create")?;
    check_size(&u, "user_create")?;
    ctx.describe(format!("Create user: {}", u.username.as_deref().unwrap_or("")));
    if u.username.is_none() {
        return Err(ServiceError::field("user_create.username", "Field required"));
    }
    ctx.app.user_create(to_input(u)).await
}

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "user_update.id")?;
    let raw = p.raw(1).cloned();
    let u: UserIn = p.req(1, "user_update")?;
    check_size(&u, "user_update")?;
    let (r, _) = ctx.app.user_by_id(id)?;
    pairing_bound(&ctx, &r.username)?;
    if ctx.caller()?.scope == Scope::Pairing {
        if let Some(Value::Object(m)) = &raw {
            if let Some(k) = m.keys().find(|k| !PAIRING_USER_FIELDS.contains(&k.as_str())) {
                return Err(ServiceError::field(
                    format!("user_update.{k}"),
                    format!("A pairing session may only change {}", PAIRING_USER_FIELDS.join(", ")),
                ));
            }
        }
    }
    ctx.describe(format!("Update user: {}", r.username));
    ctx.app.user_update(id, to_input(u)).await
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
    if let Ok((r, _)) = ctx.app.user_by_id(id) {
        ctx.describe(format!("Delete user: {}", r.username));
    }
    ctx.app.user_delete(id).await?;
    Ok(json!(true))
}

async fn renew_2fa(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let username: Str = p.req(0, "user_renew_2fa_secret.username")?;
    let _: Option<serde_json::Map<String, Value>> = p.opt(1, "user_renew_2fa_secret.twofactor_options")?;
    ctx.describe(format!("Renew two-factor secret: {}", &*username));
    let uri = ctx.app.twofactor_renew(&username).await?;
    let (r, _) = ctx.app.user(&username)?.ok_or_else(|| ServiceError::internal("2FA", "user vanished"))?;
    let mut e = ctx.app.user_entry(&r);
    // keyhaven extension: the provisioning URI, shown this once.
    e["provisioning_uri"] = json!(uri);
    Ok(e)
}

async fn unset_2fa(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let username: Str = p.req(0, "user_unset_2fa_secret.username")?;
    ctx.describe(format!("Disable two-factor login: {}", &*username));
    ctx.app.twofactor_unset(&username).await?;
    Ok(Value::Null)
}
