//! Split-brain protection (`min_cluster_size`) and merges through the owners
//! (`MapService::merge_entries`) on real in-process members.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grapevine::{Cluster, Config, Expiry, MapConfig, MapError, MergePolicy, Record};
use grapevine_tests::{TestCluster, WAIT, encode_key, start_member, test_config, wait_settled, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A map that needs two members, and one that does not.
fn protected_config(name: &str) -> Config {
    let mut config = test_config(name);
    config.maps.insert("protected".into(), MapConfig { min_cluster_size: 2, ..MapConfig::default() });
    config
}

/// Cuts (or heals) gossip and the data plane between `a` and `b`, both ways.
fn cut(a: &Cluster, b: &Cluster, cut: bool) {
    a.block_gossip_with(b.addresses().gossip, cut);
    b.block_gossip_with(a.addresses().gossip, cut);
    a.net().faults().drop_outbound(b.local(), None, cut);
    b.net().faults().drop_outbound(a.local(), None, cut);
    if cut {
        a.net().faults().sever(b.local());
        b.net().faults().sever(a.local());
    }
}

/// Cuts `c` off from `a` and `b` (both ways, both planes) and waits until it sees itself alone and
/// they no longer list it.
async fn cut_off(a: &Cluster, b: &Cluster, c: &Cluster) {
    cut(a, c, true);
    cut(b, c, true);
    wait_until("c alone, a and b without it", WAIT, || {
        c.view().len() == 1 && a.view().member(c.local()).is_none() && b.view().member(c.local()).is_none()
    })
    .await;
}

/// `GET /health` on the member's admin endpoint: status and body.
async fn health(member: &Cluster) -> (u16, String) {
    let addr: SocketAddr = member.addresses().admin.expect("the admin endpoint is on");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response)).await.expect("an answer").unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text:?}"));
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// The error is the protection's, naming the map, the minimum and the size seen; and it came at
/// once, not after the operation timeout (20 s in tests) of retries.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, MapError>, started: Instant, current: u32) {
    let elapsed = started.elapsed();
    let err = result.expect_err("refused by split-brain protection");
    assert!(
        matches!(&err, MapError::BelowMinClusterSize { map, min_cluster_size: 2, current: c } if map == "protected" && *c == current),
        "{err:?}"
    );
    let text = err.to_string();
    for part in ["\"protected\"", "at least 2", &format!("sees {current}"), "retry once the network heals"] {
        assert!(text.contains(part), "{part:?} in {text}");
    }
    assert!(elapsed < Duration::from_secs(10), "refused after {elapsed:?}: it should not wait for retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_alone_refuses_a_protected_map_and_serves_it_again_after_the_heal() {
    let cluster = TestCluster::start_with(3, protected_config).await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    let key = |s: &str| s.to_string();
    a.map::<String, String>("protected").unwrap().put(&key("before"), &key("1")).await.unwrap();
    assert_eq!(health(c).await.0, 200);

    cut(a, c, true);
    cut(b, c, true);
    wait_until("c to see itself alone and a and b without it", WAIT, || {
        c.map_service().protection_size() == 1 && a.view().member(c.local()).is_none()
    })
    .await;

    let on_c = c.map::<String, String>("protected").unwrap();
    let started = Instant::now();
    assert_refused(on_c.put(&key("during"), &key("c")).await, started, 1);
    let started = Instant::now();
    assert_refused(on_c.get(&key("before")).await, started, 1);
    let started = Instant::now();
    assert_refused(on_c.len().await, started, 1);
    let reason = c.health().reason.expect("c is not healthy");
    assert!(reason.contains("split-brain protection") && reason.contains("\"protected\" needs 2"), "{reason}");
    let (status, body) = health(c).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("split-brain protection"), "{body}");
    // Maps without protection keep working on the lone member.
    c.map::<String, String>("open").unwrap().put(&key("during"), &key("c")).await.unwrap();

    // The majority side carries on.
    wait_settled(&[a, b]).await;
    let on_a = a.map::<String, String>("protected").unwrap();
    on_a.put(&key("during"), &key("a")).await.unwrap();
    assert_eq!(health(b).await.0, 200);

    cut(a, c, false);
    cut(b, c, false);
    cluster.wait_all_active(3).await;
    cluster.wait_settled().await;
    on_c.put(&key("after"), &key("c")).await.unwrap();
    for k in ["before", "during", "after"] {
        assert!(on_c.get(&key(k)).await.unwrap().is_some(), "{k} read through c");
    }
    assert_eq!(on_a.get(&key("during")).await.unwrap().as_deref(), Some("a"), "written on the protected side");
    wait_until("c to be healthy again", WAIT, || c.health().healthy).await;
    assert_eq!(health(c).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_member_standing_refuses_a_protected_map_until_another_joins() {
    let cluster = TestCluster::start_with(3, protected_config).await;
    cluster.wait_settled().await;
    let a = cluster.member(0);
    let map = a.map::<u32, u32>("protected").unwrap();
    for k in 0..50 {
        map.put(&k, &k).await.unwrap();
    }
    cluster.member(1).shutdown().await;
    cluster.member(2).shutdown().await;
    wait_until("a to be alone", WAIT, || a.map_service().protection_size() == 1).await;
    let started = Instant::now();
    assert_refused(map.put(&100, &100).await, started, 1);
    assert_eq!(health(a).await.0, 503);

    let d = start_member(protected_config(a.name()), &[a]).await;
    wait_until("a to see d", WAIT, || a.map_service().protection_size() == 2).await;
    map.put(&100, &100).await.unwrap();
    let on_d = d.map::<u32, u32>("protected").unwrap();
    for k in (0..50).chain([100]) {
        assert_eq!(on_d.get(&k).await.unwrap(), Some(k), "key {k} read through the new member");
    }
    wait_until("a to be healthy again", WAIT, || a.health().healthy).await;
    d.shutdown().await;
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn encoded(value: &str) -> Vec<u8> {
    encode_key(&value.to_string())
}

/// A merging record written at `updated_ms`.
fn merging(value: &str, updated_ms: u64, hits: u64, ttl_ms: u64) -> Record {
    Record {
        value: encoded(value),
        created_ms: updated_ms - 1_000,
        updated_ms,
        accessed_ms: updated_ms,
        hits,
        version: 1,
        ttl_ms,
        max_idle_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_entries_go_through_each_policy_on_their_owner_are_replicated_and_counted() {
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = test_config(name);
        for policy in MergePolicy::ALL {
            config.maps.insert(format!("m-{policy}"), MapConfig { merge_policy: policy, ..MapConfig::default() });
        }
        config
    })
    .await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    for policy in MergePolicy::ALL {
        let name = format!("m-{policy}");
        let map = a.map::<String, String>(&name).unwrap();
        // The owners' entries: expiring in an hour, written now.
        let hour = Expiry::ttl(Duration::from_secs(3_600));
        for k in ["newer", "older"] {
            map.put_with(&k.to_string(), &"existing".to_string(), hour).await.unwrap();
        }
        let now = now_ms();
        let entries = vec![
            // Written later, read more, never expires: every comparing policy prefers it.
            (encode_key(&"newer"), merging("merging", now + 1_000, 100, 0)),
            // Written a minute ago, expires in a second: every comparing policy keeps the owner's.
            (encode_key(&"older"), merging("merging", now - 60_000, 0, 61_000)),
            (encode_key(&"absent"), merging("merging", now - 60_000, 0, 0)),
            (encode_key(&"expired"), merging("merging", now - 60_000, 0, 1_000)),
        ];
        let (newer, older, absent) = match policy {
            MergePolicy::PassThrough => (true, true, true),
            MergePolicy::PutIfAbsent => (false, false, true),
            MergePolicy::Discard => (false, false, false),
            _ => (true, false, true),
        };
        let took = [newer, older, absent].iter().filter(|t| **t).count() as u64;
        let outcome = c.map_service().merge_entries(&name, entries.clone()).await.unwrap();
        assert!(outcome.failed.is_empty(), "{policy}: {:?}", outcome.failed);
        assert_eq!((outcome.took_merging, outcome.kept_existing), (took, 4 - took), "{policy}");

        let on_b = b.map::<String, String>(&name).unwrap();
        let value = |taken: bool| Some(if taken { "merging" } else { "existing" }.to_string());
        assert_eq!(on_b.get(&"newer".to_string()).await.unwrap(), value(newer), "{policy}: newer");
        assert_eq!(on_b.get(&"older".to_string()).await.unwrap(), value(older), "{policy}: older");
        let absent_value = absent.then(|| "merging".to_string());
        assert_eq!(on_b.get(&"absent".to_string()).await.unwrap(), absent_value, "{policy}: absent");
        assert_eq!(on_b.get(&"expired".to_string()).await.unwrap(), None, "{policy}: an expired entry never wins");

        // What an owner took reached its backup as it was on the merging side.
        if newer {
            let key = encode_key(&"newer");
            let p = a.map_service().partition_of(&key);
            let backup = a.map_service().table().row(p)[1].clone();
            let holder = [a, b, c].into_iter().find(|m| *m.local() == backup).unwrap();
            let held: Vec<Record> = holder
                .map_service()
                .local_entries(&name, p)
                .into_iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, r)| r)
                .collect();
            assert_eq!(held.len(), 1, "{policy}: the backup holds the merged entry");
            assert_eq!((held[0].value.clone(), held[0].updated_ms), (encoded("merging"), entries[0].1.updated_ms));
        }

        // The owners counted their verdicts; /stats sums them and shows the policy.
        let stats = a.stats().await;
        let row = stats.maps.iter().find(|m| m.name == name).expect("the map is in /stats");
        assert_eq!((row.merge_took_merging, row.merge_kept_existing), (took, 4 - took), "{policy}");
        assert_eq!((row.merge_policy.as_str(), row.min_cluster_size), (policy.name(), 0));
        assert_eq!(row.puts, 2, "{policy}: merges are not counted as puts");
    }
}

