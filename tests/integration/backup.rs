//! Encrypted backup and restore (issue 13, part 2): `keyhaven backup` under
//! write load, wipe, `keyhaven restore`, every record, key pair, connection
//! and sshd host key back; backups that must be refused (wrong passphrase,
//! truncated, altered, newer schema, hostile work factor) change nothing;
//! the real `age -d` opens keyhaven's files.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sshd::{known_hosts, sshd_available, start_ssh};
use crate::util::*;

pub const PASSPHRASE: &str = "backup passphrase for tests";

/// A 0700 scratch dir with the passphrase file in it (removed on drop).
pub struct Files(pub TestDir);

impl Files {
    pub fn new(tag: &str) -> Files {
        use std::os::unix::fs::PermissionsExt;
        let t = TestDir::new(tag);
        std::fs::create_dir_all(t.path()).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(t.path().join("pass"), format!("{PASSPHRASE}\n")).unwrap();
        Files(t)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    pub fn write_pass(&self, name: &str, pass: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, pass).unwrap();
        p
    }
}

pub fn keyhaven(args: &[&str], data_dir: &Path) -> Output {
    Command::new(bin()).args(args).arg("--data-dir").arg(data_dir).stdin(Stdio::null()).output().unwrap()
}

pub fn backup_cli(data_dir: &Path, out: &Path, pass: &Path) -> Output {
    keyhaven(&["backup", "--out", out.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()], data_dir)
}

pub fn restore_cli(data_dir: &Path, input: &Path, pass: &Path) -> Output {
    keyhaven(&["restore", "--in", input.to_str().unwrap(), "--passphrase-file", pass.to_str().unwrap()], data_dir)
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn failed(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Every record a client can see, by area, for before/after comparisons.
pub async fn all_records(c: &mut Client) -> BTreeMap<&'static str, Value> {
    let mut m = BTreeMap::new();
    m.insert("keychain", c.call("keychaincredential.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("users", c.call("user.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("ssh", c.call("ssh.config", json!([])).await);
    m.insert("api_keys", c.call("api_key.query", json!([[], {"order_by": ["id"]}])).await);
    m.insert("rsync", c.call("rsynctask.query", json!([[], {"order_by": ["id"]}])).await);
    m
}

/// Files of a data dir with their bytes, minus what changes by itself (the
/// lock file's pid).
pub fn dir_state(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    all_bytes_under(dir).into_iter().filter(|(p, _)| !p.ends_with("keyhaven.pid")).collect()
}

/// Open a backup with the real `age` tool, typing the passphrase into its
/// terminal through `script`; returns the decrypted tar.
pub fn age_decrypt(file: &Path, pass: &str, out_dir: &Path) -> Vec<u8> {
    let out = out_dir.join("decrypted.tar");
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new("script")
        .args(["-qec", &format!("age -d -o {} {}", out.display(), file.display()), "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run script(1) with age");
    std::thread::sleep(Duration::from_millis(500));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{pass}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_secs(10).min(Duration::from_millis(200)));
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "age -d did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(stdin);
    }
    std::fs::read(&out).unwrap_or_default()
}

/// The entries of a tar: name → bytes, in order.
pub fn tar_entries(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(tar);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().to_string();
            let mut b = vec![];
            e.read_to_end(&mut b).unwrap();
            (name, b)
        })
        .collect()
}

/// A backup file made of these entries, encrypted like keyhaven does (for
/// altered-file tests).
pub fn encrypt_entries(entries: &[(String, Vec<u8>)], pass: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, bytes) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o600);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    let plain = tar.into_inner().unwrap();
    let mut r = age::scrypt::Recipient::new(age::secrecy::SecretString::from(pass.to_string()));
    r.set_work_factor(14);
    let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient)).unwrap();
    let mut out = vec![];
    let mut w = enc.wrap_output(&mut out).unwrap();
    std::io::Write::write_all(&mut w, &plain).unwrap();
    w.finish().unwrap();
    out
}

/// Decrypt with the age crate (for building altered files quickly).
pub fn decrypt_bytes(file: &[u8], pass: &str) -> Vec<u8> {
    let d = age::Decryptor::new(file).unwrap();
    let id = age::scrypt::Identity::new(age::secrecy::SecretString::from(pass.to_string()));
    let mut r = d.decrypt(std::iter::once(&id as &dyn age::Identity)).unwrap();
    let mut out = vec![];
    r.read_to_end(&mut out).unwrap();
    out
}

