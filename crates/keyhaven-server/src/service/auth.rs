//! Authentication: passwords (Argon2id, a bounded number checked at once),
//! API keys and tokens (random, stored as SHA-256 hashes, compared in
//! constant time), TOTP continuation (each code accepted once), per-connection
//! sessions (one login at a time each), scoped tokens, and the failed-login
//! limiter ([`super::limiter`]) with quiet audit while an attacker is refused.

use std::sync::Mutex;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::Value;

use super::audit::{self, AuditEvent};
use super::crypto::{
    ct_eq, dummy_hash, hash_password, random_alnum, release_idle_hash_memory, sha256_hex, verify_password,
    HASH_MEMORY_IDLE,
};
use super::limiter::{Attempt, Limiter, Limits, Summary};
pub use super::session::{
    AuthVia, Caller, HeldToken, Role, Scope, Session, SessionAuth, PAIRING_METHODS, PAIRING_USER_FIELDS,
};
use super::{now_secs, users, App};
use crate::error::{ServiceError, EBUSY, EINVAL, ENOENT};

/// Wrong OTP codes tolerated on one connection before it must start over.
pub const MAX_OTP_TRIES: u32 = 3;
/// The longest lifetime `auth.generate_token` grants (one day).
pub const MAX_TOKEN_TTL: i64 = 86_400;
/// How long a login waits for a free password-check slot before it is told to retry.
pub const HASH_WAIT: Duration = Duration::from_secs(3);
/// The one token `purpose` keyhaven knows (`attrs.purpose`).
pub const PURPOSE_PAIRING: &str = "pairing";
/// In-memory state of authentication: the failed-login limiter and the
/// bound on concurrent password checks.
pub struct AuthState {
    pub limiter: Limiter,
    /// Argon2id takes tens of megabytes and milliseconds of CPU per check:
    /// this many run at once, the rest queue (briefly).
    hash_slots: tokio::sync::Semaphore,
    pub hash_slot_count: usize,
    hashers: HashPool,
}

type HashJob = Box<dyn FnOnce() + Send>;

/// The threads that run Argon2, as many as there are slots. Always the same
/// threads: each keeps reusing the ~19 MiB its allocator arena holds from the
/// previous check (no page faults on the next), and no more arenas than
/// threads ever hold such blocks — on the shared blocking pool, every new
/// thread's arena would keep one until the periodic trim.
struct HashPool {
    jobs: std::sync::mpsc::Sender<HashJob>,
}

impl HashPool {
    fn new(threads: usize) -> HashPool {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("keyhaven-hash-{i}")).spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                job();
            });
            if let Err(e) = spawned {
                tracing::error!("could not start a password-hashing thread: {e}");
            }
        }
        HashPool { jobs: tx }
    }

    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServiceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|e| ServiceError::internal("password hashing", e))?;
        rx.await.map_err(|e| ServiceError::internal("password hashing", e))
    }
}

impl AuthState {
    pub fn new(limits: Limits, hash_slots: usize) -> AuthState {
        let n = hash_slots.max(1);
        AuthState {
            limiter: Limiter::new(limits),
            hash_slots: tokio::sync::Semaphore::new(n),
            hash_slot_count: n,
            hashers: HashPool::new(n),
        }
    }

    /// Run an Argon2 computation on a hashing thread once a slot is free;
    /// `Err` with a retry hint when none frees up within [`HASH_WAIT`].
    pub async fn with_hash_slot<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let permit = match tokio::time::timeout(HASH_WAIT, self.hash_slots.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(ServiceError::call(
                    EBUSY,
                    "Too many login attempts are being checked right now; retry in 1 s",
                ))
            }
        };
        let out = self.hashers.run(f).await;
        drop(permit);
        // The working memory stays for the next check of a burst; once checks
        // stop for a moment it goes back to the system.
        tokio::spawn(async {
            tokio::time::sleep(HASH_MEMORY_IDLE + Duration::from_millis(200)).await;
            release_idle_hash_memory(HASH_MEMORY_IDLE);
        });
        out
    }

    /// Argon2id hash of a new password, within the slot bound.
    pub async fn hash(&self, password: &SecretString) -> Result<String, ServiceError> {
        let pw = zeroize::Zeroizing::new(password.expose_secret().to_string());
        self.with_hash_slot(move || hash_password(&pw)).await
    }
}

