//! Redis pub/sub on grapevine's plain topics: a channel is the topic of the same name, a message
//! its payload as raw bytes (a `Topic<Vec<u8>>`; the codec encodes `Vec<u8>` and `String` alike,
//! so a Rust service's `Topic<String>` of the same name sees the same messages).
//!
//! Each subscribed channel of a connection is one topic [`Subscription`], drained by a task of
//! its own (a forwarder) into the connection's push queue, which the connection writes out
//! between requests. The queue is bounded in messages ([`PUSH_QUEUE_MESSAGES`]) and bytes
//! ([`PUSH_QUEUE_BYTES`]): a client that reads its messages slower than they come loses the
//! ones that do not fit (counted in `INFO stats`, `pubsub_messages_dropped`), and neither the
//! member's memory nor the other subscribers wait for it. Unsubscribing, `RESET` or closing the
//! connection stops the forwarders and drops their subscriptions, which retracts them from the
//! other members once this member has no other subscriber of the topic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use grapevine::{Cluster, Subscription, TopicError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::reply::Reply;

/// Channels one connection may be subscribed to at once.
pub(crate) const CHANNELS_PER_CONNECTION_MAX: usize = 1024;
/// Messages a connection's push queue holds.
pub(crate) const PUSH_QUEUE_MESSAGES: usize = 1024;
/// Bytes (payloads, channel names and [`PUSH_OVERHEAD_BYTES`] each) a connection's push queue
/// holds; one message larger than this still goes through when the queue is empty.
pub(crate) const PUSH_QUEUE_BYTES: usize = 1 << 20;
/// What a queued message is counted for beyond its payload and channel name.
const PUSH_OVERHEAD_BYTES: usize = 64;

/// Pub/sub counters of the endpoint (`INFO clients`, `INFO stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Connections subscribed to at least one channel.
    pub(crate) clients: AtomicUsize,
    /// Subscriptions of every connection (a channel counted once per connection).
    pub(crate) subscriptions: AtomicUsize,
    /// Messages written to subscribers.
    pub(crate) pushed: AtomicU64,
    /// Messages dropped for subscribers whose push queue was full (or whose topic queue was).
    pub(crate) dropped: AtomicU64,
    /// Messages that were not raw bytes (published with another type by a Rust service) or
    /// arrived malformed; skipped.
    pub(crate) undecodable: AtomicU64,
    /// Bytes in every connection's push queue now.
    pub(crate) queued_bytes: AtomicUsize,
}

/// Whether a push queue holding `queued` bytes takes a message of `cost` bytes: it does while the
/// total stays within `max`, and always when it is empty (so that no message is too large to
/// ever be delivered). The queue therefore never holds more than `max` bytes, or one message.
pub(crate) fn admits(queued: usize, cost: usize, max: usize) -> bool {
    queued == 0 || queued.saturating_add(cost) <= max
}

/// The bytes a message takes in a push queue.
fn cost(channel: &[u8], payload: &[u8]) -> usize {
    channel.len() + payload.len() + PUSH_OVERHEAD_BYTES
}

/// One message on its way to the client.
#[derive(Debug)]
pub(crate) struct Push {
    /// The subscription it came from (a channel unsubscribed and subscribed again is a new one).
    id: u64,
    channel: Bytes,
    payload: Vec<u8>,
    cost: usize,
}

/// A connection's push queue: the forwarders' sending side, the connection's receiving side,
/// and the bytes in it.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<Push>,
    rx: mpsc::Receiver<Push>,
    bytes: Arc<AtomicUsize>,
}

/// One subscribed channel of a connection; dropping it stops its forwarder (whose subscription
/// is dropped with it).
#[derive(Debug)]
struct Channel {
    id: u64,
    forwarder: JoinHandle<()>,
}

