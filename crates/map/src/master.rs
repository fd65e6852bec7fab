//! The master's partition work: when this member becomes master, collect every member's table and
//! adopt the newest history ([`crate::lineage`]); promote backups at once when members die, and say
//! so when a partition lost every replica of a map; and migrate partitions toward the balanced
//! plan, a few at a time, each attempt with an id, each committed as soon as its owner reports
//! the new replicas ready.
//!
//! The master only ever publishes a table derived from the one it holds, and it holds a table only
//! once the lineage rule chose it over every table other members advertise. So it never hands a
//! partition back to an owner whose term was superseded: a master that was cut off one way leads
//! again after the heal (it is the oldest member), but adopts the history the others made without
//! it before it publishes anything.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::{ClusterView, MemberId};
use grapevine_net::codec;
use tracing::{debug, info, warn};

use crate::assign::{REPLICAS_MAX, Row, plan, promote};
use crate::lineage;
use crate::messages::{MigrationId, Msg, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::table::{PartitionTable, TableId};

/// How long the master waits for members' tables when it takes over.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Master-side bookkeeping; reset whenever this member stops being master.
#[derive(Debug, Default)]
pub(crate) struct MasterState {
    /// True once this member, as master, has collected the newest table and republished it.
    recovered: bool,
    /// Migrations under way, per partition.
    inflight: HashMap<u32, Migration>,
    /// Partitions whose last migration failed, not retried before the instant.
    backoff: HashMap<u32, Instant>,
    /// Losing sides already logged.
    logged_losers: HashSet<TableId>,
    /// Numbers migration attempts.
    next_attempt: u64,
}

#[derive(Debug, Clone)]
struct Migration {
    id: MigrationId,
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

/// The tables the master collected: what each member holds, and what each noted besides
/// ([`lineage::Noted`]).
#[derive(Debug, Default)]
struct Held {
    tables: Vec<(MemberId, PartitionTable)>,
    noted: std::collections::BTreeMap<MemberId, lineage::Noted>,
}

/// What [`Node::resolve_tables`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    /// Every member holds this master's table or an ancestor of it.
    Settled,
    /// This master published a table that settles the difference (adopting another side's table,
    /// or superseding tables that lost).
    Published,
    /// A member holds another table and did not answer: nothing is decided yet, and no migration
    /// starts meanwhile, as copying could overwrite that member's data before it has switched.
    Pending,
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
            debug!(view = view.version, members = view.members.len(), excluded = ?view.excluded, "recovering as master");
            node.recover_as_master(&view).await;
        }
        node.master_step(&view).await;
    }
}

impl Node {
    /// This member just became master: ask every member for its table and keep the winning side's
    /// (the previous master may have committed a table not everyone received, and members that
    /// acted as master apart come back with their own), then republish it under a new epoch so
    /// every member follows this master.
    async fn recover_as_master(self: &Arc<Self>, view: &ClusterView) {
        let (held, complete) = self.collect_tables(view).await;
        if !complete {
            // A member that may hold a side's table did not answer: deciding without it could keep
            // the smaller side's data. Try again shortly (it answers, or is excluded or dead).
            debug!("not every member answered with its partition table; recovering later");
            return;
        }
        let superseded = self.decide(&held);
        let table = self.table();
        let active: Vec<MemberId> = view.eligible_members().map(|m| m.id.clone()).collect();
        if table.epoch == 0 {
            if active.is_empty() {
                return;
            }
            // The first table: nobody holds data yet, so no migration is needed.
            let rows = plan(&table.rows, &active, active.len().min(REPLICAS_MAX));
            info!(members = active.len(), partitions = rows.len(), "creating the first partition table");
            self.commit_superseding(rows, &superseded);
        } else {
            info!(table = %table.id(), "taking over the partition table as master");
            self.commit_superseding(table.rows.clone(), &superseded);
        }
        self.master.lock().unwrap().recovered = true;
    }

