//! Making a backup file of a data dir, whether or not the daemon runs.

use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use keyhaven_store::{DB_FILE, MASTER_KEY_FILE};
use zeroize::Zeroizing;

use super::format::{self, Manifest, Part, Passphrase, FORMAT, FORMAT_VERSION, MANIFEST};
use super::{BackupError, Result};

/// What a backup holds (printed by the CLI, returned by `config.save`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub schema_version: u32,
    /// Bytes of the database copy inside.
    pub database_size: u64,
    pub parts: Vec<String>,
    pub created: String,
}

/// A private scratch directory in the data dir (same disk, root only),
/// removed on drop.
pub(crate) struct Scratch(pub PathBuf);

/// The prefixes of scratch directories (`<prefix>-<pid>-<nanos>`).
const SCRATCH_PREFIXES: [&str; 2] = [".backup-tmp-", ".restore-tmp-"];

/// Remove scratch directories whose process is gone (killed mid-backup).
fn sweep_scratch(data_dir: &Path) {
    for e in std::fs::read_dir(data_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = SCRATCH_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Scratch {
    pub(crate) fn new(data_dir: &Path, prefix: &str) -> Result<Scratch> {
        sweep_scratch(data_dir);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let path = data_dir.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&path).map_err(|e| BackupError::io(&path, e))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write an encrypted backup of `data_dir` to `out`: a consistent copy of
/// the database, `master.key`, the sshd host key files and the data dir's
/// TLS certificate and key.
pub fn create_backup(data_dir: &Path, out: impl Write, pass: &Passphrase) -> Result<BackupSummary> {
    let scratch = Scratch::new(data_dir, ".backup-tmp")?;
    let db_copy = scratch.0.join(DB_FILE);
    keyhaven_store::snapshot::snapshot_db(data_dir, &db_copy)?;
    // The key that seals this copy's secrets (a rotation between the copy and
    // this read would show as a mismatch here, never as a broken backup).
    let key_path = data_dir.join(MASTER_KEY_FILE);
    let schema_version = keyhaven_store::snapshot::check_copy(&db_copy, &key_path)?;
    let key = Zeroizing::new(std::fs::read(&key_path).map_err(|e| BackupError::io(&key_path, e))?);

    // Every part as (name, source): small ones in memory, the database from its copy.
    enum Source {
        Bytes(Zeroizing<Vec<u8>>),
        File(PathBuf),
    }
    let mut sources: Vec<(String, Source)> =
        vec![(DB_FILE.into(), Source::File(db_copy.clone())), (MASTER_KEY_FILE.into(), Source::Bytes(key))];
    for name in format::host_key_parts(data_dir) {
        let p = data_dir.join(&name);
        sources.push((name, Source::Bytes(Zeroizing::new(std::fs::read(&p).map_err(|e| BackupError::io(&p, e))?))));
    }
    let (cert, tls_key) = (data_dir.join("tls/cert.pem"), data_dir.join("tls/key.pem"));
    if cert.is_file() && tls_key.is_file() {
        for (name, p) in [("tls/cert.pem", cert), ("tls/key.pem", tls_key)] {
            let bytes = Zeroizing::new(std::fs::read(&p).map_err(|e| BackupError::io(&p, e))?);
            sources.push((name.into(), Source::Bytes(bytes)));
        }
    }

    let mut parts = Vec::with_capacity(sources.len());
    for (name, src) in &sources {
        let (sha256, size) = match src {
            Source::Bytes(b) => format::hash_reader(&b[..]).map_err(|e| BackupError::io(name, e))?,
            Source::File(p) => format::hash_reader(std::fs::File::open(p).map_err(|e| BackupError::io(p, e))?)
                .map_err(|e| BackupError::io(p, e))?,
        };
        parts.push(Part { name: name.clone(), size, sha256 });
    }
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        keyhaven_version: env!("CARGO_PKG_VERSION").into(),
        created: created.clone(),
        schema_version,
        parts,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Manifest(e.to_string()))?;

    let out_err = |e: std::io::Error| BackupError::io("the backup output", e);
    let enc = format::encrypt(BufWriter::with_capacity(256 * 1024, out), pass)?;
    let mut tar = tar::Builder::new(enc);
    let mtime = chrono::Utc::now().timestamp().max(0) as u64;
    let header = |size: u64, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        h
    };
    let mut h = header(manifest_json.len() as u64, 0o600);
    tar.append_data(&mut h, MANIFEST, &manifest_json[..]).map_err(out_err)?;
    for ((name, src), part) in sources.iter().zip(&manifest.parts) {
        let mode = format::PartKind::of(name).map(|k| k.mode(name)).unwrap_or(0o600);
        let mut h = header(part.size, mode);
        match src {
            Source::Bytes(b) => tar.append_data(&mut h, name, &b[..]).map_err(out_err)?,
            Source::File(p) => {
                let f = std::fs::File::open(p).map_err(|e| BackupError::io(p, e))?;
                // Exactly the bytes hashed: the copy is private and unchanging.
                tar.append_data(&mut h, name, f.take(part.size)).map_err(out_err)?
            }
        }
    }
    let enc = tar.into_inner().map_err(out_err)?;
    let mut buf = enc.finish().map_err(out_err)?;
    buf.flush().map_err(out_err)?;
    Ok(BackupSummary {
        schema_version,
        database_size: manifest.part(DB_FILE).map(|p| p.size).unwrap_or(0),
        parts: manifest.parts.iter().map(|p| p.name.clone()).collect(),
        created,
    })
}

/// [`create_backup`] into the file `out`, created 0600 and written in full
/// before it replaces anything of that name.
pub fn create_backup_file(data_dir: &Path, out: &Path, pass: &Passphrase) -> Result<BackupSummary> {
    let name = out.file_name().ok_or_else(|| {
        BackupError::io(out, std::io::Error::new(std::io::ErrorKind::InvalidInput, "--out must name a file"))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| BackupError::io(&tmp, e))?;
    let result = create_backup(data_dir, &f, pass).and_then(|s| {
        f.sync_all().map_err(|e| BackupError::io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| BackupError::io(out, e))?;
        Ok(s)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_of_dead_processes_are_swept_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // A pid above the kernel's maximum is never alive.
        let dead = dir.path().join(".backup-tmp-999999999-1");
        let live = dir.path().join(format!(".restore-tmp-{}-1", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
        let s = Scratch::new(dir.path(), ".backup-tmp").unwrap();
        assert!(!dead.exists() && live.exists() && s.0.exists());
        let path = s.0.clone();
        drop(s);
        assert!(!path.exists());
    }
}
