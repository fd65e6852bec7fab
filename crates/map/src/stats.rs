//! Per-map counters and latency histograms, and the member's statistics document.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tracing::{info, warn};

use crate::messages::{LocalMapStats, LocalStats, OpResult};
use crate::node::Node;
use crate::table::Role;

/// Counters of one map on one member.
#[derive(Debug)]
pub(crate) struct MapCounters {
    gets: AtomicU64,
    hits: AtomicU64,
    puts: AtomicU64,
    removes: AtomicU64,
    merge_kept_existing: AtomicU64,
    merge_took_merging: AtomicU64,
    /// Writes acknowledged with fewer synchronous backups than `backup_count` (this member as owner).
    under_replicated_writes: AtomicU64,
    /// Set while this member's writes to the map go out under-replicated: the warning was logged
    /// and is not logged again until a write has every synchronous backup again.
    under_replicated: AtomicBool,
    get_latency: Mutex<Histogram<u64>>,
    put_latency: Mutex<Histogram<u64>>,
}

impl Default for MapCounters {
    fn default() -> Self {
        // Microseconds, 1 µs to 10 min, 2 significant digits: a few KiB per histogram.
        let histogram = || Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds");
        MapCounters {
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            merge_kept_existing: AtomicU64::new(0),
            merge_took_merging: AtomicU64::new(0),
            under_replicated_writes: AtomicU64::new(0),
            under_replicated: AtomicBool::new(false),
            get_latency: Mutex::new(histogram()),
            put_latency: Mutex::new(histogram()),
        }
    }
}

impl MapCounters {
    /// Counts an operation executed as owner.
    pub(crate) fn count_owner_op(&self, op: &'static str, result: &OpResult) {
        match op {
            "get" | "contains_key" | "ttl" | "ring_read" => {
                self.gets.fetch_add(1, Ordering::Relaxed);
                let hit = matches!(
                    result,
                    OpResult::Value(Some(_))
                        | OpResult::Flag(true)
                        | OpResult::Positioned { value: Some(_), .. }
                        | OpResult::RingItems { .. }
                );
                if hit {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
            "remove" => {
                self.removes.fetch_add(1, Ordering::Relaxed);
            }
            // Not a put: a merge is counted by its verdict.
            "merge" => {
                let counter = if matches!(result, OpResult::Flag(true)) {
                    &self.merge_took_merging
                } else {
                    &self.merge_kept_existing
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.puts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Notes how many synchronous backups a write of `map` went to (`asked`) when the map wants
    /// `wanted`. Fewer (the cluster has fewer members than `1 + backup_count`): the write is
    /// counted as under-replicated, and the first such write logs a warning; the first write with
    /// every backup again logs that the map recovered. Cheap when nothing changes: one load.
    pub(crate) fn note_sync_backups(&self, map: &str, wanted: u8, asked: usize) {
        if asked >= usize::from(wanted) {
            if self.under_replicated.load(Ordering::Relaxed) && self.under_replicated.swap(false, Ordering::Relaxed) {
                info!(map, backup_count = wanted, "writes to the map have all their synchronous backups again");
            }
            return;
        }
        self.under_replicated_writes.fetch_add(1, Ordering::Relaxed);
        if !self.under_replicated.swap(true, Ordering::Relaxed) {
            warn!(
                map,
                backup_count = wanted,
                backups = asked,
                "writes to the map are acknowledged with {asked} of its {wanted} synchronous backups: the cluster has \
                 fewer members than 1 + backup_count, so an acknowledged write survives the loss of only {asked} \
                 member(s) until more members join (counted as under_replicated_writes in /stats and /metrics; \
                 logged once until the map recovers)"
            );
        }
    }

    /// Records a caller-side latency.
    pub(crate) fn record_latency(&self, op: &'static str, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, 600_000_000);
        let histogram = match op {
            "get" | "contains_key" | "ttl" | "ring_read" => &self.get_latency,
            "remove" | "merge" => return,
            _ => &self.put_latency,
        };
        let _ = histogram.lock().unwrap().record(micros);
    }

    fn p99(histogram: &Mutex<Histogram<u64>>) -> u64 {
        let histogram = histogram.lock().unwrap();
        if histogram.is_empty() { 0 } else { histogram.value_at_quantile(0.99) }
    }
}

impl Node {
    /// This member's map statistics.
    pub(crate) fn local_stats(&self) -> LocalStats {
        let table = self.table();
        let mut maps: BTreeMap<String, LocalMapStats> = BTreeMap::new();
        let mut owned_partitions = 0;
        let mut backup_partitions = 0;
        // For each partition this member owns: how many backups its row names.
        let mut owned_row_backups = Vec::new();
        for p in 0..self.settings.partition_count {
            let role = table.role(p, &self.local);
            match role {
                Role::Owner => {
                    owned_partitions += 1;
                    owned_row_backups.push(table.row(p).len().saturating_sub(1));
                }
                Role::Backup(_) => backup_partitions += 1,
                Role::None => {}
            }
            let data = self.slot(p).data.lock().unwrap();
            for (name, mp) in &data.maps {
                let stats = maps.entry(name.clone()).or_default();
                let replicates = match role {
                    Role::Owner => {
                        stats.owned_entries += mp.len() as u64;
                        true
                    }
                    Role::Backup(index) if index < self.settings.map(name).replicas() => {
                        stats.backup_entries += mp.len() as u64;
                        true
                    }
                    _ => false,
                };
                if replicates {
                    stats.memory_bytes += mp.memory_bytes();
                }
            }
        }
        let counters = self.counters.lock().unwrap().clone();
        let names: BTreeSet<String> = maps.keys().chain(counters.keys()).cloned().collect();
        let maps = names
            .into_iter()
            .map(|name| {
                let mut stats = maps.remove(&name).unwrap_or_default();
                let config = self.settings.map(&name);
                stats.backup_count = config.backup_count;
                stats.async_backup_count = config.async_backup_count;
                stats.merge_policy = config.merge_policy.to_string();
                stats.min_cluster_size = config.min_cluster_size;
                let wanted = usize::from(config.backup_count);
                stats.under_replicated_partitions = owned_row_backups.iter().filter(|b| **b < wanted).count() as u64;
                if let Some(c) = counters.get(&name) {
                    stats.under_replicated_writes = c.under_replicated_writes.load(Ordering::Relaxed);
                    stats.gets = c.gets.load(Ordering::Relaxed);
                    stats.hits = c.hits.load(Ordering::Relaxed);
                    stats.puts = c.puts.load(Ordering::Relaxed);
                    stats.removes = c.removes.load(Ordering::Relaxed);
                    stats.get_p99_us = MapCounters::p99(&c.get_latency);
                    stats.put_p99_us = MapCounters::p99(&c.put_latency);
                    stats.merge_kept_existing = c.merge_kept_existing.load(Ordering::Relaxed);
                    stats.merge_took_merging = c.merge_took_merging.load(Ordering::Relaxed);
                }
                stats.name = name;
                stats
            })
            .collect();
        LocalStats {
            node_id: self.local.node_id.to_string(),
            epoch: table.epoch,
            owned_partitions,
            backup_partitions,
            partitions_lost: self.partitions_lost.load(Ordering::Relaxed),
            maps,
        }
    }
}
