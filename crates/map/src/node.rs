//! The map service's state on one member and the dispatch of incoming messages.
//!
//! The state is split by concern: [`crate::tables::Tables`] (the partition table and how it is
//! adopted), [`crate::listeners::Listeners`] (entry events), [`crate::master::MasterState`] (the
//! master's duties) and one [`Slot`] per partition (what this member holds of it, as owner or
//! replica). The decisions those parts take are pure functions elsewhere ([`crate::lineage`],
//! [`crate::fence`], [`crate::assign`]); the code here only moves messages.
//!
//! Locking rule: a partition's data is behind a synchronous mutex that is never held across an
//! `.await`; messages to peers are *enqueued* (not awaited) while it is held, which is what orders
//! backup writes: the data plane delivers them in enqueue order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use grapevine_membership::{MemberId, Membership};
use grapevine_net::{Handler, Incoming, Net, Reply as NetReply, ServiceId, codec};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::config::MapSettings;
use crate::listeners::Listeners;
use crate::messages::{MigrationId, Msg, Reply};
use crate::stats::MapCounters;
use crate::store::MapPartition;
use crate::table::{TableId, Term};
use crate::tables::Tables;

/// The data-plane service id of the map.
pub(crate) const MAP_SERVICE: ServiceId = ServiceId(1);

/// One partition on this member.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) data: Mutex<PartitionData>,
    /// Signalled when `inflight` drops to zero (a freezing owner waits for it).
    pub(crate) drained: Notify,
    /// As owner: one full copy at a time per (replica, map); writes waiting for the same replica
    /// wait for the copy under way instead of starting another.
    pub(crate) copy_locks: Mutex<HashMap<(MemberId, String), CopyLock>>,
}

/// Held while a full copy of one map partition streams to one replica.
pub(crate) type CopyLock = Arc<tokio::sync::Mutex<()>>;

/// What this member holds and knows about one partition.
#[derive(Debug, Default)]
pub(crate) struct PartitionData {
    /// Per map.
    pub(crate) maps: HashMap<String, MapPartition>,
    /// As owner: the term in which this member owns the partition (`terms[p]` of its table).
    pub(crate) term: Term,
    /// As owner: when it took over (idle-expiry floor, see `Record::is_expired`).
    pub(crate) owner_since_ms: u64,
    /// As owner: the new term is being announced to the backups; writes wait until they have
    /// confirmed it (they could not apply the writes before).
    pub(crate) starting: bool,
    /// As owner: writes are refused while a migration hands the partition to another member.
    pub(crate) frozen: Option<Freeze>,
    /// As owner: the migration attempt under way.
    pub(crate) migration: Option<OwnerMigration>,
    /// As owner: `(member, map, installed)`: members that get every change of a map without being
    /// one of its replicas yet (a migration fills them, or a full copy is streamed to them):
    /// one-way while the copy arrives (they buffer changes), as synchronous backups once it is
    /// installed.
    pub(crate) copy_targets: Vec<(MemberId, String, bool)>,
    /// As owner: writes applied whose synchronous backups have not all answered yet.
    pub(crate) inflight: u32,
    /// When this member last received a full copy for the partition (migration target).
    pub(crate) last_install_ms: u64,
    /// As owner: the row changed and the backups have not all confirmed they hold every map they
    /// replicate (after a promotion, a member may move into an index it did not serve before).
    pub(crate) unconfirmed: bool,
    /// As (former) owner: a replica's table moved the partition past this member's term, and
    /// when (ms). The partition is not served, reads included, until this member applies another
    /// table, or holds the master's current one a while later (the replica's table may have come
    /// from a side that lost; a replica still ahead refuses again and fences again).
    pub(crate) fenced: Option<(TableId, u64)>,
    /// The table this partition's state was last adjusted to. `apply_table` adjusts every
    /// partition before it publishes the table, so an operation that checked ownership against
    /// the published table finds another id here while a newer one is being applied: it must not
    /// act on state the newer table already changed (a dropped copy would read as absent).
    pub(crate) applied: TableId,
    /// As owner: `(when, since)` (ms): entries written since `since` may be unknown to the other
    /// side of a split this member's side loses, noted `when` (most recent last, at most
    /// [`MERGE_FLOORS_MAX`]; [`crate::rejoin`] takes in those noted since this member's side
    /// forked off). Noted when a write is acknowledged although a synchronous backup never
    /// confirmed it (it left the view and its replacement got it instead: if it was cut off on
    /// the other side, the winner never saw it; `since` is when the write began), and when this
    /// member takes more merged entries than [`PartitionData::merged_keys`] keeps.
    pub(crate) merge_floors: Vec<(u64, u64)>,
    /// As owner: the merged entries this member took, `(when, their update time, map, key)`
    /// (most recent last, at most [`MERGED_KEYS_MAX`]; older ones become a merge floor). A merged
    /// entry keeps its older update time: if this side loses a split before the cluster settles
    /// (a merge into a group that split off again), its next merge takes these keys along
    /// ([`crate::rejoin`]), and only these, not every entry written since their update time (the
    /// other side's, replicated here, which a `pass-through` merge would put back over its later
    /// writes).
    pub(crate) merged_keys: std::collections::VecDeque<(u64, u64, String, Vec<u8>)>,
}

