//! PostgreSQL-only behaviour: migrating under the advisory lock, the master
//! key shared by every node, refusals that say what to do, and that the
//! database never holds a plaintext secret.

use serde_json::json;

use crate::rsync::RsyncRunRecord;

use super::*;

fn cluster(test: &str) -> Option<keyhaven_testpg::TestPg> {
    keyhaven_testpg::start_or_skip(test)
}

#[test]
fn nodes_starting_together_migrate_once_and_share_one_master_key() {
    let Some(pg) = cluster("nodes_starting_together_migrate_once_and_share_one_master_key") else { return };
    let url = pg.url("postgres");
    // The first node makes the key; the others hold copies of it.
    let first = tempfile::tempdir().unwrap();
    let (a, new) = PgStore::open(first.path(), &url).unwrap();
    assert!(new);
    assert_eq!(a.schema_version().unwrap(), latest_pg_schema());
    drop(a);
    pg.psql("postgres", "DROP SCHEMA public CASCADE; CREATE SCHEMA public;").unwrap();
    let key = std::fs::read(first.path().join(MASTER_KEY_FILE)).unwrap();
    let dirs: Vec<_> = (0..4)
        .map(|_| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(MASTER_KEY_FILE), &key).unwrap();
            d
        })
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs.iter().map(|d| s.spawn(|| PgStore::open(d.path(), &url))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut firsts = 0;
    let mut stores = Vec::new();
    for r in results {
        let (s, first) = r.unwrap();
        firsts += usize::from(first);
        stores.push(s);
    }
    assert_eq!(firsts, 1, "exactly one node found the database new");
    assert_eq!(
        pg.psql("postgres", "SELECT count(*) FROM keyhaven_schema_history").unwrap(),
        MIGRATIONS.len().to_string(),
        "each step applied once"
    );
    // A write on one node is read on another, secrets included.
    let id = stores[0].keychain_insert("k", "SSH_KEY_PAIR", &json!({}), Some("PRIVATE")).unwrap();
    assert_eq!(stores[3].keychain_private_key(id).unwrap().unwrap().as_str(), "PRIVATE");
    let tok = stores[1].token_insert("h", "admin", 60, true, None, &json!({})).unwrap();
    assert_eq!(stores[2].token_take("h").unwrap().unwrap().id, tok, "a token minted on one node works on another");
    assert!(stores[1].token_take("h").unwrap().is_none());
}

#[test]
fn a_node_with_another_or_no_master_key_refuses_to_start_saying_so() {
    let Some(pg) = cluster("a_node_with_another_or_no_master_key_refuses_to_start_saying_so") else { return };
    let url = pg.url("postgres");
    let a = tempfile::tempdir().unwrap();
    let (store, _) = PgStore::open(a.path(), &url).unwrap();
    store.setting_set("x", &json!(1)).unwrap();
    drop(store);
    let b = tempfile::tempdir().unwrap();
    let e = PgStore::open(b.path(), &url).unwrap_err();
    assert!(matches!(e, StoreError::PgMissingMasterKey { .. }), "{e}");
    assert!(e.to_string().contains("copy master.key"), "{e}");
    assert!(!b.path().join(MASTER_KEY_FILE).exists(), "no key invented for a database that has one");
    MasterKey::generate().create_file(&b.path().join(MASTER_KEY_FILE)).unwrap();
    let e = PgStore::open(b.path(), &url).unwrap_err();
    assert!(matches!(e, StoreError::PgWrongMasterKey { .. }), "{e}");
    assert!(e.to_string().contains("every node must hold the same master.key"), "{e}");
    // The right key still opens it.
    let (store, first) = PgStore::open(a.path(), &url).unwrap();
    assert!(!first);
    assert_eq!(store.setting_get("x").unwrap(), Some(json!(1)));
}

#[test]
fn a_newer_schema_is_refused_naming_the_version_needed() {
    let Some(pg) = cluster("a_newer_schema_is_refused_naming_the_version_needed") else { return };
    let url = pg.url("postgres");
    let d = tempfile::tempdir().unwrap();
    drop(PgStore::open(d.path(), &url).unwrap());
    pg.psql("postgres", "INSERT INTO keyhaven_schema_history VALUES (99, 1, '9.9.9', 0)").unwrap();
    let e = PgStore::open(d.path(), &url).unwrap_err().to_string();
    assert!(e.contains("schema version 99") && e.contains("keyhaven 9.9.9"), "{e}");
}

