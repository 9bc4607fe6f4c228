//! The failed-login limiter: who may try a password (or key, token, OTP,
//! download credential) now, how long they wait first, and who is refused.
//!
//! Three kinds of key, each with its own rule:
//!
//! * **(user, address)** — refused outright after `lock_after` failures, for
//!   `lockout`. This is the hard limit: it stops guessing one account from one
//!   place without touching anyone else.
//! * **address** — refused after `address_lock_after` failures of any
//!   usernames (made-up names cost a hash too), for `lockout`.
//! * **user** — only ever *slows* (at most [`USER_DELAY_CAP`]), so an attacker
//!   hammering `admin` from one address cannot lock the real admin out from
//!   another.
//!
//! An attempt counts as in flight from [`Limiter::begin`] until its outcome is
//! known, and in-flight attempts count towards the limits: pipelining a
//! hundred guesses gets no more than the limit checked. Attempts refused while
//! a key is locked are only counted; [`Limiter::take_summaries`] turns them
//! into one audit entry per key and lock period instead of a row and a log
//! line each. The map is bounded: expired entries are pruned, and past
//! `max_entries` the least recently used go (their summaries are kept).
//!
//! With several nodes on one PostgreSQL database the failures and locks are
//! the database's (`login_failures`, shared by every node: an attacker
//! cannot multiply the limits by the number of nodes): an attempt begun
//! with [`Limiter::begin_shared`] reads its keys' rows first and records its
//! outcome there. In-flight counts and refusal summaries stay per node. On
//! SQLite (one node) nothing of this runs: [`Limiter::begin`] is memory only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use keyhaven_store::Store;

/// Failures after which every further attempt is delayed.
pub const SLOW_AFTER: u32 = 3;
/// Failures older than this are forgotten.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(900);
/// The longest delay the per-user key adds to an attempt from an address that
/// has not failed itself: enough to blunt a spray, short enough that the real
/// admin still logs in within a second.
pub const USER_DELAY_CAP: Duration = Duration::from_millis(250);
/// The longest delay any attempt waits.
pub const DELAY_CAP: Duration = Duration::from_secs(4);

/// The limits, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lock_after: u32,
    pub address_lock_after: u32,
    pub lockout: Duration,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { lock_after: 10, address_lock_after: 20, lockout: Duration::from_secs(300), max_entries: 10_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    UserAddress(String, String),
    Address(String),
    User(String),
}

impl Key {
    /// The key's row in the shared table (see migration 0002 of the PostgreSQL schema).
    fn shared_key(&self) -> String {
        match self {
            Key::UserAddress(u, a) => format!("ua:{u}\n{a}"),
            Key::Address(a) => format!("a:{a}"),
            Key::User(u) => format!("u:{u}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Key::UserAddress(u, a) => format!("user {u} from {a}"),
            Key::Address(a) => format!("address {a}"),
            Key::User(u) => format!("user {u}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    in_flight: u32,
    last: Instant,
    locked_until: Option<Instant>,
    /// Attempts refused during the current lock, not yet summarised.
    refused: u32,
    first_refused: Option<SystemTime>,
    last_refused: Option<SystemTime>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            in_flight: 0,
            last: now,
            locked_until: None,
            refused: 0,
            first_refused: None,
            last_refused: None,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| t > now)
    }

    /// Whether nothing about this entry matters any more.
    fn expired(&self, now: Instant) -> bool {
        self.in_flight == 0
            && self.refused == 0
            && !self.locked(now)
            && (self.locked_until.is_some() || now.duration_since(self.last) > FAILURE_WINDOW)
    }
}

/// Refused attempts of one key over one lock period, for the audit log.
#[derive(Debug, Clone)]
pub struct Summary {
    pub username: Option<String>,
    pub address: Option<String>,
    pub what: String,
    pub count: u32,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// Why an attempt may not even be checked.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The key that refused it, e.g. "user admin from 10.0.0.9".
    pub what: String,
    pub retry_after: Duration,
    /// The first refusal of this lock period: worth one log line.
    pub first: bool,
}

/// An attempt allowed to proceed; report its outcome with [`Attempt::failed`]
/// or [`Attempt::succeeded`]. Dropped without either, it counts as failed.
pub struct Attempt<'a> {
    limiter: &'a Limiter,
    /// Where failures are shared with other nodes, if anywhere.
    shared: Option<&'a Store>,
    keys: Vec<Key>,
    /// How long to wait before checking the credential.
    pub delay: Duration,
    done: bool,
}

/// What a failure led to.
#[derive(Debug, Clone, Default)]
pub struct FailureOutcome {
    /// Keys this failure locked, described ("user admin from 10.0.0.9").
    pub locked: Vec<String>,
}

impl Attempt<'_> {
    pub fn failed(mut self) -> FailureOutcome {
        self.done = true;
        self.limiter.finish(&self.keys, false, self.shared)
    }

