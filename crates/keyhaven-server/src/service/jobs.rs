//! Long-running work (RSA-4096 keygen, pairing, service start) as TrueNAS-style
//! jobs with progress, listed by `core.get_jobs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use super::events::{Event, Events};
use super::metrics::Metrics;
use crate::error::ServiceError;

const KEEP_FINISHED: usize = 1000;

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
    pub fn new(events: Arc<Events>, metrics: Arc<Metrics>) -> Jobs {
        Jobs { next: AtomicI64::new(0), jobs: Mutex::new(BTreeMap::new()), events, metrics }
    }

    /// Published under the jobs lock, so subscribers see changes in order.
    fn publish(&self, msg: &'static str, j: &Job) {
        self.events.publish(Event { collection: "core.get_jobs", msg, id: Value::from(j.id), fields: to_value(j) });
    }

    /// Start `body` in the background and return the job id at once.
    pub fn spawn<F, Fut>(self: &Arc<Self>, method: &'static str, body: F) -> i64
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, ServiceError>> + Send + 'static,
    {
        self.spawn_with(method, Value::Array(vec![]), body)
    }

    /// [`Jobs::spawn`] with the call's arguments shown in the job entry.
    pub fn spawn_with<F, Fut>(self: &Arc<Self>, method: &'static str, arguments: Value, body: F) -> i64
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value, ServiceError>> + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
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
            let mut all = jobs.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(j) = all.get_mut(&id) {
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
            }
        });
        id
    }

    pub fn get(&self, id: i64) -> Option<JobEntry> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(JobEntry::from)
    }

    /// Every job kept, in id order (`core.get_jobs`).
    pub fn list(&self) -> Vec<JobEntry> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().map(JobEntry::from).collect()
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
    pub method: &'static str,
    pub arguments: Value,
    pub state: &'static str,
    pub progress: Progress,
    pub result: Value,
    pub error: Option<String>,
    /// Always null: tracebacks stay in the server log.
    pub exception: Option<String>,
    pub exc_info: Option<ExcInfo>,
    pub time_started: Date,
    pub time_finished: Option<Date>,
    pub abortable: bool,
    pub transient: bool,
    pub logs_excerpt: Option<String>,
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
            method: j.method,
            arguments: j.arguments.clone(),
            state: j.state,
            progress: Progress { percent: j.percent, description: j.description.clone(), extra: None },
            result: j.result.clone(),
            error: j.error.clone(),
            exception: None,
            exc_info: j.exc_info.clone(),
            time_started: Date::from_secs(j.started),
            time_finished: j.finished.map(Date::from_secs),
            abortable: false,
            transient: false,
            logs_excerpt: j.logs.clone(),
        }
    }
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
