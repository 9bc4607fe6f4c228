//! Backup and restore while the daemon runs: `config.save` (a job that
//! writes an encrypted backup and leaves a single-use download behind) and
//! `config.upload` (stage an uploaded backup, then restart in place onto it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::format::{Manifest, Passphrase};
use super::BackupError;
use crate::error::{ServiceError, EBUSY, EINVAL};
use crate::service::jobs::JobHandle;
use crate::service::App;

/// Where prepared backup files wait for their download (in the data dir, root only).
pub const EXPORTS_DIR: &str = "exports";
/// How long a prepared download stays available.
pub const DOWNLOAD_TTL: Duration = Duration::from_secs(600);
/// The most an upload may carry.
pub const UPLOAD_MAX: u64 = 256 << 20;
/// How long an upload may send nothing before it is dropped (and the one
/// upload slot freed): 60 s. Tests shorten it with
/// `KEYHAVEN_TEST_UPLOAD_IDLE_MS`, read once, the first time it is needed.
pub fn upload_idle() -> Duration {
    static IDLE: OnceLock<Duration> = OnceLock::new();
    *IDLE.get_or_init(|| {
        std::env::var("KEYHAVEN_TEST_UPLOAD_IDLE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map_or(Duration::from_secs(60), Duration::from_millis)
    })
}
/// The path prefix of prepared downloads.
pub const DOWNLOAD_PREFIX: &str = "/_download/config/";

struct Prepared {
    path: PathBuf,
    filename: String,
    expires: Instant,
}

fn prepared() -> &'static Mutex<HashMap<String, Prepared>> {
    static P: OnceLock<Mutex<HashMap<String, Prepared>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Remove expired downloads, and files no entry knows (left by an earlier
/// process), except an upload being received.
fn sweep(dir: &Path) {
    let mut all = prepared().lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    all.retain(|_, p| {
        let keep = p.expires > now;
        if !keep {
            let _ = std::fs::remove_file(&p.path);
        }
        keep
    });
    let known: Vec<PathBuf> = all.values().map(|p| p.path.clone()).collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        // An upload being received is the upload handler's to remove.
        let receiving = e.file_name().to_str().is_some_and(|n| n.starts_with(".upload-"));
        if !receiving && !known.contains(&e.path()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn to_service(e: BackupError) -> ServiceError {
    match e {
        BackupError::Io { .. } | BackupError::Store(_) => ServiceError::internal("writing the backup", e),
        other => ServiceError::call(EINVAL, other.to_string()),
    }
}

/// The body of the `config.save` job: write the backup into `exports/` and
/// return its single-use download link (valid [`DOWNLOAD_TTL`], same
/// authentication as every download).
pub async fn save(app: Arc<App>, pass: Passphrase, job: JobHandle) -> Result<Value, ServiceError> {
    // On PostgreSQL the database is backed up with pg_dump: say so, write nothing.
    app.store.check_backup_supported().map_err(|e| to_service(BackupError::Store(e)))?;
    job.progress(10.0, "Writing an encrypted copy of the database and keys");
    let dir = app.config.data_dir.join(EXPORTS_DIR);
    let data_dir = app.config.data_dir.clone();
    let token = random_token();
    let path = dir.join(format!("{token}.age"));
    let (summary, size) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> Result<_, BackupError> {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| BackupError::io(&dir, e))?;
            sweep(&dir);
            let s = super::create::create_backup_file(&data_dir, &path, &pass)?;
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            Ok((s, size))
        }
    })
    .await
    .map_err(|e| ServiceError::internal("config.save", e))?
    .map_err(to_service)?;
    let host = rustix::system::uname().nodename().to_string_lossy().to_string();
    let filename = format!("keyhaven-{host}-{}.age", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    prepared()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(token.clone(), Prepared { path, filename: filename.clone(), expires: Instant::now() + DOWNLOAD_TTL });
    job.log(&format!(
        "backup of schema version {} with {} parts, {size} bytes",
        summary.schema_version,
        summary.parts.len()
    ));
    Ok(json!(format!("{DOWNLOAD_PREFIX}{token}")))
}

/// Take a prepared download (single use): its bytes and file name.
pub fn take_download(token: &str) -> Option<(Vec<u8>, String)> {
    let p = prepared().lock().unwrap_or_else(|p| p.into_inner()).remove(token)?;
    let bytes = std::fs::read(&p.path).ok();
    let _ = std::fs::remove_file(&p.path);
    if p.expires < Instant::now() {
        return None;
    }
    Some((bytes?, p.filename))
}

/// Whether a restore upload is being handled (one at a time).
static UPLOADING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Held while an upload is handled.
pub struct UploadSlot(());

impl UploadSlot {
    pub fn take() -> Result<UploadSlot, ServiceError> {
        if UPLOADING.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(ServiceError::call(EBUSY, "Another configuration upload is being restored; wait for it"));
        }
        Ok(UploadSlot(()))
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        UPLOADING.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The body of the `config.upload` job: verify and stage the uploaded file,
/// then restart in place onto it (shortly, so the reply goes out first).
pub async fn upload(app: Arc<App>, file: PathBuf, pass: Passphrase, job: JobHandle) -> Result<Value, ServiceError> {
    job.progress(10.0, "Decrypting and checking the backup");
    let data_dir = app.config.data_dir.clone();
    let staged = tokio::task::spawn_blocking(move || -> Result<Manifest, BackupError> {
        let f = std::fs::File::open(&file).map_err(|e| BackupError::io(&file, e))?;
        let out = super::restore::stage(&data_dir, std::io::BufReader::new(f), &pass);
        let _ = std::fs::remove_file(&file);
        Ok(out?.manifest)
    })
    .await
    .map_err(|e| ServiceError::internal("config.upload", e))?
    .map_err(|e| match e {
        BackupError::Io { .. } => ServiceError::internal("restoring the backup", e),
        other => ServiceError::call(EINVAL, other.to_string()),
    })?;
    job.progress(90.0, "Restarting onto the restored state");
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        super::restart::request();
    });
    Ok(json!({
        "restarting": true,
        "keyhaven_version": staged.keyhaven_version,
        "created": staged.created,
        "schema_version": staged.schema_version,
    }))
}
