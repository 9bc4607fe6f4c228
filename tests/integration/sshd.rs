//! Accounts, authorized keys and the supervised OpenSSH sshd (issue 4), with a
//! real sshd on a free loopback port and real `ssh` logins.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// A port for a server (sshd) that is free on the wildcard addresses now.
/// Picked below the kernel's ephemeral range (32768 and up by default), so
/// the many client connections other tests open meanwhile cannot take it.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let mut r = [0u8; 2];
        getrandom(&mut r);
        let port = 20000 + u16::from_le_bytes(r) % 12000;
        let v4 = std::net::TcpListener::bind(("0.0.0.0", port)).is_ok();
        let v6 =
            std::net::TcpListener::bind(("::", port)).is_ok() || !std::path::Path::new("/proc/net/if_inet6").exists();
        if v4 && v6 {
            return port;
        }
    }
    panic!("no free port found between 20000 and 32000");
}

pub fn sshd_available() -> bool {
    Path::new("/usr/sbin/sshd").exists() && crate::util::euid() == 0
}

/// Wait for a job and return its entry.
pub async fn wait_job(c: &mut Client, id: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = c.call("core.get_jobs", json!([[["id", "=", id]], {"get": true}])).await;
        if j["state"] != "RUNNING" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Configure the SSH service on a free port and start it; returns the port.
pub async fn start_ssh(c: &mut Client) -> u16 {
    let port = free_port();
    c.call("ssh.update", json!([{"tcpport": port}])).await;
    let job = c.call("service.control", json!(["START", "ssh"])).await;
    let j = wait_job(c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "start failed: {j}");
    let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
    assert_eq!(s["state"], "RUNNING", "{s}");
    port
}

/// known_hosts built from `ssh.config`'s host keys (never trust on first use).
pub async fn known_hosts(c: &mut Client, dir: &Path, port: u16) -> PathBuf {
    let cfg = c.call("ssh.config", json!([])).await;
    let lines: Vec<String> = cfg["host_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("[127.0.0.1]:{port} {}", k["public_key"].as_str().unwrap()))
        .collect();
    assert_eq!(lines.len(), 3, "ed25519, ecdsa and rsa host keys");
    let p = dir.join("known_hosts");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

/// Write a private key file (0600) for `ssh -i`.
pub fn key_file(dir: &Path, name: &str, private: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, private).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

pub fn ssh_key_login(key: &Path, kh: &Path, port: u16, user: &str) -> std::process::Output {
    Command::new("ssh")
        .args(["-i"])
        .arg(key)
        .args([
            "-p",
            &port.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["-o", "ConnectTimeout=10", "-o", "PasswordAuthentication=no"])
        .arg(format!("{user}@127.0.0.1"))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ssh_password_login(dir: &Path, kh: &Path, port: u16, user: &str, password: &str) -> std::process::Output {
    let askpass = dir.join(format!("askpass-{user}"));
    std::fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).unwrap();
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
    Command::new("ssh")
        .args(["-p", &port.to_string(), "-o", "StrictHostKeyChecking=yes", "-o", "PubkeyAuthentication=no"])
        .args(["-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "NumberOfPasswordPrompts=1"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .arg(format!("{user}@127.0.0.1"))
        .arg("true")
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .env("DISPLAY", ":0")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

async fn root_id(c: &mut Client) -> Value {
    c.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await["id"].clone()
}

#[tokio::test]
async fn generated_key_on_root_logs_in_and_removal_locks_out() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let e = c.call("keychaincredential.create", json!([{"name": "root-login", "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"], "public_key": kp["public_key"]}}])).await;
    let rid = root_id(&mut c).await;
    let port = start_ssh(&mut c).await;
    let work = TestDir::new("ssh-work");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut c, work.path(), port).await;
    let priv_text = c.call("keychaincredential.get_instance", json!([e["id"]])).await["attributes"]["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let key = key_file(work.path(), "id", &priv_text);

    // Not yet authorized.
    assert!(!ssh_key_login(&key, &kh, port, "root").status.success());
    // Authorize: effective for the next login, no restart.
    let pid_before = c.call("service.query", json!([[], {"get": true}])).await["pids"].clone();
    let r = c.call("user.update", json!([rid, {"sshpubkey": e["attributes"]["public_key"]}])).await;
    assert!(r["sshpubkey"].as_str().unwrap().starts_with("ssh-ed25519 "));
    let f = d.dir.path().join("sshd/authorized_keys/root");
    let m = std::fs::metadata(&f).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid()), (0o644, 0), "root-owned 0644");
    let o = ssh_key_login(&key, &kh, port, "root");
    assert!(o.status.success(), "ssh failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(c.call("service.query", json!([[], {"get": true}])).await["pids"], pid_before, "sshd was not restarted");
    // Remove the key: the same login fails.
    c.call("user.update", json!([rid, {"sshpubkey": ""}])).await;
    assert!(!f.exists());
    assert!(!ssh_key_login(&key, &kh, port, "root").status.success(), "login still works after the key was removed");

    // ssh.config reports the host keys with fingerprints equal to ssh-keygen -l of the files.
    let cfg = c.call("ssh.config", json!([])).await;
    for k in cfg["host_keys"].as_array().unwrap() {
        let stem = match k["type"].as_str().unwrap() {
            "ssh-ed25519" => "ed25519",
            "ssh-rsa" => "rsa",
            _ => "ecdsa",
        };
        let out = Command::new("ssh-keygen")
            .args(["-l", "-f"])
            .arg(d.dir.path().join(format!("sshd/ssh_host_{stem}_key.pub")))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(k["fingerprint"].as_str().unwrap()));
    }
    // Host private keys are never returned, and are sealed in the DB.
    assert!(cfg["host_ed25519_key"].is_null() && cfg["host_ed25519_key_pub"].is_string());
}

#[tokio::test]
async fn bad_options_are_refused_and_sshd_keeps_serving_and_restarts_after_a_crash() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let cfg_path = d.dir.path().join("sshd/sshd_config");
    let before = std::fs::read_to_string(&cfg_path).unwrap();
    let e = c.err("ssh.update", json!([{"options": "NoSuchOption yes"}])).await;
    assert_field(&e, "ssh_update.options", "NoSuchOption");
    assert_eq!(std::fs::read_to_string(&cfg_path).unwrap(), before, "sshd_config changed");
    assert_eq!(c.call("ssh.config", json!([])).await["options"], "", "refused options were saved");
    let banner = |port: u16| {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        b
    };
    assert_eq!(&banner(port), b"SSH-2.0-");

    // A good auxiliary parameter is applied.
    c.call("ssh.update", json!([{"options": "MaxAuthTries 4"}])).await;
    assert!(std::fs::read_to_string(&cfg_path).unwrap().contains("MaxAuthTries 4"));

    // Kill sshd: keyhaven restarts it.
    let pid = c.call("service.query", json!([[], {"get": true}])).await["pids"][0].as_i64().unwrap();
    crate::util::signal(pid as u32, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = c.call("service.query", json!([[], {"get": true}])).await;
        if s["state"] == "RUNNING" && s["pids"][0].as_i64() != Some(pid) && s["pids"][0].is_i64() {
            break;
        }
        assert!(Instant::now() < deadline, "sshd was not restarted: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(&banner(port), b"SSH-2.0-");

    // A port already in use is a field error on tcpport.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let e = c.err("ssh.update", json!([{"tcpport": busy_port}])).await;
    assert_field(&e, "ssh_update.tcpport", "already in use");

    // STOP: port closed, state STOPPED; the daemon's shutdown stops sshd too.
    let j = c.call("service.control", json!(["STOP", "ssh"])).await;
    assert_eq!(wait_job(&mut c, &j).await["state"], "SUCCESS");
    assert_eq!(c.call("service.query", json!([[], {"get": true}])).await["state"], "STOPPED");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test]
async fn enabled_service_starts_with_keyhaven_and_stops_with_it() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let dir = Arc::new(TestDir::new("svc"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    let port = free_port();
    c.call("ssh.update", json!([{"tcpport": port}])).await;
    let s = c.call("service.update", json!(["ssh", {"enable": true}])).await;
    assert_eq!(s["enable"], true);
    assert_eq!(s["state"], "STOPPED");
    d.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.call("service.query", json!([[], {"get": true}])).await["state"] != "RUNNING" {
        assert!(Instant::now() < deadline, "enabled sshd did not start with keyhaven");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = c.call("service.query", json!([[], {"get": true}])).await["pids"][0].as_i64().unwrap();
    drop(c);
    let mut d = d;
    d.stop();
    std::thread::sleep(Duration::from_millis(200));
    assert!(crate::util::signal(pid as u32, 0) != 0, "sshd survived keyhaven's shutdown");
}

/// OS accounts created by a test, removed again even if it fails.
struct OsUsers(Vec<String>);
impl Drop for OsUsers {
    fn drop(&mut self) {
        for u in &self.0 {
            let _ = Command::new("userdel").args(["-r", u]).stderr(Stdio::null()).status();
        }
    }
}

fn unique_user(prefix: &str) -> String {
    let mut r = [0u8; 3];
    getrandom(&mut r);
    format!("{prefix}{}", hex(&r))
}

#[tokio::test]
async fn password_login_only_for_enabled_accounts_and_groups() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let cfg = TestDir::new("mcfg");
    std::fs::create_dir_all(cfg.path()).unwrap();
    let cfg_file = cfg.path().join("k.toml");
    std::fs::write(&cfg_file, "[accounts]\nmanage_os = true\n").unwrap();
    let d = Daemon::start_in(
        Arc::new(TestDir::new("pw")),
        DaemonOpts { args: vec!["--config".into(), cfg_file.display().to_string()], ..Default::default() },
    );
    let mut c = d.admin().await;
    let (u1, u2) = (unique_user("khpw"), unique_user("khno"));
    let _guard = OsUsers(vec![u1.clone(), u2.clone()]);
    let pw = "Sup3r-secret-pw";
    let a = c
        .call(
            "user.create",
            json!([{"username": u1, "full_name": "Pw User", "password": pw, "ssh_password_enabled": true}]),
        )
        .await;
    assert!(Command::new("id").arg(&u1).status().unwrap().success(), "OS account created");
    assert_eq!(
        a["uid"].as_i64(),
        Some(
            String::from_utf8(Command::new("id").args(["-u", &u1]).output().unwrap().stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        )
    );
    c.call("user.create", json!([{"username": u2, "full_name": "No Pw", "password": pw}])).await;
    c.call("ssh.update", json!([{"passwordauth": true}])).await;
    let port = start_ssh(&mut c).await;
    let work = TestDir::new("pwwork");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut c, work.path(), port).await;
    let o = ssh_password_login(work.path(), &kh, port, &u1, pw);
    assert!(o.status.success(), "password login for an enabled account failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(!ssh_password_login(work.path(), &kh, port, &u1, "wrong").status.success());
    assert!(
        !ssh_password_login(work.path(), &kh, port, &u2, pw).status.success(),
        "password login allowed for a disabled account"
    );
    // Allowed through its group (useradd made a group named after the user).
    c.call("ssh.update", json!([{"password_login_groups": [u2]}])).await;
    let o = ssh_password_login(work.path(), &kh, port, &u2, pw);
    assert!(o.status.success(), "group password login failed: {}", String::from_utf8_lossy(&o.stderr));
    // The master switch off: nobody.
    c.call("ssh.update", json!([{"passwordauth": false}])).await;
    assert!(!ssh_password_login(work.path(), &kh, port, &u1, pw).status.success());

    // Deleting the accounts removes the OS accounts.
    for u in [&u1, &u2] {
        let id = c.call("user.query", json!([[["username", "=", u]], {"get": true}])).await["id"].clone();
        c.call("user.delete", json!([id])).await;
        assert!(Command::new("id").arg(u).stderr(Stdio::null()).output().unwrap().stdout.is_empty());
    }
}

#[tokio::test]
async fn home_location_writes_dot_ssh_as_truenas_does() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start_in(
        Arc::new(TestDir::new("home")),
        DaemonOpts {
            env: vec![
                ("KEYHAVEN_ACCOUNTS_MANAGE_OS".into(), "true".into()),
                ("KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION".into(), "home".into()),
            ],
            ..Default::default()
        },
    );
    let mut c = d.admin().await;
    let u = unique_user("khhome");
    let _guard = OsUsers(vec![u.clone()]);
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([{"key_type": "ECDSA"}])).await;
    let e = c.call("user.create", json!([{"username": u, "full_name": "", "password_disabled": true, "sshpubkey": kp["public_key"], "shell": "/bin/sh"}])).await;
    let home = PathBuf::from(e["home"].as_str().unwrap());
    let f = home.join(".ssh/authorized_keys");
    let m = std::fs::metadata(&f).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(home.join(".ssh")).unwrap().mode() & 0o777, 0o700);
    assert_eq!(m.uid() as i64, e["uid"].as_i64().unwrap());
    let port = start_ssh(&mut c).await;
    let work = TestDir::new("homework");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut c, work.path(), port).await;
    let key = key_file(work.path(), "id", kp["private_key"].as_str().unwrap());
    let o = ssh_key_login(&key, &kh, port, &u);
    assert!(o.status.success(), "key login via ~/.ssh failed: {}", String::from_utf8_lossy(&o.stderr));

    // A create that fails at its last step (the keys file: ~/.ssh is a symlink)
    // leaves no account behind, neither the record nor the OS account.
    let u2 = unique_user("khrollback");
    let _guard2 = OsUsers(vec![u2.clone()]);
    let home2 = work.path().join(&u2);
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir_all(&home2).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, home2.join(".ssh")).unwrap();
    let e = c
        .err(
            "user.create",
            json!([{"username": u2, "full_name": "", "password_disabled": true, "home": home2,
                    "sshpubkey": kp["public_key"], "shell": "/bin/sh"}]),
        )
        .await;
    assert_call_error(&e, "EACCES", "is a symbolic link; keyhaven does not follow it");
    assert_eq!(c.call("user.query", json!([[["username", "=", u2]], {"count": true}])).await, 0);
    let id = Command::new("id").arg(&u2).stderr(Stdio::null()).output().unwrap();
    assert!(!id.status.success(), "the OS account made for the failed create is still there");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "keyhaven wrote through the symlink");
}

