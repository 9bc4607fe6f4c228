//! Several `keyhaven serve` processes on one PostgreSQL database (issue 14
//! §2–3): membership and leadership (`keyhaven.cluster_status`, CLI), the
//! scheduler running a task once per cluster and moving to the survivor
//! after kill -9 of the leader, nodes starting together migrating once, a
//! node with another master key refused, and no acknowledged write lost when
//! a node is killed under concurrent writers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

/// A throwaway cluster with database `keyhaven`, and its URL.
fn database(test: &str) -> Option<(keyhaven_testpg::TestPg, String)> {
    let pg = keyhaven_testpg::start_or_skip(test)?;
    pg.create_database("keyhaven").unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/keyhaven", pg.port());
    Some((pg, url))
}

fn opts(url: &str) -> DaemonOpts {
    DaemonOpts { env: vec![("KEYHAVEN_DATABASE".into(), url.into())], ..Default::default() }
}

/// A data dir holding a copy of `from`'s master.key (what an admin does for a second node).
fn second_dir(tag: &str, from: &TestDir) -> Arc<TestDir> {
    let dir = Arc::new(TestDir::new(tag));
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let key = dir.path().join("master.key");
    std::fs::copy(from.path().join("master.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir
}

/// Two nodes on `url`: A first (it makes the master key), then B with a copy.
fn two_nodes(url: &str) -> (Daemon, Daemon) {
    let a = Daemon::start_in(Arc::new(TestDir::new("cl-a")), opts(url));
    let b = Daemon::start_in(second_dir("cl-b", &a.dir), opts(url));
    (a, b)
}

async fn status(d: &Daemon) -> Value {
    d.admin().await.call("keyhaven.cluster_status", json!([])).await
}

/// kill -9 of a node (and wait for it, so its PID is not left a zombie).
fn kill9(d: &mut Daemon) {
    let mut c = d.child.take().expect("the node runs");
    signal(c.id(), libc::SIGKILL);
    let _ = c.wait();
}

/// Poll `d`'s cluster_status until `ok` holds (at most `limit`).
async fn wait_status(d: &Daemon, what: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    let mut c = d.admin().await;
    loop {
        let st = c.call("keyhaven.cluster_status", json!([])).await;
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The scheduled runs of rsync task `task` node `d` has run, by minute (Unix
/// minutes). Every node lists every node's jobs; each names its node.
async fn scheduled_runs(d: &Daemon, task: &Value) -> Vec<i64> {
    let me = status(d).await["node_id"].clone();
    let jobs = d.admin().await.call("core.get_jobs", json!([[["method", "=", "rsynctask.run"]]])).await;
    jobs.as_array()
        .unwrap()
        .iter()
        .filter(|j| j["arguments"] == json!([task]) && j["node"] == me)
        .filter(|j| j["logs_excerpt"].as_str().is_some_and(|l| l.starts_with("Scheduled run")))
        .map(|j| j["time_started"]["$date"].as_i64().unwrap() / 60_000)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_runs_the_schedule_once_and_the_survivor_takes_over_after_kill_9() {
    let Some((_pg, url)) =
        database("cluster::one_leader_runs_the_schedule_once_and_the_survivor_takes_over_after_kill_9")
    else {
        return;
    };
    let (a, b) = two_nodes(&url);
    let ids = |st: &Value| -> Vec<String> {
        st["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
    };
    // Both nodes see both, up, and the same single leader.
    let sa = wait_status(&a, "A sees two nodes up and a leader", Duration::from_secs(10), |st| {
        st["nodes"].as_array().unwrap().len() == 2
            && st["nodes"].as_array().unwrap().iter().all(|n| n["up"] == true)
            && !st["leader"].is_null()
    })
    .await;
    let sb = status(&b).await;
    assert_eq!(sa["backend"], "postgresql", "{sa}");
    assert_ne!(sa["node_id"], sb["node_id"], "each data dir has its own node id");
    assert_eq!(sa["leader"], sb["leader"], "{sa}\n{sb}");
    let mut both = ids(&sa);
    both.sort();
    let mut expected = vec![sa["node_id"].as_str().unwrap().to_string(), sb["node_id"].as_str().unwrap().to_string()];
    expected.sort();
    assert_eq!(both, expected);
    let leaders: Vec<_> = sb["nodes"].as_array().unwrap().iter().filter(|n| n["leader"] == true).collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {sb}");
    assert_eq!(leaders[0]["id"], sb["leader"]);
    for n in sb["nodes"].as_array().unwrap() {
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(n["this_node"], n["id"] == sb["node_id"], "{n}");
        let url = if n["id"] == sa["node_id"] { &a.url } else { &b.url };
        assert_eq!(n["address"], url.as_str(), "{n}");
    }
    // The node id stays with the data dir.
    let id_file = std::fs::read_to_string(a.dir.path().join("node-id")).unwrap();
    assert_eq!(id_file.trim(), sa["node_id"].as_str().unwrap());
    // The CLI shows the same.
    let out =
        std::process::Command::new(bin()).args(["cluster", "status", "--data-dir"]).arg(b.dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("backend: postgresql"), "{text}");
    assert!(text.contains(&format!("leader: {}", sb["leader"].as_str().unwrap())), "{text}");
    for id in &expected {
        assert!(text.contains(id.as_str()), "{text}");
    }

    // A task due every minute (rsync to a closed port: each run fails at
    // once, but each run is a job of the node that ran it).
    let src = TestDir::new("cl-src");
    std::fs::create_dir_all(src.path()).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let every_minute = json!({"minute": "*", "hour": "*", "dom": "*", "month": "*", "dow": "*"});
    let task = b
        .admin()
        .await
        .call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "MODULE", "remotehost": "127.0.0.1",
                    "remoteport": closed, "remotemodule": "m", "schedule": every_minute}]),
        )
        .await["id"]
        .clone();
    let (mut leader, follower) = if sa["leader"] == sa["node_id"] { (a, b) } else { (b, a) };

    // Two minute boundaries pass: each minute is run once, by the leader.
    let deadline = Instant::now() + Duration::from_secs(150);
    let (on_leader, on_follower) = loop {
        let l = scheduled_runs(&leader, &task).await;
        let f = scheduled_runs(&follower, &task).await;
        if l.len() + f.len() >= 2 {
            // A run that starts at a boundary is seen by the next poll.
            tokio::time::sleep(Duration::from_secs(3)).await;
            break (scheduled_runs(&leader, &task).await, scheduled_runs(&follower, &task).await);
        }
        assert!(Instant::now() < deadline, "no two scheduled runs in 150 s: leader {l:?}, follower {f:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(on_follower.is_empty(), "the follower ran scheduled work: {on_follower:?}");
    let mut per_minute: BTreeMap<i64, usize> = BTreeMap::new();
    for m in &on_leader {
        *per_minute.entry(*m).or_default() += 1;
    }
    assert!(per_minute.values().all(|&n| n == 1), "a minute run twice: {per_minute:?}");

    // kill -9 of the leader: the follower takes over and runs the next minute.
    let leader_id = status(&leader).await["leader"].clone();
    let killed_at = Instant::now();
    kill9(&mut leader);
    let st =
        wait_status(&follower, "the survivor leads", Duration::from_secs(10), |st| st["leader"] == st["node_id"]).await;
    let failover = killed_at.elapsed();
    eprintln!("failover (kill -9 of the leader until the survivor leads): {failover:?}");
    assert_ne!(st["leader"], leader_id);
    let st = wait_status(&follower, "the killed node shown down", Duration::from_secs(20), |st| {
        st["nodes"].as_array().unwrap().iter().any(|n| n["id"] == leader_id && n["up"] == false)
    })
    .await;
    assert_eq!(st["nodes"].as_array().unwrap().iter().filter(|n| n["leader"] == true).count(), 1, "{st}");
    let deadline = Instant::now() + Duration::from_secs(75);
    loop {
        let runs = scheduled_runs(&follower, &task).await;
        if !runs.is_empty() {
            assert_eq!(runs.len(), 1, "{runs:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the survivor did not run the schedule within a minute");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_at_once_migrate_once_and_another_master_key_is_refused() {
    let Some((pg, url)) = database("cluster::nodes_started_at_once_migrate_once_and_another_master_key_is_refused")
    else {
        return;
    };
    // An admin prepared one master.key and copied it to both nodes.
    let mut key = [0u8; 32];
    getrandom(&mut key);
    let dirs: Vec<Arc<TestDir>> = (0..2)
        .map(|i| {
            let d = Arc::new(TestDir::new(&format!("cl-m{i}")));
            std::fs::create_dir_all(d.path()).unwrap();
            std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
            std::fs::write(d.path().join("master.key"), key).unwrap();
            std::fs::set_permissions(d.path().join("master.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            d
        })
        .collect();
    let nodes: Vec<Daemon> = std::thread::scope(|s| {
        let started: Vec<_> = dirs.iter().map(|d| s.spawn(|| Daemon::start_in(d.clone(), opts(&url)))).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps =
        pg.psql("keyhaven", "SELECT count(*) || ' ' || count(DISTINCT version) FROM keyhaven_schema_history").unwrap();
    let (n, distinct) = steps.split_once(' ').unwrap();
    assert_eq!(n, distinct, "a migration step recorded twice");
    let migrated = nodes.iter().filter(|d| d.stderr().contains("migrated the PostgreSQL database")).count();
    assert_eq!(migrated, 1, "exactly one node migrates");
    let st =
        wait_status(&nodes[1], "two nodes", Duration::from_secs(10), |st| st["nodes"].as_array().unwrap().len() == 2)
            .await;
    assert!(!st["leader"].is_null(), "{st}");

    // A third node with a master key of its own is refused, saying why.
    let other = Arc::new(TestDir::new("cl-wrong"));
    std::fs::create_dir_all(other.path()).unwrap();
    std::fs::set_permissions(other.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut wrong = [0u8; 32];
    getrandom(&mut wrong);
    std::fs::write(other.path().join("master.key"), wrong).unwrap();
    std::fs::set_permissions(other.path().join("master.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let e = Daemon::try_start_in(other, opts(&url)).err().expect("a node with another master key started");
    assert!(e.contains("does not match the PostgreSQL database"), "{e}");
    assert!(e.contains("copy it from a node that already uses this database"), "{e}");
    let rows = pg.psql("keyhaven", "SELECT count(*) FROM cluster_nodes").unwrap();
    assert_eq!(rows, "2", "the refused node did not join");
}

/// A call that reports a dead connection instead of panicking: `None` when
/// the node is gone before it answers.
async fn try_call(c: &mut Client, id: u64, method: &str, params: Value) -> Option<Value> {
    let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
    c.ws.send(Message::Text(req.into())).await.ok()?;
    loop {
        let m = c.recv_within(Duration::from_secs(30)).await?;
        if m.get("id") == Some(&json!(id)) {
            return Some(m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_under_concurrent_writers_loses_no_acknowledged_write() {
    let Some((_pg, url)) = database("cluster::kill_9_of_a_node_under_concurrent_writers_loses_no_acknowledged_write")
    else {
        return;
    };
    let (mut a, b) = two_nodes(&url);
    let kp = a.admin().await.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let private = kp["private_key"].as_str().unwrap().to_string();
    // Four writers, two on each node, each creating credentials until told
    // to stop; a write counts once its reply said it succeeded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = if w % 2 == 0 { a.admin().await } else { b.admin().await };
        let stop = stop.clone();
        let private = private.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed_after = None;
            for n in 0u64.. {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let name = format!("w{w}-{n}");
                let r = try_call(
                    &mut c,
                    n + 100,
                    "keychaincredential.create",
                    json!([{"name": name, "type": "SSH_KEY_PAIR", "attributes": {"private_key": private}}]),
                )
                .await;
                match r {
                    Some(r) if r.get("result").is_some() => acked.push(name),
                    // The node died under this call (or refused it while dying): this writer stops.
                    other => {
                        failed_after = Some((acked.len(), other));
                        break;
                    }
                }
            }
            (w, acked, failed_after)
        }));
    }
    // Let them write, then kill A in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kill9(&mut a);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut acked_all = Vec::new();
    for h in writers {
        let (w, acked, failed) = h.await.unwrap();
        if w % 2 == 1 {
            assert!(failed.is_none(), "writer {w} on B failed while A died: {failed:?}");
        }
        assert!(!acked.is_empty(), "writer {w} wrote nothing");
        acked_all.extend(acked);
    }
    eprintln!("{} acknowledged writes; B served for {:?} after the kill", acked_all.len(), killed_at.elapsed());

    // B still serves writes.
    let mut c = b.admin().await;
    let after = c
        .call(
            "keychaincredential.create",
            json!([{"name": "after-the-kill", "type": "SSH_KEY_PAIR", "attributes": {"private_key": private}}]),
        )
        .await;
    assert!(after["id"].as_i64().is_some());
    acked_all.push("after-the-kill".into());
    // Every acknowledged credential is in the database and its private key
    // decrypts: read by a node started now (each node caches the keychain it
    // has read; another node's writes reach a running node's cache through
    // change notification, tested apart).
    let c_node = Daemon::start_in(second_dir("cl-c", &b.dir), opts(&url));
    let rows = c_node.admin().await.call("keychaincredential.query", json!([[["type", "=", "SSH_KEY_PAIR"]]])).await;
    let found: BTreeMap<String, Value> =
        rows.as_array().unwrap().iter().map(|r| (r["name"].as_str().unwrap().to_string(), r.clone())).collect();
    for name in &acked_all {
        let r = found.get(name).unwrap_or_else(|| panic!("acknowledged write {name} lost"));
        assert_eq!(r["attributes"]["private_key"], private.as_str(), "{name} does not decrypt to its key");
    }
}

#[tokio::test]
async fn on_sqlite_the_node_is_alone_and_leads() {
    let d = Daemon::start();
    let st = status(&d).await;
    assert_eq!(st["backend"], "sqlite", "{st}");
    let id = st["node_id"].as_str().unwrap();
    assert_eq!(id.len(), 32, "{st}");
    assert_eq!(st["leader"], id);
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{st}");
    assert_eq!(nodes[0]["id"], id);
    assert_eq!(nodes[0]["up"], true);
    assert_eq!(nodes[0]["leader"], true);
    assert_eq!(nodes[0]["this_node"], true);
    assert_eq!(nodes[0]["address"], d.url.as_str());
    // The id is the data dir's: the same after a restart.
    let dir = d.dir.clone();
    drop(d);
    let d = Daemon::start_in(dir, DaemonOpts::default());
    assert_eq!(status(&d).await["node_id"], id);
    // The CLI prints the same.
    let out = std::process::Command::new(bin())
        .args(["cluster", "status", "--json", "--data-dir"])
        .arg(d.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["node_id"], id);
}

/// The last run of rsync task `task` as node `d` reports it (`job`).
async fn last_run(d: &Daemon, task: &Value) -> Value {
    d.admin().await.call("rsynctask.get_instance", json!([task])).await["job"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_rsync_runs_are_shared_one_run_at_a_time_and_a_dead_nodes_run_is_failed() {
    let Some((_pg, url)) =
        database("cluster::jobs_and_rsync_runs_are_shared_one_run_at_a_time_and_a_dead_nodes_run_is_failed")
    else {
        return;
    };
    let (a, b) = two_nodes(&url);
    wait_status(&a, "A sees two nodes up", Duration::from_secs(10), |st| {
        st["nodes"].as_array().unwrap().iter().filter(|n| n["up"] == true).count() == 2
    })
    .await;
    // rsync to a port that accepts and never answers: a run lasts until stopped.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let src = TestDir::new("cl-jobs-src");
    std::fs::create_dir_all(src.path()).unwrap();
    let mut ca = a.admin().await;
    let mut cb = b.admin().await;
    let task = |n: &str| {
        json!([{"path": src.path(), "user": "root", "mode": "MODULE", "remotehost": "127.0.0.1",
                "remoteport": port, "remotemodule": n, "enabled": false}])
    };
    let t1 = ca.call("rsynctask.create", task("one")).await["id"].clone();
    let t2 = ca.call("rsynctask.create", task("two")).await["id"].clone();

    // Both nodes asked to run task 1 at the same moment: one run.
    let (ra, rb) = tokio::join!(ca.raw("rsynctask.run", json!([t1])), cb.raw("rsynctask.run", json!([t1])));
    let (won, lost, winner_is_a) = match (ra.get("error"), rb.get("error")) {
        (None, Some(e)) => (ra["result"].clone(), e.clone(), true),
        (Some(e), None) => (rb["result"].clone(), e.clone(), false),
        _ => panic!("not exactly one run started: {ra}\n{rb}"),
    };
    let lost = lost.to_string();
    assert!(lost.contains("EBUSY") && lost.contains(&format!("already running (job {won})")), "{lost}");
    let (mut w, mut o) = if winner_is_a { (a, b) } else { (b, a) };
    let (w_id, o_id) = (status(&w).await["node_id"].clone(), status(&o).await["node_id"].clone());
    // A run of task 2 on the other node: its job id is another one.
    let other_job = o.admin().await.call("rsynctask.run", json!([t2])).await;
    assert_ne!(other_job, won, "job ids are unique across nodes");
    // Each node lists both jobs, each with the node that runs it.
    for d in [&w, &o] {
        let jobs = d.admin().await.call("core.get_jobs", json!([[["method", "=", "rsynctask.run"]]])).await;
        let jobs = jobs.as_array().unwrap();
        let ids: Vec<_> = jobs.iter().map(|j| j["id"].clone()).collect();
        assert_eq!(ids, [won.clone(), other_job.clone()], "{jobs:?}");
        assert_eq!((jobs[0]["node"].clone(), jobs[0]["state"].clone()), (w_id.clone(), json!("RUNNING")));
        assert_eq!((jobs[1]["node"].clone(), jobs[1]["arguments"].clone()), (o_id.clone(), json!([t2])));
        let one = d.admin().await.call("core.get_jobs", json!([[["id", "=", won]], {"get": true}])).await;
        assert_eq!(one["arguments"], json!([t1]));
    }
    assert_eq!(last_run(&o, &t1).await["state"], "RUNNING");

    // The other node restarts: its own run of task 2 is over, the live
    // node's run of task 1 goes on.
    o.stop();
    let mut o = Daemon::start_in(o.dir.clone(), opts(&url));
    let run1 = last_run(&o, &t1).await;
    assert_eq!((run1["id"].clone(), run1["state"].clone()), (won.clone(), json!("RUNNING")), "{run1}");
    assert_eq!(last_run(&o, &t2).await["state"], "FAILED");
    let busy = o.admin().await.err("rsynctask.run", json!([t1])).await.to_string();
    assert!(busy.contains("EBUSY"), "{busy}");

    // kill -9 of the node running task 1: once it is down the leader (the
    // survivor) records the run and its job FAILED, and the task runs again.
    kill9(&mut w);
    let deadline = Instant::now() + Duration::from_secs(40);
    let failed = loop {
        let r = last_run(&o, &t1).await;
        if r["state"] == "FAILED" {
            break r;
        }
        assert!(Instant::now() < deadline, "the dead node's run is not failed after 40 s: {r}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(failed["error"].as_str().unwrap().contains("stopped answering"), "{failed}");
    let job = o.admin().await.call("core.get_jobs", json!([[["id", "=", won]], {"get": true}])).await;
    assert_eq!((job["state"].clone(), job["node"].clone()), (json!("FAILED"), w_id.clone()), "{job}");
    let again = o.admin().await.call("rsynctask.run", json!([t1])).await;
    assert_ne!(again, won);
    assert_eq!(last_run(&o, &t1).await["state"], "RUNNING");
    drop(silent);
    o.stop();
}
