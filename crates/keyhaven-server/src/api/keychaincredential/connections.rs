//! Checking SSH connections: host-key scans, connection tests and their last results.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScanIn {
    host: Str,
    #[serde(default = "default_port")]
    port: i64,
    #[serde(default = "default_timeout")]
    connect_timeout: i64,
}

pub(super) async fn scan(p: &Params) -> Result<Vec<keyhaven_ssh::client::ScannedKey>, ServiceError> {
    const S: &str = "keychain_remote_ssh_host_key_scan";
    let a: ScanIn = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if a.host.trim().is_empty() {
        errs.add(format!("{S}.host"), "String should have at least 1 character");
    }
    let port = errs.take(format!("{S}.port"), Port::new(a.port));
    let timeout = errs.take(format!("{S}.connect_timeout"), ConnectTimeout::new(a.connect_timeout));
    let (Some(port), Some(timeout)) = (port, timeout) else { return Err(errs.into()) };
    errs.check()?;
    pairing::host_key_scan(a.host.trim(), port.get(), timeout.duration()).await
}

pub(super) async fn remote_ssh_host_key_scan(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let keys = scan(&p).await?;
    if let Some(h) = p.raw(0).and_then(|v| v.get("host")).and_then(Value::as_str) {
        ctx.describe(format!("Discover remote host key: {h}"));
    }
    Ok(json!(keys.iter().map(|k| k.line()).collect::<Vec<_>>().join("\n")))
}

pub(super) async fn remote_ssh_host_key_scan_fingerprints(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let keys = scan(&p).await?;
    if let Some(h) = p.raw(0).and_then(|v| v.get("host")).and_then(Value::as_str) {
        ctx.describe(format!("Discover remote host key: {h}"));
    }
    Ok(Value::Array(
        keys.iter()
            .map(|k| json!({"type": k.key_type, "public_key": k.line(), "fingerprint": k.fingerprint}))
            .collect(),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TestIn {
    #[serde(default)]
    timeout: Option<u64>,
    /// Log in with this key pair instead of the connection's: try a new key
    /// before switching to it (manual key rotation).
    #[serde(default)]
    private_key: Option<i64>,
}

pub(super) async fn test_ssh_connection(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    const S: &str = "keychain_test_ssh_connection";
    let id: i64 = p.req(0, &format!("{S}.id"))?;
    let o: TestIn = p.opt(1, &format!("{S}.options"))?;
    if let Some(t) = o.timeout {
        ConnectTimeout::new(i64::try_from(t).unwrap_or(i64::MAX))
            .map_err(|m| ServiceError::field(format!("{S}.options.timeout"), m))?;
    }
    let report = ctx.app.test_ssh_connection_with(id, o.timeout, o.private_key).await.map_err(|e| e.in_schema(S))?;
    to_json(&report)
}

/// keyhaven extension: each tested connection's last test, filtered and
/// ordered like any TrueNAS query (`[{id, ok, stage, error, latency_ms, tested_at}]`).
pub(super) async fn ssh_connection_status(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let all: Vec<Value> =
        ctx.app.ssh_connection_status(ctx.caller()?.role)?.iter().map(to_json).collect::<Result<_, _>>()?;
    query(&all, &p, "keychaincredential.ssh_connection_status")
}
