//! The partitioned distributed map: the partition table, record stores, synchronous and
//! asynchronous backups, migration, fail-over and expiry.
//!
//! Keys hash ([`hash`]) to one of `partition_count` partitions. The master assigns each partition
//! an owner and backups ([`assign`]) and publishes the table with a growing epoch. The owner of a
//! partition executes every operation on its keys, stamps each write with the partition's next
//! sequence number and sends it to the backups; synchronous backups acknowledge before the write
//! returns. Backups apply writes strictly in sequence; a gap or a new owner's term that does not
//! start where a backup stands makes the owner send a full copy. When an owner dies, the master
//! promotes its first synchronous backup, which holds every acknowledged write. New and moved
//! replicas are filled by migration, a full copy plus the writes that arrive meanwhile, while
//! operations go on; an ownership change freezes writes to that one partition only for the final
//! hand-over step.
//!
//! This crate works on encoded keys and values; the typed `DistributedMap<K, V>` lives in the
//! `grapevine` facade.

pub mod assign;
mod client;
pub mod config;
mod copy;
mod error;
mod fence;
#[cfg(test)]
mod fuzz_tests;
pub mod hash;
mod invalidation;
mod lineage;
mod listeners;
mod master;
pub mod merge;
mod messages;
mod migration;
mod near_cache;
mod node;
mod owner;
mod protection;
mod record;
mod rejoin;
mod replica;
mod ring;
mod stats;
mod store;
pub mod table;
mod tables;
mod takeover;
mod tasks;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use grapevine_membership::{MemberId, Membership};
use grapevine_net::{Net, codec};
use tokio::sync::broadcast;
use tracing::{info, warn};

pub use config::{
    BACKUP_COUNT_MAX, InvalidationSettings, MapConfig, MapSettings, NearCacheConfig, RELIABLE_TOPIC_MAP_PREFIX,
};
pub use error::MapError;
pub use invalidation::INVALIDATION_SERVICE;
pub use merge::{MergePolicy, UnknownMergePolicy, Verdict};
pub use messages::{EntryEventKind, LocalMapStats, LocalStats, PutMode, RawEntryEvent};
pub use near_cache::NearCacheStats;
pub use node::PartitionLost;
pub use record::{Expiry, Record};
pub use ring::{RING_CAPACITY_MAX, RING_READ_ITEMS_MAX, RingAppended, RingLimits, RingPage};
pub use table::{PartitionTable, TableId};

use messages::{Msg, MultiOp, Op, OpResult, Reply};
use node::{MAP_SERVICE, MapHandler, Node};

/// The partition part of the `/stats` document.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PartitionSummary {
    /// Number of partitions.
    pub count: u32,
    /// Epoch of this member's table.
    pub epoch: u64,
    /// Migrations the master has under way (0 on other members).
    pub migrating: usize,
    /// Partitions owned, per node id.
    pub owned_by_member: BTreeMap<String, u32>,
    /// Backup replicas held, per node id.
    pub backups_by_member: BTreeMap<String, u32>,
}

/// The map service of one member. Stop it with [`MapService::shutdown`]; dropping it stops its
/// background tasks too.
#[derive(Debug)]
pub struct MapService {
    node: Arc<Node>,
    /// Whether the table with this id is balanced for these members, for [`MapService::is_settled`].
    balanced: std::sync::Mutex<Option<(TableId, Vec<MemberId>, bool)>>,
}

impl Drop for MapService {
    fn drop(&mut self) {
        self.node.cancel.cancel();
    }
}

fn value(result: OpResult) -> Option<Vec<u8>> {
    match result {
        OpResult::Value(v) => v,
        OpResult::Positioned { value, .. } => value,
        OpResult::Flag(_)
        | OpResult::Int(_)
        | OpResult::Rejected(_)
        | OpResult::RingStored { .. }
        | OpResult::RingFull { .. }
        | OpResult::RingItems { .. } => None,
    }
}

