//! Background loops of the map service, each owned by the service and stopped on shutdown:
//! table follow-up (publish our epoch, fetch newer tables), anti-entropy with cleanup, and the
//! expiry sweeper.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use grapevine_membership::MemberId;
use grapevine_net::codec;
use tracing::{debug, info, warn};

use crate::messages::{Msg, Reply};
use crate::node::{MAP_SERVICE, Node};
use crate::record::now_ms;
use crate::table::{Role, Term};
use crate::tables::EPOCH_KEY;

/// Expired entries removed per partition per sweep, to bound the work under the lock.
const SWEEP_BATCH: usize = 1_000;

/// Publishes this member's table epoch in gossip and fetches the master's table when gossip
/// shows a newer one (a missed push). Also keeps the listener registry current.
pub(crate) async fn follow_loop(node: Arc<Node>) {
    let mut tables = node.tables.tx.subscribe();
    let mut views = node.membership.watch();
    let mut published = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tables.changed() => {},
            _ = views.changed() => node.refresh_listener_registry(),
            _ = tick.tick() => {},
            _ = node.cancel.cancelled() => return,
        }
        let table = node.table();
        let value = crate::tables::table_gossip_value(&table);
        if value != published {
            node.membership.set_ext_key(EPOCH_KEY, &value).await;
            published = value;
        }
        let view = views.borrow().clone();
        if let Some(master) = view.master.as_ref().filter(|m| **m != node.local) {
            // The master holds another table than ours, and ours is not newer: ask for it (the
            // verdict decides whether to apply it). Rate-limited by the refresh loop.
            let theirs = node.gossip_tables().into_iter().find(|t| t.member == *master).map(|t| t.table);
            if let Some(theirs) = theirs
                && theirs != table.id()
                && !table.descends_from(&theirs)
            {
                node.want_table(master);
            }
        }
    }
}

/// How long an owner waits for a backup's answer to a version check.
const VERSION_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Every `anti_entropy_interval`: owners compare versions with their backups and send full
/// copies where a backup is behind; frozen partitions whose migration was forgotten are unfrozen;
/// data for partitions this member no longer replicates is dropped.
pub(crate) async fn anti_entropy_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.settings.anti_entropy_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = node.cancel.cancelled() => return,
        }
        node.unfreeze_forgotten();
        node.lift_stale_fences();
        node.drop_stray_data();
        node.check_backups().await;
    }
}

impl Node {
    fn unfreeze_forgotten(&self) {
        let master = self.membership.view().master.clone();
        let stale_after = self.settings.migration_timeout.as_millis() as u64 * 2;
        let now = now_ms();
        for (p, slot) in self.slots.iter().enumerate() {
            let mut data = slot.data.lock().unwrap();
            let Some(migration) = &data.migration else { continue };
            if Some(&migration.id.master) != master.as_ref() || now.saturating_sub(migration.started_ms) > stale_after {
                if data.frozen.is_some() {
                    warn!(partition = p, id = %migration.id, "unfreezing a partition whose migration the master abandoned");
                }
                data.frozen = None;
                data.migration = None;
                data.copy_targets.clear();
            }
        }
    }

    fn drop_stray_data(&self) {
        let table = self.table();
        if table.epoch == 0 {
            return;
        }
        let keep_ms = self.settings.migration_timeout.as_millis() as u64;
        let now = now_ms();
        for p in 0..self.settings.partition_count {
            if table.role(p, &self.local) != Role::None {
                continue;
            }
            let mut data = self.slot(p).data.lock().unwrap();
            if !data.maps.is_empty() && now.saturating_sub(data.last_install_ms) > keep_ms {
                debug!(partition = p, "dropping data of a partition this member does not replicate");
                data.maps.clear();
            }
        }
    }

    /// Compares, for every owned partition, each map's position with each backup's.
    pub(crate) async fn check_backups(self: &Arc<Self>) {
        let table = self.table();
        let mut per_member: HashMap<MemberId, Vec<(u32, Term, String, u64)>> = HashMap::new();
        for p in table.owned_by(&self.local) {
            let data = self.slot(p).data.lock().unwrap();
            if data.frozen.is_some() || data.fenced.is_some() || data.starting {
                continue;
            }
            for (name, mp) in &data.maps {
                let highest = self.settings.map(name).replicas() - 1;
                for backup in table.row(p).iter().skip(1).take(highest) {
                    per_member.entry(backup.clone()).or_default().push((p, mp.term.clone(), name.clone(), mp.seq));
                }
            }
        }
        // Every backup at once: one that does not answer (cut off, stalled) must not hold up the
        // checks of the others for the whole timeout (a diverged backup copy stayed stale for
        // seconds behind one, until its member became owner with it: harness seed 163).
        let mut checks = tokio::task::JoinSet::new();
        for (member, versions) in per_member {
            let msg = Node::encode(&Msg::VersionCheck { versions });
            let reply = self.net.request(&member, MAP_SERVICE, msg, VERSION_CHECK_TIMEOUT);
            checks.spawn(async move { (member, reply.await) });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((member, reply)) = joined else { continue };
            let mismatched = match reply.map(|b| codec::decode::<Reply>(&b)) {
                Ok(Ok(Reply::Versions { behind, fenced, table: theirs, .. })) => {
                    for p in fenced {
                        self.fence_partition(p, &theirs, &member);
                    }
                    behind
                }
                Ok(other) => {
                    debug!(%member, reply = ?other, "unexpected anti-entropy reply");
                    continue;
                }
                Err(error) => {
                    debug!(%member, %error, "anti-entropy check failed");
                    continue;
                }
            };
            if !mismatched.is_empty() {
                info!(%member, map_partitions = mismatched.len(), "anti-entropy: backup out of date; sending full copies");
            }
            for (p, map) in mismatched {
                debug!(partition = p, map = %map, %member, "anti-entropy: full copy");
                self.resync_backup(&member, p, &map).await;
            }
        }
    }
}

