//! Rsync tasks (TrueNAS `rsynctask.*`): the backups the credentials exist
//! for. This area owns a task's validation, its entry, its runs (a job per
//! run, one at a time per task, the key served by a one-run agent, the host
//! key pinned from the connection) and the in-process scheduler.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keyhaven_core::net::Port;
use keyhaven_core::rsync::{self as rules, Flags, Schedule};
use keyhaven_core::ValidationErrors;
use keyhaven_store::{RsyncRunRecord, RsyncTaskRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::jobs::{Date, JobHandle};
use super::keychain::KeychainEntry;
use super::session::Role;
use super::App;
use crate::error::{ServiceError, EBUSY, EINVAL, ENOENT};

/// Where rsync is (Debian's `rsync` package).
pub const RSYNC: &str = "/usr/bin/rsync";
/// Where ssh is (Debian's `openssh-client`).
pub const SSH: &str = "/usr/bin/ssh";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Mode {
    #[default]
    MODULE,
    SSH,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Direction {
    #[default]
    PUSH,
    PULL,
}

/// TrueNAS's cron schedule, with its defaults (hourly, on the hour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleInput {
    #[serde(default = "d_minute")]
    pub minute: String,
    #[serde(default = "d_star")]
    pub hour: String,
    #[serde(default = "d_star")]
    pub dom: String,
    #[serde(default = "d_star")]
    pub month: String,
    #[serde(default = "d_star")]
    pub dow: String,
}

impl Default for ScheduleInput {
    fn default() -> Self {
        ScheduleInput { minute: d_minute(), hour: d_star(), dom: d_star(), month: d_star(), dow: d_star() }
    }
}

impl ScheduleInput {
    fn parse(&self) -> Result<Schedule, (&'static str, rules::ScheduleError)> {
        Schedule::parse(&self.minute, &self.hour, &self.dom, &self.month, &self.dow)
    }
}

fn d_minute() -> String {
    "00".into()
}
fn d_star() -> String {
    "*".into()
}
fn d_true() -> bool {
    true
}

/// A task as `rsynctask.create` takes it (TrueNAS's fields and defaults).
/// `update` overlays its fields on the stored task and decodes the same shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsyncTaskInput {
    pub path: String,
    pub user: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub remotehost: Option<String>,
    #[serde(default)]
    pub remoteport: Option<i64>,
    #[serde(default)]
    pub remotemodule: Option<String>,
    /// Shown in entries as the connection's whole entry (see [`RsyncTaskEntry`]).
    #[serde(default, skip_serializing)]
    pub ssh_credentials: Option<i64>,
    #[serde(default)]
    pub remotepath: String,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub desc: String,
    #[serde(default)]
    pub schedule: ScheduleInput,
    #[serde(default = "d_true")]
    pub recursive: bool,
    #[serde(default = "d_true")]
    pub times: bool,
    #[serde(default = "d_true")]
    pub compress: bool,
    #[serde(default)]
    pub archive: bool,
    #[serde(default)]
    pub delete: bool,
    #[serde(default)]
    pub quiet: bool,
    #[serde(default)]
    pub preserveperm: bool,
    #[serde(default)]
    pub preserveattr: bool,
    #[serde(default = "d_true")]
    pub delayupdates: bool,
    #[serde(default)]
    pub extra: Vec<String>,
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Write-only: check the remote path over SSH on save.
    #[serde(default = "d_true", skip_serializing)]
    pub validate_rpath: bool,
    /// Write-only. keyhaven never trusts a scanned key unseen: with a
    /// connection the key is pinned already; without one this is refused.
    #[serde(default, skip_serializing)]
    pub ssh_keyscan: bool,
}

impl RsyncTaskInput {
    fn flags(&self) -> Flags {
        Flags {
            recursive: self.recursive,
            times: self.times,
            compress: self.compress,
            archive: self.archive,
            delete: self.delete,
            quiet: self.quiet,
            preserveperm: self.preserveperm,
            preserveattr: self.preserveattr,
            delayupdates: self.delayupdates,
        }
    }

    /// The stored document: every field but the columns (`enabled`,
    /// `ssh_credentials`) and the write-only ones.
    fn data(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.remove("enabled");
        }
        v
    }

    fn from_record(r: &RsyncTaskRecord) -> Result<RsyncTaskInput, ServiceError> {
        let mut t = RsyncTaskInput::deserialize(&r.data)
            .map_err(|e| ServiceError::internal(&format!("reading rsync task {}", r.id), e))?;
        t.enabled = r.enabled;
        t.ssh_credentials = r.ssh_credentials;
        Ok(t)
    }
}

/// The last run of a task, as its entry's read-only `job` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LastRun {
    pub id: i64,
    pub state: String,
    pub time_started: Date,
    pub time_finished: Option<Date>,
    pub error: Option<String>,
}

