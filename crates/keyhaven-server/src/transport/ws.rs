//! WebSocket connections in both dialects: JSON-RPC 2.0 at `/api/current` and
//! TrueNAS's legacy DDP-style protocol at `/websocket`. Both enforce the same
//! limits (8 KiB messages before login, 64 KiB after, at most
//! [`MAX_CONCURRENT_CALLS`] calls in flight per connection) and dispatch
//! through [`crate::api::dispatch`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::wire::{self, INVALID_REQUEST, PARSE_ERROR, TOO_MANY_CONCURRENT};
use crate::api::{dispatch, CallFailure};
use crate::error::{EACCES, EBUSY, EINVAL};
use crate::service::auth::Session;
use crate::service::App;

pub const MAX_MESSAGE_AFTER_AUTH: usize = 64 * 1024;
pub const MAX_MESSAGE_BEFORE_AUTH: usize = 8 * 1024;
pub const MAX_CONCURRENT_CALLS: usize = 20;

pub use crate::remote::Dialect;

enum Incoming {
    Call {
        id: Option<Value>,
        method: String,
        params: Vec<Value>,
    },
    Reply(Value),
    /// Legacy `sub` (already authorised).
    Subscribe {
        id: Value,
        name: String,
    },
    /// Legacy `unsub`.
    Unsubscribe {
        id: Value,
    },
    Ignore,
}

/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 32;

fn rpc_err(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id})
}

/// Parse one JSON-RPC 2.0 request (reference §5.2).
fn parse_jsonrpc(text: &str) -> Incoming {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Incoming::Reply(rpc_err(Value::Null, PARSE_ERROR, &format!("Parse error: {e}"))),
    };
    let Value::Object(mut m) = v else {
        return Incoming::Reply(rpc_err(Value::Null, INVALID_REQUEST, "Invalid request: expected a JSON object"));
    };
    let has_id = m.contains_key("id");
    let id = m.remove("id").unwrap_or(Value::Null);
    if !matches!(id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Incoming::Reply(rpc_err(
            Value::Null,
            INVALID_REQUEST,
            "Invalid request: id must be null, a number or a string",
        ));
    }
    if m.get("jsonrpc") != Some(&json!("2.0")) {
        return Incoming::Reply(rpc_err(id, INVALID_REQUEST, "Invalid request: jsonrpc must be \"2.0\""));
    }
    let method = match m.remove("method") {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => {
            return Incoming::Reply(rpc_err(id, INVALID_REQUEST, "Invalid request: method must be a non-empty string"))
        }
    };
    let params = match m.remove("params") {
        None | Some(Value::Null) => vec![],
        Some(Value::Array(a)) => a,
        Some(_) => return Incoming::Reply(rpc_err(id, INVALID_REQUEST, "Invalid request: params must be an array")),
    };
    Incoming::Call { id: has_id.then_some(id), method, params }
}

/// Parse one legacy message.
fn parse_legacy(text: &str, connected: &mut bool, session: &Session) -> Incoming {
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(text) else {
        return Incoming::Reply(json!({"msg": "failed", "reason": "invalid JSON"}));
    };
    let msg = m.get("msg").and_then(Value::as_str).unwrap_or("").to_string();
    match msg.as_str() {
        "connect" => {
            *connected = true;
            Incoming::Reply(json!({"msg": "connected", "session": session.id}))
        }
        "ping" => {
            let mut r = json!({"msg": "pong"});
            if let Some(id) = m.remove("id") {
                r["id"] = id;
            }
            Incoming::Reply(r)
        }
        "method" if *connected => {
            let id = m.remove("id").unwrap_or(Value::Null);
            let method = match m.remove("method") {
                Some(Value::String(s)) if !s.is_empty() => s,
                _ => {
                    return Incoming::Reply(json!({"msg": "result", "id": id, "error": {
                        "error": EINVAL.code(), "errname": EINVAL.name(), "type": null, "reason": "[EINVAL] method must be a non-empty string",
                        "trace": null, "extra": null}}))
                }
            };
            let params = match m.remove("params") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a,
                Some(_) => {
                    return Incoming::Reply(json!({"msg": "result", "id": id, "error": {
                        "error": EINVAL.code(), "errname": EINVAL.name(), "type": null, "reason": "[EINVAL] params must be a list",
                        "trace": null, "extra": null}}))
                }
            };
            Incoming::Call { id: Some(id), method, params }
        }
        "method" => Incoming::Reply(json!({"msg": "failed", "reason": "send {\"msg\": \"connect\"} first"})),
        // Like TrueNAS: an authorised subscription is confirmed with `ready`
        // (clients wait for it); `unsub` gets no answer.
        "sub" => {
            let id = m.remove("id").unwrap_or(Value::Null);
            match (session.caller(), m.remove("name")) {
                (Some(_), Some(Value::String(name))) if !name.is_empty() => Incoming::Subscribe { id, name },
                (Some(_), _) => Incoming::Reply(json!({"msg": "nosub", "id": id, "error": {
                    "error": EINVAL.code(), "errname": EINVAL.name(), "type": null, "reason": "[EINVAL] name must be a non-empty string", "trace": null, "extra": null}})),
                (None, _) => Incoming::Reply(json!({"msg": "result", "id": id, "error": {
                    "error": EACCES.code(), "errname": EACCES.name(), "type": null, "reason": "Not authorized", "trace": null, "extra": null}})),
            }
        }
        "unsub" => Incoming::Unsubscribe { id: m.remove("id").unwrap_or(Value::Null) },
        _ => Incoming::Ignore,
    }
}

