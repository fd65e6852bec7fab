//! The owner's side of a migration: bring a partition from its row to the row the master plans,
//! then report ready; the master commits the new row.
//!
//! 1. The members of the new row that lack a map get a streamed full copy ([`crate::copy`]); from
//!    the copy's start they get every change of the map, asynchronously while the copy arrives and
//!    synchronously once it is installed, so that they hold every acknowledged write.
//! 2. If the owner changes, writes to the partition are *frozen* (refused with "retry", reads
//!    too) and the owner waits for the writes in flight.
//! 3. Every member of the new row confirms it is exactly at the owner's position for every map it
//!    will hold (a version check queued behind all writes); one that is not gets a copy.
//!
//! Each attempt carries the id the master gave it: a message of an older attempt never freezes,
//! unfreezes or reports ready for a newer one. A frozen partition unfreezes when its row changes
//! (committed or superseded), when the master aborts that attempt, or when the master that started
//! it is no longer master (see the anti-entropy loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_membership::MemberId;
use tracing::{debug, info};

use crate::messages::{MigrationId, Reply};
use crate::node::{Freeze, Node, OwnerMigration};
use crate::record::now_ms;
use crate::table::TableId;

impl Node {
    /// The master asks this owner to move partition `p` from `old_row` to `new_row` (attempt `id`).
    pub(crate) async fn migrate_out(
        self: &Arc<Self>,
        master: &MemberId,
        id: MigrationId,
        master_table: &TableId,
        p: u32,
        old_row: Vec<MemberId>,
        new_row: Vec<MemberId>,
    ) -> Reply {
        let started = Instant::now();
        if p >= self.settings.partition_count || new_row.is_empty() || new_row.len() > crate::assign::REPLICAS_MAX {
            return Reply::Failed { error: format!("invalid migration of partition {p} to {new_row:?}") };
        }
        if self.membership.view().master.as_ref() != Some(master) || id.master != *master {
            return Reply::Failed { error: format!("{master} is not this member's master; migration {id} refused") };
        }
        let table = self.table();
        if table.row(p) != old_row.as_slice() || old_row.first() != Some(&self.local) {
            return Reply::Failed {
                error: format!(
                    "partition {p}'s row here is {:?} in table {} (the master's is {master_table}), not {old_row:?}",
                    table.row(p),
                    table.id()
                ),
            };
        }
        let mut copies = Vec::new();
        {
            let mut data = self.slot(p).data.lock().unwrap();
            if let Some(current) = &data.migration
                && current.id == id
            {
                return Reply::Failed { error: format!("migration {id} of partition {p} is already under way") };
            }
            if data.fenced.is_some() {
                return Reply::Failed { error: format!("partition {p} moved on in a newer table") };
            }
            data.frozen = None;
            data.copy_targets.clear();
            data.migration = Some(OwnerMigration { id: id.clone(), started_ms: now_ms() });
            for (new_index, member) in new_row.iter().enumerate() {
                if *member == self.local {
                    continue;
                }
                let old_index = old_row.iter().position(|m| m == member);
                for name in data.maps.keys() {
                    let replicas = self.settings.map(name).replicas();
                    if new_index < replicas && old_index.is_none_or(|i| i >= replicas) {
                        copies.push((member.clone(), name.clone()));
                    }
                }
            }
            for (member, name) in &copies {
                data.copy_targets.push((member.clone(), name.clone(), false));
            }
        }
        // Copies first (writes go on meanwhile), so writes pause only for the short final step.
        let mut running = tokio::task::JoinSet::new();
        for (member, name) in copies {
            let node = self.clone();
            running.spawn(async move {
                let outcome = node.stream_copy(&member, p, &name).await;
                (member, name, outcome)
            });
        }
        while let Some(joined) = running.join_next().await {
            let Ok((member, name, outcome)) = joined else { continue };
            if let Err(error) = outcome {
                self.abort_migration(p, &id);
                return Reply::Failed {
                    error: format!("copying partition {p} (map {name:?}) to {member} failed: {error}"),
                };
            }
            let mut data = self.slot(p).data.lock().unwrap();
            if data.migration.as_ref().is_none_or(|m| m.id != id) {
                return Reply::Failed { error: format!("migration {id} of partition {p} was superseded") };
            }
            // Installed: from now on the member confirms every write, like a synchronous backup.
            for target in data.copy_targets.iter_mut().filter(|(m, n, _)| *m == member && *n == name) {
                target.2 = true;
            }
        }
        if new_row[0] != self.local {
            {
                let mut data = self.slot(p).data.lock().unwrap();
                if data.migration.as_ref().is_none_or(|m| m.id != id) {
                    return Reply::Failed { error: format!("migration {id} of partition {p} was superseded") };
                }
                data.frozen = Some(Freeze { migration: id.clone() });
            }
            if !self.wait_drained(p, self.settings.backup_ack_timeout * 2).await {
                self.abort_migration(p, &id);
                return Reply::Failed { error: format!("writes on partition {p} did not finish in time") };
            }
        }
        // Final barrier: every member of the new row confirms it processed every write of every map
        // it will hold. Asynchronous backups moving to a synchronous index (or to owner) may still
        // have writes in flight; the check travels behind them on the same connection.
        if let Err(error) = self.confirm_row(p, &new_row).await {
            self.abort_migration(p, &id);
            return Reply::Failed { error: format!("partition {p}: {error}") };
        }
        if self.slot(p).data.lock().unwrap().migration.as_ref().is_none_or(|m| m.id != id) {
            return Reply::Failed { error: format!("migration {id} of partition {p} was superseded") };
        }
        debug!(partition = p, %id, to = ?new_row, took = ?started.elapsed(), "partition ready to move");
        Reply::MigrateReady { id }
    }

    /// Each member of `row` (but this one) confirms it holds every map it replicates at this
    /// member's current position; one that does not gets a full copy.
    pub(crate) async fn confirm_row(self: &Arc<Self>, p: u32, row: &[MemberId]) -> Result<(), String> {
        let mut checks = Vec::new();
        {
            let data = self.slot(p).data.lock().unwrap();
            for (index, member) in row.iter().enumerate() {
                if *member == self.local {
                    continue;
                }
                for (name, mp) in &data.maps {
                    if index < self.settings.map(name).replicas() {
                        checks.push((member.clone(), name.clone(), mp.term.clone(), mp.seq));
                    }
                }
            }
        }
        let deadline = Instant::now() + self.settings.migration_timeout;
        let mut running = tokio::task::JoinSet::new();
        for (member, map, term, seq) in checks {
            let node = self.clone();
            running.spawn(async move {
                let outcome = node.ensure_synced(&member, p, &map, &term, seq, deadline).await;
                outcome.map_err(|e| format!("{member} did not confirm map {map:?}: {e}"))
            });
        }
        while let Some(joined) = running.join_next().await {
            joined.map_err(|e| format!("a confirmation failed: {e}"))??;
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

    /// Ends migration attempt `id` of `p` here, if it is the one under way.
    fn abort_migration(&self, p: u32, id: &MigrationId) {
        let mut data = self.slot(p).data.lock().unwrap();
        if data.migration.as_ref().is_some_and(|m| m.id == *id) {
            data.frozen = None;
            data.migration = None;
            data.copy_targets.clear();
        }
    }

    /// The master will not commit migration attempt `id`.
    pub(crate) fn on_migrate_abort(&self, p: u32, id: &MigrationId) {
        if p < self.settings.partition_count {
            self.abort_migration(p, id);
            info!(partition = p, %id, "migration aborted by the master");
        }
    }
}
