//! `store migrate` both ways on a throwaway PostgreSQL cluster: every table,
//! ids and counters, secrets, and the refusals that change nothing.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::audit::AuditEntry;
use crate::records::ConnectionTestRecord;
use crate::rsync::RsyncRunRecord;
use crate::Store;

fn quiet() -> Progress {
    Box::new(|_, _| {})
}

/// A store with a row in every table, a deleted row at the end of the
/// keychain (its counter is past the highest id), and secrets in each
/// sealed column.
fn fill(s: &Store) {
    let alice = s.user_insert("alice", &json!({"full_name": "Alice Ä"}), Some("$argon2id$h")).unwrap();
    s.user_set_twofactor_secret(alice, Some("JBSWY3DPEHPK3PXP")).unwrap();
    assert!(s.user_totp_consume(alice, 1234).unwrap());
    s.user_insert("bob", &json!({}), None).unwrap();
    s.api_key_insert("k1", "alice", Some(2_000_000_000), |id| format!("hash-of-{id}")).unwrap();
    s.token_insert("tok-hash", "alice", 600, true, Some("127.0.0.1"), &json!({"a": 1})).unwrap();
    let pair = s
        .keychain_insert("pair", "SSH_KEY_PAIR", &json!({"public_key": "ssh-ed25519 AAA"}), Some("-----PRIVATE-----"))
        .unwrap();
    let conn = s.keychain_insert("conn", "SSH_CREDENTIALS", &json!({"private_key": pair}), None).unwrap();
    let gone = s.keychain_insert("gone", "SSH_KEY_PAIR", &json!({}), Some("x")).unwrap();
    s.keychain_delete_many(&[gone]).unwrap();
    s.connection_test_record(&ConnectionTestRecord {
        connection_id: conn,
        ok: true,
        stage: "done".into(),
        error: None,
        latency_ms: 12,
        tested_at: 1_700_000_000,
    })
    .unwrap();
    s.setting_set("ssh", &json!({"tcpport": 22})).unwrap();
    s.setting_set("Zeta", &json!("z")).unwrap();
    s.host_key_insert("ssh-ed25519", "-----HOST PRIVATE-----", "ssh-ed25519 BBB").unwrap();
    let task = s.rsync_task_insert(&json!({"path": "/mnt/a"}), true, Some(conn)).unwrap();
    let run = RsyncRunRecord {
        task_id: task,
        job_id: 9,
        state: "SUCCESS".into(),
        started: 1.5,
        finished: Some(2.25),
        error: None,
        log: "ok".into(),
    };
    s.rsync_run_record(&run).unwrap();
    for i in 0..5 {
        let e = AuditEntry {
            username: (i % 2 == 0).then(|| "alice".to_string()),
            address: Some("10.0.0.1".into()),
            service: "MIDDLEWARE".into(),
            method: Some("auth.login_ex".into()),
            event: "AUTHENTICATION".into(),
            target: None,
            success: i != 3,
            error: None,
        };
        s.audit_insert_at(1_000.0 + f64::from(i) * 0.125, &e).unwrap();
    }
}

/// Everything a store answers, secrets included, as comparable text.
fn dump(s: &Store) -> String {
    let mut out = String::new();
    for u in s.users_list().unwrap() {
        let seed = s.user_twofactor_secret(u.id).unwrap().map(|z| z.to_string());
        out += &format!("user {} {} {} {:?} {seed:?}\n", u.id, u.username, u.data, u.password_hash);
    }
    for k in s.api_keys_list().unwrap() {
        out += &format!("api_key {k:?}\n");
    }
    for k in s.keychain_list().unwrap() {
        let private = s.keychain_private_key(k.id).unwrap().map(|z| z.to_string());
        out += &format!("keychain {} {} {} {} {private:?}\n", k.id, k.name, k.kind, k.attributes);
    }
    out += &format!("tests {:?}\n", s.connection_tests().unwrap());
    out += &format!("settings {:?} {:?}\n", s.setting_get("ssh").unwrap(), s.setting_get("Zeta").unwrap());
    for h in s.host_keys_list().unwrap() {
        out += &format!(
            "host_key {} {} {:?}\n",
            h.algorithm,
            h.public_key,
            s.host_key_private(&h.algorithm).unwrap().map(|z| z.to_string())
        );
    }
    out += &format!("tasks {:?}\nruns {:?}\n", s.rsync_tasks().unwrap(), s.rsync_runs().unwrap());
    out += &format!("last {:?}\n", s.rsync_last_successes().unwrap());
    for a in s.audit_list().unwrap() {
        out += &format!("audit {} {} {:?}\n", a.id, a.ts, a.entry);
    }
    out
}