    /// Asks every active member for the table it holds (this one included): excluded members
    /// too, as a member excluded for a moment (reports spread unevenly) still belongs to a side.
    /// Also returns whether the answers are complete: every member answered but excluded ones
    /// that cannot be reached.
    async fn collect_tables(self: &Arc<Self>, view: &ClusterView) -> (Held, bool) {
        let mut requests = tokio::task::JoinSet::new();
        for member in view.active_members().map(|m| m.id.clone()).filter(|m| *m != self.local) {
            let node = self.clone();
            requests.spawn(async move {
                let table = tokio::time::timeout(RECOVERY_TIMEOUT, node.request_table(&member)).await.ok().flatten();
                (member, table)
            });
        }
        let mut held = Held::default();
        // This master's own notes count like any member's: it may have refused a table of the
        // master before it (one that dropped a member it still heard), and then it is not on
        // that table's side (harness seed 240: a master flapping off, the member that took over
        // counted on the old master's side, whose table then won and dropped the new side's
        // writes).
        let own = (*self.table()).clone();
        held.noted.insert(self.local.clone(), self.noted(&own.id()));
        held.tables.push((self.local.clone(), own));
        // Members held outside the view by the merge timers belong to a side too: deciding without
        // them could pick the smaller side (part of the other group is already in the view).
        let outside = self.membership.outside_members();
        if !outside.is_empty() {
            debug!(?outside, "members of another group wait for the merge timers; deciding on tables once they are in");
        }
        let mut complete = outside.is_empty();
        while let Some(joined) = requests.join_next().await {
            match joined {
                Ok((member, Some((table, noted)))) => {
                    held.noted.insert(member.clone(), noted);
                    held.tables.push((member, table));
                }
                Ok((member, None)) if view.is_excluded(&member) => {}
                _ => complete = false,
            }
        }
        (held, complete)
    }

    /// Groups the members by the tables they hold into sides ([`lineage::sides_seen`]), adopts the
    /// winning side's table if it is not this master's, and returns the tables held that the
    /// result does not descend from: the next table must supersede them.
    fn decide(self: &Arc<Self>, held: &Held) -> Vec<PartitionTable> {
        let Held { tables: held, noted } = held;
        let refs: Vec<(MemberId, &PartitionTable)> = held.iter().map(|(m, t)| (m.clone(), t)).collect();
        let Some(found) = lineage::sides_seen(&refs, noted) else { return Vec::new() };
        debug!(
            held = ?held.iter().map(|(m, t)| format!("{m}@{}", t.id())).collect::<Vec<_>>(),
            sides = ?found.sides.iter().map(|(t, m)| format!("{t}: {m:?}")).collect::<Vec<_>>(),
            noted = ?noted.iter().filter(|(_, n)| **n != Default::default()).map(|(m, n)| format!("{m}: {n:?}")).collect::<Vec<_>>(),
            presumed = ?found.presumed,
            winner = %found.winner,
            "sides"
        );
        let current = self.table();
        if found.winner != current.id()
            && let Some((_, winner)) = held.iter().find(|(_, t)| t.id() == found.winner)
        {
            info!(ours = %current.id(), winner = %found.winner, members = ?found.sides[&found.winner], size = found.size(&found.winner), presumed = ?found.presumed.get(&found.winner), "adopting the partition table of the larger side");
            self.abort_all_migrations();
            self.apply_table(winner.clone());
        }
        let current = self.table();
        let mut logged = self.master.lock().unwrap();
        for (id, members) in &found.sides {
            if *id != found.winner && logged.logged_losers.insert(id.clone()) {
                warn!(
                    winner = %found.winner,
                    winning_side = ?found.sides[&found.winner],
                    losing = %id,
                    losing_side = ?members,
                    "members that acted as master apart meet again (a healed network split or one-way cut, or \
                     members started together): the larger side's partition table wins; the other side's members \
                     offer the entries they wrote meanwhile to its owners, which keep or take each one as the map's \
                     merge_policy says"
                );
            }
        }
        drop(logged);
        // Every other table held is decided against: their holders follow the next table, also
        // when it gives them nothing (the winner's side may have dropped them).
        let mut superseded: Vec<PartitionTable> = Vec::new();
        for (_, table) in held {
            if table.id() != current.id() && table.epoch > 0 && !superseded.iter().any(|t| t.id() == table.id()) {
                superseded.push(table.clone());
            }
        }
        superseded
    }

    /// Publishes `rows` as the next table, derived from the one held: applies it here and pushes
    /// it to every member.
    pub(crate) fn commit(self: &Arc<Self>, rows: Vec<Row>) {
        self.commit_superseding(rows, &[]);
    }

