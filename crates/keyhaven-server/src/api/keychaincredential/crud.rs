//! Reading and writing credentials: query, get, create, update, delete, used_by, key generation and
//! private-key downloads.

use super::*;

/// The entry a top-level `["name", "=", s]` or `["id", "=", n]` filter pins
/// down, if any: the list is an AND, so no other entry can match.
pub(super) fn pinned_id(cached: &keychain::Cached, filters: Option<&Value>) -> Option<Option<i64>> {
    let list = filters?.as_array()?;
    for f in list {
        let Some([field, op, value]) = f.as_array().map(Vec::as_slice) else { continue };
        if op != "=" {
            continue;
        }
        match (field.as_str(), value) {
            (Some("name"), Value::String(n)) => return Some(cached.names.get(n).copied()),
            (Some("id"), Value::Number(n)) if n.is_i64() => {
                let id = n.as_i64().unwrap_or_default();
                return Some(cached.contains(id).then_some(id));
            }
            _ => {}
        }
    }
    None
}

pub(super) async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    use keyhaven_core::query::{matches, parse_filters, QueryOptions};
    let app = &ctx.app;
    let cached = app.keychain_entries()?;
    let can_write = ctx.caller()?.role.can_write();
    let needs_private = can_write
        && (p.raw(0).is_some_and(|f| f.to_string().contains("private_key"))
            || p.raw(1).and_then(|o| o.get("select")).is_some_and(|s| s.as_array().is_some_and(|a| !a.is_empty())));
    let filters = parse_filters(p.raw(0).unwrap_or(&Value::Null));
    let options = QueryOptions::from_value(p.raw(1).unwrap_or(&Value::Null));
    // Candidates: the one entry an indexed equality filter names, or the
    // entries that pass the filters, parsed one at a time. Invalid filters or
    // options fall through to `query`, which reports them.
    let items: Vec<Value> = match (&filters, &options, pinned_id(&cached, p.raw(0))) {
        (Ok(f), Ok(o), None) if f.is_empty() && o.count && !needs_private => {
            return Ok(json!(cached.len()));
        }
        (Ok(_), Ok(_), Some(id)) => id.and_then(|id| cached.get(id)).into_iter().collect(),
        (Ok(f), Ok(_), None) => cached.matching(|v| {
            if needs_private {
                app.keychain_fill_private(v, &cached)?;
            }
            // Read-only callers filter what they may see, so filters and
            // `select` cannot be used to read redacted attributes.
            if !can_write {
                keychain::redact(v);
            }
            Ok(matches(v, f))
        })?,
        _ => vec![],
    };
    let mut items = items;
    if !can_write {
        items.iter_mut().for_each(keychain::redact);
    }
    if needs_private {
        for e in &mut items {
            app.keychain_fill_private(e, &cached)?;
        }
    }
    let mut out = query(&items, &p, "keychaincredential_query")?;
    if can_write && !needs_private {
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
    redact_if_readonly(&ctx, out)
}

pub(super) async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_get_instance.id")?;
    let e = ctx.app.keychain_get(id)?;
    redact_if_readonly(&ctx, e)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateIn {
    name: Str,
    #[serde(rename = "type")]
    kind: CredType,
    attributes: Value,
}

#[derive(Deserialize, Clone, Copy)]
#[allow(clippy::upper_case_acronyms, non_camel_case_types)]
pub(super) enum CredType {
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

pub(super) async fn create(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let c: CreateIn = p.req(0, CREATE)?;
    ctx.describe(format!("Create Keychain Credential: {}", &*c.name));
    let attrs = decode_attributes(c.kind.as_str(), c.attributes, CREATE)?;
    ctx.app.keychain_create(&c.name, attrs, CREATE).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateIn {
    #[serde(default)]
    name: Option<Str>,
    #[serde(default)]
    attributes: Option<Value>,
}

pub(super) async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, &format!("{UPDATE}.id"))?;
    let u: UpdateIn = p.req(1, UPDATE)?;
    let current = ctx.app.keychain_get(id)?;
    ctx.describe(format!("Update Keychain Credential: {}", current["name"].as_str().unwrap_or("")));
    let kind = current["type"].as_str().unwrap_or(SSH_KEY_PAIR).to_string();
    let attrs = u.attributes.map(|a| decode_attributes(&kind, a, UPDATE)).transpose()?;
    ctx.app.keychain_update(id, u.name.as_deref(), attrs, UPDATE).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteOptions {
    #[serde(default)]
    cascade: bool,
}

pub(super) async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_delete.id")?;
    let o: DeleteOptions = p.opt(1, "options")?;
    if let Ok(e) = ctx.app.keychain_get(id) {
        ctx.describe(format!("Delete Keychain Credential: {}", e["name"].as_str().unwrap_or("")));
    }
    ctx.app.keychain_delete(id, o.cascade)?;
    Ok(Value::Null)
}

pub(super) async fn used_by(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_used_by.id")?;
    let deps = ctx.app.keychain_used_by(id)?;
    Ok(Value::Array(deps.into_iter().map(|d| json!({"title": d.title, "unbind_method": d.unbind_method})).collect()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct GenerateIn {
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

pub(super) async fn generate_ssh_key_pair(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_credential_generate_ssh_key_pair";
    let g: GenerateIn = p.opt(0, S)?;
    let opts = generate_options(
        &GenerateArgs { key_type: g.key_type.map(|s| s.0), size: g.size, comment: g.comment.map(|s| s.0) },
        S,
    )?;
    let kp = ctx.app.generate_key_pair(opts).await?;
    Ok(json!({"private_key": kp.private_key.as_str(), "public_key": kp.public_key}))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct DownloadIn {
    #[serde(default)]
    passphrase: Option<Secret>,
}

/// keyhaven extension for the CLI: a key pair's private key as a file
/// (optionally passphrase-encrypted), audited like an HTTP download.
pub(super) async fn download_private_key(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychaincredential_download_private_key";
    let id: i64 = p.req(0, &format!("{S}.id"))?;
    let o: DownloadIn = p.opt(1, &format!("{S}.options"))?;
    let e = ctx.app.keychain_get(id)?;
    let name = e["name"].as_str().unwrap_or("key").to_string();
    ctx.describe(format!(
        "Download private key: {name}{}",
        if o.passphrase.is_some() { " (passphrase-protected)" } else { "" }
    ));
    if e["type"] != SSH_KEY_PAIR {
        return Err(ServiceError::field(format!("{S}.id"), format!("Credential {id} is not an SSH key pair")));
    }
    let pk = ctx
        .app
        .keypair_private_key(id)?
        .ok_or_else(|| ServiceError::field(format!("{S}.id"), "This key pair has no private key (public key only)"))?;
    let text = match o.passphrase {
        None => pk,
        Some(pass) => {
            let pass = pass.expose().to_string();
            tokio::task::spawn_blocking(move || keyhaven_core::keys::encrypt_private_key(&pk, &pass))
                .await
                .map_err(|e| ServiceError::internal("key encryption", e))?
                .map_err(|e| ServiceError::internal("key encryption", e))?
        }
    };
    let alg: KeyAlgorithm = e["algorithm"].as_str().and_then(|a| a.parse().ok()).unwrap_or_default();
    Ok(json!({"file_name": keyhaven_core::keys::download_file_name(&name, alg, false), "private_key": text.as_str()}))
}
