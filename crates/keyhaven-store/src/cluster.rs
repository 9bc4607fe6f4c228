//! The nodes of a keyhaven cluster and which one leads the scheduled work
//! (issue 14 §2): the records the server hands in and gets back. On SQLite
//! there is one node, the process itself, always the leader; on PostgreSQL
//! each node keeps a row of `cluster_nodes` fresh and leadership is a
//! session-level advisory lock (`pg/cluster.rs`).

/// How often a node stamps its row (seconds).
pub const HEARTBEAT_SECS: u64 = 2;
/// A node whose last heartbeat is older than this (seconds, by the
/// database's clock) is shown as down.
pub const DOWN_AFTER_SECS: f64 = 10.0;

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Stable per data dir (the server keeps it in the data dir).
    pub node_id: String,
    pub hostname: String,
    /// keyhaven's version on that node.
    pub version: String,
    /// Where its API listens (`https://host:port`).
    pub address: String,
    /// When the process started (seconds since the epoch).
    pub started_at: f64,
}

/// A node as the cluster sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub node: NodeRecord,
    /// Its last heartbeat (seconds since the epoch, database clock).
    pub heartbeat_at: f64,
    /// Heartbeat younger than [`DOWN_AFTER_SECS`].
    pub up: bool,
}

/// Every node known and the leader's id, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub nodes: Vec<NodeStatus>,
    /// The node holding leadership now; `None` during a failover.
    pub leader: Option<String>,
}