impl Channel {
    /// Stops the forwarder and waits until its subscription is dropped, so that once
    /// `UNSUBSCRIBE` is answered this member no longer counts the subscriber.
    async fn stop(mut self) {
        self.forwarder.abort();
        let _ = (&mut self.forwarder).await;
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}

/// A connection's pub/sub state.
#[derive(Debug)]
pub(crate) struct PubSub {
    counters: Arc<Counters>,
    /// Created with the first subscription.
    queue: Option<Queue>,
    channels: HashMap<Bytes, Channel>,
    next_id: u64,
}

/// `["kind", channel, count]`: a push frame in RESP3, an array in RESP2.
fn confirmation(kind: &'static str, channel: Option<Bytes>, count: usize) -> Reply {
    Reply::Push(vec![Reply::text(kind), channel.map_or(Reply::Null, Reply::Bulk), Reply::Int(count as i64)])
}

/// A channel's topic name (the rules of `Cluster::topic`), or why it cannot be one.
pub(crate) fn topic_name(channel: &[u8]) -> Result<&str, Reply> {
    let valid = |name: &&str| !name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control);
    std::str::from_utf8(channel).ok().filter(valid).ok_or_else(|| {
        Reply::err(format!(
            "invalid channel name '{}': grapevine channels are topic names, 1 to 255 bytes of printable UTF-8",
            String::from_utf8_lossy(channel)
        ))
    })
}

