//! Settings of the map service and of each map.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::merge::MergePolicy;

/// The most backups of each kind a map may have (as in Hazelcast: larger values are clamped).
pub const BACKUP_COUNT_MAX: u8 = 6;

/// One map's settings. All members should use the same settings for a map: the owner of each
/// partition applies its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapConfig {
    /// Synchronous backups: a write returns after they acknowledged it. 0 to 6, default 1.
    pub backup_count: u8,
    /// Asynchronous backups: sent without waiting. 0 to 6, default 0.
    pub async_backup_count: u8,
    /// Default time to live of entries, in seconds (0: none). Default 0.
    pub ttl_seconds: u64,
    /// Default maximum idle time of entries, in seconds (0: none). Default 0. For session maps,
    /// set it above the application's session lifetime.
    pub max_idle_seconds: u64,
    /// What happens to this map's entries of a side that merges into another after a split brain
    /// (see [`MergePolicy`]). Default `latest-update`: the last write of each key survives, which
    /// is what sessions need (the user's latest state, whichever side served them).
    pub merge_policy: MergePolicy,
    /// Split-brain protection: a member that sees fewer than this many active, non-excluded
    /// members (itself included) refuses every operation on this map at once with
    /// [`crate::MapError::BelowMinClusterSize`], so that a minority side cannot acknowledge
    /// writes a merge would later overrule. 0 (the default) turns it off.
    pub min_cluster_size: u32,
    /// A near cache on every member that reads the map (`[maps.NAME.near_cache]`); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub near_cache: Option<NearCacheConfig>,
}

impl Default for MapConfig {
    fn default() -> Self {
        MapConfig {
            backup_count: 1,
            async_backup_count: 0,
            ttl_seconds: 0,
            max_idle_seconds: 0,
            merge_policy: MergePolicy::LatestUpdate,
            min_cluster_size: 0,
            near_cache: None,
        }
    }
}

/// A map's near cache: a bounded local copy of the entries a member read, kept fresh by the
/// owners' invalidation events (see `crate::near_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NearCacheConfig {
    /// Most entries kept; the least recently used are evicted beyond it. Default 10000.
    pub max_entries: u64,
    /// Entries are dropped this many seconds after they were cached (0: only by invalidation or
    /// eviction). Default 0. Must be above 0 when event invalidation is off.
    pub ttl_seconds: u64,
    /// Drop an entry when the owner reports a change of its key (and the whole partition on any
    /// sign of a missed event). Default true. Off: entries only expire by `ttl_seconds`.
    pub invalidate_on_change: bool,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        NearCacheConfig { max_entries: 10_000, ttl_seconds: 0, invalidate_on_change: true }
    }
}

/// Settings of the near-cache invalidation events, the same for every map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidationSettings {
    /// Event-based invalidation (the seed's `eventInvalidation`). Off: owners send nothing and
    /// near-cached entries only expire by their time to live. Default true.
    pub enabled: bool,
    /// An owner sends a member's pending invalidations once this many are queued. Default 100.
    pub batch_size: usize,
    /// ... or when the oldest has waited this long. Default 10 ms.
    pub batch_delay: Duration,
    /// Owners send every near-caching member the position of each partition they own this often;
    /// a near cache purges a partition whose position is ahead of the events it received, and the
    /// partitions of an owner it has not heard from for three intervals. Default 1 s.
    pub heartbeat_interval: Duration,
}

impl Default for InvalidationSettings {
    fn default() -> Self {
        InvalidationSettings {
            enabled: true,
            batch_size: 100,
            batch_delay: Duration::from_millis(10),
            heartbeat_interval: Duration::from_secs(1),
        }
    }
}

/// Reliable topics keep their ring buffer in the map named this prefix and the topic name; its
/// backup counts come from that map's settings, else from `"__topic:default"`'s, else the
/// defaults (one synchronous backup). Map names with this prefix are reserved.
pub const RELIABLE_TOPIC_MAP_PREFIX: &str = "__topic:";

/// The settings key that configures reliable topics without their own section.
const RELIABLE_TOPIC_DEFAULT: &str = "__topic:default";