/// What a login attempt came to (TrueNAS `response_type`).
#[derive(Debug)]
pub enum LoginOutcome {
    Success(Caller),
    OtpRequired(String),
    AuthErr,
    /// Valid credentials for an account without API access.
    Denied,
    /// Not checked: the server is busy or this connection already has a login
    /// in flight. The message says when to retry.
    Busy(String),
}

/// The TOTP time step (RFC 6238, SHA-1, 6 digits, 30 s, ±1 step) at which
/// `code` is valid for the base32 seed at `now`, if any. The caller must
/// accept each step once (RFC 6238 §5.2): see [`Auth::check_otp`].
pub fn totp_step(seed_b32: &str, code: &str, now: u64) -> Option<u64> {
    let secret = totp_rs::Secret::try_from_base32(seed_b32).ok()?;
    let totp = super::crypto::totp_builder(secret).build().ok()?;
    totp.check(code.trim(), now)
}

/// Checks a TOTP code against a base32 seed (no replay check: see [`Auth::check_otp`]).
pub fn verify_totp(seed_b32: &str, code: &str) -> bool {
    totp_step(seed_b32, code, now_secs() as u64).is_some()
}

// ------------------------------------------------------------ logins

/// Authentication (logins of every mechanism, tokens, API keys, downloads
/// and metrics scrapes) and the checks every call of a session goes through.
pub struct Auth<'a> {
    app: &'a App,
}

