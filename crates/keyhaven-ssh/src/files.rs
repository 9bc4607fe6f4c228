//! Files sshd reads: per-user authorized keys and host keys, written
//! atomically (temp file, fsync, rename, fsync of the directory) with the
//! ownership and modes StrictModes accepts.
//!
//! An account's home belongs to its owner, who can swap any path component
//! there while keyhaven (root) works. So in a home keyhaven resolves each name
//! once: it opens the home and `~/.ssh` without following symbolic links,
//! checks and changes them through those descriptors, and creates, renames
//! and removes files relative to them. Nothing is ever done by path there.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Stat, Uid, CWD};
use rustix::io::Errno;

/// Write `contents` to `path` atomically with `mode`, optionally chowned.
/// Only for directories no other account controls (path-based).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(temp_name(name));
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

/// `.<name>.<12 random hex digits>.tmp`: unguessable, so nobody can plant it first.
fn temp_name(name: &str) -> String {
    let mut suffix = [0u8; 6];
    getrandom(&mut suffix);
    format!(".{name}.{}.tmp", suffix.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

/// Create `dir` (and parents) with `mode` if missing, and enforce the mode.
/// Path-based: only for directories no other account controls.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Why an account's keys file was not written or removed. The home-directory
/// cases are the account's to fix; each message says how.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    #[error("home directory {} of {user} does not exist; create it or set the account's home to an existing directory", .path.display())]
    HomeMissing { user: String, path: PathBuf },
    #[error("home directory {} of {user} is not an absolute path without `..`; set the account's home to the directory itself", .path.display())]
    HomeNotCanonical { user: String, path: PathBuf },
    #[error("home directory of {user} ({}) is a symbolic link; keyhaven does not follow it. Set the account's home to the directory it points to", .path.display())]
    HomeIsSymlink { user: String, path: PathBuf },
    #[error("home directory of {user} ({}) is not a directory; set the account's home to a directory owned by {user}", .path.display())]
    HomeNotDirectory { user: String, path: PathBuf },
    #[error("home directory of {user} ({}) belongs to uid {found}, neither to {user} (uid {uid}) nor to root; keyhaven does not write into it. Give it to {user} or set the account's home to a directory of its own", .path.display())]
    HomeWrongOwner { user: String, path: PathBuf, uid: u32, found: u32 },
    #[error("~/.ssh of {user} ({}) is a symbolic link; keyhaven does not follow it. Replace it with a directory owned by {user}", .path.display())]
    SshIsSymlink { user: String, path: PathBuf },
    #[error("~/.ssh of {user} ({}) is not a directory. Replace it with a directory owned by {user}", .path.display())]
    SshNotDirectory { user: String, path: PathBuf },
    #[error("~/.ssh of {user} ({}) belongs to uid {found}, not to {user} (uid {uid}); keyhaven does not write into it. Give it to {user} or remove it", .path.display())]
    SshWrongOwner { user: String, path: PathBuf, uid: u32, found: u32 },
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl KeysFileError {
    fn io(action: &'static str, path: &Path, source: impl Into<io::Error>) -> Self {
        KeysFileError::Io { action, path: path.to_path_buf(), source: source.into() }
    }
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

const SSH_DIR: &str = ".ssh";
const KEYS_FILE: &str = "authorized_keys";

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
            KeysLocation::Home => owner.home.join(SSH_DIR).join(KEYS_FILE),
        }
    }

    /// Write (or, for empty text, remove) an account's keys. Effective for the
    /// next login: sshd reads the file at each authentication.
    pub fn write(&self, owner: &KeysOwner<'_>, text: &str) -> Result<PathBuf, KeysFileError> {
        let path = self.path_for(owner);
        let body = if text.trim().is_empty() {
            None
        } else {
            let mut b = text.trim_end().to_string();
            b.push('\n');
            Some(b)
        };
        match (self, body) {
            (KeysLocation::Data(_), None) => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(KeysFileError::io("cannot remove", &path, e)),
            },
            (KeysLocation::Data(d), Some(body)) => {
                ensure_dir(d, 0o755).map_err(|e| KeysFileError::io("cannot create", d, e))?;
                write_atomic(&path, body.as_bytes(), 0o644, Some((0, 0)).filter(|_| is_root()))
                    .map_err(|e| KeysFileError::io("cannot write", &path, e))?;
            }
            (KeysLocation::Home, None) => {
                let home = match HomeDir::open(owner) {
                    Ok(h) => h,
                    // No home, no keys file to remove.
                    Err(KeysFileError::HomeMissing { .. }) => return Ok(path),
                    Err(e) => return Err(e),
                };
                if let Some(ssh) = home.open_ssh()? {
                    // A planted `authorized_keys` symlink: unlinkat removes the link only.
                    match rustix::fs::unlinkat(&ssh, KEYS_FILE, AtFlags::empty()) {
                        Ok(()) | Err(Errno::NOENT) => {}
                        Err(e) => return Err(KeysFileError::io("cannot remove", &path, e)),
                    }
                }
            }
            (KeysLocation::Home, Some(body)) => {
                let home = HomeDir::open(owner)?;
                let ssh = home.prepare_ssh()?;
                replace_in_dir(&ssh, KEYS_FILE, body.as_bytes(), owner)
                    .map_err(|e| KeysFileError::io("cannot write", &path, e))?;
            }
        }
        Ok(path)
    }

    /// The keys an account already has where sshd looks (at most
    /// `max_bytes`), read through the same checked descriptors as `write`
    /// (never through a link); `None` when there is no such file. For the
    /// home location only: keyhaven writes the data location itself.
    pub fn read_existing(&self, owner: &KeysOwner<'_>, max_bytes: usize) -> Result<Option<String>, KeysFileError> {
        use std::io::Read;
        let KeysLocation::Home = self else { return Ok(None) };
        let home = HomeDir::open(owner)?;
        let Some(ssh) = home.open_ssh()? else { return Ok(None) };
        let path = home.ssh_path().join(KEYS_FILE);
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&ssh, KEYS_FILE, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(KeysFileError::io("cannot open", &path, e)),
        };
        let mut text = String::new();
        File::from(fd)
            .take(max_bytes as u64 + 1)
            .read_to_string(&mut text)
            .map_err(|e| KeysFileError::io("cannot read", &path, e))?;
        Ok(Some(text))
    }

    /// The checks `write` makes before it changes anything (home and `~/.ssh`
    /// are real directories of the account), without changing anything: lets
    /// a caller refuse early, before other side effects.
    pub fn check(&self, owner: &KeysOwner<'_>) -> Result<(), KeysFileError> {
        match self {
            KeysLocation::Data(_) => Ok(()),
            KeysLocation::Home => HomeDir::open(owner)?.open_ssh().map(|_| ()),
        }
    }
}

