//! `ssh.*`: the SSH service configuration (reference §4.1). An accepted
//! change of `options` is audited with its new text (see
//! [`options_change_description`]).

use std::sync::Arc;

use serde_json::Value;

use super::{to_json, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;
use keyhaven_core::sshd_config::SshSettings;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("ssh.config", Read, config, 0),
        method!("ssh.update", Write, update, 1),
        method!("ssh.bindiface_choices", Read, bindiface_choices, 0),
    ]
}

async fn config(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    to_json(&ctx.app.sshd().config().await?)
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
    ctx.describe("Update SSH configuration");
    let patch: serde_json::Map<String, Value> = p.req(0, S)?;
    for k in patch.keys() {
        if !FIELDS.contains(&k.as_str()) {
            return Err(ServiceError::field(format!("{S}.{k}"), "Extra inputs are not permitted"));
        }
    }
    // A partial update: merged over the current settings, then decoded
    // strictly (the port's range first, then every type, as TrueNAS reports them).
    let mut merged =
        serde_json::to_value(ctx.app.sshd().settings()?).map_err(|e| ServiceError::internal("ssh.update", e))?;
    for (k, v) in patch {
        merged[k] = v;
    }
    if let Some(port) = merged.get("tcpport").and_then(Value::as_i64) {
        keyhaven_core::net::Port::new(port).map_err(|m| ServiceError::field(format!("{S}.tcpport"), m))?;
    }
    let new: SshSettings = super::params::decode(merged, S)?;
    let options = new.options.clone();
    let updated = ctx.app.sshd().update(new).await.map_err(|e| e.in_schema(S))?;
    if updated.previous_options != options {
        ctx.describe(options_change_description(&options));
    }
    to_json(&updated.entry)
}

/// Longest `options` text kept in an audit entry; a longer one is cut (on a
/// character boundary) and the entry says so.
const AUDITED_OPTIONS_MAX: usize = 8 * 1024;

/// The audit description of an accepted `options` change: the new text is
/// kept because options can make sshd run programs or send files, and they
/// are not secrets.
fn options_change_description(options: &str) -> String {
    if options.trim().is_empty() {
        return "Update SSH configuration: auxiliary parameters (options) cleared".to_string();
    }
    let mut cut = options.len().min(AUDITED_OPTIONS_MAX);
    while !options.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut d = format!("Update SSH configuration: auxiliary parameters (options) set to:\n{}", &options[..cut]);
    if cut < options.len() {
        d.push_str(&format!("\n[truncated: the first {cut} of {} bytes are shown]", options.len()));
    }
    d
}

async fn bindiface_choices(_: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    let mut m = serde_json::Map::new();
    for i in crate::service::sshd::interfaces() {
        m.insert(i.clone(), Value::String(i));
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_changes_are_described_with_their_text_and_capped() {
        assert_eq!(
            options_change_description("MaxAuthTries 4\n"),
            "Update SSH configuration: auxiliary parameters (options) set to:\nMaxAuthTries 4\n"
        );
        assert_eq!(
            options_change_description(" \n"),
            "Update SSH configuration: auxiliary parameters (options) cleared"
        );
        // 3-byte characters: the cut falls inside one and moves back to a boundary.
        let long = "€".repeat(AUDITED_OPTIONS_MAX);
        let d = options_change_description(&long);
        assert!(d.ends_with(&format!("[truncated: the first 8190 of {} bytes are shown]", long.len())), "{d}");
        assert!(d.len() < AUDITED_OPTIONS_MAX + 200);
        let exact = "x".repeat(AUDITED_OPTIONS_MAX);
        assert!(!options_change_description(&exact).contains("truncated"));
    }
}
