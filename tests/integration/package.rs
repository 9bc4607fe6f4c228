//! The Debian package, end to end on this machine: built from the test's own
//! (debug) binary with scripts/build-deb.sh (cargo-deb), checked by lintian and
//! systemd-analyze, installed with `dpkg -i`, run exactly as its installed unit
//! says (ExecStart, User, UMask, Type=notify, ExecReload; only the port is moved
//! to a free loopback one through KEYHAVEN_LISTEN, since CI has no systemd as PID
//! 1), logged in to, then removed (`dpkg -r` keeps config and data) and purged
//! (`dpkg --purge` removes the config and keeps the data). Root only; the
//! machine is restored (purged) even when the test fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::service::{free_port, NotifySocket};
use crate::util::*;

const DATA_DIR: &str = "/var/lib/keyhaven";
const CONFIG: &str = "/etc/keyhaven/keyhaven.toml";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/keyhaven.service";

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    println!(
        "$ {cmd:?} → {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dpkg ARGS`, waiting (bounded) while another dpkg or apt holds the lock:
/// on a shared machine an apt-get may be running beside the tests.
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = run(Command::new("dpkg").args(args));
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if out.status.success() || !locked || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn dpkg_ok(args: &[&str]) -> String {
    let out = dpkg(args);
    assert!(out.status.success(), "dpkg {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "keyhaven"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "installed")
}

/// Purges the package and removes the data dir it made, however the test ends.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        dpkg(&["--purge", "keyhaven"]);
        let _ = std::fs::remove_dir_all(DATA_DIR);
    }
}

