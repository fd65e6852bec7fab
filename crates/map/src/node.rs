//! The map service's state on one member, the partition-table application, and the dispatch of
//! incoming messages. Locking rule: a partition's data is behind a synchronous mutex that is never
//! held across an `.await`; messages to peers are *enqueued* (not awaited) while it is held, which
//! is what orders backup writes: the data plane delivers them in enqueue order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use grapevine_membership::{MemberId, MemberState, Membership};
use grapevine_net::{Handler, Net, Reply as NetReply, ServiceId, codec};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::MapSettings;
use crate::messages::{Msg, RawEntryEvent, Reply};
use crate::record::now_ms;
use crate::sides;
use crate::stats::MapCounters;
use crate::store::MapPartition;
use crate::table::{PartitionTable, Role};

/// The data-plane service id of the map.
pub(crate) const MAP_SERVICE: ServiceId = ServiceId(1);

/// Gossip key (`x:` prefixed by membership) carrying a member's table: `"<epoch> <publisher>"`,
/// the publisher being the master that committed it (`-` for none).
pub(crate) const EPOCH_KEY: &str = "epoch";

/// The gossip value describing a table.
pub(crate) fn table_gossip_value(table: &PartitionTable) -> String {
    let publisher = table.master.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".to_string());
    format!("{} {publisher}", table.epoch)
}

/// A member's table as advertised in gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdvertisedTable {
    pub(crate) member: MemberId,
    pub(crate) epoch: u64,
    pub(crate) publisher: String,
}

/// Gossip key prefix announcing that a member has listeners on a map: `listen:<map>`.
pub(crate) const LISTEN_KEY_PREFIX: &str = "listen:";

/// Capacity of a map's local listener channel; a slower listener gets `Lagged`.
pub(crate) const LISTENER_CHANNEL_CAPACITY: usize = 4096;

/// One partition on this member.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub(crate) data: Mutex<PartitionData>,
    /// Signalled when `inflight` drops to zero (a freezing owner waits for it).
    pub(crate) drained: Notify,
}

/// What this member holds and knows about one partition.
#[derive(Debug, Default)]
pub(crate) struct PartitionData {
    /// Per map.
    pub(crate) maps: HashMap<String, MapPartition>,
    /// As owner: the epoch in which this member took the partition over (its replication term).
    pub(crate) term: u64,
    /// As owner: when it took over (idle-expiry floor, see `Record::is_expired`).
    pub(crate) owner_since_ms: u64,
    /// As owner: writes are refused while a migration hands the partition to another member.
    pub(crate) frozen: Option<Freeze>,
    /// As owner: replicas being filled by a migration, with their index in the new row; they get
    /// every write of the maps that use that index, synchronously.
    pub(crate) migrating: Vec<(MemberId, usize)>,
    /// As owner: the row the migration in progress leads to.
    pub(crate) migration_target: Option<Vec<MemberId>>,
    /// As owner: writes applied whose synchronous backups have not all answered yet.
    pub(crate) inflight: u32,
    /// As owner: the sequence covered by the last full copy sent to a backup, per (member, map).
    pub(crate) synced: HashMap<(MemberId, String), (u64, u64)>,
    /// When this member last received a full copy for the partition (migration target).
    pub(crate) last_install_ms: u64,
    /// As owner: the row changed and the backups have not all confirmed they hold every map they
    /// replicate (after a promotion, a member may move into an index it did not serve before).
    pub(crate) unconfirmed: bool,
}

/// A frozen partition: which master started the migration, and when.
#[derive(Debug, Clone)]
pub(crate) struct Freeze {
    pub(crate) master: Option<MemberId>,
    pub(crate) since_ms: u64,
}

/// A cached plan: the table epoch and active members it was computed for, and the planned rows.
type PlanCacheEntry = (u64, Vec<MemberId>, Arc<Vec<crate::assign::Row>>);

