//! Pairing with another system: `ssh_pair` (the remote side), semi-automatic and manual setup, and
//! re-pairing with key rotation.

use super::*;

pub(super) async fn ssh_pair(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_ssh_pair";
    let a: pairing::PairInput = p.req(0, S)?;
    a.check().map_err(|e| e.in_schema(S))?;
    ctx.session.pairing_may_use(&a.username)?;
    ctx.describe(format!("SSH pair: authorize a key for {}", a.username));
    let key = a.authorized_key().map_err(|e| e.in_schema(S))?;
    // Not placed in this method's schema: ssh_pair's own errors name other schemas.
    to_json(&ctx.app.pairing().pair(a.remote_hostname.trim(), &a.username, &key).await?)
}

/// Add an error on `attribute` if a credential name is not one line of
/// printable text (the rule keychain_create applies; checked up front so a
/// pairing fails before it changes the remote).
pub(super) fn name_line(name: &str, attribute: &str, errs: &mut keyhaven_core::ValidationErrors) {
    if let Err(e) = keyhaven_core::text::check_single_line(name) {
        errs.add(attribute, e.to_string());
    }
}

pub(super) fn default_true() -> bool {
    true
}

/// The semi-automatic arguments: `setup_ssh_connection`'s
/// `semi_automatic_setup` and `re_pair_ssh_connection`'s, and
/// `remote_ssh_semiautomatic_setup`'s argument besides the name and key pair.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SemiIn {
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

