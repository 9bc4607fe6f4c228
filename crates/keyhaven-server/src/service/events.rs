//! Events clients subscribe to: TrueNAS's `core.subscribe` (JSON-RPC
//! `collection_update` notifications) and the legacy `sub` message. One
//! broadcast bus; each connection forwards the collections it subscribed to
//! (see `transport::ws`).

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

/// Collections keyhaven publishes. Subscribing to another name is accepted
/// (TrueNAS clients subscribe to what they know) but delivers nothing.
pub const COLLECTIONS: &[&str] = &["core.get_jobs"];

/// Events kept for a slow subscriber before it starts missing some.
const BACKLOG: usize = 1024;

/// One change to a collection: `msg` is `added`, `changed` or `removed`.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub collection: &'static str,
    pub msg: &'static str,
    pub id: Value,
    pub fields: Value,
}

impl Event {
    /// The `params` of a JSON-RPC `collection_update` notification, which is
    /// also the legacy message body.
    pub fn body(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

pub struct Events {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Events {
    fn default() -> Self {
        Events { tx: broadcast::channel(BACKLOG).0 }
    }
}

impl Events {
    /// Publish to every current subscriber (none is fine).
    pub fn publish(&self, e: Event) {
        let _ = self.tx.send(Arc::new(e));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}
