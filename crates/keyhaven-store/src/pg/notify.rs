//! The node's listening connection: one `tokio-postgres` connection of its
//! own (outside the pool) that runs `LISTEN keyhaven_changes` and turns the
//! notifications of migration 0002's triggers into [`Changes`] for the
//! subscribers ([`crate::Store::changes`]).
//!
//! Notifications written by this node (payload node = ours) are dropped: the
//! node already applied its own writes. Users, API-key and token-removal
//! changes bump the accounts' generation here, before any subscriber runs,
//! so sessions look at their account again on their next call.
//!
//! When the connection breaks it is re-established with backoff (0.2 s
//! doubling to 10 s); notifications sent meanwhile are lost, so the first
//! batch after a reconnect is "everything". A connection that stops
//! answering without breaking (a half-open TCP connection: a stalled
//! network, a firewall that drops the flow, a stuck proxy) is noticed by a
//! ping every [`PING_EVERY`] that must be answered within [`PING_WAIT`], so
//! it is replaced within seconds rather than at the next 30 s reconcile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

/// How the listening connection talks to the server: as the pool does.
pub(crate) enum ListenTls {
    Off,
    Verify(tokio_postgres_rustls::MakeRustlsConnect),
}

use crate::changes::{Changes, FeedState};

/// The channel migration 0002's triggers notify.
pub(crate) const CHANNEL: &str = "keyhaven_changes";
/// A `SELECT 1` on the listening connection this often: one round trip
/// every 2 s per node is nothing to the server, and it bounds how long a
/// stalled connection can keep the node deaf to other nodes' changes
/// (`PING_EVERY + PING_WAIT`, then a reconnect and a full reload).
const PING_EVERY: Duration = Duration::from_secs(2);
/// Generous against a busy server (the ping queues behind notifications on
/// the wire): a false alarm costs a reconnect and a full reload, no more.
const PING_WAIT: Duration = Duration::from_secs(4);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long notifications are gathered into one batch after the first.
const GATHER: Duration = Duration::from_millis(5);

/// What the listener shares with its [`super::PgStore`].
pub(crate) struct Listening {
    pub(crate) node: String,
    pub(crate) feeds: Mutex<Vec<Weak<FeedState>>>,
    pub(crate) users_generation: Arc<AtomicU64>,
    /// Connections made so far (1 after the first; more after reconnects).
    pub(crate) connects: AtomicU64,
}

impl Listening {
    fn deliver(&self, c: Changes) {
        if c.everything || !c.users.is_empty() || c.api_keys || c.tokens {
            self.users_generation.fetch_add(1, Ordering::AcqRel);
        }
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.retain(|f| match f.upgrade() {
            Some(f) => {
                f.push(c.clone());
                true
            }
            None => false,
        });
    }

    pub(crate) fn close(&self) {
        for f in self.feeds.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            if let Some(f) = f.upgrade() {
                f.close();
            }
        }
    }
}

/// Parse one payload `<node>|<table>|<key>` into `into`, unless it is ours.
pub(crate) fn note(into: &mut Changes, payload: &str, own_node: &str) {
    let mut parts = payload.splitn(3, '|');
    let (Some(node), Some(table), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        // Not one of ours: be safe.
        *into = Changes::everything();
        return;
    };
    if node == own_node {
        return;
    }
    into.add(table, key);
}

/// Keep a listening connection up for as long as the store's runtime runs
/// (the runtime is shut down with the store).
pub(crate) async fn listen(cfg: tokio_postgres::Config, tls: ListenTls, target: String, me: Arc<Listening>) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let before = me.connects.load(Ordering::Acquire);
        let e = match &tls {
            ListenTls::Off => session(&cfg, &me, NoTls).await,
            ListenTls::Verify(c) => session(&cfg, &me, c.clone()).await,
        };
        if me.connects.load(Ordering::Acquire) > before {
            // It had connected: start the backoff afresh.
            backoff = BACKOFF_FIRST;
        }
        if me.connects.load(Ordering::Acquire) == 0 {
            tracing::warn!("listening for other nodes' changes on PostgreSQL at {target}: {e}; retrying");
        } else {
            tracing::warn!(
                "the connection that listens for other nodes' changes (PostgreSQL at {target}) broke: {e}; \
                 reconnecting, then reloading everything"
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's life: LISTEN, then forward notifications until it
/// breaks; returns why.
async fn session<T>(cfg: &tokio_postgres::Config, me: &Arc<Listening>, tls: T) -> String
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    match session_inner(cfg, me, tls).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner<T>(
    cfg: &tokio_postgres::Config,
    me: &Arc<Listening>,
    tls: T,
) -> Result<std::convert::Infallible, String>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut conn) = cfg.connect(tls).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // The connection is driven here; notifications go to the loop below.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return "the listener stopped".to_string();
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "the server closed the connection".to_string(),
            }
        }
    });
    let _abort = AbortOnDrop(driver.abort_handle());
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| e.to_string())?;
    if me.connects.fetch_add(1, Ordering::AcqRel) > 0 {
        // Whatever was sent while no connection listened is lost.
        me.deliver(Changes::everything());
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(first_payload) = msg else {
                    return Err("the connection ended".into());
                };
                let mut batch = Changes::default();
                let own = &me.node;
                note(&mut batch, &first_payload, own);
                // Gather what arrives right behind it (a transaction's rows).
                let until = tokio::time::Instant::now() + GATHER;
                while let Ok(Some(p)) = tokio::time::timeout_at(until, rx.recv()).await {
                    note(&mut batch, &p, own);
                }
                while let Ok(p) = rx.try_recv() {
                    note(&mut batch, &p, own);
                }
                if !batch.is_empty() {
                    me.deliver(batch);
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(PING_WAIT, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("no answer to a ping within {} s", PING_WAIT.as_secs())),
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_notifications_are_dropped_and_others_parsed() {
        let mut c = Changes::default();
        note(&mut c, "me|keychain|4", "me");
        assert!(c.is_empty());
        note(&mut c, "other|keychain|4", "me");
        note(&mut c, "|users|alice", "me");
        assert_eq!(c.keychain.iter().copied().collect::<Vec<_>>(), vec![4]);
        assert!(c.users.contains("alice"));
        note(&mut c, "garbage", "me");
        assert_eq!(c, Changes::everything());
    }
}
