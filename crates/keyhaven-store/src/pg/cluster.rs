//! Cluster membership and leadership on PostgreSQL. Each node upserts its
//! `cluster_nodes` row on every heartbeat, stamped with the database's clock.
//! Leadership is `pg_try_advisory_lock` taken on a session of its own (not a
//! pooled connection, which would hand the lock to whoever reuses it): it is
//! held exactly as long as that session lives, so when the holder dies
//! (kill -9, power loss detected by TCP) PostgreSQL ends the session, frees
//! the lock, and the next node that polls takes it.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::NoTls;

use super::{pg_err, Pg, PgStore};
use crate::cluster::{ClusterView, NodeRecord, NodeStatus, DOWN_AFTER_SECS};
use crate::error::{Result, StoreError};

/// The advisory lock of scheduled work ("khleader" in ASCII); apart from the
/// migration lock, which is transaction-level.
pub(crate) const LEADER_LOCK: i64 = 0x6b68_6c65_6164_6572;

/// The most one leadership poll may take: past it the node stops leading
/// (its session is dropped, which frees the lock if PostgreSQL still has it).
const LEAD_POLL_WAIT: Duration = Duration::from_secs(3);

/// Rows of nodes silent for this long are forgotten (a data dir thrown away).
const FORGET_AFTER_SECS: f64 = 7.0 * 86_400.0;

/// The node's dedicated leadership session.
#[derive(Default)]
pub(crate) struct LeaderSession {
    client: Option<tokio_postgres::Client>,
    holds: bool,
}

pub(crate) type SharedSession = Arc<tokio::sync::Mutex<LeaderSession>>;

pub(super) const DB_NOW: &str = "extract(epoch from clock_timestamp())::float8";

