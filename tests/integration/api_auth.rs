//! Login mechanisms, tokens, API keys, rate limiting and the audit trail.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

async fn login_ex(c: &mut Client, data: Value) -> Value {
    c.call("auth.login_ex", json!([data])).await
}

#[tokio::test]
async fn password_login_paths() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let r = login_ex(&mut c, json!({"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": "wrong"})).await;
    assert_eq!(r, json!({"response_type": "AUTH_ERR"}));
    let r = login_ex(&mut c, json!({"mechanism": "PASSWORD_PLAIN", "username": "nobody", "password": "x"})).await;
    assert_eq!(r["response_type"], "AUTH_ERR");
    // root has no password: password login is impossible.
    let r = login_ex(&mut c, json!({"mechanism": "PASSWORD_PLAIN", "username": "root", "password": ""})).await;
    assert_eq!(r["response_type"], "AUTH_ERR");
    let r =
        login_ex(&mut c, json!({"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": ADMIN_PASSWORD})).await;
    assert_eq!(r["response_type"], "SUCCESS");
    assert_eq!(r["authenticator"], "LEVEL_1");
    assert_eq!(r["user_info"]["pw_name"], "admin");
    for k in [
        "pw_name",
        "pw_uid",
        "pw_gid",
        "pw_dir",
        "pw_shell",
        "pw_gecos",
        "grouplist",
        "privilege",
        "account_attributes",
    ] {
        assert!(r["user_info"].get(k).is_some(), "user_info lacks {k}");
    }
    let me = c.call("auth.me", json!([])).await;
    assert_eq!(me["privilege"]["roles"]["$set"], json!(["FULL_ADMIN"]));
    assert_eq!(c.call("auth.logout", json!([])).await, true);
    assert_eq!(c.err("auth.me", json!([])).await["data"]["error"], 207);

    // login_options.user_info = false
    let r = login_ex(
        &mut c,
        json!({"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": ADMIN_PASSWORD, "login_options": {"user_info": false}}),
    )
    .await;
    assert_eq!(r["user_info"], Value::Null);

    // Legacy auth.login answers booleans.
    let mut c2 = d.client().await;
    assert_eq!(c2.call("auth.login", json!(["admin", "bad"])).await, false);
    assert_eq!(c2.call("auth.login", json!(["admin", ADMIN_PASSWORD])).await, true);
}

#[tokio::test]
async fn api_keys() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let k = a.call("api_key.create", json!([{"name": "backup", "username": "admin"}])).await;
    let key = k["key"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("{}-", k["id"])), "key is <id>-<secret>: {key}");
    // The key is shown once: query never returns it.
    let listed = a.call("api_key.query", json!([[["name", "=", "backup"]], {"get": true}])).await;
    assert!(listed.get("key").is_none());
    assert!(!listed.to_string().contains(&key[3..]));
    let e = a.err("api_key.create", json!([{"name": "backup", "username": "admin"}])).await;
    assert_field(&e, "api_key_create.name", "already exists");
    let e = a.err("api_key.create", json!([{"name": "other", "username": "ghost"}])).await;
    assert_field(&e, "api_key_create.username", "does not exist");

    let mut c = d.client().await;
    let r = login_ex(&mut c, json!({"mechanism": "API_KEY_PLAIN", "username": "admin", "api_key": key})).await;
    assert_eq!(r["response_type"], "SUCCESS");
    let mut c = d.client().await;
    let r = login_ex(&mut c, json!({"mechanism": "API_KEY_PLAIN", "username": "root", "api_key": key})).await;
    assert_eq!(r["response_type"], "AUTH_ERR", "key belongs to admin, not root");
    let mut c = d.client().await;
    // The last character changed (to one it is not: one key in 62 ends in `x`).
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    let tampered = format!("{}{last}", &key[..key.len() - 1]);
    assert_eq!(c.call("auth.login_with_api_key", json!([tampered])).await, false);
    assert_eq!(c.call("auth.login_with_api_key", json!([key.clone()])).await, true);

    // Deleted keys stop working.
    a.call("api_key.delete", json!([k["id"]])).await;
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_api_key", json!([key])).await, false);
    let e = a.err("api_key.delete", json!([9999])).await;
    assert_eq!(
        e["data"]["extra"][0],
        json!([null, "API key 9999 does not exist", 2]),
        "TrueNAS's InstanceNotFound shape"
    );
}

