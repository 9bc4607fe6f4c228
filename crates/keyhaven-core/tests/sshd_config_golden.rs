//! Golden tests for `sshd_config` rendering, and proof that every golden file is
//! a config the real OpenSSH sshd accepts (`sshd -t`).
//!
//! Regenerate the golden files with `KEYHAVEN_UPDATE_GOLDEN=1 cargo test -p
//! keyhaven-core --test sshd_config_golden` and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use keyhaven_core::sshd_config::{render, validate_settings, HostFacts, RenderContext, SshSettings};

const SSHD: &str = "/usr/sbin/sshd";
/// Directory the golden host keys live in; the sshd tests swap it for real keys.
const GOLDEN_KEY_DIR: &str = "/var/lib/keyhaven/sshd";
const KEY_TYPES: &[&str] = &["ed25519", "ecdsa", "rsa"];

/// Host facts for cases without banners or command users: only `root` is
/// uid 0, and any banner file is refused (none of these cases sets one).
struct NoBanners;

impl HostFacts for NoBanners {
    fn is_superuser(&self, account: &str) -> bool {
        account == "root"
    }
    fn banner_problem(&self, _path: &str) -> Option<String> {
        Some("banner files are not checked in the golden tests".into())
    }
}

fn base_ctx() -> RenderContext {
    RenderContext {
        listen_addresses: Vec::new(),
        host_key_paths: KEY_TYPES.iter().map(|t| format!("{GOLDEN_KEY_DIR}/ssh_host_{t}_key")).collect(),
        pid_file: "/run/keyhaven/sshd.pid".into(),
        authorized_keys_file: format!("{GOLDEN_KEY_DIR}/authorized_keys/%u"),
        password_users: Vec::new(),
        root_password_login: false,
        twofactor_ssh: false,
        sftp_server: "internal-sftp".into(),
    }
}

/// (golden name, settings, context)
fn cases() -> Vec<(&'static str, SshSettings, RenderContext)> {
    vec![
        ("default", SshSettings::default(), base_ctx()),
        (
            "truenas_like",
            SshSettings {
                tcpport: 2222,
                bindiface: vec!["eth0".into()],
                password_login_groups: vec!["wheel".into(), "backup".into()],
                passwordauth: true,
                kerberosauth: true,
                tcpfwd: true,
                compression: true,
                sftp_log_level: "DEBUG2".into(),
                sftp_log_facility: "LOCAL3".into(),
                weak_ciphers: vec!["AES128-CBC".into(), "NONE".into()],
                options: String::new(),
            },
            RenderContext {
                listen_addresses: vec!["192.0.2.2".into(), "fe80::fc:ff:fe00:1%eth0".into()],
                authorized_keys_file: ".ssh/authorized_keys".into(),
                password_users: vec!["root".into(), "alice".into()],
                root_password_login: true,
                ..base_ctx()
            },
        ),
        (
            "options_override",
            SshSettings {
                passwordauth: true,
                weak_ciphers: vec!["AES128-CBC".into()],
                options: "ClientAliveInterval 60\nUseDNS yes\nCiphers aes256-gcm@openssh.com,aes128-ctr\n\
                          ChallengeResponseAuthentication yes\nMaxAuthTries 4\n\
                          Match Address 10.0.0.0/8\n\tPermitTTY no\n"
                    .into(),
                ..SshSettings::default()
            },
            RenderContext { password_users: vec!["alice".into()], ..base_ctx() },
        ),
        (
            "twofactor",
            SshSettings {
                passwordauth: true,
                password_login_groups: vec!["staff".into()],
                sftp_log_level: "QUIET".into(),
                sftp_log_facility: "DAEMON".into(),
                ..SshSettings::default()
            },
            RenderContext { password_users: vec!["bob".into()], twofactor_ssh: true, ..base_ctx() },
        ),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("sshd_config.{name}"))
}

#[test]
fn rendered_configs_match_golden_files() {
    let update = std::env::var_os("KEYHAVEN_UPDATE_GOLDEN").is_some();
    for (name, settings, ctx) in cases() {
        let interfaces = vec!["eth0".to_string()];
        validate_settings(&settings, &interfaces, &NoBanners, "ssh_update")
            .unwrap_or_else(|e| panic!("{name}: settings should be valid: {e}"));
        let rendered = render(&settings, &ctx);
        let path = golden_path(name);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set KEYHAVEN_UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(rendered, golden, "{name} differs from {}", path.display());
    }
}