/// How many [`PartitionData::merge_floors`] a partition keeps.
pub(crate) const MERGE_FLOORS_MAX: usize = 8;

/// How many [`PartitionData::merged_keys`] a partition keeps.
pub(crate) const MERGED_KEYS_MAX: usize = 1024;

impl PartitionData {
    /// Notes, at `when`, that entries written since `since` may have to be merged (see
    /// [`PartitionData::merge_floors`]). Notes made within a second of the last one join it (a
    /// merge takes in many entries at once), with the earliest `since` and the latest `when`.
    pub(crate) fn note_merge_floor(&mut self, when: u64, since: u64) {
        if let Some(last) = self.merge_floors.last_mut()
            && when.saturating_sub(last.0) < 1_000
        {
            *last = (last.0.max(when), last.1.min(since));
            return;
        }
        if self.merge_floors.len() == MERGE_FLOORS_MAX {
            self.merge_floors.remove(0);
        }
        self.merge_floors.push((when, since));
    }

    /// Notes, at `when`, that this member took the merged entry `key` of `map`, last updated at
    /// `updated` (see [`PartitionData::merged_keys`]).
    pub(crate) fn note_merged_key(&mut self, when: u64, updated: u64, map: &str, key: Vec<u8>) {
        if self.merged_keys.len() == MERGED_KEYS_MAX
            && let Some((when, updated, _, _)) = self.merged_keys.pop_front()
        {
            self.note_merge_floor(when, updated);
        }
        self.merged_keys.push_back((when, updated, map.to_string(), key));
    }
}

/// A frozen partition: which migration froze it.
#[derive(Debug, Clone)]
pub(crate) struct Freeze {
    pub(crate) migration: MigrationId,
}

/// An owner's migration attempt, and when it started.
#[derive(Debug, Clone)]
pub(crate) struct OwnerMigration {
    pub(crate) id: MigrationId,
    pub(crate) started_ms: u64,
}

/// A partition lost every replica up to some backup index at once (see
/// [`crate::MapService::partition_losses`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLost {
    /// The partition.
    pub partition: u32,
    /// How many of its leading replicas (owner first) were lost: every map with fewer than that
    /// many replicas (owner plus synchronous backups) lost its entries in this partition, or
    /// kept only an asynchronous backup's (possibly older) copy.
    pub lost_replicas: u8,
    /// The maps this member knows of that lost data.
    pub maps: Vec<String>,
}

/// Capacity of the partition-loss event channel.
pub(crate) const LOSS_CHANNEL_CAPACITY: usize = 256;

/// The map service on one member.
pub(crate) struct Node {
    pub(crate) local: MemberId,
    pub(crate) net: Net,
    pub(crate) membership: Membership,
    pub(crate) settings: MapSettings,
    pub(crate) tables: Tables,
    pub(crate) slots: Box<[Slot]>,
    pub(crate) listeners: Listeners,
    pub(crate) counters: Mutex<BTreeMap<String, Arc<MapCounters>>>,
    /// Master-side state.
    pub(crate) master: Mutex<crate::master::MasterState>,
    pub(crate) master_wakeup: Notify,
    /// Wakes the loop that confirms backups of partitions whose row changed.
    pub(crate) confirm_wakeup: Notify,
    /// Ids of full copies this member streams.
    pub(crate) copy_ids: AtomicU64,
    pub(crate) partitions_lost: AtomicU64,
    pub(crate) losses: broadcast::Sender<PartitionLost>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// Names this member on the log lines of its background tasks and message handling (a debug
    /// span: in-process clusters run several members in one process).
    pub(crate) span: tracing::Span,
    pub(crate) stopped: AtomicBool,
    /// Merges of this member's side into a winner's ([`crate::rejoin::push`]) still running.
    pub(crate) merges_running: std::sync::atomic::AtomicUsize,
    /// Near caches and the invalidation bus ([`crate::invalidation`]).
    pub(crate) invalidation: crate::invalidation::Invalidation,
}

impl Node {
    /// Runs `task` among this member's background tasks, in its span.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        use tracing::Instrument;
        self.tasks.spawn(task.instrument(self.span.clone()));
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("local", &self.local).field("table", &self.table().id()).finish()
    }
}

