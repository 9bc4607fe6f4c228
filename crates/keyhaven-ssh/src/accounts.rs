//! OS accounts: lookups in the system user database, and — only when the
//! administrator opted in (`accounts.manage_os`) — useradd, usermod, chpasswd
//! and userdel. Passwords go to chpasswd on stdin, never on a command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsAccount {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
    /// Name of the primary group (`gid`), empty when it has none.
    pub primary_group: String,
    /// Group names, primary first ([`lookup`] only; [`all`] gives the primary one).
    pub groups: Vec<String>,
    /// Group ids the account is in, primary first ([`lookup`] only; [`all`]
    /// gives the primary one): what sshd's permission checks see.
    pub gids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{command} is not available ({detail}); install the Debian package `passwd`")]
    Missing { command: &'static str, detail: String },
    #[error("{command} failed: {stderr}")]
    Failed { command: &'static str, stderr: String },
}

// SAFETY (for the helpers below): every pointer read comes from a passwd or
// group record that getpw*/getgr* filled into a buffer we own and that
// outlives the read.
fn cstr(p: *const libc::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated, in a record buffer that outlives this read (above).
    unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Name of group `gid` (getgrgid_r), empty when unknown.
fn group_name(gid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: getgrgid_r with a record and buffer we own; the result borrows `buf`.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return String::new();
        }
        cstr(grp.gr_name)
    }
}

fn from_passwd(pwd: &libc::passwd) -> OsAccount {
    OsAccount {
        name: cstr(pwd.pw_name),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(cstr(pwd.pw_dir)),
        shell: cstr(pwd.pw_shell),
        primary_group: String::new(),
        groups: vec![],
        gids: vec![pwd.pw_gid],
    }
}

/// Look an account up through the system's NSS (getpwnam), with its groups.
pub fn lookup(name: &str) -> Option<OsAccount> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: getpwnam_r with a record and buffer we own; the result borrows `buf`.
    let mut acct = unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return None;
        }
        from_passwd(&pwd)
    };
    acct.primary_group = group_name(acct.gid);
    let mut ngroups: libc::c_int = 256;
    let mut gids = vec![0 as libc::gid_t; 256];
    // SAFETY: getgrouplist writes at most `ngroups` entries into `gids`.
    let n = unsafe { libc::getgrouplist(cname.as_ptr(), acct.gid, gids.as_mut_ptr(), &mut ngroups) };
    if n >= 0 {
        gids.truncate(ngroups.max(0) as usize);
        acct.groups = gids.iter().map(|g| group_name(*g)).filter(|n| !n.is_empty()).collect();
        acct.gids = gids;
    } else {
        acct.groups = vec![acct.primary_group.clone()];
    }
    Some(acct)
}

/// getpwent's enumeration state is process-wide.
static ENUMERATION: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Every account NSS enumerates (getpwent), by name, each with its primary
/// group only: one pass, for listing thousands of accounts. NSS sources that
/// do not enumerate (some LDAP setups) are missing: fall back to [`lookup`].
pub fn all() -> std::collections::HashMap<String, OsAccount> {
    let _one = ENUMERATION.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = std::collections::HashMap::new();
    let mut groups: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: setpwent/getpwent_r/endpwent under ENUMERATION, with a record
    // and buffer we own; each record is copied out before the next call.
    unsafe {
        libc::setpwent();
        loop {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwent_r(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
            if rc != 0 || result.is_null() {
                break;
            }
            let mut a = from_passwd(&pwd);
            a.primary_group = groups.entry(a.gid).or_insert_with(|| group_name(a.gid)).clone();
            a.groups = vec![a.primary_group.clone()];
            out.entry(a.name.clone()).or_insert(a);
        }
        libc::endpwent();
    }
    out
}

/// Shells that exist to refuse logins.
const NO_LOGIN_SHELLS: &[&str] = &["/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"];

/// Why an account's login shell cannot run commands over SSH (completes
/// "user X cannot be used: …").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    #[error("its login shell is {0}, which refuses to run commands")]
    NoLogin(String),
    #[error("its login shell {0} is not an executable file")]
    NotExecutable(String),
    #[error("its login shell {0} does not exist on this system")]
    Missing(String),
}

