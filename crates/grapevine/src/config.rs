//! The member configuration: every key, its default, and validation that names the key at fault.
//!
//! Keys and defaults are documented for operators in `config/grapevine.toml`; a test keeps that
//! file and [`Config::default`] in step. Durations carry their unit in the key name.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use grapevine_discovery::mdns::{CLUSTER_NAME_BYTES_MAX, InterfaceSpec};
use grapevine_discovery::{SeedSpec, parse_member_list};
use grapevine_map::{InvalidationSettings, MapSettings, RELIABLE_TOPIC_MAP_PREFIX};
pub use grapevine_map::{MapConfig, NearCacheConfig};
use grapevine_topic::TopicSettings;
pub use grapevine_topic::{OverloadPolicy, ReliableTopicConfig, TopicConfig};
use serde::{Deserialize, Deserializer, Serialize};

/// A member's whole configuration. `Default` gives the documented defaults, with an empty
/// cluster name that [`Config::validate`] rejects: every member must name its cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Members join only members with the same cluster name. Required.
    pub cluster_name: String,
    /// This member's id, unique in the cluster. Default: `<hostname>-<port>`, or
    /// `<hostname>-<bind>-<port>` when `bind` names an address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The interface address to listen on and advertise. Default: listen on every interface and
    /// advertise the source address that reaches the lowest address `members` resolves to
    /// (127.0.0.1 with no members, or when that address is a loopback address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    /// The address other members should use to reach this one, when it differs from `bind`
    /// (NAT, containers). Default: derived as described for `bind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_address: Option<IpAddr>,
    /// The member's TCP (data) and UDP (gossip) port. Default 5701. 0 picks any free port (for
    /// tests and embedders; peers then need `members` entries with explicit ports).
    pub port: u16,
    /// When `port` is taken, try the next ones, up to `port_count` ports. Default true.
    pub port_auto_increment: bool,
    /// How many ports the range holds, `port` included. Default 100.
    pub port_count: u16,
    /// Serve the admin HTTP endpoint (health, stats, metrics, operator routes). Default true.
    pub admin_enabled: bool,
    /// The interface address of the admin endpoint. Default: the same as `bind`. The admin routes
    /// can read and write data: keep this port on a management network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_bind: Option<IpAddr>,
    /// The admin HTTP port; it auto-increments like `port`. Default 5801. 0 picks any free port.
    pub admin_port: u16,
    /// Serve the Redis protocol (RESP2/RESP3) on `resp_port`. Default true. The endpoint is
    /// started by the `grapevine` binary (or by an embedder with `grapevine_resp::serve`).
    pub resp_enabled: bool,
    /// The interface address of the RESP endpoint. Default: the same as `bind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resp_bind: Option<IpAddr>,
    /// The RESP port; it auto-increments like `port`. Default 6701. 0 picks any free port.
    pub resp_port: u16,
    /// The map RESP commands use until a connection picks another with `GV.SELECT`. Default
    /// `default`.
    pub resp_default_map: String,
    /// Limits of the RESP endpoint.
    pub resp: RespLimits,
    /// Limits of the admin endpoint: connections, header and body timeouts.
    pub admin: AdminSettings,
    /// Static discovery: `host`, `host:port` or `host:first-last` entries (a bare host means the
    /// whole port range). Empty: a single-node cluster. Accepts a TOML array or a comma-separated
    /// string (as in `--members` and `GRAPEVINE_MEMBERS`).
    #[serde(deserialize_with = "member_list")]
    pub members: Vec<String>,
    /// How often host names in `members` are resolved again, in seconds. Default 30.
    pub member_refresh_seconds: u64,
    /// How members find each other: `static` (the `members` list; the default) or `mdns`
    /// (multicast DNS on the local network). Exactly one: `mdns` with `members` is an error.
    pub discovery: DiscoveryMode,
    /// mDNS: the interfaces to announce and browse on, by name (`eth1`) or address. Default
    /// (empty): the interface holding `bind`, or every interface that is up except loopback when
    /// `bind` is unset. A TOML array or a comma-separated string.
    #[serde(deserialize_with = "member_list")]
    pub mdns_interfaces: Vec<String>,
    /// mDNS: how often a member queries the network again, so that members that missed each other
    /// are found, in ms. Default 10000.
    pub mdns_query_interval_ms: u64,
    /// How long a graceful shutdown waits for the hand-over of this member's partitions, in
    /// seconds; then it leaves anyway, logging what was not handed over. Default 120.
    pub shutdown_timeout_seconds: u64,
    /// Members of this cluster found in another group (a healed network split, groups formed
    /// apart at start-up) are not merged before this member has run this long, in seconds.
    /// Default 20.
    pub merge_first_run_delay_seconds: f64,
    /// ... and not before they have been visible without a break for this long, in seconds, so
    /// that a flapping link does not merge and split the groups over and over. Default 10.
    pub merge_run_delay_seconds: f64,
    /// `text` or `json` (one JSON object per line). Default text. The level comes from `RUST_LOG`.
    pub log_format: LogFormat,
    /// Gossip and failure detection.
    pub gossip: GossipSettings,
    /// The data plane (TCP between members).
    pub net: NetSettings,
    /// Partitions, replication and migration.
    pub partitions: PartitionSettings,
    /// Per-map settings: `[maps.sessions]`; `[maps.default]` applies to maps without a section.
    pub maps: BTreeMap<String, MapConfig>,
    /// Near caches are kept fresh by the owners' invalidation events (the seed's
    /// `eventInvalidation`). false: owners send none and near-cached entries only expire by their
    /// `ttl_seconds`, which must then be set. The same on every member. Default true.
    pub event_invalidation: bool,
    /// Batching and position reports of invalidation events.
    pub invalidation: InvalidationConfig,
    /// Per-topic settings: `[topics.news]`; `[topics.default]` applies to topics without a section.
    pub topics: BTreeMap<String, TopicConfig>,
    /// Per-reliable-topic settings: `[reliable_topics.orders]`; `[reliable_topics.default]`
    /// applies to reliable topics without a section. The same on every member.
    pub reliable_topics: BTreeMap<String, ReliableTopicConfig>,
    /// Free-form attributes published with the member (e.g. `zone = "eu-1"`).
    pub attributes: BTreeMap<String, String>,
}

