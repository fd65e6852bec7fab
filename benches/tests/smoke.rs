//! Runs the generator briefly with tiny settings, to check that it works end to end. Asserts only
//! that operations completed and that the counts add up: speed is never asserted.
//!
//! The redis target needs `redis-server` (Debian's redis-server; `.ci/run` installs it): without
//! it that test fails saying so, unless `GRAPEVINE_ALLOW_SKIP=1`.

use std::time::Duration;

use grapevine_benches::grapevine_target::GrapevineCluster;
use grapevine_benches::redis_target::{RedisPair, server_available};
use grapevine_benches::{RunResult, Workload, preload, run};

fn tiny() -> Workload {
    Workload {
        clients: 6,
        warmup: Duration::from_millis(200),
        duration: Duration::from_secs(1),
        keys: 500,
        value_bytes: 100,
        read_percent: 80,
        ..Workload::default()
    }
}

fn check_counts(result: &RunResult, workload: &Workload) {
    assert!(result.ops > 0, "{}: no operation completed: {result:?}", result.target);
    assert_eq!(result.errors, 0, "{}: {:?}", result.target, result.first_error);
    assert_eq!(result.misses, 0, "{}: every key was preloaded, gets must hit", result.target);
    assert_eq!(result.get.count + result.put.count, result.ops, "{}", result.target);
    assert!(result.get.count > 0 && result.put.count > 0, "{}: both kinds ran: {result:?}", result.target);
    let expected = result.ops as f64 / workload.duration.as_secs_f64();
    assert!((result.ops_per_s - expected).abs() < 1e-6, "{}", result.target);
    assert!(result.get.p50_us <= result.get.p99_us && result.get.p99_us <= result.get.p999_us);
    assert!(result.put.p50_us <= result.put.p99_us && result.put.p99_us <= result.put.p999_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grapevine_target_runs_and_counts_add_up() {
    let workload = tiny();
    let cluster = GrapevineCluster::start(3, 0, 21).await.expect("cluster starts");
    let clients = cluster.clients(workload.clients, workload.value_bytes).unwrap();
    let clients = preload(clients, workload.keys).await.expect("preload");
    let estimate = cluster.memory_estimate();
    assert_eq!(estimate.owned_entries, workload.keys, "every key has an owner copy");
    assert_eq!(estimate.backup_entries, workload.keys, "backup_count 1: every key has one backup copy");
    assert!(estimate.memory_bytes > 0);
    let result = run("grapevine", clients, &workload, &[]).await.expect("run");
    println!("grapevine: {result:?}");
    check_counts(&result, &workload);
    cluster.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_target_runs_and_counts_add_up() {
    if let Err(why) = server_available() {
        // The same policy as every test that needs an external tool: a failure saying how to
        // install it, unless GRAPEVINE_ALLOW_SKIP=1 (then a line past the harness's capture);
        // GRAPEVINE_REQUIRE_TOOLS=1 (CI) fails in any case.
        let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        if flag("GRAPEVINE_REQUIRE_TOOLS") {
            panic!("{why}, and GRAPEVINE_REQUIRE_TOOLS=1 requires it");
        }
        if flag("GRAPEVINE_ALLOW_SKIP") {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the redis target's smoke test: {why}; GRAPEVINE_ALLOW_SKIP=1 allows it"
            );
            return;
        }
        panic!("{why}; install it, or set GRAPEVINE_ALLOW_SKIP=1 to skip this test");
    }
    let workload = tiny();
    let pair = RedisPair::start().await.expect("redis primary and replica start");
    let clients = pair.clients(workload.clients, workload.value_bytes, false).await.unwrap();
    let clients = preload(clients, workload.keys).await.expect("preload");
    pair.wait_replicated().await.expect("the replica acknowledges");
    assert_eq!(pair.primary.dbsize().await.unwrap(), workload.keys);
    assert_eq!(pair.replica.dbsize().await.unwrap(), workload.keys);
    for (wait, clients) in
        [(false, clients), (true, pair.clients(workload.clients, workload.value_bytes, true).await.unwrap())]
    {
        let result =
            run(if wait { "redis+wait" } else { "redis" }, clients, &workload, &pair.pids()).await.expect("run");
        println!("{result:?}");
        check_counts(&result, &workload);
    }
}
