//! Accounts: the built-in `root` and `admin`, the non-secret fields TrueNAS
//! exposes on `user` entries, and first-start bootstrap.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{hash_password, random_alnum};
use super::input::{self, Secret};
use super::App;
use crate::error::ServiceError;
use keyhaven_store::{Store, UserRecord};

/// Longest `auth.set_attribute` key.
const MAX_ATTRIBUTE_KEY: usize = 64;
/// Largest serialised `attributes` of one account.
const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

/// Non-secret account fields, stored as the `data` JSON of a user row.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct UserData {
    pub uid: i64,
    pub gid: i64,
    pub full_name: String,
    pub home: String,
    pub shell: String,
    pub email: Option<String>,
    pub group: String,
    pub ssh_password_enabled: bool,
    pub password_disabled: bool,
    pub locked: bool,
    pub sudo_commands: Vec<String>,
    pub sudo_commands_nopasswd: Vec<String>,
    pub builtin: bool,
    pub roles: Vec<String>,
    pub sshpubkey: Option<String>,
    pub twofactor_enabled: bool,
    /// The account's own preferences (`auth.set_attribute`, shown by `auth.me`),
    /// e.g. the web UI's session timeout.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Whether an OS account of this name belonged to it when keyhaven set it
    /// up. `false` for an API-only account (the built-in `admin` on a system
    /// without such an OS account): it has no SSH login.
    pub os_account: bool,
}

impl Default for UserData {
    fn default() -> Self {
        UserData {
            uid: 0,
            gid: 0,
            full_name: String::new(),
            home: "/var/empty".into(),
            shell: "/usr/sbin/nologin".into(),
            email: None,
            group: String::new(),
            ssh_password_enabled: false,
            password_disabled: false,
            locked: false,
            sudo_commands: vec![],
            sudo_commands_nopasswd: vec![],
            builtin: false,
            roles: vec![],
            sshpubkey: None,
            twofactor_enabled: false,
            attributes: serde_json::Map::new(),
            os_account: true,
        }
    }
}

impl UserData {
    pub fn from_record(r: &UserRecord) -> UserData {
        serde_json::from_value(r.data.clone()).unwrap_or_else(|e| {
            tracing::error!(user = %r.username, "stored account data is unreadable ({e}); treating the account as locked");
            UserData { locked: true, ..UserData::default() }
        })
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("UserData serialises")
    }
}

/// uid, home and shell of an OS account, from /etc/passwd.
pub fn os_account(username: &str) -> Option<(i64, String, String)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == username).then(|| (f[2].parse().unwrap_or(-1), f[5].to_string(), f[6].to_string()))
    })
}

/// Result of first-start bootstrap: the admin password when it was generated.
pub struct Bootstrap {
    pub generated_admin_password: Option<Zeroizing<String>>,
}

/// Create `root` and `admin` on first start. `admin_password` comes from
/// KEYHAVEN_ADMIN_PASSWORD; without it a password is generated.
pub fn bootstrap(store: &Store, admin_password: Option<Zeroizing<String>>) -> Result<Bootstrap, ServiceError> {
    if store.user_by_name("root")?.is_none() {
        let (uid, home, shell) = os_account("root").unwrap_or((0, "/root".into(), "/bin/bash".into()));
        let data = UserData {
            uid,
            gid: uid,
            full_name: "root".into(),
            home,
            shell,
            group: "root".into(),
            builtin: true,
            roles: vec!["FULL_ADMIN".into()],
            ..UserData::default()
        };
        created_here(store.user_insert("root", &data.to_value(), None))?;
    }
    let mut generated = None;
    if store.user_by_name("admin")?.is_none() {
        let password = match admin_password {
            Some(p) => p,
            None => {
                let p = Zeroizing::new(random_alnum(24));
                generated = Some(p.clone());
                p
            }
        };
        let os = os_account("admin");
        let has_os = os.is_some();
        let (uid, home, shell) = os.unwrap_or((950, "/var/empty".into(), "/usr/sbin/nologin".into()));
        let data = UserData {
            os_account: has_os,
            uid,
            gid: uid,
            full_name: "Administrator".into(),
            home,
            shell,
            group: "admin".into(),
            builtin: true,
            roles: vec!["FULL_ADMIN".into()],
            ..UserData::default()
        };
        let pw = password.clone();
        let hash = hash_password(&pw);
        if !created_here(store.user_insert("admin", &data.to_value(), Some(&hash)))? {
            // Another node won: its password (or file) is the one that counts.
            generated = None;
        }
    }
    Ok(Bootstrap { generated_admin_password: generated })
}

/// Whether a built-in account was created here: `false` when another node
/// sharing the database created it between the check and the insert (nodes
/// started together on one PostgreSQL database).
fn created_here(r: Result<i64, keyhaven_store::StoreError>) -> Result<bool, ServiceError> {
    match r {
        Ok(_) => Ok(true),
        Err(keyhaven_store::StoreError::Conflict(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The accounts area's state: the lock that serialises account writes
/// (each is a read-modify-write of the row's data), and which accounts'
/// keys this node serves. Reached through [`App::accounts`].
#[derive(Default)]
pub struct AccountsArea {
    lock: tokio::sync::Mutex<()>,
    /// Accounts whose keys this node last wrote for sshd (non-empty), with
    /// the data they were written from: what another node's change is
    /// compared with, and whose file to withdraw when the account goes.
    served: std::sync::Mutex<std::collections::HashMap<String, UserData>>,
}

/// Local accounts (`user.*`, `auth.set_attribute`, two-factor): their rows,
/// OS accounts and the authorized keys sshd reads.
pub struct Accounts<'a> {
    app: &'a App,
}

impl<'a> Accounts<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Accounts { app }
    }

    /// Hold the accounts lock: no other account write runs until the guard is dropped.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'a, ()> {
        self.app.accounts_area.lock.lock().await
    }
}

impl<'a> Accounts<'a> {
    pub fn by_name(&self, username: &str) -> Result<Option<(UserRecord, UserData)>, ServiceError> {
        Ok(self.app.store.user_by_name(username)?.map(|r| {
            let d = UserData::from_record(&r);
            (r, d)
        }))
    }
}

// ------------------------------------------------------------------ CRUD

use keyhaven_core::authorized_keys;
use keyhaven_core::error::{FieldError, ValidationErrors};
use keyhaven_ssh::accounts::{self, OsAccount};
use keyhaven_ssh::files::{KeysFileError, KeysOwner};
use serde_json::Value;

use crate::error::{EACCES, ENOENT, EPERM};

