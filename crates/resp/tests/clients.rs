//! The `redis` crate as a client: pipelines, concurrent clients on every member, RESP3, and a
//! member killed under load (clients see answers or errors, never a hang, and acknowledged SETs
//! survive with `backup_count = 1`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{RespCluster, WAIT, connect};
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelines_answer_in_order_and_concurrent_counters_add_up() {
    let c = RespCluster::start(3, |_| {}).await;
    let mut writer = c.client(0).await;
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("key:{i}"), format!("value:{i}")).ignore();
    }
    pipe.set("n", 0).ignore();
    for _ in 0..100 {
        pipe.incr("n", 1);
    }
    let counts: Vec<i64> = pipe.query_async(&mut writer).await.unwrap();
    assert_eq!(counts, (1..=100).collect::<Vec<i64>>(), "replies come back in request order");

    let mut reader = c.client(1).await;
    let mut pipe = redis::pipe();
    for i in (0..500).rev() {
        pipe.get(format!("key:{i}"));
    }
    let values: Vec<String> = pipe.query_async(&mut reader).await.unwrap();
    let expected: Vec<String> = (0..500).rev().map(|i| format!("value:{i}")).collect();
    assert_eq!(values, expected);

    // Eight clients on three members increment one counter: the owner applies each atomically.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let addr = c.addr(i % 3);
        tasks.spawn(async move {
            let mut con = connect(addr, false).await;
            for _ in 0..100 {
                let _: i64 = con.incr("counter", 1).await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let total: i64 = c.client(2).await.get("counter").await.unwrap();
    assert_eq!(total, 800);
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut reader).await.unwrap();
    assert_eq!(size, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resp3_clients_get_maps_and_nulls() {
    let c = RespCluster::start(1, |_| {}).await;
    let mut con = connect(c.addr(0), true).await;
    let _: () = con.set("k", b"\x00\xffbytes").await.unwrap();
    let value: Vec<u8> = con.get("k").await.unwrap();
    assert_eq!(value, b"\x00\xffbytes");
    let missing: Option<Vec<u8>> = con.get("nope").await.unwrap();
    assert_eq!(missing, None);
    let hello: redis::Value = redis::cmd("HELLO").arg(3).query_async(&mut con).await.unwrap();
    let redis::Value::Map(pairs) = hello else { panic!("HELLO 3 answers a map: {hello:?}") };
    assert!(pairs.iter().any(|(k, v)| *k == redis::Value::BulkString(b"proto".to_vec()) && *v == redis::Value::Int(3)));
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut con).await.unwrap();
    assert!(info.contains("redis_version:"), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_member_gives_errors_or_answers_never_a_hang_and_acknowledged_sets_survive() {
    let c = RespCluster::start(3, |_| {}).await; // backup_count = 1 by default
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    // Six writers through the members that stay, two through the one that dies.
    for w in 0..8usize {
        let addr = c.addr(if w < 6 { 1 + w % 2 } else { 0 });
        let (stop, killed, acked_total) = (stop.clone(), killed.clone(), acked_total.clone());
        tasks.spawn(async move {
            let mut con = connect(addr, false).await;
            let (mut acked, mut errors) = (Vec::new(), 0usize);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}:{i}");
                // The response timeout is 30 s; a reply (or an error) must come well before.
                let reply = tokio::time::timeout(Duration::from_secs(25), con.set::<_, _, ()>(&key, i)).await;
                match reply.unwrap_or_else(|_| panic!("writer {w}: SET {key} hung for 25 s")) {
                    Ok(()) => {
                        acked.push((key, i, killed.load(Ordering::Relaxed)));
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors += 1;
                        if w >= 6 && errors > 3 {
                            break; // the victim's clients see errors; enough of them
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            (w, acked, errors)
        });
    }
    let reached = |n: usize| {
        let acked_total = acked_total.clone();
        move || acked_total.load(Ordering::Relaxed) >= n
    };
    common::wait_for("writes before the kill", WAIT, reached(300)).await;
    let table = c.cluster.members[1].map_service().table();
    let victim = c.cluster.members[0].local().clone();
    c.cluster.members[0].kill().await;
    killed.store(true, Ordering::Relaxed);
    let after_kill = acked_total.load(Ordering::Relaxed);
    common::wait_for("writes after the kill", WAIT, reached(after_kill + 600)).await;
    // As a crash would: the victim's RESP endpoint goes too.
    c.servers[0].shutdown().await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (w, keys, errors) = done.unwrap();
        if w >= 6 {
            assert!(errors > 0, "writer {w} on the killed member saw no error");
        }
        acked.extend(keys);
    }
    // Writes acknowledged after the kill include keys the killed member owned: fail-over happened.
    let maps = c.cluster.members[1].map_service();
    let taken_over = acked
        .iter()
        .filter(|(key, _, after)| *after && table.owner(maps.partition_of(key.as_bytes())) == Some(&victim))
        .count();
    assert!(taken_over > 0, "no write to the killed member's partitions was acknowledged after the kill");
    let survivors = [&c.cluster.members[1], &c.cluster.members[2]];
    grapevine_tests::wait_settled(&survivors).await;
    for i in 1..3 {
        let mut con = c.client(i).await;
        for chunk in acked.chunks(500) {
            let keys: Vec<&str> = chunk.iter().map(|(k, _, _)| k.as_str()).collect();
            let values: Vec<Option<i64>> = con.mget(&keys).await.unwrap();
            for ((key, expected, _), value) in chunk.iter().zip(values) {
                assert_eq!(value, Some(*expected), "acknowledged SET {key} lost (read through member {i})");
            }
        }
    }
    println!("{} acknowledged writes survived the kill, {taken_over} of them to taken-over partitions", acked.len());
}