impl PgStore {
    /// Create or refresh this node's row, stamped with the database's clock;
    /// rows silent for a week are removed.
    pub fn node_heartbeat(&self, n: &NodeRecord) -> Result<()> {
        let n = n.clone();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                &format!(
                    "INSERT INTO cluster_nodes(node_id, hostname, version, address, started_at, heartbeat_at)
                     VALUES($1, $2, $3, $4, $5, {DB_NOW})
                     ON CONFLICT(node_id) DO UPDATE SET hostname = EXCLUDED.hostname,
                         version = EXCLUDED.version, address = EXCLUDED.address,
                         started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at"
                ),
                &[&n.node_id, &n.hostname, &n.version, &n.address, &n.started_at],
            )
            .await
            .map_err(|e| pg.err(e))?;
            c.execute(&format!("DELETE FROM cluster_nodes WHERE heartbeat_at < {DB_NOW} - $1"), &[&FORGET_AFTER_SECS])
                .await
                .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    /// Every node with its heartbeat and whether it is up, and the leader:
    /// the node whose leadership session holds the lock right now.
    pub fn cluster_view(&self) -> Result<ClusterView> {
        self.run(|pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT node_id, hostname, version, address, started_at, heartbeat_at, {DB_NOW},
                            EXISTS(SELECT 1 FROM pg_locks l
                                   WHERE l.pid = n.lock_pid AND l.locktype = 'advisory' AND l.granted
                                     AND l.objsubid = 1
                                     AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
                                     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
                         FROM cluster_nodes n ORDER BY started_at, node_id"
                    ),
                    &[&LEADER_LOCK],
                )
                .await
                .map_err(|e| pg.err(e))?;
            let mut view = ClusterView { nodes: Vec::with_capacity(rows.len()), leader: None };
            for r in &rows {
                let get = |i| r.try_get::<_, String>(i).map_err(|e| StoreError::Corrupt(format!("cluster_nodes: {e}")));
                let f = |i| r.try_get::<_, f64>(i).map_err(|e| StoreError::Corrupt(format!("cluster_nodes: {e}")));
                let node = NodeRecord {
                    node_id: get(0)?,
                    hostname: get(1)?,
                    version: get(2)?,
                    address: get(3)?,
                    started_at: f(4)?,
                };
                let heartbeat_at = f(5)?;
                let now = f(6)?;
                let leads: bool = r.try_get(7).map_err(|e| StoreError::Corrupt(format!("cluster_nodes: {e}")))?;
                if leads {
                    view.leader = Some(node.node_id.clone());
                }
                view.nodes.push(NodeStatus { node, heartbeat_at, up: now - heartbeat_at < DOWN_AFTER_SECS });
            }
            Ok(view)
        })
    }

    /// One leadership poll for node `node_id`: whether it leads now. Takes
    /// the lock when it is free; while held, checks the session still
    /// answers. Any failure (or no answer within a few seconds) drops the
    /// session, so this node stops leading and the lock is freed.
    pub fn try_lead(&self, node_id: &str) -> Result<bool> {
        let session = self.leader.clone();
        let mut cfg = (*self.cfg).clone();
        cfg.application_name("keyhaven-leadership");
        // A half-open connection (the network, not the process, died) is
        // noticed by keepalives rather than never.
        cfg.keepalives(true).keepalives_idle(Duration::from_secs(5));
        let tls = self.session_tls.clone();
        let node_id = node_id.to_string();
        let target = self.target.clone();
        self.run(move |pg| async move {
            let mut s = session.lock().await;
            match tokio::time::timeout(LEAD_POLL_WAIT, poll(&mut s, &cfg, tls, &pg, &node_id)).await {
                Ok(Ok(leads)) => Ok(leads),
                Ok(Err(e)) => {
                    *s = LeaderSession::default();
                    Err(e)
                }
                Err(_) => {
                    *s = LeaderSession::default();
                    Err(StoreError::PgConnect {
                        target,
                        detail: format!("the leadership session did not answer within {} s", LEAD_POLL_WAIT.as_secs()),
                    })
                }
            }
        })
    }

    /// Give leadership up now (at shutdown): the session is closed.
    pub fn resign(&self) {
        let session = self.leader.clone();
        let _ = self.run(move |_| async move {
            let mut s = session.lock().await;
            // Unlocked first: closing the session frees the lock too, but
            // only once the server has seen the connection end.
            if let (true, Some(c)) = (s.holds, s.client.as_ref()) {
                let unlock = c.execute("SELECT pg_advisory_unlock($1)", &[&LEADER_LOCK]);
                let _ = tokio::time::timeout(LEAD_POLL_WAIT, unlock).await;
            }
            *s = LeaderSession::default();
            Ok(())
        });
    }
}

async fn poll(
    s: &mut LeaderSession,
    cfg: &tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pg: &Pg,
    node_id: &str,
) -> Result<bool> {
    if s.client.as_ref().is_none_or(|c| c.is_closed()) {
        *s = LeaderSession::default();
        let client = match tls {
            None => {
                let (client, conn) = cfg.connect(NoTls).await.map_err(|e| pg_err(&pg.target, e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
            Some(connector) => {
                let (client, conn) = cfg.connect(connector).await.map_err(|e| pg_err(&pg.target, e))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            }
        };
        s.client = Some(client);
    }
    let Some(c) = s.client.as_ref() else { return Ok(false) };
    if s.holds {
        c.simple_query("SELECT 1").await.map_err(|e| pg.err(e))?;
        return Ok(true);
    }
    let got: bool =
        c.query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK]).await.map_err(|e| pg.err(e))?.get(0);
    if got {
        // Name this session on the node's row (and on no other row: a
        // dead node's old pid may have been reused) so cluster_view can
        // tell who leads from pg_locks.
        c.execute(
            "UPDATE cluster_nodes SET lock_pid = CASE WHEN node_id = $1 THEN pg_backend_pid() END
             WHERE node_id = $1 OR lock_pid = pg_backend_pid()",
            &[&node_id],
        )
        .await
        .map_err(|e| pg.err(e))?;
        s.holds = true;
    }
    Ok(got)
}
