//! Upgrades keep data (issue 13, part 4): a database with the first release's
//! schema (tests/fixtures/upgrade-v1, made by scripts/make-upgrade-fixture.sh)
//! opens with this binary, is copied aside and migrated, and keeps every
//! record; a database from a newer keyhaven is refused, naming the version
//! needed, and left as it was.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::util::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upgrade-v1");

/// A data dir holding the fixture's database and master key (modes as keyhaven wants them).
fn fixture_dir(tag: &str) -> Arc<TestDir> {
    let dir = Arc::new(TestDir::new(tag));
    std::fs::create_dir_all(dir.path()).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    for f in ["keyhaven.db", "master.key"] {
        let dest = dir.path().join(f);
        std::fs::copy(Path::new(FIXTURE).join(f), &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    dir
}

fn user_version(db: &Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn first_release_database_migrates_and_keeps_every_record() {
    sqlite_only!("the fixture is a first-release keyhaven.db");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(Path::new(FIXTURE).join("expected.json")).unwrap()).unwrap();
    let dir = fixture_dir("upgrade-v1");
    assert_eq!(user_version(&dir.path().join("keyhaven.db")), 1, "the fixture has the first schema");
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    let mut c = d.admin().await;

    // Every record, as the first release showed it.
    let keychain = c.call("keychaincredential.query", json!([[], {"order_by": ["id"]}])).await;
    assert_eq!(keychain, expected["keychain"], "key pairs and connections differ after the upgrade");
    let users = c.call("user.query", json!([[], {"order_by": ["id"]}])).await;
    assert_eq!(users, expected["users"], "accounts differ after the upgrade");
    let keys: Vec<Value> = c
        .call("api_key.query", json!([[], {"order_by": ["id"]}]))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|k| json!({"id": k["id"], "name": k["name"], "username": k["username"]}))
        .collect();
    assert_eq!(json!(keys), expected["api_keys"]);
    let ssh = c.call("ssh.config", json!([])).await;
    assert_eq!(ssh["tcpport"], expected["ssh"]["tcpport"]);
    assert_eq!(ssh["passwordauth"], expected["ssh"]["passwordauth"]);
    // Sealed secrets still open with the old master key.
    let token = c.call("auth.generate_token", json!([600, {}, false, false])).await;
    for k in keychain.as_array().unwrap().iter().filter(|k| k["attributes"]["private_key"].is_string()) {
        let url =
            format!("/_download/keychaincredential/{}/private_key?auth_token={}", k["id"], token.as_str().unwrap());
        let r = http(&d, "GET", &url, &[], None).await;
        assert_eq!(r.status, 200, "{}: {}", k["name"], r.text());
        assert_eq!(r.text(), k["attributes"]["private_key"].as_str().unwrap());
    }
    // Later features work on the migrated database (migration 0005's table).
    let n = c.call("rsynctask.query", json!([[], {"count": true}])).await;
    assert_eq!(n, 0);
    drop(c);
    d.stop();

    // The copy taken before migrating: the first schema, 0600, in backups/.
    let copies: Vec<_> = std::fs::read_dir(dir.path().join("backups")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    let name = copies[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("pre-migrate-v1-") && name.ends_with(".db"), "{name}");
    assert_eq!(std::fs::metadata(&copies[0]).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(user_version(&copies[0]), 1);
    // The schema history says who migrated it, from what.
    let db = dir.path().join("keyhaven.db");
    let latest = user_version(&db);
    assert!(latest >= 7, "{latest}");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let (from, by): (i64, String) = conn
            .query_row("SELECT from_version, keyhaven_version FROM schema_history WHERE version = ?1", [latest], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((from, by.as_str()), (1, env!("CARGO_PKG_VERSION")));
    }

    // A second start migrates nothing and copies nothing.
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    d.stop();
    assert_eq!(std::fs::read_dir(dir.path().join("backups")).unwrap().count(), 1);
}

#[tokio::test]
async fn a_newer_schema_is_refused_naming_the_version_and_left_alone() {
    sqlite_only!("edits keyhaven.db's schema history");
    let dir = Arc::new(TestDir::new("upgrade-newer"));
    let mut d = Daemon::start_in(dir.clone(), DaemonOpts::default());
    d.stop();
    let db = dir.path().join("keyhaven.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "PRAGMA user_version = 42; INSERT INTO schema_history VALUES (42, 7, '7.1.0', 0); PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let e = Daemon::try_start_in(dir.clone(), DaemonOpts::default()).err().expect("a newer schema must be refused");
    assert!(e.contains("schema version 42") && e.contains("keyhaven 7.1.0"), "{e}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the refused database was changed");
    assert!(!dir.path().join("backups").exists(), "nothing is copied for a refused database");
    // Offline commands refuse it the same way.
    let o =
        std::process::Command::new(bin()).args(["rotate-master-key", "--data-dir"]).arg(dir.path()).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("keyhaven 7.1.0"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&db).unwrap(), before);
}
