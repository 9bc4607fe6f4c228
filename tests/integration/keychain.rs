//! `keychaincredential.*` (issue 3, "SSH key pairs"): CRUD as TrueNAS, key-pair
//! validation and normalisation, generation checked against `ssh-keygen`,
//! imports of `ssh-keygen` keys, SSH_CREDENTIALS validation, file downloads,
//! the `keyhaven keypair` CLI, bad input, and no key material at rest or in logs.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

const CREATE: &str = "keychain_credential_create";
const UPDATE: &str = "keychain_credentials_update";
const OPENSSH_HEADER: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A 0700 directory for key files handed to `ssh-keygen` (removed on drop).
fn files_dir(tag: &str) -> TestDir {
    let t = TestDir::new(tag);
    std::fs::create_dir_all(t.path()).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    t
}

/// Write a file with the given mode (ssh-keygen refuses private keys readable by others).
fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    use std::io::Write;
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p
}

fn write_secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    write_file(dir, name, text, 0o600)
}

fn ssh_keygen(args: &[&str]) -> Output {
    Command::new("ssh-keygen").args(args).stdin(Stdio::null()).output().expect("run ssh-keygen")
}

fn ssh_keygen_ok(args: &[&str]) -> String {
    let o = ssh_keygen(args);
    assert!(o.status.success(), "ssh-keygen {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// `(bits, "SHA256:…")` as `ssh-keygen -l` prints them for a key file.
fn keygen_fingerprint(file: &Path) -> (u64, String) {
    let out = ssh_keygen_ok(&["-l", "-E", "sha256", "-f", file.to_str().unwrap()]);
    let mut t = out.split_whitespace();
    let bits = t.next().unwrap().parse().unwrap();
    (bits, t.next().unwrap().to_string())
}

/// The public key `ssh-keygen -y` derives from a private key file (unencrypted unless `pass`).
fn keygen_public(file: &Path, pass: &str) -> String {
    ssh_keygen_ok(&["-y", "-P", pass, "-f", file.to_str().unwrap()])
}

/// `"type base64"` of a public key line (comment dropped).
fn key_blob(public: &str) -> String {
    public.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// Base64 body lines of a PEM/OpenSSH private key, for leak searches. Lines that
/// also occur in the (plaintext) public key's base64 are not secret and are skipped.
fn secret_lines(private: &str, public: &str) -> Vec<String> {
    let public_b64 = public.split_whitespace().nth(1).unwrap_or("");
    private
        .lines()
        .map(str::trim)
        .filter(|l| l.len() >= 24 && !l.starts_with("-----") && !l.contains(':'))
        .filter(|l| !public_b64.contains(l))
        .map(str::to_string)
        .collect()
}

/// Stop the daemon, then search every file of its data dir and its stderr.
/// `control` (a credential name) must be found, proving the search sees stored text.
fn assert_no_key_material(d: &mut Daemon, control: &str, keys: &[(String, String)], passphrases: &[&str]) {
    d.stop();
    std::thread::sleep(Duration::from_millis(100));
    let files = stored_bytes(d.dir.path());
    assert!(files.iter().any(|(p, _)| is_database(p)), "no database under {}", d.dir.path().display());
    assert!(
        files.iter().any(|(_, b)| contains(b, control.as_bytes())),
        "the search does not see stored data ({control})"
    );
    let log = d.stderr();
    let mut checked = 0;
    for (private, public) in keys {
        let lines = secret_lines(private, public);
        assert!(!lines.is_empty(), "no body lines found in a private key");
        for l in &lines {
            checked += 1;
            for (path, bytes) in &files {
                // pg_dump writes bytea as hex.
                for form in [l.as_bytes().to_vec(), hex(l.as_bytes()).into_bytes()] {
                    assert!(!contains(bytes, &form), "{} contains private key material ({l})", path.display());
                }
            }
            assert!(!log.contains(l.as_str()), "the daemon log contains private key material ({l})");
        }
    }
    for p in passphrases {
        for (path, bytes) in &files {
            for form in [p.as_bytes().to_vec(), hex(p.as_bytes()).into_bytes()] {
                assert!(!contains(bytes, &form), "{} contains a passphrase", path.display());
            }
        }
        assert!(!log.contains(p), "the daemon log contains a passphrase");
    }
    assert!(checked > 0);
}

async fn count(a: &mut Client) -> i64 {
    a.call("keychaincredential.query", json!([[], {"count": true}])).await.as_i64().unwrap()
}

async fn generate(a: &mut Client, opts: Value) -> (String, String) {
    let params = if opts.is_null() { json!([]) } else { json!([opts]) };
    let kp = a.call("keychaincredential.generate_ssh_key_pair", params).await;
    (kp["private_key"].as_str().unwrap().to_string(), kp["public_key"].as_str().unwrap().to_string())
}

async fn create_pair(a: &mut Client, name: &str, attrs: Value) -> Value {
    a.call("keychaincredential.create", json!([{"name": name, "type": "SSH_KEY_PAIR", "attributes": attrs}])).await
}

/// A stored Ed25519 key pair with a private key.
async fn new_pair(a: &mut Client, name: &str) -> Value {
    let (private, _) = generate(a, Value::Null).await;
    create_pair(a, name, json!({"private_key": private})).await
}

fn conn_attrs(kp: i64, host_key: &str) -> Value {
    json!({"host": "backup.example.com", "port": 2222, "username": "repl", "private_key": kp,
           "remote_host_key": host_key, "connect_timeout": 15})
}

async fn create_conn(a: &mut Client, name: &str, attrs: Value) -> Value {
    a.call("keychaincredential.create", json!([{"name": name, "type": "SSH_CREDENTIALS", "attributes": attrs}])).await
}

async fn create_err(a: &mut Client, name: &str, kind: &str, attrs: Value) -> Value {
    a.err("keychaincredential.create", json!([{"name": name, "type": kind, "attributes": attrs}])).await
}

/// The exact error of an unknown id (TrueNAS InstanceNotFound).
fn assert_not_found(e: &Value, id: i64) {
    assert_eq!(e["code"], -32602, "{e}");
    assert_eq!(e["data"]["extra"], json!([[null, format!("KeychainCredential {id} does not exist"), 2]]), "{e}");
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// `keyhaven keypair ARGS --data-dir <daemon dir>`, run in `cwd`.
fn keypair_cli(d: &Daemon, cwd: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .arg("keypair")
        .args(args)
        .arg("--data-dir")
        .arg(d.dir.path())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn keypair_cli_ok(d: &Daemon, cwd: &Path, args: &[&str]) -> (String, String) {
    let o = keypair_cli(d, cwd, args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "keyhaven keypair {args:?} failed: {err}");
    (out, err)
}

// ---------------------------------------------------------------------------
// CRUD, name space, used_by, cascade
// ---------------------------------------------------------------------------

#[tokio::test]
async fn crud_names_used_by_and_cascade_delete() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    assert_eq!(a.call("keychaincredential.query", json!([])).await, json!([]));

    let kp = new_pair(&mut a, "k1").await;
    let kp_id = kp["id"].as_i64().unwrap();
    assert_eq!(kp["name"], "k1");
    assert_eq!(kp["type"], "SSH_KEY_PAIR");
    // TrueNAS's attributes shape (keyhaven's extras are top-level).
    let mut keys: Vec<&String> = kp["attributes"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["private_key", "public_key"]);
    assert!(kp["attributes"]["private_key"].as_str().unwrap().starts_with(OPENSSH_HEADER));
    assert_eq!(kp["key_type"], "ssh-ed25519");
    assert_eq!(kp["algorithm"], "ED25519");
    assert_eq!(kp["bits"], 256);
    assert!(kp["fingerprint"].as_str().unwrap().starts_with("SHA256:"));

    // get_instance == query by id (with get), and both carry the private key.
    let got = a.call("keychaincredential.get_instance", json!([kp_id])).await;
    assert_eq!(got, kp);
    assert_eq!(a.call("keychaincredential.query", json!([[["id", "=", kp_id]], {"get": true}])).await, kp);

    // A host key for the connections: another key pair's public key.
    let (_, host_pub) = generate(&mut a, json!({"key_type": "ECDSA"})).await;
    let host_key = key_blob(&host_pub);
    let c1 = create_conn(&mut a, "conn1", conn_attrs(kp_id, &host_key)).await;
    let c1_id = c1["id"].as_i64().unwrap();
    assert_eq!(c1["type"], "SSH_CREDENTIALS");
    assert_eq!(
        c1["attributes"],
        json!({"host": "backup.example.com", "port": 2222, "username": "repl", "private_key": kp_id,
               "remote_host_key": host_key, "connect_timeout": 15})
    );
    let c2 =
        create_conn(&mut a, "conn2", json!({"host": "10.0.0.9", "private_key": kp_id, "remote_host_key": host_key}))
            .await;
    let c2_id = c2["id"].as_i64().unwrap();
    // Defaults as TrueNAS.
    assert_eq!(c2["attributes"]["port"], 22);
    assert_eq!(c2["attributes"]["username"], "root");
    assert_eq!(c2["attributes"]["connect_timeout"], 10);

    // Names are unique across both types; checked first (bad attributes are not even looked at).
    let clash = vec![(format!("{CREATE}.name"), "Object with this name already exists".to_string())];
    for taken in ["k1", "conn1"] {
        let e = create_err(&mut a, taken, "SSH_KEY_PAIR", json!({"public_key": "junk"})).await;
        assert_eq!(extra(&e), clash, "{taken}");
        let e = create_err(
            &mut a,
            taken,
            "SSH_CREDENTIALS",
            json!({"host": "", "private_key": 0, "remote_host_key": "junk"}),
        )
        .await;
        assert_eq!(extra(&e), clash, "{taken}");
    }
    let e = create_err(&mut a, "", "SSH_KEY_PAIR", json!({"public_key": kp["attributes"]["public_key"]})).await;
    assert_field(&e, &format!("{CREATE}.name"), "at least 1 character");

    // Queries.
    let conns =
        a.call("keychaincredential.query", json!([[["type", "=", "SSH_CREDENTIALS"]], {"order_by": ["name"]}])).await;
    assert_eq!(
        conns.as_array().unwrap().iter().map(|c| c["name"].clone()).collect::<Vec<_>>(),
        vec![json!("conn1"), json!("conn2")]
    );
    assert_eq!(count(&mut a).await, 3);
    let sel = a.call("keychaincredential.query", json!([[["name", "=", "k1"]], {"select": ["id", "name"]}])).await;
    assert_eq!(sel, json!([{"id": kp_id, "name": "k1"}]));

    // Update: rename, clash, attributes replaced wholesale, key replaced.
    let e = a.err("keychaincredential.update", json!([c1_id, {"name": "k1"}])).await;
    assert_eq!(extra(&e), vec![(format!("{UPDATE}.name"), "Object with this name already exists".to_string())]);
    let e = a.err("keychaincredential.update", json!([kp_id, {"name": "conn2"}])).await;
    assert_field(&e, &format!("{UPDATE}.name"), "Object with this name already exists");
    let same = a.call("keychaincredential.update", json!([kp_id, {"name": "k1"}])).await;
    assert_eq!(same, kp, "renaming to its own name changes nothing");
    let renamed = a.call("keychaincredential.update", json!([kp_id, {"name": "k1-renamed"}])).await;
    assert_eq!(renamed["name"], "k1-renamed");
    assert_eq!(renamed["attributes"], kp["attributes"], "a rename keeps the keys (private key included)");
    let c1u = a
        .call(
            "keychaincredential.update",
            json!([c1_id, {"attributes": {"host": "h2", "private_key": kp_id, "remote_host_key": host_key}}]),
        )
        .await;
    assert_eq!(c1u["attributes"]["host"], "h2");
    assert_eq!(c1u["attributes"]["port"], 22, "attributes are replaced wholesale, not merged");
    assert_eq!(c1u["attributes"]["username"], "root");
    let (priv2, pub2) = generate(&mut a, json!({"key_type": "ECDSA", "size": 384})).await;
    let kp_u = a.call("keychaincredential.update", json!([kp_id, {"attributes": {"private_key": priv2}}])).await;
    assert_eq!(key_blob(kp_u["attributes"]["public_key"].as_str().unwrap()), key_blob(&pub2));
    assert_eq!(kp_u["algorithm"], "ECDSA");
    assert_eq!(kp_u["bits"], 384);
    assert_ne!(kp_u["fingerprint"], kp["fingerprint"]);
    assert_eq!(a.call("keychaincredential.get_instance", json!([kp_id])).await, kp_u);

    // An unused pair may be made public-only by update.
    let k3 = new_pair(&mut a, "k3").await;
    let k3_id = k3["id"].as_i64().unwrap();
    let k3u = a
        .call(
            "keychaincredential.update",
            json!([k3_id, {"attributes": {"public_key": k3["attributes"]["public_key"]}}]),
        )
        .await;
    assert_eq!(k3u["attributes"]["private_key"], Value::Null);
    assert_eq!(k3u["fingerprint"], k3["fingerprint"]);

    // Unknown ids.
    assert_not_found(&a.err("keychaincredential.get_instance", json!([999])).await, 999);
    assert_not_found(&a.err("keychaincredential.update", json!([999, {"name": "x"}])).await, 999);
    assert_not_found(&a.err("keychaincredential.delete", json!([999])).await, 999);
    assert_not_found(&a.err("keychaincredential.used_by", json!([999])).await, 999);

    // used_by.
    let used = a.call("keychaincredential.used_by", json!([kp_id])).await;
    let mut used = used.as_array().unwrap().clone();
    used.sort_by_key(|u| u["title"].as_str().unwrap().to_string());
    assert_eq!(
        used,
        vec![
            json!({"title": "SSH credentials conn1", "unbind_method": "delete"}),
            json!({"title": "SSH credentials conn2", "unbind_method": "delete"}),
        ]
    );
    assert_eq!(a.call("keychaincredential.used_by", json!([c1_id])).await, json!([]));
    assert_eq!(a.call("keychaincredential.used_by", json!([k3_id])).await, json!([]));

    // Delete of a used pair without cascade: refused, nothing deleted.
    let before = a.call("keychaincredential.query", json!([])).await;
    for params in [json!([kp_id]), json!([kp_id, {}]), json!([kp_id, {"cascade": false}])] {
        let e = a.err("keychaincredential.delete", params).await;
        assert_eq!(
            extra(&e),
            vec![(
                "options.cascade".to_string(),
                "This credential is used and no cascade option is specified".to_string()
            )]
        );
    }
    assert_eq!(a.call("keychaincredential.query", json!([])).await, before);

    // A connection itself can be deleted without cascade.
    assert_eq!(a.call("keychaincredential.delete", json!([c2_id])).await, Value::Null);
    assert_eq!(
        a.call("keychaincredential.used_by", json!([kp_id])).await,
        json!([{"title": "SSH credentials conn1", "unbind_method": "delete"}])
    );
    let c3 = create_conn(&mut a, "conn3", conn_attrs(kp_id, &host_key)).await;

    // With cascade the connections go too; other entries stay.
    assert_eq!(a.call("keychaincredential.delete", json!([kp_id, {"cascade": true}])).await, Value::Null);
    let left = a.call("keychaincredential.query", json!([])).await;
    assert_eq!(left.as_array().unwrap().iter().map(|e| e["name"].clone()).collect::<Vec<_>>(), vec![json!("k3")]);
    for id in [kp_id, c1_id, c3["id"].as_i64().unwrap()] {
        assert_not_found(&a.err("keychaincredential.get_instance", json!([id])).await, id);
    }
    // Unused: delete without options; the name is free again.
    assert_eq!(a.call("keychaincredential.delete", json!([k3_id])).await, Value::Null);
    assert_eq!(count(&mut a).await, 0);
    new_pair(&mut a, "k3").await;

    // Writes are audited with TrueNAS's descriptions.
    let audit = a.call("audit.query", json!([[["event", "=", "METHOD_CALL"]]])).await;
    let descs: Vec<String> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event_data"]["description"].as_str().map(str::to_string))
        .collect();
    for want in
        ["Create Keychain Credential: k1", "Update Keychain Credential: k1", "Delete Keychain Credential: conn2"]
    {
        assert!(descs.iter().any(|x| x == want), "no audit entry {want:?} in {descs:?}");
    }
}

// ---------------------------------------------------------------------------
// SSH_CREDENTIALS validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ssh_credentials_are_validated() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let kp = new_pair(&mut a, "pair").await;
    let kp_id = kp["id"].as_i64().unwrap();
    let (_, host_ed) = generate(&mut a, Value::Null).await;
    let (_, host_ec) = generate(&mut a, json!({"key_type": "ECDSA", "size": 521})).await;
    let host_ed = key_blob(&host_ed);
    let host_ec = key_blob(&host_ec);
    let public_only = create_pair(&mut a, "pub-only", json!({"public_key": kp["attributes"]["public_key"]})).await;
    let conn = create_conn(&mut a, "ok", conn_attrs(kp_id, &host_ed)).await;
    let before = a.call("keychaincredential.query", json!([])).await;
    let attr = |f: &str| format!("{CREATE}.attributes.{f}");

    // private_key must be an existing SSH_KEY_PAIR with a private key.
    let e = create_err(&mut a, "c", "SSH_CREDENTIALS", conn_attrs(4242, &host_ed)).await;
    assert_field(&e, &attr("private_key"), "SSH key pair 4242 does not exist");
    let e = create_err(&mut a, "c", "SSH_CREDENTIALS", conn_attrs(conn["id"].as_i64().unwrap(), &host_ed)).await;
    assert_field(&e, &attr("private_key"), "is not an SSH key pair");
    let e = create_err(&mut a, "c", "SSH_CREDENTIALS", conn_attrs(public_only["id"].as_i64().unwrap(), &host_ed)).await;
    assert_field(&e, &attr("private_key"), "has no private key");

    // host, port, connect_timeout.
    for host in ["", "   "] {
        let mut at = conn_attrs(kp_id, &host_ed);
        at["host"] = json!(host);
        assert_field(&create_err(&mut a, "c", "SSH_CREDENTIALS", at).await, &attr("host"), "must not be empty");
    }
    for port in [0, -1, 65536, 100000] {
        let mut at = conn_attrs(kp_id, &host_ed);
        at["port"] = json!(port);
        assert_field(&create_err(&mut a, "c", "SSH_CREDENTIALS", at).await, &attr("port"), "between 1 and 65535");
    }
    for t in [0, -5, 301, 3600] {
        let mut at = conn_attrs(kp_id, &host_ed);
        at["connect_timeout"] = json!(t);
        assert_field(
            &create_err(&mut a, "c", "SSH_CREDENTIALS", at).await,
            &attr("connect_timeout"),
            "between 1 and 300",
        );
    }
    // Several problems are reported together.
    let mut at = conn_attrs(kp_id, &host_ed);
    at["host"] = json!("");
    at["port"] = json!(0);
    let ex = extra(&create_err(&mut a, "c", "SSH_CREDENTIALS", at).await);
    assert!(ex.iter().any(|(x, _)| *x == attr("host")) && ex.iter().any(|(x, _)| *x == attr("port")), "{ex:?}");

    // remote_host_key lines must parse as public keys.
    let truncated = &host_ed[..host_ed.len() - 10];
    let kp_private = kp["attributes"]["private_key"].as_str().unwrap();
    for (bad, msg) in [
        ("garbage".to_string(), "Line 1"),
        ("ssh-ed25519".to_string(), "Line 1"),
        ("ssh-ed25519 AAAA!!!notbase64".to_string(), "Line 1"),
        (truncated.to_string(), "Line 1"),
        (format!("{host_ed}\nnot a key at all"), "Line 2"),
        (format!("{host_ed}\n\nssh-foo AAAAB3NzaC1yc2E"), "Line 3"),
        (kp_private.to_string(), "private key"),
    ] {
        let e = create_err(&mut a, "c", "SSH_CREDENTIALS", conn_attrs(kp_id, &bad)).await;
        assert_field(&e, &attr("remote_host_key"), msg);
        assert!(!e.to_string().contains(&kp_private[40..80]), "an error echoed key material: {e}");
    }
    assert_eq!(a.call("keychaincredential.query", json!([])).await, before, "a refused create stored something");

    // Boundaries are accepted; known_hosts host fields, comments and blank lines are dropped.
    let mut at = conn_attrs(
        kp_id,
        &format!("[127.0.0.1]:2222 {host_ed}\n\n# a comment\nbackup.example.com,10.0.0.5 {host_ec} root@backup\n"),
    );
    at["port"] = json!(1);
    at["connect_timeout"] = json!(1);
    let c = create_conn(&mut a, "edges1", at).await;
    assert_eq!(c["attributes"]["remote_host_key"], format!("{host_ed}\n{host_ec}"));
    assert_eq!(c["attributes"]["port"], 1);
    let mut at = conn_attrs(kp_id, &format!("{host_ed} comment here"));
    at["port"] = json!(65535);
    at["connect_timeout"] = json!(300);
    let c = create_conn(&mut a, "edges2", at).await;
    assert_eq!(c["attributes"]["remote_host_key"], host_ed);
    assert_eq!(c["attributes"]["connect_timeout"], 300);

    // Update validates the same way (with the update schema) and changes nothing on failure.
    let id = c["id"].as_i64().unwrap();
    let before = a.call("keychaincredential.query", json!([])).await;
    let mut at = conn_attrs(kp_id, &host_ed);
    at["port"] = json!(70000);
    let e = a.err("keychaincredential.update", json!([id, {"attributes": at}])).await;
    assert_field(&e, &format!("{UPDATE}.attributes.port"), "between 1 and 65535");
    let e = a.err("keychaincredential.update", json!([id, {"attributes": conn_attrs(id, &host_ed)}])).await;
    assert_field(&e, &format!("{UPDATE}.attributes.private_key"), "");
    let e = a.err("keychaincredential.update", json!([id, {"attributes": conn_attrs(kp_id, "nope")}])).await;
    assert_field(&e, &format!("{UPDATE}.attributes.remote_host_key"), "Line 1");
    assert_eq!(a.call("keychaincredential.query", json!([])).await, before);
}

// ---------------------------------------------------------------------------
// Key-pair validation messages
// ---------------------------------------------------------------------------

#[tokio::test]
async fn key_pair_validation_messages() {
    let files = files_dir("kc-val");
    let dir = files.path();
    let mut d = Daemon::start();
    let mut a = d.admin().await;
    let pk = |f: &str| format!("{CREATE}.attributes.{f}");

    // Two ssh-keygen keys: an encrypted one and a plain one.
    let pass = "Val1d-Passphrase-for-keyhaven";
    let enc = dir.join("enc");
    ssh_keygen_ok(&["-q", "-t", "ed25519", "-N", pass, "-C", "enc@test", "-f", enc.to_str().unwrap()]);
    let enc_text = std::fs::read_to_string(&enc).unwrap();
    let enc_pub = std::fs::read_to_string(dir.join("enc.pub")).unwrap();
    let plain = dir.join("plain");
    ssh_keygen_ok(&["-q", "-t", "ecdsa", "-N", "", "-C", "plain@test", "-f", plain.to_str().unwrap()]);
    let plain_text = std::fs::read_to_string(&plain).unwrap();
    let plain_pub = std::fs::read_to_string(dir.join("plain.pub")).unwrap();
    let (_, plain_fp) = keygen_fingerprint(&dir.join("plain.pub"));

    // Encrypted without passphrase; wrong passphrase; then the right one.
    let e = create_err(&mut a, "e", "SSH_KEY_PAIR", json!({"private_key": enc_text})).await;
    assert_field(&e, &pk("private_key"), "Encrypted private keys are not allowed");
    let e = create_err(&mut a, "e", "SSH_KEY_PAIR", json!({"private_key": enc_text, "passphrase": "wrong passphrase"}))
        .await;
    assert_eq!(extra(&e).len(), 1, "{e}");
    assert_field(&e, &pk("passphrase"), "passphrase");
    let e = create_err(&mut a, "e", "SSH_KEY_PAIR", json!({"private_key": enc_text, "passphrase": ""})).await;
    assert_field(&e, &pk("private_key"), "Encrypted private keys are not allowed");
    let imported = create_pair(&mut a, "enc", json!({"private_key": enc_text, "passphrase": pass})).await;
    assert!(imported["attributes"].get("passphrase").is_none(), "the passphrase came back: {imported}");
    assert!(!imported.to_string().contains(pass));
    let stored = imported["attributes"]["private_key"].as_str().unwrap().to_string();
    assert!(stored.starts_with(OPENSSH_HEADER) && stored.ends_with("-----END OPENSSH PRIVATE KEY-----\n"), "{stored}");
    assert_ne!(stored, enc_text, "stored decrypted");
    let f = write_secret(dir, "enc-stored", &stored);
    assert_eq!(key_blob(&keygen_public(&f, "")), key_blob(&enc_pub), "stored key is not the unencrypted original");
    assert_eq!(imported["comment"], "enc@test");
    assert_eq!(imported["fingerprint"].as_str().unwrap(), keygen_fingerprint(&dir.join("enc.pub")).1);
    let again = a.call("keychaincredential.get_instance", json!([imported["id"]])).await;
    assert!(!again.to_string().contains(pass));
    // A passphrase with an unencrypted key is ignored (and not stored either).
    let p2 =
        create_pair(&mut a, "plain-with-pass", json!({"private_key": plain_text, "passphrase": "unused-pass-xyz"}))
            .await;
    assert_eq!(p2["fingerprint"].as_str().unwrap(), plain_fp);

    // RSA-1024 is refused, as private and as public key.
    let weak = dir.join("weak");
    ssh_keygen_ok(&["-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", weak.to_str().unwrap()]);
    let weak_text = std::fs::read_to_string(&weak).unwrap();
    let weak_pub = std::fs::read_to_string(dir.join("weak.pub")).unwrap();
    let e = create_err(&mut a, "w", "SSH_KEY_PAIR", json!({"private_key": weak_text})).await;
    assert_field(&e, &pk("private_key"), "at least 2048 bits");
    let e = create_err(&mut a, "w", "SSH_KEY_PAIR", json!({"public_key": weak_pub})).await;
    assert_field(&e, &pk("public_key"), "at least 2048 bits");

    // Mismatched pair; neither key.
    let e = create_err(&mut a, "m", "SSH_KEY_PAIR", json!({"private_key": plain_text, "public_key": enc_pub})).await;
    assert_eq!(extra(&e), vec![(pk("public_key"), "Private key and public key do not match".to_string())]);
    for attrs in
        [json!({}), json!({"private_key": null, "public_key": null}), json!({"private_key": "", "public_key": "  \n"})]
    {
        let e = create_err(&mut a, "n", "SSH_KEY_PAIR", attrs).await;
        assert_eq!(extra(&e), vec![(pk("public_key"), "You must specify a key".to_string())]);
    }
    // Matching pair with a different comment is fine; the given public key (and comment) is kept.
    let with_pub = format!("{} other-comment\n", key_blob(&plain_pub));
    let both = create_pair(&mut a, "both", json!({"private_key": plain_text, "public_key": with_pub})).await;
    assert_eq!(both["comment"], "other-comment");
    assert_eq!(both["fingerprint"].as_str().unwrap(), plain_fp);

    // Swapped fields.
    let e = create_err(&mut a, "s", "SSH_KEY_PAIR", json!({"public_key": plain_text})).await;
    assert_field(&e, &pk("public_key"), "This is a private key, not a public key");
    assert!(!e.to_string().contains(&plain_text[40..100]), "an error echoed key material");
    let e = create_err(&mut a, "s", "SSH_KEY_PAIR", json!({"private_key": plain_pub})).await;
    assert_field(&e, &pk("private_key"), "This looks like a public key");

    // Truncated base64: private key body cut in half (armour kept), public key cut short, junk.
    let lines: Vec<&str> = plain_text.lines().collect();
    let cut = format!("{}\n{}\n{}\n", lines[0], lines[1..lines.len() / 2].join("\n"), lines[lines.len() - 1]);
    let e = create_err(&mut a, "t", "SSH_KEY_PAIR", json!({"private_key": cut})).await;
    assert_field(&e, &pk("private_key"), "");
    assert!(!e.to_string().contains(lines[1]), "an error echoed key material: {e}");
    let no_end = lines[..lines.len() - 1].join("\n");
    let e = create_err(&mut a, "t", "SSH_KEY_PAIR", json!({"private_key": no_end})).await;
    assert_field(&e, &pk("private_key"), "");
    let blob = key_blob(&plain_pub);
    let e = create_err(&mut a, "t", "SSH_KEY_PAIR", json!({"public_key": &blob[..blob.len() - 12]})).await;
    assert_field(&e, &pk("public_key"), "");
    for junk in ["ssh-ed25519", "ssh-ed25519 AAAA%%%%", "hello world", "ssh-dss AAAAB3NzaC1kc3MAAACBAP"] {
        let e = create_err(&mut a, "t", "SSH_KEY_PAIR", json!({"public_key": junk})).await;
        assert_field(&e, &pk("public_key"), "");
    }
    let e = create_err(&mut a, "t", "SSH_KEY_PAIR", json!({"private_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64 !!\n-----END OPENSSH PRIVATE KEY-----\n"})).await;
    assert_field(&e, &pk("private_key"), "");

    // Public-only pairs are valid; CRLF and surrounding whitespace are normalised away.
    let po = create_pair(&mut a, "pub-only", json!({"public_key": format!("  {}  \n\n", plain_pub.trim())})).await;
    assert_eq!(po["attributes"]["private_key"], Value::Null);
    assert_eq!(po["attributes"]["public_key"].as_str().unwrap().trim_end(), plain_pub.trim_end());
    assert_eq!(po["fingerprint"].as_str().unwrap(), plain_fp);
    assert_eq!(po["comment"], "plain@test");
    let crlf = format!("\n\n{}\r\n\r\n", plain_text.trim().replace('\n', "\r\n"));
    let c = create_pair(&mut a, "crlf", json!({"private_key": crlf})).await;
    assert_eq!(c["fingerprint"].as_str().unwrap(), plain_fp);
    assert!(!c["attributes"]["private_key"].as_str().unwrap().contains('\r'));

    // Update uses the update schema for the same checks.
    let e = a.err("keychaincredential.update", json!([po["id"], {"attributes": {"private_key": enc_text}}])).await;
    assert_field(&e, &format!("{UPDATE}.attributes.private_key"), "Encrypted private keys are not allowed");
    let e = a.err("keychaincredential.update", json!([po["id"], {"attributes": {}}])).await;
    assert_field(&e, &format!("{UPDATE}.attributes.public_key"), "You must specify a key");

    drop(a);
    assert_no_key_material(
        &mut d,
        "plain-with-pass",
        &[(enc_text.clone(), enc_pub.clone()), (stored, enc_pub), (plain_text, plain_pub)],
        &[pass, "wrong passphrase", "unused-pass-xyz"],
    );
}

// ---------------------------------------------------------------------------
// Generation, checked against ssh-keygen
// ---------------------------------------------------------------------------

#[tokio::test]
async fn generated_keys_of_every_type_and_size_pass_ssh_keygen() {
    let files = files_dir("kc-gen");
    let dir = files.path();
    let mut d = Daemon::start();
    let mut a = d.admin().await;
    let n0 = count(&mut a).await;

    // No params: an Ed25519 pair in OpenSSH text, nothing stored.
    let (private, public) = generate(&mut a, Value::Null).await;
    assert!(private.starts_with(OPENSSH_HEADER) && private.ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
    assert!(public.starts_with("ssh-ed25519 AAAA") && public.ends_with('\n'), "{public:?}");
    assert_eq!(public.lines().count(), 1);
    let r = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let mut ks: Vec<&String> = r.as_object().unwrap().keys().collect();
    ks.sort();
    assert_eq!(ks, ["private_key", "public_key"]);
    assert_eq!(count(&mut a).await, n0, "generate stored something");
    let (p2, _) = generate(&mut a, json!({})).await;
    assert_ne!(p2, private, "two generated keys are equal");
    let mut keys = vec![(private.clone(), public.clone())];

    // Bad options name `size` / `key_type` / `comment`.
    let s = "keychain_credential_generate_ssh_key_pair";
    for (opts, attr) in [
        (json!({"key_type": "RSA", "size": 1024}), "size"),
        (json!({"key_type": "RSA", "size": 2047}), "size"),
        (json!({"key_type": "ECDSA", "size": 512}), "size"),
        (json!({"size": 384}), "size"),
        (json!({"key_type": "ED25519", "size": 0}), "size"),
        (json!({"size": -1}), "size"),
        (json!({"size": "4096"}), "size"),
        (json!({"key_type": "DSA"}), "key_type"),
        (json!({"key_type": 5}), "key_type"),
        (json!({"comment": "two\nlines"}), "comment"),
        (json!({"bogus": true}), "bogus"),
    ] {
        let e = a.err("keychaincredential.generate_ssh_key_pair", json!([opts])).await;
        assert_field(&e, &format!("{s}.{attr}"), "");
    }
    assert_eq!(count(&mut a).await, n0);

    let cases: &[(&str, Option<u32>, &str, u64, &str)] = &[
        ("ED25519", None, "ssh-ed25519", 256, "id_ed25519"),
        ("ECDSA", None, "ecdsa-sha2-nistp256", 256, "id_ecdsa"),
        ("ECDSA", Some(256), "ecdsa-sha2-nistp256", 256, "id_ecdsa"),
        ("ECDSA", Some(384), "ecdsa-sha2-nistp384", 384, "id_ecdsa"),
        ("ECDSA", Some(521), "ecdsa-sha2-nistp521", 521, "id_ecdsa"),
        ("RSA", Some(2048), "ssh-rsa", 2048, "id_rsa"),
        ("RSA", None, "ssh-rsa", 3072, "id_rsa"),
        ("RSA", Some(4096), "ssh-rsa", 4096, "id_rsa"),
    ];
    for (i, (kt, size, key_type, bits, _)) in cases.iter().enumerate() {
        let comment = format!("gen-{i}@keyhaven");
        let mut opts = json!({"key_type": kt, "comment": comment});
        if let Some(b) = size {
            opts["size"] = json!(b);
        }
        let (private, public) = generate(&mut a, opts).await;
        assert!(private.starts_with(OPENSSH_HEADER), "{kt} {size:?}");
        assert!(public.starts_with(&format!("{key_type} ")), "{kt} {size:?}: {public}");
        assert_eq!(public.split_whitespace().nth(2), Some(comment.as_str()));
        let f = write_secret(dir, &format!("gen{i}"), &private);
        let (kbits, kfp) = keygen_fingerprint(&f);
        assert_eq!(kbits, *bits, "{kt} {size:?}");
        assert_eq!(key_blob(&keygen_public(&f, "")), key_blob(&public), "ssh-keygen -y disagrees for {kt} {size:?}");
        let e = create_pair(
            &mut a,
            &format!("gen-{kt}-{}", size.unwrap_or(0)),
            json!({"private_key": private, "public_key": public}),
        )
        .await;
        assert_eq!(e["fingerprint"].as_str().unwrap(), kfp, "{kt} {size:?}");
        assert_eq!(e["key_type"], *key_type);
        assert_eq!(e["algorithm"], *kt);
        assert_eq!(e["bits"], *bits);
        assert_eq!(e["comment"], comment.as_str());
        assert_eq!(e["attributes"]["private_key"].as_str().unwrap(), private, "an OpenSSH key is stored as given");
        keys.push((private, public));
    }
    assert_eq!(count(&mut a).await, n0 + cases.len() as i64);
    drop(a);
    assert_no_key_material(&mut d, "gen-RSA-4096", &keys, &[]);
}

// ---------------------------------------------------------------------------
// Imports of ssh-keygen keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ssh_keygen_keys_import_in_every_format() {
    let files = files_dir("kc-imp");
    let dir = files.path();
    let mut d = Daemon::start();
    let mut a = d.admin().await;
    let pass = "imp0rt-Passphrase-7731";
    let mut keys = vec![];

    let types: &[(&str, &[&str], &str)] =
        &[("ed25519", &[], "ED25519"), ("ecdsa", &["-b", "384"], "ECDSA"), ("rsa", &["-b", "2048"], "RSA")];
    let formats: &[(&str, &[&str])] = &[("openssh", &[]), ("pem", &["-m", "PEM"]), ("pkcs8", &["-m", "PKCS8"])];
    for (t, targs, alg) in types {
        for (fmt, fargs) in formats {
            for encrypted in [false, true] {
                let stem = format!("{t}-{fmt}-{}", if encrypted { "enc" } else { "plain" });
                let f = dir.join(&stem);
                let comment = format!("{stem}@ssh-keygen");
                let mut args = vec!["-q", "-t", t, "-N", if encrypted { pass } else { "" }, "-C", &comment];
                args.extend_from_slice(targs);
                args.extend_from_slice(fargs);
                let fs = f.to_str().unwrap().to_string();
                args.extend_from_slice(&["-f", &fs]);
                ssh_keygen_ok(&args);
                let text = std::fs::read_to_string(&f).unwrap();
                let pub_path = dir.join(format!("{stem}.pub"));
                let pub_text = std::fs::read_to_string(&pub_path).unwrap();
                let (kbits, kfp) = keygen_fingerprint(&pub_path);

                let mut attrs = json!({"private_key": text});
                if encrypted {
                    let e = create_err(&mut a, &stem, "SSH_KEY_PAIR", attrs.clone()).await;
                    assert_field(
                        &e,
                        &format!("{CREATE}.attributes.private_key"),
                        "Encrypted private keys are not allowed",
                    );
                    attrs["passphrase"] = json!("not-the-passphrase");
                    let e = create_err(&mut a, &stem, "SSH_KEY_PAIR", attrs.clone()).await;
                    assert_field(&e, &format!("{CREATE}.attributes.passphrase"), "");
                    attrs["passphrase"] = json!(pass);
                }
                let e = create_pair(&mut a, &stem, attrs).await;
                assert_eq!(e["fingerprint"].as_str().unwrap(), kfp, "{stem}");
                assert_eq!(e["bits"], kbits, "{stem}");
                assert_eq!(e["algorithm"], *alg, "{stem}");
                assert_eq!(key_blob(e["attributes"]["public_key"].as_str().unwrap()), key_blob(&pub_text), "{stem}");
                assert!(
                    e["attributes"].get("passphrase").is_none() && !e.to_string().contains(pass),
                    "{stem}: passphrase returned"
                );
                // Stored normalised: unencrypted OpenSSH that ssh-keygen reads without a passphrase.
                let stored = e["attributes"]["private_key"].as_str().unwrap().to_string();
                assert!(
                    stored.starts_with(OPENSSH_HEADER) && stored.ends_with("-----END OPENSSH PRIVATE KEY-----\n"),
                    "{stem}"
                );
                let sf = write_secret(dir, &format!("{stem}.stored"), &stored);
                assert_eq!(key_blob(&keygen_public(&sf, "")), key_blob(&pub_text), "{stem}: stored key unreadable");
                assert_eq!(keygen_fingerprint(&sf).1, kfp);
                if *fmt == "openssh" || *t == "ed25519" {
                    assert_eq!(e["comment"], comment.as_str(), "{stem}: an OpenSSH key keeps its comment");
                }
                keys.push((text, pub_text.clone()));
                keys.push((stored, pub_text));
            }
        }
    }
    // Private and public key together, default RSA size.
    let f = dir.join("rsa-default");
    ssh_keygen_ok(&["-q", "-t", "rsa", "-N", "", "-C", "with pub", "-f", f.to_str().unwrap()]);
    let text = std::fs::read_to_string(&f).unwrap();
    let pub_text = std::fs::read_to_string(dir.join("rsa-default.pub")).unwrap();
    let e = create_pair(&mut a, "rsa-default", json!({"private_key": text, "public_key": pub_text})).await;
    assert_eq!(e["fingerprint"].as_str().unwrap(), keygen_fingerprint(&dir.join("rsa-default.pub")).1);
    assert_eq!(e["bits"], 3072);
    assert_eq!(e["comment"], "with pub");
    keys.push((text, pub_text));

    assert_eq!(count(&mut a).await, 19);
    let all = a.call("keychaincredential.query", json!([])).await;
    assert!(!all.to_string().contains(pass));
    drop(a);
    assert_no_key_material(&mut d, "rsa-default", &keys, &[pass, "not-the-passphrase"]);
}

// ---------------------------------------------------------------------------
// Downloads
// ---------------------------------------------------------------------------

#[tokio::test]
async fn downloads_need_auth_name_files_encrypt_on_request_and_are_audited() {
    let files = files_dir("kc-dl");
    let dir = files.path();
    let d = Daemon::start();
    let mut a = d.admin().await;
    let ed = new_pair(&mut a, "web").await;
    let (ec_priv, _) = generate(&mut a, json!({"key_type": "ECDSA"})).await;
    let ec = create_pair(&mut a, "my key/1", json!({"private_key": ec_priv})).await;
    let rsa_file = dir.join("rsa");
    ssh_keygen_ok(&["-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f", rsa_file.to_str().unwrap()]);
    let rsa = create_pair(&mut a, "legacy", json!({"private_key": std::fs::read_to_string(&rsa_file).unwrap()})).await;
    let pub_only = create_pair(&mut a, "pubonly", json!({"public_key": ed["attributes"]["public_key"]})).await;
    let conn = create_conn(
        &mut a,
        "conn",
        conn_attrs(ed["id"].as_i64().unwrap(), &key_blob(ec["attributes"]["public_key"].as_str().unwrap())),
    )
    .await;

    let key = a.call("api_key.create", json!([{"name": "dl", "username": "admin"}])).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let auth = bearer(&key);
    let url = |id: &Value, which: &str| format!("/_download/keychaincredential/{id}/{which}");
    let mut private_downloads = 0;

    for (e, stem) in [(&ed, "web_id_ed25519"), (&ec, "my_key_1_id_ecdsa"), (&rsa, "legacy_id_rsa")] {
        let r = http(&d, "GET", &url(&e["id"], "public_key"), &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), e["attributes"]["public_key"].as_str().unwrap());
        assert_eq!(r.header("content-disposition"), Some(format!("attachment; filename=\"{stem}.pub\"").as_str()));
        let r = http(&d, "GET", &url(&e["id"], "private_key"), &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        private_downloads += 1;
        assert_eq!(r.text(), e["attributes"]["private_key"].as_str().unwrap());
        assert_eq!(r.header("content-disposition"), Some(format!("attachment; filename=\"{stem}\"").as_str()));
        assert!(r.header("cache-control").is_some_and(|v| v.contains("no-store")));
        let f = write_secret(dir, stem, &r.text());
        assert_eq!(key_blob(&keygen_public(&f, "")), key_blob(e["attributes"]["public_key"].as_str().unwrap()));
    }

    // POST {"passphrase"}: the key comes back encrypted with it.
    let body = json!({"passphrase": "dl-pass phrase"}).to_string();
    let r = http(&d, "POST", &url(&ed["id"], "private_key"), &[("Authorization", &auth)], Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    private_downloads += 1;
    let enc = r.text();
    assert!(enc.starts_with(OPENSSH_HEADER));
    assert_ne!(enc, ed["attributes"]["private_key"].as_str().unwrap());
    let f = write_secret(dir, "web_enc", &enc);
    assert_eq!(
        key_blob(&keygen_public(&f, "dl-pass phrase")),
        key_blob(ed["attributes"]["public_key"].as_str().unwrap())
    );
    assert!(
        !ssh_keygen(&["-y", "-P", "", "-f", f.to_str().unwrap()]).status.success(),
        "encrypted key opened without passphrase"
    );
    // …and it imports back with that passphrase.
    let back = create_pair(&mut a, "web-back", json!({"private_key": enc, "passphrase": "dl-pass phrase"})).await;
    assert_eq!(back["fingerprint"], ed["fingerprint"]);
    for bad in ["", "{}", "{\"passphrase\": \"\"}", "{\"passphrase\": 5}", "not json"] {
        let r = http(&d, "POST", &url(&ed["id"], "private_key"), &[("Authorization", &auth)], Some(bad)).await;
        assert_eq!(r.status, 400, "body {bad:?}");
    }
    let r = http(&d, "POST", &url(&ed["id"], "public_key"), &[("Authorization", &auth)], Some(&body)).await;
    assert_eq!(r.status, 405);

    // Tokens: multi-use, single use (works once), expired.
    let t = a.call("auth.generate_token", json!([600, {}, false, false])).await.as_str().unwrap().to_string();
    for _ in 0..2 {
        let r = http(&d, "GET", &format!("{}?auth_token={t}", url(&ed["id"], "private_key")), &[], None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        private_downloads += 1;
        assert_eq!(r.text(), ed["attributes"]["private_key"].as_str().unwrap());
    }
    let t1 = a.call("auth.generate_token", json!([600, {}, false, true])).await.as_str().unwrap().to_string();
    let r = http(&d, "GET", &format!("{}?auth_token={t1}", url(&ec["id"], "private_key")), &[], None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    private_downloads += 1;
    let r = http(&d, "GET", &format!("{}?auth_token={t1}", url(&ec["id"], "private_key")), &[], None).await;
    assert_eq!(r.status, 401, "single-use token worked twice");
    let r = http(&d, "GET", &format!("{}?auth_token={t1}", url(&ec["id"], "public_key")), &[], None).await;
    assert_eq!(r.status, 401);
    // Default token (match_origin): refused from another address, accepted from this one.
    let t2 = a.call("auth.generate_token", json!([])).await.as_str().unwrap().to_string();
    let r = http_from(
        &d,
        Some("127.0.0.2"),
        "GET",
        &format!("{}?auth_token={t2}", url(&rsa["id"], "public_key")),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "origin not enforced");
    let t2 = a.call("auth.generate_token", json!([])).await.as_str().unwrap().to_string();
    let r = http(&d, "GET", &format!("{}?auth_token={t2}", url(&rsa["id"], "public_key")), &[], None).await;
    assert_eq!(r.status, 200);
    // Expired token.
    let t3 = a.call("auth.generate_token", json!([1, {}, false])).await.as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = http(&d, "GET", &format!("{}?auth_token={t3}", url(&rsa["id"], "private_key")), &[], None).await;
    assert_eq!(r.status, 401, "expired token accepted");

    // A read-only admin may fetch public keys but not private ones (refusal audited).
    a.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "ro", "password": "ro-password-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let ro_key = a.call("api_key.create", json!([{"name": "ro", "username": "daemon"}])).await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = http(&d, "GET", &url(&ed["id"], "public_key"), &[("Authorization", &bearer(&ro_key))], None).await;
    assert_eq!(r.status, 200);
    let r = http(&d, "GET", &url(&ed["id"], "private_key"), &[("Authorization", &bearer(&ro_key))], None).await;
    assert_eq!(r.status, 403);
    assert!(!r.text().contains("PRIVATE KEY"));
    let r = http(&d, "POST", &url(&ed["id"], "private_key"), &[("Authorization", &bearer(&ro_key))], Some(&body)).await;
    assert_eq!(r.status, 403);

    // Anonymous and bad credentials: 401, for both files.
    for which in ["public_key", "private_key"] {
        let r = http(&d, "GET", &url(&ed["id"], which), &[], None).await;
        assert_eq!(r.status, 401);
        assert!(r.header("www-authenticate").is_some());
        assert!(!r.text().contains("PRIVATE KEY"));
        // The last character changed (to one it is not: keys are random, one in
        // 62 ends in `x`).
        let last = if key.ends_with('x') { 'y' } else { 'x' };
        let tampered = format!("{}{last}", &key[..key.len() - 1]);
        for h in [bearer(&tampered), "Basic YWRtaW46eA==".to_string(), "Bearer ".to_string()] {
            let r = http(&d, "GET", &url(&ed["id"], which), &[("Authorization", &h)], None).await;
            assert_eq!(r.status, 401, "{h}");
        }
        let r = http(&d, "GET", &format!("{}?auth_token=nonsense", url(&ed["id"], which)), &[], None).await;
        assert_eq!(r.status, 401);
        let r = http(&d, "POST", &url(&ed["id"], which), &[], Some(&body)).await;
        assert!(r.status == 401 || r.status == 405, "{}", r.status);
    }

    // Not found cases.
    for (id, which) in [
        ("9999", "private_key"),
        ("abc", "public_key"),
        (&*conn["id"].to_string(), "private_key"),
        (&*ed["id"].to_string(), "secret"),
    ] {
        let r =
            http(&d, "GET", &format!("/_download/keychaincredential/{id}/{which}"), &[("Authorization", &auth)], None)
                .await;
        assert_eq!(r.status, 404, "{id} {which}");
    }
    let r = http(&d, "GET", &url(&pub_only["id"], "private_key"), &[("Authorization", &auth)], None).await;
    assert_eq!(r.status, 404);
    let r = http(&d, "GET", &url(&pub_only["id"], "public_key"), &[("Authorization", &auth)], None).await;
    assert_eq!(r.status, 200);

    // Every private-key download is audited, without key material or passphrase.
    let audit = a.call("audit.query", json!([[["event", "=", "METHOD_CALL"]]])).await;
    let all: Vec<&Value> =
        audit.as_array().unwrap().iter().filter(|e| e["event_data"]["method"] == "download.private_key").collect();
    let (dls, refused): (Vec<&Value>, Vec<&Value>) = all.into_iter().partition(|e| e["success"] == true);
    assert_eq!(dls.len(), private_downloads, "{dls:?}");
    assert!(dls.iter().all(|e| e["username"] == "admin" && e["address"] == "127.0.0.1"));
    assert_eq!(refused.len(), 2, "read-only refusals not audited: {refused:?}");
    assert!(refused.iter().all(|e| e["username"] == "daemon"));
    assert!(dls.iter().any(|e| e["event_data"]["description"].as_str().unwrap().contains("Download private key: web")));
    let text = audit.to_string();
    assert!(!text.contains("dl-pass phrase") && !text.contains("PRIVATE KEY"));
    assert!(!text.contains(&key[3..]));
}

// ---------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keypair_cli_generate_import_list_show_download_delete() {
    let files = files_dir("kc-cli");
    let dir = files.path();
    let mut d = Daemon::start();

    // generate (Ed25519 default, ECDSA, RSA with progress on stderr)
    let (out, _) = keypair_cli_ok(&d, dir, &["generate", "cli-ed", "--json"]);
    let ed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ed["algorithm"], "ED25519");
    assert_eq!(ed["used_by"], json!([]));
    assert!(!out.contains("BEGIN OPENSSH"), "show/generate printed the private key");
    let (out, _) = keypair_cli_ok(
        &d,
        dir,
        &["generate", "cli-ec", "--type", "ecdsa", "--bits", "384", "--comment", "ops@example", "--json"],
    );
    let ec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (ec["algorithm"].clone(), ec["bits"].clone(), ec["comment"].clone()),
        (json!("ECDSA"), json!(384), json!("ops@example"))
    );
    let (out, err) = keypair_cli_ok(&d, dir, &["generate", "cli-rsa", "--type", "rsa", "--bits", "2048"]);
    assert!(err.contains("generating RSA-2048 key") && err.contains("done in"), "no progress on stderr: {err}");
    assert!(out.contains("cli-rsa") && out.contains("RSA") && out.contains("2048"), "{out}");
    let o = keypair_cli(&d, dir, &["generate", "bad", "--type", "rsa", "--bits", "1000"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("size"), "{}", String::from_utf8_lossy(&o.stderr));

    // import an encrypted ssh-keygen key with --passphrase-file
    let f = dir.join("imp");
    ssh_keygen_ok(&["-q", "-t", "ecdsa", "-N", "cli secret pass", "-C", "imp@cli", "-f", f.to_str().unwrap()]);
    let passfile = write_secret(dir, "passfile", "cli secret pass\n");
    let (out, _) = keypair_cli_ok(
        &d,
        dir,
        &[
            "import",
            "cli-imp",
            "--private-key",
            f.to_str().unwrap(),
            "--passphrase-file",
            passfile.to_str().unwrap(),
            "--json",
        ],
    );
    let imp: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(imp["fingerprint"].as_str().unwrap(), keygen_fingerprint(&dir.join("imp.pub")).1);
    let o = keypair_cli(&d, dir, &["import", "cli-imp2", "--private-key", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Encrypted private keys are not allowed"));
    let o = keypair_cli(
        &d,
        dir,
        &["import", "cli-imp", "--private-key", f.to_str().unwrap(), "--passphrase-file", passfile.to_str().unwrap()],
    );
    assert!(!o.status.success(), "duplicate name accepted");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Object with this name already exists"));
    // public-only import
    keypair_cli_ok(&d, dir, &["import", "cli-pub", "--public-key", dir.join("imp.pub").to_str().unwrap()]);

    // A connection using cli-ed (through `keyhaven call`).
    let conn = d.cli_json(&[
        "keychaincredential.create",
        &json!({"name": "cli-conn", "type": "SSH_CREDENTIALS", "attributes": conn_attrs(ed["id"].as_i64().unwrap(), &key_blob(ec["attributes"]["public_key"].as_str().unwrap()))}).to_string(),
    ]);

    // list: table and JSON.
    let (out, _) = keypair_cli_ok(&d, dir, &["list"]);
    let header = out.lines().next().unwrap();
    for h in ["ID", "NAME", "TYPE", "BITS", "FINGERPRINT", "PRIVATE", "USED BY"] {
        assert!(header.contains(h), "{header}");
    }
    for n in ["cli-ed", "cli-ec", "cli-rsa", "cli-imp", "cli-pub"] {
        assert!(out.lines().any(|l| l.split_whitespace().nth(1) == Some(n)), "{n} not listed:\n{out}");
    }
    assert!(!out.contains("cli-conn"), "a connection listed as key pair");
    let ed_row = out.lines().find(|l| l.split_whitespace().nth(1) == Some("cli-ed")).unwrap();
    assert!(ed_row.contains(ed["fingerprint"].as_str().unwrap()) && ed_row.trim_end().ends_with('1'), "{ed_row}");
    let pub_row = out.lines().find(|l| l.split_whitespace().nth(1) == Some("cli-pub")).unwrap();
    assert!(pub_row.contains(" no "), "{pub_row}");
    assert!(!out.contains("PRIVATE KEY-----"));
    let (out, _) = keypair_cli_ok(&d, dir, &["list", "--json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 5);
    let led = list.as_array().unwrap().iter().find(|e| e["name"] == "cli-ed").unwrap();
    assert_eq!(led["attributes"]["private_key"], true);
    assert_eq!(led["used_by_count"], 1);
    assert!(!out.contains("PRIVATE KEY-----"));

    // show by name and by id.
    let (out, _) = keypair_cli_ok(&d, dir, &["show", "cli-ed"]);
    assert!(out.contains(ed["fingerprint"].as_str().unwrap()));
    assert!(out.contains(ed["attributes"]["public_key"].as_str().unwrap().trim_end()));
    assert!(out.contains("used by: SSH credentials cli-conn (delete)"), "{out}");
    assert!(!out.contains("PRIVATE KEY-----"));
    let (out, _) = keypair_cli_ok(&d, dir, &["show", &ed["id"].to_string(), "--json"]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["fingerprint"], ed["fingerprint"]);
    assert_eq!(shown["used_by"], json!([{"title": "SSH credentials cli-conn", "unbind_method": "delete"}]));
    assert!(!out.contains("PRIVATE KEY-----"));
    let o = keypair_cli(&d, dir, &["show", "no-such-key"]);
    assert!(!o.status.success());
    let o = keypair_cli(&d, dir, &["show", "cli-conn"]);
    assert!(!o.status.success(), "show accepted a connection");

    // download public (default name) and private (0600), and to an existing file.
    keypair_cli_ok(&d, dir, &["download", "cli-ed"]);
    let pubf = dir.join("cli-ed_id_ed25519.pub");
    assert_eq!(std::fs::read_to_string(&pubf).unwrap(), ed["attributes"]["public_key"].as_str().unwrap());
    let privf = dir.join("cli-ed.key");
    keypair_cli_ok(&d, dir, &["download", "cli-ed", "--private", "-o", privf.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&privf).unwrap().permissions().mode() & 0o777, 0o600);
    let stored = d.cli_json(&["keychaincredential.get_instance", &ed["id"].to_string()]);
    assert_eq!(std::fs::read_to_string(&privf).unwrap(), stored["attributes"]["private_key"].as_str().unwrap());
    assert_eq!(key_blob(&keygen_public(&privf, "")), key_blob(ed["attributes"]["public_key"].as_str().unwrap()));
    let o = keypair_cli(&d, dir, &["download", "cli-ed", "--private", "-o", privf.to_str().unwrap()]);
    assert!(!o.status.success(), "download overwrote an existing file");
    let encf = dir.join("cli-ec.enc");
    let dlpass = write_secret(dir, "dlpass", "download pass\n");
    keypair_cli_ok(
        &d,
        dir,
        &[
            "download",
            "cli-ec",
            "--private",
            "--passphrase-file",
            dlpass.to_str().unwrap(),
            "-o",
            encf.to_str().unwrap(),
        ],
    );
    assert_eq!(
        key_blob(&keygen_public(&encf, "download pass")),
        key_blob(ec["attributes"]["public_key"].as_str().unwrap())
    );
    let o = keypair_cli(&d, dir, &["download", "cli-pub", "--private", "-o", dir.join("nope").to_str().unwrap()]);
    assert!(!o.status.success(), "downloaded a private key of a public-only pair");

    // delete: refused while used, then with --cascade.
    let o = keypair_cli(&d, dir, &["delete", "cli-ed"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("This credential is used and no cascade option is specified"));
    assert_eq!(d.cli_json(&["keychaincredential.get_instance", &conn["id"].to_string()])["name"], "cli-conn");
    let (out, _) = keypair_cli_ok(&d, dir, &["delete", "cli-ed", "--cascade"]);
    assert!(out.contains("deleted key pair cli-ed"), "{out}");
    let left = d.cli_json(&["keychaincredential.query"]);
    let names: Vec<&str> = left.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(!names.contains(&"cli-ed") && !names.contains(&"cli-conn"), "{names:?}");
    let (out, _) = keypair_cli_ok(&d, dir, &["delete", &ec["id"].to_string(), "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"deleted": ec["id"]}));
    assert_eq!(d.cli_json(&["keychaincredential.query", "[]", r#"{"count": true}"#]), 3);

    d.stop();
    for (path, bytes) in stored_bytes(d.dir.path()) {
        for s in ["cli secret pass", "download pass"] {
            for form in [s.as_bytes().to_vec(), hex(s.as_bytes()).into_bytes()] {
                assert!(!contains(&bytes, &form), "{} contains a passphrase", path.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_keychain_method_rejects_bad_input_and_changes_nothing() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let kp = new_pair(&mut a, "kp").await;
    let kp_id = kp["id"].as_i64().unwrap();
    let host_key = key_blob(kp["attributes"]["public_key"].as_str().unwrap());
    let conn = create_conn(&mut a, "conn", conn_attrs(kp_id, &host_key)).await;
    let c_id = conn["id"].as_i64().unwrap();
    let pub_key = kp["attributes"]["public_key"].clone();
    let huge = "h".repeat(5000);
    // Under the 64 KiB message limit (larger messages close the connection, see api_protocol).
    let huge_key = "A".repeat(60_000);
    let kpc = |attrs: Value| json!([{"name": "new", "type": "SSH_KEY_PAIR", "attributes": attrs}]);
    let cc = |attrs: Value| json!([{"name": "new", "type": "SSH_CREDENTIALS", "attributes": attrs}]);
    let conn_with = |k: &str, v: Value| {
        let mut a = conn_attrs(kp_id, &host_key);
        a[k] = v;
        a
    };
    let ca = format!("{CREATE}.attributes");
    let ua = format!("{UPDATE}.attributes");
    let g = "keychain_credential_generate_ssh_key_pair";

    let table: Vec<(&str, Value, String, &str)> = vec![
        // query
        ("keychaincredential.query", json!(["x"]), "keychaincredential_query.filters".into(), ""),
        ("keychaincredential.query", json!([[["name", "~~", "x"]]]), "keychaincredential_query.filters".into(), ""),
        ("keychaincredential.query", json!([[["name", "=", "x", "y"]]]), "keychaincredential_query.filters".into(), ""),
        ("keychaincredential.query", json!([[], {"limit": "5"}]), "keychaincredential_query.options.limit".into(), ""),
        (
            "keychaincredential.query",
            json!([[], {"bogus": 1}]),
            "keychaincredential_query.options.bogus".into(),
            "Extra inputs",
        ),
        ("keychaincredential.query", json!([[], {}, 3]), "keychaincredential.query".into(), "Too many arguments"),
        // get_instance
        ("keychaincredential.get_instance", json!([]), "keychaincredential_get_instance.id".into(), "Field required"),
        ("keychaincredential.get_instance", json!(["1"]), "keychaincredential_get_instance.id".into(), "valid integer"),
        ("keychaincredential.get_instance", json!([1.5]), "keychaincredential_get_instance.id".into(), "valid integer"),
        (
            "keychaincredential.get_instance",
            json!([null]),
            "keychaincredential_get_instance.id".into(),
            "valid integer",
        ),
        ("keychaincredential.get_instance", json!([99999]), String::new(), "KeychainCredential 99999 does not exist"),
        ("keychaincredential.get_instance", json!([-1]), String::new(), "KeychainCredential -1 does not exist"),
        // create: envelope
        ("keychaincredential.create", json!([]), CREATE.into(), "Field required"),
        ("keychaincredential.create", json!(["x"]), CREATE.into(), "valid dictionary"),
        ("keychaincredential.create", json!([[]]), CREATE.into(), "valid dictionary"),
        (
            "keychaincredential.create",
            json!([["n", "SSH_KEY_PAIR", {"public_key": pub_key}]]),
            CREATE.into(),
            "valid dictionary",
        ),
        ("keychaincredential.create", kpc(json!([null, pub_key])), ca.clone(), "valid dictionary"),
        (
            "keychaincredential.create",
            cc(json!(["h", 22, "root", kp_id, host_key, 10])),
            ca.clone(),
            "valid dictionary",
        ),
        ("keychaincredential.create", json!([{}]), format!("{CREATE}.name"), "Field required"),
        (
            "keychaincredential.create",
            json!([{"name": "n", "attributes": {}}]),
            format!("{CREATE}.type"),
            "Field required",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "n", "type": "SSH_KEY_PAIR"}]),
            format!("{CREATE}.attributes"),
            "Field required",
        ),
        (
            "keychaincredential.create",
            json!([{"name": 5, "type": "SSH_KEY_PAIR", "attributes": {}}]),
            format!("{CREATE}.name"),
            "valid string",
        ),
        (
            "keychaincredential.create",
            json!([{"name": huge, "type": "SSH_KEY_PAIR", "attributes": {"public_key": pub_key}}]),
            format!("{CREATE}.name"),
            "at most 1024",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "", "type": "SSH_KEY_PAIR", "attributes": {"public_key": pub_key}}]),
            format!("{CREATE}.name"),
            "at least 1",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "n", "type": "SSH_KEYPAIR", "attributes": {}}]),
            format!("{CREATE}.type"),
            "SSH_KEY_PAIR",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "n", "type": null, "attributes": {}}]),
            format!("{CREATE}.type"),
            "",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "n", "type": "SSH_KEY_PAIR", "attributes": "x"}]),
            format!("{CREATE}.attributes"),
            "valid dictionary",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "n", "type": "SSH_KEY_PAIR", "attributes": {}, "id": 7}]),
            format!("{CREATE}.id"),
            "Extra inputs",
        ),
        (
            "keychaincredential.create",
            json!([{"name": "kp", "type": "SSH_KEY_PAIR", "attributes": {"public_key": pub_key}}]),
            format!("{CREATE}.name"),
            "Object with this name already exists",
        ),
        (
            "keychaincredential.create",
            json!([kpc(json!({"public_key": pub_key}))[0], 1]),
            "keychaincredential.create".into(),
            "Too many arguments",
        ),
        // create: key pair attributes
        ("keychaincredential.create", kpc(json!({"public_key": 5})), format!("{ca}.public_key"), "valid string"),
        ("keychaincredential.create", kpc(json!({"private_key": ["x"]})), format!("{ca}.private_key"), "valid string"),
        (
            "keychaincredential.create",
            kpc(json!({"public_key": pub_key, "passphrase": 1})),
            format!("{ca}.passphrase"),
            "valid string",
        ),
        (
            "keychaincredential.create",
            kpc(json!({"public_key": pub_key, "passphrase": huge})),
            format!("{ca}.passphrase"),
            "at most",
        ),
        (
            "keychaincredential.create",
            kpc(json!({"public_key": pub_key, "comment": "x"})),
            format!("{ca}.comment"),
            "Extra inputs",
        ),
        (
            "keychaincredential.create",
            kpc(json!({"public_key": pub_key, "fingerprint": "x"})),
            format!("{ca}.fingerprint"),
            "Extra inputs",
        ),
        ("keychaincredential.create", kpc(conn_attrs(kp_id, &host_key)), ca.clone(), "Extra inputs"),
        ("keychaincredential.create", kpc(json!({"private_key": huge_key})), format!("{ca}.private_key"), ""),
        ("keychaincredential.create", kpc(json!({"public_key": huge_key})), format!("{ca}.public_key"), ""),
        ("keychaincredential.create", kpc(json!({"private_key": huge})), format!("{ca}.private_key"), ""),
        (
            "keychaincredential.create",
            kpc(json!({"public_key": format!("ssh-ed25519 {huge}")})),
            format!("{ca}.public_key"),
            "",
        ),
        // create: connection attributes
        ("keychaincredential.create", cc(json!({"public_key": pub_key})), ca.clone(), ""),
        (
            "keychaincredential.create",
            cc(json!({"private_key": kp_id, "remote_host_key": host_key})),
            format!("{ca}.host"),
            "Field required",
        ),
        (
            "keychaincredential.create",
            cc(json!({"host": "h", "remote_host_key": host_key})),
            format!("{ca}.private_key"),
            "Field required",
        ),
        (
            "keychaincredential.create",
            cc(json!({"host": "h", "private_key": kp_id})),
            format!("{ca}.remote_host_key"),
            "Field required",
        ),
        ("keychaincredential.create", cc(conn_with("port", json!("22"))), format!("{ca}.port"), "valid integer"),
        ("keychaincredential.create", cc(conn_with("port", json!(22.5))), format!("{ca}.port"), "valid integer"),
        ("keychaincredential.create", cc(conn_with("port", json!(1e30))), format!("{ca}.port"), "valid integer"),
        ("keychaincredential.create", cc(conn_with("port", json!(null))), format!("{ca}.port"), "valid integer"),
        (
            "keychaincredential.create",
            cc(conn_with("connect_timeout", json!(true))),
            format!("{ca}.connect_timeout"),
            "valid integer",
        ),
        (
            "keychaincredential.create",
            cc(conn_with("private_key", json!("1"))),
            format!("{ca}.private_key"),
            "valid integer",
        ),
        (
            "keychaincredential.create",
            cc(conn_with("private_key", pub_key.clone())),
            format!("{ca}.private_key"),
            "valid integer",
        ),
        ("keychaincredential.create", cc(conn_with("host", json!(huge))), format!("{ca}.host"), "at most 1024"),
        ("keychaincredential.create", cc(conn_with("host", json!(["h"]))), format!("{ca}.host"), "valid string"),
        ("keychaincredential.create", cc(conn_with("username", json!(huge))), format!("{ca}.username"), "at most 1024"),
        ("keychaincredential.create", cc(conn_with("username", json!(""))), format!("{ca}.username"), ""),
        (
            "keychaincredential.create",
            cc(conn_with("remote_host_key", json!(huge_key))),
            format!("{ca}.remote_host_key"),
            "",
        ),
        (
            "keychaincredential.create",
            cc(conn_with("remote_host_key", json!(7))),
            format!("{ca}.remote_host_key"),
            "valid string",
        ),
        ("keychaincredential.create", cc(conn_with("cipher", json!("FAST"))), format!("{ca}.cipher"), "Extra inputs"),
        // update
        ("keychaincredential.update", json!([]), format!("{UPDATE}.id"), "Field required"),
        ("keychaincredential.update", json!([kp_id]), UPDATE.into(), "Field required"),
        ("keychaincredential.update", json!(["1", {}]), format!("{UPDATE}.id"), "valid integer"),
        ("keychaincredential.update", json!([kp_id, "x"]), UPDATE.into(), "valid dictionary"),
        ("keychaincredential.update", json!([kp_id, ["renamed"]]), UPDATE.into(), "valid dictionary"),
        (
            "keychaincredential.update",
            json!([kp_id, {"type": "SSH_CREDENTIALS"}]),
            format!("{UPDATE}.type"),
            "Extra inputs are not permitted",
        ),
        (
            "keychaincredential.update",
            json!([c_id, {"type": "SSH_KEY_PAIR", "attributes": {"public_key": pub_key}}]),
            format!("{UPDATE}.type"),
            "Extra inputs are not permitted",
        ),
        ("keychaincredential.update", json!([kp_id, {"id": 5}]), format!("{UPDATE}.id"), "Extra inputs"),
        ("keychaincredential.update", json!([kp_id, {"name": 5}]), format!("{UPDATE}.name"), "valid string"),
        ("keychaincredential.update", json!([kp_id, {"name": ""}]), format!("{UPDATE}.name"), "at least 1"),
        ("keychaincredential.update", json!([kp_id, {"name": huge}]), format!("{UPDATE}.name"), "at most 1024"),
        (
            "keychaincredential.update",
            json!([kp_id, {"name": "conn"}]),
            format!("{UPDATE}.name"),
            "Object with this name already exists",
        ),
        (
            "keychaincredential.update",
            json!([kp_id, {"attributes": []}]),
            format!("{UPDATE}.attributes"),
            "valid dictionary",
        ),
        (
            "keychaincredential.update",
            json!([kp_id, {"attributes": conn_attrs(kp_id, &host_key)}]),
            ua.clone(),
            "Extra inputs",
        ),
        ("keychaincredential.update", json!([c_id, {"attributes": {"public_key": pub_key}}]), ua.clone(), ""),
        (
            "keychaincredential.update",
            json!([c_id, {"attributes": conn_with("port", json!("x"))}]),
            format!("{ua}.port"),
            "valid integer",
        ),
        (
            "keychaincredential.update",
            json!([c_id, {"attributes": conn_with("private_key", json!(c_id))}]),
            format!("{ua}.private_key"),
            "",
        ),
        (
            "keychaincredential.update",
            json!([kp_id, {"attributes": {"private_key": huge_key}}]),
            format!("{ua}.private_key"),
            "",
        ),
        (
            "keychaincredential.update",
            json!([99999, {"name": "x"}]),
            String::new(),
            "KeychainCredential 99999 does not exist",
        ),
        ("keychaincredential.update", json!([kp_id, {}, 1]), "keychaincredential.update".into(), "Too many arguments"),
        // delete
        ("keychaincredential.delete", json!([]), "keychaincredential_delete.id".into(), "Field required"),
        ("keychaincredential.delete", json!(["1"]), "keychaincredential_delete.id".into(), "valid integer"),
        ("keychaincredential.delete", json!([99999]), String::new(), "KeychainCredential 99999 does not exist"),
        (
            "keychaincredential.delete",
            json!([kp_id]),
            "options.cascade".into(),
            "This credential is used and no cascade option is specified",
        ),
        ("keychaincredential.delete", json!([kp_id, {"cascade": "yes"}]), "options.cascade".into(), "valid boolean"),
        ("keychaincredential.delete", json!([kp_id, {"cascade": 1}]), "options.cascade".into(), "valid boolean"),
        ("keychaincredential.delete", json!([kp_id, {"force": true}]), "options.force".into(), "Extra inputs"),
        ("keychaincredential.delete", json!([kp_id, []]), "options".into(), "valid dictionary"),
        ("keychaincredential.delete", json!([kp_id, [true]]), "options".into(), "valid dictionary"),
        ("keychaincredential.delete", json!([kp_id, {}, 1]), "keychaincredential.delete".into(), "Too many arguments"),
        // used_by
        ("keychaincredential.used_by", json!([]), "keychaincredential_used_by.id".into(), "Field required"),
        ("keychaincredential.used_by", json!(["x"]), "keychaincredential_used_by.id".into(), "valid integer"),
        ("keychaincredential.used_by", json!([{}]), "keychaincredential_used_by.id".into(), "valid integer"),
        ("keychaincredential.used_by", json!([99999]), String::new(), "KeychainCredential 99999 does not exist"),
        ("keychaincredential.used_by", json!([1, 2]), "keychaincredential.used_by".into(), "Too many arguments"),
        // generate_ssh_key_pair
        ("keychaincredential.generate_ssh_key_pair", json!(["x"]), g.into(), "valid dictionary"),
        ("keychaincredential.generate_ssh_key_pair", json!([["RSA", 1024]]), g.into(), "valid dictionary"),
        (
            "keychaincredential.generate_ssh_key_pair",
            json!([{"key_type": "DSA"}]),
            format!("{g}.key_type"),
            "'ED25519', 'ECDSA' or 'RSA'",
        ),
        ("keychaincredential.generate_ssh_key_pair", json!([{"key_type": huge}]), format!("{g}.key_type"), ""),
        (
            "keychaincredential.generate_ssh_key_pair",
            json!([{"key_type": "RSA", "size": 1024}]),
            format!("{g}.size"),
            "2048",
        ),
        (
            "keychaincredential.generate_ssh_key_pair",
            json!([{"key_type": "RSA", "size": 99999999999u64}]),
            format!("{g}.size"),
            "",
        ),
        ("keychaincredential.generate_ssh_key_pair", json!([{"comment": huge}]), format!("{g}.comment"), ""),
        ("keychaincredential.generate_ssh_key_pair", json!([{"comment": "a\u{0}b"}]), format!("{g}.comment"), ""),
        (
            "keychaincredential.generate_ssh_key_pair",
            json!([{"passphrase": "x"}]),
            format!("{g}.passphrase"),
            "Extra inputs",
        ),
        (
            "keychaincredential.generate_ssh_key_pair",
            json!([{}, 1]),
            "keychaincredential.generate_ssh_key_pair".into(),
            "Too many arguments",
        ),
    ];

    let before = a.call("keychaincredential.query", json!([])).await;
    let me = a.call("auth.me", json!([])).await;
    let mut failures = vec![];
    for (method, params, attr, msg) in &table {
        let r = a.raw(method, params.clone()).await;
        let e = r["error"].clone();
        let shown = {
            let s = params.to_string();
            if s.len() > 200 {
                format!("{}…", &s[..200])
            } else {
                s
            }
        };
        if e["code"] != -32602 {
            failures.push(format!("{method} {shown}: expected a validation error, got {e}"));
            continue;
        }
        let ex = extra(&e);
        if !ex.iter().any(|(at, m)| at.starts_with(attr.as_str()) && m.contains(msg)) {
            failures.push(format!("{method} {shown}: expected [{attr}…] containing {msg:?}, got {ex:?}"));
        }
        if attr.is_empty() && (e["data"]["extra"][0][0] != Value::Null || e["data"]["extra"][0][2] != 2) {
            failures.push(format!("{method} {shown}: expected attribute null and errno 2, got {e}"));
        }
        // A message never echoes a huge input back.
        if e.to_string().len() > 20_000 {
            failures.push(format!("{method} {shown}: error is {} bytes", e.to_string().len()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs answered wrongly:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    // The connection survived every bad call, still logged in, and nothing changed.
    assert_eq!(a.call("auth.me", json!([])).await, me);
    assert_eq!(a.call("keychaincredential.query", json!([])).await, before, "bad input changed the store");
    let mut fresh = d.admin().await;
    assert_eq!(fresh.call("keychaincredential.query", json!([])).await, before);
}

// ---------------------------------------------------------------------------
// get_of_type (TrueNAS's private method)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn get_of_type_returns_the_entry_only_for_its_type() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let kp = new_pair(&mut a, "k1").await;
    let kp_id = kp["id"].as_i64().unwrap();
    let (_, host_pub) = generate(&mut a, json!({"key_type": "ECDSA"})).await;
    let conn = create_conn(&mut a, "c1", conn_attrs(kp_id, &key_blob(&host_pub))).await;
    let conn_id = conn["id"].as_i64().unwrap();

    // The right type: the same entry get_instance returns (private key included).
    assert_eq!(a.call("keychaincredential.get_of_type", json!([kp_id, "SSH_KEY_PAIR"])).await, kp);
    assert_eq!(a.call("keychaincredential.get_of_type", json!([conn_id, "SSH_CREDENTIALS"])).await, conn);

    // TrueNAS's call errors: wrong type EINVAL, missing ENOENT.
    let e = a.err("keychaincredential.get_of_type", json!([conn_id, "SSH_KEY_PAIR"])).await;
    assert_eq!(e["code"], -32001, "{e}");
    assert_eq!(e["data"]["errname"], "EINVAL", "{e}");
    assert_eq!(e["data"]["reason"], "[EINVAL] Credential is not of type SSH_KEY_PAIR", "{e}");
    let e = a.err("keychaincredential.get_of_type", json!([kp_id, "SSH_CREDENTIALS"])).await;
    assert_eq!(e["data"]["reason"], "[EINVAL] Credential is not of type SSH_CREDENTIALS", "{e}");
    let e = a.err("keychaincredential.get_of_type", json!([999, "SSH_KEY_PAIR"])).await;
    assert_eq!(e["data"]["errname"], "ENOENT", "{e}");
    assert_eq!(e["data"]["reason"], "[ENOENT] Credential does not exist", "{e}");

    // A type that is not one: a field error on the parameter, nothing returned.
    let e = a.err("keychaincredential.get_of_type", json!([kp_id, "PASSWORD"])).await;
    assert_eq!(e["code"], -32602, "{e}");
    assert_eq!(e["data"]["extra"][0][0], "keychaincredential_get_of_type.type", "{e}");
    let e = a.err("keychaincredential.get_of_type", json!([kp_id])).await;
    assert_eq!(e["code"], -32602, "{e}");
}
