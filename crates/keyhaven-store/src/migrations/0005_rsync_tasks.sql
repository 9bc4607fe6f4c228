-- Rsync tasks (rsynctask.*). The task's TrueNAS fields live in `data` (JSON)
-- so that the service layer owns their shape; the two fields a keychain
-- cascade changes have columns of their own. No secrets: a run takes its key
-- from the keychain at run time.
CREATE TABLE rsync_tasks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    data            TEXT NOT NULL,
    enabled         INTEGER NOT NULL,
    ssh_credentials INTEGER REFERENCES keychain(id)
);
CREATE INDEX rsync_tasks_ssh_credentials ON rsync_tasks(ssh_credentials);

-- The last run of each task (the task's read-only `job`). A row left in
-- RUNNING by a daemon that died is turned into FAILED at the next start.
CREATE TABLE rsync_runs (
    task_id  INTEGER PRIMARY KEY REFERENCES rsync_tasks(id) ON DELETE CASCADE,
    job_id   INTEGER NOT NULL,
    state    TEXT NOT NULL,
    started  REAL NOT NULL,
    finished REAL,
    error    TEXT,
    log      TEXT NOT NULL DEFAULT ''
);
