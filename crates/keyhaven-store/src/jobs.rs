//! The cluster's job history (issue 14 §2). On PostgreSQL every node records
//! its jobs in the `jobs` table (migration 0004), so `core.get_jobs` on any
//! node lists every node's jobs, with ids drawn from one sequence and thus
//! unique across the cluster. On SQLite there is one node, which keeps its
//! jobs in memory as before: [`crate::Store::shared_jobs`] is `None` there.

use serde_json::Value;

use crate::error::Result;
use crate::pg::PgStore;

/// How many finished jobs the cluster keeps (the oldest go first); running
/// jobs are always kept.
pub const KEEP_FINISHED_JOBS: i64 = 1000;

/// A job as the cluster records it: at its start and at its end. Progress
/// between the two is the running node's own (in its memory).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: i64,
    /// The node that runs it (`node-id`).
    pub node: String,
    pub method: String,
    /// The job's arguments as the code gives them (never a secret).
    pub arguments: Value,
    /// `RUNNING`, `SUCCESS` or `FAILED`.
    pub state: String,
    pub percent: f64,
    pub description: String,
    pub result: Value,
    pub error: Option<String>,
    /// TrueNAS's `exc_info` of a failed job (`type`, `errno`, `errname`).
    pub exc_info: Option<Value>,
    pub started: f64,
    pub finished: Option<f64>,
}

/// The `jobs` table of a PostgreSQL store ([`crate::Store::shared_jobs`]).
pub struct SharedJobs<'a> {
    pub(crate) pg: &'a PgStore,
}

impl SharedJobs<'_> {
    /// A new job id, unique across the cluster (the table's sequence).
    pub fn next_id(&self) -> Result<i64> {
        self.pg.job_next_id()
    }

    /// Record a job as it starts (its id from [`SharedJobs::next_id`]).
    pub fn insert(&self, j: &JobRecord) -> Result<()> {
        self.pg.job_insert(j)
    }

    /// Record a job's end (state, progress, result or error, finish time);
    /// finished jobs past [`KEEP_FINISHED_JOBS`] are forgotten, oldest first.
    pub fn finish(&self, j: &JobRecord) -> Result<()> {
        self.pg.job_finish(j)
    }

    /// Every job kept, every node's, by id.
    pub fn list(&self) -> Result<Vec<JobRecord>> {
        self.pg.jobs_list()
    }

    /// At a node's start: its jobs left RUNNING by its previous process are
    /// FAILED with `error` and `exc_info`. Returns how many.
    pub fn fail_interrupted(&self, node: &str, error: &str, exc_info: &Value, finished: f64) -> Result<usize> {
        self.pg.jobs_fail_interrupted(node, error, exc_info, finished)
    }

    /// The leader's sweep: RUNNING jobs of nodes that are down (no heartbeat
    /// for [`crate::cluster::DOWN_AFTER_SECS`], or no row at all) are FAILED.
    pub fn fail_down_nodes(&self, error: &str, exc_info: &Value, finished: f64) -> Result<usize> {
        self.pg.jobs_fail_down_nodes(error, exc_info, finished)
    }
}