/// The map service on one member.
pub(crate) struct Node {
    pub(crate) local: MemberId,
    pub(crate) net: Net,
    pub(crate) membership: Membership,
    pub(crate) settings: MapSettings,
    pub(crate) table_tx: watch::Sender<Arc<PartitionTable>>,
    /// Serializes table application (pushes can race).
    pub(crate) apply_lock: Mutex<()>,
    pub(crate) slots: Box<[Slot]>,
    pub(crate) counters: Mutex<BTreeMap<String, Arc<MapCounters>>>,
    pub(crate) local_listeners: Mutex<HashMap<String, broadcast::Sender<RawEntryEvent>>>,
    /// Members with listeners, per map, from gossip.
    pub(crate) remote_listeners: RwLock<HashMap<String, Vec<MemberId>>>,
    /// Master-side migration state.
    pub(crate) master: Mutex<crate::master::MasterState>,
    pub(crate) master_wakeup: Notify,
    /// Wakes the loop that confirms backups of partitions whose row changed.
    pub(crate) confirm_wakeup: Notify,
    pub(crate) table_fetches: AtomicU64,
    /// The epoch of the last master's table this member refused for its own side's (logged once).
    kept_side_over: AtomicU64,
    /// The last balanced plan computed, keyed by table epoch and active members: planning is the
    /// master's most expensive step and the plan only changes when one of those does.
    plan_cache: Mutex<Option<PlanCacheEntry>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) stopped: AtomicBool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("local", &self.local).field("epoch", &self.table().epoch).finish()
    }
}

impl Node {
    pub(crate) fn new(local: MemberId, net: Net, membership: Membership, settings: MapSettings) -> Arc<Node> {
        assert!(settings.partition_count > 0, "partition count must be positive");
        let slots = (0..settings.partition_count).map(|_| Slot::default()).collect::<Vec<_>>().into_boxed_slice();
        let (table_tx, _) = watch::channel(Arc::new(PartitionTable::empty(settings.partition_count)));
        Arc::new(Node {
            local,
            net,
            membership,
            settings,
            table_tx,
            apply_lock: Mutex::new(()),
            slots,
            counters: Mutex::new(BTreeMap::new()),
            local_listeners: Mutex::new(HashMap::new()),
            remote_listeners: RwLock::new(HashMap::new()),
            master: Mutex::new(Default::default()),
            master_wakeup: Notify::new(),
            confirm_wakeup: Notify::new(),
            table_fetches: AtomicU64::new(0),
            kept_side_over: AtomicU64::new(0),
            plan_cache: Mutex::new(None),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stopped: AtomicBool::new(false),
        })
    }

