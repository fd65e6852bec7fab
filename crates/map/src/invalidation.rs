//! The invalidation bus: owners tell near-caching members which keys changed.
//!
//! **Who gets events.** A member that near-caches a map announces it in gossip (`x:nc:<map>`)
//! and sends `Register` to every member, so owners know at once rather than a gossip round later.
//! Owners keep, per map, the members to notify (the union of both, members in the view only).
//!
//! **What an owner sends.** Every change an owner stamps with a partition sequence number (in
//! `replicate_locked` and the expiry sweep, under the partition's lock) is queued for every
//! member near-caching that map, as `(map, partition, term, seq, key)`; consecutive changes of a
//! partition share one [`Run`]. A member's queue is sent once `batch_size` changes wait or the
//! oldest has waited `batch_delay`, whichever comes first, in queue order (the data plane keeps
//! it). Every `heartbeat_interval` the owner also queues the position `(term, seq)` of each
//! partition it owns, read under the partition's lock, so a position never overtakes the changes
//! it counts. Queues are bounded: when one is full, changes are dropped, and the receiver sees
//! the gap. The receiving side is [`crate::near_cache`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use grapevine_membership::MemberId;
use grapevine_net::{Handler, Incoming, Reply as NetReply, ServiceId, codec};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::config::{InvalidationSettings, RELIABLE_TOPIC_MAP_PREFIX};
use crate::messages::ReplOp;
use crate::near_cache::{NearCache, NearCacheStats};
use crate::node::Node;
use crate::record::now_ms;
use crate::table::Term;

/// The data-plane service id of the invalidation bus.
pub const INVALIDATION_SERVICE: ServiceId = ServiceId(2);

/// Gossip key prefix announcing that a member near-caches a map: `nc:<map>`.
pub(crate) const NEAR_CACHE_KEY_PREFIX: &str = "nc:";

/// Changes a member's queue holds at most, as a multiple of the batch size (and at least
/// [`QUEUE_CHANGES_MIN`]); beyond it changes are dropped and the receiver purges on the gap.
const QUEUE_BATCHES_MAX: usize = 64;
const QUEUE_CHANGES_MIN: usize = 4096;

/// Maps one member may register near caches for (explicitly; gossip is bounded by its own size).
const REGISTRATIONS_PER_MEMBER_MAX: usize = 1024;

/// Consecutive changes of one map partition, or a position report (no keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Run {
    pub(crate) map: String,
    pub(crate) partition: u32,
    pub(crate) term: Term,
    /// The partition's position after the run: its changes are numbered `seq - keys.len() + 1`
    /// to `seq`.
    pub(crate) seq: u64,
    /// The key each change touched (`None`: the whole partition, e.g. a clear).
    pub(crate) keys: Vec<Option<Vec<u8>>>,
}

/// Messages of the invalidation bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum InvMsg {
    /// Near-caching member → any member: send me the changes of `map`.
    Register { map: String },
    /// Owner → near-caching member.
    Events { runs: Vec<Run> },
    /// Anyone → member: your near caches' statistics.
    Stats,
}

/// Replies of the invalidation bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum InvReply {
    Ack,
    Stats(Vec<NearCacheStats>),
    Failed { error: String },
}

/// One member's queue of events to send.
#[derive(Debug, Default)]
struct Outbox {
    runs: Vec<Run>,
    changes: usize,
    since: Option<Instant>,
    dropped: u64,
}

impl Outbox {
    /// Queues a change (`Some(key)` or a whole-partition `None`), or a position report when
    /// `change` is `None`. Returns false when the queue is full and the change was dropped.
    fn push(&mut self, map: &str, p: u32, term: &Term, seq: u64, change: Option<Option<Vec<u8>>>, max: usize) -> bool {
        if change.is_some() && self.changes >= max {
            self.dropped += 1;
            return false;
        }
        self.since.get_or_insert_with(Instant::now);
        if let Some(last) = self.runs.last_mut()
            && last.partition == p
            && last.map == map
            && last.term == *term
        {
            match change {
                Some(key) if seq == last.seq + 1 => {
                    last.keys.push(key);
                    last.seq = seq;
                    self.changes += 1;
                    return true;
                }
                None if seq == last.seq => return true,
                _ => {}
            }
        }
        let keys = match change {
            Some(key) => {
                self.changes += 1;
                vec![key]
            }
            None => Vec::new(),
        };
        self.runs.push(Run { map: map.to_string(), partition: p, term: term.clone(), seq, keys });
        true
    }

