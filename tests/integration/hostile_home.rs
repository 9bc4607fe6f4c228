//! Authorized keys in home directories whose owner works against keyhaven
//! (hardening issue, point 7): a real daemon with
//! `ssh.authorized_keys_location = home`, running as root, and a real OS
//! account whose `~/.ssh` is a symbolic link into someone else's directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::json;

use crate::util::*;

/// An OS account made for one test, removed again even if the test fails.
/// Its home lives in a `TestDir`, which removes it: `userdel` without `-r`,
/// which would walk a home full of planted links.
struct OsAccount(String);

impl OsAccount {
    fn create(home: &Path) -> OsAccount {
        let mut r = [0u8; 4];
        getrandom(&mut r);
        let name = format!("khtest-{}", hex(&r));
        let o = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", "--home-dir"])
            .arg(home)
            .arg(&name)
            .output()
            .expect("useradd (Debian package `passwd`)");
        assert!(o.status.success(), "useradd {name}: {}", String::from_utf8_lossy(&o.stderr));
        OsAccount(name)
    }

    fn id(&self, flag: &str) -> u32 {
        let o = Command::new("id").args([flag, &self.0]).output().unwrap();
        String::from_utf8(o.stdout).unwrap().trim().parse().unwrap()
    }
}

impl Drop for OsAccount {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).stderr(Stdio::null()).status();
    }
}

/// What an attack through a directory could change: its entries, mode and
/// owner, and the content, mode and owner of its `authorized_keys`.
#[derive(Debug, PartialEq)]
struct Snapshot {
    entries: Vec<String>,
    dir: (u32, u32),
    keys: String,
    file: (u32, u32),
}

fn snapshot(dir: &Path) -> Snapshot {
    let mut entries: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    let d = std::fs::symlink_metadata(dir).unwrap();
    let f = std::fs::symlink_metadata(dir.join("authorized_keys")).unwrap();
    Snapshot {
        entries,
        dir: (d.mode(), d.uid()),
        keys: std::fs::read_to_string(dir.join("authorized_keys")).unwrap(),
        file: (f.mode(), f.uid()),
    }
}

#[tokio::test]
async fn a_dot_ssh_symlink_never_redirects_keyhaven() {
    if crate::util::euid() != 0 {
        eprintln!("skipped: needs root (useradd, and keyhaven writing homes as root)");
        return;
    }
    let homes = TestDir::new("hostile-home");
    let home = homes.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let account = OsAccount::create(&home);
    let u = account.0.clone();
    let (uid, gid) = (account.id("-u"), account.id("-g"));
    std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Someone else's keys, e.g. another account's ~/.ssh or /root/.ssh.
    let victims = TestDir::new("hostile-victim");
    let victim = victims.path().join("ssh");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("authorized_keys"), "ssh-ed25519 AAAA the-victim's-key\n").unwrap();
    std::fs::set_permissions(victim.join("authorized_keys"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o751)).unwrap();
    let before = snapshot(&victim);

    let d = Daemon::start_in(
        Arc::new(TestDir::new("hostile-daemon")),
        DaemonOpts { env: vec![("KEYHAVEN_SSH_AUTHORIZED_KEYS_LOCATION".into(), "home".into())], ..Default::default() },
    );
    let mut c = d.admin().await;
    let k1 = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let k2 = c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    // The account works normally first: keyhaven makes its ~/.ssh.
    let created = c
        .call(
            "user.create",
            json!([{"username": u, "full_name": "", "password_disabled": true, "sshpubkey": k1["public_key"]}]),
        )
        .await;
    let ssh = home.join(".ssh");
    let m = std::fs::metadata(ssh.join("authorized_keys")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (uid, 0o600));

    // The account's owner swaps ~/.ssh for a link to the victim's directory.
    std::fs::remove_dir_all(&ssh).unwrap();
    std::os::unix::fs::symlink(&victim, &ssh).unwrap();
    let expected = format!(
        "Failed to update authorized keys: ~/.ssh of {u} ({}) is a symbolic link; keyhaven does not follow it. Replace it with a directory owned by {u}",
        ssh.display()
    );
    let id = created["id"].clone();
    let record = c.call("user.query", json!([[["id", "=", id]], {"get": true}])).await;
    for keys in [k2["public_key"].clone(), json!(""), json!(null)] {
        let e = c.err("user.update", json!([id, {"sshpubkey": keys}])).await;
        assert_call_error(&e, "EACCES", &expected);
        assert_eq!(snapshot(&victim), before, "user.update with sshpubkey {keys} changed the link's target");
        let now = c.call("user.query", json!([[["id", "=", id]], {"get": true}])).await;
        assert_eq!(now, record, "a refused user.update changed the account");
    }
    // Pairing refuses before it enables and starts sshd.
    let e = c
        .err(
            "keychaincredential.ssh_pair",
            json!([{"remote_hostname": "h", "username": u, "public_key": k2["public_key"]}]),
        )
        .await;
    assert_call_error(&e, "EACCES", &expected);
    let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
    assert_eq!((s["enable"].clone(), s["state"].clone()), (json!(false), json!("STOPPED")), "{s}");
    assert_eq!(snapshot(&victim), before);

    // Doing what the message says makes the account work again.
    std::fs::remove_file(&ssh).unwrap();
    std::fs::create_dir(&ssh).unwrap();
    std::os::unix::fs::chown(&ssh, Some(uid), Some(gid)).unwrap();
    c.call("user.update", json!([id, {"sshpubkey": k2["public_key"]}])).await;
    let written = std::fs::read_to_string(ssh.join("authorized_keys")).unwrap();
    assert!(written.contains(k2["public_key"].as_str().unwrap().trim()), "{written}");

    // Deleting the account removes its keys file; through a link it must not.
    let real = homes.path().join("real-ssh");
    std::fs::rename(&ssh, &real).unwrap();
    std::os::unix::fs::symlink(&victim, &ssh).unwrap();
    c.call("user.delete", json!([id])).await;
    assert_eq!(snapshot(&victim), before, "user.delete removed the link's target");
    assert!(std::fs::symlink_metadata(&ssh).unwrap().file_type().is_symlink());
    assert_eq!(c.call("user.query", json!([[["username", "=", u]], {"count": true}])).await, 0);
}
