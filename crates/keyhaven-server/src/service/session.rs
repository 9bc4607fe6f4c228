//! Who is calling: sessions (one per client connection), the caller they
//! authenticated as, its role and scope. A leaf: the login flows that set a
//! session live in [`super::auth`]; audit and every handler only read it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::error::ServiceError;

/// What a session opened with a pairing token may call: pair one account and
/// read or update that account (for the undo), nothing else.
pub const PAIRING_METHODS: &[&str] = &[
    "core.ping",
    "auth.me",
    "auth.logout",
    "keychaincredential.ssh_pair",
    "user.query",
    "user.get_instance",
    "user.update",
];
/// The account fields a pairing session may change (what pairing and its undo set).
pub const PAIRING_USER_FIELDS: &[&str] = &["sshpubkey", "shell", "sudo_commands_nopasswd"];

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

/// What a session may reach beyond its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything the role allows.
    Full,
    /// Opened with a token whose `attrs.purpose` is `pairing`: only
    /// [`PAIRING_METHODS`], on one account.
    Pairing,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub username: String,
    pub role: Role,
    pub via: AuthVia,
    pub scope: Scope,
    /// The API key a session logged in with: once it is deleted (on any
    /// node) the session ends.
    pub api_key_id: Option<i64>,
    /// The reusable token a session logged in with, and when it expires
    /// (Unix seconds): the session ends once the token expires or is
    /// removed (its account deleted), on any node. A single-use token is
    /// gone at login, so its session holds none.
    pub token: Option<HeldToken>,
}

/// A reusable token a session depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldToken {
    pub id: i64,
    pub expires_at: i64,
}

impl Caller {
    pub fn new(username: impl Into<String>, role: Role, via: AuthVia) -> Caller {
        Caller { username: username.into(), role, via, scope: Scope::Full, api_key_id: None, token: None }
    }

    /// Whether this caller may call `method` at all (the role is checked separately).
    pub fn may_call(&self, method: &str) -> Result<(), ServiceError> {
        match self.scope {
            Scope::Full => Ok(()),
            Scope::Pairing if PAIRING_METHODS.contains(&method) => Ok(()),
            Scope::Pairing => Err(ServiceError::call(
                crate::error::EACCES,
                format!(
                    "Not authorized: this session was opened with a pairing token, which can only pair an account \
                     (keychaincredential.ssh_pair); log in with a password or an API key to call {method}"
                ),
            )),
        }
    }
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
    /// Held while a login is checked: one at a time per connection, so a
    /// pipelined burst of guesses cannot occupy every password-check slot.
    pub(super) login: tokio::sync::Mutex<()>,
    /// For a pairing session: the one account it pairs, fixed by the first
    /// call that names one.
    pairing_account: Mutex<Option<String>>,
    /// The accounts' generation ([`keyhaven_store::Store::users_generation`])
    /// at which this session last checked its account; 0 = never.
    pub(super) checked_generation: std::sync::atomic::AtomicU64,
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
            login: tokio::sync::Mutex::new(()),
            pairing_account: Mutex::new(None),
            checked_generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A session for the local unix socket: full admin, like TrueNAS's `midclt`.
    pub fn local_root() -> Session {
        let s = Session::new("unix".into());
        s.set(SessionAuth::Authenticated(Caller::new("root", Role::FullAdmin, AuthVia::UnixSocket)));
        s
    }

    /// A session already authenticated as `caller` (downloads).
    pub fn authenticated(address: String, caller: Caller) -> Session {
        let s = Session::new(address);
        s.set(SessionAuth::Authenticated(caller));
        s
    }

    pub fn caller(&self) -> Option<Caller> {
        match &*self.auth.lock().unwrap_or_else(|p| p.into_inner()) {
            SessionAuth::Authenticated(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Whether the session is logged in (cheaper than [`Session::caller`]).
    pub fn is_authenticated(&self) -> bool {
        matches!(&*self.auth.lock().unwrap_or_else(|p| p.into_inner()), SessionAuth::Authenticated(_))
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

    /// Change who the session is; any idle limit or paired account of the
    /// previous login ends with it.
    pub fn set(&self, a: SessionAuth) {
        self.checked_generation.store(0, std::sync::atomic::Ordering::Release);
        *self.auth.lock().unwrap_or_else(|p| p.into_inner()) = a;
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.pairing_account.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(super) fn set_idle_limit(&self, ttl: Duration) {
        *self.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(IdleExpiry { ttl, last_used: Instant::now() });
    }

    /// The idle lifetime of a token session.
    pub fn token_lifetime(&self) -> Option<Duration> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).map(|i| i.ttl)
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
    pub(super) fn touch(&self) -> Result<(), Duration> {
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

    /// For a pairing session: whether it may act on `username`. The first
    /// account named binds the session to it; any other is refused.
    pub fn pairing_may_use(&self, username: &str) -> Result<(), ServiceError> {
        if self.caller().is_none_or(|c| c.scope != Scope::Pairing) {
            return Ok(());
        }
        let mut bound = self.pairing_account.lock().unwrap_or_else(|p| p.into_inner());
        match bound.as_deref() {
            None => {
                *bound = Some(username.to_string());
                Ok(())
            }
            Some(b) if b == username => Ok(()),
            Some(b) => Err(ServiceError::call(
                crate::error::EACCES,
                format!("Not authorized: this pairing session pairs the account {b}, not {username}"),
            )),
        }
    }

    /// The account a pairing session is bound to (`None` for other sessions
    /// or before the first call names one).
    pub fn pairing_account(&self) -> Option<String> {
        self.pairing_account.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
