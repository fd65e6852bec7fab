//! The member configuration: every key, its default, and validation that names the key at fault.
//!
//! Keys and defaults are documented for operators in `config/grapevine.toml`; a test keeps that
//! file and [`Config::default`] in step. Durations carry their unit in the key name.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use grapevine_discovery::{SeedSpec, parse_member_list};
use serde::{Deserialize, Deserializer, Serialize};

/// The highest backup count a map accepts (synchronous and asynchronous separately); larger values
/// are clamped with a warning, as Hazelcast does.
pub const BACKUP_COUNT_MAX: u8 = 6;

/// A member's whole configuration. `Default` gives the documented defaults, with an empty
/// cluster name that [`Config::validate`] rejects: every member must name its cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Members join only members with the same cluster name. Required.
    pub cluster_name: String,
    /// This member's id, unique in the cluster. Default: `<hostname>-<port>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The interface address to listen on and advertise. Default: listen on every interface and
    /// advertise the address that routes to the first listed member (127.0.0.1 with no members).
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
    /// Static discovery: `host`, `host:port` or `host:first-last` entries (a bare host means the
    /// whole port range). Empty: a single-node cluster. Accepts a TOML array or a comma-separated
    /// string (as in `--members` and `GRAPEVINE_MEMBERS`).
    #[serde(deserialize_with = "member_list")]
    pub members: Vec<String>,
    /// How often host names in `members` are resolved again, in seconds. Default 30.
    pub member_refresh_seconds: u64,
    /// How long a graceful shutdown may take before the member exits anyway. Default 120.
    pub shutdown_timeout_seconds: u64,
    /// `text` or `json` (one JSON object per line). Default text. The level comes from `RUST_LOG`.
    pub log_format: LogFormat,
    /// Gossip and failure detection.
    pub gossip: GossipSettings,
    /// Free-form attributes published with the member (e.g. `zone = "eu-1"`).
    pub attributes: BTreeMap<String, String>,
}

/// Gossip and failure-detection timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipSettings {
    /// Time between gossip rounds, in milliseconds. Default 1000.
    pub interval_ms: u64,
    /// Phi-accrual threshold: a silent member is declared dead after about
    /// `phi_threshold` × `interval_ms` (8 s with the defaults). Default 8.0.
    pub phi_threshold: f64,
    /// How long a dead member's state is remembered, in seconds. Default 900.
    pub dead_member_grace_seconds: u64,
    /// How long a starting member looks for the cluster before it runs alone, in ms. Default 5000.
    pub join_timeout_ms: u64,
    /// How often listed members that are not in the cluster are probed, in ms. Default 2000.
    pub probe_interval_ms: u64,
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
            members: Vec::new(),
            member_refresh_seconds: 30,
            shutdown_timeout_seconds: 120,
            log_format: LogFormat::Text,
            gossip: GossipSettings::default(),
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

    /// Checks every key. Returns warnings for values that were accepted but adjusted (none so far
    /// at this level); errors name the key and what is expected.
    pub fn validate(&self) -> Result<Vec<String>, ConfigError> {
        let warnings = Vec::new();
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
        if let Some(node_id) = &self.node_id {
            if node_id.is_empty()
                || node_id.len() > 128
                || node_id.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/')
            {
                return Err(ConfigError::new(
                    "node_id",
                    format!("{node_id:?} is not a valid node id: use 1 to 128 characters without spaces or `/`"),
                ));
            }
        }
        check_port_range("port", self.port, self.port_count)?;
        check_port_range("admin_port", self.admin_port, self.port_count)?;
        if let Some(ip) = self.public_address {
            if ip.is_unspecified() {
                return Err(ConfigError::new(
                    "public_address",
                    "must be an address other members can reach, not 0.0.0.0 or ::",
                ));
            }
        }
        self.seeds().map_err(|e| ConfigError::new("members", e))?;
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

    /// The parsed member list. A bare host means every port of the range other members may use:
    /// `port` to `port + port_count - 1`.
    pub fn seeds(&self) -> Result<Vec<SeedSpec>, grapevine_discovery::DiscoveryError> {
        parse_member_list(&self.members.join(","), range_of(self.port, self.port_count))
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
    }

    #[test]
    fn errors_name_the_key() {
        let cases: Vec<(Config, &str)> = vec![
            (Config::default(), "cluster_name"),
            (Config { cluster_name: " x".into(), ..valid() }, "cluster_name"),
            (Config { node_id: Some("a b".into()), ..valid() }, "node_id"),
            (Config { port: 65500, ..valid() }, "port"),
            (Config { port_count: 0, ..valid() }, "port_count"),
            (Config { members: vec!["10.0.0.1:99999".into()], ..valid() }, "members"),
            (
                Config { gossip: GossipSettings { interval_ms: 1, ..Default::default() }, ..valid() },
                "gossip.interval_ms",
            ),
            (
                Config { gossip: GossipSettings { phi_threshold: f64::NAN, ..Default::default() }, ..valid() },
                "gossip.phi_threshold",
            ),
            (Config { public_address: Some("0.0.0.0".parse().unwrap()), ..valid() }, "public_address"),
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
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("cluster_name = 'x'\nprot = 1").unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
        let err = toml::from_str::<Config>("cluster_name = 'x'\n[gossip]\ninterval = 1").unwrap_err().to_string();
        assert!(err.contains("interval"), "{err}");
    }
}
