//! Rsync tasks (issue 12): real rsync over real OpenSSH ssh to keyhaven's own
//! supervised sshd, with the key served by the run's in-memory agent.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::sshd::{sshd_available, start_ssh, wait_job};
use crate::util::*;

fn skip() -> bool {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return true;
    }
    // Where the tests can run, rsync must be there (`make test` installs it).
    assert!(Path::new("/usr/bin/rsync").exists(), "install the Debian package rsync (make deps)");
    false
}

/// A daemon with its sshd up, an OS account `remote` that the connection
/// logs in as (its key set through keyhaven), and the connection.
struct Setup {
    d: Daemon,
    c: Client,
    port: u16,
    remote: OsUserGuard,
    kp: Value,
    conn: Value,
}

async fn setup() -> Setup {
    let d = Daemon::start();
    let mut c = d.admin().await;
    let port = start_ssh(&mut c).await;
    let (remote, kp, conn) =
        crate::sshd::account_and_connection(&mut c, port, "khrs", "/bin/sh", "backup-target").await;
    Setup { d, c, port, remote, kp, conn }
}

/// A directory for trees, outside every data dir, owned by `uid`.
fn tree_dir(tag: &str, uid: u32) -> TestDir {
    let t = TestDir::new(tag);
    std::fs::create_dir_all(t.path()).unwrap();
    std::os::unix::fs::chown(t.path(), Some(uid), Some(uid_gid(uid))).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    t
}

fn uid_gid(uid: u32) -> u32 {
    if uid == 0 {
        return 0;
    }
    let o = std::process::Command::new("id").args(["-g", &uid.to_string()]).output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().parse().unwrap()
}

/// Nested directories, names with spaces and non-ASCII letters, a symlink and a 16 MB file.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b c/d")).unwrap();
    std::fs::create_dir_all(root.join("Ünïcødé dir")).unwrap();
    std::fs::write(root.join("top.txt"), b"top\n").unwrap();
    std::fs::write(root.join("a/b c/with space.txt"), b"spaces\n").unwrap();
    std::fs::write(root.join("a/b c/d/deep.bin"), (0..=255u8).collect::<Vec<_>>()).unwrap();
    std::fs::write(root.join("Ünïcødé dir/файл €.txt"), "non-ascii ✓\n").unwrap();
    let mut big = vec![0u8; 16 * 1024 * 1024];
    getrandom(&mut big);
    std::fs::write(root.join("big.bin"), &big).unwrap();
    std::os::unix::fs::symlink("a/b c/with space.txt", root.join("link to file")).unwrap();
}

/// Every entry under `root`: relative path → content or link target.
fn snapshot(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            let ft = e.file_type().unwrap();
            if ft.is_symlink() {
                out.insert(rel, format!("-> {}", std::fs::read_link(&p).unwrap().display()));
            } else if ft.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(rel, format!("{} bytes, {}", bytes.len(), hex(&sha(&bytes))));
            }
        }
    }
    out
}

fn sha(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(b).to_vec()
}

fn chown_tree(root: &Path, uid: u32) {
    let gid = uid_gid(uid);
    let st =
        std::process::Command::new("chown").args(["-R", "-h", &format!("{uid}:{gid}")]).arg(root).status().unwrap();
    assert!(st.success());
}

async fn run_and_wait(c: &mut Client, id: &Value) -> Value {
    let job = c.call("rsynctask.run", json!([id])).await;
    assert!(job.is_i64(), "rsynctask.run returns a job id: {job}");
    wait_job(c, &job).await
}

/// Some distinctive line of the private key's base64 body.
fn key_marker(private_key: &str) -> String {
    private_key.lines().nth(2).unwrap().to_string()
}

/// Files under `dirs` written since `since` that hold `needle` (not following
/// symlinks; a directory that vanishes meanwhile, such as a finished run's,
/// is skipped). Older files and large ones cannot be a key written for the
/// run, and reading them (a checkout's target dir under /tmp) would take
/// longer than the run.
fn files_holding(dirs: &[&Path], needle: &[u8], since: std::time::SystemTime) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            let fresh_and_small =
                e.metadata().is_ok_and(|m| m.len() <= 64 * 1024 && m.modified().is_ok_and(|t| t >= since));
            if ft.is_file() && fresh_and_small && std::fs::read(&p).is_ok_and(|b| contains(&b, needle)) {
                found.push(p);
            }
        }
    }
    found
}

