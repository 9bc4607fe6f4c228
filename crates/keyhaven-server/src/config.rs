//! Settings, declared once.
//!
//! Every setting has one entry in [`SETTINGS`]: its name (the TOML key, dotted
//! for tables), its environment variable, its command-line flag if any (and which
//! subcommands take it: [`Scope`]), its default and its documentation. Values
//! resolve as flag > env > file > default. The binary's clap flags are built from
//! the same list, keyed by setting name.
//! The README's configuration table is generated from the same list
//! (`keyhaven settings-table`) and a test keeps the two equal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Path,
    Addr,
    Bool,
    Str,
    /// A whole number within an inclusive range.
    Uint(u64, u64),
    Choice(&'static [&'static str]),
}

/// Which subcommands take a setting's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only `serve`: a setting of the running daemon (the default).
    Serve,
    /// Every subcommand that works on the local data directory (`serve`, `call`,
    /// `keypair`, `rotate-master-key`).
    AllCommands,
}

pub struct SettingDef {
    pub name: &'static str,
    pub env: &'static str,
    /// The command-line flag (`--name`), if any.
    pub flag: Option<&'static str>,
    /// The subcommands that take [`SettingDef::flag`].
    pub scope: Scope,
    pub default: &'static str,
    pub kind: Kind,
    pub doc: &'static str,
    /// Whether a running daemon applies a new value when it re-reads its
    /// configuration on SIGHUP; the others need a restart.
    pub reload: bool,
}

/// `scope:` is optional in [`settings!`]; without it a flag is `serve`'s only.
macro_rules! scope_or_serve {
    () => {
        Scope::Serve
    };
    ($scope:expr) => {
        $scope
    };
}

/// `reload:` is optional in [`settings!`]; without it a change needs a restart.
macro_rules! reload_or_not {
    () => {
        false
    };
    ($reload:expr) => {
        $reload
    };
}

/// Declares every setting once: the [`Config`] field and its type, the TOML
/// key, the environment variable, the flag (and its optional [`Scope`]), the
/// default, the check and the documentation. From it come [`SETTINGS`] (file
/// keys, command-line flags, README table, the environment) and the typed
/// [`Config`] built from resolved values.
macro_rules! settings {
    ($(
        $field:ident: $ty:ty {
            name: $name:literal,
            env: $env:literal,
            flag: $flag:expr,
            $(scope: $scope:expr,)?
            default: $default:literal,
            kind: $kind:expr,
            $(reload: $reload:expr,)?
            doc: $doc:literal $(,)?
        }
    ),* $(,)?) => {
        pub const SETTINGS: &[SettingDef] = &[$(SettingDef {
            name: $name,
            env: $env,
            flag: $flag,
            scope: scope_or_serve!($($scope)?),
            default: $default,
            kind: $kind,
            doc: $doc,
            reload: reload_or_not!($($reload)?),
        }),*];

        /// Resolved configuration.
        #[derive(Debug, Clone)]
        pub struct Config {
            $(#[doc = $doc] pub $field: $ty,)*
        }

        impl Config {
            /// Each setting's value, checked (see [`check_kind`]) and converted.
            fn from_values(values: &Resolved) -> Result<Config, ConfigError> {
                Ok(Config { $($field: values.get::<$ty>($name)?,)* })
            }

            /// The names of the settings whose values differ between `self` and `other`.
            pub fn changed_settings(&self, other: &Config) -> Vec<&'static str> {
                let mut changed = Vec::new();
                $(if format!("{:?}", self.$field) != format!("{:?}", other.$field) {
                    changed.push($name);
                })*
                changed
            }
        }
    };
}