#[tokio::test]
async fn readonly_admin_cannot_write_and_sees_redacted_credentials() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    // `daemon` exists on every Debian system: no OS account needs creating.
    a.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "ro", "password": "ro-password-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    a.call(
        "keychaincredential.create",
        json!([{"name": "secret", "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"]}}]),
    )
    .await;
    let mut ro = d.client().await;
    ro.login("daemon", "ro-password-1").await;
    let methods = ro.call("core.get_methods", json!([])).await;
    let mut writes = 0;
    for (name, m) in methods.as_object().unwrap() {
        if m["access"] == "WRITE" {
            writes += 1;
            let e = ro.err(name, json!([])).await;
            assert_eq!(e["code"], -32001, "{name}: {e}");
            assert_eq!(e["data"]["errname"], "EACCES", "{name}: {e}");
            assert!(e["data"]["reason"].as_str().unwrap().contains("Not authorized"), "{name}");
        }
    }
    assert!(writes >= 12, "only {writes} write methods found");
    let q = ro.call("keychaincredential.query", json!([])).await;
    assert_eq!(q[0]["attributes"], "********");
    assert!(!q.to_string().contains("PRIVATE KEY"));
    assert_eq!(ro.call("keychaincredential.get_instance", json!([q[0]["id"]])).await["attributes"], "********");
    // Reads still work.
    assert_eq!(ro.call("ssh.config", json!([])).await["id"], 1);
    // Neither `select` nor filters reach redacted attributes.
    let sel =
        ro.call("keychaincredential.query", json!([[], {"select": [["attributes.public_key", "k"], "id"]}])).await;
    assert!(sel[0]["k"].is_null() && !sel.to_string().contains("ssh-ed25519"), "{sel}");
    let oracle =
        ro.call("keychaincredential.query", json!([[["attributes.public_key", "^", "ssh-"]], {"count": true}])).await;
    assert_eq!(oracle, 0);
    // Locking the account ends its open session at the next call.
    let uid = a.call("user.query", json!([[["username", "=", "daemon"]], {"get": true}])).await["id"].clone();
    a.call("user.update", json!([uid, {"locked": true}])).await;
    assert_eq!(ro.err("ssh.config", json!([])).await["data"]["error"], 207);
}

