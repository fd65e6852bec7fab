//! Settings of topics and reliable topics.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most messages a subscriber's queue may be configured to hold.
pub const QUEUE_CAPACITY_MAX: usize = 1 << 20;

/// The largest ring buffer a reliable topic may be configured with.
pub const RELIABLE_CAPACITY_MAX: u64 = 1_000_000;

/// One plain topic's settings (`[topics.NAME]`; `[topics.default]` for the others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicConfig {
    /// Messages a subscriber's queue holds; when it is full, further messages are dropped for
    /// that subscriber only, and it is told how many it missed. Default 4096.
    pub queue_capacity: usize,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig { queue_capacity: 4096 }
    }
}

/// What a reliable topic's publisher does when the ring buffer is full of messages that are
/// still retained (younger than `retention_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverloadPolicy {
    /// Wait until the oldest message may be overwritten (within the operation timeout).
    #[default]
    Block,
    /// Overwrite the oldest message anyway.
    DiscardOldest,
    /// Drop the new message (`publish` returns `Ok(None)`).
    DiscardNewest,
    /// Fail the publish with [`crate::TopicError::Overloaded`].
    Error,
}

impl std::fmt::Display for OverloadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverloadPolicy::Block => "block",
            OverloadPolicy::DiscardOldest => "discard_oldest",
            OverloadPolicy::DiscardNewest => "discard_newest",
            OverloadPolicy::Error => "error",
        })
    }
}

/// One reliable topic's settings (`[reliable_topics.NAME]`; `[reliable_topics.default]` for the
/// others). Use the same settings on every member: the publisher's apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReliableTopicConfig {
    /// Messages the ring buffer keeps; a subscriber further behind loses messages. Default 10000
    /// (Hazelcast's), at most 1000000.
    pub capacity: u64,
    /// Synchronous backups of the ring buffer: a publish returns once they hold the message.
    /// 0 to 6, default 1. With at least 1, an acknowledged message survives its owner's death.
    pub backup_count: u8,
    /// Asynchronous backups. 0 to 6, default 0.
    pub async_backup_count: u8,
    /// How long a message is protected from being overwritten by newer ones, in seconds
    /// (Hazelcast's ring buffer time to live; an older message stays readable until it is
    /// overwritten). 0: never protected, the oldest is always overwritten and the overload
    /// policy never applies. Default 0.
    pub retention_seconds: u64,
    /// What a publish does when every message is protected. Default `block`.
    pub overload_policy: OverloadPolicy,
    /// Messages a subscriber reads from the ring buffer at once, and holds ready. Default 256.
    pub read_batch: u32,
    /// How often an idle subscriber reads the ring buffer even without a notification of a new
    /// message (notifications are best effort), in ms. Default 500.
    pub poll_interval_ms: u64,
}

impl Default for ReliableTopicConfig {
    fn default() -> Self {
        ReliableTopicConfig {
            capacity: 10_000,
            backup_count: 1,
            async_backup_count: 0,
            retention_seconds: 0,
            overload_policy: OverloadPolicy::Block,
            read_batch: 256,
            poll_interval_ms: 500,
        }
    }
}

/// The topic service's settings on one member.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSettings {
    /// Plain topics by name; `default` applies to topics without their own entry.
    pub topics: BTreeMap<String, TopicConfig>,
    /// Reliable topics by name; `default` applies to topics without their own entry.
    pub reliable_topics: BTreeMap<String, ReliableTopicConfig>,
    /// How long a blocked reliable publish waits, and how long subscriptions wait for other
    /// members to register them. Default 30 s.
    pub operation_timeout: Duration,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            topics: BTreeMap::new(),
            reliable_topics: BTreeMap::new(),
            operation_timeout: Duration::from_secs(30),
        }
    }
}

impl TopicSettings {
    /// The settings of plain topic `name`.
    pub fn topic(&self, name: &str) -> TopicConfig {
        self.topics.get(name).or_else(|| self.topics.get("default")).cloned().unwrap_or_default()
    }

    /// The settings of reliable topic `name`.
    pub fn reliable_topic(&self, name: &str) -> ReliableTopicConfig {
        self.reliable_topics.get(name).or_else(|| self.reliable_topics.get("default")).cloned().unwrap_or_default()
    }
}

/// Checks a topic's settings; the error names the key and what is expected.
pub fn validate_topic(name: &str, config: &TopicConfig) -> Result<(), (String, String)> {
    if !(1..=QUEUE_CAPACITY_MAX).contains(&config.queue_capacity) {
        return Err((format!("topics.{name}.queue_capacity"), format!("must be between 1 and {QUEUE_CAPACITY_MAX}")));
    }
    Ok(())
}

/// Checks a reliable topic's settings; the error names the key and what is expected.
pub fn validate_reliable_topic(name: &str, config: &ReliableTopicConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("reliable_topics.{name}.{k}");
    if !(1..=RELIABLE_CAPACITY_MAX).contains(&config.capacity) {
        return Err((key("capacity"), format!("must be between 1 and {RELIABLE_CAPACITY_MAX} (default 10000)")));
    }
    if config.backup_count > grapevine_map::BACKUP_COUNT_MAX
        || config.async_backup_count > grapevine_map::BACKUP_COUNT_MAX
    {
        return Err((
            key("backup_count"),
            format!("backup counts must be between 0 and {}", grapevine_map::BACKUP_COUNT_MAX),
        ));
    }
    if !(1..=grapevine_map::RING_READ_ITEMS_MAX).contains(&config.read_batch) {
        return Err((key("read_batch"), format!("must be between 1 and {}", grapevine_map::RING_READ_ITEMS_MAX)));
    }
    if !(10..=60_000).contains(&config.poll_interval_ms) {
        return Err((key("poll_interval_ms"), "must be between 10 and 60000 milliseconds".into()));
    }
    if config.retention_seconds > 365 * 86_400 {
        return Err((key("retention_seconds"), "must be at most a year (31536000)".into()));
    }
    Ok(())
}

/// Checks a topic name: 1 to 255 printable characters.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
        return Err(format!("invalid topic name {name:?}: use 1 to 255 printable characters"));
    }
    Ok(())
}
