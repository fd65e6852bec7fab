//! Pub/sub topics and reliable topics.
//!
//! **Topics** ([`Topic`]): `publish` sends a message to every member that has subscribers of the
//! topic, and delivers it to this member's own subscribers; each subscriber gets every message, in
//! publish order per publishing member (the data plane keeps one ordered connection per pair of
//! members). Members announce their subscriptions in gossip (`x:topic:<name>`) and, so that
//! publishers know at once, with a `Subscribe` message to every member when the first local
//! subscriber appears. Delivery is best effort: messages in flight when a member fails are lost.
//! Each subscriber has a bounded queue; when it is full the subscriber misses messages (and is
//! told how many, [`TopicError::Lagged`]), while the member's memory stays bounded and other
//! subscribers are not slowed.
//!
//! **Reliable topics** ([`ReliableTopic`]): messages are stored in a ring buffer held by the
//! partition that owns the topic name, as data of the map `__topic:<name>`, so the map's owners,
//! synchronous backups, fencing, migration and fail-over keep it (see `grapevine_map`'s `ring`
//! module). Each message gets a sequence number; `publish` returns once the synchronous backups
//! hold it. A subscriber starts from the oldest message, the newest, or a sequence, reads the ring
//! buffer in batches from whichever member owns it, and so resumes where it was after its member
//! reconnects or the owner changes. Publishers notify the members with reliable subscribers of
//! each stored message (which usually spares them a read); idle subscribers also poll. A
//! subscriber further behind than the capacity gets [`TopicError::Lost`] and continues with the
//! oldest message held, unless it drops the subscription.

mod config;
mod error;
#[cfg(test)]
mod fuzz_tests;
mod messages;
mod plain;
mod reliable;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grapevine_map::MapService;
use grapevine_membership::{ClusterView, MemberId, Membership};
use grapevine_net::{Handler, Incoming, Net, Reply as NetReply, ServiceId, codec};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use config::{
    OverloadPolicy, QUEUE_CAPACITY_MAX, RELIABLE_CAPACITY_MAX, ReliableTopicConfig, TopicConfig, TopicSettings,
    check_name, validate_reliable_topic, validate_topic,
};
pub use error::TopicError;
pub use messages::TopicKind;
pub use plain::{Delivered, Subscription, Topic};
pub use reliable::{ReliableSubscription, ReliableTopic, StartAt};

use messages::{Envelope, TopicMsg, TopicReply};

/// The data-plane service id of topics.
pub const TOPIC_SERVICE: ServiceId = ServiceId(3);

/// Gossip key prefixes announcing that a member has subscribers of a topic.
const PLAIN_KEY_PREFIX: &str = "topic:";
const RELIABLE_KEY_PREFIX: &str = "rtopic:";

/// Topics one member may register explicitly on another.
const REGISTRATIONS_PER_MEMBER_MAX: usize = 4096;

/// Topics a member keeps counters for by name (`/stats`, `/metrics`); the counters of further
/// topics are summed under [`OTHER_TOPICS`].
pub const TOPIC_STATS_MAX: usize = 4096;

/// The name the counters of topics beyond [`TOPIC_STATS_MAX`] are summed under.
pub const OTHER_TOPICS: &str = "(other topics)";

/// What a message adds to its payload at most on the wire (names, envelope, framing).
const MESSAGE_OVERHEAD_BYTES: usize = 2048;

/// A message received from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<T> {
    /// The payload.
    pub payload: T,
    /// The member that published it.
    pub publisher: MemberId,
    /// When it was published, in ms since the Unix epoch (the publisher's clock).
    pub publish_time_ms: u64,
    /// Its sequence number in a reliable topic's ring buffer (`None` for plain topics).
    pub sequence: Option<u64>,
}

/// One topic's statistics on one member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TopicStats {
    /// The topic name.
    pub name: String,
    /// `topic` or `reliable`.
    pub kind: String,
    /// Messages published from this member.
    pub published: u64,
    /// Messages delivered to this member's subscribers (counted once per subscriber).
    pub received: u64,
    /// Subscribers on this member.
    pub subscribers: u64,
    /// Plain: messages dropped because a subscriber's queue was full (or a member could not be
    /// sent to). Reliable: messages refused by the `discard_newest` policy.
    pub dropped: u64,
    /// Reliable: messages subscribers lost by falling behind the ring buffer.
    pub lost: u64,
    /// Messages for this topic that arrived malformed, or did not decode for a subscriber.
    pub malformed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    lost: AtomicU64,
    malformed: AtomicU64,
}