settings! {
    data_dir: PathBuf {
        name: "data_dir",
        env: "KEYHAVEN_DATA_DIR",
        flag: Some("--data-dir"),
        scope: Scope::AllCommands,
        default: "./keyhaven-data",
        kind: Kind::Path,
        doc: "Directory holding the database, master.key, sshd files and TLS material (created 0711 on first start).",
    },
    database: DatabaseUrl {
        name: "database",
        env: "KEYHAVEN_DATABASE",
        flag: Some("--database"),
        default: "",
        kind: Kind::Str,
        doc: "Where the state lives: empty = the embedded SQLite database in data_dir (the default); `postgres://user:password@host:5432/dbname` = a PostgreSQL database (see docs/cluster.md; master.key stays in data_dir and every node needs the same one). TLS: add `sslmode=verify-full` or `sslmode=require` (both verify the server's certificate and host name with rustls, so `require` is stricter than libpq's) and `sslrootcert=FILE` (PEM; default: the system's roots). The password is never logged.",
    },
    listen: SocketAddr {
        name: "listen",
        env: "KEYHAVEN_LISTEN",
        flag: Some("--listen"),
        default: "127.0.0.1:8080",
        kind: Kind::Addr,
        doc: "Address and port of the API and web UI. Plain HTTP only on loopback; any other address is served over TLS. Port 0 picks a free port.",
    },
    tls: bool {
        name: "tls",
        env: "KEYHAVEN_TLS",
        flag: None,
        default: "false",
        kind: Kind::Bool,
        doc: "Serve TLS on a loopback address too (non-loopback addresses always use TLS).",
    },
    tls_cert: Option<PathBuf> {
        name: "tls_cert",
        env: "KEYHAVEN_TLS_CERT",
        flag: None,
        default: "",
        kind: Kind::Path,
        reload: true,
        doc: "PEM certificate chain to serve; empty = a self-signed certificate generated into <data>/tls/. Read again on every reload (SIGHUP), so a renewed certificate is served without a restart.",
    },
    tls_key: Option<PathBuf> {
        name: "tls_key",
        env: "KEYHAVEN_TLS_KEY",
        flag: None,
        default: "",
        kind: Kind::Path,
        reload: true,
        doc: "PEM private key for tls_cert.",
    },
    log: String {
        name: "log",
        env: "KEYHAVEN_LOG",
        flag: None,
        default: "info",
        kind: Kind::Str,
        reload: true,
        doc: "Log filter (tracing EnvFilter syntax, e.g. `info,keyhaven_server=debug`). Logs go to stderr and never contain secrets.",
    },
    log_format: LogFormat {
        name: "log_format",
        env: "KEYHAVEN_LOG_FORMAT",
        flag: None,
        default: "text",
        kind: Kind::Choice(&["text", "json"]),
        doc: "`text` = human-readable lines; `json` = one JSON object per line (`timestamp`, `level`, `fields.message`, other fields), for journald or Loki.",
    },
    sshd_path: PathBuf {
        name: "sshd_path",
        env: "KEYHAVEN_SSHD_PATH",
        flag: None,
        default: "/usr/sbin/sshd",
        kind: Kind::Path,
        doc: "Absolute path of OpenSSH's sshd (Debian package openssh-server).",
    },
    manage_os_accounts: bool {
        name: "accounts.manage_os",
        env: "KEYHAVEN_ACCOUNTS_MANAGE_OS",
        flag: None,
        default: "false",
        kind: Kind::Bool,
        doc: "Create, change and remove OS accounts (useradd/usermod/userdel) for keyhaven accounts. Off: an account's OS account must already exist.",
    },
    authorized_keys_location: KeysLocationSetting {
        name: "ssh.authorized_keys_location",
        env: "KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION",
        flag: None,
        default: "data",
        kind: Kind::Choice(&["data", "home"]),
        doc: "Where account keys are written: `data` = <data>/sshd/authorized_keys/<user> (root-owned), `home` = ~/.ssh/authorized_keys as TrueNAS does.",
    },
    allowed_origins: Origins {
        name: "allowed_origins",
        env: "KEYHAVEN_ALLOWED_ORIGINS",
        flag: None,
        default: "",
        kind: Kind::Str,
        reload: true,
        doc: "Extra browser origins (comma-separated, e.g. `https://nas.example:8443`) allowed to open the API's WebSocket. Pages served by keyhaven itself (same host and port, by IP address, `localhost` or this machine's name) are always allowed; requests without an `Origin` (non-browser clients) too; any other origin gets 403.",
    },
    max_connections: usize {
        name: "limits.max_connections",
        env: "KEYHAVEN_LIMITS_MAX_CONNECTIONS",
        flag: None,
        default: "1024",
        kind: Kind::Uint(16, 1_000_000),
        doc: "Most TCP connections served at once (also kept below the open-file limit). When full, the oldest connection that has not logged in is closed to make room, so an admin can always log in.",
    },
    max_connections_per_address: usize {
        name: "limits.max_connections_per_address",
        env: "KEYHAVEN_LIMITS_MAX_CONNECTIONS_PER_ADDRESS",
        flag: None,
        default: "64",
        kind: Kind::Uint(1, 1_000_000),
        doc: "Most TCP connections from one source address; further ones are closed at once.",
    },
    header_read_timeout: std::time::Duration {
        name: "limits.header_read_timeout",
        env: "KEYHAVEN_LIMITS_HEADER_READ_TIMEOUT",
        flag: None,
        default: "10",
        kind: Kind::Uint(1, 3600),
        doc: "Seconds a client has to send a complete HTTP request head (and to finish a TLS handshake); idle keep-alive connections are closed after the same time.",
    },
    login_timeout: std::time::Duration {
        name: "limits.login_timeout",
        env: "KEYHAVEN_LIMITS_LOGIN_TIMEOUT",
        flag: None,
        default: "30",
        kind: Kind::Uint(1, 3600),
        doc: "Seconds a WebSocket that has not logged in may stay silent before it is closed.",
    },
    password_checks: usize {
        name: "limits.password_checks",
        env: "KEYHAVEN_LIMITS_PASSWORD_CHECKS",
        flag: None,
        default: "0",
        kind: Kind::Uint(0, 256),
        doc: "Password hashes (Argon2id, about 19 MiB each) computed at once; others wait up to 3 s, then are told to retry. 0 = two per CPU core.",
    },
    lockout_after: u32 {
        name: "auth.lockout_after",
        env: "KEYHAVEN_AUTH_LOCKOUT_AFTER",
        flag: None,
        default: "10",
        kind: Kind::Uint(1, 1000),
        doc: "Failed logins for one account from one address after which that pair is refused for `auth.lockout_seconds` (failures are slowed from the third). The same account from other addresses is only slowed, never refused.",
    },
    address_lockout_after: u32 {
        name: "auth.address_lockout_after",
        env: "KEYHAVEN_AUTH_ADDRESS_LOCKOUT_AFTER",
        flag: None,
        default: "20",
        kind: Kind::Uint(1, 10000),
        doc: "Failed logins from one address, whatever the account names, after which the address is refused for `auth.lockout_seconds`.",
    },
    lockout: std::time::Duration {
        name: "auth.lockout_seconds",
        env: "KEYHAVEN_AUTH_LOCKOUT_SECONDS",
        flag: None,
        default: "300",
        kind: Kind::Uint(1, 86400),
        doc: "How long a locked account/address pair or address is refused. Refused attempts are summarised in one audit entry per lock.",
    },
    audit_retention_days: u64 {
        name: "audit.retention_days",
        env: "KEYHAVEN_AUDIT_RETENTION_DAYS",
        flag: None,
        default: "90",
        kind: Kind::Uint(1, 36500),
        reload: true,
        doc: "Audit entries older than this many days are deleted (checked hourly).",
    },
    metrics_listen: Option<SocketAddr> {
        name: "metrics.listen",
        env: "KEYHAVEN_METRICS_LISTEN",
        flag: None,
        default: "",
        kind: Kind::Addr,
        doc: "A second, plain-HTTP listener that serves only `GET /metrics` without login (e.g. `127.0.0.1:9464` for a local Prometheus). Loopback addresses only; empty = off. On the main listener `/metrics` always needs an API key (`Authorization: Bearer`).",
    },
    disk_min_free_mib: u64 {
        name: "health.disk_min_free_mib",
        env: "KEYHAVEN_HEALTH_DISK_MIN_FREE_MIB",
        flag: None,
        default: "64",
        kind: Kind::Uint(0, 16_777_216),
        reload: true,
        doc: "`GET /healthz` reports `disk` failed when the data dir's file system has less than this many MiB available (or no free inodes). 0 = only the inode check.",
    },
}