/// What [`MapService::merge_entries`] did with the entries it was given.
#[derive(Debug, Clone, Default)]
pub struct MergeOutcome {
    /// Entries the owner's current entry (or absence) won against: nothing was written.
    pub kept_existing: u64,
    /// Entries stored by their owner (and replicated to its backups).
    pub took_merging: u64,
    /// Entries that could not be merged (timeout, owner lost, protection on the owner...), with
    /// why: merge them again later. When an owner's answer was lost the merge was sent again,
    /// so an entry taken by the first attempt may be counted as kept.
    pub failed: Vec<(Vec<u8>, MapError)>,
}

pub use rejoin::MERGE_IN_FLIGHT;

/// The expiry of a [`MapService::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetExpiry {
    /// The map's defaults (`ttl_seconds`, `max_idle_seconds`).
    Default,
    /// This expiry (fields left `None` use the map's defaults).
    Explicit(Expiry),
    /// Keep the current entry's time-to-live deadline and maximum idle time (Redis's
    /// `SET ... KEEPTTL`); an absent key gets the map's defaults.
    Keep,
}

/// Why a rejected operation did not apply, as text.
fn rejected(op: &'static str, map: &str, result: OpResult) -> MapError {
    let reason = match result {
        OpResult::Rejected(reason) => reason,
        other => format!("unexpected result {other:?}"),
    };
    MapError::Rejected { op, map: map.to_string(), reason }
}

fn flag(result: OpResult) -> bool {
    matches!(result, OpResult::Flag(true))
}

impl MapService {
    /// Starts the map service: registers its data-plane handler and its background tasks.
    pub fn start(net: Net, membership: Membership, settings: MapSettings) -> MapService {
        let local = membership.local_id().clone();
        let node = Node::new(local, net.clone(), membership, settings);
        net.register(MAP_SERVICE, Arc::new(MapHandler { node: Arc::downgrade(&node) }));
        let invalidations = invalidation::InvalidationHandler { node: Arc::downgrade(&node) };
        net.register(INVALIDATION_SERVICE, Arc::new(invalidations));
        node.spawn(invalidation::invalidation_loop(node.clone()));
        node.spawn(master::master_loop(node.clone()));
        node.spawn(tables::refresh_loop(node.clone()));
        node.spawn(tasks::follow_loop(node.clone()));
        node.spawn(tasks::anti_entropy_loop(node.clone()));
        node.spawn(tasks::sweep_loop(node.clone()));
        node.spawn(tasks::confirm_loop(node.clone()));
        MapService { node, balanced: std::sync::Mutex::new(None) }
    }

    /// The settings in use.
    pub fn settings(&self) -> &MapSettings {
        &self.node.settings
    }

    /// The value of `key`, if present and not expired. A map with a near cache answers from it
    /// when it can (see `[maps.NAME.near_cache]`).
    pub async fn get(&self, map: &str, key: Vec<u8>) -> Result<Option<Vec<u8>>, MapError> {
        if let Some(cache) = self.node.near_cache(map).await {
            return self.near_get(&cache, map, key).await;
        }
        Ok(value(self.node.call(map, Op::Get { key }).await?))
    }

