//! The one mapping from [`ServiceError`] to the two wire dialects.

use serde_json::{json, Value};

use crate::api::CallFailure;
use crate::error::{ServiceError, EINVAL, ENOMETHOD};

pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const TOO_MANY_CONCURRENT: i64 = -32000;
pub const CALL_ERROR: i64 = -32001;

fn extra(e: &ServiceError) -> Value {
    match e {
        ServiceError::Validation(v) => {
            // An empty attribute is TrueNAS's `None` (e.g. InstanceNotFound).
            Value::Array(
                v.0.iter()
                    .map(|f| {
                        let attr = if f.attribute.is_empty() { Value::Null } else { json!(f.attribute) };
                        json!([attr, f.message, f.errno.code()])
                    })
                    .collect(),
            )
        }
        _ => Value::Null,
    }
}

fn reason(e: &ServiceError) -> String {
    match e {
        ServiceError::Validation(v) => {
            v.0.iter()
                .map(|f| {
                    if f.attribute.is_empty() {
                        format!("[{}] {}", f.errno.name(), f.message)
                    } else {
                        format!("[{}] {}: {}", f.errno.name(), f.attribute, f.message)
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        other => format!("[{}] {}", other.errno().name(), other),
    }
}

fn trace(e: &ServiceError) -> Value {
    let class = if matches!(e, ServiceError::Validation(_)) { "ValidationErrors" } else { "CallError" };
    json!({"class": class, "frame": [], "formatted": "", "repr": format!("{class}({:?})", e.to_string())})
}

/// JSON-RPC 2.0 `error` object for a failed call.
pub fn rpc_error(f: &CallFailure) -> Value {
    match f {
        CallFailure::NoMethod => json!({"code": METHOD_NOT_FOUND, "message": "Method does not exist"}),
        CallFailure::Failed(e) => {
            let (code, message) = match e {
                ServiceError::Validation(_) => (INVALID_PARAMS, "Invalid params"),
                _ => (CALL_ERROR, "Method call error"),
            };
            json!({
                "code": code,
                "message": message,
                "data": {
                    "error": if matches!(e, ServiceError::Validation(_)) { EINVAL.code() } else { e.errno().code() },
                    "errname": e.errno().name(),
                    "reason": reason(e),
                    "trace": trace(e),
                    "extra": extra(e),
                }
            })
        }
    }
}

/// Legacy (`/websocket`) `error` object for a failed call.
pub fn legacy_error(f: &CallFailure) -> Value {
    match f {
        CallFailure::NoMethod => json!({
            "error": ENOMETHOD.code(), "errname": ENOMETHOD.name(), "type": null,
            "reason": "[ENOMETHOD] Method does not exist", "trace": null, "extra": null
        }),
        CallFailure::Failed(e) => json!({
            "error": e.errno().code(),
            "errname": e.errno().name(),
            "type": if matches!(e, ServiceError::Validation(_)) { json!("VALIDATION") } else { Value::Null },
            "reason": reason(e),
            "trace": trace(e),
            "extra": extra(e),
        }),
    }
}