#[tokio::test]
async fn two_factor_login() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let e = a.call("user.renew_2fa_secret", json!(["admin", {}])).await;
    assert_eq!(e["twofactor_auth_configured"], true);
    let uri = e["provisioning_uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("otpauth://totp/"));
    let (secret, totp) = totp_from_uri(&uri);
    // The URI is not shown again.
    let q = a.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await;
    assert!(!q.to_string().contains(&secret));

    let mut c = d.client().await;
    let r = c
        .call(
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": ADMIN_PASSWORD}]),
        )
        .await;
    assert_eq!(r, json!({"response_type": "OTP_REQUIRED", "username": "admin"}));
    assert_eq!(c.err("auth.me", json!([])).await["data"]["error"], 207, "not logged in before the OTP");
    let r = c.call("auth.login_ex", json!([{"mechanism": "OTP_TOKEN", "otp_token": "000000"}])).await;
    assert_eq!(r["response_type"], "OTP_REQUIRED", "a wrong OTP asks again");
    let code = totp.generate_current().to_string();
    let r = c.call("auth.login_ex", json!([{"mechanism": "OTP_TOKEN", "otp_token": code}])).await;
    assert_eq!(r["response_type"], "SUCCESS", "{r}");
    // A code is accepted once (RFC 6238 §5.2): replayed on another connection it is refused.
    let mut replay = d.client().await;
    let r = replay
        .call(
            "auth.login_ex",
            json!([{"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": ADMIN_PASSWORD}]),
        )
        .await;
    assert_eq!(r["response_type"], "OTP_REQUIRED");
    let r = replay.call("auth.login_ex", json!([{"mechanism": "OTP_TOKEN", "otp_token": code}])).await;
    assert_eq!(r["response_type"], "OTP_REQUIRED", "a used code was accepted again");
    // auth.login(username, password, otp_token), with the next step's code (within the ±1 step window).
    let mut c2 = d.client().await;
    assert_eq!(c2.call("auth.login", json!(["admin", ADMIN_PASSWORD])).await, false, "OTP required");
    let next = totp.generate(totp_now() + 30).to_string();
    assert_eq!(c2.call("auth.login", json!(["admin", ADMIN_PASSWORD, next.clone()])).await, true);
    let mut c4 = d.client().await;
    assert_eq!(c4.call("auth.login", json!(["admin", ADMIN_PASSWORD, next])).await, false, "replayed");
    // Disabled again: the password alone works.
    a.call("user.unset_2fa_secret", json!(["admin"])).await;
    let mut c3 = d.client().await;
    c3.login("admin", ADMIN_PASSWORD).await;
    // The seed never reached the DB in plaintext.
    let mut dd = d;
    dd.stop();
    for (p, bytes) in all_bytes_under(dd.dir.path()) {
        assert!(!contains(&bytes, secret.as_bytes()), "{} holds the TOTP seed", p.display());
    }
}

