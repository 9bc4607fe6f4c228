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

mod checks;
mod launch;
mod monitor;
mod runfiles;

use checks::*;
use launch::*;
use monitor::*;
use runfiles::*;

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
    /// Automatic restarts since this supervisor was created (never reset).
    restarts_total: u64,
    /// Since when sshd should be running but is not: it died (and has not
    /// been restarted yet) or a start failed. Cleared once it runs again or
    /// is stopped on purpose.
    down_since: Option<Instant>,
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

    /// Automatic restarts since this supervisor was created: unlike
    /// [`Supervisor::restart_count`], an explicit start does not reset it.
    pub fn restarts_total(&self) -> u64 {
        self.inner.shared.status().restarts_total
    }

    /// How long sshd has been down although it should run (it died and the
    /// automatic restarts have not brought it back yet, or the last start
    /// failed); `None` while it runs or after it was stopped on purpose.
    pub fn down_for(&self) -> Option<Duration> {
        self.inner.shared.status().down_since.map(|t| t.elapsed())
    }

    /// Record that a start asked of the SSH service failed before sshd could
    /// be launched (e.g. its configuration was refused): from now on sshd
    /// counts as down (see [`Supervisor::down_for`]) until it runs or is stopped.
    pub fn start_failed(&self, why: &str) {
        let mut st = self.inner.shared.status();
        if st.pid.is_none() {
            st.last_error = Some(why.to_string());
            st.down_since.get_or_insert_with(Instant::now);
        }
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
                    st.down_since = None;
                }
                let (tx, rx) = mpsc::unbounded_channel();
                let task = tokio::spawn(monitor(Arc::clone(shared), launched, rx));
                *ops = Some(Monitor { tx, task });
                tracing::info!(pid, "sshd started");
                Ok(())
            }
            Err(e) => {
                let mut st = shared.status();
                st.last_error = Some(e.to_string());
                st.down_since.get_or_insert_with(Instant::now);
                drop(st);
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
        st.down_since = None;
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
