//! Prometheus metrics: the one registry of keyhaven's counters and
//! histograms, the values read at scrape time (sshd, the TLS certificate,
//! host keys, rsync tasks), and the text served at `GET /metrics`.
//!
//! Every label value comes from a fixed list in the code (method names as
//! declared, login mechanisms, outcomes) or from a record an admin created
//! (an rsync task's id): nothing a caller sends can add a series, so an
//! attacker calling made-up method names cannot grow memory.

use std::fmt::Write as _;
use std::sync::RwLock;
use std::time::{Duration, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::health::Monitoring;
use crate::error::{CallFailure, ServiceError};

/// The `Content-Type` of what [`Monitoring::metrics_text`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The method label of calls to names no method has.
pub const UNKNOWN_METHOD: &str = "unknown";

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The counters and histograms updated as things happen.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    logins: Family<Labels2, Counter>,
    calls: Family<Labels2, Counter>,
    jobs: Family<Labels2, Histogram, fn() -> Histogram>,
    connection_tests: Family<Labels1, Counter>,
    reconciles: Family<Labels2, Counter>,
    /// The served certificate's validity (Unix seconds), when serving TLS;
    /// replaced when a reload reads the certificate again.
    tls_validity: RwLock<Option<(i64, i64)>>,
}

/// Job durations from 10 ms to about 45 minutes, each bucket 4× the one before.
fn job_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keyhaven");
        let logins = Family::<Labels2, Counter>::default();
        registry.register(
            "logins",
            "Login attempts by mechanism and result (ok, failed, refused while locked out)",
            logins.clone(),
        );
        let calls = Family::<Labels2, Counter>::default();
        registry.register(
            "calls",
            "API calls by method and outcome (ok, invalid, denied, error); unknown method names count as `unknown`",
            calls.clone(),
        );
        let jobs = Family::<Labels2, Histogram, fn() -> Histogram>::new_with_constructor(job_histogram);
        registry.register_with_unit(
            "job_duration",
            "Duration of finished jobs by method and state (SUCCESS, FAILED)",
            prometheus_client::registry::Unit::Seconds,
            jobs.clone(),
        );
        let connection_tests = Family::<Labels1, Counter>::default();
        registry.register("connection_tests", "SSH connection tests by result (ok, failed)", connection_tests.clone());
        let reconciles = Family::<Labels2, Counter>::default();
        registry.register(
            "cluster_reconciles",
            "Full reconciles of this node's state with the shared database (PostgreSQL) by area and outcome (unchanged: nothing read; rebuilt; not_built)",
            reconciles.clone(),
        );
        Metrics { registry, logins, calls, jobs, connection_tests, reconciles, tls_validity: RwLock::new(None) }
    }
}

impl Metrics {
    /// A login attempt: `result` is `ok`, `failed` or `refused`.
    pub fn login(&self, mechanism: &'static str, result: &'static str) {
        self.logins.get_or_create(&[("mechanism", mechanism), ("result", result)]).inc();
    }

    /// One dispatched call; `method` is the declared name, `None` for an unknown one.
    pub fn call(&self, method: Option<&'static str>, out: &Result<serde_json::Value, CallFailure>) {
        let outcome = match out {
            Ok(_) => "ok",
            Err(CallFailure::NoMethod) => "error",
            Err(CallFailure::Failed(e)) => match e {
                ServiceError::Validation(_) => "invalid",
                ServiceError::NotAuthenticated | ServiceError::SessionExpired { .. } | ServiceError::NotAuthorized => {
                    "denied"
                }
                ServiceError::Call { .. } => "error",
            },
        };
        let method = method.unwrap_or(UNKNOWN_METHOD);
        self.calls.get_or_create(&[("method", method), ("outcome", outcome)]).inc();
    }

    /// A finished job.
    pub fn job_finished(&self, method: &'static str, ok: bool, took: Duration) {
        let state = if ok { "SUCCESS" } else { "FAILED" };
        self.jobs.get_or_create(&[("method", method), ("state", state)]).observe(took.as_secs_f64());
    }

    /// A finished connection test.
    pub fn connection_test(&self, ok: bool) {
        self.connection_tests.get_or_create(&[("result", if ok { "ok" } else { "failed" })]).inc();
    }

    /// A full reconcile of `area` (PostgreSQL's periodic safety net).
    pub fn reconciled(&self, area: &'static str, outcome: &'static str) {
        self.reconciles.get_or_create(&[("area", area), ("outcome", outcome)]).inc();
    }

    /// How many full reconciles of `area` ended with `outcome` (for tests).
    pub fn reconciles(&self, area: &'static str, outcome: &'static str) -> u64 {
        self.reconciles.get_or_create(&[("area", area), ("outcome", outcome)]).get()
    }

    /// The validity (not before, not after) of the certificate served now.
    pub fn set_tls_validity(&self, validity: Option<(i64, i64)>) {
        *self.tls_validity.write().unwrap_or_else(|p| p.into_inner()) = validity;
    }
}