#[tokio::test]
async fn accounts_ssh_and_service_reject_bad_input() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let rid = root_id(&mut a).await;
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let users_before = a.call("user.query", json!([])).await;
    let ssh_before = a.call("ssh.config", json!([])).await;
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("user.update", json!([rid, {"sshpubkey": kp["private_key"]}]), "user_update.sshpubkey", "private key"),
        (
            "user.update",
            json!([rid, {"sshpubkey": format!("# keys\n{}\nssh-ed25519 AAAAnotbase64", kp["public_key"].as_str().unwrap().trim())}]),
            "user_update.sshpubkey",
            "Line 3",
        ),
        ("user.update", json!([rid, {"sshpubkey": "ssh-foo AAAA"}]), "user_update.sshpubkey", "Line 1"),
        (
            "user.update",
            json!([rid, {"sshpubkey": format!("bogus-option {}", kp["public_key"].as_str().unwrap())}]),
            "user_update.sshpubkey",
            "Line 1",
        ),
        ("user.update", json!([rid, {"sshpubkey": 5}]), "user_update.sshpubkey", "valid string"),
        ("user.update", json!([rid, {"nope": 1}]), "user_update.nope", "Extra inputs"),
        ("user.update", json!([rid, {"roles": ["READONLY_ADMIN"]}]), "user_update.roles", "built-in"),
        ("user.update", json!([rid, {"roles": ["GOD"]}]), "user_update.roles.0", "FULL_ADMIN"),
        ("user.update", json!([rid, {"shell": "bash"}]), "user_update.shell", "absolute"),
        ("user.update", json!([999999, {"full_name": "x"}]), "", "does not exist"),
        ("user.update", json!(["1", {}]), "user_update.id", "valid integer"),
        ("user.create", json!([{"username": "Bad Name", "password": "x"}]), "user_create.username", "lowercase"),
        ("user.create", json!([{"username": "admin", "password": "x"}]), "user_create.username", "already exists"),
        (
            "user.create",
            json!([{"username": "nosuchosaccount", "password": "x"}]),
            "user_create.username",
            "no OS account",
        ),
        ("user.create", json!([{"username": "daemon"}]), "user_create.password", "required"),
        ("user.create", json!([{}]), "user_create.username", "Field required"),
        ("user.delete", json!([999999]), "", "does not exist"),
        ("ssh.update", json!([{"tcpport": 0}]), "ssh_update.tcpport", "between 1 and 65535"),
        ("ssh.update", json!([{"tcpport": 70000}]), "ssh_update.tcpport", "between 1 and 65535"),
        ("ssh.update", json!([{"tcpport": "22"}]), "ssh_update.tcpport", "valid integer"),
        (
            "ssh.update",
            json!([{"bindiface": ["nosuchif0"]}]),
            "ssh_update.bindiface",
            "The following interfaces are not valid: nosuchif0",
        ),
        ("ssh.update", json!([{"sftp_log_level": "LOUD"}]), "ssh_update.sftp_log_level", ""),
        ("ssh.update", json!([{"weak_ciphers": ["RC4"]}]), "ssh_update.weak_ciphers", ""),
        ("ssh.update", json!([{"options": "HostKey /etc/shadow"}]), "ssh_update.options", "HostKey"),
        ("ssh.update", json!([{"rootlogin": true}]), "ssh_update.rootlogin", "Extra inputs"),
        ("ssh.update", json!([{"passwordauth": "yes"}]), "ssh_update.passwordauth", "valid boolean"),
        ("service.control", json!(["FLY", "ssh"]), "service_control.verb", "START"),
        ("service.control", json!(["START", "nfs"]), "service_control.service", "does not exist"),
        ("service.update", json!(["ssh", {"enable": "yes"}]), "service_update.enable", "valid boolean"),
        ("service.update", json!(["ssh", {"enable": true, "x": 1}]), "service_update.x", "Extra inputs"),
        ("user.renew_2fa_secret", json!(["ghost"]), "user_renew_2fa_secret.username", "does not exist"),
    ];
    for (m, p, attr, msg) in cases {
        let e = a.err(m, p.clone()).await;
        let ex = extra(&e);
        assert!(
            ex.iter().any(|(at, mm)| at.starts_with(attr) && mm.contains(msg)),
            "{m} {}: expected [{attr}] ~ {msg:?}, got {ex:?}",
            p.to_string().chars().take(120).collect::<String>()
        );
    }
    // The private-key message tells what to do and leaks no key material.
    let e = a.err("user.update", json!([rid, {"sshpubkey": kp["private_key"]}])).await;
    let msg = e["data"]["extra"][0][1].as_str().unwrap();
    assert!(msg.contains(".pub"), "{msg}");
    let body = kp["private_key"].as_str().unwrap().lines().nth(1).unwrap();
    assert!(!e.to_string().contains(body));
    // Above the 256 KiB cap (only reachable through the local socket: the
    // WebSocket's 64 KiB message cap comes first).
    let reply = {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(d.dir.path().join("keyhaven.sock")).unwrap();
        let req = json!({"jsonrpc": "2.0", "id": 1, "method": "user.update", "params": [rid, {"sshpubkey": "x".repeat(300 * 1024)}]});
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    };
    assert_field(&reply["error"], "user_update.sshpubkey", "limited to 262144 bytes");
    // Builtin accounts cannot be deleted (EPERM).
    let e = a.err("user.delete", json!([rid])).await;
    assert_call_error(&e, "EPERM", "built-in");
    // Nothing changed.
    assert_eq!(a.call("user.query", json!([])).await, users_before);
    assert_eq!(a.call("ssh.config", json!([])).await, ssh_before);
    assert_eq!(a.call("service.query", json!([[], {"get": true}])).await["enable"], false);
}

