//! Accounts that never disagree with the system (issue 15): OS-owned fields
//! come from NSS, changes to them are refused unless keyhaven manages OS
//! accounts, pairing refuses an account that cannot run commands, accounts
//! removed or recreated behind keyhaven's back stop being served, and keys
//! sshd could not read are never reported as saved. Real daemons, real OS
//! accounts (useradd/userdel, so root only), a real sshd and `ssh`.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::sshd::{free_port, key_file, known_hosts, ssh_key_login, sshd_available, wait_job};
use crate::util::*;

fn root_only() -> bool {
    if !sshd_available() {
        eprintln!("skipped: needs root (useradd) and /usr/sbin/sshd");
        return false;
    }
    true
}

fn managed(yes: bool) -> DaemonOpts {
    DaemonOpts { env: vec![("KEYHAVEN_ACCOUNTS_MANAGE_OS".into(), yes.to_string())], ..Default::default() }
}

async fn user_entry(c: &mut Client, name: &str) -> Value {
    c.call("user.query", json!([[["username", "=", name]], {"get": true}])).await
}

/// Start sshd on a free port; returns the port.
async fn start_sshd(c: &mut Client) -> u16 {
    let port = free_port();
    c.call("ssh.update", json!([{"tcpport": port}])).await;
    let job = c.call("service.control", json!(["START", "ssh"])).await;
    assert_eq!(wait_job(c, &job).await["state"], "SUCCESS");
    port
}

/// A fresh Ed25519 pair: (public line, private key file).
async fn key_pair(c: &mut Client, dir: &std::path::Path, name: &str) -> (String, std::path::PathBuf) {
    let kp = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let file = key_file(dir, name, kp["private_key"].as_str().unwrap());
    (kp["public_key"].as_str().unwrap().trim().to_string(), file)
}

fn scratch(tag: &str) -> TestDir {
    let t = TestDir::new(tag);
    std::fs::create_dir_all(t.path()).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    t
}

#[tokio::test]
async fn os_owned_fields_follow_the_system_when_keyhaven_does_not_manage_accounts() {
    if !root_only() {
        return;
    }
    let d = Daemon::start_in(Arc::new(TestDir::new("osown")), managed(false));
    let mut a = d.admin().await;
    let acct = OsUserGuard::new("khos");
    acct.useradd("/bin/sh", None);
    let u =
        a.call("user.create", json!([{"username": acct.name, "full_name": "Backup", "password_disabled": true}])).await;
    assert_eq!((u["shell"].as_str(), u["uid"].as_u64()), (Some("/bin/sh"), Some(acct.uid() as u64)));
    assert_eq!(u["os_account"]["state"], "OK");
    // Changed in the OS behind keyhaven's back: the entry shows the system's value.
    assert!(Command::new("usermod").args(["-s", "/bin/bash", &acct.name]).status().unwrap().success());
    assert_eq!(user_entry(&mut a, &acct.name).await["shell"], "/bin/bash");
    // A change of an OS-owned field is refused, naming the setting; nothing changes.
    for (field, value) in
        [("shell", json!("/usr/sbin/nologin")), ("home", json!("/srv/elsewhere")), ("group", json!(0))]
    {
        let e = a.err("user.update", json!([u["id"], {field: value}])).await;
        assert_field(&e, &format!("user_update.{field}"), "accounts.manage_os = true");
    }
    let e = a.err("user.update", json!([u["id"], {"shell": "/usr/sbin/nologin"}])).await;
    assert_field(&e, "user_update.shell", &format!("The OS owns the login shell of {} (now /bin/bash)", acct.name));
    let now = user_entry(&mut a, &acct.name).await;
    assert_eq!(now["shell"], "/bin/bash");
    // The OS's own value, or other fields, are fine.
    a.call("user.update", json!([u["id"], {"shell": "/bin/bash", "full_name": "Backup job"}])).await;
    // user.create with a shell other than the OS account's is refused too.
    a.call("user.delete", json!([u["id"]])).await;
    let e = a
        .err(
            "user.create",
            json!([{"username": acct.name, "full_name": "", "password_disabled": true, "shell": "/bin/sh"}]),
        )
        .await;
    assert_field(&e, "user_create.shell", "accounts.manage_os");
}