impl<'a> Auth<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Auth { app }
    }

    /// Start a limited attempt: `Err` is the outcome to return at once
    /// (refused while locked — counted, not audited row by row).
    async fn begin_attempt(
        &self,
        session: &Session,
        username: Option<&str>,
        mechanism: &'static str,
    ) -> Result<Attempt<'_>, LoginOutcome> {
        let shared = self.app.store.shares_login_failures().then_some(&*self.app.store);
        match self.app.auth.limiter.begin_shared(username, &session.address, shared) {
            Ok(a) => {
                if !a.delay.is_zero() {
                    tokio::time::sleep(a.delay).await;
                }
                Ok(a)
            }
            Err(r) => {
                self.app.metrics.login(mechanism, "refused");
                if r.first {
                    tracing::warn!(
                        address = %session.address,
                        mechanism,
                        "login attempts for {} refused for {} s after repeated failures; \
                         further refusals are summarised in the audit log when the lock ends",
                        r.what,
                        r.retry_after.as_secs()
                    );
                }
                Err(LoginOutcome::AuthErr)
            }
        }
    }

    fn login_failed(
        &self,
        session: &Session,
        attempt: Attempt<'_>,
        username: Option<&str>,
        mechanism: &'static str,
        reason: &str,
    ) {
        let out = attempt.failed();
        self.app.metrics.login(mechanism, "failed");
        let mut msg = reason.to_string();
        for what in &out.locked {
            msg.push_str(&format!(
                "; further attempts for {what} refused for {} s",
                self.app.auth.limiter.limits().lockout.as_secs()
            ));
        }
        tracing::warn!(address = %session.address, username = username.unwrap_or("-"), mechanism, "login failed: {msg}");
        audit::record(self.app, session, AuditEvent::login(username, mechanism, false, Some(msg)));
    }

    fn login_succeeded(
        &self,
        session: &Session,
        attempt: Attempt<'_>,
        caller: Caller,
        mechanism: &'static str,
    ) -> LoginOutcome {
        attempt.succeeded();
        self.app.metrics.login(mechanism, "ok");
        session.set(SessionAuth::Authenticated(caller.clone()));
        audit::record(self.app, session, AuditEvent::login(Some(&caller.username), mechanism, true, None));
        LoginOutcome::Success(caller)
    }

    /// Write the summaries of refused attempts whose lock has ended (all of
    /// them with `all`, at shutdown): one audit entry and one log line each.
    pub fn flush_refusal_summaries(&self, all: bool) {
        for s in self.app.auth.limiter.take_summaries(all) {
            write_summary(self.app, &s);
        }
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
        let Ok(_one) = session.login.try_lock() else { return busy_connection() };
        let attempt = match self.begin_attempt(session, Some(username), "PASSWORD_PLAIN").await {
            Ok(a) => a,
            Err(o) => return o,
        };
        let user = self.app.store.user_by_name(username).ok().flatten();
        let hash = user.as_ref().and_then(|u| u.password_hash.clone());
        let pw = zeroize::Zeroizing::new(password.expose_secret().to_string());
        let hash_for_check = hash.clone().unwrap_or_else(|| dummy_hash().to_string());
        let ok = match self.app.auth.with_hash_slot(move || verify_password(&hash_for_check, &pw)).await {
            Ok(ok) => ok,
            Err(e) => {
                // Not checked, so not a failure: only the attempt's slot is returned.
                attempt.unchecked();
                return LoginOutcome::Busy(e.to_string());
            }
        };
        let Some(user) = user.filter(|_| ok && hash.is_some()) else {
            self.login_failed(session, attempt, Some(username), "PASSWORD_PLAIN", "invalid username or password");
            return LoginOutcome::AuthErr;
        };
        let info = users::UserData::from_record(&user);
        if info.locked || info.password_disabled {
            self.login_failed(
                session,
                attempt,
                Some(username),
                "PASSWORD_PLAIN",
                "account is locked or its password is disabled",
            );
            return LoginOutcome::AuthErr;
        }
        let Some(role) = Role::from_roles(&info.roles) else {
            self.login_failed(session, attempt, Some(username), "PASSWORD_PLAIN", "account has no API access");
            return LoginOutcome::Denied;
        };
        if user.has_twofactor_secret && info.twofactor_enabled {
            match otp {
                None => {
                    // The password was right: what follows is a new attempt (OTP_TOKEN).
                    attempt.succeeded();
                    session.set(SessionAuth::OtpPending { username: username.to_string(), tries: 0 });
                    return LoginOutcome::OtpRequired(username.to_string());
                }
                Some(code) => {
                    if let Err(reason) = self.check_otp(user.id, code) {
                        self.login_failed(session, attempt, Some(username), "PASSWORD_PLAIN", reason);
                        return LoginOutcome::AuthErr;
                    }
                }
            }
        }
        self.login_succeeded(session, attempt, Caller::new(username, role, AuthVia::Password), "PASSWORD_PLAIN")
    }

    /// A TOTP code for account `user_id`, accepted once: a code already used
    /// (in its 90 s window) is refused as a replay.
    fn check_otp(&self, user_id: i64, code: &str) -> Result<(), &'static str> {
        let seed = match self.app.store.user_twofactor_secret(user_id) {
            Ok(Some(seed)) => seed,
            _ => return Err("wrong one-time password"),
        };
        let step = totp_step(&seed, code, now_secs() as u64).ok_or("wrong one-time password")?;
        match self.app.store.user_totp_consume(user_id, step as i64) {
            Ok(true) => Ok(()),
            Ok(false) => Err("one-time password already used; wait for the next one"),
            Err(_) => Err("one-time password could not be recorded"),
        }
    }

    /// OTP_TOKEN continuation on the same connection.
    pub async fn login_otp(&self, session: &Session, code: &str) -> LoginOutcome {
        let Ok(_one) = session.login.try_lock() else { return busy_connection() };
        let pending = match &*session.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            SessionAuth::OtpPending { username, tries } => Some((username.clone(), *tries)),
            _ => None,
        };
        let Some((username, tries)) = pending else {
            let attempt = match self.begin_attempt(session, None, "OTP_TOKEN").await {
                Ok(a) => a,
                Err(o) => return o,
            };
            self.login_failed(
                session,
                attempt,
                None,
                "OTP_TOKEN",
                "one-time password sent without a pending password login",
            );
            return LoginOutcome::AuthErr;
        };
        let attempt = match self.begin_attempt(session, Some(&username), "OTP_TOKEN").await {
            Ok(a) => a,
            Err(o) => {
                session.set(SessionAuth::Anonymous);
                return o;
            }
        };
        let user = self.app.store.user_by_name(&username).ok().flatten();
        let role = user.as_ref().and_then(|u| Role::from_roles(&users::UserData::from_record(u).roles));
        let checked = match (&user, role) {
            (Some(u), Some(role)) => self.check_otp(u.id, code).map(|()| role),
            _ => Err("wrong one-time password"),
        };
        match checked {
            Ok(role) => {
                self.login_succeeded(session, attempt, Caller::new(username, role, AuthVia::Password), "OTP_TOKEN")
            }
            Err(reason) => {
                self.login_failed(session, attempt, Some(&username), "OTP_TOKEN", reason);
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
        let Ok(_one) = session.login.try_lock() else { return busy_connection() };
        let attempt = match self.begin_attempt(session, username, "API_KEY_PLAIN").await {
            Ok(a) => a,
            Err(o) => return o,
        };
        let Some(rec) = self.check_api_key(key.expose_secret()).filter(|r| username.is_none_or(|u| u == r.username))
        else {
            self.login_failed(session, attempt, username, "API_KEY_PLAIN", "invalid API key");
            return LoginOutcome::AuthErr;
        };
        match self.account_role(&rec.username) {
            Ok(role) => {
                let mut caller = Caller::new(rec.username, role, AuthVia::ApiKey);
                caller.api_key_id = Some(rec.id);
                self.login_succeeded(session, attempt, caller, "API_KEY_PLAIN")
            }
            Err(AccountRefusal::NoApiAccess) => {
                self.login_failed(session, attempt, Some(&rec.username), "API_KEY_PLAIN", "account has no API access");
                LoginOutcome::Denied
            }
            Err(AccountRefusal::MissingOrLocked) => {
                self.login_failed(
                    session,
                    attempt,
                    Some(&rec.username),
                    "API_KEY_PLAIN",
                    "account is missing or locked",
                );
                LoginOutcome::AuthErr
            }
        }
    }

    /// The API role of an account that may log in now.
    fn account_role(&self, username: &str) -> Result<Role, AccountRefusal> {
        let user = self.app.store.user_by_name(username).ok().flatten().ok_or(AccountRefusal::MissingOrLocked)?;
        let d = users::UserData::from_record(&user);
        if d.locked {
            return Err(AccountRefusal::MissingOrLocked);
        }
        Role::from_roles(&d.roles).ok_or(AccountRefusal::NoApiAccess)
    }

    /// Verify an API key string without touching any session.
    pub fn check_api_key(&self, key: &str) -> Option<keyhaven_store::ApiKeyRecord> {
        let (id, secret) = key.split_once('-')?;
        let id: i64 = id.parse().ok()?;
        let rec = self.app.store.api_key_by_id(id).ok()??;
        if rec.expires_at.is_some_and(|e| e < now_secs()) {
            return None;
        }
        ct_eq(&rec.key_hash, &api_key_hash(id, secret)).then_some(rec)
    }

    /// TOKEN_PLAIN / `auth.login_with_token`.
    pub async fn login_token(&self, session: &Session, token: &SecretString) -> LoginOutcome {
        let Ok(_one) = session.login.try_lock() else { return busy_connection() };
        let attempt = match self.begin_attempt(session, None, "TOKEN_PLAIN").await {
            Ok(a) => a,
            Err(o) => return o,
        };
        let grant = match self.take_token(token.expose_secret(), &session.origin) {
            Ok(g) => g,
            Err(reason) => {
                self.login_failed(session, attempt, None, "TOKEN_PLAIN", reason);
                return LoginOutcome::AuthErr;
            }
        };
        match self.account_role(&grant.username) {
            Ok(role) => {
                let mut caller = Caller::new(grant.username, role, AuthVia::Token);
                caller.scope = grant.scope;
                caller.token = grant.reusable;
                let out = self.login_succeeded(session, attempt, caller, "TOKEN_PLAIN");
                session.set_idle_limit(grant.lifetime);
                out
            }
            Err(_) => {
                self.login_failed(session, attempt, Some(&grant.username), "TOKEN_PLAIN", "account has no API access");
                LoginOutcome::AuthErr
            }
        }
    }

    /// Consume a token (single-use ones are deleted): its owner, lifetime and scope.
    pub fn take_token(&self, token: &str, origin: &str) -> Result<TokenGrant, &'static str> {
        let rec =
            self.app.store.token_take(&sha256_hex(token)).map_err(|_| "token lookup failed")?.ok_or("invalid token")?;
        if rec.expires_at < now_secs() {
            return Err("token expired");
        }
        if let Some(o) = &rec.origin {
            if o != origin {
                return Err("token used from another origin (it was generated with match_origin)");
            }
        }
        let lifetime = Duration::from_secs(rec.expires_at.saturating_sub(rec.created_at).max(1) as u64);
        let scope = if rec.attrs.get("purpose").and_then(Value::as_str) == Some(PURPOSE_PAIRING) {
            Scope::Pairing
        } else {
            Scope::Full
        };
        let reusable = (!rec.single_use).then_some(HeldToken { id: rec.id, expires_at: rec.expires_at });
        Ok(TokenGrant { username: rec.username, lifetime, scope, reusable })
    }

    /// Authenticate a download request (`Authorization: Bearer <API key>` or
    /// `?auth_token=`), limited and audited like a login. A pairing token
    /// never downloads anything.
    pub async fn authenticate_download(
        &self,
        address: &str,
        api_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<Caller, DownloadRefusal> {
        let mechanism = if api_key.is_some() { "DOWNLOAD_API_KEY" } else { "DOWNLOAD_TOKEN" };
        self.authenticate_request(address, api_key, token, mechanism).await
    }

    /// Authenticate a `GET /metrics` on the main listener: an API key only,
    /// limited and audited like a login (so it cannot be used to guess keys).
    /// Any account that may use the API may read metrics.
    pub async fn authenticate_metrics(&self, address: &str, api_key: Option<&str>) -> Result<Caller, DownloadRefusal> {
        if api_key.is_none() {
            return Err(DownloadRefusal::Unauthenticated);
        }
        self.authenticate_request(address, api_key, None, "METRICS_API_KEY").await
    }

    /// An HTTP request's API key or token, checked as a login attempt.
    async fn authenticate_request(
        &self,
        address: &str,
        api_key: Option<&str>,
        token: Option<&str>,
        mechanism: &'static str,
    ) -> Result<Caller, DownloadRefusal> {
        let session = Session::new(address.to_string());
        if api_key.is_none() && token.is_none() {
            return Err(DownloadRefusal::Unauthenticated);
        }
        let attempt = match self.begin_attempt(&session, None, mechanism).await {
            Ok(a) => a,
            Err(_) => return Err(DownloadRefusal::Unauthenticated),
        };
        let grant = match (api_key, token) {
            (Some(k), _) => self.check_api_key(k).map(|r| TokenGrant {
                username: r.username,
                lifetime: Duration::ZERO,
                scope: Scope::Full,
                reusable: None,
            }),
            (None, Some(t)) => self.take_token(t, address).ok(),
            (None, None) => None,
        };
        let Some(grant) = grant else {
            self.login_failed(&session, attempt, None, mechanism, "invalid API key or token for a download");
            return Err(DownloadRefusal::Unauthenticated);
        };
        if grant.scope != Scope::Full {
            self.login_failed(
                &session,
                attempt,
                Some(&grant.username),
                mechanism,
                "a pairing token cannot download anything",
            );
            return Err(DownloadRefusal::Forbidden("A pairing token cannot download keys"));
        }
        let via = if api_key.is_some() { AuthVia::ApiKey } else { AuthVia::Token };
        match self.account_role(&grant.username) {
            Ok(role) => {
                attempt.succeeded();
                self.app.metrics.login(mechanism, "ok");
                Ok(Caller::new(grant.username, role, via))
            }
            Err(AccountRefusal::NoApiAccess) => {
                self.login_failed(&session, attempt, Some(&grant.username), mechanism, "account has no API access");
                Err(DownloadRefusal::Forbidden("This account has no API access"))
            }
            Err(AccountRefusal::MissingOrLocked) => {
                self.login_failed(&session, attempt, Some(&grant.username), mechanism, "account is missing or locked");
                Err(DownloadRefusal::Unauthenticated)
            }
        }
    }

    /// `auth.generate_token`. Single-use and bounded by [`MAX_TOKEN_TTL`]; from
    /// a token session it cannot outlive its parent's lifetime (the ttl is
    /// clamped to it) nor widen its scope.
    pub fn generate_token(
        &self,
        caller: &Caller,
        session: &Session,
        ttl: Option<i64>,
        attrs: &Value,
        match_origin: bool,
        single_use: bool,
    ) -> Result<SecretString, ServiceError> {
        let mut ttl = ttl.unwrap_or(600);
        if !(1..=MAX_TOKEN_TTL).contains(&ttl) {
            return Err(ServiceError::field(
                "auth_generate_token.ttl",
                format!("ttl must be between 1 and {MAX_TOKEN_TTL} seconds"),
            ));
        }
        match attrs.get("purpose") {
            None => {}
            Some(Value::String(p)) if p == PURPOSE_PAIRING => {}
            Some(_) => {
                return Err(ServiceError::field_errno(
                    "auth_generate_token.attrs.purpose",
                    format!("The only token purpose is '{PURPOSE_PAIRING}' (a token another system pairs with)"),
                    EINVAL,
                ))
            }
        }
        if caller.scope != Scope::Full {
            return Err(ServiceError::NotAuthorized);
        }
        if let Some(parent) = session.token_lifetime() {
            ttl = ttl.min(parent.as_secs().max(1) as i64);
        }
        let token = random_alnum(64);
        let origin = match_origin.then_some(session.origin.as_str());
        self.app.store.token_insert(&sha256_hex(&token), &caller.username, ttl, single_use, origin, attrs)?;
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
        if self.app.store.user_by_name(username)?.is_none() {
            return Err(ServiceError::field_errno(
                "api_key_create.username",
                format!("{username}: user does not exist"),
                ENOENT,
            ));
        }
        if self.app.store.api_keys_list()?.iter().any(|k| k.name == name) {
            return Err(ServiceError::field("api_key_create.name", "Object with this name already exists"));
        }
        let secret = random_alnum(64);
        let rec = self.app.store.api_key_insert(name, username, None, |id| api_key_hash(id, &secret))?;
        let key = SecretString::from(format!("{}-{}", rec.id, secret));
        Ok((rec, key))
    }

    pub fn logout(&self, session: &Session) {
        if let Some(u) = session.username() {
            audit::record(self.app, session, AuditEvent::method("auth.logout", "Logout", Some(&u), true, None));
        }
        session.set(SessionAuth::Anonymous);
    }

    /// TrueNAS's `auth.me` shape for the caller.
    pub fn me(&self, caller: &Caller) -> Result<UserInfo, ServiceError> {
        let user = self
            .app
            .store
            .user_by_name(&caller.username)?
            .ok_or_else(|| ServiceError::call(ENOENT, format!("User {} does not exist", caller.username)))?;
        Ok(user_info(&user, caller.role))
    }
}

