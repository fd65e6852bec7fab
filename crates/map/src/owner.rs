//! The owner's side of a partition: executing operations, replicating writes to backups in
//! sequence, full copies for backups that fell behind, and handing a partition to other members.

use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use grapevine_net::{ResponseFuture, codec};
use tracing::{debug, info, warn};

use crate::config::MapConfig;
use crate::messages::{EntryEventKind, Msg, MultiOp, Op, OpResult, RawEntryEvent, Reply};
use crate::node::{Freeze, MAP_SERVICE, Node, PartitionData};
use crate::record::now_ms;
use crate::store::Change;
use crate::table::PartitionTable;

/// What a replicated write adds to its key and value: record metadata, message fields, framing.
const ENTRY_OVERHEAD_BYTES: usize = 256;

/// Largest full-copy chunk, in encoded bytes (approximately). Well under the frame limit.
const INSTALL_CHUNK_BYTES: usize = 1 << 20;

/// An operation executed by the owner: answered at once, or waiting for backup acknowledgements.
pub(crate) enum Executed {
    Now(Reply),
    Pending(PendingWrite),
}

/// A write applied by the owner whose synchronous backups have not all answered.
pub(crate) struct PendingWrite {
    partition: u32,
    map: String,
    term: u64,
    seq: u64,
    result: OpResult,
    acks: Vec<(MemberId, ResponseFuture)>,
    _inflight: InflightGuard,
}

/// Counts a write in flight on a partition until dropped, so a freezing owner can wait for writes
/// to finish even when a caller gives up on one.
pub(crate) struct InflightGuard {
    node: Arc<Node>,
    partition: u32,
}

impl InflightGuard {
    fn new(node: &Arc<Node>, partition: u32, data: &mut PartitionData) -> Self {
        data.inflight += 1;
        InflightGuard { node: node.clone(), partition }
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let slot = self.node.slot(self.partition);
        let mut data = slot.data.lock().unwrap();
        data.inflight = data.inflight.saturating_sub(1);
        if data.inflight == 0 {
            slot.drained.notify_waiters();
        }
    }
}

/// The backups of `p` for a map: synchronous ones (plus migration targets that need the map) and
/// asynchronous ones.
fn replica_targets(
    table: &PartitionTable,
    p: u32,
    config: &MapConfig,
    migrating: &[(MemberId, usize)],
) -> (Vec<MemberId>, Vec<MemberId>) {
    let row = table.row(p);
    let sync_end = (1 + usize::from(config.backup_count)).min(row.len());
    let async_end = config.replicas().min(row.len());
    let mut sync: Vec<MemberId> = row.get(1..sync_end).unwrap_or_default().to_vec();
    let mut asynchronous: Vec<MemberId> = row.get(sync_end..async_end).unwrap_or_default().to_vec();
    let highest_index = config.replicas() - 1;
    for (member, index) in migrating {
        // A migration target gets the map's writes if its new index uses the map; synchronously, so
        // that it holds every acknowledged write by the time the new row is committed.
        if *index <= highest_index && !sync.contains(member) {
            asynchronous.retain(|m| m != member);
            sync.push(member.clone());
        }
    }
    (sync, asynchronous)
}

fn event_of(map: &str, change: &Change) -> RawEntryEvent {
    RawEntryEvent {
        map: map.to_string(),
        kind: change.kind,
        key: change.key.clone(),
        value: change.value.clone(),
        old_value: change.old_value.clone(),
    }
}