/// The admin password used on first start only (never stored in a file keyhaven reads back).
pub const ADMIN_PASSWORD_ENV: &str = "KEYHAVEN_ADMIN_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown setting `{key}` in {path}; known settings: {known}")]
    Unknown { key: String, path: PathBuf, known: String },
    #[error("setting `{name}` ({source_desc}): {message}")]
    Invalid { name: String, source_desc: String, message: String },
}

impl Config {
    /// Whether account keys live in `~/.ssh/authorized_keys` (else in the data dir).
    pub fn authorized_keys_in_home(&self) -> bool {
        self.authorized_keys_location == KeysLocationSetting::Home
    }

    /// Whether the listener must use TLS (non-loopback, or forced).
    pub fn use_tls(&self) -> bool {
        self.tls || !self.listen.ip().is_loopback()
    }

    /// Resolve from flags (`name` → value), the environment and an optional file.
    pub fn resolve(
        flags: &BTreeMap<&'static str, String>,
        env: &dyn Fn(&str) -> Option<String>,
        file: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        let file_values = match file {
            Some(p) => read_file(p)?,
            None => BTreeMap::new(),
        };
        let mut values: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
        for def in SETTINGS {
            let (v, src) = if let Some(v) = flags.get(def.name) {
                (v.clone(), format!("flag {}", def.flag.unwrap_or(def.name)))
            } else if let Some(v) = env(def.env) {
                (v, format!("environment variable {}", def.env))
            } else if let Some(v) = file_values.get(def.name) {
                (v.clone(), format!("config file {}", file.map(|p| p.display().to_string()).unwrap_or_default()))
            } else {
                (def.default.to_string(), "default".to_string())
            };
            check_kind(def, &v, &src)?;
            values.insert(def.name, (v, src));
        }
        let values = Resolved(values);
        let cfg = Config::from_values(&values)?;
        if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                name: "tls_cert".into(),
                source_desc: values.source("tls_cert"),
                message: "tls_cert and tls_key must be set together".into(),
            });
        }
        if let Some(addr) = cfg.metrics_listen {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid {
                    name: "metrics.listen".into(),
                    source_desc: values.source("metrics.listen"),
                    message: format!(
                        "{addr} is not a loopback address: this listener serves metrics without login, so it only \
                         binds 127.0.0.1 or [::1]; scrape remote systems through the main listener with an API key"
                    ),
                });
            }
        }
        if !cfg.sshd_path.is_absolute() {
            return Err(ConfigError::Invalid {
                name: "sshd_path".into(),
                source_desc: values.source("sshd_path"),
                message: "must be an absolute path (sshd refuses to re-exec otherwise)".into(),
            });
        }
        Ok(cfg)
    }
}

