//! Settings of the map service and of each map.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
}

impl Default for MapConfig {
    fn default() -> Self {
        MapConfig { backup_count: 1, async_backup_count: 0, ttl_seconds: 0, max_idle_seconds: 0 }
    }
}

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
        }
    }
}

impl MapSettings {
    /// The settings of map `name`.
    pub fn map(&self, name: &str) -> MapConfig {
        self.maps.get(name).or_else(|| self.maps.get("default")).cloned().unwrap_or_default()
    }
}