#[test]
fn postgres_never_holds_a_plaintext_secret() {
    let Some(pg) = cluster("postgres_never_holds_a_plaintext_secret") else { return };
    let d = tempfile::tempdir().unwrap();
    let (s, _) = PgStore::open(d.path(), &pg.url("postgres")).unwrap();
    let id = s.keychain_insert("k", "SSH_KEY_PAIR", &json!({}), Some("KEYSECRETMATERIAL")).unwrap();
    let uid = s.user_insert("alice", &json!({}), None).unwrap();
    s.user_set_twofactor_secret(uid, Some("TOTPSECRETSEED")).unwrap();
    s.host_key_insert("ssh-ed25519", "HOSTSECRETMATERIAL", "ssh-ed25519 AAAA").unwrap();
    // Everything the database holds, as text.
    let dump = pg
        .psql(
            "postgres",
            "SELECT encode(private_key, 'hex') FROM keychain UNION ALL SELECT encode(twofactor_secret, 'hex') FROM users
             UNION ALL SELECT encode(private_key, 'hex') FROM host_keys",
        )
        .unwrap();
    assert_eq!(dump.lines().count(), 3, "{dump}");
    for secret in ["KEYSECRETMATERIAL", "TOTPSECRETSEED", "HOSTSECRETMATERIAL"] {
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!dump.contains(&hex), "{secret} stored in plaintext");
    }
    // A ciphertext moved to another row does not open.
    let other = s.keychain_insert("k2", "SSH_KEY_PAIR", &json!({}), None).unwrap();
    pg.psql(
        "postgres",
        &format!(
            "UPDATE keychain SET private_key = (SELECT private_key FROM keychain WHERE id = {id}) WHERE id = {other}"
        ),
    )
    .unwrap();
    assert!(matches!(s.keychain_private_key(other), Err(StoreError::Decrypt { .. })));
}