    fn take(&mut self) -> Vec<Run> {
        self.changes = 0;
        self.since = None;
        std::mem::take(&mut self.runs)
    }
}

/// The invalidation state of one member: as owner (who near-caches what, queues to them) and as
/// near-caching member (its caches).
pub(crate) struct Invalidation {
    pub(crate) settings: InvalidationSettings,
    /// Per map: members to send its changes to.
    registry: RwLock<HashMap<String, Vec<MemberId>>>,
    /// Explicit registrations, per member (pruned to the view).
    explicit: Mutex<HashMap<MemberId, HashSet<String>>>,
    /// True when the registry names anyone: the fast path of every write otherwise.
    any: AtomicBool,
    queues: Mutex<HashMap<MemberId, Outbox>>,
    wake: tokio::sync::Notify,
    /// This member's near caches, by map.
    pub(crate) caches: RwLock<HashMap<String, Arc<NearCache>>>,
    /// True when some map has a near cache configured (the fast path of reads otherwise).
    pub(crate) configured: bool,
    /// Test hook: drop incoming change events (position reports still arrive).
    drop_changes: AtomicBool,
    dropped_changes: AtomicU64,
}

impl std::fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidation").field("settings", &self.settings).finish()
    }
}

impl Invalidation {
    pub(crate) fn new(settings: InvalidationSettings, configured: bool) -> Invalidation {
        Invalidation {
            settings,
            registry: RwLock::new(HashMap::new()),
            explicit: Mutex::new(HashMap::new()),
            any: AtomicBool::new(false),
            queues: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            caches: RwLock::new(HashMap::new()),
            configured,
            drop_changes: AtomicBool::new(false),
            dropped_changes: AtomicU64::new(0),
        }
    }

    fn queue_max(&self) -> usize {
        (self.settings.batch_size * QUEUE_BATCHES_MAX).max(QUEUE_CHANGES_MIN)
    }

    /// The owner stamped change `seq` of `map`'s partition `p` in `term`: queue it for every
    /// member near-caching the map. Called under the partition's lock.
    pub(crate) fn on_change(&self, map: &str, p: u32, term: &Term, seq: u64, repl: &ReplOp) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        let registry = self.registry.read().unwrap();
        let Some(members) = registry.get(map) else { return };
        let key = match repl {
            ReplOp::Put { key, .. } | ReplOp::Remove { key } | ReplOp::Expire { key } => Some(key.clone()),
            ReplOp::Clear | ReplOp::Batch(_) => None,
        };
        let max = self.queue_max();
        let mut queues = self.queues.lock().unwrap();
        let mut full = false;
        for member in members {
            let outbox = queues.entry(member.clone()).or_default();
            outbox.push(map, p, term, seq, Some(key.clone()), max);
            full |= outbox.changes >= self.settings.batch_size;
        }
        drop(queues);
        if full {
            self.wake.notify_one();
        }
    }

    /// Rebuilds the registry from gossip and the explicit registrations, for the members of the
    /// view other than `local`.
    fn refresh(&self, view: &grapevine_membership::ClusterView, local: &MemberId) {
        let mut registry: HashMap<String, Vec<MemberId>> = HashMap::new();
        let live: HashSet<&MemberId> = view.members.iter().map(|m| &m.id).collect();
        for member in &view.members {
            if member.id == *local {
                continue;
            }
            for key in member.ext.keys() {
                if let Some(map) = key.strip_prefix(NEAR_CACHE_KEY_PREFIX) {
                    registry.entry(map.to_string()).or_default().push(member.id.clone());
                }
            }
        }
        let mut explicit = self.explicit.lock().unwrap();
        explicit.retain(|member, _| live.contains(member));
        for (member, maps) in explicit.iter() {
            for map in maps {
                let members = registry.entry(map.clone()).or_default();
                if !members.contains(member) {
                    members.push(member.clone());
                }
            }
        }
        drop(explicit);
        self.any.store(!registry.is_empty(), Ordering::Relaxed);
        *self.registry.write().unwrap() = registry;
        self.queues.lock().unwrap().retain(|member, _| live.contains(member));
    }
}

