//! Errors of topics.

use grapevine_map::MapError;

/// What went wrong with a topic operation, or what a subscriber is told instead of a message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TopicError {
    /// An argument is invalid (a topic name, a setting).
    #[error("{0}")]
    Invalid(String),
    /// The message could not be encoded.
    #[error("topic {topic:?}: cannot encode the message: {message}")]
    Encode {
        /// The topic.
        topic: String,
        /// Why.
        message: String,
    },
    /// The message is larger than members may send each other.
    #[error(
        "topic {topic:?}: the message takes {bytes} bytes, more than net.frame_bytes_max allows ({max} bytes for a \
         message); publish smaller messages or raise net.frame_bytes_max on every member"
    )]
    TooLarge {
        /// The topic.
        topic: String,
        /// The encoded message's size.
        bytes: usize,
        /// The largest allowed.
        max: usize,
    },
    /// A message's payload did not decode as the subscriber's type; the subscription goes on.
    #[error(
        "topic {topic:?}: a message from {publisher} does not decode as {type_name}: {message} (is the topic used with \
         another type elsewhere?)"
    )]
    Decode {
        /// The topic.
        topic: String,
        /// The publishing member.
        publisher: String,
        /// The type the subscriber expects.
        type_name: &'static str,
        /// The decoder's error.
        message: String,
    },
    /// A message for this topic arrived malformed (its envelope did not decode); the
    /// subscription goes on.
    #[error("topic {topic:?}: a malformed message arrived from {from}: {message}")]
    Malformed {
        /// The topic.
        topic: String,
        /// The member it came from (for a reliable topic: the ring buffer).
        from: String,
        /// The decoder's error.
        message: String,
    },
    /// A plain topic's subscriber did not keep up: its queue was full and `missed` messages were
    /// dropped for it. The subscription goes on with the next message.
    #[error("topic {topic:?}: the subscriber fell behind and missed {missed} messages (queue of {capacity})")]
    Lagged {
        /// The topic.
        topic: String,
        /// Messages dropped.
        missed: u64,
        /// The queue's capacity (`[topics.NAME] queue_capacity`).
        capacity: usize,
    },
    /// A reliable topic's subscriber fell further behind than the ring buffer holds: `missed`
    /// messages were overwritten before it read them. It continues at `resumed_at` (the oldest
    /// message held) unless it is dropped.
    #[error(
        "reliable topic {topic:?}: lost {missed} messages: the subscriber fell more than the ring buffer's capacity \
         behind; continuing at sequence {resumed_at}"
    )]
    Lost {
        /// The topic.
        topic: String,
        /// Messages lost.
        missed: u64,
        /// The sequence delivery continues at.
        resumed_at: u64,
    },
    /// A reliable publish was refused: the ring buffer is full of retained messages.
    #[error(
        "reliable topic {topic:?}: the ring buffer is full ({capacity} messages younger than retention_seconds) and \
         the overload policy is {policy}; {hint}"
    )]
    Overloaded {
        /// The topic.
        topic: String,
        /// The ring buffer's capacity.
        capacity: u64,
        /// The policy that refused it (`error`, or `block` that waited too long).
        policy: String,
        /// What to do.
        hint: String,
    },
    /// The ring buffer's map operation failed (timeout, unknown outcome, ...).
    #[error("reliable topic {topic:?}: {source}")]
    Storage {
        /// The topic.
        topic: String,
        /// The map's error.
        #[source]
        source: MapError,
    },
    /// This member is shutting down.
    #[error("topic {topic:?}: this member is shutting down")]
    ShuttingDown {
        /// The topic.
        topic: String,
    },
}