fn totp_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A new OS account (`prefix-…`, with `shell`) that a new key pair logs in
/// to through keyhaven's sshd on `port`, and the SSH connection `name` to it
/// (host keys pinned from a scan): (account, key pair entry, connection entry).
pub async fn account_and_connection(
    c: &mut Client,
    port: u16,
    prefix: &str,
    shell: &str,
    name: &str,
) -> (OsUserGuard, Value, Value) {
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let kp = c
        .call(
            "keychaincredential.create",
            json!([{"name": format!("{name}-key"), "type": "SSH_KEY_PAIR",
                    "attributes": {"private_key": kp["private_key"], "public_key": kp["public_key"]}}]),
        )
        .await;
    let acct = OsUserGuard::new(prefix);
    acct.useradd(shell, None);
    c.call(
        "user.create",
        json!([{"username": acct.name, "full_name": "", "password_disabled": true,
                "sshpubkey": kp["attributes"]["public_key"]}]),
    )
    .await;
    let host_keys =
        c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": port}])).await;
    let conn = c
        .call(
            "keychaincredential.create",
            json!([{"name": name, "type": "SSH_CREDENTIALS", "attributes": {
                "host": "127.0.0.1", "port": port, "username": acct.name, "private_key": kp["id"],
                "remote_host_key": host_keys, "connect_timeout": 7}}]),
        )
        .await;
    (acct, kp, conn)
}