#[tokio::test]
async fn tokens_expiry_single_use_and_origin() {
    let d = Daemon::start();
    let mut a = d.admin().await;

    // Multi-use (asked for explicitly: keyhaven's default is single-use), any origin.
    let t = a.call("auth.generate_token", json!([600, {}, false, false])).await.as_str().unwrap().to_string();
    for _ in 0..2 {
        let mut c = d.client().await;
        let r = login_ex(&mut c, json!({"mechanism": "TOKEN_PLAIN", "token": t})).await;
        assert_eq!(r["response_type"], "SUCCESS");
        assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");
    }

    // Single use.
    let t = a.call("auth.generate_token", json!([600, {}, false, true])).await.as_str().unwrap().to_string();
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([t.clone()])).await, true);
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([t])).await, false, "single-use token used twice");

    // Expiry.
    let t = a.call("auth.generate_token", json!([1, {}, false])).await.as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut c = d.client().await;
    let r = login_ex(&mut c, json!({"mechanism": "TOKEN_PLAIN", "token": t})).await;
    assert_eq!(r["response_type"], "AUTH_ERR", "expired token accepted");

    // match_origin (default true): a token minted from 127.0.0.1 is refused from 127.0.0.2.
    let t = a.call("auth.generate_token", json!([600, {}, true, false])).await.as_str().unwrap().to_string();
    let url = d.ws_url("/api/current");
    let mut other = Client::connect_from(&url, d.addr, "127.0.0.2".parse().unwrap()).await;
    assert_eq!(other.call("auth.login_with_token", json!([t.clone()])).await, false, "origin not enforced");
    let mut same = Client::connect_from(&url, d.addr, "127.0.0.1".parse().unwrap()).await;
    assert_eq!(same.call("auth.login_with_token", json!([t])).await, true);

    // Bad ttl is a field error.
    let e = a.err("auth.generate_token", json!([0])).await;
    assert_field(&e, "auth_generate_token.ttl", "between");
    let e = a.err("auth.generate_token", json!(["600"])).await;
    assert_field(&e, "auth_generate_token.ttl", "valid integer");
}

/// A session opened with a token ends once it is idle for longer than the
/// token's lifetime; calls keep it alive; a password session has no such limit.
#[tokio::test]
async fn token_sessions_end_when_idle_for_the_token_lifetime() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let t = a.call("auth.generate_token", json!([3, {}, true, true])).await.as_str().unwrap().to_string();
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([t])).await, true);
    // Active for longer than the lifetime: each call counts as activity.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(4500) {
        assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    // Idle for longer than the lifetime: the session is over, with a message that says why.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let e = c.err("auth.me", json!([])).await;
    assert_call_error(&e, "ENOTAUTHENTICATED", "Session expired after 3 seconds without activity; log in again");
    let e = c.err("auth.me", json!([])).await;
    assert_call_error(&e, "ENOTAUTHENTICATED", "Not authenticated");
    // Public methods still answer, and logging in again works on the same connection.
    c.login("admin", ADMIN_PASSWORD).await;
    assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");

    // The password session that minted the token was idle all along and still works.
    assert_eq!(a.call("auth.me", json!([])).await["pw_name"], "admin");
    let expired = a
        .call(
            "audit.query",
            json!([[["event_data.description", "=", "Session expired"]], {"select": ["username", "event_data"]}]),
        )
        .await;
    let expired = expired.as_array().unwrap();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["username"], "admin");
}