/// The attributes of a key pair from `generate_ssh_key_pair`'s result.
pub fn pair(kp: &Value) -> Value {
    json!({"private_key": kp["private_key"], "public_key": kp["public_key"]})
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(b))
}

/// Four writers create key pairs through the API while `keyhaven backup`
/// runs; the data dir is wiped and restored from the file. The restored
/// state is one consistent moment: every record made before the backup
/// started, for each writer a prefix of what it wrote, each record exactly
/// as it was; every key pair decrypts, the connection tests OK, and sshd
/// serves the same host keys (a client with the old known_hosts logs in).
#[tokio::test]
async fn backup_under_write_load_wipe_restore_keeps_every_record() {
    sqlite_only!("a backup is a copy of keyhaven.db (PostgreSQL: pg_dump)");
    let dir = Arc::new(TestDir::new("backup-load"));
    let files = Files::new("backup-load-files");
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    let with_sshd = sshd_available();
    let mut conn = Value::Null;
    let mut kh = PathBuf::new();
    let mut port = 0;
    let mut login_key = PathBuf::new();
    if with_sshd {
        port = start_ssh(&mut c).await;
        kh = known_hosts(&mut c, files.0.path(), port).await;
        let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        let kp = c
            .call(
                "keychaincredential.create",
                json!([{"name": "conn-key", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]),
            )
            .await;
        login_key = crate::sshd::key_file(files.0.path(), "login", kp["attributes"]["private_key"].as_str().unwrap());
        let rid = c.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await["id"].clone();
        c.call("user.update", json!([rid, {"sshpubkey": kp["attributes"]["public_key"]}])).await;
        let host_keys =
            c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": port}])).await;
        conn = c
            .call(
                "keychaincredential.create",
                json!([{"name": "local", "type": "SSH_CREDENTIALS", "attributes": {
                    "host": "127.0.0.1", "port": port, "username": "root", "private_key": kp["id"],
                    "remote_host_key": host_keys}}]),
            )
            .await;
        let t = c.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
        assert_eq!(t["ok"], true, "{t}");
    }
    // A few records before the backup starts: these must all come back.
    for i in 0..5 {
        let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        c.call(
            "keychaincredential.create",
            json!([{"name": format!("before-{i}"), "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]),
        )
        .await;
    }
    let before_backup = all_records(&mut c).await;

    // Four writers through the API, running until the backup is done.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![];
    for w in 0..4 {
        let mut wc = d.admin().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 3 {
                let kp = wc.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
                wc.call(
                    "keychaincredential.create",
                    json!([{"name": format!("w{w}-{n:04}"), "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]),
                )
                .await;
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = files.path("load.age");
    let out = tokio::task::spawn_blocking({
        let (dir, file, pass) = (dir.path().to_path_buf(), file.clone(), files.path("pass"));
        move || backup_cli(&dir, &file, &pass)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    let said = ok(&out, "keyhaven backup");
    assert!(said.contains("schema version") && said.contains("master.key"), "{said}");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "backup file mode");
    }
    let at_wipe = all_records(&mut c).await;
    let keys_at_wipe = at_wipe["keychain"].as_array().unwrap().clone();
    assert!(keys_at_wipe.len() >= 5 + 12, "the writers wrote {written} records");

    // The real age tool opens it: a tar with the manifest first.
    let tar = age_decrypt(&file, PASSPHRASE, files.0.path());
    let entries = tar_entries(&tar);
    assert_eq!(entries[0].0, "manifest.json");
    let manifest: Value = serde_json::from_slice(&entries[0].1).unwrap();
    assert_eq!(manifest["format"], "keyhaven-backup");
    assert_eq!(manifest["keyhaven_version"], env!("CARGO_PKG_VERSION"));
    for part in manifest["parts"].as_array().unwrap() {
        let (_, bytes) = entries.iter().find(|(n, _)| n == part["name"].as_str().unwrap()).unwrap();
        assert_eq!(sha256_hex(bytes), part["sha256"], "{part}");
        assert_eq!(bytes.len() as u64, part["size"].as_u64().unwrap());
    }
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"keyhaven.db") && names.contains(&"master.key"), "{names:?}");
    if with_sshd {
        assert!(names.contains(&"sshd/ssh_host_ed25519_key"), "{names:?}");
    }
    assert!(names.contains(&"tls/cert.pem") == dir.path().join("tls/cert.pem").exists());
    // The database part is a standalone SQLite file, not a live copy with a journal.
    let (_, db) = entries.iter().find(|(n, _)| n == "keyhaven.db").unwrap();
    assert!(db.starts_with(b"SQLite format 3\0"));

    // Restore refuses while the daemon runs, and changes nothing.
    let e = failed(&restore_cli(dir.path(), &file, &files.path("pass")));
    assert!(e.contains("keyhaven is running") && e.contains("stop it first"), "{e}");

    // Wipe, restore, start.
    let host_keys_before = c.call("ssh.config", json!([])).await["host_keys"].clone();
    drop(c);
    d.stop();
    std::fs::remove_dir_all(dir.path()).unwrap();
    let said = ok(&restore_cli(dir.path(), &file, &files.path("pass")), "keyhaven restore");
    assert!(said.contains("restored the backup made by keyhaven"), "{said}");
    let d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    let restored = all_records(&mut c).await;

    // Everything from before the backup, exactly.
    for area in ["users", "api_keys", "rsync"] {
        assert_eq!(restored[area], before_backup[area], "{area} differ after restore");
    }
    assert_eq!(restored["ssh"]["host_keys"], host_keys_before, "sshd host keys differ");
    let restored_keys = restored["keychain"].as_array().unwrap();
    for k in before_backup["keychain"].as_array().unwrap() {
        assert!(restored_keys.contains(k), "lost or changed: {}", k["name"]);
    }
    // Each restored record is one that existed, unchanged; per writer a prefix.
    for k in restored_keys {
        assert!(keys_at_wipe.contains(k), "not a record that existed: {}", k["name"]);
    }
    for w in 0..4 {
        let mine: Vec<String> = restored_keys
            .iter()
            .filter_map(|k| k["name"].as_str())
            .filter(|n| n.starts_with(&format!("w{w}-")))
            .map(str::to_string)
            .collect();
        let expect: Vec<String> = (0..mine.len()).map(|n| format!("w{w}-{n:04}")).collect();
        assert_eq!(mine, expect, "writer {w}'s records are not a prefix of what it wrote");
    }
    // Every key pair decrypts: its private key downloads (read from the sealed column).
    let token = c.call("auth.generate_token", json!([600, {}, false, false])).await;
    let token = token.as_str().unwrap();
    for k in restored_keys.iter().filter(|k| k["type"] == "SSH_KEY_PAIR") {
        let url = format!("/_download/keychaincredential/{}/private_key?auth_token={token}", k["id"]);
        let r = http(&d, "GET", &url, &[], None).await;
        assert_eq!(r.status, 200, "{}: {}", k["name"], r.text());
        assert!(r.text().contains("PRIVATE KEY"), "{}", k["name"]);
    }
    if with_sshd {
        // sshd starts with the restored configuration and host keys: the
        // old known_hosts still matches, and the connection tests OK.
        let job = c.call("service.control", json!(["START", "ssh"])).await;
        let j = crate::sshd::wait_job(&mut c, &job).await;
        assert_eq!(j["state"], "SUCCESS", "{j}");
        let t = c.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
        assert_eq!(t["ok"], true, "{t}");
        let o = crate::sshd::ssh_key_login(&login_key, &kh, port, "root");
        assert!(o.status.success(), "ssh with the old known_hosts: {}", String::from_utf8_lossy(&o.stderr));
    }
    // The replaced state was kept aside until the restored one started, then removed.
    assert!(!std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("restore-")));
}

/// Backups that must be refused — wrong passphrase, truncated, a part
/// altered (hash mismatch), a newer schema, a work factor meant to burn CPU,
/// not a backup at all — each with a clear error, and the data dir unchanged.
#[tokio::test]
async fn bad_backups_are_refused_and_change_nothing() {
    sqlite_only!("backups are copies of keyhaven.db (PostgreSQL: pg_dump)");
    let dir = Arc::new(TestDir::new("backup-bad"));
    let files = Files::new("backup-bad-files");
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    {
        let mut c = d.admin().await;
        let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        c.call("keychaincredential.create", json!([{"name": "k", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]))
            .await;
    }
    let good = files.path("good.age");
    // A backup while the daemon runs, then one while it is stopped.
    ok(&backup_cli(dir.path(), &good, &files.path("pass")), "backup (running)");
    d.stop();
    ok(&backup_cli(dir.path(), &good, &files.path("pass")), "backup (stopped)");
    let bytes = std::fs::read(&good).unwrap();
    let plain = decrypt_bytes(&bytes, PASSPHRASE);
    let entries = tar_entries(&plain);
    let before = dir_state(dir.path());
    let write = |name: &str, b: &[u8]| {
        let p = files.path(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let unchanged = |what: &str| {
        assert_eq!(dir_state(dir.path()), before, "{what}: the data dir changed");
    };

    let wrong = files.write_pass("wrong", "not the passphrase\n");
    let e = failed(&restore_cli(dir.path(), &good, &wrong));
    assert!(e.contains("passphrase does not open this backup"), "{e}");
    unchanged("wrong passphrase");

    let empty = files.write_pass("empty", "\n");
    let e = failed(&restore_cli(dir.path(), &good, &empty));
    assert!(e.contains("is empty"), "{e}");

    for cut in [bytes.len() / 2, bytes.len() - 1, 40] {
        let t = write("truncated.age", &bytes[..cut]);
        let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
        assert!(e.contains("damaged or truncated"), "cut at {cut}: {e}");
        unchanged("truncated");
    }

    // A part altered after the manifest was written (re-encrypted, so only
    // the manifest's hash can tell).
    let mut altered = entries.clone();
    let key = altered.iter_mut().find(|(n, _)| n == "master.key").unwrap();
    key.1[0] ^= 0xff;
    let t = write("altered.age", &encrypt_entries(&altered, PASSPHRASE));
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("part master.key does not match its manifest") && e.contains("SHA-256"), "{e}");
    unchanged("altered part");

    // A part not in the manifest, and a manifest that is not first.
    let mut extra = entries.clone();
    extra.push(("sshd/ssh_host_evil_key".into(), b"x".to_vec()));
    let t = write("extra.age", &encrypt_entries(&extra, PASSPHRASE));
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("not listed in the manifest"), "{e}");
    let mut reordered = entries.clone();
    reordered.swap(0, 1);
    let t = write("reordered.age", &encrypt_entries(&reordered, PASSPHRASE));
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("not a manifest.json"), "{e}");
    unchanged("extra part");

    // A newer schema: refused naming the version that made it.
    let mut newer = entries.clone();
    let mut m: Value = serde_json::from_slice(&newer[0].1).unwrap();
    m["schema_version"] = json!(999);
    m["keyhaven_version"] = json!("9.9.9");
    newer[0].1 = serde_json::to_vec(&m).unwrap();
    let t = write("newer.age", &encrypt_entries(&newer, PASSPHRASE));
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("schema version 999") && e.contains("keyhaven 9.9.9"), "{e}");
    unchanged("newer schema");

    // A header asking for scrypt 2^40: refused at once, before any work.
    let text = String::from_utf8_lossy(&bytes[..200]).to_string();
    let line = text.lines().find(|l| l.starts_with("-> scrypt ")).unwrap().to_string();
    let costly_line = format!("{} 40", line.rsplit_once(' ').unwrap().0);
    let mut costly = bytes.clone();
    let at = bytes.windows(line.len()).position(|w| w == line.as_bytes()).unwrap();
    costly.splice(at..at + line.len(), costly_line.bytes());
    let t = write("costly.age", &costly);
    let started = Instant::now();
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("work factor 2^40"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    unchanged("costly header");

    let t = write("junk.age", b"this is not an age file at all\n");
    let e = failed(&restore_cli(dir.path(), &t, &files.path("pass")));
    assert!(e.contains("not a keyhaven backup"), "{e}");
    unchanged("junk");
    assert!(!std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        n.starts_with("restore-") || n.starts_with(".restore-tmp")
    }));

    // The good file still restores over the same dir, and the daemon starts on it.
    ok(&restore_cli(dir.path(), &good, &files.path("pass")), "restore good");
    let d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    assert_eq!(c.call("keychaincredential.query", json!([[["name", "=", "k"]], {"count": true}])).await, 1);
}

/// One HTTP/1.1 request with a binary body; (status, body).
pub async fn post_bytes(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let mut has_length = false;
    for (k, v) in headers {
        has_length |= k.eq_ignore_ascii_case("content-length");
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_length {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await.expect("a reply within 60 s");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// TrueNAS's upload form: `data` (the call) and `file`.
pub fn upload_form(passphrase: &str, file: &[u8]) -> (String, Vec<u8>) {
    let boundary = "keyhaven-test-boundary-7d1f";
    let data = json!({"method": "config.upload", "params": [{"passphrase": passphrase}]}).to_string();
    let mut body = Vec::new();
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n{data}\r\n").bytes());
    body.extend(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.age\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .bytes(),
    );
    body.extend_from_slice(file);
    body.extend(format!("\r\n--{boundary}--\r\n").bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// `config.save` (a job whose result is a single-use download link) and
/// `config.upload` (`POST /_upload`): refused without login, too large, with
/// the wrong passphrase or a costly header (nothing changed, the daemon keeps
/// serving); a good upload restarts the daemon in place (same pid and port)
/// onto the saved state: records, sshd host keys, a connection that tests OK.
#[tokio::test]
async fn config_save_and_upload_restore_in_place() {
    sqlite_only!("config.save/upload carry keyhaven.db (PostgreSQL: pg_dump)");
    let dir = Arc::new(TestDir::new("backup-api"));
    let files = Files::new("backup-api-files");
    let d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;
    let with_sshd = sshd_available();
    let mut conn = Value::Null;
    let (mut kh, mut port, mut login_key) = (PathBuf::new(), 0, PathBuf::new());
    if with_sshd {
        c.call("service.update", json!(["ssh", {"enable": true}])).await;
        port = start_ssh(&mut c).await;
        kh = known_hosts(&mut c, files.0.path(), port).await;
        let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        let kp = c
            .call("keychaincredential.create", json!([{"name": "k", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]))
            .await;
        login_key = crate::sshd::key_file(files.0.path(), "login", kp["attributes"]["private_key"].as_str().unwrap());
        let rid = c.call("user.query", json!([[["username", "=", "root"]], {"get": true}])).await["id"].clone();
        c.call("user.update", json!([rid, {"sshpubkey": kp["attributes"]["public_key"]}])).await;
        let hk =
            c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "127.0.0.1", "port": port}])).await;
        conn = c
            .call(
                "keychaincredential.create",
                json!([{"name": "local", "type": "SSH_CREDENTIALS", "attributes": {
                    "host": "127.0.0.1", "port": port, "username": "root", "private_key": kp["id"], "remote_host_key": hk}}]),
            )
            .await;
    } else {
        let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
        c.call("keychaincredential.create", json!([{"name": "k", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]))
            .await;
    }
    let saved = all_records(&mut c).await;

    // config.save: the passphrase is required, and never shows up in the job or the audit log.
    let e = c.err("config.save", json!([{}])).await;
    assert_field(&e, "config_save.passphrase", "Field required");
    let job = c.call("config.save", json!([{"passphrase": PASSPHRASE, "secretseed": true}])).await;
    let j = crate::sshd::wait_job(&mut c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    let url = j["result"].as_str().unwrap().to_string();
    assert!(url.starts_with("/_download/config/"), "{url}");
    assert!(!j.to_string().contains(PASSPHRASE));
    let audit = c.call("audit.query", json!([[]])).await;
    assert!(!audit.to_string().contains(PASSPHRASE), "the passphrase reached the audit log");
    let anon = http(&d, "GET", &url, &[], None).await;
    assert_eq!(anon.status, 401);
    let token = c.call("auth.generate_token", json!([600, {}, false, false])).await;
    let token = token.as_str().unwrap();
    let got = http(&d, "GET", &format!("{url}?auth_token={token}"), &[], None).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.header("content-disposition").unwrap().contains(".age"));
    let backup_file = got.body.clone();
    let entries = tar_entries(&decrypt_bytes(&backup_file, PASSPHRASE));
    assert_eq!(entries[0].0, "manifest.json");
    let again = http(&d, "GET", &format!("{url}?auth_token={token}"), &[], None).await;
    assert_eq!(again.status, 404, "download links are single use");
    assert!(!d.stderr().contains(PASSPHRASE), "the passphrase reached the log");

    // Change things after the save: the upload must undo them.
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    c.call(
        "keychaincredential.create",
        json!([{"name": "after-save", "type": "SSH_KEY_PAIR", "attributes": pair(&kp)}]),
    )
    .await;
    let changed = all_records(&mut c).await;
    let pid = d.pid();

    // Refused uploads, each leaving the daemon serving the same state.
    let (ct, form) = upload_form(PASSPHRASE, &backup_file);
    let (status, body) = post_bytes(d.addr, "/_upload", &[("Content-Type", &ct)], &form).await;
    assert_eq!(status, 401, "{body}");
    // A read-only admin may not restore (nor download a saved configuration).
    c.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "ro", "password": "ro-password-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let mut ro = d.client().await;
    ro.login("daemon", "ro-password-1").await;
    let ro_token = ro.call("auth.generate_token", json!([600, {}, false, false])).await;
    let ro_path = format!("/_upload?auth_token={}", ro_token.as_str().unwrap());
    let (status, body) = post_bytes(d.addr, &ro_path, &[("Content-Type", &ct)], &form).await;
    assert_eq!(status, 403, "{body}");
    let e = ro.err("config.save", json!([{"passphrase": PASSPHRASE}])).await;
    assert_eq!(e["data"]["errname"], "EACCES", "{e}");
    let auth = format!(
        "Bearer {}",
        c.call("api_key.create", json!([{"name": "up", "username": "admin"}])).await["key"].as_str().unwrap()
    );
    let (status, body) = post_bytes(
        d.addr,
        "/_upload",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
            ("X-Keyhaven-Passphrase", "x"),
            ("Content-Length", "300000000"),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (ct2, wrong) = upload_form("wrong passphrase", &backup_file);
    let (status, body) =
        post_bytes(d.addr, "/_upload", &[("Authorization", &auth), ("Content-Type", &ct2)], &wrong).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("passphrase does not open this backup"), "{body}");
    let text = String::from_utf8_lossy(&backup_file[..200]).to_string();
    let line = text.lines().find(|l| l.starts_with("-> scrypt ")).unwrap().to_string();
    let mut costly = backup_file.clone();
    let at = costly.windows(line.len()).position(|w| w == line.as_bytes()).unwrap();
    costly.splice(at..at + line.len(), format!("{} 40", line.rsplit_once(' ').unwrap().0).bytes());
    let started = Instant::now();
    let (status, body) = post_bytes(
        d.addr,
        "/_upload",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
            ("X-Keyhaven-Passphrase", PASSPHRASE),
        ],
        &costly,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("work factor 2^40") && started.elapsed() < Duration::from_secs(5), "{body}");
    assert_eq!(all_records(&mut c).await["keychain"], changed["keychain"], "a refused upload changed records");
    assert!(!dir.path().join("restore-staged").exists());

    // The good upload: staged, then the daemon restarts in place.
    let (status, body) =
        post_bytes(d.addr, "/_upload", &[("Authorization", &auth), ("Content-Type", &ct)], &form).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["result"]["restarting"], true, "{reply}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(d.stderr().contains("restored the staged backup") && d.stderr().matches(" ready").count() >= 2) {
        assert!(Instant::now() < deadline, "no restart onto the restored state:\n{}", d.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(d.pid(), pid, "restarted in place (same process)");
    let mut c = d.admin().await;
    let restored = all_records(&mut c).await;
    assert_eq!(restored["keychain"], saved["keychain"], "keychain differs from the saved state");
    assert_eq!(restored["users"], saved["users"]);
    assert_eq!(restored["ssh"]["host_keys"], saved["ssh"]["host_keys"]);
    if with_sshd {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
            if s["state"] == "RUNNING" {
                break;
            }
            assert!(Instant::now() < deadline, "sshd did not come back after the restart: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = c.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
        assert_eq!(t["ok"], true, "{t}");
        let o = crate::sshd::ssh_key_login(&login_key, &kh, port, "root");
        assert!(o.status.success(), "ssh with the old known_hosts: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(!std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("restore-")));
}

/// A raw `POST /_upload` with a chunked body (no Content-Length): `chunks`
/// chunks of `chunk` bytes, then, when `finish`, the last chunk. The reply is
/// read while the body is being sent (the server answers and closes early).
async fn post_chunked(
    addr: std::net::SocketAddr,
    auth: &str,
    chunk: usize,
    chunks: usize,
    finish: bool,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![];
        let mut part = [0u8; 4096];
        loop {
            match rd.read(&mut part).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&part[..n]),
            }
        }
        buf
    });
    let head = format!(
        "POST /_upload HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {auth}\r\n\
         Content-Type: application/octet-stream\r\nX-Keyhaven-Passphrase: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let body = vec![b'k'; chunk];
    let mut ok = wr.write_all(head.as_bytes()).await.is_ok();
    for _ in 0..chunks {
        if !ok {
            break;
        }
        ok = wr.write_all(format!("{chunk:x}\r\n").as_bytes()).await.is_ok()
            && wr.write_all(&body).await.is_ok()
            && wr.write_all(b"\r\n").await.is_ok();
    }
    if ok && finish {
        let _ = wr.write_all(b"0\r\n\r\n").await;
    }
    let buf = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("a reply within 60 s").unwrap();
    drop(wr);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Files named `.upload-*` anywhere under `dir` (staged uploads).
fn staged_uploads(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if e.file_name().to_string_lossy().starts_with(".upload-") {
                found.push(p);
            }
        }
    }
    found
}

/// An admin streaming a chunked body (no Content-Length to refuse up front)
/// past the 256 MiB cap gets 413 with the cap in the message, no staged file
/// is left in the data dir, and the daemon keeps serving the admin.
#[tokio::test]
async fn chunked_upload_past_the_cap_is_refused_and_cleaned_up() {
    let d = Daemon::start_in(Arc::new(TestDir::new("upload-cap")), DaemonOpts::default());
    let mut c = d.admin().await;
    let key = c.call("api_key.create", json!([{"name": "up", "username": "admin"}])).await;
    let auth = format!("Bearer {}", key["key"].as_str().unwrap());
    let started = Instant::now();
    // 257 chunks of 1 MiB: one more than the cap, never a Content-Length.
    let (status, body) = post_chunked(d.addr, &auth, 1 << 20, 257, true).await;
    eprintln!("streaming past the cap took {:?}", started.elapsed());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains(&format!("larger than {} bytes", 256u64 << 20)), "{body}");
    assert!(staged_uploads(d.dir.path()).is_empty(), "a staged upload was left: {:?}", staged_uploads(d.dir.path()));
    let me = c.call("auth.me", json!([])).await;
    assert_eq!(me["pw_name"], "admin", "{me}");
}

/// A half-open upload (headers and a few bytes, then nothing) holds the one
/// upload slot only until the idle timeout (shortened here): meanwhile the
/// admin's API calls are served and a second upload is told to wait (409);
/// then the stalled one gets 408, its staged file is removed, and the second
/// admin's upload gets the slot (refused as not a backup, 422).
#[tokio::test]
async fn stalled_upload_times_out_and_frees_the_slot() {
    let mut opts = DaemonOpts::default();
    opts.env.push(("KEYHAVEN_TEST_UPLOAD_IDLE_MS".into(), "2000".into()));
    let d = Daemon::start_in(Arc::new(TestDir::new("upload-stall")), opts);
    let mut c = d.admin().await;
    let key = c.call("api_key.create", json!([{"name": "stall", "username": "admin"}])).await;
    let auth = format!("Bearer {}", key["key"].as_str().unwrap());
    let key2 = c.call("api_key.create", json!([{"name": "second", "username": "admin"}])).await;
    let auth2 = format!("Bearer {}", key2["key"].as_str().unwrap());
    let addr = d.addr;
    let started = Instant::now();
    let stalled = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /_upload HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {auth}\r\n\
             Content-Type: application/octet-stream\r\nX-Keyhaven-Passphrase: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             4\r\nkeyh\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Never sends more; read what the server says and when.
        let mut buf = vec![];
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await;
        (String::from_utf8_lossy(&buf).to_string(), started.elapsed())
    });
    // Wait until the stalled upload holds the slot (its staged file exists).
    let deadline = Instant::now() + Duration::from_secs(5);
    while staged_uploads(d.dir.path()).is_empty() {
        assert!(Instant::now() < deadline, "the stalled upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let me = c.call("auth.me", json!([])).await;
    assert_eq!(me["pw_name"], "admin", "{me}");
    assert!(t.elapsed() < Duration::from_secs(1), "an API call waited on the stalled upload");
    let (status, body) = post_chunked(addr, &auth2, 16, 1, true).await;
    assert_eq!(status, 409, "{body}");
    let (reply, after) = stalled.await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("sent nothing for 2000 ms"), "{reply}");
    assert!(after < Duration::from_secs(10), "the stalled upload was dropped only after {after:?}");
    assert!(staged_uploads(d.dir.path()).is_empty(), "the stalled upload's file was left");
    let (status, body) = post_chunked(addr, &auth2, 16, 1, true).await;
    assert_eq!(status, 422, "{body}");
}
