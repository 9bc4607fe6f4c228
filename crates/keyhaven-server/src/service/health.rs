//! Health: whether the database, the sshd supervisor and the data dir's
//! disk are fine, for `GET /healthz`. Answers name only the check that
//! failed, never why (no paths, versions or errors: the endpoint needs no
//! login); the reason goes to the log.
//!
//! What each check means:
//! * `database`: a connection of its own opens the database read-write and
//!   takes its write lock within [`DB_WAIT`] (a file that is gone or
//!   unwritable, or a lock another process holds, fail it).
//! * `sshd`: sshd should run (it was started, or a start was asked for) but
//!   has not been running for more than [`SSHD_GRACE`]: it died and the
//!   supervisor's restarts (backoff 0.2 s … 10 s) have not brought it back,
//!   or the start failed. A stopped SSH service is not a failure.
//! * `disk`: the data dir's file system has less than
//!   `health.disk_min_free_mib` MiB available, or no free inodes.
//!
//! Results are reused for [`CACHE_FOR`]: a flood of requests costs one check
//! a second, and concurrent requests wait for the same check.

use std::time::{Duration, Instant};

use super::App;

/// How long sshd may be down before health says so (longer than a restart takes).
pub const SSHD_GRACE: Duration = Duration::from_secs(10);
/// How long the database check waits for the write lock.
pub const DB_WAIT: Duration = Duration::from_secs(2);
/// How long one result is served.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// The names of the checks, in the order they are reported.
pub const CHECKS: [&str; 3] = ["database", "sshd", "disk"];

/// The last result, shared by concurrent requests.
#[derive(Default)]
pub struct HealthCache {
    last: tokio::sync::Mutex<Option<(Instant, Vec<&'static str>)>>,
}

/// Monitoring (`GET /healthz` here, `GET /metrics` in `metrics.rs`): reads
/// the other areas' state, owns only the health cache.
pub struct Monitoring<'a> {
    pub(super) app: &'a App,
}

impl<'a> Monitoring<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Monitoring { app }
    }

    /// The checks that fail now (empty: healthy).
    pub async fn health_failures(&self) -> Vec<&'static str> {
        let mut last = self.app.health_area.last.lock().await;
        if let Some((at, failed)) = last.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return failed.clone();
            }
        }
        let mut failed = Vec::new();
        if let Err(why) = self.database_ok().await {
            tracing::warn!("health: the database check failed: {why}");
            failed.push(CHECKS[0]);
        }
        if let Some(down) = self.app.sshd().supervisor().down_for().filter(|d| *d > SSHD_GRACE) {
            tracing::warn!(
                "health: sshd should be running but has been down for {} s: {}",
                down.as_secs(),
                self.app.sshd().supervisor().last_error().unwrap_or_default()
            );
            failed.push(CHECKS[1]);
        }
        if let Err(why) = disk_ok(&self.app.config.data_dir, self.app.live_config().disk_min_free_mib) {
            tracing::warn!("health: the disk check failed: {why}");
            failed.push(CHECKS[2]);
        }
        *last = Some((Instant::now(), failed.clone()));
        failed
    }

    async fn database_ok(&self) -> Result<(), HealthError> {
        if self.app.config.database.is_postgres() {
            // PostgreSQL: a query on the store's own pool, bounded by DB_WAIT
            // inside the store. It waits on a channel, so keep it off this
            // worker's other tasks where the runtime allows.
            let dir = self.app.config.data_dir.clone();
            let check = || self.app.store.health_check(&dir, DB_WAIT);
            let multi = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            return Ok(if multi { tokio::task::block_in_place(check) } else { check() }?);
        }
        let dir = self.app.config.data_dir.clone();
        let check = tokio::task::spawn_blocking(move || keyhaven_store::Store::health_check_at(&dir, DB_WAIT));
        // The blocking check gives up after DB_WAIT; this bound is for a
        // blocking pool so busy that the check never starts.
        match tokio::time::timeout(DB_WAIT * 2, check).await {
            Ok(Ok(r)) => Ok(r?),
            Ok(Err(e)) => Err(HealthError::Task(e)),
            Err(_) => Err(HealthError::TimedOut),
        }
    }
}

/// Why a health check failed (logged; `/healthz` names only the check).
#[derive(Debug, thiserror::Error)]
enum HealthError {
    #[error(transparent)]
    Database(#[from] keyhaven_store::StoreError),
    #[error("the check's task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("the check did not finish in time")]
    TimedOut,
    #[error("statvfs: {0}")]
    Statvfs(rustix::io::Errno),
    #[error("{available_mib} MiB available, below health.disk_min_free_mib = {min_free_mib}")]
    LowSpace { available_mib: u64, min_free_mib: u64 },
    #[error("no free inodes")]
    NoInodes,
}

/// Whether the file system holding `dir` has `min_free_mib` MiB available
/// and free inodes.
fn disk_ok(dir: &std::path::Path, min_free_mib: u64) -> Result<(), HealthError> {
    let st = rustix::fs::statvfs(dir).map_err(HealthError::Statvfs)?;
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    if available < min_free_mib.saturating_mul(1 << 20) {
        return Err(HealthError::LowSpace { available_mib: available >> 20, min_free_mib });
    }
    // Some file systems (btrfs) report no inode counts at all.
    if st.f_files > 0 && st.f_favail == 0 {
        return Err(HealthError::NoInodes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_threshold() {
        let dir = tempfile::tempdir().unwrap();
        assert!(disk_ok(dir.path(), 0).is_ok());
        // More than any file system here has.
        let e = disk_ok(dir.path(), 1 << 40).unwrap_err();
        assert!(matches!(e, HealthError::LowSpace { min_free_mib: 1_099_511_627_776, .. }), "{e}");
        assert!(e.to_string().contains("health.disk_min_free_mib"), "{e}");
        assert!(disk_ok(&dir.path().join("missing"), 0).is_err());
    }
}
