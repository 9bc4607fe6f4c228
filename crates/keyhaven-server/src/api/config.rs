//! `config.*`: the configuration backup as TrueNAS's System › General ›
//! Manage Configuration. `config.save` is a job whose result is a download
//! link; restoring is `POST /_upload` with `{"method": "config.upload"}`
//! (see `transport::config_files`).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::SecretText;
use super::{Ctx, MethodDef, Params};
use crate::backup::Passphrase;
use crate::error::ServiceError;
use crate::method;

pub fn methods() -> Vec<MethodDef> {
    vec![method!("config.save", Write, save, 1), method!("config.upload", Write, upload_only, 1)]
}

/// `config.save` options. TrueNAS's flags are accepted for compatibility;
/// keyhaven's backup always holds the master key (its "secret seed") and the
/// host keys, and is always encrypted, so `passphrase` is required.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct SaveOptions {
    #[serde(default)]
    pub passphrase: Option<SecretText>,
    #[allow(dead_code)]
    #[serde(default)]
    secretseed: Option<bool>,
    #[allow(dead_code)]
    #[serde(default)]
    root_authorized_keys: Option<bool>,
}

/// The passphrase of `config.save`/`config.upload` options, as a field error when missing.
pub(crate) fn passphrase(o: SaveOptions, schema: &str) -> Result<Passphrase, ServiceError> {
    use secrecy::ExposeSecret;
    let Some(p) = o.passphrase else {
        return Err(ServiceError::field(
            format!("{schema}.passphrase"),
            "Field required: keyhaven backups are always encrypted; give a passphrase",
        ));
    };
    Passphrase::new(p.0.expose_secret().to_string())
        .map_err(|_| ServiceError::field(format!("{schema}.passphrase"), "The passphrase must not be empty"))
}

async fn save(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let opts: SaveOptions = p.opt(0, "config_save")?;
    let pass = passphrase(opts, "config_save")?;
    ctx.describe("Save configuration (encrypted backup)");
    let app = ctx.app.clone();
    let id = ctx.app.jobs.spawn("config.save", move |job| crate::backup::online::save(app, pass, job))?;
    Ok(json!(id))
}

async fn upload_only(_: Arc<Ctx>, _: Params) -> Result<Value, ServiceError> {
    Err(ServiceError::call(
        crate::error::EINVAL,
        "config.upload takes the file over HTTP: POST /_upload with a multipart form (data = {\"method\": \"config.upload\", \"params\": [{\"passphrase\": …}]}, file = the backup)",
    ))
}