/// Moves one subscription's messages into its connection's push queue, dropping (and counting)
/// those that do not fit. Ends when the connection drops the queue or the member shuts down.
async fn forward(
    mut subscription: Subscription<Vec<u8>>,
    id: u64,
    channel: Bytes,
    tx: mpsc::Sender<Push>,
    queued: Arc<AtomicUsize>,
    counters: Arc<Counters>,
) {
    while let Some(item) = subscription.recv().await {
        let payload = match item {
            Ok(message) => message.payload,
            Err(TopicError::Lagged { missed, .. }) => {
                counters.dropped.fetch_add(missed, Ordering::Relaxed);
                continue;
            }
            Err(error) => {
                counters.undecodable.fetch_add(1, Ordering::Relaxed);
                debug!(%error, "a topic message for a RESP subscriber is not raw bytes; skipped");
                continue;
            }
        };
        let cost = cost(&channel, &payload);
        let before = queued.fetch_add(cost, Ordering::Relaxed);
        if !admits(before, cost, PUSH_QUEUE_BYTES) {
            queued.fetch_sub(cost, Ordering::Relaxed);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.queued_bytes.fetch_add(cost, Ordering::Relaxed);
        match tx.try_send(Push { id, channel: channel.clone(), payload, cost }) {
            Ok(()) => {}
            Err(rejected) => {
                queued.fetch_sub(cost, Ordering::Relaxed);
                counters.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
                match rejected {
                    mpsc::error::TrySendError::Full(_) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    mpsc::error::TrySendError::Closed(_) => return,
                }
            }
        }
    }
}

impl PubSub {
    pub(crate) fn new(counters: Arc<Counters>) -> PubSub {
        PubSub { counters, queue: None, channels: HashMap::new(), next_id: 0 }
    }

    /// Whether the connection is in subscribed mode.
    pub(crate) fn subscribed(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Whether the connection has a push queue to watch.
    pub(crate) fn has_queue(&self) -> bool {
        self.queue.is_some()
    }

    /// Updates the gauges after the channel count went from `before` to the current one.
    fn count(&self, before: usize) {
        let after = self.channels.len();
        if after > before {
            self.counters.subscriptions.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.counters.subscriptions.fetch_sub(before - after, Ordering::Relaxed);
        }
        match (before, after) {
            (0, 1..) => {
                self.counters.clients.fetch_add(1, Ordering::Relaxed);
            }
            (1.., 0) => {
                self.counters.clients.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// `SUBSCRIBE channel [channel ...]`: one confirmation per argument, in order, each with the
    /// number of channels subscribed to after it.
    pub(crate) async fn subscribe(&mut self, cluster: &Cluster, channels: &[Bytes]) -> Reply {
        let mut new: Vec<&Bytes> = Vec::new();
        for channel in channels {
            if let Err(reply) = topic_name(channel) {
                return reply;
            }
            if !self.channels.contains_key(channel) && !new.contains(&channel) {
                new.push(channel);
            }
        }
        if self.channels.len() + new.len() > CHANNELS_PER_CONNECTION_MAX {
            return Reply::err(format!(
                "too many channels: a connection subscribes to at most {CHANNELS_PER_CONNECTION_MAX} (this one has {}, \
                 and asked for {} more); unsubscribe from some, or subscribe on another connection",
                self.channels.len(),
                new.len()
            ));
        }
        // Subscribed concurrently: the first subscriber of a topic on this member waits for the
        // other members to register it (a few seconds at most).
        let mut pending = tokio::task::JoinSet::new();
        for (index, channel) in new.iter().enumerate() {
            let topic = match cluster.topic::<Vec<u8>>(topic_name(channel).unwrap_or_default()) {
                Ok(topic) => topic,
                Err(error) => return Reply::err(error),
            };
            pending.spawn(async move { (index, topic.subscribe().await) });
        }
        let mut subscribed: Vec<Option<Result<Subscription<Vec<u8>>, TopicError>>> =
            std::iter::repeat_with(|| None).take(new.len()).collect();
        while let Some(joined) = pending.join_next().await {
            if let Ok((index, result)) = joined {
                subscribed[index] = Some(result);
            }
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PUSH_QUEUE_MESSAGES);
            Queue { tx, rx, bytes: Arc::new(AtomicUsize::new(0)) }
        });
        let before = self.channels.len();
        let mut errors = Vec::new();
        for (channel, result) in new.iter().zip(subscribed) {
            match result {
                Some(Ok(subscription)) => {
                    self.next_id += 1;
                    let id = self.next_id;
                    let forwarder = tokio::spawn(forward(
                        subscription,
                        id,
                        (*channel).clone(),
                        queue.tx.clone(),
                        queue.bytes.clone(),
                        self.counters.clone(),
                    ));
                    self.channels.insert((*channel).clone(), Channel { id, forwarder });
                }
                Some(Err(error)) => errors.push(Reply::err(error)),
                None => errors.push(Reply::err(format!(
                    "subscribing to '{}' failed; try again",
                    String::from_utf8_lossy(channel)
                ))),
            }
        }
        self.count(before);
        // The counts as Redis reports them: the channels subscribed to after each argument.
        let mut replies = Vec::with_capacity(channels.len() + errors.len());
        let mut seen: Vec<&Bytes> = Vec::new();
        let mut count = before;
        for channel in channels {
            if !self.channels.contains_key(channel) {
                continue;
            }
            if new.contains(&channel) && !seen.contains(&channel) {
                seen.push(channel);
                count += 1;
            }
            replies.push(confirmation("subscribe", Some(channel.clone()), count));
        }
        replies.extend(errors);
        Reply::Many(replies)
    }

    /// `UNSUBSCRIBE [channel ...]` (none: every channel): one confirmation per channel.
    pub(crate) async fn unsubscribe(&mut self, channels: &[Bytes]) -> Reply {
        let before = self.channels.len();
        let mut names: Vec<Bytes> = channels.to_vec();
        if names.is_empty() {
            names = self.channels.keys().cloned().collect();
            names.sort();
        }
        let mut replies = Vec::with_capacity(names.len().max(1));
        for name in names {
            if let Some(channel) = self.channels.remove(&name) {
                channel.stop().await;
            }
            replies.push(confirmation("unsubscribe", Some(name), self.channels.len()));
        }
        if replies.is_empty() {
            replies.push(confirmation("unsubscribe", None, 0));
        }
        self.count(before);
        Reply::Many(replies)
    }

    /// `PUNSUBSCRIBE [pattern ...]`: there are no pattern subscriptions, so each is confirmed
    /// with the connection's channel count (which is what Redis answers for a pattern that was
    /// not subscribed to).
    pub(crate) fn punsubscribe(&self, patterns: &[Bytes]) -> Reply {
        let count = self.channels.len();
        if patterns.is_empty() {
            return Reply::Many(vec![confirmation("punsubscribe", None, count)]);
        }
        Reply::Many(patterns.iter().map(|p| confirmation("punsubscribe", Some(p.clone()), count)).collect())
    }

    /// Unsubscribes from everything without confirmations (`RESET`).
    pub(crate) async fn clear(&mut self) {
        let before = self.channels.len();
        for (_, channel) in self.channels.drain() {
            channel.stop().await;
        }
        self.count(before);
    }

    /// The next message of the push queue for a channel still subscribed to (messages of
    /// channels unsubscribed meanwhile are discarded). Pending forever without a queue.
    pub(crate) async fn next(&mut self) -> Reply {
        loop {
            let push = match self.queue.as_mut() {
                Some(queue) => queue.rx.recv().await,
                None => std::future::pending().await,
            };
            // The queue keeps a sender: it never ends while it exists.
            let Some(push) = push else { return std::future::pending().await };
            if let Some(reply) = self.take(push) {
                return reply;
            }
        }
    }

    /// The next message already in the push queue, if any.
    pub(crate) fn try_next(&mut self) -> Option<Reply> {
        loop {
            let push = self.queue.as_mut()?.rx.try_recv().ok()?;
            if let Some(reply) = self.take(push) {
                return Some(reply);
            }
        }
    }

    /// Accounts for a message leaving the queue; its frame, unless its channel was unsubscribed.
    fn take(&mut self, push: Push) -> Option<Reply> {
        if let Some(queue) = &self.queue {
            queue.bytes.fetch_sub(push.cost, Ordering::Relaxed);
        }
        self.counters.queued_bytes.fetch_sub(push.cost, Ordering::Relaxed);
        if self.channels.get(&push.channel).is_none_or(|c| c.id != push.id) {
            return None;
        }
        self.counters.pushed.fetch_add(1, Ordering::Relaxed);
        Some(Reply::Push(vec![Reply::text("message"), Reply::Bulk(push.channel), Reply::bulk(push.payload)]))
    }
}

impl Drop for PubSub {
    fn drop(&mut self) {
        // The forwarders stop soon after (their subscriptions are dropped with them).
        let before = self.channels.len();
        self.channels.clear();
        self.count(before);
        // What is still queued leaves with the queue.
        if let Some(mut queue) = self.queue.take() {
            queue.rx.close();
            while let Ok(push) = queue.rx.try_recv() {
                self.counters.queued_bytes.fetch_sub(push.cost, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Messages offered to and taken from a queue in any order: it never holds more than its
        /// byte budget (or one message), and an empty queue always takes a message.
        #[test]
        fn the_push_queue_stays_within_its_budget(
            ops in proptest::collection::vec((any::<bool>(), 1usize..3000), 1..400),
            max in 1usize..10_000,
        ) {
            let mut queue: std::collections::VecDeque<usize> = Default::default();
            let mut queued = 0usize;
            for (offer, cost) in ops {
                if offer {
                    let admitted = admits(queued, cost, max);
                    if queued == 0 {
                        prop_assert!(admitted);
                    }
                    if admitted {
                        queued += cost;
                        queue.push_back(cost);
                    }
                } else if let Some(cost) = queue.pop_front() {
                    queued -= cost;
                }
                prop_assert!(queued <= max || queue.len() == 1, "{queued} bytes in {} messages", queue.len());
            }
        }
    }

    #[test]
    fn channel_names_must_be_topic_names() {
        assert!(topic_name(b"news").is_ok());
        assert!(topic_name(b"").is_err());
        assert!(topic_name(b"\xff").is_err());
        assert!(topic_name(b"a\nb").is_err());
        assert!(topic_name(&[b'x'; 256]).is_err());
        assert!(topic_name(&[b'x'; 255]).is_ok());
    }
}
