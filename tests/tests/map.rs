//! The distributed map through the embedding API, on real in-process members.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grapevine::{Cluster, DistributedMap, EntryEventKind, Expiry, MapConfig};
use grapevine_tests::{TestCluster, WAIT, start_member, test_config, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_from_every_member() {
    let cluster = TestCluster::start(3).await;
    let a = cluster.member(0).map::<String, String>("things").unwrap();
    let b = cluster.member(1).map::<String, String>("things").unwrap();
    let c = cluster.member(2).map::<String, String>("things").unwrap();
    let k = |s: &str| s.to_string();
    assert_eq!(a.put(&k("x"), &k("1")).await.unwrap(), None);
    assert_eq!(b.get(&k("x")).await.unwrap().as_deref(), Some("1"));
    assert_eq!(c.put(&k("x"), &k("2")).await.unwrap().as_deref(), Some("1"));
    assert!(a.contains_key(&k("x")).await.unwrap());
    assert_eq!(b.put_if_absent(&k("x"), &k("3")).await.unwrap().as_deref(), Some("2"));
    assert_eq!(b.put_if_absent(&k("y"), &k("3")).await.unwrap(), None);
    assert_eq!(c.replace(&k("z"), &k("9")).await.unwrap(), None);
    assert!(!a.contains_key(&k("z")).await.unwrap(), "replace must not create a key");
    assert_eq!(c.replace(&k("y"), &k("4")).await.unwrap().as_deref(), Some("3"));
    assert!(!a.compare_and_set(&k("y"), Some(&k("3")), Some(&k("5"))).await.unwrap());
    assert!(a.compare_and_set(&k("y"), Some(&k("4")), Some(&k("5"))).await.unwrap());
    assert!(b.compare_and_set(&k("new"), None, Some(&k("n"))).await.unwrap());
    for i in 0..200 {
        a.put(&format!("bulk-{i}"), &i.to_string()).await.unwrap();
    }
    assert_eq!(c.len().await.unwrap(), 203);
    let mut seen: BTreeMap<String, String> = b.entries().collect().await.unwrap().into_iter().collect();
    assert_eq!(seen.len(), 203);
    assert_eq!(seen.remove("y").as_deref(), Some("5"));
    assert_eq!(a.remove(&k("x")).await.unwrap().as_deref(), Some("2"));
    assert_eq!(a.remove(&k("x")).await.unwrap(), None);
    assert_eq!(b.clear().await.unwrap(), 202);
    assert_eq!(c.len().await.unwrap(), 0);
    assert!(a.get(&k("y")).await.unwrap().is_none());
}

/// The outcome of each write of [`write_through_a_loss`]: the key, and whether it was
/// acknowledged.
type Outcomes = Vec<(u32, bool)>;

/// Writes `key -> key * 7` for every key of `keys` through `map`, with eight writers at once, and
/// runs `fault` once a third of them were acknowledged: writes are in flight when it strikes.
/// A write may fail during the fault (its outcome is then unknown); returns every outcome.
async fn write_through_a_loss<F: std::future::Future<Output = ()>>(
    map: &DistributedMap<u32, u64>,
    keys: std::ops::Range<u32>,
    fault: F,
) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::new()));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for chunk in 0..8u32 {
        let (map, outcomes, acked, keys) = (map.clone(), outcomes.clone(), acked.clone(), keys.clone());
        writers.spawn(async move {
            for key in keys.skip(chunk as usize).step_by(8) {
                let ok = map.put(&key, &(u64::from(key) * 7)).await.is_ok();
                if ok {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                outcomes.lock().unwrap().push((key, ok));
            }
        });
    }
    let third = keys.len() / 3;
    wait_until("a third of the writes to be acknowledged", WAIT, || acked.load(Ordering::Relaxed) >= third).await;
    assert!(acked.load(Ordering::Relaxed) < keys.len(), "the writers must still be writing when the fault strikes");
    fault.await;
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap()
}

