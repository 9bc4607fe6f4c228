//! Files sshd reads: per-user authorized keys and host keys, written
//! atomically (temp file, fsync, rename, fsync of the directory) with the
//! ownership and modes StrictModes accepts.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Write `contents` to `path` atomically with `mode`, optionally chowned.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut suffix = [0u8; 6];
    getrandom(&mut suffix);
    let tmp = dir.join(format!(".{name}.{}.tmp", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(contents)?;
        // create_new applies the umask; set the exact mode on the still-private temp file.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

/// Create `dir` (and parents) with `mode` if missing, and enforce the mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Where account keys go.
#[derive(Debug, Clone)]
pub enum KeysLocation {
    /// `<dir>/<user>`, root-owned 0644 in a root-owned 0755 directory:
    /// sshd reads it as the user, nobody but root can change it.
    Data(PathBuf),
    /// `~/.ssh/authorized_keys` (0600, owned by the user; `.ssh` 0700), as TrueNAS does.
    Home,
}

/// The account an authorized-keys file belongs to.
pub struct KeysOwner<'a> {
    pub username: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub home: &'a Path,
}

impl KeysLocation {
    /// The value for sshd's `AuthorizedKeysFile`.
    pub fn sshd_pattern(&self) -> String {
        match self {
            KeysLocation::Data(d) => format!("{}/%u", d.display()),
            KeysLocation::Home => ".ssh/authorized_keys".into(),
        }
    }

    pub fn path_for(&self, owner: &KeysOwner<'_>) -> PathBuf {
        match self {
            KeysLocation::Data(d) => d.join(owner.username),
            KeysLocation::Home => owner.home.join(".ssh").join("authorized_keys"),
        }
    }

    /// Write (or, for empty text, remove) an account's keys. Effective for the
    /// next login: sshd reads the file at each authentication.
    pub fn write(&self, owner: &KeysOwner<'_>, text: &str) -> io::Result<PathBuf> {
        let path = self.path_for(owner);
        if text.trim().is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            return Ok(path);
        }
        let mut body = text.trim_end().to_string();
        body.push('\n');
        match self {
            KeysLocation::Data(d) => {
                ensure_dir(d, 0o755)?;
                write_atomic(&path, body.as_bytes(), 0o644, Some((0, 0)).filter(|_| is_root()))?;
            }
            KeysLocation::Home => {
                if !owner.home.is_dir() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("home directory {} of {} does not exist", owner.home.display(), owner.username),
                    ));
                }
                let ssh = owner.home.join(".ssh");
                // Never follow a link the account owner planted: `~/.ssh -> /etc`
                // would make keyhaven (root) chmod and chown /etc.
                match std::fs::symlink_metadata(&ssh) {
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(io::Error::other(format!(
                            "{} is a symbolic link; keyhaven does not follow it. Replace it with a directory",
                            ssh.display()
                        )))
                    }
                    Ok(m) if !m.is_dir() => {
                        return Err(io::Error::other(format!("{} is not a directory", ssh.display())));
                    }
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        if m.uid() != owner.uid && m.uid() != 0 {
                            return Err(io::Error::other(format!(
                                "{} belongs to uid {}, not to {}; fix its owner first",
                                ssh.display(),
                                m.uid(),
                                owner.username
                            )));
                        }
                    }
                    Err(_) => {}
                }
                ensure_dir(&ssh, 0o700)?;
                if is_root() {
                    std::os::unix::fs::lchown(&ssh, Some(owner.uid), Some(owner.gid))?;
                }
                write_atomic(&path, body.as_bytes(), 0o600, Some((owner.uid, owner.gid)).filter(|_| is_root()))?;
            }
        }
        Ok(path)
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn data_location_writes_root_owned_0644_and_removes_on_empty() {
        let d = tempfile::tempdir().unwrap();
        let loc = KeysLocation::Data(d.path().join("authorized_keys"));
        let home = d.path().join("home");
        let owner = KeysOwner { username: "alice", uid: 1000, gid: 1000, home: &home };
        let p = loc.write(&owner, "ssh-ed25519 AAAA x\n\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ssh-ed25519 AAAA x\n");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o644);
        assert_eq!(std::fs::metadata(p.parent().unwrap()).unwrap().mode() & 0o777, 0o755);
        if is_root() {
            assert_eq!(m.uid(), 0);
        }
        loc.write(&owner, "  ").unwrap();
        assert!(!p.exists());
        assert_eq!(loc.sshd_pattern(), format!("{}/%u", d.path().join("authorized_keys").display()));
    }

    #[test]
    fn home_location_makes_dot_ssh_0700_and_file_0600() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 1234, home: &home };
        let p = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA").unwrap();
        assert_eq!(p, home.join(".ssh/authorized_keys"));
        assert_eq!(std::fs::metadata(home.join(".ssh")).unwrap().mode() & 0o777, 0o700);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        if is_root() {
            assert_eq!((m.uid(), m.gid()), (1234, 1234));
        }
        // A `.ssh` symlink planted by the account owner is never followed.
        let home2 = d.path().join("home2");
        let target = d.path().join("elsewhere");
        std::fs::create_dir_all(&home2).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&target, home2.join(".ssh")).unwrap();
        let owner = KeysOwner { username: "eve", uid: 4321, gid: 4321, home: &home2 };
        let e = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA").unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!target.join("authorized_keys").exists());
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o755, "target untouched");
        let missing = d.path().join("nohome");
        let owner = KeysOwner { username: "c", uid: 1, gid: 1, home: &missing };
        assert!(KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA").is_err());
    }
}
