//! `keyhaven serve`: first start, restart, startup refusals, TLS, the CLI, shutdown.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

use serde_json::json;

use crate::util::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn first_start_layout_restart_and_clean_shutdown() {
    sqlite_only!("checks keyhaven.db's file mode and WAL files");
    let dir = Arc::new(TestDir::new("first"));
    let mut d = Daemon::start_in(
        dir.clone(),
        DaemonOpts { env: vec![("KEYHAVEN_ADMIN_PASSWORD".into(), String::new())], ..Default::default() },
    );
    let p = dir.path();
    assert_eq!(mode(p), 0o711);
    assert_eq!(mode(&p.join("master.key")), 0o600);
    assert_eq!(std::fs::metadata(p.join("master.key")).unwrap().len(), 32);
    assert_eq!(mode(&p.join("keyhaven.db")), 0o600);
    assert_eq!(mode(&p.join("keyhaven.sock")) & 0o077, 0);
    // No KEYHAVEN_ADMIN_PASSWORD: generated and written 0600; the log says
    // where the file is, never the password (the journal keeps logs).
    let pw_file = p.join("initial-admin-password");
    assert_eq!(mode(&pw_file), 0o600);
    let pw = std::fs::read_to_string(&pw_file).unwrap().trim().to_string();
    assert!(pw.len() >= 20);
    // stderr is read by another thread: give it a moment to catch up.
    let t = std::time::Instant::now();
    while !d.stderr().contains(&pw_file.display().to_string()) && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(d.stderr().contains(&format!("password is in {}", pw_file.display())), "{}", d.stderr());
    assert!(!d.stderr().contains(&pw), "the password reached the log");
    let mut c = d.client().await;
    c.login("admin", &pw).await;
    let key = c.call("api_key.create", json!([{"name": "persist", "username": "admin"}])).await["key"]
        .as_str()
        .unwrap()
        .to_string();

    // SIGTERM: clean exit, socket removed.
    let status = d.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(!p.join("keyhaven.sock").exists());

    // Restart keeps data (and does not print or rewrite a password).
    let d2 = Daemon::start_in(dir.clone(), DaemonOpts::default());
    assert!(!d2.stderr().contains(&pw));
    let mut c = d2.client().await;
    assert_eq!(c.call("auth.login_with_api_key", json!([key])).await, true);
    let mut c = d2.client().await;
    c.login("admin", &pw).await;
    assert_eq!(c.call("api_key.query", json!([[], {"count": true}])).await, 1);

    // SIGINT also shuts down cleanly.
    let mut d2 = d2;
    let mut child = d2.child.take().unwrap();
    crate::util::signal(child.id(), libc::SIGINT);
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn secrets_never_reach_db_files_or_logs() {
    let dir = Arc::new(TestDir::new("secrets"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut a = d.admin().await;
    let key = a.call("api_key.create", json!([{"name": "k", "username": "admin"}])).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let token = a.call("auth.generate_token", json!([600, {}, false])).await.as_str().unwrap().to_string();
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([token.clone()])).await, true);
    let _ = d.client().await.call("auth.login", json!(["admin", "wrong-password-xyz"])).await;
    d.stop();
    let secret = key.split_once('-').unwrap().1.to_string();
    for (path, bytes) in all_bytes_under(dir.path()) {
        for s in [ADMIN_PASSWORD, secret.as_str(), token.as_str(), "wrong-password-xyz"] {
            assert!(!contains(&bytes, s.as_bytes()), "{} contains a secret", path.display());
        }
    }
    let log = d.stderr();
    for s in [ADMIN_PASSWORD, secret.as_str(), token.as_str(), "wrong-password-xyz"] {
        assert!(!log.contains(s), "the log contains a secret");
    }
}

fn start_err(dir: Arc<TestDir>, opts: DaemonOpts) -> String {
    match Daemon::try_start_in(dir, opts) {
        Ok(_) => panic!("daemon started but should have refused"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn startup_refuses_unsafe_modes_and_bad_config() {
    sqlite_only!("checks keyhaven.db's file mode");
    let dir = Arc::new(TestDir::new("modes"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    d.stop();
    let p = dir.path().to_path_buf();

    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = start_err(dir.clone(), DaemonOpts::default());
    assert!(e.contains(&format!("chmod 0711 {}", p.display())), "{e}");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711)).unwrap();

    let key = p.join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = start_err(dir.clone(), DaemonOpts::default());
    assert!(e.contains("master key") && e.contains(&format!("chmod 0600 {}", key.display())), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let db = p.join("keyhaven.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = start_err(dir.clone(), DaemonOpts::default());
    assert!(e.contains("database") && e.contains("chmod 0600"), "{e}");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Unknown config keys are an error naming the key.
    let cfg_dir = TestDir::new("cfg");
    std::fs::create_dir_all(cfg_dir.path()).unwrap();
    let cfg = cfg_dir.path().join("keyhaven.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:0\"\n").unwrap();
    let e = start_err(
        dir.clone(),
        DaemonOpts { args: vec!["--config".into(), cfg.display().to_string()], ..Default::default() },
    );
    assert!(e.contains("unknown setting `lisen`"), "{e}");

    // A wrong master key is refused, not silently used.
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = start_err(dir.clone(), DaemonOpts::default());
    assert!(e.contains("does not match this database"), "{e}");

    // And it still starts once things are right (config file value used for listen).
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n[accounts]\nmanage_os = false\n").unwrap();
    let dir2 = Arc::new(TestDir::new("cfgok"));
    let d = Daemon::start_in(
        dir2,
        DaemonOpts {
            listen: "127.0.0.1:0".into(),
            args: vec!["--config".into(), cfg.display().to_string()],
            ..Default::default()
        },
    );
    assert!(d.url.starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn tls_on_non_loopback_and_when_forced() {
    let dir = Arc::new(TestDir::new("tls"));
    let d = Daemon::start_in(dir.clone(), DaemonOpts { listen: "0.0.0.0:0".into(), ..Default::default() });
    assert!(d.url.starts_with("https://"), "non-loopback must use TLS: {}", d.url);
    assert!(dir.path().join("tls/cert.pem").exists());
    assert_eq!(mode(&dir.path().join("tls/key.pem")), 0o600);
    // Plain HTTP upgrade is refused; a TLS client (trusting nothing) works.
    let port = d.addr.port();
    let plain = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/api/current")).await;
    assert!(plain.is_err(), "plain ws must not be served on a TLS listener");
    let out = Command::new(bin())
        .args(["call", "--url", &format!("https://127.0.0.1:{port}"), "--api-key", "1-x", "core.ping"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("CERTIFICATE_VERIFY_FAILED") && err.contains("--insecure"), "{err}");
    // The refusal names the certificate; pinning exactly that one gets through TLS
    // (to the API key check), a wrong pin does not.
    let fp = err.split("SHA-256 fingerprint ").nth(1).map(|r| r[..95].to_string()).unwrap_or_else(|| panic!("{err}"));
    let key = d.cli_json(&["api_key.create", r#"{"name": "tls-cli", "username": "admin"}"#])["key"]
        .as_str()
        .unwrap()
        .to_string();
    let call = |pin: &str| {
        Command::new(bin())
            .args([
                "call",
                "--url",
                &format!("https://127.0.0.1:{port}"),
                "--api-key",
                &key,
                "--tls-fingerprint",
                pin,
                "core.ping",
            ])
            .output()
            .unwrap()
    };
    let out = call(&fp);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"pong\"");
    let out = call(&"AB".repeat(32));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("changed since you trusted it"), "{err}");

    let dir3 = Arc::new(TestDir::new("tlsforced"));
    let d3 =
        Daemon::start_in(dir3, DaemonOpts { env: vec![("KEYHAVEN_TLS".into(), "true".into())], ..Default::default() });
    assert!(d3.url.starts_with("https://127.0.0.1:"));
    // keyhaven.tls_certificate: the served certificate's fingerprint, as openssl prints it.
    let c = d3.cli_json(&["keyhaven.tls_certificate"]);
    let want = d3.tls_fingerprint();
    assert_eq!(c, serde_json::json!({"tls": true, "fingerprint_sha256": want}));
    assert!(d3.stderr().contains(&format!("SHA-256 fingerprint {want}")), "the log names the certificate");
    let plain = Daemon::start();
    assert_eq!(
        plain.cli_json(&["keyhaven.tls_certificate"]),
        serde_json::json!({"tls": false, "fingerprint_sha256": null})
    );
}

#[tokio::test]
async fn cli_call_local_and_remote() {
    let d = Daemon::start();
    assert_eq!(d.cli_json(&["core.ping"]), "pong");
    assert_eq!(d.cli_json(&["auth.me"])["pw_name"], "root");
    let k = d.cli_json(&["api_key.create", r#"{"name": "cli", "username": "admin"}"#]);
    let key = k["key"].as_str().unwrap();

    // Errors print once as `keyhaven: …` with a non-zero exit code.
    let o = d.call_cli(&["api_key.create", r#"{"name": 5, "username": "admin"}"#]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("keyhaven: api_key_create.name: Input should be a valid string"), "{err}");
    let o = d.call_cli(&["nope.nope"]);
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("keyhaven: Method does not exist"));

    // Remote with an API key.
    let o =
        Command::new(bin()).args(["call", "--url", &d.url, "--api-key", key, "--compact", "auth.me"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let me: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(me["pw_name"], "admin");
    let o = Command::new(bin()).args(["call", "--url", &d.url, "--api-key", "1-wrong", "auth.me"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("API key was refused"));

    // No daemon: a clear message.
    let nowhere = TestDir::new("nowhere");
    let o = Command::new(bin()).args(["call", "--data-dir"]).arg(nowhere.path()).arg("core.ping").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("is `keyhaven serve` running"));
}

#[tokio::test]
async fn rotate_master_key_cli() {
    sqlite_only!("master-key rotation is refused on PostgreSQL (docs/cluster.md, Next)");
    let dir = Arc::new(TestDir::new("rotate"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let o = Command::new(bin()).args(["rotate-master-key", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("stop it first"));
    d.stop();
    let before = std::fs::read(dir.path().join("master.key")).unwrap();
    let o = Command::new(bin()).args(["rotate-master-key", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = std::fs::read(dir.path().join("master.key")).unwrap();
    assert_ne!(before, after);
    assert_eq!(mode(&dir.path().join("master.key")), 0o600);
    // The daemon starts with the new key and data is intact.
    let d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    assert_eq!(c.call("core.ping", json!([])).await, "pong");
}

#[test]
fn readme_configuration_table_matches_the_declared_settings() {
    let out = Command::new(bin()).arg("settings-table").output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md's configuration table is out of date; paste `keyhaven settings-table` into it"
    );
}