/// What a token grants.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub username: String,
    pub lifetime: Duration,
    pub scope: Scope,
    /// A reusable token stays in the store: sessions opened with it end
    /// when it goes.
    pub reusable: Option<HeldToken>,
}

enum AccountRefusal {
    MissingOrLocked,
    NoApiAccess,
}

/// Why a download was refused (the transport turns it into 401 or 403).
#[derive(Debug)]
pub enum DownloadRefusal {
    Unauthenticated,
    Forbidden(&'static str),
}

fn busy_connection() -> LoginOutcome {
    LoginOutcome::Busy("Another login is being checked on this connection; wait for its answer".into())
}

fn write_summary(app: &App, s: &Summary) {
    let fmt = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string()
    };
    let msg = format!(
        "{} login attempts for {} refused while locked (first at {}, last at {}, Unix time)",
        s.count,
        s.what,
        fmt(s.first),
        fmt(s.last)
    );
    tracing::warn!("{msg}");
    let session = Session::new(s.address.clone().unwrap_or_else(|| "-".into()));
    let mut ev = AuditEvent::login(s.username.as_deref(), "REFUSED", false, Some(msg));
    ev.description = format!("Refused login attempts ({})", s.count);
    audit::record(app, &session, ev);
}

fn api_key_hash(id: i64, secret: &str) -> String {
    sha256_hex(&format!("keyhaven-api-key:{id}:{secret}"))
}

