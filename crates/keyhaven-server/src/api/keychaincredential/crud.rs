//! Reading and writing credentials: query, get, create, update, delete, used_by, key generation and
//! private-key downloads.

use super::*;

pub(super) async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let role = ctx.caller()?.role;
    ctx.app.keychain().query(role, p.raw(0), p.raw(1)).map_err(|e| e.in_schema("keychaincredential_query"))
}

pub(super) async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_get_instance.id")?;
    to_json(&ctx.app.keychain().get_as(id, ctx.caller()?.role)?)
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
    to_json(&ctx.app.keychain().create(&c.name, attrs).await.map_err(|e| e.in_schema(CREATE))?)
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
    let current = ctx.app.keychain().get(id)?;
    ctx.describe(format!("Update Keychain Credential: {}", current.name()));
    let kind = if current.is_key_pair() { SSH_KEY_PAIR } else { SSH_CREDENTIALS };
    let attrs = u.attributes.map(|a| decode_attributes(kind, a, UPDATE)).transpose()?;
    to_json(&ctx.app.keychain().update(id, u.name.as_deref(), attrs).await.map_err(|e| e.in_schema(UPDATE))?)
}

/// TrueNAS's private `get_of_type`: a credential only if it has the type the
/// caller needs (full admins: it carries the private key).
pub(super) async fn get_of_type(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_get_of_type.id")?;
    let kind: CredType = p.req(1, "keychaincredential_get_of_type.type")?;
    to_json(&ctx.app.keychain().get_of_type(id, kind.as_str())?)
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
    if let Ok(e) = ctx.app.keychain().get(id) {
        ctx.describe(format!("Delete Keychain Credential: {}", e.name()));
    }
    ctx.app.keychain().delete(id, o.cascade)?;
    Ok(Value::Null)
}

pub(super) async fn used_by(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_used_by.id")?;
    let deps = ctx.app.keychain().used_by(id)?;
    Ok(Value::Array(deps.into_iter().map(|d| json!({"title": d.title, "unbind_method": d.unbind_method})).collect()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct GenerateIn {
    #[serde(flatten)]
    options: KeyOptionsIn,
    #[serde(default)]
    comment: Option<Str>,
}

/// The generation options `o` asks for; errors are named relative to `o`
/// (`key_type`): the caller places them.
pub fn generate_options(o: &KeyOptionsIn, comment: Option<String>) -> Result<GenerateOptions, ServiceError> {
    let algorithm = match &o.key_type {
        None => KeyAlgorithm::Ed25519,
        Some(k) => keychain::parse_algorithm(k, "key_type")?,
    };
    Ok(GenerateOptions { algorithm, bits: o.size, comment })
}

pub(super) async fn generate_ssh_key_pair(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_credential_generate_ssh_key_pair";
    let g: GenerateIn = p.opt(0, S)?;
    let opts = generate_options(&g.options, g.comment.map(|s| s.0)).map_err(|e| e.in_schema(S))?;
    let kp = ctx.app.keychain().generate_key_pair(opts).await.map_err(|e| e.in_schema(S))?;
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
    let e = ctx.app.keychain().get(id)?;
    let name = e.name().to_string();
    ctx.describe(format!(
        "Download private key: {name}{}",
        if o.passphrase.is_some() { " (passphrase-protected)" } else { "" }
    ));
    let Some(kp) = e.key_pair() else {
        return Err(ServiceError::field(format!("{S}.id"), format!("Credential {id} is not an SSH key pair")));
    };
    let pk =
        ctx.app.keychain().private_key(id)?.ok_or_else(|| {
            ServiceError::field(format!("{S}.id"), "This key pair has no private key (public key only)")
        })?;
    let text = match o.passphrase {
        None => pk,
        Some(pass) => {
            let pass = zeroize::Zeroizing::new(pass.expose().to_string());
            tokio::task::spawn_blocking(move || keyhaven_core::keys::encrypt_private_key(&pk, &pass))
                .await
                .map_err(|e| ServiceError::internal("key encryption", e))?
                .map_err(|e| ServiceError::internal("key encryption", e))?
        }
    };
    let alg: KeyAlgorithm = kp.algorithm.as_deref().and_then(|a| a.parse().ok()).unwrap_or_default();
    Ok(json!({"file_name": keyhaven_core::keys::download_file_name(&name, alg, false), "private_key": text.as_str()}))
}
