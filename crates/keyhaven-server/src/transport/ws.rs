//! WebSocket connections in both dialects: JSON-RPC 2.0 at `/api/current` and
//! TrueNAS's legacy DDP-style protocol at `/websocket`. Both enforce the same
//! limits (8 KiB messages before login, 64 KiB after, at most
//! [`MAX_CONCURRENT_CALLS`] calls in flight per connection) and dispatch
//! through [`crate::api::dispatch`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::wire::{self, INVALID_REQUEST, PARSE_ERROR, TOO_MANY_CONCURRENT};
use crate::api::{dispatch, CallFailure};
use crate::service::auth::Session;
use crate::service::App;

pub const MAX_MESSAGE_AFTER_AUTH: usize = 64 * 1024;
pub const MAX_MESSAGE_BEFORE_AUTH: usize = 8 * 1024;
pub const MAX_CONCURRENT_CALLS: usize = 20;

pub use crate::remote::Dialect;

enum Incoming {
    Call { id: Option<Value>, method: String, params: Vec<Value> },
    Reply(Value),
    Ignore,
}

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
                        "error": 22, "errname": "EINVAL", "type": null, "reason": "[EINVAL] method must be a non-empty string",
                        "trace": null, "extra": null}}))
                }
            };
            let params = match m.remove("params") {
                None | Some(Value::Null) => vec![],
                Some(Value::Array(a)) => a,
                Some(_) => {
                    return Incoming::Reply(json!({"msg": "result", "id": id, "error": {
                        "error": 22, "errname": "EINVAL", "type": null, "reason": "[EINVAL] params must be a list",
                        "trace": null, "extra": null}}))
                }
            };
            Incoming::Call { id: Some(id), method, params }
        }
        "method" => Incoming::Reply(json!({"msg": "failed", "reason": "send {\"msg\": \"connect\"} first"})),
        // keyhaven publishes no events yet; like TrueNAS it confirms an
        // authorised subscription with `ready` (clients wait for it) and never
        // answers `unsub`.
        "sub" => {
            let id = m.remove("id").unwrap_or(Value::Null);
            if session.caller().is_some() {
                Incoming::Reply(json!({"msg": "ready", "subs": [id]}))
            } else {
                Incoming::Reply(json!({"msg": "result", "id": id, "error": {
                    "error": 13, "errname": "EACCES", "type": null, "reason": "Not authorized", "trace": null, "extra": null}}))
            }
        }
        "unsub" => Incoming::Ignore,
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

/// Serve one upgraded WebSocket until the client goes away.
pub async fn serve(app: Arc<App>, socket: WebSocket, peer: SocketAddr, dialect: Dialect) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let writer = tokio::spawn(async move {
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
    });
    let session = Arc::new(Session::new(peer.ip().to_string()));
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS));
    let mut connected = dialect == Dialect::JsonRpc;

    while let Some(Ok(msg)) = stream.next().await {
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
        let limit = if session.caller().is_some() { MAX_MESSAGE_AFTER_AUTH } else { MAX_MESSAGE_BEFORE_AUTH };
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
                                &format!("Maximum number of concurrent calls ({MAX_CONCURRENT_CALLS}) has exceeded"),
                            ),
                            Dialect::Legacy => json!({"msg": "result", "id": id, "error": {
                                "error": 16, "errname": "EBUSY", "type": null, "trace": null, "extra": null,
                                "reason": format!("[EBUSY] Maximum number of concurrent calls ({MAX_CONCURRENT_CALLS}) has exceeded")}}),
                        };
                        let _ = tx.send(Message::Text(reply.to_string().into())).await;
                    }
                    continue;
                };
                let app = app.clone();
                let session = session.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let out = dispatch(&app, &session, &method, params).await;
                    drop(permit);
                    if let Some(id) = id {
                        let reply = result_message(dialect, id, out);
                        let _ = tx.send(Message::Text(reply.to_string().into())).await;
                    }
                });
            }
        }
    }
    drop(tx);
    let _ = writer.await;
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
