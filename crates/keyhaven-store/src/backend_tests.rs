//! The record tests, run against both backends: each `both!` test body runs
//! once on SQLite in a temp data dir and once on a throwaway PostgreSQL
//! cluster (skipped, saying why, only when no PostgreSQL is installed).

use serde_json::json;

use crate::error::StoreError;
use crate::records::ConnectionTestRecord;
use crate::rsync::RsyncRunRecord;
use crate::{
    AuditCmp, AuditEntry, AuditExpr, AuditField, AuditFilter, AuditNulls, AuditOrder, AuditQuery, AuditValue, Store,
};

/// Runs `$body` with `$s` bound to a fresh store of each backend.
macro_rules! both {
    ($name:ident, |$s:ident| $body:block) => {
        mod $name {
            use super::*;

            #[test]
            fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let (store, first) = Store::open(dir.path()).unwrap();
                assert!(first);
                let $s = &store;
                $body
            }

            #[test]
            fn postgres() {
                let Some(pg) = keyhaven_testpg::start_or_skip(concat!(stringify!($name), "::postgres")) else {
                    return;
                };
                let dir = tempfile::tempdir().unwrap();
                let (store, first) = Store::open_postgres(dir.path(), &pg.url("postgres")).unwrap();
                assert_eq!(store.backend_name(), "postgresql");
                assert!(first);
                let $s = &store;
                $body
            }
        }
    };
}

both!(users_round_trip_and_unique_names, |s| {
    let id = s.user_insert("alice", &json!({"full_name": "Alice"}), Some("$6$h")).unwrap();
    assert!(matches!(s.user_insert("alice", &json!({}), None), Err(StoreError::Conflict(_))));
    let u = s.user_by_name("alice").unwrap().unwrap();
    assert_eq!((u.id, u.data.clone(), u.password_hash.as_deref()), (id, json!({"full_name": "Alice"}), Some("$6$h")));
    let g = s.users_generation();
    s.user_update(id, "alice2", &json!({"x": 1}), None).unwrap();
    assert!(s.users_generation() > g, "a change to users bumps the generation");
    let u = s.user_by_id(id).unwrap().unwrap();
    assert_eq!((u.username.as_str(), u.password_hash.as_deref()), ("alice2", Some("$6$h")), "hash kept");
    s.user_update(id, "alice2", &json!({}), Some(None)).unwrap();
    assert_eq!(s.user_by_id(id).unwrap().unwrap().password_hash, None);
    assert!(matches!(s.user_update(id + 100, "x", &json!({}), None), Err(StoreError::NotFound(_))));
    s.user_insert("bob", &json!({}), None).unwrap();
    assert_eq!(s.users_list().unwrap().iter().map(|u| u.username.as_str()).collect::<Vec<_>>(), ["alice2", "bob"]);
    s.user_delete(id).unwrap();
    assert!(s.user_by_id(id).unwrap().is_none());
    assert!(s.user_by_name("nobody").unwrap().is_none());
});

both!(totp_seed_is_sealed_and_a_step_is_used_once, |s| {
    let id = s.user_insert("alice", &json!({}), None).unwrap();
    assert!(s.user_twofactor_secret(id).unwrap().is_none());
    s.user_set_twofactor_secret(id, Some("JBSWY3DPEHPK3PXP")).unwrap();
    assert!(s.user_by_id(id).unwrap().unwrap().has_twofactor_secret);
    assert_eq!(s.user_twofactor_secret(id).unwrap().unwrap().as_str(), "JBSWY3DPEHPK3PXP");
    assert!(s.user_totp_consume(id, 100).unwrap());
    assert!(!s.user_totp_consume(id, 100).unwrap(), "a replayed step is refused");
    assert!(!s.user_totp_consume(id, 99).unwrap(), "an older step is refused");
    assert!(s.user_totp_consume(id, 101).unwrap());
    // A new seed forgets the used steps.
    s.user_set_twofactor_secret(id, Some("OTHER")).unwrap();
    assert!(s.user_totp_consume(id, 50).unwrap());
    s.user_set_twofactor_secret(id, None).unwrap();
    assert!(!s.user_by_id(id).unwrap().unwrap().has_twofactor_secret);
});

