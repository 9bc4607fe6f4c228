//! Whether sshd can use an authorized-keys file: sshd opens it *as the
//! account* (so every directory on the way must be searchable by that uid or
//! one of its groups) and, with `StrictModes yes`, refuses it when the file or
//! a directory above it is writable by group or others or owned by anyone but
//! root or the account. These rules are sshd's; keyhaven checks them before it
//! reports keys as saved, so a key that would be refused at login is caught
//! with a message that says what to change.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Who sshd reads the file as.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    pub username: &'a str,
    pub uid: u32,
    /// Primary group first, then the supplementary ones.
    pub gids: &'a [u32],
}

/// Whether `reader` may exercise `want` (4 read, 1 search) on a file with
/// this owner, group and mode, as the kernel decides (owner bits, else group
/// bits, else other bits; root may do anything but search needs some x bit).
fn permitted(reader: &Reader<'_>, uid: u32, gid: u32, mode: u32, want: u32) -> bool {
    if reader.uid == 0 {
        return want != 1 || mode & 0o111 != 0;
    }
    let bits = if uid == reader.uid {
        (mode >> 6) & 7
    } else if reader.gids.contains(&gid) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    bits & want == want
}

/// `path` and its ancestors, from `/` down.
fn chain(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = path.ancestors().map(Path::to_path_buf).collect();
    out.reverse();
    out
}

/// Why sshd, reading `file` as `reader` with StrictModes, would not use it
/// (`None`: it would). Components that do not exist yet are taken to be
/// created the way keyhaven creates them (root-owned 0755 directories, or the
/// account's own 0700 `~/.ssh`). `home`: StrictModes stops checking ownership
/// at the account's home directory for files inside it, as sshd does.
pub fn sshd_read_problem(file: &Path, home: Option<&Path>, reader: &Reader<'_>) -> Option<String> {
    let fix_search = |dir: &Path| {
        format!(
            "put keyhaven's data dir on a path every account can traverse (e.g. --data-dir /var/lib/keyhaven), \
             or let others through: chmod o+x {}",
            dir.display()
        )
    };
    // Follow links like sshd's realpath; what does not exist yet stays as given.
    let existing = file.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let real = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    let rest = file.strip_prefix(existing).unwrap_or(Path::new(""));
    let full = real.join(rest);
    let home = home.and_then(|h| std::fs::canonicalize(h).ok());
    let under_home = home.as_ref().is_some_and(|h| full.starts_with(h));
    for p in chain(&full) {
        let Ok(m) = std::fs::metadata(&p) else { break };
        let mode = m.permissions().mode() & 0o7777;
        let is_target = p == full;
        if !is_target && !permitted(reader, m.uid(), m.gid(), mode, 1) {
            return Some(format!(
                "{} (owner uid {}, mode {mode:04o}) cannot be searched by {} (uid {}): sshd reads {} as that account \
                 and cannot reach it; {}",
                p.display(),
                m.uid(),
                reader.username,
                reader.uid,
                full.display(),
                fix_search(&p)
            ));
        }
        // StrictModes: ownership and write bits, from / (or the home) down.
        let checked = !under_home || home.as_ref().is_some_and(|h| p.starts_with(h));
        if checked && ((m.uid() != 0 && m.uid() != reader.uid) || mode & 0o022 != 0) {
            return Some(format!(
                "{} (owner uid {}, mode {mode:04o}) is writable by group or others or owned by another account, so \
                 sshd (StrictModes) refuses the keys of {} below it; make it owned by root and not group- or \
                 world-writable (chmod go-w {}), or move keyhaven's data dir (e.g. /var/lib/keyhaven)",
                p.display(),
                m.uid(),
                reader.username,
                p.display()
            ));
        }
        if is_target && !permitted(reader, m.uid(), m.gid(), mode, 4) {
            return Some(format!(
                "{} (owner uid {}, mode {mode:04o}) cannot be read by {} (uid {})",
                p.display(),
                m.uid(),
                reader.username,
                reader.uid
            ));
        }
    }
    None
}

/// The StrictModes rule for a directory keyhaven keeps keys below: every
/// directory from `/` to `dir` must be owned by root (or keyhaven's own user)
/// and not writable by group or others. Returns the first offender, described.
pub fn strict_modes_problem(dir: &Path) -> Option<String> {
    let me = crate::uid::effective();
    let abs = std::fs::canonicalize(dir).ok()?;
    for p in chain(&abs) {
        let m = std::fs::metadata(&p).ok()?;
        let mode = m.permissions().mode() & 0o7777;
        if (m.uid() != 0 && m.uid() != me) || mode & 0o022 != 0 {
            return Some(format!(
                "{} (owner uid {}, mode {:04o}) is writable by group or others or owned by another user; \
                 sshd (StrictModes) will refuse keys stored below it. Put the data dir on a path of root-owned, \
                 non-world-writable directories (e.g. /var/lib/keyhaven)",
                p.display(),
                m.uid(),
                mode
            ));
        }
    }
    None
}

