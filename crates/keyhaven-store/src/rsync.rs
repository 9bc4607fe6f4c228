//! Rsync task rows and the last run of each task. Nothing here decides what
//! a valid task is; the service hands in checked data.

use rusqlite::{params, OptionalExtension, Row};
use serde_json::Value;

use crate::db::SqliteStore;
use crate::error::{Result, StoreError};

/// A task row. `data` holds the TrueNAS fields but `enabled` and `ssh_credentials`.
#[derive(Debug, Clone, PartialEq)]
pub struct RsyncTaskRecord {
    pub id: i64,
    pub data: Value,
    pub enabled: bool,
    pub ssh_credentials: Option<i64>,
}

/// The last run of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct RsyncRunRecord {
    pub task_id: i64,
    pub job_id: i64,
    /// `RUNNING`, `SUCCESS` or `FAILED`.
    pub state: String,
    pub started: f64,
    pub finished: Option<f64>,
    pub error: Option<String>,
    pub log: String,
}

fn task_row(r: &Row<'_>) -> rusqlite::Result<RsyncTaskRecord> {
    Ok(RsyncTaskRecord {
        id: r.get(0)?,
        data: crate::records::json_col(r, 1)?,
        enabled: r.get(2)?,
        ssh_credentials: r.get(3)?,
    })
}

fn run_row(r: &Row<'_>) -> rusqlite::Result<RsyncRunRecord> {
    Ok(RsyncRunRecord {
        task_id: r.get(0)?,
        job_id: r.get(1)?,
        state: r.get(2)?,
        started: r.get(3)?,
        finished: r.get(4)?,
        error: r.get(5)?,
        log: r.get(6)?,
    })
}

const RUN_COLS: &str = "task_id, job_id, state, started, finished, error, log";

impl SqliteStore {
    pub fn rsync_tasks(&self) -> Result<Vec<RsyncTaskRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT id, data, enabled, ssh_credentials FROM rsync_tasks ORDER BY id")?;
        let rows = st.query_map([], task_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn rsync_task(&self, id: i64) -> Result<Option<RsyncTaskRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT id, data, enabled, ssh_credentials FROM rsync_tasks WHERE id = ?1")?;
        Ok(st.query_row([id], task_row).optional()?)
    }

