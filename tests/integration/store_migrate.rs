//! `keyhaven store migrate` (issue 14 §1): a running SQLite daemon copied
//! into a throwaway PostgreSQL cluster while it serves, `serve` on the copy
//! answering exactly what the original answered (private keys included) and
//! taking the same password and API key, the copy back into a fresh data dir
//! answering the same again, and the refusals that change nothing.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::util::*;

/// Every answer the copy must reproduce exactly.
async fn answers(c: &mut Client) -> BTreeMap<&'static str, Value> {
    let mut m = BTreeMap::new();
    m.insert("keychain", c.call("keychaincredential.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("users", c.call("user.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("api_keys", c.call("api_key.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("rsync", c.call("rsynctask.query", json!([[], {"order_by": ["id"]}])).await);
    m
}

fn migrate(args: &[&str]) -> Output {
    Command::new(bin()).arg("store").arg("migrate").args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn copy_key(from: &TestDir, to: &TestDir) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o711).create(to.path()).unwrap();
    let key = std::fs::read(from.path().join("master.key")).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to.path().join("master.key"))
        .unwrap();
    f.write_all(&key).unwrap();
}

async fn logs_in_with_password_and_api_key(d: &Daemon, api_key: &str) {
    let mut c = d.client().await;
    c.login("daemon", "pw-for-daemon-migrated").await;
    let mut k = d.client().await;
    let r =
        k.call("auth.login_ex", json!([{"mechanism": "API_KEY_PLAIN", "username": "admin", "api_key": api_key}])).await;
    assert_eq!(r["response_type"], "SUCCESS", "{r}");
    let mut bad = d.client().await;
    let r = bad
        .call("auth.login_ex", json!([{"mechanism": "PASSWORD_PLAIN", "username": "daemon", "password": "wrong"}]))
        .await;
    assert_ne!(r["response_type"], "SUCCESS", "{r}");
}

#[tokio::test]
async fn a_running_sqlite_install_moves_to_postgres_and_back_unchanged() {
    sqlite_only!("the source is a SQLite data dir");
    let Some(pg) = keyhaven_testpg::start_or_skip("store_migrate::a_running_sqlite_install_moves_to_postgres_and_back")
    else {
        return;
    };
    pg.create_database("keyhaven").unwrap();
    pg.create_database("taken").unwrap();
    let password = "pw-never-printed-4417";
    let url = |db: &str| format!("postgres://postgres:{password}@127.0.0.1:{}/{db}", pg.port());

    // A SQLite installation with a record of every kind.
    let src = Arc::new(TestDir::new("mig-src"));
    let d = Daemon::start_in(src.clone(), DaemonOpts::default());
    let mut a = d.admin().await;
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let pair = a
        .call(
            "keychaincredential.create",
            json!([{"name": "pair", "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"]}}]),
        )
        .await;
    let host = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let host_key: String =
        host["public_key"].as_str().unwrap().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let conn = a
        .call(
            "keychaincredential.create",
            json!([{"name": "backup-host", "type": "SSH_CREDENTIALS", "attributes": {
                "host": "backup.example.com", "port": 2222, "username": "repl", "private_key": pair["id"],
                "remote_host_key": host_key, "connect_timeout": 15}}]),
        )
        .await;
    // A deleted credential: ids go on after it on the copy too.
    let gone = a
        .call(
            "keychaincredential.create",
            json!([{"name": "gone", "type": "SSH_KEY_PAIR", "attributes": {"private_key": host["private_key"]}}]),
        )
        .await;
    a.call("keychaincredential.delete", json!([gone["id"]])).await;
    a.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "Migrated", "password": "pw-for-daemon-migrated",
                "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let root = a.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await["id"].clone();
    a.call("user.update", json!([root, {"sshpubkey": kp["public_key"]}])).await;
    let api_key = a.call("api_key.create", json!([{"name": "migrate", "username": "admin"}])).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let task_dir = TestDir::new("mig-task");
    std::fs::create_dir_all(task_dir.path()).unwrap();
    a.call(
        "rsynctask.create",
        json!([{"path": task_dir.path(), "user": "root", "mode": "SSH", "direction": "PUSH",
                "ssh_credentials": conn["id"], "remotepath": "/srv/backup", "desc": "nightly", "enabled": false}]),
    )
    .await;
    logs_in_with_password_and_api_key(&d, &api_key).await;
    let want = answers(&mut a).await;
    assert_eq!(want["keychain"].as_array().unwrap().len(), 2);
    assert!(want["keychain"][0]["attributes"]["private_key"].as_str().unwrap().contains("PRIVATE KEY"));

    // Copied while the daemon serves.
    let o = migrate(&["--from", src.path().to_str().unwrap(), "--to", &url("keyhaven")]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    eprintln!("keyhaven store migrate (SQLite to PostgreSQL):\n{out}");
    assert!(!out.contains(password), "the URL's password was printed:\n{out}");
    assert!(out.contains(&format!("127.0.0.1:{}/keyhaven", pg.port())), "{out}");
    for table in ["users", "api_keys", "keychain", "rsync_tasks", "audit", "host_keys", "settings"] {
        assert!(out.contains(&format!("  {table:<20}")), "{table} not reported:\n{out}");
    }
    assert!(out.contains("sealed secrets decrypt to the same bytes") && out.contains(" s;"), "{out}");
    // The source still serves and was not changed by the copy.
    assert_eq!(answers(&mut a).await, want);

    // `serve` on the copy: a data dir holding only the same master.key.
    let pg_dir = Arc::new(TestDir::new("mig-pg"));
    copy_key(&src, &pg_dir);
    let pg_env = vec![("KEYHAVEN_DATABASE".to_string(), url("keyhaven"))];
    let p = Daemon::start_in(pg_dir.clone(), DaemonOpts { env: pg_env.clone(), ..Default::default() });
    let mut b = p.admin().await;
    assert_eq!(answers(&mut b).await, want, "the PostgreSQL copy answers differently");
    logs_in_with_password_and_api_key(&p, &api_key).await;
    // The audit trail came along, and audit.query filters it on PostgreSQL.
    let copied = b
        .call("audit.query", json!([[["username", "=", "daemon"], ["event", "=", "AUTHENTICATION"]], {"count": true}]))
        .await;
    assert!(copied.as_u64().unwrap() >= 2, "{copied}");
    let exact = b.call("audit.query", json!([[["username", "=", "daemon"]], {"count": true}])).await;
    let folded = b.call("audit.query", json!([[["username", "C=", "DAEMON"]], {"count": true}])).await;
    assert_eq!(folded, exact);
    assert_eq!(b.call("audit.query", json!([[["username", "=", "DAEMON"]], {"count": true}])).await, 0);
    // A new credential continues the ids after the deleted one.
    let next = b
        .call(
            "keychaincredential.create",
            json!([{"name": "after", "type": "SSH_KEY_PAIR", "attributes": {"private_key": host["private_key"]}}]),
        )
        .await;
    assert!(next["id"].as_i64().unwrap() > gone["id"].as_i64().unwrap(), "{next} reused an id");
    b.call("keychaincredential.delete", json!([next["id"]])).await;
    let on_pg = answers(&mut b).await;
    assert_eq!(on_pg, want);

    // A second copy into the same (now used) database: refused, unchanged.
    let o = migrate(&["--from", src.path().to_str().unwrap(), "--to", &url("keyhaven")]);
    let out = text(&o);
    assert!(!o.status.success() && out.contains("is not empty: table users has"), "{out}");
    assert!(!out.contains(password), "{out}");
    assert_eq!(answers(&mut b).await, on_pg);

    // A database that belongs to another master key: refused, unchanged.
    let other = Arc::new(TestDir::new("mig-other"));
    let taken_env = vec![("KEYHAVEN_DATABASE".to_string(), url("taken"))];
    drop(Daemon::start_in(other.clone(), DaemonOpts { env: taken_env, ..Default::default() }));
    let users_before = pg.psql("taken", "SELECT count(*) FROM users").unwrap();
    let o = migrate(&["--from", src.path().to_str().unwrap(), "--to", &url("taken")]);
    let out = text(&o);
    assert!(!o.status.success() && out.contains("does not match") && out.contains("master.key"), "{out}");
    assert!(!out.contains(password), "{out}");
    assert_eq!(pg.psql("taken", "SELECT count(*) FROM users").unwrap(), users_before);

    // A source that is not a data dir: refused, naming it.
    let o = migrate(&["--from", other.path().join("nowhere").to_str().unwrap(), "--to", &url("keyhaven")]);
    let out = text(&o);
    assert!(!o.status.success() && out.contains("holds no keyhaven.db"), "{out}");

    // Back into a fresh data dir while the PostgreSQL node keeps serving; a
    // wrong key file first (refused, nothing left behind).
    let back = Arc::new(TestDir::new("mig-back"));
    let o = migrate(&[
        "--from",
        &url("keyhaven"),
        "--to",
        back.path().to_str().unwrap(),
        "--master-key",
        other.path().join("master.key").to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(!o.status.success() && out.contains("does not match"), "{out}");
    assert!(!back.path().join("keyhaven.db").exists() && !back.path().join("master.key").exists(), "{out}");
    let o = migrate(&[
        "--from",
        &url("keyhaven"),
        "--to",
        back.path().to_str().unwrap(),
        "--data-dir",
        pg_dir.path().to_str().unwrap(),
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains(password), "{out}");
    assert_eq!(
        std::fs::read(back.path().join("master.key")).unwrap(),
        std::fs::read(src.path().join("master.key")).unwrap()
    );
    let r = Daemon::start_in(back.clone(), DaemonOpts::default());
    let mut c = r.admin().await;
    assert_eq!(answers(&mut c).await, want, "the copy back to SQLite answers differently");
    logs_in_with_password_and_api_key(&r, &api_key).await;
    drop((a, b, c));
    drop((d, p, r));
}
