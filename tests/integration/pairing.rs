//! Host-key discovery, connection tests and semi-automatic pairing between two
//! real keyhaven daemons (DESIGN §5, reference §2.7–2.10), with real sshd.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::sshd::{free_port, key_file, known_hosts, ssh_key_login, sshd_available, start_ssh};
use crate::util::*;

fn skip() -> bool {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return true;
    }
    false
}

/// Create an SSH_KEY_PAIR from a freshly generated key; returns the entry.
async fn new_key_pair(c: &mut Client, name: &str) -> Value {
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    c.call(
        "keychaincredential.create",
        json!([{"name": name, "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"], "public_key": kp["public_key"]}}]),
    )
    .await
}

async fn root_id(c: &mut Client) -> Value {
    c.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await["id"].clone()
}

#[tokio::test]
async fn host_key_scan_of_own_sshd_and_errors() {
    if skip() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let cfg = c.call("ssh.config", json!([])).await;
    let expected: BTreeSet<String> =
        cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap().to_string()).collect();
    let expected_fp: BTreeSet<String> =
        cfg["host_keys"].as_array().unwrap().iter().map(|k| k["fingerprint"].as_str().unwrap().to_string()).collect();

    let text =
        c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": port}])).await;
    let text = text.as_str().unwrap();
    assert!(!text.ends_with('\n'), "no trailing newline: {text:?}");
    let got: BTreeSet<String> = text.split('\n').map(str::to_string).collect();
    assert_eq!(got, expected, "scan = ssh.config host keys");
    assert!(text.starts_with("ssh-ed25519 "), "Ed25519 first: {text}");

    let fps = c
        .call(
            "keychaincredential.remote_ssh_host_key_scan_fingerprints",
            json!([{"host": "127.0.0.1", "port": port, "connect_timeout": 5}]),
        )
        .await;
    let fps = fps.as_array().unwrap();
    assert_eq!(fps.len(), 3);
    let got_fp: BTreeSet<String> = fps.iter().map(|k| k["fingerprint"].as_str().unwrap().to_string()).collect();
    assert_eq!(got_fp, expected_fp);
    for k in fps {
        assert!(k["public_key"].as_str().unwrap().starts_with(k["type"].as_str().unwrap()), "{k}");
    }

    // Nothing listens there.
    let closed = free_port();
    let e = c
        .err(
            "keychaincredential.remote_ssh_host_key_scan",
            json!([{"host": "127.0.0.1", "port": closed, "connect_timeout": 3}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "refused");
    // Unresolvable host.
    let e = c
        .err(
            "keychaincredential.remote_ssh_host_key_scan",
            json!([{"host": "invalid.invalid.invalid", "connect_timeout": 3}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "resolve");
    // Strict params.
    let e = c.err("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "bogus": 1}])).await;
    assert_eq!(e["code"], -32602, "{e}");
    let e = c.err("keychaincredential.remote_ssh_host_key_scan", json!([{"host": ""}])).await;
    assert_field(&e, "keychain_remote_ssh_host_key_scan.host", "at least 1");
    // Every out-of-range value is named in the same reply, nothing is scanned.
    let e = c
        .err("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "", "port": 0, "connect_timeout": 301}]))
        .await;
    assert_field(&e, "keychain_remote_ssh_host_key_scan.host", "at least 1");
    assert_field(&e, "keychain_remote_ssh_host_key_scan.port", "between 1 and 65535");
    assert_field(&e, "keychain_remote_ssh_host_key_scan.connect_timeout", "between 1 and 300");
}

#[tokio::test]
async fn test_ssh_connection_ok_and_wrong_host_key() {
    if skip() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let kp = new_key_pair(&mut c, "conn-key").await;
    let rid = root_id(&mut c).await;
    c.call("user.update", json!([rid, {"sshpubkey": kp["attributes"]["public_key"]}])).await;
    let host_keys =
        c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": port}])).await;
    let conn = c
        .call(
            "keychaincredential.create",
            json!([{"name": "local", "type": "SSH_CREDENTIALS", "attributes": {
                "host": "127.0.0.1", "port": port, "username": "root", "private_key": kp["id"], "remote_host_key": host_keys}}]),
        )
        .await;
    let r = c.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["stage"], "exec", "{r}");
    assert!(r["error"].is_null(), "{r}");
    assert!(r["host_key_fingerprint"].as_str().unwrap().starts_with("SHA256:"), "{r}");
    assert!(r["latency_ms"].is_u64(), "{r}");
    // Where the time went: every stage was reached and took some time.
    for stage in ["connect", "auth", "channel", "command"] {
        assert!(r["stages_ms"][stage].as_f64().is_some_and(|ms| ms > 0.0), "{stage}: {r}");
    }

    // Pinned key of another "host": refused before authenticating, both fingerprints named.
    let other = new_key_pair(&mut c, "not-the-host").await;
    let wrong = c
        .call(
            "keychaincredential.create",
            json!([{"name": "wrong-pin", "type": "SSH_CREDENTIALS", "attributes": {
                "host": "127.0.0.1", "port": port, "username": "root", "private_key": kp["id"],
                "remote_host_key": other["attributes"]["public_key"]}}]),
        )
        .await;
    let r = c.call("keychaincredential.test_ssh_connection", json!([wrong["id"], {"timeout": 5}])).await;
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["stage"], "host_key", "{r}");
    let err = r["error"].as_str().unwrap();
    let presented = r["host_key_fingerprint"].as_str().unwrap();
    assert!(err.contains(presented), "presented fingerprint in {err}");
    // Nothing after the host key was attempted.
    assert!(r["stages_ms"]["connect"].as_f64().unwrap() > 0.0, "{r}");
    for stage in ["auth", "channel", "command"] {
        assert_eq!(r["stages_ms"][stage], 0.0, "{stage}: {r}");
    }
    assert!(err.contains(other["fingerprint"].as_str().unwrap()), "pinned fingerprint in {err}");

    // Not a connection / missing.
    let e = c.err("keychaincredential.test_ssh_connection", json!([kp["id"]])).await;
    assert_call_error(&e, "EINVAL", "not of type SSH_CREDENTIALS");
    let e = c.err("keychaincredential.test_ssh_connection", json!([99999])).await;
    assert!(e["data"]["reason"].as_str().unwrap().contains("does not exist"), "{e}");

    // The last test of each connection is its status (keyhaven extension).
    let status = c.call("keychaincredential.ssh_connection_status", json!([[], {"order_by": ["id"]}])).await;
    let status = status.as_array().unwrap().clone();
    assert_eq!(status.len(), 2, "{status:?}");
    assert_eq!(
        (status[0]["id"].clone(), status[0]["ok"].clone(), status[0]["stage"].clone()),
        (conn["id"].clone(), json!(true), json!("exec"))
    );
    assert_eq!(
        (status[1]["id"].clone(), status[1]["ok"].clone(), status[1]["stage"].clone()),
        (wrong["id"].clone(), json!(false), json!("host_key"))
    );
    assert!(status[1]["error"].as_str().unwrap().contains("HOST KEY MISMATCH"), "{status:?}");
    assert!(status[0]["tested_at"]["$date"].as_i64().unwrap() > 1_700_000_000_000, "{status:?}");
    let failing =
        c.call("keychaincredential.ssh_connection_status", json!([[["ok", "=", false]], {"select": ["id"]}])).await;
    assert_eq!(failing, json!([{"id": wrong["id"]}]));
    // A test with another key pair is not the connection's status.
    c.call("keychaincredential.test_ssh_connection", json!([conn["id"], {"private_key": other["id"]}])).await;
    let again =
        c.call("keychaincredential.ssh_connection_status", json!([[["id", "=", conn["id"]]], {"get": true}])).await;
    assert_eq!(again["ok"], true, "{again}");
    // A key pair without its private half cannot be tried.
    let pub_only = c
        .call(
            "keychaincredential.create",
            json!([{"name": "pub-only", "type": "SSH_KEY_PAIR", "attributes": {"public_key": other["attributes"]["public_key"]}}]),
        )
        .await;
    let e = c.err("keychaincredential.test_ssh_connection", json!([conn["id"], {"private_key": pub_only["id"]}])).await;
    assert_field(&e, "keychain_test_ssh_connection.options.private_key", "has no private key");
    // Read-only admins see the outcome, not the error text (it names hosts and users).
    c.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "", "password": "ro-password-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let mut ro = d.client().await;
    ro.login("daemon", "ro-password-1").await;
    let seen =
        ro.call("keychaincredential.ssh_connection_status", json!([[["id", "=", wrong["id"]]], {"get": true}])).await;
    assert_eq!((seen["ok"].clone(), seen["error"].clone()), (json!(false), json!("********")));
    // Deleting a connection removes its status.
    c.call("keychaincredential.delete", json!([wrong["id"]])).await;
    let left = c.call("keychaincredential.ssh_connection_status", json!([[], {"select": ["id"]}])).await;
    assert_eq!(left, json!([{"id": conn["id"]}]));
}

/// Why the connection test runs a command instead of stopping once the
/// session channel is open (which would halve its time): sshd opens a session
/// for an account whose shell is nologin; only the command shows that nothing
/// can run there, rsync included.
#[tokio::test]
async fn connection_test_runs_a_command_because_nologin_accounts_still_open_sessions() {
    if skip() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let (acct, _kp, conn) =
        crate::sshd::account_and_connection(&mut c, port, "khnlt", "/usr/sbin/nologin", "nologin").await;
    let r = c.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
    assert_eq!((r["ok"].clone(), r["stage"].clone()), (json!(false), json!("exec")), "{r}");
    // The key was accepted and the session channel opened ...
    assert!(r["stages_ms"]["channel"].as_f64().unwrap() > 0.0, "{r}");
    // ... yet the account cannot run commands, and the report says what to fix.
    let err = r["error"].as_str().unwrap();
    assert!(err.contains(&format!("Logged in as {}", acct.name)) && err.contains("nologin"), "{err}");
}

#[tokio::test]
async fn ssh_pair_starts_sshd_authorizes_once_and_reports_host_keys() {
    if skip() {
        return;
    }
    let b = Daemon::start();
    let mut c = b.admin().await;
    let port = free_port();
    c.call("ssh.update", json!([{"tcpport": port}])).await;
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let public = kp["public_key"].as_str().unwrap().trim().to_string();

    let e = c
        .err(
            "keychaincredential.ssh_pair",
            json!([{"remote_hostname": "any-host", "username": "nosuchuser", "public_key": public}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "User nosuchuser does not exist");
    let e =
        c.err("keychaincredential.ssh_pair", json!([{"remote_hostname": "any-host", "public_key": "not a key"}])).await;
    assert_eq!(e["code"], -32602, "{e}");
    assert_eq!(e["data"]["extra"][0][0], "keychain_ssh_pair.public_key", "{e}");
    let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
    assert_eq!(
        (s["enable"].clone(), s["state"].clone()),
        (json!(false), json!("STOPPED")),
        "failed pairing changed nothing: {s}"
    );

    let r = c.call("keychaincredential.ssh_pair", json!([{"remote_hostname": "any-host", "public_key": public}])).await;
    assert_eq!(r["port"], port, "{r}");
    let lines: Vec<&str> = r["host_key"].as_str().unwrap().lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 3, "{r}");
    assert!(lines[0].starts_with("any-host ssh-rsa "), "{r}");
    assert!(lines[1].starts_with("any-host ecdsa-sha2-"), "{r}");
    assert!(lines[2].starts_with("any-host ssh-ed25519 "), "{r}");
    let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
    assert_eq!((s["enable"].clone(), s["state"].clone()), (json!(true), json!("RUNNING")), "{s}");

    // Idempotent.
    c.call(
        "keychaincredential.ssh_pair",
        json!([{"remote_hostname": "any-host", "username": "root", "public_key": public}]),
    )
    .await;
    let root = c.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    assert_eq!(root["sshpubkey"].as_str().unwrap().matches(&public).count(), 1, "{root}");

    // The key really logs in, with the host keys ssh_pair reported.
    let work = TestDir::new("pair-work");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut c, work.path(), port).await;
    let key = key_file(work.path(), "id", kp["private_key"].as_str().unwrap());
    let o = ssh_key_login(&key, &kh, port, "root");
    assert!(o.status.success(), "ssh failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test]
async fn ssh_pair_home_location_needs_a_home() {
    let dir = std::sync::Arc::new(TestDir::new("pair-home"));
    let b = Daemon::start_in(
        dir,
        DaemonOpts {
            env: vec![("KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION".into(), "home".into())],
            ..DaemonOpts::default()
        },
    );
    let mut c = b.admin().await;
    let admin = c.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await;
    let home = admin["home"].as_str().unwrap().to_string();
    if !home.starts_with("/var/empty") {
        eprintln!("skipped: this machine has an OS admin account with home {home}");
        return;
    }
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let e = c
        .err(
            "keychaincredential.ssh_pair",
            json!([{"remote_hostname": "h", "username": "admin", "public_key": kp["public_key"]}]),
        )
        .await;
    assert_call_error(&e, "ENOENT", &format!("Home directory {home} does not exist"));
    // user.update is refused too (admin has no OS account here, so no SSH
    // login: keys on it could never be used) and changes nothing.
    let e = c.err("user.update", json!([admin["id"], {"sshpubkey": kp["public_key"], "full_name": "New Name"}])).await;
    assert_field(&e, "user_update.sshpubkey", "API account without an OS account");
    let after = c.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await;
    assert_eq!(after, admin, "a failed user.update changed the account");
}

/// A remote keyhaven whose SSH service will use a free port once pairing starts it.
async fn remote_b(opts: DaemonOpts) -> (Daemon, u16) {
    let b = Daemon::start_in(std::sync::Arc::new(TestDir::new("pair-b")), opts);
    let port = free_port();
    let o = b.call_cli(&["ssh.update", &json!({"tcpport": port}).to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (b, port)
}

fn semi(url: &str, extra: Value) -> Value {
    // Loopback tests pair over plain HTTP, which keyhaven refuses unless asked.
    let mut v = json!({"url": url, "admin_username": "admin", "username": "root",
                       "allow_insecure_http": url.starts_with("http://")});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

#[tokio::test]
async fn semiautomatic_setup_between_two_daemons() {
    if skip() {
        return;
    }
    let a = Daemon::start();
    let (b, b_ssh) = remote_b(DaemonOpts::default()).await;
    let mut ca = a.admin().await;
    let kp = new_key_pair(&mut ca, "a-key").await;

    // Password login over HTTP.
    let mut args = semi(&b.url, json!({"password": ADMIN_PASSWORD}));
    args["name"] = json!("to-b");
    args["private_key"] = kp["id"].clone();
    let conn = ca.call("keychaincredential.remote_ssh_semiautomatic_setup", json!([args])).await;
    assert_eq!(conn["type"], "SSH_CREDENTIALS");
    let at = &conn["attributes"];
    assert_eq!(
        (at["host"].clone(), at["port"].clone(), at["username"].clone()),
        (json!("127.0.0.1"), json!(b_ssh), json!("root")),
        "{conn}"
    );
    let mut cb = b.admin().await;
    let cfg = cb.call("ssh.config", json!([])).await;
    let pinned: BTreeSet<&str> = at["remote_host_key"].as_str().unwrap().lines().collect();
    let b_keys: BTreeSet<&str> =
        cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap()).collect();
    assert_eq!(pinned, b_keys, "pinned = B's host keys");
    let r = ca.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
    assert_eq!(r["ok"], true, "{r}");

    // Plain ssh with the key downloaded from A and the pinned host keys.
    let work = TestDir::new("pair-ssh");
    std::fs::create_dir_all(work.path()).unwrap();
    let private = ca.call("keychaincredential.get_instance", json!([kp["id"]])).await["attributes"]["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let key = key_file(work.path(), "id", &private);
    let kh = work.path().join("known_hosts");
    let lines: Vec<String> = pinned.iter().map(|l| format!("[127.0.0.1]:{b_ssh} {l}")).collect();
    std::fs::write(&kh, lines.join("\n") + "\n").unwrap();
    let o = ssh_key_login(&key, &kh, b_ssh, "root");
    assert!(o.status.success(), "ssh failed: {}", String::from_utf8_lossy(&o.stderr));
    // Cross-check with B's own view of its host keys.
    let kh_b = known_hosts(&mut cb, work.path(), b_ssh).await;
    assert!(ssh_key_login(&key, &kh_b, b_ssh, "root").status.success());

    // Token login through setup_ssh_connection, reusing the key pair.
    let token = cb.call("auth.generate_token", json!([600, {}, false])).await;
    let conn2 = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "to-b-token", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": false, "existing_key_id": kp["id"]},
                    "semi_automatic_setup": semi(&b.url, json!({"token": token}))}]),
        )
        .await;
    assert_eq!(conn2["attributes"]["private_key"], kp["id"]);
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([conn2["id"]])).await["ok"], true);
    let root = cb.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    let pubkey = kp["attributes"]["public_key"].as_str().unwrap().trim();
    assert_eq!(root["sshpubkey"].as_str().unwrap().matches(pubkey).count(), 1, "key authorized once: {root}");

    // Generated key named by the caller.
    let conn3 = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "to-b-gen", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "to-b-gen Key"},
                    "semi_automatic_setup": semi(&b.url, json!({"password": ADMIN_PASSWORD}))}]),
        )
        .await;
    let gen = ca.call("keychaincredential.query", json!([[["name", "=", "to-b-gen Key"]], {"get": true}])).await;
    assert_eq!(conn3["attributes"]["private_key"], gen["id"]);
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([conn3["id"]])).await["ok"], true);

    // Failures.
    let mut bad = semi(&b.url, json!({"password": "wrong password"}));
    bad["name"] = json!("x1");
    bad["private_key"] = kp["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([bad])).await;
    assert_call_error(&e, "EFAULT", "Invalid username or password");
    let mut none = semi(&b.url, json!({}));
    none["name"] = json!("x2");
    none["private_key"] = kp["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([none])).await;
    assert_call_error(
        &e,
        "EFAULT",
        "You should specify either remote system password or temporary authentication token",
    );
    let mut nokey = semi(&b.url, json!({"password": ADMIN_PASSWORD}));
    nokey["name"] = json!("x3");
    nokey["private_key"] = json!(99999);
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([nokey])).await;
    assert_call_error(&e, "EFAULT", "Specified key pair not found");
    let mut down = semi(&format!("http://127.0.0.1:{}", free_port()), json!({"password": ADMIN_PASSWORD}));
    down["name"] = json!("x4");
    down["private_key"] = kp["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([down])).await;
    assert_call_error(&e, "EFAULT", "Unable to connect to remote system: ");
    // Existing connection name: normal create validation, after pairing.
    let mut dup = semi(&b.url, json!({"password": ADMIN_PASSWORD}));
    dup["name"] = json!("to-b");
    dup["private_key"] = kp["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([dup])).await;
    assert_field(&e, "keychain_credential_create.name", "Object with this name already exists");
    // The failed setup undid nothing it did not do: the key was on B before and stays.
    let root = cb.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    let kp_line =
        kp["attributes"]["public_key"].as_str().unwrap().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert!(root["sshpubkey"].as_str().unwrap_or("").contains(&kp_line), "a key authorized before was removed");
    // A key that pairing added is taken off B again when the setup fails.
    let fresh = new_key_pair(&mut ca, "dup-key").await;
    dup["private_key"] = fresh["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([dup])).await;
    assert_field(&e, "keychain_credential_create.name", "Object with this name already exists");
    let fresh_line =
        fresh["attributes"]["public_key"].as_str().unwrap().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let root = cb.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    assert!(!root["sshpubkey"].as_str().unwrap_or("").contains(&fresh_line), "a failed setup left its key on B");

    // Rollback of a generated key (invalid token).
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "rollback", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "rollback Key"},
                    "semi_automatic_setup": semi(&b.url, json!({"token": "not-a-token"}))}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "Invalid token");
    assert_eq!(
        ca.call("keychaincredential.query", json!([[["name", "in", ["rollback Key", "rollback"]]], {"count": true}]))
            .await,
        0
    );

    // Name pre-validation: all problems at once, nothing created.
    let before = ca.call("keychaincredential.query", json!([[], {"count": true}])).await;
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "to-b", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "a-key"},
                    "semi_automatic_setup": semi(&b.url, json!({"password": ADMIN_PASSWORD}))}]),
        )
        .await;
    assert_field(&e, "setup_ssh_connection.private_key.name", "Is already in use by another SSH Key pair");
    assert_field(&e, "setup_ssh_connection.connection_name", "Is already in use by another Keychain Credential");
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "new-one", "setup_type": "MANUAL",
                    "private_key": {"generate_key": false, "existing_key_id": 99999},
                    "manual_setup": {"host": "h", "remote_host_key": "x"}}]),
        )
        .await;
    assert_field(&e, "setup_ssh_connection.private_key.existing_key_id", "SSH Key Pair not found");
    // The generated key's type and size (a keyhaven extension) are checked up front too.
    let bad_key = |pk: Value| {
        json!([{"connection_name": "new-one", "setup_type": "MANUAL", "private_key": pk,
                "manual_setup": {"host": "h", "remote_host_key": "x"}}])
    };
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            bad_key(json!({"generate_key": true, "name": "k", "key_type": "DSA"})),
        )
        .await;
    assert_field(&e, "setup_ssh_connection.private_key.key_type", "Input should be 'ED25519', 'ECDSA' or 'RSA'");
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            bad_key(json!({"generate_key": true, "name": "k", "key_type": "RSA", "size": 1024})),
        )
        .await;
    assert_field(&e, "setup_ssh_connection.private_key.size", "RSA keys must be 2048, 3072 or 4096 bits");
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            bad_key(json!({"generate_key": false, "existing_key_id": kp["id"], "key_type": "RSA"})),
        )
        .await;
    assert_field(&e, "setup_ssh_connection.private_key.key_type", "Extra inputs are not permitted");
    assert_eq!(ca.call("keychaincredential.query", json!([[], {"count": true}])).await, before);

    // Manual setup with a generated key.
    let hk =
        ca.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": b_ssh}])).await;
    let m = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "manual-b", "setup_type": "MANUAL",
                    "private_key": {"generate_key": true, "name": "manual-b Key", "key_type": "ECDSA", "size": 384},
                    "manual_setup": {"host": "127.0.0.1", "port": b_ssh, "remote_host_key": hk}}]),
        )
        .await;
    assert_eq!(m["attributes"]["remote_host_key"], hk);
    let key = ca
        .call("keychaincredential.query", json!([[["id", "=", m["attributes"]["private_key"]]], {"get": true}]))
        .await;
    assert_eq!(key["name"], "manual-b Key");
    let public = key["attributes"]["public_key"].as_str().unwrap();
    assert!(public.starts_with("ecdsa-sha2-nistp384 "), "{public}");
}

