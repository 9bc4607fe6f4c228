-- When each rsync task last succeeded (what admins alert on). Kept apart
-- from rsync_runs, which holds only the last run (a failure replaces a
-- success) and a log of up to 64 KiB: this table stays small to scan.
CREATE TABLE rsync_last_success (
    task_id INTEGER PRIMARY KEY REFERENCES rsync_tasks(id) ON DELETE CASCADE,
    at      REAL NOT NULL
);
INSERT INTO rsync_last_success(task_id, at)
    SELECT task_id, finished FROM rsync_runs WHERE state = 'SUCCESS' AND finished IS NOT NULL;
