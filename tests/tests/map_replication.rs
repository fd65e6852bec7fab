//! Replication details: expiry on owners and backups, asynchronous backups, anti-entropy,
//! balance of the partition table, and what a write does when its backup cannot be reached.

use std::time::Duration;

use grapevine::{Cluster, Expiry, MapConfig, MapError};
use grapevine_tests::{TestCluster, WAIT, test_config, wait_until};

/// The member holding replica `index` of the partition of `key` (encoded as the map encodes it).
fn replica_of<'a>(cluster: &'a TestCluster, key: &str, index: usize) -> (&'a Cluster, u32) {
    let service = cluster.member(0).map_service();
    let encoded = grapevine_tests::encode_key(&key.to_string());
    let p = service.partition_of(&encoded);
    let member_id = service.table().row(p)[index].clone();
    (cluster.members.iter().find(|m| *m.local() == member_id).unwrap(), p)
}

fn holds(member: &Cluster, map: &str, p: u32, key: &str) -> bool {
    let encoded = grapevine_tests::encode_key(&key.to_string());
    member.map_service().local_entries(map, p).iter().any(|(k, _)| *k == encoded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_max_idle_expire_entries_on_owners_and_backups() {
    let cluster = TestCluster::start(2).await;
    cluster.wait_settled().await;
    let map = cluster.member(0).map::<String, String>("expiring").unwrap();
    map.put_with(&"ttl".into(), &"v".into(), Expiry::ttl(Duration::from_millis(300))).await.unwrap();
    map.put_with(&"idle".into(), &"v".into(), Expiry::max_idle(Duration::from_millis(400))).await.unwrap();
    map.put(&"forever".into(), &"v".into()).await.unwrap();
    let (ttl_backup, ttl_p) = replica_of(&cluster, "ttl", 1);
    assert!(holds(ttl_backup, "expiring", ttl_p, "ttl"), "the backup holds the entry before it expires");
    // Reading the idle entry keeps it alive past its max idle time.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        assert!(map.get(&"idle".into()).await.unwrap().is_some(), "an entry in use must not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The TTL entry is gone for readers, and swept from owner and backup.
    assert_eq!(map.get(&"ttl".into()).await.unwrap(), None);
    let (ttl_owner, _) = replica_of(&cluster, "ttl", 0);
    wait_until("the TTL entry to be swept on owner and backup", WAIT, || {
        !holds(ttl_owner, "expiring", ttl_p, "ttl") && !holds(ttl_backup, "expiring", ttl_p, "ttl")
    })
    .await;
    // Once nobody reads it, the idle entry expires, and the owner's removal reaches the backup.
    let (idle_backup, idle_p) = replica_of(&cluster, "idle", 1);
    let (idle_owner, _) = replica_of(&cluster, "idle", 0);
    wait_until("the idle entry to expire everywhere", WAIT, || {
        !holds(idle_owner, "expiring", idle_p, "idle") && !holds(idle_backup, "expiring", idle_p, "idle")
    })
    .await;
    assert_eq!(map.get(&"forever".into()).await.unwrap().as_deref(), Some("v"));
    assert_eq!(map.len().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_default_expiry_applies_to_plain_puts() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.maps.insert("short".into(), MapConfig { ttl_seconds: 1, ..MapConfig::default() });
        config
    })
    .await;
    let map = cluster.member(1).map::<String, String>("short").unwrap();
    map.put(&"k".into(), &"v".into()).await.unwrap();
    map.put_with(&"kept".into(), &"v".into(), Expiry::never()).await.unwrap();
    assert!(map.get(&"k".into()).await.unwrap().is_some());
    grapevine_tests::wait_until_async("the default TTL to expire the entry", WAIT, || async {
        map.get(&"k".into()).await.unwrap().is_none()
    })
    .await;
    assert!(map.get(&"kept".into()).await.unwrap().is_some(), "Expiry::never overrides the map default");
}

fn async_config(name: &str) -> grapevine::Config {
    let mut config = test_config(name);
    config.maps.insert("async".into(), MapConfig { backup_count: 0, async_backup_count: 1, ..MapConfig::default() });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_backups_catch_up_with_every_write() {
    let cluster = TestCluster::start_with(3, async_config).await;
    cluster.wait_settled().await;
    let map = cluster.member(0).map::<String, u32>("async").unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        map.put(key, &(i as u32)).await.unwrap();
    }
    wait_until("every asynchronous backup to hold its keys", WAIT, || {
        keys.iter().all(|key| {
            let (backup, p) = replica_of(&cluster, key, 1);
            holds(backup, "async", p, key)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_a_backup_that_missed_writes() {
    let cluster = TestCluster::start_with(3, async_config).await;
    cluster.wait_settled().await;
    let victim = cluster.member(2);
    // Every message to the victim is lost while the writes happen (its asynchronous copies too).
    for member in &cluster.members[..2] {
        member.net().faults().drop_outbound(victim.local(), None, true);
    }
    let map = cluster.member(0).map::<String, u32>("async").unwrap();
    // Keys the victim backs up but does not own (requests to the victim are dropped too).
    let keys: Vec<String> = (0..600)
        .map(|i| format!("k{i}"))
        .filter(|key| replica_of(&cluster, key, 0).0.local() != victim.local())
        .collect();
    for (i, key) in keys.iter().enumerate() {
        map.put(key, &(i as u32)).await.unwrap();
    }
    let missed: Vec<&String> = keys
        .iter()
        .filter(|key| {
            let (backup, p) = replica_of(&cluster, key, 1);
            *backup.local() == *victim.local() && !holds(victim, "async", p, key)
        })
        .collect();
    assert!(!missed.is_empty(), "the victim must have missed some writes for the test to prove anything");
    for member in &cluster.members[..2] {
        member.net().faults().drop_outbound(victim.local(), None, false);
    }
    // No write follows: only anti-entropy can notice. Run it now rather than wait for the timer.
    for member in &cluster.members {
        member.map_service().anti_entropy_now().await;
    }
    wait_until("anti-entropy to repair the backup", WAIT, || {
        missed.iter().all(|key| {
            let (_, p) = replica_of(&cluster, key, 1);
            holds(victim, "async", p, key)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_synchronous_backup_fails_the_write_with_a_clear_error() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.partitions.backup_ack_timeout_ms = 300;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (owner, other) = (cluster.member(0), cluster.member(1));
    let key =
        (0..).map(|i| format!("key-{i}")).find(|k| replica_of(&cluster, k, 0).0.local() == owner.local()).unwrap();
    owner.net().faults().drop_outbound(other.local(), None, true);
    let map = owner.map::<String, String>("strict").unwrap();
    let error = map.put(&key, &"v".into()).await.unwrap_err();
    assert!(matches!(error, MapError::Failed { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("backup") && message.contains("may or may not"), "{message}");
    owner.net().faults().drop_outbound(other.local(), None, false);
    // The owner keeps serving: the next write goes through once the backup is reachable again.
    map.put(&key, &"w".into()).await.unwrap();
    assert_eq!(other.map::<String, String>("strict").unwrap().get(&key).await.unwrap().as_deref(), Some("w"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_balanced_and_stats_describe_it() {
    let cluster = TestCluster::start(4).await;
    cluster.wait_settled().await;
    let map = cluster.member(3).map::<u32, u32>("counted").unwrap();
    for key in 0..400 {
        map.put(&key, &key).await.unwrap();
    }
    let stats = cluster.member(1).stats().await;
    let partitions = stats.partitions.expect("partitions in /stats");
    assert_eq!(partitions.count, 271);
    assert_eq!(partitions.owned_by_member.len(), 4);
    let owned: Vec<u32> = partitions.owned_by_member.values().copied().collect();
    assert!(owned.iter().max().unwrap() - owned.iter().min().unwrap() <= 1, "owners balanced: {owned:?}");
    let backups: Vec<u32> = partitions.backups_by_member.values().copied().collect();
    assert!(backups.iter().max().unwrap() - backups.iter().min().unwrap() <= 1, "backups balanced: {backups:?}");
    let counted = stats.maps.iter().find(|m| m.name == "counted").expect("the map in /stats");
    assert_eq!(counted.owned_entries, 400);
    assert_eq!(counted.backup_entries, 400, "backup_count 1: one copy of each entry");
    assert_eq!(counted.puts, 400);
    assert_eq!(counted.per_member.len(), 4);
    assert!(counted.memory_bytes > 400 * 8);
    assert!(counted.put_p99_us > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_started_at_the_same_moment_converge_on_one_table() {
    grapevine_tests::init_logging();
    for round in 0..3 {
        let ips: Vec<std::net::IpAddr> = (0..3).map(|_| grapevine_tests::next_loopback_ip()).collect();
        let port = 17_000 + round;
        let members: Vec<String> = ips.iter().map(|ip| format!("{ip}:{port}")).collect();
        let name = format!("together-{}-{round}", std::process::id());
        let starts = ips.iter().map(|ip| {
            let mut config = test_config(&name);
            config.port = port;
            config.port_auto_increment = false;
            config.bind = Some(*ip);
            config.members = members.clone();
            Cluster::start(config)
        });
        let started: Vec<Cluster> = futures_join_all(starts).await.into_iter().map(|r| r.unwrap()).collect();
        let refs: Vec<&Cluster> = started.iter().collect();
        wait_until("every member to see three active members", WAIT, || {
            started.iter().all(|m| m.view().active_members().count() == 3)
        })
        .await;
        grapevine_tests::wait_settled(&refs).await;
        let tables: Vec<_> = started.iter().map(|m| m.map_service().table()).collect();
        assert!(tables.iter().all(|t| *t == tables[0]), "round {round}: members hold different tables");
        for member in &started {
            assert!(member.health().healthy, "{:?}", member.health());
            let map = member.map::<String, String>("together").unwrap();
            map.put(&member.local().to_string(), &"here".into()).await.unwrap();
        }
        assert_eq!(started[0].map::<String, String>("together").unwrap().len().await.unwrap(), 3);
        for member in &started {
            member.shutdown().await;
        }
    }
}

/// Starts every future at once and collects their outputs in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_larger_than_a_frame_is_refused_at_once_with_the_setting_to_change() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.net.frame_bytes_max = 64 << 10;
        config
    })
    .await;
    cluster.wait_settled().await;
    for member in &cluster.members {
        let map = member.map::<String, Vec<u8>>("big").unwrap();
        for key in ["a", "b", "c", "d"] {
            let started = tokio::time::Instant::now();
            let error = map.put(&key.to_string(), &vec![7u8; 100 << 10]).await.unwrap_err();
            assert!(matches!(error, MapError::Failed { .. }), "{error:?}");
            assert!(error.to_string().contains("frame_bytes_max"), "{error}");
            assert!(started.elapsed() < Duration::from_secs(5), "refused at once, not after retries");
            assert_eq!(map.get(&key.to_string()).await.unwrap(), None, "nothing was stored");
        }
        map.put(&"small".to_string(), &vec![1u8; 1024]).await.unwrap();
    }
}
