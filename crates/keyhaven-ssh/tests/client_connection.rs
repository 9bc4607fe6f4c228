//! `test_connection` / `run_command` against a real sshd.

mod client_fixture;

use std::time::{Duration, Instant};

use client_fixture::Sshd;
use keyhaven_ssh::client::{run_command, test_connection, Stage, TestReport, TestTarget};
use zeroize::Zeroizing;

fn target(sshd: &Sshd, private_key: &str, pinned: Vec<(String, String)>) -> TestTarget {
    TestTarget {
        host: "127.0.0.1".into(),
        port: sshd.port,
        username: "root".into(),
        private_key_openssh: Zeroizing::new(private_key.to_string()),
        pinned_host_keys: pinned,
        timeout: Duration::from_secs(10),
    }
}

fn all_host_keys(sshd: &Sshd) -> Vec<(String, String)> {
    ["ed25519", "ecdsa", "rsa"].iter().map(|t| sshd.host_key(t)).collect()
}

fn fp(sshd: &Sshd, t: &str) -> String {
    client_fixture::keygen_fingerprint(&sshd.host_pub(t))
}

fn assert_ok(r: &TestReport, sshd: &Sshd) {
    assert!(r.ok && r.stage == Stage::Exec && r.error.is_none(), "{r:?}\nsshd log:\n{}", sshd.log());
}

#[tokio::test]
async fn ed25519_key_logs_in() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let key = sshd.client_key("ed25519", "id_ed25519");
    sshd.authorize("root", "id_ed25519");
    let t = target(&sshd, &key, all_host_keys(&sshd));

    let started = Instant::now();
    let r = test_connection(&t).await;
    eprintln!("test_connection wall time: {:?} (latency_ms {})", started.elapsed(), r.latency_ms);
    assert_ok(&r, &sshd);
    assert_eq!(r.host_key_fingerprint.as_deref(), Some(fp(&sshd, "ed25519").as_str()));
    assert!(r.latency_ms > 0 && r.latency_ms < 10_000);

    // JSON form of the report.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["stage"], "exec");
    assert_eq!(v["ok"], true);

    // run_command shares the path and returns status and stdout.
    let (status, stdout) = run_command(&t, "echo hello; echo oops >&2; exit 3").await.unwrap();
    assert_eq!(status, 3);
    assert_eq!(stdout, b"hello\n");
}

#[tokio::test]
async fn host_key_restricted_to_pinned_types() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let key = sshd.client_key("ed25519", "id_ed25519");
    sshd.authorize("root", "id_ed25519");
    for t in ["rsa", "ecdsa"] {
        let r = test_connection(&target(&sshd, &key, vec![sshd.host_key(t)])).await;
        assert_ok(&r, &sshd);
        assert_eq!(r.host_key_fingerprint, Some(fp(&sshd, t)), "{t}");
    }
}

#[tokio::test]
async fn wrong_pinned_key_stops_before_auth() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let key = sshd.client_key("ed25519", "id_ed25519");
    sshd.authorize("root", "id_ed25519");
    // Another ed25519 key, pinned instead of the real one.
    client_fixture::keygen("ed25519", &sshd.path("other_host_key"));
    let other_pub = sshd.path("other_host_key.pub");
    let other = client_fixture::pub_fields(&other_pub);
    let expected_fp = client_fixture::keygen_fingerprint(&other_pub);

    let r = test_connection(&target(&sshd, &key, vec![other])).await;
    assert!(!r.ok);
    assert_eq!(r.stage, Stage::HostKey, "{r:?}");
    let real_fp = fp(&sshd, "ed25519");
    assert_eq!(r.host_key_fingerprint.as_deref(), Some(real_fp.as_str()));
    let msg = r.error.unwrap();
    assert!(msg.contains(&expected_fp), "{msg}");
    assert!(msg.contains(&real_fp), "{msg}");
    assert!(
        msg.contains(
            "If the host key changed legitimately, discover it again and re-pin it in the connection's Remote Host Key"
        ),
        "{msg}"
    );
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
}

#[tokio::test]
async fn unauthorized_key_fails_at_auth() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let key = sshd.client_key("ed25519", "id_ed25519"); // not authorized
    let r = test_connection(&target(&sshd, &key, all_host_keys(&sshd))).await;
    assert!(!r.ok);
    assert_eq!(r.stage, Stage::Auth, "{r:?}");
    assert_eq!(r.host_key_fingerprint, Some(fp(&sshd, "ed25519")));
    let msg = r.error.unwrap();
    assert!(msg.contains("user root"), "{msg}");
    assert!(msg.contains("authorized_keys"), "{msg}");
    assert!(!msg.contains("PRIVATE") && !msg.contains(key.lines().nth(1).unwrap()), "{msg}");

    // run_command reports the same stage.
    let err = run_command(&target(&sshd, &key, all_host_keys(&sshd)), "true").await.unwrap_err();
    assert_eq!(err.stage, Stage::Auth);
}

#[tokio::test]
async fn rsa_and_ecdsa_client_keys_log_in() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    for (t, name) in [("rsa", "id_rsa"), ("ecdsa", "id_ecdsa")] {
        let key = sshd.client_key(t, name);
        sshd.authorize("root", name);
        let started = Instant::now();
        let r = test_connection(&target(&sshd, &key, all_host_keys(&sshd))).await;
        eprintln!("test_connection with a {t} client key: {:?}", started.elapsed());
        assert_ok(&r, &sshd);
    }
}

#[tokio::test]
async fn no_pinned_key_and_connect_failures() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    let key = sshd.client_key("ed25519", "id_ed25519");
    sshd.authorize("root", "id_ed25519");

    let r = test_connection(&target(&sshd, &key, vec![])).await;
    assert!(!r.ok);
    assert_eq!(r.stage, Stage::HostKey);
    assert_eq!(r.host_key_fingerprint, None);
    let msg = r.error.unwrap();
    assert!(msg.contains("discover") && msg.contains("pin"), "{msg}");

    // Refused port.
    let mut t = target(&sshd, &key, all_host_keys(&sshd));
    t.port = client_fixture::free_port();
    let r = test_connection(&t).await;
    assert_eq!(r.stage, Stage::Connect, "{r:?}");
    assert!(r.error.unwrap().starts_with("Connection refused by 127.0.0.1"));

    // Garbage private key: stops at auth, after the host key was checked.
    let t = target(&sshd, "not a key", all_host_keys(&sshd));
    let r = test_connection(&t).await;
    assert_eq!(r.stage, Stage::Auth, "{r:?}");
    assert!(r.host_key_fingerprint.is_some());
}

#[tokio::test]
async fn nologin_account_fails_at_exec() {
    let Some(sshd) = client_fixture::start() else {
        return;
    };
    // Debian's `nobody` has the nologin shell: the login works, the command does not.
    let nobody = std::process::Command::new("getent")
        .args(["passwd", "nobody"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !nobody.ends_with("nologin") {
        eprintln!("NOTE: no user nobody with a nologin shell; skipping");
        return;
    }
    let key = sshd.client_key("ed25519", "id_ed25519");
    sshd.authorize("nobody", "id_ed25519");
    let mut t = target(&sshd, &key, all_host_keys(&sshd));
    t.username = "nobody".into();
    let r = test_connection(&t).await;
    assert!(!r.ok);
    assert_eq!(r.stage, Stage::Exec, "{r:?}\n{}", sshd.log());
    let msg = r.error.unwrap();
    assert!(msg.contains("exited with status 1"), "{msg}");
    assert!(msg.contains("nobody"), "{msg}");
}
