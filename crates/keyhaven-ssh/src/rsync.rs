//! Running the real `rsync` for a task (or `ssh`, to check its remote path): as the task's OS account (uid, gid
//! and supplementary groups, through util-linux's `setpriv`), in its own
//! process group, killed with keyhaven if keyhaven dies (parent-death
//! signal), with its progress and output streamed to the caller.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;

use keyhaven_core::rsync::{parse_progress, Progress};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

/// Where `setpriv` is (Debian's util-linux, an essential package).
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// How many of the last output lines a failure reports.
pub const TAIL_LINES: usize = 12;

/// Who the run is and what it runs.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub rsync: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub user: String,
    /// rsync's arguments, operands included.
    pub args: Vec<OsString>,
    /// Keep ordinary output lines (a task's `quiet` turns this off; errors are always kept).
    pub keep_output: bool,
}

/// What a run printed, as it happens.
#[derive(Debug, Clone)]
pub enum RunEvent {
    Progress(Progress),
    /// One line of output (`stderr`: from rsync's or ssh's error stream).
    Line {
        text: String,
        stderr: bool,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// rsync's exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The last lines of its output, errors included, oldest first.
    pub tail: Vec<String>,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("could not start {program}: {source}; install the Debian package `{package}`")]
    Missing { program: String, package: &'static str, source: io::Error },
    #[error("could not start rsync: {0}")]
    Spawn(io::Error),
}

/// A started run: its process group id and its event stream.
pub struct Running {
    pub pid: u32,
    pub events: mpsc::Receiver<RunEvent>,
    done: tokio::task::JoinHandle<io::Result<RunOutcome>>,
}

impl Running {
    /// Wait for the end of the run (drain [`Running::events`] meanwhile).
    pub async fn wait(self) -> io::Result<RunOutcome> {
        self.done.await.map_err(io::Error::other)?
    }
}

/// Start rsync as the account. Events arrive on [`Running::events`]; the
/// run goes on if nobody reads them (progress updates are dropped when the
/// reader is slow, lines are not).
pub async fn start(spec: &RunSpec) -> Result<Running, RunError> {
    let me = crate::uid::effective();
    if me != 0 && spec.uid != me {
        return Err(RunError::Spawn(io::Error::other(format!(
            "keyhaven runs as uid {me} and cannot run as uid {}; run keyhaven as root",
            spec.uid
        ))));
    }
    let mut cmd = std::process::Command::new(SETPRIV);
    if me == 0 {
        cmd.arg(format!("--reuid={}", spec.uid)).arg(format!("--regid={}", spec.gid)).arg("--init-groups");
    }
    // The child dies with us: no rsync is left behind by a killed daemon.
    cmd.arg("--pdeathsig=KILL").arg("--").arg(&spec.rsync).args(&spec.args);
    let cwd = if spec.home.is_dir() { spec.home.as_path() } else { std::path::Path::new("/") };
    cmd.env_clear()
        .env("HOME", &spec.home)
        .env("USER", &spec.user)
        .env("LOGNAME", &spec.user)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = spawn_from_lasting_thread(cmd).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RunError::Missing { program: SETPRIV.into(), package: "util-linux", source: e },
        _ => RunError::Spawn(e),
    })?;
    let pid = child.id();
    let pipes = (|| {
        let out = child.stdout.take().ok_or_else(|| io::Error::other("no stdout"))?;
        let err = child.stderr.take().ok_or_else(|| io::Error::other("no stderr"))?;
        Ok::<_, io::Error>((tokio::process::ChildStdout::from_std(out)?, tokio::process::ChildStderr::from_std(err)?))
    })();
    let (stdout, stderr) = match pipes {
        Ok(p) => p,
        Err(e) => {
            kill(pid);
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            return Err(RunError::Spawn(e));
        }
    };
    let (tx, rx) = mpsc::channel(256);
    let keep = spec.keep_output;
    let done = tokio::spawn(async move {
        let (out_tail, err_tail) = tokio::join!(pump(stdout, false, keep, tx.clone()), pump(stderr, true, true, tx));
        let status = tokio::task::spawn_blocking(move || child.wait()).await.map_err(io::Error::other)??;
        let mut tail = out_tail;
        tail.extend(err_tail);
        let skip = tail.len().saturating_sub(TAIL_LINES);
        use std::os::unix::process::ExitStatusExt;
        Ok(RunOutcome { code: status.code(), signal: status.signal(), tail: tail.split_off(skip) })
    });
    Ok(Running { pid, events: rx, done })
}

type SpawnRequest = (std::process::Command, tokio::sync::oneshot::Sender<io::Result<std::process::Child>>);

/// Start `cmd` from one thread that lives as long as the process. The
/// parent-death signal fires when the *thread* that forked the child ends,
/// and tokio retires its threads (a worker handed to `block_in_place` ends
/// in the blocking pool and exits when idle): forking from such a thread
/// would kill a long backup halfway.
async fn spawn_from_lasting_thread(cmd: std::process::Command) -> io::Result<std::process::Child> {
    static SPAWNER: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<SpawnRequest>>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("keyhaven-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| std::sync::Mutex::new(tx))
    });
    let spawner = spawner.as_ref().ok_or_else(|| io::Error::other("could not start the spawner thread"))?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer.await.map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// Read one stream to its end, splitting on `\r` (progress updates) and
/// `\n`; returns its last lines.
async fn pump(mut r: impl AsyncRead + Unpin, stderr: bool, keep: bool, tx: mpsc::Sender<RunEvent>) -> Vec<String> {
    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut buf = vec![0u8; 16384];
    let mut line = Vec::new();
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\r' || b == b'\n' {
                emit(&mut line, stderr, keep, &tx, &mut tail).await;
            } else if line.len() < 4096 {
                line.push(b);
            }
        }
    }
    emit(&mut line, stderr, keep, &tx, &mut tail).await;
    tail.into()
}

async fn emit(
    line: &mut Vec<u8>,
    stderr: bool,
    keep: bool,
    tx: &mpsc::Sender<RunEvent>,
    tail: &mut std::collections::VecDeque<String>,
) {
    if line.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(line).into_owned();
    line.clear();
    if !stderr {
        if let Some(p) = parse_progress(&text) {
            let _ = tx.try_send(RunEvent::Progress(p));
            return;
        }
    }
    if !keep {
        return;
    }
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(text.clone());
    let _ = tx.send(RunEvent::Line { text, stderr }).await;
}

/// Stop a run: its whole process group (rsync and the ssh it started).
pub fn kill(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Quote one word for rsync's `-e` command line (which it splits itself,
/// honouring single quotes).
pub fn quote(word: &str) -> String {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-=:@,+".contains(&b)) {
        word.to_string()
    } else {
        // rsync's own splitter: inside single quotes a doubled quote is one quote.
        format!("'{}'", word.replace('\'', "''"))
    }
}
