//! A one-run SSH agent: the way an rsync run's `ssh` gets its private key
//! without the key ever touching the disk.
//!
//! The agent is russh's agent server, serving one key from memory on a Unix
//! socket in a fresh 0700 directory owned by the run's account. It accepts
//! connections only from that account (and ours, to load the key), answers
//! only "list keys" and "sign" once the key is loaded (no adding, removing or
//! locking by whoever connects), and is gone, directory and all, when the
//! [`RunAgent`] is dropped.

use std::future::Future;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

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
        let listener = UnixListener::bind(&socket)?;
        let me = rustix::process::geteuid().as_raw();
        let sealed = Arc::new(AtomicBool::new(false));
        let connections = Box::pin(futures::stream::unfold(listener, move |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if peer_allowed(&stream, uid, me) {
                            return Some((Ok::<UnixStream, io::Error>(stream), listener));
                        }
                    }
                    Err(e) => return Some((Err(e), listener)),
                }
            }
        }));
        let agent = OneKey { sealed: sealed.clone() };
        let task = tokio::spawn(async move {
            if let Err(e) = russh::keys::agent::server::serve(connections, agent).await {
                tracing::debug!("run agent stopped: {e}");
            }
        });
        let out = RunAgent { dir: dir.clone(), socket: socket.clone(), task };
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

fn peer_allowed(stream: &UnixStream, uid: u32, me: u32) -> bool {
    stream.peer_cred().map(|c| c.uid() == uid || c.uid() == me).unwrap_or(false)
}

fn rand_u64() -> u64 {
    use rand::RngCore;
    rand::rngs::OsRng.next_u64()
}
