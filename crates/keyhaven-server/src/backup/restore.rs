//! Restoring a backup: stage (decrypt and check everything, change nothing
//! else), then apply (current state aside, staged state in).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use keyhaven_store::{StoreError, DB_FILE, MASTER_KEY_FILE};

use super::create::Scratch;
use super::format::{self, Manifest, PartKind, Passphrase, MANIFEST};
use super::{BackupError, Result};

/// A verified restore waiting to be applied (at the next start).
pub const STAGED_DIR: &str = "restore-staged";
/// Where applying puts the state it replaces.
pub const PREVIOUS_PREFIX: &str = "restore-previous-";
/// In the staged dir: the name of its previous dir, once chosen.
const PREVIOUS_NOTE: &str = ".previous";

/// A backup verified and staged in the data dir.
#[derive(Debug)]
pub struct Staged {
    pub manifest: Manifest,
    pub dir: PathBuf,
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path).map_err(|e| BackupError::io(path, e))
}

fn sync_dir(path: &Path) {
    if let Ok(d) = std::fs::File::open(path) {
        let _ = d.sync_all();
    }
}

/// Decrypt `input` and check it completely — passphrase, every part's size
/// and SHA-256 against the manifest, the schema version, the database's
/// integrity and that its master key opens it — into `<data_dir>/restore-staged/`.
/// On any error nothing is left behind and nothing else was touched.
pub fn stage(data_dir: &Path, input: impl Read, pass: &Passphrase) -> Result<Staged> {
    let scratch = Scratch::new(data_dir, ".restore-tmp")?;
    let manifest = unpack(&scratch.0, input, pass)?;
    let staged_db = scratch.0.join(DB_FILE);
    let version =
        keyhaven_store::snapshot::check_copy(&staged_db, &scratch.0.join(MASTER_KEY_FILE)).map_err(|e| match e {
            StoreError::NewerSchema { found, known, needed, .. } => BackupError::NewerSchema {
                found,
                known,
                made_by: needed.unwrap_or_else(|| manifest.keyhaven_version.clone()),
            },
            StoreError::WrongMasterKey { .. } => {
                BackupError::BadDatabase("its master.key does not open its database".into())
            }
            other => BackupError::BadDatabase(other.to_string()),
        })?;
    if version != manifest.schema_version {
        return Err(BackupError::BadDatabase(format!(
            "the manifest says schema version {}, the database has {version}",
            manifest.schema_version
        )));
    }
    let manifest_path = scratch.0.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Manifest(e.to_string()))?;
    std::fs::write(&manifest_path, json).map_err(|e| BackupError::io(&manifest_path, e))?;
    // The commit point: a complete, verified staged dir appears at once.
    let dest = data_dir.join(STAGED_DIR);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| BackupError::io(&dest, e))?;
    }
    std::fs::rename(&scratch.0, &dest).map_err(|e| BackupError::io(&dest, e))?;
    sync_dir(data_dir);
    Ok(Staged { manifest, dir: dest })
}