/// A session opened with a reusable token lasts as long as the token: it
/// ends once the token expires, even while active (a single-use token is
/// gone at login: its session ends only when idle, above), and once the
/// token is removed with its account — even when an account of the same
/// name is created again before the session's next call. Both are audited.
#[tokio::test]
async fn reusable_token_sessions_end_with_their_token() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let t = a.call("auth.generate_token", json!([3, {}, false, false])).await.as_str().unwrap().to_string();
    let mut c = d.client().await;
    assert_eq!(c.call("auth.login_with_token", json!([t])).await, true);
    let started = Instant::now();
    let ended = loop {
        let r = c.raw("auth.me", json!([])).await;
        if let Some(e) = r.get("error") {
            break Some((started.elapsed(), e.clone()));
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (after, e) = ended.expect("a session opened with a reusable token outlived the token");
    assert!(after >= Duration::from_secs(2), "the session ended after {after:?}, before its token expired");
    assert_call_error(&e, "ENOTAUTHENTICATED", "Not authenticated");

    let account = json!([{"username": "bin", "full_name": "", "password": "pw-for-tok-1", "roles": ["FULL_ADMIN"]}]);
    let u = a.call("user.create", account.clone()).await;
    let mut owner = d.client().await;
    owner.login("bin", "pw-for-tok-1").await;
    let t = owner.call("auth.generate_token", json!([600, {}, false, false])).await.as_str().unwrap().to_string();
    let mut s = d.client().await;
    assert_eq!(s.call("auth.login_with_token", json!([t.clone()])).await, true);
    assert_eq!(s.call("auth.me", json!([])).await["pw_name"], "bin");
    a.call("user.delete", json!([u["id"]])).await;
    a.call("user.create", account).await;
    let e = s.err("auth.me", json!([])).await;
    assert_call_error(&e, "ENOTAUTHENTICATED", "Not authenticated");
    let mut again = d.client().await;
    assert_eq!(again.call("auth.login_with_token", json!([t])).await, false, "the deleted account's token still works");
    // The new account's own password session is unaffected.
    s.login("bin", "pw-for-tok-1").await;
    assert_eq!(s.call("auth.me", json!([])).await["pw_name"], "bin");

    let ends = a
        .call(
            "audit.query",
            json!([[["event_data.description", "=", "Session ended"]], {"select": ["username"], "order_by": ["audit_id"]}]),
        )
        .await;
    assert_eq!(ends, json!([{"username": "admin"}, {"username": "bin"}]));
}

/// `auth.set_attribute` keeps per-account preferences that `auth.me` returns.
#[tokio::test]
async fn set_attribute_keeps_preferences() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    assert_eq!(a.call("auth.me", json!([])).await["attributes"], json!({}));
    a.call("auth.set_attribute", json!(["preferences", {"lifetime": 600}])).await;
    a.call("auth.set_attribute", json!(["theme", "dark"])).await;
    a.call("auth.set_attribute", json!(["preferences", {"lifetime": 900}])).await;
    let want = json!({"preferences": {"lifetime": 900}, "theme": "dark"});
    assert_eq!(a.call("auth.me", json!([])).await["attributes"], want);
    // Other account fields are untouched and the attributes survive a user.update.
    let me = a.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await;
    a.call("user.update", json!([me["id"], {"full_name": "The Admin"}])).await;
    assert_eq!(a.call("auth.me", json!([])).await["attributes"], want);

    let e = a.err("auth.set_attribute", json!(["", 1])).await;
    assert_field(&e, "auth_set_attribute.key", "1 to 64 characters");
    let e = a.err("auth.set_attribute", json!(["big", "x".repeat(20_000)])).await;
    assert_field(&e, "auth_set_attribute.value", "at most 16384");
    let e = a.err("auth.set_attribute", json!(["only-key"])).await;
    assert_field(&e, "auth_set_attribute.value", "");
    assert_eq!(a.call("auth.me", json!([])).await["attributes"], want, "a refused call changed the attributes");
    // Not before login.
    let mut anon = d.client().await;
    assert_call_error(&anon.err("auth.set_attribute", json!(["k", 1])).await, "ENOTAUTHENTICATED", "Not authenticated");
}