#[tokio::test]
async fn push_and_pull_a_tree_with_the_key_served_from_memory() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let remote_uid = s.remote.uid();
    let src = tree_dir("rs-src", 0);
    make_tree(src.path());
    let dst = tree_dir("rs-dst", remote_uid);

    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "direction": "PUSH",
                    "ssh_credentials": s.conn["id"], "remotepath": dst.path(), "archive": true,
                    "desc": "push test", "extra": ["--bwlimit=6000"]}]),
        )
        .await;
    // TrueNAS's shape: the connection entry, defaults, read-only fields.
    assert_eq!(task["ssh_credentials"]["id"], s.conn["id"], "{task}");
    assert_eq!(task["ssh_credentials"]["type"], "SSH_CREDENTIALS");
    assert_eq!(task["schedule"], json!({"minute": "00", "hour": "*", "dom": "*", "month": "*", "dow": "*"}));
    for (f, v) in [("recursive", true), ("times", true), ("compress", true), ("delayupdates", true), ("enabled", true)]
    {
        assert_eq!(task[f], v, "{f}: {task}");
    }
    for f in ["delete", "quiet", "preserveperm", "preserveattr"] {
        assert_eq!(task[f], false, "{f}: {task}");
    }
    assert!(task["job"].is_null() && task["locked"] == false && task["dataset"].is_null(), "{task}");
    assert!(task.get("validate_rpath").is_none() && task.get("ssh_keyscan").is_none(), "write-only: {task}");

    // While the run goes on, no file anywhere holds the private key.
    let private = s.c.call("keychaincredential.get_instance", json!([s.kp["id"]])).await["attributes"]["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let marker = key_marker(&private);
    let since = std::time::SystemTime::now() - Duration::from_secs(2);
    let run_dir = s.d.dir.path().join("run");
    // The agent's directory is watched by a thread of its own, every 10 ms, so
    // that seeing it does not depend on how long one scan of /tmp takes (in CI
    // /tmp may hold a whole cargo target directory).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            let mut modes = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(rd) = std::fs::read_dir(&run_dir) {
                    // Gone already if the run just ended.
                    modes.extend(
                        rd.flatten().filter_map(|e| std::fs::symlink_metadata(e.path()).ok()).map(|m| m.mode()),
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            modes
        })
    };
    let job = s.c.call("rsynctask.run", json!([task["id"]])).await;
    let mut scans = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = s.c.call("core.get_jobs", json!([[["id", "=", job]], {"get": true}])).await;
        if j["state"] != "RUNNING" {
            break;
        }
        assert!(Instant::now() < deadline, "run still going: {j}");
        let found = files_holding(
            &[s.d.dir.path(), Path::new("/tmp"), Path::new("/var/tmp"), Path::new("/dev/shm"), Path::new("/root/.ssh")],
            marker.as_bytes(),
            since,
        );
        assert!(found.is_empty(), "files holding the private key during a run: {found:?}");
        scans += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let modes = watcher.join().unwrap();
    assert!(!modes.is_empty(), "the run's agent directory was seen");
    for m in &modes {
        assert_eq!(m & 0o777, 0o700, "the run's agent directory is private");
    }
    // The scan above runs at least once only if the run outlasts one status
    // call; --bwlimit makes it last ~3 s. Scanned after the run as well:
    // nothing may be left behind either.
    let found = files_holding(
        &[s.d.dir.path(), Path::new("/tmp"), Path::new("/var/tmp"), Path::new("/dev/shm"), Path::new("/root/.ssh")],
        marker.as_bytes(),
        since,
    );
    assert!(found.is_empty(), "files holding the private key after the run: {found:?}");
    assert!(scans > 0, "the run lasted long enough to be scanned during it ({scans} scans)");
    let j = wait_job(&mut s.c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    assert_eq!(j["arguments"], json!([task["id"]]));
    assert!(j["logs_excerpt"].as_str().unwrap().contains("rsync finished"), "{j}");
    assert_eq!(snapshot(src.path()), snapshot(dst.path()), "pushed tree = source tree");
    // Files on the remote belong to the connection's account.
    assert_eq!(std::fs::metadata(dst.path().join("big.bin")).unwrap().uid(), remote_uid);
    // The agent and its directory are gone with the run.
    let left: Vec<_> = std::fs::read_dir(s.d.dir.path().join("run")).unwrap().collect();
    assert!(left.is_empty(), "agent directories left: {left:?}");

    // The task shows its last run.
    let t = s.c.call("rsynctask.get_instance", json!([task["id"]])).await;
    assert_eq!(t["job"]["state"], "SUCCESS", "{t}");
    assert_eq!(t["job"]["id"], job);

    // PULL the pushed tree back into an empty directory.
    let back = tree_dir("rs-back", 0);
    let pull =
        s.c.call(
            "rsynctask.create",
            json!([{"path": back.path(), "user": "root", "mode": "SSH", "direction": "PULL",
                    "ssh_credentials": s.conn["id"], "remotepath": dst.path(), "archive": true}]),
        )
        .await;
    let j = run_and_wait(&mut s.c, &pull["id"]).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    assert_eq!(snapshot(src.path()), snapshot(back.path()), "pulled tree = source tree");
    assert!(j["progress"]["percent"].as_f64().unwrap() == 100.0, "{j}");
}

