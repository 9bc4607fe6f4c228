//! Authentication: passwords (Argon2id), API keys and tokens (random, stored as
//! SHA-256 hashes, compared in constant time), TOTP continuation, per-connection
//! sessions, and slowing then refusing repeated failed logins per user and per
//! source address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use rand::{Rng, RngCore};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::audit::{self, AuditEvent};
use super::{now_secs, users, App};
use crate::error::{ServiceError, ENOENT};

/// Failures after which every further attempt is delayed.
pub const SLOW_AFTER: u32 = 3;
/// Failures after which attempts are refused outright for [`LOCKOUT`].
pub const LOCK_AFTER: u32 = 10;
pub const LOCKOUT: Duration = Duration::from_secs(300);
/// Failures older than this are forgotten.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(900);
/// Wrong OTP codes tolerated on one connection before it must start over.
pub const MAX_OTP_TRIES: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    FullAdmin,
    ReadonlyAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::FullAdmin => "FULL_ADMIN",
            Role::ReadonlyAdmin => "READONLY_ADMIN",
        }
    }

    /// The account's effective API role from its `roles` list.
    pub fn from_roles(roles: &[String]) -> Option<Role> {
        if roles.iter().any(|r| r == "FULL_ADMIN") {
            Some(Role::FullAdmin)
        } else if roles.iter().any(|r| r == "READONLY_ADMIN") {
            Some(Role::ReadonlyAdmin)
        } else {
            None
        }
    }

    pub fn can_write(self) -> bool {
        self == Role::FullAdmin
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVia {
    Password,
    ApiKey,
    Token,
    UnixSocket,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub username: String,
    pub role: Role,
    pub via: AuthVia,
}

#[derive(Debug, Clone)]
pub enum SessionAuth {
    Anonymous,
    OtpPending { username: String, tries: u32 },
    Authenticated(Caller),
}

/// One client connection (WebSocket, unix socket or download request).
#[derive(Debug)]
pub struct Session {
    pub id: String,
    /// Source address (IP) of the connection, or `unix` for the local socket.
    pub address: String,
    /// Where a token minted on this connection may be used (`match_origin`).
    pub origin: String,
    pub auth: Mutex<SessionAuth>,
    /// Set for sessions opened with a token: they end once idle for longer
    /// than the token's lifetime (TrueNAS: "the token will be invalidated if
    /// the connection has been inactive for a time period exceeding" its ttl).
    idle: Mutex<Option<IdleExpiry>>,
}

#[derive(Debug, Clone, Copy)]
struct IdleExpiry {
    ttl: Duration,
    last_used: Instant,
}

impl Session {
    pub fn new(address: String) -> Session {
        let mut id = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut id);
        Session {
            id: hex::encode(id),
            origin: address.clone(),
            address,
            auth: Mutex::new(SessionAuth::Anonymous),
            idle: Mutex::new(None),
        }
    }

    /// A session for the local unix socket: full admin, like TrueNAS's `midclt`.
    pub fn local_root() -> Session {
        let s = Session::new("unix".into());
        *s.auth.lock().unwrap() = SessionAuth::Authenticated(Caller {
            username: "root".into(),
            role: Role::FullAdmin,
            via: AuthVia::UnixSocket,
        });
        s
    }

    pub fn caller(&self) -> Option<Caller> {
        match &*self.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            SessionAuth::Authenticated(c) => Some(c.clone()),
            _ => None,
        }
    }

    pub fn username(&self) -> Option<String> {
        match &*self.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            SessionAuth::Authenticated(c) => Some(c.username.clone()),
            SessionAuth::OtpPending { username, .. } => Some(username.clone()),
            SessionAuth::Anonymous => None,
        }
    }

    /// Whether pushed events may go to this session: logged in, and (for a
    /// token session) not idle past its lifetime. Events are not activity.
    pub fn receives_events(&self) -> bool {
        let idle_ok = match *self.idle.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(i) => i.last_used.elapsed() <= i.ttl,
            None => true,
        };
        idle_ok && self.caller().is_some()
    }

    /// Change who the session is; any idle limit of the previous login ends with it.
    fn set(&self, a: SessionAuth) {
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = a;
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn set_idle_limit(&self, ttl: Duration) {
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(IdleExpiry { ttl, last_used: Instant::now() });
    }

    /// A call that just finished counts as activity too: a call longer than the
    /// idle limit must not leave a session that expires on the next one.
    pub fn touch_after_call(&self) {
        if let Some(i) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            i.last_used = Instant::now();
        }
    }

    /// For a session with an idle limit: `Err(ttl)` once it has been idle too
    /// long, otherwise counts this call as activity.
    fn touch(&self) -> Result<(), Duration> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        match idle.as_mut() {
            Some(i) if i.last_used.elapsed() > i.ttl => Err(i.ttl),
            Some(i) => {
                i.last_used = Instant::now();
                Ok(())
            }
            None => Ok(()),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Failures {
    count: u32,
    last: Option<Instant>,
    locked_until: Option<Instant>,
}

/// In-memory state of authentication (failure counters).
#[derive(Default)]
pub struct AuthState {
    failures: Mutex<HashMap<String, Failures>>,
}

enum Gate {
    Open,
    Slow(Duration),
    Locked,
}

impl AuthState {
    fn gate(&self, keys: &[String]) -> Gate {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut worst = 0u32;
        for k in keys {
            if let Some(f) = map.get_mut(k) {
                if f.locked_until.is_some_and(|t| t > now) {
                    return Gate::Locked;
                }
                if f.last.is_some_and(|l| now.duration_since(l) > FAILURE_WINDOW) || f.locked_until.is_some() {
                    *f = Failures::default();
                }
                worst = worst.max(f.count);
            }
        }
        if worst >= SLOW_AFTER {
            // 250 ms, 500 ms, 1 s, 2 s … capped at 4 s.
            let step = (worst - SLOW_AFTER).min(4);
            Gate::Slow(Duration::from_millis(250u64 << step))
        } else {
            Gate::Open
        }
    }

    fn record_failure(&self, keys: &[String]) -> bool {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut locked = false;
        for k in keys {
            let f = map.entry(k.clone()).or_default();
            f.count += 1;
            f.last = Some(now);
            if f.count >= LOCK_AFTER {
                f.locked_until = Some(now + LOCKOUT);
                locked = true;
            }
        }
        locked
    }

    /// A successful login clears the user's and the address's counters: the
    /// address has just proved it holds valid credentials.
    fn record_success(&self, username: &str, address: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&format!("user:{username}"));
        if map.get(&format!("addr:{address}")).is_some_and(|f| f.locked_until.is_none()) {
            map.remove(&format!("addr:{address}"));
        }
    }
}