pub const ROLES: &[&str] = &["FULL_ADMIN", "READONLY_ADMIN"];

/// What a caller may set on `user.create` / `user.update`, decoded straight
/// from TrueNAS's shape (None = unchanged / default). TrueNAS-only fields
/// (`group_create`, `smb`, …) are accepted and ignored so existing clients
/// keep working.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInput {
    #[serde(default, deserialize_with = "input::capped_opt")]
    pub username: Option<String>,
    #[serde(default)]
    pub uid: Option<i64>,
    #[serde(default, deserialize_with = "input::capped_opt")]
    pub full_name: Option<String>,
    #[serde(default, deserialize_with = "input::capped_opt")]
    pub home: Option<String>,
    #[serde(default, deserialize_with = "input::capped_opt")]
    pub shell: Option<String>,
    #[serde(default, deserialize_with = "input::capped_nullable")]
    pub email: Option<Option<String>>,
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_disabled: Option<bool>,
    #[serde(default)]
    pub locked: Option<bool>,
    #[serde(default)]
    pub ssh_password_enabled: Option<bool>,
    #[serde(default, deserialize_with = "input::nullable")]
    pub sshpubkey: Option<Option<String>>,
    #[serde(default, deserialize_with = "input::capped_list_opt")]
    pub sudo_commands: Option<Vec<String>>,
    #[serde(default, deserialize_with = "input::capped_list_opt")]
    pub sudo_commands_nopasswd: Option<Vec<String>>,
    #[serde(default, deserialize_with = "input::capped_list_opt")]
    pub roles: Option<Vec<String>>,
    /// The primary group's id (TrueNAS's `group`; other shapes are ignored).
    #[serde(default, deserialize_with = "input::lenient_id")]
    pub group: Option<i64>,
    /// Create the new `home` when it does not exist (managed accounts only).
    #[serde(default)]
    pub home_create: Option<bool>,
    /// Accepted for TrueNAS compatibility and ignored: keyhaven's OS accounts
    /// use their own group, no SMB.
    #[serde(default)]
    pub group_create: Option<bool>,
    #[serde(default)]
    pub groups: Option<Vec<Value>>,
    #[serde(default)]
    pub smb: Option<bool>,
    #[serde(default, deserialize_with = "input::capped_opt")]
    pub home_mode: Option<String>,
}

impl UserInput {
    /// The size cap of `sshpubkey`, checked before anything else (relative
    /// field error, like every error of this module).
    pub fn check_size(&self) -> Result<(), ServiceError> {
        if let Some(Some(k)) = &self.sshpubkey {
            if k.len() > authorized_keys::MAX_AUTHORIZED_KEYS_BYTES {
                return Err(ServiceError::field(
                    "sshpubkey",
                    format!("Authorized keys are limited to {} bytes", authorized_keys::MAX_AUTHORIZED_KEYS_BYTES),
                ));
            }
        }
        Ok(())
    }
}

/// TrueNAS's `user` entry (plus keyhaven's `os_account`).
#[derive(Debug, Clone, Serialize)]
pub struct UserEntry {
    pub id: i64,
    pub uid: i64,
    pub username: String,
    pub unixhash: &'static str,
    pub smbhash: &'static str,
    pub home: String,
    pub shell: String,
    pub full_name: String,
    pub builtin: bool,
    pub immutable: bool,
    pub smb: bool,
    pub group: UserGroup,
    pub groups: Vec<i64>,
    pub password_disabled: bool,
    pub ssh_password_enabled: bool,
    pub sshpubkey: Option<String>,
    pub locked: bool,
    pub sudo_commands: Vec<String>,
    pub sudo_commands_nopasswd: Vec<String>,
    pub email: Option<String>,
    pub local: bool,
    pub id_type_both: bool,
    pub sid: Option<String>,
    pub roles: Vec<String>,
    pub twofactor_auth_configured: bool,
    pub os_account: OsAccountStatus,
}

/// An entry's primary group, in TrueNAS's shape.
#[derive(Debug, Clone, Serialize)]
pub struct UserGroup {
    pub bsdgrp_gid: i64,
    pub bsdgrp_group: String,
}

/// keyhaven extension: how the account's OS counterpart stands.
#[derive(Debug, Clone, Serialize)]
pub struct OsAccountStatus {
    /// `OK`, `NONE`, `MISSING` or `UID_CHANGED`.
    pub state: &'static str,
    /// Why the account's keys are not served, for people.
    pub message: Option<String>,
}

/// `user.renew_2fa_secret`: the entry and (keyhaven extension) the
/// provisioning URI, shown this once.
#[derive(Debug, Clone, Serialize)]
pub struct TwoFactorRenewed {
    #[serde(flatten)]
    pub entry: UserEntry,
    pub provisioning_uri: String,
}

/// A keys file that could not be written: EACCES, as before the checks were
/// typed; the message names the path and says what to fix.
fn keys_file_error(e: KeysFileError) -> ServiceError {
    ServiceError::call(EACCES, format!("Failed to update authorized keys: {e}"))
}

/// An account's OS counterpart as the system has it now, against what
/// keyhaven recorded when it set the account up.
#[derive(Debug, Clone)]
pub enum OsState {
    Ok(OsAccount),
    /// An API-only account: there never was an OS account of that name.
    None,
    /// No OS account of that name (removed outside keyhaven).
    Missing,
    /// The name now has another uid than the one recorded (removed and
    /// recreated outside keyhaven, or `usermod -u`): possibly another person.
    UidChanged(OsAccount),
}

impl OsState {
    pub fn of(data: &UserData, os: Option<&OsAccount>) -> OsState {
        match os {
            None if !data.os_account => OsState::None,
            None => OsState::Missing,
            Some(o) if !data.os_account => OsState::UidChanged(o.clone()),
            Some(o) if i64::from(o.uid) != data.uid => OsState::UidChanged(o.clone()),
            Some(o) => OsState::Ok(o.clone()),
        }
    }

    /// The OS account when it is the one keyhaven set up.
    pub fn ok(&self) -> Option<&OsAccount> {
        match self {
            OsState::Ok(o) => Some(o),
            _ => None,
        }
    }

