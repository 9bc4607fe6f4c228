//! `ssh.*`: the SSH service configuration (reference §4.1).

use std::sync::Arc;

use serde_json::Value;

use super::{Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use keyhaven_core::sshd_config::SshSettings;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("ssh.config", Read, config),
        method!("ssh.update", Write, update),
        method!("ssh.bindiface_choices", Read, bindiface_choices),
    ]
}

async fn config(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(0, "ssh.config")?;
    {
        // Host keys are made on first use; serialise with every other change.
        let _guard = ctx.app.ssh_lock.lock().await;
        ctx.app.ensure_host_keys().await?;
    }
    ctx.app.ssh_config_entry()
}

const FIELDS: &[&str] = &[
    "tcpport",
    "bindiface",
    "password_login_groups",
    "passwordauth",
    "kerberosauth",
    "tcpfwd",
    "compression",
    "sftp_log_level",
    "sftp_log_facility",
    "weak_ciphers",
    "options",
];

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "ssh_update";
    p.at_most(1, "ssh.update")?;
    ctx.describe("Update SSH configuration");
    let patch: serde_json::Map<String, Value> = p.req(0, S)?;
    for k in patch.keys() {
        if !FIELDS.contains(&k.as_str()) {
            return Err(ServiceError::field(format!("{S}.{k}"), "Extra inputs are not permitted"));
        }
    }
    // Merge over the current settings, then decode strictly (types, ranges).
    let mut merged =
        serde_json::to_value(ctx.app.ssh_settings()?).map_err(|e| ServiceError::internal("ssh.update", e))?;
    for (k, v) in patch {
        merged[k] = v;
    }
    if let Some(port) = merged.get("tcpport").and_then(Value::as_i64) {
        if !(1..=65535).contains(&port) {
            return Err(ServiceError::field(format!("{S}.tcpport"), "Input should be between 1 and 65535"));
        }
    }
    let new: SshSettings = super::params::decode(merged, S)?;
    ctx.app.ssh_update(new).await
}

async fn bindiface_choices(_: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    p.at_most(0, "ssh.bindiface_choices")?;
    let mut m = serde_json::Map::new();
    for i in crate::service::sshd::interfaces() {
        m.insert(i.clone(), Value::String(i));
    }
    Ok(Value::Object(m))
}
