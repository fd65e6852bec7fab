//! The owner's side of a partition: executing operations and replicating writes to backups in
//! sequence, in the owner's term.

use std::sync::Arc;
use std::time::Instant;

use grapevine_membership::MemberId;
use grapevine_net::{ResponseFuture, codec};
use tracing::{debug, warn};

use crate::config::MapConfig;
use crate::messages::{EntryEventKind, Msg, MultiOp, Op, OpResult, RawEntryEvent, Reply};
use crate::node::{MAP_SERVICE, Node, PartitionData};
use crate::record::now_ms;
use crate::stats::MapCounters;
use crate::store::Change;
use crate::table::{PartitionTable, Term};

/// What a replicated write adds to its key and value at most: record metadata, message fields (the
/// term names a member, whose node id may take up to 1 KiB), framing.
pub(crate) const ENTRY_OVERHEAD_BYTES: usize = 2048;

/// Taken off when a write acknowledged without a departed backup began (millisecond clock readings).
const ACKED_ALONE_SLACK_MS: u64 = 2;

/// An operation executed by the owner: answered at once, or waiting for backup acknowledgements.
pub(crate) enum Executed {
    Now(Reply),
    Pending(PendingWrite),
}

/// What [`Node::owner_execute_taking`] did about its caller's latency.
pub(crate) enum Latency {
    /// The operation did not run (refused): nothing.
    NotRun,
    /// Answered at once: recorded.
    Recorded,
    /// Waiting for backups: the caller records it in these counters once answered.
    Counters(Arc<MapCounters>),
}

/// A write applied by the owner whose synchronous backups have not all answered.
pub(crate) struct PendingWrite {
    partition: u32,
    map: String,
    term: Term,
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

/// The members that get a change of `map` in partition `p`: the synchronous backups (plus copy
/// targets whose copy is installed, so that they hold every acknowledged write when the master
/// commits them), and the asynchronous ones (plus copy targets still receiving their copy).
fn replica_targets(
    table: &PartitionTable,
    p: u32,
    config: &MapConfig,
    map: &str,
    copy_targets: &[(MemberId, String, bool)],
) -> (Vec<MemberId>, Vec<MemberId>) {
    let row = table.row(p);
    let sync_end = config.durable_replicas().min(row.len());
    let async_end = config.replicas().min(row.len());
    let mut sync: Vec<MemberId> = row.get(1..sync_end).unwrap_or_default().to_vec();
    let mut asynchronous: Vec<MemberId> = row.get(sync_end..async_end).unwrap_or_default().to_vec();
    for (member, name, synced) in copy_targets {
        if name != map || sync.contains(member) {
            continue;
        }
        if *synced {
            asynchronous.retain(|m| m != member);
            sync.push(member.clone());
        } else if !asynchronous.contains(member) {
            asynchronous.push(member.clone());
        }
    }
    (sync, asynchronous)
}

fn event_of(map: &str, change: &Change) -> RawEntryEvent {
    RawEntryEvent {
        map: map.to_string(),
        kind: change.kind,
        key: change.key().to_vec(),
        value: change.value().map(<[u8]>::to_vec),
        old_value: change.old_value.clone(),
    }
}

impl Node {
    /// Executes `op` on partition `p` as its owner.
    pub(crate) fn owner_execute(self: &Arc<Self>, p: u32, map: &str, op: Op, caller_epoch: u64) -> Executed {
        let mut op = Some(op);
        self.owner_execute_taking(p, map, &mut op, caller_epoch, None).0
    }