#[tokio::test]
async fn a_changed_host_key_fails_the_run_before_any_data_is_sent() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-hk-src", 0);
    std::fs::write(src.path().join("secret.txt"), b"must not arrive").unwrap();
    let dst = tree_dir("rs-hk-dst", s.remote.uid());
    // The connection pins another key than the server's (as after a change of the server's keys).
    let other = s.c.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let other_line = other["public_key"].as_str().unwrap().trim().to_string();
    let mut attrs = s.conn["attributes"].clone();
    attrs["remote_host_key"] = json!(other_line);
    s.c.call("keychaincredential.update", json!([s.conn["id"], {"attributes": attrs}])).await;
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path(), "validate_rpath": false}]),
        )
        .await;
    let j = run_and_wait(&mut s.c, &task["id"]).await;
    assert_eq!(j["state"], "FAILED", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(err.contains("Host key verification failed"), "{err}");
    // Both fingerprints: the pinned one and the one the server presents.
    let scan =
        s.c.call(
            "keychaincredential.remote_ssh_host_key_scan_fingerprints",
            json!([{"host": "127.0.0.1", "port": s.port}]),
        )
        .await;
    let presented = scan[0]["fingerprint"].as_str().unwrap();
    assert!(err.contains(presented), "presented fingerprint {presented} in {err}");
    assert!(err.matches("SHA256:").count() >= 2, "{err}");
    assert!(err.contains("test_ssh_connection"), "says how to re-pin: {err}");
    assert!(std::fs::read_dir(dst.path()).unwrap().next().is_none(), "nothing reached the destination");
    let t = s.c.call("rsynctask.get_instance", json!([task["id"]])).await;
    assert_eq!(t["job"]["state"], "FAILED");
    assert!(t["job"]["error"].as_str().unwrap().contains("Host key verification failed"));

    // With validate_rpath (the default) the save itself is refused, naming the host key.
    let e =
        s.c.err(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path()}]),
        )
        .await;
    let (attr, msg) = extra(&e).into_iter().next().unwrap();
    assert_eq!(attr, "rsync_task_create.remotepath", "{e}");
    assert!(msg.contains("host key") || msg.contains("Host key"), "{msg}");
}

#[tokio::test]
async fn validation_names_the_field_and_changes_nothing() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-val", 0);
    let dst = tree_dir("rs-val-dst", s.remote.uid());
    let p = src.path().to_str().unwrap().to_string();
    let data = s.d.dir.path().to_str().unwrap().to_string();
    let conn = s.conn["id"].clone();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"path": p, "user": "root"}), "rsync_task_create.remotehost", "required"),
        (json!({"path": p, "user": "root", "remotehost": "nas"}), "rsync_task_create.remotemodule", "required"),
        (
            json!({"path": p, "user": "root", "remotehost": "nas", "remotemodule": "m", "ssh_credentials": conn}),
            "rsync_task_create.ssh_credentials",
            "MODULE",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn}),
            "rsync_task_create.remotepath",
            "required",
        ),
        (
            json!({"path": "rel/dir", "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x"}),
            "rsync_task_create.path",
            "absolute",
        ),
        (
            json!({"path": "/no/such/dir", "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x"}),
            "rsync_task_create.path",
            "does not exist",
        ),
        (
            json!({"path": data, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x"}),
            "rsync_task_create.path",
            "data directory",
        ),
        (
            json!({"path": "/", "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x"}),
            "rsync_task_create.path",
            "data directory",
        ),
        (
            json!({"path": p, "user": "no-such-user-kh", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x"}),
            "rsync_task_create.user",
            "does not exist",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": 9999, "remotepath": "/x"}),
            "rsync_task_create.ssh_credentials",
            "does not exist",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x", "extra": ["-e", "ssh -i /tmp/k"]}),
            "rsync_task_create.extra",
            "replace how keyhaven connects",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x", "extra": ["--rsync-path=sudo rsync"]}),
            "rsync_task_create.extra",
            "replace how keyhaven connects",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x", "schedule": {"minute": "61"}}),
            "rsync_task_create.schedule.minute",
            "out of range",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "remotehost": "h", "remoteport": 0, "remotepath": "/x"}),
            "rsync_task_create.remoteport",
            "",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x", "direction": "SIDEWAYS"}),
            "rsync_task_create.direction",
            "",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": "/x", "bogus": 1}),
            "rsync_task_create.bogus",
            "Extra inputs",
        ),
        (
            json!({"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": dst.path().join("missing")}),
            "rsync_task_create.remotepath",
            "does not exist or is not a directory",
        ),
    ];
    for (task, attr, msg) in cases {
        let e = s.c.err("rsynctask.create", json!([task])).await;
        let got = extra(&e);
        assert!(
            got.iter().any(|(a, m)| a == attr && m.contains(msg)),
            "{task}: expected {attr} ~ {msg:?}, got {got:?}"
        );
    }
    assert_eq!(s.c.call("rsynctask.query", json!([[], {"count": true}])).await, 0, "nothing was created");

    // A valid task; a bad update changes nothing.
    let t =
        s.c.call(
            "rsynctask.create",
            json!([{"path": p, "user": "root", "mode": "SSH", "ssh_credentials": conn, "remotepath": dst.path(),
                    "schedule": {"minute": "*/5", "hour": "1-3", "dow": "mon,fri"}}]),
        )
        .await;
    assert_eq!(t["schedule"], json!({"minute": "*/5", "hour": "1-3", "dom": "*", "month": "*", "dow": "mon,fri"}));
    let e = s.c.err("rsynctask.update", json!([t["id"], {"schedule": {"hour": "25"}}])).await;
    assert_field(&e, "rsync_task_update.schedule.hour", "out of range");
    let same = s.c.call("rsynctask.get_instance", json!([t["id"]])).await;
    assert_eq!(same, t, "a refused update changes nothing");
    let u = s.c.call("rsynctask.update", json!([t["id"], {"desc": "nightly", "schedule": {"hour": "2"}}])).await;
    assert_eq!(u["desc"], "nightly");
    assert_eq!(u["schedule"]["minute"], "*/5", "a partial schedule keeps the other fields");
    assert_eq!(u["schedule"]["hour"], "2");
    // Not found.
    let e = s.c.err("rsynctask.run", json!([424242])).await;
    assert_call_error(&e, "ENOENT", "does not exist");
}