both!(api_keys_hash_their_own_id_and_go_with_the_user, |s| {
    let k = s.api_key_insert("k1", "alice", Some(99), |id| format!("hash-of-{id}")).unwrap();
    assert_eq!(k.key_hash, format!("hash-of-{}", k.id));
    let got = s.api_key_by_id(k.id).unwrap().unwrap();
    assert_eq!((got.name.as_str(), got.key_hash.as_str(), got.expires_at), ("k1", k.key_hash.as_str(), Some(99)));
    assert!(matches!(s.api_key_insert("k1", "bob", None, |_| "h".into()), Err(StoreError::Conflict(_))));
    let k2 = s.api_key_insert("k2", "bob", None, |id| format!("h{id}")).unwrap();
    assert!(k2.id > k.id);
    assert_eq!(s.api_keys_list().unwrap().len(), 2);
    assert!(s.api_key_delete(k2.id).unwrap());
    assert!(!s.api_key_delete(k2.id).unwrap());
    let uid = s.user_insert("alice", &json!({}), None).unwrap();
    s.token_insert("t-alice", "alice", 60, false, None, &json!({})).unwrap();
    s.user_delete_with_credentials(uid, "alice").unwrap();
    assert!(s.api_keys_list().unwrap().is_empty());
    assert!(s.token_take("t-alice").unwrap().is_none());
    s.api_key_insert("k3", "carol", None, |_| "h".into()).unwrap();
    s.api_keys_delete_for_user("carol").unwrap();
    assert!(s.api_keys_list().unwrap().is_empty());
});

both!(tokens_single_use_expiry_and_attrs, |s| {
    s.token_insert("h1", "admin", 60, true, Some("127.0.0.1"), &json!({"a": 1})).unwrap();
    let t = s.token_take("h1").unwrap().unwrap();
    assert_eq!((t.username.as_str(), t.single_use, t.origin.as_deref()), ("admin", true, Some("127.0.0.1")));
    assert_eq!(t.expires_at - t.created_at, 60);
    assert_eq!(t.attrs, json!({"a": 1}));
    assert!(s.token_take("h1").unwrap().is_none(), "single use");
    s.token_insert("h2", "admin", 60, false, None, &json!({})).unwrap();
    assert!(s.token_take("h2").unwrap().is_some());
    assert!(s.token_take("h2").unwrap().is_some(), "reusable until it expires");
    // An expired token is returned once (the caller refuses it) and removed.
    s.token_insert("h3", "admin", -10, false, None, &json!({})).unwrap();
    assert!(s.token_take("h3").unwrap().is_some());
    assert!(s.token_take("h3").unwrap().is_none());
});

// Sessions opened with a reusable token look at it again when the accounts'
// generation moves: removing one (taken once expired, pruned, the account
// deleted) moves it; taking a single-use token does not.
both!(removing_a_reusable_token_moves_the_accounts_generation, |s| {
    let id = s.token_insert("r1", "admin", 60, false, None, &json!({})).unwrap();
    let t = s.token_by_id(id).unwrap().unwrap();
    assert_eq!((t.id, t.username.as_str(), t.single_use), (id, "admin", false));
    assert!(s.token_by_id(id + 1000).unwrap().is_none());
    let g = s.users_generation();
    s.token_insert("s1", "admin", 60, true, None, &json!({})).unwrap();
    s.token_take("s1").unwrap().unwrap();
    s.token_take("r1").unwrap().unwrap();
    assert_eq!(s.users_generation(), g, "taking a token that stays, or a single-use one, moved the generation");
    // Expired, then taken: removed.
    let e1 = s.token_insert("e1", "admin", -10, false, None, &json!({})).unwrap();
    s.token_take("e1").unwrap().unwrap();
    assert!(s.token_by_id(e1).unwrap().is_none());
    let g2 = s.users_generation();
    assert!(g2 > g, "removing an expired reusable token did not move the generation");
    // Expired, then pruned by the next insert: removed.
    let e2 = s.token_insert("e2", "admin", -10, false, None, &json!({})).unwrap();
    s.token_insert("s2", "admin", 60, true, None, &json!({})).unwrap();
    assert!(s.token_by_id(e2).unwrap().is_none());
    assert!(s.users_generation() > g2, "pruning an expired reusable token did not move the generation");
    // With its account.
    let uid = s.user_insert("bob", &json!({}), None).unwrap();
    let b1 = s.token_insert("b1", "bob", 60, false, None, &json!({})).unwrap();
    s.user_delete_with_credentials(uid, "bob").unwrap();
    assert!(s.token_by_id(b1).unwrap().is_none());
    assert!(s.token_by_id(id).unwrap().is_some(), "another account's token went too");
});

