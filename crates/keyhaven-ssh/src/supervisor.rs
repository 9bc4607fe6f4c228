//! Supervision of a real OpenSSH `sshd`: check a configuration with
//! `sshd -t`, swap it in atomically, start sshd in the foreground, reload it
//! with SIGHUP, stop it, and restart it with exponential backoff when it dies
//! on its own.
//!
//! Files live in [`SshdPaths::dir`]: `sshd_config` (the active
//! configuration), `sshd.pid` (sshd's PID file) and `sshd.log` (sshd's log,
//! `-E`, which also receives its stderr). Candidate configurations are written
//! to a private (0600) temporary file in the same directory, checked there and
//! — for [`Supervisor::apply_config`] — renamed over `sshd_config`, so sshd
//! only ever reads a configuration that `sshd -t` accepted.
//!
//! sshd runs as `<sshd> -D -f <dir>/sshd_config -E <dir>/sshd.log
//! -o PidFile=<dir>/sshd.pid`: in the foreground, as a child of this process.
//! The `-o PidFile` makes the PID file location independent of what the
//! configuration says (command-line options win in sshd). It is started by
//! absolute path, because sshd re-executes itself (per connection, and on
//! SIGHUP, which keeps the PID). Readiness is "the PID file names our child
//! and every listen address accepts a TCP connection"; sshd writes the PID
//! file only after it has bound its sockets and installed its signal handlers.
//!
//! Signals are only ever sent by PID to the child this module spawned and has
//! not yet reaped (never by name). The child is spawned with `kill_on_drop`, and
//! dropping the last [`Supervisor`] clone stops sshd (SIGTERM, then SIGKILL).
//!
//! Running as root, sshd needs its privilege-separation directory `/run/sshd`
//! (root, 0755); it is created before every check, start and reload.
//!
//! sshd's per-connection processes are not killed on stop (the same as
//! OpenSSH's own service unit): established sessions survive a restart.

use std::fmt::Write as _;
use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::files::is_root;

/// Where Debian's `openssh-server` installs sshd.
pub const DEFAULT_SSHD: &str = "/usr/sbin/sshd";

/// sshd's privilege-separation directory (compiled into Debian's sshd).
pub const PRIVSEP_DIR: &str = "/run/sshd";

/// How long sshd may take to start listening (start, reload, restart).
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long sshd may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for `sshd -t` / `sshd -T`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Readiness poll interval.
const POLL: Duration = Duration::from_millis(20);
/// Timeout of one readiness TCP probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// First delay before restarting an sshd that died.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Largest delay between restart attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// An sshd that stayed up this long resets the backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// At most this much of sshd's log goes into an error message.
const LOG_EXCERPT_BYTES: usize = 2000;

/// The sshd binary and the directory holding its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshdPaths {
    /// Absolute path of sshd, e.g. `/usr/sbin/sshd`.
    pub sshd: PathBuf,
    /// `<data>/sshd`: `sshd_config`, `sshd.pid`, `sshd.log`.
    pub dir: PathBuf,
}

impl SshdPaths {
    /// Paths for `sshd` and `dir`.
    pub fn new(sshd: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        SshdPaths { sshd: sshd.into(), dir: dir.into() }
    }

    /// `dir/sshd_config`: the active configuration.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("sshd_config")
    }

    /// `dir/sshd.pid`: sshd's PID file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("sshd.pid")
    }

    /// `dir/sshd.log`: sshd's log (`-E`) and stderr.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("sshd.log")
    }
}

/// What went wrong, phrased so that the message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum SshdError {
    /// The sshd binary does not exist at the configured path.
    #[error(
        "OpenSSH server not found at {}: install the Debian package `openssh-server` \
         (`apt-get install openssh-server`) or configure the path of sshd",
        path.display()
    )]
    NotInstalled { path: PathBuf },
    /// `sshd -t` refused the configuration; `message` is sshd's own output.
    #[error("sshd rejected the configuration (nothing was changed; correct what sshd names and try again): {message}")]
    ConfigRejected { message: String },
    /// Another program already listens on a port the configuration uses.
    #[error(
        "port {port} is already in use by another program: stop that program or choose another port for the SSH service"
    )]
    PortInUse { port: u16 },
    /// sshd could not be started or reloaded (details, with sshd's log).
    #[error("sshd could not be started: {0}")]
    Start(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl SshdError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        SshdError::Io { context: context.into(), source }
    }
}