/// Resolved values (value, where it came from) by setting name.
struct Resolved(BTreeMap<&'static str, (String, String)>);

impl Resolved {
    fn get<T: FromSetting>(&self, name: &'static str) -> Result<T, ConfigError> {
        let (v, src) = &self.0[name];
        T::from_setting(v).map_err(|e| ConfigError::Invalid {
            name: name.into(),
            source_desc: src.clone(),
            message: e.to_string(),
        })
    }

    fn source(&self, name: &'static str) -> String {
        self.0[name].1.clone()
    }
}

/// Why a setting's value cannot be read as its [`Config`] field's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadValue {
    #[error("`{0}` is not an ADDRESS:PORT such as 127.0.0.1:8080 or [::1]:8080")]
    NotAddress(String),
    #[error("`{0}` is not a boolean (use true or false)")]
    NotBool(String),
    #[error("`{0}` is not a whole number")]
    NotNumber(String),
    #[error("`{value}` is not one of {choices}")]
    NotOneOf { value: String, choices: &'static str },
    #[error("`{0}` is not an origin such as https://nas.example:8443 (scheme, host, optional port; no path)")]
    NotOrigin(String),
    /// The value is not repeated: it may carry a password.
    #[error("the value is not a postgres:// or postgresql:// URL; leave it empty for the embedded SQLite database")]
    NotDatabaseUrl,
}

/// Conversion of a checked setting value into its [`Config`] field.
pub trait FromSetting: Sized {
    fn from_setting(v: &str) -> Result<Self, BadValue>;
}

impl FromSetting for String {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        Ok(v.to_string())
    }
}

impl FromSetting for PathBuf {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        Ok(PathBuf::from(v))
    }
}

/// Empty means unset.
impl FromSetting for Option<PathBuf> {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        Ok(Some(v).filter(|v| !v.is_empty()).map(PathBuf::from))
    }
}

impl FromSetting for SocketAddr {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        v.parse().map_err(|_| BadValue::NotAddress(v.to_string()))
    }
}

/// The `database` setting: `None` = embedded SQLite. The URL may carry a
/// password, so it is kept secret and `Debug` shows it with the password masked.
#[derive(Clone, Default)]
pub struct DatabaseUrl(Option<secrecy::SecretString>);

impl DatabaseUrl {
    /// The URL to connect with (empty for SQLite). Never log it.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.as_ref().map(|s| s.expose_secret()).unwrap_or("")
    }

    pub fn is_postgres(&self) -> bool {
        self.0.is_some()
    }

    /// The URL with any password replaced by `***`, for messages.
    pub fn masked(&self) -> String {
        let url = self.expose();
        let Some((scheme, rest)) = url.split_once("://") else { return String::new() };
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map(|(u, _)| format!("{u}:***")).unwrap_or(userinfo.to_string());
                // A password may also come as a query parameter.
                let tail = match tail.split_once("password=") {
                    Some((before, after)) => {
                        let end = after.find('&').map(|i| &after[i..]).unwrap_or("");
                        format!("{before}password=***{end}")
                    }
                    None => tail.to_string(),
                };
                format!("{scheme}://{user}@{host}{tail}")
            }
            None => match tail.split_once("password=") {
                Some((before, after)) => {
                    let end = after.find('&').map(|i| &after[i..]).unwrap_or("");
                    format!("{scheme}://{authority}{before}password=***{end}")
                }
                None => url.to_string(),
            },
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("DatabaseUrl(embedded SQLite)"),
            Some(_) => write!(f, "DatabaseUrl({})", self.masked()),
        }
    }
}

