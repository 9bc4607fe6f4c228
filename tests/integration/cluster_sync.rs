//! Two keyhaven nodes on one PostgreSQL (issue 14 §2, "several nodes, one
//! truth"): two real `keyhaven serve` processes on one throwaway cluster
//! (keyhaven-testpg), the second data dir holding a copy of the first's
//! master.key. What one node writes, the other serves: credentials, tokens,
//! API keys (and their deletion), failed-login counts, and — through
//! LISTEN/NOTIFY — the keys files and configuration of its sshd, with the
//! same host keys on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sshd::{free_port, key_file, known_hosts, ssh_key_login, sshd_available, wait_job};
use crate::util::*;

/// Two nodes sharing one database.
pub struct Pair {
    pub a: Daemon,
    pub b: Daemon,
    // Dropped last: the nodes stop before their database does.
    _pg: keyhaven_testpg::TestPg,
}

/// Start a cluster and two nodes on it (`env` for both); `None` (skipped,
/// saying why) without PostgreSQL binaries.
pub fn start_pair(test: &str, env: &[(&str, &str)]) -> Option<Pair> {
    let pg = keyhaven_testpg::start_or_skip(test)?;
    pg.create_database("keyhaven").unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/keyhaven", pg.port());
    let mut vars = vec![("KEYHAVEN_DATABASE".to_string(), url)];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let opts = || DaemonOpts { env: vars.clone(), ..Default::default() };
    let da = Arc::new(TestDir::new("cluster-a"));
    let a = Daemon::start_in(da.clone(), opts());
    // The second node: a data dir of its own with a copy of the master key.
    let db = Arc::new(TestDir::new("cluster-b"));
    std::fs::create_dir_all(db.path()).unwrap();
    std::fs::set_permissions(db.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    std::fs::copy(da.path().join("master.key"), db.path().join("master.key")).unwrap();
    let b = Daemon::start_in(db, opts());
    Some(Pair { a, b, _pg: pg })
}

async fn login_ex(c: &mut Client, data: Value) -> Value {
    c.call("auth.login_ex", json!([data])).await
}

/// Ask again every 20 ms until `$cond` holds or `$within` passes; whether it held.
macro_rules! eventually {
    ($within:expr, $cond:expr) => {{
        let deadline = Instant::now() + $within;
        loop {
            if $cond {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }};
}

#[tokio::test]
async fn two_nodes_share_credentials_tokens_api_keys_and_failed_logins() {
    let Some(p) = start_pair(
        "cluster_sync::two_nodes_share_credentials_tokens_api_keys_and_failed_logins",
        &[("KEYHAVEN_AUTH_LOCKOUT_AFTER", "4")],
    ) else {
        return;
    };
    let mut a = p.a.admin().await;
    let mut b = p.b.admin().await;

    // B reads its keychain before A writes: B's cache is built, and must follow.
    assert_eq!(b.call("keychaincredential.query", json!([])).await, json!([]));
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let created = a
        .call(
            "keychaincredential.create",
            json!([{"name": "shared", "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"]}}]),
        )
        .await;
    let on_a = a.call("keychaincredential.query", json!([])).await;
    let mut on_b: Value;
    let same = eventually!(Duration::from_secs(5), {
        on_b = b.call("keychaincredential.query", json!([])).await;
        on_b == on_a
    });
    assert!(same, "B's keychain did not follow A's write: A {on_a}, B {on_b}");
    // An update and a delete on A reach B's cache too.
    a.call("keychaincredential.update", json!([created["id"], {"name": "renamed"}])).await;
    let renamed = eventually!(
        Duration::from_secs(5),
        b.call("keychaincredential.query", json!([[["name", "=", "renamed"]]])).await[0]["id"] == created["id"]
    );
    assert!(renamed, "B still shows the old name");
    a.call("keychaincredential.delete", json!([created["id"]])).await;
    let gone = eventually!(Duration::from_secs(5), b.call("keychaincredential.query", json!([])).await == json!([]));
    assert!(gone, "B still shows a credential deleted on A");

    // A token minted on A logs in on B (once: it is single-use).
    let token = a.call("auth.generate_token", json!([600])).await.as_str().unwrap().to_string();
    let mut t = p.b.client().await;
    let r = login_ex(&mut t, json!({"mechanism": "TOKEN_PLAIN", "token": token})).await;
    assert_eq!(r["response_type"], "SUCCESS", "{r}");
    assert_eq!(t.call("auth.me", json!([])).await["pw_name"], "admin");
    let mut again = p.a.client().await;
    let r = login_ex(&mut again, json!({"mechanism": "TOKEN_PLAIN", "token": token})).await;
    assert_eq!(r["response_type"], "AUTH_ERR", "a single-use token worked twice across nodes");

    // A reusable token minted on A: B's session opened with it ends once the
    // token is removed on A, with its account (created again at once).
    let account = json!([{"username": "bin", "full_name": "", "password": "pw-for-tok-1", "roles": ["FULL_ADMIN"]}]);
    let u = a.call("user.create", account.clone()).await;
    let mut owner = p.a.client().await;
    owner.login("bin", "pw-for-tok-1").await;
    let token = owner.call("auth.generate_token", json!([600, {}, false, false])).await.as_str().unwrap().to_string();
    let mut s = p.b.client().await;
    assert_eq!(s.call("auth.login_with_token", json!([token])).await, true);
    assert_eq!(s.call("auth.me", json!([])).await["pw_name"], "bin");
    a.call("user.delete", json!([u["id"]])).await;
    a.call("user.create", account).await;
    let ended = eventually!(Duration::from_secs(5), s.raw("auth.me", json!([])).await.get("error").is_some());
    assert!(ended, "B's session opened with a reusable token removed on A still works");

    // An API key deleted on A: refused on B, and B's session opened with it ends.
    let k = a.call("api_key.create", json!([{"name": "shared-key", "username": "admin"}])).await;
    let key = k["key"].as_str().unwrap().to_string();
    let mut s = p.b.client().await;
    let r = login_ex(&mut s, json!({"mechanism": "API_KEY_PLAIN", "username": "admin", "api_key": key})).await;
    assert_eq!(r["response_type"], "SUCCESS", "{r}");
    assert_eq!(s.call("auth.me", json!([])).await["pw_name"], "admin");
    a.call("api_key.delete", json!([k["id"]])).await;
    let ended = eventually!(Duration::from_secs(5), s.raw("auth.me", json!([])).await.get("error").is_some());
    assert!(ended, "B's session opened with a key deleted on A still works");
    let mut c = p.b.client().await;
    assert_eq!(c.call("auth.login_with_api_key", json!([key])).await, false);

    // Failed logins count on every node: 2 on A and 2 on B lock the account
    // from this address (limit 4), so its right password is refused on both.
    a.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "", "password": "pw-for-daemon-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    for node in [&p.a, &p.b, &p.a, &p.b] {
        let mut c = node.client().await;
        let r =
            login_ex(&mut c, json!({"mechanism": "PASSWORD_PLAIN", "username": "daemon", "password": "wrong"})).await;
        assert_eq!(r["response_type"], "AUTH_ERR");
    }
    for node in [&p.b, &p.a] {
        let mut c = node.client().await;
        let r = login_ex(
            &mut c,
            json!({"mechanism": "PASSWORD_PLAIN", "username": "daemon", "password": "pw-for-daemon-1"}),
        )
        .await;
        assert_eq!(r["response_type"], "AUTH_ERR", "the lock reached after failures on both nodes was not shared");
    }
    // Another account from the same address is not locked.
    let mut c = p.b.client().await;
    c.login("admin", ADMIN_PASSWORD).await;
}

