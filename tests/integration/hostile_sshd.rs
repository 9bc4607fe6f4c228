//! Hostile auxiliary parameters (hardening point 8). `ssh.update` `options`
//! lines that would let anyone who reaches sshd read a root-only file before
//! authentication, or make sshd run something as root, are refused with a
//! field error naming the line and the directive — at global scope and inside
//! a `Match` block — and change nothing; an accepted change of `options` is
//! audited with its text.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::sshd::{free_port, sshd_available, start_ssh, wait_job};
use crate::util::*;

/// `text` as a `Match User backup` block: every line moves down by one.
fn in_match(text: &str) -> String {
    format!("Match User backup\n{}", text.lines().map(|l| format!("\t{l}\n")).collect::<String>())
}

/// Refuse `options` in both forms with `Line N: <start>` on `ssh_update.options`,
/// N being the line in the global form.
async fn assert_refused(c: &mut Client, options: &str, line: usize, start: &str) {
    for (text, n) in [(options.to_string(), line), (in_match(options), line + 1)] {
        let e = c.err("ssh.update", json!([{"options": text}])).await;
        assert_field(&e, "ssh_update.options", &format!("Line {n}: {start}"));
    }
}

fn write_file(path: &Path, mode: u32) {
    std::fs::write(path, "Authorised access only.\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn directives_that_run_as_root_or_leak_files_are_refused_and_change_nothing() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    c.call("ssh.update", json!([{"options": "MaxAuthTries 4"}])).await;
    let config_before = c.call("ssh.config", json!([])).await;
    let file = d.dir.path().join("sshd/sshd_config");
    let file_before = std::fs::read_to_string(&file).unwrap();

    let cases: &[(&str, usize, &str)] = &[
        ("ModuliFile /etc/ssh/moduli", 1, "ModuliFile cannot be set in auxiliary parameters: sshd reads it as root"),
        ("PidFile /tmp/other.pid", 1, "PidFile cannot be set in auxiliary parameters"),
        ("Subsystem sftp /usr/lib/openssh/sftp-server", 1, "Subsystem sftp cannot be set in auxiliary parameters"),
        ("Subsystem backup /bin/cat", 1, "Subsystem backup cannot be set in auxiliary parameters"),
        (
            "AuthorizedKeysCommand /bin/cat\nAuthorizedKeysCommandUser root",
            2,
            "AuthorizedKeysCommandUser cannot be set to root in auxiliary parameters: sshd would run the \
             AuthorizedKeysCommand as root for every connection, before authentication",
        ),
        ("AuthorizedKeysCommand /bin/cat\nAuthorizedKeysCommandUser %u", 2, "AuthorizedKeysCommandUser cannot be set to %u"),
        (
            "AuthorizedKeysCommand /bin/cat %u",
            1,
            "AuthorizedKeysCommand cannot be set in auxiliary parameters without an AuthorizedKeysCommandUser line",
        ),
        (
            "AuthorizedPrincipalsCommand /bin/cat\nAuthorizedPrincipalsCommandUser root",
            2,
            "AuthorizedPrincipalsCommandUser cannot be set to root",
        ),
        (
            "AuthorizedPrincipalsCommand /bin/cat %u",
            1,
            "AuthorizedPrincipalsCommand cannot be set in auxiliary parameters without an AuthorizedPrincipalsCommandUser line",
        ),
        ("HostKeyAgent /run/agent.sock", 1, "HostKeyAgent cannot be set in auxiliary parameters"),
        ("SecurityKeyProvider /tmp/sk.so", 1, "SecurityKeyProvider cannot be set in auxiliary parameters"),
        ("SshdSessionPath /bin/sh", 1, "SshdSessionPath cannot be set in auxiliary parameters"),
        ("SshdAuthPath /bin/sh", 1, "SshdAuthPath cannot be set in auxiliary parameters"),
        ("PermitUserEnvironment yes", 1, "PermitUserEnvironment cannot be set to yes in auxiliary parameters"),
        ("AcceptEnv LANG *", 1, "AcceptEnv cannot accept * in auxiliary parameters"),
    ];
    for (options, line, start) in cases {
        assert_refused(&mut c, options, *line, start).await;
    }
    // The master key, by its path: the banner would send it to anyone.
    let master = d.dir.path().join("master.key");
    assert_refused(
        &mut c,
        &format!("Banner {}", master.display()),
        1,
        &format!("Banner cannot be set to {} in auxiliary parameters: sshd sends this file", master.display()),
    )
    .await;

    assert_eq!(c.call("ssh.config", json!([])).await, config_before, "a refused options text was saved");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), file_before, "sshd_config changed");

    // The accepted form: an unprivileged account runs the command.
    let ok = "AuthorizedKeysCommand /usr/local/bin/keys %u\nAuthorizedKeysCommandUser nobody\nBanner none";
    c.call("ssh.update", json!([{"options": ok}])).await;
    assert!(std::fs::read_to_string(&file).unwrap().contains("AuthorizedKeysCommandUser nobody\n"));
}