fn limiter_keys(username: Option<&str>, address: &str) -> Vec<String> {
    let mut v = vec![format!("addr:{address}")];
    if let Some(u) = username {
        v.push(format!("user:{u}"));
    }
    v
}

/// What a login attempt came to (TrueNAS `response_type`).
#[derive(Debug)]
pub enum LoginOutcome {
    Success(Caller),
    OtpRequired(String),
    AuthErr,
    /// Valid credentials for an account without API access.
    Denied,
}

// ------------------------------------------------------------ hashing

/// Argon2id hash (PHC string) of a password. Slow by design: call from a blocking thread.
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("argon2 with default params and a 16-byte salt")
        .to_string()
}

fn verify_password(hash: &str, password: &str) -> bool {
    PasswordVerifier::<str>::verify_password(&Argon2::default(), password.as_bytes(), hash).is_ok()
}

/// A hash nobody can match, verified against when the account does not exist
/// so that timing does not reveal which usernames exist.
fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("keyhaven-dummy-password-never-matches"))
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A random string of `n` characters from [A-Za-z0-9].
pub fn random_alnum(n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    (0..n).map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char).collect()
}

/// Checks a TOTP code (RFC 6238, SHA-1, 6 digits, 30 s, ±1 step) against a base32 seed.
pub fn verify_totp(seed_b32: &str, code: &str) -> bool {
    let Ok(secret) = totp_rs::Secret::try_from_base32(seed_b32) else { return false };
    let Ok(totp) = totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(secret)
        .build()
    else {
        return false;
    };
    totp.check(code.trim(), now_secs() as u64).is_some()
}