/// Gossip and failure-detection timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipSettings {
    /// Time between gossip rounds, in milliseconds. Default 1000.
    pub interval_ms: u64,
    /// Phi-accrual threshold: a silent member is declared dead after `phi_threshold` times the
    /// mean interval between its heartbeats, at most about (`phi_threshold` + 1) × `interval_ms`
    /// (9 s with the defaults). Default 8.0.
    pub phi_threshold: f64,
    /// How long a dead member's state is remembered, in seconds. Default 900.
    pub dead_member_grace_seconds: u64,
    /// How long a starting member looks for the cluster before it runs alone, in ms. Default 5000.
    pub join_timeout_ms: u64,
    /// How often listed members that are not in the cluster are probed, in ms. Default 2000.
    pub probe_interval_ms: u64,
}

/// Data-plane settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetSettings {
    /// Largest message between members, in bytes; a larger value is refused with an error.
    /// Default 16 MiB.
    pub frame_bytes_max: usize,
    /// How long to wait for a TCP connection to a member, in ms. Default 5000.
    pub connect_timeout_ms: u64,
    /// Local ports for outgoing connections, `first-last` (for firewalls that filter source
    /// ports). Default: any (the system picks ephemeral ports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_ports: Option<String>,
}

/// Limits of the RESP endpoint: every request is checked against them before anything is
/// allocated for it; a request over a limit gets an error and its connection is closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RespLimits {
    /// Client connections served at once; one more gets `-ERR max number of clients reached`.
    /// Default 10000.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed, in seconds (0: never). Default 300.
    pub idle_timeout_seconds: u64,
    /// Largest bulk string (key or value) in a request, in bytes. Default 16 MiB (values must fit
    /// `net.frame_bytes_max` to reach backups anyway).
    pub max_bulk_bytes: usize,
    /// Most arguments in one request. Default 1048576.
    pub max_array_len: usize,
    /// Longest inline (telnet-style) request line, in bytes. Default 65536.
    pub max_inline_bytes: usize,
    /// Largest request (all its bulk strings), in bytes. Default 64 MiB.
    pub max_request_bytes: usize,
}

impl Default for RespLimits {
    fn default() -> Self {
        RespLimits {
            max_connections: 10_000,
            idle_timeout_seconds: 300,
            max_bulk_bytes: 16 << 20,
            max_array_len: 1 << 20,
            max_inline_bytes: 64 << 10,
            max_request_bytes: 64 << 20,
        }
    }
}

/// Limits of the admin HTTP endpoint, so that slow or numerous clients cannot tie it up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Connections served at once; further ones wait in the listen backlog until one closes.
    /// Default 64.
    pub connections_max: usize,
    /// How long a client may take to send a request's headers (also how long an idle keep-alive
    /// connection stays open), in ms; then the connection is closed. Default 5000.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's body, from the end of its headers, in ms;
    /// then it gets 408 and the connection is closed. Default 10000.
    pub body_read_timeout_ms: u64,
    /// How long `POST /master/handover` waits for this member to see the new master, in ms; then
    /// it answers 504 (the hand-over may still complete). Default 30000.
    pub handover_timeout_ms: u64,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            connections_max: 64,
            header_read_timeout_ms: 5_000,
            body_read_timeout_ms: 10_000,
            handover_timeout_ms: 30_000,
        }
    }
}

/// The longest admin timeout accepted: one day.
const ADMIN_TIMEOUT_MS_MAX: u64 = 86_400_000;

/// The largest `min_cluster_size` accepted (no cluster gets near it; a larger value is a typo).
const MIN_CLUSTER_SIZE_MAX: u32 = 1024;

/// Partition and replication settings. `count` must be the same on every member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionSettings {
    /// Number of partitions. Default 271. The same on every member.
    pub count: u32,
    /// How long a map operation may take, retries included, in ms. Default 30000. Keep it above
    /// the failure-detection time so operations survive an owner's death.
    pub operation_timeout_ms: u64,
    /// How long an owner waits for synchronous backups to acknowledge a write, in ms. Default 5000.
    pub backup_ack_timeout_ms: u64,
    /// How often owners compare versions with their backups, in ms. Default 5000.
    pub anti_entropy_interval_ms: u64,
    /// How often expired entries are swept, in ms. Default 1000.
    pub expiry_sweep_interval_ms: u64,
    /// Partitions the master migrates at once. Default 8.
    pub migration_parallelism: usize,
    /// How long one partition's migration may take, in ms. Default 60000.
    pub migration_timeout_ms: u64,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings { frame_bytes_max: 16 << 20, connect_timeout_ms: 5000, outbound_ports: None }
    }
}

