//! `keychaincredential.*`: SSH key pairs and SSH connections (reference §2–3).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{decode, Secret, SecretText, Str};
use super::{query, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use crate::service::keychain::{self, AttributesInput, ConnectionInput, KeyPairInput, SSH_CREDENTIALS, SSH_KEY_PAIR};
use crate::service::pairing;
use keyhaven_core::keys::{GenerateOptions, KeyAlgorithm};
use keyhaven_core::net::{ConnectTimeout, Port};

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("keychaincredential.query", Read, query_m, 2, heavy),
        method!("keychaincredential.get_instance", Read, get_instance, 2),
        method!("keychaincredential.create", Write, create, 1),
        method!("keychaincredential.update", Write, update, 2),
        method!("keychaincredential.delete", Write, delete, 2),
        method!("keychaincredential.used_by", Read, used_by, 1),
        method!("keychaincredential.generate_ssh_key_pair", Write, generate_ssh_key_pair, 1),
        method!("keychaincredential.download_private_key", Write, download_private_key, 2),
        method!("keychaincredential.remote_ssh_host_key_scan", Write, remote_ssh_host_key_scan, 1),
        method!(
            "keychaincredential.remote_ssh_host_key_scan_fingerprints",
            Write,
            remote_ssh_host_key_scan_fingerprints,
            1
        ),
        method!("keychaincredential.test_ssh_connection", Write, test_ssh_connection, 2),
        method!("keychaincredential.ssh_connection_status", Read, ssh_connection_status, 2, heavy),
        method!("keychaincredential.ssh_pair", Write, ssh_pair, 1),
        method!("keychaincredential.remote_ssh_semiautomatic_setup", Write, remote_ssh_semiautomatic_setup, 1),
        method!("keychaincredential.setup_ssh_connection", Write, setup_ssh_connection, 1),
        method!("keychaincredential.re_pair_ssh_connection", Write, re_pair_ssh_connection, 2),
    ]
}