both!(keychain_secrets_names_and_connection_tests, |s| {
    let secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAsecretmaterialZZZZ\n-----END OPENSSH PRIVATE KEY-----\n";
    let id = s.keychain_insert("k", "SSH_KEY_PAIR", &json!({"public_key": "ssh-ed25519 AAAA"}), Some(secret)).unwrap();
    assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), secret);
    assert!(s.keychain_get(id).unwrap().unwrap().has_private_key);
    assert!(matches!(s.keychain_insert("k", "SSH_CREDENTIALS", &json!({}), None), Err(StoreError::Conflict(_))));
    let c1 = s.keychain_insert("c1", "SSH_CREDENTIALS", &json!({"port": 22}), None).unwrap();
    assert!(s.keychain_private_key(c1).unwrap().is_none());
    let t = |id, ok, at| ConnectionTestRecord {
        connection_id: id,
        ok,
        stage: "exec".into(),
        error: (!ok).then(|| "HOST KEY MISMATCH".to_string()),
        latency_ms: 12,
        tested_at: at,
    };
    s.connection_test_record(&t(c1, false, 100)).unwrap();
    s.connection_test_record(&t(c1, true, 200)).unwrap();
    assert_eq!(s.connection_tests().unwrap(), vec![t(c1, true, 200)]);
    // A rename keeps the status; changed settings clear it.
    s.keychain_update(c1, "c1-renamed", &json!({"port": 22}), None).unwrap();
    assert_eq!(s.connection_tests().unwrap().len(), 1);
    s.keychain_update(c1, "c1-renamed", &json!({"port": 2222}), None).unwrap();
    assert!(s.connection_tests().unwrap().is_empty());
    assert!(matches!(s.keychain_update(c1, "k", &json!({}), None), Err(StoreError::Conflict(_))));
    assert!(matches!(s.keychain_update(c1 + 100, "zz", &json!({}), None), Err(StoreError::NotFound(_))));
    // Replacing and clearing the private key.
    s.keychain_update(id, "k", &json!({}), Some("NEW")).unwrap();
    assert_eq!(s.keychain_private_key(id).unwrap().unwrap().as_str(), "NEW");
    s.keychain_update(id, "k", &json!({}), None).unwrap();
    assert!(s.keychain_private_key(id).unwrap().is_none());
    assert_eq!(s.keychain_list().unwrap().len(), 2);
    s.connection_test_record(&t(c1, true, 300)).unwrap();
    s.keychain_delete_many(&[id, c1]).unwrap();
    assert!(s.keychain_list().unwrap().is_empty());
    assert!(s.connection_tests().unwrap().is_empty(), "a test goes with its connection");
    assert!(s.connection_test_record(&t(c1, true, 400)).is_err(), "no test of a connection that is gone");
});