    /// Executes the operation in `op` on partition `p` as its owner, taking it out of `op` only
    /// once it runs: when this member refuses it first (wrong owner, retry), `op` keeps it, so a
    /// caller on this member can send it elsewhere without having copied it. For a caller on this
    /// member (`caller_started`: when its call started), records the call's latency when the
    /// operation is answered at once, and returns the map's counters for it when the answer waits
    /// for backups.
    pub(crate) fn owner_execute_taking(
        self: &Arc<Self>,
        p: u32,
        map: &str,
        op: &mut Option<Op>,
        caller_epoch: u64,
        caller_started: Option<Instant>,
    ) -> (Executed, Latency) {
        let now_reply = |reply| (Executed::Now(reply), Latency::NotRun);
        let Some(payload_bytes) = op.as_ref().map(Op::payload_bytes) else {
            return now_reply(Reply::Failed { error: "the operation was already executed".into() });
        };
        // Read from this thread's copy of the table (see `Node::with_table`).
        self.with_table(|table| {
            let refuse = |reply| (Executed::Now(reply), Latency::NotRun);
            if let Some(reply) = self.check_owner(table, p, caller_epoch) {
                return refuse(reply);
            }
            let config = self.settings.map_ref(map);
            if let Some(reply) = self.protection_retry_with(map, config) {
                return refuse(reply);
            }
            // An entry must fit in one message to reach its backups: refuse it before applying it here.
            let entry_bytes = payload_bytes + map.len() + ENTRY_OVERHEAD_BYTES;
            if entry_bytes > self.net.frame_bytes_max() {
                return refuse(Reply::Failed {
                    error: format!(
                        "the entry takes {entry_bytes} bytes, more than net.frame_bytes_max = {} allows between members; \
                         store a smaller value or raise net.frame_bytes_max on every member",
                        self.net.frame_bytes_max()
                    ),
                });
            }
            let now = now_ms();
            let slot = self.slot(p);
            let mut data = slot.data.lock().unwrap();
            if let Some(reply) = refusal_while(&data, p).or_else(|| changing(&data, table, p)) {
                return refuse(reply);
            }
            let Some(op) = op.take() else {
                return refuse(Reply::Failed { error: "the operation was already executed".into() });
            };
            let op_name = op.name();
            let merging = match &op {
                Op::Merge { key, record, .. } => Some((key.clone(), record.updated_ms)),
                _ => None,
            };
            let idle_floor = data.owner_since_ms;
            // Looked up by reference first: no copy of the map's name (nor of the term, which
            // names a member) for every operation.
            if !data.maps.contains_key(map) {
                let term = data.term.clone();
                data.maps.insert(map.to_string(), crate::store::MapPartition::new(term));
            }
            let mp = data.maps.get_mut(map).expect("the map partition was just inserted");
            let (result, change) = mp.execute(op, now, idle_floor, config);
            let counters = mp.counters.get_or_insert_with(|| self.counters(map));
            counters.count_owner_op(op_name, &result);
            let Some(change) = change else {
                if let Some(started) = caller_started {
                    counters.record_latency(op_name, started.elapsed());
                }
                return (Executed::Now(Reply::Done(result)), Latency::Recorded);
            };
            if let (Some((key, updated)), OpResult::Flag(true)) = (merging, &result) {
                // A merged entry keeps its update time, older than this side's fork: if this side
                // loses a split before the cluster settles (a merge into a group that split off
                // again), its next merge must still take the entry along.
                data.note_merged_key(now, updated, map, key);
            }
            let (seq, acks) = self.replicate_locked(table, p, map, config, &mut data, change);
            // Counted while a write waits for its backups; one without any is complete once the
            // lock is released.
            let pending = !acks.is_empty();
            let guard = pending.then(|| InflightGuard::new(self, p, &mut data));
            let term = (pending || matches!(result, OpResult::RingStored { .. })).then(|| data.term.clone());
            let counters = data.maps.get(map).and_then(|mp| mp.counters.as_ref());
            if let Some(counters) = counters {
                counters.note_sync_backups(map, config.backup_count, acks.len());
            }
            let latency = match (counters, caller_started) {
                (Some(counters), Some(started)) if acks.is_empty() => {
                    counters.record_latency(op_name, started.elapsed());
                    Latency::Recorded
                }
                (Some(counters), _) if !acks.is_empty() => Latency::Counters(counters.clone()),
                _ => Latency::NotRun,
            };
            drop(data);
            match (guard, term) {
                (Some(guard), Some(term)) => {
                    let map = map.to_string();
                    let pending = PendingWrite { partition: p, map, term, seq, result, acks, _inflight: guard };
                    (Executed::Pending(pending), latency)
                }
                (_, term) => {
                    if let Some(term) = &term {
                        self.on_write_confirmed(p, map, term, &result);
                    }
                    (Executed::Now(Reply::Done(result)), latency)
                }
            }
        })
    }

