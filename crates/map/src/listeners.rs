//! Entry listeners: local subscriptions per map, and which members listen to which map (from
//! gossip), so that owners send events only where someone listens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use grapevine_membership::MemberId;
use tokio::sync::broadcast;
use tracing::{debug, info};

use crate::messages::{Msg, RawEntryEvent};
use crate::node::{MAP_SERVICE, Node};

/// Gossip key prefix announcing that a member has listeners on a map: `listen:<map>`.
pub(crate) const LISTEN_KEY_PREFIX: &str = "listen:";

/// Capacity of a map's local listener channel; a slower listener gets `Lagged`.
pub(crate) const LISTENER_CHANNEL_CAPACITY: usize = 4096;

/// The listener registry of one member.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    local: Mutex<HashMap<String, broadcast::Sender<RawEntryEvent>>>,
    /// Members with listeners, per map, from gossip.
    remote: RwLock<HashMap<String, Vec<MemberId>>>,
    /// Whether `remote` names any map: every write asks, and most clusters have no listener.
    remote_any: AtomicBool,
}

impl Listeners {
    /// Delivers events to local listeners.
    pub(crate) fn deliver_local(&self, events: Vec<RawEntryEvent>) {
        let listeners = self.local.lock().unwrap();
        for event in events {
            if let Some(tx) = listeners.get(&event.map) {
                // No receiver left is fine: the subscription was dropped.
                let _ = tx.send(event);
            }
        }
    }

    /// The members that listen to `map`, from gossip.
    pub(crate) fn of(&self, map: &str) -> Vec<MemberId> {
        self.remote.read().unwrap().get(map).cloned().unwrap_or_default()
    }

    /// Whether any member (this one included) listens to `map`: what [`Node::publish_events`]
    /// sends to, without copying the list.
    pub(crate) fn any(&self, map: &str) -> bool {
        self.remote_any.load(Ordering::Acquire)
            && self.remote.read().unwrap().get(map).is_some_and(|members| !members.is_empty())
    }

    /// A receiver of `map`'s local events, and whether it is the first subscription to `map`.
    fn subscribe(&self, map: &str) -> (broadcast::Receiver<RawEntryEvent>, bool) {
        let mut listeners = self.local.lock().unwrap();
        match listeners.get(map) {
            Some(tx) => (tx.subscribe(), false),
            None => {
                let (tx, rx) = broadcast::channel(LISTENER_CHANNEL_CAPACITY);
                listeners.insert(map.to_string(), tx);
                (rx, true)
            }
        }
    }
}

impl Node {
    /// Sends entry events to every member listening on the map (this one included).
    pub(crate) fn publish_events(&self, map: &str, events: Vec<RawEntryEvent>) {
        if events.is_empty() {
            return;
        }
        let members = self.listeners.of(map);
        if members.is_empty() {
            return;
        }
        let msg = Self::encode(&Msg::Events { events: events.clone() });
        for member in members {
            if member == self.local {
                self.listeners.deliver_local(events.clone());
            } else if let Err(error) = self.net.send(&member, MAP_SERVICE, msg.clone()) {
                debug!(%member, %error, "entry events not delivered");
            }
        }
    }

    /// Keeps the per-map listener registry in step with gossip.
    pub(crate) fn refresh_listener_registry(&self) {
        let view = self.membership.view();
        let mut registry: HashMap<String, Vec<MemberId>> = HashMap::new();
        for member in &view.members {
            for key in member.ext.keys() {
                if let Some(map) = key.strip_prefix(LISTEN_KEY_PREFIX) {
                    registry.entry(map.to_string()).or_default().push(member.id.clone());
                }
            }
        }
        let any = !registry.is_empty();
        *self.listeners.remote.write().unwrap() = registry;
        self.listeners.remote_any.store(any, Ordering::Release);
    }

    /// Remembers that a local subscription exists and announces it in gossip (first one only).
    pub(crate) async fn subscribe(&self, map: &str) -> broadcast::Receiver<RawEntryEvent> {
        let (rx, first) = self.listeners.subscribe(map);
        if first {
            self.membership.set_ext_key(&format!("{LISTEN_KEY_PREFIX}{map}"), "1").await;
            info!(map, "listening for entry events");
        }
        rx
    }
}
