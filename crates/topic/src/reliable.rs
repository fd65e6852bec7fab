//! Reliable topics: messages in a ring buffer kept as map partition data; subscribers read it.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use grapevine_map::{MapError, RingAppended, RingLimits};
use grapevine_net::codec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};

use crate::config::{OverloadPolicy, ReliableTopicConfig};
use crate::messages::{Envelope, TopicKind, TopicMsg};
use crate::plain::decode_delivery;
use crate::{Delivery, Inner, Message, TOPIC_SERVICE, TopicError, encode};

/// Stored messages a reader keeps from notifications, ahead of what it delivered.
const PUSHED_MAX: usize = 4096;

/// Bytes of messages one read returns at most (unless one message alone is larger).
const READ_BYTES_MAX: u32 = 1 << 20;

/// Where a new subscriber starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest message the ring buffer holds.
    Oldest,
    /// The messages published from now on.
    Newest,
    /// This sequence number (a subscriber resuming where it stopped). Older than the oldest held:
    /// the subscriber first gets [`TopicError::Lost`].
    Sequence(u64),
}

/// A reliable topic whose messages are of type `T`. Cheap to clone.
pub struct ReliableTopic<T> {
    name: Arc<str>,
    inner: Arc<Inner>,
    config: ReliableTopicConfig,
    _type: PhantomData<fn(T) -> T>,
}

impl<T> Clone for ReliableTopic<T> {
    fn clone(&self) -> Self {
        ReliableTopic {
            name: self.name.clone(),
            inner: self.inner.clone(),
            config: self.config.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for ReliableTopic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReliableTopic").field("name", &self.name).field("config", &self.config).finish()
    }
}

impl<T> ReliableTopic<T> {
    pub(crate) fn new(name: &str, inner: Arc<Inner>) -> Self {
        let config = inner.settings.reliable_topic(name);
        ReliableTopic { name: name.into(), inner, config, _type: PhantomData }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings in use.
    pub fn config(&self) -> &ReliableTopicConfig {
        &self.config
    }

    fn storage(&self, source: MapError) -> TopicError {
        match source {
            MapError::ShuttingDown { .. } => TopicError::ShuttingDown { topic: self.name.to_string() },
            source => TopicError::Storage { topic: self.name.to_string(), source },
        }
    }
}

impl<T: Serialize + DeserializeOwned> ReliableTopic<T> {
    /// Stores `message` in the ring buffer and returns its sequence number, once the ring
    /// buffer's synchronous backups hold it (so it survives the owner's death with
    /// `backup_count >= 1`). `Ok(None)`: the ring buffer was full of retained messages and the
    /// `discard_newest` policy dropped this one. An error after the request went out
    /// ([`TopicError::Storage`] with an unknown outcome) means it may or may not be stored.
    pub async fn publish(&self, message: &T) -> Result<Option<u64>, TopicError> {
        let envelope = self.inner.envelope(&self.name, message)?;
        let policy = self.config.overload_policy;
        let limits = RingLimits {
            capacity: self.config.capacity,
            retention: Duration::from_secs(self.config.retention_seconds),
            overwrite: policy == OverloadPolicy::DiscardOldest,
        };
        let counters = self.inner.counters(TopicKind::Reliable, &self.name);
        let started = Instant::now();
        loop {
            let outcome = self.inner.maps.ring_append(&self.name, envelope.clone(), limits).await;
            match outcome.map_err(|e| self.storage(e))? {
                RingAppended::Stored(seq) => {
                    counters.published.fetch_add(1, Ordering::Relaxed);
                    self.notify(seq, envelope);
                    return Ok(Some(seq));
                }
                RingAppended::Full { retry_in } => match policy {
                    OverloadPolicy::DiscardNewest => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        return Ok(None);
                    }
                    OverloadPolicy::Error => {
                        return Err(self.overloaded("subscribers may still need the retained messages; retry later"));
                    }
                    OverloadPolicy::Block | OverloadPolicy::DiscardOldest => {
                        let waited = started.elapsed();
                        if waited >= self.inner.settings.operation_timeout {
                            return Err(self.overloaded(&format!("waited {waited:?} for room")));
                        }
                        if self.inner.cancel.is_cancelled() {
                            return Err(TopicError::ShuttingDown { topic: self.name.to_string() });
                        }
                        let left = self.inner.settings.operation_timeout - waited;
                        tokio::time::sleep(
                            retry_in.clamp(Duration::from_millis(1), Duration::from_millis(100)).min(left),
                        )
                        .await;
                    }
                },
            }
        }
    }

    fn overloaded(&self, hint: &str) -> TopicError {
        TopicError::Overloaded {
            topic: self.name.to_string(),
            capacity: self.config.capacity,
            policy: self.config.overload_policy.to_string(),
            hint: hint.to_string(),
        }
    }

