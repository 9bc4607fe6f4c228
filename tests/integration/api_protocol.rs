//! JSON-RPC 2.0 at /api/current and the legacy dialect at /websocket.

use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

#[tokio::test]
async fn jsonrpc_protocol_errors_and_notifications() {
    let d = Daemon::start();
    let mut c = d.client().await;

    // core.ping is public.
    assert_eq!(c.call("core.ping", json!([])).await, "pong");

    c.send_text("{not json").await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["error"]["code"], -32700);
    assert_eq!(r["id"], serde_json::Value::Null);

    c.send_text(r#"{"jsonrpc":"2.0","method":"core.ping","params":{},"id":7}"#).await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["error"]["code"], -32600);
    assert_eq!(r["id"], 7);

    c.send_text(r#"{"jsonrpc":"1.0","method":"core.ping","id":8}"#).await;
    assert_eq!(c.recv().await.unwrap()["error"]["code"], -32600);

    let e = c.err("no.such_method", json!([])).await;
    assert_eq!(e["code"], -32601);
    assert_eq!(e["message"], "Method does not exist");

    // Notifications (no id) get no reply, but are executed.
    c.send_text(r#"{"jsonrpc":"2.0","method":"core.ping"}"#).await;
    c.send_text(r#"{"jsonrpc":"2.0","method":"auth.login_ex","params":[{"mechanism":"PASSWORD_PLAIN","username":"admin","password":"correct horse battery staple"}]}"#).await;
    assert!(c.silent_for(Duration::from_millis(800)).await, "a notification must not be answered");
    // The notified login took effect on this connection.
    assert_eq!(c.call("auth.me", json!([])).await["pw_name"], "admin");

    // String ids are echoed.
    c.send_text(r#"{"jsonrpc":"2.0","method":"core.ping","id":"abc"}"#).await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["id"], "abc");
    assert_eq!(r["result"], "pong");
}

#[tokio::test]
async fn not_authenticated_before_login() {
    let d = Daemon::start();
    let mut c = d.client().await;
    for m in ["auth.me", "api_key.query", "audit.query", "core.get_jobs", "auth.generate_token", "api_key.create"] {
        let e = c.err(m, json!([])).await;
        assert_eq!(e["code"], -32001, "{m}: {e}");
        assert_eq!(e["data"]["error"], 207, "{m}");
        assert_eq!(e["data"]["errname"], "ENOTAUTHENTICATED");
        assert_eq!(e["data"]["reason"], "[ENOTAUTHENTICATED] Not authenticated");
    }
    assert_eq!(
        c.call("auth.mechanism_choices", json!([])).await,
        json!(["PASSWORD_PLAIN", "API_KEY_PLAIN", "TOKEN_PLAIN", "OTP_TOKEN"])
    );
}

#[tokio::test]
async fn message_size_caps() {
    let d = Daemon::start();
    // Before login: more than 8 KiB closes the connection.
    let mut c = d.client().await;
    let big = "x".repeat(9 * 1024);
    c.send_text(&json!({"jsonrpc":"2.0","id":1,"method":"core.ping","params":[big]}).to_string()).await;
    assert!(c.recv().await.is_none(), "connection must close");

    // After login: 9 KiB is fine (a validation error, not a close), 70 KiB closes.
    let mut c = d.admin().await;
    let e = c.err("api_key.create", json!([{"name": "x".repeat(9 * 1024), "username": "admin"}])).await;
    assert_field(&e, "api_key_create.name", "at most 1024 characters");
    let huge = "y".repeat(70 * 1024);
    c.send_text(&json!({"jsonrpc":"2.0","id":2,"method":"core.ping","params":[huge]}).to_string()).await;
    assert!(c.recv().await.is_none(), "connection must close above 64 KiB");
}

#[tokio::test]
async fn per_connection_concurrency_cap() {
    let d = Daemon::start();
    let mut c = d.admin().await;
    // 40 password changes at once: each takes an Argon2 hash (a few run at
    // once, the rest queue), so many are in flight together and the cap (20)
    // answers the rest with -32000. (Logins no longer serve here: a
    // connection checks one at a time.)
    let admin = c.call("user.query", json!([[["username", "=", "admin"]], {"get": true}])).await["id"].clone();
    for i in 0..40 {
        c.send_text(
            &json!({"jsonrpc":"2.0","id": 1000 + i,"method":"user.update",
                    "params":[admin, {"password": ADMIN_PASSWORD}]})
            .to_string(),
        )
        .await;
    }
    let mut capped = 0;
    let mut ok = 0;
    for _ in 0..40 {
        let r = c.recv().await.unwrap();
        if r["error"]["code"] == -32000 {
            assert!(r["error"]["message"].as_str().unwrap().contains("Maximum number of concurrent calls (20)"));
            capped += 1;
        } else {
            assert_eq!(r["result"]["username"], "admin", "{r}");
            ok += 1;
        }
    }
    assert!(capped > 0, "the cap never triggered");
    assert!(ok >= 20, "at least the first 20 run");
}

#[tokio::test]
async fn legacy_dialect() {
    let d = Daemon::start();
    let mut c = Client::connect(&d.ws_url("/websocket")).await;
    c.send_text(r#"{"msg":"method","id":"1","method":"core.ping","params":[]}"#).await;
    assert_eq!(c.recv().await.unwrap()["msg"], "failed", "method before connect");
    c.send_text(r#"{"msg":"connect","version":"1","support":["1"]}"#).await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["msg"], "connected");
    assert!(r["session"].is_string());
    c.send_text(r#"{"msg":"method","id":"2","method":"core.ping","params":[]}"#).await;
    assert_eq!(c.recv().await.unwrap(), json!({"msg":"result","id":"2","result":"pong"}));
    c.send_text(r#"{"msg":"method","id":"3","method":"auth.me","params":[]}"#).await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["error"]["error"], 207);
    assert_eq!(r["error"]["errname"], "ENOTAUTHENTICATED");
    assert!(r["error"].get("trace").is_some() && r["error"].get("extra").is_some() && r["error"].get("type").is_some());
    c.send_text(&json!({"msg":"method","id":"4","method":"auth.login","params":["admin", ADMIN_PASSWORD]}).to_string())
        .await;
    assert_eq!(c.recv().await.unwrap()["result"], true);
    c.send_text(r#"{"msg":"method","id":"5","method":"api_key.create","params":[{"name": 5, "username": "admin"}]}"#)
        .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["error"]["type"], "VALIDATION");
    assert_eq!(r["error"]["extra"][0][0], "api_key_create.name");
    c.send_text(r#"{"msg":"method","id":"6","method":"nope.nope","params":[]}"#).await;
    assert_eq!(c.recv().await.unwrap()["error"]["error"], 201);
    c.send_text(r#"{"msg":"ping","id":"p"}"#).await;
    assert_eq!(c.recv().await.unwrap(), json!({"msg":"pong","id":"p"}));
}

/// Read messages until the reply to `id` and a finished `core.get_jobs` event
/// for the job it returns have both arrived; returns (reply, events in order).
async fn job_reply_and_events(c: &mut Client, id: &str, legacy: bool) -> (Value, Vec<Value>) {
    let mut reply = None;
    let mut events = Vec::new();
    loop {
        let m = c.recv().await.expect("connection closed");
        if m["id"] == json!(id) && (m.get("result").is_some() || m.get("error").is_some()) {
            reply = Some(m);
        } else {
            let e = if legacy { m.clone() } else { m["params"].clone() };
            if !legacy {
                assert_eq!(m["method"], "collection_update", "{m}");
                assert!(m.get("id").is_none(), "a notification has no id: {m}");
            }
            events.push(e);
        }
        if let Some(r) = &reply {
            let job = r["result"].clone();
            let done = events.iter().any(|e| e["id"] == job && e["fields"]["state"] != "RUNNING");
            if done {
                let mine = events.into_iter().filter(|e| e["id"] == job).collect();
                return (r.clone(), mine);
            }
        }
    }
}

fn assert_job_events(events: &[Value], job: &Value) {
    assert!(events.len() >= 2, "{events:?}");
    for e in events {
        assert_eq!(e["collection"], "core.get_jobs", "{e}");
        assert_eq!(e["fields"]["id"], *job, "{e}");
        assert_eq!(e["fields"]["method"], "service.control", "{e}");
    }
    assert_eq!(events[0]["msg"], "added");
    assert_eq!(events[0]["fields"]["state"], "RUNNING");
    let last = events.last().unwrap();
    assert_eq!(last["msg"], "changed");
    assert_eq!(last["fields"]["state"], "SUCCESS", "{last}");
    assert_eq!(last["fields"]["progress"]["percent"], 100.0);
}

/// `core.subscribe("core.get_jobs")` (JSON-RPC `collection_update`
/// notifications) and the legacy `sub`: a job's life arrives as events;
/// after unsubscribing nothing does.
#[tokio::test]
async fn job_events_reach_subscribers_in_both_dialects() {
    let d = Daemon::start();
    let mut c = d.client().await;
    assert_call_error(&c.err("core.subscribe", json!(["core.get_jobs"])).await, "ENOTAUTHENTICATED", "");
    c.login("admin", ADMIN_PASSWORD).await;
    assert_field(&c.err("core.subscribe", json!([])).await, "core_subscribe.event", "Field required");
    assert_field(&c.err("core.subscribe", json!([5])).await, "core_subscribe.event", "non-empty string");
    let sub = c.call("core.subscribe", json!(["core.get_jobs"])).await;
    assert!(sub.as_str().is_some_and(|s| !s.is_empty()), "{sub}");
    // A collection keyhaven does not publish is acknowledged and stays quiet.
    let quiet = c.call("core.subscribe", json!(["pool.query"])).await;
    assert!(quiet.is_string());
    let start = json!({"jsonrpc": "2.0", "id": "job-1", "method": "service.control", "params": ["STOP", "ssh"]});
    c.send_text(&start.to_string()).await;
    let (reply, events) = job_reply_and_events(&mut c, "job-1", false).await;
    assert_job_events(&events, &reply["result"]);
    assert_eq!(c.call("core.unsubscribe", json!([sub])).await, Value::Null);
    c.send_text(
        &json!({"jsonrpc": "2.0", "id": "job-2", "method": "service.control", "params": ["STOP", "ssh"]}).to_string(),
    )
    .await;
    let r = c.recv().await.unwrap();
    assert_eq!(r["id"], "job-2", "an event after unsubscribing: {r}");
    assert!(c.silent_for(Duration::from_millis(700)).await, "events after unsubscribing");
    // A subscriber whose account is locked gets nothing more, although it makes no call.
    let mut a = d.admin().await;
    a.call(
        "user.create",
        json!([{"username": "daemon", "full_name": "", "password": "ro-password-1", "roles": ["READONLY_ADMIN"]}]),
    )
    .await;
    let mut ro = d.client().await;
    ro.login("daemon", "ro-password-1").await;
    ro.call("core.subscribe", json!(["core.get_jobs"])).await;
    let job = a.call("service.control", json!(["STOP", "ssh"])).await;
    let seen = ro.recv().await.unwrap();
    assert_eq!((seen["params"]["collection"].clone(), seen["params"]["id"].clone()), (json!("core.get_jobs"), job));
    let uid = a.call("user.query", json!([[["username", "=", "daemon"]], {"get": true}])).await["id"].clone();
    a.call("user.update", json!([uid, {"locked": true}])).await;
    while !ro.silent_for(Duration::from_millis(300)).await {}
    a.call("service.control", json!(["STOP", "ssh"])).await;
    assert!(ro.silent_for(Duration::from_millis(700)).await, "a locked account still receives events");

    // Over the local socket (no connection to push to) the method says where it works.
    let o = d.call_cli(&["core.subscribe", "core.get_jobs"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("WebSocket"), "{}", String::from_utf8_lossy(&o.stderr));

    // The legacy dialect: sub → ready, events as DDP messages, unsub.
    let mut l = Client::connect(&d.ws_url("/websocket")).await;
    l.send_text(r#"{"msg":"connect","version":"1","support":["1"]}"#).await;
    assert_eq!(l.recv().await.unwrap()["msg"], "connected");
    l.send_text(r#"{"msg":"sub","id":"s0","name":"core.get_jobs"}"#).await;
    assert_eq!(l.recv().await.unwrap()["error"]["errname"], "EACCES", "sub before login");
    l.send_text(&json!({"msg":"method","id":"1","method":"auth.login","params":["admin", ADMIN_PASSWORD]}).to_string())
        .await;
    assert_eq!(l.recv().await.unwrap()["result"], true);
    l.send_text(r#"{"msg":"sub","id":"s1","name":"core.get_jobs"}"#).await;
    assert_eq!(l.recv().await.unwrap(), json!({"msg": "ready", "subs": ["s1"]}));
    // Ids 1 and "1" are different subscriptions: unsubscribing one keeps the other.
    l.send_text(r#"{"msg":"sub","id":1,"name":"core.get_jobs"}"#).await;
    assert_eq!(l.recv().await.unwrap(), json!({"msg": "ready", "subs": [1]}));
    l.send_text(r#"{"msg":"unsub","id":"1"}"#).await;
    l.send_text(r#"{"msg":"unsub","id":1}"#).await;
    l.send_text(r#"{"msg":"method","id":"2","method":"service.control","params":["STOP","ssh"]}"#).await;
    let (reply, events) = job_reply_and_events(&mut l, "2", true).await;
    assert_job_events(&events, &reply["result"]);
    l.send_text(r#"{"msg":"unsub","id":"s1"}"#).await;
    l.send_text(r#"{"msg":"method","id":"3","method":"service.control","params":["STOP","ssh"]}"#).await;
    assert_eq!(l.recv().await.unwrap()["id"], "3");
    assert!(l.silent_for(Duration::from_millis(700)).await, "legacy events after unsub");
}