#[test]
fn backups_point_to_pg_dump_and_unreachable_servers_are_named_without_the_password() {
    let Some(pg) = cluster("backups_point_to_pg_dump_and_unreachable_servers_are_named_without_the_password") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let (s, _) = PgStore::open(d.path(), &pg.url("postgres")).unwrap();
    let e = s.snapshot_db(&d.path().join("copy.db")).unwrap_err();
    assert!(matches!(e, StoreError::BackupOnPostgres { .. }) && e.to_string().contains("pg_dump"), "{e}");
    s.health_check(Duration::from_secs(5)).unwrap();
    // Work from inside another runtime's worker thread (as the server calls it).
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
    let s = std::sync::Arc::new(s);
    let s2 = s.clone();
    let n = rt.block_on(async move { tokio::spawn(async move { s2.users_list().map(|u| u.len()) }).await.unwrap() });
    assert_eq!(n.unwrap(), 0);
    drop(rt);

    let port = pg.port();
    drop(s);
    drop(pg);
    let url = format!("postgres://keyhaven:hunter2secret@127.0.0.1:{port}/keyhaven");
    let started = std::time::Instant::now();
    let e = PgStore::open(d.path(), &url).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::PgConnect { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}/keyhaven")) && msg.contains("check the database setting"), "{msg}");
    assert!(!msg.contains("hunter2secret"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let e = PgStore::open(d.path(), "mysql://root:hunter2secret@db/x").unwrap_err().to_string();
    assert!(e.contains("postgres://") && !e.contains("hunter2secret"), "{e}");
    let e = PgStore::open(d.path(), "postgres://u:hunter2secret@db/x?sslmode=verify-ca").unwrap_err().to_string();
    assert!(e.contains("verify-full") && !e.contains("hunter2secret"), "{e}");
    let e =
        PgStore::open(d.path(), "postgres://u:hunter2secret@db/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err()
            .to_string();
    assert!(e.contains("sslrootcert /nonexistent/ca.pem") && !e.contains("hunter2secret"), "{e}");
    let e = PgStore::open(d.path(), "postgres://u:hunter2secret@db/x?sslrootcert=/ca.pem").unwrap_err().to_string();
    assert!(e.contains("add sslmode=verify-full") && !e.contains("hunter2secret"), "{e}");
}

/// A CA and a server certificate for `names`, signed by it: (CA PEM, server
/// certificate PEM, server key PEM).
fn ca_and_server_cert(names: &[&str]) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "keyhaven test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Whether the store's connections are encrypted, as the server sees them.
fn uses_tls(s: &PgStore) -> bool {
    s.run(|pg| async move {
        let c = pg.client().await?;
        let row = c
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .map_err(|e| pg.err(e))?;
        Ok(row.get::<_, bool>(0))
    })
    .unwrap()
}

#[test]
fn tls_verify_full_checks_the_servers_certificate_and_name() {
    let (ca, cert, key) = ca_and_server_cert(&["127.0.0.1"]);
    let Some(pg) = keyhaven_testpg::start_tls_or_skip("pg::tests::tls_verify_full", &cert, &key) else { return };
    let d = tempfile::tempdir().unwrap();
    let ca_file = d.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let base = format!("postgres://postgres:pw-not-shown@127.0.0.1:{}/postgres", pg.port());

    // Verified against the given root: encrypted.
    let (s, _) =
        PgStore::open(d.path(), &format!("{base}?sslmode=verify-full&sslrootcert={}", ca_file.display())).unwrap();
    assert!(uses_tls(&s));
    s.setting_set("over-tls", &json!(1)).unwrap();
    assert_eq!(s.setting_get("over-tls").unwrap(), Some(json!(1)));
    drop(s);
    // `require` is verified the same way.
    let (s, _) = PgStore::open(d.path(), &format!("{base}?sslmode=require&sslrootcert={}", ca_file.display())).unwrap();
    assert!(uses_tls(&s));
    drop(s);
    // Without TLS asked for, nothing changes: plaintext, as before.
    let (s, _) = PgStore::open(d.path(), &base).unwrap();
    assert!(!uses_tls(&s));
    drop(s);

    // Another CA's root: refused, naming the server and the certificate problem.
    let (other_ca, _, _) = ca_and_server_cert(&["127.0.0.1"]);
    let other_file = d.path().join("other.pem");
    std::fs::write(&other_file, &other_ca).unwrap();
    let e = PgStore::open(d.path(), &format!("{base}?sslmode=verify-full&sslrootcert={}", other_file.display()))
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::PgConnect { .. }), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}/postgres", pg.port())) && msg.contains("certificate"), "{msg}");
    assert!(!msg.contains("pw-not-shown"), "{msg}");
    // The system's roots do not know the test CA either.
    let e = PgStore::open(d.path(), &format!("{base}?sslmode=verify-full")).unwrap_err().to_string();
    assert!(e.contains("certificate") || e.contains("root certificates"), "{e}");
}

#[test]
fn tls_verify_full_refuses_a_certificate_for_another_name() {
    let (ca, cert, key) = ca_and_server_cert(&["db.example"]);
    let Some(pg) = keyhaven_testpg::start_tls_or_skip("pg::tests::tls_another_name", &cert, &key) else { return };
    let d = tempfile::tempdir().unwrap();
    let ca_file = d.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca_file.display()
    );
    let e = PgStore::open(d.path(), &url).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::PgConnect { .. }) && msg.contains("certificate"), "{msg}");
}

fn node(id: &str) -> crate::cluster::NodeRecord {
    crate::cluster::NodeRecord {
        node_id: id.into(),
        hostname: "host".into(),
        version: "1".into(),
        address: format!("https://{id}:443"),
        started_at: 1.0,
    }
}