    async fn near_get(
        &self,
        cache: &near_cache::NearCache,
        map: &str,
        key: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, MapError> {
        if let Some(value) = cache.get(&key) {
            return Ok(Some(value));
        }
        let p = self.partition_of(&key);
        let local_owner = self.node.table().owner(p) == Some(&self.node.local);
        match self.node.call(map, Op::NearGet { key: key.clone() }).await? {
            OpResult::Positioned { value, term, seq } => {
                if let Some(v) = &value
                    && !local_owner
                {
                    cache.offer(p, key, v.clone(), &term, seq, record::now_ms());
                }
                Ok(value)
            }
            other => {
                Err(MapError::Failed { op: "get", map: map.to_string(), error: format!("unexpected result {other:?}") })
            }
        }
    }

    /// Runs a write, then drops its key from this member's near cache of the map (the owner's
    /// event drops it on other members).
    async fn write<T>(
        &self,
        map: &str,
        key: Option<&[u8]>,
        write: impl Future<Output = Result<T, MapError>>,
    ) -> Result<T, MapError> {
        let outcome = write.await;
        self.node.near_cache_written(map, key);
        outcome
    }

    /// A copy of `key` for the near cache's invalidation after a write: empty (no copy) when no
    /// map has a near cache configured, which `near_cache_written` then ignores.
    fn near_key(&self, key: &[u8]) -> Vec<u8> {
        if self.node.invalidation.configured { key.to_vec() } else { Vec::new() }
    }

    /// True when `key` is present and not expired.
    pub async fn contains_key(&self, map: &str, key: Vec<u8>) -> Result<bool, MapError> {
        Ok(flag(self.node.call(map, Op::ContainsKey { key }).await?))
    }

    /// Sets `key` to `value`; returns the previous value. `expiry: None` uses the map's defaults.
    pub async fn put(
        &self,
        map: &str,
        key: Vec<u8>,
        value_: Vec<u8>,
        expiry: Option<Expiry>,
    ) -> Result<Option<Vec<u8>>, MapError> {
        let k = self.near_key(&key);
        let op = Op::Put { key, value: value_, expiry, mode: PutMode::Always };
        Ok(value(self.write(map, Some(&k), self.node.call(map, op)).await?))
    }

    /// Sets `key` only if absent; returns the existing value if there was one (and then changes nothing).
    pub async fn put_if_absent(
        &self,
        map: &str,
        key: Vec<u8>,
        value_: Vec<u8>,
        expiry: Option<Expiry>,
    ) -> Result<Option<Vec<u8>>, MapError> {
        let k = self.near_key(&key);
        let op = Op::Put { key, value: value_, expiry, mode: PutMode::IfAbsent };
        Ok(value(self.write(map, Some(&k), self.node.call(map, op)).await?))
    }

    /// Sets `key` only if present; returns the previous value (`None`: nothing was changed).
    pub async fn replace(&self, map: &str, key: Vec<u8>, value_: Vec<u8>) -> Result<Option<Vec<u8>>, MapError> {
        let k = self.near_key(&key);
        let op = Op::Put { key, value: value_, expiry: None, mode: PutMode::IfPresent };
        Ok(value(self.write(map, Some(&k), self.node.call(map, op)).await?))
    }

    /// Sets `key` to `new` (removes it when `None`) if its value is `expected` (absent when `None`).
    pub async fn compare_and_set(
        &self,
        map: &str,
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, MapError> {
        let k = self.near_key(&key);
        Ok(flag(self.write(map, Some(&k), self.node.call(map, Op::CompareAndSet { key, expected, new })).await?))
    }

    /// Removes `key`; returns its value.
    pub async fn remove(&self, map: &str, key: Vec<u8>) -> Result<Option<Vec<u8>>, MapError> {
        let k = self.near_key(&key);
        Ok(value(self.write(map, Some(&k), self.node.call(map, Op::Remove { key })).await?))
    }

    /// Sets `key` to `value` when `mode` allows, with the expiry `expiry` says; returns the
    /// previous value. Whether it was written follows from `mode` and the previous value: always,
    /// only when there was none (`IfAbsent`), or only when there was one (`IfPresent`).
    pub async fn set(
        &self,
        map: &str,
        key: Vec<u8>,
        value_: Vec<u8>,
        mode: PutMode,
        expiry: SetExpiry,
    ) -> Result<Option<Vec<u8>>, MapError> {
        let k = self.near_key(&key);
        let op = match expiry {
            SetExpiry::Default => Op::Put { key, value: value_, expiry: None, mode },
            SetExpiry::Explicit(expiry) => Op::Put { key, value: value_, expiry: Some(expiry), mode },
            SetExpiry::Keep => Op::PutKeepTtl { key, value: value_, mode },
        };
        Ok(value(self.write(map, Some(&k), self.node.call(map, op)).await?))
    }

    /// Adds `delta` to the value of `key`, a decimal integer as Redis stores counters (an absent
    /// key counts as 0), atomically on the partition's owner, keeping the entry's expiry; returns
    /// the new value. A value that is not an integer, or a result that would overflow `i64`, is
    /// refused with [`MapError::Rejected`].
    pub async fn incr_by(&self, map: &str, key: Vec<u8>, delta: i64) -> Result<i64, MapError> {
        let k = self.near_key(&key);
        match self.write(map, Some(&k), self.node.call(map, Op::Incr { key, delta })).await? {
            OpResult::Int(n) => Ok(n),
            other => Err(rejected("incr", map, other)),
        }
    }

    /// Sets the time to live of a present entry to `ttl` from now (zero: removes the entry at
    /// once), or removes its time to live (`None`). Returns whether the entry was present (for
    /// `None`: whether it had a time to live to remove).
    pub async fn set_ttl(&self, map: &str, key: Vec<u8>, ttl: Option<Duration>) -> Result<bool, MapError> {
        let ttl_ms = ttl.map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64);
        let k = self.near_key(&key);
        Ok(flag(self.write(map, Some(&k), self.node.call(map, Op::SetTtl { key, ttl_ms })).await?))
    }

    /// How long until `key` expires: `None` when absent, `Some(None)` when it never expires.
    /// Counts the time to live and the maximum idle time, whichever ends first.
    pub async fn time_to_live(&self, map: &str, key: Vec<u8>) -> Result<Option<Option<Duration>>, MapError> {
        match self.node.call(map, Op::Ttl { key }).await? {
            OpResult::Int(-2) => Ok(None),
            OpResult::Int(ms) if ms < 0 => Ok(Some(None)),
            OpResult::Int(ms) => Ok(Some(Some(Duration::from_millis(ms as u64)))),
            other => Err(rejected("ttl", map, other)),
        }
    }

    /// Split-brain merge: offers each `(encoded key, record)` of a side that merges to the key's
    /// owner under this member's table, which keeps its own entry or stores the merging one as the
    /// map's `merge_policy` decides ([`merge::decide`]; a stored one is replicated to the backups
    /// like any write, and listeners see it as added or updated). Call it once this member follows
    /// the cluster it merges into (it routes by its current table, catching up on newer ones like
    /// any operation). At most [`MERGE_IN_FLIGHT`] entries are in flight at once; each is retried
    /// within the operation timeout. `Err` only when the whole call is refused at once (shutting
    /// down, or this member is below the map's `min_cluster_size`); entries that failed on their
    /// own are listed in [`MergeOutcome::failed`].
    pub async fn merge_entries(&self, map: &str, entries: Vec<(Vec<u8>, Record)>) -> Result<MergeOutcome, MapError> {
        let policy = self.node.settings.map(map).merge_policy;
        self.merge_entries_with(map, policy, entries).await
    }

    /// [`MapService::merge_entries`] with an explicit policy instead of the map's.
    pub async fn merge_entries_with(
        &self,
        map: &str,
        policy: MergePolicy,
        entries: Vec<(Vec<u8>, Record)>,
    ) -> Result<MergeOutcome, MapError> {
        // No moment of joining and no lost partition: the policy alone decides (and, for
        // `latest-update`, the removals the owner remembers).
        let entries = entries.into_iter().map(|(key, record)| (key, record, merge::Offer::default())).collect();
        match self.node.merge_entries(map, policy, entries).await {
            Ok(merged) => Ok(MergeOutcome {
                kept_existing: merged.kept_existing,
                took_merging: merged.took_merging,
                failed: merged.failed.into_iter().map(|(key, _, _, error)| (key, error)).collect(),
            }),
            Err((error, _)) => Err(error),
        }
    }

    /// `Ok` unless a map this member knows of (configured, or used here) has a `min_cluster_size`
    /// this member's view is below; then why, naming each such map (for `/health`).
    pub fn protection_status(&self) -> Result<(), String> {
        self.node.protection_status()
    }

    /// Active, non-excluded members of this member's view (itself included when it is one): the
    /// size split-brain protection compares with each map's `min_cluster_size`.
    pub fn protection_size(&self) -> u32 {
        self.node.protection_size()
    }

    /// Up to `limit` live entries (key and value) of partition `partition`, in key order, after
    /// the key `after`; and the key to continue after, `None` at the partition's end. For cursors
    /// over a map (Redis's `SCAN`); see [`MapService::entries`] for a whole walk.
    pub async fn partition_page(
        &self,
        map: &str,
        partition: u32,
        after: Option<Vec<u8>>,
        limit: u32,
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, Option<Vec<u8>>), MapError> {
        if partition >= self.node.settings.partition_count {
            return Err(MapError::Invalid(format!(
                "partition {partition} does not exist (there are {})",
                self.node.settings.partition_count
            )));
        }
        self.node.page(map, partition, after, limit).await
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.node.settings.partition_count
    }

    /// Entries in the whole map (expired ones excluded), counted by each partition's owner.
    pub async fn len(&self, map: &str) -> Result<u64, MapError> {
        self.node.fan_out(map, MultiOp::Count).await
    }

    /// Removes every entry of the map; returns how many were removed.
    pub async fn clear(&self, map: &str) -> Result<u64, MapError> {
        self.write(map, None, self.node.fan_out(map, MultiOp::Clear)).await
    }

    /// Pages through the map's entries, partition by partition (weakly consistent: entries written
    /// during the walk may or may not be seen; none is seen twice).
    pub fn entries(&self, map: &str) -> RawEntries {
        RawEntries { node: self.node.clone(), map: map.to_string(), partition: 0, after: None, done: false }
    }

    /// Entry events of `map` from now on (best effort: events in flight when a member fails can be
    /// lost). The channel is bounded; a slow receiver gets `Lagged`.
    pub async fn subscribe(&self, map: &str) -> broadcast::Receiver<RawEntryEvent> {
        self.node.subscribe(map).await
    }

    /// The partition of an encoded key.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        hash::partition_of(key, self.node.settings.partition_count)
    }