impl Node {
    /// Executes `op` on partition `p` as its owner.
    pub(crate) fn owner_execute(self: &Arc<Self>, p: u32, map: &str, op: Op, caller_epoch: u64) -> Executed {
        let table = self.table();
        if let Some(reply) = self.check_owner(&table, p, caller_epoch) {
            return Executed::Now(reply);
        }
        // An entry must fit in one message to reach its backups: refuse it before applying it here.
        let entry_bytes = op.payload_bytes() + map.len() + ENTRY_OVERHEAD_BYTES;
        if entry_bytes > self.net.frame_bytes_max() {
            return Executed::Now(Reply::Failed {
                error: format!(
                    "the entry takes {entry_bytes} bytes, more than net.frame_bytes_max = {} allows between members; \
                     store a smaller value or raise net.frame_bytes_max on every member",
                    self.net.frame_bytes_max()
                ),
            });
        }
        let config = self.settings.map(map);
        let counters = self.counters(map);
        let op_name = op.name();
        let now = now_ms();
        let slot = self.slot(p);
        let mut data = slot.data.lock().unwrap();
        // Reads are refused too: once the master commits the hand-over, the new owner accepts writes
        // while this member may not have heard yet, and must not answer with older data meanwhile.
        if data.frozen.is_some() {
            return Executed::Now(Reply::Retry {
                reason: format!("partition {p} is being handed over to another member"),
            });
        }
        let (term, idle_floor) = (data.term, data.owner_since_ms);
        let mp = data.maps.entry(map.to_string()).or_insert_with(|| crate::store::MapPartition::new(term));
        let (result, change) = mp.execute(op, now, idle_floor, &config);
        counters.count_owner_op(op_name, &result);
        let Some(change) = change else { return Executed::Now(Reply::Done(result)) };
        let events = vec![event_of(map, &change)];
        let (seq, acks, guard) = self.replicate_locked(&table, p, map, &config, &mut data, change, events);
        drop(data);
        if acks.is_empty() {
            drop(guard);
            return Executed::Now(Reply::Done(result));
        }
        Executed::Pending(PendingWrite {
            partition: p,
            map: map.to_string(),
            term,
            seq,
            result,
            acks,
            _inflight: guard,
        })
    }

    /// `None` when this member may serve `p`; otherwise the reply telling the caller why not.
    fn check_owner(self: &Arc<Self>, table: &PartitionTable, p: u32, caller_epoch: u64) -> Option<Reply> {
        if table.epoch == 0 {
            return Some(Reply::Retry { reason: "this member has no partition table yet".into() });
        }
        if caller_epoch > table.epoch {
            // The caller knows a newer table: catch up before answering for the partition.
            self.spawn_table_refresh();
        }
        if let Err(reason) = self.table_followed(table) {
            // Members that acted as master apart for a moment (starting together, or a healed
            // partition): a write accepted under this table could be dropped when the master's
            // arrives.
            self.spawn_table_refresh();
            return Some(Reply::Retry { reason });
        }
        if table.owner(p) != Some(&self.local) {
            return Some(Reply::WrongOwner { epoch: table.epoch });
        }
        None
    }

    /// Stamps a change with the partition's next sequence number and sends it to the backups:
    /// asynchronous ones without waiting, synchronous ones as requests whose answers the caller
    /// awaits; then publishes `events`. Runs under the partition lock, which is what keeps backups'
    /// input, and listeners' events, in write order.
    #[allow(clippy::too_many_arguments)]
    fn replicate_locked(
        self: &Arc<Self>,
        table: &PartitionTable,
        p: u32,
        map: &str,
        config: &MapConfig,
        data: &mut PartitionData,
        change: Change,
        events: Vec<RawEntryEvent>,
    ) -> (u64, Vec<(MemberId, ResponseFuture)>, InflightGuard) {
        let (sync, asynchronous) = replica_targets(table, p, config, &data.migrating);
        let mp = data.maps.get_mut(map).expect("the map partition was just written");
        mp.seq += 1;
        let (term, seq) = (mp.term, mp.seq);
        let msg = Node::encode(&Msg::Backup {
            epoch: table.epoch,
            partition: p,
            map: map.to_string(),
            term,
            seq,
            op: change.repl,
        });
        for member in &asynchronous {
            if let Err(error) = self.net.send(member, MAP_SERVICE, msg.clone()) {
                debug!(partition = p, %member, %error, "asynchronous backup not sent; anti-entropy will repair it");
            }
        }
        let acks = sync
            .into_iter()
            .map(|member| {
                let ack = self.net.request(&member, MAP_SERVICE, msg.clone(), self.settings.backup_ack_timeout);
                (member, ack)
            })
            .collect();
        self.publish_events(map, events);
        let guard = InflightGuard::new(self, p, data);
        (seq, acks, guard)
    }