/// What is read at scrape time rather than counted as it happens.
#[derive(Debug, Default)]
struct Snapshot {
    sshd_up: bool,
    sshd_restarts: u64,
    tls_validity: Option<(i64, i64)>,
    /// (algorithm, Unix time its key file was written).
    host_keys: Vec<(&'static str, f64)>,
    /// (task id, Unix time of its last success; 0 = never).
    rsync: Vec<(i64, f64)>,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let up = ConstGauge::new(i64::from(self.sshd_up));
        up.encode(encoder.encode_descriptor(
            "sshd_up",
            "Whether the supervised sshd is running (1) or not (0)",
            None,
            up.metric_type(),
        )?)?;
        let restarts = ConstCounter::new(self.sshd_restarts);
        restarts.encode(encoder.encode_descriptor(
            "sshd_restarts",
            "Automatic restarts of sshd after it exited on its own",
            None,
            restarts.metric_type(),
        )?)?;
        if let Some((not_before, not_after)) = self.tls_validity {
            for (name, help, v) in [
                (
                    "tls_certificate_not_before_timestamp_seconds",
                    "Start of the served TLS certificate's validity",
                    not_before,
                ),
                (
                    "tls_certificate_not_after_timestamp_seconds",
                    "End of the served TLS certificate's validity",
                    not_after,
                ),
            ] {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
        }
        if !self.host_keys.is_empty() {
            let mut m = encoder.encode_descriptor(
                "sshd_host_key_timestamp_seconds",
                "When each sshd host key file was written (generated, or changed by a restore)",
                None,
                MetricType::Gauge,
            )?;
            for (alg, at) in &self.host_keys {
                ConstGauge::new(*at).encode(m.encode_family(&[("algorithm", *alg)])?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "rsync_task_last_success_timestamp_seconds",
            "When each rsync task's last successful run ended (0 = never)",
            None,
            MetricType::Gauge,
        )?;
        // Formatted into one reused buffer: with thousands of tasks the label
        // values are most of a scrape's allocations.
        let mut id = String::new();
        for (task, at) in &self.rsync {
            id.clear();
            let _ = write!(id, "{task}");
            ConstGauge::new(*at).encode(m.encode_family(&[("task", id.as_str())])?)?;
        }
        Ok(())
    }
}

/// The host key files sshd reads, by algorithm (as `ensure_host_keys` names them).
const HOST_KEY_FILES: &[(&str, &str)] = &[
    ("ssh-ed25519", "ssh_host_ed25519_key"),
    ("ecdsa-sha2-nistp256", "ssh_host_ecdsa_key"),
    ("ssh-rsa", "ssh_host_rsa_key"),
];

impl Monitoring<'_> {
    /// Everything `GET /metrics` serves, in the Prometheus text format
    /// (version 0.0.4). Reads the store (rsync tasks): call off the async workers.
    pub fn metrics_text(&self) -> Result<String, ServiceError> {
        let m = &self.app.metrics;
        let dir = self.app.sshd().supervisor().paths().dir.clone();
        let host_keys = HOST_KEY_FILES
            .iter()
            .filter_map(|(alg, file)| {
                let modified = std::fs::metadata(dir.join(file)).and_then(|md| md.modified()).ok()?;
                Some((*alg, modified.duration_since(UNIX_EPOCH).ok()?.as_secs_f64()))
            })
            .collect();
        let rsync =
            self.app.store.rsync_last_successes()?.into_iter().map(|(id, at)| (id, at.unwrap_or(0.0))).collect();
        let snapshot = Snapshot {
            sshd_up: self.app.sshd().supervisor().state() == keyhaven_ssh::supervisor::SshdState::Running,
            sshd_restarts: self.app.sshd().supervisor().restarts_total(),
            tls_validity: *m.tls_validity.read().unwrap_or_else(|p| p.into_inner()),
            host_keys,
            rsync,
        };
        let mut scraped = Registry::with_prefix("keyhaven");
        scraped.register_collector(Box::new(snapshot));
        let mut out = String::with_capacity(4096);
        let encode = |out: &mut String, r: &Registry| prometheus_client::encoding::prometheus_text::encode(out, r);
        encode(&mut out, &m.registry)
            .and_then(|()| encode(&mut out, &scraped))
            .map_err(|e| ServiceError::internal("encoding the metrics", e))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_series() {
        let m = Metrics::default();
        for _ in 0..3 {
            m.call(None, &Err(CallFailure::NoMethod));
        }
        m.call(Some("core.ping"), &Ok(serde_json::Value::Null));
        m.call(Some("core.ping"), &Err(CallFailure::Failed(ServiceError::NotAuthenticated)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry).unwrap();
        assert_eq!(text.lines().filter(|l| l.starts_with("keyhaven_calls_total{")).count(), 3, "{text}");
        assert!(text.contains("keyhaven_calls_total{method=\"unknown\",outcome=\"error\"} 3"), "{text}");
        assert!(text.contains("keyhaven_calls_total{method=\"core.ping\",outcome=\"denied\"} 1"), "{text}");
    }
}