    pub fn succeeded(mut self) {
        self.done = true;
        self.limiter.finish(&self.keys, true, self.shared);
    }

    /// The credential was never checked (the server was busy): only the
    /// in-flight count is returned, nothing is forgiven or counted.
    pub fn unchecked(mut self) {
        self.done = true;
        self.limiter.release(&self.keys);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(&self.keys, false, self.shared);
        }
    }
}

/// In-memory state of failed logins.
pub struct Limiter {
    limits: Limits,
    map: Mutex<HashMap<Key, Entry>>,
    /// Summaries of entries evicted before they were taken.
    evicted: Mutex<Vec<Summary>>,
}

fn delay_for(failures: u32) -> Duration {
    if failures < SLOW_AFTER {
        return Duration::ZERO;
    }
    // 250 ms, 500 ms, 1 s, 2 s, 4 s.
    let step = (failures - SLOW_AFTER).min(4);
    Duration::from_millis(250u64 << step).min(DELAY_CAP)
}

impl Limiter {
    pub fn new(limits: Limits) -> Limiter {
        Limiter { limits, map: Mutex::new(HashMap::new()), evicted: Mutex::new(Vec::new()) }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn threshold(&self, k: &Key) -> Option<u32> {
        match k {
            Key::UserAddress(..) => Some(self.limits.lock_after),
            Key::Address(_) => Some(self.limits.address_lock_after),
            Key::User(_) => None,
        }
    }

    fn keys(username: Option<&str>, address: &str) -> Vec<Key> {
        let mut keys = vec![Key::Address(address.to_string())];
        if let Some(u) = username {
            keys.push(Key::UserAddress(u.to_string(), address.to_string()));
            keys.push(Key::User(u.to_string()));
        }
        keys
    }

    /// Start an attempt for `username` (if known) from `address`.
    pub fn begin(&self, username: Option<&str>, address: &str) -> Result<Attempt<'_>, Refusal> {
        self.begin_shared(username, address, None)
    }