impl Node {
    /// Queues the position of every partition this member owns, for `only` (a member and map)
    /// or for every registered member and map. Each position is read and queued under its
    /// partition's lock, so it follows the changes it counts.
    fn queue_positions(&self, only: Option<(&MemberId, &str)>) {
        let inv = &self.invalidation;
        let registry: Vec<(String, Vec<MemberId>)> = match only {
            Some((member, map)) => vec![(map.to_string(), vec![member.clone()])],
            None => inv.registry.read().unwrap().iter().map(|(m, v)| (m.clone(), v.clone())).collect(),
        };
        if registry.is_empty() {
            return;
        }
        let table = self.table();
        for p in table.owned_by(&self.local) {
            let data = self.slot(p).data.lock().unwrap();
            if data.starting || data.fenced.is_some() {
                // Not serving: the near caches hear nothing and purge when it lasts.
                continue;
            }
            let mut queues = inv.queues.lock().unwrap();
            for (map, members) in &registry {
                let (term, seq) = match data.maps.get(map) {
                    Some(mp) => (mp.term.clone(), mp.seq),
                    None => (data.term.clone(), 0),
                };
                for member in members {
                    queues.entry(member.clone()).or_default().push(map, p, &term, seq, None, usize::MAX);
                }
            }
        }
    }

    /// Sends every queue that is due (`all`: every non-empty one).
    fn flush_invalidations(&self, all: bool) {
        let inv = &self.invalidation;
        let due: Vec<(MemberId, Vec<Run>, u64)> = {
            let mut queues = inv.queues.lock().unwrap();
            queues
                .iter_mut()
                .filter(|(_, q)| {
                    !q.runs.is_empty()
                        && (all
                            || q.changes >= inv.settings.batch_size
                            || q.since.is_some_and(|t| t.elapsed() >= inv.settings.batch_delay))
                })
                .map(|(member, q)| (member.clone(), q.take(), std::mem::take(&mut q.dropped)))
                .collect()
        };
        // Keep each message well inside the frame limit.
        let budget = self.net.frame_bytes_max() / 2;
        for (member, runs, dropped) in due {
            if dropped > 0 {
                warn!(%member, dropped, "invalidation queue full: changes dropped; that member's near cache purges the partitions concerned");
            }
            let mut chunk = Vec::new();
            let mut bytes = 0;
            for run in runs {
                let size =
                    64 + run.map.len() + run.keys.iter().map(|k| 16 + k.as_ref().map_or(0, Vec::len)).sum::<usize>();
                if !chunk.is_empty() && bytes + size > budget {
                    self.send_runs(&member, std::mem::take(&mut chunk));
                    bytes = 0;
                }
                bytes += size;
                chunk.push(run);
            }
            if !chunk.is_empty() {
                self.send_runs(&member, chunk);
            }
        }
    }

    fn send_runs(&self, member: &MemberId, runs: Vec<Run>) {
        let body = Node::encode(&InvMsg::Events { runs });
        if let Err(error) = self.net.send(member, INVALIDATION_SERVICE, body) {
            debug!(%member, %error, "invalidations not sent; that member's near cache purges on the gap");
        }
    }

    /// Events from `from`.
    fn on_events(&self, from: &MemberId, runs: Vec<Run>) {
        let now = now_ms();
        let caches = self.invalidation.caches.read().unwrap();
        let dropping = self.invalidation.drop_changes.load(Ordering::Relaxed);
        for run in runs {
            let Some(cache) = caches.get(&run.map) else { continue };
            if dropping && !run.keys.is_empty() {
                self.invalidation.dropped_changes.fetch_add(run.keys.len() as u64, Ordering::Relaxed);
                continue;
            }
            cache.on_run(from, run.partition, &run.term, run.seq, &run.keys, now);
        }
    }