#[test]
fn one_node_leads_and_leadership_moves_when_its_session_ends() {
    let Some(pg) = cluster("one_node_leads_and_leadership_moves_when_its_session_ends") else { return };
    let url = pg.url("postgres");
    let da = tempfile::tempdir().unwrap();
    let (a, _) = PgStore::open(da.path(), &url).unwrap();
    let db = tempfile::tempdir().unwrap();
    std::fs::copy(da.path().join(MASTER_KEY_FILE), db.path().join(MASTER_KEY_FILE)).unwrap();
    let (b, _) = PgStore::open(db.path(), &url).unwrap();
    a.node_heartbeat(&node("a")).unwrap();
    b.node_heartbeat(&node("b")).unwrap();
    assert!(a.try_lead("a").unwrap());
    assert!(!b.try_lead("b").unwrap(), "two leaders at once");
    assert!(a.try_lead("a").unwrap(), "the holder keeps leading");
    let v = b.cluster_view().unwrap();
    assert_eq!(v.leader.as_deref(), Some("a"));
    assert_eq!(v.nodes.iter().map(|n| (n.node.node_id.as_str(), n.up)).collect::<Vec<_>>(), [("a", true), ("b", true)]);
    assert_eq!(v.nodes[1].node, node("b"));

    // The holder's session dies (as with kill -9 of its node): the lock is
    // free at once and the other node takes it on its next poll.
    let killed = pg
        .psql(
            "postgres",
            &format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND ((classid::bigint << 32) | objid::bigint) = {}",
                super::cluster::LEADER_LOCK
            ),
        )
        .unwrap();
    assert_eq!(killed, "1", "the holder's session");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.try_lead("b").unwrap() {
        assert!(std::time::Instant::now() < deadline, "b never took the lead");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!a.try_lead("a").unwrap_or(false), "a leads again while b holds the lock");
    assert_eq!(a.cluster_view().unwrap().leader.as_deref(), Some("b"));

    // A node silent for longer than the limit is down (database clock).
    pg.psql("postgres", "UPDATE cluster_nodes SET heartbeat_at = heartbeat_at - 11 WHERE node_id = 'a'").unwrap();
    let v = b.cluster_view().unwrap();
    assert_eq!(
        v.nodes.iter().map(|n| (n.node.node_id.as_str(), n.up)).collect::<Vec<_>>(),
        [("a", false), ("b", true)]
    );

    // Resigning hands the lead over without waiting for anything.
    b.resign();
    assert!(a.try_lead("a").unwrap());
    assert_eq!(b.cluster_view().unwrap().leader.as_deref(), Some("a"));
}

/// Wait (bounded) for the next batch of a feed.
fn next_changes(feed: &crate::ChangeFeed, rt: &tokio::runtime::Runtime) -> crate::Changes {
    rt.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), feed.next()).await })
        .expect("no notification within 10 s")
        .expect("the feed ended")
}

