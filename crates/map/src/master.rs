//! The master's partition work: recover the newest table when this member becomes master, promote
//! backups at once when members die, and migrate partitions toward the balanced plan: a few at a
//! time, each committed as soon as its owner reports the new replicas ready.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::{ClusterView, MemberId};
use grapevine_net::codec;
use tracing::{debug, error, info, warn};

use crate::assign::{REPLICAS_MAX, plan, promote};
use crate::messages::{Msg, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::sides;
use crate::table::PartitionTable;

/// Master-side bookkeeping; reset whenever this member stops being master.
#[derive(Debug, Default)]
pub(crate) struct MasterState {
    /// True once this member, as master, has collected the newest table and republished it.
    recovered: bool,
    /// Migrations under way: partition → (row it started from, row it leads to, start time, ready).
    inflight: HashMap<u32, Migration>,
    /// Partitions whose last migration failed, not retried before the instant.
    backoff: HashMap<u32, Instant>,
    /// Tables of other publishers found to be of this master's lineage by [`Node::merge_sides`]:
    /// (publisher, epoch) → when (re-examined after a second, as liveness may have changed).
    examined: HashMap<(String, u64), Instant>,
    /// Tables of another side this master kept its own table over, already logged.
    kept_over: HashSet<(String, u64)>,
}

/// What [`Node::merge_sides`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// No table from another side.
    None,
    /// This master adopted another side's table.
    Adopted,
    /// Members still follow another side's table, which lost.
    Pending,
}

#[derive(Debug, Clone)]
struct Migration {
    old_row: Vec<MemberId>,
    new_row: Vec<MemberId>,
    started: Instant,
    ready: bool,
}

impl MasterState {
    /// Migrations not yet committed.
    pub(crate) fn migrating(&self) -> usize {
        self.inflight.len()
    }
}

/// Drives the master's work while this member is master.
pub(crate) async fn master_loop(node: Arc<Node>) {
    let mut views = node.membership.watch();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = node.master_wakeup.notified() => {},
            _ = tick.tick() => {},
            _ = node.cancel.cancelled() => return,
        }
        let view = views.borrow_and_update().clone();
        if !view.is_master() {
            let mut state = node.master.lock().unwrap();
            if state.recovered {
                info!("no longer master: partition-table duties stop here");
            }
            *state = MasterState::default();
            continue;
        }
        let recovered = node.master.lock().unwrap().recovered;
        if !recovered {
            node.recover_as_master(&view).await;
        }
        node.master_step(&view).await;
    }
}

impl Node {
    /// This member just became master: adopt the newest table any member holds (the previous
    /// master may have committed one that not everyone received), then republish it under a new
    /// epoch so every member follows this master.
    async fn recover_as_master(self: &Arc<Self>, view: &ClusterView) {
        let mut epochs = self.gossip_epochs();
        epochs.sort_by_key(|(_, e)| std::cmp::Reverse(*e));
        for (member, epoch) in &epochs {
            if *epoch > self.table().epoch {
                // Adopt a newer table only from this member's own lineage: one that includes this
                // member, or whose publisher is gone (the previous master died before every member
                // received its last commit). A newer table published by a live member that left
                // this member out comes from the other side of a healed network partition: its
                // rows would make this side drop its data, so it is outbid instead (below).
                let local = self.local.clone();
                self.fetch_table_if(member, |table| {
                    table.holds_any(&local) || table.master.as_ref().is_none_or(|m| view.member(m).is_none())
                })
                .await;
            }
        }
        let table = self.table();
        let active: Vec<MemberId> = view.active_members().map(|m| m.id.clone()).collect();
        if table.epoch == 0 {
            if active.is_empty() {
                return;
            }
            // The first table: nobody holds data yet, so no migration is needed.
            let replicas = active.len().min(REPLICAS_MAX);
            let rows = plan(&table.rows, &active, replicas);
            info!(members = active.len(), partitions = rows.len(), "creating the first partition table");
            self.commit(rows);
        } else {
            info!(epoch = table.epoch, "taking over the partition table as master");
            self.commit(table.rows.clone());
        }
        self.master.lock().unwrap().recovered = true;
    }