/// What the supervised sshd is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshdState {
    /// Started and listening.
    Running,
    /// Not wanted: never started, stopped, or the last start failed.
    Stopped,
    /// Wanted, but it died and is not running right now (a restart with
    /// backoff is pending or in progress).
    Crashed,
}

/// Starts, reloads, stops and supervises one sshd.
///
/// Cheap to clone (an `Arc` inside); all clones drive the same sshd. Dropping
/// the last clone stops sshd. Methods that start processes must be called
/// from within a tokio runtime.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("paths", &self.inner.shared.paths)
            .field("state", &self.state())
            .field("pids", &self.pids())
            .finish()
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// Serialises start/stop/reload/apply; holds the running monitor task.
    /// Dropping it (last `Supervisor` gone) closes the command channel, which
    /// makes the monitor stop sshd.
    ops: tokio::sync::Mutex<Option<Monitor>>,
}

/// State shared with the monitor task.
struct Shared {
    paths: SshdPaths,
    status: Mutex<Status>,
}

#[derive(Default)]
struct Status {
    /// sshd should be running (set by a successful start, cleared by stop).
    wanted: bool,
    /// PID of the running, ready sshd.
    pid: Option<u32>,
    /// Addresses the running sshd listens on.
    addrs: Vec<SocketAddr>,
    /// Why the last start or restart failed, or why sshd died.
    last_error: Option<String>,
    /// Automatic restarts since the last explicit start.
    restarts: u64,
}

struct Monitor {
    tx: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
}