/// `user_info` / `auth.me` for an account.
pub fn user_info(user: &keyhaven_store::UserRecord, role: Role) -> UserInfo {
    let d = users::UserData::from_record(user);
    UserInfo {
        pw_name: user.username.clone(),
        pw_gecos: d.full_name,
        pw_dir: d.home,
        pw_shell: d.shell,
        pw_uid: d.uid,
        pw_gid: d.uid,
        grouplist: vec![d.uid],
        sid: None,
        source: "LOCAL",
        local: true,
        attributes: d.attributes,
        two_factor_config: TwoFactorConfig { secret_configured: user.has_twofactor_secret && d.twofactor_enabled },
        privilege: Privilege { roles: RoleSet { set: vec![role.as_str()] }, web_shell: false },
        account_attributes: ["LOCAL", if user.password_hash.is_some() { "PASSWORD_LOGIN" } else { "SYS_ADMIN" }],
    }
}

/// TrueNAS's `user_info` / `auth.me` reply. `attributes` is the account's
/// free-form attribute object (`user.set_attribute`), kept as JSON.
#[derive(Serialize)]
pub struct UserInfo {
    pub pw_name: String,
    pub pw_gecos: String,
    pub pw_dir: String,
    pub pw_shell: String,
    pub pw_uid: i64,
    pub pw_gid: i64,
    pub grouplist: Vec<i64>,
    /// Always null (no directory services).
    pub sid: Option<String>,
    pub source: &'static str,
    pub local: bool,
    pub attributes: serde_json::Map<String, Value>,
    pub two_factor_config: TwoFactorConfig,
    pub privilege: Privilege,
    pub account_attributes: [&'static str; 2],
}

#[derive(Serialize)]
pub struct TwoFactorConfig {
    pub secret_configured: bool,
}

#[derive(Serialize)]
pub struct Privilege {
    pub roles: RoleSet,
    pub web_shell: bool,
}

/// TrueNAS encodes a Python set as `{"$set": [...]}`.
#[derive(Serialize)]
pub struct RoleSet {
    #[serde(rename = "$set")]
    pub set: Vec<&'static str>,
}
impl<'a> Auth<'a> {
    /// The caller as the account stands now: a session keeps working only
    /// while its account exists, is not locked and still has API access, and
    /// always with the account's current role. `None` ends the session.
    ///
    /// A session opened with a token also ends once it has been idle for
    /// longer than the token's lifetime; every call counts as activity.
    pub fn current_caller(&self, session: &Session) -> Result<Caller, ServiceError> {
        self.check_caller(session, true)
    }