    /// Tells the members with subscribers (this one included) that message `seq` is stored.
    fn notify(&self, seq: u64, envelope: Vec<u8>) {
        let members = self.inner.registry.members(TopicKind::Reliable, &self.name);
        if !members.is_empty() {
            let body = encode(&TopicMsg::Stored { topic: self.name.to_string(), seq, envelope: envelope.clone() });
            for member in members {
                if let Err(error) = self.inner.net.send(&member, TOPIC_SERVICE, body.clone()) {
                    debug!(%member, %error, topic = %self.name, "notification not sent; its subscribers poll");
                }
            }
        }
        self.inner.deliver_stored(&self.name, seq, envelope.into());
    }

    /// Subscribes from `start`. Messages arrive in sequence order, each once; the subscription
    /// keeps reading through owner changes and lost connections. Dropping it unsubscribes.
    pub async fn subscribe(&self, start: StartAt) -> Result<ReliableSubscription<T>, TopicError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(TopicError::ShuttingDown { topic: self.name.to_string() });
        }
        let first = match start {
            StartAt::Sequence(n) => n,
            StartAt::Oldest | StartAt::Newest => {
                let page = inner.maps.ring_read(&self.name, 0, 1, 1).await.map_err(|e| self.storage(e))?;
                if start == StartAt::Oldest { page.head } else { page.next }
            }
        };
        let shared = Arc::new(ReaderShared::default());
        let is_first = {
            let mut readers = inner.readers.lock().unwrap();
            let list = readers.entry(self.name.to_string()).or_default();
            list.push(shared.clone());
            list.len() == 1
        };
        inner.counters(TopicKind::Reliable, &self.name);
        let (tx, rx) = mpsc::channel(self.config.read_batch.max(1) as usize);
        let position = Arc::new(AtomicU64::new(first));
        let cancel = inner.cancel.child_token();
        let reader = Reader {
            inner: inner.clone(),
            topic: self.name.to_string(),
            config: self.config.clone(),
            shared: shared.clone(),
            tx,
            position: position.clone(),
            cancel: cancel.clone(),
        };
        inner.tasks.spawn(reader.run(first));
        if is_first {
            inner.announce(TopicKind::Reliable, &self.name).await;
        }
        Ok(ReliableSubscription {
            topic: self.name.clone(),
            rx,
            pending: None,
            position,
            shared,
            inner: Arc::downgrade(inner),
            _stop: cancel.drop_guard(),
            _type: PhantomData,
        })
    }
}

/// What notifications hand a reader: stored messages by sequence, and a wake-up.
#[derive(Debug, Default)]
pub(crate) struct ReaderShared {
    pushed: Mutex<BTreeMap<u64, Arc<[u8]>>>,
    wake: Notify,
}

impl ReaderShared {
    pub(crate) fn push(&self, seq: u64, envelope: Arc<[u8]>) {
        let mut pushed = self.pushed.lock().unwrap();
        if pushed.len() >= PUSHED_MAX {
            // The reader is far behind: it reads the ring buffer anyway.
            pushed.pop_last();
        }
        pushed.insert(seq, envelope);
        drop(pushed);
        self.wake.notify_one();
    }

    /// The pushed message `seq`, if it was pushed (older ones are forgotten).
    fn take(&self, seq: u64) -> Option<Arc<[u8]>> {
        let mut pushed = self.pushed.lock().unwrap();
        while let Some(entry) = pushed.first_entry() {
            if *entry.key() < seq {
                entry.remove();
            } else {
                break;
            }
        }
        pushed.remove(&seq)
    }
}