impl Default for PartitionSettings {
    fn default() -> Self {
        PartitionSettings {
            count: 271,
            operation_timeout_ms: 30_000,
            backup_ack_timeout_ms: 5_000,
            anti_entropy_interval_ms: 5_000,
            expiry_sweep_interval_ms: 1_000,
            migration_parallelism: 8,
            migration_timeout_ms: 60_000,
        }
    }
}

/// How members find each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryMode {
    /// The static `members` list (empty: a single-node cluster).
    #[default]
    Static,
    /// Multicast DNS (`_grapevine._udp.local.`) on the local network.
    Mdns,
}

impl fmt::Display for DiscoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiscoveryMode::Static => "static",
            DiscoveryMode::Mdns => "mdns",
        })
    }
}

/// The most entries `mdns_interfaces` may have.
const MDNS_INTERFACES_MAX: usize = 64;

/// Batching and position reports of the near caches' invalidation events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InvalidationConfig {
    /// An owner sends a member's pending invalidations once this many are queued. Default 100.
    pub batch_size: usize,
    /// ... or once the oldest has waited this long, in ms. Default 10.
    pub batch_delay_ms: u64,
    /// How often owners send near-caching members the position of each partition they own, in
    /// ms. A near cache purges a partition whose position is ahead of the events it received, and
    /// those of an owner silent for three intervals. Default 1000.
    pub heartbeat_ms: u64,
}

impl Default for InvalidationConfig {
    fn default() -> Self {
        InvalidationConfig { batch_size: 100, batch_delay_ms: 10, heartbeat_ms: 1000 }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster_name: String::new(),
            node_id: None,
            bind: None,
            public_address: None,
            port: 5701,
            port_auto_increment: true,
            port_count: 100,
            admin_enabled: true,
            admin_bind: None,
            admin_port: 5801,
            resp_enabled: true,
            resp_bind: None,
            resp_port: 6701,
            resp_default_map: "default".to_string(),
            resp: RespLimits::default(),
            admin: AdminSettings::default(),
            members: Vec::new(),
            member_refresh_seconds: 30,
            discovery: DiscoveryMode::Static,
            mdns_interfaces: Vec::new(),
            mdns_query_interval_ms: 10_000,
            shutdown_timeout_seconds: 120,
            merge_first_run_delay_seconds: 20.0,
            merge_run_delay_seconds: 10.0,
            log_format: LogFormat::Text,
            gossip: GossipSettings::default(),
            net: NetSettings::default(),
            partitions: PartitionSettings::default(),
            maps: BTreeMap::new(),
            event_invalidation: true,
            invalidation: InvalidationConfig::default(),
            topics: BTreeMap::new(),
            reliable_topics: BTreeMap::new(),
            attributes: BTreeMap::new(),
        }
    }
}

impl Default for GossipSettings {
    fn default() -> Self {
        GossipSettings {
            interval_ms: 1000,
            phi_threshold: 8.0,
            dead_member_grace_seconds: 900,
            join_timeout_ms: 5000,
            probe_interval_ms: 2000,
        }
    }
}

/// A configuration value that is not acceptable. Names the key, says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration key `{key}`: {message}")]
pub struct ConfigError {
    /// The key, dotted for nested keys (`gossip.interval_ms`).
    pub key: String,
    /// What was wrong and what is expected.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl fmt::Display) -> Self {
        ConfigError { key: key.into(), message: message.to_string() }
    }
}

impl Config {
    /// A default configuration for `cluster_name`.
    pub fn new(cluster_name: impl Into<String>) -> Self {
        Config { cluster_name: cluster_name.into(), ..Config::default() }
    }