const CREATE: &str = "keychain_credential_create";
const UPDATE: &str = "keychain_credentials_update";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPairAttrs {
    #[serde(default)]
    private_key: Option<SecretText>,
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
            private_key: a.private_key.map(|s| s.0),
            public_key: a.public_key,
            passphrase: a.passphrase.map(|s| s.0),
        }))
    } else {
        let a: ConnAttrs = decode(v, &prefix)?;
        let mut errs = keyhaven_core::ValidationErrors::new();
        for (field, value) in [("host", &*a.host), ("username", &*a.username)] {
            if let Err(e) = keyhaven_core::text::check_single_line(value) {
                errs.add(format!("{prefix}.{field}"), e.to_string());
            }
        }
        errs.check()?;
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

/// The entry a top-level `["name", "=", s]` or `["id", "=", n]` filter pins
/// down, if any: the list is an AND, so no other entry can match.
fn pinned_id(cached: &keychain::Cached, filters: Option<&Value>) -> Option<Option<i64>> {
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

async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
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

async fn get_instance(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
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
    let c: CreateIn = p.req(0, CREATE)?;
    ctx.describe(format!("Create Keychain Credential: {}", &*c.name));
    let attrs = decode_attributes(c.kind.as_str(), c.attributes, CREATE)?;
    ctx.app.keychain_create(&c.name, attrs, CREATE).await
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
struct DeleteOptions {
    #[serde(default)]
    cascade: bool,
}

async fn delete(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id: i64 = p.req(0, "keychaincredential_delete.id")?;
    let o: DeleteOptions = p.opt(1, "options")?;
    if let Ok(e) = ctx.app.keychain_get(id) {
        ctx.describe(format!("Delete Keychain Credential: {}", e["name"].as_str().unwrap_or("")));
    }
    ctx.app.keychain_delete(id, o.cascade)?;
    Ok(Value::Null)
}

async fn used_by(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
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
    let g: GenerateIn = p.opt(0, S)?;
    let opts = generate_options(
        &GenerateArgs { key_type: g.key_type.map(|s| s.0), size: g.size, comment: g.comment.map(|s| s.0) },
        S,
    )?;
    let kp = ctx.app.generate_key_pair(opts).await?;
    Ok(json!({"private_key": kp.private_key.as_str(), "public_key": kp.public_key}))
}

// ------------------------------------------------------------------ pairing

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanIn {
    host: Str,
    #[serde(default = "default_port")]
    port: i64,
    #[serde(default = "default_timeout")]
    connect_timeout: i64,
}

async fn scan(p: &Params) -> Result<Vec<keyhaven_ssh::client::ScannedKey>, ServiceError> {
    const S: &str = "keychain_remote_ssh_host_key_scan";
    let a: ScanIn = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if a.host.trim().is_empty() {
        errs.add(format!("{S}.host"), "String should have at least 1 character");
    }
    let port = errs.take(format!("{S}.port"), Port::new(a.port));
    let timeout = errs.take(format!("{S}.connect_timeout"), ConnectTimeout::new(a.connect_timeout));
    let (Some(port), Some(timeout)) = (port, timeout) else { return Err(errs.into()) };
    errs.check()?;
    pairing::host_key_scan(a.host.trim(), port.get(), timeout.duration()).await
}

async fn remote_ssh_host_key_scan(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let keys = scan(&p).await?;
    if let Some(h) = p.raw(0).and_then(|v| v.get("host")).and_then(Value::as_str) {
        ctx.describe(format!("Discover remote host key: {h}"));
    }
    Ok(json!(keys.iter().map(|k| k.line()).collect::<Vec<_>>().join("\n")))
}

async fn remote_ssh_host_key_scan_fingerprints(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let keys = scan(&p).await?;
    if let Some(h) = p.raw(0).and_then(|v| v.get("host")).and_then(Value::as_str) {
        ctx.describe(format!("Discover remote host key: {h}"));
    }
    Ok(Value::Array(
        keys.iter()
            .map(|k| json!({"type": k.key_type, "public_key": k.line(), "fingerprint": k.fingerprint}))
            .collect(),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TestIn {
    #[serde(default)]
    timeout: Option<u64>,
    /// Log in with this key pair instead of the connection's: try a new key
    /// before switching to it (manual key rotation).
    #[serde(default)]
    private_key: Option<i64>,
}

async fn test_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_test_ssh_connection";
    let id: i64 = p.req(0, &format!("{S}.id"))?;
    let o: TestIn = p.opt(1, &format!("{S}.options"))?;
    if let Some(t) = o.timeout {
        ConnectTimeout::new(i64::try_from(t).unwrap_or(i64::MAX))
            .map_err(|m| ServiceError::field(format!("{S}.options.timeout"), m))?;
    }
    ctx.app.test_ssh_connection_with(id, o.timeout, o.private_key, &format!("{S}.options.private_key")).await
}

/// keyhaven extension: each tested connection's last test, filtered and
/// ordered like any TrueNAS query (`[{id, ok, stage, error, latency_ms, tested_at}]`).
async fn ssh_connection_status(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let mut all = ctx.app.ssh_connection_status()?;
    // Error texts name hosts and users, which read-only admins do not see
    // (connection attributes are redacted for them).
    if !ctx.caller()?.role.can_write() {
        for t in &mut all {
            if !t["error"].is_null() {
                t["error"] = json!(keychain::REDACTED);
            }
        }
    }
    query(&all, &p, "keychaincredential.ssh_connection_status")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairIn {
    remote_hostname: Str,
    #[serde(default = "default_user")]
    username: Str,
    public_key: String,
}

async fn ssh_pair(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_ssh_pair";
    let a: PairIn = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if a.remote_hostname.trim().is_empty() {
        errs.add(format!("{S}.remote_hostname"), "String should have at least 1 character");
    }
    if a.username.trim().is_empty() {
        errs.add(format!("{S}.username"), "String should have at least 1 character");
    }
    if a.public_key.trim().is_empty() {
        errs.add(format!("{S}.public_key"), "String should have at least 1 character");
    }
    errs.check()?;
    ctx.session.pairing_may_use(&a.username)?;
    ctx.describe(format!("SSH pair: authorize a key for {}", &*a.username));
    ctx.app.ssh_pair(a.remote_hostname.trim(), &a.username, &a.public_key, S).await
}

/// Add an error on `attribute` if a credential name is not one line of
/// printable text (the rule keychain_create applies; checked up front so a
/// pairing fails before it changes the remote).
fn name_line(name: &str, attribute: &str, errs: &mut keyhaven_core::ValidationErrors) {
    if let Err(e) = keyhaven_core::text::check_single_line(name) {
        errs.add(attribute, e.to_string());
    }
}

fn default_true() -> bool {
    true
}

/// The semi-automatic arguments shared by both setup methods (minus name/key).
macro_rules! semi_struct {
    ($name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($field: $ty,)*
            url: String,
            #[serde(default = "default_true")]
            verify_ssl: bool,
            #[serde(default)]
            token: Option<Secret>,
            #[serde(default = "default_user")]
            admin_username: Str,
            #[serde(default)]
            password: Option<Secret>,
            #[serde(default)]
            otp_token: Option<Secret>,
            #[serde(default = "default_user")]
            username: Str,
            #[serde(default = "default_timeout")]
            connect_timeout: i64,
            #[serde(default)]
            sudo: bool,
            /// keyhaven extension: trust exactly the certificate with this
            /// SHA-256 fingerprint (a self-signed one the admin checked).
            #[serde(default)]
            tls_fingerprint: Option<String>,
            /// keyhaven extension: pair over plain http:// although the
            /// remote's admin password or token then crosses the network in
            /// clear text (refused unless set).
            #[serde(default)]
            allow_insecure_http: bool,
        }

        impl $name {
            fn semi(self, schema: &str) -> Result<pairing::SemiAutomatic, ServiceError> {
                check_semi(&self.url, &self.username, self.connect_timeout, schema)?;
                if self.url.trim().to_ascii_lowercase().starts_with("http://") && !self.allow_insecure_http {
                    return Err(ServiceError::field(
                        format!("{schema}.url"),
                        "http:// would send the remote admin password or token unencrypted: use https:// \
                         (a self-signed certificate can be pinned with tls_fingerprint), or set \
                         allow_insecure_http to accept that on a network you trust",
                    ));
                }
                let tls_pin = match self.tls_fingerprint.as_deref().filter(|f| !f.trim().is_empty()) {
                    None => None,
                    Some(_) if !self.url.trim().starts_with("https://") => {
                        return Err(ServiceError::field(
                            format!("{schema}.tls_fingerprint"),
                            "A certificate can only be pinned for an https:// URL (http:// has no certificate, \
                             and would send the credentials in clear text)",
                        ))
                    }
                    Some(f) => Some(crate::remote::parse_cert_fingerprint(f).ok_or_else(|| {
                        ServiceError::field(
                            format!("{schema}.tls_fingerprint"),
                            "Give the certificate's SHA-256 fingerprint: 64 hexadecimal digits, colons allowed \
                             (openssl x509 -noout -fingerprint -sha256 prints it)",
                        )
                    })?),
                };
                Ok(pairing::SemiAutomatic {
                    url: self.url.trim().to_string(),
                    verify_ssl: self.verify_ssl,
                    tls_pin,
                    token: self.token.map(|s| s.0),
                    admin_username: self.admin_username.0,
                    password: self.password.map(|s| s.0),
                    otp_token: self.otp_token.map(|s| s.0),
                    username: self.username.0,
                    connect_timeout: self.connect_timeout,
                    sudo: self.sudo,
                })
            }
        }
    };
}

semi_struct!(SemiFullIn { name: Str, private_key: i64 });
semi_struct!(SemiIn {});

fn check_semi(url: &str, username: &str, connect_timeout: i64, schema: &str) -> Result<(), ServiceError> {
    let mut errs = keyhaven_core::ValidationErrors::new();
    let u = url.trim();
    if u.chars().count() > 2083 {
        errs.add(format!("{schema}.url"), "URL should have at most 2083 characters");
    } else if !(u.starts_with("http://") || u.starts_with("https://")) || pairing::url_host(u).is_empty() {
        errs.add(format!("{schema}.url"), "Input should be a valid URL: http:// or https:// followed by a host");
    }
    if username.trim().is_empty() {
        errs.add(format!("{schema}.username"), "String should have at least 1 character");
    }
    errs.take(format!("{schema}.connect_timeout"), ConnectTimeout::new(connect_timeout));
    errs.check()?;
    Ok(())
}

async fn remote_ssh_semiautomatic_setup(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_remote_ssh_semiautomatic_setup";
    let a: SemiFullIn = p.req(0, S)?;
    if a.name.trim().is_empty() {
        return Err(ServiceError::field(format!("{S}.name"), "String should have at least 1 character"));
    }
    // Checked here, before the remote is changed, although keychain_create checks it again.
    let mut errs = keyhaven_core::ValidationErrors::new();
    name_line(&a.name, &format!("{S}.name"), &mut errs);
    errs.check()?;
    ctx.describe(format!("SSH Semi-automatic Setup: {}", &*a.name));
    let (name, key) = (a.name.0.clone(), a.private_key);
    let semi = a.semi(S)?;
    ctx.app.remote_semiautomatic_setup(&name, key, &semi).await
}

/// A validation error joins `errs` (so one reply lists every problem); any other error ends the call.
fn gather<T>(
    r: Result<T, ServiceError>,
    errs: &mut keyhaven_core::ValidationErrors,
) -> Result<Option<T>, ServiceError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ServiceError::Validation(v)) => {
            errs.0.extend(v.0);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Options of a key pair generated while pairing, checked before anything
/// happens; problems join `errs` under `prefix` (`….key_type`, `….size`).
fn pairing_key_options(
    key_type: Option<Str>,
    size: Option<u32>,
    prefix: &str,
    errs: &mut keyhaven_core::ValidationErrors,
) -> Option<GenerateOptions> {
    let args = GenerateArgs { key_type: key_type.map(|s| s.0), size, comment: None };
    let o = match generate_options(&args, prefix) {
        Ok(o) => o,
        Err(ServiceError::Validation(v)) => {
            errs.0.extend(v.0);
            return None;
        }
        Err(e) => {
            errs.add(prefix, e.to_string());
            return None;
        }
    };
    match keyhaven_core::keys::validate_generate_options(&o) {
        Ok(_) => Some(o),
        Err(e) => {
            errs.push(e.prefixed(prefix));
            None
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateKeyChoice {
    #[serde(default = "default_true")]
    generate_key: bool,
    #[serde(default)]
    name: Option<Str>,
    #[serde(default)]
    existing_key_id: Option<i64>,
    /// keyhaven extension: the generated key's type (`ED25519` default, `ECDSA`, `RSA`) and size.
    #[serde(default)]
    key_type: Option<Str>,
    #[serde(default)]
    size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManualIn {
    host: Str,
    #[serde(default = "default_port")]
    port: i64,
    #[serde(default = "default_user")]
    username: Str,
    remote_host_key: String,
    #[serde(default = "default_timeout")]
    connect_timeout: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetupIn {
    connection_name: Str,
    #[serde(default)]
    setup_type: Option<Str>,
    private_key: PrivateKeyChoice,
    #[serde(default)]
    manual_setup: Option<ManualIn>,
    #[serde(default)]
    semi_automatic_setup: Option<SemiIn>,
}

async fn setup_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "setup_ssh_connection";
    let a: SetupIn = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if a.connection_name.trim().is_empty() {
        errs.add(format!("{S}.connection_name"), "String should have at least 1 character");
    }
    name_line(&a.connection_name, &format!("{S}.connection_name"), &mut errs);
    let pk = a.private_key;
    let gen_opts = if pk.generate_key {
        pairing_key_options(pk.key_type, pk.size, &format!("{S}.private_key"), &mut errs)
    } else {
        for (set, field) in [(pk.key_type.is_some(), "key_type"), (pk.size.is_some(), "size")] {
            if set {
                errs.add(
                    format!("{S}.private_key.{field}"),
                    "Extra inputs are not permitted when generate_key is false",
                );
            }
        }
        None
    };
    if let Some(n) = &pk.name {
        name_line(n, &format!("{S}.private_key.name"), &mut errs);
    }
    let key = match (pk.generate_key, pk.name, pk.existing_key_id) {
        (true, Some(n), None) if !n.trim().is_empty() => {
            gen_opts.map(|options| pairing::KeyChoice::Generate { name: n.0, options })
        }
        (true, _, Some(_)) => {
            errs.add(
                format!("{S}.private_key.existing_key_id"),
                "Extra inputs are not permitted when generate_key is true",
            );
            None
        }
        (true, _, None) => {
            errs.add(format!("{S}.private_key.name"), "Field required: the name of the key pair to generate");
            None
        }
        (false, None, Some(id)) => Some(pairing::KeyChoice::Existing(id)),
        (false, Some(_), _) => {
            errs.add(format!("{S}.private_key.name"), "Extra inputs are not permitted when generate_key is false");
            None
        }
        (false, None, None) => {
            errs.add(format!("{S}.private_key.existing_key_id"), "Field required");
            None
        }
    };
    let setup_type = a.setup_type.as_deref().unwrap_or("MANUAL").to_string();
    let kind = match (setup_type.as_str(), a.manual_setup, a.semi_automatic_setup) {
        ("MANUAL", Some(m), None) => Some(pairing::SetupKind::Manual(pairing::Manual {
            host: m.host.0,
            port: m.port,
            username: m.username.0,
            remote_host_key: m.remote_host_key,
            connect_timeout: m.connect_timeout,
        })),
        ("SEMI-AUTOMATIC", None, Some(s)) => {
            gather(s.semi(&format!("{S}.semi_automatic_setup")), &mut errs)?.map(pairing::SetupKind::SemiAutomatic)
        }
        ("MANUAL", None, _) => {
            errs.add(format!("{S}.manual_setup"), "Field required");
            None
        }
        ("MANUAL", Some(_), Some(_)) => {
            errs.add(format!("{S}.semi_automatic_setup"), "Extra inputs are not permitted with setup_type MANUAL");
            None
        }
        ("SEMI-AUTOMATIC", _, None) => {
            errs.add(format!("{S}.semi_automatic_setup"), "Field required");
            None
        }
        ("SEMI-AUTOMATIC", Some(_), Some(_)) => {
            errs.add(format!("{S}.manual_setup"), "Extra inputs are not permitted with setup_type SEMI-AUTOMATIC");
            None
        }
        _ => {
            errs.add(format!("{S}.setup_type"), "Input should be 'MANUAL' or 'SEMI-AUTOMATIC'");
            None
        }
    };
    errs.check()?;
    let (Some(key), Some(kind)) = (key, kind) else {
        return Err(ServiceError::internal("setup_ssh_connection", "arguments not decoded"));
    };
    ctx.describe(format!("Setup SSH Connection: {}", &*a.connection_name));
    ctx.app.setup_ssh_connection(&a.connection_name, key, kind).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DownloadIn {
    #[serde(default)]
    passphrase: Option<Secret>,
}

/// keyhaven extension for the CLI: a key pair's private key as a file
/// (optionally passphrase-encrypted), audited like an HTTP download.
async fn download_private_key(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyIn {
    name: Str,
    #[serde(default)]
    key_type: Option<Str>,
    #[serde(default)]
    size: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RePairIn {
    semi_automatic_setup: SemiIn,
    #[serde(default)]
    new_key: Option<NewKeyIn>,
    #[serde(default = "default_true")]
    remove_old_key: bool,
}

/// keyhaven extension: pair an existing connection again through the remote's
/// API (new host keys, key installed again), optionally rotating its key pair.
async fn re_pair_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_re_pair_ssh_connection";
    let id: i64 = p.req(0, &format!("{S}.id"))?;
    let a: RePairIn = p.req(1, &format!("{S}.options"))?;
    let name = ctx.app.keychain_get(id)?["name"].as_str().unwrap_or_default().to_string();
    ctx.describe(format!("Re-pair SSH Connection: {name}{}", if a.new_key.is_some() { " (new key pair)" } else { "" }));
    let mut errs = keyhaven_core::ValidationErrors::new();
    let new_key = match a.new_key {
        None => None,
        Some(k) => {
            if k.name.trim().is_empty() {
                errs.add(format!("{S}.new_key.name"), "String should have at least 1 character");
            }
            name_line(&k.name, &format!("{S}.new_key.name"), &mut errs);
            pairing_key_options(k.key_type, k.size, &format!("{S}.new_key"), &mut errs).map(|o| (k.name.0, o))
        }
    };
    let semi = gather(a.semi_automatic_setup.semi(&format!("{S}.semi_automatic_setup")), &mut errs)?;
    errs.check()?;
    let Some(semi) = semi else {
        return Err(ServiceError::internal("re_pair_ssh_connection", "arguments not decoded"));
    };
    let out = ctx.app.re_pair_ssh_connection(id, &semi, new_key, a.remove_old_key).await?;
    Ok(json!({
        "connection": out.connection,
        "old_key_pair": out.old_key_pair,
        "old_key_removed_from_remote": out.old_key_removed_from_remote,
        "old_key_kept_because": out.old_key_kept_because,
    }))
}
