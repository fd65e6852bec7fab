//! Plain topics: publish to the members with subscribers, deliver to local subscribers' queues.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use grapevine_net::codec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::debug;

use crate::messages::{TopicKind, TopicMsg};
use crate::{Delivery, Inner, LocalSubscriber, Message, TOPIC_SERVICE, TopicError, encode};

/// A topic whose messages are of type `T` (encoded with the data plane's codec: every member must
/// use the same type for a topic). Cheap to clone.
pub struct Topic<T> {
    name: Arc<str>,
    inner: Arc<Inner>,
    _type: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Topic<T> {
    fn clone(&self) -> Self {
        Topic { name: self.name.clone(), inner: self.inner.clone(), _type: PhantomData }
    }
}

impl<T> fmt::Debug for Topic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).finish()
    }
}

impl<T> Topic<T> {
    pub(crate) fn new(name: &str, inner: Arc<Inner>) -> Self {
        Topic { name: name.into(), inner, _type: PhantomData }
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<T: Serialize + DeserializeOwned> Topic<T> {
    /// Publishes `message` to every subscriber in the cluster. Returns once it is queued for
    /// every member with subscribers (and delivered to this member's own); delivery is best
    /// effort (a member that fails meanwhile misses it).
    pub async fn publish(&self, message: &T) -> Result<(), TopicError> {
        self.publish_reporting(message).await.map(|_| ())
    }

    /// [`Topic::publish`], telling whom the message was handed to: this member's subscribers
    /// whose queue took it, and the other members with subscribers it was sent to.
    pub async fn publish_reporting(&self, message: &T) -> Result<Delivered, TopicError> {
        if self.inner.cancel.is_cancelled() {
            return Err(TopicError::ShuttingDown { topic: self.name.to_string() });
        }
        let envelope = self.inner.envelope(&self.name, message)?;
        let counters = self.inner.counters(TopicKind::Plain, &self.name);
        counters.published.fetch_add(1, Ordering::Relaxed);
        let mut delivered = Delivered::default();
        let members = self.inner.registry.members(TopicKind::Plain, &self.name);
        if !members.is_empty() {
            let body = encode(&TopicMsg::Publish { topic: self.name.to_string(), envelope: envelope.clone() });
            for member in members {
                match self.inner.net.send(&member, TOPIC_SERVICE, body.clone()) {
                    Ok(()) => delivered.members += 1,
                    Err(error) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        debug!(%member, %error, topic = %self.name, "topic message not sent");
                    }
                }
            }
        }
        if self.inner.plain.lock().unwrap().contains_key(&*self.name) {
            let delivery = match codec::decode::<crate::Envelope>(&envelope) {
                Ok(e) => Delivery::Message {
                    publisher: e.publisher,
                    publish_time_ms: e.publish_time_ms,
                    sequence: None,
                    payload: e.payload.into(),
                    missed_before: 0,
                },
                Err(error) => Delivery::Malformed { from: self.inner.local.to_string(), message: error.to_string() },
            };
            delivered.local_subscribers = self.inner.deliver_plain(&self.name, delivery);
        }
        Ok(delivered)
    }

    /// Subscribes to messages published from now on, on any member. The subscription is
    /// registered with every member before this returns (within a few seconds at most; members
    /// that do not answer learn it from gossip). Dropping it unsubscribes.
    pub async fn subscribe(&self) -> Result<Subscription<T>, TopicError> {
        let inner = &self.inner;
        if inner.cancel.is_cancelled() {
            return Err(TopicError::ShuttingDown { topic: self.name.to_string() });
        }
        let capacity = inner.settings.topic(&self.name).queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut plain = inner.plain.lock().unwrap();
            let subscribers = plain.entry(self.name.to_string()).or_default();
            subscribers.push(LocalSubscriber { id, tx, missed: 0 });
            subscribers.len() == 1
        };
        inner.counters(TopicKind::Plain, &self.name);
        let subscription = Subscription {
            topic: self.name.clone(),
            id,
            capacity,
            rx,
            pending: None,
            inner: Arc::downgrade(inner),
            _type: PhantomData,
        };
        if first {
            inner.announce(TopicKind::Plain, &self.name).await;
        }
        Ok(subscription)
    }
}

/// Whom one [`Topic::publish_reporting`] handed its message to, as far as this member knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Subscribers on this member whose queue took the message (a full queue drops it).
    pub local_subscribers: usize,
    /// Other members with subscribers that the message was sent to; each delivers it to its own
    /// subscribers (how many is not known here).
    pub members: usize,
}

/// A subscription to a plain topic: [`Subscription::recv`] the messages, or use it as a
/// `Stream`. Errors are reported in the stream and the subscription goes on: a message that does
/// not decode as `T` ([`TopicError::Decode`]), a malformed message ([`TopicError::Malformed`]),
/// messages missed because the queue was full ([`TopicError::Lagged`]). It ends (`None`) when the
/// member shuts down.
pub struct Subscription<T> {
    topic: Arc<str>,
    id: u64,
    capacity: usize,
    rx: mpsc::Receiver<Delivery>,
    pending: Option<Delivery>,
    inner: Weak<Inner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").field("topic", &self.topic).field("id", &self.id).finish()
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else { return };
        let last = {
            let mut plain = inner.plain.lock().unwrap();
            let Some(subscribers) = plain.get_mut(&*self.topic) else { return };
            subscribers.retain(|s| s.id != self.id);
            let last = subscribers.is_empty();
            if last {
                plain.remove(&*self.topic);
            }
            last
        };
        if last && !inner.cancel.is_cancelled() {
            let topic = self.topic.to_string();
            let task = inner.clone().retract(TopicKind::Plain, topic);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let _guard = runtime.enter();
                inner.tasks.spawn(task);
            }
        }
    }
}

/// Turns a delivery into what a subscriber sees.
pub(crate) fn decode_delivery<T: DeserializeOwned>(
    topic: &str,
    delivery: Delivery,
    pending: &mut Option<Delivery>,
    capacity: usize,
) -> Result<Message<T>, TopicError> {
    match delivery {
        Delivery::Message { missed_before, publisher, publish_time_ms, sequence, payload } => {
            if missed_before > 0 {
                // Report the gap first; the message follows.
                *pending = Some(Delivery::Message { missed_before: 0, publisher, publish_time_ms, sequence, payload });
                return Err(TopicError::Lagged { topic: topic.to_string(), missed: missed_before, capacity });
            }
            match codec::decode::<T>(&payload) {
                Ok(value) => Ok(Message { payload: value, publisher, publish_time_ms, sequence }),
                Err(e) => Err(TopicError::Decode {
                    topic: topic.to_string(),
                    publisher: publisher.to_string(),
                    type_name: std::any::type_name::<T>(),
                    message: e.to_string(),
                }),
            }
        }
        Delivery::Malformed { from, message } => Err(TopicError::Malformed { topic: topic.to_string(), from, message }),
        Delivery::Lost { missed, resumed_at } => Err(TopicError::Lost { topic: topic.to_string(), missed, resumed_at }),
    }
}

impl<T: DeserializeOwned> Subscription<T> {
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
        let counted = self.inner.upgrade();
        let result = decode_delivery(&self.topic, delivery, &mut self.pending, self.capacity);
        if let (Err(TopicError::Decode { .. }), Some(inner)) = (&result, counted) {
            inner.counters(TopicKind::Plain, &self.topic).malformed.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Some(result))
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl<T: DeserializeOwned> futures_core::Stream for Subscription<T> {
    type Item = Result<Message<T>, TopicError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is `Unpin`.
        self.get_mut().poll_message(cx)
    }
}