    fn on_register(&self, from: &MemberId, map: String) -> InvReply {
        if !self.is_live(from) {
            return InvReply::Failed { error: "not a member of this member's view (yet); retry".into() };
        }
        {
            let mut explicit = self.invalidation.explicit.lock().unwrap();
            let maps = explicit.entry(from.clone()).or_default();
            if !maps.contains(&map) && maps.len() >= REGISTRATIONS_PER_MEMBER_MAX {
                return InvReply::Failed {
                    error: format!("at most {REGISTRATIONS_PER_MEMBER_MAX} near-cached maps per member"),
                };
            }
            maps.insert(map.clone());
        }
        self.invalidation.refresh(&self.membership.view(), &self.local);
        self.queue_positions(Some((from, &map)));
        self.invalidation.wake.notify_one();
        InvReply::Ack
    }

    /// The near cache of `map`, created on first use if the map has one configured.
    pub(crate) async fn near_cache(self: &Arc<Self>, map: &str) -> Option<Arc<NearCache>> {
        if !self.invalidation.configured {
            return None;
        }
        if let Some(cache) = self.invalidation.caches.read().unwrap().get(map) {
            return Some(cache.clone());
        }
        if map.starts_with(RELIABLE_TOPIC_MAP_PREFIX) {
            return None;
        }
        let config = self.settings.map(map).near_cache?;
        let events = self.invalidation.settings.enabled && config.invalidate_on_change;
        let liveness = self.invalidation.settings.heartbeat_interval * 3 + self.invalidation.settings.batch_delay;
        let cache = {
            let mut caches = self.invalidation.caches.write().unwrap();
            if let Some(cache) = caches.get(map) {
                return Some(cache.clone());
            }
            let cache = Arc::new(NearCache::new(map, &config, events, self.settings.partition_count, liveness));
            cache.on_table(&self.table(), &self.local);
            caches.insert(map.to_string(), cache.clone());
            cache
        };
        if events {
            self.membership.set_ext_key(&format!("{NEAR_CACHE_KEY_PREFIX}{map}"), "1").await;
            let body = Node::encode(&InvMsg::Register { map: map.to_string() });
            for member in self.view_members() {
                if member != self.local {
                    // One-way: the owner's position reports that follow make the cache live.
                    let _ = self.net.send(&member, INVALIDATION_SERVICE, body.clone());
                }
            }
        }
        tracing::info!(map, events, "near cache started");
        Some(cache)
    }

    /// This member wrote `key` of `map` (or cleared the map: `None`): drop it from its near cache.
    pub(crate) fn near_cache_written(&self, map: &str, key: Option<&[u8]>) {
        if !self.invalidation.configured {
            return;
        }
        if let Some(cache) = self.invalidation.caches.read().unwrap().get(map) {
            match key {
                Some(key) => cache.invalidate_key(key),
                None => cache.invalidate_all(),
            }
        }
    }

    pub(crate) fn near_cache_stats(&self) -> Vec<NearCacheStats> {
        let caches: Vec<Arc<NearCache>> = self.invalidation.caches.read().unwrap().values().cloned().collect();
        let mut stats: Vec<NearCacheStats> = caches.iter().map(|c| c.stats()).collect();
        stats.sort_by(|a, b| a.map.cmp(&b.map));
        stats
    }

    /// Test hook: drop incoming change events (not position reports) while `drop` is set.
    pub(crate) fn drop_invalidations(&self, drop: bool) {
        self.invalidation.drop_changes.store(drop, Ordering::Relaxed);
    }

    pub(crate) fn dropped_invalidations(&self) -> u64 {
        self.invalidation.dropped_changes.load(Ordering::Relaxed)
    }
}

