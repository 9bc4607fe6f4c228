//! Restarting the daemon in place onto a restored state (`config.upload`).
//!
//! The daemon shuts down as on SIGTERM (sshd and rsync runs stopped, the
//! store closed, the data dir lock released), then the binary re-executes
//! itself (`/proc/self/exe`, same arguments and pid, so systemd keeps
//! tracking it). The new process applies the staged restore before opening
//! the store, and starts everything from the restored files — the sshd host
//! keys included. The main listener's socket is handed over across `exec`
//! (`KEYHAVEN_LISTEN_FD`), so the address and port stay the same and clients
//! that connect meanwhile wait in its backlog instead of being refused.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the inherited listener's descriptor.
pub const LISTEN_FD_ENV: &str = "KEYHAVEN_LISTEN_FD";

static PENDING: AtomicBool = AtomicBool::new(false);
static KEPT: Mutex<Option<OwnedFd>> = Mutex::new(None);
static INHERITED: Mutex<Option<std::net::TcpListener>> = Mutex::new(None);

fn notify() -> &'static tokio::sync::Notify {
    static N: OnceLock<tokio::sync::Notify> = OnceLock::new();
    N.get_or_init(tokio::sync::Notify::new)
}

/// Ask the running daemon to shut down and re-execute itself.
pub fn request() {
    PENDING.store(true, Ordering::SeqCst);
    notify().notify_waiters();
    notify().notify_one();
}

/// Whether a restart was asked for (the binary then calls [`exec_self`]).
pub fn pending() -> bool {
    PENDING.load(Ordering::SeqCst)
}

/// Resolves once a restart is asked for.
pub async fn requested() {
    loop {
        let n = notify().notified();
        if pending() {
            return;
        }
        n.await;
    }
}

/// Take over the listener a previous process of this daemon handed over, if
/// any. Call before any thread starts (it edits the environment).
pub fn adopt_inherited_listener() {
    let Some(v) = std::env::var_os(LISTEN_FD_ENV) else { return };
    std::env::remove_var(LISTEN_FD_ENV);
    let Some(fd) = v.to_str().and_then(|s| s.parse::<i32>().ok()).filter(|fd| *fd > 2) else { return };
    // SAFETY: the descriptor was left open across exec by `exec_self` for us
    // alone; it is checked to be a socket below before use, and nothing else
    // in this process knows its number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_socket = rustix::fs::fstat(&owned)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket);
    if !is_socket {
        // Not ours after all: leave the descriptor alone.
        std::mem::forget(owned);
        return;
    }
    // Children (sshd, rsync) must not inherit it.
    let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
    let listener = std::net::TcpListener::from(owned);
    *INHERITED.lock().unwrap_or_else(|p| p.into_inner()) = Some(listener);
}

/// The listener handed over by [`adopt_inherited_listener`], once.
pub fn take_inherited() -> Option<std::net::TcpListener> {
    INHERITED.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Keep a duplicate of the main listener to hand over on restart.
pub fn keep_listener(listener: &impl AsFd) {
    if let Ok(dup) = listener.as_fd().try_clone_to_owned() {
        *KEPT.lock().unwrap_or_else(|p| p.into_inner()) = Some(dup);
    }
}

/// Re-execute this binary with the same arguments, handing over the kept
/// listener. Returns only on failure.
pub fn exec_self() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "keyhaven".into());
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(arg0).args(args);
    if let Some(fd) = KEPT.lock().unwrap_or_else(|p| p.into_inner()).take() {
        if rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::empty()).is_ok() {
            cmd.env(LISTEN_FD_ENV, fd.as_raw_fd().to_string());
            // Left open for the new program.
            std::mem::forget(fd);
        }
    }
    cmd.exec()
}
