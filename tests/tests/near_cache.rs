//! Near caches kept fresh by invalidation events, on real in-process members.

use std::time::{Duration, Instant};

use grapevine::{Cluster, MapConfig, NearCacheConfig, NearCacheStats};
use grapevine_tests::{TestCluster, WAIT, encode_key, test_config, wait_until, wait_until_async};

const MAP: &str = "cached";

fn near_cache_config(name: &str, near: NearCacheConfig) -> grapevine::Config {
    let mut config = test_config(name);
    config.maps.insert(MAP.into(), MapConfig { near_cache: Some(near), ..MapConfig::default() });
    config
}

fn stats(member: &Cluster) -> NearCacheStats {
    member.map_service().near_cache_stats().into_iter().find(|s| s.map == MAP).unwrap_or_default()
}

/// A key of `MAP` whose partition `reader` does not own, and the member index owning it; with
/// `partition`, a key of that partition.
fn key_owned_elsewhere(cluster: &TestCluster, reader: usize, partition: Option<u32>, skip: &str) -> (String, usize) {
    let maps = cluster.member(reader).map_service();
    for i in 0.. {
        let key = format!("key-{i}");
        if key == skip {
            continue;
        }
        let p = maps.partition_of(&encode_key(&key));
        if partition.is_some_and(|want| want != p) {
            continue;
        }
        let owner = maps.table().owner(p).cloned().unwrap();
        if owner != *cluster.member(reader).local() {
            let index = cluster.members.iter().position(|m| *m.local() == owner).unwrap();
            return (key, index);
        }
    }
    unreachable!()
}

