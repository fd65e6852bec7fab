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

/// The value `member` holds for `key` in `map` (in its local copy of partition `p`, any role).
fn value_on<V: serde::de::DeserializeOwned>(member: &Cluster, map: &str, p: u32, key: &str) -> Option<V> {
    let encoded = grapevine_tests::encode_key(&key.to_string());
    let entries = member.map_service().local_entries(map, p);
    let (_, record) = entries.iter().find(|(k, _)| *k == encoded)?;
    Some(grapevine_net::codec::decode(&record.value).expect("the test's values decode"))
}

/// Keys `k<n>` whose partition `owner` owns, as many as `count`.
fn keys_owned_by(cluster: &TestCluster, owner: &Cluster, count: usize) -> Vec<String> {
    keys_replicated_by(cluster, &[owner], count)
}

/// Keys `k<n>` (of the first 100 000) whose partition's first replicas are `replicas`, in order
/// (the owner first), as many as `count`.
fn keys_replicated_by(cluster: &TestCluster, replicas: &[&Cluster], count: usize) -> Vec<String> {
    (0..100_000)
        .map(|i| format!("k{i}"))
        .filter(|k| replicas.iter().enumerate().all(|(i, m)| replica_of(cluster, k, i).0.local() == m.local()))
        .take(count)
        .collect()
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
    // Each key twice: the backup must end with the second value, not just hold the key.
    for round in 0..2u32 {
        for (i, key) in keys.iter().enumerate() {
            map.put(key, &(i as u32 * 10 + round)).await.unwrap();
        }
    }
    wait_until("every asynchronous backup to hold the last value of its keys", WAIT, || {
        keys.iter().enumerate().all(|(i, key)| {
            let (backup, p) = replica_of(&cluster, key, 1);
            value_on::<u32>(backup, "async", p, key) == Some(i as u32 * 10 + 1)
        })
    })
    .await;
}

/// A put to a map with only an asynchronous backup returns without waiting for it: with the
/// backup unreachable, puts still succeed at once, where a put to a map with a synchronous
/// backup waits `backup_ack_timeout_ms` and fails. The backup catches up once reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_asynchronous_backup_does_not_delay_puts() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = async_config(name);
        config.partitions.backup_ack_timeout_ms = 1_000;
        config
    })
    .await;
    cluster.wait_settled().await;
    let (owner, backup) = (cluster.member(0), cluster.member(1));
    let keys = keys_owned_by(&cluster, owner, 20);
    owner.net().faults().drop_outbound(backup.local(), None, true);

    let strict = owner.map::<String, u32>("strict").unwrap();
    let started = tokio::time::Instant::now();
    strict.put(&keys[0], &1).await.expect_err("a synchronous backup that cannot be reached fails the put");
    let strict_put = started.elapsed();
    assert!(strict_put >= Duration::from_millis(1_000), "the synchronous put gave up after {strict_put:?}");

    let asynchronous = owner.map::<String, u32>("async").unwrap();
    let started = tokio::time::Instant::now();
    for (i, key) in keys.iter().enumerate() {
        asynchronous.put(key, &(i as u32)).await.unwrap();
    }
    let async_puts = started.elapsed();
    // Twenty puts in less time than one wait for the synchronous backup's acknowledgement.
    assert!(async_puts < Duration::from_millis(1_000), "20 puts took {async_puts:?}: they waited for the backup");
    for key in &keys {
        let (_, p) = replica_of(&cluster, key, 1);
        assert_eq!(value_on::<u32>(backup, "async", p, key), None, "nothing reached the backup");
    }

    owner.net().faults().drop_outbound(backup.local(), None, false);
    owner.map_service().anti_entropy_now().await;
    wait_until("the asynchronous backup to catch up", WAIT, || {
        keys.iter()
            .enumerate()
            .all(|(i, key)| value_on::<u32>(backup, "async", replica_of(&cluster, key, 1).1, key) == Some(i as u32))
    })
    .await;
}

/// When the owner of a map with only an asynchronous backup dies, that backup takes over with the
/// values it received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asynchronous_backup_takes_over_with_what_it_received() {
    let cluster = TestCluster::start_with(3, async_config).await;
    cluster.wait_settled().await;
    let (owner, writer) = (cluster.member(0), cluster.member(1));
    let keys = keys_owned_by(&cluster, owner, 100);
    let map = writer.map::<String, u32>("async").unwrap();
    for round in 0..2u32 {
        for (i, key) in keys.iter().enumerate() {
            map.put(key, &(i as u32 * 10 + round)).await.unwrap();
        }
    }
    wait_until("the asynchronous backups to hold the last values", WAIT, || {
        keys.iter().enumerate().all(|(i, key)| {
            let (backup, p) = replica_of(&cluster, key, 1);
            value_on::<u32>(backup, "async", p, key) == Some(i as u32 * 10 + 1)
        })
    })
    .await;
    owner.kill().await;
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(map.get(key).await.unwrap(), Some(i as u32 * 10 + 1), "{key} after its owner died");
    }
    assert_eq!(map.len().await.unwrap(), keys.len() as u64);
}