/// Every acknowledged write of `outcomes` reads back through `reader`; a failed one is there with
/// its value or absent. Returns how many keys are present.
async fn check_outcomes(reader: &DistributedMap<u32, u64>, outcomes: &Outcomes, when: &str) -> u64 {
    let mut present = 0;
    for &(key, acked) in outcomes {
        let found = reader.get(&key).await.unwrap();
        if acked {
            assert_eq!(found, Some(u64::from(key) * 7), "acknowledged key {key} {when}");
        } else {
            assert!(found.is_none_or(|v| v == u64::from(key) * 7), "failed write of {key} {when}: {found:?}");
        }
        present += u64::from(found.is_some());
    }
    present
}

/// Two owners die one after the other, each while eight writers are in full flow: no
/// acknowledged write is lost, through either loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_owner_loses_no_acknowledged_write_even_after_a_second_loss() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    const KEYS: u32 = 6_000;
    let writer = cluster.member(2).map::<u32, u64>("sessions").unwrap();
    let first = write_through_a_loss(&writer, 0..KEYS, cluster.member(0).kill()).await;
    let survivors = [cluster.member(1), cluster.member(2)];
    let reader = cluster.member(1).map::<u32, u64>("sessions").unwrap();
    check_outcomes(&reader, &first, "after the first loss").await;
    grapevine_tests::wait_settled(&survivors).await;

    let second = write_through_a_loss(&reader, KEYS..2 * KEYS, cluster.member(2).kill()).await;
    let present = check_outcomes(&reader, &first, "after the second loss").await
        + check_outcomes(&reader, &second, "after the second loss").await;
    assert_eq!(reader.len().await.unwrap(), present);
    let failed = first.iter().chain(&second).filter(|(_, ok)| !ok).count();
    // Each writer has one write in flight at a time: a loss may cost each of the eight writers the
    // write it had in flight to the member that died, no more.
    assert!(failed <= 16, "{failed} writes failed in two losses of eight writers");
}