/// Removes expired entries: owners replicate the removal (and notify listeners); backups drop
/// entries whose time to live passed (max idle is the owner's call, as reads happen there).
pub(crate) async fn sweep_loop(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.settings.expiry_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = node.cancel.cancelled() => return,
        }
        node.sweep();
    }
}

impl Node {
    pub(crate) fn sweep(self: &Arc<Self>) {
        let table = self.table();
        let now = now_ms();
        for p in 0..self.settings.partition_count {
            let role = table.role(p, &self.local);
            let mut data = self.slot(p).data.lock().unwrap();
            if data.maps.is_empty() || data.frozen.is_some() {
                continue;
            }
            if owner_not_serving(&data) && role == Role::Owner {
                continue;
            }
            let floor = data.owner_since_ms;
            let names: Vec<String> = data.maps.keys().cloned().collect();
            for name in names {
                let owner = role == Role::Owner;
                let expired = data.maps[&name].expired_keys(now, floor, owner, SWEEP_BATCH);
                if expired.is_empty() {
                    continue;
                }
                if !owner {
                    let mp = data.maps.get_mut(&name).expect("listed above");
                    for key in expired {
                        mp.remove(&key);
                    }
                    continue;
                }
                self.expire_locked(&table, p, &name, &mut data, expired);
            }
        }
    }

    /// Removes expired keys as owner and replicates each removal without waiting for backups.
    fn expire_locked(
        self: &Arc<Self>,
        table: &crate::table::PartitionTable,
        p: u32,
        map: &str,
        data: &mut crate::node::PartitionData,
        keys: Vec<Vec<u8>>,
    ) {
        let config = self.settings.map(map);
        let backups: Vec<MemberId> = table.row(p).iter().skip(1).take(config.replicas() - 1).cloned().collect();
        let targets: Vec<MemberId> = data
            .copy_targets
            .iter()
            .filter(|(m, n, _)| n == map && !backups.contains(m))
            .map(|(m, _, _)| m.clone())
            .collect();
        let mut events = Vec::new();
        for key in keys {
            let mp = data.maps.get_mut(map).expect("map partition exists");
            let Some(change) = mp.expire(key) else { continue };
            mp.seq += 1;
            self.invalidation.on_change(map, p, &mp.term, mp.seq, &change.repl);
            let msg = Node::encode(&Msg::Backup {
                partition: p,
                term: mp.term.clone(),
                map: map.to_string(),
                seq: mp.seq,
                op: change.repl.clone(),
            });
            for member in backups.iter().chain(targets.iter()) {
                let _ = self.net.send(member, MAP_SERVICE, msg.clone());
            }
            events.push(crate::messages::RawEntryEvent {
                map: map.to_string(),
                kind: change.kind,
                key: change.key().to_vec(),
                value: None,
                old_value: change.old_value,
            });
        }
        self.publish_events(map, events);
    }
}

/// Confirms the backups of owned partitions whose row changed, copying data where a backup lacks
/// it. Until this completes after a promotion, the partition has fewer up-to-date replicas than
/// configured; `MapService::is_settled` reports it.
pub(crate) async fn confirm_loop(node: Arc<Node>) {
    const PARALLEL: usize = 16;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.confirm_wakeup.notified() => {},
            _ = tick.tick() => {},
            _ = node.cancel.cancelled() => return,
        }
        let table = node.table();
        let pending: Vec<u32> = table
            .owned_by(&node.local)
            .filter(|p| {
                let data = node.slot(*p).data.lock().unwrap();
                data.unconfirmed && !owner_not_serving(&data)
            })
            .collect();
        for batch in pending.chunks(PARALLEL) {
            let mut confirms = tokio::task::JoinSet::new();
            for &p in batch {
                let node = node.clone();
                let row = table.row(p).to_vec();
                confirms.spawn(async move { (p, node.confirm_row(p, &row).await) });
            }
            while let Some(joined) = confirms.join_next().await {
                let Ok((p, outcome)) = joined else { continue };
                match outcome {
                    Ok(()) => {
                        let now = node.table();
                        let still_same = now.row(p) == table.row(p) && now.term(p) == table.term(p);
                        if still_same {
                            node.slot(p).data.lock().unwrap().unconfirmed = false;
                        }
                    }
                    Err(error) => debug!(partition = p, %error, "backups not confirmed yet; will retry"),
                }
            }
        }
    }
}

/// True while an owner does not serve a partition: frozen for a hand-over, fenced by a newer
/// table, or starting its term.
fn owner_not_serving(data: &crate::node::PartitionData) -> bool {
    data.frozen.is_some() || data.fenced.is_some() || data.starting
}