/// The task that reads a ring buffer for one subscriber.
struct Reader {
    inner: Arc<Inner>,
    topic: String,
    config: ReliableTopicConfig,
    shared: Arc<ReaderShared>,
    tx: mpsc::Sender<Delivery>,
    /// The next sequence to deliver (read by the subscription).
    position: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Reader {
    /// Queues `delivery` for the subscriber; false when it is gone.
    async fn send(&self, delivery: Delivery) -> bool {
        tokio::select! {
            sent = self.tx.send(delivery) => sent.is_ok(),
            _ = self.cancel.cancelled() => false,
        }
    }

    async fn deliver(&self, seq: u64, envelope: &[u8]) -> bool {
        let delivery = match codec::decode::<Envelope>(envelope) {
            Ok(e) => Delivery::Message {
                publisher: e.publisher,
                publish_time_ms: e.publish_time_ms,
                sequence: Some(seq),
                payload: e.payload.into(),
                missed_before: 0,
            },
            Err(error) => {
                Delivery::Malformed { from: format!("the ring buffer at sequence {seq}"), message: error.to_string() }
            }
        };
        let counters = self.inner.counters(TopicKind::Reliable, &self.topic);
        let message = matches!(delivery, Delivery::Message { .. });
        if !self.send(delivery).await {
            return false;
        }
        if message {
            counters.received.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
        self.position.store(seq + 1, Ordering::Relaxed);
        true
    }

    async fn lost(&self, missed: u64, resumed_at: u64) -> bool {
        self.inner.counters(TopicKind::Reliable, &self.topic).lost.fetch_add(missed, Ordering::Relaxed);
        self.position.store(resumed_at, Ordering::Relaxed);
        self.send(Delivery::Lost { missed, resumed_at }).await
    }

    /// Waits for a notification, the poll interval, or the end.
    async fn idle(&self) -> bool {
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        tokio::select! {
            _ = self.shared.wake.notified() => true,
            _ = tokio::time::sleep(poll) => true,
            _ = self.cancel.cancelled() => false,
        }
    }

    async fn run(self, mut next: u64) {
        let mut failing_since: Option<Instant> = None;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            // Notified messages first: they spare a read.
            if let Some(envelope) = self.shared.take(next) {
                if !self.deliver(next, &envelope).await {
                    return;
                }
                next += 1;
                continue;
            }
            let read = tokio::select! {
                read = self.inner.maps.ring_read(&self.topic, next, self.config.read_batch, READ_BYTES_MAX) => read,
                _ = self.cancel.cancelled() => return,
            };
            match read {
                Ok(page) => {
                    failing_since = None;
                    if page.head > next {
                        let (missed, resumed_at) = (page.head - next, page.head);
                        next = resumed_at;
                        if !self.lost(missed, resumed_at).await {
                            return;
                        }
                    } else if next > page.next && page.items.is_empty() {
                        // The ring buffer holds fewer messages than this subscriber has seen: it was
                        // lost (every replica at once) and started again.
                        warn!(topic = %self.topic, at = next, now = page.next, "the ring buffer restarted behind this subscriber; continuing at its end");
                        next = page.next;
                    }
                    let empty = page.items.is_empty();
                    for (seq, envelope) in page.items {
                        if seq < next {
                            continue;
                        }
                        if seq > next && !self.lost(seq - next, seq).await {
                            return;
                        }
                        if !self.deliver(seq, &envelope).await {
                            return;
                        }
                        next = seq + 1;
                    }
                    if empty && !self.idle().await {
                        return;
                    }
                }
                Err(MapError::ShuttingDown { .. }) => return,
                Err(error) => {
                    // The owner is unreachable or moving: keep trying, from where we are.
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(10) {
                        warn!(topic = %self.topic, %error, "reading the ring buffer keeps failing; retrying");
                        failing_since = Some(Instant::now());
                    } else {
                        debug!(topic = %self.topic, %error, "reading the ring buffer failed; retrying");
                    }
                    if !self.idle().await {
                        return;
                    }
                }
            }
        }
    }
}

/// A subscription to a reliable topic: [`ReliableSubscription::recv`] the messages, or use it as
/// a `Stream`. [`TopicError::Lost`] says messages were overwritten before they were read (the
/// subscription goes on with the oldest held; drop it to stop); a message that does not decode is
/// reported and skipped. It ends (`None`) when the member shuts down.
pub struct ReliableSubscription<T> {
    topic: Arc<str>,
    rx: mpsc::Receiver<Delivery>,
    pending: Option<Delivery>,
    position: Arc<AtomicU64>,
    shared: Arc<ReaderShared>,
    inner: std::sync::Weak<Inner>,
    _stop: DropGuard,
    _type: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for ReliableSubscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReliableSubscription").field("topic", &self.topic).finish()
    }
}

impl<T> ReliableSubscription<T> {
    /// The sequence of the next message the reader will hand over (to resume a later
    /// subscription with [`StartAt::Sequence`], subtract what is still queued and unread).
    pub fn next_sequence(&self) -> u64 {
        self.position.load(Ordering::Relaxed)
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl<T> Drop for ReliableSubscription<T> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else { return };
        let last = {
            let mut readers = inner.readers.lock().unwrap();
            let Some(list) = readers.get_mut(&*self.topic) else { return };
            list.retain(|r| !Arc::ptr_eq(r, &self.shared));
            let last = list.is_empty();
            if last {
                readers.remove(&*self.topic);
            }
            last
        };
        if last && !inner.cancel.is_cancelled() && tokio::runtime::Handle::try_current().is_ok() {
            inner.tasks.spawn(inner.clone().retract(TopicKind::Reliable, self.topic.to_string()));
        }
    }
}

impl<T: DeserializeOwned> ReliableSubscription<T> {
    /// The next message (or error); `None` once the member shut down.
    pub async fn recv(&mut self) -> Option<Result<Message<T>, TopicError>> {
        std::future::poll_fn(|cx| self.poll_message(cx)).await
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message<T>, TopicError>>> {
        let delivery = match self.pending.take() {
            Some(delivery) => delivery,
            None => match self.rx.poll_recv(cx) {
                Poll::Ready(Some(delivery)) => delivery,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let result = decode_delivery(&self.topic, delivery, &mut self.pending, 0);
        if let (Err(TopicError::Decode { .. }), Some(inner)) = (&result, self.inner.upgrade()) {
            inner.counters(TopicKind::Reliable, &self.topic).malformed.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Some(result))
    }
}

impl<T: DeserializeOwned> futures_core::Stream for ReliableSubscription<T> {
    type Item = Result<Message<T>, TopicError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_message(cx)
    }
}