/// A backup drops an entry whose time to live has passed by itself: the owner's replicated
/// removal cannot reach it here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_drops_an_entry_whose_time_to_live_passed_by_itself() {
    let cluster = TestCluster::start(2).await;
    cluster.wait_settled().await;
    let (owner, backup) = (cluster.member(0), cluster.member(1));
    let key = keys_owned_by(&cluster, owner, 1).remove(0);
    let p = replica_of(&cluster, &key, 1).1;
    let map = owner.map::<String, String>("expiring").unwrap();
    let written = tokio::time::Instant::now();
    map.put_with(&key, &"v".into(), Expiry::ttl(Duration::from_millis(700))).await.unwrap();
    map.put(&"kept".to_string(), &"v".into()).await.unwrap();
    assert_eq!(value_on::<String>(backup, "expiring", p, &key).as_deref(), Some("v"), "a synchronous backup has it");
    owner.net().faults().drop_outbound(backup.local(), None, true);
    wait_until("the backup to drop the expired entry", WAIT, || !holds(backup, "expiring", p, &key)).await;
    assert!(written.elapsed() >= Duration::from_millis(700), "dropped after {:?}", written.elapsed());
    wait_until("the owner to sweep it too", WAIT, || !holds(owner, "expiring", p, &key)).await;
    owner.net().faults().drop_outbound(backup.local(), None, false);
    assert_eq!(map.get(&"kept".to_string()).await.unwrap().as_deref(), Some("v"));
}

/// Across a fail-over, a time to live still counts from the write (the new owner reports what
/// is left of it), while the max-idle clock restarts at the take-over: reads went to the old
/// owner and are not replicated, so the new owner would otherwise expire an entry in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_across_a_fail_over_keeps_the_time_to_live_and_restarts_the_idle_clock() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let (owner, survivor) = (cluster.member(0), cluster.member(1));
    let mut keys = keys_owned_by(&cluster, owner, 2);
    let (ttl_key, idle_key) = (keys.remove(0), keys.remove(0));
    let map = survivor.map::<String, String>("expiring").unwrap();
    let ttl = Duration::from_secs(8);
    let written = tokio::time::Instant::now();
    map.put_with(&ttl_key, &"t".into(), Expiry::ttl(ttl)).await.unwrap();
    map.put_with(&idle_key, &"i".into(), Expiry::max_idle(Duration::from_secs(1))).await.unwrap();
    // In use for longer than its max idle time, through its owner.
    let used = tokio::time::Instant::now();
    while used.elapsed() < Duration::from_millis(1_500) {
        assert!(map.get(&idle_key).await.unwrap().is_some(), "an entry in use must not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    owner.kill().await;
    let survivors = [cluster.member(1), cluster.member(2)];
    grapevine_tests::wait_settled(&survivors).await;
    let taken_over = tokio::time::Instant::now();
    assert_eq!(map.get(&idle_key).await.unwrap().as_deref(), Some("i"), "the idle clock restarted at the take-over");
    let left = survivor
        .map_service()
        .time_to_live("expiring", grapevine_tests::encode_key(&ttl_key))
        .await
        .unwrap()
        .expect("the entry with a time to live is there")
        .expect("it has a time to live");
    assert!(
        left <= ttl.saturating_sub(written.elapsed()) + Duration::from_millis(50),
        "{left:?} left after {:?}",
        written.elapsed()
    );
    // Unused now (watching the new owner's own copy reads nothing), the idle entry expires, a max
    // idle time after the take-over at the earliest.
    // (The table as a survivor holds it: the dead member's is stale.)
    let service = survivor.map_service();
    let p = service.partition_of(&grapevine_tests::encode_key(&idle_key));
    let new_owner_id = service.table().row(p)[0].clone();
    let new_owner = survivors.iter().find(|m| *m.local() == new_owner_id).expect("a survivor owns it");
    wait_until("the idle entry to expire on its new owner", WAIT, || !holds(new_owner, "expiring", p, &idle_key)).await;
    assert!(
        taken_over.elapsed() >= Duration::from_millis(950),
        "expired {:?} after the take-over",
        taken_over.elapsed()
    );
    assert_eq!(map.get(&idle_key).await.unwrap(), None);
}

/// With `backup_count = 2`, two members lost at the same moment lose no acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_lost_at_once_lose_nothing_with_two_backups() {
    let cluster = TestCluster::start_with(4, |name| {
        let mut config = test_config(name);
        config.maps.insert("twice".into(), MapConfig { backup_count: 2, ..MapConfig::default() });
        config
    })
    .await;
    cluster.wait_settled().await;
    let map = cluster.member(3).map::<u32, u32>("twice").unwrap();
    for key in 0..1_000 {
        map.put(&key, &(key * 3)).await.unwrap();
    }
    let (first, second) = (cluster.member(0), cluster.member(1));
    tokio::join!(first.kill(), second.kill());
    for key in 0..1_000 {
        assert_eq!(map.get(&key).await.unwrap(), Some(key * 3), "key {key} after two members died at once");
    }
    assert_eq!(map.len().await.unwrap(), 1_000);
}