/// Whether an account that is not root (and in none of the owners' groups)
/// can traverse to `dir`: the first directory it cannot search, described.
pub fn others_cannot_reach(dir: &Path) -> Option<String> {
    let abs = std::fs::canonicalize(dir).ok()?;
    let nobody = Reader { username: "other accounts", uid: u32::MAX - 1, gids: &[] };
    for p in chain(&abs) {
        let m = std::fs::metadata(&p).ok()?;
        let mode = m.permissions().mode() & 0o7777;
        if !permitted(&nobody, m.uid(), m.gid(), mode, 1) {
            return Some(format!(
                "{} (mode {mode:04o}) cannot be searched by other accounts, so sshd cannot read the keys keyhaven \
                 keeps for accounts other than root below {}; move the data dir (e.g. --data-dir \
                 /var/lib/keyhaven) or chmod o+x {}",
                p.display(),
                abs.display(),
                p.display()
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn set(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A root-owned scratch tree outside /tmp (which is world-writable).
    fn scratch() -> Option<tempfile::TempDir> {
        if crate::uid::effective() != 0 {
            return None;
        }
        std::fs::create_dir_all("/var/lib/keyhaven-test").ok()?;
        set(Path::new("/var/lib/keyhaven-test"), 0o755);
        tempfile::tempdir_in("/var/lib/keyhaven-test").ok()
    }

    #[test]
    fn permission_bits_are_read_as_the_kernel_does() {
        let alice = Reader { username: "alice", uid: 1000, gids: &[1000, 27] };
        assert!(permitted(&alice, 1000, 1, 0o700, 1));
        assert!(!permitted(&alice, 0, 0, 0o700, 1));
        assert!(permitted(&alice, 0, 27, 0o710, 1));
        assert!(permitted(&alice, 0, 0, 0o711, 1));
        assert!(!permitted(&alice, 0, 0, 0o640, 4));
        assert!(permitted(&alice, 0, 0, 0o644, 4));
        // The owner's bits decide for the owner even when others have more.
        assert!(!permitted(&alice, 1000, 0, 0o077, 4));
        let root = Reader { username: "root", uid: 0, gids: &[0] };
        assert!(permitted(&root, 5, 5, 0o700, 1) && permitted(&root, 5, 5, 0o000, 4));
    }

    #[test]
    fn a_data_dir_under_a_private_directory_is_unreachable_for_others() {
        let Some(t) = scratch() else { return };
        let private = t.path().join("private");
        let data = private.join("data");
        std::fs::create_dir_all(data.join("sshd/authorized_keys")).unwrap();
        set(t.path(), 0o755);
        set(&private, 0o700);
        set(&data, 0o711);
        let file = data.join("sshd/authorized_keys/alice");
        let alice = Reader { username: "alice", uid: 4242, gids: &[4242] };
        let p = sshd_read_problem(&file, None, &alice).unwrap();
        assert!(
            p.contains(&format!("{} (owner uid 0, mode 0700) cannot be searched by alice", private.display())),
            "{p}"
        );
        assert!(p.contains("/var/lib/keyhaven"), "{p}");
        assert!(others_cannot_reach(&data).unwrap().contains("cannot be searched by other accounts"));
        // Root is never stopped by search bits.
        let root = Reader { username: "root", uid: 0, gids: &[0] };
        assert_eq!(sshd_read_problem(&file, None, &root), None);
        // Opened up, the not-yet-written file is fine.
        set(&private, 0o711);
        assert_eq!(sshd_read_problem(&file, None, &alice), None);
        assert_eq!(others_cannot_reach(&data), None);
        // A group-writable directory is StrictModes' refusal.
        set(&data.join("sshd"), 0o775);
        assert!(sshd_read_problem(&file, None, &alice).unwrap().contains("StrictModes"));
        assert!(strict_modes_problem(&data.join("sshd/authorized_keys")).is_some());
    }

    #[test]
    fn inside_the_home_ownership_is_checked_from_the_home_down() {
        let Some(t) = scratch() else { return };
        // A home owned by the account below a directory the account owns too
        // would pass; one below a directory of another account stops at the home.
        let home = t.path().join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        set(t.path(), 0o755);
        set(&home, 0o755);
        std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
        std::os::unix::fs::chown(home.join(".ssh"), Some(4242), Some(4242)).unwrap();
        set(&home.join(".ssh"), 0o700);
        let file = home.join(".ssh/authorized_keys");
        let alice = Reader { username: "alice", uid: 4242, gids: &[4242] };
        assert_eq!(sshd_read_problem(&file, Some(&home), &alice), None);
        set(&home, 0o775);
        assert!(sshd_read_problem(&file, Some(&home), &alice).unwrap().contains("StrictModes"));
    }
}
