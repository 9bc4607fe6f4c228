//! Health, metrics and JSON logs (issue 13, part 3): `GET /healthz` with
//! real faults, `GET /metrics` behind an API key (and on the loopback
//! listener without one) read with a real Prometheus text parser, and the
//! JSON log format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_parse::{LineInfo, Scrape, Value as PromValue};
use serde_json::{json, Value};

use crate::sshd::{sshd_available, start_ssh, wait_job};
use crate::util::*;

fn opts(env: &[(&str, &str)]) -> DaemonOpts {
    DaemonOpts { env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() }
}

/// A parsed scrape: every line must be a comment, a HELP/TYPE line or a
/// sample the parser understands (the crate skips what it cannot read).
pub fn parse(text: &str) -> Scrape {
    for line in text.lines() {
        let ok = match LineInfo::parse(line) {
            LineInfo::Ignored => false,
            LineInfo::Sample { value, .. } => value.parse::<f64>().is_ok(),
            _ => true,
        };
        assert!(ok, "not a Prometheus text line: {line:?}\n{text}");
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
}

/// The value of the sample of `metric` carrying `labels` (a subset match), if any.
pub fn sample(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples.iter().find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))).map(|x| {
        match &x.value {
            PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
            PromValue::Histogram(b) => b.iter().map(|h| h.count).fold(0.0, f64::max),
            PromValue::Summary(_) => f64::NAN,
        }
    })
}

/// Every series (metric name and label set) of a scrape.
fn series(s: &Scrape) -> Vec<String> {
    let mut v: Vec<String> = s
        .samples
        .iter()
        .map(|x| {
            let mut l: Vec<_> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            l.sort();
            format!("{}{{{}}}", x.metric, l.join(","))
        })
        .collect();
    v.sort();
    v
}

async fn scrape(d: &Daemon, key: &str) -> Scrape {
    let auth = format!("Bearer {key}");
    let r = http(d, "GET", "/metrics", &[("Authorization", &auth)], None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/plain; version=0.0.4")), "{:?}", r.headers);
    parse(&r.text())
}

async fn api_key(c: &mut Client, name: &str) -> String {
    c.call("api_key.create", json!([{"name": name, "username": "admin"}])).await["key"].as_str().unwrap().to_string()
}

async fn healthz(d: &Daemon) -> (u16, Value) {
    let r = http(d, "GET", "/healthz", &[], None).await;
    (r.status, serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text())))
}