    /// Checks every key. Returns warnings for values that are accepted but adjusted (backup counts
    /// above 6 are clamped, see [`Config::normalized`]); errors name the key and what is expected.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let mut warnings = Vec::new();
        let name = self.cluster_name.trim();
        if name.is_empty() {
            return Err(ConfigError::new(
                "cluster_name",
                "must not be empty: every member names its cluster (--cluster-name NAME, GRAPEVINE_CLUSTER_NAME)",
            ));
        }
        if name != self.cluster_name || self.cluster_name.len() > 255 || self.cluster_name.chars().any(char::is_control)
        {
            return Err(ConfigError::new(
                "cluster_name",
                "must be 1 to 255 characters without leading or trailing spaces or control characters",
            ));
        }
        if let Some(node_id) = &self.node_id
            && (node_id.is_empty()
                || node_id.len() > 128
                || node_id.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == ','))
        {
            // `/` and `,` separate fields and list entries in gossip keys (hand-over requests,
            // data-plane reports).
            return Err(ConfigError::new(
                "node_id",
                format!("{node_id:?} is not a valid node id: use 1 to 128 characters without spaces, `/` or `,`"),
            ));
        }
        for (key, value) in [
            ("merge_first_run_delay_seconds", self.merge_first_run_delay_seconds),
            ("merge_run_delay_seconds", self.merge_run_delay_seconds),
        ] {
            if !(0.0..=86_400.0).contains(&value) {
                return Err(ConfigError::new(key, format!("{value} is not between 0 and 86400 seconds")));
            }
        }
        check_port_range("port", self.port, self.port_count)?;
        check_port_range("admin_port", self.admin_port, self.port_count)?;
        check_port_range("resp_port", self.resp_port, self.port_count)?;
        let map = &self.resp_default_map;
        if map.is_empty() || map.len() > 255 || map.chars().any(char::is_control) {
            return Err(ConfigError::new("resp_default_map", "map names must be 1 to 255 printable characters"));
        }
        let r = &self.resp;
        for (key, value, min) in [
            ("resp.max_connections", r.max_connections, 1),
            ("resp.max_bulk_bytes", r.max_bulk_bytes, 1024),
            ("resp.max_array_len", r.max_array_len, 16),
            ("resp.max_inline_bytes", r.max_inline_bytes, 1024),
            ("resp.max_request_bytes", r.max_request_bytes, 1024),
        ] {
            if value < min {
                return Err(ConfigError::new(key, format!("must be at least {min}")));
            }
        }
        if r.max_request_bytes < r.max_bulk_bytes {
            return Err(ConfigError::new(
                "resp.max_request_bytes",
                format!("must be at least resp.max_bulk_bytes ({})", r.max_bulk_bytes),
            ));
        }
        if self.public_address.is_some_and(|ip| ip.is_unspecified()) {
            return Err(ConfigError::new(
                "public_address",
                "must be an address other members can reach, not 0.0.0.0 or ::",
            ));
        }
        self.seeds().map_err(|e| ConfigError::new("members", e))?;
        if self.discovery == DiscoveryMode::Mdns {
            if !self.members.is_empty() {
                return Err(ConfigError::new(
                    "discovery",
                    "`discovery = \"mdns\"` and a static `members` list are mutually exclusive: remove `members` \
                     (mDNS finds the members) or set `discovery = \"static\"`",
                ));
            }
            if self.cluster_name.len() > CLUSTER_NAME_BYTES_MAX {
                return Err(ConfigError::new(
                    "cluster_name",
                    format!(
                        "with `discovery = \"mdns\"` it must be at most {CLUSTER_NAME_BYTES_MAX} bytes: it travels in \
                         a DNS TXT string of 255"
                    ),
                ));
            }
        } else if !self.mdns_interfaces.is_empty() {
            warnings.push(format!(
                "`mdns_interfaces` is set but `discovery` is \"{}\": it is ignored (set `discovery = \"mdns\"` to use it)",
                self.discovery
            ));
        }
        self.mdns_interface_specs().map_err(|m| ConfigError::new("mdns_interfaces", m))?;
        if !(100..=3_600_000).contains(&self.mdns_query_interval_ms) {
            return Err(ConfigError::new(
                "mdns_query_interval_ms",
                "must be between 100 and 3600000 milliseconds (default 10000)",
            ));
        }
        let a = &self.admin;
        if !(1..=65_536).contains(&a.connections_max) {
            return Err(ConfigError::new("admin.connections_max", "must be between 1 and 65536 (default 64)"));
        }
        for (key, value) in [
            ("admin.header_read_timeout_ms", a.header_read_timeout_ms),
            ("admin.body_read_timeout_ms", a.body_read_timeout_ms),
            ("admin.handover_timeout_ms", a.handover_timeout_ms),
        ] {
            if !(1..=ADMIN_TIMEOUT_MS_MAX).contains(&value) {
                return Err(ConfigError::new(key, "must be between 1 and 86400000 milliseconds (one day)"));
            }
        }
        if self.member_refresh_seconds == 0 {
            return Err(ConfigError::new("member_refresh_seconds", "must be at least 1"));
        }
        let g = &self.gossip;
        if !(10..=60_000).contains(&g.interval_ms) {
            return Err(ConfigError::new("gossip.interval_ms", "must be between 10 and 60000 milliseconds"));
        }
        if !(g.phi_threshold.is_finite() && g.phi_threshold >= 1.0 && g.phi_threshold <= 100.0) {
            return Err(ConfigError::new("gossip.phi_threshold", "must be a number between 1 and 100 (default 8)"));
        }
        if g.probe_interval_ms < 10 {
            return Err(ConfigError::new("gossip.probe_interval_ms", "must be at least 10 milliseconds"));
        }
        if g.dead_member_grace_seconds == 0 {
            return Err(ConfigError::new("gossip.dead_member_grace_seconds", "must be at least 1"));
        }
        let n = &self.net;
        if !(64 << 10..=1 << 30).contains(&n.frame_bytes_max) {
            return Err(ConfigError::new(
                "net.frame_bytes_max",
                "must be between 65536 (64 KiB) and 1073741824 (1 GiB)",
            ));
        }
        if n.connect_timeout_ms == 0 {
            return Err(ConfigError::new("net.connect_timeout_ms", "must be at least 1"));
        }
        self.outbound_ports().map_err(|m| ConfigError::new("net.outbound_ports", m))?;
        let p = &self.partitions;
        if !(1..=65_535).contains(&p.count) {
            return Err(ConfigError::new("partitions.count", "must be between 1 and 65535 (default 271)"));
        }
        for (key, value) in [
            ("partitions.operation_timeout_ms", p.operation_timeout_ms),
            ("partitions.backup_ack_timeout_ms", p.backup_ack_timeout_ms),
            ("partitions.anti_entropy_interval_ms", p.anti_entropy_interval_ms),
            ("partitions.expiry_sweep_interval_ms", p.expiry_sweep_interval_ms),
            ("partitions.migration_timeout_ms", p.migration_timeout_ms),
        ] {
            if value < 10 {
                return Err(ConfigError::new(key, "must be at least 10 milliseconds"));
            }
        }
        if !(1..=1024).contains(&p.migration_parallelism) {
            return Err(ConfigError::new("partitions.migration_parallelism", "must be between 1 and 1024"));
        }
        for (name, map) in &self.maps {
            if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    format!("maps.{name}"),
                    "map names must be 1 to 255 printable characters",
                ));
            }
            if map.min_cluster_size > MIN_CLUSTER_SIZE_MAX {
                return Err(ConfigError::new(
                    format!("maps.{name}.min_cluster_size"),
                    format!(
                        "{} is more members than a cluster can have: use 0 (off) to {MIN_CLUSTER_SIZE_MAX}, \
                         typically a majority of the cluster (2 of 3, 3 of 5)",
                        map.min_cluster_size
                    ),
                ));
            }
            if name.starts_with(RELIABLE_TOPIC_MAP_PREFIX) {
                return Err(ConfigError::new(
                    format!("maps.{name}"),
                    format!(
                        "map names starting with {RELIABLE_TOPIC_MAP_PREFIX:?} are reserved for reliable topics; configure them in [reliable_topics.NAME]"
                    ),
                ));
            }
            if let Some(near) = &map.near_cache {
                let key = |k: &str| format!("maps.{name}.near_cache.{k}");
                if !(1..=1 << 32).contains(&near.max_entries) {
                    return Err(ConfigError::new(
                        key("max_entries"),
                        "must be between 1 and 4294967296 (default 10000)",
                    ));
                }
                if near.ttl_seconds > 365 * 86_400 {
                    return Err(ConfigError::new(key("ttl_seconds"), "must be at most a year (31536000)"));
                }
                let by_events = self.event_invalidation && near.invalidate_on_change;
                if !by_events && near.ttl_seconds == 0 {
                    return Err(ConfigError::new(
                        key("ttl_seconds"),
                        "must be above 0 when event_invalidation or invalidate_on_change is false: entries would \
                         never be refreshed",
                    ));
                }
            }
            warnings.extend(map.clone().clamp(name));
        }
        let i = &self.invalidation;
        if !(1..=100_000).contains(&i.batch_size) {
            return Err(ConfigError::new("invalidation.batch_size", "must be between 1 and 100000 (default 100)"));
        }
        if !(1..=10_000).contains(&i.batch_delay_ms) {
            return Err(ConfigError::new("invalidation.batch_delay_ms", "must be between 1 and 10000 milliseconds"));
        }
        if !(10..=60_000).contains(&i.heartbeat_ms) {
            return Err(ConfigError::new("invalidation.heartbeat_ms", "must be between 10 and 60000 milliseconds"));
        }
        for (name, topic) in &self.topics {
            grapevine_topic::check_name(name).map_err(|m| ConfigError::new(format!("topics.{name}"), m))?;
            grapevine_topic::validate_topic(name, topic).map_err(|(k, m)| ConfigError::new(k, m))?;
        }
        for (name, topic) in &self.reliable_topics {
            grapevine_topic::check_name(name).map_err(|m| ConfigError::new(format!("reliable_topics.{name}"), m))?;
            grapevine_topic::validate_reliable_topic(name, topic).map_err(|(k, m)| ConfigError::new(k, m))?;
        }
        for key in self.attributes.keys() {
            if key.is_empty() || key.contains(':') || key.chars().any(char::is_whitespace) {
                return Err(ConfigError::new(
                    format!("attributes.{key}"),
                    "attribute names must be non-empty, without spaces or `:`",
                ));
            }
        }
        Ok(warnings)
    }

    /// The ports this member may use: `port` alone, or the auto-increment range.
    pub fn port_range(&self) -> RangeInclusive<u16> {
        range_of(self.port, if self.port_auto_increment { self.port_count } else { 1 })
    }

    /// The admin ports this member may use.
    pub fn admin_port_range(&self) -> RangeInclusive<u16> {
        range_of(self.admin_port, if self.port_auto_increment { self.port_count } else { 1 })
    }

    /// The RESP ports this member may use.
    pub fn resp_port_range(&self) -> RangeInclusive<u16> {
        range_of(self.resp_port, if self.port_auto_increment { self.port_count } else { 1 })
    }

    /// The parsed member list. A bare host means every port of the range other members may use:
    /// `port` to `port + port_count - 1`.
    pub fn seeds(&self) -> Result<Vec<SeedSpec>, grapevine_discovery::DiscoveryError> {
        // With port 0 (any free port) a bare host cannot name a range: use the default one.
        let first = if self.port == 0 { Config::default().port } else { self.port };
        parse_member_list(&self.members.join(","), range_of(first, self.port_count))
    }

    /// The parsed `mdns_interfaces`.
    pub fn mdns_interface_specs(&self) -> Result<Vec<InterfaceSpec>, String> {
        if self.mdns_interfaces.len() > MDNS_INTERFACES_MAX {
            return Err(format!("at most {MDNS_INTERFACES_MAX} interfaces may be listed"));
        }
        self.mdns_interfaces.iter().map(|entry| InterfaceSpec::parse(entry)).collect()
    }

    /// The configuration with adjustments applied (backup counts clamped to 6).
    pub fn normalized(&self) -> Config {
        let mut config = self.clone();
        for (name, map) in &mut config.maps {
            map.clamp(name);
        }
        config
    }

    /// The parsed `net.outbound_ports` range.
    pub fn outbound_ports(&self) -> Result<Option<RangeInclusive<u16>>, String> {
        let Some(spec) = self.net.outbound_ports.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let expected = || format!("{spec:?} is not a port range: expected `first-last`, e.g. `33000-33100`");
        let (first, last) = spec.split_once('-').ok_or_else(expected)?;
        let first: u16 = first.trim().parse().map_err(|_| expected())?;
        let last: u16 = last.trim().parse().map_err(|_| expected())?;
        if first == 0 || first > last {
            return Err(expected());
        }
        Ok(Some(first..=last))
    }

    /// The map service settings derived from this configuration.
    pub fn map_settings(&self) -> MapSettings {
        let p = &self.partitions;
        let ms = Duration::from_millis;
        MapSettings {
            partition_count: p.count,
            operation_timeout: ms(p.operation_timeout_ms),
            backup_ack_timeout: ms(p.backup_ack_timeout_ms),
            anti_entropy_interval: ms(p.anti_entropy_interval_ms),
            expiry_sweep_interval: ms(p.expiry_sweep_interval_ms),
            migration_parallelism: p.migration_parallelism,
            migration_timeout: ms(p.migration_timeout_ms),
            maps: self.map_configs(),
            invalidation: InvalidationSettings {
                enabled: self.event_invalidation,
                batch_size: self.invalidation.batch_size,
                batch_delay: ms(self.invalidation.batch_delay_ms),
                heartbeat_interval: ms(self.invalidation.heartbeat_ms),
            },
        }
    }

    /// Every map's settings: the `[maps]` sections, and the ring buffer maps of the reliable
    /// topics (`__topic:<name>`, with the topic's backup counts).
    fn map_configs(&self) -> BTreeMap<String, MapConfig> {
        let mut maps = self.normalized().maps;
        // Without `[reliable_topics.default]` the map crate's defaults apply: one synchronous
        // backup, as a reliable topic's.
        for (name, topic) in &self.reliable_topics {
            let ring = MapConfig {
                backup_count: topic.backup_count,
                async_backup_count: topic.async_backup_count,
                ..MapConfig::default()
            };
            maps.insert(format!("{RELIABLE_TOPIC_MAP_PREFIX}{name}"), ring);
        }
        maps
    }

    /// The topic service settings derived from this configuration.
    pub fn topic_settings(&self) -> TopicSettings {
        TopicSettings {
            topics: self.topics.clone(),
            reliable_topics: self.reliable_topics.clone(),
            operation_timeout: Duration::from_millis(self.partitions.operation_timeout_ms),
        }
    }

    /// Gossip interval as a duration.
    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip.interval_ms)
    }
}