    /// `None` when this member may serve `p` under `table`; otherwise the reply telling the caller
    /// why not.
    fn check_owner(self: &Arc<Self>, table: &PartitionTable, p: u32, caller_epoch: u64) -> Option<Reply> {
        if table.epoch == 0 {
            return Some(Reply::Retry { reason: "this member has no partition table yet".into() });
        }
        if caller_epoch > table.epoch {
            // The caller knows a newer table: catch up.
            self.want_master_table();
        }
        if let Err(reason) = self.table_followed(table) {
            // Members that acted as master apart (starting together, or a healed split): a write
            // accepted under this table could be dropped when the master's arrives.
            self.want_master_table();
            return Some(Reply::Retry { reason });
        }
        if let Some(reason) = self.undecided_fork(table) {
            self.want_master_table();
            self.master_wakeup.notify_one();
            return Some(Reply::Retry { reason });
        }
        if table.owner(p) != Some(&self.local) {
            return Some(Reply::WrongOwner { epoch: table.epoch });
        }
        None
    }

    /// Stamps a change with the partition's next sequence number and sends it to the backups:
    /// asynchronous ones without waiting, synchronous ones as requests whose answers the caller
    /// awaits; then publishes its entry event. Runs under the partition lock, which is what keeps
    /// backups' input, and listeners' events, in write order. The backup message is encoded only
    /// when there is a backup to send it to, and the event only built when some member listens.
    pub(crate) fn replicate_locked(
        self: &Arc<Self>,
        table: &PartitionTable,
        p: u32,
        map: &str,
        config: &MapConfig,
        data: &mut PartitionData,
        change: Change,
    ) -> (u64, Vec<(MemberId, ResponseFuture)>) {
        self.replicate_locked_with(table, p, map, config, data, change, |change| vec![event_of(map, change)])
    }

    /// [`Node::replicate_locked`] with the events of `change` given by `events` (called only when
    /// some member listens to `map`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn replicate_locked_with(
        self: &Arc<Self>,
        table: &PartitionTable,
        p: u32,
        map: &str,
        config: &MapConfig,
        data: &mut PartitionData,
        change: Change,
        events: impl FnOnce(&Change) -> Vec<RawEntryEvent>,
    ) -> (u64, Vec<(MemberId, ResponseFuture)>) {
        let (sync, asynchronous) = replica_targets(table, p, config, map, &data.copy_targets);
        let mp = data.maps.get_mut(map).expect("the map partition was just written");
        mp.seq += 1;
        let seq = mp.seq;
        self.invalidation.on_change(map, p, &mp.term, seq, &change.repl);
        let events = if self.listeners.any(map) { events(&change) } else { Vec::new() };
        let mut acks = Vec::with_capacity(sync.len());
        if !sync.is_empty() || !asynchronous.is_empty() {
            let msg = Node::encode(&Msg::Backup {
                partition: p,
                term: mp.term.clone(),
                map: map.to_string(),
                seq,
                op: change.repl,
            });
            for member in &asynchronous {
                if let Err(error) = self.net.send(member, MAP_SERVICE, msg.clone()) {
                    debug!(partition = p, %member, %error, "asynchronous backup not sent; anti-entropy will repair it");
                }
            }
            for member in sync {
                let ack = self.net.request(&member, MAP_SERVICE, msg.clone(), self.settings.backup_ack_timeout);
                acks.push((member, ack));
            }
        }
        self.publish_events(map, events);
        (seq, acks)
    }