/// A public key set on an account through A logs in through B's sshd within
/// a bounded wait (the time is printed; the benchmark measures it); B serves
/// the same host keys as A, so a client that trusts A's keys trusts B; a
/// change of the SSH settings through A is applied by B's sshd; and after
/// the account's keys are cleared through A, B refuses them.
#[tokio::test]
async fn a_key_set_through_one_node_logs_in_through_the_other_nodes_sshd() {
    if !sshd_available() {
        eprintln!("skipped: needs root (useradd) and /usr/sbin/sshd");
        return;
    }
    let Some(p) = start_pair("cluster_sync::a_key_set_through_one_node_logs_in_through_the_other_nodes_sshd", &[])
    else {
        return;
    };
    let mut a = p.a.admin().await;
    let mut b = p.b.admin().await;
    // Both nodes share the SSH settings (one port): on one machine only one
    // sshd can listen on it, so B runs it; A's takes over in the failover below.
    let port = free_port();
    a.call("ssh.update", json!([{"tcpport": port}])).await;
    let job = b.call("service.control", json!(["START", "ssh"])).await;
    assert_eq!(wait_job(&mut b, &job).await["state"], "SUCCESS");

    // Same host keys on both nodes, in the API and in the files each sshd reads.
    let keys_a = a.call("ssh.config", json!([])).await["host_keys"].clone();
    let keys_b = b.call("ssh.config", json!([])).await["host_keys"].clone();
    assert_eq!(keys_a, keys_b);
    for stem in ["ed25519", "ecdsa", "rsa"] {
        let f = format!("sshd/ssh_host_{stem}_key");
        let (fa, fb) =
            (std::fs::read(p.a.dir.path().join(&f)).unwrap(), std::fs::read(p.b.dir.path().join(&f)).unwrap());
        assert!(fa == fb, "{f} differs between the nodes");
    }

    let acct = OsUserGuard::new("khclu");
    acct.useradd("/bin/sh", None);
    let u = a.call("user.create", json!([{"username": acct.name, "full_name": "", "password_disabled": true}])).await;
    let scratch = TestDir::new("cluster-keys");
    std::fs::create_dir_all(scratch.path()).unwrap();
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let private = key_file(scratch.path(), "id", kp["private_key"].as_str().unwrap());
    // known_hosts from A: B must present the same keys (StrictHostKeyChecking=yes).
    let kh = known_hosts(&mut a, scratch.path(), port).await;
    assert!(!ssh_key_login(&private, &kh, port, &acct.name).status.success(), "logged in before any key was set");

    a.call("user.update", json!([u["id"], {"sshpubkey": kp["public_key"]}])).await;
    let set_at = Instant::now();
    let mut last = String::new();
    let took = loop {
        let o = ssh_key_login(&private, &kh, port, &acct.name);
        if o.status.success() {
            break Some(set_at.elapsed());
        }
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        if set_at.elapsed() > Duration::from_secs(15) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = took.unwrap_or_else(|| panic!("the key set through A never logged in through B's sshd: {last}"));
    eprintln!("propagation: key set through A, ssh through B's sshd succeeded after {} ms", took.as_millis());
    let file = p.b.dir.path().join("sshd/authorized_keys").join(&acct.name);
    assert!(file.exists(), "B wrote no keys file");

    // The SSH settings changed through A: B's sshd moves to the new port.
    let port2 = free_port();
    a.call("ssh.update", json!([{"tcpport": port2}])).await;
    let kh2 = known_hosts(&mut a, scratch.path(), port2).await;
    let moved = eventually!(Duration::from_secs(15), ssh_key_login(&private, &kh2, port2, &acct.name).status.success());
    assert!(moved, "B's sshd did not follow the port set through A");

    // Failover: B's sshd stops, A's starts on the same port; the client's
    // known_hosts (and key) keep working.
    let job = b.call("service.control", json!(["STOP", "ssh"])).await;
    assert_eq!(wait_job(&mut b, &job).await["state"], "SUCCESS");
    let job = a.call("service.control", json!(["START", "ssh"])).await;
    assert_eq!(wait_job(&mut a, &job).await["state"], "SUCCESS");
    let o = ssh_key_login(&private, &kh2, port2, &acct.name);
    assert!(o.status.success(), "A's sshd refused after the failover: {}", String::from_utf8_lossy(&o.stderr));
    let job = a.call("service.control", json!(["STOP", "ssh"])).await;
    assert_eq!(wait_job(&mut a, &job).await["state"], "SUCCESS");
    let job = b.call("service.control", json!(["START", "ssh"])).await;
    assert_eq!(wait_job(&mut b, &job).await["state"], "SUCCESS");

    // Keys cleared through A: B withdraws its file and refuses the key.
    a.call("user.update", json!([u["id"], {"sshpubkey": ""}])).await;
    let refused =
        eventually!(Duration::from_secs(15), !ssh_key_login(&private, &kh2, port2, &acct.name).status.success());
    assert!(refused, "B still accepted a key cleared through A");
    assert!(!file.exists());
    let job = b.call("service.control", json!(["STOP", "ssh"])).await;
    wait_job(&mut b, &job).await;
    acct.userdel();
}