impl From<&RsyncRunRecord> for LastRun {
    fn from(r: &RsyncRunRecord) -> Self {
        LastRun {
            id: r.job_id,
            state: r.state.clone(),
            time_started: Date::from_secs(r.started),
            time_finished: r.finished.map(Date::from_secs),
            error: r.error.clone(),
        }
    }
}

/// A task as `rsynctask.query` returns it.
#[derive(Serialize)]
pub struct RsyncTaskEntry {
    pub id: i64,
    #[serde(flatten)]
    pub task: RsyncTaskInput,
    /// The connection's keychain entry (TrueNAS returns the entry, not the id).
    pub ssh_credentials: Option<KeychainEntry>,
    pub locked: bool,
    pub job: Option<LastRun>,
    pub dataset: Option<String>,
    pub relative_path: Option<String>,
}

/// Enabled tasks' schedules, by task id.
type Schedules = Arc<Vec<(i64, Schedule)>>;

/// What a run over a connection pinned: to explain a host-key failure.
struct Pinned {
    connection: i64,
    keys: Vec<(String, String)>,
    timeout: Duration,
    host: String,
    port: u16,
}

/// In-memory state of the area: runs going on and the schedules of enabled tasks.
#[derive(Default)]
pub struct RsyncState {
    /// Task id → (job id, process id once started).
    running: Mutex<HashMap<i64, (i64, u32)>>,
    schedules: RwLock<Option<Schedules>>,
    /// Serialises check-then-write of tasks with keychain cascades.
    writes: tokio::sync::Mutex<()>,
}

/// Why a run was started (shown in its log).
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    Manual,
    Schedule,
}

fn not_found(id: i64) -> ServiceError {
    ServiceError::call(ENOENT, format!("rsync task {id} does not exist"))
}

/// The rsync area (`rsynctask.*`): tasks, their runs as jobs and the
/// scheduler. Borrows the [`App`]; a run or the scheduler outlives the call,
/// so they take the `App` as an `Arc` from [`App::shared`].
pub struct Rsync<'a> {
    app: &'a App,
}