// ------------------------------------------------------------ logins

impl App {
    async fn slow_down(&self, keys: &[String]) -> bool {
        match self.auth.gate(keys) {
            Gate::Locked => false,
            Gate::Slow(d) => {
                tokio::time::sleep(d).await;
                true
            }
            Gate::Open => true,
        }
    }

    fn login_failed(&self, session: &Session, username: Option<&str>, mechanism: &str, reason: &str) {
        let keys = limiter_keys(username, &session.address);
        let locked = self.auth.record_failure(&keys);
        let mut msg = reason.to_string();
        if locked {
            msg.push_str(&format!("; further attempts refused for {} s", LOCKOUT.as_secs()));
        }
        tracing::warn!(address = %session.address, username = username.unwrap_or("-"), mechanism, "login failed: {msg}");
        audit::record(self, session, AuditEvent::login(username, mechanism, false, Some(msg)));
    }

    fn login_succeeded(&self, session: &Session, caller: Caller, mechanism: &str) -> LoginOutcome {
        self.auth.record_success(&caller.username, &session.address);
        session.set(SessionAuth::Authenticated(caller.clone()));
        audit::record(self, session, AuditEvent::login(Some(&caller.username), mechanism, true, None));
        LoginOutcome::Success(caller)
    }

    /// PASSWORD_PLAIN (and `auth.login`). With 2FA on the account, answers
    /// `OtpRequired` and remembers the user on the session, unless `otp` is given.
    pub async fn login_password(
        &self,
        session: &Session,
        username: &str,
        password: &SecretString,
        otp: Option<&str>,
    ) -> LoginOutcome {
        let keys = limiter_keys(Some(username), &session.address);
        if !self.slow_down(&keys).await {
            self.login_failed(session, Some(username), "PASSWORD_PLAIN", "refused: too many failed logins");
            return LoginOutcome::AuthErr;
        }
        let user = self.store.user_by_name(username).ok().flatten();
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        let pw = password.expose_secret().to_string();
        let hash_for_check = hash.clone().unwrap_or_else(|| dummy_hash().to_string());
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash_for_check, &pw)).await.unwrap_or(false);
        let Some(user) = user.filter(|_| ok && hash.is_some()) else {
            self.login_failed(session, Some(username), "PASSWORD_PLAIN", "invalid username or password");
            return LoginOutcome::AuthErr;
        };
        let info = users::UserData::from_record(&user);
        if info.locked || info.password_disabled {
            self.login_failed(
                session,
                Some(username),
                "PASSWORD_PLAIN",
                "account is locked or its password is disabled",
            );
            return LoginOutcome::AuthErr;
        }
        let Some(role) = Role::from_roles(&info.roles) else {
            self.login_failed(session, Some(username), "PASSWORD_PLAIN", "account has no API access");
            return LoginOutcome::Denied;
        };
        if user.has_twofactor_secret && info.twofactor_enabled {
            match otp {
                None => {
                    session.set(SessionAuth::OtpPending { username: username.to_string(), tries: 0 });
                    return LoginOutcome::OtpRequired(username.to_string());
                }
                Some(code) => {
                    if !self.check_otp(user.id, code) {
                        self.login_failed(session, Some(username), "PASSWORD_PLAIN", "wrong one-time password");
                        return LoginOutcome::AuthErr;
                    }
                }
            }
        }
        self.login_succeeded(
            session,
            Caller { username: username.to_string(), role, via: AuthVia::Password },
            "PASSWORD_PLAIN",
        )
    }

    fn check_otp(&self, user_id: i64, code: &str) -> bool {
        match self.store.user_twofactor_secret(user_id) {
            Ok(Some(seed)) => verify_totp(&seed, code),
            _ => false,
        }
    }

    /// OTP_TOKEN continuation on the same connection.
    pub async fn login_otp(&self, session: &Session, code: &str) -> LoginOutcome {
        let pending = match &*session.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            SessionAuth::OtpPending { username, tries } => Some((username.clone(), *tries)),
            _ => None,
        };
        let Some((username, tries)) = pending else {
            self.login_failed(session, None, "OTP_TOKEN", "one-time password sent without a pending password login");
            return LoginOutcome::AuthErr;
        };
        let keys = limiter_keys(Some(&username), &session.address);
        if !self.slow_down(&keys).await {
            session.set(SessionAuth::Anonymous);
            self.login_failed(session, Some(&username), "OTP_TOKEN", "refused: too many failed logins");
            return LoginOutcome::AuthErr;
        }
        let user = self.store.user_by_name(&username).ok().flatten();
        let role = user.as_ref().and_then(|u| Role::from_roles(&users::UserData::from_record(u).roles));
        match (user, role) {
            (Some(u), Some(role)) if self.check_otp(u.id, code) => {
                self.login_succeeded(session, Caller { username, role, via: AuthVia::Password }, "OTP_TOKEN")
            }
            _ => {
                self.login_failed(session, Some(&username), "OTP_TOKEN", "wrong one-time password");
                if tries + 1 >= MAX_OTP_TRIES {
                    session.set(SessionAuth::Anonymous);
                    LoginOutcome::AuthErr
                } else {
                    session.set(SessionAuth::OtpPending { username: username.clone(), tries: tries + 1 });
                    LoginOutcome::OtpRequired(username)
                }
            }
        }
    }

    /// API_KEY_PLAIN: `key` is `<id>-<secret>`; `username`, when given, must own it.
    pub async fn login_api_key(&self, session: &Session, username: Option<&str>, key: &SecretString) -> LoginOutcome {
        let keys = limiter_keys(username, &session.address);
        if !self.slow_down(&keys).await {
            self.login_failed(session, username, "API_KEY_PLAIN", "refused: too many failed logins");
            return LoginOutcome::AuthErr;
        }
        match self.check_api_key(key.expose_secret()) {
            Some(rec) if username.is_none_or(|u| u == rec.username) => {
                let user = self.store.user_by_name(&rec.username).ok().flatten();
                let data = user.as_ref().map(users::UserData::from_record);
                match data {
                    Some(d) if !d.locked => match Role::from_roles(&d.roles) {
                        Some(role) => self.login_succeeded(
                            session,
                            Caller { username: rec.username, role, via: AuthVia::ApiKey },
                            "API_KEY_PLAIN",
                        ),
                        None => {
                            self.login_failed(
                                session,
                                Some(&rec.username),
                                "API_KEY_PLAIN",
                                "account has no API access",
                            );
                            LoginOutcome::Denied
                        }
                    },
                    _ => {
                        self.login_failed(
                            session,
                            Some(&rec.username),
                            "API_KEY_PLAIN",
                            "account is missing or locked",
                        );
                        LoginOutcome::AuthErr
                    }
                }
            }
            _ => {
                self.login_failed(session, username, "API_KEY_PLAIN", "invalid API key");
                LoginOutcome::AuthErr
            }
        }
    }

    /// Verify an API key string without touching any session (downloads use it too).
    pub fn check_api_key(&self, key: &str) -> Option<keyhaven_store::ApiKeyRecord> {
        let (id, secret) = key.split_once('-')?;
        let id: i64 = id.parse().ok()?;
        let rec = self.store.api_key_by_id(id).ok()??;
        if rec.expires_at.is_some_and(|e| e < now_secs()) {
            return None;
        }
        ct_eq(&rec.key_hash, &api_key_hash(id, secret)).then_some(rec)
    }

    /// TOKEN_PLAIN / `auth.login_with_token`.
    pub async fn login_token(&self, session: &Session, token: &SecretString) -> LoginOutcome {
        let keys = limiter_keys(None, &session.address);
        if !self.slow_down(&keys).await {
            self.login_failed(session, None, "TOKEN_PLAIN", "refused: too many failed logins");
            return LoginOutcome::AuthErr;
        }
        match self.take_token(token.expose_secret(), &session.origin) {
            Ok((username, lifetime)) => {
                let user = self.store.user_by_name(&username).ok().flatten();
                let data = user.as_ref().map(users::UserData::from_record);
                let role = data.as_ref().filter(|d| !d.locked).and_then(|d| Role::from_roles(&d.roles));
                match role {
                    Some(role) => {
                        let out = self.login_succeeded(
                            session,
                            Caller { username, role, via: AuthVia::Token },
                            "TOKEN_PLAIN",
                        );
                        session.set_idle_limit(lifetime);
                        out
                    }
                    None => {
                        self.login_failed(session, Some(&username), "TOKEN_PLAIN", "account has no API access");
                        LoginOutcome::AuthErr
                    }
                }
            }
            Err(reason) => {
                self.login_failed(session, None, "TOKEN_PLAIN", reason);
                LoginOutcome::AuthErr
            }
        }
    }

    /// Consume a token (single-use ones are deleted); returns its owner and lifetime.
    pub fn take_token(&self, token: &str, origin: &str) -> Result<(String, Duration), &'static str> {
        let rec =
            self.store.token_take(&sha256_hex(token)).map_err(|_| "token lookup failed")?.ok_or("invalid token")?;
        if rec.expires_at < now_secs() {
            return Err("token expired");
        }
        if let Some(o) = &rec.origin {
            if o != origin {
                return Err("token used from another origin (it was generated with match_origin)");
            }
        }
        let lifetime = Duration::from_secs(rec.expires_at.saturating_sub(rec.created_at).max(1) as u64);
        Ok((rec.username, lifetime))
    }

    /// `auth.generate_token`.
    pub fn generate_token(
        &self,
        caller: &Caller,
        session: &Session,
        ttl: Option<i64>,
        attrs: &Value,
        match_origin: bool,
        single_use: bool,
    ) -> Result<SecretString, ServiceError> {
        let ttl = ttl.unwrap_or(600);
        if !(1..=86400 * 30).contains(&ttl) {
            return Err(ServiceError::field("auth_generate_token.ttl", "ttl must be between 1 and 2592000 seconds"));
        }
        let token = random_alnum(64);
        let origin = match_origin.then_some(session.origin.as_str());
        self.store.token_insert(&sha256_hex(&token), &caller.username, ttl, single_use, origin, attrs)?;
        Ok(SecretString::from(token))
    }

    /// `api_key.create`: returns the record and the key (`<id>-<secret>`), shown once.
    pub fn create_api_key(
        &self,
        name: &str,
        username: &str,
    ) -> Result<(keyhaven_store::ApiKeyRecord, SecretString), ServiceError> {
        if name.trim().is_empty() {
            return Err(ServiceError::field("api_key_create.name", "Name must not be empty"));
        }
        if let Err(e) = keyhaven_core::text::check_single_line(name) {
            return Err(ServiceError::field("api_key_create.name", e.to_string()));
        }
        if self.store.user_by_name(username)?.is_none() {
            return Err(ServiceError::field_errno(
                "api_key_create.username",
                format!("{username}: user does not exist"),
                ENOENT,
            ));
        }
        if self.store.api_keys_list()?.iter().any(|k| k.name == name) {
            return Err(ServiceError::field("api_key_create.name", "Object with this name already exists"));
        }
        let secret = random_alnum(64);
        let rec = self.store.api_key_insert(name, username, None, |id| api_key_hash(id, &secret))?;
        let key = SecretString::from(format!("{}-{}", rec.id, secret));
        Ok((rec, key))
    }

    pub fn logout(&self, session: &Session) {
        if let Some(u) = session.username() {
            audit::record(self, session, AuditEvent::method("auth.logout", "Logout", Some(&u), true, None));
        }
        session.set(SessionAuth::Anonymous);
    }

    /// TrueNAS's `auth.me` shape for the caller.
    pub fn me(&self, caller: &Caller) -> Result<Value, ServiceError> {
        let user = self
            .store
            .user_by_name(&caller.username)?
            .ok_or_else(|| ServiceError::call(ENOENT, format!("User {} does not exist", caller.username)))?;
        Ok(user_info(&user, caller.role))
    }
}

