//! `keyhaven serve` with its state in PostgreSQL (issue 14 phase 1): a
//! throwaway cluster of the test's own (keyhaven-testpg), the same API as on
//! SQLite, the master key checked against the database, no plaintext secret
//! and no password in the log.

use std::sync::Arc;

use serde_json::json;

use crate::util::*;

#[tokio::test]
async fn serve_on_postgres_keeps_credentials_and_logins_in_the_database() {
    let Some(pg) =
        keyhaven_testpg::start_or_skip("postgres::serve_on_postgres_keeps_credentials_and_logins_in_the_database")
    else {
        return;
    };
    pg.create_database("keyhaven").unwrap();
    // Trust authentication ignores the password; it is there to be kept out of the log.
    let password = "pw-never-logged-7731";
    let url = format!("postgres://postgres:{password}@127.0.0.1:{}/keyhaven", pg.port());
    let env = vec![("KEYHAVEN_DATABASE".to_string(), url.clone())];
    let dir = Arc::new(TestDir::new("pg"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts { env: env.clone(), ..Default::default() });
    assert!(!dir.path().join("keyhaven.db").exists(), "no SQLite database when PostgreSQL is configured");
    assert!(dir.path().join("master.key").exists(), "the master key stays in the data dir");

    let mut a = d.admin().await;
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let private = kp["private_key"].as_str().unwrap().to_string();
    let created = a
        .call(
            "keychaincredential.create",
            json!([{"name": "pg-pair", "type": "SSH_KEY_PAIR", "attributes": {"private_key": private}}]),
        )
        .await;
    let id = created["id"].as_i64().unwrap();
    let q = a.call("keychaincredential.query", json!([[["name", "=", "pg-pair"]]])).await;
    assert_eq!(q.as_array().unwrap().len(), 1, "{q}");
    assert_eq!(q[0]["id"], id);
    assert_eq!(q[0]["attributes"]["private_key"], private.as_str());

    // The row is in PostgreSQL, sealed.
    assert_eq!(pg.psql("keyhaven", "SELECT name FROM keychain").unwrap(), "pg-pair");
    let sealed =
        pg.psql("keyhaven", &format!("SELECT encode(private_key, 'hex') FROM keychain WHERE id = {id}")).unwrap();
    let body = private.lines().nth(1).unwrap();
    let body_hex: String = body.bytes().map(|b| format!("{b:02x}")).collect();
    assert!(!sealed.is_empty() && !sealed.contains(&body_hex), "the private key reached PostgreSQL in plaintext");

    // A restart finds everything there; a fresh login works.
    d.stop();
    let d = Daemon::start_in(dir.clone(), DaemonOpts { env: env.clone(), ..Default::default() });
    let mut a = d.admin().await;
    let q = a.call("keychaincredential.query", json!([[["id", "=", id]]])).await;
    assert_eq!(q[0]["attributes"]["private_key"], private.as_str());
    let log = d.stderr();
    assert!(log.contains("the state is in PostgreSQL at 127.0.0.1:"), "{log}");
    assert!(!log.contains(password), "the database password was logged:\n{log}");

    // /healthz asks PostgreSQL.
    let h = http(&d, "GET", "/healthz", &[], None).await;
    assert_eq!(h.status, 200, "{}", h.text());

    // `keyhaven backup` copies an embedded database only: it says to use pg_dump.
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["backup", "--data-dir"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("b.age"))
        .arg("--passphrase-file")
        .arg(&pass)
        .env("KEYHAVEN_DATABASE", &url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pg_dump"), "{err}");
    assert!(!err.contains(password) && !dir.path().join("b.age").exists(), "{err}");

    // Another data dir (no master.key, or another one) is refused, saying what to do.
    let other = Arc::new(TestDir::new("pg-other"));
    let e = Daemon::try_start_in(other.clone(), DaemonOpts { env: env.clone(), ..Default::default() })
        .err()
        .expect("a node without the cluster's master key started");
    assert!(e.contains("copy master.key"), "{e}");
    assert!(!e.contains(password), "{e}");
    drop(d);
}

#[tokio::test]
async fn serve_refuses_an_unreachable_postgres_naming_it_without_the_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://keyhaven:pw-never-logged-9@127.0.0.1:{port}/keyhaven");
    let dir = Arc::new(TestDir::new("pg-down"));
    let e =
        Daemon::try_start_in(dir, DaemonOpts { env: vec![("KEYHAVEN_DATABASE".into(), url)], ..Default::default() })
            .err()
            .expect("started without its database");
    assert!(e.contains(&format!("cannot reach PostgreSQL at 127.0.0.1:{port}/keyhaven")), "{e}");
    assert!(e.contains("check the database setting"), "{e}");
    assert!(!e.contains("pw-never-logged-9"), "{e}");
}