#[tokio::test]
async fn one_run_at_a_time_and_cascade_delete_disables_the_task() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-one", 0);
    let mut big = vec![0u8; 8 * 1024 * 1024];
    getrandom(&mut big);
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    let dst = tree_dir("rs-one-dst", s.remote.uid());
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path(), "extra": ["--bwlimit=2000"], "compress": false}]),
        )
        .await;
    let job = s.c.call("rsynctask.run", json!([task["id"]])).await;
    let e = s.c.err("rsynctask.run", json!([task["id"]])).await;
    assert_call_error(&e, "EBUSY", "already running");
    // Progress from --info=progress2 reaches the job while it runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = s.c.call("core.get_jobs", json!([[["id", "=", job]], {"get": true}])).await;
        let pct = j["progress"]["percent"].as_f64().unwrap();
        if pct > 0.0 && pct < 100.0 {
            assert!(j["progress"]["description"].as_str().unwrap().contains("bytes"), "{j}");
            break;
        }
        assert!(j["state"] == "RUNNING" && Instant::now() < deadline, "no progress seen: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let j = wait_job(&mut s.c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");

    // used_by: the connection's tasks, and through it the key pair's.
    let used = s.c.call("keychaincredential.used_by", json!([s.conn["id"]])).await;
    assert_eq!(used.as_array().unwrap().len(), 1, "{used}");
    assert_eq!(used[0]["unbind_method"], "disable");
    let used = s.c.call("keychaincredential.used_by", json!([s.kp["id"]])).await;
    let methods: Vec<&str> = used.as_array().unwrap().iter().map(|u| u["unbind_method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["delete", "disable"], "{used}");
    let e = s.c.err("keychaincredential.delete", json!([s.conn["id"]])).await;
    assert_field(&e, "options.cascade", "no cascade option");
    s.c.call("keychaincredential.delete", json!([s.conn["id"], {"cascade": true}])).await;
    let t = s.c.call("rsynctask.get_instance", json!([task["id"]])).await;
    assert_eq!(t["enabled"], false, "{t}");
    assert!(t["ssh_credentials"].is_null(), "{t}");
    assert_eq!(t["job"]["state"], "SUCCESS", "the last run is kept");
    s.c.call("rsynctask.delete", json!([task["id"]])).await;
    assert_eq!(s.c.call("rsynctask.query", json!([[], {"count": true}])).await, 0);
}

#[tokio::test]
async fn a_non_root_task_runs_as_its_account_and_owns_the_files() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let local = OsUserGuard::new("khrl");
    local.useradd("/bin/sh", None);
    let uid = local.uid();
    let src = tree_dir("rs-nr-src", s.remote.uid());
    std::fs::write(src.path().join("from remote.txt"), b"pulled as the account\n").unwrap();
    std::fs::create_dir(src.path().join("sub")).unwrap();
    std::fs::write(src.path().join("sub/x"), b"x").unwrap();
    chown_tree(src.path(), s.remote.uid());
    let dst = tree_dir("rs-nr-dst", uid);
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": dst.path(), "user": local.name, "mode": "SSH", "direction": "PULL",
                    "ssh_credentials": s.conn["id"], "remotepath": src.path()}]),
        )
        .await;
    // Run from the command line, waiting for the end.
    let id = task["id"].to_string();
    let cli = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(["rsync"])
            .args(args)
            .arg("--data-dir")
            .arg(s.d.dir.path())
            .output()
            .unwrap()
    };
    let o = cli(&["run", &id, "--wait"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "keyhaven rsync run --wait: {out} {err}");
    assert!(out.contains("rsync task finished"), "{out}");
    assert!(err.contains("100%"), "progress shown while waiting: {err}");
    let o = cli(&["list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    let row =
        out.lines().find(|l| l.starts_with(&format!("{id} "))).unwrap_or_else(|| panic!("task {id} listed: {out}"));
    assert!(row.contains("PULL") && row.contains("SUCCESS") && row.contains(&s.remote.name), "{row}");
    let j = s.c.call("rsynctask.get_instance", json!([task["id"]])).await["job"].clone();
    assert_eq!(j["state"], "SUCCESS", "{j}");
    for f in ["from remote.txt", "sub/x", "sub"] {
        assert_eq!(std::fs::metadata(dst.path().join(f)).unwrap().uid(), uid, "{f} belongs to the task's account");
    }
    assert_eq!(std::fs::read(dst.path().join("from remote.txt")).unwrap(), b"pulled as the account\n");

    // The account cannot write where it has no right: the run fails with rsync's own words.
    let root_only = tree_dir("rs-nr-root", 0);
    std::fs::set_permissions(root_only.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let t2 =
        s.c.call(
            "rsynctask.create",
            json!([{"path": root_only.path(), "user": local.name, "mode": "SSH", "direction": "PULL",
                    "ssh_credentials": s.conn["id"], "remotepath": src.path()}]),
        )
        .await;
    let j = run_and_wait(&mut s.c, &t2["id"]).await;
    assert_eq!(j["state"], "FAILED", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(err.starts_with("rsync command returned 23 - partial transfer due to error"), "{err}");
    assert!(err.contains("Permission denied"), "the last lines of rsync's output: {err}");
}

fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if contains(&cmd, needle.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_daemon_killed_during_a_run_leaves_no_rsync_and_reports_the_run_failed() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-kill", 0);
    let mut big = vec![0u8; 16 * 1024 * 1024];
    getrandom(&mut big);
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    let dst = tree_dir("rs-kill-dst", s.remote.uid());
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path(), "extra": ["--bwlimit=1000"], "compress": false}]),
        )
        .await;
    let job = s.c.call("rsynctask.run", json!([task["id"]])).await;
    let marker = src.path().file_name().unwrap().to_string_lossy().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_mentioning(&marker).is_empty() {
        assert!(Instant::now() < deadline, "rsync never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = job;
    let sshd_pid = s.c.call("service.query", json!([[], {"get": true}])).await["pids"][0].as_i64().unwrap() as i32;
    signal(s.d.pid() as u32, libc::SIGKILL);
    let _ = s.d.child.take().map(|mut c| c.wait());
    // rsync dies with the daemon (and the ssh it started with it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = processes_mentioning(&marker);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left running after kill -9: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // sshd was the daemon's child too: stop it by PID if it outlived the daemon.
    let data = s.d.dir.path().to_string_lossy().to_string();
    if processes_mentioning(&data).contains(&sshd_pid) {
        signal(sshd_pid as u32, libc::SIGKILL);
    }
    let d2 = Daemon::start_in(s.d.dir.clone(), DaemonOpts::default());
    let mut c2 = d2.admin().await;
    let left: Vec<_> = std::fs::read_dir(s.d.dir.path().join("run")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "the killed run's agent directory is cleared at start: {left:?}");
    let t = c2.call("rsynctask.get_instance", json!([task["id"]])).await;
    assert_eq!(t["job"]["state"], "FAILED", "{t}");
    assert!(t["job"]["error"].as_str().unwrap().contains("keyhaven stopped during this run"), "{t}");
    assert!(!t["job"]["time_finished"].is_null(), "{t}");
}

#[tokio::test]
async fn scheduler_runs_an_enabled_task_on_its_minute() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-sched", 0);
    std::fs::write(src.path().join("f"), b"scheduled").unwrap();
    let dst = tree_dir("rs-sched-dst", s.remote.uid());
    let every_minute = json!({"minute": "*", "hour": "*", "dom": "*", "month": "*", "dow": "*"});
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path(), "schedule": every_minute}]),
        )
        .await;
    let disabled_dst = tree_dir("rs-sched-off", s.remote.uid());
    let off =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": disabled_dst.path(), "schedule": every_minute, "enabled": false}]),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        let t = s.c.call("rsynctask.get_instance", json!([task["id"]])).await;
        if t["job"]["state"] == "SUCCESS" {
            break;
        }
        assert!(Instant::now() < deadline, "the scheduler did not run the task within a minute: {t}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(std::fs::read(dst.path().join("f")).unwrap(), b"scheduled");
    let j = s.c.call("core.get_jobs", json!([[["method", "=", "rsynctask.run"]]])).await;
    assert!(j[0]["logs_excerpt"].as_str().unwrap().starts_with("Scheduled run"), "{j}");
    let off = s.c.call("rsynctask.get_instance", json!([off["id"]])).await;
    assert!(off["job"].is_null(), "a disabled task is not run: {off}");
    assert!(std::fs::read_dir(disabled_dst.path()).unwrap().next().is_none());
}