enum Cmd {
    /// Send SIGHUP (after removing the PID file); replies with the PID, or
    /// `None` when no sshd is running right now.
    Hup(oneshot::Sender<Option<u32>>),
    /// Stop sshd and end supervision; replies once sshd has exited.
    Stop(oneshot::Sender<()>),
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Supervisor {
    /// A supervisor for the sshd at `paths.sshd` with its files in `paths.dir`.
    /// Nothing is started or checked until a method is called.
    pub fn new(paths: SshdPaths) -> Self {
        Supervisor {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared { paths, status: Mutex::new(Status::default()) }),
                ops: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The paths this supervisor uses.
    pub fn paths(&self) -> &SshdPaths {
        &self.inner.shared.paths
    }

    /// Running / Stopped / Crashed.
    pub fn state(&self) -> SshdState {
        let st = self.inner.shared.status();
        if !st.wanted {
            SshdState::Stopped
        } else if st.pid.is_some() {
            SshdState::Running
        } else {
            SshdState::Crashed
        }
    }

    /// PID of the running sshd listener (empty when none is running).
    pub fn pids(&self) -> Vec<u32> {
        self.inner.shared.status().pid.into_iter().collect()
    }

    /// Why the last start or automatic restart failed, or why sshd died
    /// (cleared by a successful start or restart).
    pub fn last_error(&self) -> Option<String> {
        self.inner.shared.status().last_error.clone()
    }

    /// How many times sshd was restarted automatically since the last
    /// explicit start.
    pub fn restart_count(&self) -> u64 {
        self.inner.shared.status().restarts
    }

    /// Checks `text` with `sshd -t -f <temp file>` (the temp file is 0600 in
    /// `dir` and removed afterwards). Changes nothing.
    pub async fn check_config(&self, text: &str) -> Result<(), SshdError> {
        let paths = &self.inner.shared.paths;
        prepare(paths)?;
        let candidate = Candidate::write(&paths.dir, text, false).await?;
        check_file(paths, &candidate.path).await
    }

    /// Checks `text`, then atomically replaces `dir/sshd_config` with it
    /// (temp file, fsync, rename, fsync of the directory) and, when sshd is
    /// running, reloads it (SIGHUP) and waits until it listens again.
    ///
    /// A rejected configuration, or one whose new port is taken by another
    /// program, leaves both the running sshd and `sshd_config` untouched.
    pub async fn apply_config(&self, text: &str) -> Result<(), SshdError> {
        let mut ops = self.inner.ops.lock().await;
        let shared = &self.inner.shared;
        let paths = &shared.paths;
        prepare(paths)?;
        let candidate = Candidate::write(&paths.dir, text, true).await?;
        check_file(paths, &candidate.path).await?;
        let running = is_running(shared, &ops);
        if running {
            // Ports the running sshd does not already hold must be free.
            let new_addrs = listen_addrs(paths, &candidate.path).await?;
            let current = shared.status().addrs.clone();
            let fresh: Vec<SocketAddr> =
                new_addrs.into_iter().filter(|a| !current.iter().any(|c| c.port() == a.port())).collect();
            ensure_ports_free(&fresh)?;
        }
        candidate.persist(&paths.config_file()).await?;
        tracing::info!(config = %paths.config_file().display(), "sshd configuration replaced");
        if running {
            self.reload_locked(&mut ops).await?;
        }
        Ok(())
    }

    /// Starts sshd from `dir/sshd_config` and waits (up to ~5 s) until it
    /// listens; from then on it is restarted automatically if it dies.
    /// Does nothing when sshd is already running.
    pub async fn start(&self) -> Result<(), SshdError> {
        let mut ops = self.inner.ops.lock().await;
        self.start_locked(&mut ops).await
    }

    /// Stops sshd (SIGTERM, then SIGKILL after ~5 s) and ends supervision.
    /// Does nothing when sshd is not running.
    pub async fn stop(&self) -> Result<(), SshdError> {
        let mut ops = self.inner.ops.lock().await;
        self.stop_locked(&mut ops).await;
        Ok(())
    }

    /// Stops, then starts sshd (a new process).
    pub async fn restart(&self) -> Result<(), SshdError> {
        let mut ops = self.inner.ops.lock().await;
        self.stop_locked(&mut ops).await;
        self.start_locked(&mut ops).await
    }

    /// Makes sshd re-read `dir/sshd_config` (SIGHUP; sshd re-executes itself
    /// with the same PID) and waits until it listens again. Starts sshd when it
    /// is not running.
    pub async fn reload(&self) -> Result<(), SshdError> {
        let mut ops = self.inner.ops.lock().await;
        self.reload_locked(&mut ops).await
    }

    async fn start_locked(&self, ops: &mut Option<Monitor>) -> Result<(), SshdError> {
        let shared = &self.inner.shared;
        if is_running(shared, ops) {
            return Ok(());
        }
        // A monitor in its restart loop (Crashed) is replaced by this explicit start.
        self.stop_locked(ops).await;
        match launch(&shared.paths).await {
            Ok(launched) => {
                let pid = launched.pid;
                {
                    let mut st = shared.status();
                    st.wanted = true;
                    st.pid = Some(pid);
                    st.addrs = launched.addrs.clone();
                    st.last_error = None;
                    st.restarts = 0;
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(monitor(Arc::clone(shared), launched, rx));
                *ops = Some(Monitor { tx, task });
                tracing::info!(pid, "sshd started");
                Ok(())
            }
            Err(e) => {
                shared.status().last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    async fn stop_locked(&self, ops: &mut Option<Monitor>) {
        let shared = &self.inner.shared;
        shared.status().wanted = false;
        if let Some(mon) = ops.take() {
            let (tx, rx) = oneshot::channel();
            if mon.tx.send(Cmd::Stop(tx)).is_ok() {
                let _ = rx.await;
            }
            drop(mon.tx);
            let _ = mon.task.await;
        }
        let mut st = shared.status();
        st.pid = None;
        st.addrs.clear();
    }

    async fn reload_locked(&self, ops: &mut Option<Monitor>) -> Result<(), SshdError> {
        let shared = &self.inner.shared;
        let paths = &shared.paths;
        if !is_running(shared, ops) {
            return self.start_locked(ops).await;
        }
        prepare(paths)?;
        let addrs = listen_addrs(paths, &paths.config_file()).await?;
        let log_offset = log_len(&paths.log_file());
        let pid = {
            let Some(mon) = ops.as_ref() else {
                return self.start_locked(ops).await;
            };
            let (tx, rx) = oneshot::channel();
            if mon.tx.send(Cmd::Hup(tx)).is_err() {
                None
            } else {
                rx.await.ok().flatten()
            }
        };
        let Some(pid) = pid else {
            // It died just now: start afresh and report that outcome.
            return self.start_locked(ops).await;
        };
        let outcome =
            wait_ready(paths, pid, &addrs, || (shared.status().pid != Some(pid)).then(|| "it exited".to_string()))
                .await;
        match outcome {
            Ready::Listening => {
                let log = read_log_since(&paths.log_file(), log_offset);
                if let Some(port) = bind_failure(&log) {
                    return Err(SshdError::PortInUse { port });
                }
                shared.status().addrs = addrs;
                tracing::info!(pid, "sshd reloaded");
                Ok(())
            }
            Ready::Exited(how) => {
                let log = read_log_since(&paths.log_file(), log_offset);
                if let Some(port) = bind_failure(&log) {
                    return Err(SshdError::PortInUse { port });
                }
                Err(SshdError::Start(format!(
                    "sshd (pid {pid}) stopped while reloading ({how}); it will be restarted automatically. {}",
                    log_hint(paths, &log)
                )))
            }
            Ready::TimedOut => {
                let log = read_log_since(&paths.log_file(), log_offset);
                Err(SshdError::Start(format!(
                    "sshd (pid {pid}) did not listen on {} within {} s after reloading. {}",
                    fmt_addrs(&addrs),
                    READY_TIMEOUT.as_secs(),
                    log_hint(paths, &log)
                )))
            }
        }
    }
}

fn is_running(shared: &Shared, ops: &Option<Monitor>) -> bool {
    ops.as_ref().is_some_and(|m| !m.task.is_finished()) && shared.status().pid.is_some()
}

// ---------------------------------------------------------------------------
// Monitor task: owns the child, restarts it with backoff.

struct Launched {
    child: Child,
    pid: u32,
    addrs: Vec<SocketAddr>,
}

/// Exponential backoff: 0.2 s, 0.4 s, 0.8 s … capped at 10 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_INITIAL }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

async fn monitor(shared: Arc<Shared>, first: Launched, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let paths = &shared.paths;
    let mut child = first.child;
    let mut pid = first.pid;
    let mut started = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        // sshd is running: wait for it to exit or for a command.
        let exit = loop {
            tokio::select! {
                status = child.wait() => break status,
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Hup(reply)) => {
                        let r = match child.try_wait() {
                            Ok(None) => {
                                let _ = std::fs::remove_file(paths.pid_file());
                                signal(pid, Signal::HUP);
                                Some(pid)
                            }
                            _ => None,
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Stop(reply)) => {
                        terminate(paths, &mut child, pid).await;
                        mark_stopped(&shared);
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        // Last Supervisor dropped.
                        terminate(paths, &mut child, pid).await;
                        mark_stopped(&shared);
                        return;
                    }
                },
            }
        };
        let how = match exit {
            Ok(status) => describe_exit(status),
            Err(e) => format!("waiting for it failed: {e}"),
        };
        let up = started.elapsed();
        let message = format!("sshd (pid {pid}) exited unexpectedly after {:.1} s ({how})", up.as_secs_f64());
        tracing::warn!("{message}; restarting it");
        {
            let mut st = shared.status();
            st.pid = None;
            st.last_error = Some(message);
        }
        if up >= BACKOFF_RESET_AFTER {
            backoff.reset();
        }
        // Crashed: restart with backoff until it runs again or we are told to stop.
        let launched = loop {
            let sleep = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Hup(reply)) => { let _ = reply.send(None); }
                        Some(Cmd::Stop(reply)) => {
                            mark_stopped(&shared);
                            let _ = reply.send(());
                            return;
                        }
                        None => { mark_stopped(&shared); return; }
                    },
                }
            }
            let mut attempt = Box::pin(launch(paths));
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    cmd = rx.recv() => match cmd {
                        Some(Cmd::Hup(reply)) => { let _ = reply.send(None); }
                        Some(Cmd::Stop(reply)) => {
                            // Dropping the attempt kills a half-started sshd (kill_on_drop).
                            drop(attempt);
                            mark_stopped(&shared);
                            let _ = reply.send(());
                            return;
                        }
                        None => { drop(attempt); mark_stopped(&shared); return; }
                    },
                }
            };
            match result {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!("restarting sshd failed: {e}");
                    shared.status().last_error = Some(e.to_string());
                }
            }
        };
        child = launched.child;
        pid = launched.pid;
        started = Instant::now();
        {
            let mut st = shared.status();
            st.pid = Some(pid);
            st.addrs = launched.addrs;
            st.last_error = None;
            st.restarts += 1;
        }
        tracing::info!(pid, "sshd restarted");
    }
}