    /// Publishes `rows` as the next table: applies it here and pushes it to every member.
    pub(crate) fn commit(self: &Arc<Self>, rows: Vec<Vec<MemberId>>) {
        let current = self.table();
        let newest_seen = self.gossip_epochs().into_iter().map(|(_, e)| e).max().unwrap_or(0);
        let table =
            PartitionTable { epoch: current.epoch.max(newest_seen) + 1, master: Some(self.local.clone()), rows };
        table.assert_valid();
        let epoch = table.epoch;
        let msg = Node::encode(&Msg::TablePush { table: table.clone() });
        assert!(self.apply_table(table), "a freshly committed table is always newer");
        for member in self.view_members() {
            if member == self.local {
                continue;
            }
            let node = self.clone();
            let ack = self.net.request(&member, MAP_SERVICE, msg.clone(), Duration::from_secs(5));
            self.tasks.spawn(async move {
                match ack.await.map(|b| codec::decode::<Reply>(&b)) {
                    Ok(Ok(Reply::TableAck { epoch: theirs })) if theirs > epoch => {
                        // Someone holds a newer table than this master: recover again.
                        warn!(%member, theirs, ours = epoch, "a member has a newer partition table; re-synchronising");
                        node.master.lock().unwrap().recovered = false;
                        node.master_wakeup.notify_one();
                    }
                    Ok(_) => {}
                    Err(error) => debug!(%member, %error, "table push not acknowledged; it will fetch the table"),
                }
            });
        }
        debug!(epoch, "partition table committed");
    }

