//! The data dir lock: `keyhaven serve` holds an exclusive `flock` on
//! `<data-dir>/keyhaven.pid` (which holds its pid) for as long as it runs, so
//! offline commands (`restore`) can tell that it runs and refuse. The kernel
//! drops the lock when the process ends, however it ends.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{BackupError, Result};

pub const LOCK_FILE: &str = "keyhaven.pid";

/// Held while alive.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Take the lock, or say which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| BackupError::io(&path, e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(BackupError::Running(format!(
                    "keyhaven is running on {} (pid {}, holding {}); stop it first (systemctl stop keyhaven), then run this again",
                    data_dir.display(),
                    if pid.is_empty() { "unknown" } else { pid },
                    path.display()
                )));
            }
            Err(e) => return Err(BackupError::io(&path, e.into())),
        }
        file.set_len(0).map_err(|e| BackupError::io(&path, e))?;
        file.rewind().map_err(|e| BackupError::io(&path, e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| BackupError::io(&path, e))?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let e = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())) && e.contains("stop it first"), "{e}");
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
