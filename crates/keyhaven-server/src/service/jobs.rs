//! Long-running work (RSA-4096 keygen, pairing, service start) as TrueNAS-style
//! jobs with progress, listed by `core.get_jobs`.
//!
//! Each node keeps its own jobs in memory (live progress, logs). On
//! PostgreSQL the nodes also share a record of every job
//! ([`keyhaven_store::SharedJobs`]): ids come from the database, so they are
//! unique across the cluster, each job is recorded when it starts and when
//! it ends, and `core.get_jobs` on any node lists every node's jobs (another
//! node's as of its last start or end). On SQLite, one node, the memory is
//! all there is, as before.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use keyhaven_store::{JobRecord, Store};

use serde::Serialize;
use serde_json::Value;

use super::events::{Event, Events};
use super::metrics::Metrics;
use crate::error::{ServiceError, EFAULT};

const KEEP_FINISHED: usize = 1000;

/// Jobs whose result stays on their node: `config.save`'s is a single-use
/// download link (a secret, and only that node serves the file).
const NODE_PRIVATE_RESULTS: &[&str] = &["config.save"];

#[derive(Debug, Clone)]
struct Job {
    id: i64,
    /// Always a name from the code: it labels the job-duration metric.
    method: &'static str,
    arguments: Value,
    state: &'static str,
    percent: f64,
    description: String,
    result: Value,
    error: Option<String>,
    exc_info: Option<ExcInfo>,
    started: f64,
    finished: Option<f64>,
    /// The end of the job's log (TrueNAS's `logs_excerpt`), when it keeps one.
    logs: Option<String>,
}

/// The most of a job's log kept in memory (its end is what explains a failure).
const LOG_EXCERPT: usize = 64 * 1024;

pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub struct Jobs {
    next: AtomicI64,
    jobs: Mutex<BTreeMap<i64, Job>>,
    /// Every new job and change is published as a `core.get_jobs` event.
    events: Arc<Events>,
    /// Finished jobs' durations go there.
    metrics: Arc<Metrics>,
    /// On PostgreSQL its `jobs` table, shared by the nodes
    /// ([`Store::shared_jobs`]); on SQLite jobs stay in memory only.
    store: Arc<Store>,
    /// This node's id (set once membership starts), recorded with each job.
    node: OnceLock<String>,
}

/// Handed to a job's body to report progress.
#[derive(Clone)]
pub struct JobHandle {
    pub id: i64,
    jobs: Arc<Jobs>,
}

impl JobHandle {
    pub fn progress(&self, percent: f64, description: impl Into<String>) {
        let mut all = self.jobs.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = all.get_mut(&self.id) {
            j.percent = percent;
            j.description = description.into();
            self.jobs.publish("changed", j);
        }
    }

    /// Append a line to the job's log (the oldest part goes past [`LOG_EXCERPT`]).
    pub fn log(&self, line: &str) {
        let mut all = self.jobs.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = all.get_mut(&self.id) {
            let logs = j.logs.get_or_insert_with(String::new);
            logs.push_str(line);
            logs.push('\n');
            if logs.len() > LOG_EXCERPT {
                let mut cut = logs.len() - LOG_EXCERPT;
                while !logs.is_char_boundary(cut) {
                    cut += 1;
                }
                logs.drain(..cut);
            }
        }
    }

    /// The job's log so far.
    pub fn logs(&self) -> String {
        let all = self.jobs.jobs.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&self.id).and_then(|j| j.logs.clone()).unwrap_or_default()
    }
}

impl Jobs {
    pub fn new(events: Arc<Events>, metrics: Arc<Metrics>, store: Arc<Store>) -> Jobs {
        Jobs {
            next: AtomicI64::new(0),
            jobs: Mutex::new(BTreeMap::new()),
            events,
            metrics,
            store,
            node: OnceLock::new(),
        }
    }

    /// This node's id, recorded with the jobs it runs (set once, at start).
    pub fn set_node(&self, node_id: &str) {
        let _ = self.node.set(node_id.to_string());
    }

