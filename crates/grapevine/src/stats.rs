//! The `/stats` document: what `grapevine clusterstats` prints, as serializable types. The CLI
//! reads the document into these same types, so a counter is added in one place. Every field has
//! a default and unknown fields are ignored, so that a CLI of one version reads the `/stats` of
//! another.

use std::collections::BTreeMap;

use grapevine_map::{LocalMapStats, NearCacheStats, PartitionSummary};
use grapevine_membership::MembershipStats;
use grapevine_topic::TopicStats;
use serde::{Deserialize, Serialize};

/// One member's view of the whole cluster (served at `/stats`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterStats {
    /// The cluster name.
    pub cluster_name: String,
    /// The node id of the member that answered.
    pub node_id: String,
    /// Its generation (start time in ms since the Unix epoch).
    pub generation: u64,
    /// The master's node id, if there is one.
    pub master: Option<String>,
    /// The view version (grows on every membership change).
    pub view_version: u64,
    /// Members in the view, oldest first.
    pub members: Vec<MemberStats>,
    /// Node ids of the active members this member treats as excluded from ownership and
    /// mastership: gossip says they are alive, but other members cannot reach them over the data
    /// plane. Empty in a healthy cluster.
    #[serde(default)]
    pub excluded: Vec<String>,
    /// The answering member's own state and runtime configuration.
    pub local: LocalStats,
    /// Gossip counters of the answering member.
    pub gossip: MembershipStats,
    /// The partition table as the answering member holds it.
    pub partitions: Option<PartitionSummary>,
    /// Every map, summed over the members that answered, with each member's part (the ring
    /// buffers of reliable topics are under `topics`).
    pub maps: Vec<MapStats>,
    /// Every topic, summed over the members that answered, with each member's part.
    pub topics: Vec<TopicSummary>,
}

/// One map across the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MapStats {
    /// The map name.
    pub name: String,
    /// Entries in their owners' partitions (the map's size, expired entries not yet swept included).
    pub owned_entries: u64,
    /// Backup copies held.
    pub backup_entries: u64,
    /// Reads that found an entry.
    pub hits: u64,
    /// Reads.
    pub gets: u64,
    /// Writes.
    pub puts: u64,
    /// Removes.
    pub removes: u64,
    /// Highest 99th-percentile get latency over members, in microseconds.
    pub get_p99_us: u64,
    /// Highest 99th-percentile put latency over members, in microseconds.
    pub put_p99_us: u64,
    /// Estimated memory of entries and backups.
    pub memory_bytes: u64,
    /// Synchronous backups configured.
    pub backup_count: u8,
    /// Asynchronous backups configured.
    pub async_backup_count: u8,
    /// Partitions whose owner has fewer synchronous backups than `backup_count` in its row: the
    /// cluster has fewer members than `1 + backup_count`. 0 once enough members are active.
    #[serde(default)]
    pub under_replicated_partitions: u64,
    /// Writes acknowledged with fewer synchronous backups than `backup_count`, since the owners
    /// started (each also logs a warning once, until the map recovers).
    #[serde(default)]
    pub under_replicated_writes: u64,
    /// The near caches of the map, summed over the members that have one (`map` is the map's
    /// name); none when no member near-caches it.
    pub near_cache: Option<NearCacheStats>,
    /// Each member's part.
    pub per_member: Vec<MemberMapStats>,
    /// Split-brain merges in which the merge policy kept the entry the owner held, cluster-wide.
    #[serde(default)]
    pub merge_kept_existing: u64,
    /// Split-brain merges in which the merging entry was stored, cluster-wide.
    #[serde(default)]
    pub merge_took_merging: u64,
    /// The merge policy configured (`latest-update`, ...).
    #[serde(default)]
    pub merge_policy: String,
    /// The split-brain protection minimum configured (0: off).
    #[serde(default)]
    pub min_cluster_size: u32,
}

/// One map on one member.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberMapStats {
    /// The member's node id.
    pub node_id: String,
    /// Its statistics.
    #[serde(flatten)]
    pub stats: LocalMapStats,
    /// Its near cache of the map, if it has one.
    pub near_cache: Option<NearCacheStats>,
}