impl<'a> Rsync<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Rsync { app }
    }
    /// Every task as a caller of `role` sees it (connection attributes are redacted for read-only callers).
    pub fn entries(&self, role: Role) -> Result<Vec<RsyncTaskEntry>, ServiceError> {
        let runs: HashMap<i64, RsyncRunRecord> =
            self.app.store.rsync_runs()?.into_iter().map(|r| (r.task_id, r)).collect();
        let mut out = Vec::new();
        for r in self.app.store.rsync_tasks()? {
            out.push(self.entry(&r, runs.get(&r.id), role)?);
        }
        Ok(out)
    }

    fn entry(
        &self,
        r: &RsyncTaskRecord,
        run: Option<&RsyncRunRecord>,
        role: Role,
    ) -> Result<RsyncTaskEntry, ServiceError> {
        let task = RsyncTaskInput::from_record(r)?;
        let conn = r.ssh_credentials.and_then(|c| self.app.keychain().get_as(c, role).ok());
        Ok(RsyncTaskEntry {
            id: r.id,
            task,
            ssh_credentials: conn,
            locked: false,
            job: run.map(LastRun::from),
            dataset: None,
            relative_path: None,
        })
    }

    /// `rsynctask.query`.
    pub fn query(&self, role: Role, filters: Option<&Value>, options: Option<&Value>) -> Result<Value, ServiceError> {
        // The query engine filters the wire form: each entry is encoded once, here.
        let rows = self
            .entries(role)?
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ServiceError::internal("encoding rsync tasks", e))?;
        super::run_query(&rows, filters, options)
    }

    /// One task's entry.
    pub fn get(&self, id: i64, role: Role) -> Result<RsyncTaskEntry, ServiceError> {
        let r = self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        let run = self.app.store.rsync_run(id)?;
        self.entry(&r, run.as_ref(), role)
    }

    /// The output of the task's last run (empty before its first run).
    pub fn last_log(&self, id: i64) -> Result<String, ServiceError> {
        self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        Ok(self.app.store.rsync_run(id)?.map(|r| r.log).unwrap_or_default())
    }

    /// `rsynctask.create`: field errors are relative (the caller prefixes its schema).
    pub async fn create(&self, input: RsyncTaskInput) -> Result<RsyncTaskEntry, ServiceError> {
        let _w = self.app.rsync_area.writes.lock().await;
        self.validate(&input).await?;
        let id = self.app.store.rsync_task_insert(&input.data(), input.enabled, input.ssh_credentials)?;
        self.schedules_changed();
        self.get(id, Role::FullAdmin)
    }

    /// The stored task with `changes` (an object of task fields) laid over
    /// it: what `rsynctask.update` decodes into an [`RsyncTaskInput`].
    pub fn merge(&self, id: i64, changes: serde_json::Map<String, Value>) -> Result<Value, ServiceError> {
        let r = self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        let current = RsyncTaskInput::from_record(&r)?;
        let mut merged = serde_json::to_value(&current).map_err(|e| ServiceError::internal("rsync task", e))?;
        merged["ssh_credentials"] = Value::from(current.ssh_credentials);
        for (k, v) in changes {
            match (merged.get_mut(&k), v) {
                (Some(Value::Object(old)), Value::Object(new)) if k == "schedule" => old.extend(new),
                (_, v) => {
                    merged[k.as_str()] = v;
                }
            }
        }
        Ok(merged)
    }

    /// `rsynctask.update` with the merged task (see [`Rsync::merge`]).
    pub async fn update(&self, id: i64, input: RsyncTaskInput) -> Result<RsyncTaskEntry, ServiceError> {
        let _w = self.app.rsync_area.writes.lock().await;
        self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        self.validate(&input).await?;
        self.app.store.rsync_task_update(id, &input.data(), input.enabled, input.ssh_credentials)?;
        self.schedules_changed();
        self.get(id, Role::FullAdmin)
    }

    /// `rsynctask.delete`. A run going on is stopped first.
    pub async fn delete(&self, id: i64) -> Result<(), ServiceError> {
        let _w = self.app.rsync_area.writes.lock().await;
        self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        if let Some((_, pid)) = self.app.rsync_area.running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            keyhaven_ssh::rsync::kill(*pid);
        }
        self.app.store.rsync_task_delete(id)?;
        self.schedules_changed();
        Ok(())
    }

    /// Tasks that use a connection (for `keychaincredential.used_by`).
    pub fn tasks_using(&self, connection: i64) -> Result<Vec<(i64, String)>, ServiceError> {
        Ok(self
            .app
            .store
            .rsync_tasks()?
            .into_iter()
            .filter(|t| t.ssh_credentials == Some(connection))
            .map(|t| {
                let path = t.data["path"].as_str().unwrap_or("").to_string();
                let remote = t.data["remotepath"].as_str().unwrap_or("").to_string();
                (t.id, format!("Rsync task {path} → {remote}"))
            })
            .collect())
    }

    pub(crate) fn schedules_changed(&self) {
        *self.app.rsync_area.schedules.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn schedules(&self) -> Result<Schedules, ServiceError> {
        if let Some(s) = self.app.rsync_area.schedules.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(s.clone());
        }
        let mut all = Vec::new();
        for r in self.app.store.rsync_tasks()? {
            if !r.enabled {
                continue;
            }
            if let Ok(s) = RsyncTaskInput::from_record(&r).and_then(|t| {
                t.schedule.parse().map_err(|(f, e)| ServiceError::field(format!("schedule.{f}"), e.to_string()))
            }) {
                all.push((r.id, s));
            }
        }
        let all = Arc::new(all);
        *self.app.rsync_area.schedules.write().unwrap_or_else(|p| p.into_inner()) = Some(all.clone());
        Ok(all)
    }

    /// TrueNAS's rules, keyhaven's paths, and the remote path over SSH.
    async fn validate(&self, t: &RsyncTaskInput) -> Result<(), ServiceError> {
        let mut v = ValidationErrors::new();
        self.check_path(&t.path, &mut v);
        if t.user.is_empty() || t.user.contains(char::is_whitespace) || t.user.len() > 32 {
            v.add("user", "Enter the name of an existing account, without spaces");
        } else if let Some(a) = keyhaven_ssh::accounts::lookup(&t.user) {
            let me = keyhaven_ssh::uid::effective();
            if me != 0 && a.uid != me {
                v.add(
                    "user",
                    format!(
                        "keyhaven runs as uid {me} and can run tasks only as that account; run it as root to use {}",
                        t.user
                    ),
                );
            }
        } else {
            v.add("user", format!("User {} does not exist", t.user));
        }
        if let Err((field, e)) = t.schedule.parse() {
            v.add(format!("schedule.{field}"), e.to_string());
        }
        if let Err(e) = rules::check_extra(&t.extra) {
            v.add("extra", e.to_string());
        }
        for (name, text, max) in [("desc", t.desc.as_str(), 1024), ("remotepath", t.remotepath.as_str(), 1023)] {
            if text.chars().any(char::is_control) {
                v.add(name, "Must not contain control characters");
            } else if text.chars().count() > max {
                v.add(name, format!("String should have at most {max} characters"));
            }
        }
        let host_ok = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && !h.chars().any(|c| c.is_whitespace() || c.is_control() || "'\"`$;&|<>\\/@".contains(c))
                && !h.starts_with('-')
        };
        if let Some(h) = t.remotehost.as_deref().filter(|h| !h.is_empty()) {
            if !host_ok(h) {
                v.add("remotehost", "Enter a host name or address (no spaces, quotes, '@' or '/')");
            }
        }
        if let Some(p) = t.remoteport {
            v.take("remoteport", Port::new(p));
        }
        match t.mode {
            Mode::MODULE => {
                if t.remotehost.as_deref().unwrap_or("").is_empty() {
                    v.add("remotehost", "This field is required");
                }
                match t.remotemodule.as_deref() {
                    None | Some("") => v.add("remotemodule", "This field is required"),
                    Some(m) if m.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control()) => {
                        v.add("remotemodule", "Enter a module name (no '/' or spaces)")
                    }
                    _ => {}
                }
                if t.ssh_credentials.is_some() {
                    v.add("ssh_credentials", "Must not be set when mode is MODULE");
                }
            }
            Mode::SSH => {
                if t.remotepath.is_empty() {
                    v.add("remotepath", "This field is required");
                }
                match t.ssh_credentials {
                    Some(c) => {
                        let ok = self.app.keychain().entries()?.get(c).is_some_and(|e| !e.is_key_pair());
                        if !ok {
                            v.add("ssh_credentials", format!("SSH connection {c} does not exist"));
                        }
                    }
                    None => {
                        if t.remotehost.as_deref().unwrap_or("").is_empty() {
                            v.add("remotehost", "This field is required when no SSH connection is chosen");
                        }
                        if t.ssh_keyscan {
                            v.add(
                                "ssh_keyscan",
                                "keyhaven does not trust a scanned host key unseen: create an SSH connection \
                                 (Credentials › Backup Credentials), which shows the key's fingerprint to confirm, \
                                 and choose it in ssh_credentials",
                            );
                        }
                        if let Some(a) = keyhaven_ssh::accounts::lookup(&t.user) {
                            if !has_own_key(&a.home) {
                                v.add(
                                    "user",
                                    "In order to use rsync over SSH without an SSH connection you need a user with \
                                     a private key (ed25519/ECDSA/RSA) set up in home dir; or choose an SSH connection",
                                );
                            }
                        }
                    }
                }
            }
        }
        v.check().map_err(ServiceError::Validation)?;
        if t.mode == Mode::SSH && t.enabled && t.validate_rpath {
            match t.ssh_credentials {
                Some(c) => self.check_remote_path(c, &t.remotepath).await?,
                None => self.check_remote_path_as_user(t).await?,
            }
        }
        Ok(())
    }

    fn check_path(&self, path: &str, v: &mut ValidationErrors) {
        if !path.starts_with('/') {
            return v.add("path", "Enter an absolute path (starting with /)");
        }
        if path.chars().count() > 1023 || path.chars().any(char::is_control) {
            return v.add("path", "Enter a path of at most 1023 characters, without control characters");
        }
        let real = match std::fs::canonicalize(path) {
            Ok(p) if p.is_dir() => p,
            Ok(_) => return v.add("path", format!("{path} is not a directory")),
            Err(_) => return v.add("path", format!("{path} does not exist")),
        };
        let data =
            std::fs::canonicalize(&self.app.config.data_dir).unwrap_or_else(|_| self.app.config.data_dir.clone());
        if real.starts_with(&data) || data.starts_with(&real) {
            v.add(
                "path",
                format!(
                    "{path} overlaps keyhaven's data directory {} (it holds the master key and the database); choose a directory outside it",
                    data.display()
                ),
            );
        }
    }

    /// Check over SSH, with the connection's pinned host key, that the remote path is a directory.
    async fn check_remote_path(&self, connection: i64, remotepath: &str) -> Result<(), ServiceError> {
        let target = self.app.pairing().connection_target(connection, None)?;
        let command = format!("test -d {}", shell_quote(remotepath));
        match keyhaven_ssh::client::run_command(&target, &command).await {
            Ok((0, _)) => Ok(()),
            Ok(_) => Err(ServiceError::field(
                "remotepath",
                "The Remote Path you specified does not exist or is not a directory. Either create one yourself \
                 on the remote machine or uncheck the validate_rpath field",
            )),
            Err(report) => Err(ServiceError::field(
                "remotepath",
                format!(
                    "Could not check the remote path: {}",
                    report.error.unwrap_or_else(|| "the connection failed".into())
                ),
            )),
        }
    }

    /// Without a connection (TrueNAS's way): real `ssh` as the task's account,
    /// with its own key and known_hosts, checks that the remote path is a directory.
    async fn check_remote_path_as_user(&self, t: &RsyncTaskInput) -> Result<(), ServiceError> {
        let Some(account) = keyhaven_ssh::accounts::lookup(&t.user) else { return Ok(()) };
        let port = t.remoteport.and_then(|p| u16::try_from(p).ok()).unwrap_or(22);
        let host = t.remotehost.as_deref().unwrap_or("");
        let args: Vec<std::ffi::OsString> = [
            "-p".to_string(),
            port.to_string(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "ConnectTimeout=5".into(),
            format!("{}@{}", t.user, host.trim_start_matches('[').trim_end_matches(']')),
            format!("test -d {}", shell_quote(&t.remotepath)),
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let spec = keyhaven_ssh::rsync::RunSpec {
            rsync: PathBuf::from(SSH),
            uid: account.uid,
            gid: account.gid,
            home: account.home.clone(),
            user: account.name.clone(),
            args,
            keep_output: true,
        };
        let mut run = keyhaven_ssh::rsync::start(&spec).await.map_err(|e| ServiceError::call(ENOENT, e.to_string()))?;
        while run.events.recv().await.is_some() {}
        let out = run.wait().await.map_err(|e| ServiceError::internal("waiting for ssh", e))?;
        match out.code {
            Some(0) => Ok(()),
            Some(1) => Err(ServiceError::field(
                "remotepath",
                "The Remote Path you specified does not exist or is not a directory. Either create one yourself \
                 on the remote machine or uncheck the validate_rpath field",
            )),
            _ => Err(ServiceError::field(
                "remotepath",
                format!(
                    "Could not check the remote path as {} with its own key: {}",
                    t.user,
                    out.tail.join(" ").trim()
                ),
            )),
        }
    }

    /// `rsynctask.run`: start a run as a job; refused while one is going on
    /// — on this node (its map of running tasks) or, on PostgreSQL, on any
    /// node (the store's claim of the task's run row decides, in one
    /// statement, so two nodes starting a task at once run it once).
    pub fn run(&self, id: i64, trigger: Trigger) -> Result<i64, ServiceError> {
        let r = self.app.store.rsync_task(id)?.ok_or_else(|| not_found(id))?;
        if matches!(trigger, Trigger::Schedule) && !r.enabled {
            return Err(ServiceError::call(EINVAL, format!("rsync task {id} is disabled")));
        }
        let busy = |job: i64| {
            ServiceError::call(
                EBUSY,
                format!("rsync task {id} is already running (job {job}); wait for it to finish or stop it first"),
            )
        };
        let mut running = self.app.rsync_area.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((job, _)) = running.get(&id) {
            return Err(busy(*job));
        }
        let app = self.app.shared()?;
        let job = self.app.jobs.allocate()?;
        let started = super::jobs::now();
        // Recorded before the run starts (so before it can end: a RUNNING
        // written after a fast failure would overwrite it).
        if let Some(other) = self.app.store.rsync_run_claim(id, job, started, &self.app.cluster().me().node_id)? {
            return Err(busy(other));
        }
        running.insert(id, (job, 0));
        let spawned = self.app.jobs.spawn_as(job, "rsynctask.run", json!([id]), move |h| async move {
            let out = app.rsync().execute(&r, &h, trigger).await;
            let finished = super::jobs::now();
            // The job keeps only the end of its log (64 KiB): that is what the task keeps.
            let rec = RsyncRunRecord {
                task_id: id,
                job_id: h.id,
                state: if out.is_ok() { "SUCCESS" } else { "FAILED" }.into(),
                started,
                finished: Some(finished),
                error: out.as_ref().err().map(|e| e.to_string()),
                log: h.logs(),
            };
            // Not recorded when the task was deleted during the run, or
            // (PostgreSQL) when the leader took this node for down and the
            // row is another run's now.
            match app.store.rsync_run_finish(&rec) {
                Ok(true) => {}
                Ok(false) => tracing::info!(task = id, job = h.id, "the run's end is not recorded: its row is gone"),
                Err(e) => tracing::warn!(task = id, "could not record the run: {e}"),
            }
            app.rsync_area.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            out
        });
        if let Err(e) = spawned {
            running.remove(&id);
            let rec = RsyncRunRecord {
                task_id: id,
                job_id: job,
                state: "FAILED".into(),
                started,
                finished: Some(super::jobs::now()),
                error: Some(e.to_string()),
                log: String::new(),
            };
            if let Err(e) = self.app.store.rsync_run_finish(&rec) {
                tracing::warn!(task = id, "could not record the run: {e}");
            }
            return Err(e);
        }
        Ok(job)
    }

    /// One run, start to end.
    async fn execute(&self, r: &RsyncTaskRecord, h: &JobHandle, trigger: Trigger) -> Result<Value, ServiceError> {
        let t = RsyncTaskInput::from_record(r)?;
        h.log(&format!(
            "{} run of rsync task {} ({} {})",
            match trigger {
                Trigger::Manual => "Manual",
                Trigger::Schedule => "Scheduled",
            },
            r.id,
            t.path,
            match t.direction {
                Direction::PUSH => "push",
                Direction::PULL => "pull",
            }
        ));
        let account = keyhaven_ssh::accounts::lookup(&t.user)
            .ok_or_else(|| ServiceError::call(ENOENT, format!("The task's user {} does not exist any more", t.user)))?;
        // Checked again now: since the task was saved, a local user who owns a
        // parent directory may have swapped the path for a symlink into the data
        // directory. rsync gets the resolved path, which holds no symlinks.
        let mut problems = ValidationErrors::new();
        self.check_path(&t.path, &mut problems);
        if let Some(p) = problems.0.first() {
            return Err(ServiceError::call(EINVAL, format!("path: {}; the run did not start", p.message)));
        }
        let mut local = std::fs::canonicalize(&t.path)
            .map_err(|e| ServiceError::call(ENOENT, format!("path: {}: {e}", t.path)))?
            .to_string_lossy()
            .into_owned();
        if !local.ends_with('/') {
            local.push('/');
        }
        let mut args: Vec<std::ffi::OsString> =
            rules::rsync_options(&t.flags(), &t.extra).into_iter().map(Into::into).collect();
        // Kept alive until the run ends; dropping it removes the socket and its directory.
        let mut _agent = None;
        let mut pinned = None;
        let remote = match t.mode {
            Mode::MODULE => {
                let port = t.remoteport.and_then(|p| u16::try_from(p).ok()).unwrap_or(873);
                rules::module_operand(
                    t.remotehost.as_deref().unwrap_or(""),
                    port,
                    t.remotemodule.as_deref().unwrap_or(""),
                )
            }
            Mode::SSH => {
                let mut remotepath = t.remotepath.clone();
                if t.direction == Direction::PULL && !remotepath.ends_with('/') {
                    remotepath.push('/');
                }
                let q = keyhaven_ssh::rsync::quote;
                let mut ssh = vec![SSH.to_string(), "-F".into(), "none".into()];
                let opt = |ssh: &mut Vec<String>, o: String| {
                    ssh.push("-o".into());
                    ssh.push(q(&o));
                };
                opt(&mut ssh, "BatchMode=yes".into());
                opt(&mut ssh, "StrictHostKeyChecking=yes".into());
                let (host, port, username) = match t.ssh_credentials {
                    Some(c) => {
                        let target = self.app.pairing().connection_target(c, None)?;
                        // ssh would read a host or user starting with '-' as an option.
                        for (what, v) in [("host", &target.host), ("username", &target.username)] {
                            if v.starts_with('-')
                                || v.is_empty()
                                || v.chars().any(|ch| ch.is_whitespace() || ch.is_control())
                            {
                                return Err(ServiceError::call(
                                    EINVAL,
                                    format!("SSH connection {c}: its {what} {v:?} cannot be used on a command line; fix the connection"),
                                ));
                            }
                        }
                        let key = keyhaven_ssh::client::parse_private_key(&target.private_key_openssh)
                            .map_err(|e| ServiceError::call(EINVAL, format!("SSH connection {c}: {e}")))?;
                        let public = key
                            .public_key()
                            .to_openssh()
                            .map_err(|e| ServiceError::internal("encoding the public key", e))?;
                        let known: String = target
                            .pinned_host_keys
                            .iter()
                            .map(|(ty, b64)| rules::known_hosts_line(&target.host, target.port, ty, b64) + "\n")
                            .collect();
                        let parent = self.run_dir()?;
                        let agent = keyhaven_ssh::agent::RunAgent::start(
                            &parent,
                            account.uid,
                            account.gid,
                            &key,
                            &[("known_hosts", known.as_bytes()), ("id.pub", format!("{public}\n").as_bytes())],
                        )
                        .await
                        .map_err(|e| ServiceError::internal("starting the run's SSH agent", e))?;
                        let dir = agent.dir().to_string_lossy().into_owned();
                        opt(&mut ssh, format!("UserKnownHostsFile={dir}/known_hosts"));
                        opt(&mut ssh, "GlobalKnownHostsFile=none".into());
                        opt(&mut ssh, format!("IdentityAgent={}", agent.socket().display()));
                        opt(&mut ssh, format!("IdentityFile={dir}/id.pub"));
                        opt(&mut ssh, "IdentitiesOnly=yes".into());
                        opt(&mut ssh, "PasswordAuthentication=no".into());
                        opt(&mut ssh, "KbdInteractiveAuthentication=no".into());
                        opt(&mut ssh, "UpdateHostKeys=no".into());
                        opt(&mut ssh, "CheckHostIP=no".into());
                        opt(&mut ssh, format!("ConnectTimeout={}", target.timeout.as_secs()));
                        pinned = Some(Pinned {
                            connection: c,
                            keys: target.pinned_host_keys.clone(),
                            timeout: target.timeout,
                            host: target.host.clone(),
                            port: target.port,
                        });
                        _agent = Some(agent);
                        (target.host, target.port, target.username)
                    }
                    None => {
                        let port = t.remoteport.and_then(|p| u16::try_from(p).ok()).unwrap_or(22);
                        opt(&mut ssh, "ConnectTimeout=10".into());
                        (t.remotehost.clone().unwrap_or_default(), port, t.user.clone())
                    }
                };
                ssh.push("-p".into());
                ssh.push(port.to_string());
                args.push("-e".into());
                args.push(ssh.join(" ").into());
                rules::ssh_operand(&username, &host, &remotepath)
            }
        };
        // Operands only from here: a name starting with '-' is not an option.
        args.push("--".into());
        match t.direction {
            Direction::PUSH => {
                args.push(local.into());
                args.push(remote.clone().into());
            }
            Direction::PULL => {
                args.push(remote.clone().into());
                args.push(local.into());
            }
        }
        let spec = keyhaven_ssh::rsync::RunSpec {
            rsync: PathBuf::from(RSYNC),
            uid: account.uid,
            gid: account.gid,
            home: account.home.clone(),
            user: account.name.clone(),
            args,
            keep_output: !t.quiet,
        };
        let mut running =
            keyhaven_ssh::rsync::start(&spec).await.map_err(|e| ServiceError::call(ENOENT, e.to_string()))?;
        if let Some(agent) = &_agent {
            agent.admit_process_group(running.pid);
        }
        if let Some(slot) = self.app.rsync_area.running.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&r.id) {
            slot.1 = running.pid;
        }
        h.progress(0.0, "Starting rsync");
        let mut last: Option<Instant> = None;
        let mut last_percent = -1.0;
        while let Some(ev) = running.events.recv().await {
            match ev {
                keyhaven_ssh::rsync::RunEvent::Progress(p) => {
                    if p.percent != last_percent
                        && (last.is_none_or(|l| l.elapsed() >= Duration::from_millis(200)) || p.percent >= 100.0)
                    {
                        last = Some(Instant::now());
                        last_percent = p.percent;
                        h.progress(p.percent, format!("{} bytes, {}", p.bytes, p.rate));
                    }
                }
                keyhaven_ssh::rsync::RunEvent::Line { text, .. } => h.log(&text),
            }
        }
        let outcome = running.wait().await.map_err(|e| ServiceError::internal("waiting for rsync", e))?;
        match outcome.code {
            Some(code) if rules::exit_is_success(code) => {
                h.log(&format!("rsync finished ({code} - {})", rules::exit_code_name(code)));
                Ok(Value::Null)
            }
            Some(code) => {
                let mut msg = format!("rsync command returned {code} - {}", rules::exit_code_name(code));
                let hostkey = outcome.tail.iter().any(|l| {
                    l.contains("Host key verification failed") || l.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                });
                if hostkey {
                    msg = self.host_key_failure(pinned.as_ref()).await;
                } else if code == 12 && t.compress {
                    msg.push_str(". If the remote runs another rsync build, try without compress (old-style compression is not understood by every rsync)");
                }
                let tail = outcome.tail.join("\n");
                if !tail.is_empty() {
                    msg.push('\n');
                    msg.push_str(&tail);
                }
                h.log(&msg);
                Err(ServiceError::call(EINVAL, msg))
            }
            None => {
                let msg = format!(
                    "rsync was stopped by signal {} (the task was deleted or keyhaven is stopping)",
                    outcome.signal.unwrap_or(0)
                );
                h.log(&msg);
                Err(ServiceError::call(EINVAL, msg))
            }
        }
    }

    /// The message for a run that ssh refused because the host key did not
    /// match: both fingerprints and how to re-pin.
    async fn host_key_failure(&self, pinned: Option<&Pinned>) -> String {
        let Some(Pinned { connection: c, keys, timeout, host, port }) = pinned else {
            return "Host key verification failed: the remote's host key is not in the account's known_hosts or has \
                    changed. Nothing was transferred. Choose an SSH connection for this task (it pins the key you confirm)"
                .into();
        };
        let pinned_fp: Vec<String> = keys
            .iter()
            .filter_map(|(ty, b64)| keyhaven_core::keys::parse_host_key_lines(&format!("{ty} {b64}")).ok())
            .flatten()
            .map(|k| format!("{} {}", k.key_type, k.fingerprint))
            .collect();
        let offered = match keyhaven_ssh::client::scan_host_keys(host, *port, *timeout).await {
            Ok(k) => k.iter().map(|k| format!("{} {}", k.key_type, k.fingerprint)).collect::<Vec<_>>().join(", "),
            Err(e) => format!("(could not scan it again: {e})"),
        };
        format!(
            "Host key verification failed for {host} port {port}: SSH connection {c} pins {}, but the server now \
             presents {offered}. Nothing was transferred. If the server's key was changed on purpose, test the \
             connection (Credentials › Backup Credentials › Test, or keychaincredential.test_ssh_connection) and \
             accept the new key; otherwise someone may be impersonating the server",
            pinned_fp.join(", ")
        )
    }

    /// `<data>/run`: where each run's agent directory lives (0711: the run's
    /// account reaches its own directory inside, and lists nothing).
    fn run_dir(&self) -> Result<PathBuf, ServiceError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let dir = self.app.config.data_dir.join("run");
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && !m.file_type().is_symlink() => {
                let me = keyhaven_ssh::uid::effective();
                if m.uid() != me || m.mode() & 0o022 != 0 {
                    return Err(ServiceError::call(
                        EINVAL,
                        format!("{} must belong to keyhaven's account and not be writable by others", dir.display()),
                    ));
                }
                if m.mode() & 0o777 != 0o711 {
                    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
                }
            }
            Ok(_) => {
                return Err(ServiceError::call(EINVAL, format!("{} is not a directory; remove it", dir.display())))
            }
            Err(_) => {
                std::fs::DirBuilder::new()
                    .mode(0o711)
                    .create(&dir)
                    .map_err(|e| ServiceError::internal("creating the run directory", e))?;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711));
            }
        }
        Ok(dir)
    }

    /// At shutdown: stop every run (each is then recorded as stopped by a signal).
    pub fn stop_all(&self) {
        for (_, pid) in self.app.rsync_area.running.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if *pid != 0 {
                keyhaven_ssh::rsync::kill(*pid);
            }
        }
    }

    /// At start: runs a stopped daemon left RUNNING are failed runs.
    pub fn recover(&self) {
        let msg = "keyhaven stopped during this run (it was killed or restarted), so the run did not finish; run the task again";
        let node = self.app.cluster().me().node_id;
        match self.app.store.rsync_runs_fail_interrupted(&node, msg, super::jobs::now()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!("{n} rsync run(s) were interrupted when keyhaven stopped; marked FAILED"),
            Err(e) => tracing::warn!("could not mark interrupted rsync runs: {e}"),
        }
        // The agent directories of those runs (a stale socket, known_hosts and a
        // public key; never a private key). remove_dir_all does not follow links.
        if let Ok(entries) = std::fs::read_dir(self.app.config.data_dir.join("run")) {
            for e in entries.flatten() {
                let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir && e.file_name().to_string_lossy().starts_with("agent-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// The leader's sweep (PostgreSQL; blocking): runs of nodes that are
    /// down (no heartbeat for `DOWN_AFTER_SECS`) did not finish.
    pub fn fail_down_nodes(&self) {
        let msg = "the node running this task stopped answering (no heartbeat), so the run did not finish; run the task again";
        match self.app.store.rsync_runs_fail_down_nodes(msg, super::jobs::now()) {
            Ok(0) => {}
            Ok(n) => tracing::warn!("{n} rsync run(s) of nodes that are down marked FAILED"),
            Err(e) => tracing::warn!("could not mark the rsync runs of nodes that are down: {e}"),
        }
    }

    /// The scheduler: at the start of each minute, run the enabled tasks due
    /// then. A minute missed while keyhaven was down is not made up (as cron).
    /// With several nodes on one database only the leader runs them (checked
    /// with the database at each minute), with the tasks read afresh: another
    /// node may have changed them.
    pub fn scheduler(&self) -> tokio::task::JoinHandle<()> {
        let app = self.app.me.clone();
        tokio::spawn(async move {
            loop {
                let now = chrono::Local::now();
                let into = (now.timestamp_subsec_millis() as u64) + 1000 * u64::from(chrono::Timelike::second(&now));
                tokio::time::sleep(Duration::from_millis(60_000u64.saturating_sub(into) + 5)).await;
                let Some(app) = app.upgrade() else { return };
                if !app.cluster().confirm_leader().await {
                    continue;
                }
                if app.store.backend_name() != "sqlite" {
                    app.rsync().schedules_changed();
                }
                let t = chrono::Local::now();
                use chrono::{Datelike, Timelike};
                let minute = rules::Minute {
                    minute: t.minute(),
                    hour: t.hour(),
                    dom: t.day(),
                    month: t.month(),
                    dow: t.weekday().num_days_from_sunday(),
                };
                let due: Vec<i64> = match app.rsync().schedules() {
                    Ok(s) => s.iter().filter(|(_, s)| s.matches(minute)).map(|(id, _)| *id).collect(),
                    Err(e) => {
                        tracing::warn!("rsync scheduler: {e}");
                        continue;
                    }
                };
                for id in due {
                    match app.rsync().run(id, Trigger::Schedule) {
                        Ok(job) => tracing::info!(task = id, job, "scheduled rsync run started"),
                        Err(e) => tracing::warn!(task = id, "scheduled rsync run not started: {e}"),
                    }
                }
            }
        })
    }
}

/// Whether the account has its own SSH key (`~/.ssh/id_ed25519`, `id_ecdsa` or `id_rsa`).
fn has_own_key(home: &Path) -> bool {
    ["id_ed25519", "id_ecdsa", "id_rsa"].iter().any(|n| home.join(".ssh").join(n).is_file())
}

/// Quote a word for the remote shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
