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
    pub groups: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{command} is not available ({detail}); install the Debian package `passwd`")]
    Missing { command: &'static str, detail: String },
    #[error("{command} failed: {stderr}")]
    Failed { command: &'static str, stderr: String },
}

/// Look an account up through the system's NSS (getpwnam), with its groups.
pub fn lookup(name: &str) -> Option<OsAccount> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam_r with buffers we own; the result borrows `buf` only.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return None;
        }
        let cstr = |p: *const libc::c_char| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        let mut acct = OsAccount {
            name: cstr(pwd.pw_name),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home: PathBuf::from(cstr(pwd.pw_dir)),
            shell: cstr(pwd.pw_shell),
            groups: vec![],
        };
        let mut ngroups: libc::c_int = 64;
        let mut groups = vec![0 as libc::gid_t; 64];
        if libc::getgrouplist(cname.as_ptr(), pwd.pw_gid, groups.as_mut_ptr(), &mut ngroups) >= 0 {
            groups.truncate(ngroups.max(0) as usize);
            for g in groups {
                let gr = libc::getgrgid(g);
                if !gr.is_null() {
                    acct.groups.push(cstr((*gr).gr_name));
                }
            }
        }
        Some(acct)
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

/// `usermod -s shell -c gecos name`.
pub fn modify(name: &str, shell: &str, full_name: &str) -> Result<(), AccountError> {
    run("usermod", &["-s", shell, "-c", full_name, name], None)
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
        assert!(r.groups.iter().any(|g| g == "root"));
        assert!(super::lookup("no-such-user-keyhaven").is_none());
    }
}