fn count(report: &MigrateReport, table: &str) -> u64 {
    report.tables.iter().find(|(t, _)| *t == table).map(|(_, n)| *n).unwrap()
}

fn pg_rows(pg: &keyhaven_testpg::TestPg, db: &str, table: &str) -> String {
    pg.psql(db, &format!("SELECT count(*) FROM {table}")).unwrap()
}

#[test]
fn sqlite_to_postgres_and_back_keeps_every_row_id_counter_and_secret() {
    let Some(pg) = keyhaven_testpg::start_or_skip("migrate::sqlite_to_postgres_and_back") else { return };
    pg.create_database("dest").unwrap();
    let src = tempfile::tempdir().unwrap();
    let want = {
        let (s, _) = Store::open(src.path()).unwrap();
        fill(&s);
        dump(&s)
    };
    // The source stays open (a running daemon) while it is copied.
    let (live, _) = Store::open(src.path()).unwrap();

    let r = sqlite_to_postgres(src.path(), &pg.url("dest"), quiet()).unwrap();
    assert_eq!((count(&r, "users"), count(&r, "keychain"), count(&r, "audit")), (2, 2, 5));
    assert_eq!((count(&r, "rsync_runs"), count(&r, "rsync_last_success"), count(&r, "meta")), (1, 1, 0));
    // The key pair's private key, the host key, the TOTP seed, both key checks.
    assert_eq!(r.secrets_verified, 5);
    assert!(!r.to.contains("postgres://"), "{}", r.to);
    assert!(
        std::fs::read_dir(src.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with(".store-migrate")),
        "the snapshot was left behind"
    );

    let (on_pg, first) = Store::open_postgres(src.path(), &pg.url("dest")).unwrap();
    assert!(!first);
    assert_eq!(dump(&on_pg), want);
    // The ciphertexts were copied as they are.
    let hex = pg.psql("dest", "SELECT encode(private_key, 'hex') FROM keychain WHERE name = 'pair'").unwrap();
    let lite = live.keychain_get(1).unwrap().unwrap();
    assert_eq!(lite.name, "pair");
    assert!(!hex.is_empty());
    // Ids go on after the deleted row's, as on SQLite.
    let next = on_pg.keychain_insert("after", "SSH_KEY_PAIR", &json!({}), None).unwrap();
    assert_eq!(next, live.keychain_insert("after", "SSH_KEY_PAIR", &json!({}), None).unwrap());
    assert_eq!(next, 4);
    on_pg.keychain_delete_many(&[next]).unwrap();
    drop(on_pg);

    // A second run finds rows and changes nothing.
    let before = pg_rows(&pg, "dest", "users");
    let e = sqlite_to_postgres(src.path(), &pg.url("dest"), quiet()).unwrap_err();
    assert!(matches!(e, StoreError::MigrateNotEmpty { table: "users", rows: 2, .. }), "{e}");
    assert!(e.to_string().contains("createdb"), "{e}");
    assert_eq!(pg_rows(&pg, "dest", "users"), before);

    // Back into a fresh data dir with the key file named explicitly.
    let back = tempfile::tempdir().unwrap();
    let r = postgres_to_sqlite(&pg.url("dest"), &src.path().join(MASTER_KEY_FILE), back.path(), quiet()).unwrap();
    assert_eq!(count(&r, "audit"), 5);
    let (s, first) = Store::open(back.path()).unwrap();
    assert!(!first);
    assert_eq!(dump(&s), want);
    assert_eq!(s.keychain_insert("after", "SSH_KEY_PAIR", &json!({}), None).unwrap(), 5, "the counter came back");
    drop(s);

    // Into that (now non-empty) data dir again: refused, nothing changed.
    let db_before = std::fs::read(back.path().join(DB_FILE)).unwrap();
    let e = postgres_to_sqlite(&pg.url("dest"), &src.path().join(MASTER_KEY_FILE), back.path(), quiet()).unwrap_err();
    assert!(matches!(e, StoreError::MigrateNotEmpty { table: "users", .. }), "{e}");
    assert_eq!(std::fs::read(back.path().join(DB_FILE)).unwrap(), db_before);
}