/// Two stores on one database, as two nodes.
fn two_nodes(pg: &keyhaven_testpg::TestPg) -> (PgStore, PgStore, tempfile::TempDir, tempfile::TempDir) {
    let url = pg.url("postgres");
    let da = tempfile::tempdir().unwrap();
    let (a, _) = PgStore::open(da.path(), &url).unwrap();
    let db = tempfile::tempdir().unwrap();
    std::fs::copy(da.path().join(MASTER_KEY_FILE), db.path().join(MASTER_KEY_FILE)).unwrap();
    let (b, _) = PgStore::open(db.path(), &url).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (a.listen_connects() == 0 || b.listen_connects() == 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(a.listen_connects() == 1 && b.listen_connects() == 1, "the listening connections did not connect");
    (a, b, da, db)
}

#[test]
fn a_write_on_one_node_is_announced_to_the_other_not_to_itself() {
    let Some(pg) = cluster("a_write_on_one_node_is_announced_to_the_other_not_to_itself") else { return };
    let (a, b, _da, _db) = two_nodes(&pg);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let feed_a = a.changes();
    let feed_b = b.changes();
    let generation = b.users_generation();

    let id = a.keychain_insert("k1", "SSH_KEY_PAIR", &json!({}), Some("PRIVATE")).unwrap();
    let got = next_changes(&feed_b, &rt);
    assert_eq!(got.keychain.iter().copied().collect::<Vec<_>>(), vec![id], "{got:?}");
    a.user_insert("alice", &json!({}), None).unwrap();
    a.setting_set("ssh", &json!({"tcpport": 22})).unwrap();
    a.host_key_insert("ssh-ed25519", "PRIVATE", "ssh-ed25519 AAAA").unwrap();
    let rec = a.api_key_insert("k", "alice", None, |id| format!("hash{id}")).unwrap();
    a.api_key_delete(rec.id).unwrap();
    let mut got = crate::Changes::default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(got.host_keys && got.api_keys && got.users.contains("alice") && got.settings.contains("ssh")) {
        assert!(std::time::Instant::now() < deadline, "not all changes arrived: {got:?}");
        got.merge(next_changes(&feed_b, &rt));
    }
    assert!(b.users_generation() > generation, "the accounts' generation did not move on the other node");
    // Deleting a user names it (its keys file is withdrawn by name).
    let alice = a.user_by_name("alice").unwrap().unwrap();
    a.user_delete(alice.id).unwrap();
    // The API key's deletion may still come in a batch of its own first.
    let mut got = next_changes(&feed_b, &rt);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !got.users.contains("alice") {
        assert!(std::time::Instant::now() < deadline, "the deletion did not arrive: {got:?}");
        got.merge(next_changes(&feed_b, &rt));
    }
    // Writes from a client that is no node (psql) reach every node.
    pg.psql("postgres", "UPDATE settings SET value = '{}' WHERE key = 'ssh'").unwrap();
    assert!(next_changes(&feed_b, &rt).settings.contains("ssh"));
    let from_psql = next_changes(&feed_a, &rt);
    assert!(from_psql.settings.contains("ssh") && from_psql.keychain.is_empty(), "{from_psql:?}");
    // A node's own writes were not announced to itself.
    assert!(feed_a.take().is_empty());

    // A reusable token removed on A (expired and pruned) is announced, and
    // moves B's accounts' generation (its sessions look at their token);
    // single-use tokens, taken by every login, are not announced.
    a.token_insert("single", "admin", 60, true, None, &json!({})).unwrap();
    a.token_take("single").unwrap().unwrap();
    // Notifications arrive in commit order: had the take been announced, it
    // would be in this batch (or an earlier one) with the setting.
    a.setting_set("ssh", &json!({"tcpport": 2222})).unwrap();
    let got = next_changes(&feed_b, &rt);
    assert!(!got.tokens && got.settings.contains("ssh"), "{got:?}");
    a.token_insert("old", "admin", -10, false, None, &json!({})).unwrap();
    let generation = b.users_generation();
    a.token_insert("new", "admin", 60, true, None, &json!({})).unwrap();
    let got = next_changes(&feed_b, &rt);
    assert_eq!(got, crate::Changes { tokens: true, ..Default::default() }, "{got:?}");
    assert!(b.users_generation() > generation, "the accounts' generation did not move on the other node");
}

#[test]
fn a_broken_listening_connection_reconnects_and_announces_everything() {
    let Some(pg) = cluster("a_broken_listening_connection_reconnects_and_announces_everything") else { return };
    let (a, b, _da, _db) = two_nodes(&pg);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let feed_b = b.changes();
    // Cut every listening connection (the pool's are not listening).
    pg.psql(
        "postgres",
        "SELECT pg_terminate_backend(l.pid) FROM pg_stat_activity l WHERE l.query LIKE 'LISTEN%' AND l.pid <> pg_backend_pid()",
    )
    .unwrap();
    let got = next_changes(&feed_b, &rt);
    assert!(got.everything, "{got:?}");
    assert!(b.listen_connects() >= 2);
    // And it listens again.
    let id = a.keychain_insert("after", "SSH_KEY_PAIR", &json!({}), None).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = next_changes(&feed_b, &rt);
        if got.keychain.contains(&id) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no notification after the reconnect");
    }
}

