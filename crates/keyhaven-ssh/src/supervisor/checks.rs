//! Checks and preparation: `sshd -t`, the privilege-separation directory, listen addresses.

use super::*;

/// sshd installed and absolute; `dir` exists; `/run/sshd` exists when root.
pub(super) fn prepare(paths: &SshdPaths) -> Result<(), SshdError> {
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
pub(super) fn ensure_privsep_dir(dir: &Path) -> Result<(), SshdError> {
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
pub(super) async fn run_sshd(
    paths: &SshdPaths,
    args: &[&std::ffi::OsStr],
) -> Result<(ExitStatus, String, String), SshdError> {
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
pub(super) async fn check_file(paths: &SshdPaths, file: &Path) -> Result<(), SshdError> {
    let (status, stdout, stderr) = run_sshd(paths, &["-t".as_ref(), "-f".as_ref(), file.as_os_str()]).await?;
    if status.success() {
        return Ok(());
    }
    Err(SshdError::ConfigRejected { message: sshd_message(&stdout, &stderr, status) })
}

pub(super) fn sshd_message(stdout: &str, stderr: &str, status: ExitStatus) -> String {
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
pub(super) async fn listen_addrs(paths: &SshdPaths, file: &Path) -> Result<Vec<SocketAddr>, SshdError> {
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
pub(super) fn parse_listen_addrs(dump: &str) -> Vec<SocketAddr> {
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