/// Data Protection › Rsync Tasks in headless Chromium: add a task with a
/// connection (host and port hidden), Run Now with live progress, the last
/// run's log, disable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_tasks_screen_in_headless_chromium() {
    use crate::ui::{click, field, fill, js, modal_closed, shot, start_chromium, ui_login, wait_js};
    if skip() {
        return;
    }
    let mut s = setup().await;
    let src = tree_dir("rs-ui-src", 0);
    std::fs::write(src.path().join("from the browser.txt"), b"clicked\n").unwrap();
    let dst = tree_dir("rs-ui-dst", s.remote.uid());
    let downloads = TestDir::new("rs-ui-dl");
    std::fs::create_dir_all(downloads.path()).unwrap();
    let (cd, driver) = start_chromium(downloads.path()).await;
    let d = &s.d;
    let conn_id = s.conn["id"].to_string();
    let (src_p, dst_p) = (src.path().to_str().unwrap().to_string(), dst.path().to_str().unwrap().to_string());
    let run = async {
        ui_login(&driver, d).await;
        driver.goto(format!("{}/#/data-protection/rsync", d.url)).await.unwrap();
        wait_js(&driver, "rsync page", "return document.querySelector('#view-rsync h1');", vec![]).await;
        click(&driver, "#rsync-add").await;
        wait_js(&driver, "task form", "return document.getElementById('modal').open;", vec![]).await;
        fill(&driver, &field("path"), &src_p).await;
        fill(&driver, &field("ssh_credentials"), &conn_id).await;
        fill(&driver, &field("remotepath"), &dst_p).await;
        // With a connection chosen, its host and port apply: the fields are hidden (NAS-118168).
        let hidden = js(
            &driver,
            "return document.querySelector(\"#modal [name='remotehost']\").closest('.field').hidden;",
            vec![],
        )
        .await;
        assert_eq!(hidden, json!(true));
        shot(&driver, "rsync-add").await;
        click(&driver, "#form-submit").await;
        modal_closed(&driver, "task saved").await;
        wait_js(&driver, "task row", "return document.querySelector('[data-task]');", vec![]).await;
        let id = js(&driver, "return Number(document.querySelector('[data-task]').dataset.task);", vec![]).await;
        click(&driver, &format!("[data-run='{id}']")).await;
        let state = wait_js(
            &driver,
            "run finished",
            "const s = document.getElementById('rsync-state'); return s && s.dataset.state;",
            vec![],
        )
        .await;
        assert_eq!(state, json!("SUCCESS"));
        assert_eq!(js(&driver, "return document.getElementById('rsync-progress').value;", vec![]).await, json!(100));
        shot(&driver, "rsync-run").await;
        click(&driver, "#rsync-close").await;
        modal_closed(&driver, "run dialog closed").await;
        wait_js(&driver, "last run shown", "return document.querySelector('[data-task] .badge.ok');", vec![]).await;
        click(&driver, &format!("[data-log='{id}']")).await;
        let log = wait_js(
            &driver,
            "last log",
            "const l = document.getElementById('rsync-last-log'); return l && l.textContent;",
            vec![],
        )
        .await;
        assert!(log.as_str().unwrap().contains("rsync finished"), "{log}");
        id
    };
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await;
    let _ = driver.quit().await;
    drop(cd);
    let id = match outcome {
        Ok(id) => id,
        Err(p) => {
            eprintln!("daemon stderr:\n{}", s.d.stderr());
            std::panic::resume_unwind(p);
        }
    };
    assert_eq!(std::fs::read(dst.path().join("from the browser.txt")).unwrap(), b"clicked\n");
    let t = s.c.call("rsynctask.get_instance", json!([id])).await;
    assert_eq!(t["ssh_credentials"]["id"], s.conn["id"]);
    assert_eq!(t["job"]["state"], "SUCCESS");
}

