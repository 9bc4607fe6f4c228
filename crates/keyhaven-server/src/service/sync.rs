//! Several nodes, one truth: other nodes' writes applied to this node's
//! derived state (PostgreSQL only; on SQLite this node is the only writer
//! and nothing here runs).
//!
//! The store announces other nodes' changes ([`keyhaven_store::Store::changes`],
//! PostgreSQL `LISTEN/NOTIFY`); each area follows its own:
//!
//! * keychain rows → the entry cache is patched for those ids;
//! * accounts → the keys files sshd reads are written or withdrawn, and
//!   sshd's configuration is rendered again (accounts that may log in with a
//!   password); sessions already look at their account again, because the
//!   store moved the accounts' generation when the notification arrived;
//! * API keys → the same generation: a session opened with a deleted key ends
//!   at its next call;
//! * the `ssh` setting and host keys → sshd re-rendered and applied;
//! * rsync tasks are not followed here: the cluster's scheduler reads them.
//!
//! A missed notification (the listening connection broke) arrives as
//! "everything"; a full reconcile also runs at start and every
//! [`RECONCILE_EVERY`], the safety net for anything lost another way. For
//! the keychain it first compares the table's change count (migration 0006)
//! with the one its cache was built at, and reads the rows only when they
//! differ — outside the keychain's write lock, swapping the new cache in
//! under it (`Keychain::reconcile`; counted in `/metrics` as
//! `keyhaven_cluster_reconciles_total`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use keyhaven_store::Changes;

use super::App;

/// How often everything is compared with the database regardless of notifications.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Follow other nodes' changes until the daemon stops. Returns at once on
/// SQLite.
pub async fn follow(app: Weak<App>) {
    let Some(feed) = app.upgrade().and_then(|a| a.store.changes()) else { return };
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changes = tokio::select! {
            c = feed.next() => match c {
                Some(c) => c,
                None => return,
            },
            // The first tick is immediate: a full pass at start.
            _ = reconcile.tick() => Changes::everything(),
        };
        let Some(app) = app.upgrade() else { return };
        apply(&app, changes).await;
    }
}

/// Bring this node's state in line with `c`.
pub async fn apply(app: &Arc<App>, c: Changes) {
    let all = c.everything;
    if all {
        let a = app.clone();
        match tokio::task::spawn_blocking(move || a.keychain().reconcile()).await {
            Ok(Ok(done)) => {
                app.metrics.reconciled("keychain", done.as_str());
                if done == super::keychain::Reconciled::Rebuilt {
                    tracing::debug!("the keychain changed since the cache was built: rebuilt");
                }
            }
            Ok(Err(e)) => tracing::error!("reconciling the keychain cache with the database: {e}"),
            Err(e) => tracing::error!("reconciling the keychain cache with the database: {e}"),
        }
    } else if !c.keychain.is_empty() {
        let (a, ids) = (app.clone(), c.keychain.clone());
        let r = tokio::task::spawn_blocking(move || a.keychain().follow_shared_state(&ids)).await;
        report("the keychain cache", r);
    }
    if all || !c.users.is_empty() {
        let (a, names) = (app.clone(), c.users.clone());
        let r = tokio::task::spawn_blocking(move || a.accounts().follow_shared_state((!all).then_some(&names))).await;
        report("the accounts' keys files", r);
    }
    if all || !c.users.is_empty() || c.host_keys || c.settings.contains("ssh") {
        if let Err(e) = app.sshd().follow_shared_state().await {
            tracing::error!("applying another node's change to sshd: {e}");
        }
    }
    if all {
        let a = app.clone();
        let window = super::limiter::FAILURE_WINDOW.as_secs() as i64;
        match tokio::task::spawn_blocking(move || a.store.login_failures_prune(window)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("pruning the shared failed logins: {e}"),
            Err(e) => tracing::warn!("pruning the shared failed logins: {e}"),
        }
    }
}

fn report(what: &str, r: Result<Result<(), crate::error::ServiceError>, tokio::task::JoinError>) {
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("applying another node's change to {what}: {e}"),
        Err(e) => tracing::error!("applying another node's change to {what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::super::keychain::Reconciled;
    use super::*;

    fn key_pair(n: u32) -> serde_json::Value {
        json!({"public_key": format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{n:040}")})
    }

    /// One node on a throwaway cluster, without its sync loop: nothing
    /// patches the keychain cache but the calls below, so rows written
    /// through the store or psql stand for changes whose notification was
    /// missed (this node's own notifications are dropped anyway).
    #[test]
    fn the_reconcile_reads_the_keychain_only_when_it_changed_and_catches_missed_changes() {
        let Some(pg) = keyhaven_testpg::start_or_skip("sync::tests") else { return };
        let url = pg.create_database("kh").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = keyhaven_store::Store::open_database(dir.path(), &url).unwrap();
        let env = BTreeMap::from([
            ("KEYHAVEN_DATA_DIR", dir.path().display().to_string()),
            ("KEYHAVEN_DATABASE", url.clone()),
        ]);
        let cfg = crate::config::Config::resolve(&BTreeMap::new(), &|k| env.get(k).cloned(), None).unwrap();
        let app = App::new(cfg, store);
        let names = || {
            let mut v: Vec<String> = app.keychain().entries().unwrap().names.keys().cloned().collect();
            v.sort();
            v
        };

        let a = app.store.keychain_insert("a", "SSH_KEY_PAIR", &key_pair(1), None).unwrap();
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::NotBuilt);
        assert_eq!(names(), ["a"]);
        // Built with the table's change count: nothing to read.
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Unchanged);
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Unchanged);

        // An insert the cache was not told about.
        app.store.keychain_insert("b", "SSH_KEY_PAIR", &key_pair(2), None).unwrap();
        assert_eq!(names(), ["a"]);
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Rebuilt);
        assert_eq!(names(), ["a", "b"]);
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Unchanged);

        // An update in place from psql with the notification trigger off:
        // same row count, same ids, and still seen.
        pg.psql(
            "kh",
            "ALTER TABLE keychain DISABLE TRIGGER keychain_notify; \
             UPDATE keychain SET name = 'a2' WHERE name = 'a'; \
             ALTER TABLE keychain ENABLE TRIGGER keychain_notify",
        )
        .unwrap();
        assert_eq!(names(), ["a", "b"]);
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Rebuilt);
        assert_eq!(names(), ["a2", "b"]);
        assert_eq!(app.keychain().entries().unwrap().names["a2"], a);

        // A rolled-back change moves nothing; a delete does.
        pg.psql("kh", "BEGIN; DELETE FROM keychain; ROLLBACK").unwrap();
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Unchanged);
        pg.psql("kh", "DELETE FROM keychain WHERE name = 'b'").unwrap();
        assert_eq!(app.keychain().reconcile().unwrap(), Reconciled::Rebuilt);
        assert_eq!(names(), ["a2"]);

        // The sync loop's "everything" goes through the same reconcile and counts it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(apply(&app, Changes::everything()));
        assert_eq!(app.metrics.reconciles("keychain", "unchanged"), 1);
        app.store.keychain_insert("c", "SSH_KEY_PAIR", &key_pair(3), None).unwrap();
        rt.block_on(apply(&app, Changes::everything()));
        assert_eq!(app.metrics.reconciles("keychain", "rebuilt"), 1);
        assert_eq!(names(), ["a2", "c"]);
    }
}