#[tokio::test]
async fn failed_logins_are_slowed_refused_and_audited() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let bad = json!({"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": "nope"});
    // First failures answer quickly; after three they are slowed.
    let t0 = Instant::now();
    for _ in 0..3 {
        assert_eq!(login_ex(&mut c, bad.clone()).await["response_type"], "AUTH_ERR");
    }
    let fast = t0.elapsed();
    let t1 = Instant::now();
    assert_eq!(login_ex(&mut c, bad.clone()).await["response_type"], "AUTH_ERR");
    let slowed = t1.elapsed();
    assert!(slowed >= Duration::from_millis(240), "4th failure not slowed ({slowed:?}, first three {fast:?})");
    // Up to the lockout: ten failures in all.
    for _ in 0..6 {
        login_ex(&mut c, bad.clone()).await;
    }
    // Now even the right password is refused for this user and address…
    let good = json!({"mechanism": "PASSWORD_PLAIN", "username": "admin", "password": ADMIN_PASSWORD});
    assert_eq!(login_ex(&mut c, good.clone()).await["response_type"], "AUTH_ERR", "lockout not enforced");
    for _ in 0..4 {
        assert_eq!(login_ex(&mut c, bad.clone()).await["response_type"], "AUTH_ERR");
    }
    // …but not from another address: the per-user key only slows.
    let mut other = Client::connect_from(&d.ws_url("/api/current"), d.addr, "127.0.0.2".parse().unwrap()).await;
    assert_eq!(login_ex(&mut other, good).await["response_type"], "SUCCESS", "the user was locked everywhere");

    // The local socket still works; the audit log has each checked failure
    // (without the password) and no row per refused attempt.
    let audit = d.cli_json(&["audit.query", r#"[["event","=","AUTHENTICATION"],["success","=",false]]"#]);
    let entries = audit.as_array().unwrap();
    assert_eq!(entries.len(), 10, "one row per checked failure, none per refusal: {audit}");
    assert!(entries.iter().all(|e| e["username"] == "admin" && e["address"] == "127.0.0.1"));
    let last = entries.last().unwrap()["event_data"]["error"].as_str().unwrap().to_string();
    assert!(last.contains("further attempts for user admin from 127.0.0.1 refused for 300 s"), "{last}");
    let text = audit.to_string();
    assert!(!text.contains("nope") && !text.contains(ADMIN_PASSWORD), "a password reached the audit log");

    // The five refusals become one summary entry (written when the lock ends, or at shutdown).
    let mut d = d;
    let dir = d.dir.clone();
    d.stop();
    let d = Daemon::start_in(dir, Default::default());
    let audit = d.cli_json(&["audit.query", r#"[["event_data.description","^","Refused login attempts"]]"#]);
    let rows = audit.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["username"], "admin");
    assert_eq!(rows[0]["address"], "127.0.0.1");
    assert!(rows[0]["event_data"]["error"]
        .as_str()
        .unwrap()
        .starts_with("5 login attempts for user admin from 127.0.0.1"));
}

#[tokio::test]
async fn state_changes_are_audited_without_secrets() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let k = a.call("api_key.create", json!([{"name": "audited", "username": "admin"}])).await;
    let key = k["key"].as_str().unwrap();
    let secret = key.split_once('-').unwrap().1;
    let _ = a.err("api_key.create", json!([{"name": "audited", "username": "admin"}])).await;
    let entries = a.call("audit.query", json!([[["event", "=", "METHOD_CALL"]], {"order_by": ["audit_id"]}])).await;
    let e = entries.as_array().unwrap();
    let created: Vec<_> = e.iter().filter(|x| x["event_data"]["method"] == "api_key.create").collect();
    assert_eq!(created.len(), 2);
    assert_eq!(created[0]["success"], true);
    assert_eq!(created[0]["event_data"]["description"], "Create API key: audited");
    assert_eq!(created[0]["username"], "admin");
    assert_eq!(created[1]["success"], false);
    assert!(!entries.to_string().contains(secret));
    // TrueNAS's dict form of audit.query works too.
    let n = a.call("audit.query", json!([{"services": ["MIDDLEWARE"], "query-filters": [["event", "=", "AUTHENTICATION"]], "query-options": {"count": true}}])).await;
    assert!(n.as_i64().unwrap() >= 1);
}

/// Sessions check their account from memory (a generation the store bumps on
/// every account change), yet a demotion, a lock or a deletion still takes
/// effect on the very next call of a session that is already logged in.
#[tokio::test]
async fn account_changes_reach_open_sessions_on_their_next_call() {
    let d = Daemon::start();
    let mut a = d.admin().await;
    let u = a
        .call(
            "user.create",
            json!([{"username": "daemon", "full_name": "", "password": "pw-for-daemon-1", "roles": ["FULL_ADMIN"]}]),
        )
        .await;
    let mut s = d.client().await;
    s.login("daemon", "pw-for-daemon-1").await;
    // Many calls on an unchanged account: no store read is needed, all work.
    for i in 0..50 {
        s.call("api_key.create", json!([{"name": format!("k{i}"), "username": "daemon"}])).await;
    }
    a.call("user.update", json!([u["id"], {"roles": ["READONLY_ADMIN"]}])).await;
    assert_call_error(&s.err("api_key.create", json!([{"name": "late", "username": "daemon"}])).await, "EACCES", "");
    assert_eq!(s.call("auth.me", json!([])).await["privilege"]["roles"]["$set"], json!(["READONLY_ADMIN"]));
    a.call("user.update", json!([u["id"], {"roles": ["FULL_ADMIN"]}])).await;
    s.call("api_key.create", json!([{"name": "again", "username": "daemon"}])).await;
    a.call("user.update", json!([u["id"], {"locked": true}])).await;
    assert_eq!(s.err("auth.me", json!([])).await["data"]["error"], 207, "a locked account's session lived on");
    // Deleted: another logged-in session of it ends too.
    a.call("user.update", json!([u["id"], {"locked": false}])).await;
    let mut t = d.client().await;
    t.login("daemon", "pw-for-daemon-1").await;
    t.call("auth.me", json!([])).await;
    a.call("user.delete", json!([u["id"]])).await;
    assert_eq!(t.err("auth.me", json!([])).await["data"]["error"], 207, "a deleted account's session lived on");
}