    fn node(&self) -> &str {
        self.node.get().map(String::as_str).unwrap_or("")
    }

    /// A new job id: from the database's sequence when the nodes share
    /// their jobs (unique across the cluster), else from this process.
    pub fn allocate(&self) -> Result<i64, ServiceError> {
        match self.store.shared_jobs() {
            Some(shared) => Ok(shared.next_id()?),
            None => Ok(self.next.fetch_add(1, Ordering::Relaxed) + 1),
        }
    }

    /// The record the nodes share of job `j`.
    fn record(&self, j: &Job) -> JobRecord {
        JobRecord {
            id: j.id,
            node: self.node().to_string(),
            method: j.method.to_string(),
            arguments: j.arguments.clone(),
            state: j.state.to_string(),
            percent: j.percent,
            description: j.description.clone(),
            result: if NODE_PRIVATE_RESULTS.contains(&j.method) { Value::Null } else { j.result.clone() },
            error: j.error.clone(),
            exc_info: j.exc_info.as_ref().and_then(|e| serde_json::to_value(e).ok()),
            started: j.started,
            finished: j.finished,
        }
    }

    /// At start (PostgreSQL): this node's jobs its previous process left
    /// RUNNING did not finish; record them FAILED.
    pub fn recover(&self) {
        let Some(shared) = self.store.shared_jobs() else { return };
        let msg = "keyhaven stopped during this job (it was killed or restarted), so the job did not finish";
        match shared.fail_interrupted(self.node(), msg, &interrupted(), now()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!("{n} job(s) were interrupted when keyhaven stopped; marked FAILED"),
            Err(e) => tracing::warn!("could not mark interrupted jobs: {e}"),
        }
    }

    /// The leader's sweep (PostgreSQL): jobs of nodes that are down are
    /// recorded FAILED. Blocking.
    pub fn fail_down_nodes(&self) {
        let Some(shared) = self.store.shared_jobs() else { return };
        let msg = "the node running this job stopped answering (no heartbeat), so the job did not finish";
        match shared.fail_down_nodes(msg, &interrupted(), now()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!("{n} job(s) of nodes that are down marked FAILED"),
            Err(e) => tracing::warn!("could not mark the jobs of nodes that are down: {e}"),
        }
    }

    /// Published under the jobs lock, so subscribers see changes in order.
    fn publish(&self, msg: &'static str, j: &Job) {
        self.events.publish(Event { collection: "core.get_jobs", msg, id: Value::from(j.id), fields: to_value(j) });
    }