/// A local user who owns the task's directory swaps it, after the task was
/// saved, for a symlink into keyhaven's data directory: the run refuses to
/// start, and nothing of the data directory (master key, database) leaves.
#[tokio::test]
async fn hostile_a_path_swapped_for_a_symlink_into_the_data_dir_is_refused_at_run_time() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let mallory = OsUserGuard::new("khmal");
    mallory.useradd("/bin/sh", None);
    let theirs = tree_dir("rs-mal", mallory.uid());
    let path = theirs.path().join("data");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("ordinary.txt"), b"ordinary").unwrap();
    let dst = tree_dir("rs-mal-dst", s.remote.uid());
    let task = s
        .c
        .call(
            "rsynctask.create",
            json!([{"path": path, "user": "root", "mode": "SSH", "ssh_credentials": s.conn["id"], "remotepath": dst.path()}]),
        )
        .await;
    // What mallory can do in a directory of theirs.
    std::fs::remove_dir_all(&path).unwrap();
    std::os::unix::fs::symlink(s.d.dir.path(), &path).unwrap();
    let j = run_and_wait(&mut s.c, &task["id"]).await;
    assert_eq!(j["state"], "FAILED", "{j}");
    let err = j["error"].as_str().unwrap();
    assert!(err.contains("data directory") && err.contains("did not start"), "{err}");
    assert!(std::fs::read_dir(dst.path()).unwrap().next().is_none(), "nothing was sent");
    assert_eq!(s.c.call("core.ping", json!([])).await, "pong", "the admin is still served");
}

