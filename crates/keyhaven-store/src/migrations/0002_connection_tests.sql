-- The last test of each SSH connection (keychaincredential.test_ssh_connection):
-- what the connection list shows as its status. No secrets: the error text
-- names hosts, users, stages and fingerprints only. A change of the
-- connection's attributes clears its row (the test was of other settings).
CREATE TABLE connection_tests (
    connection_id INTEGER PRIMARY KEY REFERENCES keychain(id) ON DELETE CASCADE,
    ok            INTEGER NOT NULL,
    stage         TEXT NOT NULL,
    error         TEXT,
    latency_ms    INTEGER NOT NULL,
    tested_at     INTEGER NOT NULL
);
