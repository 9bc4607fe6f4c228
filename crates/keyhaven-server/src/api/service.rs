//! `service.*`: start, stop, enable the supervised SSH service.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::params::Str;
use super::{query, to_json, Ctx, MethodDef, Params};
use crate::error::{ServiceError, ENOENT};
use crate::method;
use crate::service::sshd::SshVerb;

pub fn methods() -> Vec<MethodDef> {
    vec![
        method!("service.query", Read, query_m, 2),
        method!("service.update", Write, update, 2),
        method!("service.control", Write, control, 3),
    ]
}

async fn query_m(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    query(&[to_json(&ctx.app.sshd().service_entry()?)?], &p, "service.query")
}

fn check_service(v: &Value, attr: &str) -> Result<(), ServiceError> {
    match v {
        Value::String(s) if s == "ssh" => Ok(()),
        Value::Number(n) if n.as_i64() == Some(1) => Ok(()),
        Value::String(s) => Err(ServiceError::field_errno(
            attr,
            format!("Service {s} does not exist; keyhaven manages only `ssh`"),
            ENOENT,
        )),
        _ => Err(ServiceError::field(attr, "Input should be a service name (`ssh`) or id")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateIn {
    enable: bool,
}

async fn update(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let id = p.raw(0).cloned().ok_or_else(|| ServiceError::field("service_update.id_or_name", "Field required"))?;
    check_service(&id, "service_update.id_or_name")?;
    let u: UpdateIn = p.req(1, "service_update")?;
    ctx.describe(format!("Update service ssh: enable={}", u.enable));
    ctx.app.sshd().set_enabled(u.enable)?;
    to_json(&ctx.app.sshd().service_entry()?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ControlOptions {
    #[allow(dead_code)]
    #[serde(default)]
    ha_propagate: Option<bool>,
    #[allow(dead_code)]
    #[serde(default)]
    silent: Option<bool>,
    #[allow(dead_code)]
    #[serde(default)]
    timeout: Option<i64>,
}

async fn control(ctx: Arc<Ctx>, p: Params) -> Result<Value, ServiceError> {
    let verb: Str = p.req(0, "service_control.verb")?;
    let Some(verb) = SshVerb::parse(&verb) else {
        return Err(ServiceError::field(
            "service_control.verb",
            "Input should be 'START', 'STOP', 'RESTART' or 'RELOAD'",
        ));
    };
    let svc = p.raw(1).cloned().ok_or_else(|| ServiceError::field("service_control.service", "Field required"))?;
    check_service(&svc, "service_control.service")?;
    let _: ControlOptions = p.opt(2, "service_control.options")?;
    ctx.describe(format!("{} service ssh", verb.as_str()));
    let app = ctx.app.clone();
    let id = ctx.app.jobs.spawn("service.control", move |job| async move {
        job.progress(10.0, format!("{} ssh", verb.as_str()));
        app.sshd().control(verb).await?;
        job.progress(100.0, format!("{} ssh: done", verb.as_str()));
        Ok(json!(true))
    })?;
    Ok(json!(id))
}