both!(settings_and_host_keys, |s| {
    assert_eq!(s.setting_get("ssh").unwrap(), None);
    s.setting_set("ssh", &json!({"port": 22})).unwrap();
    s.setting_set("ssh", &json!({"port": 2222})).unwrap();
    assert_eq!(s.setting_get("ssh").unwrap(), Some(json!({"port": 2222})));
    s.host_key_insert("ssh-ed25519", "HOSTSECRET", "ssh-ed25519 AAAA").unwrap();
    assert!(matches!(s.host_key_insert("ssh-ed25519", "X", "Y"), Err(StoreError::Conflict(_))));
    assert_eq!(s.host_key_private("ssh-ed25519").unwrap().unwrap().as_str(), "HOSTSECRET");
    assert!(s.host_key_private("ssh-rsa").unwrap().is_none());
    let keys = s.host_keys_list().unwrap();
    assert_eq!((keys.len(), keys[0].public_key.as_str()), (1, "ssh-ed25519 AAAA"));
});

both!(rsync_tasks_runs_and_the_keychain_cascade, |s| {
    let conn_id = s.keychain_insert("c", "SSH_CREDENTIALS", &json!({}), None).unwrap();
    let t = s.rsync_task_insert(&json!({"path": "/x"}), true, Some(conn_id)).unwrap();
    let other = s.rsync_task_insert(&json!({"path": "/y"}), true, None).unwrap();
    let run = |state: &str, finished: Option<f64>| RsyncRunRecord {
        task_id: t,
        job_id: 7,
        state: state.into(),
        started: 1.0,
        finished,
        error: None,
        log: "log".into(),
    };
    s.rsync_run_record(&run("RUNNING", None)).unwrap();
    assert_eq!(s.rsync_runs_fail_interrupted("n1", "stopped", 2.0).unwrap(), 1);
    assert_eq!(s.rsync_run(t).unwrap().unwrap().state, "FAILED");
    assert_eq!(s.rsync_runs().unwrap()[0].log, "", "the list leaves logs out");
    assert_eq!(s.rsync_run(t).unwrap().unwrap().log, "log");
    s.rsync_run_record(&run("SUCCESS", Some(4.0))).unwrap();
    s.rsync_run_record(&run("FAILED", Some(5.0))).unwrap();
    assert_eq!(s.rsync_last_successes().unwrap(), vec![(t, Some(4.0)), (other, None)]);
    s.rsync_task_update(other, &json!({"path": "/z"}), false, None).unwrap();
    assert_eq!(s.rsync_task(other).unwrap().unwrap().data, json!({"path": "/z"}));
    assert!(matches!(s.rsync_task_update(9999, &json!({}), true, None), Err(StoreError::NotFound(_))));

    assert_eq!(s.keychain_delete_unbinding_tasks(&[conn_id]).unwrap(), vec![t]);
    let r = s.rsync_task(t).unwrap().unwrap();
    assert!(!r.enabled && r.ssh_credentials.is_none());
    assert!(s.keychain_get(conn_id).unwrap().is_none());
    s.rsync_task_delete(t).unwrap();
    assert!(s.rsync_run(t).unwrap().is_none(), "the run goes with its task");
    assert_eq!(s.rsync_last_successes().unwrap(), vec![(other, None)]);
    assert!(matches!(s.rsync_task_delete(t), Err(StoreError::NotFound(_))));
    assert_eq!(s.rsync_tasks().unwrap().len(), 1);
});

