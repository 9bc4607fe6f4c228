//! Every API method, declared once: its TrueNAS name, who may call it, and the
//! handler that decodes its positional parameters. One file per namespace.
//! Both wire dialects and the unix socket dispatch through [`dispatch`].

mod api_key;
mod audit;
mod auth;
pub(crate) mod config;
mod core;
mod keychaincredential;
mod keyhaven;
pub mod params;
mod rsynctask;
mod service;
mod ssh;
mod user;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::error::ServiceError;
use crate::service::audit::{record, AuditEvent};
use crate::service::auth::{Caller, Session};
use crate::service::App;
pub use params::Params;

pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Value, ServiceError>> + Send>>;
pub type Handler = fn(Arc<Ctx>, Params) -> BoxFuture;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// No login needed (login methods, `core.ping`).
    Public,
    /// Any logged-in account (read-only admins included).
    Read,
    /// Full admins only; every call is audited.
    Write,
}

pub struct MethodDef {
    pub name: &'static str,
    pub access: Access,
    pub handler: Handler,
    /// The most positional parameters it takes; more are refused before the
    /// handler runs ("Too many arguments").
    pub params: usize,
    /// CPU-bound in proportion to caller-chosen input (query filters over
    /// every record): run off the async workers, a bounded number at once.
    pub heavy: bool,
}

/// Build a [`MethodDef`] from an `async fn(Arc<Ctx>, Params) -> Result<Value>`
/// and the most positional parameters the method takes; a trailing `heavy`
/// marks a method that filters caller-chosen amounts of data.
#[macro_export]
macro_rules! method {
    ($name:literal, $access:ident, $f:path, $params:literal) => {
        $crate::api::MethodDef {
            name: $name,
            access: $crate::api::Access::$access,
            handler: |c, p| Box::pin($f(c, p)),
            params: $params,
            heavy: false,
        }
    };
    ($name:literal, $access:ident, $f:path, $params:literal, heavy) => {
        $crate::api::MethodDef {
            name: $name,
            access: $crate::api::Access::$access,
            handler: |c, p| Box::pin($f(c, p)),
            params: $params,
            heavy: true,
        }
    };
}

/// Heavy calls running at once: one per core, so cheap calls on other
/// connections always find a free worker.
fn heavy_slots() -> &'static tokio::sync::Semaphore {
    static S: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    S.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)))
}

/// Run a heavy handler on a blocking thread: `block_in_place` hands this
/// worker's other tasks to another thread while the filter runs.
async fn run_heavy(fut: BoxFuture) -> Result<Value, ServiceError> {
    let _slot = heavy_slots().acquire().await.map_err(|e| ServiceError::internal("query", e))?;
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(fut))
        }
        _ => fut.await,
    }
}

/// The context of one call.
pub struct Ctx {
    pub app: Arc<App>,
    pub session: Arc<Session>,
    pub method: &'static str,
    description: Mutex<Option<String>>,
}

impl Ctx {
    /// The authenticated caller (present for every non-public method).
    pub fn caller(&self) -> Result<Caller, ServiceError> {
        self.session.caller().ok_or(ServiceError::NotAuthenticated)
    }

    /// Say what this call does, for the audit log (e.g. `Create Keychain Credential: x`).
    pub fn describe(&self, d: impl Into<String>) {
        *self.description.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.into());
    }
}

/// Every namespace's declarations, in declaration order.
fn declared() -> Vec<MethodDef> {
    let mut all = Vec::new();
    all.extend(auth::methods());
    all.extend(api_key::methods());
    all.extend(audit::methods());
    all.extend(config::methods());
    all.extend(core::methods());
    all.extend(keychaincredential::methods());
    all.extend(keyhaven::methods());
    all.extend(rsynctask::methods());
    all.extend(service::methods());
    all.extend(ssh::methods());
    all.extend(user::methods());
    all
}