    /// [`Limiter::begin`] with the failures and locks of `shared` (the
    /// store, when several nodes share it) instead of this node's memory.
    /// Should the database not answer, the node's memory decides alone.
    pub fn begin_shared<'a>(
        &'a self,
        username: Option<&str>,
        address: &str,
        shared: Option<&'a Store>,
    ) -> Result<Attempt<'a>, Refusal> {
        let now = Instant::now();
        let keys = Self::keys(username, address);
        let rows = shared.and_then(|store| {
            let names: Vec<String> = keys.iter().map(Key::shared_key).collect();
            store.login_failures(&names).map_err(|e| tracing::warn!("reading the shared failed logins: {e}")).ok()
        });
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rows) = &rows {
            let unix = unix_now();
            for k in &keys {
                let name = k.shared_key();
                let e = map.entry(k.clone()).or_insert_with(|| Entry::new(now));
                match rows.iter().find(|r| r.key == name) {
                    Some(r) => {
                        let lock_over = r.locked_until.is_some_and(|t| t <= unix);
                        let age = Duration::from_secs(unix.saturating_sub(r.last_at).max(0) as u64);
                        e.failures = if lock_over || age > FAILURE_WINDOW { 0 } else { r.failures };
                        e.locked_until =
                            r.locked_until.filter(|t| *t > unix).map(|t| now + Duration::from_secs((t - unix) as u64));
                        e.last = now.checked_sub(age).unwrap_or(e.last);
                    }
                    None => {
                        e.failures = 0;
                        e.locked_until = None;
                    }
                }
            }
        }
        // Refused: a locked key, or one whose failures plus attempts still
        // being checked already reach its limit.
        for k in &keys {
            let Some(limit) = self.threshold(k) else { continue };
            let Some(e) = map.get_mut(k) else { continue };
            if e.locked(now) {
                let first = e.refused == 0;
                e.refused += 1;
                let wall = SystemTime::now();
                e.first_refused.get_or_insert(wall);
                e.last_refused = Some(wall);
                let retry_after = e.locked_until.map(|t| t.duration_since(now)).unwrap_or_default();
                return Err(Refusal { what: k.describe(), retry_after, first });
            }
            if e.locked_until.is_some() {
                // The lock is over: start counting afresh.
                e.failures = 0;
                e.locked_until = None;
            }
            if e.failures + e.in_flight >= limit {
                return Err(Refusal { what: k.describe(), retry_after: Duration::from_secs(1), first: false });
            }
        }
        let mut own = 0u32;
        let mut user = 0u32;
        for k in &keys {
            let e = map.entry(k.clone()).or_insert_with(|| Entry::new(now));
            if now.duration_since(e.last) > FAILURE_WINDOW && e.in_flight == 0 && !e.locked(now) {
                e.failures = 0;
            }
            e.in_flight += 1;
            e.last = now;
            match k {
                Key::User(_) => user = e.failures,
                _ => own = own.max(e.failures),
            }
        }
        let delay = delay_for(own).max(delay_for(user).min(USER_DELAY_CAP));
        if map.len() > self.limits.max_entries {
            self.prune_locked(&mut map, now);
        }
        drop(map);
        Ok(Attempt { limiter: self, shared, keys, delay, done: false })
    }

    fn release(&self, keys: &[Key]) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            if let Some(e) = map.get_mut(k) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
        }
    }

    fn finish(&self, keys: &[Key], success: bool, shared: Option<&Store>) -> FailureOutcome {
        // The shared rows first, outside the map's lock (a round trip).
        let counted = shared.and_then(|store| {
            let r = if success {
                let names: Vec<String> = keys.iter().map(Key::shared_key).collect();
                store.login_failures_clear(&names).map(|()| Vec::new())
            } else {
                let rows: Vec<(String, Option<u32>)> =
                    keys.iter().map(|k| (k.shared_key(), self.threshold(k))).collect();
                store.login_failures_add(&rows, FAILURE_WINDOW.as_secs() as i64, self.limits.lockout.as_secs() as i64)
            };
            r.map_err(|e| tracing::warn!("recording a login outcome in the shared failed logins: {e}")).ok()
        });
        let now = Instant::now();
        let mut out = FailureOutcome::default();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (i, k) in keys.iter().enumerate() {
            let Some(e) = map.get_mut(k) else { continue };
            if let (false, Some(c)) = (success, counted.as_ref().and_then(|c| c.get(i))) {
                // Counted by the database, across nodes: take its numbers.
                e.in_flight = e.in_flight.saturating_sub(1);
                e.last = now;
                e.failures = c.failures;
                if c.locked_now {
                    e.locked_until = Some(now + self.limits.lockout);
                    out.locked.push(k.describe());
                }
                continue;
            }
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last = now;
            if success {
                // The address just proved it holds valid credentials for this
                // account: forget its failures (a lock of the address stays).
                match k {
                    Key::UserAddress(..) | Key::User(_) => e.failures = 0,
                    Key::Address(_) if !e.locked(now) => e.failures = 0,
                    Key::Address(_) => {}
                }
                continue;
            }
            e.failures += 1;
            if let Some(limit) = self.threshold(k) {
                if e.failures >= limit && !e.locked(now) {
                    e.locked_until = Some(now + self.limits.lockout);
                    out.locked.push(k.describe());
                }
            }
        }
        out
    }

    /// Drop what no longer matters; keep the map under `max_entries` by
    /// evicting the least recently used entries (summarising their refusals).
    fn prune_locked(&self, map: &mut HashMap<Key, Entry>, now: Instant) {
        map.retain(|_, e| !e.expired(now));
        if map.len() <= self.limits.max_entries {
            return;
        }
        let target = self.limits.max_entries * 9 / 10;
        let mut by_age: Vec<(Instant, Key)> =
            map.iter().filter(|(_, e)| e.in_flight == 0).map(|(k, e)| (e.last, k.clone())).collect();
        by_age.sort_by_key(|(t, _)| *t);
        let mut evicted = self.evicted.lock().unwrap_or_else(|p| p.into_inner());
        for (_, k) in by_age.into_iter().take(map.len().saturating_sub(target)) {
            if let Some(e) = map.remove(&k) {
                if let Some(s) = summary_of(&k, &e) {
                    evicted.push(s);
                }
            }
        }
    }

    /// Prune expired entries now (called periodically).
    pub fn prune(&self) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.prune_locked(&mut map, now);
    }

    /// Summaries of refused attempts whose lock has ended (or all, with
    /// `all`, at shutdown); each is taken once.
    pub fn take_summaries(&self, all: bool) -> Vec<Summary> {
        let now = Instant::now();
        let mut out = std::mem::take(&mut *self.evicted.lock().unwrap_or_else(|p| p.into_inner()));
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (k, e) in map.iter_mut() {
            if e.refused > 0 && (all || !e.locked(now)) {
                if let Some(s) = summary_of(k, e) {
                    out.push(s);
                }
                e.refused = 0;
                e.first_refused = None;
                e.last_refused = None;
            }
        }
        self.prune_locked(&mut map, now);
        out
    }

    /// Number of keys tracked (for tests and metrics).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn summary_of(k: &Key, e: &Entry) -> Option<Summary> {
    if e.refused == 0 {
        return None;
    }
    let (username, address) = match k {
        Key::UserAddress(u, a) => (Some(u.clone()), Some(a.clone())),
        Key::Address(a) => (None, Some(a.clone())),
        Key::User(u) => (Some(u.clone()), None),
    };
    Some(Summary {
        username,
        address,
        what: k.describe(),
        count: e.refused,
        first: e.first_refused.unwrap_or_else(SystemTime::now),
        last: e.last_refused.unwrap_or_else(SystemTime::now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Limiter {
        Limiter::new(Limits { lock_after: 3, address_lock_after: 5, lockout: Duration::from_secs(60), max_entries: 50 })
    }

    #[test]
    fn in_flight_attempts_count_towards_the_lock() {
        let l = limiter();
        let a: Vec<_> = (0..3).map(|_| l.begin(Some("admin"), "10.0.0.9").unwrap()).collect();
        // Three in flight for (admin, 10.0.0.9): a fourth is refused before any finished.
        assert!(l.begin(Some("admin"), "10.0.0.9").is_err());
        // The same user from elsewhere is not.
        l.begin(Some("admin"), "10.0.0.1").unwrap().succeeded();
        let locked: Vec<_> = a.into_iter().flat_map(|x| x.failed().locked).collect();
        assert_eq!(locked, vec!["user admin from 10.0.0.9".to_string()]);
        let r = l.begin(Some("admin"), "10.0.0.9").err().unwrap();
        assert!(r.first && r.retry_after > Duration::from_secs(50), "{r:?}");
        assert!(!l.begin(Some("admin"), "10.0.0.9").err().unwrap().first);
    }

    #[test]
    fn user_key_only_slows_and_address_key_locks_sprays() {
        let l = limiter();
        for i in 0..2 {
            l.begin(Some("admin"), &format!("10.0.1.{i}")).unwrap().failed();
        }
        for i in 0..5 {
            l.begin(Some("admin"), &format!("10.0.2.{i}")).unwrap().failed();
        }
        // Seven failures for admin from seven addresses: a clean address is
        // slowed by at most the user cap and never refused.
        let a = l.begin(Some("admin"), "10.0.0.1").unwrap();
        assert!(a.delay <= USER_DELAY_CAP && a.delay > Duration::ZERO, "{:?}", a.delay);
        a.succeeded();
        // Made-up usernames from one address: locked by the address key.
        for i in 0..5 {
            l.begin(Some(&format!("u{i}")), "10.0.3.3").unwrap().failed();
        }
        let r = l.begin(Some("someone"), "10.0.3.3").err().unwrap();
        assert_eq!(r.what, "address 10.0.3.3");
    }

    #[test]
    fn refusals_are_summarised_once_and_the_map_stays_bounded() {
        let l = limiter();
        for _ in 0..3 {
            l.begin(Some("admin"), "10.0.0.9").unwrap().failed();
        }
        for _ in 0..1000 {
            assert!(l.begin(Some("admin"), "10.0.0.9").is_err());
        }
        assert!(l.take_summaries(false).is_empty(), "still locked: nothing to summarise yet");
        let s = l.take_summaries(true);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].count, 1000);
        assert_eq!(s[0].username.as_deref(), Some("admin"));
        assert!(l.take_summaries(true).is_empty(), "taken once");
        // Thousands of addresses: the map never grows past its bound.
        for i in 0..2000 {
            l.begin(Some("x"), &format!("10.1.{}.{}", i / 250, i % 250)).unwrap().failed();
        }
        assert!(l.len() <= 51, "{}", l.len());
    }

    #[test]
    fn dropped_attempt_counts_as_failure() {
        let l = limiter();
        for _ in 0..3 {
            drop(l.begin(Some("admin"), "10.0.0.9").unwrap());
        }
        assert!(l.begin(Some("admin"), "10.0.0.9").is_err());
    }
}