both!(rsync_runs_claimed_finished_and_failed_per_node, |s| {
    let t = s.rsync_task_insert(&json!({"path": "/x"}), true, None).unwrap();
    // A claim records the run RUNNING under its job.
    assert_eq!(s.rsync_run_claim(t, 11, 1.0, "n1").unwrap(), None);
    let r = s.rsync_run(t).unwrap().unwrap();
    assert_eq!((r.job_id, r.state.as_str(), r.finished, r.log.as_str()), (11, "RUNNING", None, ""));
    // The node's own leftover RUNNING row is taken over by its next claim.
    assert_eq!(s.rsync_run_claim(t, 12, 2.0, "n1").unwrap(), None);
    let end = |job_id: i64, state: &str| RsyncRunRecord {
        task_id: t,
        job_id,
        state: state.into(),
        started: 2.0,
        finished: Some(3.0),
        error: None,
        log: "done".into(),
    };
    // Only the run that holds the row records its end.
    assert!(!s.rsync_run_finish(&end(11, "SUCCESS")).unwrap(), "job 11 no longer holds the row");
    assert_eq!(s.rsync_run(t).unwrap().unwrap().state, "RUNNING");
    assert_eq!(s.rsync_last_successes().unwrap(), vec![(t, None)]);
    assert!(s.rsync_run_finish(&end(12, "SUCCESS")).unwrap());
    let r = s.rsync_run(t).unwrap().unwrap();
    assert_eq!((r.job_id, r.state.as_str(), r.log.as_str()), (12, "SUCCESS", "done"));
    assert_eq!(s.rsync_last_successes().unwrap(), vec![(t, Some(3.0))]);
    // A node's start fails its interrupted run.
    assert_eq!(s.rsync_run_claim(t, 13, 4.0, "n1").unwrap(), None);
    assert_eq!(s.rsync_runs_fail_interrupted("n1", "stopped", 5.0).unwrap(), 1);
    let r = s.rsync_run(t).unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.error.as_deref(), r.finished), ("FAILED", Some("stopped"), Some(5.0)));
    assert!(!s.rsync_run_finish(&end(99, "SUCCESS")).unwrap());
    // The run of a deleted task has no row to end.
    assert_eq!(s.rsync_run_claim(t, 14, 6.0, "n1").unwrap(), None);
    s.rsync_task_delete(t).unwrap();
    assert!(!s.rsync_run_finish(&end(14, "FAILED")).unwrap());
    assert!(s.rsync_run(t).unwrap().is_none());
    // No node of a cluster is down on SQLite; on PostgreSQL none ran anything here.
    assert_eq!(s.rsync_runs_fail_down_nodes("down", 7.0).unwrap(), 0);
});

both!(audit_insert_list_and_prune, |s| {
    let e = |event: &str| AuditEntry {
        username: Some("alice".into()),
        address: None,
        service: "MIDDLEWARE".into(),
        method: Some("auth.login".into()),
        event: event.into(),
        target: None,
        success: true,
        error: None,
    };
    let old = s.audit_insert_at(1000.5, &e("OLD")).unwrap();
    let new = s.audit_insert(&e("NEW")).unwrap();
    let all = s.audit_list().unwrap();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), vec![old, new]);
    assert_eq!((all[0].ts, all[0].entry.event.as_str(), all[0].entry.success), (1000.5, "OLD", true));
    assert!(matches!(s.audit_prune(-1), Err(StoreError::InvalidArgument(_))));
    assert_eq!(s.audit_prune(3600).unwrap(), 1);
    assert_eq!(s.audit_list().unwrap().len(), 1);
});

/// What only one backend can do answers with a typed error on the other,
/// never a panic; the rest of the interface is the same.
#[test]
fn the_store_says_what_postgres_cannot_do_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = Store::open_database(dir.path(), " ").unwrap();
    assert_eq!(s.backend_name(), "sqlite");
    s.check_backup_supported().unwrap();
    assert!(s.shared_jobs().is_none(), "one node keeps its jobs in memory");
    let Some(pg) = keyhaven_testpg::start_or_skip("the_store_says_what_postgres_cannot_do_yet") else { return };
    let pdir = tempfile::tempdir().unwrap();
    let (p, _) = Store::open_database(pdir.path(), &pg.url("postgres")).unwrap();
    assert_eq!(p.backend_name(), "postgresql");
    let e = p.check_backup_supported().unwrap_err();
    assert!(matches!(e, StoreError::BackupOnPostgres { .. }) && e.to_string().contains("pg_dump"), "{e}");
    assert!(matches!(p.rotate_master_key(), Err(StoreError::NotOnPostgres { .. })));
    assert!(p.shared_jobs().is_some(), "the nodes share their jobs");
    // Commits are durable when they return: the ticket has nothing to wait for.
    let (id, ticket) = p.deferring_sync(|| p.rsync_task_insert(&json!({}), true, None).unwrap());
    assert!(ticket.is_done());
    ticket.wait();
    assert!(p.rsync_task(id).unwrap().is_some());
    assert_eq!(p.journal_syncs(), 0);
    p.health_check(pdir.path(), std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(p.key_path(), pdir.path().join(crate::MASTER_KEY_FILE));
}

