//! `keychaincredential.*`: SSH key pairs and SSH connections (reference §2–3).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{decode, Secret, Str};
use super::{query, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::keychain::{self, AttributesInput, ConnectionInput, KeyPairInput, SSH_CREDENTIALS, SSH_KEY_PAIR};
use keyhaven_core::keys::{GenerateOptions, KeyAlgorithm};

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("keychaincredential.query", Read, query_m),
        method!("keychaincredential.get_instance", Read, get_instance),
        method!("keychaincredential.create", Write, create),
        method!("keychaincredential.update", Write, update),
        method!("keychaincredential.delete", Write, delete),
        method!("keychaincredential.used_by", Read, used_by),
        method!("keychaincredential.generate_ssh_key_pair", Write, generate_ssh_key_pair),
    ]
}

const CREATE: &str = "keychain_credential_create";
const UPDATE: &str = "keychain_credentials_update";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPairAttrs {
    #[serde(default)]
    private_key: Option<String>,
    #[serde(default)]
    public_key: Option<String>,
    /// keyhaven extension: decrypts a passphrase-protected import; never stored.
    #[serde(default)]
    passphrase: Option<Secret>,
}

fn default_port() -> i64 {
    22
}
fn default_user() -> Str {
    Str("root".into())
}
fn default_timeout() -> i64 {
    10
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnAttrs {
    host: Str,
    #[serde(default = "default_port")]
    port: i64,
    #[serde(default = "default_user")]
    username: Str,
    private_key: i64,
    remote_host_key: String,
    #[serde(default = "default_timeout")]
    connect_timeout: i64,
}

pub fn decode_attributes(kind: &str, v: Value, schema: &str) -> Result<AttributesInput, ServiceError> {
    let prefix = format!("{schema}.attributes");
    if kind == SSH_KEY_PAIR {
        let a: KeyPairAttrs = decode(v, &prefix)?;
        Ok(AttributesInput::KeyPair(KeyPairInput {
            private_key: a.private_key,
            public_key: a.public_key,
            passphrase: a.passphrase.map(|s| s.0),
        }))
    } else {
        let a: ConnAttrs = decode(v, &prefix)?;
        Ok(AttributesInput::Connection(ConnectionInput {
            host: a.host.0,
            port: a.port,
            username: a.username.0,
            private_key: a.private_key,
            remote_host_key: a.remote_host_key,
            connect_timeout: a.connect_timeout,
        }))
    }
}

fn redact_if_readonly(ctx: &Ctx, mut v: Value) -> Result<Value, ServiceError> {
    if ctx.caller()?.role.can_write() {
        return Ok(v);
    }
    match &mut v {
        Value::Array(a) => a.iter_mut().for_each(keychain::redact),
        Value::Object(_) => keychain::redact(&mut v),
        _ => {}
    }
    Ok(v)
}

async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let app = &ctx.app;
    let cached = app.keychain_entries()?;
    let needs_full = p.raw(0).is_some_and(|f| f.to_string().contains("private_key"))
        || p.raw(1).and_then(|o| o.get("select")).is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty()));
    let can_write = ctx.caller()?.role.can_write();
    let out = if needs_full && can_write {
        let mut all = cached.entries.clone();
        for e in &mut all {
            app.keychain_fill_private(e, &cached)?;
        }
        query(&all, &p, "keychaincredential_query")?
    } else {
        let mut out = query(&cached.entries, &p, "keychaincredential_query")?;
        if can_write {
            match &mut out {
                Value::Array(a) => {
                    for e in a {
                        app.keychain_fill_private(e, &cached)?;
                    }
                }
                Value::Object(_) => app.keychain_fill_private(&mut out, &cached)?,
                _ => {}
            }
        }
        out
    };
    redact_if_readonly(&ctx, out)
}

async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(2, "keychaincredential.get_instance")?;
    let id: i64 = p.req(0, "keychaincredential_get_instance.id")?;
    let e = ctx.app.keychain_get(id)?;
    redact_if_readonly(&ctx, e)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIn {
    name: Str,
    #[serde(rename = "type")]
    kind: CredType,
    attributes: Value,
}