    /// Like [`Node::commit`], the new table also counting `superseded` as ancestors, so that the
    /// members holding them apply it.
    fn commit_superseding(self: &Arc<Self>, rows: Vec<Row>, superseded: &[PartitionTable]) {
        let current = self.table();
        let newest_seen = self.gossip_epochs().into_iter().map(|(_, e)| e).max().unwrap_or(0);
        let newest_held = superseded.iter().map(|t| t.epoch).max().unwrap_or(0);
        let epoch = current.epoch.max(newest_seen).max(newest_held) + 1;
        let refs: Vec<&PartitionTable> = superseded.iter().collect();
        let table = current.successor_superseding(&self.local, epoch, rows, &refs);
        let id = table.id();
        let msg = Node::encode(&Msg::TablePush { table: table.clone() });
        assert!(self.apply_table(table), "a freshly committed table is always valid and new");
        for member in self.view_members() {
            if member == self.local {
                continue;
            }
            let node = self.clone();
            let ack = self.net.request(&member, MAP_SERVICE, msg.clone(), Duration::from_secs(5));
            let id = id.clone();
            self.spawn(async move {
                match ack.await.map(|b| codec::decode::<Reply>(&b)) {
                    Ok(Ok(Reply::TableAck { table })) if table != id => {
                        // It keeps another table: examine it on the next round.
                        debug!(%member, theirs = %table, ours = %id, "a member kept another partition table");
                        node.master_wakeup.notify_one();
                    }
                    Ok(_) => {}
                    Err(error) => debug!(%member, %error, "table push not acknowledged; it will fetch the table"),
                }
            });
        }
        debug!(table = %id, "partition table committed");
    }

    /// One round of the master's work.
    async fn master_step(self: &Arc<Self>, view: &ClusterView) {
        let table = self.table();
        // Members that may keep replicas: every member in the view (joining and leaving ones
        // too: a leaving member hands its data over first) but those excluded because others
        // cannot reach them over the data plane.
        let live: BTreeSet<MemberId> =
            view.members.iter().map(|m| m.id.clone()).filter(|m| !view.is_excluded(m)).collect();
        let active: Vec<MemberId> = view.eligible_members().map(|m| m.id.clone()).collect();
        if table.epoch == 0 {
            if !active.is_empty() {
                self.master.lock().unwrap().recovered = false;
                self.master_wakeup.notify_one();
            }
            return;
        }

        // 1. Members gone: promote their backups at once, before any data moves.
        if table.rows.iter().any(|row| row.iter().any(|m| !live.contains(m))) {
            self.promote_departed(&table, &live);
        }

        // 2. Tables other members hold that are not ancestors of ours: decide which side wins.
        let resolved = self.resolve_tables(view).await;
        if resolved == Resolved::Published {
            return;
        }
        // A member advertising a newer epoch than ours (one that lost to ours, or members that
        // acted as master at the same moment): republish, so ours is the newest epoch everyone sees.
        let table = self.table();
        if self.gossip_tables().iter().any(|t| t.table.epoch > table.epoch) {
            debug!(table = %table.id(), "a member advertises a newer epoch; republishing");
            self.commit(table.rows.clone());
        }

        // 3. Commit migrations whose replicas are ready, if their partition did not change since.
        self.commit_ready_migrations();

        // 4. Start migrations toward the balanced plan.
        if active.is_empty() || resolved == Resolved::Pending {
            return;
        }
        self.start_migrations(&active);
    }

    /// Removes departed members from every row (their first surviving replica takes over), reports
    /// partitions that lost every replica of some map, and drops migrations that involved them.
    fn promote_departed(self: &Arc<Self>, table: &PartitionTable, live: &BTreeSet<MemberId>) {
        let rows = promote(&table.rows, live);
        let least_durable = self
            .settings
            .maps
            .values()
            .map(|c| c.durable_replicas())
            .chain(std::iter::once(self.settings.map("default").durable_replicas()))
            .min()
            .unwrap_or(1);
        let mut losses = Vec::new();
        for (p, row) in table.rows.iter().enumerate() {
            let lost = row.iter().take_while(|m| !live.contains(*m)).count();
            if lost >= least_durable {
                losses.push((p as u32, lost.min(usize::from(u8::MAX)) as u8));
            }
        }
        let dropped: Vec<(u32, Migration)> = {
            let mut state = self.master.lock().unwrap();
            let dropped: Vec<(u32, Migration)> = state
                .inflight
                .iter()
                .filter(|(_, m)| !m.old_row.iter().chain(&m.new_row).all(|x| live.contains(x)))
                .map(|(p, m)| (*p, m.clone()))
                .collect();
            for (p, _) in &dropped {
                state.inflight.remove(p);
            }
            dropped
        };
        info!(table = %table.id(), "promoting backups of departed members");
        self.commit(rows);
        let id = self.table().id();
        for (p, lost_replicas) in losses {
            self.on_partition_lost(p, lost_replicas, true);
            let msg = Node::encode(&Msg::PartitionLost { table: id.clone(), partition: p, lost_replicas });
            for member in self.view_members().into_iter().filter(|m| *m != self.local) {
                let _ = self.net.send(&member, MAP_SERVICE, msg.clone());
            }
        }
        for (p, migration) in dropped {
            self.abort_remote(p, &migration);
        }
    }

