//! Files sshd and the supervisor share: candidate configurations, the PID file and the log.

use super::*;

/// A private temp file in `dir` holding a candidate configuration; removed on
/// drop unless persisted.
pub(super) struct Candidate {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
}

pub(super) static CANDIDATE_SEQ: AtomicU64 = AtomicU64::new(0);

impl Candidate {
    pub(super) async fn write(dir: &Path, text: &str, sync: bool) -> Result<Candidate, SshdError> {
        let seq = CANDIDATE_SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = dir.join(format!(".sshd_config.candidate-{}-{seq}-{nanos:x}", std::process::id()));
        let candidate = Candidate { path: path.clone(), keep: false };
        let text = text.as_bytes().to_vec();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            f.write_all(&text)?;
            if sync {
                f.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| SshdError::io("writing the candidate configuration", io::Error::other(e)))?
        .map_err(|e| SshdError::io(format!("cannot write {}", candidate.path.display()), e))?;
        Ok(candidate)
    }

    /// Renames the candidate over `target` and fsyncs the directory.
    pub(super) async fn persist(mut self, target: &Path) -> Result<(), SshdError> {
        let from = self.path.clone();
        let to = target.to_path_buf();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            std::fs::rename(&from, &to)?;
            if let Some(dir) = to.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| SshdError::io("replacing the configuration", io::Error::other(e)))?
        .map_err(|e| SshdError::io(format!("cannot replace {}", target.display()), e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub(super) fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

pub(super) fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What sshd logged since `offset` (the last `LOG_EXCERPT_BYTES`), trimmed.
pub(super) fn read_log_since(path: &Path, offset: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else { return String::new() };
    let start = usize::try_from(offset).ok().filter(|&o| o <= bytes.len()).unwrap_or(0);
    let tail = &bytes[start..];
    let tail = &tail[tail.len().saturating_sub(LOG_EXCERPT_BYTES)..];
    String::from_utf8_lossy(tail).trim().to_string()
}

pub(super) fn log_hint(paths: &SshdPaths, log: &str) -> String {
    let mut s = String::new();
    if log.is_empty() {
        let _ = write!(s, "sshd logged nothing (see {})", paths.log_file().display());
    } else {
        let _ = write!(s, "sshd's log ({}) says: {log}", paths.log_file().display());
    }
    s
}
