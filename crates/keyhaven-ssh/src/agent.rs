//! A one-run SSH agent: the way an rsync run's `ssh` gets its private key
//! without the key ever touching the disk.
//!
//! The agent is russh's agent server, serving one key from memory on a Unix
//! socket in a fresh 0700 directory owned by the run's account. It accepts
//! connections only from that account (and ours, to load the key), answers
//! only "list keys" and "sign" once the key is loaded (no adding, removing or
//! locking by whoever connects), answers only the run's process group among
//! the account's processes, and is gone, directory, connections and all, when
//! the [`RunAgent`] is dropped.

use std::future::Future;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use russh::keys::agent::server::{Agent, MessageType};
use russh::keys::PrivateKey;
use tokio::net::{UnixListener, UnixStream};

/// Refuses every request but listing and signing once sealed.
#[derive(Clone)]
struct OneKey {
    sealed: Arc<AtomicBool>,
}

impl Agent for OneKey {
    fn confirm_request(&self, msg: MessageType) -> impl Future<Output = bool> + Send {
        let sealed = self.sealed.load(Ordering::SeqCst);
        let allowed = match msg {
            MessageType::RequestKeys | MessageType::Sign => true,
            MessageType::AddKeys => !sealed,
            _ => false,
        };
        std::future::ready(allowed)
    }
}

/// A running agent. Dropping it stops the agent and removes its directory.
pub struct RunAgent {
    dir: PathBuf,
    socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
    /// The run's process group: the account's processes outside it are refused.
    admitted: Arc<AtomicU32>,
    /// Every connection served, to cut when the run ends.
    open: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
}

/// Connections one run may open (its ssh opens one).
const MAX_CONNECTIONS: usize = 8;

impl RunAgent {
    /// Serve `key` for the account `uid`/`gid` from a new directory under
    /// `parent` (which must exist, belong to us and not be writable by others),
    /// with `files` (name, content: the run's known_hosts and public key)
    /// written beside the socket, readable by the account.
    pub async fn start(
        parent: &Path,
        uid: u32,
        gid: u32,
        key: &PrivateKey,
        files: &[(&str, &[u8])],
    ) -> io::Result<RunAgent> {
        let name = format!("agent-{:016x}", rand_u64());
        let dir = parent.join(name);
        // mkdir fails on anything already there, a planted symlink included.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let agent = match write_files(&dir, files) {
            Ok(()) => RunAgent::serve(dir.clone(), uid, gid, key).await,
            Err(e) => Err(e),
        };
        if agent.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        agent
    }

    async fn serve(dir: PathBuf, uid: u32, gid: u32, key: &PrivateKey) -> io::Result<RunAgent> {
        let socket = dir.join("agent.sock");
        // sockaddr_un holds 108 bytes, the terminating NUL included.
        let len = socket.as_os_str().len();
        if len > 107 {
            return Err(io::Error::other(format!(
                "the agent socket path {} is {len} bytes, more than a Unix socket takes (107); use a shorter data_dir",
                socket.display()
            )));
        }
        let listener = UnixListener::bind(&socket)?;
        let me = crate::uid::effective();
        let sealed = Arc::new(AtomicBool::new(false));
        let admitted = Arc::new(AtomicU32::new(0));
        let open: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> = Arc::default();
        let (adm, opn) = (admitted.clone(), open.clone());
        let connections = Box::pin(futures::stream::unfold(listener, move |listener| {
            let (admitted, open) = (adm.clone(), opn.clone());
            async move {
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(e) => return Some((Err(e), listener)),
                    };
                    if !peer_allowed(&stream, uid, me, &admitted).await {
                        continue;
                    }
                    // A clone of each connection, shut down when the run ends: russh
                    // serves each connection on a task of its own, which would
                    // otherwise go on signing for a client that keeps it open.
                    let kept = stream.into_std().and_then(|s| {
                        let clone = s.try_clone()?;
                        Ok((UnixStream::from_std(s)?, clone))
                    });
                    match kept {
                        Ok((stream, clone)) => {
                            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                            if open.len() >= MAX_CONNECTIONS {
                                continue;
                            }
                            open.push(clone);
                            return Some((Ok::<UnixStream, io::Error>(stream), listener));
                        }
                        Err(_) => continue,
                    }
                }
            }
        }));
        let agent = OneKey { sealed: sealed.clone() };
        let task = tokio::spawn(async move {
            if let Err(e) = russh::keys::agent::server::serve(connections, agent).await {
                tracing::debug!("run agent stopped: {e}");
            }
        });
        let out = RunAgent { dir: dir.clone(), socket: socket.clone(), task, admitted, open };
        let mut client = russh::keys::agent::client::AgentClient::connect_uds(&socket)
            .await
            .map_err(|e| io::Error::other(format!("could not reach the run's agent: {e}")))?;
        client
            .add_identity(key, &[])
            .await
            .map_err(|e| io::Error::other(format!("could not load the key into the run's agent: {e}")))?;
        sealed.store(true, Ordering::SeqCst);
        // Only now hand the directory to the account: nothing it can do reaches the key.
        let owner =
            |p: &Path| rustix::fs::chown(p, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)));
        if uid != me {
            owner(&socket).map_err(io::Error::from)?;
            owner(&dir).map_err(io::Error::from)?;
        }
        Ok(out)
    }

    /// Admit the run's process group (rsync and the ssh it starts): until
    /// then, and for any other process of the account, the agent answers nothing.
    pub fn admit_process_group(&self, pgid: u32) {
        self.admitted.store(pgid, Ordering::SeqCst);
    }

    /// The agent's socket (`IdentityAgent` for ssh).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The run's private directory (owned by the account, 0700): for the
    /// run's known_hosts and public key.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RunAgent {
    fn drop(&mut self) {
        self.task.abort();
        for c in self.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Written while the directory is still ours alone, so nothing can be planted
/// in it first; 0644 so the account reads them once it owns the directory.
fn write_files(dir: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for (name, content) in files {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(dir.join(name))?;
        f.write_all(content)?;
    }
    Ok(())
}

/// Our own connections (loading the key) and the run's process group only.
/// A peer of the account may connect a moment before the group is admitted
/// (ssh starts right after rsync), so it is given up to two seconds.
async fn peer_allowed(stream: &UnixStream, uid: u32, me: u32, admitted: &AtomicU32) -> bool {
    let Ok(cred) = stream.peer_cred() else { return false };
    if cred.uid() == me {
        return true;
    }
    if cred.uid() != uid {
        return false;
    }
    let Some(pid) = cred.pid() else { return false };
    for _ in 0..400 {
        let group = admitted.load(Ordering::SeqCst);
        if group != 0 {
            return process_group_of(pid) == Some(group);
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    false
}

/// The process group of `pid` (field 5 of `/proc/PID/stat`).
fn process_group_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(2)?.parse().ok()
}

fn rand_u64() -> u64 {
    use rand::RngCore;
    rand::rngs::OsRng.next_u64()
}