    /// End a session whose reusable token is gone (logged and audited like
    /// an idle session's end); the error its call answers.
    fn end_token_session(&self, session: &Session, c: &Caller, why: &str) -> ServiceError {
        session.set(SessionAuth::Anonymous);
        tracing::info!(address = %session.address, username = %c.username, "session ended: {why}");
        audit::record(
            self.app,
            session,
            AuditEvent::method("auth.logout", "Session ended", Some(&c.username), true, Some(why.to_string())),
        );
        ServiceError::NotAuthenticated
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
                self.app,
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
        // A session opened with a reusable token lasts as long as the token:
        // its expiry is checked without I/O on every call, its removal when
        // the accounts' generation moves (below).
        if c.token.is_some_and(|t| t.expires_at < now_secs()) {
            return Err(self.end_token_session(session, &c, "its token expired"));
        }
        // What the session knows of its account is current unless an account
        // changed since it last looked: checked without I/O on every call.
        let generation = self.app.store.users_generation();
        if session.checked_generation.load(std::sync::atomic::Ordering::Acquire) == generation {
            return Ok(c);
        }
        if let Some(t) = c.token {
            let held = self.app.store.token_by_id(t.id).ok().flatten();
            if !held.is_some_and(|h| h.username == c.username && h.expires_at >= now_secs()) {
                return Err(self.end_token_session(session, &c, "its token was removed"));
            }
        }
        // A session opened with an API key lasts as long as the key does.
        let key_ok = match c.api_key_id {
            None => true,
            Some(id) => self
                .app
                .store
                .api_key_by_id(id)
                .ok()
                .flatten()
                .is_some_and(|k| k.username == c.username && k.expires_at.is_none_or(|e| e >= now_secs())),
        };
        let fresh = self.app.store.user_by_name(&c.username).ok().flatten().filter(|_| key_ok).and_then(|u| {
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
                // The generation read before the account was: a change racing
                // with this read bumps it again, and the next call looks again.
                session.checked_generation.store(generation, std::sync::atomic::Ordering::Release);
                Ok(c)
            }
            None => {
                session.set(SessionAuth::Anonymous);
                Err(ServiceError::NotAuthenticated)
            }
        }
    }
}
