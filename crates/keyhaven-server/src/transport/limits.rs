//! Connection limits at the network edge: how many TCP connections are served
//! at once, how many from one source address, and which connection gives way
//! when the server is full.
//!
//! Every accepted connection holds a [`ConnTicket`] for as long as it lives —
//! across a WebSocket upgrade too, since the upgraded socket outlives the HTTP
//! connection that carried the upgrade. A connection marks its ticket
//! authenticated once its session logs in. When the server is full, a new
//! connection takes the place of the oldest connection that has not logged in,
//! picked from the address holding the most connections: a flood of half-open
//! requests can never keep an administrator (or the local CLI, which does not
//! count here) from logging in.
//!
//! The open-file limit is raised to its hard maximum at start, and the
//! connection cap kept below it with [`FD_RESERVE`] descriptors to spare for
//! the database, the unix socket, sshd and the files keyhaven writes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// File descriptors kept free for everything but TCP clients.
pub const FD_RESERVE: u64 = 128;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address already holds `max_connections_per_address`.
    PerAddress,
    /// The server is full of logged-in connections.
    Full,
}

/// Shared state of one admitted connection.
#[derive(Debug, Default)]
pub struct ConnState {
    authenticated: AtomicBool,
    evicted: Notify,
}

impl ConnState {
    pub fn mark_authenticated(&self, yes: bool) {
        self.authenticated.store(yes, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// Resolves once the registry gave this connection's place to another.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

struct Slot {
    addr: IpAddr,
    state: Arc<ConnState>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// By age: ids only grow.
    open: BTreeMap<u64, Slot>,
    per_addr: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.open.remove(&id)?;
        if let Some(n) = self.per_addr.get_mut(&slot.addr) {
            *n -= 1;
            if *n == 0 {
                self.per_addr.remove(&slot.addr);
            }
        }
        Some(slot)
    }
}

/// The connections being served.
pub struct Registry {
    max: usize,
    per_addr: usize,
    inner: Mutex<Inner>,
}

/// One admitted connection's place; dropping it frees the place.
pub struct ConnTicket {
    id: u64,
    registry: Arc<Registry>,
    pub state: Arc<ConnState>,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        self.registry.inner.lock().unwrap_or_else(|p| p.into_inner()).remove(self.id);
    }
}

impl Registry {
    pub fn new(max: usize, per_addr: usize) -> Arc<Registry> {
        Arc::new(Registry { max: max.max(1), per_addr: per_addr.max(1), inner: Mutex::new(Inner::default()) })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now (total, from `addr`).
    pub fn open(&self, addr: IpAddr) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.open.len(), inner.per_addr.get(&addr).copied().unwrap_or(0))
    }

    /// Admit a connection from `addr`, evicting an unauthenticated one when full.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<ConnTicket, Refused> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.per_addr.get(&addr).copied().unwrap_or(0) >= self.per_addr {
            return Err(Refused::PerAddress);
        }
        if inner.open.len() >= self.max {
            // The oldest unauthenticated connection of the busiest address.
            let victim = inner
                .open
                .iter()
                .filter(|(_, s)| !s.state.is_authenticated())
                .max_by_key(|(id, s)| (inner.per_addr.get(&s.addr).copied().unwrap_or(0), std::cmp::Reverse(**id)))
                .map(|(id, _)| *id);
            match victim.and_then(|id| inner.remove(id)) {
                Some(slot) => slot.state.evicted.notify_one(),
                None => return Err(Refused::Full),
            }
        }
        let id = inner.next;
        inner.next += 1;
        let state = Arc::new(ConnState::default());
        inner.open.insert(id, Slot { addr, state: state.clone() });
        *inner.per_addr.entry(addr).or_default() += 1;
        Ok(ConnTicket { id, registry: self.clone(), state })
    }
}

/// Raise the soft open-file limit to the hard one; returns the soft limit now
/// in force (or `None` when it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    if let (Some(_), Some(hard)) = (cur.current, cur.maximum) {
        let want = Rlimit { current: Some(hard), maximum: Some(hard) };
        if setrlimit(Resource::Nofile, want).is_ok() {
            return Some(hard);
        }
    }
    cur.current
}

/// The connection cap to use: the setting, kept [`FD_RESERVE`] below the
/// open-file limit.
pub fn effective_max(setting: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(n) => setting.min(n.saturating_sub(FD_RESERVE).max(16) as usize),
        None => setting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_cap_and_release_on_drop() {
        let r = Registry::new(100, 2);
        let a = r.admit(ip("10.0.0.1")).unwrap();
        let _b = r.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(r.admit(ip("10.0.0.1")).err(), Some(Refused::PerAddress));
        assert!(r.admit(ip("10.0.0.2")).is_ok());
        drop(a);
        assert!(r.admit(ip("10.0.0.1")).is_ok());
    }

    #[tokio::test]
    async fn full_server_evicts_the_busiest_addresses_oldest_unauthenticated() {
        let r = Registry::new(4, 10);
        let admin_old = r.admit(ip("10.0.0.1")).unwrap();
        admin_old.state.mark_authenticated(true);
        let flood: Vec<_> = (0..3).map(|_| r.admit(ip("10.0.0.66")).unwrap()).collect();
        // Full: a fresh admin connection takes the flood's oldest place.
        let fresh = r.admit(ip("10.0.0.1")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), flood[0].state.evicted()).await.unwrap();
        assert_eq!(r.open(ip("10.0.0.66")), (4, 2));
        // Logged-in connections are never evicted.
        fresh.state.mark_authenticated(true);
        for f in &flood[1..] {
            f.state.mark_authenticated(true);
        }
        assert_eq!(r.admit(ip("10.0.0.7")).err(), Some(Refused::Full));
    }

    #[test]
    fn cap_stays_below_the_open_file_limit() {
        assert_eq!(effective_max(1024, Some(1024)), 896);
        assert_eq!(effective_max(1024, Some(65536)), 1024);
        assert_eq!(effective_max(1024, None), 1024);
    }
}