fn api_key_hash(id: i64, secret: &str) -> String {
    sha256_hex(&format!("keyhaven-api-key:{id}:{secret}"))
}

/// `user_info` / `auth.me` for an account.
pub fn user_info(user: &keyhaven_store::UserRecord, role: Role) -> Value {
    let d = users::UserData::from_record(user);
    json!({
        "pw_name": user.username,
        "pw_gecos": d.full_name,
        "pw_dir": d.home,
        "pw_shell": d.shell,
        "pw_uid": d.uid,
        "pw_gid": d.uid,
        "grouplist": [d.uid],
        "sid": null,
        "source": "LOCAL",
        "local": true,
        "attributes": d.attributes,
        "two_factor_config": {"secret_configured": user.has_twofactor_secret && d.twofactor_enabled},
        "privilege": {"roles": {"$set": [role.as_str()]}, "web_shell": false},
        "account_attributes": ["LOCAL", if user.password_hash.is_some() {"PASSWORD_LOGIN"} else {"SYS_ADMIN"}],
    })
}

impl App {
    /// The caller as the account stands now: a session keeps working only
    /// while its account exists, is not locked and still has API access, and
    /// always with the account's current role. `None` ends the session.
    ///
    /// A session opened with a token also ends once it has been idle for
    /// longer than the token's lifetime; every call counts as activity.
    pub fn current_caller(&self, session: &Session) -> Result<Caller, ServiceError> {
        self.check_caller(session, true)
    }