/// What a subscriber's queue carries.
#[derive(Debug, Clone)]
enum Delivery {
    Message {
        publisher: MemberId,
        publish_time_ms: u64,
        sequence: Option<u64>,
        payload: Arc<[u8]>,
        /// Plain topics: messages dropped for this subscriber just before this one.
        missed_before: u64,
    },
    Malformed {
        from: String,
        message: String,
    },
    Lost {
        missed: u64,
        resumed_at: u64,
    },
}

/// One local subscriber of a plain topic.
#[derive(Debug)]
struct LocalSubscriber {
    id: u64,
    tx: mpsc::Sender<Delivery>,
    /// Messages dropped since the last one queued.
    missed: u64,
}

/// Subscriptions of other members: from gossip, and from their `Subscribe` messages until
/// they leave the view or unsubscribe.
#[derive(Debug, Default)]
struct Registry {
    remote: RwLock<HashMap<(TopicKind, String), Vec<MemberId>>>,
    explicit: Mutex<HashMap<MemberId, HashSet<(TopicKind, String)>>>,
}

impl Registry {
    fn members(&self, kind: TopicKind, topic: &str) -> Vec<MemberId> {
        self.remote.read().unwrap().get(&(kind, topic.to_string())).cloned().unwrap_or_default()
    }

    fn refresh(&self, view: &ClusterView, local: &MemberId) {
        let mut remote: HashMap<(TopicKind, String), Vec<MemberId>> = HashMap::new();
        let live: HashSet<&MemberId> = view.members.iter().map(|m| &m.id).collect();
        for member in view.members.iter().filter(|m| m.id != *local) {
            for key in member.ext.keys() {
                let entry = if let Some(topic) = key.strip_prefix(PLAIN_KEY_PREFIX) {
                    (TopicKind::Plain, topic.to_string())
                } else if let Some(topic) = key.strip_prefix(RELIABLE_KEY_PREFIX) {
                    (TopicKind::Reliable, topic.to_string())
                } else {
                    continue;
                };
                remote.entry(entry).or_default().push(member.id.clone());
            }
        }
        let mut explicit = self.explicit.lock().unwrap();
        explicit.retain(|member, _| live.contains(member));
        for (member, topics) in explicit.iter() {
            for topic in topics {
                let members = remote.entry(topic.clone()).or_default();
                if !members.contains(member) {
                    members.push(member.clone());
                }
            }
        }
        drop(explicit);
        *self.remote.write().unwrap() = remote;
    }
}

/// Shared state of the topic service on one member.
struct Inner {
    local: MemberId,
    net: Net,
    membership: Membership,
    maps: Arc<MapService>,
    settings: TopicSettings,
    registry: Registry,
    plain: Mutex<HashMap<String, Vec<LocalSubscriber>>>,
    readers: Mutex<HashMap<String, Vec<Arc<reliable::ReaderShared>>>>,
    counters: Mutex<HashMap<(TopicKind, String), Arc<Counters>>>,
    /// Topic messages whose outer layer did not decode (their topic is unknown).
    undecodable: AtomicU64,
    next_id: AtomicU64,
    /// Serialises gossip announcements and retractions of subscriptions.
    announcements: tokio::sync::Mutex<()>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicService").field("local", &self.local).finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    Bytes::from(codec::encode(value).expect("topic messages always encode"))
}

fn key_prefix(kind: TopicKind) -> &'static str {
    match kind {
        TopicKind::Plain => PLAIN_KEY_PREFIX,
        TopicKind::Reliable => RELIABLE_KEY_PREFIX,
    }
}

impl Inner {
    fn counters(&self, kind: TopicKind, topic: &str) -> Arc<Counters> {
        let mut counters = self.counters.lock().unwrap();
        if let Some(c) = counters.get(&(kind, topic.to_string())) {
            return c.clone();
        }
        // Topic names come from callers and from other members: beyond the bound, counters are
        // summed under one name instead of growing without limit.
        let name = if counters.len() >= TOPIC_STATS_MAX { OTHER_TOPICS } else { topic };
        counters.entry((kind, name.to_string())).or_default().clone()
    }

