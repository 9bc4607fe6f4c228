//! `keyhaven.*`: facts about this keyhaven that TrueNAS has no method for.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{to_json, Ctx, MethodDef, Params};
use crate::error::ServiceError;
use crate::method;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("keyhaven.tls_certificate", Read, tls_certificate, 0),
        method!("keyhaven.cluster_status", Read, cluster_status, 0),
    ]
}

/// Whether the API is served over TLS and the served certificate's SHA-256
/// fingerprint, to compare with what a pairing system shows before it trusts it.
async fn tls_certificate(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    let fp = ctx.app.tls_fingerprint.read().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(json!({"tls": fp.is_some(), "fingerprint_sha256": fp}))
}

/// The nodes sharing this keyhaven's database (one on SQLite), their
/// versions and last heartbeats, and which one leads scheduled work.
async fn cluster_status(ctx: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    to_json(&ctx.app.cluster().status().await?)
}