impl SemiIn {
    /// The checked arguments; errors are named relative to this block (`url`).
    fn semi(self) -> Result<pairing::SemiAutomatic, ServiceError> {
        check_semi(&self.url, &self.username, self.connect_timeout)?;
        if self.url.trim().to_ascii_lowercase().starts_with("http://") && !self.allow_insecure_http {
            return Err(ServiceError::field(
                "url",
                "http:// would send the remote admin password or token unencrypted: use https:// \
                 (a self-signed certificate can be pinned with tls_fingerprint), or set \
                 allow_insecure_http to accept that on a network you trust",
            ));
        }
        let tls_pin = match self.tls_fingerprint.as_deref().filter(|f| !f.trim().is_empty()) {
            None => None,
            Some(_) if !self.url.trim().starts_with("https://") => {
                return Err(ServiceError::field(
                    "tls_fingerprint",
                    "A certificate can only be pinned for an https:// URL (http:// has no certificate, \
                     and would send the credentials in clear text)",
                ))
            }
            Some(f) => Some(crate::remote::parse_cert_fingerprint(f).ok_or_else(|| {
                ServiceError::field(
                    "tls_fingerprint",
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

/// `remote_ssh_semiautomatic_setup`'s own fields besides [`SemiIn`]'s.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SemiTargetIn {
    name: Str,
    private_key: i64,
}

/// Split `remote_ssh_semiautomatic_setup`'s argument into its own fields and
/// [`SemiIn`], each decoded strictly with its errors named by field (a
/// `#[serde(flatten)]` would report a type error of any [`SemiIn`] field at
/// the argument itself).
fn decode_semi_full(p: &Params, schema: &str) -> Result<(SemiTargetIn, SemiIn), ServiceError> {
    let all: serde_json::Map<String, Value> = p.req(0, schema)?;
    let (own, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) =
        all.into_iter().partition(|(k, _)| k == "name" || k == "private_key");
    let mut errs = keyhaven_core::ValidationErrors::new();
    let own = gather(decode::<SemiTargetIn>(Value::Object(own), schema), &mut errs, "")?;
    let semi = gather(decode::<SemiIn>(Value::Object(rest), schema), &mut errs, "")?;
    errs.check()?;
    match (own, semi) {
        (Some(own), Some(semi)) => Ok((own, semi)),
        _ => Err(ServiceError::internal(schema, "arguments not decoded")),
    }
}

pub(super) fn check_semi(url: &str, username: &str, connect_timeout: i64) -> Result<(), ServiceError> {
    let mut errs = keyhaven_core::ValidationErrors::new();
    let u = url.trim();
    if u.chars().count() > 2083 {
        errs.add("url", "URL should have at most 2083 characters");
    } else if !(u.starts_with("http://") || u.starts_with("https://")) || pairing::url_host(u).is_empty() {
        errs.add("url", "Input should be a valid URL: http:// or https:// followed by a host");
    }
    if username.trim().is_empty() {
        errs.add("username", "String should have at least 1 character");
    }
    errs.take("connect_timeout", ConnectTimeout::new(connect_timeout));
    errs.check()?;
    Ok(())
}

pub(super) async fn remote_ssh_semiautomatic_setup(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_remote_ssh_semiautomatic_setup";
    let (own, semi) = decode_semi_full(&p, S)?;
    if own.name.trim().is_empty() {
        return Err(ServiceError::field(format!("{S}.name"), "String should have at least 1 character"));
    }
    // Checked here, before the remote is changed, although keychain_create checks it again.
    let mut errs = keyhaven_core::ValidationErrors::new();
    name_line(&own.name, &format!("{S}.name"), &mut errs);
    errs.check()?;
    ctx.describe(format!("SSH Semi-automatic Setup: {}", &*own.name));
    let semi = semi.semi().map_err(|e| e.in_schema(S))?;
    to_json(&ctx.app.pairing().semiautomatic_setup(&own.name, own.private_key, &semi).await?)
}

/// A validation error joins `errs` under `prefix` (so one reply lists every
/// problem); any other error ends the call.
pub(super) fn gather<T>(
    r: Result<T, ServiceError>,
    errs: &mut keyhaven_core::ValidationErrors,
    prefix: &str,
) -> Result<Option<T>, ServiceError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ServiceError::Validation(v)) => Ok(errs.take_all(prefix, Err(v))),
        Err(e) => Err(e),
    }
}

/// Options of a key pair generated while pairing, checked before anything
/// happens; problems join `errs` under `prefix` (`….key_type`, `….size`).
pub(super) fn pairing_key_options(
    o: &KeyOptionsIn,
    prefix: &str,
    errs: &mut keyhaven_core::ValidationErrors,
) -> Option<GenerateOptions> {
    let o = match generate_options(o, None) {
        Ok(o) => o,
        Err(ServiceError::Validation(v)) => {
            errs.take_all(prefix, Err::<(), _>(v));
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
pub(super) struct PrivateKeyChoice {
    #[serde(default = "default_true")]
    generate_key: bool,
    #[serde(default)]
    name: Option<Str>,
    #[serde(default)]
    existing_key_id: Option<i64>,
    /// keyhaven extension: the generated key's type (`ED25519` default, `ECDSA`, `RSA`) and size.
    #[serde(flatten)]
    options: KeyOptionsIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ManualIn {
    #[serde(flatten)]
    endpoint: SshEndpoint,
    #[serde(default = "default_user")]
    username: Str,
    remote_host_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetupIn {
    connection_name: Str,
    #[serde(default)]
    setup_type: Option<Str>,
    private_key: PrivateKeyChoice,
    #[serde(default)]
    manual_setup: Option<ManualIn>,
    #[serde(default)]
    semi_automatic_setup: Option<SemiIn>,
}

pub(super) async fn setup_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "setup_ssh_connection";
    let a: SetupIn = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if a.connection_name.trim().is_empty() {
        errs.add(format!("{S}.connection_name"), "String should have at least 1 character");
    }
    name_line(&a.connection_name, &format!("{S}.connection_name"), &mut errs);
    let pk = a.private_key;
    let gen_opts = if pk.generate_key {
        pairing_key_options(&pk.options, &format!("{S}.private_key"), &mut errs)
    } else {
        for (set, field) in [(pk.options.key_type.is_some(), "key_type"), (pk.options.size.is_some(), "size")] {
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
            endpoint: m.endpoint,
            username: m.username.0,
            remote_host_key: m.remote_host_key,
        })),
        ("SEMI-AUTOMATIC", None, Some(s)) => {
            gather(s.semi(), &mut errs, &format!("{S}.semi_automatic_setup"))?.map(pairing::SetupKind::SemiAutomatic)
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
    to_json(&ctx.app.pairing().setup_connection(&a.connection_name, key, kind).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKeyIn {
    name: Str,
    #[serde(flatten)]
    options: KeyOptionsIn,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RePairIn {
    semi_automatic_setup: SemiIn,
    #[serde(default)]
    new_key: Option<NewKeyIn>,
    #[serde(default = "default_true")]
    remove_old_key: bool,
}

/// keyhaven extension: pair an existing connection again through the remote's
/// API (new host keys, key installed again), optionally rotating its key pair.
pub(super) async fn re_pair_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_re_pair_ssh_connection";
    let id: i64 = p.req(0, &format!("{S}.id"))?;
    let a: RePairIn = p.req(1, &format!("{S}.options"))?;
    let name = ctx.app.keychain().get(id)?.name().to_string();
    ctx.describe(format!("Re-pair SSH Connection: {name}{}", if a.new_key.is_some() { " (new key pair)" } else { "" }));
    let mut errs = keyhaven_core::ValidationErrors::new();
    let new_key = match a.new_key {
        None => None,
        Some(k) => {
            if k.name.trim().is_empty() {
                errs.add(format!("{S}.new_key.name"), "String should have at least 1 character");
            }
            name_line(&k.name, &format!("{S}.new_key.name"), &mut errs);
            pairing_key_options(&k.options, &format!("{S}.new_key"), &mut errs).map(|o| (k.name.0, o))
        }
    };
    let semi = gather(a.semi_automatic_setup.semi(), &mut errs, &format!("{S}.semi_automatic_setup"))?;
    errs.check()?;
    let Some(semi) = semi else {
        return Err(ServiceError::internal("re_pair_ssh_connection", "arguments not decoded"));
    };
    let out = ctx.app.pairing().re_pair(id, &semi, new_key, a.remove_old_key).await?;
    Ok(json!({
        "connection": out.connection,
        "old_key_pair": out.old_key_pair,
        "old_key_removed_from_remote": out.old_key_removed_from_remote,
        "old_key_kept_because": out.old_key_kept_because,
    }))
}
