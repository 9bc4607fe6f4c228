//! Running as a systemd service: readiness through `NOTIFY_SOCKET` (a real
//! unix datagram socket bound here, as systemd binds one) and reloading the
//! config file on SIGHUP. The package test (package.rs) runs the installed unit.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::*;

/// The socket systemd would listen on for a `Type=notify` service.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        NotifySocket { sock, path, _dir: dir }
    }

    /// The next message, waiting at most `patience`.
    pub fn recv(&self, patience: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(patience)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one has the line `line`; all of them, that one last.
    pub fn wait_for(&self, line: &str, patience: Duration) -> Vec<String> {
        let deadline = Instant::now() + patience;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(m) = self.recv(left) else { break };
            let done = m.lines().any(|l| l == line);
            seen.push(m);
            if done {
                return seen;
            }
        }
        panic!("no {line} within {patience:?}; received {seen:?}");
    }
}

/// A free loopback port (bound, then released for the daemon to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A process killed (by PID) and reaped on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ready_is_notified_once_the_port_accepts_connections() {
    let dir = TestDir::new("notify");
    let notify = NotifySocket::bind();
    let port = free_port();
    // Not through Daemon::start_in, which waits for the stdout line: here
    // READY=1 alone says when to connect.
    let child = Command::new(bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("KEYHAVEN_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Spawned(child);
    let seen = notify.wait_for("READY=1", Duration::from_secs(60));
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("READY=1 came before the API port accepted connections");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains(&format!("STATUS=listening on http://127.0.0.1:{port}")), "{seen:?}");

    // SIGTERM: systemd hears STOPPING=1, then the process ends cleanly.
    signal(child.0.id(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "keyhaven did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// SIGHUP, then wait until keyhaven says it is ready again.
fn reload(d: &Daemon, notify: &NotifySocket) {
    signal(d.pid() as u32, libc::SIGHUP);
    let seen = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(seen.iter().any(|m| m.lines().any(|l| l == "RELOADING=1")), "{seen:?}");
}

/// Wait (bounded) until the daemon's stderr, read by another thread, holds `text`.
fn wait_log(d: &Daemon, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.stderr();
        if log.contains(text) {
            return log;
        }
        assert!(Instant::now() < deadline, "no `{text}` in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sighup_applies_the_reloadable_settings_and_names_the_others() {
    let dir = Arc::new(TestDir::new("reload"));
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("keyhaven.toml");
    write_config(&cfg, "log = \"info\"\n");
    let notify = NotifySocket::bind();
    let d = Daemon::start_in(
        dir,
        DaemonOpts {
            listen: "127.0.0.1:0".into(),
            // The file's `log` counts only without KEYHAVEN_LOG (env > file).
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
                ("KEYHAVEN_LOG".into(), String::new()),
            ],
            args: vec!["--config".into(), cfg.display().to_string()],
        },
    );
    notify.wait_for("READY=1", Duration::from_secs(30));
    let nas = "https://nas.example:8443";
    const REFUSED: &str = "refused a WebSocket from a foreign browser origin";
    assert_eq!(ws_with_origin(&d, Some(nas)).await, Err(403));
    wait_log(&d, REFUSED);

    // allowed_origins and log apply at once; limits.login_timeout needs a
    // restart and is named.
    write_config(
        &cfg,
        &format!(
            "log = \"warn\"\nallowed_origins = \"{nas}\"\n[audit]\nretention_days = 30\n[limits]\nlogin_timeout = 45\n"
        ),
    );
    reload(&d, &notify);
    let log = wait_log(&d, "configuration reloaded; applied: log, allowed_origins, audit.retention_days");
    assert!(
        log.contains("setting `limits.login_timeout` changed in the configuration, but applies only at start"),
        "{log}"
    );
    assert_eq!(ws_with_origin(&d, Some(nas)).await, Ok(()));
    d.admin().await;

    // log = "warn": a refused origin (an info line) is no longer logged. The
    // failed reload below writes a warning after it, so once that warning is
    // in, the info line would be too.
    assert_eq!(ws_with_origin(&d, Some("http://evil.example")).await, Err(403));
    write_config(&cfg, "log = [\n");
    reload(&d, &notify);
    let log = wait_log(&d, "reloading the configuration failed, nothing was changed");
    assert!(log.contains("is not valid TOML"), "{log}");
    assert_eq!(log.matches(REFUSED).count(), 1, "{log}");
    // The failed reload changed nothing.
    assert_eq!(ws_with_origin(&d, Some(nas)).await, Ok(()));
}

/// Hostile: a flood of SIGHUPs while the config file is rewritten, half the
/// time into something broken (a script gone wrong, or anyone allowed to
/// signal the daemon). Every reload either applies or changes nothing; the
/// logged-in admin keeps being served, and the last good file wins.
#[tokio::test]
async fn hostile_sighup_flood_while_the_config_changes_keeps_serving_the_admin() {
    let dir = Arc::new(TestDir::new("hupflood"));
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("keyhaven.toml");
    write_config(&cfg, "");
    let d = Daemon::start_in(
        dir,
        DaemonOpts { args: vec!["--config".into(), cfg.display().to_string()], ..Default::default() },
    );
    let mut admin = d.admin().await;
    for i in 0..300 {
        write_config(&cfg, if i % 2 == 0 { "[limits]\nlogin_timeout = 40\n" } else { "allowed_origins = [" });
        assert_eq!(signal(d.pid() as u32, libc::SIGHUP), 0, "keyhaven is gone:\n{}", d.stderr());
    }
    assert_eq!(admin.call("auth.me", serde_json::json!([])).await["pw_name"], "admin");
    let nas = "https://nas.example:8443";
    write_config(&cfg, &format!("allowed_origins = \"{nas}\"\n"));
    signal(d.pid() as u32, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ws_with_origin(&d, Some(nas)).await.is_err() {
        assert!(Instant::now() < deadline, "the last good config was not applied:\n{}", d.stderr());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.admin().await;
}

/// SHA-256 fingerprint (openssl's form) of the certificate served on `addr`.
fn served_fingerprint(addr: std::net::SocketAddr) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername localhost </dev/null 2>/dev/null \
             | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    out.trim().split_once('=').map(|(_, f)| f.to_string()).unwrap_or_else(|| panic!("no certificate served: {out}"))
}

fn file_fingerprint(cert: &Path) -> String {
    let o =
        Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(cert).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().split_once('=').unwrap().1.to_string()
}

#[tokio::test]
async fn sighup_reads_the_tls_certificate_again() {
    let dir = Arc::new(TestDir::new("tlsreload"));
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("keyhaven.toml");
    write_config(&cfg, "tls = true\n");
    let notify = NotifySocket::bind();
    let d = Daemon::start_in(
        dir,
        DaemonOpts {
            env: vec![
                ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
                ("KEYHAVEN_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
            ],
            args: vec!["--config".into(), cfg.display().to_string()],
            ..Default::default()
        },
    );
    notify.wait_for("READY=1", Duration::from_secs(30));
    let self_signed = d.tls_fingerprint();
    let metrics = crate::monitoring::metrics_addr(&d).await;
    let not_after = || async {
        let r = http_on(metrics, None, "GET", "/metrics", &[], None).await;
        let s = crate::monitoring::parse(&r.text());
        crate::monitoring::sample(&s, "keyhaven_tls_certificate_not_after_timestamp_seconds", &[]).unwrap()
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(not_after().await > now + 30.0 * 86400.0, "the self-signed certificate lasts years");
    assert_eq!(served_fingerprint(d.addr), self_signed);

    // A certificate of the admin's own (as after a renewal): served after the reload.
    let (cert, key) = (cfg_dir.path().join("cert.pem"), cfg_dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-subj", "/CN=localhost", "-days", "2", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    write_config(&cfg, &format!("tls = true\ntls_cert = \"{}\"\ntls_key = \"{}\"\n", cert.display(), key.display()));
    reload(&d, &notify);
    let renewed = file_fingerprint(&cert);
    assert_ne!(renewed, self_signed);
    assert_eq!(served_fingerprint(d.addr), renewed);
    // /metrics shows the renewed certificate's end (two days from now).
    let end = not_after().await;
    assert!((end - (now + 2.0 * 86400.0)).abs() < 600.0, "{end} vs {now}");

    // A broken certificate file: the reload says so and the previous one is still served.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    reload(&d, &notify);
    wait_log(&d, "still serving the previous certificate");
    assert_eq!(served_fingerprint(d.addr), renewed);
}