#[tokio::test]
async fn semiautomatic_setup_over_https_honours_verify_ssl() {
    if skip() {
        return;
    }
    let a = Daemon::start();
    let (b, b_ssh) =
        remote_b(DaemonOpts { env: vec![("KEYHAVEN_TLS".into(), "true".into())], ..DaemonOpts::default() }).await;
    assert!(b.url.starts_with("https://"), "{}", b.url);
    let mut ca = a.admin().await;
    let kp = new_key_pair(&mut ca, "tls-key").await;
    let mut args = semi(&b.url, json!({"password": ADMIN_PASSWORD}));
    args["name"] = json!("tls");
    args["private_key"] = kp["id"].clone();
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([args.clone()])).await;
    assert_eq!(e["data"]["error"], 208, "{e}");
    assert_call_error(&e, "ESSLCERTVERIFICATIONERROR", "certificate");
    // The refusal names the certificate it saw, as openssl prints B's certificate file.
    let b_fp = b.tls_fingerprint();
    assert_eq!(b_fp.len(), 95, "{b_fp}");
    let reason = e["data"]["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("SHA-256 fingerprint {b_fp}")), "{reason}");

    // keyhaven extension: pin that certificate instead of turning verification off.
    let mut wrong = args.clone();
    wrong["tls_fingerprint"] = json!("00".repeat(32));
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([wrong.clone()])).await;
    assert_call_error(&e, "ESSLCERTVERIFICATIONERROR", "the certificate changed since you trusted it");
    assert!(e["data"]["reason"].as_str().unwrap().contains(&b_fp), "{e}");
    wrong["tls_fingerprint"] = json!("not a fingerprint");
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([wrong])).await;
    assert_field(&e, "keychain_remote_ssh_semiautomatic_setup.tls_fingerprint", "64 hexadecimal digits");
    let mut plain = args.clone();
    plain["url"] = json!(b.url.replacen("https://", "http://", 1));
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([plain.clone()])).await;
    assert_field(&e, "keychain_remote_ssh_semiautomatic_setup.url", "http:// would send the remote admin password");
    plain["allow_insecure_http"] = json!(true);
    plain["tls_fingerprint"] = json!(format!("sha256 Fingerprint={b_fp}"));
    let e = ca.err("keychaincredential.remote_ssh_semiautomatic_setup", json!([plain])).await;
    assert_field(&e, "keychain_remote_ssh_semiautomatic_setup.tls_fingerprint", "only be pinned for an https:// URL");
    let mut pinned = args.clone();
    pinned["name"] = json!("tls-pinned");
    pinned["tls_fingerprint"] = json!(format!("sha256 Fingerprint={}", b_fp.to_lowercase()));
    let conn = ca.call("keychaincredential.remote_ssh_semiautomatic_setup", json!([pinned])).await;
    assert_eq!(conn["attributes"]["port"], b_ssh);

    args["verify_ssl"] = json!(false);
    let conn = ca.call("keychaincredential.remote_ssh_semiautomatic_setup", json!([args])).await;
    assert_eq!(conn["attributes"]["port"], b_ssh);
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await["ok"], true);
}