impl Node {
    pub(crate) fn new(local: MemberId, net: Net, membership: Membership, settings: MapSettings) -> Arc<Node> {
        assert!(settings.partition_count > 0, "partition count must be positive");
        let slots = (0..settings.partition_count).map(|_| Slot::default()).collect::<Vec<_>>().into_boxed_slice();
        let span = tracing::debug_span!("member", local = %local);
        Arc::new(Node {
            span,
            local,
            net,
            membership,
            tables: Tables::new(settings.partition_count),
            invalidation: crate::invalidation::Invalidation::new(
                settings.invalidation.clone(),
                settings.maps.values().any(|m| m.near_cache.is_some()),
            ),
            settings,
            slots,
            listeners: Listeners::default(),
            counters: Mutex::new(BTreeMap::new()),
            master: Mutex::new(Default::default()),
            master_wakeup: Notify::new(),
            confirm_wakeup: Notify::new(),
            copy_ids: AtomicU64::new(1),
            partitions_lost: AtomicU64::new(0),
            losses: broadcast::channel(LOSS_CHANNEL_CAPACITY).0,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stopped: AtomicBool::new(false),
            merges_running: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub(crate) fn slot(&self, p: u32) -> &Slot {
        &self.slots[p as usize]
    }

    pub(crate) fn counters(&self, map: &str) -> Arc<MapCounters> {
        let mut counters = self.counters.lock().unwrap();
        if let Some(c) = counters.get(map) {
            return c.clone();
        }
        counters.entry(map.to_string()).or_default().clone()
    }

    /// Encodes a message for the data plane. Encoding our own types cannot fail short of a bug.
    pub(crate) fn encode<T: serde::Serialize>(msg: &T) -> Bytes {
        Bytes::from(codec::encode(msg).expect("map messages always encode"))
    }

    /// Members of the current view, for fan-out operations.
    pub(crate) fn view_members(&self) -> HashSet<MemberId> {
        self.membership.view().members.iter().map(|m| m.id.clone()).collect()
    }

    /// Whether `member` is in this member's view.
    pub(crate) fn is_live(&self, member: &MemberId) -> bool {
        self.membership.view().member(member).is_some()
    }

    /// The master announced that a partition lost replicas: count it, tell local subscribers and
    /// log which maps lost data.
    pub(crate) fn on_partition_lost(&self, p: u32, lost_replicas: u8, from_master: bool) {
        let data = self.slot(p).data.lock().unwrap();
        let mut maps: Vec<String> = data.maps.keys().cloned().collect();
        drop(data);
        for name in self.settings.maps.keys().chain(self.counters.lock().unwrap().keys()) {
            if name != "default" && !maps.contains(name) {
                maps.push(name.clone());
            }
        }
        maps.retain(|name| self.settings.map(name).durable_replicas() <= usize::from(lost_replicas));
        maps.sort();
        self.partitions_lost.fetch_add(1, Ordering::Relaxed);
        if from_master {
            error!(
                partition = p,
                lost_replicas,
                maps = ?maps,
                "partition {p} lost its {lost_replicas} first replicas at once: maps with fewer synchronous replicas \
                 lost its entries (raise backup_count to survive losing more members at once)"
            );
        } else {
            warn!(partition = p, lost_replicas, maps = ?maps, "the master reports that partition {p} lost data");
        }
        // No subscriber is fine.
        let _ = self.losses.send(PartitionLost { partition: p, lost_replicas, maps });
    }
}

/// The net handler: decodes and dispatches in frame order.
pub(crate) struct MapHandler {
    pub(crate) node: std::sync::Weak<Node>,
}

impl Handler for MapHandler {
    fn handle(&self, from: &MemberId, body: Bytes, incoming: &Incoming<'_>) -> NetReply {
        let Some(node) = self.node.upgrade() else {
            return NetReply::Now(Node::encode(&Reply::Retry { reason: "map service stopped".into() }));
        };
        let msg: Msg = match codec::decode(&body) {
            Ok(msg) => msg,
            Err(error) => {
                warn!(%from, %error, "undecodable map message; ignoring it");
                return NetReply::Now(Node::encode(&Reply::Failed { error: format!("undecodable message: {error}") }));
            }
        };
        let _member = node.span.enter();
        node.dispatch(from, msg, incoming)
    }
}

/// The answer when every slot for work that answers later is taken: nothing was done.
fn busy() -> NetReply {
    NetReply::Now(Node::encode(&Reply::Retry { reason: "the member is busy: too many operations in flight".into() }))
}

impl Node {
    /// An owner serves the operations of callers on its own side only. A caller this member's view
    /// does not hold (it declared it dead, or has not heard of it yet), or one that follows
    /// another master, is on the other side of a split or a cut of gossip only: what this member
    /// accepted for it could be acknowledged to a client of the other side and then dropped with
    /// whichever table loses (the data plane may still connect two sides that gossip has split).
    /// The caller retries until the sides agree, or its operation times out unapplied.
    fn foreign_caller(&self, from: &MemberId) -> Option<Reply> {
        let view = self.membership.view();
        let Some(caller) = view.member(from) else {
            return Some(Reply::Retry { reason: format!("{from} is not in this member's view of the cluster") });
        };
        match (&view.master, &caller.master) {
            (Some(ours), Some(theirs)) if ours != theirs => {
                Some(Reply::Retry { reason: format!("{from} follows master {theirs}, this member follows {ours}") })
            }
            _ => None,
        }
    }

    fn dispatch(self: &Arc<Self>, from: &MemberId, msg: Msg, incoming: &Incoming<'_>) -> NetReply {
        let now = |reply: Reply| NetReply::Now(Node::encode(&reply));
        let one_way = incoming.one_way();
        match msg {
            Msg::Op { epoch, partition, map, op } => {
                if partition >= self.settings.partition_count {
                    return now(Reply::Failed { error: format!("partition {partition} does not exist") });
                }
                if let Some(reply) = self.foreign_caller(from) {
                    return now(reply);
                }
                // A write that waits for its backups answers later: reserve the slot first, so a
                // busy member refuses before doing anything.
                let slot = if op.is_read() {
                    None
                } else {
                    match incoming.reserve() {
                        Some(slot) => Some(slot),
                        None => return busy(),
                    }
                };
                match self.owner_execute(partition, &map, op, epoch) {
                    crate::owner::Executed::Now(reply) => now(reply),
                    crate::owner::Executed::Pending(pending) => {
                        let node = self.clone();
                        let slot = slot.expect("reads never wait for backups");
                        NetReply::Later(slot, Box::pin(async move { Node::encode(&node.finish_write(pending).await) }))
                    }
                }
            }
            Msg::Multi { epoch, map, partitions, op } => {
                if let Some(reply) = self.foreign_caller(from) {
                    return now(reply);
                }
                let Some(slot) = incoming.reserve() else { return busy() };
                let node = self.clone();
                NetReply::Later(
                    slot,
                    Box::pin(async move { Node::encode(&node.owner_multi(&map, partitions, op, epoch).await) }),
                )
            }
            Msg::Page { epoch, partition, map, after, limit } => {
                if let Some(reply) = self.foreign_caller(from) {
                    return now(reply);
                }
                now(self.owner_page(partition, &map, after, limit, epoch))
            }
            Msg::Backup { partition, term, map, seq, op } => {
                let reply = self.on_backup(from, partition, &term, &map, seq, &op);
                if one_way && matches!(reply, Reply::NeedSync { .. }) {
                    self.request_sync(from, partition, &map);
                }
                now(reply)
            }
            Msg::TermStart { table, starts } => now(self.on_term_start(from, &table, starts)),
            Msg::Copy { partition, term, map, copy, chunk, start_seq, end, entries, removals } => {
                now(self.on_copy(from, partition, &term, &map, (copy, chunk, start_seq, end), (entries, removals)))
            }
            Msg::SyncRequest { partition, map } => {
                if partition < self.settings.partition_count {
                    let node = self.clone();
                    let member = from.clone();
                    self.spawn(async move { node.resync_backup(&member, partition, &map).await });
                }
                NetReply::None
            }
            Msg::VersionCheck { versions } => now(self.on_version_check(from, versions)),
            Msg::TablePush { table } => now(self.on_table_push(from, table)),
            Msg::TableGet => now(self.table_reply()),
            Msg::MigrateStart { id, table, partition, old_row, new_row } => {
                let Some(slot) = incoming.reserve() else { return busy() };
                let node = self.clone();
                let master = from.clone();
                NetReply::Later(
                    slot,
                    Box::pin(async move {
                        Node::encode(&node.migrate_out(&master, id, &table, partition, old_row, new_row).await)
                    }),
                )
            }
            Msg::MigrateAbort { id, partition } => {
                self.on_migrate_abort(partition, &id);
                now(Reply::Ack)
            }
            Msg::Events { events } => {
                self.listeners.deliver_local(events);
                NetReply::None
            }
            Msg::Stats => now(Reply::Stats(self.local_stats())),
            Msg::Pull { partition, term, map, after } => now(self.on_pull(from, partition, &term, &map, after)),
            Msg::PartitionLost { table: _, partition, lost_replicas } => {
                if partition < self.settings.partition_count && self.membership.view().master.as_ref() == Some(from) {
                    self.on_partition_lost(partition, lost_replicas, false);
                }
                NetReply::None
            }
        }
    }
}
