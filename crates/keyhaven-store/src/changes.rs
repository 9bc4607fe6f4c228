//! What other nodes changed in a shared database: [`Changes`] (which rows of
//! which tables, or "everything" when notifications may have been missed)
//! and [`ChangeFeed`], the subscription [`crate::Store::changes`] hands out.
//!
//! The feed coalesces: whatever arrived since the subscriber last looked is
//! merged into one [`Changes`], and past [`MAX_KEYS`] keys of a table it
//! becomes "everything", so a slow subscriber costs bounded memory and
//! catches up with one reload instead of a backlog.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Keys of one table kept before a batch is widened to "everything".
pub const MAX_KEYS: usize = 4096;

/// Rows changed by other nodes since the last look, by table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Notifications may have been missed (the listening connection was
    /// re-established): every table may have changed. The sets below are
    /// then empty.
    pub everything: bool,
    /// Accounts, by username (a deleted account is named too).
    pub users: BTreeSet<String>,
    /// Some API key was created, changed or deleted.
    pub api_keys: bool,
    /// Some reusable token was removed (sessions opened with it end).
    pub tokens: bool,
    /// Keychain credentials, by id.
    pub keychain: BTreeSet<i64>,
    /// Settings, by key (`ssh`, `service.ssh`, …).
    pub settings: BTreeSet<String>,
    /// Some sshd host key was added or replaced.
    pub host_keys: bool,
    /// Rsync tasks, by id.
    pub rsync_tasks: BTreeSet<i64>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// Every table may have changed.
    pub fn everything() -> Changes {
        Changes { everything: true, ..Changes::default() }
    }

    /// Record one notification: `table` and its row's key. Unknown tables
    /// and keys that do not parse widen the batch to everything (a newer
    /// node may announce more than this one knows).
    pub fn add(&mut self, table: &str, key: &str) {
        if self.everything {
            return;
        }
        let ok = match table {
            "users" => insert(&mut self.users, key.to_string()),
            "api_keys" => {
                self.api_keys = true;
                true
            }
            "tokens" => {
                self.tokens = true;
                true
            }
            "keychain" => key.parse().is_ok_and(|id| insert(&mut self.keychain, id)),
            "settings" => insert(&mut self.settings, key.to_string()),
            "host_keys" => {
                self.host_keys = true;
                true
            }
            "rsync_tasks" => key.parse().is_ok_and(|id| insert(&mut self.rsync_tasks, id)),
            _ => false,
        };
        if !ok {
            *self = Changes::everything();
        }
    }

    /// Merge `other` into this batch.
    pub fn merge(&mut self, other: Changes) {
        if self.everything || other.everything {
            *self = Changes::everything();
            return;
        }
        self.api_keys |= other.api_keys;
        self.tokens |= other.tokens;
        self.host_keys |= other.host_keys;
        let fits = extend(&mut self.users, other.users)
            && extend(&mut self.keychain, other.keychain)
            && extend(&mut self.settings, other.settings)
            && extend(&mut self.rsync_tasks, other.rsync_tasks);
        if !fits {
            *self = Changes::everything();
        }
    }
}

/// Insert within [`MAX_KEYS`]; `false` when the set is full.
fn insert<T: Ord>(set: &mut BTreeSet<T>, v: T) -> bool {
    if set.len() >= MAX_KEYS && !set.contains(&v) {
        return false;
    }
    set.insert(v);
    true
}

fn extend<T: Ord>(set: &mut BTreeSet<T>, more: BTreeSet<T>) -> bool {
    for v in more {
        if !insert(set, v) {
            return false;
        }
    }
    true
}

/// The shared side of one subscription: what arrived and not yet taken.
#[derive(Default)]
pub(crate) struct FeedState {
    pending: Mutex<Changes>,
    wake: tokio::sync::Notify,
    closed: AtomicBool,
}

impl FeedState {
    pub(crate) fn push(&self, c: Changes) {
        if c.is_empty() {
            return;
        }
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).merge(c);
        self.wake.notify_one();
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A subscription to other nodes' changes (see [`crate::Store::changes`]).
/// Usable from any tokio runtime.
pub struct ChangeFeed {
    state: Arc<FeedState>,
}

impl ChangeFeed {
    pub(crate) fn new() -> (ChangeFeed, Arc<FeedState>) {
        let state = Arc::new(FeedState::default());
        (ChangeFeed { state: state.clone() }, state)
    }

    /// The changes that arrived since the last call, waiting for some;
    /// `None` once the store is gone.
    pub async fn next(&self) -> Option<Changes> {
        loop {
            let taken = std::mem::take(&mut *self.state.pending.lock().unwrap_or_else(|p| p.into_inner()));
            if !taken.is_empty() {
                return Some(taken);
            }
            if self.state.closed.load(Ordering::Acquire) {
                return None;
            }
            self.state.wake.notified().await;
        }
    }

    /// What arrived so far, without waiting (empty when nothing did).
    pub fn take(&self) -> Changes {
        std::mem::take(&mut *self.state.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_coalesce_and_widen_to_everything() {
        let mut c = Changes::default();
        c.add("users", "alice");
        c.add("users", "alice");
        c.add("keychain", "42");
        c.add("settings", "ssh");
        c.add("api_keys", "7");
        c.add("tokens", "3");
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.keychain.iter().copied().collect::<Vec<_>>(), vec![42]);
        assert!(c.api_keys && c.tokens && !c.host_keys && !c.everything);
        // A key that does not parse, or a table this node does not know: reload everything.
        let mut bad = c.clone();
        bad.add("keychain", "not-a-number");
        assert_eq!(bad, Changes::everything());
        let mut unknown = c.clone();
        unknown.add("some_future_table", "1");
        assert_eq!(unknown, Changes::everything());
        // Past the bound, one reload instead of a list.
        let mut many = Changes::default();
        for i in 0..=MAX_KEYS {
            many.add("keychain", &i.to_string());
        }
        assert_eq!(many, Changes::everything());
        c.merge(Changes::everything());
        assert_eq!(c, Changes::everything());
    }

    #[tokio::test]
    async fn a_feed_delivers_merged_batches_and_ends_when_closed() {
        let (feed, state) = ChangeFeed::new();
        let mut a = Changes::default();
        a.add("keychain", "1");
        let mut b = Changes::default();
        b.add("keychain", "2");
        state.push(a);
        state.push(b);
        let got = feed.next().await.unwrap();
        assert_eq!(got.keychain.into_iter().collect::<Vec<_>>(), vec![1, 2]);
        assert!(feed.take().is_empty());
        let waiter = tokio::spawn(async move { feed.next().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        state.close();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