/// The run's agent answers only the run itself (its process group), and
/// only lists and signs: another account cannot reach it, and the account's
/// other processes can neither use the key nor remove or lock it.
#[tokio::test]
async fn hostile_the_run_agent_serves_only_its_account_and_only_signs() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let runner = OsUserGuard::new("khrun");
    runner.useradd("/bin/sh", None);
    let other = OsUserGuard::new("khoth");
    other.useradd("/bin/sh", None);
    let src = tree_dir("rs-agent-src", runner.uid());
    let mut big = vec![0u8; 6 * 1024 * 1024];
    getrandom(&mut big);
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    chown_tree(src.path(), runner.uid());
    let dst = tree_dir("rs-agent-dst", s.remote.uid());
    let task =
        s.c.call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": runner.name, "mode": "SSH", "ssh_credentials": s.conn["id"],
                    "remotepath": dst.path(), "compress": false, "extra": ["--bwlimit=1500"]}]),
        )
        .await;
    let job = s.c.call("rsynctask.run", json!([task["id"]])).await;
    let run_dir = s.d.dir.path().join("run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let sock = loop {
        let found = std::fs::read_dir(&run_dir)
            .ok()
            .and_then(|rd| rd.flatten().map(|e| e.path().join("agent.sock")).find(|p| p.exists()));
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no agent socket appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let dir = sock.parent().unwrap();
    assert_eq!(
        std::fs::metadata(dir).unwrap().uid(),
        runner.uid(),
        "the agent's directory belongs to the run's account"
    );
    let ssh_add = |uid: u32, args: &[&str]| {
        std::process::Command::new("setpriv")
            .args([&format!("--reuid={uid}"), &format!("--regid={}", uid_gid(uid)), "--clear-groups", "--", "ssh-add"])
            .args(args)
            .env("SSH_AUTH_SOCK", &sock)
            .output()
            .unwrap()
    };
    let o = ssh_add(other.uid(), &["-l"]);
    assert!(!o.status.success(), "another account reached the agent: {}", String::from_utf8_lossy(&o.stdout));
    // The account's own processes outside the run's process group get nothing either:
    // no list, no signature, no removal.
    let o = ssh_add(runner.uid(), &["-l"]);
    assert!(
        !o.status.success(),
        "another process of the account listed the key: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!ssh_add(runner.uid(), &["-D"]).status.success(), "removing the key is refused");
    let o = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={}", runner.uid()),
            &format!("--regid={}", uid_gid(runner.uid())),
            "--clear-groups",
            "--",
            "sh",
            "-c",
            "echo pw | SSH_ASKPASS_REQUIRE=never ssh-add -x",
        ])
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(!o.status.success(), "locking the agent is refused");
    assert_eq!(s.c.call("core.ping", json!([])).await, "pong", "the admin is still served");
    let j = wait_job(&mut s.c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "the run was not disturbed: {j}");
    assert!(!dir.exists(), "the agent's directory is gone with the run");
}

/// MODULE mode against a real rsync daemon (`rsync --daemon`) on a loopback port.
#[tokio::test]
async fn module_mode_pushes_to_an_rsync_daemon() {
    if skip() {
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let module_dir = tree_dir("rs-mod", 0);
    let conf_dir = tree_dir("rs-mod-conf", 0);
    let port = crate::sshd::free_port();
    let conf = conf_dir.path().join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = {port}\naddress = 127.0.0.1\nuse chroot = no\npid file = {}/rsyncd.pid\n[backup]\n  path = {}\n  read only = no\n  uid = root\n  gid = root\n",
            conf_dir.path().display(),
            module_dir.path().display()
        ),
    )
    .unwrap();
    let mut daemon = std::process::Command::new("rsync")
        .args(["--daemon", "--no-detach", "--config"])
        .arg(&conf)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "rsync daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let src = tree_dir("rs-mod-src", 0);
    std::fs::create_dir(src.path().join("nested")).unwrap();
    std::fs::write(src.path().join("nested/n.txt"), b"to the module").unwrap();
    let task = c
        .call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "remotehost": "127.0.0.1", "remoteport": port,
                    "remotemodule": "backup", "direction": "PUSH"}]),
        )
        .await;
    assert_eq!(task["mode"], "MODULE", "the default mode");
    assert!(task["ssh_credentials"].is_null());
    let j = run_and_wait(&mut c, &task["id"]).await;
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(j["state"], "SUCCESS", "{j}");
    assert_eq!(std::fs::read(module_dir.path().join("nested/n.txt")).unwrap(), b"to the module");
    // A module that does not exist: rsync's own words, under its exit code's name.
    let bad = c
        .call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "remotehost": "127.0.0.1", "remoteport": port,
                    "remotemodule": "nosuch"}]),
        )
        .await;
    let j = run_and_wait(&mut c, &bad["id"]).await;
    assert_eq!(j["state"], "FAILED", "{j}");
    assert!(j["error"].as_str().unwrap().starts_with("rsync command returned"), "{j}");
}