    /// Waits for the synchronous backups of a write. A backup that fell behind gets a full copy
    /// first; any other failure makes the write fail with an error that says it may persist.
    pub(crate) async fn finish_write(self: &Arc<Self>, pending: PendingWrite) -> Reply {
        let PendingWrite { partition, map, term, seq, result, acks, _inflight } = pending;
        let mut failures = Vec::new();
        let asked: Vec<MemberId> = acks.iter().map(|(member, _)| member.clone()).collect();
        for (member, ack) in acks {
            let answer = ack.await.map_err(|e| e.to_string()).and_then(|bytes| {
                codec::decode::<Reply>(&bytes).map_err(|e| format!("undecodable acknowledgement: {e}"))
            });
            let outcome = match answer {
                Ok(Reply::Ack) => Ok(()),
                Ok(Reply::NeedSync { .. }) => self.ensure_synced(&member, partition, &map, term, seq).await,
                Ok(Reply::Stale { epoch }) => {
                    self.spawn_table_refresh();
                    Err(format!("it has a newer partition table (epoch {epoch}): the partition moved"))
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(_) if self.membership.view().member(&member).is_none() => {
                    self.cover_departed_backup(&member, &asked, partition, &map, term, seq).await
                }
                Err(error) => Err(error),
            };
            if let Err(error) = outcome {
                failures.push(format!("{member}: {error}"));
            }
        }
        if failures.is_empty() {
            return Reply::Done(result);
        }
        warn!(partition, map = %map, failures = ?failures, "synchronous backup failed");
        Reply::Failed {
            error: format!(
                "the write was applied by the owner {} of partition {partition} but its synchronous backup did not \
                 confirm it ({}); it may or may not survive the loss of the owner",
                self.local,
                failures.join("; ")
            ),
        }
    }

    /// A synchronous backup of a write left the cluster (it is no longer in the view) before it
    /// confirmed the write: the master promotes it away. Waits, within `backup_ack_timeout`, for
    /// the table without it, then makes sure the synchronous backups that table gives the
    /// partition (other than those `asked` already) hold the write, so the write is acknowledged
    /// as durable only once it really is.
    async fn cover_departed_backup(
        self: &Arc<Self>,
        departed: &MemberId,
        asked: &[MemberId],
        p: u32,
        map: &str,
        term: u64,
        seq: u64,
    ) -> Result<(), String> {
        let deadline = Instant::now() + self.settings.backup_ack_timeout;
        let mut tables = self.table_tx.subscribe();
        let table = loop {
            let table = tables.borrow_and_update().clone();
            if !table.row(p).contains(departed) {
                break table;
            }
            match tokio::time::timeout_at(deadline.into(), tables.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("this member is shutting down".into()),
                Err(_) => {
                    return Err(format!(
                        "it left the cluster and no partition table without it arrived within {:?}",
                        self.settings.backup_ack_timeout
                    ));
                }
            }
        };
        if table.owner(p) != Some(&self.local) {
            return Err(format!("it left the cluster and partition {p} moved to another owner meanwhile"));
        }
        let (sync, _) = replica_targets(&table, p, &self.settings.map(map), &[]);
        for member in sync.iter().filter(|m| !asked.contains(m)) {
            self.ensure_synced(member, p, map, term, seq)
                .await
                .map_err(|e| format!("it left the cluster, and its replacement {member} did not confirm: {e}"))?;
        }
        debug!(partition = p, %departed, "a departed synchronous backup was replaced; the write is on its replacement");
        Ok(())
    }

    /// Makes sure `member` holds map partition `(p, map)` at least up to `(term, seq)`: sends a full
    /// copy unless one covering it is already on its way, then asks the backup to confirm.
    pub(crate) async fn ensure_synced(
        self: &Arc<Self>,
        member: &MemberId,
        p: u32,
        map: &str,
        term: u64,
        seq: u64,
    ) -> Result<(), String> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let check = {
                let table = self.table();
                if table.owner(p) != Some(&self.local) {
                    return Err(format!("this member no longer owns partition {p}"));
                }
                let mut data = self.slot(p).data.lock().unwrap();
                let key = (member.clone(), map.to_string());
                let covered = data.synced.get(&key).is_some_and(|(t, s)| *t == term && *s >= seq);
                let Some(mp) = data.maps.get(map) else { return Err(format!("map {map:?} vanished")) };
                if mp.term != term {
                    return Err(format!("partition {p} started a new term"));
                }
                let position = (mp.term, mp.seq);
                if !covered {
                    self.send_full_copy(member, p, map, mp, table.epoch);
                    data.synced.insert(key, position);
                }
                let msg = Node::encode(&Msg::VersionCheck {
                    epoch: table.epoch,
                    versions: vec![(p, map.to_string(), term, seq)],
                });
                self.net.request(member, MAP_SERVICE, msg, self.settings.migration_timeout)
            };
            let bytes = check.await.map_err(|e| e.to_string())?;
            match codec::decode::<Reply>(&bytes) {
                Ok(Reply::Mismatch { partitions }) if partitions.is_empty() => return Ok(()),
                Ok(Reply::Mismatch { .. }) => {
                    self.slot(p).data.lock().unwrap().synced.remove(&(member.clone(), map.to_string()));
                }
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(e) => return Err(format!("undecodable answer: {e}")),
            }
        }
        Err(format!("the backup is still behind after {ATTEMPTS} full copies"))
    }

    /// Enqueues a full copy of a map partition to `member`, in chunks. Called under the partition
    /// lock, so writes after it reach the backup after the copy.
    fn send_full_copy(&self, member: &MemberId, p: u32, map: &str, mp: &crate::store::MapPartition, epoch: u64) {
        let mut chunk = 0u32;
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut iter = mp.entries.iter().peekable();
        loop {
            let next = iter.next();
            if let Some((key, record)) = next {
                bytes += key.len() + record.value.len() + 64;
                entries.push((key.clone(), record.clone()));
            }
            let last = iter.peek().is_none();
            if bytes >= INSTALL_CHUNK_BYTES || last {
                let msg = Node::encode(&Msg::Install {
                    epoch,
                    partition: p,
                    map: map.to_string(),
                    term: mp.term,
                    seq: mp.seq,
                    chunk,
                    last,
                    entries: std::mem::take(&mut entries),
                });
                if let Err(error) = self.net.send(member, MAP_SERVICE, msg) {
                    debug!(partition = p, %member, %error, "full copy not sent");
                }
                chunk += 1;
                bytes = 0;
            }
            if last {
                break;
            }
        }
        debug!(partition = p, map, %member, chunks = chunk, entries = mp.len(), "full copy sent");
    }

    /// A backup asked for a full copy (it missed asynchronous writes).
    pub(crate) async fn resync_backup(self: &Arc<Self>, member: &MemberId, p: u32, map: &str) {
        let position = {
            let data = self.slot(p).data.lock().unwrap();
            data.maps.get(map).map(|mp| (mp.term, mp.seq))
        };
        let Some((term, seq)) = position else { return };
        if let Err(error) = self.ensure_synced(member, p, map, term, seq).await {
            debug!(partition = p, map, %member, %error, "resync of a backup failed; anti-entropy will retry");
        }
    }

    /// Counts or clears a map over the partitions of `partitions` that this member owns.
    pub(crate) async fn owner_multi(
        self: &Arc<Self>,
        map: &str,
        partitions: Vec<u32>,
        op: MultiOp,
        caller_epoch: u64,
    ) -> Reply {
        let table = self.table();
        let config = self.settings.map(map);
        let now = now_ms();
        let mut done = Vec::new();
        let mut not_owner = Vec::new();
        let mut pending = Vec::new();
        for p in partitions {
            if p >= self.settings.partition_count || self.check_owner(&table, p, caller_epoch).is_some() {
                not_owner.push(p);
                continue;
            }
            let mut data = self.slot(p).data.lock().unwrap();
            match op {
                MultiOp::Count => {
                    let floor = data.owner_since_ms;
                    done.push((p, data.maps.get(map).map(|mp| mp.live_len(now, floor)).unwrap_or(0)));
                }
                MultiOp::Clear => {
                    if data.frozen.is_some() {
                        not_owner.push(p);
                        continue;
                    }
                    let Some(mp) = data.maps.get_mut(map) else {
                        done.push((p, 0));
                        continue;
                    };
                    let cleared = mp.len() as u64;
                    if cleared == 0 {
                        done.push((p, 0));
                        continue;
                    }
                    let listening = !self.listeners_of(map).is_empty();
                    let events: Vec<RawEntryEvent> = if listening {
                        mp.entries
                            .iter()
                            .map(|(k, r)| RawEntryEvent {
                                map: map.to_string(),
                                kind: EntryEventKind::Removed,
                                key: k.clone(),
                                value: None,
                                old_value: Some(r.value.clone()),
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                    mp.clear();
                    let change = Change {
                        repl: crate::messages::ReplOp::Clear,
                        kind: EntryEventKind::Removed,
                        key: Vec::new(),
                        value: None,
                        old_value: None,
                    };
                    let (term, _) = (mp.term, ());
                    let (seq, acks, guard) = self.replicate_locked(&table, p, map, &config, &mut data, change, events);
                    pending.push((
                        PendingWrite {
                            partition: p,
                            map: map.to_string(),
                            term,
                            seq,
                            result: OpResult::Flag(true),
                            acks,
                            _inflight: guard,
                        },
                        cleared,
                    ));
                }
            }
        }
        for (write, cleared) in pending {
            let p = write.partition;
            match self.finish_write(write).await {
                Reply::Done(_) => done.push((p, cleared)),
                failed => return failed,
            }
        }
        Reply::Multi { done, not_owner }
    }

    /// A page of entries of partition `p`.
    pub(crate) fn owner_page(
        self: &Arc<Self>,
        p: u32,
        map: &str,
        after: Option<Vec<u8>>,
        limit: u32,
        caller_epoch: u64,
    ) -> Reply {
        let table = self.table();
        if p >= self.settings.partition_count {
            return Reply::Failed { error: format!("partition {p} does not exist") };
        }
        if let Some(reply) = self.check_owner(&table, p, caller_epoch) {
            return reply;
        }
        let data = self.slot(p).data.lock().unwrap();
        if data.frozen.is_some() {
            return Reply::Retry { reason: format!("partition {p} is being handed over to another member") };
        }
        let limit = limit.clamp(1, 10_000) as usize;
        let (entries, next) = match data.maps.get(map) {
            Some(mp) => mp.page(after.as_deref(), limit, now_ms(), data.owner_since_ms),
            None => (Vec::new(), None),
        };
        Reply::Page { entries, next }
    }

    /// The master asks this owner to move partition `p` from `old_row` to `new_row`: copy every
    /// map to the members that need it, keep them up to date, and if the owner changes, freeze
    /// writes and wait for the writes in flight; then report ready. The master commits the new
    /// row; the freeze ends when this member applies a table where the row changed, or on abort.
    pub(crate) async fn migrate_out(
        self: &Arc<Self>,
        master: &MemberId,
        p: u32,
        old_row: Vec<MemberId>,
        new_row: Vec<MemberId>,
    ) -> Reply {
        let started = Instant::now();
        let table = self.table();
        if p >= self.settings.partition_count || new_row.is_empty() {
            return Reply::Failed { error: format!("invalid migration of partition {p} to {new_row:?}") };
        }
        if table.row(p) != old_row.as_slice() || old_row.first() != Some(&self.local) {
            return Reply::Failed {
                error: format!(
                    "partition {p}'s row here is {:?} at epoch {}, not {old_row:?}",
                    table.row(p),
                    table.epoch
                ),
            };
        }
        let mut checks = Vec::new();
        {
            let mut data = self.slot(p).data.lock().unwrap();
            if data.migration_target.as_ref() == Some(&new_row) && (data.frozen.is_some() || new_row[0] == self.local) {
                return Reply::MigrateReady;
            }
            data.migration_target = Some(new_row.clone());
            data.migrating.clear();
            for (new_index, member) in new_row.iter().enumerate() {
                if *member == self.local {
                    continue;
                }
                let old_index = old_row.iter().position(|m| m == member);
                let names: Vec<String> = data.maps.keys().cloned().collect();
                for name in names {
                    let highest_index = self.settings.map(&name).replicas() - 1;
                    let needs_copy = new_index <= highest_index && old_index.is_none_or(|i| i > highest_index);
                    if !needs_copy {
                        continue;
                    }
                    let mp = &data.maps[&name];
                    let position = (mp.term, mp.seq);
                    self.send_full_copy(member, p, &name, mp, table.epoch);
                    let msg = Node::encode(&Msg::VersionCheck {
                        epoch: table.epoch,
                        versions: vec![(p, name.clone(), position.0, position.1)],
                    });
                    checks.push((
                        member.clone(),
                        self.net.request(member, MAP_SERVICE, msg, self.settings.migration_timeout),
                    ));
                    data.synced.insert((member.clone(), name), position);
                }
                data.migrating.push((member.clone(), new_index));
            }
        }
        // Wait for the copies before freezing, so writes pause only for the short final step.
        for (member, check) in checks {
            let ok = match check.await {
                Ok(bytes) => {
                    matches!(codec::decode::<Reply>(&bytes), Ok(Reply::Mismatch { partitions }) if partitions.is_empty())
                }
                Err(_) => false,
            };
            if !ok {
                self.abort_migration(p, &new_row);
                return Reply::Failed { error: format!("copying partition {p} to {member} failed") };
            }
        }
        if new_row[0] != self.local {
            {
                let mut data = self.slot(p).data.lock().unwrap();
                data.frozen = Some(Freeze { master: Some(master.clone()), since_ms: now_ms() });
            }
            if !self.wait_drained(p, self.settings.backup_ack_timeout * 2).await {
                self.abort_migration(p, &new_row);
                return Reply::Failed { error: format!("writes on partition {p} did not finish in time") };
            }
        }
        // Final barrier: every member of the new row confirms it processed every write of every map
        // it will hold. Asynchronous backups moving to a synchronous index (or to owner) may still
        // have writes in flight; the check travels behind them on the same connection.
        if let Err(error) = self.confirm_row(p, &new_row).await {
            self.abort_migration(p, &new_row);
            return Reply::Failed { error: format!("partition {p}: {error}") };
        }
        debug!(partition = p, to = ?new_row, took = ?started.elapsed(), "partition ready to move");
        Reply::MigrateReady
    }

    /// Each member of `row` (but this one) confirms it holds every map it replicates at this
    /// member's current position; one that does not gets a full copy.
    pub(crate) async fn confirm_row(self: &Arc<Self>, p: u32, row: &[MemberId]) -> Result<(), String> {
        let mut checks = Vec::new();
        {
            let epoch = self.table().epoch;
            let data = self.slot(p).data.lock().unwrap();
            for (index, member) in row.iter().enumerate() {
                if *member == self.local {
                    continue;
                }
                for (name, mp) in &data.maps {
                    if index > self.settings.map(name).replicas() - 1 {
                        continue;
                    }
                    let msg =
                        Node::encode(&Msg::VersionCheck { epoch, versions: vec![(p, name.clone(), mp.term, mp.seq)] });
                    let check = self.net.request(member, MAP_SERVICE, msg, self.settings.migration_timeout);
                    checks.push((member.clone(), name.clone(), mp.term, mp.seq, check));
                }
            }
        }
        for (member, map, term, seq, check) in checks {
            let bytes = check.await.map_err(|e| format!("{member} did not confirm: {e}"))?;
            match codec::decode::<Reply>(&bytes) {
                Ok(Reply::Mismatch { partitions }) if partitions.is_empty() => {}
                Ok(Reply::Mismatch { .. }) => self.ensure_synced(&member, p, &map, term, seq).await?,
                other => return Err(format!("{member} answered {other:?}")),
            }
        }
        Ok(())
    }

    async fn wait_drained(&self, p: u32, timeout: Duration) -> bool {
        let slot = self.slot(p);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = slot.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if slot.data.lock().unwrap().inflight == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return slot.data.lock().unwrap().inflight == 0;
            }
        }
    }

    fn abort_migration(&self, p: u32, new_row: &[MemberId]) {
        let mut data = self.slot(p).data.lock().unwrap();
        if data.migration_target.as_deref() == Some(new_row) {
            data.frozen = None;
            data.migrating.clear();
            data.migration_target = None;
        }
    }

    /// The master will not commit the migration to `new_row`.
    pub(crate) fn on_migrate_abort(&self, p: u32, new_row: &[MemberId]) {
        if p < self.settings.partition_count {
            self.abort_migration(p, new_row);
            info!(partition = p, "migration aborted by the master");
        }
    }
}
