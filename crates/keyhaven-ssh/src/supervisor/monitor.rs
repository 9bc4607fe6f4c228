//! The monitor task: owns the sshd child, restarts it with backoff, stops it.

use super::*;

pub(super) struct Launched {
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) addrs: Vec<SocketAddr>,
}

/// Exponential backoff: 0.2 s, 0.4 s, 0.8 s … capped at 10 s.
pub(super) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff { next: BACKOFF_INITIAL }
    }

    pub(super) fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }
}

pub(super) async fn monitor(shared: Arc<Shared>, first: Launched, mut rx: mpsc::UnboundedReceiver<Cmd>) {
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
            st.down_since.get_or_insert_with(Instant::now);
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
            st.restarts_total += 1;
            st.down_since = None;
        }
        tracing::info!(pid, "sshd restarted");
    }
}

pub(super) fn mark_stopped(shared: &Shared) {
    let mut st = shared.status();
    st.pid = None;
    st.addrs.clear();
}

/// SIGTERM, wait up to `STOP_TIMEOUT`, then SIGKILL. `child` is not yet reaped,
/// so `pid` is still ours.
pub(super) async fn terminate(paths: &SshdPaths, child: &mut Child, pid: u32) {
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

pub(super) fn signal(pid: u32, sig: Signal) {
    // Only a positive PID of our own child, not yet reaped: never a group or -1.
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else { return };
    let _ = rustix::process::kill_process(pid, sig);
}

pub(super) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        format!("killed by signal {sig}")
    } else {
        status.to_string()
    }
}