/// An IPv6 remote (NAS-130641): the connection's host `::1`, the known_hosts
/// line `[::1]:port` and the operand `user@[::1]:path`.
#[tokio::test]
async fn an_ipv6_connection_backs_up_over_bracketed_addresses() {
    if skip() || !Path::new("/proc/net/if_inet6").exists() {
        return;
    }
    let mut s = setup().await;
    if std::net::TcpStream::connect(("::1", s.port)).is_err() {
        eprintln!("skipped: sshd does not listen on ::1 here");
        return;
    }
    let host_keys =
        s.c.call("keychaincredential.remote_ssh_host_key_scan", json!([{"host": "::1", "port": s.port}])).await;
    let conn =
        s.c.call(
            "keychaincredential.create",
            json!([{"name": "v6", "type": "SSH_CREDENTIALS", "attributes": {
                "host": "::1", "port": s.port, "username": s.remote.name, "private_key": s.kp["id"],
                "remote_host_key": host_keys}}]),
        )
        .await;
    let src = tree_dir("rs-v6", 0);
    std::fs::write(src.path().join("v6.txt"), b"over ::1").unwrap();
    let dst = tree_dir("rs-v6-dst", s.remote.uid());
    let task = s
        .c
        .call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": conn["id"], "remotepath": dst.path()}]),
        )
        .await;
    let j = run_and_wait(&mut s.c, &task["id"]).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    assert_eq!(std::fs::read(dst.path().join("v6.txt")).unwrap(), b"over ::1");
}

/// Without a connection (TrueNAS's original way): the task's account logs in
/// with its own key and its own known_hosts; the remote path is checked with
/// them on save.
#[tokio::test]
async fn without_a_connection_the_account_uses_its_own_key_and_known_hosts() {
    if skip() {
        return;
    }
    let mut s = setup().await;
    let local = OsUserGuard::new("khown");
    local.useradd("/bin/sh", None);
    let home = PathBuf::from(format!("/home/{}", local.name));
    let ssh_dir = home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(ssh_dir.join("id_ed25519"))
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = s.c.call("ssh.config", json!([])).await;
    let kh: String = cfg["host_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("[127.0.0.1]:{} {}\n", s.port, k["public_key"].as_str().unwrap()))
        .collect();
    std::fs::write(ssh_dir.join("known_hosts"), kh).unwrap();
    chown_tree(&ssh_dir, local.uid());
    // The remote account (same name as the task's user, as TrueNAS logs in) trusts that key.
    let pubkey = std::fs::read_to_string(ssh_dir.join("id_ed25519.pub")).unwrap();
    let remote_same = OsUserGuard { name: local.name.clone() };
    let me =
        s.c.call(
            "user.create",
            json!([{"username": local.name, "full_name": "", "password_disabled": true, "sshpubkey": pubkey.trim()}]),
        )
        .await;
    assert!(me["id"].is_i64());
    let src = tree_dir("rs-own-src", local.uid());
    std::fs::write(src.path().join("own.txt"), b"own key").unwrap();
    chown_tree(src.path(), local.uid());
    let dst = tree_dir("rs-own-dst", local.uid());
    let base =
        json!({"path": src.path(), "user": local.name, "mode": "SSH", "remotehost": "127.0.0.1", "remoteport": s.port});
    let mut bad = base.clone();
    bad["remotepath"] = json!(dst.path().join("missing"));
    let e = s.c.err("rsynctask.create", json!([bad])).await;
    assert_field(&e, "rsync_task_create.remotepath", "does not exist or is not a directory");
    let mut good = base.clone();
    good["remotepath"] = json!(dst.path());
    let task = s.c.call("rsynctask.create", json!([good])).await;
    assert!(task["ssh_credentials"].is_null());
    let j = run_and_wait(&mut s.c, &task["id"]).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    assert_eq!(std::fs::read(dst.path().join("own.txt")).unwrap(), b"own key");
    std::mem::forget(remote_same); // the same account as `local`, removed by its guard
}