#[test]
fn a_wrong_master_key_is_refused_on_either_side_and_nothing_is_left() {
    let Some(pg) = keyhaven_testpg::start_or_skip("migrate::a_wrong_master_key_is_refused") else { return };
    pg.create_database("other").unwrap();
    // `other` belongs to another installation: its key check is another key's.
    let other_dir = tempfile::tempdir().unwrap();
    drop(Store::open_postgres(other_dir.path(), &pg.url("other")).unwrap());
    let src = tempfile::tempdir().unwrap();
    {
        let (s, _) = Store::open(src.path()).unwrap();
        fill(&s);
    }
    let e = sqlite_to_postgres(src.path(), &pg.url("other"), quiet()).unwrap_err();
    assert!(matches!(e, StoreError::PgWrongMasterKey { .. }), "{e}");
    assert_eq!(pg_rows(&pg, "other", "users"), "0");

    // The reverse: a data dir whose master.key is another key.
    pg.create_database("good").unwrap();
    sqlite_to_postgres(src.path(), &pg.url("good"), quiet()).unwrap();
    let dest = tempfile::tempdir().unwrap();
    MasterKey::generate().create_file(&dest.path().join(MASTER_KEY_FILE)).unwrap();
    let e = postgres_to_sqlite(&pg.url("good"), &src.path().join(MASTER_KEY_FILE), dest.path(), quiet()).unwrap_err();
    assert!(matches!(e, StoreError::MigrateKeyMismatch { .. }), "{e}");
    assert!(!dest.path().join(DB_FILE).exists());
    // And a key file that is not the database's.
    let e = postgres_to_sqlite(
        &pg.url("good"),
        &dest.path().join(MASTER_KEY_FILE),
        tempfile::tempdir().unwrap().path(),
        quiet(),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::PgWrongMasterKey { .. }), "{e}");
}

#[test]
fn an_unreadable_source_is_refused_before_the_destination_is_touched() {
    let empty = tempfile::tempdir().unwrap();
    let e = sqlite_to_postgres(empty.path(), "postgres://u:pw-secret@127.0.0.1:1/x", quiet()).unwrap_err();
    assert!(e.to_string().contains("check --data-dir"), "{e}");
    let dest = tempfile::tempdir().unwrap();
    let missing = empty.path().join("nope.key");
    let e = postgres_to_sqlite("postgres://u:pw-secret@127.0.0.1:1/x", &missing, dest.path(), quiet()).unwrap_err();
    assert!(e.to_string().contains("--master-key") && !e.to_string().contains("pw-secret"), "{e}");
    assert!(is_empty_dir(dest.path()));
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

/// The verification is what makes a commit safe: a row that differs, or a
/// sealed value that opens to other bytes, stops it.
#[test]
fn verification_catches_a_differing_row_and_a_secret_that_does_not_open() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let make = || {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, _) = Store::open(d.path()).unwrap();
            fill(&s);
        }
        let c = Connection::open(d.path().join(DB_FILE)).unwrap();
        (d, Mutex::new(c))
    };
    let (da, a) = make();
    let (_db, b) = make();
    let key = MasterKey::load(&da.path().join(MASTER_KEY_FILE)).unwrap();
    // Same records, but sealed with another key (each store made its own).
    let e = rt.block_on(verify(&Side::Lite(&a), &Side::Lite(&b), &key)).unwrap_err();
    assert!(matches!(e, StoreError::MigrateVerify { table: "users", .. }), "{e}");
    // A copy of a itself verifies; then one changed byte in one row does not.
    let (_dc, c) = make();
    let copy_of_a = da.path().join("copy.db");
    crate::snapshot::snapshot_db(da.path(), &copy_of_a).unwrap();
    *c.lock().unwrap() = Connection::open(&copy_of_a).unwrap();
    assert_eq!(rt.block_on(verify(&Side::Lite(&a), &Side::Lite(&c), &key)).unwrap(), 5);
    c.lock().unwrap().execute("UPDATE audit SET ts = ts + 0.001 WHERE id = 3", []).unwrap();
    let e = rt.block_on(verify(&Side::Lite(&a), &Side::Lite(&c), &key)).unwrap_err();
    assert!(matches!(&e, StoreError::MigrateVerify { table: "audit", detail } if detail == "row 3 differs"), "{e}");
}
