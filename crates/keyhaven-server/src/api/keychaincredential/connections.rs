//! Checking SSH connections: host-key scans, connection tests and their last results.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScanIn {
    #[serde(flatten)]
    endpoint: SshEndpoint,
}

pub(super) async fn scan(p: &Params) -> Result<Vec<keyhaven_ssh::client::ScannedKey>, ServiceError> {
    const S: &str = "keychain_remote_ssh_host_key_scan";
    let ScanIn { endpoint: ep } = p.req(0, S)?;
    let mut errs = keyhaven_core::ValidationErrors::new();
    if ep.host.trim().is_empty() {
        errs.add("host", "String should have at least 1 character");
    }
    let checked = errs.take_all("", ep.check());
    errs.check().map_err(|e| ServiceError::from(e).in_schema(S))?;
    let Some((port, timeout)) = checked else { return Err(ServiceError::internal(S, "endpoint not checked")) };
    pairing::host_key_scan(ep.host.trim(), port.get(), timeout.duration()).await
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
    let timeout = match o.timeout {
        None => None,
        Some(t) => Some(
            ConnectTimeout::new(i64::try_from(t).unwrap_or(i64::MAX))
                .map_err(|m| ServiceError::field(format!("{S}.options.timeout"), m))?,
        ),
    };
    let report =
        ctx.app.pairing().test_connection_with(id, timeout, o.private_key).await.map_err(|e| e.in_schema(S))?;
    to_json(&report)
}

/// keyhaven extension: each tested connection's last test, filtered and
/// ordered like any TrueNAS query (`[{id, ok, stage, error, latency_ms, tested_at}]`).
pub(super) async fn ssh_connection_status(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let all: Vec<Value> =
        ctx.app.pairing().connection_status(ctx.caller()?.role)?.iter().map(to_json).collect::<Result<_, _>>()?;
    query(&all, &p, "keychaincredential.ssh_connection_status")
}