    pub(crate) fn table(&self) -> Arc<PartitionTable> {
        self.table_tx.borrow().clone()
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

    /// Installs a newer table. Returns false (and changes nothing) for an older or equal epoch.
    /// Adjusts every partition whose row changed for this member: takes over (new term, told to
    /// the backups), hands over, or drops data it no longer replicates.
    pub(crate) fn apply_table(&self, table: PartitionTable) -> bool {
        let _serial = self.apply_lock.lock().unwrap();
        let old = self.table();
        if table.epoch <= old.epoch {
            return false;
        }
        if table.partition_count() != old.partition_count() {
            error!(
                theirs = table.partition_count(),
                ours = old.partition_count(),
                master = ?table.master,
                "the master uses {} partitions and this member {}; `partitions.count` must be the same on every \
                 member; ignoring its table",
                table.partition_count(),
                old.partition_count()
            );
            return false;
        }
        table.assert_valid();
        let now = now_ms();
        let migration_window_ms = self.settings.migration_timeout.as_millis() as u64;
        for p in 0..table.partition_count() {
            let (old_row, new_row) = (old.row(p), table.row(p));
            if old_row == new_row {
                continue;
            }
            let mut data = self.slot(p).data.lock().unwrap();
            // The row changed: a migration of this partition is over (committed or superseded).
            data.frozen = None;
            data.migrating.clear();
            data.migration_target = None;
            data.synced.clear();
            data.unconfirmed = table.role(p, &self.local) == Role::Owner && new_row.len() > 1;
            let copying = now.saturating_sub(data.last_install_ms) < migration_window_ms;
            if let Role::Backup(index) = table.role(p, &self.local)
                && !copying
            {
                // Maps that use fewer replicas than this index get no writes here any more: their
                // copies would go stale (and count as backups in statistics). A later move to a
                // lower index brings a full copy.
                data.maps.retain(|name, _| self.settings.map(name).replicas() > index);
            }
            match (old.role(p, &self.local), table.role(p, &self.local)) {
                (Role::Owner, Role::Owner) => {}
                (_, Role::Owner) => self.take_over(p, &mut data, &table, now),
                (_, Role::None) if old_row.contains(&self.local) => {
                    // A migration may be copying the partition to this member while it catches up
                    // on tables (it can apply a table that predates the migration after the copy
                    // arrived): keep recent copies; `drop_stray_data` removes them if the migration
                    // is abandoned.
                    if copying {
                        debug!(
                            partition = p,
                            epoch = table.epoch,
                            "not a replica, but a copy just arrived: keeping it"
                        );
                    } else {
                        if !data.maps.is_empty() {
                            debug!(partition = p, epoch = table.epoch, "no longer a replica: dropping data");
                        }
                        data.maps.clear();
                    }
                }
                _ => {}
            }
        }
        let epoch = table.epoch;
        self.table_tx.send_replace(Arc::new(table));
        self.slots.iter().for_each(|s| s.drained.notify_waiters());
        self.master_wakeup.notify_one();
        self.confirm_wakeup.notify_one();
        debug!(epoch, "partition table applied");
        true
    }

    /// This member became the owner of `p` under `table`: start a new replication term and tell
    /// the backups where it starts, so a backup that diverged (it applied a write the old owner
    /// never acknowledged) is recognised and copied in full.
    fn take_over(&self, p: u32, data: &mut PartitionData, table: &PartitionTable, now: u64) {
        data.term = table.epoch;
        data.owner_since_ms = now;
        let mut bases = Vec::with_capacity(data.maps.len());
        for (name, mp) in &mut data.maps {
            bases.push((name.clone(), mp.term, mp.seq));
            mp.term = table.epoch;
        }
        let msg = Self::encode(&Msg::TermStart { epoch: table.epoch, partition: p, term: table.epoch, bases });
        for backup in table.row(p).iter().skip(1) {
            if let Err(error) = self.net.send(backup, MAP_SERVICE, msg.clone()) {
                debug!(partition = p, %backup, %error, "cannot announce the new term; the backup will resync");
            }
        }
    }

    /// The balanced table the master migrates toward, for `table` and the `active` members
    /// (sorted, as the view lists them).
    pub(crate) fn target_rows(&self, table: &PartitionTable, active: &[MemberId]) -> Arc<Vec<crate::assign::Row>> {
        let mut cache = self.plan_cache.lock().unwrap();
        if let Some((epoch, members, rows)) = cache.as_ref()
            && *epoch == table.epoch
            && members == active
        {
            return rows.clone();
        }
        let replicas = active.len().min(crate::assign::REPLICAS_MAX);
        let rows = Arc::new(crate::assign::plan(&table.rows, active, replicas));
        *cache = Some((table.epoch, active.to_vec(), rows.clone()));
        rows
    }

    /// The members that listen to `map`, from gossip.
    pub(crate) fn listeners_of(&self, map: &str) -> Vec<MemberId> {
        self.remote_listeners.read().unwrap().get(map).cloned().unwrap_or_default()
    }

    /// Delivers events to local listeners.
    pub(crate) fn deliver_local(&self, events: Vec<RawEntryEvent>) {
        let listeners = self.local_listeners.lock().unwrap();
        for event in events {
            if let Some(tx) = listeners.get(&event.map) {
                // No receiver left is fine: the subscription was dropped.
                let _ = tx.send(event);
            }
        }
    }

    /// Sends entry events to every member listening on the map (this one included).
    pub(crate) fn publish_events(&self, map: &str, events: Vec<RawEntryEvent>) {
        if events.is_empty() {
            return;
        }
        let members = self.listeners_of(map);
        if members.is_empty() {
            return;
        }
        let msg = Self::encode(&Msg::Events { events: events.clone() });
        for member in members {
            if member == self.local {
                self.deliver_local(events.clone());
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
        *self.remote_listeners.write().unwrap() = registry;
    }

    /// The tables members advertise in gossip.
    pub(crate) fn gossip_tables(&self) -> Vec<AdvertisedTable> {
        let view = self.membership.view();
        view.members
            .iter()
            .filter_map(|m| {
                let value = m.ext.get(EPOCH_KEY)?;
                let (epoch, publisher) = value.split_once(' ')?;
                Some(AdvertisedTable {
                    member: m.id.clone(),
                    epoch: epoch.parse().ok()?,
                    publisher: publisher.to_string(),
                })
            })
            .collect()
    }

    /// The table epochs members advertise in gossip.
    pub(crate) fn gossip_epochs(&self) -> Vec<(MemberId, u64)> {
        self.gossip_tables().into_iter().map(|t| (t.member, t.epoch)).collect()
    }

    /// Asks `from` for its table and applies it if it is newer and was published by the master
    /// this member follows.
    pub(crate) async fn fetch_table(&self, from: &MemberId) -> bool {
        self.fetch_table_if(from, |table| {
            let master = self.membership.view().master.clone();
            table.master.is_some() && table.master == master && !self.keeps_own_side(table)
        })
        .await
    }

    /// Whether this member keeps its table rather than apply `incoming`, its master's: the two
    /// come from two sides of a healed network partition and this member's side is larger (see
    /// [`crate::sides`]). The master applies the same rule and adopts this side's table; applying
    /// its table meanwhile would drop the data it is about to keep.
    pub(crate) fn keeps_own_side(&self, incoming: &PartitionTable) -> bool {
        let current = self.table();
        let view = self.membership.view();
        let active = view.local_member().is_some_and(|m| m.state == MemberState::Active);
        let live = |m: &MemberId| view.member(m).is_some();
        let keep = active
            && current.holds_any(&self.local)
            && sides::from_two_sides(&current, incoming, &live)
            && sides::challenger_wins(incoming, &current, &live);
        if keep && self.kept_side_over.swap(incoming.epoch, Ordering::Relaxed) != incoming.epoch {
            warn!(
                epoch = incoming.epoch,
                publisher = ?incoming.master,
                ours = current.epoch,
                our_publisher = ?current.master,
                "the master's table comes from the other side of a healed network partition, and this side is larger: \
                 keeping this side's table until the master adopts it"
            );
        }
        keep
    }

    /// Asks `from` for its table and applies it if it is newer and `accept` approves it.
    pub(crate) async fn fetch_table_if(&self, from: &MemberId, accept: impl Fn(&PartitionTable) -> bool) -> bool {
        let Some(table) = self.request_table(from).await else { return false };
        if !accept(&table) {
            debug!(%from, epoch = table.epoch, publisher = ?table.master, "not adopting that member's table");
            return false;
        }
        self.apply_table(table)
    }

    /// Asks `from` for the table it holds, without applying it; `None` when it does not answer.
    pub(crate) async fn request_table(&self, from: &MemberId) -> Option<PartitionTable> {
        if *from == self.local {
            return None;
        }
        self.table_fetches.fetch_add(1, Ordering::Relaxed);
        let reply = self.net.request(from, MAP_SERVICE, Self::encode(&Msg::TableGet), Duration::from_secs(5)).await;
        match reply.map(|bytes| codec::decode::<Reply>(&bytes)) {
            Ok(Ok(Reply::Table(table))) => Some(table),
            Ok(Ok(other)) => {
                warn!(%from, reply = ?other, "unexpected reply to a table request");
                None
            }
            Ok(Err(error)) => {
                warn!(%from, %error, "undecodable table reply");
                None
            }
            Err(error) => {
                debug!(%from, %error, "table request failed");
                None
            }
        }
    }

    /// Whether `table` is one this member may serve under: published by the master it follows,
    /// or by a member that is gone (the previous master died; the new one republishes soon). A
    /// table published by another live member comes from members that acted as master apart
    /// (starting together, or a healed network partition) and may be replaced by one that moves
    /// the partition, dropping what was written under it.
    pub(crate) fn table_followed(&self, table: &PartitionTable) -> Result<(), String> {
        let view = self.membership.view();
        match (&table.master, &view.master) {
            (Some(publisher), Some(master)) if publisher != master && view.member(publisher).is_some() => Err(format!(
                "partition table epoch {} was published by {publisher}, not by the master {master}: waiting for \
                 the master's",
                table.epoch
            )),
            _ => Ok(()),
        }
    }

    /// Whether the member's table is current: it has one, no member advertises a newer one, and
    /// it is the table the master holds (members that acted as master at the same moment, e.g.
    /// while starting together, can hold different tables of the same epoch until the master
    /// republishes).
    pub(crate) fn table_status(&self) -> Result<(), String> {
        let table = self.table();
        if table.epoch == 0 {
            return Err("no partition table yet".into());
        }
        self.table_followed(&table)?;
        let advertised = self.gossip_tables();
        let newest = advertised.iter().map(|t| t.epoch).max().unwrap_or(0);
        if newest > table.epoch {
            return Err(format!("partition table epoch {} is behind the cluster's {newest}", table.epoch));
        }
        let master = self.membership.view().master.clone();
        if let Some(theirs) = master.and_then(|m| advertised.into_iter().find(|t| t.member == m))
            && theirs.epoch == table.epoch
            && theirs.publisher != table_gossip_value(&table).split_once(' ').map(|(_, p)| p).unwrap_or("-")
        {
            return Err(format!(
                "partition table epoch {} was published by another master than the master's ({})",
                table.epoch, theirs.publisher
            ));
        }
        Ok(())
    }
}

/// The net handler: decodes and dispatches in frame order.
pub(crate) struct MapHandler {
    pub(crate) node: std::sync::Weak<Node>,
}

impl Handler for MapHandler {
    fn handle(&self, from: &MemberId, body: Bytes, one_way: bool) -> NetReply {
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
        node.dispatch(from, msg, one_way)
    }
}

impl Node {
    fn dispatch(self: &Arc<Self>, from: &MemberId, msg: Msg, one_way: bool) -> NetReply {
        let now = |reply: Reply| NetReply::Now(Node::encode(&reply));
        match msg {
            Msg::Op { epoch, partition, map, op } => {
                if partition >= self.settings.partition_count {
                    return now(Reply::Failed { error: format!("partition {partition} does not exist") });
                }
                match self.owner_execute(partition, &map, op, epoch) {
                    crate::owner::Executed::Now(reply) => now(reply),
                    crate::owner::Executed::Pending(pending) => {
                        let node = self.clone();
                        NetReply::Later(Box::pin(async move { Node::encode(&node.finish_write(pending).await) }))
                    }
                }
            }
            Msg::Multi { epoch, map, partitions, op } => {
                let node = self.clone();
                NetReply::Later(Box::pin(
                    async move { Node::encode(&node.owner_multi(&map, partitions, op, epoch).await) },
                ))
            }
            Msg::Page { epoch, partition, map, after, limit } => {
                now(self.owner_page(partition, &map, after, limit, epoch))
            }
            Msg::Backup { epoch, partition, map, term, seq, op } => {
                let reply = self.on_backup(from, epoch, partition, &map, term, seq, &op);
                if one_way && matches!(reply, Reply::NeedSync { .. }) {
                    self.request_sync(from, partition, &map);
                }
                now(reply)
            }
            Msg::TermStart { epoch: _, partition, term, bases } => {
                self.on_term_start(partition, term, bases);
                NetReply::None
            }
            Msg::Install { epoch: _, partition, map, term, seq, chunk, last, entries } => {
                now(self.on_install(partition, &map, term, seq, chunk, last, entries))
            }
            Msg::SyncRequest { partition, map } => {
                let node = self.clone();
                let member = from.clone();
                self.tasks.spawn(async move { node.resync_backup(&member, partition, &map).await });
                NetReply::None
            }
            Msg::VersionCheck { epoch: _, versions } => now(self.on_version_check(versions)),
            Msg::TablePush { table } => {
                let epoch = table.epoch;
                // Only the master this member follows may change its table. After a network
                // partition heals, the smaller side's master may still push a table with a higher
                // epoch for a moment; applying it would make this side drop its data.
                let master = self.membership.view().master.clone();
                if master.as_ref() != Some(from) {
                    debug!(%from, ?master, epoch, "ignored a table pushed by a member that is not our master");
                } else if self.keeps_own_side(&table) {
                    debug!(%from, epoch, "kept this side's table over the master's");
                } else if !self.apply_table(table) {
                    debug!(%from, epoch, "ignored a table that is not newer");
                }
                now(Reply::TableAck { epoch: self.table().epoch })
            }
            Msg::TableGet => now(Reply::Table((*self.table()).clone())),
            Msg::MigrateStart { old_row, partition, new_row } => {
                let node = self.clone();
                let master = from.clone();
                NetReply::Later(Box::pin(async move {
                    Node::encode(&node.migrate_out(&master, partition, old_row, new_row).await)
                }))
            }
            Msg::MigrateAbort { partition, new_row } => {
                self.on_migrate_abort(partition, &new_row);
                now(Reply::Ack)
            }
            Msg::Events { events } => {
                self.deliver_local(events);
                NetReply::None
            }
            Msg::Stats => now(Reply::Stats(self.local_stats())),
        }
    }

    /// Remembers that a local subscription exists and announces it in gossip (first one only).
    pub(crate) async fn subscribe(&self, map: &str) -> broadcast::Receiver<RawEntryEvent> {
        let (rx, first) = {
            let mut listeners = self.local_listeners.lock().unwrap();
            match listeners.get(map) {
                Some(tx) => (tx.subscribe(), false),
                None => {
                    let (tx, rx) = broadcast::channel(LISTENER_CHANNEL_CAPACITY);
                    listeners.insert(map.to_string(), tx);
                    (rx, true)
                }
            }
        };
        if first {
            self.membership.set_ext_key(&format!("{LISTEN_KEY_PREFIX}{map}"), "1").await;
            info!(map, "listening for entry events");
        }
        rx
    }

    /// Members of the current view, for fan-out operations.
    pub(crate) fn view_members(&self) -> HashSet<MemberId> {
        self.membership.view().members.iter().map(|m| m.id.clone()).collect()
    }
}