fn range_of(first: u16, count: u16) -> RangeInclusive<u16> {
    let last = u32::from(first) + u32::from(count.max(1)) - 1;
    first..=u16::try_from(last).unwrap_or(u16::MAX)
}

fn check_port_range(key: &str, port: u16, count: u16) -> Result<(), ConfigError> {
    if count == 0 || count > 1024 {
        return Err(ConfigError::new("port_count", "must be between 1 and 1024"));
    }
    if u32::from(port) + u32::from(count) - 1 > u32::from(u16::MAX) {
        return Err(ConfigError::new(key, format!("{port} + port_count {count} runs past port 65535")));
    }
    Ok(())
}

/// Accepts `["a", "b"]` or `"a,b"`.
fn member_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Members {
        List(Vec<String>),
        Text(String),
    }
    let entries = match Members::deserialize(deserializer)? {
        Members::List(list) => list,
        Members::Text(text) => text.split(',').map(str::to_string).collect(),
    };
    Ok(entries.into_iter().map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config::new("demo")
    }

    #[test]
    fn the_default_with_a_name_is_valid() {
        assert_eq!(valid().validate(), Ok(vec![]));
        assert_eq!(valid().port_range(), 5701..=5800);
        assert_eq!(valid().admin_port_range(), 5801..=5900);
        assert_eq!(valid().resp_port_range(), 6701..=6800);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(Config, &str)> = vec![
            (Config::default(), "cluster_name"),
            (Config { cluster_name: " x".into(), ..valid() }, "cluster_name"),
            (Config { node_id: Some("a b".into()), ..valid() }, "node_id"),
            // A comma would split the node id in the data-plane report keys (found by fuzzing).
            (Config { node_id: Some("a,b".into()), ..valid() }, "node_id"),
            (Config { port: 65500, ..valid() }, "port"),
            (Config { port_count: 0, ..valid() }, "port_count"),
            (Config { members: vec!["10.0.0.1:99999".into()], ..valid() }, "members"),
            (Config { discovery: DiscoveryMode::Mdns, members: vec!["10.0.0.1".into()], ..valid() }, "discovery"),
            (Config { discovery: DiscoveryMode::Mdns, cluster_name: "c".repeat(248), ..valid() }, "cluster_name"),
            (Config { mdns_interfaces: vec!["not an interface".into()], ..valid() }, "mdns_interfaces"),
            (Config { mdns_interfaces: vec!["0.0.0.0".into()], ..valid() }, "mdns_interfaces"),
            (Config { mdns_query_interval_ms: 0, ..valid() }, "mdns_query_interval_ms"),
            (
                Config { gossip: GossipSettings { interval_ms: 1, ..Default::default() }, ..valid() },
                "gossip.interval_ms",
            ),
            (
                Config { gossip: GossipSettings { phi_threshold: f64::NAN, ..Default::default() }, ..valid() },
                "gossip.phi_threshold",
            ),
            (Config { public_address: Some("0.0.0.0".parse().unwrap()), ..valid() }, "public_address"),
            (Config { resp_port: 65535, ..valid() }, "resp_port"),
            (Config { resp_default_map: String::new(), ..valid() }, "resp_default_map"),
            (
                Config { resp: RespLimits { max_connections: 0, ..Default::default() }, ..valid() },
                "resp.max_connections",
            ),
            (
                Config { admin: AdminSettings { connections_max: 0, ..Default::default() }, ..valid() },
                "admin.connections_max",
            ),
            (
                Config { admin: AdminSettings { header_read_timeout_ms: 0, ..Default::default() }, ..valid() },
                "admin.header_read_timeout_ms",
            ),
            (
                Config { admin: AdminSettings { body_read_timeout_ms: 0, ..Default::default() }, ..valid() },
                "admin.body_read_timeout_ms",
            ),
            (
                Config { admin: AdminSettings { body_read_timeout_ms: u64::MAX, ..Default::default() }, ..valid() },
                "admin.body_read_timeout_ms",
            ),
            (Config { merge_first_run_delay_seconds: -1.0, ..valid() }, "merge_first_run_delay_seconds"),
            (Config { merge_run_delay_seconds: f64::NAN, ..valid() }, "merge_run_delay_seconds"),
            (Config { merge_run_delay_seconds: 86_401.0, ..valid() }, "merge_run_delay_seconds"),
            (
                Config {
                    maps: [("sessions".to_string(), MapConfig { min_cluster_size: 5000, ..Default::default() })].into(),
                    ..valid()
                },
                "maps.sessions.min_cluster_size",
            ),
        ];
        for (config, key) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(err.to_string().contains(key));
        }
    }

    #[test]
    fn members_accept_a_list_or_a_comma_separated_string() {
        let from_list: Config = toml::from_str("cluster_name = 'x'\nmembers = ['a', 'b:1']").unwrap();
        let from_text: Config = toml::from_str("cluster_name = 'x'\nmembers = 'a, b:1,'").unwrap();
        assert_eq!(from_list.members, vec!["a", "b:1"]);
        assert_eq!(from_text.members, from_list.members);
    }

    #[test]
    fn mdns_is_exclusive_with_members_and_its_interfaces_take_names_or_addresses() {
        let err = Config { discovery: DiscoveryMode::Mdns, members: vec!["10.0.0.1".into()], ..valid() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("mutually exclusive") && err.contains("`members`"), "{err}");
        let config: Config =
            toml::from_str("cluster_name = 'x'\ndiscovery = 'mdns'\nmdns_interfaces = 'eth1, 10.0.0.5'").unwrap();
        assert_eq!(config.validate(), Ok(vec![]));
        assert_eq!(
            config.mdns_interface_specs().unwrap(),
            vec![InterfaceSpec::Name("eth1".into()), InterfaceSpec::Addr("10.0.0.5".parse().unwrap())]
        );
        assert!(toml::from_str::<Config>("cluster_name = 'x'\ndiscovery = 'multicast'").is_err());
        // Interfaces without mDNS are accepted with a warning (a shared file may set them).
        let warnings = Config { mdns_interfaces: vec!["eth1".into()], ..valid() }.validate().unwrap();
        assert!(warnings.len() == 1 && warnings[0].contains("ignored"), "{warnings:?}");
    }

    #[test]
    fn backup_counts_above_six_are_clamped_with_a_warning() {
        let config: Config =
            toml::from_str("cluster_name = 'x'\n[maps.sessions]\nbackup_count = 9\nmax_idle_seconds = 1800").unwrap();
        let warnings = config.validate().unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("maps.sessions.backup_count"), "{warnings:?}");
        let settings = config.map_settings();
        assert_eq!(settings.map("sessions").backup_count, 6);
        assert_eq!(settings.map("sessions").max_idle_seconds, 1800);
        assert_eq!(settings.map("other").backup_count, 1, "maps without a section use the defaults");
    }

    #[test]
    fn more_than_six_backups_of_both_kinds_warn_and_keep_the_synchronous_ones() {
        let config: Config =
            toml::from_str("cluster_name = 'x'\n[maps.m]\nbackup_count = 4\nasync_backup_count = 4").unwrap();
        let warnings = config.validate().unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("maps.m.backup_count + async_backup_count = 4 + 4 = 8"), "{warnings:?}");
        assert!(warnings[0].contains("using 2 asynchronous"), "{warnings:?}");
        let settings = config.map_settings();
        assert_eq!((settings.map("m").backup_count, settings.map("m").async_backup_count), (4, 2));
        // Six in all is the maximum, accepted without a warning. Both above six: a warning for each
        // and one for the total, which leaves no asynchronous backup.
        let six: Config =
            toml::from_str("cluster_name = 'x'\n[maps.m]\nbackup_count = 2\nasync_backup_count = 4").unwrap();
        assert_eq!(six.validate().unwrap(), Vec::<String>::new());
        let both: Config =
            toml::from_str("cluster_name = 'x'\n[maps.m]\nbackup_count = 7\nasync_backup_count = 9").unwrap();
        assert_eq!(both.validate().unwrap().len(), 3);
        assert_eq!(both.map_settings().map("m").async_backup_count, 0);
    }

    #[test]
    fn near_caches_topics_and_reliable_topics_are_configured_and_checked() {
        let config: Config = toml::from_str(
            "cluster_name = 'x'\n\
             [maps.sessions.near_cache]\nmax_entries = 500\n\
             [invalidation]\nbatch_size = 10\nbatch_delay_ms = 2\nheartbeat_ms = 250\n\
             [topics.news]\nqueue_capacity = 16\n\
             [reliable_topics.orders]\ncapacity = 100\nbackup_count = 2\noverload_policy = 'discard_newest'\n",
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(vec![]));
        let settings = config.map_settings();
        let near = settings.map("sessions").near_cache.unwrap();
        assert_eq!((near.max_entries, near.ttl_seconds, near.invalidate_on_change), (500, 0, true));
        assert_eq!(settings.invalidation.batch_size, 10);
        assert_eq!(settings.invalidation.heartbeat_interval, Duration::from_millis(250));
        assert_eq!(settings.map("__topic:orders").backup_count, 2, "the ring buffer map has the topic's backups");
        assert_eq!(settings.map("__topic:other").backup_count, 1, "the default: one synchronous backup");
        let topics = config.topic_settings();
        assert_eq!(topics.topic("news").queue_capacity, 16);
        assert_eq!(topics.reliable_topic("orders").overload_policy, OverloadPolicy::DiscardNewest);
        assert_eq!(topics.reliable_topic("other").capacity, 10_000);

        let near = |ttl_seconds, invalidate_on_change| MapConfig {
            near_cache: Some(NearCacheConfig { ttl_seconds, invalidate_on_change, ..NearCacheConfig::default() }),
            ..MapConfig::default()
        };
        let with_map = |config: MapConfig, events: bool| {
            let mut c = valid();
            c.maps.insert("m".into(), config);
            c.event_invalidation = events;
            c
        };
        assert_eq!(with_map(near(0, true), true).validate(), Ok(vec![]));
        assert_eq!(with_map(near(0, true), false).validate().unwrap_err().key, "maps.m.near_cache.ttl_seconds");
        assert_eq!(with_map(near(0, false), true).validate().unwrap_err().key, "maps.m.near_cache.ttl_seconds");
        assert_eq!(with_map(near(5, false), false).validate(), Ok(vec![]));
        let mut reserved = valid();
        reserved.maps.insert("__topic:x".into(), MapConfig::default());
        assert_eq!(reserved.validate().unwrap_err().key, "maps.__topic:x");
        let mut bad = valid();
        bad.reliable_topics.insert("t".into(), ReliableTopicConfig { capacity: 0, ..Default::default() });
        assert_eq!(bad.validate().unwrap_err().key, "reliable_topics.t.capacity");
        let mut bad = valid();
        bad.topics.insert("t".into(), TopicConfig { queue_capacity: 0 });
        assert_eq!(bad.validate().unwrap_err().key, "topics.t.queue_capacity");
        let mut bad = valid();
        bad.invalidation.heartbeat_ms = 0;
        assert_eq!(bad.validate().unwrap_err().key, "invalidation.heartbeat_ms");
        let err = toml::from_str::<Config>("cluster_name = 'x'\n[reliable_topics.t]\noverload_policy = 'drop'")
            .unwrap_err()
            .to_string();
        assert!(err.contains("drop"), "{err}");
    }

    #[test]
    fn merge_policy_and_protection_reach_the_map_settings() {
        let config: Config = toml::from_str(
            "cluster_name = 'x'\nmerge_first_run_delay_seconds = 7\nmerge_run_delay_seconds = 3\n\
             [maps.sessions]\nmerge_policy = 'put-if-absent'\nmin_cluster_size = 2",
        )
        .unwrap();
        assert_eq!(config.validate(), Ok(vec![]));
        assert_eq!((config.merge_first_run_delay_seconds, config.merge_run_delay_seconds), (7.0, 3.0));
        let settings = config.map_settings();
        let sessions = settings.map("sessions");
        assert_eq!((sessions.merge_policy, sessions.min_cluster_size), (grapevine_map::MergePolicy::PutIfAbsent, 2));
        let other = settings.map("other");
        assert_eq!((other.merge_policy, other.min_cluster_size), (grapevine_map::MergePolicy::LatestUpdate, 0));
        for policy in grapevine_map::MergePolicy::ALL {
            let text = format!("cluster_name = 'x'\n[maps.m]\nmerge_policy = '{policy}'");
            let parsed: Config = toml::from_str(&text).unwrap();
            assert_eq!(parsed.maps["m"].merge_policy, policy, "the configuration name is the policy's name");
        }
        let err = toml::from_str::<Config>("cluster_name = 'x'\n[maps.m]\nmerge_policy = 'latest'").unwrap_err();
        let err = err.to_string();
        assert!(err.contains("merge_policy") && err.contains("latest-update"), "{err}");
    }

    #[test]
    fn outbound_ports_must_be_a_range() {
        let mut config = valid();
        config.net.outbound_ports = Some("33000-33100".into());
        assert_eq!(config.outbound_ports().unwrap(), Some(33000..=33100));
        config.net.outbound_ports = Some("33100-33000".into());
        assert_eq!(config.validate().unwrap_err().key, "net.outbound_ports");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("cluster_name = 'x'\nprot = 1").unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
        let err = toml::from_str::<Config>("cluster_name = 'x'\n[gossip]\ninterval = 1").unwrap_err().to_string();
        assert!(err.contains("interval"), "{err}");
    }
}