/// Decrypt and unpack into `dir`, checking each part against the manifest.
fn unpack(dir: &Path, input: impl Read, pass: &Passphrase) -> Result<Manifest> {
    let reader = format::decrypt(input, pass)?;
    let damaged = |e: std::io::Error| BackupError::Damaged(e.to_string());
    let mut archive = tar::Archive::new(reader);
    let mut manifest: Option<Manifest> = None;
    let mut seen = HashSet::new();
    for entry in archive.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        let name = entry
            .path()
            .map_err(damaged)?
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| BackupError::Manifest("an entry name is not UTF-8".into()))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BackupError::Manifest(format!("entry {name} is not a regular file")));
        }
        let Some(m) = &manifest else {
            if name != MANIFEST || entry.size() > format::MANIFEST_MAX {
                return Err(BackupError::Manifest(format!("the first entry is {name}, not a {MANIFEST}")));
            }
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            let m = Manifest::parse(&bytes)?;
            // Refuse a newer schema before writing anything.
            let known = keyhaven_store::snapshot::latest_schema();
            if m.schema_version > known {
                return Err(BackupError::NewerSchema {
                    found: m.schema_version,
                    known,
                    made_by: m.keyhaven_version.clone(),
                });
            }
            manifest = Some(m);
            continue;
        };
        let part = m
            .part(&name)
            .ok_or_else(|| BackupError::PartMismatch { part: name.clone(), what: "not listed in the manifest" })?;
        let kind = PartKind::of(&name).ok_or_else(|| BackupError::Manifest(format!("bad part name {name}")))?;
        if !seen.insert(name.clone()) {
            return Err(BackupError::PartMismatch { part: name, what: "present twice" });
        }
        if entry.size() != part.size {
            return Err(BackupError::PartMismatch { part: name, what: "size differs" });
        }
        let dest = dir.join(&name);
        if let Some(parent) = dest.parent() {
            mkdir(parent, 0o700)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(kind.mode(&name))
            .open(&dest)
            .map_err(|e| BackupError::io(&dest, e))?;
        let mut tee = HashingWriter { inner: &mut f, hash: <sha2::Sha256 as sha2::Digest>::new(), n: 0 };
        std::io::copy(&mut (&mut entry).take(part.size), &mut tee).map_err(damaged)?;
        let (sha, n) = (hex::encode(sha2::Digest::finalize(tee.hash)), tee.n);
        if n != part.size {
            return Err(BackupError::PartMismatch { part: name, what: "size differs" });
        }
        if !sha.eq_ignore_ascii_case(&part.sha256) {
            return Err(BackupError::PartMismatch { part: name, what: "SHA-256 differs" });
        }
        f.sync_all().map_err(|e| BackupError::io(&dest, e))?;
    }
    let manifest = manifest.ok_or_else(|| BackupError::Damaged("it holds no manifest".into()))?;
    for p in &manifest.parts {
        if !seen.contains(&p.name) {
            return Err(BackupError::PartMismatch { part: p.name.clone(), what: "missing from the file" });
        }
    }
    // Read to the end: age checks there that the stream was not cut short.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(damaged)?;
    Ok(manifest)
}

struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: sha2::Sha256,
    n: u64,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hash, &buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The files of the current state that a restore replaces (relative to the
/// data dir): the database with its journal, the master key (and a rotation's
/// leftover), every host key file, and the TLS pair when the backup has one.
fn replaced(data_dir: &Path, manifest: &Manifest) -> Vec<String> {
    let mut names: Vec<String> = [
        DB_FILE.to_string(),
        format!("{DB_FILE}-wal"),
        format!("{DB_FILE}-shm"),
        MASTER_KEY_FILE.to_string(),
        format!("{MASTER_KEY_FILE}.new"),
    ]
    .into();
    names.extend(format::host_key_parts(data_dir));
    if manifest.has_tls() {
        names.extend(["tls/cert.pem".to_string(), "tls/key.pem".to_string()]);
    }
    names
}

/// Put a staged restore in place (the daemon must not run on `data_dir`):
/// the current state moves to `restore-previous-<time>/`, the staged parts in.
/// Returns the previous state's dir, or `None` when nothing was staged.
/// Safe to run again after a crash half-way: it carries on where it stopped.
pub fn apply_staged(data_dir: &Path) -> Result<Option<PathBuf>> {
    let staged = data_dir.join(STAGED_DIR);
    if !staged.is_dir() {
        return Ok(None);
    }
    let manifest_path = staged.join(MANIFEST);
    let manifest = Manifest::parse(&std::fs::read(&manifest_path).map_err(|e| BackupError::io(&manifest_path, e))?)?;
    let note = staged.join(PREVIOUS_NOTE);
    let previous = match std::fs::read_to_string(&note) {
        Ok(name) if name.starts_with(PREVIOUS_PREFIX) && !name.contains('/') => data_dir.join(name.trim()),
        _ => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
            let mut name = format!("{PREVIOUS_PREFIX}{stamp}");
            let mut i = 1;
            while data_dir.join(&name).exists() {
                i += 1;
                name = format!("{PREVIOUS_PREFIX}{stamp}-{i}");
            }
            let mut f = std::fs::File::create(&note).map_err(|e| BackupError::io(&note, e))?;
            f.write_all(name.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| BackupError::io(&note, e))?;
            data_dir.join(name)
        }
    };
    mkdir(&previous, 0o700)?;
    // Aside: what is there now, unless an earlier, interrupted run already
    // moved it (then what is there is already restored).
    for name in replaced(data_dir, &manifest) {
        let (src, dst) = (data_dir.join(&name), previous.join(&name));
        if src.exists() && !dst.exists() {
            if let Some(parent) = dst.parent() {
                mkdir(parent, 0o700)?;
            }
            std::fs::rename(&src, &dst).map_err(|e| BackupError::io(&src, e))?;
        }
    }
    // In: each staged part.
    for part in &manifest.parts {
        let (src, dst) = (staged.join(&part.name), data_dir.join(&part.name));
        if src.exists() {
            if let Some(parent) = dst.parent() {
                // sshd/ is traversable like the data dir (sshd reads keys files as users); tls/ is private.
                mkdir(parent, if part.name.starts_with("sshd/") { 0o755 } else { 0o700 })?;
            }
            std::fs::rename(&src, &dst).map_err(|e| BackupError::io(&src, e))?;
        }
    }
    sync_dir(data_dir);
    std::fs::remove_dir_all(&staged).map_err(|e| BackupError::io(&staged, e))?;
    sync_dir(data_dir);
    Ok(Some(previous))
}