    /// One round of the master's work.
    async fn master_step(self: &Arc<Self>, view: &ClusterView) {
        let table = self.table();
        let live: BTreeSet<MemberId> = view.members.iter().map(|m| m.id.clone()).collect();
        let active: Vec<MemberId> = view.active_members().map(|m| m.id.clone()).collect();
        if table.epoch == 0 {
            if !active.is_empty() {
                self.master.lock().unwrap().recovered = false;
                self.master_wakeup.notify_one();
            }
            return;
        }

        // 1. Members gone: promote their backups at once, before any data moves.
        if table.rows.iter().any(|row| row.iter().any(|m| !live.contains(m))) {
            let rows = promote(&table.rows, &live);
            let lost: Vec<usize> = rows
                .iter()
                .enumerate()
                .filter(|(p, row)| row.is_empty() && !table.rows[*p].is_empty())
                .map(|(p, _)| p)
                .collect();
            if !lost.is_empty() {
                error!(
                    partitions = ?lost,
                    "every replica of {} partition(s) is gone: their entries are lost (raise backup_count to survive \
                     losing more members at once)",
                    lost.len()
                );
            }
            let dropped: Vec<(u32, Migration)> = {
                let mut state = self.master.lock().unwrap();
                let dropped = state
                    .inflight
                    .iter()
                    .filter(|(_, m)| !m.old_row.iter().chain(&m.new_row).all(|x| live.contains(x)))
                    .map(|(p, m)| (*p, m.clone()))
                    .collect::<Vec<_>>();
                for (p, _) in &dropped {
                    state.inflight.remove(p);
                }
                dropped
            };
            info!(epoch = table.epoch + 1, "promoting backups of departed members");
            self.commit(rows);
            for (p, migration) in dropped {
                self.abort_remote(p, &migration);
            }
        }

        // The other side of a healed network partition: the larger side keeps its data.
        let merge = self.merge_sides(view).await;
        if merge == Merge::Adopted {
            return;
        }

        // A member advertising a table of this epoch or newer that this master did not publish
        // followed another master meanwhile (two members acting as master at once while starting
        // together, or the other side of a healed partition): republish so everyone converges.
        let table = self.table();
        let local = self.local.to_string();
        if let Some(rival) = self.gossip_tables().into_iter().find(|t| t.epoch >= table.epoch && t.publisher != local) {
            info!(member = %rival.member, epoch = rival.epoch, publisher = %rival.publisher, "a member follows another table; republishing");
            self.commit(table.rows.clone());
        }

        // 2. Commit migrations whose replicas are ready, if their partition did not change since.
        let table = self.table();
        let mut rows = table.rows.clone();
        let mut aborted = Vec::new();
        let mut committed = 0usize;
        {
            let mut state = self.master.lock().unwrap();
            let timeout = self.settings.migration_timeout;
            state.inflight.retain(|p, m| {
                let p = *p;
                if m.ready {
                    if rows[p as usize] == m.old_row {
                        rows[p as usize] = m.new_row.clone();
                        committed += 1;
                    } else {
                        aborted.push((p, m.clone()));
                    }
                    false
                } else if m.started.elapsed() > timeout {
                    aborted.push((p, m.clone()));
                    false
                } else {
                    true
                }
            });
            for (p, _) in &aborted {
                state.backoff.insert(*p, Instant::now() + Duration::from_secs(1));
            }
        }
        for (p, migration) in aborted {
            warn!(partition = p, "migration aborted (timed out, or the partition changed meanwhile)");
            self.abort_remote(p, &migration);
        }
        if committed > 0 {
            debug!(committed, "committing finished migrations");
            self.commit(rows);
        }

        // 3. Start migrations toward the balanced plan.
        if active.is_empty() || merge == Merge::Pending {
            return;
        }
        let table = self.table();
        let target = self.target_rows(&table, &active);
        let mut orphans = Vec::new();
        let now = Instant::now();
        let mut to_start = Vec::new();
        {
            let mut state = self.master.lock().unwrap();
            state.backoff.retain(|_, until| *until > now);
            for (p, (current, wanted)) in table.rows.iter().zip(target.iter()).enumerate() {
                let p = p as u32;
                if current == wanted || state.inflight.contains_key(&p) || state.backoff.contains_key(&p) {
                    continue;
                }
                if current.is_empty() {
                    orphans.push((p, wanted.clone()));
                    continue;
                }
                if state.inflight.len() >= self.settings.migration_parallelism {
                    break;
                }
                let migration =
                    Migration { old_row: current.clone(), new_row: wanted.clone(), started: now, ready: false };
                state.inflight.insert(p, migration.clone());
                to_start.push((p, migration));
            }
        }
        if !orphans.is_empty() {
            // Rows with no replica left hold no data: assign them directly.
            let mut rows = table.rows.clone();
            for (p, row) in orphans {
                rows[p as usize] = row;
            }
            self.commit(rows);
        }
        for (p, migration) in to_start {
            self.start_migration(p, migration);
        }
    }

