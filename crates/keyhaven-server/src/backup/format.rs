//! The backup file: an age file (scrypt passphrase recipient) around a tar
//! whose first entry is `manifest.json`, then the parts it lists.

use std::io::{Read, Write};
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{BackupError, Result};

/// What the manifest's `format` field holds.
pub const FORMAT: &str = "keyhaven-backup";
/// The manifest layout this binary writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// The scrypt work factor (N = 2^18, 256 MiB, about a second) backups are
/// encrypted with, which is also the most a restore accepts: a file asking
/// for more was not made by keyhaven, and would cost minutes of CPU and
/// gigabytes of memory before the passphrase could even be checked.
pub const SCRYPT_LOG_N: u8 = 18;
/// The manifest is small; a larger first entry is refused unread.
pub const MANIFEST_MAX: u64 = 1 << 20;

/// A backup passphrase. Never logged or shown.
pub struct Passphrase(SecretString);

impl Passphrase {
    /// A passphrase; empty ones are refused.
    pub fn new(s: impl Into<String>) -> Result<Passphrase> {
        let s: String = s.into();
        if s.is_empty() {
            return Err(BackupError::NoPassphrase);
        }
        Ok(Passphrase(SecretString::from(s)))
    }

    fn secret(&self) -> SecretString {
        SecretString::from(self.0.expose_secret().to_string())
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(********)")
    }
}

/// Read a passphrase file: its content without one trailing newline.
pub fn read_passphrase_file(path: &Path) -> Result<Passphrase> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| BackupError::io(path, e))?);
    let text = std::str::from_utf8(&raw)
        .map_err(|_| BackupError::io(path, std::io::Error::other("the passphrase file is not UTF-8 text")))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
    if text.is_empty() {
        return Err(BackupError::EmptyPassphrase(path.to_path_buf()));
    }
    Passphrase::new(text)
}

/// One file of the backup, as the manifest lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// The keyhaven that made the backup.
    pub keyhaven_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The database's schema version (its `user_version`).
    pub schema_version: u32,
    pub parts: Vec<Part>,
}

impl Manifest {
    /// Parse and check a manifest: format, version, part names, no duplicates,
    /// the database and master key present.
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| BackupError::Manifest(e.to_string()))?;
        if m.format != FORMAT {
            return Err(BackupError::Manifest(format!("format is {:?}, not {FORMAT:?}", m.format)));
        }
        if m.format_version > FORMAT_VERSION {
            return Err(BackupError::Manifest(format!(
                "format_version {} is newer than this keyhaven reads ({FORMAT_VERSION}); restore with keyhaven {} or newer",
                m.format_version, m.keyhaven_version
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &m.parts {
            let kind = PartKind::of(&p.name)
                .ok_or_else(|| BackupError::Manifest(format!("part name {:?} is not one keyhaven writes", p.name)))?;
            if !seen.insert(p.name.as_str()) {
                return Err(BackupError::Manifest(format!("part {} is listed twice", p.name)));
            }
            if p.size > kind.max_size() {
                return Err(BackupError::Manifest(format!("part {} is too large ({} bytes)", p.name, p.size)));
            }
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BackupError::Manifest(format!("part {} has no valid sha256", p.name)));
            }
        }
        for required in [keyhaven_store::DB_FILE, keyhaven_store::MASTER_KEY_FILE] {
            if !seen.contains(required) {
                return Err(BackupError::Manifest(format!("the part {required} is missing")));
            }
        }
        Ok(m)
    }

    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Whether the backup carries the data dir's TLS certificate and key.
    pub fn has_tls(&self) -> bool {
        self.parts.iter().any(|p| PartKind::of(&p.name) == Some(PartKind::Tls))
    }
}

/// What a part is; its name is also its path relative to the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Database,
    MasterKey,
    HostKey { public: bool },
    Tls,
}