    /// Start `body` in the background and return the job id at once.
    pub fn spawn<F, Fut>(self: &Arc<Self>, method: &'static str, body: F) -> Result<i64, ServiceError>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, ServiceError>> + Send + 'static,
    {
        self.spawn_with(method, Value::Array(vec![]), body)
    }

    /// [`Jobs::spawn`] with the call's arguments shown in the job entry
    /// (the code's own values, such as a task id; never a secret: on
    /// PostgreSQL they are stored).
    pub fn spawn_with<F, Fut>(
        self: &Arc<Self>,
        method: &'static str,
        arguments: Value,
        body: F,
    ) -> Result<i64, ServiceError>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, ServiceError>> + Send + 'static,
    {
        let id = self.allocate()?;
        self.spawn_as(id, method, arguments, body)
    }

    /// [`Jobs::spawn_with`] under an id from [`Jobs::allocate`] (for work
    /// that must name its job before it starts). On PostgreSQL the job is
    /// recorded before this returns, so every node lists it.
    pub fn spawn_as<F, Fut>(
        self: &Arc<Self>,
        id: i64,
        method: &'static str,
        arguments: Value,
        body: F,
    ) -> Result<i64, ServiceError>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, ServiceError>> + Send + 'static,
    {
        {
            let job = Job {
                id,
                method,
                arguments,
                state: "RUNNING",
                percent: 0.0,
                description: String::new(),
                result: Value::Null,
                error: None,
                exc_info: None,
                started: now(),
                finished: None,
                logs: None,
            };
            // Before the lock: other jobs report progress under it meanwhile.
            if let Some(shared) = self.store.shared_jobs() {
                shared.insert(&self.record(&job))?;
            }
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            self.publish("added", &job);
            jobs.insert(id, job);
            while jobs.len() > KEEP_FINISHED {
                let oldest_done = jobs.iter().find(|(_, j)| j.finished.is_some()).map(|(k, _)| *k);
                match oldest_done {
                    Some(k) => jobs.remove(&k),
                    None => break,
                };
            }
        }
        let handle = JobHandle { id, jobs: self.clone() };
        let jobs = self.clone();
        tokio::spawn(async move {
            let began = std::time::Instant::now();
            let out = body(handle).await;
            jobs.metrics.job_finished(method, out.is_ok(), began.elapsed());
            let ended = {
                let mut all = jobs.jobs.lock().unwrap_or_else(|p| p.into_inner());
                all.get_mut(&id).map(|j| {
                    j.finished = Some(now());
                    match out {
                        Ok(v) => {
                            j.state = "SUCCESS";
                            j.percent = 100.0;
                            j.result = v;
                        }
                        Err(e) => {
                            j.state = "FAILED";
                            j.exc_info = Some(ExcInfo {
                                kind: if matches!(e, ServiceError::Validation(_)) { "VALIDATION" } else { "CallError" },
                                errno: e.errno().code(),
                                errname: e.errno().name(),
                            });
                            j.error = Some(e.to_string());
                        }
                    }
                    jobs.publish("changed", j);
                    jobs.store.shared_jobs().is_some().then(|| jobs.record(j))
                })
            };
            if let Some(rec) = ended.flatten() {
                let store = jobs.store.clone();
                let recorded = tokio::task::spawn_blocking(move || store.shared_jobs().map(|s| s.finish(&rec))).await;
                if let Ok(Some(Err(e))) = recorded {
                    tracing::warn!(job = id, "could not record the end of the job: {e}");
                }
            }
        });
        Ok(id)
    }

    pub fn get(&self, id: i64) -> Option<JobEntry> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(JobEntry::from)
    }

