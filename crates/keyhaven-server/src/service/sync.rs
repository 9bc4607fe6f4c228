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
//! [`RECONCILE_EVERY`], the safety net for anything lost another way.

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
    if all || !c.keychain.is_empty() {
        let (a, ids) = (app.clone(), c.keychain.clone());
        let r = tokio::task::spawn_blocking(move || a.keychain().follow_shared_state((!all).then_some(&ids))).await;
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
