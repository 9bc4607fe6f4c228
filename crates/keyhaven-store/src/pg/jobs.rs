//! The cluster's job history and the node-owned rsync runs on PostgreSQL
//! (migration 0004): every node's jobs in one table with ids from its
//! sequence, interrupted work failed by the node itself at start or by the
//! leader once its node is down, and one run of a task at a time across the
//! cluster (a conditional upsert of the task's run row).

use serde_json::Value;
use tokio_postgres::Row;

use super::cluster::DB_NOW;
use super::records::{col, json, next_id, record_last_success};
use super::PgStore;
use crate::cluster::DOWN_AFTER_SECS;
use crate::error::{Result, StoreError};
use crate::jobs::{JobRecord, KEEP_FINISHED_JOBS};
use crate::rsync::RsyncRunRecord;

const JOB_COLS: &str =
    "id, node, method, arguments, state, percent, description, result, error, exc_info, started, finished";

fn opt_json(r: &Row, i: usize) -> Result<Option<Value>> {
    let s: Option<String> = col(r, i)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("column {i} is not JSON: {e}"))))
        .transpose()
}

fn job_row(r: &Row) -> Result<JobRecord> {
    Ok(JobRecord {
        id: col(r, 0)?,
        node: col(r, 1)?,
        method: col(r, 2)?,
        arguments: json(r, 3)?,
        state: col(r, 4)?,
        percent: col(r, 5)?,
        description: col(r, 6)?,
        result: opt_json(r, 7)?.unwrap_or(Value::Null),
        error: col(r, 8)?,
        exc_info: opt_json(r, 9)?,
        started: col(r, 10)?,
        finished: col(r, 11)?,
    })
}

/// The nodes whose heartbeat is fresh (by the database's clock).
fn up_nodes() -> String {
    format!("SELECT node_id FROM cluster_nodes WHERE heartbeat_at >= {DB_NOW} - {DOWN_AFTER_SECS}::float8")
}