/// Semi-automatic setup with the system itself (as TrueNAS's tests pair) for
/// an account whose shell is nologin: without manage_os it fails before
/// anything changes, saying why; with manage_os the shell is set and the new
/// connection's test passes.
#[tokio::test]
async fn nologin_pairing_in_both_modes() {
    if !root_only() {
        return;
    }
    for manage in [false, true] {
        let d = Daemon::start_in(Arc::new(TestDir::new("nologin")), managed(manage));
        let mut a = d.admin().await;
        let port = start_sshd(&mut a).await;
        let acct = OsUserGuard::new("khnl");
        acct.useradd("/usr/sbin/nologin", None);
        a.call("user.create", json!([{"username": acct.name, "full_name": "", "password_disabled": true}])).await;
        let before = a.call("keychaincredential.query", json!([[], {"count": true}])).await;
        let setup = json!([{"connection_name": "self", "setup_type": "SEMI-AUTOMATIC",
            "private_key": {"generate_key": true, "name": "self Key"},
            "semi_automatic_setup": {"url": d.url, "allow_insecure_http": true, "admin_username": "admin",
                                     "password": ADMIN_PASSWORD, "username": acct.name}}]);
        if !manage {
            let e = a.err("keychaincredential.setup_ssh_connection", setup).await;
            assert_call_error(&e, "EFAULT", &format!("User {} cannot run commands over SSH", acct.name));
            assert!(e["data"]["reason"].as_str().unwrap().contains("accounts.manage_os = true"), "{e}");
            assert_eq!(a.call("keychaincredential.query", json!([[], {"count": true}])).await, before);
            let u = user_entry(&mut a, &acct.name).await;
            assert!(u["sshpubkey"].is_null() && u["shell"] == "/usr/sbin/nologin", "{u}");
        } else {
            let conn = a.call("keychaincredential.setup_ssh_connection", setup).await;
            assert_eq!(conn["attributes"]["port"], port);
            let u = user_entry(&mut a, &acct.name).await;
            assert_eq!(u["shell"], "/usr/bin/bash", "the OS shell was changed: {u}");
            let out = Command::new("getent").args(["passwd", &acct.name]).output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).trim_end().ends_with(":/usr/bin/bash"));
            let t = a.call("keychaincredential.test_ssh_connection", json!([conn["id"]])).await;
            assert_eq!(t["ok"], true, "{t}");
        }
    }
}