    /// Looks for tables published by another side (see [`crate::sides`]) and keeps the data of
    /// the larger side. Returns `Adopted` when it adopted another side's table, `Pending` while a
    /// member still follows another side's table that lost (it will apply this master's table;
    /// no migration starts meanwhile, as it could copy this side's data over the other's).
    async fn merge_sides(self: &Arc<Self>, view: &ClusterView) -> Merge {
        let local = self.local.to_string();
        let mut candidates: Vec<(MemberId, (String, u64))> = Vec::new();
        {
            let mut state = self.master.lock().unwrap();
            state.examined.retain(|_, at| at.elapsed() < Duration::from_secs(1));
            for advertised in self.gossip_tables() {
                let key = (advertised.publisher.clone(), advertised.epoch);
                if advertised.publisher != local
                    && !state.examined.contains_key(&key)
                    && !candidates.iter().any(|(_, k)| *k == key)
                {
                    candidates.push((advertised.member, key));
                }
            }
        }
        let mut pending = false;
        for (member, key) in candidates {
            let Some(theirs) = self.request_table(&member).await else { continue };
            let ours = self.table();
            let live = |m: &MemberId| view.member(m).is_some();
            if !sides::from_two_sides(&ours, &theirs, &live) {
                // One lineage: not looked at again for a while.
                self.master.lock().unwrap().examined.insert(key, Instant::now());
                continue;
            }
            let our_side = sides::live_members(&ours, &live);
            let their_side = sides::live_members(&theirs, &live);
            if sides::challenger_wins(&ours, &theirs, &live) {
                warn!(
                    this_side = ?our_side,
                    other_side = ?their_side,
                    publisher = ?theirs.master,
                    "members that acted as master apart meet again (a healed network partition) and the other \
                     side is larger: adopting its partition table; entries written on this side meanwhile are \
                     discarded"
                );
                self.abort_all_migrations();
                self.commit(theirs.rows);
                return Merge::Adopted;
            }
            if self.master.lock().unwrap().kept_over.insert(key) {
                warn!(
                    this_side = ?our_side,
                    other_side = ?their_side,
                    publisher = ?theirs.master,
                    "members that acted as master apart meet again (a healed network partition) and this side is \
                     at least as large: keeping its partition table; entries written on the other side meanwhile \
                     are discarded"
                );
            }
            pending = true;
        }
        if pending { Merge::Pending } else { Merge::None }
    }

    /// Forgets every migration under way and tells their owners.
    fn abort_all_migrations(&self) {
        let inflight: Vec<(u32, Migration)> = self.master.lock().unwrap().inflight.drain().collect();
        for (p, migration) in inflight {
            self.abort_remote(p, &migration);
        }
    }

    /// Tells a migration's owner (if it is still here) that the master will not commit it.
    fn abort_remote(&self, p: u32, migration: &Migration) {
        let Some(owner) = migration.old_row.first() else { return };
        if *owner == self.local {
            self.on_migrate_abort(p, &migration.new_row);
        } else {
            let msg = Node::encode(&Msg::MigrateAbort { partition: p, new_row: migration.new_row.clone() });
            if let Err(error) = self.net.send(owner, MAP_SERVICE, msg) {
                debug!(partition = p, %owner, %error, "abort not sent; the owner unfreezes on its own");
            }
        }
    }

    fn start_migration(self: &Arc<Self>, p: u32, migration: Migration) {
        let node = self.clone();
        self.tasks.spawn(async move {
            let owner = migration.old_row[0].clone();
            let outcome = if owner == node.local {
                node.migrate_out(&node.local.clone(), p, migration.old_row.clone(), migration.new_row.clone()).await
            } else {
                let msg = Node::encode(&Msg::MigrateStart {
                    old_row: migration.old_row.clone(),
                    partition: p,
                    new_row: migration.new_row.clone(),
                });
                match node.net.request(&owner, MAP_SERVICE, msg, node.settings.migration_timeout).await {
                    Ok(bytes) => codec::decode::<Reply>(&bytes)
                        .unwrap_or_else(|e| Reply::Failed { error: format!("undecodable reply: {e}") }),
                    Err(e) => Reply::Failed { error: e.to_string() },
                }
            };
            let mut state = node.master.lock().unwrap();
            match outcome {
                Reply::MigrateReady => {
                    if let Some(m) = state.inflight.get_mut(&p).filter(|m| m.new_row == migration.new_row) {
                        m.ready = true;
                    }
                }
                other => {
                    debug!(partition = p, %owner, reply = ?other, "migration failed; will retry");
                    if state.inflight.get(&p).is_some_and(|m| m.new_row == migration.new_row) {
                        state.inflight.remove(&p);
                        state.backoff.insert(p, Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            drop(state);
            node.master_wakeup.notify_one();
        });
    }
}