fn mark_stopped(shared: &Shared) {
    let mut st = shared.status();
    st.pid = None;
    st.addrs.clear();
}

/// SIGTERM, wait up to `STOP_TIMEOUT`, then SIGKILL. `child` is not yet reaped,
/// so `pid` is still ours.
async fn terminate(paths: &SshdPaths, child: &mut Child, pid: u32) {
    if let Ok(None) = child.try_wait() {
        signal(pid, Signal::TERM);
        if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_err() {
            tracing::warn!(pid, "sshd did not exit after SIGTERM; sending SIGKILL");
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
    // sshd removes its PID file on SIGTERM, not after SIGKILL.
    if read_pid(&paths.pid_file()) == Some(pid) {
        let _ = std::fs::remove_file(paths.pid_file());
    }
    tracing::info!(pid, "sshd stopped");
}

fn signal(pid: u32, sig: Signal) {
    // Only a positive PID of our own child, not yet reaped: never a group or -1.
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { return };
    let _ = rustix::process::kill_process(pid, sig);
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        format!("killed by signal {sig}")
    } else {
        status.to_string()
    }
}

// ---------------------------------------------------------------------------
// Starting sshd.

/// Everything a start needs: checks, the spawn, and the readiness wait.
/// On error no sshd is left running.
async fn launch(paths: &SshdPaths) -> Result<Launched, SshdError> {
    prepare(paths)?;
    let config = paths.config_file();
    if !config.exists() {
        return Err(SshdError::Start(format!("there is no configuration at {}: apply one first", config.display())));
    }
    let addrs = listen_addrs(paths, &config).await?;
    ensure_ports_free(&addrs)?;

    let pid_file = paths.pid_file();
    match std::fs::remove_file(&pid_file) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(SshdError::io(format!("cannot remove the stale {}", pid_file.display()), e)),
    }
    let log_path = paths.log_file();
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| SshdError::io(format!("cannot open {}", log_path.display()), e))?;
    let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_out = log.try_clone().map_err(|e| SshdError::io(format!("cannot open {}", log_path.display()), e))?;

    let mut child = Command::new(&paths.sshd)
        .arg("-D")
        .arg("-f")
        .arg(&config)
        .arg("-E")
        .arg(&log_path)
        .arg("-o")
        .arg(pid_file_option(&pid_file))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_out))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(paths, e))?;
    let Some(pid) = child.id() else {
        let status = child.wait().await.ok().map(describe_exit).unwrap_or_default();
        return Err(SshdError::Start(format!("sshd exited immediately ({status})")));
    };

    let outcome = wait_ready(paths, pid, &addrs, || match child.try_wait() {
        Ok(Some(status)) => Some(describe_exit(status)),
        Ok(None) => None,
        Err(e) => Some(format!("waiting for it failed: {e}")),
    })
    .await;
    match outcome {
        Ready::Listening => {
            // With several addresses sshd keeps going when only some bind.
            let log = read_log_since(&log_path, log_offset);
            if let Some(port) = bind_failure(&log) {
                kill_child(&mut child).await;
                return Err(SshdError::PortInUse { port });
            }
            Ok(Launched { child, pid, addrs })
        }
        Ready::Exited(how) => {
            let log = read_log_since(&log_path, log_offset);
            if let Some(port) = bind_failure(&log) {
                return Err(SshdError::PortInUse { port });
            }
            Err(SshdError::Start(format!("sshd exited right after starting ({how}). {}", log_hint(paths, &log))))
        }
        Ready::TimedOut => {
            kill_child(&mut child).await;
            let log = read_log_since(&log_path, log_offset);
            Err(SshdError::Start(format!(
                "sshd did not listen on {} within {} s and was stopped. {}",
                fmt_addrs(&addrs),
                READY_TIMEOUT.as_secs(),
                log_hint(paths, &log)
            )))
        }
    }
}

