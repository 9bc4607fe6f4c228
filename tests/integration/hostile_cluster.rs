//! The `hostile` group on the cluster paths (issue 14): two real `keyhaven
//! serve` processes on one throwaway PostgreSQL (keyhaven-testpg), attacked
//! where several nodes meet. A flood of writes on node A must not starve an
//! admin on node B, and B's view must converge to A's once it ends; a
//! listening connection of B that stalls without breaking (half-open: a
//! proxy of the test's own stops forwarding) must be noticed and replaced,
//! so a change made through A still reaches B.
//!
//! Figures are printed for BENCHMARKS.md; the bounds asserted are liveness
//! bounds with a wide margin, not speed goals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster_sync::start_pair;
use crate::util::*;

/// The most an admin call on B may take while A is flooded: it must be
/// served, not fast (speed is the benchmarks' business).
const SERVED_WITHIN: Duration = Duration::from_secs(5);

/// One call with a deadline: its result, or the reason it was not served.
async fn served(c: &mut Client, method: &str, params: Value) -> Result<(Value, Duration), String> {
    let t = Instant::now();
    match tokio::time::timeout(SERVED_WITHIN, c.raw(method, params)).await {
        Ok(r) => match r.get("error") {
            None => Ok((r["result"].clone(), t.elapsed())),
            Some(e) => Err(format!("{method} failed: {e}")),
        },
        Err(_) => Err(format!("{method} was not answered within {} s", SERVED_WITHIN.as_secs())),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Keychain entries by id, as a node answers them (order-independent).
async fn keychain(c: &mut Client) -> Value {
    c.call("keychaincredential.query", json!([[], {"order_by": ["id"]}])).await
}

/// Four connections on A create, rename and delete credentials as fast as
/// they are answered for 8 s (each 10th kept); meanwhile an admin on B keeps
/// calling `core.ping` and `keychaincredential.query`, and every call is
/// answered within [`SERVED_WITHIN`]. Afterwards B's keychain equals A's
/// within a bounded wait (the 30 s reconcile included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_notify_flood_on_one_node_starves_no_admin_on_the_other_and_converges() {
    let Some(p) = start_pair("hostile_cluster::notify_flood", &[]) else { return };
    let mut a = p.a.admin().await;
    let mut b = p.b.admin().await;
    // B's cache is built before the flood: it must follow, not load at the end.
    assert_eq!(keychain(&mut b).await, json!([]));
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let private = kp["private_key"].as_str().unwrap().to_string();

    const WRITERS: usize = 4;
    const FLOOD: Duration = Duration::from_secs(8);
    let writes = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + FLOOD;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (url, writes, private) = (p.a.ws_url("/api/current"), writes.clone(), private.clone());
        writers.push(tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            c.login("admin", ADMIN_PASSWORD).await;
            let mut i = 0u64;
            while Instant::now() < stop_at {
                let name = format!("flood-{w}-{i}");
                let attrs = json!({"private_key": private});
                let made = c
                    .call(
                        "keychaincredential.create",
                        json!([{"name": name, "type": "SSH_KEY_PAIR", "attributes": attrs}]),
                    )
                    .await;
                c.call("keychaincredential.update", json!([made["id"], {"name": format!("{name}-renamed")}])).await;
                let mut n = 2;
                if !i.is_multiple_of(10) {
                    c.call("keychaincredential.delete", json!([made["id"]])).await;
                    n += 1;
                }
                writes.fetch_add(n, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    // The admin on B, for as long as the flood lasts.
    let mut pings = Vec::new();
    let mut queries = Vec::new();
    while Instant::now() < stop_at {
        let (_, t) = served(&mut b, "core.ping", json!([])).await.unwrap_or_else(|e| panic!("B during the flood: {e}"));
        pings.push(t);
        let (_, t) = served(&mut b, "keychaincredential.query", json!([[], {"order_by": ["id"]}]))
            .await
            .unwrap_or_else(|e| panic!("B during the flood: {e}"));
        queries.push(t);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in writers {
        w.await.expect("a writer on A failed");
    }
    let flood_secs = FLOOD.as_secs_f64();
    let total = writes.load(Ordering::Relaxed);

    // Convergence: B answers exactly what A answers.
    let on_a = keychain(&mut a).await;
    let ended = Instant::now();
    let mut on_b = Value::Null;
    let mut converged = None;
    while ended.elapsed() < Duration::from_secs(60) {
        on_b = keychain(&mut b).await;
        if on_b == on_a {
            converged = Some(ended.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kept = on_a.as_array().unwrap().len();
    let converged = converged.unwrap_or_else(|| {
        panic!(
            "B did not converge to A within 60 s: A has {kept} credentials, B {}",
            on_b.as_array().map_or(0, Vec::len)
        )
    });
    assert!(kept > 0, "the flood kept no credential: nothing was compared");

    pings.sort();
    queries.sort();
    eprintln!(
        "notify flood: {total} writes on A in {flood_secs:.0} s from {WRITERS} connections ({:.0}/s), {kept} kept; \
         B during the flood: core.ping p50 {} ms max {} ms ({} calls), keychaincredential.query p50 {} ms max {} ms \
         ({} calls); B equal to A {} ms after the flood",
        total as f64 / flood_secs,
        percentile(&pings, 0.5).as_millis(),
        percentile(&pings, 1.0).as_millis(),
        pings.len(),
        percentile(&queries, 0.5).as_millis(),
        percentile(&queries, 1.0).as_millis(),
        queries.len(),
        converged.as_millis(),
    );
    // One more change after the flood still arrives by notification.
    a.call("keychaincredential.update", json!([on_a[0]["id"], {"name": "after-the-flood"}])).await;
    let after = Instant::now();
    loop {
        if keychain(&mut b).await[0]["name"] == "after-the-flood" {
            break;
        }
        assert!(after.elapsed() < Duration::from_secs(10), "a change after the flood did not reach B");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------ the proxy

/// A TCP proxy of the test's own between a node and PostgreSQL. Any of its
/// connections can be stalled: nothing more is forwarded either way and
/// both sockets stay open — to each end, a half-open connection (the
/// network died, the peers did not).
struct Proxy {
    port: u16,
    conns: Arc<Mutex<Vec<Link>>>,
    accept: tokio::task::AbortHandle,
}

struct Link {
    /// The proxy's own port towards PostgreSQL (`client_port` in pg_stat_activity).
    upstream_port: u16,
    stalled: Arc<AtomicBool>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Link>>> = Arc::default();
        let accept = {
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((down, _)) = listener.accept().await {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else { continue };
                    let upstream_port = up.local_addr().unwrap().port();
                    let stalled = Arc::new(AtomicBool::new(false));
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let t1 = tokio::spawn(pump(dr, uw, stalled.clone()));
                    let t2 = tokio::spawn(pump(ur, dw, stalled.clone()));
                    conns.lock().unwrap().push(Link {
                        upstream_port,
                        stalled,
                        tasks: [t1.abort_handle(), t2.abort_handle()],
                    });
                }
            })
            .abort_handle()
        };
        Proxy { port, conns, accept }
    }

    /// Stall the connection whose upstream side uses `port`; whether there is one.
    fn stall(&self, port: u16) -> bool {
        let conns = self.conns.lock().unwrap();
        let found = conns.iter().find(|l| l.upstream_port == port);
        found.map(|l| l.stalled.store(true, Ordering::SeqCst)).is_some()
    }

    fn upstream_ports(&self) -> Vec<u16> {
        self.conns.lock().unwrap().iter().map(|l| l.upstream_port).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for l in self.conns.lock().unwrap().iter() {
            for t in &l.tasks {
                t.abort();
            }
        }
    }
}

/// Forward `from` to `to` until either closes; once stalled, what is read is
/// dropped and nothing more is read (the socket stays open).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, stalled: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The `client_port`s of the listening connections (`keyhaven-listen`) on
/// the database `keyhaven`.
fn listening_ports(pg: &keyhaven_testpg::TestPg) -> Vec<u16> {
    let out = pg
        .psql(
            "keyhaven",
            "SELECT client_port FROM pg_stat_activity WHERE application_name = 'keyhaven-listen' AND datname = 'keyhaven'",
        )
        .unwrap();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// B's listening connection, seen by PostgreSQL through the proxy (waits for it).
async fn listener_of_b(pg: &keyhaven_testpg::TestPg, proxy: &Proxy, other_than: Option<u16>) -> Option<u16> {
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        let ours = proxy.upstream_ports();
        let found = tokio::task::block_in_place(|| listening_ports(pg))
            .into_iter()
            .find(|p| ours.contains(p) && Some(*p) != other_than);
        if found.is_some() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Wait until B's keychain has an entry named `name`; how long it took.
async fn reaches_b(b: &mut Client, name: &str, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < within {
        let found = b.call("keychaincredential.query", json!([[["name", "=", name]]])).await;
        if found.as_array().is_some_and(|a| !a.is_empty()) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// B reaches PostgreSQL through the proxy. Its listening connection is
/// stalled (half-open: no FIN, no RST, nothing forwarded): B notices it by
/// the listener's ping, connects a new one, reloads everything, and a
/// credential created through A while B was deaf is on B well before the
/// 30 s reconcile would have brought it. Then the new listening backend is
/// killed with pg_terminate_backend (the broken-connection case): B
/// reconnects at once. Times printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_a_stalled_listening_connection_is_replaced_and_changes_still_arrive() {
    let Some(pg) = keyhaven_testpg::start_or_skip("hostile_cluster::stalled_listener") else { return };
    pg.create_database("keyhaven").unwrap();
    let proxy = Proxy::start(pg.port()).await;
    let direct = format!("postgres://postgres@127.0.0.1:{}/keyhaven", pg.port());
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/keyhaven", proxy.port);
    let opts = |url: &str| DaemonOpts { env: vec![("KEYHAVEN_DATABASE".into(), url.into())], ..Default::default() };
    let da = Arc::new(TestDir::new("hc-a"));
    let node_a = tokio::task::block_in_place(|| Daemon::start_in(da.clone(), opts(&direct)));
    let db = Arc::new(TestDir::new("hc-b"));
    std::fs::create_dir_all(db.path()).unwrap();
    std::fs::set_permissions(db.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    std::fs::copy(da.path().join("master.key"), db.path().join("master.key")).unwrap();
    let node_b = tokio::task::block_in_place(|| Daemon::start_in(db, opts(&via_proxy)));
    let mut a = node_a.admin().await;
    let mut b = node_b.admin().await;
    assert_eq!(keychain(&mut b).await, json!([]));

    // The path works before anything is done to it.
    let kp = a.call("keychaincredential.generate_ssh_key_pair", json!([])).await;
    let create =
        |name: &str| json!([{"name": name, "type": "SSH_KEY_PAIR", "attributes": {"private_key": kp["private_key"]}}]);
    a.call("keychaincredential.create", create("before")).await;
    let t = reaches_b(&mut b, "before", Duration::from_secs(10)).await;
    let t = t.expect("a credential created through A did not reach B before any stall");
    eprintln!("stalled listener: propagation A → B before the stall {} ms", t.as_millis());

    // Stall B's listening connection.
    let stalled = listener_of_b(&pg, &proxy, None).await.expect("B's listening connection never showed up");
    assert!(proxy.stall(stalled));
    let stalled_at = Instant::now();
    a.call("keychaincredential.create", create("while-stalled")).await;
    // The listener is replaced: a new listening backend through the proxy.
    let replaced = listener_of_b(&pg, &proxy, Some(stalled)).await;
    let replaced = replaced.expect("B never replaced its stalled listening connection");
    let replaced_after = stalled_at.elapsed();
    let arrived = reaches_b(&mut b, "while-stalled", Duration::from_secs(60)).await;
    arrived.expect("a credential created through A while B's listener stalled never reached B");
    let arrived_after = stalled_at.elapsed();
    eprintln!(
        "stalled listener: B's listening connection replaced {} ms after the stall; the credential created through A \
         meanwhile served by B {} ms after the stall",
        replaced_after.as_millis(),
        arrived_after.as_millis()
    );
    // The replacement, not the 30 s reconcile, brought it: B says why it reconnected.
    assert!(
        node_b.stderr().contains("no answer to a ping"),
        "B's log does not say the stalled connection was noticed:\n{}",
        node_b.stderr()
    );
    // Changes flow on the new connection.
    a.call("keychaincredential.create", create("after-the-stall")).await;
    let t = reaches_b(&mut b, "after-the-stall", Duration::from_secs(10)).await;
    let t = t.expect("a credential created through A after the stall did not reach B");
    eprintln!("stalled listener: propagation A → B on the new connection {} ms", t.as_millis());

    // A broken connection (the backend killed): B reconnects and reloads.
    let killed = tokio::task::block_in_place(|| {
        pg.psql(
            "keyhaven",
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'keyhaven-listen' AND client_port = {replaced}"
            ),
        )
    })
    .unwrap();
    assert_eq!(killed, "t", "B's listening backend was not found to terminate");
    let killed_at = Instant::now();
    a.call("keychaincredential.create", create("after-the-kill")).await;
    let back = listener_of_b(&pg, &proxy, Some(replaced)).await;
    back.expect("B did not reconnect after its listening backend was terminated");
    let reconnected = killed_at.elapsed();
    let t = reaches_b(&mut b, "after-the-kill", Duration::from_secs(60)).await;
    t.expect("a credential created through A while B's listener was down never reached B");
    eprintln!(
        "stalled listener: after pg_terminate_backend B listened again after {} ms, the credential created \
         meanwhile served by B after {} ms",
        reconnected.as_millis(),
        killed_at.elapsed().as_millis()
    );
    drop((node_a, node_b));
    drop(proxy);
    drop(pg);
}