fn result_message(dialect: Dialect, id: Value, out: Result<Value, CallFailure>) -> Value {
    match (dialect, out) {
        (Dialect::JsonRpc, Ok(v)) => json!({"jsonrpc": "2.0", "result": v, "id": id}),
        (Dialect::JsonRpc, Err(f)) => json!({"jsonrpc": "2.0", "error": wire::rpc_error(&f), "id": id}),
        (Dialect::Legacy, Ok(v)) => json!({"msg": "result", "id": id, "result": v}),
        (Dialect::Legacy, Err(f)) => json!({"msg": "result", "id": id, "error": wire::legacy_error(&f)}),
    }
}

/// Forward the events of `name` to this connection while its session may see them.
fn forward_events(
    app: &Arc<App>,
    session: Arc<Session>,
    tx: mpsc::Sender<Message>,
    dialect: Dialect,
    name: String,
) -> tokio::task::JoinHandle<()> {
    let mut rx = app.events.subscribe();
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            // Ends with the connection even when no event comes.
            let next = tokio::select! {
                _ = tx.closed() => break,
                r = rx.recv() => r,
            };
            match next {
                Ok(e) if e.collection == name && app.auth().may_receive_events(&session) => {
                    let m = match dialect {
                        Dialect::JsonRpc => {
                            json!({"jsonrpc": "2.0", "method": "collection_update", "params": e.body()})
                        }
                        Dialect::Legacy => e.body(),
                    };
                    if tx.send(Message::Text(m.to_string().into())).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "a slow subscriber missed events");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}

/// The connection's subscriptions: id → (collection, forwarder).
#[derive(Default)]
struct Subscriptions(std::collections::HashMap<String, (String, Option<tokio::task::JoinHandle<()>>)>);

/// A subscription refused because the connection holds the most it may.
#[derive(Debug, thiserror::Error)]
#[error("at most {max} subscriptions per connection", max = MAX_SUBSCRIPTIONS)]
struct TooManySubscriptions;

impl Subscriptions {
    /// Start one, unless the connection holds too many.
    fn add(
        &mut self,
        key: String,
        name: String,
        start: impl FnOnce() -> tokio::task::JoinHandle<()>,
    ) -> Result<(), TooManySubscriptions> {
        if self.0.len() >= MAX_SUBSCRIPTIONS && !self.0.contains_key(&key) {
            return Err(TooManySubscriptions);
        }
        // Collections keyhaven does not publish are acknowledged without a forwarder.
        let task = crate::service::events::COLLECTIONS.contains(&name.as_str()).then(start);
        if let Some((_, Some(old))) = self.0.insert(key, (name, task)) {
            old.abort();
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, Some(task))) = self.0.remove(key) {
            task.abort();
        }
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for (_, (_, task)) in self.0.drain() {
            if let Some(t) = task {
                t.abort();
            }
        }
    }
}

/// A legacy subscription's key: its id in JSON form, so `1` and `"1"` differ.
fn sub_key(id: &Value) -> String {
    id.to_string()
}

/// Aborts a task when dropped (a writer stuck on a peer that stopped reading).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when a connection that has not logged in has been silent for
/// `timeout` (its last message is in `last`).
async fn login_watchdog(session: &Session, last: &std::sync::Mutex<Instant>, timeout: Duration) {
    loop {
        let since = last.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
        if !session.is_authenticated() && since >= timeout {
            return;
        }
        tokio::time::sleep(timeout.saturating_sub(since).max(Duration::from_millis(100))).await;
    }
}

