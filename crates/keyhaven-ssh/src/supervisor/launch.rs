//! Starting sshd and waiting until it is ready (PID file written, every listen address accepting).

use super::*;

/// Everything a start needs: checks, the spawn, and the readiness wait.
/// On error no sshd is left running.
pub(super) async fn launch(paths: &SshdPaths) -> Result<Launched, SshdError> {
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
        // keyhaven is systemd's main process: Debian's sshd would report its
        // own readiness on the socket meant for keyhaven.
        .env_remove("NOTIFY_SOCKET")
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
pub(super) fn pid_file_option(pid_file: &Path) -> String {
    let p = pid_file.to_string_lossy();
    if p.chars().any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '#') {
        format!("PidFile=\"{}\"", p.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("PidFile={p}")
    }
}

pub(super) async fn kill_child(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

pub(super) enum Ready {
    Listening,
    Exited(String),
    TimedOut,
}

/// Polls until the PID file names `pid` and every address accepts a TCP
/// connection, `exited` reports that the process is gone, or time runs out.
pub(super) async fn wait_ready(
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

pub(super) async fn all_accept(addrs: &[SocketAddr]) -> bool {
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
pub(super) fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port()),
        _ => addr,
    }
}

/// Fails with `PortInUse` when another socket already holds one of `addrs`
/// (bound the way sshd binds: SO_REUSEADDR, IPv6-only for IPv6). Other bind
/// errors (address not local, privileged port) are left for sshd to report.
pub(super) fn ensure_ports_free(addrs: &[SocketAddr]) -> Result<(), SshdError> {
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
pub(super) fn bind_failure(log: &str) -> Option<u16> {
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

pub(super) fn fmt_addrs(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
}

pub(super) fn spawn_error(paths: &SshdPaths, e: io::Error) -> SshdError {
    if e.kind() == io::ErrorKind::NotFound {
        SshdError::NotInstalled { path: paths.sshd.clone() }
    } else {
        SshdError::Start(format!("cannot run {}: {e}", paths.sshd.display()))
    }
}
