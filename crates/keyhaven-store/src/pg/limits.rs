//! Failed logins shared by every node (table `login_failures`, migration
//! 0002): the login limiter's counts and locks live here on PostgreSQL, so
//! an attacker cannot multiply the limits by the number of nodes. Each
//! change is one statement per key, so two nodes counting at once never
//! lose a failure, and exactly one of them locks a key.

use super::PgStore;
use crate::error::Result;
use crate::records::{LoginFailure, LoginFailureRecord};

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl PgStore {
    /// The shared rows of `keys` (keys without failures have none).
    pub fn login_failures(&self, keys: &[String]) -> Result<Vec<LoginFailureRecord>> {
        let keys = keys.to_vec();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let rows = c
                .query("SELECT key, failures, last_at, locked_until FROM login_failures WHERE key = ANY($1)", &[&keys])
                .await
                .map_err(|e| pg.err(e))?;
            Ok(rows
                .iter()
                .map(|r| LoginFailureRecord {
                    key: r.get(0),
                    failures: r.get::<_, i32>(1).max(0) as u32,
                    last_at: r.get(2),
                    locked_until: r.get(3),
                })
                .collect())
        })
    }

    /// Count one failure for each key, in one transaction: a key whose
    /// window (`window_secs` since its last failure) or lock is over starts
    /// again at 1; a key with a limit (`Some(n)`) that reaches it is locked
    /// for `lockout_secs`. Returns, per key, the failures now counted and
    /// whether this call locked it.
    pub fn login_failures_add(
        &self,
        keys: &[(String, Option<u32>)],
        window_secs: i64,
        lockout_secs: i64,
    ) -> Result<Vec<LoginFailure>> {
        let keys = keys.to_vec();
        self.run(move |pg| async move {
            let mut c = pg.client().await?;
            let tx = c.transaction().await.map_err(|e| pg.err(e))?;
            let now = now_secs();
            let mut out = Vec::with_capacity(keys.len());
            for (key, limit) in keys {
                let row = tx
                    .query_one(
                        "INSERT INTO login_failures AS f (key, failures, last_at, locked_until) VALUES ($1, 1, $2, NULL)
                         ON CONFLICT (key) DO UPDATE SET
                             failures = CASE WHEN f.locked_until IS NOT NULL AND f.locked_until <= $2 THEN 1
                                             WHEN f.last_at < $2 - $3 THEN 1
                                             ELSE f.failures + 1 END,
                             locked_until = CASE WHEN f.locked_until > $2 THEN f.locked_until ELSE NULL END,
                             last_at = $2
                         RETURNING failures, locked_until",
                        &[&key, &now, &window_secs],
                    )
                    .await
                    .map_err(|e| pg.err(e))?;
                let failures = row.get::<_, i32>(0).max(0) as u32;
                let locked_until: Option<i64> = row.get(1);
                let mut locked_now = false;
                if let (Some(limit), None) = (limit, locked_until) {
                    if failures >= limit {
                        locked_now = tx
                            .execute(
                                "UPDATE login_failures SET locked_until = $2 WHERE key = $1 AND locked_until IS NULL",
                                &[&key, &(now + lockout_secs)],
                            )
                            .await
                            .map_err(|e| pg.err(e))?
                            == 1;
                    }
                }
                out.push(LoginFailure { failures, locked_now });
            }
            tx.commit().await.map_err(|e| pg.err(e))?;
            Ok(out)
        })
    }

    /// Forget the failures of `keys` after a successful login (a key locked
    /// now stays locked until its lock ends).
    pub fn login_failures_clear(&self, keys: &[String]) -> Result<()> {
        let keys = keys.to_vec();
        self.run(move |pg| async move {
            let c = pg.client().await?;
            c.execute(
                "DELETE FROM login_failures WHERE key = ANY($1) AND (locked_until IS NULL OR locked_until <= $2)",
                &[&keys, &now_secs()],
            )
            .await
            .map_err(|e| pg.err(e))?;
            Ok(())
        })
    }

    /// Drop rows whose window and lock are over. Returns how many.
    pub fn login_failures_prune(&self, window_secs: i64) -> Result<usize> {
        self.run(move |pg| async move {
            let c = pg.client().await?;
            let now = now_secs();
            let n = c
                .execute(
                    "DELETE FROM login_failures WHERE last_at < $1 AND (locked_until IS NULL OR locked_until <= $2)",
                    &[&(now - window_secs), &now],
                )
                .await
                .map_err(|e| pg.err(e))?;
            Ok(n as usize)
        })
    }
}