impl MapConfig {
    /// Replicas a partition of this map has: the owner and every backup.
    pub fn replicas(&self) -> usize {
        1 + usize::from(self.backup_count) + usize::from(self.async_backup_count)
    }

    /// Replicas that hold every acknowledged write: the owner and the synchronous backups.
    pub fn durable_replicas(&self) -> usize {
        1 + usize::from(self.backup_count)
    }

    /// Clamps backup counts to [`BACKUP_COUNT_MAX`], each and both together (asynchronous backups
    /// give way to synchronous ones); returns a warning for each adjustment.
    pub fn clamp(&mut self, map: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for (key, value) in
            [("backup_count", &mut self.backup_count), ("async_backup_count", &mut self.async_backup_count)]
        {
            if *value > BACKUP_COUNT_MAX {
                warnings.push(format!(
                    "maps.{map}.{key} = {value} is above the maximum of {BACKUP_COUNT_MAX}; using {BACKUP_COUNT_MAX}"
                ));
                *value = BACKUP_COUNT_MAX;
            }
        }
        // A partition's row names at most 1 + BACKUP_COUNT_MAX members: backups of both kinds
        // share those places, synchronous ones first.
        let total = self.backup_count + self.async_backup_count;
        if total > BACKUP_COUNT_MAX {
            let kept = BACKUP_COUNT_MAX - self.backup_count;
            warnings.push(format!(
                "maps.{map}.backup_count + async_backup_count = {} + {} = {total} is above the maximum of \
                 {BACKUP_COUNT_MAX} backups per partition; using {kept} asynchronous backup(s) (lower \
                 async_backup_count to {kept} to silence this)",
                self.backup_count, self.async_backup_count
            ));
            self.async_backup_count = kept;
        }
        warnings
    }
}

/// Settings of the map service on one member.
#[derive(Debug, Clone, PartialEq)]
pub struct MapSettings {
    /// Number of partitions; the same on every member. Default 271.
    pub partition_count: u32,
    /// How long a map operation may take, retries included. Default 30 s.
    pub operation_timeout: Duration,
    /// How long an owner waits for synchronous backups to acknowledge a write. Default 5 s.
    pub backup_ack_timeout: Duration,
    /// How often owners compare versions with their backups. Default 5 s.
    pub anti_entropy_interval: Duration,
    /// How often expired entries are swept. Default 1 s.
    pub expiry_sweep_interval: Duration,
    /// How many partitions the master migrates at once. Default 8.
    pub migration_parallelism: usize,
    /// How long one partition's migration may take before the master aborts and retries it.
    /// Default 60 s.
    pub migration_timeout: Duration,
    /// Per-map settings by name; `default` applies to maps without their own section.
    pub maps: BTreeMap<String, MapConfig>,
    /// Near-cache invalidation events.
    pub invalidation: InvalidationSettings,
}

impl Default for MapSettings {
    fn default() -> Self {
        MapSettings {
            partition_count: 271,
            operation_timeout: Duration::from_secs(30),
            backup_ack_timeout: Duration::from_secs(5),
            anti_entropy_interval: Duration::from_secs(5),
            expiry_sweep_interval: Duration::from_secs(1),
            migration_parallelism: 8,
            migration_timeout: Duration::from_secs(60),
            maps: BTreeMap::new(),
            invalidation: InvalidationSettings::default(),
        }
    }
}

impl MapSettings {
    /// The settings of map `name`.
    pub fn map(&self, name: &str) -> MapConfig {
        self.map_ref(name).clone()
    }

    /// The settings of map `name`, without a copy (every operation asks).
    pub fn map_ref(&self, name: &str) -> &MapConfig {
        static DEFAULT: std::sync::LazyLock<MapConfig> = std::sync::LazyLock::new(MapConfig::default);
        if let Some(config) = self.maps.get(name) {
            return config;
        }
        let fallback = if name.starts_with(RELIABLE_TOPIC_MAP_PREFIX) { RELIABLE_TOPIC_DEFAULT } else { "default" };
        self.maps.get(fallback).unwrap_or(&DEFAULT)
    }
}