#[tokio::test]
async fn a_banner_must_be_a_public_file_and_is_sent_when_it_is() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let master = d.dir.path().join("master.key");

    // A root-owned 0755 directory outside /tmp (which anyone can write).
    let dir = TestDir::new("banner");
    std::fs::create_dir(dir.path()).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = dir.path().join("private.txt");
    write_file(&private, 0o600);
    let to_master = dir.path().join("issue-link");
    symlink(&master, &to_master).unwrap();
    let issue = dir.path().join("issue.net");
    write_file(&issue, 0o644);
    let to_issue = dir.path().join("issue-alias");
    symlink(&issue, &to_issue).unwrap();

    let through_link =
        format!("it is a symbolic link or its path goes through one (or through ..): the file is {}", issue.display());
    for (path, why) in [
        (master.clone(), "it is inside keyhaven's data directory"),
        (to_master, "it is inside keyhaven's data directory"),
        (private, "it is not readable by everyone (mode 0600)"),
        (to_issue, through_link.as_str()),
        (dir.path().join("missing"), "it cannot be opened"),
    ] {
        let msg = format!("Banner cannot be set to {} in auxiliary parameters: sshd sends this file to anyone who connects, before authentication, and {why}", path.display());
        assert_refused(&mut c, &format!("Banner {}", path.display()), 1, &msg).await;
    }
    assert_refused(&mut c, "Banner issue.net", 1, "Banner cannot be set to issue.net in auxiliary parameters").await;

    // The public file is accepted, in a Match block too, and sshd really sends it.
    c.call("ssh.update", json!([{"options": in_match(&format!("Banner {}", issue.display()))}])).await;
    c.call("ssh.update", json!([{"options": format!("Banner {}", issue.display())}])).await;
    let out = Command::new("ssh")
        .args(["-p", &port.to_string(), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "PubkeyAuthentication=no", "-o", "LogLevel=INFO"])
        .args(["nobody@127.0.0.1", "true"])
        .output()
        .expect("run ssh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a login without a key succeeded: {stderr}");
    assert!(stderr.contains("Authorised access only."), "the banner was not sent: {stderr}");
}

/// The `ssh.update` audit entries, oldest first.
async fn ssh_update_audit(c: &mut Client) -> Vec<Value> {
    let v =
        c.call("audit.query", json!([[["event_data.method", "=", "ssh.update"]], {"order_by": ["audit_id"]}])).await;
    v.as_array().unwrap().clone()
}

#[tokio::test]
async fn an_accepted_options_change_is_audited_with_its_text() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let options = "MaxAuthTries 5\nAuthorizedKeysCommand /usr/local/bin/keys %u\nAuthorizedKeysCommandUser nobody";
    c.call("ssh.update", json!([{"options": options}])).await;
    // Refused, unchanged options and cleared options.
    let _ = c.err("ssh.update", json!([{"options": "ModuliFile /etc/ssh/moduli"}])).await;
    c.call("ssh.update", json!([{"tcpfwd": true}])).await;
    c.call("ssh.update", json!([{"options": ""}])).await;
    // A long text is kept up to 8 KiB, and says it was cut.
    let long = format!("MaxAuthTries 6\n{}", "# padding to make the text long\n".repeat(400));
    c.call("ssh.update", json!([{"options": long}])).await;

    let entries = ssh_update_audit(&mut c).await;
    let described: Vec<(bool, &str)> = entries
        .iter()
        .map(|e| (e["success"].as_bool().unwrap(), e["event_data"]["description"].as_str().unwrap()))
        .collect();
    assert_eq!(described.len(), 5, "{described:#?}");
    assert_eq!(
        described[0],
        (true, format!("Update SSH configuration: auxiliary parameters (options) set to:\n{options}").as_str())
    );
    assert_eq!(entries[0]["username"], "admin");
    assert_eq!(described[1], (false, "Update SSH configuration"));
    assert_eq!(described[2], (true, "Update SSH configuration"));
    assert_eq!(described[3], (true, "Update SSH configuration: auxiliary parameters (options) cleared"));
    let (ok, text) = described[4];
    assert!(
        ok && text.starts_with("Update SSH configuration: auxiliary parameters (options) set to:\nMaxAuthTries 6\n")
    );
    assert!(text.ends_with(&format!("[truncated: the first 8192 of {} bytes are shown]", long.len())), "{text}");
    assert!(text.len() < 8192 + 200);
}

/// Settings saved before a directive was refused (here a Banner naming the
/// master key, written behind keyhaven's back) never reach sshd: starting the
/// service fails and says how to fix it; after `ssh.update` it starts.
#[tokio::test]
async fn saved_settings_refused_now_keep_sshd_from_starting() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    let dir = std::sync::Arc::new(TestDir::new("oldsettings"));
    let mut d = Daemon::start_in(dir.clone(), Default::default());
    let mut c = d.admin().await;
    let port = free_port();
    c.call("ssh.update", json!([{"tcpport": port, "options": "MaxAuthTries 4"}])).await;
    drop(c);
    d.stop();
    let master = dir.path().join("master.key");
    let script = "import sqlite3, sys, json\n\
        c = sqlite3.connect(sys.argv[1])\n\
        v = json.loads(c.execute(\"SELECT value FROM settings WHERE key = 'ssh'\").fetchone()[0])\n\
        v['options'] = 'Banner ' + sys.argv[2]\n\
        c.execute(\"UPDATE settings SET value = ? WHERE key = 'ssh'\", (json.dumps(v),))\n\
        c.commit()\n";
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.path().join("keyhaven.db"))
        .arg(&master)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = Daemon::start_in(dir.clone(), Default::default());
    let mut c = d.admin().await;
    let job = c.call("service.control", json!(["START", "ssh"])).await;
    let job = wait_job(&mut c, &job).await;
    assert_eq!(job["state"], "FAILED", "{job}");
    let err = job["error"].as_str().unwrap_or_default();
    assert!(err.contains("its saved settings are no longer accepted") && err.contains("Banner"), "{err}");
    let rendered = std::fs::read_to_string(dir.path().join("sshd/sshd_config")).unwrap_or_default();
    assert!(!rendered.contains("master.key"), "the refused banner reached sshd_config");
    // Fixed through the API, the service starts (on the port set before).
    c.call("ssh.update", json!([{"options": "Banner none"}])).await;
    let job = c.call("service.control", json!(["START", "ssh"])).await;
    assert_eq!(wait_job(&mut c, &job).await["state"], "SUCCESS");
    let _ = port;
}