impl FromSetting for DatabaseUrl {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        let v = v.trim();
        if v.is_empty() {
            return Ok(DatabaseUrl(None));
        }
        if !(v.starts_with("postgres://") || v.starts_with("postgresql://")) {
            return Err(BadValue::NotDatabaseUrl);
        }
        Ok(DatabaseUrl(Some(secrecy::SecretString::from(v.to_string()))))
    }
}

impl FromSetting for bool {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        parse_bool(v).ok_or_else(|| BadValue::NotBool(v.to_string()))
    }
}

macro_rules! from_setting_uint {
    ($($t:ty),*) => {$(
        impl FromSetting for $t {
            fn from_setting(v: &str) -> Result<Self, BadValue> {
                v.trim().parse().map_err(|_| BadValue::NotNumber(v.to_string()))
            }
        }
    )*};
}
from_setting_uint!(u32, u64, usize);

/// Durations are set in whole seconds.
impl FromSetting for std::time::Duration {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        u64::from_setting(v).map(std::time::Duration::from_secs)
    }
}

/// Empty means unset.
impl FromSetting for Option<SocketAddr> {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        match v.trim() {
            "" => Ok(None),
            v => SocketAddr::from_setting(v).map(Some),
        }
    }
}

/// How log lines are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromSetting for LogFormat {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        match v {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(BadValue::NotOneOf { value: v.to_string(), choices: "text, json" }),
        }
    }
}

/// Where account keys are written (`ssh.authorized_keys_location`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysLocationSetting {
    /// Per-user files under the data dir, which sshd reads.
    Data,
    /// Each account's `~/.ssh/authorized_keys`.
    Home,
}

impl FromSetting for KeysLocationSetting {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        match v {
            "data" => Ok(KeysLocationSetting::Data),
            "home" => Ok(KeysLocationSetting::Home),
            _ => Err(BadValue::NotOneOf { value: v.to_string(), choices: "data, home" }),
        }
    }
}

/// Browser origins allowed besides keyhaven's own (`scheme://host[:port]`,
/// lower-case, no trailing slash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(pub Vec<String>);

impl std::ops::Deref for Origins {
    type Target = [String];
    fn deref(&self) -> &[String] {
        &self.0
    }
}

impl FromSetting for Origins {
    fn from_setting(v: &str) -> Result<Self, BadValue> {
        let list: Vec<String> = v
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect();
        for o in &list {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.matches('/').count() != 2 {
                return Err(BadValue::NotOrigin(o.clone()));
            }
        }
        Ok(Origins(list))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

fn check_kind(def: &SettingDef, v: &str, src: &str) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Invalid { name: def.name.into(), source_desc: src.into(), message };
    match def.kind {
        Kind::Choice(choices) => {
            if !choices.contains(&v) {
                return Err(bad(format!("`{v}` is not one of {}", choices.join(", "))));
            }
        }
        Kind::Uint(lo, hi) => match v.trim().parse::<u64>() {
            Ok(n) if (lo..=hi).contains(&n) => {}
            _ => return Err(bad(format!("`{v}` is not a whole number from {lo} to {hi}"))),
        },
        // Converted (and refused with a message) by the field's FromSetting.
        Kind::Path | Kind::Str | Kind::Addr | Kind::Bool => {}
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
    let mut out = BTreeMap::new();
    flatten("", &toml::Value::Table(table), &mut out, path)?;
    if out.get("database").is_some_and(|url| url_carries_password(url)) {
        refuse_readable_by_others(path)?;
    }
    Ok(out)
}

/// Whether a database URL holds a password (in its user info or as a
/// `password=` parameter).
fn url_carries_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let in_userinfo = authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'));
    in_userinfo || rest.split_once('?').is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("password=")))
}

/// A config file holding the database password must be readable by its
/// owner alone: whoever can write to the database can put a public key on
/// any account this node serves (the package installs the file 0644, as it
/// holds no secret until `database` is set).
fn refuse_readable_by_others(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.into(), source })?.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        name: "database".into(),
        source_desc: format!("config file {}", path.display()),
        message: format!(
            "the URL holds the database password and the file can be read by other users (mode {:04o}): \
             run `chmod 0600 {}`, or give the URL through KEYHAVEN_DATABASE from a file only root can read",
            mode & 0o7777,
            path.display()
        ),
    })
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>, path: &Path) -> Result<(), ConfigError> {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                let is_known_table = SETTINGS.iter().any(|d| d.name.starts_with(&format!("{key}.")));
                if matches!(v, toml::Value::Table(_)) && is_known_table {
                    flatten(&key, v, out, path)?;
                } else if SETTINGS.iter().any(|d| d.name == key) {
                    let s = match v {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Boolean(b) => b.to_string(),
                        toml::Value::Integer(i) => i.to_string(),
                        other => {
                            return Err(ConfigError::Invalid {
                                name: key,
                                source_desc: format!("config file {}", path.display()),
                                message: format!("unsupported value {other}"),
                            })
                        }
                    };
                    out.insert(key, s);
                } else {
                    return Err(ConfigError::Unknown {
                        key,
                        path: path.into(),
                        known: SETTINGS.iter().map(|d| d.name).collect::<Vec<_>>().join(", "),
                    });
                }
            }
            Ok(())
        }
        _ => unreachable!("only tables are flattened"),
    }
}