    /// The largest envelope a message of `topic` may have.
    fn envelope_bytes_max(&self, topic: &str) -> usize {
        self.net.frame_bytes_max().saturating_sub(topic.len() + MESSAGE_OVERHEAD_BYTES)
    }

    /// Encodes a message's envelope, refusing what could not reach other members.
    fn envelope<T: Serialize>(&self, topic: &str, payload: &T) -> Result<Vec<u8>, TopicError> {
        let payload = codec::encode(payload)
            .map_err(|e| TopicError::Encode { topic: topic.to_string(), message: e.to_string() })?;
        let envelope = Envelope { publisher: self.local.clone(), publish_time_ms: now_ms(), payload };
        let bytes = codec::encode(&envelope)
            .map_err(|e| TopicError::Encode { topic: topic.to_string(), message: e.to_string() })?;
        let max = self.envelope_bytes_max(topic);
        if bytes.len() > max {
            return Err(TopicError::TooLarge { topic: topic.to_string(), bytes: bytes.len(), max });
        }
        Ok(bytes)
    }

    /// Announces that this member has subscribers of `topic`: gossip, and a `Subscribe` to
    /// every member, waiting (bounded) for their answers so that publishing starts at once.
    async fn announce(&self, kind: TopicKind, topic: &str) {
        let _guard = self.announcements.lock().await;
        self.membership.set_ext_key(&format!("{}{topic}", key_prefix(kind)), "1").await;
        let body = encode(&TopicMsg::Subscribe { kind, topic: topic.to_string() });
        let timeout = self.settings.operation_timeout.min(Duration::from_secs(5));
        let mut calls = tokio::task::JoinSet::new();
        for member in self.membership.view().members.iter().filter(|m| m.id != self.local) {
            let request = self.net.request(&member.id, TOPIC_SERVICE, body.clone(), timeout);
            let id = member.id.clone();
            calls.spawn(async move { (id, request.await) });
        }
        while let Some(joined) = calls.join_next().await {
            if let Ok((member, Err(error))) = joined {
                // Gossip tells it soon anyway.
                debug!(%member, %error, topic, "subscription not registered directly");
            }
        }
        info!(topic, kind = kind.as_str(), "subscribed");
    }

    /// Retracts the announcement if this member has no subscribers of `topic` any more.
    async fn retract(self: Arc<Self>, kind: TopicKind, topic: String) {
        let _guard = self.announcements.lock().await;
        let still = match kind {
            TopicKind::Plain => self.plain.lock().unwrap().contains_key(&topic),
            TopicKind::Reliable => self.readers.lock().unwrap().contains_key(&topic),
        };
        if still {
            return;
        }
        self.membership.delete_ext_key(&format!("{}{topic}", key_prefix(kind))).await;
        let body = encode(&TopicMsg::Unsubscribe { kind, topic: topic.clone() });
        for member in self.membership.view().members.iter().filter(|m| m.id != self.local) {
            let _ = self.net.send(&member.id, TOPIC_SERVICE, body.clone());
        }
        debug!(topic, kind = kind.as_str(), "no subscribers left");
    }