    /// Waits for the synchronous backups of a write. A backup that fell behind gets a full copy
    /// first; any other failure makes the write fail with an error that says it may persist.
    pub(crate) async fn finish_write(self: &Arc<Self>, pending: PendingWrite) -> Reply {
        let PendingWrite { partition, map, term, seq, result, acks, _inflight } = pending;
        let mut failures = Vec::new();
        let asked: Vec<MemberId> = acks.iter().map(|(member, _)| member.clone()).collect();
        let deadline = Instant::now() + self.settings.backup_ack_timeout;
        for (member, ack) in acks {
            let answer = ack.await.map_err(|e| e.to_string()).and_then(|bytes| {
                codec::decode::<Reply>(&bytes).map_err(|e| format!("undecodable acknowledgement: {e}"))
            });
            let outcome = match answer {
                Ok(Reply::Ack) => Ok(()),
                Ok(Reply::NeedSync { .. } | Reply::Staging | Reply::NotYet { .. }) => {
                    self.ensure_synced(&member, partition, &map, &term, seq, deadline).await
                }
                Ok(Reply::Fenced { table, .. }) => {
                    self.fence_partition(partition, &table, &member);
                    Err(format!("it holds partition table {table}, in which partition {partition} moved on"))
                }
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(error) => {
                    self.await_unreachable_backup(&member, &asked, partition, &map, &term, seq, deadline, error).await
                }
            };
            if let Err(error) = outcome {
                failures.push(format!("{member}: {error}"));
            }
        }
        if failures.is_empty() {
            self.on_write_confirmed(partition, &map, &term, &result);
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

    /// A synchronous backup could not be reached for a write (its process died, or the network
    /// broke): until `deadline`, wait for it to be back (then make sure it holds the write) or to
    /// leave the view (then confirm the write with its replacement), whichever comes first.
    #[allow(clippy::too_many_arguments)]
    async fn await_unreachable_backup(
        self: &Arc<Self>,
        member: &MemberId,
        asked: &[MemberId],
        p: u32,
        map: &str,
        term: &Term,
        seq: u64,
        deadline: Instant,
        first_error: String,
    ) -> Result<(), String> {
        const ATTEMPT: std::time::Duration = std::time::Duration::from_millis(500);
        let mut views = self.membership.watch();
        let mut last_error = first_error;
        loop {
            if !self.is_live(member) {
                return self.cover_departed_backup(member, asked, p, map, term, seq, deadline).await;
            }
            if Instant::now() >= deadline {
                return Err(last_error);
            }
            match self.ensure_synced(member, p, map, term, seq, deadline.min(Instant::now() + ATTEMPT)).await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = error,
            }
            let pause = deadline.saturating_duration_since(Instant::now()).min(std::time::Duration::from_millis(50));
            tokio::select! {
                _ = views.changed() => {},
                _ = tokio::time::sleep(pause) => {},
            }
        }
    }

    /// A synchronous backup of a write left the cluster (it is no longer in the view) before it
    /// confirmed the write: the master promotes it away. Waits, until `deadline`, for the table
    /// without it, then makes sure the synchronous backups that table gives the partition (other
    /// than those `asked` already) hold the write, so the write is acknowledged as durable only
    /// once it really is.
    #[allow(clippy::too_many_arguments)]
    async fn cover_departed_backup(
        self: &Arc<Self>,
        departed: &MemberId,
        asked: &[MemberId],
        p: u32,
        map: &str,
        term: &Term,
        seq: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        let mut tables = self.tables.tx.subscribe();
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
        if table.owner(p) != Some(&self.local) || table.term(p) != term {
            return Err(format!("it left the cluster and partition {p} moved to another owner meanwhile"));
        }
        let (sync, _) = replica_targets(&table, p, &self.settings.map(map), map, &[]);
        for member in sync.iter().filter(|m| !asked.contains(m)) {
            self.ensure_synced(member, p, map, term, seq, deadline)
                .await
                .map_err(|e| format!("it left the cluster, and its replacement {member} did not confirm: {e}"))?;
        }
        debug!(partition = p, %departed, "a departed synchronous backup was replaced; the write is on its replacement");
        // The write was stamped just before its deadline was set, one acknowledgement timeout
        // before it. To the millisecond: an earlier floor would also merge entries written before
        // the cut, which the other side has and may have changed since.
        let waited =
            self.settings.backup_ack_timeout.saturating_sub(deadline.saturating_duration_since(Instant::now()));
        let began = now_ms().saturating_sub(waited.as_millis() as u64 + 1 + ACKED_ALONE_SLACK_MS);
        self.slot(p).data.lock().unwrap().note_merge_floor(now_ms(), began);
        Ok(())
    }

    /// Counts or clears a map over the partitions of `partitions` that this member owns.
    pub(crate) async fn owner_multi(
        self: &Arc<Self>,
        map: &str,
        partitions: Vec<u32>,
        op: MultiOp,
        caller_epoch: u64,
    ) -> Reply {
        if let Some(reply) = self.protection_retry(map) {
            return reply;
        }
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
            if refusal_while(&data, p).or_else(|| changing(&data, &table, p)).is_some() {
                not_owner.push(p);
                continue;
            }
            match op {
                MultiOp::Count => {
                    let floor = data.owner_since_ms;
                    done.push((p, data.maps.get(map).map(|mp| mp.live_len(now, floor)).unwrap_or(0)));
                }
                MultiOp::Clear => {
                    let Some(mp) = data.maps.get_mut(map) else {
                        done.push((p, 0));
                        continue;
                    };
                    let cleared = mp.len() as u64;
                    if cleared == 0 {
                        done.push((p, 0));
                        continue;
                    }
                    // The events name every entry removed: collected before the clear, when someone listens.
                    let events: Vec<RawEntryEvent> = if self.listeners.any(map) {
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
                    mp.clear_at(now_ms());
                    let change = Change::new(crate::messages::ReplOp::Clear, EntryEventKind::Removed, None);
                    let term = mp.term.clone();
                    let (seq, acks) =
                        self.replicate_locked_with(&table, p, map, &config, &mut data, change, |_| events);
                    let guard = InflightGuard::new(self, p, &mut data);
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
        if let Some(reply) = self.check_owner(&table, p, caller_epoch).or_else(|| self.protection_retry(map)) {
            return reply;
        }
        let data = self.slot(p).data.lock().unwrap();
        if let Some(reply) = refusal_while(&data, p).or_else(|| changing(&data, &table, p)) {
            return reply;
        }
        let limit = limit.clamp(1, 10_000) as usize;
        let (entries, next) = match data.maps.get(map) {
            Some(mp) => mp.page(after.as_deref(), limit, now_ms(), data.owner_since_ms),
            None => (Vec::new(), None),
        };
        Reply::Page { entries, next }
    }
}

/// A retry when a table newer than `table` (the one ownership was checked against) is being
/// applied: the partition's state may already be the newer table's (see
/// [`PartitionData::applied`]).
fn changing(data: &PartitionData, table: &PartitionTable, p: u32) -> Option<Reply> {
    (!table.has_id(&data.applied))
        .then(|| Reply::Retry { reason: format!("partition {p}: a new partition table is being applied") })
}

/// Why the owner of `p` cannot serve an operation right now, if it cannot: the partition is being
/// handed over (reads are refused too: once the master commits the hand-over, the new owner takes
/// writes while this member may not have heard yet, and must not answer with older data), a
/// replica holds a newer table for it (reads too), or a new owner is still starting its term
/// (reads too: it may still catch up from a replica that is further along).
fn refusal_while(data: &PartitionData, p: u32) -> Option<Reply> {
    if let Some(freeze) = &data.frozen {
        return Some(Reply::Retry {
            reason: format!("partition {p} is being handed over to another member (migration {})", freeze.migration),
        });
    }
    if let Some((newer, _)) = &data.fenced {
        return Some(Reply::Retry {
            reason: format!("partition {p} moved on in partition table {newer}, which this member is fetching"),
        });
    }
    if data.starting {
        return Some(Reply::Retry { reason: format!("partition {p} has a new owner that is starting its term") });
    }
    None
}