#[test]
fn failed_logins_are_counted_once_across_nodes_and_one_node_locks() {
    let Some(pg) = cluster("failed_logins_are_counted_once_across_nodes_and_one_node_locks") else { return };
    let (a, b, _da, _db) = two_nodes(&pg);
    let key = |k: &str| vec![(k.to_string(), Some(4u32))];
    for node in [&a, &b, &a] {
        let r = node.login_failures_add(&key("ua:admin\n10.0.0.9"), 900, 300).unwrap();
        assert!(!r[0].locked_now);
    }
    let r = b.login_failures_add(&key("ua:admin\n10.0.0.9"), 900, 300).unwrap();
    assert_eq!(r[0], crate::LoginFailure { failures: 4, locked_now: true });
    let rows = a.login_failures(&["ua:admin\n10.0.0.9".to_string(), "a:10.0.0.9".to_string()]).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].locked_until.is_some_and(|t| t > rows[0].last_at));
    // A success does not lift a lock; a key's window over starts afresh.
    a.login_failures_clear(&["ua:admin\n10.0.0.9".to_string()]).unwrap();
    assert_eq!(b.login_failures(&["ua:admin\n10.0.0.9".to_string()]).unwrap().len(), 1);
    b.login_failures_add(&[("u:admin".to_string(), None)], 900, 300).unwrap();
    pg.psql("postgres", "UPDATE login_failures SET last_at = last_at - 1000 WHERE key = 'u:admin'").unwrap();
    let r = a.login_failures_add(&[("u:admin".to_string(), None)], 900, 300).unwrap();
    assert_eq!(r[0], crate::LoginFailure { failures: 1, locked_now: false });
    a.login_failures_clear(&["u:admin".to_string()]).unwrap();
    assert!(b.login_failures(&["u:admin".to_string()]).unwrap().is_empty());
    // Concurrent failures from both nodes: none lost, one lock.
    let k = "a:10.9.9.9".to_string();
    let locks: usize = std::thread::scope(|s| {
        let hs: Vec<_> = [&a, &b]
            .into_iter()
            .map(|n| {
                let k = k.clone();
                s.spawn(move || {
                    (0..10)
                        .filter(|_| n.login_failures_add(&[(k.clone(), Some(20))], 900, 300).unwrap()[0].locked_now)
                        .count()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(locks, 1);
    assert_eq!(a.login_failures(&[k]).unwrap()[0].failures, 20);
    pg.psql("postgres", "UPDATE login_failures SET last_at = last_at - 1000, locked_until = NULL").unwrap();
    assert_eq!(a.login_failures_prune(900).unwrap(), 2);
}

fn job(id: i64, node: &str) -> crate::JobRecord {
    crate::JobRecord {
        id,
        node: node.into(),
        method: "rsynctask.run".into(),
        arguments: json!([1]),
        state: "RUNNING".into(),
        percent: 0.0,
        description: String::new(),
        result: serde_json::Value::Null,
        error: None,
        exc_info: None,
        started: 1.0,
        finished: None,
    }
}

#[test]
fn jobs_are_listed_on_every_node_with_ids_unique_across_nodes() {
    let Some(pg) = cluster("jobs_are_listed_on_every_node_with_ids_unique_across_nodes") else { return };
    let (a, b, _da, _db) = two_nodes(&pg);
    let (sa, sb) = (crate::SharedJobs { pg: &a }, crate::SharedJobs { pg: &b });
    // Ids drawn on both nodes at once never collide.
    let mut ids: Vec<i64> = std::thread::scope(|s| {
        let hs: Vec<_> = [&sa, &sb]
            .into_iter()
            .map(|j| s.spawn(move || (0..20).map(|_| j.next_id().unwrap()).collect::<Vec<_>>()))
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    let ja = job(sa.next_id().unwrap(), "na");
    sa.insert(&ja).unwrap();
    let jb = job(sb.next_id().unwrap(), "nb");
    sb.insert(&jb).unwrap();
    assert_eq!(sb.list().unwrap(), vec![ja.clone(), jb.clone()], "B lists A's job as A recorded it");
    let done = crate::JobRecord {
        state: "SUCCESS".into(),
        percent: 100.0,
        description: "done".into(),
        result: json!({"ok": true}),
        finished: Some(2.0),
        ..ja.clone()
    };
    sa.finish(&done).unwrap();
    assert_eq!(sb.list().unwrap()[0], done);
    // Interrupted work: a starting node fails its own jobs only; the leader
    // those of nodes without a fresh heartbeat (or without a row at all).
    let exc = json!({"type": "CallError", "errno": 14, "errname": "EFAULT"});
    let jb2 = job(sb.next_id().unwrap(), "nb");
    sb.insert(&jb2).unwrap();
    assert_eq!(sa.fail_interrupted("na", "stopped", &exc, 3.0).unwrap(), 0);
    assert_eq!(sb.fail_interrupted("nb", "stopped", &exc, 3.0).unwrap(), 2);
    let failed = &sa.list().unwrap()[1];
    assert_eq!((failed.state.as_str(), failed.error.as_deref()), ("FAILED", Some("stopped")));
    assert_eq!(failed.exc_info, Some(exc.clone()));
    a.node_heartbeat(&node("na")).unwrap();
    b.node_heartbeat(&node("nb")).unwrap();
    let (j1, j2, j3) =
        (job(sa.next_id().unwrap(), "na"), job(sb.next_id().unwrap(), "nb"), job(sa.next_id().unwrap(), "gone"));
    for j in [&j1, &j2, &j3] {
        sa.insert(j).unwrap();
    }
    assert_eq!(sa.fail_down_nodes("down", &exc, 4.0).unwrap(), 1, "only the node without a row is down");
    pg.psql("postgres", "UPDATE cluster_nodes SET heartbeat_at = heartbeat_at - 11 WHERE node_id = 'nb'").unwrap();
    assert_eq!(sa.fail_down_nodes("down", &exc, 4.0).unwrap(), 1);
    let states: Vec<_> = sb.list().unwrap().into_iter().rev().take(3).map(|j| (j.node, j.state)).collect();
    assert_eq!(
        states,
        [("gone".into(), "FAILED".into()), ("nb".into(), "FAILED".into()), ("na".into(), "RUNNING".into())]
    );
}

#[test]
fn one_run_of_a_task_at_a_time_across_nodes_and_down_nodes_runs_failed() {
    let Some(pg) = cluster("one_run_of_a_task_at_a_time_across_nodes_and_down_nodes_runs_failed") else { return };
    let (a, b, _da, _db) = two_nodes(&pg);
    let t = a.rsync_task_insert(&json!({}), true, None).unwrap();
    // Both nodes claim the task at once, many times: each time exactly one wins.
    for round in 0..10i64 {
        let got: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = [(&a, "na", 100 + 2 * round), (&b, "nb", 101 + 2 * round)]
                .into_iter()
                .map(|(n, id, job)| s.spawn(move || (id, job, n.rsync_run_claim(t, job, 1.0, id).unwrap())))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<_> = got.iter().filter(|g| g.2.is_none()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {got:?}");
        let (_, won_job, _) = winners[0];
        let loser = got.iter().find(|g| g.2.is_some()).unwrap();
        assert_eq!(loser.2, Some(*won_job), "the loser is told the running job");
        let r = b.rsync_run(t).unwrap().unwrap();
        assert_eq!((r.job_id, r.state.as_str()), (*won_job, "RUNNING"));
        // Another node's start leaves the run alone; its own end frees the task.
        let other = if winners[0].0 == "na" { &b } else { &a };
        let other_id = if winners[0].0 == "na" { "nb" } else { "na" };
        assert_eq!(other.rsync_runs_fail_interrupted(other_id, "stopped", 2.0).unwrap(), 0);
        let end = RsyncRunRecord {
            task_id: t,
            job_id: *won_job,
            state: "FAILED".into(),
            started: 1.0,
            finished: Some(2.0),
            error: Some("x".into()),
            log: String::new(),
        };
        assert!(a.rsync_run_finish(&end).unwrap());
    }
    // The leader fails the run of a node that is down, then the task is free.
    a.node_heartbeat(&node("na")).unwrap();
    b.node_heartbeat(&node("nb")).unwrap();
    assert_eq!(b.rsync_run_claim(t, 500, 1.0, "nb").unwrap(), None);
    assert_eq!(a.rsync_run_claim(t, 501, 1.0, "na").unwrap(), Some(500));
    assert_eq!(a.rsync_runs_fail_down_nodes("down", 3.0).unwrap(), 0, "nb is up");
    pg.psql("postgres", "UPDATE cluster_nodes SET heartbeat_at = heartbeat_at - 11 WHERE node_id = 'nb'").unwrap();
    assert_eq!(a.rsync_runs_fail_down_nodes("nb is down", 3.0).unwrap(), 1);
    let r = a.rsync_run(t).unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.error.as_deref()), ("FAILED", Some("nb is down")));
    assert_eq!(a.rsync_run_claim(t, 502, 4.0, "na").unwrap(), None);
    // Runs recorded before migration 0004 (no node) are failed by a starting node.
    pg.psql("postgres", "UPDATE rsync_runs SET node = NULL").unwrap();
    assert_eq!(b.rsync_runs_fail_interrupted("nb", "stopped", 5.0).unwrap(), 1);
}