/// `PidFile=<path>` for `-o`, quoted when the path needs it.
fn pid_file_option(pid_file: &Path) -> String {
    let p = pid_file.to_string_lossy();
    if p.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '#') {
        format!("PidFile=\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("PidFile={p}")
    }
}

async fn kill_child(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

enum Ready {
    Listening,
    Exited(String),
    TimedOut,
}

/// Polls until the PID file names `pid` and every address accepts a TCP
/// connection, `exited` reports that the process is gone, or time runs out.
async fn wait_ready(
    paths: &SshdPaths,
    pid: u32,
    addrs: &[SocketAddr],
    mut exited: impl FnMut() -> Option<String>,
) -> Ready {
    let deadline = Instant::now() + READY_TIMEOUT;
    let pid_file = paths.pid_file();
    loop {
        if let Some(how) = exited() {
            return Ready::Exited(how);
        }
        if read_pid(&pid_file) == Some(pid) && all_accept(addrs).await {
            return Ready::Listening;
        }
        if Instant::now() >= deadline {
            return Ready::TimedOut;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn all_accept(addrs: &[SocketAddr]) -> bool {
    for addr in addrs {
        let target = probe_target(*addr);
        match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(_stream)) => {}
            _ => return false,
        }
    }
    true
}

/// Where to connect to reach a listen address (wildcards → loopback).
fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port()),
        _ => addr,
    }
}