/// A data dir below a directory other accounts cannot search: keys for a
/// non-root account are refused with what to change (and the start warns);
/// once the data dir is moved where they can, the same key logs in.
#[tokio::test]
async fn keys_sshd_cannot_read_are_refused_until_the_data_dir_moves() {
    if !root_only() {
        return;
    }
    let base = TestDir::new("private");
    std::fs::create_dir_all(base.path()).unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = Arc::new(TestDir(base.path().join("data")));
    let mut d = Daemon::start_in(hidden.clone(), managed(false));
    let warned = std::time::Instant::now();
    while !d.stderr().contains("keys set on accounts other than root will not work") {
        assert!(warned.elapsed() < std::time::Duration::from_secs(5), "no start warning: {}", d.stderr());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut a = d.admin().await;
    let acct = OsUserGuard::new("khreach");
    acct.useradd("/bin/sh", None);
    let u = a.call("user.create", json!([{"username": acct.name, "full_name": "", "password_disabled": true}])).await;
    let keys = scratch("reach-keys");
    let (public, private) = key_pair(&mut a, keys.path(), "id").await;
    let e = a.err("user.update", json!([u["id"], {"sshpubkey": public}])).await;
    assert_field(&e, "user_update.sshpubkey", "cannot be searched by");
    assert_field(&e, "user_update.sshpubkey", "/var/lib/keyhaven");
    assert!(user_entry(&mut a, &acct.name).await["sshpubkey"].is_null(), "a refused key was saved");
    drop(a);
    d.stop();
    // Moved to a path every account can traverse: the same key is accepted and works.
    let moved = Arc::new(TestDir::new("moved"));
    std::fs::rename(hidden.path(), moved.path()).unwrap();
    test_database_moved(hidden.path(), moved.path());
    let d = Daemon::start_in(moved, managed(false));
    let mut a = d.admin().await;
    a.call("user.update", json!([u["id"], {"sshpubkey": public}])).await;
    let port = start_sshd(&mut a).await;
    let kh = known_hosts(&mut a, keys.path(), port).await;
    let o = ssh_key_login(&private, &kh, port, &acct.name);
    assert!(o.status.success(), "the key did not log in: {}", String::from_utf8_lossy(&o.stderr));
}

/// `userdel` behind keyhaven's back: the account shows MISSING and its key no
/// longer logs in; recreated with another uid (maybe another person) it shows
/// UID_CHANGED and stays refused until an admin adopts the new uid.
#[tokio::test]
async fn os_account_removed_or_recreated_behind_keyhavens_back() {
    if !root_only() {
        return;
    }
    let d = Daemon::start_in(Arc::new(TestDir::new("gone")), managed(false));
    let mut a = d.admin().await;
    let acct = OsUserGuard::new("khgone");
    acct.useradd("/bin/sh", None);
    let old_uid = acct.uid();
    let u = a.call("user.create", json!([{"username": acct.name, "full_name": "", "password_disabled": true}])).await;
    let keys = scratch("gone-keys");
    let (public, private) = key_pair(&mut a, keys.path(), "id").await;
    a.call("user.update", json!([u["id"], {"sshpubkey": public}])).await;
    let port = start_sshd(&mut a).await;
    let kh = known_hosts(&mut a, keys.path(), port).await;
    assert!(ssh_key_login(&private, &kh, port, &acct.name).status.success(), "the key did not log in at first");
    let file = d.dir.path().join("sshd/authorized_keys").join(&acct.name);
    assert!(file.exists());

    acct.userdel();
    let e = user_entry(&mut a, &acct.name).await;
    assert_eq!(e["os_account"]["state"], "MISSING", "{e}");
    assert!(e["os_account"]["message"].as_str().unwrap().contains("no longer exists"), "{e}");
    assert!(!file.exists(), "the keys file of a removed account is still served");

    // Same name, another uid.
    let new_uid = old_uid + 7;
    acct.useradd("/bin/sh", Some(new_uid));
    let e = user_entry(&mut a, &acct.name).await;
    assert_eq!(e["os_account"]["state"], "UID_CHANGED", "{e}");
    assert_eq!(e["uid"], new_uid);
    assert!(!file.exists());
    let o = ssh_key_login(&private, &kh, port, &acct.name);
    assert!(!o.status.success(), "the old account's key logged in to the recreated account");
    // Keys cannot be set until the new uid is adopted; adopting serves them again.
    let err = a.err("user.update", json!([u["id"], {"sshpubkey": public}])).await;
    assert_field(&err, "user_update.sshpubkey", &format!("now has uid {new_uid}"));
    let other = a.err("user.update", json!([u["id"], {"uid": new_uid + 1}])).await;
    assert_field(&other, "user_update.uid", "cannot be changed");
    let adopted = a.call("user.update", json!([u["id"], {"uid": new_uid, "sshpubkey": public}])).await;
    assert_eq!(adopted["os_account"]["state"], "OK", "{adopted}");
    let o = ssh_key_login(&private, &kh, port, &acct.name);
    assert!(o.status.success(), "the adopted account's key did not log in: {}", String::from_utf8_lossy(&o.stderr));
}

/// With keys in homes (TrueNAS's layout) an account's existing
/// `~/.ssh/authorized_keys` is its keys: adopted by `user.create`, never
/// deleted by it nor by starting sshd.
#[tokio::test]
async fn existing_home_keys_are_adopted_not_deleted() {
    if !root_only() {
        return;
    }
    let mut opts = managed(false);
    opts.env.push(("KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION".into(), "home".into()));
    let d = Daemon::start_in(Arc::new(TestDir::new("homekeys")), opts);
    let mut a = d.admin().await;
    let acct = OsUserGuard::new("khhome");
    acct.useradd("/bin/sh", None);
    let home = std::path::PathBuf::from(format!("/home/{}", acct.name));
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let line = kp["public_key"].as_str().unwrap().trim().to_string();
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let file = home.join(".ssh/authorized_keys");
    std::fs::write(&file, format!("{line}\n")).unwrap();
    let uid = acct.uid();
    for p in [home.join(".ssh"), file.clone()] {
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }
    std::fs::set_permissions(home.join(".ssh"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let u = a.call("user.create", json!([{"username": acct.name, "full_name": "", "password_disabled": true}])).await;
    assert_eq!(u["sshpubkey"].as_str().map(str::trim), Some(line.as_str()), "{u}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{line}\n"), "user.create changed the file");
    let port = start_sshd(&mut a).await;
    assert!(port > 0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{line}\n"), "starting sshd changed the file");
    // Clearing the keys explicitly does remove it.
    a.call("user.update", json!([u["id"], {"sshpubkey": null}])).await;
    assert!(!file.exists());
}