    /// Queues `delivery` for every local subscriber of plain topic `topic`, dropping it for
    /// those whose queue is full. Returns the subscribers it was queued for.
    fn deliver_plain(&self, topic: &str, delivery: Delivery) -> usize {
        let mut plain = self.plain.lock().unwrap();
        let Some(subscribers) = plain.get_mut(topic) else { return 0 };
        let mut queued = 0;
        let counters = self.counters(TopicKind::Plain, topic);
        for sub in subscribers.iter_mut() {
            let mut item = delivery.clone();
            if let Delivery::Message { missed_before, .. } = &mut item {
                *missed_before = sub.missed;
            }
            match sub.tx.try_send(item) {
                Ok(()) => {
                    sub.missed = 0;
                    queued += 1;
                    if matches!(delivery, Delivery::Message { .. }) {
                        counters.received.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counters.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.missed += 1;
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The subscription is being dropped.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        queued
    }

    /// A reliable topic's message `seq` was stored: hand it to this member's readers.
    fn deliver_stored(&self, topic: &str, seq: u64, envelope: Arc<[u8]>) {
        let readers = self.readers.lock().unwrap();
        for reader in readers.get(topic).into_iter().flatten() {
            reader.push(seq, envelope.clone());
        }
    }

    fn local_stats(&self) -> Vec<TopicStats> {
        let counters: Vec<((TopicKind, String), Arc<Counters>)> =
            self.counters.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let plain: HashMap<String, u64> =
            self.plain.lock().unwrap().iter().map(|(t, subs)| (t.clone(), subs.len() as u64)).collect();
        let readers: HashMap<String, u64> =
            self.readers.lock().unwrap().iter().map(|(t, r)| (t.clone(), r.len() as u64)).collect();
        let mut stats: Vec<TopicStats> = counters
            .into_iter()
            .map(|((kind, name), c)| {
                let subscribers = match kind {
                    TopicKind::Plain => plain.get(&name).copied().unwrap_or(0),
                    TopicKind::Reliable => readers.get(&name).copied().unwrap_or(0),
                };
                TopicStats {
                    kind: kind.as_str().to_string(),
                    published: c.published.load(Ordering::Relaxed),
                    received: c.received.load(Ordering::Relaxed),
                    subscribers,
                    dropped: c.dropped.load(Ordering::Relaxed),
                    lost: c.lost.load(Ordering::Relaxed),
                    malformed: c.malformed.load(Ordering::Relaxed),
                    name,
                }
            })
            .collect();
        stats.sort_by(|a, b| (&a.name, &a.kind).cmp(&(&b.name, &b.kind)));
        stats
    }

    fn handle(&self, from: &MemberId, msg: TopicMsg) -> TopicReply {
        match msg {
            TopicMsg::Publish { topic, envelope } => {
                let delivery = match codec::decode::<Envelope>(&envelope) {
                    Ok(e) => Delivery::Message {
                        publisher: e.publisher,
                        publish_time_ms: e.publish_time_ms,
                        sequence: None,
                        payload: e.payload.into(),
                        missed_before: 0,
                    },
                    Err(error) => {
                        warn!(%from, topic, %error, "malformed topic message; reported to the topic's subscribers");
                        Delivery::Malformed { from: from.to_string(), message: error.to_string() }
                    }
                };
                self.deliver_plain(&topic, delivery);
                TopicReply::Ack
            }
            TopicMsg::Stored { topic, seq, envelope } => {
                self.deliver_stored(&topic, seq, envelope.into());
                TopicReply::Ack
            }
            TopicMsg::Subscribe { kind, topic } => {
                if check_name(&topic).is_err() {
                    return TopicReply::Failed { error: "invalid topic name".into() };
                }
                if self.membership.view().member(from).is_none() {
                    return TopicReply::Failed { error: "not a member of this member's view (yet)".into() };
                }
                let mut explicit = self.registry.explicit.lock().unwrap();
                let topics = explicit.entry(from.clone()).or_default();
                if topics.len() >= REGISTRATIONS_PER_MEMBER_MAX && !topics.contains(&(kind, topic.clone())) {
                    return TopicReply::Failed {
                        error: format!("at most {REGISTRATIONS_PER_MEMBER_MAX} subscribed topics per member"),
                    };
                }
                topics.insert((kind, topic));
                drop(explicit);
                self.registry.refresh(&self.membership.view(), &self.local);
                TopicReply::Ack
            }
            TopicMsg::Unsubscribe { kind, topic } => {
                if let Some(topics) = self.registry.explicit.lock().unwrap().get_mut(from) {
                    topics.remove(&(kind, topic));
                }
                self.registry.refresh(&self.membership.view(), &self.local);
                TopicReply::Ack
            }
            TopicMsg::Stats => TopicReply::Stats(self.local_stats()),
        }
    }
}

/// The net handler of topics.
struct TopicHandler {
    inner: std::sync::Weak<Inner>,
}

impl Handler for TopicHandler {
    fn handle(&self, from: &MemberId, body: Bytes, _incoming: &Incoming<'_>) -> NetReply {
        let Some(inner) = self.inner.upgrade() else {
            return NetReply::Now(encode(&TopicReply::Failed { error: "topic service stopped".into() }));
        };
        match codec::decode::<TopicMsg>(&body) {
            Ok(msg) => NetReply::Now(encode(&inner.handle(from, msg))),
            Err(error) => {
                inner.undecodable.fetch_add(1, Ordering::Relaxed);
                warn!(%from, %error, "undecodable topic message; ignoring it");
                NetReply::Now(encode(&TopicReply::Failed { error: format!("undecodable message: {error}") }))
            }
        }
    }
}

/// Keeps the registry of other members' subscriptions in step with the view.
async fn registry_loop(inner: Arc<Inner>) {
    let mut views = inner.membership.watch();
    loop {
        let view = views.borrow_and_update().clone();
        inner.registry.refresh(&view, &inner.local);
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            _ = inner.cancel.cancelled() => return,
        }
    }
}

/// The topic service of one member. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TopicService {
    inner: Arc<Inner>,
}

impl TopicService {
    /// Starts the service: registers its data-plane handler and its background task. Reliable
    /// topics keep their ring buffers in `maps`.
    pub fn start(net: Net, membership: Membership, maps: Arc<MapService>, settings: TopicSettings) -> TopicService {
        let inner = Arc::new(Inner {
            local: membership.local_id().clone(),
            net: net.clone(),
            membership,
            maps,
            settings,
            registry: Registry::default(),
            plain: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
            undecodable: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            announcements: tokio::sync::Mutex::new(()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        net.register(TOPIC_SERVICE, Arc::new(TopicHandler { inner: Arc::downgrade(&inner) }));
        inner.tasks.spawn(registry_loop(inner.clone()));
        TopicService { inner }
    }

    /// The plain topic `name`.
    pub fn topic<T>(&self, name: &str) -> Result<Topic<T>, TopicError> {
        check_name(name).map_err(TopicError::Invalid)?;
        Ok(Topic::new(name, self.inner.clone()))
    }

    /// The reliable topic `name`, with its settings from `[reliable_topics.NAME]` (or
    /// `[reliable_topics.default]`).
    pub fn reliable_topic<T>(&self, name: &str) -> Result<ReliableTopic<T>, TopicError> {
        check_name(name).map_err(TopicError::Invalid)?;
        Ok(ReliableTopic::new(name, self.inner.clone()))
    }

    /// This member's topic statistics (topics used here).
    pub fn local_stats(&self) -> Vec<TopicStats> {
        self.inner.local_stats()
    }

    /// Topic messages that arrived so malformed that their topic is unknown.
    pub fn undecodable_messages(&self) -> u64 {
        self.inner.undecodable.load(Ordering::Relaxed)
    }

    /// Every member's topic statistics (this one's included), or why a member did not answer.
    pub async fn cluster_stats(&self, timeout: Duration) -> Vec<(MemberId, Result<Vec<TopicStats>, String>)> {
        let inner = &self.inner;
        let mut calls = tokio::task::JoinSet::new();
        for member in inner.membership.view().members.iter().filter(|m| m.id != inner.local) {
            let request = inner.net.request(&member.id, TOPIC_SERVICE, encode(&TopicMsg::Stats), timeout);
            let id = member.id.clone();
            calls.spawn(async move {
                let outcome = match request.await {
                    Ok(bytes) => match codec::decode::<TopicReply>(&bytes) {
                        Ok(TopicReply::Stats(stats)) => Ok(stats),
                        Ok(other) => Err(format!("unexpected reply {other:?}")),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                (id, outcome)
            });
        }
        let mut all = vec![(inner.local.clone(), Ok(inner.local_stats()))];
        while let Some(joined) = calls.join_next().await {
            if let Ok(result) = joined {
                all.push(result);
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Test hook: the body of a plain topic message for `topic` whose envelope is `envelope` (any
    /// bytes), to send with `Net::send` to [`TOPIC_SERVICE`].
    #[doc(hidden)]
    pub fn publish_body_for_tests(topic: &str, envelope: Vec<u8>) -> Bytes {
        encode(&TopicMsg::Publish { topic: topic.to_string(), envelope })
    }

    /// Stops the service: subscriptions end (their next `recv` returns `None`) and background
    /// tasks are awaited (bounded).
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.plain.lock().unwrap().clear();
        self.inner.readers.lock().unwrap().clear();
        self.inner.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.inner.tasks.wait()).await.is_err() {
            warn!("topic service tasks did not stop within 10 s");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