    /// Whether events may be pushed to this session now: the same checks as a
    /// call, without counting as activity.
    pub fn may_receive_events(&self, session: &Session) -> bool {
        session.receives_events() && self.check_caller(session, false).is_ok()
    }

    fn check_caller(&self, session: &Session, activity: bool) -> Result<Caller, ServiceError> {
        let mut c = session.caller().ok_or(ServiceError::NotAuthenticated)?;
        if c.via == AuthVia::UnixSocket {
            return Ok(c);
        }
        let idle = if activity { session.touch() } else { Ok(()) };
        if let Err(ttl) = idle {
            session.set(SessionAuth::Anonymous);
            tracing::info!(address = %session.address, username = %c.username, "session expired after {} s idle", ttl.as_secs());
            audit::record(
                self,
                session,
                AuditEvent::method(
                    "auth.logout",
                    "Session expired",
                    Some(&c.username),
                    true,
                    Some(format!("idle for more than {} s", ttl.as_secs())),
                ),
            );
            return Err(ServiceError::SessionExpired { idle_secs: ttl.as_secs() });
        }
        let fresh = self.store.user_by_name(&c.username).ok().flatten().and_then(|u| {
            let d = users::UserData::from_record(&u);
            if d.locked {
                None
            } else {
                Role::from_roles(&d.roles)
            }
        });
        match fresh {
            Some(role) => {
                if role != c.role {
                    c.role = role;
                    // Not `set`: a role change keeps the session's idle limit.
                    *session.auth.lock().unwrap_or_else(|p| p.into_inner()) = SessionAuth::Authenticated(c.clone());
                }
                Ok(c)
            }
            None => {
                session.set(SessionAuth::Anonymous);
                Err(ServiceError::NotAuthenticated)
            }
        }
    }
}