/// A listener keeps receiving every event, exactly once, after the owner of partitions dies,
/// after partitions migrate to a new member, and after a member leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_receive_every_event_across_a_fail_over_a_migration_and_a_leave() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let listening = cluster.member(1);
    let mut events = listening.map::<String, u32>("watched").unwrap().listen().await;
    let registered = |member: &Cluster| member.view().members.iter().any(|m| m.ext.contains_key("listen:watched"));
    wait_until("the registration to spread", WAIT, || cluster.members.iter().all(registered)).await;
    let mut expect = async |writer: &Cluster, phase: &str| {
        let map = writer.map::<String, u32>("watched").unwrap();
        let keys: Vec<String> = (0..60).map(|i| format!("{phase}-{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            map.put(key, &(i as u32)).await.unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < keys.len() {
            let event = tokio::time::timeout(WAIT, events.recv()).await.expect("event in time").unwrap();
            assert_eq!(event.kind, EntryEventKind::Added, "{phase}: {event:?}");
            assert!(event.key.starts_with(phase), "{phase}: an event of another phase: {event:?}");
            assert!(seen.insert(event.key.clone()), "{phase}: {} twice", event.key);
        }
    };
    // Fail-over.
    cluster.member(0).kill().await;
    grapevine_tests::wait_settled(&[cluster.member(1), cluster.member(2)]).await;
    expect(cluster.member(2), "failover").await;
    // Migration to a new member, which then owns some of the keys written.
    let joined = start_member(test_config(cluster.member(1).name()), &[cluster.member(1)]).await;
    grapevine_tests::wait_settled(&[cluster.member(1), cluster.member(2), &joined]).await;
    wait_until("the new member to see the registration", WAIT, || registered(&joined)).await;
    expect(&joined, "migration").await;
    let service = joined.map_service();
    let owned_by_new = (0..60)
        .filter(|i| {
            let p = service.partition_of(&grapevine_tests::encode_key(&format!("migration-{i}")));
            service.table().owner(p) == Some(joined.local())
        })
        .count();
    assert!(owned_by_new > 0, "the new member owns some of the keys: its events are tested");
    // A graceful leave.
    cluster.member(2).shutdown().await;
    grapevine_tests::wait_settled(&[cluster.member(1), &joined]).await;
    expect(&joined, "leave").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await.is_err(),
        "no event beyond those of the writes"
    );
    joined.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_hands_everything_over_even_without_backups() {
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = test_config(name);
        config.maps.insert("nobackup".into(), MapConfig { backup_count: 0, ..MapConfig::default() });
        config
    })
    .await;
    cluster.wait_settled().await;
    let map = cluster.member(0).map::<u32, u32>("nobackup").unwrap();
    for key in 0..2_000 {
        map.put(&key, &key).await.unwrap();
    }
    cluster.member(1).shutdown().await;
    let map = cluster.member(2).map::<u32, u32>("nobackup").unwrap();
    for key in 0..2_000 {
        assert_eq!(map.get(&key).await.unwrap(), Some(key), "key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_see_adds_updates_removes_and_expiry_from_any_member() {
    let cluster = TestCluster::start(2).await;
    let map = cluster.member(0).map::<String, u32>("watched").unwrap();
    let mut events = cluster.member(1).map::<String, u32>("watched").unwrap().listen().await;
    // The registration travels by gossip: wait until the writer's member sees it.
    wait_until("the listener registration to spread", WAIT, || {
        cluster.member(0).view().members.iter().any(|m| m.ext.contains_key("listen:watched"))
    })
    .await;
    map.put(&"a".into(), &1).await.unwrap();
    map.put(&"a".into(), &2).await.unwrap();
    map.remove(&"a".into()).await.unwrap();
    map.put_with(&"b".into(), &3, Expiry::ttl(Duration::from_millis(50))).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 5 {
        let event = tokio::time::timeout(WAIT, events.recv()).await.expect("event in time").unwrap();
        kinds.push((event.kind, event.key.clone(), event.value, event.old_value));
    }
    assert_eq!(
        kinds,
        vec![
            (EntryEventKind::Added, "a".to_string(), Some(1), None),
            (EntryEventKind::Updated, "a".to_string(), Some(2), Some(1)),
            (EntryEventKind::Removed, "a".to_string(), None, Some(2)),
            (EntryEventKind::Added, "b".to_string(), Some(3), None),
            (EntryEventKind::Expired, "b".to_string(), None, Some(3)),
        ]
    );
}

/// Cuts gossip and data traffic between `a` and `b`, both ways.
fn cut(a: &grapevine::Cluster, b: &grapevine::Cluster, cut: bool) {
    a.block_gossip_with(b.addresses().gossip, cut);
    b.block_gossip_with(a.addresses().gossip, cut);
    a.net().faults().drop_outbound(b.local(), None, cut);
    b.net().faults().drop_outbound(a.local(), None, cut);
    if cut {
        a.net().faults().sever(b.local());
        b.net().faults().sever(a.local());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_network_partition_keeps_the_majority_side_data() {
    let cluster = TestCluster::start(3).await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    let map = a.map::<u32, u32>("kept").unwrap();
    for key in 0..1_000 {
        map.put(&key, &key).await.unwrap();
    }
    cut(a, c, true);
    cut(b, c, true);
    wait_until("both sides to see the split", WAIT, || {
        a.view().member(c.local()).is_none() && c.view().len() == 1 && c.is_master()
    })
    .await;
    grapevine_tests::wait_settled(&[a, b]).await;
    // The majority keeps working through the split; the minority believes it is alone, becomes
    // its own master and publishes its own table (often with a higher epoch).
    for key in 1_000..1_500 {
        map.put(&key, &key).await.unwrap();
    }
    wait_until("the minority to publish its own table", WAIT, || {
        c.map_service().table().master.as_ref() == Some(c.local())
    })
    .await;
    cut(a, c, false);
    cut(b, c, false);
    wait_until("the cluster to merge", WAIT, || c.view().len() == 3 && a.view().len() == 3).await;
    cluster.wait_settled().await;
    for member in [a, b, c] {
        let map = member.map::<u32, u32>("kept").unwrap();
        for key in 0..1_500 {
            assert_eq!(map.get(&key).await.unwrap(), Some(key), "key {key} read through {}", member.local());
        }
    }
}