    pub fn rsync_task_insert(&self, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO rsync_tasks(data, enabled, ssh_credentials) VALUES(?1, ?2, ?3)",
            params![data.to_string(), enabled, ssh_credentials],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn rsync_task_update(&self, id: i64, data: &Value, enabled: bool, ssh_credentials: Option<i64>) -> Result<()> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE rsync_tasks SET data = ?1, enabled = ?2, ssh_credentials = ?3 WHERE id = ?4",
            params![data.to_string(), enabled, ssh_credentials, id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("rsync task {id}")));
        }
        Ok(())
    }

    /// Delete a task and its last run.
    pub fn rsync_task_delete(&self, id: i64) -> Result<()> {
        let conn = self.conn();
        if conn.execute("DELETE FROM rsync_tasks WHERE id = ?1", [id])? == 0 {
            return Err(StoreError::NotFound(format!("rsync task {id}")));
        }
        Ok(())
    }

    /// Delete keychain rows and, in the same transaction, disable the tasks
    /// that used any of them and clear their connection (TrueNAS's cascade).
    pub fn keychain_delete_unbinding_tasks(&self, ids: &[i64]) -> Result<Vec<i64>> {
        self.tx(|tx, _| {
            let mut unbound = Vec::new();
            for id in ids {
                let mut st = tx.prepare_cached("SELECT id FROM rsync_tasks WHERE ssh_credentials = ?1")?;
                let tasks = st.query_map([id], |r| r.get::<_, i64>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
                tx.execute(
                    "UPDATE rsync_tasks SET enabled = 0, ssh_credentials = NULL WHERE ssh_credentials = ?1",
                    [id],
                )?;
                unbound.extend(tasks);
            }
            for id in ids {
                tx.execute("DELETE FROM keychain WHERE id = ?1", [id])?;
            }
            Ok(unbound)
        })
    }

    /// Every task's last run, without its log (`log` is empty; see [`SqliteStore::rsync_run`]).
    pub fn rsync_runs(&self) -> Result<Vec<RsyncRunRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT task_id, job_id, state, started, finished, error, '' FROM rsync_runs ORDER BY task_id",
        )?;
        let rows = st.query_map([], run_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    pub fn rsync_run(&self, task_id: i64) -> Result<Option<RsyncRunRecord>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("SELECT {RUN_COLS} FROM rsync_runs WHERE task_id = ?1"))?;
        Ok(st.query_row([task_id], run_row).optional()?)
    }

    /// Record a task's run (replacing the one before); a successful one is
    /// also the task's last success.
    pub fn rsync_run_record(&self, r: &RsyncRunRecord) -> Result<()> {
        self.tx(|tx, _| {
            tx.execute(
                &format!("INSERT OR REPLACE INTO rsync_runs({RUN_COLS}) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                params![r.task_id, r.job_id, r.state, r.started, r.finished, r.error, r.log],
            )?;
            if let (true, Some(at)) = (r.state == "SUCCESS", r.finished) {
                tx.execute(
                    "INSERT OR REPLACE INTO rsync_last_success(task_id, at) VALUES(?1, ?2)",
                    params![r.task_id, at],
                )?;
            }
            Ok(())
        })
    }

    /// Every task's id with the time (Unix seconds) its last successful run
    /// ended, `None` for a task that never succeeded; by task id.
    pub fn rsync_last_successes(&self) -> Result<Vec<(i64, Option<f64>)>> {
        let mut rows = {
            let conn = self.conn();
            // No ORDER BY: without it SQLite reads task ids from a covering
            // index instead of every task's row (a /metrics scrape with
            // 10,000 tasks); sorting them here costs less.
            let mut st = conn.prepare_cached(
                "SELECT t.id, s.at FROM rsync_tasks t LEFT JOIN rsync_last_success s ON s.task_id = t.id",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        rows.sort_unstable_by_key(|r: &(i64, Option<f64>)| r.0);
        Ok(rows)
    }

    /// Start a run of `task_id` (RUNNING, job `job_id`). One node: the
    /// server's own map of running tasks decides, so the row is always taken
    /// (`None`); `node` matters on PostgreSQL only ([`crate::PgStore::rsync_run_claim`]).
    pub fn rsync_run_claim(&self, task_id: i64, job_id: i64, started: f64, _node: &str) -> Result<Option<i64>> {
        let conn = self.conn();
        conn.execute(
            &format!("INSERT OR REPLACE INTO rsync_runs({RUN_COLS}) VALUES(?1, ?2, 'RUNNING', ?3, NULL, NULL, '')"),
            params![task_id, job_id, started],
        )?;
        Ok(None)
    }

    /// Record the end of run `r.job_id` while the task's row is still that
    /// run (not when the task was deleted meanwhile); a successful one is
    /// also the task's last success. `true` when recorded.
    pub fn rsync_run_finish(&self, r: &RsyncRunRecord) -> Result<bool> {
        self.tx(|tx, _| {
            let n = tx.execute(
                "UPDATE rsync_runs SET state = ?3, finished = ?4, error = ?5, log = ?6 WHERE task_id = ?1 AND job_id = ?2",
                params![r.task_id, r.job_id, r.state, r.finished, r.error, r.log],
            )?;
            if n == 0 {
                return Ok(false);
            }
            if let (true, Some(at)) = (r.state == "SUCCESS", r.finished) {
                tx.execute(
                    "INSERT OR REPLACE INTO rsync_last_success(task_id, at) VALUES(?1, ?2)",
                    params![r.task_id, at],
                )?;
            }
            Ok(true)
        })
    }

    /// Runs left RUNNING by a daemon that stopped: mark them FAILED with
    /// `error`. One node: every RUNNING run is its own (`node` is for PostgreSQL).
    /// Returns how many there were.
    pub fn rsync_runs_fail_interrupted(&self, _node: &str, error: &str, finished: f64) -> Result<usize> {
        let conn = self.conn();
        Ok(conn.execute(
            "UPDATE rsync_runs SET state = 'FAILED', error = ?1, finished = ?2 WHERE state = 'RUNNING'",
            params![error, finished],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_runs_and_the_cascade() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = SqliteStore::open(dir.path()).unwrap();
        let conn_id = store.keychain_insert("c", "SSH_CREDENTIALS", &serde_json::json!({}), None).unwrap();
        let t = store.rsync_task_insert(&serde_json::json!({"path": "/x"}), true, Some(conn_id)).unwrap();
        let other = store.rsync_task_insert(&serde_json::json!({"path": "/y"}), true, None).unwrap();
        store
            .rsync_run_record(&RsyncRunRecord {
                task_id: t,
                job_id: 7,
                state: "RUNNING".into(),
                started: 1.0,
                finished: None,
                error: None,
                log: String::new(),
            })
            .unwrap();
        assert_eq!(store.rsync_runs_fail_interrupted("n1", "stopped", 2.0).unwrap(), 1);
        assert_eq!(store.rsync_run(t).unwrap().unwrap().state, "FAILED");
        assert_eq!(store.rsync_last_successes().unwrap(), vec![(t, None), (other, None)]);
        let run = |state: &str, finished: f64| RsyncRunRecord {
            task_id: t,
            job_id: 8,
            state: state.into(),
            started: 3.0,
            finished: Some(finished),
            error: None,
            log: String::new(),
        };
        store.rsync_run_record(&run("SUCCESS", 4.0)).unwrap();
        // A later failure replaces the last run but not the last success.
        store.rsync_run_record(&run("FAILED", 5.0)).unwrap();
        assert_eq!(store.rsync_run(t).unwrap().unwrap().state, "FAILED");
        assert_eq!(store.rsync_last_successes().unwrap(), vec![(t, Some(4.0)), (other, None)]);

        assert_eq!(store.keychain_delete_unbinding_tasks(&[conn_id]).unwrap(), vec![t]);
        let r = store.rsync_task(t).unwrap().unwrap();
        assert!(!r.enabled);
        assert_eq!(r.ssh_credentials, None);
        assert!(store.rsync_task(other).unwrap().unwrap().enabled);
        assert!(store.keychain_get(conn_id).unwrap().is_none());

        store.rsync_task_delete(t).unwrap();
        assert!(store.rsync_run(t).unwrap().is_none(), "the run goes with its task");
        assert_eq!(store.rsync_last_successes().unwrap(), vec![(other, None)], "so does its last success");
        assert!(matches!(store.rsync_task_delete(t), Err(StoreError::NotFound(_))));
    }
}