/// Fails with `PortInUse` when another socket already holds one of `addrs`
/// (bound the way sshd binds: SO_REUSEADDR, IPv6-only for IPv6). Other bind
/// errors (address not local, privileged port) are left for sshd to report.
fn ensure_ports_free(addrs: &[SocketAddr]) -> Result<(), SshdError> {
    use socket2::{Domain, Socket, Type};
    for addr in addrs {
        let Ok(sock) = Socket::new(Domain::for_address(*addr), Type::STREAM, None) else { continue };
        let _ = sock.set_reuse_address(true);
        if addr.is_ipv6() {
            let _ = sock.set_only_v6(true);
        }
        if let Err(e) = sock.bind(&(*addr).into()) {
            if e.kind() == io::ErrorKind::AddrInUse {
                return Err(SshdError::PortInUse { port: addr.port() });
            }
        }
    }
    Ok(())
}

/// The port of an "Address already in use" bind failure in sshd's log.
fn bind_failure(log: &str) -> Option<u16> {
    for line in log.lines() {
        if !line.contains("Address already in use") {
            continue;
        }
        // "error: Bind to port 2222 on 127.0.0.1 failed: Address already in use."
        let port = line
            .split("Bind to port ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse::<u16>().ok());
        return Some(port.unwrap_or(0));
    }
    None
}

fn fmt_addrs(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

fn spawn_error(paths: &SshdPaths, e: io::Error) -> SshdError {
    if e.kind() == io::ErrorKind::NotFound {
        SshdError::NotInstalled { path: paths.sshd.clone() }
    } else {
        SshdError::Start(format!("cannot run {}: {e}", paths.sshd.display()))
    }
}

// ---------------------------------------------------------------------------
// Checks and preparation.

/// sshd installed and absolute; `dir` exists; `/run/sshd` exists when root.
fn prepare(paths: &SshdPaths) -> Result<(), SshdError> {
    if !paths.sshd.is_absolute() {
        return Err(SshdError::Start(format!(
            "the sshd path must be absolute (sshd re-executes itself), got {}: use e.g. {DEFAULT_SSHD}",
            paths.sshd.display()
        )));
    }
    match std::fs::metadata(&paths.sshd) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err(SshdError::NotInstalled { path: paths.sshd.clone() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SshdError::NotInstalled { path: paths.sshd.clone() })
        }
        Err(e) => return Err(SshdError::io(format!("cannot inspect {}", paths.sshd.display()), e)),
    }
    if !paths.dir.is_dir() {
        // Only the last component; the data dir itself belongs to the caller.
        // 0711: sshd, running as each user, must reach files below it.
        DirBuilder::new()
            .mode(0o711)
            .create(&paths.dir)
            .or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
            .map_err(|e| SshdError::io(format!("cannot create {}", paths.dir.display()), e))?;
    }
    if is_root() {
        ensure_privsep_dir(Path::new(PRIVSEP_DIR))?;
    }
    Ok(())
}

/// `/run/sshd`: a directory owned by root, not group- or world-writable.
fn ensure_privsep_dir(dir: &Path) -> Result<(), SshdError> {
    let ctx = |what: &str| format!("cannot {what} {} (sshd needs it when running as root)", dir.display());
    match DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(SshdError::io(ctx("create"), e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| SshdError::io(ctx("inspect"), e))?;
    if !meta.is_dir() {
        return Err(SshdError::Start(format!(
            "{} exists but is not a directory: remove it so that keyhaven can create sshd's privilege-separation directory",
            dir.display()
        )));
    }
    use std::os::unix::fs::MetadataExt;
    if meta.uid() != 0 || meta.gid() != 0 {
        std::os::unix::fs::chown(dir, Some(0), Some(0)).map_err(|e| SshdError::io(ctx("chown"), e))?;
    }
    if meta.mode() & 0o7777 != 0o755 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| SshdError::io(ctx("chmod"), e))?;
    }
    Ok(())
}