/// Remove the states that restores replaced, once the restored one has
/// started. Returns how many were removed.
pub fn forget_previous(data_dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(|s| s.starts_with(PREVIOUS_PREFIX)) && e.file_type().is_ok_and(|t| t.is_dir()) {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => n += 1,
                Err(err) => tracing::warn!("cannot remove {}: {err}", e.path().display()),
            }
        }
    }
    n
}

/// Restore a backup file into a data dir no daemon runs on (`keyhaven
/// restore`): lock, stage, apply. Returns the manifest and where the
/// previous state went.
pub fn restore_offline(data_dir: &Path, input: &Path, pass: &Passphrase) -> Result<(Manifest, Option<PathBuf>)> {
    let _lock = super::lock::DataDirLock::acquire(data_dir)?;
    let f = std::fs::File::open(input).map_err(|e| BackupError::io(input, e))?;
    let staged = stage(data_dir, std::io::BufReader::new(f), pass)?;
    let previous = apply_staged(data_dir)?;
    Ok((staged.manifest, previous))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data dir with a store in it, and a backup of it.
    fn dir_with_backup(pass: &Passphrase) -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = keyhaven_store::Store::open(dir.path()).unwrap();
        store.setting_set("marker", &serde_json::json!("backed up")).unwrap();
        drop(store);
        let mut file = Vec::new();
        crate::backup::create_backup(dir.path(), &mut file, pass).unwrap();
        (dir, file)
    }

    #[test]
    fn an_apply_interrupted_half_way_carries_on_without_losing_either_state() {
        let pass = Passphrase::new("test passphrase").unwrap();
        let (dir, file) = dir_with_backup(&pass);
        let d = dir.path();
        // Change the live state after the backup, then stage the backup.
        {
            let (store, _) = keyhaven_store::Store::open(d).unwrap();
            store.setting_set("marker", &serde_json::json!("after")).unwrap();
        }
        let staged = stage(d, &file[..], &pass).unwrap();
        let staged_db = std::fs::read(staged.dir.join(DB_FILE)).unwrap();
        let live_key = std::fs::read(d.join(MASTER_KEY_FILE)).unwrap();
        // A crash after the previous dir was chosen and only the database moved aside.
        let previous = d.join(format!("{PREVIOUS_PREFIX}crashed"));
        std::fs::create_dir(&previous).unwrap();
        std::fs::write(staged.dir.join(PREVIOUS_NOTE), format!("{PREVIOUS_PREFIX}crashed")).unwrap();
        let live_db = std::fs::read(d.join(DB_FILE)).unwrap();
        std::fs::rename(d.join(DB_FILE), previous.join(DB_FILE)).unwrap();

        assert_eq!(apply_staged(d).unwrap().as_deref(), Some(previous.as_path()));
        assert_eq!(std::fs::read(d.join(DB_FILE)).unwrap(), staged_db);
        assert_eq!(std::fs::read(previous.join(DB_FILE)).unwrap(), live_db, "the previous database was lost");
        assert_eq!(std::fs::read(previous.join(MASTER_KEY_FILE)).unwrap(), live_key);
        assert!(!d.join(STAGED_DIR).exists());
        assert!(apply_staged(d).unwrap().is_none(), "nothing left to apply");
        let (store, _) = keyhaven_store::Store::open(d).unwrap();
        assert_eq!(store.setting_get("marker").unwrap(), Some(serde_json::json!("backed up")));
        drop(store);
        assert_eq!(forget_previous(d), 1);
        assert!(!previous.exists());
    }

    #[test]
    fn a_failed_stage_leaves_nothing_behind() {
        let pass = Passphrase::new("test passphrase").unwrap();
        let (dir, file) = dir_with_backup(&pass);
        let wrong = Passphrase::new("another").unwrap();
        assert!(matches!(stage(dir.path(), &file[..], &wrong), Err(BackupError::WrongPassphrase)));
        assert!(matches!(stage(dir.path(), &file[..file.len() - 20], &pass), Err(BackupError::Damaged(_))));
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("restore"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