/// The daemon, killed by PID and reaped on drop; stderr collected.
struct Service {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Service {
    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Key=` values in a unit's `[Service]` section, in order.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut values = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            if in_service {
                values.push(v.trim().to_string());
            }
        }
    }
    values
}

fn service_value(unit: &str, key: &str) -> Option<String> {
    service_values(unit, key).pop()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

#[tokio::test]
async fn the_debian_package_installs_runs_reloads_and_is_removed() {
    if euid() != 0 {
        eprintln!("SKIPPED the_debian_package_…: installing a .deb needs root (CI runs the tests as root)");
        return;
    }
    if Command::new("dpkg").arg("--version").output().is_err() {
        eprintln!("SKIPPED the_debian_package_…: no dpkg on this machine (the package is for Debian)");
        return;
    }
    if installed() || Path::new(DATA_DIR).exists() {
        eprintln!("SKIPPED the_debian_package_…: keyhaven is installed on this machine or {DATA_DIR} exists; this test installs and purges the package and would replace them");
        return;
    }

    // Build from the debug binary under test: no release build in `make test`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deb");
    let built = run_ok(
        Command::new("bash")
            .arg(root.join("scripts/build-deb.sh"))
            .args(["--binary", bin(), "--out"])
            .arg(&out_dir)
            .current_dir(root),
    );
    let deb = PathBuf::from(built.lines().last().expect("the script prints the package's path"));
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("keyhaven_") && name.ends_with("_amd64.deb"), "{name}");

    let lintian = run(Command::new("lintian").args(["--tag-display-limit", "0", "--display-info"]).arg(&deb));
    let lint = String::from_utf8_lossy(&lintian.stdout);
    let errors: Vec<&str> = lint.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));

    let _restore = Restore;
    dpkg_ok(&["-i", deb.to_str().unwrap()]);
    assert!(installed());
    let files = dpkg_ok(&["-L", "keyhaven"]);
    for f in [
        "/usr/bin/keyhaven",
        CONFIG,
        "/usr/share/man/man1/keyhaven.1.gz",
        "/usr/share/man/man1/keyhaven-serve.1.gz",
        "/usr/share/bash-completion/completions/keyhaven",
        "/usr/share/zsh/vendor-completions/_keyhaven",
        "/usr/share/fish/vendor_completions.d/keyhaven.fish",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the package:\n{files}");
    }
    let conffiles = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "keyhaven"]));
    assert!(conffiles.contains(CONFIG), "{conffiles}");
    assert_eq!(mode(Path::new(DATA_DIR)), 0o711);
    // Enabled at boot (debhelper's fragment, which works without systemd running too).
    assert!(Path::new(WANTS).exists());
    let size = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Installed-Size}", "keyhaven"]));
    println!("installed size: {size} KiB (debug binary; BENCHMARKS.md has the release package's)");
    // The config file as installed is the generated one and parses.
    let config = std::fs::read_to_string(CONFIG).unwrap();
    assert!(config.contains(&format!("data_dir = \"{DATA_DIR}\"")), "{config}");
    for f in ["listen", "limits.max_connections", "audit.retention_days"] {
        let key = f.rsplit('.').next().unwrap();
        assert!(config.contains(&format!("# {key} = ")), "{f} missing from {CONFIG}");
    }

    let unit_path = files
        .lines()
        .find(|l| l.ends_with("/systemd/system/keyhaven.service"))
        .unwrap_or_else(|| panic!("no keyhaven.service in the package:\n{files}"))
        .to_string();
    let verify = run(Command::new("systemd-analyze").arg("verify").arg(&unit_path));
    assert!(verify.status.success(), "systemd-analyze verify failed");
    let security = run(Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&unit_path));
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for keyhaven.service:"))
        .map(|(_, rest)| rest.trim().to_string())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    println!("systemd-analyze security: {exposure}");
    let score: f64 = exposure.split_whitespace().next().unwrap().parse().unwrap();
    assert!(score < 7.0, "the unit's exposure is {exposure}: hardening was lost");

    // Start it as the unit would.
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert_eq!(service_value(&unit, "Type").as_deref(), Some("notify"));
    let exec = service_value(&unit, "ExecStart").expect("ExecStart");
    let argv: Vec<&str> = exec.trim_start_matches(['-', '@', '+', '!', ':']).split_whitespace().collect();
    assert_eq!(argv[..2], ["/usr/bin/keyhaven", "serve"], "{exec}");
    let user = service_value(&unit, "User").unwrap_or_else(|| "root".into());
    let umask = service_value(&unit, "UMask").unwrap_or_else(|| "0022".into());
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(format!("umask {umask} && exec \"$@\"")).arg("sh");
    if user != "root" {
        cmd.args(["/usr/bin/setpriv", &format!("--reuid={user}"), &format!("--regid={user}"), "--init-groups"]);
    }
    cmd.args(&argv);
    let port = free_port();
    let notify = NotifySocket::bind();
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("KEYHAVEN_LISTEN", format!("127.0.0.1:{port}"))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    {
        let stderr = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let mut service = Service { child, stderr };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(m) = notify.recv(Duration::from_millis(500)) {
            if m.lines().any(|l| l == "READY=1") {
                break;
            }
        }
        if let Some(status) = service.child.try_wait().unwrap() {
            panic!("keyhaven exited ({status}) before READY=1:\n{}", service.log());
        }
        assert!(Instant::now() < deadline, "no READY=1 within 60 s:\n{}", service.log());
    }

    // First login with the generated password, which only the file holds.
    let pw_file = Path::new(DATA_DIR).join("initial-admin-password");
    assert_eq!(mode(&pw_file), 0o600);
    let pw = std::fs::read_to_string(&pw_file).unwrap().trim().to_string();
    let mut c = Client::connect(&format!("ws://127.0.0.1:{port}/api/current")).await;
    c.login("admin", &pw).await;
    assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");
    assert!(mode(&Path::new(DATA_DIR).join("keyhaven.db")) & 0o077 == 0);
    let log = service.log();
    assert!(log.contains(&pw_file.display().to_string()) && !log.contains(&pw), "{log}");

    // ExecReload as the unit has it.
    let reload = service_value(&unit, "ExecReload").expect("ExecReload");
    let reload = reload.replace("$MAINPID", &service.child.id().to_string());
    let reload: Vec<&str> = reload.split_whitespace().collect();
    run_ok(Command::new(reload[0]).args(&reload[1..]));
    notify.wait_for("READY=1", Duration::from_secs(30));
    assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");

    signal(service.child.id(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = service.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "keyhaven did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", service.log());
    drop(service);

    // dpkg -r: the program goes, the configuration and the data stay.
    dpkg_ok(&["-r", "keyhaven"]);
    assert!(!installed());
    assert!(!Path::new("/usr/bin/keyhaven").exists());
    assert!(Path::new(CONFIG).exists());
    assert!(Path::new(DATA_DIR).join("keyhaven.db").exists());
    assert!(Path::new(DATA_DIR).join("master.key").exists());

    // dpkg --purge: the configuration goes; the data (private keys) stays, by design.
    dpkg_ok(&["--purge", "keyhaven"]);
    assert!(!Path::new("/etc/keyhaven").exists());
    assert!(!Path::new(WANTS).exists(), "still enabled after the purge");
    assert!(Path::new(DATA_DIR).join("keyhaven.db").exists());
    assert!(Path::new(DATA_DIR).join("master.key").exists());
    let status = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "keyhaven"]));
    assert!(String::from_utf8_lossy(&status.stdout).trim() != "config-files");
}