/// Runs sshd with `args` and returns (success, stdout, stderr).
async fn run_sshd(paths: &SshdPaths, args: &[&std::ffi::OsStr]) -> Result<(ExitStatus, String, String), SshdError> {
    let child = Command::new(&paths.sshd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| spawn_error(paths, e))?;
    let out = match tokio::time::timeout(CHECK_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(SshdError::io(format!("running {} failed", paths.sshd.display()), e)),
        Err(_) => {
            return Err(SshdError::Start(format!(
                "{} did not finish checking the configuration within {} s",
                paths.sshd.display(),
                CHECK_TIMEOUT.as_secs()
            )))
        }
    };
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `sshd -t -f file`: Ok, or `ConfigRejected` with sshd's message.
async fn check_file(paths: &SshdPaths, file: &Path) -> Result<(), SshdError> {
    let (status, stdout, stderr) = run_sshd(paths, &["-t".as_ref(), "-f".as_ref(), file.as_os_str()]).await?;
    if status.success() {
        return Ok(());
    }
    Err(SshdError::ConfigRejected { message: sshd_message(&stdout, &stderr, status) })
}

fn sshd_message(stdout: &str, stderr: &str, status: ExitStatus) -> String {
    let msg = stderr.trim();
    if !msg.is_empty() {
        return msg.to_string();
    }
    let msg = stdout.trim();
    if !msg.is_empty() {
        return msg.to_string();
    }
    format!("sshd -t failed with {} and printed nothing", describe_exit(status))
}

/// The addresses sshd will listen on, from `sshd -T -f file`.
async fn listen_addrs(paths: &SshdPaths, file: &Path) -> Result<Vec<SocketAddr>, SshdError> {
    let (status, stdout, stderr) = run_sshd(paths, &["-T".as_ref(), "-f".as_ref(), file.as_os_str()]).await?;
    if !status.success() {
        return Err(SshdError::ConfigRejected { message: sshd_message("", &stderr, status) });
    }
    let addrs = parse_listen_addrs(&stdout);
    if addrs.is_empty() {
        return Err(SshdError::Start(format!(
            "`sshd -T -f {}` reported no listen address: set Port/ListenAddress in the configuration",
            file.display()
        )));
    }
    Ok(addrs)
}

/// `listenaddress 127.0.0.1:22` / `listenaddress [::]:22 [rdomain x]` lines.
fn parse_listen_addrs(dump: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in dump.lines() {
        let mut words = line.split_whitespace();
        if !words.next().is_some_and(|k| k.eq_ignore_ascii_case("listenaddress")) {
            continue;
        }
        if let Some(addr) = words.next().and_then(|w| w.parse::<SocketAddr>().ok()) {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Files.

/// A private temp file in `dir` holding a candidate configuration; removed on
/// drop unless persisted.
struct Candidate {
    path: PathBuf,
    keep: bool,
}

static CANDIDATE_SEQ: AtomicU64 = AtomicU64::new(0);

impl Candidate {
    async fn write(dir: &Path, text: &str, sync: bool) -> Result<Candidate, SshdError> {
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
    async fn persist(mut self, target: &Path) -> Result<(), SshdError> {
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

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What sshd logged since `offset` (the last `LOG_EXCERPT_BYTES`), trimmed.
fn read_log_since(path: &Path, offset: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else { return String::new() };
    let start = usize::try_from(offset).ok().filter(|&o| o <= bytes.len()).unwrap_or(0);
    let tail = &bytes[start..];
    let tail = &tail[tail.len().saturating_sub(LOG_EXCERPT_BYTES)..];
    String::from_utf8_lossy(tail).trim().to_string()
}

fn log_hint(paths: &SshdPaths, log: &str) -> String {
    let mut s = String::new();
    if log.is_empty() {
        let _ = write!(s, "sshd logged nothing (see {})", paths.log_file().display());
    } else {
        let _ = write!(s, "sshd's log ({}) says: {log}", paths.log_file().display());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listen_addresses_from_sshd_dump() {
        let dump = "port 2222\nlistenaddress 127.0.0.1:2222\nlistenaddress [::1]:2222 rdomain x\n\
                    listenaddress 127.0.0.1:2222\npermitlisten any\n";
        assert_eq!(
            parse_listen_addrs(dump),
            vec!["127.0.0.1:2222".parse::<SocketAddr>().unwrap(), "[::1]:2222".parse().unwrap()]
        );
        assert!(parse_listen_addrs("port 22\n").is_empty());
    }

    #[test]
    fn finds_bind_failures_in_the_log() {
        let log = "Server listening on 127.0.0.1 port 2200.\n\
                   error: Bind to port 2222 on 127.0.0.1 failed: Address already in use.\n\
                   fatal: Cannot bind any address.";
        assert_eq!(bind_failure(log), Some(2222));
        assert_eq!(bind_failure("Server listening on 127.0.0.1 port 22."), None);
        assert_eq!(bind_failure("bind: Address already in use"), Some(0));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let seq: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seq, vec![200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), BACKOFF_INITIAL);
    }

    #[test]
    fn wildcards_are_probed_on_loopback() {
        assert_eq!(probe_target("0.0.0.0:22".parse().unwrap()), "127.0.0.1:22".parse().unwrap());
        assert_eq!(probe_target("[::]:22".parse().unwrap()), "[::1]:22".parse().unwrap());
        assert_eq!(probe_target("10.1.2.3:22".parse().unwrap()), "10.1.2.3:22".parse().unwrap());
    }

    #[test]
    fn pid_file_option_quotes_when_needed() {
        assert_eq!(pid_file_option(Path::new("/a/sshd.pid")), "PidFile=/a/sshd.pid");
        assert_eq!(pid_file_option(Path::new("/a b/sshd.pid")), "PidFile=\"/a b/sshd.pid\"");
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = SshdError::NotInstalled { path: "/usr/sbin/sshd".into() };
        assert!(e.to_string().contains("apt-get install openssh-server"), "{e}");
        let e = SshdError::PortInUse { port: 2222 };
        assert!(e.to_string().contains("2222"), "{e}");
    }
}