/// Whether an account with login shell `shell` can run commands over SSH
/// (backups, the connection test).
pub fn shell_runs_commands(shell: &str) -> Result<(), ShellError> {
    use std::os::unix::fs::PermissionsExt;
    if shell.is_empty() {
        // sshd then uses /bin/sh.
        return Ok(());
    }
    if NO_LOGIN_SHELLS.contains(&shell) || shell.ends_with("/nologin") {
        return Err(ShellError::NoLogin(shell.to_string()));
    }
    match std::fs::metadata(shell) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(ShellError::NotExecutable(shell.to_string())),
        Err(_) => Err(ShellError::Missing(shell.to_string())),
    }
}

fn run(command: &'static str, args: &[&str], stdin: Option<&str>) -> Result<(), AccountError> {
    let mut c = Command::new(command);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped()).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().map_err(|e| AccountError::Missing { command, detail: e.to_string() })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| AccountError::Missing { command, detail: e.to_string() })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AccountError::Failed { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() })
    }
}

/// `useradd -m [-u uid] [-d home] [-s shell] [-c gecos] name`.
pub fn create(
    name: &str,
    uid: Option<u32>,
    home: Option<&str>,
    shell: &str,
    full_name: &str,
) -> Result<(), AccountError> {
    let uid_s = uid.map(|u| u.to_string());
    let mut args = vec!["-m", "-s", shell, "-c", full_name];
    if let Some(u) = &uid_s {
        args.extend(["-u", u.as_str()]);
    }
    if let Some(h) = home {
        args.extend(["-d", h]);
    }
    args.push(name);
    run("useradd", &args, None)
}

/// `usermod -s shell -c gecos -d home name` (the home's files are not moved).
pub fn modify(name: &str, shell: &str, full_name: &str, home: &str) -> Result<(), AccountError> {
    run("usermod", &["-s", shell, "-c", full_name, "-d", home, name], None)
}

/// Set (or lock with `None`) the OS password through chpasswd's stdin.
pub fn set_password(name: &str, password: Option<&str>) -> Result<(), AccountError> {
    match password {
        Some(p) => {
            if p.contains('\n') || name.contains([':', '\n']) {
                return Err(AccountError::Failed { command: "chpasswd", stderr: "invalid characters".into() });
            }
            run("chpasswd", &[], Some(&format!("{name}:{p}\n")))
        }
        None => run("usermod", &["-p", "*", name], None),
    }
}

/// `userdel name` (the home directory is kept).
pub fn delete(name: &str) -> Result<(), AccountError> {
    run("userdel", &[name], None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_exists() {
        let r = super::lookup("root").unwrap();
        assert_eq!(r.uid, 0);
        assert_eq!(r.primary_group, "root");
        assert!(r.groups.iter().any(|g| g == "root"));
        assert!(r.gids.contains(&0));
        assert!(super::lookup("no-such-user-keyhaven").is_none());
        // The enumeration agrees with the lookup.
        let all = super::all();
        let e = &all["root"];
        assert_eq!((e.uid, &e.home, &e.shell, &e.primary_group), (r.uid, &r.home, &r.shell, &r.primary_group));
        assert!(!all.contains_key("no-such-user-keyhaven"));
    }

    #[test]
    fn login_shells() {
        assert!(super::shell_runs_commands("/bin/sh").is_ok());
        assert!(super::shell_runs_commands("").is_ok());
        for s in ["/usr/sbin/nologin", "/bin/false", "/opt/x/nologin"] {
            assert_eq!(super::shell_runs_commands(s), Err(super::ShellError::NoLogin(s.to_string())), "{s}");
        }
        assert!(super::shell_runs_commands("/no/such/shell").unwrap_err().to_string().contains("does not exist"));
        assert!(super::shell_runs_commands("/etc/passwd").unwrap_err().to_string().contains("not an executable"));
    }
}