    /// Every job kept, in id order (`core.get_jobs`): on PostgreSQL every
    /// node's (blocking: read from the database), this node's own as its
    /// memory has them (live progress, logs). Should the database not
    /// answer, this node's jobs alone (logged).
    pub fn list(&self) -> Vec<JobEntry> {
        let shared = self.store.shared_jobs();
        let node = shared.as_ref().map(|_| self.node().to_string());
        let mut all: BTreeMap<i64, JobEntry> = match shared.map(|s| s.list()) {
            None => BTreeMap::new(),
            Some(Ok(rows)) => rows.into_iter().map(|r| (r.id, JobEntry::from(r))).collect(),
            Some(Err(e)) => {
                tracing::warn!("core.get_jobs lists this node's jobs only: the cluster's cannot be read: {e}");
                BTreeMap::new()
            }
        };
        for j in self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let mut e = JobEntry::from(j);
            e.node = node.clone();
            all.insert(j.id, e);
        }
        all.into_values().collect()
    }

    /// Wait until a job has finished and return its entry.
    pub async fn wait(&self, id: i64) -> Option<JobEntry> {
        loop {
            let j = self.get(id)?;
            if j.state != "RUNNING" {
                return Some(j);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// A job as `core.get_jobs` lists it (TrueNAS's shape). `arguments` and
/// `result` are the call's own parameters and reply: free-form JSON.
#[derive(Serialize)]
pub struct JobEntry {
    pub id: i64,
    pub method: String,
    pub arguments: Value,
    pub state: String,
    pub progress: Progress,
    pub result: Value,
    pub error: Option<String>,
    /// Always null: tracebacks stay in the server log.
    pub exception: Option<String>,
    pub exc_info: Option<Value>,
    pub time_started: Date,
    pub time_finished: Option<Date>,
    pub abortable: bool,
    pub transient: bool,
    pub logs_excerpt: Option<String>,
    /// keyhaven extension, PostgreSQL only: the node that runs the job
    /// (absent on SQLite, whose one node runs them all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Serialize)]
pub struct Progress {
    pub percent: f64,
    pub description: String,
    /// Always null.
    pub extra: Option<String>,
}

/// What a failed job's error was (`exc_info`).
#[derive(Serialize, Clone, Debug)]
pub struct ExcInfo {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub errno: i32,
    pub errname: &'static str,
}

/// A point in time as TrueNAS's entries carry it: `{"$date": milliseconds}`.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Date {
    #[serde(rename = "$date")]
    pub ms: i64,
}

impl Date {
    /// From seconds since the epoch.
    pub fn from_secs(secs: f64) -> Date {
        Date { ms: (secs * 1000.0) as i64 }
    }
}

impl From<&Job> for JobEntry {
    fn from(j: &Job) -> JobEntry {
        JobEntry {
            id: j.id,
            method: j.method.to_string(),
            arguments: j.arguments.clone(),
            state: j.state.to_string(),
            progress: Progress { percent: j.percent, description: j.description.clone(), extra: None },
            result: j.result.clone(),
            error: j.error.clone(),
            exception: None,
            exc_info: j.exc_info.as_ref().and_then(|e| serde_json::to_value(e).ok()),
            time_started: Date::from_secs(j.started),
            time_finished: j.finished.map(Date::from_secs),
            abortable: false,
            transient: false,
            logs_excerpt: j.logs.clone(),
            node: None,
        }
    }
}

/// Another node's job (or this node's from before it restarted), as the
/// cluster recorded it: no log (that stays on its node; an rsync run's is
/// kept with its task, `rsynctask.last_log`).
impl From<JobRecord> for JobEntry {
    fn from(r: JobRecord) -> JobEntry {
        JobEntry {
            id: r.id,
            method: r.method,
            arguments: r.arguments,
            state: r.state,
            progress: Progress { percent: r.percent, description: r.description, extra: None },
            result: r.result,
            error: r.error,
            exception: None,
            exc_info: r.exc_info,
            time_started: Date::from_secs(r.started),
            time_finished: r.finished.map(Date::from_secs),
            abortable: false,
            transient: false,
            logs_excerpt: None,
            node: Some(r.node),
        }
    }
}

/// `exc_info` of a job that did not finish because its node stopped.
fn interrupted() -> Value {
    serde_json::json!({"type": "CallError", "errno": EFAULT.code(), "errname": EFAULT.name()})
}

/// The entry as an event's `fields`.
fn to_value(j: &Job) -> Value {
    serde_json::to_value(JobEntry::from(j)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed job's entry is TrueNAS's shape, field for field as the
    /// `json!`-built entry was (compared as values: the tests build with
    /// serde_json's `preserve_order`, which a dev-dependency turns on, so key order varies).
    #[test]
    fn job_entry_wire_form() {
        let j = Job {
            id: 7,
            method: "rsynctask.run",
            arguments: serde_json::json!([3]),
            state: "FAILED",
            percent: 50.0,
            description: "copying".into(),
            result: Value::Null,
            error: Some("[EFAULT] no route".into()),
            exc_info: Some(ExcInfo { kind: "CallError", errno: 14, errname: "EFAULT" }),
            started: 1.5,
            finished: Some(2.25),
            logs: None,
        };
        assert_eq!(
            to_value(&j),
            serde_json::from_str::<serde_json::Value>(r#"{"abortable":false,"arguments":[3],"error":"[EFAULT] no route","exc_info":{"errname":"EFAULT","errno":14,"type":"CallError"},"exception":null,"id":7,"logs_excerpt":null,"method":"rsynctask.run","progress":{"description":"copying","extra":null,"percent":50.0},"result":null,"state":"FAILED","time_finished":{"$date":2250},"time_started":{"$date":1500},"transient":false}"#).unwrap()
        );
    }
}
