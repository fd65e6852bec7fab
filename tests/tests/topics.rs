//! Topics and reliable topics on real in-process members.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use grapevine::{
    Cluster, Message, OverloadPolicy, ReliableTopicConfig, StartAt, TopicConfig, TopicError, TopicService,
};
use grapevine_tests::{TestCluster, WAIT, start_member, test_config, wait_until};

/// The next item of a subscription, within the test deadline.
async fn next<T: serde::de::DeserializeOwned>(sub: &mut grapevine::Subscription<T>) -> Result<Message<T>, TopicError> {
    tokio::time::timeout(WAIT, sub.recv()).await.expect("a message in time").expect("the subscription is open")
}

async fn next_reliable<T: serde::de::DeserializeOwned>(
    sub: &mut grapevine::ReliableSubscription<T>,
) -> Result<Message<T>, TopicError> {
    tokio::time::timeout(WAIT, sub.recv()).await.expect("a message in time").expect("the subscription is open")
}

/// The members that see `node`'s subscription (to wait for gossip where a test needs it).
fn sees_subscription(cluster: &Cluster, key: &str, node: &Cluster) -> bool {
    cluster.view().member(node.local()).is_some_and(|m| m.ext.contains_key(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_reaches_every_subscriber_once_in_publish_order_per_publisher() {
    let cluster = TestCluster::start(3).await;
    const PER_PUBLISHER: u32 = 200;
    // Two subscribers on the first member, one on each other.
    let mut subs = Vec::new();
    for i in [0, 0, 1, 2] {
        subs.push(cluster.member(i).topic::<(usize, u32)>("news").unwrap().subscribe().await.unwrap());
    }
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..3 {
        let topic = cluster.member(p).topic::<(usize, u32)>("news").unwrap();
        publishers.spawn(async move {
            for i in 0..PER_PUBLISHER {
                topic.publish(&(p, i)).await.unwrap();
            }
        });
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    for (s, sub) in subs.iter_mut().enumerate() {
        let mut seen: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for _ in 0..3 * PER_PUBLISHER {
            let message = next(sub).await.unwrap_or_else(|e| panic!("subscriber {s}: {e}"));
            let (p, i) = message.payload;
            assert_eq!(message.publisher, *cluster.member(p).local(), "the publisher is named");
            assert!(message.sequence.is_none());
            seen.entry(p).or_default().push(i);
        }
        for p in 0..3 {
            assert_eq!(
                seen[&p],
                (0..PER_PUBLISHER).collect::<Vec<_>>(),
                "subscriber {s}, publisher {p}: once, in order"
            );
        }
        // Nothing more arrives (no duplicate).
        assert!(tokio::time::timeout(Duration::from_millis(200), sub.recv()).await.is_err(), "subscriber {s}");
    }
    let stats = cluster.member(1).stats().await;
    let news = stats.topics.iter().find(|t| t.name == "news" && t.kind == "topic").expect("the topic is in /stats");
    assert_eq!((news.published, news.received, news.subscribers), (600, 2400, 4), "{news:?}");
    assert_eq!(news.dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_joins_later_gets_the_messages_published_after_it_subscribed() {
    let cluster = TestCluster::start(3).await;
    let publisher = cluster.member(0).topic::<String>("events").unwrap();
    let mut early = cluster.member(1).topic::<String>("events").unwrap().subscribe().await.unwrap();
    publisher.publish(&"before".to_string()).await.unwrap();
    assert_eq!(next(&mut early).await.unwrap().payload, "before");

    let seeds: Vec<&Cluster> = cluster.members.iter().collect();
    let late = start_member(test_config(cluster.member(0).name()), &seeds).await;
    wait_until("the new member to be active everywhere", WAIT, || {
        cluster.members.iter().chain([&late]).all(|m| m.view().active_members().count() == 4)
    })
    .await;
    let mut sub = late.topic::<String>("events").unwrap().subscribe().await.unwrap();
    // Registered directly with every member before `subscribe` returned: no waiting for gossip.
    publisher.publish(&"after".to_string()).await.unwrap();
    let message = next(&mut sub).await.unwrap();
    assert_eq!(message.payload, "after", "the late subscriber gets what was published after it subscribed");
    assert_eq!(next(&mut early).await.unwrap().payload, "after");
    late.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_misses_messages_and_is_told_how_many_without_slowing_the_others() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.topics.insert("ticks".into(), TopicConfig { queue_capacity: 8 });
        config
    })
    .await;
    let topic = cluster.member(1).topic::<u32>("ticks").unwrap();
    let mut slow = topic.subscribe().await.unwrap();
    let mut fast = topic.subscribe().await.unwrap();
    let publisher = cluster.member(0).topic::<u32>("ticks").unwrap();
    // The fast one reads each message as it comes; the slow one reads nothing meanwhile.
    for i in 0..100 {
        publisher.publish(&i).await.unwrap();
        assert_eq!(next(&mut fast).await.unwrap().payload, i, "the fast subscriber gets everything");
    }
    wait_until("the slow subscriber's drops to be counted", WAIT, || {
        cluster.member(1).topic_service().local_stats().iter().any(|t| t.name == "ticks" && t.dropped == 92)
    })
    .await;
    for i in 0..8 {
        assert_eq!(next(&mut slow).await.unwrap().payload, i, "its queue held the first 8");
    }
    publisher.publish(&100).await.unwrap();
    match next(&mut slow).await {
        Err(TopicError::Lagged { missed: 92, capacity: 8, .. }) => {}
        other => panic!("expected the 92 missed messages to be reported, got {other:?}"),
    }
    assert_eq!(next(&mut slow).await.unwrap().payload, 100, "and the subscription goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_and_payloads_of_another_type_are_reported_to_the_subscriber() {
    let cluster = TestCluster::start(2).await;
    let (a, b) = (cluster.member(0), cluster.member(1));
    let mut sub = b.topic::<u64>("typed").unwrap().subscribe().await.unwrap();
    // Another type on the same topic.
    a.topic::<String>("typed").unwrap().publish(&"not a number".to_string()).await.unwrap();
    match next(&mut sub).await {
        Err(TopicError::Decode { publisher, .. }) => assert_eq!(publisher, a.local().to_string()),
        other => panic!("expected a decode error, got {other:?}"),
    }
    // A message whose envelope is garbage, and bytes that are no topic message at all.
    let body = TopicService::publish_body_for_tests("typed", vec![0xff; 13]);
    a.net().send(b.local(), grapevine_topic::TOPIC_SERVICE, body).unwrap();
    a.net().send(b.local(), grapevine_topic::TOPIC_SERVICE, vec![0xfe, 0x01, 0x02].into()).unwrap();
    match next(&mut sub).await {
        Err(TopicError::Malformed { from, .. }) => assert_eq!(from, a.local().to_string()),
        other => panic!("expected a malformed-message error, got {other:?}"),
    }
    wait_until("the undecodable message to be counted", WAIT, || b.topic_service().undecodable_messages() == 1).await;
    // The subscription and the member go on.
    a.topic::<u64>("typed").unwrap().publish(&7).await.unwrap();
    assert_eq!(next(&mut sub).await.unwrap().payload, 7);
    assert!(b.health().healthy, "{:?}", b.health());
    let typed = b.topic_service().local_stats().into_iter().find(|t| t.name == "typed").unwrap();
    assert_eq!(typed.malformed, 2, "{typed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_ring_buffer_owner_loses_no_acknowledged_message_and_subscribers_resume_without_gaps() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let maps = cluster.member(0).map_service();
    let owner_id = maps.table().owner(maps.ring_partition("orders")).cloned().unwrap();
    let owner = cluster.members.iter().position(|m| *m.local() == owner_id).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut subs = Vec::new();
    for &i in &others {
        let topic = cluster.member(i).reliable_topic::<u32>("orders").unwrap();
        subs.push(topic.subscribe(StartAt::Oldest).await.unwrap());
    }
    let publisher = cluster.member(others[0]).reliable_topic::<u32>("orders").unwrap();
    let mut acked: Vec<(u64, u32)> = Vec::new();
    let mut n = 0u32;
    while acked.len() < 50 {
        acked.push((publisher.publish(&n).await.unwrap().unwrap(), n));
        n += 1;
    }
    // Kill the owner while a publisher keeps going; it stops once 50 publishes were acknowledged
    // after the ring buffer changed owner.
    let moved = Arc::new(AtomicBool::new(false));
    let publishing = {
        let publisher = publisher.clone();
        let moved = moved.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut after_move = 0;
            let mut failed = 0;
            let mut n = 1_000u32;
            while after_move < 50 {
                if moved.load(Ordering::SeqCst) {
                    after_move += 1;
                }
                match publisher.publish(&n).await {
                    Ok(Some(seq)) => acked.push((seq, n)),
                    Ok(None) => panic!("nothing is discarded with the block policy"),
                    // The outcome of a publish in flight to the dying owner is unknown.
                    Err(_) => failed += 1,
                }
                n += 1;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    cluster.member(owner).kill().await;
    let partition = maps.ring_partition("orders");
    let survivor = cluster.member(others[0]).map_service();
    wait_until("the ring buffer to change owner", WAIT, || {
        survivor.table().owner(partition).is_some_and(|o| *o != owner_id)
    })
    .await;
    moved.store(true, Ordering::SeqCst);
    let (after, _failed) = tokio::time::timeout(WAIT, publishing).await.expect("publishes go on").unwrap();
    acked.extend(after);

    let expected: BTreeMap<u64, u32> = acked.iter().copied().collect();
    assert_eq!(expected.len(), acked.len(), "every acknowledged message has its own sequence");
    for (s, sub) in subs.iter_mut().enumerate() {
        let mut got: Vec<(u64, u32)> = Vec::new();
        let last = *expected.keys().last().unwrap();
        while got.last().is_none_or(|(seq, _)| *seq < last) {
            let message = next_reliable(sub).await.unwrap_or_else(|e| panic!("subscriber {s}: {e}"));
            got.push((message.sequence.unwrap(), message.payload));
        }
        for pair in got.windows(2) {
            assert_eq!(pair[1].0, pair[0].0 + 1, "subscriber {s}: no gap and no duplicate: {pair:?}");
        }
        assert_eq!(got[0].0, 0);
        let payloads: HashSet<u32> = got.iter().map(|(_, p)| *p).collect();
        assert_eq!(payloads.len(), got.len(), "subscriber {s}: no message twice");
        let got: BTreeMap<u64, u32> = got.into_iter().collect();
        for (seq, payload) in &expected {
            assert_eq!(got.get(seq), Some(payload), "subscriber {s}: acknowledged message {payload} at {seq}");
        }
    }
}

fn reliable(capacity: u64, retention_seconds: u64, overload_policy: OverloadPolicy) -> ReliableTopicConfig {
    ReliableTopicConfig { capacity, retention_seconds, overload_policy, ..ReliableTopicConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_behind_the_capacity_is_told_it_lost_messages_and_chooses_to_go_on() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.reliable_topics.insert("small".into(), reliable(10, 0, OverloadPolicy::Block));
        config
    })
    .await;
    let topic = cluster.member(0).reliable_topic::<u32>("small").unwrap();
    for i in 0..30 {
        assert_eq!(topic.publish(&i).await.unwrap(), Some(u64::from(i)));
    }
    let reader = cluster.member(1).reliable_topic::<u32>("small").unwrap();
    let mut behind = reader.subscribe(StartAt::Sequence(0)).await.unwrap();
    match next_reliable(&mut behind).await {
        Err(TopicError::Lost { missed: 20, resumed_at: 20, .. }) => {}
        other => panic!("expected lost 20, got {other:?}"),
    }
    for i in 20..30 {
        let message = next_reliable(&mut behind).await.unwrap();
        assert_eq!((message.sequence, message.payload), (Some(u64::from(i)), i));
    }
    let mut oldest = reader.subscribe(StartAt::Oldest).await.unwrap();
    assert_eq!(next_reliable(&mut oldest).await.unwrap().sequence, Some(20), "the oldest held, no error");
    let mut newest = reader.subscribe(StartAt::Newest).await.unwrap();
    let mut resumed = reader.subscribe(StartAt::Sequence(25)).await.unwrap();
    assert_eq!(next_reliable(&mut resumed).await.unwrap().payload, 25);
    topic.publish(&30).await.unwrap();
    assert_eq!(next_reliable(&mut newest).await.unwrap().payload, 30, "only what came after");
    assert_eq!(next_reliable(&mut behind).await.unwrap().payload, 30, "the lagging one went on");
    wait_until("the loss to be counted", WAIT, || {
        cluster.member(1).topic_service().local_stats().iter().any(|t| t.name == "small" && t.lost == 20)
    })
    .await;
    let stats = cluster.member(0).stats().await;
    let small = stats.topics.iter().find(|t| t.name == "small").unwrap();
    assert_eq!((small.kind.as_str(), small.stored, small.published), ("reliable", 10, 31), "{small:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_policies_decide_what_a_full_ring_buffer_does() {
    let cluster = TestCluster::start_with(1, |name| {
        let mut config = test_config(name);
        config.reliable_topics.insert("error".into(), reliable(2, 600, OverloadPolicy::Error));
        config.reliable_topics.insert("newest".into(), reliable(2, 600, OverloadPolicy::DiscardNewest));
        config.reliable_topics.insert("oldest".into(), reliable(2, 600, OverloadPolicy::DiscardOldest));
        config.reliable_topics.insert("block".into(), reliable(2, 1, OverloadPolicy::Block));
        config
    })
    .await;
    let member = cluster.member(0);
    for name in ["error", "newest", "oldest", "block"] {
        let topic = member.reliable_topic::<u32>(name).unwrap();
        assert_eq!(topic.publish(&0).await.unwrap(), Some(0), "{name}");
        assert_eq!(topic.publish(&1).await.unwrap(), Some(1), "{name}");
    }
    let full = member.reliable_topic::<u32>("error").unwrap().publish(&2).await;
    assert!(matches!(full, Err(TopicError::Overloaded { capacity: 2, .. })), "{full:?}");
    assert_eq!(member.reliable_topic::<u32>("newest").unwrap().publish(&2).await.unwrap(), None, "dropped");
    assert_eq!(member.reliable_topic::<u32>("oldest").unwrap().publish(&2).await.unwrap(), Some(2), "overwrote");
    // Blocks until the oldest message is older than its one second of retention.
    let started = Instant::now();
    let block = member.reliable_topic::<u32>("block").unwrap();
    assert_eq!(block.publish(&2).await.unwrap(), Some(2));
    let mut sub = block.subscribe(StartAt::Oldest).await.unwrap();
    assert_eq!(next_reliable(&mut sub).await.unwrap().sequence, Some(1), "the oldest was overwritten");
    assert!(started.elapsed() < WAIT);
    for (name, oldest) in [("newest", 0), ("oldest", 1)] {
        let mut sub = member.reliable_topic::<u32>(name).unwrap().subscribe(StartAt::Oldest).await.unwrap();
        assert_eq!(next_reliable(&mut sub).await.unwrap().payload, oldest, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_announced_and_retracted_in_gossip() {
    let cluster = TestCluster::start(2).await;
    let (a, b) = (cluster.member(0), cluster.member(1));
    let sub = b.topic::<u8>("gossiped").unwrap().subscribe().await.unwrap();
    wait_until("the subscription to be gossiped", WAIT, || sees_subscription(a, "topic:gossiped", b)).await;
    drop(sub);
    wait_until("the retraction to be gossiped", WAIT, || !sees_subscription(a, "topic:gossiped", b)).await;
}

/// Topic names come from callers and from other members: the counters kept per name are
/// bounded, those of further topics summed under one name, so publishing to ever-new names does
/// not grow a member's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_of_ever_new_topic_names_are_bounded() {
    let cluster = TestCluster::start(1).await;
    cluster.wait_settled().await;
    let member = cluster.member(0);
    let extra = 10;
    for i in 0..grapevine::TOPIC_STATS_MAX + extra {
        member.topic::<u32>(&format!("t-{i}")).unwrap().publish(&1).await.unwrap();
    }
    let stats = member.topic_service().local_stats();
    assert!(stats.len() <= grapevine::TOPIC_STATS_MAX + 1, "{} topics counted", stats.len());
    let other = stats.iter().find(|t| t.name == grapevine::OTHER_TOPICS).expect("the overflow row");
    assert_eq!(other.published, extra as u64);
    let total: u64 = stats.iter().map(|t| t.published).sum();
    assert_eq!(total, (grapevine::TOPIC_STATS_MAX + extra) as u64, "every publish is counted once");
}