fn registry() -> &'static HashMap<&'static str, MethodDef> {
    static R: OnceLock<HashMap<&'static str, MethodDef>> = OnceLock::new();
    R.get_or_init(|| {
        let mut map = HashMap::new();
        for m in declared() {
            // A second declaration of a name is a programming error, which
            // `tests::every_method_is_declared_once` catches; the first wins.
            map.entry(m.name).or_insert(m);
        }
        map
    })
}

/// Names and access of every method (for tests and `core.get_methods`).
pub fn method_list() -> Vec<(&'static str, Access)> {
    let mut v: Vec<_> = registry().values().map(|m| (m.name, m.access)).collect();
    v.sort();
    v
}

pub use crate::error::CallFailure;

/// Look up, authorise, run and (for writes) audit one call, and count it.
pub async fn dispatch(
    app: &Arc<App>,
    session: &Arc<Session>,
    method: &str,
    params: Vec<Value>,
) -> Result<Value, CallFailure> {
    let out = dispatch_uncounted(app, session, method, params).await;
    app.metrics.call(registry().get(method).map(|d| d.name), &out);
    out
}

async fn dispatch_uncounted(
    app: &Arc<App>,
    session: &Arc<Session>,
    method: &str,
    params: Vec<Value>,
) -> Result<Value, CallFailure> {
    let def = registry().get(method).ok_or(CallFailure::NoMethod)?;
    if def.access != Access::Public {
        match app.auth().current_caller(session) {
            Err(e) => return Err(CallFailure::Failed(e)),
            Ok(c) if c.may_call(def.name).is_err() => {
                let e = c.may_call(def.name).unwrap_err();
                record(app, session, AuditEvent::method(def.name, def.name, None, false, Some(e.to_string())));
                return Err(CallFailure::Failed(e));
            }
            Ok(c) if def.access == Access::Write && !c.role.can_write() => {
                record(
                    app,
                    session,
                    AuditEvent::method(def.name, def.name, None, false, Some("Not authorized".into())),
                );
                return Err(CallFailure::Failed(ServiceError::NotAuthorized));
            }
            Ok(_) => {}
        }
    }
    if params.len() > def.params {
        return Err(CallFailure::Failed(ServiceError::field(
            def.name,
            format!("Too many arguments (expected at most {}, got {})", def.params, params.len()),
        )));
    }
    let ctx =
        Arc::new(Ctx { app: app.clone(), session: session.clone(), method: def.name, description: Mutex::new(None) });
    let fut = (def.handler)(ctx.clone(), Params(params));
    let out = if def.heavy { run_heavy(fut).await } else { fut.await };
    if def.access != Access::Public {
        session.touch_after_call();
    }
    if def.access == Access::Write {
        let desc =
            ctx.description.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_else(|| def.name.to_string());
        let err = out.as_ref().err().map(|e| e.to_string());
        record(app, session, AuditEvent::method(def.name, &desc, None, out.is_ok(), err));
    }
    out.map_err(CallFailure::Failed)
}

/// Serialise a service's result for the wire: the one place domain types
/// become JSON.
pub fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ServiceError> {
    serde_json::to_value(v).map_err(|e| ServiceError::internal("encoding the reply", e))
}

/// Run a TrueNAS query (`[filters, options]`) over already-built entries;
/// errors in either are named in `schema`.
pub fn query<T: std::borrow::Borrow<Value>>(items: &[T], params: &Params, schema: &str) -> Result<Value, ServiceError> {
    crate::service::run_query(items, params.raw(0), params.raw(1)).map_err(|e| e.in_schema(schema))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_declared_once_with_a_namespaced_name() {
        let mut seen = std::collections::HashSet::new();
        for m in declared() {
            assert!(seen.insert(m.name), "{} is declared twice", m.name);
            let (ns, name) = m.name.rsplit_once('.').unwrap_or_else(|| panic!("{} has no namespace", m.name));
            let ok = |s: &str| {
                !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
            };
            assert!(ok(ns) && ok(name), "{} is not a TrueNAS-style name", m.name);
        }
        assert_eq!(registry().len(), seen.len());
    }
}
