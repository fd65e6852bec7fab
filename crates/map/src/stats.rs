//! Per-map counters and latency histograms, and the member's statistics document.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use hdrhistogram::Histogram;
use tracing::{info, warn};

use crate::messages::{LocalMapStats, LocalStats, OpResult};
use crate::node::Node;
use crate::table::Role;

/// Stripes of a map's counters: each thread counts in its own (see [`stripe_index`]), so that the
/// runtime's worker threads do not bounce one cache line between them on every operation; the
/// statistics add the stripes up.
const STRIPES: usize = 4;

/// One stripe of [`MapCounters`], on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Stripe {
    gets: AtomicU64,
    hits: AtomicU64,
    puts: AtomicU64,
    removes: AtomicU64,
    /// Created when a thread of this stripe first records a latency (a few KiB each).
    get_latency: OnceLock<Mutex<Histogram<u64>>>,
    put_latency: OnceLock<Mutex<Histogram<u64>>>,
}

impl Stripe {
    fn new() -> Stripe {
        Stripe {
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            removes: AtomicU64::new(0),
            get_latency: OnceLock::new(),
            put_latency: OnceLock::new(),
        }
    }
}

/// Microseconds, 1 µs to 10 min, 2 significant digits: a few KiB per histogram.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

/// The stripe this thread counts in: threads take the stripes in turn as they first count.
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    INDEX.with(|i| *i)
}

/// Counters of one map on one member.
#[derive(Debug)]
pub(crate) struct MapCounters {
    stripes: [Stripe; STRIPES],
    merge_kept_existing: AtomicU64,
    merge_took_merging: AtomicU64,
    /// Writes acknowledged with fewer synchronous backups than `backup_count` (this member as owner).
    under_replicated_writes: AtomicU64,
    /// Set while this member's writes to the map go out under-replicated: the warning was logged
    /// and is not logged again until a write has every synchronous backup again.
    under_replicated: AtomicBool,
}

impl Default for MapCounters {
    fn default() -> Self {
        MapCounters {
            stripes: std::array::from_fn(|_| Stripe::new()),
            merge_kept_existing: AtomicU64::new(0),
            merge_took_merging: AtomicU64::new(0),
            under_replicated_writes: AtomicU64::new(0),
            under_replicated: AtomicBool::new(false),
        }
    }
}

impl MapCounters {
    fn stripe(&self) -> &Stripe {
        &self.stripes[stripe_index()]
    }

    fn sum(&self, counter: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|s| counter(s).load(Ordering::Relaxed)).sum()
    }

    /// Counts an operation executed as owner.
    pub(crate) fn count_owner_op(&self, op: &'static str, result: &OpResult) {
        match op {
            "get" | "contains_key" | "ttl" | "ring_read" => {
                let stripe = self.stripe();
                stripe.gets.fetch_add(1, Ordering::Relaxed);
                let hit = matches!(
                    result,
                    OpResult::Value(Some(_))
                        | OpResult::Flag(true)
                        | OpResult::Positioned { value: Some(_), .. }
                        | OpResult::RingItems { .. }
                );
                if hit {
                    stripe.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
            "remove" => {
                self.stripe().removes.fetch_add(1, Ordering::Relaxed);
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
                self.stripe().puts.fetch_add(1, Ordering::Relaxed);
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
        let stripe = self.stripe();
        let histogram = match op {
            "get" | "contains_key" | "ttl" | "ring_read" => &stripe.get_latency,
            "remove" | "merge" => return,
            _ => &stripe.put_latency,
        };
        let _ = histogram.get_or_init(|| Mutex::new(new_histogram())).lock().unwrap().record(micros);
    }

    /// The 99th percentile of the stripes' histograms together (0 when none has a value).
    fn p99(&self, histogram: impl Fn(&Stripe) -> &OnceLock<Mutex<Histogram<u64>>>) -> u64 {
        let mut all = new_histogram();
        for stripe in &self.stripes {
            if let Some(h) = histogram(stripe).get() {
                // The same bounds: adding cannot fail.
                let _ = all.add(&*h.lock().unwrap());
            }
        }
        if all.is_empty() { 0 } else { all.value_at_quantile(0.99) }
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
                    stats.gets = c.sum(|s| &s.gets);
                    stats.hits = c.sum(|s| &s.hits);
                    stats.puts = c.sum(|s| &s.puts);
                    stats.removes = c.sum(|s| &s.removes);
                    stats.get_p99_us = c.p99(|s| &s.get_latency);
                    stats.put_p99_us = c.p99(|s| &s.put_latency);
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