    /// This member's partition table.
    pub fn table(&self) -> Arc<PartitionTable> {
        self.node.table()
    }

    /// `Ok` when this member has a current table; else why not (for `/health`).
    pub fn table_status(&self) -> Result<(), String> {
        self.node.table_status()
    }

    /// Waits until this member has a current table (see [`MapService::table_status`]), or
    /// `timeout` passes; then returns the status.
    pub async fn wait_table_current(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tables = self.node.tables.tx.subscribe();
        let mut views = self.node.membership.watch();
        loop {
            let status = self.node.table_status();
            if status.is_ok() {
                return status;
            }
            tokio::select! {
                _ = tables.changed() => {},
                _ = views.changed() => {},
                _ = tokio::time::sleep_until(deadline) => return self.node.table_status(),
            }
        }
    }

    /// Partitions that lost every replica of some map at once, as this member learns of them (from
    /// now on; the master also logs each as an error). The channel is bounded; a slow receiver
    /// gets `Lagged`. The count since start is in [`LocalStats::partitions_lost`].
    pub fn partition_losses(&self) -> broadcast::Receiver<PartitionLost> {
        self.node.losses.subscribe()
    }

    /// This member's statistics.
    pub fn local_stats(&self) -> LocalStats {
        self.node.local_stats()
    }

