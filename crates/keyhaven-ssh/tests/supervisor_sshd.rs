//! The sshd supervisor against the real OpenSSH sshd (`/usr/sbin/sshd`).
//!
//! Each test gets its own directory under `/var/lib/keyhaven-test/<random>`
//! (a root-owned, non-world-writable path, whatever the checkout location),
//! its own ed25519 host key and a free loopback port. Tests run as root (CI
//! does). They are skipped, with a note, only when sshd is not installed.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keyhaven_ssh::supervisor::{SshdError, SshdPaths, SshdState, Supervisor};
use tokio::io::AsyncReadExt;

const SSHD: &str = "/usr/sbin/sshd";
const BASE: &str = "/var/lib/keyhaven-test";

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A fresh sshd directory with a host key, or `None` (skip) without sshd.
    fn new() -> Option<Fixture> {
        if !Path::new(SSHD).exists() {
            eprintln!("note: skipping: {SSHD} is missing (apt-get install openssh-server)");
            return None;
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(BASE).expect("create test base");
        std::fs::set_permissions(BASE, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = tempfile::Builder::new().prefix("sup-").tempdir_in(BASE).expect("test dir");
        let key = dir.path().join("ssh_host_ed25519_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .expect("run ssh-keygen");
        assert!(st.success(), "ssh-keygen failed");
        Some(Fixture { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn paths(&self) -> SshdPaths {
        SshdPaths::new(SSHD, self.path())
    }

    fn config(&self, port: u16) -> String {
        let d = self.path().display();
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/ssh_host_ed25519_key\nPidFile {d}/sshd.pid\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        )
    }

    /// A supervisor with `config(port)` applied (not started).
    async fn supervisor(&self, port: u16) -> Supervisor {
        let sup = Supervisor::new(self.paths());
        sup.apply_config(&self.config(port)).await.expect("apply a valid config");
        sup
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The first line sshd sends on `port`.
async fn banner(port: u16) -> std::io::Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr(port)).await?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\n") && buf.len() < 256 {
            let n = s.read(&mut byte).await?;
            if n == 0 {
                break;
            }
            buf.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await?
}

async fn assert_banner(port: u16) {
    let b = banner(port).await.unwrap_or_else(|e| panic!("no banner on port {port}: {e}"));
    assert!(b.starts_with("SSH-2.0-OpenSSH"), "unexpected banner {b:?}");
}

async fn assert_closed(port: u16) {
    let r = std::net::TcpStream::connect_timeout(&addr(port), Duration::from_secs(1));
    assert!(r.is_err(), "port {port} still accepts connections");
}

fn process_alive(pid: u32) -> bool {
    // A reaped process is gone; a zombie shows as "Z" in /proc.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn leftover_candidates(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains("candidate"))
        .collect()
}

#[tokio::test]
async fn start_serves_ssh_and_stop_closes_the_port() {
    let Some(fx) = Fixture::new() else { return };
    let port = free_port();
    let sup = fx.supervisor(port).await;
    assert_eq!(sup.state(), SshdState::Stopped);
    assert!(sup.pids().is_empty());

    sup.start().await.expect("start sshd");
    assert_eq!(sup.state(), SshdState::Running);
    let pids = sup.pids();
    assert_eq!(pids.len(), 1);
    let pid = pids[0];
    let pid_file = std::fs::read_to_string(fx.path().join("sshd.pid")).unwrap();
    assert_eq!(pid_file.trim(), pid.to_string());
    assert_banner(port).await;

    // Starting again is a no-op.
    sup.start().await.unwrap();
    assert_eq!(sup.pids(), vec![pid]);

    sup.stop().await.expect("stop");
    assert_eq!(sup.state(), SshdState::Stopped);
    assert!(sup.pids().is_empty());
    assert_closed(port).await;
    assert!(!process_alive(pid), "sshd {pid} still alive after stop");
    assert!(!fx.path().join("sshd.pid").exists());

    // Nothing comes back on its own.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sup.state(), SshdState::Stopped);
    assert!(sup.pids().is_empty());
    assert_closed(port).await;

    // stop is idempotent; reload of a stopped sshd starts it; restart gives a new process.
    sup.stop().await.unwrap();
    sup.reload().await.expect("reload starts a stopped sshd");
    assert_eq!(sup.state(), SshdState::Running);
    assert_banner(port).await;
    let before = sup.pids();
    sup.restart().await.expect("restart");
    assert_eq!(sup.state(), SshdState::Running);
    assert_ne!(sup.pids(), before);
    assert_banner(port).await;
    sup.stop().await.unwrap();
    assert_closed(port).await;
    assert!(std::fs::metadata(fx.path().join("sshd.log")).unwrap().len() > 0);
}

#[tokio::test]
async fn rejected_config_leaves_the_running_sshd_and_file_untouched() {
    let Some(fx) = Fixture::new() else { return };
    let port = free_port();
    let sup = fx.supervisor(port).await;
    sup.start().await.expect("start sshd");
    let pid = sup.pids();
    let config_path = fx.path().join("sshd_config");
    let before = std::fs::read(&config_path).unwrap();

    let bad = format!("{}NoSuchOption yes\n", fx.config(free_port()));
    match sup.check_config(&bad).await {
        Err(SshdError::ConfigRejected { message }) => {
            assert!(message.contains("NoSuchOption"), "message does not name the option: {message}");
            assert_eq!(message, message.trim());
        }
        other => panic!("expected ConfigRejected, got {other:?}"),
    }
    match sup.apply_config(&bad).await {
        Err(e @ SshdError::ConfigRejected { .. }) => {
            assert!(e.to_string().contains("NoSuchOption"), "{e}");
        }
        other => panic!("expected ConfigRejected, got {other:?}"),
    }
    assert_eq!(std::fs::read(&config_path).unwrap(), before, "sshd_config changed");
    assert!(leftover_candidates(fx.path()).is_empty(), "temp files left behind");
    assert_eq!(sup.state(), SshdState::Running);
    assert_eq!(sup.pids(), pid);
    assert_banner(port).await;

    // A good config passes the check without being applied.
    sup.check_config(&fx.config(free_port())).await.expect("valid config");
    assert_eq!(std::fs::read(&config_path).unwrap(), before);
    assert!(leftover_candidates(fx.path()).is_empty());
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn apply_config_with_a_new_port_reloads_sshd() {
    let Some(fx) = Fixture::new() else { return };
    let old_port = free_port();
    let sup = fx.supervisor(old_port).await;
    sup.start().await.expect("start sshd");
    let pid = sup.pids();
    assert_banner(old_port).await;

    let mut new_port = free_port();
    while new_port == old_port {
        new_port = free_port();
    }
    sup.apply_config(&fx.config(new_port)).await.expect("apply new port");
    assert_eq!(sup.state(), SshdState::Running);
    // SIGHUP makes sshd re-exec itself under the same PID.
    assert_eq!(sup.pids(), pid);
    assert_banner(new_port).await;
    assert_closed(old_port).await;
    let written = std::fs::read_to_string(fx.path().join("sshd_config")).unwrap();
    assert!(written.contains(&format!("Port {new_port}")));
    let mode = std::fs::metadata(fx.path().join("sshd_config")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "sshd_config readable by others: {mode:o}");

    // A plain reload keeps serving.
    sup.reload().await.expect("reload");
    assert_eq!(sup.pids(), pid);
    assert_banner(new_port).await;

    // A new port held by another program is refused before anything changes.
    let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap().port();
    match sup.apply_config(&fx.config(taken)).await {
        Err(SshdError::PortInUse { port }) => assert_eq!(port, taken),
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert!(std::fs::read_to_string(fx.path().join("sshd_config")).unwrap().contains(&format!("Port {new_port}")));
    assert_eq!(sup.pids(), pid);
    assert_banner(new_port).await;
    sup.stop().await.unwrap();
}

#[tokio::test]
async fn killed_sshd_is_restarted_with_a_new_pid() {
    let Some(fx) = Fixture::new() else { return };
    let port = free_port();
    let sup = fx.supervisor(port).await;
    sup.start().await.expect("start sshd");
    let old = sup.pids()[0];

    // SAFETY: kill(2) on the PID of the sshd this test started.
    assert_eq!(signal(old, libc::SIGKILL), 0);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_crashed = false;
    loop {
        match sup.state() {
            SshdState::Crashed => saw_crashed = true,
            SshdState::Running if sup.pids().first().is_some_and(|&p| p != old) => break,
            SshdState::Running => {}
            SshdState::Stopped => panic!("supervisor gave up: {:?}", sup.last_error()),
        }
        assert!(Instant::now() < deadline, "sshd not restarted: {:?}", sup.last_error());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_crashed, "state never read Crashed");
    let new = sup.pids()[0];
    assert_ne!(new, old);
    assert_eq!(sup.restart_count(), 1);
    assert_banner(port).await;

    // And again: supervision continues after a restart.
    // SAFETY: as above.
    assert_eq!(signal(new, libc::SIGKILL), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sup.state() == SshdState::Running && sup.pids().first().is_some_and(|&p| p != new)) {
        assert!(Instant::now() < deadline, "sshd not restarted twice: {:?}", sup.last_error());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_banner(port).await;

    sup.stop().await.unwrap();
    assert_eq!(sup.state(), SshdState::Stopped);
    assert_closed(port).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(sup.state(), SshdState::Stopped);
    assert_closed(port).await;
}

#[tokio::test]
async fn start_on_a_port_in_use_is_port_in_use() {
    let Some(fx) = Fixture::new() else { return };
    let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = blocker.local_addr().unwrap().port();
    let sup = fx.supervisor(port).await;
    match sup.start().await {
        Err(e @ SshdError::PortInUse { .. }) => {
            assert!(matches!(e, SshdError::PortInUse { port: p } if p == port));
            assert!(e.to_string().contains(&port.to_string()), "{e}");
        }
        other => panic!("expected PortInUse, got {other:?}"),
    }
    assert_eq!(sup.state(), SshdState::Stopped);
    assert!(sup.pids().is_empty());
    drop(blocker);
}

#[tokio::test]
async fn missing_sshd_binary_is_not_installed() {
    let Some(fx) = Fixture::new() else { return };
    let missing = fx.path().join("no-such-dir/sshd");
    let sup = Supervisor::new(SshdPaths::new(&missing, fx.path()));
    for result in [sup.check_config(&fx.config(free_port())).await, sup.start().await] {
        match result {
            Err(e @ SshdError::NotInstalled { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("openssh-server"), "{msg}");
                assert!(msg.contains("apt-get install openssh-server"), "{msg}");
                assert!(msg.contains(&missing.display().to_string()), "{msg}");
            }
            other => panic!("expected NotInstalled, got {other:?}"),
        }
    }
    assert!(matches!(sup.apply_config(&fx.config(1)).await, Err(SshdError::NotInstalled { .. })));
    assert!(!fx.path().join("sshd_config").exists());
    assert_eq!(sup.state(), SshdState::Stopped);
}

#[tokio::test]
async fn start_without_a_config_says_so() {
    let Some(fx) = Fixture::new() else { return };
    let sup = Supervisor::new(fx.paths());
    match sup.start().await {
        Err(SshdError::Start(msg)) => assert!(msg.contains("sshd_config"), "{msg}"),
        other => panic!("expected Start, got {other:?}"),
    }
    assert_eq!(sup.state(), SshdState::Stopped);
}

#[tokio::test]
async fn dropping_the_supervisor_stops_sshd() {
    let Some(fx) = Fixture::new() else { return };
    let port = free_port();
    let sup = fx.supervisor(port).await;
    sup.start().await.expect("start sshd");
    let pid = sup.pids()[0];
    let clone = sup.clone();
    drop(sup);
    // A clone keeps it running.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(clone.state(), SshdState::Running);
    assert_banner(port).await;
    drop(clone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "sshd {pid} survived the supervisor");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_closed(port).await;
}

/// kill(2) `sig` to a process this test started; the result of the call.
fn signal(pid: u32, sig: i32) -> i32 {
    let Ok(pid) = i32::try_from(pid) else { return -1 };
    if pid <= 0 {
        return -1;
    }
    // SAFETY: a positive PID (never a group or -1) of a process the test started.
    unsafe { libc::kill(pid, sig) }
}