/// A scratch directory with real host keys, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keyhaven-sshd-golden-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for t in KEY_TYPES {
            let key = dir.join(format!("ssh_host_{t}_key"));
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", t, "-N", "", "-f"])
                .arg(&key)
                .status()
                .expect("ssh-keygen runs");
            assert!(status.success(), "ssh-keygen -t {t} failed");
        }
        Scratch { dir }
    }

    /// Write `config` (golden host-key paths swapped for ours) and return its path.
    fn write_config(&self, name: &str, config: &str) -> PathBuf {
        let swapped =
            config.replace(&format!("HostKey {GOLDEN_KEY_DIR}/"), &format!("HostKey {}/", self.dir.display()));
        let path = self.dir.join(name);
        std::fs::write(&path, swapped).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `None` (with a note) when sshd is not installed; otherwise makes sure the
/// privilege-separation directory a root sshd needs exists.
fn sshd_available() -> Option<()> {
    if !Path::new(SSHD).exists() {
        eprintln!("note: {SSHD} is not installed; skipping sshd -t checks");
        return None;
    }
    let run = Path::new("/run/sshd");
    if !run.exists() {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::create_dir_all(run).is_ok() {
            let _ = std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755));
        }
    }
    Some(())
}

fn sshd(args: &[&str], cfg: &Path) -> std::process::Output {
    Command::new(SSHD).args(args).arg("-f").arg(cfg).output().expect("sshd runs")
}

#[test]
fn every_golden_config_passes_sshd_t() {
    if sshd_available().is_none() {
        return;
    }
    let scratch = Scratch::new();
    for (name, _, _) in cases() {
        let golden = std::fs::read_to_string(golden_path(name)).unwrap();
        let cfg = scratch.write_config(name, &golden);
        let out = sshd(&["-t"], &cfg);
        assert!(out.status.success(), "sshd -t rejected {name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "sshd -t warned on {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn bad_option_line_makes_sshd_t_fail() {
    if sshd_available().is_none() {
        return;
    }
    let scratch = Scratch::new();
    let settings = SshSettings { options: "MaxAuthTries 4\nNoSuchOption yes\n".into(), ..SshSettings::default() };
    // Validation leaves unknown keywords to sshd -t.
    validate_settings(&settings, &[], &NoBanners, "ssh_update").unwrap();
    let cfg = scratch.write_config("bad", &render(&settings, &base_ctx()));
    let out = sshd(&["-t"], &cfg);
    assert!(!out.status.success(), "sshd -t accepted a bad option");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NoSuchOption"), "sshd should name the bad option: {stderr}");
}

/// The effective settings (`sshd -T`) show that `options` overrides keyhaven's
/// defaults and that the password `Match` blocks apply only to their users.
#[test]
fn effective_config_honours_options_and_match_blocks() {
    if sshd_available().is_none() {
        return;
    }
    let scratch = Scratch::new();
    let golden = std::fs::read_to_string(golden_path("options_override")).unwrap();
    let cfg = scratch.write_config("effective", &golden);
    let effective = |conn: &str| {
        let out = sshd(&["-T", "-C", conn], &cfg);
        assert!(out.status.success(), "sshd -T: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let has = |dump: &str, line: &str| dump.lines().any(|l| l == line);

    let alice = effective("user=alice,host=client.example,addr=10.1.2.3");
    for line in [
        "passwordauthentication yes",
        "kbdinteractiveauthentication yes",
        "permittty no",
        "clientaliveinterval 60",
        "clientalivecountmax 3",
        "maxauthtries 4",
        "usedns yes",
        "ciphers aes256-gcm@openssh.com,aes128-ctr",
        "permitrootlogin without-password",
        "strictmodes yes",
    ] {
        assert!(has(&alice, line), "alice@10.1.2.3 lacks `{line}`:\n{alice}");
    }

    let bob = effective("user=bob,host=client.example,addr=192.0.2.9");
    for line in ["passwordauthentication no", "permittty yes", "clientaliveinterval 60", "maxauthtries 4"] {
        assert!(has(&bob, line), "bob@192.0.2.9 lacks `{line}`:\n{bob}");
    }
}