    /// Every member's statistics (this one's included), or why a member did not answer.
    pub async fn cluster_stats(&self, timeout: Duration) -> Vec<(MemberId, Result<LocalStats, String>)> {
        let members: BTreeSet<MemberId> = self.node.view_members().into_iter().collect();
        let mut calls = tokio::task::JoinSet::new();
        for member in members {
            if member == self.node.local {
                continue;
            }
            let request = self.node.net.request(&member, MAP_SERVICE, Node::encode(&Msg::Stats), timeout);
            calls.spawn(async move {
                let outcome = match request.await {
                    Ok(bytes) => match codec::decode::<Reply>(&bytes) {
                        Ok(Reply::Stats(stats)) => Ok(stats),
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (member, outcome)
            });
        }
        let mut all = vec![(self.node.local.clone(), Ok(self.node.local_stats()))];
        while let Some(joined) = calls.join_next().await {
            if let Ok(result) = joined {
                all.push(result);
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The partition table summarised for operators.
    pub fn partition_summary(&self) -> PartitionSummary {
        let table = self.node.table();
        let mut owned_by_member: BTreeMap<String, u32> = BTreeMap::new();
        let mut backups_by_member: BTreeMap<String, u32> = BTreeMap::new();
        for row in &table.rows {
            for (i, member) in row.iter().enumerate() {
                let counts = if i == 0 { &mut owned_by_member } else { &mut backups_by_member };
                *counts.entry(member.node_id.to_string()).or_default() += 1;
            }
        }
        PartitionSummary {
            count: table.partition_count(),
            epoch: table.epoch,
            migrating: self.node.master.lock().unwrap().migrating(),
            owned_by_member,
            backups_by_member,
        }
    }

    /// Whether this member is still offering its side's entries to the cluster it merged into
    /// after a split (see `merge_policy`).
    pub fn is_merging(&self) -> bool {
        self.node.merges_running.load(Ordering::SeqCst) > 0
    }

    /// True when, as far as this member can tell, replication is complete: it has the newest table,
    /// the table is the balanced plan for the active members (nothing left to migrate), and the
    /// backups of every partition it owns have confirmed they hold their data.
    pub fn is_settled(&self) -> bool {
        let node = &self.node;
        if node.table_status().is_err() {
            return false;
        }
        let view = node.membership.view();
        let active: Vec<MemberId> = view.eligible_members().map(|m| m.id.clone()).collect();
        if active.is_empty() {
            return false;
        }
        let table = node.table();
        // Whether the table is its own balanced plan, not whether it reached the master's target
        // (`Node::target_rows`): a member that planned from an older table may hold a stale target.
        let balanced = {
            let mut cache = self.balanced.lock().unwrap();
            match cache.as_ref() {
                Some((id, members, balanced)) if *id == table.id() && *members == active => *balanced,
                _ => {
                    let replicas = active.len().min(assign::REPLICAS_MAX);
                    let balanced = assign::plan(&table.rows, &active, replicas) == table.rows;
                    *cache = Some((table.id(), active.clone(), balanced));
                    balanced
                }
            }
        };
        if !balanced {
            return false;
        }
        if node.master.lock().unwrap().migrating() > 0 {
            return false;
        }
        table.owned_by(&node.local).all(|p| {
            let data = node.slot(p).data.lock().unwrap();
            !data.unconfirmed && !data.starting && data.fenced.is_none()
        })
    }

    /// For a graceful shutdown, after this member announced it is leaving: waits until the master
    /// has moved every partition replica off this member and every member has that table.
    /// Returns at once when no other active member exists (its data cannot go anywhere).
    pub async fn wait_handoff(&self, timeout: Duration) -> Result<(), String> {
        let node = &self.node;
        let deadline = Instant::now() + timeout;
        let mut tables = node.tables.tx.subscribe();
        loop {
            let view = node.membership.view();
            if view.active_members().all(|m| m.id == node.local) {
                warn!("leaving with no other active member: this member's map entries are not kept anywhere");
                return Ok(());
            }
            let table = node.table();
            let everyone_has_it = node
                .gossip_epochs()
                .into_iter()
                .filter(|(m, _)| view.member(m).is_some())
                .all(|(_, epoch)| epoch >= table.epoch);
            if table.epoch > 0 && !table.holds_any(&node.local) && everyone_has_it {
                info!(epoch = table.epoch, "partitions handed over");
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let held = table.rows.iter().filter(|row| row.contains(&node.local)).count();
                return Err(format!("{held} partition replicas were still on this member after {timeout:?}"));
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), tables.changed()).await;
        }
    }

    /// Stops the service's tasks and refuses new operations.
    pub async fn shutdown(&self) {
        self.node.stopped.store(true, Ordering::SeqCst);
        self.node.cancel.cancel();
        self.node.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.node.tasks.wait()).await.is_err() {
            warn!("map service tasks did not stop within 10 s");
        }
    }

    /// This member's near caches' statistics (maps with a near cache it has used).
    pub fn near_cache_stats(&self) -> Vec<NearCacheStats> {
        self.node.near_cache_stats()
    }

    /// Every member's near-cache statistics (this one's included), or why a member did not answer.
    pub async fn near_cache_cluster_stats(
        &self,
        timeout: Duration,
    ) -> Vec<(MemberId, Result<Vec<NearCacheStats>, String>)> {
        let members: BTreeSet<MemberId> = self.node.view_members().into_iter().collect();
        let mut calls = tokio::task::JoinSet::new();
        for member in members {
            if member == self.node.local {
                continue;
            }
            let body = Node::encode(&invalidation::InvMsg::Stats);
            let request = self.node.net.request(&member, INVALIDATION_SERVICE, body, timeout);
            calls.spawn(async move {
                let outcome = match request.await {
                    Ok(bytes) => match codec::decode::<invalidation::InvReply>(&bytes) {
                        Ok(invalidation::InvReply::Stats(stats)) => Ok(stats),
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (member, outcome)
            });
        }
        let mut all = vec![(self.node.local.clone(), Ok(self.node.near_cache_stats()))];
        while let Some(joined) = calls.join_next().await {
            if let Ok(result) = joined {
                all.push(result);
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Test hook: drop the invalidation events (changed keys) this member receives while `drop`
    /// is set; the owners' position reports still arrive.
    #[doc(hidden)]
    pub fn drop_invalidations_for_tests(&self, drop: bool) {
        self.node.drop_invalidations(drop);
    }

    /// Test hook: how many changed keys [`MapService::drop_invalidations_for_tests`] dropped.
    #[doc(hidden)]
    pub fn dropped_invalidations(&self) -> u64 {
        self.node.dropped_invalidations()
    }

    /// Test hook: runs one anti-entropy round now.
    #[doc(hidden)]
    pub async fn anti_entropy_now(&self) {
        self.node.check_backups().await;
    }

    /// Test hook: sweeps expired entries now.
    #[doc(hidden)]
    pub fn sweep_now(&self) {
        self.node.sweep();
    }

    /// Test hook: the entries this member holds for `map` in partition `p` (any role).
    #[doc(hidden)]
    pub fn local_entries(&self, map: &str, p: u32) -> Vec<(Vec<u8>, Record)> {
        let data = self.node.slot(p).data.lock().unwrap();
        data.maps.get(map).map(|mp| mp.entries.iter().collect()).unwrap_or_default()
    }
}

/// A walk over a map's entries; see [`MapService::entries`].
#[derive(Debug)]
pub struct RawEntries {
    node: Arc<Node>,
    map: String,
    partition: u32,
    after: Option<Vec<u8>>,
    done: bool,
}

/// Entries fetched per request.
const PAGE_SIZE: u32 = 512;

impl RawEntries {
    /// The next batch of entries; `None` at the end.
    pub async fn next_page(&mut self) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, MapError> {
        while !self.done {
            if self.partition >= self.node.settings.partition_count {
                self.done = true;
                break;
            }
            let (entries, next) = self.node.page(&self.map, self.partition, self.after.take(), PAGE_SIZE).await?;
            match next {
                Some(key) => self.after = Some(key),
                None => self.partition += 1,
            }
            if !entries.is_empty() {
                return Ok(Some(entries));
            }
        }
        Ok(None)
    }
}