fn audit_entry(username: Option<&str>, target: Option<&str>, success: bool) -> AuditEntry {
    AuditEntry {
        username: username.map(str::to_string),
        address: Some("10.0.0.1".into()),
        service: "MIDDLEWARE".into(),
        method: Some("auth.login_ex".into()),
        event: "AUTHENTICATION".into(),
        target: target.map(str::to_string),
        success,
        error: None,
    }
}

fn audit_ids(s: &Store, q: &AuditQuery) -> Vec<i64> {
    let rows: Vec<i64> = s.audit_query(q).unwrap().into_iter().map(|r| r.id).collect();
    let unpaged = AuditQuery { filter: q.filter.clone(), casefold: q.casefold, ..Default::default() };
    assert_eq!(s.audit_count(&unpaged).unwrap(), s.audit_query(&unpaged).unwrap().len() as u64, "{:?}", q.filter);
    rows
}

fn where_(filter: AuditFilter) -> AuditQuery {
    AuditQuery { filter, ..Default::default() }
}

fn txt(s: &str) -> AuditValue {
    AuditValue::Text(s.into())
}

// audit.query's primitives give the same rows on both backends: byte-wise
// text (wildcards, case and NUL in filter values are literal), NULL rules,
// integers and whole seconds, SQLite's NULL order, ties in id order, paging.
both!(audit_query_filters_order_and_pages_alike, |s| {
    let names = [Some("admin"), Some("bob"), None, Some("admin"), Some("a*b?[c]%_"), Some("Ädmin"), Some("admin2")];
    for (i, name) in names.iter().enumerate() {
        s.audit_insert_at(1_000.0 + i as f64 * 0.5, &audit_entry(*name, Some("Authentication attempt"), i % 2 == 0))
            .unwrap();
    }
    let user = AuditExpr::from(AuditField::Username);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Eq, txt("admin")))), [1, 4]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Ne, txt("admin")))), [2, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Differs(user, txt("admin")))), [2, 3, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Differs(user, txt("ad\0min")))), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Eq, txt("ad\0min")))), Vec::<i64>::new());
    // Byte order: "a*b?[c]%_" < "admin" < "admin2" < "bob" < "Ädmin"; "ad\0" sorts before "admin".
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Gt, txt("bob")))), [6]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Gt, txt("ad\0zz")))), [1, 2, 4, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Cmp(user, AuditCmp::Lt, txt("admin")))), [5]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::IsNull(user))), [3]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::NotIn(user, vec![txt("bob"), txt("x\0")]))), [1, 4, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::NotIn(user, vec![txt("x\0")]))), [1, 2, 4, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::In(user, vec![txt("bob"), txt("admin2")]))), [2, 7]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::In(user, vec![]))), Vec::<i64>::new());
    let starts = |t: &str, negated| AuditFilter::StartsWith { expr: user, text: t.into(), negated };
    assert_eq!(audit_ids(s, &where_(starts("a*b?[", false))), [5]);
    assert_eq!(audit_ids(s, &where_(starts("a%", false))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(starts("a", false))), [1, 4, 5, 7]);
    assert_eq!(audit_ids(s, &where_(starts("A", false))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(starts("Ä", false))), [6]);
    assert_eq!(audit_ids(s, &where_(starts("ad\0", false))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(starts("ad", true))), [2, 5, 6]);
    assert_eq!(audit_ids(s, &where_(starts("", false))), [1, 2, 4, 5, 6, 7]);
    let ends = |t: &str, negated| AuditFilter::EndsWith { expr: user, text: t.into(), negated };
    assert_eq!(audit_ids(s, &where_(ends("min", false))), [1, 4, 6]);
    assert_eq!(audit_ids(s, &where_(ends("", false))), [1, 2, 4, 5, 6, 7]);
    assert_eq!(audit_ids(s, &where_(ends("", true))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(ends("min", true))), [2, 5, 7]);
    assert_eq!(audit_ids(s, &where_(ends("a longer suffix than any", true))), [1, 2, 4, 5, 6, 7]);
    let contains = |t: &str, negated| AuditFilter::Contains { expr: user, text: t.into(), negated };
    assert_eq!(audit_ids(s, &where_(contains("dmi", false))), [1, 4, 6, 7]);
    assert_eq!(audit_ids(s, &where_(contains("_", false))), [5]);
    assert_eq!(audit_ids(s, &where_(contains("\0", false))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(contains("", true))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(contains("dmi", true))), [2, 5]);
    let within = |t: &str, negated| AuditFilter::ContainedIn { expr: user, text: t.into(), negated };
    assert_eq!(audit_ids(s, &where_(within("xadminx\0bob", false))), [1, 2, 4]);
    assert_eq!(audit_ids(s, &where_(within("xadminx bob", true))), [5, 6, 7]);
    // Integers, booleans, whole seconds, milliseconds, OR and AND.
    let secs = AuditExpr::from(AuditField::MessageTimestamp);
    let any = AuditFilter::Any(vec![
        AuditFilter::Cmp(secs, AuditCmp::Ge, AuditValue::Int(1_002)),
        AuditFilter::Cmp(AuditField::Id.into(), AuditCmp::Eq, AuditValue::Int(1)),
    ]);
    assert_eq!(audit_ids(s, &where_(any)), [1, 5, 6, 7]);
    let ms = AuditFilter::Cmp(AuditField::TimestampMs.into(), AuditCmp::Eq, AuditValue::Int(1_001_500));
    assert_eq!(audit_ids(s, &where_(ms)), [4]);
    let ok = AuditFilter::All(vec![
        AuditFilter::Cmp(AuditField::Success.into(), AuditCmp::Eq, AuditValue::Int(1)),
        AuditFilter::NotIn(AuditField::Id.into(), vec![AuditValue::Int(7)]),
    ]);
    assert_eq!(audit_ids(s, &where_(ok)), [1, 3, 5]);
    assert_eq!(audit_ids(s, &where_(AuditFilter::Any(vec![]))), Vec::<i64>::new());
    assert_eq!(audit_ids(s, &where_(AuditFilter::Const(true))).len(), 7);
    // Order: SQLite's NULL is the lowest; ties keep id order in either direction.
    let order = |field, descending, nulls| AuditOrder { field, descending, nulls };
    let by = |keys: Vec<AuditOrder>| AuditQuery { order_by: keys, ..Default::default() };
    assert_eq!(
        audit_ids(s, &by(vec![order(AuditField::MessageTimestamp, true, AuditNulls::Natural)])),
        [7, 5, 6, 3, 4, 1, 2]
    );
    assert_eq!(audit_ids(s, &by(vec![order(AuditField::Username, false, AuditNulls::Natural)])), [3, 5, 1, 4, 7, 2, 6]);
    assert_eq!(audit_ids(s, &by(vec![order(AuditField::Username, true, AuditNulls::Natural)])), [6, 2, 7, 1, 4, 5, 3]);
    assert_eq!(audit_ids(s, &by(vec![order(AuditField::Username, false, AuditNulls::Last)])), [5, 1, 4, 7, 2, 6, 3]);
    assert_eq!(audit_ids(s, &by(vec![order(AuditField::Username, true, AuditNulls::First)])), [3, 6, 2, 7, 1, 4, 5]);
    assert_eq!(audit_ids(s, &by(vec![order(AuditField::Success, true, AuditNulls::Natural)])), [1, 3, 5, 7, 2, 4, 6]);
    let q = AuditQuery {
        order_by: vec![
            order(AuditField::Id, true, AuditNulls::Natural),
            order(AuditField::Username, false, AuditNulls::First),
        ],
        limit: Some(2),
        offset: 1,
        ..Default::default()
    };
    assert_eq!(audit_ids(s, &q), [6, 5]);
    assert_eq!(audit_ids(s, &AuditQuery { offset: 5, ..Default::default() }), [6, 7]);
    assert_eq!(audit_ids(s, &AuditQuery { limit: Some(0), ..Default::default() }), Vec::<i64>::new());
});

