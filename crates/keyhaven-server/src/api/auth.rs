//! `auth.*`: TrueNAS's login mechanisms, tokens, `auth.me`, logout.

use std::sync::Arc;

use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::params::{decode, Secret, Str};
use super::{to_json, Ctx, MethodDef, Params};
use crate::error::{ServiceError, EBUSY};
use crate::method;
use crate::service::auth::{LoginOutcome, SessionAuth};

pub const MECHANISMS: &[&str] = &["PASSWORD_PLAIN", "API_KEY_PLAIN", "TOKEN_PLAIN", "OTP_TOKEN"];

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("auth.login_ex", Public, login_ex, 1),
        // TrueNAS's OTP continuation wrapper (pytruenas calls it after OTP_REQUIRED).
        method!("auth.login_ex_continue", Public, login_ex, 1),
        method!("auth.login", Public, login, 3),
        method!("auth.login_with_api_key", Public, login_with_api_key, 1),
        method!("auth.login_with_token", Public, login_with_token, 1),
        method!("auth.mechanism_choices", Public, mechanism_choices, 0),
        method!("auth.generate_token", Read, generate_token, 4),
        method!("auth.me", Read, me, 0),
        // Each account's own preferences: allowed to read-only admins too.
        method!("auth.set_attribute", Read, set_attribute, 2),
        method!("auth.logout", Read, logout, 0),
    ]
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct LoginOptions {
    user_info: Option<bool>,
    reconnect_token: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordPlain {
    #[allow(dead_code)]
    mechanism: Str,
    username: Str,
    password: Secret,
    #[serde(default)]
    login_options: LoginOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyPlain {
    #[allow(dead_code)]
    mechanism: Str,
    username: Str,
    api_key: Secret,
    #[serde(default)]
    login_options: LoginOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenPlain {
    #[allow(dead_code)]
    mechanism: Str,
    token: Secret,
    #[serde(default)]
    login_options: LoginOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OtpToken {
    #[allow(dead_code)]
    mechanism: Str,
    otp_token: Secret,
    #[serde(default)]
    login_options: LoginOptions,
}

fn response(ctx: &Ctx, outcome: LoginOutcome, opts: &LoginOptions) -> Result<Value, ServiceError> {
    Ok(match outcome {
        LoginOutcome::Success(caller) => {
            let user_info =
                if opts.user_info.unwrap_or(true) { to_json(&ctx.app.auth().me(&caller)?)? } else { Value::Null };
            let _ = opts.reconnect_token;
            json!({"response_type": "SUCCESS", "user_info": user_info, "authenticator": "LEVEL_1", "reconnect_token": null})
        }
        LoginOutcome::OtpRequired(username) => json!({"response_type": "OTP_REQUIRED", "username": username}),
        LoginOutcome::AuthErr => json!({"response_type": "AUTH_ERR"}),
        LoginOutcome::Denied => json!({"response_type": "DENIED"}),
        LoginOutcome::Busy(m) => return Err(ServiceError::call(EBUSY, m)),
    })
}

async fn login_ex(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "auth_login_ex.login_data";
    let data = p.raw(0).cloned().ok_or_else(|| ServiceError::field(S, "Field required"))?;
    let mechanism = match data.get("mechanism") {
        Some(Value::String(m)) if MECHANISMS.contains(&m.as_str()) => m.clone(),
        Some(Value::String(m)) => {
            return Err(ServiceError::field(
                format!("{S}.mechanism"),
                format!("Input should be {}; got '{}'", MECHANISMS.join(", "), m.chars().take(64).collect::<String>()),
            ))
        }
        Some(_) => return Err(ServiceError::field(format!("{S}.mechanism"), "Input should be a valid string")),
        None if data.is_object() => return Err(ServiceError::field(format!("{S}.mechanism"), "Field required")),
        None => return Err(ServiceError::field(S, "Input should be a valid dictionary")),
    };
    let app = &ctx.app;
    let session = &ctx.session;
    match mechanism.as_str() {
        "PASSWORD_PLAIN" => {
            let d: PasswordPlain = decode(data, S)?;
            let out = app.auth().login_password(session, &d.username, &d.password.0, None).await;
            response(&ctx, out, &d.login_options)
        }
        "API_KEY_PLAIN" => {
            let d: ApiKeyPlain = decode(data, S)?;
            let out = app.auth().login_api_key(session, Some(&d.username), &d.api_key.0).await;
            response(&ctx, out, &d.login_options)
        }
        "TOKEN_PLAIN" => {
            let d: TokenPlain = decode(data, S)?;
            let out = app.auth().login_token(session, &d.token.0).await;
            response(&ctx, out, &d.login_options)
        }
        _ => {
            let d: OtpToken = decode(data, S)?;
            let out = app.auth().login_otp(session, d.otp_token.expose()).await;
            response(&ctx, out, &d.login_options)
        }
    }
}

async fn login(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let username: Str = p.req(0, "auth_login.username")?;
    let password: Secret = p.req(1, "auth_login.password")?;
    let otp: Option<Secret> = p.opt(2, "auth_login.otp_token")?;
    let otp = otp.filter(|o| !o.expose().is_empty());
    let out =
        ctx.app.auth().login_password(&ctx.session, &username, &password.0, otp.as_ref().map(|o| o.expose())).await;
    match out {
        LoginOutcome::Busy(m) => Err(ServiceError::call(EBUSY, m)),
        LoginOutcome::Success(_) => Ok(json!(true)),
        LoginOutcome::OtpRequired(_) => {
            *ctx.session.auth.lock().unwrap_or_else(|p| p.into_inner()) = SessionAuth::Anonymous;
            Ok(json!(false))
        }
        _ => Ok(json!(false)),
    }
}

async fn login_with_api_key(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let key: Secret = p.req(0, "auth_login_with_api_key.api_key")?;
    let out = ctx.app.auth().login_api_key(&ctx.session, None, &key.0).await;
    bool_outcome(out)
}

async fn login_with_token(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let token: Secret = p.req(0, "auth_login_with_token.token")?;
    let out = ctx.app.auth().login_token(&ctx.session, &token.0).await;
    bool_outcome(out)
}

/// The legacy boolean answer of a login; a busy server is an error, not `false`.
fn bool_outcome(out: LoginOutcome) -> Result<Value, ServiceError> {
    match out {
        LoginOutcome::Busy(m) => Err(ServiceError::call(EBUSY, m)),
        other => Ok(json!(matches!(other, LoginOutcome::Success(_)))),
    }
}

async fn mechanism_choices(_: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    Ok(json!(MECHANISMS))
}

async fn generate_token(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let ttl: Option<i64> = p.opt(0, "auth_generate_token.ttl")?;
    let attrs: Option<serde_json::Map<String, Value>> = p.opt(1, "auth_generate_token.attrs")?;
    let match_origin: Option<bool> = p.opt(2, "auth_generate_token.match_origin")?;
    let single_use: Option<bool> = p.opt(3, "auth_generate_token.single_use")?;
    let caller = ctx.caller()?;
    let attrs = Value::Object(attrs.unwrap_or_default());
    let token = ctx.app.auth().generate_token(
        &caller,
        &ctx.session,
        ttl,
        &attrs,
        match_origin.unwrap_or(true),
        // keyhaven default: single-use (TrueNAS: reusable); pass false explicitly for a reusable token.
        single_use.unwrap_or(true),
    )?;
    Ok(json!(token.expose_secret()))
}

async fn me(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    to_json(&ctx.app.auth().me(&ctx.caller()?)?)
}

async fn set_attribute(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let key: Str = p.req(0, "auth_set_attribute.key")?;
    let value: Value = p.req(1, "auth_set_attribute.value")?;
    let caller = ctx.caller()?;
    ctx.app
        .accounts()
        .set_attribute(&caller.username, &key.0, value)
        .await
        .map_err(|e| e.in_schema("auth_set_attribute"))?;
    Ok(Value::Null)
}

async fn logout(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    ctx.app.auth().logout(&ctx.session);
    Ok(json!(true))
}