/// Poll `/healthz` until it answers `status` (results are reused for 1 s).
async fn healthz_until(d: &Daemon, status: u16, patience: Duration) -> Value {
    let deadline = Instant::now() + patience;
    loop {
        let (s, body) = healthz(d).await;
        if s == status {
            return body;
        }
        assert!(Instant::now() < deadline, "/healthz still answers {s} {body}, expected {status}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn healthz_is_ok_then_names_only_a_locked_database() {
    sqlite_only!("locks keyhaven.db with a SQLite transaction");
    let d = Daemon::start();
    let (status, body) = healthz(&d).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    // The fault: another process holds the database's write lock (as an
    // admin's `sqlite3 keyhaven.db` with an open transaction would).
    let db = rusqlite::Connection::open(d.dir.path().join("keyhaven.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let body = healthz_until(&d, 503, Duration::from_secs(30)).await;
    assert_eq!(body, json!({"status": "fail", "failed": ["database"]}), "only the check's name, nothing else");
    assert!(d.stderr().contains("health: the database check failed"), "the reason goes to the log");
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    assert_eq!(healthz_until(&d, 200, Duration::from_secs(30)).await, json!({"status": "ok"}));
}

#[tokio::test]
async fn healthz_reports_the_disk_below_its_threshold() {
    // More than any test machine has available: the threshold is the fault.
    let d = Daemon::start_in(
        Arc::new(TestDir::new("health-disk")),
        opts(&[("KEYHAVEN_HEALTH_DISK_MIN_FREE_MIB", "16777216")]),
    );
    let (status, body) = healthz(&d).await;
    assert_eq!((status, body), (503, json!({"status": "fail", "failed": ["disk"]})));
}

#[tokio::test]
async fn healthz_reports_sshd_once_it_died_and_cannot_be_restarted() {
    if !sshd_available() {
        eprintln!("skipped: needs root and /usr/sbin/sshd");
        return;
    }
    // sshd is run from a copy that the test removes: the supervisor's
    // restarts then fail for real until the copy is back.
    let bin_dir = TestDir::new("health-sshd-bin");
    std::fs::create_dir_all(bin_dir.path()).unwrap();
    let sshd = bin_dir.path().join("sshd");
    std::fs::copy("/usr/sbin/sshd", &sshd).unwrap();
    let d = Daemon::start_in(
        Arc::new(TestDir::new("health-sshd")),
        opts(&[("KEYHAVEN_SSHD_PATH", sshd.to_str().unwrap())]),
    );
    let mut c = d.admin().await;
    let key = api_key(&mut c, "prometheus").await;
    start_ssh(&mut c).await;
    assert_eq!(healthz(&d).await.0, 200);
    let before = scrape(&d, &key).await;
    assert_eq!(sample(&before, "keyhaven_sshd_up", &[]), Some(1.0));
    assert_eq!(sample(&before, "keyhaven_sshd_restarts_total", &[]), Some(0.0));
    for alg in ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"] {
        let at = sample(&before, "keyhaven_sshd_host_key_timestamp_seconds", &[("algorithm", alg)]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(at.is_some_and(|t| t > now - 600.0 && t <= now + 1.0), "{alg}: {at:?}");
    }

    let pid = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await["pids"][0]
        .as_u64()
        .unwrap() as u32;
    let away = bin_dir.path().join("sshd.away");
    std::fs::rename(&sshd, &away).unwrap();
    signal(pid, libc::SIGKILL);
    // Down for more than the 10 s grace: reported.
    let body = healthz_until(&d, 503, Duration::from_secs(40)).await;
    assert_eq!(body, json!({"status": "fail", "failed": ["sshd"]}));
    assert_eq!(sample(&scrape(&d, &key).await, "keyhaven_sshd_up", &[]), Some(0.0));
    // The admin is still served, and the service shows the crash.
    let s = c.call("service.query", json!([[["service", "=", "ssh"]], {"get": true}])).await;
    assert_eq!(s["state"], "CRASHED", "{s}");

    // Back: the supervisor's next restart succeeds and health recovers.
    std::fs::rename(&away, &sshd).unwrap();
    assert_eq!(healthz_until(&d, 200, Duration::from_secs(40)).await, json!({"status": "ok"}));
    let after = scrape(&d, &key).await;
    assert_eq!(sample(&after, "keyhaven_sshd_up", &[]), Some(1.0));
    assert_eq!(sample(&after, "keyhaven_sshd_restarts_total", &[]), Some(1.0));
}

#[tokio::test]
async fn metrics_need_an_api_key_count_logins_and_calls_and_bad_keys_lock_out() {
    let d = Daemon::start_in(Arc::new(TestDir::new("metrics")), opts(&[("KEYHAVEN_AUTH_ADDRESS_LOCKOUT_AFTER", "5")]));
    let mut a = d.admin().await;
    let key = api_key(&mut a, "prometheus").await;

    let r = http(&d, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(!r.text().contains("keyhaven_"), "nothing leaks: {}", r.text());
    for bad in ["Bearer 1-wrong", "Bearer nonsense", "Basic YWRtaW46eA==", "Bearer "] {
        let r = http(&d, "GET", "/metrics", &[("Authorization", bad)], None).await;
        assert_eq!(r.status, 401, "{bad}: {}", r.text());
    }

    let s0 = scrape(&d, &key).await;
    // The help text and types are there.
    assert!(s0.docs.contains_key("keyhaven_logins_total"), "{:?}", s0.docs.keys());
    let logins_ok =
        |s: &Scrape| sample(s, "keyhaven_logins_total", &[("mechanism", "PASSWORD_PLAIN"), ("result", "ok")]);
    let mes = |s: &Scrape| sample(s, "keyhaven_calls_total", &[("method", "auth.me"), ("outcome", "ok")]);
    assert_eq!(logins_ok(&s0), Some(1.0), "the admin's login");
    // Two of the four bad headers carried a key to check; the others were refused unread.
    assert_eq!(
        sample(&s0, "keyhaven_logins_total", &[("mechanism", "METRICS_API_KEY"), ("result", "failed")]),
        Some(2.0)
    );
    assert_eq!(mes(&s0), None);

    let mut c = d.client().await;
    c.login("admin", ADMIN_PASSWORD).await;
    c.call("auth.me", json!([])).await;
    let bad = c.raw("keychaincredential.create", json!([{"name": "", "type": "SSH_KEY_PAIR"}])).await;
    assert!(bad.get("error").is_some(), "{bad}");
    let s1 = scrape(&d, &key).await;
    assert_eq!(logins_ok(&s1), Some(2.0));
    assert_eq!(mes(&s1), Some(1.0));
    assert_eq!(
        sample(&s1, "keyhaven_calls_total", &[("method", "keychaincredential.create"), ("outcome", "invalid")]),
        Some(1.0)
    );
    assert!(
        sample(&s1, "keyhaven_logins_total", &[("mechanism", "METRICS_API_KEY"), ("result", "ok")]) >= Some(2.0),
        "scrapes log in too"
    );
    // A job's duration lands in its method's histogram.
    let job = a.call("service.control", json!(["STOP", "ssh"])).await;
    wait_job(&mut a, &job).await;
    let s2 = scrape(&d, &key).await;
    let count = sample(&s2, "keyhaven_job_duration_seconds_count", &[("method", "service.control")]);
    assert_eq!(count, Some(1.0), "{:?}", series(&s2));

    // Bad keys count towards the address lockout like any login: from
    // 127.0.0.2, after five failures even the right key is refused there…
    for i in 0..5 {
        let auth = format!("Bearer 1-guess{i}");
        let r = http_from(&d, Some("127.0.0.2"), "GET", "/metrics", &[("Authorization", &auth)], None).await;
        assert_eq!(r.status, 401);
    }
    let auth = format!("Bearer {key}");
    let r = http_from(&d, Some("127.0.0.2"), "GET", "/metrics", &[("Authorization", &auth)], None).await;
    assert_eq!(r.status, 401, "locked out: {}", r.text());
    // …while the admin's address is served.
    let s3 = scrape(&d, &key).await;
    assert!(
        sample(&s3, "keyhaven_logins_total", &[("mechanism", "METRICS_API_KEY"), ("result", "refused")]) >= Some(1.0)
    );
    assert_eq!(a.call("auth.me", json!([])).await["pw_name"], "admin");
}

/// The address of the metrics listener, from the daemon's log.
pub async fn metrics_addr(d: &Daemon) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.stderr();
        if let Some(rest) = log.split("without login on http://").nth(1) {
            return rest.split('/').next().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no metrics listener in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_loopback_listener_serves_metrics_without_login_and_only_metrics() {
    // The main listener serves TLS here: the certificate's dates are exported.
    let d = Daemon::start_in(
        Arc::new(TestDir::new("metrics-lo")),
        opts(&[("KEYHAVEN_METRICS_LISTEN", "127.0.0.1:0"), ("KEYHAVEN_TLS", "true")]),
    );
    assert!(d.url.starts_with("https://"), "{}", d.url);
    let addr = metrics_addr(&d).await;
    assert_ne!(addr, d.addr);
    let r = http_on(addr, None, "GET", "/metrics", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = parse(&r.text());
    assert_eq!(sample(&s, "keyhaven_sshd_up", &[]), Some(0.0));
    for other in ["/healthz", "/api/current", "/", "/_download/keychaincredential/1/private_key"] {
        assert_eq!(http_on(addr, None, "GET", other, &[], None).await.status, 404, "{other}");
    }
    let not_before = sample(&s, "keyhaven_tls_certificate_not_before_timestamp_seconds", &[]).unwrap();
    let not_after = sample(&s, "keyhaven_tls_certificate_not_after_timestamp_seconds", &[]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(not_before <= now && now < not_after, "{not_before} {now} {not_after}");
    // openssl agrees on the end: valid a minute before it, expired a minute after.
    let checkend = |secs: f64| {
        std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &format!("{}", secs as i64)])
            .arg("-in")
            .arg(d.dir.path().join("tls/cert.pem"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(checkend(not_after - now - 60.0) && !checkend(not_after - now + 60.0));

    // Anything but loopback is refused at start, with the setting named.
    for bad in ["0.0.0.0:0", "[::]:0"] {
        let e = Daemon::try_start_in(Arc::new(TestDir::new("metrics-bad")), opts(&[("KEYHAVEN_METRICS_LISTEN", bad)]))
            .err()
            .expect("refused");
        assert!(e.contains("metrics.listen") && e.contains("not a loopback address"), "{e}");
    }
}

#[tokio::test]
async fn rsync_tasks_last_success_survives_a_failed_run() {
    if !sshd_available() || !std::path::Path::new("/usr/bin/rsync").exists() {
        eprintln!("skipped: needs root, /usr/sbin/sshd and rsync");
        return;
    }
    let d = Daemon::start();
    let mut c = d.admin().await;
    let key = api_key(&mut c, "prometheus").await;
    let port = start_ssh(&mut c).await;
    let (remote, _kp, conn) = crate::sshd::account_and_connection(&mut c, port, "khmt", "/bin/sh", "metrics").await;
    let src = TestDir::new("metrics-src");
    std::fs::create_dir_all(src.path()).unwrap();
    std::fs::write(src.path().join("f.txt"), b"data\n").unwrap();
    let dst = TestDir::new("metrics-dst");
    std::fs::create_dir_all(dst.path()).unwrap();
    std::os::unix::fs::chown(dst.path(), Some(remote.uid()), None).unwrap();
    let task = c
        .call(
            "rsynctask.create",
            json!([{"path": src.path(), "user": "root", "mode": "SSH", "ssh_credentials": conn["id"],
                    "remotepath": dst.path()}]),
        )
        .await;
    let id = task["id"].to_string();
    let last = |s: &Scrape| sample(s, "keyhaven_rsync_task_last_success_timestamp_seconds", &[("task", &id)]);
    assert_eq!(last(&scrape(&d, &key).await), Some(0.0), "never succeeded");

    let job = c.call("rsynctask.run", json!([task["id"]])).await;
    let j = wait_job(&mut c, &job).await;
    assert_eq!(j["state"], "SUCCESS", "{j}");
    let finished = j["time_finished"]["$date"].as_f64().unwrap() / 1000.0;
    let at = last(&scrape(&d, &key).await).unwrap();
    assert!((at - finished).abs() < 1.0, "last success {at}, the run finished at {finished}");

    // A failed run replaces the task's last run, not its last success.
    std::fs::remove_dir_all(src.path()).unwrap();
    let job = c.call("rsynctask.run", json!([task["id"]])).await;
    assert_eq!(wait_job(&mut c, &job).await["state"], "FAILED");
    let s = scrape(&d, &key).await;
    assert_eq!(last(&s), Some(at));
    assert_eq!(
        sample(&s, "keyhaven_job_duration_seconds_count", &[("method", "rsynctask.run"), ("state", "FAILED")]),
        Some(1.0)
    );
    c.call("rsynctask.delete", json!([task["id"]])).await;
    assert_eq!(last(&scrape(&d, &key).await), None, "a deleted task's series is gone");
}

#[tokio::test]
async fn json_logs_are_json_lines_without_secrets() {
    let mut d = Daemon::start_in(Arc::new(TestDir::new("jsonlog")), opts(&[("KEYHAVEN_LOG_FORMAT", "json")]));
    let mut c = d.client().await;
    let wrong = "not-the-password-3141";
    let r =
        c.raw("auth.login_ex", json!([{"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": wrong}])).await;
    assert_eq!(r["result"]["response_type"], "AUTH_ERR", "{r}");
    let mut a = d.admin().await;
    let key = api_key(&mut a, "logged").await;
    let secret = key.split_once('-').unwrap().1.to_string();
    let bad_secret = "guessedSecret2718281828";
    let bad_key = format!("{}-{bad_secret}", key.split_once('-').unwrap().0);
    let auth = format!("Bearer {bad_key}");
    assert_eq!(http(&d, "GET", "/metrics", &[("Authorization", &auth)], None).await.status, 401);
    d.stop();
    let log = d.stderr();
    let mut messages = HashMap::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        let msg = v["fields"]["message"].as_str().unwrap_or_default().to_string();
        *messages.entry(msg).or_insert(0) += 1;
    }
    assert!(messages.keys().any(|m| m.starts_with("login failed")), "{messages:?}");
    assert!(messages.contains_key("shutting down"), "{messages:?}");
    for s in [ADMIN_PASSWORD, wrong, secret.as_str(), bad_secret] {
        assert!(!log.contains(s), "a secret is in the log");
    }
}

#[tokio::test]
async fn hostile_floods_of_anonymous_scrapes_health_checks_and_made_up_methods_add_no_series() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let key = api_key(&mut a, "prometheus").await;
    // One of each kind first, so that the series they may add exist.
    let mut anon = d.client().await;
    let _ = anon.raw("no.such_method", json!([])).await;
    let _ = http_from(&d, Some("127.0.0.3"), "GET", "/metrics", &[], None).await;
    let _ = http_from(&d, Some("127.0.0.3"), "GET", "/healthz", &[], None).await;
    a.call("auth.me", json!([])).await;
    let before = series(&scrape(&d, &key).await);

    let flood = async {
        let mut tasks = vec![];
        for w in 0..8u32 {
            let url = d.ws_url("/api/current");
            let addr = d.addr;
            let src = format!("127.0.0.{}", 10 + w);
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect_from(&url, addr, src.parse().unwrap()).await;
                for i in 0..250u32 {
                    let r = c.raw(&format!("x{w}.m{i}_{}", hex(&i.to_le_bytes())), json!([])).await;
                    assert!(r.get("error").is_some());
                }
            }));
        }
        for w in 0..4u32 {
            let addr = d.addr;
            let src = format!("127.0.0.{}", 30 + w);
            tasks.push(tokio::spawn(async move {
                for i in 0..100u32 {
                    let path = if i % 2 == 0 { "/metrics" } else { "/healthz" };
                    let r = http_on(addr, Some(&src), "GET", path, &[], None).await;
                    assert!(matches!(r.status, 200 | 401 | 503), "{path}: {}", r.status);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    let admin = async {
        // The admin keeps being served while the flood goes on.
        let mut served = 0;
        for _ in 0..20 {
            assert_eq!(a.call("auth.me", json!([])).await["pw_name"], "admin");
            served += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served
    };
    let ((), served) = tokio::join!(flood, admin);
    assert_eq!(served, 20);
    let after = scrape(&d, &key).await;
    let unknown = sample(&after, "keyhaven_calls_total", &[("method", "unknown"), ("outcome", "error")]);
    assert_eq!(unknown, Some(2001.0), "every made-up name counts under one label");
    assert_eq!(series(&after), before, "no new series");
    assert_eq!(healthz(&d).await.0, 200);
}
