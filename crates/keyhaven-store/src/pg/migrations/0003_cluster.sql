-- keyhaven's PostgreSQL schema, step 3: the nodes of a cluster (issue 14 §2).
-- Each node keeps its own row up to date (a heartbeat every ~2 s, stamped with
-- the database's clock so nodes with skewed clocks agree on who is down).
-- `lock_pid` is the backend pid of the node's dedicated leadership session:
-- the leader is the node whose session holds the leadership advisory lock in
-- pg_locks, so a node killed with its lock is never shown as leader.
CREATE TABLE cluster_nodes (
    node_id      TEXT PRIMARY KEY,
    hostname     TEXT NOT NULL,
    version      TEXT NOT NULL,
    address      TEXT NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    lock_pid     INTEGER
);