/// One map per policy.
fn policies_config(name: &str) -> Config {
    let mut config = test_config(name);
    let policies = [
        MergePolicy::LatestUpdate,
        MergePolicy::PutIfAbsent,
        MergePolicy::PassThrough,
        MergePolicy::HigherHits,
        MergePolicy::Discard,
    ];
    for policy in policies {
        config.maps.insert(policy.to_string(), MapConfig { merge_policy: policy, ..MapConfig::default() });
    }
    config
}

/// A member cut off from the other two (both ways, gossip and data) keeps serving alone; both
/// sides write during the split: keys only the lone side wrote, keys both wrote (the lone side
/// last, and read more often there), keys the lone side removed, and a key the lone side rewrote
/// and the larger side then removed. When the cut heals, the lone member merges into the larger
/// side and each map's policy decides (a removal is a tombstone for `latest-update` only):
/// afterwards every member reads the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_split_heals_the_smaller_side_merges_its_writes_through_each_maps_policy() {
    let cluster = TestCluster::start_with(3, policies_config).await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    let names: Vec<String> =
        ["latest-update", "put-if-absent", "pass-through", "higher-hits", "discard"].map(String::from).to_vec();
    for name in &names {
        let map = a.map::<String, String>(name).unwrap();
        map.put(&"before".to_string(), &"old".to_string()).await.unwrap();
        map.put(&"removed-by-c".to_string(), &"old".to_string()).await.unwrap();
        map.put(&"c-then-removed-by-a".to_string(), &"old".to_string()).await.unwrap();
    }

    cut_off(a, b, c).await;
    wait_settled(&[a, b]).await;
    wait_settled(&[c]).await;
    // Both sides write "both"; the larger side first, so the smaller side's write is the later one.
    for name in &names {
        let on_a = a.map::<String, String>(name).unwrap();
        on_a.put(&"both".to_string(), &"a".to_string()).await.unwrap();
        on_a.put(&"only-a".to_string(), &"a".to_string()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(5)).await; // distinct update times (ms clock)
    for name in &names {
        let on_c = c.map::<String, String>(name).unwrap();
        on_c.put(&"both".to_string(), &"c".to_string()).await.unwrap();
        on_c.put(&"only-c".to_string(), &"c".to_string()).await.unwrap();
        on_c.remove(&"removed-by-c".to_string()).await.unwrap();
        // Reads count as hits on the owner: c's entry of "both" is read more often than a's.
        for _ in 0..3 {
            assert_eq!(on_c.get(&"both".to_string()).await.unwrap().as_deref(), Some("c"));
        }
        on_c.put(&"c-then-removed-by-a".to_string(), &"c".to_string()).await.unwrap();
    }
    // The larger side removes a key after the smaller side rewrote it: a tombstone for
    // latest-update, no entry for the others.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for name in &names {
        let on_a = a.map::<String, String>(name).unwrap();
        assert_eq!(on_a.remove(&"c-then-removed-by-a".to_string()).await.unwrap().as_deref(), Some("old"));
    }

    cut(a, c, false);
    cut(b, c, false);
    cluster.wait_all_active(3).await;
    cluster.wait_settled().await;

    // (map, key, value expected after the merge)
    let s = |v: &str| Some(v.to_string());
    let expected: Vec<(&str, &str, Option<String>)> = vec![
        ("latest-update", "both", s("c")),
        ("latest-update", "only-c", s("c")),
        ("put-if-absent", "both", s("a")),
        ("put-if-absent", "only-c", s("c")),
        ("pass-through", "both", s("c")),
        ("pass-through", "only-c", s("c")),
        ("higher-hits", "both", s("c")),
        ("higher-hits", "only-c", s("c")),
        ("discard", "both", s("a")),
        ("discard", "only-c", None),
        ("latest-update", "c-then-removed-by-a", None),
        ("put-if-absent", "c-then-removed-by-a", s("c")),
        ("pass-through", "c-then-removed-by-a", s("c")),
        ("higher-hits", "c-then-removed-by-a", s("c")),
        ("discard", "c-then-removed-by-a", None),
    ];
    let read_all = |map: String, key: String| async move {
        let mut values = Vec::new();
        for m in [a, b, c] {
            values.push(m.map::<String, String>(&map).unwrap().get(&key).await.unwrap());
        }
        values
    };
    for (map, key, want) in &expected {
        let deadline = Instant::now() + WAIT;
        loop {
            let values = read_all(map.to_string(), key.to_string()).await;
            if values.iter().all(|v| v == want) {
                break;
            }
            assert!(Instant::now() < deadline, "map {map} key {key}: {values:?} through a, b, c; expected {want:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // What every policy keeps: the larger side's own writes, the entries from before the split,
    // and (removals are not merged) the key the smaller side removed.
    for name in &names {
        for (key, want) in [("only-a", "a"), ("before", "old"), ("removed-by-c", "old")] {
            let values = read_all(name.clone(), key.to_string()).await;
            assert!(values.iter().all(|v| v.as_deref() == Some(want)), "map {name} key {key}: {values:?}");
        }
    }
    // The owners counted what they did.
    let took: u64 = [a, b, c]
        .iter()
        .flat_map(|m| m.map_service().local_stats().maps)
        .filter(|m| m.name == "latest-update")
        .map(|m| m.merge_took_merging)
        .sum();
    assert!(took >= 2, "the owners took the merging entries of latest-update: {took}");
}

/// A map without backups: the partitions the member cut off owned have no copy on the larger side,
/// which takes them over empty (and reports them lost). At the heal, the cut-off member merges
/// every entry of those partitions, not only what it wrote during the split, so nothing written
/// before the split is lost with the merging policies; with `discard` it is, as that policy says.
/// Those older entries restore what the larger side lost, whatever the policy: they fill only keys
/// the larger side left alone, not one it wrote (not even with `pass-through`) or removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_whose_only_copies_were_on_the_smaller_side_come_back_after_the_heal() {
    let cluster = TestCluster::start_with(3, |name| {
        let mut config = test_config(name);
        for policy in
            [MergePolicy::LatestUpdate, MergePolicy::PutIfAbsent, MergePolicy::PassThrough, MergePolicy::Discard]
        {
            config.maps.insert(
                policy.to_string(),
                MapConfig { merge_policy: policy, backup_count: 0, ..MapConfig::default() },
            );
        }
        config
    })
    .await;
    cluster.wait_settled().await;
    let (a, b, c) = (cluster.member(0), cluster.member(1), cluster.member(2));
    let keys: Vec<u32> = (0..120).collect();
    let names = ["latest-update", "put-if-absent", "pass-through", "discard"];
    for name in names {
        let map = a.map::<u32, u32>(name).unwrap();
        for k in &keys {
            map.put(k, k).await.unwrap();
        }
    }
    // The keys c owns: their only copy.
    let on_c_only: Vec<u32> = keys
        .iter()
        .copied()
        .filter(|k| {
            let p = a.map_service().partition_of(&encode_key(k));
            a.map_service().table().owner(p) == Some(c.local())
        })
        .collect();
    assert!(on_c_only.len() >= 2, "c owns some of 120 keys");

    cut_off(a, b, c).await;
    wait_settled(&[a, b]).await;
    let on_a = a.map::<u32, u32>("latest-update").unwrap();
    for k in &on_c_only {
        assert_eq!(on_a.get(k).await.unwrap(), None, "key {k}: the larger side has no copy of c's partitions");
    }
    // Written on the larger side during the split into one of those partitions, and removed
    // there (absent on that side, so the removal changes nothing but is remembered): both stay.
    let (rewritten, removed) = (on_c_only[0], on_c_only[1]);
    for name in names {
        let on_a = a.map::<u32, u32>(name).unwrap();
        on_a.put(&rewritten, &1_000).await.unwrap();
        assert_eq!(on_a.remove(&removed).await.unwrap(), None);
    }

    cut(a, c, false);
    cut(b, c, false);
    cluster.wait_all_active(3).await;
    cluster.wait_settled().await;
    for (name, back) in [("latest-update", true), ("put-if-absent", true), ("pass-through", true), ("discard", false)] {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut wrong = Vec::new();
            for m in [a, b, c] {
                let map = m.map::<u32, u32>(name).unwrap();
                for k in &keys {
                    let want = if *k == rewritten {
                        Some(1_000)
                    } else if *k == removed || (on_c_only.contains(k) && !back) {
                        None
                    } else {
                        Some(*k)
                    };
                    let got = map.get(k).await.unwrap();
                    if got != want {
                        wrong.push((m.local().node_id.to_string(), *k, got, want));
                    }
                }
            }
            if wrong.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: (member, key, read, expected) {:?}",
                &wrong[..wrong.len().min(8)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
