//! The audit log: one entry per login failure or success, per state change made
//! through the API, per private-key download and per pairing — who, from where,
//! when, which method, on what, and whether it worked. Never a secret: entries
//! are built from method names and target names, never from parameters — the
//! one parameter kept is the new `options` text of an `ssh.update`, which is
//! sshd configuration (it can run programs), not a secret.

use serde_json::{json, Value};

use super::auth::Session;
use super::App;
use keyhaven_store::AuditEntry;

pub struct AuditEvent {
    pub event: &'static str,
    pub method: Option<String>,
    pub description: String,
    pub username: Option<String>,
    pub success: bool,
    pub error: Option<String>,
}

impl AuditEvent {
    pub fn login(username: Option<&str>, mechanism: &str, success: bool, error: Option<String>) -> Self {
        AuditEvent {
            event: "AUTHENTICATION",
            method: Some("auth.login_ex".into()),
            description: format!("Authentication attempt ({mechanism})"),
            username: username.map(str::to_string),
            success,
            error,
        }
    }

    pub fn method(
        method: &str,
        description: &str,
        username: Option<&str>,
        success: bool,
        error: Option<String>,
    ) -> Self {
        AuditEvent {
            event: "METHOD_CALL",
            method: Some(method.to_string()),
            description: description.to_string(),
            username: username.map(str::to_string),
            success,
            error,
        }
    }
}

/// Write an entry. A failure to audit is logged, never hidden and never fatal
/// to the request (the action already happened).
pub fn record(app: &App, session: &Session, ev: AuditEvent) {
    let entry = AuditEntry {
        username: ev.username.or_else(|| session.username()),
        address: Some(session.address.clone()),
        service: "MIDDLEWARE".into(),
        method: ev.method,
        event: ev.event.to_string(),
        target: Some(ev.description),
        success: ev.success,
        error: ev.error,
    };
    if let Err(e) = app.store.audit_insert(&entry) {
        tracing::error!("could not write audit entry: {e}");
    }
}

/// All entries in TrueNAS's `audit.query` shape.
pub fn entries(app: &App) -> Result<Vec<Value>, crate::error::ServiceError> {
    Ok(app
        .store
        .audit_list()?
        .into_iter()
        .map(|r| {
            let e = r.entry;
            json!({
                "audit_id": r.id,
                "message_timestamp": r.ts as i64,
                "timestamp": {"$date": (r.ts * 1000.0) as i64},
                "address": e.address,
                "username": e.username,
                "session": null,
                "service": e.service,
                "service_data": {},
                "event": e.event,
                "event_data": {"method": e.method, "description": e.target, "error": e.error},
                "success": e.success,
            })
        })
        .collect())
}