/// What a TrueNAS system does when it pairs with keyhaven: the legacy
/// `/websocket` dialect, `auth.login`, `ssh_pair`, `user.query` + `user.update`.
#[tokio::test]
async fn legacy_dialect_pairing_path() {
    use keyhaven_server::remote::{Dialect, RpcClient};
    if skip() {
        return;
    }
    let (b, b_ssh) = remote_b(DaemonOpts::default()).await;
    let mut c = RpcClient::connect(&b.url, Dialect::Legacy, true, std::time::Duration::from_secs(60)).await.unwrap();
    assert_eq!(c.call("auth.login", vec![json!("admin"), json!("wrong")]).await.unwrap(), json!(false));
    assert_eq!(c.call("auth.login", vec![json!("admin"), json!(ADMIN_PASSWORD)]).await.unwrap(), json!(true));
    let mut cb = b.admin().await;
    let kp = cb.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let r = c
        .call(
            "keychaincredential.ssh_pair",
            vec![json!({"remote_hostname": "any-host", "username": "root", "public_key": kp["public_key"]})],
        )
        .await
        .unwrap();
    assert_eq!(r["port"], b_ssh);
    assert!(r["host_key"].as_str().unwrap().contains("any-host ssh-"), "{r}");
    let e = c
        .call(
            "keychaincredential.ssh_pair",
            vec![json!({"remote_hostname": "any-host", "username": "ghost", "public_key": kp["public_key"]})],
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("User ghost does not exist"), "{e}");
    let u = c
        .call("user.query", vec![json!([["username", "=", "root"], ["local", "=", true]]), json!({"get": true})])
        .await
        .unwrap();
    c.call("user.update", vec![u["id"].clone(), json!({})]).await.unwrap();
    c.close().await;
    let work = TestDir::new("pair-legacy");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut cb, work.path(), b_ssh).await;
    let key = key_file(work.path(), "id", kp["private_key"].as_str().unwrap());
    let o = ssh_key_login(&key, &kh, b_ssh, "root");
    assert!(o.status.success(), "ssh failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[tokio::test]
async fn semiautomatic_setup_with_otp_and_sudo_for_a_non_root_user() {
    if skip() {
        return;
    }
    let a = Daemon::start();
    // B manages OS accounts (as TrueNAS does), so pairing may give the account a shell.
    let manage = DaemonOpts { env: vec![("KEYHAVEN_ACCOUNTS_MANAGE_OS".into(), "true".into())], ..Default::default() };
    let (b, _b_ssh) = remote_b(manage).await;
    let mut cb = b.admin().await;
    // B's admin has two-factor login.
    let e = cb.call("user.renew_2fa_secret", json!(["admin", {}])).await;
    let uri = e["provisioning_uri"].as_str().unwrap().to_string();
    let (_, totp) = totp_from_uri(&uri);
    // The SSH user on B, made by keyhaven (useradd), with a nologin shell.
    let account = OsUserGuard::new("khpair");
    let user = account.name.clone();
    cb.call(
        "user.create",
        json!([{"username": user, "full_name": "", "password_disabled": true, "shell": "/usr/sbin/nologin"}]),
    )
    .await;

    let mut ca = a.admin().await;
    let setup = |otp: &str| {
        json!([{"connection_name": format!("otp-{otp}"), "setup_type": "SEMI-AUTOMATIC",
                "private_key": {"generate_key": true, "name": format!("otp-{otp} Key")},
                "semi_automatic_setup": semi(&b.url, json!({"password": ADMIN_PASSWORD, "otp_token": otp, "username": user, "sudo": true}))}])
    };
    // Without the code: refused, and the generated key is rolled back.
    let e = ca.err("keychaincredential.setup_ssh_connection", setup("")).await;
    assert_eq!(e["code"], -32001, "{e}");
    assert_eq!(ca.call("keychaincredential.query", json!([[["name", "=", "otp- Key"]], {"count": true}])).await, 0);
    // A wrong code: refused too.
    let e = ca.err("keychaincredential.setup_ssh_connection", setup("000000")).await;
    assert_eq!(e["code"], -32001, "{e}");
    // The right code (OTP_TOKEN continuation on the same connection): paired.
    let code = totp.generate_current().to_string();
    let conn = ca.call("keychaincredential.setup_ssh_connection", setup(&code)).await;
    assert_eq!(conn["attributes"]["username"], user);
    // The remote user got a login shell (in the OS: the entry shows the OS's) and
    // passwordless sudo for zfs, and the key.
    let u = cb.call("user.query", json!([[["username", "=", user]], {"get": true}])).await;
    assert_eq!(u["shell"], "/usr/bin/bash", "{u}");
    assert_eq!(u["os_account"]["state"], "OK", "{u}");
    assert_eq!(u["sudo_commands_nopasswd"], json!(["/usr/sbin/zfs"]));
    assert!(u["sshpubkey"].as_str().unwrap().starts_with("ssh-ed25519 "));
}

/// A front for keyhaven B that answers like a TrueNAS older than 25.04, which
/// has no `/api/current`: that path gets 404, every other request is passed to
/// B unchanged. Not a mock: B's real legacy `/websocket` endpoint answers.
struct LegacyOnlyFront {
    url: String,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LegacyOnlyFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn legacy_only_front(b: std::net::SocketAddr) -> LegacyOnlyFront {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (refused, forwarded) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, f) = (refused.clone(), forwarded.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (r, f) = (r.clone(), f.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let request_line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_string();
                if request_line.contains(" /api/current") {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = client
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nNot Found")
                        .await;
                    return;
                }
                f.fetch_add(1, Ordering::SeqCst);
                let Ok(mut upstream) = tokio::net::TcpStream::connect(b).await else { return };
                if upstream.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    LegacyOnlyFront { url, refused, forwarded, task }
}

/// The local side of pairing against a remote without `/api/current` falls
/// back to the legacy `/websocket` dialect: password and token logins, a
/// generated key, pinned host keys, a working connection.
#[tokio::test]
async fn semiautomatic_setup_falls_back_to_the_legacy_websocket() {
    use std::sync::atomic::Ordering;
    if skip() {
        return;
    }
    let a = Daemon::start();
    let (b, b_ssh) = remote_b(DaemonOpts::default()).await;
    let front = legacy_only_front(b.addr).await;
    let mut ca = a.admin().await;
    let mut cb = b.admin().await;

    let conn = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "old-nas", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "old-nas Key"},
                    "semi_automatic_setup": semi(&front.url, json!({"password": ADMIN_PASSWORD}))}]),
        )
        .await;
    assert!(front.refused.load(Ordering::SeqCst) >= 1, "/api/current was not tried first");
    assert!(front.forwarded.load(Ordering::SeqCst) >= 1, "no fallback to /websocket");
    let at = &conn["attributes"];
    assert_eq!((at["host"].clone(), at["port"].clone()), (json!("127.0.0.1"), json!(b_ssh)), "{conn}");
    let cfg = cb.call("ssh.config", json!([])).await;
    let pinned: BTreeSet<&str> = at["remote_host_key"].as_str().unwrap().lines().collect();
    let b_keys: BTreeSet<&str> =
        cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap()).collect();
    assert_eq!(pinned, b_keys, "pinned = B's host keys");
    let r = ca.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
    assert_eq!(r["ok"], true, "{r}");
    // B saw a legacy password login (auth.login) for it.
    let logins = cb
        .call(
            "audit.query",
            json!([[["event", "=", "AUTHENTICATION"], ["success", "=", true]], {"select": ["event_data"]}]),
        )
        .await;
    assert!(logins.to_string().contains("PASSWORD_PLAIN"), "{logins}");

    // Token login over the legacy dialect (auth.login_with_token), reusing the key.
    let token = cb.call("auth.generate_token", json!([600, {}, false])).await;
    let conn2 = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "old-nas-token", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": false, "existing_key_id": at["private_key"]},
                    "semi_automatic_setup": semi(&front.url, json!({"token": token}))}]),
        )
        .await;
    let r = ca.call("keychaincredential.test_ssh_connection", json!([conn2["id"]])).await;
    assert_eq!(r["ok"], true, "{r}");

    // A wrong password is reported as TrueNAS words it, and nothing is created.
    let before = ca.call("keychaincredential.query", json!([[], {"count": true}])).await;
    let e = ca
        .err(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "old-nas-bad", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "old-nas-bad Key"},
                    "semi_automatic_setup": semi(&front.url, json!({"password": "wrong"}))}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "Invalid username or password");
    assert_eq!(ca.call("keychaincredential.query", json!([[], {"count": true}])).await, before);
}

