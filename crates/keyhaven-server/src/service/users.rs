//! Accounts: the built-in `root` and `admin`, the non-secret fields TrueNAS
//! exposes on `user` entries, and first-start bootstrap.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::auth::{hash_password, random_alnum};
use super::App;
use crate::error::ServiceError;
use keyhaven_store::{Store, UserRecord};

/// Non-secret account fields, stored as the `data` JSON of a user row.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct UserData {
    pub uid: i64,
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
}

impl Default for UserData {
    fn default() -> Self {
        UserData {
            uid: 0,
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
            full_name: "root".into(),
            home,
            shell,
            group: "root".into(),
            builtin: true,
            roles: vec!["FULL_ADMIN".into()],
            ..UserData::default()
        };
        store.user_insert("root", &data.to_value(), None)?;
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
        let (uid, home, shell) = os_account("admin").unwrap_or((950, "/var/empty".into(), "/usr/sbin/nologin".into()));
        let data = UserData {
            uid,
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
        store.user_insert("admin", &data.to_value(), Some(&hash))?;
    }
    Ok(Bootstrap { generated_admin_password: generated })
}

impl App {
    pub fn user(&self, username: &str) -> Result<Option<(UserRecord, UserData)>, ServiceError> {
        Ok(self.store.user_by_name(username)?.map(|r| {
            let d = UserData::from_record(&r);
            (r, d)
        }))
    }
}