/// Serve one upgraded WebSocket until the client goes away. `ticket` is the
/// connection's place in the edge's registry ([`super::limits`]), held until
/// the socket closes and marked authenticated while the session is logged in.
/// A connection that has not logged in is closed after the login timeout of
/// silence, and any connection when the registry evicts it — even one whose
/// peer stopped reading.
pub async fn serve(
    app: Arc<App>,
    socket: WebSocket,
    peer: SocketAddr,
    dialect: Dialect,
    ticket: Option<Arc<super::limits::ConnTicket>>,
) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.feed(m).await.is_err() {
                break;
            }
            // Flush once the queue is drained: batches replies under load.
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    }));
    let session = Arc::new(Session::new(peer.ip().to_string()));
    let conn_state = ticket.as_ref().map(|t| t.state.clone());
    let login_timeout = app.config.login_timeout;
    let last_message = std::sync::Mutex::new(Instant::now());

    let read_loop = async {
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS));
        let mut connected = dialect == Dialect::JsonRpc;
        let mut subs = Subscriptions::default();
        while let Some(Ok(msg)) = stream.next().await {
            *last_message.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            if let Some(s) = &conn_state {
                s.mark_authenticated(session.is_authenticated());
            }
            let text = match msg {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    let _ = tx
                        .send(Message::Close(Some(CloseFrame {
                            code: 1003,
                            reason: "binary frames are not accepted".into(),
                        })))
                        .await;
                    break;
                }
                Message::Close(_) => break,
                _ => continue,
            };
            let limit = if session.is_authenticated() { MAX_MESSAGE_AFTER_AUTH } else { MAX_MESSAGE_BEFORE_AUTH };
            if text.len() > limit {
                tracing::info!(peer = %peer, size = text.len(), limit, "closing connection: message too large");
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: 1009,
                        reason: format!("message larger than {limit} bytes").into(),
                    })))
                    .await;
                break;
            }
            let incoming = match dialect {
                Dialect::JsonRpc => parse_jsonrpc(&text),
                Dialect::Legacy => parse_legacy(&text, &mut connected, &session),
            };
            match incoming {
                Incoming::Ignore => {}
                Incoming::Reply(v) => {
                    if tx.send(Message::Text(v.to_string().into())).await.is_err() {
                        break;
                    }
                }
                Incoming::Subscribe { id, .. } if app.auth().current_caller(&session).is_err() => {
                    let reply = json!({"msg": "result", "id": id, "error": {
                            "error": EACCES.code(), "errname": EACCES.name(), "type": null, "reason": "Not authorized", "trace": null, "extra": null}});
                    if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                        break;
                    }
                }
                Incoming::Subscribe { id, name } => {
                    let reply = match subs.add(sub_key(&id), name.clone(), || {
                        forward_events(&app, session.clone(), tx.clone(), dialect, name)
                    }) {
                        Ok(()) => json!({"msg": "ready", "subs": [id]}),
                        Err(reason) => json!({"msg": "nosub", "id": id, "error": {
                                "error": EBUSY.code(), "errname": EBUSY.name(), "type": null, "reason": format!("[EBUSY] {reason}"), "trace": null, "extra": null}}),
                    };
                    if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                        break;
                    }
                }
                Incoming::Unsubscribe { id } => {
                    subs.remove(&sub_key(&id));
                }
                Incoming::Call { id, method, params }
                    if dialect == Dialect::JsonRpc && (method == "core.subscribe" || method == "core.unsubscribe") =>
                {
                    // Connection state, so answered here rather than through dispatch.
                    let out = subscription_call(&app, &session, &tx, &mut subs, &method, &params);
                    if let Some(id) = id {
                        let reply = result_message(dialect, id, out.map_err(CallFailure::Failed));
                        if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                            break;
                        }
                    }
                }
                Incoming::Call { id, method, params } => {
                    // A cheap public call is answered inline: no task, no permit.
                    if method == "core.ping" && params.is_empty() {
                        if let Some(id) = id {
                            let reply = result_message(dialect, id, Ok(json!("pong")));
                            if tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        if let Some(id) = id {
                            let reply = match dialect {
                                Dialect::JsonRpc => rpc_err(
                                    id,
                                    TOO_MANY_CONCURRENT,
                                    &format!(
                                        "Maximum number of concurrent calls ({MAX_CONCURRENT_CALLS}) has exceeded"
                                    ),
                                ),
                                Dialect::Legacy => json!({"msg": "result", "id": id, "error": {
                                        "error": EBUSY.code(), "errname": EBUSY.name(), "type": null, "trace": null, "extra": null,
                                        "reason": format!("[EBUSY] Maximum number of concurrent calls ({MAX_CONCURRENT_CALLS}) has exceeded")}}),
                            };
                            let _ = tx.send(Message::Text(reply.to_string().into())).await;
                        }
                        continue;
                    };
                    let app = app.clone();
                    let session = session.clone();
                    let tx = tx.clone();
                    let conn_state = conn_state.clone();
                    tokio::spawn(async move {
                        let out = dispatch(&app, &session, &method, params).await;
                        // A login protects the connection from eviction at once.
                        if let Some(s) = &conn_state {
                            s.mark_authenticated(session.is_authenticated());
                        }
                        drop(permit);
                        if let Some(id) = id {
                            let reply = result_message(dialect, id, out);
                            let _ = tx.send(Message::Text(reply.to_string().into())).await;
                        }
                    });
                }
            }
        }
        // Forwarders hold senders: stop them before waiting for the writer.
        drop(subs);
    };
    let evicted = async {
        match &conn_state {
            Some(s) => s.evicted().await,
            None => std::future::pending().await,
        }
    };
    let close = tokio::select! {
        _ = read_loop => None,
        _ = login_watchdog(&session, &last_message, login_timeout) => {
            tracing::debug!(%peer, "closing a WebSocket that did not log in");
            Some((1008, format!("log in within {} s of connecting or of your last message", login_timeout.as_secs())))
        }
        _ = evicted => Some((1013, "the server is at its connection limit; log in sooner after connecting".to_string())),
    };
    if let Some((code, reason)) = close {
        let _ = tx.try_send(Message::Close(Some(CloseFrame { code, reason: reason.into() })));
    }
    drop(tx);
    // Replies still being computed may hold senders for a while; a peer that
    // stopped reading may block the writer: give it a moment, then abort.
    let mut writer = writer;
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer.0).await;
    drop(ticket);
}