/// Flushes queues, sends position reports, follows the view (registry) and the table (owner
/// changes purge near caches), and purges near-cached partitions of silent owners.
pub(crate) async fn invalidation_loop(node: Arc<Node>) {
    let settings = node.invalidation.settings.clone();
    let mut views = node.membership.watch();
    let mut tables = node.tables.tx.subscribe();
    let mut flush = tokio::time::interval(settings.batch_delay.max(Duration::from_millis(1)));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(settings.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    node.invalidation.refresh(&views.borrow_and_update(), &node.local);
    loop {
        tokio::select! {
            _ = node.cancel.cancelled() => return,
            _ = node.invalidation.wake.notified() => node.flush_invalidations(false),
            _ = flush.tick() => node.flush_invalidations(false),
            _ = heartbeat.tick() => {
                node.queue_positions(None);
                node.flush_invalidations(true);
                let caches: Vec<Arc<NearCache>> = node.invalidation.caches.read().unwrap().values().cloned().collect();
                let view = node.membership.view();
                for cache in caches {
                    cache.check_owners(now_ms(), |m| view.member(m).is_some());
                }
            }
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                let view = views.borrow_and_update().clone();
                node.invalidation.refresh(&view, &node.local);
            }
            changed = tables.changed() => {
                if changed.is_err() {
                    return;
                }
                let table = tables.borrow_and_update().clone();
                let caches: Vec<Arc<NearCache>> = node.invalidation.caches.read().unwrap().values().cloned().collect();
                for cache in caches {
                    cache.on_table(&table, &node.local);
                }
            }
        }
    }
}

/// The invalidation bus's net handler.
pub(crate) struct InvalidationHandler {
    pub(crate) node: std::sync::Weak<Node>,
}

impl Handler for InvalidationHandler {
    fn handle(&self, from: &MemberId, body: Bytes, _incoming: &Incoming<'_>) -> NetReply {
        let Some(node) = self.node.upgrade() else {
            return NetReply::Now(Node::encode(&InvReply::Failed { error: "map service stopped".into() }));
        };
        let msg: InvMsg = match codec::decode(&body) {
            Ok(msg) => msg,
            Err(error) => {
                warn!(%from, %error, "undecodable invalidation message; ignoring it");
                return NetReply::Now(Node::encode(&InvReply::Failed {
                    error: format!("undecodable message: {error}"),
                }));
            }
        };
        match msg {
            InvMsg::Register { map } => NetReply::Now(Node::encode(&node.on_register(from, map))),
            InvMsg::Events { runs } => {
                node.on_events(from, runs);
                NetReply::None
            }
            InvMsg::Stats => NetReply::Now(Node::encode(&InvReply::Stats(node.near_cache_stats()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term() -> Term {
        Term { epoch: 3, publisher: None }
    }

    #[test]
    fn consecutive_changes_of_a_partition_share_a_run_and_positions_follow_them() {
        let mut q = Outbox::default();
        for seq in 1..=3 {
            q.push("m", 7, &term(), seq, Some(Some(vec![seq as u8])), 100);
        }
        q.push("m", 7, &term(), 3, None, 100);
        q.push("m", 8, &term(), 1, Some(None), 100);
        q.push("m", 7, &term(), 5, None, 100);
        let runs = q.take();
        assert_eq!(runs.len(), 3);
        assert_eq!((runs[0].seq, runs[0].keys.len()), (3, 3));
        assert_eq!((runs[1].partition, runs[1].keys.clone()), (8, vec![None]));
        assert_eq!((runs[2].seq, runs[2].keys.len()), (5, 0), "a position report");
        assert_eq!(q.changes, 0);
    }

    #[test]
    fn a_full_queue_drops_changes_but_not_positions() {
        let mut q = Outbox::default();
        assert!(q.push("m", 0, &term(), 1, Some(Some(vec![1])), 1));
        assert!(!q.push("m", 0, &term(), 2, Some(Some(vec![2])), 1));
        assert!(q.push("m", 0, &term(), 2, None, 1));
        assert_eq!(q.dropped, 1);
    }
}