    /// Why the account's keys are not served, for people.
    pub fn problem(&self, username: &str, data: &UserData) -> Option<String> {
        match self {
            OsState::Ok(_) => None,
            OsState::None => Some(format!(
                "{username} is an API account without an OS account: sshd cannot log in as it, so keys set on it \
                 would never be used. Put the keys on an account that has one, or create an OS account {username} \
                 (useradd {username}) and adopt its uid with user.update {{\"uid\": UID}}"
            )),
            OsState::Missing => Some(format!(
                "The OS account {username} no longer exists (it was removed outside keyhaven), so its keys are not \
                 served. Recreate it (useradd {username}) or delete this account"
            )),
            OsState::UidChanged(o) => Some(format!(
                "The OS account {username} now has uid {}, not {} as when keyhaven set it up (it was changed or \
                 recreated outside keyhaven), so its keys are not served. If it is the same person, adopt the new \
                 uid with user.update {{\"uid\": {}}}",
                o.uid, data.uid, o.uid
            )),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            OsState::Ok(_) => "OK",
            OsState::None => "NONE",
            OsState::Missing => "MISSING",
            OsState::UidChanged(_) => "UID_CHANGED",
        }
    }
}

/// TrueNAS's `user` entry: OS-owned fields (uid, primary group, home, shell)
/// as the system has them now whenever the OS account exists; the record's
/// last-known values otherwise. `os_account` (keyhaven extension) says how the
/// OS account stands.
fn user_entry_with(r: &UserRecord, os: Option<&OsAccount>) -> UserEntry {
    let d = UserData::from_record(r);
    let state = OsState::of(&d, os);
    let (uid, gid, group, home, shell) = match os {
        Some(o) => {
            (i64::from(o.uid), i64::from(o.gid), o.primary_group.clone(), o.home.display().to_string(), o.shell.clone())
        }
        None => (d.uid, d.gid, d.group.clone(), d.home.clone(), d.shell.clone()),
    };
    UserEntry {
        id: r.id,
        uid,
        username: r.username.clone(),
        unixhash: "*",
        smbhash: "*",
        home,
        shell,
        full_name: d.full_name.clone(),
        builtin: d.builtin,
        immutable: d.builtin,
        smb: false,
        group: UserGroup { bsdgrp_gid: gid, bsdgrp_group: group },
        groups: vec![],
        password_disabled: d.password_disabled || r.password_hash.is_none(),
        ssh_password_enabled: d.ssh_password_enabled,
        sshpubkey: d.sshpubkey.clone(),
        locked: d.locked,
        sudo_commands: d.sudo_commands.clone(),
        sudo_commands_nopasswd: d.sudo_commands_nopasswd.clone(),
        email: d.email.clone(),
        local: true,
        id_type_both: false,
        sid: None,
        roles: d.roles.clone(),
        twofactor_auth_configured: r.has_twofactor_secret && d.twofactor_enabled,
        os_account: OsAccountStatus { state: state.label(), message: state.problem(&r.username, &d) },
    }
}

/// The field error for a change of an OS-owned field while keyhaven does not
/// manage OS accounts.
fn os_owned(field: &str, username: &str, label: &str, now: &str, command: &str) -> FieldError {
    FieldError::new(
        field,
        format!(
            "The OS owns the {label} of {username} (now {now}): change it on the system ({command}), or set \
             accounts.manage_os = true so keyhaven changes OS accounts"
        ),
    )
}

/// A home path password login can use: not a placeholder, and a directory
/// (or one useradd is about to make, `made`).
fn valid_home(home: &str, made: bool) -> bool {
    home.starts_with('/')
        && !home.starts_with("/var/empty")
        && !home.starts_with("/nonexistent")
        && (made || std::path::Path::new(home).is_dir())
}

fn valid_username(u: &str) -> bool {
    let mut chars = u.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && u.len() <= 32
        && u.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || c == '.')
}

impl<'a> Accounts<'a> {
    /// TrueNAS's `user` entry for an account, with its OS counterpart as the
    /// system has it now (one NSS look-up).
    pub fn entry(&self, r: &UserRecord) -> UserEntry {
        user_entry_with(r, accounts::lookup(&r.username).as_ref())
    }