/// With fewer members than `1 + backup_count`, writes are acknowledged with the backups there
/// are, and counted as under-replicated; the backup that exists keeps them through its owner's
/// death.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fewer_members_than_replicas_writes_are_kept_by_the_backups_there_are() {
    let cluster = TestCluster::start_with(2, |name| {
        let mut config = test_config(name);
        config.maps.insert("twice".into(), MapConfig { backup_count: 2, ..MapConfig::default() });
        config
    })
    .await;
    cluster.wait_settled().await;
    let map = cluster.member(1).map::<u32, u32>("twice").unwrap();
    for key in 0..500 {
        map.put(&key, &key).await.unwrap();
    }
    let stats = cluster.member(1).stats().await;
    let twice = stats.maps.iter().find(|m| m.name == "twice").unwrap();
    assert_eq!(twice.under_replicated_writes, 500, "{twice:?}");
    assert_eq!(twice.under_replicated_partitions, 271, "{twice:?}");
    assert_eq!(twice.backup_entries, 500, "one backup copy each: the one other member");
    cluster.member(0).kill().await;
    for key in 0..500 {
        assert_eq!(map.get(&key).await.unwrap(), Some(key), "key {key}");
    }
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
async fn a_backup_that_does_not_answer_does_not_hold_up_the_repair_of_the_others() {
    let cluster = TestCluster::start_with(5, |name| {
        let mut config = test_config(name);
        // Only the check the test runs: the timer's must not repair the victim first.
        config.partitions.anti_entropy_interval_ms = 600_000;
        config.partitions.backup_ack_timeout_ms = 300;
        config
    })
    .await;
    cluster.wait_settled().await;
    let owner = cluster.member(0);
    let victim = cluster.member(1);
    let silent = [cluster.member(2), cluster.member(3), cluster.member(4)];
    let map = owner.map::<String, u32>("checked").unwrap();
    // A key on each silent member's backups, so that the owner checks them too.
    for member in silent {
        let key =
            keys_replicated_by(&cluster, &[owner, member], 1).pop().expect("the owner has a partition backed up there");
        map.put(&key, &1).await.unwrap();
    }
    // Writes the victim misses: its backup never answers, so each fails, but the owner applied it.
    let missed = keys_replicated_by(&cluster, &[owner, victim], 2);
    owner.net().faults().drop_outbound(victim.local(), None, true);
    for key in &missed {
        assert!(map.put(key, &2).await.is_err(), "the victim's backup cannot acknowledge");
    }
    owner.net().faults().drop_outbound(victim.local(), None, false);
    assert!(missed.iter().all(|key| !holds(victim, "checked", replica_of(&cluster, key, 1).1, key)));
    // The silent members' answers never come (each check times out after 10 s): the victim's
    // repair must not wait for them, whichever member the owner asks first (asked one at a time,
    // it waited for each one asked before it: the deadline below is shorter than one timeout).
    for member in silent {
        owner.net().faults().drop_outbound(member.local(), None, true);
    }
    let checking = owner.clone();
    let check = tokio::spawn(async move { checking.map_service().anti_entropy_now().await });
    wait_until("anti-entropy to repair the victim while three backups do not answer", Duration::from_secs(8), || {
        missed.iter().all(|key| holds(victim, "checked", replica_of(&cluster, key, 1).1, key))
    })
    .await;
    for member in silent {
        owner.net().faults().drop_outbound(member.local(), None, false);
    }
    check.abort();
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