/// An account's home directory, opened once without following a final
/// symbolic link and checked: everything below it is reached through `fd`.
struct HomeDir<'a> {
    fd: OwnedFd,
    owner: &'a KeysOwner<'a>,
    /// For messages only, never opened again.
    path: PathBuf,
}

/// Directories are opened read-only (enough for *at calls and fsync), never
/// through a symbolic link, never inherited by sshd or other children.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Owners keyhaven accepts for directories it writes in: the account, root,
/// and keyhaven itself (without root it cannot write anywhere else anyway).
fn trusted_owner(st: &Stat, account_uid: u32) -> bool {
    let found = st.st_uid;
    found == account_uid || found == 0 || found == crate::uid::effective()
}

/// Whether `name` (relative to `dir`) is a symbolic link, for the message
/// after an open with O_NOFOLLOW failed. It decides no access.
fn is_symlink_at(dir: impl std::os::fd::AsFd, name: &Path) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

impl<'a> HomeDir<'a> {
    fn open(owner: &'a KeysOwner<'a>) -> Result<Self, KeysFileError> {
        let user = || owner.username.to_string();
        // Rebuilt from its components: a trailing slash would make the kernel
        // follow a final symbolic link despite O_NOFOLLOW, and `..` as the last
        // component would escape it.
        let path: PathBuf = owner.home.components().collect();
        if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
            return Err(KeysFileError::HomeNotCanonical { user: user(), path: owner.home.to_path_buf() });
        }
        let fd = match rustix::fs::openat(CWD, &path, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Err(KeysFileError::HomeMissing { user: user(), path }),
            // O_DIRECTORY|O_NOFOLLOW on a link: ENOTDIR on Linux, ELOOP elsewhere.
            Err(Errno::LOOP | Errno::NOTDIR) if is_symlink_at(CWD, &path) => {
                return Err(KeysFileError::HomeIsSymlink { user: user(), path })
            }
            Err(Errno::NOTDIR) => return Err(KeysFileError::HomeNotDirectory { user: user(), path }),
            Err(e) => return Err(KeysFileError::io("cannot open", &path, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| KeysFileError::io("cannot inspect", &path, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(KeysFileError::HomeNotDirectory { user: user(), path });
        }
        if !trusted_owner(&st, owner.uid) {
            return Err(KeysFileError::HomeWrongOwner { user: user(), path, uid: owner.uid, found: st.st_uid });
        }
        Ok(HomeDir { fd, owner, path })
    }

    fn ssh_path(&self) -> PathBuf {
        self.path.join(SSH_DIR)
    }

    /// `~/.ssh`, opened without following a link and checked; `None` when missing.
    fn open_ssh(&self) -> Result<Option<OwnedFd>, KeysFileError> {
        let user = || self.owner.username.to_string();
        let fd = match rustix::fs::openat(&self.fd, SSH_DIR, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP | Errno::NOTDIR) if is_symlink_at(&self.fd, Path::new(SSH_DIR)) => {
                return Err(KeysFileError::SshIsSymlink { user: user(), path: self.ssh_path() })
            }
            Err(Errno::NOTDIR) => return Err(KeysFileError::SshNotDirectory { user: user(), path: self.ssh_path() }),
            Err(e) => return Err(KeysFileError::io("cannot open", &self.ssh_path(), e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| KeysFileError::io("cannot inspect", &self.ssh_path(), e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(KeysFileError::SshNotDirectory { user: user(), path: self.ssh_path() });
        }
        if !trusted_owner(&st, self.owner.uid) {
            return Err(KeysFileError::SshWrongOwner {
                user: user(),
                path: self.ssh_path(),
                uid: self.owner.uid,
                found: st.st_uid,
            });
        }
        Ok(Some(fd))
    }

    /// `~/.ssh` as sshd's StrictModes wants it: created if missing, the
    /// account's, 0700. Owner and mode are set through the descriptor.
    fn prepare_ssh(&self) -> Result<OwnedFd, KeysFileError> {
        let path = self.ssh_path();
        let fd = match self.open_ssh()? {
            Some(fd) => fd,
            None => {
                match rustix::fs::mkdirat(&self.fd, SSH_DIR, Mode::from_raw_mode(0o700)) {
                    // EEXIST: created meanwhile; the open below checks whatever it is.
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(KeysFileError::io("cannot create", &path, e)),
                }
                self.open_ssh()?.ok_or_else(|| KeysFileError::io("cannot open", &path, Errno::NOENT))?
            }
        };
        if is_root() {
            rustix::fs::fchown(&fd, Some(Uid::from_raw(self.owner.uid)), Some(Gid::from_raw(self.owner.gid)))
                .map_err(|e| KeysFileError::io("cannot change the owner of", &path, e))?;
        }
        // After the chown, which may clear mode bits; also undoes the umask of mkdirat.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(|e| KeysFileError::io("cannot change the mode of", &path, e))?;
        Ok(fd)
    }
}

/// Replace `name` in `dir` atomically with a 0600 file of the account's:
/// a new temp file (never an existing one, never through a link), fsync,
/// renameat over `name` (which replaces a link there, not its target), fsync
/// of the directory. The temp file is removed again on any error.
fn replace_in_dir(dir: &OwnedFd, name: &str, contents: &[u8], owner: &KeysOwner<'_>) -> io::Result<()> {
    let tmp = temp_name(name);
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(0o600))?;
    let result = (|| -> io::Result<()> {
        let mut f = File::from(fd);
        f.write_all(contents)?;
        if is_root() {
            rustix::fs::fchown(&f, Some(Uid::from_raw(owner.uid)), Some(Gid::from_raw(owner.gid)))?;
        }
        // The exact mode whatever the umask, after the chown that may clear bits.
        rustix::fs::fchmod(&f, Mode::from_raw_mode(0o600))?;
        rustix::fs::fsync(&f)?;
        rustix::fs::renameat(dir, &tmp, dir, name)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            // The new file is already in place: a failed directory fsync must
            // not report the change as failed (callers would undo it).
            let _ = rustix::fs::fsync(dir);
            Ok(())
        }
        Err(e) => {
            let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
            Err(e)
        }
    }
}

pub fn is_root() -> bool {
    crate::uid::is_root()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// Everything an attack through a directory could change: its entries,
    /// mode and owner, and the content, mode and owner of its `authorized_keys`.
    #[derive(Debug, PartialEq)]
    struct Snapshot {
        entries: Vec<String>,
        dir: (u32, u32, u32),
        keys: String,
        file: (u32, u32, u32),
    }

    fn snapshot(dir: &Path) -> Snapshot {
        let d = std::fs::symlink_metadata(dir).unwrap();
        let f = std::fs::symlink_metadata(dir.join("authorized_keys")).unwrap();
        Snapshot {
            entries: entries(dir),
            dir: (d.mode(), d.uid(), d.gid()),
            keys: std::fs::read_to_string(dir.join("authorized_keys")).unwrap(),
            file: (f.mode(), f.uid(), f.gid()),
        }
    }

    /// A directory with an `authorized_keys`, like another account's `.ssh`
    /// or /root/.ssh, with modes keyhaven itself would never set.
    fn victim(base: &Path) -> PathBuf {
        let v = base.join("victim");
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("authorized_keys"), "ssh-ed25519 AAAA victim\n").unwrap();
        set_mode(&v.join("authorized_keys"), 0o640);
        set_mode(&v, 0o751);
        v
    }

    fn home_in(base: &Path) -> PathBuf {
        let home = base.join("home");
        std::fs::create_dir(&home).unwrap();
        set_mode(&home, 0o755);
        home
    }

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

    #[test]
    fn missing_dot_ssh_is_created_for_the_account_and_rewrites_leave_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 2345, home: &home };
        // Clearing where nothing exists creates nothing.
        KeysLocation::Home.write(&owner, "").unwrap();
        assert!(entries(&home).is_empty(), "clearing created {:?}", entries(&home));
        KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA one").unwrap();
        let p = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA two\n\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ssh-ed25519 AAAA two\n");
        let ssh = home.join(".ssh");
        assert_eq!(entries(&ssh), ["authorized_keys"], "temp files left behind");
        assert_eq!((mode(&ssh), mode(&p)), (0o700, 0o600));
        assert_eq!(mode(&home), 0o755, "the home's mode is the account's business");
        if is_root() {
            let (s, f) = (std::fs::metadata(&ssh).unwrap(), std::fs::metadata(&p).unwrap());
            assert_eq!((s.uid(), s.gid()), (1234, 2345));
            assert_eq!((f.uid(), f.gid()), (1234, 2345));
        }
        KeysLocation::Home.write(&owner, " \n").unwrap();
        assert!(entries(&ssh).is_empty());
        // No home: nothing to clear, but nowhere to write either.
        let gone = d.path().join("gone");
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 2345, home: &gone };
        KeysLocation::Home.write(&owner, "").unwrap();
        let e = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA").unwrap_err();
        assert!(matches!(e, KeysFileError::HomeMissing { .. }), "{e}");
        assert!(!gone.exists());
    }

    #[test]
    fn root_owned_dot_ssh_is_handed_to_the_account() {
        if !is_root() {
            eprintln!("skipped: needs root to own files as another uid");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let ssh = home.join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        set_mode(&ssh, 0o755);
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 1234, home: &home };
        KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA").unwrap();
        let m = std::fs::metadata(&ssh).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 1234, 0o700));
    }

    #[test]
    fn dot_ssh_symlink_is_neither_written_nor_cleared_through() {
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let victim = victim(d.path());
        std::os::unix::fs::symlink(&victim, home.join(".ssh")).unwrap();
        let before = snapshot(&victim);
        let owner = KeysOwner { username: "eve", uid: 1234, gid: 1234, home: &home };
        let expected = format!(
            "~/.ssh of eve ({}) is a symbolic link; keyhaven does not follow it. Replace it with a directory owned by eve",
            home.join(".ssh").display()
        );
        for text in ["ssh-ed25519 AAAA eve", ""] {
            let e = KeysLocation::Home.write(&owner, text).unwrap_err();
            assert!(matches!(e, KeysFileError::SshIsSymlink { .. }), "{e:?}");
            assert_eq!(e.to_string(), expected);
            assert_eq!(snapshot(&victim), before, "the link's target changed ({text:?})");
            assert!(std::fs::symlink_metadata(home.join(".ssh")).unwrap().file_type().is_symlink());
        }
        let e = KeysLocation::Home.check(&owner).unwrap_err();
        assert!(matches!(e, KeysFileError::SshIsSymlink { .. }), "{e:?}");
    }

    #[test]
    fn home_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let victim_ssh = {
            let v = victim(&real);
            let ssh = real.join(".ssh");
            std::fs::rename(v, &ssh).unwrap();
            ssh
        };
        let before = snapshot(&victim_ssh);
        let link = d.path().join("home");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // With a trailing slash the kernel would follow the link despite O_NOFOLLOW.
        let with_slash = PathBuf::from(format!("{}/", link.display()));
        for home in [&link, &with_slash] {
            let owner = KeysOwner { username: "eve", uid: 1234, gid: 1234, home };
            for text in ["ssh-ed25519 AAAA eve", ""] {
                let e = KeysLocation::Home.write(&owner, text).unwrap_err();
                assert!(matches!(e, KeysFileError::HomeIsSymlink { .. }), "{e:?}");
                assert_eq!(
                    e.to_string(),
                    format!(
                        "home directory of eve ({}) is a symbolic link; keyhaven does not follow it. Set the account's home to the directory it points to",
                        link.display()
                    )
                );
                assert_eq!(snapshot(&victim_ssh), before, "written through the home link ({home:?}, {text:?})");
            }
        }
        // `..` would leave the checked directory: refused before anything is opened.
        let dotdot = real.join(".ssh/..");
        let owner = KeysOwner { username: "eve", uid: 1234, gid: 1234, home: &dotdot };
        let e = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA eve").unwrap_err();
        assert!(matches!(e, KeysFileError::HomeNotCanonical { .. }), "{e:?}");
        assert_eq!(snapshot(&victim_ssh), before);
    }

    #[test]
    fn directories_of_another_uid_are_refused() {
        if !is_root() {
            eprintln!("skipped: needs root to own files as another uid");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let ssh = home.join(".ssh");
        std::fs::rename(victim(d.path()), &ssh).unwrap();
        std::os::unix::fs::chown(&ssh, Some(4321), Some(4321)).unwrap();
        std::os::unix::fs::chown(ssh.join("authorized_keys"), Some(4321), Some(4321)).unwrap();
        let before = snapshot(&ssh);
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 1234, home: &home };
        for text in ["ssh-ed25519 AAAA bob", ""] {
            let e = KeysLocation::Home.write(&owner, text).unwrap_err();
            assert!(matches!(e, KeysFileError::SshWrongOwner { found: 4321, .. }), "{e:?}");
            assert!(e.to_string().contains("belongs to uid 4321, not to bob (uid 1234)"), "{e}");
            assert_eq!(snapshot(&ssh), before, "{text:?}");
        }
        // A home of another account is not written into either.
        std::os::unix::fs::chown(&home, Some(4321), Some(4321)).unwrap();
        std::fs::remove_dir_all(&ssh).unwrap();
        for text in ["ssh-ed25519 AAAA bob", ""] {
            let e = KeysLocation::Home.write(&owner, text).unwrap_err();
            assert!(matches!(e, KeysFileError::HomeWrongOwner { found: 4321, uid: 1234, .. }), "{e:?}");
            assert!(entries(&home).is_empty());
        }
    }

    #[test]
    fn authorized_keys_symlink_is_replaced_and_removed_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let ssh = home.join(".ssh");
        std::fs::create_dir(&ssh).unwrap();
        let outside = victim(d.path());
        let before = snapshot(&outside);
        let keys = ssh.join("authorized_keys");
        std::os::unix::fs::symlink(outside.join("authorized_keys"), &keys).unwrap();
        let owner = KeysOwner { username: "eve", uid: 1234, gid: 1234, home: &home };
        KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA eve").unwrap();
        assert!(std::fs::symlink_metadata(&keys).unwrap().file_type().is_file(), "the link was not replaced");
        assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA eve\n");
        assert_eq!(snapshot(&outside), before, "written through the link");
        std::fs::remove_file(&keys).unwrap();
        std::os::unix::fs::symlink(outside.join("authorized_keys"), &keys).unwrap();
        KeysLocation::Home.write(&owner, "").unwrap();
        assert!(std::fs::symlink_metadata(&keys).is_err(), "the link is still there");
        assert_eq!(snapshot(&outside), before, "the link's target was removed");
    }

    #[test]
    fn a_failed_write_removes_its_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let home = home_in(d.path());
        let ssh = home.join(".ssh");
        // rename(2) cannot replace a directory with a file.
        std::fs::create_dir_all(ssh.join("authorized_keys")).unwrap();
        let owner = KeysOwner { username: "bob", uid: 1234, gid: 1234, home: &home };
        let e = KeysLocation::Home.write(&owner, "ssh-ed25519 AAAA bob").unwrap_err();
        assert!(matches!(e, KeysFileError::Io { .. }), "{e:?}");
        assert!(e.to_string().starts_with(&format!("cannot write {}", ssh.join("authorized_keys").display())), "{e}");
        assert_eq!(entries(&ssh), ["authorized_keys"]);
        assert!(ssh.join("authorized_keys").is_dir());
    }
}