    /// When some active member advertises a table that is neither this master's nor one of its
    /// ancestors, asks every active member for its table and settles the difference
    /// ([`Node::decide`]). Decides only when every one of them answered.
    async fn resolve_tables(self: &Arc<Self>, view: &ClusterView) -> Resolved {
        let ours = self.table();
        // A member whose table is an ancestor of ours is behind, unless ours took its replicas
        // away: then it may be a side that kept writing (see `lineage::is_laggard`). Gossip only
        // gives ids; a member holding an ancestor we cannot judge from the id alone is examined.
        let differs = self.gossip_tables().into_iter().any(|advertised| {
            view.active_members().any(|m| m.id == advertised.member)
                && advertised.table != ours.id()
                && (!ours.descends_from(&advertised.table) || !ours.holds_any(&advertised.member))
        });
        if !differs {
            return Resolved::Settled;
        }
        let (held, complete) = self.collect_tables(view).await;
        let outstanding = held.tables.iter().any(|(member, t)| !lineage::is_laggard(&ours, t, member));
        if !complete {
            debug!("not every member answered with its partition table; deciding later");
            return Resolved::Pending;
        }
        if !outstanding {
            // Gossip was behind: everyone holds ours or an ancestor already.
            return Resolved::Settled;
        }
        let superseded = self.decide(&held);
        let table = self.table();
        self.commit_superseding(table.rows.clone(), &superseded);
        Resolved::Published
    }

    /// Commits every migration whose owner reported ready, if the row did not change meanwhile.
    fn commit_ready_migrations(self: &Arc<Self>) {
        let table = self.table();
        let mut rows = table.rows.clone();
        let mut aborted = Vec::new();
        let mut committed = 0usize;
        {
            let mut state = self.master.lock().unwrap();
            let timeout = self.settings.migration_timeout;
            let mut backoff = Vec::new();
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
                backoff.push(*p);
            }
            for p in backoff {
                state.backoff.insert(p, Instant::now() + Duration::from_secs(1));
            }
        }
        for (p, migration) in aborted {
            warn!(partition = p, id = %migration.id, "migration aborted (timed out, or the partition changed meanwhile)");
            self.abort_remote(p, &migration);
        }
        if committed > 0 {
            debug!(committed, "committing finished migrations");
            self.commit(rows);
        }
    }

    /// Starts migrations toward the balanced plan for `members`, up to `migration_parallelism`.
    fn start_migrations(self: &Arc<Self>, members: &[MemberId]) {
        let table = self.table();
        let target = self.target_rows(&table, members);
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
                state.next_attempt += 1;
                let id = MigrationId { master: self.local.clone(), n: state.next_attempt };
                let migration =
                    Migration { id, old_row: current.clone(), new_row: wanted.clone(), started: now, ready: false };
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
            self.on_migrate_abort(p, &migration.id);
        } else {
            let msg = Node::encode(&Msg::MigrateAbort { id: migration.id.clone(), partition: p });
            if let Err(error) = self.net.send(owner, MAP_SERVICE, msg) {
                debug!(partition = p, %owner, %error, "abort not sent; the owner unfreezes on its own");
            }
        }
    }

    fn start_migration(self: &Arc<Self>, p: u32, migration: Migration) {
        let node = self.clone();
        let table = self.table().id();
        self.spawn(async move {
            let owner = migration.old_row[0].clone();
            let (old_row, new_row, id) = (migration.old_row.clone(), migration.new_row.clone(), migration.id.clone());
            let outcome = if owner == node.local {
                node.migrate_out(&node.local.clone(), id.clone(), &table, p, old_row, new_row).await
            } else {
                let msg = Node::encode(&Msg::MigrateStart { id: id.clone(), table, partition: p, old_row, new_row });
                match node.net.request(&owner, MAP_SERVICE, msg, node.settings.migration_timeout).await {
                    Ok(bytes) => codec::decode::<Reply>(&bytes)
                        .unwrap_or_else(|e| Reply::Failed { error: format!("undecodable reply: {e}") }),
                    Err(e) => Reply::Failed { error: e.to_string() },
                }
            };
            let mut state = node.master.lock().unwrap();
            match outcome {
                Reply::MigrateReady { id: ready } if ready == id => {
                    if let Some(m) = state.inflight.get_mut(&p).filter(|m| m.id == id) {
                        m.ready = true;
                    }
                }
                other => {
                    debug!(partition = p, %owner, %id, reply = ?other, "migration failed; will retry");
                    if state.inflight.get(&p).is_some_and(|m| m.id == id) {
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