#[derive(Deserialize, Clone, Copy)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
enum CredType {
    SSH_KEY_PAIR,
    SSH_CREDENTIALS,
}

impl CredType {
    fn as_str(self) -> &'static str {
        match self {
            CredType::SSH_KEY_PAIR => SSH_KEY_PAIR,
            CredType::SSH_CREDENTIALS => SSH_CREDENTIALS,
        }
    }
}

async fn create(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(1, "keychaincredential.create")?;
    let c: CreateIn = p.req(0, CREATE)?;
    ctx.describe(format!("Create Keychain Credential: {}", &*c.name));
    let attrs = decode_attributes(c.kind.as_str(), c.attributes, CREATE)?;
    ctx.app.keychain_create(&c.name, attrs, CREATE)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateIn {
    #[serde(default)]
    name: Option<Str>,
    #[serde(default)]
    attributes: Option<Value>,
}

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(2, "keychaincredential.update")?;
    let id: i64 = p.req(0, &format!("{UPDATE}.id"))?;
    let u: UpdateIn = p.req(1, UPDATE)?;
    let current = ctx.app.keychain_get(id)?;
    ctx.describe(format!("Update Keychain Credential: {}", current["name"].as_str().unwrap_or("")));
    let kind = current["type"].as_str().unwrap_or(SSH_KEY_PAIR).to_string();
    let attrs = u.attributes.map(|a| decode_attributes(&kind, a, UPDATE)).transpose()?;
    ctx.app.keychain_update(id, u.name.as_deref(), attrs, UPDATE)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteOptions {
    #[serde(default)]
    cascade: bool,
}

async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(2, "keychaincredential.delete")?;
    let id: i64 = p.req(0, "keychaincredential_delete.id")?;
    let o: DeleteOptions = p.opt(1, "options")?;
    if let Ok(e) = ctx.app.keychain_get(id) {
        ctx.describe(format!("Delete Keychain Credential: {}", e["name"].as_str().unwrap_or("")));
    }
    ctx.app.keychain_delete(id, o.cascade)?;
    Ok(Value::Null)
}

async fn used_by(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(1, "keychaincredential.used_by")?;
    let id: i64 = p.req(0, "keychaincredential_used_by.id")?;
    let deps = ctx.app.keychain_used_by(id)?;
    Ok(Value::Array(deps.into_iter().map(|d| json!({"title": d.title, "unbind_method": d.unbind_method})).collect()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GenerateIn {
    #[serde(default)]
    key_type: Option<Str>,
    #[serde(default)]
    size: Option<u32>,
    #[serde(default)]
    comment: Option<Str>,
}

pub fn generate_options(g: &GenerateArgs, schema: &str) -> Result<GenerateOptions, ServiceError> {
    let algorithm = match &g.key_type {
        None => KeyAlgorithm::Ed25519,
        Some(k) => keychain::parse_algorithm(k, &format!("{schema}.key_type"))?,
    };
    Ok(GenerateOptions { algorithm, bits: g.size, comment: g.comment.clone() })
}

/// Generation options as plain values (shared with `setup_ssh_connection`).
pub struct GenerateArgs {
    pub key_type: Option<String>,
    pub size: Option<u32>,
    pub comment: Option<String>,
}

async fn generate_ssh_key_pair(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_credential_generate_ssh_key_pair";
    p.at_most(1, "keychaincredential.generate_ssh_key_pair")?;
    let g: GenerateIn = p.opt(0, S)?;
    let opts = generate_options(
        &GenerateArgs { key_type: g.key_type.map(|s| s.0), size: g.size, comment: g.comment.map(|s| s.0) },
        S,
    )?;
    let kp = ctx.app.generate_key_pair(opts).await?;
    Ok(json!({"private_key": kp.private_key.as_str(), "public_key": kp.public_key}))
}