/// The README's configuration table, generated from [`SETTINGS`].
pub fn markdown_table() -> String {
    let mut s = String::from("| setting (TOML) | flag | environment | default | meaning |\n|---|---|---|---|---|\n");
    for d in SETTINGS {
        let default = if d.default.is_empty() { "(none)".to_string() } else { format!("`{}`", d.default) };
        s.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} |\n",
            d.name,
            d.flag.map(|f| format!("`{f}`")).unwrap_or_else(|| "—".into()),
            d.env,
            default,
            d.doc
        ));
    }
    s.push_str(&format!(
        "| — | — | `{ADMIN_PASSWORD_ENV}` | (generated) | Password of the `admin` account, used on first start only; otherwise one is generated and written to `<data>/initial-admin-password` (0600), and the log says where (the password itself is never logged). |\n"
    ));
    s
}

/// A commented TOML configuration file, generated from [`SETTINGS`]: every
/// setting with what it means, where else it can be set, whether SIGHUP
/// applies it, and its default as a commented-out line (`# key = value`), so
/// that the file means the defaults and uncommenting a line is all it takes to
/// change one. `set` gives settings an active line with another value (the
/// package sets `data_dir`); each value must pass the setting's check.
pub fn toml_template(set: &[(&str, &str)]) -> String {
    let mut out = String::from(
        "# keyhaven configuration (TOML), generated by `keyhaven config-template`.\n\
         #\n\
         # Values resolve as command-line flag > environment variable > this file > default.\n\
         # A commented-out line shows a setting's default; uncomment it to change the value.\n\
         # `systemctl reload keyhaven` (SIGHUP) re-reads this file and applies the settings\n\
         # marked \"applied on reload\"; the others need `systemctl restart keyhaven`.\n",
    );
    // Top-level keys must come before the first table header.
    let mut tables: Vec<&str> = Vec::new();
    for d in SETTINGS {
        if let Some((table, _)) = d.name.split_once('.') {
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
    }
    let section = |out: &mut String, table: Option<&str>| {
        for d in SETTINGS {
            let (t, key) = match d.name.split_once('.') {
                Some((t, k)) => (Some(t), k),
                None => (None, d.name),
            };
            if t != table {
                continue;
            }
            out.push('\n');
            for line in wrap(d.doc, 86) {
                out.push_str(&format!("# {line}\n"));
            }
            let mut how = format!("Environment: {}", d.env);
            if let Some(f) = d.flag {
                how.push_str(&format!("; flag: {f}"));
            }
            how.push_str(if d.reload { "; applied on reload." } else { "; needs a restart." });
            out.push_str(&format!("# {how}\n"));
            let value = |v: &str| match d.kind {
                Kind::Bool => parse_bool(v).unwrap_or(false).to_string(),
                Kind::Uint(..) => v.trim().to_string(),
                _ => toml::Value::String(v.to_string()).to_string(),
            };
            match set.iter().find(|(n, _)| *n == d.name) {
                Some((_, v)) => {
                    out.push_str(&format!("# Default: {}\n", value(d.default)));
                    out.push_str(&format!("{key} = {}\n", value(v)));
                }
                None => out.push_str(&format!("# {key} = {}\n", value(d.default))),
            }
        }
    };
    section(&mut out, None);
    for t in tables {
        out.push_str(&format!("\n[{t}]\n"));
        section(&mut out, Some(t));
    }
    out
}

/// Words of `text` in lines of at most `width` characters (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_is_checked_and_its_password_never_shown() {
        assert!(!DatabaseUrl::from_setting("").unwrap().is_postgres());
        let u = DatabaseUrl::from_setting("postgres://kh:s3cret@db.example:5432/keyhaven?sslmode=disable").unwrap();
        assert!(u.is_postgres());
        assert_eq!(u.expose(), "postgres://kh:s3cret@db.example:5432/keyhaven?sslmode=disable");
        let shown = format!("{u:?}");
        assert!(!shown.contains("s3cret") && shown.contains("kh:***@db.example:5432/keyhaven"), "{shown}");
        let q = DatabaseUrl::from_setting("postgresql://db/k?user=kh&password=s3cret&sslmode=disable").unwrap();
        assert!(!format!("{q:?}").contains("s3cret"), "{q:?}");
        let e = DatabaseUrl::from_setting("mysql://root:s3cret@db/x").unwrap_err().to_string();
        assert!(e.contains("postgres://") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn a_config_file_holding_the_database_password_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyhaven.toml");
        let chmod = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        for url in ["postgres://kh:s3cret@db.example/k", "postgres://kh@db.example/k?sslmode=disable&password=s3cret"] {
            std::fs::write(&path, format!("database = \"{url}\"\n")).unwrap();
            for mode in [0o644, 0o640, 0o604] {
                chmod(mode);
                let e = read_file(&path).unwrap_err().to_string();
                assert!(e.contains("`database`") && e.contains("chmod 0600") && !e.contains("s3cret"), "{e}");
            }
            chmod(0o600);
            assert_eq!(read_file(&path).unwrap()["database"], url);
        }
        // Without a password (peer or certificate authentication, a .pgpass)
        // the file holds no secret and may stay as packaged.
        std::fs::write(&path, "database = \"postgres://kh@db.example/k?sslmode=verify-full\"\n").unwrap();
        chmod(0o644);
        assert!(read_file(&path).is_ok());
        assert!(!url_carries_password("postgres://kh@db.example/k?passwordless=1"));
        assert!(url_carries_password("postgresql://kh:pw@db/k"));
    }

    fn resolve(
        flags: &[(&'static str, &str)],
        env: &[(&str, &str)],
        file: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let flags = flags.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        if let Some(f) = file {
            std::fs::write(&path, f).unwrap();
        }
        Config::resolve(&flags, &|k| env.get(k).cloned(), file.map(|_| path.as_path()))
    }

    #[test]
    fn flags_are_unique_long_options() {
        let flags: Vec<&str> = SETTINGS.iter().filter_map(|d| d.flag).collect();
        for f in &flags {
            let long = f.strip_prefix("--").unwrap_or_else(|| panic!("flag {f} must start with --"));
            assert!(!long.is_empty() && long.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{f}");
            assert_eq!(flags.iter().filter(|g| *g == f).count(), 1, "{f} is declared twice");
        }
        // `--config FILE` names the file; the CLI keys flags by setting name.
        assert!(!flags.contains(&"--config") && SETTINGS.iter().all(|d| d.name != "config"));
        let data_dir = SETTINGS.iter().find(|d| d.name == "data_dir").unwrap();
        assert_eq!(data_dir.scope, Scope::AllCommands);
    }

    #[test]
    fn precedence_flag_env_file_default() {
        let c = resolve(&[], &[], None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.data_dir, PathBuf::from("./keyhaven-data"));
        let c = resolve(&[], &[], Some("listen = \"127.0.0.1:1\"\n")).unwrap();
        assert_eq!(c.listen.port(), 1);
        let c = resolve(&[], &[("KEYHAVEN_LISTEN", "127.0.0.1:2")], Some("listen = \"127.0.0.1:1\"\n")).unwrap();
        assert_eq!(c.listen.port(), 2);
        let c = resolve(
            &[("listen", "127.0.0.1:3")],
            &[("KEYHAVEN_LISTEN", "127.0.0.1:2")],
            Some("listen = \"127.0.0.1:1\"\n"),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 3);
    }

    #[test]
    fn nested_tables_and_unknown_keys() {
        let c = resolve(&[], &[], Some("[accounts]\nmanage_os = true\n[ssh]\nauthorized_keys_location = \"home\"\n"))
            .unwrap();
        assert!(c.manage_os_accounts);
        assert!(c.authorized_keys_in_home());
        let e = resolve(&[], &[], Some("listne = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("unknown setting `listne`"), "{e}");
        let e = resolve(&[], &[], Some("[accounts]\nmanage = true\n")).unwrap_err();
        assert!(e.to_string().contains("accounts.manage"), "{e}");
        let e = resolve(&[], &[], Some("[ssh]\nauthorized_keys_location = \"elsewhere\"\n")).unwrap_err();
        assert!(e.to_string().contains("not one of data, home"), "{e}");
    }

    #[test]
    fn tls_rules() {
        assert!(!resolve(&[], &[], None).unwrap().use_tls());
        assert!(resolve(&[("listen", "0.0.0.0:8443")], &[], None).unwrap().use_tls());
        assert!(resolve(&[], &[("KEYHAVEN_TLS", "true")], None).unwrap().use_tls());
        assert!(resolve(&[], &[("KEYHAVEN_TLS_CERT", "/x")], None).is_err());
        assert!(resolve(&[("listen", "nonsense")], &[], None).unwrap_err().to_string().contains("flag --listen"));
    }

    #[test]
    fn metrics_listener_is_loopback_only() {
        assert_eq!(resolve(&[], &[], None).unwrap().metrics_listen, None);
        let c = resolve(&[], &[], Some("[metrics]\nlisten = \"127.0.0.1:9464\"\n")).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let c = resolve(&[], &[("KEYHAVEN_METRICS_LISTEN", "[::1]:0")], None).unwrap();
        assert!(c.metrics_listen.is_some_and(|a| a.ip().is_loopback()));
        for bad in ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"] {
            let e = resolve(&[], &[("KEYHAVEN_METRICS_LISTEN", bad)], None).unwrap_err().to_string();
            assert!(e.contains("metrics.listen") && e.contains("not a loopback address"), "{e}");
        }
        let e = resolve(&[], &[("KEYHAVEN_LOG_FORMAT", "xml")], None).unwrap_err().to_string();
        assert!(e.contains("log_format") && e.contains("text, json"), "{e}");
        assert_eq!(resolve(&[], &[("KEYHAVEN_LOG_FORMAT", "json")], None).unwrap().log_format, LogFormat::Json);
    }

    #[test]
    fn typed_values_and_their_refusals() {
        let c = resolve(
            &[],
            &[("KEYHAVEN_ALLOWED_ORIGINS", "https://NAS.example:8443/, http://10.0.0.2"), ("KEYHAVEN_TLS", "yes")],
            Some("[auth]\nlockout_seconds = 60\n"),
        )
        .unwrap();
        assert_eq!(&*c.allowed_origins, ["https://nas.example:8443", "http://10.0.0.2"]);
        assert_eq!(c.lockout, std::time::Duration::from_secs(60));
        assert!(c.tls && !c.authorized_keys_in_home());
        let e = resolve(&[], &[("KEYHAVEN_ALLOWED_ORIGINS", "https://nas/path")], None).unwrap_err().to_string();
        assert!(
            e.contains("allowed_origins") && e.contains("KEYHAVEN_ALLOWED_ORIGINS") && e.contains("no path"),
            "{e}"
        );
        let e = resolve(&[], &[("KEYHAVEN_TLS", "maybe")], None).unwrap_err().to_string();
        assert!(e.contains("not a boolean"), "{e}");
    }

    /// The template with each setting's commented-out default (the line after
    /// its `# Environment: …` line) made active.
    fn uncomment_defaults(template: &str) -> String {
        let mut out = Vec::new();
        let mut after_env = false;
        for l in template.lines() {
            out.push(if after_env { l.strip_prefix("# ").unwrap_or(l) } else { l });
            after_env = l.starts_with("# Environment: ");
        }
        out.join("\n")
    }

    #[test]
    fn the_config_template_holds_every_setting_at_its_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyhaven.toml");
        let template = toml_template(&[]);
        // As generated: every setting commented out, so the file means the defaults.
        std::fs::write(&path, &template).unwrap();
        assert!(read_file(&path).unwrap().is_empty(), "{template}");
        // Uncommented, each line sets its setting to the declared default, under the right table.
        let active = uncomment_defaults(&template);
        std::fs::write(&path, &active).unwrap();
        let values = read_file(&path).unwrap();
        for d in SETTINGS {
            assert_eq!(values.get(d.name).map(String::as_str), Some(d.default), "{} in\n{active}", d.name);
            assert!(template.contains(&format!("Environment: {}", d.env)), "{}", d.name);
        }
        assert_eq!(values.len(), SETTINGS.len());
        let from_file = Config::resolve(&BTreeMap::new(), &|_| None, Some(&path)).unwrap();
        let defaults = Config::resolve(&BTreeMap::new(), &|_| None, None).unwrap();
        assert!(from_file.changed_settings(&defaults).is_empty(), "{:?}", from_file.changed_settings(&defaults));
    }

    #[test]
    fn the_config_template_sets_what_it_is_asked_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyhaven.toml");
        let template = toml_template(&[("data_dir", "/var/lib/keyhaven"), ("limits.login_timeout", "45")]);
        std::fs::write(&path, &template).unwrap();
        let c = Config::resolve(&BTreeMap::new(), &|_| None, Some(&path)).unwrap();
        let defaults = Config::resolve(&BTreeMap::new(), &|_| None, None).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/keyhaven"));
        assert_eq!(c.login_timeout, std::time::Duration::from_secs(45));
        assert_eq!(c.changed_settings(&defaults), ["data_dir", "limits.login_timeout"]);
    }
}