    /// Every entry: the OS accounts enumerated once (getpwent), looked up one
    /// by one only for names the enumeration lacks.
    /// An account found without its OS counterpart has its keys withdrawn
    /// at once (the periodic reconcile would within 30 s).
    pub fn entries(&self) -> Result<Vec<UserEntry>, ServiceError> {
        let all = accounts::all();
        let mut out = Vec::new();
        for r in self.app.store.users_list()? {
            let os = all.get(&r.username).cloned().or_else(|| accounts::lookup(&r.username));
            let entry = user_entry_with(&r, os.as_ref());
            if entry.os_account.state != "OK" && entry.sshpubkey.is_some() {
                let d = UserData::from_record(&r);
                if let Err(e) = self.write_keys(&r.username, &d) {
                    tracing::warn!(user = %r.username, "withdrawing keys: {e}");
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    pub fn by_id(&self, id: i64) -> Result<(UserRecord, UserData), ServiceError> {
        let r = self.app.store.user_by_id(id)?.ok_or_else(|| {
            ServiceError::Validation(FieldError::new("", format!("User {id} does not exist")).with_errno(ENOENT).into())
        })?;
        let d = UserData::from_record(&r);
        Ok((r, d))
    }

    fn validate_common(&self, input: &UserInput, errs: &mut ValidationErrors) {
        // One-line fields: they reach /etc/passwd (via useradd), sshd and the UI,
        // where a newline, NUL or escape sequence would split or hide text.
        for (field, value) in [
            ("full_name", input.full_name.as_deref()),
            ("home", input.home.as_deref()),
            ("shell", input.shell.as_deref()),
            ("email", input.email.as_ref().and_then(|e| e.as_deref())),
        ] {
            if let Some(Err(e)) = value.map(keyhaven_core::text::check_single_line) {
                errs.add(field, e.to_string());
            }
        }
        if let Some(Some(text)) = &input.sshpubkey {
            if let Err(e) = authorized_keys::parse_authorized_keys(text) {
                errs.push(e.to_field_error("sshpubkey"));
            }
        }
        if let Some(roles) = &input.roles {
            for (i, r) in roles.iter().enumerate() {
                if !ROLES.contains(&r.as_str()) {
                    errs.add(format!("roles.{i}"), format!("Input should be {}", ROLES.join(" or ")));
                }
            }
        }
        if let Some(shell) = &input.shell {
            if !shell.starts_with('/') {
                errs.add("shell", "Shell must be an absolute path such as /usr/bin/bash");
            } else if !std::path::Path::new(shell).exists() {
                errs.add("shell", format!("{shell}: no such shell on this system"));
            }
        }
        if let Some(home) = &input.home {
            if !home.starts_with('/') {
                errs.add("home", "Home must be an absolute path");
            }
        }
        for (field, list) in
            [("sudo_commands", &input.sudo_commands), ("sudo_commands_nopasswd", &input.sudo_commands_nopasswd)]
        {
            for (i, c) in list.iter().flatten().enumerate() {
                if c.trim().is_empty() || c.contains('\n') {
                    errs.add(format!("{field}.{i}"), "A sudo command must be one non-empty line");
                }
            }
        }
        if let Some(pw) = &input.password {
            if pw.expose().contains('\n') {
                errs.add("password", "Password must not contain a newline");
            }
        }
    }

    /// With `accounts.manage_os` off, the OS owns uid, primary group, home
    /// and shell: a value other than the OS's is refused, naming the setting.
    fn check_os_owned(&self, input: &UserInput, os: &OsAccount, username: &str, errs: &mut ValidationErrors) {
        let home = os.home.display().to_string();
        if input.shell.as_ref().is_some_and(|v| *v != os.shell) {
            errs.push(os_owned("shell", username, "login shell", &os.shell, &format!("usermod -s SHELL {username}")));
        }
        if input.home.as_ref().is_some_and(|v| *v != home) {
            errs.push(os_owned("home", username, "home directory", &home, &format!("usermod -d HOME {username}")));
        }
        if input.group.is_some_and(|g| g != i64::from(os.gid)) {
            errs.push(os_owned(
                "group",
                username,
                "primary group",
                &format!("{} ({})", os.primary_group, os.gid),
                &format!("usermod -g GROUP {username}"),
            ));
        }
    }

    /// `user.create`.
    pub async fn create(&self, input: UserInput) -> Result<UserEntry, ServiceError> {
        input.check_size()?;
        if input.username.is_none() {
            return Err(ServiceError::field("username", "Field required"));
        }
        let _guard = self.lock().await;
        self.create_locked(input).await
    }

    async fn create_locked(&self, input: UserInput) -> Result<UserEntry, ServiceError> {
        let mut errs = ValidationErrors::new();
        let username = input.username.clone().unwrap_or_default();
        if !valid_username(&username) {
            errs.add(
                "username",
                "Username must start with a lowercase letter or underscore and contain only lowercase letters, digits, `_`, `-` and `.` (at most 32 characters)",
            );
        } else if self.app.store.user_by_name(&username)?.is_some() {
            errs.add("username", format!("A user with the username \"{username}\" already exists"));
        }
        let disabled = input.password_disabled.unwrap_or(false);
        if input.password.is_none() && !disabled {
            errs.add("password", "Password is required unless password_disabled is set");
        }
        if input.password.is_some() && disabled {
            errs.add("password_disabled", "Leave password empty when password_disabled is set");
        }
        self.validate_common(&input, &mut errs);
        let os = accounts::lookup(&username);
        let manage = self.app.config.manage_os_accounts;
        if errs.is_empty() && os.is_none() && !manage {
            errs.add(
                "username",
                format!(
                    "There is no OS account named {username} on this system, and sshd needs one. Create it first (e.g. `useradd -m {username}`) or set accounts.manage_os = true so keyhaven creates it"
                ),
            );
        }
        if let (Some(os), false) = (&os, manage) {
            if let Some(uid) = input.uid.filter(|u| *u != os.uid as i64) {
                errs.add("uid", format!("The OS account {username} has uid {}, not {uid}", os.uid));
            }
            self.check_os_owned(&input, os, &username, &mut errs);
        }
        errs.check()?;

        let shell = input.shell.clone().unwrap_or_else(|| {
            os.as_ref().map(|o| o.shell.clone()).unwrap_or_else(|| {
                if std::path::Path::new("/usr/bin/bash").exists() {
                    "/usr/bin/bash".into()
                } else {
                    "/bin/sh".into()
                }
            })
        });
        if input.ssh_password_enabled == Some(true) {
            // The home the account will have: the OS account's (not managed), or
            // the one useradd -m makes.
            let (home, made) = match (&os, manage) {
                (Some(o), false) => (o.home.display().to_string(), false),
                (Some(o), true) => (input.home.clone().unwrap_or_else(|| o.home.display().to_string()), false),
                (None, _) => (input.home.clone().unwrap_or_else(|| format!("/home/{username}")), true),
            };
            let shell_now =
                if manage { shell.clone() } else { os.as_ref().map(|o| o.shell.clone()).unwrap_or_default() };
            if !valid_home(&home, made) {
                return Err(ServiceError::field(
                    "ssh_password_enabled",
                    "SSH password login requires a valid home path.",
                ));
            }
            if accounts::shell_runs_commands(&shell_now).is_err() {
                return Err(ServiceError::field("ssh_password_enabled", "SSH password login requires a login shell."));
            }
        }
        let full_name = input.full_name.clone().unwrap_or_default();
        let hash = match &input.password {
            Some(p) => Some(self.app.auth.hash(&p.0).await?),
            None => None,
        };
        // An OS account made here is removed again if a later step fails (its
        // new home directory is kept: userdel without -r never deletes files).
        let created_os = os.is_none();
        let undo_os = || {
            if created_os {
                if let Err(e) = accounts::delete(&username) {
                    tracing::error!(user = %username, "removing the OS account made for a failed user.create failed: {e}");
                }
            }
        };
        let os = match os {
            Some(o) => o,
            None => {
                let home = input.home.clone().unwrap_or_else(|| format!("/home/{username}"));
                accounts::create(&username, input.uid.map(|u| u as u32), Some(&home), &shell, &full_name)
                    .map_err(|e| ServiceError::field("username", format!("Creating the OS account failed: {e}")))?;
                accounts::lookup(&username).ok_or_else(|| {
                    undo_os();
                    ServiceError::internal("useradd", "account missing after creation")
                })?
            }
        };
        let data = UserData {
            uid: os.uid as i64,
            gid: os.gid as i64,
            full_name,
            home: if manage {
                input.home.clone().unwrap_or_else(|| os.home.display().to_string())
            } else {
                os.home.display().to_string()
            },
            shell: if manage { shell } else { os.shell.clone() },
            email: input.email.clone().flatten(),
            group: os.primary_group.clone(),
            ssh_password_enabled: input.ssh_password_enabled.unwrap_or(false),
            password_disabled: disabled,
            locked: input.locked.unwrap_or(false),
            sudo_commands: input.sudo_commands.clone().unwrap_or_default(),
            sudo_commands_nopasswd: input.sudo_commands_nopasswd.clone().unwrap_or_default(),
            builtin: false,
            roles: input.roles.clone().unwrap_or_default(),
            sshpubkey: input
                .sshpubkey
                .clone()
                .flatten()
                .map(|t| authorized_keys::normalize(&t))
                .filter(|t| !t.is_empty()),
            twofactor_enabled: false,
            attributes: serde_json::Map::new(),
            os_account: true,
        };
        let mut data = data;
        let keep_existing = input.sshpubkey.is_none() && self.app.config.authorized_keys_in_home();
        if keep_existing {
            // As TrueNAS shows it: an existing ~/.ssh/authorized_keys is the
            // account's keys, adopted (when valid), never deleted.
            let owner = KeysOwner { username: &username, uid: os.uid, gid: os.gid, home: &os.home };
            match self.app.keys_location.read_existing(&owner, authorized_keys::MAX_AUTHORIZED_KEYS_BYTES) {
                Ok(Some(text)) if authorized_keys::parse_authorized_keys(&text).is_ok() => {
                    data.sshpubkey = Some(authorized_keys::normalize(&text)).filter(|t| !t.is_empty());
                }
                Ok(Some(_)) => {
                    tracing::warn!(user = %username, "its existing authorized_keys is not valid; left as it is and not shown")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(user = %username, "its existing authorized_keys could not be read: {e}"),
            }
        }
        if let Some(p) = self.keys_reach_problem(&username, &data, Some(&os)) {
            undo_os();
            return Err(ServiceError::field("sshpubkey", format!("sshd could not use these keys: {p}")));
        }
        let id = self.app.store.user_insert(&username, &data.to_value(), hash.as_deref()).inspect_err(|_| undo_os())?;
        let write = if keep_existing { Ok(()) } else { self.write_keys(&username, &data) };
        if let Err(e) = write {
            // No half-made account: without its keys file the row goes too.
            let _ = self.app.store.user_delete(id);
            undo_os();
            return Err(e);
        }
        // The OS password last: an existing OS account's old one cannot be put back.
        if manage {
            let pw = input.password.as_ref().map(|p| zeroize::Zeroizing::new(p.expose().to_string()));
            if let Err(e) = accounts::set_password(&username, pw.as_ref().map(|p| p.as_str())) {
                let _ = self.app.store.user_delete(id);
                let no_keys = UserData { sshpubkey: None, ..data.clone() };
                let undo = if keep_existing { Ok(()) } else { self.write_keys(&username, &no_keys) };
                if let Err(e) = undo {
                    tracing::error!(user = %username, "removing the keys of a failed user.create failed: {e}");
                }
                undo_os();
                return Err(ServiceError::field("password", format!("Setting the OS password failed: {e}")));
            }
        }
        // sshd_config lists password users only; keys files need no reload.
        if data.ssh_password_enabled {
            self.app.sshd().users_changed().await;
        }
        let r = self.app.store.user_by_id(id)?.ok_or_else(|| ServiceError::internal("user.create", "row vanished"))?;
        Ok(self.entry(&r))
    }

    /// `user.update`.
    pub async fn update(&self, id: i64, input: UserInput) -> Result<UserEntry, ServiceError> {
        input.check_size()?;
        let _guard = self.lock().await;
        self.update_locked(id, input).await
    }

    /// `user.update` for a caller that holds the accounts lock.
    pub(crate) async fn update_locked(&self, id: i64, input: UserInput) -> Result<UserEntry, ServiceError> {
        let (rec, mut data) = self.by_id(id)?;
        let mut errs = ValidationErrors::new();
        if let Some(u) = &input.username {
            if u != &rec.username {
                errs.add("username", "Renaming an account is not supported; create a new account instead");
            }
        }
        let os = accounts::lookup(&rec.username);
        let state = OsState::of(&data, os.as_ref());
        // A uid equal to the one the OS now has adopts it (after the account
        // was recreated outside keyhaven); any other change is refused.
        let adopt_uid = match (&state, input.uid) {
            (OsState::UidChanged(o), Some(u)) if u == i64::from(o.uid) => true,
            (_, Some(u)) if u != data.uid => {
                errs.add("uid", "The uid of an existing account cannot be changed");
                false
            }
            _ => false,
        };
        if data.builtin && input.roles.as_ref().is_some_and(|r| !r.iter().any(|x| x == "FULL_ADMIN")) {
            errs.add("roles", format!("{} is a built-in administrator and keeps FULL_ADMIN", rec.username));
        }
        self.validate_common(&input, &mut errs);
        let manage = self.app.config.manage_os_accounts;
        if let (Some(os), false) = (&os, manage) {
            self.check_os_owned(&input, os, &rec.username, &mut errs);
        }
        if input.sshpubkey.as_ref().is_some_and(|k| k.as_ref().is_some_and(|k| !k.trim().is_empty())) {
            if let Some(problem) = state.problem(&rec.username, &data).filter(|_| !adopt_uid) {
                errs.add("sshpubkey", problem);
            }
        }
        let enabled_after = input.ssh_password_enabled.unwrap_or(data.ssh_password_enabled);
        if enabled_after {
            // TrueNAS's rules for password login (reference 4.2), on the values
            // the account will have.
            let (home_now, shell_now) = match (&os, manage) {
                (Some(o), false) => (o.home.display().to_string(), o.shell.clone()),
                _ => (data.home.clone(), data.shell.clone()),
            };
            let field = "ssh_password_enabled";
            match (&input.home, &input.shell) {
                (Some(h), _) if !valid_home(h, manage && input.home_create == Some(true)) => {
                    errs.add(field, "SSH password login requires a valid home path.")
                }
                (_, Some(sh)) if accounts::shell_runs_commands(sh).is_err() => {
                    errs.add(field, "SSH password login requires a login shell.")
                }
                (None, None)
                    if input.ssh_password_enabled == Some(true)
                        && (!valid_home(&home_now, false) || accounts::shell_runs_commands(&shell_now).is_err()) =>
                {
                    errs.add(field, "Cannot be enabled without a valid home path and login shell.")
                }
                _ => {}
            }
        }
        errs.check()?;
        if adopt_uid {
            if let OsState::UidChanged(o) = &state {
                data.uid = i64::from(o.uid);
                data.gid = i64::from(o.gid);
                data.os_account = true;
            }
        }
        if let Some(v) = input.full_name {
            data.full_name = v;
        }
        match (&os, manage) {
            (Some(o), false) => {
                // The record keeps the OS's values (last known, shown if the account goes).
                data.shell = o.shell.clone();
                data.home = o.home.display().to_string();
                data.group = o.primary_group.clone();
            }
            _ => {
                if let Some(v) = input.shell {
                    data.shell = v;
                }
                if let Some(v) = input.home {
                    data.home = v;
                }
            }
        }
        if let Some(v) = input.email {
            data.email = v;
        }
        if let Some(v) = input.locked {
            data.locked = v;
        }
        if let Some(v) = input.password_disabled {
            data.password_disabled = v;
        }
        if let Some(v) = input.ssh_password_enabled {
            data.ssh_password_enabled = v;
        }
        if let Some(v) = input.sudo_commands {
            data.sudo_commands = v;
        }
        if let Some(v) = input.sudo_commands_nopasswd {
            data.sudo_commands_nopasswd = v;
        }
        if let Some(v) = input.roles {
            data.roles = v;
        }
        let keys_changed = input.sshpubkey.is_some();
        let password_login_changed = data.ssh_password_enabled != UserData::from_record(&rec).ssh_password_enabled;
        if let Some(v) = input.sshpubkey {
            data.sshpubkey = v.map(|t| authorized_keys::normalize(&t)).filter(|t| !t.is_empty());
        }
        if keys_changed {
            let os_now = state.ok().cloned().or_else(|| if adopt_uid { os.clone() } else { None });
            if let Some(p) = self.keys_reach_problem(&rec.username, &data, os_now.as_ref()) {
                return Err(ServiceError::field("sshpubkey", format!("sshd could not use these keys: {p}")));
            }
        }
        let hash = match &input.password {
            Some(p) => Some(Some(self.app.auth.hash(&p.0).await?)),
            None => None,
        };
        // Side effects in the order most likely to fail first, each undone when
        // a later one fails: the call changes everything or nothing. The OS
        // password comes last: once set, the old one cannot be put back.
        let old = UserData::from_record(&rec);
        let undo_keys = || {
            if keys_changed {
                if let Err(e) = self.write_keys(&rec.username, &old) {
                    tracing::error!(user = %rec.username, "restoring the authorized keys failed: {e}");
                }
            }
        };
        let os_managed = manage && os.is_some();
        let undo_os = || {
            if os_managed {
                if let Err(e) = accounts::modify(&rec.username, &old.shell, &old.full_name, &old.home) {
                    tracing::error!(user = %rec.username, "restoring the OS account failed: {e}");
                }
            }
        };
        // The OS account first: with a new home, the keys go to the new one.
        if os_managed && input.home_create == Some(true) && !std::path::Path::new(&data.home).exists() {
            if let Some(o) = &os {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&data.home)
                    .and_then(|()| std::os::unix::fs::chown(&data.home, Some(o.uid), Some(o.gid)))
                    .map_err(|e| ServiceError::field("home", format!("Creating {} failed: {e}", data.home)))?;
            }
        }
        if os_managed {
            if let Err(e) = accounts::modify(&rec.username, &data.shell, &data.full_name, &data.home) {
                return Err(ServiceError::field("shell", format!("Updating the OS account failed: {e}")));
            }
        }
        if keys_changed {
            if let Err(e) = self.write_keys(&rec.username, &data) {
                undo_os();
                return Err(e);
            }
        }
        if let Err(e) =
            self.app.store.user_update(id, &rec.username, &data.to_value(), hash.as_ref().map(|h| h.as_deref()))
        {
            undo_os();
            undo_keys();
            return Err(e.into());
        }
        if let (true, Some(p)) = (os_managed, &input.password) {
            if let Err(e) = accounts::set_password(&rec.username, Some(p.expose())) {
                let old_hash = hash.as_ref().map(|_| rec.password_hash.as_deref());
                if let Err(e) = self.app.store.user_update(id, &rec.username, &rec.data, old_hash) {
                    tracing::error!(user = %rec.username, "restoring the account record failed: {e}");
                }
                undo_os();
                undo_keys();
                return Err(ServiceError::field("password", format!("Setting the OS password failed: {e}")));
            }
        }
        if password_login_changed {
            self.app.sshd().users_changed().await;
        }
        let r = self.app.store.user_by_id(id)?.ok_or_else(|| ServiceError::internal("user.update", "row vanished"))?;
        Ok(self.entry(&r))
    }

    /// `user.delete`.
    pub async fn delete(&self, id: i64) -> Result<String, ServiceError> {
        let _guard = self.lock().await;
        self.delete_locked(id).await
    }

    async fn delete_locked(&self, id: i64) -> Result<String, ServiceError> {
        let (rec, data) = self.by_id(id)?;
        if data.builtin {
            return Err(ServiceError::call(
                EPERM,
                format!("{} is a built-in account and cannot be deleted", rec.username),
            ));
        }
        // The OS account first: if userdel fails, nothing else has changed.
        if self.app.config.manage_os_accounts && accounts::lookup(&rec.username).is_some() {
            accounts::delete(&rec.username)
                .map_err(|e| ServiceError::call(EACCES, format!("Deleting the OS account failed: {e}")))?;
        }
        self.app.store.user_delete_with_credentials(id, &rec.username)?;
        let empty = UserData { sshpubkey: None, ..data.clone() };
        if let Err(e) = self.write_keys(&rec.username, &empty) {
            tracing::warn!(user = %rec.username, "account deleted but its keys file could not be removed: {e}");
        }
        if data.ssh_password_enabled {
            self.app.sshd().users_changed().await;
        }
        Ok(rec.username)
    }

    /// Who owns an account's keys file and where its home is: the OS
    /// account's values, the record's when there is none.
    fn keys_owner_of(os: Option<&OsAccount>, data: &UserData) -> (u32, u32, std::path::PathBuf) {
        match os {
            Some(o) => (o.uid, o.gid, o.home.clone()),
            None => (data.uid.max(0) as u32, data.uid.max(0) as u32, std::path::PathBuf::from(&data.home)),
        }
    }

    /// Write an account's authorized keys where sshd looks for them. An
    /// account whose OS counterpart is missing or has another uid gets none:
    /// its file is withdrawn (best effort) so sshd never serves its keys to
    /// whoever holds the name now.
    pub fn write_keys(&self, username: &str, data: &UserData) -> Result<(), ServiceError> {
        let os = accounts::lookup(username);
        let state = OsState::of(data, os.as_ref());
        let (uid, gid, home) = Self::keys_owner_of(os.as_ref(), data);
        let owner = KeysOwner { username, uid, gid, home: &home };
        if state.ok().is_none() {
            self.served().remove(username);
            if let Err(e) = self.app.keys_location.write(&owner, "") {
                tracing::debug!(user = %username, "withdrawing the keys of an account without its OS account: {e}");
            }
            return Ok(());
        }
        let keys = data.sshpubkey.as_deref().unwrap_or("");
        self.app.keys_location.write(&owner, keys).map_err(keys_file_error)?;
        if keys.trim().is_empty() {
            self.served().remove(username);
        } else {
            self.served().insert(username.to_string(), data.clone());
        }
        Ok(())
    }

    fn served(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, UserData>> {
        self.app.accounts_area.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Another node changed accounts (`names`; `None`: any of them, after a
    /// missed notification or for the periodic reconcile): write the keys
    /// files of those whose keys differ from what this node serves, and
    /// withdraw those of accounts deleted or cleared there. Accounts whose
    /// keys this node never served are left alone when they have none, so a
    /// file in a home that keyhaven did not write stays. With `None`, keys
    /// files in the data dir that belong to no served account are removed.
    ///
    /// Blocking (takes the accounts lock): call it off the async workers.
    pub fn follow_shared_state(&self, names: Option<&std::collections::BTreeSet<String>>) -> Result<(), ServiceError> {
        // No local account write interleaves with the comparison and the writes.
        let _guard = self.app.accounts_area.lock.blocking_lock();
        let records: Vec<UserRecord> = match names {
            None => self.app.store.users_list()?,
            Some(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    match self.app.store.user_by_name(n)? {
                        Some(r) => v.push(r),
                        None => self.withdraw_served(n),
                    }
                }
                v
            }
        };
        let mut present = std::collections::HashSet::new();
        let mut wanted = std::collections::HashSet::new();
        for r in &records {
            present.insert(r.username.clone());
            let d = UserData::from_record(r);
            let wants = d.sshpubkey.as_deref().is_some_and(|k| !k.trim().is_empty());
            if wants {
                wanted.insert(r.username.clone());
            }
            let served = self.served().get(&r.username).map(|s| s.sshpubkey.clone());
            let write = match served {
                Some(keys) => keys != d.sshpubkey,
                None => wants,
            };
            if write {
                if let Err(e) = self.write_keys(&r.username, &d) {
                    tracing::warn!(user = %r.username, "applying another node's change to the keys: {e}");
                }
            }
        }
        if names.is_none() {
            let gone: Vec<String> = self.served().keys().filter(|n| !present.contains(*n)).cloned().collect();
            for n in gone {
                self.withdraw_served(&n);
            }
            if let keyhaven_ssh::files::KeysLocation::Data(dir) = &self.app.keys_location {
                let stray: Vec<String> = std::fs::read_dir(dir)
                    .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                for n in stray {
                    if !self.served().contains_key(&n) && !wanted.contains(&n) && !n.starts_with('.') {
                        let owner = KeysOwner { username: &n, uid: 0, gid: 0, home: std::path::Path::new("/") };
                        match self.app.keys_location.write(&owner, "") {
                            Ok(_) => {
                                tracing::info!(user = %n, "removed the keys file of an account that has no keys any more")
                            }
                            Err(e) => tracing::warn!(user = %n, "{e}"),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Withdraw the keys this node served for `username` (the account is gone).
    fn withdraw_served(&self, username: &str) {
        let Some(old) = self.served().remove(username) else { return };
        let empty = UserData { sshpubkey: None, ..old };
        if let Err(e) = self.write_keys(username, &empty) {
            tracing::warn!(user = %username, "withdrawing the keys of an account deleted on another node: {e}");
        }
    }

    /// Whether `write_user_keys` would find a usable home and `~/.ssh`, without
    /// changing anything: for callers with side effects to do first.
    pub fn check_keys(&self, username: &str, data: &UserData) -> Result<(), ServiceError> {
        let os = accounts::lookup(username);
        let (uid, gid, home) = Self::keys_owner_of(os.as_ref(), data);
        let owner = KeysOwner { username, uid, gid, home: &home };
        self.app.keys_location.check(&owner).map_err(keys_file_error)
    }

    /// Why sshd, reading this account's keys file as the account, would not
    /// use it (`None` when it would, or when there are no keys to read).
    pub fn keys_reach_problem(&self, username: &str, data: &UserData, os: Option<&OsAccount>) -> Option<String> {
        let os = os?;
        if data.sshpubkey.as_deref().is_none_or(|k| k.trim().is_empty()) {
            return None;
        }
        let owner = KeysOwner { username, uid: os.uid, gid: os.gid, home: &os.home };
        let path = self.app.keys_location.path_for(&owner);
        let home =
            matches!(self.app.keys_location, keyhaven_ssh::files::KeysLocation::Home).then_some(os.home.as_path());
        let reader = keyhaven_ssh::reach::Reader { username, uid: os.uid, gids: &os.gids };
        keyhaven_ssh::reach::sshd_read_problem(&path, home, &reader)
    }

    /// Rewrite every account's keys (start of the SSH service), saying which
    /// accounts' keys sshd will not use and why.
    pub fn sync_all_keys(&self) -> Result<(), ServiceError> {
        for r in self.app.store.users_list()? {
            let d = UserData::from_record(&r);
            // In the home location a file keyhaven has no keys for is the
            // account's own (it predates keyhaven, or was kept on create):
            // never removed here, only by an explicit clear.
            if d.sshpubkey.is_some() {
                if let Err(e) = self.write_keys(&r.username, &d) {
                    tracing::warn!(user = %r.username, "{e}");
                }
                let os = accounts::lookup(&r.username);
                match OsState::of(&d, os.as_ref()).problem(&r.username, &d) {
                    Some(p) => tracing::warn!(user = %r.username, "{p}"),
                    None => {
                        if let Some(p) = self.keys_reach_problem(&r.username, &d, os.as_ref()) {
                            tracing::warn!(user = %r.username, "sshd will refuse the keys of {}: {p}", r.username);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Say, in the log, which accounts' keys sshd would not use and why
    /// (start of keyhaven; writes nothing).
    pub fn report_unusable_keys(&self) -> Result<usize, ServiceError> {
        let mut n = 0;
        let all = accounts::all();
        for r in self.app.store.users_list()? {
            let d = UserData::from_record(&r);
            if d.sshpubkey.as_deref().is_none_or(|k| k.trim().is_empty()) {
                continue;
            }
            let os = all.get(&r.username).cloned().or_else(|| accounts::lookup(&r.username));
            let problem = OsState::of(&d, os.as_ref())
                .problem(&r.username, &d)
                .or_else(|| self.keys_reach_problem(&r.username, &d, os.as_ref()));
            if let Some(p) = problem {
                tracing::warn!(user = %r.username, "sshd will not use the keys of {}: {p}", r.username);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Keep the keys files in step with the OS accounts: withdraw the file of
    /// an account whose OS counterpart went away or changed uid, restore it
    /// when the account is back as it was. Cheap (one enumeration, a stat per
    /// account with keys); run periodically. Returns the accounts whose keys
    /// it withdrew.
    pub fn reconcile_keys(&self) -> Result<Vec<String>, ServiceError> {
        let keyhaven_ssh::files::KeysLocation::Data(_) = &self.app.keys_location else { return Ok(vec![]) };
        let all = accounts::all();
        let mut withdrawn = vec![];
        for r in self.app.store.users_list()? {
            let d = UserData::from_record(&r);
            if d.sshpubkey.as_deref().is_none_or(|k| k.trim().is_empty()) {
                continue;
            }
            let os = all.get(&r.username).cloned().or_else(|| accounts::lookup(&r.username));
            let state = OsState::of(&d, os.as_ref());
            let (uid, gid, home) = Self::keys_owner_of(os.as_ref(), &d);
            let path = self.app.keys_location.path_for(&KeysOwner { username: &r.username, uid, gid, home: &home });
            let present = path.exists();
            if state.ok().is_none() && present {
                self.write_keys(&r.username, &d)?;
                if let Some(p) = state.problem(&r.username, &d) {
                    tracing::warn!(user = %r.username, "{p}");
                }
                withdrawn.push(r.username.clone());
            } else if state.ok().is_some() && !present {
                tracing::info!(user = %r.username, "the OS account is back as keyhaven set it up: its keys are served again");
                self.write_keys(&r.username, &d)?;
            }
        }
        Ok(withdrawn)
    }

    // ---------------------------------------------------------- two-factor

    /// Enable (or renew) TOTP for an account: a new seed, sealed at rest.
    /// Returns the account's entry and the provisioning URI, shown this once.
    pub async fn twofactor_renew(&self, username: &str) -> Result<TwoFactorRenewed, ServiceError> {
        let _guard = self.lock().await;
        let (rec, mut data) = self
            .by_name(username)?
            .ok_or_else(|| ServiceError::field_errno("username", format!("User {username} does not exist"), ENOENT))?;
        let secret = totp_rs::Secret::generate();
        let b32 = secret.to_base32();
        let totp = super::crypto::totp_builder(secret)
            .with_account_name(username.to_string())
            .with_issuer(Some("keyhaven"))
            .build()
            .map_err(|e| ServiceError::internal("TOTP setup", e))?;
        let uri = totp.to_url().map_err(|e| ServiceError::internal("TOTP setup", e))?;
        self.app.store.user_set_twofactor_secret(rec.id, Some(&b32))?;
        data.twofactor_enabled = true;
        self.app.store.user_update(rec.id, &rec.username, &data.to_value(), None)?;
        let r = self.app.store.user_by_id(rec.id)?.ok_or_else(|| ServiceError::internal("2FA", "user vanished"))?;
        Ok(TwoFactorRenewed { entry: self.entry(&r), provisioning_uri: uri })
    }

    pub async fn twofactor_unset(&self, username: &str) -> Result<(), ServiceError> {
        let _guard = self.lock().await;
        let (rec, mut data) = self
            .by_name(username)?
            .ok_or_else(|| ServiceError::field_errno("username", format!("User {username} does not exist"), ENOENT))?;
        self.app.store.user_set_twofactor_secret(rec.id, None)?;
        data.twofactor_enabled = false;
        self.app.store.user_update(rec.id, &rec.username, &data.to_value(), None)?;
        Ok(())
    }

    // ---------------------------------------------------------- preferences

    /// `auth.set_attribute`: set one key of the account's own `attributes`.
    pub async fn set_attribute(&self, username: &str, key: &str, value: Value) -> Result<(), ServiceError> {
        if key.trim().is_empty() || key.len() > MAX_ATTRIBUTE_KEY {
            return Err(ServiceError::field("key", format!("Key must be 1 to {MAX_ATTRIBUTE_KEY} characters")));
        }
        let _guard = self.lock().await;
        let (rec, mut data) = self.by_name(username)?.ok_or_else(|| {
            ServiceError::call(ENOENT, format!("User {username} does not exist; attributes belong to a local account"))
        })?;
        data.attributes.insert(key.to_string(), value);
        let size = Value::Object(data.attributes.clone()).to_string().len();
        if size > MAX_ATTRIBUTES_BYTES {
            return Err(ServiceError::field(
                "value",
                format!("Attributes would take {size} bytes; at most {MAX_ATTRIBUTES_BYTES} are kept per account"),
            ));
        }
        self.app.store.user_update(rec.id, &rec.username, &data.to_value(), None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::decode;

    fn err(v: Value) -> (String, String) {
        match decode::<UserInput>(v, "user_create") {
            Err(ServiceError::Validation(v)) => (v.0[0].attribute.clone(), v.0[0].message.clone()),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn user_input_decodes_truenas_shapes_with_field_named_errors() {
        let long = "a".repeat(input::STR_MAX + 1);
        let u: UserInput = decode(
            serde_json::json!({
                "username": "alice", "email": null, "sshpubkey": null, "group": 1001,
                "groups": [], "group_create": false, "smb": false, "home_mode": "700",
                "sudo_commands": ["/usr/bin/zfs"], "password": "pw"
            }),
            "user_create",
        )
        .unwrap();
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.email, Some(None));
        assert_eq!(u.sshpubkey, Some(None));
        assert_eq!(u.group, Some(1001));
        assert_eq!(u.sudo_commands, Some(vec!["/usr/bin/zfs".to_string()]));
        assert!(!format!("{u:?}").contains("\"pw\""));
        let u: UserInput = decode(serde_json::json!({"group": {"id": 1}}), "user_create").unwrap();
        assert_eq!((u.group, u.email, u.sshpubkey), (None, None, None));

        assert_eq!(
            err(serde_json::json!({"sudo_commands": ["ok", long]})),
            ("user_create.sudo_commands.1".into(), "String should have at most 1024 characters".into())
        );
        assert_eq!(
            err(serde_json::json!({"email": 5})),
            ("user_create.email".into(), "Input should be a valid string".into())
        );
        assert_eq!(
            err(serde_json::json!({"full_name": long})),
            ("user_create.full_name".into(), "String should have at most 1024 characters".into())
        );
        assert_eq!(
            err(serde_json::json!({"smb": "no"})),
            ("user_create.smb".into(), "Input should be a valid boolean".into())
        );
        assert_eq!(
            err(serde_json::json!({"nickname": "x"})),
            ("user_create.nickname".into(), "Extra inputs are not permitted".into())
        );
    }
}
