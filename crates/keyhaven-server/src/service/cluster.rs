//! The cluster area (issue 14 §2): who this node is, which nodes share the
//! database, and whether this node leads the scheduled work (rsync
//! schedules, audit retention) — which runs once per cluster, on the leader.
//!
//! On SQLite the process is the only node and always leads: nothing changes.
//! On PostgreSQL the membership task stamps this node's row every
//! [`HEARTBEAT_SECS`] and polls leadership every [`LEAD_POLL`]: the lead is a
//! session-level advisory lock, so when the leader dies its session ends and
//! another node takes over on its next poll.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keyhaven_store::cluster::{NodeRecord, DOWN_AFTER_SECS, HEARTBEAT_SECS};
use serde::Serialize;

use super::jobs::Date;
use super::App;
use crate::error::ServiceError;

/// The file in the data dir that keeps this node's id across restarts.
pub const NODE_ID_FILE: &str = "node-id";

/// How often leadership is polled: a failover takes about this long once
/// PostgreSQL has ended the dead leader's session.
pub const LEAD_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NodeIdError {
    #[error("cannot read or create the node id {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} does not hold a node id (32 hexadecimal digits); remove it and keyhaven makes a new one")]
    Invalid { path: PathBuf },
}

/// This node's id: read from `<data dir>/node-id`, made on first start.
/// A copy of a data dir must not keep it (two nodes would share one row).
pub fn node_id(data_dir: &Path) -> Result<String, NodeIdError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(NODE_ID_FILE);
    let io = |source| NodeIdError::Io { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(id.to_ascii_lowercase())
            } else {
                Err(NodeIdError::Invalid { path })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
            let id = hex::encode(b);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
            f.write_all(format!("{id}\n").as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

/// The area's state: this node's record and whether it leads.
#[derive(Default)]
pub struct ClusterState {
    me: OnceLock<NodeRecord>,
    leading: AtomicBool,
    /// Woken when this node becomes the leader: the audit retention loop
    /// (its one waiter) prunes at once. `notify_one` keeps the wake-up for a
    /// waiter that is not waiting yet.
    gained: Arc<tokio::sync::Notify>,
}

/// `keyhaven.cluster_status`'s answer.
#[derive(Serialize)]
pub struct ClusterStatus {
    /// `sqlite` or `postgresql`.
    pub backend: &'static str,
    /// The node that answered.
    pub node_id: String,
    /// The node leading scheduled work; null while a failover is under way.
    pub leader: Option<String>,
    pub nodes: Vec<NodeEntry>,
    pub heartbeat_interval: u64,
    pub down_after: f64,
}

#[derive(Serialize)]
pub struct NodeEntry {
    pub id: String,
    pub hostname: String,
    pub version: String,
    pub address: String,
    pub started_at: Date,
    pub last_heartbeat: Date,
    pub up: bool,
    pub leader: bool,
    pub this_node: bool,
}

/// The cluster area's handle.
pub struct Cluster<'a> {
    app: &'a App,
}

impl<'a> Cluster<'a> {
    pub(super) fn new(app: &'a App) -> Self {
        Cluster { app }
    }

    /// Whether this node runs the scheduled work now (always on SQLite).
    pub fn is_leader(&self) -> bool {
        self.app.store.backend_name() == "sqlite" || self.app.cluster_area.leading.load(Ordering::Acquire)
    }

    /// Notified each time this node becomes the leader.
    pub fn leadership_gained(&self) -> Arc<tokio::sync::Notify> {
        self.app.cluster_area.gained.clone()
    }

    /// This node's record (before the daemon set it: a record from the
    /// configuration, for the unit tests' apps).
    pub fn me(&self) -> NodeRecord {
        self.app.cluster_area.me.get().cloned().unwrap_or_else(|| NodeRecord {
            node_id: String::new(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").into(),
            address: self.app.config.listen.to_string(),
            started_at: super::jobs::now(),
        })
    }

    /// Confirm leadership with the database now (a poll of its own), for
    /// work about to start: a node that lost its session stops at once.
    pub async fn confirm_leader(&self) -> bool {
        if self.app.store.backend_name() == "sqlite" {
            return true;
        }
        let Ok(app) = self.app.shared() else { return false };
        tokio::task::spawn_blocking(move || app.cluster().poll_leadership()).await.unwrap_or(false)
    }

    /// One leadership poll (blocking): records the result and logs changes.
    fn poll_leadership(&self) -> bool {
        let me = self.me();
        let leads = match self.app.store.try_lead(&me.node_id) {
            Ok(l) => l,
            Err(e) => {
                if self.app.cluster_area.leading.load(Ordering::Acquire) {
                    tracing::warn!("lost the lead of scheduled work: {e}");
                }
                false
            }
        };
        let was = self.app.cluster_area.leading.swap(leads, Ordering::AcqRel);
        if leads && !was {
            tracing::info!(node = %me.node_id, "this node now leads the cluster's scheduled work");
            self.app.cluster_area.gained.notify_one();
        } else if !leads && was {
            tracing::warn!(node = %me.node_id, "this node no longer leads the cluster's scheduled work");
        }
        leads
    }

    /// Start membership: set this node's record and, on PostgreSQL, stamp
    /// the heartbeat and poll leadership until the daemon stops. The first
    /// heartbeat and poll happen before this returns, so a single node leads
    /// from its first request on.
    pub async fn start(&self, me: NodeRecord) -> Result<tokio::task::JoinHandle<()>, ServiceError> {
        self.app.jobs.set_node(&me.node_id);
        let _ = self.app.cluster_area.me.set(me);
        let app = self.app.shared()?;
        let weak = Arc::downgrade(&app);
        if app.store.backend_name() == "sqlite" {
            return Ok(tokio::spawn(async {}));
        }
        let first = app.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let c = first.cluster();
            if let Err(e) = first.store.node_heartbeat(&c.me()) {
                tracing::warn!("cluster heartbeat: {e}");
            }
            c.poll_leadership();
        })
        .await;
        drop(app);
        Ok(tokio::spawn(async move {
            let mut tick: u64 = 0;
            loop {
                tokio::time::sleep(LEAD_POLL).await;
                tick += 1;
                let Some(app) = weak.upgrade() else { return };
                let beat = tick.is_multiple_of(HEARTBEAT_SECS);
                let _ = tokio::task::spawn_blocking(move || {
                    let c = app.cluster();
                    if beat {
                        if let Err(e) = app.store.node_heartbeat(&c.me()) {
                            tracing::warn!("cluster heartbeat: {e}");
                        }
                    }
                    // The leader fails the work of nodes that went down.
                    if c.poll_leadership() && beat {
                        app.jobs.fail_down_nodes();
                        app.rsync().fail_down_nodes();
                    }
                })
                .await;
            }
        }))
    }

    /// At shutdown: hand the lead over at once rather than when the
    /// process's session ends.
    pub fn resign(&self) {
        self.app.cluster_area.leading.store(false, Ordering::Release);
        self.app.store.resign();
    }

    /// `keyhaven.cluster_status`: the backend, every node (up or down), the leader.
    pub async fn status(&self) -> Result<ClusterStatus, ServiceError> {
        let app = self.app.shared()?;
        let me = self.me();
        let mine = me.clone();
        let view = tokio::task::spawn_blocking(move || app.store.cluster_view(&mine))
            .await
            .map_err(|e| ServiceError::internal("reading the cluster's nodes", e))??;
        let nodes = view
            .nodes
            .into_iter()
            .map(|n| NodeEntry {
                leader: view.leader.as_deref() == Some(n.node.node_id.as_str()),
                this_node: n.node.node_id == me.node_id,
                id: n.node.node_id,
                hostname: n.node.hostname,
                version: n.node.version,
                address: n.node.address,
                started_at: Date::from_secs(n.node.started_at),
                last_heartbeat: Date::from_secs(n.heartbeat_at),
                up: n.up,
            })
            .collect();
        Ok(ClusterStatus {
            backend: self.app.store.backend_name(),
            node_id: me.node_id,
            leader: view.leader,
            nodes,
            heartbeat_interval: HEARTBEAT_SECS,
            down_after: DOWN_AFTER_SECS,
        })
    }
}

/// The machine's host name (uname's nodename).
pub fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}