/// `core.subscribe(event)` → subscription id; `core.unsubscribe(id)`.
fn subscription_call(
    app: &Arc<App>,
    session: &Arc<Session>,
    tx: &mpsc::Sender<Message>,
    subs: &mut Subscriptions,
    method: &str,
    params: &[Value],
) -> Result<Value, crate::error::ServiceError> {
    use crate::error::ServiceError;
    app.auth().current_caller(session)?;
    let schema = method.replace('.', "_");
    let arg = match params {
        [Value::String(s)] if !s.is_empty() => s.clone(),
        [] => {
            return Err(ServiceError::field(
                format!("{schema}.{}", if method == "core.subscribe" { "event" } else { "id" }),
                "Field required",
            ))
        }
        [_] => {
            return Err(ServiceError::field(
                format!("{schema}.{}", if method == "core.subscribe" { "event" } else { "id" }),
                "Input should be a non-empty string",
            ))
        }
        _ => return Err(ServiceError::field(&schema, format!("{method} takes one argument"))),
    };
    if method == "core.unsubscribe" {
        subs.remove(&arg);
        return Ok(Value::Null);
    }
    let mut raw = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let key = hex::encode(raw);
    subs.add(key.clone(), arg.clone(), || forward_events(app, session.clone(), tx.clone(), Dialect::JsonRpc, arg))
        .map_err(|r| ServiceError::call(crate::error::EBUSY, r.to_string()))?;
    Ok(json!(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Value {
        match parse_jsonrpc(text) {
            Incoming::Reply(v) => v,
            _ => panic!("expected an error reply for {text}"),
        }
    }

    #[test]
    fn protocol_errors() {
        assert_eq!(reply("{").pointer("/error/code").unwrap(), PARSE_ERROR);
        assert_eq!(reply("[]").pointer("/error/code").unwrap(), INVALID_REQUEST);
        assert_eq!(reply(r#"{"jsonrpc":"1.0","method":"x","id":1}"#).pointer("/error/code").unwrap(), INVALID_REQUEST);
        assert_eq!(reply(r#"{"jsonrpc":"2.0","method":"","id":1}"#).pointer("/error/code").unwrap(), INVALID_REQUEST);
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","method":"x","params":{},"id":1}"#).pointer("/error/code").unwrap(),
            INVALID_REQUEST
        );
        assert_eq!(
            reply(r#"{"jsonrpc":"2.0","method":"x","id":[1]}"#).pointer("/error/code").unwrap(),
            INVALID_REQUEST
        );
        match parse_jsonrpc(r#"{"jsonrpc":"2.0","method":"core.ping"}"#) {
            Incoming::Call { id: None, .. } => {}
            _ => panic!("notification"),
        }
    }
}