fn fold_like_the_service(s: &str) -> String {
    // The service's folding (keyhaven_core::query::casefold) is close to
    // Python's str.casefold: the special cases that differ from lowercasing.
    let mut out = String::new();
    for c in s.chars() {
        match c {
            'ß' | 'ẞ' => out.push_str("ss"),
            'ς' => out.push('σ'),
            _ => out.extend(c.to_lowercase()),
        }
    }
    out
}

// Folded comparisons use the caller's Rust folding on both backends, not
// the database's idea of lower case.
both!(audit_query_folds_with_the_callers_function, |s| {
    for name in [Some("Admin"), None, Some("STRASSE"), Some("Straße"), Some("ΣΟΦΟΣ"), Some("admin"), Some("İx")]
    {
        s.audit_insert_at(1.0, &audit_entry(name, Some("Authentication attempt"), true)).unwrap();
    }
    let folded = AuditExpr { field: AuditField::Username, folded: true };
    let q = where_(AuditFilter::Cmp(folded, AuditCmp::Eq, txt("admin")));
    assert!(matches!(s.audit_query(&q), Err(StoreError::InvalidArgument(_))));
    assert!(matches!(s.audit_count(&q), Err(StoreError::InvalidArgument(_))));
    let f = |filter| AuditQuery { filter, casefold: Some(fold_like_the_service), ..Default::default() };
    assert_eq!(audit_ids(s, &f(AuditFilter::Cmp(folded, AuditCmp::Eq, txt("admin")))), [1, 6]);
    assert_eq!(audit_ids(s, &f(AuditFilter::Cmp(folded, AuditCmp::Eq, txt("strasse")))), [3, 4]);
    assert_eq!(audit_ids(s, &f(AuditFilter::Cmp(folded, AuditCmp::Eq, txt("σοφοσ")))), [5]);
    assert_eq!(audit_ids(s, &f(AuditFilter::Cmp(folded, AuditCmp::Eq, txt("i\u{307}x")))), [7]);
    assert_eq!(audit_ids(s, &f(AuditFilter::Differs(folded, txt("admin")))), [2, 3, 4, 5, 7]);
    assert_eq!(audit_ids(s, &f(AuditFilter::In(folded, vec![txt("admin"), txt("strasse")]))), [1, 3, 4, 6]);
    let starts = AuditFilter::StartsWith { expr: folded, text: "stra".into(), negated: false };
    assert_eq!(audit_ids(s, &f(starts)), [3, 4]);
    let both_folded = AuditFilter::All(vec![
        AuditFilter::Contains { expr: folded, text: "ss".into(), negated: false },
        AuditFilter::Cmp(
            AuditExpr { field: AuditField::Target, folded: true },
            AuditCmp::Eq,
            txt("authentication attempt"),
        ),
    ]);
    assert_eq!(audit_ids(s, &f(both_folded)), [3, 4]);
    // Unfolded, the same value is compared as stored.
    assert_eq!(audit_ids(s, &f(AuditFilter::Cmp(AuditField::Username.into(), AuditCmp::Eq, txt("admin")))), [6]);
});
