-- The last test of each SSH connection (keychaincredential.test_ssh_connection):
-- what the connection list shows as its status. No secrets: the error text
-- names hosts, users, stages and fingerprints only.
CREATE TABLE connection_tests (
    connection_id INTEGER PRIMARY KEY,
    ok            INTEGER NOT NULL,
    stage         TEXT NOT NULL,
    error         TEXT,
    latency_ms    INTEGER NOT NULL,
    tested_at     INTEGER NOT NULL
);