/// Reads `key` on `reader` until the read is answered from its near cache.
async fn cache_it(reader: &Cluster, key: &String, value: &str) {
    let map = reader.map::<String, String>(MAP).unwrap();
    wait_until_async("the value to be near-cached", WAIT, || async {
        let before = stats(reader).hits;
        assert_eq!(map.get(key).await.unwrap().as_deref(), Some(value));
        stats(reader).hits > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cached_read_sees_an_acknowledged_update_once_its_invalidation_arrives() {
    let cluster = TestCluster::start_with(3, |name| near_cache_config(name, NearCacheConfig::default())).await;
    cluster.wait_settled().await;
    let (key, owner) = key_owned_elsewhere(&cluster, 1, None, "");
    let writer = cluster.member(owner).map::<String, String>(MAP).unwrap();
    let reader = cluster.member(1);
    writer.put(&key, &"v1".to_string()).await.unwrap();
    cache_it(reader, &key, "v1").await;
    let invalidations = stats(reader).invalidations;
    writer.put(&key, &"v2".to_string()).await.unwrap();
    let map = reader.map::<String, String>(MAP).unwrap();
    wait_until_async("the new value on the near-caching member", WAIT, || async {
        map.get(&key).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    assert!(stats(reader).invalidations > invalidations, "dropped by its event: {:?}", stats(reader));
    // A write through the near-caching member itself is read back at once.
    map.put(&key, &"v3".to_string()).await.unwrap();
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v3"));
    // The figures reach /stats.
    let doc = cluster.member(0).stats().await;
    let cached = doc.maps.iter().find(|m| m.name == MAP).unwrap();
    let near = cached.near_cache.as_ref().expect("near-cache figures in /stats");
    assert!(near.hits >= 1 && near.misses >= 1, "{near:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_invalidation_is_caught_by_the_sequence_gap_of_the_next_one() {
    // Position reports are rare here, so only the next event can reveal the gap.
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = near_cache_config(name, NearCacheConfig::default());
        config.invalidation.heartbeat_ms = 60_000;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (key, owner) = key_owned_elsewhere(&cluster, 1, None, "");
    let p = cluster.member(1).map_service().partition_of(&encode_key(&key));
    let (other_key, _) = key_owned_elsewhere(&cluster, 1, Some(p), &key);
    let writer = cluster.member(owner).map::<String, String>(MAP).unwrap();
    let reader = cluster.member(1);
    let map = reader.map::<String, String>(MAP).unwrap();
    writer.put(&key, &"v1".to_string()).await.unwrap();
    cache_it(reader, &key, "v1").await;

    reader.map_service().drop_invalidations_for_tests(true);
    writer.put(&key, &"v2".to_string()).await.unwrap();
    wait_until("the invalidation to be dropped", WAIT, || reader.map_service().dropped_invalidations() >= 1).await;
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v1"), "stale while the event is lost");
    reader.map_service().drop_invalidations_for_tests(false);

    let purges = stats(reader).purges;
    writer.put(&other_key, &"x".to_string()).await.unwrap();
    wait_until_async("the gap to purge the stale entry", WAIT, || async {
        map.get(&key).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    assert!(stats(reader).purges > purges, "{:?}", stats(reader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_invalidation_is_caught_by_the_owners_position_report() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = near_cache_config(name, NearCacheConfig::default());
        config.invalidation.heartbeat_ms = 200;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (key, owner) = key_owned_elsewhere(&cluster, 1, None, "");
    let writer = cluster.member(owner).map::<String, String>(MAP).unwrap();
    let reader = cluster.member(1);
    let map = reader.map::<String, String>(MAP).unwrap();
    writer.put(&key, &"v1".to_string()).await.unwrap();
    cache_it(reader, &key, "v1").await;
    // Every change event is lost from now on; nothing else changes the partition.
    reader.map_service().drop_invalidations_for_tests(true);
    writer.put(&key, &"v2".to_string()).await.unwrap();
    wait_until_async("the position report to purge the stale entry", WAIT, || async {
        map.get(&key).await.unwrap().as_deref() == Some("v2")
    })
    .await;
    assert!(reader.map_service().dropped_invalidations() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_change_purges_the_partition() {
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = near_cache_config(name, NearCacheConfig::default());
        // Only the owner change can purge here.
        config.invalidation.heartbeat_ms = 60_000;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (key, owner) = key_owned_elsewhere(&cluster, 1, None, "");
    let reader = cluster.member(1);
    let map = reader.map::<String, String>(MAP).unwrap();
    map.put(&key, &"v".to_string()).await.unwrap();
    cache_it(reader, &key, "v").await;
    let before = stats(reader);
    let p = reader.map_service().partition_of(&encode_key(&key));
    cluster.member(owner).shutdown().await;
    wait_until("the partition to have another owner", WAIT, || {
        reader.map_service().table().owner(p) != Some(cluster.member(owner).local())
    })
    .await;
    wait_until("the purge", WAIT, || stats(reader).purges > before.purges).await;
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v"));
    assert_eq!(stats(reader).misses, before.misses + 1, "the entry was dropped: the read went to the new owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_event_invalidation_staleness_is_bounded_by_the_ttl() {
    let ttl = Duration::from_secs(1);
    let cluster = TestCluster::start_with(2, |name| {
        let near = NearCacheConfig { ttl_seconds: 1, ..NearCacheConfig::default() };
        let mut config = near_cache_config(name, near);
        config.event_invalidation = false;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (key, owner) = key_owned_elsewhere(&cluster, 1, None, "");
    let writer = cluster.member(owner).map::<String, String>(MAP).unwrap();
    let reader = cluster.member(1);
    let map = reader.map::<String, String>(MAP).unwrap();
    writer.put(&key, &"v1".to_string()).await.unwrap();
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v1"));
    let cached_by = Instant::now();
    writer.put(&key, &"v2".to_string()).await.unwrap();
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v1"), "no event drops it");
    tokio::time::sleep_until((cached_by + ttl + Duration::from_millis(20)).into()).await;
    assert_eq!(map.get(&key).await.unwrap().as_deref(), Some("v2"), "expired after its time to live");
    assert_eq!(stats(reader).invalidations, 0);
    assert!(
        !cluster.member(owner).view().members.iter().any(|m| m.ext.contains_key(&format!("nc:{MAP}"))),
        "no member registers for events"
    );
}
