//! grapevine: a peer-to-peer clustering runtime. Embed a member in your service:
//!
//! ```no_run
//! # async fn run() -> Result<(), grapevine::StartError> {
//! use grapevine::{Cluster, Discovery};
//! let cluster = Cluster::builder()
//!     .cluster_name("sessions-prod")
//!     .discovery(Discovery::static_list(["10.0.0.1", "10.0.0.2"]))
//!     .start()
//!     .await?;
//! println!("master: {:?}", cluster.view().master);
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! A member finds its peers (a static list, or mDNS on the local network), agrees on membership by gossip, computes the master
//! (the oldest member), holds its share of the partitioned maps with their backups
//! ([`Cluster::map`], optionally with near caches), carries topics ([`Cluster::topic`],
//! [`Cluster::reliable_topic`]), and serves an admin HTTP endpoint with `/health`, `/stats` and `/metrics`.

#[cfg(feature = "admin")]
mod admin;
mod cluster;
pub mod config;
#[cfg(all(test, feature = "admin"))]
mod fuzz_tests;
mod map;
mod ports;
mod singleton;
pub mod stats;

pub use cluster::{
    Addresses, Cluster, ClusterBuilder, ClusterError, Discovery, HandoverIncomplete, Health, StartError,
};
pub use config::{Config, ConfigError, DiscoveryMode, InvalidationConfig, RespLimits};
pub use grapevine_map::{
    EntryEventKind, Expiry, MapConfig, MapError, MapService, MergeOutcome, MergePolicy, NearCacheConfig,
    NearCacheStats, PartitionSummary, PutMode, Record, SetExpiry,
};
pub use grapevine_membership::{
    ClusterView, Member, MemberEvent, MemberId, MemberState, PROTOCOL_VERSION, ProtocolVersion,
};
pub use grapevine_topic::{
    Delivered, Message, OTHER_TOPICS, OverloadPolicy, ReliableSubscription, ReliableTopic, ReliableTopicConfig,
    StartAt, Subscription, TOPIC_STATS_MAX, Topic, TopicConfig, TopicError, TopicKind, TopicService, TopicStats,
};
pub use map::{DistributedMap, Entries, EntryEvent, EntryListener, ListenError};
pub use singleton::{MASTER_TASK_STOP_TIMEOUT, MasterTask};
pub use tokio_util::sync::CancellationToken;
