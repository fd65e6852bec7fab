//! The topic service's wire messages, encoded with `grapevine_net::codec`.
//!
//! A published message travels in two layers: the outer [`TopicMsg`] names the topic and carries
//! the [`Envelope`] encoded on its own, so that an envelope that does not decode can still be
//! reported to the subscribers of the topic it was meant for.

use grapevine_membership::MemberId;
use serde::{Deserialize, Serialize};

/// A plain topic or a reliable one (their subscriptions are registered apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TopicKind {
    /// A plain topic: delivered to the members with subscribers when published.
    Plain,
    /// A reliable topic: stored in a ring buffer, read by subscribers.
    Reliable,
}

impl TopicKind {
    /// `topic` or `reliable`.
    pub fn as_str(&self) -> &'static str {
        match self {
            TopicKind::Plain => "topic",
            TopicKind::Reliable => "reliable",
        }
    }
}

/// A published message: who published it, when, and the payload encoded with the codec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub(crate) publisher: MemberId,
    pub(crate) publish_time_ms: u64,
    pub(crate) payload: Vec<u8>,
}

/// Every message of the topic service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TopicMsg {
    /// Publisher → member with subscribers: a message of a plain topic (`envelope`: an encoded
    /// [`Envelope`]).
    Publish { topic: String, envelope: Vec<u8> },
    /// Publisher → member with subscribers of a reliable topic: message `seq` was stored (and
    /// confirmed by the ring buffer's synchronous backups).
    Stored { topic: String, seq: u64, envelope: Vec<u8> },
    /// Subscribing member → every member: it has subscribers of `topic` (ahead of gossip).
    Subscribe { kind: TopicKind, topic: String },
    /// Member → every member: it has no subscribers of `topic` any more.
    Unsubscribe { kind: TopicKind, topic: String },
    /// Anyone → member: your topic statistics.
    Stats,
}

/// Replies of the topic service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum TopicReply {
    Ack,
    Stats(Vec<crate::TopicStats>),
    Failed { error: String },
}
