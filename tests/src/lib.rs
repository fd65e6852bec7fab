//! Test harness: start an N-member cluster in one line, on distinct loopback addresses, with
//! short timers, and wait for conditions with a deadline (never for a fixed time).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use grapevine::{Cluster, ClusterBuilder, Config};

pub mod faults;

/// The default deadline for conditions in tests. Generous: CI machines are shared and slow.
pub const WAIT: Duration = Duration::from_secs(30);

/// Hands out loopback addresses so tests running in parallel in one process never share one.
/// 127.0.0.1 is left to multi-process tests and humans.
pub fn next_loopback_ip() -> IpAddr {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 127.0.<pid-derived>.<n>: tests of different binaries run in parallel too (nextest).
    let third = (std::process::id() % 200) as u8 + 20;
    Ipv4Addr::new(127, third, n / 250, n % 250 + 2).into()
}

/// A configuration with short timers for tests: 100 ms gossip and a phi threshold of 12, so a
/// silent member is declared dead after roughly a second. Shorter windows made members of a busy
/// test machine (CPU starved while other builds run) declare each other dead while alive.
pub fn test_config(cluster_name: &str) -> Config {
    let mut config = Config::new(cluster_name);
    config.port = 0;
    config.admin_port = 0;
    config.gossip.interval_ms = 100;
    config.gossip.phi_threshold = 12.0;
    config.gossip.probe_interval_ms = 100;
    config.gossip.join_timeout_ms = 2_000;
    config.partitions.anti_entropy_interval_ms = 500;
    config.partitions.expiry_sweep_interval_ms = 100;
    config.partitions.operation_timeout_ms = 20_000;
    config.partitions.migration_timeout_ms = 10_000;
    config.merge_first_run_delay_seconds = 0.0;
    config.merge_run_delay_seconds = 0.5;
    config
}

/// Starts one member on a fresh loopback address that lists `seeds` (data addresses of members).
pub async fn start_member(mut config: Config, seeds: &[&Cluster]) -> Cluster {
    start_member_with(seeds, |b| b.config(std::mem::take(&mut config))).await
}

/// Like [`start_member`], with full control of the builder.
pub async fn start_member_with(seeds: &[&Cluster], build: impl FnOnce(ClusterBuilder) -> ClusterBuilder) -> Cluster {
    let builder = build(Cluster::builder());
    let ip = next_loopback_ip();
    let mut builder = builder.bind(ip);
    if !seeds.is_empty() {
        let members: Vec<String> = seeds.iter().map(|c| c.addresses().gossip.to_string()).collect();
        builder = builder.discovery(grapevine::Discovery::static_list(members));
    }
    builder.start().await.expect("member starts")
}

/// An in-process cluster of real members.
#[derive(Debug)]
pub struct TestCluster {
    /// The members, oldest first.
    pub members: Vec<Cluster>,
}

impl TestCluster {
    /// Starts `n` members of a new cluster and waits until each sees all `n` as active.
    pub async fn start(n: usize) -> TestCluster {
        Self::start_with(n, test_config).await
    }

    /// Like [`TestCluster::start`], with a configuration function (called with the cluster name).
    pub async fn start_with(n: usize, config: impl Fn(&str) -> Config) -> TestCluster {
        init_logging();
        static CLUSTERS: AtomicU8 = AtomicU8::new(0);
        let name = format!("test-{}-{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed));
        let mut members: Vec<Cluster> = Vec::new();
        for _ in 0..n {
            let seeds: Vec<&Cluster> = members.iter().collect();
            let member = start_member(config(&name), &seeds).await;
            members.push(member);
        }
        let cluster = TestCluster { members };
        cluster.wait_all_active(n).await;
        cluster
    }

    /// Waits until every member sees `n` active members and the same master.
    pub async fn wait_all_active(&self, n: usize) {
        wait_until("all members to see each other as active", WAIT, || {
            let views: Vec<_> = self.members.iter().map(|m| m.view()).collect();
            views.iter().all(|v| v.active_members().count() == n) && views.iter().all(|v| v.master == views[0].master)
        })
        .await;
    }

    /// Waits until replication has settled on every member: the newest table everywhere, the
    /// balanced plan reached, every backup confirmed.
    pub async fn wait_settled(&self) {
        wait_settled(&self.members.iter().collect::<Vec<_>>()).await;
    }

    /// The member at index `i`.
    pub fn member(&self, i: usize) -> &Cluster {
        &self.members[i]
    }
}

/// Waits until replication has settled on every member of `members`.
pub async fn wait_settled(members: &[&Cluster]) {
    wait_until("replication to settle", WAIT, || {
        let epochs: Vec<u64> = members.iter().map(|m| m.map_service().table().epoch).collect();
        epochs.iter().all(|e| *e == epochs[0]) && members.iter().all(|m| m.map_service().is_settled())
    })
    .await;
}

/// Polls `condition` every few milliseconds until it holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`] for an async condition.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A key encoded as maps encode it (to find its partition).
pub fn encode_key<K: serde::Serialize>(key: &K) -> Vec<u8> {
    grapevine_net::codec::encode(key).expect("test keys encode")
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