impl PartKind {
    /// The kind of a part name, or `None` for a name keyhaven never writes
    /// (which also rules out absolute paths and `..`).
    pub fn of(name: &str) -> Option<PartKind> {
        match name {
            keyhaven_store::DB_FILE => return Some(PartKind::Database),
            keyhaven_store::MASTER_KEY_FILE => return Some(PartKind::MasterKey),
            "tls/cert.pem" | "tls/key.pem" => return Some(PartKind::Tls),
            _ => {}
        }
        let file = name.strip_prefix("sshd/")?;
        let (stem, public) = match file.strip_suffix(".pub") {
            Some(s) => (s, true),
            None => (file, false),
        };
        let alg = stem.strip_prefix("ssh_host_")?.strip_suffix("_key")?;
        (!alg.is_empty() && alg.len() <= 16 && alg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
            .then_some(PartKind::HostKey { public })
    }

    /// The file mode it is restored with.
    pub fn mode(self, name: &str) -> u32 {
        match self {
            PartKind::HostKey { public: true } => 0o644,
            PartKind::Tls if name.ends_with("cert.pem") => 0o644,
            _ => 0o600,
        }
    }

    fn max_size(self) -> u64 {
        match self {
            PartKind::Database => 16 << 30,
            PartKind::MasterKey => 64,
            PartKind::HostKey { .. } | PartKind::Tls => 1 << 20,
        }
    }
}

/// Host key files of a data dir, by part name (sorted).
pub fn host_key_parts(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join("sshd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(|n| format!("sshd/{n}")))
        .filter(|n| matches!(PartKind::of(n), Some(PartKind::HostKey { .. })))
        .collect();
    names.sort();
    names
}

/// Start an age file encrypted with `pass` on `out`.
pub fn encrypt<W: Write>(out: W, pass: &Passphrase) -> Result<age::stream::StreamWriter<W>> {
    let mut recipient = age::scrypt::Recipient::new(pass.secret());
    recipient.set_work_factor(SCRYPT_LOG_N);
    let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .map_err(|e| BackupError::io("backup", std::io::Error::other(e.to_string())))?;
    enc.wrap_output(out).map_err(|e| BackupError::io("backup", e))
}

/// Open an age file with `pass`, refusing work factors above [`SCRYPT_LOG_N`]
/// before any scrypt work.
pub fn decrypt<R: Read>(input: R, pass: &Passphrase) -> Result<age::stream::StreamReader<R>> {
    use age::DecryptError as D;
    let dec = age::Decryptor::new(input).map_err(|e| match e {
        D::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            BackupError::Damaged("it ends inside the header".into())
        }
        D::Io(e) => BackupError::Damaged(e.to_string()),
        other => BackupError::NotABackup(other.to_string()),
    })?;
    if !dec.is_scrypt() {
        return Err(BackupError::NotABackup("it is encrypted to keys, not to a passphrase".into()));
    }
    let mut identity = age::scrypt::Identity::new(pass.secret());
    identity.set_max_work_factor(SCRYPT_LOG_N);
    dec.decrypt(std::iter::once(&identity as &dyn age::Identity)).map_err(|e| match e {
        D::ExcessiveWork { required, .. } => BackupError::ExcessiveWork { required, max: SCRYPT_LOG_N },
        D::DecryptionFailed | D::NoMatchingKeys => BackupError::WrongPassphrase,
        D::InvalidMac => BackupError::Damaged("its header was altered".into()),
        D::Io(e) => BackupError::Damaged(e.to_string()),
        other => BackupError::NotABackup(other.to_string()),
    })
}

/// SHA-256 of a reader, and how many bytes it gave.
pub fn hash_reader(mut r: impl Read) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_are_only_those_keyhaven_writes() {
        for ok in ["keyhaven.db", "master.key", "sshd/ssh_host_ed25519_key", "sshd/ssh_host_rsa_key.pub", "tls/key.pem"]
        {
            assert!(PartKind::of(ok).is_some(), "{ok}");
        }
        for bad in [
            "../master.key",
            "/etc/passwd",
            "sshd/../master.key",
            "sshd/ssh_host__key",
            "sshd/ssh_host_x/y_key",
            "sshd/sshd_config",
            "tls/other.pem",
            "keyhaven.db-wal",
            "",
        ] {
            assert!(PartKind::of(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn passphrase_files_lose_one_newline_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        std::fs::write(&p, "correct horse\r\n").unwrap();
        assert_eq!(read_passphrase_file(&p).unwrap().0.expose_secret(), "correct horse");
        std::fs::write(&p, "  spaced \n\n").unwrap();
        assert_eq!(read_passphrase_file(&p).unwrap().0.expose_secret(), "  spaced \n");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(read_passphrase_file(&p), Err(BackupError::EmptyPassphrase(_))));
        assert!(format!("{:?}", Passphrase::new("secret").unwrap()).contains("****"));
    }

    #[test]
    fn manifests_are_checked() {
        let good = |parts: serde_json::Value| {
            serde_json::json!({"format": FORMAT, "format_version": 1, "keyhaven_version": "0.1.0",
                "created": "2026-12-03T07:00:00Z", "schema_version": 7, "parts": parts})
            .to_string()
        };
        let h = "a".repeat(64);
        let both = serde_json::json!([{"name": "keyhaven.db", "size": 1, "sha256": h}, {"name": "master.key", "size": 32, "sha256": h}]);
        assert!(Manifest::parse(good(both).as_bytes()).is_ok());
        let missing = serde_json::json!([{"name": "keyhaven.db", "size": 1, "sha256": h}]);
        assert!(Manifest::parse(good(missing).as_bytes()).unwrap_err().to_string().contains("master.key is missing"));
        let evil = serde_json::json!([{"name": "../x", "size": 1, "sha256": h}]);
        assert!(Manifest::parse(good(evil).as_bytes()).unwrap_err().to_string().contains("not one keyhaven writes"));
        assert!(Manifest::parse(b"{}").is_err());
    }
}