async fn attributes_of(c: &mut Client, id: &Value) -> Value {
    c.call("keychaincredential.get_instance", json!([id])).await["attributes"].clone()
}

async fn credential_count(c: &mut Client) -> Value {
    c.call("keychaincredential.query", json!([[], {"count": true}])).await
}

/// Re-pairing an existing connection (keyhaven extension): with a new key pair
/// the remote gets the new key, the connection switches only once the new key
/// logs in, and the old key leaves the remote account; without one, the pinned
/// host keys are refreshed. Failures change nothing.
#[tokio::test]
async fn re_pair_rotates_the_key_and_refreshes_host_keys() {
    if skip() {
        return;
    }
    let a = Daemon::start();
    let (b, b_ssh) = remote_b(DaemonOpts::default()).await;
    let mut ca = a.admin().await;
    let mut cb = b.admin().await;
    let conn = ca
        .call(
            "keychaincredential.setup_ssh_connection",
            json!([{"connection_name": "to-b", "setup_type": "SEMI-AUTOMATIC",
                    "private_key": {"generate_key": true, "name": "to-b Key"},
                    "semi_automatic_setup": semi(&b.url, json!({"password": ADMIN_PASSWORD}))}]),
        )
        .await;
    let id = conn["id"].clone();
    let old_key = conn["attributes"]["private_key"].clone();
    let old_attrs = attributes_of(&mut ca, &old_key).await;
    let work = TestDir::new("re-pair");
    std::fs::create_dir_all(work.path()).unwrap();
    let kh = known_hosts(&mut cb, work.path(), b_ssh).await;
    let old_file = key_file(work.path(), "old", old_attrs["private_key"].as_str().unwrap());
    assert!(ssh_key_login(&old_file, &kh, b_ssh, "root").status.success(), "the paired key logs in");

    // Failures first: each leaves the connection and the key pairs as they were.
    let before = credential_count(&mut ca).await;
    let re_pair = |auth: Value, new_key: Value| json!([id.clone(), {"semi_automatic_setup": semi(&b.url, auth), "new_key": new_key}]);
    let e = ca
        .err(
            "keychaincredential.re_pair_ssh_connection",
            re_pair(json!({"password": "wrong"}), json!({"name": "to-b Key 2"})),
        )
        .await;
    assert_call_error(&e, "EFAULT", "Invalid username or password");
    let e = ca
        .err(
            "keychaincredential.re_pair_ssh_connection",
            re_pair(json!({"password": ADMIN_PASSWORD}), json!({"name": "to-b Key", "key_type": "ED25519"})),
        )
        .await;
    assert_field(&e, "keychain_re_pair_ssh_connection.new_key.name", "already in use");
    let e = ca
        .err(
            "keychaincredential.re_pair_ssh_connection",
            re_pair(json!({"password": ADMIN_PASSWORD}), json!({"name": "k", "key_type": "DSA"})),
        )
        .await;
    assert_field(&e, "keychain_re_pair_ssh_connection.new_key.key_type", "Input should be");
    let e = ca
        .err(
            "keychaincredential.re_pair_ssh_connection",
            json!([old_key.clone(), {"semi_automatic_setup": semi(&b.url, json!({"password": ADMIN_PASSWORD}))}]),
        )
        .await;
    assert_field(&e, "keychain_re_pair_ssh_connection.id", "is not an SSH connection");
    assert_eq!(credential_count(&mut ca).await, before, "a refused re-pair created or removed credentials");
    assert_eq!(ca.call("keychaincredential.get_instance", json!([id.clone()])).await, conn, "connection changed");
    // The OS account `daemon` has the nologin shell and B does not manage OS
    // accounts: B refuses before changing anything, and A keeps everything.
    cb.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "", "password_disabled": true, "shell": "/usr/sbin/nologin"}]),
    )
    .await;
    let mut as_daemon = semi(&b.url, json!({"password": ADMIN_PASSWORD}));
    as_daemon["username"] = json!("daemon");
    let e = ca
        .err(
            "keychaincredential.re_pair_ssh_connection",
            json!([id.clone(), {"semi_automatic_setup": as_daemon, "new_key": {"name": "to-b Key 3"}}]),
        )
        .await;
    assert_call_error(&e, "EFAULT", "User daemon cannot run commands over SSH: its login shell is /usr/sbin/nologin");
    assert_eq!(credential_count(&mut ca).await, before, "the generated key pair was kept");
    assert_eq!(ca.call("keychaincredential.get_instance", json!([id.clone()])).await, conn, "connection changed");
    let daemon = cb.call("user.query", json!([[["username", "=", "daemon"]], {"get": true}])).await;
    assert!(daemon["sshpubkey"].is_null(), "the new key stayed on B: {daemon}");
    assert_eq!(daemon["shell"], "/usr/sbin/nologin", "the shell pairing set on B was not put back");

    // Rotation.
    let r = ca
        .call(
            "keychaincredential.re_pair_ssh_connection",
            re_pair(json!({"password": ADMIN_PASSWORD}), json!({"name": "to-b Key 2", "key_type": "ECDSA"})),
        )
        .await;
    assert_eq!(r["old_key_pair"], old_key);
    assert_eq!(r["old_key_removed_from_remote"], true, "{r}");
    assert!(r["old_key_kept_because"].is_null(), "{r}");
    let new_key = r["connection"]["attributes"]["private_key"].clone();
    assert_ne!(new_key, old_key);
    let new_attrs = attributes_of(&mut ca, &new_key).await;
    assert!(new_attrs["public_key"].as_str().unwrap().starts_with("ecdsa-sha2-nistp256 "));
    let root = cb.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    let authorized = root["sshpubkey"].as_str().unwrap_or("");
    let body = |k: &Value| k["public_key"].as_str().unwrap().split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    assert!(authorized.contains(&body(&new_attrs)), "new key not on B: {authorized}");
    assert!(!authorized.contains(&body(&old_attrs)), "old key still on B: {authorized}");
    let new_file = key_file(work.path(), "new", new_attrs["private_key"].as_str().unwrap());
    assert!(ssh_key_login(&new_file, &kh, b_ssh, "root").status.success(), "the new key logs in");
    assert!(!ssh_key_login(&old_file, &kh, b_ssh, "root").status.success(), "the old key still logs in");
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([id.clone()])).await["ok"], true);
    // The old key pair stays (the caller decides), now used by nothing.
    assert_eq!(ca.call("keychaincredential.used_by", json!([old_key.clone()])).await, json!([]));

    // Without a new key: the pinned host keys come from B again.
    let mut attrs = r["connection"]["attributes"].clone();
    let decoy = ca.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    attrs["remote_host_key"] = json!(body(&decoy));
    ca.call("keychaincredential.update", json!([id.clone(), {"attributes": attrs}])).await;
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([id.clone()])).await["stage"], "host_key");
    let token = cb.call("auth.generate_token", json!([600, {}, false])).await;
    let r = ca
        .call(
            "keychaincredential.re_pair_ssh_connection",
            json!([id.clone(), {"semi_automatic_setup": semi(&b.url, json!({"token": token}))}]),
        )
        .await;
    assert!(r["old_key_pair"].is_null(), "{r}");
    assert_eq!(r["connection"]["attributes"]["private_key"], new_key);
    let cfg = cb.call("ssh.config", json!([])).await;
    let pinned: BTreeSet<&str> = r["connection"]["attributes"]["remote_host_key"].as_str().unwrap().lines().collect();
    let b_keys: BTreeSet<&str> =
        cfg["host_keys"].as_array().unwrap().iter().map(|k| k["public_key"].as_str().unwrap()).collect();
    assert_eq!(pinned, b_keys);
    assert_eq!(ca.call("keychaincredential.test_ssh_connection", json!([id])).await["ok"], true);
    // Another connection with the same key pair keeps the old key on the remote.
    let cur = ca.call("keychaincredential.get_instance", json!([id.clone()])).await["attributes"].clone();
    ca.call("keychaincredential.create", json!([{"name": "to-b-2", "type": "SSH_CREDENTIALS", "attributes": cur}]))
        .await;
    let r = ca
        .call(
            "keychaincredential.re_pair_ssh_connection",
            re_pair(json!({"password": ADMIN_PASSWORD}), json!({"name": "to-b Key 3"})),
        )
        .await;
    assert_eq!(r["old_key_removed_from_remote"], false, "{r}");
    assert!(r["old_key_kept_because"].as_str().unwrap().contains("(to-b-2)"), "{r}");
    let root = cb.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await;
    assert!(root["sshpubkey"].as_str().unwrap().contains(&body(&new_attrs)), "a shared key was removed from B");
    // Trying another key pair without switching (manual rotation): the key taken
    // off B fails at authentication, one still on B logs in, an unknown one is a field error.
    let t = ca.call("keychaincredential.test_ssh_connection", json!([id.clone(), {"private_key": old_key}])).await;
    assert_eq!((t["ok"].clone(), t["stage"].clone()), (json!(false), json!("auth")), "{t}");
    let t = ca.call("keychaincredential.test_ssh_connection", json!([id.clone(), {"private_key": new_key}])).await;
    assert_eq!(t["ok"], true, "{t}");
    let e = ca.err("keychaincredential.test_ssh_connection", json!([id.clone(), {"private_key": 987654}])).await;
    assert_field(&e, "keychain_test_ssh_connection.options.private_key", "does not exist");
    // Audited on A.
    let audit = ca
        .call("audit.query", json!([[["event_data.method", "=", "keychaincredential.re_pair_ssh_connection"], ["success", "=", true]], {"count": true}]))
        .await;
    assert_eq!(audit, 3);
}