impl PgStore {
    pub(crate) fn job_next_id(&self) -> Result<i64> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            next_id(&pg, &c, "jobs").await
        })
    }

    pub(crate) fn job_insert(&self, j: &JobRecord) -> Result<()> {
        let j = j.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let result = (!j.result.is_null()).then(|| j.result.to_string());
            c.execute(
                &format!("INSERT INTO jobs({JOB_COLS}) VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
                &[
                    &j.id,
                    &j.node,
                    &j.method,
                    &j.arguments.to_string(),
                    &j.state,
                    &j.percent,
                    &j.description,
                    &result,
                    &j.error,
                    &j.exc_info.as_ref().map(|v| v.to_string()),
                    &j.started,
                    &j.finished,
                ],
            )
            .await
            .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    pub(crate) fn job_finish(&self, j: &JobRecord) -> Result<()> {
        let j = j.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let result = (!j.result.is_null()).then(|| j.result.to_string());
            c.execute(
                "UPDATE jobs SET state = $2, percent = $3, description = $4, result = $5, error = $6,
                     exc_info = $7, finished = $8 WHERE id = $1",
                &[
                    &j.id,
                    &j.state,
                    &j.percent,
                    &j.description,
                    &result,
                    &j.error,
                    &j.exc_info.as_ref().map(|v| v.to_string()),
                    &j.finished,
                ],
            )
            .await
            .map_err(|e| pg.err(e))?;
            c.execute(
                "DELETE FROM jobs WHERE finished IS NOT NULL AND id <= (SELECT id FROM jobs
                     WHERE finished IS NOT NULL ORDER BY id DESC OFFSET $1 LIMIT 1)",
                &[&KEEP_FINISHED_JOBS],
            )
            .await
            .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    pub(crate) fn jobs_list(&self) -> Result<Vec<JobRecord>> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows =
                c.query(&format!("SELECT {JOB_COLS} FROM jobs ORDER BY id"), &[]).await.map_err(|e| pg.err(e))?;
            rows.iter().map(job_row).collect()
        })
    }

    pub(crate) fn jobs_fail_interrupted(
        &self,
        node: &str,
        error: &str,
        exc_info: &Value,
        finished: f64,
    ) -> Result<usize> {
        let (node, error, exc_info) = (node.to_string(), error.to_string(), exc_info.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    "UPDATE jobs SET state = 'FAILED', error = $2, exc_info = $3, finished = $4
                     WHERE state = 'RUNNING' AND node = $1",
                    &[&node, &error, &exc_info, &finished],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n as usize)
        })
    }

    pub(crate) fn jobs_fail_down_nodes(&self, error: &str, exc_info: &Value, finished: f64) -> Result<usize> {
        let (error, exc_info) = (error.to_string(), exc_info.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    &format!(
                        "UPDATE jobs SET state = 'FAILED', error = $1, exc_info = $2, finished = $3
                         WHERE state = 'RUNNING' AND node NOT IN ({})",
                        up_nodes()
                    ),
                    &[&error, &exc_info, &finished],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n as usize)
        })
    }

    /// Start a run of `task_id` on `node`: one conditional upsert, so of two
    /// nodes starting the task at once exactly one gets the row. `None`: this
    /// node runs it; `Some(job)`: another node's run (job `job`) is RUNNING.
    /// A RUNNING row of `node` itself is taken over: the caller checked its
    /// own runs in memory first, so such a row is a leftover.
    pub fn rsync_run_claim(&self, task_id: i64, job_id: i64, started: f64, node: &str) -> Result<Option<i64>> {
        let node = node.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let won = c
                .query_opt(
                    "INSERT INTO rsync_runs(task_id, job_id, state, started, finished, error, log, node)
                     VALUES($1, $2, 'RUNNING', $3, NULL, NULL, '', $4)
                     ON CONFLICT(task_id) DO UPDATE SET job_id = excluded.job_id, state = 'RUNNING',
                         started = excluded.started, finished = NULL, error = NULL, log = '', node = excluded.node
                     WHERE rsync_runs.state <> 'RUNNING' OR rsync_runs.node = excluded.node
                     RETURNING task_id",
                    &[&task_id, &job_id, &started, &node],
                )
                .await
                .map_err(|e| pg.err(e))?;
            if won.is_some() {
                return Ok(None);
            }
            // Only for the message: the statement above decided.
            let row = c
                .query_opt("SELECT job_id FROM rsync_runs WHERE task_id = $1", &[&task_id])
                .await
                .map_err(|e| pg.err(e))?;
            Ok(Some(match row {
                Some(r) => col(&r, 0)?,
                None => 0,
            }))
        })
    }

    /// Record the end of run `r.job_id` while the task's row is still that
    /// run (not when the leader failed it and another run took the row, nor
    /// when the task was deleted); a successful one is also the task's last
    /// success. `true` when recorded.
    pub fn rsync_run_finish(&self, r: &RsyncRunRecord) -> Result<bool> {
        let r = r.clone();
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            let n = tx
                .execute(
                    "UPDATE rsync_runs SET state = $3, finished = $4, error = $5, log = $6
                     WHERE task_id = $1 AND job_id = $2",
                    &[&r.task_id, &r.job_id, &r.state, &r.finished, &r.error, &r.log],
                )
                .await
                .map_err(|e| pg.err(e))?;
            if n == 0 {
                return Ok(false);
            }
            record_last_success(&pg, &tx, &r).await?;
            tx.commit().await.map_err(|e| pg.err(e))?;
            Ok(true)
        })
    }

    /// At a node's start: runs it left RUNNING (and runs recorded without a
    /// node, from before migration 0004) are FAILED with `error`.
    pub fn rsync_runs_fail_interrupted(&self, node: &str, error: &str, finished: f64) -> Result<usize> {
        let (node, error) = (node.to_string(), error.to_string());
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    "UPDATE rsync_runs SET state = 'FAILED', error = $2, finished = $3
                     WHERE state = 'RUNNING' AND (node = $1 OR node IS NULL)",
                    &[&node, &error, &finished],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n as usize)
        })
    }

    /// The leader's sweep: RUNNING runs of nodes that are down are FAILED.
    pub fn rsync_runs_fail_down_nodes(&self, error: &str, finished: f64) -> Result<usize> {
        let error = error.to_string();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let n = c
                .execute(
                    &format!(
                        "UPDATE rsync_runs SET state = 'FAILED', error = $1, finished = $2
                         WHERE state = 'RUNNING' AND node IS NOT NULL AND node NOT IN ({})",
                        up_nodes()
                    ),
                    &[&error, &finished],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n as usize)
        })
    }
}