/// One topic across the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TopicSummary {
    /// The topic name.
    pub name: String,
    /// `topic` or `reliable`.
    pub kind: String,
    /// Messages published (from any member).
    pub published: u64,
    /// Messages delivered to subscribers (once per subscriber).
    pub received: u64,
    /// Subscribers in the cluster.
    pub subscribers: u64,
    /// Plain: messages dropped for slow subscribers (or members that could not be sent to).
    /// Reliable: publishes refused by `discard_newest`.
    pub dropped: u64,
    /// Reliable: messages subscribers lost by falling more than the capacity behind.
    pub lost: u64,
    /// Malformed messages, and messages that did not decode for a subscriber.
    pub malformed: u64,
    /// Reliable: messages held in the ring buffer (its owner's copy).
    pub stored: u64,
    /// Reliable: estimated memory of the ring buffer and its backups.
    pub memory_bytes: u64,
    /// Each member's part.
    pub per_member: Vec<MemberTopicStats>,
}

/// One topic on one member.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberTopicStats {
    /// The member's node id.
    pub node_id: String,
    /// Its statistics.
    #[serde(flatten)]
    pub stats: TopicStats,
}

/// A member as seen in the view.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberStats {
    /// Node id.
    pub node_id: String,
    /// Generation (start time in ms).
    pub generation: u64,
    /// Gossip (UDP) address.
    pub gossip_addr: String,
    /// Data (TCP) address.
    pub data_addr: String,
    /// Admin HTTP address, if served.
    pub admin_addr: Option<String>,
    /// Protocol version.
    pub protocol_version: String,
    /// `joining`, `active`, `leaving`.
    pub state: String,
    /// Seconds since the member started.
    pub uptime_s: u64,
    /// True for the master.
    pub is_master: bool,
    /// User attributes.
    pub attributes: BTreeMap<String, String>,
}

/// The answering member's own state and effective configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LocalStats {
    /// Its life-cycle state.
    pub state: String,
    /// Whether `/health` answers 200.
    pub healthy: bool,
    /// Why it is not healthy, if it is not.
    pub health_reason: Option<String>,
    /// Whether replication has settled as far as this member can tell: it holds the newest
    /// table, that table is the balanced plan for the eligible members (nothing left to migrate),
    /// and the backups of every partition it owns have confirmed their data.
    #[serde(default)]
    pub settled: bool,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// The effective runtime configuration.
    pub config: RuntimeConfig,
}

/// The effective configuration of a running member: ports as bound, timers as used.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConfig {
    /// The interface address listened on (`0.0.0.0` = all).
    pub bind: String,
    /// The address advertised to other members.
    pub public_address: String,
    /// The port bound for data (TCP) and gossip (UDP).
    pub port: u16,
    /// The port range the member could use.
    pub port_range: String,
    /// The admin address bound, if any.
    pub admin_addr: Option<String>,
    /// The discovery mechanism.
    pub discovery: String,
    /// The configured member list.
    pub members: Vec<String>,
    /// Gossip interval.
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold.
    pub phi_threshold: f64,
    /// Expected time to declare a silent member dead.
    pub failure_detection_ms: u64,
    /// How long dead members are remembered.
    pub dead_member_grace_s: u64,
    /// How long a starting member looks for the cluster.
    pub join_timeout_ms: u64,
    /// How often absent listed members are probed.
    pub probe_interval_ms: u64,
    /// Split-brain merge: delay after start-up before the first look for other groups.
    #[serde(default)]
    pub merge_first_run_delay_s: f64,
    /// Split-brain merge: delay between later looks.
    #[serde(default)]
    pub merge_run_delay_s: f64,
    /// Whether near caches are kept fresh by invalidation events.
    pub event_invalidation: bool,
}

/// Adds `b`'s counters to `a` (the near caches of one map on several members).
pub(crate) fn add_near_cache(a: &mut NearCacheStats, b: &NearCacheStats) {
    a.entries += b.entries;
    a.hits += b.hits;
    a.misses += b.misses;
    a.invalidations += b.invalidations;
    a.purges += b.purges;
}
